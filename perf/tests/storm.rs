//! The reconnect storm end to end, in-process: warren-broker behind warren-lb, 50 clients with
//! heartbeats consume, the balancer resets every connection twice through its admin API, and every
//! client must consume again each time (on a shared queue and on one queue per client).

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use warren_lb::config::{
    AdminConfig, ListenerConfig, ADMIN_MAX_CONNECTIONS, ADMIN_REQUEST_TIMEOUT,
};
use warren_perf::{
    connection::Endpoint,
    storm::{self, QueueMode, StormConfig},
};

const CLIENTS: usize = 50;

async fn storm_through_lb(queues: QueueMode) {
    let data = tempfile_dir(queues);
    let cfg = warren_broker::config::Config {
        data_dir: data.clone(),
        ..warren_broker::config::Config::for_tests()
    };
    let broker = warren_broker::Broker::bind(cfg).await.expect("broker bind");
    let amqp = broker.amqp_addrs[0];
    let broker_stop = CancellationToken::new();
    let broker_task = tokio::spawn(broker.run(broker_stop.clone()));

    let lb_cfg = warren_lb::Config {
        admin: Some(AdminConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            token_file: None,
            request_timeout: ADMIN_REQUEST_TIMEOUT,
            max_connections: ADMIN_MAX_CONNECTIONS,
        }),
        listeners: vec![ListenerConfig {
            name: "amqp".into(),
            bind: "127.0.0.1:0".parse().expect("addr"),
            backends: vec![amqp.to_string()],
            drain_timeout: Duration::from_millis(200),
            ..ListenerConfig::default()
        }],
        ..warren_lb::Config::default()
    };
    let lb = warren_lb::Lb::bind(lb_cfg).await.expect("lb bind");
    let via = lb.addr("amqp").expect("listener");
    let admin = lb.admin_addr().expect("admin API");
    let lb_stop = CancellationToken::new();
    let lb_task = tokio::spawn(lb.run(lb_stop.clone()));

    let cfg = StormConfig {
        endpoint: Endpoint::from_uri(&format!("amqp://guest:guest@{via}/%2f")).expect("uri"),
        clients: CLIENTS,
        heartbeat: 10,
        queues,
        queue: "storm-test".into(),
        storms: 2,
        lb_admin: admin.to_string(),
        lb_listener: "amqp".into(),
        broker_pid: Some(std::process::id()),
        lb_pid: None,
        settle: Duration::from_millis(300),
        storm_timeout: Duration::from_secs(60),
        ramp: 10,
        label: Some("test".into()),
    };
    let report = storm::run(&cfg, |_| {}).await;
    assert!(report.errors.is_empty(), "{}", report.text());
    assert_eq!(report.storms.len(), 2, "{}", report.text());
    for s in &report.storms {
        assert_eq!(s.reset, CLIENTS as u64, "{}", report.text());
        assert_eq!(s.lost, CLIENTS, "{}", report.text());
        assert_eq!(s.handshakes, CLIENTS as u64, "{}", report.text());
        assert!(s.client_ms.p50 <= s.client_ms.max, "{}", report.text());
    }
    assert!(report.all_consuming_s.is_some());
    assert!(report.broker_rss_idle_kib.is_some());
    assert!(report.text().contains("storm 2:"));

    lb_stop.cancel();
    broker_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), lb_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(10), broker_task).await;
    let _ = std::fs::remove_dir_all(&data);
}

fn tempfile_dir(q: QueueMode) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("warren-perf-storm-{}-{q:?}", std::process::id()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_consumes_again_after_each_reset_shared_queue() {
    storm_through_lb(QueueMode::Shared).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_client_consumes_again_after_each_reset_queue_per_client() {
    storm_through_lb(QueueMode::PerClient).await;
}
