//! The decision service: the engine, the current snapshot, the nonce ledger and read-your-writes,
//! shared by every front end (Authorize, CheckAccess, Envoy's Check).

use std::{sync::Arc, time::Duration};

use crate::{
    policy::{
        decision::{AuthzRequest, Decision, Engine, Evaluation, Mode},
        model::UnixMillis,
        nonce::NonceLedger,
    },
    store::NonceStore,
    sync::PolicySync,
};

/// Why no decision could be made. Never a denial: the caller cannot be answered at all, and
/// every front end turns this into a refusal (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("policy not loaded yet")]
    NotLoaded,
    #[error("policy revision {wanted} not reached (at {current})")]
    RevisionNotReached { wanted: u64, current: u64 },
    #[error(
        "policy not confirmed against the store for {unconfirmed_ms} ms (max_staleness is {max_ms} ms)"
    )]
    Stale { unconfirmed_ms: u64, max_ms: u64 },
    #[error("nonce store unavailable: {0}")]
    NonceStoreUnavailable(String),
}

/// Where nonces are remembered.
pub enum Nonces {
    /// In this process: enough for one replica.
    Local(NonceLedger),
    /// Shared by every replica (Redis). When it cannot be reached, a request with a nonce is
    /// refused, unless `fallback` (a per-replica ledger) is configured.
    Shared {
        store: Arc<dyn NonceStore>,
        fallback: Option<NonceLedger>,
    },
}

pub struct Decider {
    engine: Engine,
    sync: Arc<PolicySync>,
    nonces: Nonces,
    /// How long a request with `min_revision` may wait for the snapshot to catch up.
    min_revision_wait: Duration,
    /// Stop answering when the snapshot has not been confirmed for this long.
    max_staleness: Option<Duration>,
}

impl Decider {
    pub fn new(
        engine: Engine,
        sync: Arc<PolicySync>,
        nonces: Nonces,
        min_revision_wait: Duration,
        max_staleness: Option<Duration>,
    ) -> Decider {
        Decider {
            engine,
            sync,
            nonces,
            min_revision_wait,
            max_staleness,
        }
    }

    pub fn sync(&self) -> &Arc<PolicySync> {
        &self.sync
    }

    pub async fn decide(
        &self,
        request: &AuthzRequest<'_>,
        min_revision: u64,
        mode: Mode,
    ) -> Result<Decision, AuthzError> {
        let policy = self.sync.policy();
        let current = policy.load();
        if !current.is_loaded() {
            return Err(AuthzError::NotLoaded);
        }
        if current.revision() < min_revision {
            drop(current);
            self.sync.nudge();
            if !self
                .sync
                .wait_for_revision(min_revision, self.min_revision_wait)
                .await
            {
                return Err(AuthzError::RevisionNotReached {
                    wanted: min_revision,
                    current: policy.load().revision(),
                });
            }
        } else {
            drop(current);
        }
        let now = UnixMillis::now();
        if let Some(max) = self.max_staleness {
            let unconfirmed = self.sync.unconfirmed_for(now).unwrap_or(Duration::MAX);
            if unconfirmed > max {
                return Err(AuthzError::Stale {
                    unconfirmed_ms: unconfirmed.as_millis().min(u64::MAX as u128) as u64,
                    max_ms: max.as_millis() as u64,
                });
            }
        }
        let evaluation = {
            let snapshot = policy.load();
            self.engine.evaluate(&snapshot, request, now, mode)
        };
        let pending = match evaluation {
            Evaluation::Decided(decision) => return Ok(decision),
            Evaluation::NonceRequired(pending) => pending,
        };
        let consume = mode == Mode::Enforce;
        let fresh = match &self.nonces {
            Nonces::Local(ledger) => ledger.claim(
                pending.key_id(),
                pending.nonce(),
                pending.forget_after(),
                now,
                consume,
            ),
            Nonces::Shared { store, fallback } => {
                let ttl = Duration::from_millis(
                    pending.forget_after().0.saturating_sub(now.0).max(1) as u64,
                );
                match store
                    .claim_nonce(pending.key_id(), pending.nonce(), ttl, consume)
                    .await
                {
                    Ok(fresh) => fresh,
                    Err(error) => match fallback {
                        Some(ledger) => {
                            tracing::warn!(%error, "nonce store unavailable; using this replica's ledger");
                            ledger.claim(
                                pending.key_id(),
                                pending.nonce(),
                                pending.forget_after(),
                                now,
                                consume,
                            )
                        }
                        None => return Err(AuthzError::NonceStoreUnavailable(error.to_string())),
                    },
                }
            }
        };
        Ok(pending.finish(fresh))
    }
}
