//! What a gateway's answer must look like before its mapped address is offered to anyone.
//!
//! A gateway is a box on the LAN that anybody on the LAN can impersonate (NAT-PMP and PCP
//! are unauthenticated UDP, UPnP is unauthenticated HTTP). Its answer is a hint: the
//! mapped address goes into our sealed hello, and the peer aims probes at it. So an
//! answer that would aim the peer at somebody else (an address on our own networks, a
//! broadcast or loopback address, another public address than the one the internet sees
//! us at), or that cannot be right (port 0, a lifetime of zero or of years) is refused
//! with a reason the user sees as a warning. Pure: tested without a network.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::Protocol;

/// The shortest lifetime taken seriously: less and the mapping dies before a peer can
/// use it (a gateway granting 0 means "deleted").
pub const MIN_LIFETIME: Duration = Duration::from_secs(10);
/// The longest: we ask for minutes and renew; a grant of more than a day is not an
/// answer to our request.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A gateway's answer to a mapping request, as the protocol client decoded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Which protocol answered.
    pub protocol: Protocol,
    /// The public address the gateway says forwards to us.
    pub external: SocketAddr,
    /// The internal port it says it forwards to.
    pub internal_port: u16,
    /// How long the gateway says the mapping lives.
    pub lifetime: Duration,
}

/// Where the answer must fit.
#[derive(Debug, Clone)]
pub struct Context<'a> {
    /// The port we asked for (our node's).
    pub internal_port: u16,
    /// Our networks (address, prefix length): a mapped address on one of them is a
    /// neighbour, not the internet side of our router.
    pub networks: &'a [(IpAddr, u8)],
}

/// Why an answer was not trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Unspecified, loopback, multicast, broadcast or link-local: nobody can reach us there.
    #[error("it named {0}, which nobody on the internet can reach")]
    Unroutable(IpAddr),
    /// An address on one of our own networks: another host's, or the router's LAN side.
    #[error("it named {0}, an address on our own network, not the router's public side")]
    OnOurNetwork(IpAddr),
    /// External port 0.
    #[error("it named port 0")]
    PortZero,
    /// It forwards to another port than ours.
    #[error("it forwards to port {got}, not ours ({want})")]
    WrongInternalPort {
        /// Ours.
        want: u16,
        /// What it named.
        got: u16,
    },
    /// A lifetime outside [`MIN_LIFETIME`]..=[`MAX_LIFETIME`].
    #[error("it granted an absurd lifetime of {0:?}")]
    Lifetime(Duration),
    /// Another public address than the one a rendezvous saw us at.
    #[error(
        "it named {mapped}, but the internet sees us at {observed} (another NAT in front, or a lying gateway)"
    )]
    NotOurPublicAddress {
        /// What the gateway named.
        mapped: IpAddr,
        /// What the rendezvous saw.
        observed: IpAddr,
    },
}

/// Check one answer against where it must fit.
pub fn vet(answer: &Answer, context: &Context) -> Result<(), Refused> {
    let ip = answer.external.ip().to_canonical();
    if crate::addr::is_unroutable(ip) {
        return Err(Refused::Unroutable(ip));
    }
    if context
        .networks
        .iter()
        .any(|&(net, prefix)| crate::addr::same_network(net, prefix, ip))
    {
        return Err(Refused::OnOurNetwork(ip));
    }
    if answer.external.port() == 0 {
        return Err(Refused::PortZero);
    }
    if answer.internal_port != context.internal_port {
        return Err(Refused::WrongInternalPort {
            want: context.internal_port,
            got: answer.internal_port,
        });
    }
    if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&answer.lifetime) {
        return Err(Refused::Lifetime(answer.lifetime));
    }
    Ok(())
}

/// Whether a mapped address may be offered next to the public address a rendezvous saw
/// (`observed`): it must be the same public IP. A different one means a second NAT in
/// front of the router (the mapping opens nothing the internet can reach) or a gateway
/// aiming our peer at somebody else. Different families cannot be compared and pass.
pub fn agrees_with(mapped: SocketAddr, observed: SocketAddr) -> Result<(), Refused> {
    let (mapped, observed) = (mapped.ip().to_canonical(), observed.ip().to_canonical());
    if mapped.is_ipv4() == observed.is_ipv4() && mapped != observed {
        return Err(Refused::NotOurPublicAddress { mapped, observed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(external: &str, internal_port: u16, lifetime: u64) -> Answer {
        Answer {
            protocol: Protocol::Pcp,
            external: external.parse().unwrap(),
            internal_port,
            lifetime: Duration::from_secs(lifetime),
        }
    }

    fn networks() -> Vec<(IpAddr, u8)> {
        vec![
            ("10.0.1.2".parse().unwrap(), 24),
            ("2001:db8:1::2".parse().unwrap(), 64),
        ]
    }

    #[test]
    fn a_plain_public_mapping_passes() {
        let nets = networks();
        let context = Context {
            internal_port: 5000,
            networks: &nets,
        };
        assert_eq!(
            vet(&answer("198.51.100.1:40000", 5000, 600), &context),
            Ok(())
        );
        assert_eq!(
            vet(&answer("198.51.100.1:5000", 5000, 10), &context),
            Ok(())
        );
        assert_eq!(
            vet(&answer("198.51.100.1:5000", 5000, 86400), &context),
            Ok(())
        );
    }

    #[test]
    fn answers_that_aim_elsewhere_or_cannot_be_right_are_refused() {
        let nets = networks();
        let context = Context {
            internal_port: 5000,
            networks: &nets,
        };
        let cases = [
            ("0.0.0.0:40000", 5000, 600, "nobody"),
            ("127.0.0.1:40000", 5000, 600, "nobody"),
            ("255.255.255.255:40000", 5000, 600, "nobody"),
            ("224.0.0.1:40000", 5000, 600, "nobody"),
            ("169.254.1.1:40000", 5000, 600, "nobody"),
            ("[fe80::1]:40000", 5000, 600, "nobody"),
            ("10.0.1.3:40000", 5000, 600, "our own network"),
            ("10.0.1.1:40000", 5000, 600, "our own network"),
            ("[2001:db8:1::9]:40000", 5000, 600, "our own network"),
            ("198.51.100.1:0", 5000, 600, "port 0"),
            ("198.51.100.1:40000", 5001, 600, "not ours"),
            ("198.51.100.1:40000", 5000, 0, "absurd lifetime"),
            ("198.51.100.1:40000", 5000, 9, "absurd lifetime"),
            (
                "198.51.100.1:40000",
                5000,
                u64::from(u32::MAX),
                "absurd lifetime",
            ),
        ];
        for (external, port, lifetime, why) in cases {
            let refused = vet(&answer(external, port, lifetime), &context)
                .expect_err(external)
                .to_string();
            assert!(refused.contains(why), "{external}: {refused}");
        }
    }

    #[test]
    fn a_mapping_must_name_the_public_address_the_rendezvous_saw() {
        let a = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(
            agrees_with(a("198.51.100.1:40000"), a("198.51.100.1:1234")),
            Ok(())
        );
        assert_eq!(
            agrees_with(a("198.51.100.1:40000"), a("[::ffff:198.51.100.1]:1")),
            Ok(())
        );
        assert!(matches!(
            agrees_with(a("198.51.100.10:40000"), a("198.51.100.1:1234")),
            Err(Refused::NotOurPublicAddress { .. })
        ));
        // Families that cannot be compared pass.
        assert_eq!(
            agrees_with(a("198.51.100.1:40000"), a("[2001:db8::1]:1")),
            Ok(())
        );
    }
}
