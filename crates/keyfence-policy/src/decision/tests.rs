//! Every deny path of the engine, and the ways the checks must not bypass each other.

use base64::Engine as _;
use ed25519_dalek::{Signer, SigningKey};

use super::*;
use crate::{
    fixtures::{entry, record},
    model::{PartnerScope, PreviousSecret, RateLimit, SignatureScheme},
    signature::{canonical_string, sign_hmac},
    snapshot::KeyMaterial,
};

const NOW_SECS: i64 = 1_700_000_000;
const NOW: UnixMillis = UnixMillis(NOW_SECS * 1000);
const HMAC_SECRET: &[u8] = b"an hmac secret of thirty-two b..";

fn engine() -> Engine {
    Engine {
        signature_window_secs: 300,
        require_nonce: false,
    }
}

/// The whole decision as a single replica makes it: evaluate, then settle any nonce in the
/// in-process ledger (the path `keyfence`'s decision service runs for the embedded store).
trait DecideLocally {
    fn decide(
        &self,
        snapshot: &PolicySnapshot,
        request: &AuthzRequest<'_>,
        now: UnixMillis,
        mode: Mode,
        ledger: &NonceLedger,
    ) -> Decision;
}

impl DecideLocally for Engine {
    fn decide(
        &self,
        snapshot: &PolicySnapshot,
        request: &AuthzRequest<'_>,
        now: UnixMillis,
        mode: Mode,
        ledger: &NonceLedger,
    ) -> Decision {
        match self.evaluate(snapshot, request, now, mode) {
            Evaluation::Decided(decision) => decision,
            Evaluation::NonceRequired(pending) => pending.settle_locally(ledger),
        }
    }
}

fn snapshot_with(records: Vec<(crate::model::KeyRecord, Vec<&str>)>) -> PolicySnapshot {
    let keys = records.into_iter().map(|(record, cidrs)| KeyMaterial {
        record,
        entries: cidrs.into_iter().map(entry).collect(),
    });
    PolicySnapshot::build(7, keys, vec![])
}

fn ask<'a>(secret: &'a str, ip: &'a str, signature: Option<SignedRequest<'a>>) -> AuthzRequest<'a> {
    AuthzRequest {
        key: KeySelector::Presented(secret),
        client_ip: ip.parse().ok(),
        signature,
    }
}

fn decide(snapshot: &PolicySnapshot, request: &AuthzRequest<'_>, ledger: &NonceLedger) -> Decision {
    engine().decide(snapshot, request, NOW, Mode::Enforce, ledger)
}

fn reason(snapshot: &PolicySnapshot, request: &AuthzRequest<'_>) -> Option<DenyReason> {
    match decide(snapshot, request, &NonceLedger::default()).verdict {
        Verdict::Allow => None,
        Verdict::Deny(reason) => Some(reason),
    }
}

fn plain_key() -> PolicySnapshot {
    snapshot_with(vec![(
        record("key_a", "acme", "production", "secret-a"),
        vec!["203.0.113.0/24", "2001:db8::/32"],
    )])
}

fn hmac_key() -> PolicySnapshot {
    let mut r = record("key_h", "acme", "production", "secret-h");
    r.signature = SignatureScheme::HmacSha256 {
        secret: HMAC_SECRET.to_vec(),
    };
    snapshot_with(vec![(r, vec!["203.0.113.0/24"])])
}

fn ed25519_signer() -> SigningKey {
    SigningKey::from_bytes(&[42u8; 32])
}

fn ed25519_key() -> PolicySnapshot {
    let mut r = record("key_e", "acme", "production", "secret-e");
    r.signature = SignatureScheme::Ed25519 {
        public_key: ed25519_signer().verifying_key().to_bytes(),
    };
    snapshot_with(vec![(r, vec!["203.0.113.0/24"])])
}

fn signed<'a>(
    signature: &'a str,
    timestamp: i64,
    nonce: &'a str,
    body: &'a [u8],
) -> SignedRequest<'a> {
    SignedRequest {
        signature,
        timestamp,
        nonce,
        method: "POST",
        path: "/v1/payments",
        body,
        body_complete: true,
    }
}

