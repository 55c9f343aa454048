//! Throughput benchmark: `qpunch send` → `qpunch receive` over loopback, against a
//! TLS-over-TCP copy of the same file (socat with OpenSSL when installed, else a small
//! blocking rustls copy that re-executes this very binary as server and client).
//!
//! Run with `cargo bench --bench transfer`. Knobs (environment):
//! - `QPUNCH_BENCH_BYTES`: file size, e.g. `1G` (default), `256M`, `64k` or plain bytes
//!   (suffixes are powers of 1024);
//! - `QPUNCH_BENCH_RUNS`: repetitions of each transfer (default 3);
//! - `QPUNCH_BENCH_BASELINE`: `auto` (default: socat if installed, else rust), `socat`,
//!   `rust`, `all` or `none`;
//! - `QPUNCH_BENCH_SOCAT_BLOCK`: socat's `-b` buffer size in bytes (default 131072);
//! - `QPUNCH_BENCH_FSYNC`: `1` (default) makes the baselines fsync their output before
//!   they count as done, as `qpunch receive` does before it reports a file verified; `0`
//!   leaves their data in the page cache;
//! - `QPUNCH_BENCH_DIR`: where the temporary directory goes (default: the system's);
//! - `QPUNCH_BENCH_CC`: `--cc` for both qpunch processes (`bbr`, `quinn-bbr`, `cubic`, `newreno`;
//!   default: none given, i.e. the binary's default);
//! - `QPUNCH_BIN`: the qpunch binary (default: the one cargo built for this bench).
//!
//! Every transfer is timed from the spawn of the connecting process (the listening one is
//! already up and ready) until both processes have exited, and its output is checked
//! against the source's BLAKE3 (outside the timing). Each run also reports the CPU time of
//! both processes and how many cores *other* processes kept busy meanwhile: on a shared
//! machine that contention, not the protocol, can dominate the figures. Throughput is in
//! decimal MB/s (1 MB = 10^6 bytes). The exit status is non-zero when any transfer fails or
//! does not verify; the transfer engine's target, qpunch at least as fast as the TLS-over-TCP
//! copy (≥ 1.0×), is reported, not asserted (that contention can decide it).

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitCode, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

/// Set in the environment of a re-executed copy of this binary: which side it plays.
const ROLE_ENV: &str = "QPUNCH_BENCH_ROLE";
/// Read/write chunk of the Rust baseline.
const RUST_CHUNK: usize = 256 << 10;
/// Default socat `-b` (its own default, 8 KiB, would handicap the baseline).
const SOCAT_BLOCK: usize = 128 << 10;

