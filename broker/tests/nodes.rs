//! Several brokers in one process (as the clustering tests will run them): each has its own
//! node context, so one broker's message memory, alarms, paging and totals do not reach the
//! other. Everything is observed from outside: AMQP, the management API, Prometheus and the
//! page directory.

mod support;

use futures_lite::StreamExt;
use lapin::options::{ConfirmSelectOptions, QueuePurgeOptions};
use lapin::{Channel, Connection};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;
use support::TestBroker;
use warren_broker::config::{Config, MemoryWatermark};

/// Broker A's memory alarm.
const WATERMARK: u64 = 2 << 20;
/// A's queue: more messages than a queue keeps in memory at its head when paging (256), so it
/// would page if its broker did, in less memory than A's watermark.
const SMALL: usize = 1024;
const SMALL_COUNT: usize = 300;
/// B's messages: bigger than its paging threshold each; 32 of them are twice the head window.
const BIG: usize = 64 * 1024;

fn config(watermark: u64, paging_ratio: f64) -> Config {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    Config {
        vm_memory_high_watermark: MemoryWatermark::Absolute(watermark),
        vm_memory_high_watermark_paging_ratio: paging_ratio,
        mgmt: vec![any],
        prometheus: vec![any],
        ..Config::for_tests()
    }
}

async fn get(b: &TestBroker, path: &str) -> support::http::Resp {
    let addr = b.mgmt.expect("mgmt listener");
    support::http::http(addr, "GET", path, Some(("guest", "guest")), None).await
}

async fn get_json(b: &TestBroker, path: &str) -> Value {
    let r = get(b, path).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text());
    r.json()
}

/// This broker's node in `/api/nodes` (it lists only itself).
async fn node(b: &TestBroker) -> Value {
    get_json(b, "/api/nodes").await[0].clone()
}

/// An unlabelled metric of this broker's Prometheus endpoint.
async fn metric(b: &TestBroker, name: &str) -> u64 {
    let addr = b.prometheus.expect("prometheus listener");
    let text = support::http::http(addr, "GET", "/metrics", None, None)
        .await
        .text();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn paged_out(b: &TestBroker, queue: &str) -> u64 {
    let vh = b.shared.vhost("/").expect("/");
    let q = vh
        .queue(queue)
        .unwrap_or_else(|| panic!("no queue {queue}"));
    q.stats.paged_out.load(Ordering::Relaxed)
}

fn page_files(b: &TestBroker) -> usize {
    std::fs::read_dir(b.data.path().join("paging")).map_or(0, |d| d.count())
}

async fn wait_until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A publisher on a confirm channel with queue `q` declared.
async fn publisher(b: &TestBroker, q: &str) -> (Connection, Channel) {
    let (c, ch) = b.channel().await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    support::declare(&ch, q, Default::default()).await;
    (c, ch)
}

/// Publishes `n` messages of `len` bytes to `q` and waits for their confirms.
async fn publish_confirmed(ch: &Channel, q: &str, n: usize, len: usize) {
    let body = vec![7u8; len];
    let mut confirms = Vec::with_capacity(n);
    for _ in 0..n {
        let confirm = ch
            .basic_publish(
                "".into(),
                q.into(),
                Default::default(),
                &body,
                Default::default(),
            )
            .await
            .expect("publish");
        confirms.push(confirm);
    }
    for confirm in confirms {
        let confirm = tokio::time::timeout(Duration::from_secs(5), confirm)
            .await
            .expect("confirm within 5 s")
            .expect("confirm");
        assert!(confirm.is_ack());
    }
}

async fn next_event(
    events: &mut (impl futures_lite::Stream<Item = lapin::Event> + Unpin),
) -> lapin::Event {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(5), events.next())
            .await
            .expect("timed out waiting for a connection event")
            .expect("event stream ended");
        match ev {
            lapin::Event::Connected => continue,
            ev => return ev,
        }
    }
}

