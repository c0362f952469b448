//! The partners' signing kit, end to end: `keyfence sign` (headers, curl, `--explain`) reproduces
//! the published vectors and is allowed through the real Envoy (`deploy/envoy/envoy.yaml`) to
//! keyfence; `keys create --private-key-out` registers only a public key, and a key pair made with
//! openssl registers and signs as the guide says; the reference signers in
//! `examples/signing/` reproduce every vector and are allowed through Envoy; and a detailed
//! `SIGNATURE_INVALID` denial shows the server's canonical string, the opaque one nothing.
//!
//! The reference signers run on the Python in `.venv` (with `cryptography`) and the `node` on the
//! PATH, which `scripts/test` installs when missing; a missing one fails these tests, never skips.

mod common;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use common::{envoy::*, *};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The address the partners' keys are allowed from, and that every client here sends from.
const PARTNER_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
const UNLISTED_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const JSON_BODY: &[u8] = br#"{"amount":100,"currency":"EUR"}"#;

/// keyfence, an upstream, and Envoy in front of the upstream asking keyfence.
struct Stack {
    keyfence: Server,
    upstream: Upstream,
    envoy: Envoy,
}

impl Stack {
    async fn start(keyfence_args: &[&str]) -> Stack {
        // deploy/envoy/envoy.yaml forwards bodies (with_request_body), so keyfence is told so: a
        // signed request without a content-length then has no body, as Envoy reports it.
        let mut args = vec!["--envoy-with-request-body"];
        args.extend_from_slice(keyfence_args);
        let keyfence = Server::start(&args);
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(&deploy_config(keyfence.data_addr, upstream.addr)).await;
        Stack {
            keyfence,
            upstream,
            envoy,
        }
    }

    fn base_url(&self) -> String {
        format!("http://{}", self.envoy.listen)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Hmac,
    Ed25519,
}

/// A partner's files for one key, made with the CLI as an operator would: the API key and the
/// signing key (the HMAC secret, or the Ed25519 private key that never left this directory).
struct Partner {
    dir: tempfile::TempDir,
    scheme: Scheme,
}

impl Partner {
    fn create(server: &Server, scheme: Scheme) -> Partner {
        let dir = tempfile::tempdir().unwrap();
        let signing: [&str; 4] = match scheme {
            Scheme::Hmac => [
                "--scheme",
                "hmac-sha256",
                "--signing-secret-file",
                "signing.key",
            ],
            Scheme::Ed25519 => ["--scheme", "ed25519", "--private-key-out", "signing.key"],
        };
        let mut args = vec!["--allow", "127.0.0.1", "--secret-file", "api.key"];
        args.extend(signing);
        succeeded(&create_key(server, dir.path(), "signing partner", &args));
        Partner { dir, scheme }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn api_key(&self) -> String {
        std::fs::read_to_string(self.path("api.key")).unwrap()
    }

    fn signing_key(&self) -> String {
        std::fs::read_to_string(self.path("signing.key")).unwrap()
    }

    /// `--secret-file signing.key` or `--private-key-file signing.key`.
    fn signing_flag(&self) -> &'static str {
        match self.scheme {
            Scheme::Hmac => "--secret-file",
            Scheme::Ed25519 => "--private-key-file",
        }
    }

    /// `keyfence sign` for this partner; `body` is written to body.bin and signed when given.
    fn sign(&self, method: &str, path: &str, body: Option<&[u8]>, extra: &[&str]) -> Output {
        let mut command = Command::new(BIN);
        command
            .current_dir(self.dir.path())
            .args([
                "sign",
                "--key-file",
                "api.key",
                self.signing_flag(),
                "signing.key",
            ])
            .args(["--method", method, "--path", path])
            .args(extra);
        if let Some(body) = body {
            std::fs::write(self.path("body.bin"), body).unwrap();
            command.args(["--body-file", "body.bin"]);
        }
        command.output().expect("run keyfence sign")
    }
}

/// `keyfence keys create --partner acme --env production --name NAME ARGS…`.
fn create_key(server: &Server, dir: &Path, name: &str, args: &[&str]) -> Output {
    let mut all = vec![
        "keys",
        "create",
        "--partner",
        "acme",
        "--env",
        "production",
        "--name",
        name,
    ];
    all.extend_from_slice(args);
    admin_cli(server, dir, &all)
}

/// `name: value` lines, as `keyfence sign` prints them.
fn parse_headers(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(|line| {
            let (name, value) = line.split_once(": ").expect("a `name: value` line");
            (name.to_owned(), value.to_owned())
        })
        .collect()
}

fn request<'a>(
    method: &'a str,
    path: &'a str,
    body: Option<&[u8]>,
    headers: &'a [(String, String)],
) -> Request<'a> {
    let mut request = match body {
        Some(body) => Request::post(path, body),
        None => Request::get(path),
    };
    request.method = method;
    for (name, value) in headers {
        request = request.header(name, value.clone());
    }
    request
}

