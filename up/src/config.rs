//! What `warren-up` starts: the settings, from defaults, then a TOML file (`--config`), then the
//! command line. Keys are the flags' names (`data-dir`, `failure-detection-ms`, ...); unknown
//! keys are an error.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Every setting of a topology.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    /// Broker nodes that hold queues (2 adds a witness, so that either node may die).
    pub nodes: usize,
    /// warren-lb's AMQP listener (the seed's ELB on 5672).
    pub amqp: SocketAddr,
    /// warren-lb's management listener (the seed's ELB on 15672).
    pub mgmt: SocketAddr,
    /// warren-lb's admin API (faults, backends, /metrics).
    pub admin: SocketAddr,
    /// `elb` (periodic resets, the default), `none`, or a warren-lb TOML file whose faults
    /// (those of its listener named `amqp`, or its first) go on the AMQP listener.
    pub chaos: String,
    /// The chaos RNG seed (default: the chaos file's, else 1).
    pub seed: Option<u64>,
    /// Where the nodes keep their data, and this topology its ports: kept between runs. Without
    /// it a temporary directory is used and removed at exit.
    pub data_dir: Option<PathBuf>,
    /// Start a node again when it exits (default: report it and leave it down).
    pub restart: bool,
    /// Directory of warren-broker and warren-lb (default: the one warren-up runs from).
    pub bin_dir: Option<PathBuf>,
    /// The nodes' `--cluster-failure-detection-ms` (default: the broker's, 3000).
    pub failure_detection_ms: Option<u64>,
    /// Seconds between status lines (0: none).
    pub status_interval: u64,
    /// The nodes' log filter (RUST_LOG syntax).
    pub log: String,
    /// warren-lb's health checks: seconds between checks of each node.
    pub health_interval: u64,
    /// Failed checks in a row that take a node out of rotation.
    pub unhealthy_threshold: u32,
    /// Passed checks in a row that bring it back.
    pub healthy_threshold: u32,
    /// warren-lb's idle timeout, seconds (the ELB's 60).
    pub idle_timeout: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            nodes: 3,
            amqp: SocketAddr::from(([127, 0, 0, 1], 5672)),
            mgmt: SocketAddr::from(([127, 0, 0, 1], 15672)),
            admin: SocketAddr::from(([127, 0, 0, 1], 9901)),
            chaos: "elb".into(),
            seed: None,
            data_dir: None,
            restart: false,
            bin_dir: None,
            failure_detection_ms: None,
            status_interval: 5,
            log: "info".into(),
            health_interval: 5,
            unhealthy_threshold: 2,
            healthy_threshold: 3,
            idle_timeout: 60,
        }
    }
}

/// What `--chaos` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Chaos {
    /// The ELB's periodic resets (examples/chaos/elb.toml's rule).
    Elb,
    /// No fault.
    None,
    /// The faults of a warren-lb config file.
    File(PathBuf),
}

impl Config {
    /// Parse a TOML file's text.
    pub fn from_toml_str(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Read a TOML file.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Config::from_toml_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The chaos setting, checked.
    pub fn chaos(&self) -> Result<Chaos, String> {
        match self.chaos.as_str() {
            "elb" => Ok(Chaos::Elb),
            "none" => Ok(Chaos::None),
            "" => Err("chaos: give elb, none or a file".into()),
            path => {
                let p = PathBuf::from(path);
                if p.is_file() {
                    Ok(Chaos::File(p))
                } else {
                    Err(format!(
                        "chaos: '{path}' is neither elb, none nor a readable file"
                    ))
                }
            }
        }
    }

    /// Check what can be checked before starting anything.
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=9).contains(&self.nodes) {
            return Err(format!("nodes: 1 to 9 (got {})", self.nodes));
        }
        self.chaos()?;
        if self.health_interval == 0 || self.unhealthy_threshold == 0 || self.healthy_threshold == 0
        {
            return Err("health-interval and the thresholds must be at least 1".into());
        }
        if !(1..=3600).contains(&self.idle_timeout) {
            return Err(format!(
                "idle-timeout: 1 to 3600 seconds (got {})",
                self.idle_timeout
            ));
        }
        let fronts = [
            ("amqp", self.amqp),
            ("mgmt", self.mgmt),
            ("admin", self.admin),
        ];
        for (i, (a, x)) in fronts.iter().enumerate() {
            for (b, y) in &fronts[i + 1..] {
                if x == y && x.port() != 0 {
                    return Err(format!("{a} and {b} are both {x}"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_sets_what_it_names_and_refuses_unknown_keys() {
        let c = Config::from_toml_str("nodes = 2\namqp = \"127.0.0.1:5673\"\nchaos = \"none\"\n")
            .expect("valid");
        assert_eq!(c.nodes, 2);
        assert_eq!(c.amqp.port(), 5673);
        assert_eq!(c.mgmt.port(), 15672);
        assert_eq!(c.chaos().expect("chaos"), Chaos::None);
        let e = Config::from_toml_str("nodez = 2\n").expect_err("unknown key");
        assert!(e.contains("nodez"), "{e}");
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let c = Config {
            nodes: 0,
            ..Config::default()
        };
        assert!(c.validate().expect_err("0 nodes").contains("nodes"));
        let c = Config {
            chaos: "/nonexistent/chaos.toml".into(),
            ..Config::default()
        };
        assert!(c.validate().expect_err("missing file").contains("chaos"));
        let c = Config {
            mgmt: SocketAddr::from(([127, 0, 0, 1], 5672)),
            ..Config::default()
        };
        assert!(c
            .validate()
            .expect_err("same port")
            .contains("amqp and mgmt"));
        assert!(Config::default().validate().is_ok());
    }
}
