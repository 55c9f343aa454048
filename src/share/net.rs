//! Addresses: resolving what the user typed, binding every family, and which of our
//! addresses to announce.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::ShareError;

/// The UDP port a receiver listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 9199;

/// Resolve `HOST`, `HOST:PORT`, `IP`, `[IPv6]:PORT` (`default_port` when none is given)
/// into the name as typed (plus the port: the key known_peers remembers) and an address.
pub async fn resolve_host(to: &str, default_port: u16) -> Result<(String, SocketAddr), ShareError> {
    let (name, addrs) = resolve_host_all(to, default_port).await?;
    Ok((name, addrs[0]))
}

/// [`resolve_host`] with every address the name resolves to (at least one), first the
/// one to use: the rest vouch that an address a server announces is its own (see
/// [`crate::natcheck::check_known`]). One lookup serves both.
pub async fn resolve_host_all(
    to: &str,
    default_port: u16,
) -> Result<(String, Vec<SocketAddr>), ShareError> {
    if let Ok(addr) = to.parse::<SocketAddr>() {
        return Ok((addr.to_string(), vec![addr]));
    }
    let bare = to.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let addr = SocketAddr::new(ip, default_port);
        return Ok((addr.to_string(), vec![addr]));
    }
    let name = match to.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => to.to_string(),
        _ => format!("{to}:{default_port}"),
    };
    let found = tokio::net::lookup_host(name.as_str())
        .await
        .map(|addrs| addrs.collect::<Vec<SocketAddr>>());
    let addrs = match found {
        Ok(addrs) => addrs,
        Err(source) => return Err(ShareError::Resolve { name, source }),
    };
    if addrs.is_empty() {
        return Err(ShareError::NoAddress { name });
    }
    Ok((name, addrs))
}

/// A socket on `port` of every address, IPv6 and IPv4 (dual-stack `[::]`), or IPv4 only
/// where the system has no IPv6: a meeting offers every family it can.
pub fn bind_dual_stack(port: u16) -> std::io::Result<std::net::UdpSocket> {
    crate::socket::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)))
        .or_else(|_| crate::socket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))))
}

/// Addresses a sender could use: the bound one, or every interface's for a wildcard
/// bind (non-loopback first). Behind a NAT the public address differs; the sender
/// learns its own from the probe reply, and a rendezvous exchanges them.
pub fn reachable_addrs(local: SocketAddr) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let dual = local.is_ipv6();
    let mut addrs: Vec<SocketAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .filter(|ip| dual || ip.is_ipv4())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect();
    addrs.sort_by_key(|a| (a.ip().is_loopback(), a.is_ipv6()));
    if addrs.is_empty() {
        addrs.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), local.port()));
    }
    addrs
}

/// [`PathKind::Lan`] when `remote` is on one of our interfaces' networks, else direct.
pub(super) fn path_to(remote: SocketAddr) -> crate::path::PathKind {
    let ifaces = crate::meet::candidates::interfaces();
    match crate::meet::candidates::kind_of(remote, &ifaces) {
        crate::traverse::Kind::Lan => crate::path::PathKind::Lan,
        _ => crate::path::PathKind::Direct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn addresses_resolve_with_and_without_port() {
        let cases = [
            ("127.0.0.1:4000", "127.0.0.1:4000"),
            ("127.0.0.1", "127.0.0.1:9199"),
            ("[::1]:4000", "[::1]:4000"),
            ("[::1]", "[::1]:9199"),
            ("::1", "[::1]:9199"),
        ];
        for (to, want) in cases {
            let (key, addr) = resolve_host(to, DEFAULT_PORT).await.unwrap();
            assert_eq!(addr.to_string(), want, "{to}");
            assert_eq!(key, want, "known_peers key for {to}");
        }
        // Names keep the form the user typed (plus the default port) as their key.
        let (key, addr) = resolve_host("localhost", DEFAULT_PORT).await.unwrap();
        assert_eq!(key, "localhost:9199");
        assert_eq!(addr.port(), 9199);
        assert!(addr.ip().is_loopback());
    }

    #[test]
    fn announced_addresses_carry_the_port_and_put_loopback_last() {
        let specific: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(reachable_addrs(specific), vec![specific]);
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let addrs = reachable_addrs(any);
        assert!(!addrs.is_empty());
        assert!(addrs.iter().all(|a| a.port() == 4000 && a.is_ipv4()));
        let first_loopback = addrs.iter().position(|a| a.ip().is_loopback());
        if let Some(i) = first_loopback {
            assert!(addrs[i..].iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        }
    }
}
