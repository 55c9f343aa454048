//! Throughput benchmark: `qpunch send` → `qpunch receive` over loopback, against a
//! TLS-over-TCP copy of the same file (socat with OpenSSL when installed, else a small
//! blocking rustls copy that re-executes this very binary as server and client).
//!
//! Run with `cargo bench --bench transfer`. Knobs (environment):
//! - `QPUNCH_BENCH_MODE`: what is sent and how:
//!   - `repeat` (default): the same source file every run, so from the second run on the
//!     sender's tree cache already has its hash (files of 4 MiB and more are cached);
//!   - `first`: every qpunch run is a first send, of a file its sender never hashed: the
//!     sender's tree cache (`<QPUNCH_HOME>/cache`) is deleted before each run, outside the
//!     timing (its identity stays, created before the first run like the receiver's).
//!     Targets: >= 1.0x synced socat (`QPUNCH_BENCH_FSYNC=1`) and >= 0.9x plain socat
//!     (`QPUNCH_BENCH_FSYNC=0`);
//!   - `stdin`: `qpunch send - --name NAME` with the source file as its standard input
//!     (nothing to cache); the baselines read the file as in the other modes. Same targets
//!     as `first`. Needs a qpunch whose `send` reads standard input (checked first: the
//!     bench stops with an error when `qpunch send --help` lists no `--name`);
//!   - `small-files`: a folder of `QPUNCH_BENCH_FILES` files of `QPUNCH_BENCH_FILE_BYTES`
//!     random bytes each, in subfolders of 100 files: `qpunch send DIR` against
//!     `tar c | socat` (OpenSSL) into `socat | tar x`, which with `QPUNCH_BENCH_FSYNC=1`
//!     runs `sync -f` (syncfs) on its output before it counts as done, as qpunch's
//!     receiver does per batch. The sender's tree cache is deleted before each run too (a
//!     first send of the folder), and every run writes to a folder of its own, deleted only
//!     at the end (deleting many files would keep the disk busy during the next run).
//!     Reports files/s as well as MB/s (payload bytes); target >= 0.9x tar | socat. Only the
//!     socat baseline exists for this mode;
//! - `QPUNCH_BENCH_BYTES`: file size, e.g. `1G` (default), `256M`, `64k` or plain bytes
//!   (suffixes are powers of 1024); not used by `small-files`;
//! - `QPUNCH_BENCH_FILES`: number of files of `small-files` (default 10000);
//! - `QPUNCH_BENCH_FILE_BYTES`: size of each file of `small-files`, same syntax as
//!   `QPUNCH_BENCH_BYTES` (default 4096);
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
//! against the source's BLAKE3 (outside the timing; for `small-files`, a BLAKE3 over every
//! file's relative path and contents). The sources are flushed to disk (`sync -f`) before
//! the first run, so no run's fsync pays for writing them. Each run also reports the CPU time of
//! both processes and how many cores *other* processes kept busy meanwhile: on a shared
//! machine that contention, not the protocol, can dominate the figures. Throughput is in
//! decimal MB/s (1 MB = 10^6 bytes). The exit status is non-zero when any transfer fails or
//! does not verify; the targets (in `repeat`, qpunch at least as fast as the TLS-over-TCP copy,
//! ≥ 1.0×; the other modes' are above) are reported, not asserted (that contention can
//! decide them).

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
/// How long the other processes of a transfer may run on once one has failed.
const AFTER_FAILURE: Duration = Duration::from_secs(3);

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
    fn label(self, mode: Mode) -> &'static str {
        match self {
            Baseline::Socat if mode == Mode::SmallFiles => {
                "tar c | socat/OpenSSL TLS-over-TCP | tar x"
            }
            Baseline::Socat => "socat/OpenSSL TLS-over-TCP",
            Baseline::Rust => "rustls TLS-over-TCP (in-tree)",
        }
    }

    /// The name in per-run lines and ratios.
    fn short(self, mode: Mode) -> &'static str {
        match self {
            Baseline::Socat if mode == Mode::SmallFiles => "tar|socat",
            Baseline::Socat => "socat",
            Baseline::Rust => "rustls",
        }
    }
}

