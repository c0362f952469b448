//! The rules of each allowlist and key edit, shared by every store backend.
//!
//! Each function either applies the whole edit or returns an error naming the offending field and
//! leaves its input as it was, so a request with one bad entry among thousands changes nothing.

use std::collections::{HashMap, HashSet};

use crate::policy::{
    ip::Cidr,
    model::{AllowlistEntry, Audit, KeyRecord, KeyStatus},
};

use super::{StoreError, StoreResult};

/// Adds entries; an entry for a network already listed replaces it (new description, expiry and
/// audit), so re-running an import is harmless. Duplicates within one request are an error.
pub fn add_entries(list: &mut Vec<AllowlistEntry>, added: Vec<AllowlistEntry>) -> StoreResult<()> {
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
) -> StoreResult<()> {
    reject_duplicates(&replacement)?;
    *list = replacement;
    Ok(())
}

/// Removes entries by network; every named network must be listed.
pub fn remove_entries(list: &mut Vec<AllowlistEntry>, removed: &[Cidr]) -> StoreResult<()> {
    let present: HashSet<Cidr> = list.iter().map(|e| e.cidr).collect();
    let mut seen = HashSet::new();
    for (index, cidr) in removed.iter().enumerate() {
        if !present.contains(cidr) {
            return Err(StoreError::rejected(
                format!("cidrs[{index}]"),
                format!("{cidr} is not on this allowlist"),
            ));
        }
        if !seen.insert(*cidr) {
            return Err(StoreError::rejected(
                format!("cidrs[{index}]"),
                format!("{cidr} is named twice"),
            ));
        }
    }
    list.retain(|e| !seen.contains(&e.cidr));
    Ok(())
}

fn reject_duplicates(entries: &[AllowlistEntry]) -> StoreResult<()> {
    let mut first_at: HashMap<Cidr, usize> = HashMap::new();
    for (index, entry) in entries.iter().enumerate() {
        if let Some(first) = first_at.insert(entry.cidr, index) {
            return Err(StoreError::rejected(
                format!("entries[{index}].cidr"),
                format!("{} duplicates entries[{first}]", entry.cidr),
            ));
        }
    }
    Ok(())
}

/// A revoked key is final: no edit other than reading it applies.
pub fn ensure_not_revoked(record: &KeyRecord) -> StoreResult<()> {
    if record.status == KeyStatus::Revoked {
        return Err(StoreError::FailedPrecondition(format!(
            "key {} is revoked; create a new key instead",
            record.id
        )));
    }
    Ok(())
}

pub fn touch(record: &mut KeyRecord, audit: Audit) {
    record.updated = audit;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::model::UnixMillis;

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
            err.to_string(),
            "entries[1].cidr: 198.51.100.0/24 duplicates entries[0]"
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
            err.to_string(),
            "cidrs[1]: 203.0.113.0/24 is not on this allowlist"
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