/// Runs a client program with no proxy settings, so that it reaches Envoy on loopback directly.
fn client(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(program);
    for proxy in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ] {
        command.env_remove(proxy);
    }
    command
}

/// The Python the reference signer runs on: `.venv/bin/python3`, where `scripts/test` installs
/// `cryptography`, or `KEYFENCE_PYTHON`.
fn python() -> PathBuf {
    let python = std::env::var_os("KEYFENCE_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join(".venv/bin/python3"));
    let works = client(&python)
        .args(["-c", "import cryptography"])
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        works,
        "{} cannot import cryptography, which examples/signing/sign.py needs for Ed25519: run \
         ./scripts/test (it makes .venv and installs it), or python3 -m venv .venv && \
         .venv/bin/pip install cryptography, or point KEYFENCE_PYTHON at a python3 that has it",
        python.display()
    );
    python
}

/// The `node` on the PATH (or `KEYFENCE_NODE`), which examples/signing/sign.js runs on.
fn node() -> PathBuf {
    let node = std::env::var_os("KEYFENCE_NODE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("node"));
    let works = client(&node)
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        works,
        "no Node.js ({}) for examples/signing/sign.js: run ./scripts/test (it installs Debian's \
         nodejs), or apt-get install nodejs, or point KEYFENCE_NODE at one",
        node.display()
    );
    node
}

fn curl_available() {
    let works = client("curl")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        works,
        "no curl to run `keyfence sign --format curl` with: run ./scripts/test (it installs \
         Debian's curl), or apt-get install curl"
    );
}

/// The reference signers: how to run each.
fn reference_signers() -> [(&'static str, PathBuf, PathBuf); 2] {
    let examples = Path::new(ROOT).join("examples/signing");
    [
        ("python", python(), examples.join("sign.py")),
        ("node", node(), examples.join("sign.js")),
    ]
}

fn published_vectors() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(Path::new(ROOT).join("docs/signing-test-vectors.json"))
        .expect("docs/signing-test-vectors.json");
    let file: serde_json::Value = serde_json::from_str(&text).unwrap();
    file["vectors"].as_array().unwrap().clone()
}

#[test]
fn keyfence_sign_reproduces_every_published_vector_and_never_prints_the_secret() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.key"), "kf_live_vectorkey\n").unwrap();
    let vectors = published_vectors();
    assert!(vectors.len() >= 10, "{}", vectors.len());
    for vector in vectors {
        let name = vector["name"].as_str().unwrap();
        let text = |field: &str| vector[field].as_str().unwrap().to_owned();
        let (flag, secret) = match vector["secret_base64"].as_str() {
            Some(secret) => ("--secret-file", secret.to_owned()),
            None => ("--private-key-file", text("private_key_pem")),
        };
        std::fs::write(dir.path().join("signing.key"), &secret).unwrap();
        let body = base64::engine::general_purpose::STANDARD
            .decode(text("body_base64"))
            .unwrap();
        std::fs::write(dir.path().join("body.bin"), &body).unwrap();
        let timestamp = vector["timestamp"].to_string();
        let output = Command::new(BIN)
            .current_dir(dir.path())
            .args(["sign", "--key-file", "api.key", flag, "signing.key"])
            .args(["--method", &text("method"), "--path", &text("path")])
            .args(["--timestamp", &timestamp, "--nonce", &text("nonce")])
            .args(["--body-file", "body.bin", "--explain"])
            .output()
            .unwrap();
        let headers = parse_headers(&succeeded(&output));
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        };
        let expected = &vector["expected"];
        assert_eq!(header("x-api-key"), Some("kf_live_vectorkey"), "{name}");
        assert_eq!(
            header("x-signature"),
            expected["signature"].as_str(),
            "{name}"
        );
        assert_eq!(header("x-timestamp"), Some(timestamp.as_str()), "{name}");
        let nonce = text("nonce");
        assert_eq!(
            header("x-nonce"),
            (!nonce.is_empty()).then_some(nonce.as_str()),
            "{name}"
        );

        let explained = String::from_utf8(output.stderr).unwrap();
        let canonical = expected["canonical_string"].as_str().unwrap();
        assert!(
            explained.contains(&format!(
                "-----BEGIN CANONICAL STRING-----\n{canonical}\n-----END CANONICAL STRING-----\n"
            )),
            "{name}: {explained}"
        );
        assert!(
            explained.contains(expected["canonical_string_hex"].as_str().unwrap()),
            "{name}: {explained}"
        );
        // Neither the secret nor any line of the private key's PEM is printed.
        let all = format!("{}{explained}", String::from_utf8_lossy(&output.stdout));
        for line in secret.lines().filter(|line| !line.starts_with("-----")) {
            assert!(!all.contains(line.trim()), "{name}: the secret was printed");
        }
    }
}

