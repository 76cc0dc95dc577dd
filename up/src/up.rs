//! The supervisor: start the nodes (the first bootstraps the cluster, the others join it; a
//! data dir from an earlier run restarts where it was), wait until every member runs, apply
//! `ha-all`, start warren-lb in front, then serve the control socket, report exits, print the
//! status line, and on SIGINT/SIGTERM stop warren-lb and the nodes (SIGTERM, then SIGKILL after
//! a grace period) and remove what it made.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;
use crate::control::{self, Request, Verb};
use crate::plan::{self, NodeAddrs, NodePlan, NodeState, State};
use crate::proc::{self, Proc};
use crate::{api, status};

/// How long a process has to report its listeners.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nodes have to form the cluster.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(60);
/// A stopped process still there after this gets SIGKILL (warren-lb drains for 5 s, a broker
/// waits up to 5 s for its clients to close).
const STOP_GRACE: Duration = Duration::from_secs(15);

type Exit = (String, u32, std::io::Result<ExitStatus>);

struct Node {
    plan: NodePlan,
    dir: PathBuf,
    addrs: NodeAddrs,
    proc: Option<Proc>,
    /// Stopped or killed through the control socket: not restarted by `--restart`.
    held: bool,
}

/// A running topology.
pub struct Up {
    cfg: Config,
    data_dir: PathBuf,
    /// The data dir is a temporary one, removed at exit.
    temp: bool,
    broker_bin: PathBuf,
    lb_bin: PathBuf,
    secret: PathBuf,
    nodes: Vec<Node>,
    lb: Option<Proc>,
    lb_addrs: BTreeMap<String, SocketAddr>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
}

/// Start the topology of `cfg`, run until SIGINT or SIGTERM, stop it. Errors say what to do.
pub async fn run(cfg: Config) -> Result<(), String> {
    cfg.validate()?;
    let mut up = Up::prepare(cfg)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let started = tokio::select! {
        r = up.start() => r,
        _ = sigint.recv() => Err("interrupted while starting".into()),
        _ = sigterm.recv() => Err("terminated while starting".into()),
    };
    if let Err(e) = started {
        up.shutdown().await;
        return Err(e);
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Request>(8);
    control::serve(&control::socket_path(&up.data_dir), ctl_tx)
        .map_err(|e| format!("control socket: {e}"))?;
    up.print_table();
    let every = Duration::from_secs(up.cfg.status_interval.max(1));
    let mut tick = tokio::time::interval_at(Instant::now() + every, every);
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            Some(exit) = up.exits.recv() => up.on_exit(exit).await,
            Some(req) = ctl_rx.recv() => {
                let out = up.on_request(&req.verb).await;
                let _ = req.reply.send(out);
            }
            _ = tick.tick(), if up.cfg.status_interval > 0 => {
                println!("{}  {}", clock(), up.status_line().await);
            }
        }
    }
    println!("stopping warren-lb and the nodes");
    up.shutdown().await;
    Ok(())
}

fn clock() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{:02}:{:02}:{:02}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Fails with a clear message when `addr` cannot be bound (port 0 always can).
fn check_free(what: &str, flag: &str, addr: SocketAddr) -> Result<(), String> {
    if addr.port() == 0 {
        return Ok(());
    }
    match std::net::TcpListener::bind(addr) {
        Ok(_) => Ok(()),
        Err(e) => {
            let mut other = addr;
            other.set_port(addr.port().wrapping_add(1).max(1024));
            Err(format!(
                "{what} address {addr} is not free ({e}). Something else listens there (see \
                 `ss -ltnp 'sport = :{}'`; a RabbitMQ service? `systemctl stop rabbitmq-server`); \
                 stop it, or give another address: warren-up {flag} {other}",
                addr.port()
            ))
        }
    }
}

fn random_secret() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn is_fresh(dir: &Path) -> bool {
    std::fs::read_dir(dir).map_or(true, |mut d| d.next().is_none())
}

