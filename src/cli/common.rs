//! Helpers the commands share, so that no command imports another: the `punched` and
//! `connected` events, address display, and which addresses to announce.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Context;
use qpunch::node::{Node, PeerConnection};
use qpunch::punch::Punched;

use super::ui::{Event, Ui};

/// The `punched` event. `from` is the socket's address while punching, read before
/// hand-over: `connected` shows the QUIC socket's, and the two ports must agree.
pub fn report_punched(ui: &Ui, punched: &Punched, from: SocketAddr) {
    let rtt_ms = punched.rtt.as_secs_f64() * 1000.0;
    let reflexive = punched.reflexive.map(canonical);
    let (probe, reply) = (qpunch::wire::PROBE_GREETING, qpunch::wire::REPLY_GREETING);
    let peer = punched.peer;
    let answer = match reflexive {
        Some(reflexive) => format!(
            "\"{probe}\" answered with \"{reply}\" by {peer} in {rtt_ms:.2} ms; it sees us as \
             {reflexive}"
        ),
        // Only a legacy reply leaves it unknown.
        None => format!(
            "{peer} answered \"{probe}\" with a plain \"{reply}\" in {rtt_ms:.2} ms, like the Go \
             hole-punching demo (it does not say how it sees us)"
        ),
    };
    ui.event(
        Event::Punched {
            peer: peer.to_string(),
            method: punched.method.as_str(),
            local_addr: from.to_string(),
            reflexive_addr: reflexive.map(|r| r.to_string()),
            rtt_ms,
        },
        Some(format!(
            "hole punched ({}): {answer}; socket {from} handed to QUIC",
            punched.method.as_str()
        )),
    );
}

/// The `connected` event; `path` is `direct` or `lan`.
pub fn report_connected(
    ui: &Ui,
    node: &Node,
    peer: &PeerConnection,
    path: &'static str,
) -> anyhow::Result<()> {
    let remote = canonical(peer.connection.remote_address());
    let over = if path == "lan" { " on the LAN" } else { "" };
    ui.event(
        Event::Connected {
            peer: remote.to_string(),
            fingerprint: peer.fingerprint,
            path,
            local_addr: node.local_addr()?.to_string(),
        },
        Some(format!(
            "connected to {remote}{over} (identity {}), encrypted with TLS 1.3 over QUIC",
            peer.fingerprint
        )),
    );
    Ok(())
}

/// IPv4-mapped IPv6 addresses (from dual-stack sockets) shown as plain IPv4.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Addresses a sender could use: the bound one, or every interface's for a wildcard
/// bind (non-loopback first). Behind a NAT the public address differs; the sender
/// learns its own from the probe reply, and rendezvous will exchange them later.
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

pub fn bind_addr(bind: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = bind.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = bind.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = bare
        .parse()
        .with_context(|| format!("--bind {bind:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflexive_addresses_print_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:5000".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "198.51.100.1:5000");
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn bind_takes_an_ip_or_a_full_address() {
        assert_eq!(
            bind_addr("0.0.0.0", 9199).unwrap().to_string(),
            "0.0.0.0:9199"
        );
        assert_eq!(bind_addr("[::]", 9199).unwrap().to_string(), "[::]:9199");
        assert_eq!(bind_addr("::", 7).unwrap().to_string(), "[::]:7");
        assert_eq!(
            bind_addr("127.0.0.1:5000", 9199).unwrap().to_string(),
            "127.0.0.1:5000"
        );
        assert!(bind_addr("example.com", 9199).is_err());
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
