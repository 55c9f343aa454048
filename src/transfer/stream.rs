//! The file streams of one accepted batch: read each entry, verify it, store it, answer a
//! verdict.
//!
//! [`super::receive`] decides what to accept and hands the accepted files over as [`Plan`]s;
//! from there a [`StreamJob`] owns them. The two never refer to each other's types beyond
//! that hand-over, which is why they are separate rooms.
//!
//! Small files (at most one group) are read into memory, hashed, and only then written,
//! a batch at a time: one `syncfs` per batch makes them durable before any takes its final
//! name and before their verdicts go out. Large files stream to a private partial that
//! survives interruptions; a sender that comes back resumes it (see [`super::store`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use super::bundle::{Bundle, Cut as BundleCut, interrupted, stall_message};
use super::plans::{Plan, Plans};
use super::store::{self, Claim, Claims, Disk, Owner, Part, PartGuard, SmallFile, SyncGate};
use super::tree::Tree;
use super::writer::Writer;
use super::{
    BUNDLE_BYTES, BUNDLE_FILES, FileHeader, FileOffer, FileReport, FileResult, MAX_TREE, Observer,
    Outcome, ResumeFrom, SMALL_FILE, Trailer, TransferError, codes, is_hash_hex, read_blob,
    write_frame,
};
use crate::frame::{self, FrameError};

/// Bytes handed from the network to the disk at a time (at most).
const CHUNK: usize = 1 << 20;

/// Bytes gathered before a buffer goes to disk (and the progress bar moves): large
/// enough for efficient writes, small enough that slow links still show progress.
const GATHER: usize = 256 << 10;

/// The least a read asks QUIC for while gathering, even when less is missing.
const MIN_READ: usize = 64 << 10;

/// How long a sender that comes back waits for its earlier, dead transfer to let go of the
/// partial it resumes.
pub(super) const TAKEOVER_WAIT: Duration = Duration::from_secs(5);

/// Largest file-stream header accepted (it is a few dozen bytes).
const MAX_HEADER: usize = 4 << 10;

/// Read the next entry's header, or `None` where the stream ends cleanly between entries.
pub(super) async fn read_header(
    recv: &mut quinn::RecvStream,
) -> Result<Option<FileHeader>, TransferError> {
    match frame::read(recv, MAX_HEADER).await {
        Err(FrameError::Ended) => Err(TransferError::protocol("stream ended inside a header")),
        other => Ok(other?),
    }
}

pub(super) fn stalled(after: Duration) -> TransferError {
    TransferError::protocol(stall_message(after))
}

pub(super) fn failed(offer: &FileOffer, reason: &str) -> FileReport {
    FileReport::new(offer, None, Outcome::Failed(reason.to_string()))
}

/// What the streams of one sender's batch share.
pub(super) struct StreamJob {
    pub(super) disk: Disk,
    pub(super) partial_dir: PathBuf,
    pub(super) out_dir: PathBuf,
    pub(super) overwrite: bool,
    pub(super) stall: Duration,
    /// Bytes moved on this connection, for the minimum-rate check.
    pub(super) moved: Arc<AtomicU64>,
    /// Accepted files not yet seen on any stream.
    pub(super) plans: Arc<Plans>,
    pub(super) claims: Arc<Claims>,
    pub(super) syncs: Arc<SyncGate>,
    /// See [`super::receive::SMALL_BUDGET`].
    pub(super) small_budget: Arc<Semaphore>,
    /// See [`super::receive::SMALL_WRITERS`].
    pub(super) small_writers: Arc<Semaphore>,
    /// Who writes this batch's partials.
    pub(super) owner: Owner,
    /// Bounds the memory of resumed files' trees (shared with manifests).
    pub(super) budget: Arc<Semaphore>,
    /// Set when this side cut the connection (too slow, or silent): that reason is the
    /// batch's one error, so the files it cut off are not reported as failures one by one.
    pub(super) cut: AtomicBool,
    /// Where the one accepted file goes instead of the folder (`receive --stdout`).
    pub(super) sink: Option<super::Sink>,
}

/// A small file of a stream, waiting for its batch to be stored.
enum Pending {
    /// Verified in memory.
    Store(Plan, SmallFile),
    /// A text, verified: shown, not stored.
    Text(Plan, String, String),
    /// Already failed: `(hash received, why)`.
    Failed(Plan, String, String),
}