#[test]
fn allows_listed_ipv4_and_reports_the_match() {
    let snapshot = plain_key();
    let decision = decide(
        &snapshot,
        &ask("secret-a", "203.0.113.5", None),
        &NonceLedger::default(),
    );
    assert!(decision.is_allow(), "{decision:?}");
    assert_eq!(decision.matched.unwrap().cidr.to_string(), "203.0.113.0/24");
    assert_eq!(decision.key.as_ref().unwrap().id.as_str(), "key_a");
    assert_eq!(decision.revision, 7);
    assert_eq!(decision.reason(), None);
}

#[test]
fn allows_listed_ipv6_and_mapped_ipv4() {
    let snapshot = plain_key();
    assert_eq!(
        reason(&snapshot, &ask("secret-a", "2001:db8:5::1", None)),
        None
    );
    assert_eq!(
        reason(&snapshot, &ask("secret-a", "::ffff:203.0.113.5", None)),
        None
    );
    assert_eq!(
        reason(&snapshot, &ask("secret-a", "::ffff:198.51.100.5", None)),
        Some(DenyReason::IpNotAllowed)
    );
}

#[test]
fn unknown_key() {
    assert_eq!(
        reason(&plain_key(), &ask("nope", "203.0.113.5", None)),
        Some(DenyReason::UnknownKey)
    );
    assert_eq!(
        reason(&plain_key(), &ask("", "203.0.113.5", None)),
        Some(DenyReason::UnknownKey)
    );
}

#[test]
fn unloaded_snapshot_denies_everything() {
    assert_eq!(
        reason(
            &PolicySnapshot::unloaded(),
            &ask("secret-a", "203.0.113.5", None)
        ),
        Some(DenyReason::UnknownKey)
    );
}

#[test]
fn disabled_revoked_and_expired_keys() {
    let mut disabled = record("key_d", "acme", "production", "d");
    disabled.status = KeyStatus::Disabled;
    let mut revoked = record("key_r", "acme", "production", "r");
    revoked.status = KeyStatus::Revoked;
    let mut expired = record("key_x", "acme", "production", "x");
    expired.expires_at = Some(NOW);
    let mut not_yet = record("key_y", "acme", "production", "y");
    not_yet.expires_at = Some(UnixMillis(NOW.0 + 1));
    let snapshot = snapshot_with(vec![
        (disabled, vec!["0.0.0.0/0"]),
        (revoked, vec!["0.0.0.0/0"]),
        (expired, vec!["0.0.0.0/0"]),
        (not_yet, vec!["0.0.0.0/0"]),
    ]);
    assert_eq!(
        reason(&snapshot, &ask("d", "10.0.0.1", None)),
        Some(DenyReason::KeyDisabled)
    );
    assert_eq!(
        reason(&snapshot, &ask("r", "10.0.0.1", None)),
        Some(DenyReason::KeyRevoked)
    );
    assert_eq!(
        reason(&snapshot, &ask("x", "10.0.0.1", None)),
        Some(DenyReason::KeyExpired)
    );
    assert_eq!(reason(&snapshot, &ask("y", "10.0.0.1", None)), None);
}

#[test]
fn invalid_client_ips() {
    let snapshot = plain_key();
    for bad in [
        "",
        "203.0.113.005",
        "0x7f.0.0.1",
        "fe80::1%eth0",
        "203.0.113.5:443",
        "localhost",
        "203.0.113.0/24",
    ] {
        assert_eq!(
            reason(&snapshot, &ask("secret-a", bad, None)),
            Some(DenyReason::InvalidClientIp),
            "{bad:?}"
        );
    }
}

#[test]
fn ip_not_allowed() {
    let snapshot = plain_key();
    assert_eq!(
        reason(&snapshot, &ask("secret-a", "203.0.114.5", None)),
        Some(DenyReason::IpNotAllowed)
    );
    assert_eq!(
        reason(&snapshot, &ask("secret-a", "2001:db9::1", None)),
        Some(DenyReason::IpNotAllowed)
    );
}

