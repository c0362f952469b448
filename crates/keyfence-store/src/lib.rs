//! The source of truth for keys and allowlists: one trait, one implementation per backend.
//!
//! Every mutation is all-or-nothing and bumps a store-wide revision, recording which scope it
//! touched in a change log. The change log is what replicas follow ([`Store::changes_since`]);
//! notifications ([`Store::watch`]) are only hints to look at it. A reader that finds a gap in
//! the log reloads everything.
//!
//! Mutations take a closure that edits the current record inside the store's transaction, so the
//! rules of each edit are written once, in the admin layer (`keyfence-admin`), for every backend;
//! the store knows no rule of its own. It also keeps the access log ([`access_log`]).
//!
//! Invariant (a crate boundary): the store knows the policy model, never tonic, protobuf, HTTP or
//! the admin layer. `tests/store_conformance.rs` runs one suite against every backend.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod embedded;
pub mod nonce_log;
pub mod redis;
pub mod sealing;

use std::time::SystemTime;

use async_trait::async_trait;

use keyfence_policy::{
    model::{
        AllowlistEntry, Environment, KeyId, KeyRecord, PartnerId, PartnerScope, Scope, UnixMillis,
    },
    snapshot::KeyMaterial,
};

/// What can go wrong in a store call. The admin layer maps each variant to its own error, and the
/// edge that to a status.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} not found")]
    NotFound(String),
    /// An edit closure refused the edit; its own error is handed back unchanged, for the layer
    /// that wrote the rule to interpret.
    #[error("{0}")]
    Rejected(Box<dyn std::error::Error + Send + Sync>),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// A page token this store did not issue.
    #[error("is not a token this server issued")]
    ForeignPageToken,
    /// The target is in a state that forbids the edit (a revoked key).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The backend cannot be reached; the caller may retry.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be read back: a bug or a damaged file.
    #[error("store data is corrupt: {0}")]
    Corrupt(String),
    /// A stored record failed its integrity check (edited outside keyfence, moved from another
    /// record, or sealed under a key the keyring lacks). It is never used: a key so refused is
    /// denied, a partner list so refused allows nothing.
    #[error("{what} refused: {reason}")]
    Refused { what: String, reason: String },
}

impl StoreError {
    /// An edit refused by the closure's rule.
    pub fn rejected(cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StoreError {
        StoreError::Rejected(cause.into())
    }
}

/// Creates `path` empty with mode 0600 when it does not exist, so that a database file the store
/// opens next is private from its first byte whatever the process's umask (redb would create it
/// 0644). An existing file is left as it is: the data directory's modes are fixed at start.
pub(crate) fn create_private_file(path: &std::path::Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    match options.open(path) {
        Ok(_) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

/// Logs what a re-seal pass did.
pub(crate) fn report_reseal(report: &ResealReport, migrating: bool) {
    for error in &report.refused {
        tracing::error!(%error, "stored record refused by the re-seal pass; left as it is");
    }
    if migrating && report.resealed > 0 {
        tracing::warn!(
            records = report.resealed,
            "sealed records written in clear before sealing existed"
        );
    } else if report.resealed > 0 {
        tracing::info!(
            records = report.resealed,
            "re-sealed records under the primary key"
        );
    }
    tracing::info!(sealed_under = ?report.sealed_under, "stored records by sealing key");
}

/// Now, for retention cutoffs: the store may read the clock, the policy core may not.
pub(crate) fn wall_clock_now() -> UnixMillis {
    UnixMillis::from_system_time(SystemTime::now())
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A value together with the store revision its write created (or its read saw).
#[derive(Debug, Clone)]
pub struct Committed<T> {
    pub value: T,
    pub revision: u64,
}

/// One entry of the change log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub revision: u64,
    pub scope: Scope,
}

/// The answer to "what changed after revision N".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangesSince {
    /// Every change after N, in revision order (empty when up to date).
    Changes(Vec<Change>),
    /// The log no longer reaches back to N: reload everything.
    Gap,
}

/// Everything, consistent at one revision.
pub struct FullState {
    pub revision: u64,
    pub keys: Vec<KeyMaterial>,
    pub partner_lists: Vec<(PartnerScope, Vec<AllowlistEntry>)>,
    /// Records left out because they failed their integrity check ([`StoreError::Refused`]): a
    /// key whose record or own allowlist was refused is absent from `keys` (so denied), a
    /// partner list so refused is absent from `partner_lists` (so allows nothing).
    pub refused: Vec<Refusal>,
}

/// A record left out of a load, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    /// The [`StoreError::Refused`] message: names the record and the reason.
    pub message: String,
}

/// What a re-seal pass ([`Store::reseal`]) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResealReport {
    /// Values this pass re-sealed under the primary key (or, migrating, sealed for the first time).
    pub resealed: usize,
    /// How many stored values each keyring key seals after the pass, by key id.
    pub sealed_under: std::collections::BTreeMap<String, usize>,
    /// Values that failed to open, left as they are (the [`StoreError::Refused`] messages).
    pub refused: Vec<String>,
}

