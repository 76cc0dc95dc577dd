//! The one-line status of a running topology, from a node's management API (cluster-wide
//! answers) and warren-lb's `/metrics`: nodes up, masters per node, mirrors in sync,
//! connections, message rates, resets.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::Value;

use crate::api;

/// What the status line shows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    /// Nodes running / members (witness included).
    pub running: usize,
    pub members: usize,
    /// Queue masters by node short name (every queue-holding node listed, zeros included).
    pub masters: BTreeMap<String, usize>,
    /// Mirrors in sync / mirrors, over all queues.
    pub mirrors_in_sync: usize,
    pub mirrors: usize,
    pub connections: u64,
    pub publish_rate: f64,
    pub deliver_rate: f64,
    /// Connections warren-lb reset by fault rules since it started.
    pub resets: u64,
}

fn short(node: &str) -> String {
    node.split('@').next().unwrap_or(node).to_string()
}

/// Read the status through `mgmt` (any node) and `admin` (warren-lb).
pub async fn read(mgmt: SocketAddr, admin: Option<SocketAddr>) -> Result<Status, String> {
    let nodes = api::get_json(mgmt, "/api/nodes").await?;
    let queues = api::get_json(
        mgmt,
        "/api/queues?columns=name,node,slave_nodes,synchronised_slave_nodes",
    )
    .await?;
    let overview = api::get_json(mgmt, "/api/overview").await?;
    let mut st = from_api(&nodes, &queues, &overview);
    if let Some(admin) = admin {
        if let Ok(r) = api::call(admin, warren_ctl::Method::Get, "/metrics", None).await {
            st.resets = resets(&String::from_utf8_lossy(&r.body));
        }
    }
    Ok(st)
}

/// The status from the answers of `/api/nodes`, `/api/queues` and `/api/overview`.
pub fn from_api(nodes: &Value, queues: &Value, overview: &Value) -> Status {
    let mut st = Status::default();
    for n in nodes.as_array().into_iter().flatten() {
        st.members += 1;
        if n["running"].as_bool() == Some(true) {
            st.running += 1;
        }
        if n["witness"].as_bool() != Some(true) {
            if let Some(name) = n["name"].as_str() {
                st.masters.entry(short(name)).or_default();
            }
        }
    }
    for q in queues.as_array().into_iter().flatten() {
        if let Some(node) = q["node"].as_str() {
            *st.masters.entry(short(node)).or_default() += 1;
        }
        let count = |k: &str| q[k].as_array().map_or(0, Vec::len);
        st.mirrors += count("slave_nodes");
        st.mirrors_in_sync += count("synchronised_slave_nodes");
    }
    st.connections = overview["object_totals"]["connections"]
        .as_u64()
        .unwrap_or(0);
    let rate = |k: &str| {
        overview["message_stats"][format!("{k}_details")]["rate"]
            .as_f64()
            .unwrap_or(0.0)
    };
    st.publish_rate = rate("publish");
    st.deliver_rate = rate("deliver_get");
    st
}

/// The sum of warren-lb's `warren_lb_faults_total` samples of kind reset.
pub fn resets(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("warren_lb_faults_total{") && l.contains("kind=\"reset\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let masters: Vec<String> = self
            .masters
            .iter()
            .map(|(n, c)| format!("{n}:{c}"))
            .collect();
        write!(
            f,
            "nodes {}/{} up | masters {} | mirrors in sync {}/{} | connections {} | \
             publish {:.0}/s deliver {:.0}/s | lb resets {}",
            self.running,
            self.members,
            if masters.is_empty() {
                "-".to_string()
            } else {
                masters.join(" ")
            },
            self.mirrors_in_sync,
            self.mirrors,
            self.connections,
            self.publish_rate,
            self.deliver_rate,
            self.resets
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_status_counts_what_the_api_says() {
        let nodes = json!([
            {"name": "r1@localhost", "running": true},
            {"name": "r2@localhost", "running": false},
            {"name": "witness@localhost", "running": true, "witness": true}
        ]);
        let queues = json!([
            {"name": "a", "node": "r1@localhost", "slave_nodes": ["r2@localhost"],
             "synchronised_slave_nodes": []},
            {"name": "b", "node": "r1@localhost", "slave_nodes": [], "synchronised_slave_nodes": []}
        ]);
        let overview = json!({"object_totals": {"connections": 4},
            "message_stats": {"publish_details": {"rate": 12.4}, "deliver_get_details": {"rate": 3.0}}});
        let st = from_api(&nodes, &queues, &overview);
        assert_eq!((st.running, st.members), (2, 3));
        assert_eq!(st.masters.get("r1"), Some(&2));
        assert_eq!(st.masters.get("r2"), Some(&0));
        assert!(!st.masters.contains_key("witness"));
        assert_eq!((st.mirrors_in_sync, st.mirrors), (0, 1));
        assert_eq!(st.connections, 4);
        let line = st.to_string();
        assert!(line.contains("nodes 2/3 up"), "{line}");
        assert!(line.contains("masters r1:2 r2:0"), "{line}");
        assert!(line.contains("publish 12/s deliver 3/s"), "{line}");
    }

    #[test]
    fn resets_sum_the_reset_faults_only() {
        let m = "# HELP warren_lb_faults_total x\n\
                 warren_lb_faults_total{listener=\"amqp\",rule=\"elb-periodic\",kind=\"reset\"} 3\n\
                 warren_lb_faults_total{listener=\"amqp\",rule=\"admin\",kind=\"reset\"} 2\n\
                 warren_lb_faults_total{listener=\"amqp\",rule=\"lat\",kind=\"latency\"} 9\n";
        assert_eq!(resets(m), 5);
    }
}
