//! Queue paging: above the paging threshold (vm-memory-high-watermark ×
//! vm-memory-high-watermark-paging-ratio) queues move ready messages to page files under
//! `<data-dir>/paging/` and read them back at the head; nothing a client sees changes.
//!
//! The first two tests run the real binary (RSS, kill -9); the others run the broker in-process
//! with a tiny paging threshold so that every queue pages.

mod support;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use warren_broker::config::{Config, MemoryWatermark};

// ---------------------------------------------------------------------------------------------
// Message bodies: sequence number, checksum of the rest, then a pattern derived from the number.

fn body(seq: u64, len: usize) -> Vec<u8> {
    let mut block = [0u8; 64];
    for (i, b) in block.iter_mut().enumerate() {
        *b = (seq.wrapping_mul(2654435761).wrapping_add(i as u64 * 131) >> 3) as u8;
    }
    let mut rest = Vec::with_capacity(len);
    while rest.len() + 64 <= len - 16 {
        rest.extend_from_slice(&block);
    }
    rest.extend_from_slice(&block[..len - 16 - rest.len()]);
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&u64::from(crc32fast::hash(&rest)).to_le_bytes());
    out.extend_from_slice(&rest);
    out
}

/// The sequence number of a body whose checksum and content are right.
fn check(data: &[u8]) -> u64 {
    assert!(data.len() >= 16, "short body");
    let seq = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    let crc = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes"));
    assert_eq!(
        crc,
        u64::from(crc32fast::hash(&data[16..])),
        "checksum of #{seq}"
    );
    assert!(data == body(seq, data.len()), "content of #{seq}");
    seq
}

fn page_files(data: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(data.join("paging"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

async fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The real binary.

type Proc = support::proc::BrokerProc;

async fn spawn(data: &Path, watermark: &str, ratio: &str) -> Proc {
    let args: [&std::ffi::OsStr; 14] = [
        "--amqp".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--mgmt".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--prometheus".as_ref(),
        "127.0.0.1:0".as_ref(),
        "--data-dir".as_ref(),
        data.as_os_str(),
        "--disk-free-limit".as_ref(),
        "0".as_ref(),
        "--vm-memory-high-watermark".as_ref(),
        watermark.as_ref(),
        "--vm-memory-high-watermark-paging-ratio".as_ref(),
        ratio.as_ref(),
    ];
    support::proc::spawn(args, &[], &["amqp", "mgmt", "prometheus"]).await
}

impl Proc {
    fn rss_kib(&self) -> u64 {
        let pid = self.child.id().expect("pid");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS")
    }

    /// GET `path` on `addr` as guest; the response body (de-chunked).
    async fn http_get(addr: &str, path: &str) -> String {
        use base64::Engine;
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .expect("http connect");
        let auth = base64::engine::general_purpose::STANDARD.encode("guest:guest");
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {auth}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.expect("send");
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.expect("read");
        let text = String::from_utf8_lossy(&resp).into_owned();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let (head, body) = text.split_once("\r\n\r\n").expect("body");
        if !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            return body.to_string();
        }
        let mut out = String::new();
        let mut rest = body;
        loop {
            let (size, after) = rest.split_once("\r\n").expect("chunk size");
            let n = usize::from_str_radix(size.trim(), 16).expect("hex chunk size");
            if n == 0 {
                return out;
            }
            out.push_str(&after[..n]);
            rest = &after[n + 2..];
        }
    }

    /// GET /api/queues/%2f/{name}.
    async fn queue_json(&self, name: &str) -> serde_json::Value {
        let body = Self::http_get(self.addr("mgmt"), &format!("/api/queues/%2f/{name}")).await;
        serde_json::from_str(&body).expect("json")
    }

    /// The per-queue Prometheus sample `metric{vhost="/",queue="name"}`.
    async fn prometheus(&self, metric: &str, queue: &str) -> u64 {
        let body = Self::http_get(self.addr("prometheus"), "/metrics/per-object").await;
        let key = format!("{metric}{{vhost=\"/\",queue=\"{queue}\"}} ");
        let line = body
            .lines()
            .find(|l| l.starts_with(&key))
            .unwrap_or_else(|| panic!("no {key} in\n{body}"));
        line[key.len()..].trim().parse().expect("a number")
    }
}

async fn declare(ch: &Channel, name: &str, durable: bool, args: FieldTable) -> u32 {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare")
    .message_count()
}

/// Publishes `n` bodies of `len` bytes with confirms, `window` in flight; panics on a nack.
async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    seqs: std::ops::Range<u64>,
    len: usize,
    props: BasicProperties,
    window: usize,
) {
    let mut inflight = std::collections::VecDeque::new();
    for seq in seqs {
        let c = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body(seq, len),
                props.clone(),
            )
            .await
            .expect("publish");
        inflight.push_back(c);
        if inflight.len() >= window {
            let c = inflight.pop_front().expect("in flight");
            let conf = tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("confirm in time")
                .expect("confirm");
            assert!(conf.is_ack(), "publish nacked");
        }
    }
    for c in inflight {
        let conf = tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("confirm in time")
            .expect("confirm");
        assert!(conf.is_ack(), "publish nacked");
    }
}

