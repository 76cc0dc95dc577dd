//! The delivery journals: delivered flags survive a process crash without waiting for the
//! writer.
//!
//! - The "delivered" record of a persistent message also goes, with one `write()` and no sync,
//!   to the active one of two delivery journals (`<data-dir>/msgs/deliveries-{0,1}.jnl`) before
//!   the delivery is handed to the connection ([`journal_write`], on the queue's thread); a
//!   write into the page cache survives `kill -9`. The same record also goes to the segments
//!   with the next batch.
//! - When a batch is taken (by the writer thread or a queue) while the active journal holds
//!   1 MiB or more and the other is empty, the other one becomes active
//!   ([`Journal::take_batch`]): every record in the one it leaves is in that batch or an earlier
//!   one, so whoever writes the batch truncates that journal once the batch is written (after
//!   a failed batch it keeps it, the records are retried, and no switch happens until it is
//!   emptied). Records already in a segment may linger in the active journal: a journal record
//!   is a true fact about a message of this run, so applying it again is harmless.
//! - Recovery (`Store::open`) applies both journals' records after the segments, writes the
//!   flags they add to a new segment (synced) and removes the journals, so a journal never
//!   outlives the run that wrote it. A power loss can lose journal records (no sync, as
//!   RabbitMQ does not sync deliveries either): the message then comes back not redelivered.
//! - A message delivered while its enqueue record still waits in memory (a consumer keeping up
//!   with a publisher that waits for each confirm) skips all this: the flag is set in that
//!   record (`State::mark_pending_delivered`), which reaches the file with it or not at all.
//! - Store ids are unique per queue name within a run (see `base` in [`super::log`]), so a
//!   journal record can never mark a message of a later queue with the same name.

use super::record::{self, Record};
use super::state::State;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;
use std::sync::Arc;
use tracing::warn;

/// Journal file names (two, used alternately).
pub(super) const JOURNALS: [&str; 2] = ["deliveries-0.jnl", "deliveries-1.jnl"];

/// The active journal is switched once it holds this many bytes (truncating a file on every
/// batch would cost a file-system transaction each time). The environment variable
/// `WARREN_JOURNAL_SWITCH_BYTES` overrides it (tests use a few hundred bytes so that crash tests
/// go through many switches).
pub(super) const JOURNAL_SWITCH_BYTES: u64 = 1 << 20;

/// The two delivery journals (see the module docs).
#[derive(Debug)]
pub(super) struct Journal {
    files: [Arc<File>; 2],
    active: usize,
    /// Bytes written to each file since it was last emptied.
    pub(super) len: [u64; 2],
}

impl Journal {
    /// A batch is being taken: switch to the other file if the active one is full and the
    /// other is empty. Returns the inactive file if it holds records (all of them are in the
    /// batch taken now or in earlier ones), to be truncated once the batch is written.
    pub(super) fn take_batch(&mut self, switch_at: u64) -> Option<(usize, Arc<File>)> {
        let other = 1 - self.active;
        if self.len[self.active] >= switch_at && self.len[other] == 0 {
            self.active = other;
        }
        let old = 1 - self.active;
        (self.len[old] > 0).then(|| (old, self.files[old].clone()))
    }
}

