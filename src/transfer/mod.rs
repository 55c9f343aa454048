//! Verified file transfer over an authenticated QUIC connection.
//!
//! # Protocol (ALPN `qpunch-files/1`)
//! 1. The sender opens a *control* stream and writes a [`Manifest`]: every file's id,
//!    offered name, size and BLAKE3 hash.
//! 2. The receiver checks names, asks for consent, and answers with [`Decisions`]: for
//!    each file either accept (with the `offset` to start from) or decline (with a reason).
//! 3. For each accepted file the sender opens its own stream, writes a [`FileHeader`] and
//!    then the raw bytes from `offset` to the end. Files travel in parallel, each with its
//!    own flow control, so one slow disk does not stall the rest.
//! 4. The receiver hashes while writing to `NAME.part`, and only when the size *and* the
//!    hash match does the file take its final name. It answers on the same stream with a
//!    [`FileResult`]; the sender reports success only after reading it.
//!
//! Control messages are length-prefixed JSON: small, debuggable, and versioned by ALPN.
//! The data path never holds more than a few MiB per file in memory.
//!
//! Why offsets and BLAKE3 from day one: the BLAKE3 hash *is* the root of a Merkle tree
//! over 1 KiB chunks, so a receiver can verify a partial file's prefix against the
//! sender's [`tree::Tree`] of 256 KiB group hashes and resume by accepting at a non-zero
//! `offset`, without changing the frames.

pub mod names;
mod receive;
mod reserve;
mod send;
mod store;
pub mod tree;

use std::sync::Arc;

use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use receive::{
    Consent, ExpectTickets, FILE_STREAMS, MANIFEST_BUDGET, MIN_RATE, MIN_WINDOW, NoEvents, Policy,
    ReceiveEvents, ReceiveOptions, Receiver, STALL_TIMEOUT, TICKET_GRACE, WINDOW_BUDGET,
};
pub use send::{Outgoing, hash_file, send_files};
pub use store::{DISK_JOBS, PARTIAL_DIR};

/// The ALPN protocol id of file transfer.
pub const ALPN: &[u8] = b"qpunch-files/1";

/// Largest control frame accepted: bounds memory against a hostile peer.
pub const MAX_FRAME: usize = 4 << 20;
/// Most files one manifest may offer.
pub const MAX_FILES: usize = 10_000;

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
}

/// One file as offered by the sender.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileOffer {
    /// Sender-chosen id, unique within the manifest.
    pub id: u32,
    /// The name the sender proposes. Untrusted: see [`names::sanitize`].
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// BLAKE3 hash of the whole file, lowercase hex.
    pub blake3: String,
}

/// Every file of one send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The files, in the order the user gave them.
    pub files: Vec<FileOffer>,
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
    /// Final name in the receiver's directory, when stored.
    pub saved_as: Option<String>,
    /// The ending.
    pub outcome: Outcome,
}

impl FileReport {
    /// A report on `offer` (its id, name, size and offered hash).
    fn new(offer: &FileOffer, saved_as: Option<String>, outcome: Outcome) -> Self {
        FileReport {
            id: offer.id,
            name: offer.name.clone(),
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

/// Write one length-prefixed JSON frame.
async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), TransferError> {
    let body = serde_json::to_vec(value).map_err(TransferError::protocol)?;
    let len = u32::try_from(body.len()).map_err(TransferError::protocol)?;
    send.write_all(&len.to_be_bytes())
        .await
        .map_err(stream_error)?;
    send.write_all(&body).await.map_err(stream_error)?;
    Ok(())
}

/// Read one length-prefixed JSON frame of at most [`MAX_FRAME`] bytes.
async fn read_frame<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, TransferError> {
    read_frame_limited(recv, MAX_FRAME, None).await
}

/// Frames up to this size are read without taking budget (see [`read_frame_limited`]):
/// every honest manifest of a few hundred files fits, so strangers holding the budget
/// with big claims cannot delay ordinary senders.
const FREE_FRAME: usize = 64 << 10;

/// Read one length-prefixed JSON frame of at most `max` bytes.
///
/// Memory grows with the bytes that actually arrive, not with the length a peer claims;
/// with a `budget`, a claimed length above [`FREE_FRAME`] is first taken from that shared
/// semaphore (in bytes) and given back once the frame is parsed, so many peers claiming
/// large frames at once wait for each other instead of adding up.
async fn read_frame_limited<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<&Arc<tokio::sync::Semaphore>>,
) -> Result<T, TransferError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len).await.map_err(stream_error)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        return Err(TransferError::protocol(format!(
            "frame of {len} bytes exceeds {max}"
        )));
    }
    let _permit = match budget {
        // `len <= max <= MAX_FRAME` fits a u32.
        Some(budget) if len > FREE_FRAME => Some(
            budget
                .clone()
                .acquire_many_owned(len as u32)
                .await
                .map_err(TransferError::protocol)?,
        ),
        _ => None,
    };
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        match recv
            .read_chunk(len - body.len(), true)
            .await
            .map_err(stream_error)?
        {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(TransferError::protocol("stream ended inside a frame")),
        }
    }
    serde_json::from_slice(&body).map_err(|e| TransferError::protocol(format!("bad frame: {e}")))
}

/// Whether `s` looks like a BLAKE3 hash in lowercase hex.
fn is_hash_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}
