//! Proving the code on the direct connection: the receiver's [`Desk`] (one open code, one
//! try) and [`Door`] (meet connections before the files protocol), and the sender's
//! [`dial`]/[`meet_at`]. Discovery is [`super::mdns`]'s.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::*;
use crate::identity::Fingerprint;
use crate::meet::code::{Code, Nameplate};
use crate::meet::pake::{BIND_TAG_LEN, PAKE_MSG_LEN, Pake, PakeError, Role, SessionKeys};
use crate::node::{Node, NodeError, PeerConnection};
use crate::server::{Service, Shutdown};

// ---------------------------------------------------------------------------------------
// The receiver: one open code at a time, and the door meet connections come through
// ---------------------------------------------------------------------------------------

/// How an open code ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A sender proved the code and holds a ticket.
    Used {
        /// Its fingerprint.
        sender: Fingerprint,
        /// Where it connected from.
        remote: SocketAddr,
    },
    /// A tag did not check out (a wrong code, a guess, a spliced connection): the code is
    /// burned.
    Burned {
        /// Where the tag came from.
        remote: SocketAddr,
    },
}

/// What a [`Desk`] has done so far. Never reset.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LanStats {
    /// Codes a sender proved.
    pub codes_used: u64,
    /// Codes burned by a tag that did not check out.
    pub wrong_codes: u64,
    /// Meet connections refused without a guess: no open code, or it went meanwhile.
    pub meet_refused: u64,
    /// Meet connections that sent something that is not the protocol (counted, dropped).
    pub meet_malformed: u64,
    /// Meet connections that stalled or left before their tag.
    pub meet_abandoned: u64,
}

#[derive(Debug, Default)]
struct Counters {
    used: AtomicU64,
    wrong: AtomicU64,
    refused: AtomicU64,
    malformed: AtomicU64,
    abandoned: AtomicU64,
}

/// The receiver's open code, at most one: plain data behind a lock, no IO.
///
/// Any number of meet connections may run their PAKE against the open code at once, but
/// the tag check is exclusive and final: the first connection to present a tag takes the
/// code out ([`Desk::open`]'s [`Opened`] learns the [`Outcome`]), and every later tag is
/// refused unchecked.
#[derive(Debug, Default)]
pub struct Desk {
    state: Mutex<DeskState>,
    counters: Counters,
}

#[derive(Debug, Default)]
struct DeskState {
    open: Option<OpenCode>,
    next: u64,
}

#[derive(Debug)]
struct OpenCode {
    generation: u64,
    code: Code,
    outcome: oneshot::Sender<Outcome>,
}

impl Desk {
    /// A desk with no open code.
    pub fn new() -> Arc<Desk> {
        Arc::default()
    }

    /// Open `code`, replacing any open one (whose [`Opened::outcome`] then ends with
    /// `None`).
    pub fn open(self: &Arc<Self>, code: Code) -> Opened {
        let (tx, rx) = oneshot::channel();
        let mut state = self.lock();
        state.next += 1;
        let generation = state.next;
        state.open = Some(OpenCode {
            generation,
            code: code.clone(),
            outcome: tx,
        });
        Opened {
            desk: self.clone(),
            generation,
            code,
            outcome: rx,
        }
    }

    /// The counters now.
    pub fn stats(&self) -> LanStats {
        let c = &self.counters;
        LanStats {
            codes_used: c.used.load(Ordering::Relaxed),
            wrong_codes: c.wrong.load(Ordering::Relaxed),
            meet_refused: c.refused.load(Ordering::Relaxed),
            meet_malformed: c.malformed.load(Ordering::Relaxed),
            meet_abandoned: c.abandoned.load(Ordering::Relaxed),
        }
    }

