//! Debian's `coturn` (`turnserver`) on a lab host: a STUN and TURN server that we did not
//! write, for the STUN/TURN tests. Started in the host's namespace, killed on drop.
//!
//! - STUN on UDP (and TCP) `port` of every listening address; with two addresses it does
//!   RFC 5780 behaviour discovery (OTHER-ADDRESS, CHANGE-REQUEST), using `port + 1` as
//!   the alternative port.
//! - TURN with the TURN REST API's shared secret (`--use-auth-secret`, what a rendezvous
//!   mints credentials from) and, optionally, static long-term users.
//! - TURN over TLS on `tls_port` when a certificate is given (the repo's test-only one).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::netns::tool_path;
use super::topology::Host;

/// How to start coturn.
#[derive(Debug, Clone)]
pub struct CoturnConfig {
    /// Addresses to listen (and relay) on: the first is the main one; a second enables
    /// RFC 5780.
    pub listen: Vec<IpAddr>,
    /// STUN/TURN port (UDP and TCP).
    pub port: u16,
    /// TURN over TLS port (with `tls`).
    pub tls_port: u16,
    /// The TURN REST API secret, when set.
    pub secret: Option<String>,
    /// Static long-term users `(name, password)`.
    pub users: Vec<(String, String)>,
    /// Certificate and key (PEM) for TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The realm.
    pub realm: String,
}

impl CoturnConfig {
    /// STUN and TURN on `listen`'s port 3478, TLS on 5349 (without a certificate: none),
    /// REST API secret `secret`.
    pub fn new(listen: &[IpAddr], secret: Option<&str>) -> CoturnConfig {
        CoturnConfig {
            listen: listen.to_vec(),
            port: 3478,
            tls_port: 5349,
            secret: secret.map(str::to_string),
            users: Vec::new(),
            tls: None,
            realm: "qpunch.test".into(),
        }
    }

    /// With the repo's test-only certificate for TLS.
    pub fn with_test_tls(mut self) -> CoturnConfig {
        let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        self.tls = Some((certs.join("test-only.crt"), certs.join("test-only.key")));
        self
    }
}

/// A running coturn.
pub struct Coturn {
    child: Child,
    /// What it was started with.
    pub config: CoturnConfig,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Coturn {
    /// Start coturn on `host` and wait until it answers a STUN binding request.
    pub fn start(host: &Host, config: CoturnConfig) -> Coturn {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("turnserver.log");
        let mut args: Vec<String> = vec![
            "netns".into(),
            "exec".into(),
            host.ns.clone(),
            tool_path("turnserver").display().to_string(),
            "-n".into(),
            "--no-cli".into(),
            "--simple-log".into(),
            "--log-file".into(),
            log.display().to_string(),
            "--pidfile".into(),
            dir.path().join("pid").display().to_string(),
            "--listening-port".into(),
            config.port.to_string(),
            "--alt-listening-port".into(),
            (config.port + 1).to_string(),
            "--tls-listening-port".into(),
            config.tls_port.to_string(),
            "--realm".into(),
            config.realm.clone(),
            "--fingerprint".into(),
            "--no-dtls".into(),
            "--no-multicast-peers".into(),
            "--verbose".into(),
        ];
        for ip in &config.listen {
            args.extend(["-L".into(), ip.to_string()]);
        }
        args.extend(["--relay-ip".into(), config.listen[0].to_string()]);
        if let Some(secret) = &config.secret {
            args.extend([
                "--use-auth-secret".into(),
                "--static-auth-secret".into(),
                secret.clone(),
            ]);
        }
        for (user, password) in &config.users {
            args.extend([
                "--lt-cred-mech".into(),
                "--user".into(),
                format!("{user}:{password}"),
            ]);
        }
        match &config.tls {
            Some((cert, key)) => args.extend([
                "--cert".into(),
                cert.display().to_string(),
                "--pkey".into(),
                key.display().to_string(),
            ]),
            None => args.push("--no-tls".into()),
        }
        let child = Command::new(tool_path("ip"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnserver");
        let coturn = Coturn {
            child,
            config,
            log,
            _dir: dir,
        };
        coturn.wait_ready(host);
        coturn
    }

    /// The main STUN/TURN address (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.config.listen[0], self.config.port)
    }

    /// The TURN-over-TLS address.
    pub fn tls_addr(&self) -> SocketAddr {
        SocketAddr::new(self.config.listen[0], self.config.tls_port)
    }

    /// What coturn logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Until a STUN binding request on the main address gets an answer (10 s at most).
    fn wait_ready(&self, host: &Host) {
        let target = self.addr();
        let ready = host.run(|| {
            let socket = std::net::UdpSocket::bind((host.v4, 0)).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_millis(100)))
                .unwrap();
            // A bare Binding request: type 0x0001, length 0, magic cookie, transaction id.
            let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
            request.extend_from_slice(&[7u8; 12]);
            let end = Instant::now() + Duration::from_secs(10);
            let mut buf = [0u8; 1500];
            while Instant::now() < end {
                let _ = socket.send_to(&request, target);
                if let Ok((n, _)) = socket.recv_from(&mut buf)
                    && n >= 20
                    && buf[0..2] == [0x01, 0x01]
                {
                    return true;
                }
            }
            false
        });
        assert!(ready, "coturn did not answer on {target}:\n{}", self.log());
    }
}

impl Drop for Coturn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
