//! The receiving side: check the sender, decide, write to a private partial, verify, name
//! the file.
//!
//! Everything here assumes the sender may be hostile: it may stall, drip, lie about sizes,
//! offer thousands of files of one name, or vanish mid-prompt. Each resource it can make us
//! hold has a bound: the guarded QUIC windows until its manifest is accepted
//! ([`PeerConnection::open_windows`]), a shared budget for manifest bytes, at most
//! [`FILE_STREAMS`] files in flight per connection, [`super::store::DISK_JOBS`] blocking
//! disk jobs for the whole receiver, a stall timeout per stream and a minimum rate per
//! connection, names that are released by ownership, never by bookkeeping, and at most
//! [`super::BUNDLE_BYTES`] of small files buffered per stream before they are written.
//!
//! What is accepted is handed, as plans, to the file streams of [`super::stream`], which
//! read, verify and store it; the plans are published as their destinations are reserved,
//! after the decisions went out ([`super::plans`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use super::plans::{Plan, Plans, Publishing};
use super::reserve::NameBook;
use super::store::{self, Claims, Disk, Owner, SyncGate};
use super::stream::{StreamJob, TAKEOVER_WAIT, failed, read_header, stalled};
use super::vet::{self, human_bytes};
use super::{
    BUNDLE_FILES, Decision, Decisions, FileOffer, FileReport, Manifest, Observer, Outcome, Quiet,
    SMALL_FILE, TransferError, codes, read_frame_limited, stream_error, write_frame,
};
use crate::identity::Fingerprint;
use crate::node::{NodeError, PeerConnection};
use crate::server::{Service, Shutdown};

/// Streams for unknown or repeated file ids tolerated per batch before giving up.
const MAX_STRAY_STREAMS: usize = 16;
/// How long a connected sender may take to send its manifest.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes of large manifests being read at once across all connections: a manifest may be
/// up to [`super::MAX_FRAME`], so strangers claiming big manifests cannot make us buffer
/// hundreds of megabytes. Manifests up to 64 KiB (a few hundred files) need no budget, so
/// such claims never delay an ordinary sender.
pub const MANIFEST_BUDGET: usize = 32 << 20;
/// Files one sender may stream at once once accepted (the sender uses 8).
pub const FILE_STREAMS: u32 = 16;
/// Receive windows granted at once across all accepted senders. A window is what a sender
/// may make us buffer when the disk is slower than the network, so with `--yes` and a
/// crowd of senders it must not be 64 MiB each: the first senders get full windows
/// ([`crate::node::CONNECTION_WINDOW`]), later ones what is left, down to
/// [`MIN_WINDOW`] (still enough for a few MB/s per sender on a LAN).
pub const WINDOW_BUDGET: usize = 256 << 20;
/// The smallest receive window an accepted sender gets, budget or not.
pub const MIN_WINDOW: u32 = 256 << 10;
/// Default [`ReceiveOptions::stall_timeout`].
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Default [`ReceiveOptions::min_rate`]: 4 KiB/s.
pub const MIN_RATE: u64 = 4 << 10;
/// Bytes of small files read and not yet stored, across all senders: each stream holds
/// at most [`super::BUNDLE_BYTES`] of them, and a crowd of accepted senders waits rather
/// than adding up past this.
pub const SMALL_BUDGET: usize = 64 << 20;
/// Batches of small files being written at once, across all senders. New files in one
/// file system contend in the kernel's inode allocator: on ext4, 8 batches at once took
/// 1.18 s for 10,000 files where 2 took 0.82 s (after a mass deletion, when every
/// allocation scans), and on tmpfs 2 were no slower than 8. Naming and `syncfs` are not
/// counted: the next batch is written while the last is made durable.
pub const SMALL_WRITERS: usize = 2;
/// Default [`ReceiveOptions::partial_max_age`]: a week.
pub const PARTIAL_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
/// How long a sender without a ticket waits for one while the receiver expects tickets
/// (see [`Receiver::expect_tickets`]) before it is treated like any other stranger.
pub const TICKET_GRACE: Duration = Duration::from_secs(5);

/// Asks a human (or any policy) whether to take offered files.
pub trait Consent: Send + Sync {
    /// One answer per file in `files`, in order: `true` accepts. Runs on a blocking
    /// thread, so it may wait for a person to type. Calls never overlap.
    fn decide(&self, sender: Fingerprint, files: &[FileOffer]) -> Vec<bool>;
}

