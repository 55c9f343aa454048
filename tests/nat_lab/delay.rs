//! A user-space delay line: two TAP devices and a forwarder that holds every Ethernet
//! frame for a fixed one-way delay, in order. It exists because this kernel has no netem.
//!
//! ```text
//!   ns A: tap "wan0" ──fd──▶ [thread a→b: hold `delay`] ──fd──▶ tap "s1" :ns B
//!                    ◀──fd── [thread b→a: hold `delay`] ◀──fd──
//! ```
//!
//! A TAP device is created in the namespace of the thread that opens `/dev/net/tun`
//! (here via [`in_netns`]) and stays there; its file descriptor works from any thread.
//! Frames the kernel sends out of one TAP are read from its fd, stamped, queued, and
//! written into the other TAP's fd once `delay` has passed, which the kernel treats as
//! the frame arriving on that interface. Each direction is one thread with one FIFO:
//! frames leave in arrival order, each no earlier than `arrival + delay` (the delay is a
//! lower bound; the slack is the wake-up latency, microseconds). Both directions get the
//! same delay, so the round trip across one link is `2 * delay`.
//!
//! Cost: one `read` and one `write` per frame and one `ppoll` per wake-up (a wake-up
//! takes every frame that is ready), no allocation in steady state. At 100 Mbit/s of
//! 1500-byte frames that is ~8,300 frames/s per direction; `benches/nat_lab_delay.rs`
//! measures throughput and CPU time ([`DelayLink::stats`]).

use std::collections::VecDeque;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::netns::in_netns;

/// Largest frame read from a TAP (lab MTUs are 1500; this also fits a 64 KiB MTU).
const MAX_FRAME: usize = 65536;
/// Bytes held per direction beyond which arriving frames are dropped (and counted):
/// 1 Gbit/s for 0.5 s, far above anything the lab needs.
const QUEUE_LIMIT: usize = 64 << 20;
/// Frames taken per wake-up before due frames are sent again, so a flood in cannot
/// starve the way out.
const READ_BATCH: usize = 64;

/// One end of a [`DelayLink`]: a TAP device `ifname` created in namespace `ns`.
#[derive(Debug, Clone, Copy)]
pub struct TapEnd<'a> {
    /// The namespace the TAP device is created in.
    pub ns: &'a str,
    /// Its interface name (at most 15 bytes).
    pub ifname: &'a str,
}

/// Counters of one direction, and the CPU time of its thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DirectionStats {
    /// Frames forwarded.
    pub frames: u64,
    /// Bytes forwarded (whole Ethernet frames).
    pub bytes: u64,
    /// Frames dropped because the queue was over its limit (64 MiB).
    pub overflow: u64,
    /// Frames the far TAP refused (e.g. while its interface was still down during setup).
    pub refused: u64,
    /// CPU time the direction's thread used so far (user + system, including the kernel
    /// work its writes cause: delivering the frame through bridges to a socket).
    pub cpu: Duration,
}

/// Both directions of a [`DelayLink`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayStats {
    /// From end `a` to end `b` (in the lab: router WAN to the internet, i.e. upload).
    pub a_to_b: DirectionStats,
    /// From end `b` to end `a` (download).
    pub b_to_a: DirectionStats,
}

#[derive(Default)]
struct Counters {
    frames: AtomicU64,
    bytes: AtomicU64,
    overflow: AtomicU64,
    refused: AtomicU64,
    tid: AtomicI32,
}

#[derive(Default)]
struct Shared {
    delay_ns: AtomicU64,
    dirs: [Counters; 2],
}

/// Two TAP devices joined by a delay line; dropping it stops the threads and closes the
/// TAPs (which removes the devices).
pub struct DelayLink {
    shared: Arc<Shared>,
    stop: Arc<OwnedFd>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayLink {
    /// Create the TAP devices `a` and `b` (down; the caller configures them) and start
    /// forwarding with `delay` each way.
    pub fn start(a: TapEnd, b: TapEnd, delay: Duration) -> io::Result<DelayLink> {
        let fa = Arc::new(in_netns(a.ns, || open_tap(a.ifname))?);
        let fb = Arc::new(in_netns(b.ns, || open_tap(b.ifname))?);
        // SAFETY: plain syscall; the result is checked before use.
        let stop = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if stop < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor that nothing else owns.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(stop) });
        let shared = Arc::new(Shared::default());
        shared.set_delay(delay);
        let mut link = DelayLink {
            shared,
            stop,
            threads: Vec::new(),
        };
        for (dir, (from, to), (src, dst)) in [(0, (&fa, &fb), (a, b)), (1, (&fb, &fa), (b, a))] {
            let (from, to, stop, shared) = (
                from.clone(),
                to.clone(),
                link.stop.clone(),
                link.shared.clone(),
            );
            let thread = std::thread::Builder::new()
                .name(format!("delay {}>{}", src.ifname, dst.ifname))
                .spawn(move || forward(&from, &to, &stop, &shared, dir))?;
            link.threads.push(thread);
        }
        Ok(link)
    }

    /// The one-way delay now in force.
    pub fn delay(&self) -> Duration {
        Duration::from_nanos(self.shared.delay_ns.load(Ordering::Relaxed))
    }

    /// Change the one-way delay (both directions). Frames already queued keep their
    /// release time; order is kept, so after a decrease new frames wait behind them.
    pub fn set_delay(&self, delay: Duration) {
        self.shared.set_delay(delay);
    }

    /// Counters and CPU time so far.
    pub fn stats(&self) -> DelayStats {
        let dir = |c: &Counters| DirectionStats {
            frames: c.frames.load(Ordering::Relaxed),
            bytes: c.bytes.load(Ordering::Relaxed),
            overflow: c.overflow.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            cpu: thread_cpu(c.tid.load(Ordering::Relaxed)),
        };
        DelayStats {
            a_to_b: dir(&self.shared.dirs[0]),
            b_to_a: dir(&self.shared.dirs[1]),
        }
    }
}

