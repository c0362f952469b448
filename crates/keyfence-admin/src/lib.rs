//! keyfence-admin: the admin application layer. Every admin operation lives here once, as a typed
//! command or query; the gRPC Admin service, the REST API and the console are thin translations
//! from their wire formats onto it, so a rule is never written twice.
//!
//! Each command takes an authenticated [`Principal`] and validated domain input, owns its edit
//! rules ([`rules`], creation included), and returns domain results or an [`AdminError`] that
//! points at the offending input by position, never by wire name.
//!
//! Layout:
//! - [`keys`]: create, read, list, update, rotate, revoke.
//! - [`allowlists`]: read, add, replace, remove, for key and partner scopes.
//! - [`access`]: "test this key" and the access log.
//! - [`rules`]: the edit rules that run inside the store's transaction.
//! - [`input`]: limits and text checks every surface applies.
//! - [`ports`]: what the running service provides (dry-run decisions, write visibility).
//!
//! Invariant (a crate boundary, checked by `tests/architecture.rs`): no tonic, prost, hyper
//! or other wire crate. The clock and randomness come in as [`Clock`] and [`RandomSource`].
#![forbid(unsafe_code)]

pub mod access;
pub mod allowlists;
pub mod error;
pub mod input;
pub mod keys;
pub mod ports;
pub mod principal;
pub mod rules;

use std::{sync::Arc, time::Duration};

use keyfence_policy::{clock::Clock, model::Environments, random::RandomSource};
use keyfence_store::{Committed, Store, access_log::AccessLogStore};

pub use self::{
    error::{AdminError, AdminResult},
    ports::Decisions,
    principal::Principal,
};

/// The admin application layer: one per process, shared by every admin surface.
pub struct Admin {
    parts: AdminParts,
}

/// Everything an [`Admin`] is built from.
pub struct AdminParts {
    pub store: Arc<dyn Store>,
    pub access_log: Arc<dyn AccessLogStore>,
    pub decisions: Arc<dyn Decisions>,
    pub clock: Arc<dyn Clock>,
    pub random: Arc<dyn RandomSource>,
    pub environments: Environments,
    /// How long a mutation waits for this replica's snapshot to include it.
    pub visibility_wait: Duration,
    /// The most allowlist entries (or removals) one request may carry.
    pub max_entries_per_request: usize,
}

impl Admin {
    pub fn new(parts: AdminParts) -> Admin {
        Admin { parts }
    }

    /// The environments keys and partner lists can live in, for the edge to parse against.
    pub fn environments(&self) -> &Environments {
        &self.parts.environments
    }

    /// Waits until this replica's snapshot includes a write, so that a caller who writes and then
    /// asks this replica sees its write. A write that is slow to apply is still committed.
    async fn visible<T>(&self, committed: Committed<T>) -> Committed<T> {
        if !self
            .parts
            .decisions
            .wait_for_revision(committed.revision, self.parts.visibility_wait)
            .await
        {
            tracing::warn!(
                revision = committed.revision,
                "write committed but not yet applied locally"
            );
        }
        committed
    }
}
