//! Admin authentication: `authorization: Bearer <token>` compared in constant time, and the
//! [`Principal`] the admin layer records in audit fields.

use keyfence_admin::Principal;
use subtle::ConstantTimeEq;
use tonic::{Request, Status, service::Interceptor};

/// The actor recorded when the caller does not name itself.
pub const DEFAULT_ACTOR: &str = "admin";
pub const ACTOR_HEADER: &str = "x-keyfence-actor";

/// Rejects admin calls without the configured bearer token. With no token configured (allowed
/// only on a loopback listener, checked at start) every call passes.
#[derive(Clone)]
pub struct AdminAuth {
    token: Option<std::sync::Arc<str>>,
}

impl AdminAuth {
    pub fn new(token: Option<String>) -> AdminAuth {
        AdminAuth {
            token: token.map(Into::into),
        }
    }
}

impl Interceptor for AdminAuth {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else {
            return Ok(request);
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| Status::unauthenticated("missing bearer token"))?;
        if bool::from(presented.as_bytes().ct_eq(expected.as_bytes())) {
            Ok(request)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

/// The caller, for the admin layer: today the name it gives in `x-keyfence-actor` (printable, at
/// most 128 characters), or [`DEFAULT_ACTOR`].
pub fn principal<T>(request: &Request<T>) -> Result<Principal, Status> {
    let Some(value) = request.metadata().get(ACTOR_HEADER) else {
        return Ok(Principal::new(DEFAULT_ACTOR));
    };
    let text = value.to_str().map_err(|_| {
        Status::invalid_argument(format!("{ACTOR_HEADER}: must be printable ASCII"))
    })?;
    if text.is_empty() || text.len() > 128 {
        return Err(Status::invalid_argument(format!(
            "{ACTOR_HEADER}: must be 1 to 128 characters"
        )));
    }
    Ok(Principal::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn token_is_required_when_configured() {
        let mut auth = AdminAuth::new(Some("s3cret".into()));
        assert!(auth.call(with_auth(Some("Bearer s3cret"))).is_ok());
        for bad in [
            None,
            Some("Bearer wrong"),
            Some("s3cret"),
            Some("Bearer s3cret2"),
            Some("Basic s3cret"),
        ] {
            let status = auth.call(with_auth(bad)).unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unauthenticated, "{bad:?}");
        }
        let mut open = AdminAuth::new(None);
        assert!(open.call(with_auth(None)).is_ok());
    }

    #[test]
    fn actor_defaults_and_validates() {
        assert_eq!(principal(&Request::new(())).unwrap().name(), DEFAULT_ACTOR);
        let mut request = Request::new(());
        request
            .metadata_mut()
            .insert(ACTOR_HEADER, "alice@ops".parse().unwrap());
        assert_eq!(principal(&request).unwrap().name(), "alice@ops");
    }
}
