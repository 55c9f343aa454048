//! A rendezvous served by the test's own process on 127.0.0.1, stopped when dropped.

use std::net::SocketAddr;
use std::sync::Arc;

use qpunch::identity::Identity;
use qpunch::node::Node;
use qpunch::rendezvous::{self, Rendezvous, RendezvousConfig};
use qpunch::server::StatsHandle;
use tokio::sync::oneshot;

/// The rendezvous, its node, its server's counters and its addresses.
pub struct Served {
    /// Its main (QUIC) address.
    pub addr: SocketAddr,
    /// The port after it, which only answers probes.
    pub alt: SocketAddr,
    pub rendezvous: Arc<Rendezvous>,
    pub node: Arc<Node>,
    pub server: StatsHandle,
    _stop: oneshot::Sender<()>,
}

impl Served {
    /// Its TLS-over-TCP listener (there is one by default).
    pub fn tcp(&self) -> SocketAddr {
        self.rendezvous
            .tcp_addr()
            .expect("a TCP listener by default")
    }
}

/// Bind and serve a rendezvous with `config` (inside a tokio runtime).
pub fn serve(config: RendezvousConfig) -> Served {
    let bound = Rendezvous::bind(
        "127.0.0.1:0".parse().unwrap(),
        Identity::generate().unwrap(),
        config,
        Arc::new(rendezvous::NoEvents),
    )
    .expect("bind a rendezvous (and the port after it)");
    let addr = bound.node.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let served = Served {
        addr,
        alt: SocketAddr::new(addr.ip(), addr.port() + 1),
        rendezvous: bound.rendezvous.clone(),
        node: bound.node.clone(),
        server: bound.server.stats(),
        _stop: stop,
    };
    tokio::spawn(bound.server.run(async {
        let _ = stopped.await;
    }));
    served
}
