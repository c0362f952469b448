//! Which address a request came from, when proxies may stand between the client and the front end
//! that asks: the peer address, unless the deployment names the proxies it trusts.
//!
//! Rules, each failing closed:
//! - The peer (the address the front end's connection came from) is the client unless it is a
//!   trusted proxy. Only then is anything the request says about its origin read at all.
//! - From a trusted peer, `X-Forwarded-For` is walked right to left (each proxy appends the
//!   address it saw), skipping trusted hops; the first untrusted hop is the client. The left-most
//!   entry is whatever the client wrote, so it decides only when every hop to its right is trusted.
//!   When every hop is trusted, the left-most one is the client: the request came from inside.
//! - With `trust_x_real_ip`, a trusted peer's `X-Real-IP` names the client ahead of
//!   `X-Forwarded-For`; the proxy must overwrite it, never pass a client's value through.
//! - A hop that is not one canonical address (with an optional port) rejects the whole request as
//!   an invalid client IP. Guessing past it could let a forged entry decide.
//!
//! This module knows the value syntax of these two headers, handed in as strings; it never sees a
//! header map, a connection or a clock, so it stays as pure as the rest of `policy`.

use std::net::IpAddr;

use super::ip::{Cidr, ClientIp, IpParseError};

/// The proxies whose word about the client address is taken.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    networks: Vec<Cidr>,
    /// Whether a trusted peer's `X-Real-IP` names the client.
    trust_x_real_ip: bool,
}

/// What a request says about where it came from.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    /// The address the front end's connection came from, as its transport reports it.
    pub peer: &'a str,
    /// `X-Forwarded-For`, repeated headers already joined with commas.
    pub forwarded_for: Option<&'a str>,
    /// `X-Real-IP`.
    pub real_ip: Option<&'a str>,
}

/// Why no client address could be settled on. Each one denies as an invalid client IP.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientIpError {
    #[error("peer address: {0}")]
    Peer(IpParseError),
    #[error("x-forwarded-for hop {position} from the right: {error}")]
    ForwardedFor {
        /// 1 is the right-most hop.
        position: usize,
        error: IpParseError,
    },
    #[error("x-real-ip: {0}")]
    RealIp(IpParseError),
}

impl TrustedProxies {
    pub fn new(networks: Vec<Cidr>, trust_x_real_ip: bool) -> TrustedProxies {
        TrustedProxies {
            networks,
            trust_x_real_ip,
        }
    }

    /// No proxy is trusted: the peer is always the client.
    pub fn none() -> TrustedProxies {
        TrustedProxies::default()
    }

    pub fn networks(&self) -> &[Cidr] {
        &self.networks
    }

    pub fn trusts_x_real_ip(&self) -> bool {
        self.trust_x_real_ip
    }

    /// A linear scan: a deployment trusts a handful of proxy networks, not thousands.
    pub fn is_trusted(&self, ip: ClientIp) -> bool {
        self.networks.iter().any(|network| network.contains(ip))
    }

    /// The client address of a request, by the rules in the module comment.
    pub fn resolve(&self, origin: &Origin<'_>) -> Result<ClientIp, ClientIpError> {
        let peer = parse_hop(origin.peer).map_err(ClientIpError::Peer)?;
        if !self.is_trusted(peer) {
            return Ok(peer);
        }
        if self.trust_x_real_ip
            && let Some(real_ip) = origin.real_ip.filter(|value| !value.trim().is_empty())
        {
            return parse_hop(real_ip.trim()).map_err(ClientIpError::RealIp);
        }
        let Some(forwarded_for) = origin
            .forwarded_for
            .filter(|value| !value.trim().is_empty())
        else {
            return Ok(peer);
        };
        let mut left_most = peer;
        for (index, hop) in forwarded_for.rsplit(',').enumerate() {
            let hop = parse_hop(hop.trim_matches([' ', '\t'])).map_err(|error| {
                ClientIpError::ForwardedFor {
                    position: index + 1,
                    error,
                }
            })?;
            if !self.is_trusted(hop) {
                return Ok(hop);
            }
            left_most = hop;
        }
        Ok(left_most)
    }
}

