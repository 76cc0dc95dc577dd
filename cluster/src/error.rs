//! The crate's error type.

use crate::state::Conflict;
use crate::types::NodeId;

/// What can go wrong in the cluster API.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster config: {0}")]
    Config(String),
    #[error("cluster I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("cluster storage: {0}")]
    Storage(String),
    #[error("raft: {0}")]
    Raft(String),
    /// A `CheckVersion` failed: the batch (committed at `index`) applied nothing.
    #[error("version conflict on {key:?} at index {index}: expected {expected}, found {found}")]
    Conflict {
        index: u64,
        key: String,
        expected: u64,
        found: u64,
    },
    /// No leader could be reached in time, or the outcome of a forwarded proposal is unknown.
    #[error("cluster operation timed out: {0}")]
    Timeout(String),
    #[error("could not join the cluster: {0}")]
    Join(String),
    #[error("unknown node {0}")]
    UnknownNode(String),
    #[error("no route to node {0:016x}")]
    Unreachable(NodeId),
    /// `send` found the peer's outbound queue full: the message was not queued.
    #[error("outbound queue to node {0:016x} is full")]
    QueueFull(NodeId),
    #[error("payload too large: {0} bytes (max {1})")]
    TooLarge(usize, usize),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the cluster node is shut down")]
    Shutdown,
}

impl ClusterError {
    pub(crate) fn conflict(index: u64, c: Conflict) -> Self {
        ClusterError::Conflict {
            index,
            key: c.key,
            expected: c.expected,
            found: c.found,
        }
    }
}
