//! The rules of each allowlist and key edit. They run inside the store's transaction (as the edit
//! closure), so every backend applies them the same way, and every admin surface reaches them
//! through the commands in this crate, so each rule exists once.
//!
//! Each function either applies the whole edit or returns a [`RuleViolation`] that says which
//! entry (by index) broke which rule, and leaves its input as it was, so a request with one bad
//! entry among thousands changes nothing. Wire field names are the edge's business.

use std::collections::{HashMap, HashSet};

use keyfence_policy::{
    ip::Cidr,
    model::{AllowlistEntry, Audit, KeyId, KeyRecord, KeyStatus},
};
use keyfence_store::StoreError;

/// An edit that a rule refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleViolation {
    /// Entry `index` names the same network as entry `first` of the same request.
    #[error("entry {index}: {cidr} duplicates entry {first}")]
    DuplicateEntry {
        index: usize,
        first: usize,
        cidr: Cidr,
    },
    /// Removal `index` names a network the list does not hold.
    #[error("removal {index}: {cidr} is not on this allowlist")]
    NotListed { index: usize, cidr: Cidr },
    /// Removal `index` names a network an earlier removal already named.
    #[error("removal {index}: {cidr} is named twice")]
    NamedTwice { index: usize, cidr: Cidr },
    #[error("key {0} is revoked; create a new key instead")]
    Revoked(KeyId),
}

/// Lets an edit closure use `?` on a rule: the store hands the violation back unchanged.
impl From<RuleViolation> for StoreError {
    fn from(violation: RuleViolation) -> StoreError {
        StoreError::rejected(violation)
    }
}

type RuleResult = Result<(), RuleViolation>;

/// Adds entries; an entry for a network already listed replaces it (new description, expiry and
/// audit), so re-running an import is harmless. Duplicates within one request are an error.
pub fn add_entries(list: &mut Vec<AllowlistEntry>, added: Vec<AllowlistEntry>) -> RuleResult {
    reject_duplicates(&added)?;
    let positions: HashMap<Cidr, usize> =
        list.iter().enumerate().map(|(i, e)| (e.cidr, i)).collect();
    for entry in added {
        match positions.get(&entry.cidr) {
            Some(&at) => list[at] = entry,
            None => list.push(entry),
        }
    }
    Ok(())
}

/// Replaces the whole list.
pub fn replace_entries(
    list: &mut Vec<AllowlistEntry>,
    replacement: Vec<AllowlistEntry>,
) -> RuleResult {
    reject_duplicates(&replacement)?;
    *list = replacement;
    Ok(())
}

/// Removes entries by network; every named network must be listed.
pub fn remove_entries(list: &mut Vec<AllowlistEntry>, removed: &[Cidr]) -> RuleResult {
    let present: HashSet<Cidr> = list.iter().map(|e| e.cidr).collect();
    let mut seen = HashSet::new();
    for (index, cidr) in removed.iter().enumerate() {
        if !present.contains(cidr) {
            return Err(RuleViolation::NotListed { index, cidr: *cidr });
        }
        if !seen.insert(*cidr) {
            return Err(RuleViolation::NamedTwice { index, cidr: *cidr });
        }
    }
    list.retain(|e| !seen.contains(&e.cidr));
    Ok(())
}

/// Entries of one request must name distinct networks: the same rule for a new key's allowlist,
/// an addition and a replacement.
pub fn reject_duplicates(entries: &[AllowlistEntry]) -> RuleResult {
    let mut first_at: HashMap<Cidr, usize> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        if let Some(first) = first_at.insert(entry.cidr, index) {
            return Err(RuleViolation::DuplicateEntry {
                index,
                first,
                cidr: entry.cidr,
            });
        }
    }
    Ok(())
}

/// A revoked key is final: no edit other than reading it applies.
pub fn ensure_not_revoked(record: &KeyRecord) -> RuleResult {
    if record.status == KeyStatus::Revoked {
        return Err(RuleViolation::Revoked(record.id.clone()));
    }
    Ok(())
}

/// An allowlist can be edited unless it belongs to a revoked key (`owner` is `None` for a
/// partner list).
pub fn ensure_editable(owner: Option<&KeyRecord>) -> RuleResult {
    owner.map_or(Ok(()), ensure_not_revoked)
}

/// Records who changed the key and when.
pub fn touch(record: &mut KeyRecord, audit: Audit) {
    record.updated = audit;
}

#[cfg(test)]
mod tests {
    use super::*;
    use keyfence_policy::model::UnixMillis;

    fn entry(cidr: &str, description: &str) -> AllowlistEntry {
        AllowlistEntry {
            cidr: cidr.parse().unwrap(),
            description: description.into(),
            added: Audit {
                actor: "t".into(),
                at: UnixMillis(1),
            },
            expires_at: None,
        }
    }

    #[test]
    fn add_upserts_and_rejects_duplicates_without_change() {
        let mut list = vec![entry("10.0.0.0/8", "old")];
        add_entries(
            &mut list,
            vec![entry("10.0.0.0/8", "new"), entry("192.0.2.1", "x")],
        )
        .unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].description, "new");
        let before = list.clone();
        let err = add_entries(
            &mut list,
            vec![entry("198.51.100.0/24", ""), entry("198.51.100.0/24", "")],
        )
        .unwrap_err();
        assert_eq!(
            err,
            RuleViolation::DuplicateEntry {
                index: 1,
                first: 0,
                cidr: "198.51.100.0/24".parse().unwrap()
            }
        );
        assert_eq!(list, before);
    }

    #[test]
    fn remove_requires_every_network_listed() {
        let mut list = vec![entry("10.0.0.0/8", ""), entry("192.0.2.1", "")];
        let before = list.clone();
        let err = remove_entries(
            &mut list,
            &[
                "10.0.0.0/8".parse().unwrap(),
                "203.0.113.0/24".parse().unwrap(),
            ],
        )
        .unwrap_err();
        assert_eq!(
            err,
            RuleViolation::NotListed {
                index: 1,
                cidr: "203.0.113.0/24".parse().unwrap()
            }
        );
        assert_eq!(list, before);
        remove_entries(&mut list, &["10.0.0.0/8".parse().unwrap()]).unwrap();
        assert_eq!(list.len(), 1);
    }

    #[test]
    fn replace_swaps_the_whole_list() {
        let mut list = vec![entry("10.0.0.0/8", "")];
        replace_entries(&mut list, vec![entry("192.0.2.0/24", "")]).unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].cidr.to_string(), "192.0.2.0/24");
        replace_entries(&mut list, vec![]).unwrap();
        assert!(list.is_empty());
    }
}
