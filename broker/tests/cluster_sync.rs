//! Synchronising mirrors of a queue with a backlog (real broker processes on loopback): a
//! mirror whose stream starts while the queue holds messages gets them in batches while the
//! queue keeps serving (`ha-sync-mode` automatic), or only when asked (`sync_queue` with
//! manual sync), and once in sync it can take the queue over with every message; a mirror that
//! stops acknowledging (in this process, through the mirrors' test hook) leaves the in-sync set
//! after the failure-detection time instead of holding confirms back.

mod support;

use futures_lite::StreamExt;
use serde_json::json;
use support::cluster::*;
use support::http::http;

/// Publishes `n` persistent messages `m0`.. to the default exchange with confirms in flight
/// (pipelined), and asserts every one was acked.
async fn publish_backlog(ch: &lapin::Channel, queue: &str, from: usize, n: usize) {
    let mut pending = Vec::with_capacity(n);
    let body = vec![b'x'; 1000];
    for i in from..from + n {
        let mut b = format!("m{i}:").into_bytes();
        b.extend_from_slice(&body);
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                Default::default(),
                &b,
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(p.await.expect("confirm").is_ack(), "every publish is acked");
    }
}

/// Consumes `queue` on `ch` until `n` messages came (15 s at most); returns their numbers.
async fn consume_all(ch: &lapin::Channel, queue: &str, n: usize) -> Vec<usize> {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "all".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .expect("consume");
    let mut got = Vec::with_capacity(n);
    let end = tokio::time::Instant::now() + std::time::Duration::from_secs(15);
    while got.len() < n {
        let d = tokio::time::timeout_at(end, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages came", got.len()))
            .expect("a delivery")
            .expect("delivery ok");
        let s = std::str::from_utf8(&d.data).expect("utf8");
        let num = s[1..s.find(':').expect("colon")].parse().expect("number");
        got.push(num);
    }
    got
}

async fn sync_action(n: &Node, queue: &str, action: &str) -> u16 {
    http(
        n.mgmt(),
        "POST",
        &format!("/api/queues/%2F/{queue}/actions"),
        Some(("guest", "guest")),
        Some(json!({ "action": action })),
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_mirrors_a_backlog_in_batches_while_the_queue_serves_and_the_mirror_takes_all_of_it(
) {
    const BACKLOG: usize = 12_000;
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, _w) = pair_with_witness(root.path(), "sy").await;
    let (_ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "backlog").await;
    cha.confirm_select(Default::default())
        .await
        .expect("confirms");
    publish_backlog(&cha, "backlog", 0, BACKLOG).await;

    // The seed's policy comes after the queue filled up: b's stream starts with 12,000
    // messages nobody consumes already in the queue, so b is in sync only once synchronised.
    // It gets them in batches while the queue takes more publishes.
    a.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    )
    .await;
    eventually("b is a mirror", || async {
        queue_info(&a, "backlog").await["slave_nodes"] == json!(["b@sy"])
    })
    .await;
    publish_backlog(&cha, "backlog", BACKLOG, 100).await;
    eventually("b synchronised with the backlog", || async {
        queue_info(&a, "backlog").await["synchronised_slave_nodes"] == json!(["b@sy"])
    })
    .await;
    assert_eq!(
        ready_on(&cha, "backlog").await as usize,
        BACKLOG + 100,
        "the queue kept its backlog: b is in sync by synchronisation, not by a drained queue"
    );
    // Published once b is in sync: they wait for b's ack.
    publish_backlog(&cha, "backlog", BACKLOG + 100, 100).await;

    // The master dies; b (with the witness, a majority) takes the queue with every message.
    a.proc.kill9().await;
    eventually("b promoted", || async {
        queue_info(&b, "backlog").await["node"] == "b@sy"
    })
    .await;
    let (_cb, chb) = channel_on(&b).await;
    let got = consume_all(&chb, "backlog", BACKLOG + 200).await;
    let want: Vec<usize> = (0..BACKLOG + 200).collect();
    assert_eq!(got, want, "every message, once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_manual_sync_a_mirror_is_in_sync_only_after_sync_queue_asked_of_any_node() {
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, _w) = pair_with_witness(root.path(), "ms").await;
    let (_ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "manual").await;
    cha.confirm_select(Default::default())
        .await
        .expect("confirms");
    publish_backlog(&cha, "manual", 0, 500).await;
    a.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "manual"}}),
    )
    .await;
    eventually("b is a mirror", || async {
        queue_info(&a, "manual").await["slave_nodes"] == json!(["b@ms"])
    })
    .await;
    // Manual: b streams new changes but lacks the backlog, so it stays out of sync.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert_eq!(
        queue_info(&a, "manual").await["synchronised_slave_nodes"],
        json!([])
    );
    // cancel_sync with nothing under way is fine; an unknown action is refused.
    assert_eq!(sync_action(&a, "manual", "cancel_sync").await, 204);
    assert_eq!(sync_action(&a, "manual", "frobnicate").await, 400);
    // sync_queue, asked of the node without the master (any node answers for the cluster).
    assert_eq!(sync_action(&b, "manual", "sync").await, 204);
    eventually("b synchronised on request", || async {
        queue_info(&a, "manual").await["synchronised_slave_nodes"] == json!(["b@ms"])
    })
    .await;
    assert_eq!(ready_on(&cha, "manual").await, 500);
    a.proc.kill9().await;
    eventually("b promoted", || async {
        queue_info(&b, "manual").await["node"] == "b@ms"
    })
    .await;
    let (_cb, chb) = channel_on(&b).await;
    let got = consume_all(&chb, "manual", 500).await;
    assert_eq!(got, (0..500).collect::<Vec<_>>());
}

