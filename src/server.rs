//! Wires the store, the sync task, the decision service, the admin layer, the access log, metrics
//! and the gRPC listeners together, and runs them until shutdown. `main` binds the listeners and
//! calls [`run`]; the integration tests start the same binary on port 0.
//!
//! Invariant: no generated protobuf or server type is named here; the routers are `grpc`'s.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use keyfence_admin::{Admin, AdminParts};
use keyfence_policy::{
    client_ip::TrustedProxies, decision::Engine, nonce::NonceLedger, snapshot::SharedPolicy,
};
use keyfence_store::{
    Store, StoreError,
    access_log::{AccessLogStore, embedded::EmbeddedAccessLog},
    embedded::EmbeddedStore,
    nonce_log::NonceJournal,
    redis::{CHANGE_LOG_LEN, RedisOptions, RedisStore},
    sealing::Sealer,
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    access::{self, AccessLogConfig, AccessRecorder},
    authn::{AdminCredentials, AuthnError, CredentialSettings, TokenSource},
    authz::{Decider, DeciderParts, Limits, Nonces, journal::Journal},
    config::Config,
    grpc::{
        auth::AdminAuth,
        ext_authz::{BodyReport, ExtAuthzSettings, denial::DenialDetail},
        planes::{self, AllowedCallers, GrpcError, PlaneHealth, Transport},
        tls::{ReloadingTls, TlsError, TlsFiles},
    },
    sync::PolicySync,
    system::{OsRandom, SystemClock},
    telemetry::metrics::{self, Metrics},
};

/// How long an admin write waits for the local snapshot to include it.
const WRITE_VISIBILITY_WAIT: Duration = Duration::from_secs(5);
/// How often last-used times are written.
const LAST_USED_FLUSH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}{}", in_use_hint(source))]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    DataDir(#[from] crate::data_dir::DataDirError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    #[error("cannot watch for reloads: {0}")]
    Reload(std::io::Error),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
    #[error("admin credentials: {0}")]
    Credentials(#[from] AuthnError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What to do about an address another process holds, often the `keyfence serve` started first.
fn in_use_hint(error: &std::io::Error) -> &'static str {
    if error.kind() == std::io::ErrorKind::AddrInUse {
        "; is another `keyfence serve` running? Stop it (Ctrl-C), or give this one other \
         addresses (--listen, --admin-listen)"
    } else {
        ""
    }
}

/// The bound listeners.
pub struct Listeners {
    pub data: TcpListener,
    pub admin: TcpListener,
    pub metrics: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Listeners, ServerError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })
        };
        Ok(Listeners {
            data: bind(config.listen).await?,
            admin: bind(config.admin_listen).await?,
            metrics: match config.metrics_listen {
                Some(addr) => Some(bind(addr).await?),
                None => None,
            },
        })
    }
}

/// The stores a deployment runs on.
struct Backends {
    store: Arc<dyn Store>,
    access_log: Arc<dyn AccessLogStore>,
    nonces: Nonces,
}

fn backends(config: &Config, sealer: Option<Arc<Sealer>>) -> Result<Backends, ServerError> {
    Ok(match &config.redis {
        None => {
            let store = Arc::new(EmbeddedStore::open(
                &config.data_dir,
                sealer.expect("the embedded store always has a secrets key file"),
            )?);
            let ledger = NonceLedger::default();
            let journal = Journal::start(
                NonceJournal::open(&config.data_dir)?,
                &ledger,
                Arc::new(SystemClock),
            )?;
            Backends {
                store,
                access_log: Arc::new(EmbeddedAccessLog::open(&config.data_dir)?),
                nonces: Nonces::Durable { ledger, journal },
            }
        }
        Some(redis) => {
            let store = RedisStore::connect(RedisOptions {
                url: redis.url.clone(),
                namespace: redis.namespace.clone(),
                change_log_len: CHANGE_LOG_LEN,
                sealer,
            })?;
            let fallback = redis.nonce_fallback_local.then(NonceLedger::default);
            Backends {
                store: store.clone(),
                access_log: store.clone(),
                nonces: Nonces::Shared { store, fallback },
            }
        }
    })
}

