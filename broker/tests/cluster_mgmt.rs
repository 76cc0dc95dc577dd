//! The management API and metrics of a cluster, on real broker processes on loopback (and, for
//! a partition, brokers in this process whose cluster links are cut through the cluster's
//! fault hook): the mirror-sync and quorum health checks, /api/nodes (running, partitions,
//! every node's own figures), connections, channels and consumers of one node listed and
//! closed through another, /api/overview's totals for the whole cluster, and the cluster
//! gauges at /metrics.

mod support;

use lapin::options::BasicConsumeOptions;
use lapin::ConnectionProperties;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;
use support::cluster::{in_process, start_with, Node};
use support::http::{http, Resp};

/// What these tests ask of a node beyond the shared harness.
impl Node {
    async fn req(&self, method: &str, path: &str) -> Resp {
        http(self.mgmt(), method, path, Some(("guest", "guest")), None).await
    }
    async fn metrics(&self) -> String {
        let addr: SocketAddr = self.proc.addr("prometheus").parse().expect("addr");
        let r = http(addr, "GET", "/metrics", None, None).await;
        assert_eq!(r.status, 200);
        r.text()
    }
    async fn connect(&self, name: &str) -> lapin::Connection {
        let props = ConnectionProperties::default().with_connection_name(name.into());
        lapin::Connection::connect(
            &format!("amqp://guest:guest@{}/%2f", self.proc.addr("amqp")),
            props,
        )
        .await
        .expect("connect")
    }
}

async fn start(name: &str, dir: &Path, secret: &Path, join: Option<&str>) -> Node {
    start_with(
        name,
        dir,
        secret,
        join,
        &["--prometheus", "127.0.0.1:0"],
        &["amqp", "mgmt", "prometheus", "cluster"],
    )
    .await
}

/// `count` nodes named `<x>@<suffix>` (a, b, c, ...) in one cluster, every one a voter.
async fn cluster_of(count: usize, suffix: &str, root: &Path) -> Vec<Node> {
    let secret = root.join("secret");
    std::fs::write(&secret, format!("cookie-{suffix}")).expect("secret");
    let mut nodes: Vec<Node> = Vec::new();
    for x in ["a", "b", "c"].iter().take(count) {
        let name = format!("{x}@{suffix}");
        let join = nodes.first().map(Node::cluster);
        nodes.push(start(&name, &root.join(x), &secret, join.as_deref()).await);
    }
    let first = &nodes[0];
    eventually(&format!("{count} voters"), || async {
        let r = first.req("GET", "/api/nodes").await;
        r.status == 200
            && r.json()
                .as_array()
                .expect("array")
                .iter()
                .filter(|m| m["voter"] == true && m["running"] == true)
                .count()
                == count
    })
    .await;
    nodes
}

/// Polls `f` until it is true (15 s at most), then asserts it.
async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    support::cluster::eventually_within(what, Duration::from_secs(15), f).await
}

/// The value of an unlabelled sample `name` in a Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
        .trim()
        .parse()
        .expect("number")
}