#[test]
fn empty_allowlist_denies_when_enabled_and_allows_when_disabled() {
    let enabled = record("key_a", "acme", "production", "a");
    let mut disabled = record("key_b", "acme", "production", "b");
    disabled.ip_allowlist_enabled = false;
    let snapshot = snapshot_with(vec![(enabled, vec![]), (disabled, vec![])]);
    assert_eq!(
        reason(&snapshot, &ask("a", "10.0.0.1", None)),
        Some(DenyReason::IpNotAllowed)
    );
    let decision = decide(
        &snapshot,
        &ask("b", "10.0.0.1", None),
        &NonceLedger::default(),
    );
    assert!(decision.is_allow());
    assert!(decision.ip_allowed);
    assert!(decision.matched.is_none());
}

#[test]
fn report_only_allows_but_reports_the_ip_denial() {
    let mut r = record("key_a", "acme", "production", "a");
    r.enforcement = Enforcement::ReportOnly;
    let snapshot = snapshot_with(vec![(r, vec!["203.0.113.0/24"])]);
    let decision = decide(
        &snapshot,
        &ask("a", "198.51.100.1", None),
        &NonceLedger::default(),
    );
    assert!(decision.is_allow());
    assert_eq!(decision.would_deny, Some(DenyReason::IpNotAllowed));
    assert_eq!(decision.reason(), Some(DenyReason::IpNotAllowed));
    let listed = decide(
        &snapshot,
        &ask("a", "203.0.113.1", None),
        &NonceLedger::default(),
    );
    assert!(listed.is_allow());
    assert_eq!(listed.would_deny, None);
}

#[test]
fn report_only_does_not_soften_status_or_signature() {
    let mut revoked = record("key_r", "acme", "production", "r");
    revoked.enforcement = Enforcement::ReportOnly;
    revoked.status = KeyStatus::Revoked;
    let mut signed_key = record("key_s", "acme", "production", "s");
    signed_key.enforcement = Enforcement::ReportOnly;
    signed_key.signature = SignatureScheme::HmacSha256 {
        secret: HMAC_SECRET.to_vec(),
    };
    let snapshot = snapshot_with(vec![(revoked, vec![]), (signed_key, vec![])]);
    assert_eq!(
        reason(&snapshot, &ask("r", "10.0.0.1", None)),
        Some(DenyReason::KeyRevoked)
    );
    assert_eq!(
        reason(&snapshot, &ask("s", "10.0.0.1", None)),
        Some(DenyReason::SignatureMissing)
    );
}

#[test]
fn hmac_valid_tampered_stale_and_reused() {
    let snapshot = hmac_key();
    let ledger = NonceLedger::default();
    let good = sign_hmac(
        HMAC_SECRET,
        NOW_SECS,
        "n-1",
        "POST",
        "/v1/payments",
        b"{\"amount\":100}",
    );
    let ok = decide(
        &snapshot,
        &ask(
            "secret-h",
            "203.0.113.9",
            Some(signed(&good, NOW_SECS, "n-1", b"{\"amount\":100}")),
        ),
        &ledger,
    );
    assert!(ok.is_allow(), "{ok:?}");
    let tampered = decide(
        &snapshot,
        &ask(
            "secret-h",
            "203.0.113.9",
            Some(signed(&good, NOW_SECS, "n-1", b"{\"amount\":999}")),
        ),
        &ledger,
    );
    assert_eq!(
        tampered.verdict,
        Verdict::Deny(DenyReason::SignatureInvalid)
    );
    let reused = decide(
        &snapshot,
        &ask(
            "secret-h",
            "203.0.113.9",
            Some(signed(&good, NOW_SECS, "n-1", b"{\"amount\":100}")),
        ),
        &ledger,
    );
    assert_eq!(reused.verdict, Verdict::Deny(DenyReason::NonceReused));

    let stale_ts = NOW_SECS - 301;
    let stale = sign_hmac(HMAC_SECRET, stale_ts, "n-2", "POST", "/v1/payments", b"");
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-h",
                "203.0.113.9",
                Some(signed(&stale, stale_ts, "n-2", b""))
            )
        ),
        Some(DenyReason::TimestampOutOfWindow)
    );
    let future_ts = NOW_SECS + 301;
    let future = sign_hmac(HMAC_SECRET, future_ts, "n-3", "POST", "/v1/payments", b"");
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-h",
                "203.0.113.9",
                Some(signed(&future, future_ts, "n-3", b""))
            )
        ),
        Some(DenyReason::TimestampOutOfWindow)
    );
    let edge_ts = NOW_SECS - 300;
    let edge = sign_hmac(HMAC_SECRET, edge_ts, "", "POST", "/v1/payments", b"");
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-h",
                "203.0.113.9",
                Some(signed(&edge, edge_ts, "", b""))
            )
        ),
        None
    );
}

