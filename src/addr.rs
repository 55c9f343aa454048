//! Socket address helpers shared by every layer (a leaf: it imports nothing of ours).

use std::net::{IpAddr, SocketAddr};

/// IPv4-mapped IPv6 addresses (`[::ffff:a.b.c.d]:p`, which dual-stack sockets report for
/// IPv4 peers) as plain IPv4, so one address is one peer or candidate whichever way it was
/// learned, and is shown as people write it.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Every address of this machine's interfaces, with its prefix length (24 for a /24).
pub fn interface_networks() -> Vec<(IpAddr, u8)> {
    if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| match &iface.addr {
            if_addrs::IfAddr::V4(v4) => (IpAddr::V4(v4.ip), v4.prefixlen),
            if_addrs::IfAddr::V6(v6) => (IpAddr::V6(v6.ip), v6.prefixlen),
        })
        .collect()
}

/// Whether `ip` lies in the network of `net`/`prefix`. A prefix of 0 matches nothing: no
/// interface makes the whole internet a neighbour.
pub fn same_network(net: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (net.to_canonical(), ip.to_canonical()) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let bits = u32::from(prefix.min(32));
            let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
            bits > 0 && (u32::from(a) & mask) == (u32::from(b) & mask)
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let bits = u32::from(prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            bits > 0 && (u128::from(a) & mask) == (u128::from(b) & mask)
        }
        _ => false,
    }
}

/// A link-local address (169.254/16, fe80::/10): meaningless without a scope on another
/// host.
pub fn is_link_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// An address nobody elsewhere can reach us at, whoever names it (a STUN server, a
/// router's port mapping): unspecified, loopback, multicast, broadcast, link-local, and
/// IPv4's "this network" (0/8) and reserved (240/4) ranges.
pub fn is_unroutable(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        || is_link_local(ip)
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast() || v4.octets()[0] == 0 || v4.octets()[0] >= 240)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks_and_unroutable_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_network(ip("10.0.1.2"), 24, ip("10.0.1.200")));
        assert!(same_network(ip("10.0.1.2"), 24, ip("::ffff:10.0.1.9")));
        assert!(!same_network(ip("10.0.1.2"), 24, ip("10.0.2.1")));
        assert!(!same_network(ip("10.0.1.2"), 0, ip("198.51.100.1")));
        assert!(same_network(ip("2001:db8:1::2"), 64, ip("2001:db8:1::7")));
        assert!(!same_network(ip("2001:db8:1::2"), 64, ip("10.0.1.2")));
        for bad in [
            "0.0.0.0",
            "127.0.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "169.254.1.1",
            "0.1.2.3",
            "240.0.0.1",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
        ] {
            assert!(is_unroutable(ip(bad)), "{bad}");
        }
        for good in ["198.51.100.1", "10.0.1.2", "100.64.0.1", "2001:db8::1"] {
            assert!(!is_unroutable(ip(good)), "{good}");
        }
    }

    #[test]
    fn mapped_ipv4_becomes_plain_and_the_rest_is_unchanged() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            canonical(a("[::ffff:198.51.100.7]:9199")),
            a("198.51.100.7:9199")
        );
        assert_eq!(canonical(a("198.51.100.7:9199")), a("198.51.100.7:9199"));
        assert_eq!(canonical(a("[2001:db8::1]:9199")), a("[2001:db8::1]:9199"));
    }
}
