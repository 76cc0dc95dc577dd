//! Pre-written segments: a second thread (`warren-store-prep`) writes the next segment file full
//! of zeros ahead of need (`next.pre`, renamed into place when the writer opens a segment), so
//! appends overwrite allocated blocks and fdatasync commits no file-size or extent metadata: a
//! shorter sync on the confirm path.
//!
//! - Replay takes a zero remainder as the clean end of a segment. Boot deletes a leftover
//!   `next.pre` (possibly half written) and cuts the unused zero rest off pre-written segments;
//!   so does the store when it closes (the writer cuts its open segment, `Store::close` removes
//!   `next.pre`).
//! - When there is no room for it (less than three segments' worth free) or the fill fails, the
//!   writer appends to a plain file as before.
//! - Hand-over ([`Prep`], under its own mutex): the preparer makes one file when `wanted` and
//!   sets `ready`; from then on only the writer touches `next.pre` (it renames it in
//!   `open_segment` and only then asks for the next one). The first request comes when a
//!   durable queue attaches while no segment is open (`Store::attach`); the writer skips the
//!   request while it writes faster than [`PREWRITE_MAX_RATE`]. A batch taken while the open
//!   segment is a plain file moves on to a pre-written one as soon as it is ready
//!   (`take_batch`), rather than at rollover.

use super::record;
use super::state::Shared;
use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tracing::debug;

/// The segment file being written full of zeros ahead of need (not a `.seg` file: replay
/// ignores it and boot deletes a leftover one).
pub(super) const PREPARED: &str = "next.pre";

/// Hand-over of the pre-written next segment between the writer and the preparer thread.
#[derive(Debug, Default)]
pub(super) struct Prep {
    /// The writer opened a segment since the last file was prepared: make the next one.
    pub(super) wanted: bool,
    /// `next.pre` is complete and synced; only the writer touches it now.
    pub(super) ready: bool,
    shutdown: bool,
}

/// Above this write rate (bytes per second into one segment) the next segment is not
/// pre-written: with that many messages per sync, group commit already spreads the sync's cost,
/// and writing every segment twice (zeros, then records) would take disk bandwidth from it.
pub(super) const PREWRITE_MAX_RATE: f64 = 64.0 * 1024.0 * 1024.0;

pub(super) fn stop_preparer(sh: &Shared) {
    sh.prep.lock().shutdown = true;
    sh.prep_wake.notify_all();
}

/// Writes `<dir>/next.pre`: the segment header, then zeros up to `bytes`, synced. Ok(false)
/// when skipped: not enough free space (a pre-written segment is a speed-up, never worth
/// filling the disk for) or `stop()` said so. No file is left behind unless Ok(true).
fn prepare_segment(dir: &Path, bytes: u64, stop: impl Fn() -> bool) -> io::Result<bool> {
    if crate::alarm::free_bytes(dir)? < bytes.saturating_mul(3) {
        return Ok(false);
    }
    std::fs::create_dir_all(dir)?;
    let path = dir.join(PREPARED);
    let fill = || -> io::Result<bool> {
        let f = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&path)?;
        let zeros = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < bytes {
            if stop() {
                return Ok(false);
            }
            let n = (bytes - off).min(zeros.len() as u64) as usize;
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.write_all_at(record::MAGIC, 0)?;
        f.sync_all()?;
        Ok(true)
    };
    let r = fill();
    if !matches!(r, Ok(true)) {
        let _ = std::fs::remove_file(&path);
    }
    r
}

