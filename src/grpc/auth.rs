//! Admin authentication at the gRPC edge: reads the caller's bearer token and, on an mTLS
//! listener, its verified client certificate, asks [`AdminCredentials`] for the principal, and
//! hands the admin layer that principal (with the caller's `x-keyfence-actor` detail after it).
//! Every Admin RPC passes through [`AdminAuth`]: there is no unauthenticated path.

use std::sync::Arc;

use keyfence_admin::Principal;
use tonic::{Request, Status, service::Interceptor};

use super::tls::certificate_identity;
use crate::authn::{AdminCredentials, Refusal, with_actor_detail};

pub const ACTOR_HEADER: &str = "x-keyfence-actor";

/// The authenticated caller, put in the request's extensions by [`AdminAuth`].
#[derive(Clone)]
struct Authenticated(Principal);

/// Refuses admin calls without valid credentials; records who called.
#[derive(Clone)]
pub struct AdminAuth {
    credentials: Arc<AdminCredentials>,
}

impl AdminAuth {
    pub fn new(credentials: AdminCredentials) -> AdminAuth {
        AdminAuth {
            credentials: Arc::new(credentials),
        }
    }
}

fn refused(refusal: Refusal) -> Status {
    match refusal {
        Refusal::BadActor(_) => Status::invalid_argument(refusal.to_string()),
        Refusal::Missing | Refusal::InvalidToken => Status::unauthenticated(refusal.to_string()),
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let bearer = match request.metadata().get("authorization") {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| refused(Refusal::InvalidToken))?,
            ),
        };
        let identity = request
            .peer_certs()
            .and_then(|chain| chain.first().and_then(|cert| certificate_identity(cert)));
        let principal = self
            .credentials
            .authenticate(bearer, identity.as_deref())
            .map_err(refused)?;
        request.extensions_mut().insert(Authenticated(principal));
        Ok(request)
    }
}

/// The caller, for the admin layer: the authenticated principal, with the `x-keyfence-actor`
/// detail after it (`ops/alice`).
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    let Authenticated(principal) = request
        .extensions()
        .get::<Authenticated>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("not authenticated"))?;
    let actor = match request.metadata().get(ACTOR_HEADER) {
        None => None,
        Some(value) => Some(
            value
                .to_str()
                .map_err(|_| refused(Refusal::BadActor("must be printable ASCII".into())))?,
        ),
    };
    with_actor_detail(principal, actor).map_err(refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        authn::{CredentialSettings, DEFAULT_TOKEN_NAME},
        system::OsRandom,
    };

    fn auth() -> AdminAuth {
        let dir = tempfile::tempdir().unwrap();
        let (credentials, _) = AdminCredentials::load(
            CredentialSettings {
                tokens_file: None,
                token: Some("s3cret-admin-token"),
                data_dir: dir.path(),
                accept_client_certificates: false,
            },
            &OsRandom,
        )
        .unwrap();
        AdminAuth::new(credentials)
    }

    fn with_auth(value: Option<&str>) -> Request<()> {
        let mut request = Request::new(());
        if let Some(value) = value {
            request
                .metadata_mut()
                .insert("authorization", value.parse().unwrap());
        }
        request
    }

    #[test]
    fn a_valid_token_is_required() {
        let mut auth = auth();
        let request = auth
            .call(with_auth(Some("Bearer s3cret-admin-token")))
            .unwrap();
        assert_eq!(principal(&request).unwrap().name(), DEFAULT_TOKEN_NAME);
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("s3cret-admin-token"),
            Some("Bearer s3cret-admin-token2"),
            Some("Basic s3cret-admin-token"),
        ] {
            let status = auth.call(with_auth(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
    }

    #[test]
    fn the_actor_header_adds_detail_to_the_principal() {
        let mut auth = auth();
        let mut request = with_auth(Some("Bearer s3cret-admin-token"));
        request
            .metadata_mut()
            .insert(ACTOR_HEADER, "alice@ops".parse().unwrap());
        let request = auth.call(request).unwrap();
        assert_eq!(principal(&request).unwrap().name(), "admin/alice@ops");
        // Without the interceptor there is no principal at all.
        assert_eq!(
            principal(&Request::new(())).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
    }
}
