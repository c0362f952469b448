//! The invariants the fuzz targets assert, one function per target. Each takes the raw fuzz
//! input, never panics on its own account, and panics (a finding) when keyfence breaks an
//! invariant: a parser that accepts what a simple reference rejects, a resolver that believes a
//! hop it must not, a canonical string that two requests share, a Check that allows what a
//! reference decision denies.
//!
//! The same functions run in two places: the libFuzzer targets in `fuzz/fuzz_targets/` (nightly,
//! `scripts/fuzz`) and `tests/fuzz_corpus.rs`, which feeds every file of `fuzz/corpus/` to them
//! in the ordinary test suite on stable.

use std::{collections::HashMap, net::IpAddr, str::FromStr};

use base64::Engine as _;
use envoy_types::pb::envoy::{
    config::core::v3::{Address, SocketAddress, address},
    service::auth::v3::{AttributeContext, CheckRequest, attribute_context},
};
use hmac::{Hmac, Mac};
use keyfence::grpc::{decision_io, ext_authz};
use keyfence_policy::{
    client_ip::{Origin, TrustedProxies},
    decision::{AuthzRequest, Engine, Evaluation, KeySelector, Mode, Verdict},
    ip::{Cidr, ClientIp},
    model::{
        AllowlistEntry, Audit, Enforcement, KeyRecord, KeyStatus, SecretHash, SignatureScheme,
        UnixMillis,
    },
    nonce::NonceLedger,
    signature::{SignedRequest, Verifier, canonical_string},
    snapshot::{KeyMaterial, PolicySnapshot},
};
use sha2::{Digest, Sha256};

/// The names of the targets, which are also the folders of `fuzz/corpus/`.
pub const TARGETS: [&str; 4] = [
    "ip_parser",
    "client_ip",
    "canonical_string",
    "check_request",
];

