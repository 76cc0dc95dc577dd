//! The topology as data: node names, the addresses each process got (kept in
//! `<data-dir>/warren-up.json`, so that a second run with the same data dir finds its cluster
//! where it left it, and `warren-up kill` finds the running one), and warren-lb's config.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::{Chaos, Config};

/// The file in the data dir that describes a topology.
pub const STATE_FILE: &str = "warren-up.json";
/// The control socket in the data dir (`warren-up kill NODE` talks to it).
pub const CONTROL_SOCKET: &str = "control.sock";
/// The cluster secret in the data dir.
pub const SECRET_FILE: &str = "cluster-secret";

/// One broker process of the topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodePlan {
    /// `r1`, `r2`, ... (the seed's R1/R2) or `witness`.
    pub short: String,
    /// The node name, `r1@localhost`.
    pub name: String,
    /// Holds no queues, serves no clients (the third voter of a two-node cluster).
    pub witness: bool,
}

/// The nodes of `cfg`: `r1`..`rN`, and a witness when there are two.
pub fn nodes(cfg: &Config) -> Vec<NodePlan> {
    let mut v: Vec<NodePlan> = (1..=cfg.nodes)
        .map(|i| NodePlan {
            short: format!("r{i}"),
            name: format!("r{i}@localhost"),
            witness: false,
        })
        .collect();
    if cfg.nodes == 2 {
        v.push(NodePlan {
            short: "witness".into(),
            name: "witness@localhost".into(),
            witness: true,
        });
    }
    v
}

/// Where a node listens (read back from its log once it started).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddrs {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mgmt: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<SocketAddr>,
}

/// What `<data-dir>/warren-up.json` holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The nodes' addresses and, while running, pids, by short name.
    pub nodes: BTreeMap<String, NodeState>,
    /// warren-lb's listeners, by name (amqp, mgmt, admin), while running.
    #[serde(default)]
    pub lb: BTreeMap<String, SocketAddr>,
    /// warren-lb's pid while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lb_pid: Option<u32>,
    /// warren-up's own pid while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Everything started and the policy applied.
    #[serde(default)]
    pub ready: bool,
}

/// A node in [`State`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    #[serde(flatten)]
    pub addrs: NodeAddrs,
    pub data_dir: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl State {
    /// The state in `dir`, if any.
    pub fn load(dir: &Path) -> Result<Option<State>, String> {
        let path = dir.join(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    /// Write it (to a temporary file renamed over the old one).
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(STATE_FILE))
    }
}

/// The faults and seed `chaos` puts on the AMQP listener.
pub fn chaos_faults(chaos: &Chaos) -> Result<(Vec<toml::Value>, Option<u64>), String> {
    match chaos {
        Chaos::None => Ok((Vec::new(), None)),
        Chaos::Elb => {
            // The ELB's periodic reset, as examples/chaos/elb.toml has it.
            let rule: toml::Value = toml::from_str(
                "name = \"elb-periodic\"\nkind = \"reset\"\nevery = \"30s\"\njitter = \"5s\"\n\
                 style = \"rst\"\nin_flight = \"drop\"\n",
            )
            .map_err(|e| e.to_string())?;
            Ok((vec![rule], None))
        }
        Chaos::File(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("chaos: cannot read {}: {e}", path.display()))?;
            let doc: toml::Table =
                toml::from_str(&text).map_err(|e| format!("chaos: {}: {e}", path.display()))?;
            let seed = doc
                .get("chaos")
                .and_then(|c| c.get("seed"))
                .and_then(|s| s.as_integer())
                .and_then(|s| u64::try_from(s).ok());
            let mut faults: Vec<toml::Value> = doc
                .get("fault")
                .and_then(|f| f.as_array())
                .cloned()
                .unwrap_or_default();
            if let Some(ls) = doc.get("listener").and_then(|l| l.as_array()) {
                let l = ls
                    .iter()
                    .find(|l| l.get("name").and_then(|n| n.as_str()) == Some("amqp"))
                    .or_else(|| ls.first());
                if let Some(f) = l.and_then(|l| l.get("fault")).and_then(|f| f.as_array()) {
                    faults.extend(f.iter().cloned());
                }
            }
            if faults.is_empty() {
                return Err(format!(
                    "chaos: {} has no [[fault]] and no [[listener.fault]]",
                    path.display()
                ));
            }
            Ok((faults, seed))
        }
    }
}

