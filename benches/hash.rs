//! Hashing benchmark: `Tree::from_file` (pread, one 256 KiB buffer per thread) against
//! `blake3::Hasher::update_mmap_rayon` (the whole file memory-mapped), both on rayon's
//! pool, plus a `TreeCache` hit.
//!
//! Run with `cargo bench --bench hash`. Knobs (environment):
//! - `QPUNCH_BENCH_BYTES`: file size, e.g. `1G` (default), `256M`, `64k` or plain bytes
//!   (suffixes are powers of 1024);
//! - `QPUNCH_BENCH_RUNS`: repetitions of each method (default 3);
//! - `QPUNCH_BENCH_DIR`: where the temporary file goes (default: the system's).
//!
//! The file was just written, so both methods read it from the page cache: this measures
//! hashing and copying, not the disk. Throughput is in decimal GB/s (10^9 bytes). Peak
//! memory is the process's VmHWM, reset before every run through `/proc/self/clear_refs`,
//! so each figure is that run's own peak (page-cache pages of a mapped file count, as
//! `top` shows them). The exit status is non-zero if any root differs from BLAKE3's.

mod common;

use std::path::Path;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, ensure};
use qpunch::transfer::tree::{Tree, TreeCache};

fn main() -> ExitCode {
    match bench() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench() -> anyhow::Result<()> {
    let bytes = match std::env::var("QPUNCH_BENCH_BYTES") {
        Ok(s) => common::parse_size(&s).map_err(anyhow::Error::msg)?,
        Err(_) => 1 << 30,
    };
    let runs: usize = match std::env::var("QPUNCH_BENCH_RUNS") {
        Ok(s) => s.trim().parse().context("QPUNCH_BENCH_RUNS")?,
        Err(_) => 3,
    };
    ensure!(runs > 0, "QPUNCH_BENCH_RUNS must be positive");
    let tmp = match std::env::var_os("QPUNCH_BENCH_DIR") {
        Some(base) => tempfile::Builder::new()
            .prefix("qpunch-hash-")
            .tempdir_in(base)?,
        None => tempfile::Builder::new().prefix("qpunch-hash-").tempdir()?,
    };
    let source = tmp.path().join("source.bin");
    let t = Instant::now();
    common::generate(&source, bytes, rand::random())?;
    println!(
        "source: {bytes} bytes ({:.2} GB) generated in {:.2} s; rayon threads: {}; cpus: {}",
        bytes as f64 / 1e9,
        t.elapsed().as_secs_f64(),
        rayon_core::current_num_threads(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let resettable = reset_peak();
    if !resettable {
        println!("note: cannot reset VmHWM here: peaks below are cumulative");
    }
    println!("resident before hashing: {}", kib(status_kib("VmRSS")));

    let mut expected = None;
    let mut table: Vec<(Method, Vec<Sample>)> =
        vec![(Method::Tree, vec![]), (Method::Mmap, vec![])];
    for run in 1..=runs {
        for (method, samples) in table.iter_mut() {
            reset_peak();
            let t = Instant::now();
            let root = method.hash(&source)?;
            let secs = t.elapsed().as_secs_f64();
            let peak = status_kib("VmHWM");
            let expected = *expected.get_or_insert(root);
            let name = method.name();
            ensure!(
                root == expected,
                "{name}: root {root} differs from {expected}"
            );
            println!(
                "run {run} {name:<18} {secs:7.3} s  {:6.2} GB/s  peak {}",
                bytes as f64 / 1e9 / secs,
                kib(peak)
            );
            samples.push((secs, peak));
        }
    }

    println!("median of {runs} run(s):");
    for (method, samples) in &table {
        let mut secs: Vec<f64> = samples.iter().map(|s| s.0).collect();
        secs.sort_by(f64::total_cmp);
        let median = secs[secs.len() / 2];
        let peak = samples.iter().filter_map(|s| s.1).max();
        println!(
            "  {:<18} {:6.2} GB/s  peak resident {}",
            method.name(),
            bytes as f64 / 1e9 / median,
            kib(peak)
        );
    }

    // The cache: the first lookup hashes and stores, the second only reads the entry.
    let cache = TreeCache::open(tmp.path().join("cache"))?;
    let t = Instant::now();
    let first = cache.tree(&source)?;
    let miss = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let second = cache.tree(&source)?;
    let hit = t.elapsed().as_secs_f64();
    ensure!(
        first == second && cache.stats().hits == 1,
        "the cache did not hit"
    );
    ensure!(
        first.root() == expected.context("no run")?,
        "cached root differs"
    );
    println!(
        "TreeCache: miss (hash + store) {:.3} s, hit {:.3} ms ({} groups, {} byte tree)",
        miss,
        hit * 1e3,
        first.groups(),
        first.encode().len()
    );
    Ok(())
}

/// One run: seconds, and peak resident KiB when known.
type Sample = (f64, Option<u64>);

/// The two ways of hashing a file compared here.
#[derive(Debug, Clone, Copy)]
enum Method {
    /// `Tree::from_file`: pread, one group buffer per thread.
    Tree,
    /// `update_mmap_rayon`: the whole file mapped.
    Mmap,
}

impl Method {
    fn name(self) -> &'static str {
        match self {
            Method::Tree => "Tree::from_file",
            Method::Mmap => "update_mmap_rayon",
        }
    }

    fn hash(self, path: &Path) -> anyhow::Result<blake3::Hash> {
        Ok(match self {
            Method::Tree => Tree::from_file(path)?.root(),
            Method::Mmap => {
                let mut hasher = blake3::Hasher::new();
                hasher.update_mmap_rayon(path)?;
                hasher.finalize()
            }
        })
    }
}

/// Reset the peak resident set size (Linux: write 5 to clear_refs).
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn kib(v: Option<u64>) -> String {
    match v {
        Some(k) => format!("{:.1} MiB", k as f64 / 1024.0),
        None => "?".into(),
    }
}