fn main() -> ExitCode {
    let role = std::env::var(ROLE_ENV).unwrap_or_default();
    let result = match role.as_str() {
        "" => bench(),
        "tls-server" => tls_server().map(|()| true),
        "tls-client" => tls_client().map(|()| true),
        other => Err(anyhow::anyhow!("unknown {ROLE_ENV}={other}")),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            let who = if role.is_empty() { "bench" } else { &role };
            eprintln!("{who}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Which TLS-over-TCP baseline to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Baseline {
    Socat,
    Rust,
}

impl Baseline {
    fn label(self) -> &'static str {
        match self {
            Baseline::Socat => "socat/OpenSSL TLS-over-TCP",
            Baseline::Rust => "rustls TLS-over-TCP (in-tree)",
        }
    }
}

/// Everything a run needs.
struct Ctx {
    dir: PathBuf,
    /// `--cc NAME` for both qpunch processes, or nothing.
    cc_args: Vec<String>,
    bin: PathBuf,
    source: PathBuf,
    bytes: u64,
    hash: blake3::Hash,
    timeout: Duration,
    clk_tck: f64,
    socat_block: usize,
    fsync: bool,
    cert_pem: PathBuf,
    key_pem: PathBuf,
    cert_der: PathBuf,
    key_der: PathBuf,
}

/// One process of a transfer: name, seconds from start to exit, CPU (user, system) s.
type ProcTimes = (String, f64, Option<(f64, f64)>);

/// One timed transfer.
#[derive(Debug, Clone)]
struct Sample {
    secs: f64,
    ok: bool,
    /// Per process: name, seconds from start to exit, CPU seconds (user+sys) if known.
    procs: Vec<ProcTimes>,
    /// Cores kept busy by other processes during the transfer (whole machine minus ours).
    others: Option<f64>,
    note: String,
}

impl Sample {
    fn mbps(&self, bytes: u64) -> f64 {
        bytes as f64 / 1e6 / self.secs
    }
}

fn bench() -> anyhow::Result<bool> {
    let bytes = match std::env::var("QPUNCH_BENCH_BYTES") {
        Ok(s) => common::parse_size(&s).map_err(anyhow::Error::msg)?,
        Err(_) => 1 << 30,
    };
    ensure!(bytes > 0, "QPUNCH_BENCH_BYTES must be positive");
    let runs: usize = match std::env::var("QPUNCH_BENCH_RUNS") {
        Ok(s) => s.trim().parse().context("QPUNCH_BENCH_RUNS")?,
        Err(_) => 3,
    };
    ensure!(runs > 0, "QPUNCH_BENCH_RUNS must be positive");
    let socat_block = match std::env::var("QPUNCH_BENCH_SOCAT_BLOCK") {
        Ok(s) => common::parse_size(&s).map_err(anyhow::Error::msg)? as usize,
        Err(_) => SOCAT_BLOCK,
    };
    let fsync = match std::env::var("QPUNCH_BENCH_FSYNC")
        .as_deref()
        .map(str::trim)
    {
        Err(_) | Ok("1") | Ok("") => true,
        Ok("0") => false,
        Ok(other) => bail!("QPUNCH_BENCH_FSYNC={other}: expected 1 or 0"),
    };
    let socat = socat_version();
    let choice = std::env::var("QPUNCH_BENCH_BASELINE").unwrap_or_else(|_| "auto".into());
    let baselines = match choice.trim() {
        "auto" | "" if socat.is_some() => vec![Baseline::Socat],
        "auto" | "" => {
            println!("socat not found: using the in-tree rustls baseline");
            vec![Baseline::Rust]
        }
        "socat" => {
            ensure!(
                socat.is_some(),
                "QPUNCH_BENCH_BASELINE=socat but socat is not installed"
            );
            vec![Baseline::Socat]
        }
        "rust" => vec![Baseline::Rust],
        "all" if socat.is_some() => vec![Baseline::Socat, Baseline::Rust],
        "all" => vec![Baseline::Rust],
        "none" => vec![],
        other => bail!("QPUNCH_BENCH_BASELINE={other}: expected auto, socat, rust, all or none"),
    };
    let bin = std::env::var_os("QPUNCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qpunch")));
    ensure!(bin.is_file(), "qpunch binary {} not found", bin.display());

    let tmp = match std::env::var_os("QPUNCH_BENCH_DIR") {
        Some(base) => tempfile::Builder::new()
            .prefix("qpunch-bench-")
            .tempdir_in(base)?,
        None => tempfile::Builder::new().prefix("qpunch-bench-").tempdir()?,
    };
    let dir = tmp.path().to_path_buf();
    let source = dir.join("source.bin");
    let t = Instant::now();
    common::generate(&source, bytes, rand::random())?;
    let gen_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let hash = hash_file(&source)?;
    println!(
        "source: {} ({bytes} bytes) generated in {gen_secs:.2} s, BLAKE3 {} hashed in {:.2} s",
        source.display(),
        &hash.to_hex()[..16],
        t.elapsed().as_secs_f64()
    );

    // One throwaway certificate for both baselines.
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let (cert_pem, key_pem) = (dir.join("cert.pem"), dir.join("key.pem"));
    let (cert_der, key_der) = (dir.join("cert.der"), dir.join("key.der"));
    std::fs::write(&cert_pem, certified.cert.pem())?;
    std::fs::write(&key_pem, certified.signing_key.serialize_pem())?;
    std::fs::write(&cert_der, certified.cert.der().as_ref())?;
    std::fs::write(&key_der, certified.signing_key.serialize_der())?;

    let cc_args = match std::env::var("QPUNCH_BENCH_CC") {
        Ok(cc) if !cc.trim().is_empty() => {
            let cc: qpunch::node::Congestion = cc.parse()?;
            vec!["--cc".to_string(), cc.to_string()]
        }
        _ => Vec::new(),
    };
    let ctx = Ctx {
        dir: dir.clone(),
        cc_args,
        bin,
        source,
        bytes,
        hash,
        // Generous: a hang fails the run instead of the whole bench.
        timeout: Duration::from_secs(60) + Duration::from_secs_f64(bytes as f64 / 5e6),
        clk_tck: clk_tck(),
        socat_block,
        fsync,
        cert_pem,
        key_pem,
        cert_der,
        key_der,
    };

    // Both qpunch identities exist before the first timed run.
    for home in ["home-recv", "home-send"] {
        let status = Command::new(&ctx.bin)
            .arg("id")
            .env("QPUNCH_HOME", ctx.dir.join(home))
            .stdout(Stdio::null())
            .status()
            .context("cannot run qpunch id")?;
        ensure!(status.success(), "qpunch id failed: {status}");
    }

    print_machine(&ctx, socat.as_deref());
    println!(
        "qpunch receive fsyncs each file before verifying it; baselines fsync their output: {}",
        if fsync {
            "yes"
        } else {
            "no (QPUNCH_BENCH_FSYNC=0)"
        }
    );
    println!(
        "transfers: {runs} run(s) each of {:.1} MB; baselines: {}",
        bytes as f64 / 1e6,
        if baselines.is_empty() {
            "none".to_string()
        } else {
            baselines
                .iter()
                .map(|b| b.label())
                .collect::<Vec<_>>()
                .join(", ")
        }
    );

    let mut qpunch_samples = Vec::new();
    let mut baseline_samples: Vec<Vec<Sample>> = vec![Vec::new(); baselines.len()];
    let mut ciphers: Vec<Option<String>> = vec![None; baselines.len()];
    for run in 1..=runs {
        let sample = run_qpunch(&ctx).unwrap_or_else(failed);
        print_sample("qpunch", run, &sample, bytes);
        qpunch_samples.push(sample);
        for (i, baseline) in baselines.iter().enumerate() {
            let sample = match baseline {
                Baseline::Socat => run_socat(&ctx),
                Baseline::Rust => run_rust(&ctx),
            }
            .unwrap_or_else(failed);
            let name = match baseline {
                Baseline::Socat => "socat",
                Baseline::Rust => "rustls",
            };
            print_sample(name, run, &sample, bytes);
            if sample.ok && ciphers[i].is_none() && !sample.note.is_empty() {
                ciphers[i] = Some(sample.note.clone());
            }
            baseline_samples[i].push(sample);
        }
    }

    println!();
    println!(
        "=== summary ({:.1} MB, {runs} run(s) each) ===",
        bytes as f64 / 1e6
    );
    let all_ok =
        qpunch_samples.iter().all(|s| s.ok) && baseline_samples.iter().flatten().all(|s| s.ok);
    let q = stats(&qpunch_samples, bytes);
    println!(
        "qpunch (QUIC, TLS 1.3 TLS13_AES_128_GCM_SHA256 (preferred) via rustls/ring, send+receive processes): {}; {}",
        describe(q),
        cpu_summary(&qpunch_samples, bytes)
    );
    for (i, baseline) in baselines.iter().enumerate() {
        let b = stats(&baseline_samples[i], bytes);
        println!(
            "baseline {}: {}; {}; cipher: {}",
            baseline.label(),
            describe(b),
            cpu_summary(&baseline_samples[i], bytes),
            ciphers[i].as_deref().unwrap_or("unknown")
        );
        if let (Some((q_best, q_median)), Some((b_best, b_median))) = (q, b) {
            let ratio = q_median / b_median;
            println!(
                "ratio qpunch/{}: median {:.2}x, best {:.2}x (target >= 1.00x: {})",
                match baseline {
                    Baseline::Socat => "socat",
                    Baseline::Rust => "rustls",
                },
                ratio,
                q_best / b_best,
                if ratio >= 1.0 { "met" } else { "NOT met" }
            );
        }
    }
    let others: Vec<f64> = qpunch_samples
        .iter()
        .chain(baseline_samples.iter().flatten())
        .filter_map(|s| s.others)
        .collect();
    if let Some(max) = others.iter().copied().reduce(f64::max) {
        println!(
            "contention: other processes kept {:.2}..{max:.2} of {} cores busy during the transfers{}",
            others.iter().copied().fold(f64::INFINITY, f64::min),
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            if max > 0.25 {
                " (figures are not from an idle machine)"
            } else {
                ""
            }
        );
    }
    if !all_ok {
        println!("FAILED: at least one transfer did not complete and verify");
    }
    Ok(all_ok)
}

