//! The replicated state: members, a versioned key-value map, and who was evicted.
//!
//! This is the pure half of the state machine: [`ClusterState::apply_batch`] and friends take an
//! entry's index and contents and change the state; no I/O, no clock. `storage::sm` wraps it for
//! openraft (persistence, snapshots, publishing).
//!
//! Invariants worth naming:
//! - A key's `version` is the log index of the batch that last wrote it, so versions only grow and
//!   `0` means "absent" in a [`Op::CheckVersion`].
//! - A batch is atomic: every `CheckVersion` in it is evaluated against the state *before* the
//!   batch; if one fails nothing is applied and the first failure is reported.
//! - `members` mirrors the last applied Raft membership; a node that comes back into the
//!   membership (absent from the previous one) is dropped from `evicted`.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::types::{Membership, NodeId};

/// A value and the log index that last wrote it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Versioned {
    /// Log index of the batch that last wrote the key (never 0).
    pub version: u64,
    /// Shared so that publishing a new state after each applied batch copies pointers, not JSON.
    pub value: Arc<serde_json::Value>,
}

/// One operation of an atomic batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// Set `key` to `value`.
    Put {
        key: String,
        value: serde_json::Value,
    },
    /// Remove `key` (absent is fine).
    Delete { key: String },
    /// Remove every key starting with `prefix`.
    DeletePrefix { prefix: String },
    /// Apply the batch only if `key` is at `version` (`0` = the key must be absent).
    CheckVersion { key: String, version: u64 },
}

/// A failed [`Op::CheckVersion`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conflict {
    pub key: String,
    pub expected: u64,
    /// The key's version when the batch was applied (`0` = absent).
    pub found: u64,
}

/// A member of the cluster, as the last applied membership says.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: NodeId,
    pub name: String,
    /// host:port its peers dial.
    pub addr: String,
    /// A voter (false: a learner, still catching up before it is promoted).
    pub voter: bool,
    /// A voter that holds no queues.
    pub witness: bool,
}

/// Why a node is no longer a member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvictReason {
    /// Removed by `forget` (rabbitmqctl forget_cluster_node): it must be reset to come back.
    Forgotten,
    /// It left by itself (`leave`).
    Left,
    /// The survivor of a two-voter cluster carried on alone (`force_single`): the evicted node
    /// rejoins under the survivor automatically and discards its own divergent metadata.
    ForcedOut,
}

/// A node that was removed, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eviction {
    pub name: String,
    pub reason: EvictReason,
    /// Log index of the eviction record.
    pub index: u64,
}

/// One change of the applied state, in log order (see [`crate::Cluster::applied`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Applied {
    /// A batch applied at `index` (a batch refused by a version check changes nothing and is not
    /// reported).
    Batch { index: u64, ops: Arc<Vec<Op>> },
    /// The membership changed (see `ClusterState::members`).
    Membership { index: u64 },
    /// These nodes were recorded as evicted (see `ClusterState::evicted`).
    Evicted { index: u64, nodes: Vec<NodeId> },
    /// The whole state was replaced: re-read it from [`crate::Cluster::state`] rather than
    /// patching what you had.
    Reset { index: u64, reason: ResetReason },
}

/// Why the state was replaced whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetReason {
    /// A snapshot from the leader was installed (this node was too far behind for the log).
    Snapshot,
    /// This node was evicted by the survivor of a two-voter cluster, discarded its own
    /// (divergent) metadata and rejoined: anything the broker kept from before (queue contents
    /// it mastered or mirrored) must be treated as stale.
    Rejoined,
}

/// The applied state on one node.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterState {
    pub members: BTreeMap<NodeId, Member>,
    pub kv: BTreeMap<String, Versioned>,
    pub evicted: BTreeMap<NodeId, Eviction>,
    /// Log index of the last applied entry (0 before the first).
    pub last_applied: u64,
}

// === impl ClusterState ===

impl ClusterState {
    /// The entry for `key`.
    pub fn get(&self, key: &str) -> Option<&Versioned> {
        self.kv.get(key)
    }

    /// The version of `key`, 0 when absent (what [`Op::CheckVersion`] compares with).
    pub fn version(&self, key: &str) -> u64 {
        self.kv.get(key).map_or(0, |v| v.version)
    }

