//! Record encoding and segment scanning (pure, no I/O).
//!
//! A segment file is [`MAGIC`] followed by records. A record is
//! `len: u32 LE | crc32(payload): u32 LE | payload` where the payload's first byte is the kind.
//! Strings and blobs in the payload are length-prefixed (u16 for queue keys and names, u32 for
//! properties and bodies). Integers are little-endian.

/// First bytes of every segment file.
pub const MAGIC: &[u8; 8] = b"WRNSEG01";
/// Record header: length and checksum.
pub const HEADER: usize = 8;
/// Largest payload accepted when scanning (bigger lengths are corruption).
pub const MAX_PAYLOAD: usize = 1 << 30;

const KIND_ENQUEUE: u8 = 1;
const KIND_DELIVERED: u8 = 2;
const KIND_SETTLE: u8 = 3;
const KIND_DELETE_QUEUE: u8 = 4;

/// A persistent message entering a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enqueue<'a> {
    /// Queue key (vhost, NUL, queue name).
    pub queue: &'a str,
    /// Queue-local message id (the queue's order).
    pub id: u64,
    /// Delivered at least once before this record was written (compaction copies carry it).
    pub redelivered: bool,
    /// Expiry deadline, milliseconds since the Unix epoch.
    pub expires_at_ms: Option<u64>,
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Pre-encoded content header payload (class, weight, size, properties).
    pub header: &'a [u8],
    pub body: &'a [u8],
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Enqueue(Enqueue<'a>),
    /// Messages handed to a consumer (they come back redelivered after a restart).
    Delivered {
        queue: &'a str,
        ids: Vec<u64>,
    },
    /// Messages gone for good (acked, dropped, expired, dead-lettered, purged).
    Settle {
        queue: &'a str,
        ids: Vec<u64>,
    },
    /// The queue was deleted: forget everything logged for it before.
    DeleteQueue {
        queue: &'a str,
    },
}

fn put_str16(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len().min(u16::MAX as usize);
    out.extend_from_slice(&(n as u16).to_le_bytes());
    out.extend_from_slice(&s[..n]);
}

fn put_blob32(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s);
}

/// Appends one framed record to `out`; returns its total size (header included).
pub fn encode(rec: &Record<'_>, out: &mut Vec<u8>) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0u8; HEADER]);
    match rec {
        Record::Enqueue(e) => {
            out.push(KIND_ENQUEUE);
            put_str16(out, e.queue.as_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
            out.push(u8::from(e.redelivered) | (u8::from(e.expires_at_ms.is_some()) << 1));
            out.extend_from_slice(&e.expires_at_ms.unwrap_or(0).to_le_bytes());
            put_str16(out, e.exchange.as_bytes());
            put_str16(out, e.routing_key.as_bytes());
            put_blob32(out, e.header);
            put_blob32(out, e.body);
        }
        Record::Delivered { queue, ids } | Record::Settle { queue, ids } => {
            out.push(if matches!(rec, Record::Delivered { .. }) {
                KIND_DELIVERED
            } else {
                KIND_SETTLE
            });
            put_str16(out, queue.as_bytes());
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                out.extend_from_slice(&id.to_le_bytes());
            }
        }
        Record::DeleteQueue { queue } => {
            out.push(KIND_DELETE_QUEUE);
            put_str16(out, queue.as_bytes());
        }
    }
    let len = out.len() - start - HEADER;
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.len() - start
}

