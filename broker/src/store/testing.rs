//! Helpers shared by the store's unit tests.

use super::record::{self, Enqueue, Record};
use super::state::State;
use super::StoreEvent;
use crate::queue::{ConfirmTicket, Message};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

pub(super) fn state(segment_bytes: u64) -> State {
    State::new(1, BTreeMap::new(), segment_bytes)
}

pub(super) fn enq<'a>(q: &'a str, id: u64, body: &'a [u8]) -> Record<'a> {
    Record::Enqueue(Enqueue {
        queue: q,
        id,
        redelivered: false,
        expires_at_ms: None,
        exchange: "",
        routing_key: "k",
        header: b"h",
        body,
    })
}

/// The bytes the writer would have put in segment `seg`.
pub(super) fn file(st: &State, seg: u64) -> Vec<u8> {
    let mut out = record::MAGIC.to_vec();
    for c in st.pending.iter().filter(|c| c.seg == seg) {
        out.extend_from_slice(&c.buf);
    }
    out
}

/// The enqueue record of `m` in queue "q" of vhost "/", encoded.
pub(super) fn enq_bytes(id: u64, m: &Message) -> Vec<u8> {
    let mut out = Vec::new();
    record::encode(
        &Record::Enqueue(Enqueue {
            queue: "/\0q",
            id,
            redelivered: false,
            expires_at_ms: None,
            exchange: "",
            routing_key: "q",
            header: m.header_payload(),
            body: m.body(),
        }),
        &mut out,
    );
    out
}

pub(super) fn persistent_msg(body: &[u8]) -> Message {
    let props = amq_protocol::protocol::basic::AMQPProperties::default().with_delivery_mode(2);
    Message::new(
        &crate::memory::UNIT_TESTS,
        "".into(),
        "q".into(),
        props,
        Bytes::copy_from_slice(body),
    )
    .expect("message")
}

pub(super) fn seg_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("read_dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

/// Waits for the store to report `n` enqueues of this queue synced.
pub(super) fn wait_synced(rx: &mut mpsc::UnboundedReceiver<StoreEvent>, n: u64) {
    loop {
        match rx.blocking_recv().expect("store events") {
            StoreEvent::Synced { up_to, .. } if up_to >= n => return,
            StoreEvent::Synced { .. } => {}
            other => panic!("unexpected store event {other:?}"),
        }
    }
}

pub(super) fn ticket(events: &crate::queue::ClientTx, seq: u64) -> ConfirmTicket {
    ConfirmTicket {
        events: events.clone(),
        conn_id: 1,
        channel: 1,
        generation: 0,
        seq,
    }
}

/// The confirms received so far, (seq, ok) in order.
pub(super) fn confirms(
    rx: &mut mpsc::UnboundedReceiver<crate::queue::ClientEvent>,
) -> Vec<(u64, bool)> {
    let mut v = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            crate::queue::ClientEvent::Confirm { seq, ok, .. } => v.push((seq, ok)),
            other => panic!("unexpected client event {other:?}"),
        }
    }
    v
}
