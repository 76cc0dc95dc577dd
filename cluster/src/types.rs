//! Node identity and the openraft type configuration.
//!
//! A [`NodeId`] is derived from the node name alone ([`node_id_of`]): the first eight bytes of
//! SHA-256(name), big-endian. Every node can therefore compute any other node's id from its name
//! (`forget("warren@host")` needs no lookup table), and a node restarted with the same name keeps
//! its id. Two different names colliding on 64 bits is not a practical concern; a join whose id is
//! already held by a member with another name is refused all the same.
//!
//! What goes into the Raft log ([`Request`]) and what applying it answers ([`Response`]) live here
//! too, next to the [`TypeConfig`] that names them for openraft.

use std::fmt;
use std::io::Cursor;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::state::{Conflict, EvictReason, Op};

/// A node's id in the cluster: see [`node_id_of`].
pub type NodeId = u64;

/// The id of the node called `name`: the first 8 bytes of SHA-256(`name`), big-endian.
pub fn node_id_of(name: &str) -> NodeId {
    let digest = Sha256::digest(name.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// What the Raft membership records about each node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node name ("warren@host").
    pub name: String,
    /// host:port its peers dial.
    pub addr: String,
    /// A voter that holds no queues.
    pub witness: bool,
}

impl fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)?;
        if self.witness {
            f.write_str(" (witness)")?;
        }
        Ok(())
    }
}

/// One application entry of the Raft log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// An atomic batch of key-value operations.
    Batch(Vec<Op>),
    /// Record that these nodes left the cluster, and why (written just before the membership
    /// change that removes them, so a returning node can be told what happened to it).
    Evict {
        nodes: Vec<(NodeId, String)>,
        reason: EvictReason,
    },
}

/// What applying one entry answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// A blank or membership entry, or an eviction record.
    Noop,
    /// The batch was applied.
    Applied,
    /// A version check failed: nothing of the batch was applied.
    Conflict(Conflict),
}

openraft::declare_raft_types!(
    /// openraft's view of warren's cluster.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub(crate) type LogId = openraft::LogId<NodeId>;
pub(crate) type Vote = openraft::Vote<NodeId>;
pub(crate) type Entry = openraft::Entry<TypeConfig>;
pub(crate) type Membership = openraft::Membership<NodeId, NodeInfo>;
pub(crate) type StoredMembership = openraft::StoredMembership<NodeId, NodeInfo>;
pub(crate) type SnapshotMeta = openraft::SnapshotMeta<NodeId, NodeInfo>;
pub(crate) type Raft = openraft::Raft<TypeConfig>;
pub(crate) type StorageError = openraft::StorageError<NodeId>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_is_stable_and_name_bound() {
        let a = node_id_of("warren@127.0.0.1");
        assert_eq!(a, node_id_of("warren@127.0.0.1"));
        assert_ne!(a, node_id_of("warren@127.0.0.2"));
        // Byte-exact: the first 8 bytes of SHA-256("a"), big-endian.
        assert_eq!(node_id_of("a"), 0xca97_8112_ca1b_bdca);
    }
}
