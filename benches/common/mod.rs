//! Helpers shared by the benchmarks (each bench includes this module; not all use all).
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// `123`, `64k`, `256M`, `1G` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_lowercase() {
                'k' => 1u64 << 10,
                'm' => 1 << 20,
                'g' => 1 << 30,
                _ => return Err(format!("unknown size suffix {c:?} in {s:?}")),
            };
            (&s[..s.len() - 1], mult)
        }
        _ => (s, 1),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult).ok_or_else(|| "size too large".into())
}

/// Write `size` pseudo-random bytes (BLAKE3's XOF keyed by `seed`) to `path`.
pub fn generate(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut xof = blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .finalize_xof();
    let mut out = std::io::BufWriter::with_capacity(
        1 << 20,
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        xof.fill(&mut buf[..n]);
        out.write_all(&buf[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}

/// Busy and total jiffies of the whole machine since boot (`/proc/stat`), `(0, 0)` where
/// that cannot be read.
pub fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|w| w.parse().ok())
        .collect();
    if cpu.len() < 8 {
        return (0, 0);
    }
    let idle = cpu[3] + cpu[4]; // idle + iowait
    let total: u64 = cpu.iter().take(8).sum();
    (total - idle, total)
}

/// A TCP port free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Wait until something listens on TCP 127.0.0.1:port, without connecting (socat serves
/// exactly one connection).
pub fn wait_listening(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let needle = format!("0100007F:{port:04X} 00000000:0000 0A");
    let start = Instant::now();
    while start.elapsed() < timeout {
        let table = std::fs::read_to_string("/proc/net/tcp").context("/proc/net/tcp")?;
        if table.contains(&needle) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}")
}