/// Who may send files. There is deliberately no "accept strangers silently" default:
/// the caller picks one.
#[derive(Clone)]
pub enum Policy {
    /// Accept every file from everyone (`--yes`).
    AcceptAll,
    /// Accept files only from these keys (`--allow`); others are refused before they can
    /// offer anything.
    Allow(Vec<Fingerprint>),
    /// Ask for each batch.
    Ask(Arc<dyn Consent>),
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::AcceptAll => f.write_str("AcceptAll"),
            Policy::Allow(list) => f.debug_tuple("Allow").field(list).finish(),
            Policy::Ask(_) => f.write_str("Ask(..)"),
        }
    }
}

/// Where and how received files are stored.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// Directory files are written into; nothing is ever written outside it.
    pub out_dir: PathBuf,
    /// Replace existing files instead of choosing `name (1).ext`.
    pub overwrite: bool,
    /// Who may send.
    pub policy: Policy,
    /// Give up on a stream that moves no data for this long, and on a sender that moves
    /// no file for this long (the connection's keep-alives alone would hold a receiver
    /// forever). Also the window over which [`min_rate`](Self::min_rate) is measured.
    pub stall_timeout: Duration,
    /// A sender with files in flight must move at least this many bytes per second,
    /// averaged over windows of twice [`stall_timeout`](Self::stall_timeout); a slower one
    /// is cut off. A slow drip into many streams would otherwise hold descriptors forever.
    pub min_rate: u64,
    /// Keep names starting with `.` (else `.x` is stored as `_x`; see [`super::names::undot`]).
    pub allow_dotfiles: bool,
    /// Serve one accepted transfer, then finish (see [`Receiver::finished_once`]). Other
    /// senders arriving meanwhile are told the receiver is busy.
    pub once: bool,
    /// Partial files untouched for this long are removed when the receiver starts
    /// ([`super::clean_partials`]); `Duration::ZERO` removes every one not in use.
    pub partial_max_age: Duration,
    /// Write the one accepted file here instead of into `out_dir` (`receive --stdout`):
    /// a batch with more than one file (texts aside) is declined whole, nothing is
    /// resumed, and the file's bytes are released as they arrive, its hash checked at
    /// the end (the report says whether it matched).
    pub sink: Option<super::Sink>,
}

impl ReceiveOptions {
    /// Options storing into `out_dir` under `policy`, everything else at its default.
    pub fn new(out_dir: impl Into<PathBuf>, policy: Policy) -> Self {
        ReceiveOptions {
            out_dir: out_dir.into(),
            overwrite: false,
            policy,
            stall_timeout: STALL_TIMEOUT,
            min_rate: MIN_RATE,
            allow_dotfiles: false,
            once: false,
            partial_max_age: PARTIAL_MAX_AGE,
            sink: None,
        }
    }
}

/// What a receiving [`Server`](crate::server::Server) tells its user interface.
pub trait ReceiveEvents: Send + Sync + 'static {
    /// A sender connected and proved its key; returns the observer for this connection's
    /// files (file ids are per connection).
    fn connected(&self, _peer: &PeerConnection) -> Arc<dyn Observer> {
        Arc::new(Quiet)
    }
    /// A sender's batch ended: every file's report, or the connection-level error.
    fn finished(&self, _peer: &PeerConnection, _outcome: &Result<Vec<FileReport>, TransferError>) {}
    /// A connection attempt failed before authentication.
    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        tracing::debug!(%remote, "handshake failed: {error}");
    }
}

/// [`ReceiveEvents`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoEvents;

impl ReceiveEvents for NoEvents {}

