//! Rendezvous capacity: how many pairings one core sustains, and what a registration costs
//! in memory, measured on `qpunch rendezvous` (the binary, in a process of its own, so its
//! CPU time and resident memory are its alone) over loopback.
//!
//! Run with `cargo bench --bench rendezvous`. Three phases:
//! 1. **Fresh pairings**: each pairing as peers really do it: receiver and sender each
//!    connect from an address of their own (QUIC handshake after a Retry), the receiver
//!    opens a nameplate with its PAKE message, the sender joins, both swap a sealed hello
//!    (300 opaque bytes), both leave.
//! 2. **Pairings on open connections**: the same exchange on connections made beforehand,
//!    so only the rendezvous protocol is measured.
//! 3. **Registrations held**: that many receivers (one connection each, from their own
//!    addresses) wait with an open nameplate; peak resident memory over idle, per
//!    registration.
//! 4. **Idle connections**: as many clients connect and ask only for `info`, then hold
//!    their connections with keep-alives; peak resident memory per connection, and how long
//!    until the rendezvous has evicted them all (it closes a connection that holds no
//!    exchange after 30 s).
//!
//! Pairings per second are wall-clock figures for this machine with this client load;
//! pairings per CPU-second divides by the rendezvous process's own CPU time (user and
//! system), which is what one core of it sustains. Note the rendezvous's global join limit
//! (1000 a second) caps the wall rate whatever the CPU.
//!
//! Knobs (environment): `QPUNCH_BENCH_PAIRS` (default 2000 per pairing phase),
//! `QPUNCH_BENCH_HELD` (default 1000), `QPUNCH_BENCH_IDLE` (default 300),
//! `QPUNCH_BENCH_INFLIGHT` (default 32),
//! `QPUNCH_BIN` (default: the qpunch binary cargo built for this bench).

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use qpunch::identity::Identity;
use qpunch::meet::pake::PAKE_MSG_LEN;
use qpunch::node::{Node, NodeConfig};
use qpunch::rendezvous::{ClientError, ErrorCode, RendezvousClient};

