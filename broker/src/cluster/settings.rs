//! From the broker's configuration to the cluster's: the flags and config keys of clustering
//! (`cluster-listen`, `join`, `cluster-secret-file`, `witness`, `cluster-partition-handling`,
//! `cluster-tls-*`, `cluster-failure-detection-ms`), their checks, and the
//! [`warren_cluster::ClusterConfig`] built from them.

use crate::config::Config;
use serde::Deserialize;
use std::time::Duration;
use warren_cluster::{ClusterConfig, ClusterTls, Timing};

/// `cluster-failure-detection-ms` by default: a peer silent for 3 s is down.
pub const DEFAULT_FAILURE_DETECTION_MS: u64 = 3000;
/// The port of a `--join` seed given without one (RabbitMQ's distribution port).
pub const DEFAULT_CLUSTER_PORT: u16 = 25672;
/// The shortest `cluster-failure-detection-ms` accepted.
const MIN_FAILURE_DETECTION_MS: u64 = 300;

/// `cluster-partition-handling`, as RabbitMQ's `cluster_partition_handling`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionHandling {
    /// Keep serving (RabbitMQ's default). A two-node cluster without a witness carries on
    /// alone after losing its peer: safe when the peer crashed, two masters when it was a
    /// partition.
    #[default]
    Ignore,
    /// A node that cannot reach a majority of the voters closes its clients and stops serving
    /// until it can again.
    PauseMinority,
}

impl std::str::FromStr for PartitionHandling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ignore" => Ok(Self::Ignore),
            "pause_minority" | "pause-minority" => Ok(Self::PauseMinority),
            "autoheal" => Err(
                "cluster-partition-handling 'autoheal' is not supported: use 'ignore' or \
                 'pause_minority'"
                    .into(),
            ),
            other => Err(format!(
                "cluster-partition-handling must be 'ignore' or 'pause_minority', not '{other}'"
            )),
        }
    }
}

impl PartitionHandling {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ignore => "ignore",
            Self::PauseMinority => "pause_minority",
        }
    }
}

/// Whether the node runs as a cluster member.
pub fn clustered(cfg: &Config) -> bool {
    !cfg.cluster_listen.is_empty()
}

/// The cross-field rules of the cluster keys.
pub fn validate(cfg: &Config) -> Result<(), String> {
    if !clustered(cfg) {
        for (set, key) in [
            (!cfg.join.is_empty(), "join"),
            (cfg.witness, "witness"),
            (cfg.cluster_tls_cert.is_some(), "cluster-tls-cert"),
        ] {
            if set {
                return Err(format!(
                    "{key} needs cluster-listen (the inter-node listener, e.g. 127.0.0.1:25672)"
                ));
            }
        }
        return Ok(());
    }
    if cfg.cluster_secret_file.is_none() {
        return Err(
            "cluster-listen needs cluster-secret-file: a file with the secret every node of the \
             cluster shares (the Erlang cookie's role)"
                .into(),
        );
    }
    let tls = [
        &cfg.cluster_tls_cert,
        &cfg.cluster_tls_key,
        &cfg.cluster_tls_ca,
    ];
    let n = tls.iter().filter(|t| t.is_some()).count();
    if n != 0 && n != 3 {
        return Err(
            "cluster TLS needs all of cluster-tls-cert, cluster-tls-key and \
                    cluster-tls-ca"
                .into(),
        );
    }
    if cfg.cluster_failure_detection_ms < MIN_FAILURE_DETECTION_MS {
        return Err(format!(
            "cluster-failure-detection-ms must be at least {MIN_FAILURE_DETECTION_MS} (got {})",
            cfg.cluster_failure_detection_ms
        ));
    }
    for j in &cfg.join {
        seeds(j)?;
    }
    advertise(cfg)?;
    Ok(())
}

/// A `--join` value as the seeds it names: one [`seed`], or several separated by commas
/// (`--join a,b,c` is `--join a --join b --join c`).
pub fn seeds(s: &str) -> Result<Vec<String>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(seed)
        .collect::<Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.is_empty() {
                Err(format!("join: '{s}' names no node"))
            } else {
                Ok(v)
            }
        })
}