/// A mirror that stays reachable but acknowledges nothing (its disk stalls) holds confirms back
/// for the failure-detection time at most: then it is out of the in-sync set and the publish is
/// confirmed. Once it acknowledges again it is synchronised and in sync again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_that_stops_acknowledging_leaves_the_in_sync_set_and_confirms_go_on() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-sl");
    let a = in_process("a@sl", &secret, None).await;
    let seed = a
        .shared
        .cluster()
        .expect("clustered")
        .cluster
        .listen_addrs()[0]
        .to_string();
    let b = in_process("b@sl", &secret, Some(seed)).await;
    let mgmt = a.mgmt.expect("mgmt");
    let r = http(
        mgmt,
        "PUT",
        "/api/policies/%2F/ha-all",
        Some(("guest", "guest")),
        Some(json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}})),
    )
    .await;
    assert!(matches!(r.status, 201 | 204), "{}", r.text());
    let (_c, ch) = a.channel().await;
    support::declare_durable(&ch, "slow").await;
    let in_sync = || async {
        let r = http(
            mgmt,
            "GET",
            "/api/queues/%2F/slow",
            Some(("guest", "guest")),
            None,
        )
        .await;
        r.json()["synchronised_slave_nodes"].clone()
    };
    eventually("b in sync", || async { in_sync().await == json!(["b@sl"]) }).await;
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    assert!(publish_confirmed(&ch, "", "slow", b"before", true).await);

    b.shared
        .cluster()
        .expect("clustered")
        .hold_mirror_acks(true);
    let t0 = tokio::time::Instant::now();
    let confirmed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        publish_confirmed(&ch, "", "slow", b"during", true),
    )
    .await
    .expect("a confirm within 10 s");
    let took = t0.elapsed();
    assert!(confirmed, "nacked");
    let fd = std::time::Duration::from_millis(FD_MS.parse().expect("fd"));
    assert!(
        took >= fd,
        "confirmed after {took:?}, before the failure-detection time: the mirror's acks were not waited for"
    );
    assert_eq!(
        in_sync().await,
        json!([]),
        "the silent mirror is out of sync"
    );

    b.shared
        .cluster()
        .expect("clustered")
        .hold_mirror_acks(false);
    eventually("b in sync again", || async {
        in_sync().await == json!(["b@sl"])
    })
    .await;
    let t1 = tokio::time::Instant::now();
    assert!(publish_confirmed(&ch, "", "slow", b"after", true).await);
    assert!(
        t1.elapsed() < fd,
        "confirms wait for nothing unusual once it is back"
    );
    assert_eq!(ready_on(&ch, "slow").await, 3);
}
