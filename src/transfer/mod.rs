//! Verified file transfer over an authenticated QUIC connection.
//!
//! # Protocol (ALPN `qpunch-files/3`)
//! 1. The sender opens a *control* stream and writes a [`Manifest`]: every file's id,
//!    offered name (and folder, for trees), size and, when the sender already knows it
//!    (a tree cached by an earlier send), its BLAKE3 hash; plus empty folders. A file
//!    offered without a hash is hashed while it is sent: no byte waits for a hash pass.
//!    A *stream* ([`FileOffer::stream`], e.g. `send -`) has no size either.
//! 2. The receiver checks names, asks for consent, and answers with [`Decisions`]: for
//!    each file accept (fresh, `offset` 0), *resume* (it holds a partial of this file),
//!    or decline (with a reason).
//! 3. The sender opens file streams. Each carries one or more entries, one after the
//!    other: a [`FileHeader`], then exactly the file's bytes, then, for a file offered
//!    without a hash, a [`Trailer`] with the hash of what was sent. Small files share
//!    streams (a bundle of up to [`BUNDLE_FILES`] files or [`BUNDLE_BYTES`]; a stream whose
//!    first file is small carries small files only), large ones get a stream of their
//!    own, and several streams run in parallel, each with its own flow control, so one
//!    slow disk does not stall the rest. Bundles are sent in order, each as soon as the
//!    one before is written (not answered). A stream's bytes come as
//!    chunks (a `u32` length, then that many bytes) ended by an empty one, and its
//!    trailer says its size too.
//! 4. For a resumed file the entry's header is followed by the file's encoded
//!    [`tree::Tree`] (a binary frame); the receiver accepts the tree only if it merges to
//!    the offered hash (when one was offered), keeps the longest prefix of its partial
//!    that the tree proves ([`tree::verified_prefix`]), answers [`ResumeFrom`] with that
//!    group-aligned offset, and the sender streams the rest, which is verified group by
//!    group as it arrives.
//! 5. The receiver writes to a private partial file (or, for `receive --stdout`, to its
//!    sink), hashing as the bytes arrive, and only when the size *and* the hash match
//!    does the file take its final name (after its bytes are durable). It answers on the
//!    same stream with one [`FileResult`] per entry, in order; the sender reports
//!    success only after reading it.
//!
//! Partials are keyed by [`FileOffer::part_keys`]: the content hash when it was offered,
//! and a key of the offered path and size, which is what a first send (no hash yet) has.
//! Either way a resumed partial keeps only the prefix the sender's tree proves. An
//! interrupted transfer keeps its partial (when it holds at least one whole group) for
//! the next attempt; a corrupted or short one is removed, and so is every cut stream
//! (it cannot be resumed). Control messages are length-prefixed JSON: small,
//! debuggable, and versioned by ALPN (a peer of another version is told both versions by
//! name: see [`version`]). The data path never holds more than a few MiB per
//! stream in memory.

mod bundle;
pub mod names;
mod plans;
mod receive;
mod reserve;
mod send;
mod store;
mod stream;
pub mod tree;
pub mod version;
mod vet;
mod walk;
mod writer;

use std::sync::Arc;

use crate::frame::{self, FrameError};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use receive::{
    Consent, ExpectTickets, FILE_STREAMS, MANIFEST_BUDGET, MIN_RATE, MIN_WINDOW, NoEvents,
    PARTIAL_MAX_AGE, Policy, ReceiveEvents, ReceiveOptions, Receiver, SMALL_BUDGET, SMALL_WRITERS,
    STALL_TIMEOUT, TICKET_GRACE, WINDOW_BUDGET,
};
pub use send::{
    FRESH_LISTING, Listed, Outgoing, Reader, SendOptions, hash_file, send_files, send_files_with,
};
pub use store::{Cleaned, DISK_JOBS, PARTIAL_DIR, clean_partials};
pub use walk::{Selection, select};

/// The ALPN protocol id of file transfer.
pub const ALPN: &[u8] = b"qpunch-files/3";

