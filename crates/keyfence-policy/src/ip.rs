//! Strict parsing of client addresses and allowlist entries.
//!
//! Security-relevant: a permissive parser is an allowlist bypass. This module accepts only the
//! canonical decimal forms the standard library accepts (no leading zeros, no octal or hex octets,
//! no zone ids), rejects CIDRs with host bits set (naming the network that was probably meant), and
//! folds IPv4-mapped IPv6 addresses to the IPv4 address they carry, so that `::ffff:a.b.c.d` can
//! never dodge an IPv4 entry. `ipnet`'s own parser is deliberately not used: it accepts
//! `010.1.1.1/32` and `/08`.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::{IpNet, Ipv4Net};

use crate::excerpt::excerpt;

/// Why a client address or an allowlist entry was rejected. Messages are meant for people.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpParseError {
    #[error("is empty")]
    Empty,
    /// The text, quoted by [`excerpt`] (at most a short prefix of it).
    #[error(
        "{0} is not an IPv4 or IPv6 address (leading zeros, octal, hex and zone ids are not accepted)"
    )]
    BadAddress(String),
    /// The text, quoted by [`excerpt`].
    #[error(
        "{0} has an invalid prefix length (a decimal number without leading zeros, at most 32 for IPv4 and 128 for IPv6)"
    )]
    BadPrefixLength(String),
    #[error("{given} has host bits set; did you mean {network}?")]
    HostBitsSet { given: String, network: String },
}

/// A client address, IPv4-mapped IPv6 already folded to IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientIp(IpAddr);

impl ClientIp {
    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl From<IpAddr> for ClientIp {
    fn from(addr: IpAddr) -> Self {
        ClientIp(fold_mapped(addr))
    }
}

impl FromStr for ClientIp {
    type Err = IpParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(IpParseError::Empty);
        }
        let addr = parse_addr(text)?;
        Ok(ClientIp::from(addr))
    }
}

impl fmt::Display for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One allowlist network: canonical (no host bits), IPv4-mapped IPv6 folded to IPv4. A single
/// address is a /32 or /128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

impl Cidr {
    pub fn net(self) -> IpNet {
        self.0
    }

    /// Builds a canonical CIDR from an address and a prefix length, truncating host bits. For
    /// values read back from a trie, which stores networks only.
    pub fn from_parts(addr: IpAddr, prefix_len: u8) -> Option<Cidr> {
        let net = IpNet::new(addr, prefix_len).ok()?.trunc();
        Some(Cidr(fold_mapped_net(net)))
    }

    pub fn contains(self, ip: ClientIp) -> bool {
        self.0.contains(&ip.0)
    }
}

impl FromStr for Cidr {
    type Err = IpParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(IpParseError::Empty);
        }
        let (addr_text, prefix_text) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (text, None),
        };
        let addr = parse_addr(addr_text)?;
        let max_len = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        let prefix_len = match prefix_text {
            None => max_len,
            Some(prefix) => parse_prefix_len(prefix, max_len)
                .ok_or_else(|| IpParseError::BadPrefixLength(excerpt(text)))?,
        };
        let net = IpNet::new(addr, prefix_len)
            .map_err(|_| IpParseError::BadPrefixLength(excerpt(text)))?;
        let network = net.trunc();
        if network != net {
            return Err(IpParseError::HostBitsSet {
                given: text.to_owned(),
                network: network.to_string(),
            });
        }
        Ok(Cidr(fold_mapped_net(network)))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

fn parse_addr(text: &str) -> Result<IpAddr, IpParseError> {
    // The standard library rejects leading zeros ("010.1.1.1"), octal and hex forms, short forms
    // ("10.1") and zone ids ("fe80::1%eth0").
    IpAddr::from_str(text).map_err(|_| IpParseError::BadAddress(excerpt(text)))
}

fn parse_prefix_len(text: &str, max_len: u8) -> Option<u8> {
    let canonical = !text.is_empty()
        && text.bytes().all(|b| b.is_ascii_digit())
        && (text == "0" || !text.starts_with('0'))
        && text.len() <= 3;
    if !canonical {
        return None;
    }
    let value: u8 = text.parse().ok()?;
    (value <= max_len).then_some(value)
}

