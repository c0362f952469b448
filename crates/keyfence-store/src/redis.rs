//! The Redis store: one source of truth for many replicas.
//!
//! Layout under a namespace prefix `{ns}`: `{ns}:revision` (counter), `{ns}:changes` (sorted set
//! of `"<revision> <scope JSON>"` scored by revision, the last N), `{ns}:key:<id>` (JSON record),
//! `{ns}:keys` (sorted set of ids, for paging), `{ns}:list:<scope>` (JSON entries),
//! `{ns}:partner-scopes` (set of partner list names), `{ns}:sealing` (the sealing marker) and
//! `{ns}:nonce:<fingerprint>`. With a keyring (`--secrets-key-file`) records and lists are
//! sealed by [`Codec`] (see [`crate::sealing`]): no Redis value holds a signing secret in clear,
//! and a value edited in Redis is refused. Without one, values are JSON in clear and an HMAC key
//! cannot be stored. The first load seals what a version before sealing left in clear.
//!
//! Every mutation is read, edit, then one Lua script that checks nothing it read has changed
//! (compare-and-set), writes, increments the revision, appends to the change log and publishes
//! `"<revision> <scope>"` on `{ns}:changes`, all atomically. A conflict re-reads and re-applies the
//! edit, so two admins adding to one allowlist at once both land. Notifications are hints: the
//! subscriber task forwards them and, after every (re)subscription, asks the follower to check the
//! change log, since pub/sub may have dropped messages in between.

