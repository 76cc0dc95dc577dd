//! The link frame codec: pure, no I/O.
//!
//! A connection starts with the dialer's 8-byte [`MAGIC`], then both sides exchange frames:
//! ```text
//! frame   := len:u32 BE | kind:u8 | body          (len counts kind + body, 1..=max)
//! kind 1  Hello      JSON handshake message (dialer)
//! kind 2  Challenge  JSON (acceptor)
//! kind 3  Proof      JSON (dialer: its HMAC)
//! kind 4  Welcome    JSON (acceptor: its HMAC)
//! kind 5  Reject     JSON reason, then the sender closes
//! kind 16 Ping       u64 BE token
//! kind 17 Pong       u64 BE token (echo of a ping's)
//! kind 18 Request    id:u64 BE | JSON request
//! kind 19 Response   id:u64 BE | JSON response
//! kind 20 App        channel:u8 | payload
//! ```
//! The maximum frame length is [`MAX_HANDSHAKE_FRAME`] until the peer is authenticated and
//! [`MAX_FRAME`] after. A length over the limit is refused before anything is allocated for it.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// First bytes a dialer sends.
pub(crate) const MAGIC: &[u8; 8] = b"WRNCLST1";

/// Largest frame before authentication.
pub(crate) const MAX_HANDSHAKE_FRAME: usize = 4096;

/// Largest frame after authentication (a batch of Raft entries or a snapshot chunk fits well
/// within it: proposals are capped at 1 MiB and AppendEntries at 32 entries).
pub(crate) const MAX_FRAME: usize = 64 << 20;

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    Hello(Bytes),
    Challenge(Bytes),
    Proof(Bytes),
    Welcome(Bytes),
    Reject(Bytes),
    Ping(u64),
    Pong(u64),
    Request { id: u64, body: Bytes },
    Response { id: u64, body: Bytes },
    App { channel: u8, payload: Bytes },
}

/// A frame that cannot be decoded: the link is closed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum FrameError {
    #[error("frame of {0} bytes exceeds the limit of {1}")]
    TooLarge(usize, usize),
    #[error("empty frame")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame kind {0} is too short")]
    Short(u8),
}

const HELLO: u8 = 1;
const CHALLENGE: u8 = 2;
const PROOF: u8 = 3;
const WELCOME: u8 = 4;
const REJECT: u8 = 5;
const PING: u8 = 16;
const PONG: u8 = 17;
const REQUEST: u8 = 18;
const RESPONSE: u8 = 19;
const APP: u8 = 20;

// === impl Frame ===

impl Frame {
    /// Append the encoded frame to `out`.
    pub(crate) fn encode(&self, out: &mut BytesMut) {
        let (kind, head, body): (u8, &[u8], &[u8]) = match self {
            Frame::Hello(b) => (HELLO, &[], b),
            Frame::Challenge(b) => (CHALLENGE, &[], b),
            Frame::Proof(b) => (PROOF, &[], b),
            Frame::Welcome(b) => (WELCOME, &[], b),
            Frame::Reject(b) => (REJECT, &[], b),
            Frame::Ping(t) => return put(out, PING, &t.to_be_bytes(), &[]),
            Frame::Pong(t) => return put(out, PONG, &t.to_be_bytes(), &[]),
            Frame::Request { id, body } => return put(out, REQUEST, &id.to_be_bytes(), body),
            Frame::Response { id, body } => return put(out, RESPONSE, &id.to_be_bytes(), body),
            Frame::App { channel, payload } => return put(out, APP, &[*channel], payload),
        };
        put(out, kind, head, body)
    }

