//! What a general-purpose client costs per message, for comparison with warren-perf's own cost:
//! the transient 1 producer / 1 consumer scenario (16-byte bodies, no confirms, no-ack consumer)
//! written with lapin, reporting this process's CPU time per message from /proc like warren-perf.
//!
//!     cargo run --release -p warren-perf --example lapin_cost -- amqp://guest:guest@127.0.0.1:5672/%2f 10
//!
//! Not part of the tool: it exists to put a number on "a client that costs ~3 µs per message"
//! in docs/benchmarks.md.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use futures_lite::StreamExt as _;
use lapin::{
    options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
    BasicProperties, Connection, ConnectionProperties,
};
use tokio::time::Instant;
use warren_perf::cpu::{self, Proc};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let uri = args
        .next()
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let secs: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(10);
    let queue = "lapin-cost";

    let cconn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .context("consumer connect")?;
    let cch = cconn.create_channel().await?;
    cch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    let mut consumer = cch
        .basic_consume(
            queue.into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let pconn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .context("producer connect")?;
    let pch = pconn.create_channel().await?;

    let received = Arc::new(AtomicU64::new(0));
    let hz = cpu::clock_ticks_per_sec();
    let cpu0 = cpu::cpu_time_ns(Proc::SelfProc, hz)?;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(secs);

    let counter = received.clone();
    let consuming = tokio::spawn(async move {
        while let Ok(Some(Ok(_))) = tokio::time::timeout_at(deadline, consumer.next()).await {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let body = [0u8; 16];
    let mut sent: u64 = 0;
    while Instant::now() < deadline {
        // Without confirm mode the returned confirmation is already settled (NotRequested).
        pch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await?
        .await?;
        sent += 1;
    }
    consuming.await?;
    let cpu1 = cpu::cpu_time_ns(Proc::SelfProc, hz)?;
    let elapsed = start.elapsed().as_secs_f64();
    let got = received.load(Ordering::Relaxed);
    let msgs = sent.max(got).max(1);
    println!(
        "lapin 1P/1C 16 B transient: sent {:.0} msg/s, received {:.0} msg/s, client CPU {:.2} s = {:.3} µs/msg",
        sent as f64 / elapsed,
        got as f64 / elapsed,
        (cpu1 - cpu0) as f64 / 1e9,
        (cpu1 - cpu0) as f64 / 1e3 / msgs as f64
    );
    let _ = pconn.close(200, "bye".into()).await;
    let _ = cconn.close(200, "bye".into()).await;
    Ok(())
}
