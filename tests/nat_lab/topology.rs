//! The lab's network: a public host and any number of NATed sites on one "internet",
//! built from network namespaces, bridges, veth/TAP pairs, nftables and tc.
//!
//! ```text
//!  {p}-pub  eth0  198.51.100.10/24, .11/24, 2001:db8::10/64 ──┐
//!                                                               ├── br0 in {p}-inet
//!  {p}-ra   wan0  198.51.100.1/24, 2001:db8::1/64 ══ link A ════┤   198.51.100.0/24
//!           lan0  (bridge) 10.0.1.1/24, 2001:db8:1::1/64        │   2001:db8::/64
//!             ├── {p}-a0 eth0 10.0.1.2/24, 2001:db8:1::2/64     │
//!             └── {p}-a1 eth0 10.0.1.3/24, 2001:db8:1::3/64     │
//!  {p}-rb   wan0  198.51.100.2/24, 2001:db8::2/64 ══ link B ════┘
//!           lan0  10.0.2.1/24, 2001:db8:2::1/64 ── {p}-b0 ...
//! ```
//!
//! Site number `n` (A = 1, B = 2, ..., at most [`MAX_SITES`]) gives every address:
//! WAN 198.51.100.`n` and 2001:db8::`n`; LAN 10.0.`n`.0/24 and 2001:db8:`n`::/64 with the
//! router at .1/::1 and clients at .2, .3, ... / ::2, ::3, ...
//!
//! **IPv4** is NATed by the router as its [`Nat`] says. **IPv6** is routed, not NATed:
//! every internet-side host (the public host and each router) has a route to each site's
//! prefix via that site's WAN address, and the router is a stateful firewall (LAN to WAN
//! accepted, WAN to LAN only `ct state established,related`, neighbour discovery allowed
//! to the router itself). So IPv6 peers behind two sites connect only when *both* send
//! (hole punching through two firewalls), like home routers do (RFC 6092).
//!
//! **The site link** (router WAN to the internet bridge) carries the impairments, in
//! both directions: loss (nftables `numgen random` on the router, counted: [`Site::set_loss`]),
//! rate (a tbf qdisc on the router's `wan0` for upload and on the bridge-side port for
//! download: [`Site::set_rate`]) and delay. The delay is **one-way per site link**: a site
//! built with `.delay(10 ms)` holds each frame 10 ms on its way out and 10 ms on its way
//! in, so the RTT between that site's clients and the public host is 20 ms, and between
//! two sites with 10 ms each it is 40 ms (each packet crosses both links, both ways). A
//! site with a delay gets a [`DelayLink`] (two TAP devices and a forwarder, see
//! `delay.rs`) as its link; without one it is a plain veth pair, the fastest wire.
//!
//! Bridges here are plain layer-2 switches: `bridge-nf-call-*` is off in every
//! namespace, so two clients on one LAN talk directly, never through the router's
//! firewall. IPv6 duplicate address detection is off, so addresses work at once.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use super::Proc;
use super::delay::{DelayLink, DelayStats, TapEnd};
use super::netns::{self, Namespaces, bind_udp_in, exec, in_netns, ip_batch, nft, sysctl};

/// The public host's main address.
pub const PUBLIC_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// The public host's second address (same interface), to tell mappings per destination
/// address apart from mappings per destination port.
pub const PUBLIC_V4_ALT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
/// The public host's IPv6 address.
pub const PUBLIC_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// Sites are numbered 1..=9 (198.51.100.10 and .11 belong to the public host).
pub const MAX_SITES: usize = 9;
/// Frames a site link's TAP devices (or veth) buffer toward the delay element.
const TAP_QUEUE: u32 = 4096;

