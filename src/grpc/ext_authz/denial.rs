//! What a denial looks like to the caller behind Envoy: the HTTP status, the JSON body and the
//! gRPC code Envoy records. Opaque by default (`{"code":401,"msg":"Unauthorized"}`, the same for a
//! bad IP and a bad signature); with detailed denials, a stable SCREAMING_SNAKE code and a message
//! per reason, and for a signature the server refused, what it computed: the canonical string (on
//! `SIGNATURE_INVALID`) and its clock, so a partner sees whether the path, the body hash or the
//! time differs. Bodies are built with serde_json so that every value is escaped.

use serde::Serialize;
use tonic::Code;

use keyfence_policy::{
    decision::DenyReason,
    ip::Cidr,
    ip::ClientIp,
    model::UnixMillis,
    signature::{SignedRequest, canonical_string},
};

use crate::grpc::decision_io::FieldProblem;

/// How much a denial tells the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenialDetail {
    /// `{"code":401,"msg":"Unauthorized"}` whatever the reason (429 and 503 alike).
    Opaque,
    /// The reason as a code and a message. With `include_allowlist`, an IP denial also lists the
    /// key's networks: that tells whoever holds the key where it would be accepted from.
    Detailed { include_allowlist: bool },
}

/// Why Check refused, in the terms the caller may see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// No key in `x-api-key` or `authorization: Bearer`.
    KeyMissing,
    /// A header, the method or the path breaks a rule of `decision_io` (too long, control
    /// characters, a method that is no token).
    InvalidRequest {
        /// What a person would call it: "x-nonce header", "request path".
        field: &'static str,
        problem: FieldProblem,
    },
    /// The engine denied.
    Decided {
        reason: DenyReason,
        client_ip: Option<ClientIp>,
        /// The key's effective networks, only when the deployment shows them.
        allowed: Option<Vec<Cidr>>,
        /// What the server computed for a signature it refused, only when the deployment shows
        /// details.
        signature: Option<SignatureDetail>,
    },
    /// No decision could be made (policy not loaded): fail closed, and say it is temporary.
    Unavailable,
}

/// What a detailed signature denial shows. Computed at the edge from the request Envoy sent, and
/// only for a detailed denial: the decision path never builds it. It holds nothing the caller did
/// not send, and never a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureDetail {
    /// The canonical string of the request as the server received it (`SIGNATURE_INVALID`).
    pub canonical_string: Option<String>,
    /// The server's clock, Unix seconds.
    pub server_time: i64,
}

impl SignatureDetail {
    /// The detail for `reason`: the canonical string and the time for `SIGNATURE_INVALID`, the
    /// time for `TIMESTAMP_OUT_OF_WINDOW`, nothing for any other reason.
    pub fn of(
        reason: DenyReason,
        signed: Option<&SignedRequest<'_>>,
        now: UnixMillis,
    ) -> Option<SignatureDetail> {
        let canonical = match reason {
            DenyReason::SignatureInvalid => signed.map(|signed| {
                let bytes = canonical_string(
                    signed.timestamp,
                    signed.nonce,
                    signed.method,
                    signed.path,
                    signed.body,
                );
                String::from_utf8_lossy(&bytes).into_owned()
            }),
            DenyReason::TimestampOutOfWindow => None,
            _ => return None,
        };
        Some(SignatureDetail {
            canonical_string: canonical,
            server_time: now.as_secs(),
        })
    }
}

/// The HTTP answer Envoy sends in place of the upstream's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DenialResponse {
    pub http_status: u16,
    pub body: String,
    /// For Envoy's stats and logs; the caller never sees it.
    pub grpc_code: Code,
}

