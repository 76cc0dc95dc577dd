//! The step between accepting a socket and serving it, for the AMQP, AMQPS and management
//! listeners: with `proxy-protocol` on, the source must be in `proxy-protocol-from` and the
//! stream must start with a PROXY header ([`crate::proxy_protocol`] parses it), whose client
//! address then stands for the peer. With it off, the socket's addresses are used as they are.
//!
//! The header is read with bounds: [`HEADER_TIMEOUT`] for the whole header, and no more bytes
//! than the parser allows before it decides. Bytes that arrived after the header (a client may
//! send the header and its first protocol bytes in one segment) are handed on in [`Prefixed`],
//! so the TLS handshake, AMQP or HTTP layer reads them first.
//!
//! Refusals: a source not in the trust list is logged at warn (an operator sees a client going
//! around the load balancer, or a missing entry); a missing, slow or malformed header at debug.

use crate::config::Config;
use crate::proxy_protocol::{self, ProxyHeader};
use bytes::{Buf, Bytes, BytesMut};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tracing::{debug, warn};

/// The whole PROXY header must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection ready to be served.
#[derive(Debug)]
pub struct Accepted<S> {
    pub stream: Prefixed<S>,
    /// The client: from the PROXY header when there was one, else the socket's peer.
    pub peer: SocketAddr,
    /// The address the client reached: from the PROXY header when there was one (as RabbitMQ
    /// reports it), else the socket's local address.
    pub local: SocketAddr,
    /// The load balancer's address when the addresses came from a PROXY header.
    pub via: Option<SocketAddr>,
}

/// Applies `proxy-protocol` to a freshly accepted socket. `None`: the connection is refused
/// (already logged); drop the socket.
pub async fn accept<S>(
    sock: S,
    peer: SocketAddr,
    local: SocketAddr,
    cfg: &Config,
    listener: &'static str,
) -> Option<Accepted<S>>
where
    S: AsyncRead + Unpin,
{
    accept_within(sock, peer, local, cfg, listener, HEADER_TIMEOUT).await
}

async fn accept_within<S>(
    mut sock: S,
    peer: SocketAddr,
    local: SocketAddr,
    cfg: &Config,
    listener: &'static str,
    header_timeout: Duration,
) -> Option<Accepted<S>>
where
    S: AsyncRead + Unpin,
{
    if !cfg.proxy_protocol {
        return Some(Accepted {
            stream: Prefixed::new(sock, Bytes::new()),
            peer,
            local,
            via: None,
        });
    }
    if !proxy_protocol::trusted(&cfg.proxy_protocol_from, peer.ip()) {
        warn!(
            source = %peer,
            listener,
            "connection refused: proxy-protocol is on and the source is not in proxy-protocol-from"
        );
        return None;
    }
    let (header, rest) = match tokio::time::timeout(header_timeout, read_header(&mut sock)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            debug!(source = %peer, listener, error = %e, "no valid PROXY header; connection closed");
            return None;
        }
        Err(_) => {
            debug!(source = %peer, listener, "no complete PROXY header in time; connection closed");
            return None;
        }
    };
    let stream = Prefixed::new(sock, rest);
    Some(match header {
        ProxyHeader::Proxied { src, dst } => Accepted {
            stream,
            // warren-lb writes an IPv4 client behind an IPv6 listener as ::ffff:a.b.c.d.
            peer: SocketAddr::new(src.ip().to_canonical(), src.port()),
            local: SocketAddr::new(dst.ip().to_canonical(), dst.port()),
            via: Some(peer),
        },
        ProxyHeader::Local => Accepted {
            stream,
            peer,
            local,
            via: None,
        },
    })
}