/// How a file's transfer ended, for the stream it came on.
enum Ended {
    /// The entry was read whole: the stream can carry on with the next one.
    Clean,
    /// The stream is unusable (interrupted, out of step).
    Broken,
}

impl StreamJob {
    /// Tell `observer` how a file ended, unless it failed because this side cut the
    /// connection (see [`StreamJob::cut`]).
    pub(super) fn report(&self, observer: &dyn Observer, report: &FileReport) {
        if report.is_verified() || !self.cut.load(Ordering::Relaxed) {
            observer.finished(report);
        }
    }

    /// The saved name as the sender is told it: relative to the output directory.
    fn saved_as(&self, dest: &Path) -> Option<String> {
        let relative = dest.strip_prefix(&self.out_dir).ok()?;
        let parts: Vec<_> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy())
            .collect();
        Some(parts.join("/"))
    }

    /// Receive every entry of one stream, in order, answering a verdict for each.
    pub(super) async fn serve_stream(
        self: Arc<Self>,
        first: Plan,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        observer: &dyn Observer,
    ) -> Vec<FileReport> {
        if self.bundled(&first) {
            return self.serve_bundle(first, send, recv, observer).await;
        }
        let mut reports = Vec::new();
        let mut plan = first;
        loop {
            let offer = &plan.offer;
            observer.started(offer.id, &offer.name, offer.size);
            let (report, ended) = self
                .receive_large(plan, &mut send, &mut recv, observer)
                .await;
            self.report(observer, &report);
            reports.push(report);
            if matches!(ended, Ended::Broken) {
                let _ = recv.stop(codes::DECLINED.into());
                break;
            }
            let next = match tokio::time::timeout(self.stall, read_header(&mut recv)).await {
                Ok(Ok(Some(header))) if header.offset == 0 => self.plans.take(header.id).await,
                Ok(Ok(None)) => break,
                _ => None,
            };
            match next {
                Some(next) => plan = next,
                None => {
                    // Out of step, stalled, or a file not accepted: this stream is done.
                    let _ = recv.stop(codes::DECLINED.into());
                    break;
                }
            }
        }
        let _ = send.finish();
        reports
    }

    /// Whether `plan`'s file travels in a bundle: small, fresh, not a stream, and stored
    /// (a sink takes its one file through the large path, which writes as it reads; texts
    /// are shown, so they bundle).
    fn bundled(&self, plan: &Plan) -> bool {
        let offer = &plan.offer;
        offer.size <= SMALL_FILE
            && !plan.resume
            && !offer.stream
            && (self.sink.is_none() || offer.text)
    }

    /// Serve a bundle: a stream whose first file is small carries small files only (what
    /// a sender bundles), read in whole chunks ([`Bundle`]) and stored a batch at a time.
    async fn serve_bundle(
        &self,
        first: Plan,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
        observer: &dyn Observer,
    ) -> Vec<FileReport> {
        let mut reports = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut pending_bytes = 0;
        // Budget for the bytes in `pending`; let go with every flush.
        let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
        let mut bundle = Bundle::new(&mut recv, self.stall);
        let mut plan = first;
        loop {
            let offer = &plan.offer;
            observer.started(offer.id, &offer.name, offer.size);
            // At most SMALL_FILE: fits a u32.
            let need = offer.size as u32;
            let permit = match self.small_budget.clone().try_acquire_many_owned(need) {
                Ok(permit) => permit,
                Err(_) => {
                    // Wait holding nothing (flush first), so waiters never block each
                    // other.
                    self.flush(&mut pending, &mut send, &mut reports, observer)
                        .await;
                    (pending_bytes, held) = (0, None);
                    let budget = self.small_budget.clone();
                    budget.acquire_many_owned(need).await.expect("never closed")
                }
            };
            match &mut held {
                Some(held) => held.merge(permit),
                None => held = Some(permit),
            }
            let (read, ended) = self.read_small(&mut bundle, &plan.offer, observer).await;
            pending_bytes += plan.offer.size;
            pending.push(match read {
                Ok(file) if plan.offer.text => match String::from_utf8(file.data.to_vec()) {
                    Ok(text) => Pending::Text(plan, file.hash, text),
                    Err(_) => Pending::Failed(plan, file.hash, "the text is not UTF-8".into()),
                },
                Ok(mut file) => match plan.dest() {
                    Ok(dest) => {
                        file.dest = dest.to_path_buf();
                        Pending::Store(plan, file)
                    }
                    Err(why) => Pending::Failed(plan, file.hash, why),
                },
                Err((hash, why)) => Pending::Failed(plan, hash, why),
            });
            let broken = matches!(ended, Ended::Broken);
            if broken || pending.len() >= BUNDLE_FILES || pending_bytes >= BUNDLE_BYTES {
                self.flush(&mut pending, &mut send, &mut reports, observer)
                    .await;
                (pending_bytes, held) = (0, None);
            }
            if broken {
                bundle.stop(codes::DECLINED);
                break;
            }
            let next = match bundle.frame::<FileHeader>(MAX_HEADER).await {
                Ok(Some(header)) if header.offset == 0 => self.plans.take(header.id).await,
                Ok(None) => break,
                _ => None,
            };
            match next {
                Some(next) if self.bundled(&next) => plan = next,
                other => {
                    // Out of step, stalled, a file not accepted, or a large file where
                    // only small ones belong (it stays planned, so it is reported as not
                    // sent): this stream is done.
                    if let Some(other) = other {
                        self.plans.put_back(other);
                    }
                    bundle.stop(codes::DECLINED);
                    break;
                }
            }
        }
        self.flush(&mut pending, &mut send, &mut reports, observer)
            .await;
        let _ = send.finish();
        reports
    }

    /// Read a small file's bytes: exactly its offered size, checked against its hash.
    async fn read_small(
        &self,
        bundle: &mut Bundle<'_>,
        offer: &FileOffer,
        observer: &dyn Observer,
    ) -> (Result<SmallFile, (String, String)>, Ended) {
        let data = match bundle.bytes(offer.size as usize).await {
            Ok(data) => data,
            Err((got, why)) => {
                let hash = blake3::hash(&got).to_hex().to_string();
                return (Err((hash, why)), Ended::Broken);
            }
        };
        self.moved.fetch_add(data.len() as u64, Ordering::Relaxed);
        observer.progress(offer.id, offer.size);
        let hash = blake3::hash(&data).to_hex().to_string();
        let expected = if offer.blake3.is_empty() {
            let trailer = match bundle.frame(MAX_HEADER).await {
                Ok(trailer) => check_trailer(Ok(trailer), offer, offer.size),
                Err(BundleCut::Frame(e)) => check_trailer(Err(e), offer, offer.size),
                Err(BundleCut::Failed(why)) => Err(why),
            };
            match trailer {
                Ok(trailer) => trailer.blake3,
                Err(why) => return (Err((hash, why)), Ended::Broken),
            }
        } else {
            offer.blake3.clone()
        };
        if hash != expected {
            let why = "BLAKE3 mismatch: the file arrived corrupted or changed".to_string();
            return (Err((hash, why)), Ended::Clean);
        }
        (
            Ok(SmallFile {
                data,
                hash,
                dest: PathBuf::new(),
                executable: offer.executable,
            }),
            Ended::Clean,
        )
    }

    /// Store the pending small files (one disk job, one `syncfs`), then answer their
    /// verdicts in order.
    async fn flush(
        &self,
        pending: &mut Vec<Pending>,
        send: &mut quinn::SendStream,
        reports: &mut Vec<FileReport>,
        observer: &dyn Observer,
    ) {
        if pending.is_empty() {
            return;
        }
        let mut entries = std::mem::take(pending);
        let files: Vec<SmallFile> = entries
            .iter_mut()
            .filter_map(|entry| match entry {
                // The bytes move to the disk job; the entry keeps the hash for its verdict.
                Pending::Store(_, file) => Some(SmallFile {
                    data: std::mem::take(&mut file.data),
                    hash: file.hash.clone(),
                    dest: std::mem::take(&mut file.dest),
                    executable: file.executable,
                }),
                Pending::Failed(..) | Pending::Text(..) => None,
            })
            .collect();
        // Write, make durable (one syncfs shared with the batches finishing meanwhile),
        // then name: no file takes its name before its bytes are on disk.
        let files = Arc::new(files);
        let (dir, batch) = (self.partial_dir.clone(), files.clone());
        let writing = self.small_writers.acquire().await.expect("never closed");
        let written = self
            .disk
            .run(move || store::write_small(&dir, &batch))
            .await;
        drop(writing);
        let written = if written.iter().any(Result::is_ok) {
            match self.syncs.sync(&self.disk, &self.partial_dir).await {
                Ok(()) => written,
                Err(e) => written
                    .into_iter()
                    .map(|slot| {
                        slot?.discard();
                        Err(std::io::Error::new(e.kind(), e.to_string()))
                    })
                    .collect(),
            }
        } else {
            written
        };
        let (batch, overwrite) = (files.clone(), self.overwrite);
        let mut stored = self
            .disk
            .run(move || store::commit_small(written, &batch, overwrite))
            .await
            .into_iter();
        let mut verdicts = Vec::new();
        for entry in entries {
            let (plan, outcome) = match entry {
                Pending::Store(plan, file) => {
                    let outcome = match stored.next().expect("one result per file") {
                        Ok(()) => Ok(file.hash),
                        Err(e) => Err((file.hash, format!("cannot store the file: {e}"))),
                    };
                    (plan, outcome)
                }
                Pending::Failed(plan, hash, why) => (plan, Err((hash, why))),
                Pending::Text(plan, hash, text) => {
                    // Shown only once verified, in the order it came.
                    observer.text(plan.offer.id, &text);
                    (plan, Ok(hash))
                }
            };
            let (result, report) = self.verdict(plan, outcome);
            // Encoding a derived struct cannot fail.
            let _ = frame::encode_into(&mut verdicts, &result);
            self.report(observer, &report);
            reports.push(report);
        }
        // One write for the batch's verdicts, in order. If the sender is gone it cannot
        // read them; the local reports stand.
        let _ = send.write_all(&verdicts).await;
    }

    /// Tell the sender how `plan`'s file ended, and make the local report. The
    /// reservation is released here: the file exists under its name now, or it does not.
    async fn answer(
        &self,
        plan: Plan,
        outcome: Result<String, (String, String)>,
        send: &mut quinn::SendStream,
    ) -> FileReport {
        let (result, report) = self.verdict(plan, outcome);
        // If the sender is gone it cannot read the verdict; the local report stands.
        let _ = write_frame(send, &result).await;
        report
    }

    /// How `plan`'s file ended: the verdict for the sender and the local report. The
    /// reservation is released here: the file exists under its name now, or it does not.
    fn verdict(
        &self,
        plan: Plan,
        outcome: Result<String, (String, String)>,
    ) -> (FileResult, FileReport) {
        let Plan {
            offer, reservation, ..
        } = plan;
        let (result, report) = match outcome {
            Ok(hash) => {
                let stored = !offer.text && self.sink.is_none();
                let saved_as = match &reservation {
                    Ok(reservation) if stored => self.saved_as(reservation.dest()),
                    _ => None,
                };
                let result = FileResult {
                    id: offer.id,
                    verified: true,
                    blake3: hash.clone(),
                    saved_as: saved_as.clone(),
                    error: None,
                };
                let report = FileReport {
                    blake3: hash,
                    ..FileReport::new(&offer, saved_as, Outcome::Verified)
                };
                (result, report)
            }
            Err((hash, why)) => {
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
        drop(reservation);
        (result, report)
    }

    /// Receive one large file (resuming it when planned so), verify, name it, answer.
    async fn receive_large(
        &self,
        mut plan: Plan,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        observer: &dyn Observer,
    ) -> (FileReport, Ended) {
        // The claim on the partial is let go only after the answer (which releases the
        // reserved name): whoever waits for it finds both free.
        let mut claim = None;
        let (outcome, ended) = self
            .store(&mut plan, send, recv, observer, &mut claim)
            .await;
        if outcome.is_err() {
            let _ = recv.stop(codes::DECLINED.into());
        }
        let report = self.answer(plan, outcome, send).await;
        drop(claim);
        (report, ended)
    }

    /// For a resumed file: read and check the sender's tree, then claim and open the best
    /// partial (taking it over from a dead transfer of the same sender), proving its
    /// prefix; without a usable partial, a fresh one. Answers the offset on the stream.
    async fn open_resumed(
        &self,
        offer: &FileOffer,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(Part, Claim), String> {
        let want = Tree::encoded_len(offer.size).filter(|&len| len <= MAX_TREE);
        let want = want.ok_or("the file is too large to resume")?;
        let read = tokio::time::timeout(self.stall, read_blob(recv, want, &self.budget));
        let bytes = match read.await {
            Ok(Ok(bytes)) => bytes,
            Ok(Err(e)) => return Err(format!("no tree for the resume: {e}")),
            Err(_) => return Err(stall_message(self.stall)),
        };
        // Offered without a hash (a first send), the tree is the sender's word for its file,
        // as a trailer would be: it proves the partial's prefix, and its root is the hash
        // the whole must match.
        let tree = if offer.blake3.is_empty() {
            Tree::decode(&bytes).map_err(|e| format!("the sender's tree is malformed: {e}"))?
        } else {
            let root = blake3::Hash::from_hex(&offer.blake3).map_err(|e| e.to_string())?;
            Tree::decode_with_root(&bytes, &root)
                .map_err(|e| format!("the sender's tree is not its file's: {e}"))?
        };
        let tree = Arc::new(tree);
        drop(bytes);
        let (dir, keys) = (self.partial_dir.clone(), offer.part_keys());
        let candidates = self
            .disk
            .run(move || {
                keys.iter()
                    .flat_map(|key| store::partials_for(&dir, key))
                    .collect::<Vec<_>>()
            })
            .await;
        let mut opened = None;
        for path in candidates {
            let Some(claim) = self.claims.claim(&path, self.owner, TAKEOVER_WAIT).await else {
                continue;
            };
            let tree = tree.clone();
            let resumed = self
                .disk
                .run(move || Part::resume(&path, tree).map_err(|e| (path, e)))
                .await;
            match resumed {
                Ok(part) => {
                    opened = Some((part, claim));
                    break;
                }
                Err((path, e)) => tracing::debug!(path = %path.display(), "not resumed: {e}"),
            }
        }
        let (part, claim) = match opened {
            Some(opened) => opened,
            None => self.create(offer).await?,
        };
        let answer = ResumeFrom {
            id: offer.id,
            offset: part.offset(),
        };
        write_frame(send, &answer)
            .await
            .map_err(|e| format!("cannot answer the resume: {e}"))?;
        Ok((part, claim))
    }

    /// A fresh, claimed partial for `offer`: under its content hash when offered, else
    /// its path key (see [`FileOffer::part_keys`]); a stream's under a key nobody else
    /// finds, since it is never resumed.
    async fn create(&self, offer: &FileOffer) -> Result<(Part, Claim), String> {
        let hash = if offer.stream {
            let random: [u8; 32] = rand::random();
            blake3::hash(&random).to_hex().to_string()
        } else {
            offer.part_keys().swap_remove(0)
        };
        let dir = self.partial_dir.clone();
        let part = self
            .disk
            .run(move || Part::create(&dir, &hash))
            .await
            .map_err(|e| format!("cannot create a partial file: {e}"))?;
        let claim = self.claims.claim_new(part.path(), self.owner);
        Ok((part, claim))
    }

    /// Write the entry's bytes to a partial while checking them; on a full, matching file,
    /// move it to its destination. Returns the hash received, or that hash (possibly empty)
    /// and the reason, and whether the stream can go on. A stream's size, known at its
    /// end, is set in `plan`.
    async fn store(
        &self,
        plan: &mut Plan,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        observer: &dyn Observer,
        hold: &mut Option<Claim>,
    ) -> (Result<String, (String, String)>, Ended) {
        if let Some(sink) = &self.sink {
            return self.to_sink(sink, plan, recv, observer).await;
        }
        let broken = |why: String| (Err((String::new(), why)), Ended::Broken);
        // Nothing is written for a file that has nowhere to go.
        if let Err(why) = plan.dest() {
            return broken(why);
        }
        let offer = &plan.offer;
        let opened = if plan.resume {
            self.open_resumed(offer, send, recv).await
        } else {
            self.create(offer).await
        };
        // The claim outlives the part: the caller drops it.
        let part = match opened {
            Ok((part, claim)) => {
                let claim: &Claim = hold.insert(claim);
                (part, claim)
            }
            Err(why) => return broken(why),
        };
        let (part, claim) = part;
        let start = part.offset();
        if start > 0 {
            observer.skipped(offer.id, start);
        }
        // Keeps the partial for a resume, or removes it, on every early exit, including
        // this future being dropped. A stream is never resumed: nothing of it is kept.
        let mut guard = PartGuard::new(part.path());
        if offer.stream {
            guard.condemn();
        }
        guard.reached(start);
        let part_path = part.path().to_path_buf();
        let mut incoming = Incoming::new(recv, offer, start, &self.moved);
        // The disk appends while the next batches are gathered from the network.
        let mut writer = Writer::new(part, self.disk.clone());
        let mut received = start;
        let mut failure = None;
        let mut clean_end = true;
        let mut taken_over = false;
        while !incoming.ended && failure.is_none() {
            // One buffer of its own per batch: QUIC's chunks are slices of the datagrams
            // they came in, and a queued slice would keep its whole datagram (or GRO
            // batch) alive, uncounted. The copy replaces the one the disk job made.
            let mut batch = writer.buffer(GATHER + MIN_READ);
            while batch.len() < GATHER && !incoming.ended {
                let want = CHUNK.min(GATHER - batch.len()).max(MIN_READ);
                // Cancel-safe: `read_chunk` loses nothing when not polled to completion,
                // and a takeover only notifies. A stream's length prefixes are not read
                // cancel-safely, but nobody can take a stream's partial over (its key is
                // random), so that branch never wins for one.
                let read = tokio::select! {
                    read = tokio::time::timeout(self.stall, incoming.next(want)) => read,
                    () = claim.taken_over() => {
                        taken_over = true;
                        break;
                    }
                };
                match read {
                    Ok(Ok(Some(bytes))) => {
                        batch.extend_from_slice(&bytes);
                        // Reads of buffered data and pushes to a queue with room are
                        // ready at once: without this a stream could keep the runtime
                        // (and the other connections' QUIC work) waiting for megabytes.
                        tokio::task::consume_budget().await;
                        continue;
                    }
                    Ok(Ok(None)) => {}
                    Err(_) => failure = Some(stall_message(self.stall)),
                    Ok(Err(Cut::Short(why))) => {
                        clean_end = false;
                        failure = Some(why);
                    }
                    Ok(Err(Cut::Broken(why))) => failure = Some(why),
                }
                break;
            }
            if taken_over || batch.is_empty() {
                break;
            }
            let gathered = batch.len() as u64;
            // Cancel-safe: `push` queues nothing unless it completes.
            let pushed = tokio::select! {
                pushed = writer.push(batch.freeze()) => pushed,
                () = claim.taken_over() => {
                    taken_over = true;
                    break;
                }
            };
            if let Err(e) = pushed {
                failure = Some(write_failure(&e, offer.stream));
                break;
            }
            received += gathered;
            guard.reached(writer.written());
            observer.progress(offer.id, gathered);
        }
        if taken_over {
            // The new connection resumes from what is on disk: let go of the partial
            // now rather than after writing what is queued.
            writer.abandon();
            failure = Some("the same sender started over on a new connection".into());
        }
        let (part, written) = writer.finish().await;
        if let (Err(e), None) = (written, &failure) {
            failure = Some(write_failure(&e, offer.stream));
        }
        guard.reached(part.offset());
        let expected = match failure {
            None => self.expected(&mut incoming, received).await,
            Some(why) => Err((why, clean_end)),
        };
        let expected = match expected {
            Ok(expected) => expected,
            Err((why, clean_end)) => {
                if !clean_end {
                    // The sender said "that is all" short of the size: not an interruption.
                    guard.condemn();
                }
                return (Err((part.hash_so_far(), why)), Ended::Broken);
            }
        };
        plan.offer.size = received;
        let executable = plan.offer.executable;
        let (hash, synced) = self.disk.run(move || part.finish(executable)).await;
        if let Err(e) = synced {
            return (
                Err((hash, write_failure(&e, plan.offer.stream))),
                Ended::Clean,
            );
        }
        if hash != expected {
            guard.condemn();
            let why = "BLAKE3 mismatch: the file arrived corrupted or changed".into();
            return (Err((hash, why)), Ended::Clean);
        }
        let dest = match plan.dest() {
            Ok(dest) => dest.to_path_buf(),
            Err(why) => return (Err((hash, why)), Ended::Clean),
        };
        let (from, overwrite) = (part_path.clone(), self.overwrite);
        let to = dest.clone();
        let committed = self
            .disk
            .run(move || store::commit(&from, &to, overwrite))
            .await;
        if let Err(e) = committed {
            let name = self.saved_as(&dest).unwrap_or_default();
            let why = format!("cannot name the file {name}: {e}");
            return (Err((hash, why)), Ended::Clean);
        }
        guard.disarm(); // the partial is now the destination
        (Ok(hash), Ended::Clean)
    }

    /// The hash an entry's `received` bytes must have: the offered one, or its trailer's
    /// (read now, within the stall timeout). Errors say why and whether what arrived is
    /// worth keeping for a resume (not after a missing or lying trailer).
    async fn expected(
        &self,
        incoming: &mut Incoming<'_>,
        received: u64,
    ) -> Result<String, (String, bool)> {
        let offer = incoming.offer;
        if !offer.blake3.is_empty() {
            return Ok(offer.blake3.clone());
        }
        let trailer = read_trailer(incoming.recv, offer, received);
        match tokio::time::timeout(self.stall, trailer).await {
            Ok(Ok(trailer)) => Ok(trailer.blake3),
            // A missing or lying trailer is not an interruption: nothing is kept.
            Ok(Err(why)) => Err((why, false)),
            Err(_) => Err((stall_message(self.stall), true)),
        }
    }

    /// `receive --stdout`: write the entry's bytes to the sink as they arrive, hashing
    /// them, and check the hash at the end. What reaches the sink before a cut or a
    /// mismatch cannot be taken back: the verdict (and the CLI's exit status) says so.
    async fn to_sink(
        &self,
        sink: &super::Sink,
        plan: &mut Plan,
        recv: &mut quinn::RecvStream,
        observer: &dyn Observer,
    ) -> (Result<String, (String, String)>, Ended) {
        let offer = plan.offer.clone();
        let mut incoming = Incoming::new(recv, &offer, 0, &self.moved);
        let mut hasher = blake3::Hasher::new();
        let mut received = 0u64;
        let failure = loop {
            let read = tokio::time::timeout(self.stall, incoming.next(CHUNK)).await;
            let bytes = match read {
                Ok(Ok(Some(bytes))) => bytes,
                Ok(Ok(None)) => break None,
                Err(_) => break Some(stall_message(self.stall)),
                Ok(Err(Cut::Short(why) | Cut::Broken(why))) => break Some(why),
            };
            hasher.update(&bytes);
            let n = bytes.len() as u64;
            received += n;
            let sink = sink.clone();
            let written = self.disk.run(move || sink.write(&bytes)).await;
            if let Err(e) = written {
                break Some(format!("cannot write to the output: {e}"));
            }
            observer.progress(offer.id, n);
        };
        let hash = hasher.finalize().to_hex().to_string();
        if let Some(why) = failure {
            return (Err((hash, why)), Ended::Broken);
        }
        let expected = match self.expected(&mut incoming, received).await {
            Ok(expected) => expected,
            Err((why, _)) => return (Err((hash, why)), Ended::Broken),
        };
        let sink = sink.clone();
        if let Err(e) = self.disk.run(move || sink.flush()).await {
            return (
                Err((hash, format!("cannot write to the output: {e}"))),
                Ended::Clean,
            );
        }
        plan.offer.size = received;
        if hash != expected {
            let why = "BLAKE3 mismatch: the output is not what the sender sent".into();
            return (Err((hash, why)), Ended::Clean);
        }
        (Ok(hash), Ended::Clean)
    }
}

/// Why an entry's bytes stopped before their end.
enum Cut {
    /// The sender ended the stream short of the offered size: "that is all".
    Short(String),
    /// The stream broke (reset, connection lost, a malformed chunk).
    Broken(String),
}

/// Largest chunk of a stream entry accepted: the sender's are at most 1 MiB.
const MAX_STREAM_CHUNK: u32 = 16 << 20;

/// The bytes of one entry as they arrive: exactly the offered size from `start`, or, for
/// a stream, length-prefixed chunks up to an empty one.
struct Incoming<'a> {
    recv: &'a mut quinn::RecvStream,
    offer: &'a FileOffer,
    /// Sized: bytes still due. Chunked: bytes left in the current chunk.
    left: u64,
    /// The entry's bytes are all read.
    ended: bool,
    moved: &'a AtomicU64,
}

impl<'a> Incoming<'a> {
    fn new(
        recv: &'a mut quinn::RecvStream,
        offer: &'a FileOffer,
        start: u64,
        moved: &'a AtomicU64,
    ) -> Self {
        let left = if offer.stream { 0 } else { offer.size - start };
        Incoming {
            recv,
            offer,
            left,
            ended: !offer.stream && left == 0,
            moved,
        }
    }

    /// The next bytes (at most `max`), or `None` at the entry's end. Cancel-safe for a
    /// sized entry only (see [`StreamJob::store`]).
    async fn next(&mut self, max: usize) -> Result<Option<bytes::Bytes>, Cut> {
        if self.ended {
            return Ok(None);
        }
        if self.offer.stream && self.left == 0 {
            let mut len = [0u8; 4];
            self.recv.read_exact(&mut len).await.map_err(|e| match e {
                quinn::ReadExactError::FinishedEarly(_) => {
                    Cut::Broken("the stream ended without its end mark".into())
                }
                quinn::ReadExactError::ReadError(e) => Cut::Broken(interrupted(&e)),
            })?;
            let len = u32::from_be_bytes(len);
            if len == 0 {
                self.ended = true;
                return Ok(None);
            }
            if len == super::send::ABORTED {
                return Err(Cut::Broken(
                    "the sender could not read its input to the end".into(),
                ));
            }
            if len > MAX_STREAM_CHUNK {
                return Err(Cut::Broken(format!("a chunk of {len} bytes")));
            }
            self.left = len.into();
        }
        let want = (max as u64).min(self.left) as usize;
        match self.recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => {
                let n = chunk.bytes.len() as u64;
                self.moved.fetch_add(n, Ordering::Relaxed);
                self.left -= n;
                if !self.offer.stream && self.left == 0 {
                    self.ended = true;
                }
                Ok(Some(chunk.bytes))
            }
            Ok(None) if self.offer.stream => {
                Err(Cut::Broken("the stream ended inside a chunk".into()))
            }
            Ok(None) => {
                let got = self.offer.size - self.left;
                Err(Cut::Short(format!(
                    "got {got} of {} bytes",
                    self.offer.size
                )))
            }
            Err(e) => Err(Cut::Broken(interrupted(&e))),
        }
    }
}

