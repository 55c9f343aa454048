//! The receiving side: decide, write to `NAME.part`, verify, then name the file.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use super::names;
use super::{
    Decision, Decisions, FileHeader, FileOffer, FileReport, FileResult, Manifest, Observer,
    Outcome, TransferError, codes, is_hash_hex, read_frame, stream_error, write_frame,
};
use crate::identity::Fingerprint;
use crate::node::PeerConnection;

/// Bytes handed from the network to the disk writer at a time (at most).
const CHUNK: usize = 1 << 20;
/// Bytes gathered before a buffer goes to disk (and the progress bar moves): large
/// enough for efficient writes, small enough that slow links still show progress.
const GATHER: usize = 256 << 10;
/// Chunks queued per file between network and disk: bounds memory per transfer.
const QUEUE: usize = 8;
/// Streams for unknown or repeated file ids tolerated per batch before giving up.
const MAX_STRAY_STREAMS: usize = 16;
/// How long a connected sender may take to send its manifest.
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Asks a human (or any policy) whether to take offered files.
pub trait Consent: Send + Sync {
    /// One answer per file in `files`, in order: `true` accepts. Runs on a blocking
    /// thread, so it may wait for a person to type.
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
    /// Give up on a sender that moves no data for this long while a file is due (the
    /// connection's keep-alives alone would hold a `--once` receiver forever).
    pub stall_timeout: Duration,
}

/// Default [`ReceiveOptions::stall_timeout`].
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves incoming transfers; share one across connections so that concurrent files
/// never pick the same destination.
#[derive(Debug)]
pub struct Receiver {
    options: ReceiveOptions,
    /// Destinations reserved by transfers in progress.
    taken: Mutex<HashSet<PathBuf>>,
}

/// An accepted file: where it goes and what it must hash to.
struct Plan {
    offer: FileOffer,
    dest: PathBuf,
}