/// How a site's router treats IPv4 (its IPv6 firewall is the same for all but
/// [`Nat::UdpBlocked`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nat {
    /// An open peer: masquerade keeping ports, plus DNAT of every inbound UDP and TCP
    /// port 1024-65535 to the first client (like a DMZ host). Unsolicited datagrams to
    /// the WAN address reach that client, and so do TCP connections (which a path
    /// benchmark needs to compare kernel TCP with qpunch between two sites).
    Open,
    /// Plain `masquerade`: keeps the source port, one mapping per local socket
    /// (endpoint-independent mapping), port-restricted filtering; new inbound to the
    /// router itself is dropped.
    Cone,
    /// `masquerade fully-random`: a new random port for every destination (symmetric).
    Symmetric,
    /// Like [`Nat::Cone`], but UDP from the LAN to the WAN is dropped, for IPv6 too (a
    /// network that blocks UDP). TCP still works.
    UdpBlocked,
}

/// A token-bucket rate limit on a site link (each direction separately).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Bits per second.
    pub bits_per_sec: u64,
    /// How long a packet may wait in the bucket's queue before it is dropped (tbf
    /// `latency`): the link's buffer, in time.
    pub queue: Duration,
}

impl Rate {
    /// `mbit` Mbit/s with a 50 ms queue.
    pub fn mbit(mbit: f64) -> Rate {
        Rate {
            bits_per_sec: (mbit * 1e6) as u64,
            queue: Duration::from_millis(50),
        }
    }

    /// The same rate with another queue length.
    pub fn with_queue(self, queue: Duration) -> Rate {
        Rate { queue, ..self }
    }
}

/// How to build one site.
#[derive(Debug, Clone)]
pub struct SiteSpec {
    /// IPv4 behaviour of the router.
    pub nat: Nat,
    /// Clients on the LAN (at least 1).
    pub clients: usize,
    /// Whether the site has IPv6 (a routed prefix); without, only link-local.
    pub ipv6: bool,
    /// One-way delay of the site link (each direction); `None`: a plain veth wire.
    pub delay: Option<Duration>,
    /// Rate limit of the site link.
    pub rate: Option<Rate>,
    /// Random loss on the site link, percent per direction (0.01 steps).
    pub loss_percent: f64,
}

impl SiteSpec {
    /// One client, IPv6 on, a perfect link.
    pub fn new(nat: Nat) -> SiteSpec {
        SiteSpec {
            nat,
            clients: 1,
            ipv6: true,
            delay: None,
            rate: None,
            loss_percent: 0.0,
        }
    }
    /// `n` clients on the LAN.
    pub fn clients(self, n: usize) -> SiteSpec {
        assert!((1..=200).contains(&n), "1..=200 clients per site");
        SiteSpec { clients: n, ..self }
    }
    /// IPv6 on or off.
    pub fn ipv6(self, on: bool) -> SiteSpec {
        SiteSpec { ipv6: on, ..self }
    }
    /// One-way delay on the site link (so `2 * delay` RTT to the public host).
    pub fn delay(self, one_way: Duration) -> SiteSpec {
        SiteSpec {
            delay: Some(one_way),
            ..self
        }
    }
    /// Rate limit on the site link, both directions.
    pub fn rate(self, rate: Rate) -> SiteSpec {
        SiteSpec {
            rate: Some(rate),
            ..self
        }
    }
    /// Random loss on the site link, each direction.
    pub fn loss_percent(self, percent: f64) -> SiteSpec {
        SiteSpec {
            loss_percent: percent,
            ..self
        }
    }
}

/// A machine in the lab: its namespace and addresses.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name.
    pub ns: String,
    /// Its IPv4 address (the public host: [`PUBLIC_V4`]; it also has [`PUBLIC_V4_ALT`]).
    pub v4: Ipv4Addr,
    /// Its global IPv6 address, if its site has IPv6.
    pub v6: Option<Ipv6Addr>,
}