/// warren-lb's config: the AMQP and management listeners in front of the nodes (round robin,
/// health checks, idle timeout, the chaos faults on AMQP) and the admin API.
pub fn lb_config(
    cfg: &Config,
    amqp_backends: &[SocketAddr],
    mgmt_backends: &[SocketAddr],
) -> Result<String, String> {
    let (faults, file_seed) = chaos_faults(&cfg.chaos()?)?;
    let seed = cfg.seed.or(file_seed).unwrap_or(1);
    let health = |check: &str| {
        let mut h = toml::Table::new();
        h.insert("check".into(), check.into());
        if check == "http" {
            // The UI's page answers without credentials.
            h.insert("path".into(), "/".into());
        }
        h.insert(
            "interval".into(),
            format!("{}s", cfg.health_interval).into(),
        );
        let timeout = cfg.health_interval.clamp(1, 5);
        h.insert("timeout".into(), format!("{timeout}s").into());
        h.insert(
            "healthy_threshold".into(),
            i64::from(cfg.healthy_threshold).into(),
        );
        h.insert(
            "unhealthy_threshold".into(),
            i64::from(cfg.unhealthy_threshold).into(),
        );
        toml::Value::Table(h)
    };
    let listener = |name: &str, bind: SocketAddr, backends: &[SocketAddr], check: &str| {
        let mut l = toml::Table::new();
        l.insert("name".into(), name.into());
        l.insert("bind".into(), bind.to_string().into());
        l.insert(
            "backends".into(),
            toml::Value::Array(backends.iter().map(|b| b.to_string().into()).collect()),
        );
        l.insert("balance".into(), "round-robin".into());
        l.insert(
            "idle_timeout".into(),
            format!("{}s", cfg.idle_timeout).into(),
        );
        // A stop (Ctrl-C) closes what is still open after 5 s instead of the ELB's 300 s.
        l.insert("drain_timeout".into(), "5s".into());
        l.insert("health".into(), health(check));
        l
    };
    let mut amqp = listener("amqp", cfg.amqp, amqp_backends, "amqp");
    amqp.insert("idle_close".into(), "rst".into());
    if !faults.is_empty() {
        amqp.insert("fault".into(), toml::Value::Array(faults));
    }
    let mgmt = listener("mgmt", cfg.mgmt, mgmt_backends, "http");
    let mut doc = toml::Table::new();
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), cfg.admin.to_string().into());
    doc.insert("admin".into(), admin.into());
    let mut chaos = toml::Table::new();
    chaos.insert(
        "seed".into(),
        i64::try_from(seed).unwrap_or(i64::MAX).into(),
    );
    doc.insert("chaos".into(), chaos.into());
    doc.insert(
        "listener".into(),
        toml::Value::Array(vec![amqp.into(), mgmt.into()]),
    );
    toml::to_string(&doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_nodes_come_with_a_witness() {
        let c = Config {
            nodes: 2,
            ..Config::default()
        };
        let n = nodes(&c);
        let names: Vec<&str> = n.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["r1@localhost", "r2@localhost", "witness@localhost"]);
        assert!(n[2].witness && !n[0].witness);
        assert_eq!(nodes(&Config::default()).len(), 3);
    }

    #[test]
    fn the_lb_config_puts_every_node_behind_both_listeners_with_the_elb_resets() {
        let a: Vec<SocketAddr> = vec!["127.0.0.1:1001".parse().expect("addr")];
        let m: Vec<SocketAddr> = vec!["127.0.0.1:2001".parse().expect("addr")];
        let text = lb_config(&Config::default(), &a, &m).expect("config");
        let doc: toml::Table = toml::from_str(&text).expect("toml");
        let ls = doc["listener"].as_array().expect("listeners");
        assert_eq!(ls[0]["bind"].as_str(), Some("127.0.0.1:5672"));
        assert_eq!(ls[0]["backends"][0].as_str(), Some("127.0.0.1:1001"));
        assert_eq!(ls[0]["idle_timeout"].as_str(), Some("60s"));
        assert_eq!(ls[0]["drain_timeout"].as_str(), Some("5s"));
        assert_eq!(ls[0]["fault"][0]["kind"].as_str(), Some("reset"));
        assert_eq!(ls[1]["bind"].as_str(), Some("127.0.0.1:15672"));
        assert_eq!(ls[1]["health"]["check"].as_str(), Some("http"));
        assert!(ls[1].get("fault").is_none());
        let none = Config {
            chaos: "none".into(),
            ..Config::default()
        };
        let doc: toml::Table =
            toml::from_str(&lb_config(&none, &a, &m).expect("config")).expect("toml");
        assert!(doc["listener"][0].get("fault").is_none());
    }

    #[test]
    fn a_chaos_file_gives_its_amqp_listeners_faults_and_seed() {
        let dir = std::env::temp_dir().join(format!("warren-up-chaos-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "[chaos]\nseed = 7\n[[listener]]\nname = \"mgmt\"\n[[listener]]\nname = \"amqp\"\n\
             [[listener.fault]]\nname = \"x\"\nkind = \"latency\"\n",
        )
        .expect("write");
        let (faults, seed) = chaos_faults(&Chaos::File(f.clone())).expect("faults");
        assert_eq!(seed, Some(7));
        assert_eq!(faults.len(), 1);
        assert_eq!(faults[0]["name"].as_str(), Some("x"));
        std::fs::write(&f, "[chaos]\nseed = 7\n").expect("write");
        assert!(chaos_faults(&Chaos::File(f)).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn every_chaos_recipe_gives_a_config_warren_lb_accepts() {
        let a: Vec<SocketAddr> = vec!["127.0.0.1:1001".parse().expect("addr")];
        let m: Vec<SocketAddr> = vec!["127.0.0.1:2001".parse().expect("addr")];
        let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chaos");
        let mut files: Vec<String> = std::fs::read_dir(&recipes)
            .expect("examples/chaos")
            .filter_map(|e| e.ok())
            .map(|e| e.path().to_string_lossy().into_owned())
            .filter(|p| p.ends_with(".toml"))
            .collect();
        files.sort();
        assert!(files.len() >= 5, "{files:?}");
        for chaos in ["elb".to_string(), "none".to_string()]
            .into_iter()
            .chain(files)
        {
            let cfg = Config {
                chaos: chaos.clone(),
                ..Config::default()
            };
            let text = lb_config(&cfg, &a, &m).unwrap_or_else(|e| panic!("{chaos}: {e}"));
            if let Err(e) = warren_lb::config::Config::from_toml_str(&text) {
                panic!("{chaos}: warren-lb refuses the generated config: {e}\n{text}");
            }
        }
    }
}
