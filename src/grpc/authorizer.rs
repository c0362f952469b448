//! `keyfence.v1.Authorizer`: the data-plane decision RPC.

use std::sync::Arc;

use keyfence_policy::decision::{AuthzRequest, Decision, KeySelector, Mode};
use keyfence_store::access_log::Frontend;
use tonic::{Request, Response, Status};

use super::{
    convert,
    decision_io::{client_ip, record_decision, require_api_key, signed_request},
    pb::{self, authorizer_server::Authorizer},
};
use crate::authz::{Decider, Origin};

pub struct AuthorizerService {
    decider: Arc<Decider>,
}

impl AuthorizerService {
    pub fn new(decider: Arc<Decider>) -> AuthorizerService {
        AuthorizerService { decider }
    }
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
        let question = AuthzRequest {
            key: KeySelector::Presented(&request.api_key),
            client_ip: client_ip("client_ip", &request.client_ip)?,
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
        Ok(Response::new(authorize_response(
            &decision,
            request.min_revision > 0,
        )))
    }
}

/// The answer; the policy revision only for a caller that asked for one (`min_revision`).
fn authorize_response(decision: &Decision, revision_asked: bool) -> pb::AuthorizeResponse {
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
        policy_revision: if revision_asked { decision.revision } else { 0 },
        would_deny: decision.would_deny.is_some(),
    }
}
