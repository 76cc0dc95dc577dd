//! Request/response latency over kept-alive connections: each connection has exactly one request
//! outstanding; the time from write to the last response byte goes into a histogram.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::errors::{ErrorCounts, Failure};
use crate::hist::Histogram;
use crate::{fmt_us, payload, per_sec, round_trip};

/// Latency workload settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddr,
    /// Kept-alive connections, one outstanding request each.
    pub connections: usize,
    pub duration: Duration,
    /// Samples in this first stretch are not recorded (connections are opened before it).
    pub warmup: Duration,
    pub size: usize,
    pub timeout: Duration,
}

/// What a latency run measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: SocketAddr,
    pub connections: usize,
    pub size: usize,
    /// Measured interval (after warm-up).
    pub elapsed: Duration,
    pub hist: Histogram,
    pub errors: ErrorCounts,
    /// Connections that could not be opened.
    pub failed_connections: usize,
}

struct Conn {
    hist: Histogram,
    errors: ErrorCounts,
}

async fn conn_loop(
    mut stream: tokio::net::TcpStream,
    cfg: Config,
    measure_from: Instant,
    deadline: Instant,
) -> Conn {
    let req = payload(cfg.size);
    let mut buf = vec![0u8; cfg.size];
    let mut c = Conn {
        hist: Histogram::new(),
        errors: ErrorCounts::default(),
    };
    loop {
        let t0 = Instant::now();
        if t0 >= deadline {
            break;
        }
        match round_trip(&mut stream, &req, &mut buf, cfg.timeout).await {
            Ok(()) => {
                if t0 >= measure_from {
                    c.hist.record(t0.elapsed());
                }
            }
            Err((f, msg)) => {
                c.errors.add(f, || msg);
                // the stream is in an unknown state: reconnect, bounded by the deadline
                match crate::connect(cfg.target, cfg.timeout).await {
                    Ok(s) => stream = s,
                    Err((f, msg)) => {
                        c.errors.add(f, || msg);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
        }
    }
    c
}

/// Run the workload: open every connection first, then load them all for warm-up + duration.
pub async fn run(cfg: Config) -> Report {
    let n = cfg.connections.max(1);
    let mut errors = ErrorCounts::default();
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        match crate::connect(cfg.target, cfg.timeout).await {
            Ok(s) => streams.push(s),
            Err((f, msg)) => errors.add(f, || msg),
        }
    }
    let failed_connections = n - streams.len();
    let start = Instant::now();
    let measure_from = start + cfg.warmup;
    let deadline = measure_from + cfg.duration;
    let mut set = JoinSet::new();
    for s in streams {
        set.spawn(conn_loop(s, cfg.clone(), measure_from, deadline));
    }
    let mut hist = Histogram::new();
    while let Some(res) = set.join_next().await {
        match res {
            Ok(c) => {
                hist.merge(&c.hist);
                errors.merge(&c.errors);
            }
            Err(e) => errors.add(Failure::Io, || format!("connection task: {e}")),
        }
    }
    let elapsed = Instant::now().saturating_duration_since(measure_from);
    Report {
        target: cfg.target,
        connections: n,
        size: cfg.size,
        elapsed,
        hist,
        errors,
        failed_connections,
    }
}

impl Report {
    /// Requests per second in the measured interval.
    pub fn rate(&self) -> f64 {
        per_sec(self.hist.count(), self.elapsed)
    }

    /// Human lines.
    pub fn human(&self) -> String {
        let h = &self.hist;
        format!(
            "latency target={} connections={} size={}B: {:.0} req/s ({} requests in {:.2}s)\n\
             p50 {} p90 {} p99 {} p999 {} max {} mean {}\n{}{}",
            self.target,
            self.connections,
            self.size,
            self.rate(),
            h.count(),
            self.elapsed.as_secs_f64(),
            fmt_us(h.quantile_ns(0.5)),
            fmt_us(h.quantile_ns(0.9)),
            fmt_us(h.quantile_ns(0.99)),
            fmt_us(h.quantile_ns(0.999)),
            fmt_us(h.max_ns()),
            fmt_us(h.mean_ns()),
            self.errors.human(),
            if self.failed_connections > 0 {
                format!(" ({} connections never opened)", self.failed_connections)
            } else {
                String::new()
            }
        )
    }

    /// JSON object.
    pub fn json(&self) -> Value {
        let h = &self.hist;
        let us = |ns: u64| ns as f64 / 1000.0;
        json!({
            "test": "latency",
            "target": self.target.to_string(),
            "connections": self.connections,
            "failed_connections": self.failed_connections,
            "size": self.size,
            "elapsed_s": self.elapsed.as_secs_f64(),
            "requests": h.count(),
            "req_per_s": self.rate(),
            "latency_us": {
                "p50": us(h.quantile_ns(0.5)),
                "p90": us(h.quantile_ns(0.9)),
                "p99": us(h.quantile_ns(0.99)),
                "p999": us(h.quantile_ns(0.999)),
                "max": us(h.max_ns()),
                "min": us(h.min_ns()),
                "mean": us(h.mean_ns()),
            },
            "errors": self.errors.json(),
        })
    }
}
