//! Consumer loop: one connection, channel 1, basic.consume already issued.
//!
//! Reads as much as the socket has into a fixed buffer, walks the frames in place (only
//! `basic.deliver`'s tag, the header's body size and the first 12 body bytes are looked at), then
//! writes the acks for the whole read in one go. With `multi_ack_every` N > 1 one `basic.ack` with
//! `multiple` covers N deliveries; N = 1 acks each delivery alone.

use std::{io, sync::Arc};

use tokio::{io::AsyncWriteExt, time::Instant};

use crate::{
    codec::{self, BASIC_DELIVER, CLASS_BASIC, FRAME_BODY, FRAME_HEADER, FRAME_METHOD},
    connection::{Conn, ConnError, CHANNEL},
    ids::IdSet,
    producer::unix_ns,
    stats::Stats,
};

/// A stamp further than this from our clock is not ours (another publisher's body): not counted.
const PLAUSIBLE_NS: u64 = 3_600 * 1_000_000_000;

/// Settings of one consumer.
#[derive(Clone, Debug)]
pub struct ConsumerConfig {
    /// Consumed with no-ack: nothing to acknowledge.
    pub auto_ack: bool,
    /// Deliveries per basic.ack (>= 1).
    pub ack_every: u32,
    /// Stamps older than this (ns since the Unix epoch) were published before this run started:
    /// counted as stale, left out of the latency (0 = no check, e.g. when the producers run
    /// in another process).
    pub not_before: u64,
    /// Stop after this long without a delivery (--exit-when idle).
    pub exit_idle: Option<std::time::Duration>,
    /// Record the ids of the deliveries (--ids-out).
    pub track_ids: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Content {
    Idle,
    Header {
        tag: u64,
    },
    Body {
        tag: u64,
        left: u64,
        first: bool,
        stamp: Option<(u32, u64)>,
    },
}

/// Per-read state of the frame walk; pure so it can be tested without sockets.
#[derive(Debug)]
struct Walker {
    content: Content,
    pending: u32,
    ack_every: u32,
    auto_ack: bool,
    not_before: u64,
    /// Delivered ids, with --ids-out.
    ids: Option<IdSet>,
}

/// What one walk over the buffered bytes found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Walked {
    used: usize,
    delivered: u64,
    stale: u64,
    controls: Vec<(u16, Vec<u8>)>,
}

impl Walker {
    /// Walks complete frames in `data`, appending acks to `acks` and stamp latencies via `lat`.
    fn walk(
        &mut self,
        data: &[u8],
        max_payload: usize,
        now_unix: u64,
        acks: &mut Vec<u8>,
        mut lat: impl FnMut(u64),
    ) -> Result<Walked, ConnError> {
        let mut w = Walked::default();
        while let Some((f, used)) = codec::split_frame(&data[w.used..], max_payload)? {
            w.used += used;
            let done = match (f.kind, self.content) {
                (FRAME_METHOD, _) => {
                    if codec::method_ids(f.payload) == Some((CLASS_BASIC, BASIC_DELIVER)) {
                        self.content = Content::Header {
                            tag: codec::deliver_tag(f.payload)?,
                        };
                    } else {
                        w.controls.push((f.channel, f.payload.to_vec()));
                    }
                    None
                }
                (FRAME_HEADER, Content::Header { tag }) => {
                    let left = codec::header_body_size(f.payload)?;
                    if left == 0 {
                        Some((tag, None))
                    } else {
                        self.content = Content::Body {
                            tag,
                            left,
                            first: true,
                            stamp: None,
                        };
                        None
                    }
                }
                (
                    FRAME_BODY,
                    Content::Body {
                        tag,
                        left,
                        first,
                        stamp,
                    },
                ) => {
                    let stamp = if first {
                        codec::read_stamp(f.payload)
                    } else {
                        stamp
                    };
                    let left = left.saturating_sub(f.payload.len() as u64);
                    if left == 0 {
                        Some((tag, stamp))
                    } else {
                        self.content = Content::Body {
                            tag,
                            left,
                            first: false,
                            stamp,
                        };
                        None
                    }
                }
                _ => None, // heartbeats; content frames of something we did not ask for
            };
            if let Some((tag, stamp)) = done {
                self.content = Content::Idle;
                w.delivered += 1;
                if let Some((id, sent)) = stamp {
                    if let Some(ids) = &mut self.ids {
                        ids.insert(id);
                    }
                    if sent < self.not_before {
                        w.stale += 1;
                    } else if sent <= now_unix.saturating_add(1_000_000_000)
                        && now_unix.saturating_sub(sent) < PLAUSIBLE_NS
                    {
                        lat(now_unix.saturating_sub(sent));
                    }
                }
                if !self.auto_ack {
                    self.pending += 1;
                    if self.pending >= self.ack_every {
                        codec::encode_ack(acks, CHANNEL, tag, self.ack_every > 1);
                        self.pending = 0;
                    }
                }
            }
        }
        Ok(w)
    }
}

