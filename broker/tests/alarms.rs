//! Resource alarms: a memory watermark or disk free limit blocks publishing connections
//! (connection.blocked to those that asked for it, their socket no longer read) until the
//! alarm clears.
//!
//! Alarm state is the broker's own (its node context, `b.shared.node`); `tests/nodes.rs` runs
//! two brokers with different limits side by side.

mod support;

use support::raw::Raw;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use amq_protocol::types::{AMQPValue, FieldTable};
use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, ConfirmSelectOptions, QueueDeclareOptions};
use std::time::Duration;
use warren_broker::config::{Config, DiskFreeLimit, MemoryWatermark};

const WATERMARK: u64 = 100 * 1024;
const BODY: usize = 10 * 1024;

/// A broker whose memory alarm goes off at 100 KiB of messages. Paging is pushed beyond the
/// watermark so that only the alarm acts on memory here.
fn low_watermark() -> Config {
    Config {
        vm_memory_high_watermark: MemoryWatermark::Absolute(WATERMARK),
        vm_memory_high_watermark_paging_ratio: 10.0,
        ..Config::for_tests()
    }
}

async fn wait_until(what: &str, f: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn next_event(
    events: &mut (impl futures_lite::Stream<Item = lapin::Event> + Unpin),
) -> lapin::Event {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("timed out waiting for a connection event")
            .expect("event stream ended");
        match ev {
            lapin::Event::Connected => continue,
            ev => return ev,
        }
    }
}

