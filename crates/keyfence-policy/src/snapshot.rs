//! The policy snapshot: every key compiled for deciding, swapped as a whole without locks.
//!
//! A snapshot is immutable. Its maps are persistent (`imbl`), so deriving the next snapshot from
//! the current one shares everything untouched: a change to one key costs that key's compile plus
//! O(log n) map updates, and a partner-scope change recompiles only that partner's keys in that
//! environment. [`SharedPolicy`] holds the current snapshot in an `ArcSwap`: readers load it
//! wait-free and never see a half-applied change; writers build the next one aside and swap it in.

use std::{
    hash::{BuildHasher, Hasher},
    sync::Arc,
};

use arc_swap::ArcSwap;

use super::{
    allowlist::{CompiledAllowlist, EntryRule},
    model::{
        AllowlistEntry, Enforcement, Environment, KeyId, KeyRecord, KeyStatus, PartnerId,
        PartnerScope, PreviousSecret, SecretHash,
    },
    rate_limit::RateLimiter,
    signature::Verifier,
};

/// A key, ready for the hot path.
pub struct CompiledKey {
    pub id: KeyId,
    pub partner_id: PartnerId,
    pub environment: Environment,
    pub status: KeyStatus,
    pub expires_at: Option<super::model::UnixMillis>,
    pub enforcement: Enforcement,
    pub ip_allowlist_enabled: bool,
    /// `None` when the stored key material is unusable: every signed request is then denied.
    pub verifier: Option<Verifier>,
    pub requires_signature: bool,
    /// A signed request without a nonce is denied (`NonceMissing`).
    pub requires_nonce: bool,
    pub rate_limiter: Option<Arc<RateLimiter>>,
    pub secret_hash: SecretHash,
    pub previous_secret: Option<PreviousSecret>,
    pub allowlist: CompiledAllowlist,
    /// The key's own entries, kept so a partner-scope change can recompile without the store.
    own_rules: Arc<[EntryRule]>,
}

impl CompiledKey {
    fn compile(
        record: &KeyRecord,
        own_rules: Arc<[EntryRule]>,
        partner_rules: &[EntryRule],
        previous: Option<&CompiledKey>,
    ) -> CompiledKey {
        let verifier = Verifier::new(&record.signature).ok();
        let requires_signature = !matches!(record.signature, super::model::SignatureScheme::None);
        // Keep the limiter's state across recompiles unless the limit itself changed.
        let rate_limiter = match (
            record.rate_limit,
            previous.and_then(|p| p.rate_limiter.clone()),
        ) {
            (Some(limit), Some(existing)) if existing.limit() == limit => Some(existing),
            (Some(limit), _) => RateLimiter::new(limit).map(Arc::new),
            (None, _) => None,
        };
        CompiledKey {
            id: record.id.clone(),
            partner_id: record.partner_id.clone(),
            environment: record.environment.clone(),
            status: record.status,
            expires_at: record.expires_at,
            enforcement: record.enforcement,
            ip_allowlist_enabled: record.ip_allowlist_enabled,
            verifier,
            requires_signature,
            requires_nonce: record.require_nonce,
            rate_limiter,
            secret_hash: record.secret_hash,
            previous_secret: record.previous_secret.clone(),
            allowlist: CompiledAllowlist::compile(own_rules.iter(), partner_rules.iter()),
            own_rules,
        }
    }

    fn recompile_with_partner(&self, partner_rules: &[EntryRule]) -> CompiledKey {
        CompiledKey {
            id: self.id.clone(),
            partner_id: self.partner_id.clone(),
            environment: self.environment.clone(),
            status: self.status,
            expires_at: self.expires_at,
            enforcement: self.enforcement,
            ip_allowlist_enabled: self.ip_allowlist_enabled,
            verifier: self.verifier.clone(),
            requires_signature: self.requires_signature,
            requires_nonce: self.requires_nonce,
            rate_limiter: self.rate_limiter.clone(),
            secret_hash: self.secret_hash,
            previous_secret: self.previous_secret.clone(),
            allowlist: CompiledAllowlist::compile(self.own_rules.iter(), partner_rules.iter()),
            own_rules: self.own_rules.clone(),
        }
    }

