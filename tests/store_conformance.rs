//! One conformance suite for every `Store` implementation: each backend must pass the same
//! behaviour (atomic edits, revisions, change log, paging). Backends are listed at the bottom.

use std::sync::Arc;

use keyfence_admin::rules;
use keyfence_policy::model::{
    AllowlistEntry, Audit, Enforcement, KeyId, KeyRecord, KeyStatus, PartnerScope, Scope,
    SecretHash, SignatureScheme, UnixMillis,
};
use keyfence_store::{ChangesSince, KeyFilter, Store, StoreError};

fn audit() -> Audit {
    Audit {
        actor: "conformance".into(),
        at: UnixMillis(1_700_000_000_000),
    }
}

fn record(id: &str, partner: &str, env: &str) -> KeyRecord {
    KeyRecord {
        id: id.parse().unwrap(),
        partner_id: partner.parse().unwrap(),
        environment: env.parse().unwrap(),
        name: format!("{id} name"),
        display_prefix: "kf_test_abcd".into(),
        secret_hash: SecretHash::of(id),
        previous_secret: None,
        status: KeyStatus::Active,
        ip_allowlist_enabled: true,
        enforcement: Enforcement::Enforce,
        signature: SignatureScheme::HmacSha256 {
            secret: vec![7; 32],
        },
        require_nonce: false,
        rate_limit: None,
        expires_at: None,
        created: audit(),
        updated: audit(),
    }
}

fn entry(cidr: &str) -> AllowlistEntry {
    AllowlistEntry {
        cidr: cidr.parse().unwrap(),
        description: format!("why {cidr}"),
        added: audit(),
        expires_at: None,
    }
}

fn partner(p: &str, env: &str) -> PartnerScope {
    PartnerScope {
        partner_id: p.parse().unwrap(),
        environment: env.parse().unwrap(),
    }
}

pub async fn keys_round_trip(store: Arc<dyn Store>) {
    let created = store
        .insert_key(
            record("key_a", "acme", "production"),
            vec![entry("10.0.0.0/8")],
        )
        .await
        .unwrap();
    assert_eq!(created.revision, 1);
    let fetched = store.get_key(&"key_a".parse().unwrap()).await.unwrap();
    assert_eq!(fetched, created.value);
    let again = store
        .insert_key(record("key_a", "acme", "production"), vec![])
        .await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists(_))),
        "{again:?}"
    );
    let missing = store.get_key(&"key_missing".parse().unwrap()).await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
    let material = store
        .load_key(&"key_a".parse().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(material.entries, vec![entry("10.0.0.0/8")]);
    assert!(
        store
            .load_key(&"key_missing".parse().unwrap())
            .await
            .unwrap()
            .is_none()
    );
}

pub async fn failed_edits_change_nothing(store: Arc<dyn Store>) {
    store
        .insert_key(
            record("key_a", "acme", "production"),
            vec![entry("10.0.0.0/8")],
        )
        .await
        .unwrap();
    let scope = Scope::Key("key_a".parse().unwrap());
    let before = store.get_allowlist(&scope).await.unwrap();
    let result = store
        .modify_allowlist(
            &scope,
            Box::new(|_, list| {
                list.push(entry("192.0.2.0/24"));
                Err(StoreError::rejected("entries[1].cidr: bad"))
            }),
        )
        .await;
    assert!(matches!(result, Err(StoreError::Rejected { .. })));
    let after = store.get_allowlist(&scope).await.unwrap();
    assert_eq!(after.value, before.value);
    assert_eq!(after.revision, before.revision);
    let key_edit = store
        .modify_key(
            &"key_a".parse().unwrap(),
            Box::new(|record| {
                record.name = "changed".into();
                Err(StoreError::FailedPrecondition("no".into()))
            }),
        )
        .await;
    assert!(key_edit.is_err());
    assert_eq!(
        store.get_key(&"key_a".parse().unwrap()).await.unwrap().name,
        "key_a name"
    );
    match store.changes_since(before.revision).await.unwrap() {
        ChangesSince::Changes(changes) => assert!(changes.is_empty()),
        ChangesSince::Gap => panic!("no gap expected"),
    }
}

