//! Speed on a real long, lossy link: `qpunch send` against kernel TCP over the same lab path.
//!
//! The path is built with the NAT lab (`tests/nat_lab/`): the sender behind site A (a cone
//! NAT), the receiver behind site B (an `Open` site, so `qpunch send --to <B wan>:9199` and
//! a TCP connect to `<B wan>:PORT` both reach it directly). Each site link has 10 ms of
//! one-way delay (so 40 ms RTT between the sites), a 100 Mbit/s token bucket each way, and
//! random loss on its router, each direction. Loss is set on *both* routers, so a packet
//! crossing the path meets it twice: 1 % per router is ~2 % on the path, 5 % is ~9.75 %
//! (the table shows the loss the routers' counters measured in the data direction).
//!
//! For every loss level it moves the same file with, per run and interleaved:
//! - `qpunch receive --once` in B and `qpunch send` in A (real processes, real disk,
//!   BLAKE3-verified), timed from the sender's `connected` event (QUIC handshake done) to
//!   its `sent` event (the receiver verified and said so): data, one manifest round trip
//!   and the verdict;
//! - a tiny TCP sender and receiver in this process (threads inside the namespaces,
//!   `setsockopt(TCP_CONGESTION)` `bbr` and `cubic`), timed from the established connection
//!   until the receiver has read every byte and its one-byte acknowledgement is back.
//!
//! For qpunch it also polls the receiver's partial file and reports the goodput until the
//! last byte was on the receiver's disk ("last byte"), which leaves out the receiver's
//! fsync, hash check and verdict: the transport's share.
//!
//! It prints every sample, then a markdown table of medians with ratios and the transfer
//! engine's targets on a real path (>= 90 % of the link rate at 0 % loss; >= 1.0x kernel
//! TCP bbr on lossy paths).
//! A transfer still running after the cap (`QPUNCH_PATH_CAP`) is stopped and counted at
//! what it delivered by then (marked `*`): loss-based controllers crawl at 5 % loss.
//!
//! Needs root (namespaces, nftables, tc); prints SKIPPED otherwise.
//! `cargo bench --bench path` builds the `qpunch` binary with the bench profile (release
//! settings) and uses it (`CARGO_BIN_EXE_qpunch`). Knobs (environment):
//! - `QPUNCH_PATH_BYTES`: file size (default 30 MB = 30000000; suffixes k, M, G are
//!   powers of 1024, as in the transfer bench);
//! - `QPUNCH_PATH_RUNS`: runs per method and loss level, the median is reported (default 3);
//! - `QPUNCH_PATH_LOSS`: loss per router and direction in percent, comma-separated
//!   (default `0,1,5`);
//! - `QPUNCH_PATH_CC`: qpunch controllers, comma-separated `bbr`, `quinn-bbr`, `cubic`, `newreno`, or
//!   `all` (default: none passed, i.e. the binary's default, shown in the table);
//! - `QPUNCH_PATH_TCP`: kernel TCP baselines (default `bbr,cubic`; `none` for none);
//! - `QPUNCH_PATH_RTT_MS`: RTT between the sites (default 40; `0`: no delay element,
//!   plain veth links, a LAN);
//! - `QPUNCH_PATH_MBIT`: link rate (default 100; `0`: no rate limit);
//! - `QPUNCH_PATH_CAP`: seconds a transfer may take before it is cut (default 60);
//! - `QPUNCH_PATH_STATS`: `1` runs `qpunch send -v` and prints its QUIC path statistics
//!   (RTT, congestion window, congestion events, lost and sent packets, MTU) per run;
//! - `QPUNCH_PATH_LOGS`: a directory to keep each qpunch process's stderr in (with
//!   `RUST_LOG`, e.g. `qpunch::bbr=trace` for the controller's rounds);
//! - `QPUNCH_BIN`: another qpunch binary (with `QPUNCH_PATH_CC` unset it gets no `--cc`,
//!   so binaries from before the option work too).
//!
//! Throughput is in decimal MB/s (10^6 bytes per second) of file bytes (goodput). The
//! exit status is non-zero when a transfer fails or delivers wrong bytes; targets are
//! reported, not asserted.