/// Serves incoming transfers; share one across connections so that concurrent files
/// never pick the same destination and the disk budget is global. As a
/// [`Service`] it plugs into a [`Server`](crate::server::Server).
pub struct Receiver {
    options: ReceiveOptions,
    names: Arc<NameBook>,
    disk: Disk,
    claims: Arc<Claims>,
    syncs: Arc<SyncGate>,
    small_budget: Arc<Semaphore>,
    small_writers: Arc<Semaphore>,
    /// Consent prompts, one at a time; waiting for a turn holds no thread.
    prompts: tokio::sync::Mutex<()>,
    manifest_budget: Arc<Semaphore>,
    /// Receive windows of accepted senders, in KiB (see [`WINDOW_BUDGET`]).
    window_budget: Arc<Semaphore>,
    /// `Some(ok)` once the `--once` transfer has ended.
    once_done: watch::Sender<Option<bool>>,
    once_claimed: std::sync::atomic::AtomicBool,
    /// One-time admissions (see [`Receiver::admit`]).
    tickets: std::sync::Mutex<HashMap<Fingerprint, std::time::Instant>>,
    /// Live [`ExpectTickets`] guards.
    expecting: AtomicUsize,
    /// Woken on every admission, and when a guard ends.
    admitted: tokio::sync::Notify,
    events: Arc<dyn ReceiveEvents>,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// Returned by [`Receiver::expect_tickets`]: tickets are expected until it is dropped.
#[derive(Debug)]
pub struct ExpectTickets(Arc<Receiver>);

impl Drop for ExpectTickets {
    fn drop(&mut self) {
        self.0.expecting.fetch_sub(1, Ordering::SeqCst);
        // Senders still waiting look once more, then stop waiting if nobody expects.
        self.0.admitted.notify_waiters();
    }
}

/// The receiver's answer to one manifest.
struct Decided {
    decisions: Vec<Decision>,
    /// The files accepted (or resumed), still to be given destinations.
    accepted: Vec<Accepted>,
    /// Empty folders to make along with them.
    dirs: Vec<Vec<String>>,
    reports: HashMap<u32, FileReport>,
}

/// An accepted file before its destination is reserved.
struct Accepted {
    offer: FileOffer,
    resume: bool,
}

impl Receiver {
    /// A receiver storing into `options.out_dir`, which must exist.
    pub fn new(options: ReceiveOptions) -> Result<Arc<Self>, TransferError> {
        Self::with_events(options, Arc::new(NoEvents))
    }

