//! AMQP 0-9-1 framing for the load generator: pure functions, no I/O.
//!
//! Two speeds on purpose:
//! - control frames (handshake, declare, consume, close) go through `amq-protocol`'s full
//!   `gen_frame`/`parse_class`; they are rare, so allocation there does not matter;
//! - the per-message path never builds an `AMQPFrame`: a publish is a copy of a template encoded once
//!   (with `gen_frame`) plus a timestamp patch, and the consumer side reads only the fields it needs
//!   out of raw frames (`basic.deliver`'s delivery tag, the header's body size, `basic.ack`'s tag).
//!
//! Unit tests check the hand-written fast paths byte for byte against `amq-protocol`.

use amq_protocol::{
    frame::{gen_frame, AMQPFrame},
    protocol::{basic, parse_class, AMQPClass},
};

/// Frame type octets (AMQP 0-9-1 section 4.2.3).
pub const FRAME_METHOD: u8 = 1;
/// Content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// Last octet of every frame.
pub const FRAME_END: u8 = 0xCE;
/// Bytes a frame adds around its payload: type, channel, size, frame-end.
pub const FRAME_OVERHEAD: usize = 8;

/// `basic` class id.
pub const CLASS_BASIC: u16 = 60;
/// `basic.publish`.
pub const BASIC_PUBLISH: u16 = 40;
/// `basic.return`.
pub const BASIC_RETURN: u16 = 50;
/// `basic.deliver`.
pub const BASIC_DELIVER: u16 = 60;
/// `basic.ack`.
pub const BASIC_ACK: u16 = 80;
/// `basic.nack`.
pub const BASIC_NACK: u16 = 120;

/// Bytes at the start of a message body that carry the producer's sequence and send time
/// (u32 sequence, u64 nanoseconds since the Unix epoch, both big-endian). Smaller bodies carry none.
pub const STAMP_LEN: usize = 12;

/// Errors from decoding or encoding frames.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The octet after the payload is not 0xCE.
    #[error("frame-end octet is {0:#04x}, expected 0xce")]
    BadFrameEnd(u8),
    /// A frame announces more than the negotiated frame size.
    #[error("frame payload of {size} bytes exceeds the negotiated maximum {max}")]
    TooLarge {
        /// Announced payload size.
        size: usize,
        /// Largest payload allowed.
        max: usize,
    },
    /// A frame too short for the method or header it claims to be.
    #[error("malformed {0}")]
    Malformed(&'static str),
    /// `amq-protocol` could not decode a method.
    #[error("cannot decode method: {0}")]
    Decode(String),
    /// `amq-protocol` could not encode a frame.
    #[error("cannot encode frame: {0}")]
    Encode(String),
}

/// One frame, borrowed from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFrame<'a> {
    /// Frame type octet.
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// Payload without header and frame-end.
    pub payload: &'a [u8],
}

/// Splits the first complete frame off `buf`. Returns the frame and the number of bytes it used, or
/// `Ok(None)` when more bytes are needed. `max_payload` is checked before waiting for the payload, so
/// a bad size fails fast instead of growing the buffer.
#[inline]
pub fn split_frame(
    buf: &[u8],
    max_payload: usize,
) -> Result<Option<(RawFrame<'_>, usize)>, CodecError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size > max_payload {
        return Err(CodecError::TooLarge {
            size,
            max: max_payload,
        });
    }
    let total = size + FRAME_OVERHEAD;
    if buf.len() < total {
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(CodecError::BadFrameEnd(buf[total - 1]));
    }
    Ok(Some((
        RawFrame {
            kind: buf[0],
            channel: u16::from_be_bytes([buf[1], buf[2]]),
            payload: &buf[7..total - 1],
        },
        total,
    )))
}

/// Class and method ids of a method frame's payload.
#[inline]
pub fn method_ids(payload: &[u8]) -> Option<(u16, u16)> {
    if payload.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    ))
}

#[inline]
fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at + 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// Delivery tag of a `basic.deliver` payload (class and method ids included).
#[inline]
pub fn deliver_tag(payload: &[u8]) -> Result<u64, CodecError> {
    // class(2) method(2) consumer-tag(shortstr) delivery-tag(8) ...
    let tag_len = *payload
        .get(4)
        .ok_or(CodecError::Malformed("basic.deliver"))? as usize;
    be_u64(payload, 5 + tag_len).ok_or(CodecError::Malformed("basic.deliver"))
}

