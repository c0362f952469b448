//! Secrets at rest, through the real binary and a real redis-server: the data directory is private
//! whoever made it; the stored bytes of either backend never hold a signing secret; a stored
//! record edited outside keyfence is refused (a revoked key edited to active stays denied); the
//! keyring rotates without a restart; records written in clear before sealing are sealed at start.

mod common;

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use base64::Engine as _;
use common::{
    ALLOW, BIN, Server, authorize_request, decide, denied, hmac_key_request, signing_secret,
};
use keyfence::grpc::pb::{self, DenyReason};
use keyfence_policy::signature::sign_hmac;
use redb::{ReadableDatabase as _, ReadableTable as _};

const KEYS: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("keys");
const CLIENT_IP: &str = "203.0.113.7";

/// Runs `keyfence secrets <args>` and returns its output; panics when it fails.
fn secrets_cli(args: &[&str]) -> String {
    let output = Command::new(BIN)
        .arg("secrets")
        .args(args)
        .env_remove("KEYFENCE_SECRETS_KEY_FILE")
        .output()
        .expect("run keyfence secrets");
    assert!(
        output.status.success(),
        "keyfence secrets {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The id `add-key`, `rotate-key` or `promote-key` printed.
fn printed_key_id(output: &str) -> String {
    output
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no key id in {output:?}"))
        .to_owned()
}

static NONCES: AtomicU64 = AtomicU64::new(0);

/// An Authorize request for `api_key` from [`CLIENT_IP`], signed with `secret`.
fn signed(api_key: &str, secret: &[u8]) -> pb::AuthorizeRequest {
    let timestamp = common::now_secs();
    let nonce = format!("n{}", NONCES.fetch_add(1, Ordering::Relaxed));
    let (method, path, body) = ("POST", "/v1/payments", b"{}");
    pb::AuthorizeRequest {
        api_key: api_key.into(),
        client_ip: CLIENT_IP.into(),
        signature: Some(pb::SignatureInput {
            signature: sign_hmac(secret, timestamp, &nonce, method, path, body),
            timestamp,
            nonce,
            method: method.into(),
            path: path.into(),
            body: body.to_vec(),
        }),
        min_revision: 0,
    }
}

/// A created HMAC key: its id, API key and signing secret.
struct HmacKey {
    id: String,
    api_key: String,
    secret: Vec<u8>,
}

async fn create_hmac_key(server: &Server, name: &str) -> HmacKey {
    let created = server
        .admin()
        .await
        .create_key(hmac_key_request(name, &["203.0.113.0/24"]))
        .await
        .expect("create an HMAC key")
        .into_inner();
    HmacKey {
        id: created.key.as_ref().unwrap().id.clone(),
        api_key: created.secret.clone(),
        secret: signing_secret(&created),
    }
}

/// Every form a secret could take in stored bytes: raw, hex (both cases), base64 (both alphabets).
fn forms(secret: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    vec![
        ("raw", secret.to_vec()),
        ("hex", hex::encode(secret).into_bytes()),
        ("HEX", hex::encode_upper(secret).into_bytes()),
        ("base64", STANDARD.encode(secret).into_bytes()),
        ("base64url", URL_SAFE_NO_PAD.encode(secret).into_bytes()),
    ]
}

fn find(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The signing secrets (by key id, and form) found in `bytes`.
fn secrets_in(bytes: &[u8], keys: &[HmacKey]) -> Vec<String> {
    let mut found = Vec::new();
    for key in keys {
        for (form, needle) in forms(&key.secret) {
            if find(bytes, &needle) {
                found.push(format!("{} ({form})", key.id));
            }
        }
    }
    found
}

/// Every regular file under `dir` but the secrets key file, with its bytes.
fn store_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(store_files(&path));
        } else if path.file_name().is_some_and(|n| n != "secrets.key") {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

/// Waits until the server's log contains `needle`.
async fn log_shows(server: &Server, needle: &str) {
    for _ in 0..200 {
        if server.log().contains(needle) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the log never said {needle:?}:\n{}", server.log());
}

/// Waits until one line of the server's log contains every one of `needles`.
async fn log_line_shows(server: &Server, needles: &[&str]) {
    for _ in 0..200 {
        if server
            .log()
            .lines()
            .any(|line| needles.iter().all(|n| line.contains(n)))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no log line said all of {needles:?}:\n{}", server.log());
}

fn sighup(server: &Server) {
    let status = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
}

/// Every Redis key with its value's bytes, whatever the type.
fn redis_values(url: &str) -> Vec<(String, Vec<u8>)> {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_connection().unwrap();
    let names: Vec<String> = redis::cmd("KEYS").arg("*").query(&mut con).unwrap();
    let mut out = Vec::new();
    for name in names {
        let kind: String = redis::cmd("TYPE").arg(&name).query(&mut con).unwrap();
        let parts: Vec<Vec<u8>> = match kind.as_str() {
            "string" => vec![redis::cmd("GET").arg(&name).query(&mut con).unwrap()],
            "hash" => redis::cmd("HGETALL").arg(&name).query(&mut con).unwrap(),
            "list" => redis::cmd("LRANGE")
                .arg(&name)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            "set" => redis::cmd("SMEMBERS").arg(&name).query(&mut con).unwrap(),
            "zset" => redis::cmd("ZRANGE")
                .arg(&name)
                .arg(0)
                .arg(-1)
                .query(&mut con)
                .unwrap(),
            "stream" => {
                let value: redis::Value = redis::cmd("XRANGE")
                    .arg(&name)
                    .arg("-")
                    .arg("+")
                    .query(&mut con)
                    .unwrap();
                vec![format!("{value:?}").into_bytes()]
            }
            other => panic!("{name} has type {other}, which this test does not read"),
        };
        out.push((name, parts.concat()));
    }
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path)
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

/// Every path under `dir` with its mode.
fn modes_under(dir: &Path) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        out.push((path.display().to_string(), mode(&path)));
        if path.is_dir() {
            out.extend(modes_under(&path));
        }
    }
    out
}

#[tokio::test]
async fn a_data_dir_made_0755_with_a_0644_file_ends_up_0700_and_0600() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stray = data.join("left-by-someone.txt");
    std::fs::write(&stray, "x").unwrap();
    std::fs::set_permissions(&stray, std::fs::Permissions::from_mode(0o644)).unwrap();

    let mut server = Server::start_in(temp.path(), &[]);
    let mut admin = server.admin().await;
    common::create_key(&mut admin, "acme", "production", &["10.0.0.0/8"]).await;

    assert_eq!(mode(&data), 0o700, "the data directory");
    let files = modes_under(&data);
    assert!(
        files.iter().any(|(p, _)| p.ends_with("keyfence.redb")),
        "{files:?}"
    );
    for (path, mode) in &files {
        assert_eq!(*mode, 0o600, "{path} (all: {files:?})");
    }
    assert!(server.log().contains("made private"), "{}", server.log());
    server.kill();
}

#[tokio::test]
async fn the_redb_files_never_hold_a_signing_secret() {
    let temp = tempfile::tempdir().unwrap();
    let mut server = Server::start_in(temp.path(), &[]);
    let mut keys = Vec::new();
    for name in ["first", "second", "third"] {
        keys.push(create_hmac_key(&server, name).await);
    }
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(&keys[0].api_key, &keys[0].secret)).await,
        ALLOW
    );
    server
        .admin()
        .await
        .revoke_key(pb::RevokeKeyRequest {
            key_id: keys[2].id.clone(),
        })
        .await
        .unwrap();
    server.kill();

    let files = store_files(&temp.path().join("data"));
    let redb = files
        .iter()
        .find(|(p, _)| p.ends_with("keyfence.redb"))
        .expect("the embedded store's file");
    // The search can see records: their ids are in the file in clear.
    assert!(find(&redb.1, keys[0].id.as_bytes()), "key ids are readable");
    for (path, bytes) in &files {
        let found = secrets_in(bytes, &keys);
        assert!(found.is_empty(), "{} holds {found:?}", path.display());
    }

    // And the secrets are still there for keyfence: a restarted server verifies signatures.
    let server = Server::start_in(temp.path(), &[]);
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(&keys[1].api_key, &keys[1].secret)).await,
        ALLOW
    );

    // Neither the signing secrets nor the keyring's keys ever reach the log.
    let log = server.log();
    assert!(secrets_in(log.as_bytes(), &keys).is_empty(), "{log}");
    let key_file = std::fs::read_to_string(temp.path().join("data/secrets.key")).unwrap();
    for line in key_file.lines().filter(|l| !l.starts_with('#')) {
        let key_hex = line.split_whitespace().nth(1).expect("`<id> <hex>`");
        assert_eq!(key_hex.len(), 64, "{line}");
        assert!(!log.contains(key_hex), "{log}");
    }
}

