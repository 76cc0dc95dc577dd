//! The end of a connection on the wire, with raw sockets: after the close handshake the broker
//! leaves the TCP close to the client (reading and discarding what still arrives) for about a
//! second, as RabbitMQ does, so that a client with writes in flight behind its connection.close
//! gets its close-ok and a clean FIN, never a reset.

mod support;

use support::raw::Raw;

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{basic, connection, AMQPClass};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use warren_broker::codec;

fn close() -> AMQPFrame {
    AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        })),
    )
}

fn close_ok() -> AMQPFrame {
    AMQPFrame::Method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
    )
}

/// One basic.publish (method, header, body) to queue `q` on channel 1, encoded.
fn publish_bytes(out: &mut Vec<u8>, body: &[u8]) {
    for f in [
        AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: "q".into(),
                mandatory: false,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: Default::default(),
            },
        ),
        AMQPFrame::Body(1, body.to_vec()),
    ] {
        codec::encode(&f, out).expect("encode");
    }
}

/// Reads until close-ok (the broker sends nothing else here).
async fn expect_close_ok(r: &mut Raw) {
    match r.recv_method().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::CloseOk(_)))) => {}
        other => panic!("expected connection.close-ok, got {other:?}"),
    }
}

/// Writes a publish every 20 ms for `d`; every write must succeed (no EPIPE, no ECONNRESET).
async fn keep_writing(r: &mut Raw, d: Duration) {
    let mut bytes = Vec::new();
    publish_bytes(&mut bytes, b"late");
    let end = Instant::now() + d;
    let mut n = 0;
    while Instant::now() < end {
        if let Err(e) = r.sock.write_all(&bytes).await {
            panic!("write {n} after close-ok failed: {e}");
        }
        n += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the broker's end of the stream: Ok(0) is a FIN; a reset is an error here.
async fn expect_eof(r: &mut Raw, within: Duration) -> Duration {
    let t0 = Instant::now();
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(within, r.sock.read(&mut buf)).await {
        Err(_) => panic!("no EOF within {within:?}"),
        Ok(Ok(0)) => t0.elapsed(),
        Ok(Ok(n)) => panic!("unexpected {n} bytes after close-ok: {:?}", &buf[..n]),
        Ok(Err(e)) => panic!("the broker reset the connection instead of closing it: {e}"),
    }
}

/// Nothing arrives for `d`, not even EOF: the socket is still open.
async fn expect_silence(r: &mut Raw, d: Duration) {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(d, r.sock.read(&mut buf)).await {
        Err(_) => {}
        Ok(Ok(0)) => panic!("the broker closed the socket right after close-ok"),
        Ok(Ok(n)) => panic!("unexpected {n} bytes after close-ok"),
        Ok(Err(e)) => panic!("the broker reset the connection: {e}"),
    }
}

/// A client with publishes queued behind its connection.close (in the same write, and more
/// after close-ok) keeps writing without error; the broker closes once the client has.
#[tokio::test]
async fn after_close_ok_the_socket_stays_open_until_the_client_closes() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    let mut bytes = Vec::new();
    codec::encode(&close(), &mut bytes).expect("encode");
    for _ in 0..200 {
        publish_bytes(&mut bytes, &[7u8; 100]);
    }
    r.sock.write_all(&bytes).await.expect("close and publishes");
    expect_close_ok(&mut r).await;
    keep_writing(&mut r, Duration::from_millis(400)).await;
    expect_silence(&mut r, Duration::from_millis(200)).await;
    r.sock.shutdown().await.expect("client FIN");
    let waited = expect_eof(&mut r, Duration::from_secs(3)).await;
    assert!(
        waited < Duration::from_millis(500),
        "the broker closed {waited:?} after the client"
    );
    b.shutdown().await;
}

/// A client that never closes: the broker closes (FIN, not RST) about a second after close-ok.
#[tokio::test]
async fn after_close_ok_the_broker_closes_a_silent_client_after_about_a_second() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.send(close()).await;
    expect_close_ok(&mut r).await;
    let waited = expect_eof(&mut r, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "closed {waited:?} after close-ok"
    );
    b.shutdown().await;
}

/// Server-initiated close: after the client's close-ok the broker sends EOF at once (clients
/// such as Java's wait for it) but keeps reading, so late writes are not reset; about a second
/// later the socket is closed for good.
#[tokio::test]
async fn after_the_clients_close_ok_the_broker_sends_eof_and_reads_on() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;
    r.open_channel(1).await;
    // A method on a channel that is not open: connection.close 504 from the broker.
    r.send_method(
        5,
        AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
            prefetch_count: 1,
            global: false,
        })),
    )
    .await;
    let (code, _) = r.expect_connection_close().await;
    assert_eq!(code, 504);
    let t0 = Instant::now();
    r.send(close_ok()).await;
    expect_eof(&mut r, Duration::from_secs(3)).await;
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "{:?}",
        t0.elapsed()
    );
    keep_writing(&mut r, Duration::from_millis(400)).await;
    // The client stays silent and open: past the linger the broker's socket is gone, and a
    // write is answered with a reset.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut failed = false;
    for _ in 0..20 {
        if r.sock
            .write_all(&[8, 0, 0, 0, 0, 0, 0, 0xce])
            .await
            .is_err()
        {
            failed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(failed, "the broker still reads 2 s after close-ok");
    b.shutdown().await;
}