async fn message_count(ch: &lapin::Channel, q: &str) -> u32 {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

#[tokio::test]
async fn memory_alarm_blocks_a_publisher_until_a_consumer_drains() {
    let b = support::start_with(low_watermark()).await;
    assert_eq!(b.shared.node.alarms.state().mem_limit, WATERMARK);
    let publisher = b.connect().await;
    let mut events = Box::pin(publisher.events_listener());
    let pch = publisher.create_channel().await.expect("channel");
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    support::declare(&pch, "q", Default::default()).await;

    // Ten 10 KiB messages reach the watermark.
    for _ in 0..10 {
        let confirm = pch
            .basic_publish(
                "".into(),
                "q".into(),
                Default::default(),
                &[7u8; BODY],
                Default::default(),
            )
            .await
            .expect("publish");
        assert!(confirm.await.expect("confirm").is_ack());
    }
    wait_until("the memory alarm", || b.shared.node.alarms.alarms().memory).await;
    let st = b.shared.node.alarms.state();
    assert!(st.memory && !st.disk, "{st:?}");
    assert!(st.mem_used >= WATERMARK, "{st:?}");

    // The next publish blocks the connection; it is not routed while blocked.
    let held = pch
        .basic_publish(
            "".into(),
            "q".into(),
            Default::default(),
            b"held back",
            Default::default(),
        )
        .await
        .expect("publish");
    match next_event(&mut events).await {
        lapin::Event::ConnectionBlocked(reason) => assert_eq!(reason, "low on memory"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    assert!(publisher.status().blocked());

    // A connection that does not publish keeps working, and drains the queue.
    let (_cc, cch) = b.channel().await;
    assert_eq!(
        message_count(&cch, "q").await,
        10,
        "held publish was routed"
    );
    let mut consumer = support::consume(&cch, "q", false).await;
    for _ in 0..10 {
        let d = support::next(&mut consumer).await;
        assert_eq!(d.data.len(), BODY);
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    match next_event(&mut events).await {
        lapin::Event::ConnectionUnblocked => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    assert!(!b.shared.node.alarms.alarms().any());
    // The held publish goes through once the socket is read again.
    assert!(held.await.expect("confirm").is_ack());
    let d = support::next(&mut consumer).await;
    assert_eq!(&d.data[..], b"held back");
    b.shutdown().await;
}

#[tokio::test]
async fn disk_alarm_blocks_from_the_start_and_clears_with_a_lower_limit() {
    let cfg = Config {
        disk_free_limit: DiskFreeLimit::Absolute(1_000_000_000_000_000), // 1000 TB
        ..Config::for_tests()
    };
    let b = support::start_with(cfg).await;
    let st = b.shared.node.alarms.state();
    assert!(
        st.disk && !st.memory,
        "disk alarm set before any client: {st:?}"
    );
    assert_eq!(st.disk_free_limit, 1_000_000_000_000_000);
    assert!(
        st.disk_free.is_some_and(|f| f < st.disk_free_limit),
        "{st:?}"
    );

    let (_oc, och) = b.channel().await;
    support::declare(&och, "d", Default::default()).await;

    // A lapin publisher asked for notifications...
    let publisher = b.connect().await;
    let mut events = Box::pin(publisher.events_listener());
    let pch = publisher.create_channel().await.expect("channel");
    support::publish(&pch, "", "d", b"from lapin").await;
    match next_event(&mut events).await {
        lapin::Event::ConnectionBlocked(reason) => assert_eq!(reason, "low on disk"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    // ...a raw one did not: it is blocked all the same, without being told.
    let mut raw = raw_client(b.addr, false, 0).await;
    raw.open_channel(1).await;
    raw.publish(1, "d", b"from raw").await;

    // Neither publish is routed while the alarm holds (the other connection still works).
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(message_count(&och, "d").await, 0);

    b.shared.node.alarms.set_disk_free_limit(0);
    match next_event(&mut events).await {
        lapin::Event::ConnectionUnblocked => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    assert!(!b.shared.node.alarms.alarms().any());
    // The raw client gets no blocked/unblocked: its next frame answers its own close.
    raw.send_method(
        1,
        AMQPClass::Channel(channel::AMQPMethod::Close(channel::Close {
            reply_code: 200,
            reply_text: "".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
    .await;
    match raw.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Channel(channel::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected channel.close-ok, got {other:?}"),
    }
    let mut bodies: Vec<Vec<u8>> = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while bodies.len() < 2 && tokio::time::Instant::now() < deadline {
        match support::get_body(&och, "d").await {
            Some(body) => bodies.push(body),
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    bodies.sort();
    assert_eq!(bodies, vec![b"from lapin".to_vec(), b"from raw".to_vec()]);
    b.shutdown().await;
}

#[tokio::test]
async fn blocked_publisher_is_not_read_but_kept_alive_with_heartbeats() {
    let b = support::start_with(low_watermark()).await;
    let (_cc, cch) = b.channel().await;
    support::declare(&cch, "q", Default::default()).await;

    // Heartbeat 1 s, and this client never sends one: unblocked, it would be dropped after 2 s.
    let mut raw = raw_client(b.addr, true, 1).await;
    raw.open_channel(1).await;
    for _ in 0..10 {
        raw.publish(1, "q", &[1u8; BODY]).await;
    }
    wait_until("the memory alarm", || b.shared.node.alarms.alarms().memory).await;
    assert_eq!(message_count(&cch, "q").await, 10);

    // Five more publishes: the first one's header blocks the connection.
    for i in 0..5u8 {
        raw.publish(1, "q", &[100 + i; BODY]).await;
    }
    match raw.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(bl)))) => {
            assert_eq!(bl.reason.as_str(), "low on memory")
        }
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    // Three silent seconds: the broker keeps heartbeating and does not hang up, and routes
    // none of the five.
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut heartbeats = 0;
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout_at(until, raw.recv()).await {
            Err(_) => break,
            Ok(Some(AMQPFrame::Heartbeat)) => heartbeats += 1,
            Ok(other) => panic!("blocked connection got {other:?}"),
        }
    }
    assert!(heartbeats >= 4, "only {heartbeats} heartbeats in 3 s");
    assert_eq!(
        message_count(&cch, "q").await,
        10,
        "a publish was routed while blocked"
    );

    // Draining clears the alarm; the client is unblocked and its five publishes arrive.
    let mut consumer = support::consume(&cch, "q", false).await;
    for _ in 0..10 {
        let d = support::next(&mut consumer).await;
        assert_eq!(d.data[0], 1);
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    match raw.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))) => {
        }
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    for i in 0..5u8 {
        let d = support::next(&mut consumer).await;
        assert_eq!(d.data[0], 100 + i, "publish order kept");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    b.shutdown().await;
}

/// A raw client (it never sends heartbeats, so it shows what the broker does when it stops
/// reading) that asks for connection.blocked notifications if `wants_blocked`.
async fn raw_client(addr: std::net::SocketAddr, wants_blocked: bool, heartbeat: u16) -> Raw {
    let mut props = FieldTable::default();
    if wants_blocked {
        let mut caps = FieldTable::default();
        caps.insert("connection.blocked".into(), AMQPValue::Boolean(true));
        props.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    }
    let mut r = Raw::connect(addr).await;
    r.handshake_with(props, heartbeat).await;
    r
}

#[tokio::test]
async fn a_connection_that_publishes_and_consumes_is_blocked_whole_acks_included() {
    let b = support::start_with(low_watermark()).await;
    let (_oc, och) = b.channel().await;
    support::declare(&och, "m", Default::default()).await;
    let mut raw = raw_client(b.addr, true, 0).await;
    raw.open_channel(1).await;
    for _ in 0..10 {
        raw.publish(1, "m", &[3u8; BODY]).await;
    }
    wait_until("the memory alarm", || b.shared.node.alarms.alarms().memory).await;
    // Deliveries still reach a connection during an alarm...
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "m".into(),
            consumer_tag: "c".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    let (mut delivered, mut bodies) = (0u64, 0);
    while bodies < 10 {
        match raw.recv_method().await {
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d)))) => {
                delivered = d.delivery_tag
            }
            Some(AMQPFrame::Body(1, _)) => bodies += 1,
            Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_))))
            | Some(AMQPFrame::Header(1, _)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered, 10);
    // ...but once it publishes, nothing more it sends is read: its acks wait too, as in
    // RabbitMQ, so the memory they would free stays held.
    raw.publish(1, "m", b"blocker").await;
    match raw.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Blocked(_)))) => {}
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
            delivery_tag: 10,
            multiple: true,
        })),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        b.shared.node.alarms.alarms().memory,
        "acks of a blocked connection were processed"
    );
    assert!(b.shared.node.alarms.state().mem_used >= WATERMARK);

    // Raising the watermark at run time clears the alarm; the ack and the publish go through.
    b.shared.node.memory.set_high_watermark(u64::MAX, 0.5);
    match raw.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))) => {
        }
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    wait_until("the ack to free the messages", || {
        b.shared.node.alarms.state().mem_used < 1024
    })
    .await;
    match raw.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Deliver(d)))) => {
            assert_eq!(d.delivery_tag, 11)
        }
        other => panic!("expected the blocker's delivery, got {other:?}"),
    }
    b.shutdown().await;
}

