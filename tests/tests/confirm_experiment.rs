//! The confirm_publish experiment in Rust: a lapin publisher sends numbered messages to
//! warren-broker through warren-lb while the load balancer resets the connection right after
//! every Kth `basic.publish` it forwards (discarding the content frames it already read) and
//! every few hundred milliseconds. A consumer connected straight to the broker counts what
//! arrived.
//!
//! Without publisher confirms, a publish whose bytes were written to the socket counts as sent,
//! so every message caught in a reset window vanishes without the publisher knowing. With
//! confirms, a message counts as sent only once the broker acked it; anything unconfirmed when
//! the connection dies is republished on a new connection: nothing is lost, and a message
//! stored whose ack was lost is delivered twice (at-least-once, counted as a duplicate).
//!
//! Everything runs in this process (broker and load balancer through their libraries) on
//! loopback ports picked by the kernel.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Upper bound for any single network step (publish, confirm, delivery).
const WAIT: Duration = Duration::from_secs(10);
/// Upper bound for a connection handshake (TCP, AMQP, channel.open), on loopback a few ms.
/// lapin 4.12's `Connection::connect` does not always return when the connection is reset in
/// the middle of the handshake (seen with periodic resets), so the client gives up and
/// reconnects, as a production client with a connect timeout would.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// The end-of-run marker, published straight to the broker after the publisher is done.
const SENTINEL: &[u8] = b"end";
/// Every connection through the balancer is reset right after its Kth publish.
const NTH_PUBLISH: u64 = 97;
/// Publishes in flight (unconfirmed) at most, with confirms.
const WINDOW: usize = 16;
/// The experiment's rule that resets a connection right after a publish.
const PUBLISH_RULE: &str = "publish-window";
/// The same rule made by warren-lb's `--reset-after-publish N` (the README's quick start).
const QUICK_START_RULE: &str = "reset-after-publish";

/// warren-broker and warren-lb in front of it, in process.
struct Rig {
    broker_addr: SocketAddr,
    lb_addr: SocketAddr,
    lb: warren_lb::Handle,
    stops: Vec<(CancellationToken, JoinHandle<()>)>,
}

impl Rig {
    /// The experiment's own balancer: both rules drop what the proxy holds, so the bytes of a
    /// publish already read from the client are never written to the broker.
    async fn start() -> Rig {
        Rig::start_with(|broker_addr| {
            let toml = format!(
                r#"
                [chaos]
                seed = 7

                [[listener]]
                name = "amqp"
                bind = "127.0.0.1:0"
                backends = ["{broker_addr}"]
                drain_timeout = "300ms"
                health = {{ interval = "3600s" }}

                [[listener.fault]]
                name = "{PUBLISH_RULE}"
                kind = "reset"
                on_amqp = "basic.publish"
                nth = {NTH_PUBLISH}
                direction = "upstream"
                style = "rst"
                in_flight = "drop"

                [[listener.fault]]
                name = "elb-periodic"
                kind = "reset"
                every = "400ms"
                style = "rst"
                in_flight = "drop"
                "#
            );
            warren_lb::Config::from_toml_str(&toml).expect("lb config")
        })
        .await
    }

    /// A broker, and a balancer in front of it with the configuration `lb_config` makes for the
    /// broker's address (its listener must be named `amqp` or `default`).
    async fn start_with(lb_config: impl FnOnce(SocketAddr) -> warren_lb::Config) -> Rig {
        let bound = warren_broker::Broker::bind(warren_broker::config::Config::for_tests())
            .await
            .expect("broker binds");
        let broker_addr = bound.amqp_addrs[0];
        let broker_stop = CancellationToken::new();
        let broker = tokio::spawn(bound.run(broker_stop.clone()));

        let cfg = lb_config(broker_addr);
        let bound = warren_lb::Lb::bind(cfg).await.expect("lb binds");
        let lb_addr = bound
            .addr("amqp")
            .or_else(|| bound.addr("default"))
            .expect("amqp listener");
        let lb = bound.handle();
        let lb_stop = CancellationToken::new();
        let lb_task = tokio::spawn(bound.run(lb_stop.clone()));
        Rig {
            broker_addr,
            lb_addr,
            lb,
            stops: vec![(lb_stop, lb_task), (broker_stop, broker)],
        }
    }

    /// The balancer's `reset` events so far.
    fn resets(&self) -> Vec<serde_json::Value> {
        let events = self.lb.shared().events().recent();
        assert!(
            events.len() < warren_lb::events::RING_CAPACITY,
            "the event ring overflowed: counts would be wrong"
        );
        events
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("event is JSON"))
            .filter(|e| e["event"] == "reset")
            .collect()
    }

    async fn stop(self) {
        for (token, task) in self.stops {
            token.cancel();
            let _ = tokio::time::timeout(WAIT, task).await;
        }
    }
}

