//! Bidirectional copy with half-close, idle timeout and the close styles.
//!
//! [`Duplex`] is one future that drives both directions over `&mut` of both streams (no split,
//! no lock). Each direction reads into a 64 KiB buffer, writes it out, and on EOF shuts down the
//! write side of the other stream (half-close), so a client that shuts down its write side still
//! receives the whole response. The copy ends when both directions have seen EOF and propagated it,
//! on the first I/O error, or when no payload byte moved for `idle_timeout`.
//!
//! A direction between two plain TCP sockets whose last [`SPLICE_AFTER_BULK_READS`] reads each
//! carried at least [`BULK_READ`] bytes switches to splice(2) through a pipe (see `splice.rs`): bulk transfers
//! skip the copy through user space, while small exchanges keep the buffered path (4 syscalls per
//! round trip instead of 6) and never hold a pipe, however many bytes the connection carries.
//! After [`UNSPLICE_AFTER_SMALL`] small spliced chunks in a row the direction empties its pipe,
//! drops it and goes back to the buffered path.
//!
//! Fault rules (see `chaos`): the connection's [`ConnPlan`] is owned by the copy. A direction that
//! no byte-level rule touches runs exactly as without rules (and may splice); a direction with one
//! stays buffered and asks the plan after each read (cut, fire) and before each write (latency,
//! bandwidth, slicer pacing). When a byte trigger fires, the kept bytes are written first and the
//! copy ends with [`Ended::Fault`].
//!
//! The direction that finishes last skips its shutdown(2) on plain TCP: the copy ends right after
//! it, and closing the socket (whose receive side was read to EOF) sends the FIN.
//!
//! Invariants worth naming:
//! - only payload bytes reset the idle timer (TLS records, TCP keepalives and handshakes do not);
//! - a direction's buffer is released whenever it is empty and its reader has nothing to read,
//!   so an idle connection holds no copy buffer (up to a few released buffers are kept per thread
//!   for the next read, see `crate::spare`);
//! - byte metrics are added per read (per connection atomics) and flushed to the shared counters
//!   in batches, so the shared cache lines are not touched per read.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use metrics::Counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};

use crate::chaos::plan::{CloseCmd, ConnPlan, Flow, Gate};
use crate::spare;
use crate::splice::{self, Pipe, Step};
use crate::stream::TcpBacked;

/// Size of each direction's copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// A direction switches to splice(2) after this many consecutive bulk reads (plain TCP only):
/// small exchanges, however long the connection, keep the lower-latency buffered path (one read
/// + one write per message) and never hold a pipe.
pub const SPLICE_AFTER_BULK_READS: u32 = 3;
/// A read of at least this many bytes counts as a bulk read: a quarter of the copy buffer, as
/// senders that write in 16 KiB pieces (TLS-record-sized application writes) rarely fill 64 KiB
/// on a proxy that keeps up.
pub const BULK_READ: usize = BUF_SIZE / 4;
/// A spliced direction goes back to the buffered path after this many consecutive small chunks.
pub const UNSPLICE_AFTER_SMALL: u32 = 3;
/// A spliced chunk below this size counts as small.
pub const SMALL_CHUNK: usize = 4 * 1024;
/// Bytes a direction may hold while the plan delays their writing (latency, bandwidth, slicer):
/// beyond it, the proxy stops reading, and TCP flow control pushes back on the sender.
const HELD_WINDOW: usize = 1 << 20;
/// Splice chunks moved per poll before yielding to other tasks.
const SPLICE_ROUNDS: u32 = 16;
/// Shared byte counters are updated at least every this many bytes.
const METRIC_BATCH: u64 = 1 << 20;

/// Where an error came from: the client side (downstream), the backend side (upstream), or us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Upstream,
    Downstream,
    Internal,
}

impl ErrorSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Upstream => "upstream",
            ErrorSource::Downstream => "downstream",
            ErrorSource::Internal => "internal",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} {op}: {err}", source.as_str())]
