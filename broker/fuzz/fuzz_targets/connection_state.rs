//! Arbitrary bytes (after a valid protocol header) through codec + connection state machine:
//! never panics, and the machine always ends up able to report its state.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use std::time::Duration;
use warren_broker::auth::AuthDb;
use warren_broker::codec::{self, HeaderCheck};
use warren_broker::config::Config;
use warren_broker::connection::state::{ConnectionState, StateConfig};

fuzz_target!(|data: &[u8]| {
    let now = tokio::time::Instant::now();
    let mut st = ConnectionState::new(
        StateConfig {
            frame_max: 131072,
            channel_max: 16,
            heartbeat: 10,
            max_message_size: 1 << 20,
            auth: Arc::new(AuthDb::from_config(&Config::default())),
            peer_is_loopback: true,
            handshake_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            over_connection_limit: None,
        },
        now,
    );
    st.handle_protocol_header(HeaderCheck::Ok, now);
    let mut off = 0;
    while off < data.len() {
        match codec::decode(&data[off..], st.frame_max()) {
            Ok(Some((f, n))) => {
                off += n;
                st.handle_input(f, now);
                while st.poll_output().is_some() {}
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
    let _ = st.state();
});
