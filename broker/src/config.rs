//! Broker configuration: defaults -> TOML file -> CLI flags.
//!
//! Every CLI flag has a TOML key of the same (kebab-case) name; unknown keys are an error so that
//! a typo never silently falls back to a default.

use crate::proxy_protocol::Cidr;
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
    /// Management HTTP API and UI listeners.
    pub mgmt: Vec<SocketAddr>,
    /// Prometheus /metrics listeners.
    pub prometheus: Vec<SocketAddr>,
    /// Inter-node listeners (port 0 allowed); set, the node is a cluster member (see
    /// [`crate::cluster`]).
    pub cluster_listen: Vec<SocketAddr>,
    /// Nodes to join through: `name@host:port`, `host:port` or a DNS name resolving to several
    /// peers (port 25672 when none is given).
    pub join: Vec<String>,
    /// The shared cluster secret (the Erlang cookie's role); needed with `cluster-listen`.
    pub cluster_secret_file: Option<PathBuf>,
    /// A voter of the cluster that holds no queues and serves no clients (the third vote that
    /// lets a two-node cluster survive the death of either node).
    pub witness: bool,
    /// What a node that loses its peers does: `ignore` (keep serving) or `pause_minority`.
    pub cluster_partition_handling: crate::cluster::settings::PartitionHandling,
    /// TLS on inter-node links: this node's certificate chain, key, and the CA of its peers.
    pub cluster_tls_cert: Option<PathBuf>,
    pub cluster_tls_key: Option<PathBuf>,
    pub cluster_tls_ca: Option<PathBuf>,
    /// A peer silent for this long is down, milliseconds (the other cluster clocks follow).
    pub cluster_failure_detection_ms: u64,
    /// Log filter (RUST_LOG syntax).
    pub log: Option<String>,
    /// Largest frame the broker accepts and offers in connection.tune.
    pub frame_max: u32,
    /// channel_max offered in connection.tune: how many channels a connection may have open at
    /// once (any channel number 1..=65535 may be used, as RabbitMQ 3.10).
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
    /// Memory alarm threshold for message memory: a fraction of total memory (`0.4`) or an
    /// absolute size (`"200MiB"`, `"1GB"`).
    pub vm_memory_high_watermark: MemoryWatermark,
    /// Queues page transient messages to disk above this fraction of the watermark.
    pub vm_memory_high_watermark_paging_ratio: f64,
    /// Disk alarm threshold for free space on the data directory's file system: a size
    /// (`"50MB"`, or a bare integer of bytes) or `"mem_relative:1.0"` (times total memory).
    pub disk_free_limit: DiskFreeLimit,
    /// Start with the loadable entries of a damaged `definitions.json` (each bad one reported)
    /// instead of refusing to start.
    pub skip_invalid_definitions: bool,
    /// Every connection to the AMQP, AMQPS and management listeners starts with a PROXY
    /// protocol v1/v2 header from a load balancer in `proxy-protocol-from`; the client address in
    /// it is used everywhere. Connections from other sources are refused.
    #[serde(alias = "proxy_protocol")]
    pub proxy_protocol: bool,
    /// Addresses (CIDR ranges or bare IPs) allowed to send the PROXY header.
    #[serde(alias = "proxy_protocol_from")]
    pub proxy_protocol_from: Vec<Cidr>,
    /// Largest management API request body, bytes (`"20MiB"`); bodies being read at once share
    /// a node-wide budget of 4 times this.
    #[serde(deserialize_with = "de_size")]
    pub mgmt_max_body_size: u64,
    /// A management HTTP request's headers must arrive within this (also the keep-alive idle
    /// limit), milliseconds.
    pub mgmt_header_timeout_ms: u64,
    /// A management HTTP request's body must arrive within this, milliseconds (408 otherwise).
    pub mgmt_body_timeout_ms: u64,
    /// Most concurrent connections per management (and Prometheus) listener; further clients wait
    /// in the listen backlog. 0 = unlimited.
    pub mgmt_max_connections: u32,
    /// Failed logins (AMQP and HTTP) one source address may have within 60 s before its further
    /// attempts are refused for 60 s without a password check. 0 = off (as RabbitMQ).
    pub auth_failure_limit: u32,
    /// What the broker tells clients it is: `product`, `version` and `platform` in
    /// connection.start, `product_name` and `product_version` in the management API's overview.
    pub server_identity: ServerIdentity,
}

