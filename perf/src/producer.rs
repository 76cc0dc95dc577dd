//! Publisher loop: one connection, channel 1, pipelined publishes written in batches.
//!
//! One task owns the socket and does both directions with `try_read`/`try_write` on tokio's cached
//! readiness, so confirms need no channel or lock between tasks. Each turn it:
//! 1. reads whatever the broker sent (basic.ack/nack, rare control frames);
//! 2. when the previous batch is fully written, appends up to `batch_bytes` of publishes to the
//!    reused write buffer (as many as the confirm window and the rate allow), each a copy of the
//!    pre-encoded [`PublishTemplate`] with its stamp patched;
//! 3. writes what it can;
//! 4. waits for the socket (writable when a batch is pending, readable when the confirm window is
//!    full) or for the next rate slot.
//!
//! Confirm bookkeeping: delivery tags are publish sequence numbers starting at 1. `low` is the
//! smallest unconfirmed tag; `ring[tag & mask]` holds the send time of each outstanding publish
//! (0 = confirmed). The window is the span `published + 1 - low`, kept <= `-c`, and the ring is a
//! power of two >= `-c`, so the outstanding tags never share a slot.

use std::{
    io,
    sync::{Arc, OnceLock},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::{io::Interest, time::Instant};

use crate::{
    codec::{
        self, PublishTemplate, BASIC_ACK, BASIC_NACK, BASIC_RETURN, CLASS_BASIC, FRAME_METHOD,
    },
    connection::{Conn, ConnError},
    ids::IdSet,
    stats::{Gap, LongestGaps, Stats},
};

/// Settings of one producer.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// Encoded publish.
    pub template: PublishTemplate,
    /// Messages per second, 0 = as fast as possible.
    pub rate: f64,
    /// Most unconfirmed publishes in flight; `None` = no publisher confirms.
    pub confirms: Option<u32>,
    /// Bytes of publishes written per batch.
    pub batch_bytes: usize,
    /// Record the ids of confirmed publishes (--ids-out).
    pub track_ids: bool,
}

/// Time in nanoseconds since the Unix epoch for body stamps: the wall clock read once, then advanced
/// by the monotonic clock. A consumer in another process reads its own (wall-clock anchored) value,
/// while within one process a step of the system clock (NTP) cannot distort the latencies.
#[inline]
pub fn unix_ns() -> u64 {
    static ANCHOR: OnceLock<(u64, Instant)> = OnceLock::new();
    let (wall, mono) = ANCHOR.get_or_init(|| {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        (wall, Instant::now())
    });
    wall + mono.elapsed().as_nanos() as u64
}

struct Confirms {
    window: u64,
    ring: Vec<u64>,
    mask: u64,
    low: u64,
}

impl Confirms {
    fn new(window: u32) -> Self {
        let window = u64::from(window.max(1));
        let size = window.next_power_of_two();
        Self {
            window,
            ring: vec![0; size as usize],
            mask: size - 1,
            low: 1,
        }
    }

    /// Publishes allowed before the window is full.
    #[inline]
    fn room(&self, published: u64) -> u64 {
        self.window.saturating_sub(published + 1 - self.low)
    }

    #[inline]
    fn sent(&mut self, tag: u64, at: u64) {
        self.ring[(tag & self.mask) as usize] = at;
    }

    /// Whether publishes wait for their confirm.
    #[inline]
    fn outstanding(&self, published: u64) -> bool {
        self.low <= published
    }

    /// Applies an ack or nack; returns how many outstanding publishes it settled, calling
    /// `on_settled(tag, latency)` for each. `now` and the stored send times are ns since the run
    /// start, plus one.
    #[inline]
    fn settle(
        &mut self,
        tag: u64,
        multiple: bool,
        published: u64,
        now: u64,
        mut on_settled: impl FnMut(u64, u64),
    ) -> u64 {
        if tag < self.low || tag > published {
            return 0;
        }
        let first = if multiple { self.low } else { tag };
        let mut n = 0;
        for t in first..=tag {
            let slot = &mut self.ring[(t & self.mask) as usize];
            if *slot != 0 {
                on_settled(t, now.saturating_sub(*slot));
                *slot = 0;
                n += 1;
            }
        }
        while self.low <= published && self.ring[(self.low & self.mask) as usize] == 0 {
            self.low += 1;
        }
        n
    }
}

/// What a producer knows about its publishes, kept outside its loop so that it is reported
/// however the loop ends.
struct Progress {
    published: u64,
    confirms: Option<Confirms>,
    /// Confirmed ids, with --ids-out.
    ids: Option<IdSet>,
    /// The last basic.ack that confirmed something, ns since the start plus one (0: none yet).
    last_ack: u64,
    gaps: LongestGaps,
}

