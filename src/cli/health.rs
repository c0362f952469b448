//! `keyfence health`: asks a listener's `grpc.health.v1.Health` whether it serves, and exits 0
//! when it does, 1 when not. The container image's HEALTHCHECK runs it, so that the image needs
//! no shell and no other client.

use std::{path::PathBuf, time::Duration};

use tonic::transport::Endpoint;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use super::{CliError, client::tls_config};

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The listener to ask: http://host:port (plaintext) or https://host:port (TLS, with
    /// --ca-cert). A bare host:port is plaintext.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The service whose health to ask for (keyfence.v1.Authorizer,
    /// envoy.service.auth.v3.Authorization, keyfence.v1.Admin); empty asks for the whole server.
    #[arg(long, default_value = "")]
    service: String,
    /// PEM CA certificate(s) to verify an https:// listener with.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// PEM client certificate, for a listener that requires one (mTLS; with --client-key).
    #[arg(long)]
    client_cert: Option<PathBuf>,
    /// PEM private key of --client-cert.
    #[arg(long)]
    client_key: Option<PathBuf>,
    /// How long to wait for the connection and the answer (500ms, 3s).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "3s")]
    timeout: Duration,
}

pub async fn run(args: HealthArgs) -> Result<(), CliError> {
    let addr = if args.addr.contains("://") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let mut endpoint = Endpoint::from_shared(addr.clone())
        .map_err(|e| CliError::Input(format!("--addr {addr:?}: {e}")))?
        .connect_timeout(args.timeout)
        .timeout(args.timeout);
    if let Some(tls) = tls_config(
        "address",
        &addr,
        args.ca_cert.as_deref(),
        args.client_cert.as_deref(),
        args.client_key.as_deref(),
    )? {
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| CliError::Input(format!("TLS settings: {e}")))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| CliError::Input(format!("cannot reach {addr}: {}", with_causes(&e))))?;
    let service = if args.service.is_empty() {
        "the server".to_owned()
    } else {
        format!("service {}", args.service)
    };
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: args.service.clone(),
        })
        .await
        .map_err(|status| match status.code() {
            tonic::Code::NotFound => {
                CliError::Input(format!("{addr} reports no health for {service}"))
            }
            _ => CliError::Status(status),
        })?
        .into_inner();
    let status = ServingStatus::try_from(response.status).unwrap_or(ServingStatus::Unknown);
    if status != ServingStatus::Serving {
        return Err(CliError::Input(format!(
            "{addr}: {service} is {}",
            status.as_str_name()
        )));
    }
    println!("{}", status.as_str_name());
    Ok(())
}

/// An error and its causes on one line; tonic's transport errors say little at the top.
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let part = next.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = next.source();
    }
    text
}
