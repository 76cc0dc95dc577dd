//! The ready list of one queue: one FIFO per priority level, part of which may be paged out.
//!
//! Under memory pressure (see [`crate::paging`]) the queue actor calls [`Ready::page_out`]:
//! every ready message behind a small head window (per level, [`PagerLimits::head_count`]
//! messages or [`PagerLimits::head_bytes`] of bodies, whichever comes first) is written whole
//! (exchange, routing key, content header, body) to the queue's page segments as a store
//! record (`crate::store::record`), and its slot keeps only an index entry (id, redelivered
//! flag, expiry, body size and file location). The queue's `Arc<Message>` is dropped, so the
//! message memory goes once no other queue or delivery holds it.
//!
//! A paged message is read back when it reaches the head of its level: [`Ready::pop_front`]
//! (dispatch, basic.get), [`Ready::pop_oldest`] (drop-head) and [`Ready::pop_expired`] read
//! a contiguous run of the head with one read. Order, priorities, redelivered flags and expiry
//! deadlines are those of the index, so nothing behaves differently with paging.
//!
//! Segments are append-only, written in chunks (one write per chunk), never synced (page files
//! are not recovered), and each one is removed as soon as nothing live is left in it, so disk
//! use follows the live paged data. A failed write leaves the messages in memory and pauses
//! page-out for a second; a failed read drops the messages concerned (their ids go to
//! [`Ready::take_lost`]) and is logged as an error with the queue's name.
//!
//! The file I/O is behind [`PageIo`] (files in `crate::paging`, memory in the tests).

use super::Message;
use crate::memory::Memory;
use crate::store::record::{self, Enqueue, Record};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::error;

/// A ready message held in memory.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub msg: Arc<Message>,
    pub redelivered: bool,
    pub expires_at: Option<Instant>,
}

/// Where a paged message's record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub seg: u64,
    pub off: u64,
    pub len: u32,
}

/// The index entry of a paged-out message.
#[derive(Debug)]
struct Paged {
    id: u64,
    redelivered: bool,
    expires_at: Option<Instant>,
    body_len: u64,
    loc: Loc,
}

#[derive(Debug)]
enum Slot {
    Mem(Entry),
    Paged(Paged),
}

impl Slot {
    fn id(&self) -> u64 {
        match self {
            Slot::Mem(e) => e.id,
            Slot::Paged(p) => p.id,
        }
    }
    fn expires_at(&self) -> Option<Instant> {
        match self {
            Slot::Mem(e) => e.expires_at,
            Slot::Paged(p) => p.expires_at,
        }
    }
    fn body_len(&self) -> u64 {
        match self {
            Slot::Mem(e) => e.msg.body.len() as u64,
            Slot::Paged(p) => p.body_len,
        }
    }
    fn is_paged(&self) -> bool {
        matches!(self, Slot::Paged(_))
    }
}

/// Segment file I/O of one queue's pager (positional writes and reads, no sync).
pub trait PageIo: Send + std::fmt::Debug {
    /// Writes `buf` at `off` in segment `seg` (created if missing).
    fn write(&mut self, seg: u64, off: u64, buf: &[u8]) -> std::io::Result<()>;
    /// Reads exactly `len` bytes at `off` in segment `seg`.
    fn read(&mut self, seg: u64, off: u64, len: usize) -> std::io::Result<Vec<u8>>;
    /// Removes segment `seg` (nothing live is left in it).
    fn remove(&mut self, seg: u64);
}

/// Sizes of a pager (the defaults are the broker's; tests use small ones).
#[derive(Debug, Clone, Copy)]
pub struct PagerLimits {
    /// A new segment is started when the current one would grow beyond this.
    pub segment_bytes: u64,
    /// Messages kept in memory at the head of each level.
    pub head_count: usize,
    /// Body bytes kept in memory at the head of each level (at least one message).
    pub head_bytes: u64,
    /// Bytes per write when paging out.
    pub chunk_bytes: usize,
    /// Most bytes per read when paging in.
    pub run_bytes: u64,
}

impl Default for PagerLimits {
    fn default() -> Self {
        Self {
            segment_bytes: 4 << 20,
            head_count: 256,
            head_bytes: 1 << 20,
            chunk_bytes: 1 << 20,
            run_bytes: 1 << 20,
        }
    }
}

/// How long page-out pauses after a failed write.
const WRITE_RETRY: Duration = Duration::from_secs(1);