#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub partner_id: Option<PartnerId>,
    pub environment: Option<Environment>,
}

impl KeyFilter {
    pub fn matches(&self, record: &KeyRecord) -> bool {
        self.partner_id
            .as_ref()
            .is_none_or(|p| *p == record.partner_id)
            && self
                .environment
                .as_ref()
                .is_none_or(|e| *e == record.environment)
    }
}

/// One page of keys, in id order.
#[derive(Debug, Clone)]
pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    /// The last id of this page when more may follow.
    pub next_after: Option<KeyId>,
}

/// Edits a key in place; an error aborts the transaction. A backend with optimistic concurrency
/// (Redis) may call it again on a fresh read when another writer got there first.
pub type KeyEdit = Box<dyn Fn(&mut KeyRecord) -> StoreResult<()> + Send + Sync>;
/// Edits an allowlist in place; an error aborts the transaction. For a key's own list it is also
/// handed the key as the same transaction reads it (the store guards it against concurrent
/// change), so that a rule can depend on the key's state; `None` for a partner list. May be
/// called more than once, like [`KeyEdit`].
pub type AllowlistEdit =
    Box<dyn Fn(Option<&KeyRecord>, &mut Vec<AllowlistEntry>) -> StoreResult<()> + Send + Sync>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Every key with its own entries and every partner list, at one revision.
    async fn load_all(&self) -> StoreResult<FullState>;

    /// The change log after `revision`.
    async fn changes_since(&self, revision: u64) -> StoreResult<ChangesSince>;

    /// One key with its own entries, for recompiling it.
    async fn load_key(&self, id: &KeyId) -> StoreResult<Option<KeyMaterial>>;

    /// A partner's entries in one environment.
    async fn load_partner_entries(&self, scope: &PartnerScope) -> StoreResult<Vec<AllowlistEntry>>;

    /// Hints: the latest revision this store instance knows was written. A change of value means
    /// "look at the change log"; missing one is harmless.
    fn watch(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Stores a new key and its own entries in one transaction.
    async fn insert_key(
        &self,
        record: KeyRecord,
        entries: Vec<AllowlistEntry>,
    ) -> StoreResult<Committed<KeyRecord>>;

    async fn get_key(&self, id: &KeyId) -> StoreResult<KeyRecord>;

    /// Keys matching `filter` with ids after `after`, at most `limit`.
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        after: Option<&KeyId>,
        limit: usize,
    ) -> StoreResult<KeyPage>;

    /// Reads, edits and writes a key atomically.
    async fn modify_key(&self, id: &KeyId, edit: KeyEdit) -> StoreResult<Committed<KeyRecord>>;

    /// A scope's allowlist (a key scope must name an existing key).
    async fn get_allowlist(&self, scope: &Scope) -> StoreResult<Committed<Vec<AllowlistEntry>>>;

    /// Reads, edits and writes an allowlist atomically. A key scope must name an existing key.
    async fn modify_allowlist(
        &self,
        scope: &Scope,
        edit: AllowlistEdit,
    ) -> StoreResult<Committed<Vec<AllowlistEntry>>>;

    /// Re-seals every stored value that is not sealed under the keyring's primary key, one value
    /// at a time and compare-and-set, without a new revision (the records do not change). An
    /// interrupted pass leaves each value sealed under the old key or the new one, both of which
    /// the keyring still opens; the next pass finishes the work.
    async fn reseal(&self) -> StoreResult<ResealReport>;
}

/// Where nonces are remembered when replicas must share them.
#[async_trait]
pub trait NonceStore: Send + Sync + 'static {
    /// Records `nonce` for `key` for `ttl` and answers whether it was fresh; with
    /// `consume == false` it only answers.
    async fn claim_nonce(
        &self,
        key: &KeyId,
        nonce: &str,
        ttl: std::time::Duration,
        consume: bool,
    ) -> StoreResult<bool>;
}