#[test]
fn keyfence_sign_refuses_what_could_only_be_denied() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.key"), "kf_live_x").unwrap();
    std::fs::write(dir.path().join("secret"), "c2VjcmV0").unwrap();
    let sign = |extra: &[&str]| {
        Command::new(BIN)
            .current_dir(dir.path())
            .args(["sign", "--key-file", "api.key", "--secret-file", "secret"])
            .args(extra)
            .output()
            .unwrap()
    };
    let refused = |extra: &[&str], message: &str| {
        let output = sign(extra);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{extra:?} was accepted");
        assert!(stderr.contains(message), "{extra:?}: {stderr}");
    };
    refused(&["--path", "https://api.example.com/v1"], "not a URL");
    refused(&["--path", "/v1/a#frag"], "fragment");
    refused(
        &["--path", "/v1/a", "--nonce", "has space"],
        "printable ASCII",
    );
    refused(
        &["--path", "/v1/a", "--nonce", &"n".repeat(129)],
        "at most 128",
    );
    refused(&["--path", "/v1/a", "--format", "curl"], "--base-url");
    refused(
        &["--path", "/v1/a", "--method", "GET /x"],
        "not an HTTP method",
    );
    std::fs::write(dir.path().join("secret"), "not base64!").unwrap();
    refused(
        &["--path", "/v1/a"],
        "secret: expected the base64 signing secret",
    );

    // A fresh nonce and the current time unless given.
    std::fs::write(dir.path().join("secret"), "c2VjcmV0").unwrap();
    let first = parse_headers(&succeeded(&sign(&["--path", "/v1/a"])));
    let second = parse_headers(&succeeded(&sign(&["--path", "/v1/a"])));
    let value = |headers: &[(String, String)], name: &str| {
        headers.iter().find(|(n, _)| n == name).unwrap().1.clone()
    };
    assert_ne!(value(&first, "x-nonce"), value(&second, "x-nonce"));
    assert_eq!(value(&first, "x-nonce").len(), 32);
    let signed_at: i64 = value(&first, "x-timestamp").parse().unwrap();
    assert!((signed_at - now_secs()).abs() <= 5, "{signed_at}");
}

