//! Signing as a partner signs: the signing-key file formats and one function that signs a request,
//! for `keyfence sign`, `keyfence keys create --private-key-out` and the published test vectors
//! (`docs/signing-test-vectors.json`). The canonical string and the signatures are the policy
//! core's ([`canonical_string`], [`sign_hmac`], [`sign_ed25519`]): the server verifies what this
//! signs with the same code. Nothing here reads the clock or the OS generator; the timestamp, the
//! nonce and the randomness of a new key are the caller's.
//!
//! File formats (documented for partners in `docs/partner-guide.md`):
//! - HMAC signing secret (`--secret-file`): the base64 text keyfence issued at key creation;
//!   the HMAC key is the decoded bytes.
//! - Ed25519 private key (`--private-key-file`): PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`), the
//!   form `openssl genpkey -algorithm ed25519` writes and Python's `cryptography` and Node's `crypto`
//!   read as they are.

use base64::Engine as _;
use ed25519_dalek::{
    SigningKey,
    pkcs8::{DecodePrivateKey, EncodePrivateKey, KeypairBytes, spki::der::pem::LineEnding},
};
use keyfence_policy::{
    random::RandomSource,
    signature::{canonical_string, sign_ed25519, sign_hmac},
};

/// What a partner signs with. `Debug` never shows the secret.
pub enum PartnerKey {
    HmacSha256(Vec<u8>),
    Ed25519(SigningKey),
}

/// A signing-key file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("expected the base64 signing secret keyfence issued, got text that is not base64")]
    NotBase64,
    #[error("the signing secret is empty")]
    EmptySecret,
    #[error("expected an Ed25519 private key in PKCS#8 PEM (-----BEGIN PRIVATE KEY-----): {0}")]
    NotPkcs8Pem(String),
}

/// The fields a signature covers.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    /// Unix seconds.
    pub timestamp: i64,
    /// May be empty: the request then has no replay protection.
    pub nonce: &'a str,
    pub method: &'a str,
    /// The path with its query, exactly as sent.
    pub path: &'a str,
    pub body: &'a [u8],
}

/// A signed request: what was signed and the `x-signature` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The canonical string, UTF-8.
    pub canonical: Vec<u8>,
    /// Base64 (standard alphabet, padded).
    pub signature: String,
}

impl PartnerKey {
    /// Reads an HMAC signing secret file's text: base64, surrounding whitespace ignored.
    pub fn hmac_from_text(text: &str) -> Result<PartnerKey, KeyFileError> {
        let secret = base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| KeyFileError::NotBase64)?;
        if secret.is_empty() {
            return Err(KeyFileError::EmptySecret);
        }
        Ok(PartnerKey::HmacSha256(secret))
    }

    /// Reads an Ed25519 private key file's text: PKCS#8 PEM.
    pub fn ed25519_from_pem(text: &str) -> Result<PartnerKey, KeyFileError> {
        SigningKey::from_pkcs8_pem(text.trim())
            .map(PartnerKey::Ed25519)
            .map_err(|error| KeyFileError::NotPkcs8Pem(error.to_string()))
    }

    /// The scheme's name as `keys create --scheme` spells it.
    pub fn scheme(&self) -> &'static str {
        match self {
            PartnerKey::HmacSha256(_) => "hmac-sha256",
            PartnerKey::Ed25519(_) => "ed25519",
        }
    }

    pub fn sign(&self, request: &RequestToSign<'_>) -> Signed {
        let RequestToSign {
            timestamp,
            nonce,
            method,
            path,
            body,
        } = *request;
        let signature = match self {
            PartnerKey::HmacSha256(secret) => {
                sign_hmac(secret, timestamp, nonce, method, path, body)
            }
            PartnerKey::Ed25519(private_key) => {
                sign_ed25519(private_key, timestamp, nonce, method, path, body)
            }
        };
        Signed {
            canonical: canonical_string(timestamp, nonce, method, path, body),
            signature,
        }
    }
}

impl std::fmt::Debug for PartnerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PartnerKey({}, <redacted>)", self.scheme())
    }
}

