//! The security review of issue 10, item by item, against the real binary: hostile input, replays
//! and store integrity. Each test reproduces what the review found and fails without its fix.

mod common;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;
use keyfence::grpc::pb::{self, DenyReason};
use keyfence_policy::signature::sign_hmac;
use tonic::Code;

/// A signed Authorize request for `POST /v1/payments`.
fn signed_request(
    api_key: &str,
    secret: &[u8],
    nonce: &str,
    method: &str,
    path: &str,
) -> pb::AuthorizeRequest {
    let now = now_secs();
    pb::AuthorizeRequest {
        api_key: api_key.into(),
        client_ip: "203.0.113.1".into(),
        signature: Some(pb::SignatureInput {
            signature: sign_hmac(secret, now, nonce, method, path, b"{}"),
            timestamp: now,
            nonce: nonce.into(),
            method: method.into(),
            path: path.into(),
            body: b"{}".to_vec(),
        }),
        min_revision: 0,
    }
}

/// Item 1: 40 denied calls with a 4 MB path grew `access.redb` by hundreds of MB, and `keyfence
/// logs` then failed. Oversized fields are now INVALID_ARGUMENT before any decision or record.
#[tokio::test]
async fn oversized_request_fields_are_refused_and_never_reach_the_access_log() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let key_id = key.key.as_ref().unwrap().id.clone();
    let blocked = |signature: pb::SignatureInput| pb::AuthorizeRequest {
        api_key: key.secret.clone(),
        client_ip: "8.8.8.8".into(),
        signature: Some(signature),
        min_revision: 0,
    };
    let input = |method: &str, path: String, nonce: &str, signature: String| pb::SignatureInput {
        signature,
        timestamp: now_secs(),
        nonce: nonce.into(),
        method: method.into(),
        path,
        body: vec![],
    };
    let huge_path = format!("/{}", "a".repeat(1 << 20));
    let cases = [
        (
            "signature.path",
            input("GET", huge_path.clone(), "", "c2ln".into()),
        ),
        (
            "signature.method",
            input(&"M".repeat(33), "/".into(), "", "c2ln".into()),
        ),
        (
            "signature.nonce",
            input("GET", "/".into(), &"n".repeat(129), "c2ln".into()),
        ),
        (
            "signature.signature",
            input("GET", "/".into(), "", "s".repeat(513)),
        ),
    ];
    for (field, signature) in cases {
        for _ in 0..10 {
            let status = authz
                .authorize(blocked(signature.clone()))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{field}: {status:?}");
            assert!(status.message().starts_with(field), "{}", status.message());
            assert!(
                status.message().len() < 200,
                "the error does not echo the input"
            );
        }
    }
    // The largest accepted path is decided (and recorded) as usual.
    let longest = format!("/{}", "b".repeat(8 * 1024 - 1));
    let (decision, reason) = decide(
        &mut authz,
        blocked(input("GET", longest, "", "c2ln".into())),
    )
    .await;
    assert_eq!(
        (decision, reason),
        denied(DenyReason::IpNotAllowed),
        "a bounded request is still decided"
    );
    // The log holds that one denial, and reads back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let entries = loop {
        let page = admin
            .list_access_logs(pb::ListAccessLogsRequest {
                key_id: key_id.clone(),
                limit: 1000,
                ..Default::default()
            })
            .await
            .expect("the log reads back")
            .into_inner();
        if !page.entries.is_empty() || Instant::now() > deadline {
            break page.entries;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(entries.len(), 1, "only the decided request was recorded");
    let size = std::fs::metadata(server.data_dir.join("data/access.redb"))
        .unwrap()
        .len();
    assert!(size < 8 << 20, "access.redb is {size} bytes");
}

