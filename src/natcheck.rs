//! How does our NAT behave? (RFC 4787 terms, tested as RFC 5780 does, against a rendezvous.)
//!
//! - **Mapping**: probe the rendezvous at its main address, its second port and its second
//!   address, all from the same socket, and compare the public addresses it reports. One
//!   address for all: *endpoint-independent* (a peer will see what the rendezvous saw, and
//!   ordinary punching works). A new one per port: *address-and-port-dependent* (the
//!   "symmetric" NAT: the peer must find our port by the birthday technique). Same per
//!   port, new per address: *address-dependent* (treated like symmetric for punching, since
//!   the peer's address is never the rendezvous's).
//! - **Filtering**: ask the rendezvous to answer from its other address, then from its
//!   other port. Accepted from another address: *endpoint-independent*; only from another
//!   port of the same address: *address-dependent*; neither: *address-and-port-dependent*.
//!
//! The classification is plain functions of what was observed, in the leaf [`crate::nat`]
//! (re-exported here); [`check`] runs the probes. This module sits above
//! [`crate::rendezvous`], whose client it probes through.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use std::sync::Arc;

use crate::addr::canonical;
pub use crate::nat::{Filtering, Mapping, NatReport, classify_filtering, classify_mapping};
use crate::node::Node;
use crate::punch::PunchConfig;
use crate::ratelimit::prefix;
use crate::rendezvous::{ClientError, RendezvousClient};
use crate::socket::DemuxSocket;
use crate::stun::Change;
use crate::wire::Message;

/// How long a probe or a reflection may take to come back.
const WAIT: Duration = Duration::from_millis(1500);

/// Probe the rendezvous behind `client` from `node`'s socket and classify our NAT, mapping
/// and filtering (`qpunch nat-check`).
///
/// Filtering is tested first, while the only destination this socket has sent to is the
/// rendezvous's main address: a probe to the other address or port would open the very
/// filter being tested. Mapping is tested after.
///
/// Only addresses that are plausibly the rendezvous's own are probed (see
/// [`check_known`]); this is `check_known` with no names resolved.
pub async fn check(node: &Node, client: &RendezvousClient) -> Result<NatReport, ClientError> {
    check_known(node, client, &[]).await
}

/// [`check`], where `known` holds every address the rendezvous's host name resolved to.
///
/// The rendezvous is untrusted, and it names the addresses we probe: a lying one could aim
/// our probes at a victim. So a second address is probed only when it is one of `known`,
/// or in the same IPv4 /24 or IPv6 /48 as the address we reached the rendezvous at (where
/// a host's second address normally is); an IPv6 address of a rendezvous reached over
/// IPv4 only when it is one of `known`. Anything else it announces is ignored.
pub async fn check_known(
    node: &Node,
    client: &RendezvousClient,
    known: &[IpAddr],
) -> Result<NatReport, ClientError> {
    if let Some(report) = over_tcp(node, client) {
        return Ok(report);
    }
    let welcome = client.info().await?;
    let rv = client.addr();
    let other_ip = other_address(&welcome.addrs, rv, known);
    let (from_other_ip, from_other_port) = tokio::join!(
        async {
            match other_ip {
                Some(_) => Some(reflected(node, client, true, false).await),
                None => None,
            }
        },
        reflected(node, client, false, true),
    );
    let mut report = mapping(node, client, &welcome, known).await?;
    report.filtering = classify_filtering(from_other_ip, Some(from_other_port));
    Ok(report)
}

/// Classify only our NAT's mapping (what a meeting needs to choose its strategy): one
/// round of probes, about one round trip.
pub async fn check_mapping(
    node: &Node,
    client: &RendezvousClient,
) -> Result<NatReport, ClientError> {
    if let Some(report) = over_tcp(node, client) {
        return Ok(report);
    }
    let welcome = client.info().await?;
    mapping(node, client, &welcome, &[]).await
}

/// A client that reached the rendezvous over TCP ([`crate::tcp`]) did so because UDP did
/// not get through: there is no UDP NAT to classify, and what the rendezvous observes is a
/// TCP mapping that says nothing of the UDP one. The report says so (`udp: false`).
fn over_tcp(node: &Node, client: &RendezvousClient) -> Option<NatReport> {
    (client.transport() == crate::rendezvous::Transport::Tcp).then(|| {
        NatReport::unreachable(
            node.local_addr()
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0))),
        )
    })
}

