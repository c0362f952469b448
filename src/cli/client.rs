//! The Admin client the commands share: address, bearer token and actor name.

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};

use super::CliError;
use crate::grpc::{auth::ACTOR_HEADER, pb::admin_client::AdminClient};

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
    /// Bearer token for the admin listener, when it requires one.
    #[arg(
        long,
        global = true,
        env = "KEYFENCE_ADMIN_TOKEN",
        hide_env_values = true
    )]
    pub admin_token: Option<String>,
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

impl ClientOptions {
    pub async fn connect(&self) -> Result<Admin, CliError> {
        let addr = if self.admin_addr.contains("://") {
            self.admin_addr.clone()
        } else {
            format!("http://{}", self.admin_addr)
        };
        let endpoint = Endpoint::from_shared(addr.clone())
            .map_err(|e| CliError::Input(format!("--admin-addr {addr:?}: {e}")))?
            .connect_timeout(std::time::Duration::from_secs(5));
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| CliError::Connect {
                addr: addr.clone(),
                error,
            })?;
        let authorization = self
            .admin_token
            .as_ref()
            .filter(|t| !t.is_empty())
            .map(|t| format!("Bearer {t}").parse())
            .transpose()
            .map_err(|_| CliError::Input("--admin-token must be printable ASCII".into()))?;
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
