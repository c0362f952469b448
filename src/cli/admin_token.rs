//! `keyfence admin-token new`: makes a named admin token for `--admin-tokens-file`. The token goes
//! to a 0600 file (or stdout) for its owner; the line to add to the tokens file holds only its
//! digest, so the server never stores a token.

use std::path::PathBuf;

use super::CliError;
use crate::{
    authn::{generate_token, tokens_file_line, write_private_file},
    system::OsRandom,
};

#[derive(Debug, clap::Subcommand)]
pub enum AdminTokenCommand {
    /// Make a token: print the `NAME sha256:HEX` line for the tokens file, and write the token
    /// to --token-out (0600; refused if the file exists) or, without it, to stdout.
    New {
        /// The principal the token authenticates as, recorded in every audit field.
        #[arg(long)]
        name: String,
        /// File to write the token to (0600).
        #[arg(long)]
        token_out: Option<PathBuf>,
    },
}

pub fn run(command: AdminTokenCommand) -> Result<(), CliError> {
    match command {
        AdminTokenCommand::New { name, token_out } => {
            let token = generate_token(&OsRandom);
            let line =
                tokens_file_line(&name, &token).map_err(|e| CliError::Input(e.to_string()))?;
            match token_out {
                Some(path) => {
                    write_private_file(&path, &format!("{token}\n")).map_err(|e| {
                        CliError::Input(format!("--token-out {}: {e}", path.display()))
                    })?;
                    println!("{line}");
                }
                None => {
                    println!("{line}");
                    println!("{token}");
                }
            }
            Ok(())
        }
    }
}