/// A new Ed25519 key pair from `random`.
pub fn generate_ed25519(random: &dyn RandomSource) -> SigningKey {
    let mut seed = [0u8; 32];
    random.fill(&mut seed);
    let key = SigningKey::from_bytes(&seed);
    seed.fill(0);
    key
}

/// The private key as PKCS#8 PEM (LF line endings), the `--private-key-file` format: the 48-byte
/// version 1 form (RFC 8410) without the optional public key, which is what `openssl genpkey`
/// writes. OpenSSL 3.0, and so Node's `crypto` and Python's `cryptography`, refuse the version 2
/// form that carries the public key.
pub fn private_key_pem(private_key: &SigningKey) -> String {
    KeypairBytes {
        secret_key: private_key.to_bytes(),
        public_key: None,
    }
    .to_pkcs8_pem(LineEnding::LF)
    .expect("an Ed25519 key always encodes as PKCS#8")
    .to_string()
}

/// The public key as keyfence stores it: 32 bytes, here in base64.
pub fn public_key_base64(private_key: &SigningKey) -> String {
    base64::engine::general_purpose::STANDARD.encode(private_key.verifying_key().as_bytes())
}

#[cfg(test)]
mod tests {
    use keyfence_policy::{
        model::SignatureScheme,
        signature::{SignedRequest, Verifier},
    };

    use super::*;

    const REQUEST: RequestToSign<'static> = RequestToSign {
        timestamp: 1_767_225_600,
        nonce: "n-1",
        method: "post",
        path: "/v1/payments?currency=EUR",
        body: b"{\"amount\":100}",
    };

    fn verifies(scheme: SignatureScheme, signed: &Signed) -> bool {
        Verifier::new(&scheme).unwrap().verify(&SignedRequest {
            signature: &signed.signature,
            timestamp: REQUEST.timestamp,
            nonce: REQUEST.nonce,
            method: REQUEST.method,
            path: REQUEST.path,
            body: REQUEST.body,
            body_complete: true,
        })
    }

    #[test]
    fn what_a_partner_signs_the_server_verifies() {
        let hmac = PartnerKey::hmac_from_text(" c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n").unwrap();
        let signed = hmac.sign(&REQUEST);
        assert!(verifies(
            SignatureScheme::HmacSha256 {
                secret: b"secret-secret-secret".to_vec()
            },
            &signed
        ));
        assert!(
            signed
                .canonical
                .starts_with(b"1767225600\nn-1\nPOST\n/v1/payments")
        );

        let private_key = SigningKey::from_bytes(&[9; 32]);
        let pem = private_key_pem(&private_key);
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"), "{pem}");
        // Version 1, no public key: 48 bytes of DER, 64 characters of base64 on one line.
        assert_eq!(pem.lines().nth(1).map(str::len), Some(64), "{pem}");
        assert_eq!(pem.lines().count(), 3, "{pem}");
        let ed25519 = PartnerKey::ed25519_from_pem(&pem).unwrap();
        assert!(verifies(
            SignatureScheme::Ed25519 {
                public_key: private_key.verifying_key().to_bytes()
            },
            &ed25519.sign(&REQUEST)
        ));
    }

    #[test]
    fn unusable_files_say_what_was_expected_and_debug_shows_no_secret() {
        assert!(matches!(
            PartnerKey::hmac_from_text("not base64!"),
            Err(KeyFileError::NotBase64)
        ));
        assert!(matches!(
            PartnerKey::hmac_from_text("  \n"),
            Err(KeyFileError::EmptySecret)
        ));
        let error = PartnerKey::ed25519_from_pem("c2VjcmV0").unwrap_err();
        assert!(error.to_string().contains("PKCS#8 PEM"), "{error}");
        let key = PartnerKey::hmac_from_text("c2VjcmV0LXNlY3JldC1zZWNyZXQ=").unwrap();
        assert_eq!(format!("{key:?}"), "PartnerKey(hmac-sha256, <redacted>)");
    }
}
