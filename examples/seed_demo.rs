//! The classic Go hole-punching demo, reproduced with qpunch's probe protocol.
//!
//! ```text
//! cargo run --example seed_demo                     # both sides on loopback
//! cargo run --example seed_demo -- server 9199      # on the reachable machine
//! cargo run --example seed_demo -- client HOST:9199 # behind the NAT
//! ```
//! The client sends "ただいま~" (a probe); the server answers "お帰り~" to the address the
//! datagram came from, carrying that address back. The reply getting through proves the
//! NAT opened a hole, and tells the client its public (reflexive) address.
//!
//! Both sides also speak with the original Go program (`tests/seed/main.go`): this server
//! answers the Go client's bare "ただいま~" with a bare "お帰り~", and this client accepts the
//! Go server's bare "お帰り~" from the address it probed (which then cannot tell it its
//! reflexive address).

use std::net::SocketAddr;

use qpunch::punch::{PunchConfig, Responder};
use qpunch::wire;
use tokio::net::UdpSocket;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["server", port] => server(UdpSocket::bind(("0.0.0.0", port.parse()?)).await?).await,
        ["client", addr] => client(addr.parse()?).await,
        [] => {
            let socket = UdpSocket::bind("127.0.0.1:0").await?;
            let addr = socket.local_addr()?;
            tokio::spawn(server(socket));
            client(addr).await
        }
        _ => anyhow::bail!("usage: seed_demo [server PORT | client HOST:PORT]"),
    }
}

/// Answer every probe to the address it came from, forever.
async fn server(socket: UdpSocket) -> anyhow::Result<()> {
    println!("Listening on {}", socket.local_addr()?);
    let mut responder = Responder::default();
    let mut buf = [0u8; 1500];
    loop {
        println!("---");
        let (n, from) = socket.recv_from(&mut buf).await?;
        let Some(reply) = responder.handle_datagram(from, &buf[..n]) else {
            println!("Ignored {n} bytes from {from} (not a probe)");
            continue;
        };
        println!(
            "Received a packet from: {from}\n\tSays: {}",
            wire::PROBE_GREETING
        );
        socket.send_to(&reply.contents, reply.destination).await?;
        println!("Sent reply to {from}\n\tReply: {}", wire::REPLY_GREETING);
    }
}

/// Probe the server (resending on a backoff) until a reply proves the path.
async fn client(server: SocketAddr) -> anyhow::Result<()> {
    let socket = UdpSocket::bind(if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })
    .await?;
    println!(
        "Trying to punch a hole to {server}\n\tSending: {}",
        wire::PROBE_GREETING
    );
    let punched = qpunch::driver::punch(&socket, vec![server], PunchConfig::default()).await?;
    println!(
        "Received a UDP packet back from {}\n\tResponse: {}",
        punched.peer,
        wire::REPLY_GREETING
    );
    let rtt_ms = punched.rtt.as_secs_f64() * 1e3;
    match punched.reflexive {
        Some(us) => println!("The server sees us as {us} (round trip {rtt_ms:.2} ms)"),
        None => println!(
            "A plain reply ({} method), like the Go demo server's: it does not say how it sees us",
            punched.method.as_str()
        ),
    }
    // The same socket could now be handed to QUIC: see the `echo` example.
    println!("Success: NAT traversed! ^-^");
    Ok(())
}
