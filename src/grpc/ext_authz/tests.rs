//! Reading Envoy's Check request and shaping the allow; the deny bodies are tested in `denial`, and
//! the whole path through a real Envoy in `tests/envoy.rs`.

use envoy_types::pb::envoy::{
    config::core::v3::{Address as AddressMessage, SocketAddress},
    service::auth::v3::{AttributeContext, attribute_context},
};

use super::*;
use crate::grpc::decision_io::{
    MAX_API_KEY_BYTES, MAX_METHOD_BYTES, MAX_NONCE_BYTES, MAX_PATH_BYTES, MAX_SIGNATURE_BYTES,
};
use keyfence_policy::{
    fixtures::{entry, record},
    snapshot::{KeyMaterial, PolicySnapshot},
};

fn check_request(peer: &str, headers: &[(&str, &str)]) -> CheckRequest {
    check_request_with_body(peer, headers, b"", "")
}

fn check_request_with_body(
    peer: &str,
    headers: &[(&str, &str)],
    raw_body: &[u8],
    body: &str,
) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(AddressMessage {
                    address: Some(Address::SocketAddress(SocketAddress {
                        address: peer.into(),
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/payments?currency=EUR".into(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect(),
                    raw_body: raw_body.to_vec(),
                    body: body.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[test]
fn key_from_x_api_key_first_then_bearer() {
    let request = check_request(
        "203.0.113.7",
        &[
            ("x-api-key", " kf_live_a "),
            ("authorization", "Bearer kf_live_b"),
        ],
    );
    let question = read(&request, BodyReport::Forwarded).unwrap();
    assert_eq!(
        (question.key, question.key_from),
        ("kf_live_a", KeyHeader::ApiKey)
    );
    assert_eq!(question.origin.peer, "203.0.113.7");
    assert!(question.signature.is_none());

    for authorization in [
        "Bearer kf_live_b",
        "bearer  kf_live_b",
        "BEARER\tkf_live_b ",
    ] {
        let request = check_request("203.0.113.7", &[("authorization", authorization)]);
        let question = read(&request, BodyReport::Forwarded).unwrap();
        assert_eq!(
            (question.key, question.key_from),
            ("kf_live_b", KeyHeader::Bearer),
            "{authorization}"
        );
    }
}

#[test]
fn no_key_is_a_denial() {
    for headers in [
        &[][..],
        &[("x-api-key", "")][..],
        &[("x-api-key", "  ")][..],
        &[("authorization", "Basic dXNlcjpwYXNz")][..],
        &[("authorization", "Bearer")][..],
        &[("authorization", "Bearer   ")][..],
        &[("authorization", "Bearerkf_live_b")][..],
    ] {
        let request = check_request("203.0.113.7", headers);
        assert_eq!(
            read(&request, BodyReport::Forwarded).unwrap_err(),
            Denial::KeyMissing,
            "{headers:?}"
        );
    }
    // No HTTP attributes at all (a network-level Check) carries no key either.
    let request = CheckRequest::default();
    assert_eq!(
        read(&request, BodyReport::Forwarded).unwrap_err(),
        Denial::KeyMissing
    );
}

#[test]
fn oversized_headers_are_refused_naming_the_header() {
    let long_key = "k".repeat(MAX_API_KEY_BYTES + 1);
    let request = check_request("203.0.113.7", &[("x-api-key", &long_key)]);
    assert_eq!(
        read(&request, BodyReport::Forwarded).unwrap_err(),
        Denial::InvalidRequest {
            field: "x-api-key header",
            problem: FieldProblem::TooLong {
                max: MAX_API_KEY_BYTES
            }
        }
    );
    let bearer = format!("Bearer {long_key}");
    let request = check_request("203.0.113.7", &[("authorization", &bearer)]);
    assert!(matches!(
        read(&request, BodyReport::Forwarded).unwrap_err(),
        Denial::InvalidRequest {
            field: "authorization header",
            ..
        }
    ));
    let long_nonce = "n".repeat(MAX_NONCE_BYTES + 1);
    let request = check_request(
        "203.0.113.7",
        &[
            ("x-api-key", "k"),
            ("x-signature", "c2ln"),
            ("x-nonce", &long_nonce),
        ],
    );
    assert!(matches!(
        read(&request, BodyReport::Forwarded).unwrap_err(),
        Denial::InvalidRequest {
            field: "x-nonce header",
            ..
        }
    ));
    let long_signature = "s".repeat(MAX_SIGNATURE_BYTES + 1);
    let request = check_request(
        "203.0.113.7",
        &[("x-api-key", "k"), ("x-signature", &long_signature)],
    );
    assert!(matches!(
        read(&request, BodyReport::Forwarded).unwrap_err(),
        Denial::InvalidRequest {
            field: "x-signature header",
            ..
        }
    ));
}

#[test]
fn oversized_or_ambiguous_method_path_and_nonce_are_refused() {
    let with_http = |method: &str, path: &str, nonce: &str| {
        let mut request = check_request(
            "203.0.113.7",
            &[
                ("x-api-key", "k"),
                ("x-signature", "c2ln"),
                ("x-nonce", nonce),
            ],
        );
        let http = request
            .attributes
            .as_mut()
            .and_then(|a| a.request.as_mut())
            .and_then(|r| r.http.as_mut())
            .unwrap();
        http.method = method.into();
        http.path = path.into();
        read(&request, BodyReport::Forwarded).err()
    };
    let long_path = format!("/{}", "a".repeat(MAX_PATH_BYTES));
    assert_eq!(
        with_http("GET", &long_path, "n"),
        Some(Denial::InvalidRequest {
            field: "request path",
            problem: FieldProblem::TooLong {
                max: MAX_PATH_BYTES
            }
        })
    );
    assert_eq!(
        with_http("GET", "/a\nGET\n/b", "n"),
        Some(Denial::InvalidRequest {
            field: "request path",
            problem: FieldProblem::ControlCharacter
        })
    );
    assert_eq!(
        with_http("GET", "/", "n\n1"),
        Some(Denial::InvalidRequest {
            field: "x-nonce header",
            problem: FieldProblem::ControlCharacter
        })
    );
    for method in ["GE T", "GET\n", "G/T", &"M".repeat(MAX_METHOD_BYTES + 1)] {
        assert!(
            matches!(
                with_http(method, "/", "n"),
                Some(Denial::InvalidRequest {
                    field: "request method",
                    ..
                })
            ),
            "{method:?}"
        );
    }
    assert_eq!(with_http("PATCH", "/v1/x?a=b", "n-1"), None);
    // Bad input denies as INVALID_REQUEST when detailed, opaquely otherwise.
    let denial = with_http("GET", &long_path, "n").unwrap();
    let detailed = denial.respond(denial::DenialDetail::Detailed {
        include_allowlist: false,
    });
    assert_eq!(detailed.http_status, 401);
    assert!(
        detailed.body.contains("\"code\":\"INVALID_REQUEST\""),
        "{}",
        detailed.body
    );
    assert!(detailed.body.len() < 300, "the body does not echo the path");
    assert_eq!(
        denial.respond(denial::DenialDetail::Opaque).body,
        r#"{"code":401,"msg":"Unauthorized"}"#
    );
}

#[test]
fn signature_fields_come_from_headers_and_http_attributes() {
    let request = check_request_with_body(
        "203.0.113.7",
        &[
            ("x-api-key", "k"),
            ("x-signature", "c2lnbmF0dXJl"),
            ("x-timestamp", "1700000000"),
            ("x-nonce", "n-1"),
            ("content-length", "2"),
            ("x-envoy-auth-partial-body", "false"),
        ],
        b"{}",
        "",
    );
    let signed = read(&request, BodyReport::Forwarded)
        .unwrap()
        .signature
        .unwrap();
    assert_eq!(signed.signature, "c2lnbmF0dXJl");
    assert_eq!(signed.timestamp, 1_700_000_000);
    assert_eq!(signed.nonce, "n-1");
    assert_eq!(signed.method, "POST");
    assert_eq!(signed.path, "/v1/payments?currency=EUR");
    assert_eq!(signed.body, b"{}");
    assert!(signed.body_complete);

    // Without pack_as_bytes Envoy sends the body as a string.
    let request = check_request_with_body(
        "203.0.113.7",
        &[
            ("x-api-key", "k"),
            ("x-signature", "c2ln"),
            ("x-envoy-auth-partial-body", "false"),
        ],
        b"",
        "text body",
    );
    assert_eq!(
        read(&request, BodyReport::Forwarded)
            .unwrap()
            .signature
            .unwrap()
            .body,
        b"text body"
    );

    // A missing or malformed timestamp is 0, which no window accepts.
    for timestamp in [None, Some("soon"), Some("1.5")] {
        let mut headers = vec![("x-api-key", "k"), ("x-signature", "c2ln")];
        headers.extend(timestamp.map(|t| ("x-timestamp", t)));
        let request = check_request("203.0.113.7", &headers);
        assert_eq!(
            read(&request, BodyReport::Forwarded)
                .unwrap()
                .signature
                .unwrap()
                .timestamp,
            0
        );
    }
}

#[test]
fn a_body_envoy_did_not_forward_whole_is_not_complete() {
    let complete = |headers: &[(&str, &str)], body: &[u8]| {
        let mut all = vec![("x-api-key", "k"), ("x-signature", "c2ln")];
        all.extend_from_slice(headers);
        let request = check_request_with_body("203.0.113.7", &all, body, "");
        read(&request, BodyReport::Forwarded)
            .unwrap()
            .signature
            .unwrap()
            .body_complete
    };
    // No body announced, none forwarded.
    assert!(complete(&[], b""));
    assert!(complete(&[("content-length", "0")], b""));
    // Announced but not forwarded.
    assert!(!complete(&[("content-length", "12")], b""));
    assert!(!complete(&[("transfer-encoding", "chunked")], b""));
    assert!(!complete(&[("transfer-encoding", "gzip, Chunked")], b""));
    assert!(!complete(&[("content-length", "nonsense")], b""));
    // Forwarded by with_request_body: Envoy says whether it truncated.
    assert!(complete(
        &[
            ("content-length", "4"),
            ("x-envoy-auth-partial-body", "false")
        ],
        b"body"
    ));
    assert!(complete(
        &[
            ("transfer-encoding", "chunked"),
            ("x-envoy-auth-partial-body", "false")
        ],
        b"body"
    ));
    assert!(!complete(
        &[
            ("content-length", "40"),
            ("x-envoy-auth-partial-body", "true")
        ],
        b"body"
    ));
    assert!(!complete(
        &[
            ("transfer-encoding", "chunked"),
            ("x-envoy-auth-partial-body", "true")
        ],
        b"body"
    ));
    // A client-sent "false" vouches for nothing: without with_request_body Envoy forwards the
    // client's header as it is.
    assert!(!complete(
        &[
            ("transfer-encoding", "chunked"),
            ("x-envoy-auth-partial-body", "false")
        ],
        b""
    ));
    assert!(!complete(
        &[
            ("content-length", "12"),
            ("x-envoy-auth-partial-body", "false")
        ],
        b""
    ));
    // Lengths that disagree are not trusted either way.
    assert!(!complete(&[("content-length", "2")], b"body"));
    // Unless Envoy is known to buffer bodies, a request that announces no length may have had a
    // body Envoy dropped the framing of (it removes transfer-encoding): not complete, whatever a
    // client-sent partial-body header says. An announced length still proves it.
    let unknown = |headers: &[(&str, &str)], body: &[u8]| {
        let mut all = vec![("x-api-key", "k"), ("x-signature", "c2ln")];
        all.extend_from_slice(headers);
        let request = check_request_with_body("203.0.113.7", &all, body, "");
        read(&request, BodyReport::Unknown)
            .unwrap()
            .signature
            .unwrap()
            .body_complete
    };
    assert!(!unknown(&[], b""));
    assert!(!unknown(&[("x-envoy-auth-partial-body", "false")], b""));
    assert!(unknown(&[("content-length", "0")], b""));
    assert!(unknown(&[("x-envoy-auth-partial-body", "false")], b"body"));
    // A forwarded body without Envoy's own word on it is not taken as whole.
    assert!(!complete(&[], b"body"));
    assert!(!complete(
        &[
            ("content-length", "40"),
            ("x-envoy-auth-partial-body", "false")
        ],
        b"body"
    ));
    assert!(!complete(&[("content-length", "2")], b"body"));
}

#[test]
fn forwarding_headers_are_handed_to_the_resolver() {
    let request = check_request(
        "10.0.0.2",
        &[
            ("x-api-key", "k"),
            ("x-forwarded-for", "203.0.113.1, 198.51.100.7"),
            ("x-real-ip", "192.0.2.1"),
        ],
    );
    let origin = read(&request, BodyReport::Forwarded).unwrap().origin;
    assert_eq!(origin.peer, "10.0.0.2");
    assert_eq!(origin.forwarded_for, Some("203.0.113.1, 198.51.100.7"));
    assert_eq!(origin.real_ip, Some("192.0.2.1"));
    // A source that is not a socket address (a pipe) leaves the peer empty: INVALID_CLIENT_IP.
    let mut request = check_request("", &[("x-api-key", "k")]);
    request.attributes.as_mut().unwrap().source = None;
    assert_eq!(
        read(&request, BodyReport::Forwarded).unwrap().origin.peer,
        ""
    );
}

fn compiled_key() -> Arc<CompiledKey> {
    let snapshot = PolicySnapshot::build(
        1,
        [KeyMaterial {
            record: record("key_a", "acme", "production", "secret-a"),
            entries: vec![entry("203.0.113.0/24")],
        }],
        vec![],
    );
    snapshot
        .key_by_id(&"key_a".parse().unwrap())
        .unwrap()
        .clone()
}

fn header_pairs(options: &[HeaderValueOption]) -> Vec<(String, String, i32)> {
    options
        .iter()
        .map(|option| {
            let header = option.header.as_ref().unwrap();
            (
                header.key.clone(),
                header.value.clone(),
                option.append_action,
            )
        })
        .collect()
}

#[test]
fn an_allow_names_the_key_upstream_and_strips_the_credentials() {
    let key = compiled_key();
    let response = allow(&key, KeyHeader::ApiKey);
    assert_eq!(response.status.as_ref().unwrap().code, Code::Ok as i32);
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not an ok response: {response:?}");
    };
    let overwrite = HeaderAppendAction::OverwriteIfExistsOrAdd as i32;
    assert_eq!(
        header_pairs(&ok.headers),
        [
            ("x-keyfence-key-id".into(), "key_a".into(), overwrite),
            ("x-keyfence-partner-id".into(), "acme".into(), overwrite),
            (
                "x-keyfence-environment".into(),
                "production".into(),
                overwrite
            ),
        ]
    );
    assert_eq!(
        ok.headers_to_remove,
        ["x-api-key", "x-signature", "x-timestamp", "x-nonce"]
    );

    let response = allow(&key, KeyHeader::Bearer);
    let Some(HttpResponse::OkResponse(ok)) = &response.http_response else {
        panic!("not an ok response: {response:?}");
    };
    assert!(ok.headers_to_remove.iter().any(|h| h == "authorization"));
}
