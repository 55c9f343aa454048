//! The receiving side: check the sender, decide, write to a private partial, verify, name
//! the file.
//!
//! Everything here assumes the sender may be hostile: it may stall, drip, lie about sizes,
//! offer thousands of files of one name, or vanish mid-prompt. Each resource it can make us
//! hold has a bound: the guarded QUIC windows until its manifest is accepted
//! ([`PeerConnection::open_windows`]), a shared budget for manifest bytes, at most
//! [`FILE_STREAMS`] files in flight per connection, [`super::store::DISK_JOBS`] blocking
//! disk jobs for the whole receiver, a stall timeout per stream and a minimum rate per
//! connection, and names that are released by ownership, never by bookkeeping.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, watch};

use super::reserve::{NameBook, Reservation};
use super::store::{self, Disk, Part, PartGuard};
use super::{
    Decision, Decisions, FileHeader, FileOffer, FileReport, FileResult, Manifest, Observer,
    Outcome, Quiet, TransferError, codes, is_hash_hex, names, read_frame_limited, stream_error,
    write_frame,
};
use crate::identity::Fingerprint;
use crate::node::{NodeError, PeerConnection};
use crate::server::{Service, Shutdown};

/// Bytes handed from the network to the disk at a time (at most).
const CHUNK: usize = 1 << 20;
/// Bytes gathered before a buffer goes to disk (and the progress bar moves): large
/// enough for efficient writes, small enough that slow links still show progress.
const GATHER: usize = 256 << 10;
/// Streams for unknown or repeated file ids tolerated per batch before giving up.
const MAX_STRAY_STREAMS: usize = 16;
/// How long a connected sender may take to send its manifest.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest file-stream header accepted (it is a few dozen bytes).
const MAX_HEADER: usize = 4 << 10;
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
    /// Keep names starting with `.` (else `.x` is stored as `_x`; see [`names::undot`]).
    pub allow_dotfiles: bool,
    /// Serve one accepted transfer, then finish (see [`Receiver::finished_once`]). Other
    /// senders arriving meanwhile are told the receiver is busy.
    pub once: bool,
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

/// An accepted file: where it goes and what it must hash to.
struct Plan {
    offer: FileOffer,
    reservation: Reservation,
}

