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
//! The classification is plain functions of what was observed; [`check`] runs the probes.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::Serialize;

use crate::node::Node;
use crate::punch::PunchConfig;
use crate::rendezvous::{ClientError, RendezvousClient};
use crate::wire::Message;

/// How a NAT maps one local socket to public addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// No translation at all: the public address is the local one.
    None,
    /// One public address per local socket, whatever the destination.
    EndpointIndependent,
    /// A new public address per destination IP.
    AddressDependent,
    /// A new public address per destination IP and port ("symmetric").
    AddressAndPortDependent,
    /// Not enough answers to tell.
    Unknown,
}

impl Mapping {
    /// RFC 4787's name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Mapping::None => "none (public address)",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::AddressDependent => "address-dependent",
            Mapping::AddressAndPortDependent => "address-and-port-dependent (symmetric)",
            Mapping::Unknown => "unknown",
        }
    }

    /// A short token for the sealed hello ([`crate::meet::pake::Hello::nat`]).
    pub fn token(self) -> &'static str {
        match self {
            Mapping::None => "none",
            Mapping::EndpointIndependent => "eim",
            Mapping::AddressDependent => "adm",
            Mapping::AddressAndPortDependent => "apdm",
            Mapping::Unknown => "unknown",
        }
    }

    /// The inverse of [`token`](Self::token); anything else is [`Mapping::Unknown`].
    pub fn from_token(token: &str) -> Mapping {
        match token {
            "none" => Mapping::None,
            "eim" => Mapping::EndpointIndependent,
            "adm" => Mapping::AddressDependent,
            "apdm" => Mapping::AddressAndPortDependent,
            _ => Mapping::Unknown,
        }
    }

    /// Whether a peer cannot learn our public port from the rendezvous: the mapping it
    /// would send to is not the one the rendezvous saw.
    pub fn is_hard(self) -> bool {
        matches!(
            self,
            Mapping::AddressDependent | Mapping::AddressAndPortDependent
        )
    }
}

/// Which inbound datagrams a NAT lets through to a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anything sent to the mapping.
    EndpointIndependent,
    /// Only from addresses we sent to (any port).
    AddressDependent,
    /// Only from exactly the addresses and ports we sent to.
    AddressAndPortDependent,
    /// Not enough answers to tell.
    Unknown,
}

impl Filtering {
    /// RFC 4787's name, as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
            Filtering::Unknown => "unknown",
        }
    }
}

/// The verdict of [`check`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NatReport {
    /// Whether UDP reached the rendezvous at all.
    pub udp: bool,
    /// Our local address (the socket's).
    pub local: SocketAddr,
    /// Our public address as the rendezvous's main address saw it.
    pub public: Option<SocketAddr>,
    /// Whether the NAT kept our local port.
    pub port_preserved: Option<bool>,
    /// How it maps.
    pub mapping: Mapping,
    /// How it filters.
    pub filtering: Filtering,
    /// Our public IPv6 address, when the rendezvous has one and we reached it.
    pub ipv6: Option<SocketAddr>,
    /// Every probe target and what it saw (or `None`: no answer).
    pub observations: Vec<(SocketAddr, Option<SocketAddr>)>,
}

impl NatReport {
    /// The report when the rendezvous could not be reached over UDP at all.
    pub fn unreachable(local: SocketAddr) -> Self {
        NatReport {
            udp: false,
            local,
            public: None,
            port_preserved: None,
            mapping: Mapping::Unknown,
            filtering: Filtering::Unknown,
            ipv6: None,
            observations: Vec::new(),
        }
    }
}

/// Classify the mapping from what three destinations saw of one socket: the main address,
/// the same IP at another port, another IP at the main port (each `None` if unanswered or
/// not tested). `local` is the socket's own address, to recognise "no NAT".
pub fn classify_mapping(
    local: SocketAddr,
    main: Option<SocketAddr>,
    other_port: Option<SocketAddr>,
    other_ip: Option<SocketAddr>,
) -> Mapping {
    let Some(main) = main else {
        return Mapping::Unknown;
    };
    if main.port() == local.port() && main.ip() == local.ip() {
        return Mapping::None;
    }
    match (other_port, other_ip) {
        (Some(p), _) if p != main => Mapping::AddressAndPortDependent,
        (_, Some(i)) if i != main => Mapping::AddressDependent,
        (Some(_), _) | (_, Some(_)) => Mapping::EndpointIndependent,
        (None, None) => Mapping::Unknown,
    }
}

/// Classify filtering from whether replies sent from another IP, and from another port of
/// the same IP, got through (`None`: not tested).
pub fn classify_filtering(from_other_ip: Option<bool>, from_other_port: Option<bool>) -> Filtering {
    match (from_other_ip, from_other_port) {
        (Some(true), _) => Filtering::EndpointIndependent,
        (_, Some(true)) => Filtering::AddressDependent,
        (_, Some(false)) => Filtering::AddressAndPortDependent,
        _ => Filtering::Unknown,
    }
}