/// Whether `ip` may be probed as the rendezvous's own address when we reached it at `rv`
/// (see [`check_known`]).
pub(crate) fn its_own(ip: IpAddr, rv: IpAddr, known: &[IpAddr]) -> bool {
    let (ip, rv) = (ip.to_canonical(), rv.to_canonical());
    if known.iter().any(|k| k.to_canonical() == ip) {
        return true;
    }
    let bits = if rv.is_ipv4() { 24 } else { 48 };
    ip.is_ipv4() == rv.is_ipv4() && prefix(ip, bits) == prefix(rv, bits)
}

/// Another address of the rendezvous, of the family we reach it by.
fn other_address(addrs: &[IpAddr], rv: SocketAddr, known: &[IpAddr]) -> Option<SocketAddr> {
    let family = rv.ip().to_canonical().is_ipv4();
    addrs
        .iter()
        .copied()
        .find(|ip| {
            ip.to_canonical().is_ipv4() == family
                && *ip != rv.ip().to_canonical()
                && its_own(*ip, rv.ip(), known)
        })
        .map(|ip| SocketAddr::new(ip, rv.port()))
}

/// Probe the rendezvous's other port, other address and IPv6 address; classify mapping.
async fn mapping(
    node: &Node,
    client: &RendezvousClient,
    welcome: &crate::rendezvous::Welcome,
    known: &[IpAddr],
) -> Result<NatReport, ClientError> {
    let local = node
        .local_addr()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let rv = client.addr();
    let other_ip = other_address(&welcome.addrs, rv, known);
    let alt_port = SocketAddr::new(rv.ip(), welcome.alt_port);
    let v6 = welcome
        .addrs
        .iter()
        .copied()
        .find(|ip| ip.is_ipv6() && local.is_ipv6() && !rv.is_ipv6() && its_own(*ip, rv.ip(), known))
        .map(|ip| SocketAddr::new(ip, rv.port()));
    let targets: Vec<SocketAddr> = [Some(alt_port), other_ip, v6]
        .into_iter()
        .flatten()
        .collect();
    let seen = futures_util::future::join_all(targets.iter().map(|&t| observe(node, t))).await;
    let lookup = |target: Option<SocketAddr>| {
        let target = target?;
        let i = targets.iter().position(|t| *t == target)?;
        seen[i]
    };
    let main = Some(canonical(welcome.observed));
    let mut observations = vec![(rv, main)];
    observations.extend(targets.iter().copied().zip(seen.iter().copied()));
    Ok(NatReport {
        udp: true,
        local,
        public: main,
        port_preserved: main.map(|m| m.port() == local.port()),
        mapping: classify_mapping(local, main, lookup(Some(alt_port)), lookup(other_ip)),
        filtering: Filtering::Unknown,
        ipv6: lookup(v6),
        observations,
    })
}

/// What `target` saw of our socket (a probe through the live node), if it answered.
async fn observe(node: &Node, target: SocketAddr) -> Option<SocketAddr> {
    let config = PunchConfig {
        initial_interval: Duration::from_millis(200),
        max_interval: Duration::from_millis(400),
        timeout: WAIT,
    };
    let punched = node.punch(vec![target], config).await.ok()?;
    punched.reflexive.map(canonical)
}