pub struct ProxyError {
    pub source: ErrorSource,
    pub op: &'static str,
    #[source]
    pub err: io::Error,
}

/// Per-connection byte counts, readable by the admin API while the copy runs.
#[derive(Debug, Default)]
pub struct ConnBytes {
    /// client -> backend
    pub upstream: AtomicU64,
    /// backend -> client
    pub downstream: AtomicU64,
}

/// The listener's shared byte counters.
#[derive(Clone)]
pub struct ByteMetrics {
    pub upstream: Counter,
    pub downstream: Counter,
}

/// How the copy ended.
#[derive(Debug)]
pub enum Ended {
    /// Both directions saw EOF and propagated it.
    Done,
    /// No payload for `idle_timeout`.
    Idle,
    /// An I/O error; the other side should see a reset.
    Error(ProxyError),
    /// A byte-level fault rule fired (its kept bytes are written).
    Fault(CloseCmd),
}

#[derive(Default)]
struct Dir {
    buf: BytesMut,
    read_eof: bool,
    shut: bool,
    need_flush: bool,
    unreported: u64,
    /// Consecutive bulk reads (decides the switch to splice).
    bulk_reads: u32,
    /// Consecutive small spliced chunks (decides the switch back to the buffered path).
    small_chunks: u32,
    /// Present once the direction forwards with splice(2).
    pipe: Option<Pipe>,
    /// Creating a pipe failed (e.g. out of descriptors): stay buffered.
    no_splice: bool,
    /// The spliced direction carries small chunks again: empty the pipe and go buffered.
    unsplice: bool,
    /// Bytes read and then discarded by a fault cut.
    discarded: u64,
    /// A fault to fire once the buffer is written.
    fire: Option<CloseCmd>,
    /// The fault, written out: the copy ends.
    fired: Option<CloseCmd>,
    /// When EOF was read (slow_close).
    eof_at: Option<Instant>,
}

impl Dir {
    /// Switches to splice when allowed, big enough, and at a clean point (nothing buffered).
    fn maybe_splice(&mut self) {
        if self.pipe.is_some()
            || self.no_splice
            || self.bulk_reads < SPLICE_AFTER_BULK_READS
            || !self.buf.is_empty()
            || self.read_eof
            || self.shut
            || self.need_flush
        {
            return;
        }
        match Pipe::new() {
            Ok(p) => {
                self.buf = BytesMut::new();
                self.pipe = Some(p);
                self.small_chunks = 0;
            }
            Err(e) => {
                tracing::debug!(error = %e, "no pipe for splice; staying buffered");
                self.no_splice = true;
            }
        }
    }

    fn pending(&self) -> u64 {
        self.buf.len() as u64 + self.pipe.as_ref().map_or(0, |p| p.pending as u64)
    }
}

/// Drives both directions; see the module doc.
pub struct Duplex<'a, C, B> {
    client: &'a mut C,
    backend: &'a mut B,
    up: Dir,
    down: Dir,
    idle: Pin<Box<Sleep>>,
    idle_timeout: Duration,
    last_payload: Instant,
    bytes: &'a ConnBytes,
    metrics: &'a ByteMetrics,
    /// Both sides are plain TCP and nothing needs to see the bytes.
    splice: bool,
    chaos: ConnPlan,
    /// Wakes a direction held back by the plan (latency, pacing, slow close).
    gate: Pin<Box<Sleep>>,
    gate_armed: Option<Instant>,
}

// === impl Duplex ===

