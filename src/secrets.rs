//! The secrets key file (`--secrets-key-file`): the keyring that seals the store's records (see
//! `keyfence_store::sealing` for the format and what it protects). This module reads it, makes
//! it when the embedded store has none, writes it (0600, atomic rename) for `keyfence secrets`,
//! and follows it while serving: on SIGHUP or a change of the file the server switches keyrings
//! and re-seals every record under the new primary, without a restart.
//!
//! Invariant: key material goes to the file and nowhere else: no log, error, metric or `Debug`.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
};

use keyfence_policy::random::RandomSource;
use keyfence_store::{
    Store,
    sealing::{KEY_LEN, Keyring, KeyringError, Sealer},
};

use crate::{reload, telemetry::metrics::Metrics};

/// The key file's name in the data directory, where the embedded store keeps it by default.
pub const DEFAULT_FILE_NAME: &str = "secrets.key";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot read the secrets key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the secrets key file {path} {source}")]
    Invalid { path: PathBuf, source: KeyringError },
    #[error("cannot write the secrets key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the secrets key file {path} has mode {mode:04o}: it holds the keys that protect every signing secret; run: chmod 600 {path}"
    )]
    Exposed { path: PathBuf, mode: u32 },
}

/// Reads the keyring at `path`, refusing a file that others than its owner may read or write.
pub fn load(path: &Path) -> Result<Keyring, SecretsError> {
    let read_error = |source| SecretsError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read_error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(SecretsError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
    }
    #[cfg(not(unix))]
    let _ = meta;
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(read_error)?);
    Keyring::parse(&text).map_err(|source| SecretsError::Invalid {
        path: path.to_owned(),
        source,
    })
}

/// A fresh 256-bit key and an id for it (`k` and 8 hex digits).
pub fn new_key(random: &dyn RandomSource) -> (String, [u8; KEY_LEN]) {
    let mut key = [0u8; KEY_LEN];
    random.fill(&mut key);
    let mut id = [0u8; 4];
    random.fill(&mut id);
    (format!("k{}", hex::encode(id)), key)
}

/// Reads the keyring at `path`, or makes one with a fresh key there when the file is absent.
pub fn load_or_create(path: &Path, random: &dyn RandomSource) -> Result<Keyring, SecretsError> {
    if path.exists() {
        return load(path);
    }
    let (id, key) = new_key(random);
    let keyring = Keyring::single(&id, key).expect("generated ids are valid");
    write(path, &keyring)?;
    tracing::warn!(
        path = %path.display(),
        key_id = %id,
        "created the secrets key file; back it up: without it the stored signing secrets are lost"
    );
    Ok(keyring)
}

/// Writes `keyring` to `path` atomically: a 0600 temporary file beside it, synced, renamed over.
pub fn write(path: &Path, keyring: &Keyring) -> Result<(), SecretsError> {
    let write_error = |source| SecretsError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| DEFAULT_FILE_NAME.into());
    let temp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = (|| {
        let mut file = options.open(&temp)?;
        file.write_all(keyring.to_file_text().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(write_error)
}

/// The sealer for `path`: made there when absent if `create` (the embedded store), else read.
/// `None` without a key file (Redis, not configured).
pub fn open_sealer(
    path: Option<&Path>,
    create: bool,
    random: &dyn RandomSource,
) -> Result<Option<Arc<Sealer>>, SecretsError> {
    let Some(path) = path else {
        return Ok(None);
    };
    let keyring = if create {
        load_or_create(path, random)?
    } else {
        load(path)?
    };
    tracing::info!(
        path = %path.display(),
        primary = keyring.primary_id(),
        keys = ?keyring.ids(),
        "secrets key file loaded"
    );
    Ok(Some(Sealer::new(&keyring)))
}

/// Follows the key file until `shutdown`: on SIGHUP or a change, switches `sealer` to the file's
/// keyring and re-seals every record under its primary. A file that cannot be read keeps the
/// keyring in use (logged and counted); so does a key dropped from the file that records still
/// need, until the re-seal pass has moved them.
pub async fn follow(
    path: PathBuf,
    sealer: Arc<Sealer>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    mut trigger: reload::Trigger,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            fired = trigger.changed() => if !fired { return },
        }
        let keyring = match load(&path) {
            Ok(keyring) => keyring,
            Err(error) => {
                metrics.secrets_reload_failures.inc();
                tracing::error!(%error, "secrets key file not reloaded; keeping the keys in use");
                continue;
            }
        };
        sealer.replace(&keyring);
        metrics.secrets_reloads.inc();
        tracing::info!(
            path = %path.display(),
            primary = keyring.primary_id(),
            keys = ?keyring.ids(),
            "secrets key file reloaded"
        );
        match store.reseal().await {
            Ok(report) => {
                sealer.retire_unused(&report.sealed_under);
                let others: Vec<&String> = report
                    .sealed_under
                    .keys()
                    .filter(|id| **id != keyring.primary_id())
                    .collect();
                if others.is_empty() && report.refused.is_empty() {
                    tracing::info!(
                        primary = keyring.primary_id(),
                        "every stored record is sealed under the primary key; other keys may be removed"
                    );
                }
            }
            Err(error) => {
                tracing::warn!(%error, "re-sealing failed; it is tried again on the next reload");
            }
        }
    }
}
