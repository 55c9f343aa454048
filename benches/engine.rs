//! The transfer engine at scale, with the real `qpunch` binary over loopback:
//!
//! - `small`: 10,000 files of 4 KiB in one folder, `qpunch send DIR` against
//!   `tar c | socat` over TLS (OpenSSL) into `tar x`, both made durable (`sync -f`, the
//!   same `syncfs` qpunch uses) before they count as done. Target: qpunch >= 0.5x.
//! - `memory`: peak RSS (`ru_maxrss`, file-mapped pages included) of both sides for
//!   1 GiB and 4 GiB files, and what dominates it (peak `RssAnon`/`RssFile` sampled
//!   from `/proc`). Target: <= 64 MiB each side, not growing with the file size.
//! - `crowd`: 20 senders of 64 MiB each at once to one receiver: all verified, the spread
//!   of their finish times, and the receiver's peak RSS.
//!
//! Run with `cargo bench --bench engine` (all three) or `cargo bench --bench engine --
//! small` (or `memory`, `crowd`). Knobs: `QPUNCH_BENCH_DIR` (where files go, default the
//! system's temp dir; the memory run needs 8 GiB there), `QPUNCH_BENCH_RUNS` (repeats of
//! `small`, default 3), `QPUNCH_BENCH_SENDERS` / `QPUNCH_BENCH_CROWD_BYTES` (crowd, default
//! 20 and 64M), `QPUNCH_BIN` (default: the binary cargo built). Figures are printed; the
//! exit status says only whether every transfer verified.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn main() -> ExitCode {
    let which: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let all = which.is_empty();
    let mut ok = true;
    for (name, run) in [
        ("small", small as fn() -> anyhow::Result<()>),
        ("memory", memory),
        ("crowd", crowd),
    ] {
        if all || which.iter().any(|w| w == name) {
            println!("\n=== {name} ===");
            if let Err(e) = run() {
                println!("{name}: FAILED: {e:#}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn bin() -> PathBuf {
    std::env::var_os("QPUNCH_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_qpunch")))
}

fn workdir() -> anyhow::Result<tempfile::TempDir> {
    let base = std::env::var_os("QPUNCH_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    Ok(tempfile::Builder::new()
        .prefix("qpunch-bench-")
        .tempdir_in(base)?)
}

/// A child process with its JSON events read on a thread, its peak RSS taken at exit.
struct Qp {
    child: Child,
    events: mpsc::Receiver<Value>,
    seen: Vec<Value>,
    sampler: Sampler,
}

impl Qp {
    fn spawn(home: &Path, args: &[&str]) -> anyhow::Result<Qp> {
        let mut child = Command::new(bin())
            .args(args)
            .env("QPUNCH_HOME", home)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start qpunch")?;
        let stdout = child.stdout.take().expect("piped");
        let (tx, events) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str::<Value>(&line)
                    && tx.send(v).is_err()
                {
                    break;
                }
            }
        });
        let sampler = Sampler::start(child.id());
        Ok(Qp {
            child,
            events,
            seen: Vec::new(),
            sampler,
        })
    }

    fn wait_event(&mut self, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .with_context(|| format!("no {kind} event"))?;
            self.seen.push(event.clone());
            if event["event"] == kind {
                return Ok(event);
            }
        }
    }

    /// Wait for the exit: success, peak RSS in MiB (`ru_maxrss`), and every event.
    fn finish(mut self) -> anyhow::Result<Finished> {
        let mut status = 0;
        // SAFETY: a zeroed rusage is a valid out-parameter.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on our own child, which has not been reaped.
        let pid = unsafe { libc::wait4(self.child.id() as i32, &mut status, 0, &mut usage) };
        ensure!(pid > 0, "wait4 failed");
        let (anon, file) = self.sampler.stop();
        while let Ok(event) = self.events.recv_timeout(Duration::from_secs(1)) {
            self.seen.push(event);
        }
        Ok(Finished {
            ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            peak_mib: usage.ru_maxrss as f64 / 1024.0,
            anon_mib: anon,
            file_mib: file,
            events: self.seen,
        })
    }

    /// A `--once` receiver waits for an accepted transfer: when the sender failed (a
    /// decline, say), stop it rather than wait forever.
    fn finish_after(self, sender: &Finished) -> anyhow::Result<Finished> {
        if !sender.ok {
            self.signal(libc::SIGINT);
        }
        self.finish()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }
}

struct Finished {
    ok: bool,
    peak_mib: f64,
    anon_mib: f64,
    file_mib: f64,
    events: Vec<Value>,
}

impl Finished {
    fn event(&self, kind: &str) -> Option<&Value> {
        self.events.iter().rev().find(|e| e["event"] == kind)
    }

    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "error")
            .map(|e| e["message"].to_string())
            .collect()
    }
}

