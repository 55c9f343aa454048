//! Helpers the commands share, so that no command imports another: the `punched` and
//! `connected` events, address display, and `--bind`.

use std::net::{IpAddr, SocketAddr};

use anyhow::Context;
use qpunch::identity::Fingerprint;
use qpunch::punch::Punched;

use super::ui::{Event, Ui};

/// The `punched` event. `from` is the socket's address while punching, read before
/// hand-over: `connected` shows the QUIC socket's, and the two ports must agree.
pub fn report_punched(ui: &Ui, punched: &Punched, from: SocketAddr) {
    let rtt_ms = punched.rtt.as_secs_f64() * 1000.0;
    let reflexive = punched.reflexive.map(canonical);
    let (probe, reply) = (qpunch::wire::PROBE_GREETING, qpunch::wire::REPLY_GREETING);
    let peer = punched.peer;
    let answer = match reflexive {
        Some(reflexive) => format!(
            "\"{probe}\" answered with \"{reply}\" by {peer} in {rtt_ms:.2} ms; it sees us as \
             {reflexive}"
        ),
        // Only a legacy reply leaves it unknown.
        None => format!(
            "{peer} answered \"{probe}\" with a plain \"{reply}\" in {rtt_ms:.2} ms, like the Go \
             hole-punching demo (it does not say how it sees us)"
        ),
    };
    ui.event(
        Event::Punched {
            peer: peer.to_string(),
            method: punched.method.as_str(),
            local_addr: from.to_string(),
            reflexive_addr: reflexive.map(|r| r.to_string()),
            rtt_ms,
        },
        Some(format!(
            "hole punched ({}): {answer}; socket {from} handed to QUIC",
            punched.method.as_str()
        )),
    );
}

/// The `connected` event; `path` is `direct` or `lan`, `remote` already canonical.
pub fn report_connected(
    ui: &Ui,
    remote: SocketAddr,
    fingerprint: Fingerprint,
    path: &'static str,
    local: SocketAddr,
    port_mapped: bool,
) {
    let mapped = if port_mapped {
        " through a port the router forwards"
    } else {
        ""
    };
    let over = match path {
        "lan" => " on the LAN",
        "relayed" => " through the rendezvous's relay (end-to-end encrypted)",
        "relayed-tcp" => " through the rendezvous's relay over TCP (end-to-end encrypted)",
        _ => "",
    };
    ui.event(
        Event::Connected {
            peer: remote.to_string(),
            fingerprint,
            path,
            local_addr: local.to_string(),
            port_mapped,
        },
        Some(format!(
            "connected to {remote}{over}{mapped} (identity {fingerprint}), encrypted with TLS 1.3 over QUIC"
        )),
    );
}

/// IPv4-mapped IPv6 addresses shown as plain IPv4 (see [`qpunch::addr::canonical`]).
pub use qpunch::addr::canonical;

pub fn bind_addr(bind: &str, port: u16) -> anyhow::Result<SocketAddr> {
    if let Ok(addr) = bind.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let bare = bind.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = bare
        .parse()
        .with_context(|| format!("--bind {bind:?} is not an IP address"))?;
    Ok(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflexive_addresses_print_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:198.51.100.1]:5000".parse().unwrap();
        assert_eq!(canonical(mapped).to_string(), "198.51.100.1:5000");
        let v6: SocketAddr = "[2001:db8::1]:5000".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn bind_takes_an_ip_or_a_full_address() {
        assert_eq!(
            bind_addr("0.0.0.0", 9199).unwrap().to_string(),
            "0.0.0.0:9199"
        );
        assert_eq!(bind_addr("[::]", 9199).unwrap().to_string(), "[::]:9199");
        assert_eq!(bind_addr("::", 7).unwrap().to_string(), "[::]:7");
        assert_eq!(
            bind_addr("127.0.0.1:5000", 9199).unwrap().to_string(),
            "127.0.0.1:5000"
        );
        assert!(bind_addr("example.com", 9199).is_err());
    }
}
