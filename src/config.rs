//! The configuration of `keyfence serve`, filled from built-in defaults, then a TOML file
//! (`--config`), then `KEYFENCE_*` environment variables, then flags; later sources win.
//!
//! Each setting is declared once, as a field of [`ServeArgs`]: that field is its flag, its
//! environment variable and its name in the TOML file (the file is read into the same struct, so
//! the two cannot drift apart). Its default is applied once, in [`Config::resolve`], which
//! destructures every field so that none goes unread. [`Config`] is the resolved, validated form,
//! printed at start with secrets redacted.

use std::{
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use keyfence_policy::{
    ip::Cidr,
    model::{Environment, Environments},
};
use keyfence_store::access_log::Retention;

use crate::{access::alerts::AlertConfig, grpc::tls::TlsFiles};

/// Every setting of `keyfence serve`, as flags and environment variables and, under the same
/// names in snake_case, as the TOML file. Every field is optional so that a value left unset
/// falls through to the file, then to the default.
#[derive(Debug, Default, Clone, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (flags and environment variables override it).
    #[arg(long, env = "KEYFENCE_CONFIG")]
    #[serde(skip)]
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
    /// A bearer token admin callers may present, named `admin` (at least 16 characters). Prefer
    /// --admin-tokens-file. With neither, the first start writes a random token to
    /// <data-dir>/admin.token (0600), which the CLI reads.
    #[arg(long, env = "KEYFENCE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// File of named admin token digests, one `NAME sha256:HEX` line each (`keyfence admin-token
    /// new` makes them), so that each person's token can be rotated alone. Default none.
    #[arg(long, env = "KEYFENCE_ADMIN_TOKENS_FILE")]
    pub admin_tokens_file: Option<PathBuf>,
    /// PEM certificate chain of the data-plane listener; with --tls-key it speaks TLS. Reloaded
    /// when the file changes or on SIGHUP. Default none (plaintext).
    #[arg(long, env = "KEYFENCE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the data-plane listener.
    #[arg(long, env = "KEYFENCE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificates data-plane clients must present a certificate from (mTLS): a client
    /// without one is refused in the handshake. Default none.
    #[arg(long, env = "KEYFENCE_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// PEM certificate chain of the admin listener; with --admin-tls-key it speaks TLS.
    #[arg(long, env = "KEYFENCE_ADMIN_TLS_CERT")]
    pub admin_tls_cert: Option<PathBuf>,
    /// PEM private key of the admin listener.
    #[arg(long, env = "KEYFENCE_ADMIN_TLS_KEY")]
    pub admin_tls_key: Option<PathBuf>,
    /// PEM CA certificates admin clients must present a certificate from (mTLS); a verified
    /// certificate authenticates as its subject CN (else its first DNS SAN). Default none.
    #[arg(long, env = "KEYFENCE_ADMIN_TLS_CLIENT_CA")]
    pub admin_tls_client_ca: Option<PathBuf>,
    /// Allow a plaintext admin listener off loopback (tokens then cross the network in clear).
    /// Default false: off loopback the admin listener needs --admin-tls-cert and --admin-tls-key.
    #[arg(long, env = "KEYFENCE_ADMIN_INSECURE_PLAINTEXT", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub admin_insecure_plaintext: Option<bool>,
    /// Source networks that may call Authorize and Check at all, comma-separated CIDRs; any other
    /// caller gets PERMISSION_DENIED before a key is looked up. For deployments without mTLS.
    /// Default: every caller.
    #[arg(long, env = "KEYFENCE_DATA_ALLOWED_CALLERS", value_delimiter = ',')]
    pub data_allowed_callers: Option<Vec<String>>,
    /// Environments keys can live in, comma-separated. Default production,sandbox.
    #[arg(long, env = "KEYFENCE_ENVIRONMENTS", value_delimiter = ',')]
    pub environments: Option<Vec<String>>,
    /// How far a signed timestamp may be from now, either way, in seconds. Default 300.
    #[arg(long, env = "KEYFENCE_SIGNATURE_WINDOW_SECS")]
    pub signature_window_secs: Option<u32>,
    /// Whether every signing key requires a nonce, whatever the key's own `require_nonce` says:
    /// without one, a signed request can be replayed for the whole signature window. Default
    /// false.
    #[arg(long, env = "KEYFENCE_REQUIRE_NONCE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub require_nonce: Option<bool>,
    /// How long an Authorize call with `min_revision` may wait for this replica to catch up, in
    /// milliseconds. Default 2000.
    #[arg(long, env = "KEYFENCE_MIN_REVISION_WAIT_MS")]
    pub min_revision_wait_ms: Option<u64>,
    /// How long in-flight calls may take to finish after SIGTERM or SIGINT (a duration: 10s,
    /// 1m). Default 10s.
    #[arg(long, env = "KEYFENCE_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Decisions (Authorize, Check, CheckAccess) in progress at once; beyond it Authorize answers
    /// RESOURCE_EXHAUSTED and Check denies (503) at once, never queueing. Default 1024.
    #[arg(long, env = "KEYFENCE_MAX_INFLIGHT")]
    pub max_inflight: Option<usize>,
    /// The longest a decision may wait on the shared nonce store, in milliseconds; a slower one
    /// answers DEADLINE_EXCEEDED (Check: a 503 denial). The other wait, for min_revision, is
    /// bounded by min_revision_wait_ms, which must be shorter. Default 3000.
    #[arg(long, env = "KEYFENCE_DECISION_TIMEOUT_MS")]
    pub decision_timeout_ms: Option<u64>,
    /// How many Authorize calls may wait for a `min_revision` at once; more are refused with
    /// RESOURCE_EXHAUSTED instead of being held. Default 256.
    #[arg(long, env = "KEYFENCE_MIN_REVISION_MAX_WAITERS")]
    pub min_revision_max_waiters: Option<usize>,
    /// Log format: `pretty` or `json`. Default pretty.
    #[arg(long, env = "KEYFENCE_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Networks of the proxies in front of Envoy whose X-Forwarded-For is believed,
    /// comma-separated CIDRs. Without them the address Envoy reports as the source is the client,
    /// whatever the request's headers say. Default none.
    #[arg(long, env = "KEYFENCE_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Accept trusted-proxy networks wider than /8 (IPv4) or /32 (IPv6). Such a network lets
    /// most of the internet choose its own client address through X-Forwarded-For, so it is
    /// refused at start unless this says it is meant. Default false.
    #[arg(long, env = "KEYFENCE_TRUSTED_PROXIES_ALLOW_WIDE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub trusted_proxies_allow_wide: Option<bool>,
    /// Whether Envoy's ext_authz filter buffers request bodies (`with_request_body`). Only then
    /// does a signed request that announces no length count as having no body; otherwise it is
    /// denied as BODY_NOT_FORWARDED, since Envoy hides chunked framing. Default false.
    #[arg(long, env = "KEYFENCE_ENVOY_WITH_REQUEST_BODY", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub envoy_with_request_body: Option<bool>,
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
    /// Use Redis as the store (redis://[user:password@]host:port/db) instead of the embedded one,
    /// so that many replicas share one source of truth.
    #[arg(long, env = "KEYFENCE_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// The secrets key file: the keys that encrypt HMAC signing secrets and authenticate every
    /// stored record (one `<id> <64 hex digits>` a line; the first seals, all open; edit it with
    /// `keyfence secrets`). Reloaded on SIGHUP and when it changes. Default
    /// `<data_dir>/secrets.key` with the embedded store, made there (0600) when absent; with
    /// Redis none, and required once any HMAC key exists: every replica needs the same file.
    #[arg(long, env = "KEYFENCE_SECRETS_KEY_FILE")]
    pub secrets_key_file: Option<PathBuf>,
    /// Prefix of every Redis key and channel, so several deployments can share one Redis.
    /// Default keyfence.
    #[arg(long, env = "KEYFENCE_REDIS_NAMESPACE")]
    pub redis_namespace: Option<String>,
    /// How often the change log is checked even without a notification, in milliseconds.
    /// Default 1000.
    #[arg(long, env = "KEYFENCE_SYNC_INTERVAL_MS")]
    pub sync_interval_ms: Option<u64>,
    /// Refuse to answer (UNAVAILABLE, so callers fail closed) when the policy has not been
    /// confirmed against the store for this long, in milliseconds. Off by default: availability
    /// over revocation.
    #[arg(long, env = "KEYFENCE_MAX_STALENESS_MS")]
    pub max_staleness_ms: Option<u64>,
    /// With Redis down, remember nonces in this replica only instead of refusing signed requests
    /// that carry one (a replay to another replica then goes unnoticed). Default false.
    #[arg(long, env = "KEYFENCE_NONCE_FALLBACK_LOCAL")]
    pub nonce_fallback_local: Option<bool>,
    /// Keep a per-key access log of every decision. Default true.
    #[arg(long, env = "KEYFENCE_ACCESS_LOG")]
    pub access_log: Option<bool>,
    /// Access records waiting to be written; beyond this they are dropped and counted, never the
    /// request. Default 65536.
    #[arg(long, env = "KEYFENCE_ACCESS_LOG_QUEUE")]
    pub access_log_queue: Option<usize>,
    /// Bytes of access records waiting to be written, whatever their number; beyond this they are
    /// dropped and counted. Default 16777216 (16 MiB).
    #[arg(long, env = "KEYFENCE_ACCESS_LOG_QUEUE_BYTES")]
    pub access_log_queue_bytes: Option<usize>,
    /// Access records kept per key. Default 10000.
    #[arg(long, env = "KEYFENCE_ACCESS_LOG_MAX_RECORDS")]
    pub access_log_max_records: Option<usize>,
    /// Age after which access records are dropped, in seconds. Default 2592000 (30 days).
    #[arg(long, env = "KEYFENCE_ACCESS_LOG_MAX_AGE_SECS")]
    pub access_log_max_age_secs: Option<u64>,
    /// Blocked attempts of one key in one window above which an alert is raised. Default 20.
    #[arg(long, env = "KEYFENCE_ALERT_MAX_BLOCKED")]
    pub alert_max_blocked: Option<u32>,
    /// Distinct blocked addresses of one key in one window above which an alert is raised.
    /// Default 5.
    #[arg(long, env = "KEYFENCE_ALERT_MAX_DISTINCT_IPS")]
    pub alert_max_distinct_ips: Option<u32>,
    /// The alert window, in seconds (one alert per key per window). Default 60.
    #[arg(long, env = "KEYFENCE_ALERT_WINDOW_SECS")]
    pub alert_window_secs: Option<u64>,
    /// POST alerts as JSON to this URL (with retries).
    #[arg(long, env = "KEYFENCE_ALERT_WEBHOOK_URL")]
    pub alert_webhook_url: Option<String>,
    /// The largest admin request accepted, in bytes; a larger one is refused with OUT_OF_RANGE
    /// ("decoded message length too large") before it is read into memory. Default 8388608
    /// (8 MiB).
    #[arg(long, env = "KEYFENCE_ADMIN_MAX_REQUEST_BYTES")]
    pub admin_max_request_bytes: Option<usize>,
    /// The most allowlist entries (or removals) one admin request may carry. Default 10000.
    #[arg(long, env = "KEYFENCE_ADMIN_MAX_ENTRIES_PER_REQUEST")]
    pub admin_max_entries_per_request: Option<usize>,
    /// Serve Prometheus metrics at http://<addr>/metrics. Off by default.
    #[arg(long, env = "KEYFENCE_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Export OpenTelemetry traces and metrics over OTLP/gRPC to this endpoint
    /// (http://collector:4317). Nothing is exported when unset.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
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
    #[error("cannot combine the config file with flags: {0}")]
    Layer(serde_json::Error),
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
    pub admin_tokens_file: Option<PathBuf>,
    /// `None`: the data plane is plaintext.
    pub data_tls: Option<TlsFiles>,
    /// `None`: the admin plane is plaintext (on loopback, or with `admin_insecure_plaintext`).
    pub admin_tls: Option<TlsFiles>,
    pub admin_insecure_plaintext: bool,
    /// Empty: every caller may ask for decisions.
    pub data_allowed_callers: Vec<Cidr>,
    pub environments: Environments,
    pub signature_window: Duration,
    pub require_nonce: bool,
    pub min_revision_wait: Duration,
    pub shutdown_grace: Duration,
    pub max_inflight: usize,
    pub decision_timeout: Duration,
    pub min_revision_max_waiters: usize,
    pub log_format: LogFormat,
    /// Proxies whose forwarding headers Envoy's Check believes; empty trusts none.
    pub trusted_proxies: Vec<Cidr>,
    pub trusted_proxies_allow_wide: bool,
    pub envoy_with_request_body: bool,
    pub trust_x_real_ip: bool,
    pub detailed_denials: bool,
    pub detailed_denials_include_allowlist: bool,
    /// `None`: the embedded store in `data_dir`.
    pub redis: Option<RedisConfig>,
    /// `None` only with Redis, when not configured: records are then stored in clear and no HMAC
    /// key can be created.
    pub secrets_key_file: Option<PathBuf>,
    pub sync_interval: Duration,
    pub max_staleness: Option<Duration>,
    pub access_log: AccessLogSettings,
    pub admin_limits: AdminLimits,
    pub metrics_listen: Option<SocketAddr>,
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AccessLogSettings {
    pub enabled: bool,
    pub queue_capacity: usize,
    pub queue_max_bytes: usize,
    pub retention: Retention,
    pub alerts: AlertConfig,
}

/// Bounds on one admin request.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    pub max_request_bytes: usize,
    pub max_entries_per_request: usize,
}