/// Consumes exactly `n` messages (manual ack, prefetch 200); checks each body, returns the
/// sequence numbers and redelivered flags in delivery order.
async fn consume_n(ch: &Channel, queue: &str, n: usize) -> Vec<(u64, bool)> {
    ch.basic_qos(200, BasicQosOptions::default())
        .await
        .expect("qos");
    let tag = format!("c-{queue}");
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .unwrap_or_else(|_| panic!("delivery in time ({} of {n})", out.len()))
            .expect("consumer open")
            .expect("delivery");
        out.push((check(&d.data), d.redelivered));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_without_consumers_pages_far_beyond_the_threshold_and_gives_everything_back() {
    const N: u64 = 6400;
    const LEN: usize = 64 * 1024;
    let data = tempfile::tempdir().expect("tempdir");
    let b = spawn(data.path(), "64MiB", "0.5").await;
    let (_c, ch) = b.connect().await;
    declare(&ch, "big", false, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    // Sample RSS while ~400 MiB go in.
    let max_rss = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let pid = b.child.id().expect("pid");
    let sampler = {
        let (max_rss, stop) = (max_rss.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                if let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                    if let Some(kib) = s
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next())
                        .and_then(|v| v.parse::<u64>().ok())
                    {
                        max_rss.fetch_max(kib, Ordering::Relaxed);
                    }
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let started = tokio::time::Instant::now();
    publish_confirmed(&ch, "big", 0..N, LEN, BasicProperties::default(), 64).await;
    let elapsed = started.elapsed();
    stop.cancel();
    sampler.await.expect("sampler");
    let max_rss_mib = max_rss.load(Ordering::Relaxed) / 1024;
    eprintln!(
        "published {} MiB in {:.2?} ({:.0} MiB/s), max RSS {max_rss_mib} MiB",
        (N * LEN as u64) >> 20,
        elapsed,
        ((N * LEN as u64) >> 20) as f64 / elapsed.as_secs_f64()
    );
    assert!(
        max_rss_mib < 200,
        "RSS reached {max_rss_mib} MiB for 400 MiB queued"
    );
    // Publishers were never blocked: the alarm never went off.
    assert_eq!(
        b.log_count("alarm set"),
        0,
        "memory alarm raised while paging"
    );
    assert_eq!(b.log_count("queues page messages to disk"), 1);
    let q = b.queue_json("big").await;
    assert_eq!(q["messages"], N);
    let paged = q["messages_paged_out"]
        .as_u64()
        .expect("messages_paged_out");
    assert!(paged > N / 2, "only {paged} of {N} paged out");
    assert_eq!(
        q["messages_ram"].as_u64().expect("messages_ram") + paged,
        N,
        "{q}"
    );
    assert!(q["message_bytes_paged_out"].as_u64().expect("bytes") >= paged * LEN as u64);
    let listed: serde_json::Value =
        serde_json::from_str(&Proc::http_get(b.addr("mgmt"), "/api/queues").await).expect("json");
    let big = listed
        .as_array()
        .and_then(|a| a.iter().find(|q| q["name"] == "big"))
        .expect("big listed");
    assert_eq!(big["messages_paged_out"], paged, "{big}");
    let p = |m: &'static str| b.prometheus(m, "big");
    assert_eq!(p("rabbitmq_queue_messages_paged_out").await, paged);
    assert_eq!(p("rabbitmq_queue_messages_ram").await, N - paged);
    assert!(p("rabbitmq_queue_messages_paged_out_bytes").await >= paged * LEN as u64);
    assert!(p("rabbitmq_queue_messages_ram_bytes").await <= (N - paged) * LEN as u64);
    assert!(!page_files(data.path()).is_empty());
    // Everything comes back once, in order, intact.
    let started = tokio::time::Instant::now();
    let got = consume_n(&ch, "big", N as usize).await;
    let elapsed = started.elapsed();
    eprintln!(
        "consumed {} MiB in {:.2?} ({:.0} MiB/s)",
        (N * LEN as u64) >> 20,
        elapsed,
        ((N * LEN as u64) >> 20) as f64 / elapsed.as_secs_f64()
    );
    let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (0..N).collect::<Vec<_>>());
    assert!(got.iter().all(|(_, r)| !r));
    assert_eq!(declare(&ch, "big", false, FieldTable::default()).await, 0);
    // The head was read back before its delivery: no page file is left.
    assert_eq!(page_files(data.path()), Vec::<PathBuf>::new());
    let q = b.queue_json("big").await;
    assert_eq!(q["messages_paged_out"], 0);
    assert!(b.rss_kib() / 1024 < 200);
    b.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paged_persistent_messages_survive_kill_9_and_paged_transient_ones_do_not() {
    const N: u64 = 600;
    const LEN: usize = 32 * 1024;
    let data = tempfile::tempdir().expect("tempdir");
    // Paging from ~6 MiB on.
    let b = spawn(data.path(), "64MiB", "0.1").await;
    let (_c, ch) = b.connect().await;
    declare(&ch, "dur", true, FieldTable::default()).await;
    declare(&ch, "mixed", true, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let persistent = BasicProperties::default().with_delivery_mode(2);
    publish_confirmed(&ch, "dur", 0..N, LEN, persistent, 32).await;
    publish_confirmed(&ch, "mixed", 0..N, LEN, BasicProperties::default(), 32).await;
    for q in ["dur", "mixed"] {
        let j = b.queue_json(q).await;
        assert!(
            j["messages_paged_out"].as_u64().expect("paged") > N / 2,
            "{q}: {j}"
        );
    }
    assert!(!page_files(data.path()).is_empty());
    b.kill9().await;
    // A file of the previous run that no queue will reuse: gone after the restart.
    let stale = data.path().join("paging").join("stale.page");
    std::fs::write(&stale, b"left over").expect("stale file");
    let b = spawn(data.path(), "64MiB", "0.1").await;
    assert_eq!(b.log_count("page files of the previous run removed"), 1);
    assert!(!stale.exists(), "paging dir not wiped at boot");
    let (_c, ch) = b.connect().await;
    assert_eq!(declare(&ch, "mixed", true, FieldTable::default()).await, 0);
    assert_eq!(
        declare(&ch, "dur", true, FieldTable::default()).await,
        N as u32
    );
    let got = consume_n(&ch, "dur", N as usize).await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..N).collect::<Vec<_>>()
    );
    assert_eq!(declare(&ch, "dur", true, FieldTable::default()).await, 0);
    assert_eq!(page_files(data.path()), Vec::<PathBuf>::new());
    b.kill9().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_queue_pages_when_another_one_pushes_memory_over_the_threshold() {
    const LEN: usize = 64 * 1024;
    let data = tempfile::tempdir().expect("tempdir");
    // Paging above 32 MiB.
    let b = spawn(data.path(), "64MiB", "0.5").await;
    let (_c, ch) = b.connect().await;
    declare(&ch, "idle", false, FieldTable::default()).await;
    declare(&ch, "busy", false, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    // 20 MiB: below the threshold, nothing pages.
    publish_confirmed(&ch, "idle", 0..320, LEN, BasicProperties::default(), 32).await;
    assert_eq!(b.queue_json("idle").await["messages_paged_out"], 0);
    // 20 MiB more into another queue: over the threshold; the idle queue pages too.
    publish_confirmed(&ch, "busy", 0..320, LEN, BasicProperties::default(), 32).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let j = b.queue_json("idle").await;
        if j["messages_paged_out"].as_u64().expect("paged") > 200 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "idle queue never paged: {j}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = consume_n(&ch, "idle", 320).await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..320).collect::<Vec<_>>()
    );
    b.kill9().await;
}

// ---------------------------------------------------------------------------------------------
// In-process, every queue pages (threshold 64 KiB).

async fn start() -> support::TestBroker {
    support::start_with(Config {
        vm_memory_high_watermark: MemoryWatermark::Absolute(1 << 30),
        vm_memory_high_watermark_paging_ratio: 1.0 / 16384.0,
        ..Config::for_tests()
    })
    .await
}

fn queue(b: &support::TestBroker, name: &str) -> warren_broker::queue::QueueHandle {
    let vh = b.shared.vhost("/").expect("/");
    let q = vh.snapshot().queues.get(name).cloned();
    q.unwrap_or_else(|| panic!("no queue {name}"))
}

fn paged_out(b: &support::TestBroker, name: &str) -> u64 {
    queue(b, name).stats.paged_out.load(Ordering::Relaxed)
}

fn props(prio: Option<u8>) -> BasicProperties {
    let p = BasicProperties::default();
    match prio {
        Some(x) => p.with_priority(x),
        None => p,
    }
}

fn table(kv: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in kv {
        t.insert(ShortString::from(*k), v.clone());
    }
    t
}

const LEN: usize = 64 * 1024;

async fn fill(b: &support::TestBroker, ch: &Channel, q: &str, seqs: std::ops::Range<u64>) {
    let n = seqs.end;
    publish_confirmed(ch, q, seqs, LEN, BasicProperties::default(), 32).await;
    wait_until("paged out", 10, || paged_out(b, q) > n / 2).await;
}

#[tokio::test]
async fn a_priority_queue_delivers_by_priority_then_fifo_with_paging() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(
        &ch,
        "prio",
        false,
        table(&[("x-max-priority", AMQPValue::ShortShortUInt(4))]),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    for seq in 0..300u64 {
        ch.basic_publish(
            "".into(),
            "prio".into(),
            BasicPublishOptions::default(),
            &body(seq, LEN),
            props(Some((seq % 5) as u8)),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    wait_until("paged out", 10, || paged_out(&b, "prio") > 200).await;
    let got: Vec<u64> = consume_n(&ch, "prio", 300)
        .await
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    let mut want: Vec<u64> = (0..300).collect();
    want.sort_by_key(|s| (std::cmp::Reverse(s % 5), *s));
    assert_eq!(got, want);
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    b.shutdown().await;
}

#[tokio::test]
async fn requeued_messages_go_back_between_paged_neighbours_in_order() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "rq", false, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    fill(&b, &ch, "rq", 0..200).await;
    // Take 40 (more than the head window), then page out the rest again and nack them all.
    ch.basic_qos(40, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "rq".into(),
            "taker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut last = None;
    for i in 0..40u64 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("delivery in time")
            .expect("open")
            .expect("delivery");
        assert_eq!(check(&d.data), i);
        last = Some(d.delivery_tag);
    }
    ch.basic_cancel("taker".into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    // More publishes while they are out: the queue pages them too.
    publish_confirmed(&ch, "rq", 200..260, LEN, BasicProperties::default(), 32).await;
    wait_until("paged out", 10, || paged_out(&b, "rq") > 180).await;
    ch.basic_nack(
        last.expect("tag"),
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .expect("nack");
    let got = consume_n(&ch, "rq", 260).await;
    let want: Vec<(u64, bool)> = (0..260).map(|s| (s, s < 40)).collect();
    assert_eq!(got, want);
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    b.shutdown().await;
}

#[tokio::test]
async fn paged_messages_expire_and_are_dead_lettered_intact_in_order() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "dlq", false, FieldTable::default()).await;
    declare(
        &ch,
        "ttl",
        false,
        table(&[
            ("x-message-ttl", AMQPValue::LongInt(1500)),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from("")),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from("dlq")),
            ),
        ]),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    fill(&b, &ch, "ttl", 0..150).await;
    // A second queue with TTL and no dead-letter exchange: dropped without being read back.
    declare(
        &ch,
        "ttl-drop",
        false,
        table(&[("x-message-ttl", AMQPValue::LongInt(1500))]),
    )
    .await;
    fill(&b, &ch, "ttl-drop", 0..150).await;
    let got = consume_n(&ch, "dlq", 150).await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..150).collect::<Vec<_>>()
    );
    wait_until("ttl-drop expired", 10, || {
        queue(&b, "ttl-drop").message_count() == 0
    })
    .await;
    assert_eq!(queue(&b, "ttl").message_count(), 0);
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    b.shutdown().await;
}

