//! `envoy.service.auth.v3.Authorization`: Envoy's ext_authz Check, answered with the same decision
//! as Authorize ([`Decider::decide`], enforcing).
//!
//! Envoy's request is read at this edge into the engine's question:
//! - key: `x-api-key`, else `authorization: Bearer <key>`; neither is a denial;
//! - client IP: the source address Envoy reports, or behind trusted proxies what
//!   [`TrustedProxies`] makes of `x-forwarded-for` / `x-real-ip`; unresolvable is
//!   `INVALID_CLIENT_IP`;
//! - signature: `x-signature`, `x-timestamp`, `x-nonce`, the method and the path (with query) of
//!   the HTTP attributes, and the body Envoy forwards (`raw_body` with `pack_as_bytes`, else
//!   `body`). A body Envoy did not forward whole makes the signature uncheckable:
//!   `BODY_NOT_FORWARDED`.
//!
//! An allow tells the upstream who called (`x-keyfence-key-id`, `-partner-id`, `-environment`,
//! overwriting anything the client sent under those names) and strips the key and signature
//! headers. A denial is an HTTP answer Envoy sends in the upstream's place ([`denial`]); no Check
//! ever fails as a gRPC error, so Envoy's own failure handling is left for keyfence being down.
//!
//! Only this module names Envoy's generated types.

pub mod denial;

use std::{collections::HashMap, sync::Arc};

use envoy_types::pb::{
    envoy::{
        config::core::v3::{
            HeaderValue, HeaderValueOption, address::Address,
            header_value_option::HeaderAppendAction,
        },
        service::auth::v3::{
            CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse,
            attribute_context::HttpRequest, authorization_server::Authorization,
            check_response::HttpResponse,
        },
        r#type::v3::HttpStatus,
    },
    google::rpc,
};
use tonic::{Code, Request, Response, Status};

pub use envoy_types::pb::envoy::service::auth::v3::authorization_server::AuthorizationServer;

use self::denial::{Denial, DenialDetail, SignatureDetail};
use keyfence_policy::{
    client_ip::{Origin, TrustedProxies},
    clock::Clock,
    decision::{AuthzRequest, Decision, DenyReason, KeySelector, Mode, Verdict},
    signature::SignedRequest,
    snapshot::CompiledKey,
};
use keyfence_store::access_log::Frontend;

use super::decision_io::{
    FieldProblem, check_api_key, check_method, check_nonce, check_path, check_signature,
    record_decision,
};
use crate::{authz::Decider, system::SystemClock};

/// Headers the upstream must not see: the credential and the signature it was checked with.
const CREDENTIAL_HEADERS: [&str; 4] = ["x-api-key", "x-signature", "x-timestamp", "x-nonce"];

/// What Check needs beyond the decider.
#[derive(Debug, Clone)]
pub struct ExtAuthzSettings {
    pub trusted_proxies: TrustedProxies,
    pub denials: DenialDetail,
    /// How far Envoy's report on the body can be taken.
    pub bodies: BodyReport,
}

/// What Envoy's ext_authz filter tells about request bodies, by its configuration. Envoy drops
/// `transfer-encoding` from the headers it sends, and HTTP/2 needs no `content-length`, so a
/// request that announces no length looks the same whether it had no body or a chunked one;
/// only an Envoy that buffers bodies (`with_request_body`) says which, by forwarding the body
/// with its own `x-envoy-auth-partial-body`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyReport {
    /// Envoy buffers bodies: a request it forwards no body for, and that announces no length,
    /// had none.
    Forwarded,
    /// Envoy may not buffer bodies: a signed request must announce its length
    /// (`content-length`), or its body counts as unseen (`BODY_NOT_FORWARDED`).
    Unknown,
}

pub struct ExtAuthzService {
    decider: Arc<Decider>,
    settings: ExtAuthzSettings,
}

impl ExtAuthzService {
    pub fn new(decider: Arc<Decider>, settings: ExtAuthzSettings) -> ExtAuthzService {
        ExtAuthzService { decider, settings }
    }

