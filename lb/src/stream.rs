//! The two ends of a proxied connection: plain TCP or TLS over TCP.
//!
//! Enums rather than trait objects keep the copy loop monomorphic, and both give access to the
//! underlying `TcpStream` so a close can be made abortive (SO_LINGER 0) whatever the layer above.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Access to the TCP socket under a stream.
pub trait TcpBacked {
    fn tcp(&self) -> &TcpStream;

    /// The socket, if the stream is plain TCP (bytes on the wire are the payload), which is what
    /// zero-copy forwarding needs.
    fn plain_tcp(&self) -> Option<&TcpStream>;

    /// Makes the next close abortive: the kernel sends RST instead of FIN.
    fn set_rst_on_close(&self) {
        let _ = socket2::SockRef::from(self.tcp()).set_linger(Some(Duration::ZERO));
    }
}

macro_rules! either_stream {
    ($name:ident, $tls:ty) => {
        pub enum $name {
            Plain(TcpStream),
            Tls(Box<$tls>),
        }

        impl TcpBacked for $name {
            fn tcp(&self) -> &TcpStream {
                match self {
                    $name::Plain(s) => s,
                    $name::Tls(s) => s.get_ref().0,
                }
            }

            fn plain_tcp(&self) -> Option<&TcpStream> {
                match self {
                    $name::Plain(s) => Some(s),
                    $name::Tls(_) => None,
                }
            }
        }

        impl AsyncRead for $name {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $name::Plain(s) => Pin::new(s).poll_read(cx, buf),
                    $name::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                }
            }
        }

        impl AsyncWrite for $name {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $name::Plain(s) => Pin::new(s).poll_write(cx, buf),
                    $name::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $name::Plain(s) => Pin::new(s).poll_flush(cx),
                    $name::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $name::Plain(s) => Pin::new(s).poll_shutdown(cx),
                    $name::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                }
            }
        }
    };
}

either_stream!(ClientStream, tokio_rustls::server::TlsStream<TcpStream>);
either_stream!(BackendStream, tokio_rustls::client::TlsStream<TcpStream>);

impl TcpBacked for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }

    fn plain_tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}