/// Keeps one pre-written segment ready for the writer.
pub(super) fn preparer_loop(sh: &Shared) {
    loop {
        {
            let mut p = sh.prep.lock();
            while !p.shutdown && (p.ready || !p.wanted) {
                sh.prep_wake.wait(&mut p);
            }
            if p.shutdown {
                return;
            }
            p.wanted = false;
        }
        match prepare_segment(&sh.dir, sh.segment_bytes, || sh.prep.lock().shutdown) {
            Ok(true) => {
                // This file answers every request made while it was being written; the next
                // request comes once the writer has renamed it.
                let mut p = sh.prep.lock();
                p.ready = true;
                p.wanted = false;
            }
            Ok(false) => {}
            Err(e) => debug!(error = %e, "store: cannot pre-write the next segment; appending"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::Message;
    use crate::store::segments::seg_path;
    use crate::store::testing::{enq_bytes, persistent_msg, seg_files, wait_synced};
    use crate::store::{QueueLog, Safety, Store};

    #[test]
    fn the_first_durable_queue_has_a_prewritten_segment_made_which_is_used_and_cut_on_close() {
        const SEG: u64 = 256 << 10;
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("msgs");
        let store = Store::open_with(data.path(), SEG, &crate::memory::UNIT_TESTS).expect("open");
        assert!(
            !store.shared.prep.lock().wanted,
            "prepared before any durable queue"
        );
        let (mut log, recovered, mut rx) = store.attach("/", "q");
        assert!(recovered.is_empty());
        // The queue's arrival has the next segment prepared before its first write.
        let deadline = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
        while !store.shared.prep.lock().ready {
            assert!(
                std::time::SystemTime::now() < deadline,
                "no segment prepared"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(
            std::fs::metadata(dir.join(PREPARED))
                .expect("prepared")
                .len(),
            SEG
        );
        for id in 1..=20 {
            let body = format!("m{id}");
            assert_eq!(
                log.enqueue(id, &persistent_msg(body.as_bytes()), None),
                Safety::Pending
            );
        }
        log.flush(false, false);
        wait_synced(&mut rx, 20);
        let segs = seg_files(&dir);
        assert_eq!(segs.len(), 1, "{segs:?}");
        // Still full size: the records overwrote zeros.
        let len = std::fs::metadata(&segs[0]).expect("stat").len();
        assert_eq!(len, SEG);
        log.settle(&[1, 2]);
        store.close();
        drop((log, store));
        // Closed: the zero rest is cut off, no prepared file is left.
        let len = std::fs::metadata(&segs[0]).expect("stat").len();
        assert!(len < SEG, "zero rest kept ({len} bytes)");
        assert!(!dir.join(PREPARED).exists());
        let store = Store::open_with(data.path(), SEG, &crate::memory::UNIT_TESTS).expect("reopen");
        let (_log, recovered, _rx) = store.attach("/", "q");
        let ids: Vec<u64> = recovered.iter().map(|r| r.id).collect();
        assert_eq!(ids, (3..=20).collect::<Vec<u64>>());
        store.close();
    }

    #[test]
    fn boot_after_a_kill_keeps_what_was_written_before_the_zeros_and_drops_a_half_prepared_file() {
        const SEG: u64 = 64 << 10;
        let data = tempfile::tempdir().expect("tempdir");
        let dir = data.path().join("msgs");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let msgs: Vec<Message> = (0..3)
            .map(|i| persistent_msg(format!("m{i}").as_bytes()))
            .collect();
        // Segment 1: two whole records, then zeros (killed while idle).
        let mut one = record::MAGIC.to_vec();
        one.extend(enq_bytes(1, &msgs[0]));
        one.extend(enq_bytes(2, &msgs[1]));
        let one_len = one.len() as u64;
        one.resize(SEG as usize, 0);
        std::fs::write(seg_path(&dir, 1), &one).expect("write");
        // Segment 2: a record torn in its middle, then zeros (killed during a write).
        let mut two = record::MAGIC.to_vec();
        let torn = enq_bytes(3, &msgs[2]);
        two.extend_from_slice(&torn[..torn.len() / 2]);
        two.resize(SEG as usize, 0);
        std::fs::write(seg_path(&dir, 2), &two).expect("write");
        // Killed while zero-filling the next file.
        std::fs::write(dir.join(PREPARED), vec![0u8; 1000]).expect("write");

        let store = Store::open_with(data.path(), SEG, &crate::memory::UNIT_TESTS).expect("open");
        assert!(!dir.join(PREPARED).exists(), "half-prepared file kept");
        let (_log, recovered, _rx) = store.attach("/", "q");
        let ids: Vec<u64> = recovered.iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2]);
        assert_eq!(recovered[1].msg.body(), b"m1");
        let len = |s| std::fs::metadata(seg_path(&dir, s)).expect("stat").len();
        assert_eq!(len(1), one_len);
        assert_eq!(len(2), record::MAGIC.len() as u64);
        store.close();
    }
}
