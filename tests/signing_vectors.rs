//! The published signing test vectors, `docs/signing-test-vectors.json`, are computed here, not
//! written by hand: every vector is built from its inputs with the code `keyfence sign` runs
//! (`keyfence::signing`, over the policy core's canonical string), its signature is checked with the
//! server's own verifier, and the test fails if the file differs by a byte. After a deliberate
//! change, regenerate the file with
//!
//! ```sh
//! KEYFENCE_WRITE_VECTORS=1 cargo test -p keyfence --test signing_vectors
//! ```

use base64::Engine as _;
use ed25519_dalek::SigningKey;
use keyfence::signing::{self, PartnerKey, RequestToSign};
use keyfence_policy::{
    model::SignatureScheme,
    signature::{SignedRequest, Verifier},
};
use serde::Serialize;
use sha2::{Digest, Sha256};

const FILE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/docs/signing-test-vectors.json"
);

/// The HMAC key of every HMAC vector: 32 bytes, like the secrets keyfence issues. Test use only.
const HMAC_SECRET: &[u8; 32] = b"keyfence-test-vector-hmac-secret";

/// The Ed25519 key of every Ed25519 vector: the private key of RFC 8032's test 1. Test use only.
const ED25519_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";

/// 2026-01-01T00:00:00Z.
const TIMESTAMP: i64 = 1_767_225_600;
const NONCE: &str = "c8f1e2a9b7d64f0e93a1";
const JSON_BODY: &[u8] = br#"{"amount":100,"currency":"EUR"}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Hmac,
    Ed25519,
}

struct Case {
    name: &'static str,
    description: &'static str,
    scheme: Scheme,
    timestamp: i64,
    nonce: &'static str,
    method: &'static str,
    path: &'static str,
    body: Vec<u8>,
}

fn case(name: &'static str, description: &'static str, scheme: Scheme) -> Case {
    Case {
        name,
        description,
        scheme,
        timestamp: TIMESTAMP,
        nonce: NONCE,
        method: "POST",
        path: "/v1/payments?currency=EUR",
        body: JSON_BODY.to_vec(),
    }
}

fn get(mut case: Case, path: &'static str) -> Case {
    case.method = "GET";
    case.path = path;
    case.body = Vec::new();
    case
}

