//! Reading a decision question off the wire and recording the answer, for the three services
//! that ask one: Authorize, Envoy's Check and the admin dry run (CheckAccess).
//!
//! The client address is parsed here, strictly, once: the engine takes it parsed or not at all.

use keyfence_policy::{decision::Decision, ip::ClientIp, signature::SignedRequest};
use tonic::Status;

use super::{pb, status::invalid};

/// The longest presented API key read; anything longer is refused before it is hashed.
pub const MAX_API_KEY_BYTES: usize = 256;
/// The longest nonce accepted.
pub const MAX_NONCE_BYTES: usize = 128;

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

/// The caller's address as given: empty is bad input; text that is not a strict IPv4 or IPv6
/// address is `None`, which the engine denies as `INVALID_CLIENT_IP` (a decision, not an error).
pub fn client_ip(field: &str, text: &str) -> Result<Option<ClientIp>, Status> {
    if text.is_empty() {
        return Err(invalid(field, "is empty"));
    }
    Ok(text.parse().ok())
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
