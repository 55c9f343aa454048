//! Asking the home router to open our port: PCP, NAT-PMP and UPnP IGD.
//!
//! Most home routers forward a port when asked. A mapped port is an address any peer can
//! reach us at, whatever the NAT does to our own packets: with it, two peers behind
//! NATs that give every destination a new port (where punching alone fails and the relay
//! is the only way) connect directly. Tailscale and iroh ask; croc and magic-wormhole do not.
//!
//! [`PortMapper::start`] asks in the background, beside the meeting's own work: UPnP's
//! device search starts at once, PCP is asked first (RFC 6887: the newest), NAT-PMP only
//! if something answered PCP without mapping, and UPnP only when neither mapped. One
//! mapping is held, renewed at half its lifetime, and deleted by [`PortMapper::release`]
//! (the share layer calls it on every way out, Ctrl-C and SIGTERM included; a crash leaves
//! a mapping that expires after [`PortMapConfig::lifetime`]). Every answer is vetted
//! ([`vet`]) before anyone sees its address: a gateway is a box anybody on the LAN can
//! impersonate.
//!
//! The wire formats are maintained crates': `crab_nat` (PCP and NAT-PMP, small, tokio)
//! and `igd-next` (UPnP IGD, the one iroh's portmapper uses too). iroh's own
//! `portmapper` crate was not taken: it brings iroh's metrics and network monitor, and
//! hides the lifetimes and the per-protocol answers that our checks and `nat-check` need.

mod probe;
pub mod route;
pub mod vet;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU16;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use probe::{Gateway, Held, Outcome};

/// A port mapping protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Port Control Protocol (RFC 6887).
    Pcp,
    /// NAT Port Mapping Protocol (RFC 6886), PCP's predecessor.
    NatPmp,
    /// UPnP Internet Gateway Device.
    Upnp,
}

impl Protocol {
    /// All three, in the order they are asked.
    pub const ALL: [Protocol; 3] = [Protocol::Pcp, Protocol::NatPmp, Protocol::Upnp];

    /// A short stable name, for events: `pcp`, `nat-pmp`, `upnp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Pcp => "pcp",
            Protocol::NatPmp => "nat-pmp",
            Protocol::Upnp => "upnp",
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pcp => "PCP",
            Protocol::NatPmp => "NAT-PMP",
            Protocol::Upnp => "UPnP IGD",
        })
    }
}

/// A port the router forwards to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapped {
    /// How it was asked for.
    pub protocol: Protocol,
    /// The public address that reaches our socket.
    pub external: SocketAddr,
    /// The router that holds it.
    pub gateway: IpAddr,
    /// How long it lives unless renewed.
    pub lifetime: Duration,
}

/// What the mapper tells its owner on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A mapping is held (or was renewed at another address).
    Mapped(Mapped),
    /// A gateway's answer was not trusted (see [`vet`]): nothing of it is used.
    Ignored {
        /// Who answered.
        protocol: Protocol,
        /// Why it was ignored.
        reason: String,
    },
    /// A held mapping could not be renewed: it is no longer offered.
    Lost {
        /// Why.
        reason: String,
    },
}

/// How the mapper asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortMapConfig {
    /// The lifetime asked for; the mapping is renewed at half of it. Short, so that a
    /// mapping left behind by a crash does not stay open for long.
    pub lifetime: Duration,
    /// How long the UPnP device search may take.
    pub upnp_search: Duration,
}

impl Default for PortMapConfig {
    fn default() -> Self {
        PortMapConfig {
            lifetime: Duration::from_secs(600),
            upnp_search: Duration::from_secs(2),
        }
    }
}

/// Who hears the mapper's [`Notice`]s.
pub type OnNotice = Arc<dyn Fn(Notice) + Send + Sync>;

#[derive(Debug, Clone, Default)]
struct State {
    mapped: Option<Mapped>,
    /// Every protocol had its answer (or its silence): nothing more will come unless a
    /// renewal changes it.
    settled: bool,
}

/// Asks the default gateway to forward our socket's port, holds the mapping, and gives it
/// back. Cheap to clone; the mapping lives until [`release`](Self::release) (or expires
/// after its lifetime if the last clone is dropped without it).
#[derive(Clone)]
pub struct PortMapper {
    inner: Arc<Inner>,
}

struct Inner {
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap_or_else(|e| e.into_inner()).take() {
            task.abort();
        }
    }
}

impl std::fmt::Debug for PortMapper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PortMapper")
            .field("mapped", &self.current())
            .finish()
    }
}

impl PortMapper {
    /// Start asking for `local`'s port. `None` when there is nothing to ask: a loopback
    /// bind, or no IPv4 default gateway (the three protocols map IPv4; IPv6 needs no
    /// NAT). Must be called inside a tokio runtime.
    pub fn start(local: SocketAddr, config: PortMapConfig, on_notice: OnNotice) -> Option<Self> {
        if local.ip().is_loopback() {
            return None;
        }
        let port = NonZeroU16::new(local.port())?;
        let gateway = find_gateway()?;
        let (state_tx, state) = watch::channel(State::default());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(run(gateway, port, config, state_tx, stopped, on_notice));
        Some(PortMapper {
            inner: Arc::new(Inner {
                state,
                stop,
                task: Mutex::new(Some(task)),
            }),
        })
    }

