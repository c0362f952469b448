//! One suite for every access-log store (embedded file, Redis streams): newest first, filters,
//! paging, retention by count and age, last-used times.

mod common;

use std::{sync::Arc, time::Duration};

use keyfence::system::SystemClock;
use keyfence_policy::{
    clock::Clock,
    decision::DenyReason,
    model::{KeyId, UnixMillis},
};
use keyfence_store::{
    access_log::{
        AccessBatch, AccessLogStore, AccessQuery, AccessRecord, Entry, Frontend, KeyIdentity,
        LastUse, Retention, embedded::EmbeddedAccessLog,
    },
    redis::{RedisOptions, RedisStore},
};

fn entry(at: UnixMillis, ip: &str, allowed: bool) -> Entry {
    Entry {
        at,
        frontend: Frontend::Authorize,
        client_ip: Some(ip.parse().unwrap()),
        allowed,
        would_deny: false,
        reason: (!allowed).then_some(DenyReason::IpNotAllowed),
        endpoint: Some(("GET".into(), "/v1/x".into())),
        matched: allowed.then(|| ("10.0.0.0".parse().unwrap(), 8)),
    }
}

/// One key's entries, given oldest first, as a batch (newest first).
fn batch(key: &str, mut entries: Vec<Entry>) -> AccessBatch {
    entries.reverse();
    let identity = KeyIdentity {
        key_id: key.parse().unwrap(),
        partner_id: "acme".parse().unwrap(),
        environment: "production".parse().unwrap(),
    };
    AccessBatch {
        keys: vec![(identity, entries)],
    }
}

fn ip(record: &AccessRecord) -> String {
    record
        .entry
        .client_ip
        .map(|ip| ip.to_string())
        .unwrap_or_default()
}

fn query(key: &str) -> AccessQuery {
    AccessQuery {
        key_id: key.parse().unwrap(),
        limit: 100,
        blocked_only: false,
        since: None,
        until: None,
        page_token: None,
    }
}

const KEEP_ALL: Retention = Retention {
    max_records_per_key: 1000,
    max_age: Duration::from_secs(3600),
};

async fn newest_first_filters_and_paging(log: Arc<dyn AccessLogStore>) {
    let now = SystemClock.now();
    let entries: Vec<Entry> = (0..10)
        .map(|i| {
            entry(
                UnixMillis(now.0 - 10_000 + i * 1000),
                &format!("10.0.0.{i}"),
                i % 3 != 0,
            )
        })
        .collect();
    log.append(batch("key_a", entries), KEEP_ALL).await.unwrap();
    log.append(
        batch("key_b", vec![entry(now, "192.0.2.1", true)]),
        KEEP_ALL,
    )
    .await
    .unwrap();

    let all = log.list(&query("key_a")).await.unwrap();
    let ips: Vec<String> = all.records.iter().map(ip).collect();
    assert_eq!(
        ips,
        [
            "10.0.0.9", "10.0.0.8", "10.0.0.7", "10.0.0.6", "10.0.0.5", "10.0.0.4", "10.0.0.3",
            "10.0.0.2", "10.0.0.1", "10.0.0.0"
        ]
    );
    assert!(all.next_page_token.is_none());
    assert_eq!(all.records[0].key.partner_id.as_str(), "acme");
    assert_eq!(all.records[0].entry.reason, Some(DenyReason::IpNotAllowed));
    assert_eq!(
        all.records[1].entry.matched_cidr().unwrap().to_string(),
        "10.0.0.0/8"
    );

    let blocked = log
        .list(&AccessQuery {
            blocked_only: true,
            ..query("key_a")
        })
        .await
        .unwrap();
    let ips: Vec<String> = blocked.records.iter().map(ip).collect();
    assert_eq!(ips, ["10.0.0.9", "10.0.0.6", "10.0.0.3", "10.0.0.0"]);

    let window = AccessQuery {
        since: Some(UnixMillis(now.0 - 8_000)),
        until: Some(UnixMillis(now.0 - 5_000)),
        ..query("key_a")
    };
    let ips: Vec<String> = log
        .list(&window)
        .await
        .unwrap()
        .records
        .iter()
        .map(ip)
        .collect();
    assert_eq!(ips, ["10.0.0.5", "10.0.0.4", "10.0.0.3", "10.0.0.2"]);

    let mut token = None;
    let mut walked = Vec::new();
    loop {
        let page = log
            .list(&AccessQuery {
                limit: 3,
                page_token: token,
                blocked_only: true,
                ..query("key_a")
            })
            .await
            .unwrap();
        walked.extend(page.records.iter().map(ip));
        match page.next_page_token {
            Some(next) => token = Some(next),
            None => break,
        }
    }
    assert_eq!(walked, ["10.0.0.9", "10.0.0.6", "10.0.0.3", "10.0.0.0"]);
    assert!(
        log.list(&AccessQuery {
            page_token: Some("garbage".into()),
            ..query("key_a")
        })
        .await
        .is_err()
    );
    assert_eq!(log.list(&query("key_b")).await.unwrap().records.len(), 1);
    assert!(log.list(&query("key_c")).await.unwrap().records.is_empty());
}

