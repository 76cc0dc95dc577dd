//! TLS termination on a listener and TLS toward backends, with certificates made by the test.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use warren_lb::config::{TlsClientConfig, TlsServerConfig};

struct TestCert {
    cert_pem: PathBuf,
    key_pem: PathBuf,
    der: CertificateDer<'static>,
    key: Vec<u8>,
}

fn make_cert(tag: &str) -> TestCert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = std::env::temp_dir().join(format!("warren-lb-tls-{}-{tag}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert_pem = dir.join("cert.pem");
    let key_pem = dir.join("key.pem");
    std::fs::write(&cert_pem, ck.cert.pem()).unwrap();
    std::fs::write(&key_pem, ck.key_pair.serialize_pem()).unwrap();
    TestCert {
        cert_pem,
        key_pem,
        der: ck.cert.der().clone(),
        key: ck.key_pair.serialize_der(),
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn client_config(ca: &CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

#[tokio::test]
async fn tls_termination_on_a_listener() {
    let cert = make_cert("term");
    let b = echo_backend().await;
    let mut cfg = listener("tls", &[b.addr]);
    cfg.tls = Some(TlsServerConfig {
        cert: cert.cert_pem.clone(),
        key: cert.key_pem.clone(),
    });
    let lb = start(config(vec![cfg])).await;
    let tcp = TcpStream::connect(lb.addr("tls")).await.unwrap();
    let connector = TlsConnector::from(client_config(&cert.der));
    let mut s = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("handshake with the balancer");
    s.write_all(b"secret hello").await.unwrap();
    let mut back = [0u8; 12];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"secret hello");
    // The backend saw plain text.
    assert_eq!(b.served(), 1);
    lb.stop().await;
}

#[tokio::test]
async fn plain_client_on_a_tls_listener_is_not_proxied() {
    let cert = make_cert("plain");
    let b = echo_backend().await;
    let mut cfg = listener("tls", &[b.addr]);
    cfg.tls = Some(TlsServerConfig {
        cert: cert.cert_pem.clone(),
        key: cert.key_pem.clone(),
    });
    let lb = start(config(vec![cfg])).await;
    let mut s = TcpStream::connect(lb.addr("tls")).await.unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").await.unwrap();
    let end = read_end(&mut s, WAIT).await;
    assert!(
        matches!(end, Some(ReadEnd::Eof | ReadEnd::Reset | ReadEnd::Data(_))),
        "{end:?}"
    );
    assert_eq!(b.accepted(), 0);
    lb.stop().await;
}

#[tokio::test]
async fn tls_toward_backends() {
    let cert = make_cert("orig");
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let b = backend_on(
        "127.0.0.1:0".parse().unwrap(),
        move |s: TcpStream, served| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                let mut first = true;
                loop {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if std::mem::take(&mut first) {
                                served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            }
                            if tls.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = tls.shutdown().await;
            }
        },
    )
    .await;
    let mut cfg = listener("orig", &[b.addr]);
    cfg.backend_tls = Some(TlsClientConfig {
        ca: cert.cert_pem.clone(),
        server_name: Some("localhost".to_string()),
    });
    let lb = start(config(vec![cfg])).await;
    let mut s = connect_echo(lb.addr("orig"), b"over tls to the backend").await;
    roundtrip(&mut s, b"and again").await;
    // Half-close passes through TLS too (close_notify, then EOF back).
    s.shutdown().await.unwrap();
    assert_eq!(read_end(&mut s, WAIT).await, Some(ReadEnd::Eof));
    assert_eq!(b.served(), 1);
    lb.stop().await;
}

#[tokio::test]
async fn a_missing_certificate_fails_bind_with_a_clear_error() {
    let b = echo_backend().await;
    let mut cfg = listener("bad", &[b.addr]);
    cfg.tls = Some(TlsServerConfig {
        cert: "/nonexistent/cert.pem".into(),
        key: "/nonexistent/key.pem".into(),
    });
    let err = warren_lb::Lb::bind(config(vec![cfg]))
        .await
        .err()
        .expect("bind fails");
    let msg = err.to_string();
    assert!(
        msg.contains("bad") && msg.contains("/nonexistent/cert.pem"),
        "{msg}"
    );
}

#[tokio::test]
async fn http_health_check_speaks_tls_to_tls_backends() {
    let cert = make_cert("health");
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der.clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(cert.key.clone())),
        )
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let status = Arc::new(std::sync::atomic::AtomicU16::new(200));
    let st = status.clone();
    let b = backend_on("127.0.0.1:0".parse().unwrap(), move |s: TcpStream, _| {
        let acceptor = acceptor.clone();
        let st = st.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let mut buf = [0u8; 1024];
            let Ok(n) = tls.read(&mut buf).await else {
                return;
            };
            if buf[..n].starts_with(b"GET /health") {
                let code = st.load(std::sync::atomic::Ordering::SeqCst);
                let resp = format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        }
    })
    .await;
    let mut cfg = listener("hc", &[b.addr]);
    cfg.backend_tls = Some(TlsClientConfig {
        ca: cert.cert_pem.clone(),
        server_name: Some("localhost".to_string()),
    });
    cfg.health = fast_health(2, 2);
    cfg.health.check = warren_lb::config::HealthCheck::Http;
    cfg.health.path = "/health".to_string();
    let lb = start(config(vec![cfg])).await;
    let mut ev = lb.events();
    status.store(503, std::sync::atomic::Ordering::SeqCst);
    let down = ev.wait("backend_down", Some(b.addr)).await;
    assert!(down["cause"].as_str().unwrap().contains("503"), "{down}");
    status.store(200, std::sync::atomic::Ordering::SeqCst);
    ev.wait("backend_up", Some(b.addr)).await;
    lb.stop().await;
}
