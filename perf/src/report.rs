//! Progress lines and the final summary (text and JSON).

use std::fmt::Write as _;

use serde::Serialize;

use crate::{
    config::ConfigEcho,
    histogram::Snapshot,
    ids::IdRanges,
    stats::{Gap, StatsSnapshot},
};

/// Latency percentiles in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Percentiles of a nanosecond histogram, or `None` when it is empty.
    pub fn from_snapshot(s: &Snapshot) -> Option<Self> {
        let us = |q: f64| s.quantile(q).map(|ns| ns as f64 / 1000.0).unwrap_or(0.0);
        (s.count() > 0).then(|| Self {
            count: s.count(),
            p50: us(0.50),
            p75: us(0.75),
            p95: us(0.95),
            p99: us(0.99),
            p999: us(0.999),
            max: s.max().map(|ns| ns as f64 / 1000.0).unwrap_or(0.0),
        })
    }
}

/// One progress line's figures.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Second {
    /// Seconds since the start.
    pub t: f64,
    /// Published msg/s.
    pub sent: f64,
    /// Delivered msg/s.
    pub received: f64,
    /// Confirmed msg/s.
    pub confirmed: f64,
    /// Confirm latency p50 (µs).
    pub confirm_p50_us: Option<f64>,
    /// Confirm latency p99 (µs).
    pub confirm_p99_us: Option<f64>,
    /// Consumer latency p50 (µs).
    pub consumer_p50_us: Option<f64>,
    /// Consumer latency p99 (µs).
    pub consumer_p99_us: Option<f64>,
}

impl Second {
    /// Figures of an interval of `secs` seconds ending `t` seconds after the start.
    pub fn new(t: f64, secs: f64, d: &StatsSnapshot) -> Self {
        let secs = secs.max(1e-9);
        let c = Latency::from_snapshot(&d.confirm_latency);
        let r = Latency::from_snapshot(&d.consumer_latency);
        Self {
            t,
            sent: d.sent as f64 / secs,
            received: d.received as f64 / secs,
            confirmed: d.confirmed as f64 / secs,
            confirm_p50_us: c.as_ref().map(|l| l.p50),
            confirm_p99_us: c.as_ref().map(|l| l.p99),
            consumer_p50_us: r.as_ref().map(|l| l.p50),
            consumer_p99_us: r.as_ref().map(|l| l.p99),
        }
    }

    /// The progress line.
    pub fn line(&self) -> String {
        let mut s = format!(
            "time {:6.1}s, sent {:>9.0} msg/s, received {:>9.0} msg/s, confirmed {:>9.0} msg/s",
            self.t, self.sent, self.received, self.confirmed
        );
        if let (Some(a), Some(b)) = (self.confirm_p50_us, self.confirm_p99_us) {
            let _ = write!(s, ", confirm p50/p99 {} / {} µs", fmt_us(a), fmt_us(b));
        }
        if let (Some(a), Some(b)) = (self.consumer_p50_us, self.consumer_p99_us) {
            let _ = write!(s, ", consumer p50/p99 {} / {} µs", fmt_us(a), fmt_us(b));
        }
        s
    }
}

fn fmt_us(v: f64) -> String {
    if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// CPU used by a process over the measured window.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Cpu {
    /// CPU seconds (user + system).
    pub cpu_s: f64,
    /// CPU microseconds per message (see [`Summary::messages`]).
    pub us_per_msg: Option<f64>,
    /// Share of one core over the window, in percent.
    pub core_percent: f64,
}

/// A time a producer waited for a confirm (see [`Gap`]), with wall-clock ends so that it can be
/// matched with outside events (e.g. a broker killed at a known time).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConfirmGap {
    /// Length in milliseconds.
    pub ms: f64,
    /// Its start (the ack before it, or the run's start), ms since the Unix epoch.
    pub from_unix_ms: f64,
    /// Its end, ms since the Unix epoch.
    pub to_unix_ms: f64,
    /// Whether a confirm ended it (false: still waiting when the producer stopped).
    pub ended_by_ack: bool,
}

impl ConfirmGap {
    /// From a gap in ns since a run that started at `start_unix_ns`.
    pub fn new(g: &Gap, start_unix_ns: u64) -> Self {
        let unix_ms = |ns: u64| (start_unix_ns + ns.saturating_sub(1)) as f64 / 1e6;
        Self {
            ms: g.len_ns() as f64 / 1e6,
            from_unix_ms: if g.from_ns == 0 {
                start_unix_ns as f64 / 1e6
            } else {
                unix_ms(g.from_ns)
            },
            to_unix_ms: unix_ms(g.to_ns),
            ended_by_ack: g.ended_by_ack,
        }
    }
}

/// Ids of confirmed publishes and of deliveries (with --ids-out): the file's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ids {
    /// Confirmed by the broker (none without producers).
    pub confirmed: Option<IdRanges>,
    /// Delivered to the consumers (none without consumers).
    pub consumed: Option<IdRanges>,
}

