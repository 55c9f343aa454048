//! Relay capacity of `qpunch rendezvous` (the binary, in a process of its own, so its CPU
//! time and resident memory are its alone), over loopback, clients in this process.
//!
//! Run with `cargo bench --bench relay`. Two phases:
//! 1. **Throughput**: `QPUNCH_BENCH_RELAY_PAIRS` pairs (default 4) each send 1200-byte
//!    packets (a QUIC packet's size) one way through their relay slot for
//!    `QPUNCH_BENCH_RELAY_SECS` seconds (default 5), paced at `QPUNCH_BENCH_RELAY_MBIT`
//!    Mbit/s each (default 100; 0 = as fast as the sender's connection takes them).
//!    Reported: what arrived (Mbit/s of payload), what was lost, the rendezvous's CPU
//!    time, and so Mbit/s relayed per CPU core of the rendezvous, and how many pairs one
//!    core sustains at a given rate each.
//! 2. **Memory**: `QPUNCH_BENCH_RELAY_HELD` pairs (default 400) paired, their meetings
//!    over, one packet relayed each way, all slots alive: resident memory over the idle
//!    rendezvous, per relaying pair (its two connections and its slot). With
//!    `QPUNCH_BENCH_RELAY_BASELINE=1`, then the same on a `--no-relay` rendezvous (two
//!    connections, no slot; keep the count small: those pairs are evicted as idle 30 s
//!    after their meeting, and a run past that stalls).
//!
//! Both sides of the bench share this machine's cores, so the throughput figure is the
//! rendezvous's CPU per relayed byte (what scales), not a ceiling of the wall rate.

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use qpunch::identity::Identity;
use qpunch::node::{Node, NodeConfig};
use qpunch::rendezvous::{ClientError, ErrorCode, Exchange, PAKE_MSG_LEN, RendezvousClient};

const PACKET: usize = 1200;

fn main() -> anyhow::Result<()> {
    let pairs = knob("QPUNCH_BENCH_RELAY_PAIRS", 4);
    let secs = knob("QPUNCH_BENCH_RELAY_SECS", 5);
    let held = knob("QPUNCH_BENCH_RELAY_HELD", 400);
    let mbit = knob("QPUNCH_BENCH_RELAY_MBIT", 100);
    let bin = std::env::var("QPUNCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qpunch").into());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "qpunch rendezvous {bin}; {} cores here; load average {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    runtime.block_on(async {
        let home = tempfile::tempdir()?;
        let mut rendezvous = Rendezvous::start(&bin, home.path(), &[])?;
        let result = throughput(&rendezvous, pairs, Duration::from_secs(secs as u64), mbit).await;
        rendezvous.stop();
        result?;

        let home = tempfile::tempdir()?;
        let mut rendezvous = Rendezvous::start(&bin, home.path(), &[])?;
        let result = memory(&rendezvous, held, true).await;
        rendezvous.stop();
        result?;
        if knob("QPUNCH_BENCH_RELAY_BASELINE", 0) > 0 {
            let home = tempfile::tempdir()?;
            let mut rendezvous = Rendezvous::start(&bin, home.path(), &["--no-relay"])?;
            let result = memory(&rendezvous, held, false).await;
            rendezvous.stop();
            result?;
        }
        Ok(())
    })
}

