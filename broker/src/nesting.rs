//! Bounds on nested field tables and arrays, checked before anything recursive touches them.
//!
//! AMQP field tables may hold tables and arrays, and amq-protocol's parser (like every
//! conversion of a table to JSON, every comparison, every clone) recurses once per level. A
//! frame of 11 KB can nest a table 1,500 levels deep, enough to overflow a runtime thread's
//! stack and abort the whole process. So nesting is bounded where input enters:
//!
//! - [`frame_too_deep`] walks the raw bytes of a method or content-header frame *before* it is
//!   parsed, with recursion bounded by [`MAX_DEPTH`] (not by the input), and says whether a
//!   table in it nests deeper than [`MAX_DEPTH`] levels. The caller refuses such a frame with
//!   RabbitMQ's codes (see `connection/mod.rs`).
//! - [`json_too_deep`] does the same for JSON given over HTTP (arguments, headers, policy
//!   definitions), so that everything accepted can be written to and read back from
//!   `definitions.json` (serde_json refuses documents nested deeper than 128 levels).
//!
//! Depth counts containers: a flat table is depth 1, a table holding an array is depth 2.
//! RabbitMQ's own deepest structure, `x-death` (headers -> array -> table -> array), is 4.

use serde_json::Value;

/// The most levels of tables and arrays a value may nest (the spec's limit).
pub const MAX_DEPTH: usize = 16;

/// The first method of each class whose arguments hold a field table, and how to reach it.
#[derive(Clone, Copy)]
enum Field {
    /// A short string: one length octet, then the bytes.
    Short,
    /// A fixed number of octets (reserved shorts, bit fields, version octets).
    Octets(usize),
    /// The field table to check.
    Table,
}

use Field::{Octets, Short, Table};

/// The fields in front of (and including) the table of every method that carries one, in the
/// order of the AMQP 0-9-1 grammar. Methods not listed carry no table.
fn method_layout(class_id: u16, method_id: u16) -> Option<&'static [Field]> {
    Some(match (class_id, method_id) {
        (10, 10) => &[Octets(2), Table], // connection.start
        (10, 11) => &[Table],            // connection.start-ok
        (40, 10) => &[Octets(2), Short, Short, Octets(1), Table], // exchange.declare
        (40, 30) | (40, 40) => &[Octets(2), Short, Short, Short, Octets(1), Table], // exchange.(un)bind
        (50, 10) => &[Octets(2), Short, Octets(1), Table],                          // queue.declare
        (50, 20) => &[Octets(2), Short, Short, Short, Octets(1), Table],            // queue.bind
        (50, 50) => &[Octets(2), Short, Short, Short, Table],                       // queue.unbind
        (60, 20) => &[Octets(2), Short, Short, Octets(1), Table],                   // basic.consume
        _ => return None,
    })
}

/// Whether the payload of a method frame (class id, method id, arguments) or of a content
/// header frame (class id, weight, body size, property flags, properties) holds a table nested
/// deeper than [`MAX_DEPTH`]. Truncated or otherwise malformed input answers `false`: the parser
/// reports it.
pub fn frame_too_deep(frame_type: u8, payload: &[u8]) -> bool {
    let mut r = Reader(payload);
    match frame_type {
        amq_protocol::protocol::constants::FRAME_METHOD => {
            let (Some(class_id), Some(method_id)) = (r.u16(), r.u16()) else {
                return false;
            };
            let Some(layout) = method_layout(class_id, method_id) else {
                return false;
            };
            for field in layout {
                let skipped = match field {
                    Short => r.u8().and_then(|n| r.take(n.into())),
                    Octets(n) => r.take(*n),
                    Table => return table_too_deep(&mut r, 1) == Some(true),
                };
                if skipped.is_none() {
                    return false;
                }
            }
            false
        }
        amq_protocol::protocol::constants::FRAME_HEADER => {
            // class id, weight, body size; then flags: bit 15 content-type, bit 14
            // content-encoding (short strings), bit 13 headers (the table).
            let Some(flags) = r.take(12).and_then(|_| r.u16()) else {
                return false;
            };
            for bit in [15, 14] {
                if flags & (1 << bit) != 0 && r.u8().and_then(|n| r.take(n.into())).is_none() {
                    return false;
                }
            }
            flags & (1 << 13) != 0 && table_too_deep(&mut r, 1) == Some(true)
        }
        _ => false,
    }
}

/// A cursor over wire bytes; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Walks a field table at `depth` (1 for a top-level table). `Some(true)`: too deep;
/// `Some(false)`: within bounds; `None`: malformed (left to the parser). Recursion stops at
/// `MAX_DEPTH + 1` levels whatever the input.
fn table_too_deep(r: &mut Reader<'_>, depth: usize) -> Option<bool> {
    if depth > MAX_DEPTH {
        return Some(true);
    }
    let len = r.u32()? as usize;
    let mut inner = Reader(r.take(len)?);
    while !inner.0.is_empty() {
        let key_len = inner.u8()?;
        inner.take(key_len.into())?;
        if value_too_deep(&mut inner, depth)? {
            return Some(true);
        }
    }
    Some(false)
}

