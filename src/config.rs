//! The one configuration struct for `keyfence serve`, filled from built-in defaults, then a TOML
//! file (`--config`), then `KEYFENCE_*` environment variables, then flags; later sources win.
//! [`Config`] is printed at start with secrets redacted.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::policy::{
    ip::Cidr,
    model::{Environment, Environments},
};

/// Flags and environment variables for `keyfence serve`. Every field is optional so that a value
/// left unset here falls through to the config file, then to the default.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and environment variables override it).
    #[arg(long, env = "KEYFENCE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data-plane listener (Authorizer, health, reflection). Default 127.0.0.1:50051.
    #[arg(long, env = "KEYFENCE_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin listener (Admin, health, reflection). Default 127.0.0.1:50052.
    #[arg(long, env = "KEYFENCE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Directory of the embedded store. Default ./keyfence-data.
    #[arg(long, env = "KEYFENCE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Bearer token admin callers must present; required when the admin listener is not on
    /// loopback. At least 16 characters.
    #[arg(long, env = "KEYFENCE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Environments keys can live in, comma-separated. Default production,sandbox.
    #[arg(long, env = "KEYFENCE_ENVIRONMENTS", value_delimiter = ',')]
    pub environments: Option<Vec<String>>,
    /// How far a signed timestamp may be from now, either way, in seconds. Default 300.
    #[arg(long, env = "KEYFENCE_SIGNATURE_WINDOW_SECS")]
    pub signature_window_secs: Option<u32>,
    /// How long an Authorize call with `min_revision` may wait for this replica to catch up, in
    /// milliseconds. Default 2000.
    #[arg(long, env = "KEYFENCE_MIN_REVISION_WAIT_MS")]
    pub min_revision_wait_ms: Option<u64>,
    /// Log format: `pretty` or `json`. Default pretty.
    #[arg(long, env = "KEYFENCE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Networks of the proxies in front of Envoy whose X-Forwarded-For is believed,
    /// comma-separated CIDRs. Without them the address Envoy reports as the source is the client,
    /// whatever the request's headers say. Default none.
    #[arg(long, env = "KEYFENCE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Whether a trusted proxy's X-Real-IP names the client (ahead of X-Forwarded-For). Only for
    /// proxies that overwrite it. Default false.
    #[arg(long, env = "KEYFENCE_TRUST_X_REAL_IP", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub trust_x_real_ip: Option<bool>,
    /// Whether Envoy denials say why (`{"success":false,"error":{"code":"IP_NOT_WHITELISTED",…}}`)
    /// instead of the opaque `{"code":401,"msg":"Unauthorized"}`. Default false.
    #[arg(long, env = "KEYFENCE_DETAILED_DENIALS", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub detailed_denials: Option<bool>,
    /// Whether a detailed IP denial also lists the key's allowed networks. A separate choice: it
    /// tells a caller holding the key where it would be accepted from. Default false.
    #[arg(long, env = "KEYFENCE_DETAILED_DENIALS_INCLUDE_ALLOWLIST", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub detailed_denials_include_allowlist: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// The settings file: the same names as the flags, in snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    admin_listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    admin_token: Option<String>,
    environments: Option<Vec<String>>,
    signature_window_secs: Option<u32>,
    min_revision_wait_ms: Option<u64>,
    log_format: Option<LogFormat>,
    trusted_proxies: Option<Vec<String>>,
    trust_x_real_ip: Option<bool>,
    detailed_denials: Option<bool>,
    detailed_denials_include_allowlist: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

/// Everything `serve` runs with, resolved and validated.
#[derive(Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub admin_token: Option<String>,
    pub environments: Environments,
    pub signature_window: Duration,
    pub min_revision_wait: Duration,
    pub log_format: LogFormat,
    /// Proxies whose forwarding headers Envoy's Check believes; empty trusts none.
    pub trusted_proxies: Vec<Cidr>,
    pub trust_x_real_ip: bool,
    pub detailed_denials: bool,
    pub detailed_denials_include_allowlist: bool,
}

