//! The sending side: offer, stream (hashing as the bytes go), and wait for the
//! receiver's verdicts.
//!
//! Nothing is hashed before it is offered: a file whose tree an earlier send cached is
//! offered with its hash, every other one without, and the hash of what was read follows
//! its bytes (a [`Trailer`]). So the first byte moves as soon as the receiver consents,
//! and a pipe of unknown length is sent the same way. Small files travel in bundles,
//! several to a stream, read whole (they are at most one group). Large files stream from
//! disk a few chunks ahead of the network; a resumed one first sends its tree (computed
//! then, if it was not cached) and continues from the offset the receiver proved. A file
//! that changes while it is being sent is caught (its size, times and inode are compared
//! before and after reading) and its stream reset, so the receiver never waits for a
//! hash that cannot match.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::tree::{GROUP, Tree, TreeCache};
use super::{
    BUNDLE_BYTES, BUNDLE_FILES, Decision, Decisions, FileHeader, FileOffer, FileReport, FileResult,
    MAX_TEXT, Manifest, Observer, Outcome, ResumeFrom, SMALL_FILE, Trailer, TransferError, codes,
    read_frame, stream_error, write_blob, write_frame,
};
use crate::frame;

/// Bytes read from disk per chunk handed to QUIC.
const CHUNK: usize = 1 << 20;
/// Streams (bundles or large files) sent at the same time on one connection.
const PARALLEL_STREAMS: usize = 8;

/// Files in the first bundle; each next one holds twice as many, up to [`BUNDLE_FILES`].
/// The first bundles are read while the others are (up to [`PARALLEL_STREAMS`] at once):
/// eight full bundles read together kept the first byte waiting ~25 ms for 2,048 files
/// on two cores, where 16 files take a fraction of a millisecond.
const FIRST_BUNDLE_FILES: usize = 16;
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
    /// Its size when it was listed (for progress before it is offered; the offer uses the
    /// size found when it is).
    pub size: u64,
    /// Read the bytes from here, to its end, instead of from `path`: a stream of unknown
    /// length (`send -`), hashed as it goes and never resumed.
    pub reader: Option<Reader>,
    /// Send this text instead of a file (`send --text`): the receiver shows it rather than
    /// storing it. At most [`MAX_TEXT`] bytes.
    pub text: Option<String>,
    /// What [`select`](super::select) saw when it listed the file. A listing at most
    /// [`FRESH_LISTING`] old gives the offer its size and version instead of asking again
    /// (a folder of ten thousand files is offered that much sooner); an older one, e.g.
    /// after waiting for a peer to type a code, is asked again. A file that changes after
    /// it is offered is caught either way: its version is checked when it is read.
    pub listed: Option<Listed>,
}

/// A file's metadata and when it was read (see [`Outgoing::listed`]).
#[derive(Debug, Clone)]
pub struct Listed {
    /// The file's metadata (symbolic links followed).
    pub metadata: std::fs::Metadata,
    /// When it was read.
    pub at: std::time::Instant,
}

/// How old a listing may be for the offer to trust it (see [`Outgoing::listed`]).
pub const FRESH_LISTING: Duration = Duration::from_secs(1);

/// The source of a streamed [`Outgoing`]: read once, on a blocking thread.
#[derive(Clone)]
pub struct Reader(Arc<std::sync::Mutex<Option<Box<dyn std::io::Read + Send>>>>);

impl Reader {
    /// A stream read from `source` to its end.
    pub fn new(source: impl std::io::Read + Send + 'static) -> Reader {
        Reader(Arc::new(std::sync::Mutex::new(Some(Box::new(source)))))
    }

