//! The `keyfence` command line: `serve`, and the admin commands for people and scripts, which are
//! clients of the Admin service. Tables by default, `--json` for scripts; errors exit 1 with the
//! server's message, and `check` exits 2 on DENY. Beside them, needing no server: `sign` (the
//! partner's signer), `admin-token`, `secrets` (the secrets key file), `config check` (validates a
//! `serve` configuration without starting), `health` (a gRPC health probe, the container
//! HEALTHCHECK) and `completions` (shell completion scripts).

mod admin_token;
mod allowlist;
mod check;
mod client;
mod completions;
mod config_check;
mod health;
mod keys;
mod logs;
mod output;
mod secrets;
pub mod sign;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

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
    /// Make named admin tokens for --admin-tokens-file (no server needed).
    AdminToken {
        #[command(subcommand)]
        command: admin_token::AdminTokenCommand,
    },
    /// Show a key's access log, newest first.
    Logs {
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        args: logs::LogsArgs,
    },
    /// Dry-run a decision for a key and an IP ("test this key"); changes nothing. Exits 0 on
    /// ALLOW, 2 on DENY, 1 on an error.
    Check {
        #[command(flatten)]
        client: ClientOptions,
        #[command(flatten)]
        args: check::CheckArgs,
    },
    /// Sign a request as a partner must and print the headers to send; needs no server.
    Sign(sign::SignArgs),
    /// Edit the secrets key file: add, promote, rotate or remove the keys that seal stored
    /// records (works on the file; running servers reload it).
    Secrets {
        #[command(subcommand)]
        command: secrets::SecretsCommand,
    },
    /// Validate the configuration of `serve` without starting it (for CI and init containers).
    Config {
        #[command(subcommand)]
        command: config_check::ConfigCommand,
    },
    /// Ask a listener's gRPC health service whether it is SERVING; exits 0 if so, else 1.
    Health(health::HealthArgs),
    /// Print a completion script for bash, zsh or fish.
    Completions(completions::CompletionsArgs),
}

/// How a command that ran to its end exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Exit status 0.
    Success,
    /// `check` decided DENY: exit status 2, so that scripts can branch on it.
    Denied,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Denied => 2,
        }
    }
}

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("cannot reach the admin service at {addr}: {error}")]
    Connect {
        addr: String,
        /// A source, so that what lies under tonic's terse "transport error" is printed too.
        #[source]
        error: tonic::transport::Error,
    },
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(tonic::Status),
    #[error("{0}")]
    Input(String),
    /// A local file the command could not read or write, named.
    #[error("cannot {action} {}: {error}", path.display())]
    File {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{error}\nhint: {hint}")]
    Hinted {
        error: Box<CliError>,
        hint: &'static str,
    },
}

impl CliError {
    fn file(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> CliError {
        let path = path.to_owned();
        move |error| CliError::File {
            action,
            path,
            error,
        }
    }

    /// What a plaintext client sees when the listener speaks TLS: HTTP/2 fails below gRPC.
    fn looks_like_tls_mismatch(&self) -> bool {
        match self {
            CliError::Status(status) => {
                matches!(
                    status.code(),
                    tonic::Code::Internal
                        | tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                ) && (status.message().contains("h2 protocol error")
                    || status.message().contains("transport error")
                    || status.message().contains("operation was canceled"))
            }
            _ => false,
        }
    }
}

impl From<tonic::Status> for CliError {
    fn from(status: tonic::Status) -> CliError {
        CliError::Status(status)
    }
}

/// Runs every command but `serve`.
pub async fn run_admin(command: Command) -> Result<Outcome, CliError> {
    let admin_addr = match &command {
        Command::Keys { client, .. }
        | Command::Allowlist { client, .. }
        | Command::Check { client, .. }
        | Command::Logs { client, .. } => Some(client.admin_addr.clone()),
        _ => None,
    };
    let done = |result: Result<(), CliError>| result.map(|()| Outcome::Success);
    let result = match command {
        Command::Serve(_) => unreachable!("serve is handled by main"),
        Command::Sign(_) => unreachable!("sign is handled by main"),
        Command::Secrets { command } => done(secrets::run(command)),
        Command::AdminToken { command } => done(admin_token::run(command)),
        Command::Keys { client, command } => done(keys::run(&client, command).await),
        Command::Allowlist { client, command } => done(allowlist::run(&client, command).await),
        Command::Check { client, args } => check::run(&client, args).await,
        Command::Logs { client, args } => done(logs::run(&client, args).await),
        Command::Config { command } => done(config_check::run(command)),
        Command::Health(args) => done(health::run(args).await),
        Command::Completions(args) => done(completions::run(args)),
    };
    let Some(addr) = admin_addr else {
        return result;
    };
    result.map_err(|error| match error {
        CliError::Status(status) if status.code() == tonic::Code::Unimplemented => {
            CliError::Input(format!(
                "{addr} does not serve keyfence's Admin API (it answered UNIMPLEMENTED): is it \
                 the data-plane port? The admin listener is the one `keyfence serve` takes as \
                 --admin-listen, 127.0.0.1:50052 by default"
            ))
        }
        error if !addr.starts_with("https://") && error.looks_like_tls_mismatch() => {
            CliError::Hinted {
                error: Box::new(error),
                hint: "if the admin listener uses TLS, use an https:// address with --ca-cert",
            }
        }
        error => error,
    })
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
