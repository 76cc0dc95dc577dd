//! Property tests: topic and headers matching against reference definitions, and random bytes
//! through the codec and the connection state machine (the stable-Rust stand-in for fuzzing).

use amq_protocol::types::{AMQPValue, FieldTable};
use proptest::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::auth::AuthDb;
use warren_broker::codec::{self, HeaderCheck};
use warren_broker::config::Config;
use warren_broker::connection::state::{ConnectionState, StateConfig};
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
        let now = tokio::time::Instant::now();
        let mut st = ConnectionState::new(StateConfig {
            frame_max: 131072,
            channel_max: 16,
            heartbeat: 10,
            max_message_size: 1 << 20,
            auth: Arc::new(AuthDb::from_config(&Config::default())),
            peer_is_loopback: true,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            over_connection_limit: None,
        }, now);
        let mut buf = Vec::new();
        if with_header || with_handshake {
            buf.extend_from_slice(codec::PROTOCOL_HEADER);
        }
        if with_handshake {
            buf.extend_from_slice(&handshake_bytes());
        }
        buf.extend_from_slice(&data);
        let mut off = 0;
        match codec::check_protocol_header(&buf) {
            HeaderCheck::Ok => {
                st.handle_protocol_header(HeaderCheck::Ok, now);
                off = 8;
            }
            other => st.handle_protocol_header(other, now),
        }
        while off < buf.len() {
            match codec::decode(&buf[off..], st.frame_max()) {
                Ok(Some((f, n))) => {
                    off += n;
                    st.handle_input(f, now);
                }
                Ok(None) => break,
                Err(e) => {
                    st.close_connection(e.into(), now);
                    break;
                }
            }
        }
        st.handle_timeout(now + Duration::from_secs(60));
        while st.poll_output().is_some() {}
    }
}
