//! The reconnect storm: `clients` idle consumers (heartbeats on, one channel and one consumer each)
//! connected through a load balancer; the balancer resets every connection at once (warren-lb's
//! admin API, `POST /listeners/{name}/reset`, an RST to both sides of every proxied connection),
//! and every client reconnects at once and consumes again, the way kombu or pika with retry do.
//!
//! Measured: the time from the reset until every client has its consume-ok again (and each
//! client's own time, p50/p99), the broker's CPU over the storm per handshake, and its resident
//! memory per idle connection. The broker's figures cover its process tree (RabbitMQ's beam runs
//! helper children).
//!
//! Each client is one task on the caller's runtime (one thread is enough: the clients are idle
//! except for the storm), and speaks through [`connection`]'s raw codec, not a general-purpose
//! client, so that the driver's own CPU stays small next to the broker's.

use std::{
    collections::{BTreeMap, HashMap},
    fs,
    sync::Arc,
    time::Duration,
};

use serde::Serialize;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::{mpsc, watch, Semaphore},
    task::JoinSet,
    time::Instant,
};

use crate::{
    codec::{self, FRAME_METHOD},
    connection::{self, Conn, ConnError, ConnectOptions, Endpoint, QueueSpec},
    cpu::{self, Proc},
};

/// One heartbeat frame (type 8, channel 0, empty payload).
const HEARTBEAT: [u8; 8] = [8, 0, 0, 0, 0, 0, 0, codec::FRAME_END];
/// Read buffer per client: only small method frames arrive on an idle consumer.
const READ_BUF: usize = 16 * 1024;
/// Prefetch asked for by each consumer (a Celery worker's basic.qos before consuming).
const PREFETCH: u16 = 4;
/// Wait after a failed connection attempt: doubles from this up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// CPU after the last consume-ok that is still charged to the storm (closing the old
/// connections may finish after the new ones are up).
const STORM_TAIL: Duration = Duration::from_secs(1);

/// Which queues the consumers use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueMode {
    /// One queue for every client (`<prefix>`).
    Shared,
    /// A queue of its own per client (`<prefix>-<i>`, auto-delete, like kombu's reply queues).
    PerClient,
}

/// What to run.
#[derive(Clone, Debug)]
pub struct StormConfig {
    /// Where the clients connect (the load balancer's listener).
    pub endpoint: Endpoint,
    /// Number of clients.
    pub clients: usize,
    /// Heartbeat interval asked for, seconds.
    pub heartbeat: u16,
    /// Shared queue or one per client.
    pub queues: QueueMode,
    /// Queue name (prefix with [`QueueMode::PerClient`]).
    pub queue: String,
    /// How many storms (resets) to run, one after the other.
    pub storms: usize,
    /// The load balancer's admin API, `host:port`.
    pub lb_admin: String,
    /// The load balancer's listener whose connections are reset.
    pub lb_listener: String,
    /// The broker process (its children are counted too).
    pub broker_pid: Option<u32>,
    /// The load balancer's process, for its CPU over each storm.
    pub lb_pid: Option<u32>,
    /// Quiet time after the ramp and after each storm.
    pub settle: Duration,
    /// A storm that has not ended after this long fails the run.
    pub storm_timeout: Duration,
    /// Connections being opened at once during the initial ramp (not during storms).
    pub ramp: usize,
    /// Free-form label echoed in the report.
    pub label: Option<String>,
}

