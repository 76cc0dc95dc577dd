//! Who mirrors each queue and who takes over when its master dies, decided through the
//! cluster log.
//!
//! Every few hundred milliseconds each node looks at the queues it masters and their policy
//! (`ha-mode` all | exactly with `ha-params` N | nodes with `ha-params` [names]):
//! - the mirrors are the nodes the policy names (witnesses never);
//! - a mirror joins the in-sync set once the master streams to it and it holds the whole queue:
//!   synchronised (`ha-sync-mode` automatic, or `sync_queue`: the backlog in batches, see
//!   [`super::replicate`]), or the queue holds nothing older than the stream (it is empty
//!   then: RabbitMQ's natural sync, all `ha-sync-mode` manual gets without `sync_queue`);
//! - a mirror out of reach for the failure-detection time leaves the in-sync set, so it stops
//!   holding confirms back; so does one that is reachable but has acknowledged nothing for
//!   that long (a stalled disk or process).
//!
//! The Raft leader also watches the masters, once its state holds everything its
//! predecessors committed (a stopping mark committed just before a node exited counts): a
//! master out of reach for the failure-detection time (or at once when its process is gone:
//! its link dropped and its address refuses connections; a dead Raft leader is replaced at
//! once the same way) is replaced by its
//! oldest in-sync mirror that is reachable (`ha-promote-on-failure` `when-synced`, the
//! default; with `always` an unsynchronised mirror too; for a master stopped on purpose,
//! whose node marked itself stopping, `ha-promote-on-shutdown` decides), epoch + 1; the
//! other mirrors are out of sync until they hold the new master's queue. Every
//! change is a committed placement guarded by the queue key's version, so two nodes never
//! both promote, and a node applies a promotion only from the log.

use super::keys::{self, QueueValue};
use super::link::ClusterLink;
use super::wire::QueueRef;
use crate::BrokerShared;
use serde_json::Value;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tracing::{info, warn};
use warren_cluster::{node_id_of, Op};

/// How often the placements are looked at.
const TICK: Duration = Duration::from_millis(200);
/// After a link drops, how long before the placements are looked at: the connect that
/// follows the drop at once tells a dead process (its address refuses) from a silent one
/// within a round trip.
const DOWN_SETTLE: Duration = Duration::from_millis(15);

/// The mirrors a queue's effective policy asks for (not the master itself), in a stable order.
pub fn desired_mirrors(
    definition: &serde_json::Map<String, Value>,
    master: &str,
    nodes: &[String],
) -> Vec<String> {
    let others: Vec<String> = nodes.iter().filter(|n| *n != master).cloned().collect();
    match definition.get("ha-mode").and_then(Value::as_str) {
        Some("all") => others,
        Some("exactly") => {
            let n = definition
                .get("ha-params")
                .and_then(Value::as_u64)
                .unwrap_or(1);
            others
                .into_iter()
                .take(n.saturating_sub(1) as usize)
                .collect()
        }
        Some("nodes") => {
            let named: BTreeSet<&str> = definition
                .get("ha-params")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            others
                .into_iter()
                .filter(|n| named.contains(n.as_str()))
                .collect()
        }
        _ => Vec::new(),
    }
}

pub fn spawn(link: &Arc<ClusterLink>, shared: &Arc<BrokerShared>) {
    let link = Arc::downgrade(link);
    let shared: Weak<BrokerShared> = Arc::downgrade(shared);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut events, cluster) = match link.upgrade() {
            Some(l) => (l.cluster.peer_events(), l.cluster.clone()),
            None => return,
        };
        let mut leader = cluster.leader();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                // A new leader decides at once what waited for one (a dead master's promotion).
                l = cluster.leader_change(leader) => leader = l,
                // A link that drops is looked at at once (a peer whose process is gone is
                // known as such a dial later: give that dial a moment), and again as soon as
                // that dial was refused.
                ev = events.recv() => match ev {
                    Ok(warren_cluster::PeerEvent::Down(_)) => tokio::time::sleep(DOWN_SETTLE).await,
                    Ok(warren_cluster::PeerEvent::Gone(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    _ => continue,
                },
            }
            let (Some(link), Some(shared)) = (link.upgrade(), shared.upgrade()) else {
                return;
            };
            if link.stopped() {
                return;
            }
            round(&link, &shared).await;
        }
    });
}

