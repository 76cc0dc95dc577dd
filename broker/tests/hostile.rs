//! Hostile input from the network: deeply nested field tables in every place a client can put
//! one. Each used to overflow a runtime thread's stack and abort the whole broker (the frames
//! are hand-encoded, since amq-protocol's encoder recurses too). Now a frame nested deeper than
//! 16 levels closes the connection (502) or the channel (406) and the broker goes on serving.

mod support;

use support::raw::Raw;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{channel, connection, AMQPClass};
use tokio::io::AsyncWriteExt;
use warren_broker::codec;

/// A field table (length-prefixed, as on the wire) nested `levels` deep: `{"k": {"k": ...}}`,
/// every other level an array when `arrays`.
fn deep_table(levels: usize, arrays: bool) -> Vec<u8> {
    // A tagged value: the innermost empty table, then one container around it per level.
    let mut v = vec![b'F', 0, 0, 0, 0];
    for i in 1..levels {
        let array = arrays && i % 2 == 1 && i != levels - 1;
        let inner = std::mem::take(&mut v);
        let content: Vec<u8> = if array {
            inner
        } else {
            [&[1, b'k'][..], &inner].concat()
        };
        v.push(if array { b'A' } else { b'F' });
        v.extend_from_slice(&(content.len() as u32).to_be_bytes());
        v.extend_from_slice(&content);
    }
    // The outermost level is a table: drop its tag.
    v.split_off(1)
}

fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![kind];
    f.extend_from_slice(&channel.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    f.extend_from_slice(payload);
    f.push(0xce);
    f
}

fn short(s: &str) -> Vec<u8> {
    let mut v = vec![s.len() as u8];
    v.extend_from_slice(s.as_bytes());
    v
}

fn long(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

/// connection.start-ok with these client properties, PLAIN guest/guest.
fn start_ok(props: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 10, 0, 11];
    p.extend_from_slice(props);
    p.extend(short("PLAIN"));
    p.extend(long(b"\0guest\0guest"));
    p.extend(short("en_US"));
    frame(1, 0, &p)
}

/// queue.declare of `q` with these arguments.
fn queue_declare(ch: u16, args: &[u8]) -> Vec<u8> {
    let mut p = vec![0, 50, 0, 10, 0, 0];
    p.extend(short("q"));
    p.push(0);
    p.extend_from_slice(args);
    frame(1, ch, &p)
}

/// basic.publish to `q` through the default exchange, with these headers and a 3-byte body.
fn publish_with_headers(ch: u16, headers: &[u8]) -> Vec<u8> {
    let mut m = vec![0, 60, 0, 40, 0, 0];
    m.extend(short(""));
    m.extend(short("q"));
    m.push(0);
    let mut out = frame(1, ch, &m);
    let mut h = vec![0, 60, 0, 0];
    h.extend_from_slice(&3u64.to_be_bytes());
    h.extend_from_slice(&(1u16 << 13).to_be_bytes());
    h.extend_from_slice(headers);
    out.extend(frame(2, ch, &h));
    out.extend(frame(3, ch, b"abc"));
    out
}

async fn expect_channel_close(r: &mut Raw, ch: u16) -> (u16, String, u16, u16) {
    match r.recv_method().await {
        Some(AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::Close(cl))))
            if c == ch =>
        {
            (
                cl.reply_code,
                cl.reply_text.to_string(),
                cl.class_id,
                cl.method_id,
            )
        }
        other => panic!("expected channel.close on {ch}, got {other:?}"),
    }
}

/// The broker still serves: a fresh client declares, publishes and gets a message.
async fn still_serving(b: &support::TestBroker) {
    let (_c, ch) = b.channel().await;
    support::declare(&ch, "alive", Default::default()).await;
    support::publish(&ch, "", "alive", b"yes").await;
    let mut got = None;
    for _ in 0..100 {
        got = support::get_body(&ch, "alive").await;
        if got.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(got.as_deref(), Some(&b"yes"[..]));
}

#[tokio::test]
async fn deeply_nested_client_properties_before_login_close_the_connection_502() {
    let b = support::start().await;
    for (levels, arrays) in [(1_550, false), (5_000, true), (17, false)] {
        let mut r = Raw::connect(b.addr).await;
        r.sock
            .write_all(codec::PROTOCOL_HEADER)
            .await
            .expect("header");
        let _start = r.recv().await;
        r.sock
            .write_all(&start_ok(&deep_table(levels, arrays)))
            .await
            .expect("start-ok");
        let (code, text) = r.expect_connection_close().await;
        assert_eq!(code, 502, "{levels} levels: {text}");
        assert!(text.contains("nested deeper than 16 levels"), "{text}");
    }
    // 16 levels are accepted: the client logs in.
    let mut r = Raw::connect(b.addr).await;
    r.sock
        .write_all(codec::PROTOCOL_HEADER)
        .await
        .expect("header");
    let _start = r.recv().await;
    r.sock
        .write_all(&start_ok(&deep_table(16, true)))
        .await
        .expect("start-ok");
    match r.recv().await {
        Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) => {}
        other => panic!("16 levels refused: {other:?}"),
    }
    still_serving(&b).await;
    b.shutdown().await;
}

#[tokio::test]
async fn deeply_nested_arguments_and_headers_close_the_channel_406() {
    let b = support::start().await;
    let mut r = Raw::connect(b.addr).await;
    r.handshake(0).await;

    // Queue arguments: the channel closes, naming queue.declare.
    r.open_channel(1).await;
    r.sock
        .write_all(&queue_declare(1, &deep_table(5_000, false)))
        .await
        .expect("declare");
    let (code, text, class, method) = expect_channel_close(&mut r, 1).await;
    assert_eq!((code, class, method), (406, 50, 10), "{text}");
    assert!(text.starts_with("PRECONDITION_FAILED - "), "{text}");

    // Message headers 5,000 deep, on a channel declared with good arguments: the publish is
    // refused with its channel; the frames that follow it are discarded, not misread.
    r.open_channel(2).await;
    r.sock
        .write_all(&queue_declare(2, &0u32.to_be_bytes()))
        .await
        .expect("declare");
    assert!(matches!(
        r.recv_method().await,
        Some(AMQPFrame::Method(2, _))
    ));
    r.sock
        .write_all(&publish_with_headers(2, &deep_table(5_000, true)))
        .await
        .expect("publish");
    let (code, _, class, method) = expect_channel_close(&mut r, 2).await;
    assert_eq!((code, class, method), (406, 60, 40));

    // The same connection goes on: a channel's close-ok, then a publish with 16 levels of
    // headers is routed.
    r.send_method(
        2,
        AMQPClass::Channel(channel::AMQPMethod::CloseOk(channel::CloseOk {})),
    )
    .await;
    r.open_channel(3).await;
    r.sock
        .write_all(&publish_with_headers(3, &deep_table(16, true)))
        .await
        .expect("publish");
    let (_c, ch) = b.channel().await;
    let mut got = None;
    for _ in 0..100 {
        got = support::get_body(&ch, "q").await;
        if got.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(got.as_deref(), Some(&b"abc"[..]));
    still_serving(&b).await;
    b.shutdown().await;
}
