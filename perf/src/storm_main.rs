//! `warren-storm`: the reconnect storm (see `warren_perf::storm`). Connects `--clients` idle
//! consumers through warren-lb, resets every connection with its admin API `--storms` times, and
//! prints how long until all consume again, the broker's CPU per handshake and its memory per idle
//! connection. Exit 0 when every storm completed, 1 otherwise, 2 on bad arguments.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::Parser;
use warren_perf::{
    connection::Endpoint,
    storm::{self, QueueMode, StormConfig},
};

/// Reconnect storm through warren-lb.
#[derive(Debug, Parser)]
#[command(name = "warren-storm", version)]
struct Args {
    /// Where the clients connect: warren-lb's AMQP listener.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5670/%2f")]
    uri: String,
    /// Number of clients (one connection, one channel, one consumer each).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Heartbeat interval asked for, seconds (0 = off).
    #[arg(long, default_value_t = 10)]
    heartbeat: u16,
    /// One auto-delete queue per client instead of one shared queue.
    #[arg(long)]
    queue_per_client: bool,
    /// Queue name (the prefix with --queue-per-client).
    #[arg(long, default_value = "storm")]
    queue: String,
    /// How many storms (resets of every connection).
    #[arg(long, default_value_t = 3)]
    storms: usize,
    /// warren-lb's admin API, host:port.
    #[arg(long, default_value = "127.0.0.1:9901")]
    lb_admin: String,
    /// warren-lb's listener whose connections are reset.
    #[arg(long, default_value = "amqp")]
    lb_listener: String,
    /// The broker's process id (its children count too), for CPU and memory.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// warren-lb's process id, for its CPU over each storm.
    #[arg(long)]
    lb_pid: Option<u32>,
    /// Quiet seconds after the ramp and after each storm.
    #[arg(long, default_value_t = 3.0)]
    settle: f64,
    /// Seconds a storm may take before the run fails.
    #[arg(long, default_value_t = 120.0)]
    storm_timeout: f64,
    /// Connections opened at once during the initial ramp.
    #[arg(long, default_value_t = 50)]
    ramp: usize,
    /// Label echoed in the report.
    #[arg(long)]
    label: Option<String>,
    /// Also write the JSON report to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

fn secs(v: f64, what: &str) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|e| format!("--{what}: {e}"))
}

fn config(a: &Args) -> Result<StormConfig, String> {
    if a.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    Ok(StormConfig {
        endpoint: Endpoint::from_uri(&a.uri).map_err(|e| format!("--uri: {e}"))?,
        clients: a.clients,
        heartbeat: a.heartbeat,
        queues: if a.queue_per_client {
            QueueMode::PerClient
        } else {
            QueueMode::Shared
        },
        queue: a.queue.clone(),
        storms: a.storms,
        lb_admin: a.lb_admin.clone(),
        lb_listener: a.lb_listener.clone(),
        broker_pid: a.broker_pid,
        lb_pid: a.lb_pid,
        settle: secs(a.settle, "settle")?,
        storm_timeout: secs(a.storm_timeout, "storm-timeout")?,
        ramp: a.ramp,
        label: a.label.clone(),
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-storm: {e}");
            return ExitCode::from(2);
        }
    };
    // One thread: the clients are idle but for the storm, and the other core stays with the
    // broker and the balancer.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("warren-storm: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let report = rt.block_on(storm::run(&cfg, |l| eprintln!("warren-storm: {l}")));
    eprint!("{}", report.text());
    match serde_json::to_string_pretty(&report) {
        Ok(json) => {
            println!("{json}");
            if let Some(p) = &args.json_out {
                if let Err(e) = std::fs::write(p, format!("{json}\n")) {
                    eprintln!("warren-storm: writing {}: {e}", p.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        Err(e) => {
            eprintln!("warren-storm: JSON report: {e}");
            return ExitCode::FAILURE;
        }
    }
    if report.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