/// Read the trailer of an entry of `offer` that brought `received` bytes.
async fn read_trailer(
    recv: &mut quinn::RecvStream,
    offer: &FileOffer,
    received: u64,
) -> Result<Trailer, String> {
    check_trailer(frame::read(recv, MAX_HEADER).await, offer, received)
}

/// The trailer read after an entry of `offer` that brought `received` bytes, if it is
/// one and belongs to it.
fn check_trailer(
    read: Result<Option<Trailer>, FrameError>,
    offer: &FileOffer,
    received: u64,
) -> Result<Trailer, String> {
    let trailer: Trailer = match read {
        Ok(Some(trailer)) => trailer,
        Ok(None) | Err(FrameError::Ended) => {
            return Err("the sender did not say the file's hash".into());
        }
        Err(e) => return Err(format!("no hash for the file: {e}")),
    };
    if trailer.id != offer.id || trailer.size != received || !is_hash_hex(&trailer.blake3) {
        return Err(format!(
            "a trailer for {} bytes of file {} after {received} bytes of file {}",
            trailer.size, trailer.id, offer.id
        ));
    }
    Ok(trailer)
}

/// A failed write, said plainly (a full disk is the usual cause). The sender reads it
/// too: no local paths in it.
fn write_failure(e: &std::io::Error, stream: bool) -> String {
    if e.raw_os_error() == Some(libc::ENOSPC) && stream {
        return "the disk is full (a stream cannot be resumed: nothing is kept)".into();
    }
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return "the disk is full (what arrived is kept for a resume)".into();
    }
    if e.kind() == std::io::ErrorKind::InvalidData {
        return format!("the data does not match the sender's tree: {e}");
    }
    format!("cannot write the file: {e}")
}
