//! Optional TLS on links (rustls, ring provider), mutual: each node presents its certificate
//! and verifies its peer's against the configured CA, in both directions. The dialer checks the
//! acceptor's certificate against the host it dialed (so certificates need SANs for the
//! advertised host names or IPs). The shared-secret handshake still runs inside TLS.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::ClusterTls;
use crate::error::ClusterError;

/// Both ends of TLS for this node.
#[derive(Clone)]
pub(crate) struct Tls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) connector: TlsConnector,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn cfg_err(path: &Path, e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Config(format!("tls: {}: {e}", path.display()))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, ClusterError> {
    let file = std::fs::File::open(path).map_err(|e| cfg_err(path, e))?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cfg_err(path, e))?;
    if certs.is_empty() {
        return Err(cfg_err(path, "no certificate found"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, ClusterError> {
    let file = std::fs::File::open(path).map_err(|e| cfg_err(path, e))?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|e| cfg_err(path, e))?
        .ok_or_else(|| cfg_err(path, "no private key found"))
}

// === impl Tls ===

impl Tls {
    /// Load certificates and build both configs; any error is a configuration error.
    pub(crate) fn load(cfg: &ClusterTls) -> Result<Tls, ClusterError> {
        let certs = read_certs(&cfg.cert)?;
        let key = read_key(&cfg.key)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in read_certs(&cfg.ca)? {
            roots.add(ca).map_err(|e| cfg_err(&cfg.ca, e))?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| cfg_err(&cfg.ca, e))?;
        let server = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err(&cfg.cert, e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(|e| cfg_err(&cfg.cert, e))?;
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| cfg_err(&cfg.cert, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| cfg_err(&cfg.cert, e))?;
        Ok(Tls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            connector: TlsConnector::from(Arc::new(client)),
        })
    }
}

/// The name to verify when dialing `addr` (host:port, IPv6 in brackets).
pub(crate) fn server_name(addr: &str) -> Option<ServerName<'static>> {
    let host = addr
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(addr)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_string()).ok()
}
