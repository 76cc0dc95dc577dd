//! Copies of a queue's ready messages for a mirror being synchronised
//! (see `crate::cluster::replicate`): the lowest ids of a range, across priority levels,
//! paged messages read back from their page file without leaving the paged state. Nothing
//! here changes the ready list.

use super::*;

/// A ready message as a synchronising mirror gets it.
#[derive(Debug)]
pub struct Copied {
    pub id: u64,
    pub msg: Arc<Message>,
    pub expires_at: Option<Instant>,
}

impl Ready {
    /// The ready messages with ids in (`after`, `up_to`], lowest first, at most `limit`. Each
    /// level is in id order (appends take rising ids, requeues go back to their place), so
    /// this is a binary search and a walk per level. A paged message that cannot be read back
    /// is left out (the queue finds it lost when it reaches the head).
    pub fn copy_range(&mut self, after: u64, up_to: u64, limit: usize) -> Vec<Copied> {
        let mut picked: Vec<(u64, usize, usize)> = Vec::new();
        for (l, q) in self.levels.iter().enumerate() {
            let start = q.partition_point(|s| s.id <= after);
            picked.extend(
                q.range(start..)
                    .take_while(|s| s.id <= up_to)
                    .take(limit)
                    .enumerate()
                    .map(|(i, s)| (s.id, l, start + i)),
            );
        }
        picked.sort_unstable_by_key(|p| p.0);
        picked.truncate(limit);
        let mut out = Vec::with_capacity(picked.len());
        for (_, l, i) in picked {
            let s = &self.levels[l][i];
            if let Some(msg) = &s.msg {
                out.push(Copied {
                    id: s.id,
                    msg: msg.clone(),
                    expires_at: s.expires_at(),
                });
                continue;
            }
            let (Some(pager), Some(p)) = (self.pager.as_mut(), self.paged_at.get(&s.id)) else {
                continue;
            };
            let msg = pager
                .io
                .read(p.loc.seg, p.loc.off, p.loc.len as usize)
                .ok()
                .and_then(|b| decode_message(pager.memory, &b, 0, b.len()));
            match msg {
                Some(m) => out.push(Copied {
                    id: s.id,
                    msg: Arc::new(m),
                    expires_at: s.expires_at(),
                }),
                None => {
                    error!(queue = %pager.label, id = s.id, "a paged message could not be read for a mirror's synchronisation; left out");
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{entry, limits, paged_ready};
    use super::*;

    #[test]
    fn a_range_is_copied_lowest_ids_first_across_levels_and_pages() {
        let (mut r, _disk) = paged_ready(Some(2), limits());
        // Priorities 0..2 interleaved: each level is in id order, the queue is not.
        for id in 1..=30 {
            r.push_back(entry(id, (id % 3) as u8, 50));
        }
        r.page_out(u64::MAX, Instant::now());
        assert!(r.paged_len > 0, "some messages are paged");
        let before = (r.len, r.paged_len);

        let first = r.copy_range(0, 30, 10);
        assert_eq!(
            first.iter().map(|c| c.id).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        let next = r.copy_range(10, 25, 100);
        assert_eq!(
            next.iter().map(|c| c.id).collect::<Vec<_>>(),
            (11..=25).collect::<Vec<_>>()
        );
        for c in first.iter().chain(&next) {
            assert!(c.msg.body().starts_with(format!("m{}:", c.id).as_bytes()));
        }
        assert!(r.copy_range(30, u64::MAX, 10).is_empty());
        // Copying changed nothing: the queue still pops every message in its order.
        assert_eq!((r.len, r.paged_len), before);
        let mut popped = Vec::new();
        while let Some(e) = r.pop_front() {
            popped.push(e.id);
        }
        assert_eq!(popped.len(), 30);
    }

    #[test]
    fn a_requeued_message_is_found_at_its_place() {
        let (mut r, _disk) = paged_ready(None, limits());
        for id in [1, 2, 4, 5] {
            r.push_back(entry(id, 0, 10));
        }
        r.requeue(entry(3, 0, 10));
        let ids: Vec<u64> = r.copy_range(1, 4, 10).iter().map(|c| c.id).collect();
        assert_eq!(ids, vec![2, 3, 4]);
    }
}
