//! Several keyfence replicas on one Redis: propagation, outages, lost notifications, concurrent
//! writers, shared nonces and read-your-writes. Each test starts its own `redis-server` and
//! replicas on free loopback ports.

mod common;

use std::time::{Duration, Instant};

use common::{redis::RedisServer, *};
use keyfence::grpc::pb::{self, DenyReason};
use keyfence_policy::signature::sign_hmac;
use tonic::Code;

fn replica(redis: &RedisServer, extra: &[&str]) -> Server {
    let url = redis.url();
    // Every replica of one Redis shares one secrets key file, as deployed.
    let key_file = shared_secrets_key_file(redis.dir());
    let key_file = key_file.to_str().expect("a UTF-8 temp path");
    let mut args = vec!["--redis-url", url.as_str(), "--redis-namespace", "test"];
    args.extend(["--secrets-key-file", key_file]);
    if !extra.contains(&"--sync-interval-ms") {
        args.extend(["--sync-interval-ms", "200"]);
    }
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Polls `authorize` until it answers `expected`, or panics after `within`.
async fn eventually(
    authz: &mut pb::authorizer_client::AuthorizerClient<tonic::transport::Channel>,
    request: &pb::AuthorizeRequest,
    expected: (pb::Decision, DenyReason),
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(response) = authz.authorize(request.clone()).await {
            let response = response.into_inner();
            if (response.decision(), response.reason()) == expected {
                return started.elapsed();
            }
        }
        assert!(
            started.elapsed() < within,
            "no {expected:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

const SOON: Duration = Duration::from_secs(5);

#[tokio::test]
async fn changes_through_one_replica_reach_every_replica() {
    let redis = RedisServer::start();
    let (a, b, c) = (
        replica(&redis, &[]),
        replica(&redis, &[]),
        replica(&redis, &[]),
    );
    let mut admin_a = a.admin().await;
    let (mut authz_b, mut authz_c) = (b.authorizer().await, c.authorizer().await);

    let key = create_key(
        &mut admin_a,
        "acme",
        "production",
        &["203.0.113.0/24", "198.51.100.7"],
    )
    .await;
    let id = key.key.as_ref().unwrap().id.clone();
    let listed = authorize_request(&key.secret, "198.51.100.7");
    eventually(&mut authz_b, &listed, ALLOW, SOON).await;
    eventually(&mut authz_c, &listed, ALLOW, SOON).await;

    let mut delays = Vec::new();
    for round in 0..20 {
        let started = Instant::now();
        let expected = if round % 2 == 0 {
            admin_a
                .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    cidrs: vec!["198.51.100.7".into()],
                })
                .await
                .unwrap();
            denied(DenyReason::IpNotAllowed)
        } else {
            admin_a
                .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    entries: vec![entry("198.51.100.7")],
                })
                .await
                .unwrap();
            ALLOW
        };
        eventually(&mut authz_b, &listed, expected, SOON).await;
        eventually(&mut authz_c, &listed, expected, SOON).await;
        delays.push(started.elapsed());
    }
    delays.sort();
    println!(
        "propagation over {} changes: p50 {:?}, max {:?}",
        delays.len(),
        delays[delays.len() / 2],
        delays.last().unwrap()
    );

    admin_a
        .revoke_key(pb::RevokeKeyRequest { key_id: id })
        .await
        .unwrap();
    let other = authorize_request(&key.secret, "203.0.113.9");
    for authz in [&mut authz_b, &mut authz_c] {
        eventually(authz, &other, denied(DenyReason::KeyRevoked), SOON).await;
    }
    let mut authz_a = a.authorizer().await;
    assert_eq!(
        decide(&mut authz_a, other).await,
        denied(DenyReason::KeyRevoked)
    );
}

