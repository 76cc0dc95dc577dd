//! Vhost limits in a cluster: a limit set through one node's management API is replicated
//! with the other definitions, so every node lists and enforces it, and clearing it on any
//! node clears it everywhere. Two brokers in this process, clustered on loopback.

mod support;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::net::SocketAddr;
use support::cluster::{eventually, in_process, secret_file};
use support::http::http;
use support::TestBroker;

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

async fn call(b: &TestBroker, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mgmt: SocketAddr = b.mgmt.expect("mgmt");
    let r = http(mgmt, method, path, GUEST, body).await;
    let v = if r.text().is_empty() {
        Value::Null
    } else {
        r.json()
    };
    (r.status, v)
}

async fn connect(b: &TestBroker, vhost: &str) -> Result<Connection, lapin::Error> {
    let uri = format!("amqp://guest:guest@{}/{vhost}", b.addr);
    Connection::connect(&uri, ConnectionProperties::default()).await
}

/// Whether a queue can be declared in `vhost` on `b` now (the queue is deleted again).
async fn declares(b: &TestBroker, vhost: &str) -> bool {
    let Ok(c) = connect(b, vhost).await else {
        return false;
    };
    let ch = c.create_channel().await.expect("channel");
    let ok = ch
        .queue_declare(
            "probe".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .is_ok();
    if ok {
        let _ = ch.queue_delete("probe".into(), Default::default()).await;
    }
    let _ = c.close(200, "bye".into()).await;
    ok
}

#[tokio::test]
async fn a_limit_set_on_one_node_holds_on_the_other() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-lim");
    let a = in_process("a@lim", &secret, None).await;
    let seed = a
        .shared
        .cluster()
        .expect("clustered")
        .cluster
        .listen_addrs()[0]
        .to_string();
    let b = in_process("b@lim", &secret, Some(seed)).await;

    let (s, _) = call(&a, "PUT", "/api/vhosts/lim", Some(json!({}))).await;
    assert!(matches!(s, 201 | 204), "vhost: {s}");
    let perms = json!({"configure": ".*", "write": ".*", "read": ".*"});
    let (s, _) = call(&a, "PUT", "/api/permissions/lim/guest", Some(perms)).await;
    assert!(matches!(s, 201 | 204), "permissions: {s}");
    eventually("b has the vhost and guest may use it", || {
        declares(&b, "lim")
    })
    .await;

    // max-queues set on a: b refuses a declare and lists the limit.
    let (s, v) = call(
        &a,
        "PUT",
        "/api/vhost-limits/lim/max-queues",
        Some(json!({"value": 0})),
    )
    .await;
    assert_eq!(s, 204, "{v}");
    eventually("b lists a's limit", || async {
        call(&b, "GET", "/api/vhost-limits/lim", None).await.1
            == json!([{"vhost": "lim", "value": {"max-queues": 0}}])
    })
    .await;
    assert!(!declares(&b, "lim").await, "b declared past max-queues 0");
    assert!(!declares(&a, "lim").await, "a declared past max-queues 0");

    // max-connections set on b: a refuses a connection to the vhost.
    let (s, v) = call(
        &b,
        "PUT",
        "/api/vhost-limits/lim/max-connections",
        Some(json!({"value": 0})),
    )
    .await;
    assert_eq!(s, 204, "{v}");
    eventually("a refuses connections to lim", || async {
        connect(&a, "lim").await.is_err()
    })
    .await;
    assert!(connect(&b, "lim").await.is_err(), "b admitted a connection");

    // Cleared on a (both, as the whole parameter): both nodes admit again.
    let (s, v) = call(
        &a,
        "DELETE",
        "/api/parameters/vhost-limits/lim/limits",
        None,
    )
    .await;
    assert_eq!(s, 204, "{v}");
    eventually("b admits again", || declares(&b, "lim")).await;
    assert!(declares(&a, "lim").await, "a still limited");
    assert_eq!(
        call(&b, "GET", "/api/vhost-limits/lim", None).await.1,
        json!([])
    );
    b.shutdown().await;
    a.shutdown().await;
}
