//! Sets of message ids, for a loss check across a failover: which publishes the broker confirmed
//! and which deliveries a consumer saw.
//!
//! The id of a message is the 4-byte sequence number at the start of its stamped body (see
//! [`crate::codec::read_stamp`]); a producer numbers its publishes 1, 2, 3, ... (the same
//! numbers as its delivery tags), so ids identify messages only within one producer's run and
//! `--ids-out` is refused with more than one producer. A set is a growable bitmap: one bit per
//! id, no allocation per message once it has grown, merged across tasks once at their end.

use serde::Serialize;

/// A set of message ids (a bitmap), counting inserts of ids already present.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdSet {
    words: Vec<u64>,
    count: u64,
    duplicates: u64,
}

/// A set as written to the `--ids-out` file: inclusive ranges in increasing order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IdRanges {
    /// Distinct ids.
    pub count: u64,
    /// Inserts of an id already in the set (e.g. a redelivery).
    pub duplicates: u64,
    /// `[first, last]` runs of consecutive ids.
    pub ranges: Vec<[u32; 2]>,
}

impl IdSet {
    /// Adds `id`; false (and one more duplicate) when it was there already.
    #[inline]
    pub fn insert(&mut self, id: u32) -> bool {
        let (w, bit) = ((id / 64) as usize, 1u64 << (id % 64));
        if w >= self.words.len() {
            self.words.resize((w + 1).next_power_of_two(), 0);
        }
        if self.words[w] & bit != 0 {
            self.duplicates += 1;
            return false;
        }
        self.words[w] |= bit;
        self.count += 1;
        true
    }

    /// Whether `id` is in the set.
    pub fn contains(&self, id: u32) -> bool {
        self.words
            .get((id / 64) as usize)
            .is_some_and(|w| w & (1u64 << (id % 64)) != 0)
    }

    /// Distinct ids.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Inserts of ids already present (here or, for a merge, in both sets).
    pub fn duplicates(&self) -> u64 {
        self.duplicates
    }

    /// Adds every id of `other` (ids in both count as duplicates, as do `other`'s own).
    pub fn merge(&mut self, other: &IdSet) {
        if other.words.len() > self.words.len() {
            self.words.resize(other.words.len(), 0);
        }
        for (mine, theirs) in self.words.iter_mut().zip(&other.words) {
            let both = *mine & theirs;
            self.duplicates += u64::from(both.count_ones());
            self.count += u64::from((theirs & !both).count_ones());
            *mine |= theirs;
        }
        self.duplicates += other.duplicates;
    }

    /// The set as inclusive ranges of consecutive ids.
    pub fn ranges(&self) -> IdRanges {
        let mut ranges: Vec<[u32; 2]> = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let id = (w as u64 * 64 + u64::from(bits.trailing_zeros())) as u32;
                bits &= bits - 1;
                match ranges.last_mut() {
                    Some(r) if r[1].checked_add(1) == Some(id) => r[1] = id,
                    _ => ranges.push([id, id]),
                }
            }
        }
        IdRanges {
            count: self.count,
            duplicates: self.duplicates,
            ranges,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserts_count_duplicates_and_ranges_join_runs() {
        let mut s = IdSet::default();
        for id in [1, 2, 3, 5, 64, 63, 65, 200] {
            assert!(s.insert(id));
        }
        assert!(!s.insert(2));
        assert!(s.contains(64) && !s.contains(4) && !s.contains(10_000));
        let r = s.ranges();
        assert_eq!((r.count, r.duplicates), (8, 1));
        assert_eq!(r.ranges, vec![[1, 3], [5, 5], [63, 65], [200, 200]]);
        assert_eq!(IdSet::default().ranges().ranges, Vec::<[u32; 2]>::new());
    }

    #[test]
    fn merge_counts_ids_seen_by_both_as_duplicates() {
        let mut a = IdSet::default();
        let mut b = IdSet::default();
        for id in 1..=10 {
            a.insert(id);
        }
        for id in 8..=300 {
            b.insert(id);
        }
        b.insert(300);
        a.merge(&b);
        let r = a.ranges();
        assert_eq!(r.ranges, vec![[1, 300]]);
        assert_eq!(r.count, 300);
        // 8, 9, 10 in both, and b's own repeat of 300.
        assert_eq!(r.duplicates, 4);
        // Merging into a longer set keeps its tail.
        let mut small = IdSet::default();
        small.insert(0);
        let mut big = a.clone();
        big.merge(&small);
        assert_eq!(big.ranges().ranges, vec![[0, 300]]);
    }
}