impl Denial {
    /// The reason name for logs and metrics.
    pub fn reason_name(&self) -> &'static str {
        match self {
            Denial::KeyMissing => "api_key_missing",
            Denial::InvalidRequest { .. } => "invalid_request",
            Denial::Decided { reason, .. } => reason.as_str(),
            Denial::Unavailable => "unavailable",
        }
    }

    pub fn respond(&self, detail: DenialDetail) -> DenialResponse {
        let http_status = match self {
            Denial::Decided {
                reason: DenyReason::RateLimited,
                ..
            } => 429,
            Denial::Unavailable => 503,
            _ => 401,
        };
        let grpc_code = match self {
            Denial::KeyMissing | Denial::InvalidRequest { .. } => Code::Unauthenticated,
            Denial::Decided { reason, .. } => match reason {
                DenyReason::UnknownKey
                | DenyReason::KeyDisabled
                | DenyReason::KeyRevoked
                | DenyReason::KeyExpired => Code::Unauthenticated,
                DenyReason::RateLimited => Code::ResourceExhausted,
                DenyReason::InvalidClientIp
                | DenyReason::IpNotAllowed
                | DenyReason::SignatureMissing
                | DenyReason::SignatureInvalid
                | DenyReason::TimestampOutOfWindow
                | DenyReason::NonceReused
                | DenyReason::BodyNotForwarded
                | DenyReason::NonceMissing => Code::PermissionDenied,
            },
            Denial::Unavailable => Code::Unavailable,
        };
        let body = match detail {
            DenialDetail::Opaque => json(&Opaque {
                code: http_status,
                msg: match http_status {
                    429 => "Too Many Requests",
                    503 => "Service Unavailable",
                    _ => "Unauthorized",
                },
            }),
            DenialDetail::Detailed { .. } => json(&self.detailed()),
        };
        DenialResponse {
            http_status,
            body,
            grpc_code,
        }
    }

    fn detailed(&self) -> Detailed {
        let (code, message) = match self {
            Denial::KeyMissing => (
                "API_KEY_MISSING",
                "An API key is required: send it in the x-api-key header or as Authorization: Bearer"
                    .to_owned(),
            ),
            Denial::InvalidRequest { field, problem } => {
                ("INVALID_REQUEST", format!("The {field} {problem}"))
            }
            Denial::Decided {
                reason, client_ip, ..
            } => detailed_reason(*reason, *client_ip),
            Denial::Unavailable => (
                "SERVICE_UNAVAILABLE",
                "The authorization service is not ready; try again shortly".to_owned(),
            ),
        };
        let details = match self {
            Denial::Decided {
                client_ip,
                allowed,
                signature,
                ..
            } => Details {
                client_ip: client_ip.map(|ip| ip.to_string()),
                allowed_ips: allowed
                    .as_ref()
                    .map(|networks| networks.iter().map(ToString::to_string).collect()),
                canonical_string: signature.as_ref().and_then(|s| s.canonical_string.clone()),
                server_time: signature.as_ref().map(|s| s.server_time),
            },
            _ => Details::default(),
        };
        Detailed {
            success: false,
            error: ErrorBody {
                code,
                message,
                details,
            },
        }
    }
}

/// The detailed code and message of each engine reason.
fn detailed_reason(reason: DenyReason, client_ip: Option<ClientIp>) -> (&'static str, String) {
    let (code, message) = match reason {
        DenyReason::UnknownKey => ("INVALID_API_KEY", "The API key is not valid"),
        DenyReason::KeyDisabled => ("API_KEY_DISABLED", "This API key is disabled"),
        DenyReason::KeyRevoked => ("API_KEY_REVOKED", "This API key has been revoked"),
        DenyReason::KeyExpired => ("API_KEY_EXPIRED", "This API key has expired"),
        DenyReason::InvalidClientIp => (
            "INVALID_CLIENT_IP",
            "The client IP address could not be determined",
        ),
        DenyReason::IpNotAllowed => {
            let ip = client_ip.map(|ip| ip.to_string()).unwrap_or_default();
            return (
                "IP_NOT_WHITELISTED",
                format!("Your IP address ({ip}) is not authorized to use this API key"),
            );
        }
        DenyReason::SignatureMissing => (
            "SIGNATURE_MISSING",
            "This API key requires a request signature (x-signature and x-timestamp headers)",
        ),
        DenyReason::SignatureInvalid => ("SIGNATURE_INVALID", "The request signature is not valid"),
        DenyReason::TimestampOutOfWindow => (
            "TIMESTAMP_OUT_OF_WINDOW",
            "The request timestamp is missing or outside the accepted window",
        ),
        DenyReason::NonceReused => ("NONCE_REUSED", "The request nonce has already been used"),
        DenyReason::RateLimited => ("RATE_LIMITED", "Too many requests for this API key"),
        DenyReason::BodyNotForwarded => (
            "BODY_NOT_FORWARDED",
            "The request body could not be checked against its signature",
        ),
        DenyReason::NonceMissing => (
            "NONCE_MISSING",
            "This API key requires a request nonce (x-nonce header)",
        ),
    };
    (code, message.to_owned())
}