/// Largest control frame accepted: bounds memory against a hostile peer.
pub const MAX_FRAME: usize = 4 << 20;
/// Most entries (files plus empty folders) one manifest may offer. A folder with more is
/// sent in several runs of `qpunch send` (one per subfolder): the bound keeps a manifest
/// within [`MAX_FRAME`] and the receiver's bookkeeping per sender small.
pub const MAX_FILES: usize = 10_000;
/// Most folder levels above a file in a manifest.
pub const MAX_DEPTH: usize = 32;
/// Files at most this large travel in bundles and are verified in memory before they
/// touch the disk: one [`tree::GROUP`], which is also the smallest file worth resuming.
pub const SMALL_FILE: u64 = tree::GROUP;
/// Most files in one bundle stream.
pub const BUNDLE_FILES: usize = 256;
/// Most bytes of small files in one bundle stream (and buffered per stream by a receiver).
pub const BUNDLE_BYTES: u64 = 1 << 20;
/// Most bytes of one text (`send --text`): a page of text, not a file.
pub const MAX_TEXT: u64 = 64 << 10;
/// Largest encoded tree a receiver reads for a resume: the tree of a 512 GiB file. Larger
/// files are always sent whole.
pub const MAX_TREE: usize = 16 << 20;

/// QUIC application error codes used when closing connections or stopping streams.
pub mod codes {
    /// Normal end.
    pub const DONE: u32 = 0;
    /// The receiver does not accept files from this sender.
    pub const NOT_ALLOWED: u32 = 1;
    /// The peer broke the protocol.
    pub const PROTOCOL: u32 = 2;
    /// The receiver declined the stream's file or failed to store it.
    pub const DECLINED: u32 = 3;
    /// The receiver is shutting down.
    pub const SHUTDOWN: u32 = 4;
    /// The sender's file changed while it was being sent (a stream reset).
    pub const CHANGED: u32 = 5;
    /// The sender was interrupted (Ctrl-C); what arrived is kept for a resume.
    pub const CANCELLED: u32 = 6;
    /// A local file could not be read (a stream reset).
    pub const READ_FAILED: u32 = 7;
    /// The peer speaks another version of the files protocol; the reason names both
    /// (see [`super::version`]).
    pub const VERSION: u32 = 8;
}

/// One file as offered by the sender.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// Sender-chosen id, unique within the manifest.
    pub id: u32,
    /// The name the sender proposes. Untrusted: see [`names::sanitize`] (which keeps only
    /// the last component: folders travel in `dir`).
    pub name: String,
    /// Size in bytes (0 for a [stream](Self::stream), whose size only its trailer says).
    pub size: u64,
    /// BLAKE3 hash of the whole file, lowercase hex; empty when the sender hashes the file
    /// while sending it (then a [`Trailer`] follows its bytes).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub blake3: String,
    /// The folders the file sits in, outermost first (empty for a plain file). Each is one
    /// untrusted name component, checked like a file name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dir: Vec<String>,
    /// Whether the sender's copy is executable (the receiver keeps the bit for its owner).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub executable: bool,
    /// A stream of unknown length (a pipe): its bytes come as chunks, it is never resumed,
    /// and a cut one is not kept.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream: bool,
    /// Text to show rather than a file to store (`send --text`): at most [`MAX_TEXT`]
    /// bytes of UTF-8, sent like a small file, never written to the receiver's folder.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub text: bool,
}

/// Where `receive --stdout` puts the one file it accepts, instead of a folder: any
/// writer, written to on a blocking thread as the bytes arrive.
#[derive(Clone)]
pub struct Sink(Arc<std::sync::Mutex<Box<dyn std::io::Write + Send>>>);

impl Sink {
    /// A sink writing to `out`.
    pub fn new(out: impl std::io::Write + Send + 'static) -> Sink {
        Sink(Arc::new(std::sync::Mutex::new(Box::new(out))))
    }