    /// Like [`new`](Self::new), reporting to `events` when run as a [`Service`].
    pub fn with_events(
        options: ReceiveOptions,
        events: Arc<dyn ReceiveEvents>,
    ) -> Result<Arc<Self>, TransferError> {
        let out_error = |source| TransferError::OutDir {
            path: options.out_dir.display().to_string(),
            source,
        };
        let meta = std::fs::metadata(&options.out_dir).map_err(out_error)?;
        if !meta.is_dir() {
            return Err(out_error(std::io::Error::new(
                std::io::ErrorKind::NotADirectory,
                "not a directory",
            )));
        }
        store::partial_dir(&options.out_dir).map_err(out_error)?;
        match store::clean_partials(&options.out_dir, options.partial_max_age) {
            Ok(cleaned) if cleaned.files > 0 => tracing::info!(
                files = cleaned.files,
                bytes = cleaned.bytes,
                "removed stale partial files"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot clean partial files: {e}"),
        }
        Ok(Arc::new(Receiver {
            options,
            names: Arc::default(),
            disk: Disk::default(),
            claims: Arc::default(),
            syncs: Arc::default(),
            small_budget: Arc::new(Semaphore::new(SMALL_BUDGET)),
            small_writers: Arc::new(Semaphore::new(SMALL_WRITERS)),
            prompts: tokio::sync::Mutex::new(()),
            manifest_budget: Arc::new(Semaphore::new(MANIFEST_BUDGET)),
            window_budget: Arc::new(Semaphore::new(WINDOW_BUDGET >> 10)),
            once_done: watch::Sender::new(None),
            once_claimed: false.into(),
            tickets: Default::default(),
            expecting: AtomicUsize::new(0),
            admitted: tokio::sync::Notify::new(),
            events,
        }))
    }

    /// With [`ReceiveOptions::once`]: resolves when the one accepted transfer has ended
    /// (its sender has had the chance to read the verdicts), with `true` when every file
    /// of it arrived verified.
    pub async fn finished_once(&self) -> bool {
        let mut done = self.once_done.subscribe();
        // `wait_for` is cancel-safe: it only watches a value.
        match done.wait_for(Option::is_some).await {
            Ok(value) => value.unwrap_or(false),
            Err(_) => false,
        }
    }

    /// Serve one batch from an authenticated connection: check the sender, read the
    /// manifest, decide, receive the accepted files in parallel. Returns one report per
    /// offered file.
    pub async fn handle(
        &self,
        peer: &PeerConnection,
        observer: Arc<dyn Observer>,
    ) -> Result<Vec<FileReport>, TransferError> {
        self.handle_batch(peer, observer).await.0
    }

    /// [`handle`](Self::handle), also saying whether this batch claimed `--once`.
    async fn handle_batch(
        &self,
        peer: &PeerConnection,
        observer: Arc<dyn Observer>,
    ) -> (Result<Vec<FileReport>, TransferError>, bool) {
        let conn = &peer.connection;
        // First, before any policy: an older sender learns why, whoever it is.
        if let Err(e) = super::version::check_or_close(conn, super::version::Role::Sender) {
            return (Err(e.into()), false);
        }
        let mut ticket = self.take_ticket(&peer.fingerprint);
        let listed =
            matches!(&self.options.policy, Policy::Allow(list) if list.contains(&peer.fingerprint));
        if !ticket && !listed && !matches!(self.options.policy, Policy::AcceptAll) {
            ticket = self.wait_for_ticket(&peer.fingerprint).await;
        }
        if let Policy::Allow(_) = &self.options.policy
            && !ticket
            && !listed
        {
            let reason = format!("sender {} is not on the allow list", peer.fingerprint);
            crate::close_gate::close(conn, codes::NOT_ALLOWED.into(), reason.as_bytes());
            return (Err(TransferError::NotAllowed(reason)), false);
        }
        let offered = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(stream_error)?;
            let manifest: Manifest =
                read_frame_limited(&mut recv, super::MAX_FRAME, Some(&self.manifest_budget))
                    .await?;
            Ok::<_, TransferError>((send, manifest))
        };
        let (mut control_send, Manifest { files, dirs }) =
            match tokio::time::timeout(MANIFEST_TIMEOUT, offered).await {
                Ok(Ok(offered)) => offered,
                Ok(Err(e)) => return (Err(e), false),
                Err(_) => {
                    crate::close_gate::close(conn, codes::PROTOCOL.into(), b"no manifest in time");
                    return (
                        Err(TransferError::protocol("sender offered nothing")),
                        false,
                    );
                }
            };
        if files.len() + dirs.len() > super::MAX_FILES {
            crate::close_gate::close(conn, codes::PROTOCOL.into(), b"too many files");
            return (
                Err(TransferError::protocol("too many files offered")),
                false,
            );
        }
        let mut decided = self.decide(peer, files, dirs, ticket).await;
        let claimed = !decided.accepted.is_empty() && self.options.once && self.claim_once();
        if self.options.once && !claimed && !decided.accepted.is_empty() {
            decided.decline_all("the receiver is busy with another transfer (--once)");
        }
        let Decided {
            decisions,
            accepted,
            dirs,
            mut reports,
        } = decided;
        for report in reports.values() {
            observer.finished(report);
        }
        if let Err(e) = write_frame(&mut control_send, &Decisions { decisions }).await {
            return (Err(e), claimed);
        }
        // The sender is accepted: room for its files, from the shared window budget. The
        // permit lives as long as this batch.
        let _window = (!accepted.is_empty()).then(|| self.open_windows(peer));
        let batch = accepted
            .iter()
            .fold((0, 0), |(n, b), a| (n + 1, b + a.offer.size));
        // Destinations are reserved while the files are on their way, and published to
        // the streams as they are (see [`super::plans`]).
        let plans = Arc::new(Plans::default());
        let reserving = self.reserve(accepted, dirs, plans.reserving());
        let receiving = self.receive_accepted(peer, plans, batch, &observer, &mut reports);
        let ((), result) = tokio::join!(reserving, receiving);
        let mut reports: Vec<FileReport> = reports.into_values().collect();
        reports.sort_by_key(|r| r.id);
        (result.map(|()| reports), claimed)
    }

    /// Grow an accepted sender's receive window as far as [`WINDOW_BUDGET`] allows.
    fn open_windows(&self, peer: &PeerConnection) -> Option<tokio::sync::OwnedSemaphorePermit> {
        let full = crate::node::CONNECTION_WINDOW >> 10;
        let permit = [full, full / 4, full / 16]
            .into_iter()
            .find_map(|kib| self.window_budget.clone().try_acquire_many_owned(kib).ok());
        let window = permit
            .as_ref()
            .map_or(MIN_WINDOW, |p| p.num_permits() as u32 * 1024)
            .max(MIN_WINDOW);
        peer.open_windows_to(window, FILE_STREAMS + 1);
        permit
    }

    /// Let `sender` send one batch without asking and past an allow list, within `ttl`:
    /// the ticket a one-time code turns into once its PAKE has confirmed who the sender is.
    /// It is used up by that sender's next batch.
    pub fn admit(&self, sender: Fingerprint, ttl: Duration) {
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        tickets.retain(|_, expiry| *expiry > now);
        tickets.insert(sender, now + ttl);
        drop(tickets);
        self.admitted.notify_waiters();
    }

