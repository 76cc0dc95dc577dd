//! A pure, incremental AMQP 0-9-1 frame scanner: it follows frame boundaries across reads without
//! buffering frames, and reports each method frame (class-id, method-id) at the byte where the
//! frame ends (after its 0xCE end byte).
//!
//! Stream shape: an optional 8-byte protocol header (`AMQP\0\0\9\1`, sent by the client only),
//! then frames: type(1) channel(2) size(4) payload(size) end(1 = 0xCE). A method frame's payload
//! starts with class-id(2) method-id(2). Anything that breaks this shape (a wrong end byte) puts the
//! scanner in [`State::Lost`], where it reports nothing more: garbage never panics and never fires.
//!
//! Invariant worth naming: the reports depend only on the bytes, never on how they were split into
//! reads (property-tested below).

/// A method frame that ended in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method {
    pub class: u16,
    pub method: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Nothing seen yet: a protocol header or a frame may follow.
    Start,
    /// Inside the 8-byte protocol header; `n` bytes of it seen.
    ProtocolHeader { n: u8 },
    /// Inside the 7-byte frame header; `n` bytes of it seen.
    FrameHeader { n: u8 },
    /// Inside a payload: `left` bytes to skip; `head` collects the first 4 bytes of a method.
    Payload { left: u64, seen: u8 },
    /// Expecting the 0xCE end byte.
    End,
    /// The stream is not AMQP (or lost sync): report nothing more.
    Lost,
}

const FRAME_END: u8 = 0xCE;
const FRAME_METHOD: u8 = 1;

/// The scanner; see the module doc.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scanner {
    state: State,
    header: [u8; 7],
    head: [u8; 4],
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    pub fn new() -> Self {
        Self {
            state: State::Start,
            header: [0; 7],
            head: [0; 4],
        }
    }

    /// True once the stream has been found not to be AMQP.
    pub fn is_lost(&self) -> bool {
        self.state == State::Lost
    }

    /// Consumes bytes of `data` up to and including the end of the next method frame.
    /// Returns how many bytes were consumed and the method, if one ended there; `(data.len(), None)`
    /// when no method frame ends inside `data`.
    pub fn scan(&mut self, data: &[u8]) -> (usize, Option<Method>) {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Lost => return (data.len(), None),
                State::Start => {
                    self.state = if data[i] == b'A' {
                        State::ProtocolHeader { n: 0 }
                    } else {
                        State::FrameHeader { n: 0 }
                    };
                }
                State::ProtocolHeader { n } => {
                    // Skip the header bytes; a wrong header is the server's problem, not ours.
                    let take = (8 - n as usize).min(data.len() - i);
                    i += take;
                    let n = n as usize + take;
                    self.state = if n == 8 {
                        State::FrameHeader { n: 0 }
                    } else {
                        State::ProtocolHeader { n: n as u8 }
                    };
                }
                State::FrameHeader { n } => {
                    let n = n as usize;
                    let take = (7 - n).min(data.len() - i);
                    self.header[n..n + take].copy_from_slice(&data[i..i + take]);
                    i += take;
                    if n + take < 7 {
                        self.state = State::FrameHeader {
                            n: (n + take) as u8,
                        };
                        continue;
                    }
                    if !matches!(self.header[0], 1 | 2 | 3 | 4 | 8) {
                        self.state = State::Lost;
                        continue;
                    }
                    let size = u32::from_be_bytes([
                        self.header[3],
                        self.header[4],
                        self.header[5],
                        self.header[6],
                    ]);
                    self.state = if size == 0 {
                        State::End
                    } else {
                        State::Payload {
                            left: u64::from(size),
                            seen: 0,
                        }
                    };
                }
                State::Payload { left, seen } => {
                    let mut left = left;
                    let mut seen = seen;
                    if self.header[0] == FRAME_METHOD && seen < 4 {
                        let take = (4 - seen as usize)
                            .min(data.len() - i)
                            .min(usize::try_from(left).unwrap_or(usize::MAX));
                        let s = seen as usize;
                        self.head[s..s + take].copy_from_slice(&data[i..i + take]);
                        i += take;
                        seen += take as u8;
                        left -= take as u64;
                    } else {
                        let avail = (data.len() - i) as u64;
                        let take = left.min(avail);
                        i += take as usize;
                        left -= take;
                    }
                    self.state = if left == 0 {
                        State::End
                    } else {
                        State::Payload { left, seen }
                    };
                    if let State::Payload { .. } = self.state {
                        continue;
                    }
                    // A method payload shorter than 4 bytes is malformed.
                    if self.header[0] == FRAME_METHOD && seen < 4 {
                        self.state = State::Lost;
                    }
                }
                State::End => {
                    let b = data[i];
                    i += 1;
                    if b != FRAME_END {
                        self.state = State::Lost;
                        continue;
                    }
                    self.state = State::FrameHeader { n: 0 };
                    if self.header[0] == FRAME_METHOD {
                        let m = Method {
                            class: u16::from_be_bytes([self.head[0], self.head[1]]),
                            method: u16::from_be_bytes([self.head[2], self.head[3]]),
                        };
                        return (i, Some(m));
                    }
                }
            }
        }
        (data.len(), None)
    }

    /// Every method frame ending in `data`, with the offset just after its end byte.
    pub fn scan_all(&mut self, data: &[u8]) -> Vec<(usize, Method)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let (n, m) = self.scan(&data[at..]);
            at += n;
            if let Some(m) = m {
                out.push((at, m));
            }
        }
        out
    }
}