/// One queue's page segments: where to append, and how many live records each holds.
#[derive(Debug)]
pub struct Pager {
    io: Box<dyn PageIo>,
    /// For logs: `'name' in vhost 'v'`.
    label: Arc<str>,
    limits: PagerLimits,
    /// The node's memory account, charged for the messages read back.
    memory: &'static Memory,
    /// Live (still paged) records per segment.
    live: BTreeMap<u64, u64>,
    /// The segment being appended to and its size.
    cur: Option<(u64, u64)>,
    next_seg: u64,
    retry_at: Option<Instant>,
}

impl Pager {
    pub fn new(
        io: Box<dyn PageIo>,
        label: Arc<str>,
        limits: PagerLimits,
        memory: &'static Memory,
    ) -> Self {
        Self {
            io,
            label,
            limits,
            memory,
            live: BTreeMap::new(),
            cur: None,
            next_seg: 1,
            retry_at: None,
        }
    }

    /// Segments holding live paged messages.
    pub fn segments(&self) -> usize {
        self.live.len()
    }

    fn release(&mut self, loc: Loc) {
        let Some(n) = self.live.get_mut(&loc.seg) else {
            return;
        };
        *n -= 1;
        if *n == 0 {
            self.live.remove(&loc.seg);
            if self.cur.is_some_and(|(s, _)| s == loc.seg) {
                self.cur = None;
            }
            self.io.remove(loc.seg);
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        let segs: Vec<u64> = self.live.keys().copied().collect();
        for s in segs {
            self.io.remove(s);
        }
    }
}

/// A message taken off the ready list; `msg` is None when it was paged and not read back
/// (the caller did not need it: dropped without dead-lettering).
#[derive(Debug)]
pub struct Popped {
    pub id: u64,
    pub msg: Option<Arc<Message>>,
}

/// Ready messages, one FIFO per priority level (one level for non-priority queues).
#[derive(Debug)]
pub struct Ready {
    levels: Vec<VecDeque<Slot>>,
    /// Paged slots per level.
    paged: Vec<usize>,
    /// Ready messages (in memory and paged).
    pub len: usize,
    /// Their body bytes.
    pub bytes: u64,
    /// Paged-out messages among them and their body bytes.
    pub paged_len: usize,
    pub paged_bytes: u64,
    /// None: this queue never pages.
    pager: Option<Pager>,
    /// Ids of paged messages that could not be read back.
    lost: Vec<u64>,
}

impl Ready {
    pub fn new(max_priority: Option<u8>, pager: Option<Pager>) -> Self {
        let n = max_priority.map(|p| p as usize + 1).unwrap_or(1);
        Self {
            levels: (0..n).map(|_| VecDeque::new()).collect(),
            paged: vec![0; n],
            len: 0,
            bytes: 0,
            paged_len: 0,
            paged_bytes: 0,
            pager,
            lost: Vec::new(),
        }
    }

    pub fn levels(&self) -> usize {
        self.levels.len()
    }

    fn level_of(&self, msg: &Message) -> usize {
        (msg.priority() as usize).min(self.levels.len() - 1)
    }

    pub fn push_back(&mut self, e: Entry) {
        let l = self.level_of(&e.msg);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        self.levels[l].push_back(Slot::Mem(e));
    }

    /// Puts a requeued entry back at its original position (by id).
    pub fn requeue(&mut self, e: Entry) {
        let l = self.level_of(&e.msg);
        self.len += 1;
        self.bytes += e.msg.body.len() as u64;
        let q = &mut self.levels[l];
        let pos = q.partition_point(|x| x.id() < e.id);
        q.insert(pos, Slot::Mem(e));
    }

    /// Accounts for a slot that left level `l`; a paged one frees its record.
    fn forget(&mut self, l: usize, s: &Slot) {
        self.len -= 1;
        self.bytes -= s.body_len();
        if let Slot::Paged(p) = s {
            self.paged[l] -= 1;
            self.paged_len -= 1;
            self.paged_bytes -= p.body_len;
            if let Some(pager) = self.pager.as_mut() {
                pager.release(p.loc);
            }
        }
    }

    fn pop_slot(&mut self, l: usize) -> Option<Slot> {
        let s = self.levels[l].pop_front()?;
        self.forget(l, &s);
        Some(s)
    }

    /// The next message to deliver: highest priority first, FIFO within a level.
    pub fn pop_front(&mut self) -> Option<Entry> {
        loop {
            let l = self.levels.iter().rposition(|q| !q.is_empty())?;
            if self.levels[l].front().is_some_and(Slot::is_paged) {
                self.page_in(l);
                continue;
            }
            if let Some(Slot::Mem(e)) = self.pop_slot(l) {
                return Some(e);
            }
        }
    }

