//! `keyfence config check`: validates a configuration exactly as `serve` reads it (the file, the
//! `KEYFENCE_*` variables and flags, through [`Config::resolve`]) and, unless told not to, the
//! files it names, without binding a port or opening a store. For CI and init containers.

use crate::{
    authn::{AdminCredentials, CredentialSettings, GENERATED_TOKEN_FILE},
    config::{Config, ServeArgs},
    grpc::tls,
    system::OsRandom,
};

use super::{CliError, output};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate the settings `serve` would run with (--config FILE, KEYFENCE_* variables and the
    /// same flags as serve) and the files they name, then print the effective configuration.
    /// Starts nothing. Exits 0 when valid, 1 with what is wrong.
    Check {
        /// Check the settings only, not the files they name (TLS material, the admin tokens
        /// file): for CI, where the files a deployment mounts are absent.
        #[arg(long)]
        settings_only: bool,
        #[command(flatten)]
        serve: Box<ServeArgs>,
    },
}

pub fn run(command: ConfigCommand) -> Result<(), CliError> {
    let ConfigCommand::Check {
        settings_only,
        serve,
    } = command;
    let source = serve
        .config
        .as_ref()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "defaults, environment and flags".into());
    let config = Config::resolve(*serve)
        .map_err(|error| CliError::Input(format!("invalid configuration: {error}")))?;
    let files = if settings_only {
        "files it names not read (--settings-only)".to_owned()
    } else {
        check_files(&config)?
    };
    output::print_text(&format!(
        "configuration ok ({source}): settings valid; {files}\n{config:#?}\n"
    ))
}

/// Reads every file the configuration names, as `serve` would at start, without writing any.
fn check_files(config: &Config) -> Result<String, CliError> {
    let mut checked = Vec::new();
    for (listener, files) in [
        ("data plane", &config.data_tls),
        ("admin", &config.admin_tls),
    ] {
        if let Some(files) = files {
            tls::server_config(files)
                .map_err(|error| CliError::Input(format!("{listener} TLS: {error}")))?;
            checked.push(format!("{listener} TLS"));
        }
    }
    if config.admin_tokens_file.is_some() || config.admin_token.is_some() {
        // With a token configured, loading reads and parses; it generates nothing.
        AdminCredentials::load(
            CredentialSettings {
                tokens_file: config.admin_tokens_file.as_deref(),
                token: config.admin_token.as_deref(),
                data_dir: &config.data_dir,
                accept_client_certificates: false,
            },
            &OsRandom,
        )
        .map_err(|error| CliError::Input(format!("admin credentials: {error}")))?;
        checked.push("admin tokens".to_owned());
    } else {
        checked.push(format!(
            "no admin token configured (the first start writes {})",
            config.data_dir.join(GENERATED_TOKEN_FILE).display()
        ));
    }
    if config.redis.is_none() && config.data_dir.exists() && !config.data_dir.is_dir() {
        return Err(CliError::Input(format!(
            "data_dir: {} is not a directory",
            config.data_dir.display()
        )));
    }
    Ok(format!("files checked: {}", checked.join("; ")))
}
