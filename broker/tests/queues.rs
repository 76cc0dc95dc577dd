//! Queue arguments and lifecycles: TTL, expiry, max-length + overflow modes, dead-lettering,
//! priorities, single active consumer, exclusive and auto-delete queues.

mod support;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use std::time::Duration;
use support::*;

fn long(v: i64) -> AMQPValue {
    AMQPValue::LongLongInt(v)
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

#[tokio::test]
async fn message_ttl_and_per_message_expiration() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "ttlq", table(vec![("x-message-ttl", long(100))])).await;
    declare(&ch, "plain", FieldTable::default()).await;
    publish(&ch, "", "ttlq", b"old").await;
    publish_props(
        &ch,
        "",
        "plain",
        b"exp",
        BasicProperties::default().with_expiration("100".into()),
    )
    .await;
    publish(&ch, "", "plain", b"keep").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(get_body(&ch, "ttlq").await, None);
    assert_eq!(get_body(&ch, "plain").await, Some(b"keep".to_vec()));
    b.shutdown().await;
}

#[tokio::test]
async fn queue_expires_when_unused() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    declare(&ch, "idle", table(vec![("x-expires", long(150))])).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let e = ch
        .queue_declare(
            "idle".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("queue should have expired");
    assert_eq!(amqp_code(&e), Some(404));
    b.shutdown().await;
}

#[tokio::test]
async fn max_length_drop_head_keeps_newest() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "ml", table(vec![("x-max-length", long(2))])).await;
    for m in [b"1", b"2", b"3"] {
        publish(&ch, "", "ml", m).await;
    }
    assert_eq!(get_body(&ch, "ml").await, Some(b"2".to_vec()));
    assert_eq!(get_body(&ch, "ml").await, Some(b"3".to_vec()));
    assert_eq!(get_body(&ch, "ml").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn max_length_bytes_drop_head() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "mlb", table(vec![("x-max-length-bytes", long(10))])).await;
    publish(&ch, "", "mlb", b"aaaaaa").await;
    publish(&ch, "", "mlb", b"bbbbbb").await;
    assert_eq!(get_body(&ch, "mlb").await, Some(b"bbbbbb".to_vec()));
    assert_eq!(get_body(&ch, "mlb").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn reject_publish_overflow_nacks() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    declare(
        &ch,
        "rp",
        table(vec![
            ("x-max-length", long(1)),
            ("x-overflow", s("reject-publish")),
        ]),
    )
    .await;
    let c1 = ch
        .basic_publish(
            "".into(),
            "rp".into(),
            BasicPublishOptions::default(),
            b"1",
            BasicProperties::default(),
        )
        .await
        .expect("p1");
    let c2 = ch
        .basic_publish(
            "".into(),
            "rp".into(),
            BasicPublishOptions::default(),
            b"2",
            BasicProperties::default(),
        )
        .await
        .expect("p2");
    assert!(c1.await.expect("c1").is_ack());
    assert!(c2.await.expect("c2").is_nack());
    assert_eq!(get_body(&ch, "rp").await, Some(b"1".to_vec()));
    assert_eq!(get_body(&ch, "rp").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn reject_publish_dlx_dead_letters_refused() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "dlq", FieldTable::default()).await;
    declare(
        &ch,
        "rpd",
        table(vec![
            ("x-max-length", long(1)),
            ("x-overflow", s("reject-publish-dlx")),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("dlq")),
        ]),
    )
    .await;
    publish(&ch, "", "rpd", b"1").await;
    publish(&ch, "", "rpd", b"2").await;
    assert_eq!(get_body(&ch, "rpd").await, Some(b"1".to_vec()));
    let mut dead = consume(&ch, "dlq", true).await;
    assert_eq!(next(&mut dead).await.data, b"2");
    b.shutdown().await;
}

#[tokio::test]
async fn dead_letter_on_reject_adds_x_death() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "dead", FieldTable::default()).await;
    declare(
        &ch,
        "work",
        table(vec![
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("dead")),
        ]),
    )
    .await;
    publish(&ch, "", "work", b"job").await;
    let m = ch
        .basic_get("work".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
        .expect("msg");
    m.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    let mut cons = consume(&ch, "dead", true).await;
    let d = next(&mut cons).await;
    assert_eq!(d.data, b"job");
    assert_eq!(d.routing_key.as_str(), "dead");
    let headers = d.properties.headers().clone().expect("headers");
    let deaths = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        other => panic!("no x-death: {other:?}"),
    };
    assert_eq!(deaths.len(), 1);
    let AMQPValue::FieldTable(t) = &deaths[0] else {
        panic!("x-death entry is not a table")
    };
    let get = |k: &str| t.inner().get(k).cloned();
    assert_eq!(get("reason"), Some(s("rejected")));
    assert_eq!(get("queue"), Some(s("work")));
    assert_eq!(get("exchange"), Some(s("")));
    assert_eq!(get("count"), Some(AMQPValue::LongLongInt(1)));
    match get("routing-keys") {
        Some(AMQPValue::FieldArray(a)) => assert_eq!(a.as_slice(), &[s("work")]),
        other => panic!("routing-keys: {other:?}"),
    }
    assert_eq!(
        headers.inner().get("x-first-death-reason").cloned(),
        Some(s("rejected"))
    );
    b.shutdown().await;
}

#[tokio::test]
async fn expired_messages_are_dead_lettered() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "later", FieldTable::default()).await;
    declare(
        &ch,
        "delay",
        table(vec![
            ("x-message-ttl", long(50)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("later")),
        ]),
    )
    .await;
    publish(&ch, "", "delay", b"tick").await;
    let mut cons = consume(&ch, "later", true).await;
    let d = next(&mut cons).await;
    assert_eq!(d.data, b"tick");
    b.shutdown().await;
}

