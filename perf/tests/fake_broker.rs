//! End-to-end run of warren-perf against a minimal in-process AMQP server on 127.0.0.1:0: the
//! handshake, queue.declare, confirm.select, basic.qos, basic.consume, pipelined publishes with
//! confirms, deliveries with multiple-acks, and close.
//!
//! The fake server implements just enough of the protocol for that (one queue, messages forwarded
//! straight to the consumer connection, every publish acked when confirms are on).

// Test code: a failed unwrap is a failed test (clippy's allow-unwrap-in-tests does not reach helpers).
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use amq_protocol::{
    frame::{gen_frame, parse_frame, AMQPContentHeader, AMQPFrame},
    protocol::{basic, channel, confirm, connection, queue, AMQPClass},
    types::FieldTable,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use warren_perf::{
    config::{Args, Config},
    ProgressTo,
};

type Consumers = Arc<Mutex<Vec<mpsc::UnboundedSender<Vec<u8>>>>>;

fn encode(frames: &[AMQPFrame]) -> Vec<u8> {
    let mut out = Vec::new();
    for f in frames {
        let (bytes, _) = gen_frame(f)(Vec::new().into()).unwrap().into_inner();
        out.extend(bytes);
    }
    out
}

fn method(ch: u16, m: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(ch, m)
}

async fn serve(listener: TcpListener, acks_seen: Arc<Mutex<u64>>) {
    let consumers: Consumers = Arc::default();
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            return;
        };
        tokio::spawn(conn(sock, consumers.clone(), acks_seen.clone()));
    }
}

