//! Short connections per second: each worker loops connect, send a small request, read the echo,
//! close, until the duration is over.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::errors::ErrorCounts;
use crate::hist::Histogram;
use crate::{fmt_us, payload, per_sec, round_trip};

/// Connection-rate workload settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddr,
    pub duration: Duration,
    /// Workers, each with at most one connection in progress.
    pub concurrency: usize,
    /// Request size in bytes.
    pub size: usize,
    /// Bound for each connect, write and read.
    pub timeout: Duration,
}

/// What a connection-rate run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: SocketAddr,
    pub concurrency: usize,
    pub size: usize,
    pub elapsed: Duration,
    pub connections: u64,
    pub errors: ErrorCounts,
    /// Time of one whole connection: connect to response read.
    pub conn_time: Histogram,
}

struct Worker {
    ok: u64,
    errors: ErrorCounts,
    hist: Histogram,
}

async fn worker(cfg: Config, deadline: Instant) -> Worker {
    let req = payload(cfg.size);
    let mut buf = vec![0u8; cfg.size];
    let mut w = Worker {
        ok: 0,
        errors: ErrorCounts::default(),
        hist: Histogram::new(),
    };
    while Instant::now() < deadline {
        let t0 = Instant::now();
        let mut stream = match crate::connect(cfg.target, cfg.timeout).await {
            Ok(s) => s,
            Err((f, msg)) => {
                w.errors.add(f, || msg);
                // a refused or exhausted connect fails fast: do not spin on it
                tokio::time::sleep(Duration::from_millis(1)).await;
                continue;
            }
        };
        match round_trip(&mut stream, &req, &mut buf, cfg.timeout).await {
            Ok(()) => {
                drop(stream); // close
                w.hist.record(t0.elapsed());
                w.ok += 1;
            }
            Err((f, msg)) => w.errors.add(f, || msg),
        }
    }
    w
}

/// Run the workload.
pub async fn run(cfg: Config) -> Report {
    let start = Instant::now();
    let deadline = start + cfg.duration;
    let mut set = JoinSet::new();
    for _ in 0..cfg.concurrency.max(1) {
        set.spawn(worker(cfg.clone(), deadline));
    }
    let mut report = Report {
        target: cfg.target,
        concurrency: cfg.concurrency.max(1),
        size: cfg.size,
        elapsed: Duration::ZERO,
        connections: 0,
        errors: ErrorCounts::default(),
        conn_time: Histogram::new(),
    };
    while let Some(res) = set.join_next().await {
        match res {
            Ok(w) => {
                report.connections += w.ok;
                report.errors.merge(&w.errors);
                report.conn_time.merge(&w.hist);
            }
            Err(e) => report
                .errors
                .add(crate::errors::Failure::Io, || format!("worker: {e}")),
        }
    }
    report.elapsed = start.elapsed();
    report
}

impl Report {
    /// Completed connections per second.
    pub fn rate(&self) -> f64 {
        per_sec(self.connections, self.elapsed)
    }

    /// Human lines.
    pub fn human(&self) -> String {
        let h = &self.conn_time;
        format!(
            "cps target={} concurrency={} size={}B: {:.0} conn/s ({} connections in {:.2}s)\n\
             connection time p50 {} p99 {} max {}\n{}",
            self.target,
            self.concurrency,
            self.size,
            self.rate(),
            self.connections,
            self.elapsed.as_secs_f64(),
            fmt_us(h.quantile_ns(0.5)),
            fmt_us(h.quantile_ns(0.99)),
            fmt_us(h.max_ns()),
            self.errors.human()
        )
    }

    /// JSON object.
    pub fn json(&self) -> Value {
        let h = &self.conn_time;
        json!({
            "test": "cps",
            "target": self.target.to_string(),
            "concurrency": self.concurrency,
            "size": self.size,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "connections": self.connections,
            "conn_per_s": self.rate(),
            "conn_time_us": {
                "p50": h.quantile_ns(0.5) as f64 / 1000.0,
                "p99": h.quantile_ns(0.99) as f64 / 1000.0,
                "max": h.max_ns() as f64 / 1000.0,
            },
            "errors": self.errors.json(),
        })
    }
}
