//! TLS 1.3 for QUIC with pinned self-signed identities instead of certificate authorities.
//!
//! Both sides always present their certificate (mutual TLS), so the receiver can show or
//! check *who* is sending. The sender checks the receiver's key against a pinned
//! fingerprint inside the handshake, before a single byte of application data moves.
//! Handshake signatures are still verified normally: pinning replaces the CA chain, not
//! the proof that the peer holds the key.

use std::sync::{Arc, Mutex};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::{Fingerprint, Identity};

/// The TLS server name every qpunch peer uses (defined beside the certificates that carry
/// it, in [`crate::identity`]).
pub use crate::identity::SERVER_NAME;

/// Errors building TLS configurations.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls rejected the configuration (e.g. an unusable key).
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn could not use the rustls configuration.
    #[error("QUIC TLS configuration: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// ring's TLS 1.3 suites with AES-128-GCM first: 128-bit keys are ample, and it is
/// about a third cheaper per byte than AES-256-GCM, which matters at gigabit rates.
fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// What the sender learned about the receiver's identity during a handshake.
///
/// Filled in by the verifier even when the handshake is refused, so the caller can
/// explain a mismatch ("expected X, got Y") instead of a bare TLS alert.
#[derive(Debug, Default)]
pub struct SeenPeer(Mutex<Option<Fingerprint>>);

impl SeenPeer {
    /// The fingerprint the peer presented, if the handshake got that far.
    pub fn get(&self) -> Option<Fingerprint> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Server-certificate check for the sender: pinned fingerprint, or any key (trust on
/// first use, decided by the caller after the handshake).
#[derive(Debug)]
struct PinnedServer {
    expected: Option<Fingerprint>,
    seen: Arc<SeenPeer>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let fp = Fingerprint::of_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        *self.seen.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(fp);
        match self.expected {
            Some(expected) if expected != fp => Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            )),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Client-certificate check for the receiver: every sender must prove a key; whether
/// that key may send files is the application's decision (allow list or consent), made
/// after the handshake so the refusal can carry a readable reason.
#[derive(Debug)]
struct AnyClientKey {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyClientKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Fingerprint::of_cert(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// rustls client configuration that presents `identity` and accepts only a server whose
/// key matches `expected` (or any key when `None`; see [`SeenPeer`]).
pub fn client_crypto(
    identity: &Identity,
    expected: Option<Fingerprint>,
    alpn: &[Vec<u8>],
) -> Result<(QuicClientConfig, Arc<SeenPeer>), TlsError> {
    let provider = provider();
    let seen = Arc::new(SeenPeer::default());
    let verifier = Arc::new(PinnedServer {
        expected,
        seen: seen.clone(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![identity.cert().clone()], identity.key())?;
    config.alpn_protocols = alpn.to_vec();
    Ok((QuicClientConfig::try_from(config)?, seen))
}

/// rustls server configuration that presents `identity` and requires every client to
/// present a key of its own.
pub fn server_crypto(identity: &Identity, alpn: &[Vec<u8>]) -> Result<QuicServerConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(AnyClientKey {
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert().clone()], identity.key())?;
    config.alpn_protocols = alpn.to_vec();
    Ok(QuicServerConfig::try_from(config)?)
}

/// The fingerprint of the key the peer proved in the handshake of `conn`.
pub fn peer_fingerprint(conn: &quinn::Connection) -> Option<Fingerprint> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    Fingerprint::of_cert(certs.first()?).ok()
}

/// rustls configuration for a TLS stream (not QUIC) to a host whose certificate is not
/// checked: the rendezvous over TCP ([`crate::tcp`]). The rendezvous is untrusted by design
/// (the PAKE protects meetings, and the QUIC connection carried inside has its own TLS);
/// this outer TLS is there so the stream looks like any HTTPS flow to middleboxes. The
/// handshake signature is still verified, against whatever key the server presents.
pub fn stream_client_config(alpn: &[Vec<u8>]) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedServer {
        expected: None,
        seen: Arc::default(),
        algorithms: provider.signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// rustls configuration for TLS to a TURN server (`turns:`, [`crate::turn`]): like
/// [`stream_client_config`] (no certificate authority; the handshake signature verified),
/// but TLS 1.2 too, with rustls's safe defaults, because TURN servers in use today (Debian's
/// coturn 4.6) speak no TLS 1.3. Nothing qpunch protects rests on this TLS: see
/// [`crate::turn`].
pub fn turn_client_config() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(PinnedServer {
        expected: None,
        seen: Arc::default(),
        algorithms: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// rustls configuration for the server end of [`stream_client_config`]: presents
/// `identity`, asks no client certificate (the client proves itself, if at all, inside the
/// QUIC connection it carries), and speaks only `alpn`.
pub fn stream_server_config(
    identity: &Identity,
    alpn: &[Vec<u8>],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert().clone()], identity.key())?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// Whether a handshake failed because the two sides have no application protocol (ALPN)
/// in common: the TLS alert `no_application_protocol` (120), which QUIC carries as the
/// CRYPTO_ERROR 0x100 + 120 = 0x178, whichever side sent it. Usually two versions of one
/// protocol: callers turn it into a message that names ours.
pub fn is_no_common_protocol(error: &quinn::ConnectionError) -> bool {
    let alert = quinn::TransportErrorCode::crypto(120);
    match error {
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code == alert,
        quinn::ConnectionError::TransportError(e) => e.code == alert,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transport(alert: u8) -> quinn::ConnectionError {
        quinn::ConnectionError::TransportError(quinn_proto::TransportError {
            code: quinn::TransportErrorCode::crypto(alert),
            frame: None,
            reason: String::new(),
        })
    }

    #[test]
    fn the_alpn_alert_is_told_from_other_failures() {
        assert!(is_no_common_protocol(&transport(120)));
        assert!(!is_no_common_protocol(&transport(42)), "bad certificate");
        assert!(!is_no_common_protocol(&quinn::ConnectionError::TimedOut));
    }
}
