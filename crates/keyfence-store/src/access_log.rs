//! Where access records and last-used times are kept: the record types and the
//! [`AccessLogStore`] trait, with the embedded (`access.redb`) and Redis (a stream per key)
//! implementations. Which records are made, and when, is the binary's `access` module; this one
//! only keeps them. Invariant: no tonic, no protobuf, and nothing on the decision path awaits it.

pub mod embedded;
pub mod redis;

use std::{net::IpAddr, time::Duration};

use async_trait::async_trait;
use keyfence_policy::{
    decision::DenyReason,
    ip::Cidr,
    model::{Environment, KeyId, PartnerId, UnixMillis},
    snapshot::CompiledKey,
};
use serde::{Deserialize, Serialize};

use crate::StoreResult;

/// The most bytes of an HTTP method one access record holds. The edge refuses longer input
/// (`src/grpc/decision_io.rs` takes its bounds from here), so only records written before it did
/// are ever cut, on read.
pub const MAX_METHOD_BYTES: usize = 32;
/// The most bytes of a path and query one access record holds: the common limit of HTTP servers
/// and proxies.
pub const MAX_PATH_BYTES: usize = 8 * 1024;
/// About how many bytes of records one page of a key's log holds, whatever `limit` asks for, so
/// that a page always fits in one gRPC message (4 MiB by default). A page holds at least one
/// record, and one record is bounded by the two limits above.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;

/// Which front end asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frontend {
    Authorize,
    EnvoyCheck,
}

impl Frontend {
    pub fn as_str(self) -> &'static str {
        match self {
            Frontend::Authorize => "authorize",
            Frontend::EnvoyCheck => "envoy_check",
        }
    }
}

/// Whose records these are; stored once per key per batch, not per record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyIdentity {
    pub key_id: KeyId,
    pub partner_id: PartnerId,
    pub environment: Environment,
}

impl KeyIdentity {
    pub fn of(key: &CompiledKey) -> KeyIdentity {
        KeyIdentity {
            key_id: key.id.clone(),
            partner_id: key.partner_id.clone(),
            environment: key.environment.clone(),
        }
    }
}

/// One decision as stored: fixed-size fields but the endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub at: UnixMillis,
    pub frontend: Frontend,
    /// `None` when the caller's address could not be parsed.
    pub client_ip: Option<IpAddr>,
    pub allowed: bool,
    pub would_deny: bool,
    pub reason: Option<DenyReason>,
    pub endpoint: Option<(String, String)>,
    /// The matched network as (address, prefix length).
    pub matched: Option<(IpAddr, u8)>,
}

impl Entry {
    /// The entry with method and path cut to [`MAX_METHOD_BYTES`] and [`MAX_PATH_BYTES`]: what a
    /// read hands out, so that a record stored before the edge bounded them cannot make a page too
    /// large to send.
    pub fn bounded(mut self) -> Entry {
        if let Some((method, path)) = &mut self.endpoint {
            truncate_at_char(method, MAX_METHOD_BYTES);
            truncate_at_char(path, MAX_PATH_BYTES);
        }
        self
    }

    /// Roughly the bytes this entry takes in a listing: the fixed fields and the endpoint.
    pub fn listed_size(&self) -> usize {
        const FIXED: usize = 128;
        FIXED
            + self
                .endpoint
                .as_ref()
                .map_or(0, |(method, path)| method.len() + path.len())
    }

    pub fn matched_cidr(&self) -> Option<Cidr> {
        self.matched
            .and_then(|(addr, len)| Cidr::from_parts(addr, len))
    }
}

fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

/// One access-log line as listed: a key's identity and one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    pub key: KeyIdentity,
    pub entry: Entry,
}

/// Records to append: per key, its entries newest first.
#[derive(Debug, Default)]
pub struct AccessBatch {
    pub keys: Vec<(KeyIdentity, Vec<Entry>)>,
}

impl AccessBatch {
    pub fn len(&self) -> usize {
        self.keys.iter().map(|(_, entries)| entries.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.iter().all(|(_, entries)| entries.is_empty())
    }
}

/// When and from where a key was last allowed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastUse {
    pub at: UnixMillis,
    pub client_ip: String,
}

/// How much access log is kept per key.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub max_records_per_key: usize,
    pub max_age: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_records_per_key: 10_000,
            max_age: Duration::from_secs(30 * 24 * 3600),
        }
    }
}

/// A page request: newest first.
#[derive(Debug, Clone)]
pub struct AccessQuery {
    pub key_id: KeyId,
    pub limit: usize,
    pub blocked_only: bool,
    pub since: Option<UnixMillis>,
    pub until: Option<UnixMillis>,
    /// From a previous page: continue after this position.
    pub page_token: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct AccessPage {
    pub records: Vec<AccessRecord>,
    pub next_page_token: Option<String>,
    /// What the records take, against [`MAX_PAGE_BYTES`].
    bytes: usize,
}

impl AccessPage {
    /// Adds a record (bounded) and answers whether the page is full: `limit` records, or
    /// [`MAX_PAGE_BYTES`] of them.
    pub fn push(&mut self, key: KeyIdentity, entry: Entry, limit: usize) -> bool {
        let entry = entry.bounded();
        self.bytes += entry.listed_size();
        self.records.push(AccessRecord { key, entry });
        self.records.len() >= limit || self.bytes >= MAX_PAGE_BYTES
    }
}

/// Where access records and last-used times are kept.
#[async_trait]
pub trait AccessLogStore: Send + Sync + 'static {
    async fn append(&self, batch: AccessBatch, retention: Retention) -> StoreResult<()>;
    async fn list(&self, query: &AccessQuery) -> StoreResult<AccessPage>;
    async fn record_last_used(&self, uses: Vec<(KeyId, LastUse)>) -> StoreResult<()>;
    async fn last_used(&self, ids: &[KeyId]) -> StoreResult<Vec<Option<LastUse>>>;
}