/// Peak `RssAnon` and `RssFile` of a process, sampled every 20 ms.
struct Sampler {
    stop: Arc<AtomicBool>,
    anon: Arc<AtomicU64>,
    file: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(pid: u32) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let (anon, file) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = {
            let (stop, anon, file) = (stop.clone(), anon.clone(), file.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                        for (field, max) in [("RssAnon:", &anon), ("RssFile:", &file)] {
                            if let Some(kb) = status.lines().find_map(|l| {
                                l.strip_prefix(field)?
                                    .split_whitespace()
                                    .next()?
                                    .parse()
                                    .ok()
                            }) {
                                max.fetch_max(kb, Ordering::SeqCst);
                            }
                        }
                    }
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Sampler {
            stop,
            anon,
            file,
            thread: Some(thread),
        }
    }

    /// Peak anonymous and file-backed RSS seen, in MiB.
    fn stop(&mut self) -> (f64, f64) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (
            self.anon.load(Ordering::SeqCst) as f64 / 1024.0,
            self.file.load(Ordering::SeqCst) as f64 / 1024.0,
        )
    }
}

/// `qpunch receive --json --yes` on loopback; returns it with its port and fingerprint.
fn receiver(home: &Path, out: &Path, once: bool) -> anyhow::Result<(Qp, u16, String)> {
    let mut args = vec![
        "receive",
        "--bind",
        "127.0.0.1",
        "--port",
        "0",
        "--json",
        "--yes",
        "--out",
    ];
    let out = out.to_str().context("UTF-8 path")?;
    args.push(out);
    if once {
        args.push("--once");
    }
    let mut rx = Qp::spawn(home, &args)?;
    let listening = rx.wait_event("listening", Duration::from_secs(30))?;
    let port = listening["port"].as_u64().context("port")? as u16;
    let fp = listening["fingerprint"].as_str().context("fp")?.to_string();
    Ok((rx, port, fp))
}

