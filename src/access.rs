//! Access logs: who used a key, from where, what was blocked, and alerts on repeated blocks.
//!
//! Recording never slows or blocks a decision: the decision path builds a small [`AccessEvent`]
//! (reference-counted key, copied address and reason) and offers it to a queue bounded by records
//! and by bytes; a full queue drops the event and counts it. One writer task drains the queue in batches: it turns
//! events into per-key [`Entry`] lists, appends them to the log store (embedded file or Redis streams),
//! keeps last-used times (flushed every few seconds, not per request) and feeds the alert
//! detector. Records are grouped per key, so a key's identity is written once per batch. Where
//! records are kept is `keyfence_store::access_log`.
//!
//! Invariant: the decision path never awaits anything here. This module reports to
//! `telemetry::metrics`; metrics never imports it.

pub mod alerts;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use keyfence_policy::{
    decision::{Decision, DenyReason, Verdict},
    ip::{Cidr, ClientIp},
    model::{KeyId, UnixMillis},
    snapshot::CompiledKey,
};
use keyfence_store::access_log::{
    AccessBatch, AccessLogStore, Entry, Frontend, KeyIdentity, LastUse, Retention,
};
use tokio::sync::mpsc;

use crate::telemetry::metrics::Metrics;

/// What the decision path hands over: cheap to build, converted off the hot path.
pub struct AccessEvent {
    pub at: UnixMillis,
    pub frontend: Frontend,
    pub key: Option<Arc<CompiledKey>>,
    pub client_ip: Option<ClientIp>,
    pub allowed: bool,
    pub reason: Option<DenyReason>,
    pub would_deny: bool,
    pub matched: Option<Cidr>,
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
            reason: decision.reason(),
            would_deny: decision.would_deny.is_some(),
            matched: decision.matched.map(|m| m.cidr),
            endpoint: endpoint.map(|(m, p)| (m.to_owned(), p.to_owned())),
        }
    }
}

impl AccessEvent {
    /// What the event holds on the heap and inline, for the queue's byte bound.
    fn queued_size(&self) -> usize {
        std::mem::size_of::<AccessEvent>()
            + self
                .endpoint
                .as_ref()
                .map_or(0, |(method, path)| method.len() + path.len())
    }
}

/// The stored form of an event: fixed-size fields but the endpoint.
fn entry_of(event: AccessEvent) -> Entry {
    Entry {
        at: event.at,
        frontend: event.frontend,
        client_ip: event.client_ip.map(ClientIp::addr),
        allowed: event.allowed,
        would_deny: event.would_deny,
        reason: event.reason,
        endpoint: event.endpoint,
        matched: event
            .matched
            .map(|c| (c.net().network(), c.net().prefix_len())),
    }
}

/// The decision path's handle: offers events to the queue, never waits.
#[derive(Clone)]
pub struct AccessRecorder {
    queue: mpsc::Sender<AccessEvent>,
    /// Bytes of the events in the queue; the writer takes off what it receives.
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
    metrics: Arc<Metrics>,
}

impl AccessRecorder {
    pub fn record(&self, event: AccessEvent) {
        let size = event.queued_size();
        let before = self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        if before + size > self.max_queued_bytes || self.queue.try_send(event).is_err() {
            self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
            self.metrics.access_log_dropped.inc();
        }
    }
}

/// Settings of the writer task.
#[derive(Debug, Clone)]
pub struct AccessLogConfig {
    pub queue_capacity: usize,
    /// The most bytes of events the queue holds, whatever their number.
    pub queue_max_bytes: usize,
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
    let queued_bytes = Arc::new(AtomicUsize::new(0));
    let recorder = AccessRecorder {
        queue: tx,
        queued_bytes: queued_bytes.clone(),
        max_queued_bytes: config.queue_max_bytes,
        metrics: metrics.clone(),
    };
    let alerts = alerts::AlertDetector::new(config.alerts.clone(), metrics.clone());
    let queue = Queue { rx, queued_bytes };
    let task = tokio::spawn(write_loop(queue, store, config, metrics, alerts, shutdown));
    (recorder, task)
}

/// Records written per store call.
const BATCH: usize = 4096;
/// Once a record arrives, how long the writer lets more gather before writing. Batching by time
/// keeps the per-write costs (a transaction, a round trip) off every record, and lets the
/// decision path's `try_send` usually find no writer to wake.
const GATHER: std::time::Duration = std::time::Duration::from_millis(50);