    pub fn partner_scope(&self) -> PartnerScope {
        PartnerScope {
            partner_id: self.partner_id.clone(),
            environment: self.environment.clone(),
        }
    }
}

/// SHA-256 output is already uniform: its first eight bytes are a hash, and hashing it again
/// would only cost time on the hot path. (A caller cannot aim presented keys at one bucket without
/// SHA-256 preimages.)
#[derive(Clone, Copy, Default)]
pub struct DigestPrefixHasher;

pub struct DigestPrefix(u64);

impl BuildHasher for DigestPrefixHasher {
    type Hasher = DigestPrefix;
    fn build_hasher(&self) -> DigestPrefix {
        DigestPrefix(0)
    }
}

impl Hasher for DigestPrefix {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(word);
        }
    }
}

impl std::hash::Hash for SecretHashKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.as_bytes()[..8]);
    }
}

/// `SecretHash` keyed by its digest prefix (see [`DigestPrefixHasher`]).
#[derive(Clone, Copy, PartialEq, Eq)]
struct SecretHashKey(SecretHash);

type ByHash = imbl::GenericHashMap<
    SecretHashKey,
    Arc<CompiledKey>,
    DigestPrefixHasher,
    imbl::shared_ptr::DefaultSharedPtr,
>;

/// One consistent view of every key at a store revision.
#[derive(Clone)]
pub struct PolicySnapshot {
    revision: u64,
    /// Whether this snapshot came from the store (false only for the empty one at start).
    loaded: bool,
    /// Current and still-in-grace previous secret hashes → key.
    by_hash: ByHash,
    by_id: imbl::HashMap<KeyId, Arc<CompiledKey>>,
    partner_rules: imbl::HashMap<PartnerScope, Arc<[EntryRule]>>,
    partner_keys: imbl::HashMap<PartnerScope, imbl::HashSet<KeyId>>,
    entry_count: usize,
}

/// A key and its own allowlist, as the store hands them over.
pub struct KeyMaterial {
    pub record: KeyRecord,
    pub entries: Vec<AllowlistEntry>,
}

impl PolicySnapshot {
    /// The snapshot before anything was loaded: it knows no key, so it denies everything.
    pub fn unloaded() -> PolicySnapshot {
        PolicySnapshot {
            revision: 0,
            loaded: false,
            by_hash: ByHash::with_hasher(DigestPrefixHasher),
            by_id: imbl::HashMap::new(),
            partner_rules: imbl::HashMap::new(),
            partner_keys: imbl::HashMap::new(),
            entry_count: 0,
        }
    }

    /// Compiles everything from a full load of the store.
    pub fn build(
        revision: u64,
        keys: impl IntoIterator<Item = KeyMaterial>,
        partner_lists: impl IntoIterator<Item = (PartnerScope, Vec<AllowlistEntry>)>,
    ) -> PolicySnapshot {
        let mut snapshot = PolicySnapshot::unloaded();
        snapshot.loaded = true;
        snapshot.revision = revision;
        for (scope, entries) in partner_lists {
            let rules: Arc<[EntryRule]> = entries.iter().map(EntryRule::from).collect();
            if !rules.is_empty() {
                snapshot.entry_count += rules.len();
                snapshot.partner_rules.insert(scope, rules);
            }
        }
        for key in keys {
            snapshot.upsert_key(key);
        }
        snapshot
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded
    }

    pub fn key_count(&self) -> usize {
        self.by_id.len()
    }

    /// Allowlist entries held: keys' own plus partners'.
    pub fn entry_count(&self) -> usize {
        self.entry_count
    }

    /// The key a presented secret belongs to (current or rotated-out secret).
    pub fn key_by_hash(&self, hash: &SecretHash) -> Option<&Arc<CompiledKey>> {
        self.by_hash.get(&SecretHashKey(*hash))
    }

