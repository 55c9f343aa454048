//! The thin tokio layer that runs the sans-IO [`crate::punch::Puncher`].
//!
//! All decisions (when to resend, which reply counts, when to give up) live in the state
//! machine; this module only moves datagrams and sleeps until the machine's next
//! deadline. It runs either on a raw socket before hand-over, or on a [`DemuxSocket`]
//! after, so a live endpoint can punch to new peers.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use tokio::sync::broadcast;

use crate::punch::{PunchConfig, PunchError, Punched, Puncher, Transmit};
use crate::socket::DemuxSocket;

/// Why a punch did not produce a path.
#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    /// Nobody answered in time.
    #[error(transparent)]
    Punch(#[from] PunchError),
    /// The socket failed.
    #[error("UDP socket error while punching: {0}")]
    Io(#[from] io::Error),
}

/// How the driver reaches the network: send one datagram, receive the next candidate one.
trait ProbeIo {
    async fn send(&self, transmit: &Transmit) -> io::Result<()>;
    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<SocketAddr>;
}

/// Before hand-over: the raw socket, nobody else reading it.
struct Raw<'a>(&'a tokio::net::UdpSocket);

impl ProbeIo for Raw<'_> {
    async fn send(&self, t: &Transmit) -> io::Result<()> {
        self.0.send_to(&t.contents, t.destination).await.map(drop)
    }

    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<SocketAddr> {
        buf.resize(crate::wire::MAX_DATAGRAM + 1, 0);
        loop {
            match self.0.recv_from(buf).await {
                Ok((n, from)) => {
                    buf.truncate(n);
                    return Ok(from);
                }
                // ICMP "port unreachable" from a peer not listening yet surfaces as
                // ConnectionRefused on some systems: keep trying until the deadline.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// After hand-over: replies come from the demultiplexer's broadcast.
struct Demux<'a> {
    socket: &'a DemuxSocket,
    replies: broadcast::Receiver<crate::socket::ProbeReply>,
}

impl ProbeIo for Demux<'_> {
    async fn send(&self, t: &Transmit) -> io::Result<()> {
        self.socket.send_probe(t.destination, &t.contents).await
    }

    async fn recv(&mut self, buf: &mut Vec<u8>) -> io::Result<SocketAddr> {
        loop {
            match self.replies.recv().await {
                Ok((from, data)) => {
                    *buf = data;
                    return Ok(from);
                }
                // Missed some replies under load; the next resend covers it.
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "socket closed"));
                }
            }
        }
    }
}

/// Punch from a raw socket to the first answering candidate. The socket is borrowed, so
/// the caller can hand the very same socket to QUIC afterwards.
pub async fn punch(
    socket: &tokio::net::UdpSocket,
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
) -> Result<Punched, DriveError> {
    run(Raw(socket), candidates, config).await
}

/// Punch through a socket already handed to QUIC.
pub async fn punch_demux(
    socket: &DemuxSocket,
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
) -> Result<Punched, DriveError> {
    let replies = socket.subscribe();
    run(Demux { socket, replies }, candidates, config).await
}

async fn run(
    mut io: impl ProbeIo,
    candidates: Vec<SocketAddr>,
    config: PunchConfig,
) -> Result<Punched, DriveError> {
    let mut puncher = Puncher::new(candidates, config, Instant::now(), rand::random());
    let mut buf = Vec::new();
    loop {
        let now = Instant::now();
        puncher.handle_timeout(now);
        while let Some(transmit) = puncher.poll_transmit(now) {
            if let Err(e) = io.send(&transmit).await {
                // One unreachable candidate (e.g. no IPv6 route) must not end the punch.
                tracing::debug!(to = %transmit.destination, "probe not sent: {e}");
            }
        }
        if let Some(outcome) = puncher.outcome() {
            return outcome.clone().map_err(DriveError::from);
        }
        let Some(deadline) = puncher.poll_timeout() else {
            continue;
        };
        tokio::select! {
            received = io.recv(&mut buf) => {
                let from = received?;
                puncher.handle_datagram(Instant::now(), from, &buf);
            }
            _ = tokio::time::sleep_until(deadline.into()) => {}
        }
    }
}
