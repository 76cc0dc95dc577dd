//! Process-level smoke test: run the real binary on port 0, read the bound address from its
//! log, use it with lapin, SIGTERM it: the client sees close 320 and the process exits 0.

mod support;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use std::time::Duration;

#[tokio::test]
async fn binary_binds_port_zero_serves_and_exits_cleanly_on_sigterm() {
    let data = tempfile::tempdir().expect("tempdir");
    let data_dir = data.path().to_str().expect("utf-8 path");
    let broker = support::proc::spawn(
        ["--amqp", "127.0.0.1:0", "--data-dir", data_dir],
        &[],
        &["amqp"],
    )
    .await;
    let (conn, ch) = broker.connect().await;
    ch.queue_declare(
        "smoke".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "".into(),
        "smoke".into(),
        BasicPublishOptions::default(),
        b"hi",
        BasicProperties::default(),
    )
    .await
    .expect("publish");
    let got = ch
        .basic_get("smoke".into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("message");
    assert_eq!(got.delivery.data, b"hi");

    let mut events = conn.events_listener();
    let client_error = async {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match futures_lite::StreamExt::next(&mut events).await {
                    Some(lapin::Event::Error(e)) => return e,
                    Some(_) => continue,
                    None => panic!("event stream ended without an error"),
                }
            }
        })
        .await
        .expect("client notified in time")
    };
    // SIGTERM; term() asserts exit status 0.
    let ((), err) = tokio::join!(broker.term(), client_error);
    match err.kind() {
        lapin::ErrorKind::ProtocolError(p) => assert_eq!(p.get_id(), 320, "{err:?}"),
        other => panic!("expected a 320 close, got {other:?}"),
    }
}
