//! The `keyfence` binary: parses the command line, sets up logging, and either serves or runs an
//! admin command against a running server.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use keyfence::{
    cli::{Cli, Command, run_admin},
    config::Config,
    server, telemetry,
    telemetry::metrics::Metrics,
};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(async {
            let config = Config::resolve(*args).context("invalid configuration")?;
            let telemetry = telemetry::init(config.log_format, config.otlp_endpoint.as_deref())?;
            tracing::info!(?config, "starting keyfence {}", env!("CARGO_PKG_VERSION"));
            let metrics = Arc::new(Metrics::new(telemetry.meter()));
            let listeners = server::Listeners::bind(&config).await?;
            server::run(config, listeners, metrics, shutdown_signal()).await?;
            drop(telemetry);
            Ok::<(), anyhow::Error>(())
        }),
        admin => runtime
            .block_on(run_admin(admin))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
    tracing::info!("shutting down");
}