    /// Whether a code is open.
    pub fn is_open(&self) -> bool {
        self.lock().open.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DeskState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The open code, to run a PAKE against.
    fn current(&self) -> Option<(u64, Code)> {
        let state = self.lock();
        state.open.as_ref().map(|o| (o.generation, o.code.clone()))
    }

    /// The one try: take the code out if it is still the one of `generation`.
    fn take(&self, generation: u64) -> Option<oneshot::Sender<Outcome>> {
        let mut state = self.lock();
        match &state.open {
            Some(open) if open.generation == generation => state.open.take().map(|o| o.outcome),
            _ => None,
        }
    }

    fn withdraw(&self, generation: u64) {
        let mut state = self.lock();
        if state
            .open
            .as_ref()
            .is_some_and(|o| o.generation == generation)
        {
            state.open = None;
        }
    }

    /// The receiver's side of the exchange on `peer` (see the [module docs](self)).
    async fn welcome(
        &self,
        peer: &PeerConnection,
        own: Fingerprint,
        admit: &(dyn Fn(Fingerprint, Duration) + Send + Sync),
    ) -> Result<(), Refusal> {
        let Some((generation, code)) = self.current() else {
            return Err(Refusal::NoCode);
        };
        let (mut send, mut recv) = peer
            .connection
            .accept_bi()
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let mut their_msg = [0u8; PAKE_MSG_LEN];
        read_exact(&mut recv, &mut their_msg)
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let (pake, our_msg) = Pake::start(&code, Role::Receiver, &mut rand::rng());
        let keys = pake.finish(&their_msg).map_err(Refusal::Malformed)?;
        send.write_all(&our_msg)
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let mut tag = [0u8; BIND_TAG_LEN];
        read_exact(&mut recv, &mut tag)
            .await
            .map_err(|_| Refusal::Abandoned)?;
        // The one try. Nothing awaits between taking the code and reporting the outcome,
        // so no cancellation can lose it.
        let outcome = self.take(generation).ok_or(Refusal::Gone)?;
        let remote = peer.connection.remote_address();
        if keys.confirm(&own, &peer.fingerprint, &tag).is_err() {
            let _ = outcome.send(Outcome::Burned { remote });
            return Err(Refusal::WrongCode);
        }
        admit(peer.fingerprint, ADMIT_TTL);
        let _ = outcome.send(Outcome::Used {
            sender: peer.fingerprint,
            remote,
        });
        send.write_all(&keys.bind(&own, &peer.fingerprint))
            .await
            .map_err(|_| Refusal::Abandoned)?;
        let _ = send.finish();
        Ok(())
    }
}

/// An open code, from the code loop's side. Dropping it withdraws the code (if no
/// connection has taken it meanwhile).
#[derive(Debug)]
pub struct Opened {
    desk: Arc<Desk>,
    generation: u64,
    code: Code,
    outcome: oneshot::Receiver<Outcome>,
}

impl Opened {
    /// The code.
    pub fn code(&self) -> &Code {
        &self.code
    }

    /// Wait until a connection used or burned the code; `None` if it was replaced.
    /// Cancel-safe: it only waits on a oneshot receiver, which keeps its value.
    pub async fn outcome(&mut self) -> Option<Outcome> {
        (&mut self.outcome).await.ok()
    }
}

impl Drop for Opened {
    fn drop(&mut self) {
        self.desk.withdraw(self.generation);
    }
}

/// Why the receiver refused a meet connection.
#[derive(Debug)]
enum Refusal {
    NoCode,
    Gone,
    Malformed(PakeError),
    Abandoned,
    Timeout,
    WrongCode,
}

/// The receiving side's [`Service`]: connections that negotiated [`ALPN`] prove the open
/// code first (and are admitted with a ticket), then every connection goes on to `inner`
/// (e.g. a [`crate::transfer::Receiver`]) on the same connection.
pub struct Door<S> {
    inner: Arc<S>,
    desk: Arc<Desk>,
    own: Fingerprint,
    admit: Box<dyn Fn(Fingerprint, Duration) + Send + Sync>,
}

impl<S> std::fmt::Debug for Door<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Door")
            .field("own", &self.own)
            .finish_non_exhaustive()
    }
}

impl<S: Service> Door<S> {
    /// A door in front of `inner` for a node whose fingerprint is `own`, taking codes from
    /// `desk`; `admit` gives a sender that proved the code its ticket (e.g.
    /// [`crate::transfer::Receiver::admit`]).
    pub fn new(
        inner: Arc<S>,
        desk: Arc<Desk>,
        own: Fingerprint,
        admit: impl Fn(Fingerprint, Duration) + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Door {
            inner,
            desk,
            own,
            admit: Box::new(admit),
        })
    }
}