    async fn answer(&self, request: &CheckRequest) -> CheckResponse {
        let span = tracing::Span::current();
        let question = match read(request, self.settings.bodies) {
            Ok(question) => question,
            Err(denial) => return self.deny(&denial),
        };
        let client_ip = match self.settings.trusted_proxies.resolve(&question.origin) {
            Ok(ip) => {
                span.record("client_ip", tracing::field::display(ip));
                Some(ip)
            }
            Err(error) => {
                tracing::info!(%error, "client ip not resolved");
                // The engine denies it as INVALID_CLIENT_IP: one deny path, not two.
                None
            }
        };
        let engine_question = AuthzRequest {
            key: KeySelector::Presented(question.key),
            client_ip,
            signature: question.signature,
        };
        let decision = match self
            .decider
            .decide(
                &engine_question,
                0,
                Mode::Enforce,
                crate::authz::Origin {
                    frontend: Frontend::EnvoyCheck,
                    endpoint: question.endpoint,
                },
            )
            .await
        {
            Ok(decision) => decision,
            Err(error) => {
                tracing::warn!(%error, "no decision; denying");
                return self.deny(&Denial::Unavailable);
            }
        };
        record_decision(&decision);
        match (decision.verdict, decision.key.as_deref()) {
            (Verdict::Allow, Some(key)) => allow(key, question.key_from),
            (Verdict::Deny(reason), _) => {
                self.deny(&self.decided_denial(&decision, reason, question.signature.as_ref()))
            }
            (Verdict::Allow, None) => {
                // The engine allows only a key it found; anything else is a bug, and denied.
                tracing::error!("an allow without a key; denying");
                self.deny(&Denial::Unavailable)
            }
        }
    }

    fn decided_denial(
        &self,
        decision: &Decision,
        reason: DenyReason,
        signed: Option<&SignedRequest<'_>>,
    ) -> Denial {
        let show_allowlist = matches!(
            self.settings.denials,
            DenialDetail::Detailed {
                include_allowlist: true
            }
        ) && reason == DenyReason::IpNotAllowed;
        Denial::Decided {
            reason,
            client_ip: decision.client_ip,
            allowed: decision
                .key
                .as_ref()
                .filter(|_| show_allowlist)
                .map(|key| key.allowlist.active_networks(SystemClock.now())),
            // Built only for a detailed denial, from the request this edge already holds.
            signature: match self.settings.denials {
                DenialDetail::Detailed { .. } => {
                    SignatureDetail::of(reason, signed, SystemClock.now())
                }
                DenialDetail::Opaque => None,
            },
        }
    }

    fn deny(&self, denial: &Denial) -> CheckResponse {
        let span = tracing::Span::current();
        span.record("decision", "deny");
        span.record("reason", denial.reason_name());
        let response = denial.respond(self.settings.denials);
        CheckResponse {
            status: Some(rpc::Status {
                code: response.grpc_code as i32,
                message: denial.reason_name().to_owned(),
                details: Vec::new(),
            }),
            http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus {
                    code: i32::from(response.http_status),
                }),
                headers: vec![overwrite("content-type", "application/json")],
                body: response.body,
            })),
            dynamic_metadata: None,
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthzService {
    #[tracing::instrument(name = "check", skip_all, fields(key_id, decision, reason, client_ip))]
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        Ok(Response::new(self.answer(request.get_ref()).await))
    }
}

/// Which header carried the key; a bearer key's `authorization` header is stripped with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHeader {
    ApiKey,
    Bearer,
}

/// Envoy's request, read and size-checked: what the engine is asked about.
pub struct Question<'a> {
    /// The presented key: hashed by the engine, never printed (see the `Debug` below).
    pub key: &'a str,
    pub key_from: KeyHeader,
    pub origin: Origin<'a>,
    pub signature: Option<SignedRequest<'a>>,
    /// HTTP method and path, for the access log.
    pub endpoint: Option<(&'a str, &'a str)>,
}

impl std::fmt::Debug for Question<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Question")
            .field("key", &"<redacted>")
            .field("key_from", &self.key_from)
            .field("origin", &self.origin)
            .field("signature", &self.signature.map(|s| (s.method, s.path)))
            .finish()
    }
}

/// Reads Envoy's request into the engine's question, or the denial bad input gets. Public for the
/// fuzz target of the Check mapping (`fuzz/`).
pub fn read(request: &CheckRequest, bodies: BodyReport) -> Result<Question<'_>, Denial> {
    let attributes = request.attributes.as_ref();
    let http = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref());
    let headers = Headers(http.map(|h| &h.headers));

    let (key, key_from) = match (headers.get("x-api-key"), headers.get("authorization")) {
        (Some(key), _) => (key, KeyHeader::ApiKey),
        (None, Some(authorization)) => match bearer(authorization) {
            Some(key) => (key, KeyHeader::Bearer),
            None => return Err(Denial::KeyMissing),
        },
        (None, None) => return Err(Denial::KeyMissing),
    };
    let key_header = match key_from {
        KeyHeader::ApiKey => "x-api-key header",
        KeyHeader::Bearer => "authorization header",
    };
    field(key_header, check_api_key(key))?;
    // Method and path are logged whether or not the request is signed.
    if let Some(http) = http {
        field("request method", check_method(&http.method))?;
        field("request path", check_path(&http.path))?;
    }

    let peer = attributes
        .and_then(|a| a.source.as_ref())
        .and_then(|source| source.address.as_ref())
        .and_then(|address| match &address.address {
            Some(Address::SocketAddress(socket)) => Some(socket.address.as_str()),
            _ => None,
        })
        .unwrap_or("");
    let origin = Origin {
        peer,
        forwarded_for: headers.get("x-forwarded-for"),
        real_ip: headers.get("x-real-ip"),
    };

    let signature = match (headers.get("x-signature"), http) {
        (Some(signature), Some(http)) => Some(signed_request(signature, &headers, http, bodies)?),
        _ => None,
    };
    Ok(Question {
        key,
        key_from,
        origin,
        signature,
        endpoint: http.map(|h| (h.method.as_str(), h.path.as_str())),
    })
}