#[tokio::test]
async fn redis_outage_fails_no_authorize_call_and_replicas_converge_after() {
    let mut redis = RedisServer::start();
    let replicas = [
        replica(&redis, &[]),
        replica(&redis, &[]),
        replica(&redis, &[]),
    ];
    let mut admin = replicas[0].admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    for r in &replicas {
        eventually(
            &mut r.authorizer().await,
            &authorize_request(&key.secret, "203.0.113.1"),
            ALLOW,
            SOON,
        )
        .await;
    }

    // A load of Authorize calls on every replica while Redis dies and comes back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for r in &replicas {
        let mut authz = r.authorizer().await;
        let secret = key.secret.clone();
        let stop = stop.clone();
        load.push(tokio::spawn(async move {
            let (mut calls, mut failures, mut wrong) = (0u64, 0u64, 0u64);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                calls += 1;
                match authz
                    .authorize(authorize_request(&secret, "203.0.113.1"))
                    .await
                {
                    Ok(response) if response.get_ref().decision() == pb::Decision::Allow => {}
                    Ok(_) => wrong += 1,
                    Err(_) => failures += 1,
                }
            }
            (calls, failures, wrong)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Admin writes fail fast while Redis is down.
    let started = Instant::now();
    let status = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: partner_scope("acme", "production"),
            entries: vec![entry("192.0.2.0/24")],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed fast: {:?}",
        started.elapsed()
    );
    // Health stays SERVING: the snapshot is still good.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Server::channel(replicas[1].data_addr).await,
    );
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "keyfence.v1.Authorizer".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    redis.restart();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for task in load {
        let (calls, failures, wrong) = task.await.unwrap();
        assert_eq!((failures, wrong), (0, 0), "{calls} calls");
        total += calls;
    }
    assert!(total > 100, "the load ran ({total} calls)");

    // After Redis is back, a change made through one replica reaches all of them.
    let started = Instant::now();
    loop {
        match admin
            .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                scope: partner_scope("acme", "production"),
                entries: vec![entry("192.0.2.0/24")],
            })
            .await
        {
            Ok(_) => break,
            Err(status) if status.code() == Code::Unavailable && started.elapsed() < SOON => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(status) => panic!("write after restart failed: {status:?}"),
        }
    }
    for r in &replicas {
        eventually(
            &mut r.authorizer().await,
            &authorize_request(&key.secret, "192.0.2.1"),
            ALLOW,
            SOON,
        )
        .await;
    }
}

#[tokio::test]
async fn a_replica_whose_subscription_drops_catches_up_without_restart() {
    let redis = RedisServer::start();
    let a = replica(&redis, &[]);
    // B checks the change log only every minute: it must notice the lost subscription by itself.
    let b = replica(&redis, &["--sync-interval-ms", "60000"]);
    let mut admin = a.admin().await;
    let mut authz_b = b.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let request = authorize_request(&key.secret, "192.0.2.0");
    eventually(
        &mut authz_b,
        &request,
        denied(DenyReason::IpNotAllowed),
        SOON,
    )
    .await;

    let killed = redis.command("CLIENT KILL TYPE pubsub").unwrap();
    assert!(
        killed.starts_with(':') && !killed.starts_with(":0"),
        "killed some subscriptions: {killed}"
    );
    for i in 0..10 {
        admin
            .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                scope: key_scope(&id),
                entries: vec![entry(&format!("192.0.2.{i}"))],
            })
            .await
            .unwrap();
    }
    eventually(&mut authz_b, &request, ALLOW, SOON).await;
    eventually(
        &mut authz_b,
        &authorize_request(&key.secret, "192.0.2.9"),
        ALLOW,
        SOON,
    )
    .await;
    let log = b.log();
    assert!(
        log.contains("policy change subscription lost; resubscribing"),
        "B noticed: {log}"
    );
}

