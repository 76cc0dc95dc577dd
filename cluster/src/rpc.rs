//! Requests between nodes (JSON in `Request`/`Response` frames) and openraft's network over them.
//!
//! Raft's own RPCs (AppendEntries, Vote, InstallSnapshot chunks) plus the cluster's: a proposal
//! forwarded to the leader, a join, a removal. A node answers Raft RPCs from a peer it recorded
//! as evicted with `Refused`, so a stale node coming back cannot disturb the survivor's terms
//! before it learns it was evicted.

use std::time::Duration;

use bytes::Bytes;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::net::{CallError, Net};
use crate::state::{Conflict, EvictReason, Op};
use crate::types::{NodeId, NodeInfo, TypeConfig};

/// A request from one node to another.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RpcRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// Propose a batch (sent to the leader).
    Propose(Vec<Op>),
    /// Add this node as a voter (`fresh`: it has no Raft data), or refresh its address (sent to
    /// any member; forwarded). A node removed by forget or leave may only come back fresh.
    Join {
        id: NodeId,
        info: NodeInfo,
        fresh: bool,
    },
    /// Remove a node (sent to any member; forwarded).
    Remove {
        id: NodeId,
        reason: EvictReason,
    },
}

/// The answer to an [`RpcRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RpcResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    /// Log index of the proposal / membership change.
    Done(Result<u64, OpError>),
    /// The request was not served (malformed, from an evicted node, node shutting down).
    Refused(String),
}

/// Why a cluster operation failed on the node that served it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub(crate) enum OpError {
    #[error("not the leader (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    #[error("no leader")]
    NoLeader,
    #[error("version conflict at index {0}")]
    Conflict(u64, Conflict),
    #[error("{0} is not part of a cluster yet")]
    NotInitialized(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Bytes {
    match serde_json::to_vec(v) {
        Ok(b) => Bytes::from(b),
        Err(e) => encode_refused(&format!("cannot encode: {e}")),
    }
}

fn encode_refused(why: &str) -> Bytes {
    Bytes::from(serde_json::to_vec(&RpcResponse::Refused(why.to_string())).unwrap_or_default())
}

/// openraft's network: one [`RaftPeer`] per target, all over the node's links.
pub(crate) struct RaftNet {
    pub(crate) net: Net,
    pub(crate) backoff: Duration,
}

impl RaftNetworkFactory<TypeConfig> for RaftNet {
    type Network = RaftPeer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> RaftPeer {
        self.net.set_member_addr(target, &node.addr);
        RaftPeer {
            net: self.net.clone(),
            target,
            backoff: self.backoff,
        }
    }
}

/// openraft's client for one target.
pub(crate) struct RaftPeer {
    net: Net,
    target: NodeId,
    backoff: Duration,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl RaftPeer {
    async fn call<E: std::error::Error>(
        &self,
        req: RpcRequest,
        ttl: Duration,
    ) -> Result<RpcResponse, RpcErr<E>> {
        match self.net.call(self.target, encode(&req), ttl).await {
            Ok(body) => {
                serde_json::from_slice(&body).map_err(|e| RPCError::Network(NetworkError::new(&e)))
            }
            Err(e @ CallError::Unreachable) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e @ CallError::Timeout) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

fn unexpected<E: std::error::Error>(r: RpcResponse) -> RpcErr<E> {
    let why = match r {
        RpcResponse::Refused(why) => why,
        other => format!("unexpected response {other:?}"),
    };
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other(why)))
}

impl RaftNetwork<TypeConfig> for RaftPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self
            .call(RpcRequest::AppendEntries(rpc), option.hard_ttl())
            .await?
        {
            RpcResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        match self
            .call(RpcRequest::InstallSnapshot(rpc), option.hard_ttl())
            .await?
        {
            RpcResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self.call(RpcRequest::Vote(rpc), option.hard_ttl()).await? {
            RpcResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(unexpected(other)),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