    /// The source, the first time (a stream can be sent once).
    fn take(&self) -> Option<Box<dyn std::io::Read + Send>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reader(..)")
    }
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

    /// Offer what `source` yields, to its end, as a file named `name` (a pipe: `send -`).
    pub fn from_reader(
        name: impl Into<String>,
        source: impl std::io::Read + Send + 'static,
    ) -> Self {
        Outgoing {
            name: name.into(),
            path: PathBuf::from("-"),
            reader: Some(Reader::new(source)),
            ..Outgoing::default()
        }
    }

    /// Offer `text` to be shown (at most [`MAX_TEXT`] bytes: longer texts are refused when
    /// sent).
    pub fn text(text: impl Into<String>) -> Self {
        let text = text.into();
        Outgoing {
            name: "text".into(),
            path: PathBuf::from("(text)"),
            size: text.len() as u64,
            text: Some(text),
            ..Outgoing::default()
        }
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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

/// Where an offered file's bytes come from.
enum Source {
    /// The file at [`Prepared::path`].
    File,
    /// A stream, read to its end.
    Stream(Reader),
    /// A text, in memory.
    Text(Bytes),
}

/// A file ready to offer: its offer, its tree (when a cache knew it), its version.
struct Prepared {
    offer: FileOffer,
    path: PathBuf,
    source: Source,
    tree: Option<Arc<Tree>>,
    stamp: Stamp,
}

/// Blocking: what to offer for each file, reading no file: sizes and versions from their
/// metadata, hashes only where a cache already has their trees.
fn prepare_all(
    files: Vec<Outgoing>,
    cache: Option<Arc<TreeCache>>,
) -> Result<Vec<Prepared>, TransferError> {
    let mut prepared = Vec::with_capacity(files.len());
    for (id, file) in files.into_iter().enumerate() {
        let mut offer = FileOffer {
            id: id as u32,
            name: file.name,
            dir: file.dir,
            executable: file.executable,
            ..FileOffer::default()
        };
        let (source, tree, stamp) = if let Some(text) = file.text {
            if text.len() as u64 > MAX_TEXT {
                let e = std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "a text may have at most {MAX_TEXT} bytes, this one has {}",
                        text.len()
                    ),
                );
                return Err(file_error(&file.path, e));
            }
            (offer.text, offer.size) = (true, text.len() as u64);
            (Source::Text(Bytes::from(text)), None, Stamp::default())
        } else if let Some(reader) = file.reader {
            offer.stream = true;
            (Source::Stream(reader), None, Stamp::default())
        } else {
            let path = &file.path;
            let meta = match file.listed {
                Some(listed) if listed.at.elapsed() <= FRESH_LISTING => listed.metadata,
                _ => std::fs::metadata(path).map_err(|e| file_error(path, e))?,
            };
            if !meta.is_file() {
                let e = std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file");
                return Err(file_error(path, e));
            }
            // Unreadable files are refused before anything is offered, as when every file
            // was hashed first: asking costs one call, reading waits for consent.
            readable(path, &meta).map_err(|e| file_error(path, e))?;
            let stamp = Stamp::of(&meta);
            offer.size = stamp.size;
            let tree = match &cache {
                Some(cache) if stamp.size >= CACHE_FROM => cache
                    .lookup(path)
                    .ok()
                    .flatten()
                    .filter(|t| t.size() == stamp.size),
                _ => None,
            };
            if let Some(tree) = &tree {
                let now = std::fs::metadata(path).map_err(|e| file_error(path, e))?;
                if Stamp::of(&now) != stamp {
                    return Err(file_error(path, changed("while it was being offered")));
                }
                offer.blake3 = tree.root().to_hex().to_string();
            }
            (Source::File, tree.map(Arc::new), stamp)
        };
        prepared.push(Prepared {
            offer,
            path: file.path,
            source,
            tree,
            stamp,
        });
    }
    Ok(prepared)
}

/// A file the receiver answered for: its verdict, and the hash and size of what was sent
/// (the offered ones, or what the trailer said).
struct Delivered {
    result: FileResult,
    blake3: String,
    size: u64,
}

/// Each file's ending, by index, as a sending task reports them.
type Sent = Vec<(usize, Result<Delivered, TransferError>)>;

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
    /// One stream.
    Stream(usize),
}

