//! Domain types shared by the engine, the store and the gRPC edge.
//!
//! Each identifier is a newtype that can only be built by validating it, so that code inside the
//! edge never re-checks. This module knows nothing of protobuf, tonic or the disk; serde is here
//! only so that the stores can persist records without a second set of types.

use std::{fmt, str::FromStr, time::SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ip::Cidr, random::RandomSource};

/// Wall-clock time as milliseconds since the Unix epoch: what expiries and audit fields use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct UnixMillis(pub i64);

impl UnixMillis {
    /// Converts a wall-clock instant; times before the epoch become 0. This crate never reads the
    /// clock itself: callers hand in what their [`crate::clock::Clock`] says.
    pub fn from_system_time(at: SystemTime) -> UnixMillis {
        let since_epoch = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(i64::try_from(since_epoch.as_millis()).unwrap_or(i64::MAX))
    }

    pub fn from_secs(secs: i64) -> UnixMillis {
        UnixMillis(secs.saturating_mul(1000))
    }

    pub fn as_secs(self) -> i64 {
        self.0.div_euclid(1000)
    }

    pub fn saturating_add_secs(self, secs: i64) -> UnixMillis {
        UnixMillis(self.0.saturating_add(secs.saturating_mul(1000)))
    }
}

/// Why an identifier was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {max} characters")]
    TooLong { max: usize },
    #[error("may contain only {allowed}")]
    BadCharacter { allowed: &'static str },
}

fn validate_id(
    text: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if text.is_empty() {
        return Err(IdError::Empty);
    }
    if text.chars().count() > max {
        return Err(IdError::TooLong { max });
    }
    if !text.chars().all(ok) {
        return Err(IdError::BadCharacter { allowed });
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, max = $max:expr, allowed = $allowed:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(text: &str) -> Result<Self, IdError> {
                validate_id(text, $max, $allowed, $ok)?;
                Ok($name(text.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(text: String) -> Result<Self, IdError> {
                validate_id(&text, $max, $allowed, $ok)?;
                Ok($name(text))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_id!(
    /// A key's public identifier ("key_…"), safe to log.
    KeyId,
    max = 64,
    allowed = "ASCII letters, digits and '_'",
    |c: char| c.is_ascii_alphanumeric() || c == '_'
);
string_id!(
    /// The partner a key belongs to, chosen by the operator ("acme-payments").
    PartnerId,
    max = 64,
    allowed = "ASCII letters, digits, '.', '_' and '-'",
    |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
);
string_id!(
    /// A deployment environment ("production", "sandbox"); which ones exist is configuration,
    /// checked at the edge.
    Environment,
    max = 32,
    allowed = "lowercase ASCII letters, digits and '-'",
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'
);

/// The environments this deployment serves; keys and partner lists exist only in these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Environments(Vec<Environment>);

impl Environments {
    pub fn new(environments: Vec<Environment>) -> Environments {
        Environments(environments)
    }

    /// Parses `text` and checks that it is configured.
    pub fn parse(&self, text: &str) -> Result<Environment, String> {
        let environment: Environment = text.parse().map_err(|e: IdError| e.to_string())?;
        if self.0.contains(&environment) {
            Ok(environment)
        } else {
            Err(format!(
                "{text:?} is not a configured environment ({})",
                self.names().join(", ")
            ))
        }
    }

    pub fn names(&self) -> Vec<&str> {
        self.0.iter().map(|e| e.as_str()).collect()
    }
}

impl KeyId {
    /// A fresh random identifier.
    pub fn generate(random: &dyn RandomSource) -> KeyId {
        KeyId(format!("key_{}", random.token(20)))
    }
}

/// SHA-256 of a presented API key: the only form in which keys are stored or looked up.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct SecretHash([u8; 32]);

impl SecretHash {
    pub fn of(presented_key: &str) -> SecretHash {
        SecretHash(Sha256::digest(presented_key.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for SecretHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretHash({})", hex::encode(&self.0[..4]))
    }
}

impl From<SecretHash> for String {
    fn from(hash: SecretHash) -> String {
        hex::encode(hash.0)
    }
}

impl TryFrom<String> for SecretHash {
    type Error = hex::FromHexError;
    fn try_from(text: String) -> Result<Self, Self::Error> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes)?;
        Ok(SecretHash(bytes))
    }
}

/// A newly minted API key: the text shown once, and what is stored of it.
pub struct MintedSecret {
    pub full: String,
    pub hash: SecretHash,
    pub display_prefix: String,
}

impl MintedSecret {
    /// `kf_live_…` for production, `kf_test_…` for sandbox, `kf_<env>_…` otherwise; 40 random
    /// characters (about 206 bits) after the prefix.
    pub fn generate(environment: &Environment, random: &dyn RandomSource) -> MintedSecret {
        let tag = match environment.as_str() {
            "production" => "live",
            "sandbox" => "test",
            other => other,
        };
        let full = format!("kf_{tag}_{}", random.token(40));
        let display_prefix = full[..full.len() - 36].to_owned();
        MintedSecret {
            hash: SecretHash::of(&full),
            display_prefix,
            full,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    Active,
    Disabled,
    Revoked,
}

/// Whether a failed IP check blocks (`Enforce`) or is only reported (`ReportOnly`), so that an
/// operator can switch on a new allowlist and watch what it would block first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    Enforce,
    ReportOnly,
}

/// How requests made with a key must be signed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "snake_case")]
pub enum SignatureScheme {
    None,
    /// Server-generated secret; keyfence must keep it to verify.
    HmacSha256 {
        #[serde(with = "hex::serde")]
        secret: Vec<u8>,
    },
    /// The partner's public key; the private key never leaves the partner.
    Ed25519 {
        #[serde(with = "hex::serde")]
        public_key: [u8; 32],
    },
}

impl fmt::Debug for SignatureScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SignatureScheme::None => f.write_str("None"),
            SignatureScheme::HmacSha256 { .. } => f.write_str("HmacSha256 { secret: <redacted> }"),
            SignatureScheme::Ed25519 { public_key } => {
                write!(f, "Ed25519 {{ public_key: {} }}", hex::encode(public_key))
            }
        }
    }
}

/// A per-key, per-replica request rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    pub requests_per_second: u32,
    pub burst: u32,
}

/// A secret replaced by rotation that keeps working until `valid_until`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousSecret {
    pub hash: SecretHash,
    pub valid_until: UnixMillis,
}

/// Who changed something and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub actor: String,
    pub at: UnixMillis,
}

/// A key as the store keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: KeyId,
    pub partner_id: PartnerId,
    pub environment: Environment,
    pub name: String,
    pub display_prefix: String,
    pub secret_hash: SecretHash,
    pub previous_secret: Option<PreviousSecret>,
    pub status: KeyStatus,
    pub ip_allowlist_enabled: bool,
    pub enforcement: Enforcement,
    pub signature: SignatureScheme,
    /// A signed request must carry a nonce: without one it could be replayed for the whole
    /// signature window. Records written before this setting existed read as `false`.
    #[serde(default)]
    pub require_nonce: bool,
    pub rate_limit: Option<RateLimit>,
    pub expires_at: Option<UnixMillis>,
    pub created: Audit,
    pub updated: Audit,
}

