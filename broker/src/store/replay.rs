//! Rebuilding queue state from records, in log order (pure, no I/O).

use super::record::{Enqueue, Record};
use std::collections::{BTreeMap, HashMap};

/// A message that survives replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Live {
    /// Segment holding its (latest) enqueue record and that record's size.
    pub seg: u64,
    pub size: u64,
    pub redelivered: bool,
    pub expires_at_ms: Option<u64>,
    pub exchange: String,
    pub routing_key: String,
    pub header: Vec<u8>,
    pub body: Vec<u8>,
}

/// Queue key -> id -> live message (ids ascending: the queue's order).
#[derive(Debug, Default)]
pub struct Replay {
    pub queues: HashMap<String, BTreeMap<u64, Live>>,
}

impl Replay {
    /// Applies one record read from segment `seg` (its framed size is `size`).
    pub fn apply(&mut self, seg: u64, size: usize, rec: &Record<'_>) {
        match rec {
            Record::Enqueue(Enqueue {
                queue,
                id,
                redelivered,
                expires_at_ms,
                exchange,
                routing_key,
                header,
                body,
            }) => {
                let q = self.queues.entry((*queue).to_owned()).or_default();
                // A compaction copy repeats an enqueue: it replaces the older record.
                let was_delivered = q.get(id).is_some_and(|l| l.redelivered);
                q.insert(
                    *id,
                    Live {
                        seg,
                        size: size as u64,
                        redelivered: *redelivered || was_delivered,
                        expires_at_ms: *expires_at_ms,
                        exchange: (*exchange).to_owned(),
                        routing_key: (*routing_key).to_owned(),
                        header: header.to_vec(),
                        body: body.to_vec(),
                    },
                );
            }
            Record::Delivered { queue, ids } => {
                if let Some(q) = self.queues.get_mut(*queue) {
                    for id in ids {
                        if let Some(l) = q.get_mut(id) {
                            l.redelivered = true;
                        }
                    }
                }
            }
            Record::Settle { queue, ids } => {
                if let Some(q) = self.queues.get_mut(*queue) {
                    for id in ids {
                        q.remove(id);
                    }
                }
            }
            Record::DeleteQueue { queue } => {
                self.queues.remove(*queue);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enq(q: &str, id: u64) -> Record<'_> {
        Record::Enqueue(Enqueue {
            queue: q,
            id,
            redelivered: false,
            expires_at_ms: None,
            exchange: "",
            routing_key: q,
            header: b"h",
            body: b"b",
        })
    }

    fn ids(r: &Replay, q: &str) -> Vec<(u64, bool)> {
        r.queues
            .get(q)
            .map(|m| m.iter().map(|(id, l)| (*id, l.redelivered)).collect())
            .unwrap_or_default()
    }

    #[test]
    fn settles_remove_and_deliveries_mark_redelivered() {
        let mut r = Replay::default();
        for rec in [
            enq("a", 1),
            enq("a", 2),
            enq("a", 3),
            Record::Delivered {
                queue: "a",
                ids: vec![1, 2],
            },
            Record::Settle {
                queue: "a",
                ids: vec![1],
            },
        ] {
            r.apply(0, 10, &rec);
        }
        assert_eq!(ids(&r, "a"), vec![(2, true), (3, false)]);
    }

    #[test]
    fn a_compaction_copy_keeps_the_delivered_flag_and_moves_the_segment() {
        let mut r = Replay::default();
        r.apply(0, 10, &enq("a", 1));
        r.apply(
            1,
            10,
            &Record::Delivered {
                queue: "a",
                ids: vec![1],
            },
        );
        r.apply(2, 10, &enq("a", 1));
        assert_eq!(ids(&r, "a"), vec![(1, true)]);
        assert_eq!(r.queues["a"][&1].seg, 2);
    }

    #[test]
    fn a_deleted_queue_forgets_its_past_and_a_new_one_starts_clean() {
        let mut r = Replay::default();
        r.apply(0, 10, &enq("a", 1));
        r.apply(0, 10, &enq("b", 1));
        r.apply(0, 10, &Record::DeleteQueue { queue: "a" });
        r.apply(0, 10, &enq("a", 1));
        assert_eq!(ids(&r, "a"), vec![(1, false)]);
        assert_eq!(ids(&r, "b"), vec![(1, false)]);
    }
}