/// The receiver's answer to one manifest.
struct Decided {
    decisions: Vec<Decision>,
    plans: HashMap<u32, Plan>,
    reports: HashMap<u32, FileReport>,
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
        Ok(Arc::new(Receiver {
            options,
            names: Arc::default(),
            disk: Disk::default(),
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
            conn.close(codes::NOT_ALLOWED.into(), reason.as_bytes());
            return (Err(TransferError::NotAllowed(reason)), false);
        }
        let offered = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(stream_error)?;
            let manifest: Manifest =
                read_frame_limited(&mut recv, super::MAX_FRAME, Some(&self.manifest_budget))
                    .await?;
            Ok::<_, TransferError>((send, manifest))
        };
        let (mut control_send, Manifest { files }) =
            match tokio::time::timeout(MANIFEST_TIMEOUT, offered).await {
                Ok(Ok(offered)) => offered,
                Ok(Err(e)) => return (Err(e), false),
                Err(_) => {
                    conn.close(codes::PROTOCOL.into(), b"no manifest in time");
                    return (
                        Err(TransferError::protocol("sender offered nothing")),
                        false,
                    );
                }
            };
        if files.len() > super::MAX_FILES {
            conn.close(codes::PROTOCOL.into(), b"too many files");
            return (
                Err(TransferError::protocol("too many files offered")),
                false,
            );
        }
        let mut decided = self.decide(peer, files, ticket).await;
        let claimed = !decided.plans.is_empty() && self.options.once && self.claim_once();
        if self.options.once && !claimed && !decided.plans.is_empty() {
            decided.decline_all("the receiver is busy with another transfer (--once)");
        }
        let Decided {
            decisions,
            plans,
            mut reports,
        } = decided;
        for report in reports.values() {
            observer.finished(report);
        }
        if let Err(e) = write_frame(&mut control_send, &Decisions { decisions }).await {
            // The plans (and with them the reserved names) are dropped here.
            return (Err(e), claimed);
        }
        // The sender is accepted: room for its files, from the shared window budget. The
        // permit lives as long as this batch.
        let _window = (!plans.is_empty()).then(|| self.open_windows(peer));
        let result = self
            .receive_accepted(conn, plans, &observer, &mut reports)
            .await;
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

    /// Turn a manifest into decisions: safe names, size checks, consent, then reserved
    /// destinations. Slow parts (the directory, a person) run off the async threads.
    async fn decide(&self, peer: &PeerConnection, files: Vec<FileOffer>, ticket: bool) -> Decided {
        let mut decided = Decided {
            decisions: Vec::with_capacity(files.len()),
            plans: HashMap::new(),
            reports: HashMap::new(),
        };
        let mut seen_ids = HashSet::new();
        // First pass: what is acceptable at all; candidates keep their decision's index.
        let mut candidates: Vec<(usize, FileOffer)> = Vec::new();
        for mut offer in files {
            let problem = if !seen_ids.insert(offer.id) {
                Some("duplicate file id".to_string())
            } else if !is_hash_hex(&offer.blake3) {
                Some("malformed hash".to_string())
            } else {
                match names::sanitize(&offer.name) {
                    Ok(safe) if self.options.allow_dotfiles => {
                        offer.name = safe;
                        None
                    }
                    Ok(safe) => {
                        offer.name = names::undot(&safe);
                        None
                    }
                    Err(e) => Some(format!(
                        "unsafe file name {}: {e}",
                        names::display_safe(&offer.name)
                    )),
                }
            };
            match problem {
                Some(reason) => decided.decline(&offer, None, reason),
                None => {
                    candidates.push((decided.decisions.len(), offer.clone()));
                    decided.decisions.push(Decision::Accept {
                        id: offer.id,
                        offset: 0,
                    });
                }
            }
        }
        if candidates.is_empty() {
            return decided;
        }
        // Second pass: does it fit at all? Checked before anyone is asked.
        let total = candidates
            .iter()
            .try_fold(0u64, |sum, (_, f)| sum.checked_add(f.size));
        let out_dir = self.options.out_dir.clone();
        let free = self.disk.run(move || fs4::available_space(&out_dir)).await;
        let refusal = match (total, free) {
            (None, _) => Some(
                "the offered sizes add up to more than 16 EiB: not enough free space".to_string(),
            ),
            (Some(total), Ok(free)) if total > free => Some(format!(
                "not enough free space: {} offered, {} free",
                human_bytes(total),
                human_bytes(free)
            )),
            _ => None,
        };
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
        // Last: reserve destinations (the directory is inspected: blocking).
        let (accepted, refused): (Vec<_>, Vec<_>) = candidates
            .into_iter()
            .enumerate()
            .partition(|(i, _)| verdicts.get(*i).copied().unwrap_or(false));
        for (_, (index, offer)) in refused {
            decided.decline(&offer, Some(index), "declined by the receiver".into());
        }
        let (names, dir, overwrite) = (
            self.names.clone(),
            self.options.out_dir.clone(),
            self.options.overwrite,
        );
        let reserved = self
            .disk
            .run(move || {
                accepted
                    .into_iter()
                    .map(|(_, (index, offer))| {
                        let reservation = names.reserve(&dir, &offer.name, overwrite);
                        (index, offer, reservation)
                    })
                    .collect::<Vec<_>>()
            })
            .await;
        for (index, offer, reservation) in reserved {
            match reservation {
                Ok(reservation) => {
                    decided.plans.insert(offer.id, Plan { offer, reservation });
                }
                Err(e) => decided.decline(&offer, Some(index), format!("cannot store it: {e}")),
            }
        }
        decided
    }

    /// Accept one stream per planned file and receive them concurrently, cutting off a
    /// sender that stalls or drips.
    async fn receive_accepted(
        &self,
        conn: &quinn::Connection,
        mut plans: HashMap<u32, Plan>,
        observer: &Arc<dyn Observer>,
        reports: &mut HashMap<u32, FileReport>,
    ) -> Result<(), TransferError> {
        let stall = self.options.stall_timeout;
        // The rate is judged over two stall periods, so that a single stalled stream is
        // reported as such (its file fails, with a verdict) before the connection as a
        // whole is judged too slow.
        let period = stall * 2;
        let least = (self.options.min_rate as f64 * period.as_secs_f64()) as u64;
        let moved = Arc::new(AtomicU64::new(0));
        let mut last_moved = 0;
        let mut tasks: tokio::task::JoinSet<FileReport> = tokio::task::JoinSet::new();
        let mut outcome = Ok(());
        let mut strays = 0;
        let mut window = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        while !plans.is_empty() || !tasks.is_empty() {
            // Every branch is cancel-safe: `accept_bi` takes a stream only when it returns
            // it, `join_next` only when it yields, and the timers lose nothing.
            let accepted = tokio::select! {
                accepted = conn.accept_bi(), if !plans.is_empty() => accepted,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    let report = joined.expect("receive task panicked");
                    reports.insert(report.id, report);
                    continue;
                }
                _ = window.tick() => {
                    let now = moved.load(Ordering::Relaxed);
                    if now - last_moved < least {
                        let why = format!(
                            "the sender moved {} in the last {} s, less than the minimum {}/s",
                            human_bytes(now - last_moved),
                            period.as_secs_f64(),
                            human_bytes(self.options.min_rate)
                        );
                        conn.close(codes::PROTOCOL.into(), b"too slow");
                        outcome = Err(TransferError::protocol(why));
                        break;
                    }
                    last_moved = now;
                    continue;
                }
                _ = tokio::time::sleep(stall), if tasks.is_empty() => {
                    conn.close(codes::PROTOCOL.into(), b"stalled");
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
            let header = match tokio::time::timeout(
                stall,
                read_frame_limited::<FileHeader>(&mut recv, MAX_HEADER, None),
            )
            .await
            {
                Ok(Ok(h)) => h,
                Ok(Err(e)) => {
                    outcome = Err(e);
                    break;
                }
                Err(_) => {
                    outcome = Err(stalled(stall));
                    break;
                }
            };
            let Some(plan) = plans.remove(&header.id) else {
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
                plans.insert(header.id, plan);
                break;
            }
            let job = FileJob {
                disk: self.disk.clone(),
                partial_dir: self.options.out_dir.join(store::PARTIAL_DIR),
                overwrite: self.options.overwrite,
                stall,
                moved: moved.clone(),
            };
            let observer = observer.clone();
            tasks.spawn(async move {
                let report = job.receive(plan, send, recv, &*observer).await;
                observer.finished(&report);
                report
            });
        }
        // Files that never got a stream fail; dropping their plans frees their names.
        for plan in plans.into_values() {
            let report = failed(&plan.offer, "the sender never sent it");
            observer.finished(&report);
            reports.insert(plan.offer.id, report);
        }
        while let Some(joined) = tasks.join_next().await {
            let report = joined.expect("receive task panicked");
            reports.insert(report.id, report);
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

    /// Turn every accepted file into a decline (dropping its reservation).
    fn decline_all(&mut self, reason: &str) {
        for (_, plan) in std::mem::take(&mut self.plans) {
            let id = plan.offer.id;
            self.reports.insert(id, declined(&plan.offer, reason));
            for d in &mut self.decisions {
                if matches!(d, Decision::Accept { id: a, .. } if *a == id) {
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
            // Dropping the batch on shutdown ends it cleanly: partial files are removed by
            // their guards and reserved names released by their owners.
            r = self.handle_batch(&peer, observer) => r,
            () = shutdown.recv() => {
                peer.connection.close(codes::SHUTDOWN.into(), b"receiver shutting down");
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

/// Why a transfer was given up when the sender went quiet.
fn stall_message(after: Duration) -> String {
    format!("the sender sent nothing for {} s", after.as_secs_f64())
}

fn stalled(after: Duration) -> TransferError {
    TransferError::protocol(stall_message(after))
}

fn declined(offer: &FileOffer, reason: &str) -> FileReport {
    FileReport::new(offer, None, Outcome::Declined(reason.to_string()))
}

fn failed(offer: &FileOffer, reason: &str) -> FileReport {
    FileReport::new(offer, None, Outcome::Failed(reason.to_string()))
}

/// Bytes for people (binary units), without pulling a UI crate into the library.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// What one file's task needs from the receiver.
struct FileJob {
    disk: Disk,
    partial_dir: PathBuf,
    overwrite: bool,
    stall: Duration,
    /// Bytes moved on this connection, for the minimum-rate check.
    moved: Arc<AtomicU64>,
}

impl FileJob {
    /// Receive one file's bytes, verify, name it, and tell the sender.
    async fn receive(
        self,
        plan: Plan,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        observer: &dyn Observer,
    ) -> FileReport {
        let Plan { offer, reservation } = plan;
        observer.started(offer.id, &offer.name, offer.size);
        let outcome = self
            .store(&offer, reservation.dest(), &mut recv, observer)
            .await;
        let (result, report) = match outcome {
            Ok(hash) => {
                let saved_as = reservation
                    .dest()
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned());
                let result = FileResult {
                    id: offer.id,
                    verified: true,
                    blake3: hash,
                    saved_as: saved_as.clone(),
                    error: None,
                };
                (result, FileReport::new(&offer, saved_as, Outcome::Verified))
            }
            Err((hash, why)) => {
                let _ = recv.stop(codes::DECLINED.into());
                let result = FileResult {
                    id: offer.id,
                    verified: false,
                    blake3: hash.clone(),
                    saved_as: None,
                    error: Some(why.clone()),
                };
                let report = FileReport {
                    blake3: hash,
                    ..failed(&offer, &why)
                };
                (result, report)
            }
        };
        // The file exists now, or it does not: its name is free either way.
        drop(reservation);
        // If the sender is gone it cannot read the verdict; the local report stands.
        if write_frame(&mut send, &result).await.is_ok() {
            let _ = send.finish();
        }
        report
    }

    /// Write the stream to a fresh partial while hashing; on a full, matching file, move it
    /// to `dest`. Returns the hash received, or that hash (possibly empty) and the reason.
    async fn store(
        &self,
        offer: &FileOffer,
        dest: &Path,
        recv: &mut quinn::RecvStream,
        observer: &dyn Observer,
    ) -> Result<String, (String, String)> {
        let fail = |why: String| (String::new(), why);
        let (dir, hash) = (self.partial_dir.clone(), offer.blake3.clone());
        let part = self
            .disk
            .run(move || Part::create(&dir, &hash))
            .await
            .map_err(|e| fail(format!("cannot create a partial file: {e}")))?;
        // Removes the partial on every early exit, including this future being dropped.
        let mut guard = PartGuard::new(part.path());
        let part_path = part.path().to_path_buf();
        let mut part = Some(part);
        // One disk write in flight while the next batch is gathered from the network.
        let mut writing: Option<tokio::task::JoinHandle<(Part, std::io::Result<()>)>> = None;
        let mut received: u64 = 0;
        let mut failure = None;
        let mut finished = false;
        while !finished {
            let mut batch = Vec::new();
            let mut gathered = 0;
            while gathered < GATHER {
                let read = tokio::time::timeout(self.stall, recv.read_chunk(CHUNK, true)).await;
                match read {
                    Err(_) => failure = Some(stall_message(self.stall)),
                    Ok(Ok(Some(chunk))) => {
                        gathered += chunk.bytes.len();
                        self.moved
                            .fetch_add(chunk.bytes.len() as u64, Ordering::Relaxed);
                        batch.push(chunk.bytes);
                        continue;
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => failure = Some(format!("transfer interrupted: {e}")),
                }
                finished = true;
                break;
            }
            if gathered == 0 {
                break;
            }
            received += gathered as u64;
            if received > offer.size {
                failure = Some(format!(
                    "sender sent more than the offered {} bytes",
                    offer.size
                ));
                break;
            }
            if let Some(previous) = writing.take() {
                let (back, written) = previous.await.expect("disk task");
                part = Some(back);
                if let Err(e) = written {
                    failure = Some(format!("cannot write {}: {e}", part_path.display()));
                    break;
                }
            }
            observer.progress(offer.id, gathered as u64);
            let mut p = part.take().expect("the part is back");
            writing = Some(self.disk.spawn(move || {
                let written = p.write(&batch);
                (p, written)
            }));
        }
        if let Some(previous) = writing.take() {
            let (back, written) = previous.await.expect("disk task");
            if let (Err(e), None) = (written, &failure) {
                failure = Some(format!("cannot write {}: {e}", part_path.display()));
            }
            part = Some(back);
        }
        let part = part.expect("the part is back");
        if let Some(why) = failure {
            return Err((part.hash_so_far(), why));
        }
        let (hash, synced) = self.disk.run(move || part.finish()).await;
        if let Err(e) = synced {
            return Err((hash, format!("cannot write {}: {e}", part_path.display())));
        }
        if received != offer.size {
            return Err((hash, format!("got {received} of {} bytes", offer.size)));
        }
        if hash != offer.blake3 {
            return Err((
                hash,
                "BLAKE3 mismatch: the file arrived corrupted or changed".into(),
            ));
        }
        let (from, to, overwrite) = (part_path.clone(), dest.to_path_buf(), self.overwrite);
        self.disk
            .run(move || store::commit(&from, &to, overwrite))
            .await
            .map_err(|e| {
                (
                    hash.clone(),
                    format!("cannot name the file {}: {e}", dest.display()),
                )
            })?;
        guard.disarm(); // the partial is now the destination
        Ok(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
    }
}