/// Sets the redelivered flag of the framed enqueue record at the start of `buf` (as written by
/// [`encode`]) and its checksum: the message was handed to a consumer before its record left
/// memory. Returns false, changing nothing, if `buf` does not start with a whole enqueue record.
pub fn mark_redelivered(buf: &mut [u8]) -> bool {
    let Some(&[l0, l1, l2, l3]) = buf.get(..4) else {
        return false;
    };
    let len = u32::from_le_bytes([l0, l1, l2, l3]) as usize;
    let Some(payload) = buf.get_mut(HEADER..HEADER + len) else {
        return false;
    };
    let Some(&[KIND_ENQUEUE, q0, q1]) = payload.get(..3) else {
        return false;
    };
    // Kind, queue name (u16 length and bytes), id (u64), then the flags byte.
    let flags = 3 + u16::from_le_bytes([q0, q1]) as usize + 8;
    let Some(f) = payload.get_mut(flags) else {
        return false;
    };
    *f |= 1;
    let crc = crc32fast::hash(payload);
    buf[4..HEADER].copy_from_slice(&crc.to_le_bytes());
    true
}

/// Cursor over a payload; every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .and_then(|b| b.try_into().ok())
            .map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn str16(&mut self) -> Option<&'a str> {
        let n = self.u16()? as usize;
        std::str::from_utf8(self.take(n)?).ok()
    }
    fn blob32(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn ids(&mut self) -> Option<Vec<u64>> {
        let n = self.u32()? as usize;
        if n > (self.buf.len() - self.pos) / 8 {
            return None;
        }
        (0..n).map(|_| self.u64()).collect()
    }
}

/// Decodes a payload (checksum already verified). None if malformed.
pub fn decode_payload(p: &[u8]) -> Option<Record<'_>> {
    let mut r = Reader { buf: p, pos: 0 };
    let rec = match r.u8()? {
        KIND_ENQUEUE => {
            let queue = r.str16()?;
            let id = r.u64()?;
            let flags = r.u8()?;
            let exp = r.u64()?;
            let exchange = r.str16()?;
            let routing_key = r.str16()?;
            let header = r.blob32()?;
            let body = r.blob32()?;
            Record::Enqueue(Enqueue {
                queue,
                id,
                redelivered: flags & 1 != 0,
                expires_at_ms: (flags & 2 != 0).then_some(exp),
                exchange,
                routing_key,
                header,
                body,
            })
        }
        KIND_DELIVERED => Record::Delivered {
            queue: r.str16()?,
            ids: r.ids()?,
        },
        KIND_SETTLE => Record::Settle {
            queue: r.str16()?,
            ids: r.ids()?,
        },
        KIND_DELETE_QUEUE => Record::DeleteQueue { queue: r.str16()? },
        _ => return None,
    };
    (r.pos == p.len()).then_some(rec)
}

/// Outcome of reading one record at an offset.
#[derive(Debug, PartialEq, Eq)]
enum At<'a> {
    /// A good record and its total size.
    Good(Record<'a>, usize),
    /// Exactly at the end of the buffer.
    End,
    /// Only zero bytes from here on: the unwritten rest of a pre-written segment.
    Zeros,
    /// Not enough bytes for the header or the announced payload (torn write).
    Torn,
    /// The header is whole but the checksum or the payload is wrong; the announced size.
    Bad(usize),
}

fn read_at(buf: &[u8], off: usize) -> At<'_> {
    let rest = &buf[off.min(buf.len())..];
    if rest.is_empty() {
        return At::End;
    }
    if rest.len() < HEADER {
        return At::Torn;
    }
    if rest[..HEADER] == [0u8; HEADER] && rest.iter().all(|&b| b == 0) {
        return At::Zeros;
    }
    let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
    let crc = u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]]);
    if len == 0 || len > MAX_PAYLOAD {
        return At::Bad(HEADER);
    }
    let Some(payload) = rest.get(HEADER..HEADER + len) else {
        return At::Torn;
    };
    if crc32fast::hash(payload) != crc {
        return At::Bad(HEADER + len);
    }
    match decode_payload(payload) {
        Some(r) => At::Good(r, HEADER + len),
        None => At::Bad(HEADER + len),
    }
}

/// Decodes exactly one framed record (header, checksum, payload) filling `buf`; None if the
/// checksum fails, the payload is malformed or `buf` holds more or less than one record.
pub fn decode_framed(buf: &[u8]) -> Option<Record<'_>> {
    match read_at(buf, 0) {
        At::Good(r, n) if n == buf.len() => Some(r),
        _ => None,
    }
}

