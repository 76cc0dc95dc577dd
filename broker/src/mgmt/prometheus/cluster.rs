//! Warren's own gauges of the cluster as this node sees it: members, running, quorum, and the
//! queues it masters and mirrors.

use super::{esc, Out};
use crate::BrokerShared;

/// The cluster as this node sees it, and its share of the queues. Not clustered: a cluster of
/// one that masters every queue.
pub(super) fn cluster_gauges(o: &mut Out, shared: &BrokerShared, local_queues: u64) {
    let me = &shared.config.node_name;
    let (members, quorum, copies) = match shared.cluster() {
        Some(link) => (
            link.members()
                .into_iter()
                .map(|m| (m.name, m.running))
                .collect::<Vec<_>>(),
            link.cluster.has_quorum(),
            crate::cluster::status::copies(link),
        ),
        None => (
            vec![(me.clone(), true)],
            true,
            crate::cluster::status::Copies {
                masters: local_queues,
                ..Default::default()
            },
        ),
    };
    o.one(
        "warren_cluster_members",
        "gauge",
        "Members of the cluster (witnesses included), this node's view",
        "",
        members.len(),
    );
    o.one(
        "warren_cluster_members_running",
        "gauge",
        "Members this node reaches within the failure-detection time (itself included)",
        "",
        members.iter().filter(|(_, up)| *up).count(),
    );
    o.family(
        "warren_cluster_member_running",
        "gauge",
        "1 if this node reaches the member within the failure-detection time",
    );
    let mut sorted = members.clone();
    sorted.sort();
    for (name, up) in &sorted {
        o.sample(
            "warren_cluster_member_running",
            &format!("member=\"{}\"", esc(name)),
            u8::from(*up),
        );
    }
    o.one(
        "warren_cluster_has_quorum",
        "gauge",
        "1 if this node reaches a majority of the cluster's voters",
        "",
        u8::from(quorum),
    );
    o.one(
        "warren_queue_masters",
        "gauge",
        "Queues whose master is this node",
        "",
        copies.masters,
    );
    o.one(
        "warren_queue_mirrors",
        "gauge",
        "Queues this node holds a mirror of",
        "",
        copies.mirrors,
    );
    o.one(
        "warren_queue_mirrors_synchronised",
        "gauge",
        "Queues this node holds an in-sync mirror of",
        "",
        copies.in_sync,
    );
}
