//! Access logs on disk beside the embedded store: `access.redb` in the data directory, separate
//! from the policy file so that a busy log never slows a policy write.
//!
//! Records are keyed by (key id, order) where order = `u64::MAX - (millis << 20 | counter)`, so a
//! forward scan of one key is newest first. Retention trims by age (a suffix of the key's range)
//! and by count after every batch.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{AccessLogStore, AccessPage, AccessQuery, AccessRecord, LastUse, Retention};
use crate::{
    policy::model::{KeyId, UnixMillis},
    store::{StoreError, StoreResult},
};

const RECORDS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("access_records");
const LAST_USED: TableDefinition<&str, &[u8]> = TableDefinition::new("last_used");
const FILE: &str = "access.redb";
const COUNTER_BITS: u32 = 20;

pub struct EmbeddedAccessLog {
    db: Arc<Database>,
    counter: AtomicU64,
}

impl EmbeddedAccessLog {
    pub fn open(data_dir: &Path) -> StoreResult<EmbeddedAccessLog> {
        let path = data_dir.join(FILE);
        let db = Database::create(&path)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", path.display())))?;
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(RECORDS).map_err(unavailable)?;
        txn.open_table(LAST_USED).map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        Ok(EmbeddedAccessLog {
            db: Arc::new(db),
            counter: AtomicU64::new(0),
        })
    }

    fn order(&self, at: UnixMillis) -> u64 {
        let counter = self.counter.fetch_add(1, Ordering::Relaxed) & ((1 << COUNTER_BITS) - 1);
        u64::MAX - (((at.0.max(0) as u64) << COUNTER_BITS) | counter)
    }
}

/// The smallest order a record at or before `at` can have.
fn first_order_at_or_before(at: UnixMillis) -> u64 {
    u64::MAX - (((at.0.max(0) as u64) << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1))
}

#[async_trait]
impl AccessLogStore for EmbeddedAccessLog {
    async fn append(&self, records: Vec<AccessRecord>, retention: Retention) -> StoreResult<()> {
        let keyed: Vec<(String, u64, Vec<u8>)> = records
            .iter()
            .filter_map(|r| {
                let key = r.key_id.as_ref()?;
                Some(serde_json::to_vec(r).map(|json| (key.to_string(), self.order(r.at), json)))
            })
            .collect::<Result<_, _>>()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(RECORDS).map_err(unavailable)?;
                let mut touched = std::collections::BTreeSet::new();
                for (key, order, json) in &keyed {
                    table
                        .insert((key.as_str(), *order), json.as_slice())
                        .map_err(unavailable)?;
                    touched.insert(key.clone());
                }
                let cutoff =
                    UnixMillis::now().saturating_add_secs(-(retention.max_age.as_secs() as i64));
                for key in &touched {
                    let key = key.as_str();
                    // Older than the age limit: a suffix of this key's range.
                    let too_old = first_order_at_or_before(UnixMillis(cutoff.0 - 1));
                    table
                        .retain_in((key, too_old)..=(key, u64::MAX), |_, _| false)
                        .map_err(unavailable)?;
                    // Beyond the count limit.
                    let nth = table
                        .range((key, 0)..=(key, u64::MAX))
                        .map_err(unavailable)?
                        .nth(retention.max_records_per_key)
                        .transpose()
                        .map_err(unavailable)?
                        .map(|(k, _)| k.value().1);
                    if let Some(first_excess) = nth {
                        table
                            .retain_in((key, first_excess)..=(key, u64::MAX), |_, _| false)
                            .map_err(unavailable)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn list(&self, query: &AccessQuery) -> StoreResult<AccessPage> {
        let query = query.clone();
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECORDS).map_err(unavailable)?;
            let key = query.key_id.as_str();
            let mut start = match &query.page_token {
                Some(token) => token
                    .parse::<u64>()
                    .map_err(|_| {
                        StoreError::rejected("page_token", "is not a token this server issued")
                    })?
                    .saturating_add(1),
                None => 0,
            };
            if let Some(until) = query.until {
                start = start.max(first_order_at_or_before(until));
            }
            let mut page = AccessPage::default();
            for row in table
                .range((key, start)..=(key, u64::MAX))
                .map_err(unavailable)?
            {
                let (k, v) = row.map_err(unavailable)?;
                let record: AccessRecord = serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                if query.since.is_some_and(|since| record.at < since) {
                    break;
                }
                if query.blocked_only && record.allowed {
                    continue;
                }
                page.records.push(record);
                if page.records.len() == query.limit {
                    page.next_page_token = Some(k.value().1.to_string());
                    break;
                }
            }
            Ok(page)
        })
        .await
    }

    async fn record_last_used(&self, uses: Vec<(KeyId, LastUse)>) -> StoreResult<()> {
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut table = txn.open_table(LAST_USED).map_err(unavailable)?;
                for (id, last) in &uses {
                    let newer = match table.get(id.as_str()).map_err(unavailable)? {
                        Some(existing) => serde_json::from_slice::<LastUse>(existing.value())
                            .map_or(true, |e| e.at <= last.at),
                        None => true,
                    };
                    if newer {
                        let json = serde_json::to_vec(last)
                            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                        table
                            .insert(id.as_str(), json.as_slice())
                            .map_err(unavailable)?;
                    }
                }
            }
            txn.commit().map_err(unavailable)
        })
        .await
    }

    async fn last_used(&self, ids: &[KeyId]) -> StoreResult<Vec<Option<LastUse>>> {
        let ids = ids.to_vec();
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(LAST_USED).map_err(unavailable)?;
            ids.iter()
                .map(|id| match table.get(id.as_str()).map_err(unavailable)? {
                    Some(v) => serde_json::from_slice(v.value())
                        .map(Some)
                        .map_err(|e| StoreError::Corrupt(e.to_string())),
                    None => Ok(None),
                })
                .collect()
        })
        .await
    }
}

fn unavailable(error: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(error.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("access log task failed: {e}")))?
}
