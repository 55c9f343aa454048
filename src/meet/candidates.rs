//! Our own addresses to offer a peer, and what kind of address a peer offers us.
//!
//! Host candidates come from the interfaces, with the port of the one socket everything
//! uses (bound to a wildcard, so every interface reaches it). The peer's addresses are
//! ranked by what they say about the path: one on a network we are on is a LAN path (no
//! router in the way, no hairpinning needed), a global IPv6 address needs no NAT at all,
//! and the rest go through NATs.

use std::net::{IpAddr, SocketAddr};

use crate::meet::pake::{Hello, MAX_CANDIDATES};
use crate::nat::Mapping;
use crate::traverse::Kind;

/// What separates the NAT's mapping token from the index of the mapped candidate in a
/// hello's `nat` word: `apdm+map2` is "my NAT maps per address and port, and candidate 2
/// is a port my router forwards to me". A peer from before port mapping reads the whole
/// word as an unknown mapping, which it tries as easy: the right guess for a mapped port.
const MAPPED: &str = "+map";

/// The `nat` word of our hello: our mapping, and which candidate is a mapped port.
pub fn nat_token(ours: Mapping, mapped_at: Option<usize>) -> String {
    match mapped_at {
        Some(at) => format!("{}{MAPPED}{at}", ours.token()),
        None => ours.token().to_string(),
    }
}

/// What separates the rest of a hello's `nat` word from the index of the candidate that is
/// a TURN relayed address (`apdm+turn3`, `apdm+map1+turn3`): the peer sends to it through a
/// TURN allocation of its own (see [`crate::turn`]), never probes it directly. A peer
/// from before TURN reads the whole word as an unknown mapping (tried as easy), and
/// probes the relayed address like any candidate: the TURN server drops those probes, as
/// no permission names their source.
const TURN: &str = "+turn";

/// Our `nat` word with the index of our TURN relayed address, if we offer one.
pub fn with_turn(nat: String, turn_at: Option<usize>) -> String {
    match turn_at {
        Some(at) => format!("{nat}{TURN}{at}"),
        None => nat,
    }
}

/// The peer's TURN relayed address, from its hello's `nat` word (an index that names no
/// candidate is none).
pub fn turn_of(hello: &Hello) -> Option<SocketAddr> {
    let (_, at) = hello.nat.rsplit_once(TURN)?;
    let at = at.parse::<usize>().ok()?;
    hello.candidates.get(at).copied()
}

/// The peer's NAT mapping and its mapped port, from its hello's `nat` word (an index
/// that names no candidate is no mapped port).
pub fn nat_of(hello: &Hello) -> (Mapping, Option<SocketAddr>) {
    let nat = hello
        .nat
        .split_once(TURN)
        .map_or(hello.nat.as_str(), |(nat, _)| nat);
    match nat.split_once(MAPPED) {
        Some((token, at)) => {
            let mapped = at
                .parse::<usize>()
                .ok()
                .and_then(|at| hello.candidates.get(at).copied());
            (Mapping::from_token(token), mapped)
        }
        None => (Mapping::from_token(nat), None),
    }
}

/// One of our interface addresses and its prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    /// The address.
    pub ip: IpAddr,
    /// Its network prefix length (e.g. 24 for a /24).
    pub prefix: u8,
}

/// Our interfaces, except link-local ones (useless without a scope on the peer's side).
pub fn interfaces() -> Vec<Interface> {
    crate::addr::interface_networks()
        .into_iter()
        .filter(|&(ip, _)| !crate::addr::is_link_local(ip))
        .map(|(ip, prefix)| Interface { ip, prefix })
        .collect()
}

/// The addresses a socket bound to `local` can be reached at directly: every interface
/// address of its families (a dual-stack `[::]` socket: IPv4 and IPv6), loopback only when
/// `loopback` (peers on one machine), best first: private LAN addresses, then global IPv6,
/// then the rest. At most [`MAX_CANDIDATES`] minus room for the reflexive address.
pub fn host_candidates(local: SocketAddr, ifaces: &[Interface], loopback: bool) -> Vec<SocketAddr> {
    if !local.ip().is_unspecified() {
        return vec![local];
    }
    let dual = local.is_ipv6();
    let mut found: Vec<SocketAddr> = ifaces
        .iter()
        .map(|i| i.ip)
        .filter(|ip| dual || ip.is_ipv4())
        .filter(|ip| loopback || !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, local.port()))
        .collect();
    found.sort_by_key(|a| (!is_private(a.ip()), a.is_ipv4(), a.ip().is_loopback()));
    found.dedup();
    found.truncate(MAX_CANDIDATES - 2);
    found
}

/// What a peer's address is to us (which decides the order of checks).
pub fn kind_of(peer: SocketAddr, ours: &[Interface]) -> Kind {
    let ip = peer.ip().to_canonical();
    if ip.is_loopback()
        || ours
            .iter()
            .any(|i| crate::addr::same_network(i.ip, i.prefix, ip))
    {
        Kind::Lan
    } else if ip.is_ipv6() {
        Kind::Ipv6
    } else {
        Kind::Host
    }
}

/// RFC 1918 / unique-local addresses: the usual LAN.
fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

