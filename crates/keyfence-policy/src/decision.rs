//! The decision engine: snapshot + request + now → decision. Pure: no I/O, no clock of its own.
//!
//! Order, each step failing closed: parse the client IP, find the key by the SHA-256 of what was
//! presented, status and expiry, IP allowlist, signature (present, over a body that was seen whole,
//! timestamp window, then the signature, then a nonce when the key or the deployment requires
//! one), rate limit, and last the nonce's claim. The IP and signature checks are independent:
//! passing one never skips the other. The nonce is the one step that may need shared state (Redis,
//! across replicas), so the engine hands it back to the caller as a [`PendingNonce`] instead of
//! doing I/O itself. It comes after the rate limit so that a refused request never consumes its
//! nonce (the legitimate retry would be denied as a replay); a request refused at the claim
//! (a replay, a nonce store that cannot answer) gives its rate-limit place back.

use std::{fmt, sync::Arc};

use super::{
    allowlist::AllowMatch,
    ip::ClientIp,
    model::{Enforcement, KeyId, KeyStatus, SecretHash, UnixMillis},
    nonce::NonceLedger,
    signature::SignedRequest,
    snapshot::{CompiledKey, PolicySnapshot},
};

/// Why a request was (or, in report-only mode, would have been) denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyReason {
    UnknownKey,
    KeyDisabled,
    KeyRevoked,
    KeyExpired,
    InvalidClientIp,
    IpNotAllowed,
    SignatureMissing,
    SignatureInvalid,
    TimestampOutOfWindow,
    NonceReused,
    RateLimited,
    /// The key signs, and the request had a body the front end could not see (Envoy did not
    /// forward it, or truncated it): the signature cannot be checked.
    BodyNotForwarded,
    /// The key (or the deployment) requires a nonce and the signed request carried none.
    NonceMissing,
}

impl DenyReason {
    pub const ALL: [DenyReason; 13] = [
        DenyReason::UnknownKey,
        DenyReason::KeyDisabled,
        DenyReason::KeyRevoked,
        DenyReason::KeyExpired,
        DenyReason::InvalidClientIp,
        DenyReason::IpNotAllowed,
        DenyReason::SignatureMissing,
        DenyReason::SignatureInvalid,
        DenyReason::TimestampOutOfWindow,
        DenyReason::NonceReused,
        DenyReason::RateLimited,
        DenyReason::BodyNotForwarded,
        DenyReason::NonceMissing,
    ];

    /// A stable snake_case name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::UnknownKey => "unknown_key",
            DenyReason::KeyDisabled => "key_disabled",
            DenyReason::KeyRevoked => "key_revoked",
            DenyReason::KeyExpired => "key_expired",
            DenyReason::InvalidClientIp => "invalid_client_ip",
            DenyReason::IpNotAllowed => "ip_not_allowed",
            DenyReason::SignatureMissing => "signature_missing",
            DenyReason::SignatureInvalid => "signature_invalid",
            DenyReason::TimestampOutOfWindow => "timestamp_out_of_window",
            DenyReason::NonceReused => "nonce_reused",
            DenyReason::RateLimited => "rate_limited",
            DenyReason::BodyNotForwarded => "body_not_forwarded",
            DenyReason::NonceMissing => "nonce_missing",
        }
    }
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    Deny(DenyReason),
}

/// How the key is named.
#[derive(Debug, Clone, Copy)]
pub enum KeySelector<'a> {
    /// The secret as a partner presented it.
    Presented(&'a str),
    /// By id, for the admin dry run; the current secret is assumed.
    Id(&'a KeyId),
}

/// One question to the engine.
#[derive(Debug, Clone, Copy)]
pub struct AuthzRequest<'a> {
    pub key: KeySelector<'a>,
    /// The caller's address, parsed strictly at the edge (or resolved behind trusted proxies).
    /// `None` when the edge could not tell: denied as `InvalidClientIp`, never guessed.
    pub client_ip: Option<ClientIp>,
    /// `None` when the request carried no signature material at all.
    pub signature: Option<SignedRequest<'a>>,
}

/// Whether the decision may change state (nonces, rate-limit tokens) or is a dry run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    DryRun,
}