impl Host {
    /// Run `f` on a thread inside this host's namespace (see [`netns::in_netns`]).
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.ns, f)
    }

    /// Bind a UDP socket in this host's namespace.
    pub fn udp(&self, addr: SocketAddr) -> UdpSocket {
        bind_udp_in(&self.ns, addr)
    }

    /// Bind a UDP socket to this host's IPv4 address (port 0: any).
    pub fn udp4(&self, port: u16) -> UdpSocket {
        self.udp(SocketAddr::new(self.v4.into(), port))
    }

    /// Bind a UDP socket to this host's IPv6 address (panics without IPv6).
    pub fn udp6(&self, port: u16) -> UdpSocket {
        let v6 = self.v6.unwrap_or_else(|| panic!("{} has no IPv6", self.ns));
        self.udp(SocketAddr::new(v6.into(), port))
    }

    /// This host's address of the given family.
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.v6
                .unwrap_or_else(|| panic!("{} has no IPv6", self.ns))
                .into()
        } else {
            self.v4.into()
        }
    }

    /// Run a program here to completion (panics on failure).
    pub fn exec(&self, program: &str, args: &[&str]) -> Output {
        exec(&self.ns, program, args)
    }

    /// `ip ARGS...` here.
    pub fn ip(&self, args: &str) {
        netns::ip(&self.ns, args)
    }

    /// Spawn a program here (killed when the [`Proc`] drops).
    pub fn spawn(&self, program: &Path, args: &[&str], env: &[(&str, &Path)]) -> Proc {
        super::spawn(&self.ns, program, args, env)
    }
}

/// Packet counts of a site link's loss table ([`Site::set_loss`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossCounters {
    /// Packets from the internet to the LAN, before the drop.
    pub seen_in: u64,
    /// Packets from the LAN to the internet, before the drop.
    pub seen_out: u64,
    /// Of those in, dropped.
    pub dropped_in: u64,
    /// Of those out, dropped.
    pub dropped_out: u64,
}

/// A NATed site: its router, its clients, its link to the internet.
pub struct Site {
    /// 'A', 'B', ...
    pub letter: char,
    /// 1, 2, ...: the number in every address of the site.
    pub number: u8,
    /// The router's namespace.
    pub router: String,
    /// The router's WAN address (the NAT's public address).
    pub wan_v4: Ipv4Addr,
    /// The router's IPv6 WAN address.
    pub wan_v6: Option<Ipv6Addr>,
    /// The router's LAN address (the clients' default gateway).
    pub lan_v4: Ipv4Addr,
    /// The site's routed IPv6 prefix (a /64).
    pub prefix_v6: Option<Ipv6Addr>,
    /// The clients, in order: `.2`, `.3`, ...
    pub clients: Vec<Host>,
    /// How it was built.
    pub spec: SiteSpec,
    inet: String,
    /// The link's port on the internet bridge (in `inet`).
    port: String,
    delay: Option<DelayLink>,
}

impl Site {
    /// Client `i` (0-based; client 0 is `.2`).
    pub fn client(&self, i: usize) -> &Host {
        &self.clients[i]
    }

    /// Replace the router's firewall for `nat` (one nft transaction, atomic). Existing
    /// conntrack entries keep their mappings: see [`Site::flush_conntrack`].
    pub fn set_nat(&self, nat: Nat) {
        nft(&self.router, &self.firewall(nat));
    }

