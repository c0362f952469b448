//! Access logs on disk beside the embedded store: `access.redb` in the data directory, separate
//! from the policy file so that a busy log never slows a policy write.
//!
//! The writer hands over records in batches, so the log stores one *block* per key per batch:
//! rows keyed (key id, order) with order = `u64::MAX - (millis << 20 | counter)`, so a forward scan
//! of one key is newest first; a block's value is its record count (4 bytes) and the records,
//! newest first, in postcard. A per-key count row makes trimming by count a walk from the oldest
//! end (the oldest block is rewritten when only part of it must go), and trimming by age a range
//! delete: no batch ever rescans a key's whole log.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use async_trait::async_trait;
use redb::{Database, ReadableDatabase, ReadableTable, Table, TableDefinition};

use super::{
    AccessBatch, AccessLogStore, AccessPage, AccessQuery, Entry, KeyIdentity, LastUse, Retention,
};
use keyfence_policy::model::{KeyId, UnixMillis};

use crate::{StoreError, StoreResult, wall_clock_now};

const BLOCKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("access_blocks");
const COUNTS: TableDefinition<&str, u64> = TableDefinition::new("access_counts");
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
        let db = crate::embedded::caught(&path, || {
            let db = crate::embedded::open_file(&path)?;
            let txn = db.begin_write().map_err(unavailable)?;
            txn.open_table(BLOCKS).map_err(unavailable)?;
            txn.open_table(COUNTS).map_err(unavailable)?;
            txn.open_table(LAST_USED).map_err(unavailable)?;
            txn.commit().map_err(unavailable)?;
            Ok(db)
        })?;
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

/// The smallest order a block started at or before `at` can have.
fn first_order_at_or_before(at: UnixMillis) -> u64 {
    u64::MAX - (((at.0.max(0) as u64) << COUNTER_BITS) | ((1 << COUNTER_BITS) - 1))
}

/// A block: the entry count (4 bytes, for trimming without decoding), then the key's identity and
/// its entries, newest first, in postcard.
fn encode_block(identity: &KeyIdentity, entries: &[Entry]) -> StoreResult<Vec<u8>> {
    let mut out = (entries.len() as u32).to_le_bytes().to_vec();
    out.extend(postcard::to_stdvec(&(identity, entries)).map_err(corrupt)?);
    Ok(out)
}

fn block_count(bytes: &[u8]) -> StoreResult<u64> {
    let prefix: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("short access block".into()))?;
    Ok(u64::from(u32::from_le_bytes(prefix)))
}

fn decode_block(bytes: &[u8]) -> StoreResult<(KeyIdentity, Vec<Entry>)> {
    postcard::from_bytes(&bytes[4..]).map_err(corrupt)
}

/// Deletes the oldest records of `key` until at most `keep` remain; returns how many remain.
fn trim_to(
    blocks: &mut Table<(&str, u64), &[u8]>,
    key: &str,
    mut count: u64,
    keep: u64,
) -> StoreResult<u64> {
    while count > keep {
        let Some(oldest) = blocks
            .range((key, 0)..=(key, u64::MAX))
            .map_err(unavailable)?
            .next_back()
            .transpose()
            .map_err(unavailable)?
            .map(|(k, v)| (k.value().1, v.value().to_vec()))
        else {
            return Ok(0);
        };
        let (order, bytes) = oldest;
        let in_block = block_count(&bytes)?;
        let excess = count - keep;
        if in_block <= excess {
            blocks.remove((key, order)).map_err(unavailable)?;
            count -= in_block;
        } else {
            let (identity, mut entries) = decode_block(&bytes)?;
            entries.truncate((in_block - excess) as usize);
            blocks
                .insert((key, order), encode_block(&identity, &entries)?.as_slice())
                .map_err(unavailable)?;
            count -= excess;
        }
    }
    Ok(count)
}