impl<'a, C, B> Duplex<'a, C, B>
where
    C: AsyncRead + AsyncWrite + TcpBacked + Unpin,
    B: AsyncRead + AsyncWrite + TcpBacked + Unpin,
{
    /// `allow_splice`: the caller needs no byte-level view of the stream (splice is then used for
    /// bulk directions when both sides are plain TCP).
    pub fn new(
        client: &'a mut C,
        backend: &'a mut B,
        idle_timeout: Duration,
        bytes: &'a ConnBytes,
        metrics: &'a ByteMetrics,
        allow_splice: bool,
        chaos: ConnPlan,
    ) -> Self {
        let now = Instant::now();
        let splice = allow_splice && client.plain_tcp().is_some() && backend.plain_tcp().is_some();
        Self {
            splice,
            client,
            backend,
            up: Dir::default(),
            down: Dir::default(),
            idle: Box::pin(tokio::time::sleep_until(now + idle_timeout)),
            idle_timeout,
            last_payload: now,
            bytes,
            metrics,
            chaos,
            gate: Box::pin(tokio::time::sleep_until(now)),
            gate_armed: None,
        }
    }

    /// Bytes read but not yet written, plus those discarded by a fault cut:
    /// (client->backend, backend->client).
    pub fn in_flight(&self) -> (u64, u64) {
        (
            self.up.pending() + self.up.discarded,
            self.down.pending() + self.down.discarded,
        )
    }

    pub fn chaos(&self) -> &ConnPlan {
        &self.chaos
    }

    /// The plan, to update its rules or fire its timers; the copy sees the change at its next poll.
    pub fn chaos_mut(&mut self) -> &mut ConnPlan {
        &mut self.chaos
    }

    /// Writes what is buffered in both directions (the `in_flight = flush` close), ignoring
    /// pacing rules. Errors end the flush: the connection is closing anyway.
    pub async fn flush_in_flight(&mut self) {
        std::future::poll_fn(|cx| {
            let up = flush_dir(cx, &mut self.up, &mut *self.client, &mut *self.backend);
            let down = flush_dir(cx, &mut self.down, &mut *self.backend, &mut *self.client);
            if up.is_ready() && down.is_ready() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Changes the idle timeout of a live copy (takes effect at the next expiry check).
    pub fn set_idle_timeout(&mut self, d: Duration) {
        self.idle_timeout = d;
        let deadline = self.last_payload + d;
        self.idle.as_mut().reset(deadline);
    }

    fn flush_metrics(&mut self) {
        if self.up.unreported > 0 {
            self.metrics.upstream.increment(self.up.unreported);
            self.up.unreported = 0;
        }
        if self.down.unreported > 0 {
            self.metrics.downstream.increment(self.down.unreported);
            self.down.unreported = 0;
        }
    }
}

impl<C, B> Drop for Duplex<'_, C, B> {
    fn drop(&mut self) {
        if self.up.unreported > 0 {
            self.metrics.upstream.increment(self.up.unreported);
        }
        if self.down.unreported > 0 {
            self.metrics.downstream.increment(self.down.unreported);
        }
    }
}

/// Writes out a direction's buffer and pipe (the `flush` close); `Ready` when empty or failed.
fn flush_dir<R, W>(cx: &mut Context<'_>, d: &mut Dir, r: &mut R, w: &mut W) -> Poll<()>
where
    R: TcpBacked,
    W: AsyncWrite + TcpBacked + Unpin,
{
    let _ = r;
    if let Some(pipe) = d.pipe.as_mut() {
        let Some(tcp) = w.plain_tcp() else {
            return Poll::Ready(());
        };
        match splice::poll_flush(cx, pipe, tcp) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(_) => {}
        }
    }
    while !d.buf.is_empty() {
        match Pin::new(&mut *w).poll_write(cx, &d.buf) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(()),
            Poll::Ready(Ok(n)) => d.buf.advance(n),
            Poll::Pending => return Poll::Pending,
        }
    }
    match Pin::new(&mut *w).poll_flush(cx) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(_) => Poll::Ready(()),
    }
}

/// The fault plan as one direction sees it (absent when no byte-level rule touches it).
struct Hook<'p> {
    plan: &'p mut ConnPlan,
    flow: Flow,
    /// Earliest time the direction wants to be polled again.
    wake: &'p mut Option<Instant>,
}

impl Hook<'_> {
    fn wait_until(&mut self, at: Instant) {
        *self.wake = Some(self.wake.map_or(at, |w| w.min(at)));
    }
}

