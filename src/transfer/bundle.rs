//! A bundle stream, read in whole chunks.
//!
//! A bundle carries hundreds of small entries (a header, the bytes, maybe a trailer),
//! each a few KiB. Read one field at a time, every entry cost several stream reads, each
//! taking the connection's lock and arming a stall timer: for 10,000 files of 4 KiB
//! that was a fifth of the receiver's main thread. Here the stream is read a chunk at a
//! time (as QUIC delivers it) into one buffer, entries are parsed from memory, and the
//! stall timer runs only while the buffer waits for more.
//!
//! Memory: the buffer holds what the next field needs plus at most one chunk. An
//! entry's bytes are copied out of it, so they hold exactly their size (which the caller
//! took from the small-file budget): a slice of the buffer would keep the whole buffer,
//! frames included, alive until its batch is stored, and a sender padding its frames
//! could then hold more than the budget says.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use serde::de::DeserializeOwned;

use super::codes;
use crate::frame::{self, FrameError};

/// Why a field could not be read.
pub(super) enum Cut {
    /// A frame was malformed, too long, or ended inside.
    Frame(FrameError),
    /// The stream stalled or failed (said in full).
    Failed(String),
}

/// The reading end of one bundle stream.
pub(super) struct Bundle<'a> {
    recv: &'a mut quinn::RecvStream,
    buf: BytesMut,
    stall: Duration,
    /// The stream ended cleanly: nothing more will arrive.
    finished: bool,
}

impl<'a> Bundle<'a> {
    pub(super) fn new(recv: &'a mut quinn::RecvStream, stall: Duration) -> Self {
        Bundle {
            recv,
            buf: BytesMut::new(),
            stall,
            finished: false,
        }
    }

    /// Wait until at least `n` bytes are buffered: `Ok(false)` if the stream ends first.
    /// Cancel-safe: a chunk is either buffered whole or not taken from the stream.
    async fn want(&mut self, n: usize) -> Result<bool, String> {
        while self.buf.len() < n {
            if self.finished {
                return Ok(false);
            }
            let read = tokio::time::timeout(self.stall, self.recv.read_chunk(usize::MAX, true));
            match read.await {
                Ok(Ok(Some(chunk))) => self.buf.extend_from_slice(&chunk.bytes),
                Ok(Ok(None)) => self.finished = true,
                Ok(Err(e)) => return Err(interrupted(&e)),
                Err(_) => return Err(stall_message(self.stall)),
            }
        }
        Ok(true)
    }

    /// The next frame of at most `max` bytes, or `None` where the stream ends cleanly
    /// between frames. A length above `max` is refused before its body is waited for.
    pub(super) async fn frame<T: DeserializeOwned>(
        &mut self,
        max: usize,
    ) -> Result<Option<T>, Cut> {
        if !self.want(4).await.map_err(Cut::Failed)? {
            return match self.buf.is_empty() {
                true => Ok(None),
                false => Err(Cut::Frame(FrameError::Ended)),
            };
        }
        let prefix = self.buf[..4].try_into().expect("four bytes");
        let len = frame::body_len(prefix, max).map_err(Cut::Frame)?;
        if !self.want(4 + len).await.map_err(Cut::Failed)? {
            return Err(Cut::Frame(FrameError::Ended));
        }
        let value = frame::decode(&self.buf[4..4 + len]);
        self.buf.advance(4 + len);
        value.map(Some).map_err(Cut::Frame)
    }

    /// Exactly `n` bytes of an entry. If the stream ends or fails first: what did arrive,
    /// and why.
    pub(super) async fn bytes(&mut self, n: usize) -> Result<Bytes, (Bytes, String)> {
        match self.want(n).await {
            Ok(true) => {
                let data = Bytes::copy_from_slice(&self.buf[..n]);
                self.buf.advance(n);
                Ok(data)
            }
            Ok(false) => {
                let got = self.buf.split().freeze();
                let why = format!("got {} of {n} bytes", got.len());
                Err((got, why))
            }
            Err(why) => Err((self.buf.split().freeze(), why)),
        }
    }

    /// Tell the sender to stop sending on this stream.
    pub(super) fn stop(&mut self, code: u32) {
        let _ = self.recv.stop(code.into());
    }
}

/// Why a transfer was given up when the sender went quiet.
pub(super) fn stall_message(after: Duration) -> String {
    format!("the sender sent nothing for {} s", after.as_secs_f64())
}

/// Why a file stream broke off, in the sender's terms where it said why.
pub(super) fn interrupted(e: &quinn::ReadError) -> String {
    match e {
        quinn::ReadError::Reset(code) if *code == codes::CHANGED.into() => {
            "the sender's file changed while it was being sent".into()
        }
        quinn::ReadError::Reset(code) if *code == codes::READ_FAILED.into() => {
            "the sender could not read its file".into()
        }
        quinn::ReadError::ConnectionLost(quinn::ConnectionError::ApplicationClosed(close))
            if close.error_code == codes::CANCELLED.into() =>
        {
            "the sender was interrupted".into()
        }
        other => format!(
            "transfer interrupted: {}",
            crate::text::peer(&other.to_string())
        ),
    }
}
