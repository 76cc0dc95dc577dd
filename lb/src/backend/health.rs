//! Health checks: tcp (connect succeeds), http (GET path -> 2xx), amqp (protocol header ->
//! connection.start), with ELB thresholds.
//!
//! [`HealthState`] is the pure threshold machine; [`run`] is the per-backend task that checks every
//! `interval`, reading the listener's current health settings each time so a reload applies at the
//! next check. A backend starts healthy (see `pool.rs`).

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::Backend;
use crate::config::{HealthCheck, ProxyProtocol};
use crate::events::Event;
use crate::listener::state::ListenerState;
use crate::proxy_protocol;

/// The AMQP 0-9-1 protocol header.
pub const AMQP_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Consecutive-result thresholds, ELB style.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    pub healthy: bool,
    ok_streak: u32,
    fail_streak: u32,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            healthy: true,
            ok_streak: 0,
            fail_streak: 0,
        }
    }
}

impl HealthState {
    /// Records one check result; returns `Some(new_health)` on a transition.
    pub fn record(
        &mut self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        if ok {
            self.fail_streak = 0;
            self.ok_streak = self.ok_streak.saturating_add(1);
            if !self.healthy && self.ok_streak >= healthy_threshold {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.ok_streak = 0;
            self.fail_streak = self.fail_streak.saturating_add(1);
            if self.healthy && self.fail_streak >= unhealthy_threshold {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("http status {0}")]
    Status(u16),
    #[error("unexpected reply: {0}")]
    Reply(&'static str),
}

/// Parses an HTTP/1.x status line prefix; `None` = need more bytes.
pub fn parse_status(buf: &[u8]) -> Option<Result<u16, CheckError>> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    let line = &buf[..end];
    let mut parts = line.split(|&b| b == b' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with(b"HTTP/1.") {
        return Some(Err(CheckError::Reply("not an HTTP/1 status line")));
    }
    let code = parts
        .next()
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<u16>().ok());
    Some(code.ok_or(CheckError::Reply("bad status code")))
}

/// Checks that `buf` starts with a connection.start method frame (type 1, channel 0, class 10,
/// method 10). `None` = need more bytes.
pub fn parse_connection_start(buf: &[u8]) -> Option<Result<(), CheckError>> {
    if buf.first().is_some_and(|&b| b == b'A') {
        // The server answered with its own protocol header: version mismatch.
        return Some(Err(CheckError::Reply("protocol header (version refused)")));
    }
    if buf.len() < 11 {
        return None;
    }
    if buf[0] != 1 {
        return Some(Err(CheckError::Reply("not a method frame")));
    }
    if buf[1..3] != [0, 0] {
        return Some(Err(CheckError::Reply("not channel 0")));
    }
    if buf[7..11] != [0, 10, 0, 10] {
        return Some(Err(CheckError::Reply("not connection.start")));
    }
    Some(Ok(()))
}

async fn read_until<S, T>(
    s: &mut S,
    parse: impl Fn(&[u8]) -> Option<Result<T, CheckError>>,
) -> Result<T, CheckError>
where
    S: AsyncRead + Unpin,
{
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(CheckError::Reply("closed before replying"));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(r) = parse(&buf) {
            return r;
        }
        if buf.len() > 4096 {
            return Err(CheckError::Reply("reply too long"));
        }
    }
}

async fn converse<S>(
    s: &mut S,
    check: HealthCheck,
    path: &str,
    auth: Option<&str>,
    host: &str,
) -> Result<(), CheckError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match check {
        HealthCheck::Tcp => Ok(()),
        HealthCheck::Http => {
            let auth = auth.map_or_else(String::new, |a| {
                use base64::Engine;
                let b = base64::engine::general_purpose::STANDARD.encode(a);
                format!("Authorization: Basic {b}\r\n")
            });
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: warren-lb\r\nAccept: */*\r\n{auth}Connection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await?;
            s.flush().await?;
            let code = read_until(s, parse_status).await?;
            if (200..300).contains(&code) {
                Ok(())
            } else {
                Err(CheckError::Status(code))
            }
        }
        HealthCheck::Amqp => {
            s.write_all(AMQP_HEADER).await?;
            s.flush().await?;
            read_until(s, parse_connection_start).await
        }
    }
}

/// One check of `backend` with the listener's current settings (bounded by the health timeout).
pub async fn check_once(ls: &ListenerState, backend: &Backend) -> Result<(), CheckError> {
    let snap = ls.snapshot();
    let h = &snap.cfg.health;
    let work = async {
        let mut tcp = backend.connect_tcp().await?;
        if h.check == HealthCheck::Tcp {
            return Ok(());
        }
        match snap.cfg.proxy_protocol {
            ProxyProtocol::Off => {}
            ProxyProtocol::V1 => tcp.write_all(&proxy_protocol::encode_v1_unknown()).await?,
            ProxyProtocol::V2 => tcp.write_all(&proxy_protocol::encode_v2_local()).await?,
        }
        match &snap.backend_tls {
            Some(tls) => {
                let name = tls.name_for(&backend.addr)?;
                let mut s = tls.connector.connect(name, tcp).await?;
                converse(&mut s, h.check, &h.path, h.auth.as_deref(), &backend.addr).await
            }
            None => converse(&mut tcp, h.check, &h.path, h.auth.as_deref(), &backend.addr).await,
        }
    };
    match tokio::time::timeout(h.timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(CheckError::Timeout),
    }
}

/// The per-backend checker task: runs until the backend leaves the pool or the process stops.
pub async fn run(ls: Arc<ListenerState>, backend: Arc<Backend>) {
    let mut state = HealthState::default();
    let stop = backend.health_stop.clone();
    let listener_stop = ls.stopping();
    loop {
        let interval = ls.snapshot().cfg.health.interval;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = listener_stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            _ = listener_stop.cancelled() => return,
            r = check_once(&ls, &backend) => r,
        };
        let ok = result.is_ok();
        if ok {
            backend.metrics.checks_ok.increment(1);
        } else {
            backend.metrics.checks_fail.increment(1);
        }
        let h = ls.snapshot().cfg.health.clone();
        if let Err(e) = &result {
            tracing::debug!(listener = %ls.name, backend = %backend.addr, error = %e, "health check failed");
        }
        if let Some(up) = state.record(ok, h.healthy_threshold, h.unhealthy_threshold) {
            backend.set_healthy(up);
            let mut ev = Event::new(&ls.name, if up { "backend_up" } else { "backend_down" })
                .backend(&backend.addr)
                .cause(format!("health check {}", h.check.as_str()));
            if let Err(e) = &result {
                ev = ev.cause(format!("health check {}: {e}", h.check.as_str()));
            }
            ls.events().emit(ev);
            if let Some(open) = ls.pool.update_fail_open() {
                if open {
                    tracing::warn!(listener = %ls.name, "every backend is unhealthy: failing open, routing to all of them");
                    ls.events()
                        .emit(Event::new(&ls.name, "fail_open").cause("all backends unhealthy"));
                } else {
                    tracing::info!(listener = %ls.name, "a backend is healthy again: fail open ended");
                    ls.events().emit(Event::new(&ls.name, "fail_open_ended"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds() {
        let mut s = HealthState::default();
        assert_eq!(s.record(false, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(false, 3, 2), None);
        assert_eq!(s.record(false, 3, 2), Some(false));
        assert_eq!(s.record(false, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(false, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), Some(true));
        assert!(s.healthy);
    }

    #[test]
    fn status_line() {
        assert!(parse_status(b"HTTP/1.1 200 OK").is_none());
        assert_eq!(
            parse_status(b"HTTP/1.1 204 No Content\r\n")
                .unwrap()
                .unwrap(),
            204
        );
        assert_eq!(parse_status(b"HTTP/1.0 503 x\r\n").unwrap().unwrap(), 503);
        assert!(parse_status(b"SSH-2.0\r\n").unwrap().is_err());
    }

    #[test]
    fn connection_start_frame() {
        let frame = [1u8, 0, 0, 0, 0, 0, 100, 0, 10, 0, 10, 0, 9];
        for cut in 0..11 {
            assert!(parse_connection_start(&frame[..cut]).is_none(), "cut {cut}");
        }
        assert!(parse_connection_start(&frame).unwrap().is_ok());
        let mut tune = frame;
        tune[10] = 30;
        assert!(parse_connection_start(&tune).unwrap().is_err());
        let mut ch1 = frame;
        ch1[2] = 1;
        assert!(parse_connection_start(&ch1).unwrap().is_err());
        assert!(parse_connection_start(b"AMQP\x00\x00\x09\x01")
            .unwrap()
            .is_err());
    }
}