#[derive(Clone)]
pub struct RedisConfig {
    pub url: String,
    pub namespace: String,
    pub nonce_fallback_local: bool,
}

impl RedisConfig {
    /// The URL without credentials or query, for logs.
    pub fn redacted_url(&self) -> String {
        redacted_url(&self.url)
    }
}

/// A URL as the configuration logs it: user and password, query and fragment replaced by
/// `<redacted>` (webhook and Redis URLs often carry a token there), scheme, host, port and path
/// kept so that an operator can still tell which endpoint is meant.
pub fn redacted_url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, url),
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let host = match authority.rfind('@') {
        Some(at) => format!("<redacted>@{}", &authority[at + 1..]),
        None => authority.to_owned(),
    };
    let path_end = tail.find(['?', '#']).unwrap_or(tail.len());
    let (path, extra) = tail.split_at(path_end);
    let mut out = String::new();
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    out.push_str(&host);
    out.push_str(path);
    if !extra.is_empty() {
        out.push_str(if extra.starts_with('?') {
            "?<redacted>"
        } else {
            "#<redacted>"
        });
    }
    out
}

impl Config {
    pub fn resolve(args: ServeArgs) -> Result<Config, ConfigError> {
        let args = match args.config.clone() {
            Some(path) => args.over(read_file(&path)?)?,
            None => args,
        };
        let ServeArgs {
            config: _,
            listen,
            admin_listen,
            data_dir,
            admin_token,
            admin_tokens_file,
            tls_cert,
            tls_key,
            tls_client_ca,
            admin_tls_cert,
            admin_tls_key,
            admin_tls_client_ca,
            admin_insecure_plaintext,
            data_allowed_callers,
            environments,
            signature_window_secs,
            require_nonce,
            min_revision_wait_ms,
            shutdown_grace,
            max_inflight,
            decision_timeout_ms,
            min_revision_max_waiters,
            log_format,
            trusted_proxies,
            trusted_proxies_allow_wide,
            envoy_with_request_body,
            trust_x_real_ip,
            detailed_denials,
            detailed_denials_include_allowlist,
            redis_url,
            secrets_key_file,
            redis_namespace,
            sync_interval_ms,
            max_staleness_ms,
            nonce_fallback_local,
            access_log,
            access_log_queue,
            access_log_queue_bytes,
            access_log_max_records,
            access_log_max_age_secs,
            alert_max_blocked,
            alert_max_distinct_ips,
            alert_window_secs,
            alert_webhook_url,
            admin_max_request_bytes,
            admin_max_entries_per_request,
            metrics_listen,
            otlp_endpoint,
        } = args;
        let defaults = (Retention::default(), AlertConfig::default());
        let environment_names =
            environments.unwrap_or_else(|| vec!["production".into(), "sandbox".into()]);
        let mut config = Config {
            listen: listen.unwrap_or(([127, 0, 0, 1], 50051).into()),
            admin_listen: admin_listen.unwrap_or(([127, 0, 0, 1], 50052).into()),
            data_dir: data_dir.unwrap_or_else(|| "keyfence-data".into()),
            admin_token: admin_token.filter(|t| !t.is_empty()),
            admin_tokens_file,
            data_tls: tls_files(
                ("tls_cert", tls_cert),
                ("tls_key", tls_key),
                ("tls_client_ca", tls_client_ca),
            )?,
            admin_tls: tls_files(
                ("admin_tls_cert", admin_tls_cert),
                ("admin_tls_key", admin_tls_key),
                ("admin_tls_client_ca", admin_tls_client_ca),
            )?,
            admin_insecure_plaintext: admin_insecure_plaintext.unwrap_or(false),
            data_allowed_callers: parse_cidrs(
                "data_allowed_callers",
                &data_allowed_callers.unwrap_or_default(),
            )?,
            environments: parse_environments(&environment_names)?,
            signature_window: Duration::from_secs(u64::from(signature_window_secs.unwrap_or(300))),
            require_nonce: require_nonce.unwrap_or(false),
            min_revision_wait: Duration::from_millis(min_revision_wait_ms.unwrap_or(2000)),
            shutdown_grace: match shutdown_grace {
                Some(text) => {
                    humantime::parse_duration(&text).map_err(|e| ConfigError::Invalid {
                        setting: "shutdown_grace",
                        reason: format!("{text:?} is not a duration like 10s or 1m: {e}"),
                    })?
                }
                None => Duration::from_secs(10),
            },
            max_inflight: max_inflight.unwrap_or(1024),
            decision_timeout: Duration::from_millis(decision_timeout_ms.unwrap_or(3000)),
            log_format: log_format.unwrap_or(LogFormat::Pretty),
            trusted_proxies: parse_cidrs("trusted_proxies", &trusted_proxies.unwrap_or_default())?,
            min_revision_max_waiters: min_revision_max_waiters.unwrap_or(256),
            trusted_proxies_allow_wide: trusted_proxies_allow_wide.unwrap_or(false),
            envoy_with_request_body: envoy_with_request_body.unwrap_or(false),
            trust_x_real_ip: trust_x_real_ip.unwrap_or(false),
            detailed_denials: detailed_denials.unwrap_or(false),
            detailed_denials_include_allowlist: detailed_denials_include_allowlist.unwrap_or(false),
            redis: redis_url.filter(|u| !u.is_empty()).map(|url| RedisConfig {
                url,
                namespace: redis_namespace.unwrap_or_else(|| "keyfence".into()),
                nonce_fallback_local: nonce_fallback_local.unwrap_or(false),
            }),
            secrets_key_file: secrets_key_file.filter(|p| !p.as_os_str().is_empty()),
            sync_interval: Duration::from_millis(sync_interval_ms.unwrap_or(1000)),
            max_staleness: max_staleness_ms.map(Duration::from_millis),
            access_log: AccessLogSettings {
                enabled: access_log.unwrap_or(true),
                queue_capacity: access_log_queue.unwrap_or(65_536),
                queue_max_bytes: access_log_queue_bytes.unwrap_or(16 * 1024 * 1024),
                retention: Retention {
                    max_records_per_key: access_log_max_records
                        .unwrap_or(defaults.0.max_records_per_key),
                    max_age: access_log_max_age_secs
                        .map(Duration::from_secs)
                        .unwrap_or(defaults.0.max_age),
                },
                alerts: AlertConfig {
                    max_blocked: alert_max_blocked.unwrap_or(defaults.1.max_blocked),
                    max_distinct_ips: alert_max_distinct_ips.unwrap_or(defaults.1.max_distinct_ips),
                    window: alert_window_secs
                        .map(Duration::from_secs)
                        .unwrap_or(defaults.1.window),
                    webhook_url: alert_webhook_url.filter(|u| !u.is_empty()),
                },
            },
            admin_limits: AdminLimits {
                max_request_bytes: admin_max_request_bytes.unwrap_or(8 * 1024 * 1024),
                max_entries_per_request: admin_max_entries_per_request.unwrap_or(10_000),
            },
            metrics_listen,
            otlp_endpoint: otlp_endpoint.filter(|e| !e.is_empty()),
        };
        if config.secrets_key_file.is_none() && config.redis.is_none() {
            config.secrets_key_file = Some(config.data_dir.join(crate::secrets::DEFAULT_FILE_NAME));
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        match &self.admin_token {
            _ if self.admin_tls.is_none()
                && !self.admin_insecure_plaintext
                && !self.admin_listen.ip().is_loopback() =>
            {
                Err(ConfigError::Invalid {
                    setting: "admin_listen",
                    reason: format!(
                        "{} is not on loopback, so the admin plane needs TLS: give admin_tls_cert and admin_tls_key (or admin_insecure_plaintext to send tokens in clear)",
                        self.admin_listen
                    ),
                })
            }
            Some(token) if token.chars().count() < crate::authn::MIN_TOKEN_CHARS => {
                Err(ConfigError::Invalid {
                    setting: "admin_token",
                    reason: format!(
                        "must be at least {} characters",
                        crate::authn::MIN_TOKEN_CHARS
                    ),
                })
            }
            _ if self.max_inflight == 0 => Err(ConfigError::Invalid {
                setting: "max_inflight",
                reason: "must be at least 1".into(),
            }),
            _ if self.decision_timeout <= self.min_revision_wait => Err(ConfigError::Invalid {
                setting: "decision_timeout_ms",
                reason: format!(
                    "must be longer than min_revision_wait_ms ({} ms), or every wait would time out",
                    self.min_revision_wait.as_millis()
                ),
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
            _ if self.sync_interval.is_zero() => Err(ConfigError::Invalid {
                setting: "sync_interval_ms",
                reason: "must be at least 1".into(),
            }),
            _ if self
                .max_staleness
                .is_some_and(|max| max <= self.sync_interval) =>
            {
                Err(ConfigError::Invalid {
                    setting: "max_staleness_ms",
                    reason: format!(
                        "must be longer than sync_interval_ms ({} ms), or every replica would stop between two checks",
                        self.sync_interval.as_millis()
                    ),
                })
            }
            _ if self.redis.as_ref().is_some_and(|r| {
                r.namespace.is_empty() || r.namespace.chars().any(|c| c.is_whitespace())
            }) =>
            {
                Err(ConfigError::Invalid {
                    setting: "redis_namespace",
                    reason: "must be non-empty and contain no white space".into(),
                })
            }
            _ if self.access_log.queue_capacity == 0
                || self.access_log.retention.max_records_per_key == 0 =>
            {
                Err(ConfigError::Invalid {
                    setting: "access_log_queue / access_log_max_records",
                    reason: "must be at least 1".into(),
                })
            }
            _ if self.access_log.queue_max_bytes < MIN_ACCESS_LOG_QUEUE_BYTES => {
                Err(ConfigError::Invalid {
                    setting: "access_log_queue_bytes",
                    reason: format!(
                        "must be at least {MIN_ACCESS_LOG_QUEUE_BYTES}, room for the largest record"
                    ),
                })
            }
            _ if self.min_revision_max_waiters == 0 => Err(ConfigError::Invalid {
                setting: "min_revision_max_waiters",
                reason: "must be at least 1".into(),
            }),
            _ if self.admin_limits.max_request_bytes < 64 * 1024
                || self.admin_limits.max_entries_per_request == 0 =>
            {
                Err(ConfigError::Invalid {
                    setting: "admin_max_request_bytes / admin_max_entries_per_request",
                    reason: "must be at least 65536 bytes and 1 entry".into(),
                })
            }
            _ if !self.trusted_proxies_allow_wide
                && let Some(wide) = self.trusted_proxies.iter().find(|n| is_wide(**n)) =>
            {
                Err(ConfigError::Invalid {
                    setting: "trusted_proxies",
                    reason: format!(
                        "{wide} is wider than /{MAX_TRUSTED_PREFIX_V4} (IPv4) or /{MAX_TRUSTED_PREFIX_V6} (IPv6): \
                         clients in it could choose their own address through X-Forwarded-For; \
                         name your proxies' networks, or set trusted_proxies_allow_wide if this is meant"
                    ),
                })
            }
            _ if self.access_log.alerts.window.is_zero() => Err(ConfigError::Invalid {
                setting: "alert_window_secs",
                reason: "must be at least 1".into(),
            }),
            _ if self
                .access_log
                .alerts
                .webhook_url
                .as_ref()
                .is_some_and(|url| {
                    !(url.starts_with("http://") || url.starts_with("https://"))
                }) =>
            {
                Err(ConfigError::Invalid {
                    setting: "alert_webhook_url",
                    reason: "must be an http:// or https:// URL".into(),
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
            .field("admin_tokens_file", &self.admin_tokens_file)
            .field("data_tls", &self.data_tls)
            .field("admin_tls", &self.admin_tls)
            .field("admin_insecure_plaintext", &self.admin_insecure_plaintext)
            .field(
                "data_allowed_callers",
                &self
                    .data_allowed_callers
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .field("environments", &self.environments.names())
            .field("signature_window_secs", &self.signature_window.as_secs())
            .field("require_nonce", &self.require_nonce)
            .field("min_revision_wait_ms", &self.min_revision_wait.as_millis())
            .field("shutdown_grace", &self.shutdown_grace)
            .field("max_inflight", &self.max_inflight)
            .field("decision_timeout_ms", &self.decision_timeout.as_millis())
            .field("min_revision_max_waiters", &self.min_revision_max_waiters)
            .field("log_format", &self.log_format)
            .field(
                "trusted_proxies",
                &self
                    .trusted_proxies
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>(),
            )
            .field(
                "trusted_proxies_allow_wide",
                &self.trusted_proxies_allow_wide,
            )
            .field("envoy_with_request_body", &self.envoy_with_request_body)
            .field("trust_x_real_ip", &self.trust_x_real_ip)
            .field("detailed_denials", &self.detailed_denials)
            .field(
                "detailed_denials_include_allowlist",
                &self.detailed_denials_include_allowlist,
            )
            .field(
                "store",
                &match &self.redis {
                    None => format!("embedded ({})", self.data_dir.display()),
                    Some(redis) => format!(
                        "redis {} namespace {:?} nonce_fallback_local {}",
                        redis.redacted_url(),
                        redis.namespace,
                        redis.nonce_fallback_local
                    ),
                },
            )
            .field("secrets_key_file", &self.secrets_key_file)
            .field("sync_interval_ms", &self.sync_interval.as_millis())
            .field(
                "max_staleness_ms",
                &self.max_staleness.map(|d| d.as_millis()),
            )
            .field("access_log", &self.access_log)
            .field("admin_limits", &self.admin_limits)
            .field("metrics_listen", &self.metrics_listen)
            .field(
                "otlp_endpoint",
                &self.otlp_endpoint.as_deref().map(redacted_url),
            )
            .finish()
    }
}

impl ServeArgs {
    /// These settings, with what they leave unset taken from `file`.
    fn over(self, file: ServeArgs) -> Result<ServeArgs, ConfigError> {
        let serde_json::Value::Object(mut merged) =
            serde_json::to_value(file).map_err(ConfigError::Layer)?
        else {
            unreachable!("a struct serializes as an object")
        };
        let serde_json::Value::Object(given) =
            serde_json::to_value(&self).map_err(ConfigError::Layer)?
        else {
            unreachable!("a struct serializes as an object")
        };
        merged.extend(given.into_iter().filter(|(_, value)| !value.is_null()));
        let mut layered: ServeArgs =
            serde_json::from_value(merged.into()).map_err(ConfigError::Layer)?;
        layered.config = self.config;
        Ok(layered)
    }
}

fn read_file(path: &Path) -> Result<ServeArgs, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// The least room an access-log queue needs: one record of the largest size the edge accepts.
const MIN_ACCESS_LOG_QUEUE_BYTES: usize = 64 * 1024;

/// The widest trusted-proxy networks accepted without `trusted_proxies_allow_wide`. A /8 is the
/// largest block one organisation is ever assigned (10.0.0.0/8 holds any private proxy fleet), and
/// a /32 is the usual IPv6 allocation of a whole provider: a proxy fleet wider than that is not
/// one's own, and trusting it lets whoever else is in it pick their client address.
const MAX_TRUSTED_PREFIX_V4: u8 = 8;
const MAX_TRUSTED_PREFIX_V6: u8 = 32;

fn is_wide(network: Cidr) -> bool {
    let net = network.net();
    let least = match net {
        ipnet::IpNet::V4(_) => MAX_TRUSTED_PREFIX_V4,
        ipnet::IpNet::V6(_) => MAX_TRUSTED_PREFIX_V6,
    };
    net.prefix_len() < least
}

fn parse_cidrs(setting: &'static str, entries: &[String]) -> Result<Vec<Cidr>, ConfigError> {
    entries
        .iter()
        .map(|entry| entry.trim())
        .filter(|entry| !entry.is_empty())
        .map(|entry| {
            entry.parse::<Cidr>().map_err(|e| ConfigError::Invalid {
                setting,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// A listener's TLS files: a certificate and its key together, a client CA only with them.
fn tls_files(
    (cert_setting, cert): (&'static str, Option<PathBuf>),
    (key_setting, key): (&'static str, Option<PathBuf>),
    (ca_setting, client_ca): (&'static str, Option<PathBuf>),
) -> Result<Option<TlsFiles>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(TlsFiles {
            cert,
            key,
            client_ca,
        })),
        (None, None) if client_ca.is_some() => Err(ConfigError::Invalid {
            setting: ca_setting,
            reason: format!("needs {cert_setting} and {key_setting}"),
        }),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Invalid {
            setting: key_setting,
            reason: format!("is required with {cert_setting}"),
        }),
        (None, Some(_)) => Err(ConfigError::Invalid {
            setting: cert_setting,
            reason: format!("is required with {key_setting}"),
        }),
    }
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
    fn defaults_are_loopback() {
        let config = Config::resolve(ServeArgs::default()).unwrap();
        assert_eq!(config.listen.to_string(), "127.0.0.1:50051");
        assert_eq!(config.admin_listen.to_string(), "127.0.0.1:50052");
        assert_eq!(config.environments.names(), ["production", "sandbox"]);
        assert_eq!(config.signature_window, Duration::from_secs(300));
    }

    #[test]
    fn a_non_loopback_admin_listener_needs_tls_or_an_explicit_plaintext_choice() {
        let args = ServeArgs {
            admin_listen: Some("0.0.0.0:50052".parse().unwrap()),
            ..Default::default()
        };
        let err = Config::resolve(args.clone()).err().unwrap();
        assert!(
            err.to_string().starts_with(
                "admin_listen: 0.0.0.0:50052 is not on loopback, so the admin plane needs TLS"
            ),
            "{err}"
        );
        let with_tls = ServeArgs {
            admin_tls_cert: Some("admin.crt".into()),
            admin_tls_key: Some("admin.key".into()),
            ..args.clone()
        };
        assert!(Config::resolve(with_tls).unwrap().admin_tls.is_some());
        let plaintext = ServeArgs {
            admin_insecure_plaintext: Some(true),
            admin_token: Some("a-long-enough-token".into()),
            ..args.clone()
        };
        let config = Config::resolve(plaintext).unwrap();
        assert!(!format!("{config:?}").contains("a-long-enough-token"));
        let short = ServeArgs {
            admin_token: Some("short".into()),
            ..Default::default()
        };
        assert!(Config::resolve(short).is_err());
    }

    #[test]
    fn tls_files_go_together() {
        for (args, expected) in [
            (
                ServeArgs {
                    tls_cert: Some("a.crt".into()),
                    ..Default::default()
                },
                "tls_key: is required with tls_cert",
            ),
            (
                ServeArgs {
                    admin_tls_key: Some("a.key".into()),
                    ..Default::default()
                },
                "admin_tls_cert: is required with admin_tls_key",
            ),
            (
                ServeArgs {
                    tls_client_ca: Some("ca.crt".into()),
                    ..Default::default()
                },
                "tls_client_ca: needs tls_cert and tls_key",
            ),
        ] {
            assert_eq!(Config::resolve(args).err().unwrap().to_string(), expected);
        }
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
    fn redis_settings_and_redaction() {
        let args = ServeArgs {
            redis_url: Some("redis://:hunter2@127.0.0.1:6379/0".into()),
            max_staleness_ms: Some(30_000),
            ..Default::default()
        };
        let config = Config::resolve(args).unwrap();
        let redis = config.redis.as_ref().unwrap();
        assert_eq!(redis.namespace, "keyfence");
        assert!(!redis.nonce_fallback_local, "fail closed by default");
        let printed = format!("{config:?}");
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("127.0.0.1:6379"), "{printed}");
        let too_tight = ServeArgs {
            max_staleness_ms: Some(500),
            ..Default::default()
        };
        assert!(Config::resolve(too_tight).is_err());
    }

    #[test]
    fn every_logged_url_is_redacted() {
        let args = ServeArgs {
            redis_url: Some(
                "rediss://user:hunter2@redis.internal:6380/0?password=swordfish".into(),
            ),
            alert_webhook_url: Some(
                "https://hook:t0ken@hooks.example.com/alerts?token=s3cret#frag".into(),
            ),
            otlp_endpoint: Some("http://otel:passw0rd@collector:4317/?key=abc123".into()),
            ..Default::default()
        };
        let printed = format!("{:?}", Config::resolve(args).unwrap());
        for secret in [
            "hunter2",
            "swordfish",
            "t0ken",
            "s3cret",
            "frag",
            "passw0rd",
            "abc123",
        ] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
        for kept in [
            "rediss://<redacted>@redis.internal:6380/0?<redacted>",
            "https://<redacted>@hooks.example.com/alerts?<redacted>",
            "http://<redacted>@collector:4317/?<redacted>",
        ] {
            assert!(printed.contains(kept), "{kept} not in {printed}");
        }
        assert_eq!(
            redacted_url("http://127.0.0.1:9/hook"),
            "http://127.0.0.1:9/hook"
        );
        assert_eq!(
            redacted_url("redis://a@b@host?x#y"),
            "redis://<redacted>@host?<redacted>"
        );
    }

    #[test]
    fn wide_trusted_proxies_are_refused_unless_allowed() {
        for wide in [
            "0.0.0.0/0",
            "::/0",
            "10.0.0.0/7",
            "2001::/31",
            "::ffff:0.0.0.0/96",
        ] {
            let args = ServeArgs {
                trusted_proxies: Some(vec!["192.0.2.0/24".into(), wide.into()]),
                ..Default::default()
            };
            let message = Config::resolve(args.clone()).err().unwrap().to_string();
            assert!(
                message.starts_with("trusted_proxies: "),
                "{wide}: {message}"
            );
            assert!(message.contains("trusted_proxies_allow_wide"), "{message}");
            let allowed = ServeArgs {
                trusted_proxies_allow_wide: Some(true),
                ..args
            };
            assert!(Config::resolve(allowed).is_ok(), "{wide}");
        }
        for narrow in ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"] {
            let args = ServeArgs {
                trusted_proxies: Some(vec![narrow.into()]),
                ..Default::default()
            };
            assert!(Config::resolve(args).is_ok(), "{narrow}");
        }
    }

    #[test]
    fn the_example_config_parses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/keyfence.toml");
        let args = ServeArgs {
            config: Some(path.into()),
            ..Default::default()
        };
        let config = Config::resolve(args).unwrap();
        assert_eq!(config.data_dir, std::path::Path::new("/var/lib/keyfence"));
        assert_eq!(config.log_format, LogFormat::Json);
    }

    #[test]
    fn the_secrets_key_file_defaults_to_the_data_dir_only_for_the_embedded_store() {
        let config = Config::resolve(ServeArgs {
            data_dir: Some("/srv/kf".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            config.secrets_key_file.as_deref(),
            Some(Path::new("/srv/kf/secrets.key"))
        );
        let redis = ServeArgs {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..Default::default()
        };
        assert_eq!(
            Config::resolve(redis.clone()).unwrap().secrets_key_file,
            None
        );
        let given = Config::resolve(ServeArgs {
            secrets_key_file: Some("/etc/keyfence/secrets.key".into()),
            ..redis
        })
        .unwrap();
        assert_eq!(
            given.secrets_key_file.as_deref(),
            Some(Path::new("/etc/keyfence/secrets.key"))
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
