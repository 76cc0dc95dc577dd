//! Multi-node tests in one process: real TCP on 127.0.0.1:0, fast timing.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

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

/// Nodes a, b and c (`a@tag`...) in `dirs`, b and c joined through a.
async fn three(
    tag: &str,
    dirs: &[tempfile::TempDir],
) -> (
    warren_cluster::Cluster,
    warren_cluster::Cluster,
    warren_cluster::Cluster,
) {
    let a = start(&format!("a@{tag}"), dirs[0].path(), &[]).await;
    let b = start(&format!("b@{tag}"), dirs[1].path(), &[&a]).await;
    let c = start(&format!("c@{tag}"), dirs[2].path(), &[&a]).await;
    (a, b, c)
}

/// The node among `nodes` that leads, once all agree on one.
async fn leader_of<'a>(nodes: &[&'a warren_cluster::Cluster]) -> &'a warren_cluster::Cluster {
    let mut found = None;
    until(Duration::from_secs(5), "an agreed leader", || {
        let ls: Vec<_> = nodes.iter().map(|n| n.leader()).collect();
        match ls[0] {
            Some(l) if ls.iter().all(|x| *x == Some(l)) => {
                found = nodes.iter().find(|n| n.node_id() == l).copied();
                found.is_some()
            }
            _ => false,
        }
    })
    .await;
    found.expect("leader")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_new_leader_keeps_every_committed_op() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three("lk", &dirs).await;
    let all = [&a, &b, &c];
    let old = leader_of(&all).await;
    let others: Vec<_> = all
        .iter()
        .copied()
        .filter(|n| n.node_id() != old.node_id())
        .collect();
    for i in 0..20 {
        others[i % 2]
            .propose(vec![put(&format!("before{i}"), json!(i))])
            .await
            .unwrap();
    }
    old.shutdown().await;
    // The survivors elect a new leader and go on.
    for i in 0..20 {
        others[i % 2]
            .propose(vec![put(&format!("after{i}"), json!(i))])
            .await
            .unwrap();
    }
    let new = leader_of(&others).await;
    assert_ne!(new.node_id(), old.node_id());
    for n in &others {
        until(Duration::from_secs(5), "all ops applied", || {
            let st = n.state().borrow().clone();
            (0..20).all(|i| {
                st.get(&format!("before{i}")).is_some() && st.get(&format!("after{i}")).is_some()
            })
        })
        .await;
    }
    for n in others {
        n.shutdown().await;
    }
}

/// openraft's voters refuse a new leader for a lease (1.2 election timeouts) after their
/// leader's last heartbeat. When the leader's process is known gone (its address refuses a
/// connection), every node replaces it at once by itself (`elect_if_leader_gone`): here the
/// lease is 3.6 s and openraft alone would elect after 6.6-7.2 s; the survivors must agree on a
/// new leader, and commit through it, within 2 s of the shutdown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_leader_is_replaced_before_its_lease_runs_out() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let cfg = |name: &str, dir: &std::path::Path| {
        let mut c = config(name, dir);
        c.timing.election_timeout = Duration::from_secs(3);
        c
    };
    let a = start_with(cfg("a@dl", dirs[0].path()), &[]).await;
    let b = start_with(cfg("b@dl", dirs[1].path()), &[&a]).await;
    let c = start_with(cfg("c@dl", dirs[2].path()), &[&a]).await;
    let all = [&a, &b, &c];
    for n in all {
        until(
            Duration::from_secs(10),
            "3 running voters everywhere",
            || n.members().iter().filter(|m| m.voter && m.running).count() == 3,
        )
        .await;
    }
    let old = leader_of(&all).await;
    let old_id = old.node_id();
    let others: Vec<warren_cluster::Cluster> = all
        .iter()
        .filter(|n| n.node_id() != old_id)
        .map(|n| (*n).clone())
        .collect();
    let killed = tokio::time::Instant::now();
    old.shutdown().await;
    until(
        Duration::from_secs(2),
        "a new leader on both survivors",
        || {
            others.iter().all(|n| {
                n.leader().is_some_and(|l| l != old_id) && n.leader() == others[0].leader()
            })
        },
    )
    .await;
    tokio::time::timeout(
        Duration::from_secs(2).saturating_sub(killed.elapsed()),
        others[1].propose(vec![put("after", json!(1))]),
    )
    .await
    .expect("a commit through the new leader within 2 s")
    .unwrap();
    for n in others {
        n.shutdown().await;
    }
}

