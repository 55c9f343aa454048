//! The NAT-check reflector: the rendezvous's second port, and replies sent from another
//! port or address on request, so a client can classify its NAT ([`crate::natcheck`]).
//!
//! Apart from pairing on purpose: it shares nothing with the book but the node's main
//! socket (whose own probe answers come from [`crate::socket`]). The second port only ever
//! answers probes, rate limited like the main socket; a reflection goes only to the
//! address of a client that passed a QUIC Retry, and is no larger than a probe reply.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use crate::node::Node;
use crate::ratelimit::{RateConfig, RateLimiter};
use crate::wire::{Message, TxId};

/// Why a reflection could not be sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReflectError {
    /// Asked to change address, but the rendezvous has no other of the client's family.
    #[error("this rendezvous has no second address")]
    NoSecondAddress,
    /// The socket refused.
    #[error("cannot send: {0}")]
    Send(#[from] std::io::Error),
}

/// The sockets that answer NAT checks besides the main one.
pub(crate) struct Reflector {
    node: Arc<Node>,
    /// Answers probes on the second port, and sends change-port reflections.
    alt: Arc<tokio::net::UdpSocket>,
    /// One socket on each announced address (any port): change-address reflections leave
    /// from another address and another port, as RFC 5780's "change IP and port" test.
    others: Vec<tokio::net::UdpSocket>,
    addrs: Vec<IpAddr>,
}

impl Reflector {
    /// Reflect for the rendezvous on `node`, with `alt` on its second port, announcing
    /// `addrs`; starts answering probes on `alt` (needs a tokio runtime).
    pub fn new(
        node: Arc<Node>,
        alt: std::net::UdpSocket,
        addrs: Vec<IpAddr>,
    ) -> std::io::Result<Self> {
        alt.set_nonblocking(true)?;
        let alt = Arc::new(tokio::net::UdpSocket::from_std(alt)?);
        let others = addrs
            .iter()
            .filter_map(|&ip| {
                let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).ok()?;
                socket.set_nonblocking(true).ok()?;
                tokio::net::UdpSocket::from_std(socket).ok()
            })
            .collect();
        tokio::spawn(answer_probes(alt.clone()));
        Ok(Reflector {
            node,
            alt,
            others,
            addrs,
        })
    }

    /// The addresses announced to clients.
    pub fn addrs(&self) -> &[IpAddr] {
        &self.addrs
    }

    /// The second port (0 if it cannot be read).
    pub fn alt_port(&self) -> u16 {
        self.alt.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Send a probe reply for `txid` to `to` (which reached us at `ours`), from the other
    /// address (`change_ip`), the other port (`change_port`), or else the main socket.
    pub async fn reflect(
        &self,
        to: SocketAddr,
        ours: Option<IpAddr>,
        txid: TxId,
        change_ip: bool,
        change_port: bool,
    ) -> Result<(), ReflectError> {
        let contents = Message::Reply { txid, observed: to }.to_vec();
        let to_v4 = to.ip().to_canonical().is_ipv4();
        if change_ip {
            // A socket on another address of the client's family (and another port).
            let other = self.others.iter().find(|socket| {
                socket.local_addr().is_ok_and(|a| {
                    a.ip().to_canonical().is_ipv4() == to_v4
                        && Some(a.ip().to_canonical()) != ours.map(|o| o.to_canonical())
                })
            });
            let other = other.ok_or(ReflectError::NoSecondAddress)?;
            let to = SocketAddr::new(to.ip().to_canonical(), to.port());
            other.send_to(&contents, to).await?;
        } else if change_port {
            self.alt.send_to(&contents, to).await?;
        } else {
            self.node.socket().send_probe(to, &contents).await?;
        }
        Ok(())
    }
}

/// The second port: answer probes (rate limited, like the main socket), nothing else.
async fn answer_probes(socket: Arc<tokio::net::UdpSocket>) {
    let mut limiter = RateLimiter::new(RateConfig::default(), Instant::now());
    let mut buf = vec![0u8; crate::wire::MAX_DATAGRAM + 1];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf).await else {
            // ICMP errors surface here on some systems; anything else means the socket
            // is gone, and there is nothing to answer with.
            continue;
        };
        if let Ok(Message::Probe { txid }) = Message::decode(&buf[..n])
            && limiter.allow(Instant::now(), from.ip())
        {
            let reply = crate::punch::reply_to(from, txid);
            let _ = socket.send_to(&reply.contents, reply.destination).await;
        }
    }
}

/// The addresses a rendezvous bound to `main` tells clients about: its own, or for a
/// wildcard every non-loopback, non-link-local interface address of its families (so
/// clients can test their NAT against a second address when there is one).
pub(crate) fn announced_addrs(main: SocketAddr) -> Vec<IpAddr> {
    if !main.ip().is_unspecified() {
        return vec![main.ip()];
    }
    let dual = main.is_ipv6();
    let mut addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
        .unwrap_or_default()
        .into_iter()
        .map(|iface| iface.ip())
        .filter(|ip| !ip.is_loopback() && (dual || ip.is_ipv4()))
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .collect();
    if addrs.is_empty() {
        addrs.push(if dual {
            std::net::Ipv6Addr::LOCALHOST.into()
        } else {
            std::net::Ipv4Addr::LOCALHOST.into()
        });
    }
    addrs
}
