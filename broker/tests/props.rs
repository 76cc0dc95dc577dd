//! Property tests: topic and headers matching against reference definitions, and random bytes
//! through the codec and the connection state machine (the stable-Rust stand-in for fuzzing).

use amq_protocol::types::{AMQPValue, FieldTable};
use proptest::prelude::*;
use support::drive;

mod support;
use warren_broker::codec;
use warren_broker::exchange::headers::headers_match;
use warren_broker::exchange::topic::topic_matches;

/// Reference matcher: plain recursion over words (exponential, fine for small inputs).
fn reference(p: &[&str], k: &[&str]) -> bool {
    match p.split_first() {
        None => k.is_empty(),
        Some((&"#", rest)) => (0..=k.len()).any(|i| reference(rest, &k[i..])),
        Some((&"*", rest)) => !k.is_empty() && reference(rest, &k[1..]),
        Some((w, rest)) => k.first() == Some(w) && reference(rest, &k[1..]),
    }
}

fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        vec![]
    } else {
        s.split('.').collect()
    }
}

fn word() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("c".to_string())
    ]
}

fn pattern_word() -> impl Strategy<Value = String> {
    prop_oneof![word(), Just("*".to_string()), Just("#".to_string())]
}

/// start-ok, tune-ok, open and channel.open 1, so random bytes hit the open state.
fn handshake_bytes() -> Vec<u8> {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{channel, connection, AMQPClass};
    let frames = [
        AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
            client_properties: FieldTable::default(),
            mechanism: "PLAIN".into(),
            response: "\0guest\0guest".into(),
            locale: "en_US".into(),
        })),
        AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
            channel_max: 0,
            frame_max: 131072,
            heartbeat: 0,
        })),
        AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
            virtual_host: "/".into(),
        })),
    ];
    let mut out = Vec::new();
    for m in frames {
        codec::encode(&AMQPFrame::Method(0, m), &mut out).expect("encode");
    }
    codec::encode(
        &AMQPFrame::Method(
            1,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
        ),
        &mut out,
    )
    .expect("encode");
    out
}

fn leaf() -> impl Strategy<Value = AMQPValue> {
    prop_oneof![
        any::<i64>().prop_map(AMQPValue::LongLongInt),
        "[a-z]{0,300}".prop_map(|s| AMQPValue::LongString(s.into())),
        Just(AMQPValue::Void),
    ]
}

/// A field value nested 0 to 40 levels (most often around the limit of 16): a chain of tables
/// and arrays in random order, each level with a random leaf beside the deeper value.
fn nested_value() -> impl Strategy<Value = AMQPValue> {
    let depth = prop_oneof![2 => 14usize..19, 1 => 0usize..41];
    depth
        .prop_flat_map(|d| {
            (
                prop::collection::vec((any::<bool>(), "[a-z]{1,8}", leaf()), d),
                leaf(),
            )
        })
        .prop_map(|(levels, inner)| {
            let mut v = inner;
            for (array, key, sibling) in levels {
                v = if array {
                    let mut a = amq_protocol::types::FieldArray::default();
                    a.push(sibling);
                    a.push(v);
                    AMQPValue::FieldArray(a)
                } else {
                    let mut t = FieldTable::default();
                    t.insert("s".into(), sibling);
                    t.insert(format!("k{key}").into(), v);
                    AMQPValue::FieldTable(t)
                };
            }
            v
        })
}

/// Levels of tables and arrays in a value (a leaf is 0).
fn value_depth(v: &AMQPValue) -> usize {
    match v {
        AMQPValue::FieldTable(t) => 1 + t.inner().values().map(value_depth).max().unwrap_or(0),
        AMQPValue::FieldArray(a) => 1 + a.as_slice().iter().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// A client stream carrying `table` in the client properties (place 0), queue arguments (1)
/// or message headers (2, with a body of `body_len` bytes).
fn hostile_stream(place: u8, table: FieldTable, body_len: usize) -> Vec<u8> {
    use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
    use amq_protocol::protocol::{basic, connection, queue, AMQPClass};
    let mut out = codec::PROTOCOL_HEADER.to_vec();
    if place == 0 {
        let start_ok =
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: table,
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            }));
        codec::encode(&AMQPFrame::Method(0, start_ok), &mut out).expect("encode");
        return out;
    }
    out.extend_from_slice(&handshake_bytes());
    let frames = if place == 1 {
        vec![AMQPFrame::Method(
            1,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: "q".into(),
                passive: false,
                durable: false,
                exclusive: false,
                auto_delete: false,
                nowait: false,
                arguments: table,
            })),
        )]
    } else {
        let mut frames = vec![
            AMQPFrame::Method(
                1,
                AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                    exchange: "".into(),
                    routing_key: "q".into(),
                    mandatory: false,
                    immediate: false,
                })),
            ),
            AMQPFrame::Header(
                1,
                AMQPContentHeader {
                    class_id: 60,
                    body_size: body_len as u64,
                    properties: amq_protocol::protocol::basic::AMQPProperties::default()
                        .with_headers(table),
                },
            ),
        ];
        for chunk in vec![7u8; body_len].chunks(131_072 - 8) {
            frames.push(AMQPFrame::Body(1, chunk.to_vec()));
        }
        frames
    };
    for f in &frames {
        codec::encode(f, &mut out).expect("encode");
    }
    out
}

