//! AMQPS listener: TLS handshake (rustls, ring) and then the AMQP handshake over it.

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use warren_broker::codec;
use warren_broker::config::Config;
use warren_broker::Broker;

#[tokio::test]
async fn amqps_listener_speaks_amqp_over_tls() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let dir = std::env::temp_dir().join(format!("warren-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, ck.cert.pem()).expect("write cert");
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).expect("write key");

    let cfg = Config {
        amqps: vec!["127.0.0.1:0".parse().expect("addr")],
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..Config::for_tests()
    };
    let bound = Broker::bind(cfg).await.expect("bind");
    let addr = bound.amqps_addrs[0];
    let token = CancellationToken::new();
    let join = tokio::spawn(bound.run(token.clone()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).expect("root");
    let client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = connector.connect(name, tcp).await.expect("tls handshake");
    tls.write_all(codec::PROTOCOL_HEADER).await.expect("header");
    let mut buf = Vec::new();
    let frame = loop {
        let mut tmp = [0u8; 4096];
        let n = tls.read(&mut tmp).await.expect("read");
        assert!(n > 0, "closed before connection.start");
        buf.extend_from_slice(&tmp[..n]);
        if let Some((f, _)) = codec::decode(&buf, 0).expect("frame") {
            break f;
        }
    };
    assert!(matches!(
        frame,
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))
    ));
    token.cancel();
    join.await.expect("broker task");
    let _ = std::fs::remove_dir_all(&dir);
}
