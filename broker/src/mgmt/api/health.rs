//! The health checks about what stopping this node would cost, for pre-stop hooks and rolling
//! restarts (200 `{"status":"ok"}` when it is safe, 503 `{"status":"failed","reason":...}`
//! when it is not):
//! - `GET /api/health/checks/node-is-mirror-sync-critical`: RabbitMQ's check. Failed when a
//!   queue mastered here has a policy that asks for mirrors and none of its in-sync mirrors is
//!   up: its messages are on this node alone. Lists those queues.
//! - `GET /api/health/checks/node-is-quorum-critical`: warren's cluster state (membership,
//!   definitions, placements) is a Raft group; failed when the voters up without this node are
//!   no majority of all voters (a witness is a voter), so stopping it stops every definition
//!   change and promotion. RabbitMQ asks this of its quorum queues; warren has none, and its
//!   metadata is what a majority guards. Says which voters are up.
//!
//! "Up" is this node's view (see [`crate::cluster::status`]). A node that is not clustered is
//! never critical.

use super::R;
use crate::cluster::status::{self, Quorum};
use crate::mgmt::json_resp;
use crate::BrokerShared;
use hyper::StatusCode;
use serde_json::{json, Value};

fn failed(body: Value) -> R {
    Ok(json_resp(StatusCode::SERVICE_UNAVAILABLE, &body))
}

fn ok() -> R {
    Ok(json_resp(StatusCode::OK, &json!({"status": "ok"})))
}

/// GET /api/health/checks/node-is-mirror-sync-critical.
pub(super) fn mirror_sync_critical(shared: &BrokerShared) -> R {
    let Some(link) = shared.cluster() else {
        return ok();
    };
    let queues = status::unprotected_masters(shared, link);
    if queues.is_empty() {
        return ok();
    }
    let list: Vec<Value> = queues
        .iter()
        .map(|q| {
            json!({
                "name": q.name,
                "virtual_host": q.vhost,
                "readable_name": format!("queue '{}' in vhost '{}'", q.name, q.vhost),
                "type": "classic",
                "node": link.node_name(),
                "mirrors": q.mirrors,
                "synchronised_mirrors": q.in_sync,
            })
        })
        .collect();
    failed(json!({
        "status": "failed",
        "reason": format!(
            "There are classic mirrored queues without online synchronised mirrors: {} \
             queue(s) mastered on {} would lose their messages if it stopped",
            list.len(),
            link.node_name()
        ),
        "queues": list,
    }))
}

/// GET /api/health/checks/node-is-quorum-critical.
pub(super) fn quorum_critical(shared: &BrokerShared) -> R {
    let Some(link) = shared.cluster() else {
        return Ok(json_resp(
            StatusCode::OK,
            &json!({"status": "ok", "reason": "single node cluster"}),
        ));
    };
    let q = Quorum::of(link.node_name(), &link.members());
    if !q.critical() {
        return ok();
    }
    let left = q.online.len().saturating_sub(1);
    let mut reason = format!(
        "stopping {} would leave {left} of the cluster's {} voters up, not a majority \
         (voters up now: {}; voters: {})",
        link.node_name(),
        q.voters.len(),
        q.online.join(", "),
        q.voters.join(", ")
    );
    if q.voters.len() == 2 {
        reason.push_str(
            "; a two-voter cluster has no majority without either node: add a witness \
             (warren-broker --witness)",
        );
    }
    failed(json!({
        "status": "failed",
        "reason": reason,
        "voters": q.voters,
        "online": q.online,
        "queues": [],
    }))
}