impl Door<crate::transfer::Receiver> {
    /// The door of a file receiver: a sender that proves the code gets a ticket from
    /// `receiver` itself ([`crate::transfer::Receiver::admit`]), as `qpunch receive` does.
    pub fn for_receiver(
        receiver: Arc<crate::transfer::Receiver>,
        desk: Arc<Desk>,
        own: Fingerprint,
    ) -> Arc<Self> {
        let admitting = receiver.clone();
        Door::new(receiver, desk, own, move |sender, ttl| {
            admitting.admit(sender, ttl)
        })
    }
}

impl<S: Service> Service for Door<S> {
    async fn serve(self: Arc<Self>, peer: PeerConnection, mut shutdown: Shutdown) {
        if negotiated(&peer.connection).as_deref() == Some(ALPN) {
            let exchange = self.desk.welcome(&peer, self.own, &*self.admit);
            let welcomed = tokio::select! {
                // Cancel-safe: dropping the exchange abandons it; the code is only ever
                // taken together with its outcome, with nothing awaited in between.
                r = tokio::time::timeout(EXCHANGE_TIMEOUT, exchange) => r.unwrap_or(Err(Refusal::Timeout)),
                () = shutdown.recv() => return,
            };
            let counters = &self.desk.counters;
            let remote = peer.connection.remote_address();
            let (code, reason): (u32, &[u8]) = match welcomed {
                Ok(()) => {
                    counters.used.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(%remote, sender = %peer.fingerprint, "a sender proved the code");
                    return self.inner.clone().serve(peer, shutdown).await;
                }
                Err(Refusal::NoCode | Refusal::Gone) => {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    (codes::NO_CODE, b"no open code")
                }
                Err(Refusal::WrongCode) => {
                    counters.wrong.fetch_add(1, Ordering::Relaxed);
                    (codes::WRONG_CODE, b"the code did not match")
                }
                Err(Refusal::Malformed(e)) => {
                    counters.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%remote, "malformed meet message: {e}");
                    (codes::PROTOCOL, b"malformed meet message")
                }
                Err(Refusal::Abandoned | Refusal::Timeout) => {
                    counters.abandoned.fetch_add(1, Ordering::Relaxed);
                    (codes::PROTOCOL, b"meet exchange abandoned")
                }
            };
            tracing::info!(%remote, "meet connection refused: {}", String::from_utf8_lossy(reason));
            crate::close_gate::close(&peer.connection, code.into(), reason);
            return;
        }
        self.inner.clone().serve(peer, shutdown).await
    }

    fn handshake_failed(&self, remote: SocketAddr, error: &NodeError) {
        self.inner.handshake_failed(remote, error);
    }
}