    fn firewall(&self, nat: Nat) -> String {
        let first = self.clients[0].v4;
        let masquerade = match nat {
            Nat::Symmetric => "masquerade fully-random",
            _ => "masquerade",
        };
        let (dnat, dnat_accept) = match nat {
            Nat::Open => (
                format!(
                    "iifname \"wan0\" meta l4proto {{ tcp, udp }} th dport 1024-65535 dnat to {first}"
                ),
                "iifname \"wan0\" oifname \"lan0\" ct status dnat accept",
            ),
            _ => (String::new(), ""),
        };
        let block_udp = match nat {
            Nat::UdpBlocked => "iifname \"lan0\" oifname \"wan0\" meta l4proto udp counter drop",
            _ => "",
        };
        // `table X {}` then `delete table X` makes the replacement work whether or not
        // the table exists yet, in one transaction.
        format!(
            r#"
table ip natlab {{}}
delete table ip natlab
table ip natlab {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {dnat}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan0" {masquerade}
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        {block_udp}
        iifname "lan0" oifname "wan0" accept
        iifname "wan0" oifname "lan0" ct state established,related accept
        {dnat_accept}
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state new drop
    }}
}}
table ip6 natlab6 {{}}
delete table ip6 natlab6
table ip6 natlab6 {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        {block_udp}
        iifname "lan0" oifname "wan0" accept
        iifname "wan0" oifname "lan0" ct state established,related accept
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        icmpv6 type {{ nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert, echo-request }} accept
        iifname "wan0" ct state new drop
    }}
}}
"#
        )
    }

    /// Drop `percent` % of the packets crossing the site link, each direction (0:
    /// remove the loss). Table `inet natloss` on the router counts what it saw and
    /// dropped ([`Site::loss_counters`]); setting it again resets the counts.
    pub fn set_loss(&self, percent: f64) {
        assert!((0.0..=100.0).contains(&percent), "loss {percent} %");
        let reset = "table inet natloss {}\ndelete table inet natloss\n";
        if percent == 0.0 {
            nft(&self.router, reset);
            return;
        }
        let per_10k = (percent * 100.0).round() as u32;
        nft(
            &self.router,
            &format!(
                r#"{reset}
table inet natloss {{
    chain forward {{
        type filter hook forward priority filter - 10; policy accept;
        iifname "wan0" counter
        oifname "wan0" counter
        iifname "wan0" numgen random mod 10000 < {per_10k} counter drop
        oifname "wan0" numgen random mod 10000 < {per_10k} counter drop
    }}
}}
"#
            ),
        );
    }

    /// The loss table's counts (panics when no loss is set).
    pub fn loss_counters(&self) -> LossCounters {
        let out = exec(&self.router, "nft", &["list", "table", "inet", "natloss"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        let counts: Vec<u64> = words
            .windows(3)
            .filter(|w| w[0] == "counter" && w[1] == "packets")
            .map(|w| w[2].parse().unwrap())
            .collect();
        let [seen_in, seen_out, dropped_in, dropped_out] = counts[..] else {
            panic!("unexpected natloss table:\n{text}");
        };
        LossCounters {
            seen_in,
            seen_out,
            dropped_in,
            dropped_out,
        }
    }

    /// Limit the site link to `rate` each way (tbf on the router's `wan0` for upload and
    /// on the bridge-side port for download), or remove the limit.
    pub fn set_rate(&self, rate: Option<Rate>) {
        for (ns, dev) in [(&self.router, "wan0"), (&self.inet, self.port.as_str())] {
            let Some(rate) = rate else {
                // No qdisc of ours yet is fine: ignore the error.
                let _ = std::process::Command::new(netns::tool_path("tc"))
                    .args(["-n", ns, "qdisc", "del", "dev", dev, "root"])
                    .stderr(std::process::Stdio::null())
                    .status();
                continue;
            };
            // A bucket of 1 ms of traffic (at least 16 KiB): enough for timer slack,
            // small enough that the rate holds at millisecond scale.
            let burst = (rate.bits_per_sec / 8 / 1000).max(16 << 10);
            let args = [
                "-n".to_string(),
                ns.clone(),
                "qdisc".into(),
                "replace".into(),
                "dev".into(),
                dev.into(),
                "root".into(),
                "tbf".into(),
                "rate".into(),
                format!("{}bit", rate.bits_per_sec),
                "burst".into(),
                burst.to_string(),
                "latency".into(),
                format!("{}us", rate.queue.as_micros()),
            ];
            netns::run(netns::tool_path("tc"), args);
        }
    }

    /// Change the one-way delay of the site link. Panics unless the site was built
    /// with a delay (`SiteSpec::delay`, `Duration::ZERO` is fine).
    pub fn set_delay(&self, one_way: Duration) {
        self.delay_link().set_delay(one_way);
    }

    /// The delay element's counters and CPU time, if the site link has one.
    pub fn delay_stats(&self) -> Option<DelayStats> {
        self.delay.as_ref().map(DelayLink::stats)
    }

    fn delay_link(&self) -> &DelayLink {
        self.delay.as_ref().unwrap_or_else(|| {
            panic!(
                "site {} has no delay element: build it with SiteSpec::delay",
                self.letter
            )
        })
    }

    /// Make the router forget every connection (and so every NAT mapping).
    pub fn flush_conntrack(&self) {
        exec(&self.router, "conntrack", &["-F"]);
    }

    /// The router's IPv4 UDP conntrack entries as text (`conntrack -L -p udp`).
    pub fn conntrack_list(&self) -> String {
        let out = exec(&self.router, "conntrack", &["-L", "-p", "udp"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a program in the router's namespace (panics on failure).
    pub fn router_exec(&self, program: &str, args: &[&str]) -> Output {
        exec(&self.router, program, args)
    }
}

/// The whole lab. Dropping it stops the delay elements, kills what runs in its
/// namespaces and deletes them, also when the test panics.
pub struct Topology {
    /// `qp{pid}{tag}{n}`: every namespace is `{prefix}-{role}`.
    pub prefix: String,
    // Field order is drop order: the delay threads (in `sites`) end before the
    // namespaces go.
    sites: Vec<Site>,
    public: Host,
    inet: String,
    namespaces: Namespaces,
}

/// The port the lab's rendezvous listens on (on the public host).
pub const RV_PORT: u16 = 9200;

impl Topology {
    /// `qpunch rendezvous` on the public host, on [`RV_PORT`], with `extra` flags and
    /// `home` as its `QPUNCH_HOME`; returns once it says it serves.
    pub fn start_rendezvous(&self, home: &Path, extra: &[&str]) -> Proc {
        let program = Path::new(env!("CARGO_BIN_EXE_qpunch"));
        let port = RV_PORT.to_string();
        let mut args = vec!["rendezvous", "--bind", "0.0.0.0", "--port", &port, "--json"];
        args.extend_from_slice(extra);
        let mut proc = self
            .public()
            .spawn(program, &args, &[("QPUNCH_HOME", home)]);
        proc.wait_for("rendezvous", Duration::from_secs(20));
        proc
    }

    /// Cut (or restore) the direct path between sites `a` and `b`: each router drops what
    /// it would forward to or from the other's WAN address. The public host (a rendezvous,
    /// a relay, a TURN server) stays reachable from both.
    pub fn block_direct(&self, a: usize, b: usize, blocked: bool) {
        for (site, other) in [(a, b), (b, a)] {
            let peer = self.site(other).wan_v4;
            let script = if blocked {
                format!(
                    "table inet nodirect {{}}\ndelete table inet nodirect\ntable inet nodirect {{\n chain forward {{\n  type filter hook forward priority -10; policy accept;\n  ip saddr {peer} drop\n  ip daddr {peer} drop\n }}\n}}\n"
                )
            } else {
                "table inet nodirect {}\ndelete table inet nodirect\n".to_string()
            };
            nft(&self.site(site).router, &script);
        }
    }

    /// Build a lab with one site per spec (A, B, ...). `tag` (a few letters) makes
    /// names readable in `ip netns list` when a test is being debugged.
    pub fn new(tag: &str, specs: &[SiteSpec]) -> Topology {
        assert!(
            (1..=MAX_SITES).contains(&specs.len()),
            "1..={MAX_SITES} sites"
        );
        let prefix = format!("qp{}{tag}{}", std::process::id(), netns::next_id());
        let letter = |i: usize| (b'a' + i as u8) as char;
        let mut roles = vec!["inet".to_string(), "pub".to_string()];
        for (i, spec) in specs.iter().enumerate() {
            roles.push(format!("r{}", letter(i)));
            roles.extend((0..spec.clients).map(|k| format!("{}{k}", letter(i))));
        }
        // From here on, a panic drops `namespaces` and so deletes what was made.
        let namespaces = Namespaces::create(&prefix, &roles);
        let ns = |role: String| format!("{prefix}-{role}");
        let inet = ns("inet".into());
        let routers: Vec<String> = (0..specs.len())
            .map(|i| ns(format!("r{}", letter(i))))
            .collect();

        let bridge_nf = Path::new("/proc/sys/net/bridge").exists();
        for name in namespaces.names() {
            let mut settings = vec![
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
            ];
            if name == &inet {
                // A switch, no host: no addresses, no router solicitations.
                settings.push(("net.ipv6.conf.all.disable_ipv6", "1"));
                settings.push(("net.ipv6.conf.default.disable_ipv6", "1"));
            }
            if routers.contains(name) {
                settings.push(("net.ipv4.ip_forward", "1"));
                settings.push(("net.ipv6.conf.all.forwarding", "1"));
            }
            if bridge_nf {
                // br_netfilter is loaded: keep bridged frames out of the IP hooks.
                settings.push(("net.bridge.bridge-nf-call-iptables", "0"));
                settings.push(("net.bridge.bridge-nf-call-ip6tables", "0"));
                settings.push(("net.bridge.bridge-nf-call-arptables", "0"));
            }
            sysctl(name, &settings);
        }

        let public = Host {
            ns: ns("pub".into()),
            v4: PUBLIC_V4,
            v6: Some(PUBLIC_V6),
        };
        let mut sites = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let n = i as u8 + 1;
            let router = routers[i].clone();
            let port = format!("s{n}");
            // The site link: TAPs joined by a delay element, or a veth pair.
            let delay = spec.delay.map(|one_way| {
                DelayLink::start(
                    TapEnd {
                        ns: &router,
                        ifname: "wan0",
                    },
                    TapEnd {
                        ns: &inet,
                        ifname: &port,
                    },
                    one_way,
                )
                .unwrap_or_else(|e| panic!("site {} delay element: {e}", letter(i)))
            });
            let clients = (0..spec.clients)
                .map(|k| Host {
                    ns: ns(format!("{}{k}", letter(i))),
                    v4: Ipv4Addr::new(10, 0, n, k as u8 + 2),
                    v6: spec.ipv6.then(|| site_v6(n, k as u16 + 2)),
                })
                .collect();
            sites.push(Site {
                letter: letter(i).to_ascii_uppercase(),
                number: n,
                router,
                wan_v4: Ipv4Addr::new(198, 51, 100, n),
                wan_v6: spec
                    .ipv6
                    .then(|| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, n.into())),
                lan_v4: Ipv4Addr::new(10, 0, n, 1),
                prefix_v6: spec.ipv6.then(|| site_v6(n, 0)),
                clients,
                spec: spec.clone(),
                inet: inet.clone(),
                port,
                delay,
            });
        }

        // The internet: one bridge; the public host and every site link on it.
        let mut cmds = vec![
            "link set lo up".to_string(),
            "link add br0 type bridge mcast_snooping 0".into(),
            "link set br0 up".into(),
            format!("link add pub type veth peer name eth0 netns {}", public.ns),
        ];
        for site in &sites {
            if site.delay.is_none() {
                cmds.push(format!(
                    "link add {} type veth peer name wan0 netns {}",
                    site.port, site.router
                ));
            }
        }
        for site in sites.iter().filter(|s| s.delay.is_some()) {
            // A TAP's ring holds txqueuelen frames (500: 60 ms at 100 Mbit/s) while its
            // forwarder sleeps; on a busy machine make sure a descheduled forwarder
            // does not turn into loss the test did not ask for.
            cmds.push(format!("link set {} txqueuelen {TAP_QUEUE}", site.port));
        }
        for port in std::iter::once("pub").chain(sites.iter().map(|s| s.port.as_str())) {
            cmds.push(format!("link set {port} master br0"));
            cmds.push(format!("link set {port} up"));
        }
        ip_batch(&inet, &cmds);

        let mut cmds = vec![
            "link set lo up".to_string(),
            format!("addr add {PUBLIC_V4}/24 dev eth0"),
            format!("addr add {PUBLIC_V4_ALT}/24 dev eth0"),
            format!("addr add {PUBLIC_V6}/64 dev eth0 nodad"),
            "link set eth0 up".into(),
        ];
        cmds.extend(v6_routes(&sites, None));
        ip_batch(&public.ns, &cmds);

        for site in &sites {
            let mut cmds = vec![
                "link set lo up".to_string(),
                format!("link set wan0 txqueuelen {TAP_QUEUE}"),
                format!("addr add {}/24 dev wan0", site.wan_v4),
                "link set wan0 up".into(),
                "link add lan0 type bridge mcast_snooping 0".into(),
                format!("addr add {}/24 dev lan0", site.lan_v4),
                "link set lan0 up".into(),
            ];
            if let (Some(wan), Some(prefix)) = (site.wan_v6, site.prefix_v6) {
                cmds.push(format!("addr add {wan}/64 dev wan0 nodad"));
                cmds.push(format!(
                    "addr add {}/64 dev lan0 nodad",
                    with_host(prefix, 1)
                ));
                cmds.extend(v6_routes(&sites, Some(site.number)));
            }
            for (k, client) in site.clients.iter().enumerate() {
                cmds.push(format!(
                    "link add c{k} type veth peer name eth0 netns {}",
                    client.ns
                ));
                cmds.push(format!("link set c{k} master lan0"));
                cmds.push(format!("link set c{k} up"));
            }
            ip_batch(&site.router, &cmds);

            for client in &site.clients {
                let mut cmds = vec![
                    "link set lo up".to_string(),
                    format!("addr add {}/24 dev eth0", client.v4),
                    "link set eth0 up".into(),
                    format!("route add default via {}", site.lan_v4),
                ];
                if let (Some(v6), Some(prefix)) = (client.v6, site.prefix_v6) {
                    cmds.push(format!("addr add {v6}/64 dev eth0 nodad"));
                    cmds.push(format!("route add ::/0 via {}", with_host(prefix, 1)));
                }
                ip_batch(&client.ns, &cmds);
            }

            site.set_nat(site.spec.nat);
            if site.spec.loss_percent > 0.0 {
                site.set_loss(site.spec.loss_percent);
            }
            if site.spec.rate.is_some() {
                site.set_rate(site.spec.rate);
            }
        }

        Topology {
            prefix,
            sites,
            public,
            inet,
            namespaces,
        }
    }

    /// The public host (198.51.100.10 and .11, 2001:db8::10), directly on the internet.
    pub fn public(&self) -> &Host {
        &self.public
    }

    /// Site `i` (0 = A).
    pub fn site(&self, i: usize) -> &Site {
        &self.sites[i]
    }

    /// All sites, A first.
    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// The "internet" namespace (only the bridge and the links' ports live there).
    pub fn inet(&self) -> &str {
        &self.inet
    }

    /// Every namespace of the lab.
    pub fn namespaces(&self) -> &[String] {
        self.namespaces.names()
    }
}

/// 2001:db8:`n`::`host`
fn site_v6(n: u8, host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, n.into(), 0, 0, 0, 0, host)
}

/// `prefix` with the last 16 bits set to `host`.
fn with_host(prefix: Ipv6Addr, host: u16) -> Ipv6Addr {
    let mut segments = prefix.segments();
    segments[7] = host;
    Ipv6Addr::from(segments)
}

/// `ip` commands routing every other site's IPv6 prefix via that site's router.
fn v6_routes(sites: &[Site], except: Option<u8>) -> Vec<String> {
    sites
        .iter()
        .filter(|s| Some(s.number) != except)
        .filter_map(|s| Some(format!("route add {}/64 via {}", s.prefix_v6?, s.wan_v6?)))
        .collect()
}
