//! Arbitrary client bytes through codec + connection state machine, as the connection shell
//! feeds them (`tests/support/drive.rs`): never panics, whatever the nesting or the lengths.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // each target uses one of the drivers
#[path = "../../tests/support/drive.rs"]
mod drive;

fuzz_target!(|data: &[u8]| {
    drive::session(data);
});
