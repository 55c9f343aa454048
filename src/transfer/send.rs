//! The sending side: hash (once: trees are cached), offer, stream, and wait for the
//! receiver's verdicts.
//!
//! Small files travel in bundles, several to a stream, read whole (they are at most one
//! group) and re-checked against their offered hash just before they go. Large files
//! stream from disk a few chunks ahead of the network; a resumed one first sends its tree
//! and continues from the offset the receiver proved. A file that changes while it is
//! being sent is caught (its size, times and inode are compared before and after
//! reading) and its stream reset, so the receiver never waits for a hash that cannot
//! match.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::tree::{GROUP, Tree, TreeCache};
use super::{
    BUNDLE_BYTES, BUNDLE_FILES, Decision, Decisions, FileHeader, FileOffer, FileReport, FileResult,
    Manifest, Observer, Outcome, ResumeFrom, SMALL_FILE, TransferError, codes, read_frame,
    stream_error, write_blob, write_frame,
};

/// Bytes read from disk per chunk handed to QUIC.
const CHUNK: usize = 1 << 20;
/// Streams (bundles or large files) sent at the same time on one connection.
const PARALLEL_STREAMS: usize = 8;
/// Chunks read ahead of the network: bounds the sender's memory per file.
const READ_AHEAD: usize = 4;
/// How long a sender whose stream was stopped waits for the verdict saying why.
const VERDICT_AFTER_STOP: Duration = Duration::from_secs(5);
/// Files at least this large have their trees cached: smaller ones hash faster than a
/// cache lookup costs.
const CACHE_FROM: u64 = 4 << 20;

/// A file to send and the name to offer for it.
#[derive(Debug, Clone, Default)]
pub struct Outgoing {
    /// The name offered to the receiver (which may still refuse or rename it).
    pub name: String,
    /// Where the bytes are read from.
    pub path: PathBuf,
    /// The folders it is offered in, outermost first (see [`FileOffer::dir`]).
    pub dir: Vec<String>,
    /// Offer it as executable.
    pub executable: bool,
    /// Its size when it was listed (for progress before hashing; the offer uses the size
    /// read while hashing).
    pub size: u64,
}

impl Outgoing {
    /// Offer `path` under its own file name.
    pub fn from_path(path: impl Into<PathBuf>) -> Result<Self, TransferError> {
        let path = path.into();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| TransferError::File {
                path: path.display().to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"),
            })?;
        Ok(Outgoing {
            name,
            path,
            ..Outgoing::default()
        })
    }
}

/// How [`send_files_with`] works.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Where trees of large files are remembered, so a re-send (a resume) does not hash
    /// them again. `None` hashes every time.
    pub cache: Option<Arc<TreeCache>>,
    /// Empty folders to recreate at the receiver (see [`super::Selection`]).
    pub empty_dirs: Vec<Vec<String>>,
    /// Give up when the receiver takes no data and sends no verdict for this long (it
    /// vanished without closing). Waiting for a person to accept the files is not bounded.
    pub stall_timeout: Duration,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            cache: None,
            empty_dirs: Vec::new(),
            stall_timeout: super::STALL_TIMEOUT,
        }
    }
}

/// `step`, unless the receiver lets it wait longer than `stall`: then the connection is
/// given up as timed out (and closed, so every other stream ends too).
async fn within<T>(
    connection: &quinn::Connection,
    stall: Duration,
    step: impl std::future::Future<Output = Result<T, TransferError>>,
) -> Result<T, TransferError> {
    match tokio::time::timeout(stall, step).await {
        Ok(result) => result,
        Err(_) => {
            let why = format!(
                "the receiver stopped answering for {} s",
                stall.as_secs_f64()
            );
            crate::close_gate::close(connection, codes::PROTOCOL.into(), why.as_bytes());
            Err(TransferError::Connection(quinn::ConnectionError::TimedOut))
        }
    }
}

/// BLAKE3 of a whole file, hashed on all cores with bounded memory ([`Tree::from_file`]:
/// one 256 KiB buffer per thread, never a map of the file).
pub async fn hash_file(path: &Path) -> Result<(u64, String), TransferError> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let tree = Tree::from_file(&path).map_err(|e| file_error(&path, e))?;
        Ok((tree.size(), tree.root().to_hex().to_string()))
    })
    .await
    .expect("hashing task panicked")
}