/// Runs the check of `target` on `data`.
pub fn run(target: &str, data: &[u8]) {
    match target {
        "ip_parser" => ip_parser(data),
        "client_ip" => client_ip(data),
        "canonical_string" => canonical_string_is_unambiguous(data),
        "check_request" => check_request(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Splits fuzz input into `n` text fields at `\n`-free separators (0xFF never occurs in UTF-8).
fn fields(data: &[u8], n: usize) -> Vec<String> {
    let mut out: Vec<String> = data
        .splitn(n, |b| *b == 0xFF)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    out.resize(n, String::new());
    out
}

/// An IPv4-mapped IPv6 address as the IPv4 address it carries.
fn folded(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

/// IP and CIDR parsing: whatever keyfence accepts, the standard library's strict parser accepts
/// too, to the same address; a CIDR has a canonical decimal prefix within range and no host bits,
/// and prints back to itself; membership agrees with a linear reference.
pub fn ip_parser(data: &[u8]) {
    let [address_text, cidr_text] = <[String; 2]>::try_from(fields(data, 2)).unwrap();
    let address = ClientIp::from_str(&address_text);
    if let Ok(ip) = address {
        let reference = IpAddr::from_str(&address_text)
            .unwrap_or_else(|_| panic!("{address_text:?} accepted as an address"));
        assert_eq!(ip.addr(), folded(reference), "{address_text:?}");
    }
    if let Err(error) = &address {
        assert!(
            error.to_string().len() < 300,
            "an error quotes a short prefix"
        );
    }
    let Ok(cidr) = Cidr::from_str(&cidr_text) else {
        return;
    };
    let (addr_part, prefix_part) = match cidr_text.split_once('/') {
        Some((addr, prefix)) => (addr, Some(prefix)),
        None => (cidr_text.as_str(), None),
    };
    let addr = IpAddr::from_str(addr_part)
        .unwrap_or_else(|_| panic!("{cidr_text:?} accepted with a bad address"));
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix_part {
        None => max,
        Some(text) => {
            assert!(
                text == "0" || (!text.starts_with('0') && text.bytes().all(|b| b.is_ascii_digit())),
                "{cidr_text:?}: a prefix that is not canonical decimal"
            );
            text.parse::<u8>().expect("a decimal prefix")
        }
    };
    assert!(prefix <= max, "{cidr_text:?}");
    let net = ipnet::IpNet::new(addr, prefix).unwrap();
    assert_eq!(
        net,
        net.trunc(),
        "{cidr_text:?} accepted with host bits set"
    );
    assert_eq!(
        Cidr::from_str(&cidr.to_string()).unwrap(),
        cidr,
        "{cidr_text:?} does not print back to itself"
    );
    if let Ok(ip) = address {
        let reference = net.contains(&ip.addr())
            || net.contains(&match ip.addr() {
                IpAddr::V4(v4) => IpAddr::V6(v4.to_ipv6_mapped()),
                v6 => v6,
            });
        // Never wider than the reference. Within one family they agree exactly; an IPv6 network
        // that spans ::ffff:0:0/96 (::/0, say) admits no IPv4 client, which is keyfence's
        // stricter choice: an IPv4 client matches IPv4 entries (or mapped ones, folded) only.
        if cidr.contains(ip) {
            assert!(
                reference,
                "{cidr_text:?} admits {ip}, the reference does not"
            );
        }
        if net.addr().is_ipv4() == ip.addr().is_ipv4() {
            assert_eq!(cidr.contains(ip), reference, "{cidr_text:?} contains {ip}?");
        }
    }
}

/// The proxies the client-IP check trusts.
fn trusted_proxies(trust_x_real_ip: bool) -> TrustedProxies {
    TrustedProxies::new(
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ],
        trust_x_real_ip,
    )
}

/// The hop forms proxies write, parsed by a reference: an address, `a.b.c.d:port`, `[v6]` or
/// `[v6]:port`, strictly (the standard library's parser), ports 1 to 65535 in canonical decimal.
fn reference_hop(text: &str) -> Option<IpAddr> {
    let is_port = |p: &str| {
        !p.is_empty()
            && p.len() <= 5
            && p.bytes().all(|b| b.is_ascii_digit())
            && !p.starts_with('0')
            && p.parse::<u32>().is_ok_and(|n| (1..=65535).contains(&n))
    };
    if let Ok(addr) = IpAddr::from_str(text) {
        return Some(folded(addr));
    }
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port_ok = after.is_empty() || after.strip_prefix(':').is_some_and(is_port);
        let v6 = host.parse::<std::net::Ipv6Addr>().ok()?;
        return port_ok.then_some(folded(IpAddr::V6(v6)));
    }
    let (host, port) = text.split_once(':')?;
    if port.contains(':') || !is_port(port) {
        return None;
    }
    let v4 = host.parse::<std::net::Ipv4Addr>().ok()?;
    Some(IpAddr::V4(v4))
}

/// Client-IP resolution against a reference walk: an untrusted peer is the client whatever the
/// headers say; behind a trusted peer, a trusted X-Real-IP names it, else X-Forwarded-For is
/// walked right to left past trusted hops only; any unreadable hop on the way resolves nothing.
pub fn client_ip(data: &[u8]) {
    let [flags, peer, forwarded_for, real_ip] = <[String; 4]>::try_from(fields(data, 4)).unwrap();
    let trust_x_real_ip = flags.len() % 2 == 1;
    let proxies = trusted_proxies(trust_x_real_ip);
    let origin = Origin {
        peer: &peer,
        forwarded_for: (!forwarded_for.is_empty()).then_some(forwarded_for.as_str()),
        real_ip: (!real_ip.is_empty()).then_some(real_ip.as_str()),
    };
    let resolved = proxies.resolve(&origin);
    let networks: Vec<ipnet::IpNet> = ["10.0.0.0/8", "2001:db8::/32"]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    let trusted = |ip: IpAddr| networks.iter().any(|n| n.contains(&ip));
    let expected = (|| {
        let peer = if peer.is_empty() {
            None
        } else {
            reference_hop(&peer)
        }?;
        if !trusted(peer) {
            return Some(peer);
        }
        if trust_x_real_ip && !real_ip.trim().is_empty() {
            return reference_hop(real_ip.trim());
        }
        if forwarded_for.trim().is_empty() {
            return Some(peer);
        }
        let mut client = peer;
        for hop in forwarded_for.rsplit(',') {
            let hop = hop.trim_matches([' ', '\t']);
            client = if hop.is_empty() {
                None
            } else {
                reference_hop(hop)
            }?;
            if !trusted(client) {
                break;
            }
        }
        Some(client)
    })();
    assert_eq!(
        resolved.as_ref().ok().map(|ip| ip.addr()),
        expected,
        "{origin:?} resolved to {resolved:?}"
    );
}

/// The reference canonical string: the five lines the README documents.
fn reference_canonical(
    timestamp: i64,
    nonce: &str,
    method: &str,
    path: &str,
    body: &[u8],
) -> String {
    format!(
        "{timestamp}\n{nonce}\n{}\n{path}\n{}",
        method.to_ascii_uppercase(),
        hex::encode(Sha256::digest(body))
    )
}

const SECRET: &[u8] = b"a fuzzing secret of thirty-two b";

fn reference_hmac(canonical: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET).unwrap();
    mac.update(canonical.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Signature canonicalisation: for fields the edge accepts, the canonical string is the documented
/// one and reads back into exactly those fields (so no signature covers two requests), and the
/// verifier accepts a signature only when it is the reference HMAC of that string.
pub fn canonical_string_is_unambiguous(data: &[u8]) {
    let [ts, nonce, method, path, body, signature] =
        <[String; 6]>::try_from(fields(data, 6)).unwrap();
    let timestamp = i64::from_le_bytes(
        ts.as_bytes()
            .iter()
            .chain([0u8; 8].iter())
            .take(8)
            .copied()
            .collect::<Vec<_>>()
            .try_into()
            .unwrap(),
    );
    let accepted = decision_io::check_nonce(&nonce).is_ok()
        && decision_io::check_method(&method).is_ok()
        && decision_io::check_path(&path).is_ok()
        && decision_io::check_signature(&signature).is_ok();
    let canonical = canonical_string(timestamp, &nonce, &method, &path, body.as_bytes());
    if accepted {
        let reference = reference_canonical(timestamp, &nonce, &method, &path, body.as_bytes());
        assert_eq!(String::from_utf8(canonical.clone()).unwrap(), reference);
        let lines: Vec<&str> = reference.split('\n').collect();
        assert_eq!(
            lines,
            [
                timestamp.to_string().as_str(),
                nonce.as_str(),
                method.to_ascii_uppercase().as_str(),
                path.as_str(),
                hex::encode(Sha256::digest(body.as_bytes())).as_str()
            ],
            "the canonical string reads back into other fields"
        );
    }
    let verifier = Verifier::new(&SignatureScheme::HmacSha256 {
        secret: SECRET.to_vec(),
    })
    .unwrap();
    let request = |signature: &str| -> bool {
        verifier.verify(&SignedRequest {
            signature,
            timestamp,
            nonce: &nonce,
            method: &method,
            path: &path,
            body: body.as_bytes(),
            body_complete: true,
        })
    };
    let reference = reference_hmac(&reference_canonical(
        timestamp,
        &nonce,
        &method,
        &path,
        body.as_bytes(),
    ));
    if request(&signature) {
        let decoded = base64::engine::general_purpose::STANDARD.decode(&signature);
        let expected = base64::engine::general_purpose::STANDARD.decode(&reference);
        assert_eq!(
            decoded.ok(),
            expected.ok(),
            "a signature that is not the reference HMAC"
        );
    }
    assert!(request(&reference), "the reference HMAC is refused");
}

const NOW: UnixMillis = UnixMillis(1_700_000_000_000);
const OPEN_KEY: &str = "kf_live_fuzz_open_key";
const SIGNING_KEY: &str = "kf_live_fuzz_signing_key";

fn record(id: &str, secret: &str, signature: SignatureScheme) -> KeyRecord {
    let audit = Audit {
        actor: "fuzz".into(),
        at: UnixMillis(0),
    };
    KeyRecord {
        id: id.parse().unwrap(),
        partner_id: "acme".parse().unwrap(),
        environment: "production".parse().unwrap(),
        name: id.into(),
        display_prefix: "kf_live_fuzz".into(),
        secret_hash: SecretHash::of(secret),
        previous_secret: None,
        status: KeyStatus::Active,
        ip_allowlist_enabled: true,
        enforcement: Enforcement::Enforce,
        signature,
        require_nonce: false,
        rate_limit: None,
        expires_at: None,
        created: audit.clone(),
        updated: audit,
    }
}

fn snapshot() -> PolicySnapshot {
    let entry = AllowlistEntry {
        cidr: "203.0.113.0/24".parse().unwrap(),
        description: "fuzz".into(),
        added: Audit {
            actor: "fuzz".into(),
            at: UnixMillis(0),
        },
        expires_at: None,
    };
    PolicySnapshot::build(
        1,
        [
            KeyMaterial {
                record: record("key_open", OPEN_KEY, SignatureScheme::None),
                entries: vec![entry.clone()],
            },
            KeyMaterial {
                record: record(
                    "key_signing",
                    SIGNING_KEY,
                    SignatureScheme::HmacSha256 {
                        secret: SECRET.to_vec(),
                    },
                ),
                entries: vec![entry],
            },
        ],
        vec![],
    )
}

/// Builds Envoy's CheckRequest from fuzz input: the first fields are the peer, method, path and
/// body, the rest `name: value` header lines.
fn envoy_request(data: &[u8]) -> CheckRequest {
    let [peer, method, path, body, headers] = <[String; 5]>::try_from(fields(data, 5)).unwrap();
    let headers: HashMap<String, String> = headers
        .split('\n')
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.to_owned()))
        .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(attribute_context::Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: peer,
                        ..Default::default()
                    })),
                }),
                ..Default::default()
            }),
            request: Some(attribute_context::Request {
                http: Some(attribute_context::HttpRequest {
                    method,
                    path,
                    headers,
                    raw_body: body.into_bytes(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// The body is whole by a reference that trusts no client header: `partial-body` may only say
/// it was cut; an announced length must match what was forwarded; a forwarded body needs Envoy's
/// own `false`; and no length, no body means none only when Envoy is known to buffer bodies.
fn reference_body_complete(
    headers: &HashMap<String, String>,
    seen: usize,
    forwarded: bool,
) -> bool {
    let get = |name: &str| {
        headers
            .get(name)
            .map(|v| v.trim_matches([' ', '\t']))
            .filter(|v| !v.is_empty())
    };
    let partial = get("x-envoy-auth-partial-body");
    if partial.is_some_and(|v| v != "false") {
        return false;
    }
    if let Some(length) = get("content-length") {
        return length.parse::<u64>().ok() == Some(seen as u64);
    }
    let chunked =
        get("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if seen > 0 {
        partial == Some("false")
    } else {
        forwarded && !chunked
    }
}

/// The Check request mapping: bad input is a denial, every field handed on obeys the edge's
/// rules, a client's `x-envoy-auth-partial-body` never makes a body whole, and the decision never
/// allows what a reference decision (exact key, peer in the allowlist, reference HMAC over a
/// whole body inside the window) denies.
pub fn check_request(data: &[u8]) {
    let request = envoy_request(data);
    let forwarded = data.first().is_some_and(|b| b % 2 == 1);
    let bodies = if forwarded {
        ext_authz::BodyReport::Forwarded
    } else {
        ext_authz::BodyReport::Unknown
    };
    let Ok(question) = ext_authz::read(&request, bodies) else {
        return;
    };
    let http = request
        .attributes
        .as_ref()
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .unwrap();
    assert!(!question.key.is_empty());
    assert!(decision_io::check_api_key(question.key).is_ok());
    assert!(decision_io::check_method(&http.method).is_ok());
    assert!(decision_io::check_path(&http.path).is_ok());
    if let Some(signed) = question.signature {
        assert!(decision_io::check_nonce(signed.nonce).is_ok());
        assert!(decision_io::check_signature(signed.signature).is_ok());
        assert!(
            !signed.body_complete
                || reference_body_complete(&http.headers, signed.body.len(), forwarded),
            "a body taken as whole that the reference doubts"
        );
        // When Envoy forwarded no body, the header can only be the client's: its "false"
        // changes nothing.
        let mut without = request.clone();
        let mut forged = request.clone();
        for (copy, value) in [(&mut without, None), (&mut forged, Some("false"))] {
            let headers = &mut copy
                .attributes
                .as_mut()
                .unwrap()
                .request
                .as_mut()
                .unwrap()
                .http
                .as_mut()
                .unwrap()
                .headers;
            headers.remove("x-envoy-auth-partial-body");
            if let Some(value) = value {
                headers.insert("x-envoy-auth-partial-body".into(), value.into());
            }
        }
        let complete = |r: &CheckRequest| {
            ext_authz::read(r, bodies)
                .ok()
                .and_then(|q| q.signature)
                .map(|s| s.body_complete)
        };
        if signed.body.is_empty() {
            assert_eq!(
                complete(&forged),
                complete(&without),
                "partial-body: false decided"
            );
        }
    }

    let client_ip = TrustedProxies::none().resolve(&question.origin).ok();
    let engine = Engine {
        signature_window_secs: 300,
        require_nonce: false,
    };
    let snapshot = snapshot();
    let ask = AuthzRequest {
        key: KeySelector::Presented(question.key),
        client_ip,
        signature: question.signature,
    };
    let decision = match engine.evaluate(&snapshot, &ask, NOW, Mode::Enforce) {
        Evaluation::Decided(decision) => decision,
        Evaluation::NonceRequired(pending) => pending.settle_locally(&NonceLedger::default()),
    };
    if decision.verdict != Verdict::Allow {
        return;
    }
    let peer = IpAddr::from_str(question.origin.peer).map(folded);
    let in_allowlist = peer.is_ok_and(|ip| {
        "203.0.113.0/24"
            .parse::<ipnet::IpNet>()
            .unwrap()
            .contains(&ip)
    });
    assert!(in_allowlist, "allowed from {:?}", question.origin.peer);
    match question.key {
        OPEN_KEY => {}
        SIGNING_KEY => {
            let signed = question.signature.expect("a signing key allowed unsigned");
            assert!(reference_body_complete(
                &http.headers,
                signed.body.len(),
                forwarded
            ));
            let at = UnixMillis::from_secs(signed.timestamp);
            assert!(at.0 >= NOW.0 - 300_000 && at.0 <= NOW.0 + 300_000);
            let reference = reference_hmac(&reference_canonical(
                signed.timestamp,
                signed.nonce,
                signed.method,
                signed.path,
                signed.body,
            ));
            assert_eq!(
                base64::engine::general_purpose::STANDARD
                    .decode(signed.signature)
                    .ok(),
                base64::engine::general_purpose::STANDARD
                    .decode(reference)
                    .ok(),
                "allowed with a signature that is not the reference HMAC"
            );
        }
        other => panic!("allowed an unknown key {other:?}"),
    }
}
