//! Keeps the in-memory policy snapshot in step with the store.
//!
//! The store's change log is the truth; its notifications only say "look". [`PolicySync`]
//! applies the changes after the snapshot's revision, recompiling only the scopes they name, and
//! reloads everything when it cannot prove it saw every revision (the log has a gap). One task
//! applies at a time, so snapshots are published in revision order.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Mutex, watch};

use crate::{
    policy::{
        model::Scope,
        snapshot::{PolicySnapshot, SharedPolicy},
    },
    store::{ChangesSince, Store, StoreResult},
};

pub struct PolicySync {
    store: Arc<dyn Store>,
    policy: Arc<SharedPolicy>,
    /// The revision of the published snapshot, for callers that wait for their own writes.
    applied: watch::Sender<u64>,
    /// Serializes snapshot writers.
    apply_lock: Mutex<()>,
    full_reloads: AtomicU64,
}

impl PolicySync {
    pub fn new(store: Arc<dyn Store>, policy: Arc<SharedPolicy>) -> Arc<PolicySync> {
        Arc::new(PolicySync {
            store,
            policy,
            applied: watch::Sender::new(0),
            apply_lock: Mutex::new(()),
            full_reloads: AtomicU64::new(0),
        })
    }

    pub fn policy(&self) -> &Arc<SharedPolicy> {
        &self.policy
    }

    /// How many times everything was reloaded (the first load included).
    pub fn full_reloads(&self) -> u64 {
        self.full_reloads.load(Ordering::Relaxed)
    }

    /// Loads and compiles everything.
    pub async fn full_reload(&self) -> StoreResult<()> {
        let _guard = self.apply_lock.lock().await;
        self.full_reload_locked().await
    }

    async fn full_reload_locked(&self) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let state = self.store.load_all().await?;
        let snapshot = PolicySnapshot::build(state.revision, state.keys, state.partner_lists);
        let revision = snapshot.revision();
        tracing::info!(
            revision,
            keys = snapshot.key_count(),
            entries = snapshot.entry_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "policy snapshot loaded"
        );
        self.policy.publish(snapshot);
        self.full_reloads.fetch_add(1, Ordering::Relaxed);
        self.applied.send_replace(revision);
        Ok(())
    }

    /// Applies every change after the snapshot's revision.
    pub async fn catch_up(&self) -> StoreResult<()> {
        let _guard = self.apply_lock.lock().await;
        let current = self.policy.load_full();
        if !current.is_loaded() {
            return self.full_reload_locked().await;
        }
        let changes = match self.store.changes_since(current.revision()).await? {
            ChangesSince::Gap => {
                tracing::warn!(
                    revision = current.revision(),
                    "change log gap; reloading everything"
                );
                return self.full_reload_locked().await;
            }
            ChangesSince::Changes(changes) => changes,
        };
        let Some(last) = changes.last().map(|c| c.revision) else {
            return Ok(());
        };
        let mut next = PolicySnapshot::clone(&current);
        let mut done = std::collections::HashSet::new();
        for change in changes {
            if !done.insert(change.scope.clone()) {
                continue;
            }
            match &change.scope {
                Scope::Key(id) => match self.store.load_key(id).await? {
                    Some(material) => next.upsert_key(material),
                    None => {
                        next.remove_key(id);
                    }
                },
                Scope::Partner(scope) => {
                    let entries = self.store.load_partner_entries(scope).await?;
                    next.set_partner_entries(scope.clone(), &entries);
                }
            }
        }
        next.set_revision(last);
        self.policy.publish(next);
        self.applied.send_replace(last);
        tracing::debug!(revision = last, "policy snapshot updated");
        Ok(())
    }

    /// Waits until the published snapshot reaches `revision`; false on timeout.
    pub async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        tokio::time::timeout(timeout, applied.wait_for(|r| *r >= revision))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Follows the store until `shutdown` resolves: on every notification, and every
    /// `check_interval` in case one was missed.
    pub async fn run(
        self: Arc<Self>,
        check_interval: Duration,
        shutdown: impl Future<Output = ()>,
    ) {
        let mut hints = self.store.watch();
        let mut ticker = tokio::time::interval(check_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                changed = hints.changed() => {
                    if changed.is_err() {
                        // The store dropped its sender; keep polling.
                        hints = self.store.watch();
                    }
                }
                _ = ticker.tick() => {}
            }
            if let Err(error) = self.catch_up().await {
                tracing::warn!(%error, "policy sync failed; keeping the last snapshot");
            }
        }
    }
}