/// Item 3: with newlines inside nonce, method and path one HMAC signature was accepted under two
/// different (nonce, method, path) triples.
#[tokio::test]
async fn one_signature_cannot_be_read_as_two_requests() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = admin
        .create_key(hmac_key_request("signer", &[]))
        .await
        .unwrap()
        .into_inner();
    let secret = signing_secret(&key);
    // Both canonicalise to "ts\nn\nGET\nPOST\n/x\n<body hash>".
    let first = signed_request(&key.secret, &secret, "n\nGET", "POST", "/x");
    let mut second = first.clone();
    let input = second.signature.as_mut().unwrap();
    (input.nonce, input.method, input.path) = ("n".into(), "GET".into(), "POST\n/x".into());
    for (request, field) in [(first, "signature.nonce"), (second, "signature.path")] {
        let status = authz.authorize(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert_eq!(
            status.message(),
            format!("{field}: contains control characters")
        );
    }
    // The method must be an HTTP token.
    for method in ["GET POST", "GET\r", "G/T", "GÉT"] {
        let request = signed_request(&key.secret, &secret, "n-1", method, "/x");
        let status = authz.authorize(request).await.unwrap_err();
        assert_eq!(
            status.message(),
            "signature.method: is not an HTTP method token",
            "{method:?}"
        );
    }
    // A clean request still passes.
    let clean = signed_request(&key.secret, &secret, "n-2", "PATCH", "/v1/x?a=b%0A");
    assert_eq!(decide(&mut authz, clean).await, ALLOW);
}

/// Item 4: a CreateKey with entries and `ip_allowlist_enabled` left out made a key 8.8.8.8 could
/// use. Absent now means enabled.
#[tokio::test]
async fn a_key_created_with_entries_and_no_allowlist_flag_is_restricted() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let create = |enabled: Option<bool>| pb::CreateKeyRequest {
        partner_id: "acme".into(),
        environment: "production".into(),
        name: "looks restricted".into(),
        ip_allowlist_enabled: enabled,
        allowlist: vec![entry("203.0.113.0/24")],
        ..Default::default()
    };
    let left_out = admin.create_key(create(None)).await.unwrap().into_inner();
    assert!(left_out.key.as_ref().unwrap().ip_allowlist_enabled);
    assert_eq!(
        decide(&mut authz, authorize_request(&left_out.secret, "8.8.8.8")).await,
        denied(DenyReason::IpNotAllowed)
    );
    assert_eq!(
        decide(
            &mut authz,
            authorize_request(&left_out.secret, "203.0.113.9")
        )
        .await,
        ALLOW
    );
    // Only an explicit false makes an open key.
    let open = admin
        .create_key(create(Some(false)))
        .await
        .unwrap()
        .into_inner();
    assert!(!open.key.as_ref().unwrap().ip_allowlist_enabled);
    assert_eq!(
        decide(&mut authz, authorize_request(&open.secret, "8.8.8.8")).await,
        ALLOW
    );
}

/// Item 9: errors echoed the whole bad input (a 1 MB grpc-message).
#[tokio::test]
async fn errors_quote_a_short_prefix_of_bad_input() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let id = key.key.unwrap().id;
    for bad in [
        format!("10.0.0.{}", "1".repeat(1 << 20)),
        format!("10.0.0.0/{}", "1".repeat(1 << 20)),
    ] {
        let status = admin
            .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
                scope: key_scope(&id),
                entries: vec![entry(&bad)],
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        let message = status.message();
        assert!(
            message.starts_with("entries[0].cidr: \"10.0.0."),
            "{message}"
        );
        assert!(
            message.len() < 300,
            "{} bytes: {message:.300}",
            message.len()
        );
        assert!(
            message.contains(&format!("({} bytes)", bad.len())),
            "{message}"
        );
    }
}

/// Item 10: Ed25519 public keys of small order were accepted, making keys that can never verify.
#[tokio::test]
async fn weak_ed25519_public_keys_are_refused() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let create = |public_key: Vec<u8>| pb::CreateKeyRequest {
        partner_id: "acme".into(),
        environment: "production".into(),
        name: "ed25519".into(),
        signature_scheme: pb::SignatureScheme::Ed25519 as i32,
        public_key,
        ..Default::default()
    };
    let mut identity = vec![0u8; 32];
    identity[0] = 1;
    // The identity (order 1) and a point of order 4 (y = 0).
    for weak in [identity, vec![0u8; 32]] {
        let status = admin.create_key(create(weak.clone())).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{weak:?}");
        assert_eq!(
            status.message(),
            "public_key: is a weak Ed25519 public key (a point of small order)"
        );
    }
    let strong = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32])
        .verifying_key()
        .to_bytes()
        .to_vec();
    admin.create_key(create(strong)).await.expect("a real key");
}