/// The target ratio qpunch/baseline of this mode: the threshold, what it is measured
/// against, and a note on a target that another setting measures.
fn target(mode: Mode, fsync: bool, baseline: &str) -> (f64, String, String) {
    match mode {
        Mode::Repeat => (1.0, String::new(), String::new()),
        Mode::First | Mode::Stdin if fsync => (
            1.0,
            format!(" for a first send against synced {baseline}"),
            format!(
                "; the other first-send target, >= 0.90x against plain {baseline}, is measured with QPUNCH_BENCH_FSYNC=0"
            ),
        ),
        Mode::First | Mode::Stdin => (
            0.9,
            format!(" for a first send against plain {baseline}"),
            format!(
                "; the other first-send target, >= 1.00x against synced {baseline}, is measured with QPUNCH_BENCH_FSYNC=1"
            ),
        ),
        Mode::SmallFiles => (
            0.9,
            format!(
                " against {}{baseline}",
                if fsync { "synced " } else { "plain " }
            ),
            String::new(),
        ),
    }
}

/// What one transfer moves, for headings.
fn amount(ctx: &Ctx) -> String {
    if ctx.mode == Mode::SmallFiles {
        format!("{} files, {:.1} MB", ctx.files, ctx.bytes as f64 / 1e6)
    } else {
        format!("{:.1} MB", ctx.bytes as f64 / 1e6)
    }
}

/// `QPUNCH_BENCH_MODE`: what qpunch sends and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The same file every run (the sender's tree cache knows it from run 2 on).
    Repeat,
    /// A file the sender never hashed: its tree cache is deleted before every run.
    First,
    /// `qpunch send -`: the file is the sender's standard input.
    Stdin,
    /// A folder of many small files against `tar c | socat` into `tar x`.
    SmallFiles,
}