#[tokio::test]
async fn no_redis_value_holds_a_signing_secret() {
    let redis = common::redis::RedisServer::start();
    let temp = tempfile::tempdir().unwrap();
    let key_file = temp.path().join("secrets.key");
    secrets_cli(&["add-key", "--secrets-key-file", key_file.to_str().unwrap()]);
    let args = [
        "--redis-url",
        &redis.url(),
        "--secrets-key-file",
        key_file.to_str().unwrap(),
    ];
    let server = Server::start(&args);
    let mut keys = Vec::new();
    for name in ["first", "second"] {
        keys.push(create_hmac_key(&server, name).await);
    }
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(&keys[0].api_key, &keys[0].secret)).await,
        ALLOW
    );

    let values = redis_values(&redis.url());
    let all: Vec<u8> = values.iter().flat_map(|(_, v)| v.clone()).collect();
    assert!(find(&all, keys[0].id.as_bytes()), "key ids are readable");
    for (name, bytes) in &values {
        let found = secrets_in(bytes, &keys);
        assert!(found.is_empty(), "{name} holds {found:?}");
    }
    // Redis's own persistence (the append-only file) has seen every write: none held one either.
    for (path, bytes) in store_files(redis.dir()) {
        let found = secrets_in(&bytes, &keys);
        assert!(found.is_empty(), "{} holds {found:?}", path.display());
    }
}

