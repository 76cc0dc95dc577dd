//! Shared helpers: start the broker in-process on 127.0.0.1:0 and connect lapin to it.
#![allow(dead_code)]

pub mod cluster;
pub mod drive;
pub mod http;
pub mod proc;
pub mod raw;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_broker::config::Config;
use warren_broker::Broker;

pub struct TestBroker {
    pub addr: SocketAddr,
    /// The first management and Prometheus listeners, when the config has them.
    pub mgmt: Option<SocketAddr>,
    pub prometheus: Option<SocketAddr>,
    token: CancellationToken,
    join: JoinHandle<()>,
    /// The broker's data directory, removed when the test ends.
    pub data: tempfile::TempDir,
    /// The broker's shared state (definitions API).
    pub shared: std::sync::Arc<warren_broker::BrokerShared>,
}

pub async fn start() -> TestBroker {
    start_with(Config::for_tests()).await
}

/// Starts a broker with `cfg`; its data directory is a fresh temp dir (whatever `cfg` says).
pub async fn start_with(mut cfg: Config) -> TestBroker {
    let data = tempfile::tempdir().expect("tempdir");
    cfg.data_dir = data.path().to_owned();
    let bound = Broker::bind(cfg).await.expect("bind");
    let addr = bound.amqp_addrs[0];
    let mgmt = bound.mgmt_addrs.first().copied();
    let prometheus = bound.prometheus_addrs.first().copied();
    let shared = bound.shared.clone();
    let token = CancellationToken::new();
    let join = tokio::spawn(bound.run(token.clone()));
    TestBroker {
        addr,
        mgmt,
        prometheus,
        token,
        join,
        data,
        shared,
    }
}

impl TestBroker {
    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.uri(), ConnectionProperties::default())
            .await
            .expect("connect")
    }

    pub async fn channel(&self) -> (Connection, Channel) {
        let c = self.connect().await;
        let ch = c.create_channel().await.expect("channel");
        (c, ch)
    }

    /// Stops the broker and re-raises a panic from its task.
    pub async fn shutdown(self) {
        self.token.cancel();
        let _data = self.data;
        if let Err(e) = self.join.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }
}

pub async fn declare(ch: &Channel, name: &str, args: FieldTable) -> lapin::Queue {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), args)
        .await
        .expect("queue.declare")
}

pub async fn declare_durable(ch: &Channel, name: &str) -> lapin::Queue {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("queue.declare")
}

pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    publish_props(ch, exchange, key, body, BasicProperties::default()).await;
}

pub async fn publish_props(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    ch.basic_publish(
        exchange.into(),
        key.into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .expect("basic.publish");
}

pub async fn consume(ch: &Channel, queue: &str, no_ack: bool) -> Consumer {
    ch.basic_consume(
        queue.into(),
        "".into(),
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("basic.consume")
}

/// Next delivery within 5 s.
pub async fn next(c: &mut Consumer) -> lapin::message::Delivery {
    tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .expect("timed out waiting for a delivery")
        .expect("consumer ended")
        .expect("delivery error")
}

/// Asserts nothing is delivered within `ms`.
pub async fn nothing_within(c: &mut Consumer, ms: u64) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(ms), c.next()).await {
        panic!("unexpected delivery: {d:?}");
    }
}

/// basic.get body, None when empty.
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
        .map(|m| m.delivery.data.clone())
}

/// Reply code of a lapin error that is an AMQP error.
pub fn amqp_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

pub fn table(pairs: Vec<(&str, lapin::types::AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(k.into(), v);
    }
    t
}