    /// The encoded frame as one buffer.
    pub(crate) fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// Decode one frame from the front of `buf`: `Ok(None)` means "need more bytes".
    pub(crate) fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > max {
            return Err(FrameError::TooLarge(len, max));
        }
        if buf.len() < 4 + len {
            buf.reserve(4 + len - buf.len());
            return Ok(None);
        }
        buf.advance(4);
        let mut body = buf.split_to(len).freeze();
        let kind = body.get_u8();
        let u64_of = |body: &mut Bytes| {
            if body.len() < 8 {
                Err(FrameError::Short(kind))
            } else {
                Ok(body.get_u64())
            }
        };
        let frame = match kind {
            HELLO => Frame::Hello(body),
            CHALLENGE => Frame::Challenge(body),
            PROOF => Frame::Proof(body),
            WELCOME => Frame::Welcome(body),
            REJECT => Frame::Reject(body),
            PING => Frame::Ping(u64_of(&mut body)?),
            PONG => Frame::Pong(u64_of(&mut body)?),
            REQUEST => {
                let id = u64_of(&mut body)?;
                Frame::Request { id, body }
            }
            RESPONSE => {
                let id = u64_of(&mut body)?;
                Frame::Response { id, body }
            }
            APP => {
                if body.is_empty() {
                    return Err(FrameError::Short(kind));
                }
                let channel = body.get_u8();
                Frame::App {
                    channel,
                    payload: body,
                }
            }
            k => return Err(FrameError::UnknownKind(k)),
        };
        Ok(Some(frame))
    }
}

fn put(out: &mut BytesMut, kind: u8, head: &[u8], body: &[u8]) {
    let len = 1 + head.len() + body.len();
    out.reserve(4 + len);
    out.put_u32(len as u32);
    out.put_u8(kind);
    out.put_slice(head);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello(Bytes::from_static(b"{}")),
            Frame::Challenge(Bytes::from_static(b"{\"a\":1}")),
            Frame::Proof(Bytes::from_static(b"p")),
            Frame::Welcome(Bytes::from_static(b"w")),
            Frame::Reject(Bytes::from_static(b"r")),
            Frame::Ping(7),
            Frame::Pong(u64::MAX),
            Frame::Request {
                id: 1,
                body: Bytes::from_static(b"req"),
            },
            Frame::Response {
                id: 2,
                body: Bytes::new(),
            },
            Frame::App {
                channel: 255,
                payload: Bytes::from_static(b"hello"),
            },
        ]
    }

    #[test]
    fn round_trip_all_kinds_back_to_back() {
        let mut buf = BytesMut::new();
        for f in all() {
            f.encode(&mut buf);
        }
        for f in all() {
            assert_eq!(Frame::decode(&mut buf, MAX_FRAME).unwrap(), Some(f));
        }
        assert!(buf.is_empty());
    }

    #[test]
    fn byte_exact_layout() {
        let b = Frame::App {
            channel: 3,
            payload: Bytes::from_static(b"xy"),
        }
        .to_bytes();
        assert_eq!(&b[..], &[0, 0, 0, 4, 20, 3, b'x', b'y']);
        let b = Frame::Ping(0x0102).to_bytes();
        assert_eq!(&b[..], &[0, 0, 0, 9, 16, 0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn every_truncation_needs_more_bytes() {
        for f in all() {
            let full = f.to_bytes();
            for cut in 0..full.len() {
                let mut buf = BytesMut::from(&full[..cut]);
                assert_eq!(
                    Frame::decode(&mut buf, MAX_FRAME),
                    Ok(None),
                    "{f:?} cut {cut}"
                );
            }
        }
    }

    #[test]
    fn hostile_frames_are_errors() {
        let mut huge = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 1][..]);
        assert_eq!(
            Frame::decode(&mut huge, MAX_HANDSHAKE_FRAME),
            Err(FrameError::TooLarge(u32::MAX as usize, MAX_HANDSHAKE_FRAME))
        );
        assert!(
            huge.capacity() < 1024,
            "nothing allocated for a refused length"
        );
        let mut empty = BytesMut::from(&[0, 0, 0, 0][..]);
        assert_eq!(Frame::decode(&mut empty, 10), Err(FrameError::Empty));
        let mut unknown = BytesMut::from(&[0, 0, 0, 1, 99][..]);
        assert_eq!(
            Frame::decode(&mut unknown, 10),
            Err(FrameError::UnknownKind(99))
        );
        let mut short = BytesMut::from(&[0, 0, 0, 3, 16, 1, 2][..]);
        assert_eq!(Frame::decode(&mut short, 10), Err(FrameError::Short(16)));
        let mut short_app = BytesMut::from(&[0, 0, 0, 1, 20][..]);
        assert_eq!(
            Frame::decode(&mut short_app, 10),
            Err(FrameError::Short(20))
        );
    }
}
