//! What the user sees: progress bars and messages on stderr, or JSON events on stdout.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::{Arc, Mutex};

use indicatif::{HumanBytes, MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use qpunch::identity::Fingerprint;
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
        /// The peer's public address, as the rendezvous saw it.
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
    /// A rendezvous is serving.
    Rendezvous {
        addrs: Vec<String>,
        port: u16,
        alt_port: u16,
        fingerprint: Fingerprint,
    },
    /// A one-time code expired unused (a new `listening` event brings the next one).
    CodeExpired,
    /// A rendezvous paired two peers.
    Pairing {
        nameplate: String,
        receiver: String,
        sender: String,
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
    /// Something failed.
    Error { message: String },
    /// Counters of the shared socket and the server, at exit.
    Stats {
        #[serde(flatten)]
        socket: qpunch::socket::SocketStats,
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        server: Option<qpunch::server::ServerStats>,
        /// Codes offered on the LAN (a receiver without a rendezvous).
        #[serde(flatten, skip_serializing_if = "Option::is_none")]
        lan: Option<qpunch::meet::lan::LanStats>,
    },
}

/// Output mode plus the progress bars.
pub struct Ui {
    json: bool,
    quiet: bool,
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
        })
    }

    /// Emit an event: a JSON line in `--json` mode, else the human text (if any).
    pub fn event(&self, event: Event, human: Option<String>) {
        if self.json {
            let line = json_safe(&serde_json::to_string(&event).expect("events serialize"));
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        } else if let Some(text) = human {
            self.say(&text);
        }
    }

    /// A command's primary result on stdout (e.g. the receiver's banner), so it can be
    /// piped or copied; suppressed by --quiet and --json like other messages.
    pub fn output(&self, text: &str) {
        if !self.quiet && !self.json {
            let text = terminal(text);
            self.multi.suspend(|| println!("{text}"));
        }
    }

    /// A human message on stderr (suppressed by --quiet and --json).
    pub fn say(&self, text: &str) {
        if !self.quiet && !self.json {
            let text = terminal(text);
            self.multi.suspend(|| eprintln!("{text}"));
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
                "{msg:24!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_message(display_safe(name));
        bar
    }
}

/// A JSON line made safe for a terminal: every control or format character inside a
/// string becomes a `\uXXXX` escape (serde_json leaves C1 controls and bidi characters
/// raw, which is valid JSON but not harmless on a terminal). The JSON means the same.
fn json_safe(line: &str) -> String {
    use std::fmt::Write as _;
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

/// Progress bars and events for the files of one connection.
pub struct FileProgress {
    ui: Arc<Ui>,
    side: Side,
    bars: Mutex<HashMap<u32, ProgressBar>>,
}

impl FileProgress {
    pub fn new(ui: Arc<Ui>, side: Side) -> Arc<Self> {
        Arc::new(FileProgress {
            ui,
            side,
            bars: Mutex::new(HashMap::new()),
        })
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

    fn started(&self, id: u32, name: &str, size: u64) {
        let bar = self.ui.bar(name, size);
        self.bars.lock().unwrap().insert(id, bar);
    }

    fn progress(&self, id: u32, bytes: u64) {
        if let Some(bar) = self.bars.lock().unwrap().get(&id) {
            bar.inc(bytes);
        }
    }

    fn finished(&self, report: &FileReport) {
        if let Some(bar) = self.bars.lock().unwrap().remove(&report.id) {
            bar.finish_and_clear();
        }
        let name = display_safe(&report.name);
        let saved = report
            .saved_as
            .as_deref()
            .map(display_safe)
            .unwrap_or_default();
        match (&report.outcome, self.side) {
            (Outcome::Verified, Side::Sending) => self.ui.event(
                Event::Sent {
                    name: report.name.clone(),
                    bytes: report.size,
                    blake3: report.blake3.clone(),
                    saved_as: report.saved_as.clone().unwrap_or_default(),
                },
                Some(format!(
                    "sent {name} ({}), verified by the receiver as {saved}",
                    HumanBytes(report.size)
                )),
            ),
            (Outcome::Verified, Side::Receiving(from)) => self.ui.event(
                Event::Received {
                    name: report.name.clone(),
                    bytes: report.size,
                    blake3: report.blake3.clone(),
                    saved_as: report.saved_as.clone().unwrap_or_default(),
                    from,
                },
                Some(format!(
                    "received {saved} ({}), BLAKE3 {} verified",
                    HumanBytes(report.size),
                    &report.blake3[..16]
                )),
            ),
            (Outcome::Declined(reason), _) => {
                self.ui.event(
                    Event::Declined {
                        name: report.name.clone(),
                        reason: reason.clone(),
                    },
                    Some(format!("declined {name}: {reason}")),
                );
            }
            (Outcome::Failed(why), _) => {
                self.ui.error(&format!("{name}: {why}"));
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
        // The receiver refuses offers larger than its free space before asking, but a
        // sum of peer-chosen sizes is never trusted not to wrap.
        let total = files.iter().fold(0u64, |sum, f| sum.saturating_add(f.size));
        let answer = self.ui.multi.suspend(|| {
            eprintln!(
                "\n{sender} wants to send you {} file(s), {} in all:",
                files.len(),
                HumanBytes(total)
            );
            const SHOWN: usize = 20;
            for f in files.iter().take(SHOWN) {
                eprintln!("  {}  ({})", display_safe(&f.name), HumanBytes(f.size));
            }
            if files.len() > SHOWN {
                eprintln!("  ... and {} more", files.len() - SHOWN);
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
