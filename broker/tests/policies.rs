//! Policies across a restart of the real binary: a policy and an operator policy stored in
//! `definitions.json` apply again to the durable queue they matched, and to its exchange.
//! (What policies do while the broker runs is covered with pika and rabbitmqadmin, against
//! RabbitMQ too, in tests/python/test_policies.py.)

mod support;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::json;
use support::http::http;
use support::proc::spawn;

async fn start(data: &std::path::Path) -> support::proc::BrokerProc {
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

#[tokio::test]
async fn policies_apply_again_after_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let b = start(data.path()).await;
    let api: std::net::SocketAddr = b.addr("mgmt").parse().expect("addr");
    let guest = Some(("guest", "guest"));
    for (kind, name, body) in [
        (
            "policies",
            "cap",
            json!({"pattern": "^orders$", "apply-to": "queues", "definition": {"max-length": 3}}),
        ),
        (
            "operator-policies",
            "ttl",
            json!({"pattern": ".*", "apply-to": "queues", "definition": {"message-ttl": 600000}}),
        ),
        (
            "policies",
            "ae",
            json!({"pattern": "^in$", "apply-to": "exchanges",
                   "definition": {"alternate-exchange": "amq.fanout"}}),
        ),
    ] {
        let r = http(
            api,
            "PUT",
            &format!("/api/{kind}/%2f/{name}"),
            guest,
            Some(body),
        )
        .await;
        assert_eq!(r.status, 201, "{}", r.text());
    }
    let (_c, ch) = b.connect().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.queue_declare(
        "orders".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.exchange_declare(
        "in".into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    b.term().await;

    let b = start(data.path()).await;
    let api: std::net::SocketAddr = b.addr("mgmt").parse().expect("addr");
    let q = http(api, "GET", "/api/queues/%2f/orders", guest, None)
        .await
        .json();
    assert_eq!(q["policy"], "cap", "{q}");
    assert_eq!(q["operator_policy"], "ttl", "{q}");
    assert_eq!(
        q["effective_policy_definition"],
        json!({"max-length": 3, "message-ttl": 600000})
    );
    let x = http(api, "GET", "/api/exchanges/%2f/in", guest, None)
        .await
        .json();
    assert_eq!(x["policy"], "ae", "{x}");
    // And they act: five persistent publishes leave three.
    let (_c, ch) = b.connect().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for i in 0..5u8 {
        ch.basic_publish(
            "".into(),
            "orders".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let n = ch
        .queue_declare(
            "orders".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive")
        .message_count();
    assert_eq!(n, 3);
    b.term().await;
}
