//! Pure fault decisions: given the rules, the time, the bytes and a seeded RNG, what happens to a
//! connection. No I/O, no clock: time is passed in (`tokio::time::Instant`), so every decision is
//! unit-testable and replayable.
//!
//! Reproducibility: each random decision draws from a ChaCha8 stream derived from
//! (run seed, listener, rule name, purpose, connection sequence number within the listener). The
//! schedule therefore depends on the traffic (which connection, which bytes) and never on task
//! scheduling or on other listeners' connections.
//!
//! Invariants worth naming:
//! - a rule with toxicity 0 never applies (the draw is `u < toxicity`);
//! - time-only triggers (every, lifetime, rate, admin) never need the bytes, so they leave the
//!   zero-copy path alone; [`ConnPlan::byte_level`] is true only for rules that must see bytes;
//! - a byte trigger cuts the read buffer at the exact byte where it fires (`in_flight = drop`);
//!   what follows the cut is counted as discarded, never forwarded.

use std::collections::VecDeque;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tokio::time::Instant;

use super::amqp::{method_ids, Method, Scanner};
use crate::config::{
    parse_rate, CloseStyle, Direction, FaultKind, FaultRule, InFlight, Rate, Side,
};

/// An order to close a live connection (from a rule, the admin API, idle expiry or drain).
#[derive(Debug, Clone, PartialEq)]
pub struct CloseCmd {
    pub style: CloseStyle,
    pub side: Side,
    /// Event name, e.g. `reset`.
    pub event: &'static str,
    pub cause: String,
    pub rule: Option<String>,
    /// The fault kind, when a rule fired (metric label).
    pub kind: Option<FaultKind>,
    pub in_flight: InFlight,
}

impl CloseCmd {
    /// A plain close (no rule).
    pub fn plain(style: CloseStyle, event: &'static str, cause: impl Into<String>) -> Self {
        Self {
            style,
            side: Side::Both,
            event,
            cause: cause.into(),
            rule: None,
            kind: None,
            in_flight: InFlight::Drop,
        }
    }

    fn from_rule(rule: &FaultRule, cause: impl Into<String>) -> Self {
        let (event, default_style) = match rule.kind {
            FaultKind::Reset => ("reset", CloseStyle::Rst),
            FaultKind::LimitData => ("limit_data", CloseStyle::Fin),
            FaultKind::Timeout => ("timeout", CloseStyle::Fin),
            _ => ("fault", CloseStyle::Fin),
        };
        Self {
            style: rule.style.unwrap_or(default_style),
            side: rule.side.unwrap_or(Side::Both),
            event,
            cause: cause.into(),
            rule: Some(rule.name.clone()),
            kind: Some(rule.kind),
            in_flight: rule.in_flight.unwrap_or(InFlight::Drop),
        }
    }
}

pub fn kind_str(k: FaultKind) -> &'static str {
    match k {
        FaultKind::Reset => "reset",
        FaultKind::Latency => "latency",
        FaultKind::Bandwidth => "bandwidth",
        FaultKind::Slicer => "slicer",
        FaultKind::LimitData => "limit_data",
        FaultKind::Timeout => "timeout",
        FaultKind::SlowClose => "slow_close",
        FaultKind::Refuse => "refuse",
    }
}

/// The direction of a byte stream through the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// client -> backend
    Up,
    /// backend -> client
    Down,
}

impl Flow {
    fn index(self) -> usize {
        match self {
            Flow::Up => 0,
            Flow::Down => 1,
        }
    }
}

fn covers(d: Direction, f: Flow) -> bool {
    matches!(
        (d, f),
        (Direction::Both, _)
            | (Direction::Upstream, Flow::Up)
            | (Direction::Downstream, Flow::Down)
    )
}