/// Every vector's inputs. The edge cases partners trip on each have one (see docs/partner-guide.md).
fn cases() -> Vec<Case> {
    use Scheme::*;
    let binary: Vec<u8> = (0..=255u8).rev().collect();
    vec![
        case(
            "hmac-post-json",
            "A POST with a JSON body and a query string.",
            Hmac,
        ),
        get(
            case(
                "hmac-get-empty-body",
                "A GET without a body: the body hash is the SHA-256 of zero bytes.",
                Hmac,
            ),
            "/v1/orders?limit=10",
        ),
        Case {
            method: "PUT",
            path: "/v1/files/report.bin",
            body: binary.clone(),
            ..case(
                "hmac-binary-body",
                "A binary body (every byte value, 0xff down to 0x00, not UTF-8): hash the bytes as sent, never a decoded or re-encoded form.",
                Hmac,
            )
        },
        Case {
            body: [JSON_BODY, b"\n"].concat(),
            ..case(
                "hmac-body-trailing-newline",
                "The JSON body of hmac-post-json with a trailing newline: one byte more, another body hash, another signature.",
                Hmac,
            )
        },
        get(
            case(
                "hmac-query-order-status-first",
                "Query parameters are signed in the order they are sent; compare with hmac-query-order-limit-first.",
                Hmac,
            ),
            "/v1/orders?status=open&limit=10",
        ),
        get(
            case(
                "hmac-query-order-limit-first",
                "The same parameters as hmac-query-order-status-first, reordered: a different canonical string and signature. Nothing is sorted.",
                Hmac,
            ),
            "/v1/orders?limit=10&status=open",
        ),
        get(
            case(
                "hmac-query-percent-encoded",
                "Percent-encoded parameters are signed encoded, as sent: nothing is decoded.",
                Hmac,
            ),
            "/v1/search?q=caf%C3%A9%20au%20lait&tags=a%2Cb",
        ),
        get(
            case(
                "hmac-query-percent-encoded-lowercase",
                "hmac-query-percent-encoded with lowercase hex digits and + for spaces: the same meaning, different bytes, a different signature.",
                Hmac,
            ),
            "/v1/search?q=caf%c3%a9+au+lait&tags=a%2cb",
        ),
        get(
            case(
                "hmac-unicode-path",
                "Non-ASCII characters in the path enter the canonical string as their UTF-8 bytes. On the wire, send them percent-encoded (next vector): HTTP clients and proxies do.",
                Hmac,
            ),
            "/v1/cities/münchen/€",
        ),
        get(
            case(
                "hmac-unicode-path-percent-encoded",
                "The path of hmac-unicode-path as it travels: percent-encoded UTF-8, signed exactly so.",
                Hmac,
            ),
            "/v1/cities/m%C3%BCnchen/%E2%82%AC",
        ),
        Case {
            nonce: "",
            ..case(
                "hmac-empty-nonce",
                "No nonce (send no x-nonce header): the line stays in the canonical string, empty. Allowed, but such a request can be replayed within the timestamp window.",
                Hmac,
            )
        },
        Case {
            method: "delete",
            path: "/v1/payments/pay_123",
            body: Vec::new(),
            ..case(
                "hmac-lowercase-method",
                "The method is upper-cased (ASCII) in the canonical string, whatever the case it is sent in.",
                Hmac,
            )
        },
        case(
            "ed25519-post-json",
            "hmac-post-json's request signed with Ed25519.",
            Ed25519,
        ),
        get(
            case(
                "ed25519-get-empty-body",
                "A GET without a body, signed with Ed25519.",
                Ed25519,
            ),
            "/v1/orders?limit=10",
        ),
        Case {
            method: "PUT",
            path: "/v1/files/report.bin",
            body: binary,
            ..case(
                "ed25519-binary-body",
                "hmac-binary-body's request signed with Ed25519.",
                Ed25519,
            )
        },
        Case {
            nonce: "",
            ..case(
                "ed25519-empty-nonce",
                "No nonce, signed with Ed25519.",
                Ed25519,
            )
        },
        get(
            case(
                "ed25519-unicode-path-percent-encoded",
                "hmac-unicode-path-percent-encoded's request signed with Ed25519.",
                Ed25519,
            ),
            "/v1/cities/m%C3%BCnchen/%E2%82%AC",
        ),
    ]
}

#[derive(Serialize)]
struct VectorFile {
    about: &'static str,
    canonical_string: &'static str,
    key_formats: KeyFormats,
    regenerate: &'static str,
    vectors: Vec<Vector>,
}

#[derive(Serialize)]
struct KeyFormats {
    secret_base64: &'static str,
    private_key_pem: &'static str,
    public_key_base64: &'static str,
}

#[derive(Serialize)]
struct Vector {
    name: &'static str,
    description: &'static str,
    scheme: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    secret_base64: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key_pem: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    public_key_base64: Option<String>,
    timestamp: i64,
    nonce: &'static str,
    method: &'static str,
    path: &'static str,
    body_base64: String,
    /// The body as text, when it is UTF-8 (for reading; `body_base64` is what is signed).
    body_utf8: Option<String>,
    expected: Expected,
}

#[derive(Serialize)]
struct Expected {
    body_sha256_hex: String,
    canonical_string: String,
    canonical_string_hex: String,
    signature: String,
}

fn ed25519_key() -> SigningKey {
    let seed: [u8; 32] = hex::decode(ED25519_SEED).unwrap().try_into().unwrap();
    SigningKey::from_bytes(&seed)
}

