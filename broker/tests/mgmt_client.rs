//! A real client of the management API: the `rabbitmq_http_client` crate (what rabbitmqadmin v2
//! is built on) lists, declares, binds, publishes, gets and deletes against warren.

use rabbitmq_http_client::api::Client;
use rabbitmq_http_client::commons::{BindingDestinationType, ExchangeType};
use rabbitmq_http_client::requests::{BindingDeletionParams, ExchangeParams, QueueParams};
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use tokio_util::sync::CancellationToken;
use warren_broker::config::Config;
use warren_broker::Broker;

#[tokio::test]
async fn rabbitmq_http_client_drives_the_api() {
    let mut cfg = Config::for_tests();
    cfg.mgmt = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    let data = tempfile::tempdir().expect("tempdir");
    cfg.data_dir = data.path().to_owned();
    let bound = Broker::bind(cfg).await.expect("bind");
    let endpoint = format!("http://{}/api", bound.mgmt_addrs[0]);
    let token = CancellationToken::new();
    let join = tokio::spawn(bound.run(token.clone()));
    let c = Client::new(endpoint.as_str(), "guest", "guest");

    let o = c.overview().await.expect("overview");
    assert_eq!(o.node, "warren@127.0.0.1");
    assert_eq!(o.product_name, "warren");
    let nodes = c.list_nodes().await.expect("nodes");
    assert_eq!(nodes[0].name, "warren@127.0.0.1");
    assert!(c
        .list_vhosts()
        .await
        .expect("vhosts")
        .iter()
        .any(|v| v.name == "/"));
    assert_eq!(c.current_user().await.expect("whoami").name, "guest");

    // Declare a queue and an exchange, bind them.
    let mut args = Map::new();
    args.insert("x-max-length".into(), json!(100));
    c.declare_queue(
        "/",
        &QueueParams::new_durable_classic_queue("orders", Some(args)),
    )
    .await
    .expect("declare queue");
    c.declare_exchange("/", &ExchangeParams::durable_topic("events", None))
        .await
        .expect("declare exchange");
    c.bind_queue("/", "orders", "events", Some("order.*"), None)
        .await
        .expect("bind");
    let queues = c.list_queues().await.expect("list queues");
    let q = queues
        .iter()
        .find(|q| q.name == "orders")
        .expect("orders listed");
    assert!(q.durable);
    assert_eq!(q.vhost, "/");
    let info = c.get_queue_info("/", "orders").await.expect("queue info");
    assert_eq!(info.name, "orders");
    let exchanges = c.list_exchanges_in("/").await.expect("exchanges");
    let e = exchanges
        .iter()
        .find(|e| e.name == "events")
        .expect("events listed");
    assert_eq!(e.exchange_type, "topic");
    let bindings = c
        .list_queue_bindings("/", "orders")
        .await
        .expect("bindings");
    assert!(bindings
        .iter()
        .any(|b| b.source == "events" && b.routing_key == "order.*"));

    // Publish through the exchange, get it back.
    let mut props = Map::new();
    props.insert("content_type".into(), Value::from("text/plain"));
    let routed = c
        .publish_message("/", "events", "order.created", "hello from the api", props)
        .await
        .expect("publish");
    assert!(routed.routed);
    let unrouted = c
        .publish_message("/", "events", "nothing.matches", "x", Map::new())
        .await
        .expect("publish");
    assert!(!unrouted.routed);
    let msgs = c
        .get_messages("/", "orders", 5, "ack_requeue_false")
        .await
        .expect("get");
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].payload, "hello from the api");
    assert_eq!(msgs[0].routing_key, "order.created");
    assert_eq!(msgs[0].exchange, "events");
    assert_eq!(
        msgs[0].properties.0.get("content_type"),
        Some(&Value::from("text/plain"))
    );
    assert!(c
        .get_messages("/", "orders", 1, "ack_requeue_false")
        .await
        .expect("get")
        .is_empty());

    // Purge, unbind, delete.
    c.publish_message("/", "", "orders", "again", Map::new())
        .await
        .expect("publish default");
    c.purge_queue("/", "orders").await.expect("purge");
    assert!(c
        .get_messages("/", "orders", 1, "ack_requeue_true")
        .await
        .expect("get")
        .is_empty());
    c.delete_binding(
        &BindingDeletionParams {
            virtual_host: "/",
            source: "events",
            destination: "orders",
            destination_type: BindingDestinationType::Queue,
            routing_key: "order.*",
            arguments: None,
        },
        false,
    )
    .await
    .expect("unbind");
    assert!(!c
        .list_queue_bindings("/", "orders")
        .await
        .expect("bindings")
        .iter()
        .any(|b| b.source == "events"));
    c.delete_queue("/", "orders", false)
        .await
        .expect("delete queue");
    c.delete_exchange("/", "events", false)
        .await
        .expect("delete exchange");
    assert!(
        c.delete_queue("/", "orders", false).await.is_err(),
        "second delete must 404"
    );
    c.delete_queue("/", "orders", true)
        .await
        .expect("idempotent delete");
    assert!(!c
        .list_queues()
        .await
        .expect("list")
        .iter()
        .any(|q| q.name == "orders"));
    let _ = ExchangeType::Topic;

    token.cancel();
    join.await.expect("broker task");
}