/// An array's values, at `depth` (the array's own level).
fn array_too_deep(r: &mut Reader<'_>, depth: usize) -> Option<bool> {
    if depth > MAX_DEPTH {
        return Some(true);
    }
    let len = r.u32()? as usize;
    let mut inner = Reader(r.take(len)?);
    while !inner.0.is_empty() {
        if value_too_deep(&mut inner, depth)? {
            return Some(true);
        }
    }
    Some(false)
}

/// One tagged value inside a container at `depth`. Tags as amq-protocol reads them.
fn value_too_deep(r: &mut Reader<'_>, depth: usize) -> Option<bool> {
    let fixed = match r.u8()? {
        b't' | b'b' | b'B' => 1,
        b's' | b'U' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'L' | b'l' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' => {
            let n = r.u32()? as usize;
            r.take(n)?;
            return Some(false);
        }
        b'F' => return table_too_deep(r, depth + 1),
        b'A' => return array_too_deep(r, depth + 1),
        _ => return None,
    };
    r.take(fixed)?;
    Some(false)
}

/// Whether a JSON value nests objects and arrays deeper than [`MAX_DEPTH`] levels, counted as
/// for field tables (a flat object is 1).
pub fn json_too_deep(v: &Value) -> bool {
    json_exceeds(v, MAX_DEPTH)
}

/// Whether a JSON value nests objects and arrays deeper than `limit` levels. Stops looking at
/// `limit + 1` levels, so the recursion is bounded by `limit`, not by the input.
pub fn json_exceeds(v: &Value, limit: usize) -> bool {
    fn walk(v: &Value, depth: usize, limit: usize) -> bool {
        match v {
            Value::Object(m) => depth >= limit || m.values().any(|x| walk(x, depth + 1, limit)),
            Value::Array(a) => depth >= limit || a.iter().any(|x| walk(x, depth + 1, limit)),
            _ => false,
        }
    }
    walk(v, 0, limit)
}

/// [`json_too_deep`] for an object held as a map (arguments, a policy definition).
pub fn json_object_too_deep(m: &serde_json::Map<String, Value>) -> bool {
    m.values().any(|v| json_exceeds(v, MAX_DEPTH - 1))
}

