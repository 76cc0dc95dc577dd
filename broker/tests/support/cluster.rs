//! Clustered broker processes for the cluster tests: start a node (loopback, ports picked at
//! run time, a short failure detection), poll until something holds, read a queue's placement
//! through the management API, publish with confirms.

use super::http::http;
use super::proc::{spawn, BrokerProc};
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

pub const FD_MS: &str = "600";

pub struct Node {
    pub name: String,
    pub proc: BrokerProc,
}

impl Node {
    pub fn mgmt(&self) -> SocketAddr {
        self.proc.addr("mgmt").parse().expect("mgmt addr")
    }
    pub fn cluster(&self) -> String {
        self.proc.addr("cluster").to_string()
    }
    pub async fn get(&self, path: &str) -> Value {
        let r = http(self.mgmt(), "GET", path, Some(("guest", "guest")), None).await;
        assert_eq!(r.status, 200, "GET {path} on {}: {}", self.name, r.text());
        r.json()
    }
    pub async fn put(&self, path: &str, body: Value) -> u16 {
        let r = http(
            self.mgmt(),
            "PUT",
            path,
            Some(("guest", "guest")),
            Some(body),
        )
        .await;
        assert!(
            matches!(r.status, 200 | 201 | 204),
            "PUT {path} on {}: {} {}",
            self.name,
            r.status,
            r.text()
        );
        r.status
    }
    pub async fn delete(&self, path: &str) -> u16 {
        http(self.mgmt(), "DELETE", path, Some(("guest", "guest")), None)
            .await
            .status
    }
}

pub async fn start(name: &str, dir: &Path, secret: &Path, join: Option<&str>) -> Node {
    start_with(name, dir, secret, join, &[], &["amqp", "mgmt", "cluster"]).await
}