/// One storm's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Storm {
    /// Connections the load balancer said it reset.
    pub reset: u64,
    /// Clients that saw their connection end.
    pub lost: usize,
    /// From the reset until every client had consume-ok again, seconds.
    pub all_consuming_s: f64,
    /// Each client's time from the reset to its consume-ok, milliseconds.
    pub client_ms: Percentiles,
    /// Connection attempts that failed during the storm (each retried after a backoff).
    pub failed_attempts: u64,
    /// Handshakes completed (connection, channel, declare, qos, consume).
    pub handshakes: u64,
    /// The window the CPU figures cover (until the last consume-ok plus 1 s), seconds.
    pub window_s: f64,
    /// Broker CPU (user + system, its process tree) over the window, seconds.
    pub broker_cpu_s: Option<f64>,
    /// That divided by the handshakes, microseconds.
    pub broker_cpu_us_per_handshake: Option<f64>,
    /// The load balancer's CPU over the window, seconds.
    pub lb_cpu_s: Option<f64>,
    /// The driver's own CPU over the window, seconds.
    pub driver_cpu_s: Option<f64>,
}

/// p50 / p99 / max.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
        Self {
            p50: at(0.50),
            p99: at(0.99),
            max: v[v.len() - 1],
        }
    }
}

/// The run's report.
#[derive(Clone, Debug, Serialize)]
pub struct StormReport {
    pub tool: &'static str,
    pub label: Option<String>,
    pub clients: usize,
    pub heartbeat_s: u16,
    pub queues: QueueMode,
    /// Time to connect every client at first (ramp of `ramp` at a time), seconds.
    pub ramp_s: f64,
    pub broker_pid: Option<u32>,
    /// Broker RSS (process tree) before any client connected, KiB.
    pub broker_rss_before_kib: Option<u64>,
    /// With every client connected and idle, after the settle time, KiB.
    pub broker_rss_idle_kib: Option<u64>,
    /// (idle - before) / clients, KiB.
    pub broker_rss_per_conn_kib: Option<f64>,
    /// After the last storm and its settle time, KiB.
    pub broker_rss_after_kib: Option<u64>,
    /// Broker CPU while every client is idle (heartbeats only), percent of one core.
    pub broker_idle_core_percent: Option<f64>,
    /// Medians over the storms.
    pub all_consuming_s: Option<f64>,
    pub client_p50_ms: Option<f64>,
    pub client_p99_ms: Option<f64>,
    pub broker_cpu_us_per_handshake: Option<f64>,
    pub storms: Vec<Storm>,
    /// Distinct errors clients saw (count each), the resets themselves included.
    pub client_errors: BTreeMap<String, u64>,
    /// What went wrong with the run itself (empty when it completed).
    pub errors: Vec<String>,
}

impl StormReport {
    /// A few lines for people.
    pub fn text(&self) -> String {
        let f = |v: Option<f64>, d: usize| v.map_or("-".into(), |v| format!("{v:.d$}"));
        let mut s = format!(
            "warren-storm{}: {} clients, heartbeat {} s, {:?} queue(s), ramp {:.2} s\n",
            self.label
                .as_ref()
                .map_or(String::new(), |l| format!(" [{l}]")),
            self.clients,
            self.heartbeat_s,
            self.queues,
            self.ramp_s
        );
        s += &format!(
            "broker RSS: before {} KiB, idle {} KiB ({} KiB per connection), after storms {} KiB; idle CPU {} % of a core\n",
            self.broker_rss_before_kib.map_or("-".into(), |v| v.to_string()),
            self.broker_rss_idle_kib.map_or("-".into(), |v| v.to_string()),
            f(self.broker_rss_per_conn_kib, 1),
            self.broker_rss_after_kib.map_or("-".into(), |v| v.to_string()),
            f(self.broker_idle_core_percent, 1),
        );
        for (i, st) in self.storms.iter().enumerate() {
            s += &format!(
                "storm {}: reset {} lost {}, all consuming after {:.3} s, client p50 {:.0} ms p99 {:.0} ms max {:.0} ms, \
                 {} handshakes, {} failed attempts, broker CPU {} s = {} us/handshake, LB CPU {} s, driver CPU {} s\n",
                i + 1,
                st.reset,
                st.lost,
                st.all_consuming_s,
                st.client_ms.p50,
                st.client_ms.p99,
                st.client_ms.max,
                st.handshakes,
                st.failed_attempts,
                f(st.broker_cpu_s, 3),
                f(st.broker_cpu_us_per_handshake, 0),
                f(st.lb_cpu_s, 3),
                f(st.driver_cpu_s, 3),
            );
        }
        s += &format!(
            "median: all consuming {} s, client p50 {} ms p99 {} ms, broker {} us/handshake\n",
            f(self.all_consuming_s, 3),
            f(self.client_p50_ms, 0),
            f(self.client_p99_ms, 0),
            f(self.broker_cpu_us_per_handshake, 0),
        );
        for (e, n) in &self.client_errors {
            s += &format!("client error x{n}: {e}\n");
        }
        for e in &self.errors {
            s += &format!("ERROR: {e}\n");
        }
        s
    }
}