/// The final report.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    /// Always "warren-perf".
    pub tool: &'static str,
    /// Settings.
    pub config: ConfigEcho,
    /// Seconds measured (setup excluded).
    pub elapsed_s: f64,
    /// Messages published.
    pub sent: u64,
    /// Messages delivered to consumers.
    pub received: u64,
    /// Publishes confirmed.
    pub confirmed: u64,
    /// Publishes nacked.
    pub nacked: u64,
    /// Messages returned.
    pub returned: u64,
    /// Deliveries stamped before this run started (not counted in the latency; see
    /// [`crate::stats::Stats::stale`]).
    pub stale: u64,
    /// Messages that CPU costs are divided by: max(sent, received), i.e. messages carried end to
    /// end in a 1P/1C run.
    pub messages: u64,
    /// Published msg/s.
    pub sent_rate: f64,
    /// Delivered msg/s.
    pub received_rate: f64,
    /// Confirmed msg/s.
    pub confirmed_rate: f64,
    /// Publish to confirm (µs).
    pub confirm_latency_us: Option<Latency>,
    /// Publish to delivery, from the stamp in the body (µs).
    pub consumer_latency_us: Option<Latency>,
    /// The longest wait for a confirm (with confirms).
    pub longest_confirm_gap: Option<ConfirmGap>,
    /// The longest waits for a confirm, longest first (at most
    /// [`crate::stats::KEPT_GAPS`]).
    pub confirm_gaps: Vec<ConfirmGap>,
    /// Distinct ids confirmed (with --ids-out and producers).
    pub confirmed_ids: Option<u64>,
    /// Distinct ids delivered (with --ids-out and consumers).
    pub consumed_ids: Option<u64>,
    /// Deliveries of an id already delivered (with --ids-out and consumers).
    pub duplicate_deliveries: Option<u64>,
    /// The id sets, for the --ids-out file.
    #[serde(skip)]
    pub ids: Option<Ids>,
    /// This process.
    pub perf_cpu: Option<Cpu>,
    /// Broker pid given with --broker-pid.
    pub broker_pid: Option<u32>,
    /// The broker process.
    pub broker_cpu: Option<Cpu>,
    /// Broker resident memory at the end (KiB).
    pub broker_rss_kib: Option<u64>,
    /// Per-second figures.
    pub per_second: Vec<Second>,
    /// Errors that ended a producer or consumer early.
    pub errors: Vec<String>,
}

impl Summary {
    /// Human-readable summary.
    pub fn text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "summary: {:.1}s, sent {} ({:.0} msg/s), received {} ({:.0} msg/s), confirmed {} ({:.0} msg/s), nacked {}, returned {}",
            self.elapsed_s,
            self.sent,
            self.sent_rate,
            self.received,
            self.received_rate,
            self.confirmed,
            self.confirmed_rate,
            self.nacked,
            self.returned
        );
        for (name, l) in [
            ("confirm latency", &self.confirm_latency_us),
            ("consumer latency", &self.consumer_latency_us),
        ] {
            if let Some(l) = l {
                let _ = writeln!(
                    s,
                    "{name} µs: p50 {} p75 {} p95 {} p99 {} p99.9 {} max {} ({} samples)",
                    fmt_us(l.p50),
                    fmt_us(l.p75),
                    fmt_us(l.p95),
                    fmt_us(l.p99),
                    fmt_us(l.p999),
                    fmt_us(l.max),
                    l.count
                );
            }
        }
        for (name, c) in [
            ("warren-perf", &self.perf_cpu),
            ("broker", &self.broker_cpu),
        ] {
            if let Some(c) = c {
                let per = c
                    .us_per_msg
                    .map(|v| format!("{v:.3} µs/msg"))
                    .unwrap_or_else(|| "- µs/msg".into());
                let _ = writeln!(
                    s,
                    "{name} CPU: {:.2} s ({:.0}% of a core), {per}",
                    c.cpu_s, c.core_percent
                );
            }
        }
        if let Some(g) = &self.longest_confirm_gap {
            let _ = writeln!(
                s,
                "longest wait for a confirm: {:.1} ms{}",
                g.ms,
                if g.ended_by_ack {
                    ""
                } else {
                    " (not confirmed by the end)"
                }
            );
        }
        if let (Some(c), Some(d)) = (self.consumed_ids, self.duplicate_deliveries) {
            let _ = writeln!(s, "consumed ids: {c} distinct, {d} duplicate deliveries");
        }
        if let Some(c) = self.confirmed_ids {
            let _ = writeln!(s, "confirmed ids: {c}");
        }
        if let Some(kib) = self.broker_rss_kib {
            let _ = writeln!(s, "broker RSS: {:.1} MiB", kib as f64 / 1024.0);
        }
        if self.stale > 0 {
            let _ = writeln!(
                s,
                "warning: {} deliveries carried stamps from before this run (left over or misrouted)",
                self.stale
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "error: {e}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::histogram::Histogram;

    #[test]
    fn progress_line_shows_latency_only_when_measured() {
        let h = Histogram::new();
        let mut d = StatsSnapshot {
            sent: 1000,
            received: 900,
            ..Default::default()
        };
        let line = Second::new(1.0, 1.0, &d).line();
        assert!(line.contains("sent      1000 msg/s"), "{line}");
        assert!(!line.contains("p50"));
        h.record(50_000);
        d.consumer_latency = h.snapshot();
        let line = Second::new(2.0, 1.0, &d).line();
        assert!(line.contains("consumer p50/p99"), "{line}");
        assert!(!line.contains("confirm p50"), "{line}");
    }

    #[test]
    fn confirm_gaps_in_wall_clock_milliseconds() {
        let g = ConfirmGap::new(
            &Gap {
                from_ns: 2_000_001,
                to_ns: 5_000_001,
                ended_by_ack: true,
            },
            1_000_000_000_000,
        );
        assert_eq!(g.ms, 3.0);
        assert_eq!((g.from_unix_ms, g.to_unix_ms), (1_000_002.0, 1_000_005.0));
        // A gap from the start (no ack yet) starts at the run's start.
        let g = ConfirmGap::new(
            &Gap {
                from_ns: 0,
                to_ns: 1_000_001,
                ended_by_ack: false,
            },
            1_000_000_000_000,
        );
        assert_eq!(g.from_unix_ms, 1_000_000.0);
        assert!(!g.ended_by_ack);
    }
}
