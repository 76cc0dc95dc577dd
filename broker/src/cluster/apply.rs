//! The replicated definitions (vhosts, users, permissions, policies, operator policies)
//! applied to this node.
//!
//! [`Applier::reconcile`] brings the node's in-memory definitions to a state of the cluster:
//! every key whose version differs from what it last applied is created or replaced, every key
//! that disappeared is removed. It is called with the state after each commit (the state watch
//! coalesces, so a burst of commits costs one pass) and once at start, so a node that was away
//! catches up the same way as one that saw every change. Creations go parents first (vhosts,
//! users, then permissions and policies), removals children first.

use super::keys::{self, Key};
use crate::auth::{PermissionSpec, User, VhostMeta};
use crate::definitions::json::{PermissionDef, PolicyDef, UserDef, VhostDef};
use crate::BrokerShared;
use std::collections::{BTreeMap, BTreeSet};
use tracing::warn;
use warren_cluster::ClusterState;

/// Key prefixes of the definitions this module applies.
const PREFIXES: [&str; 5] = ["vhost/", "user/", "perm/", "policy/", "opolicy/"];

/// What was applied: each key's version.
#[derive(Debug, Default)]
pub struct Applier {
    seen: BTreeMap<String, u64>,
}

/// One change, in the order it must be applied.
enum Change<'a> {
    Put(Key, &'a serde_json::Value),
    Remove(Key),
}

fn rank(k: &Key, put: bool) -> u8 {
    let parent = match k {
        Key::Vhost(_) => 0,
        Key::User(_) => 1,
        _ => 2,
    };
    if put {
        parent
    } else {
        10 - parent
    }
}

impl Applier {
    /// An applier that treats this node's own definitions (loaded from its data dir) as
    /// applied: the first [`Applier::reconcile`] replaces each with the cluster's and removes
    /// those the cluster no longer has (deleted while this node was away, or never there for a
    /// node that joins).
    pub fn from_local(shared: &BrokerShared) -> Applier {
        let d = shared.export_definitions(crate::definitions::ExportScope::Durable);
        let seen = super::link::definition_ops(&d)
            .into_iter()
            .filter_map(|op| match op {
                warren_cluster::Op::Put { key, .. } => Some((key, u64::MAX)),
                _ => None,
            })
            .collect();
        Applier { seen }
    }

    /// Apply every definition change between what this node applied and `st`.
    pub async fn reconcile(&mut self, shared: &BrokerShared, st: &ClusterState) {
        let mut current: BTreeMap<&str, (u64, &serde_json::Value)> = BTreeMap::new();
        for p in PREFIXES {
            for (k, v) in st.prefix(p) {
                current.insert(k.as_str(), (v.version, &*v.value));
            }
        }
        let mut changes: Vec<(u8, Change)> = Vec::new();
        for (k, (version, value)) in &current {
            if self.seen.get(*k) != Some(version) {
                if let Some(key) = keys::parse(k) {
                    changes.push((rank(&key, true), Change::Put(key, value)));
                }
            }
        }
        for k in self.seen.keys() {
            if !current.contains_key(k.as_str()) {
                if let Some(key) = keys::parse(k) {
                    changes.push((rank(&key, false), Change::Remove(key)));
                }
            }
        }
        changes.sort_by_key(|(r, _)| *r);
        let changed = !changes.is_empty();
        let mut policy_vhosts = BTreeSet::new();
        for (_, c) in changes {
            match c {
                Change::Put(key, value) => put(shared, key, value, &mut policy_vhosts),
                Change::Remove(key) => remove(shared, key, &mut policy_vhosts).await,
            }
        }
        for v in policy_vhosts {
            shared.apply_policies(&v);
        }
        self.seen = current
            .into_iter()
            .map(|(k, (v, _))| (k.to_owned(), v))
            .collect();
        // definitions.json keeps following (it still holds this node's queues and exchanges).
        if changed {
            if let Err(e) = shared.persist_definitions() {
                warn!(error = %e, "cannot write the definitions applied from the cluster");
            }
        }
    }
}

fn bad(key: &Key, what: &str) {
    warn!(
        ?key,
        "replicated {what} does not decode; left as it was on this node"
    );
}

fn put(
    shared: &BrokerShared,
    key: Key,
    value: &serde_json::Value,
    policy_vhosts: &mut BTreeSet<String>,
) {
    match &key {
        Key::Vhost(name) => {
            let Some(d) = keys::from_value::<VhostDef>(value) else {
                return bad(&key, "vhost");
            };
            shared.add_vhost_in_memory(
                name,
                VhostMeta {
                    description: d.description(),
                    tags: d.tags(),
                },
            );
        }
        Key::User(name) => {
            let Some(d) = keys::from_value::<UserDef>(value) else {
                return bad(&key, "user");
            };
            let Ok(password) = d.credential() else {
                return bad(&key, "user's password hash");
            };
            shared.auth.put_user(User {
                name: name.clone(),
                password,
                tags: d.tags.0,
            });
        }
        Key::Perm { vhost, user } => {
            let Some(d) = keys::from_value::<PermissionDef>(value) else {
                return bad(&key, "permission");
            };
            let spec: PermissionSpec = d.spec();
            shared.auth.put_permissions(user, vhost, spec);
        }
        Key::Policy { kind, vhost, .. } => {
            let Some(d) = keys::from_value::<PolicyDef>(value) else {
                return bad(&key, "policy");
            };
            match d.to_policy_kind(*kind) {
                Ok(p) => {
                    shared.policies.put_kind(*kind, p);
                    policy_vhosts.insert(vhost.clone());
                }
                Err(e) => warn!(?key, error = %e, "replicated policy refused on this node"),
            }
        }
        // Exchanges, bindings and queues are not replicated by this module.
        Key::Exchange { .. } | Key::Binding { .. } | Key::Queue { .. } => {}
    }
}

async fn remove(shared: &BrokerShared, key: Key, policy_vhosts: &mut BTreeSet<String>) {
    match key {
        Key::Vhost(name) => shared.remove_vhost_locally(&name).await,
        Key::User(name) => {
            shared.auth.remove_user(&name);
        }
        Key::Perm { vhost, user } => {
            shared.auth.remove_permissions(&user, &vhost);
        }
        Key::Policy { kind, vhost, name } => {
            shared.policies.remove_kind(kind, &vhost, &name);
            policy_vhosts.insert(vhost);
        }
        Key::Exchange { .. } | Key::Binding { .. } | Key::Queue { .. } => {}
    }
}
