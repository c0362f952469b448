//! The decision service: the engine, the current snapshot, the nonce ledger and read-your-writes,
//! shared by every front end (Authorize, Envoy's Check, and the admin layer's dry run through
//! [`keyfence_admin::Decisions`]). This is the one decision path production runs, and the one the
//! decision benchmark measures.

pub mod journal;

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use keyfence_policy::{
    clock::Clock,
    decision::{AuthzRequest, Decision, Engine, Evaluation, Mode},
    model::UnixMillis,
    nonce::{NonceLedger, fingerprint},
};
use keyfence_store::{NonceStore, access_log::Frontend};

use crate::{
    access::{AccessEvent, AccessRecorder},
    sync::PolicySync,
    telemetry::metrics::Metrics,
};

/// Who asked, for metrics and the access log.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub frontend: Frontend,
    /// HTTP method and path, when known.
    pub endpoint: Option<(&'a str, &'a str)>,
}

/// Why no decision could be made. Never a denial: the caller cannot be answered at all, and
/// every front end turns this into a refusal (fail closed).
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("policy not loaded yet")]
    NotLoaded,
    /// The replica's own revision is not said: data-plane callers learn only what they asked.
    #[error("policy revision {wanted} not reached")]
    RevisionNotReached { wanted: u64 },
    /// As many calls as allowed are already waiting for a revision.
    #[error("too many requests are waiting for a policy revision; retry later")]
    TooManyWaiting,
    #[error(
        "policy not confirmed against the store for {unconfirmed_ms} ms (max_staleness is {max_ms} ms)"
    )]
    Stale { unconfirmed_ms: u64, max_ms: u64 },
    #[error("nonce store unavailable: {0}")]
    NonceStoreUnavailable(String),
    /// More decisions in progress than `max_inflight`: refused at once, never queued.
    #[error("overloaded: {max} decisions already in progress")]
    Overloaded { max: usize },
    #[error("no decision within {timeout_ms} ms")]
    DeadlineExceeded { timeout_ms: u64 },
}

/// Bounds on the work in progress: how many decisions at once, and how long each may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_inflight: usize,
    pub decision_timeout: Duration,
}

/// Where nonces are remembered.
pub enum Nonces {
    /// In this process only: forgotten on restart (benchmarks).
    Local(NonceLedger),
    /// In this process, and journaled before a request is allowed so that a restart does not
    /// reopen the window (the embedded store).
    Durable {
        ledger: NonceLedger,
        journal: journal::Journal,
    },
    /// Shared by every replica (Redis). When it cannot be reached, a request with a nonce is
    /// refused, unless `fallback` (a per-replica ledger) is configured.
    Shared {
        store: Arc<dyn NonceStore>,
        fallback: Option<NonceLedger>,
    },
}

pub struct Decider {
    engine: Engine,
    /// Where `now` comes from: the system clock in production, a fixed one in benchmarks.
    clock: Arc<dyn Clock>,
    sync: Arc<PolicySync>,
    nonces: Nonces,
    /// How long a request with `min_revision` may wait for the snapshot to catch up.
    min_revision_wait: Duration,
    /// One permit per request allowed to wait at once.
    min_revision_waiters: Arc<tokio::sync::Semaphore>,
    /// Stop answering when the snapshot has not been confirmed for this long.
    max_staleness: Option<Duration>,
    /// Permits for decisions in progress (`Limits::max_inflight`).
    inflight: tokio::sync::Semaphore,
    limits: Limits,
    metrics: Arc<Metrics>,
    /// `None` when access logging is switched off.
    access: Option<AccessRecorder>,
}

/// Everything a [`Decider`] is built from.
pub struct DeciderParts {
    pub engine: Engine,
    pub clock: Arc<dyn Clock>,
    pub sync: Arc<PolicySync>,
    pub nonces: Nonces,
    pub min_revision_wait: Duration,
    /// How many requests may wait for a `min_revision` at once.
    pub min_revision_max_waiters: usize,
    pub max_staleness: Option<Duration>,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    pub access: Option<AccessRecorder>,
}

