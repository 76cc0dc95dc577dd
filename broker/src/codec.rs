//! Pure AMQP frame codec over byte slices: no I/O, no async.
//!
//! [`decode`] returns `Ok(None)` while a frame is incomplete and checks the size in the frame
//! header against `frame_max` *before* anything is allocated or parsed, so a hostile length
//! cannot make the broker reserve memory. Field tables are checked for nesting
//! ([`crate::nesting`]) before amq-protocol's recursive parser sees them. The hot outbound
//! path (deliveries) is encoded by hand from pre-encoded pieces so that a fan-out does not
//! re-serialize message properties.

use crate::error::CodecError;
use amq_protocol::frame::{gen_frame, parse_frame, AMQPFrame, WriteContext};
use amq_protocol::protocol::basic::gen_properties;
use amq_protocol::protocol::{basic::AMQPProperties, constants};

/// Bytes of the AMQP 0-9-1 protocol header.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
/// Frame header (type, channel, size) plus frame-end octet.
pub const FRAME_OVERHEAD: usize = 8;

/// Result of looking at the first bytes of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderCheck {
    /// Fewer than 8 bytes so far.
    Incomplete,
    /// `AMQP 0 0 9 1`.
    Ok,
    /// Anything else: reply with our header and close.
    Mismatch,
}

/// Checks the 8-byte protocol header.
pub fn check_protocol_header(buf: &[u8]) -> HeaderCheck {
    if buf.len() < 8 {
        // Fail early on obvious garbage so a client that sends 3 bytes and waits gets an answer.
        if PROTOCOL_HEADER.starts_with(buf) {
            HeaderCheck::Incomplete
        } else {
            HeaderCheck::Mismatch
        }
    } else if &buf[..8] == PROTOCOL_HEADER {
        HeaderCheck::Ok
    } else {
        HeaderCheck::Mismatch
    }
}

/// Checks the frame at the start of `buf` from its 7-byte header and its end octet, without
/// parsing it: returns its type and its length (header and end octet included), `Ok(None)`
/// while incomplete. The size is checked against `frame_max` before anything is allocated.
pub fn frame_extent(buf: &[u8], frame_max: u32) -> Result<Option<(u8, usize)>, CodecError> {
    let Some(&frame_type) = buf.first() else {
        return Ok(None);
    };
    match frame_type {
        constants::FRAME_METHOD
        | constants::FRAME_HEADER
        | constants::FRAME_BODY
        | constants::FRAME_HEARTBEAT => {}
        other => return Err(CodecError::UnknownFrameType(other)),
    }
    if buf.len() < 7 {
        return Ok(None);
    }
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as u64;
    let total = size + FRAME_OVERHEAD as u64;
    if frame_max != 0 && total > frame_max as u64 {
        return Err(CodecError::TooLarge {
            size: total,
            max: frame_max,
        });
    }
    let total = total as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let end = buf[total - 1];
    if end != constants::FRAME_END {
        return Err(CodecError::BadFrameEnd(end));
    }
    Ok(Some((frame_type, total)))
}

/// Decodes one frame from the start of `buf`.
///
/// Returns the frame and the number of bytes it used, `Ok(None)` if more bytes are needed.
pub fn decode(buf: &[u8], frame_max: u32) -> Result<Option<(AMQPFrame, usize)>, CodecError> {
    let Some((frame_type, total)) = frame_extent(buf, frame_max)? else {
        return Ok(None);
    };
    let size = total - FRAME_OVERHEAD;
    let raw = &buf[..total];
    if frame_type == constants::FRAME_BODY {
        let channel = u16::from_be_bytes([buf[1], buf[2]]);
        return Ok(Some((
            AMQPFrame::Body(channel, raw[7..total - 1].to_vec()),
            total,
        )));
    }
    if frame_type == constants::FRAME_METHOD && size >= 8 && raw[7..11] == [0, 60, 0, 10] {
        // basic.qos: amq-protocol drops prefetch_size, RabbitMQ refuses non-zero values.
        let prefetch_size = u32::from_be_bytes([raw[11], raw[12], raw[13], raw[14]]);
        if prefetch_size != 0 {
            return Err(CodecError::PrefetchSize(prefetch_size));
        }
    }
    if frame_type != constants::FRAME_HEARTBEAT
        && crate::nesting::frame_too_deep(frame_type, &raw[7..total - 1])
    {
        let (class_id, method_id) = if frame_type == constants::FRAME_METHOD {
            (
                u16::from_be_bytes([raw[7], raw[8]]),
                u16::from_be_bytes([raw[9], raw[10]]),
            )
        } else {
            (60, 40) // a content header belongs to basic.publish
        };
        return Err(CodecError::TooDeep {
            channel: u16::from_be_bytes([buf[1], buf[2]]),
            class_id,
            method_id,
            len: total,
        });
    }
    match parse_frame(raw) {
        Ok(([], frame)) => Ok(Some((frame, total))),
        _ => Err(CodecError::Malformed(match frame_type {
            constants::FRAME_METHOD => "method",
            constants::FRAME_HEADER => "content header",
            _ => "heartbeat",
        })),
    }
}

