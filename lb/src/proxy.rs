//! Bidirectional copy with half-close, idle timeout and the close styles.
//!
//! [`Duplex`] is one future that drives both directions over `&mut` of both streams (no split,
//! no lock). Each direction reads into a 64 KiB buffer, writes it out, and on EOF shuts down the
//! write side of the other stream (half-close), so a client that shuts down its write side still
//! receives the whole response. The copy ends when both directions have seen EOF and propagated it,
//! on the first I/O error, or when no payload byte moved for `idle_timeout`.
//!
//! A direction that has carried [`SPLICE_AFTER`] bytes between two plain TCP sockets switches to
//! splice(2) through a pipe (see `splice.rs`): bulk transfers skip the copy through user space,
//! while small exchanges keep the buffered path and never hold a pipe.
//!
//! Invariants worth naming:
//! - only payload bytes reset the idle timer (TLS records, TCP keepalives and handshakes do not);
//! - a direction's buffer is released whenever it is empty and its reader has nothing to read,
//!   so an idle connection holds no copy buffer;
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

use crate::splice::{self, Pipe, Step};
use crate::stream::TcpBacked;

/// Size of each direction's copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// A direction switches to splice(2) once it has carried this many bytes (plain TCP only):
/// small exchanges keep the lower-latency buffered path and never hold a pipe.
pub const SPLICE_AFTER: u64 = 256 * 1024;
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
}

#[derive(Default)]
struct Dir {
    buf: BytesMut,
    read_eof: bool,
    shut: bool,
    need_flush: bool,
    unreported: u64,
    /// Bytes carried so far (decides the switch to splice).
    total: u64,
    /// Present once the direction forwards with splice(2).
    pipe: Option<Pipe>,
    /// Creating a pipe failed (e.g. out of descriptors): stay buffered.
    no_splice: bool,
}

impl Dir {
    /// Switches to splice when allowed, big enough, and at a clean point (nothing buffered).
    fn maybe_splice(&mut self) {
        if self.pipe.is_some()
            || self.no_splice
            || self.total < SPLICE_AFTER
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
        }
    }

    /// Bytes read but not yet written: (client->backend, backend->client).
    pub fn in_flight(&self) -> (u64, u64) {
        (self.up.pending(), self.down.pending())
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

/// Moves bytes from `r` to `w` until it would block; `Ready(Ok)` once EOF has been propagated.
fn poll_dir<R, W>(
    cx: &mut Context<'_>,
    d: &mut Dir,
    r: &mut R,
    w: &mut W,
    counter: &AtomicU64,
    progressed: &mut bool,
    (rsrc, wsrc): (ErrorSource, ErrorSource),
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
        while !d.buf.is_empty() {
            match Pin::new(&mut *w).poll_write(cx, &d.buf) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(werr(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => {
                    d.buf.advance(n);
                    d.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                Poll::Pending => return Poll::Pending,
            }
        }
        if d.shut {
            return Poll::Ready(Ok(()));
        }
        if d.read_eof {
            if d.need_flush {
                match Pin::new(&mut *w).poll_flush(cx) {
                    Poll::Ready(Ok(())) => d.need_flush = false,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(werr(e))),
                    Poll::Pending => return Poll::Pending,
                }
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
        d.buf.reserve(BUF_SIZE);
        match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut d.buf) {
            Poll::Ready(Ok(0)) => d.read_eof = true,
            Poll::Ready(Ok(n)) => {
                *progressed = true;
                counter.fetch_add(n as u64, Ordering::Relaxed);
                d.unreported += n as u64;
                d.total += n as u64;
            }
            // A TLS peer that closes without close_notify: treat as EOF.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => d.read_eof = true,
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
                    d.buf = BytesMut::new();
                }
                return Poll::Pending;
            }
        }
    }
}

/// The spliced form of [`poll_dir`]: socket -> pipe -> socket.
fn poll_dir_splice(
    cx: &mut Context<'_>,
    d: &mut Dir,
    r: &tokio::net::TcpStream,
    w: &tokio::net::TcpStream,
    counter: &AtomicU64,
    progressed: &mut bool,
    (rsrc, wsrc): (ErrorSource, ErrorSource),
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
                d.total += n as u64;
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
        if this.splice {
            this.up.maybe_splice();
            this.down.maybe_splice();
        }
        let up = if this.up.shut {
            Poll::Ready(Ok(()))
        } else if this.up.pipe.is_some() {
            match (this.client.plain_tcp(), this.backend.plain_tcp()) {
                (Some(c), Some(b)) => poll_dir_splice(
                    cx,
                    &mut this.up,
                    c,
                    b,
                    &this.bytes.upstream,
                    &mut progressed,
                    (ErrorSource::Downstream, ErrorSource::Upstream),
                ),
                _ => Poll::Ready(Err(internal_no_tcp())),
            }
        } else {
            poll_dir(
                cx,
                &mut this.up,
                this.client,
                this.backend,
                &this.bytes.upstream,
                &mut progressed,
                (ErrorSource::Downstream, ErrorSource::Upstream),
            )
        };
        if let Poll::Ready(Err(e)) = up {
            return Poll::Ready(Ended::Error(e));
        }
        let down = if this.down.shut {
            Poll::Ready(Ok(()))
        } else if this.down.pipe.is_some() {
            match (this.backend.plain_tcp(), this.client.plain_tcp()) {
                (Some(b), Some(c)) => poll_dir_splice(
                    cx,
                    &mut this.down,
                    b,
                    c,
                    &this.bytes.downstream,
                    &mut progressed,
                    (ErrorSource::Upstream, ErrorSource::Downstream),
                ),
                _ => Poll::Ready(Err(internal_no_tcp())),
            }
        } else {
            poll_dir(
                cx,
                &mut this.down,
                this.backend,
                this.client,
                &this.bytes.downstream,
                &mut progressed,
                (ErrorSource::Upstream, ErrorSource::Downstream),
            )
        };
        if let Poll::Ready(Err(e)) = down {
            return Poll::Ready(Ended::Error(e));
        }
        if this.up.unreported + this.down.unreported >= METRIC_BATCH {
            this.flush_metrics();
        }
        if up.is_ready() && down.is_ready() {
            return Poll::Ready(Ended::Done);
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