/// The ALPN a connection negotiated.
fn negotiated(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

// ---------------------------------------------------------------------------------------
// The sender
// ---------------------------------------------------------------------------------------

/// A sender's LAN meeting that succeeded.
#[derive(Debug)]
pub struct Dialed {
    /// The connection: the receiver proved the code on it, and it now speaks the files
    /// protocol.
    pub peer: PeerConnection,
    /// What browsing saw.
    pub sightings: Sightings,
}

/// Sender: find the receiver of `code` on the LAN (for up to `timeout`), then
/// [`meet_at`] its addresses.
pub async fn dial(
    node: &Node,
    lan: &Lan,
    code: &Code,
    timeout: Duration,
) -> Result<Dialed, LanError> {
    let sightings = lan.find(code.nameplate(), timeout).await?;
    let peer = meet_at(node, &sightings.addrs(), code).await?;
    Ok(Dialed { peer, sightings })
}

/// Sender: connect (unpinned, [`ALPN`]) to the receiver at `addrs`, refuse if more than
/// one identity answers, and prove the code both ways. On success the connection carries
/// the files protocol next, and its fingerprint is the receiver's, confirmed by the code.
pub async fn meet_at(
    node: &Node,
    addrs: &[SocketAddr],
    code: &Code,
) -> Result<PeerConnection, LanError> {
    let peer = connect_one(node, addrs, code.nameplate()).await?;
    let own = node.fingerprint();
    let proved = tokio::time::timeout(EXCHANGE_TIMEOUT, prove(&peer, own, code)).await;
    let error = match proved {
        Ok(Ok(())) => return Ok(peer),
        Ok(Err(e)) => e,
        Err(_) => LanError::Timeout(EXCHANGE_TIMEOUT),
    };
    let close = match error {
        LanError::WrongCode => codes::WRONG_CODE,
        _ => codes::PROTOCOL,
    };
    crate::close_gate::close(&peer.connection, close.into(), b"meeting failed");
    Err(error)
}

/// Connect to every address at once; the first to answer is the one, unless another
/// identity answers too within [`SETTLE`].
async fn connect_one(
    node: &Node,
    addrs: &[SocketAddr],
    nameplate: &Nameplate,
) -> Result<PeerConnection, LanError> {
    let alpn = [ALPN.to_vec()];
    let mut attempts: FuturesUnordered<_> = addrs
        .iter()
        .take(MAX_ADDRESSES)
        .map(|&addr| {
            let connecting = node.connect_with_alpn(addr, None, &alpn);
            async move {
                match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                    Ok(result) => result,
                    Err(_) => Err(NodeError::HandshakeTimeout(CONNECT_TIMEOUT)),
                }
            }
        })
        .collect();
    let mut connected: Vec<PeerConnection> = Vec::new();
    let mut last = String::from("no address to try");
    let mut settle_until: Option<Instant> = None;
    loop {
        // Cancel-safe: `FuturesUnordered::next` loses no finished attempt when dropped.
        let next = match settle_until {
            Some(until) => match tokio::time::timeout_at(until, attempts.next()).await {
                Ok(next) => next,
                Err(_) => break,
            },
            None => attempts.next().await,
        };
        match next {
            None => break,
            Some(Ok(peer)) => {
                settle_until.get_or_insert(Instant::now() + SETTLE);
                connected.push(peer);
            }
            Some(Err(e)) => last = e.to_string(),
        }
    }
    drop(attempts);
    let identities: HashSet<Fingerprint> = connected.iter().map(|p| p.fingerprint).collect();
    if identities.len() > 1 {
        for peer in &connected {
            crate::close_gate::close(&peer.connection, codes::AMBIGUOUS.into(), b"ambiguous");
        }
        return Err(LanError::Ambiguous {
            nameplate: nameplate.clone(),
            identities: identities.len(),
        });
    }
    let mut connected = connected.into_iter();
    let Some(first) = connected.next() else {
        return Err(LanError::Unreachable {
            tried: addrs.iter().take(MAX_ADDRESSES).copied().collect(),
            last,
        });
    };
    for spare in connected {
        crate::close_gate::close(&spare.connection, 0u32.into(), b"another path won");
    }
    Ok(first)
}

/// The sender's side of the exchange (see the [module docs](self)).
async fn prove(peer: &PeerConnection, own: Fingerprint, code: &Code) -> Result<(), LanError> {
    let (mut send, mut recv) = peer.connection.open_bi().await.map_err(|e| lost(&e))?;
    let (pake, our_msg) = Pake::start(code, Role::Sender, &mut rand::rng());
    send.write_all(&our_msg).await.map_err(write_failed)?;
    let mut their_msg = [0u8; PAKE_MSG_LEN];
    read_exact(&mut recv, &mut their_msg).await?;
    let keys: SessionKeys = pake.finish(&their_msg).map_err(|e| match e {
        PakeError::WrongCodeOrTampered => LanError::WrongCode,
        other => LanError::Pake(other),
    })?;
    send.write_all(&keys.bind(&own, &peer.fingerprint))
        .await
        .map_err(write_failed)?;
    let mut tag = [0u8; BIND_TAG_LEN];
    read_exact(&mut recv, &mut tag).await?;
    keys.confirm(&own, &peer.fingerprint, &tag)
        .map_err(|_| LanError::WrongCode)?;
    let _ = send.finish();
    Ok(())
}