impl Drop for DelayLink {
    fn drop(&mut self) {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writing 8 bytes from a live buffer to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), one.as_ptr().cast(), one.len()) };
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn set_delay(&self, delay: Duration) {
        let ns = u64::try_from(delay.as_nanos()).expect("delay fits in u64 nanoseconds");
        self.delay_ns.store(ns, Ordering::Relaxed);
    }
}

/// Open a TAP device (no packet-info header: the fd carries bare Ethernet frames) in the
/// calling thread's namespace. Non-blocking, so a wake-up can drain it.
fn open_tap(ifname: &str) -> io::Result<OwnedFd> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("TAP {ifname}: {e}"));
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(context(io::ErrorKind::InvalidInput.into()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|e| context(io::Error::new(e.kind(), format!("/dev/net/tun: {e}"))))?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(ifname.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes the ifreq we pass, which outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
    if rc < 0 {
        return Err(context(io::Error::last_os_error()));
    }
    Ok(file.into())
}

/// One direction: read frames from `from`, write each to `to` once it is due.
fn forward(from: &OwnedFd, to: &OwnedFd, stop: &OwnedFd, shared: &Shared, dir: usize) {
    let counters = &shared.dirs[dir];
    // SAFETY: plain syscalls on the calling thread.
    unsafe {
        counters.tid.store(libc::gettid(), Ordering::Relaxed);
        // Wake up within 1 µs of the deadline instead of the default 50 µs slack.
        libc::prctl(libc::PR_SET_TIMERSLACK, 1000 as libc::c_ulong);
    }
    let mut queue: VecDeque<(Instant, Vec<u8>)> = VecDeque::new();
    let mut queued = 0usize;
    // Buffers of frames already sent, reused for the next ones.
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; MAX_FRAME];
    loop {
        let now = Instant::now();
        while queue.front().is_some_and(|(due, _)| *due <= now) {
            let (_, frame) = queue.pop_front().expect("front exists");
            queued -= frame.len();
            // SAFETY: writing from a live buffer of the given length.
            let n = unsafe { libc::write(to.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n == frame.len() as isize {
                counters.frames.fetch_add(1, Ordering::Relaxed);
                counters
                    .bytes
                    .fetch_add(frame.len() as u64, Ordering::Relaxed);
            } else {
                counters.refused.fetch_add(1, Ordering::Relaxed);
            }
            spare.push(frame);
        }

        // Sleep until a frame arrives, the head of the queue is due, or we must stop.
        let timeout = queue.front().map(|(due, _)| {
            let left = due.saturating_duration_since(now);
            libc::timespec {
                tv_sec: left.as_secs() as libc::time_t,
                tv_nsec: left.subsec_nanos() as libc::c_long,
            }
        });
        let mut fds = [
            libc::pollfd {
                fd: from.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout_ptr = timeout
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: fds and the timeout outlive the call; no signal mask change.
        let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, timeout_ptr, std::ptr::null()) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            assert_eq!(err.kind(), io::ErrorKind::Interrupted, "ppoll: {err}");
            continue;
        }
        if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
            return;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        for _ in 0..READ_BATCH {
            // SAFETY: reading into a live buffer of the given length.
            let n = unsafe { libc::read(from.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n @ 1..) = usize::try_from(n) else {
                break; // EAGAIN: drained (or an error, which the next poll reports)
            };
            let due =
                Instant::now() + Duration::from_nanos(shared.delay_ns.load(Ordering::Relaxed));
            if queued + n > QUEUE_LIMIT {
                counters.overflow.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let mut frame = spare.pop().unwrap_or_default();
            frame.clear();
            frame.extend_from_slice(&buf[..n]);
            queued += n;
            queue.push_back((due, frame));
        }
    }
}

/// CPU time of thread `tid` of this process: `/proc/self/task/TID/schedstat` (ns on
/// CPU), or clock ticks from `stat` where schedstat is missing. Zero if unknown.
fn thread_cpu(tid: i32) -> Duration {
    if tid == 0 {
        return Duration::ZERO;
    }
    let task = format!("/proc/self/task/{tid}");
    if let Ok(text) = std::fs::read_to_string(format!("{task}/schedstat"))
        && let Some(ns) = text.split_whitespace().next().and_then(|w| w.parse().ok())
    {
        return Duration::from_nanos(ns);
    }
    let Ok(stat) = std::fs::read_to_string(format!("{task}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the parenthesized command name: utime and stime are the 12th, 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|w| w.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}
