//! The replicated definitions applied to this node: vhosts, users, permissions, policies,
//! operator policies, vhost limits, exchanges, bindings and queues.
//!
//! [`Applier::reconcile`] brings the node's in-memory definitions to a state of the cluster:
//! every key whose version differs from what it last applied is created or replaced, every key
//! that disappeared is removed. It is called with the state after each commit (the state watch
//! coalesces, so a burst of commits costs one pass) and once at start, so a node that was away
//! catches up the same way as one that saw every change. Creations go parents first (vhosts,
//! users, permissions and policies, exchanges, queues, bindings), removals children first.
//!
//! A queue runs where its placement's master is: there as a queue actor, on every other node as
//! a proxy to it ([`super::remote`]).

use super::keys::{self, Key, QueueValue};
use super::link::ClusterLink;
use crate::auth::{PermissionSpec, User, VhostMeta};
use crate::definitions::json::{
    json_to_table, BindingDef, ExchangeDef, PermissionDef, PolicyDef, UserDef, VhostDef,
};
use crate::exchange::Destination;
use crate::queue::QueueArgs;
use crate::vhost::QueueSpec;
use crate::BrokerShared;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tracing::warn;
use warren_cluster::ClusterState;

/// Key prefixes this module applies.
const PREFIXES: [&str; 9] = [
    "vhost/",
    "user/",
    "perm/",
    "policy/",
    "opolicy/",
    "limits/",
    "exchange/",
    "queue/",
    "binding/",
];

/// What was applied: each key's version and value.
#[derive(Debug, Default)]
pub struct Applier {
    seen: BTreeMap<String, (u64, Arc<Value>)>,
}

/// One change, in the order it must be applied.
enum Change {
    Put(Key, Arc<Value>),
    Remove(Key, Arc<Value>),
}

