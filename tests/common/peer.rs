//! Hostile peers built from the library: real quinn endpoints with qpunch's TLS, speaking
//! the transfer protocol by hand (length-prefixed JSON frames written here, not borrowed
//! from private code), plus captured QUIC Initial datagrams for replay.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use qpunch::identity::{Fingerprint, Identity};
use qpunch::transfer::{self, Decision, Decisions, FileOffer, Manifest};

/// A tokio runtime for the hostile side, separate from the test thread, so the test can
/// block on child processes while hostile tasks keep running.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// `127.0.0.N`: distinct loopback sources.
pub fn lo(n: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, n])
}

/// Transport settings of hostile clients: keep idle connections alive and let the
/// receiver's flow control, not ours, be the limit.
fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_secs(2)));
    transport.max_idle_timeout(Some(Duration::from_secs(60).try_into().expect("fits")));
    transport.send_window(64 << 20);
    Arc::new(transport)
}

/// A quinn client endpoint bound to `ip` (port chosen by the kernel), with QUIC-bit
/// greasing off like every qpunch endpoint. Must run inside a tokio runtime.
pub fn client_endpoint(ip: IpAddr) -> quinn::Endpoint {
    let socket = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).expect("bind client");
    let mut config = quinn::EndpointConfig::default();
    config.grease_quic_bit(false);
    quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))
        .expect("client endpoint")
}

/// A client configuration presenting `identity` and pinning `expected`.
pub fn client_config(identity: &Identity, expected: Option<Fingerprint>) -> quinn::ClientConfig {
    let (crypto, _seen) =
        qpunch::tls::client_crypto(identity, expected, &[transfer::ALPN.to_vec()])
            .expect("client crypto");
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    config
}

/// An established hostile connection and the endpoint it lives on.
pub struct Peer {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// Connect from `ip` to `target` with a throwaway identity, completing the handshake.
pub async fn connect_from(
    ip: IpAddr,
    target: SocketAddr,
    expected: Fingerprint,
) -> Result<Peer, quinn::ConnectionError> {
    let identity = Identity::generate().expect("identity");
    connect_as(&identity, ip, target, expected).await
}

/// Connect from `ip` to `target` as `identity`, completing the handshake.
pub async fn connect_as(
    identity: &Identity,
    ip: IpAddr,
    target: SocketAddr,
    expected: Fingerprint,
) -> Result<Peer, quinn::ConnectionError> {
    let endpoint = client_endpoint(ip);
    let conn = endpoint
        .connect_with(
            client_config(identity, Some(expected)),
            target,
            qpunch::tls::SERVER_NAME,
        )
        .expect("start connecting")
        .await?;
    Ok(Peer { endpoint, conn })
}

/// Write one frame as qpunch does ([`qpunch::frame`]: a 4-byte big-endian length, then
/// the JSON of `value`).
pub async fn write_frame<T: serde::Serialize>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), qpunch::frame::FrameError> {
    qpunch::frame::write(send, value).await
}

/// Write one frame around bytes that need not be valid JSON (what only a hostile peer
/// sends, so qpunch's own framing cannot produce it).
pub async fn write_raw_frame(
    send: &mut quinn::SendStream,
    body: &[u8],
) -> Result<(), quinn::WriteError> {
    send.write_all(&(body.len() as u32).to_be_bytes()).await?;
    send.write_all(body).await
}

/// Read one frame (at most 64 MiB) and parse it ([`qpunch::frame::read`]).
pub async fn read_frame<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, String> {
    match qpunch::frame::read(recv, 64 << 20).await {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err("the stream ended before a frame".into()),
        Err(e) => Err(format!("frame: {e}")),
    }
}

/// A hostile sender's control stream, once its manifest went out.
pub struct Control {
    pub send: quinn::SendStream,
    pub recv: quinn::RecvStream,
}

