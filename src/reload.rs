//! When to reload files the server read at start (the secrets key file, TLS certificates and CAs):
//! on SIGHUP, and when any of a set of files changes. A [`Trigger`] is a hint to read them again;
//! what to do with them is the caller's. Files are polled (modification time, length and inode,
//! so an atomic rename within the same second counts), which works on every filesystem and
//! needs no watcher crate.
//!
//! Invariant: SIGHUP is handled from the moment [`watch`] returns (the default action would end
//! the process), so call it before announcing readiness.

use std::{
    path::PathBuf,
    time::{Duration, SystemTime},
};

use tokio::sync::watch;

/// How often files are polled unless the caller says otherwise.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Fires after SIGHUP or a change to a watched file. Dropping every clone stops the watcher.
#[derive(Clone)]
pub struct Trigger {
    rx: watch::Receiver<u64>,
}

impl Trigger {
    /// Waits for the next reason to reload; false once the watcher has stopped.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp(path: &std::path::Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        inode,
    })
}

/// Starts watching `paths` (every `poll_every`) and SIGHUP. Must run inside a tokio runtime.
pub fn watch(paths: Vec<PathBuf>, poll_every: Duration) -> std::io::Result<Trigger> {
    let (tx, rx) = watch::channel(0u64);
    #[cfg(unix)]
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let mut stamps: Vec<Option<Stamp>> = paths.iter().map(|p| stamp(p)).collect();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(poll_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            #[cfg(unix)]
            let hangup = hangups.recv();
            #[cfg(not(unix))]
            let hangup = std::future::pending::<Option<()>>();
            let reason = tokio::select! {
                _ = tx.closed() => return,
                _ = hangup => "SIGHUP",
                _ = ticker.tick() => {
                    let now: Vec<Option<Stamp>> = paths.iter().map(|p| stamp(p)).collect();
                    if now == stamps {
                        continue;
                    }
                    stamps = now;
                    "a watched file changed"
                }
            };
            tracing::info!(reason, "reloading");
            tx.send_modify(|n| *n += 1);
        }
    });
    Ok(Trigger { rx })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fires_when_a_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("watched");
        std::fs::write(&path, "one").unwrap();
        let mut trigger = watch(vec![path.clone()], Duration::from_millis(20)).unwrap();
        let fresh = dir.path().join("fresh");
        std::fs::write(&fresh, "two").unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        let fired = tokio::time::timeout(Duration::from_secs(5), trigger.changed()).await;
        assert_eq!(fired.ok(), Some(true));
    }
}
