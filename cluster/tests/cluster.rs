//! Multi-node tests in one process: real TCP on 127.0.0.1:0, fast timing.

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use warren_cluster::{Applied, ClusterError, Op};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_bootstrap_join_and_agree_on_order() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start("a@test", dirs[0].path(), &[]).await;
    assert_eq!(voters(&a), 1);
    let b = start("b@test", dirs[1].path(), &[&a]).await;
    let c = start("c@test", dirs[2].path(), &[&b]).await;
    for n in [&a, &b, &c] {
        until(Duration::from_secs(5), "3 voters everywhere", || {
            voters(n) == 3
        })
        .await;
    }
    let mut applied = c.applied();
    // Proposals from every node, interleaved: forwarded to the leader, applied in one order.
    let mut idx = Vec::new();
    for i in 0..30 {
        let n = [&a, &b, &c][i % 3];
        idx.push(
            n.propose(vec![put(&format!("k{i}"), json!(i))])
                .await
                .unwrap(),
        );
        // Returned only once applied on the proposer.
        assert_eq!(get(n, &format!("k{i}")), Some(json!(i)));
    }
    assert!(idx.windows(2).all(|w| w[0] < w[1]), "{idx:?}");
    let last = *idx.last().unwrap();
    for n in [&a, &b, &c] {
        until(Duration::from_secs(5), "applied everywhere", || {
            n.state().borrow().last_applied >= last
        })
        .await;
    }
    let kv = |n: &warren_cluster::Cluster| n.state().borrow().kv.clone();
    assert_eq!(kv(&a), kv(&b));
    assert_eq!(kv(&a), kv(&c));
    // The applied stream on c saw the batches in log order.
    let mut seen = Vec::new();
    while seen.len() < 30 {
        if let Applied::Batch { index, .. } = applied.recv().await.unwrap() {
            seen.push(index);
        }
    }
    assert_eq!(seen, idx);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_version_conflicts_apply_nothing() {
    init_tracing();
    let d = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = start("a@cv", d.path(), &[]).await;
    let b = start("b@cv", d2.path(), &[&a]).await;
    let v1 = b
        .propose(vec![
            Op::CheckVersion {
                key: "queue/q".into(),
                version: 0,
            },
            put("queue/q", json!({"master": "a"})),
        ])
        .await
        .unwrap();
    assert_eq!(b.state().borrow().version("queue/q"), v1);
    // A second create-if-absent conflicts.
    let err = b
        .propose(vec![
            Op::CheckVersion {
                key: "queue/q".into(),
                version: 0,
            },
            put("queue/q", json!({"master": "b"})),
            put("other", json!(1)),
        ])
        .await
        .unwrap_err();
    match err {
        ClusterError::Conflict {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!((key.as_str(), expected, found), ("queue/q", 0, v1));
        }
        e => panic!("expected a conflict, got {e}"),
    }
    assert_eq!(get(&b, "other"), None);
    // A promotion guarded by the right version goes through.
    let v2 = a
        .propose(vec![
            Op::CheckVersion {
                key: "queue/q".into(),
                version: v1,
            },
            put("queue/q", json!({"master": "b"})),
        ])
        .await
        .unwrap();
    assert!(v2 > v1);
    assert_eq!(get(&a, "queue/q"), Some(json!({"master": "b"})));
    a.shutdown().await;
    b.shutdown().await;
}