/// Open the control stream on `conn` and send `manifest` on it, as `qpunch send` does first.
pub async fn send_manifest(
    conn: &quinn::Connection,
    manifest: &Manifest,
) -> Result<Control, String> {
    let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    write_frame(&mut send, manifest)
        .await
        .map_err(|e| format!("manifest: {e}"))?;
    Ok(Control { send, recv })
}

/// [`send_manifest`] of a manifest offering `files` (no empty folders).
pub async fn offer_files(
    conn: &quinn::Connection,
    files: Vec<FileOffer>,
) -> Result<Control, String> {
    let manifest = Manifest {
        files,
        ..Manifest::default()
    };
    send_manifest(conn, &manifest).await
}

impl Control {
    /// The receiver's answer to the manifest, within `timeout`.
    pub async fn decisions(&mut self, timeout: Duration) -> Result<Vec<Decision>, String> {
        match tokio::time::timeout(timeout, read_frame::<Decisions>(&mut self.recv)).await {
            Ok(decided) => decided.map(|Decisions { decisions }| decisions),
            Err(_) => Err(format!("no decisions within {timeout:?}")),
        }
    }
}

/// A well-formed random BLAKE3 hash (lowercase hex) that matches no data we send.
pub fn random_hash() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An offer of `size` bytes under `name`, with a random well-formed hash.
pub fn offer(id: u32, name: &str, size: u64) -> FileOffer {
    FileOffer {
        id,
        name: name.to_string(),
        size,
        blake3: random_hash(),
        ..FileOffer::default()
    }
}

/// An honest offer of `data`.
pub fn offer_of(id: u32, name: &str, data: &[u8]) -> FileOffer {
    FileOffer {
        id,
        name: name.to_string(),
        size: data.len() as u64,
        blake3: blake3::hash(data).to_hex().to_string(),
        ..FileOffer::default()
    }
}

/// QUIC long-header packet type of a datagram's first packet: 0 Initial, 1 0-RTT,
/// 2 Handshake, 3 Retry; `None` for a short header.
pub fn long_header_type(datagram: &[u8]) -> Option<u8> {
    let b0 = *datagram.first()?;
    (b0 & 0x80 != 0).then_some((b0 & 0x30) >> 4)
}

/// The destination connection id of a long-header packet.
fn long_header_dcid(datagram: &[u8]) -> Option<&[u8]> {
    let len = *datagram.get(5)? as usize;
    datagram.get(6..6 + len)
}

/// Capture `n` real QUIC Initial datagrams, each of a different connection attempt
/// (distinct destination connection ids): a quinn client "connects" to a plain UDP
/// socket that records what arrives and never answers.
pub async fn capture_initials(n: usize) -> Vec<Vec<u8>> {
    let sink = tokio::net::UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind capture socket");
    let sink_addr = sink.local_addr().unwrap();
    let endpoint = client_endpoint(lo(1));
    let identity = Identity::generate().expect("identity");
    let mut attempts = Vec::new();
    let mut initials = Vec::new();
    let mut seen = HashSet::new();
    let mut buf = vec![0u8; 2048];
    while initials.len() < n {
        // Keep a few attempts outstanding: each sends its Initial right away.
        while attempts.len() < initials.len() + 8 && attempts.len() < n + 8 {
            attempts.push(
                endpoint
                    .connect_with(
                        client_config(&identity, None),
                        sink_addr,
                        qpunch::tls::SERVER_NAME,
                    )
                    .expect("start connecting"),
            );
        }
        let (len, _) = tokio::time::timeout(Duration::from_secs(10), sink.recv_from(&mut buf))
            .await
            .expect("the client sends Initials")
            .expect("recv");
        let datagram = &buf[..len];
        if long_header_type(datagram) == Some(0)
            && let Some(dcid) = long_header_dcid(datagram)
            && seen.insert(dcid.to_vec())
        {
            initials.push(datagram.to_vec());
        }
    }
    drop(attempts);
    endpoint.close(0u32.into(), b"");
    initials
}
