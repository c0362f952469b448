//! One suite for every access-log store (embedded file, Redis streams): newest first, filters,
//! paging, retention by count and age, last-used times.

mod common;

use std::{sync::Arc, time::Duration};

use keyfence::{
    access::{
        AccessLogStore, AccessQuery, AccessRecord, Frontend, LastUse, Retention,
        embedded::EmbeddedAccessLog,
    },
    policy::model::{KeyId, UnixMillis},
    store::redis::{RedisOptions, RedisStore},
};

fn record(key: &str, at: UnixMillis, ip: &str, allowed: bool) -> AccessRecord {
    AccessRecord {
        at,
        frontend: Frontend::Authorize,
        key_id: Some(key.parse().unwrap()),
        partner_id: Some("acme".parse().unwrap()),
        environment: Some("production".parse().unwrap()),
        client_ip: ip.into(),
        allowed,
        reason: (!allowed).then(|| "ip_not_allowed".into()),
        would_deny: false,
        method: Some("GET".into()),
        path: Some("/v1/x".into()),
        matched_cidr: None,
    }
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
    let now = UnixMillis::now();
    let records: Vec<AccessRecord> = (0..10)
        .map(|i| {
            record(
                "key_a",
                UnixMillis(now.0 - 10_000 + i * 1000),
                &format!("10.0.0.{i}"),
                i % 3 != 0,
            )
        })
        .collect();
    log.append(records, KEEP_ALL).await.unwrap();
    log.append(vec![record("key_b", now, "192.0.2.1", true)], KEEP_ALL)
        .await
        .unwrap();

    let all = log.list(&query("key_a")).await.unwrap();
    let ips: Vec<&str> = all.records.iter().map(|r| r.client_ip.as_str()).collect();
    assert_eq!(
        ips,
        [
            "10.0.0.9", "10.0.0.8", "10.0.0.7", "10.0.0.6", "10.0.0.5", "10.0.0.4", "10.0.0.3",
            "10.0.0.2", "10.0.0.1", "10.0.0.0"
        ]
    );
    assert!(all.next_page_token.is_none());

    let blocked = log
        .list(&AccessQuery {
            blocked_only: true,
            ..query("key_a")
        })
        .await
        .unwrap();
    let ips: Vec<&str> = blocked
        .records
        .iter()
        .map(|r| r.client_ip.as_str())
        .collect();
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
        .into_iter()
        .map(|r| r.client_ip)
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
        walked.extend(page.records.into_iter().map(|r| r.client_ip));
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
    let now = UnixMillis::now();
    let retention = Retention {
        max_records_per_key: 5,
        max_age: Duration::from_secs(60),
    };
    // Two hours old: beyond the age limit.
    log.append(
        vec![record(
            "key_a",
            UnixMillis(now.0 - 7_200_000),
            "10.9.9.9",
            false,
        )],
        retention,
    )
    .await
    .unwrap();
    for batch in 0..4 {
        let records = (0..5)
            .map(|i| {
                record(
                    "key_a",
                    UnixMillis(now.0 - 1000 + batch * 5 + i),
                    &format!("10.0.{batch}.{i}"),
                    true,
                )
            })
            .collect();
        log.append(records, retention).await.unwrap();
    }
    let kept = log.list(&query("key_a")).await.unwrap().records;
    // Redis trims approximately (MAXLEN ~), in whole nodes; the embedded store exactly.
    assert!(kept.len() >= 5, "{}", kept.len());
    assert_eq!(kept[0].client_ip, "10.0.3.4", "newest kept");
    assert!(
        !kept.iter().any(|r| r.client_ip == "10.9.9.9"),
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
    let now = UnixMillis::now();
    log.append(
        (0..12)
            .map(|i| record("key_a", UnixMillis(now.0 + i), &format!("10.0.0.{i}"), true))
            .collect(),
        retention,
    )
    .await
    .unwrap();
    assert_eq!(log.list(&query("key_a")).await.unwrap().records.len(), 5);
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