/// FNV-1a, stable across Rust releases (unlike `DefaultHasher`), for RNG stream keys.
fn fnv(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.iter().chain(std::iter::once(&0xff)) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// The RNG stream for one (listener, rule, purpose, connection) under the run's seed.
pub fn rng_for(seed: u64, listener: &str, rule: &str, purpose: &str, seq: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(
        &fnv(&[listener.as_bytes(), rule.as_bytes(), purpose.as_bytes()]).to_le_bytes(),
    );
    key[16..24].copy_from_slice(&seq.to_le_bytes());
    key[24..].copy_from_slice(b"warrenlb");
    ChaCha8Rng::from_seed(key)
}

/// A reset rule's rate in events/s (text form).
fn reset_rate(rule: &FaultRule) -> Option<f64> {
    match &rule.rate {
        Some(Rate::Text(t)) => parse_rate(t).ok(),
        Some(Rate::Number(n)) if *n > 0.0 => Some(*n / 60.0),
        _ => None,
    }
}

/// Does a `refuse` rule turn connection `seq` away? Returns the rule.
pub fn refusal<'a>(
    seed: u64,
    listener: &str,
    seq: u64,
    rules: &'a [FaultRule],
) -> Option<&'a FaultRule> {
    rules
        .iter()
        .filter(|r| r.enabled && r.kind == FaultKind::Refuse)
        .find(|r| rng_for(seed, listener, &r.name, "toxicity", seq).gen::<f64>() < r.toxicity)
}

/// The next tick of an `every` rule: `every` plus a uniform draw in `0..=jitter`.
pub fn next_every(rule: &FaultRule, now: Instant, rng: &mut ChaCha8Rng) -> Option<Instant> {
    let every = rule.every?;
    Some(now + every + uniform(rng, rule.jitter.unwrap_or_default()))
}

fn uniform(rng: &mut ChaCha8Rng, max: Duration) -> Duration {
    if max.is_zero() {
        Duration::ZERO
    } else {
        max.mul_f64(rng.gen::<f64>())
    }
}

fn exp(rng: &mut ChaCha8Rng, per_sec: f64) -> Duration {
    let u: f64 = rng.gen::<f64>();
    let secs = -(1.0 - u).ln() / per_sec;
    Duration::from_secs_f64(secs.clamp(0.0, 30.0 * 86400.0))
}

/// What a read tells the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Bytes of the read to forward; the rest is discarded.
    pub keep: usize,
    /// Close once the kept bytes are written.
    pub fire: Option<CloseCmd>,
}

/// When the kept bytes may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Write at most this many bytes now.
    Go(usize),
    /// Wait until then.
    Wait(Instant),
}

#[derive(Debug, Clone, Default)]
struct FlowState {
    /// Bytes that passed in this flow since the rule applied.
    seen: u64,
    scanner: Option<Scanner>,
    matched: u64,
    done: bool,
    rng: Option<ChaCha8Rng>,
}

#[derive(Debug, Clone)]
struct RuleState {
    rule: FaultRule,
    applies: bool,
    deadline: Option<Instant>,
    flows: [FlowState; 2],
    target: Option<Method>,
}

impl RuleState {
    fn byte_level(&self, f: Flow) -> bool {
        if !self.applies || !covers(self.rule.direction, f) {
            return false;
        }
        match self.rule.kind {
            FaultKind::Reset => self.rule.after_bytes.is_some() || self.target.is_some(),
            FaultKind::Latency
            | FaultKind::Bandwidth
            | FaultKind::Slicer
            | FaultKind::LimitData
            | FaultKind::Timeout
            | FaultKind::SlowClose => true,
            FaultKind::Refuse => false,
        }
    }
}

/// A rule newly applied to a connection (an event and a metric for the shaping kinds).
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub rule: String,
    pub kind: FaultKind,
}

/// The fault plan of one connection; see the module doc.
#[derive(Debug, Clone)]
pub struct ConnPlan {
    seed: u64,
    listener: String,
    seq: u64,
    opened: Instant,
    rules: Vec<RuleState>,
    byte: [bool; 2],
    /// Earliest time each flow may write again (bandwidth, slicer pacing).
    pace: [Option<Instant>; 2],
    /// Latency: (release time, flow offset where the chunk ends), oldest first. Chunks are
    /// released in order, so reads go on while earlier chunks wait (the delay does not cap the
    /// throughput, up to the proxy's window).
    marks: [VecDeque<(Instant, u64)>; 2],
    /// Bytes kept after reads / written, per flow, since the plan began to see the flow.
    read_off: [u64; 2],
    written_off: [u64; 2],
}

