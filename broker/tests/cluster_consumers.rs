//! Consumers of a mirrored queue whose master dies (real broker processes on loopback): as
//! RabbitMQ's, they consume on from the promoted mirror through their own node without
//! noticing, unless they asked for basic.cancel with `x-cancel-on-ha-failover`; one whose
//! channel closed while it waited for the promotion stays gone.

mod support;

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;
use support::cluster::*;

async fn consume(ch: &lapin::Channel, tag: &str, cancel_on_failover: bool) -> lapin::Consumer {
    let mut args = FieldTable::default();
    if cancel_on_failover {
        args.insert("x-cancel-on-ha-failover".into(), AMQPValue::Boolean(true));
    }
    ch.basic_consume(
        "work".into(),
        tag.into(),
        BasicConsumeOptions::default(),
        args,
    )
    .await
    .expect("consume")
}

/// The next delivery's body (acked), None once the consumer was cancelled; panics after 10 s.
async fn next_body(c: &mut lapin::Consumer) -> Option<String> {
    let d = tokio::time::timeout(Duration::from_secs(10), c.next())
        .await
        .ok()??
        .ok()?;
    d.acker.ack(BasicAckOptions::default()).await.expect("ack");
    Some(String::from_utf8(d.data).expect("utf8"))
}

/// Nodes `a@{tag}`, `b@{tag}` and `c@{tag}`, `ha-all`, and the durable queue "work" mastered on
/// a and in sync on b and c; a connection to a and its channel.
async fn ha_work_queue(
    root: &Path,
    tag: &str,
) -> (Node, Node, Node, lapin::Connection, lapin::Channel) {
    let (a, b, c) = trio(root, tag).await;
    a.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    )
    .await;
    let (ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "work").await;
    eventually("b and c in sync", || async {
        queue_info(&a, "work").await["synchronised_slave_nodes"] == json!([b.name, c.name])
    })
    .await;
    (a, b, c, ca, cha)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_go_on_after_a_failover_unless_they_asked_to_be_cancelled() {
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, c, _ca, _cha) = ha_work_queue(root.path(), "cf").await;

    // On b (the node that will master the queue next) a plain consumer and one that asked
    // to be cancelled; on c a plain one. Each on its own channel, prefetch 1.
    let (_cb, chb) = channel_on(&b).await;
    let chb2 = _cb.create_channel().await.expect("channel");
    let (_cc, chc) = channel_on(&c).await;
    for ch in [&chb, &chb2, &chc] {
        ch.basic_qos(1, Default::default()).await.expect("qos");
    }
    let mut on_b = consume(&chb, "plain-b", false).await;
    let mut cancel_me = consume(&chb2, "cancel-me", true).await;
    let mut on_c = consume(&chc, "plain-c", false).await;
    let (_cp, pub_ch) = channel_on(&c).await;
    pub_ch
        .confirm_select(Default::default())
        .await
        .expect("confirms");
    for i in 0..3 {
        assert!(
            publish_confirmed(&pub_ch, "", "work", format!("before{i}").as_bytes(), true).await
        );
    }
    let mut got = HashSet::new();
    for consumer in [&mut on_b, &mut cancel_me, &mut on_c] {
        got.insert(
            next_body(consumer)
                .await
                .expect("a message before the failover"),
        );
    }
    assert_eq!(got.len(), 3);

    a.proc.kill9().await;
    // Published through c while the master is gone and its successor not yet chosen (a was
    // also the Raft leader: the voters' lease holds the election back a while): held by c's
    // proxy for the promotion and confirmed by the new master, not nacked.
    eventually("c knows a is gone", || async {
        names(&c.get("/api/nodes").await)
            .iter()
            .any(|(n, running)| n == "a@cf" && !running)
    })
    .await;
    let mut pending = Vec::new();
    for i in 0..5 {
        pending.push(
            pub_ch
                .basic_publish(
                    "".into(),
                    "work".into(),
                    Default::default(),
                    format!("during{i}").as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .expect("publish"),
        );
    }
    for p in pending {
        assert!(
            p.await.expect("confirm").is_ack(),
            "a publish sent during the failover is held for the new master, not nacked"
        );
    }
    eventually("a mirror promoted", || async {
        queue_info(&c, "work").await["node"] != "a@cf"
    })
    .await;
    // The one that asked is cancelled; the others get what is published after the failover
    // on the same consumers, wherever the queue went.
    let t = tokio::time::Instant::now();
    assert_eq!(next_body(&mut cancel_me).await, None, "basic.cancel");
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "cancelled, not silent"
    );
    // Both plain consumers attached to the new master (not only one of them draining all).
    let master = queue_info(&c, "work").await["node"].clone();
    let new_master = if master == "b@cf" { &b } else { &c };
    eventually("two consumers on the new master", || async {
        queue_info(new_master, "work").await["consumers"] == 2
    })
    .await;
    for i in 0..10 {
        assert!(publish_confirmed(&pub_ch, "", "work", format!("after{i}").as_bytes(), true).await);
    }
    // Each plain consumer drains into a channel of its own task (a select over both would
    // drop a delivery taken but not yet acked).
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(&'static str, String)>();
    for (who, mut consumer) in [("b", on_b), ("c", on_c)] {
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(m) = next_body(&mut consumer).await {
                if tx.send((who, m)).is_err() {
                    return;
                }
            }
        });
    }
    let mut after = HashSet::new();
    let (mut from_b, mut from_c) = (0, 0);
    while after.len() < 15 {
        let Ok(Some((who, m))) = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await
        else {
            dump_logs(&[&b, &c]);
            panic!("only {after:?} after the failover");
        };
        if who == "b" {
            from_b += 1;
        } else {
            from_c += 1;
        }
        if m.starts_with("after") || m.starts_with("during") {
            after.insert(m);
        }
    }
    assert!(
        from_b > 0 && from_c > 0,
        "both plain consumers consume on (b {from_b}, c {from_c})"
    );
}

