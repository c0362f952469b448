//! keyfence behind a real Envoy (`deploy/envoy/envoy.yaml`, ports swapped, and the mTLS bootstrap
//! `deploy/envoy/envoy-mtls.yaml`): what reaches the upstream on an allow, what the client sees on
//! each kind of denial, failing closed when keyfence is gone or refuses Envoy's certificate, and
//! client addresses that headers cannot forge. Clients send from chosen loopback
//! addresses (127.0.0.1, .2, .3, .4), so the source address Envoy reports is the one under test.

mod common;

use std::net::{IpAddr, Ipv4Addr};

use common::{envoy::*, *};
use keyfence::grpc::pb;
use keyfence_policy::signature::sign_hmac;

const ALLOWED: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const THIRD: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

const UNAUTHORIZED: &str = r#"{"code":401,"msg":"Unauthorized"}"#;

/// keyfence, an upstream and Envoy between clients and the upstream.
struct Stack {
    keyfence: Server,
    upstream: Upstream,
    envoy: Envoy,
    /// The certificates of an mTLS stack.
    _pki: Option<tempfile::TempDir>,
}

/// Which hop Envoy's certificate comes from in an mTLS stack.
#[derive(Clone, Copy, PartialEq, Eq)]
enum EnvoyIdentity {
    /// Issued by the CA keyfence trusts for clients.
    Trusted,
    /// Issued by a CA keyfence has never heard of.
    Stranger,
}

impl Stack {
    async fn start(keyfence_args: &[&str]) -> Stack {
        let keyfence = Server::start(keyfence_args);
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(&deploy_config(keyfence.data_addr, upstream.addr)).await;
        Stack {
            keyfence,
            upstream,
            envoy,
            _pki: None,
        }
    }

    /// The same stack on `deploy/envoy/envoy-mtls.yaml`: keyfence requires a client certificate
    /// from its client CA on the data plane, and Envoy presents `identity`'s.
    async fn start_mtls(identity: EnvoyIdentity) -> Stack {
        let pki = tempfile::tempdir().unwrap();
        let dir = pki.path();
        let server_ca = common::pki::Ca::new(dir, "keyfence-ca");
        let client_ca = common::pki::Ca::new(dir, "envoy-ca");
        let stranger_ca = common::pki::Ca::new(dir, "stranger-ca");
        let server_pair = server_ca.server(dir, "keyfence", "keyfence");
        let envoy_pair = match identity {
            EnvoyIdentity::Trusted => client_ca.client(dir, "envoy", "envoy"),
            EnvoyIdentity::Stranger => stranger_ca.client(dir, "envoy", "envoy"),
        };
        let keyfence = Server::start(&[
            "--tls-cert",
            server_pair.cert.to_str().unwrap(),
            "--tls-key",
            server_pair.key.to_str().unwrap(),
            "--tls-client-ca",
            client_ca.cert.to_str().unwrap(),
        ]);
        let upstream = Upstream::start().await;
        let config = deploy_mtls_config(
            keyfence.data_addr,
            upstream.addr,
            &EnvoyTls {
                client_cert: &envoy_pair.cert,
                client_key: &envoy_pair.key,
                keyfence_ca: &server_ca.cert,
                keyfence_name: "localhost",
            },
        );
        let envoy = Envoy::start(&config).await;
        Stack {
            keyfence,
            upstream,
            envoy,
            _pki: Some(pki),
        }
    }

    async fn send(&self, from: IpAddr, request: &Request<'_>) -> Response {
        send(from, self.envoy.listen, request).await
    }

    /// A key for acme/production usable from 127.0.0.1 only.
    async fn key(&self) -> pb::CreateKeyResponse {
        let mut admin = self.keyfence.admin().await;
        create_key(&mut admin, "acme", "production", &["127.0.0.1"]).await
    }

    /// An HMAC-signing key usable from 127.0.0.1 only; returns it and its signing secret.
    async fn signing_key(&self) -> (pb::CreateKeyResponse, Vec<u8>) {
        let mut admin = self.keyfence.admin().await;
        let key = admin
            .create_key(hmac_key_request("signing", &["127.0.0.1"]))
            .await
            .expect("create signing key")
            .into_inner();
        let secret = signing_secret(&key);
        (key, secret)
    }
}

fn key_id(key: &pb::CreateKeyResponse) -> String {
    key.key.as_ref().expect("key").id.clone()
}