fn main() -> anyhow::Result<()> {
    let pairs = knob("QPUNCH_BENCH_PAIRS", 2000);
    let held = knob("QPUNCH_BENCH_HELD", 1000);
    let inflight = knob("QPUNCH_BENCH_INFLIGHT", 32);
    // Each client is a node of its own, and a quinn endpoint sized for 16 KB datagrams
    // reserves tens of MiB of receive buffers: 1,000 more on top of phase 3's ran this
    // machine (24 GiB) out of memory.
    let idle_clients = knob("QPUNCH_BENCH_IDLE", 300);
    let bin = std::env::var("QPUNCH_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_qpunch").into());
    let home = tempfile::tempdir()?;
    let mut rendezvous = Rendezvous::start(&bin, home.path())?;
    let addr = rendezvous.addr;
    let pid = rendezvous.child.id();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "qpunch rendezvous {bin} on {addr}; {} cores here; load average {}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let result = runtime.block_on(async {
        // Warm-up, not counted.
        fresh_pairings(addr, 0, 50, 8).await?;

        let cpu = cpu_seconds(pid)?;
        let started = Instant::now();
        fresh_pairings(addr, 1, pairs, inflight).await?;
        report(
            "fresh pairings (connections included)",
            pairs,
            started,
            cpu_seconds(pid)? - cpu,
        );

        let pool = Pool::connect(addr, pairs).await?;
        let cpu = cpu_seconds(pid)?;
        let started = Instant::now();
        pool.pairings(pairs, inflight).await?;
        report(
            "pairings on open connections",
            pairs,
            started,
            cpu_seconds(pid)? - cpu,
        );
        drop(pool);
        tokio::time::sleep(Duration::from_secs(2)).await;

        let idle = status_bytes(pid, "VmRSS")?;
        let mut registrations = Vec::with_capacity(held);
        let started = Instant::now();
        for batch in (0..held).step_by(inflight) {
            let ips = (batch..(batch + inflight).min(held)).map(|i| source(3, i));
            for r in futures_util::future::join_all(ips.map(|ip| register(ip, addr))).await {
                registrations.push(r?);
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (peak, now) = (status_bytes(pid, "VmHWM")?, status_bytes(pid, "VmRSS")?);
        let per = peak.saturating_sub(idle) as f64 / held as f64;
        println!(
            "{held} registrations held (made in {:.1?}): idle {:.1} MiB, peak {:.1} MiB, now \
             {:.1} MiB: {:.1} KiB per registration (peak over idle)",
            started.elapsed(),
            mib(idle),
            mib(peak),
            mib(now),
            per / 1024.0
        );
        drop(registrations);

        // A fresh rendezvous process, so what the registrations left in its allocator does
        // not hide what idle connections cost.
        let mut fresh = Rendezvous::start(&bin, home.path())?;
        let (addr, pid) = (fresh.addr, fresh.child.id());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = status_bytes(pid, "VmRSS")?;
        let mut idlers = Vec::with_capacity(idle_clients);
        for batch in (0..idle_clients).step_by(inflight) {
            let ips = (batch..(batch + inflight).min(idle_clients)).map(|i| source(4, i));
            for r in futures_util::future::join_all(ips.map(|ip| idle_client(ip, addr))).await {
                idlers.push(r?);
            }
        }
        let connected = Instant::now();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let peak = status_bytes(pid, "VmHWM")?;
        let per = peak.saturating_sub(before) as f64 / idle_clients as f64;
        let all_closed = futures_util::future::join_all(
            idlers
                .iter()
                .map(|(_, client)| client.connection().closed()),
        );
        let evicted = tokio::time::timeout(Duration::from_secs(60), all_closed)
            .await
            .is_ok();
        println!(
            "{idle_clients} idle connections: idle {:.1} MiB, peak {:.1} MiB: {:.1} KiB per connection \
             (peak over idle); {} {:.1?} after the last connected",
            mib(before),
            mib(peak),
            per / 1024.0,
            if evicted {
                "all evicted"
            } else {
                "NOT all evicted"
            },
            connected.elapsed(),
        );
        fresh.stop();
        anyhow::Ok(())
    });
    rendezvous.stop();
    result
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

fn report(what: &str, pairs: usize, started: Instant, cpu: f64) {
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{what}: {pairs} in {wall:.2} s = {:.0} pairings/s; rendezvous CPU {cpu:.2} s = {:.0} \
         pairings per CPU-second ({:.0} µs each)",
        pairs as f64 / wall,
        pairs as f64 / cpu,
        cpu / pairs as f64 * 1e6
    );
}

/// The `i`-th address of block `block`: 127.block.x.y, away from everything else.
fn source(block: u8, i: usize) -> IpAddr {
    IpAddr::from([127, block, (i / 250) as u8, 1 + (i % 250) as u8])
}

/// A `qpunch rendezvous` child process.
struct Rendezvous {
    child: Child,
    addr: SocketAddr,
}