impl Progress {
    /// A basic.ack confirmed something at `now`.
    #[inline]
    fn acked(&mut self, now: u64) {
        self.gaps.offer(Gap {
            from_ns: self.last_ack,
            to_ns: now,
            ended_by_ack: true,
        });
        self.last_ack = now;
    }
}

/// Runs until `deadline`, then hands the connection back for closing. The longest wait for a
/// confirm and the confirmed ids go to `stats` whether it ends well or not.
pub async fn run(
    conn: Conn,
    cfg: ProducerConfig,
    stats: Arc<Stats>,
    start: Instant,
    deadline: Instant,
) -> Result<Conn, ConnError> {
    let mut p = Progress {
        published: 0,
        confirms: cfg.confirms.map(Confirms::new),
        ids: cfg.track_ids.then(IdSet::default),
        last_ack: 0,
        gaps: LongestGaps::default(),
    };
    let result = publish(conn, &cfg, &stats, start, deadline, &mut p).await;
    if let Some(c) = &p.confirms {
        // Still waiting at the end: the time since the last ack is a gap too (perhaps one that
        // never ended).
        if c.outstanding(p.published) {
            let now = (Instant::now().min(deadline) - start).as_nanos() as u64 + 1;
            p.gaps.offer(Gap {
                from_ns: p.last_ack,
                to_ns: now,
                ended_by_ack: false,
            });
        }
        stats.report_gaps(&p.gaps);
    }
    if let (Some(ids), Ok(mut all)) = (&p.ids, stats.confirmed_ids.lock()) {
        all.merge(ids);
    }
    result
}

