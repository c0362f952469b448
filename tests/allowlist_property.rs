//! For random allowlists and random addresses, the compiled trie answers exactly as a plain linear
//! scan of `ipnet` networks does: the same yes/no, and the same (longest active) network.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use keyfence_policy::{
    allowlist::{CompiledAllowlist, EntryRule},
    ip::{Cidr, ClientIp},
    model::UnixMillis,
};
use proptest::prelude::*;

const NOW: UnixMillis = UnixMillis(1_000_000);

/// IPv4 networks drawn from a small space so that lists and addresses overlap often.
fn v4_net() -> impl Strategy<Value = IpNet> {
    (0u8..4, any::<u16>(), 0u8..=32).prop_map(|(a, rest, len)| {
        let addr = Ipv4Addr::from(u32::from_be_bytes([10, a, (rest >> 8) as u8, rest as u8]));
        IpNet::new(IpAddr::V4(addr), len).unwrap().trunc()
    })
}

fn v6_net() -> impl Strategy<Value = IpNet> {
    (0u16..4, any::<u64>(), 0u8..=128).prop_map(|(a, rest, len)| {
        let addr =
            Ipv6Addr::from((0x2001_0db8u128 << 96) | (u128::from(a) << 80) | u128::from(rest));
        IpNet::new(IpAddr::V6(addr), len).unwrap().trunc()
    })
}

fn rule() -> impl Strategy<Value = (IpNet, Option<i64>)> {
    let net = prop_oneof![v4_net(), v6_net()];
    // Some entries have already expired, some expire later, most never do.
    let expiry = prop_oneof![6 => Just(None), 1 => Just(Some(NOW.0)), 1 => Just(Some(NOW.0 + 1))];
    (net, expiry)
}

fn address() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        (0u8..4, any::<u16>()).prop_map(|(a, rest)| IpAddr::V4(Ipv4Addr::new(
            10,
            a,
            (rest >> 8) as u8,
            rest as u8
        ))),
        (0u16..4, any::<u64>()).prop_map(|(a, rest)| IpAddr::V6(Ipv6Addr::from(
            (0x2001_0db8u128 << 96) | (u128::from(a) << 80) | u128::from(rest)
        ))),
        any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
        any::<u32>().prop_map(|v| IpAddr::V6(Ipv4Addr::from(v).to_ipv6_mapped())),
    ]
}

fn to_rule((net, expiry): &(IpNet, Option<i64>)) -> EntryRule {
    EntryRule {
        cidr: net
            .to_string()
            .parse::<Cidr>()
            .expect("canonical network parses"),
        expires_at: expiry.map(UnixMillis),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn trie_matches_linear_scan(
        own in prop::collection::vec(rule(), 0..40),
        partner in prop::collection::vec(rule(), 0..10),
        addresses in prop::collection::vec(address(), 1..64),
    ) {
        let own_rules: Vec<EntryRule> = own.iter().map(to_rule).collect();
        let partner_rules: Vec<EntryRule> = partner.iter().map(to_rule).collect();
        let compiled = CompiledAllowlist::compile(&own_rules, &partner_rules);
        let all: Vec<&EntryRule> = own_rules.iter().chain(&partner_rules).collect();
        for addr in addresses {
            let ip = ClientIp::from(addr);
            let longest_active = all
                .iter()
                .filter(|rule| rule.expires_at.is_none_or(|e| NOW < e))
                .filter(|rule| rule.cidr.net().contains(&ip.addr()))
                .map(|rule| rule.cidr)
                .max_by_key(|cidr| cidr.net().prefix_len());
            let found = compiled.lookup(ip, NOW).map(|m| m.cidr);
            prop_assert_eq!(found, longest_active, "address {}", addr);
        }
    }
}