#[tokio::test]
async fn without_a_key_file_redis_refuses_hmac_keys() {
    let redis = common::redis::RedisServer::start();
    let server = Server::start(&["--redis-url", &redis.url()]);
    let refused = server
        .admin()
        .await
        .create_key(hmac_key_request("needs-a-keyring", &[]))
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("--secrets-key-file"),
        "{refused:?}"
    );
}

/// Rewrites the stored record of key `id` in the redb file (the server stopped) with `edit`.
fn edit_redb_record(data_dir: &Path, id: &str, edit: impl FnOnce(String) -> Option<String>) {
    let db = redb::Database::open(data_dir.join("keyfence.redb")).expect("open the redb file");
    let txn = db.begin_write().unwrap();
    {
        let mut keys = txn.open_table(KEYS).unwrap();
        let stored = keys
            .get(id)
            .unwrap()
            .expect("the key is stored")
            .value()
            .to_vec();
        match edit(String::from_utf8(stored).unwrap()) {
            Some(edited) => keys.insert(id, edited.as_bytes()).unwrap(),
            None => keys.remove(id).unwrap(),
        };
    }
    txn.commit().unwrap();
}

/// The sealed value's JSON body, in clear: what a forger would write without the keyring.
fn body_of(stored: &str) -> String {
    stored
        .splitn(4, '.')
        .nth(3)
        .expect("a sealed value")
        .to_owned()
}