#[tokio::test]
async fn concurrent_writers_on_one_scope_lose_nothing() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis, &[]), replica(&redis, &[]));
    let mut tasks = Vec::new();
    for (side, server) in [(0u8, &a), (1u8, &b)] {
        for i in 0..25u8 {
            let mut admin = server.admin().await;
            tasks.push(tokio::spawn(async move {
                admin
                    .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                        scope: partner_scope("acme", "production"),
                        entries: vec![entry(&format!("10.{side}.{i}.0/24"))],
                    })
                    .await
                    .map(|r| r.into_inner().revision)
            }));
        }
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.push(task.await.unwrap().expect("every concurrent add succeeds"));
    }
    revisions.sort();
    revisions.dedup();
    assert_eq!(revisions.len(), 50, "each add got its own revision");
    let mut admin = b.admin().await;
    let list = admin
        .get_allowlist(pb::GetAllowlistRequest {
            scope: partner_scope("acme", "production"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries.len(), 50);
}

#[tokio::test]
async fn a_replayed_nonce_is_denied_by_another_replica_and_fails_closed_without_redis() {
    let mut redis = RedisServer::start();
    let (a, b) = (replica(&redis, &[]), replica(&redis, &[]));
    let tolerant = replica(&redis, &["--nonce-fallback-local", "true"]);
    let mut admin = a.admin().await;
    let key = admin
        .create_key(hmac_key_request("signed", &[]))
        .await
        .unwrap()
        .into_inner();
    let secret = signing_secret(&key);
    let signed = |nonce: &str| {
        let now = now_secs();
        pb::AuthorizeRequest {
            api_key: key.secret.clone(),
            client_ip: "203.0.113.1".into(),
            signature: Some(pb::SignatureInput {
                signature: sign_hmac(&secret, now, nonce, "GET", "/", b""),
                timestamp: now,
                nonce: nonce.into(),
                method: "GET".into(),
                path: "/".into(),
                body: vec![],
            }),
            min_revision: key.revision,
        }
    };
    let request = signed("once-only");
    let (mut authz_a, mut authz_b) = (a.authorizer().await, b.authorizer().await);
    assert_eq!(decide(&mut authz_a, request.clone()).await, ALLOW);
    assert_eq!(
        decide(&mut authz_b, request.clone()).await,
        denied(DenyReason::NonceReused)
    );
    let mut authz_t = tolerant.authorizer().await;
    assert_eq!(
        decide(&mut authz_t, request).await,
        denied(DenyReason::NonceReused)
    );

    redis.kill();
    let status = authz_b
        .authorize(signed("during-outage"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "fail closed: {status:?}");
    let fallback = signed("during-outage-2");
    assert_eq!(
        decide(&mut authz_t, fallback.clone()).await,
        ALLOW,
        "the documented per-replica fallback"
    );
    assert_eq!(
        decide(&mut authz_t, fallback).await,
        denied(DenyReason::NonceReused)
    );
}

#[tokio::test]
async fn min_revision_never_reads_an_older_snapshot_on_another_replica() {
    let redis = RedisServer::start();
    let (a, b) = (replica(&redis, &[]), replica(&redis, &[]));
    let mut admin = a.admin().await;
    let mut authz_b = b.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let mut stale = 0;
    for round in 0..2000u32 {
        let ip = format!(
            "10.{}.{}.{}",
            round / 65536 % 256,
            round / 256 % 256,
            round % 256
        );
        let (revision, expected) = if round % 2 == 0 {
            let r = admin
                .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    entries: vec![entry(&ip)],
                })
                .await
                .unwrap()
                .into_inner();
            (r.revision, pb::Decision::Allow)
        } else {
            let previous = format!(
                "10.{}.{}.{}",
                (round - 1) / 65536 % 256,
                (round - 1) / 256 % 256,
                (round - 1) % 256
            );
            let r = admin
                .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
                    scope: key_scope(&id),
                    cidrs: vec![previous.clone()],
                })
                .await
                .unwrap()
                .into_inner();
            (r.revision, pb::Decision::Deny)
        };
        let probe = if round % 2 == 0 {
            ip
        } else {
            format!(
                "10.{}.{}.{}",
                (round - 1) / 65536 % 256,
                (round - 1) / 256 % 256,
                (round - 1) % 256
            )
        };
        let mut request = authorize_request(&key.secret, &probe);
        request.min_revision = revision;
        let response = authz_b
            .authorize(request)
            .await
            .expect("answered within the wait bound")
            .into_inner();
        assert!(response.policy_revision >= revision);
        if response.decision() != expected {
            stale += 1;
        }
    }
    assert_eq!(stale, 0, "answers from an older state");
}

#[tokio::test]
async fn a_replica_started_without_redis_waits_for_its_first_load() {
    let mut redis = RedisServer::start();
    let writer = replica(&redis, &[]);
    let mut admin = writer.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    drop(writer);
    redis.kill();

    let late = replica(&redis, &[]);
    let mut authz = late.authorizer().await;
    let status = authz
        .authorize(authorize_request(&key.secret, "203.0.113.1"))
        .await
        .unwrap_err();
    assert_eq!(
        status.code(),
        Code::Unavailable,
        "no guess before the first load"
    );
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(Server::channel(late.data_addr).await);
    let check = || tonic_health::pb::HealthCheckRequest {
        service: "keyfence.v1.Authorizer".into(),
    };
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(
        health.check(check()).await.unwrap().into_inner().status(),
        ServingStatus::NotServing
    );

    redis.restart();
    eventually(
        &mut authz,
        &authorize_request(&key.secret, "203.0.113.1"),
        ALLOW,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(
        health.check(check()).await.unwrap().into_inner().status(),
        ServingStatus::Serving
    );
}

#[tokio::test]
async fn max_staleness_stops_allowing_until_redis_confirms_again() {
    let mut redis = RedisServer::start();
    let strict = replica(&redis, &["--max-staleness-ms", "1000"]);
    let relaxed = replica(&redis, &[]);
    let mut admin = strict.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let request = authorize_request(&key.secret, "203.0.113.1");
    let (mut strict_authz, mut relaxed_authz) =
        (strict.authorizer().await, relaxed.authorizer().await);
    eventually(&mut relaxed_authz, &request, ALLOW, SOON).await;
    assert_eq!(decide(&mut strict_authz, request.clone()).await, ALLOW);

    redis.kill();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let status = strict_authz.authorize(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("max_staleness"),
        "{}",
        status.message()
    );
    assert_eq!(
        decide(&mut relaxed_authz, request.clone()).await,
        ALLOW,
        "off by default: availability"
    );

    redis.restart();
    eventually(&mut strict_authz, &request, ALLOW, Duration::from_secs(10)).await;
}
