//! The embedded store: one crash-safe file (redb, copy-on-write B-trees with checksummed,
//! fsync'd commits) in the data directory, so `keyfence serve` needs nothing else installed.
//!
//! Layout: `keys` (key id → sealed record), `allowlists` (scope → sealed entries), `changes`
//! (revision → JSON scope, the last [`CHANGE_LOG_LEN`] revisions), `meta` (the revision) and
//! `sealing` (the sealing marker). Records and allowlists are sealed by [`Codec`] (see
//! [`crate::sealing`]): the file never holds a signing secret in clear, and a record edited in
//! it is refused. Each mutation is one write transaction that edits the data, bumps the revision
//! and appends to the change log, so after a crash the file holds either the old state or the
//! new one. Opening seals, in one transaction, whatever a version before sealing left in clear,
//! and re-seals values under keys other than the primary. redb calls block, so they run on
//! tokio's blocking pool.
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
    AllowlistEdit, Change, ChangesSince, Committed, FullState, KeyEdit, KeyFilter, KeyPage,
    Refusal, ResealReport, Store, StoreError, StoreResult, report_reseal,
    sealing::{Codec, Location, MarkerState, Resealed, Sealer},
};
use keyfence_policy::{
    model::{AllowlistEntry, KeyId, KeyRecord, PartnerScope, Scope},
    snapshot::KeyMaterial,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const ALLOWLISTS: TableDefinition<&str, &[u8]> = TableDefinition::new("allowlists");
const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");
const SEALING: TableDefinition<&str, &[u8]> = TableDefinition::new("sealing");
const MARKER: &str = "marker";

const REVISION: &str = "revision";
/// The id of this store, also in the data directory's marker.
const STORE_ID: &str = "store_id";
/// How many revisions the change log keeps; a follower further behind reloads everything.
pub const CHANGE_LOG_LEN: u64 = 10_000;
/// The store's file in the data directory.
pub const DB_FILE: &str = "keyfence.redb";
/// A migration writes the sealed store here, then renames it over [`DB_FILE`].
const FRESH_FILE: &str = "keyfence.redb.sealing";
/// The marker of an initialised data directory: the store's id, as text.
pub const MARKER_FILE: &str = "keyfence.store-id";

pub struct EmbeddedStore {
    db: Arc<Database>,
    /// The file, for errors that must name it.
    path: Arc<PathBuf>,
    codec: Codec,
    revisions: watch::Sender<u64>,
    change_log_len: u64,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `data_dir`, sealing with `sealer`. Only one process may
    /// hold it open.
    pub fn open(data_dir: &Path, sealer: Arc<Sealer>) -> StoreResult<EmbeddedStore> {
        EmbeddedStore::open_with_change_log(data_dir, sealer, CHANGE_LOG_LEN)
    }

    /// Like [`EmbeddedStore::open`], keeping `change_log_len` revisions of change log.
    pub fn open_with_change_log(
        data_dir: &Path,
        sealer: Arc<Sealer>,
        change_log_len: u64,
    ) -> StoreResult<EmbeddedStore> {
        let codec = Codec::new(Some(sealer));
        let change_log_len = change_log_len.max(1);
        create_private_dir(data_dir).map_err(|e| {
            StoreError::Unavailable(format!(
                "cannot create data dir {}: {e}",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE);
        let fresh = data_dir.join(FRESH_FILE);
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
        // What an interrupted migration left; the store itself was not touched by it.
        let _ = std::fs::remove_file(&fresh);
        let (db, revision, id) = caught(&path, || {
            let mut db = open_store_file(&path)?;
            if needs_migration(&db, &codec)? {
                drop(db);
                seal_into_fresh_file(&path, &fresh, &codec)?;
                db = open_store_file(&path)?;
            }
            let id = prepare(&db, &path, marker)?;
            let txn = db.begin_write().map_err(unavailable)?;
            let report = reseal_all(&txn, &codec, false)?;
            let sealing = codec
                .encode_marker(MarkerState::Sealed)?
                .expect("the embedded store always has a keyring");
            txn.open_table(SEALING)
                .map_err(unavailable)?
                .insert(MARKER, sealing.as_slice())
                .map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
            report_reseal(&report, false);
            let revision = read_revision(&db.begin_read().map_err(unavailable)?)?;
            Ok((db, revision, id))
        })?;
        if marker.is_none() {
            write_marker(&data_dir.join(MARKER_FILE), id)?;
        }
        Ok(EmbeddedStore {
            db: Arc::new(db),
            path: Arc::new(path),
            codec,
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
        let codec = self.codec.clone();
        self.read(move |txn| {
            let revision = read_revision(txn)?;
            let keys_table = txn.open_table(KEYS).map_err(unavailable)?;
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            let mut keys = Vec::with_capacity(keys_table.len().map_err(unavailable)? as usize);
            let mut refused = Vec::new();
            for row in keys_table.iter().map_err(unavailable)? {
                let (id, value) = row.map_err(unavailable)?;
                let id = parse_key_id(id.value())?;
                let scope = Scope::Key(id.clone());
                let material = codec.decode_key(&id, value.value()).and_then(|record| {
                    let entries = read_list(&codec, &lists, &scope)?;
                    Ok(KeyMaterial { record, entries })
                });
                match material {
                    Ok(material) => keys.push(material),
                    Err(error @ StoreError::Refused { .. }) => refused.push(Refusal {
                        scope,
                        message: error.to_string(),
                    }),
                    Err(error) => return Err(error),
                }
            }
            let mut partner_lists = Vec::new();
            for row in lists
                .range(PARTNER_PREFIX..PARTNER_END)
                .map_err(unavailable)?
            {
                let (scope_key, value) = row.map_err(unavailable)?;
                let partner = parse_partner_scope_key(scope_key.value())?;
                let scope = Scope::Partner(partner.clone());
                match codec.decode_list(&scope, value.value()) {
                    Ok(entries) => partner_lists.push((partner, entries)),
                    Err(error @ StoreError::Refused { .. }) => refused.push(Refusal {
                        scope,
                        message: error.to_string(),
                    }),
                    Err(error) => return Err(error),
                }
            }
            Ok(FullState {
                revision,
                keys,
                partner_lists,
                refused,
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
        let codec = self.codec.clone();
        self.read(move |txn| {
            let keys = txn.open_table(KEYS).map_err(unavailable)?;
            let Some(value) = keys.get(id.as_str()).map_err(unavailable)? else {
                return Ok(None);
            };
            let record = codec.decode_key(&id, value.value())?;
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            let entries = read_list(&codec, &lists, &Scope::Key(id))?;
            Ok(Some(KeyMaterial { record, entries }))
        })
        .await
    }

    async fn load_partner_entries(&self, scope: &PartnerScope) -> StoreResult<Vec<AllowlistEntry>> {
        let scope = Scope::Partner(scope.clone());
        let codec = self.codec.clone();
        self.read(move |txn| {
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            read_list(&codec, &lists, &scope)
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
        let codec = self.codec.clone();
        self.write(move |txn| {
            let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
            if keys.get(record.id.as_str()).map_err(unavailable)?.is_some() {
                return Err(StoreError::AlreadyExists(format!("key {}", record.id)));
            }
            keys.insert(record.id.as_str(), codec.encode_key(&record)?.as_slice())
                .map_err(unavailable)?;
            let scope = Scope::Key(record.id.clone());
            let mut lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            write_list(&codec, &mut lists, &scope, &entries)?;
            Ok((record, scope))
        })
        .await
    }

    async fn get_key(&self, id: &KeyId) -> StoreResult<KeyRecord> {
        let id = id.clone();
        let codec = self.codec.clone();
        self.read(move |txn| {
            let keys = txn.open_table(KEYS).map_err(unavailable)?;
            read_key(&codec, &keys, &id)
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
        let codec = self.codec.clone();
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
                let (id, value) = row.map_err(unavailable)?;
                let id = parse_key_id(id.value())?;
                let record = match codec.decode_key(&id, value.value()) {
                    Ok(record) => record,
                    Err(error @ StoreError::Refused { .. }) => {
                        // Listed by nobody until it is restored; said loudly each time.
                        tracing::error!(%error, key_id = %id, "stored key record refused");
                        continue;
                    }
                    Err(error) => return Err(error),
                };
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
        let codec = self.codec.clone();
        self.write(move |txn| {
            let mut keys = txn.open_table(KEYS).map_err(unavailable)?;
            let mut record = read_key(&codec, &keys, &id)?;
            edit(&mut record)?;
            keys.insert(id.as_str(), codec.encode_key(&record)?.as_slice())
                .map_err(unavailable)?;
            Ok((record, Scope::Key(id)))
        })
        .await
    }

    async fn get_allowlist(&self, scope: &Scope) -> StoreResult<Committed<Vec<AllowlistEntry>>> {
        let scope = scope.clone();
        let codec = self.codec.clone();
        self.read(move |txn| {
            if let Scope::Key(id) = &scope {
                read_key(&codec, &txn.open_table(KEYS).map_err(unavailable)?, id)?;
            }
            let lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            Ok(Committed {
                value: read_list(&codec, &lists, &scope)?,
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
        let codec = self.codec.clone();
        self.write(move |txn| {
            let owner = match &scope {
                Scope::Key(id) => {
                    let keys = txn.open_table(KEYS).map_err(unavailable)?;
                    Some(read_key(&codec, &keys, id)?)
                }
                Scope::Partner(_) => None,
            };
            let mut lists = txn.open_table(ALLOWLISTS).map_err(unavailable)?;
            let mut entries = read_list(&codec, &lists, &scope)?;
            edit(owner.as_ref(), &mut entries)?;
            write_list(&codec, &mut lists, &scope, &entries)?;
            Ok((entries, scope))
        })
        .await
    }

    async fn reseal(&self) -> StoreResult<ResealReport> {
        let db = self.db.clone();
        let codec = self.codec.clone();
        let report = blocking(move || {
            let txn = db.begin_write().map_err(unavailable)?;
            let report = reseal_all(&txn, &codec, false)?;
            if report.resealed > 0 {
                txn.commit().map_err(unavailable)?;
            } else {
                txn.abort().map_err(unavailable)?;
            }
            Ok(report)
        })
        .await?;
        report_reseal(&report, false);
        Ok(report)
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
    crate::create_private_file(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot create {}: {e}", path.display())))?;
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
        // Private like every file in the data directory (data_dir::prepare ran before us).
        let _ = std::fs::remove_file(&temporary);
        crate::create_private_file(&temporary)?;
        let mut file = std::fs::OpenOptions::new().write(true).open(&temporary)?;
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

/// Opens (or creates, 0600) the store's redb file at `path` with every table present.
fn open_store_file(path: &Path) -> StoreResult<Database> {
    let db = open_file(path)?;
    let txn = db.begin_write().map_err(unavailable)?;
    {
        let mut meta = txn.open_table(META).map_err(unavailable)?;
        if meta.get(REVISION).map_err(unavailable)?.is_none() {
            meta.insert(REVISION, 0).map_err(unavailable)?;
        }
        txn.open_table(KEYS).map_err(unavailable)?;
        txn.open_table(ALLOWLISTS).map_err(unavailable)?;
        txn.open_table(CHANGES).map_err(unavailable)?;
        txn.open_table(SEALING).map_err(unavailable)?;
    }
    txn.commit().map_err(unavailable)?;
    Ok(db)
}

/// Whether the store holds values in clear that it may seal now (see [`migration_state`]).
fn needs_migration(db: &Database, codec: &Codec) -> StoreResult<bool> {
    let txn = db.begin_write().map_err(unavailable)?;
    let migrating = migration_state(&txn, codec)?;
    let mut clear = false;
    for table in [KEYS, ALLOWLISTS] {
        for row in txn
            .open_table(table)
            .map_err(unavailable)?
            .iter()
            .map_err(unavailable)?
        {
            let (_, value) = row.map_err(unavailable)?;
            clear |= !Codec::is_sealed(value.value());
        }
    }
    txn.abort().map_err(unavailable)?;
    Ok(migrating && clear)
}

/// Seals a store from before sealing by writing a new file and renaming it over the old one:
/// redb reuses freed pages but does not wipe them, so sealing in place would leave the secrets
/// in clear in the file. Interrupted, it leaves the old file as it was.
fn seal_into_fresh_file(path: &Path, fresh: &Path, codec: &Codec) -> StoreResult<()> {
    let old = Database::create(path)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
    let new = open_store_file(fresh)?;
    let read = old.begin_read().map_err(unavailable)?;
    let txn = new.begin_write().map_err(unavailable)?;
    {
        let mut meta = txn.open_table(META).map_err(unavailable)?;
        for row in read
            .open_table(META)
            .map_err(unavailable)?
            .iter()
            .map_err(unavailable)?
        {
            let (k, v) = row.map_err(unavailable)?;
            meta.insert(k.value(), v.value()).map_err(unavailable)?;
        }
        let mut changes = txn.open_table(CHANGES).map_err(unavailable)?;
        for row in read
            .open_table(CHANGES)
            .map_err(unavailable)?
            .iter()
            .map_err(unavailable)?
        {
            let (k, v) = row.map_err(unavailable)?;
            changes.insert(k.value(), v.value()).map_err(unavailable)?;
        }
        for table in [KEYS, ALLOWLISTS] {
            let mut rows = txn.open_table(table).map_err(unavailable)?;
            for row in read
                .open_table(table)
                .map_err(unavailable)?
                .iter()
                .map_err(unavailable)?
            {
                let (k, v) = row.map_err(unavailable)?;
                rows.insert(k.value(), v.value()).map_err(unavailable)?;
            }
        }
    }
    let report = reseal_all(&txn, codec, true)?;
    txn.commit().map_err(unavailable)?;
    drop((read, old, new));
    let moved = std::fs::rename(fresh, path).and_then(|()| {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    });
    moved.map_err(|e| {
        StoreError::Unavailable(format!(
            "cannot replace {} with the sealed store: {e}",
            path.display()
        ))
    })?;
    report_reseal(&report, true);
    Ok(())
}

fn parse_key_id(text: &str) -> StoreResult<KeyId> {
    text.parse()
        .map_err(|_| StoreError::Corrupt(format!("bad key id {text:?}")))
}

/// The scope a row of `allowlists` belongs to.
fn parse_scope_key(text: &str) -> StoreResult<Scope> {
    match text.strip_prefix("key/") {
        Some(id) => Ok(Scope::Key(parse_key_id(id)?)),
        None => Ok(Scope::Partner(parse_partner_scope_key(text)?)),
    }
}

fn read_key(
    codec: &Codec,
    keys: &impl ReadableTable<&'static str, &'static [u8]>,
    id: &KeyId,
) -> StoreResult<KeyRecord> {
    match keys.get(id.as_str()).map_err(unavailable)? {
        Some(value) => codec.decode_key(id, value.value()),
        None => Err(StoreError::NotFound(format!("key {id}"))),
    }
}

fn read_list(
    codec: &Codec,
    lists: &impl ReadableTable<&'static str, &'static [u8]>,
    scope: &Scope,
) -> StoreResult<Vec<AllowlistEntry>> {
    match lists.get(scope_key(scope).as_str()).map_err(unavailable)? {
        Some(value) => codec.decode_list(scope, value.value()),
        None => Ok(Vec::new()),
    }
}

fn write_list(
    codec: &Codec,
    lists: &mut redb::Table<&'static str, &'static [u8]>,
    scope: &Scope,
    entries: &[AllowlistEntry],
) -> StoreResult<()> {
    let key = scope_key(scope);
    if entries.is_empty() {
        lists.remove(key.as_str()).map_err(unavailable)?;
    } else {
        lists
            .insert(key.as_str(), codec.encode_list(scope, entries)?.as_slice())
            .map_err(unavailable)?;
    }
    Ok(())
}

/// Whether values in clear may be sealed now: only on a store that predates sealing (no marker
/// and no sealed value) or whose migration was interrupted. A missing marker beside sealed
/// values means someone removed it, so values in clear stay refused.
fn migration_state(txn: &WriteTransaction, codec: &Codec) -> StoreResult<bool> {
    let sealing = txn.open_table(SEALING).map_err(unavailable)?;
    if let Some(marker) = sealing.get(MARKER).map_err(unavailable)? {
        return Ok(match codec.decode_marker(marker.value()) {
            Ok(state) => state == MarkerState::Migrating,
            Err(error) => {
                tracing::error!(%error, "the store's sealing marker is refused; values in clear stay refused");
                false
            }
        });
    }
    let any_sealed = |table: TableDefinition<&str, &[u8]>| -> StoreResult<bool> {
        for row in txn
            .open_table(table)
            .map_err(unavailable)?
            .iter()
            .map_err(unavailable)?
        {
            let (_, value) = row.map_err(unavailable)?;
            if Codec::is_sealed(value.value()) {
                return Ok(true);
            }
        }
        Ok(false)
    };
    if any_sealed(KEYS)? || any_sealed(ALLOWLISTS)? {
        tracing::error!(
            "the store's sealing marker is missing although its records are sealed: it was removed \
             outside keyfence; values in clear stay refused"
        );
        return Ok(false);
    }
    Ok(true)
}

/// Re-seals, within `txn`, every key record and allowlist that is not sealed under the primary
/// (and, when `migrating`, seals values in clear). Refused values are left alone and reported.
fn reseal_all(txn: &WriteTransaction, codec: &Codec, migrating: bool) -> StoreResult<ResealReport> {
    let mut report = ResealReport::default();
    let primary = codec
        .sealer()
        .expect("the embedded store always has a keyring")
        .primary_id();
    for (table, is_keys) in [(KEYS, true), (ALLOWLISTS, false)] {
        let mut rows = txn.open_table(table).map_err(unavailable)?;
        let mut replaced = Vec::new();
        for row in rows.iter().map_err(unavailable)? {
            let (name, value) = row.map_err(unavailable)?;
            let location = if is_keys {
                Location::Key(parse_key_id(name.value())?)
            } else {
                Location::List(parse_scope_key(name.value())?)
            };
            match codec.reseal(&location, value.value(), migrating) {
                Ok(Resealed::Current) => {
                    *report.sealed_under.entry(primary.clone()).or_default() += 1;
                }
                Ok(Resealed::Replaced(bytes)) => replaced.push((name.value().to_owned(), bytes)),
                Err(error @ StoreError::Refused { .. }) => {
                    if let Some(kid) = Codec::sealed_under(value.value()) {
                        *report.sealed_under.entry(kid.to_owned()).or_default() += 1;
                    }
                    report.refused.push(error.to_string());
                }
                Err(error) => return Err(error),
            }
        }
        report.resealed += replaced.len();
        *report.sealed_under.entry(primary.clone()).or_default() += replaced.len();
        for (name, bytes) in replaced {
            rows.insert(name.as_str(), bytes.as_slice())
                .map_err(unavailable)?;
        }
    }
    let mut sealing = txn.open_table(SEALING).map_err(unavailable)?;
    let marker = sealing
        .get(MARKER)
        .map_err(unavailable)?
        .map(|v| v.value().to_vec());
    if let Some(marker) = marker {
        match codec.reseal(&Location::Marker, &marker, false) {
            Ok(Resealed::Current) => {}
            Ok(Resealed::Replaced(bytes)) => {
                sealing
                    .insert(MARKER, bytes.as_slice())
                    .map_err(unavailable)?;
            }
            // A refused marker is replaced when the store opens next; it holds no record.
            Err(_) => {}
        }
    }
    report.sealed_under.retain(|_, n| *n > 0);
    Ok(report)
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