#[test]
fn signature_missing() {
    let snapshot = hmac_key();
    assert_eq!(
        reason(&snapshot, &ask("secret-h", "203.0.113.9", None)),
        Some(DenyReason::SignatureMissing)
    );
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-h",
                "203.0.113.9",
                Some(signed("", NOW_SECS, "", b""))
            )
        ),
        Some(DenyReason::SignatureMissing)
    );
}

#[test]
fn a_body_the_front_end_did_not_see_is_a_denial_not_a_pass() {
    let snapshot = hmac_key();
    // Signed over an empty body, as if the body Envoy did not forward were empty: the signature
    // itself verifies, so only the completeness flag stands between it and an allow.
    let over_empty = sign_hmac(HMAC_SECRET, NOW_SECS, "", "POST", "/v1/payments", b"");
    let mut incomplete = signed(&over_empty, NOW_SECS, "", b"");
    incomplete.body_complete = false;
    assert_eq!(
        reason(&snapshot, &ask("secret-h", "203.0.113.9", Some(incomplete))),
        Some(DenyReason::BodyNotForwarded)
    );
    incomplete.body_complete = true;
    assert_eq!(
        reason(&snapshot, &ask("secret-h", "203.0.113.9", Some(incomplete))),
        None
    );
    // The IP check still comes first, and no signature at all is still SIGNATURE_MISSING.
    incomplete.body_complete = false;
    assert_eq!(
        reason(
            &snapshot,
            &ask("secret-h", "198.51.100.1", Some(incomplete))
        ),
        Some(DenyReason::IpNotAllowed)
    );
    let mut unsigned = signed("", NOW_SECS, "", b"");
    unsigned.body_complete = false;
    assert_eq!(
        reason(&snapshot, &ask("secret-h", "203.0.113.9", Some(unsigned))),
        Some(DenyReason::SignatureMissing)
    );
    // A key that does not sign does not care whether the body was seen.
    assert_eq!(
        reason(
            &plain_key(),
            &ask("secret-a", "203.0.113.9", Some(incomplete))
        ),
        None
    );
}

#[test]
fn ip_and_signature_are_independent() {
    let snapshot = hmac_key();
    let good = sign_hmac(HMAC_SECRET, NOW_SECS, "", "POST", "/v1/payments", b"");
    // A valid signature does not admit an unlisted IP.
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-h",
                "198.51.100.1",
                Some(signed(&good, NOW_SECS, "", b""))
            )
        ),
        Some(DenyReason::IpNotAllowed)
    );
    // A listed IP does not admit a bad signature.
    let bad = sign_hmac(b"wrong", NOW_SECS, "", "POST", "/v1/payments", b"");
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-h",
                "203.0.113.9",
                Some(signed(&bad, NOW_SECS, "", b""))
            )
        ),
        Some(DenyReason::SignatureInvalid)
    );
}