/// A scanned segment: its good records with their offsets and sizes, and where it is damaged.
#[derive(Debug, Default)]
pub struct Scan<'a> {
    pub records: Vec<(usize, usize, Record<'a>)>,
    /// Length of the undamaged prefix; the file can be cut here when `cut` is set.
    pub valid_len: usize,
    /// Damage found that ended the scan (the rest of the segment is dropped).
    pub cut: Option<String>,
    /// Damaged records skipped in the middle (the records after them were good).
    pub skipped: Vec<String>,
}

/// Scans a whole segment file's bytes. Never panics, whatever the input.
///
/// A record whose checksum fails but whose length leads exactly to another good record (or to
/// the end of the file) is skipped alone; any other damage ends the scan there. Segments are
/// written full of zeros before use, so a remainder of only zero bytes is the clean end of the
/// segment (`valid_len` stops before it); a damaged record followed by zeros is a torn tail and
/// is cut, as are zeros followed by anything else.
pub fn scan(buf: &[u8]) -> Scan<'_> {
    let mut s = Scan::default();
    if buf.len() < MAGIC.len() || &buf[..MAGIC.len()] != MAGIC {
        s.cut = Some("missing or damaged segment header".into());
        return s;
    }
    let mut off = MAGIC.len();
    s.valid_len = off;
    loop {
        match read_at(buf, off) {
            At::End | At::Zeros => break,
            At::Good(r, n) => {
                s.records.push((off, n, r));
                off += n;
                s.valid_len = off;
            }
            At::Torn => {
                s.cut = Some(format!("torn record at offset {off}"));
                break;
            }
            At::Bad(n) => {
                let next = off + n;
                let after = read_at(buf, next);
                let resyncs = n > HEADER && matches!(after, At::Good(..) | At::End);
                if after == At::Zeros {
                    s.cut = Some(format!("torn record at offset {off} (zeros follow)"));
                    break;
                } else if resyncs {
                    s.skipped
                        .push(format!("corrupt record at offset {off} ({n} bytes)"));
                    off = next;
                    s.valid_len = off;
                } else {
                    s.cut = Some(format!("corrupt record at offset {off}"));
                    break;
                }
            }
        }
    }
    s
}