/// (method name, method id).
type Methods = &'static [(&'static str, u16)];

/// (class name, class id, its methods).
const CLASSES: &[(&str, u16, Methods)] = &[
    (
        "connection",
        10,
        &[
            ("start", 10),
            ("start-ok", 11),
            ("secure", 20),
            ("secure-ok", 21),
            ("tune", 30),
            ("tune-ok", 31),
            ("open", 40),
            ("open-ok", 41),
            ("close", 50),
            ("close-ok", 51),
            ("blocked", 60),
            ("unblocked", 61),
            ("update-secret", 70),
            ("update-secret-ok", 71),
        ],
    ),
    (
        "channel",
        20,
        &[
            ("open", 10),
            ("open-ok", 11),
            ("flow", 20),
            ("flow-ok", 21),
            ("close", 40),
            ("close-ok", 41),
        ],
    ),
    (
        "exchange",
        40,
        &[
            ("declare", 10),
            ("declare-ok", 11),
            ("delete", 20),
            ("delete-ok", 21),
            ("bind", 30),
            ("bind-ok", 31),
            ("unbind", 40),
            ("unbind-ok", 51),
        ],
    ),
    (
        "queue",
        50,
        &[
            ("declare", 10),
            ("declare-ok", 11),
            ("bind", 20),
            ("bind-ok", 21),
            ("purge", 30),
            ("purge-ok", 31),
            ("delete", 40),
            ("delete-ok", 41),
            ("unbind", 50),
            ("unbind-ok", 51),
        ],
    ),
    (
        "basic",
        60,
        &[
            ("qos", 10),
            ("qos-ok", 11),
            ("consume", 20),
            ("consume-ok", 21),
            ("cancel", 30),
            ("cancel-ok", 31),
            ("publish", 40),
            ("return", 50),
            ("deliver", 60),
            ("get", 70),
            ("get-ok", 71),
            ("get-empty", 72),
            ("ack", 80),
            ("reject", 90),
            ("recover-async", 100),
            ("recover", 110),
            ("recover-ok", 111),
            ("nack", 120),
        ],
    ),
    ("confirm", 85, &[("select", 10), ("select-ok", 11)]),
    (
        "tx",
        90,
        &[
            ("select", 10),
            ("select-ok", 11),
            ("commit", 20),
            ("commit-ok", 21),
            ("rollback", 30),
            ("rollback-ok", 31),
        ],
    ),
];

