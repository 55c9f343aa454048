//! The peer's side of the relay: its connection to the rendezvous as a
//! [`Carrier`](crate::path::Carrier).
//!
//! Once paired, what a peer sends as a QUIC DATAGRAM frame tagged
//! [`RELAY_PACKET`](super::RELAY_PACKET) on its connection to the rendezvous reaches its
//! partner's connection unchanged (see the server's `slot`). A [`RelayLink`] puts the tag on
//! and takes it off: the path layer hands it whole QUIC packets of the peer connection and
//! gets theirs back from [`RelayLink::recv`].

use bytes::{BufMut, Bytes, BytesMut};

use super::{RELAY_EXPIRED, RELAY_PACKET, RELAY_QUOTA};
use crate::path::{Carrier, PathKind};

/// One peer's relayed way to its partner: datagrams on its connection to the rendezvous.
/// Cheap to clone (a connection handle).
#[derive(Debug, Clone)]
pub struct RelayLink {
    conn: quinn::Connection,
    /// The TCP link the connection to the rendezvous travels on, if it does: held as long
    /// as the relay is (the meeting may drop its client).
    tcp: Option<std::sync::Arc<crate::tcp::TcpLink>>,
}

impl RelayLink {
    pub(super) fn new(
        conn: quinn::Connection,
        tcp: Option<std::sync::Arc<crate::tcp::TcpLink>>,
    ) -> RelayLink {
        RelayLink { conn, tcp }
    }

    /// The next datagram from the partner, its tag taken off (datagrams with a reserved tag
    /// are skipped); `None` once the connection to the rendezvous is closed (see
    /// [`cut_reason`](Self::cut_reason)). Cancel-safe: a datagram is taken only when it is
    /// returned.
    pub async fn recv(&self) -> Option<Bytes> {
        loop {
            let datagram = self.conn.read_datagram().await.ok()?;
            if datagram.first() == Some(&RELAY_PACKET) {
                return Some(datagram.slice(1..));
            }
        }
    }

    /// Why the rendezvous ended the relay, when it did: its quota used up
    /// ([`RELAY_QUOTA`]) or its lifetime over ([`RELAY_EXPIRED`]), in the rendezvous's
    /// words (escaped: it is not trusted). `None` while the relay lives, and when the
    /// connection closed for another reason ([`close_reason`](Self::close_reason)).
    pub fn cut_reason(&self) -> Option<String> {
        match self.conn.close_reason()? {
            quinn::ConnectionError::ApplicationClosed(close)
                if close.error_code == RELAY_QUOTA.into()
                    || close.error_code == RELAY_EXPIRED.into() =>
            {
                Some(format!(
                    "the rendezvous ended the relay: {}",
                    crate::text::peer_bytes(&close.reason)
                ))
            }
            _ => None,
        }
    }

    /// Why the connection to the rendezvous closed (shown escaped), or `None` while open.
    pub fn close_reason(&self) -> Option<String> {
        let reason = self.conn.close_reason()?;
        Some(
            self.cut_reason()
                .unwrap_or_else(|| crate::text::peer(&reason.to_string())),
        )
    }

    /// The connection to the rendezvous the relay rides on.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }
}

impl Carrier for RelayLink {
    fn kind(&self) -> PathKind {
        if self.tcp.is_some() {
            PathKind::RelayedTcp
        } else {
            PathKind::RelayedUdp
        }
    }

