//! Consumers and acknowledgements: qos, nack/reject/recover, consumer priorities, direct
//! reply-to, tx, mandatory returns, channel.flow, and connection-level refusals.

mod support;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;
use support::*;

#[tokio::test]
async fn per_consumer_prefetch_limits_unacked() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "pf", FieldTable::default()).await;
    ch.basic_qos(1, BasicQosOptions { global: false })
        .await
        .expect("qos");
    let mut cons = consume(&ch, "pf", false).await;
    publish(&ch, "", "pf", b"1").await;
    publish(&ch, "", "pf", b"2").await;
    let d1 = next(&mut cons).await;
    assert_eq!(d1.data, b"1");
    nothing_within(&mut cons, 150).await;
    d1.acker.ack(BasicAckOptions::default()).await.expect("ack");
    assert_eq!(next(&mut cons).await.data, b"2");
    b.shutdown().await;
}

#[tokio::test]
async fn global_prefetch_is_per_channel() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "g1", FieldTable::default()).await;
    declare(&ch, "g2", FieldTable::default()).await;
    ch.basic_qos(1, BasicQosOptions { global: true })
        .await
        .expect("qos");
    let mut c1 = consume(&ch, "g1", false).await;
    let mut c2 = consume(&ch, "g2", false).await;
    publish(&ch, "", "g1", b"a").await;
    let d = next(&mut c1).await;
    publish(&ch, "", "g2", b"b").await;
    nothing_within(&mut c2, 150).await;
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    assert_eq!(next(&mut c2).await.data, b"b");
    b.shutdown().await;
}

/// The channel holds back what goes beyond its global prefetch: nothing is lost when the
/// consumer whose deliveries wait is cancelled (they go back to its queue), and raising the
/// prefetch lets the held ones through.
#[tokio::test]
async fn held_deliveries_go_back_on_cancel_and_through_on_a_higher_prefetch() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    let (_oc, other) = b.channel().await;
    declare(&ch, "h1", FieldTable::default()).await;
    declare(&ch, "h2", FieldTable::default()).await;
    for q in ["h1", "h2"] {
        for i in 0..3u8 {
            publish(&ch, "", q, &[b'0' + i]).await;
        }
    }
    ch.basic_qos(1, BasicQosOptions { global: true })
        .await
        .expect("qos");
    let mut c1 = consume(&ch, "h1", false).await;
    let first = next(&mut c1).await;
    let mut c2 = ch
        .basic_consume(
            "h2".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    nothing_within(&mut c2, 150).await;
    nothing_within(&mut c1, 50).await;
    // c2's deliveries wait in the channel; cancelling it gives them back to h2.
    ch.basic_cancel("c2".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    let mut back = 0;
    for _ in 0..50 {
        back = other
            .queue_declare(
                "h2".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("passive")
            .message_count();
        if back == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        back, 3,
        "held deliveries of a cancelled consumer are back in their queue"
    );
    // A higher global prefetch lets h1's held deliveries through without an ack.
    ch.basic_qos(10, BasicQosOptions { global: true })
        .await
        .expect("qos");
    assert_eq!(next(&mut c1).await.data, b"1");
    assert_eq!(next(&mut c1).await.data, b"2");
    first
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    b.shutdown().await;
}

#[tokio::test]
async fn nack_requeue_sets_redelivered_and_reject_drops() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "nq", FieldTable::default()).await;
    publish(&ch, "", "nq", b"m").await;
    let mut cons = consume(&ch, "nq", false).await;
    let d = next(&mut cons).await;
    assert!(!d.redelivered);
    d.acker
        .nack(BasicNackOptions {
            multiple: false,
            requeue: true,
        })
        .await
        .expect("nack");
    let d = next(&mut cons).await;
    assert!(d.redelivered);
    assert_eq!(d.data, b"m");
    d.acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    nothing_within(&mut cons, 100).await;
    b.shutdown().await;
}

#[tokio::test]
async fn recover_requeues_unacked() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "rq", FieldTable::default()).await;
    publish(&ch, "", "rq", b"m").await;
    let mut cons = consume(&ch, "rq", false).await;
    let d = next(&mut cons).await;
    assert!(!d.redelivered);
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .expect("recover");
    let d = next(&mut cons).await;
    assert!(d.redelivered);
    b.shutdown().await;
}