fn vector(case: &Case) -> Vector {
    let base64 = &base64::engine::general_purpose::STANDARD;
    let (key, secret_base64, private_key_pem, public_key_base64) = match case.scheme {
        Scheme::Hmac => {
            let text = base64.encode(HMAC_SECRET);
            (
                PartnerKey::hmac_from_text(&text).unwrap(),
                Some(text),
                None,
                None,
            )
        }
        Scheme::Ed25519 => {
            let private_key = ed25519_key();
            let pem = signing::private_key_pem(&private_key);
            (
                PartnerKey::ed25519_from_pem(&pem).unwrap(),
                None,
                Some(pem),
                Some(signing::public_key_base64(&private_key)),
            )
        }
    };
    let signed = key.sign(&RequestToSign {
        timestamp: case.timestamp,
        nonce: case.nonce,
        method: case.method,
        path: case.path,
        body: &case.body,
    });
    Vector {
        name: case.name,
        description: case.description,
        scheme: key.scheme(),
        secret_base64,
        private_key_pem,
        public_key_base64,
        timestamp: case.timestamp,
        nonce: case.nonce,
        method: case.method,
        path: case.path,
        body_base64: base64.encode(&case.body),
        body_utf8: String::from_utf8(case.body.clone()).ok(),
        expected: Expected {
            body_sha256_hex: hex::encode(Sha256::digest(&case.body)),
            canonical_string: String::from_utf8(signed.canonical.clone())
                .expect("the canonical string is UTF-8"),
            canonical_string_hex: hex::encode(&signed.canonical),
            signature: signed.signature,
        },
    }
}

fn vector_file() -> String {
    let file = VectorFile {
        about: "keyfence request-signing test vectors. Each vector's inputs (key, timestamp, nonce, method, path with query, body) and the canonical string and signature they must produce, byte for byte. The keys are published test keys: never use them for real traffic. The timestamps are in the past, so these signatures are outside any server's window.",
        canonical_string: "timestamp + \"\\n\" + nonce + \"\\n\" + ASCII-uppercase(method) + \"\\n\" + path_and_query + \"\\n\" + lowercase-hex(sha256(body)), UTF-8, no trailing newline; the signature is standard base64 (padded) of HMAC-SHA256 or Ed25519 over it",
        key_formats: KeyFormats {
            secret_base64: "the HMAC signing secret as keyfence issues it (keyfence sign --secret-file); the HMAC key is the decoded bytes",
            private_key_pem: "the Ed25519 private key, PKCS#8 PEM (keyfence sign --private-key-file)",
            public_key_base64: "the Ed25519 public key keyfence stores, 32 bytes",
        },
        regenerate: "KEYFENCE_WRITE_VECTORS=1 cargo test -p keyfence --test signing_vectors",
        vectors: cases().iter().map(vector).collect(),
    };
    serde_json::to_string_pretty(&file).expect("serializable") + "\n"
}

#[test]
fn the_published_vectors_are_what_the_code_computes() {
    let computed = vector_file();
    if std::env::var_os("KEYFENCE_WRITE_VECTORS").is_some() {
        std::fs::write(FILE, &computed).expect("write docs/signing-test-vectors.json");
    }
    let published = std::fs::read_to_string(FILE).unwrap_or_default();
    if published != computed {
        let line = published
            .lines()
            .zip(computed.lines())
            .position(|(a, b)| a != b)
            .map_or(
                published.lines().count().min(computed.lines().count()),
                |n| n,
            );
        panic!(
            "docs/signing-test-vectors.json differs from what the code computes, first at line {}:\n  published: {:?}\n  computed:  {:?}\nIf the change is deliberate, regenerate it: KEYFENCE_WRITE_VECTORS=1 cargo test -p keyfence --test signing_vectors",
            line + 1,
            published.lines().nth(line).unwrap_or("<end of file>"),
            computed.lines().nth(line).unwrap_or("<end of file>"),
        );
    }
}

#[test]
fn every_vector_verifies_with_the_servers_verifier() {
    let hmac = Verifier::new(&SignatureScheme::HmacSha256 {
        secret: HMAC_SECRET.to_vec(),
    })
    .unwrap();
    let ed25519 = Verifier::new(&SignatureScheme::Ed25519 {
        public_key: ed25519_key().verifying_key().to_bytes(),
    })
    .unwrap();
    for case in cases() {
        let vector = vector(&case);
        let verifier = match case.scheme {
            Scheme::Hmac => &hmac,
            Scheme::Ed25519 => &ed25519,
        };
        let mut request = SignedRequest {
            signature: &vector.expected.signature,
            timestamp: case.timestamp,
            nonce: case.nonce,
            method: case.method,
            path: case.path,
            body: &case.body,
            body_complete: true,
        };
        assert!(verifier.verify(&request), "{}", case.name);
        let other_body = [case.body.as_slice(), b"x"].concat();
        request.body = &other_body;
        assert!(
            !verifier.verify(&request),
            "{} with another body",
            case.name
        );
    }
}