    /// Blocking: write all of `bytes`.
    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(bytes)
    }

    /// Blocking: flush what was written.
    fn flush(&self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink(..)")
    }
}

/// Every file of one send.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The files, in the order the user gave them.
    pub files: Vec<FileOffer>,
    /// Empty folders to recreate, each as its components (see [`FileOffer::dir`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dirs: Vec<Vec<String>>,
}

/// The receiver's answer for one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    /// Send the file, starting at `offset` (0 for a fresh file).
    Accept {
        /// Which file.
        id: u32,
        /// First byte the receiver needs.
        offset: u64,
    },
    /// The receiver holds a partial file with this hash: send the file's tree first, then
    /// the bytes from the offset the receiver answers ([`ResumeFrom`]).
    Resume {
        /// Which file.
        id: u32,
    },
    /// Do not send this file.
    Decline {
        /// Which file.
        id: u32,
        /// Why, for the sender's user.
        reason: String,
    },
}

/// The receiver's answers, one per offered file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decisions {
    /// In manifest order.
    pub decisions: Vec<Decision>,
}

/// First frame of a file stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileHeader {
    /// Which file follows.
    pub id: u32,
    /// Offset of the first byte that follows.
    pub offset: u64,
}

/// What follows the bytes of a file offered without a hash: the hash (and, for a
/// stream, the size) of what the sender sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    /// Which file.
    pub id: u32,
    /// Bytes sent (the offered size, or a stream's length).
    pub size: u64,
    /// BLAKE3 of those bytes, lowercase hex.
    pub blake3: String,
}

/// The receiver's answer to a resumed file's tree: the bytes before `offset` are proven
/// good (a multiple of [`tree::GROUP`], or the whole file), send the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeFrom {
    /// Which file.
    pub id: u32,
    /// First byte the receiver needs.
    pub offset: u64,
}

/// The receiver's verdict on one file, sent back on its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResult {
    /// Which file.
    pub id: u32,
    /// True only when size and hash matched and the file has its final name.
    pub verified: bool,
    /// BLAKE3 of what the receiver got, lowercase hex.
    pub blake3: String,
    /// The file name it was saved under (inside the receiver's directory).
    pub saved_as: Option<String>,
    /// What went wrong, when not verified.
    pub error: Option<String>,
}

/// How one file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Arrived complete, hash verified, stored under its final name.
    Verified,
    /// The receiver declined it (name, consent, policy).
    Declined(String),
    /// Started but did not complete; nothing was stored under the final name.
    Failed(String),
}

/// What happened to one file, for either side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// Id within the manifest.
    pub id: u32,
    /// The offered name (sanitized on the receiving side when it was safe).
    pub name: String,
    /// Bytes the file has (offered size).
    pub size: u64,
    /// BLAKE3 hash, lowercase hex (as offered, or as received on failure).
    pub blake3: String,
    /// Final name in the receiver's directory, when stored: a path relative to it, with
    /// `/` between folders.
    pub saved_as: Option<String>,
    /// The ending.
    pub outcome: Outcome,
}

impl FileReport {
    /// A report on `offer` (its id, name, size and offered hash).
    fn new(offer: &FileOffer, saved_as: Option<String>, outcome: Outcome) -> Self {
        FileReport {
            id: offer.id,
            name: offer.display_path(),
            size: offer.size,
            blake3: offer.blake3.clone(),
            saved_as,
            outcome,
        }
    }

    /// Whether the file arrived verified.
    pub fn is_verified(&self) -> bool {
        self.outcome == Outcome::Verified
    }
}