    pub fn key_by_id(&self, id: &KeyId) -> Option<&Arc<CompiledKey>> {
        self.by_id.get(id)
    }

    /// Marks the snapshot as reflecting the store at `revision`.
    pub fn set_revision(&mut self, revision: u64) {
        self.revision = revision;
        self.loaded = true;
    }

    /// Inserts or recompiles one key.
    pub fn upsert_key(&mut self, material: KeyMaterial) {
        let KeyMaterial { record, entries } = material;
        let previous = self.remove_key(&record.id);
        let own_rules: Arc<[EntryRule]> = entries.iter().map(EntryRule::from).collect();
        let scope = record.partner_scope();
        let partner_rules = self.partner_rules.get(&scope).cloned();
        let compiled = Arc::new(CompiledKey::compile(
            &record,
            own_rules,
            partner_rules.as_deref().unwrap_or(&[]),
            previous.as_deref(),
        ));
        self.entry_count += compiled.own_rules.len();
        self.index(compiled);
        self.partner_keys
            .entry(scope)
            .or_default()
            .insert(record.id);
    }

    /// Forgets a key; returns what it was.
    pub fn remove_key(&mut self, id: &KeyId) -> Option<Arc<CompiledKey>> {
        let existing = self.by_id.remove(id)?;
        self.by_hash.remove(&SecretHashKey(existing.secret_hash));
        if let Some(previous) = &existing.previous_secret {
            self.by_hash.remove(&SecretHashKey(previous.hash));
        }
        let scope = existing.partner_scope();
        if let Some(keys) = self.partner_keys.get_mut(&scope) {
            keys.remove(id);
            if keys.is_empty() {
                self.partner_keys.remove(&scope);
            }
        }
        self.entry_count -= existing.own_rules.len();
        Some(existing)
    }

    /// Replaces a partner's entries in one environment and recompiles that partner's keys there.
    pub fn set_partner_entries(&mut self, scope: PartnerScope, entries: &[AllowlistEntry]) {
        let rules: Arc<[EntryRule]> = entries.iter().map(EntryRule::from).collect();
        let old_len = self.partner_rules.get(&scope).map_or(0, |r| r.len());
        self.entry_count = self.entry_count - old_len + rules.len();
        if rules.is_empty() {
            self.partner_rules.remove(&scope);
        } else {
            self.partner_rules.insert(scope.clone(), rules.clone());
        }
        let Some(key_ids) = self.partner_keys.get(&scope).cloned() else {
            return;
        };
        for id in key_ids.iter() {
            if let Some(existing) = self.by_id.get(id).cloned() {
                self.index(Arc::new(existing.recompile_with_partner(&rules)));
            }
        }
    }

    fn index(&mut self, compiled: Arc<CompiledKey>) {
        self.by_hash
            .insert(SecretHashKey(compiled.secret_hash), compiled.clone());
        if let Some(previous) = &compiled.previous_secret {
            self.by_hash
                .insert(SecretHashKey(previous.hash), compiled.clone());
        }
        self.by_id.insert(compiled.id.clone(), compiled);
    }
}

/// The current snapshot, shared by every decision.
pub struct SharedPolicy {
    current: ArcSwap<PolicySnapshot>,
}

impl Default for SharedPolicy {
    fn default() -> Self {
        SharedPolicy {
            current: ArcSwap::from_pointee(PolicySnapshot::unloaded()),
        }
    }
}

impl SharedPolicy {
    /// The current snapshot, without taking a lock.
    pub fn load(&self) -> arc_swap::Guard<Arc<PolicySnapshot>> {
        self.current.load()
    }

    pub fn load_full(&self) -> Arc<PolicySnapshot> {
        self.current.load_full()
    }

    /// Publishes the next snapshot. Callers serialize writes among themselves (one sync task).
    pub fn publish(&self, next: PolicySnapshot) {
        self.current.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        fixtures::{entry, record},
        model::UnixMillis,
    };