/// Reply code and text of the first connection.close or channel.close sent.
fn first_close(sent: &[amq_protocol::frame::AMQPFrame]) -> Option<(u16, String)> {
    use amq_protocol::frame::AMQPFrame;
    use amq_protocol::protocol::{channel, connection, AMQPClass};
    sent.iter().find_map(|f| match f {
        AMQPFrame::Method(_, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            Some((c.reply_code, c.reply_text.to_string()))
        }
        AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
            Some((c.reply_code, c.reply_text.to_string()))
        }
        _ => None,
    })
}

proptest! {
    #[test]
    fn topic_matches_reference(
        p in prop::collection::vec(pattern_word(), 0..6),
        k in prop::collection::vec(word(), 0..6),
    ) {
        let (p, k) = (p.join("."), k.join("."));
        prop_assert_eq!(topic_matches(&p, &k), reference(&words(&p), &words(&k)), "{} vs {}", p, k);
    }

    #[test]
    fn key_matches_itself_hash_and_stars(k in prop::collection::vec(word(), 1..6), i in 0usize..6) {
        let key = k.join(".");
        prop_assert!(topic_matches(&key, &key));
        prop_assert!(topic_matches("#", &key));
        let mut starred = k.clone();
        let i = i % starred.len();
        starred[i] = "*".into();
        prop_assert!(topic_matches(&starred.join("."), &key));
    }

    #[test]
    fn headers_all_subset_and_any_overlap(
        headers in prop::collection::btree_map("[a-d]", 0i32..3, 0..4),
        binding in prop::collection::btree_map("[a-d]", 0i32..3, 1..4),
    ) {
        let to_table = |m: &std::collections::BTreeMap<String, i32>| {
            let mut t = FieldTable::default();
            for (k, v) in m {
                t.insert(k.as_str().into(), AMQPValue::LongInt(*v));
            }
            t
        };
        let h = to_table(&headers);
        let mut all = to_table(&binding);
        all.insert("x-match".into(), AMQPValue::LongString("all".into()));
        let mut any = to_table(&binding);
        any.insert("x-match".into(), AMQPValue::LongString("any".into()));
        let subset = binding.iter().all(|(k, v)| headers.get(k) == Some(v));
        let overlap = binding.iter().any(|(k, v)| headers.get(k) == Some(v));
        prop_assert_eq!(headers_match(&all, Some(&h)), subset);
        prop_assert_eq!(headers_match(&any, Some(&h)), overlap);
    }

    #[test]
    fn random_bytes_never_panic_codec_or_state_machine(
        data in prop::collection::vec(any::<u8>(), 0..2048),
        with_header in any::<bool>(),
        with_handshake in any::<bool>(),
    ) {
        let mut buf = Vec::new();
        if with_header || with_handshake {
            buf.extend_from_slice(codec::PROTOCOL_HEADER);
        }
        if with_handshake {
            buf.extend_from_slice(&handshake_bytes());
        }
        buf.extend_from_slice(&data);
        drive::session(&buf);
        drive::frames(&data);
    }

    /// Well-formed frames with hostile structure: field tables nested up to 40 levels (tables
    /// and arrays), long strings, bodies around the frame size, in client properties, queue
    /// arguments and message headers. Within 16 levels nothing is refused for its nesting;
    /// beyond, the connection (login) or the channel (arguments, headers) is closed with the
    /// protocol's code, and never does anything panic.
    #[test]
    fn nested_tables_and_boundary_lengths_through_codec_and_state_machine(
        value in nested_value(),
        place in 0u8..3,
        body_len in prop_oneof![Just(0usize), Just(1), 131_064usize..131_080, 0usize..300],
    ) {
        let depth = 1 + value_depth(&value);
        let mut table = FieldTable::default();
        table.insert("k".into(), value);
        let stream = hostile_stream(place, table, body_len);
        let sent = drive::session(&stream);
        let too_deep = first_close(&sent).filter(|(_, text)| text.contains("nested deeper than 16"));
        if depth > warren_broker::nesting::MAX_DEPTH {
            let (code, text) = too_deep.clone().unwrap_or_else(|| panic!("depth {depth} accepted: {sent:?}"));
            prop_assert_eq!(code, if place == 0 { 502 } else { 406 }, "{}", text);
        } else {
            prop_assert!(too_deep.is_none(), "depth {} refused", depth);
        }
    }
}
