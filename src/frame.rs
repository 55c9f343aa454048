//! Length-prefixed JSON frames on QUIC streams: a 4-byte big-endian length, then that
//! many bytes of JSON.
//!
//! Control messages are small and rare, so JSON costs nothing that matters and keeps them
//! debuggable; versioning is the ALPN's job. The reader is the part strangers reach: it
//! refuses lengths above its caller's limit before reading a byte of the body, and its
//! memory grows with the bytes that actually arrive, never with the length a peer claims.

use std::sync::Arc;

use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::Semaphore;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream ended (cleanly) before a whole frame.
    #[error("stream ended inside a frame")]
    Ended,
    /// The announced length is above the limit.
    #[error("frame of {len} bytes exceeds {max}")]
    TooLong {
        /// Announced length.
        len: usize,
        /// The reader's limit.
        max: usize,
    },
    /// The body is not the expected JSON (the text may quote the peer: shown escaped).
    #[error("bad frame: {}", crate::text::peer(.0))]
    Json(String),
    /// The stream or connection failed.
    #[error("{}", crate::text::peer(.0))]
    Stream(String),
    /// The connection is gone (kept whole so callers can tell a close from a failure).
    #[error("connection lost: {}", crate::text::peer(&.0.to_string()))]
    Connection(quinn::ConnectionError),
}

impl From<quinn::ReadError> for FrameError {
    fn from(e: quinn::ReadError) -> Self {
        match e {
            quinn::ReadError::ConnectionLost(c) => FrameError::Connection(c),
            other => FrameError::Stream(other.to_string()),
        }
    }
}

impl From<quinn::WriteError> for FrameError {
    fn from(e: quinn::WriteError) -> Self {
        match e {
            quinn::WriteError::ConnectionLost(c) => FrameError::Connection(c),
            other => FrameError::Stream(other.to_string()),
        }
    }
}

/// Write one frame.
pub async fn write<T: Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), FrameError> {
    let mut buf = Vec::new();
    encode_into(&mut buf, value)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Append one frame (length, then JSON) to `buf`: many small frames written with one
/// stream write cost one wake-up of the connection instead of one each.
pub fn encode_into<T: Serialize>(buf: &mut Vec<u8>, value: &T) -> Result<(), FrameError> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 4]);
    serde_json::to_writer(&mut *buf, value).map_err(|e| FrameError::Json(e.to_string()))?;
    let body = buf.len() - start - 4;
    let len = u32::try_from(body).map_err(|_| FrameError::TooLong {
        len: body,
        max: u32::MAX as usize,
    })?;
    buf[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Read one frame of at most `max` bytes; `Ok(None)` when the stream ends cleanly
/// between frames.
pub async fn read<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, FrameError> {
    read_budgeted(recv, max, None).await
}

/// A shared byte budget for frames from strangers, and the size below which a frame is read
/// without taking from it.
#[derive(Debug, Clone, Copy)]
pub struct Budget<'a> {
    /// The semaphore, counted in bytes.
    pub bytes: &'a Arc<Semaphore>,
    /// Frames up to this many bytes take nothing, so strangers holding the budget with big
    /// claims cannot delay peers whose frames are ordinary.
    pub free: usize,
}

/// [`read`], where a claimed length above `budget.free` is first taken from that shared
/// semaphore and given back once the frame is parsed: many peers claiming large frames at
/// once wait for each other instead of adding up.
pub async fn read_budgeted<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
    budget: Option<Budget<'_>>,
) -> Result<Option<T>, FrameError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv.read(&mut len[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Ended),
        }
    }
    let len = body_len(len, max)?;
    let _permit = match budget {
        // `len <= max`, and `max` of any caller fits a u32 (checked, not assumed).
        Some(budget) if len > budget.free => Some(
            budget
                .bytes
                .clone()
                .acquire_many_owned(u32::try_from(len).unwrap_or(u32::MAX))
                .await
                .map_err(|e| FrameError::Stream(e.to_string()))?,
        ),
        _ => None,
    };
    let mut body = Vec::with_capacity(len.min(64 << 10));
    while body.len() < len {
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => return Err(FrameError::Ended),
        }
    }
    decode(&body).map(Some)
}

/// The body length a frame's 4-byte prefix announces, refused above `max` (before a byte
/// of the body is waited for). For readers that hold the bytes themselves.
pub fn body_len(prefix: [u8; 4], max: usize) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max {
        return Err(FrameError::TooLong { len, max });
    }
    Ok(len)
}

/// A frame's body, parsed.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(body).map_err(|e| FrameError::Json(e.to_string()))
}