fn signed_request<'a>(
    signature: &'a str,
    headers: &Headers<'a>,
    http: &'a HttpRequest,
    bodies: BodyReport,
) -> Result<SignedRequest<'a>, Denial> {
    field("x-signature header", check_signature(signature))?;
    let nonce = headers.get("x-nonce").unwrap_or("");
    field("x-nonce header", check_nonce(nonce))?;
    // A missing or malformed timestamp is no timestamp: 0, which the window rejects.
    let timestamp = headers
        .get("x-timestamp")
        .and_then(|t| t.parse::<i64>().ok())
        .unwrap_or(0);
    let body: &[u8] = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    Ok(SignedRequest {
        signature,
        timestamp,
        nonce,
        method: &http.method,
        path: &http.path,
        body,
        body_complete: body_complete(headers, body.len(), bodies),
    })
}

/// Whether `seen` bytes (what Envoy forwarded) are the whole body, from what Envoy itself reports.
/// `x-envoy-auth-partial-body` is Envoy's only when Envoy forwarded a body (it overwrites any
/// client's then); otherwise it is whatever the client sent, so it can take completeness away but
/// never grant it:
/// - any value but `false` means truncated;
/// - an announced `content-length` must equal what was forwarded;
/// - without one, a forwarded body is whole only on Envoy's own `false`, and no body was there
///   only if Envoy buffers bodies ([`BodyReport::Forwarded`]): otherwise a chunked or HTTP/2 body
///   Envoy did not forward is indistinguishable from none.
fn body_complete(headers: &Headers<'_>, seen: usize, bodies: BodyReport) -> bool {
    let partial = headers.get("x-envoy-auth-partial-body");
    if partial.is_some_and(|partial| partial != "false") {
        return false;
    }
    if let Some(length) = headers.get("content-length") {
        return length.parse::<u64>().ok() == u64::try_from(seen).ok();
    }
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if seen > 0 {
        partial == Some("false")
    } else {
        !chunked && bodies == BodyReport::Forwarded
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive), if that is what the header holds.
fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once([' ', '\t'])?;
    let token = token.trim_matches([' ', '\t']);
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// A field check's failure as the denial Check answers with (`INVALID_REQUEST` when detailed).
fn field(name: &'static str, check: Result<(), FieldProblem>) -> Result<(), Denial> {
    check.map_err(|problem| Denial::InvalidRequest {
        field: name,
        problem,
    })
}

/// Envoy's header map: names lower-cased, repeated headers joined with commas.
struct Headers<'a>(Option<&'a HashMap<String, String>>);

impl<'a> Headers<'a> {
    /// The value without surrounding whitespace; an empty header counts as absent.
    fn get(&self, name: &str) -> Option<&'a str> {
        self.0?
            .get(name)
            .map(|value| value.trim_matches([' ', '\t']))
            .filter(|value| !value.is_empty())
    }
}

fn allow(key: &CompiledKey, key_from: KeyHeader) -> CheckResponse {
    let mut headers_to_remove: Vec<String> =
        CREDENTIAL_HEADERS.iter().map(|h| (*h).to_owned()).collect();
    if key_from == KeyHeader::Bearer {
        headers_to_remove.push("authorization".into());
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: Code::Ok as i32,
            message: String::new(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: vec![
                overwrite("x-keyfence-key-id", key.id.as_str()),
                overwrite("x-keyfence-partner-id", &key.partner_id.to_string()),
                overwrite("x-keyfence-environment", &key.environment.to_string()),
            ],
            headers_to_remove,
            ..Default::default()
        })),
        dynamic_metadata: None,
    }
}

fn overwrite(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: value.to_owned(),
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        // `append`, the deprecated boolean that append_action replaces, stays unset.
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
