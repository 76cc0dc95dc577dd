//! A minimal raw AMQP 0-9-1 client for tests that must misbehave or watch frames a client library
//! hides: it sends exactly the frames it is told to and never sends heartbeats on its own.

use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::protocol::{basic, channel, connection, AMQPClass};
use amq_protocol::types::FieldTable;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_broker::codec;

pub struct Raw {
    pub sock: TcpStream,
    buf: Vec<u8>,
    /// connection.start's server properties, once the handshake has seen them.
    pub server_properties: Option<FieldTable>,
}

impl Raw {
    /// A TCP connection, nothing sent yet.
    pub async fn connect(addr: std::net::SocketAddr) -> Self {
        Raw {
            sock: TcpStream::connect(addr).await.expect("connect"),
            buf: Vec::new(),
            server_properties: None,
        }
    }

    /// A TCP connection whose receive buffer is `size` bytes (no autotuning): a client that
    /// stops reading holds back little in its kernel.
    pub async fn connect_with_recv_buffer(addr: std::net::SocketAddr, size: u32) -> Self {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.set_recv_buffer_size(size).expect("SO_RCVBUF");
        Raw {
            sock: sock.connect(addr).await.expect("connect"),
            buf: Vec::new(),
            server_properties: None,
        }
    }

    /// Protocol header through connection.open-ok as guest on "/", no client properties.
    pub async fn handshake(&mut self, heartbeat: u16) {
        self.handshake_with(FieldTable::default(), heartbeat).await;
    }

    /// [`Raw::handshake`] with these client properties (capabilities, say).
    pub async fn handshake_with(&mut self, client_properties: FieldTable, heartbeat: u16) {
        self.sock
            .write_all(codec::PROTOCOL_HEADER)
            .await
            .expect("header");
        match self.recv().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Start(s)))) => {
                let caps = s.server_properties.inner().get("capabilities").cloned();
                assert!(caps.is_some(), "capabilities advertised");
                self.server_properties = Some(s.server_properties);
            }
            other => panic!("expected start, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties,
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        match self.recv().await {
            Some(AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Tune(_)))) => {}
            other => panic!("expected tune, got {other:?}"),
        }
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: 10,
                frame_max: 131072,
                heartbeat,
            })),
        )
        .await;
        self.send_method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match self.recv().await {
            Some(AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)),
            )) => {}
            other => panic!("expected open-ok, got {other:?}"),
        }
    }

    /// Encodes the frames and sends them in one write.
    pub async fn send_all(&mut self, frames: &[AMQPFrame]) {
        let mut out = Vec::new();
        for f in frames {
            codec::encode(f, &mut out).expect("encode");
        }
        self.sock.write_all(&out).await.expect("write");
    }

    pub async fn send(&mut self, f: AMQPFrame) {
        self.send_all(&[f]).await;
    }

    pub async fn send_method(&mut self, ch: u16, m: AMQPClass) {
        self.send(AMQPFrame::Method(ch, m)).await;
    }

    /// basic.publish to the default exchange, method + header + body in one write.
    pub async fn publish(&mut self, ch: u16, queue: &str, body: &[u8]) {
        self.send_all(&publish_frames(ch, queue, body)).await;
    }

    pub async fn open_channel(&mut self, ch: u16) {
        self.send_method(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        )
        .await;
        match self.recv_method().await {
            Some(AMQPFrame::Method(c, AMQPClass::Channel(channel::AMQPMethod::OpenOk(_))))
                if c == ch => {}
            other => panic!("expected channel.open-ok, got {other:?}"),
        }
    }

    /// Next frame, None on EOF. Panics after 5 s.
    pub async fn recv(&mut self) -> Option<AMQPFrame> {
        loop {
            if let Some((f, n)) = codec::decode(&self.buf, 0).expect("server sent a bad frame") {
                self.buf.drain(..n);
                return Some(f);
            }
            let mut tmp = [0u8; 65536];
            let n = tokio::time::timeout(Duration::from_secs(5), self.sock.read(&mut tmp))
                .await
                .expect("timed out reading")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&tmp[..n]);
        }
    }

    /// Next non-heartbeat frame.
    pub async fn recv_method(&mut self) -> Option<AMQPFrame> {
        loop {
            match self.recv().await? {
                AMQPFrame::Heartbeat => continue,
                f => return Some(f),
            }
        }
    }

    /// Reads until a connection.close; returns its reply code and text.
    pub async fn expect_connection_close(&mut self) -> (u16, String) {
        loop {
            match self.recv().await {
                Some(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(connection::AMQPMethod::Close(c)),
                )) => return (c.reply_code, c.reply_text.to_string()),
                Some(_) => continue,
                None => panic!("socket closed without connection.close"),
            }
        }
    }
}

/// The frames of a basic.publish to the default exchange (method, header, body).
pub fn publish_frames(ch: u16, queue: &str, body: &[u8]) -> [AMQPFrame; 3] {
    [
        AMQPFrame::Method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: "".into(),
                routing_key: queue.into(),
                mandatory: false,
                immediate: false,
            })),
        ),
        AMQPFrame::Header(
            ch,
            AMQPContentHeader {
                class_id: 60,
                body_size: body.len() as u64,
                properties: AMQPProperties::default(),
            },
        ),
        AMQPFrame::Body(ch, body.to_vec()),
    ]
}