/// Read exactly `buf.len()` bytes, telling a refusal by the peer from other failures.
async fn read_exact(recv: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), LanError> {
    match recv.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(LanError::Protocol(
            "the peer ended the exchange early".into(),
        )),
        Err(quinn::ReadExactError::ReadError(quinn::ReadError::ConnectionLost(e))) => Err(lost(&e)),
        Err(quinn::ReadExactError::ReadError(e)) => Err(LanError::Protocol(e.to_string())),
    }
}

fn write_failed(e: quinn::WriteError) -> LanError {
    match e {
        quinn::WriteError::ConnectionLost(e) => lost(&e),
        other => LanError::Protocol(other.to_string()),
    }
}

/// What a lost connection means for the exchange: the receiver's refusals by their code.
fn lost(e: &quinn::ConnectionError) -> LanError {
    if let quinn::ConnectionError::ApplicationClosed(close) = e {
        match u32::try_from(close.error_code.into_inner()) {
            Ok(codes::WRONG_CODE) => return LanError::WrongCode,
            Ok(codes::NO_CODE) => return LanError::NoCode,
            _ => {}
        }
    }
    // The close reason is the peer's text: `Protocol` escapes it when shown.
    LanError::Protocol(format!("connection lost: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(text: &str) -> Code {
        text.parse().unwrap()
    }

    #[test]
    fn a_code_is_taken_once_and_only_in_its_generation() {
        let desk = Desk::new();
        assert!(desk.current().is_none());
        let mut first = desk.open(code("7-clockwork-crossover"));
        let (generation, current) = desk.current().unwrap();
        assert_eq!(&current, first.code());
        let outcome = desk.take(generation).expect("the one try");
        assert!(
            desk.take(generation).is_none(),
            "a second tag finds nothing"
        );
        assert!(!desk.is_open());
        let remote: SocketAddr = "198.51.100.9:1".parse().unwrap();
        outcome.send(Outcome::Burned { remote }).unwrap();
        let got = futures_util::FutureExt::now_or_never(first.outcome()).unwrap();
        assert_eq!(got, Some(Outcome::Burned { remote }));

        // A tag that arrives after the code was replaced is refused unchecked.
        let old = desk.open(code("8-clockwork-crossover"));
        let (stale, _) = desk.current().unwrap();
        let mut new = desk.open(code("9-clockwork-crossover"));
        assert!(desk.take(stale).is_none());
        drop(old); // withdrawing the replaced code leaves the new one open
        assert!(desk.is_open());
        let (generation, current) = desk.current().unwrap();
        assert_eq!(current.nameplate().as_str(), "9");
        drop(desk.take(generation));
        // The taker went away without a word: the code is gone, no outcome.
        assert_eq!(
            futures_util::FutureExt::now_or_never(new.outcome()),
            Some(None)
        );
    }

    #[test]
    fn dropping_an_open_code_withdraws_it() {
        let desk = Desk::new();
        let opened = desk.open(code("7-clockwork-crossover"));
        let (generation, _) = desk.current().unwrap();
        drop(opened);
        assert!(!desk.is_open());
        assert!(desk.take(generation).is_none());
    }

    #[test]
    fn refusals_are_read_from_close_codes() {
        let closed = |code: u32, reason: &[u8]| {
            quinn::ConnectionError::ApplicationClosed(quinn::ApplicationClose {
                error_code: code.into(),
                reason: bytes::Bytes::copy_from_slice(reason),
            })
        };
        assert!(matches!(
            lost(&closed(codes::WRONG_CODE, b"")),
            LanError::WrongCode
        ));
        assert!(matches!(
            lost(&closed(codes::NO_CODE, b"")),
            LanError::NoCode
        ));
        let other = lost(&closed(99, b"\x1b[2Jgotcha\nforged line"));
        let message = other.to_string();
        assert!(!message.chars().any(crate::text::is_unsafe), "{message:?}");
        assert!(message.contains("gotcha"), "{message}");
    }
}