/// A POST signed like a partner signs it.
fn signed_post<'a>(
    api_key: &str,
    secret: &[u8],
    path: &'a str,
    body: &[u8],
    nonce: &str,
) -> Request<'a> {
    let now = now_secs();
    let signature = sign_hmac(secret, now, nonce, "POST", path, body);
    Request::post(path, body)
        .header("x-api-key", api_key)
        .header("x-signature", signature)
        .header("x-timestamp", now.to_string())
        .header("x-nonce", nonce)
}

fn assert_opaque_401(response: &Response, what: &str) {
    assert_eq!(response.status, 401, "{what}: {}", response.text());
    assert_eq!(
        response.header("content-type"),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(response.text(), UNAUTHORIZED, "{what}");
}

fn error_code(response: &Response) -> String {
    let body: serde_json::Value = serde_json::from_slice(&response.body)
        .unwrap_or_else(|e| panic!("not json ({e}): {}", response.text()));
    body["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn a_good_key_reaches_the_upstream_named_and_without_its_credentials() {
    good_key_reaches_the_upstream(Stack::start(&[]).await).await;
}

#[tokio::test]
async fn over_mtls_a_good_key_reaches_the_upstream_and_a_bad_ip_gets_the_opaque_401() {
    let stack = Stack::start_mtls(EnvoyIdentity::Trusted).await;
    let key = stack.key().await;
    let denied = stack
        .send(
            OTHER,
            &Request::get("/v1/orders").header("x-api-key", &key.secret),
        )
        .await;
    assert_opaque_401(&denied, "a listed key from an unlisted address, over mTLS");
    good_key_reaches_the_upstream(stack).await;
}

#[tokio::test]
async fn over_mtls_an_envoy_keyfence_does_not_trust_is_refused_and_nothing_passes() {
    let stack = Stack::start_mtls(EnvoyIdentity::Stranger).await;
    let key = stack.key().await;
    let response = stack
        .send(
            ALLOWED,
            &Request::get("/v1/orders").header("x-api-key", &key.secret),
        )
        .await;
    assert_eq!(response.status, 503, "{}", response.text());
    assert!(stack.upstream.received().is_empty());
    // keyfence logs the refusal on the handshake's own task, which may finish after Envoy has
    // already answered.
    let started = std::time::Instant::now();
    while !stack.keyfence.log().contains("tls handshake refused") {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{}",
            stack.keyfence.log()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn good_key_reaches_the_upstream(stack: Stack) {
    let key = stack.key().await;

    let response = stack
        .send(
            ALLOWED,
            &Request::get("/v1/orders?limit=5")
                .header("x-api-key", &key.secret)
                .header("x-keyfence-key-id", "key_forged"),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.text(), "ok");
    let received = stack.upstream.received();
    assert_eq!(received.len(), 1);
    let request = &received[0];
    assert_eq!(request.path, "/v1/orders?limit=5");
    assert_eq!(
        request.header("x-keyfence-key-id"),
        Some(key_id(&key).as_str())
    );
    assert_eq!(request.header("x-keyfence-partner-id"), Some("acme"));
    assert_eq!(request.header("x-keyfence-environment"), Some("production"));
    assert!(request.header("x-api-key").is_none(), "{request:?}");
    assert_eq!(
        request
            .headers
            .iter()
            .filter(|(name, _)| name == "x-keyfence-key-id")
            .count(),
        1,
        "a client's own x-keyfence-key-id is overwritten, not kept beside ours"
    );

    // The same key as a bearer token: the authorization header is stripped too.
    let response = stack
        .send(
            ALLOWED,
            &Request::get("/v1/orders").header("authorization", format!("Bearer {}", key.secret)),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let received = stack.upstream.received();
    assert_eq!(received.len(), 2);
    assert!(received[1].header("authorization").is_none());
    assert_eq!(
        received[1].header("x-keyfence-key-id"),
        Some(key_id(&key).as_str())
    );
    let log = stack.keyfence.log();
    assert!(log.contains("key created"), "the log was captured");
    assert!(!log.contains(&key.secret), "the presented key was logged");
}

#[tokio::test]
async fn other_sources_and_bad_keys_get_the_same_opaque_401() {
    let stack = Stack::start(&[]).await;
    let key = stack.key().await;

    let response = stack
        .send(
            OTHER,
            &Request::get("/v1/orders").header("x-api-key", &key.secret),
        )
        .await;
    assert_opaque_401(&response, "unlisted source address");
    let response = stack.send(ALLOWED, &Request::get("/v1/orders")).await;
    assert_opaque_401(&response, "no key");
    let response = stack
        .send(
            ALLOWED,
            &Request::get("/v1/orders").header("x-api-key", "kf_live_nosuchkey"),
        )
        .await;
    assert_opaque_401(&response, "unknown key");
    assert!(stack.upstream.received().is_empty());

    // Rate limiting is the one denial with its own status.
    let mut admin = stack.keyfence.admin().await;
    let limited = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "limited".into(),
            ip_allowlist_enabled: Some(false),
            rate_limit: Some(pb::RateLimit {
                requests_per_second: 1,
                burst: 1,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let request = Request::get("/v1/orders").header("x-api-key", &limited.secret);
    assert_eq!(stack.send(ALLOWED, &request).await.status, 200);
    let response = stack.send(ALLOWED, &request).await;
    assert_eq!(response.status, 429, "{}", response.text());
    assert_eq!(response.text(), r#"{"code":429,"msg":"Too Many Requests"}"#);
}

#[tokio::test]
async fn a_bad_signature_gets_the_same_401_as_a_bad_ip() {
    let stack = Stack::start(&[]).await;
    let (key, secret) = stack.signing_key().await;
    let path = "/v1/payments?currency=EUR";
    let body = br#"{"amount":100}"#;

    // A good signature over the body Envoy forwards passes, and the signature headers are gone.
    let response = stack
        .send(
            ALLOWED,
            &signed_post(&key.secret, &secret, path, body, "n-1"),
        )
        .await;
    assert_eq!(response.status, 200, "{}", response.text());
    let received = stack.upstream.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].body, body);
    for header in ["x-api-key", "x-signature", "x-timestamp", "x-nonce"] {
        assert!(
            received[0].header(header).is_none(),
            "{header} reached the upstream"
        );
    }

    // Signed with the wrong secret, over another body, or replayed: the same 401 as a bad IP.
    let wrong_secret = signed_post(&key.secret, b"not the secret", path, body, "n-2");
    assert_opaque_401(
        &stack.send(ALLOWED, &wrong_secret).await,
        "signature with the wrong secret",
    );
    let mut tampered = signed_post(&key.secret, &secret, path, body, "n-3");
    tampered.body = br#"{"amount":999}"#.to_vec();
    assert_opaque_401(&stack.send(ALLOWED, &tampered).await, "tampered body");
    let replay = signed_post(&key.secret, &secret, path, body, "n-1");
    assert_opaque_401(&stack.send(ALLOWED, &replay).await, "replayed nonce");
    let unsigned = Request::post(path, body).header("x-api-key", &key.secret);
    assert_opaque_401(&stack.send(ALLOWED, &unsigned).await, "no signature");
    let good_signature_bad_ip = signed_post(&key.secret, &secret, path, body, "n-4");
    assert_opaque_401(
        &stack.send(OTHER, &good_signature_bad_ip).await,
        "good signature from an unlisted address",
    );
    assert_eq!(stack.upstream.received().len(), 1);
}

#[tokio::test]
async fn detailed_denials_say_why_and_show_the_allowlist_only_when_asked() {
    let stack = Stack::start(&["--detailed-denials"]).await;
    let key = stack.key().await;
    let response = stack
        .send(
            OTHER,
            &Request::get("/v1/orders").header("x-api-key", &key.secret),
        )
        .await;
    assert_eq!(response.status, 401);
    assert_eq!(response.header("content-type"), Some("application/json"));
    assert_eq!(
        response.text(),
        r#"{"success":false,"error":{"code":"IP_NOT_WHITELISTED","message":"Your IP address (127.0.0.2) is not authorized to use this API key","details":{"clientIp":"127.0.0.2"}}}"#
    );
    let response = stack.send(ALLOWED, &Request::get("/v1/orders")).await;
    assert_eq!(
        (response.status, error_code(&response).as_str()),
        (401, "API_KEY_MISSING")
    );

    let (signing, secret) = stack.signing_key().await;
    let path = "/v1/uploads";
    let bad = signed_post(&signing.secret, b"not the secret", path, b"{}", "n-1");
    let response = stack.send(ALLOWED, &bad).await;
    assert_eq!(
        (response.status, error_code(&response).as_str()),
        (401, "SIGNATURE_INVALID")
    );
    // A body over Envoy's max_request_bytes (1 MiB) reaches keyfence truncated: even a correct
    // signature cannot be checked over it.
    let large = vec![b'x'; 1024 * 1024 + 1];
    let response = stack
        .send(
            ALLOWED,
            &signed_post(&signing.secret, &secret, path, &large, "n-2"),
        )
        .await;
    assert_eq!(
        (response.status, error_code(&response).as_str()),
        (401, "BODY_NOT_FORWARDED")
    );
    assert!(stack.upstream.received().is_empty());

    let with_allowlist =
        Stack::start(&["--detailed-denials", "--detailed-denials-include-allowlist"]).await;
    let key = with_allowlist.key().await;
    let mut admin = with_allowlist.keyfence.admin().await;
    admin
        .add_allowlist_entries(pb::AddAllowlistEntriesRequest {
            scope: partner_scope("acme", "production"),
            entries: vec![entry("2001:db8::/32")],
        })
        .await
        .unwrap();
    let response = with_allowlist
        .send(
            OTHER,
            &Request::get("/v1/orders").header("x-api-key", &key.secret),
        )
        .await;
    assert_eq!(
        response.text(),
        r#"{"success":false,"error":{"code":"IP_NOT_WHITELISTED","message":"Your IP address (127.0.0.2) is not authorized to use this API key","details":{"clientIp":"127.0.0.2","allowedIps":["127.0.0.1/32","2001:db8::/32"]}}}"#
    );
}

#[tokio::test]
async fn keyfence_stopped_is_a_denial_not_a_pass() {
    let mut stack = Stack::start(&[]).await;
    let key = stack.key().await;
    let request = Request::get("/v1/orders").header("x-api-key", &key.secret);
    assert_eq!(stack.send(ALLOWED, &request).await.status, 200);

    stack.keyfence.kill();
    for _ in 0..3 {
        let response = stack.send(ALLOWED, &request).await;
        assert_eq!(response.status, 503, "{}", response.text());
    }
    assert_eq!(stack.upstream.received().len(), 1);
    assert!(stack.envoy.stat("http.public.ext_authz.error").await >= 1);
}

#[tokio::test]
async fn a_spoofed_forwarded_for_changes_nothing_unless_the_proxy_is_trusted() {
    // No trusted proxies: the address Envoy saw decides, whatever the headers claim.
    let plain = Stack::start(&[]).await;
    let key = plain.key().await;
    let spoofed = Request::get("/v1/orders")
        .header("x-api-key", &key.secret)
        .header("x-forwarded-for", "127.0.0.1")
        .header("x-real-ip", "127.0.0.1");
    assert_opaque_401(&plain.send(OTHER, &spoofed).await, "spoofed from .2");

    // 127.0.0.2 is a trusted proxy: its X-Forwarded-For is walked right to left.
    let trusted = Stack::start(&["--trusted-proxies", "127.0.0.2/32", "--detailed-denials"]).await;
    let key = trusted.key().await;
    let via_proxy = |forwarded_for: &str| {
        Request::get("/v1/orders")
            .header("x-api-key", key.secret.clone())
            .header("x-forwarded-for", forwarded_for.to_owned())
    };
    let response = trusted.send(OTHER, &via_proxy("127.0.0.1")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    // The same header from an address that is not a trusted proxy is not read.
    let response = trusted.send(THIRD, &via_proxy("127.0.0.1")).await;
    assert_eq!(
        (response.status, error_code(&response).as_str()),
        (401, "IP_NOT_WHITELISTED")
    );
    assert!(response.text().contains(r#""clientIp":"127.0.0.3""#));
    // A spoofed left-most entry behind an untrusted hop does not decide.
    let response = trusted
        .send(OTHER, &via_proxy("127.0.0.1, 127.0.0.4"))
        .await;
    assert!(
        response.text().contains(r#""clientIp":"127.0.0.4""#),
        "{}",
        response.text()
    );
    // A malformed hop fails closed.
    let response = trusted
        .send(OTHER, &via_proxy("127.0.0.1, not-an-ip"))
        .await;
    assert_eq!(
        (response.status, error_code(&response).as_str()),
        (401, "INVALID_CLIENT_IP")
    );
    let log = trusted.keyfence.log();
    assert!(log.contains("client ip not resolved"), "{log}");
    assert!(!log.contains(&key.secret), "the presented key was logged");
    // X-Real-IP is not read unless configured.
    let response = trusted
        .send(
            OTHER,
            &Request::get("/v1/orders")
                .header("x-api-key", key.secret.clone())
                .header("x-real-ip", "127.0.0.1"),
        )
        .await;
    assert!(
        response.text().contains(r#""clientIp":"127.0.0.2""#),
        "{}",
        response.text()
    );
    assert_eq!(trusted.upstream.received().len(), 1);
}
