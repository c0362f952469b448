//! The nonce ledger's journal on disk, for the embedded store: `nonces.redb` beside
//! `keyfence.redb`. A replica that keeps its ledger only in memory forgets every nonce when it
//! restarts, and the same signed request is then allowed again for the rest of its window.
//!
//! Rows are keyed (forget-after millis, fingerprint), so the entries whose window has passed are
//! one range delete at the front, and the journal never holds more than one signature window of
//! nonces. Fingerprints are the ledger's own (a truncated SHA-256 of key id and nonce): the
//! journal never holds a nonce in the clear. Every append is one fsync'd commit, so an allow the
//! caller has seen is on disk.

use std::{path::Path, sync::Arc};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use keyfence_policy::model::UnixMillis;

use crate::{StoreError, StoreResult};

const NONCES: TableDefinition<(i64, [u8; 16]), ()> = TableDefinition::new("nonces");
const FILE: &str = "nonces.redb";

/// One remembered nonce: its fingerprint and when it may be forgotten.
pub type JournalEntry = ([u8; 16], UnixMillis);

pub struct NonceJournal {
    db: Arc<Database>,
}

impl NonceJournal {
    pub fn open(data_dir: &Path) -> StoreResult<NonceJournal> {
        let path = data_dir.join(FILE);
        let db = crate::embedded::caught(&path, || {
            let db = crate::embedded::open_file(&path)?;
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(NONCES).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
            Ok(db)
        })?;
        Ok(NonceJournal { db: Arc::new(db) })
    }

    /// Every entry still inside its window at `now`; forgets the others.
    pub fn load(&self, now: UnixMillis) -> StoreResult<Vec<JournalEntry>> {
        self.forget_before(now)?;
        let txn = self.db.begin_read().map_err(unavailable)?;
        let table = txn.open_table(NONCES).map_err(unavailable)?;
        table
            .iter()
            .map_err(unavailable)?
            .map(|row| {
                let (key, _) = row.map_err(unavailable)?;
                let (until, fingerprint) = key.value();
                Ok((fingerprint, UnixMillis(until)))
            })
            .collect()
    }

    /// Records `entries` in one durable commit, forgetting those whose window ended before `now`.
    pub fn append(&self, entries: &[JournalEntry], now: UnixMillis) -> StoreResult<()> {
        let txn = self.db.begin_write().map_err(unavailable)?;
        {
            let mut table = txn.open_table(NONCES).map_err(unavailable)?;
            for (fingerprint, until) in entries {
                table
                    .insert((until.0, *fingerprint), ())
                    .map_err(unavailable)?;
            }
            table
                .retain_in(..(now.0, [0u8; 16]), |_, _| false)
                .map_err(unavailable)?;
        }
        txn.commit().map_err(unavailable)
    }

    fn forget_before(&self, now: UnixMillis) -> StoreResult<()> {
        self.append(&[], now)
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("nonce journal: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_a_reopen_until_their_window_ends() {
        let dir = tempfile::tempdir().unwrap();
        {
            let journal = NonceJournal::open(dir.path()).unwrap();
            journal
                .append(
                    &[([1; 16], UnixMillis(2_000)), ([2; 16], UnixMillis(5_000))],
                    UnixMillis(1_000),
                )
                .unwrap();
        }
        let journal = NonceJournal::open(dir.path()).unwrap();
        assert_eq!(
            journal.load(UnixMillis(1_500)).unwrap(),
            [([1; 16], UnixMillis(2_000)), ([2; 16], UnixMillis(5_000))]
        );
        assert_eq!(
            journal.load(UnixMillis(3_000)).unwrap(),
            [([2; 16], UnixMillis(5_000))],
            "an entry past its window is forgotten"
        );
    }
}
