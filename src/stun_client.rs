//! STUN transactions on the node's own socket: one Binding request with retransmissions,
//! and the background discovery of our reflexive addresses for a meeting's candidates.
//! The wire format is [`crate::stun`]; answers reach a transaction through
//! [`crate::socket::DemuxSocket::expect_stun`], by transaction id and source address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::addr::canonical;
use crate::socket::DemuxSocket;
use crate::stun::{
    Binding, Change, DEFAULT_PORT, StunError, WAIT, binding_request, new_txid,
    parse_binding_response,
};

/// The first retransmission interval; each next one doubles (RFC 8489 §6.2.1).
const FIRST_RTO: Duration = Duration::from_millis(250);

/// One Binding transaction to `server` on `socket`: send, retransmit with doubling
/// intervals, and take the first vetted answer that comes from one of `answer_from`
/// (`server` itself when empty) within [`WAIT`].
///
/// Answers that do not parse or vet are counted on the socket and the wait goes on: a
/// forged answer must not end a real transaction.
pub async fn binding(
    socket: &Arc<DemuxSocket>,
    server: SocketAddr,
    change: Change,
    answer_from: &[SocketAddr],
) -> Result<Binding, StunError> {
    let server = canonical(server);
    let txid = new_txid();
    let sources = if answer_from.is_empty() {
        vec![server]
    } else {
        answer_from.iter().copied().map(canonical).collect()
    };
    let mut wait = socket.expect_stun(txid, sources);
    let request = binding_request(txid, change);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut rto = FIRST_RTO;
    loop {
        socket
            .send_probe(server, &request)
            .await
            .map_err(|e| StunError::Io(e.to_string()))?;
        let resend = (tokio::time::Instant::now() + rto).min(deadline);
        rto *= 2;
        loop {
            tokio::select! {
                // Cancel-safe: an mpsc receive loses nothing when the other branch wins.
                answer = wait.recv() => {
                    let Some((_, data)) = answer else {
                        return Err(StunError::Timeout(server));
                    };
                    match parse_binding_response(&data, txid, server.is_ipv4()) {
                        Ok(binding) => return Ok(binding),
                        Err(e) => {
                            socket.count_stun_rejected();
                            tracing::debug!(%server, "ignored a STUN answer: {e}");
                        }
                    }
                }
                // Cancel-safe: a sleep holds nothing.
                _ = tokio::time::sleep_until(resend) => break,
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StunError::Timeout(server));
        }
    }
}

/// Our public address as `server` sees `socket`, if it answers (at node bind time, for
/// our candidates: see [`crate::node::Node::discover_stun`]).
pub async fn reflexive(socket: &Arc<DemuxSocket>, server: SocketAddr) -> Option<SocketAddr> {
    binding(socket, server, Change::default(), &[])
        .await
        .ok()
        .map(|b| b.mapped)
}

/// Most STUN servers asked for candidates at once (the rest of a longer list is ignored):
/// each answer can add at most one candidate, and the hello has little room.
pub const MAX_DISCOVERY: usize = 3;

/// How long a server's name may take to resolve in a discovery.
const RESOLVE_WAIT: Duration = Duration::from_secs(2);

/// Our reflexive addresses as STUN servers see the node's socket, learned in the
/// background from bind time on ([`crate::node::Node::discover_stun`]), so a meeting
/// never waits on a STUN server for more than its own short bound ([`Discovery::settled`]).
#[derive(Debug)]
pub struct Discovery {
    found: tokio::sync::watch::Receiver<(Vec<SocketAddr>, bool)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Discovery {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Discovery {
    /// Ask each of `servers` (`HOST[:PORT]`, at most [`MAX_DISCOVERY`]) for our address,
    /// all at once, from `socket`. Names are resolved here, bounded, in the background.
    pub fn start(socket: Arc<DemuxSocket>, servers: &[String]) -> Discovery {
        let (tx, found) = tokio::sync::watch::channel((Vec::new(), false));
        let servers: Vec<String> = servers.iter().take(MAX_DISCOVERY).cloned().collect();
        let task = tokio::spawn(async move {
            let ask = servers.iter().map(|name| {
                let socket = socket.clone();
                let tx = tx.clone();
                async move {
                    let local = quinn::AsyncUdpSocket::local_addr(&*socket).ok();
                    let server = resolve(name, local).await?;
                    let mapped = reflexive(&socket, server).await?;
                    tracing::debug!(%server, %mapped, "a STUN server sees us");
                    tx.send_modify(|(found, _)| {
                        if !found.contains(&mapped) {
                            found.push(mapped);
                        }
                    });
                    Some(())
                }
            });
            futures_util::future::join_all(ask).await;
            tx.send_modify(|(_, done)| *done = true);
        });
        Discovery { found, task }
    }

    /// What was found so far, waiting up to `wait` for the servers still being asked.
    pub async fn settled(&self, wait: Duration) -> Vec<SocketAddr> {
        let mut found = self.found.clone();
        // A closed channel (the task ended) leaves what it sent.
        let _ = tokio::time::timeout(wait, found.wait_for(|(_, done)| *done)).await;
        found.borrow().0.clone()
    }
}

/// The first address `name` resolves to that `local`'s socket can reach (IPv4 on an
/// IPv4 socket), bounded by [`RESOLVE_WAIT`].
async fn resolve(name: &str, local: Option<SocketAddr>) -> Option<SocketAddr> {
    let name = with_port(name);
    let addrs = tokio::time::timeout(RESOLVE_WAIT, tokio::net::lookup_host(name.as_str()))
        .await
        .ok()?
        .ok()?;
    let v4_only = local.is_some_and(|l| l.is_ipv4());
    addrs.map(canonical).find(|a| !v4_only || a.is_ipv4())
}

/// `HOST[:PORT]` with [`DEFAULT_PORT`] when it names none (an IPv6 literal bare or in
/// brackets).
fn with_port(name: &str) -> String {
    if name.parse::<SocketAddr>().is_ok() {
        return name.to_string();
    }
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    match name.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => name.to_string(),
        _ => format!("{name}:{DEFAULT_PORT}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_get_the_default_port() {
        assert_eq!(with_port("stun.example"), "stun.example:3478");
        assert_eq!(with_port("stun.example:19302"), "stun.example:19302");
        assert_eq!(with_port("2001:db8::1"), "[2001:db8::1]:3478");
        assert_eq!(with_port("[2001:db8::1]"), "[2001:db8::1]:3478");
        assert_eq!(with_port("[2001:db8::1]:5"), "[2001:db8::1]:5");
        assert_eq!(with_port("192.0.2.1"), "192.0.2.1:3478");
    }
}