/// Writes a delivered record to the active delivery journal (creating the journals at the
/// first use). Called under the state lock, so the writer's swap cannot interleave.
pub(super) fn journal_write(st: &mut State, dir: &Path, rec: &Record<'_>) {
    use std::io::Write;
    if st.journal.is_none() {
        let open = |name: &str| -> io::Result<Arc<File>> {
            std::fs::create_dir_all(dir)?;
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(dir.join(name))?;
            drop(f);
            let f = OpenOptions::new().append(true).open(dir.join(name))?;
            Ok(Arc::new(f))
        };
        match open(JOURNALS[0]).and_then(|a| Ok([a, open(JOURNALS[1])?])) {
            Ok(files) => {
                st.journal = Some(Journal {
                    files,
                    active: 0,
                    len: [0; 2],
                });
            }
            Err(e) => {
                if !st.journal_warned {
                    st.journal_warned = true;
                    warn!(error = %e, "store: cannot create the delivery journal; delivered flags may be lost in a crash");
                }
                return;
            }
        }
    }
    let Some(j) = st.journal.as_mut() else {
        return;
    };
    let mut buf = Vec::with_capacity(64);
    record::encode(rec, &mut buf);
    let active = j.active;
    // Counted even if the write fails: part of the record may be there.
    j.len[active] += buf.len() as u64;
    match (&*j.files[active]).write_all(&buf) {
        Ok(()) => st.journal_warned = false,
        Err(e) => {
            if !st.journal_warned {
                st.journal_warned = true;
                warn!(error = %e, "store: delivery journal write failed; delivered flags may be lost in a crash");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::segments::seg_path;
    use crate::store::state::MARK_SCAN;
    use crate::store::testing::{confirms, enq_bytes, persistent_msg, ticket};
    use crate::store::{QueueLog, Store};
    use tokio::sync::mpsc;

    #[test]
    fn a_message_delivered_before_its_enqueue_is_written_has_the_flag_in_that_record() {
        let data = tempfile::tempdir().expect("tempdir");
        let journals = || -> u64 {
            JOURNALS
                .iter()
                .filter_map(|n| std::fs::metadata(data.path().join("msgs").join(n)).ok())
                .map(|m| m.len())
                .sum()
        };
        // No writer thread: the queue writes every batch (each ends with a confirm).
        let store =
            Store::start(data.path(), 1 << 20, false, &crate::memory::UNIT_TESTS).expect("open");
        let (mut log, _, _rx) = store.attach("/", "q");
        let (ctx, mut crx) = mpsc::unbounded_channel();
        let m = persistent_msg(b"m");
        assert_eq!(store.shared.state.lock().pending_bytes(), 0);
        log.enqueue_confirmed(1, &m, None, ticket(&ctx, 1));
        let one_record = store.shared.state.lock().pending_bytes();
        log.delivered(&[1]);
        assert_eq!(
            journals(),
            0,
            "journal written for a message still in memory"
        );
        assert_eq!(
            store.shared.state.lock().pending_bytes(),
            one_record,
            "a delivered record was added"
        );
        assert!(log.flush(true, false));
        // Its enqueue is in the file: the flag goes to the journal, as before.
        log.enqueue_confirmed(2, &m, None, ticket(&ctx, 2));
        assert!(log.flush(true, false));
        log.delivered(&[2]);
        let after_2 = journals();
        assert!(after_2 > 0, "no journal record for a written message");
        // Still pending, but more than MARK_SCAN enqueues back: a delivered record and a
        // journal write too.
        for id in 3..=(4 + MARK_SCAN as u64) {
            log.enqueue(id, &m, None);
        }
        log.delivered(&[3]);
        assert!(
            journals() > after_2,
            "no journal record for an old pending enqueue"
        );
        // Delivered together with a recent one: no shortcut for part of a batch of ids.
        let last = 5 + MARK_SCAN as u64;
        log.enqueue_confirmed(last, &m, None, ticket(&ctx, last));
        log.delivered(&[4, last]);
        log.delivered(&[last - 1]);
        assert!(log.flush(true, false));
        assert_eq!(confirms(&mut crx).len(), 3);
        drop(log);
        store.close();
        drop(store);
        // The journals are applied and removed at boot; message 1's flag can only come from
        // its own record.
        let store = Store::open(data.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        let (_log, rec, _rx) = store.attach("/", "q");
        let flagged: Vec<u64> = rec.iter().filter(|r| r.redelivered).map(|r| r.id).collect();
        assert_eq!(flagged, vec![1, 2, 3, 4, last - 1, last]);
        assert_eq!(rec.len() as u64, last);
        store.close();
    }

    #[test]
    fn the_journal_switches_when_full_only_to_an_empty_file_and_hands_back_the_one_to_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = |n: &str| Arc::new(File::create(dir.path().join(n)).expect("file"));
        let mut j = Journal {
            files: [f("a"), f("b")],
            active: 0,
            len: [0; 2],
        };
        // Below the switch size: the active file keeps growing, nothing to empty.
        j.len[0] = 50;
        assert!(j.take_batch(100).is_none());
        assert_eq!(j.active, 0);
        // Full: switch; the old file is emptied once the batch is written.
        j.len[0] = 100;
        let (i, _) = j.take_batch(100).expect("the old file to empty");
        assert_eq!((i, j.active), (0, 1));
        // That batch failed: file 0 keeps its records, so no switch until it is emptied.
        j.len[1] = 500;
        let (i, _) = j.take_batch(100).expect("still file 0");
        assert_eq!((i, j.active), (0, 1));
        j.len[0] = 0;
        let (i, _) = j.take_batch(100).expect("file 1 now");
        assert_eq!((i, j.active), (1, 0));
        j.len[1] = 0;
        assert!(j.take_batch(100).is_none(), "file 1 emptied: nothing to do");
    }

    #[test]
    fn recovery_applies_the_delivery_journals_and_keeps_their_flags_in_a_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let msgs = dir.path().join("msgs");
        std::fs::create_dir_all(&msgs).expect("mkdir");
        let m = persistent_msg(b"x");
        let mut seg = record::MAGIC.to_vec();
        for id in 1..=3 {
            seg.extend(enq_bytes(id, &m));
        }
        std::fs::write(seg_path(&msgs, 1), &seg).expect("segment");
        // Journal 1 marks 2 (and an unknown queue); journal 0 marks 3 and ends torn.
        let mut j1 = Vec::new();
        for (queue, id) in [("/\0q", 2), ("/\0gone", 1)] {
            record::encode(
                &Record::Delivered {
                    queue,
                    ids: vec![id],
                },
                &mut j1,
            );
        }
        std::fs::write(msgs.join(JOURNALS[1]), &j1).expect("journal");
        let mut j0 = Vec::new();
        record::encode(
            &Record::Delivered {
                queue: "/\0q",
                ids: vec![3],
            },
            &mut j0,
        );
        j0.extend_from_slice(&[9, 0, 0]);
        std::fs::write(msgs.join(JOURNALS[0]), &j0).expect("journal");
        for round in 0..2 {
            let store = Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("open");
            assert!(
                JOURNALS.iter().all(|n| !msgs.join(n).exists()),
                "journals kept"
            );
            let (log, rec, _rx) = store.attach("/", "q");
            let got: Vec<(u64, bool)> = rec.iter().map(|r| (r.id, r.redelivered)).collect();
            assert_eq!(got, vec![(1, false), (2, true), (3, true)], "round {round}");
            drop(log);
            store.close();
        }
    }

    #[test]
    fn the_delivery_journals_are_switched_and_emptied_as_the_writer_goes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("open");
        store.shared.state.lock().journal_switch_bytes = 200;
        let (mut log, _, _rx) = store.attach("/", "q");
        let m = persistent_msg(b"x");
        for id in 1..=200 {
            log.enqueue(id, &m, None);
        }
        log.flush(false, false);
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
        for id in 1..=200 {
            log.delivered(&[id]);
            // Until the writer has taken it.
            while !store.shared.state.lock().pending.is_empty() {
                assert!(std::time::SystemTime::now() < deadline, "writer stuck");
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
        }
        // 200 records of about 40 bytes went through; neither file holds more than the
        // switch size plus a record or two.
        let sizes: Vec<u64> = JOURNALS
            .iter()
            .map(|n| {
                std::fs::metadata(dir.path().join("msgs").join(n))
                    .expect("journal")
                    .len()
            })
            .collect();
        assert!(sizes.iter().all(|s| *s <= 300), "journal sizes {sizes:?}");
        drop(log);
        store.close();
        drop(store);
        let store = Store::open(dir.path(), &crate::memory::UNIT_TESTS).expect("reopen");
        let (_log, rec, _rx) = store.attach("/", "q");
        assert_eq!(rec.len(), 200);
        assert!(rec.iter().all(|r| r.redelivered));
        store.close();
    }
}
