//! The three protocols' clients: maintained crates do the wire formats (`crab_nat` for PCP
//! and NAT-PMP, `igd-next` for UPnP IGD); this file turns their results into [`Outcome`]s
//! and holds what is needed to renew and delete a mapping.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU16;
use std::time::Duration;

use crab_nat::{InternetProtocol, PortMapping, PortMappingOptions, TimeoutConfig};
use igd_next::PortMappingProtocol;
use igd_next::aio::Gateway as UpnpDevice;
use igd_next::aio::tokio::Tokio;

use super::Protocol;
use super::vet::Answer;

/// What the mapping is called on a router's status page.
const DESCRIPTION: &str = "qpunch";

/// The gateway and our address on its network.
#[derive(Debug, Clone, Copy)]
pub(super) struct Gateway {
    pub ip: Ipv4Addr,
    pub local: IpAddr,
}

/// A mapping we hold on the gateway: what renews and deletes it.
#[derive(Debug)]
pub(super) enum Held {
    /// PCP or NAT-PMP (`crab_nat` keeps the nonce and the epoch).
    Pcmp(PortMapping),
    /// UPnP IGD: the device and the external port.
    Upnp {
        device: Box<UpnpDevice<Tokio>>,
        external_port: u16,
        local: SocketAddr,
    },
}

/// How one protocol's request went.
#[derive(Debug)]
pub(super) enum Outcome {
    /// A mapping (not vetted yet).
    Mapped(Answer, Held),
    /// Nothing answered in time: the gateway does not speak it (or drops it).
    Silent,
    /// Something answered, but no mapping came of it (an error code, a refusal).
    Failed(String),
    /// Something answered with what is not the protocol at all (why).
    Garbage(String),
}

/// Retry twice, 250 ms then 500 ms: a gateway on the LAN answers in milliseconds, and a
/// silent one must not hold anything up for long.
fn timeouts() -> TimeoutConfig {
    TimeoutConfig {
        initial_timeout: Duration::from_millis(250),
        max_retries: 2,
        max_retry_timeout: Some(Duration::from_millis(500)),
    }
}

fn options(port: NonZeroU16, lifetime: Duration) -> PortMappingOptions {
    PortMappingOptions {
        // Asking for our own port keeps the same port inside and out when it is free.
        external_port: Some(port),
        lifetime_seconds: Some(u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX)),
        timeout_config: Some(timeouts()),
    }
}

/// PCP MAP for `port` (RFC 6887).
pub(super) async fn pcp(gateway: Gateway, port: NonZeroU16, lifetime: Duration) -> Outcome {
    use crab_nat::pcp::{self, Failure};
    let request = pcp::BaseMapRequest::new(
        gateway.ip.into(),
        gateway.local,
        InternetProtocol::Udp,
        port,
    );
    match pcp::port_mapping(request, None, None, options(port, lifetime)).await {
        Ok(mapping) => {
            let external_ip = match mapping.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
                crab_nat::PortMappingType::NatPmp => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            };
            let answer = answer_of(Protocol::Pcp, external_ip, &mapping);
            Outcome::Mapped(answer, Held::Pcmp(mapping))
        }
        Err(Failure::Timeout | Failure::Socket(_)) => Outcome::Silent,
        Err(e @ (Failure::InvalidResponse(_) | Failure::Nonce)) => Outcome::Garbage(e.to_string()),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// NAT-PMP mapping for `port`, then the external address (RFC 6886: the mapping's answer
/// does not carry it).
pub(super) async fn nat_pmp(gateway: Gateway, port: NonZeroU16, lifetime: Duration) -> Outcome {
    use crab_nat::natpmp::{self, Failure};
    let silent = |e: &Failure| matches!(e, Failure::Timeout | Failure::Socket(_));
    let mapping = match natpmp::port_mapping(
        gateway.ip.into(),
        InternetProtocol::Udp,
        port,
        options(port, lifetime),
    )
    .await
    {
        Ok(mapping) => mapping,
        Err(e) if silent(&e) => return Outcome::Silent,
        Err(e @ Failure::InvalidResponse(_)) => return Outcome::Garbage(e.to_string()),
        Err(e) => return Outcome::Failed(e.to_string()),
    };
    match natpmp::external_address(gateway.ip.into(), Some(timeouts())).await {
        Ok(ip) => {
            let answer = answer_of(Protocol::NatPmp, ip.into(), &mapping);
            Outcome::Mapped(answer, Held::Pcmp(mapping))
        }
        Err(e) => {
            // A mapping without a known address is of no use: give it back.
            let _ = mapping.try_drop().await;
            Outcome::Failed(format!("no external address: {e}"))
        }
    }
}

fn answer_of(protocol: Protocol, external_ip: IpAddr, mapping: &PortMapping) -> Answer {
    Answer {
        protocol,
        external: SocketAddr::new(external_ip.to_canonical(), mapping.external_port().get()),
        internal_port: mapping.internal_port().get(),
        lifetime: Duration::from_secs(u64::from(mapping.lifetime())),
    }
}

/// Find the UPnP IGD device on the gateway's network (SSDP multicast, then its
/// description over HTTP), within `within`.
pub(super) async fn upnp_find(
    gateway: Gateway,
    within: Duration,
) -> Result<UpnpDevice<Tokio>, Outcome> {
    let mut options = igd_next::SearchOptions::default();
    options.bind_addr = SocketAddr::new(gateway.local, 0);
    options.timeout = Some(within);
    options.single_search_timeout = Some(within);
    match tokio::time::timeout(within, igd_next::aio::tokio::search_gateway(options)).await {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(igd_next::SearchError::NoResponseWithinTimeout)) | Err(_) => Err(Outcome::Silent),
        Ok(Err(igd_next::SearchError::IoError(_))) => Err(Outcome::Silent),
        Ok(Err(e)) => Err(Outcome::Failed(e.to_string())),
    }
}