impl Mode {
    fn parse(s: &str) -> anyhow::Result<Mode> {
        Ok(match s.trim() {
            "repeat" | "" => Mode::Repeat,
            "first" => Mode::First,
            "stdin" => Mode::Stdin,
            "small-files" => Mode::SmallFiles,
            other => {
                bail!("QPUNCH_BENCH_MODE={other}: expected repeat, first, stdin or small-files")
            }
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Repeat => "repeat",
            Mode::First => "first",
            Mode::Stdin => "stdin",
            Mode::SmallFiles => "small-files",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Mode::Repeat => {
                "the same source file every run (from run 2 on the sender's tree cache has its hash)"
            }
            Mode::First => {
                "every qpunch run sends a file its sender never hashed (its tree cache is deleted before each run, outside the timing)"
            }
            Mode::Stdin => "qpunch sends its standard input (`send - --name`), the source file",
            Mode::SmallFiles => {
                "a folder of small files (`send DIR`) against tar c | socat into socat | tar x; the sender's tree cache is deleted before each run"
            }
        }
    }

    /// Whether the sender's tree cache is deleted before every qpunch run.
    fn fresh_cache(self) -> bool {
        matches!(self, Mode::First | Mode::SmallFiles)
    }
}

/// The offered name in `stdin` mode.
const STDIN_NAME: &str = "from-stdin.bin";

/// Everything a run needs.
struct Ctx {
    mode: Mode,
    dir: PathBuf,
    /// `--cc NAME` for both qpunch processes, or nothing.
    cc_args: Vec<String>,
    bin: PathBuf,
    /// The file sent, or in `small-files` the folder.
    source: PathBuf,
    /// Payload bytes: the file's size, or the sum of the folder's files.
    bytes: u64,
    /// Files sent per transfer (1 but in `small-files`).
    files: u64,
    /// The file's BLAKE3, or in `small-files` the folder's [`tree_digest`].
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
    let mode = Mode::parse(&std::env::var("QPUNCH_BENCH_MODE").unwrap_or_default())?;
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
    let tree_files: u64 = match std::env::var("QPUNCH_BENCH_FILES") {
        Ok(s) => s.trim().parse().context("QPUNCH_BENCH_FILES")?,
        Err(_) => 10_000,
    };
    ensure!(tree_files > 0, "QPUNCH_BENCH_FILES must be positive");
    let file_bytes = match std::env::var("QPUNCH_BENCH_FILE_BYTES") {
        Ok(s) => common::parse_size(&s).map_err(anyhow::Error::msg)?,
        Err(_) => 4096,
    };
    ensure!(file_bytes > 0, "QPUNCH_BENCH_FILE_BYTES must be positive");
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
    let baselines = if mode == Mode::SmallFiles && baselines.contains(&Baseline::Rust) {
        // Its only baseline is tar | socat.
        ensure!(
            choice.trim() != "rust",
            "QPUNCH_BENCH_MODE=small-files has no rustls baseline (only tar | socat)"
        );
        let kept: Vec<Baseline> = baselines
            .into_iter()
            .filter(|b| *b == Baseline::Socat)
            .collect();
        if kept.is_empty() {
            println!("socat not found: small-files runs without a baseline");
        }
        kept
    } else {
        baselines
    };
    let bin = std::env::var_os("QPUNCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qpunch")));
    ensure!(bin.is_file(), "qpunch binary {} not found", bin.display());
    if mode == Mode::Stdin {
        check_stdin_support(&bin)?;
    }

    let tmp = match std::env::var_os("QPUNCH_BENCH_DIR") {
        Some(base) => tempfile::Builder::new()
            .prefix("qpunch-bench-")
            .tempdir_in(base)?,
        None => tempfile::Builder::new().prefix("qpunch-bench-").tempdir()?,
    };
    let dir = tmp.path().to_path_buf();
    let (source, bytes, files, hash) = if mode == Mode::SmallFiles {
        let source = dir.join("tree-source").join("many");
        let t = Instant::now();
        let folders = generate_tree(&source, tree_files, file_bytes, rand::random())?;
        let gen_secs = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let (files, bytes, hash) = tree_digest(&source)?;
        ensure!(
            files == tree_files,
            "generated {files} files, not {tree_files}"
        );
        println!(
            "source: {} ({files} files of {file_bytes} bytes in {folders} folders, {bytes} bytes) \
             generated in {gen_secs:.2} s, digest (BLAKE3 over paths and contents) {} in {:.2} s",
            source.display(),
            &hash.to_hex()[..16],
            t.elapsed().as_secs_f64()
        );
        (source, bytes, files, hash)
    } else {
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
        (source, bytes, 1, hash)
    };

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
        mode,
        dir: dir.clone(),
        cc_args,
        bin,
        source,
        bytes,
        files,
        hash,
        // Generous: a hang fails the run instead of the whole bench.
        timeout: Duration::from_secs(60)
            + Duration::from_secs_f64(bytes as f64 / 5e6)
            + Duration::from_millis(5) * u32::try_from(files).unwrap_or(u32::MAX),
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
    // The sources' pages reach the disk now, not during the first run that syncs.
    let status = Command::new("sync")
        .arg("-f")
        .arg(&ctx.dir)
        .status()
        .context("cannot run sync")?;
    ensure!(status.success(), "sync -f failed: {status}");

    print_machine(&ctx, socat.as_deref());
    println!("mode {}: {}", mode.name(), mode.describe());
    println!(
        "qpunch receive fsyncs each file before verifying it; baselines fsync their output: {}",
        if fsync {
            "yes"
        } else {
            "no (QPUNCH_BENCH_FSYNC=0)"
        }
    );
    println!(
        "transfers: {runs} run(s) each of {}; baselines: {}",
        amount(&ctx),
        if baselines.is_empty() {
            "none".to_string()
        } else {
            baselines
                .iter()
                .map(|b| b.label(mode))
                .collect::<Vec<_>>()
                .join(", ")
        }
    );

    let mut qpunch_samples = Vec::new();
    let mut baseline_samples: Vec<Vec<Sample>> = vec![Vec::new(); baselines.len()];
    let mut ciphers: Vec<Option<String>> = vec![None; baselines.len()];
    for run in 1..=runs {
        let sample = run_qpunch(&ctx, run).unwrap_or_else(failed);
        print_sample("qpunch", run, &sample, &ctx);
        qpunch_samples.push(sample);
        for (i, baseline) in baselines.iter().enumerate() {
            let sample = match baseline {
                Baseline::Socat if mode == Mode::SmallFiles => run_tar_socat(&ctx, run),
                Baseline::Socat => run_socat(&ctx),
                Baseline::Rust => run_rust(&ctx),
            }
            .unwrap_or_else(failed);
            print_sample(baseline.short(mode), run, &sample, &ctx);
            if sample.ok && ciphers[i].is_none() && !sample.note.is_empty() {
                ciphers[i] = Some(sample.note.clone());
            }
            baseline_samples[i].push(sample);
        }
    }

    println!();
    println!(
        "=== summary ({}, {runs} run(s) each, mode {}) ===",
        amount(&ctx),
        mode.name()
    );
    let all_ok =
        qpunch_samples.iter().all(|s| s.ok) && baseline_samples.iter().flatten().all(|s| s.ok);
    let q = stats(&qpunch_samples, bytes);
    println!(
        "qpunch (QUIC, TLS 1.3 TLS13_AES_128_GCM_SHA256 (preferred) via rustls/ring, {}+receive processes): {}; {}",
        match mode {
            Mode::Repeat | Mode::First => "send FILE",
            Mode::Stdin => "send - <FILE",
            Mode::SmallFiles => "send DIR",
        },
        describe(q, &ctx),
        cpu_summary(&qpunch_samples, bytes)
    );
    for (i, baseline) in baselines.iter().enumerate() {
        let b = stats(&baseline_samples[i], bytes);
        println!(
            "baseline {}: {}; {}; cipher: {}",
            baseline.label(mode),
            describe(b, &ctx),
            cpu_summary(&baseline_samples[i], bytes),
            ciphers[i].as_deref().unwrap_or("unknown")
        );
        if let (Some((q_best, q_median)), Some((b_best, b_median))) = (q, b) {
            let ratio = q_median / b_median;
            let (target, against, other) = target(mode, fsync, baseline.short(mode));
            println!(
                "ratio qpunch/{}: median {:.2}x, best {:.2}x (target >= {target:.2}x{against}: {}){other}",
                baseline.short(mode),
                ratio,
                q_best / b_best,
                if ratio >= target { "met" } else { "NOT met" }
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

fn describe(stats: Option<(f64, f64)>, ctx: &Ctx) -> String {
    match stats {
        Some((best, median)) if ctx.mode == Mode::SmallFiles => {
            // Files per second are proportional to MB/s: the same runs are best and median.
            let files = |mbps: f64| mbps * 1e6 / ctx.bytes as f64 * ctx.files as f64;
            format!(
                "best {best:.1} MB/s {:.0} files/s, median {median:.1} MB/s {:.0} files/s",
                files(best),
                files(median)
            )
        }
        Some((best, median)) => format!("best {best:.1} MB/s, median {median:.1} MB/s"),
        None => "no verified run".to_string(),
    }
}

fn print_sample(name: &str, run: usize, sample: &Sample, ctx: &Ctx) {
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
    let files = if ctx.mode == Mode::SmallFiles {
        format!("  {:8.0} files/s", ctx.files as f64 / sample.secs)
    } else {
        String::new()
    };
    println!(
        "{name:>7} run {run}: {:8.1} MB/s{files}  {:.3} s  verified  [{procs}]{others}",
        sample.mbps(ctx.bytes),
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
// The transfers
// ---------------------------------------------------------------------------------------

/// Where run `run` of a transfer writes: one folder reused (and emptied after each run), or
/// in `small-files` one per run, left until the end (deleting many files keeps the disk busy
/// during whatever comes next).
fn inbox(ctx: &Ctx, name: &str, run: usize) -> anyhow::Result<PathBuf> {
    if ctx.mode == Mode::SmallFiles {
        fresh_dir(&ctx.dir.join(format!("{name}-{run}")))
    } else {
        fresh_dir(&ctx.dir.join(name))
    }
}

/// Empty the inbox after a run, unless it is kept until the end (see [`inbox`]).
fn done_with(ctx: &Ctx, out: &Path) {
    if ctx.mode != Mode::SmallFiles {
        std::fs::remove_dir_all(out).ok();
    }
}

/// `qpunch receive --once` listening, then `qpunch send` timed until both exit.
fn run_qpunch(ctx: &Ctx, run: usize) -> anyhow::Result<Sample> {
    let send_home = ctx.dir.join("home-send");
    if ctx.mode.fresh_cache() {
        let cache = qpunch::home::cache_dir(&send_home);
        match std::fs::remove_dir_all(&cache) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).context(format!("cannot delete {}", cache.display())),
        }
    }
    // Opened before the clock starts, as socat's source is.
    let stdin = match ctx.mode {
        Mode::Stdin => Stdio::from(
            File::open(&ctx.source)
                .with_context(|| format!("cannot open {}", ctx.source.display()))?,
        ),
        _ => Stdio::null(),
    };
    let out = inbox(ctx, "inbox-qpunch", run)?;
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

    let mut command = Command::new(&ctx.bin);
    command.arg("send");
    match ctx.mode {
        Mode::Stdin => command.args(["-", "--name", STDIN_NAME]),
        _ => command.arg(&ctx.source),
    };
    command
        .args(["--to", &format!("127.0.0.1:{port}"), "--peer", &fingerprint])
        .args(["--json", "--quiet"])
        .args(&ctx.cc_args)
        .env("QPUNCH_HOME", &send_home);
    let machine = machine_ticks();
    let start = Instant::now();
    let sender = Proc::spawn_with_stdin("send", &mut command, stdin)?;
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
    let events = |lines: &[String], kind: &str| -> Vec<serde_json::Value> {
        lines
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == kind)
            .collect()
    };
    let received = events(&recv_lines, "received");
    let sent = events(&send_lines, "sent").len() as u64;
    if sent != ctx.files {
        problems.push(format!(
            "sender reported {sent} verified file(s), expected {}",
            ctx.files
        ));
    }
    if received.len() as u64 != ctx.files {
        problems.push(format!(
            "receiver reported {} received file(s), expected {}",
            received.len(),
            ctx.files
        ));
    }
    let saved_as = received
        .first()
        .and_then(|e| e["saved_as"].as_str().map(str::to_string));
    if ctx.mode == Mode::Stdin
        && let Some(name) = received.first().and_then(|e| e["name"].as_str())
        && name != STDIN_NAME
    {
        problems.push(format!("offered as {STDIN_NAME:?}, received as {name:?}"));
    }
    match saved_as {
        // The folder arrives under its own name: the first component of any file's saved_as.
        Some(name) if ctx.mode == Mode::SmallFiles => {
            let top = Path::new(&name).components().next().map(|c| c.as_os_str());
            match top {
                Some(top) => {
                    if let Err(e) = verify_tree(ctx, &out.join(top)) {
                        problems.push(format!("{e:#}"));
                    }
                }
                None => problems.push(format!("received a file saved as {name:?}")),
            }
        }
        Some(name) => {
            if let Err(e) = verify(ctx, &out.join(name)) {
                problems.push(format!("{e:#}"));
            }
        }
        None => problems.push("receiver reported no received file".into()),
    }
    done_with(ctx, &out);
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
    let note = socat_cipher(&client_err);
    std::fs::remove_dir_all(&out).ok();
    Ok(sample(
        secs,
        &procs_of(&[&server, &client]),
        others,
        problems,
        note,
    ))
}

/// The TLS version and cipher a `socat -d -d` connecting side reported on stderr.
fn socat_cipher(stderr: &str) -> String {
    // "SSL proto version used: TLSv1.3" and "SSL connection using TLS_AES_256_GCM_SHA384".
    let find = |key: &str| {
        stderr
            .lines()
            .find_map(|l| l.split_once(key).map(|(_, v)| v.trim().to_string()))
    };
    match (
        find("SSL proto version used:"),
        find("SSL connection using"),
    ) {
        (Some(v), Some(c)) => format!("{v} {c}"),
        (None, Some(c)) => c,
        _ => String::new(),
    }
}

/// `small-files`' baseline: `socat OPENSSL-LISTEN | tar x` (then `sync -f` on its output
/// when fsyncing) listening, then `tar c | socat OPENSSL` timed until both exit. The
/// listener receives, as `qpunch receive` does; both are shells whose CPU time includes
/// their pipelines' (waited-for children).
fn run_tar_socat(ctx: &Ctx, run: usize) -> anyhow::Result<Sample> {
    let out = inbox(ctx, "inbox-tar", run)?;
    let port = common::free_port()?;
    let block = ctx.socat_block.to_string();
    let parent = ctx.source.parent().context("the folder has no parent")?;
    let top = ctx.source.file_name().context("the folder has no name")?;
    let mut listen = String::from(
        r#"socat -u -b "$B" "OPENSSL-LISTEN:$PORT,bind=127.0.0.1,reuseaddr,cert=$CERT,key=$KEY,verify=0" - | tar x -C "$OUT""#,
    );
    if ctx.fsync {
        // syncfs of the output's file system, as qpunch's receiver does per batch.
        listen.push_str(r#" && sync -f "$OUT""#);
    }
    let mut server = Proc::spawn(
        "tar-recv",
        Command::new("sh")
            .args(["-c", &listen])
            .env("B", &block)
            .env("PORT", port.to_string())
            .env("CERT", &ctx.cert_pem)
            .env("KEY", &ctx.key_pem)
            .env("OUT", &out),
    )?;
    if let Err(e) = common::wait_listening(port, Duration::from_secs(10)) {
        server.kill();
        return Err(e.context(format!("socat stderr: {}", server.finish_stderr())));
    }
    let machine = machine_ticks();
    let start = Instant::now();
    let client = Proc::spawn(
        "tar-send",
        Command::new("sh")
            .args([
                "-c",
                r#"tar c -C "$PARENT" -- "$TOP" | socat -d -d -u -b "$B" - "OPENSSL:127.0.0.1:$PORT,verify=0""#,
            ])
            .env("PARENT", parent)
            .env("TOP", top)
            .env("B", &block)
            .env("PORT", port.to_string()),
    )?;
    let mut procs = [server, client];
    let waited = wait_all(&mut procs, start, ctx);
    let others = others_busy(machine, &procs, start, ctx);
    let [mut server, mut client] = procs;
    let (server_err, client_err) = (server.finish_stderr(), client.finish_stderr());
    let secs = waited?;
    let mut problems = exit_problems(&[(&server, &server_err), (&client, &client_err)]);
    if let Err(e) = verify_tree(ctx, &out.join(top)) {
        problems.push(format!("{e:#}"));
    }
    let note = socat_cipher(&client_err);
    done_with(ctx, &out);
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
/// Processes [`wait_all`] killed because another one failed come last: they only followed.
fn exit_problems(procs: &[(&Proc, &String)]) -> Vec<String> {
    let mut problems: Vec<(bool, String)> = procs
        .iter()
        .filter_map(|(p, err)| {
            let status = p.status.expect("waited");
            (!status.success()).then(|| {
                if p.killed_after_failure {
                    (
                        true,
                        format!("{} killed: another process failed first", p.name),
                    )
                } else {
                    (
                        false,
                        format!("{} exited with {status}: {}", p.name, err.trim()),
                    )
                }
            })
        })
        .collect();
    problems.sort_by_key(|(followed, _)| *followed);
    problems.into_iter().map(|(_, text)| text).collect()
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
    /// Killed by [`wait_all`] once another process of the transfer had failed.
    killed_after_failure: bool,
}

impl Proc {
    fn spawn(name: &'static str, command: &mut Command) -> anyhow::Result<Proc> {
        Self::spawn_with_stdin(name, command, Stdio::null())
    }

    fn spawn_with_stdin(
        name: &'static str,
        command: &mut Command,
        stdin: Stdio,
    ) -> anyhow::Result<Proc> {
        let mut child = command
            .stdin(stdin)
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
            killed_after_failure: false,
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
/// exit is noticed while the process is still a zombie, so its CPU time can be read. Once
/// one has failed, the others get [`AFTER_FAILURE`] to end on their own and are then
/// killed (a receiver whose sender failed to start would otherwise wait for the timeout);
/// their exit statuses tell [`exit_problems`] what happened.
fn wait_all(procs: &mut [Proc], start: Instant, ctx: &Ctx) -> anyhow::Result<f64> {
    let mut failed_at: Option<Instant> = None;
    loop {
        if failed_at.is_none() && procs.iter().any(|p| p.status.is_some_and(|s| !s.success())) {
            failed_at = Some(Instant::now());
        }
        if failed_at.is_some_and(|at| at.elapsed() > AFTER_FAILURE) {
            for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                p.kill();
                p.killed_after_failure = true;
                p.exit_secs = start.elapsed().as_secs_f64();
                p.status = p.child.try_wait().ok().flatten();
            }
        }
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

/// `stdin` mode needs `qpunch send - --name NAME`: stop before any run, with a clear error,
/// when this binary's `send --help` does not list `--name`.
fn check_stdin_support(bin: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .args(["send", "--help"])
        .output()
        .with_context(|| format!("cannot run {} send --help", bin.display()))?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && help.contains("--name"),
        "QPUNCH_BENCH_MODE=stdin needs `qpunch send - --name NAME` (reading standard input), \
         and {} does not offer it: its `send --help` lists no --name. Build a qpunch that has \
         it (or point QPUNCH_BIN at one), or pick another QPUNCH_BENCH_MODE",
        bin.display()
    );
    Ok(())
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

/// `files` files of `size` pseudo-random bytes under `root`, 100 to a subfolder; returns
/// the number of subfolders.
fn generate_tree(root: &Path, files: u64, size: u64, seed: u64) -> anyhow::Result<u64> {
    const PER_FOLDER: u64 = 100;
    let mut folder = root.to_path_buf();
    for i in 0..files {
        if i % PER_FOLDER == 0 {
            folder = root.join(format!("d{:04}", i / PER_FOLDER));
            std::fs::create_dir_all(&folder)
                .with_context(|| format!("cannot create {}", folder.display()))?;
        }
        common::generate(
            &folder.join(format!("f{i:06}.bin")),
            size,
            seed.wrapping_add(i),
        )?;
    }
    Ok(files.div_ceil(PER_FOLDER))
}

/// Files, bytes and one BLAKE3 over every regular file under `root`: its path relative to
/// `root`, its size and its contents, in path order. Anything but folders and regular files
/// is an error (neither side should make one).
fn tree_digest(root: &Path) -> anyhow::Result<(u64, u64, blake3::Hash)> {
    let mut found = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(&folder)
            .with_context(|| format!("cannot list {}", folder.display()))?;
        for entry in entries {
            let entry = entry?;
            let kind = entry.file_type()?;
            let path = entry.path();
            if kind.is_dir() {
                folders.push(path);
            } else if kind.is_file() {
                found.push(path);
            } else {
                bail!("{} is neither a file nor a folder", path.display());
            }
        }
    }
    let mut relative: Vec<(PathBuf, PathBuf)> = found
        .into_iter()
        .map(|p| Ok((p.strip_prefix(root)?.to_path_buf(), p)))
        .collect::<anyhow::Result<_>>()?;
    relative.sort();
    let mut hasher = blake3::Hasher::new();
    let mut bytes = 0;
    for (rel, path) in &relative {
        use std::os::unix::ffi::OsStrExt;
        let name = rel.as_os_str().as_bytes();
        let mut file =
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let size = file.metadata()?.len();
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name);
        hasher.update(&size.to_le_bytes());
        let copied = std::io::copy(&mut file, &mut hasher)?;
        ensure!(copied == size, "{} changed while hashed", path.display());
        bytes += size;
    }
    Ok((relative.len() as u64, bytes, hasher.finalize()))
}

/// The folder at `path` must hold the source folder's files, paths and bytes.
fn verify_tree(ctx: &Ctx, path: &Path) -> anyhow::Result<()> {
    let (files, bytes, hash) = tree_digest(path)?;
    ensure!(
        files == ctx.files && bytes == ctx.bytes,
        "{} has {files} files of {bytes} bytes, expected {} of {}",
        path.display(),
        ctx.files,
        ctx.bytes
    );
    ensure!(
        hash == ctx.hash,
        "{} has digest {}, the source {} (a path or a file's bytes differ)",
        path.display(),
        &hash.to_hex()[..16],
        &ctx.hash.to_hex()[..16]
    );
    Ok(())
}

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
