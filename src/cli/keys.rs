//! `keyfence keys …`

use std::path::PathBuf;

use serde_json::json;

use super::{
    CliError, ClientOptions, ExpiryArgs,
    output::{self, KEY_HEADER, key_fields, key_json, key_row, print_json},
};
use crate::grpc::pb;

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is shown once.
    Create(CreateArgs),
    /// List keys, optionally of one partner or environment.
    List {
        #[arg(long)]
        partner: Option<String>,
        #[arg(long = "env")]
        environment: Option<String>,
    },
    /// Show one key.
    Get { key_id: String },
    /// Change a key's name, status, allowlist switch, enforcement, expiry or rate limit.
    Update(UpdateArgs),
    /// Revoke a key for good.
    Revoke { key_id: String },
    /// Issue a new secret; the old one keeps working for --grace.
    Rotate {
        key_id: String,
        /// How long the old secret keeps working (0s, 30m, 24h, up to 30d).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
        grace: std::time::Duration,
        /// Write the new secret to this file (mode 0600) instead of printing it.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Scheme {
    None,
    HmacSha256,
    Ed25519,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum EnforcementArg {
    Enforce,
    ReportOnly,
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[arg(long)]
    partner: String,
    #[arg(long = "env")]
    environment: String,
    #[arg(long)]
    name: String,
    /// Let the key be used from any IP (no allowlist). Off by default.
    #[arg(long)]
    no_ip_allowlist: bool,
    /// An allowlist entry for the key (repeatable): an address or a CIDR.
    #[arg(long = "allow", value_name = "CIDR")]
    allow: Vec<String>,
    /// How requests must be signed.
    #[arg(long, value_enum, default_value = "none")]
    scheme: Scheme,
    /// The partner's Ed25519 public key: a file holding 32 raw bytes, or hex or base64 text.
    #[arg(long)]
    public_key_file: Option<PathBuf>,
    /// Report IP denials instead of enforcing them.
    #[arg(long)]
    report_only: bool,
    /// Requests per second per replica, with an optional burst: 100 or 100/200.
    #[arg(long, value_parser = parse_rate_limit)]
    rate_limit: Option<pb::RateLimit>,
    /// Deny signed requests that carry no nonce (they could be replayed within the window).
    #[arg(long)]
    require_nonce: bool,
    #[command(flatten)]
    expiry: ExpiryArgs,
    /// Write the secret to this file (mode 0600) instead of printing it.
    #[arg(long)]
    secret_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct UpdateArgs {
    key_id: String,
    #[arg(long)]
    name: Option<String>,
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    #[arg(long)]
    disable: bool,
    /// Turn the IP allowlist on or off.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    ip_allowlist: Option<bool>,
    /// Whether signed requests must carry a nonce.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    require_nonce: Option<bool>,
    #[arg(long, value_enum)]
    enforcement: Option<EnforcementArg>,
    /// Requests per second per replica with optional burst (100/200); 0 removes the limit.
    #[arg(long, value_parser = parse_rate_limit)]
    rate_limit: Option<pb::RateLimit>,
    #[command(flatten)]
    expiry: ExpiryArgs,
    /// Remove the key's expiry.
    #[arg(long, conflicts_with_all = ["expires_at", "expires_in"])]
    no_expiry: bool,
}

fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err("expected on or off".into()),
    }
}

fn parse_rate_limit(text: &str) -> Result<pb::RateLimit, String> {
    let (rate, burst) = text.split_once('/').unwrap_or((text, "0"));
    Ok(pb::RateLimit {
        requests_per_second: rate
            .parse()
            .map_err(|_| format!("{rate:?} is not a whole number"))?,
        burst: burst
            .parse()
            .map_err(|_| format!("{burst:?} is not a whole number"))?,
    })
}

pub fn read_public_key(path: &PathBuf) -> Result<Vec<u8>, CliError> {
    use base64::Engine as _;
    let bytes = std::fs::read(path)?;
    if bytes.len() == 32 {
        return Ok(bytes);
    }
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    hex::decode(&text)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(&text).ok())
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            CliError::Input(format!(
                "{}: expected 32 raw bytes, or 32 bytes as hex or base64",
                path.display()
            ))
        })
}

/// Writes a secret readable by the owner only.
pub fn write_secret(path: &PathBuf, secret: &str) -> Result<(), CliError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(secret.as_bytes())?;
    Ok(())
}