fn sender(home: &Path, paths: &[&Path], port: u16, fp: &str) -> anyhow::Result<Qp> {
    let to = format!("127.0.0.1:{port}");
    let mut args = vec!["send"];
    for p in paths {
        args.push(p.to_str().context("UTF-8 path")?);
    }
    args.extend(["--to", &to, "--peer", fp, "--json"]);
    Qp::spawn(home, &args)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------

fn small() -> anyhow::Result<()> {
    const FILES: usize = 10_000;
    const SIZE: u64 = 4 << 10;
    let runs: usize = std::env::var("QPUNCH_BENCH_RUNS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3);
    let work = workdir()?;
    let src = work.path().join("src");
    let tree = src.join("many");
    std::fs::create_dir_all(&tree)?;
    for i in 0..FILES {
        common::generate(&tree.join(format!("file-{i:05}.bin")), SIZE, i as u64)?;
    }
    let bytes = FILES as u64 * SIZE;
    let (rhome, shome) = (work.path().join("rhome"), work.path().join("shome"));
    let socat = Command::new("socat").arg("-V").output().is_ok();
    let cert = work.path().join("cert.pem");
    let key = work.path().join("key.pem");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    println!(
        "{FILES} files of {} KiB ({:.1} MB), {runs} runs each",
        SIZE >> 10,
        bytes as f64 / 1e6
    );

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let out = work.path().join(format!("out-q{run}"));
        std::fs::create_dir_all(&out)?;
        let (rx, port, fp) = receiver(&rhome, &out, true)?;
        settle();
        let start = Instant::now();
        let tx = sender(&shome, &[&tree], port, &fp)?.finish()?;
        let rx = rx.finish_after(&tx)?;
        let secs = start.elapsed().as_secs_f64();
        ensure!(
            tx.ok && rx.ok,
            "qpunch failed: {:?} {:?}",
            tx.errors(),
            rx.errors()
        );
        let verified = tx.event("summary").map(|s| s["verified"].clone());
        ensure!(
            verified == Some(Value::from(FILES)),
            "not all verified: {verified:?}"
        );
        println!(
            "qpunch      run {run}: {secs:.2} s ({:.1} MB/s); peak RSS sender {:.0} MiB, receiver {:.0} MiB",
            bytes as f64 / 1e6 / secs,
            tx.peak_mib,
            rx.peak_mib
        );
        // Outputs stay until the end: deleting 10,000 files leaves the file system busy
        // for whichever run comes next.
        ours.push(secs);

        if !socat {
            continue;
        }
        let out = work.path().join(format!("out-t{run}"));
        std::fs::create_dir_all(&out)?;
        let port = common::free_port()?;
        let listen = format!(
            "socat -u OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,cert={},key={},verify=0 - \
             | tar x -C {} && sync -f {}",
            cert.display(),
            key.display(),
            out.display(),
            out.display()
        );
        let mut server = Command::new("sh").args(["-c", &listen]).spawn()?;
        common::wait_listening(port, Duration::from_secs(10))?;
        settle();
        let start = Instant::now();
        let send = format!(
            "tar c -C {} many | socat -u - OPENSSL:127.0.0.1:{port},verify=0",
            src.display()
        );
        let client = Command::new("sh").args(["-c", &send]).status()?;
        let served = server.wait()?;
        let secs = start.elapsed().as_secs_f64();
        ensure!(client.success() && served.success(), "tar | socat failed");
        let copied = std::fs::read_dir(out.join("many"))?.count();
        ensure!(copied == FILES, "tar | socat copied {copied} files");
        println!(
            "tar | socat run {run}: {secs:.2} s ({:.1} MB/s)",
            bytes as f64 / 1e6 / secs
        );
        theirs.push(secs);
    }
    let ours = median(ours);
    print!("median: qpunch {ours:.2} s");
    if !theirs.is_empty() {
        let theirs = median(theirs);
        println!(
            ", tar | socat {theirs:.2} s: qpunch at {:.2}x the speed of tar | socat (target >= 0.5x)",
            theirs / ours
        );
    } else {
        println!(" (socat not installed: no baseline)");
    }
    Ok(())
}

fn memory() -> anyhow::Result<()> {
    let work = workdir()?;
    let (rhome, shome) = (work.path().join("rhome"), work.path().join("shome"));
    for size in [1u64 << 30, 4 << 30] {
        let file = work.path().join("big.bin");
        common::generate(&file, size, size)?;
        let out = work.path().join("out");
        std::fs::create_dir_all(&out)?;
        let (rx, port, fp) = receiver(&rhome, &out, true)?;
        let start = Instant::now();
        let tx = sender(&shome, &[&file], port, &fp)?.finish()?;
        let rx = rx.finish_after(&tx)?;
        let secs = start.elapsed().as_secs_f64();
        ensure!(
            tx.ok && rx.ok,
            "failed: {:?} {:?}",
            tx.errors(),
            rx.errors()
        );
        println!(
            "{} GiB in {secs:.1} s ({:.0} MB/s): peak RSS sender {:.1} MiB (anon {:.1}, file {:.1}), receiver {:.1} MiB (anon {:.1}, file {:.1})",
            size >> 30,
            size as f64 / 1e6 / secs,
            tx.peak_mib,
            tx.anon_mib,
            tx.file_mib,
            rx.peak_mib,
            rx.anon_mib,
            rx.file_mib
        );
        std::fs::remove_dir_all(&out)?;
        std::fs::remove_file(&file)?;
        // The second run of the same sender home hits the tree cache; a new file does not.
    }
    Ok(())
}

fn crowd() -> anyhow::Result<()> {
    let senders: usize = std::env::var("QPUNCH_BENCH_SENDERS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(20);
    let size = std::env::var("QPUNCH_BENCH_CROWD_BYTES")
        .ok()
        .and_then(|s| s.trim_end_matches(['M', 'm']).parse::<u64>().ok())
        .map_or(64 * MIB, |m| m * MIB);
    let work = workdir()?;
    let out = work.path().join("out");
    std::fs::create_dir_all(&out)?;
    let mut files = Vec::new();
    for i in 0..senders {
        let file = work.path().join(format!("sender-{i:02}.bin"));
        common::generate(&file, size, 1000 + i as u64)?;
        files.push(file);
    }
    let (rx, port, fp) = receiver(&work.path().join("rhome"), &out, false)?;
    let start = Instant::now();
    let mut txs = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let home = work.path().join(format!("shome-{i:02}"));
        txs.push(sender(&home, &[file], port, &fp)?);
    }
    let (done_tx, done) = mpsc::channel();
    for (i, tx) in txs.into_iter().enumerate() {
        let done_tx = done_tx.clone();
        thread::spawn(move || {
            let finished = tx.finish();
            let _ = done_tx.send((i, start.elapsed().as_secs_f64(), finished));
        });
    }
    drop(done_tx);
    let mut times = Vec::new();
    let mut peaks = Vec::new();
    for (i, secs, finished) in done.iter() {
        let finished = finished?;
        ensure!(
            finished.ok,
            "sender {i} failed after {secs:.1} s: {:?}",
            finished.errors()
        );
        times.push(secs);
        peaks.push(finished.peak_mib);
    }
    ensure!(times.len() == senders, "only {} senders ended", times.len());
    // Every file arrived whole.
    for file in &files {
        let name = file.file_name().unwrap();
        let got = blake3::hash(&std::fs::read(out.join(name))?);
        let want = blake3::hash(&std::fs::read(file)?);
        ensure!(got == want, "{} differs", name.to_string_lossy());
    }
    rx.signal(libc::SIGINT);
    let rx = rx.finish()?;
    times.sort_by(|a, b| a.total_cmp(b));
    let total = senders as u64 * size;
    println!(
        "{senders} senders x {} MiB: all verified; finish times first {:.1} s, median {:.1} s, last {:.1} s (spread {:.1} s, last/first {:.2}); {:.0} MB/s in all",
        size >> 20,
        times[0],
        median(times.clone()),
        times[times.len() - 1],
        times[times.len() - 1] - times[0],
        times[times.len() - 1] / times[0],
        total as f64 / 1e6 / times[times.len() - 1]
    );
    println!(
        "receiver peak RSS {:.1} MiB (anon {:.1}, file {:.1}); senders' peak RSS median {:.1} MiB",
        rx.peak_mib,
        rx.anon_mib,
        rx.file_mib,
        median(peaks)
    );
    Ok(())
}

/// Write back what earlier runs left dirty, so that no run pays for another's files.
fn settle() {
    // SAFETY: `sync` takes no arguments and cannot fail.
    unsafe { libc::sync() };
}
