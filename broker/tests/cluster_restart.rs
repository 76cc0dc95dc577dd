//! Whole-cluster restarts (real broker processes on loopback): a mirrored queue's confirmed
//! messages survive every node dying at once, whichever node comes back first.

mod support;

use futures_lite::StreamExt;
use serde_json::json;
use support::cluster::*;
use support::proc::BrokerProc;

/// Publishes `n` persistent messages `{tag}0`.. with confirms in flight, and asserts each acked.
async fn publish_persistent(ch: &lapin::Channel, queue: &str, tag: &str, n: usize) {
    let mut pending = Vec::with_capacity(n);
    for i in 0..n {
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                Default::default(),
                format!("{tag}{i}").as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(p.await.expect("confirm").is_ack(), "publish nacked");
    }
}

/// Ready messages of `queue` through a channel of its own on `n` (None: an error, the queue
/// missing included).
async fn try_ready(n: &Node, queue: &str) -> Option<u32> {
    let (_c, ch) = channel_on(n).await;
    passive_count(&ch, queue).await.ok()
}

/// Consumes everything in `queue` through `ch` (manual acks) until `n` distinct bodies were
/// seen, and returns them with how many came redelivered.
async fn drain(
    ch: &lapin::Channel,
    queue: &str,
    n: usize,
) -> (std::collections::BTreeSet<String>, usize) {
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "drain".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("consume");
    let mut seen = std::collections::BTreeSet::new();
    let mut redelivered = 0;
    while seen.len() < n {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} messages arrived", seen.len()))
            .expect("delivery")
            .expect("delivery ok");
        if d.redelivered {
            redelivered += 1;
        }
        seen.insert(String::from_utf8_lossy(&d.data).into_owned());
        d.ack(Default::default()).await.expect("ack");
    }
    (seen, redelivered)
}

/// The seed's two nodes and a witness lose power together. The mirror comes back first and,
/// with the witness, is a majority: the master is out of reach, so the mirror (in sync when
/// the power went) is promoted. It must bring its copy of the queue from its disk: every
/// confirmed message is there, and stays there when the old master returns as a mirror.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_killed_at_once_the_mirror_back_first_takes_over_with_every_confirmed_message() {
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, w) = pair_with_witness(root.path(), "pw").await;
    a.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    )
    .await;
    let (_ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "jobs").await;
    eventually("b in sync", || async {
        queue_info(&a, "jobs").await["synchronised_slave_nodes"] == json!(["b@pw"])
    })
    .await;
    // Confirmed through the mirror's node (forwarded to the master) and through the master.
    let (_cb, chb) = channel_on(&b).await;
    chb.confirm_select(Default::default())
        .await
        .expect("confirms");
    cha.confirm_select(Default::default())
        .await
        .expect("confirms");
    publish_persistent(&chb, "jobs", "b", 150).await;
    publish_persistent(&cha, "jobs", "a", 150).await;
    let secret = root.path().join("secret-cookie-pw");
    drop((_ca, cha, _cb, chb));
    BrokerProc::kill9_together(vec![a.proc, b.proc]).await;

    // b first: with the witness a majority; a stays down.
    let b = start("b@pw", &root.path().join("b"), &secret, None).await;
    eventually_within(
        "b promoted while a is down",
        std::time::Duration::from_secs(20),
        || async { queue_info(&b, "jobs").await["node"] == "b@pw" },
    )
    .await;
    // The placement is committed before b has applied it (its proxy answers until then).
    let (_cb, chb) = channel_on(&b).await;
    let mut ready = None;
    for _ in 0..100 {
        ready = try_ready(&b, "jobs").await;
        if ready == Some(300) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if ready != Some(300) {
        dump_logs(&[&b, &w]);
    }
    assert_eq!(
        ready,
        Some(300),
        "the promoted copy lacks confirmed messages"
    );

    // The old master returns: it follows b now, and nothing comes back twice.
    let a = start("a@pw", &root.path().join("a"), &secret, None).await;
    eventually("a a mirror of b", || async {
        queue_info(&b, "jobs").await["slave_nodes"] == json!(["a@pw"])
    })
    .await;
    let (_ca, cha) = channel_on(&a).await;
    // Counts on a proxy follow the master's within a poll.
    eventually("300 ready through a", || async {
        ready_on(&cha, "jobs").await == 300
    })
    .await;
    let (seen, _) = drain(&cha, "jobs", 300).await;
    let want: std::collections::BTreeSet<String> = (0..150)
        .flat_map(|i| [format!("a{i}"), format!("b{i}")])
        .collect();
    assert_eq!(seen, want, "every confirmed message, once each");
    assert_eq!(ready_on(&chb, "jobs").await, 0);
    drop(w);
}

/// A node restarted from its data dir must not refuse to start over a stored binding to a
/// queue the cluster state makes (the queue is not declared from the stored definitions, so the
/// binding could not be either): it starts, and the binding routes through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mirror_keeps_the_bindings_of_cluster_queues() {
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, w) = pair_with_witness(root.path(), "rb").await;
    a.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    )
    .await;
    let (_ca, cha) = channel_on(&a).await;
    cha.exchange_declare(
        "tasks-ex".into(),
        lapin::ExchangeKind::Direct,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .expect("exchange");
    support::declare_durable(&cha, "tasks").await;
    cha.queue_bind(
        "tasks".into(),
        "tasks-ex".into(),
        "run".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("bind");
    eventually("b in sync", || async {
        queue_info(&a, "tasks").await["synchronised_slave_nodes"] == json!(["b@rb"])
    })
    .await;
    let secret = root.path().join("secret-cookie-rb");
    b.proc.kill9().await;
    let b = start("b@rb", &root.path().join("b"), &secret, None).await;
    eventually("b a mirror again", || async {
        queue_info(&a, "tasks").await["synchronised_slave_nodes"] == json!(["b@rb"])
    })
    .await;
    let (_cb, chb) = channel_on(&b).await;
    chb.confirm_select(Default::default())
        .await
        .expect("confirms");
    assert!(publish_confirmed(&chb, "tasks-ex", "run", b"x", true).await);
    eventually("routed to the queue through b", || async {
        ready_on(&cha, "tasks").await == 1
    })
    .await;
    drop((a, w));
}
