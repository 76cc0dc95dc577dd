//! warren-tcpbench: the load tool behind `bench/lb-bench.sh`.
//!
//! Each workload is a module with a `Config`, an async `run` and a report that renders as human
//! lines or as JSON. `main.rs` only parses the command line, builds the runtime and prints.

pub mod cps;
pub mod echo;
pub mod errors;
pub mod hist;
pub mod idle;
pub mod latency;

use std::time::Duration;

/// Nanoseconds as microseconds with two decimals, for human output.
pub fn fmt_us(ns: u64) -> String {
    format!("{:.1}us", ns as f64 / 1000.0)
}

/// Events per second over `elapsed` (0 for a zero interval).
pub fn per_sec(n: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 {
        n as f64 / s
    } else {
        0.0
    }
}

/// A request of `size` bytes: a recognisable pattern, not zeroes.
pub fn payload(size: usize) -> Vec<u8> {
    (0..size).map(|i| b'a' + (i % 26) as u8).collect()
}

/// One request/response on `stream`: write `req`, read exactly `req.len()` bytes back into `buf`
/// and check they are the echo of `req`. Each half is bounded by `timeout`.
pub async fn round_trip(
    stream: &mut tokio::net::TcpStream,
    req: &[u8],
    buf: &mut [u8],
    timeout: Duration,
) -> Result<(), (errors::Failure, String)> {
    use errors::Failure;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let buf = buf.get_mut(..req.len()).ok_or((
        Failure::Mismatch,
        "response buffer smaller than request".to_string(),
    ))?;
    match tokio::time::timeout(timeout, stream.write_all(req)).await {
        Err(_) => return Err((Failure::Timeout, "write timed out".to_string())),
        Ok(Err(e)) => return Err((Failure::of_io(&e), format!("write: {e}"))),
        Ok(Ok(())) => {}
    }
    match tokio::time::timeout(timeout, stream.read_exact(buf)).await {
        Err(_) => return Err((Failure::Timeout, "read timed out".to_string())),
        Ok(Err(e)) => return Err((Failure::of_io(&e), format!("read: {e}"))),
        Ok(Ok(_)) => {}
    }
    if buf != req {
        return Err((
            Failure::Mismatch,
            "response differs from request".to_string(),
        ));
    }
    Ok(())
}

/// Connect to `target` within `timeout`, with TCP_NODELAY set (small request/response traffic).
pub async fn connect(
    target: std::net::SocketAddr,
    timeout: Duration,
) -> Result<tokio::net::TcpStream, (errors::Failure, String)> {
    use errors::Failure;
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await {
        Err(_) => Err((Failure::Timeout, "connect timed out".to_string())),
        Ok(Err(e)) => Err((Failure::Connect, format!("connect: {e}"))),
        Ok(Ok(s)) => {
            // best effort: a failure here only affects latency, never correctness
            let _ = s.set_nodelay(true);
            Ok(s)
        }
    }
}