#[test]
fn ed25519_valid_tampered_stale_and_reused() {
    let snapshot = ed25519_key();
    let ledger = NonceLedger::default();
    let sign = |ts: i64, nonce: &str, body: &[u8]| {
        let message = canonical_string(ts, nonce, "POST", "/v1/payments", body);
        base64::engine::general_purpose::STANDARD.encode(ed25519_signer().sign(&message).to_bytes())
    };
    let good = sign(NOW_SECS, "n-1", b"body");
    let request = ask(
        "secret-e",
        "203.0.113.9",
        Some(signed(&good, NOW_SECS, "n-1", b"body")),
    );
    assert!(decide(&snapshot, &request, &ledger).is_allow());
    assert_eq!(
        decide(&snapshot, &request, &ledger).verdict,
        Verdict::Deny(DenyReason::NonceReused)
    );
    let tampered = ask(
        "secret-e",
        "203.0.113.9",
        Some(signed(&good, NOW_SECS, "n-1", b"BODY")),
    );
    assert_eq!(
        reason(&snapshot, &tampered),
        Some(DenyReason::SignatureInvalid)
    );
    let stale_ts = NOW_SECS - 1000;
    let stale = sign(stale_ts, "n-4", b"");
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-e",
                "203.0.113.9",
                Some(signed(&stale, stale_ts, "n-4", b""))
            )
        ),
        Some(DenyReason::TimestampOutOfWindow)
    );
    // An HMAC-style signature is no Ed25519 signature.
    let hmac = sign_hmac(HMAC_SECRET, NOW_SECS, "", "POST", "/v1/payments", b"");
    assert_eq!(
        reason(
            &snapshot,
            &ask(
                "secret-e",
                "203.0.113.9",
                Some(signed(&hmac, NOW_SECS, "", b""))
            )
        ),
        Some(DenyReason::SignatureInvalid)
    );
}

#[test]
fn unusable_key_material_denies_signed_requests() {
    let bad_point = (0u8..=255)
        .map(|b| [b; 32])
        .find(|bytes| ed25519_dalek::VerifyingKey::from_bytes(bytes).is_err())
        .unwrap();
    let mut r = record("key_e", "acme", "production", "e");
    r.signature = SignatureScheme::Ed25519 {
        public_key: bad_point,
    };
    let snapshot = snapshot_with(vec![(r, vec!["0.0.0.0/0"])]);
    let sig = base64::engine::general_purpose::STANDARD.encode([0u8; 64]);
    assert_eq!(
        reason(
            &snapshot,
            &ask("e", "10.0.0.1", Some(signed(&sig, NOW_SECS, "", b"")))
        ),
        Some(DenyReason::SignatureInvalid)
    );
}

#[test]
fn rate_limited() {
    let mut r = record("key_a", "acme", "production", "a");
    r.rate_limit = Some(RateLimit {
        requests_per_second: 1,
        burst: 2,
    });
    let snapshot = snapshot_with(vec![(r, vec!["0.0.0.0/0"])]);
    let ledger = NonceLedger::default();
    let request = ask("a", "10.0.0.1", None);
    assert!(decide(&snapshot, &request, &ledger).is_allow());
    assert!(decide(&snapshot, &request, &ledger).is_allow());
    assert_eq!(
        decide(&snapshot, &request, &ledger).verdict,
        Verdict::Deny(DenyReason::RateLimited)
    );
    // A denied IP does not consume the key's rate.
    assert_eq!(
        reason(&snapshot, &ask("a", "not-an-ip", None)),
        Some(DenyReason::InvalidClientIp)
    );
}

fn nonce_key(require_nonce: bool, rate: Option<RateLimit>) -> PolicySnapshot {
    let mut r = record("key_h", "acme", "production", "h");
    r.signature = SignatureScheme::HmacSha256 {
        secret: HMAC_SECRET.to_vec(),
    };
    r.require_nonce = require_nonce;
    r.rate_limit = rate;
    snapshot_with(vec![(r, vec!["0.0.0.0/0"])])
}

