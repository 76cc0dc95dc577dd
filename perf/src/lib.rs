//! warren-perf: a load generator for AMQP 0-9-1 brokers with RabbitMQ PerfTest's flags.
//!
//! The point of the tool is to measure the broker and not itself: on a small machine the client
//! shares the cores with the broker, so every microsecond the client spends per message is taken
//! from the broker. It therefore speaks AMQP itself (on `amq-protocol`'s codec) with pipelined,
//! batched writes, publishes copied from a template encoded once, and a consumer that reads only
//! the few fields it needs, with no allocation per message.
//!
//! # Layout
//! - [`config`]: command line (PerfTest letters) and validated [`config::Config`].
//! - [`codec`]: pure framing: raw frame splitting, fast field readers, ack encoder, publish
//!   template; control frames through `amq-protocol`.
//! - [`connection`]: connect, handshake, channel 1, queue.declare/confirm.select/qos/consume, close.
//! - [`producer`]: publisher loop with the confirm window and rate limit.
//! - [`consumer`]: delivery loop with (multi-)acks and body-stamp latency.
//! - [`histogram`]: allocation-free log-linear latency histogram.
//! - [`ids`]: sets of message ids (confirmed, delivered) for a loss check.
//! - [`stats`]: counters and histograms shared with the reporter.
//! - [`cpu`]: CPU time and RSS from `/proc`.
//! - [`report`]: progress lines, text and JSON summary.
//! - [`storm`]: the reconnect storm (`warren-storm`): idle consumers behind warren-lb, all reset
//!   at once, timed until they consume again.
//!
//! [`run`] is the entry point; `main.rs` only parses arguments and prints.

pub mod codec;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod cpu;
pub mod histogram;
pub mod ids;
pub mod producer;
pub mod report;
pub mod stats;
pub mod storm;

use std::{sync::Arc, time::Duration};

use tokio::{task::JoinSet, time::Instant};

use crate::{
    codec::PublishTemplate,
    config::Config,
    connection::{Conn, ConnError, CHANNEL},
    cpu::Proc,
    report::{ConfirmGap, Cpu, Ids, Latency, Second, Summary},
    stats::{Stats, StatsSnapshot},
};

/// A run that could not start.
#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct SetupError {
    what: String,
    #[source]
    source: ConnError,
}

fn setup(what: impl Into<String>) -> impl FnOnce(ConnError) -> SetupError {
    let what = what.into();
    move |source| SetupError { what, source }
}

/// Where progress lines go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressTo {
    /// Standard output.
    Stdout,
    /// Standard error (when stdout carries JSON).
    Stderr,
}

impl ProgressTo {
    fn print(self, line: &str) {
        match self {
            ProgressTo::Stdout => println!("{line}"),
            ProgressTo::Stderr => eprintln!("{line}"),
        }
    }
}

