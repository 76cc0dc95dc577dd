//! # warren-cluster
//!
//! The clustering substrate of warren, AMQP-agnostic: nodes join with seeds and a shared secret,
//! cluster metadata is a versioned key-value map replicated through Raft (openraft), and nodes
//! exchange application messages over the same authenticated links. `README.md` next to this
//! crate explains the design and what the broker must do with it.
//!
//! # Layout
//! - `config`: `ClusterConfig`, `Timing` and their rules.
//! - `error`: `ClusterError`.
//! - `state`: the replicated state (members, versioned key-value map, evictions) and the pure
//!   logic that applies batches of [`Op`]s to it.
//! - `types`: node identity ([`node_id_of`]) and the openraft type configuration.
//! - `storage`: the Raft log, vote and snapshots on disk (`file` record format, `log`, `sm`).
//! - `net`: links: frame codec, HMAC handshake, TLS, per-peer queues, failure detection.
//! - `rpc`: requests between nodes and openraft's network over the links.
//! - `node`: [`Cluster`], which ties them together.
//!
//! Imports go one way: `node` → `rpc` → `net` → (`state`, `types`, `config`); `node` →
//! `storage` → (`state`, `types`).

pub mod config;
pub mod error;
mod net;
mod node;
mod rpc;
pub mod state;
mod storage;
mod types;

pub use config::{ClusterConfig, ClusterTls, PartitionHandling, SnapshotPolicy, Timing};
pub use error::ClusterError;
pub use net::{AppMessage, PeerEvent, PeerView, MAX_APP_PAYLOAD};
pub use node::{Cluster, MemberStatus, MAX_PROPOSAL};
pub use state::{
    Applied, ClusterState, Conflict, EvictReason, Eviction, Member, Op, ResetReason, Versioned,
};
pub use types::{node_id_of, NodeId, NodeInfo};
