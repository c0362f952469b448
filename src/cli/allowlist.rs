//! `keyfence allowlist …`

use std::path::{Path, PathBuf};

use super::{CliError, ClientOptions, ExpiryArgs, client::Admin, output};
use crate::grpc::pb;

#[derive(Debug, clap::Args)]
pub struct ScopeArgs {
    /// A key's own allowlist.
    #[arg(long, conflicts_with_all = ["partner", "environment"], required_unless_present = "partner")]
    key_id: Option<String>,
    /// A partner's allowlist in one environment (applies to all its keys there); needs --env.
    #[arg(long, requires = "environment")]
    partner: Option<String>,
    /// The environment of the partner's allowlist (with --partner).
    #[arg(long = "env", requires = "partner")]
    environment: Option<String>,
}

impl ScopeArgs {
    fn scope(&self) -> pb::AllowlistScope {
        let scope = match (&self.key_id, &self.partner) {
            (Some(id), _) => pb::allowlist_scope::Scope::KeyId(id.clone()),
            (None, _) => pb::allowlist_scope::Scope::Partner(pb::PartnerScope {
                partner_id: self.partner.clone().unwrap_or_default(),
                environment: self.environment.clone().unwrap_or_default(),
            }),
        };
        pb::AllowlistScope { scope: Some(scope) }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum AllowlistCommand {
    /// Show the entries.
    List {
        #[command(flatten)]
        scope: ScopeArgs,
    },
    /// Add entries (an entry for a network already listed is updated).
    Add {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Addresses or CIDRs.
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
        /// Why these entries exist.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Replace the whole list with these entries (none empties it).
    Replace {
        #[command(flatten)]
        scope: ScopeArgs,
        /// Addresses or CIDRs; none empties the list.
        #[arg(value_name = "CIDR")]
        cidrs: Vec<String>,
        /// Why these entries exist.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Remove entries by network.
    Remove {
        #[command(flatten)]
        scope: ScopeArgs,
        /// The networks to remove, as listed.
        #[arg(required = true, value_name = "CIDR")]
        cidrs: Vec<String>,
    },
    /// Add (or with --replace, replace the list with) the entries of a CSV file of
    /// `cidr,description`; a header row `cidr,description` is skipped. All or nothing.
    Import {
        #[command(flatten)]
        scope: ScopeArgs,
        /// The CSV file.
        #[arg(long)]
        file: PathBuf,
        /// Replace the whole list with the file's entries instead of adding them.
        #[arg(long)]
        replace: bool,
    },
}

fn inputs(
    cidrs: Vec<String>,
    description: &str,
    expiry: &ExpiryArgs,
) -> Vec<pb::AllowlistEntryInput> {
    let expires_at = expiry.timestamp();
    cidrs
        .into_iter()
        .map(|cidr| pb::AllowlistEntryInput {
            cidr,
            description: description.to_owned(),
            expires_at,
        })
        .collect()
}

/// Reads `cidr,description` rows; returns the entries and each one's line number.
fn read_csv(path: &Path) -> Result<(Vec<pb::AllowlistEntryInput>, Vec<u64>), CliError> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .comment(Some(b'#'))
        .from_path(path)
        .map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
    let mut entries = Vec::new();
    let mut lines = Vec::new();
    for (index, record) in reader.records().enumerate() {
        let record = record.map_err(|e| CliError::Input(format!("{}: {e}", path.display())))?;
        let line = record.position().map_or(index as u64 + 1, |p| p.line());
        let cidr = record.get(0).unwrap_or_default();
        if index == 0 && cidr.eq_ignore_ascii_case("cidr") {
            continue;
        }
        if record.len() > 2 {
            return Err(CliError::Input(format!(
                "{}:{line}: expected cidr,description (quote descriptions that contain commas)",
                path.display()
            )));
        }
        entries.push(pb::AllowlistEntryInput {
            cidr: cidr.to_owned(),
            description: record.get(1).unwrap_or_default().to_owned(),
            expires_at: None,
        });
        lines.push(line);
    }
    Ok((entries, lines))
}

/// Points a server error about `entries[i]` at the file line it came from.
fn locate(error: tonic::Status, path: &Path, lines: &[u64]) -> CliError {
    let message = error.message();
    let index = message
        .strip_prefix("entries[")
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(i, _)| i.parse::<usize>().ok());
    match index.and_then(|i| lines.get(i)) {
        Some(line) => CliError::Status(tonic::Status::new(
            error.code(),
            format!("{message} ({}:{line})", path.display()),
        )),
        None => CliError::Status(error),
    }
}

/// Adds the entries, or with `replace` makes them the whole list; returns the list after.
async fn write(
    admin: &mut Admin,
    scope: &ScopeArgs,
    entries: Vec<pb::AllowlistEntryInput>,
    replace: bool,
) -> Result<(Vec<pb::AllowlistEntry>, u64), tonic::Status> {
    let scope = Some(scope.scope());
    if replace {
        let r = admin
            .replace_allowlist(pb::ReplaceAllowlistRequest { scope, entries })
            .await?
            .into_inner();
        Ok((r.entries, r.revision))
    } else {
        let r = admin
            .add_allowlist_entries(pb::AddAllowlistEntriesRequest { scope, entries })
            .await?
            .into_inner();
        Ok((r.entries, r.revision))
    }
}

pub async fn run(client: &ClientOptions, command: AllowlistCommand) -> Result<(), CliError> {
    let mut admin = client.connect().await?;
    let (entries, revision) = match command {
        AllowlistCommand::List { scope } => {
            let r = admin
                .get_allowlist(pb::GetAllowlistRequest {
                    scope: Some(scope.scope()),
                })
                .await?
                .into_inner();
            (r.entries, r.revision)
        }
        AllowlistCommand::Add {
            scope,
            cidrs,
            description,
            expiry,
        } => {
            write(
                &mut admin,
                &scope,
                inputs(cidrs, &description, &expiry),
                false,
            )
            .await?
        }
        AllowlistCommand::Replace {
            scope,
            cidrs,
            description,
            expiry,
        } => {
            write(
                &mut admin,
                &scope,
                inputs(cidrs, &description, &expiry),
                true,
            )
            .await?
        }
        AllowlistCommand::Remove { scope, cidrs } => {
            let r = admin
                .remove_allowlist_entries(pb::RemoveAllowlistEntriesRequest {
                    scope: Some(scope.scope()),
                    cidrs,
                })
                .await?
                .into_inner();
            (r.entries, r.revision)
        }
        AllowlistCommand::Import {
            scope,
            file,
            replace,
        } => {
            let (entries, lines) = read_csv(&file)?;
            if entries.is_empty() && !replace {
                return Err(CliError::Input(format!("{}: no entries", file.display())));
            }
            write(&mut admin, &scope, entries, replace)
                .await
                .map_err(|e| locate(e, &file, &lines))?
        }
    };
    output::entries(&entries, revision, client.json);
    Ok(())
}
