//! Secure defaults against the real binary: admin authentication is never off, the audit trail
//! names the authenticated principal, TLS and mTLS on both planes with certificate rotation, the
//! CLI over TLS, and the data plane's allowed callers. Certificates come from a throwaway CA
//! (`common::pki`, rcgen).

mod common;

use std::{path::Path, sync::Arc, time::Duration};

use common::{
    pki::{Ca, Pair},
    *,
};
use keyfence::{authn::tokens_file_line, grpc::pb};
use tonic::{
    Code,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

async fn tls_channel(
    addr: std::net::SocketAddr,
    ca: &Path,
    identity: Option<&Pair>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)))
        .domain_name("localhost");
    if let Some(pair) = identity {
        tls = tls.identity(Identity::from_pem(read(&pair.cert), read(&pair.key)));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn authorize(api_key: &str) -> pb::AuthorizeRequest {
    authorize_request(api_key, "203.0.113.9")
}

#[tokio::test]
async fn admin_needs_credentials_even_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_in(dir.path(), &[]);
    let status = server
        .admin_unauthenticated()
        .await
        .list_keys(pb::ListKeysRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    let file = server.admin_token_file();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", file.display());
    assert!(server.admin_token.starts_with("kfadm_"));
    let log = server.log();
    assert!(
        log.contains("admin.token"),
        "the log names the file:\n{log}"
    );
    assert!(
        !log.contains(&server.admin_token),
        "the log never holds the token"
    );

    // The same token on a restart: the file is kept, not replaced.
    let token = server.admin_token.clone();
    drop(server);
    let restarted = Server::start_in(dir.path(), &[]);
    assert_eq!(restarted.admin_token, token);
    assert!(
        restarted
            .admin()
            .await
            .list_keys(pb::ListKeysRequest::default())
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn named_tokens_record_their_principal_and_the_actor_only_adds_detail() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(
        &tokens,
        format!(
            "# one line per person\n{}\n{}\n",
            tokens_file_line("ops", "ops-token-0123456789abcdef").unwrap(),
            tokens_file_line("ci", "ci-token-0123456789abcdef").unwrap()
        ),
    )
    .unwrap();
    let server = Server::start(&["--admin-tokens-file", tokens.to_str().unwrap()]);
    assert!(
        !server.admin_token_file().exists(),
        "no generated token when tokens are configured"
    );
    let mut admin = server.admin_unauthenticated().await;

    let mut create = with_token(
        pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "production".into(),
            name: "audited".into(),
            ip_allowlist_enabled: Some(true),
            allowlist: vec![entry("203.0.113.0/24")],
            ..Default::default()
        },
        "ops-token-0123456789abcdef",
    );
    // A caller claiming to be someone else only adds detail after the principal.
    create
        .metadata_mut()
        .insert("x-keyfence-actor", "ci".parse().unwrap());
    let created = admin.create_key(create).await.unwrap().into_inner();
    let key = created.key.unwrap();
    assert_eq!(key.created_by, "ops/ci");
    let list = admin
        .get_allowlist(with_token(
            pb::GetAllowlistRequest {
                scope: key_scope(&key.id),
            },
            "ci-token-0123456789abcdef",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.entries[0].added_by, "ops/ci");

    let revoked = admin
        .revoke_key(with_token(
            pb::RevokeKeyRequest {
                key_id: key.id.clone(),
            },
            "ci-token-0123456789abcdef",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(revoked.key.unwrap().updated_by, "ci");

    let status = admin
        .list_keys(with_token(
            pb::ListKeysRequest::default(),
            "ops-token-0123456789abcdeX",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(!server.log().contains("ops-token-0123456789abcdef"));
}

#[tokio::test]
async fn admin_token_new_makes_a_private_token_and_its_digest_line() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("alice.token");
    let output = cli(
        &[
            "admin-token",
            "new",
            "--name",
            "alice",
            "--token-out",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = String::from_utf8(output.stdout).unwrap();
    let token = std::fs::read_to_string(&token_file)
        .unwrap()
        .trim()
        .to_owned();
    assert!(!line.contains(&token), "the line holds only the digest");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&token_file).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    let tokens = dir.path().join("admin-tokens");
    std::fs::write(&tokens, &line).unwrap();
    let server = Server::start(&["--admin-tokens-file", tokens.to_str().unwrap()]);
    let created = server
        .admin_unauthenticated()
        .await
        .create_key(with_token(
            pb::CreateKeyRequest {
                partner_id: "acme".into(),
                environment: "sandbox".into(),
                name: "alice's".into(),
                ..Default::default()
            },
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.key.unwrap().created_by, "alice");
    // An existing file is never overwritten.
    let again = cli(
        &[
            "admin-token",
            "new",
            "--name",
            "alice",
            "--token-out",
            token_file.to_str().unwrap(),
        ],
        &[],
    );
    assert!(!again.status.success());
}

#[tokio::test]
async fn tls_on_both_planes() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let data = ca.server(dir.path(), "data", "keyfence-data");
    let admin_pair = ca.server(dir.path(), "admin", "keyfence-admin");
    let server = Server::start(&[
        "--tls-cert",
        data.cert.to_str().unwrap(),
        "--tls-key",
        data.key.to_str().unwrap(),
        "--admin-tls-cert",
        admin_pair.cert.to_str().unwrap(),
        "--admin-tls-key",
        admin_pair.key.to_str().unwrap(),
    ]);

    // A client that trusts the CA succeeds on both planes.
    let channel = tls_channel(server.data_addr, &ca.cert, None).await.unwrap();
    let response = pb::authorizer_client::AuthorizerClient::new(channel)
        .authorize(authorize("kf_test_unknown"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.reason(), pb::DenyReason::UnknownKey);
    let channel = tls_channel(server.admin_addr, &ca.cert, None)
        .await
        .unwrap();
    let keys = pb::admin_client::AdminClient::new(channel)
        .list_keys(with_token(
            pb::ListKeysRequest::default(),
            &server.admin_token,
        ))
        .await
        .unwrap();
    assert!(keys.into_inner().keys.is_empty());

    // Plaintext to a TLS port fails, on both planes.
    for addr in [server.data_addr, server.admin_addr] {
        let plaintext = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect()
            .await;
        let failed = match plaintext {
            Err(_) => true,
            Ok(channel) => pb::authorizer_client::AuthorizerClient::new(channel)
                .authorize(authorize("kf_test_unknown"))
                .await
                .is_err(),
        };
        assert!(failed, "plaintext to the TLS port {addr} must fail");
    }

    // A client that does not trust the CA is refused.
    let other = Ca::new(dir.path(), "other-ca");
    let untrusted = match tls_channel(server.data_addr, &other.cert, None).await {
        Err(_) => true,
        Ok(channel) => pb::authorizer_client::AuthorizerClient::new(channel)
            .authorize(authorize("kf_test_unknown"))
            .await
            .is_err(),
    };
    assert!(untrusted);
}

/// Whether an RPC over a TLS connection with `identity` gets through (an mTLS refusal can surface
/// at connect or on the first call, depending on when the client reads the server's alert).
async fn mtls_call_succeeds(server: &Server, ca: &Path, identity: Option<&Pair>) -> bool {
    let Ok(channel) = tls_channel(server.data_addr, ca, identity).await else {
        return false;
    };
    pb::authorizer_client::AuthorizerClient::new(channel)
        .authorize(authorize("kf_test_unknown"))
        .await
        .is_ok()
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_good_certificate_and_names_admins_by_theirs() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let clients = Ca::new(dir.path(), "client-ca");
    let stranger_ca = Ca::new(dir.path(), "stranger-ca");
    let data = ca.server(dir.path(), "data", "keyfence-data");
    let admin_pair = ca.server(dir.path(), "admin", "keyfence-admin");
    let envoy = clients.client(dir.path(), "envoy", "envoy.mesh");
    let alice = clients.client(dir.path(), "alice", "alice@ops");
    let stranger = stranger_ca.client(dir.path(), "stranger", "mallory");
    let server = Server::start(&[
        "--tls-cert",
        data.cert.to_str().unwrap(),
        "--tls-key",
        data.key.to_str().unwrap(),
        "--tls-client-ca",
        clients.cert.to_str().unwrap(),
        "--admin-tls-cert",
        admin_pair.cert.to_str().unwrap(),
        "--admin-tls-key",
        admin_pair.key.to_str().unwrap(),
        "--admin-tls-client-ca",
        clients.cert.to_str().unwrap(),
    ]);

    assert!(
        !mtls_call_succeeds(&server, &ca.cert, None).await,
        "no certificate"
    );
    assert!(
        !mtls_call_succeeds(&server, &ca.cert, Some(&stranger)).await,
        "a certificate from another CA"
    );
    assert!(mtls_call_succeeds(&server, &ca.cert, Some(&envoy)).await);
    // The refusal is logged on the handshake's own task: wait for it rather than race it.
    let started = std::time::Instant::now();
    while !server.log().contains("tls handshake refused") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // On the admin plane a verified certificate is a principal of its own: no token needed.
    let channel = tls_channel(server.admin_addr, &ca.cert, Some(&alice))
        .await
        .unwrap();
    let mut admin = pb::admin_client::AdminClient::new(channel);
    let created = admin
        .create_key(pb::CreateKeyRequest {
            partner_id: "acme".into(),
            environment: "sandbox".into(),
            name: "by certificate".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(created.key.unwrap().created_by, "alice@ops");
    // A wrong token is refused even with a good certificate.
    let status = admin
        .list_keys(with_token(
            pb::ListKeysRequest::default(),
            "not-the-admin-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
}

/// The certificate the server presents to a new TLS connection.
async fn presented_certificate(addr: std::net::SocketAddr, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_file_iter(ca).unwrap() {
        let cert: rustls_pki_types::CertificateDer<'static> = cert.unwrap();
        roots.add(cert).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap();
    stream.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn rotated_certificates_serve_new_handshakes_and_keep_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let first = ca.server(dir.path(), "first", "first");
    let live_cert = dir.path().join("live.crt");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&first.cert, &live_cert).unwrap();
    std::fs::copy(&first.key, &live_key).unwrap();
    let server = Server::start(&[
        "--tls-cert",
        live_cert.to_str().unwrap(),
        "--tls-key",
        live_key.to_str().unwrap(),
    ]);
    assert_eq!(
        presented_certificate(server.data_addr, &ca.cert).await,
        first.der
    );
    let channel = tls_channel(server.data_addr, &ca.cert, None).await.unwrap();
    let mut open = pb::authorizer_client::AuthorizerClient::new(channel);
    open.authorize(authorize("kf_test_unknown")).await.unwrap();

    // Replace the files (key first, then certificate, each by rename as deploy tools do).
    let second = ca.server(dir.path(), "second", "second");
    for (from, to) in [(&second.key, &live_key), (&second.cert, &live_cert)] {
        let staging = to.with_extension("new");
        std::fs::copy(from, &staging).unwrap();
        std::fs::rename(&staging, to).unwrap();
    }
    let started = std::time::Instant::now();
    while presented_certificate(server.data_addr, &ca.cert).await != second.der {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "new handshakes never presented the new certificate; log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The connection opened before the rotation still works.
    open.authorize(authorize("kf_test_unknown")).await.unwrap();
    assert!(server.log().contains("tls certificates reloaded"));
}

#[tokio::test]
async fn data_allowed_callers_refuse_other_sources_before_any_lookup() {
    let server = Server::start(&["--data-allowed-callers", "127.0.0.2/32"]);
    let mut from_one = server.authorizer().await;
    let status = from_one
        .authorize(authorize("kf_test_unknown"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");

    let from_two = Endpoint::from_shared(format!("http://{}", server.data_addr))
        .unwrap()
        .local_address(Some("127.0.0.2".parse().unwrap()))
        .connect()
        .await
        .unwrap();
    let response = pb::authorizer_client::AuthorizerClient::new(from_two)
        .authorize(authorize("kf_test_unknown"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(response.reason(), pb::DenyReason::UnknownKey);
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(BIN)
        .args(args)
        .env_remove("KEYFENCE_ADMIN_TOKEN")
        .env_remove("KEYFENCE_ADMIN_TOKEN_FILE")
        .env_remove("KEYFENCE_CA_CERT")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[tokio::test]
async fn the_cli_speaks_tls_exactly_as_the_address_says() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "test-ca");
    let admin_pair = ca.server(dir.path(), "admin", "keyfence-admin");
    let server = Server::start(&[
        "--admin-tls-cert",
        admin_pair.cert.to_str().unwrap(),
        "--admin-tls-key",
        admin_pair.key.to_str().unwrap(),
    ]);
    let https = format!("https://localhost:{}", server.admin_addr.port());
    let http = format!("http://127.0.0.1:{}", server.admin_addr.port());
    let token_file = server.admin_token_file();
    let token_file = token_file.to_str().unwrap();
    let ca_cert = ca.cert.to_str().unwrap();

    // `keyfence keys list` against `addr` with `flags`: whether it succeeded, and its stderr.
    let keys_list = |addr: &str, flags: &[&str]| {
        let mut args = vec!["keys", "list", "--admin-addr", addr];
        args.extend_from_slice(flags);
        let output = cli(&args, &[("KEYFENCE_ADMIN_TOKEN_FILE", token_file)]);
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let (ok, stderr) = keys_list(&https, &["--ca-cert", ca_cert]);
    assert!(ok, "{stderr}");

    let (ok, stderr) = keys_list(&http, &["--ca-cert", ca_cert]);
    assert!(!ok);
    assert!(
        stderr.contains("--ca-cert needs an https:// admin address"),
        "{stderr}"
    );

    let (ok, stderr) = keys_list(&http, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("https://"),
        "the error suggests TLS: {stderr}"
    );

    let (ok, stderr) = keys_list(&https, &[]);
    assert!(!ok);
    assert!(stderr.contains("give --ca-cert"), "{stderr}");
}