/// Scans a delivery journal (records without a file header, see [`super::disk`]): the good
/// records from the start up to the first damage (a torn tail is expected after a crash).
/// Never panics, whatever the input.
pub fn scan_journal(buf: &[u8]) -> Vec<Record<'_>> {
    let mut out = Vec::new();
    let mut off = 0;
    while let At::Good(r, n) = read_at(buf, off) {
        out.push(r);
        off += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn enq(id: u64, body: &[u8]) -> Record<'_> {
        Record::Enqueue(Enqueue {
            queue: "/\0q",
            id,
            redelivered: id % 2 == 0,
            expires_at_ms: (id % 3 == 0).then_some(id * 1000),
            exchange: "ex",
            routing_key: "rk",
            header: b"hdr",
            body,
        })
    }

    fn segment(recs: &[Record<'_>]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        for r in recs {
            encode(r, &mut out);
        }
        out
    }

    #[test]
    fn marking_an_enqueue_redelivered_keeps_it_valid_and_changes_only_the_flag() {
        for id in [1u64, 3] {
            let mut buf = Vec::new();
            encode(&enq(id, b"body"), &mut buf);
            let Some(Record::Enqueue(before)) = decode_framed(&buf) else {
                panic!("not an enqueue");
            };
            assert!(!before.redelivered);
            let before = format!("{before:?}");
            let mut marked = buf.clone();
            assert!(mark_redelivered(&mut marked));
            let Some(Record::Enqueue(after)) = decode_framed(&marked) else {
                panic!("the marked record does not decode");
            };
            assert!(after.redelivered);
            assert_eq!(
                format!("{after:?}"),
                before.replace("redelivered: false", "redelivered: true")
            );
            // Marking again changes nothing.
            let mut twice = marked.clone();
            assert!(mark_redelivered(&mut twice));
            assert_eq!(twice, marked);
        }
        // Other records, cut records and empty input are left alone.
        let mut settle = Vec::new();
        encode(
            &Record::Settle {
                queue: "q",
                ids: vec![1],
            },
            &mut settle,
        );
        let copy = settle.clone();
        assert!(!mark_redelivered(&mut settle));
        assert_eq!(settle, copy);
        let mut cut = Vec::new();
        encode(&enq(1, b"body"), &mut cut);
        cut.truncate(cut.len() - 1);
        assert!(!mark_redelivered(&mut cut));
        assert!(!mark_redelivered(&mut []));
    }

    #[test]
    fn records_round_trip() {
        let recs = vec![
            enq(1, b"hello"),
            enq(2, b""),
            enq(3, &[7u8; 5000]),
            Record::Delivered {
                queue: "/\0q",
                ids: vec![1, 2],
            },
            Record::Settle {
                queue: "/\0q",
                ids: vec![2],
            },
            Record::DeleteQueue { queue: "v\0other" },
        ];
        let seg = segment(&recs);
        let s = scan(&seg);
        assert!(s.cut.is_none() && s.skipped.is_empty());
        assert_eq!(s.valid_len, seg.len());
        let got: Vec<_> = s.records.into_iter().map(|(_, _, r)| r).collect();
        assert_eq!(got, recs);
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_good_record() {
        let seg = segment(&[enq(1, b"a"), enq(2, b"bb")]);
        let first_end = MAGIC.len() + encode(&enq(1, b"a"), &mut Vec::new());
        for cut in first_end + 1..seg.len() {
            let s = scan(&seg[..cut]);
            assert_eq!(s.records.len(), 1, "cut at {cut}");
            assert_eq!(s.valid_len, first_end);
            assert!(s.cut.is_some());
        }
    }

    #[test]
    fn a_flipped_byte_in_a_middle_record_skips_only_that_record() {
        let recs = [enq(1, b"aaaa"), enq(2, b"bbbb"), enq(3, b"cccc")];
        let mut seg = segment(&recs);
        let second = MAGIC.len() + encode(&recs[0], &mut Vec::new());
        seg[second + HEADER + 20] ^= 0xff;
        let s = scan(&seg);
        let ids: Vec<u64> = s
            .records
            .iter()
            .filter_map(|(_, _, r)| match r {
                Record::Enqueue(e) => Some(e.id),
                _ => None,
            })
            .collect();
        assert_eq!(ids, vec![1, 3]);
        assert_eq!(s.skipped.len(), 1);
    }

    #[test]
    fn a_flipped_length_ends_the_scan_there() {
        let recs = [enq(1, b"aaaa"), enq(2, b"bbbb"), enq(3, b"cccc")];
        let mut seg = segment(&recs);
        let second = MAGIC.len() + encode(&recs[0], &mut Vec::new());
        seg[second + 1] ^= 0x40;
        let s = scan(&seg);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.valid_len, second);
        assert!(s.cut.is_some());
    }

    #[test]
    fn a_journal_is_read_up_to_its_torn_tail() {
        let recs = [
            Record::Delivered {
                queue: "/\0q",
                ids: vec![1, 2],
            },
            Record::Delivered {
                queue: "/\0q",
                ids: vec![3],
            },
        ];
        let mut j = Vec::new();
        for r in &recs {
            encode(r, &mut j);
        }
        assert_eq!(scan_journal(&j), recs.to_vec());
        assert_eq!(scan_journal(&j[..j.len() - 3]), recs[..1].to_vec());
        assert!(scan_journal(&[]).is_empty());
        assert!(scan_journal(&[0u8; 64]).is_empty());
    }

    /// A segment as the store writes it: records, then zeros up to `size`.
    fn prewritten(recs: &[Record<'_>], size: usize) -> Vec<u8> {
        let mut seg = segment(recs);
        seg.resize(size, 0);
        seg
    }

    #[test]
    fn a_zero_remainder_is_the_clean_end_of_a_prewritten_segment() {
        let recs = [enq(1, b"a"), enq(2, b"bb")];
        let written = segment(&recs).len();
        let seg = prewritten(&recs, 4096);
        let s = scan(&seg);
        assert_eq!(s.records.len(), 2);
        assert_eq!(s.valid_len, written);
        assert!(s.cut.is_none() && s.skipped.is_empty());
        // An empty pre-written segment: just the header.
        let empty = prewritten(&[], 4096);
        let s = scan(&empty);
        assert!(s.records.is_empty() && s.cut.is_none());
        assert_eq!(s.valid_len, MAGIC.len());
    }

    #[test]
    fn a_torn_record_followed_by_zeros_is_cut() {
        let recs = [enq(1, b"aaaa"), enq(2, &[9u8; 200])];
        let first_end = MAGIC.len() + encode(&recs[0], &mut Vec::new());
        let full = segment(&recs);
        // The crash kept every prefix of the second record's bytes (header included) and the
        // rest of the segment is still zeros.
        for kept in 1..full.len() - first_end {
            let mut seg = full[..first_end + kept].to_vec();
            seg.resize(4096, 0);
            let s = scan(&seg);
            assert_eq!(s.records.len(), 1, "kept {kept}");
            assert_eq!(s.valid_len, first_end, "kept {kept}");
            assert!(s.cut.is_some(), "kept {kept}: not reported");
            assert!(s.skipped.is_empty());
        }
    }

    #[test]
    fn zeros_followed_by_data_are_damage_not_an_end() {
        let recs = [enq(1, b"aaaa"), enq(2, b"bbbb"), enq(3, b"cccc")];
        let mut seg = prewritten(&recs, 4096);
        let second = MAGIC.len() + encode(&recs[0], &mut Vec::new());
        let third = second + encode(&recs[1], &mut Vec::new());
        // A hole where the second record was (a page that never reached the disk).
        seg[second..third].fill(0);
        let s = scan(&seg);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.valid_len, second);
        assert!(s.cut.is_some());
    }

    proptest! {
        #[test]
        fn scanning_random_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let mut buf = MAGIC.to_vec();
            buf.extend_from_slice(&bytes);
            let s = scan(&buf);
            prop_assert!(s.valid_len <= buf.len());
            let _ = scan(&bytes);
        }

        #[test]
        fn truncation_or_a_flip_never_yields_a_record_that_was_not_written(
            bodies in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..8),
            cut_frac in 0.0f64..1.0,
            flip in proptest::option::of((0.0f64..1.0, 1u8..=255)),
        ) {
            let recs: Vec<Record<'_>> = bodies.iter().enumerate().map(|(i, b)| enq(i as u64 + 1, b)).collect();
            let mut seg = segment(&recs);
            let cut = MAGIC.len() + ((seg.len() - MAGIC.len()) as f64 * cut_frac) as usize;
            seg.truncate(cut.max(MAGIC.len()));
            if let Some((pos, x)) = flip {
                if seg.len() > MAGIC.len() {
                    let p = MAGIC.len() + ((seg.len() - MAGIC.len()) as f64 * pos) as usize;
                    let p = p.min(seg.len() - 1);
                    seg[p] ^= x;
                }
            }
            let s = scan(&seg);
            let mut last = 0;
            for (_, _, r) in &s.records {
                // Every record found is one that was written, unchanged, in order.
                let Record::Enqueue(e) = r else { panic!("unexpected record kind") };
                prop_assert!(e.id > last);
                last = e.id;
                prop_assert_eq!(r, &recs[e.id as usize - 1]);
            }
        }
    }
}