/// Moves bytes from `r` to `w` until it would block; `Ready(Ok)` once EOF has been propagated.
#[allow(clippy::too_many_arguments)] // one direction's whole context; a struct would only rename it
fn poll_dir<R, W>(
    cx: &mut Context<'_>,
    d: &mut Dir,
    r: &mut R,
    w: &mut W,
    counter: &AtomicU64,
    progressed: &mut bool,
    (rsrc, wsrc): (ErrorSource, ErrorSource),
    mut hook: Option<Hook<'_>>,
    fin_on_close: bool,
) -> Poll<Result<(), ProxyError>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let werr = |err| ProxyError {
        source: wsrc,
        op: "write",
        err,
    };
    loop {
        // Held back by the plan (latency, pacing): reading goes on up to a window.
        let mut held = false;
        while !d.buf.is_empty() {
            let mut allowed = d.buf.len();
            if let Some(h) = hook.as_mut() {
                match h.plan.gate(h.flow, Instant::now(), allowed) {
                    Gate::Go(n) => allowed = n.clamp(1, allowed),
                    Gate::Wait(at) => {
                        h.wait_until(at);
                        held = true;
                        break;
                    }
                }
            }
            match Pin::new(&mut *w).poll_write(cx, &d.buf[..allowed]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    d.buf.advance(n);
                    d.need_flush = true;
                    if let Some(h) = hook.as_mut() {
                        h.plan.wrote(h.flow, n, Instant::now());
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if held {
            if d.buf.len() >= HELD_WINDOW || d.fire.is_some() || d.read_eof {
                if d.need_flush {
                    if let Poll::Ready(Err(e)) = Pin::new(&mut *w).poll_flush(cx) {
                        return Poll::Ready(Err(werr(e)));
                    }
                }
                return Poll::Pending;
            }
        } else if d.fire.is_some() {
            // The bytes up to the trigger are written: make sure they left, then end the copy.
            match Pin::new(&mut *w).poll_flush(cx) {
                Poll::Ready(Ok(())) | Poll::Ready(Err(_)) => {
                    d.need_flush = false;
                    d.fired = d.fire.take();
                    return Poll::Ready(Ok(()));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        if d.shut && !held {
            return Poll::Ready(Ok(()));
        }
        if d.read_eof && !held {
            if let Some(h) = hook.as_mut() {
                if let (Some(delay), Some(eof_at)) = (h.plan.close_delay(h.flow), d.eof_at) {
                    let at = eof_at + delay;
                    if at > Instant::now() {
                        h.wait_until(at);
                        return Poll::Pending;
                    }
                }
            }
            if d.need_flush {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Ok(())) => d.need_flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
            if fin_on_close {
                // The other direction is done too: the copy ends now, and closing the plain TCP
                // socket sends the FIN (its receive side was read to EOF, so no RST).
                d.shut = true;
                d.buf = BytesMut::new();
                return Poll::Ready(Ok(()));
            }
            return match Pin::new(&mut *w).poll_shutdown(cx) {
                Poll::Ready(Ok(())) => {
                    d.shut = true;
                    d.buf = BytesMut::new();
                    Poll::Ready(Ok(()))
                }
                // The peer may already be gone; the half-close is then moot.
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::NotConnected => {
                    d.shut = true;
                    Poll::Ready(Ok(()))
                }
                Poll::Ready(Err(e)) => Poll::Ready(Err(werr(e))),
                Poll::Pending => Poll::Pending,
            };
        }
        if let Some(h) = hook.as_ref() {
            if h.plan.paused(h.flow) {
                // A `timeout` rule: read nothing (the serve loop re-polls when rules change).
                if d.buf.is_empty() {
                    d.buf = BytesMut::new();
                }
                return Poll::Pending;
            }
        }
        if d.buf.capacity() == 0 {
            d.buf = spare::take();
        }
        d.buf.reserve(BUF_SIZE);
        let before = d.buf.len();
        match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut d.buf) {
            Poll::Ready(Ok(0)) => {
                d.read_eof = true;
                d.eof_at = Some(Instant::now());
            }
            Poll::Ready(Ok(n)) => {
                *progressed = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                d.unreported += n as u64;
                if n >= BULK_READ {
                    d.bulk_reads = d.bulk_reads.saturating_add(1);
                } else {
                    d.bulk_reads = 0;
                }
                if let Some(h) = hook.as_mut() {
                    let v = h.plan.on_read(h.flow, &d.buf[before..], Instant::now());
                    if v.keep < n {
                        d.buf.truncate(before + v.keep);
                        d.discarded += (n - v.keep) as u64;
                    }
                    if v.fire.is_some() {
                        d.fire = v.fire;
                    }
                }
            }
            // A TLS peer that closes without close_notify: treat as EOF.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                d.read_eof = true;
                d.eof_at = Some(Instant::now());
            }
            Poll::Ready(Err(err)) => {
                return Poll::Ready(Err(ProxyError {
                    source: rsrc,
                    op: "read",
                    err,
                }))
            }
            Poll::Pending => {
                if d.need_flush {
                    match Pin::new(&mut *w).poll_flush(cx) {
                        Poll::Ready(Ok(())) => d.need_flush = false,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                        Poll::Pending => {}
                    }
                }
                // Idle: give the buffer back so idle connections hold no copy buffer.
                if d.buf.is_empty() {
                    spare::put(std::mem::take(&mut d.buf));
                }
                return Poll::Pending;
            }
        }
    }
}

/// The spliced form of [`poll_dir`]: socket -> pipe -> socket.
#[allow(clippy::too_many_arguments)] // as poll_dir
fn poll_dir_splice(
    cx: &mut Context<'_>,
    d: &mut Dir,
    r: &tokio::net::TcpStream,
    w: &tokio::net::TcpStream,
    counter: &AtomicU64,
    progressed: &mut bool,
    (rsrc, wsrc): (ErrorSource, ErrorSource),
    fin_on_close: bool,
) -> Poll<Result<(), ProxyError>> {
    let Some(pipe) = d.pipe.as_mut() else {
        return Poll::Ready(Err(ProxyError {
            source: ErrorSource::Internal,
            op: "splice",
            err: io::Error::other("no pipe"),
        }));
    };
    // try_io does not spend tokio's cooperative budget: yield after a bounded amount of work so
    // a bulk transfer cannot monopolise its worker thread.
    let mut rounds = 0;
    loop {
        match splice::poll_flush(cx, pipe, w) {
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(err)) => {
                return Poll::Ready(Err(ProxyError {
                    source: wsrc,
                    op: "write",
                    err,
                }))
            }
            Poll::Pending => return Poll::Pending,
        }
        if d.shut {
            return Poll::Ready(Ok(()));
        }
        if d.read_eof && fin_on_close {
            // See poll_dir: closing the socket sends the FIN.
            d.shut = true;
            return Poll::Ready(Ok(()));
        }
        if d.read_eof {
            match socket2::SockRef::from(w).shutdown(std::net::Shutdown::Write) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                Err(err) => {
                    return Poll::Ready(Err(ProxyError {
                        source: wsrc,
                        op: "shutdown",
                        err,
                    }))
                }
            }
            d.shut = true;
            return Poll::Ready(Ok(()));
        }
        match splice::poll_fill(cx, pipe, r) {
            Poll::Ready(Ok(Step::Read(n))) => {
                *progressed = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                d.unreported += n as u64;
                if n < SMALL_CHUNK {
                    d.small_chunks += 1;
                    if d.small_chunks >= UNSPLICE_AFTER_SMALL {
                        // Small messages again: back to the buffered path once the pipe is empty.
                        d.bulk_reads = 0;
                        d.unsplice = true;
                        cx.waker().wake_by_ref();
                        return Poll::Pending;
                    }
                } else {
                    d.small_chunks = 0;
                }
                rounds += 1;
                if rounds >= SPLICE_ROUNDS {
                    match splice::poll_flush(cx, pipe, w) {
                        Poll::Ready(Err(err)) => {
                            return Poll::Ready(Err(ProxyError {
                                source: wsrc,
                                op: "write",
                                err,
                            }))
                        }
                        Poll::Ready(Ok(())) => cx.waker().wake_by_ref(),
                        Poll::Pending => {}
                    }
                    return Poll::Pending;
                }
            }
            Poll::Ready(Ok(Step::Eof)) => d.read_eof = true,
            Poll::Ready(Err(err)) => {
                return Poll::Ready(Err(ProxyError {
                    source: rsrc,
                    op: "read",
                    err,
                }))
            }
            Poll::Pending => return Poll::Pending,
        }
    }
}

impl<C, B> Future for Duplex<'_, C, B>
where
    C: AsyncRead + AsyncWrite + TcpBacked + Unpin,
    B: AsyncRead + AsyncWrite + TcpBacked + Unpin,
{
    type Output = Ended;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Ended> {
        let this = self.get_mut();
        let mut progressed = false;
        let mut wake: Option<Instant> = None;
        let byte_up = this.chaos.byte_level(Flow::Up);
        let byte_down = this.chaos.byte_level(Flow::Down);
        if this.splice {
            if !byte_up {
                this.up.maybe_splice();
            }
            if !byte_down {
                this.down.maybe_splice();
            }
        }
        // A byte-level rule arrived on a spliced direction: empty the pipe, then go buffered.
        // So does a direction that carries small chunks again.
        if byte_up || this.up.unsplice {
            if let Poll::Ready(Err(e)) = leave_splice(cx, &mut this.up, &*this.backend) {
                return Poll::Ready(Ended::Error(e));
            }
        }
        if byte_down || this.down.unsplice {
            if let Poll::Ready(Err(e)) = leave_splice(cx, &mut this.down, &*this.client) {
                return Poll::Ready(Ended::Error(e));
            }
        }
        let up = if this.up.shut {
            Poll::Ready(Ok(()))
        } else if this.up.pipe.is_some() {
            if byte_up || this.up.unsplice {
                Poll::Pending
            } else {
                match (this.client.plain_tcp(), this.backend.plain_tcp()) {
                    (Some(c), Some(b)) => poll_dir_splice(
                        cx,
                        &mut this.up,
                        c,
                        b,
                        &this.bytes.upstream,
                        &mut progressed,
                        (ErrorSource::Downstream, ErrorSource::Upstream),
                        this.down.shut,
                    ),
                    _ => Poll::Ready(Err(internal_no_tcp())),
                }
            }
        } else {
            let fin_on_close = this.down.shut && this.backend.plain_tcp().is_some();
            let hook = byte_up.then_some(Hook {
                plan: &mut this.chaos,
                flow: Flow::Up,
                wake: &mut wake,
            });
            poll_dir(
                cx,
                &mut this.up,
                this.client,
                this.backend,
                &this.bytes.upstream,
                &mut progressed,
                (ErrorSource::Downstream, ErrorSource::Upstream),
                hook,
                fin_on_close,
            )
        };
        if let Poll::Ready(Err(e)) = up {
            return Poll::Ready(Ended::Error(e));
        }
        if let Some(cmd) = this.up.fired.take() {
            return Poll::Ready(Ended::Fault(cmd));
        }
        let down = if this.down.shut {
            Poll::Ready(Ok(()))
        } else if this.down.pipe.is_some() {
            if byte_down || this.down.unsplice {
                Poll::Pending
            } else {
                match (this.backend.plain_tcp(), this.client.plain_tcp()) {
                    (Some(b), Some(c)) => poll_dir_splice(
                        cx,
                        &mut this.down,
                        b,
                        c,
                        &this.bytes.downstream,
                        &mut progressed,
                        (ErrorSource::Upstream, ErrorSource::Downstream),
                        this.up.shut,
                    ),
                    _ => Poll::Ready(Err(internal_no_tcp())),
                }
            }
        } else {
            let fin_on_close = this.up.shut && this.client.plain_tcp().is_some();
            let hook = byte_down.then_some(Hook {
                plan: &mut this.chaos,
                flow: Flow::Down,
                wake: &mut wake,
            });
            poll_dir(
                cx,
                &mut this.down,
                this.backend,
                this.client,
                &this.bytes.downstream,
                &mut progressed,
                (ErrorSource::Upstream, ErrorSource::Downstream),
                hook,
                fin_on_close,
            )
        };
        if let Poll::Ready(Err(e)) = down {
            return Poll::Ready(Ended::Error(e));
        }
        if let Some(cmd) = this.down.fired.take() {
            return Poll::Ready(Ended::Fault(cmd));
        }
        if this.up.unreported + this.down.unreported >= METRIC_BATCH {
            this.flush_metrics();
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ended::Done);
        }
        if let Some(at) = wake {
            if this.gate_armed != Some(at) {
                this.gate.as_mut().reset(at);
                this.gate_armed = Some(at);
            }
            if this.gate.as_mut().poll(cx).is_ready() {
                this.gate_armed = None;
                cx.waker().wake_by_ref();
            }
        }
        if progressed {
            // The timer is re-armed lazily when it fires: no timer-wheel work per read.
            this.last_payload = Instant::now();
        }
        while this.idle.as_mut().poll(cx).is_ready() {
            let deadline = this.last_payload + this.idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(Ended::Idle);
            }
            this.idle.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}

/// Empties a direction's pipe and drops it, so the direction continues on the buffered path.
fn leave_splice<W: TcpBacked>(
    cx: &mut Context<'_>,
    d: &mut Dir,
    w: &W,
) -> Poll<Result<(), ProxyError>> {
    let Some(pipe) = d.pipe.as_mut() else {
        return Poll::Ready(Ok(()));
    };
    let Some(tcp) = w.plain_tcp() else {
        return Poll::Ready(Err(internal_no_tcp()));
    };
    match splice::poll_flush(cx, pipe, tcp) {
        Poll::Ready(Ok(())) => {
            d.pipe = None;
            d.unsplice = false;
            Poll::Ready(Ok(()))
        }
        Poll::Ready(Err(err)) => Poll::Ready(Err(ProxyError {
            source: ErrorSource::Internal,
            op: "write",
            err,
        })),
        Poll::Pending => Poll::Pending,
    }
}

fn internal_no_tcp() -> ProxyError {
    ProxyError {
        source: ErrorSource::Internal,
        op: "splice",
        err: io::Error::other("splice on a stream that is not plain TCP"),
    }
}

/// Closes both streams in `style` (`fin`: orderly; `rst`: abortive). Never fails.
pub async fn close_both<C, B>(client: &mut C, backend: &mut B, rst: bool)
where
    C: AsyncWrite + TcpBacked + Unpin,
    B: AsyncWrite + TcpBacked + Unpin,
{
    if rst {
        client.set_rst_on_close();
        backend.set_rst_on_close();
    } else {
        let grace = Duration::from_secs(1);
        let _ = tokio::time::timeout(grace, client.shutdown()).await;
        let _ = tokio::time::timeout(grace, backend.shutdown()).await;
    }
}

/// Orderly close (FIN) of one stream, bounded by a grace period. Never fails.
pub async fn close_one<S: AsyncWrite + Unpin>(s: &mut S) {
    let _ = tokio::time::timeout(Duration::from_secs(1), s.shutdown()).await;
}

/// The `drop` style: forward nothing, hold both sockets open until one peer goes (EOF or error).
/// Returns the bytes read and discarded from each side: (client, backend).
pub async fn hold<C, B>(client: &mut C, backend: &mut B) -> (u64, u64)
where
    C: AsyncRead + Unpin,
    B: AsyncRead + Unpin,
{
    let mut cbuf = vec![0u8; 4096];
    let mut bbuf = vec![0u8; 4096];
    let (mut from_client, mut from_backend) = (0u64, 0u64);
    loop {
        tokio::select! {
            r = client.read(&mut cbuf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => from_client += n as u64,
            },
            r = backend.read(&mut bbuf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => from_backend += n as u64,
            },
        }
    }
    (from_client, from_backend)
}
