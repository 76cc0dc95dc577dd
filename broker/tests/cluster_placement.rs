//! Where a clustered queue's master goes and when it moves (real broker processes on
//! loopback): `x-queue-master-locator` / `queue-master-locator` (client-local, min-masters,
//! random) for new queues, and `ha-promote-on-shutdown` for a master stopped on purpose, as
//! against `ha-promote-on-failure` for one that fails.

mod support;

use lapin::types::{AMQPValue, FieldTable};
use serde_json::json;
use std::time::Duration;
use support::cluster::*;

async fn declare_with_locator(ch: &lapin::Channel, name: &str, locator: Option<&str>) {
    let mut args = FieldTable::default();
    if let Some(l) = locator {
        args.insert(
            "x-queue-master-locator".into(),
            AMQPValue::LongString(l.into()),
        );
    }
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare");
}

async fn master_of(n: &Node, name: &str) -> String {
    queue_info(n, name).await["node"]
        .as_str()
        .expect("a master")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_queues_go_where_their_master_locator_says() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-loc");
    let a = start("a@loc", &root.path().join("a"), &secret, None).await;
    let b = start("b@loc", &root.path().join("b"), &secret, Some(&a.cluster())).await;
    let c = start("c@loc", &root.path().join("c"), &secret, Some(&a.cluster())).await;
    voters(&a, 3).await;
    eventually("every member running", || async {
        names(&a.get("/api/nodes").await)
            .iter()
            .all(|(_, running)| *running)
    })
    .await;
    let (_ca, cha) = channel_on(&a).await;

    // min-masters, all declared through a: each goes to the node with the fewest masters.
    for (q, want) in [("mm1", "a@loc"), ("mm2", "b@loc"), ("mm3", "c@loc")] {
        declare_with_locator(&cha, q, Some("min-masters")).await;
        assert_eq!(master_of(&a, q).await, want, "{q}");
    }
    // The same through a policy (the argument wins where both are set).
    a.put(
        "/api/policies/%2F/spread",
        json!({"pattern": "^pol\\.", "definition": {"queue-master-locator": "min-masters"}}),
    )
    .await;
    declare_with_locator(&cha, "pol.1", None).await;
    assert_eq!(master_of(&a, "pol.1").await, "a@loc");
    declare_with_locator(&cha, "pol.2", None).await;
    assert_eq!(master_of(&a, "pol.2").await, "b@loc");
    declare_with_locator(&cha, "pol.3", Some("client-local")).await;
    assert_eq!(master_of(&a, "pol.3").await, "a@loc");
    // client-local, the default: the node the declare arrived on.
    let (_cc, chc) = channel_on(&c).await;
    declare_with_locator(&chc, "local", None).await;
    assert_eq!(master_of(&a, "local").await, "c@loc");
    // random: running data nodes only, and not always the same one.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..12 {
        let q = format!("rnd{i}");
        declare_with_locator(&cha, &q, Some("random")).await;
        seen.insert(master_of(&a, &q).await);
    }
    assert!(seen.len() >= 2, "12 random placements all on {seen:?}");
    assert!(seen
        .iter()
        .all(|n| ["a@loc", "b@loc", "c@loc"].contains(&n.as_str())));
    // A queue placed elsewhere serves through the node it was declared on.
    cha.confirm_select(Default::default())
        .await
        .expect("confirms");
    assert!(publish_confirmed(&cha, "", "mm2", b"hello", true).await);
    let got = cha
        .basic_get(
            "mm2".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"hello");
    // An unknown locator is refused as RabbitMQ refuses it.
    let (_cx, chx) = channel_on(&b).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-master-locator".into(),
        AMQPValue::LongString("nearest".into()),
    );
    let err = chx
        .queue_declare("bad".into(), Default::default(), args)
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");
}

/// Two nodes and a witness; a queue on a with a backlog that b, a mirror by a manual-sync
/// policy set afterwards, does not have.
async fn unsynced_pair(
    root: &std::path::Path,
    tag: &str,
    definition: serde_json::Value,
) -> (Node, Node, Node) {
    let (a, b, w) = pair_with_witness(root, tag).await;
    let (_ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "jobs").await;
    cha.confirm_select(Default::default())
        .await
        .expect("confirms");
    for i in 0..5 {
        assert!(publish_confirmed(&cha, "", "jobs", format!("j{i}").as_bytes(), true).await);
    }
    a.put(
        "/api/policies/%2F/ha",
        json!({"pattern": "", "definition": definition}),
    )
    .await;
    eventually("b mirrors jobs, out of sync", || async {
        let q = queue_info(&a, "jobs").await;
        q["slave_nodes"] == json!([format!("b@{tag}")])
            && q["synchronised_slave_nodes"] == json!([])
    })
    .await;
    (a, b, w)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_stopped_on_purpose_fails_over_by_ha_promote_on_shutdown() {
    // when-synced on shutdown (the default), always on failure: a stop does not move the
    // queue to the unsynchronised mirror; the master's return brings it back whole.
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, _w) = unsynced_pair(
        root.path(),
        "sd",
        json!({"ha-mode": "all", "ha-sync-mode": "manual", "ha-promote-on-failure": "always"}),
    )
    .await;
    a.proc.term().await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        master_of(&b, "jobs").await,
        "a@sd",
        "a stopped on purpose: no promotion of an unsynchronised mirror"
    );
    let secret = secret_file(root.path(), "cookie-sd");
    let a = start("a@sd", &root.path().join("a"), &secret, None).await;
    let (_ca, cha) = channel_on(&a).await;
    eventually("jobs whole on a again", || async {
        ready_on(&cha, "jobs").await == 5
    })
    .await;
    // Now with ha-promote-on-shutdown always: the same stop moves the queue to b.
    a.put(
        "/api/policies/%2F/ha",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "manual",
            "ha-promote-on-shutdown": "always"}}),
    )
    .await;
    eventually("b mirrors jobs again", || async {
        queue_info(&a, "jobs").await["slave_nodes"] == json!(["b@sd"])
    })
    .await;
    a.proc.term().await;
    eventually("b promoted on a's stop", || async {
        master_of(&b, "jobs").await == "b@sd"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_that_fails_fails_over_by_ha_promote_on_failure_not_on_shutdown() {
    // always on shutdown, when-synced on failure (the default): a kill does not move the
    // queue to the unsynchronised mirror.
    let root = tempfile::tempdir().expect("tmp");
    let (a, b, _w) = unsynced_pair(
        root.path(),
        "fl",
        json!({"ha-mode": "all", "ha-sync-mode": "manual", "ha-promote-on-shutdown": "always"}),
    )
    .await;
    a.proc.kill9().await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(master_of(&b, "jobs").await, "a@fl");
}