/// Offer `files` (and `options.empty_dirs`) on `connection` and stream those the receiver
/// accepts, in parallel.
///
/// Returns one report per file, in order; a file counts as sent only when the receiver
/// confirmed its hash. Connection-level failures (refused sender, lost connection) are
/// errors. A connection that negotiated an older files ALPN is closed first, with both
/// versions named ([`super::version`]).
pub async fn send_files_with(
    connection: &quinn::Connection,
    files: Vec<Outgoing>,
    observer: Arc<dyn Observer>,
    options: SendOptions,
) -> Result<Vec<FileReport>, TransferError> {
    super::version::check_or_close(connection, super::version::Role::Receiver)?;
    if files.len() + options.empty_dirs.len() > super::MAX_FILES {
        return Err(TransferError::protocol(format!(
            "at most {} files and folders per send",
            super::MAX_FILES
        )));
    }
    let prepared = {
        let cache = options.cache.clone();
        tokio::task::spawn_blocking(move || prepare_all(files, cache))
            .await
            .expect("offer task panicked")?
    };
    let prepared: Arc<Vec<Prepared>> = Arc::new(prepared);
    let cache = options.cache.clone();

    let (mut control_send, mut control_recv) = connection.open_bi().await.map_err(stream_error)?;
    let manifest = Manifest {
        files: prepared.iter().map(|p| p.offer.clone()).collect(),
        dirs: options.empty_dirs,
    };
    write_frame(&mut control_send, &manifest).await?;

    drop(manifest);
    let Decisions { decisions } = read_frame(&mut control_recv).await?;

    if decisions.len() != prepared.len() {
        return Err(TransferError::protocol(
            "receiver answered for a different number of files",
        ));
    }

    let mut reports: Vec<Option<FileReport>> = (0..prepared.len()).map(|_| None).collect();
    let mut jobs = Vec::new();
    let mut bundle = Vec::new();
    let mut bundle_bytes = 0;
    let mut bundle_files = FIRST_BUNDLE_FILES;
    let (mut accepted, mut accepted_bytes) = (0u64, 0u64);
    for (index, decision) in decisions.into_iter().enumerate() {
        let offer = &prepared[index].offer;
        let resume = match decision {
            Decision::Accept { id, offset: 0 } if id == offer.id => false,
            Decision::Resume { id }
                if id == offer.id
                    && offer.size > SMALL_FILE
                    && matches!(prepared[index].source, Source::File) =>
            {
                true
            }
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
        if offer.stream {
            jobs.push(Job::Stream(index));
            continue;
        }
        if resume || offer.size > SMALL_FILE {
            jobs.push(Job::Large(index, resume));
            continue;
        }
        if bundle.len() == bundle_files || bundle_bytes + offer.size > BUNDLE_BYTES {
            jobs.push(Job::Bundle(std::mem::take(&mut bundle)));
            bundle_bytes = 0;
            bundle_files = (bundle_files * 2).min(BUNDLE_FILES);
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
        let (connection, observer, slots, prepared, cache) = (
            connection.clone(),
            observer.clone(),
            slots.clone(),
            prepared.clone(),
            cache.clone(),
        );
        tasks.spawn(async move {
            let slot = slots
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            match job {
                Job::Bundle(indices) => {
                    send_bundle(&connection, &prepared, indices, stall, &*observer, slot).await
                }
                Job::Large(index, resume) => {
                    let file = &prepared[index];
                    let large = Large {
                        connection: &connection,
                        file,
                        resume,
                        cache,
                        stall,
                        observer: &*observer,
                    };
                    vec![(index, large.send().await)]
                }
                Job::Stream(index) => {
                    let file = &prepared[index];
                    let result = send_stream(&connection, file, stall, &*observer).await;
                    vec![(index, result)]
                }
            }
        });
    }
    while let Some(joined) = tasks.join_next().await {
        for (index, result) in joined.expect("send task panicked") {
            let offer = &prepared[index].offer;
            let report = match result {
                // Everything in a verdict is the receiver's text: escaped before anyone
                // sees it.
                Ok(Delivered {
                    result,
                    blake3,
                    size,
                }) if result.verified && result.blake3 == blake3 => {
                    let saved_as = result.saved_as.as_deref().map(crate::text::peer);
                    FileReport {
                        blake3,
                        size,
                        ..FileReport::new(offer, saved_as, Outcome::Verified)
                    }
                }
                Ok(Delivered { result, .. }) => {
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

/// Stream a bundle of small files (and texts) on one stream and read their verdicts, in
/// order. A file that changed since it was offered is not sent (its report says why).
async fn send_bundle(
    connection: &quinn::Connection,
    prepared: &Arc<Vec<Prepared>>,
    indices: Vec<usize>,
    stall: Duration,
    observer: &dyn Observer,
    slot: tokio::sync::OwnedSemaphorePermit,
) -> Sent {
    let read = {
        let (prepared, indices) = (prepared.clone(), indices.clone());
        tokio::task::spawn_blocking(move || {
            indices
                .iter()
                .map(|&i| read_small(&prepared[i]))
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
    // Bundles go out one after the other, not interleaved: the receiver has the first
    // whole (and stores it) while the next arrives, instead of all of them at once at the
    // end of the round. The first file's index gives the order.
    let _ = send.set_priority(-i32::try_from(indices[0]).unwrap_or(i32::MAX));
    let streamed = async {
        // The whole bundle (at most BUNDLE_BYTES of data) goes in one write: headers and
        // trailers gathered between the files' bytes, so the connection is woken once per
        // bundle rather than three times per file.
        let mut pieces: Vec<Bytes> = Vec::with_capacity(2 * indices.len() + 1);
        let mut frames = Vec::new();
        for (&index, data) in indices.iter().zip(read) {
            let offer = &prepared[index].offer;
            match data {
                Ok((data, hash)) => {
                    let header = FileHeader {
                        id: offer.id,
                        offset: 0,
                    };
                    frame::encode_into(&mut frames, &header).map_err(TransferError::from)?;
                    pieces.push(Bytes::from(std::mem::take(&mut frames)));
                    pieces.push(data);
                    if offer.blake3.is_empty() {
                        let trailer = Trailer {
                            id: offer.id,
                            size: offer.size,
                            blake3: hash.clone(),
                        };
                        frame::encode_into(&mut frames, &trailer).map_err(TransferError::from)?;
                    }
                    observer.started(offer.id, &offer.name, offer.size);
                    sent.push((index, hash));
                }
                Err(e) => results.push((index, Err(e))),
            }
        }
        if !frames.is_empty() {
            pieces.push(Bytes::from(frames));
        }
        let write = async {
            send.write_all_chunks(&mut pieces)
                .await
                .map_err(stream_error)
        };
        within(connection, stall, write).await?;
        for (index, _) in &sent {
            let offer = &prepared[*index].offer;
            observer.progress(offer.id, offer.size);
        }
        send.finish()
            .map_err(|e| TransferError::protocol(e.to_string()))
    };
    let mut failure = streamed.await.err();
    // Written: the next bundle may go while this one's verdicts are awaited. A receiver
    // makes each batch durable before it answers, and batches that wait together share
    // one `syncfs`: holding the slot until the verdicts came would leave the disk one
    // flush per few bundles, and the link idle meanwhile. The receiver's stream limit
    // still bounds what is in flight.
    drop(slot);
    // Verdicts for every file written, even when writing the rest failed: a receiver
    // that refused a file (and stopped the stream) says why in its verdict.
    for (index, blake3) in sent {
        let offer = &prepared[index].offer;
        let verdict = read_verdict(&mut recv, offer.id);
        match within(connection, stall, verdict).await {
            Ok(result) => {
                let size = offer.size;
                results.push((
                    index,
                    Ok(Delivered {
                        result,
                        blake3,
                        size,
                    }),
                ))
            }
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
fn fill_bundle(mut results: Sent, indices: &[usize]) -> Sent {
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

/// Blocking: a small file's (or a text's) bytes and their hash, if it is still the version
/// that was offered (and, when its hash was offered, still matches it).
fn read_small(file: &Prepared) -> Result<(Bytes, String), TransferError> {
    use std::io::Read;
    if let Source::Text(text) = &file.source {
        return Ok((text.clone(), blake3::hash(text).to_hex().to_string()));
    }
    let path = &file.path;
    let mut f = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
    let before = Stamp::of(&f.metadata().map_err(|e| file_error(path, e))?);
    let mut data = Vec::with_capacity(file.offer.size as usize);
    (&mut f)
        .take(SMALL_FILE + 1)
        .read_to_end(&mut data)
        .map_err(|e| file_error(path, e))?;
    let hash = blake3::hash(&data).to_hex().to_string();
    let offered = &file.offer.blake3;
    if before != file.stamp
        || data.len() as u64 != file.offer.size
        || (!offered.is_empty() && hash != *offered)
    {
        return Err(file_error(path, changed("since it was offered")));
    }
    Ok((Bytes::from(data), hash))
}

/// Read the verdict for file `id`.
async fn read_verdict(recv: &mut quinn::RecvStream, id: u32) -> Result<FileResult, TransferError> {
    let result: FileResult = read_frame(recv).await?;
    if result.id != id {
        return Err(TransferError::protocol("verdict for a different file"));
    }
    Ok(result)
}

/// One large file to send on a stream of its own.
struct Large<'a> {
    connection: &'a quinn::Connection,
    file: &'a Prepared,
    /// The receiver asked to resume it.
    resume: bool,
    /// Where a tree computed for a resume is kept for the next one.
    cache: Option<Arc<TreeCache>>,
    stall: Duration,
    observer: &'a dyn Observer,
}

impl Large<'_> {
    /// Stream the file (after the resume exchange, if asked) and read its verdict.
    async fn send(self) -> Result<Delivered, TransferError> {
        let Large {
            connection,
            file,
            resume,
            stall,
            observer,
            ..
        } = self;
        let (offer, path) = (&file.offer, &file.path);
        let opened = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
        let now = Stamp::of(&opened.metadata().map_err(|e| file_error(path, e))?);
        if now != file.stamp {
            return Err(file_error(path, changed("since it was offered")));
        }
        let tree = match (resume, &file.tree) {
            (true, None) => Some(self.tree().await?),
            (_, tree) => tree.clone(),
        };
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
            let tree = tree.as_ref().expect("resumed files have trees");
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

        // Disk reads (and hashing, for a file offered without its hash) run on a blocking
        // thread, a few chunks ahead, so the QUIC thread only packetizes and encrypts. A
        // file with a tree (a resume) is not hashed again: its hash is the tree's root.
        let hash = offer.blake3.is_empty() && tree.is_none();
        let (chunks, mut next) = tokio::sync::mpsc::channel(READ_AHEAD);
        let (length, stamp) = (offer.size - offset, file.stamp);
        tokio::task::spawn_blocking(move || {
            read_chunks(opened, offset, length, stamp, hash, chunks)
        });
        let blake3 = loop {
            let piece = match next.recv().await {
                Some(Ok(piece)) => piece,
                Some(Err(e)) => {
                    // Tell the receiver now, rather than letting it wait for bytes.
                    let code = if e.kind() == std::io::ErrorKind::InvalidData {
                        codes::CHANGED
                    } else {
                        codes::READ_FAILED
                    };
                    let _ = send.reset(code.into());
                    return Err(file_error(path, e));
                }
                None => return Err(TransferError::protocol("the reading task ended early")),
            };
            let chunk = match piece {
                Piece::Chunk(chunk) => chunk,
                Piece::End(hash) => break hash,
            };
            let n = chunk.len() as u64;
            let write = async { send.write_chunk(chunk).await.map_err(stream_error) };
            if let Err(e) = within(connection, stall, write).await {
                return stopped(&mut recv, offer, e).await;
            }
            observer.progress(offer.id, n);
        };
        let blake3 = match (blake3, &tree) {
            (Some(hash), _) => hash,
            (None, Some(tree)) => tree.root().to_hex().to_string(),
            (None, None) => offer.blake3.clone(),
        };
        let trailer = offer.blake3.is_empty().then(|| Trailer {
            id: offer.id,
            size: offer.size,
            blake3: blake3.clone(),
        });
        let end = async {
            match &trailer {
                Some(trailer) => write_frame(&mut send, trailer).await,
                None => Ok(()),
            }
        };
        within(connection, stall, end).await?;
        let result = finish(connection, stall, send, recv, offer.id).await?;
        let size = offer.size;
        Ok(Delivered {
            result,
            blake3,
            size,
        })
    }

    /// The file's tree, for a resume of a file offered without its hash: from the cache,
    /// else hashed now (and cached). It must be of the version that was offered.
    async fn tree(&self) -> Result<Arc<Tree>, TransferError> {
        let (path, cache, stamp) = (self.file.path.clone(), self.cache.clone(), self.file.stamp);
        let offer = &self.file.offer;
        self.observer.hashing(offer.id, &offer.name, offer.size);
        tokio::task::spawn_blocking(move || {
            let tree = match &cache {
                Some(cache) => cache.tree(&path),
                None => Tree::from_file(&path),
            }
            .map_err(|e| file_error(&path, e))?;
            let now = std::fs::metadata(&path).map_err(|e| file_error(&path, e))?;
            if Stamp::of(&now) != stamp || tree.size() != stamp.size {
                return Err(file_error(&path, changed("since it was offered")));
            }
            Ok(Arc::new(tree))
        })
        .await
        .expect("hashing task panicked")
    }
}

/// A write failed: a receiver that refused the file (a full disk) stopped the stream and
/// says why in its verdict; otherwise the write's error stands.
async fn stopped(
    recv: &mut quinn::RecvStream,
    offer: &FileOffer,
    e: TransferError,
) -> Result<Delivered, TransferError> {
    if matches!(e, TransferError::Protocol(_)) {
        let verdict = read_verdict(recv, offer.id);
        if let Ok(Ok(result)) = tokio::time::timeout(VERDICT_AFTER_STOP, verdict).await {
            let (blake3, size) = (result.blake3.clone(), offer.size);
            return Ok(Delivered {
                result,
                blake3,
                size,
            });
        }
    }
    Err(e)
}

/// Send a stream (read to its end) as length-prefixed chunks, then its trailer, and read
/// its verdict.
async fn send_stream(
    connection: &quinn::Connection,
    file: &Prepared,
    stall: Duration,
    observer: &dyn Observer,
) -> Result<Delivered, TransferError> {
    let (offer, path) = (&file.offer, &file.path);
    let Source::Stream(reader) = &file.source else {
        unreachable!("only streams are sent as streams");
    };
    let source = reader.take().ok_or_else(|| {
        let e = std::io::Error::other("a stream can be sent only once");
        file_error(path, e)
    })?;
    let (mut send, mut recv) = connection.open_bi().await.map_err(stream_error)?;
    let header = FileHeader {
        id: offer.id,
        offset: 0,
    };
    write_frame(&mut send, &header).await?;
    observer.started(offer.id, &offer.name, 0);
    let (chunks, mut next) = tokio::sync::mpsc::channel(READ_AHEAD);
    tokio::task::spawn_blocking(move || read_stream(source, chunks));
    let mut size = 0u64;
    let blake3 = loop {
        let piece = match next.recv().await {
            Some(Ok(piece)) => piece,
            Some(Err(e)) => {
                // Said in the stream rather than by a reset: a reset may discard what is
                // still unread, header included, leaving the receiver waiting for a file
                // it cannot place.
                let said = async {
                    send.write_all(&ABORTED.to_be_bytes())
                        .await
                        .map_err(stream_error)?;
                    send.finish()
                        .map_err(|e| TransferError::protocol(e.to_string()))
                };
                if within(connection, stall, said).await.is_err() {
                    let _ = send.reset(codes::READ_FAILED.into());
                } else {
                    // Its verdict says the receiver saw the end: a close right after this
                    // send (which discards unsent stream data) cannot leave it guessing.
                    let verdict = read_verdict(&mut recv, offer.id);
                    let _ = tokio::time::timeout(VERDICT_AFTER_STOP, verdict).await;
                }
                return Err(file_error(path, e));
            }
            None => return Err(TransferError::protocol("the reading task ended early")),
        };
        let chunk = match piece {
            Piece::Chunk(chunk) => chunk,
            Piece::End(hash) => break hash.unwrap_or_default(),
        };
        let n = chunk.len() as u64;
        let write = async {
            // At most CHUNK: fits a u32.
            send.write_all(&(n as u32).to_be_bytes())
                .await
                .map_err(stream_error)?;
            send.write_chunk(chunk).await.map_err(stream_error)
        };
        if let Err(e) = within(connection, stall, write).await {
            return stopped(&mut recv, offer, e).await;
        }
        size += n;
        observer.progress(offer.id, n);
    };
    let end = async {
        send.write_all(&0u32.to_be_bytes())
            .await
            .map_err(stream_error)?;
        let trailer = Trailer {
            id: offer.id,
            size,
            blake3: blake3.clone(),
        };
        write_frame(&mut send, &trailer).await
    };
    within(connection, stall, end).await?;
    let result = finish(connection, stall, send, recv, offer.id).await?;
    Ok(Delivered {
        result,
        blake3,
        size,
    })
}

/// End a file's stream (everything was written) and read its verdict.
async fn finish(
    connection: &quinn::Connection,
    stall: Duration,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    id: u32,
) -> Result<FileResult, TransferError> {
    send.finish()
        .map_err(|e| TransferError::protocol(e.to_string()))?;
    within(connection, stall, read_verdict(&mut recv, id)).await
}

/// Whether this process may read `path` (`access(2)`: no file is opened).
fn readable(path: &Path, meta: &std::fs::Metadata) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    // Our own file with its owner's read bit needs no call (the common case, and ten
    // thousand calls are a noticeable wait before a folder is offered).
    // SAFETY: `geteuid` takes no arguments and cannot fail.
    if meta.uid() == unsafe { libc::geteuid() } && meta.mode() & 0o400 != 0 {
        return Ok(());
    }
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; the call only reads it.
    if unsafe { libc::access(path.as_ptr(), libc::R_OK) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A stream's chunk length that says its source failed: nothing more follows.
pub(super) const ABORTED: u32 = u32::MAX;

/// The error of a file that is not the version that was offered (kind `InvalidData`).
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

/// What a reading thread hands to the network.
enum Piece {
    /// The next bytes.
    Chunk(Bytes),
    /// All was read: the BLAKE3 of it, lowercase hex, when it was asked for.
    End(Option<String>),
}

/// Blocking: read `length` bytes from `offset` in [`CHUNK`]s into `out`, hashing them when
/// `hash` is set. A file that ends early, or whose size, times or inode differ from
/// `stamp` once read, changed while it was being sent: an `InvalidData` error, sent in
/// place of the last chunk.
fn read_chunks(
    mut file: std::fs::File,
    offset: u64,
    length: u64,
    stamp: Stamp,
    hash: bool,
    out: tokio::sync::mpsc::Sender<std::io::Result<Piece>>,
) {
    use std::io::{Read, Seek};
    let mut remaining = length;
    let mut held: Option<Bytes> = None;
    let mut hasher = hash.then(blake3::Hasher::new);
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
            if let Some(hasher) = &mut hasher {
                hasher.update(&buf);
            }
            // The last chunk waits until the file is known unchanged.
            if let Some(previous) = held.replace(Bytes::from(buf))
                && out.blocking_send(Ok(Piece::Chunk(previous))).is_err()
            {
                return Ok(()); // the sending side gave up
            }
        }
        if Stamp::of(&file.metadata()?) != stamp {
            return Err(changed("while it was being sent"));
        }
        if let Some(last) = held.take()
            && out.blocking_send(Ok(Piece::Chunk(last))).is_err()
        {
            return Ok(());
        }
        let hash = hasher.map(|h| h.finalize().to_hex().to_string());
        let _ = out.blocking_send(Ok(Piece::End(hash)));
        Ok(())
    })();
    if let Err(e) = result {
        let _ = out.blocking_send(Err(e));
    }
}

/// Blocking: read `source` to its end in chunks of up to [`CHUNK`] bytes into `out`,
/// hashing them; the hash comes last.
fn read_stream(
    mut source: Box<dyn std::io::Read + Send>,
    out: tokio::sync::mpsc::Sender<std::io::Result<Piece>>,
) {
    use std::io::Read;
    let mut hasher = blake3::Hasher::new();
    loop {
        let mut buf = Vec::with_capacity(CHUNK);
        // Fill a whole chunk where the source allows (a pipe gives 64 KiB at a time):
        // fewer, larger chunks cost less framing and fewer wake-ups.
        let read = (&mut source).take(CHUNK as u64).read_to_end(&mut buf);
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                let _ = out.blocking_send(Err(e));
                return;
            }
        };
        if n == 0 {
            let hash = hasher.finalize().to_hex().to_string();
            let _ = out.blocking_send(Ok(Piece::End(Some(hash))));
            return;
        }
        hasher.update(&buf);
        if out
            .blocking_send(Ok(Piece::Chunk(Bytes::from(buf))))
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One file listed by `select`, then grown to `now` bytes.
    fn listed_then_grown(dir: &Path, now: usize) -> Outgoing {
        let path = dir.join("f");
        std::fs::write(&path, b"four").unwrap();
        let mut selection = super::super::select(std::slice::from_ref(&path)).unwrap();
        std::fs::write(&path, vec![7u8; now]).unwrap();
        selection.files.remove(0)
    }

    #[test]
    fn a_fresh_listing_is_offered_without_asking_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = listed_then_grown(dir.path(), 9);
        assert!(file.listed.is_some(), "select records what it saw");
        let prepared = prepare_all(vec![file], None).unwrap();
        assert_eq!(prepared[0].offer.size, 4, "the size the listing saw");
        let read = read_small(&prepared[0]).unwrap_err();
        assert!(read.to_string().contains("changed"), "{read}");
    }

    #[test]
    fn an_old_listing_is_asked_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = listed_then_grown(dir.path(), 9);
        let listed = file.listed.as_mut().unwrap();
        listed.at = listed.at.checked_sub(FRESH_LISTING * 2).unwrap();
        let prepared = prepare_all(vec![file], None).unwrap();
        assert_eq!(prepared[0].offer.size, 9, "the size now");
        let (data, _) = read_small(&prepared[0]).unwrap();
        assert_eq!(data.len(), 9);
    }
}
