//! Idle proxied connections: open many connections, do one round trip on each (so a proxy has
//! really connected them to a backend), hold them, optionally sample a process's resident memory,
//! then close them all.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::errors::{ErrorCounts, Failure};
use crate::{payload, round_trip};

/// Idle workload settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub target: SocketAddr,
    pub count: usize,
    pub hold: Duration,
    pub size: usize,
    /// Connections being opened at the same time.
    pub parallel: usize,
    pub timeout: Duration,
    /// Process whose VmRSS is sampled before, once all are established, and at the end of the hold.
    pub rss_pid: Option<u32>,
    /// After the hold, do one more round trip on every connection to check it is still proxied.
    pub check: bool,
}

/// What an idle run measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub target: Option<SocketAddr>,
    pub requested: usize,
    pub established: usize,
    pub establish_time: Duration,
    pub hold: Duration,
    pub errors: ErrorCounts,
    /// Connections that still answered after the hold (None when not checked).
    pub alive_after_hold: Option<usize>,
    pub rss_pid: Option<u32>,
    pub rss_before_kib: Option<u64>,
    pub rss_established_kib: Option<u64>,
    pub rss_held_kib: Option<u64>,
}

/// VmRSS of a process in KiB, from /proc/PID/status.
pub fn vm_rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS line"))
}

async fn open_one(
    target: SocketAddr,
    req: std::sync::Arc<Vec<u8>>,
    timeout: Duration,
) -> Result<TcpStream, (Failure, String)> {
    let mut stream = crate::connect(target, timeout).await?;
    let mut buf = vec![0u8; req.len()];
    round_trip(&mut stream, &req, &mut buf, timeout).await?;
    Ok(stream)
}

/// Run the workload. `progress` receives human lines as they happen (the "established" line is
/// the signal that every connection is open and proxied).
pub async fn run(cfg: Config, progress: &dyn Fn(&str)) -> Report {
    let rss = |pid: Option<u32>| pid.and_then(|p| vm_rss_kib(p).ok());
    let mut report = Report {
        target: Some(cfg.target),
        requested: cfg.count,
        hold: cfg.hold,
        rss_pid: cfg.rss_pid,
        rss_before_kib: rss(cfg.rss_pid),
        ..Report::default()
    };
    let req = std::sync::Arc::new(payload(cfg.size.max(1)));
    let start = Instant::now();
    let mut streams: Vec<TcpStream> = Vec::with_capacity(cfg.count);
    let mut set = JoinSet::new();
    let mut started = 0usize;
    let parallel = cfg.parallel.max(1);
    // bounded: at most `count` attempts, each bounded by the timeout
    while started < cfg.count || !set.is_empty() {
        while started < cfg.count && set.len() < parallel {
            set.spawn(open_one(cfg.target, req.clone(), cfg.timeout));
            started += 1;
        }
        match set.join_next().await {
            Some(Ok(Ok(s))) => streams.push(s),
            Some(Ok(Err((f, msg)))) => report.errors.add(f, || msg),
            Some(Err(e)) => report.errors.add(Failure::Io, || format!("task: {e}")),
            None => break,
        }
    }
    report.establish_time = start.elapsed();
    report.established = streams.len();
    report.rss_established_kib = rss(cfg.rss_pid);
    progress(&format!(
        "established {} of {} connections in {:.2}s ({}); holding {:?}",
        report.established,
        cfg.count,
        report.establish_time.as_secs_f64(),
        report.errors.human(),
        cfg.hold
    ));
    tokio::time::sleep(cfg.hold).await;
    report.rss_held_kib = rss(cfg.rss_pid);
    if cfg.check {
        let mut buf = vec![0u8; req.len()];
        let mut alive = 0usize;
        for s in streams.iter_mut() {
            match round_trip(s, &req, &mut buf, cfg.timeout).await {
                Ok(()) => alive += 1,
                Err((f, msg)) => report.errors.add(f, || format!("after hold: {msg}")),
            }
        }
        report.alive_after_hold = Some(alive);
    }
    drop(streams);
    report
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("-".to_string(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

impl Report {
    /// Resident memory added per established connection, in KiB (from before to end of hold).
    pub fn per_conn_kib(&self) -> Option<f64> {
        let (b, h) = (self.rss_before_kib?, self.rss_held_kib?);
        (self.established > 0).then(|| (h as f64 - b as f64) / self.established as f64)
    }

    /// Human lines.
    pub fn human(&self) -> String {
        let mut s = format!(
            "idle target={} established {}/{} in {:.2}s, held {:?}, alive after hold {}\n{}",
            self.target.map_or("-".to_string(), |t| t.to_string()),
            self.established,
            self.requested,
            self.establish_time.as_secs_f64(),
            self.hold,
            self.alive_after_hold
                .map_or("not checked".to_string(), |a| a.to_string()),
            self.errors.human()
        );
        if let Some(pid) = self.rss_pid {
            s.push_str(&format!(
                "\nrss pid {pid}: before {} established {} after hold {} ({} KiB per connection)",
                mib(self.rss_before_kib),
                mib(self.rss_established_kib),
                mib(self.rss_held_kib),
                self.per_conn_kib()
                    .map_or("-".to_string(), |k| format!("{k:.1}"))
            ));
        }
        s
    }

    /// JSON object.
    pub fn json(&self) -> Value {
        json!({
            "test": "idle",
            "target": self.target.map(|t| t.to_string()),
            "requested": self.requested,
            "established": self.established,
            "establish_s": self.establish_time.as_secs_f64(),
            "hold_s": self.hold.as_secs_f64(),
            "alive_after_hold": self.alive_after_hold,
            "errors": self.errors.json(),
            "rss_pid": self.rss_pid,
            "rss_before_kib": self.rss_before_kib,
            "rss_established_kib": self.rss_established_kib,
            "rss_held_kib": self.rss_held_kib,
            "per_conn_kib": self.per_conn_kib(),
        })
    }
}
