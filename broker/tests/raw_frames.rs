//! Error paths driven with raw frames, where a client library would not let us misbehave.

mod support;

use support::raw::Raw;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, queue, AMQPClass};
use amq_protocol::types::FieldTable;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::codec;

#[tokio::test]
async fn garbage_protocol_header_gets_our_header_and_close() {
    let b = support::start().await;
    let mut s = TcpStream::connect(b.addr).await.expect("connect");
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.expect("write");
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("closed in time")
        .expect("read");
    assert_eq!(got, codec::PROTOCOL_HEADER);
    b.shutdown().await;
}

#[tokio::test]
async fn method_before_start_ok_closes() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.sock
        .write_all(codec::PROTOCOL_HEADER)
        .await
        .expect("header");
    let _start = r.recv().await;
    r.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let (code, _) = r.expect_connection_close().await;
    assert_eq!(code, 503);
    b.shutdown().await;
}

#[tokio::test]
async fn method_on_unopened_channel_is_504() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.send_method(
        5,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    )
    .await;
    let (code, text) = r.expect_connection_close().await;
    assert_eq!(code, 504, "{text}");
    assert!(text.contains("expected 'channel.open'"), "{text}");
    b.shutdown().await;
}

#[tokio::test]
async fn oversized_frame_is_501() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    // A frame header announcing 100 MB: refused from the header alone.
    r.sock
        .write_all(&[3, 0, 1, 0x05, 0xf5, 0xe1, 0x00])
        .await
        .expect("write");
    let (code, _) = r.expect_connection_close().await;
    assert_eq!(code, 501);
    b.shutdown().await;
}

#[tokio::test]
async fn content_header_without_publish_is_505() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    r.send(AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 1,
            properties: Default::default(),
        },
    ))
    .await;
    let (code, _) = r.expect_connection_close().await;
    assert_eq!(code, 505);
    b.shutdown().await;
}

/// A content header or body frame on channel 0 of an open connection is connection.close 505, as
/// RabbitMQ answers (`unexpected_frame`); the channel's own content state plays no part.
#[tokio::test]
async fn content_frames_on_channel_0_are_505() {
    let b = support::start().await;
    let header = AMQPFrame::Header(
        0,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 1,
            properties: Default::default(),
        },
    );
    for frame in [header, AMQPFrame::Body(0, vec![7])] {
        let mut r = Raw::connect(b.addr).await;
        r.handshake(0).await;
        r.open_channel(1).await;
        r.send(frame.clone()).await;
        let (code, text) = r.expect_connection_close().await;
        assert_eq!(code, 505, "{frame:?}: {text}");
        assert!(text.contains("channel 0"), "{frame:?}: {text}");
    }
    b.shutdown().await;
}

/// RabbitMQ 3.10 limits how many channels are open, not their numbers: any of 1..=65535 opens
/// while fewer than channel_max are open (closing ones count); one more is connection.close 530
/// with RabbitMQ's text and no class/method.
#[tokio::test]
async fn channel_max_limits_open_channels_not_numbers() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await; // tune-ok channel_max 10
    for ch in [65535, 11, 2047, 2048, 40000] {
        r.open_channel(ch).await;
    }
    r.send_method(
        2048,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: "".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(2048, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected channel.close-ok, got {other:?}"),
    }
    // A channel we are closing (soft error, no close-ok from us yet) still counts.
    r.send_method(
        40000,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "no-such-queue".into(),
            passive: true,
            ..Default::default()
        })),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(40000, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 404)
        }
        other => panic!("expected channel.close 404, got {other:?}"),
    }
    for ch in [1, 2, 3, 4, 5, 6] {
        r.open_channel(ch).await;
    }
    r.send_method(
        7,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 530);
            assert_eq!(
                c.reply_text.as_str(),
                "NOT_ALLOWED - number of channels opened (10) has reached the negotiated \
                 channel_max (10)"
            );
            assert_eq!((c.class_id, c.method_id), (0, 0));
        }
        other => panic!("expected connection.close 530, got {other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn second_open_on_an_open_channel_is_504() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    r.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    let (code, _) = r.expect_connection_close().await;
    assert_eq!(code, 504);
    b.shutdown().await;
}

