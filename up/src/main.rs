//! `warren-up`: parse the command line, load the config, run (see the library's docs).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use warren_up::config::Config;
use warren_up::control::{self, Verb};

/// The seed's HA setup in one command: N warren-broker nodes clustered with the ha-all policy,
/// behind warren-lb on 5672 (AMQP) and 15672 (management), with the ELB's periodic resets.
#[derive(Parser, Debug)]
#[command(name = "warren-up", version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// TOML file with the same keys as these flags (nodes, amqp, mgmt, chaos, data-dir, ...).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Broker nodes (default 3; 2 also starts a witness, so that either node may die).
    #[arg(long)]
    nodes: Option<usize>,
    /// The load balancer's AMQP address (default 127.0.0.1:5672; port 0: any free port).
    #[arg(long, value_name = "ADDR")]
    amqp: Option<SocketAddr>,
    /// The load balancer's management address (default 127.0.0.1:15672).
    #[arg(long, value_name = "ADDR")]
    mgmt: Option<SocketAddr>,
    /// warren-lb's admin API address (default 127.0.0.1:9901).
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// elb (periodic resets, default), none, or a warren-lb TOML file whose faults go on the
    /// AMQP listener (examples/chaos/*.toml).
    #[arg(long, value_name = "elb|none|FILE")]
    chaos: Option<String>,
    /// Seed of the chaos RNG.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    /// Keep data and ports here between runs (default: a temporary dir removed at exit).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Start a node again when it exits by itself (not after `warren-up kill|stop`).
    #[arg(long)]
    restart: bool,
    /// Where warren-broker and warren-lb are (default: next to warren-up).
    #[arg(long, value_name = "DIR")]
    bin_dir: Option<PathBuf>,
    /// The nodes' --cluster-failure-detection-ms.
    #[arg(long, value_name = "MS")]
    failure_detection_ms: Option<u64>,
    /// Seconds between status lines (0: none; default 5).
    #[arg(long, value_name = "S")]
    status_interval: Option<u64>,
    /// The nodes' log filter (RUST_LOG syntax; default info).
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

/// Talk to a running warren-up.
#[derive(Subcommand, Debug)]
enum Cmd {
    /// SIGKILL a node (kill -9), to watch a mirror take over.
    Kill(Target),
    /// Stop a node cleanly (SIGTERM).
    Stop(Target),
    /// Start a node that is down, with its data dir and addresses.
    Start(Target),
    /// What runs where, and the status line.
    Status(Where),
}

#[derive(clap::Args, Debug)]
struct Target {
    /// r1, r2, ... or the node name (r1@localhost).
    node: String,
    #[command(flatten)]
    at: Where,
}

#[derive(clap::Args, Debug)]
struct Where {
    /// The running warren-up's data dir (default: the last one started without --data-dir).
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

fn config(cli: Cli) -> Result<Config, String> {
    let mut c = match &cli.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = cli.nodes {
        c.nodes = v;
    }
    if let Some(v) = cli.amqp {
        c.amqp = v;
    }
    if let Some(v) = cli.mgmt {
        c.mgmt = v;
    }
    if let Some(v) = cli.admin {
        c.admin = v;
    }
    if let Some(v) = cli.chaos {
        c.chaos = v;
    }
    if cli.seed.is_some() {
        c.seed = cli.seed;
    }
    if cli.data_dir.is_some() {
        c.data_dir = cli.data_dir;
    }
    if cli.restart {
        c.restart = true;
    }
    if cli.bin_dir.is_some() {
        c.bin_dir = cli.bin_dir;
    }
    if cli.failure_detection_ms.is_some() {
        c.failure_detection_ms = cli.failure_detection_ms;
    }
    if let Some(v) = cli.status_interval {
        c.status_interval = v;
    }
    if let Some(v) = cli.log {
        c.log = v;
    }
    Ok(c)
}

fn data_dir(at: Where) -> Result<PathBuf, String> {
    match at.data_dir {
        Some(d) => Ok(d),
        None => std::fs::read_to_string(control::pointer_file())
            .map(PathBuf::from)
            .map_err(|_| {
                "no warren-up seems to run (give its --data-dir if it was started with one)"
                    .to_string()
            }),
    }
}

async fn main_async(mut cli: Cli) -> Result<(), String> {
    let Some(cmd) = cli.cmd.take() else {
        return warren_up::run(config(cli)?).await;
    };
    let (verb, at) = match cmd {
        Cmd::Kill(t) => (Verb::Kill(t.node), t.at),
        Cmd::Stop(t) => (Verb::Stop(t.node), t.at),
        Cmd::Start(t) => (Verb::Start(t.node), t.at),
        Cmd::Status(w) => (Verb::Status, w),
    };
    let out = control::send(&data_dir(at)?, &verb).await?;
    print!("{out}");
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-up: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("warren-up: {e}");
            ExitCode::FAILURE
        }
    }
}
