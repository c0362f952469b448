//! Alerts on repeated blocked attempts: when one key is blocked more than `max_blocked` times in a
//! window, or from more than `max_distinct_ips` addresses, emit one structured warning, count it,
//! and (when configured) POST a JSON alert to a webhook, with retries, on its own task. One alert
//! per key per window: no storm. Counting is per replica.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use serde::Serialize;
use tokio::sync::mpsc;

use keyfence_policy::model::{KeyId, UnixMillis};
use keyfence_store::access_log::{Entry, KeyIdentity};

use crate::telemetry::metrics::Metrics;

#[derive(Clone)]
pub struct AlertConfig {
    /// Blocked attempts in one window above which a key alerts.
    pub max_blocked: u32,
    /// Distinct blocked source addresses in one window above which a key alerts.
    pub max_distinct_ips: u32,
    pub window: Duration,
    /// Where to POST alerts (http:// or https://); none means log and metric only.
    pub webhook_url: Option<String>,
}

/// The webhook URL often carries a token: printed without credentials or query.
impl std::fmt::Debug for AlertConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertConfig")
            .field("max_blocked", &self.max_blocked)
            .field("max_distinct_ips", &self.max_distinct_ips)
            .field("window", &self.window)
            .field(
                "webhook_url",
                &self.webhook_url.as_deref().map(crate::config::redacted_url),
            )
            .finish()
    }
}

impl Default for AlertConfig {
    fn default() -> Self {
        AlertConfig {
            max_blocked: 20,
            max_distinct_ips: 5,
            window: Duration::from_secs(60),
            webhook_url: None,
        }
    }
}

/// The alert as logged and sent.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Alert {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub key_id: String,
    pub partner_id: String,
    pub environment: String,
    pub blocked: u32,
    pub distinct_ips: u32,
    pub window_seconds: u64,
    pub window_started_at_ms: i64,
    pub last_reason: String,
    /// Up to ten of the blocked source addresses.
    pub sample_ips: Vec<String>,
}

struct Window {
    started: UnixMillis,
    blocked: u32,
    ips: HashSet<std::net::IpAddr>,
    alerted: bool,
}

pub struct AlertDetector {
    config: AlertConfig,
    metrics: Arc<Metrics>,
    windows: HashMap<KeyId, Window>,
    webhook: Option<mpsc::Sender<Alert>>,
}

impl AlertDetector {
    pub fn new(config: AlertConfig, metrics: Arc<Metrics>) -> AlertDetector {
        let webhook = config.webhook_url.clone().map(|url| {
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(deliver(url, rx, metrics.clone()));
            tx
        });
        AlertDetector {
            config,
            metrics,
            windows: HashMap::new(),
            webhook,
        }
    }

    /// Counts one blocked record; alerts at most once per key per window.
    pub fn observe(&mut self, key: &KeyIdentity, record: &Entry) {
        let key_id = &key.key_id;
        let window_ms = self.config.window.as_millis() as i64;
        if self.windows.len() > 100_000 {
            // Bound memory under a flood of distinct keys: forget closed windows.
            let now = record.at;
            self.windows.retain(|_, w| now.0 - w.started.0 < window_ms);
        }
        if !self.windows.contains_key(key_id) {
            self.windows.insert(
                key_id.clone(),
                Window {
                    started: record.at,
                    blocked: 0,
                    ips: HashSet::new(),
                    alerted: false,
                },
            );
        }
        let window = self.windows.get_mut(key_id).expect("inserted above");
        if record.at.0 - window.started.0 >= window_ms {
            *window = Window {
                started: record.at,
                blocked: 0,
                ips: HashSet::new(),
                alerted: false,
            };
        }
        window.blocked += 1;
        if let Some(ip) = record.client_ip
            && window.ips.len() <= self.config.max_distinct_ips as usize
        {
            window.ips.insert(ip);
        }
        let tripped = window.blocked > self.config.max_blocked
            || window.ips.len() > self.config.max_distinct_ips as usize;
        if !tripped || window.alerted {
            return;
        }
        window.alerted = true;
        let alert = Alert {
            kind: "keyfence.blocked_attempts",
            key_id: key_id.to_string(),
            partner_id: key.partner_id.to_string(),
            environment: key.environment.to_string(),
            blocked: window.blocked,
            distinct_ips: window.ips.len() as u32,
            window_seconds: self.config.window.as_secs(),
            window_started_at_ms: window.started.0,
            last_reason: record
                .reason
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default(),
            sample_ips: window
                .ips
                .iter()
                .take(10)
                .map(|ip| ip.to_string())
                .collect(),
        };
        tracing::warn!(
            key_id = %alert.key_id,
            partner_id = %alert.partner_id,
            environment = %alert.environment,
            blocked = alert.blocked,
            distinct_ips = alert.distinct_ips,
            window_secs = alert.window_seconds,
            "alert: key blocked repeatedly"
        );
        self.metrics.alerts.inc();
        if let Some(webhook) = &self.webhook
            && webhook.try_send(alert).is_err()
        {
            self.metrics.alert_webhook_failures.inc();
            tracing::warn!(key_id = %key_id, "alert webhook queue full; alert not sent");
        }
    }
}

/// Posts alerts one by one, retrying each a few times with backoff.
async fn deliver(url: String, mut alerts: mpsc::Receiver<Alert>, metrics: Arc<Metrics>) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(client) => client,
        Err(error) => {
            tracing::error!(%error, "cannot build the alert webhook client; alerts are logged only");
            return;
        }
    };
    while let Some(alert) = alerts.recv().await {
        let mut delay = Duration::from_millis(200);
        let mut delivered = false;
        for attempt in 1..=4 {
            match client.post(&url).json(&alert).send().await {
                Ok(response) if response.status().is_success() => {
                    delivered = true;
                    break;
                }
                Ok(response) => {
                    tracing::warn!(status = %response.status(), attempt, key_id = %alert.key_id, "alert webhook refused the alert");
                }
                Err(error) => {
                    // reqwest names the URL in its errors; the URL may carry a token.
                    let error = error.without_url();
                    tracing::warn!(%error, attempt, key_id = %alert.key_id, "alert webhook unreachable");
                }
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        if delivered {
            metrics.alert_webhook_deliveries.inc();
        } else {
            metrics.alert_webhook_failures.inc();
            tracing::error!(key_id = %alert.key_id, "alert webhook failed after retries");
        }
    }
}