/// Appends one frame to `out`.
pub fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let buf = std::mem::take(out);
    match gen_frame(frame)(WriteContext::from(buf)) {
        Ok(ctx) => {
            *out = ctx.into_inner().0;
            Ok(())
        }
        Err(_) => Err(CodecError::Encode),
    }
}

/// Pre-encodes a content header payload (class, weight, body size, properties) once per
/// message, so deliveries only add the 7-byte frame header and the end octet.
pub fn encode_content_header_payload(
    body_size: u64,
    properties: &AMQPProperties,
) -> Result<Vec<u8>, CodecError> {
    let mut out = Vec::with_capacity(48);
    out.extend_from_slice(&60u16.to_be_bytes()); // class basic
    out.extend_from_slice(&0u16.to_be_bytes()); // weight
    out.extend_from_slice(&body_size.to_be_bytes());
    match gen_properties(properties)(WriteContext::from(out)) {
        Ok(ctx) => Ok(ctx.into_inner().0),
        Err(_) => Err(CodecError::Encode),
    }
}

/// Property flags of the basic class in a content header (AMQP 0-9-1), first property highest.
pub mod prop {
    pub const CONTENT_TYPE: u16 = 1 << 15;
    pub const CONTENT_ENCODING: u16 = 1 << 14;
    pub const HEADERS: u16 = 1 << 13;
    pub const DELIVERY_MODE: u16 = 1 << 12;
    pub const PRIORITY: u16 = 1 << 11;
    pub const CORRELATION_ID: u16 = 1 << 10;
    pub const REPLY_TO: u16 = 1 << 9;
    pub const EXPIRATION: u16 = 1 << 8;
    pub const MESSAGE_ID: u16 = 1 << 7;
    pub const TIMESTAMP: u16 = 1 << 6;
    pub const TYPE: u16 = 1 << 5;
    pub const USER_ID: u16 = 1 << 4;
    pub const APP_ID: u16 = 1 << 3;
    pub const CLUSTER_ID: u16 = 1 << 2;
}

/// Walks the properties of a content header payload (class, weight, size, flags, values) in
/// place: calls `f(flag, value)` for each present property, in order, where `value` is a
/// short string's bytes, the headers table's bytes (its length prefix included), one octet or
/// the timestamp's eight bytes; stops early when `f` returns true. Returns where the walk
/// stopped, or None when the payload is malformed (too short, a value beyond the end, a flag
/// the basic class does not have).
pub(crate) fn walk_properties<'a>(
    payload: &'a [u8],
    mut f: impl FnMut(u16, &'a [u8]) -> bool,
) -> Option<usize> {
    let flags = u16::from_be_bytes(payload.get(12..14)?.try_into().ok()?);
    if flags & 0b11 != 0 {
        return None;
    }
    let mut pos = 14usize;
    for bit in (2..16).rev() {
        let flag = 1u16 << bit;
        if flags & flag == 0 {
            continue;
        }
        let (start, end) = match flag {
            prop::HEADERS => {
                let n = u32::from_be_bytes(payload.get(pos..pos + 4)?.try_into().ok()?);
                (pos, pos.checked_add(4)?.checked_add(n as usize)?)
            }
            prop::DELIVERY_MODE | prop::PRIORITY => (pos, pos + 1),
            prop::TIMESTAMP => (pos, pos + 8),
            _ => {
                let n = usize::from(*payload.get(pos)?);
                (pos + 1, pos + 1 + n)
            }
        };
        let value = payload.get(start..end)?;
        pos = end;
        if f(flag, value) {
            return Some(pos);
        }
    }
    Some(pos)
}