/// Sets up all connections (consumers first, so nothing is published before it can be consumed),
/// runs producers and consumers for the configured time while printing a line per second, closes
/// everything and returns the summary.
pub async fn run(cfg: &Config, progress: ProgressTo) -> Result<Summary, SetupError> {
    let stats = Arc::new(Stats::default());
    let hz = cpu::clock_ticks_per_sec();
    // Our producers stamp bodies from now on; older stamps reaching our consumers are not ours.
    let not_before = if cfg.producers > 0 {
        producer::unix_ns()
    } else {
        0
    };

    let mut consumers = Vec::new();
    for i in 0..cfg.consumers {
        let what = format!("consumer {i}");
        let mut c = connection::connect(&cfg.consumer_endpoint, &format!("warren-perf {what}"))
            .await
            .map_err(setup(format!(
                "{what}: connect to {}:{}",
                cfg.consumer_endpoint.host, cfg.consumer_endpoint.port
            )))?;
        c.declare_queue(&cfg.queue)
            .await
            .map_err(setup(format!("{what}: queue.declare {}", cfg.queue.name)))?;
        if cfg.prefetch > 0 {
            c.qos(cfg.prefetch)
                .await
                .map_err(setup(format!("{what}: basic.qos")))?;
        }
        c.consume(&cfg.queue.name, cfg.auto_ack)
            .await
            .map_err(setup(format!("{what}: basic.consume")))?;
        consumers.push(c);
    }
    let mut producers = Vec::new();
    for i in 0..cfg.producers {
        let what = format!("producer {i}");
        let mut c = connection::connect(&cfg.endpoint, &format!("warren-perf {what}"))
            .await
            .map_err(setup(format!("{what}: connect to {}", cfg.echo.broker)))?;
        c.declare_queue(&cfg.queue)
            .await
            .map_err(setup(format!("{what}: queue.declare {}", cfg.queue.name)))?;
        if cfg.confirms.is_some() {
            c.confirm_select()
                .await
                .map_err(setup(format!("{what}: confirm.select")))?;
        }
        let template = PublishTemplate::with_mandatory(
            CHANNEL,
            "",
            &cfg.queue.name,
            cfg.size,
            cfg.persistent,
            cfg.mandatory,
            c.frame_max,
        )
        .map_err(|e| setup(format!("{what}: encode publish"))(e.into()))?;
        producers.push((c, template));
    }

    let start = Instant::now();
    let start_unix_ns = producer::unix_ns();
    let deadline = start + cfg.duration;
    let self0 = cpu::cpu_time_ns(Proc::SelfProc, hz).ok();
    let broker0 = cfg
        .broker_pid
        .and_then(|pid| cpu::cpu_time_ns(Proc::Pid(pid), hz).ok());

    let mut tasks: JoinSet<(String, Result<Conn, ConnError>)> = JoinSet::new();
    for (i, c) in consumers.into_iter().enumerate() {
        let ccfg = consumer::ConsumerConfig {
            auto_ack: cfg.auto_ack,
            ack_every: cfg.ack_every,
            not_before,
            exit_idle: cfg.exit_idle,
            track_ids: cfg.track_ids,
        };
        let stats = stats.clone();
        tasks.spawn(async move {
            (
                format!("consumer {i}"),
                consumer::run(c, ccfg, stats, deadline).await,
            )
        });
    }
    for (i, (c, template)) in producers.into_iter().enumerate() {
        let pcfg = producer::ProducerConfig {
            template,
            rate: cfg.rate,
            confirms: cfg.confirms,
            batch_bytes: cfg.batch_bytes,
            track_ids: cfg.track_ids,
        };
        let stats = stats.clone();
        tasks.spawn(async move {
            (
                format!("producer {i}"),
                producer::run(c, pcfg, stats, start, deadline).await,
            )
        });
    }

    // One line per second until the deadline (with --exit-when idle: or until every task ended).
    let mut per_second = Vec::new();
    let mut prev = StatsSnapshot::default();
    let mut prev_t = start;
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    let mut conns = Vec::new();
    let mut errors = Vec::new();
    let mut joined = |j: Result<(String, Result<Conn, ConnError>), tokio::task::JoinError>| match j
    {
        Ok((_, Ok(c))) => conns.push(c),
        Ok((who, Err(e))) => errors.push(format!("{who}: {e}")),
        Err(e) => errors.push(format!("task failed: {e}")),
    };
    loop {
        let t = if cfg.exit_idle.is_some() {
            tokio::select! {
                t = tick.tick() => t,
                j = tasks.join_next() => match j {
                    Some(j) => { joined(j); continue; }
                    None => break,
                },
            }
        } else {
            tick.tick().await
        };
        if t > deadline + Duration::from_millis(100) {
            break;
        }
        let snap = stats.snapshot();
        let now = Instant::now();
        let sec = Second::new(
            (now - start).as_secs_f64(),
            (now - prev_t).as_secs_f64(),
            &snap.since(&prev),
        );
        progress.print(&sec.line());
        per_second.push(sec);
        prev = snap;
        prev_t = now;
        if t >= deadline {
            break;
        }
    }

    while let Some(j) = tasks.join_next().await {
        joined(j);
    }
    let elapsed = (Instant::now().min(deadline) - start)
        .as_secs_f64()
        .max(1e-9);
    let self1 = cpu::cpu_time_ns(Proc::SelfProc, hz).ok();
    let broker1 = cfg
        .broker_pid
        .and_then(|pid| cpu::cpu_time_ns(Proc::Pid(pid), hz).ok());
    let broker_rss_kib = cfg.broker_pid.and_then(|pid| cpu::rss_kib(Proc::Pid(pid)));
    let fin = stats.snapshot();
    let confirm_gaps: Vec<ConfirmGap> = stats
        .gaps
        .lock()
        .map(|g| {
            g.gaps()
                .iter()
                .map(|g| ConfirmGap::new(g, start_unix_ns))
                .collect()
        })
        .unwrap_or_default();
    let ids = cfg.track_ids.then(|| {
        let confirmed = stats.confirmed_ids.lock().map(|s| s.ranges()).ok();
        let consumed = stats.consumed_ids.lock().map(|s| s.ranges()).ok();
        Ids {
            confirmed: (cfg.producers > 0).then_some(confirmed).flatten(),
            consumed: (cfg.consumers > 0).then_some(consumed).flatten(),
        }
    });

    let mut closing = JoinSet::new();
    for c in conns {
        closing.spawn(c.close());
    }
    while closing.join_next().await.is_some() {}

    let messages = fin.sent.max(fin.received);
    let cpu_of = |a: Option<u64>, b: Option<u64>| {
        let (a, b) = (a?, b?);
        let ns = b.saturating_sub(a);
        Some(Cpu {
            cpu_s: ns as f64 / 1e9,
            us_per_msg: (messages > 0).then(|| ns as f64 / 1e3 / messages as f64),
            core_percent: ns as f64 / 1e9 / elapsed * 100.0,
        })
    };
    Ok(Summary {
        tool: "warren-perf",
        config: cfg.echo.clone(),
        elapsed_s: elapsed,
        sent: fin.sent,
        received: fin.received,
        confirmed: fin.confirmed,
        nacked: fin.nacked,
        returned: fin.returned,
        stale: fin.stale,
        messages,
        sent_rate: fin.sent as f64 / elapsed,
        received_rate: fin.received as f64 / elapsed,
        confirmed_rate: fin.confirmed as f64 / elapsed,
        confirm_latency_us: Latency::from_snapshot(&fin.confirm_latency),
        consumer_latency_us: Latency::from_snapshot(&fin.consumer_latency),
        longest_confirm_gap: confirm_gaps.first().cloned(),
        confirm_gaps,
        confirmed_ids: ids
            .as_ref()
            .and_then(|i| i.confirmed.as_ref())
            .map(|r| r.count),
        consumed_ids: ids
            .as_ref()
            .and_then(|i| i.consumed.as_ref())
            .map(|r| r.count),
        duplicate_deliveries: ids
            .as_ref()
            .and_then(|i| i.consumed.as_ref())
            .map(|r| r.duplicates),
        ids,
        perf_cpu: cpu_of(self0, self1),
        broker_pid: cfg.broker_pid,
        broker_cpu: cpu_of(broker0, broker1),
        broker_rss_kib,
        per_second,
        errors,
    })
}
