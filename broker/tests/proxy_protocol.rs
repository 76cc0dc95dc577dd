//! `proxy-protocol = true` over real sockets: the client address from a PROXY v1/v2 header is the
//! peer for the guest loopback rule (AMQP, AMQPS, HTTP), connection names and the management
//! API; connections without a header, or from sources outside `proxy-protocol-from`, are refused.
//!
//! The load balancer is played by the test: it writes the header itself (as warren-lb and
//! HAProxy do) or runs [`relay`], a stand-in balancer that prepends a header and copies bytes.
//! `tests/tests/lb_proxy_protocol.rs` at the workspace root does the same through warren-lb.

mod support;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{connection, AMQPClass};
use amq_protocol::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use support::http::{raw_http_prefixed, Resp};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use warren_broker::codec;
use warren_broker::config::{Config, PermissionConfig, UserConfig};

const V2_SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

fn v1(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().expect("src"), dst.parse().expect("dst"));
    let fam = if s.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {fam} {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

fn v2_tcp4(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().expect("src"), dst.parse().expect("dst"));
    let (SocketAddr::V4(s), SocketAddr::V4(d)) = (s, d) else {
        panic!("IPv4 addresses only");
    };
    let mut h = V2_SIG.to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0x00, 12]);
    h.extend_from_slice(&s.ip().octets());
    h.extend_from_slice(&d.ip().octets());
    h.extend_from_slice(&s.port().to_be_bytes());
    h.extend_from_slice(&d.port().to_be_bytes());
    h
}

fn v2_local() -> Vec<u8> {
    let mut h = V2_SIG.to_vec();
    h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
    h
}

/// guest (administrator, loopback only) and app (no tags) on "/".
fn config() -> Config {
    let perm = |user: &str| PermissionConfig {
        user: user.into(),
        vhost: "/".into(),
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    };
    Config {
        mgmt: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
        proxy_protocol: true,
        users: vec![
            UserConfig {
                name: "guest".into(),
                password: "guest".into(),
                tags: vec!["administrator".into()],
            },
            UserConfig {
                name: "app".into(),
                password: "app-pw".into(),
                tags: vec![],
            },
        ],
        permissions: vec![perm("guest"), perm("app")],
        ..Config::for_tests()
    }
}

fn mgmt_addr(b: &support::TestBroker) -> SocketAddr {
    b.shared
        .listeners
        .iter()
        .find(|(p, _)| *p == "http")
        .map(|(_, a)| *a)
        .expect("mgmt listener")
}

/// Sends the protocol header and start-ok with PLAIN `user`/`pass`: Ok once connection.tune
/// arrives, the close's reply code and text if the broker refuses.
async fn login<S>(s: &mut S, user: &str, pass: &str) -> Result<(), (u16, String)>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(codec::PROTOCOL_HEADER).await.expect("header");
    let mut buf = Vec::new();
    match next_frame(s, &mut buf).await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(_)))) => {}
        other => panic!("expected connection.start, got {other:?}"),
    }
    let start_ok = AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: format!("\0{user}\0{pass}").into(),
            locale: "en_US".into(),
        })),
    );
    let mut out = Vec::new();
    codec::encode(&start_ok, &mut out).expect("encode");
    s.write_all(&out).await.expect("start-ok");
    match next_frame(s, &mut buf).await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) => {
            Ok(())
        }
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
            Err((c.reply_code, c.reply_text.to_string()))
        }
        other => panic!("expected tune or close, got {other:?}"),
    }
}

async fn next_frame<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Option<AMQPFrame> {
    loop {
        if let Some((f, n)) = codec::decode(buf, 0).expect("server sent a bad frame") {
            buf.drain(..n);
            return Some(f);
        }
        let mut tmp = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut tmp))
            .await
            .expect("timed out reading")
            .unwrap_or(0);
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

/// A TCP connection to `addr` with `prefix` already sent.
async fn connect_with(addr: SocketAddr, prefix: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(prefix).await.expect("prefix");
    s
}

/// Sends `bytes` and asserts the broker closes the socket without sending anything back.
async fn closed_without_a_reply(addr: SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // The broker may already have closed (and reset) the socket: a failed write is fine. The
    // half-close ends a cut-short header at once (the header timeout has a unit test).
    let _ = s.write_all(bytes).await;
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(8), s.read_to_end(&mut got))
        .await
        .expect("the broker closed the connection");
    assert!(
        got.is_empty(),
        "expected no reply, got {:?} ({r:?})",
        String::from_utf8_lossy(&got)
    );
}

/// A stand-in load balancer on 127.0.0.1:0: for each client it connects to `backend`, sends
/// `header`, then copies bytes both ways.
async fn relay(backend: SocketAddr, header: Vec<u8>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
    let addr = l.local_addr().expect("relay addr");
    let header = Arc::new(header);
    tokio::spawn(async move {
        while let Ok((mut client, _)) = l.accept().await {
            let header = header.clone();
            tokio::spawn(async move {
                let Ok(mut up) = TcpStream::connect(backend).await else {
                    return;
                };
                if up.write_all(&header).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            });
        }
    });
    addr
}

