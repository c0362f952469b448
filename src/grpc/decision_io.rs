//! Reading a decision question off the wire and recording the answer, for the three services
//! that ask one: Authorize, Envoy's Check and the admin dry run (CheckAccess).
//!
//! The client address is parsed here, strictly, once: the engine takes it parsed or not at all.
//! The bounds and text rules of every request field keyfence hashes, stores or logs are here too,
//! once, for Authorize (INVALID_ARGUMENT) and Check (a denial) to apply alike: the presented key,
//! the signature, the nonce, the method and the path.

use std::fmt;

use keyfence_policy::{decision::Decision, ip::ClientIp, signature::SignedRequest};
use keyfence_store::access_log;
use tonic::Status;

use super::{pb, status::invalid};

/// The longest presented API key read; anything longer is refused before it is hashed.
pub const MAX_API_KEY_BYTES: usize = 256;
/// A base64 Ed25519 signature is 88 characters; anything this long is not a signature.
pub const MAX_SIGNATURE_BYTES: usize = 512;
/// The longest nonce accepted.
pub const MAX_NONCE_BYTES: usize = 128;
/// The longest HTTP method accepted: what one access-log record holds.
pub const MAX_METHOD_BYTES: usize = access_log::MAX_METHOD_BYTES;
/// The longest path and query accepted: what one access-log record holds.
pub const MAX_PATH_BYTES: usize = access_log::MAX_PATH_BYTES;

/// What is wrong with a request field; each front end reports it in its own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldProblem {
    TooLong {
        max: usize,
    },
    /// A control character (a newline, say) would make the canonical string ambiguous.
    ControlCharacter,
    /// The method is not an HTTP token (RFC 9110 `tchar`s).
    NotAToken,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FieldProblem::TooLong { max } => write!(f, "is longer than {max} bytes"),
            FieldProblem::ControlCharacter => f.write_str("contains control characters"),
            FieldProblem::NotAToken => f.write_str("is not an HTTP method token"),
        }
    }
}

fn at_most(value: &str, max: usize) -> Result<(), FieldProblem> {
    if value.len() > max {
        return Err(FieldProblem::TooLong { max });
    }
    Ok(())
}

fn printable(value: &str) -> Result<(), FieldProblem> {
    if value.chars().any(char::is_control) {
        return Err(FieldProblem::ControlCharacter);
    }
    Ok(())
}

/// The presented key: bounded (it is only ever hashed, so any bytes may be in it).
pub fn check_api_key(key: &str) -> Result<(), FieldProblem> {
    at_most(key, MAX_API_KEY_BYTES)
}

/// The signature: bounded (it is decoded as base64, which rejects anything else).
pub fn check_signature(signature: &str) -> Result<(), FieldProblem> {
    at_most(signature, MAX_SIGNATURE_BYTES)
}

/// A nonce: bounded, no control characters (it is a line of the canonical string).
pub fn check_nonce(nonce: &str) -> Result<(), FieldProblem> {
    at_most(nonce, MAX_NONCE_BYTES)?;
    printable(nonce)
}

/// A method: bounded and an HTTP token (empty when the caller has none).
pub fn check_method(method: &str) -> Result<(), FieldProblem> {
    at_most(method, MAX_METHOD_BYTES)?;
    if !method.bytes().all(is_tchar) {
        return Err(FieldProblem::NotAToken);
    }
    Ok(())
}

/// A path and query: bounded, no control characters (a line of the canonical string).
pub fn check_path(path: &str) -> Result<(), FieldProblem> {
    at_most(path, MAX_PATH_BYTES)?;
    printable(path)
}

/// RFC 9110 `tchar`: the characters of a token such as a method.
fn is_tchar(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&byte)
}

/// Signature fields as the engine reads them, each checked against the rules above.
pub fn signed_request(
    input: Option<&pb::SignatureInput>,
) -> Result<Option<SignedRequest<'_>>, Status> {
    let Some(input) = input else {
        return Ok(None);
    };
    let checks = [
        ("signature.signature", check_signature(&input.signature)),
        ("signature.nonce", check_nonce(&input.nonce)),
        ("signature.method", check_method(&input.method)),
        ("signature.path", check_path(&input.path)),
    ];
    for (field, check) in checks {
        check.map_err(|problem| invalid(field, problem))?;
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
    check_api_key(api_key).map_err(|problem| invalid(field, problem))
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
