//! The fuzz targets' inputs, replayed on stable Rust in every test run: each file in
//! `broker/fuzz/seeds/` (written by `broker/fuzz/make_corpus.py`, the crash inputs of the
//! security review among them) and each crash cargo-fuzz left in `broker/fuzz/artifacts/`
//! goes through the frame decoder and through codec + connection state machine. The named
//! regression inputs must also end the way the protocol says.

mod support;

use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{channel, connection, AMQPClass};
use std::path::{Path, PathBuf};
use support::drive;

fn inputs() -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut files = Vec::new();
    for dir in [fuzz.join("seeds"), fuzz.join("artifacts")] {
        let mut stack = vec![dir];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else {
                continue;
            };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
    }
    files.sort();
    files
}

/// Reply code and text of the first connection.close or channel.close the broker sent.
fn first_close(sent: &[AMQPFrame]) -> Option<(u16, String)> {
    sent.iter().find_map(|f| match f {
        AMQPFrame::Method(0, AMQPClass::Connection(connection::AMQPMethod::Close(c))) => {
            Some((c.reply_code, c.reply_text.to_string()))
        }
        AMQPFrame::Method(_, AMQPClass::Channel(channel::AMQPMethod::Close(c))) => {
            Some((c.reply_code, c.reply_text.to_string()))
        }
        _ => None,
    })
}

#[test]
fn every_fuzz_input_replays_without_a_panic() {
    let files = inputs();
    assert!(files.len() >= 11, "seeds missing: {files:?}");
    for p in &files {
        let data = std::fs::read(p).expect("read input");
        let outcome = std::panic::catch_unwind(|| {
            drive::frames(&data);
            drive::session(&data)
        });
        assert!(outcome.is_ok(), "{} panicked", p.display());
    }
}

#[test]
fn the_review_crash_inputs_end_with_the_protocol_errors() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let run = |name: &str| drive::session(&std::fs::read(seeds.join(name)).expect(name));
    for (name, code) in [
        ("crash-start-ok-nested-1550", 502),
        ("crash-headers-nested-5000", 406),
        ("crash-queue-arguments-nested-126", 406),
        ("limit-headers-17", 406),
    ] {
        let (got, text) = first_close(&run(name)).unwrap_or_else(|| panic!("{name}: no close"));
        assert_eq!(got, code, "{name}: {text}");
        assert!(
            text.contains("nested deeper than 16 levels"),
            "{name}: {text}"
        );
    }
    assert_eq!(first_close(&run("limit-headers-16")), None);
    let (code, _) = first_close(&run("seed-unknown-field-tag")).expect("close");
    assert_eq!(code, 502, "an unknown field type is a syntax error");
}