/// Default `mgmt-max-body-size`: RabbitMQ's `management.http_max_body_size`.
pub const DEFAULT_MGMT_MAX_BODY_SIZE: u64 = 20 << 20;
/// The largest `mgmt-max-body-size` accepted.
pub const MGMT_MAX_BODY_SIZE_LIMIT: u64 = 1 << 30;

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
            witness: false,
            cluster_partition_handling: Default::default(),
            cluster_tls_cert: None,
            cluster_tls_key: None,
            cluster_tls_ca: None,
            cluster_failure_detection_ms: crate::cluster::settings::DEFAULT_FAILURE_DETECTION_MS,
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
            vm_memory_high_watermark: MemoryWatermark::Relative(0.4),
            vm_memory_high_watermark_paging_ratio: 0.5,
            disk_free_limit: DiskFreeLimit::Absolute(50_000_000),
            skip_invalid_definitions: false,
            proxy_protocol: false,
            proxy_protocol_from: Cidr::loopback(),
            mgmt_max_body_size: DEFAULT_MGMT_MAX_BODY_SIZE,
            mgmt_header_timeout_ms: 30_000,
            mgmt_body_timeout_ms: 30_000,
            mgmt_max_connections: 1024,
            auth_failure_limit: 0,
            server_identity: ServerIdentity::Warren,
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

    /// A config for in-process tests: one loopback listener on port 0, fast shutdown, and a
    /// data directory of its own under the system temp dir (never the working directory).
    pub fn for_tests() -> Self {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            amqp: vec![SocketAddr::from(([127, 0, 0, 1], 0))],
            data_dir: std::env::temp_dir().join(format!("warren-test-{}-{n}", std::process::id())),
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
        let ratio = self.vm_memory_high_watermark_paging_ratio;
        if !ratio.is_finite() || ratio <= 0.0 {
            return Err(ConfigError::Invalid(format!(
                "vm-memory-high-watermark-paging-ratio must be a number above 0 (got {ratio}); \
                 a value above 1 disables paging before the memory alarm"
            )));
        }
        if self.amqp.is_empty() && self.amqps.is_empty() && !self.witness {
            return Err(ConfigError::Invalid("no amqp or amqps listener".into()));
        }
        crate::cluster::settings::validate(self).map_err(ConfigError::Invalid)?;
        if self.proxy_protocol && self.proxy_protocol_from.is_empty() {
            return Err(ConfigError::Invalid(
                "proxy-protocol is on but proxy-protocol-from is empty: every connection would be \
                 refused; list the load balancers' addresses (such as \"10.0.0.0/8\")"
                    .into(),
            ));
        }
        if self.mgmt_max_body_size == 0 || self.mgmt_max_body_size > MGMT_MAX_BODY_SIZE_LIMIT {
            return Err(ConfigError::Invalid(format!(
                "mgmt-max-body-size must be between 1 byte and 1GiB (got {})",
                self.mgmt_max_body_size
            )));
        }
        if self.mgmt_header_timeout_ms == 0 || self.mgmt_body_timeout_ms == 0 {
            return Err(ConfigError::Invalid(
                "mgmt-header-timeout-ms and mgmt-body-timeout-ms must be above 0".into(),
            ));
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

/// A size in TOML: an integer of bytes or a string with a unit (`"20MiB"`).
fn de_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    match RawLimit::deserialize(d)? {
        RawLimit::Int(i) => {
            u64::try_from(i).map_err(|_| serde::de::Error::custom("a size must not be negative"))
        }
        RawLimit::Float(f) => Err(serde::de::Error::custom(format!(
            "{f}: write a size as bytes (an integer) or with a unit such as \"20MiB\""
        ))),
        RawLimit::Str(s) => {
            let t = s.trim();
            if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
                return t.parse().map_err(serde::de::Error::custom);
            }
            parse_size(t).map_err(|e| serde::de::Error::custom(format!("'{t}': {e}")))
        }
    }
}

