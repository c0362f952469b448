//! How admin results look: aligned tables for people, JSON for scripts.

use std::time::{Duration, SystemTime};

use serde_json::{Value, json};

use crate::grpc::pb;

/// Prints rows under a header, each column as wide as its widest cell.
pub fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for row in rows {
        line(row.clone());
    }
}

/// `name  value` lines.
pub fn fields(pairs: &[(&str, String)]) {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in pairs {
        println!("{key:<width$}  {value}");
    }
}

pub fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("JSON values serialize")
    );
}

pub fn time(ts: &Option<prost_types::Timestamp>) -> String {
    ts.as_ref().map(time_of).unwrap_or_else(|| "-".into())
}

fn time_of(ts: &prost_types::Timestamp) -> String {
    let at = if ts.seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(ts.seconds as u64, ts.nanos.max(0) as u32)
    } else {
        SystemTime::UNIX_EPOCH
    };
    humantime::format_rfc3339_seconds(at).to_string()
}

fn json_time(ts: &Option<prost_types::Timestamp>) -> Value {
    ts.as_ref()
        .map(|t| Value::String(time_of(t)))
        .unwrap_or(Value::Null)
}

pub fn status_name(status: i32) -> &'static str {
    match pb::KeyStatus::try_from(status) {
        Ok(pb::KeyStatus::Active) => "active",
        Ok(pb::KeyStatus::Disabled) => "disabled",
        Ok(pb::KeyStatus::Revoked) => "revoked",
        _ => "unknown",
    }
}

pub fn scheme_name(scheme: i32) -> &'static str {
    match pb::SignatureScheme::try_from(scheme) {
        Ok(pb::SignatureScheme::None) => "none",
        Ok(pb::SignatureScheme::HmacSha256) => "hmac-sha256",
        Ok(pb::SignatureScheme::Ed25519) => "ed25519",
        _ => "unknown",
    }
}

pub fn enforcement_name(enforcement: i32) -> &'static str {
    match pb::Enforcement::try_from(enforcement) {
        Ok(pb::Enforcement::ReportOnly) => "report-only",
        _ => "enforce",
    }
}

pub fn reason_name(reason: i32) -> String {
    pb::DenyReason::try_from(reason)
        .map(|r| {
            r.as_str_name()
                .trim_start_matches("DENY_REASON_")
                .to_ascii_lowercase()
        })
        .unwrap_or_else(|_| format!("reason {reason}"))
}

pub fn key_json(key: &pb::ApiKey) -> Value {
    json!({
        "id": key.id,
        "partner_id": key.partner_id,
        "environment": key.environment,
        "name": key.name,
        "display_prefix": key.display_prefix,
        "status": status_name(key.status),
        "ip_allowlist_enabled": key.ip_allowlist_enabled,
        "enforcement": enforcement_name(key.enforcement),
        "signature_scheme": scheme_name(key.signature_scheme),
        "require_nonce": key.require_nonce,
        "public_key": if key.public_key.is_empty() { Value::Null } else { Value::String(hex::encode(&key.public_key)) },
        "expires_at": json_time(&key.expires_at),
        "created_at": json_time(&key.created_at),
        "created_by": key.created_by,
        "updated_at": json_time(&key.updated_at),
        "updated_by": key.updated_by,
        "previous_secret_expires_at": json_time(&key.previous_secret_expires_at),
        "rate_limit": key.rate_limit.as_ref().map(|r| json!({"requests_per_second": r.requests_per_second, "burst": r.burst})),
        "last_used_at": json_time(&key.last_used_at),
        "last_used_ip": (!key.last_used_ip.is_empty()).then_some(&key.last_used_ip),
    })
}

pub fn key_fields(key: &pb::ApiKey) {
    let rate = key
        .rate_limit
        .as_ref()
        .map(|r| format!("{}/s burst {}", r.requests_per_second, r.burst))
        .unwrap_or_else(|| "-".into());
    fields(&[
        ("id", key.id.clone()),
        ("partner", key.partner_id.clone()),
        ("environment", key.environment.clone()),
        ("name", key.name.clone()),
        ("prefix", key.display_prefix.clone()),
        ("status", status_name(key.status).into()),
        (
            "ip allowlist",
            if key.ip_allowlist_enabled {
                "enabled"
            } else {
                "disabled"
            }
            .into(),
        ),
        ("enforcement", enforcement_name(key.enforcement).into()),
        ("signature", scheme_name(key.signature_scheme).into()),
        (
            "nonce",
            if key.require_nonce {
                "required"
            } else {
                "optional"
            }
            .into(),
        ),
        ("rate limit", rate),
        ("expires", time(&key.expires_at)),
        (
            "created",
            format!("{} by {}", time(&key.created_at), key.created_by),
        ),
        (
            "updated",
            format!("{} by {}", time(&key.updated_at), key.updated_by),
        ),
        ("old secret until", time(&key.previous_secret_expires_at)),
        ("last used", last_used(key)),
    ]);
}

pub fn key_row(key: &pb::ApiKey) -> Vec<String> {
    vec![
        key.id.clone(),
        key.partner_id.clone(),
        key.environment.clone(),
        key.name.clone(),
        key.display_prefix.clone(),
        status_name(key.status).into(),
        if key.ip_allowlist_enabled {
            "on"
        } else {
            "off"
        }
        .into(),
        scheme_name(key.signature_scheme).into(),
        time(&key.expires_at),
        last_used(key),
    ]
}

fn last_used(key: &pb::ApiKey) -> String {
    match &key.last_used_at {
        Some(_) => format!("{} from {}", time(&key.last_used_at), key.last_used_ip),
        None => "never".into(),
    }
}

pub const KEY_HEADER: [&str; 10] = [
    "ID",
    "PARTNER",
    "ENV",
    "NAME",
    "PREFIX",
    "STATUS",
    "ALLOWLIST",
    "SIGNATURE",
    "EXPIRES",
    "LAST USED",
];

pub fn entry_json(entry: &pb::AllowlistEntry) -> Value {
    json!({
        "cidr": entry.cidr,
        "description": entry.description,
        "added_by": entry.added_by,
        "added_at": json_time(&entry.added_at),
        "expires_at": json_time(&entry.expires_at),
    })
}

pub fn entries(entries: &[pb::AllowlistEntry], revision: u64, as_json: bool) {
    if as_json {
        print_json(&json!({
            "entries": entries.iter().map(entry_json).collect::<Vec<_>>(),
            "revision": revision,
        }));
        return;
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.cidr.clone(),
                e.description.clone(),
                e.added_by.clone(),
                time(&e.added_at),
                time(&e.expires_at),
            ]
        })
        .collect();
    table(
        &["CIDR", "DESCRIPTION", "ADDED BY", "ADDED AT", "EXPIRES"],
        &rows,
    );
    println!("{} entries, revision {revision}", entries.len());
}

/// Writes `text` to stdout. A reader that went away (`keyfence completions bash | head`) is not
/// an error, and no write failure is a panic.
pub fn print_text(text: &str) -> Result<(), super::CliError> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(
            super::CliError::Input(format!("cannot write to stdout: {error}")),
        ),
        _ => Ok(()),
    }
}