/// What identifies one version of a file cheaply: if any of it changes, the bytes may
/// have too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    inode: u64,
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        use std::os::unix::fs::MetadataExt;
        Stamp {
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            inode: meta.ino(),
        }
    }
}

/// A file ready to offer: its offer, its tree (large files), and its version.
struct Hashed {
    offer: FileOffer,
    path: PathBuf,
    tree: Option<Arc<Tree>>,
    stamp: Stamp,
}

/// Blocking: hash every file, small ones inline, large ones through the cache.
fn hash_all(
    files: Vec<Outgoing>,
    cache: Option<Arc<TreeCache>>,
    observer: &dyn Observer,
) -> Result<Vec<Hashed>, TransferError> {
    use std::io::Read;
    let mut hashed = Vec::with_capacity(files.len());
    for (id, file) in files.into_iter().enumerate() {
        let path = &file.path;
        let meta = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
        if !meta.is_file() {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
            return Err(file_error(path, e));
        }
        let stamp = Stamp::of(&meta);
        observer.hashing(id as u32, &file.name, stamp.size);
        let (size, root, tree) = if stamp.size <= SMALL_FILE {
            let mut data = Vec::with_capacity(stamp.size as usize);
            std::fs::File::open(path)
                .and_then(|f| f.take(SMALL_FILE + 1).read_to_end(&mut data))
                .map_err(|e| file_error(path, e))?;
            (data.len() as u64, blake3::hash(&data), None)
        } else {
            let tree = match &cache {
                Some(cache) if stamp.size >= CACHE_FROM => cache.tree(path),
                _ => Tree::from_file(path),
            }
            .map_err(|e| file_error(path, e))?;
            (tree.size(), tree.root(), Some(Arc::new(tree)))
        };
        let now = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
        if size != stamp.size || Stamp::of(&now) != stamp {
            return Err(file_error(path, changed("while it was being hashed")));
        }
        hashed.push(Hashed {
            offer: FileOffer {
                id: id as u32,
                name: file.name,
                size,
                blake3: root.to_hex().to_string(),
                dir: file.dir,
                executable: file.executable,
            },
            path: file.path,
            tree,
            stamp,
        });
    }
    Ok(hashed)
}

/// Offer `files` on `connection` and stream those the receiver accepts, in parallel
/// (see [`send_files_with`]).
pub async fn send_files(
    connection: &quinn::Connection,
    files: Vec<Outgoing>,
    observer: Arc<dyn Observer>,
) -> Result<Vec<FileReport>, TransferError> {
    send_files_with(connection, files, observer, SendOptions::default()).await
}

/// What one file stream carries.
enum Job {
    /// Small files, by index, sent back to back.
    Bundle(Vec<usize>),
    /// One large file; `true` when the receiver asked to resume it.
    Large(usize, bool),
}