fn revoked_to_active(stored: String) -> String {
    assert!(stored.contains(r#""status":"revoked""#), "{stored}");
    stored.replace(r#""status":"revoked""#, r#""status":"active""#)
}

/// A key with an allowlist and no signature, allowed, then revoked: (id, API key).
async fn revoked_key(server: &Server) -> (String, String) {
    let mut admin = server.admin().await;
    let created = common::create_key(&mut admin, "acme", "production", &["203.0.113.0/24"]).await;
    let id = created.key.unwrap().id;
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, authorize_request(&created.secret, CLIENT_IP)).await,
        ALLOW
    );
    admin
        .revoke_key(pb::RevokeKeyRequest { key_id: id.clone() })
        .await
        .unwrap();
    assert_eq!(
        decide(&mut authz, authorize_request(&created.secret, CLIENT_IP)).await,
        denied(DenyReason::KeyRevoked)
    );
    (id, created.secret)
}

/// After a restart on tampered data: the key is denied, the log names it as refused, the metric
/// counts it, and the admin API does not serve it.
async fn assert_refused(server: &Server, id: &str, api_key: &str) {
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, authorize_request(api_key, CLIENT_IP)).await,
        denied(DenyReason::UnknownKey),
        "a refused record is never used"
    );
    log_shows(server, &format!("key {id} refused")).await;
    let metrics = server.metrics_text().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyfence_store_records_refused_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    let error = server
        .admin()
        .await
        .get_key(pb::GetKeyRequest { key_id: id.into() })
        .await
        .unwrap_err();
    assert_eq!(error.code(), tonic::Code::Internal, "{error:?}");
}

