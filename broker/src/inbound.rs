//! Frames as the broker's read path takes them: the publish path decoded by hand.
//!
//! [`decode`] accepts and refuses exactly what [`crate::codec::decode`] does (the same size,
//! end-octet, nesting and syntax checks, the same errors), but the two frames every message
//! brings are not handed to amq-protocol's parser:
//! - a basic.publish method is read in place (two short strings and a flag octet);
//! - a content header stays encoded ([`Inbound::Header`]): its properties are checked where
//!   they lie (every value inside the frame, short strings UTF-8, the headers table parsed
//!   only when there is one) and kept as the bytes deliveries send, so a message's properties
//!   are neither decoded into a struct nor encoded again on their way through the broker
//!   ([`crate::queue::Message`] keeps the same bytes).
//!
//! A body frame's payload is taken as it is, as the codec does; every other frame goes through
//! the full codec.

use crate::codec::{self, prop};
use crate::error::CodecError;
use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::basic::{self, AMQPProperties};
use amq_protocol::protocol::{constants, AMQPClass};

/// Class, weight and body size at the start of a content header payload, then the flags.
const FLAGS_AT: usize = 12;

/// One frame from a client. Kept small (about 120 bytes, not the 320 of amq-protocol's frame)
/// because it is moved a few times per frame: method, content header and body frames have
/// their own variants, the rare rest is boxed.
#[derive(Debug, PartialEq)]
pub enum Inbound {
    /// A method frame: its channel and its method.
    Method(u16, AMQPClass),
    /// A content header: its channel and its payload (class, weight, body size, property flags
    /// and values), checked; the weight and the flag bits that name no property are zero.
    Header(u16, Vec<u8>),
    /// A content body frame: its channel and its payload.
    Body(u16, Vec<u8>),
    /// Any other frame (heartbeat, protocol header, a header frame decoded in full).
    Other(Box<AMQPFrame>),
}

impl Inbound {
    /// A frame decoded by the full codec, in the variant the read path gives it.
    pub fn from_frame(frame: AMQPFrame) -> Inbound {
        match frame {
            AMQPFrame::Method(ch, m) => Inbound::Method(ch, m),
            AMQPFrame::Body(ch, b) => Inbound::Body(ch, b),
            other => Inbound::Other(Box::new(other)),
        }
    }

    /// The frame decoded in full (for the paths that want amq-protocol's types).
    pub fn into_frame(self) -> AMQPFrame {
        match self {
            Inbound::Method(ch, m) => AMQPFrame::Method(ch, m),
            Inbound::Body(ch, b) => AMQPFrame::Body(ch, b),
            Inbound::Other(f) => *f,
            Inbound::Header(ch, payload) => {
                let class_id = class_id(&payload);
                let body_size = body_size(&payload);
                let properties = payload
                    .get(FLAGS_AT..)
                    .and_then(|p| basic::parse_properties(p).ok())
                    .map(|(_, p)| p)
                    .unwrap_or_default();
                AMQPFrame::Header(
                    ch,
                    AMQPContentHeader {
                        class_id,
                        body_size,
                        properties,
                    },
                )
            }
        }
    }
}

/// Decodes one frame from the start of `buf`: the frame and the bytes it used, `Ok(None)` if
/// more bytes are needed.
pub fn decode(buf: &[u8], frame_max: u32) -> Result<Option<(Inbound, usize)>, CodecError> {
    let Some((kind, total)) = codec::frame_extent(buf, frame_max)? else {
        return Ok(None);
    };
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let payload = &buf[7..total - 1];
    match kind {
        constants::FRAME_HEADER => header(channel, payload, total).map(|h| Some((h, total))),
        constants::FRAME_METHOD if payload.starts_with(&[0, 60, 0, 40]) => {
            let p = publish(&payload[4..]).ok_or(CodecError::Malformed("method"))?;
            let m = AMQPClass::Basic(basic::AMQPMethod::Publish(p));
            Ok(Some((Inbound::Method(channel, m), total)))
        }
        constants::FRAME_BODY => Ok(Some((Inbound::Body(channel, payload.to_vec()), total))),
        _ => Ok(codec::decode(buf, frame_max)?.map(|(f, n)| (Inbound::from_frame(f), n))),
    }
}