/// Offer `files` (and `options.empty_dirs`) on `connection` and stream those the receiver
/// accepts, in parallel.
///
/// Returns one report per file, in order; a file counts as sent only when the receiver
/// confirmed its hash. Connection-level failures (refused sender, lost connection) are
/// errors.
pub async fn send_files_with(
    connection: &quinn::Connection,
    files: Vec<Outgoing>,
    observer: Arc<dyn Observer>,
    options: SendOptions,
) -> Result<Vec<FileReport>, TransferError> {
    if files.len() + options.empty_dirs.len() > super::MAX_FILES {
        return Err(TransferError::protocol(format!(
            "at most {} files and folders per send",
            super::MAX_FILES
        )));
    }
    let hashing = std::time::Instant::now();
    let hashed = {
        let (observer, cache) = (observer.clone(), options.cache.clone());
        tokio::task::spawn_blocking(move || hash_all(files, cache, &*observer))
            .await
            .expect("hashing task panicked")?
    };
    let hashed: Arc<Vec<Hashed>> = Arc::new(hashed);
    tracing::debug!(elapsed = ?hashing.elapsed(), files = hashed.len(), "hashed");

    let (mut control_send, mut control_recv) = connection.open_bi().await.map_err(stream_error)?;
    let manifest = Manifest {
        files: hashed.iter().map(|h| h.offer.clone()).collect(),
        dirs: options.empty_dirs,
    };
    write_frame(&mut control_send, &manifest).await?;
    drop(manifest);
    let Decisions { decisions } = read_frame(&mut control_recv).await?;
    if decisions.len() != hashed.len() {
        return Err(TransferError::protocol(
            "receiver answered for a different number of files",
        ));
    }

    let mut reports: Vec<Option<FileReport>> = (0..hashed.len()).map(|_| None).collect();
    let mut jobs = Vec::new();
    let mut bundle = Vec::new();
    let mut bundle_bytes = 0;
    let (mut accepted, mut accepted_bytes) = (0u64, 0u64);
    for (index, decision) in decisions.into_iter().enumerate() {
        let offer = &hashed[index].offer;
        let resume = match decision {
            Decision::Accept { id, offset: 0 } if id == offer.id => false,
            Decision::Resume { id } if id == offer.id && hashed[index].tree.is_some() => true,
            Decision::Decline { id, reason } if id == offer.id => {
                let reason = crate::text::peer(&reason);
                let report = FileReport::new(offer, None, Outcome::Declined(reason));
                observer.finished(&report);
                reports[index] = Some(report);
                continue;
            }
            other => {
                return Err(TransferError::protocol(format!(
                    "unexpected decision {other:?} for file {}",
                    offer.id
                )));
            }
        };
        accepted += 1;
        accepted_bytes += offer.size;
        if resume || offer.size > SMALL_FILE {
            jobs.push(Job::Large(index, resume));
            continue;
        }
        if bundle.len() == BUNDLE_FILES || bundle_bytes + offer.size > BUNDLE_BYTES {
            jobs.push(Job::Bundle(std::mem::take(&mut bundle)));
            bundle_bytes = 0;
        }
        bundle.push(index);
        bundle_bytes += offer.size;
    }
    if !bundle.is_empty() {
        jobs.push(Job::Bundle(bundle));
    }
    observer.batch(accepted, accepted_bytes);

    let mut tasks = tokio::task::JoinSet::new();
    // A few streams at a time: enough to overlap one file's tail with the next one's
    // start, without thousands of open files and read-ahead buffers at once.
    let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL_STREAMS));
    let stall = options.stall_timeout;
    for job in jobs {
        let (connection, observer, slots, hashed) = (
            connection.clone(),
            observer.clone(),
            slots.clone(),
            hashed.clone(),
        );
        tasks.spawn(async move {
            let _slot = slots
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            match job {
                Job::Bundle(indices) => {
                    send_bundle(&connection, &hashed, indices, stall, &*observer).await
                }
                Job::Large(index, resume) => {
                    let file = &hashed[index];
                    let result = send_large(&connection, file, resume, stall, &*observer).await;
                    vec![(index, result)]
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        for (index, result) in joined.expect("send task panicked") {
            let offer = &hashed[index].offer;
            let report = match result {
                // Everything in a verdict is the receiver's text: escaped before anyone
                // sees it.
                Ok(result) if result.verified && result.blake3 == offer.blake3 => {
                    let saved_as = result.saved_as.as_deref().map(crate::text::peer);
                    FileReport::new(offer, saved_as, Outcome::Verified)
                }
                Ok(result) => {
                    let why = result.error.as_deref().map_or_else(
                        || "receiver could not verify the file".into(),
                        crate::text::peer,
                    );
                    FileReport::new(offer, None, Outcome::Failed(why))
                }
                // Losing the connection fails every file still in flight: report it once,
                // as the connection error, rather than as many per-file failures.
                Err(TransferError::Connection(e)) => return Err(TransferError::Connection(e)),
                Err(TransferError::NotAllowed(e)) => return Err(TransferError::NotAllowed(e)),
                Err(e) => FileReport::new(offer, None, Outcome::Failed(e.to_string())),
            };
            observer.finished(&report);
            reports[index] = Some(report);
        }
    }
    // Tell the receiver this batch is over; it may be serving more.
    let _ = control_send.finish();
    Ok(reports
        .into_iter()
        .map(|r| r.expect("every file reported"))
        .collect())
}

/// Stream a bundle of small files on one stream and read their verdicts, in order. A file
/// that changed since it was hashed is not sent (its report says why).
async fn send_bundle(
    connection: &quinn::Connection,
    hashed: &Arc<Vec<Hashed>>,
    indices: Vec<usize>,
    stall: Duration,
    observer: &dyn Observer,
) -> Vec<(usize, Result<FileResult, TransferError>)> {
    let read = {
        let (hashed, indices) = (hashed.clone(), indices.clone());
        tokio::task::spawn_blocking(move || {
            indices
                .iter()
                .map(|&i| read_small(&hashed[i]))
                .collect::<Vec<_>>()
        })
        .await
        .expect("read task panicked")
    };
    let mut results = Vec::with_capacity(indices.len());
    let mut sent = Vec::with_capacity(indices.len());
    let (mut send, mut recv) = match connection.open_bi().await {
        Ok(streams) => streams,
        Err(e) => {
            // Reported on the bundle's first file; the others follow from it.
            results.push((indices[0], Err(stream_error(e))));
            return fill_bundle(results, &indices);
        }
    };
    let streamed = async {
        for (&index, data) in indices.iter().zip(read) {
            let offer = &hashed[index].offer;
            match data {
                Ok(data) => {
                    let header = FileHeader {
                        id: offer.id,
                        offset: 0,
                    };
                    within(connection, stall, write_frame(&mut send, &header)).await?;
                    observer.started(offer.id, &offer.name, offer.size);
                    let write = async { send.write_chunk(data).await.map_err(stream_error) };
                    within(connection, stall, write).await?;
                    observer.progress(offer.id, offer.size);
                    sent.push(index);
                }
                Err(e) => results.push((index, Err(e))),
            }
        }
        send.finish()
            .map_err(|e| TransferError::protocol(e.to_string()))
    };
    let mut failure = streamed.await.err();
    // Verdicts for every file written, even when writing the rest failed: a receiver
    // that refused a file (and stopped the stream) says why in its verdict.
    for index in sent {
        let verdict = read_verdict(&mut recv, hashed[index].offer.id);
        match within(connection, stall, verdict).await {
            Ok(result) => results.push((index, Ok(result))),
            Err(e) => {
                results.push((index, Err(failure.take().unwrap_or(e))));
                break;
            }
        }
    }
    if let Some(e) = failure
        && let Some(&index) = indices
            .iter()
            .find(|&&i| !results.iter().any(|(r, _)| *r == i))
    {
        results.push((index, Err(e)));
    }
    fill_bundle(results, &indices)
}

/// Every file of a bundle gets a result, even after a stream failure.
fn fill_bundle(
    mut results: Vec<(usize, Result<FileResult, TransferError>)>,
    indices: &[usize],
) -> Vec<(usize, Result<FileResult, TransferError>)> {
    for &index in indices {
        if !results.iter().any(|(i, _)| *i == index) {
            results.push((
                index,
                Err(TransferError::protocol("the bundle's stream failed first")),
            ));
        }
    }
    results
}

/// Blocking: a small file's bytes, if it is still the version that was hashed.
fn read_small(file: &Hashed) -> Result<Bytes, TransferError> {
    use std::io::Read;
    let path = &file.path;
    let mut f = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
    let before = Stamp::of(&f.metadata().map_err(|e| file_error(path, e))?);
    let mut data = Vec::with_capacity(file.offer.size as usize);
    (&mut f)
        .take(SMALL_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| file_error(path, e))?;
    if before != file.stamp
        || data.len() as u64 != file.offer.size
        || blake3::hash(&data).to_hex().as_str() != file.offer.blake3
    {
        return Err(file_error(path, changed("since it was hashed")));
    }
    Ok(Bytes::from(data))
}

/// Read the verdict for file `id`.
async fn read_verdict(recv: &mut quinn::RecvStream, id: u32) -> Result<FileResult, TransferError> {
    let result: FileResult = read_frame(recv).await?;
    if result.id != id {
        return Err(TransferError::protocol("verdict for a different file"));
    }
    Ok(result)
}

/// Stream one large file (after the resume exchange, if asked) and read its verdict.
async fn send_large(
    connection: &quinn::Connection,
    file: &Hashed,
    resume: bool,
    stall: Duration,
    observer: &dyn Observer,
) -> Result<FileResult, TransferError> {
    let (offer, path) = (&file.offer, &file.path);
    let opened = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
    let now = Stamp::of(&opened.metadata().map_err(|e| file_error(path, e))?);
    if now != file.stamp {
        return Err(file_error(path, changed("since it was hashed")));
    }
    let (mut send, mut recv) = connection.open_bi().await.map_err(stream_error)?;
    write_frame(
        &mut send,
        &FileHeader {
            id: offer.id,
            offset: 0,
        },
    )
    .await?;
    observer.started(offer.id, &offer.name, offer.size);
    let mut offset = 0;
    if resume {
        let tree = file.tree.as_ref().expect("resumed files have trees");
        within(connection, stall, write_blob(&mut send, &tree.encode())).await?;
        let from: ResumeFrom = within(connection, stall, read_frame(&mut recv)).await?;
        let aligned = from.offset.is_multiple_of(GROUP) || from.offset == offer.size;
        if from.id != offer.id || from.offset > offer.size || !aligned {
            return Err(TransferError::protocol(format!(
                "the receiver asked to resume at byte {} of {}",
                from.offset, offer.size
            )));
        }
        offset = from.offset;
        observer.skipped(offer.id, offset);
    }

    // Disk reads run on a blocking thread, a few chunks ahead, so the QUIC thread only
    // packetizes and encrypts.
    let (chunks, mut next) = tokio::sync::mpsc::channel(READ_AHEAD);
    let (length, stamp) = (offer.size - offset, file.stamp);
    tokio::task::spawn_blocking(move || read_chunks(opened, offset, length, stamp, chunks));
    while let Some(chunk) = next.recv().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                // Tell the receiver now, rather than letting it wait for bytes.
                let code = if e.kind() == std::io::ErrorKind::InvalidData {
                    codes::CHANGED
                } else {
                    codes::READ_FAILED
                };
                let _ = send.reset(code.into());
                return Err(file_error(path, e));
            }
        };
        let n = chunk.len() as u64;
        let write = async { send.write_chunk(chunk).await.map_err(stream_error) };
        if let Err(e) = within(connection, stall, write).await {
            // A receiver that refused the file (a full disk) stopped the stream and says
            // why in its verdict.
            if matches!(e, TransferError::Protocol(_)) {
                let verdict = read_verdict(&mut recv, offer.id);
                if let Ok(Ok(result)) = tokio::time::timeout(VERDICT_AFTER_STOP, verdict).await {
                    return Ok(result);
                }
            }
            return Err(e);
        }
        observer.progress(offer.id, n);
    }
    send.finish()
        .map_err(|e| TransferError::protocol(e.to_string()))?;
    within(connection, stall, read_verdict(&mut recv, offer.id)).await
}