/// Channel 0 carries connection methods only; RabbitMQ's reply to anything else.
#[tokio::test]
async fn channel_open_on_channel_0_is_504() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.send_method(
        0,
        AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 504);
            assert_eq!(
                c.reply_text.as_str(),
                "CHANNEL_ERROR - unexpected method in connection state running"
            );
            assert_eq!((c.class_id, c.method_id), (20, 10));
        }
        other => panic!("expected connection.close 504, got {other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn prefetch_size_is_540() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    // basic.qos with prefetch_size = 1: class 60, method 10, size u32, count u16, flags u8.
    let payload = [0u8, 60, 0, 10, 0, 0, 0, 1, 0, 0, 0];
    let mut frame = vec![1u8, 0, 1];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.push(0xce);
    r.sock.write_all(&frame).await.expect("write");
    let (code, text) = r.expect_connection_close().await;
    assert_eq!(code, 540, "{text}");
    b.shutdown().await;
}

#[tokio::test]
async fn double_ack_is_406_unknown_delivery_tag() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    r.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "raw".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let _declare_ok = r.recv_method().await;
    r.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 7,
            multiple: false,
        })),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 406);
            assert_eq!(
                c.reply_text.as_str(),
                "PRECONDITION_FAILED - unknown delivery tag 7"
            );
            assert_eq!((c.class_id, c.method_id), (60, 80));
        }
        other => panic!("expected channel.close, got {other:?}"),
    }
    // Frames on the closing channel are discarded; close-ok frees it; it can be reopened.
    r.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
    .await;
    r.open_channel(1).await;
    b.shutdown().await;
}

#[tokio::test]
async fn heartbeats_sent_and_silent_client_dropped() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(1).await;
    let start = tokio::time::Instant::now();
    // The server heartbeats at half the interval...
    match r.recv().await {
        Some(AMQPFrame::Heartbeat) => {}
        other => panic!("expected heartbeat, got {other:?}"),
    }
    // ...and drops us after two silent intervals.
    loop {
        match r.recv().await {
            Some(AMQPFrame::Heartbeat) => continue,
            None => break,
            Some(other) => panic!("unexpected {other:?}"),
        }
    }
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(1500), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    b.shutdown().await;
}

#[tokio::test]
async fn shutdown_sends_320_connection_forced() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    let stopper = tokio::spawn(b.shutdown());
    let (code, text) = r.expect_connection_close().await;
    assert_eq!(code, 320);
    assert!(text.starts_with("CONNECTION_FORCED"), "{text}");
    r.send_method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    )
    .await;
    stopper.await.expect("broker stopped");
}

#[tokio::test]
async fn exclusive_consumer_refuses_a_second_consumer_403() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    r.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "xc".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let _declare_ok = r.recv_method().await;
    let consume = |tag: &str, exclusive: bool| {
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "xc".into(),
            consumer_tag: tag.into(),
            no_local: false,
            no_ack: true,
            exclusive,
            nowait: false,
            arguments: FieldTable::default(),
        }))
    };
    r.send_method(1, consume("first", true)).await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(ok)))) => {
            assert_eq!(ok.consumer_tag.as_str(), "first")
        }
        other => panic!("expected consume-ok, got {other:?}"),
    }
    r.send_method(1, consume("second", false)).await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::Close(c)))) => {
            assert_eq!(c.reply_code, 403, "{}", c.reply_text);
            assert!(c.reply_text.as_str().contains("in exclusive use"));
        }
        other => panic!("expected channel.close 403, got {other:?}"),
    }
    b.shutdown().await;
}

