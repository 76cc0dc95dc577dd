//! Two voters without a witness: `ignore` (the survivor carries on alone and the other rejoins
//! under it) and `pause_minority` (nobody commits alone), plus forget and leave.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod support;

use std::time::Duration;

use serde_json::json;
use support::*;
use warren_cluster::{Cluster, ClusterError, PartitionHandling, Timing};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_mode_survivor_goes_on_and_the_dead_node_rejoins_under_it() {
    init_tracing();
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let a = start("a@ig", da.path(), &[]).await;
    let b = start("b@ig", db.path(), &[&a]).await;
    a.propose(vec![put("both", json!(1))]).await.unwrap();
    until(Duration::from_secs(5), "b has both", || {
        get(&b, "both").is_some()
    })
    .await;
    // b dies; a was in contact with it, so after failure_detection it goes on alone.
    b.shutdown().await;
    drop(b);
    a.propose(vec![put("alone", json!(2))]).await.unwrap();
    let st = a.state().borrow().clone();
    assert_eq!(st.voters().count(), 1);
    assert!(st.evicted.contains_key(&warren_cluster::node_id_of("b@ig")));
    for i in 0..10 {
        a.propose(vec![put(&format!("k{i}"), json!(i))])
            .await
            .unwrap();
    }
    // b comes back with its (now divergent) data: told it was evicted, it rejoins under a.
    let b = Cluster::start(config("b@ig", db.path())).await.unwrap();
    until(Duration::from_secs(10), "b reports it rejoined", || {
        b.rejoined()
    })
    .await;
    until(Duration::from_secs(5), "b caught up", || {
        get(&b, "k9").is_some()
    })
    .await;
    assert_eq!(get(&b, "alone"), Some(json!(2)));
    until(Duration::from_secs(5), "two voters again", || {
        voters(&a) == 2 && voters(&b) == 2
    })
    .await;
    assert!(a.state().borrow().evicted.is_empty());
    // Both commit again, from either side.
    b.propose(vec![put("together", json!(3))]).await.unwrap();
    until(Duration::from_secs(5), "a sees it", || {
        get(&a, "together").is_some()
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_minority_two_voters_cannot_commit_alone() {
    init_tracing();
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let cfg = |name: &str, dir: &std::path::Path| {
        let mut c = config(name, dir);
        c.partition_handling = PartitionHandling::PauseMinority;
        c.timing = Timing {
            propose_timeout: Duration::from_millis(1500),
            ..Timing::fast()
        };
        c
    };
    let a = Cluster::start(cfg("a@pm", da.path())).await.unwrap();
    let mut bc = cfg("b@pm", db.path());
    bc.join = vec![a.advertised_addr().to_string()];
    let b = Cluster::start(bc).await.unwrap();
    until(Duration::from_secs(5), "quorum", || a.has_quorum()).await;
    b.shutdown().await;
    until(Duration::from_secs(5), "a loses quorum", || !a.has_quorum()).await;
    let err = a.propose(vec![put("x", json!(1))]).await.unwrap_err();
    assert!(matches!(err, ClusterError::Timeout(_)), "{err}");
    assert_eq!(voters(&a), 2, "no membership change in pause_minority");
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_and_leave_shrink_the_membership() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start("a@fl", dirs[0].path(), &[]).await;
    let b = start("b@fl", dirs[1].path(), &[&a]).await;
    let c = start("c@fl", dirs[2].path(), &[&a]).await;
    until(Duration::from_secs(5), "3 voters", || voters(&a) == 3).await;
    // forget_cluster_node of a stopped node, from a node that is not necessarily the leader.
    c.shutdown().await;
    drop(c);
    assert!(matches!(
        a.forget("nobody@fl").await,
        Err(ClusterError::UnknownNode(_))
    ));
    assert!(
        a.forget("a@fl").await.is_err(),
        "a node cannot forget itself"
    );
    b.forget("c@fl").await.unwrap();
    until(Duration::from_secs(5), "2 voters", || {
        voters(&a) == 2 && voters(&b) == 2
    })
    .await;
    let c_id = warren_cluster::node_id_of("c@fl");
    assert_eq!(
        a.state().borrow().evicted.get(&c_id).map(|e| e.reason),
        Some(warren_cluster::EvictReason::Forgotten)
    );
    // The forgotten node, started again with its data, is told and stays out.
    let c = Cluster::start(config("c@fl", dirs[2].path()))
        .await
        .unwrap();
    until(Duration::from_secs(5), "c told it was removed", || {
        c.removed() == Some(warren_cluster::EvictReason::Forgotten)
    })
    .await;
    assert_eq!(voters(&a), 2);
    c.shutdown().await;
    // b leaves cleanly: removed, shut down, its raft data deleted.
    b.leave().await.unwrap();
    assert!(
        !dirs[1].path().join("log").exists(),
        "leave deletes the raft data"
    );
    until(Duration::from_secs(5), "1 voter", || voters(&a) == 1).await;
    assert_eq!(
        a.state()
            .borrow()
            .evicted
            .get(&b.node_id())
            .map(|e| e.reason),
        Some(warren_cluster::EvictReason::Left)
    );
    a.propose(vec![put("alone", json!(true))]).await.unwrap();
    a.shutdown().await;
}