async fn keys(server: &Server) -> Vec<keyfence::grpc::pb::ApiKey> {
    let mut admin = server.admin().await;
    admin
        .list_keys(keyfence::grpc::pb::ListKeysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .keys
}

async fn key_count(server: &Server) -> usize {
    keys(server).await.len()
}

#[tokio::test]
async fn keys_create_private_key_out_registers_only_the_public_key() {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    let server = Server::start(&[]);
    let partner = Partner::create(&server, Scheme::Ed25519);
    let pem = partner.signing_key();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(partner.path("signing.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let private_key = ed25519_dalek::SigningKey::from_pkcs8_pem(&pem).unwrap();
    let keys = keys(&server).await;
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0].public_key,
        private_key.verifying_key().to_bytes().to_vec(),
        "the server holds the public key of the private key written"
    );
    let pem_body = pem.lines().nth(1).unwrap();
    assert!(
        !server.log().contains(pem_body),
        "the private key was logged"
    );

    // An existing key file is never overwritten unless asked, and no key is created meanwhile.
    let create_again = |extra: &[&str]| {
        let mut args = vec!["--scheme", "ed25519", "--private-key-out", "signing.key"];
        args.extend_from_slice(extra);
        create_key(&server, partner.dir.path(), "again", &args)
    };
    let refused = create_again(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already exists"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(partner.signing_key(), pem);
    assert_eq!(key_count(&server).await, 1);
    succeeded(&create_again(&["--force"]));
    assert_ne!(partner.signing_key(), pem);
    assert_eq!(key_count(&server).await, 2);

    // The flag belongs to Ed25519 only; an HMAC secret file is refused the same way.
    let wrong_scheme = create_key(
        &server,
        partner.dir.path(),
        "x",
        &["--scheme", "hmac-sha256", "--private-key-out", "other.pem"],
    );
    assert!(!wrong_scheme.status.success());
    let same_file = create_key(
        &server,
        partner.dir.path(),
        "x",
        &[
            "--scheme",
            "ed25519",
            "--private-key-out",
            "same.pem",
            "--secret-file",
            "same.pem",
        ],
    );
    assert!(!same_file.status.success());
    assert!(!partner.path("same.pem").exists());
    assert!(!partner.path("other.pem").exists());
    let secret_in_the_way = create_key(
        &server,
        partner.dir.path(),
        "x",
        &[
            "--scheme",
            "hmac-sha256",
            "--signing-secret-file",
            "signing.key",
        ],
    );
    assert!(!secret_in_the_way.status.success());
    assert_eq!(
        key_count(&server).await,
        2,
        "no key is created for a secret with nowhere to go"
    );
}

#[tokio::test]
async fn a_key_pair_made_with_openssl_registers_and_signs() {
    // What the guide tells a partner with no keyfence: openssl makes the pair, the operator
    // registers the PEM public key, and keyfence sign reads the PEM private key as written.
    let server = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect(
                "no openssl: run ./scripts/test (it installs Debian's openssl), or apt-get install openssl",
            );
        succeeded(&output);
    };
    openssl(&["genpkey", "-algorithm", "ed25519", "-out", "own.pem"]);
    openssl(&["pkey", "-in", "own.pem", "-pubout", "-out", "own.pub.pem"]);
    let refused = create_key(
        &server,
        dir.path(),
        "own",
        &["--scheme", "ed25519", "--public-key-file", "own.pem"],
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("never the private key"),
        "a private key was accepted as the public one"
    );
    succeeded(&create_key(
        &server,
        dir.path(),
        "own",
        &[
            "--scheme",
            "ed25519",
            "--public-key-file",
            "own.pub.pem",
            "--allow",
            "127.0.0.1",
            "--secret-file",
            "api.key",
        ],
    ));
    let partner = Partner {
        dir,
        scheme: Scheme::Ed25519,
    };
    std::fs::rename(partner.path("own.pem"), partner.path("signing.key")).unwrap();
    let headers = parse_headers(&succeeded(&partner.sign("GET", "/v1/orders", None, &[])));
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let checked = admin_cli(
        &server,
        partner.dir.path(),
        &[
            "check",
            "--json",
            "--key-file",
            "api.key",
            "--ip",
            "127.0.0.1",
            "--signature",
            &header("x-signature"),
            "--timestamp",
            &header("x-timestamp"),
            "--nonce",
            &header("x-nonce"),
            "--path",
            "/v1/orders",
        ],
    );
    let answer: serde_json::Value = serde_json::from_str(&succeeded(&checked)).unwrap();
    assert_eq!(answer["decision"], "allow", "{answer}");
}

// Multi-threaded: the upstream keeps serving while this thread waits for a client process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyfence_sign_output_is_allowed_through_envoy() {
    curl_available();
    let stack = Stack::start(&[]).await;
    for scheme in [Scheme::Hmac, Scheme::Ed25519] {
        let partner = Partner::create(&stack.keyfence, scheme);
        for (method, path, body) in [
            ("GET", "/v1/orders?status=open&limit=10", None),
            ("POST", "/v1/payments?currency=EUR", Some(JSON_BODY)),
        ] {
            let what = format!("{scheme:?} {method} {path}");
            let headers = parse_headers(&succeeded(&partner.sign(method, path, body, &[])));
            let signed = request(method, path, body, &headers);
            let response = send(PARTNER_IP, stack.envoy.listen, &signed).await;
            assert_eq!(response.status, 200, "{what}: {}", response.text());
            let received = stack.upstream.received();
            let last = received.last().unwrap();
            assert_eq!((last.method.as_str(), last.path.as_str()), (method, path));
            assert_eq!(last.body, body.unwrap_or_default(), "{what}");
            // The nonce was fresh, and now it is spent: the same headers again are a replay.
            let replayed = send(PARTNER_IP, stack.envoy.listen, &signed).await;
            assert_eq!(replayed.status, 401, "{what}: a replay was allowed");

            // The curl command line, run as printed.
            let base_url = stack.base_url();
            let curl = succeeded(&partner.sign(
                method,
                path,
                body,
                &["--format", "curl", "--base-url", &base_url],
            ));
            let output = client("bash")
                .args(["-c", &curl])
                .current_dir(partner.dir.path())
                .output()
                .unwrap();
            let printed = succeeded(&output);
            assert!(
                printed.starts_with("HTTP/1.1 200"),
                "{what}: {curl}\n{printed}"
            );
            assert_eq!(
                stack.upstream.received().last().unwrap().body,
                body.unwrap_or_default()
            );
        }
        let log = stack.keyfence.log();
        assert!(
            !log.contains(partner.api_key().trim()),
            "the key was logged"
        );
        for line in partner
            .signing_key()
            .lines()
            .filter(|l| !l.starts_with("-----"))
        {
            assert!(!log.contains(line.trim()), "the signing key was logged");
        }
    }
    assert_eq!(stack.upstream.received().len(), 8);
}

