//! Core interop with lapin: declare, publish, consume, ack, get, confirms.

mod support;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use support::*;

#[tokio::test]
async fn publish_consume_ack_roundtrip() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "q1", FieldTable::default()).await;
    for i in 0..3u8 {
        publish(&ch, "", "q1", &[i]).await;
    }
    let mut cons = consume(&ch, "q1", false).await;
    for i in 0..3u8 {
        let d = next(&mut cons).await;
        assert_eq!(d.data, vec![i]);
        assert!(!d.redelivered);
        d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    }
    b.shutdown().await;
}

#[tokio::test]
async fn large_body_is_split_and_reassembled() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "big", FieldTable::default()).await;
    let body: Vec<u8> = (0..1_000_000u32).map(|i| i as u8).collect();
    publish(&ch, "", "big", &body).await;
    let mut cons = consume(&ch, "big", true).await;
    let d = next(&mut cons).await;
    assert_eq!(d.data, body);
    b.shutdown().await;
}

#[tokio::test]
async fn confirms_ack_routed_and_unroutable() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    declare(&ch, "cq", FieldTable::default()).await;
    let mut confirms = Vec::new();
    for _ in 0..100 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "cq".into(),
                BasicPublishOptions::default(),
                b"x",
                BasicProperties::default(),
            )
            .await
            .expect("publish"),
        );
    }
    for c in confirms {
        assert!(c.await.expect("confirm").is_ack());
    }
    let c = ch
        .basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    assert!(c.await.expect("confirm").is_ack());
    let q = ch
        .queue_declare(
            "cq".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive");
    assert_eq!(q.message_count(), 100);
    b.shutdown().await;
}

#[tokio::test]
async fn get_and_get_empty() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "gq", FieldTable::default()).await;
    assert_eq!(get_body(&ch, "gq").await, None);
    publish(&ch, "", "gq", b"a").await;
    publish(&ch, "", "gq", b"b").await;
    let m = ch
        .basic_get("gq".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
        .expect("message");
    assert_eq!(m.delivery.data, b"a");
    assert_eq!(m.message_count, 1);
    m.delivery
        .acker
        .ack(BasicAckOptions::default())
        .await
        .expect("ack");
    assert_eq!(get_body(&ch, "gq").await, Some(b"b".to_vec()));
    assert_eq!(get_body(&ch, "gq").await, None);
    b.shutdown().await;
}
