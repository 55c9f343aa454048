//! Socket address helpers shared by every layer (a leaf: it imports nothing of ours).

use std::net::SocketAddr;

/// IPv4-mapped IPv6 addresses (`[::ffff:a.b.c.d]:p`, which dual-stack sockets report for
/// IPv4 peers) as plain IPv4, so one address is one peer or candidate whichever way it was
/// learned, and is shown as people write it.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

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
