//! TLS with rustls (ring provider): termination on a listener, origination toward backends.
//!
//! Config objects are built once per listener configuration (at bind and at reload) and shared by
//! every connection; a bad certificate or key is a configuration error reported before binding.

use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{TlsClientConfig, TlsServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no certificate found")]
    NoCert { path: String },
    #[error("{path}: no private key found")]
    NoKey { path: String },
    #[error("invalid server name `{0}`")]
    ServerName(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    let certs = rustls_pemfile::certs(&mut BufReader::new(file))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: p.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert { path: p });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let p = path.display().to_string();
    let file = std::fs::File::open(path).map_err(|source| TlsError::Read {
        path: p.clone(),
        source,
    })?;
    rustls_pemfile::private_key(&mut BufReader::new(file))
        .map_err(|source| TlsError::Read {
            path: p.clone(),
            source,
        })?
        .ok_or(TlsError::NoKey { path: p })
}

/// The acceptor of a TLS-terminating listener.
pub fn acceptor(cfg: &TlsServerConfig) -> Result<TlsAcceptor, TlsError> {
    let certs = read_certs(&cfg.cert)?;
    let key = read_key(&cfg.key)?;
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(TlsAcceptor::from(Arc::new(server)))
}

/// Origination toward backends: a connector and the fixed server name, if configured.
#[derive(Clone)]
pub struct BackendTls {
    pub connector: TlsConnector,
    pub server_name: Option<ServerName<'static>>,
}

impl BackendTls {
    pub fn new(cfg: &TlsClientConfig) -> Result<Self, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in read_certs(&cfg.ca)? {
            roots.add(cert)?;
        }
        let client = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let server_name = match &cfg.server_name {
            Some(n) => {
                Some(ServerName::try_from(n.clone()).map_err(|_| TlsError::ServerName(n.clone()))?)
            }
            None => None,
        };
        Ok(Self {
            connector: TlsConnector::from(Arc::new(client)),
            server_name,
        })
    }

    /// The name to verify for `backend` (`host:port`).
    pub fn name_for(&self, backend: &str) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = backend
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(backend)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName(host.to_string()))
    }
}