fn failed(e: anyhow::Error) -> Sample {
    Sample {
        secs: f64::NAN,
        ok: false,
        procs: Vec::new(),
        others: None,
        note: format!("{e:#}"),
    }
}

/// Best and median throughput of the verified samples.
fn stats(samples: &[Sample], bytes: u64) -> Option<(f64, f64)> {
    let mut rates: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok)
        .map(|s| s.mbps(bytes))
        .collect();
    if rates.is_empty() {
        return None;
    }
    rates.sort_by(f64::total_cmp);
    let n = rates.len();
    let median = if n % 2 == 1 {
        rates[n / 2]
    } else {
        (rates[n / 2 - 1] + rates[n / 2]) / 2.0
    };
    Some((rates[n - 1], median))
}

/// Median CPU seconds (all processes, user+sys) per GB moved.
fn cpu_summary(samples: &[Sample], bytes: u64) -> String {
    let mut per_gb: Vec<f64> = samples
        .iter()
        .filter(|s| s.ok)
        .filter_map(|s| {
            let cpu: Option<f64> = s.procs.iter().map(|(_, _, c)| c.map(|(u, k)| u + k)).sum();
            cpu.map(|c| c / (bytes as f64 / 1e9))
        })
        .collect();
    if per_gb.is_empty() {
        return "CPU unknown".into();
    }
    per_gb.sort_by(f64::total_cmp);
    format!("median CPU {:.2} s per GB", per_gb[per_gb.len() / 2])
}

