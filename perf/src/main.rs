//! `warren-perf`: parse the command line, run, print the summary; exit 1 on setup failure or when a
//! producer or consumer failed, 2 on bad arguments.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use warren_perf::{
    config::{Args, Config},
    ProgressTo,
};

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match Config::from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-perf: {e}");
            return ExitCode::from(2);
        }
    };
    match real_main(&args, &cfg) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("warren-perf: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args, cfg: &Config) -> anyhow::Result<bool> {
    // One thread (the default) runs every connection on the calling thread: no cross-thread
    // wake-ups, and the other core stays with the broker. More threads use tokio's scheduler.
    let mut rt = match args.threads {
        None | Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
    };
    let rt = rt.enable_all().build().context("tokio runtime")?;
    let progress = if args.json {
        ProgressTo::Stderr
    } else {
        ProgressTo::Stdout
    };
    let summary = rt.block_on(warren_perf::run(cfg, progress))?;
    let text = summary.text();
    let json = serde_json::to_string_pretty(&summary).context("JSON summary")?;
    if args.json {
        eprint!("{text}");
        println!("{json}");
    } else {
        print!("{text}");
    }
    if let (Some(path), Some(ids)) = (&args.ids_out, &summary.ids) {
        let text = serde_json::to_string(ids).context("ids")?;
        std::fs::write(path, format!("{text}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.json_out {
        std::fs::write(path, format!("{json}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(summary.errors.is_empty())
}