    /// Expect tickets while the guard lives: meet by code with it held. A sender that
    /// connects without a ticket (and is not otherwise allowed) then waits up to
    /// [`TICKET_GRACE`] for one instead of being refused (or asked about) at once.
    ///
    /// The race it covers: the sender's sealed hello reaches us through the rendezvous,
    /// but its connection comes straight to us, as soon as it has *our* hello and a path.
    /// One lost packet on our way from the rendezvous delays the hello, and so the ticket,
    /// by a retransmission timeout, while the sender is already here with its files.
    pub fn expect_tickets(self: &Arc<Self>) -> ExpectTickets {
        self.expecting.fetch_add(1, Ordering::SeqCst);
        ExpectTickets(self.clone())
    }

    /// While tickets are expected, wait (up to [`TICKET_GRACE`]) for `sender`'s.
    async fn wait_for_ticket(&self, sender: &Fingerprint) -> bool {
        let deadline = tokio::time::Instant::now() + TICKET_GRACE;
        loop {
            // Registered before checking, so an admission in between is not missed.
            let admitted = self.admitted.notified();
            tokio::pin!(admitted);
            admitted.as_mut().enable();
            if self.take_ticket(sender) {
                return true;
            }
            if self.expecting.load(Ordering::SeqCst) == 0 {
                return false;
            }
            // Cancel-safe: a notification and a timer.
            tokio::select! {
                () = admitted => {}
                () = tokio::time::sleep_until(deadline) => return self.take_ticket(sender),
            }
        }
    }

    /// Use up `sender`'s ticket, if it holds a live one.
    fn take_ticket(&self, sender: &Fingerprint) -> bool {
        let mut tickets = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
        tickets
            .remove(sender)
            .is_some_and(|expiry| expiry > std::time::Instant::now())
    }

    fn claim_once(&self) -> bool {
        !self.once_claimed.swap(true, Ordering::SeqCst)
    }

