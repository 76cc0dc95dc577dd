//! Arbitrary bytes through the frame decoder (`tests/support/drive.rs`): never panics, never
//! reports more bytes used than it was given, every decoded frame re-encodes, and the read
//! path's decoder (`inbound.rs`) agrees with the full one.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the drivers
#[path = "../../tests/support/drive.rs"]
mod drive;

fuzz_target!(|data: &[u8]| {
    drive::frames(data);
});
