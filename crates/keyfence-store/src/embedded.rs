//! The embedded store: one crash-safe file (redb, copy-on-write B-trees with checksummed,
//! fsync'd commits) in the data directory, so `keyfence serve` needs nothing else installed.
//!
//! Layout: `keys` (key id → JSON record), `allowlists` (scope → JSON entries), `changes`
//! (revision → JSON scope, the last [`CHANGE_LOG_LEN`] revisions) and `meta` (the revision). Each
//! mutation is one write transaction that edits the data, bumps the revision and appends to the
//! change log, so after a crash the file holds either the old state or the new one. redb calls
//! block, so they run on tokio's blocking pool.
//!
//! Integrity: a data directory, once initialised, holds a marker (`keyfence.store-id`) with the id
//! also written in the store's `meta` table. A missing, empty or different `keyfence.redb` beside
//! the marker is a refusal to open, never a silent empty store (every key denied, the loss
//! unnoticed). A damaged file that makes redb panic is caught and reported, naming the file.

use std::{
    hash::{BuildHasher, RandomState},
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use async_trait::async_trait;
use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition, WriteTransaction,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::watch;

use super::{
    AllowlistEdit, Change, ChangesSince, Committed, FullState, KeyEdit, KeyFilter, KeyPage, Store,
    StoreError, StoreResult,
};
use keyfence_policy::{
    model::{AllowlistEntry, KeyId, KeyRecord, PartnerScope, Scope},
    snapshot::KeyMaterial,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const ALLOWLISTS: TableDefinition<&str, &[u8]> = TableDefinition::new("allowlists");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

const REVISION: &str = "revision";
/// The id of this store, also in the data directory's marker.
const STORE_ID: &str = "store_id";
/// How many revisions the change log keeps; a follower further behind reloads everything.
pub const CHANGE_LOG_LEN: u64 = 10_000;
/// The store's file in the data directory.
pub const DB_FILE: &str = "keyfence.redb";
/// The marker of an initialised data directory: the store's id, as text.
pub const MARKER_FILE: &str = "keyfence.store-id";

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// The file, for errors that must name it.
    path: Arc<PathBuf>,
    revisions: watch::Sender<u64>,
    change_log_len: u64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir`. Only one process may hold it open.
    pub fn open(data_dir: &Path) -> StoreResult<EmbeddedStore> {
        EmbeddedStore::open_with_change_log(data_dir, CHANGE_LOG_LEN)
    }

    /// Like [`EmbeddedStore::open`], keeping `change_log_len` revisions of change log.
    pub fn open_with_change_log(
        data_dir: &Path,
        change_log_len: u64,
    ) -> StoreResult<EmbeddedStore> {
        let change_log_len = change_log_len.max(1);
        create_private_dir(data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE);
        let marker = read_marker(&data_dir.join(MARKER_FILE))?;
        if let Some(expected) = marker {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if size == 0 {
                return Err(StoreError::Corrupt(format!(
                    "{} is missing or empty, but {} says this data directory holds store {expected:016x}: \
                     refusing to start with an empty store; restore the file from a backup \
                     (or remove the data directory to start over)",
                    path.display(),
                    MARKER_FILE
                )));
            }
        }
        let (db, revision) = caught(&path, || {
            let db = open_file(&path)?;
            let id = prepare(&db, &path, marker)?;
            let revision = read_revision(&db.begin_read().map_err(unavailable)?)?;
            Ok((db, revision, id))
        })
        .and_then(|(db, revision, id)| {
            if marker.is_none() {
                write_marker(&data_dir.join(MARKER_FILE), id)?;
            }
            Ok((db, revision))
        })?;
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path: Arc::new(path),
            revisions: watch::Sender::new(revision),
            change_log_len,
        })
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> StoreResult<T> + Send + 'static,
    ) -> StoreResult<T> {
        let db = self.db.clone();
        let path = self.path.clone();
        blocking(move || {
            caught(&path, || f(&db.begin_read().map_err(unavailable)?))
                .map_err(|e| naming(&path, e))
        })
        .await
    }

    /// Runs `f` in a write transaction; commits with a new revision and a change-log entry for
    /// the scope it returns, or aborts everything when it fails.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> StoreResult<(T, Scope)> + Send + 'static,
    ) -> StoreResult<Committed<T>> {
        let db = self.db.clone();
        let path = self.path.clone();
        let change_log_len = self.change_log_len;
        let committed = blocking(move || {
            caught(&path.clone(), move || {
                let txn = db.begin_write().map_err(unavailable)?;
                let (value, scope) = f(&txn)?;
                let revision = {
                    let mut meta = txn.open_table(META).map_err(unavailable)?;
                    let revision = meta
                        .get(REVISION)
                        .map_err(unavailable)?
                        .map_or(0, |v| v.value())
                        + 1;
                    meta.insert(REVISION, revision).map_err(unavailable)?;
                    let mut changes = txn.open_table(CHANGES).map_err(unavailable)?;
                    let change = Change { revision, scope };
                    changes
                        .insert(revision, encode(&change)?.as_slice())
                        .map_err(unavailable)?;
                    if revision > change_log_len {
                        changes
                            .remove(revision - change_log_len)
                            .map_err(unavailable)?;
                    }
                    revision
                };
                txn.commit().map_err(unavailable)?;
                Ok(Committed { value, revision })
            })
        })
        .await?;
        self.revisions.send_replace(committed.revision);
        Ok(committed)
    }
}

#[async_trait]
impl Store for EmbeddedStore {
    async fn load_all(&self) -> StoreResult<FullState> {
        self.read(|txn| {
            let revision = read_revision(txn)?;
            let keys_table = txn.open_table(KEYS).map_err(unavailable)?;
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            let mut keys = Vec::with_capacity(keys_table.len().map_err(unavailable)? as usize);
            for row in keys_table.iter().map_err(unavailable)? {
                let (_, value) = row.map_err(unavailable)?;
                let record: KeyRecord = decode(value.value())?;
                let entries = read_list(&lists, &Scope::Key(record.id.clone()))?;
                keys.push(KeyMaterial { record, entries });
            }
            let mut partner_lists = Vec::new();
            for row in lists
                .range(PARTNER_PREFIX..PARTNER_END)
                .map_err(unavailable)?
            {
                let (scope_key, value) = row.map_err(unavailable)?;
                let scope = parse_partner_scope_key(scope_key.value())?;
                partner_lists.push((scope, decode(value.value())?));
            }
            Ok(FullState {
                revision,
                keys,
                partner_lists,
            })
        })
        .await
    }

    async fn changes_since(&self, after: u64) -> StoreResult<ChangesSince> {
        self.read(move |txn| {
            let revision = read_revision(txn)?;
            if after == revision {
                return Ok(ChangesSince::Changes(Vec::new()));
            }
            if after > revision {
                // The follower saw a future the store does not have (restored from a backup).
                return Ok(ChangesSince::Gap);
            }
            let changes = txn.open_table(CHANGES).map_err(unavailable)?;
            let oldest = changes
                .first()
                .map_err(unavailable)?
                .map(|(k, _)| k.value());
            if oldest.is_none_or(|oldest| oldest > after + 1) {
                return Ok(ChangesSince::Gap);
            }
            let mut out = Vec::new();
            for row in changes.range(after + 1..).map_err(unavailable)? {
                let (_, value) = row.map_err(unavailable)?;
                out.push(decode(value.value())?);
            }
            Ok(ChangesSince::Changes(out))
        })
        .await
    }

    async fn load_key(&self, id: &KeyId) -> StoreResult<Option<KeyMaterial>> {
        let id = id.clone();
        self.read(move |txn| {
            let keys = txn.open_table(KEYS).map_err(unavailable)?;
            let Some(value) = keys.get(id.as_str()).map_err(unavailable)? else {
                return Ok(None);
            };
            let record: KeyRecord = decode(value.value())?;
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            let entries = read_list(&lists, &Scope::Key(id))?;
            Ok(Some(KeyMaterial { record, entries }))
        })
        .await
    }

    async fn load_partner_entries(&self, scope: &PartnerScope) -> StoreResult<Vec<AllowlistEntry>> {
        let scope = Scope::Partner(scope.clone());
        self.read(move |txn| {
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            read_list(&lists, &scope)
        })
        .await
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.revisions.subscribe()
    }

    async fn insert_key(
        &self,
        record: KeyRecord,
        entries: Vec<AllowlistEntry>,
    ) -> StoreResult<Committed<KeyRecord>> {
        self.write(move |txn| {
            let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
            if keys.get(record.id.as_str()).map_err(unavailable)?.is_some() {
                return Err(StoreError::AlreadyExists(format!("key {}", record.id)));
            }
            keys.insert(record.id.as_str(), encode(&record)?.as_slice())
                .map_err(unavailable)?;
            let scope = Scope::Key(record.id.clone());
            let mut lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            write_list(&mut lists, &scope, &entries)?;
            Ok((record, scope))
        })
        .await
    }

    async fn get_key(&self, id: &KeyId) -> StoreResult<KeyRecord> {
        let id = id.clone();
        self.read(move |txn| {
            let keys = txn.open_table(KEYS).map_err(unavailable)?;
            read_key(&keys, &id)
        })
        .await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        after: Option<&KeyId>,
        limit: usize,
    ) -> StoreResult<KeyPage> {
        let filter = filter.clone();
        let after = after.cloned();
        self.read(move |txn| {
            let keys = txn.open_table(KEYS).map_err(unavailable)?;
            let rows = match &after {
                Some(after) => keys.range::<&str>((
                    std::ops::Bound::Excluded(after.as_str()),
                    std::ops::Bound::Unbounded,
                )),
                None => keys.range::<&str>(..),
            }
            .map_err(unavailable)?;
            let mut page = Vec::new();
            let mut more = false;
            for row in rows {
                let (_, value) = row.map_err(unavailable)?;
                let record: KeyRecord = decode(value.value())?;
                if !filter.matches(&record) {
                    continue;
                }
                if page.len() == limit {
                    more = true;
                    break;
                }
                page.push(record);
            }
            let next_after = if more {
                page.last().map(|r| r.id.clone())
            } else {
                None
            };
            Ok(KeyPage {
                keys: page,
                next_after,
            })
        })
        .await
    }

    async fn modify_key(&self, id: &KeyId, edit: KeyEdit) -> StoreResult<Committed<KeyRecord>> {
        let id = id.clone();
        self.write(move |txn| {
            let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
            let mut record = read_key(&keys, &id)?;
            edit(&mut record)?;
            keys.insert(id.as_str(), encode(&record)?.as_slice())
                .map_err(unavailable)?;
            Ok((record, Scope::Key(id)))
        })
        .await
    }

    async fn get_allowlist(&self, scope: &Scope) -> StoreResult<Committed<Vec<AllowlistEntry>>> {
        let scope = scope.clone();
        self.read(move |txn| {
            if let Scope::Key(id) = &scope {
                read_key(&txn.open_table(KEYS).map_err(unavailable)?, id)?;
            }
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            Ok(Committed {
                value: read_list(&lists, &scope)?,
                revision: read_revision(txn)?,
            })
        })
        .await
    }

    async fn modify_allowlist(
        &self,
        scope: &Scope,
        edit: AllowlistEdit,
    ) -> StoreResult<Committed<Vec<AllowlistEntry>>> {
        let scope = scope.clone();
        self.write(move |txn| {
            let owner = match &scope {
                Scope::Key(id) => {
                    let keys = txn.open_table(KEYS).map_err(unavailable)?;
                    Some(read_key(&keys, id)?)
                }
                Scope::Partner(_) => None,
            };
            let mut lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            let mut entries = read_list(&lists, &scope)?;
            edit(owner.as_ref(), &mut entries)?;
            write_list(&mut lists, &scope, &entries)?;
            Ok((entries, scope))
        })
        .await
    }
}

const PARTNER_PREFIX: &str = "partner/";
/// The first string after every "partner/…" key.
const PARTNER_END: &str = "partner0";

fn scope_key(scope: &Scope) -> String {
    match scope {
        Scope::Key(id) => format!("key/{id}"),
        Scope::Partner(p) => format!("{PARTNER_PREFIX}{}/{}", p.partner_id, p.environment),
    }
}

fn parse_partner_scope_key(text: &str) -> StoreResult<PartnerScope> {
    let corrupt = || StoreError::Corrupt(format!("bad allowlist scope {text:?}"));
    let rest = text.strip_prefix(PARTNER_PREFIX).ok_or_else(corrupt)?;
    let (partner, environment) = rest.split_once('/').ok_or_else(corrupt)?;
    Ok(PartnerScope {
        partner_id: partner.parse().map_err(|_| corrupt())?,
        environment: environment.parse().map_err(|_| corrupt())?,
    })
}

/// Damaged data names the file it was read from.
fn naming(path: &Path, error: StoreError) -> StoreError {
    match error {
        StoreError::Corrupt(message) if !message.contains(&*path.to_string_lossy()) => {
            StoreError::Corrupt(format!("{}: {message}", path.display()))
        }
        other => other,
    }
}

/// Runs `f`, turning a panic inside redb (a damaged file: a checksum or a page pointer it cannot
/// make sense of) into an error that names the file, instead of a crash.
pub(crate) fn caught<T>(path: &Path, f: impl FnOnce() -> StoreResult<T>) -> StoreResult<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let detail = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no detail");
        Err(StoreError::Corrupt(format!(
            "{} is damaged and cannot be read ({detail}); restore it from a backup",
            path.display()
        )))
    })
}

pub(crate) fn open_file(path: &Path) -> StoreResult<Database> {
    Database::create(path).map_err(|e| match e {
        redb::DatabaseError::Storage(redb::StorageError::Corrupted(detail)) => {
            StoreError::Corrupt(format!(
                "{} is damaged and cannot be read ({detail}); restore it from a backup",
                path.display()
            ))
        }
        other => StoreError::Unavailable(format!("cannot open {}: {other}", path.display())),
    })
}

/// Creates the tables and the store id of a new store; checks an existing one against the
/// marker. Returns the store's id.
fn prepare(db: &Database, path: &Path, marker: Option<u64>) -> StoreResult<u64> {
    let txn = db.begin_write().map_err(unavailable)?;
    let id = {
        let mut meta = txn.open_table(META).map_err(unavailable)?;
        let stored = meta.get(STORE_ID).map_err(unavailable)?.map(|v| v.value());
        let id = match (stored, marker) {
            (Some(stored), Some(expected)) if stored != expected => {
                return Err(StoreError::Corrupt(format!(
                    "{} holds store {stored:016x}, but {MARKER_FILE} says this data directory holds \
                     store {expected:016x}: refusing to start on another store's file",
                    path.display()
                )));
            }
            (None, Some(expected)) => {
                return Err(StoreError::Corrupt(format!(
                    "{} holds no store id, but {MARKER_FILE} says this data directory holds \
                     store {expected:016x}: the file was replaced by a new one; restore it from a \
                     backup",
                    path.display()
                )));
            }
            (Some(stored), _) => stored,
            // A store from before markers, or a new one.
            (None, None) => {
                let id = RandomState::new().hash_one((std::process::id(), path));
                meta.insert(STORE_ID, id).map_err(unavailable)?;
                id
            }
        };
        if meta.get(REVISION).map_err(unavailable)?.is_none() {
            meta.insert(REVISION, 0).map_err(unavailable)?;
        }
        txn.open_table(KEYS).map_err(unavailable)?;
        txn.open_table(ALLOWLISTS).map_err(unavailable)?;
        txn.open_table(CHANGES).map_err(unavailable)?;
        id
    };
    txn.commit().map_err(unavailable)?;
    Ok(id)
}

fn read_marker(path: &Path) -> StoreResult<Option<u64>> {
    match std::fs::read_to_string(path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16).map(Some).map_err(|_| {
            StoreError::Corrupt(format!(
                "{} does not hold a store id; restore it from a backup",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StoreError::Unavailable(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    }
}

/// Writes the marker durably (the store already holds its id, so a crash before this only
/// means the next start writes it).
fn write_marker(path: &Path, id: u64) -> StoreResult<()> {
    let write = || -> std::io::Result<()> {
        let temporary = path.with_extension("tmp");
        let mut file = std::fs::File::create(&temporary)?;
        writeln!(file, "{id:016x}")?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    };
    write().map_err(|e| StoreError::Unavailable(format!("cannot write {}: {e}", path.display())))
}

fn read_revision(txn: &ReadTransaction) -> StoreResult<u64> {
    let meta = txn.open_table(META).map_err(unavailable)?;
    Ok(meta
        .get(REVISION)
        .map_err(unavailable)?
        .map_or(0, |v| v.value()))
}

fn read_key(
    keys: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &KeyId,
) -> StoreResult<KeyRecord> {
    match keys.get(id.as_str()).map_err(unavailable)? {
        Some(value) => decode(value.value()),
        None => Err(StoreError::NotFound(format!("key {id}"))),
    }
}

fn read_list(
    lists: &impl ReadableTable<&'static str, &'static [u8]>,
    scope: &Scope,
) -> StoreResult<Vec<AllowlistEntry>> {
    match lists.get(scope_key(scope).as_str()).map_err(unavailable)? {
        Some(value) => decode(value.value()),
        None => Ok(Vec::new()),
    }
}

fn write_list(
    lists: &mut redb::Table<&'static str, &'static [u8]>,
    scope: &Scope,
    entries: &[AllowlistEntry],
) -> StoreResult<()> {
    let key = scope_key(scope);
    if entries.is_empty() {
        lists.remove(key.as_str()).map_err(unavailable)?;
    } else {
        lists
            .insert(key.as_str(), encode(&entries)?.as_slice())
            .map_err(unavailable)?;
    }
    Ok(())
}

fn encode<T: Serialize + ?Sized>(value: &T) -> StoreResult<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(format!("cannot encode: {e}")))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> StoreResult<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

/// The store holds HMAC signing secrets: its directory is readable by the service's user only.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("store task failed: {e}")))?
}
