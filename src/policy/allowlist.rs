//! A key's effective allowlist, compiled into tree-bitmap tries (one for IPv4, one for IPv6).
//!
//! Entries have no order and any match allows, so the trie only has to answer "is there an active
//! entry covering this address". Duplicates of one network (say on the key and on its partner)
//! collapse into the slot that stays active longest. Entries with an expiry stop matching at that
//! instant without a write: the longest match is tried first, and only when it has expired are the
//! shorter covering prefixes walked for the longest one still active.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ip_network_table_deps_treebitmap::IpLookupTable;
use ipnet::IpNet;

use super::{
    ip::{Cidr, ClientIp, v4_parts, v6_parts},
    model::{AllowlistEntry, UnixMillis},
};

/// Which allowlist an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntrySource {
    Key,
    Partner,
}

impl EntrySource {
    pub fn as_str(self) -> &'static str {
        match self {
            EntrySource::Key => "key",
            EntrySource::Partner => "partner",
        }
    }
}

/// What the engine keeps of an entry: enough to compile and to expire, nothing for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryRule {
    pub cidr: Cidr,
    pub expires_at: Option<UnixMillis>,
}

impl From<&AllowlistEntry> for EntryRule {
    fn from(entry: &AllowlistEntry) -> Self {
        EntryRule {
            cidr: entry.cidr,
            expires_at: entry.expires_at,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    /// `None` never expires.
    expires_at: Option<UnixMillis>,
    source: EntrySource,
}

impl Slot {
    fn active_at(self, now: UnixMillis) -> bool {
        self.expires_at.is_none_or(|expiry| now < expiry)
    }

    /// Of two entries for one network, the one that stays active longer.
    fn outlasts(self, other: Slot) -> bool {
        match (self.expires_at, other.expires_at) {
            (None, _) => other.expires_at.is_some() || self.source == EntrySource::Key,
            (Some(_), None) => false,
            (Some(a), Some(b)) => a > b,
        }
    }
}

/// The entry that let an address through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowMatch {
    pub cidr: Cidr,
    pub source: EntrySource,
}

/// The compiled tries of one key.
pub struct CompiledAllowlist {
    v4: IpLookupTable<Ipv4Addr, Slot>,
    v6: IpLookupTable<Ipv6Addr, Slot>,
    len: usize,
}

impl CompiledAllowlist {
    pub fn compile<'a>(
        own: impl IntoIterator<Item = &'a EntryRule>,
        partner: impl IntoIterator<Item = &'a EntryRule>,
    ) -> CompiledAllowlist {
        let mut compiled = CompiledAllowlist {
            v4: IpLookupTable::new(),
            v6: IpLookupTable::new(),
            len: 0,
        };
        let tagged = own
            .into_iter()
            .map(|rule| (rule, EntrySource::Key))
            .chain(partner.into_iter().map(|rule| (rule, EntrySource::Partner)));
        for (rule, source) in tagged {
            compiled.insert(
                rule.cidr,
                Slot {
                    expires_at: rule.expires_at,
                    source,
                },
            );
        }
        compiled
    }

    fn insert(&mut self, cidr: Cidr, slot: Slot) {
        match cidr.net() {
            IpNet::V4(net) => {
                let (addr, len) = v4_parts(net);
                match self.v4.exact_match_mut(addr, len) {
                    Some(existing) if slot.outlasts(*existing) => *existing = slot,
                    Some(_) => {}
                    None => {
                        self.v4.insert(addr, len, slot);
                        self.len += 1;
                    }
                }
            }
            IpNet::V6(net) => {
                let (addr, len) = v6_parts(net);
                match self.v6.exact_match_mut(addr, len) {
                    Some(existing) if slot.outlasts(*existing) => *existing = slot,
                    Some(_) => {}
                    None => {
                        self.v6.insert(addr, len, slot);
                        self.len += 1;
                    }
                }
            }
        }
    }