#[test]
fn reference_signers_reproduce_every_published_vector() {
    let vectors_file = Path::new(ROOT).join("docs/signing-test-vectors.json");
    let count = published_vectors().len();
    for (name, program, script) in reference_signers() {
        let output = client(&program)
            .arg(&script)
            .arg("vectors")
            .arg(&vectors_file)
            .output()
            .unwrap();
        let printed = succeeded(&output);
        assert!(
            printed.ends_with(&format!("{count} of {count} vectors reproduced\n")),
            "{name}: {printed}"
        );
        assert_eq!(
            printed.lines().filter(|l| l.starts_with("ok ")).count(),
            count,
            "{name}"
        );
    }
}

// Multi-threaded: the upstream keeps serving while this thread waits for a client process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_signers_are_allowed_through_envoy() {
    let signers = reference_signers();
    let stack = Stack::start(&[]).await;
    let base_url = stack.base_url();
    let mut sent = 0;
    for scheme in [Scheme::Hmac, Scheme::Ed25519] {
        let partner = Partner::create(&stack.keyfence, scheme);
        std::fs::write(partner.path("body.json"), JSON_BODY).unwrap();
        for (name, program, script) in &signers {
            for (method, path, body) in [
                ("GET", "/v1/orders?limit=10", None),
                ("POST", "/v1/payments?currency=EUR", Some("body.json")),
            ] {
                let mut command = client(program);
                command
                    .current_dir(partner.dir.path())
                    .arg(script)
                    .args(["send", &base_url, method, path, "api.key", "signing.key"])
                    .args(body);
                let output = command.output().unwrap();
                let printed = succeeded(&output);
                assert_eq!(
                    printed.lines().next(),
                    Some("200"),
                    "{name} {scheme:?} {method}: {printed}"
                );
                sent += 1;
                let received = stack.upstream.received();
                let last = received.last().unwrap();
                assert_eq!(last.path, path);
                assert_eq!(last.body, body.map_or(&b""[..], |_| JSON_BODY));
                assert!(last.header("x-signature").is_none());
            }
        }
    }
    assert_eq!(stack.upstream.received().len(), sent);
}