/// Maps `class.method` (e.g. `basic.publish`, `queue.declare-ok`, `basic.get_ok`, or numeric
/// `60.40`) to its ids.
pub fn method_ids(name: &str) -> Option<Method> {
    let (c, m) = name.trim().split_once('.')?;
    if let (Ok(class), Ok(method)) = (c.parse::<u16>(), m.parse::<u16>()) {
        return Some(Method { class, method });
    }
    let c = c.to_ascii_lowercase();
    let m = m.to_ascii_lowercase().replace('_', "-");
    let (_, class, methods) = CLASSES.iter().find(|(n, _, _)| *n == c)?;
    let (_, method) = methods.iter().find(|(n, _)| *n == m)?;
    Some(Method {
        class: *class,
        method: *method,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind];
        v.extend_from_slice(&channel.to_be_bytes());
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v.push(FRAME_END);
        v
    }

    fn method(class: u16, m: u16, args: &[u8]) -> Vec<u8> {
        let mut p = class.to_be_bytes().to_vec();
        p.extend_from_slice(&m.to_be_bytes());
        p.extend_from_slice(args);
        frame(1, 1, &p)
    }

    fn publish_stream() -> Vec<u8> {
        let mut s = b"AMQP\x00\x00\x09\x01".to_vec();
        s.extend(method(10, 11, b"start-ok args"));
        s.extend(method(60, 40, b"\0\0\0\x01q\0"));
        s.extend(frame(2, 1, &[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0]));
        s.extend(frame(3, 1, b"hello"));
        s.extend(frame(8, 0, b""));
        s.extend(method(60, 40, b""));
        s
    }

    #[test]
    fn finds_methods_at_their_end_byte() {
        let s = publish_stream();
        let found = Scanner::new().scan_all(&s);
        assert_eq!(found.len(), 3);
        assert_eq!(
            found[0].1,
            Method {
                class: 10,
                method: 11
            }
        );
        assert_eq!(found[1].1, method_ids("basic.publish").unwrap());
        assert_eq!(s[found[1].0 - 1], FRAME_END);
        assert_eq!(found[2].0, s.len());
    }

    #[test]
    fn garbage_loses_sync_and_reports_nothing() {
        let mut sc = Scanner::new();
        assert!(sc.scan_all(b"GET / HTTP/1.1\r\n\r\n").is_empty());
        assert!(sc.is_lost());
        let mut sc = Scanner::new();
        let mut bad = method(60, 40, b"");
        *bad.last_mut().unwrap() = 0;
        bad.extend(method(60, 40, b""));
        assert!(sc.scan_all(&bad).is_empty());
    }

    #[test]
    fn names_map_to_ids() {
        assert_eq!(
            method_ids("basic.publish"),
            Some(Method {
                class: 60,
                method: 40
            })
        );
        assert_eq!(
            method_ids("basic.get_ok"),
            Some(Method {
                class: 60,
                method: 71
            })
        );
        assert_eq!(
            method_ids("confirm.select"),
            Some(Method {
                class: 85,
                method: 10
            })
        );
        assert_eq!(
            method_ids("60.80"),
            Some(Method {
                class: 60,
                method: 80
            })
        );
        assert_eq!(method_ids("basic.nope"), None);
        assert_eq!(method_ids("publish"), None);
    }

    fn split_scan(data: &[u8], cuts: &[usize]) -> (Vec<(usize, Method)>, Scanner) {
        let mut sc = Scanner::new();
        let mut out = Vec::new();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (data.len() + 1)).collect();
        cuts.sort_unstable();
        let mut start = 0;
        for end in cuts.into_iter().chain(std::iter::once(data.len())) {
            let chunk = &data[start..end.max(start)];
            for (off, m) in sc.scan_all(chunk) {
                out.push((start + off, m));
            }
            start = end.max(start);
        }
        (out, sc)
    }

    /// A basic.publish whose arguments hold a field table nested `depth` deep (each level a
    /// table with one entry `k` -> table): what a hostile client sends to make a recursive
    /// parser overflow its stack.
    fn nested_table_publish(depth: usize) -> Vec<u8> {
        let mut table: Vec<u8> = Vec::new(); // innermost: empty
        for _ in 0..depth {
            let mut outer = vec![1, b'k', b'F'];
            outer.extend_from_slice(&(table.len() as u32).to_be_bytes());
            outer.extend_from_slice(&table);
            table = outer;
        }
        let mut args = vec![0, 0, 0, 0]; // reserved-1, empty exchange, empty routing key (short)
        args.extend_from_slice(&(table.len() as u32).to_be_bytes());
        args.extend_from_slice(&table);
        method(60, 40, &args)
    }

    /// Review finding (admin hardening): the scanner has no recursion and no buffer. Its whole
    /// state is a few fixed-size fields; a frame's payload is skipped by counting, never held,
    /// whatever size the header claims, and method arguments (field tables included) are never
    /// parsed: only class-id and method-id are read.
    #[test]
    fn the_state_is_fixed_size() {
        assert!(
            std::mem::size_of::<Scanner>() <= 32,
            "{}",
            std::mem::size_of::<Scanner>()
        );
    }

    #[test]
    fn a_huge_declared_frame_size_is_counted_not_buffered() {
        let mut sc = Scanner::new();
        let mut head = vec![FRAME_METHOD, 0, 1];
        head.extend_from_slice(&u32::MAX.to_be_bytes());
        head.extend_from_slice(&[0, 60, 0, 40]);
        assert_eq!(sc.scan(&head), (head.len(), None));
        let chunk = vec![0xAAu8; 1 << 20];
        for _ in 0..64 {
            assert_eq!(sc.scan(&chunk), (chunk.len(), None));
        }
        assert_eq!(
            sc.state,
            State::Payload {
                left: u64::from(u32::MAX) - 4 - (64 << 20),
                seen: 4
            }
        );
        // A 16 MiB + 1 frame (far above any frame_max) passes through and is reported at its end.
        let mut sc = Scanner::new();
        let mut big = method(60, 40, &vec![0x55; 16 << 20]);
        let first = big.len();
        big.extend(method(60, 80, b"ack"));
        let mut found = Vec::new();
        for (i, c) in big.chunks(1 << 20).enumerate() {
            for (off, m) in sc.scan_all(c) {
                found.push((i * (1 << 20) + off, m));
            }
        }
        let ends: Vec<usize> = found.iter().map(|f| f.0).collect();
        assert_eq!(ends, vec![first, big.len()]);
        assert_eq!(found[0].1, method_ids("basic.publish").unwrap());
    }

    #[test]
    fn deeply_nested_field_tables_are_skipped_without_recursion() {
        let frame = nested_table_publish(100_000);
        assert!(frame.len() > 600_000);
        let mut stream = frame.clone();
        stream.extend(method(60, 80, b""));
        // Whole, and one byte per read (the worst split), give the same two methods.
        let whole = Scanner::new().scan_all(&stream);
        let mut sc = Scanner::new();
        let mut bytewise = Vec::new();
        for (i, b) in stream.iter().enumerate() {
            if let (1, Some(m)) = sc.scan(std::slice::from_ref(b)) {
                bytewise.push((i + 1, m));
            }
        }
        assert_eq!(whole, bytewise);
        assert_eq!(
            whole[0],
            (frame.len(), method_ids("basic.publish").unwrap())
        );
        assert_eq!(whole[1].1, method_ids("basic.ack").unwrap());
    }

    proptest! {
        #[test]
        fn nested_tables_are_split_invariant(depth in 0usize..3000,
                                             cuts in proptest::collection::vec(any::<usize>(), 0..30)) {
            let mut data = nested_table_publish(depth);
            data.extend(publish_stream()[8..].iter().copied());
            let whole = Scanner::new().scan_all(&data);
            let (split, _) = split_scan(&data, &cuts);
            prop_assert_eq!(whole.len(), 4);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn split_invariant_on_garbage(data in proptest::collection::vec(any::<u8>(), 0..600),
                                      cuts in proptest::collection::vec(any::<usize>(), 0..20)) {
            let whole = Scanner::new().scan_all(&data);
            let (split, _) = split_scan(&data, &cuts);
            prop_assert_eq!(whole, split);
        }

        #[test]
        fn split_invariant_on_frames(n in 1usize..20, cuts in proptest::collection::vec(any::<usize>(), 0..30),
                                     tail in proptest::collection::vec(any::<u8>(), 0..40)) {
            let mut data = Vec::new();
            for _ in 0..n { data.extend(publish_stream()); }
            data.extend(tail);
            let mut whole_sc = Scanner::new();
            let whole = whole_sc.scan_all(&data);
            let (split, split_sc) = split_scan(&data, &cuts);
            prop_assert!(whole.len() >= 3);
            prop_assert_eq!(whole, split);
            prop_assert_eq!(whole_sc, split_sc);
        }
    }
}
