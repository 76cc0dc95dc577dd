//! `<data-dir>/definitions.json`: atomic replacement of the whole file.

use parking_lot::Mutex;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

pub const FILE_NAME: &str = "definitions.json";

/// Writes the definitions file when its content changes. One mutex orders the writers, and
/// each writer renders the state after taking it, so the file never goes back in time.
#[derive(Debug)]
pub struct Persister {
    path: Option<PathBuf>,
    /// Bytes last written (or loaded): an unchanged rendering is not written again.
    last: Mutex<Option<Vec<u8>>>,
    /// While > 0 (boot, import) changes are not written one by one; the batch writes once.
    batch: AtomicUsize,
}

impl Persister {
    /// `data_dir` None: nothing is persisted (in-memory definitions).
    pub fn new(data_dir: Option<&Path>) -> Self {
        Self {
            path: data_dir.map(|d| d.join(FILE_NAME)),
            last: Mutex::new(None),
            batch: AtomicUsize::new(1),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub fn begin_batch(&self) {
        self.batch.fetch_add(1, Ordering::SeqCst);
    }

    pub fn end_batch(&self) {
        self.batch.fetch_sub(1, Ordering::SeqCst);
    }

    pub fn in_batch(&self) -> bool {
        self.batch.load(Ordering::SeqCst) > 0
    }

    /// Remembers what is on disk (after loading it) so an unchanged state is not rewritten.
    pub fn set_last(&self, bytes: Vec<u8>) {
        *self.last.lock() = Some(bytes);
    }

    /// Renders with `render` under the writer lock and writes the file if the bytes differ
    /// from the last write. Returns whether it wrote.
    pub fn write_if_changed(&self, render: impl FnOnce() -> Vec<u8>) -> std::io::Result<bool> {
        let Some(path) = &self.path else {
            return Ok(false);
        };
        let mut last = self.last.lock();
        let bytes = render();
        if last.as_deref() == Some(bytes.as_slice()) {
            return Ok(false);
        }
        write_atomic(path, &bytes)?;
        *last = Some(bytes);
        Ok(true)
    }
}

/// Writes `path` so that a crash leaves either the old or the new file: write a temp file in
/// the same directory, fsync it, rename it over `path`, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_changes_and_replaces_atomically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = Persister::new(Some(dir.path()));
        p.end_batch();
        assert!(p.write_if_changed(|| b"{\"a\":1}".to_vec()).expect("write"));
        assert!(!p.write_if_changed(|| b"{\"a\":1}".to_vec()).expect("same"));
        assert!(p
            .write_if_changed(|| b"{\"a\":2}".to_vec())
            .expect("changed"));
        let path = dir.path().join(FILE_NAME);
        assert_eq!(std::fs::read(&path).expect("read"), b"{\"a\":2}");
        assert!(!path.with_extension("json.tmp").exists());
        let none = Persister::new(None);
        assert!(!none.write_if_changed(|| b"x".to_vec()).expect("no path"));
    }
}
