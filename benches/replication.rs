//! Replication figures on loopback, release build: how long a change takes to reach every replica
//! (p50/p99 from the admin call's return to the last replica answering the new way), and how long
//! a replica takes to load 100,000 keys with 10 entries each from Redis, with its resident memory
//! after. Run: `cargo bench --bench replication`. Needs `redis-server` (scripts/test installs it).

#[path = "../tests/common/mod.rs"]
mod common;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use common::{Server, authorize_request, create_key, entry, key_scope, redis::RedisServer};
use keyfence::grpc::pb;
use keyfence_policy::model::{
    AllowlistEntry, Audit, Enforcement, KeyId, KeyRecord, KeyStatus, SecretHash, SignatureScheme,
    UnixMillis,
};
use keyfence_store::{
    Store,
    redis::{RedisOptions, RedisStore},
};

const CHANGES: usize = 300;
const KEYS: usize = 100_000;
const ENTRIES_PER_KEY: usize = 10;

fn replica(redis: &RedisServer) -> Server {
    let url = redis.url();
    Server::start(&[
        "--redis-url",
        &url,
        "--redis-namespace",
        "bench",
        "--sync-interval-ms",
        "1000",
    ])
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn propagation() {
    let redis = RedisServer::start();
    let replicas = [replica(&redis), replica(&redis), replica(&redis)];
    let mut admin = replicas[0].admin().await;
    let mut clients = Vec::new();
    for r in &replicas[1..] {
        clients.push(r.authorizer().await);
    }
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let probe = authorize_request(&key.secret, "198.51.100.7");
    let mut delays = Vec::with_capacity(CHANGES);
    for round in 0..CHANGES {
        let want = if round % 2 == 0 {
            admin
                .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    entries: vec![entry("198.51.100.7")],
                })
                .await
                .unwrap();
            pb::Decision::Allow
        } else {
            admin
                .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    cidrs: vec!["198.51.100.7".into()],
                })
                .await
                .unwrap();
            pb::Decision::Deny
        };
        let returned = Instant::now();
        for client in &mut clients {
            let deadline = returned + Duration::from_secs(10);
            loop {
                let answer = client.authorize(probe.clone()).await.unwrap().into_inner();
                if answer.decision() == want {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "change {round} did not propagate within 10 s"
                );
            }
        }
        delays.push(returned.elapsed());
    }
    delays.sort();
    println!(
        "propagation, 3 replicas, {CHANGES} changes: p50 {:?}  p99 {:?}  max {:?}",
        percentile(&delays, 0.50),
        percentile(&delays, 0.99),
        delays.last().unwrap()
    );
}

fn record(i: usize) -> KeyRecord {
    let audit = Audit {
        actor: "bench".into(),
        at: UnixMillis(0),
    };
    KeyRecord {
        id: format!("key_{i:08}").parse::<KeyId>().unwrap(),
        partner_id: format!("partner{}", i % 1000).parse().unwrap(),
        environment: "production".parse().unwrap(),
        name: format!("bench key {i}"),
        display_prefix: "kf_live_bnch".into(),
        secret_hash: SecretHash::of(&format!("kf_live_bench{i:08}")),
        previous_secret: None,
        status: KeyStatus::Active,
        ip_allowlist_enabled: true,
        enforcement: Enforcement::Enforce,
        signature: SignatureScheme::None,
        require_nonce: false,
        rate_limit: None,
        expires_at: None,
        created: audit.clone(),
        updated: audit,
    }
}

fn entries(i: usize) -> Vec<AllowlistEntry> {
    (0..ENTRIES_PER_KEY)
        .map(|j| AllowlistEntry {
            cidr: format!("10.{}.{}.{}/32", (i >> 8) & 0xff, i & 0xff, j)
                .parse()
                .unwrap(),
            description: "bench".into(),
            added: Audit {
                actor: "bench".into(),
                at: UnixMillis(0),
            },
            expires_at: None,
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn full_reload() {
    let redis = RedisServer::start();
    let store = RedisStore::connect(RedisOptions {
        url: redis.url(),
        namespace: "bench".into(),
        change_log_len: 10_000,
        sealer: Some(keyfence_store::sealing::Sealer::ephemeral()),
    })
    .unwrap();
    let filling = Instant::now();
    let mut workers = Vec::new();
    let store: Arc<RedisStore> = store;
    for worker in 0..16 {
        let store = store.clone();
        workers.push(tokio::spawn(async move {
            for i in (worker..KEYS).step_by(16) {
                store.insert_key(record(i), entries(i)).await.unwrap();
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    println!(
        "filled Redis with {KEYS} keys x {ENTRIES_PER_KEY} entries in {:?}",
        filling.elapsed()
    );

    let started = Instant::now();
    let server = replica(&redis);
    let ready = started.elapsed();
    let log = server.log();
    let loaded = log
        .lines()
        .find(|l| l.contains("policy snapshot loaded"))
        .expect("load logged");
    let field = |name: &str| {
        loaded
            .split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .unwrap_or("?")
            .to_owned()
    };
    assert_eq!(field("keys"), KEYS.to_string());
    assert_eq!(field("entries"), (KEYS * ENTRIES_PER_KEY).to_string());
    let mut authz = server.authorizer().await;
    let answer = authz
        .authorize(authorize_request("kf_live_bench00004242", "10.16.146.3"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        answer.decision(),
        pb::Decision::Allow,
        "a loaded key decides"
    );
    println!(
        "full reload from Redis: {KEYS} keys x {ENTRIES_PER_KEY} entries loaded and compiled in {} ms (process start to ready {:?}); replica RSS {} MiB",
        field("elapsed_ms"),
        ready,
        rss_kib(server.pid()) / 1024
    );
}

fn main() {
    // `cargo test --benches` runs bench targets without `--bench`: do nothing then.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        propagation().await;
        full_reload().await;
    });
}
