//! The shared harness: starts the real `keyfence` binary on free loopback ports with its own data
//! directory, and hands out gRPC clients. The server is killed when the handle drops. [`envoy`]
//! starts Envoy in front of it.

#![allow(dead_code)]

pub mod envoy;
pub mod pki;
pub mod redis;

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use keyfence::grpc::pb::{self, admin_client::AdminClient, authorizer_client::AuthorizerClient};
use tonic::{
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

pub const BIN: &str = env!("CARGO_BIN_EXE_keyfence");

/// Presents the server's admin token on every call.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// An Admin client that authenticates as the server's `admin` token.
pub type Admin = AdminClient<InterceptedService<Channel, Bearer>>;

pub struct Server {
    child: Child,
    pub data_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Set when started with `--metrics-listen`.
    pub metrics_addr: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// The admin token the server accepts: `--admin-token` when given, else the one it wrote to
    /// its data directory.
    pub admin_token: String,
    /// Keeps the temporary directory alive when the server made it.
    _temp: Option<tempfile::TempDir>,
}

impl Server {
    /// A server with a fresh data directory.
    pub fn start(extra_args: &[&str]) -> Server {
        Server::start_with_env(extra_args, &[])
    }

    /// A server with a fresh data directory and extra environment variables.
    pub fn start_with_env(extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let temp = tempfile::tempdir().expect("temp dir");
        let mut server = Server::launch(temp.path(), extra_args, env);
        server._temp = Some(temp);
        server
    }

    /// A server on an existing data directory (to restart on the same data).
    pub fn start_in(data_dir: &Path, extra_args: &[&str]) -> Server {
        Server::launch(data_dir, extra_args, &[])
    }

    fn launch(data_dir: &Path, extra_args: &[&str], env: &[(&str, &str)]) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.join("server.log"))
            .expect("log file");
        let mut child = Command::new(BIN)
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir.join("data"))
            .args(extra_args)
            .env_remove("KEYFENCE_ADMIN_TOKEN")
            .env_remove("KEYFENCE_ADMIN_TOKENS_FILE")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start keyfence");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(rest) = line.strip_prefix("keyfence ready: ") {
                    let _ = tx.send(rest.to_owned());
                }
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let log = std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default();
                panic!("keyfence did not become ready within 30 s; its log:\n{log}");
            }
        };
        let find = |name: &str| -> Option<SocketAddr> {
            ready
                .split_whitespace()
                .find_map(|part| part.strip_prefix(&format!("{name}=")))
                .and_then(|a| a.parse().ok())
        };
        let addr =
            |name: &str| find(name).unwrap_or_else(|| panic!("no {name} address in {ready:?}"));
        let admin_token = match extra_args.iter().position(|a| *a == "--admin-token") {
            Some(at) => extra_args[at + 1].to_owned(),
            None => std::fs::read_to_string(data_dir.join("data").join("admin.token"))
                .map(|t| t.trim().to_owned())
                .unwrap_or_default(),
        };
        Server {
            data_addr: addr("data"),
            admin_addr: addr("admin"),
            metrics_addr: find("metrics"),
            child,
            data_dir: data_dir.to_owned(),
            admin_token,
            _temp: None,
        }
    }

    pub async fn channel(addr: SocketAddr) -> Channel {
        Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// An Admin client presenting the server's admin token.
    pub async fn admin(&self) -> Admin {
        let bearer = Bearer(
            format!("Bearer {}", self.admin_token)
                .parse()
                .expect("printable token"),
        );
        AdminClient::with_interceptor(Self::channel(self.admin_addr).await, bearer)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20)
    }

    /// An Admin client with no credentials at all.
    pub async fn admin_unauthenticated(&self) -> AdminClient<Channel> {
        AdminClient::new(Self::channel(self.admin_addr).await)
    }

    /// The file the server wrote its generated admin token to.
    pub fn admin_token_file(&self) -> PathBuf {
        self.data_dir.join("data").join("admin.token")
    }

    pub async fn authorizer(&self) -> AuthorizerClient<Channel> {
        AuthorizerClient::new(Self::channel(self.data_addr).await)
    }

    /// Stops the server (SIGKILL: nothing may depend on a clean shutdown) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The Prometheus text from `/metrics` (the server must run with `--metrics-listen`).
    pub async fn metrics_text(&self) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = self.metrics_addr.expect("started with --metrics-listen");
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to metrics");
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_owned()
    }

    /// Sends SIGTERM, as an orchestrator does, without waiting.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// Waits up to `limit` for the process to exit by itself; its exit status.
    pub async fn wait_for_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for keyfence") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "keyfence did not exit within {limit:?}; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The secrets key file `dir/secrets.key`, made with `keyfence secrets add-key` when absent: what