    /// The mapping held now.
    pub fn current(&self) -> Option<Mapped> {
        self.inner.state.borrow().mapped
    }

    /// The mapping, waiting at most `within` for the protocols to settle (returns at once
    /// when they have).
    pub async fn settled(&self, within: Duration) -> Option<Mapped> {
        let mut state = self.inner.state.clone();
        let _ =
            tokio::time::timeout(within, state.wait_for(|s| s.settled || s.mapped.is_some())).await;
        self.current()
    }

    /// Stop renewing and delete the mapping from the gateway (waits at most 2 s: a
    /// gateway that went away must not hold up an exit).
    pub async fn release(&self) {
        let _ = self.inner.stop.send(true);
        let task = self
            .inner
            .task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(mut task) = task
            && tokio::time::timeout(Duration::from_secs(2), &mut task)
                .await
                .is_err()
        {
            task.abort();
        }
    }
}

/// The default gateway and our address toward it.
fn find_gateway() -> Option<Gateway> {
    let ip = route::default_gateway_v4()?;
    let local = route::local_toward(ip.into())?;
    Some(Gateway { ip, local })
}

/// Check a gateway's answer for `port` against our interface networks (a mapped address
/// on one of them is not the internet side of the router).
fn vet_answer(answer: &vet::Answer, port: NonZeroU16) -> Result<(), vet::Refused> {
    let networks: Vec<(IpAddr, u8)> = crate::addr::interface_networks()
        .into_iter()
        .filter(|(ip, _)| !ip.is_loopback())
        .collect();
    let context = vet::Context {
        internal_port: port.get(),
        networks: &networks,
    };
    vet::vet(answer, &context)
}

/// Vet an outcome: a mapping that passes, or `None` (an untrusted one is given back and
/// reported).
async fn accept(
    protocol: Protocol,
    outcome: Outcome,
    port: NonZeroU16,
    notice: &OnNotice,
) -> Option<(vet::Answer, Held)> {
    let (answer, held) = match outcome {
        Outcome::Mapped(answer, held) => (answer, held),
        Outcome::Garbage(why) => {
            tracing::warn!("ignored the router's {protocol} answer: {why}");
            notice(Notice::Ignored {
                protocol,
                reason: format!("it was not a valid {protocol} answer ({why})"),
            });
            return None;
        }
        Outcome::Failed(why) => {
            tracing::debug!("{protocol}: {why}");
            return None;
        }
        Outcome::Silent => return None,
    };
    match vet_answer(&answer, port) {
        Ok(()) => Some((answer, held)),
        Err(refused) => {
            tracing::warn!("ignored the router's {} answer: {refused}", answer.protocol);
            notice(Notice::Ignored {
                protocol: answer.protocol,
                reason: refused.to_string(),
            });
            probe::release(held).await;
            None
        }
    }
}

/// One mapping from the first protocol that gives a trustworthy one.
async fn obtain(
    gateway: Gateway,
    port: NonZeroU16,
    config: PortMapConfig,
    notice: &OnNotice,
) -> Option<(vet::Answer, Held)> {
    // The UPnP search (multicast, then HTTP) is the slow one: it starts now, beside PCP.
    let mut search = AbortOnDrop(tokio::spawn(probe::upnp_find(gateway, config.upnp_search)));
    let pcp = probe::pcp(gateway, port, config.lifetime).await;
    let pcp_answered = !matches!(pcp, Outcome::Silent);
    if let Some(found) = accept(Protocol::Pcp, pcp, port, notice).await {
        return Some(found);
    }
    // Something listens on the PCP port but did not map: an older NAT-PMP gateway answers
    // PCP with "unsupported version". Silence there means nobody listens to NAT-PMP either.
    if pcp_answered {
        let pmp = probe::nat_pmp(gateway, port, config.lifetime).await;
        if let Some(found) = accept(Protocol::NatPmp, pmp, port, notice).await {
            return Some(found);
        }
    }
    let upnp = match (&mut search.0).await {
        Ok(Ok(device)) => probe::upnp_map(device, gateway, port, config.lifetime).await,
        Ok(Err(outcome)) => outcome,
        Err(_) => Outcome::Silent,
    };
    accept(Protocol::Upnp, upnp, port, notice).await
}

