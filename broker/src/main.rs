//! warren-broker binary: parse flags, load config, start logging, bind, run.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;
use warren_broker::config::{Config, DiskFreeLimit, MemoryWatermark, ServerIdentity};
use warren_broker::proxy_protocol::Cidr;
use warren_broker::Broker;

/// jemalloc rather than the system allocator: with its background thread (started in `main`)
/// the memory of a drained or deleted backlog goes back to the system after its decay time
/// (glibc's malloc kept the RSS of a deleted queue at its peak). See docs/benchmarks.md.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Lightweight AMQP 0-9-1 broker, wire compatible with RabbitMQ clients.
#[derive(Debug, Parser)]
#[command(name = "warren-broker", version)]
struct Cli {
    /// TOML config file; keys have the same names as these flags.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Validate the config and exit.
    #[arg(long)]
    check_config: bool,
    /// Node name.
    #[arg(long)]
    node_name: Option<String>,
    /// AMQP listener (repeatable; default 127.0.0.1:5672 and [::1]:5672; port 0 allowed).
    #[arg(long)]
    amqp: Vec<SocketAddr>,
    /// AMQPS listener (repeatable; needs --tls-cert and --tls-key).
    #[arg(long)]
    amqps: Vec<SocketAddr>,
    /// PEM certificate chain for AMQPS.
    #[arg(long)]
    tls_cert: Option<PathBuf>,
    /// PEM private key for AMQPS.
    #[arg(long)]
    tls_key: Option<PathBuf>,
    /// Data directory: message store, definitions, page files (default ./data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Management HTTP API and UI listener (repeatable; none by default), e.g. 127.0.0.1:15672.
    #[arg(long)]
    mgmt: Vec<SocketAddr>,
    /// Prometheus /metrics listener (repeatable; none by default), e.g. 127.0.0.1:15692.
    #[arg(long)]
    prometheus: Vec<SocketAddr>,
    /// Inter-node listener, e.g. 127.0.0.1:25672 (repeatable; port 0 allowed): the node is a
    /// cluster member. Needs --cluster-secret-file.
    #[arg(long)]
    cluster_listen: Vec<SocketAddr>,
    /// Node to join: NAME@HOST:PORT, HOST:PORT, or a DNS name resolving to several peers
    /// (repeatable; port 25672 when none is given). Without it a new node starts a cluster of
    /// its own, and a restarted one rejoins the cluster in its data directory.
    #[arg(long, value_name = "NODE")]
    join: Vec<String>,
    /// File with the secret shared by every node of the cluster (the Erlang cookie's role;
    /// never sent on the wire).
    #[arg(long, value_name = "FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Run as a witness: a cluster voter that holds no queues and serves no clients, so that a
    /// two-node cluster keeps a majority when either node dies.
    #[arg(long)]
    witness: bool,
    /// What a node cut off from the others does: ignore (keep serving, RabbitMQ's default) or
    /// pause_minority (stop serving without a majority of the voters).
    #[arg(long, value_name = "ignore|pause_minority")]
    cluster_partition_handling: Option<warren_broker::cluster::settings::PartitionHandling>,
    /// TLS on inter-node links: this node's PEM certificate chain (with --cluster-tls-key and
    /// --cluster-tls-ca).
    #[arg(long, value_name = "FILE")]
    cluster_tls_cert: Option<PathBuf>,
    /// PEM private key of --cluster-tls-cert.
    #[arg(long, value_name = "FILE")]
    cluster_tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) the peers' certificates are checked against.
    #[arg(long, value_name = "FILE")]
    cluster_tls_ca: Option<PathBuf>,
    /// A peer silent for this long counts as down, milliseconds (default 3000; the other
    /// cluster clocks follow from it).
    #[arg(long, value_name = "MS")]
    cluster_failure_detection_ms: Option<u64>,
    /// Log filter (RUST_LOG syntax); RUST_LOG wins when set. The Raft library's own log
    /// (openraft) is off unless the filter names it.
    #[arg(long)]
    log: Option<String>,
    /// Memory alarm threshold: fraction of total memory (0.4) or a size ("200MiB", "1GB").
    #[arg(long, value_name = "FRACTION|SIZE")]
    vm_memory_high_watermark: Option<MemoryWatermark>,
    /// Queues page messages to disk above this fraction of the memory watermark.
    #[arg(long, value_name = "RATIO")]
    vm_memory_high_watermark_paging_ratio: Option<f64>,
    /// Disk alarm threshold on the data directory: a size ("50MB") or "mem_relative:1.0".
    #[arg(long, value_name = "SIZE")]
    disk_free_limit: Option<DiskFreeLimit>,
    /// Start even if entries of <data-dir>/definitions.json cannot be loaded: each bad entry
    /// (and what depends on it) is reported and left out, the file is kept as
    /// definitions.json.rejected-<time>, the rest is loaded. Without it such a file stops the
    /// start, naming the entry.
    #[arg(long)]
    skip_invalid_definitions: bool,
    /// Expect a PROXY protocol v1/v2 header (from a load balancer) on every AMQP, AMQPS and
    /// management connection; its client address is used for the guest loopback rule, connection
    /// names and the API. Connections from sources not in --proxy-protocol-from are refused.
    #[arg(long)]
    proxy_protocol: bool,
    /// Load balancer address allowed to send the PROXY header: a CIDR range or a bare IP
    /// (repeatable; default 127.0.0.0/8 and ::1).
    #[arg(long, value_name = "CIDR")]
    proxy_protocol_from: Vec<Cidr>,
    /// Largest management API request body (default 20MiB, as RabbitMQ); bodies being read at
    /// once share a budget of 4 times this.
    #[arg(long, value_name = "SIZE", value_parser = parse_size_arg)]
    mgmt_max_body_size: Option<u64>,
    /// After this many failed logins (AMQP or HTTP) from one address within 60 s, refuse that
    /// address for 60 s without checking passwords (default 0 = off, as RabbitMQ).
    #[arg(long, value_name = "N")]
    auth_failure_limit: Option<u32>,
    /// What the broker tells clients it is (connection.start's product, version and platform;
    /// the management API's product_name and product_version): "warren" (default) or
    /// "rabbitmq" (RabbitMQ 3.10.8 on Erlang/OTP 25.2.3, for clients and tools that check).
    #[arg(long, value_name = "warren|rabbitmq")]
    server_identity: Option<ServerIdentity>,
}