/// Item 2: a nonce was optional, so a request signed without one could be replayed for the whole
/// window, and a deployment could not require them.
#[tokio::test]
async fn a_key_that_requires_a_nonce_denies_a_request_without_one() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let mut request = hmac_key_request("strict", &[]);
    request.require_nonce = true;
    let key = admin.create_key(request).await.unwrap().into_inner();
    assert!(key.key.as_ref().unwrap().require_nonce);
    let secret = signing_secret(&key);
    let bare = signed_request(&key.secret, &secret, "", "POST", "/v1/payments");
    assert_eq!(
        decide(&mut authz, bare.clone()).await,
        denied(DenyReason::NonceMissing)
    );
    let with = signed_request(&key.secret, &secret, "n-1", "POST", "/v1/payments");
    assert_eq!(decide(&mut authz, with).await, ALLOW);
    // UpdateKey turns it off (and only what it names).
    let id = key.key.as_ref().unwrap().id.clone();
    let updated = admin
        .update_key(pb::UpdateKeyRequest {
            key_id: id,
            require_nonce: Some(false),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!updated.key.unwrap().require_nonce);
    let replayable = signed_request(&key.secret, &secret, "", "POST", "/v1/payments");
    let mut replayable = replayable;
    replayable.min_revision = updated.revision;
    assert_eq!(decide(&mut authz, replayable).await, ALLOW);
}

/// Item 2: `--require-nonce` makes every signing key require one.
#[tokio::test]
async fn the_server_can_require_a_nonce_from_every_signing_key() {
    let server = Server::start(&["--require-nonce"]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = admin
        .create_key(hmac_key_request("lenient", &[]))
        .await
        .unwrap()
        .into_inner();
    assert!(!key.key.as_ref().unwrap().require_nonce);
    let secret = signing_secret(&key);
    let bare = signed_request(&key.secret, &secret, "", "POST", "/v1/payments");
    assert_eq!(
        decide(&mut authz, bare).await,
        denied(DenyReason::NonceMissing)
    );
    let with = signed_request(&key.secret, &secret, "n-1", "POST", "/v1/payments");
    assert_eq!(decide(&mut authz, with).await, ALLOW);
}

/// Starts `keyfence serve` with `args` and expects it to refuse: it must exit (not serve) within
/// a few seconds, and fail. Returns what it wrote to stderr.
fn refused_start(data_dir: &std::path::Path, args: &[&str]) -> String {
    let mut child = Command::new(BIN)
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start keyfence");
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("keyfence started with {args:?} instead of refusing");
        }
        #[allow(
            clippy::disallowed_methods,
            reason = "waits for a child process, before or outside any task"
        )]
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(1),
        "a clean refusal, not a panic: {stderr}"
    );
    stderr
}

/// Item 5: `--trusted-proxies 0.0.0.0/0` let any client choose its own address through
/// X-Forwarded-For, and was accepted silently.
#[test]
fn a_wide_trusted_proxy_network_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for wide in ["0.0.0.0/0", "::/0", "0.0.0.0/1"] {
        let stderr = refused_start(&dir.path().join("data"), &["--trusted-proxies", wide]);
        assert!(stderr.contains("trusted_proxies: "), "{stderr}");
        assert!(
            stderr.contains("--trusted-proxies-allow-wide")
                || stderr.contains("trusted_proxies_allow_wide"),
            "{stderr}"
        );
    }
}

/// Item 5: with `--trusted-proxies-allow-wide` a wide network is taken as meant.
#[test]
fn a_wide_trusted_proxy_network_starts_when_explicitly_allowed() {
    let _server = Server::start(&[
        "--trusted-proxies",
        "0.0.0.0/0",
        "--trusted-proxies-allow-wide",
    ]);
}