/// Phase 1.
async fn throughput(
    rv: &Rendezvous,
    pairs: usize,
    secs: Duration,
    mbit: usize,
) -> anyhow::Result<()> {
    let mut made = Vec::new();
    for i in 0..pairs {
        made.push(Pair::make(rv.addr, 1, i, true).await?);
    }
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let cpu = cpu_seconds(rv.child.id())?;
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + secs;
    let mut tasks = tokio::task::JoinSet::new();
    for pair in &made {
        let (from, to) = (pair.receiver.clone(), pair.clients.1.relay_link());
        let sent = sent.clone();
        tasks.spawn(async move {
            let mut packet = vec![0u8; PACKET + 1];
            packet[1..].fill(7);
            let packet = Bytes::from(packet);
            if mbit == 0 {
                while tokio::time::Instant::now() < deadline {
                    if from.send_datagram_wait(packet.clone()).await.is_err() {
                        break;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
                return;
            }
            // Paced: every 2 ms, what the rate allows since the start.
            let start = tokio::time::Instant::now();
            let per_sec = mbit as f64 * 1e6 / 8.0 / PACKET as f64;
            let mut done = 0u64;
            let mut tick = tokio::time::interval(Duration::from_millis(2));
            while tokio::time::Instant::now() < deadline {
                tick.tick().await;
                let due = (start.elapsed().as_secs_f64() * per_sec) as u64;
                while done < due {
                    if from.send_datagram(packet.clone()).is_err() {
                        return;
                    }
                    done += 1;
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        let received = received.clone();
        tasks.spawn(async move {
            let end = deadline + Duration::from_millis(300);
            while let Ok(Some(_)) = tokio::time::timeout_at(end, to.recv()).await {
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(rv.child.id())? - cpu;
    for pair in made {
        pair.close().await;
    }
    let (sent, received) = (
        sent.load(Ordering::Relaxed),
        received.load(Ordering::Relaxed),
    );
    let bits = (received * PACKET as u64 * 8) as f64;
    let per_core = bits / cpu.max(0.01) / 1e6;
    println!(
        "throughput: {pairs} pair(s) at {} each, {wall:.1} s: {:.0} Mbit/s of packets relayed ({received} \
         of {sent} sent, {:.1} % lost); rendezvous CPU {cpu:.2} s ({:.0} % of a core) = \
         {per_core:.0} Mbit/s relayed per CPU core ({:.1} µs per packet)",
        if mbit == 0 {
            "full speed".to_string()
        } else {
            format!("{mbit} Mbit/s")
        },
        bits / wall / 1e6,
        100.0 * (sent - received.min(sent)) as f64 / sent.max(1) as f64,
        100.0 * cpu / wall,
        cpu / received.max(1) as f64 * 1e6,
    );
    println!(
        "  one core relays for {:.0} pairs at 10 Mbit/s each, {:.0} at 1 Mbit/s",
        per_core / 10.0,
        per_core
    );
    Ok(())
}

/// Phase 2.
async fn memory(rv: &Rendezvous, held: usize, relay: bool) -> anyhow::Result<f64> {
    let pid = rv.child.id();
    // Warm up (allocator arenas, the first connection's tables), then measure from there.
    let warm = Pair::make(rv.addr, 1, 0, relay).await?;
    warm.ping().await?;
    warm.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = status_bytes(pid, "VmRSS")?;
    let started = Instant::now();
    let mut pairs = Vec::with_capacity(held);
    for i in 0..held {
        let pair = Pair::make(rv.addr, 2, i, relay)
            .await
            .with_context(|| format!("pair {i}"))?;
        pair.ping().await.with_context(|| format!("pair {i}"))?;
        pairs.push(pair);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = status_bytes(pid, "VmRSS")?;
    // Every slot still relays.
    for pair in &pairs {
        pair.ping().await?;
    }
    let per = after.saturating_sub(before) as f64 / held as f64;
    // Close every client now: endpoints left to drain on their own slow the next phase.
    for pair in pairs {
        pair.close().await;
    }
    println!(
        "memory: {held} {} (made in {:.1} s): RSS {:.1} -> {:.1} MiB, {:.1} KiB per pair",
        if relay {
            "relaying pairs (two connections and their slot, a packet relayed each way)"
        } else {
            "pairs without relay (--no-relay: two connections)"
        },
        started.elapsed().as_secs_f64(),
        mib(before),
        mib(after),
        per / 1024.0
    );
    Ok(per)
}

/// Two clients paired at the rendezvous, their meeting over, their slot alive.
struct Pair {
    receiver: quinn::Connection,
    sender: quinn::Connection,
    nodes: (Arc<Node>, Arc<Node>),
    clients: (RendezvousClient, RendezvousClient),
    relay: bool,
}

impl Pair {
    /// The `i`-th pair of block `block`: the receiver on 127.block.x.y, the sender on
    /// 127.(block + 100).x.y (joins are limited per source).
    async fn make(addr: SocketAddr, block: u8, i: usize, relay: bool) -> anyhow::Result<Pair> {
        tokio::time::timeout(
            Duration::from_secs(20),
            Self::try_make(addr, block, i, relay),
        )
        .await
        .context("pairing took over 20 s")?
    }

    async fn try_make(addr: SocketAddr, block: u8, i: usize, relay: bool) -> anyhow::Result<Pair> {
        let (rn, receiver) = connect(source(block, i), addr).await?;
        let (sn, sender) = connect(source(block + 100, i), addr).await?;
        let (mut opened, info) = receiver.open(None, Duration::from_secs(60)).await?;
        opened.pake(&[1; PAKE_MSG_LEN]).await?;
        let mut tries = 0;
        let (mut joined, paired) = loop {
            tries += 1;
            match sender.join(&info.nameplate, &[2; PAKE_MSG_LEN]).await {
                Ok(joined) => break joined,
                Err(ClientError::Refused {
                    code: ErrorCode::UnknownNameplate | ErrorCode::RateLimited,
                    ..
                }) if tries < 100 => tokio::time::sleep(Duration::from_millis(5)).await,
                Err(e) => return Err(e.into()),
            }
        };
        anyhow::ensure!(
            paired.relay.is_some() == relay,
            "relay grant: {:?}",
            paired.relay
        );
        opened.paired().await?;
        end_meeting(&mut opened, &mut joined).await?;
        Ok(Pair {
            receiver: receiver.connection().clone(),
            sender: sender.connection().clone(),
            nodes: (rn, sn),
            clients: (receiver, sender),
            relay,
        })
    }

    async fn close(self) {
        self.nodes.0.close(qpunch::node::QUICK_LINGER).await;
        self.nodes.1.close(qpunch::node::QUICK_LINGER).await;
    }

    /// One packet each way (when relayed).
    async fn ping(&self) -> anyhow::Result<()> {
        if !self.relay {
            return Ok(());
        }
        for (from, to) in [
            (&self.receiver, &self.sender),
            (&self.sender, &self.receiver),
        ] {
            let mut packet = vec![0u8; PACKET + 1];
            packet[1] = 1;
            from.send_datagram(Bytes::from(packet))?;
            tokio::time::timeout(Duration::from_secs(5), to.read_datagram())
                .await
                .context("a relayed packet in time")??;
        }
        Ok(())
    }
}

async fn end_meeting(a: &mut Exchange, b: &mut Exchange) -> anyhow::Result<()> {
    a.seal(&[1; 300]).await?;
    b.seal(&[2; 300]).await?;
    let (x, y) = (a.sealed().await?, b.sealed().await?);
    anyhow::ensure!(x.is_ok() && y.is_ok(), "a hello did not come through");
    Ok(())
}

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / 1048576.0
}

/// The `i`-th address of block `block`: 127.block.x.y.
fn source(block: u8, i: usize) -> IpAddr {
    IpAddr::from([127, block, (i / 250) as u8, 1 + (i % 250) as u8])
}

fn node_on(ip: IpAddr) -> anyhow::Result<Arc<Node>> {
    let socket = qpunch::socket::bind(SocketAddr::new(ip, 0))?;
    let config = NodeConfig::new(Identity::generate()?, qpunch::transfer::ALPN, false);
    Ok(Arc::new(Node::new(socket, config)?))
}

async fn connect(ip: IpAddr, addr: SocketAddr) -> anyhow::Result<(Arc<Node>, RendezvousClient)> {
    let node = node_on(ip)?;
    let client = RendezvousClient::connect(&node, addr).await?;
    Ok((node, client))
}

/// A `qpunch rendezvous` child process.
struct Rendezvous {
    child: Child,
    addr: SocketAddr,
}

impl Rendezvous {
    fn start(bin: &str, home: &std::path::Path, flags: &[&str]) -> anyhow::Result<Self> {
        let port = free_port_pair()?;
        let mut child = Command::new(bin)
            .args([
                "rendezvous",
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--json",
            ])
            .args(flags)
            .env("QPUNCH_HOME", home)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot run {bin}"))?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.contains(r#""event":"rendezvous""#) => break,
                Some(Ok(_)) => {}
                _ => bail!("the rendezvous did not start"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Ok(Rendezvous {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        })
    }

    fn stop(&mut self) {
        // SAFETY: a plain syscall on a child we own and have not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGINT);
        }
        let _ = self.child.wait();
    }
}

impl Drop for Rendezvous {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = UdpSocket::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port();
        if port < u16::MAX && UdpSocket::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free pair of UDP ports")
}

/// User plus system CPU time of `pid`, in seconds.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = &stat[stat.rfind(')').context("stat format")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ticks as f64 / hz)
}

/// A `/proc/PID/status` memory field, in bytes.
fn status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .map(|kb| kb * 1024)
        .with_context(|| format!("no {field} for {pid}"))
}