    /// Oldest message of the lowest level (drop-head victim); read back only if `load`.
    pub fn pop_oldest(&mut self, load: bool) -> Option<Popped> {
        loop {
            let l = self.levels.iter().position(|q| !q.is_empty())?;
            if load && self.levels[l].front().is_some_and(Slot::is_paged) {
                self.page_in(l);
                continue;
            }
            return self.pop_slot(l).map(popped);
        }
    }

    /// The head of level `l` if it expired by `now`; read back only if `load`.
    pub fn pop_expired(&mut self, l: usize, now: Instant, load: bool) -> Option<Popped> {
        loop {
            let front = self.levels[l].front()?;
            if front.expires_at().is_none_or(|t| t > now) {
                return None;
            }
            if load && front.is_paged() {
                self.page_in(l);
                continue;
            }
            return self.pop_slot(l).map(popped);
        }
    }

    pub fn next_expiry(&self) -> Option<Instant> {
        self.levels
            .iter()
            .filter_map(|q| q.front().and_then(Slot::expires_at))
            .min()
    }

    /// Removes the message with this id, wherever it is.
    pub fn remove_id(&mut self, id: u64) -> bool {
        for l in 0..self.levels.len() {
            let q = &mut self.levels[l];
            let pos = q.partition_point(|x| x.id() < id);
            if q.get(pos).is_some_and(|s| s.id() == id) {
                if let Some(s) = q.remove(pos) {
                    self.forget(l, &s);
                    return true;
                }
            }
        }
        false
    }

    /// Empties the list (purge); returns the ids, in no particular order.
    pub fn drain_ids(&mut self) -> Vec<u64> {
        let mut ids = Vec::with_capacity(self.len);
        for l in 0..self.levels.len() {
            let slots: Vec<Slot> = self.levels[l].drain(..).collect();
            for s in slots {
                ids.push(s.id());
                self.forget(l, &s);
            }
        }
        ids
    }

    /// Ids of paged messages lost to read errors since the last call (to settle in the log).
    pub fn take_lost(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.lost)
    }

    /// Live page segments (0 without a pager).
    pub fn segments(&self) -> usize {
        self.pager.as_ref().map_or(0, Pager::segments)
    }

    /// Reads back the run of paged slots at the head of level `l` (contiguous in one segment,
    /// at most `run_bytes`); slots that cannot be read are dropped into `lost`. Always takes
    /// at least the head slot out of the paged state.
    fn page_in(&mut self, l: usize) {
        let Some(pager) = self.pager.as_mut() else {
            // Cannot happen (nothing is paged without a pager), but never loop on it.
            if let Some(s) = self.levels[l].pop_front() {
                self.lost.push(s.id());
                self.forget(l, &s);
            }
            return;
        };
        let q = &self.levels[l];
        let Some(Slot::Paged(first)) = q.front() else {
            return;
        };
        let first = first.loc;
        let mut n = 0;
        let mut total = 0u64;
        for s in q.iter() {
            match s {
                Slot::Paged(p)
                    if p.loc.seg == first.seg
                        && p.loc.off == first.off + total
                        && n < pager.limits.head_count
                        && (n == 0 || total + u64::from(p.loc.len) <= pager.limits.run_bytes) =>
                {
                    n += 1;
                    total += u64::from(p.loc.len);
                }
                _ => break,
            }
        }
        let buf = match pager.io.read(first.seg, first.off, total as usize) {
            Ok(v) if v.len() as u64 == total => Some(Bytes::from(v)),
            Ok(v) => {
                error!(queue = %pager.label, segment = first.seg, wanted = total, got = v.len(), "short read of a page file");
                None
            }
            Err(e) => {
                error!(queue = %pager.label, segment = first.seg, error = %e, "cannot read a page file");
                None
            }
        };
        let run: Vec<Slot> = self.levels[l].drain(..n).collect();
        let mut back = Vec::with_capacity(n);
        let mut rel = 0usize;
        let mut lost = 0usize;
        for s in run {
            let Slot::Paged(p) = s else {
                back.push(s);
                continue;
            };
            let msg = buf
                .as_ref()
                .and_then(|b| decode_message(pager.memory, b, rel, p.loc.len as usize));
            rel += p.loc.len as usize;
            self.paged[l] -= 1;
            self.paged_len -= 1;
            self.paged_bytes -= p.body_len;
            pager.release(p.loc);
            match msg {
                Some(m) => back.push(Slot::Mem(Entry {
                    id: p.id,
                    msg: Arc::new(m),
                    redelivered: p.redelivered,
                    expires_at: p.expires_at,
                })),
                None => {
                    self.len -= 1;
                    self.bytes -= p.body_len;
                    self.lost.push(p.id);
                    lost += 1;
                }
            }
        }
        if lost > 0 {
            error!(queue = %pager.label, lost, "paged messages could not be read back; dropped");
        }
        let q = &mut self.levels[l];
        for s in back.into_iter().rev() {
            q.push_front(s);
        }
    }