    /// Turn a manifest into decisions: safe names, size checks, consent, resumes. The
    /// destinations (and folders) are reserved after the decisions are sent
    /// ([`Receiver::reserve`]). Slow parts (the directory, a person) run off the async
    /// threads. A `ticket` is consent given in advance.
    async fn decide(
        &self,
        peer: &PeerConnection,
        files: Vec<FileOffer>,
        dirs: Vec<Vec<String>>,
        ticket: bool,
    ) -> Decided {
        let mut decided = Decided {
            decisions: Vec::with_capacity(files.len()),
            accepted: Vec::new(),
            dirs: Vec::new(),
            reports: HashMap::new(),
        };
        // First pass: what is acceptable at all; candidates keep their decision's index.
        let mut candidates: Vec<(usize, FileOffer)> = Vec::new();
        for checked in vet::offers(files, self.options.allow_dotfiles) {
            match checked {
                Err((offer, reason)) => decided.decline(&offer, None, reason),
                Ok(offer) => {
                    candidates.push((decided.decisions.len(), offer.clone()));
                    decided.decisions.push(Decision::Accept {
                        id: offer.id,
                        offset: 0,
                    });
                }
            }
        }
        // A sink takes one file: an offer of more is declined whole, rather than some
        // file picked (texts are shown, not written, so they do not count).
        let files = candidates.iter().filter(|(_, f)| !f.text).count();
        if self.options.sink.is_some() && files > 1 {
            let reason = format!(
                "the receiver writes one file to its output, and this offer has {files}: \
                 send them to a folder, or one at a time"
            );
            for (index, offer) in std::mem::take(&mut candidates) {
                if offer.text {
                    candidates.push((index, offer));
                } else {
                    decided.decline(&offer, Some(index), reason.clone());
                }
            }
        }
        // Empty folders: the unsafe ones are left out (and logged), they carry no data
        // (and a sink has no folder to make them in).
        let dirs = if self.options.sink.is_some() {
            Vec::new()
        } else {
            dirs
        };
        let (dirs, left_out) = vet::empty_folders(&dirs, self.options.allow_dotfiles);
        for why in left_out {
            tracing::warn!(sender = %peer.fingerprint, "empty folder left out: {why}");
        }
        if candidates.is_empty() {
            // Empty folders come with accepted files (consent covers them), or alone when
            // nobody needs to be asked.
            let alone =
                decided.decisions.is_empty() && !matches!(self.options.policy, Policy::Ask(_));
            if alone && !dirs.is_empty() {
                let out = self.options.out_dir.clone();
                self.disk.run(move || make_empty_dirs(&out, &dirs)).await;
            }
            return decided;
        }
        // Second pass: does it fit at all? Checked before anyone is asked.
        let out_dir = self.options.out_dir.clone();
        let free = self.disk.run(move || fs4::available_space(&out_dir)).await;
        let refusal = vet::space_refusal(candidates.iter().map(|(_, f)| f.size), free.ok());
        if let Some(reason) = refusal {
            for (index, offer) in candidates {
                decided.decline(&offer, Some(index), reason.clone());
            }
            return decided;
        }
        // Third pass: consent, for what survived.
        let verdicts = match &self.options.policy {
            // A ticket is consent given in advance (the receiver handed out the code).
            Policy::Ask(consent) if !ticket => {
                let _turn = self.prompts.lock().await;
                if peer.connection.close_reason().is_some() {
                    vec![false; candidates.len()]
                } else {
                    let consent = consent.clone();
                    let offers: Vec<FileOffer> =
                        candidates.iter().map(|(_, f)| f.clone()).collect();
                    let sender = peer.fingerprint;
                    tokio::task::spawn_blocking(move || consent.decide(sender, &offers))
                        .await
                        .unwrap_or_default()
                }
            }
            _ => vec![true; candidates.len()],
        };
        // Last: folders, reserved destinations and partials to resume (the directory is
        // inspected: blocking).
        let (accepted, refused): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .enumerate()
            .partition(|(i, _)| verdicts.get(*i).copied().unwrap_or(false));
        for (_, (index, offer)) in refused {
            decided.decline(&offer, Some(index), "declined by the receiver".into());
        }
        if accepted.is_empty() {
            return decided;
        }
        let partial_dir = self.options.out_dir.join(store::PARTIAL_DIR);
        let partials = self
            .disk
            .run(move || store::partial_hashes(&partial_dir).unwrap_or_default())
            .await;
        // A sender that comes back (it was killed, its network dropped) may still have a
        // transfer here that has not noticed: stop it, so that its partial and its names
        // are free for this one.
        let deadline = tokio::time::Instant::now() + TAKEOVER_WAIT;
        for (_, (_, offer)) in &accepted {
            if offer.size <= SMALL_FILE || offer.stream {
                continue;
            }
            for key in offer.part_keys() {
                if partials.contains(&key) {
                    self.claims.take_back(&key, owner_of(peer), deadline).await;
                }
            }
        }
        for (_, (index, offer)) in accepted {
            let resume = self.options.sink.is_none() && vet::resumable(&offer, &partials);
            if resume {
                decided.decisions[index] = Decision::Resume { id: offer.id };
            }
            decided.accepted.push(Accepted { offer, resume });
        }
        decided.dirs = dirs;
        decided
    }

    /// Folders and reserved destinations for the accepted files (the directory is
    /// inspected: blocking), published a chunk at a time in the manifest's order. A file
    /// whose destination cannot be had keeps its plan, with the reason, and fails when it
    /// arrives.
    async fn reserve(&self, accepted: Vec<Accepted>, dirs: Vec<Vec<String>>, to: Publishing) {
        if accepted.is_empty() {
            return;
        }
        let (names, dir, overwrite) = (
            self.names.clone(),
            self.options.out_dir.clone(),
            self.options.overwrite,
        );
        // Nothing is written to the folder for a sink, or for a text.
        let sink = self.options.sink.is_some();
        self.disk
            .run(move || {
                let batch = names.batch();
                make_empty_dirs(&dir, &dirs);
                // Each folder is made (and checked) once, however many files it holds.
                // Per folder: where it is, and whether this batch created it (then no name
                // in it needs looking up on disk: it was empty, and every name given out
                // since is in the book).
                let mut folders: HashMap<Vec<String>, Result<(PathBuf, bool), String>> =
                    HashMap::new();
                let mut plan = |Accepted { offer, resume }| {
                    let nowhere = sink || offer.text;
                    let wanted = if nowhere {
                        Vec::new()
                    } else {
                        offer.dir.clone()
                    };
                    let folder = folders.entry(wanted).or_insert_with_key(|wanted| {
                        store::make_dirs(&dir, wanted).map_err(|e| e.to_string())
                    });
                    let reservation = match folder {
                        // Without a disk check the first free name in the book is taken;
                        // linking never replaces a file unless `overwrite`.
                        Ok((folder, new)) => batch
                            .reserve(folder, &offer.name, overwrite || *new)
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.clone()),
                    };
                    Plan {
                        offer,
                        reservation,
                        resume,
                    }
                };
                let mut accepted = accepted.into_iter();
                loop {
                    let chunk: Vec<Plan> = accepted
                        .by_ref()
                        .take(BUNDLE_FILES)
                        .map(&mut plan)
                        .collect();
                    if chunk.is_empty() {
                        break;
                    }
                    to.publish(chunk);
                }
                // Publishing ends (and the batch's names it let go of are free) only now.
                drop(batch);
                drop(to);
            })
            .await;
    }