use std::{
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use redis::{
    AsyncCommands, Client, Script,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use sha2::{Digest, Sha256};
use tokio::sync::{OnceCell, watch};
use tokio_stream::StreamExt;

use super::{
    AllowlistEdit, Change, ChangesSince, Committed, FullState, KeyEdit, KeyFilter, KeyPage,
    NonceStore, Refusal, ResealReport, Store, StoreError, StoreResult, report_reseal,
    sealing::{Codec, Location, MarkerState, Resealed, Sealer},
};
use keyfence_policy::{
    model::{AllowlistEntry, KeyId, KeyRecord, PartnerScope, Scope},
    snapshot::KeyMaterial,
};

/// How many revisions the change log keeps; a follower further behind reloads everything.
pub const CHANGE_LOG_LEN: u64 = 10_000;
/// How often a conflicting writer re-reads and retries before giving up.
const MAX_ATTEMPTS: usize = 64;
/// Redis calls fail after this, so admin writes fail fast while Redis is down.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
const BATCH: usize = 1000;

const COMMIT: &str = r#"
-- KEYS[1] revision, KEYS[2] change log, KEYS[3..] guarded keys
-- ARGV[1] channel, ARGV[2] scope JSON, ARGV[3] change log length, then per guarded key:
-- expect (any|absent|equal), expected value, op (keep|set|del|zadd|sadd|srem), value
local n = #KEYS - 2
for i = 1, n do
  local base = 3 + (i - 1) * 4
  local expect = ARGV[base + 1]
  if expect ~= 'any' then
    local current = redis.call('GET', KEYS[2 + i])
    if expect == 'absent' then
      if current then return -1 end
    elseif current ~= ARGV[base + 2] then
      return -1
    end
  end
end
for i = 1, n do
  local base = 3 + (i - 1) * 4
  local op = ARGV[base + 3]
  local key = KEYS[2 + i]
  local value = ARGV[base + 4]
  if op == 'set' then redis.call('SET', key, value)
  elseif op == 'del' then redis.call('DEL', key)
  elseif op == 'zadd' then redis.call('ZADD', key, 0, value)
  elseif op == 'sadd' then redis.call('SADD', key, value)
  elseif op == 'srem' then redis.call('SREM', key, value)
  end
end
local revision = redis.call('INCR', KEYS[1])
local change = revision .. ' ' .. ARGV[2]
redis.call('ZADD', KEYS[2], revision, change)
local keep = tonumber(ARGV[3])
if revision > keep then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', revision - keep)
end
redis.call('PUBLISH', ARGV[1], change)
return revision
"#;

/// Replaces one value only if it still holds what was read: a re-seal never overwrites an edit.
const RESEAL: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
"#;

/// Settings for [`RedisStore::connect`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    pub url: String,
    /// Key prefix, so that several deployments can share one Redis.
    pub namespace: String,
    pub change_log_len: u64,
    /// The keyring every replica shares; `None` stores records in clear and refuses HMAC keys.
    pub sealer: Option<Arc<Sealer>>,
}

pub struct RedisStore {
    client: Client,
    /// Created on first use, so a replica can start while Redis is down; it reconnects by itself.
    connection: OnceCell<ConnectionManager>,
    names: Names,
    commit: Script,
    reseal: Script,
    codec: Codec,
    /// Set once the first load has sealed what was in clear (see [`RedisStore::prepare_sealing`]).
    sealing_ready: OnceCell<()>,
    change_log_len: u64,
    hints: watch::Sender<u64>,
    subscriber: tokio::task::JoinHandle<()>,
    /// Nonce claims carry `<instance>:<counter>` as their value, so that withdrawing one of this
    /// process's claims can never delete another replica's (or another request's).
    instance: u64,
    claims: AtomicU64,
    /// Withdrawals running now; bounded so that a long outage cannot pile up tasks.
    withdrawals: Arc<AtomicUsize>,
}

/// Key names under the namespace.
#[derive(Clone)]
struct Names {
    ns: String,
}

impl Names {
    fn revision(&self) -> String {
        format!("{}:revision", self.ns)
    }
    fn changes(&self) -> String {
        format!("{}:changes", self.ns)
    }
    fn channel(&self) -> String {
        format!("{}:changes", self.ns)
    }
    fn keys(&self) -> String {
        format!("{}:keys", self.ns)
    }
    fn key(&self, id: &KeyId) -> String {
        format!("{}:key:{id}", self.ns)
    }
    fn partner_scopes(&self) -> String {
        format!("{}:partner-scopes", self.ns)
    }
    fn sealing(&self) -> String {
        format!("{}:sealing", self.ns)
    }
    fn list(&self, scope: &Scope) -> String {
        format!("{}:list:{}", self.ns, scope_name(scope))
    }
    fn nonce(&self, key: &KeyId, nonce: &str) -> String {
        let mut hasher = Sha256::new();
        hasher.update(key.as_str().as_bytes());
        hasher.update([0u8]);
        hasher.update(nonce.as_bytes());
        format!(
            "{}:nonce:{}",
            self.ns,
            hex::encode(&hasher.finalize()[..16])
        )
    }
}

fn scope_name(scope: &Scope) -> String {
    match scope {
        Scope::Key(id) => format!("key/{id}"),
        Scope::Partner(p) => format!("partner/{}/{}", p.partner_id, p.environment),
    }
}

fn parse_partner_scope(name: &str) -> StoreResult<PartnerScope> {
    let corrupt = || StoreError::Corrupt(format!("bad partner scope {name:?}"));
    let rest = name.strip_prefix("partner/").ok_or_else(corrupt)?;
    let (partner, environment) = rest.split_once('/').ok_or_else(corrupt)?;
    Ok(PartnerScope {
        partner_id: partner.parse().map_err(|_| corrupt())?,
        environment: environment.parse().map_err(|_| corrupt())?,
    })
}

/// One guarded key of a commit: what it must hold now, and what to do with it.
struct Guarded {
    key: String,
    expect: Expect,
    op: Op,
}

enum Expect {
    Any,
    Absent,
    Equal(Vec<u8>),
}

enum Op {
    Keep,
    Set(Vec<u8>),
    Del,
    ZAdd(String),
    SAdd(String),
    SRem(String),
}

/// A value read together with its raw form, for compare-and-set.
fn expect_of(raw: &Option<Vec<u8>>) -> Expect {
    match raw {
        Some(bytes) => Expect::Equal(bytes.clone()),
        None => Expect::Absent,
    }
}

impl RedisStore {
    /// Prepares the store and starts following `{ns}:changes`. Does not need Redis to be up.
    pub fn connect(options: RedisOptions) -> StoreResult<Arc<RedisStore>> {
        let client = Client::open(options.url.as_str())
            .map_err(|e| StoreError::Unavailable(format!("invalid redis url: {e}")))?;
        let names = Names {
            ns: options.namespace,
        };
        let hints = watch::Sender::new(0);
        let subscriber = tokio::spawn(follow_notifications(
            client.clone(),
            names.channel(),
            hints.clone(),
        ));
        Ok(Arc::new(RedisStore {
            client,
            connection: OnceCell::new(),
            names,
            commit: Script::new(COMMIT),
            reseal: Script::new(RESEAL),
            codec: Codec::new(options.sealer),
            sealing_ready: OnceCell::new(),
            change_log_len: options.change_log_len.max(1),
            hints,
            subscriber,
            // Seeded by the OS generator (the store crate takes no `rand`): unique enough to tell
            // processes apart.
            instance: RandomState::new().hash_one(std::process::id()),
            claims: AtomicU64::new(0),
            withdrawals: Arc::new(AtomicUsize::new(0)),
        }))
    }

    /// A connection, made on first use; shared with the access log.
    pub(crate) async fn conn(&self) -> StoreResult<ConnectionManager> {
        // Lock-free once made (the nonce check calls this on the decision path); a failed first
        // attempt leaves the cell empty for the next caller to retry.
        self.connection
            .get_or_try_init(|| async {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(CALL_TIMEOUT))
                    .set_response_timeout(Some(CALL_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2));
                ConnectionManager::new_with_config(self.client.clone(), config)
                    .await
                    .map_err(unavailable)
            })
            .await
            .cloned()
    }

    /// The key prefix of this deployment.
    pub(crate) fn namespace(&self) -> &str {
        &self.names.ns
    }

    /// Runs the commit script; `None` when a guarded key changed since it was read.
    async fn commit(&self, scope: &Scope, guarded: Vec<Guarded>) -> StoreResult<Option<u64>> {
        let mut conn = self.conn().await?;
        let scope_json = serde_json::to_string(scope).map_err(corrupt)?;
        let mut invocation = self.commit.prepare_invoke();
        invocation
            .key(self.names.revision())
            .key(self.names.changes())
            .arg(self.names.channel())
            .arg(scope_json)
            .arg(self.change_log_len);
        for g in &guarded {
            invocation.key(&g.key);
            match &g.expect {
                Expect::Any => invocation.arg("any").arg(""),
                Expect::Absent => invocation.arg("absent").arg(""),
                Expect::Equal(value) => invocation.arg("equal").arg(value.as_slice()),
            };
            match &g.op {
                Op::Keep => invocation.arg("keep").arg(""),
                Op::Set(value) => invocation.arg("set").arg(value.as_slice()),
                Op::Del => invocation.arg("del").arg(""),
                Op::ZAdd(member) => invocation.arg("zadd").arg(member),
                Op::SAdd(member) => invocation.arg("sadd").arg(member),
                Op::SRem(member) => invocation.arg("srem").arg(member),
            };
        }
        let revision: i64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if revision < 0 {
            return Ok(None);
        }
        let revision = revision as u64;
        self.hints.send_if_modified(|latest| {
            let newer = revision > *latest;
            *latest = (*latest).max(revision);
            newer
        });
        Ok(Some(revision))
    }

    /// Ops that keep the list of partner scopes in step with a partner list's emptiness.
    fn list_ops(
        &self,
        scope: &Scope,
        raw_before: &Option<Vec<u8>>,
        entries: &[AllowlistEntry],
    ) -> StoreResult<Vec<Guarded>> {
        let list_key = self.names.list(scope);
        let mut guarded = vec![Guarded {
            key: list_key,
            expect: expect_of(raw_before),
            op: if entries.is_empty() {
                Op::Del
            } else {
                Op::Set(self.codec.encode_list(scope, entries)?)
            },
        }];
        if let Scope::Partner(_) = scope {
            let name = scope_name(scope);
            guarded.push(Guarded {
                key: self.names.partner_scopes(),
                expect: Expect::Any,
                op: if entries.is_empty() {
                    Op::SRem(name)
                } else {
                    Op::SAdd(name)
                },
            });
        }
        Ok(guarded)
    }
}