impl Receiver {
    /// A receiver storing into `options.out_dir`, which must exist.
    pub fn new(options: ReceiveOptions) -> Result<Arc<Self>, TransferError> {
        let meta = std::fs::metadata(&options.out_dir).map_err(|source| TransferError::OutDir {
            path: options.out_dir.display().to_string(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(TransferError::OutDir {
                path: options.out_dir.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        Ok(Arc::new(Receiver {
            options,
            taken: Mutex::new(HashSet::new()),
        }))
    }

    /// Serve one batch from an authenticated connection: check the sender, read the
    /// manifest, decide, receive the accepted files in parallel. Returns one report per
    /// offered file.
    pub async fn handle(
        &self,
        peer: &PeerConnection,
        observer: Arc<dyn Observer>,
    ) -> Result<Vec<FileReport>, TransferError> {
        let conn = &peer.connection;
        if let Policy::Allow(list) = &self.options.policy
            && !list.contains(&peer.fingerprint)
        {
            let reason = format!("sender {} is not on the allow list", peer.fingerprint);
            conn.close(codes::NOT_ALLOWED.into(), reason.as_bytes());
            return Err(TransferError::NotAllowed(reason));
        }
        let offered = async {
            let (send, mut recv) = conn.accept_bi().await.map_err(stream_error)?;
            let manifest: Manifest = read_frame(&mut recv).await?;
            Ok::<_, TransferError>((send, manifest))
        };
        let (mut control_send, Manifest { files }) =
            match tokio::time::timeout(MANIFEST_TIMEOUT, offered).await {
                Ok(offered) => offered?,
                Err(_) => return Err(TransferError::protocol("sender offered nothing")),
            };
        if files.len() > super::MAX_FILES {
            conn.close(codes::PROTOCOL.into(), b"too many files");
            return Err(TransferError::protocol("too many files offered"));
        }
        let (decisions, plans, mut reports) = self.decide(peer.fingerprint, files).await;
        for report in reports.values() {
            observer.finished(report);
        }
        write_frame(&mut control_send, &Decisions { decisions }).await?;

        let result = self
            .receive_accepted(conn, plans, &observer, &mut reports)
            .await;
        let mut reports: Vec<FileReport> = reports.into_values().collect();
        reports.sort_by_key(|r| r.id);
        result.map(|()| reports)
    }

    /// Turn a manifest into decisions: safe names, consent, then reserved destinations.
    async fn decide(
        &self,
        sender: Fingerprint,
        files: Vec<FileOffer>,
    ) -> (Vec<Decision>, HashMap<u32, Plan>, HashMap<u32, FileReport>) {
        let mut decisions = Vec::with_capacity(files.len());
        let mut reports = HashMap::new();
        let mut seen_ids = HashSet::new();
        // First pass: what is acceptable at all.
        let mut candidates = Vec::new();
        for mut offer in files {
            let problem = if !seen_ids.insert(offer.id) {
                Some("duplicate file id".to_string())
            } else if !is_hash_hex(&offer.blake3) {
                Some("malformed hash".to_string())
            } else {
                match names::sanitize(&offer.name) {
                    Ok(safe) => {
                        offer.name = safe;
                        None
                    }
                    Err(e) => Some(format!(
                        "unsafe file name {}: {e}",
                        names::display_safe(&offer.name)
                    )),
                }
            };
            match problem {
                Some(reason) => {
                    reports.insert(offer.id, declined(&offer, &reason));
                    decisions.push(Decision::Decline {
                        id: offer.id,
                        reason,
                    });
                }
                None => {
                    decisions.push(Decision::Accept {
                        id: offer.id,
                        offset: 0,
                    });
                    candidates.push(offer);
                }
            }
        }
        // Second pass: consent, for what survived.
        let verdicts = match &self.options.policy {
            Policy::Ask(consent) if !candidates.is_empty() => {
                let consent = consent.clone();
                let offers = candidates.clone();
                tokio::task::spawn_blocking(move || consent.decide(sender, &offers))
                    .await
                    .unwrap_or_default()
            }
            _ => vec![true; candidates.len()],
        };
        let mut plans = HashMap::new();
        for (i, offer) in candidates.into_iter().enumerate() {
            let reason = if verdicts.get(i).copied().unwrap_or(false) {
                match self.reserve(&offer.name) {
                    Ok(dest) => {
                        plans.insert(offer.id, Plan { offer, dest });
                        continue;
                    }
                    Err(e) => format!("cannot store it: {e}"),
                }
            } else {
                "declined by the receiver".to_string()
            };
            reports.insert(offer.id, declined(&offer, &reason));
            if let Some(d) = decisions
                .iter_mut()
                .find(|d| matches!(d, Decision::Accept { id, .. } if *id == offer.id))
            {
                *d = Decision::Decline {
                    id: offer.id,
                    reason,
                };
            }
        }
        (decisions, plans, reports)
    }

    fn reserve(&self, name: &str) -> std::io::Result<PathBuf> {
        let mut taken = self.taken.lock().unwrap_or_else(|e| e.into_inner());
        let dest =
            names::choose_destination(&self.options.out_dir, name, self.options.overwrite, &taken)?;
        taken.insert(dest.clone());
        Ok(dest)
    }

    fn release(&self, dest: &Path) {
        self.taken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(dest);
    }

    /// Accept one stream per planned file and receive them concurrently.
    async fn receive_accepted(
        &self,
        conn: &quinn::Connection,
        mut plans: HashMap<u32, Plan>,
        observer: &Arc<dyn Observer>,
        reports: &mut HashMap<u32, FileReport>,
    ) -> Result<(), TransferError> {
        let mut tasks = tokio::task::JoinSet::new();
        let mut outcome = Ok(());
        let mut expected = plans.len();
        let mut strays = 0;
        let stall = self.options.stall_timeout;
        while expected > 0 {
            // While files are in flight, waiting for the next stream is normal (the sender
            // streams a few at a time); with none in flight, silence is a stall.
            let accepted = tokio::select! {
                accepted = conn.accept_bi() => accepted,
                Some(joined) = tasks.join_next(), if !tasks.is_empty() => {
                    self.reap(joined, reports);
                    continue;
                }
                _ = tokio::time::sleep(stall), if tasks.is_empty() => {
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
            let header: FileHeader = match tokio::time::timeout(stall, read_frame(&mut recv)).await
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
            expected -= 1;
            if header.offset != 0 {
                outcome = Err(TransferError::protocol(
                    "file stream at an offset that was not offered",
                ));
                plans.insert(header.id, plan);
                break;
            }
            let observer = observer.clone();
            let overwrite = self.options.overwrite;
            tasks.spawn(async move {
                let dest = plan.dest.clone();
                let report = receive_file(plan, send, recv, overwrite, stall, &*observer).await;
                observer.finished(&report);
                (dest, report)
            });
        }
        // Files that never got a stream (connection lost) fail, and free their names.
        for plan in plans.into_values() {
            self.release(&plan.dest);
            let report = failed(&plan.offer, "the sender never sent it");
            observer.finished(&report);
            reports.insert(plan.offer.id, report);
        }
        while let Some(joined) = tasks.join_next().await {
            self.reap(joined, reports);
        }
        outcome
    }

    /// Record a finished file. Verified or not, its name is free again: the file exists
    /// now, or it does not.
    fn reap(
        &self,
        joined: Result<(PathBuf, FileReport), tokio::task::JoinError>,
        reports: &mut HashMap<u32, FileReport>,
    ) {
        let (dest, report) = joined.expect("receive task panicked");
        self.release(&dest);
        reports.insert(report.id, report);
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

/// Receive one file's bytes into `.part`, verify, rename, and tell the sender.
async fn receive_file(
    plan: Plan,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    overwrite: bool,
    stall: Duration,
    observer: &dyn Observer,
) -> FileReport {
    let Plan { offer, dest } = plan;
    let part = names::part_path(&dest);
    observer.started(offer.id, &offer.name, offer.size);
    let outcome = store(&offer, &dest, &part, &mut recv, overwrite, stall, observer).await;
    let (result, report) = match outcome {
        Ok(hash) => {
            let saved_as = dest.file_name().map(|n| n.to_string_lossy().into_owned());
            let result = FileResult {
                id: offer.id,
                verified: true,
                blake3: hash,
                saved_as: saved_as.clone(),
                error: None,
            };
            let report = FileReport::new(&offer, saved_as, Outcome::Verified);
            (result, report)
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
            (
                result,
                FileReport {
                    blake3: hash,
                    ..failed(&offer, &why)
                },
            )
        }
    };
    // If the sender is gone it cannot read the verdict; the local report stands.
    if write_frame(&mut send, &result).await.is_ok() {
        let _ = send.finish();
    }
    report
}

/// Write the stream to `part` while hashing; on a full, matching file, move it to
/// `dest`. Returns the hash received, or that hash (possibly empty) and the reason.
async fn store(
    offer: &FileOffer,
    dest: &Path,
    part: &Path,
    recv: &mut quinn::RecvStream,
    overwrite: bool,
    stall: Duration,
    observer: &dyn Observer,
) -> Result<String, (String, String)> {
    let fail = |why: String| (String::new(), why);
    // create_new: the destination chooser made sure no `.part` exists, so finding one now
    // means something else is writing it; never follow or clobber it.
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(!overwrite)
        .create(true)
        .truncate(true)
        .open(part)
        .map_err(|e| fail(format!("cannot create {}: {e}", part.display())))?;
    // Removes the `.part` on every early exit, including this future being dropped
    // (Ctrl-C, connection teardown), so no partial file outlives a failed transfer.
    let mut guard = PartGuard(Some(part.to_path_buf()));
    // Disk and hashing run on a blocking thread (another core), fed through a bounded
    // queue. The network side only moves reference-counted frames; the copy into one
    // contiguous buffer (which BLAKE3's SIMD and the disk both want) happens over there.
    let (to_disk, from_net) = mpsc::channel::<Vec<bytes::Bytes>>(QUEUE);
    let writer = tokio::task::spawn_blocking(move || write_and_hash(file, from_net));

    let mut received: u64 = 0;
    let mut failure = None;
    let mut finished = false;
    while !finished {
        let mut batch = Vec::new();
        let mut gathered = 0;
        while gathered < GATHER {
            let Ok(read) = tokio::time::timeout(stall, recv.read_chunk(CHUNK, true)).await else {
                failure = Some(stall_message(stall));
                finished = true;
                break;
            };
            match read {
                Ok(Some(chunk)) => {
                    gathered += chunk.bytes.len();
                    batch.push(chunk.bytes);
                }
                Ok(None) => {
                    finished = true;
                    break;
                }
                Err(e) => {
                    failure = Some(format!("transfer interrupted: {e}"));
                    finished = true;
                    break;
                }
            }
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
        observer.progress(offer.id, gathered as u64);
        if to_disk.send(batch).await.is_err() {
            break; // writer failed; its error is reported below
        }
    }
    drop(to_disk);
    let (hash, write_error) = writer.await.expect("writer panicked");
    let hash = hash.to_hex().to_string();
    if let Some(e) = write_error {
        return Err((hash, format!("cannot write {}: {e}", part.display())));
    }
    if let Some(why) = failure {
        return Err((hash, why));
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
    let (part_owned, dest_owned) = (part.to_path_buf(), dest.to_path_buf());
    tokio::task::spawn_blocking(move || names::commit_part(&part_owned, &dest_owned, overwrite))
        .await
        .expect("rename panicked")
        .map_err(|e| {
            (
                hash.clone(),
                format!("cannot name the file {}: {e}", dest.display()),
            )
        })?;
    guard.0 = None; // the part file is now the destination
    Ok(hash)
}

/// Deletes a `.part` file when dropped, unless disarmed by setting it to `None`.
struct PartGuard(Option<PathBuf>);

impl Drop for PartGuard {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Blocking: copy each batch into one buffer, hash it, write it, and fsync at the end.
/// Returns the hash of what was written and the first write error, if any.
fn write_and_hash(
    mut file: std::fs::File,
    mut batches: mpsc::Receiver<Vec<bytes::Bytes>>,
) -> (blake3::Hash, Option<std::io::Error>) {
    use std::io::Write;
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::with_capacity(GATHER + CHUNK);
    let mut writeback = Writeback::default();
    while let Some(batch) = batches.blocking_recv() {
        buf.clear();
        for bytes in &batch {
            buf.extend_from_slice(bytes);
        }
        hasher.update(&buf);
        if let Err(e) = file.write_all(&buf) {
            return (hasher.finalize(), Some(e));
        }
        writeback.advance(&file, buf.len() as u64);
    }
    // Durable before it is called complete.
    let synced = file.sync_all().err();
    (hasher.finalize(), synced)
}

/// Starts disk writeback of what was written so far, every [`WRITEBACK`] bytes, so the
/// final fsync waits for the last stretch only instead of the whole file.
#[derive(Default)]
struct Writeback {
    written: u64,
    flushed: u64,
}

/// Bytes between early-writeback requests.
const WRITEBACK: u64 = 16 << 20;

impl Writeback {
    fn advance(&mut self, file: &std::fs::File, n: u64) {
        self.written += n;
        if self.written - self.flushed < WRITEBACK {
            return;
        }
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on a valid, open descriptor; it only asks the kernel
            // to start writing back a range and touches no memory of ours.
            unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    self.flushed as libc::off64_t,
                    (self.written - self.flushed) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = file;
        self.flushed = self.written;
    }
}
