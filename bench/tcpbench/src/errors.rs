//! Counting failures by kind, so a run reports how it failed rather than stopping at the first error.

use std::io;

use serde_json::{json, Value};

/// What went wrong in one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// connect() failed (refused, no ports, ...).
    Connect,
    /// An operation did not finish within the per-operation timeout.
    Timeout,
    /// The peer closed before the whole response arrived.
    Eof,
    /// The response bytes differ from the request.
    Mismatch,
    /// Any other I/O error (reset, broken pipe, ...).
    Io,
}

impl Failure {
    /// Classify an I/O error from a read or write.
    pub fn of_io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::UnexpectedEof => Failure::Eof,
            io::ErrorKind::TimedOut => Failure::Timeout,
            _ => Failure::Io,
        }
    }
}

/// Failure counters plus the first message seen, for diagnosis.
#[derive(Debug, Default, Clone)]
pub struct ErrorCounts {
    pub connect: u64,
    pub timeout: u64,
    pub eof: u64,
    pub mismatch: u64,
    pub io: u64,
    pub first: Option<String>,
}

impl ErrorCounts {
    /// Count one failure; keep its message if it is the first.
    pub fn add(&mut self, f: Failure, msg: impl FnOnce() -> String) {
        match f {
            Failure::Connect => self.connect += 1,
            Failure::Timeout => self.timeout += 1,
            Failure::Eof => self.eof += 1,
            Failure::Mismatch => self.mismatch += 1,
            Failure::Io => self.io += 1,
        }
        if self.first.is_none() {
            self.first = Some(format!("{f:?}: {}", msg()));
        }
    }

    /// Add the counts of `other`.
    pub fn merge(&mut self, other: &ErrorCounts) {
        self.connect += other.connect;
        self.timeout += other.timeout;
        self.eof += other.eof;
        self.mismatch += other.mismatch;
        self.io += other.io;
        if self.first.is_none() {
            self.first.clone_from(&other.first);
        }
    }

    /// All failures.
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.eof + self.mismatch + self.io
    }

    /// One human line.
    pub fn human(&self) -> String {
        if self.total() == 0 {
            return "errors 0".to_string();
        }
        format!(
            "errors {} (connect {}, timeout {}, eof {}, mismatch {}, io {}; first: {})",
            self.total(),
            self.connect,
            self.timeout,
            self.eof,
            self.mismatch,
            self.io,
            self.first.as_deref().unwrap_or("-")
        )
    }

    /// JSON object.
    pub fn json(&self) -> Value {
        json!({
            "total": self.total(),
            "connect": self.connect,
            "timeout": self.timeout,
            "eof": self.eof,
            "mismatch": self.mismatch,
            "io": self.io,
            "first": self.first,
        })
    }
}
