//! Bytes from a client through the codec and the connection state machine the way the async
//! shell (`connection/mod.rs`) feeds them, without sockets. Shared by the property tests, the
//! fuzz corpus replay (`tests/fuzz_corpus.rs`) and the cargo-fuzz targets (`broker/fuzz`, which
//! `include!` this file), so the three exercise the same path.

use amq_protocol::frame::AMQPFrame;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::auth::AuthDb;
use warren_broker::codec::{self, HeaderCheck};
use warren_broker::config::Config;
use warren_broker::connection::state::{ConnectionState, Output, StateConfig};
use warren_broker::error::CodecError;
use warren_broker::inbound;

/// A state machine for a loopback client of a default broker (guest/guest on "/").
pub fn machine(now: tokio::time::Instant) -> ConnectionState {
    ConnectionState::new(
        StateConfig {
            frame_max: 131072,
            channel_max: 16,
            heartbeat: 10,
            max_message_size: 1 << 20,
            auth: Arc::new(AuthDb::from_config(&Config::default())),
            peer_is_loopback: true,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            server_properties: warren_broker::connection::state::server_properties(
                Default::default(),
                "warren@127.0.0.1",
            ),
            over_connection_limit: None,
            vhost_connection_limit: None,
        },
        now,
    )
}

/// Feeds `data` (starting with the protocol header or not) as one client stream, then lets
/// a minute pass. Returns the frames the broker would send. Never panics on any input: a
/// panic is the bug this looks for.
pub fn session(data: &[u8]) -> Vec<AMQPFrame> {
    let now = tokio::time::Instant::now();
    let mut st = machine(now);
    let mut sent = Vec::new();
    let mut drain = |st: &mut ConnectionState| {
        while let Some(o) = st.poll_output() {
            if let Output::Frame(f) = o {
                sent.push(f);
            }
        }
    };
    let check = codec::check_protocol_header(data);
    st.handle_protocol_header(check, now);
    let mut off = if check == HeaderCheck::Ok {
        8
    } else {
        data.len()
    };
    while off < data.len() {
        match inbound::decode(&data[off..], st.frame_max()) {
            Ok(Some((f, n))) => {
                off += n;
                st.handle_inbound(f, now);
            }
            Ok(None) => break,
            Err(CodecError::TooDeep {
                channel,
                class_id,
                method_id,
                len,
            }) => {
                off += len;
                st.handle_too_deep(channel, class_id, method_id, now);
            }
            Err(e) => {
                st.close_connection(e.into(), now);
                break;
            }
        }
        drain(&mut st);
    }
    st.handle_timeout(now + Duration::from_secs(60));
    drain(&mut st);
    let _ = st.state();
    sent
}

/// Decodes `data` frame by frame: never reports more bytes than it was given, every decoded
/// frame encodes again, and the read path's decoder ([`inbound::decode`]) gives the same
/// frames, lengths and errors as the full codec.
pub fn frames(data: &[u8]) {
    let mut off = 0;
    while off < data.len() {
        let full = codec::decode(&data[off..], 131072);
        let fast =
            inbound::decode(&data[off..], 131072).map(|r| r.map(|(f, n)| (f.into_frame(), n)));
        // Compared as printed: a NaN in a table is not equal to itself.
        assert_eq!(
            format!("{fast:?}"),
            format!("{full:?}"),
            "read path and codec disagree at byte {off}"
        );
        match full {
            Ok(Some((frame, n))) => {
                assert!(
                    n > 0 && off + n <= data.len(),
                    "decode used {n} of {}",
                    data.len() - off
                );
                let mut out = Vec::new();
                let _ = codec::encode(&frame, &mut out);
                off += n;
            }
            Err(CodecError::TooDeep { len, .. }) => {
                assert!(len > 0 && off + len <= data.len());
                off += len;
            }
            Ok(None) | Err(_) => break,
        }
    }
}