    /// Distinct networks compiled in.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An active entry covering `ip`, if any.
    pub fn lookup(&self, ip: ClientIp, now: UnixMillis) -> Option<AllowMatch> {
        match ip.addr() {
            IpAddr::V4(addr) => {
                let (net, len, slot) = self.v4.longest_match(addr)?;
                if slot.active_at(now) {
                    return Some(found(IpAddr::V4(net), len, *slot));
                }
                self.v4
                    .matches(addr)
                    .filter(|(_, _, slot)| slot.active_at(now))
                    .max_by_key(|(_, len, _)| *len)
                    .map(|(net, len, slot)| found(IpAddr::V4(net), len, *slot))
            }
            IpAddr::V6(addr) => {
                let (net, len, slot) = self.v6.longest_match(addr)?;
                if slot.active_at(now) {
                    return Some(found(IpAddr::V6(net), len, *slot));
                }
                self.v6
                    .matches(addr)
                    .filter(|(_, _, slot)| slot.active_at(now))
                    .max_by_key(|(_, len, _)| *len)
                    .map(|(net, len, slot)| found(IpAddr::V6(net), len, *slot))
            }
        }
    }

    /// The networks active at `now`, IPv4 first, each in address order: the key's effective
    /// allowlist, for a deployment that shows it in detailed denials.
    pub fn active_networks(&self, now: UnixMillis) -> Vec<Cidr> {
        let mut v4: Vec<Cidr> = self
            .v4
            .iter()
            .filter(|(_, _, slot)| slot.active_at(now))
            .map(|(net, len, slot)| found(IpAddr::V4(net), len, *slot).cidr)
            .collect();
        let mut v6: Vec<Cidr> = self
            .v6
            .iter()
            .filter(|(_, _, slot)| slot.active_at(now))
            .map(|(net, len, slot)| found(IpAddr::V6(net), len, *slot).cidr)
            .collect();
        v4.sort_unstable();
        v6.sort_unstable();
        v4.append(&mut v6);
        v4
    }

    /// Bytes used by trie nodes and results, for the snapshot-size metric.
    pub fn mem_usage(&self) -> usize {
        let (v4_nodes, v4_results) = self.v4.mem_usage();
        let (v6_nodes, v6_results) = self.v6.mem_usage();
        v4_nodes + v4_results + v6_nodes + v6_results
    }
}