/// Callbacks for progress displays and event logs. All have empty defaults.
pub trait Observer: Send + Sync {
    /// A file is about to be hashed before it is offered (large files take a moment).
    fn hashing(&self, _id: u32, _name: &str, _size: u64) {}
    /// A file's bytes start to move.
    fn started(&self, _id: u32, _name: &str, _size: u64) {}
    /// `bytes` more bytes of file `id` moved.
    fn progress(&self, _id: u32, _bytes: u64) {}
    /// A file ended (verified, declined or failed).
    fn finished(&self, _report: &FileReport) {}
    /// A text arrived verified (`send --text`): the sender's words, unescaped. Escape them
    /// before they reach a terminal ([`crate::text::peer`]).
    fn text(&self, _id: u32, _text: &str) {}
    /// The accepted part of a batch is known: `files` files of `bytes` bytes in all will
    /// move (or be resumed).
    fn batch(&self, _files: u64, _bytes: u64) {}
    /// `bytes` bytes of file `id` were already at the receiver (a resume): they count as
    /// done without moving.
    fn skipped(&self, _id: u32, _bytes: u64) {}
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct Quiet;

impl Observer for Quiet {}

/// Connection-level failures of a transfer (per-file failures are [`Outcome`]s).
///
/// Messages may carry text the peer chose (close reasons, what a parser quoted): they are
/// escaped when displayed (see [`crate::text`]).
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The receiver's policy does not accept this sender at all.
    #[error("the receiver does not accept files from this sender ({})", crate::text::peer(.0))]
    NotAllowed(String),
    /// The peer sent something that breaks the protocol.
    #[error("protocol error: {}", crate::text::peer(.0))]
    Protocol(String),
    /// The peer speaks another version of the files protocol.
    #[error(transparent)]
    Version(#[from] version::VersionError),
    /// The connection failed. Not exposed as `source()`, so that error-chain printers
    /// cannot print the peer's close reason raw.
    #[error("connection lost: {}", crate::text::peer(&.0.to_string()))]
    Connection(quinn::ConnectionError),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The output directory is not usable.
    #[error("output directory {path}: {source}")]
    OutDir {
        /// The directory.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl From<quinn::ConnectionError> for TransferError {
    fn from(e: quinn::ConnectionError) -> Self {
        TransferError::Connection(e)
    }
}

impl TransferError {
    fn protocol(what: impl std::fmt::Display) -> Self {
        TransferError::Protocol(what.to_string())
    }
}

/// Map stream errors to transfer errors, keeping connection loss distinguishable.
fn stream_error(e: impl Into<StreamFailure>) -> TransferError {
    match e.into() {
        StreamFailure::Connection(c) => match &c {
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == codes::NOT_ALLOWED.into() =>
            {
                TransferError::NotAllowed(String::from_utf8_lossy(&close.reason).into_owned())
            }
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == codes::VERSION.into() =>
            {
                let reason = String::from_utf8_lossy(&close.reason).into_owned();
                TransferError::Version(version::VersionError::Refused(reason))
            }
            _ => TransferError::Connection(c),
        },
        StreamFailure::Other(s) => TransferError::Protocol(s),
    }
}

/// Internal: stream errors either carry a connection error or are local protocol trouble.
enum StreamFailure {
    Connection(quinn::ConnectionError),
    Other(String),
}

impl From<quinn::ReadExactError> for StreamFailure {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::ReadError(r) => r.into(),
            quinn::ReadExactError::FinishedEarly(_) => {
                StreamFailure::Other("stream ended early".into())
            }
        }
    }
}

impl From<quinn::ReadError> for StreamFailure {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => StreamFailure::Connection(c),
            other => StreamFailure::Other(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for StreamFailure {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => StreamFailure::Connection(c),
            quinn::WriteError::Stopped(code) if code == codes::DECLINED.into() => {
                StreamFailure::Other("the receiver stopped the stream".into())
            }
            other => StreamFailure::Other(other.to_string()),
        }
    }
}

impl From<quinn::ConnectionError> for StreamFailure {
    fn from(e: quinn::ConnectionError) -> Self {
        StreamFailure::Connection(e)
    }
}

/// Write one length-prefixed JSON frame ([`crate::frame`]).
async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), TransferError> {
    Ok(frame::write(send, value).await?)
}

/// Read one length-prefixed JSON frame of at most [`MAX_FRAME`] bytes.
async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, TransferError> {
    read_frame_limited(recv, MAX_FRAME, None).await
}