/// One property's value read in place from a content header payload (see
/// [`walk_properties`] for what the bytes are); None when absent or malformed.
pub fn header_property(payload: &[u8], flag: u16) -> Option<&[u8]> {
    let mut found = None;
    walk_properties(payload, |f, v| {
        if f == flag {
            found = Some(v);
        }
        f <= flag
    })?;
    found
}

/// Checks a content header payload received from elsewhere (a record, a page file, another
/// node): class basic, weight 0, `body_len` as its body size, and properties that decode and
/// fill it exactly.
pub fn check_content_header_payload(payload: &[u8], body_len: u64) -> Result<(), CodecError> {
    let bad = CodecError::Malformed("content header");
    if payload.get(..4) != Some(&[0, 60, 0, 0][..]) {
        return Err(bad);
    }
    let size = payload
        .get(4..12)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(u64::from_be_bytes);
    if size != Some(body_len) {
        return Err(bad);
    }
    if walk_properties(payload, |_, _| false) != Some(payload.len()) {
        return Err(bad);
    }
    if header_property(payload, prop::HEADERS).is_some() {
        // The table's contents (nesting checked first, as for a frame).
        if crate::nesting::frame_too_deep(constants::FRAME_HEADER, payload) {
            return Err(bad);
        }
        match amq_protocol::protocol::basic::parse_properties(&payload[12..]) {
            Ok(([], _)) => {}
            _ => return Err(bad),
        }
    }
    Ok(())
}

fn put_frame_header(out: &mut Vec<u8>, kind: u8, channel: u16, size: usize) {
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    out.extend_from_slice(&(size as u32).to_be_bytes());
}

fn put_short_str(out: &mut Vec<u8>, s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&b[..n]);
}

fn short_len(s: &str) -> usize {
    1 + s.len().min(255)
}

/// Appends a content header frame from a pre-encoded payload.
pub fn encode_content_header(out: &mut Vec<u8>, channel: u16, payload: &[u8]) {
    put_frame_header(out, constants::FRAME_HEADER, channel, payload.len());
    out.extend_from_slice(payload);
    out.push(constants::FRAME_END);
}

/// Appends the body as frames of at most `frame_max` bytes each.
pub fn encode_body(out: &mut Vec<u8>, channel: u16, body: &[u8], frame_max: u32) {
    let max_chunk = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for chunk in body.chunks(max_chunk) {
        put_frame_header(out, constants::FRAME_BODY, channel, chunk.len());
        out.extend_from_slice(chunk);
        out.push(constants::FRAME_END);
    }
}