impl Up {
    /// Check binaries, ports and the data dir; nothing started yet.
    fn prepare(cfg: Config) -> Result<Up, String> {
        let bin_dir = match &cfg.bin_dir {
            Some(d) => d.clone(),
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let broker_bin = bin_dir.join("warren-broker");
        let lb_bin = bin_dir.join("warren-lb");
        for b in [&broker_bin, &lb_bin] {
            if !b.is_file() {
                return Err(format!(
                    "{} is missing: build the binaries first (cargo build --release --bins), or \
                     say where they are with --bin-dir",
                    b.display()
                ));
            }
        }
        check_free("AMQP", "--amqp", cfg.amqp)?;
        check_free("management", "--mgmt", cfg.mgmt)?;
        check_free("warren-lb admin", "--admin", cfg.admin)?;
        let (data_dir, temp) = match &cfg.data_dir {
            Some(d) => (d.clone(), false),
            None => (
                std::env::temp_dir().join(format!("warren-up.{}", random_secret()[..8].to_owned())),
                true,
            ),
        };
        std::fs::create_dir_all(&data_dir)
            .map_err(|e| format!("data dir {}: {e}", data_dir.display()))?;
        let data_dir = data_dir.canonicalize().unwrap_or(data_dir);
        if control::socket_path(&data_dir).exists() {
            // A live warren-up answers on it; a stale socket is replaced.
            if std::os::unix::net::UnixStream::connect(control::socket_path(&data_dir)).is_ok() {
                return Err(format!(
                    "a warren-up already runs with data dir {}",
                    data_dir.display()
                ));
            }
        }
        let _ = std::fs::write(
            control::pointer_file(),
            data_dir.to_string_lossy().as_bytes(),
        );
        let secret = data_dir.join(plan::SECRET_FILE);
        if !secret.is_file() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&secret)
                .map_err(|e| format!("{}: {e}", secret.display()))?;
            f.write_all(random_secret().as_bytes())
                .map_err(|e| format!("{}: {e}", secret.display()))?;
        }
        let saved = State::load(&data_dir)?.unwrap_or_default();
        let nodes = plan::nodes(&cfg)
            .into_iter()
            .map(|p| {
                let dir = data_dir.join(&p.short);
                let addrs = saved
                    .nodes
                    .get(&p.short)
                    .map(|n| n.addrs.clone())
                    .unwrap_or_default();
                Node {
                    plan: p,
                    dir,
                    addrs,
                    proc: None,
                    held: false,
                }
            })
            .collect();
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Ok(Up {
            cfg,
            data_dir,
            temp,
            broker_bin,
            lb_bin,
            secret,
            nodes,
            lb: None,
            lb_addrs: BTreeMap::new(),
            exits_tx,
            exits,
        })
    }

    /// The command line of node `i`; `join` for a fresh node joining the cluster.
    fn node_args(&self, i: usize, join: Option<SocketAddr>) -> Vec<String> {
        let n = &self.nodes[i];
        let any = "127.0.0.1:0".to_string();
        let addr = |a: Option<SocketAddr>| a.map_or_else(|| any.clone(), |a| a.to_string());
        let mut args = vec![
            "--node-name".into(),
            n.plan.name.clone(),
            "--data-dir".into(),
            n.dir.to_string_lossy().into_owned(),
            "--cluster-listen".into(),
            addr(n.addrs.cluster),
            "--cluster-secret-file".into(),
            self.secret.to_string_lossy().into_owned(),
        ];
        if n.plan.witness {
            args.push("--witness".into());
        } else {
            args.extend(["--amqp".into(), addr(n.addrs.amqp)]);
            args.extend(["--mgmt".into(), addr(n.addrs.mgmt)]);
        }
        if let Some(ms) = self.cfg.failure_detection_ms {
            args.extend(["--cluster-failure-detection-ms".into(), ms.to_string()]);
        }
        if let Some(j) = join {
            args.extend(["--join".into(), j.to_string()]);
        }
        args
    }

    /// Start node `i` and wait for its listeners.
    async fn start_node(&mut self, i: usize, join: Option<SocketAddr>) -> Result<(), String> {
        std::fs::create_dir_all(&self.nodes[i].dir).map_err(|e| e.to_string())?;
        let args = self.node_args(i, join);
        let n = &self.nodes[i];
        let log = self.data_dir.join(format!("{}.log", n.plan.short));
        let p = proc::spawn(
            &self.broker_bin,
            &args,
            &log,
            &[("RUST_LOG", self.cfg.log.as_str())],
            n.plan.short.clone(),
            self.exits_tx.clone(),
        )
        .map_err(|e| e.to_string())?;
        let want: &[&str] = if n.plan.witness {
            &["cluster"]
        } else {
            &["amqp", "mgmt", "cluster"]
        };
        let found = proc::wait_listening(&p, want, START_TIMEOUT)
            .await
            .map_err(|e| format!("{} ({}): {e}", n.plan.name, log.display()));
        self.nodes[i].proc = Some(p);
        let found = found?;
        let parse = |k: &str| found.get(k).and_then(|a| a.parse().ok());
        let n = &mut self.nodes[i];
        n.addrs.cluster = parse("cluster");
        if !n.plan.witness {
            n.addrs.amqp = parse("amqp");
            n.addrs.mgmt = parse("mgmt");
        }
        n.held = false;
        Ok(())
    }

    /// The management address of a running node.
    fn some_mgmt(&self) -> Option<SocketAddr> {
        self.nodes
            .iter()
            .filter(|n| n.proc.as_ref().is_some_and(|p| proc::alive(p.pid)))
            .find_map(|n| n.addrs.mgmt)
    }

    async fn start(&mut self) -> Result<(), String> {
        let fresh: Vec<bool> = self.nodes.iter().map(|n| is_fresh(&n.dir)).collect();
        println!(
            "warren-up: {} node{}{} in {}{}",
            self.cfg.nodes,
            if self.cfg.nodes == 1 { "" } else { "s" },
            if self.cfg.nodes == 2 {
                " and a witness"
            } else {
                ""
            },
            self.data_dir.display(),
            if self.temp { " (removed at exit)" } else { "" }
        );
        // The first node bootstraps (or restarts); fresh ones join it.
        self.start_node(0, None).await?;
        let seed = self.nodes[0].addrs.cluster;
        for (i, fresh) in fresh.into_iter().enumerate().skip(1) {
            self.start_node(i, if fresh { seed } else { None }).await?;
        }
        let mgmt = self.nodes[0]
            .addrs
            .mgmt
            .ok_or("the first node has no management listener")?;
        let want = self.nodes.len();
        let end = Instant::now() + CLUSTER_TIMEOUT;
        loop {
            let running = api::get_json(mgmt, "/api/nodes")
                .await
                .map(|v| {
                    v.as_array().map_or(0, |a| {
                        a.iter().filter(|n| n["running"] == json!(true)).count()
                    })
                })
                .unwrap_or(0);
            if running == want {
                break;
            }
            if Instant::now() >= end {
                return Err(format!(
                    "the cluster has {running} of {want} members running after \
                     {CLUSTER_TIMEOUT:?}; see the nodes' logs in {}",
                    self.data_dir.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The seed's policy: every queue mirrored on every node, synchronised automatically.
        let policy = json!({"pattern": "", "apply-to": "queues", "priority": 0,
            "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}});
        let r = api::call(
            mgmt,
            warren_ctl::Method::Put,
            "/api/policies/%2F/ha-all",
            Some(&policy),
        )
        .await?;
        if !(200..300).contains(&r.status) {
            return Err(format!(
                "setting the ha-all policy: HTTP {} {}",
                r.status,
                String::from_utf8_lossy(&r.body)
            ));
        }
        self.start_lb().await?;
        self.save(true);
        Ok(())
    }

    async fn start_lb(&mut self) -> Result<(), String> {
        let amqp: Vec<SocketAddr> = self.nodes.iter().filter_map(|n| n.addrs.amqp).collect();
        let mgmt: Vec<SocketAddr> = self.nodes.iter().filter_map(|n| n.addrs.mgmt).collect();
        let text = plan::lb_config(&self.cfg, &amqp, &mgmt)?;
        let conf = self.data_dir.join("warren-lb.toml");
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        let log = self.data_dir.join("warren-lb.log");
        let p = proc::spawn(
            &self.lb_bin,
            &["--config".into(), conf.to_string_lossy().into_owned()],
            &log,
            &[("RUST_LOG", "info")],
            "warren-lb".into(),
            self.exits_tx.clone(),
        )
        .map_err(|e| e.to_string())?;
        let found = proc::wait_listening(&p, &["amqp", "mgmt", "admin"], START_TIMEOUT).await;
        self.lb = Some(p);
        let found = found.map_err(|e| format!("warren-lb ({}): {e}", log.display()))?;
        self.lb_addrs = found
            .into_iter()
            .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
            .collect();
        Ok(())
    }

    fn save(&self, running: bool) {
        let state = State {
            nodes: self
                .nodes
                .iter()
                .map(|n| {
                    (
                        n.plan.short.clone(),
                        NodeState {
                            name: n.plan.name.clone(),
                            addrs: n.addrs.clone(),
                            data_dir: n.dir.clone(),
                            pid: n.proc.as_ref().map(|p| p.pid).filter(|_| running),
                        },
                    )
                })
                .collect(),
            lb: if running {
                self.lb_addrs.clone()
            } else {
                BTreeMap::new()
            },
            lb_pid: self.lb.as_ref().map(|p| p.pid).filter(|_| running),
            pid: running.then(std::process::id),
            ready: running,
        };
        if let Err(e) = state.save(&self.data_dir) {
            eprintln!("warren-up: cannot write the state file: {e}");
        }
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let dash = || "-".to_string();
        out.push_str(&format!(
            "\n  {:<18} {:<22} {:<22} {:<22} {:<8} data dir\n",
            "node", "AMQP", "management", "cluster", "pid"
        ));
        for n in &self.nodes {
            let pid = n
                .proc
                .as_ref()
                .filter(|p| proc::alive(p.pid))
                .map_or_else(|| "down".to_string(), |p| p.pid.to_string());
            let name = if n.plan.witness {
                format!("{} (witness)", n.plan.short)
            } else {
                n.plan.name.clone()
            };
            out.push_str(&format!(
                "  {:<18} {:<22} {:<22} {:<22} {:<8} {}\n",
                name,
                n.addrs.amqp.map_or_else(dash, |a| a.to_string()),
                n.addrs.mgmt.map_or_else(dash, |a| a.to_string()),
                n.addrs.cluster.map_or_else(dash, |a| a.to_string()),
                pid,
                n.dir.display()
            ));
        }
        let addr = |k: &str| self.lb_addrs.get(k).map_or_else(dash, |a| a.to_string());
        let lb_pid = self.lb.as_ref().map_or(0, |p| p.pid);
        out.push_str(&format!(
            "\n  warren-lb (pid {lb_pid}): AMQP {} and management {} -> the nodes, round robin, \
             health checks every {}s, idle timeout {}s, chaos {}; admin http://{}\n",
            addr("amqp"),
            addr("mgmt"),
            self.cfg.health_interval,
            self.cfg.idle_timeout,
            self.cfg.chaos,
            addr("admin"),
        ));
        out.push_str(&format!(
            "\n  Clients: amqp://guest:guest@{}//    UI: http://{}/ (guest / guest)\n",
            addr("amqp"),
            addr("mgmt")
        ));
        let dd = if self.temp {
            String::new()
        } else {
            format!(" --data-dir {}", self.data_dir.display())
        };
        out.push_str(&format!(
            "  Failover: warren-up kill r1{dd}   (then: warren-up start r1{dd})    Stop: Ctrl-C\n"
        ));
        out
    }

    fn print_table(&self) {
        println!("{}", self.table());
    }

    async fn status_line(&self) -> String {
        let Some(mgmt) = self.some_mgmt() else {
            return "no node running".into();
        };
        let admin = self.lb_addrs.get("admin").copied();
        match tokio::time::timeout(Duration::from_secs(4), status::read(mgmt, admin)).await {
            Ok(Ok(st)) => st.to_string(),
            Ok(Err(e)) => format!("status unavailable: {e}"),
            Err(_) => "status unavailable: no answer within 4 s".into(),
        }
    }

    fn find(&self, name: &str) -> Result<usize, String> {
        self.nodes
            .iter()
            .position(|n| n.plan.short == name || n.plan.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.nodes.iter().map(|n| n.plan.short.as_str()).collect();
                format!("no node '{name}' (nodes: {})", names.join(", "))
            })
    }

    fn running_pid(&self, i: usize) -> Option<u32> {
        self.nodes[i]
            .proc
            .as_ref()
            .map(|p| p.pid)
            .filter(|pid| proc::alive(*pid))
    }

    async fn on_request(&mut self, verb: &Verb) -> Result<String, String> {
        match verb {
            Verb::Status => Ok(format!(
                "{}\n  {}\n",
                self.table(),
                self.status_line().await
            )),
            Verb::Kill(name) | Verb::Stop(name) => {
                let i = self.find(name)?;
                let pid = self
                    .running_pid(i)
                    .ok_or_else(|| format!("{} is not running", self.nodes[i].plan.name))?;
                self.nodes[i].held = true;
                let kill = matches!(verb, Verb::Kill(_));
                if kill {
                    proc::signal(pid, Signal::SIGKILL);
                    let end = Instant::now() + Duration::from_secs(10);
                    while proc::alive(pid) && Instant::now() < end {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                } else {
                    proc::stop(pid, STOP_GRACE).await;
                }
                let what = if kill {
                    "killed (SIGKILL)"
                } else {
                    "stopped (SIGTERM)"
                };
                Ok(format!("{} {what}, pid {pid}\n", self.nodes[i].plan.name))
            }
            Verb::Start(name) => {
                let i = self.find(name)?;
                if let Some(pid) = self.running_pid(i) {
                    return Err(format!(
                        "{} is running (pid {pid})",
                        self.nodes[i].plan.name
                    ));
                }
                self.start_node(i, None).await?;
                self.save(true);
                let pid = self.running_pid(i).unwrap_or(0);
                println!(
                    "{}  started {} (pid {pid})",
                    clock(),
                    self.nodes[i].plan.name
                );
                Ok(format!("{} started, pid {pid}\n", self.nodes[i].plan.name))
            }
        }
    }

    async fn on_exit(&mut self, (tag, pid, st): Exit) {
        let how = proc::describe(&st);
        if tag == "warren-lb" {
            if self.lb.as_ref().is_some_and(|p| p.pid == pid) {
                println!(
                    "{}  warren-lb exited ({how}); see its log in {}",
                    clock(),
                    self.data_dir.display()
                );
                if self.cfg.restart {
                    if let Err(e) = self.start_lb().await {
                        println!("{}  warren-lb did not start again: {e}", clock());
                    }
                }
            }
            return;
        }
        let Ok(i) = self.find(&tag) else { return };
        if self.nodes[i].proc.as_ref().map(|p| p.pid) != Some(pid) {
            return;
        }
        let name = self.nodes[i].plan.name.clone();
        let held = self.nodes[i].held;
        println!("{}  {name} (pid {pid}) exited: {how}", clock());
        if self.cfg.restart && !held {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match self.start_node(i, None).await {
                Ok(()) => {
                    self.save(true);
                    println!(
                        "{}  {name} restarted (pid {})",
                        clock(),
                        self.running_pid(i).unwrap_or(0)
                    );
                }
                Err(e) => println!("{}  {name} did not restart: {e}", clock()),
            }
        } else if !held {
            println!(
                "{}  {name} stays down (warren-up start {} to start it again)",
                clock(),
                self.nodes[i].plan.short
            );
        }
    }

    /// Stop warren-lb and every node at once (SIGTERM, SIGKILL after the grace period); remove
    /// the control socket, and the data dir if it is a temporary one.
    async fn shutdown(&mut self) {
        let pids: Vec<u32> = self
            .lb
            .take()
            .map(|p| p.pid)
            .into_iter()
            .chain(
                self.nodes
                    .iter_mut()
                    .filter_map(|n| n.proc.take().map(|p| p.pid)),
            )
            .collect();
        futures_join(pids.iter().map(|pid| proc::stop(*pid, STOP_GRACE))).await;
        let _ = std::fs::remove_file(control::socket_path(&self.data_dir));
        if self.temp {
            let _ = std::fs::remove_dir_all(&self.data_dir);
            if std::fs::read(control::pointer_file())
                .is_ok_and(|p| p == self.data_dir.to_string_lossy().as_bytes())
            {
                let _ = std::fs::remove_file(control::pointer_file());
            }
        } else {
            self.save(false);
        }
    }
}

/// Await every future (they run concurrently).
async fn futures_join<F: std::future::Future<Output = ()> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}
