//! Prometheus metrics: decisions by front end, decision and reason; decision latency; snapshot
//! size and revision; sync health; access-log drops; alerts. Served as Prometheus text on the
//! metrics listener. Decision counters are created up front, so the hot path is one atomic add
//! (and one histogram observation), never a label lookup.
//!
//! Invariant: metrics is a leaf that others report to; it imports neither `access` nor `authz`.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;
use opentelemetry::KeyValue;
use prometheus_client::{
    encoding::text::encode,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tokio::net::TcpListener;

use keyfence_policy::{
    clock::Clock,
    decision::{Decision, DenyReason, Verdict},
};
use keyfence_store::access_log::Frontend;

use crate::{sync::PolicySync, system::SystemClock};

type Labels = [(&'static str, &'static str); 3];

const FRONTENDS: [Frontend; 2] = [Frontend::Authorize, Frontend::EnvoyCheck];
/// allow, allow reported as would-deny, then one slot per deny reason.
const OUTCOMES: usize = 2 + DenyReason::ALL.len();

/// OpenTelemetry instruments, when OTLP export is on.
struct OtelInstruments {
    decisions: opentelemetry::metrics::Counter<u64>,
    latency: opentelemetry::metrics::Histogram<f64>,
}

pub struct Metrics {
    /// The root registry: `keyfence_*` metrics in a prefixed sub-registry, and the standard
    /// `process_*` metrics at the root.
    registry: Registry,
    /// Decisions refused because `max_inflight` were already in progress.
    pub decisions_shed: Counter,
    /// Calls by method and status, for both listeners' routers.
    pub grpc: Arc<super::grpc_metrics::GrpcMetrics>,
    process_cpu_seconds: Gauge<f64, AtomicU64>,
    process_resident_memory_bytes: Gauge,
    process_open_fds: Gauge,
    process_max_fds: Gauge,
    decisions: Vec<Counter>,
    decision_seconds: Histogram,
    pub access_log_dropped: Counter,
    pub access_log_write_failures: Counter,
    pub alerts: Counter,
    pub alert_webhook_deliveries: Counter,
    pub alert_webhook_failures: Counter,
    pub secrets_reloads: Counter,
    pub secrets_reload_failures: Counter,
    snapshot_keys: Gauge,
    snapshot_entries: Gauge,
    policy_revision: Gauge,
    sync_unconfirmed_seconds: Gauge<f64, AtomicU64>,
    sync_resyncs: Counter,
    sync_full_reloads: Counter,
    records_refused: Counter,
    seen_resyncs: AtomicU64,
    seen_full_reloads: AtomicU64,
    seen_records_refused: AtomicU64,
    otel: Option<OtelInstruments>,
}

fn outcome_index(decision: &Decision) -> usize {
    match (decision.verdict, decision.would_deny) {
        (Verdict::Allow, None) => 0,
        (Verdict::Allow, Some(_)) => 1,
        (Verdict::Deny(reason), _) => {
            2 + DenyReason::ALL
                .iter()
                .position(|r| *r == reason)
                .expect("every reason is listed")
        }
    }
}

fn outcome_labels(frontend: Frontend, outcome: usize) -> Labels {
    let (decision, reason) = match outcome {
        0 => ("allow", ""),
        1 => ("allow", "would_deny_ip_not_allowed"),
        n => ("deny", DenyReason::ALL[n - 2].as_str()),
    };
    [
        ("frontend", frontend.as_str()),
        ("decision", decision),
        ("reason", reason),
    ]
}

impl Metrics {
    pub fn new(meter: Option<opentelemetry::metrics::Meter>) -> Metrics {
        let mut root = Registry::default();
        let process_cpu_seconds = Gauge::<f64, AtomicU64>::default();
        root.register(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            process_cpu_seconds.clone(),
        );
        let process_resident_memory_bytes = Gauge::default();
        root.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            process_resident_memory_bytes.clone(),
        );
        let process_open_fds = Gauge::default();
        root.register(
            "process_open_fds",
            "Open file descriptors",
            process_open_fds.clone(),
        );
        let process_max_fds = Gauge::default();
        root.register(
            "process_max_fds",
            "The limit on open file descriptors",
            process_max_fds.clone(),
        );
        let registry = root.sub_registry_with_prefix("keyfence");
        let grpc = Arc::new(super::grpc_metrics::GrpcMetrics::register(registry));
        let build_info = Family::<[(&'static str, &'static str); 1], Gauge>::default();
        registry.register(
            "build_info",
            "The running build: always 1, labelled with the version",
            build_info.clone(),
        );
        build_info
            .get_or_create(&[("version", env!("CARGO_PKG_VERSION"))])
            .set(1);
        let family = Family::<Labels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by front end, decision and reason",
            family.clone(),
        );
        let mut decisions = Vec::with_capacity(FRONTENDS.len() * OUTCOMES);
        for frontend in FRONTENDS {
            for outcome in 0..OUTCOMES {
                decisions.push(
                    family
                        .get_or_create(&outcome_labels(frontend, outcome))
                        .clone(),
                );
            }
        }
        let decision_seconds = Histogram::new([
            0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5,
            0.005, 0.01, 0.025, 0.1,
        ]);
        registry.register(
            "decision_duration_seconds",
            "Time to decide, from request to decision",
            decision_seconds.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let access_log_dropped = counter(
            registry,
            "access_log_dropped",
            "Access records dropped because the queue was full",
        );
        let access_log_write_failures = counter(
            registry,
            "access_log_write_failures",
            "Access records lost because the log store failed",
        );
        let alerts = counter(registry, "alerts", "Blocked-attempt alerts raised");
        let decisions_shed = counter(
            registry,
            "decisions_shed",
            "Decisions refused at once because max_inflight were in progress",
        );
        let alert_webhook_deliveries = counter(
            registry,
            "alert_webhook_deliveries",
            "Alerts delivered to the webhook",
        );
        let alert_webhook_failures = counter(
            registry,
            "alert_webhook_failures",
            "Alerts the webhook never accepted",
        );
        let secrets_reloads = counter(
            registry,
            "secrets_reloads",
            "Times the secrets key file was reloaded",
        );
        let secrets_reload_failures = counter(
            registry,
            "secrets_reload_failures",
            "Reloads of the secrets key file that failed (the keys in use were kept)",
        );
        let records_refused = counter(
            registry,
            "store_records_refused",
            "Stored records refused because they failed their integrity check (a key so refused is denied)",
        );
        let snapshot_keys = gauge(registry, "snapshot_keys", "Keys in the policy snapshot");
        let snapshot_entries = gauge(
            registry,
            "snapshot_entries",
            "Allowlist entries in the policy snapshot",
        );
        let policy_revision = gauge(
            registry,
            "policy_revision",
            "Store revision of the policy snapshot",
        );
        let sync_unconfirmed_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "sync_unconfirmed_seconds",
            "Seconds since the snapshot was last confirmed current against the store (sync lag)",
            sync_unconfirmed_seconds.clone(),
        );
        let sync_resyncs = counter(
            registry,
            "sync_resyncs",
            "Changes found that no notification had announced",
        );
        let sync_full_reloads = counter(
            registry,
            "sync_full_reloads",
            "Full reloads of the policy (the first load included)",
        );
        let otel = meter.map(|meter| OtelInstruments {
            decisions: meter
                .u64_counter("keyfence.decisions")
                .with_description("Decisions")
                .build(),
            latency: meter
                .f64_histogram("keyfence.decision.duration")
                .with_unit("s")
                .build(),
        });
        Metrics {
            registry: root,
            decisions_shed,
            grpc,
            process_cpu_seconds,
            process_resident_memory_bytes,
            process_open_fds,
            process_max_fds,
            decisions,
            decision_seconds,
            access_log_dropped,
            access_log_write_failures,
            alerts,
            alert_webhook_deliveries,
            alert_webhook_failures,
            secrets_reloads,
            secrets_reload_failures,
            snapshot_keys,
            snapshot_entries,
            policy_revision,
            sync_unconfirmed_seconds,
            sync_resyncs,
            sync_full_reloads,
            records_refused,
            seen_resyncs: AtomicU64::new(0),
            seen_full_reloads: AtomicU64::new(0),
            seen_records_refused: AtomicU64::new(0),
            otel,
        }
    }

    /// Counts one decision. Hot path: an atomic add and a histogram observation.
    pub fn record_decision(&self, frontend: Frontend, decision: &Decision, elapsed: Duration) {
        let frontend_index = FRONTENDS.iter().position(|f| *f == frontend).unwrap_or(0);
        let outcome = outcome_index(decision);
        self.decisions[frontend_index * OUTCOMES + outcome].inc();
        self.decision_seconds.observe(elapsed.as_secs_f64());
        if let Some(otel) = &self.otel {
            let [(_, f), (_, d), (_, r)] = outcome_labels(frontend, outcome);
            otel.decisions.add(
                1,
                &[
                    KeyValue::new("frontend", f),
                    KeyValue::new("decision", d),
                    KeyValue::new("reason", r),
                ],
            );
            otel.latency
                .record(elapsed.as_secs_f64(), &[KeyValue::new("frontend", f)]);
        }
    }

    /// The text exposition, with snapshot and sync gauges read now.
    pub fn render(&self, sync: &PolicySync) -> String {
        let snapshot = sync.policy().load();
        self.snapshot_keys.set(snapshot.key_count() as i64);
        self.snapshot_entries.set(snapshot.entry_count() as i64);
        self.policy_revision.set(snapshot.revision() as i64);
        drop(snapshot);
        let unconfirmed = sync
            .unconfirmed_for(SystemClock.now())
            .map_or(f64::INFINITY, |d| d.as_secs_f64());
        self.sync_unconfirmed_seconds.set(unconfirmed);
        let resyncs = sync.resyncs();
        let before = self.seen_resyncs.swap(resyncs, Ordering::Relaxed);
        self.sync_resyncs.inc_by(resyncs.saturating_sub(before));
        let reloads = sync.full_reloads();
        let before = self.seen_full_reloads.swap(reloads, Ordering::Relaxed);
        self.sync_full_reloads
            .inc_by(reloads.saturating_sub(before));
        let refused = sync.refused_records();
        let before = self.seen_records_refused.swap(refused, Ordering::Relaxed);
        self.records_refused.inc_by(refused.saturating_sub(before));
        self.read_process_stats();
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }

    /// CPU, memory and file descriptors from /proc (Linux); left as they were elsewhere.
    fn read_process_stats(&self) {
        // /proc reports CPU time in USER_HZ ticks, 100 per second on Linux.
        const TICKS_PER_SECOND: f64 = 100.0;
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
            if let (Some(user), Some(system)) = (ticks(11), ticks(12)) {
                self.process_cpu_seconds
                    .set((user + system) / TICKS_PER_SECOND);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let rss_kib = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
            if let Some(kib) = rss_kib {
                self.process_resident_memory_bytes.set(kib * 1024);
            }
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            self.process_open_fds.set(entries.count() as i64);
        }
        if let Ok(limits) = std::fs::read_to_string("/proc/self/limits") {
            let soft = limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<i64>().ok());
            if let Some(max) = soft {
                self.process_max_fds.set(max);
            }
        }
    }
}

/// Serves `GET /metrics`, `GET /healthz` (the process answers) and `GET /readyz` (200 while it
/// serves decisions: the policy has loaded and no shutdown has begun; 503 otherwise) until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    sync: Arc<PolicySync>,
    ready: tokio::sync::watch::Receiver<bool>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let (metrics, sync, ready) = (metrics.clone(), sync.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let (metrics, sync, ready) = (metrics.clone(), sync.clone(), ready.clone());
                async move {
                    let text = |status: u16, body: &'static [u8]| {
                        Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; charset=utf-8")
                            .body(Full::new(Bytes::from_static(body)))
                    };
                    let response = match request.uri().path() {
                        "/metrics" => Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render(&sync)))),
                        "/healthz" => text(200, b"ok\n"),
                        "/readyz" if *ready.borrow() => text(200, b"ready\n"),
                        "/readyz" => text(503, b"not ready\n"),
                        _ => text(404, b"not found\n"),
                    };
                    Ok::<_, std::convert::Infallible>(
                        response.expect("static response parts are valid"),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The address the metrics listener is bound to, for logs.
pub fn describe(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
