//! Access logs, retention, the bounded queue, alerts and their webhook, Prometheus metrics,
//! OpenTelemetry export, and that no secret reaches a log line or a span.

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::*;
use keyfence::grpc::pb::{self, DenyReason};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn access_logs(
    admin: &mut Admin,
    key_id: &str,
    blocked_only: bool,
) -> Vec<pb::AccessLogEntry> {
    admin
        .list_access_logs(pb::ListAccessLogsRequest {
            key_id: key_id.into(),
            limit: 1000,
            blocked_only,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries
}

/// Polls until `check` passes on the key's log, or panics after 10 s.
async fn wait_for_log(
    admin: &mut Admin,
    key_id: &str,
    blocked_only: bool,
    check: impl Fn(&[pb::AccessLogEntry]) -> bool,
) -> Vec<pb::AccessLogEntry> {
    let started = Instant::now();
    loop {
        let entries = access_logs(admin, key_id, blocked_only).await;
        if check(&entries) {
            return entries;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "log never satisfied the check: {entries:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn blocked_attempts_are_listed_and_last_use_is_shown() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let id = key.key.unwrap().id;
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "203.0.113.7")).await,
        ALLOW
    );
    assert_eq!(
        decide(&mut authz, authorize_request(&key.secret, "198.51.100.9")).await,
        denied(DenyReason::IpNotAllowed)
    );
    let blocked = wait_for_log(&mut admin, &id, true, |e| !e.is_empty()).await;
    assert_eq!(blocked.len(), 1);
    let entry = &blocked[0];
    assert_eq!(entry.client_ip, "198.51.100.9");
    assert_eq!(entry.decision(), pb::Decision::Deny);
    assert_eq!(entry.reason(), DenyReason::IpNotAllowed);
    assert_eq!(
        (
            entry.partner_id.as_str(),
            entry.environment.as_str(),
            entry.source.as_str()
        ),
        ("acme", "production", "authorize")
    );
    let all = wait_for_log(&mut admin, &id, false, |e| e.len() == 2).await;
    assert_eq!(all[0].client_ip, "198.51.100.9", "newest first");
    assert_eq!(all[1].matched_cidr, "203.0.113.0/24");

    // Dry runs are not logged.
    admin
        .check_access(pb::CheckAccessRequest {
            key: Some(pb::check_access_request::Key::KeyId(id.clone())),
            client_ip: "192.0.2.1".into(),
            signature: None,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(access_logs(&mut admin, &id, false).await.len(), 2);

    // Last use is coalesced (written every few seconds) and shown by GetKey.
    let started = Instant::now();
    loop {
        let shown = admin
            .get_key(pb::GetKeyRequest { key_id: id.clone() })
            .await
            .unwrap()
            .into_inner()
            .key
            .unwrap();
        if shown.last_used_at.is_some() {
            assert_eq!(shown.last_used_ip, "203.0.113.7");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "last use never shown"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = admin
        .list_access_logs(pb::ListAccessLogsRequest {
            key_id: "key_nope".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn retention_keeps_the_newest_records() {
    let server = Server::start(&["--access-log-max-records", "5"]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    for i in 0..12 {
        decide(
            &mut authz,
            authorize_request(&key.secret, &format!("198.51.100.{i}")),
        )
        .await;
        // Separate batches, so trimming runs as records arrive.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let entries = wait_for_log(&mut admin, &id, false, |e| {
        e.first().is_some_and(|e| e.client_ip == "198.51.100.11")
    })
    .await;
    assert_eq!(entries.len(), 5);
    let ips: Vec<&str> = entries.iter().map(|e| e.client_ip.as_str()).collect();
    assert_eq!(
        ips,
        [
            "198.51.100.11",
            "198.51.100.10",
            "198.51.100.9",
            "198.51.100.8",
            "198.51.100.7"
        ]
    );
    // Paging walks the same records.
    let first = admin
        .list_access_logs(pb::ListAccessLogsRequest {
            key_id: id.clone(),
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    let second = admin
        .list_access_logs(pb::ListAccessLogsRequest {
            key_id: id.clone(),
            limit: 2,
            page_token: first.next_page_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.entries[0].client_ip, "198.51.100.9");
}

/// Parses Prometheus/OpenMetrics text strictly; returns sample name{labels} → value.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines.last(),
        Some(&"# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in &lines[..lines.len() - 1] {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split_whitespace().next().unwrap_or_default();
            assert!(
                ["HELP", "TYPE", "UNIT"].contains(&kind),
                "bad comment line {line:?}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let name_end = series.find('{').unwrap_or(series.len());
        let name = &series[..name_end];
        assert!(
            !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name in {line:?}"
        );
        if name_end < series.len() {
            let labels = series[name_end..]
                .strip_prefix('{')
                .and_then(|l| l.strip_suffix('}'))
                .unwrap_or_else(|| panic!("bad labels in {line:?}"));
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (key, quoted) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("bad label in {line:?}"));
                assert!(
                    key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                    "bad label name in {line:?}"
                );
                assert!(quoted.starts_with('"'), "unquoted label value in {line:?}");
            }
        }
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        samples.insert(series.to_owned(), value);
    }
    samples
}

#[tokio::test]
async fn metrics_parse_and_match_the_decisions_made() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(
        &mut admin,
        "acme",
        "production",
        &["203.0.113.0/24", "2001:db8::/32"],
    )
    .await;
    for _ in 0..7 {
        decide(&mut authz, authorize_request(&key.secret, "203.0.113.1")).await;
    }
    for _ in 0..3 {
        decide(&mut authz, authorize_request(&key.secret, "198.51.100.1")).await;
    }
    decide(
        &mut authz,
        authorize_request("kf_live_unknown", "203.0.113.1"),
    )
    .await;
    let samples = parse_metrics(&server.metrics_text().await);
    let get = |series: &str| {
        samples
            .get(series)
            .copied()
            .unwrap_or_else(|| panic!("no {series} in {samples:?}"))
    };
    assert_eq!(
        get(r#"keyfence_decisions_total{frontend="authorize",decision="allow",reason=""}"#),
        7.0
    );
    assert_eq!(
        get(
            r#"keyfence_decisions_total{frontend="authorize",decision="deny",reason="ip_not_allowed"}"#
        ),
        3.0
    );
    assert_eq!(
        get(
            r#"keyfence_decisions_total{frontend="authorize",decision="deny",reason="unknown_key"}"#
        ),
        1.0
    );
    assert_eq!(
        get(
            r#"keyfence_decisions_total{frontend="authorize",decision="deny",reason="signature_invalid"}"#
        ),
        0.0
    );
    assert_eq!(get("keyfence_decision_duration_seconds_count"), 11.0);
    assert_eq!(get("keyfence_snapshot_keys"), 1.0);
    assert_eq!(get("keyfence_snapshot_entries"), 2.0);
    assert_eq!(get("keyfence_policy_revision"), key.revision as f64);
    assert_eq!(get("keyfence_access_log_dropped_total"), 0.0);
    assert!(get("keyfence_sync_unconfirmed_seconds") < 60.0);
    assert_eq!(get("keyfence_sync_full_reloads_total"), 1.0);
}

#[tokio::test]
async fn a_full_queue_drops_records_but_answers_every_request() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0", "--access-log-queue", "1"]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let id = key.key.unwrap().id;
    let mut tasks = Vec::new();
    const CLIENTS: usize = 16;
    const EACH: usize = 50;
    for _ in 0..CLIENTS {
        let mut authz = server.authorizer().await;
        let secret = key.secret.clone();
        tasks.push(tokio::spawn(async move {
            let mut answered = 0;
            for _ in 0..EACH {
                if authz
                    .authorize(authorize_request(&secret, "203.0.113.1"))
                    .await
                    .is_ok()
                {
                    answered += 1;
                }
            }
            answered
        }));
    }
    let mut answered = 0;
    for task in tasks {
        answered += task.await.unwrap();
    }
    assert_eq!(answered, CLIENTS * EACH, "every decision was answered");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let samples = parse_metrics(&server.metrics_text().await);
    let dropped = samples["keyfence_access_log_dropped_total"];
    let logged = access_logs(&mut admin, &id, false).await.len() as f64;
    assert_eq!(
        logged + dropped,
        (CLIENTS * EACH) as f64,
        "every decision was either logged or counted as dropped"
    );
    assert!(
        dropped > 0.0,
        "a one-slot queue under {CLIENTS} concurrent clients dropped some"
    );
}

/// A webhook receiver on loopback: answers each POST with the next status from `statuses`
/// (then 200), and keeps the bodies.
async fn webhook(statuses: Vec<u16>) -> (String, Arc<Mutex<Vec<serde_json::Value>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::new()));
    let statuses = Arc::new(Mutex::new(statuses.into_iter()));
    let kept = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let (kept, statuses) = (kept.clone(), statuses.clone());
            tokio::spawn(async move {
                let mut buffer = Vec::new();
                let mut chunk = [0u8; 4096];
                let body = loop {
                    let n = stream.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let text = String::from_utf8_lossy(&buffer).to_string();
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                            })
                            .unwrap_or(0);
                        if body.len() >= length {
                            break body[..length].to_owned();
                        }
                    }
                };
                let status = statuses.lock().unwrap().next().unwrap_or(200);
                if status == 200 {
                    kept.lock()
                        .unwrap()
                        .push(serde_json::from_str(&body).unwrap());
                }
                let reply = format!(
                    "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
                let _ = stream.write_all(reply.as_bytes()).await;
            });
        }
    });
    (url, received)
}

#[tokio::test]
async fn an_alert_fires_once_per_window_and_reaches_the_webhook() {
    // The first delivery attempt fails: the alert must still arrive, once.
    let (url, received) = webhook(vec![500]).await;
    let server = Server::start(&[
        "--metrics-listen",
        "127.0.0.1:0",
        "--alert-max-blocked",
        "3",
        "--alert-window-secs",
        "60",
        "--alert-webhook-url",
        &url,
    ]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let id = key.key.unwrap().id;
    for i in 0..10 {
        decide(
            &mut authz,
            authorize_request(&key.secret, &format!("198.51.100.{}", i % 2)),
        )
        .await;
    }
    let started = Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no alert reached the webhook"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // More blocked attempts inside the window raise nothing new.
    for _ in 0..10 {
        decide(&mut authz, authorize_request(&key.secret, "198.51.100.77")).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let alerts = received.lock().unwrap().clone();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["type"], "keyfence.blocked_attempts");
    assert_eq!(alerts[0]["key_id"], id.as_str());
    assert_eq!(alerts[0]["partner_id"], "acme");
    assert_eq!(alerts[0]["blocked"], 4);
    let samples = parse_metrics(&server.metrics_text().await);
    assert_eq!(samples["keyfence_alerts_total"], 1.0);
    assert_eq!(samples["keyfence_alert_webhook_deliveries_total"], 1.0);
    assert!(server.log().contains("alert: key blocked repeatedly"));
}

/// A fake OTLP collector that keeps what it receives.
mod collector {
    use std::sync::{Arc, Mutex};

    use opentelemetry_proto::tonic::collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    };

    #[derive(Clone, Default)]
    pub struct Collector {
        pub spans: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
        pub metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
    }

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            self.spans.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    #[tonic::async_trait]
    impl MetricsService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportMetricsServiceRequest>,
        ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
            self.metrics.lock().unwrap().push(request.into_inner());
            Ok(tonic::Response::new(ExportMetricsServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub async fn start() -> (String, Collector) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let collector = Collector::default();
        let service = collector.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(service.clone()))
                .add_service(MetricsServiceServer::new(service))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        (endpoint, collector)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_exports_only_when_configured_and_never_secrets() {
    let (endpoint, collector) = collector::start().await;
    let fast_export = [
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_METRIC_EXPORT_INTERVAL", "500"),
        ("RUST_LOG", "debug"),
    ];

    // Without an endpoint nothing is exported.
    let quiet = Server::start_with_env(&[], &fast_export);
    let mut admin = quiet.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    decide(
        &mut quiet.authorizer().await,
        authorize_request(&key.secret, "203.0.113.1"),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(collector.spans.lock().unwrap().is_empty());
    assert!(collector.metrics.lock().unwrap().is_empty());

    // With one, spans and metrics arrive, carrying key ids and decisions but no secret.
    let server = Server::start_with_env(
        &[
            "--otlp-endpoint",
            &endpoint,
            "--admin-token",
            "an-admin-token-1234",
        ],
        &fast_export,
    );
    let mut admin = server.admin().await;
    let created = admin
        .create_key(hmac_key_request("traced", &["203.0.113.0/24"]))
        .await
        .unwrap()
        .into_inner();
    let id = created.key.as_ref().unwrap().id.clone();
    let signing_secret = signing_secret(&created);
    let now = now_secs();
    let signature =
        keyfence_policy::signature::sign_hmac(&signing_secret, now, "n-1", "GET", "/", b"");
    let mut authz = server.authorizer().await;
    let request = pb::AuthorizeRequest {
        api_key: created.secret.clone(),
        client_ip: "203.0.113.1".into(),
        signature: Some(pb::SignatureInput {
            signature: signature.clone(),
            timestamp: now,
            nonce: "n-1".into(),
            method: "GET".into(),
            path: "/".into(),
            body: vec![],
        }),
        min_revision: 0,
    };
    assert_eq!(decide(&mut authz, request).await, ALLOW);
    decide(
        &mut authz,
        authorize_request("kf_live_attacker_guess_123", "203.0.113.1"),
    )
    .await;

    let started = Instant::now();
    loop {
        let has_authorize_span = collector
            .spans
            .lock()
            .unwrap()
            .iter()
            .any(|r| format!("{r:?}").contains("authorize"));
        let has_metrics = collector
            .metrics
            .lock()
            .unwrap()
            .iter()
            .any(|r| format!("{r:?}").contains("keyfence.decisions"));
        if has_authorize_span && has_metrics {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "OTLP export never arrived"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let exported = format!(
        "{:?}{:?}",
        collector.spans.lock().unwrap(),
        collector.metrics.lock().unwrap()
    );
    assert!(exported.contains(&id), "spans carry the key id");
    let log = server.log();
    for secret in [
        created.secret.as_str(),
        created.signing_secret.as_str(),
        signature.as_str(),
        "kf_live_attacker_guess_123",
        "an-admin-token-1234",
    ] {
        assert!(
            !exported.contains(secret),
            "a secret reached OTLP: {secret}"
        );
        assert!(!log.contains(secret), "a secret reached the log: {secret}");
    }
    assert!(log.contains(&id), "the debug log was captured");
}