pub async fn revisions_and_change_log(store: Arc<dyn Store>) {
    let first = store
        .insert_key(record("key_a", "acme", "production"), vec![])
        .await
        .unwrap();
    let scope = Scope::Partner(partner("acme", "production"));
    let added = store
        .modify_allowlist(
            &scope,
            Box::new(|_, list| Ok(rules::add_entries(list, vec![entry("192.0.2.0/24")])?)),
        )
        .await
        .unwrap();
    let edited = store
        .modify_key(
            &"key_a".parse().unwrap(),
            Box::new(|r| {
                r.status = KeyStatus::Disabled;
                Ok(())
            }),
        )
        .await
        .unwrap();
    assert_eq!((first.revision, added.revision, edited.revision), (1, 2, 3));
    assert_eq!(edited.value.status, KeyStatus::Disabled);
    let ChangesSince::Changes(changes) = store.changes_since(0).await.unwrap() else {
        panic!("gap")
    };
    let scopes: Vec<_> = changes
        .iter()
        .map(|c| (c.revision, c.scope.clone()))
        .collect();
    assert_eq!(
        scopes,
        vec![
            (1, Scope::Key("key_a".parse().unwrap())),
            (2, scope.clone()),
            (3, Scope::Key("key_a".parse().unwrap())),
        ]
    );
    let ChangesSince::Changes(tail) = store.changes_since(2).await.unwrap() else {
        panic!("gap")
    };
    assert_eq!(tail.len(), 1);
    assert_eq!(
        store.changes_since(3).await.unwrap(),
        ChangesSince::Changes(vec![])
    );
    assert_eq!(
        store.changes_since(99).await.unwrap(),
        ChangesSince::Gap,
        "a future revision is a gap"
    );
    let state = store.load_all().await.unwrap();
    assert_eq!(state.revision, 3);
    assert_eq!(state.keys.len(), 1);
    assert_eq!(
        state.partner_lists,
        vec![(partner("acme", "production"), vec![entry("192.0.2.0/24")])]
    );
    assert_eq!(
        store
            .load_partner_entries(&partner("acme", "sandbox"))
            .await
            .unwrap(),
        vec![]
    );
    assert!(
        *store.watch().borrow() >= 3,
        "the hint channel saw the writes"
    );
}

pub async fn paging_and_filters(store: Arc<dyn Store>) {
    for i in 0..7 {
        let p = if i % 2 == 0 { "acme" } else { "globex" };
        store
            .insert_key(record(&format!("key_{i}"), p, "production"), vec![])
            .await
            .unwrap();
    }
    let mut after: Option<KeyId> = None;
    let mut seen = Vec::new();
    loop {
        let page = store
            .list_keys(&KeyFilter::default(), after.as_ref(), 3)
            .await
            .unwrap();
        assert!(page.keys.len() <= 3);
        seen.extend(page.keys.iter().map(|k| k.id.to_string()));
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, (0..7).map(|i| format!("key_{i}")).collect::<Vec<_>>());
    let filter = KeyFilter {
        partner_id: Some("acme".parse().unwrap()),
        environment: None,
    };
    let acme = store.list_keys(&filter, None, 100).await.unwrap();
    assert_eq!(acme.keys.len(), 4);
    assert!(acme.next_after.is_none());
}