/// One address as proxies write it: `203.0.113.7`, `203.0.113.7:4711`, `2001:db8::1` or
/// `[2001:db8::1]:4711`, strictly parsed (no leading zeros, no zone ids), the port dropped.
fn parse_hop(text: &str) -> Result<ClientIp, IpParseError> {
    if text.is_empty() {
        return Err(IpParseError::Empty);
    }
    if let Ok(ip) = text.parse::<ClientIp>() {
        return Ok(ip);
    }
    let bad = || IpParseError::BadAddress(crate::excerpt::excerpt(text));
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(bad)?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').ok_or_else(bad)?),
        };
        if !host.contains(':') {
            // `[203.0.113.7]` is no form any proxy writes.
            return Err(bad());
        }
        (host, port)
    } else {
        // An unbracketed IPv6 address with a port is ambiguous; only IPv4 takes one this way.
        let (host, port) = text.split_once(':').ok_or_else(bad)?;
        if host.contains(':') || port.contains(':') {
            return Err(bad());
        }
        (host, Some(port))
    };
    if let Some(port) = port
        && !is_port(port)
    {
        return Err(bad());
    }
    let addr: IpAddr = host.parse::<ClientIp>().map_err(|_| bad())?.addr();
    Ok(ClientIp::from(addr))
}

