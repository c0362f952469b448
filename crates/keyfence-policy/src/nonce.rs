//! An in-process ledger of nonces seen inside the signature window.
//!
//! A nonce is remembered per key until its request's timestamp leaves the window; after that the
//! timestamp check rejects a replay anyway, so the entry can go. The ledger is sharded so that
//! concurrent decisions for different keys rarely meet on one lock, and each shard purges expired
//! entries when it has doubled in size since its last purge.

use std::{collections::HashMap, sync::Mutex};

use sha2::{Digest, Sha256};

use super::model::{KeyId, UnixMillis};

const SHARDS: usize = 16;

#[derive(Default)]
struct Shard {
    /// Truncated SHA-256 of (key id, nonce) → when the entry may be forgotten.
    seen: HashMap<[u8; 16], UnixMillis>,
    purge_at_len: usize,
}

pub struct NonceLedger {
    shards: [Mutex<Shard>; SHARDS],
}

impl Default for NonceLedger {
    fn default() -> Self {
        NonceLedger {
            shards: std::array::from_fn(|_| Mutex::new(Shard::default())),
        }
    }
}

impl NonceLedger {
    /// Records the nonce and answers whether it was fresh. With `consume == false` (a dry run) it
    /// only answers.
    pub fn claim(
        &self,
        key: &KeyId,
        nonce: &str,
        forget_after: UnixMillis,
        now: UnixMillis,
        consume: bool,
    ) -> bool {
        let fingerprint = fingerprint(key, nonce);
        let shard = &self.shards[usize::from(fingerprint[0]) % SHARDS];
        let mut shard = shard
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if shard
            .seen
            .get(&fingerprint)
            .is_some_and(|&until| now < until)
        {
            return false;
        }
        if consume {
            shard.seen.insert(fingerprint, forget_after);
            if shard.seen.len() > shard.purge_at_len {
                shard.seen.retain(|_, until| now < *until);
                shard.purge_at_len = (shard.seen.len() * 2).max(1024);
            }
        }
        true
    }

    /// Takes back a nonce a refused request claimed (its claim could not be made durable), so
    /// that the legitimate retry is not denied as a replay.
    pub fn release(&self, key: &KeyId, nonce: &str) {
        let fingerprint = fingerprint(key, nonce);
        self.shard(&fingerprint).seen.remove(&fingerprint);
    }

    /// Remembers a nonce read back from a journal (see [`fingerprint`]) until `forget_after`.
    pub fn restore(&self, fingerprint: [u8; 16], forget_after: UnixMillis) {
        self.shard(&fingerprint)
            .seen
            .insert(fingerprint, forget_after);
    }

    fn shard(&self, fingerprint: &[u8; 16]) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[usize::from(fingerprint[0]) % SHARDS]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).seen.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What the ledger remembers of a nonce: a truncated SHA-256 of the key id and the nonce, so that
/// neither is kept (or journaled) in the clear.
pub fn fingerprint(key: &KeyId, nonce: &str) -> [u8; 16] {
    let mut hasher = Sha256::new();
    hasher.update(key.as_str().as_bytes());
    hasher.update([0u8]);
    hasher.update(nonce.as_bytes());
    let digest = hasher.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_use_inside_the_window_is_refused() {
        let ledger = NonceLedger::default();
        let key: KeyId = "key_a".parse().unwrap();
        let other: KeyId = "key_b".parse().unwrap();
        let now = UnixMillis(1_000);
        let until = UnixMillis(2_000);
        assert!(
            ledger.claim(&key, "n1", until, now, false),
            "dry run of a fresh nonce"
        );
        assert!(ledger.claim(&key, "n1", until, now, true));
        assert!(!ledger.claim(&key, "n1", until, now, true));
        assert!(!ledger.claim(&key, "n1", until, now, false));
        // Nonces are per key.
        assert!(ledger.claim(&other, "n1", until, now, true));
        // After the window the entry is forgotten.
        assert!(ledger.claim(&key, "n1", UnixMillis(3_000), until, true));
    }

    #[test]
    fn a_released_nonce_is_fresh_again_and_a_restored_one_is_not() {
        let ledger = NonceLedger::default();
        let key: KeyId = "key_a".parse().unwrap();
        let (now, until) = (UnixMillis(1_000), UnixMillis(2_000));
        assert!(ledger.claim(&key, "n1", until, now, true));
        ledger.release(&key, "n1");
        assert!(ledger.claim(&key, "n1", until, now, true));
        let restored = NonceLedger::default();
        restored.restore(fingerprint(&key, "n2"), until);
        assert!(!restored.claim(&key, "n2", until, now, true));
        assert!(restored.claim(&key, "n2", UnixMillis(3_000), until, true));
    }

    #[test]
    fn expired_entries_are_purged() {
        let ledger = NonceLedger::default();
        let key: KeyId = "key_a".parse().unwrap();
        for i in 0..5_000 {
            ledger.claim(&key, &i.to_string(), UnixMillis(10), UnixMillis(0), true);
        }
        let before = ledger.len();
        for i in 0..20_000 {
            ledger.claim(
                &key,
                &format!("late{i}"),
                UnixMillis(1_000),
                UnixMillis(500),
                true,
            );
        }
        assert!(ledger.len() < before + 20_000, "expired nonces were purged");
    }
}
