//! Flow control (`broker::queue::flow`): a publisher faster than what a queue's consumers can
//! take is held back (its connection is no longer read and shows as `flow` in the management
//! API) instead of piling its messages into the queue; consumers slow to acknowledge, or no
//! consumers at all, hold nobody back.

mod support;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{basic, AMQPClass};
use amq_protocol::types::FieldTable;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::http::http;
use support::raw::{publish_frames, Raw};
use tokio::io::AsyncReadExt;

/// Messages the tests whose publishers are never held back send in all.
const TOTAL: usize = 250_000;
/// Publishes per write.
const BATCH: usize = 500;

/// A raw connection with channel 1 open.
async fn raw(b: &support::TestBroker) -> Raw {
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    r
}

/// Publishes `total` 16-byte messages to `queue` as fast as the socket takes them, counting
/// those written.
fn publisher(
    mut r: Raw,
    queue: &'static str,
    sent: Arc<AtomicUsize>,
    total: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let body = [7u8; 16];
        while sent.load(Ordering::Relaxed) < total {
            let mut frames = Vec::with_capacity(BATCH * 3);
            for _ in 0..BATCH {
                frames.extend(publish_frames(1, queue, &body));
            }
            r.send_all(&frames).await;
            sent.fetch_add(BATCH, Ordering::Relaxed);
        }
        // Keep the connection until the test ends.
        std::future::pending::<()>().await;
    })
}

/// basic.consume on channel 1 of `r`, waiting for consume-ok.
async fn consume(r: &mut Raw, queue: &str, no_ack: bool) {
    r.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: queue.into(),
            consumer_tag: "c".into(),
            no_local: false,
            no_ack,
            exclusive: false,
            nowait: false,
            arguments: FieldTable::default(),
        })),
    )
    .await;
    match r.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(_)))) => {}
        other => panic!("expected consume-ok, got {other:?}"),
    }
}

/// An auto-ack consumer of `queue` on a raw connection with a 64 KiB receive buffer: once its
/// client stops reading, little waits in its kernel and the queue's deliveries wait on it.
async fn auto_ack_consumer(b: &support::TestBroker, queue: &str) -> Raw {
    let mut r = Raw::connect_with_recv_buffer(b.addr, 64 * 1024).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    consume(&mut r, queue, true).await;
    r
}

fn ready(b: &support::TestBroker, queue: &str) -> u32 {
    b.shared
        .vhost("/")
        .and_then(|v| v.queue(queue))
        .map_or(0, |q| q.message_count())
}

