//! The two listeners' gRPC routers, their health and reflection, and serving them. `server` wires
//! the parts and hands over listeners; the generated server types are named only here.

use std::sync::Arc;

use keyfence_admin::Admin;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    server::NamedService,
    service::interceptor::InterceptedService,
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
};
use crate::authz::Decider;

/// Admin answers may carry a whole allowlist, built up by many requests; what a request may carry
/// is the deployment's `admin_max_request_bytes`.
const ADMIN_MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// The services whose health is reported.
const SERVICES: [&str; 3] = [
    <AuthorizerServer<AuthorizerService> as NamedService>::NAME,
    <AuthorizationServer<ExtAuthzService> as NamedService>::NAME,
    <AdminServer<AdminService> as NamedService>::NAME,
];

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("grpc server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// `grpc.health.v1.Health`, shared by both listeners.
#[derive(Clone)]
pub struct PlaneHealth {
    reporter: HealthReporter,
    service: HealthServer<HealthService>,
}

impl Default for PlaneHealth {
    fn default() -> Self {
        let reporter = HealthReporter::new();
        let service = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        PlaneHealth { reporter, service }
    }
}

impl PlaneHealth {
    /// Reports every service as serving or not.
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in SERVICES {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

fn reflection() -> Result<
    tonic_reflection::server::v1::ServerReflectionServer<
        impl tonic_reflection::server::v1::ServerReflection,
    >,
    GrpcError,
> {
    Ok(tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?)
}

/// What both listeners serve: a span per RPC, health and reflection.
fn common(health: &PlaneHealth) -> Result<Router, GrpcError> {
    Ok(Server::builder()
        .trace_fn(|request| tracing::info_span!("grpc", path = %request.uri().path()))
        .add_service(health.service.clone())
        .add_service(reflection()?))
}

/// Authorize, Envoy's Check, health and reflection.
pub fn data_plane(
    decider: Arc<Decider>,
    ext_authz: ExtAuthzSettings,
    health: &PlaneHealth,
) -> Result<Router, GrpcError> {
    Ok(common(health)?
        .add_service(AuthorizerServer::new(AuthorizerService::new(
            decider.clone(),
        )))
        .add_service(AuthorizationServer::new(ExtAuthzService::new(
            decider, ext_authz,
        ))))
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
) -> Result<Router, GrpcError> {
    Ok(common(health)?.add_service(InterceptedService::new(
        AdminServer::new(AdminService::new(admin))
            .max_decoding_message_size(max_request_bytes)
            .max_encoding_message_size(ADMIN_MAX_RESPONSE_BYTES),
        auth,
    )))
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    router: Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), GrpcError> {
    Ok(router
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await?)
}
