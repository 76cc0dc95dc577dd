//! A tiny cluster node process for the process-level tests (kill -9, restart from the data dir).
//!
//! It prints `LISTEN <addr>` once started, then serves one command per stdin line:
//! `put KEY JSON` → `OK <index>` | `ERR <why>`; `get KEY` → `VAL <json>` | `NONE`;
//! `voters` → `VOTERS <n>`; `quit` → shuts down and exits.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use warren_cluster::{Cluster, ClusterConfig, Op, Timing};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    name: String,
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long)]
    join: Vec<String>,
    #[arg(long, default_value = "cookie")]
    secret: String,
    /// Short timing (tests).
    #[arg(long)]
    fast: bool,
    #[arg(long)]
    witness: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut cfg = ClusterConfig::new(&args.name, &args.data_dir, args.secret.as_bytes());
    cfg.listen = vec![args.listen];
    cfg.join = args.join;
    cfg.witness = args.witness;
    if args.fast {
        cfg.timing = Timing::fast();
    }
    let cluster = Cluster::start(cfg)
        .await
        .context("starting the cluster node")?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("LISTEN {}\n", cluster.advertised_addr()).as_bytes())
        .await?;
    out.flush().await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let mut parts = line.splitn(3, ' ');
        let reply = match (parts.next(), parts.next(), parts.next()) {
            (Some("put"), Some(key), Some(value)) => {
                let value: serde_json::Value = serde_json::from_str(value)?;
                let op = Op::Put {
                    key: key.to_string(),
                    value,
                };
                match cluster.propose(vec![op]).await {
                    Ok(index) => format!("OK {index}"),
                    Err(e) => format!("ERR {e}"),
                }
            }
            (Some("get"), Some(key), None) => match cluster.state().borrow().get(key) {
                Some(v) => format!("VAL {}", v.value),
                None => "NONE".to_string(),
            },
            (Some("voters"), None, None) => {
                format!("VOTERS {}", cluster.state().borrow().voters().count())
            }
            (Some("quit"), None, None) => break,
            _ => format!("ERR unknown command {line:?}"),
        };
        out.write_all(reply.as_bytes()).await?;
        out.write_all(b"\n").await?;
        out.flush().await?;
    }
    cluster.shutdown().await;
    Ok(())
}