async fn publish(
    mut conn: Conn,
    cfg: &ProducerConfig,
    stats: &Stats,
    start: Instant,
    deadline: Instant,
    p: &mut Progress,
) -> Result<Conn, ConnError> {
    let per_msg = cfg.template.len().max(1);
    let max_batch = (cfg.batch_bytes / per_msg).max(1) as u64;
    let mut wbuf: Vec<u8> = Vec::with_capacity(max_batch as usize * per_msg);
    let mut wpos = 0usize;
    let mut controls: Vec<(u16, Vec<u8>)> = Vec::new();
    let max_payload = conn.max_payload();
    let end = tokio::time::sleep_until(deadline);
    tokio::pin!(end);
    let slot = tokio::time::sleep_until(start);
    tokio::pin!(slot);

    loop {
        // 1. Input.
        match conn.inbuf.try_fill(&conn.stream) {
            Ok(0) => return Err(ConnError::Eof),
            Ok(_) => {
                let now = (Instant::now() - start).as_nanos() as u64 + 1;
                let data = conn.inbuf.data();
                let mut off = 0;
                let (mut acked, mut nacked, mut returned) = (0, 0, 0);
                while let Some((f, used)) = codec::split_frame(&data[off..], max_payload)? {
                    off += used;
                    if f.kind != FRAME_METHOD {
                        continue; // heartbeats, content of basic.return
                    }
                    match codec::method_ids(f.payload) {
                        Some((CLASS_BASIC, m @ (BASIC_ACK | BASIC_NACK))) => {
                            let (tag, multiple) = codec::ack_fields(f.payload)?;
                            if let Some(c) = p.confirms.as_mut() {
                                if m == BASIC_ACK {
                                    let ids = &mut p.ids;
                                    let n = c.settle(tag, multiple, p.published, now, |t, ns| {
                                        stats.confirm_latency.record(ns);
                                        if let Some(ids) = ids {
                                            ids.insert(t as u32);
                                        }
                                    });
                                    if n > 0 {
                                        p.acked(now);
                                    }
                                    acked += n;
                                } else {
                                    nacked += c.settle(tag, multiple, p.published, now, |_, _| {});
                                }
                            }
                        }
                        Some((CLASS_BASIC, BASIC_RETURN)) => returned += 1,
                        _ => controls.push((f.channel, f.payload.to_vec())),
                    }
                }
                conn.inbuf.consume(off);
                stats.confirmed.add(acked);
                stats.nacked.add(nacked);
                stats.returned.add(returned);
                for (ch, payload) in controls.drain(..) {
                    conn.control(ch, &payload).await?;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }

        let now = Instant::now();
        if now >= deadline {
            break;
        }

        // 2. Next batch, once the previous one is written.
        let mut window_full = false;
        let mut rate_wait = None;
        if wpos == wbuf.len() {
            wbuf.clear();
            wpos = 0;
            let mut n = max_batch;
            if let Some(c) = &p.confirms {
                let room = c.room(p.published);
                window_full = room == 0;
                n = n.min(room);
            }
            if cfg.rate > 0.0 {
                let elapsed = (now - start).as_secs_f64();
                let allowed = (cfg.rate * elapsed) as u64 + 1;
                let room = allowed.saturating_sub(p.published);
                if room == 0 {
                    let next = p.published as f64 / cfg.rate;
                    let wait = std::time::Duration::try_from_secs_f64(next)
                        .ok()
                        .and_then(|d| start.checked_add(d))
                        .unwrap_or(deadline);
                    rate_wait = Some(wait.min(deadline));
                }
                n = n.min(room);
            }
            if n > 0 {
                let stamp = unix_ns();
                let at = (now - start).as_nanos() as u64 + 1;
                for _ in 0..n {
                    p.published += 1;
                    cfg.template.append(&mut wbuf, p.published as u32, stamp);
                    if let Some(c) = p.confirms.as_mut() {
                        c.sent(p.published, at);
                    }
                }
                stats.sent.add(n);
            }
        }

        // 3. Output.
        if wpos < wbuf.len() {
            match conn.stream.try_write(&wbuf[wpos..]) {
                Ok(n) => wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }

        // 4. Wait. Awaiting readiness (even when already ready) also lets tokio's cooperative
        //    budget interleave other tasks on this worker.
        let interest = if wpos < wbuf.len() {
            Interest::READABLE | Interest::WRITABLE
        } else if window_full || rate_wait.is_some() {
            Interest::READABLE
        } else {
            Interest::WRITABLE
        };
        if let Some(at) = rate_wait {
            slot.as_mut().reset(at);
            tokio::select! {
                r = conn.stream.ready(interest) => { r?; }
                _ = &mut slot => {}
                _ = &mut end => break,
            }
        } else {
            tokio::select! {
                r = conn.stream.ready(interest) => { r?; }
                _ = &mut end => break,
            }
        }
    }
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_and_multiple_acks() {
        let mut c = Confirms::new(3);
        assert_eq!(c.room(0), 3);
        for tag in 1..=3 {
            c.sent(tag, tag * 10);
        }
        assert_eq!(c.room(3), 0);
        let mut lats = Vec::new();
        assert_eq!(c.settle(2, true, 3, 100, |t, l| lats.push((t, l))), 2);
        assert_eq!(lats, vec![(1, 90), (2, 80)]);
        assert_eq!(c.room(3), 2);
        // Duplicate and out-of-range acks settle nothing.
        assert_eq!(c.settle(2, false, 3, 100, |_, _| {}), 0);
        assert_eq!(c.settle(9, false, 3, 100, |_, _| {}), 0);
        assert_eq!(c.settle(3, false, 3, 100, |_, _| {}), 1);
        assert_eq!(c.room(3), 3);
    }

    #[test]
    fn single_acks_out_of_order_hold_the_window() {
        let mut c = Confirms::new(4);
        for tag in 1..=4 {
            c.sent(tag, 1);
        }
        assert_eq!(c.settle(2, false, 4, 5, |_, _| {}), 1);
        assert_eq!(c.settle(3, false, 4, 5, |_, _| {}), 1);
        // Tag 1 still outstanding: the span is still 4.
        assert_eq!(c.room(4), 0);
        assert_eq!(c.settle(1, false, 4, 5, |_, _| {}), 1);
        assert_eq!(c.room(4), 3);
        // Slots reused after wrap-around.
        for tag in 5..=7 {
            c.sent(tag, 2);
        }
        assert_eq!(c.settle(7, true, 7, 9, |_, _| {}), 4);
        assert_eq!(c.room(7), 4);
    }

    #[test]
    fn the_longest_gaps_between_acks_are_kept() {
        let mut p = Progress {
            published: 0,
            confirms: None,
            ids: None,
            last_ack: 0,
            gaps: LongestGaps::default(),
        };
        for now in [5, 10, 40, 45] {
            p.acked(now);
        }
        assert_eq!(
            p.gaps.gaps()[0],
            Gap {
                from_ns: 10,
                to_ns: 40,
                ended_by_ack: true
            }
        );
        let lens: Vec<u64> = p.gaps.gaps().iter().map(Gap::len_ns).collect();
        assert_eq!(lens, vec![30, 5, 5, 5]);
        let mut c = Confirms::new(2);
        assert!(!c.outstanding(0));
        c.sent(1, 1);
        assert!(c.outstanding(1));
        c.settle(1, false, 1, 2, |_, _| {});
        assert!(!c.outstanding(1));
    }
}