    /// Writes in-memory messages behind the head window of each level to the page segments
    /// (lowest priority first), at most about `max_bytes` in this call. Returns true when
    /// more is left to page out.
    pub fn page_out(&mut self, max_bytes: u64, now: Instant) -> bool {
        let Some(pager) = self.pager.as_mut() else {
            return false;
        };
        if pager.retry_at.is_some_and(|t| now < t) {
            return false;
        }
        pager.retry_at = None;
        let lim = pager.limits;
        let mut written = 0u64;
        for l in 0..self.levels.len() {
            let q = &mut self.levels[l];
            // The head window: kept in memory.
            let mut w = 0;
            let mut wbytes = 0u64;
            let mut mem_in_window = 0;
            for s in q.iter() {
                if w >= lim.head_count || wbytes >= lim.head_bytes {
                    break;
                }
                wbytes += s.body_len();
                mem_in_window += usize::from(!s.is_paged());
                w += 1;
            }
            let eligible = q.len() - self.paged[l] - mem_in_window;
            if eligible == 0 {
                continue;
            }
            // The first in-memory slot behind the window (usually near the tail).
            let mut seen = 0;
            let mut i = q.len();
            for j in (w..q.len()).rev() {
                if !q[j].is_paged() {
                    seen += 1;
                    i = j;
                    if seen == eligible {
                        break;
                    }
                }
            }
            while i < q.len() {
                if written >= max_bytes {
                    return true;
                }
                let (seg, seg_size) = match pager.cur {
                    Some(c) => c,
                    None => {
                        let s = pager.next_seg;
                        pager.next_seg += 1;
                        (s, 0)
                    }
                };
                let mut buf = Vec::new();
                let mut members: Vec<(usize, u32)> = Vec::new();
                let mut full = false;
                while i < q.len() && buf.len() < lim.chunk_bytes {
                    if let Slot::Mem(e) = &q[i] {
                        let before = buf.len();
                        record::encode(&enqueue_record(e), &mut buf);
                        let fits = seg_size + buf.len() as u64 <= lim.segment_bytes;
                        if !fits && (seg_size > 0 || !members.is_empty()) {
                            buf.truncate(before);
                            full = true;
                            break;
                        }
                        members.push((i, (buf.len() - before) as u32));
                    }
                    i += 1;
                }
                if members.is_empty() {
                    // The current segment is full: start another.
                    pager.cur = None;
                    continue;
                }
                if pager.io.write(seg, seg_size, &buf).is_err() {
                    // The I/O side reports failure episodes (crate::paging for files).
                    pager.retry_at = Some(now + WRITE_RETRY);
                    if !pager.live.contains_key(&seg) {
                        pager.io.remove(seg);
                        pager.cur = None;
                    }
                    return false;
                }
                let mut off = seg_size;
                for (idx, len) in &members {
                    let slot = &mut q[*idx];
                    if let Slot::Mem(e) = slot {
                        let p = Paged {
                            id: e.id,
                            redelivered: e.redelivered,
                            expires_at: e.expires_at,
                            body_len: e.msg.body.len() as u64,
                            loc: Loc {
                                seg,
                                off,
                                len: *len,
                            },
                        };
                        self.paged_len += 1;
                        self.paged_bytes += p.body_len;
                        *slot = Slot::Paged(p);
                    }
                    off += u64::from(*len);
                }
                self.paged[l] += members.len();
                *pager.live.entry(seg).or_insert(0) += members.len() as u64;
                pager.cur = (!full && off < lim.segment_bytes).then_some((seg, off));
                written += buf.len() as u64;
            }
        }
        false
    }
}

fn popped(s: Slot) -> Popped {
    match s {
        Slot::Mem(e) => Popped {
            id: e.id,
            msg: Some(e.msg),
        },
        Slot::Paged(p) => Popped {
            id: p.id,
            msg: None,
        },
    }
}

/// The page record of a message: a store enqueue record (the index keeps id order, the
/// redelivered flag and the expiry, so the record's copies of them are not used).
fn enqueue_record(e: &Entry) -> Record<'_> {
    Record::Enqueue(Enqueue {
        queue: "",
        id: e.id,
        redelivered: e.redelivered,
        expires_at_ms: None,
        exchange: e.msg.exchange.as_str(),
        routing_key: e.msg.routing_key.as_str(),
        header: &e.msg.header_payload,
        body: &e.msg.body,
    })
}

