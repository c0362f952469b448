//! The `keyfence` binary: parses the command line, sets up logging, and either serves, runs an
//! admin command against a running server, or signs a request (no server, no async runtime).
//!
//! Exit status: 0 on success, 1 on any error (a bad command line included), and 2 only when
//! `check` decides DENY, so that scripts can tell a denial from a failure.

use std::{process::ExitCode, sync::Arc};

use anyhow::Context;
use clap::Parser;
use keyfence::{
    cli::{Cli, Command, Outcome, run_admin},
    config::Config,
    server, telemetry,
    telemetry::metrics::Metrics,
};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            // Help and --version go to stdout and succeed; a bad command line is an error (1),
            // never 2, which `check` keeps for DENY.
            let _ = error.print();
            return if error.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let command = match cli.command {
        Command::Sign(args) => {
            return match keyfence::cli::sign::run(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("error: {error}");
                    ExitCode::FAILURE
                }
            };
        }
        command => command,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = match command {
        Command::Serve(args) => runtime.block_on(async {
            let config = Config::resolve(*args).context("invalid configuration")?;
            let telemetry = telemetry::init(config.log_format, config.otlp_endpoint.as_deref())?;
            tracing::info!(?config, "starting keyfence {}", env!("CARGO_PKG_VERSION"));
            let metrics = Arc::new(Metrics::new(telemetry.meter()));
            let listeners = server::Listeners::bind(&config).await?;
            server::run(config, listeners, metrics, shutdown_signal()).await?;
            drop(telemetry);
            Ok::<Outcome, anyhow::Error>(Outcome::Success)
        }),
        admin => runtime
            .block_on(run_admin(admin))
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(outcome) => ExitCode::from(outcome.exit_code()),
        Err(error) => {
            eprintln!("error: {}", describe(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: many messages already quote their
/// cause (`cannot read config file x: No such file…`), and printing the chain after them would
/// say it again.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
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
