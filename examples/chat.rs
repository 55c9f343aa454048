//! A chat between two peers that meet by one-time code, on your own protocol.
//!
//! Terminal 1 (hosts the chat, and a rendezvous for the demo):
//!
//! ```sh
//! cargo run --example chat -- host
//! ```
//!
//! It prints a code and the rendezvous address; terminal 2:
//!
//! ```sh
//! cargo run --example chat -- join 7-clockwork-crossover --via 127.0.0.1:PORT
//! ```
//!
//! Then type lines on either side. Everything below is library API: a rendezvous embedded
//! in a process, a [`Meeting`] on each side (PAKE over the untrusted rendezvous, punching,
//! the peer's key pinned), and your own ALPN on the resulting QUIC connection. Real use
//! would run `qpunch rendezvous` on a public host instead.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use qpunch::identity::{Fingerprint, Identity};
use qpunch::meet::code::Code;
use qpunch::meet::{MeetConfig, MeetEvents, Meeting, Silent};
use qpunch::natcheck;
use qpunch::node::{Node, NodeConfig, PeerConnection};
use qpunch::rendezvous::{self, Rendezvous, RendezvousClient, RendezvousConfig};
use tokio::io::{AsyncBufReadExt, BufReader};

const ALPN: &[u8] = b"qpunch-chat/1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["host"] => host().await,
        ["join", code, "--via", via] => join(code.parse()?, via.parse()?).await,
        _ => bail!("usage: chat host | chat join CODE --via ADDR"),
    }
}

fn node(accept: bool) -> anyhow::Result<Arc<Node>> {
    let socket = qpunch::socket::bind("127.0.0.1:0".parse()?)?;
    Ok(Arc::new(Node::new(
        socket,
        NodeConfig::new(Identity::generate()?, ALPN, accept),
    )?))
}

/// Prints each code as it is issued.
struct PrintCode(String);

impl MeetEvents for PrintCode {
    fn code(&self, code: &Code, _: Duration) {
        println!(
            "code: {code}\nin another terminal run:\n  cargo run --example chat -- join {code} --via {}",
            self.0
        );
    }
}

async fn host() -> anyhow::Result<()> {
    // A rendezvous for the demo, in this very process.
    let bound = Rendezvous::bind(
        "127.0.0.1:0".parse()?,
        Identity::generate()?,
        RendezvousConfig::default(),
        Arc::new(rendezvous::NoEvents),
    )?;
    let via = bound.node.local_addr()?;
    tokio::spawn(bound.server.run(std::future::pending::<()>()));

    let node = node(true)?;
    let client = RendezvousClient::connect(&node, via).await?;
    let nat = natcheck::check_mapping(&node, &client).await?.mapping;
    let events = PrintCode(via.to_string());
    let meeting = Meeting {
        node: &node,
        rendezvous: &client,
        nat,
        config: MeetConfig::default(),
        events: &events,
        turn: None,
    };
    // The code confirmed who will connect: remember that key, admit nobody else.
    let expected: Mutex<Option<Fingerprint>> = Mutex::new(None);
    let admit = |fp, _ttl| *expected.lock().unwrap() = Some(fp);
    let accepting = async {
        loop {
            let peer = node.accept().await.context("endpoint closed")??;
            if Some(peer.fingerprint) == *expected.lock().unwrap() {
                return anyhow::Ok(peer);
            }
            peer.connection.close(1u32.into(), b"not invited");
        }
    };
    let (welcomed, peer) = tokio::join!(
        meeting.welcome(None, Duration::from_secs(600), &admit),
        accepting
    );
    let welcomed = welcomed?;
    println!(
        "{} joined ({} path); say something",
        welcomed.sender, welcomed.method
    );
    let peer = peer?;
    let (send, recv) = peer.connection.accept_bi().await?;
    chat(send, recv).await
}

async fn join(code: Code, via: SocketAddr) -> anyhow::Result<()> {
    let node = node(false)?;
    let client = RendezvousClient::connect(&node, via).await?;
    let nat = natcheck::check_mapping(&node, &client).await?.mapping;
    let meeting = Meeting {
        node: &node,
        rendezvous: &client,
        nat,
        config: MeetConfig::default(),
        events: &Silent,
        turn: None,
    };
    let met = meeting.dial(&code).await?;
    println!(
        "connected to {} ({} path); say something",
        met.peer.fingerprint, met.method
    );
    let PeerConnection { connection, .. } = met.peer;
    let (mut send, recv) = connection.open_bi().await?;
    // A stream exists for the peer only once something is written on it.
    send.write_all(b"* joined\n").await?;
    chat(send, recv).await
}

/// Lines from stdin go out; lines from the peer come in (escaped: it is peer text).
async fn chat(mut send: quinn::SendStream, recv: quinn::RecvStream) -> anyhow::Result<()> {
    let incoming = tokio::spawn(async move {
        let mut lines = BufReader::new(recv).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            println!("peer> {}", qpunch::text::peer(&line));
        }
        println!("(the peer left)");
    });
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await? {
        send.write_all(format!("{line}\n").as_bytes()).await?;
    }
    send.finish()?;
    let _ = incoming.await;
    Ok(())
}