pub async fn run(client: &ClientOptions, command: KeysCommand) -> Result<(), CliError> {
    let mut admin = client.connect().await?;
    match command {
        KeysCommand::Create(args) => {
            let public_key = match &args.public_key_file {
                Some(path) => read_public_key(path)?,
                None => Vec::new(),
            };
            let request = pb::CreateKeyRequest {
                partner_id: args.partner,
                environment: args.environment,
                name: args.name,
                ip_allowlist_enabled: Some(!args.no_ip_allowlist),
                allowlist: args
                    .allow
                    .into_iter()
                    .map(|cidr| pb::AllowlistEntryInput {
                        cidr,
                        ..Default::default()
                    })
                    .collect(),
                signature_scheme: match args.scheme {
                    Scheme::None => pb::SignatureScheme::None,
                    Scheme::HmacSha256 => pb::SignatureScheme::HmacSha256,
                    Scheme::Ed25519 => pb::SignatureScheme::Ed25519,
                } as i32,
                public_key,
                expires_at: args.expiry.timestamp(),
                enforcement: if args.report_only {
                    pb::Enforcement::ReportOnly
                } else {
                    pb::Enforcement::Enforce
                } as i32,
                rate_limit: args.rate_limit,
                require_nonce: args.require_nonce,
            };
            let response = admin.create_key(request).await?.into_inner();
            let key = response.key.unwrap_or_default();
            if let Some(path) = &args.secret_file {
                write_secret(path, &response.secret)?;
            }
            let shown_secret = if args.secret_file.is_some() {
                None
            } else {
                Some(&response.secret)
            };
            if client.json {
                print_json(&json!({
                    "key": key_json(&key),
                    "secret": shown_secret,
                    "signing_secret": (!response.signing_secret.is_empty()).then_some(&response.signing_secret),
                    "revision": response.revision,
                }));
            } else {
                key_fields(&key);
                match (&args.secret_file, shown_secret) {
                    (Some(path), _) => println!("secret written to {} (mode 0600)", path.display()),
                    (None, Some(secret)) => println!("secret (shown once)  {secret}"),
                    _ => {}
                }
                if !response.signing_secret.is_empty() {
                    println!(
                        "signing secret (shown once, base64)  {}",
                        response.signing_secret
                    );
                }
                println!("revision {}", response.revision);
            }
        }
        KeysCommand::List {
            partner,
            environment,
        } => {
            let mut keys = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = admin
                    .list_keys(pb::ListKeysRequest {
                        partner_id: partner.clone().unwrap_or_default(),
                        environment: environment.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                    })
                    .await?
                    .into_inner();
                keys.extend(page.keys);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            if client.json {
                print_json(&json!({ "keys": keys.iter().map(key_json).collect::<Vec<_>>() }));
            } else {
                output::table(&KEY_HEADER, &keys.iter().map(key_row).collect::<Vec<_>>());
            }
        }
        KeysCommand::Get { key_id } => {
            let key = admin
                .get_key(pb::GetKeyRequest { key_id })
                .await?
                .into_inner()
                .key
                .unwrap_or_default();
            show_key(client, &key, None);
        }
        KeysCommand::Update(args) => {
            let request = pb::UpdateKeyRequest {
                key_id: args.key_id,
                name: args.name,
                enabled: match (args.enable, args.disable) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
                ip_allowlist_enabled: args.ip_allowlist,
                expires_at: args.expiry.timestamp(),
                clear_expires_at: args.no_expiry,
                enforcement: match args.enforcement {
                    None => pb::Enforcement::Unspecified,
                    Some(EnforcementArg::Enforce) => pb::Enforcement::Enforce,
                    Some(EnforcementArg::ReportOnly) => pb::Enforcement::ReportOnly,
                } as i32,
                rate_limit: args.rate_limit,
                require_nonce: args.require_nonce,
            };
            let response = admin.update_key(request).await?.into_inner();
            show_key(
                client,
                &response.key.unwrap_or_default(),
                Some(response.revision),
            );
        }
        KeysCommand::Revoke { key_id } => {
            let response = admin
                .revoke_key(pb::RevokeKeyRequest { key_id })
                .await?
                .into_inner();
            show_key(
                client,
                &response.key.unwrap_or_default(),
                Some(response.revision),
            );
        }
        KeysCommand::Rotate {
            key_id,
            grace,
            secret_file,
        } => {
            let grace_period_seconds = u32::try_from(grace.as_secs())
                .map_err(|_| CliError::Input("--grace is too long".into()))?;
            let response = admin
                .rotate_key(pb::RotateKeyRequest {
                    key_id,
                    grace_period_seconds,
                })
                .await?
                .into_inner();
            if let Some(path) = &secret_file {
                write_secret(path, &response.secret)?;
            }
            let key = response.key.unwrap_or_default();
            if client.json {
                print_json(&json!({
                    "key": key_json(&key),
                    "secret": secret_file.is_none().then_some(&response.secret),
                    "revision": response.revision,
                }));
            } else {
                key_fields(&key);
                match &secret_file {
                    Some(path) => println!("new secret written to {} (mode 0600)", path.display()),
                    None => println!("new secret (shown once)  {}", response.secret),
                }
                println!("revision {}", response.revision);
            }
        }
    }
    Ok(())
}

fn show_key(client: &ClientOptions, key: &pb::ApiKey, revision: Option<u64>) {
    if client.json {
        let mut value = json!({ "key": key_json(key) });
        if let Some(revision) = revision {
            value["revision"] = json!(revision);
        }
        print_json(&value);
    } else {
        key_fields(key);
        if let Some(revision) = revision {
            println!("revision {revision}");
        }
    }
}
