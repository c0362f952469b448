//! What the admin layer needs from the running service, as traits the binary implements: a
//! dry-run decision for "test this key", and a wait until this replica's snapshot includes a
//! write, so that a caller who writes and then asks sees its write.

use std::time::Duration;

use async_trait::async_trait;
use keyfence_policy::decision::{AuthzRequest, Decision};

#[async_trait]
pub trait Decisions: Send + Sync {
    /// Decides without side effects: no nonce is recorded, no rate-limit token spent, nothing
    /// logged. `Err` carries why no decision could be made.
    async fn dry_run(&self, request: &AuthzRequest<'_>) -> Result<Decision, String>;

    /// Waits until this replica's snapshot includes `revision`; `false` when `timeout` passed
    /// first.
    async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> bool;

    /// The revision of this replica's snapshot: what a request that changes nothing reports.
    fn current_revision(&self) -> u64;
}
