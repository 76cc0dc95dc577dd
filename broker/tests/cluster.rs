//! Clustered warren-broker processes on loopback: nodes that join share their vhosts, users,
//! permissions and policies; a change made on any node is seen and enforced on every other;
//! a node killed with SIGKILL catches up when it restarts; a node with the wrong secret is
//! refused and says why; /api/nodes lists every member; join_cluster and forget_cluster_node
//! as warren-ctl calls them; pause_minority; two nodes and a witness.

mod support;

use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use support::cluster::*;
use support::http::http;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_made_on_any_node_hold_on_every_node_and_survive_a_kill() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "s3cret-cookie");
    let dirs: Vec<_> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            let d = root.path().join(n);
            std::fs::create_dir_all(&d).expect("dir");
            d
        })
        .collect();
    let a = start("a@test", &dirs[0], &secret, None).await;
    let b = start("b@test", &dirs[1], &secret, Some(&a.cluster())).await;
    let c = start("c@test", &dirs[2], &secret, Some(&a.cluster())).await;
    assert!(a
        .proc
        .logged("seeded the cluster with this node's definitions"));
    assert!(!b.proc.logged("seeded the cluster"));

    // Every node lists every member, running (once its links are up), and names the cluster
    // after its first node.
    let all = vec![
        ("a@test".to_owned(), true),
        ("b@test".to_owned(), true),
        ("c@test".to_owned(), true),
    ];
    for n in [&a, &b, &c] {
        eventually(
            &format!("{} lists every member running", n.name),
            || async { names(&n.get("/api/nodes").await) == all },
        )
        .await;
        assert_eq!(n.get("/api/overview").await["cluster_name"], "a@test");
    }

    // Made on b: a vhost, a user, permissions, a policy. b reads its own writes at once.
    b.put("/api/vhosts/apps", json!({})).await;
    b.put(
        "/api/users/bob",
        json!({"password": "bob-pw", "tags": "management"}),
    )
    .await;
    b.put(
        "/api/permissions/apps/bob",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    b.put(
        "/api/policies/apps/cap",
        json!({"pattern": "^capped", "apply-to": "queues", "definition": {"max-length": 3}}),
    )
    .await;
    assert_eq!(b.get("/api/users/bob").await["tags"], json!(["management"]));

    // The others see them and enforce them: bob logs in on c, the policy caps a queue on a.
    for n in [&a, &c] {
        for path in ["/api/permissions/apps/bob", "/api/policies/apps/cap"] {
            eventually(&format!("{path} on {}", n.name), || async {
                let r = http(n.mgmt(), "GET", path, Some(("guest", "guest")), None).await;
                r.status == 200
            })
            .await;
        }
        assert_eq!(
            n.get("/api/policies/apps/cap").await["definition"]["max-length"],
            3
        );
    }
    amqp_login(&c, "bob", "bob-pw", "apps")
        .await
        .expect("bob logs in on c");
    assert!(amqp_login(&c, "bob", "wrong", "apps").await.is_err());
    {
        let uri = format!("amqp://bob:bob-pw@{}/apps", a.proc.addr("amqp"));
        let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .expect("bob on a");
        let ch = conn.create_channel().await.expect("channel");
        support::declare(&ch, "capped-1", Default::default()).await;
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
        for i in 0..10 {
            assert!(
                publish_confirmed(&ch, "", "capped-1", format!("m{i}").as_bytes(), false).await
            );
        }
        assert_eq!(
            ready_on(&ch, "capped-1").await,
            3,
            "b's policy caps a's queue"
        );
        let _ = conn.close(200, "bye".into()).await;
    }

    // c is killed; meanwhile bob is deleted and a vhost added on a.
    voters(&a, 3).await;
    let c_name = c.name.clone();
    c.proc.kill9().await;
    eventually("a sees c down", || async {
        names(&a.get("/api/nodes").await).contains(&(c_name.clone(), false))
    })
    .await;
    assert_eq!(a.delete("/api/users/bob").await, 204);
    a.put(
        "/api/vhosts/late",
        json!({"description": "made while c was away"}),
    )
    .await;

    // c restarts from its data dir (no --join) and catches up before it serves clients.
    let c = start("c@test", &dirs[2], &secret, None).await;
    assert_eq!(
        c.get("/api/vhosts/late").await["description"],
        "made while c was away"
    );
    let r = http(
        c.mgmt(),
        "GET",
        "/api/users/bob",
        Some(("guest", "guest")),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "bob was deleted while c was away");
    assert!(amqp_login(&c, "bob", "bob-pw", "apps").await.is_err());
    eventually("every node running again", || async {
        names(&b.get("/api/nodes").await).iter().all(|(_, r)| *r)
    })
    .await;

    // A node of another cluster (another secret) is refused, and both sides say why.
    let other_secret = secret_file(root.path(), "not-the-cookie");
    let d_dir = root.path().join("d");
    let d = tokio::spawn({
        let a_cluster = a.cluster();
        async move {
            let mut args: Vec<String> = vec![
                "--node-name".into(),
                "d@test".into(),
                "--data-dir".into(),
                d_dir.display().to_string(),
                "--amqp".into(),
                "127.0.0.1:0".into(),
                "--cluster-listen".into(),
                "127.0.0.1:0".into(),
                "--cluster-secret-file".into(),
                other_secret.display().to_string(),
                "--join".into(),
                a_cluster,
            ];
            args.extend(["--cluster-failure-detection-ms".into(), FD_MS.into()]);
            tokio::process::Command::new(env!("CARGO_BIN_EXE_warren-broker"))
                .args(&args)
                .env("RUST_LOG", "info")
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn d")
        }
    })
    .await
    .expect("spawn task");
    eventually("a refuses d's secret", || async {
        a.proc.logged("peer presented a wrong cluster secret")
    })
    .await;
    drop(d);
    assert_eq!(names(&a.get("/api/nodes").await).len(), 3);
    for l in a.proc.log.lock().iter() {
        assert!(
            !l.contains("s3cret-cookie") && !l.contains("not-the-cookie"),
            "{l}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_definition_changes_are_refused_with_503_and_nothing_changes() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie");
    let da = root.path().join("a");
    let db = root.path().join("b");
    let dc = root.path().join("c");
    let a = start("a@q", &da, &secret, None).await;
    let b = start("b@q", &db, &secret, Some(&a.cluster())).await;
    let c = start("c@q", &dc, &secret, Some(&a.cluster())).await;
    // Three voters first: with two (c still a learner) a would carry on alone when b dies,
    // as partition handling `ignore` does.
    voters(&a, 3).await;
    let lost_before = a.proc.log_count("cluster quorum lost");
    b.proc.kill9().await;
    c.proc.kill9().await;
    // The node knows it lost its majority once the others missed their pings for the lease.
    eventually("a says it lost its quorum", || async {
        a.proc.log_count("cluster quorum lost") > lost_before
    })
    .await;
    let t0 = tokio::time::Instant::now();
    let r = http(
        a.mgmt(),
        "PUT",
        "/api/vhosts/orphan",
        Some(("guest", "guest")),
        Some(json!({})),
    )
    .await;
    assert!(t0.elapsed() < Duration::from_secs(2), "refused at once");
    assert!(t0.elapsed() < Duration::from_secs(2), "refused at once");
    assert_eq!(r.status, 503, "{}", r.text());
    let r = http(
        a.mgmt(),
        "GET",
        "/api/vhosts/orphan",
        Some(("guest", "guest")),
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    // Reads still answer from what this node has.
    assert_eq!(a.get("/api/users/guest").await["name"], "guest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_cluster_and_forget_cluster_node_as_warren_ctl_calls_them() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-j");
    let a = start("a@j", &root.path().join("a"), &secret, None).await;
    // b runs as a cluster of its own first, with a user a does not have.
    let b = start("b@j", &root.path().join("b"), &secret, None).await;
    a.put("/api/users/from-a", json!({"password": "x", "tags": ""}))
        .await;
    b.put("/api/users/b-only", json!({"password": "y", "tags": ""}))
        .await;
    let join = |n: &Node| {
        let mgmt = n.mgmt();
        let seed = a.cluster();
        async move {
            http(
                mgmt,
                "POST",
                "/api/warren/cluster/join",
                Some(("guest", "guest")),
                Some(json!({ "node": seed })),
            )
            .await
        }
    };
    // As RabbitMQ: the application must be stopped first.
    join(&b).await.bad_request("stop_app");
    b.put("/api/warren/app", json!({"running": false})).await;
    let r = join(&b).await;
    assert_eq!(r.status, 204, "{}", r.text());
    b.put("/api/warren/app", json!({"running": true})).await;
    // b now has a's definitions and only those.
    assert_eq!(b.get("/api/users/from-a").await["name"], "from-a");
    let r = http(
        b.mgmt(),
        "GET",
        "/api/users/b-only",
        Some(("guest", "guest")),
        None,
    )
    .await;
    assert_eq!(r.status, 404, "b's own definitions were replaced");
    assert_eq!(b.get("/api/overview").await["cluster_name"], "a@j");
    let c = start("c@j", &root.path().join("c"), &secret, Some(&a.cluster())).await;
    voters(&a, 3).await;

    // forget_cluster_node: a stopped member goes from every node's list.
    c.proc.kill9().await;
    let forget = |path: &'static str| {
        let mgmt = a.mgmt();
        async move { http(mgmt, "DELETE", path, Some(("guest", "guest")), None).await }
    };
    forget("/api/warren/cluster/nodes/a@j")
        .await
        .bad_request("cannot forget itself");
    assert_eq!(
        forget("/api/warren/cluster/nodes/nobody@j").await.status,
        404
    );
    let r = forget("/api/warren/cluster/nodes/c@j").await;
    assert_eq!(r.status, 204, "{}", r.text());
    for n in [&a, &b] {
        eventually(&format!("c gone from {}", n.name), || async {
            names(&n.get("/api/nodes").await)
                == vec![("a@j".to_owned(), true), ("b@j".to_owned(), true)]
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_minority_stops_serving_clients_in_a_minority_and_resumes_with_the_majority() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-p");
    let pm = ["--cluster-partition-handling", "pause_minority"];
    let all = ["amqp", "mgmt", "cluster"];
    let a = start_with("a@p", &root.path().join("a"), &secret, None, &pm, &all).await;
    let b = start_with(
        "b@p",
        &root.path().join("b"),
        &secret,
        Some(&a.cluster()),
        &pm,
        &all,
    )
    .await;
    let c = start_with(
        "c@p",
        &root.path().join("c"),
        &secret,
        Some(&a.cluster()),
        &pm,
        &all,
    )
    .await;
    voters(&a, 3).await;
    let (conn, _ch) = a.proc.connect().await;
    // One node down: a still has a majority and keeps serving.
    c.proc.kill9().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(conn.status().connected(), "a keeps its clients with 2 of 3");
    amqp_login(&a, "guest", "guest", "/")
        .await
        .expect("a serves with 2 of 3");
    // Two down: a is a minority of one; its clients are closed, new ones refused.
    b.proc.kill9().await;
    eventually("a closes its client", || async {
        !conn.status().connected()
    })
    .await;
    // Logged before the close, but read from a's output by another task.
    eventually("a logs that it is in a minority", || async {
        a.proc.logged("this node is in a minority")
    })
    .await;
    assert!(amqp_login(&a, "guest", "guest", "/").await.is_err());
    assert_eq!(a.get("/api/warren/app").await["paused_by_partition"], true);
    // b comes back: the majority is back, a serves again.
    let _b = start_with("b@p", &root.path().join("b"), &secret, None, &pm, &all).await;
    eventually("a serves again", || async {
        amqp_login(&a, "guest", "guest", "/").await.is_ok()
    })
    .await;
    assert_eq!(a.get("/api/warren/app").await["paused_by_partition"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_and_a_witness_keep_a_majority_when_either_node_dies() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-w");
    let a = start("a@w", &root.path().join("a"), &secret, None).await;
    let b = start("b@w", &root.path().join("b"), &secret, Some(&a.cluster())).await;
    // The witness serves no clients: only its cluster (and management) listeners.
    let w = start_with(
        "w@w",
        &root.path().join("w"),
        &secret,
        Some(&a.cluster()),
        &["--witness"],
        &["mgmt", "cluster"],
    )
    .await;
    assert!(
        !w.proc.logged("proto=amqp"),
        "a witness binds no AMQP listener"
    );
    voters(&a, 3).await;
    let nodes = a.get("/api/nodes").await;
    let witness: Vec<_> = nodes
        .as_array()
        .expect("array")
        .iter()
        .filter(|n| n["witness"] == true)
        .map(|n| n["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(witness, vec!["w@w".to_owned()]);
    // a dies: b and the witness are a majority, definitions still change, through b.
    a.proc.kill9().await;
    b.put("/api/vhosts/after-a", json!({})).await;
    assert_eq!(w.get("/api/vhosts/after-a").await["name"], "after-a");
    // b dies too after a came back: a and the witness carry on.
    let a = start("a@w", &root.path().join("a"), &secret, None).await;
    eventually("a caught up", || async {
        http(
            a.mgmt(),
            "GET",
            "/api/vhosts/after-a",
            Some(("guest", "guest")),
            None,
        )
        .await
        .status
            == 200
    })
    .await;
    voters(&a, 3).await;
    b.proc.kill9().await;
    a.put("/api/vhosts/after-b", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_queue_declares_publishes_consumes_and_acks_go_to_its_master() {
    use futures_lite::StreamExt;
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-q");
    let a = start("a@q1", &root.path().join("a"), &secret, None).await;
    let b = start("b@q1", &root.path().join("b"), &secret, Some(&a.cluster())).await;
    let c = start("c@q1", &root.path().join("c"), &secret, Some(&a.cluster())).await;
    voters(&a, 3).await;
    let (_ca, cha) = channel_on(&a).await;
    let (_cb, chb) = channel_on(&b).await;
    let (_cc, chc) = channel_on(&c).await;

    // Declared on a (its master); an exchange declared on b, bound on c.
    support::declare(&cha, "tasks", Default::default()).await;
    chb.exchange_declare(
        "jobs".into(),
        lapin::ExchangeKind::Direct,
        Default::default(),
        Default::default(),
    )
    .await
    .expect("exchange on b");
    chc.queue_bind(
        "tasks".into(),
        "jobs".into(),
        "run".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("bind on c");
    // Every node sees the queue, and the management API says where it lives.
    for n in [&a, &b, &c] {
        eventually(&format!("tasks listed on {}", n.name), || async {
            http(
                n.mgmt(),
                "GET",
                "/api/queues/%2F/tasks",
                Some(("guest", "guest")),
                None,
            )
            .await
            .status
                == 200
        })
        .await;
    }

    // Published with confirms on b (through the exchange) and on c (default exchange).
    chb.confirm_select(Default::default())
        .await
        .expect("confirms b");
    chc.confirm_select(Default::default())
        .await
        .expect("confirms c");
    for i in 0..50 {
        let (ch, ex, rk) = if i % 2 == 0 {
            (&chb, "jobs", "run")
        } else {
            (&chc, "", "tasks")
        };
        let body = format!("job-{i}");
        assert!(
            publish_confirmed(ch, ex, rk, body.as_bytes(), true).await,
            "{body} confirmed"
        );
    }
    assert_eq!(
        ready_on(&cha, "tasks").await,
        50,
        "every job is on the master"
    );
    // b's copy follows the master's counts.
    eventually("b shows the master's count", || async {
        ready_on(&chb, "tasks").await == 50
    })
    .await;

    // A basic.get on b, acked; then consumed on c with acks, in order.
    let got = chb
        .basic_get("tasks".into(), Default::default())
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"job-0");
    got.delivery.ack(Default::default()).await.expect("ack get");
    let mut consumer = support::consume(&chc, "tasks", false).await;
    for i in 1..50 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("delivery in time")
            .expect("delivery")
            .expect("ok");
        assert_eq!(d.data, format!("job-{i}").as_bytes());
        d.ack(Default::default()).await.expect("ack");
    }
    eventually("every ack reached the master", || async {
        ready_on(&cha, "tasks").await == 0
            && a.get("/api/queues/%2F/tasks").await["messages_unacknowledged"] == 0
    })
    .await;

    // c's consumer goes (cancelled through c's proxy) ...
    chc.basic_cancel(consumer.tag().as_str().into(), Default::default())
        .await
        .expect("cancel on c");
    eventually("no consumer left on the master", || async {
        a.get("/api/queues/%2F/tasks").await["consumers"] == 0
    })
    .await;
    // ... and unacked deliveries of a consumer whose node dies go back to the queue,
    // redelivered.
    let (_cb2, chb2) = channel_on(&b).await;
    chb2.confirm_select(Default::default())
        .await
        .expect("confirms");
    for i in 0..3 {
        assert!(publish_confirmed(&chb2, "", "tasks", format!("late-{i}").as_bytes(), false).await);
    }
    let mut held = support::consume(&chb2, "tasks", false).await;
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(5), held.next())
            .await
            .expect("delivery in time")
            .expect("delivery")
            .expect("ok");
    }
    b.proc.kill9().await;
    eventually("b's unacked messages back on the master", || async {
        ready_on(&cha, "tasks").await == 3
    })
    .await;
    let got = cha
        .basic_get("tasks".into(), Default::default())
        .await
        .expect("get")
        .expect("a message");
    assert!(
        got.delivery.redelivered,
        "requeued after b died: redelivered"
    );

    // Deleted on c: gone everywhere.
    chc.queue_delete("tasks".into(), Default::default())
        .await
        .expect("delete on c");
    eventually("tasks gone from a", || async {
        http(
            a.mgmt(),
            "GET",
            "/api/queues/%2F/tasks",
            Some(("guest", "guest")),
            None,
        )
        .await
        .status
            == 404
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_all_mirrors_every_queue_and_a_killed_master_loses_no_confirmed_message() {
    use futures_lite::StreamExt;
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-ha");
    let a = start("a@ha", &root.path().join("a"), &secret, None).await;
    let b = start("b@ha", &root.path().join("b"), &secret, Some(&a.cluster())).await;
    let c = start("c@ha", &root.path().join("c"), &secret, Some(&a.cluster())).await;
    voters(&a, 3).await;
    // The seed's policy, as warren-ctl set_policy / rabbitmqadmin send it.
    b.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "apply-to": "queues",
               "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    )
    .await;
    let (_ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "ha").await;
    eventually("b and c in sync", || async {
        let q = queue_info(&c, "ha").await;
        q["node"] == "a@ha" && q["synchronised_slave_nodes"] == json!(["b@ha", "c@ha"])
    })
    .await;
    assert_eq!(queue_info(&a, "ha").await["policy"], "ha-all");

    // 100 persistent messages, confirmed through b (so held by a, b and c).
    let (_cb, chb) = channel_on(&b).await;
    chb.confirm_select(Default::default())
        .await
        .expect("confirms");
    for i in 0..100 {
        let ok = chb
            .basic_publish(
                "".into(),
                "ha".into(),
                Default::default(),
                format!("m{i}").as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        let ok = match tokio::time::timeout(Duration::from_secs(10), ok).await {
            Ok(ok) => ok.expect("confirm"),
            Err(_) => {
                for (n, node) in [("A", &a), ("B", &b), ("C", &c)] {
                    for l in node.proc.log.lock().iter() {
                        eprintln!("{n}: {l}");
                    }
                }
                panic!("confirm of m{i} not in time");
            }
        };
        assert!(ok.is_ack());
    }
    // 10 consumed and acked on c; 5 more delivered and left unacked there.
    let (_cc, chc) = channel_on(&c).await;
    chc.basic_qos(5, Default::default()).await.expect("qos");
    for i in 0..10 {
        let g = chc
            .basic_get("ha".into(), Default::default())
            .await
            .expect("get")
            .expect("message");
        assert_eq!(g.delivery.data, format!("m{i}").as_bytes());
        g.delivery.ack(Default::default()).await.expect("ack");
    }
    let mut held = support::consume(&chc, "ha", false).await;
    for i in 10..15 {
        let d = tokio::time::timeout(Duration::from_secs(5), held.next())
            .await
            .expect("in time")
            .expect("delivery")
            .expect("ok");
        assert_eq!(d.data, format!("m{i}").as_bytes());
    }

    // Acks reach the mirrors in the master's stream of changes, not before the ack is taken
    // (as RabbitMQ's): one taken just before the master dies may come back redelivered. Once
    // the master has settled m0..m9, a publish confirmed after them is in every mirror after
    // their settles (one ordered stream per queue), so the count after the failover is exact.
    eventually("the master settled m0..m9", || async {
        let q = queue_info(&a, "ha").await;
        q["messages"] == 90 && q["messages_unacknowledged"] == 5
    })
    .await;
    assert!(publish_confirmed(&chb, "", "ha", b"m100", true).await);

    // The master dies. A mirror takes over; nothing confirmed is lost.
    a.proc.kill9().await;
    eventually("a mirror promoted", || async {
        let q = queue_info(&b, "ha").await;
        q["node"] == "b@ha" || q["node"] == "c@ha"
    })
    .await;
    let new_master = queue_info(&b, "ha").await["node"]
        .as_str()
        .expect("node")
        .to_owned();
    // Logged by the promoted node when it applies the entry b has already applied.
    let promoted = if new_master == "b@ha" { &b } else { &c };
    eventually("the promotion logged by the new master", || async {
        promoted.proc.logged("promoted to master")
    })
    .await;
    // c's consumer consumes on from the new master (no x-cancel-on-ha-failover); its
    // channel closes, and what it held goes back.
    drop(held);
    chc.close(200, "bye".into()).await.expect("channel close");
    let (_cb2, chb2) = channel_on(&b).await;
    eventually("91 messages on the new master", || async {
        ready_on(&chb2, "ha").await == 91
    })
    .await;
    let mut seen = Vec::new();
    let mut redelivered = 0;
    for _ in 0..91 {
        let g = chb2
            .basic_get("ha".into(), Default::default())
            .await
            .expect("get")
            .expect("message");
        if g.delivery.redelivered {
            redelivered += 1;
        }
        seen.push(String::from_utf8(g.delivery.data.clone()).expect("utf8"));
        g.delivery.ack(Default::default()).await.expect("ack");
    }
    let want: Vec<String> = (10..=100).map(|i| format!("m{i}")).collect();
    let mut sorted = seen.clone();
    sorted.sort_by_key(|s| s[1..].parse::<u32>().expect("number"));
    assert_eq!(
        sorted, want,
        "every confirmed, unacked message survived on {new_master}"
    );
    assert!(
        redelivered >= 5,
        "the 5 unacked ones come back redelivered ({redelivered})"
    );
    // Publishing goes on through any surviving node.
    let (_cc2, chc2) = channel_on(&c).await;
    chc2.confirm_select(Default::default())
        .await
        .expect("confirms");
    assert!(publish_confirmed(&chc2, "", "ha", b"after", true).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seeds_two_nodes_lose_no_confirmed_message_when_the_master_is_killed_mid_stream() {
    seed_failover(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_witness_the_seeds_two_nodes_fail_over_through_a_majority() {
    seed_failover(true).await;
}

/// The seed's R1/R2 with ha-all: kill -9 of the master while a publisher with confirms
/// publishes through the other node. Without a witness the survivor carries on alone
/// (partition handling ignore); with one, the survivor and the witness are a majority and the
/// promotion is an ordinary commit.
async fn seed_failover(witness: bool) {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-r");
    let r1 = start("r1@seed", &root.path().join("r1"), &secret, None).await;
    let r2 = start(
        "r2@seed",
        &root.path().join("r2"),
        &secret,
        Some(&r1.cluster()),
    )
    .await;
    let _w = if witness {
        Some(
            start_with(
                "w@seed",
                &root.path().join("w"),
                &secret,
                Some(&r1.cluster()),
                &["--witness"],
                &["mgmt", "cluster"],
            )
            .await,
        )
    } else {
        None
    };
    voters(&r1, if witness { 3 } else { 2 }).await;
    r2.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}}),
    )
    .await;
    let (_c1, ch1) = channel_on(&r1).await;
    support::declare_durable(&ch1, "celery").await;
    eventually("r2 in sync", || async {
        queue_info(&r2, "celery").await["synchronised_slave_nodes"] == json!(["r2@seed"])
    })
    .await;
    // Publishing through r2 (the node that survives), as a Celery producer with
    // confirm_publish behind a load balancer would after its reconnect.
    let stop = tokio_util::sync::CancellationToken::new();
    let outage: Arc<parking_lot::Mutex<Outage>> = Arc::default();
    let publisher = tokio::spawn(confirmed_publisher(
        r2.proc.addr("amqp").to_string(),
        "",
        "celery",
        stop.clone(),
        outage.clone(),
    ));
    eventually("100 confirmed before the kill", || async {
        ready_on(&ch1, "celery").await >= 100
    })
    .await;
    let killed = tokio::time::Instant::now();
    outage.lock().killed = Some(killed);
    r1.proc.kill9().await;
    // The survivor carries on alone (partition handling ignore) and promotes its mirror.
    eventually("r2 masters the queue", || async {
        queue_info(&r2, "celery").await["node"] == "r2@seed"
    })
    .await;
    // With a witness, r2 never forced a one-voter cluster: the majority promoted.
    assert_eq!(
        r2.proc.logged("forced a one-voter cluster"),
        !witness,
        "ignore mode alone forces; a witness keeps the majority"
    );
    eventually("publishing confirmed again", || async {
        outage.lock().resumed.is_some()
    })
    .await;
    let gap = outage.lock().resumed.map(|t| t - killed);
    eprintln!(
        "confirmed publishing resumed {gap:?} after kill -9 of the master (witness: {witness})"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (confirmed, retries) = publisher.await.expect("publisher");
    assert!(confirmed.len() > 100, "{} confirmed", confirmed.len());
    // Every confirmed message is in the queue on r2.
    let (_c2, ch2) = channel_on(&r2).await;
    let mut have = std::collections::HashSet::new();
    while let Some(g) = ch2
        .basic_get(
            "celery".into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
    {
        have.insert(String::from_utf8(g.delivery.data.clone()).expect("utf8"));
    }
    let lost: Vec<&String> = confirmed.iter().filter(|b| !have.contains(*b)).collect();
    if !lost.is_empty() {
        eprintln!("r2's log:\n{}", r2.proc.log.lock().join("\n"));
        eprintln!("r2's overview: {}", r2.get("/api/overview").await);
    }
    assert!(
        lost.is_empty(),
        "confirmed and lost: {lost:?} (of {}, {retries} resent)",
        confirmed.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_mirror_resyncs_and_can_take_over_the_queue() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = secret_file(root.path(), "cookie-rr");
    let a = start("a@rr", &root.path().join("a"), &secret, None).await;
    let b = start("b@rr", &root.path().join("b"), &secret, Some(&a.cluster())).await;
    let c = start("c@rr", &root.path().join("c"), &secret, Some(&a.cluster())).await;
    voters(&a, 3).await;
    a.put(
        "/api/policies/%2F/ha-all",
        json!({"pattern": "", "definition": {"ha-mode": "all"}}),
    )
    .await;
    let (_ca, cha) = channel_on(&a).await;
    support::declare_durable(&cha, "jobs").await;
    eventually("b and c in sync", || async {
        queue_info(&a, "jobs").await["synchronised_slave_nodes"] == json!(["b@rr", "c@rr"])
    })
    .await;
    // b restarts (SIGTERM, as in a rolling restart): it leaves the in-sync set, comes back with
    // an empty copy, and is in sync again once the queue holds nothing older than its stream.
    b.proc.term().await;
    eventually("b out of sync while away", || async {
        queue_info(&a, "jobs").await["synchronised_slave_nodes"] == json!(["c@rr"])
    })
    .await;
    let b = start("b@rr", &root.path().join("b"), &secret, None).await;
    // Back in sync, after c: the in-sync list is oldest first (the promotion order).
    eventually("b in sync again", || async {
        queue_info(&a, "jobs").await["synchronised_slave_nodes"] == json!(["c@rr", "b@rr"])
    })
    .await;
    // c restarts the same way: b is now the oldest in-sync mirror.
    c.proc.term().await;
    let c = start("c@rr", &root.path().join("c"), &secret, None).await;
    eventually("b, then c, in sync", || async {
        queue_info(&a, "jobs").await["synchronised_slave_nodes"] == json!(["b@rr", "c@rr"])
    })
    .await;
    // Confirmed through c; then the master goes, and b (restarted mirror) takes over with all.
    let (_cc, chc) = channel_on(&c).await;
    chc.confirm_select(Default::default())
        .await
        .expect("confirms");
    for i in 0..20 {
        assert!(publish_confirmed(&chc, "", "jobs", format!("j{i}").as_bytes(), true).await);
    }
    a.proc.kill9().await;
    eventually("b promoted", || async {
        queue_info(&c, "jobs").await["node"] == "b@rr"
    })
    .await;
    let (_cb, chb) = channel_on(&b).await;
    eventually("20 messages on the new master", || async {
        ready_on(&chb, "jobs").await == 20
    })
    .await;
}
