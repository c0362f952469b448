//! A key's effective allowlist, compiled into prefix tries (`prefix-trie`'s `PrefixMap`, one for
//! IPv4 and one for IPv6, each created only when the key has entries of that family).
//!
//! `prefix-trie` replaced the tree-bitmap `IpLookupTable` after `benches/trie.rs`: it answered
//! 1.6 to 1.8 times faster for 10 and for 100,000 networks, IPv4 and IPv6, and a 10-entry IPv4
//! table takes 1.8 KiB against 4.1 KiB (an empty one 0.5 KiB against 3.2 KiB), which is what
//! 100,000 keys multiply (see BENCHMARKS.md).
//!
//! Entries have no order and any match allows, so the trie only has to answer "is there an active
//! entry covering this address". Duplicates of one network (say on the key and on its partner)
//! collapse into the slot that stays active longest. Entries with an expiry stop matching at that
//! instant without a write: the longest match is tried first, and only when it has expired are the
//! shorter covering prefixes walked for the longest one still active.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;

use super::{
    ip::{Cidr, ClientIp},
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
#[derive(Default)]
pub struct CompiledAllowlist {
    v4: Option<Box<PrefixMap<Ipv4Net, Slot>>>,
    v6: Option<Box<PrefixMap<Ipv6Net, Slot>>>,
    len: usize,
}

/// Inserts `slot` for `net`, keeping the longer-lived slot for a network listed twice; true when
/// the network is new.
fn insert_into<P: prefix_trie::Prefix>(map: &mut PrefixMap<P, Slot>, net: P, slot: Slot) -> bool {
    match map.get_mut(&net) {
        Some(existing) => {
            if slot.outlasts(*existing) {
                *existing = slot;
            }
            false
        }
        None => {
            map.insert(net, slot);
            true
        }
    }
}

/// The longest active entry covering `host` (a /32 or /128).
fn longest_active<P: prefix_trie::Prefix + Copy>(
    map: &PrefixMap<P, Slot>,
    host: &P,
    now: UnixMillis,
) -> Option<(P, Slot)> {
    let (net, slot) = map.get_lpm(host)?;
    if slot.active_at(now) {
        return Some((net, *slot));
    }
    // `cover` yields the covering prefixes shortest first.
    map.cover(host)
        .filter(|(_, slot)| slot.active_at(now))
        .last()
        .map(|(net, slot)| (net, *slot))
}

impl CompiledAllowlist {
    pub fn compile<'a>(
        own: impl IntoIterator<Item = &'a EntryRule>,
        partner: impl IntoIterator<Item = &'a EntryRule>,
    ) -> CompiledAllowlist {
        let mut compiled = CompiledAllowlist::default();
        let tagged = own
            .into_iter()
            .map(|rule| (rule, EntrySource::Key))
            .chain(partner.into_iter().map(|rule| (rule, EntrySource::Partner)));
        for (rule, source) in tagged {
            let slot = Slot {
                expires_at: rule.expires_at,
                source,
            };
            let added = match rule.cidr.net() {
                IpNet::V4(net) => insert_into(compiled.v4.get_or_insert_default(), net, slot),
                IpNet::V6(net) => insert_into(compiled.v6.get_or_insert_default(), net, slot),
            };
            compiled.len += usize::from(added);
        }
        compiled
    }

    /// Distinct networks compiled in.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An active entry covering `ip`, if any: the longest one.
    pub fn lookup(&self, ip: ClientIp, now: UnixMillis) -> Option<AllowMatch> {
        let (net, slot) = match ip.addr() {
            IpAddr::V4(addr) => {
                let (net, slot) = longest_active(self.v4.as_deref()?, &Ipv4Net::from(addr), now)?;
                (IpNet::V4(net), slot)
            }
            IpAddr::V6(addr) => {
                let (net, slot) = longest_active(self.v6.as_deref()?, &Ipv6Net::from(addr), now)?;
                (IpNet::V6(net), slot)
            }
        };
        Some(AllowMatch {
            cidr: Cidr::from_parts(net.network(), net.prefix_len())
                .expect("the trie holds valid networks"),
            source: slot.source,
        })
    }

    /// The networks active at `now`, IPv4 first, each in address order: the key's effective
    /// allowlist, for a deployment that shows it in detailed denials.
    pub fn active_networks(&self, now: UnixMillis) -> Vec<Cidr> {
        let cidr = |net: IpNet| {
            Cidr::from_parts(net.network(), net.prefix_len())
                .expect("the trie holds valid networks")
        };
        let mut v4: Vec<Cidr> = self
            .v4
            .iter()
            .flat_map(|map| map.iter())
            .filter(|(_, slot)| slot.active_at(now))
            .map(|(net, _)| cidr(IpNet::V4(net)))
            .collect();
        let mut v6: Vec<Cidr> = self
            .v6
            .iter()
            .flat_map(|map| map.iter())
            .filter(|(_, slot)| slot.active_at(now))
            .map(|(net, _)| cidr(IpNet::V6(net)))
            .collect();
        v4.sort_unstable();
        v6.sort_unstable();
        v4.append(&mut v6);
        v4
    }

    /// Bytes held by the tries, for the snapshot-size figures.
    pub fn mem_size(&self) -> usize {
        self.v4.as_ref().map_or(0, |m| m.mem_size()) + self.v6.as_ref().map_or(0, |m| m.mem_size())
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