impl Mode {
    /// Whether a decision in this mode records its nonce and spends rate-limit tokens.
    pub fn consumes(self) -> bool {
        self == Mode::Enforce
    }
}

/// The answer, with everything logs and responses need.
#[derive(Clone)]
pub struct Decision {
    pub verdict: Verdict,
    /// In report-only mode, the IP check's denial that was not enforced.
    pub would_deny: Option<DenyReason>,
    pub key: Option<Arc<CompiledKey>>,
    pub client_ip: Option<ClientIp>,
    /// Whether the IP passed the allowlist (true when the allowlist is disabled).
    pub ip_allowed: bool,
    pub matched: Option<AllowMatch>,
    pub revision: u64,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        self.verdict == Verdict::Allow
    }

    /// The reason to report: the denial's, or the report-only would-deny's.
    pub fn reason(&self) -> Option<DenyReason> {
        match self.verdict {
            Verdict::Deny(reason) => Some(reason),
            Verdict::Allow => self.would_deny,
        }
    }

    fn deny(mut self, reason: DenyReason) -> Decision {
        self.verdict = Verdict::Deny(reason);
        self
    }
}

impl fmt::Debug for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Decision")
            .field("verdict", &self.verdict)
            .field("would_deny", &self.would_deny)
            .field("key", &self.key.as_ref().map(|k| &k.id))
            .field("client_ip", &self.client_ip)
            .field("ip_allowed", &self.ip_allowed)
            .field("matched", &self.matched)
            .field("revision", &self.revision)
            .finish()
    }
}

/// The engine's answer before the nonce step.
pub enum Evaluation<'a> {
    Decided(Decision),
    /// Everything passed so far; the nonce must be claimed (see [`PendingNonce::finish`]).
    NonceRequired(PendingNonce<'a>),
}

/// A decision waiting for its nonce to be claimed.
pub struct PendingNonce<'a> {
    decision: Decision,
    nonce: &'a str,
    forget_after: UnixMillis,
    now: UnixMillis,
    mode: Mode,
}

impl PendingNonce<'_> {
    pub fn key_id(&self) -> &KeyId {
        &self
            .decision
            .key
            .as_ref()
            .expect("a pending nonce has a key")
            .id
    }

    pub fn nonce(&self) -> &str {
        self.nonce
    }

    /// After this instant the timestamp window rejects a replay by itself.
    pub fn forget_after(&self) -> UnixMillis {
        self.forget_after
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Completes the decision once the caller knows whether the nonce was fresh.
    pub fn finish(self, fresh: bool) -> Decision {
        if !fresh {
            self.refund();
            return self.decision.deny(DenyReason::NonceReused);
        }
        self.decision
    }

    /// No decision could be had (the nonce store cannot answer): the request is refused without
    /// a verdict, so the rate-limit place it took is given back.
    pub fn abandon(self) {
        self.refund();
    }

    fn refund(&self) {
        if self.mode.consumes()
            && let Some(limiter) = self
                .decision
                .key
                .as_ref()
                .and_then(|key| key.rate_limiter.as_ref())
        {
            limiter.refund();
        }
    }

    /// Claims the nonce in an in-process ledger and completes the decision: what a single replica
    /// runs, and what a shared store falls back to when so configured.
    pub fn settle_locally(self, ledger: &NonceLedger) -> Decision {
        let fresh = ledger.claim(
            self.key_id(),
            self.nonce,
            self.forget_after,
            self.now,
            self.mode.consumes(),
        );
        self.finish(fresh)
    }
}

/// Settings the engine decides with. Their defaults live with the rest of the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Engine {
    /// How far a signed timestamp may be from now, either way.
    pub signature_window_secs: i64,
    /// Every signing key requires a nonce, whatever its own setting.
    pub require_nonce: bool,
}