/// How long a probe or a reflection may take to come back.
const WAIT: Duration = Duration::from_millis(1500);

/// Probe the rendezvous behind `client` from `node`'s socket and classify our NAT, mapping
/// and filtering (`qpunch nat-check`).
///
/// Filtering is tested first, while the only destination this socket has sent to is the
/// rendezvous's main address: a probe to the other address or port would open the very
/// filter being tested. Mapping is tested after.
pub async fn check(node: &Node, client: &RendezvousClient) -> Result<NatReport, ClientError> {
    let welcome = client.info().await?;
    let rv = client.addr();
    let other_ip = other_address(&welcome.addrs, rv);
    let (from_other_ip, from_other_port) = tokio::join!(
        async {
            match other_ip {
                Some(_) => Some(reflected(node, client, true, false).await),
                None => None,
            }
        },
        reflected(node, client, false, true),
    );
    let mut report = mapping(node, client, &welcome).await?;
    report.filtering = classify_filtering(from_other_ip, Some(from_other_port));
    Ok(report)
}

/// Classify only our NAT's mapping (what a meeting needs to choose its strategy): one
/// round of probes, about one round trip.
pub async fn check_mapping(
    node: &Node,
    client: &RendezvousClient,
) -> Result<NatReport, ClientError> {
    let welcome = client.info().await?;
    mapping(node, client, &welcome).await
}

/// Another address of the rendezvous, of the family we reach it by.
fn other_address(addrs: &[IpAddr], rv: SocketAddr) -> Option<SocketAddr> {
    let family = rv.ip().to_canonical().is_ipv4();
    addrs
        .iter()
        .copied()
        .find(|ip| ip.to_canonical().is_ipv4() == family && *ip != rv.ip().to_canonical())
        .map(|ip| SocketAddr::new(ip, rv.port()))
}

/// Probe the rendezvous's other port, other address and IPv6 address; classify mapping.
async fn mapping(
    node: &Node,
    client: &RendezvousClient,
    welcome: &crate::rendezvous::Welcome,
) -> Result<NatReport, ClientError> {
    let local = node
        .local_addr()
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let rv = client.addr();
    let other_ip = other_address(&welcome.addrs, rv);
    let alt_port = SocketAddr::new(rv.ip(), welcome.alt_port);
    let v6 = welcome
        .addrs
        .iter()
        .copied()
        .find(|ip| ip.is_ipv6() && local.is_ipv6() && !rv.is_ipv6())
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

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn mapping_table() {
        let local = a("10.0.1.2:5000");
        let pub1 = a("203.0.113.1:5000");
        let pub2 = a("203.0.113.1:6000");
        let cases = [
            (Some(a("10.0.1.2:5000")), None, None, Mapping::None),
            (
                Some(pub1),
                Some(pub1),
                Some(pub1),
                Mapping::EndpointIndependent,
            ),
            (Some(pub1), Some(pub1), None, Mapping::EndpointIndependent),
            (
                Some(pub1),
                Some(pub2),
                Some(pub1),
                Mapping::AddressAndPortDependent,
            ),
            (
                Some(pub1),
                Some(pub1),
                Some(pub2),
                Mapping::AddressDependent,
            ),
            (Some(pub1), None, None, Mapping::Unknown),
            (None, Some(pub1), Some(pub1), Mapping::Unknown),
        ];
        for (main, port, ip, want) in cases {
            assert_eq!(
                classify_mapping(local, main, port, ip),
                want,
                "{main:?} {port:?} {ip:?}"
            );
        }
    }

    #[test]
    fn filtering_table() {
        use Filtering::*;
        assert_eq!(
            classify_filtering(Some(true), Some(true)),
            EndpointIndependent
        );
        assert_eq!(
            classify_filtering(Some(false), Some(true)),
            AddressDependent
        );
        assert_eq!(classify_filtering(None, Some(true)), AddressDependent);
        assert_eq!(
            classify_filtering(Some(false), Some(false)),
            AddressAndPortDependent
        );
        assert_eq!(classify_filtering(None, None), Unknown);
    }

    #[test]
    fn tokens_round_trip_and_hardness() {
        for m in [
            Mapping::None,
            Mapping::EndpointIndependent,
            Mapping::AddressDependent,
            Mapping::AddressAndPortDependent,
            Mapping::Unknown,
        ] {
            assert_eq!(Mapping::from_token(m.token()), m);
        }
        assert_eq!(Mapping::from_token("what"), Mapping::Unknown);
        assert!(Mapping::AddressAndPortDependent.is_hard());
        assert!(!Mapping::EndpointIndependent.is_hard());
        assert!(!Mapping::Unknown.is_hard(), "unknown is tried as easy");
    }
}
