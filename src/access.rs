//! Access logs: who used a key, from where, what was blocked, and alerts on repeated blocks.
//!
//! Recording never slows or blocks a decision: the decision path builds a small [`AccessEvent`]
//! (reference-counted key, copied address and reason) and offers it to a bounded queue; a full
//! queue drops the event and counts it. One writer task drains the queue in batches: it turns
//! events into [`AccessRecord`]s, appends them to the log store (embedded file or Redis streams),
//! keeps last-used times (flushed every few seconds, not per request) and feeds the alert
//! detector. Invariant: the decision path never awaits anything here.

pub mod alerts;
pub mod embedded;
pub mod redis;

use std::{collections::HashMap, sync::Arc, time::Duration};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::{
    policy::{
        decision::{Decision, Verdict},
        ip::ClientIp,
        model::{Environment, KeyId, PartnerId, UnixMillis},
        snapshot::CompiledKey,
    },
    store::StoreResult,
    telemetry::metrics::Metrics,
};

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

/// What the decision path hands over: cheap to build, converted off the hot path.
pub struct AccessEvent {
    pub at: UnixMillis,
    pub frontend: Frontend,
    pub key: Option<Arc<CompiledKey>>,
    pub client_ip: Option<ClientIp>,
    pub allowed: bool,
    pub reason: Option<&'static str>,
    pub would_deny: bool,
    pub matched: Option<crate::policy::ip::Cidr>,
    /// Method and path, when the front end knows them.
    pub endpoint: Option<(String, String)>,
}

impl AccessEvent {
    pub fn of(
        decision: &Decision,
        at: UnixMillis,
        frontend: Frontend,
        endpoint: Option<(&str, &str)>,
    ) -> AccessEvent {
        AccessEvent {
            at,
            frontend,
            key: decision.key.clone(),
            client_ip: decision.client_ip,
            allowed: decision.verdict == Verdict::Allow,
            reason: decision.reason().map(|r| r.as_str()),
            would_deny: decision.would_deny.is_some(),
            matched: decision.matched.map(|m| m.cidr),
            endpoint: endpoint.map(|(m, p)| (m.to_owned(), p.to_owned())),
        }
    }
}

/// One access-log line as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessRecord {
    pub at: UnixMillis,
    pub frontend: Frontend,
    pub key_id: Option<KeyId>,
    pub partner_id: Option<PartnerId>,
    pub environment: Option<Environment>,
    /// Empty when the caller's address could not be parsed.
    pub client_ip: String,
    pub allowed: bool,
    pub reason: Option<String>,
    pub would_deny: bool,
    pub method: Option<String>,
    pub path: Option<String>,
    pub matched_cidr: Option<String>,
}

impl From<AccessEvent> for AccessRecord {
    fn from(event: AccessEvent) -> AccessRecord {
        let (method, path) = match event.endpoint {
            Some((method, path)) => (Some(method), Some(path)),
            None => (None, None),
        };
        AccessRecord {
            at: event.at,
            frontend: event.frontend,
            key_id: event.key.as_ref().map(|k| k.id.clone()),
            partner_id: event.key.as_ref().map(|k| k.partner_id.clone()),
            environment: event.key.as_ref().map(|k| k.environment.clone()),
            client_ip: event.client_ip.map(|ip| ip.to_string()).unwrap_or_default(),
            allowed: event.allowed,
            reason: event.reason.map(str::to_owned),
            would_deny: event.would_deny,
            method,
            path,
            matched_cidr: event.matched.map(|c| c.to_string()),
        }
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
}

/// Where access records and last-used times are kept.
#[async_trait]
pub trait AccessLogStore: Send + Sync + 'static {
    async fn append(&self, records: Vec<AccessRecord>, retention: Retention) -> StoreResult<()>;
    async fn list(&self, query: &AccessQuery) -> StoreResult<AccessPage>;
    async fn record_last_used(&self, uses: Vec<(KeyId, LastUse)>) -> StoreResult<()>;
    async fn last_used(&self, ids: &[KeyId]) -> StoreResult<Vec<Option<LastUse>>>;
}

/// The decision path's handle: offers events to the queue, never waits.
#[derive(Clone)]
pub struct AccessRecorder {
    queue: mpsc::Sender<AccessEvent>,
    metrics: Arc<Metrics>,
}