/// The `host:port` the other nodes dial to reach this one. A first `cluster-listen` on a
/// wildcard address (`0.0.0.0:25672`, `[::]:25672`, as in a container) cannot be dialled, so
/// the node is reached at the host of its name (`warren@HOST`, as a RabbitMQ node at its
/// host name) on that port: in a StatefulSet the pod's stable DNS name, which outlives the
/// pod's IP address across restarts. `None`: the first bound listener, as before.
pub fn advertise(cfg: &Config) -> Result<Option<String>, String> {
    let Some(first) = cfg.cluster_listen.first() else {
        return Ok(None);
    };
    if !first.ip().is_unspecified() {
        return Ok(None);
    }
    let host = cfg
        .node_name
        .rsplit_once('@')
        .map(|(_, h)| h.trim())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            format!(
                "cluster-listen {first} listens on every interface, so the other nodes reach \
                 this one at the host of its node name, and '{}' names none: use NAME@HOST",
                cfg.node_name
            )
        })?;
    if first.port() == 0 {
        return Err(format!(
            "cluster-listen {first}: a wildcard address needs a fixed port (the other nodes \
             reach this one at {host}:PORT)"
        ));
    }
    Ok(Some(if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{}", first.port())
    } else {
        format!("{host}:{}", first.port())
    }))
}

/// A `--join` value as the `host:port` the cluster dials: `name@host:port`, `name@host`,
/// `host:port`, `host`, `[v6]:port`.
pub fn seed(s: &str) -> Result<String, String> {
    let t = s.trim();
    let hostport = t.rsplit_once('@').map_or(t, |(_, h)| h);
    if hostport.is_empty() {
        return Err(format!("join: '{s}' names no host"));
    }
    if hostport.starts_with('[') {
        return Ok(if hostport.contains("]:") {
            hostport.to_owned()
        } else {
            format!("{hostport}:{DEFAULT_CLUSTER_PORT}")
        });
    }
    match hostport.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => {
            p.parse::<u16>()
                .map_err(|_| format!("join: bad port in '{s}'"))?;
            Ok(hostport.to_owned())
        }
        Some(_) => Ok(format!("[{hostport}]:{DEFAULT_CLUSTER_PORT}")),
        None => Ok(format!("{hostport}:{DEFAULT_CLUSTER_PORT}")),
    }
}

/// Every cluster clock derived from `cluster-failure-detection-ms` (the rules of
/// [`Timing::validate`] hold for every value accepted by [`validate`]).
pub fn timing(failure_detection_ms: u64) -> Timing {
    let fd = failure_detection_ms.max(MIN_FAILURE_DETECTION_MS);
    let ms = Duration::from_millis;
    // openraft's followers refuse to vote for 1.2 election timeouts after the last heartbeat
    // of their leader (its lease). A leader whose process is known gone is replaced at once
    // (warren_cluster's `elect_if_leader_gone`); one that is merely silent waits the lease: a
    // sixth of the failure detection keeps it well under it (600 ms at the default) and
    // spurious elections rare.
    let election = (fd / 6).max(150);
    Timing {
        raft_heartbeat: ms((election / 10).max(10)),
        election_timeout: ms(election),
        link_heartbeat: ms(fd / 12),
        failure_detection: ms(fd),
        lease: ms(fd * 2 / 3),
        handshake_timeout: ms((fd * 5 / 3).max(1000)),
        reconnect_max: ms((fd * 2 / 3).max(200)),
        propose_timeout: Duration::from_secs(10),
        join_timeout: Duration::from_secs(60),
    }
}

