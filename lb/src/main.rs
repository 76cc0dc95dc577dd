//! warren-lb: parse the CLI, load the configuration, start logging, bind, run; map errors to exit
//! codes. Everything else lives in the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_lb::config::{parse_duration, Config};
use warren_lb::shutdown::{Signal, Signals};
use warren_lb::Lb;

/// ELB-equivalent TCP load balancer.
#[derive(Parser, Debug)]
#[command(name = "warren-lb", version)]
struct Cli {
    /// Configuration file (TOML); SIGHUP reloads it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Validate FILE (with --admin/--admin-token-file applied; backends resolved) and exit: 0 if
    /// valid, 1 with a message if not.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["config", "listen"])]
    check_config: Option<PathBuf>,
    /// Listen without a file on ADDR (repeat for more addresses, such as 127.0.0.1:5670 and
    /// [::1]:5670 for clients that resolve `localhost` to ::1 first). Each address is a listener
    /// of its own with the same settings and backends, named default, default-2, ... in order.
    #[arg(
        long,
        value_name = "ADDR",
        conflicts_with = "config",
        requires = "backend"
    )]
    listen: Vec<SocketAddr>,
    /// Backend `host:port` for --listen (repeat).
    #[arg(long, value_name = "HOST:PORT")]
    backend: Vec<String>,
    /// Idle timeout for --listen (default 60s).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// Reset every live connection of the --listen listeners every DUR (RST).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    reset_every: Option<Duration>,
    /// max_connections of each --listen listener (default 10000).
    #[arg(long, value_name = "N", requires = "listen")]
    max_connections: Option<usize>,
    /// Admin API address (overrides [admin] listen). Off loopback it needs a token.
    #[arg(long, value_name = "ADDR")]
    admin: Option<SocketAddr>,
    /// File holding the admin API token (overrides [admin] token_file); clients send
    /// `Authorization: Bearer <token>` or basic auth with the token as password.
    #[arg(long, value_name = "PATH")]
    admin_token_file: Option<PathBuf>,
    /// Worker threads (overrides [runtime] threads; default one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Never use splice(2); always copy through buffers (overrides [runtime] splice).
    #[arg(long)]
    no_splice: bool,
    /// Seed of the chaos RNG (overrides [chaos] seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Log filter (tracing EnvFilter syntax); default RUST_LOG or "info".
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
}

fn init_tracing(filter: Option<&str>) {
    use std::io::IsTerminal;
    let filter = match filter {
        Some(f) => tracing_subscriber::EnvFilter::new(f),
        None => tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A closed stderr must not panic the logging task (and with it signal handling).
        .log_internal_errors(false)
        .init();
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let (mut cfg, origin) = if let Some(path) = &cli.config {
        (Config::parse_file(path)?, path.display().to_string())
    } else if !cli.listen.is_empty() {
        // The admin API comes from apply_overrides, so that its token flag applies first.
        let mut cfg = Config::single_listener(
            &cli.listen,
            cli.backend.clone(),
            cli.idle_timeout,
            cli.reset_every,
            None,
        )?;
        if let Some(max) = cli.max_connections {
            for l in &mut cfg.listeners {
                l.max_connections = max;
            }
        }
        (cfg, "command line".to_string())
    } else {
        anyhow::bail!("nothing to do: give --config FILE, or --listen ADDR --backend HOST:PORT");
    };
    apply_overrides(cli, &mut cfg)?;
    cfg.check(&origin)?;
    Ok(cfg)
}

/// The CLI flags that override the file (also on every reload).
fn apply_overrides(cli: &Cli, cfg: &mut Config) -> anyhow::Result<()> {
    if let Some(a) = cli.admin {
        match &mut cfg.admin {
            Some(admin) => admin.listen = a,
            None => cfg.admin = Some(warren_lb::config::AdminConfig::new(a)),
        }
    }
    if let Some(path) = &cli.admin_token_file {
        match &mut cfg.admin {
            Some(admin) => admin.token_file = Some(path.clone()),
            None => anyhow::bail!(
                "--admin-token-file needs an admin API: give --admin ADDR or [admin] listen"
            ),
        }
    }
    if let Some(t) = cli.threads {
        cfg.runtime.threads = Some(t);
    }
    if cli.no_splice {
        cfg.runtime.splice = Some(false);
    }
    if let Some(s) = cli.seed {
        cfg.chaos.seed = Some(s);
    }
    Ok(())
}

/// `--check-config FILE`: the file with the admin flags applied, validated, token file read,
/// every backend resolved and none pointing at a configured address of warren-lb.
fn check_config(cli: &Cli, path: &std::path::Path) -> anyhow::Result<Config> {
    let mut cfg = Config::parse_file(path)?;
    apply_overrides(cli, &mut cfg)?;
    let origin = path.display().to_string();
    cfg.check(&origin)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(warren_lb::check_backends(&cfg))
        .with_context(|| origin.clone())?;
    Ok(cfg)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match check_config(&cli, path) {
            Ok(cfg) => {
                use std::io::Write;
                let _ = writeln!(
                    std::io::stdout(),
                    "{}: ok ({} listener{})",
                    path.display(),
                    cfg.listeners.len(),
                    if cfg.listeners.len() == 1 { "" } else { "s" }
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                say(&format!("error: {}", chain(&e)));
                ExitCode::FAILURE
            }
        };
    }
    init_tracing(cli.log.as_deref());
    let cfg = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            say(&format!("error: {}", chain(&e)));
            return ExitCode::from(2);
        }
    };
    match run(cli, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{}", chain(&e));
            // A configuration refused at bind (a backend that does not resolve or points at
            // warren-lb itself) is a configuration error like the others.
            match e.downcast_ref::<warren_lb::LbError>() {
                Some(lb) if lb.is_config() => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The error and its causes, `: `-separated, leaving out a cause whose text an outer message
/// already contains (the config errors embed their source).
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Writes a line to stderr, ignoring a closed stderr (`eprintln!` would panic).
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn run(cli: Cli, cfg: Config) -> anyhow::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = cfg.runtime.threads {
        builder.worker_threads(t.max(1));
    }
    let rt = builder
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(async move {
        // Before binding: a SIGTERM sent as soon as a listener logs it is up must drain.
        let signals = Signals::register().context("cannot handle signals")?;
        let bound = Lb::bind(cfg).await?;
        let handle = bound.handle();
        let shutdown = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        let sig = tokio::spawn(signals.watch(shutdown.clone(), tx));
        let path = cli.config.clone();
        tokio::spawn(async move {
            while let Some(Signal::Reload) = rx.recv().await {
                let Some(path) = &path else {
                    tracing::warn!("SIGHUP ignored: no --config file to reload");
                    continue;
                };
                let loaded = Config::parse_file(path).map_err(anyhow::Error::from).and_then(|mut cfg| {
                    apply_overrides(&cli, &mut cfg)?;
                    cfg.check(&path.display().to_string())?;
                    Ok(cfg)
                });
                let result = match loaded {
                    Ok(cfg) => handle.reload(cfg).await.map_err(anyhow::Error::from),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::error!(error = %chain(&e), "reload failed; keeping the running configuration");
                }
            }
        });
        bound.run(shutdown).await;
        sig.abort();
        Ok(())
    })
}
