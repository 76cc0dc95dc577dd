//! Zero-copy forwarding between two plain TCP sockets with splice(2) through a pipe.
//!
//! Used by [`crate::proxy`] for a direction that has carried enough bytes to be a bulk transfer,
//! when both sides are plain TCP and nothing needs to see the bytes. Safe wrappers only (`nix`).
//! The pipe is created on first use and lives as long as the connection; connections that stay
//! small or idle never get one (so 10k idle connections cost no pipe descriptors).
//!
//! Readiness: a splice that returns EAGAIN clears the socket's tokio readiness (`try_io`), and the
//! direction then waits with `poll_read_ready` / `poll_write_ready`. The pipe is only filled when
//! it is empty, so EAGAIN on the socket->pipe step means "socket not readable", and on the
//! pipe->socket step "socket not writable".

use std::io;
use std::os::fd::OwnedFd;
use std::task::{Context, Poll};

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

/// The default pipe capacity (and bytes per splice call when the pipe cannot grow).
const DEFAULT_CAP: usize = 64 * 1024;
/// Pipe capacity asked for with F_SETPIPE_SZ: fewer splice calls per MiB on bulk directions.
const WANT_CAP: usize = 1 << 20;

pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes in the pipe, read from the source, not yet written to the destination.
    pub pending: usize,
    /// Pipe capacity: the most bytes moved per splice call.
    cap: usize,
}

impl Pipe {
    /// A pipe of 1 MiB if the kernel allows it (pipe-max-size, per-user pipe limits), else of the
    /// default size.
    pub fn new() -> io::Result<Self> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let cap = match fcntl(&w, FcntlArg::F_SETPIPE_SZ(WANT_CAP as nix::libc::c_int)) {
            Ok(n) if n > 0 => n as usize,
            _ => DEFAULT_CAP,
        };
        Ok(Self {
            r,
            w,
            pending: 0,
            cap,
        })
    }
}

fn flags() -> SpliceFFlags {
    SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE
}

/// What one poll of a spliced direction did.
pub enum Step {
    /// `n` payload bytes entered the pipe.
    Read(usize),
    /// The source reached EOF and the pipe is empty.
    Eof,
}

/// Empties the pipe into `dst`. `Ready(Ok)` once empty.
pub fn poll_flush(cx: &mut Context<'_>, p: &mut Pipe, dst: &TcpStream) -> Poll<io::Result<()>> {
    while p.pending > 0 {
        let r = dst.try_io(Interest::WRITABLE, || {
            splice(&p.r, None, dst, None, p.pending, flags()).map_err(io::Error::from)
        });
        match r {
            Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
            Ok(n) => p.pending -= n.min(p.pending),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match dst.poll_write_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            },
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
    Poll::Ready(Ok(()))
}

/// Fills the (empty) pipe from `src`.
pub fn poll_fill(cx: &mut Context<'_>, p: &mut Pipe, src: &TcpStream) -> Poll<io::Result<Step>> {
    debug_assert_eq!(p.pending, 0);
    loop {
        let r = src.try_io(Interest::READABLE, || {
            splice(src, None, &p.w, None, p.cap, flags()).map_err(io::Error::from)
        });
        match r {
            Ok(0) => return Poll::Ready(Ok(Step::Eof)),
            Ok(n) => {
                p.pending = n;
                return Poll::Ready(Ok(Step::Read(n)));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => match src.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            },
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}