#[tokio::test]
async fn a_revoked_key_edited_to_active_in_the_redb_file_stays_denied() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let metrics = ["--metrics-listen", "127.0.0.1:0"];
    let mut server = Server::start_in(temp.path(), &metrics);
    let (id, api_key) = revoked_key(&server).await;
    // Another key, so that the store holds sealed records whatever is done to this one.
    common::create_key(&mut server.admin().await, "acme", "sandbox", &[]).await;
    server.kill();

    // The bytes edited in place: the MAC no longer matches.
    edit_redb_record(&data, &id, |stored| Some(revoked_to_active(stored)));
    let mut server = Server::start_in(temp.path(), &metrics);
    assert_refused(&server, &id, &api_key).await;
    server.kill();

    // The record replaced by the same JSON in clear, as a version before sealing stored it.
    edit_redb_record(&data, &id, |stored| Some(body_of(&stored)));
    let mut server = Server::start_in(temp.path(), &metrics);
    assert_refused(&server, &id, &api_key).await;
    server.kill();

    // ... and with the sealing marker removed as well, to pass the store off as one from before
    // sealing: the other key's sealed record gives it away.
    {
        let db = redb::Database::open(data.join("keyfence.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("sealing"))
            .unwrap()
            .remove("marker")
            .unwrap()
            .expect("the store has a sealing marker");
        txn.commit().unwrap();
    }
    let server = Server::start_in(temp.path(), &metrics);
    assert_refused(&server, &id, &api_key).await;
    assert!(
        server.log().contains("sealing marker is missing"),
        "{}",
        server.log()
    );
}

#[tokio::test]
async fn a_revoked_key_edited_to_active_in_redis_stays_denied() {
    let redis = common::redis::RedisServer::start();
    let temp = tempfile::tempdir().unwrap();
    let key_file = temp.path().join("secrets.key");
    secrets_cli(&["add-key", "--secrets-key-file", key_file.to_str().unwrap()]);
    let args = [
        "--redis-url",
        &redis.url(),
        "--secrets-key-file",
        key_file.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    let first = Server::start(&args);
    let (id, api_key) = revoked_key(&first).await;

    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let name = format!("keyfence:key:{id}");
    let stored: String = redis::cmd("GET").arg(&name).query(&mut con).unwrap();
    let () = redis::cmd("SET")
        .arg(&name)
        .arg(revoked_to_active(stored.clone()))
        .query(&mut con)
        .unwrap();
    // A replica that loads the edited record, and the one that wrote it, once it re-reads it.
    let second = Server::start(&args);
    assert_refused(&second, &id, &api_key).await;
    let mut authz = first.authorizer().await;
    assert_eq!(
        decide(&mut authz, authorize_request(&api_key, CLIENT_IP)).await,
        denied(DenyReason::KeyRevoked)
    );

    // The same JSON in clear: refused as well.
    let () = redis::cmd("SET")
        .arg(&name)
        .arg(body_of(&stored).replace(r#""status":"revoked""#, r#""status":"active""#))
        .query(&mut con)
        .unwrap();
    let third = Server::start(&args);
    assert_refused(&third, &id, &api_key).await;
}

/// The store a version before sealing left: one HMAC key in clear.
fn legacy_record(id: &str, api_key: &str, secret: &[u8]) -> (String, String) {
    use keyfence_policy::model::{
        AllowlistEntry, Audit, Enforcement, KeyRecord, KeyStatus, SecretHash, SignatureScheme,
        UnixMillis,
    };
    let audit = Audit {
        actor: "before-sealing".into(),
        at: UnixMillis(1_700_000_000_000),
    };
    let record = KeyRecord {
        id: id.parse().unwrap(),
        partner_id: "acme".parse().unwrap(),
        environment: "production".parse().unwrap(),
        name: "legacy".into(),
        display_prefix: api_key[..12].into(),
        secret_hash: SecretHash::of(api_key),
        previous_secret: None,
        status: KeyStatus::Active,
        ip_allowlist_enabled: true,
        enforcement: Enforcement::Enforce,
        signature: SignatureScheme::HmacSha256 {
            secret: secret.to_vec(),
        },
        rate_limit: None,
        expires_at: None,
        require_nonce: false,
        created: audit.clone(),
        updated: audit.clone(),
    };
    let entries = vec![AllowlistEntry {
        cidr: "203.0.113.0/24".parse().unwrap(),
        description: "office".into(),
        added: audit,
        expires_at: None,
    }];
    (
        serde_json::to_string(&record).unwrap(),
        serde_json::to_string(&entries).unwrap(),
    )
}

const LEGACY_API_KEY: &str = "kf_live_legacylegacylegacylegacylegacylegacy12";

#[tokio::test]
async fn records_stored_in_clear_before_sealing_are_sealed_at_start() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let secret = b"legacy-signing-secret-0123456789".to_vec();
    let (record, entries) = legacy_record("key_legacy", LEGACY_API_KEY, &secret);
    {
        let db = redb::Database::create(data.join("keyfence.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<&str, u64>::new("meta"))
            .unwrap()
            .insert("revision", 1)
            .unwrap();
        txn.open_table(KEYS)
            .unwrap()
            .insert("key_legacy", record.as_bytes())
            .unwrap();
        txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("allowlists"))
            .unwrap()
            .insert("key/key_legacy", entries.as_bytes())
            .unwrap();
        txn.commit().unwrap();
    }
    let legacy = [HmacKey {
        id: "key_legacy".into(),
        api_key: LEGACY_API_KEY.into(),
        secret,
    }];
    let before = std::fs::read(data.join("keyfence.redb")).unwrap();
    assert!(
        !secrets_in(&before, &legacy).is_empty(),
        "the search finds a secret in clear"
    );

    let mut server = Server::start_in(temp.path(), &[]);
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(LEGACY_API_KEY, &legacy[0].secret)).await,
        ALLOW
    );
    assert!(
        server.log().contains("sealed records written in clear"),
        "{}",
        server.log()
    );
    server.kill();
    assert_eq!(mode(&data.join("secrets.key")), 0o600);
    for (path, bytes) in store_files(&data) {
        let found = secrets_in(&bytes, &legacy);
        assert!(found.is_empty(), "{} holds {found:?}", path.display());
    }
    let server = Server::start_in(temp.path(), &[]);
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(LEGACY_API_KEY, &legacy[0].secret)).await,
        ALLOW
    );
}

