//! `keyfence logs`: one key's access log, newest first.

use std::time::SystemTime;

use serde_json::json;

use super::{CliError, ClientOptions, output};
use crate::grpc::pb;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The key's id.
    #[arg(long = "key")]
    key_id: String,
    /// Only blocked attempts.
    #[arg(long)]
    blocked: bool,
    /// At most this many records.
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Only records since then: RFC 3339, or a duration ago (15m, 24h).
    #[arg(long, value_parser = parse_since)]
    since: Option<SystemTime>,
    /// Output format (--json is the same as --format json).
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
}

fn parse_since(text: &str) -> Result<SystemTime, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Ok(at);
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("{text:?} is neither RFC 3339 nor a duration like 24h"))?;
    SystemTime::now()
        .checked_sub(ago)
        .ok_or_else(|| "too far back".into())
}

pub async fn run(client: &ClientOptions, args: LogsArgs) -> Result<(), CliError> {
    let mut admin = client.connect().await?;
    let mut entries = Vec::new();
    let mut page_token = String::new();
    while entries.len() < args.limit {
        let want = (args.limit - entries.len()).min(1000) as u32;
        let page = admin
            .list_access_logs(pb::ListAccessLogsRequest {
                key_id: args.key_id.clone(),
                limit: want,
                blocked_only: args.blocked,
                since: args.since.map(prost_types::Timestamp::from),
                until: None,
                page_token,
            })
            .await?
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    let format = if client.json {
        Format::Json
    } else {
        args.format
    };
    let decision = |e: &pb::AccessLogEntry| {
        if e.decision == pb::Decision::Allow as i32 {
            "allow"
        } else {
            "deny"
        }
    };
    let reason = |e: &pb::AccessLogEntry| {
        if e.reason == pb::DenyReason::Unspecified as i32 {
            String::new()
        } else {
            output::reason_name(e.reason)
        }
    };
    match format {
        Format::Json => output::print_json(&json!({
            "entries": entries.iter().map(|e| json!({
                "time": output::time(&e.time),
                "key_id": e.key_id,
                "partner_id": e.partner_id,
                "environment": e.environment,
                "client_ip": e.client_ip,
                "decision": decision(e),
                "reason": reason(e),
                "would_deny": e.would_deny,
                "method": e.method,
                "path": e.path,
                "matched_cidr": e.matched_cidr,
                "source": e.source,
            })).collect::<Vec<_>>(),
        })),
        Format::Csv => {
            let mut writer = csv::Writer::from_writer(std::io::stdout());
            let csv_error = |e: csv::Error| CliError::Input(format!("cannot write CSV: {e}"));
            writer
                .write_record([
                    "time",
                    "key_id",
                    "client_ip",
                    "decision",
                    "reason",
                    "method",
                    "path",
                    "matched_cidr",
                    "source",
                ])
                .map_err(csv_error)?;
            for e in &entries {
                writer
                    .write_record([
                        output::time(&e.time),
                        e.key_id.clone(),
                        e.client_ip.clone(),
                        decision(e).to_owned(),
                        reason(e),
                        e.method.clone(),
                        e.path.clone(),
                        e.matched_cidr.clone(),
                        e.source.clone(),
                    ])
                    .map_err(csv_error)?;
            }
            writer
                .flush()
                .map_err(|e| CliError::Input(format!("cannot write CSV: {e}")))?;
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        output::time(&e.time),
                        e.client_ip.clone(),
                        decision(e).to_owned(),
                        reason(e),
                        if e.method.is_empty() {
                            "-".into()
                        } else {
                            format!("{} {}", e.method, e.path)
                        },
                        if e.matched_cidr.is_empty() {
                            "-".into()
                        } else {
                            e.matched_cidr.clone()
                        },
                    ]
                })
                .collect();
            output::table(
                &["TIME", "IP", "DECISION", "REASON", "ENDPOINT", "MATCHED"],
                &rows,
            );
        }
    }
    Ok(())
}
