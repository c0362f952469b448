//! `keyfence.v1.Authorizer`: the data-plane decision RPC.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::{
    convert::{self, MAX_API_KEY_BYTES, MAX_NONCE_BYTES},
    pb::{self, authorizer_server::Authorizer},
    status::invalid,
};
use crate::{
    access::Frontend,
    authz::{AuthzError, Decider, Origin},
    policy::{
        decision::{AuthzRequest, ClientAddress, Decision, KeySelector, Mode},
        signature::SignedRequest,
    },
};

pub struct AuthorizerService {
    decider: Arc<Decider>,
}

impl AuthorizerService {
    pub fn new(decider: Arc<Decider>) -> AuthorizerService {
        AuthorizerService { decider }
    }
}

impl From<AuthzError> for Status {
    fn from(error: AuthzError) -> Status {
        Status::unavailable(error.to_string())
    }
}

/// Signature fields as the engine reads them; checks the sizes the edge promises.
pub fn signed_request(
    input: Option<&pb::SignatureInput>,
) -> Result<Option<SignedRequest<'_>>, Status> {
    let Some(input) = input else {
        return Ok(None);
    };
    if input.nonce.len() > MAX_NONCE_BYTES {
        return Err(invalid(
            "signature.nonce",
            format!("is longer than {MAX_NONCE_BYTES} bytes"),
        ));
    }
    Ok(Some(SignedRequest {
        signature: &input.signature,
        timestamp: input.timestamp,
        nonce: &input.nonce,
        method: &input.method,
        path: &input.path,
        body: &input.body,
        // Authorize callers hand over the body themselves.
        body_complete: true,
    }))
}

pub fn require_api_key(field: &str, api_key: &str) -> Result<(), Status> {
    if api_key.is_empty() {
        return Err(invalid(field, "is empty"));
    }
    if api_key.len() > MAX_API_KEY_BYTES {
        return Err(invalid(
            field,
            format!("is longer than {MAX_API_KEY_BYTES} bytes"),
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl Authorizer for AuthorizerService {
    #[tracing::instrument(name = "authorize", skip_all, fields(key_id, decision, reason))]
    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Result<Response<pb::AuthorizeResponse>, Status> {
        let request = request.into_inner();
        require_api_key("api_key", &request.api_key)?;
        if request.client_ip.is_empty() {
            return Err(invalid("client_ip", "is empty"));
        }
        let question = AuthzRequest {
            key: KeySelector::Presented(&request.api_key),
            client_ip: ClientAddress::Text(&request.client_ip),
            signature: signed_request(request.signature.as_ref())?,
        };
        let origin = Origin {
            frontend: Frontend::Authorize,
            endpoint: request
                .signature
                .as_ref()
                .filter(|s| !s.method.is_empty() || !s.path.is_empty())
                .map(|s| (s.method.as_str(), s.path.as_str())),
        };
        let decision = self
            .decider
            .decide(&question, request.min_revision, Mode::Enforce, origin)
            .await?;
        record_decision(&decision);
        Ok(Response::new(authorize_response(&decision)))
    }
}

/// Adds the decision to the current span (never the presented key).
pub fn record_decision(decision: &Decision) {
    let span = tracing::Span::current();
    if let Some(key) = &decision.key {
        span.record("key_id", key.id.as_str());
    }
    span.record(
        "decision",
        if decision.is_allow() { "allow" } else { "deny" },
    );
    if let Some(reason) = decision.reason() {
        span.record("reason", reason.as_str());
    }
    tracing::debug!("decided");
}

fn authorize_response(decision: &Decision) -> pb::AuthorizeResponse {
    let convert::DecisionFields {
        decision: verdict,
        reason,
        key_id,
        partner_id,
        environment,
    } = convert::decision_fields(decision);
    pb::AuthorizeResponse {
        decision: verdict,
        reason,
        key_id,
        partner_id,
        environment,
        matched_cidr: decision
            .matched
            .map(|m| m.cidr.to_string())
            .unwrap_or_default(),
        policy_revision: decision.revision,
        would_deny: decision.would_deny.is_some(),
    }
}