pub async fn revoked_keys_reject_allowlist_edits(store: Arc<dyn Store>) {
    store
        .insert_key(record("key_a", "acme", "production"), vec![])
        .await
        .unwrap();
    store
        .modify_key(
            &"key_a".parse().unwrap(),
            Box::new(|r| {
                r.status = KeyStatus::Revoked;
                Ok(())
            }),
        )
        .await
        .unwrap();
    let result = store
        .modify_allowlist(
            &Scope::Key("key_a".parse().unwrap()),
            // The admin layer's rule, run on the key as the store's transaction reads it.
            Box::new(|key, list| {
                rules::ensure_editable(key)?;
                Ok(rules::add_entries(list, vec![entry("10.0.0.1")])?)
            }),
        )
        .await;
    assert!(
        matches!(&result, Err(StoreError::Rejected(cause)) if cause.to_string().contains("is revoked")),
        "{result:?}"
    );
    let missing = store
        .modify_allowlist(
            &Scope::Key("key_nope".parse().unwrap()),
            Box::new(|_, _| Ok(())),
        )
        .await;
    assert!(matches!(missing, Err(StoreError::NotFound(_))));
}

pub async fn concurrent_adds_all_survive(store: Arc<dyn Store>) {
    let scope = Scope::Partner(partner("acme", "production"));
    let mut tasks = Vec::new();
    for i in 0..32u8 {
        let store = store.clone();
        let scope = scope.clone();
        tasks.push(tokio::spawn(async move {
            store
                .modify_allowlist(
                    &scope,
                    Box::new(move |_, list| {
                        Ok(rules::add_entries(
                            list,
                            vec![entry(&format!("10.0.{i}.0/24"))],
                        )?)
                    }),
                )
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(store.get_allowlist(&scope).await.unwrap().value.len(), 32);
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            #[tokio::test]
            async fn keys_round_trip() {
                let (s, _g) = $make;
                super::keys_round_trip(s).await
            }
            #[tokio::test]
            async fn failed_edits_change_nothing() {
                let (s, _g) = $make;
                super::failed_edits_change_nothing(s).await
            }
            #[tokio::test]
            async fn revisions_and_change_log() {
                let (s, _g) = $make;
                super::revisions_and_change_log(s).await
            }
            #[tokio::test]
            async fn paging_and_filters() {
                let (s, _g) = $make;
                super::paging_and_filters(s).await
            }
            #[tokio::test]
            async fn revoked_keys_reject_allowlist_edits() {
                let (s, _g) = $make;
                super::revoked_keys_reject_allowlist_edits(s).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn concurrent_adds_all_survive() {
                let (s, _g) = $make;
                super::concurrent_adds_all_survive(s).await
            }
        }
    };
}

fn embedded() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let store = keyfence_store::embedded::EmbeddedStore::open(
        &dir.path().join("data"),
        keyfence_store::sealing::Sealer::ephemeral(),
    )
    .unwrap();
    (Arc::new(store), dir)
}

conformance!(embedded_store, embedded());

#[path = "common/redis.rs"]
mod redis_server;

fn redis() -> (Arc<dyn Store>, redis_server::RedisServer) {
    let server = redis_server::RedisServer::start();
    let store = keyfence_store::redis::RedisStore::connect(keyfence_store::redis::RedisOptions {
        url: server.url(),
        namespace: "conformance".into(),
        change_log_len: 100,
        sealer: Some(keyfence_store::sealing::Sealer::ephemeral()),
    })
    .unwrap();
    (store, server)
}

conformance!(redis_store, redis());

#[tokio::test]
async fn redis_change_log_reports_a_gap_past_its_length() {
    let server = redis_server::RedisServer::start();
    let store = keyfence_store::redis::RedisStore::connect(keyfence_store::redis::RedisOptions {
        url: server.url(),
        namespace: "gap".into(),
        change_log_len: 20,
        sealer: Some(keyfence_store::sealing::Sealer::ephemeral()),
    })
    .unwrap();
    store
        .insert_key(record("key_a", "acme", "production"), vec![])
        .await
        .unwrap();
    for _ in 0..25 {
        store
            .modify_key(&"key_a".parse().unwrap(), Box::new(|_| Ok(())))
            .await
            .unwrap();
    }
    assert_eq!(store.changes_since(1).await.unwrap(), ChangesSince::Gap);
    let ChangesSince::Changes(recent) = store.changes_since(15).await.unwrap() else {
        panic!("recent changes are kept")
    };
    assert_eq!(recent.len(), 11);
}

#[tokio::test]
async fn redis_namespaces_do_not_see_each_other() {
    let server = redis_server::RedisServer::start();
    let open = |ns: &str| {
        keyfence_store::redis::RedisStore::connect(keyfence_store::redis::RedisOptions {
            url: server.url(),
            namespace: ns.into(),
            change_log_len: 100,
            sealer: Some(keyfence_store::sealing::Sealer::ephemeral()),
        })
        .unwrap()
    };
    let (blue, green) = (open("blue"), open("green"));
    blue.insert_key(record("key_a", "acme", "production"), vec![])
        .await
        .unwrap();
    assert!(matches!(
        green.get_key(&"key_a".parse().unwrap()).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(green.load_all().await.unwrap().revision, 0);
}

#[tokio::test]
async fn redis_down_fails_fast_and_recovers() {
    let mut server = redis_server::RedisServer::start();
    let store = keyfence_store::redis::RedisStore::connect(keyfence_store::redis::RedisOptions {
        url: server.url(),
        namespace: "down".into(),
        change_log_len: 100,
        sealer: Some(keyfence_store::sealing::Sealer::ephemeral()),
    })
    .unwrap();
    store
        .insert_key(record("key_a", "acme", "production"), vec![])
        .await
        .unwrap();
    server.kill();
    let started = std::time::Instant::now();
    let result = store
        .insert_key(record("key_b", "acme", "production"), vec![])
        .await;
    assert!(
        matches!(result, Err(StoreError::Unavailable(_))),
        "{result:?}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "failed fast: {:?}",
        started.elapsed()
    );
    server.restart();
    let mut recovered = None;
    for _ in 0..100 {
        if let Ok(record) = store.get_key(&"key_a".parse().unwrap()).await {
            recovered = Some(record);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(
        recovered.is_some(),
        "the store reconnected and the data survived the restart"
    );
    store
        .insert_key(record("key_b", "acme", "production"), vec![])
        .await
        .unwrap();
}

#[tokio::test]
async fn embedded_store_survives_reopen_and_is_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data");
    let sealer = keyfence_store::sealing::Sealer::ephemeral();
    {
        let store = keyfence_store::embedded::EmbeddedStore::open(&path, sealer.clone()).unwrap();
        store
            .insert_key(
                record("key_a", "acme", "production"),
                vec![entry("10.0.0.0/8")],
            )
            .await
            .unwrap();
        let second = keyfence_store::embedded::EmbeddedStore::open(&path, sealer.clone());
        assert!(
            matches!(second, Err(StoreError::Unavailable(_))),
            "a second process may not open the same store"
        );
    }
    let store = keyfence_store::embedded::EmbeddedStore::open(&path, sealer).unwrap();
    let state = store.load_all().await.unwrap();
    assert_eq!(state.revision, 1);
    assert_eq!(state.keys[0].entries, vec![entry("10.0.0.0/8")]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}

#[tokio::test]
async fn embedded_change_log_reports_a_gap_past_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let store = keyfence_store::embedded::EmbeddedStore::open_with_change_log(
        &dir.path().join("data"),
        keyfence_store::sealing::Sealer::ephemeral(),
        20,
    )
    .unwrap();
    store
        .insert_key(record("key_a", "acme", "production"), vec![])
        .await
        .unwrap();
    let n = 25;
    for _ in 0..n {
        store
            .modify_key(&"key_a".parse().unwrap(), Box::new(|_| Ok(())))
            .await
            .unwrap();
    }
    assert_eq!(store.changes_since(1).await.unwrap(), ChangesSince::Gap);
    let ChangesSince::Changes(recent) = store.changes_since(n - 10).await.unwrap() else {
        panic!("recent changes are kept")
    };
    assert_eq!(recent.len(), 11);
}