/// Runs until `deadline` (or until idle for `exit_idle`), then hands the connection back for
/// closing. The delivered ids go to `stats` whether it ends well or not.
pub async fn run(
    conn: Conn,
    cfg: ConsumerConfig,
    stats: Arc<Stats>,
    deadline: Instant,
) -> Result<Conn, ConnError> {
    let mut walker = Walker {
        content: Content::Idle,
        pending: 0,
        ack_every: cfg.ack_every.max(1),
        auto_ack: cfg.auto_ack,
        not_before: cfg.not_before,
        ids: cfg.track_ids.then(IdSet::default),
    };
    let result = consume(conn, &cfg, &stats, deadline, &mut walker).await;
    if let (Some(ids), Ok(mut all)) = (&walker.ids, stats.consumed_ids.lock()) {
        all.merge(ids);
    }
    result
}

async fn consume(
    mut conn: Conn,
    cfg: &ConsumerConfig,
    stats: &Stats,
    deadline: Instant,
    walker: &mut Walker,
) -> Result<Conn, ConnError> {
    // Without --exit-when idle this timer is the deadline and is never moved.
    let idle_after = |now: Instant| match cfg.exit_idle {
        Some(d) => (now + d).min(deadline),
        None => deadline,
    };
    let idle = tokio::time::sleep_until(idle_after(Instant::now()));
    tokio::pin!(idle);
    let mut acks: Vec<u8> = Vec::with_capacity(64 * 1024);
    let max_payload = conn.max_payload();
    let end = tokio::time::sleep_until(deadline);
    tokio::pin!(end);

    loop {
        // consume-ok may have arrived with deliveries behind it: walk before the first read.
        if !conn.inbuf.data().is_empty() {
            let now_unix = unix_ns();
            let w = walker.walk(conn.inbuf.data(), max_payload, now_unix, &mut acks, |ns| {
                stats.consumer_latency.record(ns)
            })?;
            conn.inbuf.consume(w.used);
            stats.received.add(w.delivered);
            stats.stale.add(w.stale);
            if !acks.is_empty() {
                conn.stream.write_all(&acks).await?;
                acks.clear();
            }
            for (ch, payload) in w.controls {
                conn.control(ch, &payload).await?;
            }
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            r = conn.stream.readable() => { r?; }
            _ = &mut end => break,
            _ = &mut idle => break,
        }
        match conn.inbuf.try_fill(&conn.stream) {
            Ok(0) => return Err(ConnError::Eof),
            Ok(_) => {
                if cfg.exit_idle.is_some() {
                    idle.as_mut().reset(idle_after(Instant::now()));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{encode_method, PublishTemplate};
    use amq_protocol::protocol::{basic, AMQPClass};

    /// Bytes a broker would send for one delivery of `body_size` bytes stamped with `sent`.
    fn delivery(tag: u64, body_size: usize, sent: u64, frame_max: u32) -> Vec<u8> {
        let mut b = Vec::new();
        encode_method(
            &mut b,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Deliver(basic::Deliver {
                consumer_tag: "ctag".into(),
                delivery_tag: tag,
                redelivered: false,
                exchange: "".into(),
                routing_key: "q".into(),
            })),
        )
        .unwrap();
        // Reuse the publish template's header and body frames (skip its publish method frame).
        let t = PublishTemplate::new(1, "", "q", body_size, false, frame_max).unwrap();
        let mut p = Vec::new();
        t.append(&mut p, 1, sent);
        let (_, used) = codec::split_frame(&p, 1 << 20).unwrap().unwrap();
        b.extend_from_slice(&p[used..]);
        b
    }

    fn walker(auto_ack: bool, ack_every: u32) -> Walker {
        Walker {
            content: Content::Idle,
            pending: 0,
            ack_every,
            auto_ack,
            not_before: 0,
            ids: None,
        }
    }

    #[test]
    fn stamps_from_before_the_run_are_stale() {
        let mut data = delivery(1, 16, 500, 4096);
        data.extend(delivery(2, 16, 2_000, 4096));
        let mut w = walker(true, 1);
        w.not_before = 1_000;
        let mut lats = Vec::new();
        let r = w
            .walk(&data, 1 << 20, 3_000, &mut Vec::new(), |l| lats.push(l))
            .unwrap();
        assert_eq!((r.delivered, r.stale), (2, 1));
        assert_eq!(lats, vec![1_000]);
    }

    #[test]
    fn counts_deliveries_and_latency() {
        let mut data = Vec::new();
        for tag in 1..=3 {
            data.extend(delivery(tag, 16, 1_000, 4096));
        }
        let mut w = walker(true, 1);
        let mut acks = Vec::new();
        let mut lats = Vec::new();
        let r = w
            .walk(&data, 1 << 20, 5_000, &mut acks, |l| lats.push(l))
            .unwrap();
        assert_eq!(r.used, data.len());
        assert_eq!(r.delivered, 3);
        assert_eq!(lats, vec![4_000; 3]);
        assert!(acks.is_empty());
    }

    #[test]
    fn multi_frame_bodies_and_partial_input() {
        let data = delivery(7, 10_000, 100, 4096);
        let mut w = walker(false, 1);
        let mut acks = Vec::new();
        let mut lats = Vec::new();
        // Feed it in two reads split in the middle of a frame.
        let cut = data.len() / 2;
        let r1 = w
            .walk(&data[..cut], 1 << 20, 300, &mut acks, |l| lats.push(l))
            .unwrap();
        assert_eq!(r1.delivered, 0);
        let r2 = w
            .walk(&data[r1.used..], 1 << 20, 300, &mut acks, |l| lats.push(l))
            .unwrap();
        assert_eq!(r1.used + r2.used, data.len());
        assert_eq!(r2.delivered, 1);
        assert_eq!(lats, vec![200]);
        let mut want = Vec::new();
        codec::encode_ack(&mut want, 1, 7, false);
        assert_eq!(acks, want);
    }

    #[test]
    fn multi_ack_every_n() {
        let mut data = Vec::new();
        for tag in 1..=5 {
            data.extend(delivery(tag, 4, 0, 4096));
        }
        let mut w = walker(false, 2);
        let mut acks = Vec::new();
        let r = w.walk(&data, 1 << 20, 0, &mut acks, |_| {}).unwrap();
        assert_eq!(r.delivered, 5);
        let mut want = Vec::new();
        codec::encode_ack(&mut want, 1, 2, true);
        codec::encode_ack(&mut want, 1, 4, true);
        assert_eq!(acks, want);
        assert_eq!(w.pending, 1);
    }

    #[test]
    fn implausible_stamps_are_ignored_and_controls_kept() {
        let mut data = delivery(1, 16, 0, 4096);
        encode_method(
            &mut data,
            1,
            AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                consumer_tag: "ctag".into(),
                nowait: true,
            })),
        )
        .unwrap();
        let mut w = walker(true, 1);
        let mut lats = Vec::new();
        let r = w
            .walk(&data, 1 << 20, 10 * PLAUSIBLE_NS, &mut Vec::new(), |l| {
                lats.push(l)
            })
            .unwrap();
        assert_eq!(r.delivered, 1);
        assert!(lats.is_empty());
        assert_eq!(r.controls.len(), 1);
    }

    #[test]
    fn delivered_ids_are_recorded_with_duplicates() {
        let mut data = Vec::new();
        for (tag, id) in [(1, 7), (2, 8), (3, 7)] {
            let mut d = delivery(tag, 1024, 0, 4096);
            // The id is the first 4 body bytes: patch it in the last (body) frame.
            let at = d.len() - 1 - 1024;
            d[at..at + 4].copy_from_slice(&(id as u32).to_be_bytes());
            data.extend(d);
        }
        let mut w = walker(true, 1);
        w.ids = Some(IdSet::default());
        let r = w.walk(&data, 1 << 20, 0, &mut Vec::new(), |_| {}).unwrap();
        assert_eq!(r.delivered, 3);
        let ids = w.ids.unwrap().ranges();
        assert_eq!((ids.count, ids.duplicates), (2, 1));
        assert_eq!(ids.ranges, vec![[7, 8]]);
    }
}