#[tokio::test]
async fn drop_head_overflow_of_paged_messages_dead_letters_the_oldest() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "over-dlq", false, FieldTable::default()).await;
    declare(
        &ch,
        "capped",
        false,
        table(&[
            ("x-max-length", AMQPValue::LongInt(100)),
            (
                "x-dead-letter-exchange",
                AMQPValue::LongString(LongString::from("")),
            ),
            (
                "x-dead-letter-routing-key",
                AMQPValue::LongString(LongString::from("over-dlq")),
            ),
        ]),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    fill(&b, &ch, "capped", 0..100).await;
    publish_confirmed(&ch, "capped", 100..250, LEN, BasicProperties::default(), 32).await;
    let dropped = consume_n(&ch, "over-dlq", 150).await;
    assert_eq!(
        dropped.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..150).collect::<Vec<_>>()
    );
    let kept = consume_n(&ch, "capped", 100).await;
    assert_eq!(
        kept.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (150..250).collect::<Vec<_>>()
    );
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    b.shutdown().await;
}

#[tokio::test]
async fn purge_and_delete_remove_page_files() {
    let b = start().await;
    let (_c, ch) = b.channel().await;
    declare(&ch, "p", false, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    fill(&b, &ch, "p", 0..150).await;
    assert!(!page_files(b.data.path()).is_empty());
    let n = ch
        .queue_purge("p".into(), QueuePurgeOptions::default())
        .await
        .expect("purge");
    assert_eq!(n, 150);
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    assert_eq!(paged_out(&b, "p"), 0);
    fill(&b, &ch, "p", 0..150).await;
    assert!(!page_files(b.data.path()).is_empty());
    let n = ch
        .queue_delete("p".into(), QueueDeleteOptions::default())
        .await
        .expect("delete");
    assert_eq!(n, 150);
    wait_until("page files removed after delete", 5, || {
        page_files(b.data.path()).is_empty()
    })
    .await;
    // basic.get reads paged messages back too.
    declare(&ch, "g", false, FieldTable::default()).await;
    fill(&b, &ch, "g", 0..100).await;
    for seq in 0..100 {
        let m = ch
            .basic_get("g".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("a message");
        assert_eq!(check(&m.delivery.data), seq);
    }
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    b.shutdown().await;
}

#[tokio::test]
async fn an_unwritable_page_directory_keeps_messages_in_memory_until_it_is_back() {
    let b = start().await;
    let dir = b.data.path().join("paging");
    std::fs::remove_dir_all(&dir).expect("remove paging dir");
    // A file in the way: creating segments fails (ENOTDIR), whoever the test runs as.
    std::fs::write(&dir, b"not a directory").expect("file");
    let (_c, ch) = b.channel().await;
    declare(&ch, "w", false, FieldTable::default()).await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    publish_confirmed(&ch, "w", 0..100, LEN, BasicProperties::default(), 32).await;
    assert_eq!(queue(&b, "w").message_count(), 100);
    assert_eq!(paged_out(&b, "w"), 0);
    // Back: the queue pages again after its pause (one more publish wakes it).
    std::fs::remove_file(&dir).expect("remove file");
    std::fs::create_dir(&dir).expect("dir");
    let back = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seq = 100;
    while paged_out(&b, "w") == 0 {
        assert!(tokio::time::Instant::now() < back, "paging did not resume");
        publish_confirmed(&ch, "w", seq..seq + 1, LEN, BasicProperties::default(), 1).await;
        seq += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = consume_n(&ch, "w", seq as usize).await;
    assert_eq!(
        got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        (0..seq).collect::<Vec<_>>()
    );
    assert_eq!(page_files(b.data.path()), Vec::<PathBuf>::new());
    b.shutdown().await;
}