#[derive(Serialize)]
struct Opaque {
    code: u16,
    msg: &'static str,
}

#[derive(Serialize)]
struct Detailed {
    success: bool,
    error: ErrorBody,
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
    details: Details,
}

#[derive(Default, Serialize)]
#[serde(rename_all = "camelCase")]
struct Details {
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_ips: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canonical_string: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_time: Option<i64>,
}

fn json(value: &impl Serialize) -> String {
    serde_json::to_string(value).expect("denial bodies are plain structs of strings and numbers")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DETAILED: DenialDetail = DenialDetail::Detailed {
        include_allowlist: false,
    };

    fn decided(reason: DenyReason, ip: &str) -> Denial {
        Denial::Decided {
            reason,
            client_ip: Some(ip.parse().unwrap()),
            allowed: None,
            signature: None,
        }
    }

    #[test]
    fn opaque_bodies_do_not_tell_reasons_apart() {
        let unauthorized = r#"{"code":401,"msg":"Unauthorized"}"#;
        for reason in DenyReason::ALL {
            let response = decided(reason, "203.0.113.45").respond(DenialDetail::Opaque);
            if reason == DenyReason::RateLimited {
                assert_eq!(response.http_status, 429);
                assert_eq!(response.body, r#"{"code":429,"msg":"Too Many Requests"}"#);
            } else {
                assert_eq!(response.http_status, 401, "{reason}");
                assert_eq!(response.body, unauthorized, "{reason}");
            }
        }
        for denial in [
            Denial::KeyMissing,
            Denial::InvalidRequest {
                field: "x-nonce header",
                problem: FieldProblem::TooLong { max: 128 },
            },
        ] {
            let response = denial.respond(DenialDetail::Opaque);
            assert_eq!(
                (response.http_status, response.body.as_str()),
                (401, unauthorized)
            );
        }
        let response = Denial::Unavailable.respond(DenialDetail::Opaque);
        assert_eq!(response.http_status, 503);
        assert_eq!(response.body, r#"{"code":503,"msg":"Service Unavailable"}"#);
        assert_eq!(response.grpc_code, Code::Unavailable);
    }

    #[test]
    fn detailed_ip_denial_has_the_documented_form() {
        let response = decided(DenyReason::IpNotAllowed, "203.0.113.45").respond(DETAILED);
        assert_eq!(response.http_status, 401);
        assert_eq!(
            response.body,
            r#"{"success":false,"error":{"code":"IP_NOT_WHITELISTED","message":"Your IP address (203.0.113.45) is not authorized to use this API key","details":{"clientIp":"203.0.113.45"}}}"#
        );
        assert_eq!(response.grpc_code, Code::PermissionDenied);
    }

    #[test]
    fn the_allowlist_is_shown_only_when_it_was_looked_up() {
        let denial = Denial::Decided {
            reason: DenyReason::IpNotAllowed,
            client_ip: Some("2001:db8::9".parse().unwrap()),
            allowed: Some(vec![
                "203.0.113.0/24".parse().unwrap(),
                "2001:db8:1::/48".parse().unwrap(),
            ]),
            signature: None,
        };
        let body: serde_json::Value = serde_json::from_str(&denial.respond(DETAILED).body).unwrap();
        assert_eq!(body["error"]["details"]["clientIp"], "2001:db8::9");
        assert_eq!(
            body["error"]["details"]["allowedIps"],
            serde_json::json!(["203.0.113.0/24", "2001:db8:1::/48"])
        );
        assert_eq!(
            body["error"]["message"],
            "Your IP address (2001:db8::9) is not authorized to use this API key"
        );
    }

    #[test]
    fn every_reason_has_its_own_detailed_code_and_message() {
        let mut codes = std::collections::HashSet::new();
        let mut messages = std::collections::HashSet::new();
        let others = [
            Denial::KeyMissing,
            Denial::InvalidRequest {
                field: "x-api-key header",
                problem: FieldProblem::TooLong { max: 256 },
            },
            Denial::Unavailable,
        ];
        let denials = DenyReason::ALL
            .iter()
            .map(|reason| decided(*reason, "198.51.100.7"))
            .chain(others);
        for denial in denials {
            let body: serde_json::Value =
                serde_json::from_str(&denial.respond(DETAILED).body).unwrap();
            assert_eq!(body["success"], false);
            let code = body["error"]["code"].as_str().unwrap().to_owned();
            assert!(
                code.bytes().all(|b| b.is_ascii_uppercase() || b == b'_'),
                "{code}"
            );
            assert!(codes.insert(code), "{denial:?}");
            assert!(
                messages.insert(body["error"]["message"].as_str().unwrap().to_owned()),
                "{denial:?}"
            );
        }
        assert_eq!(codes.len(), DenyReason::ALL.len() + 3);
    }

    #[test]
    fn rate_limiting_is_429_in_both_modes() {
        let limited = decided(DenyReason::RateLimited, "198.51.100.7");
        assert_eq!(limited.respond(DETAILED).http_status, 429);
        assert_eq!(limited.respond(DETAILED).grpc_code, Code::ResourceExhausted);
        assert!(limited.respond(DETAILED).body.contains("\"RATE_LIMITED\""));
    }

    #[test]
    fn an_unresolved_client_ip_has_no_client_ip_detail() {
        let denial = Denial::Decided {
            reason: DenyReason::InvalidClientIp,
            client_ip: None,
            allowed: None,
            signature: None,
        };
        assert_eq!(
            denial.respond(DETAILED).body,
            r#"{"success":false,"error":{"code":"INVALID_CLIENT_IP","message":"The client IP address could not be determined","details":{}}}"#
        );
    }

    #[test]
    fn a_detailed_signature_denial_shows_what_the_server_computed_and_the_opaque_one_nothing() {
        let signed = SignedRequest {
            signature: "c2lnbmF0dXJl",
            timestamp: 1_767_225_600,
            nonce: "n-1",
            method: "post",
            path: "/v1/payments?currency=EUR",
            body: b"{}",
            body_complete: true,
        };
        let now = UnixMillis::from_secs(1_767_225_642);
        let denial = |reason| Denial::Decided {
            reason,
            client_ip: Some("203.0.113.45".parse().unwrap()),
            allowed: None,
            signature: SignatureDetail::of(reason, Some(&signed), now),
        };
        let invalid = denial(DenyReason::SignatureInvalid);
        assert_eq!(
            invalid.respond(DETAILED).body,
            r#"{"success":false,"error":{"code":"SIGNATURE_INVALID","message":"The request signature is not valid","details":{"clientIp":"203.0.113.45","canonicalString":"1767225600\nn-1\nPOST\n/v1/payments?currency=EUR\n44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a","serverTime":1767225642}}}"#
        );
        let skewed: serde_json::Value = serde_json::from_str(
            &denial(DenyReason::TimestampOutOfWindow)
                .respond(DETAILED)
                .body,
        )
        .unwrap();
        assert_eq!(skewed["error"]["details"]["serverTime"], 1_767_225_642);
        assert!(skewed["error"]["details"]["canonicalString"].is_null());
        assert_eq!(
            SignatureDetail::of(DenyReason::IpNotAllowed, Some(&signed), now),
            None
        );
        // Opaque, the detail changes nothing: the body is the IP denial's, byte for byte.
        assert_eq!(
            invalid.respond(DenialDetail::Opaque),
            decided(DenyReason::IpNotAllowed, "203.0.113.45").respond(DenialDetail::Opaque)
        );
        assert!(!invalid.respond(DETAILED).body.contains(signed.signature));
    }
}