/// Delivery tag and `multiple` bit of a `basic.ack` or `basic.nack` payload.
#[inline]
pub fn ack_fields(payload: &[u8]) -> Result<(u64, bool), CodecError> {
    let tag = be_u64(payload, 4).ok_or(CodecError::Malformed("basic.ack"))?;
    let bits = *payload.get(12).ok_or(CodecError::Malformed("basic.ack"))?;
    Ok((tag, bits & 1 == 1))
}

/// Body size of a content header payload.
#[inline]
pub fn header_body_size(payload: &[u8]) -> Result<u64, CodecError> {
    // class(2) weight(2) body-size(8) flags(2) ...
    be_u64(payload, 4).ok_or(CodecError::Malformed("content header"))
}

/// Sequence and send time (ns since the Unix epoch) stamped at the start of a body.
#[inline]
pub fn read_stamp(body: &[u8]) -> Option<(u32, u64)> {
    let s = body.get(..STAMP_LEN)?;
    let seq = u32::from_be_bytes([s[0], s[1], s[2], s[3]]);
    Some((seq, be_u64(s, 4)?))
}

/// Appends a `basic.ack` frame.
#[inline]
pub fn encode_ack(out: &mut Vec<u8>, channel: u16, tag: u64, multiple: bool) {
    out.push(FRAME_METHOD);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&CLASS_BASIC.to_be_bytes());
    out.extend_from_slice(&BASIC_ACK.to_be_bytes());
    out.extend_from_slice(&tag.to_be_bytes());
    out.push(u8::from(multiple));
    out.push(FRAME_END);
}

/// Appends any frame, encoded by `amq-protocol` (control path: allocates).
pub fn encode_frame(out: &mut Vec<u8>, frame: &AMQPFrame) -> Result<(), CodecError> {
    let (bytes, _) = gen_frame(frame)(Vec::new().into())
        .map_err(|e| CodecError::Encode(e.to_string()))?
        .into_inner();
    out.extend_from_slice(&bytes);
    Ok(())
}

/// Appends a method frame (control path).
pub fn encode_method(out: &mut Vec<u8>, channel: u16, class: AMQPClass) -> Result<(), CodecError> {
    encode_frame(out, &AMQPFrame::Method(channel, class))
}

/// Decodes a method frame's payload with `amq-protocol` (control path).
pub fn decode_method(payload: &[u8]) -> Result<AMQPClass, CodecError> {
    match parse_class(payload) {
        Ok(([], class)) => Ok(class),
        Ok((rest, _)) => Err(CodecError::Decode(format!("{} trailing bytes", rest.len()))),
        Err(e) => Err(CodecError::Decode(format!("{e:?}"))),
    }
}

// === impl PublishTemplate ===

/// The frames of one `basic.publish` (method, content header, body frames) encoded once; each publish
/// appends a copy and patches the stamp.
#[derive(Clone, Debug)]
pub struct PublishTemplate {
    bytes: Vec<u8>,
    /// Offset of the first body byte in `bytes`, when the body is large enough to carry a stamp.
    stamp_at: Option<usize>,
}

impl PublishTemplate {
    /// Encodes a publish of `body_size` zero bytes to `exchange`/`routing_key`. `frame_max` is the
    /// negotiated frame size (0 = unlimited); bodies larger than one frame are split.
    pub fn new(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        body_size: usize,
        persistent: bool,
        frame_max: u32,
    ) -> Result<Self, CodecError> {
        Self::with_mandatory(
            channel,
            exchange,
            routing_key,
            body_size,
            persistent,
            false,
            frame_max,
        )
    }