fn fold_mapped(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// `::ffff:a.b.c.d/n` with n >= 96 is the IPv4 network `a.b.c.d/(n-96)`.
fn fold_mapped_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(
                Ipv4Net::new(v4, v6.prefix_len() - 96).expect("prefix length is at most 32"),
            ),
            None => net,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(text: &str) -> Result<String, IpParseError> {
        text.parse::<Cidr>().map(|c| c.to_string())
    }

    #[test]
    fn accepts_canonical_forms() {
        assert_eq!(cidr("203.0.113.7").unwrap(), "203.0.113.7/32");
        assert_eq!(cidr("203.0.113.0/24").unwrap(), "203.0.113.0/24");
        assert_eq!(cidr("0.0.0.0/0").unwrap(), "0.0.0.0/0");
        assert_eq!(cidr("2001:db8::1").unwrap(), "2001:db8::1/128");
        assert_eq!(cidr("2001:db8::/32").unwrap(), "2001:db8::/32");
        assert_eq!(cidr("::/0").unwrap(), "::/0");
    }

    #[test]
    fn rejects_leading_zero_and_octal_octets() {
        // ipnet's own parser accepts both of these; we must not.
        assert!("010.1.1.1/32".parse::<IpNet>().is_ok());
        assert!(matches!(
            cidr("010.1.1.1/32"),
            Err(IpParseError::BadAddress(_))
        ));
        assert!(matches!(
            cidr("010.1.1.1"),
            Err(IpParseError::BadAddress(_))
        ));
        assert!(matches!(
            cidr("0x0a.1.1.1"),
            Err(IpParseError::BadAddress(_))
        ));
        assert!(matches!(cidr("10.1"), Err(IpParseError::BadAddress(_))));
        assert!(matches!(
            cidr("10.1.1.256"),
            Err(IpParseError::BadAddress(_))
        ));
        assert!("010.1.1.1".parse::<ClientIp>().is_err());
    }

    #[test]
    fn rejects_leading_zero_prefix_lengths() {
        assert!("10.0.0.0/08".parse::<IpNet>().is_ok());
        assert!(matches!(
            cidr("10.0.0.0/08"),
            Err(IpParseError::BadPrefixLength(_))
        ));
        assert!(matches!(
            cidr("10.0.0.0/33"),
            Err(IpParseError::BadPrefixLength(_))
        ));
        assert!(matches!(
            cidr("2001:db8::/129"),
            Err(IpParseError::BadPrefixLength(_))
        ));
        assert!(matches!(
            cidr("10.0.0.0/"),
            Err(IpParseError::BadPrefixLength(_))
        ));
        assert!(matches!(
            cidr("10.0.0.0/+8"),
            Err(IpParseError::BadPrefixLength(_))
        ));
        assert!(matches!(
            cidr("10.0.0.0/8/8"),
            Err(IpParseError::BadPrefixLength(_))
        ));
    }

    #[test]
    fn rejects_zone_ids() {
        assert!(matches!(
            cidr("fe80::1%eth0"),
            Err(IpParseError::BadAddress(_))
        ));
        assert!(matches!(
            cidr("fe80::%1/64"),
            Err(IpParseError::BadAddress(_))
        ));
        assert!("fe80::1%eth0".parse::<ClientIp>().is_err());
    }

    #[test]
    fn rejects_host_bits_naming_the_network() {
        let err = cidr("203.0.113.7/24").unwrap_err();
        assert_eq!(
            err.to_string(),
            "203.0.113.7/24 has host bits set; did you mean 203.0.113.0/24?"
        );
        let err = cidr("2001:db8::1/32").unwrap_err();
        assert!(
            err.to_string().contains("did you mean 2001:db8::/32?"),
            "{err}"
        );
    }

    #[test]
    fn rejects_empty_and_whitespace() {
        assert_eq!(cidr(""), Err(IpParseError::Empty));
        assert!(cidr(" 10.0.0.1").is_err());
        assert!(cidr("10.0.0.1 ").is_err());
        assert!("".parse::<ClientIp>().is_err());
    }

    #[test]
    fn folds_ipv4_mapped_addresses() {
        let ip: ClientIp = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(ip.addr(), "203.0.113.7".parse::<IpAddr>().unwrap());
        assert_eq!(cidr("::ffff:203.0.113.0/120").unwrap(), "203.0.113.0/24");
        assert_eq!(cidr("::ffff:203.0.113.7").unwrap(), "203.0.113.7/32");
        // A network wider than the mapped range stays IPv6.
        assert_eq!(cidr("::/80").unwrap(), "::/80");
        let ip: ClientIp = "2001:db8::1".parse().unwrap();
        assert!(ip.addr().is_ipv6());
    }

    #[test]
    fn from_parts_truncates_and_folds() {
        let c = Cidr::from_parts("10.1.2.3".parse().unwrap(), 8).unwrap();
        assert_eq!(c.to_string(), "10.0.0.0/8");
        assert!(Cidr::from_parts("10.1.2.3".parse().unwrap(), 33).is_none());
        assert!(c.contains("10.200.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
    }
}
