//! `keyfence check`: the admin dry run ("test this key"). Exits 0 on ALLOW (report-only
//! included), 2 on DENY.

use std::path::PathBuf;

use serde_json::json;

use super::{CliError, ClientOptions, Outcome, output};
use crate::grpc::pb;

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// The API key as a partner presents it.
    #[arg(long, conflicts_with_all = ["key_id", "key_file"], required_unless_present_any = ["key_id", "key_file"])]
    key: Option<String>,
    /// A file holding the API key (as written by `keys create --secret-file`).
    #[arg(long, conflicts_with = "key_id")]
    key_file: Option<PathBuf>,
    /// The key's id instead of its secret.
    #[arg(long)]
    key_id: Option<String>,
    /// The client address to test.
    #[arg(long)]
    ip: String,
    /// Base64 signature, to test a signed request too.
    #[arg(long, requires = "timestamp")]
    signature: Option<String>,
    /// Unix seconds the request was signed at (with --signature).
    #[arg(long)]
    timestamp: Option<i64>,
    /// The request's nonce, if it was signed with one (a dry run never consumes it).
    #[arg(long, default_value = "")]
    nonce: String,
    /// The signed request's HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The signed request's path and query.
    #[arg(long, default_value = "/")]
    path: String,
    /// A file with the request body.
    #[arg(long)]
    body_file: Option<PathBuf>,
}

/// The reasons decided before the IP allowlist is looked at: with them, whether the IP would
/// pass is unknown, not "not allowed".
const DECIDED_BEFORE_THE_IP_CHECK: [pb::DenyReason; 5] = [
    pb::DenyReason::InvalidClientIp,
    pb::DenyReason::UnknownKey,
    pb::DenyReason::KeyDisabled,
    pb::DenyReason::KeyRevoked,
    pb::DenyReason::KeyExpired,
];

pub async fn run(client: &ClientOptions, args: CheckArgs) -> Result<Outcome, CliError> {
    let key = match (&args.key, &args.key_file, &args.key_id) {
        (Some(secret), _, _) => pb::check_access_request::Key::ApiKey(secret.clone()),
        (None, Some(path), _) => pb::check_access_request::Key::ApiKey(
            std::fs::read_to_string(path)
                .map_err(CliError::file("read --key-file", path))?
                .trim()
                .to_owned(),
        ),
        (None, None, Some(id)) => pb::check_access_request::Key::KeyId(id.clone()),
        (None, None, None) => {
            return Err(CliError::Input(
                "one of --key, --key-file or --key-id is required".into(),
            ));
        }
    };
    let signature = match &args.signature {
        Some(signature) => Some(pb::SignatureInput {
            signature: signature.clone(),
            timestamp: args.timestamp.unwrap_or_default(),
            nonce: args.nonce.clone(),
            method: args.method.clone(),
            path: args.path.clone(),
            body: match &args.body_file {
                Some(path) => {
                    std::fs::read(path).map_err(CliError::file("read --body-file", path))?
                }
                None => Vec::new(),
            },
        }),
        None => None,
    };
    let mut admin = client.connect().await?;
    let r = admin
        .check_access(pb::CheckAccessRequest {
            key: Some(key),
            client_ip: args.ip.clone(),
            signature,
        })
        .await?
        .into_inner();
    let allowed = r.decision == pb::Decision::Allow as i32;
    let decision = if allowed { "ALLOW" } else { "DENY" };
    let outcome = if allowed {
        Outcome::Success
    } else {
        Outcome::Denied
    };
    let reason =
        (r.reason != pb::DenyReason::Unspecified as i32).then(|| output::reason_name(r.reason));
    let ip_checked = !DECIDED_BEFORE_THE_IP_CHECK
        .iter()
        .any(|before| r.reason == *before as i32);
    if client.json {
        output::print_json(&json!({
            "decision": decision.to_ascii_lowercase(),
            "reason": reason,
            "would_deny": r.would_deny,
            "key_id": r.key_id,
            "partner_id": r.partner_id,
            "environment": r.environment,
            "ip_allowed": ip_checked.then_some(r.ip_allowed),
            "matched_scope": (!r.matched_scope.is_empty()).then_some(&r.matched_scope),
            "matched_entry": r.matched_entry.as_ref().map(output::entry_json),
            "policy_revision": r.policy_revision,
        }));
        return Ok(outcome);
    }
    let mut lines = vec![("decision", decision.to_owned())];
    if let Some(reason) = reason {
        let label = if r.would_deny { "would deny" } else { "reason" };
        lines.push((label, reason));
    }
    lines.push((
        "key",
        if r.key_id.is_empty() {
            "-".into()
        } else {
            format!("{} ({} / {})", r.key_id, r.partner_id, r.environment)
        },
    ));
    lines.push((
        "ip",
        format!(
            "{} ({})",
            args.ip,
            match (ip_checked, r.ip_allowed) {
                (false, _) => "not checked",
                (true, true) => "allowed",
                (true, false) => "not allowed",
            }
        ),
    ));
    if let Some(entry) = &r.matched_entry {
        lines.push((
            "matched",
            format!(
                "{} on the {} allowlist, \"{}\", added by {} at {}",
                entry.cidr,
                r.matched_scope,
                entry.description,
                entry.added_by,
                output::time(&entry.added_at)
            ),
        ));
    }
    lines.push(("revision", r.policy_revision.to_string()));
    output::fields(&lines);
    Ok(outcome)
}