#[tokio::test]
async fn redis_records_stored_in_clear_before_sealing_are_sealed_at_start() {
    let redis = common::redis::RedisServer::start();
    let secret = b"legacy-signing-secret-0123456789".to_vec();
    let (record, entries) = legacy_record("key_legacy", LEGACY_API_KEY, &secret);
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let () = redis::pipe()
        .set("keyfence:revision", 1)
        .zadd("keyfence:keys", "key_legacy", 0)
        .set("keyfence:key:key_legacy", &record)
        .set("keyfence:list:key/key_legacy", &entries)
        .ignore()
        .query(&mut con)
        .unwrap();
    let legacy = [HmacKey {
        id: "key_legacy".into(),
        api_key: LEGACY_API_KEY.into(),
        secret,
    }];

    // Without a key file a replica refuses to start: the store holds an HMAC key.
    let refused = Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .args(["--redis-url", &redis.url()])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path().join("data"))
        .env_remove("KEYFENCE_SECRETS_KEY_FILE")
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("HMAC key key_legacy") && stderr.contains("--secrets-key-file"),
        "{stderr}"
    );

    let temp = tempfile::tempdir().unwrap();
    let key_file = temp.path().join("secrets.key");
    secrets_cli(&["add-key", "--secrets-key-file", key_file.to_str().unwrap()]);
    let server = Server::start(&[
        "--redis-url",
        &redis.url(),
        "--secrets-key-file",
        key_file.to_str().unwrap(),
    ]);
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(LEGACY_API_KEY, &legacy[0].secret)).await,
        ALLOW
    );
    for (name, bytes) in redis_values(&redis.url()) {
        let found = secrets_in(&bytes, &legacy);
        assert!(found.is_empty(), "{name} holds {found:?}");
    }
}

/// The ids `keyfence secrets list` prints, the primary first.
fn key_ids(key_file: &Path) -> Vec<String> {
    secrets_cli(&["list", "--secrets-key-file", key_file.to_str().unwrap()])
        .lines()
        .map(|line| line.split_whitespace().next().unwrap().to_owned())
        .collect()
}

/// The keyring key each stored key record is sealed under, read from the redb file.
fn redb_sealing_keys(data_dir: &Path) -> Vec<String> {
    let db = redb::Database::open(data_dir.join("keyfence.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let keys = txn.open_table(KEYS).unwrap();
    keys.iter()
        .unwrap()
        .map(|row| {
            let (_, value) = row.unwrap();
            let text = String::from_utf8(value.value().to_vec()).unwrap();
            text.split('.').nth(1).unwrap().to_owned()
        })
        .collect()
}

fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

const ALL_RESEALED: &str = "every stored record is sealed under the primary key";

#[tokio::test]
async fn the_keyring_rotates_without_a_restart() {
    let temp = tempfile::tempdir().unwrap();
    let data = temp.path().join("data");
    let mut server = Server::start_in(temp.path(), &[]);
    let key_file = data.join("secrets.key");
    let key = create_hmac_key(&server, "rotating").await;
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(&key.api_key, &key.secret)).await,
        ALLOW
    );
    let old = key_ids(&key_file).remove(0);

    // One server: add and promote at once, then SIGHUP.
    let new = printed_key_id(&secrets_cli(&[
        "rotate-key",
        "--secrets-key-file",
        key_file.to_str().unwrap(),
    ]));
    assert_eq!(key_ids(&key_file), [new.clone(), old.clone()]);
    assert_eq!(mode(&key_file), 0o600);
    sighup(&server);
    log_line_shows(&server, &[ALL_RESEALED, &new]).await;
    assert_eq!(
        decide(&mut authz, signed(&key.api_key, &key.secret)).await,
        ALLOW
    );
    let second = create_hmac_key(&server, "after-rotation").await;

    // The old key removed; no signal this time: the server sees the file change by itself.
    let reloads = count(&server.log(), "secrets key file reloaded");
    secrets_cli(&[
        "remove-key",
        "--secrets-key-file",
        key_file.to_str().unwrap(),
        "--id",
        &old,
    ]);
    for _ in 0..100 {
        if count(&server.log(), "secrets key file reloaded") > reloads {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        count(&server.log(), "secrets key file reloaded") > reloads,
        "{}",
        server.log()
    );
    assert_eq!(
        decide(&mut authz, signed(&key.api_key, &key.secret)).await,
        ALLOW
    );
    server.kill();

    assert_eq!(redb_sealing_keys(&data), [new.clone(), new.clone()]);
    let server = Server::start_in(temp.path(), &[]);
    let mut authz = server.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(&key.api_key, &key.secret)).await,
        ALLOW
    );
    assert_eq!(
        decide(&mut authz, signed(&second.api_key, &second.secret)).await,
        ALLOW
    );
    assert!(!server.log().contains("refused"), "{}", server.log());
}