async fn connect(addr: SocketAddr, within: Duration) -> lapin::Result<(Connection, Channel)> {
    let uri = format!("amqp://guest:guest@{addr}/%2f");
    let step = async {
        let conn = Connection::connect(&uri, ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    };
    match tokio::time::timeout(within, step).await {
        Ok(r) => r,
        Err(_) => Err(lapin::Error::from(
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
        )),
    }
}

/// Connects through the balancer; a periodic reset may hit the handshake, so it tries again.
async fn connect_through(addr: SocketAddr) -> (Connection, Channel) {
    let mut last = None;
    for _ in 0..50 {
        match connect(addr, CONNECT_TIMEOUT).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
    }
    panic!("no connection through the balancer in 50 attempts: {last:?}");
}

async fn publish(ch: &Channel, queue: &str, body: &[u8]) -> lapin::Result<lapin::PublisherConfirm> {
    let fut = ch.basic_publish(
        "".into(),
        queue.into(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default().with_delivery_mode(2),
    );
    match tokio::time::timeout(WAIT, fut).await {
        Ok(r) => r,
        Err(_) => Err(lapin::Error::from(
            lapin::ErrorKind::InvalidConnectionState(lapin::ConnectionState::Closed),
        )),
    }
}

/// Closes a healthy connection cleanly (connection.close through the balancer); a failed one is
/// dropped: lapin's close on a connection the balancer reset can wait for a close-ok that never
/// comes.
async fn close_unless_failed(conn: Connection, failed: bool) {
    if !failed {
        let _ = tokio::time::timeout(WAIT, conn.close(200, "done".into())).await;
    }
}

fn body(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

#[derive(Debug, Default)]
struct Publisher {
    /// Ids the publisher believes delivered: publish written (no confirms) or acked.
    sent: Vec<u64>,
    /// Publishes of an id that already went out once (after a failure).
    republished: u64,
    /// Connections opened through the balancer.
    connections: u64,
}

/// Publishes 0..n without confirms; a publish that returns an error is sent again on a new
/// connection (the application knows about that one), one that returned Ok is done.
async fn publish_without_confirms(addr: SocketAddr, queue: &str, n: u64) -> Publisher {
    let mut p = Publisher::default();
    let mut next = 0;
    let mut failed_once = false;
    while next < n {
        let (conn, ch) = connect_through(addr).await;
        p.connections += 1;
        while next < n {
            if failed_once {
                p.republished += 1;
            }
            match publish(&ch, queue, &body(next)).await {
                Ok(_) => {
                    p.sent.push(next);
                    next += 1;
                    failed_once = false;
                }
                Err(_) => {
                    failed_once = true;
                    break;
                }
            }
        }
        close_unless_failed(conn, failed_once).await;
    }
    p
}

/// Publishes 0..n with confirms, up to WINDOW unconfirmed; when the connection fails, every
/// unconfirmed id is republished on a new one.
async fn publish_with_confirms(addr: SocketAddr, queue: &str, n: u64) -> Publisher {
    let mut p = Publisher::default();
    let mut next = 0;
    let mut again: VecDeque<u64> = VecDeque::new();
    while next < n || !again.is_empty() {
        let (conn, ch) = connect_through(addr).await;
        p.connections += 1;
        let selected =
            tokio::time::timeout(WAIT, ch.confirm_select(ConfirmSelectOptions::default())).await;
        if !matches!(selected, Ok(Ok(()))) {
            continue;
        }
        let mut inflight: VecDeque<(u64, lapin::PublisherConfirm)> = VecDeque::new();
        let mut failed: Option<u64> = None;
        loop {
            while inflight.len() < WINDOW {
                let (id, retry) = match again.pop_front() {
                    Some(id) => (id, true),
                    None if next < n => {
                        next += 1;
                        (next - 1, false)
                    }
                    None => break,
                };
                p.republished += u64::from(retry);
                match publish(&ch, queue, &body(id)).await {
                    Ok(c) => inflight.push_back((id, c)),
                    Err(_) => {
                        failed = Some(id);
                        break;
                    }
                }
            }
            if failed.is_some() {
                break;
            }
            let Some((id, confirm)) = inflight.pop_front() else {
                break;
            };
            match tokio::time::timeout(WAIT, confirm).await {
                Ok(Ok(c)) if c.is_ack() => p.sent.push(id),
                _ => {
                    failed = Some(id);
                    break;
                }
            }
        }
        // Unconfirmed: the failed one and everything behind it goes out again.
        again.extend(failed);
        again.extend(inflight.drain(..).map(|(id, _)| id));
        close_unless_failed(conn, failed.is_some()).await;
    }
    p
}

/// Consumes `queue` straight from the broker (no chaos on this side) until the sentinel;
/// returns how many times each id arrived.
async fn consume_until_sentinel(broker: SocketAddr, queue: String) -> HashMap<u64, u32> {
    let (_conn, ch) = connect(broker, WAIT)
        .await
        .expect("consumer connects to the broker");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "counter".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("basic.consume");
    let mut seen: HashMap<u64, u32> = HashMap::new();
    loop {
        let d = tokio::time::timeout(Duration::from_secs(30), consumer.next())
            .await
            .expect("deliveries keep coming until the sentinel")
            .expect("consumer open")
            .expect("delivery");
        if d.data == SENTINEL {
            return seen;
        }
        let id = u64::from_be_bytes(d.data.as_slice().try_into().expect("8-byte id"));
        *seen.entry(id).or_default() += 1;
    }
}

#[derive(Debug)]
struct Outcome {
    publisher: Publisher,
    executed: usize,
    lost: Vec<u64>,
    duplicated: u64,
    resets: Vec<serde_json::Value>,
}

impl Outcome {
    fn on_publish_resets(&self) -> Vec<&serde_json::Value> {
        self.resets
            .iter()
            .filter(|e| e["rule"] == PUBLISH_RULE || e["rule"] == QUICK_START_RULE)
            .collect()
    }

    fn discarded_upstream(&self) -> u64 {
        self.resets
            .iter()
            .filter_map(|e| e["discarded_upstream"].as_u64())
            .sum()
    }
}

async fn experiment(confirms: bool, n: u64) -> Outcome {
    run_experiment(Rig::start().await, confirms, n).await
}

async fn run_experiment(rig: Rig, confirms: bool, n: u64) -> Outcome {
    let queue = format!("experiment.{}", if confirms { "confirm" } else { "plain" });
    {
        let (conn, ch) = connect(rig.broker_addr, WAIT)
            .await
            .expect("direct connection");
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("queue.declare");
        let _ = conn.close(200, "declared".into()).await;
    }
    let counter = tokio::spawn(consume_until_sentinel(rig.broker_addr, queue.clone()));
    let publisher = if confirms {
        publish_with_confirms(rig.lb_addr, &queue, n).await
    } else {
        publish_without_confirms(rig.lb_addr, &queue, n).await
    };
    let resets = rig.resets();
    // The sentinel goes straight to the broker, confirmed, after the publisher closed its last
    // connection cleanly: the queue is FIFO, so when it arrives everything published before it
    // that the broker stored has been delivered.
    {
        let (conn, ch) = connect(rig.broker_addr, WAIT)
            .await
            .expect("direct connection");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let c = publish(&ch, &queue, SENTINEL)
            .await
            .expect("sentinel published")
            .await
            .expect("sentinel confirmed");
        assert!(c.is_ack());
        let _ = conn.close(200, "sentinel".into()).await;
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), counter)
        .await
        .expect("consumer done in time")
        .expect("consumer task");
    rig.stop().await;
    let lost = publisher
        .sent
        .iter()
        .copied()
        .filter(|id| !seen.contains_key(id))
        .collect();
    let duplicated = seen.values().map(|c| u64::from(c - 1)).sum();
    let outcome = Outcome {
        executed: seen.len(),
        lost,
        duplicated,
        resets,
        publisher,
    };
    eprintln!(
        "confirms={confirms} n={n}: sent {} (republished {}, connections {}), received {}, lost {}, \
         duplicated {}, resets {} ({} after a publish), discarded upstream {} bytes",
        outcome.publisher.sent.len(),
        outcome.publisher.republished,
        outcome.publisher.connections,
        outcome.executed,
        outcome.lost.len(),
        outcome.duplicated,
        outcome.resets.len(),
        outcome.on_publish_resets().len(),
        outcome.discarded_upstream(),
    );
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_confirms_publishes_in_a_reset_window_are_lost() {
    let n = 3000;
    let o = experiment(false, n).await;
    assert_eq!(o.publisher.sent.len() as u64, n, "every id went out once");
    // How many messages lapin has written by the time it notices a reset varies (it batches
    // writes), so the number of cuts does too; the accounting below holds for any of them.
    let cuts = o.on_publish_resets();
    assert!(!cuts.is_empty(), "no publish-window reset");
    // The fault really discarded publishes: a cut with the rest of a publish in hand.
    let dropped = cuts
        .iter()
        .filter(|e| e["discarded_upstream"].as_u64().unwrap_or(0) > 0)
        .count();
    assert!(
        dropped > 0,
        "no publish-window reset discarded bytes: {cuts:?}"
    );
    // Each of those resets swallowed at least the publish it cut, which the publisher had
    // written without error: silent loss.
    assert!(!o.lost.is_empty(), "nothing lost: {o:?}");
    assert!(
        o.lost.len() >= dropped,
        "{} lost, {dropped} resets discarded a publish",
        o.lost.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_confirms_and_republishing_nothing_is_lost() {
    let n = 5000;
    let o = experiment(true, n).await;
    assert_eq!(o.publisher.sent.len() as u64, n, "every id confirmed once");
    let cuts = o.on_publish_resets();
    assert!(
        cuts.len() >= 24,
        "dozens of publish-window resets: {}",
        cuts.len()
    );
    assert!(o.discarded_upstream() > 0, "the resets discarded publishes");
    assert!(
        o.publisher.republished > 0,
        "unconfirmed publishes were sent again"
    );
    assert_eq!(o.lost, Vec::<u64>::new(), "confirmed but never delivered");
    assert_eq!(o.executed as u64, n);
}

// ---------------------------------------------------------------- the README's quick start

/// The warren-lb command line of README.md's quick start, as words (the binary left out):
/// the line that starts `target/release/warren-lb --listen` after `## Quick start`, with its
/// backslash continuations, up to the `&` that sends it to the background.
fn quick_start_lb_args() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md");
    let section = readme
        .split("\n## Quick start")
        .nth(1)
        .expect("README.md has a `## Quick start` section");
    let mut words = Vec::new();
    let lines = section
        .lines()
        .map(str::trim)
        .skip_while(|l| !l.starts_with("target/release/warren-lb --listen"));
    for line in lines {
        let (text, more) = match line.strip_suffix('\\') {
            Some(t) => (t, true),
            None => (line, false),
        };
        words.extend(text.split_whitespace().map(str::to_string));
        if !more {
            break;
        }
    }
    assert!(!words.is_empty(), "no warren-lb command in the quick start");
    assert_eq!(words.remove(0), "target/release/warren-lb");
    if words.last().map(String::as_str) == Some("&") {
        words.pop();
    }
    words
}

/// The quick start's warren-lb, configured from README's command line through warren-lb's own
/// flag parsing, with the addresses swapped for loopback port 0 and the test's broker.
async fn quick_start_rig() -> Rig {
    let words = quick_start_lb_args();
    for flag in ["--reset-after-publish", "--reset-every"] {
        assert!(
            words.iter().any(|w| w == flag),
            "the quick start shows {flag}: {words:?}"
        );
    }
    Rig::start_with(|broker| {
        let mut args = vec!["warren-lb".to_string()];
        let mut it = words.iter();
        while let Some(w) = it.next() {
            args.push(w.clone());
            let swap = match w.as_str() {
                "--listen" | "--admin" => Some("127.0.0.1:0".to_string()),
                "--backend" => Some(broker.to_string()),
                _ => None,
            };
            if let Some(value) = swap {
                it.next().expect("a value after the flag");
                args.push(value);
            }
        }
        let cli = warren_lb::cli::Cli::try_parse_args(&args)
            .unwrap_or_else(|e| panic!("README's quick start {args:?}: {e}"));
        cli.load()
            .unwrap_or_else(|e| panic!("README's quick start {args:?}: {e}"))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_loses_messages_without_confirms() {
    let n = 1200;
    let o = run_experiment(quick_start_rig().await, false, n).await;
    assert_eq!(o.publisher.sent.len() as u64, n, "every id went out once");
    let cuts = o.on_publish_resets();
    assert!(!cuts.is_empty(), "no reset-after-publish reset: {o:?}");
    assert!(o.discarded_upstream() > 0, "the resets discarded publishes");
    assert!(!o.lost.is_empty(), "nothing lost without confirms: {o:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quick_start_loses_nothing_with_confirms() {
    let n = 1200;
    let o = run_experiment(quick_start_rig().await, true, n).await;
    assert_eq!(o.publisher.sent.len() as u64, n, "every id confirmed once");
    let cuts = o.on_publish_resets();
    assert!(cuts.len() >= 5, "resets after a publish: {}", cuts.len());
    assert!(
        o.publisher.republished > 0,
        "unconfirmed publishes were sent again"
    );
    assert_eq!(o.lost, Vec::<u64>::new(), "confirmed but never delivered");
    assert_eq!(o.executed as u64, n);
}