fn describe(stats: Option<(f64, f64)>) -> String {
    match stats {
        Some((best, median)) => format!("best {best:.1} MB/s, median {median:.1} MB/s"),
        None => "no verified run".to_string(),
    }
}

fn print_sample(name: &str, run: usize, sample: &Sample, bytes: u64) {
    if !sample.ok {
        println!("{name:>7} run {run}: FAILED: {}", sample.note);
        return;
    }
    let procs = sample
        .procs
        .iter()
        .map(|(p, at, cpu)| match cpu {
            Some((user, sys)) => format!("{p} exit {at:.2}s cpu {user:.2}u+{sys:.2}s"),
            None => format!("{p} exit {at:.2}s"),
        })
        .collect::<Vec<_>>()
        .join("; ");
    let others = sample
        .others
        .map(|o| format!("  others busy {o:.2} cores"))
        .unwrap_or_default();
    println!(
        "{name:>7} run {run}: {:8.1} MB/s  {:.3} s  verified  [{procs}]{others}",
        sample.mbps(bytes),
        sample.secs
    );
}

fn print_machine(ctx: &Ctx, socat: Option<&str>) {
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "?".into())
    };
    println!(
        "machine: nproc {nproc}, cpu {cpu}, kernel {}, loadavg {}, net.core.rmem_max {} wmem_max {}",
        read("/proc/sys/kernel/osrelease"),
        read("/proc/loadavg"),
        read("/proc/sys/net/core/rmem_max"),
        read("/proc/sys/net/core/wmem_max"),
    );
    println!(
        "qpunch binary: {}; work dir: {}; congestion controller: {}",
        ctx.bin.display(),
        ctx.dir.display(),
        match ctx.cc_args.get(1) {
            Some(cc) => cc.clone(),
            None => format!("{} (default)", qpunch::node::Congestion::default()),
        }
    );
    if let Some(v) = socat {
        println!("socat: {v}; -b {}", ctx.socat_block);
    }
}

// ---------------------------------------------------------------------------------------
// The three transfers
// ---------------------------------------------------------------------------------------