pub async fn start_with(
    name: &str,
    dir: &Path,
    secret: &Path,
    join: Option<&str>,
    extra: &[&str],
    protos: &[&str],
) -> Node {
    let mut args: Vec<String> = vec![
        "--node-name".into(),
        name.into(),
        "--data-dir".into(),
        dir.display().to_string(),
    ];
    // `extra` may name the AMQP listener (a node restarted where a load balancer expects it).
    if !extra.contains(&"--amqp") {
        args.extend(["--amqp".into(), "127.0.0.1:0".into()]);
    }
    args.extend([
        "--mgmt".into(),
        "127.0.0.1:0".into(),
        "--cluster-listen".into(),
        "127.0.0.1:0".into(),
        "--cluster-secret-file".into(),
        secret.display().to_string(),
        "--cluster-failure-detection-ms".into(),
        FD_MS.into(),
    ]);
    if let Some(j) = join {
        args.extend(["--join".into(), j.into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    // WARREN_TEST_LOG=<filter> sets the nodes' RUST_LOG (info by default) to debug a test.
    let log = std::env::var("WARREN_TEST_LOG").ok();
    let env: Vec<(&str, &str)> = log.iter().map(|l| ("RUST_LOG", l.as_str())).collect();
    let proc = spawn(&args, &env, protos).await;
    Node {
        name: name.into(),
        proc,
    }
}

/// Polls `f` until it is true (10 s at most), then asserts it.
pub async fn eventually<F, Fut>(what: &str, f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_within(what, Duration::from_secs(10), f).await
}

/// Polls `f` every 50 ms until it is true (`limit` at most), then asserts it.
pub async fn eventually_within<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < end,
            "never true within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn amqp_login(n: &Node, user: &str, pass: &str, vhost: &str) -> Result<(), String> {
    let uri = format!(
        "amqp://{user}:{pass}@{}/{}",
        n.proc.addr("amqp"),
        urlencoding(vhost)
    );
    match lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await {
        Ok(c) => {
            let _ = c.close(200, "bye".into()).await;
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

pub fn urlencoding(s: &str) -> String {
    s.replace('%', "%25").replace('/', "%2f")
}

pub fn names(nodes: &Value) -> Vec<(String, bool)> {
    nodes
        .as_array()
        .expect("array")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().expect("name").to_owned(),
                n["running"].as_bool().expect("running"),
            )
        })
        .collect()
}

/// Waits until `n` lists `count` voters (a joined node is a learner until it caught up).
pub async fn voters(n: &Node, count: usize) {
    eventually(&format!("{count} voters"), || async {
        let nodes = n.get("/api/nodes").await;
        nodes
            .as_array()
            .expect("array")
            .iter()
            .filter(|m| m["voter"] == true)
            .count()
            == count
    })
    .await;
}

pub fn secret_file(dir: &Path, secret: &str) -> std::path::PathBuf {
    let p = dir.join(format!("secret-{secret}"));
    std::fs::write(&p, secret).expect("secret");
    p
}

pub async fn channel_on(n: &Node) -> (lapin::Connection, lapin::Channel) {
    n.proc.connect().await
}

pub async fn ready_on(ch: &lapin::Channel, queue: &str) -> u32 {
    passive_count(ch, queue).await.expect("passive declare")
}

/// Ready messages of `queue` by a passive declare (an error, the queue missing included,
/// closes the channel).
pub async fn passive_count(ch: &lapin::Channel, queue: &str) -> Result<u32, lapin::Error> {
    passive_counts(ch, queue)
        .await
        .map(|(messages, _)| messages)
}

/// Ready messages and consumers of `queue` by a passive declare (its declare-ok's counts).
pub async fn passive_counts(ch: &lapin::Channel, queue: &str) -> Result<(u32, u32), lapin::Error> {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .map(|q| (q.message_count(), q.consumer_count()))
}

/// Publishes one message (persistent or not) on a channel in confirm mode and waits for its
/// confirm; true for basic.ack.
pub async fn publish_confirmed(
    ch: &lapin::Channel,
    exchange: &str,
    key: &str,
    body: &[u8],
    persistent: bool,
) -> bool {
    let props = if persistent {
        lapin::BasicProperties::default().with_delivery_mode(2)
    } else {
        lapin::BasicProperties::default()
    };
    ch.basic_publish(exchange.into(), key.into(), Default::default(), body, props)
        .await
        .expect("publish")
        .await
        .expect("confirm")
        .is_ack()
}

/// The queue as a node's management API shows it (Null while it does not know it).
pub async fn queue_info(n: &Node, name: &str) -> Value {
    let path = format!("/api/queues/%2F/{name}");
    let r = http(n.mgmt(), "GET", &path, Some(("guest", "guest")), None).await;
    if r.status == 404 {
        return Value::Null;
    }
    assert_eq!(r.status, 200, "GET {path} on {}: {}", n.name, r.text());
    r.json()
}

/// When the master was killed, and when the first publish sent after that was confirmed.
#[derive(Default)]
pub struct Outage {
    pub killed: Option<tokio::time::Instant>,
    pub resumed: Option<tokio::time::Instant>,
}

/// A publisher that keeps publishing persistent messages with confirms through the node at
/// `addr`, to `exchange` with `routing_key`,
/// one at a time; a nack or a broken connection means the message is sent again (after a
/// reconnect). Returns every body that was confirmed, and how many sends were retried.
pub async fn confirmed_publisher(
    addr: String,
    exchange: &'static str,
    routing_key: &'static str,
    stop: tokio_util::sync::CancellationToken,
    outage: Arc<parking_lot::Mutex<Outage>>,
) -> (Vec<String>, usize) {
    let mut confirmed = Vec::new();
    let mut retries = 0;
    let mut i = 0u32;
    'outer: while !stop.is_cancelled() {
        let uri = format!("amqp://guest:guest@{addr}/%2f");
        let Ok(conn) =
            lapin::Connection::connect(&uri, lapin::ConnectionProperties::default()).await
        else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else {
            continue;
        };
        if ch.confirm_select(Default::default()).await.is_err() {
            continue;
        }
        while !stop.is_cancelled() {
            let body = format!("p{i}");
            let after_kill = outage.lock().killed.is_some();
            let sent = ch
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    Default::default(),
                    body.as_bytes(),
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await;
            let confirm = match sent {
                Ok(c) => tokio::time::timeout(Duration::from_secs(10), c).await,
                Err(_) => continue 'outer,
            };
            match confirm {
                Ok(Ok(c)) if c.is_ack() => {
                    confirmed.push(body);
                    i += 1;
                    let mut o = outage.lock();
                    if after_kill && o.resumed.is_none() {
                        o.resumed = Some(tokio::time::Instant::now());
                    }
                }
                Ok(Ok(_)) => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                _ => {
                    retries += 1;
                    continue 'outer;
                }
            }
        }
    }
    (confirmed, retries)
}

/// Prints the nodes' logs (without the Raft library's lines), for a test that is about to
/// fail.
pub fn dump_logs(nodes: &[&Node]) {
    for n in nodes {
        let lines: Vec<String> = n
            .proc
            .log
            .lock()
            .iter()
            .filter(|l| !l.contains("openraft"))
            .cloned()
            .collect();
        eprintln!("--- {}:\n{}", n.name, lines.join("\n"));
    }
}

/// Three nodes `a@tag`, `b@tag` and `c@tag` (b and c joined a), once all three are voters.
pub async fn trio(root: &Path, tag: &str) -> (Node, Node, Node) {
    let secret = secret_file(root, &format!("cookie-{tag}"));
    let a = start(&format!("a@{tag}"), &root.join("a"), &secret, None).await;
    let mut joined = Vec::new();
    for n in ["b", "c"] {
        let name = format!("{n}@{tag}");
        joined.push(start(&name, &root.join(n), &secret, Some(&a.cluster())).await);
    }
    voters(&a, 3).await;
    let c = joined.pop().expect("c");
    let b = joined.pop().expect("b");
    (a, b, c)
}

/// Two nodes `a@tag` and `b@tag` and a witness `w@tag` (the seed's pair with a third voter,
/// so either node can be promoted through a majority while the other is down), once all
/// three are voters.
pub async fn pair_with_witness(root: &Path, tag: &str) -> (Node, Node, Node) {
    let secret = secret_file(root, &format!("cookie-{tag}"));
    let a = start(&format!("a@{tag}"), &root.join("a"), &secret, None).await;
    let b = start(
        &format!("b@{tag}"),
        &root.join("b"),
        &secret,
        Some(&a.cluster()),
    )
    .await;
    let w = start_with(
        &format!("w@{tag}"),
        &root.join("w"),
        &secret,
        Some(&a.cluster()),
        &["--witness"],
        &["mgmt", "cluster"],
    )
    .await;
    voters(&a, 3).await;
    (a, b, w)
}

/// A clustered broker in this process (its cluster handle reachable through `shared`, for the
/// cluster's test hooks), failure detection 600 ms, joining `join` if given.
pub async fn in_process(name: &str, secret: &Path, join: Option<String>) -> super::TestBroker {
    let mut cfg = warren_broker::config::Config::for_tests();
    cfg.node_name = name.into();
    cfg.mgmt = vec!["127.0.0.1:0".parse().expect("addr")];
    cfg.cluster_listen = vec!["127.0.0.1:0".parse().expect("addr")];
    cfg.cluster_secret_file = Some(secret.to_owned());
    cfg.cluster_failure_detection_ms = FD_MS.parse().expect("fd");
    cfg.join = join.into_iter().collect();
    super::start_with(cfg).await
}