/// The error of a file that is not the version that was hashed (kind `InvalidData`).
fn changed(when: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("the file changed {when}: send it again once it is complete"),
    )
}

fn file_error(path: &Path, source: std::io::Error) -> TransferError {
    TransferError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Blocking: read `length` bytes from `offset` in [`CHUNK`]s into `out`. A file that ends
/// early, or whose size, times or inode differ from `stamp` once read, changed while it
/// was being sent: an `InvalidData` error, sent in place of the last chunk.
fn read_chunks(
    mut file: std::fs::File,
    offset: u64,
    length: u64,
    stamp: Stamp,
    out: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
) {
    use std::io::{Read, Seek};
    let mut remaining = length;
    let mut held: Option<Bytes> = None;
    let result = (|| {
        file.seek(std::io::SeekFrom::Start(offset))?;
        while remaining > 0 {
            let want = CHUNK.min(remaining as usize);
            let mut buf = Vec::with_capacity(want);
            let n = (&mut file).take(want as u64).read_to_end(&mut buf)?;
            if n == 0 {
                return Err(changed("while it was being sent"));
            }
            remaining -= n as u64;
            // The last chunk waits until the file is known unchanged.
            if let Some(previous) = held.replace(Bytes::from(buf))
                && out.blocking_send(Ok(previous)).is_err()
            {
                return Ok(()); // the sending side gave up
            }
        }
        if Stamp::of(&file.metadata()?) != stamp {
            return Err(changed("while it was being sent"));
        }
        if let Some(last) = held.take() {
            let _ = out.blocking_send(Ok(last));
        }
        Ok(())
    })();
    if let Err(e) = result {
        let _ = out.blocking_send(Err(e));
    }
}