/// `qpunch receive --once` listening, then `qpunch send` timed until both exit.
fn run_qpunch(ctx: &Ctx) -> anyhow::Result<Sample> {
    let out = fresh_dir(&ctx.dir.join("inbox-qpunch"))?;
    let mut receiver = Proc::spawn(
        "receive",
        Command::new(&ctx.bin)
            .args(["receive", "--bind", "127.0.0.1", "--port", "0", "--out"])
            .arg(&out)
            .args(["--yes", "--once", "--json"])
            .args(&ctx.cc_args)
            .env("QPUNCH_HOME", ctx.dir.join("home-recv")),
    )?;
    let listening = loop {
        let line = match receiver.next_line(Duration::from_secs(20)) {
            Ok(line) => line,
            Err(e) => {
                receiver.kill();
                return Err(e.context(format!(
                    "receiver never announced itself; stderr: {}",
                    receiver.finish_stderr()
                )));
            }
        };
        let event: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("receiver printed a non-JSON line: {line:?}"))?;
        if event["event"] == "listening" {
            break event;
        }
    };
    let port = listening["port"]
        .as_u64()
        .context("listening event without a port")?;
    let fingerprint = listening["fingerprint"]
        .as_str()
        .context("listening event without a fingerprint")?
        .to_string();

    let machine = machine_ticks();
    let start = Instant::now();
    let sender = Proc::spawn(
        "send",
        Command::new(&ctx.bin)
            .arg("send")
            .arg(&ctx.source)
            .args(["--to", &format!("127.0.0.1:{port}"), "--peer", &fingerprint])
            .args(["--json", "--quiet"])
            .args(&ctx.cc_args)
            .env("QPUNCH_HOME", ctx.dir.join("home-send")),
    )?;
    let mut procs = [receiver, sender];
    let waited = wait_all(&mut procs, start, ctx);
    let others = others_busy(machine, &procs, start, ctx);
    let [mut receiver, mut sender] = procs;
    let (recv_lines, send_lines) = (receiver.finish_stdout(), sender.finish_stdout());
    let (recv_err, send_err) = (receiver.finish_stderr(), sender.finish_stderr());
    let secs = waited?;
    let mut problems = exit_problems(&[(&receiver, &recv_err), (&sender, &send_err)]);
    for line in recv_lines.iter().chain(&send_lines) {
        if line.contains("\"error\"") {
            problems.push(line.clone());
        }
    }
    let saved_as = recv_lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "received")
        .and_then(|e| e["saved_as"].as_str().map(str::to_string));
    let sent = send_lines.iter().any(|l| l.contains("\"event\":\"sent\""));
    if !sent {
        problems.push("sender reported no verified file".into());
    }
    match saved_as {
        Some(name) => {
            if let Err(e) = verify(ctx, &out.join(name)) {
                problems.push(format!("{e:#}"));
            }
        }
        None => problems.push("receiver reported no received file".into()),
    }
    std::fs::remove_dir_all(&out).ok();
    Ok(sample(
        secs,
        &procs_of(&[&receiver, &sender]),
        others,
        problems,
        String::new(),
    ))
}

/// socat: the listener reads the file and sends it, the connecting side writes it to disk
/// (as `qpunch receive` does).
fn run_socat(ctx: &Ctx) -> anyhow::Result<Sample> {
    let out = fresh_dir(&ctx.dir.join("inbox-socat"))?;
    let dst = out.join("copy.bin");
    let port = common::free_port()?;
    let block = ctx.socat_block.to_string();
    let mut server = Proc::spawn(
        "socat-send",
        Command::new("socat")
            .args(["-u", "-b", &block])
            .arg(format!("FILE:{}", ctx.source.display()))
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={},key={},verify=0",
                ctx.cert_pem.display(),
                ctx.key_pem.display()
            )),
    )?;
    if let Err(e) = common::wait_listening(port, Duration::from_secs(10)) {
        server.kill();
        return Err(e.context(format!("socat stderr: {}", server.finish_stderr())));
    }
    let machine = machine_ticks();
    let start = Instant::now();
    let mut command = if ctx.fsync {
        // `sync FILE` fsyncs just that file; exec keeps the pid, whose CPU time then
        // includes socat's (a waited-for child).
        let mut sh = Command::new("sh");
        sh.args([
            "-c",
            r#"socat "$@" && exec sync -- "$QPUNCH_BENCH_DST""#,
            "sh",
        ])
        .env("QPUNCH_BENCH_DST", &dst);
        sh
    } else {
        Command::new("socat")
    };
    command
        .args(["-d", "-d", "-u", "-b", &block])
        .arg(format!("OPENSSL:127.0.0.1:{port},verify=0"))
        .arg(format!("CREATE:{}", dst.display()));
    let client = Proc::spawn("socat-recv", &mut command)?;
    let mut procs = [server, client];
    let waited = wait_all(&mut procs, start, ctx);
    let others = others_busy(machine, &procs, start, ctx);
    let [mut server, mut client] = procs;
    let (server_err, client_err) = (server.finish_stderr(), client.finish_stderr());
    let secs = waited?;
    let mut problems = exit_problems(&[(&server, &server_err), (&client, &client_err)]);
    if let Err(e) = verify(ctx, &dst) {
        problems.push(format!("{e:#}"));
    }
    // "SSL proto version used: TLSv1.3" and "SSL connection using TLS_AES_256_GCM_SHA384".
    let find = |key: &str| {
        client_err
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_string()))
    };
    let note = match (
        find("SSL proto version used:"),
        find("SSL connection using"),
    ) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        (None, Some(c)) => c,
        _ => String::new(),
    };
    std::fs::remove_dir_all(&out).ok();
    Ok(sample(
        secs,
        &procs_of(&[&server, &client]),
        others,
        problems,
        note,
    ))
}

