//! Conversions between protobuf messages and domain types. Inbound conversions validate and name
//! the offending field (the limits and text checks themselves are `keyfence_admin::input`'s, so
//! every admin surface applies the same); outbound ones cannot fail.

use keyfence_admin::input;
use keyfence_policy::{
    decision::{Decision, DenyReason},
    ip::Cidr,
    model::{
        AllowlistEntry, Enforcement, Environments, KeyRecord, KeyStatus, NewEntry, PartnerScope,
        RateLimit, Scope, SignatureScheme, UnixMillis,
    },
};
use prost_types::Timestamp;
use tonic::Status;

use super::{pb, status::invalid};

pub fn timestamp(at: UnixMillis) -> Timestamp {
    Timestamp {
        seconds: at.0.div_euclid(1000),
        nanos: (at.0.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub fn optional_timestamp(at: Option<UnixMillis>) -> Option<Timestamp> {
    at.map(timestamp)
}

/// Any valid timestamp.
pub fn instant(field: &str, value: &Timestamp) -> Result<UnixMillis, Status> {
    if !(0..1_000_000_000).contains(&value.nanos) {
        return Err(invalid(field, "nanos must be within 0..1e9"));
    }
    value
        .seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(i64::from(value.nanos / 1_000_000)))
        .map(UnixMillis)
        .ok_or_else(|| invalid(field, "is out of range"))
}

pub fn text(
    field: &str,
    value: String,
    max_chars: usize,
    required: bool,
) -> Result<String, Status> {
    input::text(value, max_chars, required).map_err(|reason| invalid(field, reason))
}

/// Validates every entry; the first bad one fails the whole request. Whether an expiry lies in
/// the future is the admin layer's rule.
pub fn new_entries(
    field: &str,
    inputs: Vec<pb::AllowlistEntryInput>,
) -> Result<Vec<NewEntry>, Status> {
    inputs
        .into_iter()
        .enumerate()
        .map(|(index, input)| {
            let cidr: Cidr = input
                .cidr
                .parse()
                .map_err(|e| invalid(format!("{field}[{index}].cidr"), e))?;
            let description = text(
                &format!("{field}[{index}].description"),
                input.description,
                input::MAX_DESCRIPTION_CHARS,
                false,
            )?;
            let expires_at = input
                .expires_at
                .map(|t| instant(&format!("{field}[{index}].expires_at"), &t))
                .transpose()?;
            Ok(NewEntry {
                cidr,
                description,
                expires_at,
            })
        })
        .collect()
}

pub fn cidrs(field: &str, inputs: Vec<String>) -> Result<Vec<Cidr>, Status> {
    inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            text.parse()
                .map_err(|e| invalid(format!("{field}[{index}]"), e))
        })
        .collect()
}

pub fn partner_scope(
    field: &str,
    partner: pb::PartnerScope,
    environments: &Environments,
) -> Result<PartnerScope, Status> {
    Ok(PartnerScope {
        partner_id: partner
            .partner_id
            .parse()
            .map_err(|e| invalid(format!("{field}.partner_id"), e))?,
        environment: environments
            .parse(&partner.environment)
            .map_err(|e| invalid(format!("{field}.environment"), e))?,
    })
}

pub fn scope(
    scope: Option<pb::AllowlistScope>,
    environments: &Environments,
) -> Result<Scope, Status> {
    match scope.and_then(|s| s.scope) {
        None => Err(invalid("scope", "is required: a key_id or a partner")),
        Some(pb::allowlist_scope::Scope::KeyId(id)) => Ok(Scope::Key(
            id.parse().map_err(|e| invalid("scope.key_id", e))?,
        )),
        Some(pb::allowlist_scope::Scope::Partner(partner)) => Ok(Scope::Partner(partner_scope(
            "scope.partner",
            partner,
            environments,
        )?)),
    }
}

pub fn rate_limit(value: Option<pb::RateLimit>) -> Option<RateLimit> {
    value
        .filter(|r| r.requests_per_second > 0)
        .map(|r| RateLimit {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        })
}

pub fn enforcement(field: &str, value: i32) -> Result<Option<Enforcement>, Status> {
    match pb::Enforcement::try_from(value) {
        Ok(pb::Enforcement::Unspecified) => Ok(None),
        Ok(pb::Enforcement::Enforce) => Ok(Some(Enforcement::Enforce)),
        Ok(pb::Enforcement::ReportOnly) => Ok(Some(Enforcement::ReportOnly)),
        Err(_) => Err(invalid(field, format!("unknown value {value}"))),
    }
}

pub fn api_key(record: &KeyRecord) -> pb::ApiKey {
    let (scheme, public_key) = match &record.signature {
        SignatureScheme::None => (pb::SignatureScheme::None, Vec::new()),
        SignatureScheme::HmacSha256 { .. } => (pb::SignatureScheme::HmacSha256, Vec::new()),
        SignatureScheme::Ed25519 { public_key } => {
            (pb::SignatureScheme::Ed25519, public_key.to_vec())
        }
    };
    pb::ApiKey {
        id: record.id.to_string(),
        partner_id: record.partner_id.to_string(),
        environment: record.environment.to_string(),
        name: record.name.clone(),
        display_prefix: record.display_prefix.clone(),
        status: match record.status {
            KeyStatus::Active => pb::KeyStatus::Active,
            KeyStatus::Disabled => pb::KeyStatus::Disabled,
            KeyStatus::Revoked => pb::KeyStatus::Revoked,
        } as i32,
        ip_allowlist_enabled: record.ip_allowlist_enabled,
        enforcement: match record.enforcement {
            Enforcement::Enforce => pb::Enforcement::Enforce,
            Enforcement::ReportOnly => pb::Enforcement::ReportOnly,
        } as i32,
        signature_scheme: scheme as i32,
        public_key,
        expires_at: optional_timestamp(record.expires_at),
        created_at: Some(timestamp(record.created.at)),
        created_by: record.created.actor.clone(),
        updated_at: Some(timestamp(record.updated.at)),
        updated_by: record.updated.actor.clone(),
        previous_secret_expires_at: record
            .previous_secret
            .as_ref()
            .map(|p| timestamp(p.valid_until)),
        rate_limit: record.rate_limit.map(|r| pb::RateLimit {
            requests_per_second: r.requests_per_second,
            burst: r.burst,
        }),
        last_used_at: None,
        last_used_ip: String::new(),
        require_nonce: record.require_nonce,
    }
}

