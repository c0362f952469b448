//! The two listeners' gRPC routers, their health and reflection, and serving them (plaintext or
//! TLS). `server` wires the parts and hands over listeners; the generated server types are named
//! only here.

use std::{sync::Arc, time::Duration};

use keyfence_admin::Admin;
use keyfence_policy::ip::{Cidr, ClientIp};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    Request, Status,
    server::NamedService,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Server, server::Router},
};
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use super::{
    admin::AdminService,
    auth::AdminAuth,
    authorizer::AuthorizerService,
    ext_authz::{AuthorizationServer, ExtAuthzService, ExtAuthzSettings},
    pb::{self, admin_server::AdminServer, authorizer_server::AuthorizerServer},
    tls::ReloadingTls,
};
use crate::{
    authz::Decider,
    telemetry::{grpc_metrics::GrpcMetricsLayer, metrics::Metrics},
};

/// A listener's router: its services behind the gRPC metrics layer.
pub type PlaneRouter = Router<tower_layer::Stack<GrpcMetricsLayer, tower_layer::Identity>>;

/// Admin answers may carry a whole allowlist, built up by many requests; what a request may carry
/// is the deployment's `admin_max_request_bytes`.
const ADMIN_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// What the data plane serves.
const DATA_SERVICES: [&str; 2] = [
    <AuthorizerServer<AuthorizerService> as NamedService>::NAME,
    <AuthorizationServer<ExtAuthzService> as NamedService>::NAME,
];
/// What the admin plane serves.
const ADMIN_SERVICES: [&str; 1] = [<AdminServer<AdminService> as NamedService>::NAME];
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// HTTP/2 pings on idle connections, so dead peers are noticed and middleboxes keep state.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections are closed (GOAWAY) after this age, with a grace for calls in progress, so that
/// clients behind an L4 balancer reconnect and spread over new replicas.
const MAX_CONNECTION_AGE: Duration = Duration::from_secs(300);
const MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// One listener's `grpc.health.v1.Health`: it reports the services that listener serves (SERVING
/// once the policy has loaded: readiness), and the process as a whole under "" (SERVING from the
/// start until shutdown: liveness, so that an orchestrator does not restart a replica that waits
/// for its store).
#[derive(Clone)]
pub struct PlaneHealth {
    reporter: HealthReporter,
    service: HealthServer<HealthService>,
    services: &'static [&'static str],
}

impl PlaneHealth {
    fn new(services: &'static [&'static str]) -> PlaneHealth {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        PlaneHealth {
            reporter,
            service,
            services,
        }
    }

    pub fn data() -> PlaneHealth {
        PlaneHealth::new(&DATA_SERVICES)
    }

    pub fn admin() -> PlaneHealth {
        PlaneHealth::new(&ADMIN_SERVICES)
    }

    /// Reports this listener's services as serving or not.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in self.services {
            self.reporter.set_service_status(*name, status).await;
        }
    }

    /// Shutdown has begun: everything, the process included, is NOT_SERVING.
    pub async fn shutting_down(&self) {
        self.set_serving(false).await;
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
    }
}

/// Reflection v1 and v1alpha (grpcurl 1.8 speaks only the latter), listing exactly `services`
/// and health and reflection themselves. Envoy's service is listed without its descriptors,
/// which `envoy-types` does not ship.
fn add_reflection(router: PlaneRouter, services: &[&str]) -> Result<PlaneRouter, GrpcError> {
    let builder = || {
        let mut builder = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .with_service_name(HEALTH_SERVICE)
            .with_service_name("grpc.reflection.v1.ServerReflection")
            .with_service_name("grpc.reflection.v1alpha.ServerReflection");
        for service in services {
            builder = builder.with_service_name(*service);
        }
        builder
    };
    Ok(router
        .add_service(builder().build_v1()?)
        .add_service(builder().build_v1alpha()?))
}

/// What both listeners serve: a span per RPC, keepalive and connection ageing, health and
/// reflection for `services`.
fn common(
    health: &PlaneHealth,
    services: &[&str],
    metrics: &Metrics,
) -> Result<PlaneRouter, GrpcError> {
    let router = Server::builder()
        .layer(GrpcMetricsLayer::new(metrics.grpc.clone()))
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .max_connection_age(MAX_CONNECTION_AGE)
        .max_connection_age_grace(MAX_CONNECTION_AGE_GRACE)
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .add_service(health.service.clone());
    add_reflection(router, services)
}

/// Which source addresses may ask for decisions at all (`--data-allowed-callers`); empty allows
/// every caller. Anyone else gets PERMISSION_DENIED before any key is looked up. A caller whose
/// address the transport cannot tell is refused too.
#[derive(Clone)]
pub struct AllowedCallers {
    networks: Arc<[Cidr]>,
}

impl AllowedCallers {
    pub fn new(networks: Vec<Cidr>) -> AllowedCallers {
        AllowedCallers {
            networks: networks.into(),
        }
    }
}

impl Interceptor for AllowedCallers {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        if self.networks.is_empty() {
            return Ok(request);
        }
        let caller = request.remote_addr().map(|addr| ClientIp::from(addr.ip()));
        match caller {
            Some(ip) if self.networks.iter().any(|network| network.contains(ip)) => Ok(request),
            Some(ip) => {
                tracing::warn!(caller = %ip, "decision request from a caller not in data_allowed_callers");
                Err(Status::permission_denied(
                    "this address may not call the data plane",
                ))
            }
            None => Err(Status::permission_denied("the caller's address is unknown")),
        }
    }
}

/// Authorize, Envoy's Check (both for the allowed callers only), health and reflection.
pub fn data_plane(
    decider: Arc<Decider>,
    ext_authz: ExtAuthzSettings,
    callers: AllowedCallers,
    health: &PlaneHealth,
    metrics: &Metrics,
) -> Result<PlaneRouter, GrpcError> {
    Ok(common(health, &DATA_SERVICES, metrics)?
        .add_service(InterceptedService::new(
            AuthorizerServer::new(AuthorizerService::new(decider.clone())),
            callers.clone(),
        ))
        .add_service(InterceptedService::new(
            AuthorizationServer::new(ExtAuthzService::new(decider, ext_authz)),
            callers,
        )))
}

/// Admin (behind its authentication), health and reflection.
/// The admin listener's router. A request larger than `max_request_bytes` is refused by tonic
/// from its length prefix (OUT_OF_RANGE, "decoded message length too large"), before its body is
/// read into memory.
pub fn admin_plane(
    admin: Arc<Admin>,
    auth: AdminAuth,
    health: &PlaneHealth,
    max_request_bytes: usize,
    metrics: &Metrics,
) -> Result<PlaneRouter, GrpcError> {
    Ok(
        common(health, &ADMIN_SERVICES, metrics)?.add_service(InterceptedService::new(
            AdminServer::new(AdminService::new(admin))
                .max_decoding_message_size(max_request_bytes)
                .max_encoding_message_size(ADMIN_MAX_RESPONSE_BYTES),
            auth,
        )),
    )
}

/// How a listener speaks.
pub enum Transport {
    Plaintext,
    Tls(Arc<ReloadingTls>),
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    router: PlaneRouter,
    listener: TcpListener,
    transport: Transport,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    match transport {
        Transport::Plaintext => {
            router
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
                .await?
        }
        Transport::Tls(tls) => {
            router
                .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
                .await?
        }
    }
    Ok(())
}