/// This binary re-executed: a blocking rustls server that sends the file, and a client
/// that writes it to disk.
fn run_rust(ctx: &Ctx) -> anyhow::Result<Sample> {
    let out = fresh_dir(&ctx.dir.join("inbox-rustls"))?;
    let dst = out.join("copy.bin");
    let me = std::env::current_exe().context("cannot find the bench binary")?;
    let mut server = Proc::spawn(
        "tls-send",
        Command::new(&me)
            .env(ROLE_ENV, "tls-server")
            .env("QPUNCH_BENCH_SRC", &ctx.source)
            .env("QPUNCH_BENCH_CERT", &ctx.cert_der)
            .env("QPUNCH_BENCH_KEY", &ctx.key_der),
    )?;
    let line = match server.next_line(Duration::from_secs(20)) {
        Ok(line) => line,
        Err(e) => {
            server.kill();
            return Err(e.context(format!("tls server stderr: {}", server.finish_stderr())));
        }
    };
    let port: u16 = line
        .strip_prefix("port ")
        .and_then(|p| p.trim().parse().ok())
        .with_context(|| format!("tls server printed {line:?}"))?;
    let machine = machine_ticks();
    let start = Instant::now();
    let client = Proc::spawn(
        "tls-recv",
        Command::new(&me)
            .env(ROLE_ENV, "tls-client")
            .env("QPUNCH_BENCH_PORT", port.to_string())
            .env("QPUNCH_BENCH_FSYNC", if ctx.fsync { "1" } else { "0" })
            .env("QPUNCH_BENCH_DST", &dst),
    )?;
    let mut procs = [server, client];
    let waited = wait_all(&mut procs, start, ctx);
    let others = others_busy(machine, &procs, start, ctx);
    let [mut server, mut client] = procs;
    let client_out = client.finish_stdout();
    let (server_err, client_err) = (server.finish_stderr(), client.finish_stderr());
    let secs = waited?;
    let mut problems = exit_problems(&[(&server, &server_err), (&client, &client_err)]);
    if let Err(e) = verify(ctx, &dst) {
        problems.push(format!("{e:#}"));
    }
    let note = client_out
        .iter()
        .find_map(|l| l.strip_prefix("cipher ").map(str::to_string))
        .unwrap_or_default();
    std::fs::remove_dir_all(&out).ok();
    Ok(sample(
        secs,
        &procs_of(&[&server, &client]),
        others,
        problems,
        note,
    ))
}

fn sample(
    secs: f64,
    procs: &[ProcTimes],
    others: Option<f64>,
    problems: Vec<String>,
    note: String,
) -> Sample {
    let ok = problems.is_empty();
    Sample {
        secs,
        ok,
        procs: procs.to_vec(),
        others,
        note: if ok { note } else { problems.join("; ") },
    }
}

fn procs_of(procs: &[&Proc]) -> Vec<ProcTimes> {
    procs
        .iter()
        .map(|p| (p.name.to_string(), p.exit_secs, p.cpu))
        .collect()
}

/// The output must have the source's size and BLAKE3.
/// One line per process that did not exit successfully, with its stderr.
fn exit_problems(procs: &[(&Proc, &String)]) -> Vec<String> {
    procs
        .iter()
        .filter_map(|(p, err)| {
            let status = p.status.expect("waited");
            (!status.success()).then(|| format!("{} exited with {status}: {}", p.name, err.trim()))
        })
        .collect()
}