/// Redis replicas share so that they can seal and open HMAC signing secrets.
pub fn shared_secrets_key_file(dir: &Path) -> PathBuf {
    let path = dir.join("secrets.key");
    if !path.exists() {
        let output = Command::new(BIN)
            .args(["secrets", "add-key", "--secrets-key-file"])
            .arg(&path)
            .env_remove("KEYFENCE_SECRETS_KEY_FILE")
            .output()
            .expect("run keyfence secrets add-key");
        assert!(
            output.status.success(),
            "keyfence secrets add-key: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    path
}

/// Runs the `keyfence` CLI in `dir` against `server`'s admin listener, as `ci-bot`, with the admin
/// token the server generated.
pub fn admin_cli(server: &Server, dir: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env(
            "KEYFENCE_ADMIN_ADDR",
            format!("http://{}", server.admin_addr),
        )
        .env("KEYFENCE_ACTOR", "ci-bot")
        .env("KEYFENCE_ADMIN_TOKEN_FILE", server.admin_token_file())
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .output()
        .expect("run keyfence")
}

/// A command's stdout, after asserting that it succeeded (showing both streams if not).
pub fn succeeded(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

pub fn entry(cidr: &str) -> pb::AllowlistEntryInput {
    pb::AllowlistEntryInput {
        cidr: cidr.into(),
        description: format!("test entry {cidr}"),
        expires_at: None,
    }
}

pub fn key_scope(id: &str) -> Option<pb::AllowlistScope> {
    Some(pb::AllowlistScope {
        scope: Some(pb::allowlist_scope::Scope::KeyId(id.into())),
    })
}

pub fn partner_scope(partner: &str, environment: &str) -> Option<pb::AllowlistScope> {
    Some(pb::AllowlistScope {
        scope: Some(pb::allowlist_scope::Scope::Partner(pb::PartnerScope {
            partner_id: partner.into(),
            environment: environment.into(),
        })),
    })
}

/// A key with an IP allowlist of `cidrs`; returns (id, secret, signing secret).
pub async fn create_key(
    admin: &mut Admin,
    partner: &str,
    environment: &str,
    cidrs: &[&str],
) -> pb::CreateKeyResponse {
    admin
        .create_key(pb::CreateKeyRequest {
            partner_id: partner.into(),
            environment: environment.into(),
            name: format!("{partner} test key"),
            ip_allowlist_enabled: Some(true),
            allowlist: cidrs.iter().map(|c| entry(c)).collect(),
            ..Default::default()
        })
        .await
        .expect("create key")
        .into_inner()
}

/// A request for an HMAC-signing key of partner acme in production, with an IP allowlist of
/// `cidrs` (no entries: allowlist off).
pub fn hmac_key_request(name: &str, cidrs: &[&str]) -> pb::CreateKeyRequest {
    pb::CreateKeyRequest {
        partner_id: "acme".into(),
        environment: "production".into(),
        name: name.into(),
        ip_allowlist_enabled: Some(!cidrs.is_empty()),
        allowlist: cidrs.iter().map(|c| entry(c)).collect(),
        signature_scheme: pb::SignatureScheme::HmacSha256 as i32,
        ..Default::default()
    }
}

/// The signing secret a created HMAC key was given, decoded.
pub fn signing_secret(created: &pb::CreateKeyResponse) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(&created.signing_secret)
        .expect("the signing secret is base64")
}

pub fn authorize_request(api_key: &str, ip: &str) -> pb::AuthorizeRequest {
    pb::AuthorizeRequest {
        api_key: api_key.into(),
        client_ip: ip.into(),
        signature: None,
        min_revision: 0,
    }
}

/// Authorize and return (decision, reason).
pub async fn decide(
    authorizer: &mut AuthorizerClient<Channel>,
    request: pb::AuthorizeRequest,
) -> (pb::Decision, pb::DenyReason) {
    let response = authorizer
        .authorize(request)
        .await
        .expect("authorize")
        .into_inner();
    (response.decision(), response.reason())
}

pub const ALLOW: (pb::Decision, pb::DenyReason) =
    (pb::Decision::Allow, pb::DenyReason::Unspecified);

pub fn denied(reason: pb::DenyReason) -> (pb::Decision, pb::DenyReason) {
    (pb::Decision::Deny, reason)
}

pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