/// A decimal port without sign or leading zeros, 1 to 65535.
fn is_port(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 5
        && text.bytes().all(|b| b.is_ascii_digit())
        && !text.starts_with('0')
        && text.parse::<u32>().is_ok_and(|port| port <= 65535)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(cidrs: &[&str]) -> TrustedProxies {
        TrustedProxies::new(cidrs.iter().map(|c| c.parse().unwrap()).collect(), false)
    }

    fn resolve(
        proxies: &TrustedProxies,
        peer: &str,
        forwarded_for: Option<&str>,
    ) -> Result<String, ClientIpError> {
        proxies
            .resolve(&Origin {
                peer,
                forwarded_for,
                real_ip: None,
            })
            .map(|ip| ip.to_string())
    }

    #[test]
    fn without_trusted_proxies_the_peer_decides_whatever_the_headers_say() {
        let none = TrustedProxies::none();
        assert_eq!(
            resolve(&none, "198.51.100.7", Some("203.0.113.1")).unwrap(),
            "198.51.100.7"
        );
        // Not even a malformed header matters when it is never read.
        assert_eq!(
            resolve(&none, "198.51.100.7", Some("not an address")).unwrap(),
            "198.51.100.7"
        );
        let with_real_ip = TrustedProxies::new(vec![], true);
        let origin = Origin {
            peer: "198.51.100.7",
            forwarded_for: None,
            real_ip: Some("203.0.113.1"),
        };
        assert_eq!(
            with_real_ip.resolve(&origin).unwrap().to_string(),
            "198.51.100.7"
        );
    }

    #[test]
    fn an_untrusted_peer_is_the_client_even_with_proxies_configured() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(&trusted, "198.51.100.7", Some("203.0.113.1, 10.0.0.2")).unwrap(),
            "198.51.100.7"
        );
    }

    #[test]
    fn a_spoofed_left_most_entry_never_decides() {
        let trusted = proxies(&["10.0.0.0/8"]);
        // The client wrote "203.0.113.1"; the trusted proxy 10.0.0.2 appended the address it saw.
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("203.0.113.1, 198.51.100.7")).unwrap(),
            "198.51.100.7"
        );
        // Two trusted hops, each appending.
        assert_eq!(
            resolve(
                &trusted,
                "10.0.0.3",
                Some("203.0.113.1, 198.51.100.7, 10.0.0.2")
            )
            .unwrap(),
            "198.51.100.7"
        );
        // A spoofed entry naming a trusted address is skipped like any trusted hop, and still
        // does not decide while an untrusted hop stands to its right.
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("10.9.9.9, 198.51.100.7")).unwrap(),
            "198.51.100.7"
        );
    }

    #[test]
    fn all_hops_trusted_means_the_left_most() {
        let trusted = proxies(&["10.0.0.0/8"]);
        assert_eq!(
            resolve(&trusted, "10.0.0.3", Some("10.0.0.1, 10.0.0.2")).unwrap(),
            "10.0.0.1"
        );
        // A trusted peer without the header is itself the client.
        assert_eq!(resolve(&trusted, "10.0.0.3", None).unwrap(), "10.0.0.3");
        assert_eq!(
            resolve(&trusted, "10.0.0.3", Some(" ")).unwrap(),
            "10.0.0.3"
        );
    }

    #[test]
    fn malformed_hops_fail_closed() {
        let trusted = proxies(&["10.0.0.0/8"]);
        for header in [
            "203.0.113.1,",
            "203.0.113.1,,10.0.0.2",
            "unknown",
            "203.0.113.010",
            "0x0a.0.0.1",
            "203.0.113.1:0",
            "203.0.113.1:65536",
            "203.0.113.1:080",
            "203.0.113.1:",
            "[203.0.113.1]:80",
            "2001:db8::1:80:",
            "[2001:db8::1]80",
            "[2001:db8::1",
            "fe80::1%eth0",
            "for=203.0.113.1",
        ] {
            let err = resolve(&trusted, "10.0.0.2", Some(header)).unwrap_err();
            assert!(
                matches!(err, ClientIpError::ForwardedFor { .. }),
                "{header}: {err}"
            );
        }
        // A malformed hop left of the deciding one is never reached.
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("garbage, 198.51.100.7")).unwrap(),
            "198.51.100.7"
        );
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some(",198.51.100.7")).unwrap(),
            "198.51.100.7"
        );
        // A malformed hop right of it is: the chain cannot be trusted past it.
        let err = resolve(&trusted, "10.0.0.2", Some("198.51.100.7, garbage")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x-forwarded-for hop 1 from the right: \"garbage\" is not an IPv4 or IPv6 address \
             (leading zeros, octal, hex and zone ids are not accepted)"
        );
        assert!(matches!(
            resolve(&trusted, "", None),
            Err(ClientIpError::Peer(IpParseError::Empty))
        ));
        assert!(matches!(
            resolve(&trusted, "010.0.0.2", None),
            Err(ClientIpError::Peer(_))
        ));
    }

    #[test]
    fn ports_are_dropped_and_ipv6_is_understood() {
        let trusted = proxies(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("198.51.100.7:4711")).unwrap(),
            "198.51.100.7"
        );
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("[2001:db8::7]:443")).unwrap(),
            "2001:db8::7"
        );
        assert_eq!(
            resolve(
                &trusted,
                "2001:db8:ffff::2",
                Some("2001:db8::7, 2001:db8:ffff::1")
            )
            .unwrap(),
            "2001:db8::7"
        );
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("[2001:db8::7]")).unwrap(),
            "2001:db8::7"
        );
        // Tabs and spaces around hops are the header's own whitespace.
        assert_eq!(
            resolve(&trusted, "10.0.0.2", Some("203.0.113.1,\t198.51.100.7 ")).unwrap(),
            "198.51.100.7"
        );
    }

    #[test]
    fn ipv4_mapped_addresses_are_folded_before_the_trust_check() {
        let trusted = proxies(&["10.0.0.0/8"]);
        // A dual-stack listener reports IPv4 peers in their mapped form.
        assert_eq!(
            resolve(&trusted, "::ffff:10.0.0.2", Some("198.51.100.7")).unwrap(),
            "198.51.100.7"
        );
        assert_eq!(
            resolve(
                &trusted,
                "10.0.0.2",
                Some("::ffff:198.51.100.7, ::ffff:10.0.0.9")
            )
            .unwrap(),
            "198.51.100.7"
        );
        assert_eq!(
            resolve(&TrustedProxies::none(), "::ffff:198.51.100.7", None).unwrap(),
            "198.51.100.7"
        );
    }

    #[test]
    fn x_real_ip_only_when_configured_and_only_from_a_trusted_peer() {
        let networks = vec!["10.0.0.0/8".parse().unwrap()];
        let origin = Origin {
            peer: "10.0.0.2",
            forwarded_for: Some("203.0.113.1, 198.51.100.7"),
            real_ip: Some("192.0.2.9"),
        };
        let without = TrustedProxies::new(networks.clone(), false);
        assert_eq!(
            without.resolve(&origin).unwrap().to_string(),
            "198.51.100.7"
        );
        let with = TrustedProxies::new(networks, true);
        assert_eq!(with.resolve(&origin).unwrap().to_string(), "192.0.2.9");
        // Absent, it falls back to X-Forwarded-For; malformed, it fails closed.
        let absent = Origin {
            real_ip: None,
            ..origin
        };
        assert_eq!(with.resolve(&absent).unwrap().to_string(), "198.51.100.7");
        let malformed = Origin {
            real_ip: Some("192.0.2.9, 192.0.2.10"),
            ..origin
        };
        assert!(matches!(
            with.resolve(&malformed),
            Err(ClientIpError::RealIp(_))
        ));
        let untrusted_peer = Origin {
            peer: "198.51.100.1",
            ..origin
        };
        assert_eq!(
            with.resolve(&untrusted_peer).unwrap().to_string(),
            "198.51.100.1"
        );
    }
}