/// The writer's end of the queue.
struct Queue {
    rx: mpsc::Receiver<AccessEvent>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Queue {
    /// Hands the taken events' bytes back to the recorder's budget.
    fn release(&self, events: &[AccessEvent]) {
        let bytes: usize = events.iter().map(AccessEvent::queued_size).sum();
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

async fn write_loop(
    mut queue: Queue,
    store: Arc<dyn AccessLogStore>,
    config: AccessLogConfig,
    metrics: Arc<Metrics>,
    mut alerts: alerts::AlertDetector,
    shutdown: impl Future<Output = ()>,
) {
    let mut last_used: HashMap<KeyId, (UnixMillis, Option<IpAddr>)> = HashMap::new();
    let mut flush = tokio::time::interval(config.last_used_flush);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut events = Vec::with_capacity(BATCH);
    tokio::pin!(shutdown);
    let mut stopping = false;
    while !stopping {
        let mut flush_now = false;
        tokio::select! {
            received = queue.rx.recv_many(&mut events, BATCH) => {
                if received == 0 {
                    stopping = true;
                } else if received < BATCH {
                    tokio::time::sleep(GATHER).await;
                    while events.len() < BATCH {
                        match queue.rx.try_recv() {
                            Ok(event) => events.push(event),
                            Err(_) => break,
                        }
                    }
                }
            }
            _ = flush.tick() => flush_now = true,
            _ = &mut shutdown => {
                stopping = true;
                queue.rx.close();
                while let Ok(event) = queue.rx.try_recv() {
                    events.push(event);
                }
            }
        }
        queue.release(&events);
        let mut pending = std::mem::take(&mut events);
        while !pending.is_empty() {
            let rest = pending.split_off(pending.len().min(BATCH));
            let batch = gather(pending, &mut alerts, &mut last_used);
            write_batch(batch, &*store, &config, &metrics).await;
            pending = rest;
        }
        if (flush_now || stopping || last_used.len() >= 10_000) && !last_used.is_empty() {
            let uses: Vec<(KeyId, LastUse)> = last_used
                .drain()
                .map(|(id, (at, ip))| {
                    let client_ip = ip.map(|ip| ip.to_string()).unwrap_or_default();
                    (id, LastUse { at, client_ip })
                })
                .collect();
            if let Err(error) = store.record_last_used(uses).await {
                tracing::warn!(%error, "cannot write last-used times");
            }
        }
    }
}

/// Groups events by key (by the compiled key they share, so no string is built per record),
/// newest first, feeding last-used times and the alert detector on the way. Events without a key
/// (unknown keys) have no log of their own; metrics count them.
fn gather(
    events: Vec<AccessEvent>,
    alerts: &mut alerts::AlertDetector,
    last_used: &mut HashMap<KeyId, (UnixMillis, Option<IpAddr>)>,
) -> AccessBatch {
    let mut slots: HashMap<usize, usize> = HashMap::new();
    let mut batch = AccessBatch::default();
    for event in events {
        let Some(key) = &event.key else { continue };
        let slot = *slots.entry(Arc::as_ptr(key) as usize).or_insert_with(|| {
            batch.keys.push((KeyIdentity::of(key), Vec::new()));
            batch.keys.len() - 1
        });
        let (identity, entries) = &mut batch.keys[slot];
        let entry = entry_of(event);
        if entry.allowed {
            match last_used.get_mut(&identity.key_id) {
                Some(last) if last.0 <= entry.at => *last = (entry.at, entry.client_ip),
                Some(_) => {}
                None => {
                    last_used.insert(identity.key_id.clone(), (entry.at, entry.client_ip));
                }
            }
        } else {
            alerts.observe(identity, &entry);
        }
        entries.push(entry);
    }
    for (_, entries) in &mut batch.keys {
        entries.reverse();
        entries.sort_by_key(|e| std::cmp::Reverse(e.at));
    }
    batch
}

async fn write_batch(
    batch: AccessBatch,
    store: &dyn AccessLogStore,
    config: &AccessLogConfig,
    metrics: &Metrics,
) {
    if batch.is_empty() {
        return;
    }
    let count = batch.len() as u64;
    if let Err(error) = store.append(batch, config.retention).await {
        metrics.access_log_write_failures.inc_by(count);
        tracing::warn!(%error, records = count, "cannot write access records; dropped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event_with_path(path_bytes: usize) -> AccessEvent {
        AccessEvent {
            at: UnixMillis(0),
            frontend: Frontend::Authorize,
            key: None,
            client_ip: None,
            allowed: false,
            reason: Some(DenyReason::IpNotAllowed),
            would_deny: false,
            matched: None,
            endpoint: Some(("GET".into(), "p".repeat(path_bytes))),
        }
    }

    /// 40 denied calls with a 4 MB path each filled the disk: a queue bounded by records only
    /// holds 65,536 of them, whatever their size.
    #[test]
    fn the_queue_is_bounded_by_bytes_as_well_as_records() {
        let (tx, mut rx) = mpsc::channel(10_000);
        let metrics = Arc::new(Metrics::new(None));
        let recorder = AccessRecorder {
            queue: tx,
            queued_bytes: Arc::new(AtomicUsize::new(0)),
            max_queued_bytes: 100 * 1024,
            metrics: metrics.clone(),
        };
        for _ in 0..100 {
            recorder.record(event_with_path(8 * 1024));
        }
        let mut queued = Vec::new();
        while let Ok(event) = rx.try_recv() {
            queued.push(event);
        }
        let bytes: usize = queued.iter().map(AccessEvent::queued_size).sum();
        assert!(bytes <= 100 * 1024, "{bytes} bytes queued");
        assert!(queued.len() >= 10, "small enough events still get in");
        assert_eq!(
            metrics.access_log_dropped.get(),
            100 - queued.len() as u64,
            "every refused event is counted"
        );
        // Once the writer takes them, their bytes are free again.
        let queue = Queue {
            rx,
            queued_bytes: recorder.queued_bytes.clone(),
        };
        queue.release(&queued);
        assert_eq!(recorder.queued_bytes.load(Ordering::Relaxed), 0);
        recorder.record(event_with_path(8 * 1024));
        assert_eq!(
            recorder.queued_bytes.load(Ordering::Relaxed),
            queued[0].queued_size()
        );
    }
}
