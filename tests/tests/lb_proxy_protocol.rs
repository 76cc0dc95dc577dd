//! warren-lb in front of warren-broker with the PROXY protocol on both sides (lb
//! `proxy_protocol = "v1" | "v2"`, broker `proxy-protocol = true`): the broker sees the client
//! that connected to the balancer, not the balancer, on AMQP and on the management API.

use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use warren_lb::config::{ListenerConfig, ProxyProtocol};

fn lb_listener(name: &str, backend: SocketAddr, pp: ProxyProtocol) -> ListenerConfig {
    ListenerConfig {
        name: name.into(),
        bind: "127.0.0.1:0".parse().expect("addr"),
        backends: vec![backend.to_string()],
        proxy_protocol: pp,
        drain_timeout: Duration::from_millis(200),
        ..ListenerConfig::default()
    }
}

/// GET `path` as guest over a fresh connection; the JSON body.
async fn get_json(addr: SocketAddr, path: &str) -> Value {
    let mut s = TcpStream::connect(addr).await.expect("http connect");
    // guest:guest
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("request");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("response in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}\n{body}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[tokio::test]
async fn the_broker_sees_the_client_behind_warren_lb() {
    let data = std::env::temp_dir().join(format!("warren-e2e-pp-{}", std::process::id()));
    let cfg = warren_broker::config::Config {
        mgmt: vec!["127.0.0.1:0".parse().expect("addr")],
        proxy_protocol: true,
        data_dir: data.clone(),
        ..warren_broker::config::Config::for_tests()
    };
    let broker = warren_broker::Broker::bind(cfg).await.expect("broker bind");
    let amqp = broker.amqp_addrs[0];
    let mgmt = broker.mgmt_addrs[0];
    let broker_stop = CancellationToken::new();
    let broker_task = tokio::spawn(broker.run(broker_stop.clone()));

    let lb_cfg = warren_lb::Config {
        listeners: vec![
            lb_listener("amqp-v1", amqp, ProxyProtocol::V1),
            lb_listener("amqp-v2", amqp, ProxyProtocol::V2),
            lb_listener("mgmt", mgmt, ProxyProtocol::V2),
        ],
        ..warren_lb::Config::default()
    };
    let lb = warren_lb::Lb::bind(lb_cfg).await.expect("lb bind");
    let addr = |name: &str| lb.addr(name).expect("lb listener");
    let (v1, v2, lb_mgmt) = (addr("amqp-v1"), addr("amqp-v2"), addr("mgmt"));
    let lb_stop = CancellationToken::new();
    let lb_task = tokio::spawn(lb.run(lb_stop.clone()));

    // A real client through each listener: guest works, the client being on loopback.
    for via in [v1, v2] {
        let c = Connection::connect(
            &format!("amqp://guest:guest@{via}/%2f"),
            ConnectionProperties::default(),
        )
        .await
        .expect("lapin through warren-lb");
        let ch = c.create_channel().await.expect("channel");
        ch.close(200, "bye".into()).await.expect("channel close");
        c.close(200, "bye".into()).await.expect("close");
    }

    // Raw clients whose own port we know: the broker must report that port, not the one the
    // balancer connected from.
    let mut clients = Vec::new();
    for via in [v1, v2] {
        let mut s = TcpStream::connect(via).await.expect("connect via lb");
        s.write_all(warren_broker::codec::PROTOCOL_HEADER)
            .await
            .expect("protocol header");
        let mut start = [0u8; 7];
        s.read_exact(&mut start)
            .await
            .expect("connection.start arrives");
        assert_eq!(start[0], 1, "a method frame");
        let me = s.local_addr().expect("local addr");
        clients.push((s, me, via));
    }
    let conns = get_json(lb_mgmt, "/api/connections").await;
    let conns = conns.as_array().expect("array");
    for (_, me, via) in &clients {
        let c = conns
            .iter()
            .find(|c| c["peer_port"] == me.port())
            .unwrap_or_else(|| panic!("no connection from {me} in {conns:?}"));
        assert_eq!(c["peer_host"], "127.0.0.1", "{c}");
        assert_eq!(c["name"], format!("{me} -> {via}"), "{c}");
        assert_eq!(c["port"], via.port(), "{c}");
    }
    drop(clients);

    lb_stop.cancel();
    broker_stop.cancel();
    lb_task.await.expect("lb run");
    broker_task.await.expect("broker run");
    let _ = std::fs::remove_dir_all(&data);
}