async fn conn(mut sock: TcpStream, consumers: Consumers, acks_seen: Arc<Mutex<u64>>) {
    let mut header = [0u8; 8];
    sock.read_exact(&mut header).await.unwrap();
    assert_eq!(&header, b"AMQP\x00\x00\x09\x01");
    let start = method(
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::default(),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
    );
    sock.write_all(&encode(&[start])).await.unwrap();

    let (mut rd, mut wr) = sock.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                return;
            }
        }
    });

    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut confirms = false;
    let mut published: u64 = 0;
    let mut delivery_tag: u64 = 0;
    let mut pending_publish: Option<AMQPContentHeader> = None;
    let mut body: Vec<u8> = Vec::new();
    loop {
        let n = match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        let mut consumed = 0;
        // An error means incomplete: the client sends only valid frames.
        while let Ok((rest, frame)) = parse_frame(&buf[consumed..]) {
            consumed = buf.len() - rest.len();
            let reply = match frame {
                AMQPFrame::Method(ch, AMQPClass::Connection(m)) => match m {
                    connection::AMQPMethod::StartOk(s) => {
                        assert_eq!(s.mechanism.as_str(), "PLAIN");
                        assert_eq!(s.response.as_bytes(), b"\0guest\0guest");
                        Some(method(
                            ch,
                            AMQPClass::Connection(connection::AMQPMethod::Tune(connection::Tune {
                                channel_max: 2047,
                                frame_max: 131_072,
                                heartbeat: 60,
                            })),
                        ))
                    }
                    connection::AMQPMethod::TuneOk(t) => {
                        assert_eq!(t.heartbeat, 0);
                        None
                    }
                    connection::AMQPMethod::Open(_) => Some(method(
                        ch,
                        AMQPClass::Connection(connection::AMQPMethod::OpenOk(
                            connection::OpenOk {},
                        )),
                    )),
                    connection::AMQPMethod::Close(_) => Some(method(
                        ch,
                        AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                            connection::CloseOk {},
                        )),
                    )),
                    m => panic!("unexpected {m:?}"),
                },
                AMQPFrame::Method(ch, AMQPClass::Channel(channel::AMQPMethod::Open(_))) => {
                    Some(method(
                        ch,
                        AMQPClass::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})),
                    ))
                }
                AMQPFrame::Method(ch, AMQPClass::Queue(queue::AMQPMethod::Declare(d))) => {
                    assert!(d.durable && d.auto_delete && !d.exclusive);
                    Some(method(
                        ch,
                        AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: d.queue,
                            message_count: 0,
                            consumer_count: 0,
                        })),
                    ))
                }
                AMQPFrame::Method(ch, AMQPClass::Confirm(confirm::AMQPMethod::Select(_))) => {
                    confirms = true;
                    Some(method(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    ))
                }
                AMQPFrame::Method(ch, AMQPClass::Basic(m)) => match m {
                    basic::AMQPMethod::Qos(q) => {
                        assert_eq!(q.prefetch_count, 50);
                        Some(method(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                        ))
                    }
                    basic::AMQPMethod::Consume(c) => {
                        assert!(!c.no_ack);
                        consumers.lock().unwrap().push(tx.clone());
                        Some(method(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                                consumer_tag: "ctag-1".into(),
                            })),
                        ))
                    }
                    basic::AMQPMethod::Publish(p) => {
                        assert_eq!(p.routing_key.as_str(), "fake-q");
                        None
                    }
                    basic::AMQPMethod::Ack(a) => {
                        assert!(a.multiple);
                        *acks_seen.lock().unwrap() = a.delivery_tag;
                        None
                    }
                    m => panic!("unexpected {m:?}"),
                },
                AMQPFrame::Header(_, h) => {
                    assert_eq!(h.properties.delivery_mode(), &Some(2));
                    pending_publish = Some(h);
                    body.clear();
                    None
                }
                AMQPFrame::Body(ch, b) => {
                    body.extend_from_slice(&b);
                    let h = pending_publish.as_ref().unwrap();
                    if body.len() as u64 == h.body_size {
                        published += 1;
                        if confirms {
                            out.extend(encode(&[method(
                                ch,
                                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                                    delivery_tag: published,
                                    multiple: false,
                                })),
                            )]));
                        }
                        let target = consumers.lock().unwrap().first().cloned();
                        if let Some(c) = target {
                            delivery_tag += 1;
                            let _ = c.send(encode(&[
                                method(
                                    1,
                                    AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                                        consumer_tag: "ctag-1".into(),
                                        delivery_tag,
                                        redelivered: false,
                                        exchange: "".into(),
                                        routing_key: "fake-q".into(),
                                    })),
                                ),
                                AMQPFrame::Header(1, h.clone()),
                                AMQPFrame::Body(1, body.clone()),
                            ]));
                        }
                    }
                    None
                }
                f => panic!("unexpected {f:?}"),
            };
            if let Some(r) = reply {
                out.extend(encode(&[r]));
            }
        }
        buf.drain(..consumed);
        if !out.is_empty() && tx.send(out).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_run_against_fake_broker() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acks_seen = Arc::new(Mutex::new(0));
    tokio::spawn(serve(listener, acks_seen.clone()));

    let uri = format!("amqp://guest:guest@{addr}/%2f");
    let args = <Args as clap::Parser>::try_parse_from([
        "warren-perf",
        "--uri",
        &uri,
        "-x",
        "1",
        "-y",
        "1",
        "-s",
        "100",
        "-c",
        "20",
        "-f",
        "persistent",
        "-q",
        "50",
        "-A",
        "10",
        "-z",
        "1",
        "-u",
        "fake-q",
        "-r",
        "2000",
    ])
    .unwrap();
    let cfg = Config::from_args(&args).unwrap();
    let s = warren_perf::run(&cfg, ProgressTo::Stderr).await.unwrap();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert_eq!(s.stale, 0);
    // Rate-limited to 2000 msg/s for one second.
    assert!((1000..=2100).contains(&s.sent), "sent {}", s.sent);
    assert!(
        s.confirmed + 20 >= s.sent,
        "confirmed {} of {}",
        s.confirmed,
        s.sent
    );
    assert!(
        s.received + 100 >= s.sent,
        "received {} of {}",
        s.received,
        s.sent
    );
    let c = s.confirm_latency_us.as_ref().unwrap();
    assert!(c.p50 > 0.0 && c.p99 >= c.p50);
    assert!(s.consumer_latency_us.is_some());
    assert!(s.perf_cpu.is_some());
    assert!(*acks_seen.lock().unwrap() >= 10);
    assert_eq!(s.per_second.len(), 1);
}