/// A size flag: bytes, or a number with a unit ("20MiB").
fn parse_size_arg(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
        return t.parse().map_err(|e| format!("{e}"));
    }
    warren_broker::config::parse_size(t)
}

fn merge(cli: Cli, mut cfg: Config) -> Config {
    if let Some(v) = cli.node_name {
        cfg.node_name = v;
    }
    if !cli.amqp.is_empty() {
        cfg.amqp = cli.amqp;
    }
    if !cli.amqps.is_empty() {
        cfg.amqps = cli.amqps;
    }
    if cli.tls_cert.is_some() {
        cfg.tls_cert = cli.tls_cert;
    }
    if cli.tls_key.is_some() {
        cfg.tls_key = cli.tls_key;
    }
    if let Some(v) = cli.data_dir {
        cfg.data_dir = v;
    }
    if !cli.mgmt.is_empty() {
        cfg.mgmt = cli.mgmt;
    }
    if !cli.prometheus.is_empty() {
        cfg.prometheus = cli.prometheus;
    }
    if !cli.cluster_listen.is_empty() {
        cfg.cluster_listen = cli.cluster_listen;
    }
    if !cli.join.is_empty() {
        cfg.join = cli.join;
    }
    if cli.cluster_secret_file.is_some() {
        cfg.cluster_secret_file = cli.cluster_secret_file;
    }
    if cli.witness {
        cfg.witness = true;
    }
    if let Some(v) = cli.cluster_partition_handling {
        cfg.cluster_partition_handling = v;
    }
    if cli.cluster_tls_cert.is_some() {
        cfg.cluster_tls_cert = cli.cluster_tls_cert;
    }
    if cli.cluster_tls_key.is_some() {
        cfg.cluster_tls_key = cli.cluster_tls_key;
    }
    if cli.cluster_tls_ca.is_some() {
        cfg.cluster_tls_ca = cli.cluster_tls_ca;
    }
    if let Some(v) = cli.cluster_failure_detection_ms {
        cfg.cluster_failure_detection_ms = v;
    }
    if cli.log.is_some() {
        cfg.log = cli.log;
    }
    if let Some(v) = cli.vm_memory_high_watermark {
        cfg.vm_memory_high_watermark = v;
    }
    if let Some(v) = cli.vm_memory_high_watermark_paging_ratio {
        cfg.vm_memory_high_watermark_paging_ratio = v;
    }
    if let Some(v) = cli.disk_free_limit {
        cfg.disk_free_limit = v;
    }
    if cli.skip_invalid_definitions {
        cfg.skip_invalid_definitions = true;
    }
    if cli.proxy_protocol {
        cfg.proxy_protocol = true;
    }
    if !cli.proxy_protocol_from.is_empty() {
        cfg.proxy_protocol_from = cli.proxy_protocol_from;
    }
    if let Some(v) = cli.mgmt_max_body_size {
        cfg.mgmt_max_body_size = v;
    }
    if let Some(v) = cli.auth_failure_limit {
        cfg.auth_failure_limit = v;
    }
    if let Some(v) = cli.server_identity {
        cfg.server_identity = v;
    }
    cfg
}

fn main() -> std::process::ExitCode {
    // A background thread purges freed pages after their decay time even when the broker is
    // idle (without it, only allocation activity does).
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        eprintln!("warren-broker: cannot start the allocator's background thread: {e}");
    }
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line per cause, without a backtrace: this is an operator's message.
            eprintln!("warren-broker: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let check = cli.check_config;
    let base = match &cli.config {
        Some(p) => Config::from_file(p).with_context(|| format!("loading {}", p.display()))?,
        None => Config::default(),
    };
    let cfg = merge(cli, base);
    cfg.validate().context("invalid configuration")?;
    if check {
        println!("config ok");
        return Ok(());
    }
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| cfg.log.clone())
        .unwrap_or_else(|| "info".into());
    // openraft logs every failed call to a peer that is down (10 a second, at error level);
    // warren_cluster reports links, quorum and membership. Named in the filter, it shows.
    let filter = if filter.contains("openraft") {
        filter
    } else {
        format!("{filter},openraft=off")
    };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting runtime")?;
    rt.block_on(async move {
        // Before binding: a SIGTERM sent as soon as a listener is logged must stop cleanly.
        let token = CancellationToken::new();
        warren_broker::shutdown::install(token.clone()).context("handling signals")?;
        let bound = Broker::bind(cfg).await.context("starting broker")?;
        bound.run(token).await;
        anyhow::Ok(())
    })
}