/// The arguments of basic.publish: reserved short, exchange, routing key, flags, nothing more.
fn publish(args: &[u8]) -> Option<basic::Publish> {
    let mut at = 2;
    let exchange = short_str(args, &mut at)?;
    let routing_key = short_str(args, &mut at)?;
    let bits = *args.get(at)?;
    if at + 1 != args.len() {
        return None;
    }
    Some(basic::Publish {
        exchange: exchange.into(),
        routing_key: routing_key.into(),
        mandatory: bits & 1 != 0,
        immediate: bits & 2 != 0,
    })
}

fn short_str<'a>(b: &'a [u8], at: &mut usize) -> Option<&'a str> {
    let n = usize::from(*b.get(*at)?);
    let s = b.get(*at + 1..*at + 1 + n)?;
    *at += 1 + n;
    std::str::from_utf8(s).ok()
}

/// Checks a content header payload as the full codec would and keeps it encoded.
fn header(channel: u16, payload: &[u8], len: usize) -> Result<Inbound, CodecError> {
    let bad = CodecError::Malformed("content header");
    let Some(flags) = payload.get(FLAGS_AT..FLAGS_AT + 2) else {
        return Err(bad);
    };
    let has_headers = u16::from_be_bytes([flags[0], flags[1]]) & prop::HEADERS != 0;
    if has_headers && crate::nesting::frame_too_deep(constants::FRAME_HEADER, payload) {
        return Err(CodecError::TooDeep {
            channel,
            class_id: 60,
            method_id: 40,
            len,
        });
    }
    let mut out = payload.to_vec();
    // The weight is unused (always 0 by the spec) and the two lowest flag bits name no
    // property; the full codec ignored both, so deliveries carry zeros.
    out[2..4].fill(0);
    out[FLAGS_AT + 1] &= !0b11;
    let mut text = true;
    let end = codec::walk_properties(&out, |flag, v| {
        if !matches!(
            flag,
            prop::HEADERS | prop::DELIVERY_MODE | prop::PRIORITY | prop::TIMESTAMP
        ) {
            text &= std::str::from_utf8(v).is_ok();
        }
        false
    });
    if end != Some(out.len()) || !text {
        return Err(bad);
    }
    if has_headers {
        // The table's contents: what it holds is checked by the full parser.
        match basic::parse_properties(&out[FLAGS_AT..]) {
            Ok(([], _)) => {}
            _ => return Err(bad),
        }
    }
    Ok(Inbound::Header(channel, out))
}

/// The payload of a decoded content header (class, weight 0, body size, properties).
pub fn header_payload(h: &AMQPContentHeader) -> Result<Vec<u8>, CodecError> {
    let mut out = codec::encode_content_header_payload(h.body_size, &h.properties)?;
    out[..2].copy_from_slice(&h.class_id.to_be_bytes());
    Ok(out)
}

/// A content header payload with `properties` in place of the ones it has (the rare paths
/// that change a property of a publish, such as direct reply-to).
pub fn with_properties(payload: &[u8], properties: &AMQPProperties) -> Result<Vec<u8>, CodecError> {
    codec::encode_content_header_payload(body_size(payload), properties)
}

/// The class a content header payload names.
pub fn class_id(payload: &[u8]) -> u16 {
    payload
        .get(..2)
        .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]))
}

/// The body size a content header payload announces.
pub fn body_size(payload: &[u8]) -> u64 {
    payload
        .get(4..FLAGS_AT)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

#[cfg(test)]
#[path = "inbound_tests.rs"]
mod tests;
