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
use crate::intmap::IntMap;
use crate::memory::Memory;
use crate::store::record::{self, Enqueue, Record};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tracing::error;

/// A ready message held in memory, as the queue takes it in and out of the list.
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

/// What the list keeps of a paged-out message besides its slot.
#[derive(Debug, Clone, Copy)]
struct PagedAt {
    loc: Loc,
    body_len: u64,
}

/// One message in the list: 24 bytes, so that a long backlog costs little more than its
/// messages (an [`Entry`] is 40).
#[derive(Debug)]
struct Slot {
    id: u64,
    /// [`REDELIVERED`] and the expiry deadline ([`pack_expiry`]).
    meta: u64,
    /// None: paged out; its record is at `Ready::paged_at[id]`.
    msg: Option<Arc<Message>>,
}

/// The redelivered flag in [`Slot::meta`]; the other bits are the expiry.
const REDELIVERED: u64 = 1 << 63;
/// Expiry offsets are nanoseconds from a process-wide instant, within +-2^61 (73 years).
const EXPIRY_BIAS: i128 = 1 << 61;

fn expiry_base() -> Instant {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// An expiry deadline as 62 bits: 0 for none, else its offset from [`expiry_base`] in
/// nanoseconds (exact, so the deadline read back is the one stored).
fn pack_expiry(t: Option<Instant>) -> u64 {
    let Some(t) = t else {
        return 0;
    };
    let base = expiry_base();
    let off = match t.checked_duration_since(base) {
        Some(d) => d.as_nanos() as i128,
        None => -(base.duration_since(t).as_nanos() as i128),
    };
    (off.clamp(-EXPIRY_BIAS, EXPIRY_BIAS - 1) + EXPIRY_BIAS + 1) as u64
}

fn unpack_expiry(v: u64) -> Option<Instant> {
    if v == 0 {
        return None;
    }
    let off = i128::from(v) - 1 - EXPIRY_BIAS;
    let base = expiry_base();
    if off >= 0 {
        base.checked_add(Duration::from_nanos(off as u64))
    } else {
        base.checked_sub(Duration::from_nanos((-off) as u64))
    }
}

impl Slot {
    fn new(e: Entry) -> Self {
        let flag = if e.redelivered { REDELIVERED } else { 0 };
        Slot {
            id: e.id,
            meta: flag | pack_expiry(e.expires_at),
            msg: Some(e.msg),
        }
    }
    fn redelivered(&self) -> bool {
        self.meta & REDELIVERED != 0
    }
    fn expires_at(&self) -> Option<Instant> {
        unpack_expiry(self.meta & !REDELIVERED)
    }
    fn is_paged(&self) -> bool {
        self.msg.is_none()
    }
    /// The entry of an in-memory slot.
    fn into_entry(self) -> Option<Entry> {
        let (redelivered, expires_at) = (self.redelivered(), self.expires_at());
        self.msg.map(|msg| Entry {
            id: self.id,
            msg,
            redelivered,
            expires_at,
        })
    }
}

/// Body bytes of a slot (a paged one's from its location entry).
fn body_len(paged_at: &IntMap<u64, PagedAt>, s: &Slot) -> u64 {
    match &s.msg {
        Some(m) => m.body().len() as u64,
        None => paged_at.get(&s.id).map_or(0, |p| p.body_len),
    }
}

/// A level's list keeps at most about twice what it holds once it held much more (a drained
/// backlog gives its memory back).
const SHRINK_ABOVE: usize = 4096;

fn shrink(q: &mut VecDeque<Slot>) {
    if q.capacity() > SHRINK_ABOVE && q.len() < q.capacity() / 8 {
        q.shrink_to(q.len() * 2);
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
    /// Where each paged message's record is, by id.
    paged_at: IntMap<u64, PagedAt>,
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
            paged_at: IntMap::default(),
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
        if self.levels.len() == 1 {
            return 0;
        }
        (msg.priority() as usize).min(self.levels.len() - 1)
    }

    pub fn push_back(&mut self, e: Entry) {
        let l = self.level_of(&e.msg);
        self.len += 1;
        self.bytes += e.msg.body().len() as u64;
        self.levels[l].push_back(Slot::new(e));
    }

    /// Puts a requeued entry back at its original position (by id).
    pub fn requeue(&mut self, e: Entry) {
        let l = self.level_of(&e.msg);
        self.len += 1;
        self.bytes += e.msg.body().len() as u64;
        let q = &mut self.levels[l];
        let pos = q.partition_point(|x| x.id < e.id);
        q.insert(pos, Slot::new(e));
    }

    /// Accounts for a slot that left level `l`; a paged one frees its record.
    fn forget(&mut self, l: usize, s: &Slot) {
        self.len -= 1;
        if let Some(m) = &s.msg {
            self.bytes -= m.body().len() as u64;
            return;
        }
        self.paged[l] -= 1;
        self.paged_len -= 1;
        if let Some(p) = self.paged_at.remove(&s.id) {
            self.bytes -= p.body_len;
            self.paged_bytes -= p.body_len;
            if let Some(pager) = self.pager.as_mut() {
                pager.release(p.loc);
            }
        }
        if self.paged_len == 0 && self.paged_at.capacity() > SHRINK_ABOVE {
            self.paged_at = IntMap::default();
        }
    }

    fn pop_slot(&mut self, l: usize) -> Option<Slot> {
        let s = self.levels[l].pop_front()?;
        self.forget(l, &s);
        shrink(&mut self.levels[l]);
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
            if let Some(e) = self.pop_slot(l).and_then(Slot::into_entry) {
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
            let pos = q.partition_point(|x| x.id < id);
            if q.get(pos).is_some_and(|s| s.id == id) {
                if let Some(s) = q.remove(pos) {
                    self.forget(l, &s);
                    shrink(&mut self.levels[l]);
                    return true;
                }
            }
        }
        false
    }

    /// Empties the list (purge); returns the ids, in no particular order. The list's memory
    /// goes with them.
    pub fn drain_ids(&mut self) -> Vec<u64> {
        let mut ids = Vec::with_capacity(self.len);
        for l in 0..self.levels.len() {
            let slots = std::mem::take(&mut self.levels[l]);
            for s in slots {
                ids.push(s.id);
                self.forget(l, &s);
            }
        }
        self.paged_at = IntMap::default();
        ids
    }

    /// Slots the list has room for without growing (memory held: 24 bytes each).
    pub fn capacity(&self) -> usize {
        self.levels.iter().map(VecDeque::capacity).sum()
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
        let q = &self.levels[l];
        let first = match q.front() {
            Some(s) if s.is_paged() => self.paged_at.get(&s.id).map(|p| p.loc),
            _ => return,
        };
        let (Some(pager), Some(first)) = (self.pager.as_mut(), first) else {
            // Cannot happen (nothing is paged without a pager and a location), but never loop
            // on it.
            if let Some(s) = self.levels[l].pop_front() {
                self.lost.push(s.id);
                self.forget(l, &s);
            }
            return;
        };
        let mut n = 0;
        let mut total = 0u64;
        for s in q.iter() {
            let Some(p) = s.msg.is_none().then(|| self.paged_at.get(&s.id)).flatten() else {
                break;
            };
            if p.loc.seg == first.seg
                && p.loc.off == first.off + total
                && n < pager.limits.head_count
                && (n == 0 || total + u64::from(p.loc.len) <= pager.limits.run_bytes)
            {
                n += 1;
                total += u64::from(p.loc.len);
            } else {
                break;
            }
        }
        let buf = match pager.io.read(first.seg, first.off, total as usize) {
            Ok(v) if v.len() as u64 == total => Some(v),
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
        for mut s in run {
            let Some(p) = self.paged_at.remove(&s.id) else {
                back.push(s);
                continue;
            };
            let msg = buf
                .as_deref()
                .and_then(|b| decode_message(pager.memory, b, rel, p.loc.len as usize));
            rel += p.loc.len as usize;
            self.paged[l] -= 1;
            self.paged_len -= 1;
            self.paged_bytes -= p.body_len;
            pager.release(p.loc);
            match msg {
                Some(m) => {
                    s.msg = Some(Arc::new(m));
                    back.push(s);
                }
                None => {
                    self.len -= 1;
                    self.bytes -= p.body_len;
                    self.lost.push(s.id);
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
                wbytes += body_len(&self.paged_at, s);
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
                    if let Some(m) = &q[i].msg {
                        let before = buf.len();
                        record::encode(&enqueue_record(q[i].id, m), &mut buf);
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
                    if let Some(m) = slot.msg.take() {
                        let body_len = m.body().len() as u64;
                        let loc = Loc {
                            seg,
                            off,
                            len: *len,
                        };
                        self.paged_at.insert(slot.id, PagedAt { loc, body_len });
                        self.paged_len += 1;
                        self.paged_bytes += body_len;
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
    Popped {
        id: s.id,
        msg: s.msg,
    }
}

/// The page record of a message: a store enqueue record (the index keeps id order, the
/// redelivered flag and the expiry, so the record's copies of them are not used).
fn enqueue_record(id: u64, m: &Message) -> Record<'_> {
    Record::Enqueue(Enqueue {
        queue: "",
        id,
        redelivered: false,
        expires_at_ms: None,
        exchange: m.exchange(),
        routing_key: m.routing_key(),
        header: m.header_payload(),
        body: m.body(),
    })
}

/// The message in the record at `buf[rel..rel + len]`, charged to `memory`.
fn decode_message(memory: &'static Memory, buf: &[u8], rel: usize, len: usize) -> Option<Message> {
    let frame = buf.get(rel..rel.checked_add(len)?)?;
    let Record::Enqueue(e) = record::decode_framed(frame)? else {
        return None;
    };
    Message::from_parts(memory, e.exchange, e.routing_key, e.header, e.body).ok()
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
    fn a_slot_is_small() {
        // A queued message costs its slot (24 bytes), its Arc'd struct and its buffer; a
        // paged one its slot and its location entry (docs/storage.md: about 70 bytes).
        assert_eq!(std::mem::size_of::<Slot>(), 24);
        assert!(std::mem::size_of::<Slot>() + std::mem::size_of::<(u64, PagedAt)>() <= 72);
    }

    #[test]
    fn an_expiry_is_packed_exactly() {
        let now = Instant::now();
        for t in [
            None,
            Some(now),
            Some(now + Duration::from_nanos(1)),
            Some(now + Duration::from_secs(86_400 * 365 * 20)),
            now.checked_sub(Duration::from_secs(3)),
        ] {
            for redelivered in [false, true] {
                let e = Entry {
                    id: 9,
                    msg: msg(9, 0, 1),
                    redelivered,
                    expires_at: t,
                };
                let back = Slot::new(e).into_entry().expect("in memory");
                assert_eq!(
                    (back.id, back.redelivered, back.expires_at),
                    (9, redelivered, t)
                );
            }
        }
    }

    fn counted_entry(memory: &'static Memory, id: u64) -> Entry {
        let m = Message::new(
            memory,
            "".into(),
            "q".into(),
            AMQPProperties::default(),
            vec![b'x'; 16].into(),
        )
        .expect("message");
        Entry {
            id,
            msg: Arc::new(m),
            redelivered: false,
            expires_at: None,
        }
    }

    #[test]
    fn a_drained_purged_or_deleted_backlog_gives_its_memory_back() {
        let memory = Memory::leaked();
        let start = memory.used();
        let n = 20_000u64;
        // Drained by consumers (some of it paged out meanwhile).
        let (mut r, disk) = paged_ready(
            None,
            PagerLimits {
                head_count: 100,
                ..limits()
            },
        );
        let (mut r2, _) = paged_ready(None, limits());
        for id in 1..=n {
            r.push_back(counted_entry(memory, id));
        }
        assert!(memory.used() > start + n * 16);
        let full = r.capacity();
        assert!(full >= n as usize);
        r.pager.as_mut().expect("pager").memory = memory;
        r.page_out(200 * 1024, Instant::now());
        assert!(r.paged_len > 0);
        let mut got = 0;
        while let Some(e) = r.pop_front() {
            assert_eq!(e.id, got + 1);
            got += 1;
        }
        assert_eq!(got, n);
        assert_eq!(
            memory.used(),
            start,
            "drained: the account is back at its start"
        );
        assert!(
            r.capacity() < full / 8,
            "the list kept {} slots",
            r.capacity()
        );
        assert_eq!(files(&disk), 0);
        // Purged.
        for id in 1..=n {
            r.push_back(counted_entry(memory, id));
        }
        assert_eq!(r.drain_ids().len(), n as usize);
        assert_eq!(memory.used(), start, "purged");
        assert_eq!(r.capacity(), 0);
        // Deleted (the queue drops its list).
        for id in 1..=n {
            r2.push_back(counted_entry(memory, id));
        }
        r2.page_out(100 * 1024, Instant::now());
        drop(r2);
        assert_eq!(memory.used(), start, "deleted");
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
            assert!(e.msg.body().starts_with(format!("m{id}:").as_bytes()));
            assert_eq!(e.msg.body().len(), 100);
            assert_eq!(e.msg.routing_key(), format!("rk{id}"));
            assert_eq!(
                e.msg
                    .properties()
                    .content_type()
                    .as_ref()
                    .map(|c| c.as_str()),
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
        assert!(c.msg.expect("read back").body().starts_with(b"m3:"));
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
        (id, m.map(|m| m.body().to_vec()))
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
                            prop_assert_eq!(ma.body(), mb.body());
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
                                    prop_assert_eq!(ma.body(), mb.body());
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