fn found(addr: IpAddr, len: u32, slot: Slot) -> AllowMatch {
    let prefix_len = u8::try_from(len).expect("trie prefix lengths are at most 128");
    AllowMatch {
        cidr: Cidr::from_parts(addr, prefix_len).expect("trie holds valid networks"),
        source: slot.source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(cidr: &str, expires_at: Option<i64>) -> EntryRule {
        EntryRule {
            cidr: cidr.parse().unwrap(),
            expires_at: expires_at.map(UnixMillis),
        }
    }

    fn ip(text: &str) -> ClientIp {
        text.parse().unwrap()
    }

    const NOW: UnixMillis = UnixMillis(1_000_000);

    #[test]
    fn matches_ipv4_ipv6_and_mixed_lists() {
        let own = [
            rule("203.0.113.0/24", None),
            rule("198.51.100.7", None),
            rule("2001:db8::/32", None),
            rule("2001:db8:ffff::1", None),
        ];
        let list = CompiledAllowlist::compile(&own, &[]);
        assert_eq!(list.len(), 4);
        let hit = list.lookup(ip("203.0.113.200"), NOW).unwrap();
        assert_eq!(hit.cidr.to_string(), "203.0.113.0/24");
        assert_eq!(hit.source, EntrySource::Key);
        assert_eq!(
            list.lookup(ip("198.51.100.7"), NOW)
                .unwrap()
                .cidr
                .to_string(),
            "198.51.100.7/32"
        );
        assert!(list.lookup(ip("198.51.100.8"), NOW).is_none());
        assert!(list.lookup(ip("2001:db8:1::5"), NOW).is_some());
        assert!(list.lookup(ip("2001:db9::1"), NOW).is_none());
        // The longest match is reported.
        assert_eq!(
            list.lookup(ip("2001:db8:ffff::1"), NOW)
                .unwrap()
                .cidr
                .to_string(),
            "2001:db8:ffff::1/128"
        );
    }

    #[test]
    fn ipv4_mapped_ipv6_hits_ipv4_entries() {
        let list = CompiledAllowlist::compile(&[rule("203.0.113.0/24", None)], &[]);
        assert!(list.lookup(ip("::ffff:203.0.113.9"), NOW).is_some());
        assert!(list.lookup(ip("::ffff:203.0.114.9"), NOW).is_none());
        // And an IPv6 catch-all does not admit IPv4 clients in disguise.
        let v6_only = CompiledAllowlist::compile(&[rule("::/0", None)], &[]);
        assert!(v6_only.lookup(ip("::ffff:203.0.113.9"), NOW).is_none());
    }

    #[test]
    fn empty_list_matches_nothing() {
        let list = CompiledAllowlist::compile(&[], &[]);
        assert!(list.is_empty());
        assert!(list.lookup(ip("10.0.0.1"), NOW).is_none());
        assert!(list.lookup(ip("::1"), NOW).is_none());
    }

    #[test]
    fn expired_entries_stop_matching_and_shorter_ones_still_do() {
        let own = [rule("10.1.2.0/24", Some(NOW.0)), rule("10.0.0.0/8", None)];
        let list = CompiledAllowlist::compile(&own, &[]);
        let before = UnixMillis(NOW.0 - 1);
        assert_eq!(
            list.lookup(ip("10.1.2.3"), before)
                .unwrap()
                .cidr
                .to_string(),
            "10.1.2.0/24"
        );
        assert_eq!(
            list.lookup(ip("10.1.2.3"), NOW).unwrap().cidr.to_string(),
            "10.0.0.0/8"
        );
        let only_temporary = CompiledAllowlist::compile(&[rule("10.1.2.0/24", Some(NOW.0))], &[]);
        assert!(only_temporary.lookup(ip("10.1.2.3"), before).is_some());
        assert!(only_temporary.lookup(ip("10.1.2.3"), NOW).is_none());
    }

    #[test]
    fn duplicate_networks_keep_the_longest_lived() {
        let own = [rule("10.0.0.0/8", Some(NOW.0))];
        let partner = [rule("10.0.0.0/8", None)];
        let list = CompiledAllowlist::compile(&own, &partner);
        assert_eq!(list.len(), 1);
        let hit = list.lookup(ip("10.9.9.9"), UnixMillis(NOW.0 + 5)).unwrap();
        assert_eq!(hit.source, EntrySource::Partner);
    }

    #[test]
    fn partner_entries_are_tagged() {
        let list =
            CompiledAllowlist::compile(&[rule("10.0.0.1", None)], &[rule("192.0.2.0/24", None)]);
        assert_eq!(
            list.lookup(ip("192.0.2.1"), NOW).unwrap().source,
            EntrySource::Partner
        );
        assert_eq!(
            list.lookup(ip("10.0.0.1"), NOW).unwrap().source,
            EntrySource::Key
        );
    }

    #[test]
    fn active_networks_are_the_effective_list_in_order() {
        let own = [
            rule("2001:db8::/32", None),
            rule("203.0.113.0/24", None),
            rule("10.1.2.0/24", Some(NOW.0)),
        ];
        let partner = [rule("192.0.2.0/24", None), rule("203.0.113.0/24", None)];
        let list = CompiledAllowlist::compile(&own, &partner);
        let names = |now| -> Vec<String> {
            list.active_networks(now)
                .iter()
                .map(|c| c.to_string())
                .collect()
        };
        assert_eq!(
            names(UnixMillis(NOW.0 - 1)),
            [
                "10.1.2.0/24",
                "192.0.2.0/24",
                "203.0.113.0/24",
                "2001:db8::/32"
            ]
        );
        assert_eq!(
            names(NOW),
            ["192.0.2.0/24", "203.0.113.0/24", "2001:db8::/32"]
        );
        assert!(
            CompiledAllowlist::compile(&[], &[])
                .active_networks(NOW)
                .is_empty()
        );
    }
}
