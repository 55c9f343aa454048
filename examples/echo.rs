//! Embedding qpunch in an application: punch, hand the socket to QUIC, and speak your
//! own protocol on a bidirectional stream (here: a line echo).
//!
//! ```text
//! cargo run --example echo                                  # both sides on loopback
//! cargo run --example echo -- server 9200                   # prints its fingerprint
//! cargo run --example echo -- client HOST:9200 FINGERPRINT  # type lines, see them echoed
//! ```
//! The application picks its own ALPN id, so it never collides with file transfer.

use std::net::SocketAddr;

use qpunch::identity::{Fingerprint, Identity};
use qpunch::node::{self, Node, NodeConfig};
use qpunch::punch::PunchConfig;
use tokio::io::{AsyncBufReadExt, BufReader};

const ALPN: &[u8] = b"qpunch-echo/1";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", port] => {
            let node = server_node(format!("0.0.0.0:{port}").parse()?)?;
            println!(
                "echo server on {} with fingerprint {}",
                node.local_addr()?,
                node.fingerprint()
            );
            serve(node).await
        }
        ["client", addr, fp] => {
            let lines = BufReader::new(tokio::io::stdin()).lines();
            client(addr.parse()?, fp.parse()?, lines).await
        }
        [] => {
            let node = server_node("127.0.0.1:0".parse()?)?;
            let (addr, fp) = (node.local_addr()?, node.fingerprint());
            tokio::spawn(serve(node));
            let script = "hello over a punched path\nこんにちは\nbye\n".as_bytes();
            client(addr, fp, BufReader::new(script).lines()).await
        }
        _ => anyhow::bail!("usage: echo [server PORT | client HOST:PORT FINGERPRINT]"),
    }
}

fn server_node(addr: SocketAddr) -> anyhow::Result<Node> {
    let socket = qpunch::socket::bind(addr)?;
    Ok(Node::new(
        socket,
        NodeConfig::new(Identity::generate()?, ALPN, true),
    )?)
}

/// Accept connections; echo every stream back, line by line.
async fn serve(node: Node) -> anyhow::Result<()> {
    while let Some(incoming) = node.accept().await {
        let peer = incoming?;
        println!(
            "[server] {} connected as {}",
            peer.connection.remote_address(),
            peer.fingerprint
        );
        tokio::spawn(async move {
            while let Ok((mut send, recv)) = peer.connection.accept_bi().await {
                let mut lines = BufReader::new(recv).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if send
                        .write_all(format!("{line}\n").as_bytes())
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                let _ = send.finish();
            }
        });
    }
    Ok(())
}

/// Punch, connect pinned to `fp`, then echo each input line through the server.
async fn client<R: tokio::io::AsyncBufRead + Unpin>(
    server: SocketAddr,
    fp: Fingerprint,
    mut input: tokio::io::Lines<R>,
) -> anyhow::Result<()> {
    let config = NodeConfig::new(Identity::generate()?, ALPN, false);
    let node::HandOver { node, punched, .. } =
        node::punch_and_hand_over(server, config, PunchConfig::default()).await?;
    match punched.reflexive {
        Some(us) => println!("[client] punched to {} (we are {us} to it)", punched.peer),
        None => println!("[client] punched to {}", punched.peer),
    }
    let peer = node.connect(punched.peer, Some(fp)).await?;
    let (mut send, recv) = peer.connection.open_bi().await?;
    let mut echoes = BufReader::new(recv).lines();
    while let Some(line) = input.next_line().await? {
        send.write_all(format!("{line}\n").as_bytes()).await?;
        let echo = echoes.next_line().await?.unwrap_or_default();
        println!("[client] sent {line:?}, got back {echo:?}");
        anyhow::ensure!(echo == line, "echo mismatch");
    }
    send.finish()?;
    peer.connection.close(0u32.into(), b"bye");
    node.close(node::CLOSE_LINGER).await;
    Ok(())
}
