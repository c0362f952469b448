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
};
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};

use crate::{
    access::{self, AccessLogConfig, AccessRecorder},
    authz::{Decider, DeciderParts, Nonces, journal::Journal},
    config::Config,
    grpc::{
        auth::AdminAuth,
        ext_authz::{BodyReport, ExtAuthzSettings, denial::DenialDetail},
        planes::{self, GrpcError, PlaneHealth},
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
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Grpc(#[from] GrpcError),
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

fn backends(config: &Config) -> Result<Backends, ServerError> {
    Ok(match &config.redis {
        None => {
            let store = Arc::new(EmbeddedStore::open(&config.data_dir)?);
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

/// One shutdown signal, handed to every task as a future of its own.
#[derive(Clone)]
struct Stop(watch::Receiver<bool>);

impl Stop {
    fn after(shutdown: impl Future<Output = ()> + Send + 'static) -> Stop {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        Stop(stop_rx)
    }

    fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }
}

/// Loads the policy once. The embedded store is local, so failing to read it is fatal; Redis may
/// come later, and until the first load the service reports NOT_SERVING and answers UNAVAILABLE.
async fn first_load(sync: &PolicySync, config: &Config) -> Result<(), ServerError> {
    match sync.full_reload().await {
        Ok(_) => Ok(()),
        Err(error) if config.redis.is_none() => Err(error.into()),
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
async fn report_health(health: &PlaneHealth, sync: &Arc<PolicySync>) {
    if sync.policy().load().is_loaded() {
        health.set_serving(true).await;
        return;
    }
    health.set_serving(false).await;
    let (health, sync) = (health.clone(), sync.clone());
    tokio::spawn(async move {
        sync.wait_until_loaded().await;
        health.set_serving(true).await;
    });
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
    let Backends {
        store,
        access_log,
        nonces,
    } = backends(&config)?;
    let sync = PolicySync::new(store.clone(), Arc::new(SharedPolicy::default()));
    first_load(&sync, &config).await?;

    let stop = Stop::after(shutdown);
    let sync_task = tokio::spawn(sync.clone().run(config.sync_interval, stop.stopped()));
    let (recorder, access_task) = start_access_log(&config, access_log.clone(), &metrics, &stop);

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

    let health = PlaneHealth::default();
    report_health(&health, &sync).await;
    let data_addr = local_addr(&listeners.data, config.listen)?;
    let admin_addr = local_addr(&listeners.admin, config.admin_listen)?;
    let data_plane = planes::serve(
        planes::data_plane(decider, ext_authz_settings(&config), &health)?,
        listeners.data,
        stop.stopped(),
    );
    let admin_plane = planes::serve(
        planes::admin_plane(
            admin,
            AdminAuth::new(config.admin_token.clone()),
            &health,
            config.admin_limits.max_request_bytes,
        )?,
        listeners.admin,
        stop.stopped(),
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
            stop.stopped(),
        ));
    }
    tracing::info!(data = %data_addr, admin = %admin_addr, "serving");
    // A line for scripts and tests that start the binary on port 0.
    println!("{ready}");

    let result = tokio::try_join!(data_plane, admin_plane);
    health.set_serving(false).await;
    let _ = sync_task.await;
    if let Some(task) = access_task {
        // The writer drains what is queued before it stops.
        let _ = task.await;
    }
    result?;
    tracing::info!("stopped");
    Ok(())
}