    /// Accept the planned files' streams and receive them concurrently, cutting off a
    /// sender that stalls or drips.
    async fn receive_accepted(
        &self,
        peer: &PeerConnection,
        plans: Arc<Plans>,
        (files, bytes): (u64, u64),
        observer: &Arc<dyn Observer>,
        reports: &mut HashMap<u32, FileReport>,
    ) -> Result<(), TransferError> {
        let conn = &peer.connection;
        let stall = self.options.stall_timeout;
        // The rate is judged over two stall periods, so that a single stalled stream is
        // reported as such (its file fails, with a verdict) before the connection as a
        // whole is judged too slow.
        let period = stall * 2;
        let least = (self.options.min_rate as f64 * period.as_secs_f64()) as u64;
        observer.batch(files, bytes);
        let job = Arc::new(StreamJob {
            disk: self.disk.clone(),
            partial_dir: self.options.out_dir.join(store::PARTIAL_DIR),
            out_dir: self.options.out_dir.clone(),
            overwrite: self.options.overwrite,
            stall,
            moved: Arc::new(AtomicU64::new(0)),
            plans,
            claims: self.claims.clone(),
            syncs: self.syncs.clone(),
            small_budget: self.small_budget.clone(),
            small_writers: self.small_writers.clone(),
            owner: owner_of(peer),
            budget: self.manifest_budget.clone(),
            cut: AtomicBool::new(false),
            sink: self.options.sink.clone(),
        });
        let mut last_moved = 0;
        let mut tasks: tokio::task::JoinSet<Vec<FileReport>> = tokio::task::JoinSet::new();
        let mut outcome = Ok(());
        let mut strays = 0;
        let mut window = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        // A loop held up (waiting for a plan, a header) judges one period, not a burst of
        // ticks with nothing moved between them.
        window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !job.plans.none_left() || !tasks.is_empty() {
            // One look at the flag for both guards (read before `none_left` looks again):
            // had the publishing ended between two looks, neither guard would wake the
            // loop when the last plans are taken.
            let publishing = job.plans.publishing();
            // Every branch is cancel-safe: `accept_bi` takes a stream only when it returns
            // it, `join_next` only when it yields, and the timers lose nothing.
            let accepted = tokio::select! {
                accepted = conn.accept_bi(), if !job.plans.none_left() => accepted,
                // The last plans are out: look again (all may be taken already).
                () = job.plans.all_published(), if publishing => continue,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    for report in joined.expect("receive task panicked") {
                        reports.insert(report.id, report);
                    }
                    continue;
                }
                _ = window.tick() => {
                    let now = job.moved.load(Ordering::Relaxed);
                    // Streams wait for their plans while destinations are booked: that
                    // time is ours, not the sender's.
                    if now - last_moved < least && !job.plans.publishing() {
                        let why = format!(
                            "the sender moved {} in the last {} s, less than the minimum {}/s",
                            human_bytes(now - last_moved),
                            period.as_secs_f64(),
                            human_bytes(self.options.min_rate)
                        );
                        job.cut.store(true, Ordering::Relaxed);
                        crate::close_gate::close(conn, codes::PROTOCOL.into(), b"too slow");
                        outcome = Err(TransferError::protocol(why));
                        break;
                    }
                    last_moved = now;
                    continue;
                }
                _ = tokio::time::sleep(stall), if tasks.is_empty() => {
                    job.cut.store(true, Ordering::Relaxed);
                    crate::close_gate::close(conn, codes::PROTOCOL.into(), b"stalled");
                    outcome = Err(stalled(stall));
                    break;
                }
            };
            let (send, mut recv) = match accepted {
                Ok(streams) => streams,
                Err(e) => {
                    outcome = Err(stream_error(e));
                    break;
                }
            };
            let header = match tokio::time::timeout(stall, read_header(&mut recv)).await {
                Ok(Ok(Some(h))) => Some(h),
                // An empty stream carries no file: a stray like any other.
                Ok(Ok(None)) => None,
                Ok(Err(e)) => {
                    outcome = Err(e);
                    break;
                }
                Err(_) => {
                    outcome = Err(stalled(stall));
                    break;
                }
            };
            let plan = match &header {
                Some(header) => job.plans.take(header.id).await,
                None => None,
            };
            let Some((header, plan)) = header.zip(plan) else {
                // Unknown or repeated id: refuse that stream, keep serving the others,
                // but not forever.
                let _ = recv.stop(codes::DECLINED.into());
                strays += 1;
                if strays > MAX_STRAY_STREAMS {
                    outcome = Err(TransferError::protocol(
                        "too many streams for files not accepted",
                    ));
                    break;
                }
                continue;
            };
            if header.offset != 0 {
                outcome = Err(TransferError::protocol(
                    "file stream at an offset that was not offered",
                ));
                job.plans.put_back(plan);
                break;
            }
            let (job, observer) = (job.clone(), observer.clone());
            tasks.spawn(async move { job.serve_stream(plan, send, recv, &*observer).await });
        }
        // Files that never got a stream fail; dropping their plans frees their names.
        let left: Vec<Plan> = job.plans.drain().await;
        for plan in left {
            let report = failed(&plan.offer, "the sender never sent it");
            job.report(&**observer, &report);
            reports.insert(plan.offer.id, report);
        }
        while let Some(joined) = tasks.join_next().await {
            for report in joined.expect("receive task panicked") {
                reports.insert(report.id, report);
            }
        }
        outcome
    }
}