async fn round(link: &Arc<ClusterLink>, shared: &BrokerShared) {
    // The leader decides promotions on a state that holds what its predecessor committed
    // (a master's stopping mark committed just before its node exited decides between
    // ha-promote-on-shutdown and -on-failure): it waits for its own term's first entry.
    let leader = link.cluster.leader() == Some(link.cluster.node_id())
        && link
            .cluster
            .leads_with_current_state(Duration::from_secs(1))
            .await;
    let st = link.state();
    let me = shared.config.node_name.clone();
    let fd = link.failure_detection();
    let members = link.members();
    // Nodes that can hold queues, by name, in name order; and which of them are reachable.
    let mut nodes: Vec<String> = members
        .iter()
        .filter(|m| !m.witness)
        .map(|m| m.name.clone())
        .collect();
    nodes.sort();
    let reachable: HashMap<String, bool> = members
        .iter()
        .map(|m| {
            (
                m.name.clone(),
                m.name == me || (m.last_contact.is_some_and(|c| c < fd) && !m.refused),
            )
        })
        .collect();
    let up = |n: &str| reachable.get(n).copied().unwrap_or(false);
    let mut ops_list: Vec<Vec<Op>> = Vec::new();
    // Mirrors announced to their masters (`Replication::expect`) by the changes in
    // `ops_list`, withdrawn if the change is not committed.
    let mut expected: Vec<(QueueRef, Vec<warren_cluster::NodeId>)> = Vec::new();
    for (key, v) in st.prefix("queue/") {
        let Some(qv) = keys::from_value::<QueueValue>(&v.value) else {
            continue;
        };
        let p = &qv.placement;
        let qref = QueueRef {
            vhost: qv.def.vhost.clone(),
            name: qv.def.name.clone(),
        };
        let mut next = qv.clone();
        if p.master == me {
            let Some(q) = shared
                .vhost(&qref.vhost)
                .and_then(|vh| vh.queue(&qref.name))
            else {
                continue;
            };
            if link.is_proxy(&q) {
                continue;
            }
            let definition = q.policy().applied.definition.clone();
            let mirrors = desired_mirrors(&definition, &me, &nodes);
            let auto = definition.get("ha-sync-mode").and_then(Value::as_str) == Some("automatic");
            link.replication.set_auto_sync(&qref, auto);
            let progress = |m: &str| link.replication.progress(&qref, node_id_of(m));
            // A mirror's stream starts with the queue's next round: an idle queue is woken.
            if p.mirrors.iter().any(|m| !progress(m).streaming) {
                q.kick();
            }
            let empty = q.message_count() == 0
                && q.stats.unacked.load(std::sync::atomic::Ordering::Relaxed) == 0;
            // A mirror that holds confirms back longer than the failure-detection time (its
            // disk or process stalls while its link answers) goes out of sync like one whose
            // link dropped.
            link.replication
                .drop_slow_mirrors(&qref, link.failure_detection());
            let broken = |n: &str| link.replication.broken(&qref, node_id_of(n));
            let mut in_sync: Vec<String> = p
                .in_sync
                .iter()
                .filter(|n| mirrors.contains(n) && up(n) && !broken(n))
                .cloned()
                .collect();
            let mut added = Vec::new();
            for m in &mirrors {
                if p.in_sync.contains(m) || !up(m) {
                    continue;
                }
                let pr = progress(m);
                // In sync: it has the whole queue (synchronised, or nothing older than its
                // stream is left), and publishes wait for it before the commit says so.
                if pr.streaming
                    && (empty || pr.synced)
                    && link.replication.expect(&qref, node_id_of(m))
                {
                    in_sync.push(m.clone());
                    added.push(node_id_of(m));
                }
            }
            next.placement.mirrors = mirrors;
            next.placement.in_sync = in_sync;
            if next != qv {
                expected.push((qref.clone(), added));
            } else {
                for m in added {
                    link.replication.unexpect(&qref, m);
                }
            }
        } else if leader && !up(&p.master) {
            // Stopped on purpose (its stopping mark is in the state) or failed.
            let stopped_on_purpose = st.get(&keys::stopping(&p.master)).is_some();
            let always = shared
                .vhost(&qref.vhost)
                .and_then(|vh| vh.queue(&qref.name))
                .and_then(|q| {
                    q.policy()
                        .applied
                        .definition
                        .get(if stopped_on_purpose {
                            "ha-promote-on-shutdown"
                        } else {
                            "ha-promote-on-failure"
                        })
                        .cloned()
                })
                == Some(Value::from("always"));
            let candidate = p
                .in_sync
                .iter()
                .chain(p.mirrors.iter().filter(|_| always))
                .find(|n| **n != p.master && up(n))
                .cloned();
            let Some(c) = candidate else { continue };
            info!(queue = %qref.name, vhost = %qref.vhost, from = %p.master, to = %c, "promoting a mirror: the master is out of reach");
            next.placement.master = c.clone();
            next.placement.mirrors.retain(|n| *n != c && *n != p.master);
            // The other mirrors followed the old master's stream, which may have reached
            // them further or less far than the new master: the new master's stream starts
            // them afresh, and they are in sync again once they hold its queue (synchronised,
            // or the queue drained).
            next.placement.in_sync.clear();
            next.placement.epoch = p.epoch + 1;
        }
        if next != qv {
            ops_list.push(vec![
                Op::CheckVersion {
                    key: key.clone(),
                    version: v.version,
                },
                Op::Put {
                    key: key.clone(),
                    value: keys::to_value(&next),
                },
            ]);
        }
    }
    let mut failed = false;
    for ops in ops_list {
        if failed {
            break;
        }
        match link.propose(ops).await {
            Ok(_) => {}
            Err(warren_cluster::ClusterError::Conflict { .. }) => {}
            Err(e) => {
                warn!(error = %e, "queue placement not committed; retried next round");
                failed = true;
            }
        }
    }
    // A committed addition is in the placement now (applied before propose returned), so
    // withdrawing the announcement changes nothing for it; the others stop holding confirms.
    for (qref, added) in expected {
        for m in added {
            link.replication.unexpect(&qref, m);
        }
    }
}