    /// Every key starting with `prefix`, in order.
    pub fn prefix<'a>(
        &'a self,
        prefix: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Versioned)> + 'a {
        self.kv
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(move |(k, _)| k.starts_with(prefix))
    }

    /// The voters (witnesses included).
    pub fn voters(&self) -> impl Iterator<Item = &Member> {
        self.members.values().filter(|m| m.voter)
    }

    /// Apply one batch at log index `index`: all or nothing.
    pub(crate) fn apply_batch(&mut self, index: u64, ops: &[Op]) -> Result<(), Conflict> {
        for op in ops {
            if let Op::CheckVersion { key, version } = op {
                let found = self.version(key);
                if found != *version {
                    return Err(Conflict {
                        key: key.clone(),
                        expected: *version,
                        found,
                    });
                }
            }
        }
        for op in ops {
            match op {
                Op::Put { key, value } => {
                    self.kv.insert(
                        key.clone(),
                        Versioned {
                            version: index,
                            value: Arc::new(value.clone()),
                        },
                    );
                }
                Op::Delete { key } => {
                    self.kv.remove(key);
                }
                Op::DeletePrefix { prefix } => {
                    let doomed: Vec<String> = self.prefix(prefix).map(|(k, _)| k.clone()).collect();
                    for k in doomed {
                        self.kv.remove(&k);
                    }
                }
                Op::CheckVersion { .. } => {}
            }
        }
        Ok(())
    }

    /// Record evictions made at log index `index`.
    pub(crate) fn apply_evict(
        &mut self,
        index: u64,
        nodes: &[(NodeId, String)],
        reason: EvictReason,
    ) {
        for (id, name) in nodes {
            self.evicted.insert(
                *id,
                Eviction {
                    name: name.clone(),
                    reason,
                    index,
                },
            );
        }
    }

    /// Replace `members` by what `membership` says. A node that comes back (member now, not
    /// before) is no longer evicted; one still listed in a joint configuration stays evicted.
    pub(crate) fn apply_membership(&mut self, membership: &Membership) {
        let before: std::collections::BTreeSet<NodeId> = self.members.keys().copied().collect();
        let voters: std::collections::BTreeSet<NodeId> = membership.voter_ids().collect();
        self.members = membership
            .nodes()
            .map(|(id, info)| {
                (
                    *id,
                    Member {
                        id: *id,
                        name: info.name.clone(),
                        addr: info.addr.clone(),
                        voter: voters.contains(id),
                        witness: info.witness,
                    },
                )
            })
            .collect();
        let members = &self.members;
        self.evicted
            .retain(|id, _| !members.contains_key(id) || before.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use serde_json::json;

    use super::*;
    use crate::types::NodeInfo;

    fn put(k: &str, v: serde_json::Value) -> Op {
        Op::Put {
            key: k.into(),
            value: v,
        }
    }

    #[test]
    fn versions_are_log_indexes() {
        let mut s = ClusterState::default();
        s.apply_batch(3, &[put("a", json!(1)), put("b", json!(2))])
            .unwrap();
        assert_eq!(s.version("a"), 3);
        s.apply_batch(7, &[put("a", json!(5))]).unwrap();
        assert_eq!(s.version("a"), 7);
        assert_eq!(s.version("b"), 3);
        assert_eq!(s.version("zz"), 0);
    }

    #[test]
    fn failed_check_applies_nothing() {
        let mut s = ClusterState::default();
        s.apply_batch(2, &[put("q", json!("v1"))]).unwrap();
        let before = s.clone();
        let err = s
            .apply_batch(
                4,
                &[
                    put("other", json!(1)),
                    Op::CheckVersion {
                        key: "q".into(),
                        version: 1,
                    },
                ],
            )
            .unwrap_err();
        assert_eq!(
            err,
            Conflict {
                key: "q".into(),
                expected: 1,
                found: 2
            }
        );
        assert_eq!(s, before);
        // Absent = 0.
        s.apply_batch(
            5,
            &[
                Op::CheckVersion {
                    key: "new".into(),
                    version: 0,
                },
                put("new", json!(true)),
            ],
        )
        .unwrap();
        assert_eq!(s.version("new"), 5);
    }

    #[test]
    fn checks_see_the_state_before_the_batch() {
        let mut s = ClusterState::default();
        // The put comes first in the batch, but the check still sees "absent".
        s.apply_batch(
            9,
            &[
                put("k", json!(1)),
                Op::CheckVersion {
                    key: "k".into(),
                    version: 0,
                },
            ],
        )
        .unwrap();
        assert_eq!(s.version("k"), 9);
    }

    #[test]
    fn delete_prefix_only_touches_the_prefix() {
        let mut s = ClusterState::default();
        s.apply_batch(
            1,
            &[
                put("queue/a/1", json!(1)),
                put("queue/a/2", json!(1)),
                put("queue/b/1", json!(1)),
                put("queue/a", json!(1)),
            ],
        )
        .unwrap();
        s.apply_batch(
            2,
            &[Op::DeletePrefix {
                prefix: "queue/a/".into(),
            }],
        )
        .unwrap();
        let keys: Vec<&String> = s.kv.keys().collect();
        assert_eq!(keys, ["queue/a", "queue/b/1"]);
        assert_eq!(s.prefix("queue/").count(), 2);
    }

    #[test]
    fn membership_fills_members_and_clears_returning_evictions() {
        let mut s = ClusterState::default();
        s.apply_evict(4, &[(2, "b".into())], EvictReason::ForcedOut);
        let nodes: BTreeMap<NodeId, NodeInfo> = [
            (
                1,
                NodeInfo {
                    name: "a".into(),
                    addr: "h:1".into(),
                    witness: false,
                },
            ),
            (
                3,
                NodeInfo {
                    name: "w".into(),
                    addr: "h:3".into(),
                    witness: true,
                },
            ),
        ]
        .into();
        s.apply_membership(&Membership::new(vec![BTreeSet::from([1])], nodes.clone()));
        assert!(s.members[&1].voter);
        assert!(!s.members[&3].voter);
        assert!(s.members[&3].witness);
        assert!(s.evicted.contains_key(&2));
        let mut nodes = nodes;
        nodes.insert(
            2,
            NodeInfo {
                name: "b".into(),
                addr: "h:2".into(),
                witness: false,
            },
        );
        s.apply_membership(&Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes));
        assert!(s.evicted.is_empty());
        assert_eq!(s.voters().count(), 3);
    }
}