impl RedisStore {
    /// Every stored record and list with its Redis key name, and the marker's raw value, read in
    /// that order (see [`RedisStore::prepare_sealing`]).
    async fn all_values(&self) -> StoreResult<Vec<(String, Location, Vec<u8>)>> {
        let mut conn = self.conn().await?;
        let ids: Vec<String> = conn
            .zrange(self.names.keys(), 0, -1)
            .await
            .map_err(unavailable)?;
        let scopes: Vec<String> = conn
            .smembers(self.names.partner_scopes())
            .await
            .map_err(unavailable)?;
        let mut locations = Vec::with_capacity(ids.len() * 2 + scopes.len());
        for id in ids {
            let id: KeyId = id
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("bad key id {id:?}")))?;
            locations.push((self.names.key(&id), Location::Key(id.clone())));
            let scope = Scope::Key(id);
            locations.push((self.names.list(&scope), Location::List(scope)));
        }
        for name in scopes {
            let scope = Scope::Partner(parse_partner_scope(&name)?);
            locations.push((self.names.list(&scope), Location::List(scope)));
        }
        let mut out = Vec::with_capacity(locations.len());
        for chunk in locations.chunks(BATCH) {
            let names: Vec<String> = chunk.iter().map(|(name, _)| name.clone()).collect();
            for ((name, location), value) in chunk.iter().zip(mget(&mut conn, &names).await?) {
                if let Some(value) = value {
                    out.push((name.clone(), location.clone(), value));
                }
            }
        }
        Ok(out)
    }

    /// Re-seals `values` one by one, compare-and-set, and reports what it found.
    async fn reseal_values(
        &self,
        values: Vec<(String, Location, Vec<u8>)>,
        migrating: bool,
    ) -> StoreResult<ResealReport> {
        let mut report = ResealReport::default();
        let Some(sealer) = self.codec.sealer() else {
            return Ok(report);
        };
        let primary = sealer.primary_id();
        let mut conn = self.conn().await?;
        for (name, location, value) in values {
            match self.codec.reseal(&location, &value, migrating) {
                Ok(Resealed::Current) => {
                    *report.sealed_under.entry(primary.clone()).or_default() += 1;
                }
                Ok(Resealed::Replaced(bytes)) => {
                    let swapped: i64 = self
                        .reseal
                        .key(&name)
                        .arg(value.as_slice())
                        .arg(bytes.as_slice())
                        .invoke_async(&mut conn)
                        .await
                        .map_err(unavailable)?;
                    if swapped == 1 {
                        report.resealed += 1;
                        *report.sealed_under.entry(primary.clone()).or_default() += 1;
                    } else if let Some(kid) = Codec::sealed_under(&value) {
                        // Written meanwhile by an edit, which sealed under its replica's primary.
                        *report.sealed_under.entry(kid.to_owned()).or_default() += 1;
                    }
                }
                Err(error @ StoreError::Refused { .. }) => {
                    if let Some(kid) = Codec::sealed_under(&value) {
                        *report.sealed_under.entry(kid.to_owned()).or_default() += 1;
                    }
                    report.refused.push(error.to_string());
                }
                Err(error) => return Err(error),
            }
        }
        report.sealed_under.retain(|_, n| *n > 0);
        Ok(report)
    }

    /// Once, before the first load: with a keyring, seals what a version before sealing left in
    /// clear (only on a store with no marker and no sealed value, or whose migration was
    /// interrupted; a marker removed beside sealed values keeps values in clear refused). Without
    /// one, refuses a store that needs one.
    async fn prepare_sealing(&self) -> StoreResult<()> {
        // Values first, then the marker: a replica migrating meanwhile wrote its marker before
        // sealing anything, so sealed values without a marker always mean it was removed.
        let values = self.all_values().await?;
        let mut conn = self.conn().await?;
        let marker: Option<Vec<u8>> = conn.get(self.names.sealing()).await.map_err(unavailable)?;
        if self.codec.sealer().is_none() {
            if marker.is_some() || values.iter().any(|(_, _, v)| Codec::is_sealed(v)) {
                return Err(StoreError::FailedPrecondition(
                    "the Redis store's records are sealed: start keyfence with --secrets-key-file,                      the key file its other replicas use"
                        .into(),
                ));
            }
            for (_, location, value) in &values {
                if let Location::Key(id) = location
                    && let Ok(record) = self.codec.decode_key(id, value)
                    && matches!(
                        record.signature,
                        keyfence_policy::model::SignatureScheme::HmacSha256 { .. }
                    )
                {
                    return Err(StoreError::FailedPrecondition(format!(
                        "the Redis store holds HMAC key {id}, and HMAC signing secrets are                          encrypted at rest: start every replica with --secrets-key-file (one                          shared key file, made with `keyfence secrets add-key`)"
                    )));
                }
            }
            tracing::warn!(
                "no --secrets-key-file: Redis records are stored in clear and not authenticated"
            );
            return Ok(());
        }
        let migrating = match &marker {
            Some(bytes) => match self.codec.decode_marker(bytes) {
                Ok(state) => state == MarkerState::Migrating,
                Err(error) => {
                    tracing::error!(%error, "the store's sealing marker is refused; values in clear stay refused");
                    false
                }
            },
            None if values.iter().any(|(_, _, v)| Codec::is_sealed(v)) => {
                tracing::error!(
                    "the store's sealing marker is missing although its records are sealed: it \
                     was removed outside keyfence; values in clear stay refused"
                );
                false
            }
            None => {
                let migrating = self
                    .codec
                    .encode_marker(MarkerState::Migrating)?
                    .expect("a keyring is configured");
                let _: () = conn
                    .set(self.names.sealing(), migrating)
                    .await
                    .map_err(unavailable)?;
                true
            }
        };
        let report = self.reseal_values(values, migrating).await?;
        report_reseal(&report, migrating);
        if migrating || marker.is_none() {
            let sealed = self
                .codec
                .encode_marker(MarkerState::Sealed)?
                .expect("a keyring is configured");
            let _: () = conn
                .set(self.names.sealing(), sealed)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn ensure_sealing_ready(&self) -> StoreResult<()> {
        self.sealing_ready
            .get_or_try_init(|| self.prepare_sealing())
            .await
            .map(|_| ())
    }
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// Subscribes to the change channel, forwarding revisions as hints; after every (re)subscription
/// it nudges the follower to check the change log for whatever was missed meanwhile.
async fn follow_notifications(client: Client, channel: String, hints: watch::Sender<u64>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let mut pubsub = tokio::time::timeout(CALL_TIMEOUT, client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            pubsub
                .subscribe(&channel)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(pubsub)
        }
        .await;
        match subscribed {
            Ok(pubsub) => {
                backoff = Duration::from_millis(100);
                tracing::info!(%channel, "subscribed to policy changes");
                hints.send_modify(|_| {});
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let payload = message.get_payload_bytes();
                    let revision = std::str::from_utf8(payload)
                        .ok()
                        .and_then(|text| text.split_once(' '))
                        .and_then(|(revision, _)| revision.parse::<u64>().ok());
                    match revision {
                        Some(revision) => {
                            hints.send_modify(|latest| *latest = (*latest).max(revision));
                        }
                        None => tracing::warn!(%channel, "unreadable change notification"),
                    }
                }
                tracing::warn!(%channel, "policy change subscription lost; resubscribing");
            }
            Err(error) => {
                tracing::warn!(%channel, %error, retry_in_ms = backoff.as_millis() as u64, "cannot subscribe to policy changes");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn load_all(&self) -> StoreResult<FullState> {
        self.ensure_sealing_ready().await?;
        let mut conn = self.conn().await?;
        // Read the revision first: everything read after it includes at least its changes, and
        // anything newer is in the change log after it, which the follower applies next.
        let revision: Option<u64> = conn.get(self.names.revision()).await.map_err(unavailable)?;
        let ids: Vec<String> = conn
            .zrange(self.names.keys(), 0, -1)
            .await
            .map_err(unavailable)?;
        let mut keys = Vec::with_capacity(ids.len());
        let mut refused = Vec::new();
        for chunk in ids.chunks(BATCH) {
            let ids: Vec<KeyId> = chunk
                .iter()
                .map(|id| {
                    id.parse()
                        .map_err(|_| StoreError::Corrupt(format!("bad key id {id:?}")))
                })
                .collect::<StoreResult<_>>()?;
            let mut names: Vec<String> = ids.iter().map(|id| self.names.key(id)).collect();
            names.extend(
                ids.iter()
                    .map(|id| self.names.list(&Scope::Key(id.clone()))),
            );
            let values: Vec<Option<Vec<u8>>> = mget(&mut conn, &names).await?;
            let (records, lists) = values.split_at(ids.len());
            for ((id, record), list) in ids.iter().zip(records).zip(lists) {
                // A key deleted between the index read and this one is simply skipped.
                let Some(record) = record else { continue };
                let scope = Scope::Key(id.clone());
                let material = self.codec.decode_key(id, record).and_then(|record| {
                    Ok(KeyMaterial {
                        record,
                        entries: self.decode_list(&scope, list)?,
                    })
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
        }
        let scope_names: Vec<String> = conn
            .smembers(self.names.partner_scopes())
            .await
            .map_err(unavailable)?;
        let mut partner_lists = Vec::with_capacity(scope_names.len());
        for chunk in scope_names.chunks(BATCH) {
            let scopes: Vec<PartnerScope> = chunk
                .iter()
                .map(|n| parse_partner_scope(n))
                .collect::<StoreResult<_>>()?;
            let names: Vec<String> = scopes
                .iter()
                .map(|s| self.names.list(&Scope::Partner(s.clone())))
                .collect();
            let values = mget(&mut conn, &names).await?;
            for (partner, value) in scopes.into_iter().zip(values) {
                let scope = Scope::Partner(partner.clone());
                match self.decode_list(&scope, &value) {
                    Ok(entries) if entries.is_empty() => {}
                    Ok(entries) => partner_lists.push((partner, entries)),
                    Err(error @ StoreError::Refused { .. }) => refused.push(Refusal {
                        scope,
                        message: error.to_string(),
                    }),
                    Err(error) => return Err(error),
                }
            }
        }
        Ok(FullState {
            revision: revision.unwrap_or(0),
            keys,
            partner_lists,
            refused,
        })
    }

    async fn changes_since(&self, after: u64) -> StoreResult<ChangesSince> {
        let mut conn = self.conn().await?;
        let (revision, oldest, members): (Option<u64>, Vec<(String, f64)>, Vec<String>) =
            redis::pipe()
                .atomic()
                .get(self.names.revision())
                .zrange_withscores(self.names.changes(), 0, 0)
                .zrangebyscore(self.names.changes(), format!("({after}"), "+inf")
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        let revision = revision.unwrap_or(0);
        if after == revision {
            return Ok(ChangesSince::Changes(Vec::new()));
        }
        if after > revision {
            return Ok(ChangesSince::Gap);
        }
        let oldest = oldest.first().map(|(_, score)| *score as u64);
        if oldest.is_none_or(|oldest| oldest > after + 1) {
            return Ok(ChangesSince::Gap);
        }
        let changes = members
            .iter()
            .map(|member| {
                let (revision, scope) = member
                    .split_once(' ')
                    .ok_or_else(|| StoreError::Corrupt(format!("bad change {member:?}")))?;
                Ok(Change {
                    revision: revision.parse().map_err(corrupt)?,
                    scope: serde_json::from_str(scope).map_err(corrupt)?,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(ChangesSince::Changes(changes))
    }

    async fn load_key(&self, id: &KeyId) -> StoreResult<Option<KeyMaterial>> {
        let mut conn = self.conn().await?;
        let names = [self.names.key(id), self.names.list(&Scope::Key(id.clone()))];
        let values = mget(&mut conn, &names).await?;
        let Some(record) = &values[0] else {
            return Ok(None);
        };
        Ok(Some(KeyMaterial {
            record: self.codec.decode_key(id, record)?,
            entries: self.decode_list(&Scope::Key(id.clone()), &values[1])?,
        }))
    }

    async fn load_partner_entries(&self, scope: &PartnerScope) -> StoreResult<Vec<AllowlistEntry>> {
        let mut conn = self.conn().await?;
        let scope = Scope::Partner(scope.clone());
        let value: Option<Vec<u8>> = conn
            .get(self.names.list(&scope))
            .await
            .map_err(unavailable)?;
        self.decode_list(&scope, &value)
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.hints.subscribe()
    }

    async fn insert_key(
        &self,
        record: KeyRecord,
        entries: Vec<AllowlistEntry>,
    ) -> StoreResult<Committed<KeyRecord>> {
        let scope = Scope::Key(record.id.clone());
        let mut guarded = vec![
            Guarded {
                key: self.names.key(&record.id),
                expect: Expect::Absent,
                op: Op::Set(self.codec.encode_key(&record)?),
            },
            Guarded {
                key: self.names.keys(),
                expect: Expect::Any,
                op: Op::ZAdd(record.id.to_string()),
            },
        ];
        guarded.extend(self.list_ops(&scope, &None, &entries)?);
        // A leftover list of a key that never existed is overwritten, not guarded.
        for g in &mut guarded[2..] {
            g.expect = Expect::Any;
        }
        match self.commit(&scope, guarded).await? {
            Some(revision) => Ok(Committed {
                value: record,
                revision,
            }),
            None => Err(StoreError::AlreadyExists(format!("key {}", record.id))),
        }
    }

    async fn get_key(&self, id: &KeyId) -> StoreResult<KeyRecord> {
        let mut conn = self.conn().await?;
        let value: Option<Vec<u8>> = conn.get(self.names.key(id)).await.map_err(unavailable)?;
        match value {
            Some(bytes) => self.codec.decode_key(id, &bytes),
            None => Err(StoreError::NotFound(format!("key {id}"))),
        }
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        after: Option<&KeyId>,
        limit: usize,
    ) -> StoreResult<KeyPage> {
        let mut conn = self.conn().await?;
        let mut cursor = after
            .map(|id| format!("({id}"))
            .unwrap_or_else(|| "-".into());
        let mut page = Vec::new();
        loop {
            let ids: Vec<String> = conn
                .zrangebylex_limit(self.names.keys(), &cursor, "+", 0, BATCH as isize)
                .await
                .map_err(unavailable)?;
            let Some(last) = ids.last() else {
                return Ok(KeyPage {
                    keys: page,
                    next_after: None,
                });
            };
            cursor = format!("({last}");
            let ids: Vec<KeyId> = ids
                .iter()
                .map(|id| {
                    id.parse()
                        .map_err(|_| StoreError::Corrupt(format!("bad key id {id:?}")))
                })
                .collect::<StoreResult<_>>()?;
            let names: Vec<String> = ids.iter().map(|id| self.names.key(id)).collect();
            let values = mget(&mut conn, &names).await?;
            let batch_len = ids.len();
            for (id, value) in ids.into_iter().zip(values) {
                let Some(value) = value else { continue };
                let record = match self.codec.decode_key(&id, &value) {
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
                    let next_after = page.last().map(|r: &KeyRecord| r.id.clone());
                    return Ok(KeyPage {
                        keys: page,
                        next_after,
                    });
                }
                page.push(record);
            }
            if batch_len < BATCH {
                return Ok(KeyPage {
                    keys: page,
                    next_after: None,
                });
            }
        }
    }

    async fn modify_key(&self, id: &KeyId, edit: KeyEdit) -> StoreResult<Committed<KeyRecord>> {
        let name = self.names.key(id);
        for _ in 0..MAX_ATTEMPTS {
            let mut conn = self.conn().await?;
            let raw: Option<Vec<u8>> = conn.get(&name).await.map_err(unavailable)?;
            let Some(bytes) = &raw else {
                return Err(StoreError::NotFound(format!("key {id}")));
            };
            let mut record = self.codec.decode_key(id, bytes)?;
            edit(&mut record)?;
            let guarded = vec![Guarded {
                key: name.clone(),
                expect: expect_of(&raw),
                op: Op::Set(self.codec.encode_key(&record)?),
            }];
            if let Some(revision) = self.commit(&Scope::Key(id.clone()), guarded).await? {
                return Ok(Committed {
                    value: record,
                    revision,
                });
            }
        }
        Err(StoreError::Unavailable(format!(
            "key {id} is changing too often to update; try again"
        )))
    }

    async fn get_allowlist(&self, scope: &Scope) -> StoreResult<Committed<Vec<AllowlistEntry>>> {
        let mut conn = self.conn().await?;
        let mut names = vec![self.names.revision(), self.names.list(scope)];
        if let Scope::Key(id) = scope {
            names.push(self.names.key(id));
        }
        let values = mget(&mut conn, &names).await?;
        if let Scope::Key(id) = scope
            && values[2].is_none()
        {
            return Err(StoreError::NotFound(format!("key {id}")));
        }
        let revision = values[0]
            .as_deref()
            .map(|raw| String::from_utf8_lossy(raw).parse::<u64>().map_err(corrupt))
            .transpose()?
            .unwrap_or(0);
        Ok(Committed {
            value: self.decode_list(scope, &values[1])?,
            revision,
        })
    }

    async fn modify_allowlist(
        &self,
        scope: &Scope,
        edit: AllowlistEdit,
    ) -> StoreResult<Committed<Vec<AllowlistEntry>>> {
        for _ in 0..MAX_ATTEMPTS {
            let mut conn = self.conn().await?;
            let mut names = vec![self.names.list(scope)];
            if let Scope::Key(id) = scope {
                names.push(self.names.key(id));
            }
            let values = mget(&mut conn, &names).await?;
            let mut guarded = Vec::new();
            let mut owner: Option<KeyRecord> = None;
            if let Scope::Key(id) = scope {
                let Some(bytes) = &values[1] else {
                    return Err(StoreError::NotFound(format!("key {id}")));
                };
                owner = Some(self.codec.decode_key(id, bytes)?);
                // The key must not change (be revoked) under the edit that read it.
                guarded.push(Guarded {
                    key: names[1].clone(),
                    expect: expect_of(&values[1]),
                    op: Op::Keep,
                });
            }
            let mut entries = self.decode_list(scope, &values[0])?;
            edit(owner.as_ref(), &mut entries)?;
            guarded.extend(self.list_ops(scope, &values[0], &entries)?);
            if let Some(revision) = self.commit(scope, guarded).await? {
                return Ok(Committed {
                    value: entries,
                    revision,
                });
            }
        }
        Err(StoreError::Unavailable(format!(
            "{scope} is changing too often to update; try again"
        )))
    }

    async fn reseal(&self) -> StoreResult<ResealReport> {
        let mut values = self.all_values().await?;
        let mut conn = self.conn().await?;
        let marker: Option<Vec<u8>> = conn.get(self.names.sealing()).await.map_err(unavailable)?;
        if let Some(marker) = marker {
            values.push((self.names.sealing(), Location::Marker, marker));
        }
        let report = self.reseal_values(values, false).await?;
        report_reseal(&report, false);
        Ok(report)
    }
}

#[async_trait]
impl NonceStore for RedisStore {
    async fn claim_nonce(
        &self,
        key: &KeyId,
        nonce: &str,
        ttl: Duration,
        consume: bool,
    ) -> StoreResult<bool> {
        let mut conn = self.conn().await?;
        let name = self.names.nonce(key, nonce);
        if !consume {
            let exists: bool = conn.exists(&name).await.map_err(unavailable)?;
            return Ok(!exists);
        }
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let token = format!(
            "{:x}:{}",
            self.instance,
            self.claims.fetch_add(1, Ordering::Relaxed)
        );
        let set: Result<Option<String>, _> = redis::cmd("SET")
            .arg(&name)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut conn)
            .await;
        match set {
            Ok(set) => Ok(set.is_some()),
            Err(error) => {
                // The SET may still land (Redis paused, or slow to answer): the request is being
                // refused, so its claim must not stand, or the legitimate retry would be denied as
                // a replay.
                self.withdraw_later(conn, name, token, ttl);
                Err(unavailable(error))
            }
        }
    }
}

/// Deletes a nonce claim if it still holds this claim's token.
const WITHDRAW: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;
/// Withdrawals at once; beyond this a claim whose answer was lost stays until its window ends.
const MAX_WITHDRAWALS: usize = 4096;
/// How often a withdrawal that found nothing to delete looks again, in case the claim was still
/// on its way.
const WITHDRAW_LOOKS: u32 = 3;

impl RedisStore {
    /// Withdraws a claim whose outcome is unknown, retrying while Redis cannot answer, until it
    /// deleted the claim, or found it absent a few times, or the nonce's window ended.
    fn withdraw_later(
        &self,
        mut conn: ConnectionManager,
        name: String,
        token: String,
        ttl: Duration,
    ) {
        if self.withdrawals.fetch_add(1, Ordering::Relaxed) >= MAX_WITHDRAWALS {
            self.withdrawals.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(
                "too many nonce withdrawals pending; this nonce stays claimed until its window ends"
            );
            return;
        }
        let withdrawals = self.withdrawals.clone();
        tokio::spawn(async move {
            let script = Script::new(WITHDRAW);
            let give_up = tokio::time::Instant::now() + ttl;
            let mut delay = Duration::from_millis(250);
            let mut absent = 0;
            while tokio::time::Instant::now() < give_up {
                match script
                    .key(&name)
                    .arg(&token)
                    .invoke_async::<i64>(&mut conn)
                    .await
                {
                    Ok(1) => break,
                    Ok(_) => {
                        absent += 1;
                        if absent >= WITHDRAW_LOOKS {
                            break;
                        }
                    }
                    Err(error) => tracing::debug!(%error, "nonce withdrawal failed; retrying"),
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            withdrawals.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

async fn mget(conn: &mut ConnectionManager, names: &[String]) -> StoreResult<Vec<Option<Vec<u8>>>> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    redis::cmd("MGET")
        .arg(names)
        .query_async(conn)
        .await
        .map_err(unavailable)
}

impl RedisStore {
    fn decode_list(
        &self,
        scope: &Scope,
        raw: &Option<Vec<u8>>,
    ) -> StoreResult<Vec<AllowlistEntry>> {
        match raw {
            Some(bytes) => self.codec.decode_list(scope, bytes),
            None => Ok(Vec::new()),
        }
    }
}

pub(crate) fn unavailable(error: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("redis: {error}"))
}

fn corrupt(error: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(error.to_string())
}
