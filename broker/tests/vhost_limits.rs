//! Vhost limits across restarts of the real binary: `max-connections` and `max-queues` set
//! through the management API are kept in `definitions.json` (as RabbitMQ exports them, a
//! `vhost-limits` parameter), listed and enforced again after a restart, and a limit cleared
//! stays cleared. (Enforcement itself is covered against RabbitMQ too, in
//! tests/python/test_mgmt_health.py.)

mod support;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::net::SocketAddr;
use support::http::http;
use support::proc::{spawn, BrokerProc};

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

async fn start(data: &std::path::Path) -> BrokerProc {
    spawn(
        [
            "--amqp",
            "127.0.0.1:0",
            "--mgmt",
            "127.0.0.1:0",
            "--data-dir",
            data.to_str().expect("utf-8 path"),
        ],
        &[],
        &["amqp", "mgmt"],
    )
    .await
}

fn api(b: &BrokerProc) -> SocketAddr {
    b.addr("mgmt").parse().expect("addr")
}

async fn get(b: &BrokerProc, path: &str) -> Value {
    let r = http(api(b), "GET", path, GUEST, None).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json()
}

async fn connect(b: &BrokerProc, vhost: &str) -> Result<Connection, lapin::Error> {
    let uri = format!("amqp://guest:guest@{}/{vhost}", b.addr("amqp"));
    Connection::connect(&uri, ConnectionProperties::default()).await
}

async fn declare(c: &Connection, name: &str) -> Result<(), lapin::Error> {
    let ch = c.create_channel().await.expect("channel");
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .map(|_| ())
}

#[tokio::test]
async fn limits_are_kept_and_enforced_after_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let b = start(data.path()).await;
    for path in ["/api/vhosts/lim", "/api/permissions/lim/guest"] {
        let body = json!({"configure": ".*", "write": ".*", "read": ".*"});
        let r = http(api(&b), "PUT", path, GUEST, Some(body)).await;
        assert!(matches!(r.status, 201 | 204), "PUT {path}: {}", r.text());
    }
    for (name, value) in [("max-connections", 1), ("max-queues", 1)] {
        let path = format!("/api/vhost-limits/lim/{name}");
        let r = http(
            api(&b),
            "PUT",
            &path,
            GUEST,
            Some(json!({ "value": value })),
        )
        .await;
        assert_eq!(r.status, 204, "PUT {path}: {}", r.text());
    }
    // Exported as RabbitMQ does: one `vhost-limits` parameter named `limits`.
    let defs = get(&b, "/api/definitions").await;
    assert_eq!(
        defs["parameters"],
        json!([{"value": {"max-connections": 1, "max-queues": 1}, "vhost": "lim",
                "component": "vhost-limits", "name": "limits"}])
    );
    b.term().await;

    let b = start(data.path()).await;
    assert_eq!(
        get(&b, "/api/vhost-limits/lim").await,
        json!([{"vhost": "lim", "value": {"max-connections": 1, "max-queues": 1}}])
    );
    let first = connect(&b, "lim")
        .await
        .expect("the first connection is admitted");
    let second = connect(&b, "lim").await;
    assert!(second.is_err(), "max-connections 1 admitted a second");
    declare(&first, "one").await.expect("the first queue");
    assert!(
        declare(&first, "two").await.is_err(),
        "max-queues 1 admitted a second queue"
    );
    drop(first);
    let r = http(
        api(&b),
        "DELETE",
        "/api/vhost-limits/lim/max-connections",
        GUEST,
        None,
    )
    .await;
    assert_eq!(r.status, 204, "{}", r.text());
    b.term().await;

    // The cleared limit stays cleared, the other one stays.
    let b = start(data.path()).await;
    assert_eq!(
        get(&b, "/api/vhost-limits/lim").await,
        json!([{"vhost": "lim", "value": {"max-queues": 1}}])
    );
    let _one = connect(&b, "lim").await.expect("connect");
    let _two = connect(&b, "lim")
        .await
        .expect("no connection limit any more");
    b.term().await;
}