impl KeyRecord {
    pub fn partner_scope(&self) -> PartnerScope {
        PartnerScope {
            partner_id: self.partner_id.clone(),
            environment: self.environment.clone(),
        }
    }
}

/// One allowlist entry with who added it, when, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowlistEntry {
    pub cidr: Cidr,
    pub description: String,
    pub added: Audit,
    pub expires_at: Option<UnixMillis>,
}

/// An entry as a caller asks for it; `added` is filled in by the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewEntry {
    pub cidr: Cidr,
    pub description: String,
    pub expires_at: Option<UnixMillis>,
}

impl NewEntry {
    pub fn into_entry(self, added: Audit) -> AllowlistEntry {
        AllowlistEntry {
            cidr: self.cidr,
            description: self.description,
            added,
            expires_at: self.expires_at,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PartnerScope {
    pub partner_id: PartnerId,
    pub environment: Environment,
}

/// Which allowlist: one key's own, or a partner's in one environment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    Key(KeyId),
    Partner(PartnerScope),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Key(id) => write!(f, "key {id}"),
            Scope::Partner(p) => write!(f, "partner {} in {}", p.partner_id, p.environment),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate() {
        assert!("acme-payments.eu_1".parse::<PartnerId>().is_ok());
        assert_eq!("".parse::<PartnerId>(), Err(IdError::Empty));
        assert!(matches!(
            "acme payments".parse::<PartnerId>(),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            "Production".parse::<Environment>(),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            "a".repeat(65).parse::<KeyId>(),
            Err(IdError::TooLong { max: 64 })
        ));
        assert!(serde_json::from_str::<KeyId>("\"key with space\"").is_err());
    }

    #[test]
    fn minted_secrets_are_prefixed_and_hashed() {
        let random = crate::random::tests::Counter::default();
        let random = &random;
        let minted = MintedSecret::generate(&"production".parse().unwrap(), random);
        assert!(minted.full.starts_with("kf_live_"));
        assert_eq!(minted.full.len(), "kf_live_".len() + 40);
        assert_eq!(minted.display_prefix, &minted.full[..12]);
        assert_eq!(minted.hash, SecretHash::of(&minted.full));
        let sandbox = MintedSecret::generate(&"sandbox".parse().unwrap(), random);
        assert!(sandbox.full.starts_with("kf_test_"));
        assert_ne!(
            minted.full,
            MintedSecret::generate(&"production".parse().unwrap(), random).full
        );
    }

    #[test]
    fn hmac_secret_is_redacted_in_debug() {
        let scheme = SignatureScheme::HmacSha256 {
            secret: b"topsecret".to_vec(),
        };
        assert!(!format!("{scheme:?}").contains("topsecret"));
    }
}
