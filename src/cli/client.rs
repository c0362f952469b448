//! The Admin client the commands share: address (plaintext `http://` or TLS `https://`), TLS
//! material, bearer token and actor name.
//!
//! The token is the first of: `--admin-token` / `KEYFENCE_ADMIN_TOKEN`, the file named by
//! `--admin-token-file` / `KEYFENCE_ADMIN_TOKEN_FILE`, and `./keyfence-data/admin.token` (the file
//! a `keyfence serve` started in this directory writes). TLS is exactly what the address says:
//! TLS options with an `http://` address are an error, never a silent downgrade.

use std::path::{Path, PathBuf};

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};

use super::CliError;
use crate::{
    authn::{GENERATED_TOKEN_FILE, read_token_file},
    grpc::{auth::ACTOR_HEADER, pb::admin_client::AdminClient},
};

/// Where `keyfence serve` keeps its data by default, relative to where it was started.
const DEFAULT_DATA_DIR: &str = "keyfence-data";

#[derive(Debug, Clone, clap::Args)]
pub struct ClientOptions {
    /// Address of keyfence's admin listener.
    #[arg(
        long,
        global = true,
        env = "KEYFENCE_ADMIN_ADDR",
        default_value = "http://127.0.0.1:50052"
    )]
    pub admin_addr: String,
    /// Bearer token for the admin listener. Without it (or --admin-token-file), the CLI reads
    /// ./keyfence-data/admin.token.
    #[arg(
        long,
        global = true,
        env = "KEYFENCE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
    /// File holding the bearer token for the admin listener.
    #[arg(long, global = true, env = "KEYFENCE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) to verify an https:// admin listener with (default: the system's
    /// web PKI roots are not used; give the CA that issued the server's certificate).
    #[arg(long, global = true, env = "KEYFENCE_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate for an mTLS admin listener (with --client-key).
    #[arg(long, global = true, env = "KEYFENCE_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long, global = true, env = "KEYFENCE_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Who you are, recorded on every change (defaults to $USER).
    #[arg(long, global = true, env = "KEYFENCE_ACTOR")]
    pub actor: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

pub type Admin = AdminClient<InterceptedService<Channel, Credentials>>;

#[derive(Clone)]
pub struct Credentials {
    authorization: Option<MetadataValue<Ascii>>,
    actor: MetadataValue<Ascii>,
}

impl Interceptor for Credentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.authorization {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        request
            .metadata_mut()
            .insert(ACTOR_HEADER, self.actor.clone());
        Ok(request)
    }
}

fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Input(format!("{flag} {}: {e}", path.display())))
}

impl ClientOptions {
    /// The token to present: flag or variable, then the token file, then the local data
    /// directory's generated token. `None` when there is none anywhere.
    fn token(&self) -> Result<Option<String>, CliError> {
        if let Some(token) = self.admin_token.as_ref().filter(|t| !t.is_empty()) {
            return Ok(Some(token.clone()));
        }
        if let Some(path) = &self.admin_token_file {
            return read_token_file(path)
                .map(Some)
                .map_err(|e| CliError::Input(format!("--admin-token-file {e}")));
        }
        let local = Path::new(DEFAULT_DATA_DIR).join(GENERATED_TOKEN_FILE);
        match read_token_file(&local) {
            Ok(token) => Ok(Some(token)),
            Err(_) if !local.exists() => Ok(None),
            Err(error) => Err(CliError::Input(error.to_string())),
        }
    }

    /// TLS as the address says; TLS options with a plaintext address are a mistake to name.
    fn tls(&self, addr: &str) -> Result<Option<ClientTlsConfig>, CliError> {
        tls_config(
            "admin address",
            addr,
            self.ca_cert.as_deref(),
            self.client_cert.as_deref(),
            self.client_key.as_deref(),
        )
    }

    pub async fn connect(&self) -> Result<Admin, CliError> {
        let addr = if self.admin_addr.contains("://") {
            self.admin_addr.clone()
        } else {
            format!("http://{}", self.admin_addr)
        };
        if !(addr.starts_with("http://") || addr.starts_with("https://")) {
            return Err(CliError::Input(format!(
                "--admin-addr {addr:?}: use http://host:port (plaintext) or https://host:port (TLS)"
            )));
        }
        let mut endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| CliError::Input(format!("--admin-addr {addr:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5));
        if let Some(tls) = self.tls(&addr)? {
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|e| CliError::Input(format!("TLS settings: {e}")))?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| CliError::Connect {
                addr: addr.clone(),
                error,
            })?;
        let authorization = self
            .token()?
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| CliError::Input("the admin token must be printable ASCII".into()))?;
        let actor_name = self
            .actor
            .clone()
            .or_else(|| std::env::var("USER").ok())
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| "cli".into());
        let actor = actor_name
            .parse()
            .map_err(|_| CliError::Input("--actor must be printable ASCII".into()))?;
        Ok(AdminClient::with_interceptor(
            channel,
            Credentials {
                authorization,
                actor,
            },
        )
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024))
    }
}

/// The TLS an address (`what` names it in errors) asks for: none for `http://` (and then TLS options are a mistake to name),
/// server verification against `ca_cert` for `https://`, and a client certificate when given.
pub(super) fn tls_config(
    what: &str,
    addr: &str,
    ca_cert: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<Option<ClientTlsConfig>, CliError> {
    let tls_flags = [
        ("--ca-cert", ca_cert.is_some()),
        ("--client-cert", client_cert.is_some()),
        ("--client-key", client_key.is_some()),
    ];
    if !addr.starts_with("https://") {
        if let Some((flag, _)) = tls_flags.iter().find(|(_, given)| *given) {
            return Err(CliError::Input(format!(
                "{flag} needs an https:// {what}; {addr} is plaintext"
            )));
        }
        return Ok(None);
    }
    let mut tls = ClientTlsConfig::new();
    match ca_cert {
        Some(path) => tls = tls.ca_certificate(Certificate::from_pem(read_pem("--ca-cert", path)?)),
        None => {
            return Err(CliError::Input(format!(
                "{addr} uses TLS: give --ca-cert (or KEYFENCE_CA_CERT) with the CA that issued the server's certificate"
            )));
        }
    }
    match (client_cert, client_key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(
                read_pem("--client-cert", cert)?,
                read_pem("--client-key", key)?,
            ));
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err(CliError::Input("--client-cert needs --client-key".into()));
        }
        (None, Some(_)) => {
            return Err(CliError::Input("--client-key needs --client-cert".into()));
        }
    }
    Ok(Some(tls))
}
