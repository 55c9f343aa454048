//! What the user sees: progress bars and messages on stderr, or JSON events on stdout.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use indicatif::HumanBytes;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use qpunch::identity::Fingerprint;
use qpunch::share::consent::Summary;
use qpunch::text::terminal;
use qpunch::transfer::names::display_safe;
use qpunch::transfer::{Consent, FileOffer, FileReport, Observer, Outcome};
use serde::Serialize;

/// One line of `--json` output.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The receiver is ready.
    Listening {
        addrs: Vec<String>,
        port: u16,
        fingerprint: Fingerprint,
        /// The one-time code to give the sender (when meeting by code).
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<String>,
        /// Seconds the code stays valid.
        #[serde(skip_serializing_if = "Option::is_none")]
        expires_secs: Option<u64>,
    },
    /// The rendezvous paired us with a peer and the code matched.
    Paired {
        nameplate: String,
        /// The peer's public address, as its sealed hello gives it (its last candidate).
        peer: String,
        /// The addresses the peer offered in its sealed hello.
        candidates: Vec<String>,
        /// The peer's NAT mapping (eim, apdm, ...).
        peer_nat: &'static str,
    },
    /// The sender found the receiver's announcement on the LAN (mDNS).
    Found {
        nameplate: String,
        /// The addresses announced for the nameplate.
        addrs: Vec<String>,
    },
    /// Our NAT, as checked against a rendezvous.
    Nat(qpunch::natcheck::NatReport),
    /// `nat-check` found no rendezvous and no STUN list: it asks these public STUN servers
    /// (the one time qpunch contacts a third party on its own).
    StunDefaults { servers: Vec<&'static str> },
    /// Our NAT, as checked against a STUN server (`nat-check --stun`): the same fields as
    /// `nat`, with the server as named and the address asked.
    StunNat {
        server: String,
        addr: String,
        #[serde(flatten)]
        report: qpunch::natcheck::NatReport,
    },
    /// The rendezvous was reached over TLS on TCP, not UDP.
    RendezvousOverTcp {
        /// The rendezvous, as named.
        via: String,
        /// Its TCP port.
        tcp_port: u16,
    },
    /// A rendezvous is serving.
    Rendezvous {
        addrs: Vec<String>,
        port: u16,
        alt_port: u16,
        /// The TLS-over-TCP port, if it listens on one.
        #[serde(skip_serializing_if = "Option::is_none")]
        tcp_port: Option<u16>,
        fingerprint: Fingerprint,
    },
    /// A one-time code expired unused (a new `listening` event brings the next one).
    CodeExpired,
    /// Senders that did not know our codes had `guesses` tries in the last `window_secs`:
    /// no new code for `resume_in_secs` (a `listening` event brings it).
    CodesPaused {
        guesses: usize,
        window_secs: u64,
        resume_in_secs: u64,
    },
    /// A rendezvous paired two peers.
    Pairing {
        nameplate: String,
        receiver: String,
        sender: String,
    },
    /// The relay slot of a pair ended (`why`: "a peer left", "lifetime ended", "quota
    /// used up"), after relaying `bytes` in both directions.
    RelayEnded {
        nameplate: String,
        bytes: u64,
        why: String,
    },
    /// The probe exchange proved a path. `method`: `direct` (a qpunch reply) or
    /// `legacy` (the Go demo's plain reply, which does not carry `reflexive_addr`).
    Punched {
        peer: String,
        method: &'static str,
        local_addr: String,
        reflexive_addr: Option<String>,
        rtt_ms: f64,
    },
    /// An authenticated QUIC connection is up.
    Connected {
        peer: String,
        fingerprint: Fingerprint,
        path: &'static str,
        local_addr: String,
        /// The direct path runs through a router's port mapping.
        port_mapped: bool,
    },
    /// Our router forwards a public port to our socket (deleted when we stop).
    PortMapped {
        protocol: &'static str,
        external: String,
        gateway: String,
        lifetime_secs: u64,
    },
    /// `nat-check`: what the default gateway answered to each port mapping protocol.
    PortMapping {
        gateway: Option<String>,
        protocols: Vec<PortMappingProtocol>,
    },
    /// The connection moved to another path (a meeting by code).
    Path {
        path: &'static str,
        from: Option<&'static str>,
        reason: &'static str,
        rtt_ms: Option<f64>,
    },
    /// A file arrived verified (receiver).
    Received {
        name: String,
        bytes: u64,
        blake3: String,
        saved_as: String,
        from: Fingerprint,
    },
    /// A file was delivered and verified by the receiver (sender).
    Sent {
        name: String,
        bytes: u64,
        blake3: String,
        saved_as: String,
    },
    /// A file was declined by the receiver.
    Declined { name: String, reason: String },
    /// A text arrived, verified (receiver): the sender's words, as sent.
    Text { text: String, from: Fingerprint },
    /// Something failed.
    Error { message: String },
    /// Something was left out or may surprise (a skipped symlink).
    Warning { message: String },
    /// How far the transfer is (at most a few per second). `bytes_done` counts bytes that
    /// arrived or were already there (a resume), `files_done` files that ended.
    Progress {
        files_done: u64,
        files: u64,
        bytes_done: u64,
        bytes: u64,
        bytes_per_sec: f64,
    },
    /// The end of a batch: files verified of those offered, bytes verified, bytes that
    /// actually travelled (less on a resume), time and rate, and where.
    Summary {
        files: u64,
        verified: u64,
        bytes: u64,
        moved: u64,
        seconds: f64,
        mb_per_sec: f64,
        path: String,
        /// The connection's direct path ran through a router's port mapping.
        port_mapped: bool,
        /// Bytes sent and received over each kind of path (a meeting by code).
        #[serde(skip_serializing_if = "Option::is_none")]
        by_path: Option<std::collections::BTreeMap<&'static str, [u64; 2]>>,
    },
    /// Counters of the shared socket and the server, at exit.
    Stats {
        #[serde(flatten)]
        socket: qpunch::socket::SocketStats,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        server: Option<qpunch::server::ServerStats>,
        /// Codes offered on the LAN (a receiver without a rendezvous).
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        lan: Option<qpunch::meet::lan::LanStats>,
        /// A rendezvous's pairings and relay (`qpunch rendezvous`).
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        rendezvous: Option<qpunch::rendezvous::RendezvousStats>,
    },
}