fn verify(ctx: &Ctx, path: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(path)
        .with_context(|| format!("no output file {}", path.display()))?
        .len();
    ensure!(
        size == ctx.bytes,
        "{} has {size} bytes, expected {}",
        path.display(),
        ctx.bytes
    );
    let hash = hash_file(path)?;
    ensure!(
        hash == ctx.hash,
        "{} has BLAKE3 {}, the source {}",
        path.display(),
        hash.to_hex(),
        ctx.hash.to_hex()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// A spawned process with its output collected by threads.
struct Proc {
    name: &'static str,
    child: Child,
    lines: Option<Receiver<String>>,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
    status: Option<ExitStatus>,
    exit_secs: f64,
    cpu: Option<(f64, f64)>,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Proc> {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let stdout: ChildStdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let (tx, rx) = mpsc::channel();
        let stdout = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Proc {
            name,
            child,
            lines: Some(rx),
            stdout: Some(stdout),
            stderr: Some(stderr),
            status: None,
            exit_secs: f64::NAN,
            cpu: None,
        })
    }

    fn next_line(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let rx = self.lines.as_ref().expect("stdout not finished");
        match rx.recv_timeout(timeout) {
            Ok(line) => Ok(line),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("{}: no output in {timeout:?}", self.name)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                bail!("{}: stdout closed (exited?)", self.name)
            }
        }
    }

    /// Every stdout line not read yet (after the process exited).
    fn finish_stdout(&mut self) -> Vec<String> {
        if let Some(handle) = self.stdout.take() {
            let _ = handle.join();
        }
        self.lines
            .take()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }

    fn finish_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.status.is_none() {
            self.kill();
        }
    }
}

/// Wait until every process exited; returns seconds from `start` to the last exit. Each
/// exit is noticed while the process is still a zombie, so its CPU time can be read.
fn wait_all(procs: &mut [Proc], start: Instant, ctx: &Ctx) -> anyhow::Result<f64> {
    loop {
        let mut running = false;
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            let pid = p.child.id();
            match proc_stat(pid, ctx.clk_tck) {
                Some(('Z', cpu)) => {
                    let at = start.elapsed().as_secs_f64();
                    p.status = Some(p.child.wait()?);
                    p.exit_secs = at;
                    p.cpu = Some(cpu);
                }
                Some(_) => running = true,
                None => match p.child.try_wait()? {
                    Some(status) => {
                        p.exit_secs = start.elapsed().as_secs_f64();
                        p.status = Some(status);
                    }
                    None => running = true,
                },
            }
        }
        if !running {
            return Ok(procs.iter().map(|p| p.exit_secs).fold(0.0, f64::max));
        }
        if start.elapsed() > ctx.timeout {
            let names: Vec<_> = procs
                .iter_mut()
                .filter(|p| p.status.is_none())
                .map(|p| {
                    p.kill();
                    p.name
                })
                .collect();
            for p in procs.iter_mut() {
                if p.status.is_none() {
                    p.status = p.child.try_wait().ok().flatten();
                }
            }
            bail!("timed out after {:?}: {names:?} killed", ctx.timeout);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// State and (user, system) CPU seconds of a process, from /proc (None if unreadable).
fn proc_stat(pid: u32, clk_tck: f64) -> Option<(char, (f64, f64))> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // utime, stime, then cutime, cstime: children waited for (socat under sh).
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    let user = ticks(11)? + ticks(13)?;
    let sys = ticks(12)? + ticks(14)?;
    Some((state, (user / clk_tck, sys / clk_tck)))
}

/// Busy CPU ticks of the whole machine (all cores), from /proc/stat.
fn machine_ticks() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let values: Vec<f64> = text
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal: all but idle and iowait.
    Some(values.iter().sum::<f64>() - values.get(3)? - values.get(4)?)
}

/// Cores kept busy during a transfer by processes other than its own (our processes' CPU
/// includes their few milliseconds of start-up before `start`, a slight underestimate).
fn others_busy(before: Option<f64>, procs: &[Proc], start: Instant, ctx: &Ctx) -> Option<f64> {
    let busy = (machine_ticks()? - before?) / ctx.clk_tck;
    let ours: f64 = procs
        .iter()
        .map(|p| p.cpu.map(|(u, s)| u + s))
        .sum::<Option<f64>>()?;
    let secs = start.elapsed().as_secs_f64();
    Some(((busy - ours) / secs).max(0.0))
}

fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