impl ConnPlan {
    /// The plan of connection `seq` (1-based within the listener) opened at `now`.
    pub fn new(
        seed: u64,
        listener: &str,
        seq: u64,
        rules: &[FaultRule],
        now: Instant,
    ) -> (Self, Vec<Applied>) {
        let mut p = Self {
            seed,
            listener: listener.to_string(),
            seq,
            opened: now,
            rules: Vec::new(),
            byte: [false; 2],
            pace: [None; 2],
            marks: [VecDeque::new(), VecDeque::new()],
            read_off: [0; 2],
            written_off: [0; 2],
        };
        let applied = p.set_rules(rules, now, true);
        (p, applied)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Rules changed at runtime: unchanged rules keep their state, new ones start now. An
    /// `on_amqp` rule added to a live connection does not apply to it (the scanner would start
    /// mid-frame).
    pub fn update(&mut self, rules: &[FaultRule], now: Instant) -> Vec<Applied> {
        self.set_rules(rules, now, false)
    }

    fn set_rules(&mut self, rules: &[FaultRule], now: Instant, opening: bool) -> Vec<Applied> {
        let mut old = std::mem::take(&mut self.rules);
        let mut applied = Vec::new();
        for r in rules
            .iter()
            .filter(|r| r.enabled && r.kind != FaultKind::Refuse)
        {
            if let Some(i) = old.iter().position(|o| o.rule == *r) {
                self.rules.push(old.swap_remove(i));
                continue;
            }
            let st = self.build(r, now, opening);
            // Shaping kinds have no moment of firing: their event is when they start to apply.
            // The others are counted when they fire.
            let shaping = matches!(
                r.kind,
                FaultKind::Latency
                    | FaultKind::Bandwidth
                    | FaultKind::Slicer
                    | FaultKind::SlowClose
            );
            if st.applies && shaping {
                applied.push(Applied {
                    rule: r.name.clone(),
                    kind: r.kind,
                });
            }
            self.rules.push(st);
        }
        for f in [Flow::Up, Flow::Down] {
            self.byte[f.index()] = self.rules.iter().any(|r| r.byte_level(f));
        }
        applied
    }

    fn build(&self, r: &FaultRule, now: Instant, opening: bool) -> RuleState {
        let seq = self.seq;
        let mut tox = rng_for(self.seed, &self.listener, &r.name, "toxicity", seq);
        let mut applies = tox.gen::<f64>() < r.toxicity;
        let mut rng = rng_for(self.seed, &self.listener, &r.name, "schedule", seq);
        let target = r.on_amqp.as_deref().and_then(method_ids);
        if target.is_some() && !opening {
            applies = false;
        }
        let deadline = match r.kind {
            FaultKind::Reset => {
                if let Some(l) = r.lifetime {
                    Some(self.opened + l + uniform(&mut rng, r.jitter.unwrap_or_default()))
                } else {
                    reset_rate(r).map(|per_sec| now + exp(&mut rng, per_sec))
                }
            }
            FaultKind::Timeout => r.timeout.filter(|t| !t.is_zero()).map(|t| now + t),
            _ => None,
        };
        let flow = |purpose: &str| FlowState {
            scanner: target.map(|_| Scanner::new()),
            rng: Some(rng_for(self.seed, &self.listener, &r.name, purpose, seq)),
            ..FlowState::default()
        };
        RuleState {
            rule: r.clone(),
            applies,
            deadline,
            flows: [flow("up"), flow("down")],
            target,
        }
    }

    /// True if `flow` has a rule that must see its bytes (then it stays on the buffered path).
    pub fn byte_level(&self, flow: Flow) -> bool {
        self.byte[flow.index()]
    }

    /// Does a listener-wide order from `rule` (an `every` tick) apply to this connection?
    pub fn accepts(&self, rule: &str) -> bool {
        self.rules.iter().any(|r| r.rule.name == rule && r.applies)
    }

    /// The next time-based trigger.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.rules
            .iter()
            .filter(|r| r.applies)
            .filter_map(|r| r.deadline)
            .min()
    }

    /// Fires the time-based trigger due at `now`, if any.
    pub fn on_timer(&mut self, now: Instant) -> Option<CloseCmd> {
        let r = self
            .rules
            .iter_mut()
            .filter(|r| r.applies)
            .find(|r| r.deadline.is_some_and(|d| d <= now))?;
        r.deadline = None;
        let cause = match r.rule.kind {
            FaultKind::Timeout => "timeout",
            _ if r.rule.lifetime.is_some() => "lifetime",
            _ => "rate",
        };
        Some(CloseCmd::from_rule(&r.rule, cause))
    }