/// A consumer waits on its own node for the promotion of its queue (the master died); its
/// channel closes before the promotion comes. The new master must not take it on: it would
/// be a consumer of a closed channel, taking messages its node can only give back, for as
/// long as the connection lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_channel_closed_while_it_waited_for_the_promotion_is_not_taken_on() {
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, c, _ca, cha) = ha_work_queue(root.path(), "cw").await;
    cha.confirm_select(Default::default())
        .await
        .expect("confirms");
    for i in 0..10 {
        assert!(publish_confirmed(&cha, "", "work", format!("m{i}").as_bytes(), true).await);
    }
    // A consumer on c (prefetch 1) that has its first message.
    let (cc, chc) = channel_on(&c).await;
    chc.basic_qos(1, Default::default()).await.expect("qos");
    let mut on_c = consume(&chc, "on-c", false).await;
    let first = tokio::time::timeout(Duration::from_secs(10), on_c.next())
        .await
        .expect("a delivery in time")
        .expect("delivery")
        .expect("ok");
    assert_eq!(first.data, b"m0");

    // b frozen and a killed: c alone is no majority, so no promotion can happen until b
    // thaws; c parks its consumer (a's link is gone at once, b's after the failure detection).
    b.proc.signal("STOP");
    a.proc.kill9().await;
    eventually("c sees a and b down", || async {
        names(&c.get("/api/nodes").await)
            .iter()
            .filter(|(n, running)| n != "c@cw" && !running)
            .count()
            == 2
    })
    .await;
    chc.close(200, "bye".into()).await.expect("channel close");
    drop(on_c);
    b.proc.signal("CONT");
    eventually("a mirror promoted", || async {
        let n = queue_info(&c, "work").await["node"].clone();
        n == "b@cw" || n == "c@cw"
    })
    .await;
    let master = queue_info(&c, "work").await["node"].clone();
    let new_master = if master == "b@cw" { &b } else { &c };
    eventually("the promotion logged by the new master", || async {
        new_master.proc.logged("promoted to master")
    })
    .await;
    // c has the promotion (read from c above): this is when it hands its parked consumers
    // on. Watched for 2 s: no consumer on the new master; then all ten messages are ready.
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while tokio::time::Instant::now() < until {
        let q = queue_info(new_master, "work").await;
        assert_eq!(q["consumers"], 0, "a consumer of a closed channel: {q}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ch = cc.create_channel().await.expect("channel");
    let mut got = Vec::new();
    while let Some(body) = support::get_body(&ch, "work").await {
        got.push(String::from_utf8(body).expect("utf8"));
    }
    got.sort_by_key(|s| s[1..].parse::<u32>().expect("number"));
    let want: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got, want,
        "every message ready once, none held by a ghost consumer"
    );
}