/// The management API's state of every connection.
async fn states(b: &support::TestBroker) -> Vec<String> {
    let r = http(
        b.mgmt.expect("mgmt"),
        "GET",
        "/api/connections",
        Some(("guest", "guest")),
        None,
    )
    .await;
    r.json()
        .as_array()
        .expect("a list")
        .iter()
        .map(|c| c["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// A broker with its management API on a port of its own.
async fn start() -> support::TestBroker {
    let mut cfg = warren_broker::config::Config::for_tests();
    cfg.mgmt = vec![std::net::SocketAddr::from(([127, 0, 0, 1], 0))];
    support::start_with(cfg).await
}

/// Whether a queue holds some connection back for its backlog.
fn held_by_a_queue(b: &support::TestBroker) -> bool {
    b.shared
        .registry
        .connections()
        .iter()
        .any(|c| c.conn_shared.flow.is_held_by_queue())
}

async fn declare(b: &support::TestBroker, name: &str) {
    let (_c, ch) = b.channel().await;
    support::declare(&ch, name, FieldTable::default()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_faster_than_its_consumer_can_take_is_held_back_not_queued() {
    let b = start().await;
    declare(&b, "f").await;
    // An auto-ack consumer whose client stops reading: what it can take is what its socket
    // takes, and the queue's deliveries wait on its connection.
    let mut consumer = auto_ack_consumer(&b, "f").await;
    let sent = Arc::new(AtomicUsize::new(0));
    // Publishing without end: the loopback socket buffers (the broker's receive buffer grows
    // to tens of MiB) absorb a lot before the publisher feels anything.
    let p = publisher(raw(&b).await, "f", sent.clone(), usize::MAX);
    // The publisher is held back by the queue: it makes no progress while held and shows as
    // flow.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let last = loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the publisher was never held back; {} sent, {} ready",
            sent.load(Ordering::Relaxed),
            ready(&b, "f")
        );
        if !held_by_a_queue(&b) {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let before = sent.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = sent.load(Ordering::Relaxed);
        if held_by_a_queue(&b) && after == before {
            break after;
        }
    };
    assert!(
        states(&b).await.iter().any(|s| s == "flow"),
        "the held connection shows as flow"
    );
    let backlog = ready(&b, "f") as usize;
    eprintln!("held back at {last} sent, {backlog} ready");
    assert!(
        backlog < 50_000,
        "the queue holds a bounded backlog, not what was sent: {backlog} ready of {last} sent"
    );
    // The publisher stops and goes (what it wrote is still read: TCP delivers it before the
    // close); the consumer reads again: everything sent arrives and the hold ends.
    p.abort();
    let _ = p.await;
    let mut received = 0usize;
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 1 << 16];
    let drain_deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let read = tokio::time::timeout(Duration::from_millis(500), consumer.sock.read(&mut tmp));
        let n = match read.await {
            Ok(r) => r.expect("read"),
            // Nothing more for a while: done once the queue is empty and what was sent arrived.
            Err(_) if received >= last && ready(&b, "f") == 0 => break,
            Err(_) => {
                assert!(
                    tokio::time::Instant::now() < drain_deadline,
                    "deliveries stopped at {received} of {last} sent, {} ready",
                    ready(&b, "f")
                );
                continue;
            }
        };
        assert!(n > 0, "consumer connection closed");
        buf.extend_from_slice(&tmp[..n]);
        let mut at = 0;
        while let Some((f, used)) = warren_broker::codec::decode(&buf[at..], 0).expect("frame") {
            at += used;
            if matches!(f, AMQPFrame::Body(..)) {
                received += 1;
            }
        }
        buf.drain(..at);
    }
    // A write cut short by the abort may have delivered part of its batch.
    assert!(
        received >= last && received < last + BATCH,
        "{received} received of {last} sent"
    );
    assert_eq!(ready(&b, "f"), 0);
    assert!(!held_by_a_queue(&b), "the hold ends once the queue drained");
    assert!(
        states(&b).await.iter().all(|s| s == "running"),
        "no connection in flow any more"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_slow_to_acknowledge_and_queues_without_consumers_hold_nobody_back() {
    let b = start().await;
    declare(&b, "slow").await;
    declare(&b, "idle").await;
    // A consumer with prefetch 1 that never acknowledges (a worker busy with its task): its
    // connection is read, it just takes nothing more.
    let mut worker = raw(&b).await;
    worker
        .send_method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 1,
                global: false,
            })),
        )
        .await;
    match worker.recv_method().await {
        Some(AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::QosOk(_)))) => {}
        other => panic!("expected qos-ok, got {other:?}"),
    }
    consume(&mut worker, "slow", false).await;
    for queue in ["slow", "idle"] {
        let sent = Arc::new(AtomicUsize::new(0));
        let p = publisher(raw(&b).await, queue, sent.clone(), TOTAL);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // The broker takes every message: all of them end up in the queue.
        while (ready(&b, queue) as usize) < TOTAL - usize::from(queue == "slow") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{queue}: {} of {TOTAL} queued, {} sent; states {:?}",
                ready(&b, queue),
                sent.load(Ordering::Relaxed),
                states(&b).await
            );
            // A connection may wait for its credit (the queue taking in its mailbox) and
            // show as flow meanwhile; no queue holds it back for its backlog.
            assert!(
                !held_by_a_queue(&b),
                "{queue}: no queue holds the publisher back"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        p.abort();
    }
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_publishes_to_its_own_consumer_without_reading_is_not_deadlocked() {
    // A single-threaded client (py-amqp's sendall) consuming and publishing on one connection,
    // stuck in a write: the broker must keep reading it, or neither side would move again.
    let b = start().await;
    declare(&b, "own").await;
    let mut r = auto_ack_consumer(&b, "own").await;
    let body = [7u8; 16];
    let mut frames = Vec::with_capacity(TOTAL * 3);
    for _ in 0..TOTAL {
        frames.extend(publish_frames(1, "own", &body));
    }
    tokio::time::timeout(Duration::from_secs(30), r.send_all(&frames))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the client's write never completed: {} ready, held by a queue: {}",
                ready(&b, "own"),
                held_by_a_queue(&b)
            )
        });
    b.shutdown().await;
}
