//! The cluster as the management API shows it: `GET /api/nodes` lists every member (this node
//! with its full figures, the others with what the cluster layer knows of them: name, running,
//! whether they are a witness); `GET /api/nodes/{name}` one of them.

use super::overview::node;
use super::{ok, R};
use crate::mgmt::ApiError;
use crate::BrokerShared;
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
