//! What the kernel says about a process (peak memory, threads), and root-only set-up.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A `/proc/PID/status` field in its unit (kB for memory, a count for `Threads`), or
/// `None` once the process is gone.
pub fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Peak resident memory (`VmHWM`) in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_field(pid, "VmHWM").map(|kb| kb as f64 / 1024.0)
}

/// Live threads of the process.
pub fn threads(pid: u32) -> Option<u64> {
    status_field(pid, "Threads")
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a root-only test can run: true as root; otherwise it says SKIPPED loudly
/// and returns false, except under CI (env var `CI` set), where it panics instead.
pub fn require_root(test: &str, why: &str) -> bool {
    if euid() == 0 {
        return true;
    }
    skip(test, &format!("not running as root ({why})"));
    false
}

/// Announce a skipped test loudly, or fail it under CI.
pub fn skip(test: &str, reason: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: CI is set, so this test must run, but: {reason}");
    }
    // Straight to the stderr handle: libtest captures `eprintln!` of passing tests.
    let stars = "*".repeat(78);
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{stars}\nSKIPPED {test}: {reason}\n{stars}"
    );
}

/// A tmpfs mounted for the lifetime of this value (unmounted on drop).
pub struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (e.g. "1m") on the existing directory `path`.
    pub fn mount(path: &Path, size: &str) -> Result<Self, String> {
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).output();
    }
}
