//! `server-identity`: what connection.start's server properties and the management API's
//! overview say the broker is.

mod support;

use support::http::http;
use support::raw::Raw;

use amq_protocol::types::{AMQPValue, FieldTable};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use warren_broker::config::{Config, ServerIdentity};
use warren_broker::Broker;

fn text(p: &FieldTable, key: &str) -> String {
    match p.inner().get(key) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("{key}: expected a long string, got {other:?}"),
    }
}

/// Starts a broker with `identity` and an HTTP API; returns connection.start's server
/// properties and /api/overview.
async fn observe(identity: ServerIdentity) -> (FieldTable, serde_json::Value) {
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_tests();
    cfg.data_dir = data.path().to_owned();
    cfg.mgmt = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    cfg.server_identity = identity;
    let bound = Broker::bind(cfg).await.expect("bind");
    let (amqp, mgmt) = (bound.amqp_addrs[0], bound.mgmt_addrs[0]);
    let token = CancellationToken::new();
    let join = tokio::spawn(bound.run(token.clone()));
    let mut r = Raw::connect(amqp).await;
    r.handshake(0).await;
    let props = r.server_properties.take().expect("connection.start seen");
    let overview = http(mgmt, "GET", "/api/overview", Some(("guest", "guest")), None)
        .await
        .json();
    drop(r);
    token.cancel();
    join.await.expect("broker task");
    (props, overview)
}

fn capabilities(p: &FieldTable) -> Vec<String> {
    let Some(AMQPValue::FieldTable(caps)) = p.inner().get("capabilities") else {
        panic!("no capabilities table");
    };
    let mut names: Vec<String> = caps
        .inner()
        .iter()
        .map(|(k, v)| {
            assert_eq!(v, &AMQPValue::Boolean(true), "{k}");
            k.to_string()
        })
        .collect();
    names.sort();
    names
}

/// The capabilities Debian's RabbitMQ 3.10.8 sends, sorted.
const RABBITMQ_CAPABILITIES: [&str; 9] = [
    "authentication_failure_close",
    "basic.nack",
    "connection.blocked",
    "consumer_cancel_notify",
    "consumer_priorities",
    "direct_reply_to",
    "exchange_exchange_bindings",
    "per_consumer_qos",
    "publisher_confirms",
];

#[tokio::test]
async fn default_identity_is_warren() {
    let (p, o) = observe(ServerIdentity::default()).await;
    assert_eq!(text(&p, "product"), "warren");
    assert_eq!(text(&p, "version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(text(&p, "platform"), "Rust");
    assert_eq!(text(&p, "cluster_name"), "warren@127.0.0.1");
    assert_eq!(capabilities(&p), RABBITMQ_CAPABILITIES);
    assert_eq!(o["product_name"], "warren");
    assert_eq!(o["product_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(o["rabbitmq_version"], "3.10.8");
    assert_eq!(o["cluster_name"], "warren@127.0.0.1");
}

/// What Debian's RabbitMQ 3.10.8 sends (read off the real one): product, version, platform
/// and capabilities the same; cluster_name is the node's cluster name as the API shows it.
#[tokio::test]
async fn rabbitmq_identity_presents_rabbitmq_3_10_8() {
    let (p, o) = observe(ServerIdentity::Rabbitmq).await;
    assert_eq!(text(&p, "product"), "RabbitMQ");
    assert_eq!(text(&p, "version"), "3.10.8");
    assert_eq!(text(&p, "platform"), "Erlang/OTP 25.2.3");
    assert_eq!(text(&p, "cluster_name"), "warren@127.0.0.1");
    assert!(text(&p, "information").contains("warren"));
    assert_eq!(capabilities(&p), RABBITMQ_CAPABILITIES);
    assert_eq!(o["product_name"], "RabbitMQ");
    assert_eq!(o["product_version"], "3.10.8");
    assert_eq!(o["rabbitmq_version"], "3.10.8");
    assert_eq!(o["management_version"], "3.10.8");
}
