//! `keyfence keys …`

use std::path::{Path, PathBuf};

use serde_json::json;

use super::{
    CliError, ClientOptions, ExpiryArgs,
    output::{self, KEY_HEADER, key_fields, key_json, key_row, print_json},
};
use crate::{grpc::pb, signing, system::OsRandom};

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is shown once.
    Create(CreateArgs),
    /// List keys, optionally of one partner or environment.
    List {
        /// Only this partner's keys.
        #[arg(long)]
        partner: Option<String>,
        /// Only keys in this environment (production, sandbox, …).
        #[arg(long = "env")]
        environment: Option<String>,
    },
    /// Show one key.
    Get {
        /// The key's id (key_…).
        key_id: String,
    },
    /// Change a key's name, status, allowlist switch, enforcement, expiry or rate limit.
    Update(UpdateArgs),
    /// Revoke a key for good.
    Revoke {
        /// The key's id (key_…).
        key_id: String,
    },
    /// Issue a new secret; the old one keeps working for --grace.
    Rotate {
        /// The key's id (key_…).
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
    /// The partner the key belongs to (its id, like acme).
    #[arg(long)]
    partner: String,
    /// The environment the key works in (production, sandbox, or another configured one).
    #[arg(long = "env")]
    environment: String,
    /// A name for people: what the key is for.
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
    /// The partner's Ed25519 public key: a file holding 32 raw bytes, hex or base64 text, or a
    /// PEM public key (-----BEGIN PUBLIC KEY-----).
    #[arg(long)]
    public_key_file: Option<PathBuf>,
    /// Generate the Ed25519 key pair here: the private key goes to this file (PKCS#8 PEM, mode
    /// 0600, what `keyfence sign --private-key-file` reads) and only the public key to the server.
    #[arg(long, value_name = "FILE", conflicts_with = "public_key_file")]
    private_key_out: Option<PathBuf>,
    /// Write the HMAC signing secret to this file (base64, mode 0600, what `keyfence sign
    /// --secret-file` reads) instead of printing it.
    #[arg(long, value_name = "FILE")]
    signing_secret_file: Option<PathBuf>,
    /// Replace an existing --private-key-out or --signing-secret-file file.
    #[arg(long)]
    force: bool,
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
    /// The key's id (key_…).
    key_id: String,
    /// A new name.
    #[arg(long)]
    name: Option<String>,
    /// Make a disabled key work again.
    #[arg(long, conflicts_with = "disable")]
    enable: bool,
    /// Stop the key working until --enable (revoke is for good; this is not).
    #[arg(long)]
    disable: bool,
    /// Turn the IP allowlist on or off.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    ip_allowlist: Option<bool>,
    /// Whether signed requests must carry a nonce.
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    require_nonce: Option<bool>,
    /// Enforce the IP allowlist, or only report what it would deny.
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
    use ed25519_dalek::pkcs8::DecodePublicKey as _;
    let bytes = std::fs::read(path).map_err(CliError::file("read --public-key-file", path))?;
    if bytes.len() == 32 {
        return Ok(bytes);
    }
    let text = String::from_utf8_lossy(&bytes).trim().to_owned();
    if text.starts_with("-----BEGIN PUBLIC KEY-----") {
        return ed25519_dalek::VerifyingKey::from_public_key_pem(&text)
            .map(|key| key.to_bytes().to_vec())
            .map_err(|error| {
                CliError::Input(format!(
                    "{}: not an Ed25519 PEM public key: {error}",
                    path.display()
                ))
            });
    }
    if text.starts_with("-----BEGIN") {
        return Err(CliError::Input(format!(
            "{}: this PEM file is not a public key; give the public key \
             (-----BEGIN PUBLIC KEY-----), never the private key",
            path.display()
        )));
    }
    hex::decode(&text)
        .ok()
        .or_else(|| base64::engine::general_purpose::STANDARD.decode(&text).ok())
        .filter(|k| k.len() == 32)
        .ok_or_else(|| {
            CliError::Input(format!(
                "{}: expected 32 raw bytes, 32 bytes as hex or base64, or a PEM public key",
                path.display()
            ))
        })
}

/// Creates a file for key material, readable by the owner only (mode 0600). An existing file is
/// refused unless `replace`: a private key or signing secret overwritten by mistake is lost.
pub fn create_private_file(path: &Path, replace: bool) -> Result<std::fs::File, CliError> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if replace {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let file = options.open(path).map_err(|error| {
        if error.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::Input(format!(
                "{} already exists; keyfence will not overwrite key material (--force replaces it)",
                path.display()
            ))
        } else {
            CliError::Input(format!("{}: {error}", path.display()))
        }
    })?;
    // `mode` applies only to a new file: an existing one replaced with --force is narrowed too.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(CliError::file("restrict the mode of", path))?;
    }
    Ok(file)
}

fn write_all(mut file: std::fs::File, path: &Path, contents: &str) -> Result<(), CliError> {
    use std::io::Write;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(CliError::file("write", path))
}

