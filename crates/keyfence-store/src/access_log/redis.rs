//! Access logs in Redis: one stream per key (`{ns}:access:<key id>`) that every replica appends
//! to and any replica reads, trimmed by count (`MAXLEN ~`) and age (`MINID ~`); last-used times in
//! one hash (`{ns}:last-used`). Streams are ordered by arrival at Redis, which is the decision
//! order up to the replicas' clock skew.

use async_trait::async_trait;

use super::{
    AccessBatch, AccessLogStore, AccessPage, AccessQuery, AccessRecord, LastUse, Retention,
};
use keyfence_policy::model::KeyId;

use crate::{
    StoreError, StoreResult,
    redis::{RedisStore, unavailable},
    wall_clock_now,
};

/// Stream ids carry Redis's clock, records the deciding replica's: time ranges are looked up
/// with this much slack around them, then filtered on the record's own time.
const SKEW_MS: i64 = 60_000;

fn stream(store: &RedisStore, key: &KeyId) -> String {
    format!("{}:access:{key}", store.namespace())
}

fn last_used_hash(store: &RedisStore) -> String {
    format!("{}:last-used", store.namespace())
}

/// A stream id `ms-seq` parsed enough to validate a page token.
fn valid_stream_id(text: &str) -> bool {
    let mut parts = text.split('-');
    let ok =
        |p: Option<&str>| p.is_some_and(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    ok(parts.next()) && ok(parts.next()) && parts.next().is_none()
}

#[async_trait]
impl AccessLogStore for RedisStore {
    async fn append(&self, batch: AccessBatch, retention: Retention) -> StoreResult<()> {
        let mut conn = self.conn().await?;
        let cutoff = wall_clock_now().saturating_add_secs(-(retention.max_age.as_secs() as i64));
        let mut pipe = redis::pipe();
        let mut touched = std::collections::BTreeSet::new();
        for (identity, entries) in batch.keys {
            let name = stream(self, &identity.key_id);
            // Oldest first: a stream is ordered by arrival.
            for entry in entries.into_iter().rev() {
                let record = AccessRecord {
                    key: identity.clone(),
                    entry,
                };
                let json =
                    serde_json::to_vec(&record).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                pipe.cmd("XADD")
                    .arg(&name)
                    .arg("MAXLEN")
                    .arg("~")
                    .arg(retention.max_records_per_key)
                    .arg("*")
                    .arg("r")
                    .arg(json)
                    .ignore();
            }
            touched.insert(name);
        }
        for name in touched {
            pipe.cmd("XTRIM")
                .arg(name)
                .arg("MINID")
                .arg("~")
                .arg(cutoff.0.max(0))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn list(&self, query: &AccessQuery) -> StoreResult<AccessPage> {
        let mut conn = self.conn().await?;
        let name = stream(self, &query.key_id);
        let mut end = match (&query.page_token, query.until) {
            (Some(token), _) if valid_stream_id(token) => format!("({token}"),
            (Some(_), _) => return Err(StoreError::ForeignPageToken),
            (None, Some(until)) => (until.0 + SKEW_MS).max(0).to_string(),
            (None, None) => "+".into(),
        };
        let start = query
            .since
            .map(|s| s.0.max(0).to_string())
            .unwrap_or_else(|| "-".into());
        let mut page = AccessPage::default();
        let chunk = query.limit.clamp(1, 1000);
        loop {
            let rows: Vec<(String, Vec<Vec<u8>>)> = redis::cmd("XREVRANGE")
                .arg(&name)
                .arg(&end)
                .arg(&start)
                .arg("COUNT")
                .arg(chunk)
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
            let exhausted = rows.len() < chunk;
            for (id, fields) in &rows {
                let json = fields
                    .chunks(2)
                    .find(|pair| pair.first().is_some_and(|f| f.as_slice() == b"r"))
                    .and_then(|pair| pair.get(1))
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("access record {id} has no body"))
                    })?;
                let record: AccessRecord =
                    serde_json::from_slice(json).map_err(|e| StoreError::Corrupt(e.to_string()))?;
                end = format!("({id}");
                if query.blocked_only && record.entry.allowed
                    || query.until.is_some_and(|until| record.entry.at > until)
                    || query.since.is_some_and(|since| record.entry.at < since)
                {
                    continue;
                }
                if page.push(record.key, record.entry, query.limit) {
                    page.next_page_token = Some(id.clone());
                    return Ok(page);
                }
            }
            if exhausted {
                return Ok(page);
            }
        }
    }

    async fn record_last_used(&self, uses: Vec<(KeyId, LastUse)>) -> StoreResult<()> {
        if uses.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn().await?;
        let mut cmd = redis::cmd("HSET");
        cmd.arg(last_used_hash(self));
        for (id, last) in &uses {
            let json = serde_json::to_vec(last).map_err(|e| StoreError::Corrupt(e.to_string()))?;
            cmd.arg(id.as_str()).arg(json);
        }
        cmd.query_async::<()>(&mut conn).await.map_err(unavailable)
    }

    async fn last_used(&self, ids: &[KeyId]) -> StoreResult<Vec<Option<LastUse>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn().await?;
        let values: Vec<Option<Vec<u8>>> = redis::cmd("HMGET")
            .arg(last_used_hash(self))
            .arg(ids.iter().map(|id| id.as_str()).collect::<Vec<_>>())
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        values
            .into_iter()
            .map(|v| {
                v.map(|bytes| {
                    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
                })
                .transpose()
            })
            .collect()
    }
}
