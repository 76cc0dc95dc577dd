//! Broker configuration: defaults -> TOML file -> CLI flags.
//!
//! Every CLI flag has a TOML key of the same (kebab-case) name; unknown keys are an error so that
//! a typo never silently falls back to a default.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Errors while loading or validating configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // The inner errors are part of the message, not `source()`, so a printed chain says each
    // thing once.
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Parse(toml::de::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// A user from the config file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct UserConfig {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Permissions of one user on one vhost (RabbitMQ's configure/write/read regexes).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PermissionConfig {
    pub user: String,
    pub vhost: String,
    #[serde(default = "match_all")]
    pub configure: String,
    #[serde(default = "match_all")]
    pub write: String,
    #[serde(default = "match_all")]
    pub read: String,
}

fn match_all() -> String {
    ".*".to_owned()
}

/// Whole broker configuration.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub node_name: String,
    /// Plain AMQP listeners.
    pub amqp: Vec<SocketAddr>,
    /// AMQPS listeners (need tls-cert and tls-key).
    pub amqps: Vec<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Management HTTP listeners (accepted, not served yet).
    pub mgmt: Vec<SocketAddr>,
    /// Prometheus listeners (accepted, not served yet).
    pub prometheus: Vec<SocketAddr>,
    /// Inter-node listeners (accepted, clustering not implemented yet).
    pub cluster_listen: Vec<SocketAddr>,
    pub join: Vec<String>,
    pub cluster_secret_file: Option<PathBuf>,
    /// Log filter (RUST_LOG syntax).
    pub log: Option<String>,
    /// Largest frame the broker accepts and offers in connection.tune.
    pub frame_max: u32,
    /// Highest channel number offered in connection.tune.
    pub channel_max: u16,
    /// Heartbeat interval offered in connection.tune, seconds (0 disables).
    pub heartbeat: u16,
    /// Largest message body accepted, bytes.
    pub max_message_size: u64,
    /// Most concurrent client connections (0 = unlimited).
    pub max_connections: u32,
    /// How long SIGTERM waits for clients to answer connection.close, milliseconds.
    pub shutdown_grace_ms: u64,
    pub users: Vec<UserConfig>,
    pub vhosts: Vec<String>,
    pub permissions: Vec<PermissionConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_name: "warren@127.0.0.1".to_owned(),
            amqp: vec![
                SocketAddr::from(([127, 0, 0, 1], 5672)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 5672)),
            ],
            amqps: Vec::new(),
            tls_cert: None,
            tls_key: None,
            data_dir: PathBuf::from("./data"),
            mgmt: Vec::new(),
            prometheus: Vec::new(),
            cluster_listen: Vec::new(),
            join: Vec::new(),
            cluster_secret_file: None,
            log: None,
            frame_max: 131_072,
            channel_max: 2047,
            heartbeat: 60,
            max_message_size: 128 * 1024 * 1024,
            max_connections: 0,
            shutdown_grace_ms: 5000,
            users: Vec::new(),
            vhosts: Vec::new(),
            permissions: Vec::new(),
        }
    }
}

impl Config {
    /// Parses TOML text (no file access, so tests can feed strings).
    pub fn from_toml_str(s: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(s).map_err(ConfigError::Parse)?;
        Ok(cfg)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml_str(&text)
    }

    /// A config for in-process tests: one loopback listener on port 0, fast shutdown.
    pub fn for_tests() -> Self {
        Self {
            amqp: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            shutdown_grace_ms: 1000,
            ..Self::default()
        }
    }

    /// Users with the implicit default: guest/guest when none is configured.
    pub fn effective_users(&self) -> Vec<UserConfig> {
        if self.users.is_empty() {
            vec![UserConfig {
                name: "guest".into(),
                password: "guest".into(),
                tags: vec!["administrator".into()],
            }]
        } else {
            self.users.clone()
        }
    }

    /// Vhosts with the implicit default "/".
    pub fn effective_vhosts(&self) -> Vec<String> {
        if self.vhosts.is_empty() {
            vec!["/".into()]
        } else {
            self.vhosts.clone()
        }
    }

    /// Permissions with the implicit default: guest may do everything on "/" when no users are
    /// configured.
    pub fn effective_permissions(&self) -> Vec<PermissionConfig> {
        if self.users.is_empty() && self.permissions.is_empty() {
            vec![PermissionConfig {
                user: "guest".into(),
                vhost: "/".into(),
                configure: match_all(),
                write: match_all(),
                read: match_all(),
            }]
        } else {
            self.permissions.clone()
        }
    }

    /// Checks cross-field rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.amqps.is_empty() && (self.tls_cert.is_none() || self.tls_key.is_none()) {
            return Err(ConfigError::Invalid(
                "amqps listeners need tls-cert and tls-key".into(),
            ));
        }
        if self.frame_max < 4096 {
            return Err(ConfigError::Invalid("frame-max must be >= 4096".into()));
        }
        if self.amqp.is_empty() && self.amqps.is_empty() {
            return Err(ConfigError::Invalid("no amqp or amqps listener".into()));
        }
        let vhosts = self.effective_vhosts();
        let users = self.effective_users();
        for p in self.effective_permissions() {
            if !vhosts.contains(&p.vhost) {
                return Err(ConfigError::Invalid(format!(
                    "permission for unknown vhost '{}'",
                    p.vhost
                )));
            }
            if !users.iter().any(|u| u.name == p.user) {
                return Err(ConfigError::Invalid(format!(
                    "permission for unknown user '{}'",
                    p.user
                )));
            }
            for re in [&p.configure, &p.write, &p.read] {
                regex::Regex::new(re)
                    .map_err(|e| ConfigError::Invalid(format!("bad permission regex: {e}")))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(Config::from_toml_str("amqp = [\"127.0.0.1:0\"]\nbogus = 1\n").is_err());
    }

    #[test]
    fn keys_match_flag_names() {
        let cfg = Config::from_toml_str(
            "node-name = \"a@b\"\namqp = [\"127.0.0.1:0\"]\ndata-dir = \"/tmp/x\"\n\
             max-message-size = 10\n[[users]]\nname = \"u\"\npassword = \"p\"\n\
             [[permissions]]\nuser = \"u\"\nvhost = \"/\"\n",
        )
        .expect("parse");
        assert_eq!(cfg.node_name, "a@b");
        assert_eq!(cfg.max_message_size, 10);
        cfg.validate().expect("valid");
    }
}