#[test]
fn the_vectors_cover_the_edge_cases_partners_trip_on() {
    let cases = cases();
    let vectors: Vec<Vector> = cases.iter().map(vector).collect();
    let find = |name: &str| {
        vectors
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("no vector {name}"))
    };
    for scheme in [Scheme::Hmac, Scheme::Ed25519] {
        let of_scheme = || cases.iter().filter(move |c| c.scheme == scheme);
        assert!(
            of_scheme().any(|c| c.body.is_empty()),
            "{scheme:?}: empty body"
        );
        assert!(
            of_scheme().any(|c| std::str::from_utf8(&c.body).is_err()),
            "{scheme:?}: binary body"
        );
        assert!(
            of_scheme().any(|c| c.nonce.is_empty()),
            "{scheme:?}: no nonce"
        );
        assert!(
            of_scheme().any(|c| c.path.contains('%')),
            "{scheme:?}: percent-encoded path"
        );
    }
    assert!(
        cases.iter().any(|c| !c.path.is_ascii()),
        "unicode in the path"
    );
    assert!(vectors.iter().all(|v| {
        v.body_utf8.is_some()
            == std::str::from_utf8(
                &base64::engine::general_purpose::STANDARD
                    .decode(&v.body_base64)
                    .unwrap(),
            )
            .is_ok()
    }));
    // Reordered and differently encoded queries are different requests to sign.
    for (a, b) in [
        (
            "hmac-query-order-status-first",
            "hmac-query-order-limit-first",
        ),
        (
            "hmac-query-percent-encoded",
            "hmac-query-percent-encoded-lowercase",
        ),
        ("hmac-post-json", "hmac-body-trailing-newline"),
        ("hmac-unicode-path", "hmac-unicode-path-percent-encoded"),
    ] {
        assert_ne!(find(a).expected.signature, find(b).expected.signature);
    }
    assert!(
        find("hmac-lowercase-method")
            .expected
            .canonical_string
            .contains("\nDELETE\n")
    );
    assert_eq!(
        find("hmac-empty-nonce").expected.canonical_string,
        format!(
            "{TIMESTAMP}\n\nPOST\n/v1/payments?currency=EUR\n{}",
            hex::encode(Sha256::digest(JSON_BODY))
        )
    );
    // The documented worked example (docs/partner-guide.md) is the first vector.
    assert_eq!(vectors[0].name, "hmac-post-json");
    let mut names: Vec<&str> = vectors.iter().map(|v| v.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), vectors.len(), "vector names are unique");
}

/// The sh block after the worked-example marker in docs/partner-guide.md.
fn guide_worked_example(guide: &str) -> String {
    let after = guide
        .split("<!-- worked example")
        .nth(1)
        .expect("worked example marker in docs/partner-guide.md");
    let block = after
        .split("```sh\n")
        .nth(1)
        .expect("a sh block after the marker");
    block.split("```").next().unwrap().to_owned()
}

#[test]
fn the_guides_worked_example_is_a_published_vector_and_runs_as_printed() {
    let guide = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/partner-guide.md"
    ))
    .unwrap();
    let cases = cases();
    let example = vector(&cases[0]);
    let ed25519 = vector(
        cases
            .iter()
            .find(|c| c.name == "ed25519-post-json")
            .unwrap(),
    );
    for (what, text) in [
        ("the secret", example.secret_base64.clone().unwrap()),
        ("the body hash", example.expected.body_sha256_hex.clone()),
        (
            "the canonical string",
            example.expected.canonical_string.clone(),
        ),
        ("its hex", example.expected.canonical_string_hex.clone()),
        ("the signature", example.expected.signature.clone()),
        ("the Ed25519 signature", ed25519.expected.signature.clone()),
    ] {
        assert!(
            guide.contains(&text),
            "the guide's worked example lacks {what}: {text}"
        );
    }

    let works = std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_ok_and(|output| output.status.success());
    assert!(
        works,
        "no openssl to run the guide's worked example: run ./scripts/test (it installs Debian's \
         openssl), or apt-get install openssl"
    );
    let output = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", &guide_worked_example(&guide)])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8(output.stdout).unwrap().trim(),
        example.expected.signature
    );
}