/// A task aborted when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The mapper's life: obtain, renew at half the lifetime, give back when stopped.
async fn run(
    gateway: Gateway,
    port: NonZeroU16,
    config: PortMapConfig,
    state: watch::Sender<State>,
    mut stopped: watch::Receiver<bool>,
    notice: OnNotice,
) {
    let mut held: Option<Held> = None;
    loop {
        let wait = match held.as_mut() {
            None => {
                // Cancel-safe: `changed` loses nothing. A request cut off by a stop may
                // leave a mapping the gateway granted at that instant: it expires after
                // its lifetime (waiting for it could hold an exit up for seconds).
                let found = tokio::select! {
                    found = obtain(gateway, port, config, &notice) => found,
                    _ = stopped.changed() => return,
                };
                match found {
                    Some((answer, mapping)) => {
                        let mapped = mapped_of(answer, gateway);
                        state.send_modify(|s| {
                            s.mapped = Some(mapped);
                            s.settled = true;
                        });
                        notice(Notice::Mapped(mapped));
                        held = Some(mapping);
                        answer.lifetime / 2
                    }
                    None => {
                        state.send_modify(|s| s.settled = true);
                        // Ask again now and then: a router may start answering (a user
                        // turns UPnP on), and an idle retry costs a few datagrams.
                        config.lifetime / 2
                    }
                }
            }
            Some(mapping) => match probe::renew(mapping, config.lifetime).await {
                Ok(answer) => {
                    let mapped = mapped_of(answer, gateway);
                    if state.borrow().mapped != Some(mapped) {
                        notice(Notice::Mapped(mapped));
                    }
                    state.send_modify(|s| s.mapped = Some(mapped));
                    answer.lifetime.clamp(vet::MIN_LIFETIME, vet::MAX_LIFETIME) / 2
                }
                Err(reason) => {
                    state.send_modify(|s| s.mapped = None);
                    notice(Notice::Lost { reason });
                    held = None;
                    Duration::from_secs(30)
                }
            },
        };
        // Cancel-safe: a sleep and a `changed`.
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stopped.changed() => break,
        }
    }
    state.send_modify(|s| s.mapped = None);
    if let Some(mapping) = held {
        probe::release(mapping).await;
    }
}

fn mapped_of(answer: vet::Answer, gateway: Gateway) -> Mapped {
    Mapped {
        protocol: answer.protocol,
        external: answer.external,
        gateway: gateway.ip.into(),
        lifetime: answer.lifetime,
    }
}

/// What `nat-check` learns of one protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Spoken {
    /// Nothing answered.
    Silent,
    /// It answered, but no usable mapping came of it (why).
    Refused(String),
    /// It mapped (and the mapping was deleted again).
    Mapped(SocketAddr),
}

/// What each protocol did for `nat-check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Survey {
    /// The default gateway asked (`None`: no IPv4 default route).
    pub gateway: Option<IpAddr>,
    /// One entry per protocol, in [`Protocol::ALL`]'s order.
    pub protocols: Vec<(Protocol, Spoken)>,
}

/// Ask each protocol in turn for `local`'s port, and delete each mapping at once: which
/// ones the gateway speaks, and the address each one gave.
pub async fn survey(local: SocketAddr, config: PortMapConfig) -> Survey {
    let (Some(gateway), Some(port)) = (find_gateway(), NonZeroU16::new(local.port())) else {
        return Survey {
            gateway: None,
            protocols: Vec::new(),
        };
    };
    let mut protocols = Vec::new();
    for protocol in Protocol::ALL {
        let outcome = match protocol {
            Protocol::Pcp => probe::pcp(gateway, port, config.lifetime).await,
            Protocol::NatPmp => probe::nat_pmp(gateway, port, config.lifetime).await,
            Protocol::Upnp => match probe::upnp_find(gateway, config.upnp_search).await {
                Ok(device) => probe::upnp_map(device, gateway, port, config.lifetime).await,
                Err(outcome) => outcome,
            },
        };
        let spoken = match outcome {
            Outcome::Silent => Spoken::Silent,
            Outcome::Failed(why) => Spoken::Refused(why),
            Outcome::Garbage(why) => Spoken::Refused(format!("not a valid answer: {why}")),
            Outcome::Mapped(answer, held) => {
                let verdict = vet_answer(&answer, port);
                probe::release(held).await;
                match verdict {
                    Ok(()) => Spoken::Mapped(answer.external),
                    Err(refused) => Spoken::Refused(format!("untrusted answer: {refused}")),
                }
            }
        };
        protocols.push((protocol, spoken));
    }
    Survey {
        gateway: Some(gateway.ip.into()),
        protocols,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_loopback_bind_or_no_port_never_asks() {
        let notice: OnNotice = Arc::new(|n| panic!("nothing to notice: {n:?}"));
        for local in ["127.0.0.1:5000", "[::1]:5000", "127.0.0.2:9199"] {
            let local: SocketAddr = local.parse().unwrap();
            assert!(PortMapper::start(local, PortMapConfig::default(), notice.clone()).is_none());
        }
        let unbound: SocketAddr = "0.0.0.0:0".parse().unwrap();
        assert!(PortMapper::start(unbound, PortMapConfig::default(), notice).is_none());
    }
}
