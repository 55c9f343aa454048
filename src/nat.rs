//! What a NAT does, in RFC 4787's terms: the behaviour types and their classification.
//!
//! A leaf: plain data and pure functions of what was observed, so the meeting
//! ([`crate::meet`]) can reason about both sides' NATs without depending on how they were
//! measured. [`crate::natcheck`] runs the probes against a rendezvous and fills in a
//! [`NatReport`].

use std::net::SocketAddr;

use serde::Serialize;

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

/// The verdict of [`crate::natcheck::check`].
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