impl AccessRecorder {
    pub fn record(&self, event: AccessEvent) {
        if self.queue.try_send(event).is_err() {
            self.metrics.access_log_dropped.inc();
        }
    }
}

/// Settings of the writer task.
#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub queue_capacity: usize,
    pub retention: Retention,
    /// How often last-used times are written.
    pub last_used_flush: Duration,
    pub alerts: alerts::AlertConfig,
}

/// Starts the writer task; returns the recorder for the decision path.
pub fn start(
    store: Arc<dyn AccessLogStore>,
    config: AccessLogConfig,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (AccessRecorder, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
    let recorder = AccessRecorder {
        queue: tx,
        metrics: metrics.clone(),
    };
    let alerts = alerts::AlertDetector::new(config.alerts.clone(), metrics.clone());
    let task = tokio::spawn(write_loop(rx, store, config, metrics, alerts, shutdown));
    (recorder, task)
}

/// Records written per store call.
const BATCH: usize = 4096;
/// Once a record arrives, how long the writer lets more gather before writing. Batching by time
/// keeps the per-write costs (a transaction, a round trip) off every record, and lets the
/// decision path's `try_send` usually find no writer to wake.
const GATHER: std::time::Duration = std::time::Duration::from_millis(50);

async fn write_loop(
    mut queue: mpsc::Receiver<AccessEvent>,
    store: Arc<dyn AccessLogStore>,
    config: AccessLogConfig,
    metrics: Arc<Metrics>,
    mut alerts: alerts::AlertDetector,
    shutdown: impl Future<Output = ()>,
) {
    let mut last_used: HashMap<KeyId, LastUse> = HashMap::new();
    let mut flush = tokio::time::interval(config.last_used_flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = Vec::with_capacity(BATCH);
    tokio::pin!(shutdown);
    let mut stopping = false;
    while !stopping {
        let mut flush_now = false;
        tokio::select! {
            received = queue.recv_many(&mut events, BATCH) => {
                if received == 0 {
                    stopping = true;
                } else if received < BATCH {
                    tokio::time::sleep(GATHER).await;
                    while events.len() < BATCH {
                        match queue.try_recv() {
                            Ok(event) => events.push(event),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = flush.tick() => flush_now = true,
            _ = &mut shutdown => {
                stopping = true;
                queue.close();
                while let Ok(event) = queue.try_recv() {
                    events.push(event);
                }
            }
        }
        let mut pending = std::mem::take(&mut events);
        while !pending.is_empty() {
            let rest = pending.split_off(pending.len().min(BATCH));
            let records = pending.into_iter().map(AccessRecord::from).collect();
            write_batch(
                records,
                &*store,
                &config,
                &metrics,
                &mut alerts,
                &mut last_used,
            )
            .await;
            pending = rest;
        }
        if (flush_now || stopping || last_used.len() >= 10_000) && !last_used.is_empty() {
            let uses: Vec<(KeyId, LastUse)> = last_used.drain().collect();
            if let Err(error) = store.record_last_used(uses).await {
                tracing::warn!(%error, "cannot write last-used times");
            }
        }
    }
}

async fn write_batch(
    records: Vec<AccessRecord>,
    store: &dyn AccessLogStore,
    config: &AccessLogConfig,
    metrics: &Metrics,
    alerts: &mut alerts::AlertDetector,
    last_used: &mut HashMap<KeyId, LastUse>,
) {
    let mut keyed = Vec::with_capacity(records.len());
    for record in records {
        let Some(key_id) = &record.key_id else {
            // Unknown keys have no log of their own; metrics count them.
            continue;
        };
        if record.allowed {
            match last_used.get_mut(key_id) {
                Some(last) if last.at <= record.at => {
                    last.at = record.at;
                    last.client_ip.clone_from(&record.client_ip);
                }
                Some(_) => {}
                None => {
                    last_used.insert(
                        key_id.clone(),
                        LastUse {
                            at: record.at,
                            client_ip: record.client_ip.clone(),
                        },
                    );
                }
            }
        } else {
            alerts.observe(&record);
        }
        keyed.push(record);
    }
    if keyed.is_empty() {
        return;
    }
    let count = keyed.len() as u64;
    if let Err(error) = store.append(keyed, config.retention).await {
        metrics.access_log_write_failures.inc_by(count);
        tracing::warn!(%error, records = count, "cannot write access records; dropped");
    }
}