/// The message in the record at `buf[rel..rel + len]`, charged to `memory`; its body shares
/// `buf`.
fn decode_message(memory: &'static Memory, buf: &Bytes, rel: usize, len: usize) -> Option<Message> {
    let frame = buf.get(rel..rel.checked_add(len)?)?;
    let Record::Enqueue(e) = record::decode_framed(frame)? else {
        return None;
    };
    crate::store::message_from_parts(
        memory,
        e.exchange,
        e.routing_key,
        e.header,
        buf.slice_ref(e.body),
    )
}

#[path = "ready_copy.rs"]
mod copy;
pub use copy::Copied;

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::basic::AMQPProperties;
    use proptest::prelude::*;
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// Segments in memory, with switches to make writes or reads fail.
    #[derive(Debug, Default)]
    pub(super) struct Disk {
        files: Mutex<HashMap<u64, Vec<u8>>>,
        fail_writes: AtomicBool,
        fail_reads: AtomicBool,
        writes: AtomicUsize,
        reads: AtomicUsize,
    }

    #[derive(Debug)]
    struct MemIo(Arc<Disk>);

    impl PageIo for MemIo {
        fn write(&mut self, seg: u64, off: u64, buf: &[u8]) -> std::io::Result<()> {
            if self.0.fail_writes.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("disk full"));
            }
            self.0.writes.fetch_add(1, Ordering::Relaxed);
            let mut files = self.0.files.lock().expect("lock");
            let f = files.entry(seg).or_default();
            let end = off as usize + buf.len();
            if f.len() < end {
                f.resize(end, 0);
            }
            f[off as usize..end].copy_from_slice(buf);
            Ok(())
        }
        fn read(&mut self, seg: u64, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
            if self.0.fail_reads.load(Ordering::Relaxed) {
                return Err(std::io::Error::other("bad sector"));
            }
            self.0.reads.fetch_add(1, Ordering::Relaxed);
            let files = self.0.files.lock().expect("lock");
            let f = files
                .get(&seg)
                .ok_or_else(|| std::io::Error::other("no such segment"))?;
            f.get(off as usize..off as usize + len)
                .map(<[u8]>::to_vec)
                .ok_or_else(|| std::io::Error::other("short"))
        }
        fn remove(&mut self, seg: u64) {
            self.0.files.lock().expect("lock").remove(&seg);
        }
    }

    pub(super) fn limits() -> PagerLimits {
        PagerLimits {
            segment_bytes: 1000,
            head_count: 2,
            head_bytes: 1 << 20,
            chunk_bytes: 400,
            run_bytes: 300,
        }
    }

    pub(super) fn paged_ready(max_priority: Option<u8>, lim: PagerLimits) -> (Ready, Arc<Disk>) {
        let disk = Arc::new(Disk::default());
        let pager = Pager::new(
            Box::new(MemIo(disk.clone())),
            "'q' in vhost '/'".into(),
            lim,
            &crate::memory::UNIT_TESTS,
        );
        (Ready::new(max_priority, Some(pager)), disk)
    }

    fn msg(id: u64, prio: u8, size: usize) -> Arc<Message> {
        let mut body = format!("m{id}:").into_bytes();
        body.resize(size.max(body.len()), b'x');
        let props = AMQPProperties::default()
            .with_priority(prio)
            .with_content_type("text/plain".into());
        Arc::new(
            Message::new(
                &crate::memory::UNIT_TESTS,
                "ex".into(),
                format!("rk{id}").as_str().into(),
                props,
                body.into(),
            )
            .expect("message"),
        )
    }

    pub(super) fn entry(id: u64, prio: u8, size: usize) -> Entry {
        Entry {
            id,
            msg: msg(id, prio, size),
            redelivered: id % 3 == 0,
            expires_at: None,
        }
    }

    fn files(d: &Disk) -> usize {
        d.files.lock().expect("lock").len()
    }

    #[test]
    fn a_paged_message_costs_a_small_index_entry() {
        // docs/storage.md promises about 70 bytes per paged message.
        assert!(
            std::mem::size_of::<Slot>() <= 72,
            "{}",
            std::mem::size_of::<Slot>()
        );
    }

    #[test]
    fn page_out_keeps_the_head_window_and_frees_the_rest() {
        let (mut r, disk) = paged_ready(None, limits());
        let mut weak = Vec::new();
        for id in 1..=10 {
            let e = entry(id, 0, 100);
            weak.push(Arc::downgrade(&e.msg));
            r.push_back(e);
        }
        assert!(!r.page_out(u64::MAX, Instant::now()));
        assert_eq!((r.len, r.bytes), (10, 1000));
        assert_eq!((r.paged_len, r.paged_bytes), (8, 800));
        // The window (ids 1, 2) stays; the rest is freed.
        assert!(weak[0].upgrade().is_some() && weak[1].upgrade().is_some());
        assert!(weak[2..].iter().all(|w| w.upgrade().is_none()));
        // 8 records of ~130 bytes in 400-byte chunks in 1000-byte segments.
        assert!(r.segments() >= 2, "segments: {}", r.segments());
        assert_eq!(files(&disk), r.segments());
        // Nothing more to page: no write.
        let writes = disk.writes.load(Ordering::Relaxed);
        assert!(!r.page_out(u64::MAX, Instant::now()));
        assert_eq!(disk.writes.load(Ordering::Relaxed), writes);
        for id in 1..=10 {
            let e = r.pop_front().expect("message");
            assert_eq!(e.id, id);
            assert_eq!(e.redelivered, id % 3 == 0);
            assert!(e.msg.body.starts_with(format!("m{id}:").as_bytes()));
            assert_eq!(e.msg.body.len(), 100);
            assert_eq!(e.msg.routing_key.as_str(), format!("rk{id}"));
            assert_eq!(
                e.msg.properties.content_type().as_ref().map(|c| c.as_str()),
                Some("text/plain")
            );
        }
        assert!(r.pop_front().is_none());
        assert_eq!((r.len, r.bytes, r.paged_len, r.paged_bytes), (0, 0, 0, 0));
        assert_eq!(r.segments(), 0);
        assert_eq!(files(&disk), 0, "segments left behind");
    }

    #[test]
    fn a_segment_goes_once_nothing_live_is_left_in_it() {
        let lim = PagerLimits {
            head_count: 4,
            run_bytes: 1000,
            ..limits()
        };
        let (mut r, disk) = paged_ready(None, lim);
        for id in 1..=30 {
            r.push_back(entry(id, 0, 100));
        }
        r.page_out(u64::MAX, Instant::now());
        assert_eq!(r.paged_len, 26);
        let total = files(&disk);
        assert!(total >= 4, "segments: {total}");
        let mut prev = total;
        for _ in 0..30 {
            r.pop_front().expect("message");
            let now = files(&disk);
            assert!(now <= prev, "segments grew while draining");
            assert_eq!(now, r.segments());
            prev = now;
        }
        assert_eq!(files(&disk), 0);
        // Reads came in runs, not one per message.
        let reads = disk.reads.load(Ordering::Relaxed);
        assert!(reads * 2 < 26, "{reads} reads for 26 paged messages");
    }

    #[test]
    fn removing_purging_and_dropping_free_their_segments() {
        let (mut r, disk) = paged_ready(None, limits());
        for id in 1..=20 {
            r.push_back(entry(id, 0, 100));
        }
        r.page_out(u64::MAX, Instant::now());
        assert!(r.remove_id(5) && r.remove_id(1) && !r.remove_id(99));
        assert_eq!((r.len, r.paged_len), (18, 17));
        let mut ids = r.drain_ids();
        ids.sort_unstable();
        assert_eq!(ids, (2..=20).filter(|i| *i != 5).collect::<Vec<_>>());
        assert_eq!(files(&disk), 0);
        assert_eq!((r.len, r.bytes, r.paged_len, r.paged_bytes), (0, 0, 0, 0));
        for id in 1..=20 {
            r.push_back(entry(id, 0, 100));
        }
        r.page_out(u64::MAX, Instant::now());
        assert!(files(&disk) > 0);
        drop(r);
        assert_eq!(
            files(&disk),
            0,
            "a dropped (deleted) queue leaves page files"
        );
    }

    #[test]
    fn a_failed_write_keeps_messages_in_memory_and_retries_later() {
        let (mut r, disk) = paged_ready(None, limits());
        for id in 1..=10 {
            r.push_back(entry(id, 0, 100));
        }
        disk.fail_writes.store(true, Ordering::Relaxed);
        let t0 = Instant::now();
        assert!(!r.page_out(u64::MAX, t0));
        assert_eq!((r.len, r.paged_len), (10, 0));
        assert_eq!(files(&disk), 0);
        disk.fail_writes.store(false, Ordering::Relaxed);
        // Paused for a while after the failure.
        r.page_out(u64::MAX, t0 + Duration::from_millis(100));
        assert_eq!(r.paged_len, 0);
        r.page_out(u64::MAX, t0 + Duration::from_secs(2));
        assert_eq!(r.paged_len, 8);
        let ids: Vec<u64> = std::iter::from_fn(|| r.pop_front().map(|e| e.id)).collect();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
    }

    #[test]
    fn a_failed_read_drops_those_messages_and_reports_them() {
        let (mut r, disk) = paged_ready(None, limits());
        for id in 1..=6 {
            r.push_back(entry(id, 0, 100));
        }
        r.page_out(u64::MAX, Instant::now());
        assert_eq!(r.paged_len, 4);
        assert_eq!(r.pop_front().map(|e| e.id), Some(1));
        assert_eq!(r.pop_front().map(|e| e.id), Some(2));
        disk.fail_reads.store(true, Ordering::Relaxed);
        assert!(r.pop_front().is_none());
        let mut lost = r.take_lost();
        lost.sort_unstable();
        assert_eq!(lost, vec![3, 4, 5, 6]);
        assert_eq!((r.len, r.bytes, r.paged_len, r.paged_bytes), (0, 0, 0, 0));
        assert_eq!(files(&disk), 0);
    }

    #[test]
    fn a_damaged_record_is_dropped_alone_never_served() {
        let (mut r, disk) = paged_ready(
            None,
            PagerLimits {
                head_count: 1,
                ..limits()
            },
        );
        for id in 1..=3 {
            r.push_back(entry(id, 0, 100));
        }
        r.page_out(u64::MAX, Instant::now());
        // Flip a byte inside the first paged record (id 2).
        for f in disk.files.lock().expect("lock").values_mut() {
            f[20] ^= 0xff;
        }
        let ids: Vec<u64> = std::iter::from_fn(|| r.pop_front().map(|e| e.id)).collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(r.take_lost(), vec![2]);
    }

    #[test]
    fn priorities_and_requeues_keep_their_order_across_paging() {
        let (mut r, _disk) = paged_ready(Some(3), limits());
        for id in 1..=24 {
            r.push_back(entry(id, (id % 4) as u8, 50));
        }
        r.page_out(u64::MAX, Instant::now());
        assert!(r.paged_len > 10);
        // Take three from the top level, page out again, requeue them between paged ones.
        let taken: Vec<Entry> = (0..3).filter_map(|_| r.pop_front()).collect();
        assert_eq!(
            taken.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![3, 7, 11]
        );
        for mut e in taken.into_iter().rev() {
            e.redelivered = true;
            r.requeue(e);
        }
        r.page_out(u64::MAX, Instant::now());
        let got: Vec<(u64, bool)> =
            std::iter::from_fn(|| r.pop_front().map(|e| (e.id, e.redelivered))).collect();
        let mut want = Vec::new();
        for p in (0..4).rev() {
            for id in (1..=24u64).filter(|i| i % 4 == p) {
                want.push((id, id % 3 == 0 || [3, 7, 11].contains(&id)));
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn expired_paged_messages_are_read_back_only_when_needed() {
        let (mut r, disk) = paged_ready(
            None,
            PagerLimits {
                head_count: 1,
                ..limits()
            },
        );
        let t0 = Instant::now();
        for id in 1..=6 {
            let mut e = entry(id, 0, 100);
            e.expires_at = Some(t0 + Duration::from_millis(id * 10));
            r.push_back(e);
        }
        r.page_out(u64::MAX, t0);
        assert_eq!(r.paged_len, 5);
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_millis(10)));
        let reads = disk.reads.load(Ordering::Relaxed);
        let now = t0 + Duration::from_millis(35);
        // Without a dead-letter exchange: dropped unread.
        let a = r.pop_expired(0, now, false).expect("1 expired");
        assert_eq!((a.id, a.msg.is_some()), (1, true));
        let b = r.pop_expired(0, now, false).expect("2 expired");
        assert_eq!((b.id, b.msg.is_none()), (2, true));
        assert_eq!(disk.reads.load(Ordering::Relaxed), reads);
        // With one: read back to be dead-lettered.
        let c = r.pop_expired(0, now, true).expect("3 expired");
        assert_eq!(c.id, 3);
        assert!(c.msg.expect("read back").body.starts_with(b"m3:"));
        assert!(r.pop_expired(0, now, true).is_none());
        assert_eq!(r.next_expiry(), Some(t0 + Duration::from_millis(40)));
        let oldest = r.pop_oldest(false).expect("oldest");
        assert_eq!(oldest.id, 4);
        assert_eq!((r.len, r.bytes), (2, 200));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Push {
            prio: u8,
            size: usize,
            ttl: Option<u64>,
        },
        Pop,
        /// Requeue the n-th (mod) message taken so far.
        Requeue(usize),
        /// Remove the ready message with the n-th (mod) id issued so far.
        Remove(usize),
        PopOldest(bool),
        Expire(u64, bool),
        PageOut(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4, 0usize..120, proptest::option::of(0u64..50))
                .prop_map(|(prio, size, ttl)| Op::Push { prio, size, ttl }),
            2 => Just(Op::Pop),
            1 => any::<usize>().prop_map(Op::Requeue),
            1 => any::<usize>().prop_map(Op::Remove),
            1 => any::<bool>().prop_map(Op::PopOldest),
            1 => (0u64..60, any::<bool>()).prop_map(|(t, l)| Op::Expire(t, l)),
            2 => (1u64..2000).prop_map(Op::PageOut),
        ]
    }

    /// What a consumer sees of a message.
    fn seen(id: u64, m: Option<&Arc<Message>>) -> (u64, Option<Vec<u8>>) {
        (id, m.map(|m| m.body.to_vec()))
    }

    proptest! {
        #[test]
        fn paging_never_changes_what_comes_out(
            ops in proptest::collection::vec(op(), 1..120),
            head_count in 1usize..4,
            segment_bytes in 100u64..2000,
            chunk_bytes in 1usize..600,
            run_bytes in 1u64..600,
        ) {
            let lim = PagerLimits { segment_bytes, head_count, head_bytes: 150, chunk_bytes, run_bytes };
            let (mut paged, disk) = paged_ready(Some(3), lim);
            let mut plain = Ready::new(Some(3), None);
            let t0 = Instant::now();
            let mut next_id = 1u64;
            let mut taken_p: Vec<Entry> = Vec::new();
            let mut taken_m: Vec<Entry> = Vec::new();
            for op in ops {
                match op {
                    Op::Push { prio, size, ttl } => {
                        let m = msg(next_id, prio, size);
                        let exp = ttl.map(|t| t0 + Duration::from_millis(t));
                        for r in [&mut paged, &mut plain] {
                            r.push_back(Entry { id: next_id, msg: m.clone(), redelivered: false, expires_at: exp });
                        }
                        next_id += 1;
                    }
                    Op::Pop => {
                        let a = paged.pop_front();
                        let b = plain.pop_front();
                        prop_assert_eq!(
                            a.as_ref().map(|e| (seen(e.id, Some(&e.msg)), e.redelivered, e.expires_at)),
                            b.as_ref().map(|e| (seen(e.id, Some(&e.msg)), e.redelivered, e.expires_at))
                        );
                        taken_p.extend(a);
                        taken_m.extend(b);
                    }
                    Op::Requeue(n) => {
                        if !taken_p.is_empty() {
                            let i = n % taken_p.len();
                            let mut a = taken_p.remove(i);
                            let mut b = taken_m.remove(i);
                            a.redelivered = true;
                            b.redelivered = true;
                            paged.requeue(a);
                            plain.requeue(b);
                        }
                    }
                    Op::Remove(n) => {
                        let id = (n as u64 % next_id.max(1)) + 1;
                        prop_assert_eq!(paged.remove_id(id), plain.remove_id(id));
                    }
                    Op::PopOldest(load) => {
                        let a = paged.pop_oldest(load);
                        let b = plain.pop_oldest(true);
                        prop_assert_eq!(a.as_ref().map(|p| p.id), b.as_ref().map(|p| p.id));
                        if let (Some(Some(ma)), Some(Some(mb))) = (a.map(|p| p.msg), b.map(|p| p.msg)) {
                            prop_assert_eq!(&ma.body, &mb.body);
                        }
                    }
                    Op::Expire(t, load) => {
                        let now = t0 + Duration::from_millis(t);
                        for l in 0..4 {
                            loop {
                                let a = paged.pop_expired(l, now, load);
                                let b = plain.pop_expired(l, now, true);
                                prop_assert_eq!(a.as_ref().map(|p| p.id), b.as_ref().map(|p| p.id));
                                if let (Some(Some(ma)), Some(Some(mb))) = (a.as_ref().map(|p| &p.msg), b.as_ref().map(|p| &p.msg)) {
                                    prop_assert_eq!(&ma.body, &mb.body);
                                }
                                if a.is_none() {
                                    break;
                                }
                            }
                        }
                    }
                    Op::PageOut(max) => {
                        paged.page_out(max, t0);
                    }
                }
                prop_assert_eq!((paged.len, paged.bytes), (plain.len, plain.bytes));
                prop_assert_eq!(paged.next_expiry(), plain.next_expiry());
                prop_assert!(paged.paged_len <= paged.len && paged.paged_bytes <= paged.bytes);
                prop_assert_eq!(files(&disk), paged.segments());
                prop_assert!(paged.take_lost().is_empty());
            }
            let mut rest_p = paged.drain_ids();
            let mut rest_m = plain.drain_ids();
            rest_p.sort_unstable();
            rest_m.sort_unstable();
            prop_assert_eq!(rest_p, rest_m);
            prop_assert_eq!(files(&disk), 0);
        }
    }
}