fn socat_version() -> Option<String> {
    let out = Command::new("socat").arg("-V").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .find(|l| l.starts_with("socat version"))
        .map(|l| l.split(" on ").next().unwrap_or(l).trim().to_string())
        .unwrap_or_else(|| "socat".into());
    let openssl = Command::new("openssl")
        .arg("version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    Some(match openssl {
        Some(o) => format!("{version} ({o} installed)"),
        None => version,
    })
}

fn fresh_dir(path: &Path) -> anyhow::Result<PathBuf> {
    if path.exists() {
        std::fs::remove_dir_all(path)?;
    }
    std::fs::create_dir_all(path)?;
    Ok(path.to_path_buf())
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

fn hash_file(path: &Path) -> anyhow::Result<blake3::Hash> {
    let mut hasher = blake3::Hasher::new();
    hasher
        .update_mmap_rayon(path)
        .with_context(|| format!("cannot hash {}", path.display()))?;
    Ok(hasher.finalize())
}

// ---------------------------------------------------------------------------------------
// The in-tree rustls baseline (this binary re-executed with QPUNCH_BENCH_ROLE)
// ---------------------------------------------------------------------------------------

fn env_path(name: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .with_context(|| format!("{name} not set"))
}

/// A TCP stream whose reads go through a large buffer (rustls reads a few KiB at a time)
/// and whose writes, vectored included, go straight to the socket.
struct BufTcp {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl BufTcp {
    fn new(tcp: TcpStream) -> std::io::Result<Self> {
        Ok(BufTcp {
            writer: tcp.try_clone()?,
            reader: BufReader::with_capacity(RUST_CHUNK, tcp),
        })
    }
}

impl Read for BufTcp {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for BufTcp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.writer.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.writer.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.writer.flush()
    }
}

fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Listen, print `port N`, serve the file to one client over TLS, then close cleanly.
fn tls_server() -> anyhow::Result<()> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let source = env_path("QPUNCH_BENCH_SRC")?;
    let cert = CertificateDer::from(std::fs::read(env_path("QPUNCH_BENCH_CERT")?)?);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(std::fs::read(env_path(
        "QPUNCH_BENCH_KEY",
    )?)?));
    let config = rustls::ServerConfig::builder_with_provider(ring_provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "port {}", listener.local_addr()?.port())?;
        stdout.flush()?;
    }
    let (tcp, _) = listener.accept()?;
    let conn = rustls::ServerConnection::new(Arc::new(config))?;
    let mut tls = rustls::StreamOwned::new(conn, BufTcp::new(tcp)?);
    let mut file = File::open(&source)?;
    let mut buf = vec![0u8; RUST_CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        tls.write_all(&buf[..n])?;
    }
    tls.conn.send_close_notify();
    tls.flush()?;
    while tls.conn.wants_write() {
        tls.conn.write_tls(&mut tls.sock)?;
    }
    tls.sock.writer.shutdown(std::net::Shutdown::Write)?;
    // Wait for the client to hang up, so no unread byte turns our close into a reset.
    let mut sink = [0u8; 4096];
    while matches!(tls.sock.reader.read(&mut sink), Ok(n) if n > 0) {}
    Ok(())
}

/// Connect, write everything until close_notify to the file, print the cipher.
fn tls_client() -> anyhow::Result<()> {
    let port: u16 = std::env::var("QPUNCH_BENCH_PORT")
        .context("QPUNCH_BENCH_PORT not set")?
        .parse()?;
    let dst = env_path("QPUNCH_BENCH_DST")?;
    let provider = ring_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)))
        .with_no_client_auth();
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    let name = rustls::pki_types::ServerName::try_from("localhost")?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut tls = rustls::StreamOwned::new(conn, BufTcp::new(tcp)?);
    let mut out = File::create(&dst)?;
    let mut buf = vec![0u8; RUST_CHUNK];
    loop {
        let n = tls.read(&mut buf).context("TLS read")?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
    }
    if std::env::var("QPUNCH_BENCH_FSYNC").as_deref() != Ok("0") {
        out.sync_all()?;
    }
    let version = tls
        .conn
        .protocol_version()
        .map(|v| format!("{v:?}"))
        .unwrap_or_default();
    let suite = tls
        .conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    println!("cipher {version} {suite}");
    Ok(())
}

/// The baseline measures transport cost only: any server certificate is fine.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