#[tokio::test]
async fn redis_replicas_rotate_the_keyring_without_a_restart() {
    let redis = common::redis::RedisServer::start();
    let temp = tempfile::tempdir().unwrap();
    // Each replica has its own copy of the key file, as on separate machines.
    let (file_a, file_b) = (temp.path().join("a.key"), temp.path().join("b.key"));
    let share = || {
        std::fs::copy(&file_a, &file_b).unwrap();
    };
    let old = printed_key_id(&secrets_cli(&[
        "add-key",
        "--secrets-key-file",
        file_a.to_str().unwrap(),
    ]));
    share();
    let args = |file: &Path| {
        vec![
            "--redis-url".to_owned(),
            redis.url(),
            "--secrets-key-file".to_owned(),
            file.display().to_string(),
        ]
    };
    let start = |file: &Path| {
        let args = args(file);
        Server::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let a = start(&file_a);
    let mut b = start(&file_b);
    let key = create_hmac_key(&a, "shared").await;
    let both_allow = || async {
        for server in [&a, &b] {
            let mut authz = server.authorizer().await;
            let mut decision = None;
            for _ in 0..50 {
                decision = Some(decide(&mut authz, signed(&key.api_key, &key.secret)).await);
                if decision == Some(ALLOW) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(decision, Some(ALLOW), "{}", server.log());
        }
    };
    both_allow().await;

    // 1. A new key every replica can open, before any seals with it.
    let new = printed_key_id(&secrets_cli(&[
        "add-key",
        "--secrets-key-file",
        file_a.to_str().unwrap(),
    ]));
    share();
    for server in [&a, &b] {
        sighup(server);
        log_shows(server, "secrets key file reloaded").await;
    }
    both_allow().await;

    // 2. Promoted everywhere: both re-seal (compare-and-set, so neither undoes the other).
    secrets_cli(&[
        "promote-key",
        "--secrets-key-file",
        file_a.to_str().unwrap(),
        "--id",
        &new,
    ]);
    share();
    for server in [&a, &b] {
        sighup(server);
        log_line_shows(server, &[ALL_RESEALED, &new]).await;
    }
    let client = redis::Client::open(redis.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let stored: String = redis::cmd("GET")
        .arg(format!("keyfence:key:{}", key.id))
        .query(&mut con)
        .unwrap();
    assert!(stored.starts_with(&format!("kf1.{new}.")), "{stored}");
    both_allow().await;

    // 3. The old key pruned; a replica restarted on the pruned file reads everything.
    secrets_cli(&[
        "remove-key",
        "--secrets-key-file",
        file_a.to_str().unwrap(),
        "--id",
        &old,
    ]);
    share();
    b.kill();
    let b = start(&file_b);
    let mut authz = b.authorizer().await;
    assert_eq!(
        decide(&mut authz, signed(&key.api_key, &key.secret)).await,
        ALLOW
    );
    assert!(!b.log().contains("refused"), "{}", b.log());
}