// === server identity ===

/// `server-identity`: the name and version the broker presents to clients.
///
/// Some clients and tools branch on the `product` and `version` server properties (or on the
/// management API's `product_name`), and a few refuse or degrade with a broker they do not know.
/// `rabbitmq` presents the RabbitMQ release whose behaviour warren follows, exactly as Debian's
/// RabbitMQ 3.10.8 does; `warren` (the default) tells the truth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum ServerIdentity {
    /// product "warren", warren's own version, platform "Rust".
    #[default]
    Warren,
    /// product "RabbitMQ", version 3.10.8, platform "Erlang/OTP 25.2.3".
    Rabbitmq,
}

// === impl ServerIdentity ===

impl ServerIdentity {
    /// `product` in connection.start, `product_name` in /api/overview.
    pub fn product(self) -> &'static str {
        match self {
            Self::Warren => "warren",
            Self::Rabbitmq => "RabbitMQ",
        }
    }

    /// `version` in connection.start, `product_version` in /api/overview.
    pub fn version(self) -> &'static str {
        match self {
            Self::Warren => env!("CARGO_PKG_VERSION"),
            Self::Rabbitmq => crate::definitions::RABBITMQ_COMPAT_VERSION,
        }
    }

    /// `platform` in connection.start.
    pub fn platform(self) -> &'static str {
        match self {
            Self::Warren => "Rust",
            // What Debian's rabbitmq-server 3.10.8 sends (bookworm's Erlang).
            Self::Rabbitmq => "Erlang/OTP 25.2.3",
        }
    }
}

impl std::str::FromStr for ServerIdentity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "warren" => Ok(Self::Warren),
            "rabbitmq" => Ok(Self::Rabbitmq),
            _ => Err(format!(
                "server-identity '{}': expected \"warren\" or \"rabbitmq\"",
                s.trim()
            )),
        }
    }
}

impl TryFrom<String> for ServerIdentity {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for ServerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Warren => "warren",
            Self::Rabbitmq => "rabbitmq",
        })
    }
}

// === alarm thresholds ===

/// `vm-memory-high-watermark`: when message memory reaches it, the memory alarm is raised.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawLimit")]
pub enum MemoryWatermark {
    /// Fraction of the node's total memory (the cgroup limit when lower), 0..=1.
    Relative(f64),
    /// Bytes.
    Absolute(u64),
}

/// `disk-free-limit`: when free space on the data directory's file system falls below it, the
/// disk alarm is raised.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(try_from = "RawLimit")]
pub enum DiskFreeLimit {
    /// Bytes.
    Absolute(u64),
    /// Multiple of the node's total memory (RabbitMQ's `disk_free_limit.relative`).
    MemRelative(f64),
}

/// A threshold as written in TOML: a number or a string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawLimit {
    Int(i64),
    Float(f64),
    Str(String),
}

const WATERMARK_HELP: &str =
    "write a fraction of total memory such as 0.4, or a size with a unit such as \"200MiB\" or \"1GB\"";
const DISK_LIMIT_HELP: &str =
    "write a size such as \"50MB\" or \"2GiB\" (a bare integer is bytes), or \"mem_relative:1.0\"";

impl MemoryWatermark {
    fn fraction(f: f64, shown: &str) -> Result<Self, String> {
        if f.is_finite() && (0.0..=1.0).contains(&f) {
            Ok(Self::Relative(f))
        } else {
            Err(format!(
                "vm-memory-high-watermark {shown}: a fraction of total memory must be between 0 \
                 and 1; {WATERMARK_HELP}"
            ))
        }
    }
}

