//! PolicySync against a real store: incremental apply, reload on a gap, following notifications.

use std::{sync::Arc, time::Duration};

use keyfence::sync::PolicySync;
use keyfence_policy::{
    fixtures::{self, entry},
    model::{KeyRecord, KeyStatus, SecretHash, UnixMillis},
    snapshot::SharedPolicy,
};
use keyfence_store::{Store, embedded::EmbeddedStore};

fn record(id: &str) -> KeyRecord {
    fixtures::record(id, "acme", "production", id)
}

fn setup(change_log_len: u64) -> (Arc<dyn Store>, Arc<PolicySync>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        EmbeddedStore::open_with_change_log(
            &dir.path().join("d"),
            keyfence_store::sealing::Sealer::ephemeral(),
            change_log_len,
        )
        .unwrap(),
    );
    let sync = PolicySync::new(store.clone(), Arc::new(SharedPolicy::default()));
    (store, sync, dir)
}

#[tokio::test]
async fn applies_changes_incrementally() {
    let (store, sync, _dir) = setup(100);
    sync.full_reload().await.unwrap();
    assert_eq!(sync.full_reloads(), 1);
    store
        .insert_key(record("key_a"), vec![entry("10.0.0.0/8")])
        .await
        .unwrap();
    store.insert_key(record("key_b"), vec![]).await.unwrap();
    let removed = store
        .modify_key(
            &"key_b".parse().unwrap(),
            Box::new(|r| {
                r.status = KeyStatus::Revoked;
                Ok(())
            }),
        )
        .await
        .unwrap();
    sync.catch_up().await.unwrap();
    let snapshot = sync.policy().load_full();
    assert_eq!(snapshot.revision(), removed.revision);
    assert_eq!(snapshot.key_count(), 2);
    assert_eq!(
        snapshot
            .key_by_id(&"key_b".parse().unwrap())
            .unwrap()
            .status,
        KeyStatus::Revoked
    );
    assert!(
        snapshot
            .key_by_hash(&SecretHash::of("key_a"))
            .unwrap()
            .allowlist
            .lookup("10.1.1.1".parse().unwrap(), UnixMillis(0))
            .is_some()
    );
    assert_eq!(
        sync.full_reloads(),
        1,
        "no full reload for incremental changes"
    );
}

#[tokio::test]
async fn reloads_everything_after_a_gap() {
    let (store, sync, _dir) = setup(3);
    sync.full_reload().await.unwrap();
    for i in 0..8 {
        store
            .insert_key(record(&format!("key_{i}")), vec![])
            .await
            .unwrap();
    }
    sync.catch_up().await.unwrap();
    assert_eq!(sync.full_reloads(), 2, "the gap forced a reload");
    let snapshot = sync.policy().load_full();
    assert_eq!(snapshot.key_count(), 8);
    assert_eq!(snapshot.revision(), 8);
}

#[tokio::test]
async fn follows_the_store_by_itself() {
    let (store, sync, _dir) = setup(100);
    sync.full_reload().await.unwrap();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(sync.clone().run(Duration::from_secs(3600), async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));
    let written = store.insert_key(record("key_a"), vec![]).await.unwrap();
    assert!(
        sync.wait_for_revision(written.revision, Duration::from_secs(5))
            .await,
        "the notification was followed"
    );
    assert_eq!(sync.policy().load().key_count(), 1);
    assert!(
        !sync
            .wait_for_revision(written.revision + 1, Duration::from_millis(100))
            .await
    );
    stop_tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
