//! warren-lb: parse the CLI, load the configuration, start logging, bind, run; map errors to exit
//! codes. Everything else lives in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio_util::sync::CancellationToken;
use warren_lb::cli::Cli;
use warren_lb::config::Config;
use warren_lb::shutdown::{Signal, Signals};
use warren_lb::{Lb, LbError};

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

/// `--check-config FILE`: the file with the flags applied, validated, token file read,
/// every backend resolved and none pointing at a configured address of warren-lb.
fn check_config(cli: &Cli, path: &std::path::Path) -> anyhow::Result<Config> {
    let mut cfg = Config::parse_file(path)?;
    cli.apply_overrides(&mut cfg)?;
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
    let cfg = match cli.load() {
        Ok(c) => c,
        Err(e) => {
            say(&format!("error: {}", chain(&e.into())));
            return ExitCode::from(2);
        }
    };
    match run(cli, cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line on stderr, also when logging is filtered off: what went wrong and where.
            say(&format!("error: {}", explain(&e)));
            // A configuration refused at bind (a backend that does not resolve or points at
            // warren-lb itself) is a configuration error like the others.
            match e.downcast_ref::<LbError>() {
                Some(lb) if lb.is_config() => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// The error of a run, with the remedy when an address is taken (the quick start's ports are
/// the first thing two warren-lbs, or a warren-lb and a broker, fight over).
fn explain(e: &anyhow::Error) -> String {
    match e.downcast_ref::<LbError>() {
        Some(LbError::Bind { name, addr, source })
            if source.kind() == std::io::ErrorKind::AddrInUse =>
        {
            let flag = if name == "admin" {
                "--admin"
            } else {
                "--listen"
            };
            format!(
                "cannot listen on {addr} for `{name}`: address already in use (another process \
                 listens there; stop it, or choose another address with {flag} ADDR)"
            )
        }
        _ => chain(e),
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
    let mut cfg = cfg;
    // Connection threads (see warren_lb::workers): this runtime is the first of them, and the
    // library starts the others.
    cfg.runtime.threads = Some(
        cfg.runtime
            .threads
            .unwrap_or_else(warren_lb::default_threads)
            .max(1),
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
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
                    cli.apply_overrides(&mut cfg)?;
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
