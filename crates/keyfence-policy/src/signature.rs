//! Request signatures: the canonical string, HMAC-SHA256 and Ed25519 verification, and signing as
//! a partner signs (`keyfence sign`, the published test vectors, tests).
//!
//! Canonical string (UTF-8):
//! `timestamp + "\n" + nonce + "\n" + METHOD + "\n" + path_and_query + "\n" + hex(sha256(body))`,
//! timestamp in Unix seconds, method upper-cased. The signature is base64 (standard alphabet,
//! padding optional). HMAC verification streams the canonical string into the MAC and compares in
//! constant time; nothing is allocated for it.

use base64::{
    Engine as _, alphabet,
    engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig},
};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use super::model::SignatureScheme;

/// The request fields a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    pub signature: &'a str,
    pub timestamp: i64,
    pub nonce: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
    /// False when the front end knows the request had a body it did not see whole (Envoy sent
    /// none, or a truncated one). `body` then cannot be what was signed, so the engine denies with
    /// `BODY_NOT_FORWARDED` instead of verifying over it.
    pub body_complete: bool,
}

const BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A key's verifier, prepared once at compile time.
#[derive(Clone)]
pub enum Verifier {
    /// The key's requests are not signed.
    Unsigned,
    HmacSha256(Hmac<Sha256>),
    Ed25519(VerifyingKey),
}

/// The key material in the store cannot be used (a public key that is not a curve point). The
/// key then denies every signed request: an invalid policy is deny, never allow.
#[derive(Debug, thiserror::Error)]
#[error("unusable signature key material: {0}")]
pub struct BadKeyMaterial(String);

impl Verifier {
    pub fn new(scheme: &SignatureScheme) -> Result<Verifier, BadKeyMaterial> {
        match scheme {
            SignatureScheme::None => Ok(Verifier::Unsigned),
            SignatureScheme::HmacSha256 { secret } => Hmac::<Sha256>::new_from_slice(secret)
                .map(Verifier::HmacSha256)
                .map_err(|e| BadKeyMaterial(e.to_string())),
            SignatureScheme::Ed25519 { public_key } => VerifyingKey::from_bytes(public_key)
                .map(Verifier::Ed25519)
                .map_err(|e| BadKeyMaterial(e.to_string())),
        }
    }

    pub fn requires_signature(&self) -> bool {
        !matches!(self, Verifier::Unsigned)
    }

    /// Whether `request.signature` is a valid signature of the request's canonical string.
    pub fn verify(&self, request: &SignedRequest<'_>) -> bool {
        let mut decoded = [0u8; 96];
        let Ok(len) = BASE64.decode_slice(request.signature, &mut decoded) else {
            return false;
        };
        let signature = &decoded[..len];
        match self {
            Verifier::Unsigned => true,
            Verifier::HmacSha256(prepared) => {
                let mut mac = prepared.clone();
                write_canonical(request, |part| mac.update(part));
                mac.verify_slice(signature).is_ok()
            }
            Verifier::Ed25519(public_key) => {
                let Ok(signature) = Signature::from_slice(signature) else {
                    return false;
                };
                let mut message = Vec::with_capacity(96 + request.path.len());
                write_canonical(request, |part| message.extend_from_slice(part));
                public_key.verify_strict(&message, &signature).is_ok()
            }
        }
    }
}

/// Feeds the canonical string to `sink` piece by piece.
fn write_canonical(request: &SignedRequest<'_>, mut sink: impl FnMut(&[u8])) {
    let mut timestamp = [0u8; 20];
    sink(format_i64(request.timestamp, &mut timestamp));
    sink(b"\n");
    sink(request.nonce.as_bytes());
    sink(b"\n");
    let mut method = [0u8; 16];
    if request.method.len() <= method.len() {
        let method = &mut method[..request.method.len()];
        method.copy_from_slice(request.method.as_bytes());
        method.make_ascii_uppercase();
        sink(method);
    } else {
        sink(request.method.to_ascii_uppercase().as_bytes());
    }
    sink(b"\n");
    sink(request.path.as_bytes());
    sink(b"\n");
    let mut body_hex = [0u8; 64];
    hex::encode_to_slice(Sha256::digest(request.body), &mut body_hex)
        .expect("64 bytes hold a hex SHA-256");
    sink(&body_hex);
}