/// The error text for a value nested too deep.
pub fn too_deep_text(what: &str) -> String {
    format!("{what} nested deeper than {MAX_DEPTH} levels")
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{gen_frame, AMQPContentHeader, AMQPFrame, WriteContext};
    use amq_protocol::protocol::basic::AMQPProperties;
    use amq_protocol::protocol::{basic, connection, exchange, queue, AMQPClass};
    use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};
    use serde_json::json;

    /// A table `levels` deep: tables inside tables, alternating with arrays when `arrays`.
    fn nested(levels: usize, arrays: bool) -> FieldTable {
        let mut t = FieldTable::default();
        t.insert("leaf".into(), AMQPValue::LongString("x".into()));
        let mut v = AMQPValue::FieldTable(t);
        for i in 1..levels {
            v = if arrays && i % 2 == 1 && i != levels - 1 {
                let mut a = FieldArray::default();
                a.push(v);
                AMQPValue::FieldArray(a)
            } else {
                let mut t = FieldTable::default();
                t.insert("k".into(), v);
                AMQPValue::FieldTable(t)
            };
        }
        let AMQPValue::FieldTable(t) = v else {
            unreachable!("the outermost level is a table")
        };
        t
    }

    fn payload(frame: &AMQPFrame) -> (u8, Vec<u8>) {
        let bytes = gen_frame(frame)(WriteContext::from(Vec::new()))
            .expect("encode")
            .into_inner()
            .0;
        (bytes[0], bytes[7..bytes.len() - 1].to_vec())
    }

    fn deep(frame: AMQPFrame) -> bool {
        let (t, p) = payload(&frame);
        frame_too_deep(t, &p)
    }

    fn depth_of(t: &FieldTable) -> usize {
        t.inner()
            .values()
            .map(|v| match v {
                AMQPValue::FieldTable(t) => depth_of(t),
                AMQPValue::FieldArray(a) => {
                    1 + a
                        .as_slice()
                        .iter()
                        .map(|v| match v {
                            AMQPValue::FieldTable(t) => depth_of(t),
                            _ => 0,
                        })
                        .max()
                        .unwrap_or(0)
                }
                _ => 0,
            })
            .max()
            .unwrap_or(0)
            + 1
    }

    fn every_method_with_a_table(args: FieldTable) -> Vec<AMQPFrame> {
        vec![
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
                    version_major: 0,
                    version_minor: 9,
                    server_properties: args.clone(),
                    mechanisms: "PLAIN".into(),
                    locales: "en_US".into(),
                })),
            ),
            AMQPFrame::Method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                    client_properties: args.clone(),
                    mechanism: "PLAIN".into(),
                    response: "\0guest\0guest".into(),
                    locale: "en_US".into(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                    exchange: "e".into(),
                    kind: "direct".into(),
                    passive: false,
                    durable: true,
                    auto_delete: false,
                    internal: false,
                    nowait: false,
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Bind(exchange::Bind {
                    destination: "d".into(),
                    source: "s".into(),
                    routing_key: "rk".into(),
                    nowait: false,
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Exchange(exchange::AMQPMethod::Unbind(exchange::Unbind {
                    destination: "d".into(),
                    source: "s".into(),
                    routing_key: "rk".into(),
                    nowait: true,
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                    queue: "q".into(),
                    passive: false,
                    durable: true,
                    exclusive: false,
                    auto_delete: false,
                    nowait: false,
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                    queue: "q".into(),
                    exchange: "x".into(),
                    routing_key: "rk".into(),
                    nowait: false,
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Queue(queue::AMQPMethod::Unbind(queue::Unbind {
                    queue: "q".into(),
                    exchange: "x".into(),
                    routing_key: "rk".into(),
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                    queue: "q".into(),
                    consumer_tag: "c".into(),
                    no_local: false,
                    no_ack: true,
                    exclusive: false,
                    nowait: false,
                    arguments: args.clone(),
                })),
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 3,
                    properties: AMQPProperties::default()
                        .with_content_type("text/plain".into())
                        .with_content_encoding("utf-8".into())
                        .with_headers(args.clone()),
                },
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: 3,
                    properties: AMQPProperties::default().with_headers(args),
                },
            ),
        ]
    }

    #[test]
    fn the_limit_is_exactly_max_depth_in_every_table_carrying_frame() {
        for arrays in [false, true] {
            let ok = nested(MAX_DEPTH, arrays);
            let bad = nested(MAX_DEPTH + 1, arrays);
            assert_eq!(depth_of(&ok), MAX_DEPTH, "arrays={arrays}");
            assert_eq!(depth_of(&bad), MAX_DEPTH + 1, "arrays={arrays}");
            for f in every_method_with_a_table(ok) {
                assert!(!deep(f.clone()), "{f:?} refused at the limit");
            }
            for f in every_method_with_a_table(bad) {
                assert!(deep(f.clone()), "{f:?} accepted beyond the limit");
            }
        }
    }

    #[test]
    fn a_crash_sized_nesting_is_refused_without_recursing_through_it() {
        // 100,000 levels: far beyond any stack if walked recursively. Built by hand, since
        // amq-protocol's own encoder would recurse. Each level: key "k", tag 'F', length.
        const LEVELS: u32 = 100_000;
        let mut body = Vec::new();
        for i in 0..LEVELS {
            body.extend_from_slice(b"\x01kF");
            body.extend_from_slice(&((LEVELS - i - 1) * 7).to_be_bytes());
        }
        let mut payload = vec![0, 10, 0, 11]; // connection.start-ok
        payload.extend_from_slice(&(body.len() as u32).to_be_bytes());
        payload.extend_from_slice(&body);
        assert!(frame_too_deep(
            amq_protocol::protocol::constants::FRAME_METHOD,
            &payload
        ));
    }

    #[test]
    fn frames_without_tables_and_garbage_are_left_to_the_parser() {
        assert!(!deep(AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Ack(basic::Ack {
                delivery_tag: 1,
                multiple: false
            }))
        )));
        for garbage in [&[][..], &[0, 10], &[0, 10, 0, 11, 0xff, 0xff, 0xff, 0xff]] {
            assert!(!frame_too_deep(1, garbage));
            assert!(!frame_too_deep(2, garbage));
        }
        // An unknown value tag inside: malformed, not "too deep".
        let mut p = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
        p.extend_from_slice(&4u32.to_be_bytes());
        p.extend_from_slice(b"\x01kZ\x00");
        assert!(!frame_too_deep(1, &p));
    }

    #[test]
    fn json_depth_counts_like_tables() {
        let mut v = json!("leaf");
        for _ in 0..MAX_DEPTH {
            v = json!({ "k": v });
        }
        assert!(!json_too_deep(&v));
        assert!(json_too_deep(&json!([v.clone()])));
        assert!(json_too_deep(&json!({ "a": v })));
        assert!(!json_too_deep(
            &json!({"x-death": [{"routing-keys": ["a"]}]})
        ));
    }
}