/// Whether a reply the rendezvous sends from its other address or port gets through.
async fn reflected(
    node: &Node,
    client: &RendezvousClient,
    change_ip: bool,
    change_port: bool,
) -> bool {
    let txid: crate::wire::TxId = rand::random();
    let mut replies = node.socket().subscribe();
    if client.reflect(txid, change_ip, change_port).await.is_err() {
        return false;
    }
    let wait = async {
        loop {
            match replies.recv().await {
                Ok((_, data)) => {
                    if matches!(Message::decode(&data), Ok(Message::Reply { txid: t, .. }) if t == txid)
                    {
                        return true;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(WAIT, wait).await.unwrap_or(false)
}

/// Classify our NAT against one STUN server as RFC 5780 §4 does, from `socket`
/// (`qpunch nat-check --stun`). `known` holds every address the server's name resolved
/// to: an OTHER-ADDRESS is probed only when it is plausibly the server's own.
///
/// Like [`check`]: filtering first, while the only destination this
/// socket has sent to is the server's main address (CHANGE-REQUEST asks it to answer from
/// its other address, then its other port), mapping after (Binding requests to its other
/// address and to its other port, compared with the first answer).
pub async fn check_stun(
    socket: &Arc<DemuxSocket>,
    local: SocketAddr,
    server: SocketAddr,
    known: &[IpAddr],
) -> NatReport {
    let server = canonical(server);
    let Ok(first) = crate::stun_client::binding(socket, server, Change::default(), &[]).await
    else {
        return NatReport::unreachable(local);
    };
    let other = first
        .other
        .filter(|o| o.is_ipv4() == server.is_ipv4() && o.ip() != server.ip())
        .filter(|o| its_own(o.ip(), server.ip(), known));
    let main = Some(first.mapped);
    let mut report = NatReport {
        udp: true,
        local,
        public: main,
        port_preserved: Some(first.mapped.port() == local.port()),
        mapping: classify_mapping(local, main, None, None),
        filtering: Filtering::Unknown,
        ipv6: None,
        observations: vec![(server, main)],
    };
    let Some(other) = other else {
        // No RFC 5780 here: the public address is all this server can tell.
        return report;
    };
    let alt_port = SocketAddr::new(server.ip(), other.port());
    let other_ip = SocketAddr::new(other.ip(), server.port());
    let (from_other, from_alt_port) = ([other], [alt_port]);
    let (from_other_ip, from_other_port) = tokio::join!(
        crate::stun_client::binding(
            socket,
            server,
            Change {
                ip: true,
                port: true
            },
            &from_other
        ),
        crate::stun_client::binding(
            socket,
            server,
            Change {
                ip: false,
                port: true
            },
            &from_alt_port
        ),
    );
    report.filtering =
        classify_filtering(Some(from_other_ip.is_ok()), Some(from_other_port.is_ok()));
    let (seen_alt_port, seen_other_ip) = tokio::join!(
        crate::stun_client::binding(socket, alt_port, Change::default(), &[]),
        crate::stun_client::binding(socket, other_ip, Change::default(), &[]),
    );
    let seen_alt_port = seen_alt_port.ok().map(|b| b.mapped);
    let seen_other_ip = seen_other_ip.ok().map(|b| b.mapped);
    report.mapping = classify_mapping(local, main, seen_alt_port, seen_other_ip);
    report
        .observations
        .extend([(alt_port, seen_alt_port), (other_ip, seen_other_ip)]);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_the_rendezvous_own_addresses_are_probed() {
        let rv: SocketAddr = "198.51.100.10:9200".parse().unwrap();
        // A second address next to it is probed; one far away only when its name said so.
        let near = [ip("198.51.100.11")];
        assert_eq!(
            other_address(&near, rv, &[]),
            Some("198.51.100.11:9200".parse().unwrap())
        );
        let victim = [ip("203.0.113.5")];
        assert_eq!(other_address(&victim, rv, &[]), None);
        assert_eq!(
            other_address(&victim, rv, &[ip("203.0.113.5")]),
            Some("203.0.113.5:9200".parse().unwrap())
        );
        // A liar's list: the victim first, its real second address after it.
        let listed = [ip("203.0.113.5"), ip("198.51.100.11")];
        assert_eq!(
            other_address(&listed, rv, &[]),
            Some("198.51.100.11:9200".parse().unwrap())
        );
        // IPv6 by prefix (/48), and across families only by name.
        let rv6: IpAddr = ip("2001:db8:1:2::10");
        assert!(its_own(ip("2001:db8:1:ff::1"), rv6, &[]));
        assert!(!its_own(ip("2001:db8:2::1"), rv6, &[]));
        assert!(!its_own(ip("2001:db8::10"), rv.ip(), &[]));
        assert!(its_own(ip("2001:db8::10"), rv.ip(), &[ip("2001:db8::10")]));
        assert!(its_own(ip("::ffff:198.51.100.12"), rv.ip(), &[]));
    }
}