    /// Tag and send, never waiting: when quinn's send buffer is full it drops the oldest
    /// queued datagram, as a congested UDP path would.
    fn send(&self, datagram: &[u8]) -> std::io::Result<()> {
        use std::io::{Error, ErrorKind};
        let mut tagged = BytesMut::with_capacity(datagram.len() + 1);
        tagged.put_u8(RELAY_PACKET);
        tagged.put_slice(datagram);
        self.conn
            .send_datagram(tagged.freeze())
            .map_err(|e| match e {
                quinn::SendDatagramError::TooLarge => Error::new(
                    ErrorKind::InvalidInput,
                    format!(
                        "relay: a datagram of {} bytes does not fit (at most {} now)",
                        datagram.len(),
                        self.max_datagram()
                    ),
                ),
                quinn::SendDatagramError::ConnectionLost(_) => Error::new(
                    ErrorKind::NotConnected,
                    format!(
                        "relay: the connection to the rendezvous is closed: {}",
                        self.close_reason().unwrap_or_default()
                    ),
                ),
                quinn::SendDatagramError::UnsupportedByPeer
                | quinn::SendDatagramError::Disabled => Error::new(
                    ErrorKind::Unsupported,
                    format!("relay: datagrams are off on the connection to the rendezvous ({e})"),
                ),
            })
    }

    fn max_datagram(&self) -> usize {
        if self.conn.close_reason().is_some() {
            return 0;
        }
        self.conn
            .max_datagram_size()
            .map_or(0, |max| max.saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Identity;
    use crate::node::{ConnectOptions, Datagrams, Node, NodeConfig};
    use std::time::Duration;

    /// A link whose far end the test drives directly (standing in for the rendezvous, so
    /// it can send what a real one never forwards).
    async fn link_and_far_end() -> (RelayLink, quinn::Connection, Node, Node) {
        let node = |accept: bool| {
            let socket = crate::socket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let config = NodeConfig {
                datagrams: accept.then_some(Datagrams::RELAY),
                ..NodeConfig::new(Identity::generate().unwrap(), b"relay-unit/1", accept)
            };
            Node::new(socket, config).unwrap()
        };
        let (client, server) = (node(false), node(true));
        let options = ConnectOptions {
            datagrams: Some(Datagrams::RELAY),
        };
        let alpn = [b"relay-unit/1".to_vec()];
        let (c, s) = tokio::join!(
            client.connect_with_options(server.local_addr().unwrap(), None, &alpn, &options),
            server.accept()
        );
        let (c, s) = (c.unwrap(), s.unwrap().unwrap());
        (
            RelayLink::new(c.connection, None),
            s.connection,
            client,
            server,
        )
    }

    #[tokio::test]
    async fn recv_skips_reserved_tags_and_ends_with_the_connection() {
        let (link, far, _client, _server) = link_and_far_end().await;
        assert!(link.max_datagram() >= 1201, "{}", link.max_datagram());
        assert_eq!(link.cut_reason(), None);
        far.send_datagram(Bytes::from_static(b"\x01reserved"))
            .unwrap();
        far.send_datagram(Bytes::from_static(b"")).unwrap();
        far.send_datagram(Bytes::from_static(b"\x00packet"))
            .unwrap();
        let got = tokio::time::timeout(Duration::from_secs(5), link.recv()).await;
        assert_eq!(got.unwrap().unwrap().as_ref(), b"packet");
        // What the link sends arrives tagged.
        link.send(b"back").unwrap();
        let back = tokio::time::timeout(Duration::from_secs(5), far.read_datagram()).await;
        assert_eq!(back.unwrap().unwrap().as_ref(), b"\x00back");
        // A cut, with a reason that tries to move the cursor: shown escaped.
        far.close(RELAY_QUOTA.into(), b"relay quota of 5 bytes used up\x1b[2J");
        let end = tokio::time::timeout(Duration::from_secs(5), link.recv()).await;
        assert_eq!(end.unwrap(), None);
        let why = link.cut_reason().unwrap();
        assert!(why.contains("relay quota of 5 bytes used up"), "{why}");
        assert!(!why.contains('\x1b'), "{why}");
        assert_eq!(link.max_datagram(), 0);
        let err = link.send(b"more").unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotConnected);
    }

    #[tokio::test]
    async fn another_close_is_no_cut() {
        let (link, far, _client, _server) = link_and_far_end().await;
        far.close(0x10u32.into(), b"idle");
        let _ = tokio::time::timeout(Duration::from_secs(5), link.connection().closed()).await;
        assert_eq!(link.cut_reason(), None);
        assert!(link.close_reason().unwrap().contains("idle"));
    }
}