async fn http_via(addr: SocketAddr, header: &[u8], path: &str, user: &str, pass: &str) -> Resp {
    raw_http_prefixed(addr, header, "GET", path, Some((user, pass)), None).await
}

#[tokio::test]
async fn guest_from_a_proxied_remote_address_is_refused_on_amqp() {
    let b = support::start_with(config()).await;
    for header in [
        v1("203.0.113.7:40000", "10.0.0.5:5672"),
        v2_tcp4("203.0.113.7:40000", "10.0.0.5:5672"),
    ] {
        let mut s = connect_with(b.addr, &header).await;
        let (code, text) = login(&mut s, "guest", "guest").await.expect_err("refused");
        assert_eq!(code, 403, "{text}");
        assert!(text.starts_with("ACCESS_REFUSED"), "{text}");
        assert!(text.contains("can only connect via localhost"), "{text}");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn guest_from_a_proxied_loopback_address_logs_in() {
    let b = support::start_with(config()).await;
    for header in [
        v1("127.0.0.1:40000", "127.0.0.1:5672"),
        v2_tcp4("127.0.0.1:40001", "127.0.0.1:5672"),
        // warren-lb writes an IPv4 client behind an IPv6 listener as IPv4-mapped IPv6.
        b"PROXY TCP6 ::ffff:127.0.0.1 ::1 40002 5672\r\n".to_vec(),
    ] {
        let mut s = connect_with(b.addr, &header).await;
        login(&mut s, "guest", "guest")
            .await
            .unwrap_or_else(|e| panic!("{}: {e:?}", String::from_utf8_lossy(&header)));
    }
    b.shutdown().await;
}

#[tokio::test]
async fn header_and_protocol_header_in_one_segment() {
    let b = support::start_with(config()).await;
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    let mut bytes = v1("127.0.0.1:1", "127.0.0.1:2");
    bytes.extend_from_slice(codec::PROTOCOL_HEADER);
    s.write_all(&bytes).await.expect("one write");
    let mut buf = Vec::new();
    assert!(matches!(
        next_frame(&mut s, &mut buf).await,
        Some(AMQPFrame::Method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Start(_))
        ))
    ));
    b.shutdown().await;
}

#[tokio::test]
async fn a_user_behind_the_balancer_is_shown_with_the_client_address() {
    let b = support::start_with(config()).await;
    let mgmt = mgmt_addr(&b);
    let lb = relay(b.addr, v2_tcp4("203.0.113.7:40123", "10.0.0.5:5672")).await;
    let conn = Connection::connect(
        &format!("amqp://app:app-pw@{lb}/%2f"),
        ConnectionProperties::default(),
    )
    .await
    .expect("a non-guest user from a remote address connects");
    let ch = conn.create_channel().await.expect("channel");
    support::declare(&ch, "behind-lb", FieldTable::default()).await;
    let admin = v1("127.0.0.1:50000", "127.0.0.1:15672");
    let list = http_via(mgmt, &admin, "/api/connections", "guest", "guest").await;
    assert_eq!(list.status, 200, "{}", list.text());
    let list = list.json();
    let conns = list.as_array().expect("array");
    assert_eq!(conns.len(), 1, "{list}");
    let c = &conns[0];
    assert_eq!(c["peer_host"], "203.0.113.7", "{c}");
    assert_eq!(c["peer_port"], 40123, "{c}");
    assert_eq!(c["user"], "app", "{c}");
    // RabbitMQ names a proxied connection by the header's two addresses.
    assert_eq!(c["name"], "203.0.113.7:40123 -> 10.0.0.5:5672", "{c}");
    assert_eq!(c["host"], "10.0.0.5", "{c}");
    let name = c["name"].as_str().expect("name");
    let one = http_via(
        mgmt,
        &admin,
        &format!(
            "/api/connections/{}",
            name.replace(' ', "%20").replace('>', "%3E")
        ),
        "guest",
        "guest",
    )
    .await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert_eq!(one.json()["peer_host"], "203.0.113.7");
    conn.close(200, "bye".into()).await.expect("close");
    b.shutdown().await;
}

#[tokio::test]
async fn http_guest_from_a_proxied_remote_address_gets_401() {
    let b = support::start_with(config()).await;
    let mgmt = mgmt_addr(&b);
    for header in [
        v1("203.0.113.7:40000", "10.0.0.5:15672"),
        v2_tcp4("203.0.113.7:40000", "10.0.0.5:15672"),
    ] {
        let r = http_via(mgmt, &header, "/api/overview", "guest", "guest").await;
        assert_eq!(r.status, 401, "{}", r.text());
        let reason = r.json()["reason"].as_str().unwrap_or_default().to_owned();
        assert!(reason.contains("localhost"), "{reason}");
    }
    let r = http_via(
        mgmt,
        &v1("127.0.0.1:40000", "127.0.0.1:15672"),
        "/api/whoami",
        "guest",
        "guest",
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["name"], "guest");
    b.shutdown().await;
}