#[test]
fn a_key_or_deployment_that_requires_a_nonce_denies_a_request_without_one() {
    let without = sign_hmac(HMAC_SECRET, NOW_SECS, "", "POST", "/v1/payments", b"");
    let with = sign_hmac(HMAC_SECRET, NOW_SECS, "n-1", "POST", "/v1/payments", b"");
    let bare = ask("h", "10.0.0.1", Some(signed(&without, NOW_SECS, "", b"")));
    let carried = ask("h", "10.0.0.1", Some(signed(&with, NOW_SECS, "n-1", b"")));
    // Optional by default: the replayable request is allowed, as before.
    let optional = nonce_key(false, None);
    assert_eq!(reason(&optional, &bare), None);
    // Required by the key.
    let required = nonce_key(true, None);
    assert_eq!(reason(&required, &bare), Some(DenyReason::NonceMissing));
    assert_eq!(reason(&required, &carried), None);
    // Required by the deployment, for every signing key.
    let strict = Engine {
        require_nonce: true,
        ..engine()
    };
    let ledger = NonceLedger::default();
    assert_eq!(
        strict
            .decide(&optional, &bare, NOW, Mode::Enforce, &ledger)
            .verdict,
        Verdict::Deny(DenyReason::NonceMissing)
    );
    assert!(
        strict
            .decide(&optional, &carried, NOW, Mode::Enforce, &ledger)
            .is_allow()
    );
    // A bad signature is still reported as such: the nonce rule comes after it.
    let forged = ask("h", "10.0.0.1", Some(signed("AAAA", NOW_SECS, "", b"")));
    assert_eq!(
        reason(&required, &forged),
        Some(DenyReason::SignatureInvalid)
    );
    // Keys that do not sign are not asked for one.
    assert_eq!(
        strict
            .decide(
                &plain_key(),
                &ask("secret-a", "203.0.113.5", None),
                NOW,
                Mode::Enforce,
                &ledger
            )
            .verdict,
        Verdict::Allow
    );
}

#[test]
fn a_rate_limited_request_does_not_consume_its_nonce_and_a_replay_costs_no_rate() {
    let snapshot = nonce_key(
        false,
        Some(RateLimit {
            requests_per_second: 1,
            burst: 1,
        }),
    );
    let ledger = NonceLedger::default();
    let request = |signature: &'static str, nonce: &'static str| {
        ask(
            "h",
            "10.0.0.1",
            Some(signed(signature, NOW_SECS, nonce, b"")),
        )
    };
    let first = sign_hmac(HMAC_SECRET, NOW_SECS, "n-1", "POST", "/v1/payments", b"");
    let second = sign_hmac(HMAC_SECRET, NOW_SECS, "n-2", "POST", "/v1/payments", b"");
    let (first, second): (&'static str, &'static str) = (first.leak(), second.leak());
    assert!(decide(&snapshot, &request(first, "n-1"), &ledger).is_allow());
    assert_eq!(
        decide(&snapshot, &request(second, "n-2"), &ledger).verdict,
        Verdict::Deny(DenyReason::RateLimited)
    );
    // A second later the same request passes: the refusal did not burn n-2.
    let later = UnixMillis(NOW.0 + 1000);
    assert!(
        engine()
            .decide(
                &snapshot,
                &request(second, "n-2"),
                later,
                Mode::Enforce,
                &ledger
            )
            .is_allow()
    );
    // Two seconds later, a replay is refused as such and takes no place: the next fresh request
    // still gets the one the second holds.
    let even_later = UnixMillis(NOW.0 + 2000);
    assert_eq!(
        engine()
            .decide(
                &snapshot,
                &request(first, "n-1"),
                even_later,
                Mode::Enforce,
                &ledger
            )
            .verdict,
        Verdict::Deny(DenyReason::NonceReused)
    );
    let third = sign_hmac(HMAC_SECRET, NOW_SECS, "n-3", "POST", "/v1/payments", b"").leak();
    assert!(
        engine()
            .decide(
                &snapshot,
                &request(third, "n-3"),
                even_later,
                Mode::Enforce,
                &ledger
            )
            .is_allow()
    );
}

#[test]
fn dry_run_consumes_neither_nonce_nor_rate() {
    let mut r = record("key_h", "acme", "production", "h");
    r.signature = SignatureScheme::HmacSha256 {
        secret: HMAC_SECRET.to_vec(),
    };
    r.rate_limit = Some(RateLimit {
        requests_per_second: 1,
        burst: 1,
    });
    let snapshot = snapshot_with(vec![(r, vec!["0.0.0.0/0"])]);
    let ledger = NonceLedger::default();
    let good = sign_hmac(HMAC_SECRET, NOW_SECS, "n-1", "POST", "/v1/payments", b"");
    let request = ask("h", "10.0.0.1", Some(signed(&good, NOW_SECS, "n-1", b"")));
    for _ in 0..3 {
        assert!(
            engine()
                .decide(&snapshot, &request, NOW, Mode::DryRun, &ledger)
                .is_allow()
        );
    }
    assert!(ledger.is_empty());
    assert!(decide(&snapshot, &request, &ledger).is_allow());
    // The rate limit comes before the nonce's claim: at once the key is out of budget, a second
    // later the dry run sees the replay.
    assert_eq!(
        engine()
            .decide(&snapshot, &request, NOW, Mode::DryRun, &ledger)
            .verdict,
        Verdict::Deny(DenyReason::RateLimited)
    );
    assert_eq!(
        engine()
            .decide(
                &snapshot,
                &request,
                UnixMillis(NOW.0 + 1000),
                Mode::DryRun,
                &ledger
            )
            .verdict,
        Verdict::Deny(DenyReason::NonceReused)
    );
}