/// Output mode plus the progress bars.
pub struct Ui {
    json: bool,
    /// JSON lines on their way to stdout (see [`JsonOut`]).
    out: Arc<JsonOut>,
    quiet: bool,
    /// Texts go to stdout as sent, unescaped (`receive --stdout`).
    raw_text: std::sync::atomic::AtomicBool,
    multi: MultiProgress,
    /// Serializes consent prompts (several senders may arrive at once).
    prompt: Mutex<()>,
}

impl Ui {
    pub fn new(json: bool, quiet: bool) -> Arc<Self> {
        let target = if json || quiet {
            ProgressDrawTarget::hidden()
        } else {
            ProgressDrawTarget::stderr()
        };
        Arc::new(Ui {
            json,
            quiet,
            multi: MultiProgress::with_draw_target(target),
            prompt: Mutex::new(()),
            raw_text: Default::default(),
            out: Arc::default(),
        })
    }

    /// Write out every JSON line still held back (at exit).
    pub fn flush(&self) {
        self.out.write(None);
    }

    /// Emit an event: a JSON line in `--json` mode, else the human text (if any).
    pub fn event(&self, event: Event, human: Option<String>) {
        if self.json {
            let bulk = matches!(
                event,
                Event::Sent { .. } | Event::Received { .. } | Event::Progress { .. }
            );
            let mut line = json_safe(serde_json::to_string(&event).expect("events serialize"));
            line.push('\n');
            if bulk {
                self.out.hold(line);
            } else {
                self.out.write(Some(&line));
            }
        } else if let Some(text) = human {
            self.say(&text);
        }
    }

