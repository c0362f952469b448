//! Keeps the in-memory policy snapshot in step with the store.
//!
//! The store's change log is the truth; its notifications only say "look". [`PolicySync`]
//! applies the changes after the snapshot's revision, recompiling only the scopes they name, and
//! reloads everything when it cannot prove it saw every revision (the log has a gap). It also
//! checks the log on a timer, and on demand ([`PolicySync::nudge`]), because notifications can be
//! lost. One task applies at a time, so snapshots are published in revision order.
//!
//! A record the store refuses ([`StoreError::Refused`]: it failed its integrity check) is never
//! trusted: a refused key is left out of the snapshot (so denied), a refused partner list
//! allows nothing. Each refusal is logged with the record it names and counted.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::sync::{Mutex, Notify, watch};

use keyfence_policy::{
    clock::Clock,
    model::{Scope, UnixMillis},
    snapshot::{PolicySnapshot, SharedPolicy},
};
use keyfence_store::{ChangesSince, Store, StoreError, StoreResult};

use crate::system::SystemClock;

pub struct PolicySync {
    store: Arc<dyn Store>,
    policy: Arc<SharedPolicy>,
    /// The revision of the published snapshot, for callers that wait for their own writes.
    applied: watch::Sender<u64>,
    /// Serializes snapshot writers.
    apply_lock: Mutex<()>,
    nudge: Notify,
    /// When the snapshot was last confirmed current against the store.
    confirmed_at: AtomicI64,
    full_reloads: AtomicU64,
    resyncs: AtomicU64,
    refusals: AtomicU64,
}

/// What one catch-up did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CatchUp {
    UpToDate,
    Applied { revision: u64 },
    Reloaded { revision: u64 },
}

impl PolicySync {
    pub fn new(store: Arc<dyn Store>, policy: Arc<SharedPolicy>) -> Arc<PolicySync> {
        Arc::new(PolicySync {
            store,
            policy,
            applied: watch::Sender::new(0),
            apply_lock: Mutex::new(()),
            nudge: Notify::new(),
            confirmed_at: AtomicI64::new(i64::MIN),
            full_reloads: AtomicU64::new(0),
            resyncs: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        })
    }

    pub fn policy(&self) -> &Arc<SharedPolicy> {
        &self.policy
    }

    /// How many times everything was loaded (the first load included).
    pub fn full_reloads(&self) -> u64 {
        self.full_reloads.load(Ordering::Relaxed)
    }

    /// How many times changes were found that no notification had announced.
    pub fn resyncs(&self) -> u64 {
        self.resyncs.load(Ordering::Relaxed)
    }