#[tokio::test]
async fn multiple_ack_and_unacked_requeued_on_channel_close() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    declare(&ch, "ma", FieldTable::default()).await;
    for i in 0..4u8 {
        publish(&ch, "", "ma", &[i]).await;
    }
    let mut cons = consume(&ch, "ma", false).await;
    let mut last = None;
    for _ in 0..3 {
        last = Some(next(&mut cons).await);
    }
    let d4 = next(&mut cons).await;
    assert_eq!(d4.data, vec![3]);
    last.expect("third")
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .expect("ack multiple");
    ch.close(200, "bye".into()).await.expect("close");
    let ch = c.create_channel().await.expect("ch");
    let m = ch
        .basic_get("ma".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the unacked fourth message is back");
    assert_eq!(m.delivery.data, vec![3]);
    assert!(m.delivery.redelivered);
    assert_eq!(get_body(&ch, "ma").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn consumer_priorities_prefer_higher() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "cp", FieldTable::default()).await;
    let mut low = consume(&ch, "cp", true).await;
    let mut high = ch
        .basic_consume(
            "cp".into(),
            "high".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            table(vec![("x-priority", AMQPValue::LongInt(10))]),
        )
        .await
        .expect("consume");
    for i in 0..5u8 {
        publish(&ch, "", "cp", &[i]).await;
    }
    for i in 0..5u8 {
        assert_eq!(next(&mut high).await.data, vec![i]);
    }
    nothing_within(&mut low, 100).await;
    b.shutdown().await;
}

#[tokio::test]
async fn direct_reply_to_round_trip() {
    let b = start().await;
    let (_c1, client) = b.channel().await;
    let (_c2, server) = b.channel().await;
    declare(&server, "rpc", FieldTable::default()).await;
    let mut replies = client
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("reply consumer");
    publish_props(
        &client,
        "",
        "rpc",
        b"ping",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await;
    let mut requests = consume(&server, "rpc", true).await;
    let req = next(&mut requests).await;
    let reply_to = req
        .properties
        .reply_to()
        .clone()
        .expect("reply_to")
        .to_string();
    assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
    publish(&server, "", &reply_to, b"pong").await;
    assert_eq!(next(&mut replies).await.data, b"pong");
    b.shutdown().await;
}

#[tokio::test]
async fn tx_commit_and_rollback() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    let (_c2, reader) = b.channel().await;
    declare(&ch, "txq", FieldTable::default()).await;
    ch.tx_select().await.expect("tx.select");
    publish(&ch, "", "txq", b"rolled back").await;
    ch.tx_rollback().await.expect("rollback");
    assert_eq!(get_body(&reader, "txq").await, None);
    publish(&ch, "", "txq", b"committed").await;
    assert_eq!(get_body(&reader, "txq").await, None);
    ch.tx_commit().await.expect("commit");
    assert_eq!(get_body(&reader, "txq").await, Some(b"committed".to_vec()));
    b.shutdown().await;
}

#[tokio::test]
async fn mandatory_unroutable_is_returned_312_then_acked() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let confirm = ch
        .basic_publish(
            "".into(),
            "no-such-queue".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(confirm.is_ack());
    let ret = confirm.take_message().expect("returned message");
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.delivery.data, b"lost");
    b.shutdown().await;
}

#[tokio::test]
async fn channel_flow_pauses_deliveries() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "fl", FieldTable::default()).await;
    let mut cons = consume(&ch, "fl", true).await;
    assert!(!ch
        .channel_flow(ChannelFlowOptions { active: false })
        .await
        .expect("flow off"));
    publish(&ch, "", "fl", b"held").await;
    nothing_within(&mut cons, 150).await;
    assert!(ch
        .channel_flow(ChannelFlowOptions { active: true })
        .await
        .expect("flow on"));
    assert_eq!(next(&mut cons).await.data, b"held");
    b.shutdown().await;
}

#[tokio::test]
async fn wrong_password_is_403_access_refused() {
    let b = start().await;
    let uri = format!("amqp://guest:wrong@{}/%2f", b.addr);
    let e = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .expect_err("login must fail");
    assert_eq!(amqp_code(&e), Some(403), "{e:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn unknown_vhost_is_530() {
    let b = start().await;
    let uri = format!("amqp://guest:guest@{}/nope", b.addr);
    let e = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .expect_err("vhost must fail");
    assert_eq!(amqp_code(&e), Some(530), "{e:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn immediate_publish_closes_connection_540() {
    let b = start().await;
    let (c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    let r = ch
        .basic_publish(
            "".into(),
            "x".into(),
            BasicPublishOptions {
                immediate: true,
                ..Default::default()
            },
            b"now",
            BasicProperties::default(),
        )
        .await;
    let e = match r {
        Err(e) => e,
        Ok(confirm) => confirm.await.expect_err("connection closed"),
    };
    assert_eq!(amqp_code(&e), Some(540), "{e:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!c.status().connected());
    b.shutdown().await;
}

#[tokio::test]
async fn amq_default_alias_and_update_secret() {
    let b = start().await;
    let (c, ch) = b.channel().await;
    declare(&ch, "alias", FieldTable::default()).await;
    publish(&ch, "amq.default", "alias", b"via alias").await;
    assert_eq!(get_body(&ch, "alias").await, Some(b"via alias".to_vec()));
    c.update_secret("new-secret".into(), "rotation".into())
        .await
        .expect("update-secret-ok");
    b.shutdown().await;
}