async fn queue_info(n: &Node, name: &str) -> Value {
    let r = n.req("GET", &format!("/api/queues/%2F/{name}")).await;
    if r.status == 404 {
        return Value::Null;
    }
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn ha_policy(pattern: &str) -> Value {
    json!({"pattern": pattern, "apply-to": "queues",
           "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}})
}

async fn declare_on(n: &Node, queue: &str) -> (lapin::Connection, lapin::Channel) {
    let (c, ch) = n.proc.connect().await;
    support::declare_durable(&ch, queue).await;
    (c, ch)
}

/// One `/api/nodes` row by name.
fn row<'a>(nodes: &'a Value, name: &str) -> &'a Value {
    nodes
        .as_array()
        .expect("array")
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {nodes}"))
}

/// A connection name as a URL path segment.
fn seg(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_sync_critical_is_ok_while_the_mirror_is_in_sync_and_failed_once_it_is_killed() {
    let root = tempfile::tempdir().expect("tmp");
    let mut nodes = cluster_of(2, "ms", root.path()).await;
    let b = nodes.pop().expect("b");
    let a = nodes.pop().expect("a");
    let check = "/api/health/checks/node-is-mirror-sync-critical";
    // A queue without a mirroring policy is never critical.
    let _plain = declare_on(&a, "plain").await;
    assert_eq!(a.get(check).await, json!({"status": "ok"}));
    a.put("/api/policies/%2F/ha", ha_policy("^ha\\.")).await;
    let _ha = declare_on(&a, "ha.q").await;
    eventually("b in sync", || async {
        queue_info(&a, "ha.q").await["synchronised_slave_nodes"] == json!(["b@ms"])
    })
    .await;
    assert_eq!(a.get(check).await, json!({"status": "ok"}));
    assert_eq!(b.get(check).await, json!({"status": "ok"}));
    // Each node's share of the queues, as its /metrics counts them.
    let (ma, mb) = (a.metrics().await, b.metrics().await);
    assert_eq!(metric(&ma, "warren_queue_masters"), 2.0);
    assert_eq!(metric(&ma, "warren_queue_mirrors"), 0.0);
    assert_eq!(metric(&mb, "warren_queue_masters"), 0.0);
    assert_eq!(metric(&mb, "warren_queue_mirrors"), 1.0);
    assert_eq!(metric(&mb, "warren_queue_mirrors_synchronised"), 1.0);
    assert!(
        ma.contains("rabbitmq_identity_info{rabbitmq_node=\"a@ms\",rabbitmq_cluster=\"a@ms\",rabbitmq_endpoint=\"aggregated\"} 1"),
        "{ma}"
    );
    assert!(
        mb.contains("rabbitmq_identity_info{rabbitmq_node=\"b@ms\",rabbitmq_cluster=\"a@ms\",rabbitmq_endpoint=\"aggregated\"} 1"),
        "{mb}"
    );

    // The only mirror dies: ha.q's messages are on a alone.
    b.proc.kill9().await;
    eventually("a is mirror-sync critical", || async {
        a.req("GET", check).await.status == 503
    })
    .await;
    let failed = |r: Resp| {
        assert_eq!(r.status, 503, "{}", r.text());
        let j = r.json();
        assert_eq!(j["status"], "failed");
        assert!(j["reason"].as_str().expect("reason").contains("mirror"));
        let names: Vec<&str> = j["queues"]
            .as_array()
            .expect("queues")
            .iter()
            .map(|q| q["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names, vec!["ha.q"], "{j}");
        assert_eq!(j["queues"][0]["virtual_host"], "/");
    };
    failed(a.req("GET", check).await);
    // Still so once the survivor carried on alone (b forced out of the two-voter cluster: it
    // rejoins when back, and until then ha.q has no copy elsewhere).
    tokio::time::sleep(Duration::from_millis(3000)).await;
    failed(a.req("GET", check).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_critical_nodes_and_gauges_follow_a_killed_member_of_three() {
    let root = tempfile::tempdir().expect("tmp");
    let mut nodes = cluster_of(3, "qc", root.path()).await;
    let c = nodes.pop().expect("c");
    let b = nodes.pop().expect("b");
    let a = nodes.pop().expect("a");
    let check = "/api/health/checks/node-is-quorum-critical";
    // Once each node has seen the other two up (their links come up after the joins).
    for n in [&a, &b, &c] {
        eventually(&format!("{} sees every voter up", n.name), || async {
            let r =
                support::http::http(n.mgmt(), "GET", check, Some(("guest", "guest")), None).await;
            r.status == 200 && r.json() == json!({"status": "ok"})
        })
        .await;
    }
    a.put("/api/policies/%2F/ha-all", ha_policy("")).await;
    let _q = declare_on(&a, "q3").await;
    eventually("b and c in sync", || async {
        queue_info(&b, "q3").await["synchronised_slave_nodes"] == json!(["b@qc", "c@qc"])
    })
    .await;

    // Every node lists every member with its own figures (asked from it), none partitioned.
    let seen = b.get("/api/nodes").await;
    for n in ["a@qc", "b@qc", "c@qc"] {
        let r = row(&seen, n);
        assert_eq!(r["running"], true, "{r}");
        assert_eq!(r["partitions"], json!([]), "{r}");
        assert!(r["uptime"].as_u64().is_some(), "{n}'s own figures: {r}");
        assert!(r["mem_used"].as_u64().is_some(), "{r}");
    }
    let one = b.get("/api/nodes/c@qc").await;
    assert_eq!(
        (&one["name"], &one["voter"]),
        (&json!("c@qc"), &json!(true))
    );
    assert!(one["uptime"].as_u64().is_some(), "{one}");
    let m = a.metrics().await;
    assert_eq!(metric(&m, "warren_cluster_members"), 3.0);
    assert_eq!(metric(&m, "warren_cluster_members_running"), 3.0);
    assert_eq!(metric(&m, "warren_cluster_has_quorum"), 1.0);
    assert_eq!(metric(&m, "warren_queue_masters"), 1.0);
    assert!(m.contains("warren_cluster_member_running{member=\"c@qc\"} 1"));
    let m = c.metrics().await;
    assert_eq!(metric(&m, "warren_queue_mirrors"), 1.0);
    assert_eq!(metric(&m, "warren_queue_mirrors_synchronised"), 1.0);
    assert_eq!(metric(&m, "warren_queue_masters"), 0.0);

    // c dies: a and b are the last two of three voters; stopping either leaves one.
    c.proc.kill9().await;
    for n in [&a, &b] {
        eventually(&format!("{} is quorum critical", n.name), || async {
            n.req("GET", check).await.status == 503
        })
        .await;
        let j = n.req("GET", check).await.json();
        assert_eq!(j["status"], "failed");
        assert_eq!(j["online"], json!(["a@qc", "b@qc"]), "{j}");
        assert_eq!(j["voters"], json!(["a@qc", "b@qc", "c@qc"]), "{j}");
        let reason = j["reason"].as_str().expect("reason");
        assert!(reason.contains("a@qc, b@qc"), "{reason}");
    }
    // c is down for everyone: not running, and no partition anywhere.
    eventually("a sees c down, no partitions", || async {
        let nodes = a.get("/api/nodes").await;
        row(&nodes, "c@qc")["running"] == false
            && nodes
                .as_array()
                .expect("array")
                .iter()
                .all(|n| n["partitions"] == json!([]))
    })
    .await;
    assert_eq!(row(&a.get("/api/nodes").await, "b@qc")["running"], true);
    // Listings say whose part is missing.
    let r = a.req("GET", "/api/connections").await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.headers.get("x-warren-missing-nodes").map(String::as_str),
        Some("c@qc")
    );
    let m = a.metrics().await;
    assert_eq!(metric(&m, "warren_cluster_members"), 3.0);
    assert_eq!(metric(&m, "warren_cluster_members_running"), 2.0);
    assert_eq!(metric(&m, "warren_cluster_has_quorum"), 1.0);
    assert!(m.contains("warren_cluster_member_running{member=\"c@qc\"} 0"));
    // b is still an in-sync mirror that is up: a is not mirror-sync critical.
    assert_eq!(
        a.get("/api/health/checks/node-is-mirror-sync-critical")
            .await["status"],
        "ok"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_and_consumers_of_one_node_are_listed_and_closed_through_another() {
    let root = tempfile::tempdir().expect("tmp");
    let mut nodes = cluster_of(2, "cx", root.path()).await;
    let b = nodes.pop().expect("b");
    let a = nodes.pop().expect("a");
    let conn = b.connect("client-on-b").await;
    let ch = conn.create_channel().await.expect("channel");
    support::declare_durable(&ch, "cq").await;
    let _consumer = ch
        .basic_consume(
            "cq".into(),
            "ctag-b".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .expect("consume");

    // a lists b's connection, with b as its node; with node-local=true it lists its own only.
    let mine = |list: &Value| -> Option<Value> {
        list.as_array()
            .expect("array")
            .iter()
            .find(|c| c["user_provided_name"] == "client-on-b")
            .cloned()
    };
    let listed = mine(&a.get("/api/connections").await).expect("b's connection listed on a");
    assert_eq!(listed["node"], "b@cx");
    let name = listed["name"].as_str().expect("name").to_owned();
    assert!(mine(&a.get("/api/connections?node-local=true").await).is_none());
    let one = a.get(&format!("/api/connections/{}", seg(&name))).await;
    assert_eq!(one["node"], "b@cx");
    assert_eq!(one["user_provided_name"], "client-on-b");

    let chans = a.get("/api/channels").await;
    let chan = chans
        .as_array()
        .expect("array")
        .iter()
        .find(|c| c["connection_details"]["name"] == name.as_str())
        .expect("b's channel listed on a");
    assert_eq!(chan["node"], "b@cx");
    let cname = chan["name"].as_str().expect("channel name").to_owned();
    assert_eq!(
        a.get(&format!("/api/channels/{}", seg(&cname))).await["node"],
        "b@cx"
    );
    let on_conn = a
        .get(&format!("/api/connections/{}/channels", seg(&name)))
        .await;
    assert_eq!(on_conn.as_array().expect("array").len(), 1);
    for path in ["/api/consumers", "/api/consumers/%2F"] {
        let cons = a.get(path).await;
        let c = cons
            .as_array()
            .expect("array")
            .iter()
            .find(|c| c["consumer_tag"] == "ctag-b")
            .unwrap_or_else(|| panic!("b's consumer listed at {path} on a: {cons}"));
        assert_eq!(c["channel_details"]["node"], "b@cx");
    }
    let q = a.get("/api/queues/%2F/cq").await;
    assert!(
        q["consumer_details"]
            .as_array()
            .expect("consumer_details")
            .iter()
            .any(|c| c["consumer_tag"] == "ctag-b"),
        "{q}"
    );

    // Closed through a: b closes it.
    let r = a
        .req("DELETE", &format!("/api/connections/{}", seg(&name)))
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    eventually("the client's connection is closed", || async {
        !conn.status().connected()
    })
    .await;
    eventually("gone from a's listing", || async {
        mine(&a.get("/api/connections").await).is_none()
    })
    .await;
    let r = a
        .req("GET", &format!("/api/connections/{}", seg(&name)))
        .await;
    assert_eq!(r.status, 404);
    let r = a.req("DELETE", "/api/connections/nobody").await;
    assert_eq!(r.status, 404);
}

/// `/api/overview` answers for the cluster on every node: connections, channels and message
/// counts of both nodes added up, queues and their messages counted once, every node's
/// listeners; `node-local=true` gives the node's own share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overview_of_any_node_counts_every_nodes_connections_channels_and_publishes() {
    let root = tempfile::tempdir().expect("tmp");
    let mut nodes = cluster_of(2, "ov", root.path()).await;
    let b = nodes.pop().expect("b");
    let a = nodes.pop().expect("a");
    let ca = a.connect("on-a").await;
    let cha = ca.create_channel().await.expect("channel");
    let _cha2 = ca.create_channel().await.expect("channel");
    support::declare_durable(&cha, "ov").await;
    let cb = b.connect("on-b").await;
    let chb = cb.create_channel().await.expect("channel");
    for (ch, n) in [(&cha, 5), (&chb, 3)] {
        ch.confirm_select(Default::default())
            .await
            .expect("confirms");
        for i in 0..n {
            assert!(
                support::cluster::publish_confirmed(ch, "", "ov", format!("m{i}").as_bytes(), true)
                    .await
            );
        }
    }
    for n in [&a, &b] {
        eventually(
            &format!("{}'s overview counts both nodes", n.name),
            || async {
                let o = n.get("/api/overview").await;
                o["object_totals"]["connections"] == 2
                    && o["object_totals"]["channels"] == 3
                    && o["object_totals"]["queues"] == 1
                    && o["queue_totals"]["messages_ready"] == 8
                    && o["message_stats"]["publish"] == 8
            },
        )
        .await;
        let o = n.get("/api/overview").await;
        let mut listed: Vec<&str> = o["listeners"]
            .as_array()
            .expect("listeners")
            .iter()
            .filter(|l| l["protocol"] == "amqp")
            .map(|l| l["node"].as_str().expect("node"))
            .collect();
        listed.sort();
        assert_eq!(listed, ["a@ov", "b@ov"], "{o}");
    }
    let own = a.get("/api/overview?node-local=true").await;
    assert_eq!(own["object_totals"]["connections"], 1);
    assert_eq!(own["object_totals"]["channels"], 2);
    assert_eq!(own["message_stats"]["publish"], 5);
    assert_eq!(
        own["queue_totals"]["messages_ready"], 8,
        "queues are the cluster's"
    );
}

// === a partition, with the cluster's fault hook (brokers in this process) ===

async fn nodes_of(b: &support::TestBroker) -> Value {
    let r = http(
        b.mgmt.expect("mgmt"),
        "GET",
        "/api/nodes",
        Some(("guest", "guest")),
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn partitions_of(nodes: &Value) -> Vec<(String, Value)> {
    nodes
        .as_array()
        .expect("array")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().expect("name").to_owned(),
                n["partitions"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cut_off_from_another_lists_it_in_partitions_and_so_does_every_node() {
    let root = tempfile::tempdir().expect("tmp");
    let secret = root.path().join("secret");
    std::fs::write(&secret, "cookie-pt").expect("secret");
    let a = in_process("a@pt", &secret, None).await;
    let seed = a
        .shared
        .cluster()
        .expect("clustered")
        .cluster
        .listen_addrs()[0]
        .to_string();
    let b = in_process("b@pt", &secret, Some(seed.clone())).await;
    let c = in_process("c@pt", &secret, Some(seed)).await;
    eventually("three voters up", || async {
        let nodes = nodes_of(&a).await;
        nodes
            .as_array()
            .expect("array")
            .iter()
            .filter(|n| n["voter"] == true && n["running"] == true)
            .count()
            == 3
    })
    .await;
    let none = vec![
        ("a@pt".to_owned(), json!([])),
        ("b@pt".to_owned(), json!([])),
        ("c@pt".to_owned(), json!([])),
    ];
    // (A node that joined a moment ago may be up for one node and not yet for another.)
    eventually("no partitions", || async {
        partitions_of(&nodes_of(&b).await) == none
    })
    .await;

    // a and c cannot reach each other; b reaches both.
    let la = a.shared.cluster().expect("clustered").clone();
    let c_id = la
        .members()
        .iter()
        .find(|m| m.name == "c@pt")
        .expect("c")
        .id;
    la.cluster.set_partition(&[c_id]);
    let cut = vec![
        ("a@pt".to_owned(), json!(["c@pt"])),
        ("b@pt".to_owned(), json!([])),
        ("c@pt".to_owned(), json!(["a@pt"])),
    ];
    for (who, n) in [("a", &a), ("b", &b), ("c", &c)] {
        eventually(&format!("{who} names the partition"), || async {
            partitions_of(&nodes_of(n).await) == cut
        })
        .await;
    }
    let from_a = nodes_of(&a).await;
    assert_eq!(row(&from_a, "c@pt")["running"], false);
    assert_eq!(row(&from_a, "b@pt")["running"], true);
    assert_eq!(row(&nodes_of(&b).await, "c@pt")["running"], true);

    // Healed: nobody is partitioned.
    la.cluster.set_partition(&[]);
    for (who, n) in [("a", &a), ("b", &b), ("c", &c)] {
        eventually(&format!("{who} sees the partition healed"), || async {
            partitions_of(&nodes_of(n).await) == none
        })
        .await;
    }
    for n in [c, b, a] {
        n.shutdown().await;
    }
}
