//! The echo backend: every byte read is written back. One task per connection, one buffer per
//! connection, allocated when the first bytes arrive (idle connections cost no buffer).

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Echo server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// Read buffer per active connection.
    pub buffer: usize,
    /// The server exits after this long, so a forgotten server stops by itself.
    pub lifetime: Duration,
}

/// Bind the listening socket (port 0 picks a free port; read it back with `local_addr`).
pub async fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Accept and echo until `cfg.lifetime` has passed. Returns the number of connections accepted.
pub async fn serve(listener: TcpListener, cfg: Config) -> io::Result<u64> {
    let deadline = tokio::time::Instant::now() + cfg.lifetime;
    let mut accepted = 0u64;
    loop {
        let accept = tokio::time::timeout_at(deadline, listener.accept()).await;
        match accept {
            Err(_) => return Ok(accepted),
            Ok(Ok((stream, _peer))) => {
                accepted += 1;
                let size = cfg.buffer.max(1);
                tokio::spawn(async move {
                    // errors (resets from the load tool or the proxy) end the connection, nothing more
                    let _ = echo(stream, size).await;
                });
            }
            // EMFILE and friends: back off briefly instead of spinning
            Ok(Err(_)) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn echo(mut stream: TcpStream, size: usize) -> io::Result<()> {
    let _ = stream.set_nodelay(true);
    // wait for the first bytes before allocating, so idle connections stay small
    stream.readable().await?;
    let mut buf = vec![0u8; size];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return stream.shutdown().await;
        }
        let data = buf.get(..n).unwrap_or(&[]);
        stream.write_all(data).await?;
    }
}