    /// How many times a stored record was refused (failed its integrity check) while loading.
    pub fn refused_records(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// Logs and counts a record left out because it failed its integrity check.
    fn refused(&self, scope: &Scope, error: &dyn std::fmt::Display) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            %scope,
            %error,
            "stored record refused: it failed its integrity check and is not used (a key is denied) until it is restored"
        );
    }

    /// How long ago the snapshot was last confirmed against the store; `None` if never.
    pub fn unconfirmed_for(&self, now: UnixMillis) -> Option<Duration> {
        let at = self.confirmed_at.load(Ordering::Relaxed);
        (at != i64::MIN).then(|| Duration::from_millis(now.0.saturating_sub(at).max(0) as u64))
    }

    /// Asks the follower to check the change log now.
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// Loads and compiles everything.
    pub async fn full_reload(&self) -> StoreResult<u64> {
        let _guard = self.apply_lock.lock().await;
        self.full_reload_locked().await
    }

    async fn full_reload_locked(&self) -> StoreResult<u64> {
        let started = std::time::Instant::now();
        let state = self.store.load_all().await?;
        for refusal in &state.refused {
            self.refused(&refusal.scope, &refusal.message);
        }
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
        self.confirmed_at
            .store(SystemClock.now().0, Ordering::Relaxed);
        self.applied.send_replace(revision);
        Ok(revision)
    }

    /// Applies every change after the snapshot's revision.
    pub async fn catch_up(&self) -> StoreResult<CatchUp> {
        let _guard = self.apply_lock.lock().await;
        let current = self.policy.load_full();
        if !current.is_loaded() {
            let revision = self.full_reload_locked().await?;
            return Ok(CatchUp::Reloaded { revision });
        }
        let checked_at = SystemClock.now();
        let changes = match self.store.changes_since(current.revision()).await? {
            ChangesSince::Gap => {
                tracing::warn!(
                    revision = current.revision(),
                    "change log gap; reloading everything"
                );
                let revision = self.full_reload_locked().await?;
                return Ok(CatchUp::Reloaded { revision });
            }
            ChangesSince::Changes(changes) => changes,
        };
        let Some(last) = changes.last().map(|c| c.revision) else {
            self.confirmed_at.store(checked_at.0, Ordering::Relaxed);
            return Ok(CatchUp::UpToDate);
        };
        let mut next = PolicySnapshot::clone(&current);
        let mut done = HashSet::new();
        for change in changes {
            if !done.insert(change.scope.clone()) {
                continue;
            }
            match &change.scope {
                Scope::Key(id) => match self.store.load_key(id).await {
                    Ok(Some(material)) => next.upsert_key(material),
                    Ok(None) => {
                        next.remove_key(id);
                    }
                    Err(error @ StoreError::Refused { .. }) => {
                        self.refused(&change.scope, &error);
                        next.remove_key(id);
                    }
                    Err(error) => return Err(error),
                },
                Scope::Partner(scope) => {
                    let entries = match self.store.load_partner_entries(scope).await {
                        Ok(entries) => entries,
                        Err(error @ StoreError::Refused { .. }) => {
                            self.refused(&change.scope, &error);
                            Vec::new()
                        }
                        Err(error) => return Err(error),
                    };
                    next.set_partner_entries(scope.clone(), &entries);
                }
            }
        }
        next.set_revision(last);
        self.policy.publish(next);
        self.confirmed_at.store(checked_at.0, Ordering::Relaxed);
        self.applied.send_replace(last);
        tracing::debug!(
            revision = last,
            scopes = done.len(),
            "policy snapshot updated"
        );
        Ok(CatchUp::Applied { revision: last })
    }

    /// Waits until the published snapshot reaches `revision`; false on timeout.
    pub async fn wait_for_revision(&self, revision: u64, timeout: Duration) -> bool {
        let mut applied = self.applied.subscribe();
        let policy = self.policy.clone();
        tokio::time::timeout(
            timeout,
            applied.wait_for(|r| *r >= revision && policy.load().is_loaded()),
        )
        .await
        .is_ok_and(|r| r.is_ok())
    }

    /// Waits until the first full load.
    pub async fn wait_until_loaded(&self) {
        let mut applied = self.applied.subscribe();
        let policy = self.policy.clone();
        let _ = applied.wait_for(|_| policy.load().is_loaded()).await;
    }

    /// Follows the store until `shutdown` resolves: on every notification, on every nudge, and
    /// every `check_interval` in case a notification was lost. Store errors keep the last
    /// snapshot and are retried on the next wake.
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
                        // The store dropped its sender; keep polling on the timer.
                        hints = self.store.watch();
                        ticker.tick().await;
                    }
                }
                _ = self.nudge.notified() => {}
                _ = ticker.tick() => {}
            }
            let announced = *hints.borrow_and_update();
            match self.catch_up().await {
                Ok(CatchUp::Applied { revision }) if revision > announced => {
                    self.resyncs.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        revision,
                        announced,
                        "resynced changes no notification announced"
                    );
                }
                Ok(CatchUp::Reloaded { revision }) => {
                    tracing::info!(revision, "resynced by a full reload");
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::warn!(%error, "policy sync failed; deciding from the last snapshot");
                }
            }
        }
    }
}
