//! Exchange types, exchange-to-exchange bindings, alternate exchanges, reserved names.

mod support;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};
use support::*;

async fn bind(ch: &lapin::Channel, q: &str, x: &str, key: &str, args: FieldTable) {
    ch.queue_bind(
        q.into(),
        x.into(),
        key.into(),
        QueueBindOptions::default(),
        args,
    )
    .await
    .expect("queue.bind");
}

async fn exchange(ch: &lapin::Channel, name: &str, kind: ExchangeKind, args: FieldTable) {
    ch.exchange_declare(name.into(), kind, ExchangeDeclareOptions::default(), args)
        .await
        .expect("exchange.declare");
}

#[tokio::test]
async fn direct_fanout_topic_routing() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    exchange(&ch, "d", ExchangeKind::Direct, FieldTable::default()).await;
    exchange(&ch, "f", ExchangeKind::Fanout, FieldTable::default()).await;
    exchange(&ch, "t", ExchangeKind::Topic, FieldTable::default()).await;
    for q in ["qa", "qb", "qt"] {
        declare(&ch, q, FieldTable::default()).await;
    }
    bind(&ch, "qa", "d", "a", FieldTable::default()).await;
    bind(&ch, "qb", "d", "b", FieldTable::default()).await;
    bind(&ch, "qa", "f", "", FieldTable::default()).await;
    bind(&ch, "qb", "f", "", FieldTable::default()).await;
    bind(&ch, "qt", "t", "stock.*.nyse", FieldTable::default()).await;
    bind(&ch, "qt", "t", "news.#", FieldTable::default()).await;

    publish(&ch, "d", "a", b"1").await;
    publish(&ch, "f", "zzz", b"2").await;
    publish(&ch, "t", "stock.ibm.nyse", b"3").await;
    publish(&ch, "t", "stock.ibm.nasdaq", b"x").await;
    publish(&ch, "t", "news", b"4").await;
    publish(&ch, "t", "news.a.b", b"5").await;

    assert_eq!(get_body(&ch, "qa").await, Some(b"1".to_vec()));
    assert_eq!(get_body(&ch, "qa").await, Some(b"2".to_vec()));
    assert_eq!(get_body(&ch, "qa").await, None);
    assert_eq!(get_body(&ch, "qb").await, Some(b"2".to_vec()));
    assert_eq!(get_body(&ch, "qb").await, None);
    assert_eq!(get_body(&ch, "qt").await, Some(b"3".to_vec()));
    assert_eq!(get_body(&ch, "qt").await, Some(b"4".to_vec()));
    assert_eq!(get_body(&ch, "qt").await, Some(b"5".to_vec()));
    assert_eq!(get_body(&ch, "qt").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    exchange(&ch, "h", ExchangeKind::Headers, FieldTable::default()).await;
    declare(&ch, "hall", FieldTable::default()).await;
    declare(&ch, "hany", FieldTable::default()).await;
    bind(
        &ch,
        "hall",
        "h",
        "",
        table(vec![
            ("x-match", AMQPValue::LongString("all".into())),
            ("a", AMQPValue::LongString("1".into())),
            ("b", AMQPValue::LongString("2".into())),
        ]),
    )
    .await;
    bind(
        &ch,
        "hany",
        "h",
        "",
        table(vec![
            ("x-match", AMQPValue::LongString("any".into())),
            ("a", AMQPValue::LongString("1".into())),
            ("b", AMQPValue::LongString("2".into())),
        ]),
    )
    .await;
    let props = |pairs: Vec<(&str, &str)>| {
        BasicProperties::default().with_headers(table(
            pairs
                .into_iter()
                .map(|(k, v)| (k, AMQPValue::LongString(v.into())))
                .collect(),
        ))
    };
    publish_props(&ch, "h", "", b"both", props(vec![("a", "1"), ("b", "2")])).await;
    publish_props(&ch, "h", "", b"one", props(vec![("a", "1")])).await;
    publish_props(&ch, "h", "", b"none", props(vec![("a", "9")])).await;
    assert_eq!(get_body(&ch, "hall").await, Some(b"both".to_vec()));
    assert_eq!(get_body(&ch, "hall").await, None);
    assert_eq!(get_body(&ch, "hany").await, Some(b"both".to_vec()));
    assert_eq!(get_body(&ch, "hany").await, Some(b"one".to_vec()));
    assert_eq!(get_body(&ch, "hany").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn exchange_to_exchange_bindings_route_once() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    exchange(&ch, "src", ExchangeKind::Topic, FieldTable::default()).await;
    exchange(&ch, "dst", ExchangeKind::Fanout, FieldTable::default()).await;
    declare(&ch, "e2e", FieldTable::default()).await;
    bind(&ch, "e2e", "dst", "", FieldTable::default()).await;
    // Also bound directly: the message must still arrive once.
    bind(&ch, "e2e", "src", "a.#", FieldTable::default()).await;
    ch.exchange_bind(
        "dst".into(),
        "src".into(),
        "a.*".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.bind");
    publish(&ch, "src", "a.b", b"m").await;
    publish(&ch, "src", "z.b", b"no").await;
    assert_eq!(get_body(&ch, "e2e").await, Some(b"m".to_vec()));
    assert_eq!(get_body(&ch, "e2e").await, None);
    ch.exchange_unbind(
        "dst".into(),
        "src".into(),
        "a.*".into(),
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange.unbind");
    ch.queue_unbind(
        "e2e".into(),
        "src".into(),
        "a.#".into(),
        FieldTable::default(),
    )
    .await
    .expect("queue.unbind");
    publish(&ch, "src", "a.b", b"m2").await;
    assert_eq!(get_body(&ch, "e2e").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn alternate_exchange_gets_unroutable() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    exchange(&ch, "ae", ExchangeKind::Fanout, FieldTable::default()).await;
    exchange(
        &ch,
        "main",
        ExchangeKind::Direct,
        table(vec![(
            "alternate-exchange",
            AMQPValue::LongString("ae".into()),
        )]),
    )
    .await;
    declare(&ch, "routed", FieldTable::default()).await;
    declare(&ch, "unrouted", FieldTable::default()).await;
    bind(&ch, "routed", "main", "k", FieldTable::default()).await;
    bind(&ch, "unrouted", "ae", "", FieldTable::default()).await;
    publish(&ch, "main", "k", b"r").await;
    publish(&ch, "main", "other", b"u").await;
    assert_eq!(get_body(&ch, "routed").await, Some(b"r".to_vec()));
    assert_eq!(get_body(&ch, "routed").await, None);
    assert_eq!(get_body(&ch, "unrouted").await, Some(b"u".to_vec()));
    assert_eq!(get_body(&ch, "unrouted").await, None);
    b.shutdown().await;
}

#[tokio::test]
async fn reserved_and_invalid_exchange_declares() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    let e = ch
        .exchange_declare(
            "amq.custom".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("reserved");
    assert_eq!(amqp_code(&e), Some(403));

    let ch = c.create_channel().await.expect("ch");
    let e = ch
        .exchange_declare(
            "weird".into(),
            ExchangeKind::Custom("nope".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("unknown type");
    assert_eq!(amqp_code(&e), Some(406));

    let ch = c.create_channel().await.expect("ch");
    let e = ch
        .exchange_declare(
            "missing".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect_err("passive missing");
    assert_eq!(amqp_code(&e), Some(404));

    let ch = c.create_channel().await.expect("ch");
    // Redeclaring a built-in one with the same type is fine.
    ch.exchange_declare(
        "amq.direct".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("amq.direct redeclare");
    exchange(&ch, "x1", ExchangeKind::Direct, FieldTable::default()).await;
    let e = ch
        .exchange_declare(
            "x1".into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("inequivalent");
    assert_eq!(amqp_code(&e), Some(406));

    let ch = c.create_channel().await.expect("ch");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let e = ch
        .basic_publish(
            "nope".into(),
            "k".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await;
    // The error arrives as channel.close; the next call on the channel sees it.
    // The error arrives as channel.close, failing the pending confirm.
    let e = match e {
        Err(e) => e,
        Ok(confirm) => confirm
            .await
            .expect_err("channel closed after publish to a missing exchange"),
    };
    assert_eq!(amqp_code(&e), Some(404));
    b.shutdown().await;
}

#[tokio::test]
async fn internal_exchange_refuses_publish_and_delete_if_unused() {
    let b = start().await;
    let c = b.connect().await;
    let ch = c.create_channel().await.expect("ch");
    ch.exchange_declare(
        "int".into(),
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    declare(&ch, "iq", FieldTable::default()).await;
    bind(&ch, "iq", "int", "", FieldTable::default()).await;
    let e = ch
        .exchange_delete(
            "int".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await
        .expect_err("in use");
    assert_eq!(amqp_code(&e), Some(406));
    let ch = c.create_channel().await.expect("ch");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let e = match ch
        .basic_publish(
            "int".into(),
            "".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
    {
        Err(e) => e,
        Ok(confirm) => confirm.await.expect_err("channel closed"),
    };
    assert_eq!(amqp_code(&e), Some(403));
    b.shutdown().await;
}
