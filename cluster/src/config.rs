//! What a node needs to join a cluster: its name, listeners, seeds, secret, data dir, timing.
//!
//! [`Timing`] holds every clock of the crate. Its rules (checked by [`Timing::validate`]):
//! - `lease < failure_detection`: a node stops claiming quorum ([`crate::Cluster::has_quorum`])
//!   before any peer that counted it declares it down, so a master that confirms under
//!   `has_quorum()` cannot overlap with a promotion decided on the other side.
//! - `link_heartbeat * 2 <= lease`: a healthy peer acknowledges at least twice per lease.
//! - `raft_heartbeat < election_timeout / 2`: openraft's own requirement, with margin.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::ClusterError;

/// What a node of a cluster with two voters and no witness does when it loses its peer
/// (RabbitMQ's `cluster_partition_handling`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PartitionHandling {
    /// Keep serving: after `failure_detection` without the peer (seen up since this process
    /// started), the survivor of a two-voter cluster without witness forces itself into a
    /// one-voter cluster (see [`crate::Cluster::force_single`]). Unsafe under a real partition:
    /// both sides may do it.
    #[default]
    Ignore,
    /// Never force: the broker pauses a node for which [`crate::Cluster::has_quorum`] is false.
    PauseMinority,
}

/// TLS on inter-node links (rustls with ring): each node presents `cert` and verifies its peer's
/// against `ca`, both ways.
#[derive(Clone, Debug)]
pub struct ClusterTls {
    /// PEM certificate chain of this node (its SANs must cover the host peers dial).
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificate(s) that signed the peers' certificates.
    pub ca: PathBuf,
}

/// Every clock of the crate. Defaults suit a LAN or loopback; tests use [`Timing::fast`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Raft leader heartbeat.
    pub raft_heartbeat: Duration,
    /// Raft election timeout (minimum; the maximum is twice this).
    pub election_timeout: Duration,
    /// Link ping interval (each ping is answered by a pong).
    pub link_heartbeat: Duration,
    /// A link that received nothing for this long is closed and its peer reported down.
    pub failure_detection: Duration,
    /// `has_quorum()` counts a voter only if it answered a ping sent within this time.
    pub lease: Duration,
    /// An inbound or outbound link handshake that takes longer is dropped.
    pub handshake_timeout: Duration,
    /// Ceiling of the reconnect backoff (it starts at 50 ms and doubles).
    pub reconnect_max: Duration,
    /// How long `propose` waits for a leader, the commit and the local apply.
    pub propose_timeout: Duration,
    /// How long `start` tries its seeds before giving up a join.
    pub join_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            raft_heartbeat: Duration::from_millis(100),
            election_timeout: Duration::from_millis(1000),
            link_heartbeat: Duration::from_millis(250),
            failure_detection: Duration::from_millis(3000),
            lease: Duration::from_millis(2000),
            handshake_timeout: Duration::from_secs(5),
            reconnect_max: Duration::from_secs(2),
            propose_timeout: Duration::from_secs(10),
            join_timeout: Duration::from_secs(60),
        }
    }
}

impl Timing {
    /// Short clocks for tests on loopback.
    pub fn fast() -> Self {
        Self {
            raft_heartbeat: Duration::from_millis(50),
            election_timeout: Duration::from_millis(300),
            link_heartbeat: Duration::from_millis(50),
            failure_detection: Duration::from_millis(600),
            lease: Duration::from_millis(400),
            handshake_timeout: Duration::from_millis(1000),
            reconnect_max: Duration::from_millis(200),
            propose_timeout: Duration::from_secs(5),
            join_timeout: Duration::from_secs(10),
        }
    }

    /// Check the rules in the module doc.
    pub fn validate(&self) -> Result<(), ClusterError> {
        let bad = |why: &str| Err(ClusterError::Config(format!("timing: {why}")));
        if self.raft_heartbeat.is_zero() || self.link_heartbeat.is_zero() {
            return bad("heartbeats must be > 0");
        }
        if self.lease >= self.failure_detection {
            return bad("lease must be shorter than failure_detection");
        }
        if self.link_heartbeat * 2 > self.lease {
            return bad("link_heartbeat must be at most half the lease");
        }
        if self.raft_heartbeat * 2 >= self.election_timeout {
            return bad("raft_heartbeat must be under half the election timeout");
        }
        Ok(())
    }
}

/// Snapshot policy of the Raft log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Take a snapshot after this many entries since the last one.
    pub every: u64,
    /// Entries kept in the log behind a snapshot (a peer further behind gets the snapshot).
    pub keep: u64,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self {
            every: 5000,
            keep: 1000,
        }
    }
}

/// A node's cluster configuration.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// "warren@127.0.0.1" style; unique in the cluster; the [`crate::NodeId`] derives from it.
    pub node_name: String,
    /// Inter-node listeners (port 0 allowed; [`crate::Cluster::listen_addrs`] reports the bound
    /// addresses).
    pub listen: Vec<SocketAddr>,
    /// host:port peers use to reach this node (default: the first bound listener).
    pub advertise: Option<String>,
    /// Seeds to join through: "host:port", or a DNS name resolving to several peers.
    pub join: Vec<String>,
    /// Shared secret (the Erlang cookie's role); never sent on the wire.
    pub secret: Vec<u8>,
    /// The Raft log, vote and snapshot live here.
    pub data_dir: PathBuf,
    /// A voter that holds no queues.
    pub witness: bool,
    pub partition_handling: PartitionHandling,
    pub tls: Option<ClusterTls>,
    pub timing: Timing,
    pub snapshot: SnapshotPolicy,
    /// Outbound app messages queued per peer before `send` fails with `QueueFull`.
    pub app_queue: usize,
    /// Inbound app messages buffered per subscribed channel.
    pub app_inbox: usize,
}

impl ClusterConfig {
    /// A config with defaults: one listener on 127.0.0.1:0, no seeds, default timing.
    pub fn new(node_name: impl Into<String>, data_dir: impl Into<PathBuf>, secret: &[u8]) -> Self {
        Self {
            node_name: node_name.into(),
            listen: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            advertise: None,
            join: Vec::new(),
            secret: secret.to_vec(),
            data_dir: data_dir.into(),
            witness: false,
            partition_handling: PartitionHandling::Ignore,
            tls: None,
            timing: Timing::default(),
            snapshot: SnapshotPolicy::default(),
            app_queue: 8192,
            app_inbox: 8192,
        }
    }

    /// Refuse what cannot work.
    pub fn validate(&self) -> Result<(), ClusterError> {
        if self.node_name.is_empty() {
            return Err(ClusterError::Config("node_name is empty".into()));
        }
        if self.listen.is_empty() {
            return Err(ClusterError::Config("no listen address".into()));
        }
        if self.secret.is_empty() {
            return Err(ClusterError::Config("the cluster secret is empty".into()));
        }
        if self.app_queue == 0 || self.app_inbox == 0 {
            return Err(ClusterError::Config("app queue sizes must be > 0".into()));
        }
        if self.snapshot.every == 0 {
            return Err(ClusterError::Config("snapshot.every must be > 0".into()));
        }
        self.timing.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_and_fast_timings_are_valid() {
        Timing::default().validate().unwrap();
        Timing::fast().validate().unwrap();
        let t = Timing {
            lease: Duration::from_secs(5),
            ..Timing::default()
        };
        assert!(t.validate().is_err());
    }
}