    /// A timeout rule holds this flow: read nothing.
    pub fn paused(&self, flow: Flow) -> bool {
        self.rules.iter().any(|r| {
            r.applies && r.rule.kind == FaultKind::Timeout && covers(r.rule.direction, flow)
        })
    }

    /// How long to hold back the propagation of EOF in `flow` (slow_close).
    pub fn close_delay(&self, flow: Flow) -> Option<Duration> {
        self.rules
            .iter()
            .filter(|r| {
                r.applies && r.rule.kind == FaultKind::SlowClose && covers(r.rule.direction, flow)
            })
            .filter_map(|r| r.rule.delay)
            .max()
    }

    /// Bytes just read in `flow`: byte triggers (after_bytes, on_amqp, limit_data) and latency.
    pub fn on_read(&mut self, flow: Flow, data: &[u8], now: Instant) -> Verdict {
        let fi = flow.index();
        let mut best: Option<(usize, CloseCmd)> = None;
        let mut latency = Duration::ZERO;
        for r in self.rules.iter_mut() {
            if !r.applies || !covers(r.rule.direction, flow) {
                continue;
            }
            let st = &mut r.flows[fi];
            if st.done {
                continue;
            }
            let cut = match r.rule.kind {
                FaultKind::Reset if r.rule.after_bytes.is_some() => {
                    let n = r.rule.after_bytes.unwrap_or(0);
                    let before = st.seen;
                    st.seen += data.len() as u64;
                    (before < n || n == 0).then_some(()).and_then(|_| {
                        (st.seen >= n).then(|| usize::try_from(n - before.min(n)).unwrap_or(0))
                    })
                }
                FaultKind::LimitData => {
                    let n = r.rule.bytes.unwrap_or(0);
                    let before = st.seen;
                    st.seen += data.len() as u64;
                    (st.seen >= n).then(|| usize::try_from(n.saturating_sub(before)).unwrap_or(0))
                }
                FaultKind::Reset => match (r.target, st.scanner.as_mut()) {
                    (Some(target), Some(sc)) => {
                        let mut at = 0;
                        let mut hit = None;
                        while at < data.len() {
                            let (n, m) = sc.scan(&data[at..]);
                            at += n;
                            if m != Some(target) {
                                continue;
                            }
                            st.matched += 1;
                            let fire = match (r.rule.nth, r.rule.probability) {
                                (Some(k), _) => st.matched == k,
                                (None, Some(p)) => {
                                    st.rng.as_mut().is_some_and(|g| g.gen::<f64>() < p)
                                }
                                (None, None) => true,
                            };
                            if fire {
                                hit = Some(at);
                                break;
                            }
                        }
                        hit
                    }
                    _ => None,
                },
                FaultKind::Latency => {
                    let base = r.rule.latency.unwrap_or_default();
                    let j = r.rule.jitter.unwrap_or_default();
                    let d = match st.rng.as_mut() {
                        Some(g) if !j.is_zero() => {
                            let x = g.gen::<f64>() * 2.0 - 1.0;
                            if x >= 0.0 {
                                base + j.mul_f64(x)
                            } else {
                                base.saturating_sub(j.mul_f64(-x))
                            }
                        }
                        _ => base,
                    };
                    latency = latency.max(d);
                    None
                }
                _ => None,
            };
            if let Some(cut) = cut {
                st.done = true;
                let cause = match r.rule.kind {
                    FaultKind::LimitData => "limit_data".to_string(),
                    _ if r.target.is_some() => {
                        format!("on_amqp {}", r.rule.on_amqp.as_deref().unwrap_or(""))
                    }
                    _ => "after_bytes".to_string(),
                };
                let cmd = CloseCmd::from_rule(&r.rule, cause);
                let keep =
                    if cmd.in_flight == InFlight::Flush && r.rule.kind != FaultKind::LimitData {
                        data.len()
                    } else {
                        cut.min(data.len())
                    };
                if best.as_ref().is_none_or(|(k, _)| keep < *k) {
                    best = Some((keep, cmd));
                }
            }
        }
        let v = match best {
            Some((keep, cmd)) => Verdict {
                keep,
                fire: Some(cmd),
            },
            None => Verdict {
                keep: data.len(),
                fire: None,
            },
        };
        self.read_off[fi] += v.keep as u64;
        if !latency.is_zero() {
            self.marks[fi].push_back((now + latency, self.read_off[fi]));
        }
        v
    }