// === the broker's process tree ===

/// The process and its descendants (from each `/proc/<pid>/stat`'s parent field).
fn process_tree(root: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(dir) = fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend_from_slice(c);
        }
        i += 1;
    }
    out
}

/// CPU time of the tree, nanoseconds (`None` when the root is gone).
fn tree_cpu_ns(root: u32, hz: u64) -> Option<u64> {
    let root_ns = cpu::cpu_time_ns(Proc::Pid(root), hz).ok()?;
    let rest: u64 = process_tree(root)[1..]
        .iter()
        .filter_map(|p| cpu::cpu_time_ns(Proc::Pid(*p), hz).ok())
        .sum();
    Some(root_ns + rest)
}

/// RSS of the tree, KiB.
fn tree_rss_kib(root: u32) -> Option<u64> {
    let root_kib = cpu::rss_kib(Proc::Pid(root))?;
    let rest: u64 = process_tree(root)[1..]
        .iter()
        .filter_map(|p| cpu::rss_kib(Proc::Pid(*p)))
        .sum();
    Some(root_kib + rest)
}

// === resetting through the load balancer ===

/// `POST /listeners/{listener}/reset` on warren-lb's admin API; the number of connections reset.
pub async fn reset_all(admin: &str, listener: &str) -> Result<u64, String> {
    let mut s = TcpStream::connect(admin)
        .await
        .map_err(|e| format!("admin API {admin}: {e}"))?;
    let body = r#"{"style":"rst"}"#;
    let req = format!(
        "POST /listeners/{listener}/reset HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("admin API {admin}: {e}"))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .map_err(|_| format!("admin API {admin}: no answer in 10 s"))?
        .map_err(|e| format!("admin API {admin}: {e}"))?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("admin API reset: {head} {body}"));
    }
    // The body may be chunked: take the JSON object out of it.
    let json = body
        .find('{')
        .and_then(|a| body.rfind('}').map(|b| &body[a..=b]))
        .unwrap_or("");
    let v: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("admin API reset: {e}: {body}"))?;
    Ok(v.get("reset")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(0))
}

// === one client ===

#[derive(Debug)]
enum Event {
    /// consume-ok received.
    Up { i: usize, at: Instant },
    /// An open connection ended.
    Down { i: usize, error: String },
    /// A connection attempt failed.
    Failed { i: usize, error: String },
}

struct ClientCtx {
    endpoint: Endpoint,
    heartbeat: u16,
    queues: QueueMode,
    queue: String,
}

/// Connects, opens channel 1, declares the queue, sets the prefetch and consumes.
async fn open(i: usize, ctx: &ClientCtx) -> Result<Conn, ConnError> {
    let opts = ConnectOptions {
        heartbeat: ctx.heartbeat,
        read_buf: Some(READ_BUF),
    };
    let mut c = connection::connect_with(&ctx.endpoint, &format!("warren-storm {i}"), opts).await?;
    let q = match ctx.queues {
        QueueMode::Shared => QueueSpec {
            name: ctx.queue.clone(),
            durable: false,
            auto_delete: false,
            exclusive: false,
        },
        QueueMode::PerClient => QueueSpec {
            name: format!("{}-{i}", ctx.queue),
            durable: false,
            auto_delete: true,
            exclusive: false,
        },
    };
    c.declare_queue(&q).await?;
    c.qos(PREFETCH).await?;
    c.consume(&q.name, false).await?;
    Ok(c)
}

