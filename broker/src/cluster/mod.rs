//! The broker's side of clustering: how a node joins and runs a warren cluster
//! (`warren_cluster` is the AMQP-agnostic substrate: Raft-replicated key-value state, links,
//! failure detection).
//!
//! - [`settings`]: the cluster flags and config keys, validated; the `warren_cluster` config
//!   derived from them.
//! - [`keys`]: how definitions map onto replicated keys and values.
//! - [`link`]: the running cluster of a broker: start, propose-and-wait, member status.
//! - [`apply`]: replicated definitions applied to the node (vhosts, users, permissions,
//!   policies), by key as they commit and whole after a restart.
//! - [`status`]: read-only views for the management API and metrics (who is up, quorum,
//!   the queues mastered and mirrored here) and this node's `node/<name>` record.
//! - [`wire`], [`remote`], [`serve`]: queue operations between nodes (a proxy here, the
//!   master's side there) for queues whose master is another node; [`parked`]: the consumers
//!   whose queue's master died, waiting for its promotion.
//! - [`controller`]: placements: mirrors, the in-sync set, promotions.
//! - [`replicate`], [`mirror`], [`mirror_wire`]: the stream from a master to its mirrors and
//!   the mirrors' copies; synchronisation. [`mirror_copy`]: one copy, in memory and (durable
//!   queues) on disk, and what of it is safe to acknowledge.
//! - [`locator`]: where a new queue's master goes.
pub mod apply;
pub mod controller;
pub mod keys;
pub mod link;
pub mod locator;
pub mod mirror;
pub mod mirror_copy;
pub mod mirror_wire;
pub mod parked;
pub mod remote;
pub mod replicate;
pub mod serve;
pub mod settings;
pub mod status;
pub mod wire;