/// The Ed25519 key pair `--private-key-out` asks for: the private key is written first (so that
/// no key is registered whose private half was never saved) and the public key returned.
fn generate_key_pair(path: &Path, replace: bool) -> Result<Vec<u8>, CliError> {
    let file = create_private_file(path, replace)?;
    let private_key = signing::generate_ed25519(&OsRandom);
    write_all(file, path, &signing::private_key_pem(&private_key))?;
    Ok(private_key.verifying_key().to_bytes().to_vec())
}

/// The file a secret will be written to, opened before the request that mints the secret: a path
/// that cannot be written fails before a secret exists that nobody could read. What it held is
/// kept until the secret is written, and a file made for a secret that never came is removed.
pub struct SecretFile {
    path: PathBuf,
    file: std::fs::File,
    created: bool,
    written: bool,
}

impl SecretFile {
    pub fn open(path: &Path) -> Result<SecretFile, CliError> {
        let created = !path.exists();
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let file = options
            .open(path)
            .map_err(CliError::file("write the secret to", path))?;
        Ok(SecretFile {
            path: path.to_owned(),
            file,
            created,
            written: false,
        })
    }

    pub fn write(mut self, secret: &str) -> Result<(), CliError> {
        use std::io::Write;
        self.written = true;
        self.file
            .set_len(0)
            .and_then(|()| self.file.write_all(secret.as_bytes()))
            .map_err(CliError::file("write the secret to", &self.path))
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if self.created && !self.written {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

pub async fn run(client: &ClientOptions, command: KeysCommand) -> Result<(), CliError> {
    let mut admin = client.connect().await?;
    match command {
        KeysCommand::Create(args) => {
            if args.private_key_out.is_some() && !matches!(args.scheme, Scheme::Ed25519) {
                return Err(CliError::Input(
                    "--private-key-out generates an Ed25519 key pair: add --scheme ed25519".into(),
                ));
            }
            if args.signing_secret_file.is_some() && !matches!(args.scheme, Scheme::HmacSha256) {
                return Err(CliError::Input(
                    "--signing-secret-file is for --scheme hmac-sha256, whose secret keyfence issues"
                        .into(),
                ));
            }
            let files = [
                &args.secret_file,
                &args.signing_secret_file,
                &args.private_key_out,
            ];
            let named: Vec<&PathBuf> = files.into_iter().flatten().collect();
            if (1..named.len()).any(|i| named[..i].contains(&named[i])) {
                return Err(CliError::Input(
                    "--secret-file, --signing-secret-file and --private-key-out must name different files"
                        .into(),
                ));
            }
            // Opened before the key exists, so that a file in the way stops us before a secret
            // is issued that could then be written nowhere.
            let signing_secret_file = args
                .signing_secret_file
                .as_deref()
                .map(|path| create_private_file(path, args.force))
                .transpose()?;
            let public_key = match (&args.public_key_file, &args.private_key_out) {
                (Some(path), _) => read_public_key(path)?,
                (None, Some(path)) => generate_key_pair(path, args.force)?,
                (None, None) => Vec::new(),
            };
            let secret_file = args
                .secret_file
                .as_deref()
                .map(SecretFile::open)
                .transpose()?;
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
            let response = match admin.create_key(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    // No key was registered: the files made for it hold nothing of use.
                    for path in [&args.private_key_out, &args.signing_secret_file]
                        .into_iter()
                        .flatten()
                    {
                        let _ = std::fs::remove_file(path);
                    }
                    return Err(status.into());
                }
            };
            let key = response.key.unwrap_or_default();
            if let Some(file) = secret_file {
                file.write(&response.secret)?;
            }
            if let (Some(file), Some(path)) = (signing_secret_file, &args.signing_secret_file) {
                write_all(file, path, &response.signing_secret)?;
            }
            let shown_signing_secret = (!response.signing_secret.is_empty()
                && args.signing_secret_file.is_none())
            .then_some(&response.signing_secret);
            let shown_secret = if args.secret_file.is_some() {
                None
            } else {
                Some(&response.secret)
            };
            if client.json {
                print_json(&json!({
                    "key": key_json(&key),
                    "secret": shown_secret,
                    "signing_secret": shown_signing_secret,
                    "signing_secret_file": args.signing_secret_file.as_ref().map(|p| p.display().to_string()),
                    "private_key_file": args.private_key_out.as_ref().map(|p| p.display().to_string()),
                    "revision": response.revision,
                }));
            } else {
                key_fields(&key);
                match (&args.secret_file, shown_secret) {
                    (Some(path), _) => println!("secret written to {} (mode 0600)", path.display()),
                    (None, Some(secret)) => println!("secret (shown once)  {secret}"),
                    _ => {}
                }
                if let Some(signing_secret) = shown_signing_secret {
                    println!("signing secret (shown once, base64)  {signing_secret}");
                }
                if let Some(path) = &args.signing_secret_file {
                    println!("signing secret written to {} (mode 0600)", path.display());
                }
                if let Some(path) = &args.private_key_out {
                    println!(
                        "ed25519 private key written to {} (PKCS#8 PEM, mode 0600); only its public key was sent",
                        path.display()
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
            let file = secret_file.as_deref().map(SecretFile::open).transpose()?;
            let response = admin
                .rotate_key(pb::RotateKeyRequest {
                    key_id,
                    grace_period_seconds,
                })
                .await?
                .into_inner();
            if let Some(file) = file {
                file.write(&response.secret)?;
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