#[tokio::test]
async fn two_brokers_in_one_process_keep_their_own_memory_alarms_paging_and_totals() {
    // A: memory alarm at 2 MiB, paging only far beyond it. B: alarm at 1 GiB, paging above
    // 64 KiB, which A's messages alone exceed.
    let a = support::start_with(config(WATERMARK, 10.0)).await;
    let b = support::start_with(config(1 << 30, 1.0 / 16384.0)).await;
    assert_eq!(node(&a).await["mem_limit"], WATERMARK);
    assert_eq!(node(&b).await["mem_limit"], 1u64 << 30);
    assert_eq!(
        metric(&a, "rabbitmq_resident_memory_limit_bytes").await,
        WATERMARK
    );
    assert_eq!(
        metric(&b, "rabbitmq_resident_memory_limit_bytes").await,
        1 << 30
    );

    // A holds 300 KiB: below its watermark, above B's paging threshold.
    let (apub, ach) = publisher(&a, "q").await;
    let mut a_events = Box::pin(apub.events_listener());
    publish_confirmed(&ach, "q", SMALL_COUNT, SMALL).await;
    // B gets 2 MiB and pages.
    let (bpub, bch) = publisher(&b, "p").await;
    publish_confirmed(&bch, "p", 32, BIG).await;
    wait_until("B paging", async || paged_out(&b, "p") > 0).await;
    assert!(page_files(&b) > 0);

    // A neither pages nor counts B's messages.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(paged_out(&a, "q"), 0, "A paged with B");
    assert_eq!(page_files(&a), 0);
    let a_used = metric(&a, "warren_message_memory_bytes").await;
    assert!(
        ((SMALL * SMALL_COUNT) as u64..WATERMARK).contains(&a_used),
        "A's message memory {a_used}"
    );
    assert_eq!(node(&a).await["mem_messages"], a_used);
    assert!(metric(&b, "warren_message_memory_bytes").await >= BIG as u64);

    // B's publisher leaves: what it did stays in B's totals (its counts move to them just after
    // it leaves the list of connections).
    bpub.close(200, "done".into()).await.expect("close");
    wait_until("B's publisher gone and counted", async || {
        let o = get_json(&b, "/api/overview").await;
        o["object_totals"]["connections"] == 0
            && o["churn_rates"]["connection_closed"] == 1
            && o["message_stats"]["publish"] == 32
    })
    .await;
    let (oa, ob) = (
        get_json(&a, "/api/overview").await,
        get_json(&b, "/api/overview").await,
    );
    assert_eq!(oa["message_stats"]["publish"], SMALL_COUNT, "{oa}");
    assert_eq!(ob["message_stats"]["publish"], 32, "{ob}");
    assert_eq!(oa["churn_rates"]["queue_declared"], 1);
    assert_eq!(ob["churn_rates"]["queue_declared"], 1);
    assert_eq!(oa["churn_rates"]["connection_closed"], 0);
    assert_eq!(ob["churn_rates"]["connection_closed"], 1);
    assert_eq!(metric(&a, "rabbitmq_connections_closed_total").await, 0);
    assert_eq!(metric(&b, "rabbitmq_connections_closed_total").await, 1);

    // Two 1 MiB messages raise A's memory alarm, and only A's.
    publish_confirmed(&ach, "q", 2, 1 << 20).await;
    wait_until("A's memory alarm", async || {
        node(&a).await["mem_alarm"] == true
    })
    .await;
    assert_eq!(get(&a, "/api/health/checks/alarms").await.status, 503);
    assert_eq!(metric(&a, "rabbitmq_alarms_memory_used_watermark").await, 1);
    assert_eq!(node(&b).await["mem_alarm"], false);
    assert_eq!(get(&b, "/api/health/checks/alarms").await.status, 200);
    assert_eq!(metric(&b, "rabbitmq_alarms_memory_used_watermark").await, 0);

    // A's publisher is blocked at its next publish; B's publishers are not.
    let held = ach
        .basic_publish(
            "".into(),
            "q".into(),
            Default::default(),
            b"held back",
            Default::default(),
        )
        .await
        .expect("publish");
    match next_event(&mut a_events).await {
        lapin::Event::ConnectionBlocked(reason) => assert_eq!(reason, "low on memory"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    let (bpub, bch) = publisher(&b, "p").await;
    publish_confirmed(&bch, "p", 4, SMALL).await;
    assert!(!bpub.status().blocked());

    // Emptying A's queue clears its alarm; the held publish goes through.
    let (_cc, cch) = a.channel().await;
    let purged = cch
        .queue_purge("q".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert_eq!(purged, SMALL_COUNT as u32 + 2);
    match next_event(&mut a_events).await {
        lapin::Event::ConnectionUnblocked => {}
        other => panic!("expected connection.unblocked, got {other:?}"),
    }
    assert!(held.await.expect("confirm").is_ack());
    assert_eq!(
        support::get_body(&cch, "q").await.as_deref(),
        Some(&b"held back"[..])
    );
    a.shutdown().await;
    b.shutdown().await;
}
