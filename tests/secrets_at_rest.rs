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
