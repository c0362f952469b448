//! `keyfence secrets`: edits the secrets key file (the keyring that seals stored records). It
//! works on the file alone; a running server picks the change up on SIGHUP or within seconds,
//! re-sealing every record under the new primary. See the README for the rotation order with
//! several replicas.

use std::path::PathBuf;

use keyfence_store::sealing::Keyring;

use crate::{secrets, system::OsRandom};

use super::CliError;

#[derive(Debug, clap::Args)]
pub struct KeyFileArgs {
    /// The secrets key file (`<data-dir>/secrets.key` for the embedded store).
    #[arg(long, env = "KEYFENCE_SECRETS_KEY_FILE")]
    pub secrets_key_file: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum SecretsCommand {
    /// Add a new key that opens but does not yet seal (makes the file when absent: its first key
    /// is the primary). With several replicas: copy the file to every replica before promoting.
    AddKey {
        #[command(flatten)]
        file: KeyFileArgs,
        /// The new key's id (default: `k` and 8 random hex digits).
        #[arg(long)]
        id: Option<String>,
    },
    /// Make a key the primary: it seals from now on, and servers re-seal every record under it.
    PromoteKey {
        #[command(flatten)]
        file: KeyFileArgs,
        /// The id of the key to make the primary (`keyfence secrets list` shows the ids).
        #[arg(long)]
        id: String,
    },
    /// Add a new key and make it the primary at once: for one server (the embedded store). With
    /// several replicas use add-key, then promote-key once every replica has the new key.
    RotateKey {
        #[command(flatten)]
        file: KeyFileArgs,
    },
    /// Remove a key that is no longer the primary, once every server has logged that every stored
    /// record is sealed under the primary.
    RemoveKey {
        #[command(flatten)]
        file: KeyFileArgs,
        /// The id of the key to remove; never the primary, and only once no record needs it.
        #[arg(long)]
        id: String,
    },
    /// List the keys' ids, the primary first (never the keys).
    List {
        #[command(flatten)]
        file: KeyFileArgs,
    },
}

fn input(error: impl std::fmt::Display) -> CliError {
    CliError::Input(error.to_string())
}

pub fn run(command: SecretsCommand) -> Result<(), CliError> {
    match command {
        SecretsCommand::AddKey { file, id } => {
            let (generated, key) = secrets::new_key(&OsRandom);
            let id = id.unwrap_or(generated);
            let path = &file.secrets_key_file;
            let keyring = if path.exists() {
                let mut keyring = secrets::load(path).map_err(input)?;
                keyring
                    .add(&id, key)
                    .map_err(|e| input(format!("{}: {e}", path.display())))?;
                keyring
            } else {
                Keyring::single(&id, key).map_err(input)?
            };
            secrets::write(path, &keyring).map_err(input)?;
            println!("key {id} added (primary: {})", keyring.primary_id());
        }
        SecretsCommand::PromoteKey { file, id } => {
            edit(&file, |keyring| keyring.promote(&id))?;
            println!("key {id} is the primary");
        }
        SecretsCommand::RotateKey { file } => {
            let (id, key) = secrets::new_key(&OsRandom);
            edit(&file, |keyring| {
                keyring.add(&id, key)?;
                keyring.promote(&id)
            })?;
            println!("key {id} is the primary");
        }
        SecretsCommand::RemoveKey { file, id } => {
            edit(&file, |keyring| keyring.remove(&id))?;
            println!("key {id} removed");
        }
        SecretsCommand::List { file } => {
            let keyring = secrets::load(&file.secrets_key_file).map_err(input)?;
            for (index, id) in keyring.ids().into_iter().enumerate() {
                println!("{id}{}", if index == 0 { " (primary)" } else { "" });
            }
        }
    }
    Ok(())
}

/// Reads the file, applies `change` and writes it back atomically.
fn edit(
    file: &KeyFileArgs,
    change: impl FnOnce(&mut Keyring) -> Result<(), keyfence_store::sealing::KeyringError>,
) -> Result<(), CliError> {
    let path = &file.secrets_key_file;
    let mut keyring = secrets::load(path).map_err(input)?;
    change(&mut keyring).map_err(|e| input(format!("{}: {e}", path.display())))?;
    secrets::write(path, &keyring).map_err(input)
}
