//! The decision service: the engine, the current snapshot, the nonce ledger and read-your-writes,
//! shared by every front end (Authorize, CheckAccess, Envoy's Check).

use std::{sync::Arc, time::Duration};

use crate::{
    policy::{
        decision::{AuthzRequest, Decision, Engine, Mode},
        model::UnixMillis,
        nonce::NonceLedger,
    },
    sync::PolicySync,
};

/// Why no decision could be made. Never a denial: the caller cannot be answered at all.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("policy not loaded yet")]
    NotLoaded,
    #[error("policy revision {wanted} not reached (at {current})")]
    RevisionNotReached { wanted: u64, current: u64 },
}

pub struct Decider {
    engine: Engine,
    sync: Arc<PolicySync>,
    nonces: NonceLedger,
    /// How long a request with `min_revision` may wait for the snapshot to catch up.
    min_revision_wait: Duration,
}

impl Decider {
    pub fn new(engine: Engine, sync: Arc<PolicySync>, min_revision_wait: Duration) -> Decider {
        Decider {
            engine,
            sync,
            nonces: NonceLedger::default(),
            min_revision_wait,
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
        let mut snapshot = policy.load();
        if !snapshot.is_loaded() {
            return Err(AuthzError::NotLoaded);
        }
        if snapshot.revision() < min_revision {
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
            snapshot = policy.load();
        }
        let now = UnixMillis::now();
        Ok(self
            .engine
            .decide(&snapshot, request, now, mode, &self.nonces))
    }
}