/// Frames up to this size are read without taking budget (see [`read_frame_limited`]):
/// every honest manifest of a few hundred files fits, so strangers holding the budget
/// with big claims cannot delay ordinary senders.
const FREE_FRAME: usize = 64 << 10;

/// Read one length-prefixed JSON frame of at most `max` bytes; with a `budget`, a claimed
/// length above [`FREE_FRAME`] waits for that shared byte budget first
/// ([`frame::read_budgeted`]). A stream that ends before the frame is an error here: every
/// frame of the transfer protocol is expected.
async fn read_frame_limited<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<&Arc<tokio::sync::Semaphore>>,
) -> Result<T, TransferError> {
    let budget = budget.map(|bytes| frame::Budget {
        bytes,
        free: FREE_FRAME,
    });
    frame::read_budgeted(recv, max, budget)
        .await?
        .ok_or_else(|| TransferError::protocol("stream ended early"))
}

/// Frame errors in the transfer's terms: connection loss stays distinguishable (and a
/// receiver's refusal becomes [`TransferError::NotAllowed`]), the rest is protocol trouble.
impl From<FrameError> for TransferError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Connection(c) => stream_error(StreamFailure::Connection(c)),
            FrameError::Json(what) => TransferError::protocol(format!("bad frame: {what}")),
            FrameError::Stream(what) => TransferError::Protocol(what),
            other @ (FrameError::Ended | FrameError::TooLong { .. }) => {
                TransferError::protocol(other)
            }
        }
    }
}

impl FileOffer {
    /// The names a partial of this file may have been kept under: its content hash when
    /// offered, then a key of its offered path and size (all a first send has). Both are
    /// only where to look: a partial's bytes count only once the sender's tree proves them.
    pub fn part_keys(&self) -> Vec<String> {
        let mut keys = Vec::with_capacity(2);
        if !self.blake3.is_empty() {
            keys.push(self.blake3.clone());
        }
        let mut path = blake3::Hasher::new_derive_key("qpunch partial of a first send v1");
        path.update(&self.size.to_le_bytes());
        for part in self.dir.iter().chain(std::iter::once(&self.name)) {
            path.update(&(part.len() as u64).to_le_bytes());
            path.update(part.as_bytes());
        }
        keys.push(path.finalize().to_hex().to_string());
        keys
    }

    /// The offered path as people read it: folders and name joined with `/` (unsanitized:
    /// escape before printing).
    pub fn display_path(&self) -> String {
        let mut path = String::new();
        for part in &self.dir {
            path.push_str(part);
            path.push('/');
        }
        path.push_str(&self.name);
        path
    }
}

/// Write one length-prefixed binary frame (an encoded tree).
async fn write_blob(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), TransferError> {
    let len = u32::try_from(bytes.len()).map_err(TransferError::protocol)?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(stream_error)?;
    send.write_all(bytes).await.map_err(stream_error)?;
    Ok(())
}

/// Read one length-prefixed binary frame of exactly `want` bytes, taking claims above
/// [`FREE_FRAME`] from `budget` first (see [`read_frame_limited`]).
async fn read_blob(
    recv: &mut quinn::RecvStream,
    want: usize,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<Vec<u8>, TransferError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(stream_error)?;
    let len = u32::from_be_bytes(len) as usize;
    if len != want {
        return Err(TransferError::protocol(format!(
            "a tree of {len} bytes where {want} were due"
        )));
    }
    let _permit = if len > FREE_FRAME {
        // `want <= MAX_TREE` fits a u32.
        Some(
            budget
                .clone()
                .acquire_many_owned(len as u32)
                .await
                .map_err(TransferError::protocol)?,
        )
    } else {
        None
    };
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        match recv
            .read_chunk(len - body.len(), true)
            .await
            .map_err(stream_error)?
        {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(TransferError::protocol("stream ended inside a tree")),
        }
    }
    Ok(body)
}

/// Whether `s` looks like a BLAKE3 hash in lowercase hex.
fn is_hash_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
