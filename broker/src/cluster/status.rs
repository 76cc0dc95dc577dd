//! The cluster as the management API, its health checks and the metrics read it: who is up
//! as this node sees it, whether the voters keep a majority without this node, which queues
//! are mastered here and where their copies are. Everything here reads; the one exception is
//! [`announce`], which keeps this node's own `node/<name>` record (its management address) in
//! the replicated state.
//!
//! "Up" is this node's view: the member's link is up and something arrived from it within
//! the failure-detection time (`warren_cluster::MemberStatus::running`). Two nodes may
//! disagree for a while (one of them cut off from the other); the management API compares
//! the views of the nodes it reaches to name partitions (see `mgmt/api/cluster.rs`).

use super::controller::desired_mirrors;
use super::keys::{self, NodeValue, QueueValue};
use super::link::ClusterLink;
use crate::BrokerShared;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::{debug, warn};
use warren_cluster::{MemberStatus, Op};

/// How often [`announce`] looks at its record even when nothing was committed.
const ANNOUNCE_RECHECK: Duration = Duration::from_secs(5);
/// How long [`announce`] waits after a failed write.
const ANNOUNCE_RETRY: Duration = Duration::from_secs(1);

/// The voters and which of them are up, as this node sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quorum {
    /// Every voter (witnesses included), by name.
    pub voters: Vec<String>,
    /// The voters that are up (this node included when it votes).
    pub online: Vec<String>,
    /// Whether this node votes.
    pub me_voter: bool,
}

impl Quorum {
    pub fn of(me: &str, members: &[MemberStatus]) -> Quorum {
        let mut voters: Vec<String> = members
            .iter()
            .filter(|m| m.voter)
            .map(|m| m.name.clone())
            .collect();
        voters.sort();
        let mut online: Vec<String> = members
            .iter()
            .filter(|m| m.voter && m.running)
            .map(|m| m.name.clone())
            .collect();
        online.sort();
        Quorum {
            me_voter: voters.iter().any(|v| v == me),
            voters,
            online,
        }
    }

    /// Stopping this node would leave fewer than a majority of the voters up: it votes, it is
    /// not alone (a one-voter cluster has nothing to lose), and the others up without it are
    /// half of the voters or fewer.
    pub fn critical(&self) -> bool {
        self.me_voter
            && self.voters.len() > 1
            && self.online.len().saturating_sub(1) * 2 <= self.voters.len()
    }
}

/// A queue mastered on this node whose policy asks for mirrors and none of whose in-sync
/// mirrors is up: stopping this node now loses its messages (RabbitMQ's
/// `node-is-mirror-sync-critical`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unprotected {
    pub vhost: String,
    pub name: String,
    /// The mirrors its policy asks for.
    pub mirrors: Vec<String>,
    /// Its in-sync mirrors (none of them up).
    pub in_sync: Vec<String>,
}

/// The queues of [`Unprotected`], by vhost and name.
pub fn unprotected_masters(shared: &BrokerShared, link: &ClusterLink) -> Vec<Unprotected> {
    let me = link.node_name();
    let members = link.members();
    let up: BTreeSet<&str> = members
        .iter()
        .filter(|m| m.running)
        .map(|m| m.name.as_str())
        .collect();
    let st = link.state();
    // The nodes a policy may ask for: the members that hold queues, and a node the survivor of
    // a two-voter cluster carried on without (it rejoins when it is back; its copies count
    // until then as missing, not as never asked for).
    let mut holders: Vec<String> = members
        .iter()
        .filter(|m| !m.witness)
        .map(|m| m.name.clone())
        .chain(
            st.evicted
                .values()
                .filter(|e| e.reason == warren_cluster::EvictReason::ForcedOut)
                .map(|e| e.name.clone()),
        )
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    holders.sort();
    let mut out = Vec::new();
    for (_, v) in st.prefix("queue/") {
        let Some(qv) = keys::from_value::<QueueValue>(&v.value) else {
            continue;
        };
        let p = &qv.placement;
        if p.master != me {
            continue;
        }
        let Some(q) = shared
            .vhost(&qv.def.vhost)
            .and_then(|vh| vh.queue(&qv.def.name))
        else {
            continue;
        };
        if link.is_proxy(&q) {
            continue;
        }
        let wanted = desired_mirrors(&q.policy().applied.definition, me, &holders);
        if wanted.is_empty() {
            continue;
        }
        if p.in_sync.iter().any(|n| n != me && up.contains(n.as_str())) {
            continue;
        }
        out.push(Unprotected {
            vhost: qv.def.vhost.clone(),
            name: qv.def.name.clone(),
            mirrors: wanted,
            in_sync: p.in_sync.clone(),
        });
    }
    out.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
    out
}

/// This node's share of the cluster's queues, from the committed placements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copies {
    /// Queues whose master is this node.
    pub masters: u64,
    /// Queues this node mirrors (holds a copy of).
    pub mirrors: u64,
    /// Of those, the ones whose copy is in sync.
    pub in_sync: u64,
}

pub fn copies(link: &ClusterLink) -> Copies {
    let me = link.node_name();
    let st = link.state();
    let mut c = Copies::default();
    for (_, v) in st.prefix("queue/") {
        let Some(qv) = keys::from_value::<QueueValue>(&v.value) else {
            continue;
        };
        let p = &qv.placement;
        if p.master == me {
            c.masters += 1;
        } else if p.mirrors.iter().any(|n| n == me) {
            c.mirrors += 1;
            if p.in_sync.iter().any(|n| n == me) {
                c.in_sync += 1;
            }
        }
    }
    c
}