    /// A command's primary result on stdout (e.g. the receiver's banner), so it can be
    /// piped or copied; suppressed by --quiet and --json like other messages.
    /// With `receive --stdout` stdout carries the payload, so this goes to stderr.
    pub fn output(&self, text: &str) {
        if !self.quiet && !self.json {
            let text = terminal(text);
            if self.raw_text.load(std::sync::atomic::Ordering::Relaxed) {
                self.multi.suspend(|| eprintln!("{text}"));
            } else {
                self.multi.suspend(|| println!("{text}"));
            }
        }
    }

    /// Print received texts raw (`receive --stdout`): the user asked for the bytes.
    pub fn raw_text(&self) {
        self.raw_text
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a line per file is worth formatting: a human reads stderr.
    fn wants_lines(&self) -> bool {
        !self.json && !self.quiet
    }

    /// Whether events are JSON lines on stdout.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// A received text: the payload, so on stdout even with --quiet; escaped like all
    /// peer text unless printed raw, as a JSON event with --json.
    pub fn text(&self, text: &str, from: Fingerprint) {
        if self.json {
            let text = text.to_string();
            return self.event(Event::Text { text, from }, None);
        }
        let raw = self.raw_text.load(std::sync::atomic::Ordering::Relaxed);
        self.flush();
        self.multi.suspend(|| {
            let mut out = std::io::stdout().lock();
            let _ = if raw {
                out.write_all(text.as_bytes())
            } else {
                // Line breaks stay; every other control character is escaped.
                let lines: Vec<String> = text.split('\n').map(qpunch::text::peer).collect();
                writeln!(out, "{}", lines.join("\n"))
            };
            let _ = out.flush();
        });
    }

    /// A human message on stderr (suppressed by --quiet and --json).
    pub fn say(&self, text: &str) {
        if !self.quiet && !self.json {
            let text = terminal(text);
            self.multi.suspend(|| eprintln!("{text}"));
        }
    }

    /// A warning: JSON event, or stderr unless quiet.
    pub fn warn(&self, message: &str) {
        if self.json {
            self.event(
                Event::Warning {
                    message: message.to_string(),
                },
                None,
            );
        } else if !self.quiet {
            let message = terminal(message);
            self.multi.suspend(|| eprintln!("warning: {message}"));
        }
    }

    /// An error: JSON event, or stderr even when quiet.
    pub fn error(&self, message: &str) {
        if self.json {
            self.event(
                Event::Error {
                    message: message.to_string(),
                },
                None,
            );
        } else {
            let message = terminal(message);
            self.multi.suspend(|| eprintln!("error: {message}"));
        }
    }

    fn bar(&self, name: &str, size: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "  {msg:30!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(display_safe(name));
        bar
    }

    /// The bar of a whole batch: bytes, rate, ETA, and files done in its message.
    fn total_bar(&self) -> ProgressBar {
        let bar = self.multi.insert(0, ProgressBar::new(0));
        bar.set_style(
            ProgressStyle::with_template(
                "{msg:32!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    }
}

/// How long a per-file JSON line (`sent`, `received`, `progress`) may wait to share one
/// write with the lines after it: a bundle of small files ends hundreds of files at once,
/// and a write per line cost both sides more CPU than their files' names and checks.
const HOLD_FOR: Duration = Duration::from_millis(10);
/// Held lines are written at once past this many bytes.
const HOLD_BYTES: usize = 64 << 10;

/// The JSON lines for stdout. Per-file lines are held at most [`HOLD_FOR`] (by a thread
/// that sleeps while nothing is held); any other line first writes out what is held, so
/// the order of lines never changes and a `summary` or `error` is never kept waiting.
struct JsonOut {
    /// Lines held, and where they go.
    out: Mutex<(Vec<u8>, Box<dyn Write + Send>)>,
    wake: std::sync::Condvar,
    /// Whether the flusher thread runs (started by the first held line).
    flusher: std::sync::OnceLock<bool>,
    hold_for: Duration,
}

impl Default for JsonOut {
    fn default() -> Self {
        JsonOut::new(Box::new(std::io::stdout()), HOLD_FOR)
    }
}

impl JsonOut {
    fn new(to: Box<dyn Write + Send>, hold_for: Duration) -> Self {
        JsonOut {
            out: Mutex::new((Vec::new(), to)),
            wake: Default::default(),
            flusher: Default::default(),
            hold_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (Vec<u8>, Box<dyn Write + Send>)> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Write what is held and then `line`, in one write.
    fn write(&self, line: Option<&str>) {
        let mut out = self.lock();
        if let Some(line) = line {
            out.0.extend_from_slice(line.as_bytes());
        }
        Self::drain(&mut out);
    }

    fn drain((held, to): &mut (Vec<u8>, Box<dyn Write + Send>)) {
        if held.is_empty() {
            return;
        }
        let _ = to.write_all(held);
        let _ = to.flush();
        held.clear();
    }

    /// Hold a per-file line for a write with the next ones.
    fn hold(self: &Arc<Self>, line: String) {
        let mut out = self.lock();
        let was_empty = out.0.is_empty();
        out.0.extend_from_slice(line.as_bytes());
        if out.0.len() >= HOLD_BYTES {
            return Self::drain(&mut out);
        }
        if !was_empty {
            return;
        }
        let flusher = *self.flusher.get_or_init(|| {
            let this = self.clone();
            std::thread::Builder::new()
                .name("json-out".into())
                .spawn(move || this.flush_held())
                .is_ok()
        });
        if flusher {
            drop(out);
            self.wake.notify_one();
        } else {
            Self::drain(&mut out);
        }
    }

    /// The flusher thread: wait for a held line, give its neighbours `hold_for` to join
    /// it, write them all.
    fn flush_held(&self) {
        loop {
            let out = self.lock();
            let out = self
                .wake
                .wait_while(out, |(held, _)| held.is_empty())
                .unwrap_or_else(|e| e.into_inner());
            drop(out);
            std::thread::sleep(self.hold_for);
            Self::drain(&mut self.lock());
        }
    }
}

/// A JSON line made safe for a terminal: every control or format character inside a
/// string becomes a `\uXXXX` escape (serde_json leaves C1 controls and bidi characters
/// raw, which is valid JSON but not harmless on a terminal). The JSON means the same.
fn json_safe(line: String) -> String {
    use std::fmt::Write as _;
    // Nearly every line is printable ASCII: nothing to escape.
    if line.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return line;
    }
    let mut out = String::with_capacity(line.len());
    for c in line.chars() {
        if !qpunch::text::is_unsafe(c) {
            out.push(c);
        } else {
            for unit in c.encode_utf16(&mut [0; 2]) {
                let _ = write!(out, "\\u{unit:04x}");
            }
        }
    }
    out
}

/// Which side an observer reports for.
#[derive(Clone, Copy)]
pub enum Side {
    Sending,
    Receiving(Fingerprint),
}

/// Bars shown for single files at once; the rest only move the total.
const FILE_BARS: usize = 4;
/// Files below this size get no bar of their own (they come and go too fast to read).
const BAR_FROM: u64 = 4 << 20;
/// At most one `progress` event per this long.
const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Progress bars and events for the files of one connection: one bar for the whole
/// batch, and bars for a few large files in flight.
pub struct FileProgress {
    ui: Arc<Ui>,
    side: Side,
    started: Instant,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    total: Option<ProgressBar>,
    bars: HashMap<u32, ProgressBar>,
    files: u64,
    files_done: u64,
    bytes: u64,
    bytes_done: u64,
    skipped: u64,
    last_event: Option<Instant>,
    port_mapped: bool,
}

impl FileProgress {
    pub fn new(ui: Arc<Ui>, side: Side) -> Arc<Self> {
        Arc::new(FileProgress {
            ui,
            side,
            started: Instant::now(),
            state: Mutex::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Remember that the connection's path runs through a router's port mapping (the
    /// summary says so).
    pub fn set_port_mapped(&self, on: bool) {
        self.state().port_mapped = on;
    }

    fn port_mapped(&self) -> bool {
        self.state().port_mapped
    }

    /// Remove every bar (the transfer is over or abandoned).
    pub fn clear(&self) {
        let mut state = self.state();
        for (_, bar) in state.bars.drain() {
            bar.finish_and_clear();
        }
        if let Some(total) = state.total.take() {
            total.finish_and_clear();
        }
    }

    /// A `progress` event, unless one went out less than [`PROGRESS_EVERY`] ago (`force`
    /// sends it anyway: the last one of a batch).
    fn maybe_event(&self, state: &mut State, force: bool) {
        if !self.ui.json {
            return;
        }
        let now = Instant::now();
        if !force && state.last_event.is_some_and(|t| now - t < PROGRESS_EVERY) {
            return;
        }
        state.last_event = Some(now);
        let seconds = self.started.elapsed().as_secs_f64().max(1e-9);
        self.ui.event(
            Event::Progress {
                files_done: state.files_done,
                files: state.files,
                bytes_done: state.bytes_done,
                bytes: state.bytes,
                bytes_per_sec: (state.bytes_done - state.skipped) as f64 / seconds,
            },
            None,
        );
    }

    /// The summary line (and `summary` event) of a finished batch; `path` says where the
    /// files went.
    pub fn summary(
        &self,
        reports: &[FileReport],
        elapsed: Duration,
        path: &str,
        by_path: Option<qpunch::path::PathBytes>,
    ) {
        self.clear();
        let verified: Vec<_> = reports.iter().filter(|r| r.is_verified()).collect();
        let bytes: u64 = verified.iter().map(|r| r.size).sum();
        let moved = {
            let state = self.state();
            state.bytes_done.saturating_sub(state.skipped)
        };
        let seconds = elapsed.as_secs_f64();
        let mb_per_sec = moved as f64 / 1e6 / seconds.max(1e-9);
        let verb = match self.side {
            Side::Sending => "sent",
            Side::Receiving(_) => "received",
        };
        let resumed = if moved < bytes {
            format!(
                ", {} of it already there (resumed)",
                HumanBytes(bytes - moved)
            )
        } else {
            String::new()
        };
        let line = if verified.len() == reports.len() {
            format!(
                "{verb} {} file(s), {}{resumed}, in {seconds:.2} s ({mb_per_sec:.1} MB/s), all verified: {path}",
                reports.len(),
                HumanBytes(bytes),
            )
        } else {
            format!(
                "{verb} {} of {} file(s), {}{resumed}, in {seconds:.2} s ({mb_per_sec:.1} MB/s): {path}",
                verified.len(),
                reports.len(),
                HumanBytes(bytes),
            )
        };
        let line = match by_path.map(by_kind) {
            Some(kinds) if !kinds.is_empty() => {
                let parts: Vec<String> = kinds
                    .iter()
                    .map(|(kind, [sent, received])| {
                        format!(
                            "{kind} {} out, {} in",
                            HumanBytes(*sent),
                            HumanBytes(*received)
                        )
                    })
                    .collect();
                format!("{line}; by path: {}", parts.join("; "))
            }
            _ => line,
        };
        self.ui.event(
            Event::Summary {
                files: reports.len() as u64,
                verified: verified.len() as u64,
                bytes,
                moved,
                seconds,
                mb_per_sec,
                path: path.to_string(),
                port_mapped: self.port_mapped(),
                by_path: by_path.map(by_kind),
            },
            Some(line),
        );
    }
}

impl Observer for FileProgress {
    fn hashing(&self, _id: u32, name: &str, size: u64) {
        // Only worth a line when it takes noticeable time.
        if size >= 256 << 20 {
            self.ui.say(&format!(
                "hashing {} ({}) ...",
                display_safe(name),
                HumanBytes(size)
            ));
        }
    }

    fn batch(&self, files: u64, bytes: u64) {
        let mut state = self.state();
        state.files += files;
        state.bytes += bytes;
        let message = format!("{} of {} file(s)", state.files_done, state.files);
        let length = state.bytes;
        let total = state.total.get_or_insert_with(|| self.ui.total_bar());
        total.set_length(length);
        total.set_message(message);
        self.maybe_event(&mut state, true);
    }

    fn started(&self, id: u32, name: &str, size: u64) {
        let mut state = self.state();
        if size >= BAR_FROM && state.bars.len() < FILE_BARS {
            let bar = self.ui.bar(name, size);
            state.bars.insert(id, bar);
        }
    }

    fn skipped(&self, id: u32, bytes: u64) {
        let mut state = self.state();
        state.bytes_done += bytes;
        state.skipped += bytes;
        if let Some(bar) = state.bars.get(&id) {
            bar.set_position(bytes);
            bar.reset_eta();
        }
        if let Some(total) = &state.total {
            total.inc(bytes);
        }
        self.maybe_event(&mut state, false);
    }

    fn text(&self, _id: u32, text: &str) {
        if let Side::Receiving(from) = self.side {
            self.ui.text(text, from);
        }
    }

    fn progress(&self, id: u32, bytes: u64) {
        let mut state = self.state();
        state.bytes_done += bytes;
        if let Some(bar) = state.bars.get(&id) {
            bar.inc(bytes);
        }
        if let Some(total) = &state.total {
            total.inc(bytes);
        }
        self.maybe_event(&mut state, false);
    }

    fn finished(&self, report: &FileReport) {
        {
            let mut state = self.state();
            if let Some(bar) = state.bars.remove(&report.id) {
                bar.finish_and_clear();
            }
            state.files_done += 1;
            let all = state.files_done >= state.files && state.files > 0;
            if let Some(total) = &state.total
                && self.ui.wants_lines()
            {
                total.set_message(format!("{} of {} file(s)", state.files_done, state.files));
            }
            self.maybe_event(&mut state, all);
        }
        let name = || display_safe(&report.name);
        let saved = || {
            report
                .saved_as
                .as_deref()
                .map(display_safe)
                .unwrap_or_default()
        };
        // Single files are named as they arrive unless there are many: then the summary
        // line says it (JSON always names each). Nothing is formatted that nobody reads.
        let lines = self.ui.wants_lines() && self.state().files <= 20;
        let line = |text: &dyn Fn() -> String| lines.then(text);
        match (&report.outcome, self.side) {
            (Outcome::Verified, Side::Sending) => self.ui.event(
                Event::Sent {
                    name: report.name.clone(),
                    bytes: report.size,
                    blake3: report.blake3.clone(),
                    saved_as: report.saved_as.clone().unwrap_or_default(),
                },
                line(&|| match report.saved_as {
                    Some(_) => format!(
                        "sent {} ({}), verified by the receiver as {}",
                        name(),
                        HumanBytes(report.size),
                        saved()
                    ),
                    None => format!(
                        "sent {} ({}), verified by the receiver",
                        name(),
                        HumanBytes(report.size)
                    ),
                }),
            ),
            (Outcome::Verified, Side::Receiving(from)) => self.ui.event(
                Event::Received {
                    name: report.name.clone(),
                    bytes: report.size,
                    blake3: report.blake3.clone(),
                    saved_as: report.saved_as.clone().unwrap_or_default(),
                    from,
                },
                line(&|| {
                    format!(
                        "received {} ({}), BLAKE3 {} verified",
                        if report.saved_as.is_some() {
                            saved()
                        } else {
                            name()
                        },
                        HumanBytes(report.size),
                        &report.blake3[..16.min(report.blake3.len())]
                    )
                }),
            ),
            (Outcome::Declined(reason), _) => {
                self.ui.event(
                    Event::Declined {
                        name: report.name.clone(),
                        reason: reason.clone(),
                    },
                    Some(format!("declined {}: {reason}", name())),
                );
            }
            (Outcome::Failed(why), _) => {
                self.ui.error(&format!("{}: {why}", name()));
            }
        }
    }
}

/// Asks at the terminal before accepting files.
pub struct TerminalConsent {
    pub ui: Arc<Ui>,
}

impl TerminalConsent {
    /// Whether a person can be asked at all.
    pub fn available() -> bool {
        std::io::stdin().is_terminal()
    }
}

impl Consent for TerminalConsent {
    fn decide(&self, sender: Fingerprint, files: &[FileOffer]) -> Vec<bool> {
        let _one_at_a_time = self.ui.prompt.lock().unwrap_or_else(|e| e.into_inner());
        let summary = Summary::new(sender, files);
        let answer = self.ui.multi.suspend(|| {
            eprintln!(
                "\n{sender} wants to send you {} file(s), {} in all:",
                summary.files,
                HumanBytes(summary.bytes)
            );
            const SHOWN: usize = 20;
            for item in summary.items.iter().take(SHOWN) {
                let (name, bytes) = (&item.name, HumanBytes(item.bytes));
                if item.is_folder() {
                    eprintln!("  {name}  ({} file(s), {bytes})", item.files);
                } else if item.stream {
                    eprintln!("  {name}  (a stream: its size is known only at its end)");
                } else if item.text {
                    eprintln!("  a text ({bytes}), shown here once it arrives");
                } else {
                    eprintln!("  {name}  ({bytes})");
                }
            }
            if summary.items.len() > SHOWN {
                eprintln!("  ... and {} more", summary.items.len() - SHOWN);
            }
            eprint!("Accept? [y/N] ");
            let _ = std::io::stderr().flush();
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            line
        });
        let yes = matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes");
        vec![yes; files.len()]
    }
}

/// The kinds of path that carried anything, with bytes `[sent, received]`.
fn by_kind(bytes: qpunch::path::PathBytes) -> std::collections::BTreeMap<&'static str, [u64; 2]> {
    qpunch::path::PathKind::ALL
        .iter()
        .map(|&kind| (kind.as_str(), bytes.of(kind)))
        .filter(|(_, (sent, received))| sent + received > 0)
        .map(|(kind, (sent, received))| (kind, [sent, received]))
        .collect()
}

/// One protocol's answer in `nat-check`'s `port_mapping` event.
#[derive(Debug, serde::Serialize)]
pub struct PortMappingProtocol {
    pub protocol: &'static str,
    /// `mapped`, `refused` or `silent`.
    pub result: &'static str,
    /// The mapped address (deleted again at once).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub external: Option<String>,
    /// Why it refused (the gateway's words, escaped).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a [`JsonOut`] wrote: the bytes of each flush.
    #[derive(Clone, Default)]
    struct Flushes(Arc<Mutex<(Vec<u8>, Vec<String>)>>);

    impl Write for Flushes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().0.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            let mut seen = self.0.lock().unwrap();
            let bytes = std::mem::take(&mut seen.0);
            seen.1.push(String::from_utf8(bytes).unwrap());
            Ok(())
        }
    }

    impl Flushes {
        fn wait_for(&self, n: usize) -> Vec<String> {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let seen = self.0.lock().unwrap().1.clone();
                if seen.len() >= n || Instant::now() > deadline {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    #[test]
    fn per_file_lines_share_one_write_and_nothing_overtakes_them() {
        let flushes = Flushes::default();
        let out = Arc::new(JsonOut::new(
            Box::new(flushes.clone()),
            Duration::from_secs(3600),
        ));
        for n in 0..3 {
            out.hold(format!("file {n}\n"));
        }
        out.write(Some("summary\n"));
        assert_eq!(
            flushes.wait_for(1),
            ["file 0\nfile 1\nfile 2\nsummary\n"],
            "held lines go first, in order, in one write"
        );
    }

    #[test]
    fn held_lines_are_written_without_another_line() {
        let flushes = Flushes::default();
        let out = Arc::new(JsonOut::new(
            Box::new(flushes.clone()),
            Duration::from_millis(10),
        ));
        out.hold("file 0\n".into());
        out.hold("file 1\n".into());
        assert_eq!(flushes.wait_for(1).concat(), "file 0\nfile 1\n");
        // The flusher sleeps until the next held line, and writes it too.
        out.hold("file 2\n".into());
        assert_eq!(flushes.wait_for(2).concat(), "file 0\nfile 1\nfile 2\n");
    }

    #[test]
    fn json_lines_keep_printable_ascii_and_escape_the_rest() {
        let plain = r#"{"event":"received","name":"a b.txt"}"#.to_string();
        assert_eq!(json_safe(plain.clone()), plain);
        assert_eq!(
            json_safe("{\"name\":\"a\u{1b}[31m\u{202e}é\"}".into()),
            r#"{"name":"a\u001b[31m\u202eé"}"#
        );
    }
}