/// Item 6: the alert webhook URL (which often carries a token) was logged at start and on every
/// failed delivery.
#[tokio::test]
async fn webhook_and_redis_credentials_never_reach_the_log() {
    let server = Server::start(&[
        "--alert-webhook-url",
        "http://hook-user:t0kenpass@127.0.0.1:9/alerts?token=s3cr3tq",
        "--alert-max-blocked",
        "1",
    ]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    for _ in 0..3 {
        decide(&mut authz, authorize_request(&key.secret, "8.8.8.8")).await;
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !server.log().contains("alert webhook unreachable") {
        assert!(
            Instant::now() < deadline,
            "no failed delivery: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = server.log();
    assert!(
        log.contains("127.0.0.1:9/alerts"),
        "the endpoint is still named"
    );
    for secret in ["t0kenpass", "s3cr3tq", "hook-user"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
    // A Redis URL with a password, in the user part and in the query, while Redis is down (so
    // that connection errors are logged too).
    let redis = Server::start(&[
        "--redis-url",
        "redis://redis-user:hunter2pass@127.0.0.1:1/0?password=swordfish9",
    ]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let log = redis.log();
    assert!(
        log.contains("127.0.0.1:1/0"),
        "the endpoint is still named:\n{log}"
    );
    for secret in ["hunter2pass", "swordfish9", "redis-user"] {
        assert!(!log.contains(secret), "{secret} is in the log:\n{log}");
    }
}

/// Item 2: a nonce sent while Redis could not answer was consumed although the request was
/// refused (the SET landed once Redis came back), so the legitimate retry got NONCE_REUSED.
#[tokio::test]
async fn a_request_refused_while_redis_is_unreachable_does_not_consume_its_nonce() {
    let redis = redis::RedisServer::start();
    let url = redis.url();
    // HMAC keys on Redis need the replicas' shared secrets key file.
    let key_file = shared_secrets_key_file(redis.dir());
    let server = Server::start(&[
        "--redis-url",
        &url,
        "--redis-namespace",
        "nonces",
        "--secrets-key-file",
        key_file.to_str().unwrap(),
    ]);
    let mut admin = server.admin().await;
    let mut authz = server.authorizer().await;
    let key = admin
        .create_key(hmac_key_request("signer", &[]))
        .await
        .unwrap()
        .into_inner();
    let secret = signing_secret(&key);
    let mut request = signed_request(&key.secret, &secret, "retry-me", "POST", "/v1/payments");
    request.min_revision = key.revision;
    // Redis stops answering writes for 3 s: the claim is sent, but its answer comes too late.
    let paused_at = Instant::now();
    let reply = redis.command("CLIENT PAUSE 3000 WRITE").unwrap();
    assert!(reply.starts_with("+OK"), "{reply}");
    let status = authz.authorize(request.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "fail closed: {status:?}");
    // Once Redis answers again, the same request (the client's retry) is allowed.
    tokio::time::sleep(
        (paused_at + Duration::from_millis(3300)).saturating_duration_since(Instant::now()),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut last = None;
    while Instant::now() < deadline {
        match authz.authorize(request.clone()).await {
            Ok(response) => {
                let response = response.into_inner();
                if response.decision() == pb::Decision::Allow {
                    return;
                }
                last = Some(format!("{:?}", response.reason()));
            }
            Err(status) => last = Some(format!("{status:?}")),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("the retry was never allowed; last answer {last:?}");
}

/// Item 2: with the embedded store the nonce ledger lived only in memory, so after a restart the
/// same signed request was allowed again.
#[tokio::test]
async fn a_restart_does_not_reopen_the_replay_window() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(dir.path(), &[]);
    let mut admin = server.admin().await;
    let key = admin
        .create_key(hmac_key_request("signer", &[]))
        .await
        .unwrap()
        .into_inner();
    let secret = signing_secret(&key);
    let request = signed_request(&key.secret, &secret, "once", "POST", "/v1/payments");
    let mut authz = server.authorizer().await;
    assert_eq!(decide(&mut authz, request.clone()).await, ALLOW);
    // SIGKILL: the allow was answered, so its nonce is already on disk.
    server.kill();
    let server = Server::start_in(dir.path(), &[]);
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, request).await,
        denied(DenyReason::NonceReused)
    );
    let fresh = signed_request(&key.secret, &secret, "twice", "POST", "/v1/payments");
    assert_eq!(decide(&mut authz, fresh).await, ALLOW);
}

/// Item 8: any unauthenticated caller could hold a request for the whole wait, as many as it
/// liked, and the error stated the replica's revision.
#[tokio::test]
async fn min_revision_waiters_are_bounded_and_revisions_are_not_revealed() {
    let server = Server::start(&[
        "--min-revision-max-waiters",
        "2",
        "--min-revision-wait-ms",
        "1500",
    ]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let mut far_ahead = authorize_request("kf_live_not_a_key", "203.0.113.1");
    far_ahead.min_revision = u64::MAX;
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut authz = server.authorizer().await;
        let request = far_ahead.clone();
        calls.push(tokio::spawn(async move {
            let started = Instant::now();
            let status = authz.authorize(request).await.unwrap_err();
            (status, started.elapsed())
        }));
    }
    let mut exhausted = 0;
    for call in calls {
        let (status, took) = call.await.unwrap();
        match status.code() {
            Code::ResourceExhausted => {
                exhausted += 1;
                assert!(
                    took < Duration::from_millis(1000),
                    "refused at once: {took:?}"
                );
            }
            Code::Unavailable => {
                assert_eq!(
                    status.message(),
                    format!("policy revision {} not reached", u64::MAX),
                    "the replica's own revision is not said"
                );
            }
            other => panic!("{other:?}: {status:?}"),
        }
    }
    assert_eq!(exhausted, 4, "two wait, the rest are refused");
    // Bad input is refused before any wait.
    let mut authz = server.authorizer().await;
    let mut bad = far_ahead.clone();
    bad.signature = Some(pb::SignatureInput {
        nonce: "n\n1".into(),
        ..Default::default()
    });
    let started = Instant::now();
    let status = authz.authorize(bad).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(started.elapsed() < Duration::from_millis(1000));
    // A caller that does not ask for a revision is not told one.
    let response = authz
        .authorize(authorize_request(&key.secret, "203.0.113.1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.decision(), pb::Decision::Allow);
    assert_eq!(response.policy_revision, 0);
}

/// Item 7a: an empty or deleted `keyfence.redb` in an initialised data directory silently started
/// an empty store (every key denied, the loss unnoticed).
#[tokio::test]
async fn a_missing_empty_or_replaced_store_in_an_initialised_directory_is_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = data.join("keyfence.redb");
    let mut server = Server::start_in(dir.path(), &[]);
    let mut admin = server.admin().await;
    create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    server.kill();
    let saved = std::fs::read(&file).unwrap();

    std::fs::write(&file, b"").unwrap();
    let stderr = refused_start(&data, &[]);
    assert!(stderr.contains(&*file.to_string_lossy()), "{stderr}");
    assert!(stderr.contains("missing or empty"), "{stderr}");

    std::fs::remove_file(&file).unwrap();
    let stderr = refused_start(&data, &[]);
    assert!(stderr.contains("missing or empty"), "{stderr}");
    assert!(!file.exists(), "nothing was created in its place");

    // Another store's file (a fresh one) is not this directory's store either.
    let other = tempfile::tempdir().unwrap();
    let mut fresh = Server::start_in(other.path(), &[]);
    fresh.kill();
    std::fs::copy(other.path().join("data/keyfence.redb"), &file).unwrap();
    let stderr = refused_start(&data, &[]);
    assert!(
        stderr.contains("refusing to start on another store's file"),
        "{stderr}"
    );

    // Restored from the backup, it starts with its keys.
    std::fs::write(&file, &saved).unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let mut admin = server.admin().await;
    let keys = admin
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(keys.keys.len(), 1);
}

/// Item 7b: random page corruption made redb panic (exit 101). A damaged file is a refusal that
/// names it.
#[tokio::test]
async fn a_damaged_store_file_is_a_clear_refusal_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = data.join("keyfence.redb");
    let mut server = Server::start_in(dir.path(), &[]);
    let mut admin = server.admin().await;
    for i in 0..30 {
        create_key(
            &mut admin,
            "acme",
            "production",
            &[&format!("10.0.{i}.0/24")],
        )
        .await;
    }
    drop(admin);
    // A clean shutdown: redb then trusts the file on the next open, and only reading the damaged
    // pages finds the damage (a crash would make it check the whole file first).
    let terminated = Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{}", server.pid())).exists()
        && !std::fs::read_to_string(format!("/proc/{}/stat", server.pid()))
            .is_ok_and(|stat| stat.contains(") Z"))
    {
        assert!(
            Instant::now() < deadline,
            "keyfence did not stop on SIGTERM"
        );
        // Async, so that the dropped client's connection is closed and the server can finish.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
    let pristine = std::fs::read(&file).unwrap();
    // Damage of several shapes, from a fixed seed: small scattered writes, and whole pages.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut refusals = 0;
    for round in 0..6 {
        let mut damaged = pristine.clone();
        let len = damaged.len() as u64;
        let writes = if round % 2 == 0 { 20 } else { 400 };
        for _ in 0..writes {
            let at = 4096 + (next() % (len - 4096 - 64)) as usize;
            for byte in &mut damaged[at..at + 32] {
                *byte = next() as u8;
            }
        }
        std::fs::write(&file, &damaged).unwrap();
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(&data)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Either it refuses cleanly, or (the damage hit nothing it reads) it serves.
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            continue;
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(
            status.code(),
            Some(1),
            "round {round}: not a clean refusal: {stderr}"
        );
        let last = stderr.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(&*file.to_string_lossy()),
            "round {round}: the refusal names the file: {stderr}"
        );
        refusals += 1;
    }
    eprintln!("{refusals} of 6 damaged files were refused");
    assert!(refusals >= 3, "the damage was seen: {refusals} refusals");
}

/// The resident memory of a process, in bytes.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Item 11: a 50 MB admin write took the server to about 500 MB, and about 390 MB stayed held
/// after the list was cleared. Requests are capped in bytes and in entries, configurably.
#[tokio::test]
async fn large_admin_writes_are_refused_before_they_cost_memory() {
    let server = Server::start(&[]);
    let mut admin = server.admin().await;
    let key = create_key(&mut admin, "acme", "production", &[]).await;
    let id = key.key.unwrap().id;
    let entries = |count: u32| -> Vec<pb::AllowlistEntryInput> {
        (0..count)
            .map(|i| pb::AllowlistEntryInput {
                cidr: format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255),
                description: "partner egress, ticket OPS-12345, approved by the security team"
                    .into(),
                expires_at: None,
            })
            .collect()
    };
    let before = resident_bytes(server.pid());
    // About 50 MB.
    let status = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries: entries(600_000),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("8388608"), "{}", status.message());
    let after = resident_bytes(server.pid());
    assert!(
        after < before + (64 << 20),
        "refused without reading it: {before} -> {after} bytes resident"
    );
    // Within the byte bound, the number of entries is bounded too, naming the field.
    let status = admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries: entries(10_001),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status
            .message()
            .starts_with("entries: holds 10001 entries, more than the 10000"),
        "{}",
        status.message()
    );
    admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: key_scope(&id),
            entries: entries(10_000),
        })
        .await
        .expect("the bound itself is accepted");
}

/// Item 11: both bounds are settings.
#[tokio::test]
async fn admin_request_bounds_are_configurable() {
    let server = Server::start(&[
        "--admin-max-request-bytes",
        "100000",
        "--admin-max-entries-per-request",
        "3",
    ]);
    let mut admin = server.admin().await;
    let four: Vec<_> = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"]
        .into_iter()
        .map(entry)
        .collect();
    let status = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "many".into(),
            allowlist: four.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        status
            .message()
            .starts_with("allowlist: holds 4 entries, more than the 3"),
        "{}",
        status.message()
    );
    let key = create_key(&mut admin, "acme", "production", &["10.0.0.1"]).await;
    let id = key.key.unwrap().id;
    let status = admin
        .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
            scope: key_scope(&id),
            cidrs: four.iter().map(|e| e.cidr.clone()).collect(),
        })
        .await
        .unwrap_err();
    assert!(
        status.message().starts_with("cidrs: holds 4 entries"),
        "{}",
        status.message()
    );
    let status = admin
        .replace_allowlist(pb::ReplaceAllowlistRequest {
            scope: key_scope(&id),
            entries: vec![pb::AllowlistEntryInput {
                cidr: "10.0.0.9".into(),
                description: "d".repeat(200_000),
                expires_at: None,
            }],
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
}

/// The deploy bootstrap's `with_request_body` block, which a deployment may leave out.
const WITH_REQUEST_BODY: &str = "              with_request_body:
                max_request_bytes: 1048576
                allow_partial_message: true
                pack_as_bytes: true
";

/// Item 5: a client-sent `x-envoy-auth-partial-body: false` must never turn BODY_NOT_FORWARDED
/// into an allow. With a real Envoy, with and without `with_request_body`: a signature over an
/// empty body, sent again with a chunked body of the attacker's choosing, is never allowed,
/// whatever that header says (Envoy drops the chunked framing, so without buffering the body is
/// invisible); the honest request passes.
#[tokio::test]
async fn a_client_partial_body_header_never_turns_an_unseen_body_into_an_allow() {
    use common::envoy::{Envoy, Request, Upstream, deploy_config, send};
    use std::net::{IpAddr, Ipv4Addr};
    const FROM: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));

    let upstream = Upstream::start().await;
    // keyfence told what Envoy does, and Envoy's bootstrap with or without its body buffering.
    for (keyfence_args, buffering, expected) in [
        (&["--detailed-denials"][..], false, "BODY_NOT_FORWARDED"),
        (&["--detailed-denials"][..], true, "SIGNATURE_INVALID"),
        (
            &["--detailed-denials", "--envoy-with-request-body"][..],
            true,
            "SIGNATURE_INVALID",
        ),
    ] {
        let keyfence = Server::start(keyfence_args);
        let mut admin = keyfence.admin().await;
        let key = admin
            .create_key(hmac_key_request("signing", &["127.0.0.1"]))
            .await
            .unwrap()
            .into_inner();
        let secret = signing_secret(&key);
        let config = deploy_config(keyfence.data_addr, upstream.addr);
        assert_eq!(config.matches(WITH_REQUEST_BODY).count(), 1);
        let config = if buffering {
            config
        } else {
            config.replace(WITH_REQUEST_BODY, "")
        };
        let envoy = Envoy::start(&config).await;
        let name = format!("{keyfence_args:?} buffering={buffering}");
        // What a partner signed: a request with an empty body.
        let signed = |method: &'static str, nonce: &str| {
            let now = now_secs();
            let mut request = match method {
                "GET" => Request::get("/v1/payments"),
                _ => Request::post("/v1/payments", b""),
            };
            request = request
                .header("x-api-key", key.secret.clone())
                .header(
                    "x-signature",
                    sign_hmac(&secret, now, nonce, method, "/v1/payments", b""),
                )
                .header("x-timestamp", now.to_string())
                .header("x-nonce", nonce.to_owned());
            request
        };
        for (i, partial) in [None, Some("false")].into_iter().enumerate() {
            let mut attack =
                signed("POST", &format!("attack-{i}")).header("transfer-encoding", "chunked");
            attack.body = b"5\r\nevil!\r\n0\r\n\r\n".to_vec();
            if let Some(partial) = partial {
                attack = attack.header("x-envoy-auth-partial-body", partial);
            }
            let response = send(FROM, envoy.listen, &attack).await;
            assert_eq!(
                response.status,
                401,
                "{name} {partial:?}: {}",
                response.text()
            );
            let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
            assert_eq!(body["error"]["code"], expected, "{name} {partial:?}");
        }
        // The honest POST (content-length: 0) passes everywhere; an honest GET, which announces no
        // length, only where keyfence knows Envoy would have reported a body.
        let post = send(FROM, envoy.listen, &signed("POST", "honest-post")).await;
        assert_eq!(post.status, 200, "{name}: {}", post.text());
        let get = send(FROM, envoy.listen, &signed("GET", "honest-get")).await;
        let knows = keyfence_args.contains(&"--envoy-with-request-body");
        assert_eq!(
            get.status,
            if knows { 200 } else { 401 },
            "{name}: {}",
            get.text()
        );
    }
    assert!(
        upstream
            .received()
            .iter()
            .all(|request| !String::from_utf8_lossy(&request.body).contains("evil")),
        "the attacker's body never reached the upstream"
    );
}