    fn scope(partner: &str, env: &str) -> PartnerScope {
        PartnerScope {
            partner_id: partner.parse().unwrap(),
            environment: env.parse().unwrap(),
        }
    }

    #[test]
    fn partner_change_recompiles_only_that_partner_and_environment() {
        let keys = vec![
            KeyMaterial {
                record: record("key_a", "acme", "production", "sa"),
                entries: vec![],
            },
            KeyMaterial {
                record: record("key_b", "acme", "sandbox", "sb"),
                entries: vec![],
            },
            KeyMaterial {
                record: record("key_c", "other", "production", "sc"),
                entries: vec![],
            },
        ];
        let before = PolicySnapshot::build(1, keys, vec![]);
        let mut after = before.clone();
        after.set_partner_entries(scope("acme", "production"), &[entry("192.0.2.0/24")]);
        let ip = "192.0.2.9".parse().unwrap();
        let now = UnixMillis(1);
        let a = after.key_by_id(&"key_a".parse().unwrap()).unwrap();
        assert!(a.allowlist.lookup(ip, now).is_some());
        let b = after.key_by_id(&"key_b".parse().unwrap()).unwrap();
        assert!(
            b.allowlist.lookup(ip, now).is_none(),
            "sandbox key untouched"
        );
        // Untouched keys are the very same compiled objects: nothing was recompiled for them.
        let c_before = before.key_by_id(&"key_c".parse().unwrap()).unwrap();
        let c_after = after.key_by_id(&"key_c".parse().unwrap()).unwrap();
        assert!(Arc::ptr_eq(c_before, c_after));
        assert!(Arc::ptr_eq(
            before.key_by_id(&"key_b".parse().unwrap()).unwrap(),
            b
        ));
        // The old snapshot is unchanged.
        let a_before = before.key_by_id(&"key_a".parse().unwrap()).unwrap();
        assert!(a_before.allowlist.lookup(ip, now).is_none());
        assert_eq!(after.entry_count(), 1);
    }

    #[test]
    fn key_upsert_keeps_partner_entries_and_reindexes_hashes() {
        let partner = vec![(scope("acme", "production"), vec![entry("10.0.0.0/8")])];
        let mut snapshot = PolicySnapshot::build(
            1,
            vec![KeyMaterial {
                record: record("key_a", "acme", "production", "old"),
                entries: vec![entry("192.0.2.1")],
            }],
            partner,
        );
        assert_eq!(snapshot.entry_count(), 2);
        let mut rotated = record("key_a", "acme", "production", "new");
        rotated.previous_secret = Some(PreviousSecret {
            hash: SecretHash::of("old"),
            valid_until: UnixMillis(10),
        });
        snapshot.upsert_key(KeyMaterial {
            record: rotated,
            entries: vec![],
        });
        assert!(snapshot.key_by_hash(&SecretHash::of("new")).is_some());
        assert!(snapshot.key_by_hash(&SecretHash::of("old")).is_some());
        let key = snapshot.key_by_id(&"key_a".parse().unwrap()).unwrap();
        assert!(
            key.allowlist
                .lookup("10.1.1.1".parse().unwrap(), UnixMillis(0))
                .is_some()
        );
        assert!(
            key.allowlist
                .lookup("192.0.2.1".parse().unwrap(), UnixMillis(0))
                .is_none()
        );
        assert_eq!(snapshot.entry_count(), 1);
        snapshot.upsert_key(KeyMaterial {
            record: record("key_a", "acme", "production", "newer"),
            entries: vec![],
        });
        assert!(snapshot.key_by_hash(&SecretHash::of("old")).is_none());
        assert!(snapshot.key_by_hash(&SecretHash::of("new")).is_none());
        assert!(snapshot.remove_key(&"key_a".parse().unwrap()).is_some());
        assert!(snapshot.key_by_hash(&SecretHash::of("newer")).is_none());
        assert_eq!(snapshot.key_count(), 0);
    }
}