/// Another member as the management API's fan-out sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// Up as this node sees it.
    pub running: bool,
    pub witness: bool,
    /// `host:port` of its management API, when it published one.
    pub mgmt: Option<String>,
}

/// Every other member, by name.
pub fn peers(link: &ClusterLink) -> Vec<Peer> {
    let st = link.state();
    let me = link.node_name();
    let mut out: Vec<Peer> = link
        .members()
        .into_iter()
        .filter(|m| m.name != me)
        .map(|m| Peer {
            mgmt: st
                .get(&keys::node(&m.name))
                .and_then(|v| keys::from_value::<NodeValue>(&v.value))
                .and_then(|n| n.mgmt),
            name: m.name,
            running: m.running,
            witness: m.witness,
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Where the other nodes reach this node's management API: its first management listener;
/// one bound to every interface (`0.0.0.0`, `::`) is reached at the host of the cluster
/// address this node advertises.
pub fn own_mgmt_addr(shared: &BrokerShared, link: &ClusterLink) -> Option<String> {
    let a: SocketAddr = shared
        .listeners
        .iter()
        .find(|(p, _)| *p == "http")
        .map(|(_, a)| *a)?;
    if !a.ip().is_unspecified() {
        return Some(a.to_string());
    }
    let advertised = link.cluster.advertised_addr();
    let host = advertised
        .rsplit_once(':')
        .map_or(advertised, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    Some(if host.contains(':') {
        format!("[{host}]:{}", a.port())
    } else {
        format!("{host}:{}", a.port())
    })
}

/// Keeps `node/<this node>` saying where this node's management API is: written at start, and
/// again whenever the committed state lacks it or says otherwise (after a rejoin replaced the
/// state, or a restart on another port). Without a quorum it waits and retries.
pub fn announce(link: &Arc<ClusterLink>, shared: &Arc<BrokerShared>) {
    let want = NodeValue {
        mgmt: own_mgmt_addr(shared, link),
    };
    let key = keys::node(link.node_name());
    let value = keys::to_value(&want);
    let weak: Weak<ClusterLink> = Arc::downgrade(link);
    let mut state = link.cluster.state();
    tokio::spawn(async move {
        loop {
            let Some(link) = weak.upgrade() else { return };
            if link.stopped() {
                return;
            }
            let current = state.borrow_and_update().get(&key).map(|v| v.value.clone());
            let mut wait = ANNOUNCE_RECHECK;
            if current.as_deref() != Some(&value) {
                let ops = vec![Op::Put {
                    key: key.clone(),
                    value: value.clone(),
                }];
                match link.propose(ops).await {
                    Ok(_) => debug!(record = %key, "announced this node's management address"),
                    Err(e) => {
                        debug!(error = %e, "cannot announce this node's management address yet");
                        wait = ANNOUNCE_RETRY;
                    }
                }
            }
            drop(link);
            tokio::select! {
                r = state.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(wait) => {}
            }
        }
    });
}

/// Forget `name`'s record (after forget_cluster_node); a failure only leaves a stale address
/// that nobody asks (the node is no longer a member).
pub async fn forget_record(link: &ClusterLink, name: &str) {
    let ops = vec![Op::Delete {
        key: keys::node(name),
    }];
    if let Err(e) = link.propose(ops).await {
        warn!(node = %name, error = %e, "the forgotten node's record stays in the cluster state");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, voter: bool, running: bool) -> MemberStatus {
        MemberStatus {
            id: warren_cluster::node_id_of(name),
            name: name.into(),
            addr: String::new(),
            voter,
            witness: false,
            running,
            last_contact: None,
            refused: false,
        }
    }

    #[test]
    fn a_node_is_quorum_critical_when_the_others_up_are_no_majority_without_it() {
        let three = |b: bool, c: bool| {
            vec![
                member("a", true, true),
                member("b", true, b),
                member("c", true, c),
            ]
        };
        assert!(!Quorum::of("a", &three(true, true)).critical());
        let q = Quorum::of("a", &three(true, false));
        assert!(q.critical());
        assert_eq!(q.online, vec!["a".to_owned(), "b".to_owned()]);
        assert!(Quorum::of("a", &three(false, false)).critical());
        // One voter: nothing to lose. A learner: not counted.
        assert!(!Quorum::of("a", &[member("a", true, true)]).critical());
        let with_learner = vec![
            member("a", true, true),
            member("b", true, true),
            member("c", true, true),
            member("d", false, false),
        ];
        assert!(!Quorum::of("a", &with_learner).critical());
        assert!(!Quorum::of("d", &with_learner).critical());
        // Two voters: either one's stop leaves one of two, no majority.
        let two = vec![member("a", true, true), member("b", true, true)];
        assert!(Quorum::of("a", &two).critical());
        // Five voters, two down: three up, two without this one.
        let five: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, n)| member(n, true, i < 3))
            .collect();
        assert!(Quorum::of("a", &five).critical());
        let five_one_down: Vec<_> = ["a", "b", "c", "d", "e"]
            .iter()
            .enumerate()
            .map(|(i, n)| member(n, true, i < 4))
            .collect();
        assert!(!Quorum::of("a", &five_one_down).critical());
    }
}