impl Decided {
    /// Decline `offer`: replace its decision at `index`, or append one (first pass).
    fn decline(&mut self, offer: &FileOffer, index: Option<usize>, reason: String) {
        self.reports.insert(offer.id, declined(offer, &reason));
        let decision = Decision::Decline {
            id: offer.id,
            reason,
        };
        match index {
            Some(i) => self.decisions[i] = decision,
            None => self.decisions.push(decision),
        }
    }

    /// Turn every accepted file into a decline.
    fn decline_all(&mut self, reason: &str) {
        self.dirs.clear();
        for accepted in std::mem::take(&mut self.accepted) {
            let id = accepted.offer.id;
            self.reports.insert(id, declined(&accepted.offer, reason));
            for d in &mut self.decisions {
                if matches!(d, Decision::Accept { id: a, .. } | Decision::Resume { id: a } if *a == id)
                {
                    *d = Decision::Decline {
                        id,
                        reason: reason.to_string(),
                    };
                }
            }
        }
    }
}

impl Service for Receiver {
    async fn serve(self: Arc<Self>, peer: PeerConnection, mut shutdown: Shutdown) {
        let observer = self.events.connected(&peer);
        let (outcome, claimed) = tokio::select! {
            // Dropping the batch on shutdown ends it cleanly: partial files worth resuming
            // are kept by their guards (the others removed) and reserved names released
            // by their owners.
            r = self.handle_batch(&peer, observer) => r,
            () = shutdown.recv() => {
                crate::close_gate::close(&peer.connection, codes::SHUTDOWN.into(), b"receiver shutting down");
                (Err(TransferError::protocol("the receiver is shutting down")), false)
            }
        };
        self.events.finished(&peer, &outcome);
        // Let the sender read the verdicts and close first; don't wait forever, and not
        // past a shutdown (cancel-safe: both only wait).
        tokio::select! {
            _ = peer.connection.closed() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            () = shutdown.recv() => {}
        }
        if claimed {
            let ok = matches!(&outcome, Ok(reports) if reports.iter().all(FileReport::is_verified));
            self.once_done.send_replace(Some(ok));
        }
    }

    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        self.events.handshake_failed(remote, error);
    }
}

/// The owner of the partials a connection writes.
fn owner_of(peer: &PeerConnection) -> Owner {
    Owner {
        sender: peer.fingerprint,
        connection: peer.connection.stable_id(),
    }
}

/// Blocking: create the (checked) empty folders of a manifest below `out`.
fn make_empty_dirs(out: &Path, dirs: &[Vec<String>]) {
    for dir in dirs {
        if let Err(e) = store::make_dirs(out, dir) {
            tracing::warn!("cannot create an empty folder: {e}");
        }
    }
}

fn declined(offer: &FileOffer, reason: &str) -> FileReport {
    FileReport::new(offer, None, Outcome::Declined(reason.to_string()))
}