/// A one-time signal, handed to every task that waits for it as a future of its own.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn new() -> (watch::Sender<bool>, Stop) {
        let (tx, rx) = watch::channel(false);
        (tx, Stop(rx))
    }

    fn after(shutdown: impl Future<Output = ()> + Send + 'static) -> Stop {
        let (tx, stop) = Stop::new();
        tokio::spawn(async move {
            shutdown.await;
            let _ = tx.send(true);
        });
        stop
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// How long health reports NOT_SERVING before the listeners stop accepting, so that balancers
/// and Envoy's health checks move traffic away first: a quarter of the grace, at most 2 s.
fn drain_period(grace: Duration) -> Duration {
    (grace / 4).min(Duration::from_secs(2))
}

/// Loads the policy once. The embedded store is local, so failing to read it is fatal; Redis may
/// come later, and until the first load the service reports NOT_SERVING and answers UNAVAILABLE.
async fn first_load(sync: &PolicySync, config: &Config) -> Result<(), ServerError> {
    match sync.full_reload().await {
        Ok(_) => Ok(()),
        Err(error) if config.redis.is_none() => Err(error.into()),
        // Redis holds what this replica lacks the key file for: no later load can succeed.
        Err(error @ StoreError::FailedPrecondition(_)) => Err(error.into()),
        Err(error) => {
            tracing::warn!(%error, "cannot load the policy yet; not serving until it loads");
            Ok(())
        }
    }
}

fn start_access_log(
    config: &Config,
    access_log: Arc<dyn AccessLogStore>,
    metrics: &Arc<Metrics>,
    stop: &Stop,
) -> (Option<AccessRecorder>, Option<JoinHandle<()>>) {
    if !config.access_log.enabled {
        return (None, None);
    }
    let (recorder, task) = access::start(
        access_log,
        AccessLogConfig {
            queue_capacity: config.access_log.queue_capacity,
            queue_max_bytes: config.access_log.queue_max_bytes,
            retention: config.access_log.retention,
            last_used_flush: LAST_USED_FLUSH,
            alerts: config.access_log.alerts.clone(),
        },
        metrics.clone(),
        stop.stopped(),
    );
    (Some(recorder), Some(task))
}

fn ext_authz_settings(config: &Config) -> ExtAuthzSettings {
    ExtAuthzSettings {
        trusted_proxies: TrustedProxies::new(
            config.trusted_proxies.clone(),
            config.trust_x_real_ip,
        ),
        denials: match (
            config.detailed_denials,
            config.detailed_denials_include_allowlist,
        ) {
            (false, _) => DenialDetail::Opaque,
            (true, include_allowlist) => DenialDetail::Detailed { include_allowlist },
        },
        bodies: if config.envoy_with_request_body {
            BodyReport::Forwarded
        } else {
            BodyReport::Unknown
        },
    }
}

/// NOT_SERVING until the policy has loaded once; from then on SERVING, even while the store is
/// unreachable, because decisions come from the last snapshot.
async fn report_health(
    planes: [&PlaneHealth; 2],
    sync: &Arc<PolicySync>,
    ready: watch::Sender<bool>,
) {
    let planes = planes.map(PlaneHealth::clone);
    let set = |planes: [PlaneHealth; 2], serving: bool| async move {
        for health in &planes {
            health.set_serving(serving).await;
        }
    };
    if sync.policy().load().is_loaded() {
        set(planes, true).await;
        let _ = ready.send(true);
        return;
    }
    set(planes.clone(), false).await;
    let sync = sync.clone();
    tokio::spawn(async move {
        sync.wait_until_loaded().await;
        set(planes, true).await;
        let _ = ready.send(true);
    });
}

/// The admin plane's credentials; never none.
fn admin_credentials(config: &Config) -> Result<AdminCredentials, ServerError> {
    let (credentials, source) = AdminCredentials::load(
        CredentialSettings {
            tokens_file: config.admin_tokens_file.as_deref(),
            token: config.admin_token.as_deref(),
            data_dir: &config.data_dir,
            accept_client_certificates: config
                .admin_tls
                .as_ref()
                .is_some_and(|tls| tls.client_ca.is_some()),
        },
        &OsRandom,
    )?;
    match source {
        TokenSource::TokensFile(path) => {
            tracing::info!(file = %path.display(), "admin tokens from the tokens file")
        }
        TokenSource::Configured => tracing::info!("admin token from the configuration"),
        TokenSource::Generated { path, created } => tracing::info!(
            file = %path.display(),
            created,
            "admin token in the data directory; the CLI reads it from there"
        ),
    }
    Ok(credentials)
}

/// A listener's transport; with TLS, a task reloads its certificates until `stop`.
fn transport(
    name: &'static str,
    files: &Option<TlsFiles>,
    stop: &Stop,
) -> Result<Transport, ServerError> {
    let Some(files) = files else {
        return Ok(Transport::Plaintext);
    };
    let tls = ReloadingTls::load(name, files.clone())?;
    let trigger = crate::reload::watch(tls.paths(), crate::reload::POLL_INTERVAL)
        .map_err(ServerError::Reload)?;
    tokio::spawn(tls.clone().follow(trigger, stop.stopped()));
    Ok(Transport::Tls(tls))
}

fn local_addr(listener: &TcpListener, configured: SocketAddr) -> Result<SocketAddr, ServerError> {
    listener.local_addr().map_err(|source| ServerError::Bind {
        addr: configured,
        source,
    })
}

/// Opens the store, loads the policy and serves until `shutdown` resolves.
pub async fn run(
    config: Config,
    listeners: Listeners,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    crate::data_dir::prepare(&config.data_dir)?;
    let credentials = admin_credentials(&config)?;
    let sealer = crate::secrets::open_sealer(
        config.secrets_key_file.as_deref(),
        config.redis.is_none(),
        &OsRandom,
    )?;
    let Backends {
        store,
        access_log,
        nonces,
    } = backends(&config, sealer.clone())?;
    let sync = PolicySync::new(store.clone(), Arc::new(SharedPolicy::default()));
    first_load(&sync, &config).await?;

    // Shutdown, in order: `requested` (SIGTERM) turns health NOT_SERVING; after the drain period
    // `closing` stops the listeners, whose calls in progress get `shutdown_grace` to finish; then
    // `finished` lets the background writers flush and stop.
    let requested = Stop::after(shutdown);
    let (close, closing) = Stop::new();
    let (finish, finished) = Stop::new();
    let sync_task = tokio::spawn(sync.clone().run(config.sync_interval, finished.stopped()));
    let (recorder, access_task) =
        start_access_log(&config, access_log.clone(), &metrics, &finished);
    if let (Some(sealer), Some(path)) = (sealer, &config.secrets_key_file) {
        let trigger = crate::reload::watch(vec![path.clone()], crate::reload::POLL_INTERVAL)
            .map_err(ServerError::Reload)?;
        tokio::spawn(crate::secrets::follow(
            path.clone(),
            sealer,
            store.clone(),
            metrics.clone(),
            trigger,
            finished.stopped(),
        ));
    }

    let decider = Arc::new(Decider::new(DeciderParts {
        engine: Engine {
            signature_window_secs: config.signature_window.as_secs() as i64,
            require_nonce: config.require_nonce,
        },
        clock: Arc::new(SystemClock),
        sync: sync.clone(),
        nonces,
        min_revision_wait: config.min_revision_wait,
        min_revision_max_waiters: config.min_revision_max_waiters,
        max_staleness: config.max_staleness,
        limits: Limits {
            max_inflight: config.max_inflight,
            decision_timeout: config.decision_timeout,
        },
        metrics: metrics.clone(),
        access: recorder,
    }));
    let admin = Arc::new(Admin::new(AdminParts {
        store,
        access_log,
        decisions: decider.clone(),
        clock: Arc::new(SystemClock),
        random: Arc::new(OsRandom),
        environments: config.environments.clone(),
        visibility_wait: WRITE_VISIBILITY_WAIT,
        max_entries_per_request: config.admin_limits.max_entries_per_request,
    }));

    let (data_health, admin_health) = (PlaneHealth::data(), PlaneHealth::admin());
    let (ready_tx, readiness) = watch::channel(false);
    report_health([&data_health, &admin_health], &sync, ready_tx.clone()).await;
    tokio::spawn({
        let (data_health, admin_health) = (data_health.clone(), admin_health.clone());
        let (requested, drain) = (requested.stopped(), drain_period(config.shutdown_grace));
        async move {
            requested.await;
            tracing::info!(drain = ?drain, "shutting down: NOT_SERVING, then closing the listeners");
            let _ = ready_tx.send(false);
            data_health.shutting_down().await;
            admin_health.shutting_down().await;
            tokio::time::sleep(drain).await;
            let _ = close.send(true);
        }
    });
    let data_addr = local_addr(&listeners.data, config.listen)?;
    let admin_addr = local_addr(&listeners.admin, config.admin_listen)?;
    let data_plane = planes::serve(
        planes::data_plane(
            decider,
            ext_authz_settings(&config),
            AllowedCallers::new(config.data_allowed_callers.clone()),
            &data_health,
            &metrics,
        )?,
        listeners.data,
        transport("data", &config.data_tls, &finished)?,
        closing.stopped(),
    );
    let admin_plane = planes::serve(
        planes::admin_plane(
            admin,
            AdminAuth::new(credentials),
            &admin_health,
            config.admin_limits.max_request_bytes,
            &metrics,
        )?,
        listeners.admin,
        transport("admin", &config.admin_tls, &finished)?,
        closing.stopped(),
    );

    let mut ready = format!("keyfence ready: data={data_addr} admin={admin_addr}");
    if let Some(listener) = listeners.metrics {
        let addr = local_addr(
            &listener,
            config.metrics_listen.expect("bound because configured"),
        )?;
        tracing::info!(url = %metrics::describe(addr), "serving metrics");
        ready.push_str(&format!(" metrics={addr}"));
        tokio::spawn(metrics::serve(
            listener,
            metrics,
            sync.clone(),
            readiness,
            finished.stopped(),
        ));
    }
    tracing::info!(data = %data_addr, admin = %admin_addr, "serving");
    // A line for scripts and tests that start the binary on port 0.
    println!("{ready}");

    let grace = config.shutdown_grace;
    let result = tokio::select! {
        result = async { tokio::try_join!(data_plane, admin_plane) } => result.map(|_| ()),
        () = async { closing.stopped().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(grace = ?grace, "calls still in progress after shutdown_grace; closing them");
            Ok(())
        }
    };
    let _ = finish.send(true);
    let _ = sync_task.await;
    if let Some(task) = access_task {
        // The writer drains what is queued before it stops.
        let _ = task.await;
    }
    result?;
    tracing::info!("stopped");
    Ok(())
}