#[async_trait]
impl AccessLogStore for EmbeddedAccessLog {
    async fn append(&self, batch: AccessBatch, retention: Retention) -> StoreResult<()> {
        let mut blocks_in = Vec::with_capacity(batch.keys.len());
        for (identity, entries) in &batch.keys {
            let Some(newest) = entries.first() else {
                continue;
            };
            let order = self.order(newest.at);
            let bytes = encode_block(identity, entries)?;
            blocks_in.push((
                identity.key_id.to_string(),
                order,
                entries.len() as u64,
                bytes,
            ));
        }
        let db = self.db.clone();
        blocking(move || {
            let txn = db.begin_write().map_err(unavailable)?;
            {
                let mut blocks = txn.open_table(BLOCKS).map_err(unavailable)?;
                let mut counts = txn.open_table(COUNTS).map_err(unavailable)?;
                let cutoff =
                    wall_clock_now().saturating_add_secs(-(retention.max_age.as_secs() as i64));
                let too_old = first_order_at_or_before(UnixMillis(cutoff.0 - 1));
                for (key, order, added, bytes) in &blocks_in {
                    let key = key.as_str();
                    blocks
                        .insert((key, *order), bytes.as_slice())
                        .map_err(unavailable)?;
                    let mut count = counts
                        .get(key)
                        .map_err(unavailable)?
                        .map_or(0, |v| v.value())
                        + added;
                    // Blocks that started before the age limit.
                    let expired: Vec<(u64, u64)> = blocks
                        .range((key, too_old)..=(key, u64::MAX))
                        .map_err(unavailable)?
                        .map(|row| {
                            let (k, v) = row.map_err(unavailable)?;
                            Ok((k.value().1, block_count(v.value())?))
                        })
                        .collect::<StoreResult<_>>()?;
                    for (old, in_block) in expired {
                        blocks.remove((key, old)).map_err(unavailable)?;
                        count = count.saturating_sub(in_block);
                    }
                    let count = trim_to(
                        &mut blocks,
                        key,
                        count,
                        retention.max_records_per_key as u64,
                    )?;
                    counts.insert(key, count).map_err(unavailable)?;
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
            // A token is "<block order>:<records of that block already returned>".
            let (start_block, mut skip) = match &query.page_token {
                Some(token) => token
                    .split_once(':')
                    .and_then(|(order, skip)| {
                        Some((order.parse::<u64>().ok()?, skip.parse::<usize>().ok()?))
                    })
                    .ok_or(StoreError::ForeignPageToken)?,
                None => (0, 0),
            };
            let txn = db.begin_read().map_err(unavailable)?;
            let blocks = txn.open_table(BLOCKS).map_err(unavailable)?;
            let key = query.key_id.as_str();
            let mut page = AccessPage::default();
            for row in blocks
                .range((key, start_block)..=(key, u64::MAX))
                .map_err(unavailable)?
            {
                let (k, v) = row.map_err(unavailable)?;
                let order = k.value().1;
                let (identity, entries) = decode_block(v.value())?;
                let skipped = if order == start_block {
                    std::mem::take(&mut skip)
                } else {
                    0
                };
                for (index, entry) in entries.into_iter().enumerate().skip(skipped) {
                    if query.since.is_some_and(|since| entry.at < since) {
                        return Ok(page);
                    }
                    if query.until.is_some_and(|until| entry.at > until)
                        || query.blocked_only && entry.allowed
                    {
                        continue;
                    }
                    if page.push(identity.clone(), entry, query.limit) {
                        page.next_page_token = Some(format!("{order}:{}", index + 1));
                        return Ok(page);
                    }
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
                        let json = serde_json::to_vec(last).map_err(corrupt)?;
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
                    Some(v) => serde_json::from_slice(v.value()).map(Some).map_err(corrupt),
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

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> StoreResult<T> + Send + 'static,
) -> StoreResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Unavailable(format!("access log task failed: {e}")))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access_log::{Frontend, MAX_PAGE_BYTES, MAX_PATH_BYTES};

    fn entry(at: i64, path_bytes: usize) -> Entry {
        Entry {
            at: UnixMillis(at),
            frontend: Frontend::Authorize,
            client_ip: Some("203.0.113.9".parse().unwrap()),
            allowed: false,
            would_deny: false,
            reason: None,
            endpoint: Some(("GET".into(), format!("/{}", "p".repeat(path_bytes)))),
            matched: None,
        }
    }

    fn identity() -> KeyIdentity {
        KeyIdentity {
            key_id: "key_big".parse().unwrap(),
            partner_id: "acme".parse().unwrap(),
            environment: "production".parse().unwrap(),
        }
    }

    fn query(page_token: Option<String>) -> AccessQuery {
        AccessQuery {
            key_id: "key_big".parse().unwrap(),
            limit: 1000,
            blocked_only: false,
            since: None,
            until: None,
            page_token,
        }
    }

    /// Records written before the edge bounded paths (4 MB each) must not make a page too large
    /// to send: `keyfence logs` failed with "encoded message length too large".
    #[tokio::test]
    async fn a_page_stays_small_whatever_was_stored() {
        let dir = tempfile::tempdir().unwrap();
        let log = EmbeddedAccessLog::open(dir.path()).unwrap();
        let now = wall_clock_now().0;
        let huge: Vec<Entry> = (0..3).map(|i| entry(now - i, 4 << 20)).collect();
        let many: Vec<Entry> = (0..300).map(|i| entry(now - 10 - i, 8 << 10)).collect();
        for entries in [huge, many] {
            let batch = AccessBatch {
                keys: vec![(identity(), entries)],
            };
            log.append(batch, Retention::default()).await.unwrap();
        }
        let mut pages = 0;
        let mut seen = 0;
        let mut token = None;
        loop {
            let page = log.list(&query(token)).await.unwrap();
            let bytes: usize = page.records.iter().map(|r| r.entry.listed_size()).sum();
            assert!(!page.records.is_empty());
            assert!(bytes <= MAX_PAGE_BYTES + MAX_PATH_BYTES + 256, "{bytes}");
            for record in &page.records {
                let (_, path) = record.entry.endpoint.as_ref().unwrap();
                assert!(path.len() <= MAX_PATH_BYTES, "{}", path.len());
            }
            seen += page.records.len();
            pages += 1;
            token = page.next_page_token;
            if token.is_none() {
                break;
            }
        }
        assert_eq!(seen, 303, "paging by size loses no record");
        assert!(pages >= 3, "{pages} pages");
    }
}
