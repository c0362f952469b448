//! Small, valid records for tests and benchmarks, in this crate and the ones above it (through the
//! `fixtures` feature, which only dev-dependencies turn on).

use crate::model::{
    AllowlistEntry, Audit, Enforcement, KeyRecord, KeyStatus, SecretHash, SignatureScheme,
    UnixMillis,
};

/// An active, unsigned key with its allowlist enabled, presented as `secret`.
pub fn record(id: &str, partner: &str, env: &str, secret: &str) -> KeyRecord {
    let at = Audit {
        actor: "test".into(),
        at: UnixMillis(0),
    };
    KeyRecord {
        id: id.parse().unwrap(),
        partner_id: partner.parse().unwrap(),
        environment: env.parse().unwrap(),
        name: id.into(),
        display_prefix: "kf_test_".into(),
        secret_hash: SecretHash::of(secret),
        previous_secret: None,
        status: KeyStatus::Active,
        ip_allowlist_enabled: true,
        enforcement: Enforcement::Enforce,
        signature: SignatureScheme::None,
        require_nonce: false,
        rate_limit: None,
        expires_at: None,
        created: at.clone(),
        updated: at,
    }
}

/// An entry for `cidr`, added at the epoch by "test".
pub fn entry(cidr: &str) -> AllowlistEntry {
    AllowlistEntry {
        cidr: cidr.parse().unwrap(),
        description: String::new(),
        added: Audit {
            actor: "test".into(),
            at: UnixMillis(0),
        },
        expires_at: None,
    }
}
