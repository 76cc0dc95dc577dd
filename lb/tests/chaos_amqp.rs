//! `on_amqp` against a real AMQP server (warren-broker in process) and a real client (lapin):
//! the reset comes right after the Nth basic.publish frame is forwarded, and the publish's content
//! frames behind it are discarded, so the broker stores exactly N-1 messages.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use support::*;
use tokio_util::sync::CancellationToken;
use warren_broker::Broker;

async fn lapin_connect(addr: std::net::SocketAddr) -> Connection {
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    tokio::time::timeout(
        WAIT,
        Connection::connect(&uri, ConnectionProperties::default()),
    )
    .await
    .expect("connect in time")
    .expect("connect")
}

#[tokio::test]
async fn on_amqp_resets_right_after_the_nth_publish() {
    let bound = Broker::bind(warren_broker::config::Config::for_tests())
        .await
        .expect("broker bind");
    let broker_addr = bound.amqp_addrs[0];
    let broker_stop = CancellationToken::new();
    let broker = tokio::spawn(bound.run(broker_stop.clone()));

    let mut l = listener("amqp", &[broker_addr]);
    l.faults.push(
        toml::from_str(
            "name='third'\nkind='reset'\non_amqp='basic.publish'\nnth=3\n\
             direction='upstream'\nin_flight='drop'\nstyle='rst'",
        )
        .unwrap(),
    );
    let lb = start(config(vec![l])).await;
    let mut ev = lb.events();

    let conn = lapin_connect(lb.addr("amqp")).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "chaos-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let publish = |body: &'static [u8]| {
        let ch = ch.clone();
        async move {
            let confirm = ch
                .basic_publish(
                    "".into(),
                    "chaos-q".into(),
                    BasicPublishOptions::default(),
                    body,
                    BasicProperties::default(),
                )
                .await?;
            tokio::time::timeout(Duration::from_secs(3), confirm)
                .await
                .map_err(|_| {
                    lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    ))
                })?
        }
    };
    // The first two are confirmed: the broker has them.
    for body in [b"one".as_slice(), b"two".as_slice()] {
        let c = publish(body).await.expect("confirmed");
        assert!(c.is_ack());
    }
    // The third: its method frame reaches the broker, its content does not, the link resets.
    let third = publish(b"three").await;
    assert!(
        !third.as_ref().is_ok_and(|c| c.is_ack()),
        "the third publish must not be confirmed: {third:?}"
    );
    let e = ev.wait("reset", None).await;
    assert_eq!(e["rule"], "third");
    assert_eq!(e["cause"], "on_amqp basic.publish");
    assert_eq!(e["style"], "rst");
    // Whatever of publish #3's content frames the proxy had read is counted, never forwarded.
    assert!(e["discarded_upstream"].is_u64(), "{e}");
    eprintln!("reset event: {e}");

    // Backend side: exactly two messages stored.
    let direct = lapin_connect(broker_addr).await;
    let dch = direct.create_channel().await.unwrap();
    let q = dch
        .queue_declare(
            "chaos-q".into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 2, "reset came right after publish #3");
    let _ = direct.close(200, "bye".into()).await;

    lb.stop().await;
    broker_stop.cancel();
    let _ = tokio::time::timeout(WAIT, broker).await;
}