/// Appends a basic.deliver method frame without building an `AMQPFrame`.
pub fn encode_deliver(
    out: &mut Vec<u8>,
    channel: u16,
    consumer_tag: &str,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &str,
    routing_key: &str,
) {
    let size = 4 + short_len(consumer_tag) + 8 + 1 + short_len(exchange) + short_len(routing_key);
    put_frame_header(out, constants::FRAME_METHOD, channel, size);
    out.extend_from_slice(&[0, 60, 0, 60]);
    put_short_str(out, consumer_tag);
    out.extend_from_slice(&delivery_tag.to_be_bytes());
    out.push(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.push(constants::FRAME_END);
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::AMQPContentHeader;
    use amq_protocol::protocol::{basic, AMQPClass};

    fn roundtrip(frame: AMQPFrame) {
        let mut out = Vec::new();
        encode(&frame, &mut out).expect("encode");
        let (decoded, used) = decode(&out, 131072).expect("decode").expect("complete");
        assert_eq!(used, out.len());
        assert_eq!(decoded, frame);
        for cut in 0..out.len() {
            assert_eq!(decode(&out[..cut], 131072), Ok(None), "truncated at {cut}");
        }
    }

    #[test]
    fn roundtrips_and_truncations() {
        roundtrip(AMQPFrame::Heartbeat);
        roundtrip(AMQPFrame::Body(3, b"hello".to_vec()));
        roundtrip(AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 7,
                multiple: true,
            })),
        ));
    }

    #[test]
    fn oversized_frame_rejected_from_header_alone() {
        let header = [1u8, 0, 1, 0x7f, 0xff, 0xff, 0xff];
        assert!(matches!(
            decode(&header, 131072),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn deliver_is_byte_exact() {
        let mut manual = Vec::new();
        encode_deliver(&mut manual, 5, "ctag", 42, true, "ex", "rk");
        let frame = AMQPFrame::Method(
            5,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: 42,
                redelivered: true,
                exchange: "ex".into(),
                routing_key: "rk".into(),
            })),
        );
        let mut generated = Vec::new();
        encode(&frame, &mut generated).expect("encode");
        assert_eq!(manual, generated);
    }

    #[test]
    fn content_header_is_byte_exact() {
        let props = AMQPProperties::default().with_delivery_mode(2);
        let payload = encode_content_header_payload(10, &props).expect("payload");
        let mut manual = Vec::new();
        encode_content_header(&mut manual, 9, &payload);
        let mut generated = Vec::new();
        encode(
            &AMQPFrame::Header(
                9,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 10,
                    properties: props,
                },
            ),
            &mut generated,
        )
        .expect("encode");
        assert_eq!(manual, generated);
    }

    #[test]
    fn body_is_split_at_frame_max() {
        let mut out = Vec::new();
        encode_body(&mut out, 1, &[7u8; 10], 8 + 4);
        let mut off = 0;
        let mut total = 0;
        while off < out.len() {
            let (f, n) = decode(&out[off..], 12).expect("ok").expect("complete");
            if let AMQPFrame::Body(_, b) = f {
                assert!(b.len() <= 4);
                total += b.len();
            }
            off += n;
        }
        assert_eq!(total, 10);
    }

    #[test]
    fn properties_are_read_in_place() {
        let mut h = amq_protocol::types::FieldTable::default();
        h.insert("k".into(), amq_protocol::types::AMQPValue::Boolean(true));
        let props = AMQPProperties::default()
            .with_content_type("ct".into())
            .with_headers(h)
            .with_delivery_mode(2)
            .with_priority(5)
            .with_expiration("60000".into())
            .with_timestamp(7)
            .with_app_id("app".into());
        let p = encode_content_header_payload(3, &props).expect("payload");
        assert_eq!(header_property(&p, prop::CONTENT_TYPE), Some(&b"ct"[..]));
        assert_eq!(header_property(&p, prop::DELIVERY_MODE), Some(&[2u8][..]));
        assert_eq!(header_property(&p, prop::PRIORITY), Some(&[5u8][..]));
        assert_eq!(header_property(&p, prop::EXPIRATION), Some(&b"60000"[..]));
        assert_eq!(
            header_property(&p, prop::TIMESTAMP),
            Some(&7u64.to_be_bytes()[..])
        );
        assert_eq!(header_property(&p, prop::APP_ID), Some(&b"app"[..]));
        assert!(header_property(&p, prop::HEADERS).is_some_and(|t| t.len() > 4));
        for absent in [prop::REPLY_TO, prop::USER_ID, prop::CLUSTER_ID, prop::TYPE] {
            assert_eq!(header_property(&p, absent), None);
        }
        assert!(check_content_header_payload(&p, 3).is_ok());
        // Truncated: never a value read past the end, and always refused.
        for cut in 0..p.len() {
            let _ = header_property(&p[..cut], prop::APP_ID);
            assert!(
                check_content_header_payload(&p[..cut], 3).is_err(),
                "cut {cut}"
            );
        }
        let none = encode_content_header_payload(0, &AMQPProperties::default()).expect("payload");
        assert_eq!(none.len(), 14);
        assert_eq!(header_property(&none, prop::PRIORITY), None);
    }

    #[test]
    fn protocol_header_checks() {
        assert_eq!(check_protocol_header(b"AMQ"), HeaderCheck::Incomplete);
        assert_eq!(check_protocol_header(b"GET / HT"), HeaderCheck::Mismatch);
        assert_eq!(check_protocol_header(PROTOCOL_HEADER), HeaderCheck::Ok);
        assert_eq!(
            check_protocol_header(b"AMQP\x01\x01\x00\x09"),
            HeaderCheck::Mismatch
        );
    }
}
