//! RabbitMQ's Grafana dashboard "RabbitMQ-Overview" against the Prometheus endpoint: every
//! metric its queries use (`fixtures/rabbitmq-overview-metrics.txt`, from the 3.10 and the
//! current dashboard) is exported, the counters behind its panels move by what real lapin
//! traffic did, and `/metrics/detailed` answers its `family`, `vhost` and `queue` filters.
//!
//! `WARREN_TEST_TARGET=rabbitmq` runs the traffic test against Debian's RabbitMQ (3.10.8 with
//! rabbitmq_prometheus) instead, so that the test checks itself against the broker it
//! imitates; there it checks what 3.10 has (the names the 3.10 dashboard queries, no message
//! size histogram, no `rabbitmq_endpoint` label).

mod support;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use support::http::http;
use warren_broker::config::Config;

const FIXTURE: &str = include_str!("fixtures/rabbitmq-overview-metrics.txt");

/// Body sizes published on the confirm channel, then on a plain one: one per bucket from 100
/// bytes to 1 MB, the bounds themselves included.
const CONFIRMED_SIZES: [usize; 5] = [10, 100, 101, 2_000, 200_000];
const PLAIN_SIZE: usize = 50;

/// A scrape: series (`name{labels}`) and values.
struct Metrics {
    text: String,
    series: BTreeMap<String, f64>,
}