#[tokio::test]
async fn detailed_denials_show_the_servers_canonical_string_only_when_on() {
    use keyfence_policy::signature::canonical_string;
    const UNAUTHORIZED: &str = r#"{"code":401,"msg":"Unauthorized"}"#;
    let sent_path = "/v1/payments?currency=USD";

    // Signed for one path, sent to another: what a proxy that rewrites the path does.
    let mismatched = |partner: &Partner| {
        parse_headers(&succeeded(&partner.sign(
            "POST",
            "/v1/payments?currency=EUR",
            Some(JSON_BODY),
            &[],
        )))
    };

    let detailed = Stack::start(&["--detailed-denials"]).await;
    let partner = Partner::create(&detailed.keyfence, Scheme::Hmac);
    let headers = mismatched(&partner);
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).unwrap().1.clone();
    let before = now_secs();
    let response = send(
        PARTNER_IP,
        detailed.envoy.listen,
        &request("POST", sent_path, Some(JSON_BODY), &headers),
    )
    .await;
    assert_eq!(response.status, 401);
    let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
    assert_eq!(body["error"]["code"], "SIGNATURE_INVALID", "{body}");
    let timestamp: i64 = header("x-timestamp").parse().unwrap();
    let server_canonical =
        canonical_string(timestamp, &header("x-nonce"), "POST", sent_path, JSON_BODY);
    assert_eq!(
        body["error"]["details"]["canonicalString"],
        String::from_utf8(server_canonical).unwrap(),
        "{body}"
    );
    let server_time = body["error"]["details"]["serverTime"].as_i64().unwrap();
    assert!((before..=now_secs()).contains(&server_time), "{body}");
    let text = response.text();
    assert!(
        !text.contains(partner.signing_key().trim()),
        "the secret was sent"
    );
    assert!(
        !text.contains(partner.api_key().trim()),
        "the key was echoed"
    );

    // The operator's side (docs/partner-guide.md): a dry run with the partner's signature allows
    // the path as signed and refuses the path as received. It consumes no nonce.
    let key_id = keys(&detailed.keyfence).await[0].id.clone();
    let dry_run = |path: &str| {
        std::fs::write(partner.path("body.bin"), JSON_BODY).unwrap();
        let output = admin_cli(
            &detailed.keyfence,
            partner.dir.path(),
            &[
                "check",
                "--json",
                "--key-id",
                &key_id,
                "--ip",
                "127.0.0.1",
                "--signature",
                &header("x-signature"),
                "--timestamp",
                &header("x-timestamp"),
                "--nonce",
                &header("x-nonce"),
                "--method",
                "POST",
                "--path",
                path,
                "--body-file",
                "body.bin",
            ],
        );
        // `check` exits 0 on ALLOW and 2 on DENY; anything else is a failure.
        let code = output.status.code();
        assert!(
            matches!(code, Some(0 | 2)),
            "exit {code:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(code == Some(2), answer["decision"] == "deny", "{answer}");
        (answer["decision"].clone(), answer["reason"].clone())
    };
    assert_eq!(
        dry_run("/v1/payments?currency=EUR"),
        ("allow".into(), serde_json::Value::Null)
    );
    assert_eq!(
        dry_run(sent_path),
        ("deny".into(), "signature_invalid".into())
    );

    // Off (the default): the same mistake and an IP denial look exactly alike.
    let opaque = Stack::start(&[]).await;
    let partner = Partner::create(&opaque.keyfence, Scheme::Hmac);
    let headers = mismatched(&partner);
    let bad_signature = send(
        PARTNER_IP,
        opaque.envoy.listen,
        &request("POST", sent_path, Some(JSON_BODY), &headers),
    )
    .await;
    let good = parse_headers(&succeeded(&partner.sign(
        "POST",
        sent_path,
        Some(JSON_BODY),
        &[],
    )));
    let bad_ip = send(
        UNLISTED_IP,
        opaque.envoy.listen,
        &request("POST", sent_path, Some(JSON_BODY), &good),
    )
    .await;
    for (what, response) in [("bad signature", &bad_signature), ("bad ip", &bad_ip)] {
        assert_eq!(response.status, 401, "{what}");
        assert_eq!(response.text(), UNAUTHORIZED, "{what}");
        assert_eq!(response.header("content-type"), Some("application/json"));
    }
    let names = |response: &Response| {
        let mut names: Vec<String> = response
            .headers
            .iter()
            .map(|(name, _)| name.clone())
            .filter(|name| name != "date")
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(&bad_signature), names(&bad_ip));
    assert!(opaque.upstream.received().is_empty());
    assert!(detailed.upstream.received().is_empty());
}
