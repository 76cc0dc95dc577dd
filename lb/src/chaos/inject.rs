//! The I/O side of the chaos engine: the listener-wide `every` ticker, the close styles, and the
//! events and metrics of injected faults. Decisions come from `plan`; this file only acts on them.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use rand_chacha::ChaCha8Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::time::Instant;

use super::plan::{self, Applied, CloseCmd};
use crate::config::{CloseStyle, FaultKind, Side};
use crate::events::Event;
use crate::listener::state::ListenerState;
use crate::metrics as m;
use crate::proxy;
use crate::stream::TcpBacked;

/// Counts one injected fault in `warren_lb_faults_total{listener,rule,kind}`.
pub fn count_fault(listener: &str, rule: &str, kind: FaultKind) {
    metrics::counter!(m::FAULTS_TOTAL, m::L_LISTENER => listener.to_string(),
        m::L_RULE => rule.to_string(), m::L_KIND => plan::kind_str(kind))
    .increment(1);
}

/// Events and metrics for shaping rules that start to apply to connection `conn`.
pub fn announce(ls: &ListenerState, conn: u64, backend: &str, applied: Vec<Applied>) {
    for a in applied {
        count_fault(&ls.name, &a.rule, a.kind);
        let mut ev = Event::new(&ls.name, plan::kind_str(a.kind))
            .conn(conn)
            .backend(backend)
            .cause("applied");
        ev.rule = Some(a.rule);
        ls.events().emit(ev);
    }
}

/// The event (and metric) of a close that starts: `lost` is (upstream, downstream) discarded.
pub fn close_event(ls: &ListenerState, conn: u64, backend: &str, cmd: &CloseCmd, lost: (u64, u64)) {
    if let Some(kind) = cmd.kind {
        count_fault(&ls.name, cmd.rule.as_deref().unwrap_or("admin"), kind);
    }
    let mut ev = Event::new(&ls.name, cmd.event)
        .conn(conn)
        .backend(backend)
        .cause(cmd.cause.clone());
    ev.rule = cmd.rule.clone();
    ev.style = Some(cmd.style.as_str().to_string());
    ev.side = Some(cmd.side.as_str().to_string());
    ev.discarded_upstream = lost.0;
    ev.discarded_downstream = lost.1;
    ls.events().emit(ev);
}

/// Closes a connection in the command's style. `rst` and `fin` end both sides (`side` picks who
/// gets the style; the other side is closed orderly); `half` closes only `side` and holds the other
/// open until its peer goes or `stop` fires; `drop` forwards nothing and holds both. `stop` yields
/// the style of a second order, if one ended the hold (`rst` then resets what is held).
pub async fn close<C, B>(
    mut client: C,
    mut backend: B,
    cmd: &CloseCmd,
    stop: impl Future<Output = Option<CloseStyle>>,
) where
    C: AsyncRead + AsyncWrite + TcpBacked + Unpin,
    B: AsyncRead + AsyncWrite + TcpBacked + Unpin,
{
    match (cmd.style, cmd.side) {
        (CloseStyle::Rst, Side::Both) => proxy::close_both(&mut client, &mut backend, true).await,
        (CloseStyle::Rst, Side::Client) => {
            client.set_rst_on_close();
            drop(client);
            proxy::close_one(&mut backend).await;
        }
        (CloseStyle::Rst, Side::Backend) => {
            backend.set_rst_on_close();
            drop(backend);
            proxy::close_one(&mut client).await;
        }
        (CloseStyle::Fin, _) | (CloseStyle::Half, Side::Both) => {
            proxy::close_both(&mut client, &mut backend, false).await
        }
        (CloseStyle::Half, Side::Client) => {
            proxy::close_one(&mut client).await;
            drop(client);
            tokio::select! {
                _ = drain(&mut backend) => {}
                s = stop => if s == Some(CloseStyle::Rst) {
                    backend.set_rst_on_close();
                },
            }
        }
        (CloseStyle::Half, Side::Backend) => {
            proxy::close_one(&mut backend).await;
            drop(backend);
            tokio::select! {
                _ = drain(&mut client) => {}
                s = stop => if s == Some(CloseStyle::Rst) {
                    client.set_rst_on_close();
                },
            }
        }
        (CloseStyle::Drop, _) => {
            let (a, b) = tokio::select! {
                r = proxy::hold(&mut client, &mut backend) => r,
                s = stop => {
                    if s == Some(CloseStyle::Rst) {
                        client.set_rst_on_close();
                        backend.set_rst_on_close();
                    }
                    (0, 0)
                }
            };
            tracing::debug!(
                discarded_upstream = a,
                discarded_downstream = b,
                "held connection ended"
            );
        }
    }
}

/// Reads and discards until EOF or error (a half-closed connection's remaining side).
async fn drain<S: AsyncRead + Unpin>(s: &mut S) {
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Resets connections on the listener's `every` rules (the ELB periodic reset). Rules are
/// re-read whenever they change; a rule's first tick is one period (+ jitter) after it appears.
/// Each connection decides with its own plan whether the rule applies to it (toxicity).
pub(crate) async fn every_ticker(ls: Arc<ListenerState>) {
    let seed = ls.seed();
    let stopping = ls.stopping();
    let mut next: HashMap<String, (Instant, ChaCha8Rng)> = HashMap::new();
    loop {
        let snap = ls.snapshot();
        let now = Instant::now();
        let rules: Vec<_> = snap
            .cfg
            .faults
            .iter()
            .filter(|r| r.enabled && r.kind == FaultKind::Reset && r.every.is_some())
            .cloned()
            .collect();
        next.retain(|name, _| rules.iter().any(|r| &r.name == name));
        for r in &rules {
            if !next.contains_key(&r.name) {
                let mut rng = plan::rng_for(seed, &ls.name, &r.name, "every", 0);
                if let Some(at) = plan::next_every(r, now, &mut rng) {
                    next.insert(r.name.clone(), (at, rng));
                }
            }
        }
        let soonest = next.values().map(|(at, _)| *at).min();
        tokio::select! {
            _ = stopping.cancelled() => return,
            _ = ls.rules_changed.notified() => continue,
            _ = sleep_until_opt(soonest) => {}
        }
        let now = Instant::now();
        for r in &rules {
            let Some((at, rng)) = next.get_mut(&r.name) else {
                continue;
            };
            if *at > now {
                continue;
            }
            if let Some(n) = plan::next_every(r, now, rng) {
                *at = n;
            }
            let mut cmd = CloseCmd::plain(r.style.unwrap_or(CloseStyle::Rst), "reset", "every");
            cmd.side = r.side.unwrap_or(Side::Both);
            cmd.rule = Some(r.name.clone());
            cmd.kind = Some(FaultKind::Reset);
            cmd.in_flight = r.in_flight.unwrap_or_default();
            for c in ls.connections() {
                c.close(cmd.clone());
            }
        }
    }
}

pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