/// Sits on an open connection: answers nothing but sends heartbeats, until the connection ends
/// (an error) or `stop` changes (`Ok`).
async fn idle(c: &mut Conn, stop: &mut watch::Receiver<bool>) -> Result<(), ConnError> {
    let period = match c.heartbeat {
        0 => Duration::from_secs(86_400),
        h => Duration::from_secs(u64::from(h)) / 2,
    };
    let mut hb = tokio::time::interval_at(Instant::now() + period, period);
    hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = c.stream.readable() => {
                r?;
                match c.inbuf.try_fill(&c.stream) {
                    Ok(0) => return Err(ConnError::Eof),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(e.into()),
                }
                let max = c.max_payload();
                while let Some((f, used)) = codec::split_frame(c.inbuf.data(), max)? {
                    let method = (f.kind == FRAME_METHOD).then(|| (f.channel, f.payload.to_vec()));
                    c.inbuf.consume(used);
                    if let Some((ch, payload)) = method {
                        c.control(ch, &payload).await?;
                    }
                }
            }
            _ = hb.tick() => c.stream.write_all(&HEARTBEAT).await?,
            _ = stop.changed() => return Ok(()),
        }
    }
}

async fn client(
    i: usize,
    ctx: Arc<ClientCtx>,
    tx: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    ramp: Arc<Semaphore>,
) {
    let mut permit = ramp.acquire_owned().await.ok();
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            return;
        }
        let setup = tokio::select! {
            r = open(i, &ctx) => r,
            _ = stop.changed() => return,
        };
        drop(permit.take());
        let mut c = match setup {
            Ok(c) => {
                failures = 0;
                c
            }
            Err(e) => {
                let _ = tx.send(Event::Failed {
                    i,
                    error: e.to_string(),
                });
                let wait = RETRY_FIRST
                    .saturating_mul(1 << failures.min(8))
                    .min(RETRY_MAX);
                failures += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let _ = tx.send(Event::Up {
            i,
            at: Instant::now(),
        });
        match idle(&mut c, &mut stop).await {
            Ok(()) => {
                c.close().await;
                return;
            }
            Err(e) => {
                let _ = tx.send(Event::Down {
                    i,
                    error: e.to_string(),
                });
            }
        }
    }
}

// === the run ===

#[derive(Clone, Copy, Debug, Default)]
struct ClientState {
    up: bool,
    up_at: Option<Instant>,
    downs: u64,
    failures: u64,
}

struct Tracker {
    rx: mpsc::UnboundedReceiver<Event>,
    states: Vec<ClientState>,
    errors: BTreeMap<String, u64>,
}

impl Tracker {
    fn apply(&mut self, e: Event) {
        match e {
            Event::Up { i, at } => {
                self.states[i].up = true;
                self.states[i].up_at = Some(at);
            }
            Event::Down { i, error } => {
                self.states[i].up = false;
                self.states[i].downs += 1;
                *self.errors.entry(error).or_default() += 1;
            }
            Event::Failed { i, error } => {
                self.states[i].failures += 1;
                *self.errors.entry(error).or_default() += 1;
            }
        }
    }

    /// Every client is up with a consume-ok at or after `since`.
    fn all_up_since(&self, since: Instant) -> bool {
        self.states
            .iter()
            .all(|s| s.up && s.up_at.is_some_and(|t| t >= since))
    }

    /// Applies events until `done` holds (true) or `deadline` passes (false).
    async fn until(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => self.apply(e),
                Ok(None) | Err(_) => return done(self),
            }
        }
    }

    /// Applies events for `d`.
    async fn pump(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        self.until(deadline, |_| false).await;
    }
}

