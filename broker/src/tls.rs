//! AMQPS: rustls server config (ring provider) from PEM files.

use crate::config::Config;
use std::sync::Arc;

/// Builds the TLS acceptor from `tls-cert` / `tls-key`.
pub fn acceptor(cfg: &Config) -> Result<tokio_rustls::TlsAcceptor, String> {
    let cert_path = cfg.tls_cert.as_ref().ok_or("tls-cert missing")?;
    let key_path = cfg.tls_key.as_ref().ok_or("tls-key missing")?;
    let cert_pem = std::fs::read(cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key_pem = std::fs::read(key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    acceptor_from_pem(&cert_pem, &key_pem)
}

/// Builds the TLS acceptor from PEM bytes.
pub fn acceptor_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<tokio_rustls::TlsAcceptor, String> {
    let certs = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    if certs.is_empty() {
        return Err("no certificate in tls-cert".into());
    }
    let key = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| format!("bad key PEM: {e}"))?
        .ok_or("no private key in tls-key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