pub fn entry(entry: &AllowlistEntry) -> pb::AllowlistEntry {
    pb::AllowlistEntry {
        cidr: entry.cidr.to_string(),
        description: entry.description.clone(),
        added_by: entry.added.actor.clone(),
        added_at: Some(timestamp(entry.added.at)),
        expires_at: optional_timestamp(entry.expires_at),
    }
}

pub fn entries(list: &[AllowlistEntry]) -> Vec<pb::AllowlistEntry> {
    list.iter().map(entry).collect()
}

pub fn deny_reason(reason: Option<DenyReason>) -> pb::DenyReason {
    match reason {
        None => pb::DenyReason::Unspecified,
        Some(DenyReason::UnknownKey) => pb::DenyReason::UnknownKey,
        Some(DenyReason::KeyDisabled) => pb::DenyReason::KeyDisabled,
        Some(DenyReason::KeyRevoked) => pb::DenyReason::KeyRevoked,
        Some(DenyReason::KeyExpired) => pb::DenyReason::KeyExpired,
        Some(DenyReason::InvalidClientIp) => pb::DenyReason::InvalidClientIp,
        Some(DenyReason::IpNotAllowed) => pb::DenyReason::IpNotAllowed,
        Some(DenyReason::SignatureMissing) => pb::DenyReason::SignatureMissing,
        Some(DenyReason::SignatureInvalid) => pb::DenyReason::SignatureInvalid,
        Some(DenyReason::TimestampOutOfWindow) => pb::DenyReason::TimestampOutOfWindow,
        Some(DenyReason::NonceReused) => pb::DenyReason::NonceReused,
        Some(DenyReason::RateLimited) => pb::DenyReason::RateLimited,
        Some(DenyReason::BodyNotForwarded) => pb::DenyReason::BodyNotForwarded,
        Some(DenyReason::NonceMissing) => pb::DenyReason::NonceMissing,
    }
}

/// The fields every decision response shares.
pub struct DecisionFields {
    pub decision: i32,
    pub reason: i32,
    pub key_id: String,
    pub partner_id: String,
    pub environment: String,
}

pub fn decision_fields(decision: &Decision) -> DecisionFields {
    let key = decision.key.as_deref();
    DecisionFields {
        decision: if decision.is_allow() {
            pb::Decision::Allow
        } else {
            pb::Decision::Deny
        } as i32,
        reason: deny_reason(decision.reason()) as i32,
        key_id: key.map(|k| k.id.to_string()).unwrap_or_default(),
        partner_id: key.map(|k| k.partner_id.to_string()).unwrap_or_default(),
        environment: key.map(|k| k.environment.to_string()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_name_the_bad_one() {
        let inputs = vec![
            pb::AllowlistEntryInput {
                cidr: "10.0.0.0/8".into(),
                ..Default::default()
            },
            pb::AllowlistEntryInput {
                cidr: "010.0.0.1".into(),
                ..Default::default()
            },
        ];
        let status = new_entries("entries", inputs).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().starts_with("entries[1].cidr: "),
            "{}",
            status.message()
        );
    }

    #[test]
    fn timestamps_convert_both_ways_and_reject_bad_nanos() {
        let future = Timestamp {
            seconds: 11,
            nanos: 500_000_000,
        };
        assert_eq!(instant("expires_at", &future).unwrap(), UnixMillis(11_500));
        let bad = Timestamp {
            seconds: 11,
            nanos: -1,
        };
        assert!(instant("expires_at", &bad).is_err());
        assert_eq!(timestamp(UnixMillis(11_500)), future);
    }

    #[test]
    fn every_deny_reason_maps_to_a_distinct_proto_value() {
        let mapped: std::collections::HashSet<i32> = DenyReason::ALL
            .iter()
            .map(|r| deny_reason(Some(*r)) as i32)
            .collect();
        assert_eq!(mapped.len(), DenyReason::ALL.len());
        assert!(!mapped.contains(&(pb::DenyReason::Unspecified as i32)));
    }

    #[test]
    fn scope_requires_a_configured_environment() {
        let envs = Environments::new(vec!["production".parse().unwrap()]);
        let scope_for = |env: &str| {
            scope(
                Some(pb::AllowlistScope {
                    scope: Some(pb::allowlist_scope::Scope::Partner(pb::PartnerScope {
                        partner_id: "acme".into(),
                        environment: env.into(),
                    })),
                }),
                &envs,
            )
        };
        assert!(scope_for("production").is_ok());
        let status = scope_for("staging").unwrap_err();
        assert!(
            status.message().starts_with("scope.partner.environment: "),
            "{}",
            status.message()
        );
        assert_eq!(
            scope(None, &envs).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