impl Decider {
    pub fn new(parts: DeciderParts) -> Decider {
        let DeciderParts {
            engine,
            clock,
            sync,
            nonces,
            min_revision_wait,
            min_revision_max_waiters,
            max_staleness,
            limits,
            metrics,
            access,
        } = parts;
        Decider {
            engine,
            clock,
            sync,
            nonces,
            min_revision_wait,
            min_revision_waiters: Arc::new(tokio::sync::Semaphore::new(min_revision_max_waiters)),
            max_staleness,
            inflight: tokio::sync::Semaphore::new(limits.max_inflight),
            limits,
            metrics,
            access,
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn sync(&self) -> &Arc<PolicySync> {
        &self.sync
    }

    /// Decides; a real (not dry-run) decision is counted and offered to the access log.
    pub async fn decide(
        &self,
        request: &AuthzRequest<'_>,
        min_revision: u64,
        mode: Mode,
        origin: Origin<'_>,
    ) -> Result<Decision, AuthzError> {
        let started = std::time::Instant::now();
        let Ok(_permit) = self.inflight.try_acquire() else {
            self.metrics.decisions_shed.inc();
            return Err(AuthzError::Overloaded {
                max: self.limits.max_inflight,
            });
        };
        let (decision, now) = self.decide_unobserved(request, min_revision, mode).await?;
        if mode == Mode::Enforce {
            self.metrics
                .record_decision(origin.frontend, &decision, started.elapsed());
            if let Some(access) = &self.access {
                access.record(AccessEvent::of(
                    &decision,
                    now,
                    origin.frontend,
                    origin.endpoint,
                ));
            }
        }
        Ok(decision)
    }

    async fn decide_unobserved(
        &self,
        request: &AuthzRequest<'_>,
        min_revision: u64,
        mode: Mode,
    ) -> Result<(Decision, UnixMillis), AuthzError> {
        let policy = self.sync.policy();
        let current = policy.load();
        if !current.is_loaded() {
            return Err(AuthzError::NotLoaded);
        }
        if current.revision() < min_revision {
            drop(current);
            // Anyone can ask for a revision that does not exist: the waiting is bounded in time
            // and in number, so that such calls cannot pile up.
            let Ok(_permit) = self.min_revision_waiters.try_acquire() else {
                return Err(AuthzError::TooManyWaiting);
            };
            self.sync.nudge();
            if !self
                .sync
                .wait_for_revision(min_revision, self.min_revision_wait)
                .await
            {
                return Err(AuthzError::RevisionNotReached {
                    wanted: min_revision,
                });
            }
        } else {
            drop(current);
        }
        let now = self.clock.now();
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
            Evaluation::Decided(decision) => return Ok((decision, now)),
            Evaluation::NonceRequired(pending) => pending,
        };
        let decision = match &self.nonces {
            Nonces::Local(ledger) => pending.settle_locally(ledger),
            Nonces::Durable { ledger, journal } => {
                let consume = mode.consumes();
                let (key, nonce) = (pending.key_id().clone(), pending.nonce());
                let fresh = ledger.claim(&key, nonce, pending.forget_after(), now, consume);
                if fresh && consume {
                    let entry = (fingerprint(&key, nonce), pending.forget_after());
                    if let Err(error) = journal.record(entry).await {
                        // Refused: the nonce must stay fresh for the retry.
                        ledger.release(&key, nonce);
                        pending.abandon();
                        return Err(AuthzError::NonceStoreUnavailable(error));
                    }
                }
                pending.finish(fresh)
            }
            Nonces::Shared { store, fallback } => {
                let ttl = Duration::from_millis(
                    pending.forget_after().0.saturating_sub(now.0).max(1) as u64,
                );
                // The one await a decision may make besides waiting for `min_revision` (which
                // min_revision_wait bounds, and which must be shorter than the timeout), so the
                // deadline is set here: a decision that never awaits pays for no timer.
                let claimed = tokio::time::timeout(
                    self.limits.decision_timeout,
                    store.claim_nonce(pending.key_id(), pending.nonce(), ttl, mode.consumes()),
                )
                .await
                .map_err(|_| AuthzError::DeadlineExceeded {
                    timeout_ms: self.limits.decision_timeout.as_millis() as u64,
                })?;
                match (claimed, fallback) {
                    (Ok(fresh), _) => pending.finish(fresh),
                    (Err(error), Some(ledger)) => {
                        tracing::warn!(%error, "nonce store unavailable; using this replica's ledger");
                        pending.settle_locally(ledger)
                    }
                    (Err(error), None) => {
                        // Refused without a verdict: the request gives back its rate-limit place,
                        // and the store withdraws a claim that may have landed after all.
                        pending.abandon();
                        return Err(AuthzError::NonceStoreUnavailable(error.to_string()));
                    }
                }
            }
        };
        Ok((decision, now))
    }
}

/// The admin layer's view of the decision service: "test this key" and read-your-writes.
#[async_trait]
impl keyfence_admin::Decisions for Decider {
    async fn dry_run(&self, request: &AuthzRequest<'_>) -> Result<Decision, String> {
        let origin = Origin {
            frontend: Frontend::Authorize,
            endpoint: None,
        };
        self.decide(request, 0, Mode::DryRun, origin)
            .await
            .map_err(|error| error.to_string())
    }

    async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> bool {
        self.sync.wait_for_revision(revision, timeout).await
    }

    fn current_revision(&self) -> u64 {
        self.sync.policy().load().revision()
    }
}