/// A publisher that pipelines without pause always has bytes waiting on its socket. It must
/// still see the alarm: within a bounded time it is blocked and nothing more it sends is
/// routed, however fast it writes (a connection that only ever found its socket readable used
/// to miss every alarm change after the first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelining_publisher_is_blocked_whatever_the_load() {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    const LIMIT: u64 = 1024 * 1024;
    let cfg = Config {
        vm_memory_high_watermark: MemoryWatermark::Absolute(LIMIT),
        vm_memory_high_watermark_paging_ratio: 10.0,
        ..Config::for_tests()
    };
    let b = support::start_with(cfg).await;
    let (_oc, och) = b.channel().await;
    support::declare(&och, "p", Default::default()).await;

    let mut raw = raw_client(b.addr, true, 0).await;
    raw.open_channel(1).await;
    // 64 publishes of 1 KiB, encoded once, written over and over from a thread of its own.
    let mut batch = Vec::new();
    for _ in 0..64 {
        let publish = [
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "p".into(),
                    mandatory: false,
                    immediate: false,
                })),
            ),
            AMQPFrame::Header(
                1,
                amq_protocol::frame::AMQPContentHeader {
                    class_id: 60,
                    body_size: 1024,
                    properties: Default::default(),
                },
            ),
            AMQPFrame::Body(1, vec![9u8; 1024]),
        ];
        for f in &publish {
            warren_broker::codec::encode(f, &mut batch).expect("encode");
        }
    }
    // A duplicate of the socket's descriptor; it shares tokio's non-blocking flag.
    let mut writer = std::net::TcpStream::from(
        std::os::fd::AsFd::as_fd(&raw.sock)
            .try_clone_to_owned()
            .expect("dup"),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let stop_w = stop.clone();
    let pump = std::thread::spawn(move || {
        let mut written = 0u64;
        let mut off = 0;
        while !stop_w.load(Ordering::Relaxed) {
            match writer.write(&batch[off..]) {
                Ok(n) => {
                    written += n as u64;
                    off = (off + n) % batch.len();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(_) => break,
            }
        }
        written
    });

    // connection.blocked arrives, at the latest a few seconds into the flood.
    let blocked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match raw.recv_method().await {
                Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Blocked(bl)),
                )) => return bl.reason.to_string(),
                Some(_) => continue,
                None => panic!("connection closed"),
            }
        }
    })
    .await
    .expect("never blocked under a pipelined flood");
    assert_eq!(blocked, "low on memory");
    // The connection blocks on the memory counter itself; the node's alarm follows.
    tokio::time::timeout(Duration::from_secs(5), async {
        while !b.shared.node.alarms.alarms().memory {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the memory alarm was never raised");

    // Blocked means blocked: the queue stops growing while the client keeps writing, and the
    // message memory stays near the watermark (what one read can hold beyond it).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = message_count(&och, "p").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        message_count(&och, "p").await,
        held,
        "publishes routed while blocked"
    );
    let used = b.shared.node.alarms.state().mem_used;
    assert!(
        used < LIMIT + 512 * 1024,
        "message memory {used} far beyond the {LIMIT} watermark"
    );
    stop.store(true, Ordering::Relaxed);
    let written = pump.join().expect("writer thread");
    assert!(written > 2 * LIMIT, "the flood was only {written} bytes");
    b.shutdown().await;
}