#[tokio::test]
async fn a_connection_without_a_header_from_a_trusted_source_is_closed() {
    let b = support::start_with(config()).await;
    let mgmt = mgmt_addr(&b);
    closed_without_a_reply(b.addr, codec::PROTOCOL_HEADER).await;
    closed_without_a_reply(mgmt, b"GET /api/overview HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // Garbage after a good start of a header, and a header cut short by the client.
    closed_without_a_reply(b.addr, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n").await;
    closed_without_a_reply(b.addr, b"PROXY TCP4 1.2").await;
    // The broker is fine afterwards.
    let mut s = connect_with(b.addr, &v2_local()).await;
    login(&mut s, "guest", "guest").await.expect("login");
    b.shutdown().await;
}

#[tokio::test]
async fn a_connection_from_an_untrusted_source_is_refused() {
    // 127.0.0.1 is not a balancer here: even a valid header from it is not believed.
    let b = support::start_with(Config {
        proxy_protocol_from: vec!["10.0.0.0/8".parse().expect("cidr")],
        ..config()
    })
    .await;
    let mgmt = mgmt_addr(&b);
    let mut bytes = v1("127.0.0.1:1", "127.0.0.1:2");
    bytes.extend_from_slice(codec::PROTOCOL_HEADER);
    closed_without_a_reply(b.addr, &bytes).await;
    closed_without_a_reply(b.addr, codec::PROTOCOL_HEADER).await;
    let mut req = v2_local();
    req.extend_from_slice(b"GET /api/overview HTTP/1.1\r\nHost: x\r\n\r\n");
    closed_without_a_reply(mgmt, &req).await;
    b.shutdown().await;
}

#[tokio::test]
async fn v2_local_keeps_the_socket_address() {
    let b = support::start_with(config()).await;
    let mgmt = mgmt_addr(&b);
    // A balancer's health check: LOCAL (v2) or UNKNOWN (v1) speaks for the balancer itself,
    // here on loopback, so guest may log in.
    let mut s = connect_with(b.addr, &v2_local()).await;
    login(&mut s, "guest", "guest").await.expect("v2 LOCAL");
    let mut s = connect_with(b.addr, b"PROXY UNKNOWN\r\n").await;
    login(&mut s, "guest", "guest").await.expect("v1 UNKNOWN");
    let r = http_via(mgmt, &v2_local(), "/api/connections", "guest", "guest").await;
    assert_eq!(r.status, 200, "{}", r.text());
    let list: Value = r.json();
    let hosts: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["peer_host"].as_str())
        .collect();
    assert!(!hosts.is_empty(), "{list}");
    assert!(hosts.iter().all(|h| *h == "127.0.0.1"), "{list}");
    b.shutdown().await;
}

#[tokio::test]
async fn amqps_takes_the_header_before_the_tls_handshake() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, ck.cert.pem()).expect("write cert");
    std::fs::write(&key_path, ck.key_pair.serialize_pem()).expect("write key");
    let b = support::start_with(Config {
        amqps: vec!["127.0.0.1:0".parse().expect("addr")],
        tls_cert: Some(cert_path),
        tls_key: Some(key_path),
        ..config()
    })
    .await;
    let tls_addr = b
        .shared
        .listeners
        .iter()
        .find(|(p, _)| *p == "amqp/ssl")
        .map(|(_, a)| *a)
        .expect("amqps listener");
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
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls_login = |header: Vec<u8>| {
        let (connector, name) = (connector.clone(), name.clone());
        async move {
            let tcp = connect_with(tls_addr, &header).await;
            let mut tls = connector.connect(name, tcp).await.expect("tls handshake");
            login(&mut tls, "guest", "guest").await
        }
    };
    let (code, text) = tls_login(v2_tcp4("203.0.113.7:40000", "10.0.0.5:5671"))
        .await
        .expect_err("remote guest refused");
    assert_eq!(code, 403, "{text}");
    tls_login(v1("127.0.0.1:40000", "127.0.0.1:5671"))
        .await
        .expect("loopback guest over TLS");
    b.shutdown().await;
}

#[tokio::test]
async fn with_proxy_protocol_off_a_header_is_a_protocol_header_mismatch() {
    let b = support::start_with(Config {
        proxy_protocol: false,
        ..config()
    })
    .await;
    let mut s = connect_with(b.addr, &v1("203.0.113.7:1", "10.0.0.5:5672")).await;
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(got, codec::PROTOCOL_HEADER);
    b.shutdown().await;
}