async fn retention_by_count_and_age(log: Arc<dyn AccessLogStore>) {
    let now = SystemClock.now();
    let retention = Retention {
        max_records_per_key: 5,
        max_age: Duration::from_secs(60),
    };
    // Two hours old: beyond the age limit.
    log.append(
        batch(
            "key_a",
            vec![entry(UnixMillis(now.0 - 7_200_000), "10.9.9.9", false)],
        ),
        retention,
    )
    .await
    .unwrap();
    for round in 0..4 {
        let entries = (0..5)
            .map(|i| {
                entry(
                    UnixMillis(now.0 - 1000 + round * 5 + i),
                    &format!("10.0.{round}.{i}"),
                    true,
                )
            })
            .collect();
        log.append(batch("key_a", entries), retention)
            .await
            .unwrap();
    }
    let kept = log.list(&query("key_a")).await.unwrap().records;
    // Redis trims approximately (MAXLEN ~), in whole nodes; the embedded store exactly.
    assert!(kept.len() >= 5, "{}", kept.len());
    assert_eq!(ip(&kept[0]), "10.0.3.4", "newest kept");
    assert!(
        !kept.iter().any(|r| ip(r) == "10.9.9.9"),
        "the old record was trimmed by age"
    );
}

async fn last_used_round_trip(log: Arc<dyn AccessLogStore>) {
    let a: KeyId = "key_a".parse().unwrap();
    let b: KeyId = "key_b".parse().unwrap();
    log.record_last_used(vec![(
        a.clone(),
        LastUse {
            at: UnixMillis(2_000),
            client_ip: "10.0.0.2".into(),
        },
    )])
    .await
    .unwrap();
    let found = log.last_used(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(found[0].as_ref().unwrap().client_ip, "10.0.0.2");
    assert!(found[1].is_none());
    assert!(log.last_used(&[]).await.unwrap().is_empty());
}

macro_rules! suite {
    ($name:ident, $make:expr) => {
        mod $name {
            use super::*;
            #[tokio::test]
            async fn newest_first_filters_and_paging() {
                let (log, _guard) = $make;
                super::newest_first_filters_and_paging(log).await
            }
            #[tokio::test]
            async fn retention_by_count_and_age() {
                let (log, _guard) = $make;
                super::retention_by_count_and_age(log).await
            }
            #[tokio::test]
            async fn last_used_round_trip() {
                let (log, _guard) = $make;
                super::last_used_round_trip(log).await
            }
        }
    };
}

fn embedded() -> (Arc<dyn AccessLogStore>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    (Arc::new(EmbeddedAccessLog::open(dir.path()).unwrap()), dir)
}

fn redis() -> (Arc<dyn AccessLogStore>, common::redis::RedisServer) {
    let server = common::redis::RedisServer::start();
    let store = RedisStore::connect(RedisOptions {
        url: server.url(),
        namespace: "access".into(),
        change_log_len: 100,
        sealer: Some(keyfence_store::sealing::Sealer::ephemeral()),
    })
    .unwrap();
    (store, server)
}

suite!(embedded_log, embedded());
suite!(redis_log, redis());

#[tokio::test]
async fn embedded_count_retention_is_exact() {
    let (log, _dir) = embedded();
    let retention = Retention {
        max_records_per_key: 5,
        max_age: Duration::from_secs(60),
    };
    let now = SystemClock.now();
    log.append(
        batch(
            "key_a",
            (0..12)
                .map(|i| entry(UnixMillis(now.0 + i), &format!("10.0.0.{i}"), true))
                .collect(),
        ),
        retention,
    )
    .await
    .unwrap();
    let kept = log.list(&query("key_a")).await.unwrap().records;
    assert_eq!(kept.len(), 5, "the oldest block was cut to fit");
    assert_eq!(ip(&kept[0]), "10.0.0.11");
    assert_eq!(ip(&kept[4]), "10.0.0.7");
}

#[tokio::test]
async fn replicas_share_one_access_log_through_redis() {
    let redis = common::redis::RedisServer::start();
    let url = redis.url();
    let args = ["--redis-url", url.as_str(), "--redis-namespace", "shared"];
    let (a, b) = (common::Server::start(&args), common::Server::start(&args));
    let mut admin_a = a.admin().await;
    let key = common::create_key(&mut admin_a, "acme", "production", &["203.0.113.0/24"]).await;
    let id = key.key.unwrap().id;
    let mut authz_a = a.authorizer().await;
    let mut request = common::authorize_request(&key.secret, "198.51.100.4");
    request.min_revision = key.revision;
    common::decide(&mut authz_a, request).await;
    let mut admin_b = b.admin().await;
    let started = std::time::Instant::now();
    loop {
        let entries = admin_b
            .list_access_logs(keyfence::grpc::pb::ListAccessLogsRequest {
                key_id: id.clone(),
                blocked_only: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .entries;
        if entries.len() == 1 {
            assert_eq!(entries[0].client_ip, "198.51.100.4");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "replica B never saw replica A's record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