#[tokio::test]
async fn ack_then_close_in_one_write_still_acks() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    r.send_method(
        1,
        AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
            queue: "ackclose".into(),
            passive: false,
            durable: false,
            exclusive: false,
            auto_delete: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let _declare_ok = r.recv_method().await;
    let mut out = Vec::new();
    for f in [
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: "ackclose".into(),
                mandatory: false,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            1,
            amq_protocol::frame::AMQPContentHeader {
                class_id: 60,
                body_size: 1,
                properties: Default::default(),
            },
        ),
        AMQPFrame::Body(1, b"x".to_vec()),
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
                queue: "ackclose".into(),
                no_ack: false,
            })),
        ),
    ] {
        codec::encode(&f, &mut out).expect("encode");
    }
    r.sock.write_all(&out).await.expect("write");
    let tag = match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetOk(ok)))) => {
            ok.delivery_tag
        }
        other => panic!("expected get-ok, got {other:?}"),
    };
    let _header = r.recv_method().await;
    let _body = r.recv_method().await;
    // Ack and channel.close in a single write: both must take effect, in order.
    let mut out = Vec::new();
    for m in [
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: tag,
            multiple: false,
        })),
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    ] {
        codec::encode(&AMQPFrame::Method(1, m), &mut out).expect("encode");
    }
    r.sock.write_all(&out).await.expect("write");
    match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected close-ok, got {other:?}"),
    }
    r.open_channel(1).await;
    r.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "ackclose".into(),
            no_ack: true,
        })),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::GetEmpty(_)))) => {}
        other => panic!("the acked message came back: {other:?}"),
    }
    b.shutdown().await;
}

/// The last consumer (no-ack) of an auto-delete queue leaves by closing its connection while a
/// raw producer floods the queue: the queue must go, whatever backlog it holds. The queue used to
/// drop the consumer on a failed delivery to the closed connection, before the cancel queued
/// behind the publishes arrived, so the cancel found nothing and the queue stayed forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auto_delete_queue_with_backlog_goes_when_consumer_connection_closes() {
    use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
    let b = support::start().await;
    for round in 0..3 {
        let name = format!("ad-backlog-{round}");
        let (_ac, admin) = b.channel().await;
        let opts = QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        admin
            .queue_declare(name.as_str().into(), opts, FieldTable::default())
            .await
            .expect("declare");
        let cc = b.connect().await;
        let cch = cc.create_channel().await.expect("ch");
        let _cons = cch
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        // A producer much faster than the consumer: publishes written in bulk.
        let mut r = Raw::connect(b.addr).await;
        r.handshake(0).await;
        r.open_channel(1).await;
        let mut out = Vec::new();
        for _ in 0..200_000 {
            for f in [
                AMQPFrame::Method(
                    1,
                    AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                        exchange: "".into(),
                        routing_key: name.as_str().into(),
                        mandatory: false,
                        immediate: false,
                    })),
                ),
                AMQPFrame::Header(
                    1,
                    amq_protocol::frame::AMQPContentHeader {
                        class_id: 60,
                        body_size: 16,
                        properties: Default::default(),
                    },
                ),
                AMQPFrame::Body(1, b"0123456789abcdef".to_vec()),
            ] {
                codec::encode(&f, &mut out).expect("encode");
            }
        }
        let producer = tokio::spawn(async move {
            let _ = r.sock.write_all(&out).await;
            r
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        cc.close(200, "bye".into()).await.expect("close consumer");
        tokio::time::sleep(Duration::from_millis(300)).await;
        producer.abort();
        let _ = producer.await;
        // The cancel may wait behind the publishes still in the queue's mailbox.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let e = loop {
            let r = admin
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match r {
                Err(e) => break e,
                Ok(q) => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "round {round}: queue still there with {} messages, {} consumers",
                        q.message_count(),
                        q.consumer_count()
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        assert_eq!(support::amqp_code(&e), Some(404), "round {round}");
    }
    b.shutdown().await;
}