fn format_i64(value: i64, buffer: &mut [u8; 20]) -> &[u8] {
    let mut magnitude = value.unsigned_abs();
    let mut at = buffer.len();
    loop {
        at -= 1;
        buffer[at] = b'0' + (magnitude % 10) as u8;
        magnitude /= 10;
        if magnitude == 0 {
            break;
        }
    }
    if value < 0 {
        at -= 1;
        buffer[at] = b'-';
    }
    &buffer[at..]
}

/// The canonical string as bytes, for clients (the CLI, tests) that sign.
pub fn canonical_string(
    timestamp: i64,
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> Vec<u8> {
    let request = SignedRequest {
        signature: "",
        timestamp,
        nonce,
        method,
        path,
        body,
        body_complete: true,
    };
    let mut out = Vec::new();
    write_canonical(&request, |part| out.extend_from_slice(part));
    out
}

/// Signs like a partner would with an HMAC secret: base64 of HMAC-SHA256 over the canonical string.
pub fn sign_hmac(
    secret: &[u8],
    timestamp: i64,
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(&canonical_string(timestamp, nonce, method, path, body));
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Signs like a partner would with an Ed25519 private key: base64 of the Ed25519 signature over the
/// canonical string.
pub fn sign_ed25519(
    private_key: &SigningKey,
    timestamp: i64,
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    let signature = private_key.sign(&canonical_string(timestamp, nonce, method, path, body));
    base64::engine::general_purpose::STANDARD.encode(signature.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(signature: &'a str, body: &'a [u8]) -> SignedRequest<'a> {
        SignedRequest {
            signature,
            timestamp: 1_700_000_000,
            nonce: "n-1",
            method: "post",
            path: "/v1/payments?limit=10",
            body,
            body_complete: true,
        }
    }

    #[test]
    fn canonical_string_matches_the_documented_form() {
        let text = canonical_string(1_700_000_000, "n-1", "post", "/v1/payments?limit=10", b"{}");
        let expected = format!(
            "1700000000\nn-1\nPOST\n/v1/payments?limit=10\n{}",
            hex::encode(Sha256::digest(b"{}"))
        );
        assert_eq!(String::from_utf8(text).unwrap(), expected);
        assert_eq!(&canonical_string(-5, "", "get", "/", b"")[..3], b"-5\n");
    }

    #[test]
    fn hmac_valid_and_tampered() {
        let secret = b"0123456789abcdef0123456789abcdef";
        let verifier = Verifier::new(&SignatureScheme::HmacSha256 {
            secret: secret.to_vec(),
        })
        .unwrap();
        let signature = sign_hmac(
            secret,
            1_700_000_000,
            "n-1",
            "POST",
            "/v1/payments?limit=10",
            b"{}",
        );
        assert!(verifier.verify(&request(&signature, b"{}")));
        assert!(!verifier.verify(&request(&signature, b"{ }")));
        let unpadded = signature.trim_end_matches('=');
        assert!(verifier.verify(&request(unpadded, b"{}")));
        assert!(!verifier.verify(&request("not base64!", b"{}")));
        assert!(!verifier.verify(&request("", b"{}")));
        let other = sign_hmac(
            b"another secret",
            1_700_000_000,
            "n-1",
            "POST",
            "/v1/payments?limit=10",
            b"{}",
        );
        assert!(!verifier.verify(&request(&other, b"{}")));
    }

    #[test]
    fn ed25519_valid_and_tampered() {
        let signing = SigningKey::from_bytes(&[7u8; 32]);
        let scheme = SignatureScheme::Ed25519 {
            public_key: signing.verifying_key().to_bytes(),
        };
        let verifier = Verifier::new(&scheme).unwrap();
        let signature = sign_ed25519(
            &signing,
            1_700_000_000,
            "n-1",
            "POST",
            "/v1/payments?limit=10",
            b"{}",
        );
        assert!(verifier.verify(&request(&signature, b"{}")));
        assert!(!verifier.verify(&request(&signature, b"{\"amount\":1}")));
        let mut tampered = request(&signature, b"{}");
        tampered.path = "/v1/refunds";
        assert!(!verifier.verify(&tampered));
        assert!(!verifier.verify(&request("AAAA", b"{}")));
    }

    #[test]
    fn invalid_public_key_is_rejected_at_compile() {
        // Not every 32-byte string is a point on the curve.
        let bad = (0u8..=255)
            .map(|b| [b; 32])
            .find(|bytes| VerifyingKey::from_bytes(bytes).is_err())
            .expect("some constant byte string is not a valid point");
        assert!(Verifier::new(&SignatureScheme::Ed25519 { public_key: bad }).is_err());
    }
}
