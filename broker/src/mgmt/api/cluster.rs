//! The cluster as the management API shows it: `GET /api/nodes` lists every member (this node
//! with its full figures, the others with what the cluster layer knows of them: name, running,
//! whether they are a witness); `GET /api/nodes/{name}` one of them; warren-ctl's join_cluster
//! (`POST /api/warren/cluster/join`) and forget_cluster_node
//! (`DELETE /api/warren/cluster/nodes/{name}`).

use super::overview::node;
use super::{admin, ok, required_str, Req, R};
use crate::cluster::link::ClusterLink;
use crate::mgmt::no_content;
use crate::mgmt::ApiError;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Value};

/// Every node of the cluster (this one alone when not clustered), sorted by name.
pub(super) fn nodes(shared: &BrokerShared) -> Vec<Value> {
    let Some(c) = shared.cluster() else {
        return vec![node(shared)];
    };
    let members = c.members();
    // A member out of reach is shown not running; `partitions` stays empty (a dead node and a
    // cut-off one look alike from here, and RabbitMQ lists only the latter there).
    let mut out: Vec<Value> = members
        .iter()
        .map(|m| {
            let mut v = if m.name == shared.config.node_name {
                node(shared)
            } else {
                json!({
                    "name": m.name,
                    "type": "disc",
                    "running": m.running,
                    "being_drained": false,
                    "partitions": [],
                    "cluster_links": [],
                })
            };
            v["witness"] = json!(m.witness);
            v["voter"] = json!(m.voter);
            v["cluster_addr"] = json!(m.addr);
            v["last_contact_ms"] = json!(m.last_contact.map(|d| d.as_millis() as u64));
            v
        })
        .collect();
    out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    out
}

/// GET /api/nodes/{node}.
pub(super) fn node_named(shared: &BrokerShared, name: &str) -> R {
    nodes(shared)
        .into_iter()
        .find(|n| n["name"] == name)
        .map_or(Err(ApiError::NotFound), ok)
}

/// POST /api/warren/cluster/join `{"node": "b@host:25672"}` (warren-ctl join_cluster): this
/// node, its application stopped (stop_app), discards its cluster metadata (its vhosts, users,
/// permissions and policies) and joins the cluster of `node`, whose definitions it takes.
pub(super) async fn join(shared: &BrokerShared, r: &Req) -> R {
    if r.method != Method::POST {
        return Err(ApiError::MethodNotAllowed);
    }
    admin(r)?;
    let body = r.json()?;
    let node = required_str(&body, "node")?;
    let c = clustered(shared)?;
    if shared.registry.started() {
        return Err(ApiError::bad(
            "the application is running: stop it first (warren-ctl stop_app), then join_cluster, \
             then start_app",
        ));
    }
    let seed = crate::cluster::settings::seed(&node).map_err(ApiError::BadRequest)?;
    c.cluster
        .rejoin(vec![seed])
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot join {node}: {e}")))?;
    tracing::info!(via = %node, "joined a cluster (join_cluster); this node's definitions were replaced by the cluster's");
    Ok(no_content())
}

/// DELETE /api/warren/cluster/nodes/{name} (warren-ctl forget_cluster_node): the node leaves
/// the membership; it learns so when it comes back and stays out until its data dir is reset.
pub(super) async fn forget(shared: &BrokerShared, r: &Req, name: &str) -> R {
    if r.method != Method::DELETE {
        return Err(ApiError::MethodNotAllowed);
    }
    admin(r)?;
    let c = clustered(shared)?;
    if name == shared.config.node_name {
        return Err(ApiError::bad(
            "a node cannot forget itself: run forget_cluster_node on another member",
        ));
    }
    if !c.members().iter().any(|m| m.name == name) {
        return Err(ApiError::NotFound);
    }
    c.cluster
        .forget(name)
        .await
        .map_err(|e| ApiError::Unavailable(format!("cannot forget {name}: {e}")))?;
    Ok(no_content())
}

fn clustered(shared: &BrokerShared) -> Result<&std::sync::Arc<ClusterLink>, ApiError> {
    shared.cluster().ok_or_else(|| {
        ApiError::bad(
            "this node is not clustered: start it with --cluster-listen and \
             --cluster-secret-file",
        )
    })
}
