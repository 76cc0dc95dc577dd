//! warren-tcpbench command line: parse, build the runtime, run one workload, print its report.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use warren_tcpbench::{cps, echo, idle, latency};

#[derive(Parser)]
#[command(name = "warren-tcpbench", version, about)]
struct Cli {
    /// Runtime worker threads; 1 runs everything on the calling thread.
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
    /// Print one JSON object on stdout; human lines go to stderr.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

fn duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo backend; prints `listening addr=IP:PORT` once bound, exits after --lifetime.
    EchoServer {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Read buffer per active connection, bytes.
        #[arg(long, default_value_t = 16 * 1024)]
        buffer: usize,
        #[arg(long, default_value = "30m", value_parser = duration)]
        lifetime: Duration,
    },
    /// Short connections per second: connect, request, read the echo, close.
    Cps {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value = "10s", value_parser = duration)]
        duration: Duration,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "5s", value_parser = duration)]
        timeout: Duration,
    },
    /// Request/response latency on kept-alive connections, one request outstanding each.
    Latency {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value = "10s", value_parser = duration)]
        duration: Duration,
        #[arg(long, default_value = "1s", value_parser = duration)]
        warmup: Duration,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value = "5s", value_parser = duration)]
        timeout: Duration,
    },
    /// Open --count proxied connections (one round trip each), hold them, close them.
    Idle {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: usize,
        #[arg(long, default_value = "10s", value_parser = duration)]
        hold: Duration,
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Connections opened at the same time.
        #[arg(long, default_value_t = 128)]
        parallel: usize,
        #[arg(long, default_value = "5s", value_parser = duration)]
        timeout: Duration,
        /// Sample this process's VmRSS before, when established and after the hold.
        #[arg(long)]
        rss_pid: Option<u32>,
        /// Skip the round trip on every connection after the hold.
        #[arg(long)]
        no_check: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    }
    .context("building the tokio runtime")?;
    let json = cli.json;
    rt.block_on(run(cli.cmd, json))
}

/// One line on stdout or stderr, flushed; a closed pipe (`| head`) is not an error worth a panic.
fn line(to_stderr: bool, text: &str) {
    use std::io::Write;
    let _ = if to_stderr {
        writeln!(std::io::stderr().lock(), "{text}")
    } else {
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}").and_then(|()| out.flush())
    };
}

/// Human lines: stdout normally, stderr when stdout carries JSON.
fn say(json: bool, text: &str) {
    line(json, text);
}

fn emit(json: bool, human: String, value: serde_json::Value) {
    say(json, &human);
    if json {
        line(false, &value.to_string());
    }
}

async fn run(cmd: Cmd, json: bool) -> anyhow::Result<()> {
    match cmd {
        Cmd::EchoServer {
            listen,
            buffer,
            lifetime,
        } => {
            let listener = echo::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let addr = listener.local_addr().context("reading the bound address")?;
            // always on stdout, flushed, so a script can read it back
            line(false, &format!("listening addr={addr}"));
            let accepted = echo::serve(listener, echo::Config { buffer, lifetime }).await?;
            line(
                true,
                &format!("echo-server: lifetime over after {accepted} connections"),
            );
        }
        Cmd::Cps {
            target,
            duration,
            concurrency,
            size,
            timeout,
        } => {
            let r = cps::run(cps::Config {
                target,
                duration,
                concurrency,
                size,
                timeout,
            })
            .await;
            emit(json, r.human(), r.json());
        }
        Cmd::Latency {
            target,
            connections,
            duration,
            warmup,
            size,
            timeout,
        } => {
            let r = latency::run(latency::Config {
                target,
                connections,
                duration,
                warmup,
                size,
                timeout,
            })
            .await;
            emit(json, r.human(), r.json());
        }
        Cmd::Idle {
            target,
            count,
            hold,
            size,
            parallel,
            timeout,
            rss_pid,
            no_check,
        } => {
            let cfg = idle::Config {
                target,
                count,
                hold,
                size,
                parallel,
                timeout,
                rss_pid,
                check: !no_check,
            };
            let r = idle::run(cfg, &|line| say(json, line)).await;
            emit(json, r.human(), r.json());
        }
    }
    Ok(())
}