#[path = "../tests/nat_lab/lab.rs"]
mod lab;

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use lab::{Host, Nat, Proc, Rate, SiteSpec, Topology};
use qpunch::node::Congestion;
use serde_json::Value;

/// The receiver's UDP port (B is Open: the router forwards it to B's client).
const QPUNCH_PORT: u16 = 9199;
/// The TCP baseline's port.
const TCP_PORT: u16 = 9100;
/// Write chunk of the TCP sender.
const TCP_CHUNK: usize = 256 << 10;

fn main() -> ExitCode {
    if std::env::args().any(|a| a == "--list") {
        return ExitCode::SUCCESS;
    }
    if !lab::require("path bench", &["tc"]) {
        return ExitCode::SUCCESS;
    }
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("path bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What the environment asked for.
struct Config {
    bytes: u64,
    runs: usize,
    losses: Vec<f64>,
    /// qpunch controllers; `None`: pass no `--cc` (the binary's default).
    controllers: Vec<Option<Congestion>>,
    tcp: Vec<&'static str>,
    rtt: Duration,
    mbit: f64,
    cap: Duration,
    bin: PathBuf,
    /// Print the sender's QUIC path statistics after each qpunch run.
    stats: bool,
    /// Keep each qpunch process's stderr here.
    logs: Option<PathBuf>,
}

impl Config {
    fn from_env() -> anyhow::Result<Config> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let bytes = match var("QPUNCH_PATH_BYTES") {
            Some(s) => common::parse_size(&s).map_err(anyhow::Error::msg)?,
            None => 30_000_000,
        };
        ensure!(bytes > 0, "QPUNCH_PATH_BYTES must be positive");
        let runs = match var("QPUNCH_PATH_RUNS") {
            Some(s) => s.trim().parse().context("QPUNCH_PATH_RUNS")?,
            None => 3,
        };
        ensure!(runs > 0, "QPUNCH_PATH_RUNS must be positive");
        let losses = var("QPUNCH_PATH_LOSS")
            .unwrap_or_else(|| "0,1,5".into())
            .split(',')
            .map(|s| {
                let p: f64 = s.trim().parse().context("QPUNCH_PATH_LOSS")?;
                ensure!((0.0..100.0).contains(&p), "loss {p} % out of range");
                Ok(p)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let controllers = match var("QPUNCH_PATH_CC").as_deref().map(str::trim) {
            None => vec![None],
            Some("all") => Congestion::ALL.map(Some).to_vec(),
            Some(list) => list
                .split(',')
                .map(|s| Ok(Some(s.parse::<Congestion>()?)))
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        let tcp = match var("QPUNCH_PATH_TCP").as_deref().map(str::trim) {
            None => vec!["bbr", "cubic"],
            Some("none") => vec![],
            Some(list) => list
                .split(',')
                .map(|s| match s.trim() {
                    "bbr" => Ok("bbr"),
                    "cubic" => Ok("cubic"),
                    "reno" => Ok("reno"),
                    other => bail!("QPUNCH_PATH_TCP: unknown {other:?} (bbr, cubic, reno)"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?,
        };
        let rtt_ms: u64 = match var("QPUNCH_PATH_RTT_MS") {
            Some(s) => s.trim().parse().context("QPUNCH_PATH_RTT_MS")?,
            None => 40,
        };
        ensure!(
            rtt_ms.is_multiple_of(4),
            "QPUNCH_PATH_RTT_MS must be a multiple of 4"
        );
        let mbit: f64 = match var("QPUNCH_PATH_MBIT") {
            Some(s) => s.trim().parse().context("QPUNCH_PATH_MBIT")?,
            None => 100.0,
        };
        let cap: u64 = match var("QPUNCH_PATH_CAP") {
            Some(s) => s.trim().parse().context("QPUNCH_PATH_CAP")?,
            None => 60,
        };
        let bin = var("QPUNCH_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qpunch")));
        ensure!(bin.is_file(), "qpunch binary {} not found", bin.display());
        Ok(Config {
            bytes,
            runs,
            losses,
            controllers,
            tcp,
            rtt: Duration::from_millis(rtt_ms),
            mbit,
            cap: Duration::from_secs(cap),
            bin,
            stats: var("QPUNCH_PATH_STATS").is_some_and(|v| v.trim() == "1"),
            logs: var("QPUNCH_PATH_LOGS").map(PathBuf::from),
        })
    }

    /// The link's rate in MB/s (0: unlimited).
    fn link_mbps(&self) -> f64 {
        self.mbit * 1e6 / 8.0 / 1e6
    }
}

/// A way of moving the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Method {
    Qpunch(Option<Congestion>),
    Tcp(&'static str),
}

impl Method {
    fn label(self) -> String {
        match self {
            Method::Qpunch(Some(cc)) => format!("qpunch {cc}"),
            Method::Qpunch(None) => format!("qpunch {} (default)", Congestion::default()),
            Method::Tcp(cc) => format!("TCP {cc}"),
        }
    }
}

/// One timed transfer.
#[derive(Debug, Clone, Copy)]
struct Sample {
    /// Goodput in MB/s.
    mbps: f64,
    /// Cut at the cap: `mbps` is what it delivered by then.
    capped: bool,
    /// qpunch only: goodput until the last byte was on the receiver's disk.
    delivered: Option<f64>,
    /// Share of the machine's CPU time that was busy meanwhile (0..1, all cores).
    busy: f64,
}

impl Sample {
    fn show(&self) -> String {
        format!("{:.2}{}", self.mbps, if self.capped { "*" } else { "" })
    }
}

/// What a transfer function measured.
struct Outcome {
    /// Goodput in MB/s: until verified (qpunch) or acknowledged (TCP).
    mbps: f64,
    /// Cut at the cap: `mbps` is what it delivered by then.
    capped: bool,
    /// qpunch only: goodput until the last byte was on the receiver's disk.
    delivered: Option<f64>,
    /// Extra detail for the sample line.
    note: String,
}

impl Outcome {
    fn tcp(mbps: f64, capped: bool) -> Outcome {
        Outcome {
            mbps,
            capped,
            delivered: None,
            note: String::new(),
        }
    }
}

/// Paths and identities shared by every qpunch run.
struct Files {
    _dir: tempfile::TempDir,
    source: PathBuf,
    hash: blake3::Hash,
    home_send: PathBuf,
    home_recv: PathBuf,
    inbox: PathBuf,
}

fn bench() -> anyhow::Result<bool> {
    let config = Config::from_env()?;
    let dir = tempfile::Builder::new().prefix("qpunch-path-").tempdir()?;
    let source = dir.path().join("payload.bin");
    common::generate(&source, config.bytes, rand::random())?;
    let mut hasher = blake3::Hasher::new();
    hasher.update_mmap(&source)?;
    let files = Files {
        source,
        hash: hasher.finalize(),
        home_send: dir.path().join("home-send"),
        home_recv: dir.path().join("home-recv"),
        inbox: dir.path().join("inbox"),
        _dir: dir,
    };
    // Both identities exist before the first timed run.
    for home in [&files.home_send, &files.home_recv] {
        let status = std::process::Command::new(&config.bin)
            .arg("id")
            .env("QPUNCH_HOME", home)
            .stdout(std::process::Stdio::null())
            .status()
            .context("cannot run qpunch id")?;
        ensure!(status.success(), "qpunch id failed: {status}");
    }

    let one_way = config.rtt / 4;
    let link = |nat| {
        let mut spec = SiteSpec::new(nat).ipv6(false);
        if !config.rtt.is_zero() {
            spec = spec.delay(one_way);
        }
        if config.mbit > 0.0 {
            spec = spec.rate(Rate::mbit(config.mbit));
        }
        spec
    };
    let topo = Topology::new("pb", &[link(Nat::Cone), link(Nat::Open)]);
    let (a, b) = (topo.site(0), topo.site(1));
    let (sender, receiver) = (a.client(0), b.client(0));
    let wan_b = b.wan_v4;

    let mut methods: Vec<Method> = config
        .controllers
        .iter()
        .map(|&cc| Method::Qpunch(cc))
        .collect();
    methods.extend(config.tcp.iter().map(|&cc| Method::Tcp(cc)));

    print_header(&config, &topo);
    // Warm up ARP and conntrack along the path outside the timing.
    tcp_transfer(sender, receiver, wan_b, "cubic", 1 << 16, config.cap, false)
        .context("warm-up TCP transfer")?;

    let mut all_ok = true;
    let mut results: HashMap<(usize, Method), Vec<Sample>> = HashMap::new();
    let mut measured_loss: Vec<Option<f64>> = Vec::new();
    for (level, &loss) in config.losses.iter().enumerate() {
        for site in [a, b] {
            site.set_loss(loss);
        }
        println!(
            "\n--- loss {loss} % per router and direction (loadavg {}) ---",
            loadavg()
        );
        for run in 1..=config.runs {
            for &method in &methods {
                let busy = BusyMeter::start();
                let sample = match method {
                    Method::Qpunch(cc) => {
                        let tag =
                            format!("loss{loss}-{}-run{run}", method.label().replace(' ', "_"));
                        qpunch_transfer(&config, &files, sender, receiver, wan_b, cc, &tag)
                    }
                    Method::Tcp(cc) => tcp_transfer(
                        sender,
                        receiver,
                        wan_b,
                        cc,
                        config.bytes,
                        config.cap,
                        config.stats,
                    ),
                };
                match sample {
                    Ok(outcome) => {
                        let sample = Sample {
                            mbps: outcome.mbps,
                            capped: outcome.capped,
                            delivered: outcome.delivered,
                            busy: busy.stop(),
                        };
                        println!(
                            "loss {loss} % run {run}: {:<22} {:>8} MB/s{}{}  machine busy {:.0} %{}",
                            method.label(),
                            sample.show(),
                            match sample.delivered {
                                Some(d) => format!(" (last byte on disk: {d:.2} MB/s)"),
                                None => String::new(),
                            },
                            if sample.capped {
                                " (cut at the cap)"
                            } else {
                                ""
                            },
                            sample.busy * 100.0,
                            if outcome.note.is_empty() {
                                String::new()
                            } else {
                                format!("\n    {}", outcome.note)
                            }
                        );
                        results.entry((level, method)).or_default().push(sample);
                    }
                    Err(e) => {
                        all_ok = false;
                        println!(
                            "loss {loss} % run {run}: {:<22} FAILED: {e:#}",
                            method.label()
                        );
                    }
                }
            }
        }
        measured_loss.push((loss > 0.0).then(|| {
            let (ca, cb) = (a.loss_counters(), b.loss_counters());
            let pa = ca.dropped_out as f64 / ca.seen_out.max(1) as f64;
            let pb = cb.dropped_in as f64 / cb.seen_in.max(1) as f64;
            1.0 - (1.0 - pa) * (1.0 - pb)
        }));
    }
    for site in [a, b] {
        site.set_loss(0.0);
    }

    print_table(&config, &methods, &results, &measured_loss);
    if !all_ok {
        println!("FAILED: at least one transfer did not complete and verify");
    }
    Ok(all_ok)
}

fn print_header(config: &Config, topo: &Topology) {
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    println!(
        "machine: nproc {}, kernel {}, loadavg {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read("/proc/sys/kernel/osrelease"),
        read("/proc/loadavg"),
    );
    println!("qpunch binary: {}", config.bin.display());
    println!(
        "path: site A (cone NAT, sender) -> site B (open, receiver); RTT {} ms{}; rate {}; \
         loss per router and direction: {:?} %",
        config.rtt.as_millis(),
        if config.rtt.is_zero() {
            " (plain veth, no delay element)".to_string()
        } else {
            format!(
                " ({} ms one way per site link)",
                (config.rtt / 4).as_millis()
            )
        },
        if config.mbit > 0.0 {
            format!("{} Mbit/s each way (tbf)", config.mbit)
        } else {
            "unlimited".into()
        },
        config.losses
    );
    println!(
        "file: {} bytes ({:.1} MB), {} run(s) per method, median reported; cap {} s per transfer; \
         lab {}",
        config.bytes,
        config.bytes as f64 / 1e6,
        config.runs,
        config.cap.as_secs(),
        topo.prefix
    );
    println!(
        "qpunch controller: {}",
        config
            .controllers
            .iter()
            .map(|cc| Method::Qpunch(*cc).label())
            .collect::<Vec<_>>()
            .join(", ")
    );
}

fn print_table(
    config: &Config,
    methods: &[Method],
    results: &HashMap<(usize, Method), Vec<Sample>>,
    measured_loss: &[Option<f64>],
) {
    let median = |level: usize, method: Method| -> Option<Sample> {
        let mut samples = results.get(&(level, method))?.clone();
        samples.sort_by(|x, y| x.mbps.total_cmp(&y.mbps));
        Some(samples[samples.len() / 2])
    };
    let show = |s: Option<Sample>| s.map_or("-".to_string(), |s| s.show());
    let median_delivered = |level: usize, method: Method| -> Option<f64> {
        let mut rates: Vec<f64> = results
            .get(&(level, method))?
            .iter()
            .filter_map(|s| s.delivered)
            .collect();
        rates.sort_by(f64::total_cmp);
        rates.get(rates.len() / 2).copied()
    };
    println!(
        "\n=== medians, MB/s of file bytes ({:.1} MB, {} run(s); * = cut at {} s, counted at what \
         it delivered) ===\n",
        config.bytes as f64 / 1e6,
        config.runs,
        config.cap.as_secs()
    );
    let link = config.link_mbps();
    let tcp: Vec<Method> = methods
        .iter()
        .copied()
        .filter(|m| matches!(m, Method::Tcp(_)))
        .collect();
    let mut head =
        "| loss/router | path loss | qpunch controller | qpunch MB/s | % of link | qpunch last byte MB/s |"
            .to_string();
    let mut rule = "|---|---|---|---|---|---|".to_string();
    for m in &tcp {
        head.push_str(&format!(" {} MB/s |", m.label()));
        rule.push_str("---|");
    }
    for m in &tcp {
        head.push_str(&format!(" / {} |", m.label()));
        rule.push_str("---|");
    }
    head.push_str(" target |");
    rule.push_str("---|");
    println!("{head}\n{rule}");
    for (level, &loss) in config.losses.iter().enumerate() {
        for &method in methods.iter().filter(|m| matches!(m, Method::Qpunch(_))) {
            let q = median(level, method);
            let mut row = format!(
                "| {loss} % | {} | {} | {} | {} | {} |",
                measured_loss[level].map_or("0".to_string(), |p| format!("{:.2} %", p * 100.0)),
                method.label(),
                show(q),
                match q {
                    Some(q) if link > 0.0 => format!("{:.0} %", q.mbps / link * 100.0),
                    _ => "-".into(),
                },
                median_delivered(level, method).map_or("-".to_string(), |d| format!("{d:.2}")),
            );
            for &m in &tcp {
                row.push_str(&format!(" {} |", show(median(level, m))));
            }
            for &m in &tcp {
                let ratio = match (q, median(level, m)) {
                    (Some(q), Some(t)) => format!("{:.2}x", q.mbps / t.mbps),
                    _ => "-".into(),
                };
                row.push_str(&format!(" {ratio} |"));
            }
            let target = if loss == 0.0 {
                match q {
                    Some(q) if link > 0.0 => verdict(q.mbps >= 0.9 * link, ">= 90 % of link"),
                    _ => "-".into(),
                }
            } else {
                match (q, median(level, Method::Tcp("bbr"))) {
                    (Some(q), Some(t)) => verdict(q.mbps >= t.mbps, ">= 1.0x TCP bbr"),
                    _ => "-".into(),
                }
            };
            row.push_str(&format!(" {target} |"));
            println!("{row}");
        }
    }
    println!(
        "\nlink rate {}; \"path loss\": share of the data direction's packets the two routers \
         dropped (both links), from their counters, over all transfers of that level.",
        if link > 0.0 {
            format!("{link:.2} MB/s ({} Mbit/s)", config.mbit)
        } else {
            "unlimited".into()
        }
    );
    println!("loadavg at the end: {}", loadavg());
}

fn verdict(met: bool, what: &str) -> String {
    format!("{what}: {}", if met { "met" } else { "NOT met" })
}

// ---------------------------------------------------------------------------------------
// qpunch
// ---------------------------------------------------------------------------------------

/// One `qpunch receive --once` in B, one `qpunch send` in A: goodput from `connected` to
/// `sent`, and whether it was cut at the cap.
fn qpunch_transfer(
    config: &Config,
    files: &Files,
    sender: &Host,
    receiver: &Host,
    wan_b: std::net::Ipv4Addr,
    cc: Option<Congestion>,
    tag: &str,
) -> anyhow::Result<Outcome> {
    let _ = std::fs::remove_dir_all(&files.inbox);
    std::fs::create_dir_all(&files.inbox)?;
    let cc_args: Vec<&str> = match cc {
        Some(cc) => vec!["--cc", cc.as_str()],
        None => vec![],
    };
    let port = QPUNCH_PORT.to_string();
    let inbox = files.inbox.display().to_string();
    let mut args = vec![
        "receive", "--port", &port, "--out", &inbox, "--yes", "--once", "--json",
    ];
    args.extend(&cc_args);
    let mut recv = receiver.spawn(
        &config.bin,
        &args,
        &[("QPUNCH_HOME", files.home_recv.as_path())],
    );
    let listening = wait_event(
        &mut recv,
        "listening",
        Instant::now() + Duration::from_secs(20),
    )?
    .0;
    let fingerprint = listening["fingerprint"]
        .as_str()
        .context("listening event without a fingerprint")?
        .to_string();

    let to = format!("{wan_b}:{QPUNCH_PORT}");
    let source = files.source.display().to_string();
    let mut args = vec![
        "send",
        &source,
        "--to",
        &to,
        "--peer",
        &fingerprint,
        "--json",
    ];
    args.extend(&cc_args);
    if config.stats {
        args.push("-v");
    }
    let mut send = sender.spawn(
        &config.bin,
        &args,
        &[("QPUNCH_HOME", files.home_send.as_path())],
    );
    let connected = wait_event(
        &mut send,
        "connected",
        Instant::now() + Duration::from_secs(20),
    )
    .map_err(|e| e.context(send.describe()))?
    .1;
    let watch = DeliveryWatch::start(&files.inbox, config.bytes);
    let deadline = connected + config.cap;
    let keep_logs = |send: &Proc, recv: &Proc| -> anyhow::Result<()> {
        if let Some(dir) = &config.logs {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join(format!("{tag}-send.log")), send.stderr())?;
            std::fs::write(dir.join(format!("{tag}-receive.log")), recv.stderr())?;
        }
        Ok(())
    };
    let sent = match wait_event(&mut send, "sent", deadline) {
        Ok((event, at)) => {
            ensure!(
                event["bytes"].as_u64() == Some(config.bytes)
                    && event["blake3"].as_str() == Some(files.hash.to_hex().as_str()),
                "sender reported {event}, not the source's size and BLAKE3"
            );
            Some(at)
        }
        Err(_) if Instant::now() >= deadline => None,
        Err(e) => return Err(e.context(format!("{}\n{}", send.describe(), recv.describe()))),
    };
    let Some(sent) = sent else {
        // Cut: count what reached the receiver's partial file.
        let delivered = partial_bytes(&files.inbox);
        keep_logs(&send, &recv)?;
        drop(send);
        drop(recv);
        watch.stop();
        return Ok(Outcome {
            mbps: delivered as f64 / 1e6 / config.cap.as_secs_f64(),
            capped: true,
            delivered: None,
            note: String::new(),
        });
    };
    let delivered = watch.stop();
    let (status, _) = send.wait_exit(Duration::from_secs(20));
    ensure!(
        status.success(),
        "qpunch send: {status}\n{}",
        send.describe()
    );
    let (status, lines) = recv.wait_exit(Duration::from_secs(20));
    keep_logs(&send, &recv)?;
    ensure!(
        status.success(),
        "qpunch receive: {status}\n{}",
        recv.describe()
    );
    let received = lines
        .iter()
        .chain(&recv.seen)
        .find(|v| v["event"] == "received")
        .context("the receiver reported no received file")?;
    ensure!(
        received["bytes"].as_u64() == Some(config.bytes)
            && received["blake3"].as_str() == Some(files.hash.to_hex().as_str()),
        "receiver reported {received}, not the source's size and BLAKE3"
    );
    let saved = files
        .inbox
        .join(received["saved_as"].as_str().context("no saved_as")?);
    ensure!(
        std::fs::metadata(&saved)?.len() == config.bytes,
        "{} has the wrong size",
        saved.display()
    );
    let secs = sent.duration_since(connected).as_secs_f64();
    let rate = |secs: f64| config.bytes as f64 / 1e6 / secs;
    Ok(Outcome {
        mbps: rate(secs),
        capped: false,
        delivered: delivered.map(|at| rate(at.duration_since(connected).as_secs_f64())),
        note: if config.stats {
            path_stats(&send.stderr())
        } else {
            String::new()
        },
    })
}

/// The interesting fields of the sender's `connection statistics` debug line.
fn path_stats(stderr: &str) -> String {
    let Some(line) = stderr.lines().find(|l| l.contains("connection statistics")) else {
        return "(no connection statistics on stderr)".into();
    };
    let keys = [
        "rtt",
        "cwnd",
        "congestion_events",
        "lost_packets",
        "sent_packets",
        "current_mtu",
    ];
    let mut fields = Vec::new();
    for key in keys {
        if let Some((_, rest)) = line.split_once(&format!(" {key}: ")) {
            let end = rest.find([',', '}']).unwrap_or(rest.len());
            fields.push(format!("{key}={}", rest[..end].trim()));
        }
    }
    fields.join(" ")
}

/// Polls the receiver's partial file from `connected` on, to time the moment the last
/// byte is on the receiver's disk (before its fsync, hash check and verdict).
struct DeliveryWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<Instant>>,
}

impl DeliveryWatch {
    fn start(inbox: &Path, bytes: u64) -> DeliveryWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (inbox, flag) = (inbox.to_path_buf(), stop.clone());
        let thread = std::thread::spawn(move || {
            let mut seen = 0;
            while !flag.load(Ordering::Relaxed) {
                let now = partial_bytes(&inbox);
                if now >= bytes || (seen > 0 && now == 0) {
                    // Complete, or already renamed between two polls (then a bound).
                    return Some(Instant::now());
                }
                seen = seen.max(now);
                std::thread::sleep(Duration::from_millis(2));
            }
            None
        });
        DeliveryWatch { stop, thread }
    }

    fn stop(self) -> Option<Instant> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

/// The next stdout event of kind `kind` and when it was read; an `error` event, the end of
/// the process or the deadline fail.
fn wait_event(proc: &mut Proc, kind: &str, deadline: Instant) -> anyhow::Result<(Value, Instant)> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no {kind:?} event in time");
        }
        match proc.next_line(left.min(Duration::from_millis(200))) {
            Some(v) if v["event"] == kind => return Ok((v, Instant::now())),
            Some(v) if v["event"] == "error" => bail!("error event: {v}"),
            Some(_) => {}
            None => {
                if let Some(status) = proc.try_exit() {
                    bail!(
                        "{} exited ({status}) before {kind:?}\n{}",
                        proc.what,
                        proc.describe()
                    );
                }
            }
        }
    }
}

