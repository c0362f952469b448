//! The `keyfence` command line: `serve`, and the admin commands for people and scripts, which are
//! clients of the Admin service. Tables by default, `--json` for scripts; errors exit non-zero
//! with the server's message.

mod allowlist;
mod check;
mod client;
mod keys;
mod logs;
mod output;

use std::time::{Duration, SystemTime};

pub use client::ClientOptions;

use crate::config::ServeArgs;

#[derive(Debug, clap::Parser)]
#[command(
    name = "keyfence",
    version,
    about = "Policy decision point for partner API keys: key, IP allowlist, signature"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Run the service (embedded store in --data-dir).
    /// (Boxed: the settings are by far the largest variant.)
    Serve(Box<ServeArgs>),
    /// Create, list, inspect, update, revoke and rotate API keys.
    Keys {
        #[command(flatten)]
        client: ClientOptions,
        #[command(subcommand)]
        command: keys::KeysCommand,
    },
    /// Manage allowlists of a key (--key-id) or of a partner in one environment (--partner, --env).
    Allowlist {
        #[command(flatten)]
        client: ClientOptions,
        #[command(subcommand)]
        command: allowlist::AllowlistCommand,
    },
    /// Show a key's access log, newest first.
    Logs {
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        args: logs::LogsArgs,
    },
    /// Dry-run a decision for a key and an IP ("test this key"); changes nothing.
    Check {
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        args: check::CheckArgs,
    },
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin service at {addr}: {error}")]
    Connect {
        addr: String,
        error: tonic::transport::Error,
    },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        CliError::Status(status)
    }
}

/// Runs an admin command.
pub async fn run_admin(command: Command) -> Result<(), CliError> {
    match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Keys { client, command } => keys::run(&client, command).await,
        Command::Allowlist { client, command } => allowlist::run(&client, command).await,
        Command::Check { client, args } => check::run(&client, args).await,
        Command::Logs { client, args } => logs::run(&client, args).await,
    }
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// `--expires-at` (RFC 3339) or `--expires-in` (a duration like `7d`), as a protobuf timestamp.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ExpiryArgs {
    /// When it stops working, RFC 3339 (2026-12-31T23:59:59Z).
    #[arg(long, value_parser = parse_rfc3339, conflicts_with = "expires_in")]
    pub expires_at: Option<SystemTime>,
    /// How long from now it keeps working (90m, 12h, 7d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub expires_in: Option<Duration>,
}

impl ExpiryArgs {
    pub fn timestamp(&self) -> Option<prost_types::Timestamp> {
        let at = match (self.expires_at, self.expires_in) {
            (Some(at), _) => at,
            (None, Some(after)) => SystemTime::now() + after,
            (None, None) => return None,
        };
        Some(prost_types::Timestamp::from(at))
    }
}

fn parse_rfc3339(text: &str) -> Result<SystemTime, humantime::TimestampError> {
    humantime::parse_rfc3339_weak(text)
}