/// Add what STUN servers saw of us (`reflexive`) to our candidates, where it differs from
/// what the rendezvous saw (`observed`) and from what is already there, leaving room for
/// `observed`, which goes last after this (the peer's `public_of` takes the last).
pub fn add_reflexive(addrs: &mut Vec<SocketAddr>, reflexive: &[SocketAddr], observed: SocketAddr) {
    let observed = crate::addr::canonical(observed);
    for &seen in reflexive {
        let seen = crate::addr::canonical(seen);
        if seen != observed && !addrs.contains(&seen) && addrs.len() + 1 < MAX_CANDIDATES {
            addrs.push(seen);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iface(ip: &str, prefix: u8) -> Interface {
        Interface {
            ip: ip.parse().unwrap(),
            prefix,
        }
    }

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_nat_word_names_the_mapped_candidate() {
        let hello = |nat: &str| Hello {
            version: crate::meet::pake::VERSION,
            role: crate::meet::pake::Role::Sender,
            fingerprint: crate::identity::Identity::generate().unwrap().fingerprint(),
            candidates: vec![
                a("10.0.1.2:5000"),
                a("198.51.100.1:40000"),
                a("198.51.100.1:6000"),
            ],
            nat: nat.to_string(),
        };
        let apdm = Mapping::AddressAndPortDependent;
        assert_eq!(nat_token(apdm, None), "apdm");
        assert_eq!(nat_token(apdm, Some(1)), "apdm+map1");
        assert_eq!(nat_of(&hello("apdm")), (apdm, None));
        assert_eq!(
            nat_of(&hello(&nat_token(apdm, Some(1)))),
            (apdm, Some(a("198.51.100.1:40000")))
        );
        // An index out of range, or not a number: no mapped port, the mapping still read.
        assert_eq!(nat_of(&hello("apdm+map9")), (apdm, None));
        assert_eq!(
            nat_of(&hello("eim+mapx")),
            (Mapping::EndpointIndependent, None)
        );
        // A peer from before port mapping reads our word as unknown (tried as easy).
        assert_eq!(Mapping::from_token("apdm+map1"), Mapping::Unknown);
        // A TURN relayed address: named by its own index, after the mapped one or alone.
        let both = with_turn(nat_token(apdm, Some(1)), Some(2));
        assert_eq!(both, "apdm+map1+turn2");
        assert_eq!(nat_of(&hello(&both)), (apdm, Some(a("198.51.100.1:40000"))));
        assert_eq!(turn_of(&hello(&both)), Some(a("198.51.100.1:6000")));
        let alone = with_turn(nat_token(apdm, None), Some(0));
        assert_eq!(nat_of(&hello(&alone)), (apdm, None));
        assert_eq!(turn_of(&hello(&alone)), Some(a("10.0.1.2:5000")));
        assert_eq!(turn_of(&hello("apdm+map1")), None);
        assert_eq!(turn_of(&hello("apdm+turn7")), None);
        assert_eq!(turn_of(&hello("apdm+turnx")), None);
    }

    #[test]
    fn peers_on_our_networks_are_lan() {
        let ours = [iface("10.0.1.2", 24), iface("2001:db8:1::2", 64)];
        assert_eq!(kind_of(a("10.0.1.3:9199"), &ours), Kind::Lan);
        assert_eq!(kind_of(a("[::ffff:10.0.1.9]:1"), &ours), Kind::Lan);
        assert_eq!(kind_of(a("10.0.2.3:9199"), &ours), Kind::Host);
        assert_eq!(kind_of(a("[2001:db8:1::7]:1"), &ours), Kind::Lan);
        assert_eq!(kind_of(a("[2001:db8:2::7]:1"), &ours), Kind::Ipv6);
        assert_eq!(kind_of(a("198.51.100.1:1"), &ours), Kind::Host);
        assert_eq!(kind_of(a("127.0.0.1:1"), &ours), Kind::Lan);
    }

    #[test]
    fn host_candidates_follow_the_socket_families_and_rank_lan_first() {
        let ours = [
            iface("127.0.0.1", 8),
            iface("198.51.100.7", 24),
            iface("10.0.1.2", 24),
            iface("2001:db8:1::2", 64),
        ];
        let v4 = host_candidates(a("0.0.0.0:5000"), &ours, false);
        assert_eq!(v4, vec![a("10.0.1.2:5000"), a("198.51.100.7:5000")]);
        let dual = host_candidates(a("[::]:5000"), &ours, true);
        assert_eq!(dual[0], a("10.0.1.2:5000"));
        assert!(dual.contains(&a("[2001:db8:1::2]:5000")));
        assert_eq!(dual.last(), Some(&a("127.0.0.1:5000")));
        assert_eq!(
            host_candidates(a("10.0.1.2:5000"), &ours, false),
            vec![a("10.0.1.2:5000")]
        );
    }

    #[test]
    fn stun_candidates_go_before_the_observed_one_without_repeats() {
        let a = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let observed = a("203.0.113.5:4000");
        let mut addrs = vec![a("10.0.0.2:4000")];
        let reflexive = [
            a("[::ffff:203.0.113.5]:4000"),
            a("198.51.100.9:4000"),
            a("198.51.100.9:4000"),
            a("10.0.0.2:4000"),
        ];
        add_reflexive(&mut addrs, &reflexive, observed);
        assert_eq!(addrs, [a("10.0.0.2:4000"), a("198.51.100.9:4000")]);
        // A full list keeps the last place for the observed address.
        let mut full: Vec<SocketAddr> = (0..MAX_CANDIDATES as u16 - 1)
            .map(|p| SocketAddr::from(([10, 0, 0, 2], p + 1)))
            .collect();
        add_reflexive(&mut full, &[a("198.51.100.9:4000")], observed);
        assert_eq!(full.len(), MAX_CANDIDATES - 1);
    }
}