/// Ask a found UPnP device for `port` (our own port outside if free, else any).
pub(super) async fn upnp_map(
    device: UpnpDevice<Tokio>,
    gateway: Gateway,
    port: NonZeroU16,
    lifetime: Duration,
) -> Outcome {
    let local = SocketAddr::new(gateway.local, port.get());
    let lease = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
    let udp = PortMappingProtocol::UDP;
    let external_port = match device
        .add_port(udp, port.get(), local, lease, DESCRIPTION)
        .await
    {
        Ok(()) => port.get(),
        Err(_) => match device.add_any_port(udp, local, lease, DESCRIPTION).await {
            Ok(external_port) => external_port,
            Err(e) => return Outcome::Failed(e.to_string()),
        },
    };
    let held = Held::Upnp {
        device: Box::new(device),
        external_port,
        local,
    };
    let Held::Upnp { device, .. } = &held else {
        unreachable!()
    };
    match device.get_external_ip().await {
        Ok(ip) => {
            let answer = Answer {
                protocol: Protocol::Upnp,
                external: SocketAddr::new(ip.to_canonical(), external_port),
                internal_port: port.get(),
                // UPnP grants what was asked or fails: there is no lifetime in its answer.
                lifetime,
            };
            Outcome::Mapped(answer, held)
        }
        Err(e) => {
            release(held).await;
            Outcome::Failed(format!("no external address: {e}"))
        }
    }
}

/// Renew a held mapping for another `lifetime`; the new answer (its address may change).
pub(super) async fn renew(held: &mut Held, lifetime: Duration) -> Result<Answer, String> {
    match held {
        Held::Pcmp(mapping) => {
            let protocol = match mapping.mapping_type() {
                crab_nat::PortMappingType::Pcp { .. } => Protocol::Pcp,
                crab_nat::PortMappingType::NatPmp => Protocol::NatPmp,
            };
            mapping.renew().await.map_err(|e| e.to_string())?;
            let external_ip = match mapping.mapping_type() {
                crab_nat::PortMappingType::Pcp { external_ip, .. } => external_ip,
                crab_nat::PortMappingType::NatPmp => {
                    crab_nat::natpmp::external_address(mapping.gateway(), Some(timeouts()))
                        .await
                        .map_err(|e| e.to_string())?
                        .into()
                }
            };
            Ok(answer_of(protocol, external_ip, mapping))
        }
        Held::Upnp {
            device,
            external_port,
            local,
        } => {
            let lease = u32::try_from(lifetime.as_secs()).unwrap_or(u32::MAX);
            device
                .add_port(
                    PortMappingProtocol::UDP,
                    *external_port,
                    *local,
                    lease,
                    DESCRIPTION,
                )
                .await
                .map_err(|e| e.to_string())?;
            let ip = device.get_external_ip().await.map_err(|e| e.to_string())?;
            Ok(Answer {
                protocol: Protocol::Upnp,
                external: SocketAddr::new(ip.to_canonical(), *external_port),
                internal_port: local.port(),
                lifetime,
            })
        }
    }
}

/// Delete a held mapping from the gateway (best effort: it expires anyway).
pub(super) async fn release(held: Held) {
    let result = match held {
        Held::Pcmp(mapping) => mapping.try_drop().await.map_err(|(e, _)| e.to_string()),
        Held::Upnp {
            device,
            external_port,
            ..
        } => device
            .remove_port(PortMappingProtocol::UDP, external_port)
            .await
            .map_err(|e| e.to_string()),
    };
    if let Err(e) = result {
        tracing::debug!("deleting a port mapping failed (it expires on its own): {e}");
    }
}