/// The cluster configuration of a node whose config passed [`validate`]; reads the secret.
pub fn cluster_config(cfg: &Config) -> Result<ClusterConfig, String> {
    let path = cfg
        .cluster_secret_file
        .as_ref()
        .ok_or("cluster-secret-file is not set")?;
    let raw = std::fs::read(path)
        .map_err(|e| format!("cannot read cluster-secret-file {}: {e}", path.display()))?;
    let secret = raw.trim_ascii();
    if secret.is_empty() {
        return Err(format!("cluster-secret-file {} is empty", path.display()));
    }
    let mut c = ClusterConfig::new(&cfg.node_name, cfg.data_dir.join("cluster"), secret);
    c.listen = cfg.cluster_listen.clone();
    c.advertise = advertise(cfg)?;
    c.join = cfg
        .join
        .iter()
        .map(|j| seeds(j))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    c.witness = cfg.witness;
    c.partition_handling = match cfg.cluster_partition_handling {
        PartitionHandling::Ignore => warren_cluster::PartitionHandling::Ignore,
        PartitionHandling::PauseMinority => warren_cluster::PartitionHandling::PauseMinority,
    };
    if let (Some(cert), Some(key), Some(ca)) = (
        &cfg.cluster_tls_cert,
        &cfg.cluster_tls_key,
        &cfg.cluster_tls_ca,
    ) {
        c.tls = Some(ClusterTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        });
    }
    c.timing = timing(cfg.cluster_failure_detection_ms);
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_values_become_host_port_seeds() {
        for (given, want) in [
            ("warren@10.0.0.11:25672", "10.0.0.11:25672"),
            ("warren@10.0.0.11", "10.0.0.11:25672"),
            ("127.0.0.1:4000", "127.0.0.1:4000"),
            ("warren.default.svc", "warren.default.svc:25672"),
            ("[::1]:4000", "[::1]:4000"),
            ("[::1]", "[::1]:25672"),
            ("::1", "[::1]:25672"),
        ] {
            assert_eq!(seed(given).as_deref(), Ok(want), "{given}");
        }
        assert!(seed("warren@").is_err());
        assert!(seed("host:notaport").is_err());
        assert_eq!(
            seeds("a@h1, h2:4000,[::1]").as_deref(),
            Ok(&[
                "h1:25672".to_owned(),
                "h2:4000".into(),
                "[::1]:25672".into()
            ][..])
        );
        assert!(seeds(",").is_err());
        assert!(seeds("h1,h2:x").is_err());
    }

    #[test]
    fn a_wildcard_cluster_listener_is_reached_at_the_node_names_host() {
        let mut c = Config::for_tests();
        c.cluster_secret_file = Some("/nonexistent".into());
        c.cluster_listen = vec!["127.0.0.2:25672".parse().expect("addr")];
        assert_eq!(advertise(&c), Ok(None));
        c.cluster_listen = vec!["0.0.0.0:25672".parse().expect("addr")];
        c.node_name = "warren@warren-0.warren-headless.ns.svc.cluster.local".into();
        assert_eq!(
            advertise(&c),
            Ok(Some(
                "warren-0.warren-headless.ns.svc.cluster.local:25672".into()
            ))
        );
        c.cluster_listen = vec!["[::]:4000".parse().expect("addr")];
        c.node_name = "warren@fd00::7".into();
        assert_eq!(advertise(&c), Ok(Some("[fd00::7]:4000".into())));
        c.node_name = "warren".into();
        assert!(validate(&c).expect_err("refused").contains("NAME@HOST"));
        c.node_name = "warren@h".into();
        c.cluster_listen = vec!["0.0.0.0:0".parse().expect("addr")];
        assert!(validate(&c).expect_err("refused").contains("fixed port"));
    }

    #[test]
    fn derived_timings_keep_the_cluster_rules_at_every_accepted_value() {
        for fd in [300, 301, 450, 600, 1000, 3000, 10_000, 60_000] {
            let t = timing(fd);
            t.validate()
                .unwrap_or_else(|e| panic!("failure detection {fd} ms: {e}"));
            assert_eq!(t.failure_detection, Duration::from_millis(fd));
        }
        assert_eq!(timing(3000).election_timeout, Duration::from_millis(500));
        assert_eq!(timing(3000).link_heartbeat, Duration::from_millis(250));
    }

    #[test]
    fn cluster_keys_are_checked_together() {
        let mut c = Config::for_tests();
        c.join = vec!["a@b".into()];
        assert!(validate(&c)
            .expect_err("refused")
            .contains("needs cluster-listen"));
        c.cluster_listen = vec!["127.0.0.1:0".parse().expect("addr")];
        assert!(validate(&c)
            .expect_err("refused")
            .contains("cluster-secret-file"));
        c.cluster_secret_file = Some("/nonexistent".into());
        assert_eq!(validate(&c), Ok(()));
        c.cluster_tls_cert = Some("c.pem".into());
        assert!(validate(&c).expect_err("refused").contains("all of"));
        c.cluster_tls_cert = None;
        c.cluster_failure_detection_ms = 10;
        assert!(validate(&c).expect_err("refused").contains("at least"));
        assert!("autoheal".parse::<PartitionHandling>().is_err());
        assert_eq!(
            "pause_minority".parse::<PartitionHandling>(),
            Ok(PartitionHandling::PauseMinority)
        );
    }
}
