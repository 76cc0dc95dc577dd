//! The cluster as the management API shows it: `GET /api/nodes` lists every member, `GET
//! /api/nodes/{name}` one of them; warren-ctl's join_cluster (`POST /api/warren/cluster/join`)
//! and forget_cluster_node (`DELETE /api/warren/cluster/nodes/{name}`).
//!
//! A node's row: its own figures (memory, file descriptors, uptime, ...) as it reports them
//! (this node's from here, the others' asked over their management API, see
//! [`crate::mgmt::peers`]; a node that does not answer keeps the few fields the cluster layer
//! knows), `running` as this node sees it (link up, heard from within the failure-detection
//! time), `voter`, `witness`, and `partitions`: the nodes it cannot reach although another
//! node that answered reaches them (RabbitMQ's meaning: both up, cut off from each other). A
//! node that is down for everyone is no partition, only not running. The relation is
//! symmetric: when a cannot reach c, a lists c and c lists a.

use super::overview::node;
use super::{admin, listed, ok, required_str, Req, PLAIN, R};
use crate::cluster::link::ClusterLink;
use crate::mgmt::no_content;
use crate::mgmt::peers::{self, LOCAL_PARAM, MISSING_HEADER};
use crate::mgmt::ApiError;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Who sees whom: node -> (member -> running, as that node sees it).
type Views = BTreeMap<String, BTreeMap<String, bool>>;

/// Every member as this node sees it, sorted by name, `partitions` empty.
fn local_rows(shared: &BrokerShared, c: &ClusterLink) -> Vec<Value> {
    let mut out: Vec<Value> = c
        .members()
        .iter()
        .map(|m| {
            let mut v = if m.name == shared.config.node_name {
                node(shared)
            } else {
                json!({
                    "name": m.name,
                    "type": "disc",
                    "being_drained": false,
                    "cluster_links": [],
                })
            };
            v["running"] = json!(m.running);
            v["partitions"] = json!([]);
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

fn view_of(rows: &[Value]) -> BTreeMap<String, bool> {
    rows.iter()
        .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r["running"].as_bool()?)))
        .collect()
}

/// The partitions of each node: pairs {x, m} where x sees m down while another node of
/// `views` sees m up.
fn partitions(views: &Views) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (x, seen) in views {
        for (m, up) in seen {
            if *up || m == x {
                continue;
            }
            let up_elsewhere = views.iter().any(|(y, v)| y != x && v.get(m) == Some(&true));
            if up_elsewhere {
                out.entry(x.clone()).or_default().insert(m.clone());
                out.entry(m.clone()).or_default().insert(x.clone());
            }
        }
    }
    out
}

/// Every node of the cluster (this one alone when not clustered), sorted by name, and the
/// nodes that were asked and did not answer.
pub(super) async fn nodes(shared: &BrokerShared, r: &Req) -> (Vec<Value>, peers::Gathered) {
    let Some(c) = shared.cluster() else {
        return (vec![node(shared)], peers::Gathered::default());
    };
    let mut rows = local_rows(shared, c);
    if r.query_flag(LOCAL_PARAM) {
        return (rows, peers::Gathered::default());
    }
    let me = shared.config.node_name.clone();
    let mut views = Views::new();
    views.insert(me.clone(), view_of(&rows));
    let auth = r.headers.get(hyper::header::AUTHORIZATION);
    let mut gathered = peers::get_all(shared, auth, &peers::local_path(&["nodes"])).await;
    let mut own_rows: BTreeMap<String, Value> = BTreeMap::new();
    for (peer, v) in gathered.ok_json() {
        let Value::Array(theirs) = v else { continue };
        views.insert(peer.clone(), view_of(&theirs));
        if let Some(row) = theirs.into_iter().find(|t| t["name"] == peer.as_str()) {
            own_rows.insert(peer, row);
        }
    }
    let parts = partitions(&views);
    for row in &mut rows {
        let Some(name) = row["name"].as_str().map(str::to_owned) else {
            continue;
        };
        if let Some(mut full) = own_rows.remove(&name) {
            // Their figures, this node's view of them.
            for k in [
                "running",
                "witness",
                "voter",
                "cluster_addr",
                "last_contact_ms",
            ] {
                full[k] = row[k].take();
            }
            *row = full;
        }
        row["partitions"] = json!(parts.get(&name).cloned().unwrap_or_default());
    }
    (rows, gathered)
}

/// GET /api/nodes.
pub(super) async fn list(shared: &BrokerShared, r: &Req) -> R {
    let (rows, gathered) = nodes(shared, r).await;
    let mut resp = listed(r, rows, &PLAIN)?;
    if let Some(h) = gathered.header() {
        resp.headers_mut().insert(MISSING_HEADER, h);
    }
    Ok(resp)
}

/// GET /api/nodes/{node}.
pub(super) async fn node_named(shared: &BrokerShared, r: &Req, name: &str) -> R {
    nodes(shared, r)
        .await
        .0
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
    crate::cluster::status::forget_record(c, name).await;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn views(rows: &[(&str, &[(&str, bool)])]) -> Views {
        rows.iter()
            .map(|(x, seen)| {
                (
                    x.to_string(),
                    seen.iter().map(|(m, up)| (m.to_string(), *up)).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn a_node_down_for_everyone_is_no_partition_one_cut_off_from_one_is() {
        let all_up = [("a", true), ("b", true), ("c", true)];
        let c_dead = [("a", true), ("b", true), ("c", false)];
        // c killed: a and b both see it down.
        let v = views(&[("a", &c_dead), ("b", &c_dead)]);
        assert!(partitions(&v).is_empty());
        // a cannot reach c, b reaches both (and c answered b's way of seeing it).
        let a_view = [("a", true), ("b", true), ("c", false)];
        let v = views(&[("a", &a_view), ("b", &all_up)]);
        let p = partitions(&v);
        let set = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(p.get("a"), Some(&set(&["c"])));
        assert_eq!(p.get("c"), Some(&set(&["a"])));
        assert_eq!(p.get("b"), None);
        // c answered and sees a down too: the same pair, once each.
        let c_view = [("a", false), ("b", true), ("c", true)];
        let v = views(&[("a", &a_view), ("b", &all_up), ("c", &c_view)]);
        let p = partitions(&v);
        assert_eq!(p.get("a"), Some(&set(&["c"])));
        assert_eq!(p.get("c"), Some(&set(&["a"])));
        // Alone: nobody to compare with, nothing to say.
        let v = views(&[("a", &a_view)]);
        assert!(partitions(&v).is_empty());
    }
}
