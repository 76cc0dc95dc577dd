//! `warren-ctl`: rabbitmqctl's verbs, spoken to a node's management HTTP API.
//! Parsing, requests and output live in the `warren_ctl` library; this file only
//! wires them to the process (arguments, stdout/stderr, exit code).

use std::io::Write;
use std::process::ExitCode;

use warren_ctl::{self as ctl, args, exec, http::HttpApi, CtlError};

fn main() -> ExitCode {
    let code = match run() {
        Ok(()) => ctl::exit::OK,
        Err(e) => {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "Error: {}", e.message);
            if e.show_usage {
                let _ = writeln!(err, "\n{}", args::usage());
            }
            e.code
        }
    };
    ExitCode::from(u8::try_from(code).unwrap_or(70))
}

fn run() -> Result<(), CtlError> {
    let inv = args::parse(std::env::args().skip(1))?;
    let timeout = inv.timeout.unwrap_or(ctl::http::DEFAULT_TIMEOUT);
    let mut api = HttpApi::new(inv.target.clone(), &inv.user, &inv.password, timeout)
        .map_err(|e| CtlError::new(ctl::exit::SOFTWARE, format!("cannot start: {e}")))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    exec::run(&inv, &mut api, &mut out)?;
    out.flush()
        .map_err(|e| CtlError::new(ctl::exit::SOFTWARE, format!("cannot write output: {e}")))
}