/// CPU seconds between two readings in nanoseconds.
fn secs_between(a: Option<u64>, b: Option<u64>) -> Option<f64> {
    Some(b?.saturating_sub(a?) as f64 / 1e9)
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Connects every client, lets them idle, runs the storms, closes everything.
pub async fn run(cfg: &StormConfig, progress: impl Fn(&str)) -> StormReport {
    let hz = cpu::clock_ticks_per_sec();
    let broker_cpu = || cfg.broker_pid.and_then(|p| tree_cpu_ns(p, hz));
    let self_cpu = || cpu::cpu_time_ns(Proc::SelfProc, hz).ok();
    let lb_cpu = || {
        cfg.lb_pid
            .and_then(|p| cpu::cpu_time_ns(Proc::Pid(p), hz).ok())
    };
    let mut report = StormReport {
        tool: "warren-storm",
        label: cfg.label.clone(),
        clients: cfg.clients,
        heartbeat_s: cfg.heartbeat,
        queues: cfg.queues,
        ramp_s: 0.0,
        broker_pid: cfg.broker_pid,
        broker_rss_before_kib: cfg.broker_pid.and_then(tree_rss_kib),
        broker_rss_idle_kib: None,
        broker_rss_per_conn_kib: None,
        broker_rss_after_kib: None,
        broker_idle_core_percent: None,
        all_consuming_s: None,
        client_p50_ms: None,
        client_p99_ms: None,
        broker_cpu_us_per_handshake: None,
        storms: Vec::new(),
        client_errors: BTreeMap::new(),
        errors: Vec::new(),
    };

    let (tx, rx) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(ClientCtx {
        endpoint: cfg.endpoint.clone(),
        heartbeat: cfg.heartbeat,
        queues: cfg.queues,
        queue: cfg.queue.clone(),
    });
    let ramp = Arc::new(Semaphore::new(cfg.ramp.max(1)));
    let mut tasks = JoinSet::new();
    let t0 = Instant::now();
    for i in 0..cfg.clients {
        tasks.spawn(client(
            i,
            ctx.clone(),
            tx.clone(),
            stop_rx.clone(),
            ramp.clone(),
        ));
    }
    drop(tx);
    let mut tr = Tracker {
        rx,
        states: vec![ClientState::default(); cfg.clients],
        errors: BTreeMap::new(),
    };

    'run: {
        let ramp_limit = t0 + cfg.storm_timeout.max(Duration::from_secs(60));
        if !tr.until(ramp_limit, |t| t.all_up_since(t0)).await {
            let up = tr.states.iter().filter(|s| s.up).count();
            report.errors.push(format!(
                "only {up} of {} clients consuming after the ramp",
                cfg.clients
            ));
            break 'run;
        }
        report.ramp_s = t0.elapsed().as_secs_f64();
        progress(&format!(
            "{} clients consuming after {:.2} s",
            cfg.clients, report.ramp_s
        ));

        let c0 = broker_cpu();
        let i0 = Instant::now();
        tr.pump(cfg.settle).await;
        let c1 = broker_cpu();
        if let (Some(a), Some(b)) = (c0, c1) {
            report.broker_idle_core_percent =
                Some(b.saturating_sub(a) as f64 / 1e9 / i0.elapsed().as_secs_f64() * 100.0);
        }
        report.broker_rss_idle_kib = cfg.broker_pid.and_then(tree_rss_kib);
        if let (Some(a), Some(b)) = (report.broker_rss_before_kib, report.broker_rss_idle_kib) {
            report.broker_rss_per_conn_kib =
                Some((b as f64 - a as f64) / cfg.clients.max(1) as f64);
        }

        for k in 0..cfg.storms {
            let before: Vec<ClientState> = tr.states.clone();
            let cpu0 = broker_cpu();
            let self0 = self_cpu();
            let lb0 = lb_cpu();
            let t_r = Instant::now();
            let reset = match reset_all(&cfg.lb_admin, &cfg.lb_listener).await {
                Ok(n) => n,
                Err(e) => {
                    report.errors.push(e);
                    break 'run;
                }
            };
            let deadline = t_r + cfg.storm_timeout;
            let done = tr.until(deadline, |t| t.all_up_since(t_r)).await;
            let t_all = Instant::now();
            let all_consuming_s = (t_all - t_r).as_secs_f64();
            if !done {
                let up = tr
                    .states
                    .iter()
                    .filter(|s| s.up && s.up_at.is_some_and(|t| t >= t_r))
                    .count();
                report.errors.push(format!(
                    "storm {}: only {up} of {} clients consuming again after {:.0} s",
                    k + 1,
                    cfg.clients,
                    cfg.storm_timeout.as_secs_f64()
                ));
            }
            tr.pump(STORM_TAIL).await;
            let cpu1 = broker_cpu();
            let self1 = self_cpu();
            let lb1 = lb_cpu();
            let window_s = t_r.elapsed().as_secs_f64();
            let client_ms: Vec<f64> = tr
                .states
                .iter()
                .filter_map(|s| s.up_at.filter(|t| *t >= t_r))
                .map(|t| (t - t_r).as_secs_f64() * 1e3)
                .collect();
            let handshakes = client_ms.len() as u64;
            let lost = tr
                .states
                .iter()
                .zip(&before)
                .filter(|(s, b)| s.downs > b.downs)
                .count();
            let failed_attempts = tr
                .states
                .iter()
                .zip(&before)
                .map(|(s, b)| s.failures - b.failures)
                .sum();
            let broker_cpu_s = secs_between(cpu0, cpu1);
            let storm = Storm {
                reset,
                lost,
                all_consuming_s,
                client_ms: Percentiles::of(client_ms),
                failed_attempts,
                handshakes,
                window_s,
                broker_cpu_s,
                broker_cpu_us_per_handshake: broker_cpu_s
                    .filter(|_| handshakes > 0)
                    .map(|s| s * 1e6 / handshakes as f64),
                lb_cpu_s: secs_between(lb0, lb1),
                driver_cpu_s: secs_between(self0, self1),
            };
            progress(&format!(
                "storm {}: {} reset, all {} consuming again after {:.3} s (client p50 {:.0} ms, p99 {:.0} ms), broker {} us/handshake",
                k + 1,
                reset,
                handshakes,
                all_consuming_s,
                storm.client_ms.p50,
                storm.client_ms.p99,
                storm
                    .broker_cpu_us_per_handshake
                    .map_or("-".into(), |v| format!("{v:.0}")),
            ));
            report.storms.push(storm);
            if !done {
                break 'run;
            }
            tr.pump(cfg.settle).await;
        }
        report.broker_rss_after_kib = cfg.broker_pid.and_then(tree_rss_kib);
    }

    let _ = stop_tx.send(true);
    let closing = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(15), closing)
        .await
        .is_err()
    {
        tasks.abort_all();
    }
    while let Ok(e) = tr.rx.try_recv() {
        tr.apply(e);
    }
    report.client_errors = std::mem::take(&mut tr.errors);

    let s = &report.storms;
    report.all_consuming_s = median(s.iter().map(|s| s.all_consuming_s).collect());
    report.client_p50_ms = median(s.iter().map(|s| s.client_ms.p50).collect());
    report.client_p99_ms = median(s.iter().map(|s| s.client_ms.p99).collect());
    report.broker_cpu_us_per_handshake = median(
        s.iter()
            .filter_map(|s| s.broker_cpu_us_per_handshake)
            .collect(),
    );
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p99, p.max), (50.0, 99.0, 100.0));
        let one = Percentiles::of(vec![7.0]);
        assert_eq!((one.p50, one.p99, one.max), (7.0, 7.0, 7.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
    }

    #[test]
    fn own_tree_has_self() {
        let me = std::process::id();
        assert_eq!(process_tree(me)[0], me);
        assert!(tree_rss_kib(me).unwrap_or(0) > 0);
    }
}
