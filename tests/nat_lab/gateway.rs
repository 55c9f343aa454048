//! A port-mapping gateway of the lab's own: NAT-PMP (RFC 6886) and PCP MAP (RFC 6887) on
//! a site router, installing real nftables DNAT and SNAT for every mapping it grants.
//!
//! Why not Debian's `miniupnpd`: it refuses to map while its external address is in a
//! reserved range, and every lab address is one (198.51.100.0/24 is TEST-NET-2). So the
//! router here is real (its NAT, its conntrack, its rules), and only the little daemon that
//! edits its rules is ours.
//!
//! Each mapping is two map elements in table `ip portmap`: inbound to WAN:ext goes to
//! client:port (DNAT, before the site's own NAT chain), and outbound from client:port
//! leaves as WAN:ext (SNAT, before the site's masquerade, so a symmetric router keeps the
//! mapped port for this socket as miniupnpd's rules do). The forward chain of the site's
//! table gets `ct status dnat accept`. [`PortMapGateway::rules`] lists what the router
//! holds, so a test can check that a mapping is really gone.
//!
//! [`Behaviour`] makes it lie, for the abuse tests.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::netns::{exec, nft, spawn_in_netns};
use super::topology::Site;

/// NAT-PMP and PCP's port.
pub const PORT: u16 = 5351;

/// How the gateway answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Map as asked, truthfully.
    Honest,
    /// Answer every request with bytes that mean nothing.
    Garbage,
    /// Map, but name this address as the external one.
    ClaimsAddress(Ipv4Addr),
    /// Map, but grant a lifetime of `u32::MAX` seconds.
    AbsurdLifetime,
    /// Map truthfully, granting at most this many seconds (a client must renew).
    ShortLifetime(u32),
}

/// One granted mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    /// Who it forwards to.
    pub internal: SocketAddrV4,
    /// The router's public port.
    pub external_port: u16,
    /// Until when.
    pub expires: Instant,
}