#[test]
fn rotation_grace_keeps_the_old_secret_until_it_ends() {
    let mut r = record("key_a", "acme", "production", "new-secret");
    r.previous_secret = Some(PreviousSecret {
        hash: SecretHash::of("old-secret"),
        valid_until: UnixMillis(NOW.0 + 1000),
    });
    let snapshot = snapshot_with(vec![(r, vec!["0.0.0.0/0"])]);
    let ledger = NonceLedger::default();
    let old = ask("old-secret", "10.0.0.1", None);
    assert!(decide(&snapshot, &old, &ledger).is_allow());
    let after = engine().decide(
        &snapshot,
        &old,
        UnixMillis(NOW.0 + 1000),
        Mode::Enforce,
        &ledger,
    );
    assert_eq!(after.verdict, Verdict::Deny(DenyReason::KeyExpired));
    let new = engine().decide(
        &snapshot,
        &ask("new-secret", "10.0.0.1", None),
        UnixMillis(NOW.0 + 1000),
        Mode::Enforce,
        &ledger,
    );
    assert!(new.is_allow());
}

#[test]
fn partner_entries_apply_to_the_partner_keys_in_one_environment() {
    let prod = record("key_p", "acme", "production", "p");
    let sandbox = record("key_s", "acme", "sandbox", "s");
    let partner = vec![(
        PartnerScope {
            partner_id: "acme".parse().unwrap(),
            environment: "production".parse().unwrap(),
        },
        vec![entry("192.0.2.0/24")],
    )];
    let snapshot = PolicySnapshot::build(
        1,
        vec![
            KeyMaterial {
                record: prod,
                entries: vec![],
            },
            KeyMaterial {
                record: sandbox,
                entries: vec![],
            },
        ],
        partner,
    );
    let decision = decide(
        &snapshot,
        &ask("p", "192.0.2.7", None),
        &NonceLedger::default(),
    );
    assert!(decision.is_allow());
    assert_eq!(
        decision.matched.unwrap().source,
        crate::allowlist::EntrySource::Partner
    );
    assert_eq!(
        reason(&snapshot, &ask("s", "192.0.2.7", None)),
        Some(DenyReason::IpNotAllowed)
    );
}

#[test]
fn check_by_key_id() {
    let snapshot = plain_key();
    let id: KeyId = "key_a".parse().unwrap();
    let request = AuthzRequest {
        key: KeySelector::Id(&id),
        client_ip: "203.0.113.1".parse().ok(),
        signature: None,
    };
    assert!(
        engine()
            .decide(
                &snapshot,
                &request,
                NOW,
                Mode::DryRun,
                &NonceLedger::default()
            )
            .is_allow()
    );
    let missing: KeyId = "key_zz".parse().unwrap();
    let request = AuthzRequest {
        key: KeySelector::Id(&missing),
        client_ip: "203.0.113.1".parse().ok(),
        signature: None,
    };
    assert_eq!(
        engine()
            .decide(
                &snapshot,
                &request,
                NOW,
                Mode::DryRun,
                &NonceLedger::default()
            )
            .verdict,
        Verdict::Deny(DenyReason::UnknownKey)
    );
}

#[test]
fn every_deny_reason_has_a_distinct_name() {
    let names: std::collections::HashSet<_> = DenyReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(names.len(), DenyReason::ALL.len());
}