#[derive(Debug, thiserror::Error)]
enum HeaderError {
    #[error(transparent)]
    Proxy(#[from] proxy_protocol::ProxyError),
    #[error("closed before the header was complete")]
    Eof,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Reads until the parser has a header or an error; returns the header and the bytes after it.
/// The parser refuses anything longer than its bounds, so `buf` stays below those plus one read.
async fn read_header<S: AsyncRead + Unpin>(
    sock: &mut S,
) -> Result<(ProxyHeader, Bytes), HeaderError> {
    let mut buf = BytesMut::with_capacity(256);
    let mut chunk = [0u8; 512];
    loop {
        if let Some((header, n)) = proxy_protocol::parse(&buf)? {
            buf.advance(n);
            return Ok((header, buf.freeze()));
        }
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Err(HeaderError::Eof);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(inner: S, prefix: Bytes) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn cfg(on: bool, from: &[&str]) -> Config {
        Config {
            proxy_protocol: on,
            proxy_protocol_from: from.iter().map(|s| s.parse().expect("cidr")).collect(),
            ..Config::default()
        }
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("addr")
    }

    #[tokio::test]
    async fn the_bytes_after_the_header_are_read_first() {
        let (mut client, server) = tokio::io::duplex(1024);
        client
            .write_all(b"PROXY TCP6 ::ffff:203.0.113.7 ::ffff:10.0.0.5 4000 5672\r\nAMQP")
            .await
            .expect("write");
        let c = cfg(true, &["127.0.0.0/8"]);
        let a = accept(server, sa("127.0.0.1:9"), sa("127.0.0.1:5672"), &c, "amqp")
            .await
            .expect("accepted");
        assert_eq!(a.peer, sa("203.0.113.7:4000"));
        assert_eq!(a.local, sa("10.0.0.5:5672"));
        assert_eq!(a.via, Some(sa("127.0.0.1:9")));
        let mut s = a.stream;
        client.write_all(b"\x00\x00\x09\x01").await.expect("write");
        let mut got = [0u8; 8];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(&got, b"AMQP\x00\x00\x09\x01");
    }

    #[tokio::test]
    async fn untrusted_sources_and_bad_headers_are_refused() {
        let c = cfg(true, &["10.0.0.0/8"]);
        let (_client, server) = tokio::io::duplex(64);
        assert!(
            accept(server, sa("127.0.0.1:9"), sa("127.0.0.1:1"), &c, "amqp")
                .await
                .is_none()
        );
        let c = cfg(true, &["127.0.0.1"]);
        let (mut client, server) = tokio::io::duplex(64);
        client
            .write_all(b"AMQP\x00\x00\x09\x01")
            .await
            .expect("write");
        assert!(
            accept(server, sa("127.0.0.1:9"), sa("127.0.0.1:1"), &c, "amqp")
                .await
                .is_none()
        );
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"PROXY TCP4 1.2.3").await.expect("write");
        drop(client);
        assert!(
            accept(server, sa("127.0.0.1:9"), sa("127.0.0.1:1"), &c, "amqp")
                .await
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_slow_header_times_out() {
        let c = cfg(true, &["127.0.0.1"]);
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"PROXY TCP4 1.2.3").await.expect("write");
        let t0 = tokio::time::Instant::now();
        let limit = Duration::from_millis(100);
        let a = accept_within(
            server,
            sa("127.0.0.1:9"),
            sa("127.0.0.1:1"),
            &c,
            "amqp",
            limit,
        );
        assert!(a.await.is_none());
        assert!(t0.elapsed() >= limit);
        drop(client);
    }

    #[tokio::test]
    async fn local_and_off_keep_the_socket_addresses() {
        let c = cfg(true, &["127.0.0.1"]);
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"PROXY UNKNOWN\r\n").await.expect("write");
        let a = accept(server, sa("127.0.0.1:9"), sa("127.0.0.1:1"), &c, "mgmt")
            .await
            .expect("accepted");
        assert_eq!(
            (a.peer, a.local, a.via),
            (sa("127.0.0.1:9"), sa("127.0.0.1:1"), None)
        );
        let c = cfg(false, &[]);
        let (_client, server) = tokio::io::duplex(64);
        let a = accept(server, sa("10.9.9.9:9"), sa("127.0.0.1:1"), &c, "mgmt")
            .await
            .expect("accepted");
        assert_eq!(a.peer, sa("10.9.9.9:9"));
    }
}