    /// May `pending` buffered bytes of `flow` be written at `now`, and how many?
    pub fn gate(&mut self, flow: Flow, now: Instant, pending: usize) -> Gate {
        let fi = flow.index();
        let written = self.written_off[fi];
        while self.marks[fi]
            .front()
            .is_some_and(|(_, end)| *end <= written)
        {
            self.marks[fi].pop_front();
        }
        if let Some(p) = self.pace[fi] {
            if p > now {
                return Gate::Wait(p);
            }
            self.pace[fi] = None;
        }
        let mut n = pending;
        if let Some((at, end)) = self.marks[fi].front() {
            if *at > now {
                return Gate::Wait(*at);
            }
            n = n.min(usize::try_from(end - written).unwrap_or(usize::MAX));
        }
        for r in self.rules.iter_mut() {
            if !r.applies || !covers(r.rule.direction, flow) {
                continue;
            }
            match r.rule.kind {
                FaultKind::Bandwidth => {
                    // At most ~10 ms worth of bytes per write keeps the rate smooth.
                    let bps = bandwidth_bps(&r.rule);
                    let chunk = ((bps / 100.0) as usize).max(1);
                    n = n.min(chunk);
                }
                FaultKind::Slicer => {
                    let avg = r.rule.average_size.unwrap_or(1).max(1);
                    let var = r.rule.size_variation.unwrap_or(0).min(avg - 1);
                    let size = match r.flows[fi].rng.as_mut() {
                        Some(g) if var > 0 => g.gen_range(avg - var..=avg.saturating_add(var)),
                        _ => avg,
                    };
                    n = n.min(usize::try_from(size).unwrap_or(usize::MAX).max(1));
                }
                _ => {}
            }
        }
        Gate::Go(n)
    }

    /// `n` bytes of `flow` were written at `now` (bandwidth and slicer pacing).
    pub fn wrote(&mut self, flow: Flow, n: usize, now: Instant) {
        let fi = flow.index();
        self.written_off[fi] += n as u64;
        let mut wait = Duration::ZERO;
        for r in self.rules.iter() {
            if !r.applies || !covers(r.rule.direction, flow) {
                continue;
            }
            match r.rule.kind {
                FaultKind::Bandwidth => {
                    let bps = bandwidth_bps(&r.rule);
                    wait = wait.max(Duration::from_secs_f64(n as f64 / bps));
                }
                FaultKind::Slicer => wait = wait.max(r.rule.delay.unwrap_or_default()),
                _ => {}
            }
        }
        if !wait.is_zero() {
            self.pace[fi] = Some(now + wait);
        }
    }
}