impl Metrics {
    fn parse(text: String) -> Self {
        let series = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| {
                let (k, v) = l.rsplit_once(' ')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        Self { text, series }
    }

    /// The series of metric `name`, whatever their labels.
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = (&'a String, f64)> + 'a {
        self.series
            .iter()
            .filter(move |(k, _)| k.split('{').next() == Some(name))
            .map(|(k, v)| (k, *v))
    }

    fn has(&self, name: &str) -> bool {
        self.named(name).next().is_some()
    }

    /// The sum of a metric's series, as a dashboard's `sum(...)` takes it (0 when absent).
    fn sum(&self, name: &str) -> f64 {
        self.named(name).map(|(_, v)| v).sum()
    }

    fn get(&self, series: &str) -> Option<f64> {
        self.series.get(series).copied()
    }
}

/// The broker under test: warren in-process, or Debian's RabbitMQ as a child process.
struct Target {
    uri: String,
    prom: SocketAddr,
    rabbitmq: bool,
    warren: Option<support::TestBroker>,
    _rabbit: Option<rabbit::Server>,
}

/// `WARREN_TEST_TARGET=rabbitmq`: the tests run against RabbitMQ.
fn rabbitmq_target() -> bool {
    std::env::var("WARREN_TEST_TARGET").as_deref() == Ok("rabbitmq")
}

impl Target {
    async fn start() -> Self {
        if rabbitmq_target() {
            let r = rabbit::Server::start().await;
            return Self {
                uri: format!("amqp://guest:guest@127.0.0.1:{}/%2f", r.amqp),
                prom: SocketAddr::from(([127, 0, 0, 1], r.prom)),
                rabbitmq: true,
                warren: None,
                _rabbit: Some(r),
            };
        }
        let mut cfg = Config::for_tests();
        cfg.prometheus = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
        let b = support::start_with(cfg).await;
        Self {
            uri: b.uri(),
            prom: b.prometheus.expect("prometheus listener"),
            rabbitmq: false,
            warren: Some(b),
            _rabbit: None,
        }
    }

    async fn scrape(&self, path: &str) -> Metrics {
        let r = http(self.prom, "GET", path, None, None).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        Metrics::parse(r.text())
    }

    /// Scrapes `path` until `check` finds nothing wrong (RabbitMQ refreshes some figures every
    /// few seconds; warren's queue actors count acks as they get to them), then asserts.
    async fn settle(&self, path: &str, check: impl Fn(&Metrics) -> Vec<String>) -> Metrics {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let m = self.scrape(path).await;
            let wrong = check(&m);
            if wrong.is_empty() {
                return m;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("{path}:\n  {}\n{}", wrong.join("\n  "), m.text);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(self) {
        if let Some(b) = self.warren {
            b.shutdown().await;
        }
    }
}

/// Checks `got == want`, or says what differs.
fn expect(wrong: &mut Vec<String>, what: &str, got: f64, want: f64) {
    if got != want {
        wrong.push(format!("{what}: {got}, want {want}"));
    }
}

/// The fixture's names, with the dashboard versions that query them.
fn dashboard_names() -> Vec<(&'static str, Vec<&'static str>)> {
    FIXTURE
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next().expect("a name");
            (name, w.collect())
        })
        .collect()
}

async fn channel(c: &Connection) -> Channel {
    c.create_channel().await.expect("channel")
}

#[tokio::test]
async fn dashboard_metrics_are_exported_and_count_real_traffic() {
    let t = Target::start().await;
    let before = t.scrape("/metrics").await;

    let conn = Connection::connect(&t.uri, ConnectionProperties::default())
        .await
        .expect("connect");
    // Publishes with confirms.
    let confirmed = channel(&conn).await;
    confirmed
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    for q in ["dash", "dash.empty"] {
        confirmed
            .queue_declare(
                q.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare");
    }
    for size in CONFIRMED_SIZES {
        confirmed
            .basic_publish(
                "".into(),
                "dash".into(),
                BasicPublishOptions::default(),
                &vec![b'x'; size],
                BasicProperties::default(),
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
    }
    // A publish without confirms.
    let plain = channel(&conn).await;
    plain
        .basic_publish(
            "".into(),
            "dash".into(),
            BasicPublishOptions::default(),
            &[b'y'; PLAIN_SIZE],
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    // Gets on an empty queue.
    let getter = channel(&conn).await;
    for _ in 0..3 {
        let got = getter
            .basic_get("dash.empty".into(), BasicGetOptions::default())
            .await
            .expect("get");
        assert!(got.is_none(), "dash.empty is empty");
    }
    // A consumer that takes and acks every message.
    let consuming = channel(&conn).await;
    let mut consumer = consuming
        .basic_consume(
            "dash".into(),
            "dash-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let published = CONFIRMED_SIZES.len() + 1;
    for _ in 0..published {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("a delivery in time")
            .expect("a delivery")
            .expect("delivery ok");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }

    let n = published as f64;
    let confirms = CONFIRMED_SIZES.len() as f64;
    let rabbitmq = t.rabbitmq;
    let after = t
        .settle("/metrics", |m| {
            let mut w = Vec::new();
            let delta = |name: &str| m.sum(name) - before.sum(name);
            for (name, want) in [
                ("rabbitmq_global_messages_received_total", n),
                ("rabbitmq_global_messages_received_confirm_total", confirms),
                ("rabbitmq_global_messages_confirmed_total", confirms),
                ("rabbitmq_global_messages_routed_total", n),
                ("rabbitmq_global_messages_get_empty_total", 3.0),
                (
                    "rabbitmq_global_messages_delivered_consume_manual_ack_total",
                    n,
                ),
                ("rabbitmq_global_messages_acknowledged_total", n),
                ("rabbitmq_queues_declared_total", 2.0),
                ("rabbitmq_queues_created_total", 2.0),
                ("rabbitmq_channels_opened_total", 4.0),
                ("rabbitmq_connections_opened_total", 1.0),
            ] {
                expect(&mut w, name, delta(name), want);
            }
            // Gauges: the two channels that published, the one consumer.
            for (name, want) in [
                ("rabbitmq_global_publishers", 2.0),
                ("rabbitmq_global_consumers", 1.0),
                ("rabbitmq_channel_consumers", 1.0),
                ("rabbitmq_consumers", 1.0),
                ("rabbitmq_connections", 1.0),
                ("rabbitmq_channels", 4.0),
                ("rabbitmq_queues", 2.0),
                ("rabbitmq_process_open_tcp_sockets", 1.0),
            ] {
                expect(&mut w, name, m.sum(name), want);
            }
            if !rabbitmq {
                // Message sizes: cumulative buckets as the dashboard selects them.
                let bucket = |le: &str| {
                    let s = format!(
                        "rabbitmq_message_size_bytes_bucket{{protocol=\"amqp091\",le=\"{le}\"}}"
                    );
                    m.get(&s).unwrap_or(f64::NAN) - before.get(&s).unwrap_or(f64::NAN)
                };
                for (le, want) in [
                    ("100.0", 3.0),
                    ("1000.0", 4.0),
                    ("10000.0", 5.0),
                    ("100000.0", 5.0),
                    ("1e+06", 6.0),
                    ("1e+07", 6.0),
                    ("5e+07", 6.0),
                    ("1e+08", 6.0),
                    ("+Inf", 6.0),
                ] {
                    expect(&mut w, &format!("size bucket le={le}"), bucket(le), want);
                }
                let bytes = (CONFIRMED_SIZES.iter().sum::<usize>() + PLAIN_SIZE) as f64;
                expect(
                    &mut w,
                    "rabbitmq_message_size_bytes_sum",
                    delta("rabbitmq_message_size_bytes_sum"),
                    bytes,
                );
                expect(
                    &mut w,
                    "rabbitmq_message_size_bytes_count",
                    delta("rabbitmq_message_size_bytes_count"),
                    n,
                );
            }
            w
        })
        .await;

    // Every name the dashboard queries is exported (on RabbitMQ 3.10: those of its dashboard).
    let missing: Vec<&str> = dashboard_names()
        .into_iter()
        .filter(|(_, versions)| !rabbitmq || versions.contains(&"3.10"))
        .map(|(name, _)| name)
        .filter(|name| !after.has(name))
        .collect();
    assert!(
        missing.is_empty(),
        "not exported: {missing:?}\n{}",
        after.text
    );
    assert!(after.sum("rabbitmq_process_max_tcp_sockets") > 0.0);
    assert!(after.sum("rabbitmq_process_max_fds") > 0.0);
    assert!(after.has("rabbitmq_build_info"));
    if !rabbitmq {
        // The labels the current dashboard joins and filters on.
        assert!(
            after.named("rabbitmq_identity_info").any(|(s, v)| v == 1.0
                && s.contains("rabbitmq_node=\"")
                && s.contains("rabbitmq_cluster=\"")
                && s.contains("rabbitmq_endpoint=\"aggregated\"")),
            "{}",
            after.text
        );
        assert!(after
            .named("rabbitmq_build_info")
            .any(|(s, _)| s.contains("rabbitmq_version=\"3.10.8\"")));
        assert!(after
            .text
            .contains("# TYPE rabbitmq_message_size_bytes histogram\n"));
    }

    // /metrics/detailed: only the families asked for, one series per object.
    let families = [
        "queue_coarse_metrics",
        "connection_churn_metrics",
        "channel_metrics",
        "vhost_status",
        "exchange_names",
        "no_such_family",
    ];
    let query: String = families.iter().map(|f| format!("family={f}&")).collect();
    let path = format!("/metrics/detailed?{query}vhost=%2F");
    let d = t
        .settle(&path, |m| {
            let mut w = Vec::new();
            for (series, want) in [
                (
                    "rabbitmq_detailed_queue_messages_ready{vhost=\"/\",queue=\"dash\"}",
                    0.0,
                ),
                (
                    "rabbitmq_detailed_queue_messages{vhost=\"/\",queue=\"dash.empty\"}",
                    0.0,
                ),
                ("rabbitmq_cluster_vhost_status{vhost=\"/\"}", 1.0),
                (
                    "rabbitmq_cluster_exchange_name{vhost=\"/\",exchange=\"amq.topic\",type=\"topic\"}",
                    1.0,
                ),
            ] {
                match m.get(series) {
                    Some(v) => expect(&mut w, series, v, want),
                    None => w.push(format!("{series} missing")),
                }
            }
            let churn = m.sum("rabbitmq_detailed_connections_opened_total");
            if churn < 1.0 {
                w.push(format!("connections_opened_total {churn}"));
            }
            let consumers: Vec<f64> = m
                .named("rabbitmq_detailed_channel_consumers")
                .filter(|(s, _)| s.contains("{channel=\""))
                .map(|(_, v)| v)
                .collect();
            if consumers.iter().sum::<f64>() != 1.0 || consumers.len() != 4 {
                w.push(format!("channel_consumers per channel: {consumers:?}"));
            }
            w
        })
        .await;
    // Families not asked for stay out; aggregates and globals too.
    for absent in [
        "rabbitmq_detailed_queue_consumers",
        "rabbitmq_queue_messages_ready",
        "rabbitmq_global_messages_received_total",
        "rabbitmq_connections",
    ] {
        assert!(!d.has(absent), "{absent} in\n{}", d.text);
    }
    assert!(d.has("rabbitmq_identity_info"));
    // A vhost that does not exist selects no queue.
    let none = t
        .scrape("/metrics/detailed?family=queue_coarse_metrics&vhost=no-such-vhost")
        .await;
    assert!(
        !none.has("rabbitmq_detailed_queue_messages_ready"),
        "{}",
        none.text
    );
    assert!(none
        .text
        .contains("# TYPE rabbitmq_detailed_queue_messages_ready gauge\n"));

    conn.close(200, "bye".into()).await.expect("close");
    t.stop().await;
}

#[tokio::test]
async fn detailed_endpoint_filters_as_rabbitmq_does() {
    if rabbitmq_target() {
        // The `queue` filter and queue_delivery_metrics came after 3.10.
        return;
    }
    let t = Target::start().await;
    let conn = Connection::connect(&t.uri, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = channel(&conn).await;
    for q in ["orders", "orders.dlq", "audit"] {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("declare");
    }
    for _ in 0..2 {
        let got = ch
            .basic_get("audit".into(), BasicGetOptions::default())
            .await
            .expect("get");
        assert!(got.is_none());
    }

    // No family: identity only, labelled with the endpoint.
    let m = t.scrape("/metrics/detailed").await;
    assert!(
        m.series.keys().all(
            |k| k.starts_with("rabbitmq_identity_info") || k.starts_with("rabbitmq_build_info")
        ),
        "{}",
        m.text
    );
    assert!(
        m.text.contains("rabbitmq_endpoint=\"detailed\""),
        "{}",
        m.text
    );

    // `queue` is a regular expression on queue names; queue_metrics includes the consumer count
    // that queue_consumer_count offers alone, which is then left out.
    let m = t
        .scrape("/metrics/detailed?family=queue_delivery_metrics&family=queue_metrics&family=queue_consumer_count&queue=%5Eorders")
        .await;
    let queues: Vec<&String> = m
        .named("rabbitmq_detailed_queue_consumers")
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        queues,
        [
            "rabbitmq_detailed_queue_consumers{vhost=\"/\",queue=\"orders\"}",
            "rabbitmq_detailed_queue_consumers{vhost=\"/\",queue=\"orders.dlq\"}",
        ],
        "{}",
        m.text
    );
    assert_eq!(
        m.text
            .matches("# TYPE rabbitmq_detailed_queue_consumers gauge")
            .count(),
        1
    );
    let m = t
        .scrape("/metrics/detailed?family=queue_delivery_metrics&queue=audit")
        .await;
    assert_eq!(
        m.get("rabbitmq_detailed_queue_get_empty_total{vhost=\"/\",queue=\"audit\"}"),
        Some(2.0),
        "{}",
        m.text
    );

    // A bad expression, or two of them, is refused as RabbitMQ refuses it.
    for bad in ["queue=(", "queue=a&queue=b"] {
        let r = http(
            t.prom,
            "GET",
            &format!("/metrics/detailed?family=queue_metrics&{bad}"),
            None,
            None,
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }

    // /metrics/per-object: one series per queue, channel and connection.
    let m = t.scrape("/metrics/per-object").await;
    assert_eq!(
        m.get("rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"audit\"}"),
        Some(0.0),
        "{}",
        m.text
    );
    assert_eq!(
        m.named("rabbitmq_channel_consumers").count(),
        1,
        "{}",
        m.text
    );
    assert_eq!(
        m.named("rabbitmq_connection_channels").count(),
        1,
        "{}",
        m.text
    );
    assert!(m.text.contains("rabbitmq_endpoint=\"per-object\""));

    conn.close(200, "bye".into()).await.expect("close");
    t.stop().await;
}

/// Debian's RabbitMQ with rabbitmq_prometheus, in a directory of its own, on free ports.
mod rabbit {
    use std::process::Stdio;
    use std::time::Duration;

    /// Debian's server script itself: its wrapper in /usr/sbin would `su` to the rabbitmq
    /// user into a session of its own, out of reach of the process group this test ends.
    const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";

    pub struct Server {
        pub amqp: u16,
        pub prom: u16,
        /// The start script; it runs the Erlang VM as a child of its own.
        child: tokio::process::Child,
        /// Where the VM writes its process id.
        pid_file: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port()
    }

    impl Server {
        pub async fn start() -> Self {
            assert!(
                std::path::Path::new(SERVER).exists(),
                "WARREN_TEST_TARGET=rabbitmq but {SERVER} is missing"
            );
            let dir = tempfile::tempdir().expect("tempdir");
            let (amqp, prom, dist) = (free_port(), free_port(), free_port());
            let p = dir.path();
            std::fs::write(
                p.join("rabbitmq.conf"),
                format!(
                    "listeners.tcp.1 = 127.0.0.1:{amqp}\nprometheus.tcp.port = {prom}\n\
                     prometheus.tcp.ip = 127.0.0.1\nloopback_users.guest = true\n"
                ),
            )
            .expect("conf");
            std::fs::write(p.join("enabled_plugins"), "[rabbitmq_prometheus].\n").expect("plugins");
            let node = format!("warren-prom-{}-{amqp}@localhost", std::process::id());
            let child = tokio::process::Command::new(SERVER)
                .env("HOME", p)
                .env("RABBITMQ_NODENAME", &node)
                .kill_on_drop(true)
                .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
                .env("RABBITMQ_NODE_PORT", amqp.to_string())
                .env("RABBITMQ_DIST_PORT", dist.to_string())
                .env("RABBITMQ_MNESIA_BASE", p.join("mnesia"))
                .env("RABBITMQ_LOG_BASE", p.join("log"))
                .env("RABBITMQ_LOGS", "-")
                .env("RABBITMQ_CONFIG_FILE", p.join("rabbitmq.conf"))
                .env("RABBITMQ_ENABLED_PLUGINS_FILE", p.join("enabled_plugins"))
                .current_dir(p)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn rabbitmq-server");
            let s = Server {
                amqp,
                prom,
                child,
                pid_file: p.join("mnesia").join(format!("{node}.pid")),
                _dir: dir,
            };
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], prom));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
            loop {
                let up = tokio::time::timeout(Duration::from_secs(2), async {
                    tokio::net::TcpStream::connect(addr).await.is_ok()
                })
                .await
                .unwrap_or(false);
                if up {
                    return s;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "RabbitMQ's Prometheus port did not open in 90 s"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }

    impl Drop for Server {
        /// Ends the Erlang VM, by the process id it wrote, then the start script. Only
        /// positive ids after `--`: procps-ng 4.0.2's `kill -SIG -PGID` signals pid -1 (every
        /// process) instead of the group.
        fn drop(&mut self) {
            if let Some(pid) = std::fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok())
                .filter(|&pid| pid > 1)
            {
                let _ = std::process::Command::new("kill")
                    .args(["-s", "KILL", "--", &pid.to_string()])
                    .status();
            }
            let _ = self.child.start_kill();
        }
    }
}