/// The gateway: a thread in the router's namespace.
pub struct PortMapGateway {
    router: String,
    stop: Arc<AtomicBool>,
    granted: Arc<Mutex<HashMap<u16, Granted>>>,
    requests: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl PortMapGateway {
    /// Start serving on `site`'s router (its LAN address, port 5351).
    pub fn start(site: &Site, behaviour: Behaviour) -> PortMapGateway {
        let router = site.router.clone();
        nft(
            &router,
            r#"
table ip portmap {}
delete table ip portmap
table ip portmap {
    map inbound { type inet_service : ipv4_addr . inet_service; }
    map outbound { type ipv4_addr . inet_service : ipv4_addr . inet_service; }
    chain prerouting {
        type nat hook prerouting priority dstnat - 10; policy accept;
        iifname "wan0" meta l4proto udp dnat ip to udp dport map @inbound
    }
    chain postrouting {
        type nat hook postrouting priority srcnat - 10; policy accept;
        oifname "wan0" meta l4proto udp snat ip to ip saddr . udp sport map @outbound
    }
}
insert rule ip natlab forward iifname "wan0" oifname "lan0" ct status dnat accept
"#,
        );
        let socket = super::netns::bind_udp_in(
            &router,
            SocketAddr::V4(SocketAddrV4::new(site.lan_v4, PORT)),
        );
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let granted = Arc::new(Mutex::new(HashMap::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let server = Server {
            router: router.clone(),
            wan: site.wan_v4,
            behaviour,
            started: Instant::now(),
            granted: granted.clone(),
            requests: requests.clone(),
        };
        let flag = stop.clone();
        let thread = spawn_in_netns(&router, move || server.run(&socket, &flag));
        PortMapGateway {
            router,
            stop,
            granted,
            requests,
            thread: Some(thread),
        }
    }

    /// The mappings the gateway holds.
    pub fn granted(&self) -> Vec<Granted> {
        self.granted.lock().unwrap().values().copied().collect()
    }

    /// Requests seen so far (of either protocol).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The router's own view: the elements of its inbound and outbound maps (empty
    /// strings when none).
    pub fn rules(&self) -> String {
        let out = exec(&self.router, "nft", &["list", "table", "ip", "portmap"]);
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter(|l| l.contains(" : ") && !l.contains("type "))
            .map(str::trim)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for PortMapGateway {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Server {
    router: String,
    wan: Ipv4Addr,
    behaviour: Behaviour,
    started: Instant,
    granted: Arc<Mutex<HashMap<u16, Granted>>>,
    requests: Arc<AtomicU64>,
}

impl Server {
    fn run(&self, socket: &UdpSocket, stop: &AtomicBool) {
        let mut buf = [0u8; 1100];
        while !stop.load(Ordering::Relaxed) {
            self.expire();
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(_) => continue,
            };
            let SocketAddr::V4(from) = from else { continue };
            self.requests.fetch_add(1, Ordering::Relaxed);
            let reply = if self.behaviour == Behaviour::Garbage {
                Some(b"\x02\x81garbage!".to_vec())
            } else {
                match buf.first() {
                    Some(0) => self.nat_pmp(&buf[..n], from),
                    Some(2) => self.pcp(&buf[..n], from),
                    _ => None,
                }
            };
            if let Some(reply) = reply {
                let _ = socket.send_to(&reply, from);
            }
        }
    }

    fn epoch(&self) -> u32 {
        self.started.elapsed().as_secs() as u32 + 1000
    }

    fn external_ip(&self) -> Ipv4Addr {
        match self.behaviour {
            Behaviour::ClaimsAddress(ip) => ip,
            _ => self.wan,
        }
    }

    fn granted_lifetime(&self, asked: u32) -> u32 {
        match self.behaviour {
            Behaviour::AbsurdLifetime if asked > 0 => u32::MAX,
            Behaviour::ShortLifetime(most) => asked.min(most),
            _ => asked.min(3600),
        }
    }

    /// NAT-PMP: opcode 0 (external address) and 1 (map UDP).
    fn nat_pmp(&self, req: &[u8], from: SocketAddrV4) -> Option<Vec<u8>> {
        let mut out = vec![0, 128 + *req.get(1)?, 0, 0];
        out.extend_from_slice(&self.epoch().to_be_bytes());
        match (req.get(1)?, req.len()) {
            (0, 2) => {
                out.extend_from_slice(&self.external_ip().octets());
                Some(out)
            }
            (1, 12) => {
                let internal = u16::from_be_bytes([req[4], req[5]]);
                let suggested = u16::from_be_bytes([req[6], req[7]]);
                let lifetime = u32::from_be_bytes([req[8], req[9], req[10], req[11]]);
                let internal = SocketAddrV4::new(*from.ip(), internal);
                let (external, lifetime) = self.map(internal, suggested, lifetime);
                out.extend_from_slice(&internal.port().to_be_bytes());
                out.extend_from_slice(&external.to_be_bytes());
                out.extend_from_slice(&lifetime.to_be_bytes());
                Some(out)
            }
            _ => {
                // Unsupported opcode (result code 5).
                out[3] = 5;
                Some(out)
            }
        }
    }

    /// PCP: MAP for UDP only; anything else is "unsupported opcode".
    fn pcp(&self, req: &[u8], from: SocketAddrV4) -> Option<Vec<u8>> {
        if req.len() < 24 {
            return None;
        }
        let opcode = req[1] & 0x7f;
        let lifetime = u32::from_be_bytes([req[4], req[5], req[6], req[7]]);
        let mut out = vec![2, 0x80 | opcode, 0, 0];
        if opcode != 1 || req.len() < 60 || req[36] != 17 {
            out[3] = 4; // UNSUPP_OPCODE
            out.extend_from_slice(&[0; 20]);
            return Some(out);
        }
        let nonce = &req[24..36];
        let internal = u16::from_be_bytes([req[40], req[41]]);
        let suggested = u16::from_be_bytes([req[42], req[43]]);
        let internal = SocketAddrV4::new(*from.ip(), internal);
        let (external, granted) = self.map(internal, suggested, lifetime);
        out.extend_from_slice(&granted.to_be_bytes());
        out.extend_from_slice(&self.epoch().to_be_bytes());
        out.extend_from_slice(&[0; 12]);
        out.extend_from_slice(nonce);
        out.extend_from_slice(&[17, 0, 0, 0]);
        out.extend_from_slice(&internal.port().to_be_bytes());
        out.extend_from_slice(&external.to_be_bytes());
        out.extend_from_slice(&self.external_ip().to_ipv6_mapped().octets());
        Some(out)
    }

    /// Grant (lifetime > 0) or delete (0) the mapping of `internal`; the external port and
    /// the lifetime granted.
    fn map(&self, internal: SocketAddrV4, suggested: u16, lifetime: u32) -> (u16, u32) {
        let mut granted = self.granted.lock().unwrap();
        let existing = granted
            .values()
            .find(|g| g.internal == internal)
            .map(|g| g.external_port);
        if lifetime == 0 {
            if let Some(port) = existing {
                granted.remove(&port);
                self.unmap(internal, port);
            }
            return (0, 0);
        }
        let port = existing.unwrap_or_else(|| {
            let free = |p: u16| p >= 1024 && !granted.contains_key(&p);
            [suggested, internal.port()]
                .into_iter()
                .find(|&p| free(p))
                .unwrap_or_else(|| (20000..60000).find(|&p| free(p)).unwrap())
        });
        let lifetime = self.granted_lifetime(lifetime);
        if existing.is_none() {
            nft(
                &self.router,
                &format!(
                    "add element ip portmap inbound {{ {port} : {} . {} }}\n\
                     add element ip portmap outbound {{ {} . {} : {} . {port} }}\n",
                    internal.ip(),
                    internal.port(),
                    internal.ip(),
                    internal.port(),
                    self.wan,
                ),
            );
            // A flow the router already NATed another way keeps its old mapping: start
            // this socket's afresh, as a router that installs a mapping does.
            let _ = std::process::Command::new(super::netns::tool_path("ip"))
                .args([
                    "netns",
                    "exec",
                    &self.router,
                    "conntrack",
                    "-D",
                    "-p",
                    "udp",
                ])
                .args(["--orig-src", &internal.ip().to_string()])
                .args(["--orig-port-src", &internal.port().to_string()])
                .output();
        }
        granted.insert(
            port,
            Granted {
                internal,
                external_port: port,
                expires: Instant::now() + Duration::from_secs(u64::from(lifetime.min(3600))),
            },
        );
        (port, lifetime)
    }

    fn unmap(&self, internal: SocketAddrV4, port: u16) {
        nft(
            &self.router,
            &format!(
                "delete element ip portmap inbound {{ {port} }}\n\
                 delete element ip portmap outbound {{ {} . {} }}\n",
                internal.ip(),
                internal.port()
            ),
        );
    }

    fn expire(&self) {
        let now = Instant::now();
        let mut granted = self.granted.lock().unwrap();
        let gone: Vec<Granted> = granted
            .values()
            .filter(|g| g.expires <= now)
            .copied()
            .collect();
        for g in gone {
            granted.remove(&g.external_port);
            self.unmap(g.internal, g.external_port);
        }
    }
}