fn bandwidth_bps(rule: &FaultRule) -> f64 {
    match rule.rate {
        Some(Rate::Number(kb)) if kb > 0.0 => kb * 1024.0,
        _ => f64::MAX,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FaultRule;

    fn rule(toml_body: &str) -> FaultRule {
        toml::from_str(toml_body).unwrap()
    }

    fn at0() -> Instant {
        Instant::now()
    }

    #[test]
    fn rng_streams_are_reproducible_and_distinct() {
        let a: u64 = rng_for(1, "l", "r", "x", 5).gen();
        assert_eq!(a, rng_for(1, "l", "r", "x", 5).gen::<u64>());
        assert_ne!(a, rng_for(2, "l", "r", "x", 5).gen::<u64>());
        assert_ne!(a, rng_for(1, "l", "r", "x", 6).gen::<u64>());
        assert_ne!(a, rng_for(1, "l", "r2", "x", 5).gen::<u64>());
    }

    #[test]
    fn toxicity_zero_never_and_one_always() {
        let never = rule("name='n'\nkind='reset'\nlifetime='1s'\ntoxicity=0.0");
        let always = rule("name='a'\nkind='reset'\nlifetime='1s'");
        for seq in 1..500 {
            let (p, _) = ConnPlan::new(7, "l", seq, &[never.clone(), always.clone()], at0());
            assert!(!p.accepts("n"));
            assert!(p.accepts("a"));
        }
    }

    #[test]
    fn half_toxicity_is_roughly_half_and_seeded() {
        let r = rule("name='h'\nkind='reset'\nlifetime='1s'\ntoxicity=0.5");
        let draw = |seed| -> Vec<bool> {
            (1..=400)
                .map(|s| {
                    ConnPlan::new(seed, "l", s, std::slice::from_ref(&r), at0())
                        .0
                        .accepts("h")
                })
                .collect()
        };
        let a = draw(1);
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
        let n = a.iter().filter(|x| **x).count();
        assert!((140..260).contains(&n), "{n}");
    }

    #[test]
    fn lifetime_fires_at_age() {
        let t = at0();
        let r = rule("name='l'\nkind='reset'\nlifetime='10s'\nstyle='fin'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[r], t);
        assert_eq!(p.next_deadline(), Some(t + Duration::from_secs(10)));
        assert!(p.on_timer(t + Duration::from_secs(9)).is_none());
        let c = p.on_timer(t + Duration::from_secs(10)).unwrap();
        assert_eq!((c.style, c.cause.as_str()), (CloseStyle::Fin, "lifetime"));
        assert!(!p.byte_level(Flow::Up));
    }

    #[test]
    fn poisson_rate_has_the_mean() {
        let t = at0();
        let r = rule("name='p'\nkind='reset'\nrate='1/s'");
        let mut sum = 0.0;
        for seq in 1..=2000 {
            let (p, _) = ConnPlan::new(3, "l", seq, std::slice::from_ref(&r), t);
            sum += (p.next_deadline().unwrap() - t).as_secs_f64();
        }
        let mean = sum / 2000.0;
        assert!((0.9..1.1).contains(&mean), "{mean}");
    }

    #[test]
    fn after_bytes_cuts_at_the_byte() {
        let t = at0();
        let r = rule("name='b'\nkind='reset'\nafter_bytes=10\ndirection='upstream'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[r], t);
        assert!(p.byte_level(Flow::Up) && !p.byte_level(Flow::Down));
        assert_eq!(p.on_read(Flow::Up, &[0; 6], t).fire, None);
        let v = p.on_read(Flow::Up, &[0; 6], t);
        assert_eq!(v.keep, 4);
        assert_eq!(v.fire.unwrap().cause, "after_bytes");
        assert_eq!(p.on_read(Flow::Up, &[0; 6], t).fire, None);
    }

    #[test]
    fn limit_data_cuts_even_with_flush() {
        let t = at0();
        let r = rule("name='x'\nkind='limit_data'\nbytes=3\nin_flight='flush'");
        let (mut p, applied) = ConnPlan::new(1, "l", 1, &[r], t);
        assert!(applied.is_empty());
        let v = p.on_read(Flow::Down, b"hello", t);
        assert_eq!(v.keep, 3);
        assert_eq!(v.fire.unwrap().style, CloseStyle::Fin);
    }

    fn publish_frames(n: usize) -> Vec<u8> {
        let mut s = b"AMQP\x00\x00\x09\x01".to_vec();
        for _ in 0..n {
            s.extend([1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 40, 0xCE]);
            s.extend([2, 0, 1, 0, 0, 0, 2, 9, 9, 0xCE]);
        }
        s
    }

    #[test]
    fn on_amqp_nth_cuts_after_the_method_frame() {
        let t = at0();
        let r =
            rule("name='a'\nkind='reset'\non_amqp='basic.publish'\nnth=2\ndirection='upstream'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[r], t);
        let data = publish_frames(3);
        let v = p.on_read(Flow::Up, &data, t);
        // header 8, publish 12, content 10, publish 12.
        assert_eq!(v.keep, 8 + 12 + 10 + 12);
        assert_eq!(v.fire.unwrap().cause, "on_amqp basic.publish");
        // Downstream is not scanned.
        let r = rule("name='a'\nkind='reset'\non_amqp='basic.publish'\ndirection='upstream'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[r], t);
        assert!(p.on_read(Flow::Down, &data, t).fire.is_none());
    }

    #[test]
    fn on_amqp_probability_is_seeded() {
        let t = at0();
        let r = rule("name='a'\nkind='reset'\non_amqp='basic.publish'\nprobability=0.3");
        let keeps = |seed| -> Vec<usize> {
            (1..50)
                .map(|seq| {
                    let (mut p, _) = ConnPlan::new(seed, "l", seq, std::slice::from_ref(&r), t);
                    p.on_read(Flow::Up, &publish_frames(10), t).keep
                })
                .collect()
        };
        assert_eq!(keeps(5), keeps(5));
        assert_ne!(keeps(5), keeps(6));
    }

    #[test]
    fn bandwidth_and_slicer_pace_writes() {
        let t = at0();
        let bw = rule("name='b'\nkind='bandwidth'\nrate=100");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[bw], t);
        let Gate::Go(n) = p.gate(Flow::Up, t, 1 << 20) else {
            panic!()
        };
        assert_eq!(n, 1024);
        p.wrote(Flow::Up, n, t);
        assert_eq!(
            p.gate(Flow::Up, t, 10),
            Gate::Wait(t + Duration::from_millis(10))
        );
        let sl = rule("name='s'\nkind='slicer'\naverage_size=10\nsize_variation=5\ndelay='1ms'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[sl], t);
        for _ in 0..50 {
            let Gate::Go(n) = p.gate(Flow::Down, t, 1000) else {
                panic!()
            };
            assert!((5..=15).contains(&n));
        }
    }

    #[test]
    fn latency_holds_reads() {
        let t = at0();
        let r = rule("name='l'\nkind='latency'\nlatency='50ms'\ndirection='downstream'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[r], t);
        p.on_read(Flow::Down, b"x", t);
        assert_eq!(
            p.gate(Flow::Down, t, 1),
            Gate::Wait(t + Duration::from_millis(50))
        );
        assert_eq!(
            p.gate(Flow::Down, t + Duration::from_millis(50), 1),
            Gate::Go(1)
        );
        p.on_read(Flow::Up, b"x", t);
        assert_eq!(p.gate(Flow::Up, t, 1), Gate::Go(1));
    }

    #[test]
    fn latency_releases_chunks_in_order_while_reading_on() {
        let t = at0();
        let ms = Duration::from_millis;
        let r = rule("name='l'\nkind='latency'\nlatency='50ms'");
        let (mut p, _) = ConnPlan::new(1, "l", 1, &[r], t);
        p.on_read(Flow::Up, b"aaa", t);
        p.on_read(Flow::Up, b"bb", t + ms(20));
        assert_eq!(p.gate(Flow::Up, t + ms(10), 5), Gate::Wait(t + ms(50)));
        // The first chunk only, then the second when its time comes.
        assert_eq!(p.gate(Flow::Up, t + ms(50), 5), Gate::Go(3));
        p.wrote(Flow::Up, 3, t + ms(50));
        assert_eq!(p.gate(Flow::Up, t + ms(60), 2), Gate::Wait(t + ms(70)));
        assert_eq!(p.gate(Flow::Up, t + ms(70), 2), Gate::Go(2));
    }

    #[test]
    fn update_keeps_state_of_unchanged_rules() {
        let t = at0();
        let a = rule("name='a'\nkind='reset'\nafter_bytes=10");
        let (mut p, _) = ConnPlan::new(1, "l", 1, std::slice::from_ref(&a), t);
        p.on_read(Flow::Up, &[0; 8], t);
        let lat = rule("name='l'\nkind='latency'\nlatency='1ms'");
        let applied = p.update(&[a.clone(), lat], t);
        assert_eq!(applied.len(), 1);
        assert_eq!(p.on_read(Flow::Up, &[0; 8], t).keep, 2);
        p.update(&[], t);
        assert!(p.is_empty() && !p.byte_level(Flow::Up));
    }

    #[test]
    fn refusal_follows_toxicity() {
        let r = rule("name='r'\nkind='refuse'");
        assert!(refusal(1, "l", 1, std::slice::from_ref(&r)).is_some());
        let r0 = rule("name='r'\nkind='refuse'\ntoxicity=0.0");
        assert!((1..100).all(|s| refusal(1, "l", s, std::slice::from_ref(&r0)).is_none()));
    }
}