/// A leader that commits an entry and exits at once may leave the survivors holding that entry
/// without knowing it is committed; the new leader learns it when its own term's first entry
/// commits. `leads_with_current_state` answers true only once that is applied: then the state
/// holds the old leader's last entry (the broker's stopping mark, on which promotions depend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_decides_on_a_state_with_its_predecessors_last_entry() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three("cs", &dirs).await;
    let all = [&a, &b, &c];
    let old = leader_of(&all).await;
    let old_id = old.node_id();
    let others: Vec<warren_cluster::Cluster> = all
        .iter()
        .filter(|n| n.node_id() != old_id)
        .map(|n| (*n).clone())
        .collect();
    assert!(
        !others[0]
            .leads_with_current_state(Duration::from_millis(50))
            .await,
        "a follower does not lead"
    );
    old.propose(vec![put("last-words", json!(1))])
        .await
        .unwrap();
    old.shutdown().await;
    let new = leader_of(&others.iter().collect::<Vec<_>>()).await;
    assert!(
        new.leads_with_current_state(Duration::from_secs(2)).await,
        "the new leader's own entry applies"
    );
    assert!(
        get(new, "last-words").is_some(),
        "the state a new leader decides on holds what its predecessor committed"
    );
    for n in others {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_from_the_log() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three("rl", &dirs).await;
    a.propose(vec![put("early", json!(1))]).await.unwrap();
    until(Duration::from_secs(5), "c has early", || {
        get(&c, "early").is_some()
    })
    .await;
    c.shutdown().await;
    drop(c);
    for i in 0..30 {
        b.propose(vec![put(&format!("k{i}"), json!(i))])
            .await
            .unwrap();
    }
    // Restart c from its data dir (on a new port: its address is refreshed in the membership).
    let c = warren_cluster::Cluster::start(support::config("c@rl", dirs[2].path()))
        .await
        .unwrap();
    assert_eq!(
        get(&c, "early"),
        Some(json!(1)),
        "its own log is re-applied at start"
    );
    until(Duration::from_secs(10), "c caught up", || {
        get(&c, "k29").is_some()
    })
    .await;
    let addr = c.advertised_addr().to_string();
    until(
        Duration::from_secs(10),
        "c's new address in the membership",
        || {
            a.state()
                .borrow()
                .members
                .get(&c.node_id())
                .is_some_and(|m| m.addr == addr)
        },
    )
    .await;
    // And it takes part again.
    c.propose(vec![put("from-c", json!(true))]).await.unwrap();
    until(Duration::from_secs(5), "a sees from-c", || {
        get(&a, "from-c").is_some()
    })
    .await;
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_far_behind_gets_a_snapshot() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let cfg = |name: &str, i: usize| {
        let mut cfg = support::config(name, dirs[i].path());
        cfg.snapshot = warren_cluster::SnapshotPolicy { every: 10, keep: 0 };
        cfg
    };
    let a = warren_cluster::Cluster::start(cfg("a@sn", 0))
        .await
        .unwrap();
    let join = |mut c: warren_cluster::ClusterConfig| {
        c.join = vec![a.advertised_addr().to_string()];
        c
    };
    let b = warren_cluster::Cluster::start(join(cfg("b@sn", 1)))
        .await
        .unwrap();
    let c = warren_cluster::Cluster::start(join(cfg("c@sn", 2)))
        .await
        .unwrap();
    c.shutdown().await;
    drop(c);
    for i in 0..60 {
        a.propose(vec![put(&format!("k{i}"), json!(i))])
            .await
            .unwrap();
    }
    a.propose(vec![Op::DeletePrefix {
        prefix: "k1".into(),
    }])
    .await
    .unwrap();
    let c = warren_cluster::Cluster::start(join(cfg("c@sn", 2)))
        .await
        .unwrap();
    let mut applied = c.applied();
    until(Duration::from_secs(10), "c caught up", || {
        get(&c, "k59").is_some() && get(&c, "k15").is_none()
    })
    .await;
    // The leader had purged its log: c could only have caught up through a snapshot.
    let mut reset = false;
    while let Ok(ev) = applied.try_recv() {
        reset |= matches!(
            ev,
            Applied::Reset {
                reason: warren_cluster::ResetReason::Snapshot,
                ..
            }
        );
    }
    assert!(reset, "an installed snapshot was reported");
    assert!(dirs[2].path().join("snapshot").exists());
    assert_eq!(a.state().borrow().kv, c.state().borrow().kv);
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn witness_counts_for_quorum() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let a = start("a@wq", dirs[0].path(), &[]).await;
    let b = start("b@wq", dirs[1].path(), &[&a]).await;
    let mut wcfg = support::config("w@wq", dirs[2].path());
    wcfg.witness = true;
    wcfg.join = vec![a.advertised_addr().to_string()];
    let w = warren_cluster::Cluster::start(wcfg).await.unwrap();
    until(Duration::from_secs(5), "3 voters", || voters(&a) == 3).await;
    let st = a.state().borrow().clone();
    assert!(st.members[&w.node_id()].witness && st.members[&w.node_id()].voter);
    assert!(!st.members[&b.node_id()].witness);
    // Either data node may die: the other one and the witness are a majority.
    a.shutdown().await;
    until(
        Duration::from_secs(5),
        "b has quorum with the witness",
        || b.has_quorum(),
    )
    .await;
    b.propose(vec![put("after-a", json!(1))]).await.unwrap();
    until(Duration::from_secs(5), "w applied", || {
        get(&w, "after-a").is_some()
    })
    .await;
    let running: Vec<_> = b
        .members()
        .into_iter()
        .filter(|m| m.running)
        .map(|m| m.name)
        .collect();
    assert_eq!(running.len(), 2, "{running:?}");
    b.shutdown().await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_node_loses_quorum_and_catches_up_when_healed() {
    init_tracing();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (a, b, c) = three("cq", &dirs).await;
    let mut events = c.peer_events();
    for n in [&a, &b, &c] {
        until(Duration::from_secs(5), "quorum", || n.has_quorum()).await;
    }
    c.set_partition(&[a.node_id(), b.node_id()]);
    until(Duration::from_secs(5), "c loses quorum", || !c.has_quorum()).await;
    assert!(a.has_quorum() && b.has_quorum());
    a.propose(vec![put("majority", json!(1))]).await.unwrap();
    // c cannot commit.
    let mut lost = false;
    until_async(Duration::from_secs(5), "QuorumLost event", || {
        while let Ok(ev) = events.try_recv() {
            lost |= ev == warren_cluster::PeerEvent::QuorumLost;
        }
        std::future::ready(lost)
    })
    .await;
    assert!(get(&c, "majority").is_none());
    c.set_partition(&[]);
    until(Duration::from_secs(5), "c regains quorum", || {
        c.has_quorum()
    })
    .await;
    until(Duration::from_secs(5), "c catches up", || {
        get(&c, "majority").is_some()
    })
    .await;
    for n in [a, b, c] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_messages_are_ordered_per_channel() {
    init_tracing();
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let a = start("a@app", d1.path(), &[]).await;
    let b = start("b@app", d2.path(), &[&a]).await;
    let mut ch1 = b.subscribe_app(1);
    let mut ch2 = b.subscribe_app(2);
    let n = 2000u32;
    for i in 0..n {
        a.send(
            b.node_id(),
            1 + (i % 2) as u8,
            bytes::Bytes::from(i.to_be_bytes().to_vec()),
        )
        .unwrap();
    }
    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    while got1.len() + got2.len() < n as usize {
        let m = tokio::select! {
            Some(m) = ch1.recv() => m,
            Some(m) = ch2.recv() => m,
        };
        assert_eq!(m.from, a.node_id());
        let v = u32::from_be_bytes(m.payload[..].try_into().unwrap());
        if m.channel == 1 {
            got1.push(v)
        } else {
            got2.push(v)
        }
    }
    assert_eq!(got1, (0..n).filter(|i| i % 2 == 0).collect::<Vec<_>>());
    assert_eq!(got2, (0..n).filter(|i| i % 2 == 1).collect::<Vec<_>>());
    // Back the other way too.
    let mut back = a.subscribe_app(7);
    b.send(a.node_id(), 7, bytes::Bytes::from_static(b"pong"))
        .unwrap();
    assert_eq!(&back.recv().await.unwrap().payload[..], b"pong");
    // Unknown peers and oversized payloads are refused at once.
    assert!(a.send(12345, 1, bytes::Bytes::new()).is_err());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_started_together_from_one_seed_list_form_one_cluster() {
    init_tracing();
    // Three free loopback ports, released for the nodes to bind (as a headless service's
    // peers would be listed before any of them runs).
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        addrs.push(l.local_addr().unwrap());
    }
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    // Seeds by name and by address: "localhost" resolves like a DNS seed would.
    let seeds: Vec<String> = addrs
        .iter()
        .map(|a| format!("localhost:{}", a.port()))
        .collect();
    let cfg = |i: usize| {
        let mut c = support::config(&format!("n{i}@together"), dirs[i].path());
        c.listen = vec![addrs[i]];
        c.join = seeds.clone();
        c
    };
    let (x, y, z) = tokio::join!(
        warren_cluster::Cluster::start(cfg(0)),
        warren_cluster::Cluster::start(cfg(1)),
        warren_cluster::Cluster::start(cfg(2)),
    );
    let nodes = [x.unwrap(), y.unwrap(), z.unwrap()];
    for n in &nodes {
        until(Duration::from_secs(10), "one 3-voter cluster", || {
            voters(n) == 3
        })
        .await;
    }
    nodes[2].propose(vec![put("one", json!(1))]).await.unwrap();
    for n in &nodes {
        until(Duration::from_secs(5), "applied", || {
            get(n, "one").is_some()
        })
        .await;
    }
    for n in nodes {
        n.shutdown().await;
    }
}