    /// As [`PublishTemplate::new`], with the `mandatory` flag of `basic.publish` chosen (an
    /// unroutable mandatory publish comes back as `basic.return` instead of being dropped).
    pub fn with_mandatory(
        channel: u16,
        exchange: &str,
        routing_key: &str,
        body_size: usize,
        persistent: bool,
        mandatory: bool,
        frame_max: u32,
    ) -> Result<Self, CodecError> {
        let mut bytes = Vec::with_capacity(64 + exchange.len() + routing_key.len() + body_size);
        encode_method(
            &mut bytes,
            channel,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
                mandatory,
                immediate: false,
            })),
        )?;
        let properties = if persistent {
            basic::AMQPProperties::default().with_delivery_mode(2)
        } else {
            basic::AMQPProperties::default()
        };
        encode_frame(
            &mut bytes,
            &AMQPFrame::Header(
                channel,
                amq_protocol::frame::AMQPContentHeader {
                    class_id: CLASS_BASIC,
                    body_size: body_size as u64,
                    properties,
                },
            ),
        )?;
        let chunk = if frame_max == 0 {
            usize::MAX
        } else {
            (frame_max as usize)
                .checked_sub(FRAME_OVERHEAD)
                .filter(|c| *c >= STAMP_LEN)
                .ok_or(CodecError::Malformed("frame_max too small"))?
        };
        let stamp_at = (body_size >= STAMP_LEN).then_some(bytes.len() + 7);
        let mut left = body_size;
        while left > 0 {
            let n = left.min(chunk);
            bytes.push(FRAME_BODY);
            bytes.extend_from_slice(&channel.to_be_bytes());
            bytes.extend_from_slice(&(n as u32).to_be_bytes());
            bytes.resize(bytes.len() + n, 0);
            bytes.push(FRAME_END);
            left -= n;
        }
        Ok(Self { bytes, stamp_at })
    }

    /// Bytes one publish takes on the wire.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a publish has at least a method and a header frame.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether bodies carry a sequence and timestamp.
    pub fn stamped(&self) -> bool {
        self.stamp_at.is_some()
    }

    /// Appends one publish. With enough reserved capacity in `out` this does not allocate.
    #[inline]
    pub fn append(&self, out: &mut Vec<u8>, seq: u32, sent_ns: u64) {
        let start = out.len();
        out.extend_from_slice(&self.bytes);
        if let Some(at) = self.stamp_at {
            let s = &mut out[start + at..start + at + STAMP_LEN];
            s[..4].copy_from_slice(&seq.to_be_bytes());
            s[4..].copy_from_slice(&sent_ns.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::parse_frame;

    fn parse_all(mut b: &[u8]) -> Vec<AMQPFrame> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let (rest, f) = parse_frame(b).unwrap();
            out.push(f);
            b = rest;
        }
        out
    }

    #[test]
    fn ack_matches_amq_protocol() {
        for (tag, multiple) in [(1u64, false), (0x0102_0304_0506_0708, true)] {
            let mut ours = Vec::new();
            encode_ack(&mut ours, 7, tag, multiple);
            let mut theirs = Vec::new();
            encode_method(
                &mut theirs,
                7,
                AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                    delivery_tag: tag,
                    multiple,
                })),
            )
            .unwrap();
            assert_eq!(ours, theirs);
            let (f, used) = split_frame(&ours, 1 << 20).unwrap().unwrap();
            assert_eq!(used, ours.len());
            assert_eq!(method_ids(f.payload), Some((CLASS_BASIC, BASIC_ACK)));
            assert_eq!(ack_fields(f.payload).unwrap(), (tag, multiple));
        }
    }

    #[test]
    fn nack_fields() {
        let mut b = Vec::new();
        encode_method(
            &mut b,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Nack(basic::Nack {
                delivery_tag: 42,
                multiple: true,
                requeue: true,
            })),
        )
        .unwrap();
        let (f, _) = split_frame(&b, 1 << 20).unwrap().unwrap();
        assert_eq!(method_ids(f.payload), Some((CLASS_BASIC, BASIC_NACK)));
        assert_eq!(ack_fields(f.payload).unwrap(), (42, true));
    }

    #[test]
    fn deliver_tag_reads_after_consumer_tag() {
        let mut b = Vec::new();
        encode_method(
            &mut b,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "amq.ctag-xyz".into(),
                delivery_tag: 987_654_321,
                redelivered: true,
                exchange: "".into(),
                routing_key: "q".into(),
            })),
        )
        .unwrap();
        let (f, _) = split_frame(&b, 1 << 20).unwrap().unwrap();
        assert_eq!(f.kind, FRAME_METHOD);
        assert_eq!(f.channel, 1);
        assert_eq!(method_ids(f.payload), Some((CLASS_BASIC, BASIC_DELIVER)));
        assert_eq!(deliver_tag(f.payload).unwrap(), 987_654_321);
    }

    #[test]
    fn every_truncation_waits_or_errors() {
        let mut b = Vec::new();
        encode_ack(&mut b, 1, 5, false);
        for n in 0..b.len() {
            assert!(split_frame(&b[..n], 1 << 20).unwrap().is_none(), "{n}");
        }
        // Truncated payloads: the fast readers report malformed instead of panicking.
        let (f, _) = split_frame(&b, 1 << 20).unwrap().unwrap();
        for n in 0..f.payload.len() {
            assert!(ack_fields(&f.payload[..n]).is_err());
            assert!(deliver_tag(&f.payload[..n.min(5)]).is_err());
        }
        assert!(header_body_size(&[0; 11]).is_err());
    }

    #[test]
    fn bad_frame_end_and_oversize() {
        let mut b = Vec::new();
        encode_ack(&mut b, 1, 5, false);
        let last = b.len() - 1;
        b[last] = 0;
        assert!(matches!(
            split_frame(&b, 1 << 20),
            Err(CodecError::BadFrameEnd(0))
        ));
        assert!(matches!(
            split_frame(&b, 4),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn publish_template_round_trips() {
        let t = PublishTemplate::new(1, "", "perf-q", 1024, true, 131_072).unwrap();
        assert!(t.stamped());
        let mut out = Vec::new();
        t.append(&mut out, 9, 1_700_000_000_123_456_789);
        t.append(&mut out, 10, 5);
        assert_eq!(out.len(), 2 * t.len());
        let frames = parse_all(&out);
        assert_eq!(frames.len(), 6);
        match &frames[0] {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) => {
                assert_eq!(p.routing_key.as_str(), "perf-q");
                assert_eq!(p.exchange.as_str(), "");
                assert!(!p.mandatory);
            }
            f => panic!("{f:?}"),
        }
        let m = PublishTemplate::with_mandatory(1, "", "perf-q", 16, false, true, 4096).unwrap();
        let mut out = Vec::new();
        m.append(&mut out, 1, 1);
        match &parse_all(&out)[0] {
            AMQPFrame::Method(1, AMQPClass::Basic(basic::AMQPMethod::Publish(p))) => {
                assert!(p.mandatory && !p.immediate);
            }
            f => panic!("{f:?}"),
        }
        match &frames[1] {
            AMQPFrame::Header(1, h) => {
                assert_eq!(h.body_size, 1024);
                assert_eq!(h.properties.delivery_mode(), &Some(2));
            }
            f => panic!("{f:?}"),
        }
        match &frames[2] {
            AMQPFrame::Body(1, body) => {
                assert_eq!(body.len(), 1024);
                assert_eq!(read_stamp(body), Some((9, 1_700_000_000_123_456_789)));
            }
            f => panic!("{f:?}"),
        }
        match &frames[5] {
            AMQPFrame::Body(1, body) => assert_eq!(read_stamp(body), Some((10, 5))),
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn header_size_fast_path() {
        let t = PublishTemplate::new(3, "ex", "rk", 777, false, 0).unwrap();
        let mut out = Vec::new();
        t.append(&mut out, 0, 0);
        let (m, used) = split_frame(&out, 1 << 20).unwrap().unwrap();
        assert_eq!(method_ids(m.payload), Some((CLASS_BASIC, BASIC_PUBLISH)));
        let (h, _) = split_frame(&out[used..], 1 << 20).unwrap().unwrap();
        assert_eq!(h.kind, FRAME_HEADER);
        assert_eq!(header_body_size(h.payload).unwrap(), 777);
    }

    #[test]
    fn large_body_is_split_and_small_body_unstamped() {
        let t = PublishTemplate::new(1, "", "q", 10_000, false, 4096).unwrap();
        let mut out = Vec::new();
        t.append(&mut out, 1, 2);
        let frames = parse_all(&out);
        let bodies: Vec<usize> = frames
            .iter()
            .filter_map(|f| match f {
                AMQPFrame::Body(_, b) => Some(b.len()),
                _ => None,
            })
            .collect();
        assert_eq!(bodies, vec![4088, 4088, 1824]);

        let small = PublishTemplate::new(1, "", "q", 4, false, 4096).unwrap();
        assert!(!small.stamped());
        let mut out = Vec::new();
        small.append(&mut out, 1, 2);
        assert_eq!(parse_all(&out).len(), 3);

        let empty = PublishTemplate::new(1, "", "q", 0, false, 4096).unwrap();
        let mut out = Vec::new();
        empty.append(&mut out, 1, 2);
        assert_eq!(parse_all(&out).len(), 2);
    }

    #[test]
    fn decode_method_rejects_garbage() {
        assert!(decode_method(&[0, 60, 0, 99]).is_err());
        let mut b = Vec::new();
        encode_method(
            &mut b,
            0,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 5,
                global: false,
            })),
        )
        .unwrap();
        let (f, _) = split_frame(&b, 1 << 20).unwrap().unwrap();
        assert!(matches!(
            decode_method(f.payload).unwrap(),
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: 5,
                ..
            }))
        ));
    }
}