impl Engine {
    /// Decides everything but the nonce.
    pub fn evaluate<'a>(
        &self,
        snapshot: &PolicySnapshot,
        request: &AuthzRequest<'a>,
        now: UnixMillis,
        mode: Mode,
    ) -> Evaluation<'a> {
        let mut decision = Decision {
            verdict: Verdict::Allow,
            would_deny: None,
            key: None,
            client_ip: None,
            ip_allowed: false,
            matched: None,
            revision: snapshot.revision(),
        };

        let Some(client_ip) = request.client_ip else {
            return Evaluation::Decided(decision.deny(DenyReason::InvalidClientIp));
        };
        decision.client_ip = Some(client_ip);

        let (key, presented_hash) = match request.key {
            KeySelector::Presented(secret) => {
                let hash = SecretHash::of(secret);
                (snapshot.key_by_hash(&hash), Some(hash))
            }
            KeySelector::Id(id) => (snapshot.key_by_id(id), None),
        };
        let Some(key) = key else {
            return Evaluation::Decided(decision.deny(DenyReason::UnknownKey));
        };
        decision.key = Some(key.clone());

        if let Some(reason) = status_denial(key, presented_hash, now) {
            return Evaluation::Decided(decision.deny(reason));
        }

        if key.ip_allowlist_enabled {
            decision.matched = key.allowlist.lookup(client_ip, now);
            decision.ip_allowed = decision.matched.is_some();
            if !decision.ip_allowed {
                match key.enforcement {
                    Enforcement::Enforce => {
                        return Evaluation::Decided(decision.deny(DenyReason::IpNotAllowed));
                    }
                    Enforcement::ReportOnly => decision.would_deny = Some(DenyReason::IpNotAllowed),
                }
            }
        } else {
            decision.ip_allowed = true;
        }

        if key.requires_signature {
            let signed = match request.signature {
                Some(signed) if !signed.signature.is_empty() => signed,
                _ => return Evaluation::Decided(decision.deny(DenyReason::SignatureMissing)),
            };
            if !signed.body_complete {
                return Evaluation::Decided(decision.deny(DenyReason::BodyNotForwarded));
            }
            let signed_at = UnixMillis::from_secs(signed.timestamp);
            let window = self.signature_window_secs;
            if signed_at < now.saturating_add_secs(-window)
                || signed_at > now.saturating_add_secs(window)
            {
                return Evaluation::Decided(decision.deny(DenyReason::TimestampOutOfWindow));
            }
            let verified = key.verifier.as_ref().is_some_and(|v| v.verify(&signed));
            if !verified {
                return Evaluation::Decided(decision.deny(DenyReason::SignatureInvalid));
            }
            if signed.nonce.is_empty() {
                if key.requires_nonce || self.require_nonce {
                    return Evaluation::Decided(decision.deny(DenyReason::NonceMissing));
                }
            } else {
                let decision = rate_limit(decision, now, mode);
                if !decision.is_allow() {
                    return Evaluation::Decided(decision);
                }
                return Evaluation::NonceRequired(PendingNonce {
                    decision,
                    nonce: signed.nonce,
                    forget_after: signed_at.saturating_add_secs(window + 1),
                    now,
                    mode,
                });
            }
        }

        Evaluation::Decided(rate_limit(decision, now, mode))
    }
}

fn status_denial(
    key: &CompiledKey,
    presented: Option<SecretHash>,
    now: UnixMillis,
) -> Option<DenyReason> {
    match key.status {
        KeyStatus::Revoked => return Some(DenyReason::KeyRevoked),
        KeyStatus::Disabled => return Some(DenyReason::KeyDisabled),
        KeyStatus::Active => {}
    }
    if key.expires_at.is_some_and(|expiry| now >= expiry) {
        return Some(DenyReason::KeyExpired);
    }
    let presented_previous = match (&key.previous_secret, presented) {
        (Some(previous), Some(hash)) if previous.hash == hash && hash != key.secret_hash => {
            Some(previous)
        }
        _ => None,
    };
    if presented_previous.is_some_and(|previous| now >= previous.valid_until) {
        return Some(DenyReason::KeyExpired);
    }
    None
}

fn rate_limit(decision: Decision, now: UnixMillis, mode: Mode) -> Decision {
    let limiter = decision
        .key
        .as_ref()
        .and_then(|key| key.rate_limiter.as_ref());
    match limiter {
        Some(limiter) if !limiter.admit(now.0.saturating_mul(1_000_000), mode.consumes()) => {
            decision.deny(DenyReason::RateLimited)
        }
        _ => decision,
    }
}

#[cfg(test)]
mod tests;