#[tokio::test]
async fn priority_queue_delivers_highest_first() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "prio", table(vec![("x-max-priority", long(10))])).await;
    for p in [1u8, 5, 3, 9] {
        publish_props(
            &ch,
            "",
            "prio",
            &[p],
            BasicProperties::default().with_priority(p),
        )
        .await;
    }
    for want in [9u8, 5, 3, 1] {
        assert_eq!(get_body(&ch, "prio").await, Some(vec![want]));
    }
    b.shutdown().await;
}

#[tokio::test]
async fn single_active_consumer_fails_over_on_cancel() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(
        &ch,
        "sac",
        table(vec![("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await;
    let mut first = consume(&ch, "sac", true).await;
    let mut second = consume(&ch, "sac", true).await;
    for i in 0..3u8 {
        publish(&ch, "", "sac", &[i]).await;
    }
    for i in 0..3u8 {
        assert_eq!(next(&mut first).await.data, vec![i]);
    }
    nothing_within(&mut second, 100).await;
    ch.basic_cancel(first.tag(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    publish(&ch, "", "sac", b"after").await;
    assert_eq!(next(&mut second).await.data, b"after");
    b.shutdown().await;
}

#[tokio::test]
async fn exclusive_queue_is_locked_and_vanishes_with_owner() {
    let b = start().await;
    let owner = b.connect().await;
    let och = owner.create_channel().await.expect("ch");
    och.queue_declare(
        "excl".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let other = b.connect().await;
    let ch = other.create_channel().await.expect("ch");
    let e = ch
        .basic_consume(
            "excl".into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("locked");
    assert_eq!(amqp_code(&e), Some(405));
    owner.close(200, "bye".into()).await.expect("close");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let ch = other.create_channel().await.expect("ch");
    let e = ch
        .queue_declare(
            "excl".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("gone");
    assert_eq!(amqp_code(&e), Some(404));
    b.shutdown().await;
}

#[tokio::test]
async fn auto_delete_queue_goes_with_last_consumer() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    ch.queue_declare(
        "ad".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let cons = consume(&ch, "ad", true).await;
    ch.basic_cancel(cons.tag(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let e = ch
        .queue_declare(
            "ad".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("auto-deleted");
    assert_eq!(amqp_code(&e), Some(404));
    b.shutdown().await;
}

#[tokio::test]
async fn server_named_purge_delete_and_cancel_notify() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let name = q.name().to_string();
    assert!(name.starts_with("amq.gen-"), "{name}");
    publish(&ch, "", &name, b"1").await;
    publish(&ch, "", &name, b"2").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        ch.queue_purge(name.as_str().into(), QueuePurgeOptions::default())
            .await
            .expect("purge"),
        2
    );
    publish(&ch, "", &name, b"3").await;
    let e = {
        let ch2 = c.create_channel().await.expect("ch");
        tokio::time::sleep(Duration::from_millis(20)).await;
        ch2.queue_delete(
            name.as_str().into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("not empty")
    };
    assert_eq!(amqp_code(&e), Some(406));
    let mut cons = consume(&ch, &name, false).await;
    assert_eq!(next(&mut cons).await.data, b"3");
    let ch3 = c.create_channel().await.expect("ch");
    ch3.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    // Server-sent basic.cancel ends the consumer stream.
    let end = tokio::time::timeout(
        Duration::from_secs(5),
        futures_lite::StreamExt::next(&mut cons),
    )
    .await
    .expect("consumer should be cancelled");
    assert!(end.is_none(), "expected end of stream, got {end:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn inequivalent_and_invalid_args_are_406() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    declare(&ch, "eq", table(vec![("x-max-length", long(5))])).await;
    let e = ch
        .queue_declare(
            "eq".into(),
            QueueDeclareOptions::default(),
            table(vec![("x-max-length", long(6))]),
        )
        .await
        .expect_err("inequivalent");
    assert_eq!(amqp_code(&e), Some(406));
    let ch = c.create_channel().await.expect("ch");
    let e = ch
        .queue_declare(
            "bad".into(),
            QueueDeclareOptions::default(),
            table(vec![("x-max-priority", long(300))]),
        )
        .await
        .expect_err("invalid");
    assert_eq!(amqp_code(&e), Some(406));
    let ch = c.create_channel().await.expect("ch");
    let e = ch
        .queue_declare(
            "amq.mine".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("reserved");
    assert_eq!(amqp_code(&e), Some(403));
    let ch = c.create_channel().await.expect("ch");
    // quorum is accepted durable (RabbitMQ refuses a non-durable one)
    ch.queue_declare(
        "qq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(vec![("x-queue-type", s("quorum"))]),
    )
    .await
    .expect("quorum declare");
    b.shutdown().await;
}

#[tokio::test]
async fn fanout_confirm_is_nack_if_any_queue_refuses() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    ch.exchange_declare(
        "fan".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    declare(&ch, "open", FieldTable::default()).await;
    declare(
        &ch,
        "full",
        table(vec![
            ("x-max-length", long(0)),
            ("x-overflow", s("reject-publish")),
        ]),
    )
    .await;
    for q in ["open", "full"] {
        ch.queue_bind(
            q.into(),
            "fan".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    }
    let c = ch
        .basic_publish(
            "fan".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    assert!(c.await.expect("confirm").is_nack());
    // The queue that accepted it still has it: one body shared by both routes.
    assert_eq!(get_body(&ch, "open").await, Some(b"m".to_vec()));
    b.shutdown().await;
}