impl Config {
    pub fn resolve(args: ServeArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let ServeArgs {
            config: _,
            listen,
            admin_listen,
            data_dir,
            admin_token,
            environments,
            signature_window_secs,
            min_revision_wait_ms,
            log_format,
            trusted_proxies,
            trust_x_real_ip,
            detailed_denials,
            detailed_denials_include_allowlist,
        } = args;
        let environment_names = environments
            .or(file.environments)
            .unwrap_or_else(|| vec!["production".into(), "sandbox".into()]);
        let config = Config {
            listen: listen
                .or(file.listen)
                .unwrap_or(([127, 0, 0, 1], 50051).into()),
            admin_listen: admin_listen
                .or(file.admin_listen)
                .unwrap_or(([127, 0, 0, 1], 50052).into()),
            data_dir: data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| "keyfence-data".into()),
            admin_token: admin_token.or(file.admin_token).filter(|t| !t.is_empty()),
            environments: parse_environments(&environment_names)?,
            signature_window: Duration::from_secs(u64::from(
                signature_window_secs
                    .or(file.signature_window_secs)
                    .unwrap_or(300),
            )),
            min_revision_wait: Duration::from_millis(
                min_revision_wait_ms
                    .or(file.min_revision_wait_ms)
                    .unwrap_or(2000),
            ),
            log_format: log_format.or(file.log_format).unwrap_or(LogFormat::Pretty),
            trusted_proxies: parse_trusted_proxies(
                &trusted_proxies.or(file.trusted_proxies).unwrap_or_default(),
            )?,
            trust_x_real_ip: trust_x_real_ip.or(file.trust_x_real_ip).unwrap_or(false),
            detailed_denials: detailed_denials.or(file.detailed_denials).unwrap_or(false),
            detailed_denials_include_allowlist: detailed_denials_include_allowlist
                .or(file.detailed_denials_include_allowlist)
                .unwrap_or(false),
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match &self.admin_token {
            None if !self.admin_listen.ip().is_loopback() => Err(ConfigError::Invalid {
                setting: "admin_token",
                reason: format!(
                    "is required because the admin listener {} is not on loopback",
                    self.admin_listen
                ),
            }),
            Some(token) if token.len() < 16 => Err(ConfigError::Invalid {
                setting: "admin_token",
                reason: "must be at least 16 characters".into(),
            }),
            _ if self.signature_window.is_zero() => Err(ConfigError::Invalid {
                setting: "signature_window_secs",
                reason: "must be at least 1".into(),
            }),
            _ if self.trust_x_real_ip && self.trusted_proxies.is_empty() => {
                Err(ConfigError::Invalid {
                    setting: "trust_x_real_ip",
                    reason: "has no effect without trusted_proxies".into(),
                })
            }
            _ if self.detailed_denials_include_allowlist && !self.detailed_denials => {
                Err(ConfigError::Invalid {
                    setting: "detailed_denials_include_allowlist",
                    reason: "has no effect without detailed_denials".into(),
                })
            }
            _ => Ok(()),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("data_dir", &self.data_dir)
            .field(
                "admin_token",
                &self.admin_token.as_ref().map(|_| "<redacted>"),
            )
            .field("environments", &self.environments.names())
            .field("signature_window_secs", &self.signature_window.as_secs())
            .field("min_revision_wait_ms", &self.min_revision_wait.as_millis())
            .field("log_format", &self.log_format)
            .field(
                "trusted_proxies",
                &self
                    .trusted_proxies
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .field("trust_x_real_ip", &self.trust_x_real_ip)
            .field("detailed_denials", &self.detailed_denials)
            .field(
                "detailed_denials_include_allowlist",
                &self.detailed_denials_include_allowlist,
            )
            .finish()
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

fn parse_trusted_proxies(entries: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    entries
        .iter()
        .map(|entry| entry.trim())
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry.parse::<Cidr>().map_err(|e| ConfigError::Invalid {
                setting: "trusted_proxies",
                reason: e.to_string(),
            })
        })
        .collect()
}

fn parse_environments(names: &[String]) -> Result<Environments, ConfigError> {
    if names.is_empty() {
        return Err(ConfigError::Invalid {
            setting: "environments",
            reason: "must name at least one environment".into(),
        });
    }
    let parsed = names
        .iter()
        .map(|name| {
            name.trim()
                .parse::<Environment>()
                .map_err(|e| ConfigError::Invalid {
                    setting: "environments",
                    reason: format!("{name:?} {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Environments::new(parsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_loopback_and_need_no_token() {
        let config = Config::resolve(ServeArgs::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:50052");
        assert_eq!(config.environments.names(), ["production", "sandbox"]);
        assert_eq!(config.signature_window, Duration::from_secs(300));
    }

    #[test]
    fn non_loopback_admin_requires_a_token() {
        let args = ServeArgs {
            admin_listen: Some("0.0.0.0:50052".parse().unwrap()),
            ..Default::default()
        };
        let err = Config::resolve(args.clone()).err().unwrap();
        assert!(
            err.to_string().starts_with("admin_token: is required"),
            "{err}"
        );
        let short = ServeArgs {
            admin_token: Some("short".into()),
            ..args.clone()
        };
        assert!(Config::resolve(short).is_err());
        let ok = ServeArgs {
            admin_token: Some("a-long-enough-token".into()),
            ..args
        };
        let config = Config::resolve(ok).unwrap();
        assert!(!format!("{config:?}").contains("a-long-enough-token"));
    }

    #[test]
    fn file_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyfence.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:6000\"\nenvironments = [\"production\", \"staging\"]\nsignature_window_secs = 60\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path.clone()),
            signature_window_secs: Some(30),
            ..Default::default()
        };
        let config = Config::resolve(args).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:6000");
        assert_eq!(config.environments.names(), ["production", "staging"]);
        assert_eq!(config.signature_window, Duration::from_secs(30));

        std::fs::write(&path, "lisen = \"127.0.0.1:6000\"\n").unwrap();
        let err = Config::resolve(ServeArgs {
            config: Some(path),
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn envoy_settings_from_file_and_flags() {
        let config = Config::resolve(ServeArgs::default()).unwrap();
        assert!(config.trusted_proxies.is_empty());
        assert!(!config.trust_x_real_ip && !config.detailed_denials);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyfence.toml");
        std::fs::write(
            &path,
            "trusted_proxies = [\"10.0.0.0/8\", \"2001:db8::/32\"]\ntrust_x_real_ip = true\n\
             detailed_denials = true\ndetailed_denials_include_allowlist = true\n",
        )
        .unwrap();
        let args = ServeArgs {
            config: Some(path),
            ..Default::default()
        };
        let config = Config::resolve(args.clone()).unwrap();
        assert_eq!(
            config
                .trusted_proxies
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "2001:db8::/32"]
        );
        assert!(config.trust_x_real_ip);
        assert!(config.detailed_denials && config.detailed_denials_include_allowlist);
        assert!(format!("{config:?}").contains("10.0.0.0/8"));

        // A flag overrides the file, and a lone trust_x_real_ip is a mistake worth naming.
        let err = Config::resolve(ServeArgs {
            trusted_proxies: Some(vec![]),
            ..args.clone()
        })
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "trust_x_real_ip: has no effect without trusted_proxies"
        );
        let err = Config::resolve(ServeArgs {
            detailed_denials: Some(false),
            ..args
        })
        .err()
        .unwrap();
        assert_eq!(
            err.to_string(),
            "detailed_denials_include_allowlist: has no effect without detailed_denials"
        );
    }

    #[test]
    fn trusted_proxies_are_parsed_strictly() {
        for (entry, expected) in [
            ("10.0.0.1/8", "did you mean 10.0.0.0/8?"),
            ("010.0.0.0/8", "not an IPv4 or IPv6 address"),
            ("10.0.0.0/08", "invalid prefix length"),
        ] {
            let err = Config::resolve(ServeArgs {
                trusted_proxies: Some(vec!["192.0.2.0/24".into(), entry.into()]),
                ..Default::default()
            })
            .err()
            .unwrap();
            let message = err.to_string();
            assert!(message.starts_with("trusted_proxies: "), "{message}");
            assert!(message.contains(expected), "{entry}: {message}");
        }
    }

    #[test]
    fn boolean_flags_take_an_optional_value() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            serve: ServeArgs,
        }
        let cli = Cli::try_parse_from([
            "keyfence",
            "--detailed-denials",
            "--trust-x-real-ip=false",
            "--trusted-proxies",
            "10.0.0.0/8,192.0.2.0/24",
        ])
        .unwrap();
        assert_eq!(cli.serve.detailed_denials, Some(true));
        assert_eq!(cli.serve.trust_x_real_ip, Some(false));
        assert_eq!(cli.serve.detailed_denials_include_allowlist, None);
        assert_eq!(
            cli.serve.trusted_proxies.unwrap(),
            ["10.0.0.0/8", "192.0.2.0/24"]
        );
    }

    #[test]
    fn bad_environment_names_are_rejected() {
        let args = ServeArgs {
            environments: Some(vec!["Production".into()]),
            ..Default::default()
        };
        assert!(Config::resolve(args).is_err());
    }
}