fn rank(k: &Key, put: bool) -> u8 {
    let parent = match k {
        Key::Vhost(_) => 0,
        Key::User(_) => 1,
        Key::Perm { .. } | Key::Policy { .. } | Key::Limits { .. } => 2,
        Key::Exchange { .. } => 3,
        Key::Queue { .. } => 4,
        Key::Binding { .. } => 5,
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
        let mut ops = super::link::definition_ops(&d);
        ops.extend(super::link::topology_ops(&d, &shared.config.node_name));
        let seen = ops
            .into_iter()
            .filter_map(|op| match op {
                warren_cluster::Op::Put { key, value } => Some((key, (u64::MAX, Arc::new(value)))),
                _ => None,
            })
            .collect();
        Applier { seen }
    }

    /// Apply every definition change between what this node applied and `st`.
    pub async fn reconcile(
        &mut self,
        shared: &BrokerShared,
        link: &ClusterLink,
        st: &ClusterState,
    ) {
        let mut current: BTreeMap<&str, (u64, &Arc<Value>)> = BTreeMap::new();
        for p in PREFIXES {
            for (k, v) in st.prefix(p) {
                current.insert(k.as_str(), (v.version, &v.value));
            }
        }
        let mut changes: Vec<(u8, Change)> = Vec::new();
        for (k, (version, value)) in &current {
            if self.seen.get(*k).map(|(v, _)| v) != Some(version) {
                if let Some(key) = keys::parse(k) {
                    changes.push((rank(&key, true), Change::Put(key, (*value).clone())));
                }
            }
        }
        for (k, (_, old)) in &self.seen {
            if !current.contains_key(k.as_str()) {
                if let Some(key) = keys::parse(k) {
                    changes.push((rank(&key, false), Change::Remove(key, old.clone())));
                }
            }
        }
        changes.sort_by_key(|(r, _)| *r);
        let changed = !changes.is_empty();
        let mut policy_vhosts = BTreeSet::new();
        for (_, c) in changes {
            match c {
                Change::Put(key, value) => put(shared, link, key, &value, &mut policy_vhosts).await,
                Change::Remove(key, old) => {
                    remove(shared, link, key, &old, &mut policy_vhosts).await
                }
            }
        }
        for v in policy_vhosts {
            shared.apply_policies(&v);
        }
        self.seen = current
            .into_iter()
            .map(|(k, (v, value))| (k.to_owned(), (v, value.clone())))
            .collect();
        // definitions.json keeps following (a restarted node loads it before it catches up).
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

fn destination(b: &BindingDef) -> Destination {
    if b.destination_type == "queue" {
        Destination::Queue(b.destination.as_str().into())
    } else {
        Destination::Exchange(b.destination.as_str().into())
    }
}

async fn put(
    shared: &BrokerShared,
    link: &ClusterLink,
    key: Key,
    value: &Value,
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
        Key::Limits { vhost } => {
            let limits = crate::definitions::json::limits_from_parameter(value);
            let (Ok(Some((_, l))), Some(vh)) = (limits, shared.vhost(vhost)) else {
                return bad(&key, "vhost limits");
            };
            vh.set_limits(l);
        }
        Key::Exchange { vhost, name } => {
            let (Some(d), Some(vh)) = (keys::from_value::<ExchangeDef>(value), shared.vhost(vhost))
            else {
                return bad(&key, "exchange");
            };
            let r = d
                .exchange_kind()
                .map_err(crate::error::ChannelError::precondition_failed)
                .and_then(|kind| {
                    vh.declare_exchange(
                        name,
                        kind,
                        d.durable,
                        d.auto_delete,
                        d.internal,
                        json_to_table(&d.arguments),
                    )
                });
            if let Err(e) = r {
                warn!(?key, error = %e, "replicated exchange not applied on this node");
            }
        }
        Key::Binding { vhost } => {
            let (Some(b), Some(vh)) = (keys::from_value::<BindingDef>(value), shared.vhost(vhost))
            else {
                return bad(&key, "binding");
            };
            if let Err(e) = vh.bind(
                &b.source,
                destination(&b),
                &b.routing_key,
                json_to_table(&b.arguments),
            ) {
                warn!(?key, error = %e, "replicated binding not applied on this node");
            }
        }
        Key::Queue { vhost, name } => {
            let (Some(q), Some(vh)) = (keys::from_value::<QueueValue>(value), shared.vhost(vhost))
            else {
                return bad(&key, "queue");
            };
            let arguments = json_to_table(&q.def.arguments);
            let args = match QueueArgs::parse(&arguments, name, vhost) {
                Ok(a) => a,
                Err(e) => {
                    return warn!(?key, error = %e, "replicated queue not applied on this node")
                }
            };
            let spec = QueueSpec {
                name: name.clone(),
                durable: q.def.durable,
                exclusive_owner: None,
                auto_delete: q.def.auto_delete,
                arguments,
                args,
            };
            let here = q.placement.master == shared.config.node_name;
            let qref = super::wire::QueueRef {
                vhost: vhost.clone(),
                name: name.clone(),
            };
            let ids = |names: &[String]| -> Vec<warren_cluster::NodeId> {
                names
                    .iter()
                    .map(|n| warren_cluster::node_id_of(n))
                    .collect()
            };
            let mut seed = Vec::new();
            // The promoted copy's own log: deleted once the queue has logged its messages.
            let mut retired = None;
            let master_id = warren_cluster::node_id_of(&q.placement.master);
            // The queue this node has now, and whether it is a proxy: replaced in one step
            // (bindings kept, the name never missing for a publish) when the master moved.
            let mut replace = None;
            if let Some(cur) = vh.queue(name) {
                let proxy = link.is_proxy(&cur);
                let same_master = here || link.proxy_master(&cur) == Some(master_id);
                if proxy != here && same_master {
                    // Already what it should be; a master learns its mirrors.
                    let me = &shared.config.node_name;
                    link.mirrors.placement(
                        &qref,
                        q.placement.epoch,
                        !here && q.placement.mirrors.contains(me),
                    );
                    if here {
                        link.replication.placement(
                            &qref,
                            q.placement.epoch,
                            ids(&q.placement.mirrors),
                            ids(&q.placement.in_sync),
                        );
                    }
                    return;
                }
                if proxy && here {
                    // Promoted: this node's copy becomes the queue.
                    if let Some((msgs, log)) = link.mirrors.take(&qref, q.placement.epoch) {
                        seed = msgs;
                        retired = Some(log);
                    }
                    tracing::info!(
                        queue = %name,
                        vhost = %vhost,
                        messages = seed.len(),
                        epoch = q.placement.epoch,
                        "promoted to master"
                    );
                }
                replace = Some((cur, proxy));
            }
            if here && replace.is_none() {
                // Master here and no queue yet (this node is starting). Promoted while it was
                // down (every node died and this mirror came back first), or promoted and
                // killed before the queue's own records of the copy were written: the copy it
                // kept on disk is the queue's content (the queue's own records win).
                if let Some((msgs, log)) = link.mirrors.take(&qref, q.placement.epoch) {
                    tracing::info!(queue = %name, vhost = %vhost, messages = msgs.len(), epoch = q.placement.epoch, "the mirror copy on disk becomes the queue");
                    seed = msgs;
                    retired = Some(log);
                }
            } else if !here {
                let me = &shared.config.node_name;
                link.mirrors
                    .placement(&qref, q.placement.epoch, q.placement.mirrors.contains(me));
            }
            let old = replace.as_ref().map(|(h, _)| h);
            let r = if here {
                let r = vh.declare_queue_seeded(spec, seed, old).map(|(h, _)| h);
                link.replication.placement(
                    &qref,
                    q.placement.epoch,
                    ids(&q.placement.mirrors),
                    ids(&q.placement.in_sync),
                );
                r
            } else {
                vh.install_queue(spec, old, |h, rx| link.run_proxy(h, rx, master_id))
            };
            // After the declare: the queue's records of the seed are in the store before the
            // copy's delete record. A declare that failed keeps the copy's records on disk
            // (found again at the next start) rather than losing them.
            match (retired, &r) {
                (Some(log), Err(_)) => log.keep(),
                (retired, _) => drop(retired),
            }
            if let (Some((old, true)), Ok(new)) = (&replace, &r) {
                link.proxy_replaced(old, new);
            }
            let r = r.map(|_| ());
            if let Some((old, false)) = &replace {
                // This node mastered the queue and another does now: its copy goes (the
                // replaced master's mirrors ignore it, fenced by the epoch).
                tracing::info!(queue = %name, vhost = %vhost, master = %q.placement.master, "the queue's master moved elsewhere: the queue here becomes a proxy");
                let _ = vh.delete_queue(old, false, false).await;
            }
            if let Err(e) = r {
                warn!(?key, error = %e, "replicated queue not applied on this node");
            }
        }
    }
}

async fn remove(
    shared: &BrokerShared,
    link: &ClusterLink,
    key: Key,
    old: &Value,
    policy_vhosts: &mut BTreeSet<String>,
) {
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
        Key::Limits { vhost } => {
            if let Some(vh) = shared.vhost(&vhost) {
                vh.set_limits(Default::default());
            }
        }
        Key::Exchange { vhost, name } => {
            if let Some(vh) = shared.vhost(&vhost) {
                let _ = vh.delete_exchange(&name, false);
            }
        }
        Key::Binding { vhost } => {
            if let (Some(b), Some(vh)) = (keys::from_value::<BindingDef>(old), shared.vhost(&vhost))
            {
                let _ = vh.unbind(
                    &b.source,
                    destination(&b),
                    &b.routing_key,
                    json_to_table(&b.arguments),
                );
            }
        }
        Key::Queue { vhost, name } => {
            let Some(vh) = shared.vhost(&vhost) else {
                return;
            };
            let Some(q) = vh.queue(&name) else { return };
            if q.exclusive_owner.is_some() {
                return;
            }
            link.mirrors.drop_copy(&super::wire::QueueRef {
                vhost: vhost.clone(),
                name: name.clone(),
            });
            if link.is_proxy(&q) {
                vh.remove_queue(&q);
            } else {
                let _ = vh.delete_queue(&q, false, false).await;
            }
        }
    }
}