impl std::str::FromStr for MemoryWatermark {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Ok(f) = t.parse::<f64>() {
            return Self::fraction(f, t);
        }
        parse_size(t)
            .map(Self::Absolute)
            .map_err(|e| format!("vm-memory-high-watermark '{t}': {e}; {WATERMARK_HELP}"))
    }
}

impl TryFrom<RawLimit> for MemoryWatermark {
    type Error = String;
    fn try_from(v: RawLimit) -> Result<Self, String> {
        match v {
            RawLimit::Int(i) => Self::fraction(i as f64, &i.to_string()),
            RawLimit::Float(f) => Self::fraction(f, &f.to_string()),
            RawLimit::Str(s) => s.parse(),
        }
    }
}

impl std::fmt::Display for MemoryWatermark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Relative(x) => write!(f, "{x}"),
            Self::Absolute(b) => write!(f, "{b}B"),
        }
    }
}

impl std::str::FromStr for DiskFreeLimit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if let Some(rest) = t.strip_prefix("mem_relative") {
            let num = rest.trim_start_matches([':', '=', ' ']).trim();
            return match num.parse::<f64>() {
                Ok(f) if f.is_finite() && f >= 0.0 => Ok(Self::MemRelative(f)),
                _ => Err(format!(
                    "disk-free-limit '{t}': mem_relative needs a number >= 0 such as \
                     \"mem_relative:1.0\""
                )),
            };
        }
        if !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()) {
            return t
                .parse::<u64>()
                .map(Self::Absolute)
                .map_err(|e| format!("disk-free-limit '{t}': {e}"));
        }
        parse_size(t)
            .map(Self::Absolute)
            .map_err(|e| format!("disk-free-limit '{t}': {e}; {DISK_LIMIT_HELP}"))
    }
}

impl TryFrom<RawLimit> for DiskFreeLimit {
    type Error = String;
    fn try_from(v: RawLimit) -> Result<Self, String> {
        match v {
            RawLimit::Int(i) => u64::try_from(i)
                .map(Self::Absolute)
                .map_err(|_| format!("disk-free-limit {i}: must not be negative")),
            RawLimit::Float(f) => Err(format!(
                "disk-free-limit {f}: a bare number is ambiguous; {DISK_LIMIT_HELP}"
            )),
            RawLimit::Str(s) => s.parse(),
        }
    }
}

impl std::fmt::Display for DiskFreeLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Absolute(b) => write!(f, "{b}B"),
            Self::MemRelative(x) => write!(f, "mem_relative:{x}"),
        }
    }
}