impl Rendezvous {
    fn start(bin: &str, home: &std::path::Path) -> anyhow::Result<Self> {
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
        // Keep draining stdout (one line per pairing) so the process never blocks on it.
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
    // Fields after the command name (which may hold spaces) start at field 3.
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

/// PAKE messages are opaque to the rendezvous: random bytes of the right length will do.
fn pake() -> Vec<u8> {
    (0..PAKE_MSG_LEN).map(|_| rand::random()).collect()
}

/// One pairing between two connected clients: open, PAKE, join, swap sealed hellos.
async fn pair(receiver: &RendezvousClient, sender: &RendezvousClient) -> anyhow::Result<()> {
    let (mut opened, nameplate) = {
        let (exchange, opened) = receiver.open(None, Duration::from_secs(60)).await?;
        (exchange, opened.nameplate)
    };
    opened.pake(&pake()).await?;
    let mut tries = 0;
    let mut joined = loop {
        tries += 1;
        match sender.join(&nameplate, &pake()).await {
            Ok((exchange, _)) => break exchange,
            // The receiver's PAKE message may not be there yet (a person typing the code
            // is slower than this), or the global join limit (1000 a second) was reached.
            Err(ClientError::Refused {
                code: ErrorCode::UnknownNameplate | ErrorCode::RateLimited,
                ..
            }) if tries < 100 => tokio::time::sleep(Duration::from_millis(5)).await,
            Err(e) => return Err(e.into()),
        }
    };
    opened.paired().await?;
    opened.seal(&[1; 300]).await?;
    joined.seal(&[2; 300]).await?;
    let (a, b) = (opened.sealed().await?, joined.sealed().await?);
    anyhow::ensure!(a.is_ok() && b.is_ok(), "a hello did not come through");
    // Both leave; the rendezvous must have everything before the connections close.
    let wait = Duration::from_secs(3);
    tokio::join!(opened.finish(wait), joined.finish(wait));
    Ok(())
}

/// `n` pairings, `inflight` at a time, each on two fresh connections from addresses of
/// block `block` (receivers) and `block + 100` (senders: joins are limited per source).
async fn fresh_pairings(
    addr: SocketAddr,
    block: u8,
    n: usize,
    inflight: usize,
) -> anyhow::Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..inflight {
        let next = next.clone();
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(());
                }
                let (_rn, receiver) = connect(source(10 + block, i), addr).await?;
                let (_sn, sender) = connect(source(110 + block, i), addr).await?;
                pair(&receiver, &sender).await?;
                receiver.connection().close(0u32.into(), b"bye");
                sender.connection().close(0u32.into(), b"bye");
            }
        });
    }
    while let Some(worker) = workers.join_next().await {
        worker??;
    }
    Ok(())
}

/// Clients connected beforehand: receivers, and enough senders that none exceeds the
/// per-source join burst (8), retries included.
struct Pool {
    _nodes: Vec<Arc<Node>>,
    receivers: Vec<RendezvousClient>,
    senders: Vec<RendezvousClient>,
}

impl Pool {
    async fn connect(addr: SocketAddr, pairs: usize) -> anyhow::Result<Pool> {
        let mut pool = Pool {
            _nodes: Vec::new(),
            receivers: Vec::new(),
            senders: Vec::new(),
        };
        let senders = pairs.div_ceil(4);
        for i in 0..64 + senders {
            let (node, client) = connect(source(if i < 64 { 30 } else { 31 }, i), addr).await?;
            pool._nodes.push(node);
            if i < 64 {
                pool.receivers.push(client);
            } else {
                pool.senders.push(client);
            }
        }
        Ok(pool)
    }

    async fn pairings(&self, n: usize, inflight: usize) -> anyhow::Result<()> {
        let next = Arc::new(AtomicUsize::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for w in 0..inflight.min(self.receivers.len()) {
            let (next, receiver, senders) = (
                next.clone(),
                self.receivers[w].clone(),
                self.senders.clone(),
            );
            workers.spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return anyhow::Ok(());
                    }
                    pair(&receiver, &senders[i % senders.len()]).await?;
                }
            });
        }
        while let Some(worker) = workers.join_next().await {
            worker??;
        }
        Ok(())
    }
}

/// A receiver waiting with an open nameplate: keep everything returned to keep it.
/// A client that connects, asks for `info` and then only keeps its connection alive.
async fn idle_client(
    ip: IpAddr,
    addr: SocketAddr,
) -> anyhow::Result<(Arc<Node>, RendezvousClient)> {
    let (node, client) = connect(ip, addr).await?;
    client.info().await?;
    Ok((node, client))
}

async fn register(
    ip: IpAddr,
    addr: SocketAddr,
) -> anyhow::Result<(Arc<Node>, RendezvousClient, qpunch::rendezvous::Exchange)> {
    let (node, client) = connect(ip, addr).await?;
    let (mut exchange, _opened) = client.open(None, Duration::from_secs(600)).await?;
    exchange.pake(&pake()).await?;
    Ok((node, client, exchange))
}
