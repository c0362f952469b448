//! Wires the store, the sync task, the decision service, the access log, metrics and the gRPC
//! listeners together, and runs them until shutdown. `main` binds the listeners and calls [`run`];
//! the integration tests start the same binary on port 0.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::Server;

use crate::{
    access::{self, AccessLogConfig, AccessLogStore, embedded::EmbeddedAccessLog},
    authz::{Decider, DeciderParts, Nonces},
    config::Config,
    grpc::{
        admin::AdminService,
        auth::AdminAuth,
        authorizer::AuthorizerService,
        ext_authz::{AuthorizationServer, ExtAuthzService, ExtAuthzSettings, denial::DenialDetail},
        pb::{admin_server::AdminServer, authorizer_server::AuthorizerServer},
    },
    policy::{
        client_ip::TrustedProxies, decision::Engine, nonce::NonceLedger, snapshot::SharedPolicy,
    },
    store::{
        Store, StoreError,
        embedded::EmbeddedStore,
        redis::{RedisOptions, RedisStore},
    },
    sync::PolicySync,
    telemetry::metrics::{self, Metrics},
};

/// Admin requests may carry whole allowlists (100,000 entries is a few MiB).
const ADMIN_MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
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
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
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
        None => Backends {
            store: Arc::new(EmbeddedStore::open(&config.data_dir)?),
            access_log: Arc::new(EmbeddedAccessLog::open(&config.data_dir)?),
            nonces: Nonces::Local(NonceLedger::default()),
        },
        Some(redis) => {
            let store = RedisStore::connect(RedisOptions {
                url: redis.url.clone(),
                namespace: redis.namespace.clone(),
                change_log_len: crate::store::redis::CHANGE_LOG_LEN,
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
    let policy = Arc::new(SharedPolicy::default());
    let sync = PolicySync::new(store.clone(), policy);
    match sync.full_reload().await {
        Ok(_) => {}
        // The embedded store is local: failing to read it is fatal.
        Err(error) if config.redis.is_none() => return Err(error.into()),
        // Redis may come later: serve NOT_SERVING / UNAVAILABLE until the first load.
        Err(error) => {
            tracing::warn!(%error, "cannot load the policy yet; not serving until it loads")
        }
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let sync_task = tokio::spawn(sync.clone().run(config.sync_interval, stopped()));

    let (recorder, access_task) = if config.access_log.enabled {
        let (recorder, task) = access::start(
            access_log.clone(),
            AccessLogConfig {
                queue_capacity: config.access_log.queue_capacity,
                retention: config.access_log.retention,
                last_used_flush: LAST_USED_FLUSH,
                alerts: config.access_log.alerts.clone(),
            },
            metrics.clone(),
            stopped(),
        );
        (Some(recorder), Some(task))
    } else {
        (None, None)
    };

    let decider = Arc::new(Decider::new(DeciderParts {
        engine: Engine {
            signature_window_secs: config.signature_window.as_secs() as i64,
        },
        sync: sync.clone(),
        nonces,
        min_revision_wait: config.min_revision_wait,
        max_staleness: config.max_staleness,
        metrics: metrics.clone(),
        access: recorder,
    }));
    let ext_authz = ExtAuthzService::new(
        decider.clone(),
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
        },
    );

    let (health, health_service) = tonic_health::server::health_reporter();
    // NOT_SERVING until the policy has loaded once; from then on SERVING, even while the store
    // is unreachable, because decisions come from the last snapshot.
    let serving = {
        let health = health.clone();
        let sync = sync.clone();
        async move {
            sync.wait_until_loaded().await;
            health
                .set_serving::<AuthorizerServer<AuthorizerService>>()
                .await;
            health
                .set_serving::<AuthorizationServer<ExtAuthzService>>()
                .await;
            health.set_serving::<AdminServer<AdminService>>().await;
        }
    };
    if sync.policy().load().is_loaded() {
        serving.await;
    } else {
        health
            .set_not_serving::<AuthorizerServer<AuthorizerService>>()
            .await;
        health
            .set_not_serving::<AuthorizationServer<ExtAuthzService>>()
            .await;
        health.set_not_serving::<AdminServer<AdminService>>().await;
        tokio::spawn(serving);
    }
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::grpc::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
    };

    let local = |listener: &TcpListener, configured: SocketAddr| {
        listener.local_addr().map_err(|source| ServerError::Bind {
            addr: configured,
            source,
        })
    };
    let data_addr = local(&listeners.data, config.listen)?;
    let admin_addr = local(&listeners.admin, config.admin_listen)?;

    let data_plane = Server::builder()
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .add_service(health_service.clone())
        .add_service(reflection()?)
        .add_service(AuthorizerServer::new(AuthorizerService::new(
            decider.clone(),
        )))
        .add_service(AuthorizationServer::new(ext_authz))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.data), stopped());

    let admin = AdminService::new(
        store,
        access_log,
        decider,
        config.environments.clone(),
        WRITE_VISIBILITY_WAIT,
    );
    let admin_plane = Server::builder()
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .add_service(health_service)
        .add_service(reflection()?)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AdminServer::new(admin)
                .max_decoding_message_size(ADMIN_MAX_MESSAGE_BYTES)
                .max_encoding_message_size(ADMIN_MAX_MESSAGE_BYTES),
            AdminAuth::new(config.admin_token.clone()),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listeners.admin), stopped());

    let mut ready = format!("keyfence ready: data={data_addr} admin={admin_addr}");
    if let Some(listener) = listeners.metrics {
        let addr = local(
            &listener,
            config.metrics_listen.expect("bound because configured"),
        )?;
        tracing::info!(url = %metrics::describe(addr), "serving metrics");
        ready.push_str(&format!(" metrics={addr}"));
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            sync.clone(),
            stopped(),
        ));
    }

    tracing::info!(data = %data_addr, admin = %admin_addr, "serving");
    // A line for scripts and tests that start the binary on port 0.
    println!("{ready}");

    let result = tokio::try_join!(data_plane, admin_plane);
    health
        .set_not_serving::<AuthorizerServer<AuthorizerService>>()
        .await;
    health
        .set_not_serving::<AuthorizationServer<ExtAuthzService>>()
        .await;
    let _ = sync_task.await;
    if let Some(task) = access_task {
        // The writer drains what is queued before it stops.
        let _ = task.await;
    }
    result?;
    tracing::info!("stopped");
    Ok(())
}