/// Parses a size with a unit, RabbitMQ style: `kB`/`MB`/`GB`/`TB` are powers of 1000,
/// `KiB`/`MiB`/`GiB`/`TiB` (and the one-letter `k`/`M`/`G`/`T`) powers of 1024, `B` bytes.
/// Units are case-insensitive; the number may have a fraction (`1.5GiB`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    if num.is_empty() {
        return Err("not a size".into());
    }
    let n: f64 = num.parse().map_err(|_| format!("bad number '{num}'"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1,
        "k" | "ki" | "kib" => 1 << 10,
        "kb" => 1_000,
        "m" | "mi" | "mib" => 1 << 20,
        "mb" => 1_000_000,
        "g" | "gi" | "gib" => 1 << 30,
        "gb" => 1_000_000_000,
        "t" | "ti" | "tib" => 1 << 40,
        "tb" => 1_000_000_000_000,
        "" => return Err("a size needs a unit (B, kB, KiB, MB, MiB, GB, GiB, TB, TiB)".into()),
        other => return Err(format!("unknown unit '{other}'")),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err("size too large".into());
    }
    Ok(bytes as u64)
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

    #[test]
    fn alarm_thresholds_parse_rabbitmq_style() {
        let cfg = Config::from_toml_str(
            "vm-memory-high-watermark = 0.6\nvm-memory-high-watermark-paging-ratio = 0.75\n\
             disk-free-limit = \"1GB\"\n",
        )
        .expect("parse");
        assert_eq!(cfg.vm_memory_high_watermark, MemoryWatermark::Relative(0.6));
        assert_eq!(cfg.vm_memory_high_watermark_paging_ratio, 0.75);
        assert_eq!(cfg.disk_free_limit, DiskFreeLimit::Absolute(1_000_000_000));
        cfg.validate().expect("valid");

        let cfg = Config::from_toml_str(
            "vm-memory-high-watermark = \"200MiB\"\ndisk-free-limit = 1000\n",
        )
        .expect("parse");
        assert_eq!(
            cfg.vm_memory_high_watermark,
            MemoryWatermark::Absolute(200 << 20)
        );
        assert_eq!(cfg.disk_free_limit, DiskFreeLimit::Absolute(1000));

        let cfg = Config::from_toml_str("disk-free-limit = \"mem_relative:1.5\"\n").expect("parse");
        assert_eq!(cfg.disk_free_limit, DiskFreeLimit::MemRelative(1.5));
        assert_eq!(
            Config::default().disk_free_limit,
            DiskFreeLimit::Absolute(50_000_000)
        );
        assert_eq!(
            Config::default().vm_memory_high_watermark,
            MemoryWatermark::Relative(0.4)
        );
    }

    #[test]
    fn alarm_thresholds_reject_nonsense_with_a_reason() {
        for (toml, want) in [
            ("vm-memory-high-watermark = 1.5\n", "between 0 and 1"),
            ("vm-memory-high-watermark = -0.1\n", "between 0 and 1"),
            ("vm-memory-high-watermark = \"200\"\n", "between 0 and 1"),
            ("vm-memory-high-watermark = \"200XB\"\n", "unknown unit"),
            ("vm-memory-high-watermark = \"lots\"\n", "not a size"),
            ("disk-free-limit = -5\n", "negative"),
            ("disk-free-limit = 0.5\n", "ambiguous"),
            ("disk-free-limit = \"mem_relative:x\"\n", "mem_relative"),
            ("disk-free-limit = \"50 parsecs\"\n", "unknown unit"),
        ] {
            let e = Config::from_toml_str(toml).expect_err(toml).to_string();
            assert!(e.contains(want), "{toml}: {e}");
        }
        let cfg =
            Config::from_toml_str("vm-memory-high-watermark-paging-ratio = 0.0\n").expect("parse");
        let e = cfg.validate().expect_err("ratio 0").to_string();
        assert!(e.contains("paging-ratio"), "{e}");
    }

    #[test]
    fn proxy_protocol_keys_with_dashes_or_underscores() {
        let cfg = Config::from_toml_str(
            "proxy-protocol = true\nproxy-protocol-from = [\"10.0.0.0/8\", \"192.0.2.7\", \"::1/128\"]\n",
        )
        .expect("parse");
        assert!(cfg.proxy_protocol);
        assert_eq!(
            cfg.proxy_protocol_from
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "192.0.2.7/32", "::1/128"]
        );
        cfg.validate().expect("valid");
        let cfg = Config::from_toml_str(
            "proxy_protocol = true\nproxy_protocol_from = [\"127.0.0.1/32\"]\n",
        )
        .expect("underscores, as the spec writes them");
        assert!(cfg.proxy_protocol);
        assert_eq!(cfg.proxy_protocol_from.len(), 1);
        let d = Config::default();
        assert!(!d.proxy_protocol);
        assert_eq!(
            d.proxy_protocol_from
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["127.0.0.0/8", "::1/128"]
        );
    }

    #[test]
    fn bad_proxy_protocol_config_says_why() {
        for (toml, want) in [
            (
                "proxy-protocol-from = [\"10.0.0.1/8\"]\n",
                "did you mean 10.0.0.0/8",
            ),
            ("proxy-protocol-from = [\"10.0.0.0/40\"]\n", "more than 32"),
            (
                "proxy-protocol-from = [\"lb.local\"]\n",
                "not an IP address",
            ),
            ("proxy-protocol = \"yes\"\n", "bool"),
        ] {
            let e = Config::from_toml_str(toml).expect_err(toml).to_string();
            assert!(e.contains(want), "{toml}: {e}");
        }
        let cfg = Config::from_toml_str("proxy-protocol = true\nproxy-protocol-from = []\n")
            .expect("parse");
        let e = cfg.validate().expect_err("empty trust list").to_string();
        assert!(e.contains("proxy-protocol-from is empty"), "{e}");
    }

    #[test]
    fn mgmt_limits_and_failure_limit() {
        let d = Config::default();
        assert_eq!(d.mgmt_max_body_size, 20 << 20);
        assert_eq!(d.auth_failure_limit, 0);
        let cfg = Config::from_toml_str(
            "mgmt-max-body-size = \"1MiB\"\nmgmt-header-timeout-ms = 500\n\
             mgmt-body-timeout-ms = 700\nmgmt-max-connections = 8\nauth-failure-limit = 5\n",
        )
        .expect("parse");
        assert_eq!(cfg.mgmt_max_body_size, 1 << 20);
        assert_eq!(cfg.mgmt_header_timeout_ms, 500);
        assert_eq!(cfg.mgmt_body_timeout_ms, 700);
        assert_eq!(cfg.mgmt_max_connections, 8);
        assert_eq!(cfg.auth_failure_limit, 5);
        cfg.validate().expect("valid");
        let cfg = Config::from_toml_str("mgmt-max-body-size = 4096\n").expect("bytes");
        assert_eq!(cfg.mgmt_max_body_size, 4096);
        for toml in [
            "mgmt-max-body-size = \"2GiB\"\n",
            "mgmt-max-body-size = 0\n",
            "mgmt-body-timeout-ms = 0\n",
        ] {
            let cfg = Config::from_toml_str(toml).expect(toml);
            assert!(cfg.validate().is_err(), "{toml}");
        }
        assert!(Config::from_toml_str("mgmt-max-body-size = -1\n").is_err());
        assert!(Config::from_toml_str("mgmt-max-body-size = \"20 parsecs\"\n").is_err());
    }

    #[test]
    fn server_identity() {
        assert_eq!(Config::default().server_identity, ServerIdentity::Warren);
        let cfg = Config::from_toml_str("server-identity = \"rabbitmq\"\n").expect("parse");
        assert_eq!(cfg.server_identity, ServerIdentity::Rabbitmq);
        assert_eq!(cfg.server_identity.product(), "RabbitMQ");
        assert_eq!(cfg.server_identity.version(), "3.10.8");
        let cfg = Config::from_toml_str("server-identity = \"RabbitMQ\"\n").expect("any case");
        assert_eq!(cfg.server_identity, ServerIdentity::Rabbitmq);
        let cfg = Config::from_toml_str("server-identity = \"warren\"\n").expect("parse");
        assert_eq!(cfg.server_identity.product(), "warren");
        let e = Config::from_toml_str("server-identity = \"qpid\"\n")
            .expect_err("unknown identity")
            .to_string();
        assert!(e.contains("expected \"warren\" or \"rabbitmq\""), "{e}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("50MB"), Ok(50_000_000));
        assert_eq!(parse_size("50mb"), Ok(50_000_000));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
        assert_eq!(parse_size("10k"), Ok(10_240));
        assert_eq!(parse_size("1000TB"), Ok(1_000_000_000_000_000));
        assert_eq!(parse_size("7B"), Ok(7));
        assert!(parse_size("7").is_err());
        assert!(parse_size("99999999999999TiB").is_err());
        assert!(parse_size("").is_err());
    }
}