/// Bytes in the receiver's partial files (`OUT/.qpunch-partial/*.part`).
fn partial_bytes(inbox: &Path) -> u64 {
    std::fs::read_dir(inbox.join(".qpunch-partial"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

// ---------------------------------------------------------------------------------------
// Kernel TCP
// ---------------------------------------------------------------------------------------

/// `bytes` from A's client to B's client over TCP with controller `cc` on both sockets:
/// goodput from the established connection to the receiver's acknowledgement of the last
/// byte, and whether it was cut at `cap`.
fn tcp_transfer(
    sender: &Host,
    receiver: &Host,
    wan_b: std::net::Ipv4Addr,
    cc: &'static str,
    bytes: u64,
    cap: Duration,
    stats: bool,
) -> anyhow::Result<Outcome> {
    let listener = receiver.run(|| -> anyhow::Result<TcpListener> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        set_congestion(&socket, cc)?;
        socket.bind(&SocketAddr::from(([0, 0, 0, 0], TCP_PORT)).into())?;
        socket.listen(1)?;
        Ok(socket.into())
    })?;
    let stream = sender.run(|| -> anyhow::Result<socket2::Socket> {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        set_congestion(&socket, cc)?;
        Ok(socket)
    })?;
    stream
        .connect_timeout(
            &SocketAddr::from((wan_b, TCP_PORT)).into(),
            Duration::from_secs(10),
        )
        .context("TCP connect")?;
    let mut tx: TcpStream = stream.into();
    let start = Instant::now();
    let deadline = start + cap;
    let (mut rx, _) = listener.accept()?;
    ensure!(
        congestion_of(&tx)? == cc && congestion_of(&rx)? == cc,
        "TCP_CONGESTION {cc} did not stick"
    );
    let received = Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let reader = std::thread::spawn(move || -> std::io::Result<()> {
        rx.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match rx.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if Instant::now() >= deadline {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
        rx.write_all(b"k")
    });
    tx.set_write_timeout(Some(Duration::from_millis(200)))?;
    let chunk = vec![0x5au8; TCP_CHUNK];
    let mut left = bytes;
    let mut capped = false;
    while left > 0 {
        if Instant::now() >= deadline {
            capped = true;
            break;
        }
        let n = left.min(TCP_CHUNK as u64) as usize;
        match tx.write(&chunk[..n]) {
            Ok(n) => left -= n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e).context("TCP send"),
        }
    }
    if capped {
        let _ = tx.shutdown(std::net::Shutdown::Both);
        reader.join().expect("reader thread").ok();
        let got = received.load(Ordering::Relaxed);
        return Ok(Outcome::tcp(got as f64 / 1e6 / cap.as_secs_f64(), true));
    }
    tx.shutdown(std::net::Shutdown::Write)?;
    tx.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    let mut ack = [0u8; 1];
    let acked = tx.read_exact(&mut ack);
    let elapsed = start.elapsed();
    reader
        .join()
        .expect("reader thread")
        .context("TCP receive")?;
    let got = received.load(Ordering::Relaxed);
    if acked.is_err() {
        return Ok(Outcome::tcp(got as f64 / 1e6 / cap.as_secs_f64(), true));
    }
    ensure!(got == bytes, "TCP receiver got {got} of {bytes} bytes");
    let mut outcome = Outcome::tcp(bytes as f64 / 1e6 / elapsed.as_secs_f64(), false);
    if stats {
        outcome.note = tcp_stats(&tx);
    }
    Ok(outcome)
}

/// The sender's `TCP_INFO`: what its controller saw (for `QPUNCH_PATH_STATS`).
fn tcp_stats(socket: &impl AsRawFd) -> String {
    // SAFETY: tcp_info is plain old data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: a valid socket descriptor and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return format!("TCP_INFO: {}", std::io::Error::last_os_error());
    }
    format!(
        "rtt={:.1}ms cwnd={} segments (mss {}) total_retrans={} segs_out={}",
        f64::from(info.tcpi_rtt) / 1000.0,
        info.tcpi_snd_cwnd,
        info.tcpi_snd_mss,
        info.tcpi_total_retrans,
        info.tcpi_segs_out
    )
}

/// `setsockopt(TCP_CONGESTION)`.
fn set_congestion(socket: &impl AsRawFd, cc: &str) -> anyhow::Result<()> {
    // SAFETY: a valid socket descriptor and a buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            cc.as_ptr().cast(),
            cc.len() as libc::socklen_t,
        )
    };
    ensure!(
        rc == 0,
        "setsockopt(TCP_CONGESTION, {cc}): {} (is tcp_{cc} available? \
         /proc/sys/net/ipv4/tcp_available_congestion_control)",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// `getsockopt(TCP_CONGESTION)`.
fn congestion_of(socket: &impl AsRawFd) -> anyhow::Result<String> {
    let mut name = [0u8; 16];
    let mut len = name.len() as libc::socklen_t;
    // SAFETY: a valid socket descriptor and a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_CONGESTION,
            name.as_mut_ptr().cast(),
            &mut len,
        )
    };
    ensure!(
        rc == 0,
        "getsockopt(TCP_CONGESTION): {}",
        std::io::Error::last_os_error()
    );
    let name = &name[..len as usize];
    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    Ok(String::from_utf8_lossy(&name[..end]).into_owned())
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// The machine's busy share over an interval, from /proc/stat.
struct BusyMeter((u64, u64));

impl BusyMeter {
    fn start() -> BusyMeter {
        BusyMeter(common::machine_cpu())
    }

    fn stop(self) -> f64 {
        let (busy0, total0) = self.0;
        let (busy1, total1) = common::machine_cpu();
        (busy1 - busy0) as f64 / (total1 - total0).max(1) as f64
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}
