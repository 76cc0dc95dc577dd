//! Configuration: the TOML schema of `lb.md`, its defaults and its validation.
//!
//! Layering is defaults -> TOML file -> CLI flags. Parsing ([`Config::from_toml_str`]) is
//! separate from reading the file ([`Config::load`]) so tests and the admin API can feed text
//! directly. Every struct denies unknown keys: a misspelt key is an error naming the key, never a
//! silently ignored setting.
//!
//! Fault rules (`[[listener.fault]]`) and `[chaos] seed` are part of the schema and stored as
//! structured data; [`FaultRule::check`] validates what each kind of rule needs, here next to
//! the types, so that validation does not depend on the chaos engine that runs the rules
//! (`chaos::plan` reads these types; only the AMQP method names come from `chaos::amqp`).

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::addr::{self, BackendAddr, BadBackend, OwnAddr};
use crate::chaos::amqp::method_ids;

/// The whole configuration of one warren-lb process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Admin API; absent means no admin API.
    pub admin: Option<AdminConfig>,
    /// `[[listener]]` tables.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    pub chaos: ChaosConfig,
    pub runtime: RuntimeConfig,
}

/// `[admin]`: where the admin API listens and how it protects itself (see `admin`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// File holding the bearer token (surrounding whitespace trimmed). Required unless `listen`
    /// is a loopback address. A relative path is relative to the working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// How long a client may take to send a request's headers, and its body; also how long an
    /// idle keep-alive connection stays open. Streaming responses (`/events?follow=1`) are not
    /// limited by it.
    #[serde(default = "default_admin_request_timeout", with = "dur")]
    pub request_timeout: Duration,
    /// Concurrent admin connections; beyond, a new connection is closed at once.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: usize,
}

/// Default of `[admin] request_timeout`.
pub const ADMIN_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of `[admin] max_connections`.
pub const ADMIN_MAX_CONNECTIONS: usize = 256;

fn default_admin_request_timeout() -> Duration {
    ADMIN_REQUEST_TIMEOUT
}
fn default_admin_max_connections() -> usize {
    ADMIN_MAX_CONNECTIONS
}

// === impl AdminConfig ===

impl AdminConfig {
    /// An admin API on `listen` with the defaults (no token: loopback only).
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            token_file: None,
            request_timeout: ADMIN_REQUEST_TIMEOUT,
            max_connections: ADMIN_MAX_CONNECTIONS,
        }
    }

    /// True when the admin API is reachable from the local machine only.
    pub fn is_loopback(&self) -> bool {
        self.listen.ip().to_canonical().is_loopback()
    }

    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.token_file.is_none() && !self.is_loopback() {
            return Err(ValidationError::AdminNeedsToken {
                listen: self.listen,
            });
        }
        if self.request_timeout.is_zero() || self.request_timeout > Duration::from_secs(3600) {
            return Err(ValidationError::Admin(
                "request_timeout must be within 1ms..1h".to_string(),
            ));
        }
        if self.max_connections == 0 {
            return Err(ValidationError::Admin(
                "max_connections must be greater than zero".to_string(),
            ));
        }
        Ok(())
    }

    /// Reads the token from `token_file`; `None` without one. An unreadable or empty file, or a
    /// token that cannot travel in an HTTP header, is an error naming the file.
    pub fn read_token(&self) -> Result<Option<String>, ValidationError> {
        let Some(path) = &self.token_file else {
            return Ok(None);
        };
        let problem = |problem: String| ValidationError::TokenFile {
            path: path.clone(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| problem(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(problem(
                "the file is empty; put the admin token in it".to_string(),
            ));
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(problem(
                "the token must be printable ASCII without spaces or line breaks".to_string(),
            ));
        }
        Ok(Some(token.to_string()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChaosConfig {
    /// Seed of the one RNG every random fault decision comes from.
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Connection threads, each the one worker of a runtime of its own (the first also accepts,
    /// checks health and serves the admin API); absent = one per CPU in the binary. A new
    /// connection goes to the first thread that is not busy (see `workers`).
    pub threads: Option<usize>,
    /// Zero-copy splice(2) for bulk plain-TCP transfers; absent = on.
    pub splice: Option<bool>,
}

/// One `[[listener]]`: a bound address in front of a backend pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// `host:port` strings; IP literals are connected to directly, names are resolved per connect.
    pub backends: Vec<String>,
    pub balance: Balance,
    #[serde(with = "dur")]
    pub idle_timeout: Duration,
    pub idle_close: CloseStyle,
    #[serde(with = "dur")]
    pub connect_timeout: Duration,
    #[serde(with = "dur")]
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub proxy_protocol: ProxyProtocol,
    pub tls: Option<TlsServerConfig>,
    pub backend_tls: Option<TlsClientConfig>,
    pub health: HealthConfig,
    #[serde(rename = "fault", skip_serializing_if = "Vec::is_empty")]
    pub faults: Vec<FaultRule>,
}

impl Default for ListenerConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            bind: SocketAddr::from(([0, 0, 0, 0], 0)),
            backends: Vec::new(),
            balance: Balance::RoundRobin,
            idle_timeout: Duration::from_secs(60),
            idle_close: CloseStyle::Fin,
            connect_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(300),
            max_connections: 10_000,
            proxy_protocol: ProxyProtocol::Off,
            tls: None,
            backend_tls: None,
            health: HealthConfig::default(),
            faults: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
    Random,
}

/// How a connection is closed (idle expiry, drain, reset).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CloseStyle {
    /// Orderly close (FIN) of both sides.
    #[default]
    Fin,
    /// Abortive close (RST, SO_LINGER 0) of both sides.
    Rst,
    /// Stop forwarding and hold both sockets open until a peer goes.
    Drop,
    /// Close only one side (chaos engine).
    Half,
}

impl CloseStyle {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseStyle::Fin => "fin",
            CloseStyle::Rst => "rst",
            CloseStyle::Drop => "drop",
            CloseStyle::Half => "half",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    #[default]
    Off,
    V1,
    V2,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsServerConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsClientConfig {
    /// PEM file of the CA(s) that sign the backends' certificates.
    pub ca: PathBuf,
    /// Name to verify; absent = the host part of each backend address.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthCheck {
    #[default]
    Tcp,
    Http,
    Amqp,
}

impl HealthCheck {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheck::Tcp => "tcp",
            HealthCheck::Http => "http",
            HealthCheck::Amqp => "amqp",
        }
    }
}

/// `[listener.health]`, with the Classic ELB defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HealthConfig {
    pub check: HealthCheck,
    pub path: String,
    /// `user:password` sent as HTTP basic auth by http checks (the management API's health
    /// endpoints, RabbitMQ's and warren's, answer 401 without). Never shown by the admin API.
    #[serde(skip_serializing)]
    pub auth: Option<String>,
    #[serde(with = "dur")]
    pub interval: Duration,
    #[serde(with = "dur")]
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            check: HealthCheck::Tcp,
            path: "/".to_string(),
            auth: None,
            interval: Duration::from_secs(30),
            timeout: Duration::from_secs(5),
            healthy_threshold: 10,
            unhealthy_threshold: 2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    Reset,
    Latency,
    Bandwidth,
    Slicer,
    LimitData,
    Timeout,
    SlowClose,
    Refuse,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Upstream,
    Downstream,
    #[default]
    Both,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Side {
    Client,
    Backend,
    #[default]
    Both,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Backend => "backend",
            Side::Both => "both",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InFlight {
    #[default]
    Drop,
    Flush,
}

/// `rate` is "1/min" for `reset` and a number (KB/s) for `bandwidth`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Rate {
    Number(f64),
    Text(String),
}

/// `"1/min"`, `"2/s"`, `"10/h"`, `"1/30s"`: events per second.
pub fn parse_rate(s: &str) -> Result<f64, String> {
    let bad = || format!("invalid rate `{s}` (expected e.g. \"1/min\", \"5/s\", \"1/30s\")");
    let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
    let n: f64 = n.trim().parse().map_err(|_| bad())?;
    let secs = match per.trim() {
        "s" | "sec" | "second" => 1.0,
        "m" | "min" | "minute" => 60.0,
        "h" | "hour" => 3600.0,
        "d" | "day" => 86400.0,
        other => humantime::parse_duration(other)
            .map_err(|_| bad())?
            .as_secs_f64(),
    };
    if !(n.is_finite() && n > 0.0 && secs > 0.0) {
        return Err(bad());
    }
    Ok(n / secs)
}

/// One `[[listener.fault]]` rule, stored as written (see "Chaos engine" in the spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    pub name: String,
    pub kind: FaultKind,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default = "one")]
    pub toxicity: f64,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default, with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub every: Option<Duration>,
    #[serde(default, with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub jitter: Option<Duration>,
    #[serde(default, with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_amqp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nth: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probability: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub style: Option<CloseStyle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub side: Option<Side>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    #[serde(default, with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub latency: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub average_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_variation: Option<u64>,
    #[serde(default, with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, with = "opt_dur", skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

fn one() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}

impl FaultRule {
    /// The periodic reset rule that `--reset-every DUR` stands for (RST; what the proxy holds
    /// is discarded, `in_flight` being `drop` by default).
    pub fn reset_every(every: Duration) -> Self {
        Self {
            name: "reset-every".to_string(),
            kind: FaultKind::Reset,
            direction: Direction::Both,
            toxicity: 1.0,
            enabled: true,
            every: Some(every),
            jitter: None,
            lifetime: None,
            rate: None,
            after_bytes: None,
            on_amqp: None,
            nth: None,
            probability: None,
            style: Some(CloseStyle::Rst),
            side: None,
            in_flight: None,
            latency: None,
            average_size: None,
            size_variation: None,
            delay: None,
            bytes: None,
            timeout: None,
        }
    }

    /// The rule that `--reset-after-publish N` stands for: reset each connection right after
    /// its Nth `basic.publish` (client to broker) reached the proxy, discarding the content
    /// frames already read, so the publish never reaches the broker.
    pub fn reset_after_publish(nth: u64) -> Self {
        Self {
            name: "reset-after-publish".to_string(),
            on_amqp: Some("basic.publish".to_string()),
            nth: Some(nth),
            direction: Direction::Upstream,
            in_flight: Some(InFlight::Drop),
            every: None,
            ..Self::reset_every(Duration::ZERO)
        }
    }

    /// Checks what a rule of its kind needs: one trigger for a reset, a valid rate or AMQP
    /// method name, the settings a shaping rule cannot do without (called by
    /// [`ListenerConfig::validate`], which adds the listener and rule to the error).
    pub fn check(&self) -> Result<(), String> {
        match self.kind {
            FaultKind::Reset => {
                let triggers = [
                    self.every.is_some(),
                    self.lifetime.is_some(),
                    self.rate.is_some(),
                    self.after_bytes.is_some(),
                    self.on_amqp.is_some(),
                ];
                if triggers.iter().filter(|t| **t).count() > 1 {
                    return Err(
                        "a reset rule has one trigger (every | lifetime | rate | after_bytes | on_amqp)"
                            .into(),
                    );
                }
                match &self.rate {
                    Some(Rate::Text(t)) => {
                        parse_rate(t)?;
                    }
                    Some(Rate::Number(_)) => {
                        return Err("a reset rate is written like \"1/min\"".into());
                    }
                    None => {}
                }
                if self.lifetime.is_some_and(|d| d.is_zero()) {
                    return Err("lifetime must be greater than zero".into());
                }
                if let Some(m) = &self.on_amqp {
                    if method_ids(m).is_none() {
                        return Err(format!("unknown AMQP method `{m}` (write class.method)"));
                    }
                }
                if self.nth == Some(0) {
                    return Err("nth counts from 1".into());
                }
            }
            FaultKind::Bandwidth => match &self.rate {
                Some(Rate::Number(n)) if *n > 0.0 && n.is_finite() => {}
                _ => return Err("bandwidth needs rate = KB/s (a number > 0)".into()),
            },
            FaultKind::Latency if self.latency.is_none() => {
                return Err("latency needs latency = DUR".into())
            }
            FaultKind::LimitData if self.bytes.is_none() => {
                return Err("limit_data needs bytes = N".into())
            }
            FaultKind::Slicer if self.average_size == Some(0) => {
                return Err("average_size must be greater than zero".into())
            }
            _ => {}
        }
        Ok(())
    }
}

/// Reading or parsing failed, or the values are inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("{origin}: {source}")]
    Invalid {
        origin: String,
        source: ValidationError,
    },
}

/// A value that parses but makes no sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ValidationError {
    #[error("no [[listener]] configured")]
    NoListeners,
    #[error("a listener has an empty name")]
    EmptyName,
    #[error("listener name `{0}` is used more than once")]
    DuplicateListener(String),
    #[error("listener `{0}` is named `admin`, which is reserved for the admin API")]
    ReservedName(String),
    #[error("listener `{0}` has no backends")]
    NoBackends(String),
    /// Not valid, not resolvable, or warren-lb itself (`backend::addr`).
    #[error("listener `{listener}`: backend `{addr}` {reason}")]
    BadBackend {
        listener: String,
        /// As given, cut to a readable length.
        addr: String,
        reason: String,
    },
    #[error(
        "the admin API listens on {listen}, which is not a loopback address, without a token: \
         anyone who reaches it could reconfigure warren-lb. Put a secret in a file and set \
         [admin] token_file = \"/path/to/file\" (or --admin-token-file PATH), or listen on \
         127.0.0.1"
    )]
    AdminNeedsToken { listen: SocketAddr },
    #[error("[admin] {0}")]
    Admin(String),
    #[error("[admin] token_file {path}: {problem}")]
    TokenFile { path: PathBuf, problem: String },
    #[error("listener `{listener}`: backend `{addr}` is listed twice")]
    DuplicateBackend { listener: String, addr: String },
    #[error("listener `{listener}`: idle_timeout {value} is outside 1s..3600s")]
    IdleTimeout { listener: String, value: String },
    #[error("listener `{listener}`: {key} must be at most 30 days")]
    TooLong { listener: String, key: &'static str },
    #[error("listener `{listener}`: {key} must be greater than zero")]
    Zero { listener: String, key: &'static str },
    #[error(
        "listener `{listener}`: idle_close = \"half\" is not an idle behaviour (fin | rst | drop)"
    )]
    HalfIdleClose { listener: String },
    #[error("listener `{listener}`: health.path must start with `/`")]
    HealthPath { listener: String },
    #[error("listener `{listener}`: health.auth {problem}")]
    HealthAuth { listener: String, problem: String },
    #[error("listener `{listener}`: fault rule name `{rule}` is used more than once")]
    DuplicateFault { listener: String, rule: String },
    #[error("listener `{listener}`: fault rule `{rule}`: {problem}")]
    BadFault {
        listener: String,
        rule: String,
        problem: String,
    },
}

impl From<BadBackend> for ValidationError {
    fn from(b: BadBackend) -> Self {
        ValidationError::BadBackend {
            listener: b.listener,
            addr: b.addr,
            reason: b.reason,
        }
    }
}

// === impl Config ===

impl Config {
    /// Parses TOML text; `origin` only labels error messages (a path, or "<inline>").
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::parse_named(text, "<config>")
    }

    fn parse_named(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.validate().map_err(|source| ConfigError::Invalid {
            origin: origin.to_string(),
            source,
        })?;
        Ok(cfg)
    }

    /// Reads, parses and validates a file, and reads the admin token file if it names one.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let cfg = Self::parse_file(path)?;
        cfg.check(&path.display().to_string())?;
        Ok(cfg)
    }

    /// Reads and parses a file without validating it (the caller applies CLI overrides, then
    /// [`Config::check`]s).
    pub fn parse_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: path.display().to_string(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// [`Config::validate`], then the admin token file (readable, not empty); errors are
    /// labelled with `origin`.
    pub fn check(&self, origin: &str) -> Result<(), ConfigError> {
        let invalid = |source| ConfigError::Invalid {
            origin: origin.to_string(),
            source,
        };
        self.validate().map_err(invalid)?;
        if let Some(a) = &self.admin {
            a.read_token().map_err(invalid)?;
        }
        Ok(())
    }

    /// The configuration of the `--listen/--backend` command line: one listener per `--listen`
    /// address (an IPv4 and an IPv6 loopback, say), all with the same settings and backends,
    /// named `default`, `default-2`, `default-3`... in the order given.
    pub fn single_listener(
        binds: &[SocketAddr],
        backends: Vec<String>,
        idle_timeout: Option<Duration>,
        reset_every: Option<Duration>,
        admin: Option<SocketAddr>,
    ) -> Result<Self, ConfigError> {
        let mut template = ListenerConfig {
            backends,
            ..ListenerConfig::default()
        };
        if let Some(idle) = idle_timeout {
            template.idle_timeout = idle;
        }
        if let Some(every) = reset_every {
            template.faults.push(FaultRule::reset_every(every));
        }
        let listeners = binds
            .iter()
            .enumerate()
            .map(|(i, bind)| ListenerConfig {
                name: match i {
                    0 => "default".to_string(),
                    _ => format!("default-{}", i + 1),
                },
                bind: *bind,
                ..template.clone()
            })
            .collect();
        let cfg = Config {
            admin: admin.map(AdminConfig::new),
            listeners,
            ..Config::default()
        };
        cfg.validate().map_err(|source| ConfigError::Invalid {
            origin: "command line".to_string(),
            source,
        })?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ranges, uniqueness, non-empty lists, backend syntax, an admin
    /// API off loopback without a token, and backends given as IP literals that are one of the
    /// configured listener or admin addresses (bound addresses, port 0 included, are checked
    /// again at bind and reload: `backend::addr`).
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.listeners.is_empty() {
            return Err(ValidationError::NoListeners);
        }
        if let Some(a) = &self.admin {
            a.validate()?;
        }
        let mut names = HashSet::new();
        for l in &self.listeners {
            if l.name.is_empty() {
                return Err(ValidationError::EmptyName);
            }
            if l.name == "admin" {
                return Err(ValidationError::ReservedName(l.name.clone()));
            }
            if !names.insert(l.name.as_str()) {
                return Err(ValidationError::DuplicateListener(l.name.clone()));
            }
            l.validate()?;
        }
        let own = self.own_addrs();
        for l in &self.listeners {
            for b in &l.backends {
                if let Ok(BackendAddr::Ip(sa)) = addr::parse(b) {
                    addr::check_not_own(&l.name, b, sa, false, &own, &addr::is_local_ip)?;
                }
            }
        }
        Ok(())
    }

    /// The configured listener and admin addresses (port 0 ones never match a backend).
    pub fn own_addrs(&self) -> Vec<OwnAddr> {
        let mut own: Vec<OwnAddr> = self
            .listeners
            .iter()
            .map(|l| OwnAddr::listener(&l.name, l.bind))
            .collect();
        if let Some(a) = &self.admin {
            own.push(OwnAddr::admin(a.listen));
        }
        own
    }
}

// === impl ListenerConfig ===

impl ListenerConfig {
    pub fn validate(&self) -> Result<(), ValidationError> {
        let name = || self.name.clone();
        if self.backends.is_empty() {
            return Err(ValidationError::NoBackends(name()));
        }
        validate_backends(&self.name, &self.backends)?;
        if self.idle_timeout < Duration::from_secs(1)
            || self.idle_timeout > Duration::from_secs(3600)
        {
            return Err(ValidationError::IdleTimeout {
                listener: name(),
                value: humantime::format_duration(self.idle_timeout).to_string(),
            });
        }
        if self.idle_close == CloseStyle::Half {
            return Err(ValidationError::HalfIdleClose { listener: name() });
        }
        let zero = |key| ValidationError::Zero {
            listener: name(),
            key,
        };
        if self.connect_timeout.is_zero() {
            return Err(zero("connect_timeout"));
        }
        if self.max_connections == 0 {
            return Err(zero("max_connections"));
        }
        let h = &self.health;
        let limit = Duration::from_secs(30 * 24 * 3600);
        for (key, d) in [
            ("connect_timeout", self.connect_timeout),
            ("drain_timeout", self.drain_timeout),
            ("health.interval", h.interval),
            ("health.timeout", h.timeout),
        ] {
            if d > limit {
                return Err(ValidationError::TooLong {
                    listener: name(),
                    key,
                });
            }
        }
        if h.interval.is_zero() {
            return Err(zero("health.interval"));
        }
        if h.timeout.is_zero() {
            return Err(zero("health.timeout"));
        }
        if h.healthy_threshold == 0 {
            return Err(zero("health.healthy_threshold"));
        }
        if h.unhealthy_threshold == 0 {
            return Err(zero("health.unhealthy_threshold"));
        }
        if !h.path.starts_with('/') {
            return Err(ValidationError::HealthPath { listener: name() });
        }
        if let Some(auth) = &h.auth {
            let problem = if h.check != HealthCheck::Http {
                Some("is for http checks only")
            } else if !auth.contains(':') {
                Some("must be user:password")
            } else if auth.chars().any(char::is_control) {
                Some("must not hold control characters")
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(ValidationError::HealthAuth {
                    listener: name(),
                    problem: problem.to_string(),
                });
            }
        }
        let mut rules = HashSet::new();
        for r in &self.faults {
            let bad = |problem: &str| ValidationError::BadFault {
                listener: name(),
                rule: r.name.clone(),
                problem: problem.to_string(),
            };
            if r.name.is_empty() {
                return Err(bad("empty name"));
            }
            if !rules.insert(r.name.as_str()) {
                return Err(ValidationError::DuplicateFault {
                    listener: name(),
                    rule: r.name.clone(),
                });
            }
            if !(0.0..=1.0).contains(&r.toxicity) {
                return Err(bad("toxicity must be within 0..1"));
            }
            if let Some(p) = r.probability {
                if !(0.0..=1.0).contains(&p) {
                    return Err(bad("probability must be within 0..1"));
                }
            }
            if r.every.is_some_and(|d| d.is_zero()) {
                return Err(bad("every must be greater than zero"));
            }
            r.check().map_err(|p| bad(&p))?;
            let durations = [r.every, r.jitter, r.lifetime, r.latency, r.delay, r.timeout];
            if durations.iter().flatten().any(|d| *d > limit) {
                return Err(bad("durations must be at most 30 days"));
            }
        }
        Ok(())
    }
}

/// Backend addresses must be valid `host:port` (see `backend::addr::parse`) and unique within a
/// listener.
pub fn validate_backends(listener: &str, backends: &[String]) -> Result<(), ValidationError> {
    let mut seen = HashSet::new();
    for b in backends {
        addr::parse(b).map_err(|reason| ValidationError::BadBackend {
            listener: listener.to_string(),
            addr: addr::shown(b),
            reason,
        })?;
        if !seen.insert(b.as_str()) {
            return Err(ValidationError::DuplicateBackend {
                listener: listener.to_string(),
                addr: b.clone(),
            });
        }
    }
    Ok(())
}

/// Serde helper for humane durations (`250ms`, `30s`, `5m`).
pub mod dur {
    use super::*;
    use serde::{de, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        d.deserialize_any(DurVisitor)
    }

    pub(super) struct DurVisitor;

    impl de::Visitor<'_> for DurVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a duration such as \"250ms\", \"30s\" or \"5m\"")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Duration, E> {
            humantime::parse_duration(v.trim())
                .map_err(|e| E::custom(format!("invalid duration `{v}`: {e}")))
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<Duration, E> {
            if v == 0 {
                Ok(Duration::ZERO)
            } else {
                Err(E::custom(format!(
                    "duration {v} has no unit; write it as a string such as \"{v}s\""
                )))
            }
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<Duration, E> {
            self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
        }
    }
}

/// Serde helper for optional humane durations.
pub mod opt_dur {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => dur::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        d.deserialize_any(dur::DurVisitor).map(Some)
    }
}

/// Parses a humane duration for CLI flags.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("invalid duration `{s}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_auth_is_for_http_checks_and_user_password() {
        let text = |check: &str, auth: &str| {
            format!(
                "[[listener]]\nname = \"m\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n\
                 [listener.health]\ncheck = \"{check}\"\nauth = \"{auth}\"\n"
            )
        };
        let ok = Config::from_toml_str(&text("http", "guest:guest")).expect("valid");
        assert_eq!(ok.listeners[0].health.auth.as_deref(), Some("guest:guest"));
        for (check, auth, why) in [
            ("tcp", "guest:guest", "http checks only"),
            ("http", "guest", "user:password"),
            ("http", "a:b\\r\\nX: y", "control characters"),
        ] {
            let e = Config::from_toml_str(&text(check, auth))
                .expect_err(why)
                .to_string();
            assert!(e.contains("health.auth") && e.contains(why), "{e}");
        }
    }

    #[test]
    fn rates_parse() {
        assert_eq!(parse_rate("1/min").unwrap(), 1.0 / 60.0);
        assert_eq!(parse_rate("5/s").unwrap(), 5.0);
        assert_eq!(parse_rate("1/30s").unwrap(), 1.0 / 30.0);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0/min").is_err());
    }

    const FULL: &str = r#"
[admin]
listen = "127.0.0.1:9901"

[chaos]
seed = 42

[[listener]]
name = "amqp"
bind = "0.0.0.0:5672"
backends = ["10.0.0.11:5672", "10.0.0.12:5672", "rabbit3:5672"]
balance = "least-conn"
idle_timeout = "60s"
idle_close = "rst"
connect_timeout = "250ms"
drain_timeout = "5m"
max_connections = 100
proxy_protocol = "v2"

[listener.health]
check = "amqp"
interval = "30s"
timeout = "5s"
healthy_threshold = 3
unhealthy_threshold = 2

[[listener.fault]]
name = "elb-periodic"
kind = "reset"
every = "30s"
jitter = "1s"
style = "rst"

[[listener.fault]]
name = "pub"
kind = "reset"
on_amqp = "basic.publish"
nth = 3
direction = "upstream"
in_flight = "drop"

[[listener.fault]]
name = "slow"
kind = "bandwidth"
rate = 100
toxicity = 0.5

[[listener]]
name = "mgmt"
bind = "0.0.0.0:15672"
backends = ["10.0.0.11:15672"]
"#;

    #[test]
    fn full_example_parses_with_values() {
        let cfg = Config::from_toml_str(FULL).unwrap();
        assert_eq!(cfg.chaos.seed, Some(42));
        let l = &cfg.listeners[0];
        assert_eq!(l.balance, Balance::LeastConn);
        assert_eq!(l.idle_close, CloseStyle::Rst);
        assert_eq!(l.connect_timeout, Duration::from_millis(250));
        assert_eq!(l.drain_timeout, Duration::from_secs(300));
        assert_eq!(l.proxy_protocol, ProxyProtocol::V2);
        assert_eq!(l.health.check, HealthCheck::Amqp);
        assert_eq!(l.health.healthy_threshold, 3);
        assert_eq!(l.faults.len(), 3);
        assert_eq!(l.faults[0].every, Some(Duration::from_secs(30)));
        assert_eq!(l.faults[1].nth, Some(3));
        assert_eq!(l.faults[2].rate, Some(Rate::Number(100.0)));
        assert_eq!(l.faults[2].toxicity, 0.5);
        let m = &cfg.listeners[1];
        assert_eq!(m.idle_timeout, Duration::from_secs(60));
        assert_eq!(m.health, HealthConfig::default());
    }

    #[test]
    fn elb_defaults() {
        let h = HealthConfig::default();
        assert_eq!(h.interval, Duration::from_secs(30));
        assert_eq!(h.timeout, Duration::from_secs(5));
        assert_eq!(h.healthy_threshold, 10);
        assert_eq!(h.unhealthy_threshold, 2);
        let l = ListenerConfig::default();
        assert_eq!(l.idle_timeout, Duration::from_secs(60));
        assert_eq!(l.drain_timeout, Duration::from_secs(300));
    }

    fn err(text: &str) -> String {
        Config::from_toml_str(text).unwrap_err().to_string()
    }

    const MIN: &str =
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n";

    #[test]
    fn unknown_key_is_named() {
        let e = err(&format!("{MIN}bogus_key = 1\n"));
        assert!(e.contains("bogus_key"), "{e}");
        let e = err(&format!("{MIN}[listener.health]\nintervall = \"1s\"\n"));
        assert!(e.contains("intervall"), "{e}");
        let e = err("[admin]\nlisten = \"127.0.0.1:0\"\nport = 3\n");
        assert!(e.contains("port"), "{e}");
    }

    #[test]
    fn bad_duration_is_explained() {
        let e = err(&format!("{MIN}idle_timeout = \"sixty\"\n"));
        assert!(e.contains("invalid duration `sixty`"), "{e}");
        let e = err(&format!("{MIN}idle_timeout = 60\n"));
        assert!(e.contains("no unit"), "{e}");
    }

    #[test]
    fn idle_timeout_range() {
        let e = Config::from_toml_str(&format!("{MIN}idle_timeout = \"500ms\"\n")).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Invalid {
                source: ValidationError::IdleTimeout { .. },
                ..
            }
        ));
        assert!(Config::from_toml_str(&format!("{MIN}idle_timeout = \"2h\"\n")).is_err());
        assert!(Config::from_toml_str(&format!("{MIN}idle_timeout = \"1h\"\n")).is_ok());
    }

    #[test]
    fn absurd_durations_are_rejected_not_overflowed() {
        let e = err(&format!("{MIN}drain_timeout = \"1000000000years\"\n"));
        assert!(e.contains("drain_timeout must be at most 30 days"), "{e}");
        let e = err(&format!(
            "{MIN}[[listener.fault]]\nname = \"r\"\nkind = \"reset\"\nevery = \"100years\"\n"
        ));
        assert!(e.contains("at most 30 days"), "{e}");
    }

    #[test]
    fn duplicate_listener_names_rejected() {
        let e = Config::from_toml_str(&format!("{MIN}{MIN}")).unwrap_err();
        assert!(matches!(
            e,
            ConfigError::Invalid {
                source: ValidationError::DuplicateListener(ref n),
                ..
            } if n == "a"
        ));
    }

    #[test]
    fn empty_and_bad_backends_rejected() {
        let e = err("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = []\n");
        assert!(e.contains("no backends"), "{e}");
        let e =
            err("[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"nohost\"]\n");
        assert!(e.contains("not host:port"), "{e}");
        assert!(err("").contains("no [[listener]]"));
    }

    #[test]
    fn bad_enum_value_is_named() {
        let e = err(&format!("{MIN}balance = \"fastest\"\n"));
        assert!(e.contains("fastest"), "{e}");
    }

    #[test]
    fn single_listener_from_flags() {
        let cfg = Config::single_listener(
            &["127.0.0.1:0".parse().unwrap()],
            vec!["127.0.0.1:1".into()],
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(30)),
            None,
        )
        .unwrap();
        assert_eq!(cfg.listeners[0].idle_timeout, Duration::from_secs(5));
        assert_eq!(
            cfg.listeners[0].faults[0].every,
            Some(Duration::from_secs(30))
        );
        assert_eq!(cfg.listeners[0].name, "default");
        assert_eq!(cfg.listeners.len(), 1);
    }

    #[test]
    fn repeated_listen_flags_make_one_listener_per_address() {
        let binds: Vec<SocketAddr> = ["127.0.0.1:5670", "[::1]:5670", "127.0.0.2:0"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let cfg = Config::single_listener(
            &binds,
            vec!["127.0.0.1:5672".into()],
            Some(Duration::from_secs(5)),
            None,
            None,
        )
        .unwrap();
        let names: Vec<&str> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["default", "default-2", "default-3"]);
        for (l, b) in cfg.listeners.iter().zip(&binds) {
            assert_eq!(l.bind, *b);
            assert_eq!(l.backends, ["127.0.0.1:5672"]);
            assert_eq!(l.idle_timeout, Duration::from_secs(5));
        }
        let e = Config::single_listener(&[], vec!["127.0.0.1:1".into()], None, None, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[listener]]"), "{e}");
    }

    fn with_admin(admin: &str) -> String {
        format!("[admin]\n{admin}\n{MIN}")
    }

    #[test]
    fn admin_keys_parse_with_defaults() {
        let cfg = Config::from_toml_str(&with_admin("listen = \"127.0.0.1:9901\"")).unwrap();
        assert_eq!(
            cfg.admin,
            Some(AdminConfig::new("127.0.0.1:9901".parse().unwrap()))
        );
        let a = AdminConfig::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(a.request_timeout, Duration::from_secs(10));
        assert_eq!(a.max_connections, 256);
        let cfg = Config::from_toml_str(&with_admin(
            "listen = \"127.0.0.1:9901\"\ntoken_file = \"/etc/t\"\nrequest_timeout = \"2s\"\nmax_connections = 8",
        ))
        .unwrap();
        let a = cfg.admin.unwrap();
        assert_eq!(a.token_file, Some(PathBuf::from("/etc/t")));
        assert_eq!(a.request_timeout, Duration::from_secs(2));
        assert_eq!(a.max_connections, 8);
        let e = err(&with_admin(
            "listen = \"127.0.0.1:9901\"\nrequest_timeout = \"0s\"",
        ));
        assert!(e.contains("request_timeout"), "{e}");
        let e = err(&with_admin(
            "listen = \"127.0.0.1:9901\"\nmax_connections = 0",
        ));
        assert!(e.contains("max_connections"), "{e}");
    }

    #[test]
    fn an_admin_api_off_loopback_needs_a_token() {
        for listen in ["0.0.0.0:9901", "[::]:9901", "192.0.2.7:9901", "0.0.0.0:0"] {
            let e =
                Config::from_toml_str(&with_admin(&format!("listen = \"{listen}\""))).unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::Invalid {
                        source: ValidationError::AdminNeedsToken { .. },
                        ..
                    }
                ),
                "{listen}: {e}"
            );
            let text = e.to_string();
            assert!(
                text.contains("token_file") && text.contains("--admin-token-file"),
                "says how to fix it: {text}"
            );
            let with_token = format!("listen = \"{listen}\"\ntoken_file = \"t\"");
            assert!(Config::from_toml_str(&with_admin(&with_token)).is_ok());
        }
        for listen in ["127.0.0.1:9901", "127.0.0.2:0", "[::1]:9901"] {
            let cfg = with_admin(&format!("listen = \"{listen}\""));
            assert!(Config::from_toml_str(&cfg).is_ok(), "{listen}");
        }
    }

    #[test]
    fn the_token_file_is_trimmed_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("warren-lb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut a = AdminConfig::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(a.read_token(), Ok(None));
        let file = dir.join("tok");
        std::fs::write(&file, "\n  s3cret \r\n").unwrap();
        a.token_file = Some(file.clone());
        assert_eq!(a.read_token(), Ok(Some("s3cret".to_string())));
        std::fs::write(&file, " \n").unwrap();
        let e = a.read_token().unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("tok"), "{e}");
        a.token_file = Some(dir.join("missing"));
        let e = a.read_token().unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn backends_that_are_warren_lb_itself_are_refused() {
        let one = |bind: &str, backend: &str| {
            format!(
                "[admin]\nlisten = \"127.0.0.1:9901\"\n[[listener]]\nname = \"a\"\nbind = \"{bind}\"\nbackends = [\"{backend}\"]\n"
            )
        };
        for (bind, backend, what) in [
            ("127.0.0.1:5672", "127.0.0.1:5672", "own listener `a`"),
            ("0.0.0.0:5672", "127.0.0.1:5672", "own listener `a`"),
            ("0.0.0.0:5672", "127.0.0.53:5672", "own listener `a`"),
            ("[::]:5672", "[::1]:5672", "own listener `a`"),
            ("[::]:5672", "127.0.0.1:5672", "own listener `a`"),
            ("127.0.0.1:0", "127.0.0.1:9901", "own admin API"),
        ] {
            let e = err(&one(bind, backend));
            assert!(e.contains(what), "{bind} <- {backend}: {e}");
        }
        // Another listener of the same process.
        let two = format!(
            "{}[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:6000\"\nbackends = [\"127.0.0.1:1\"]\n",
            one("127.0.0.1:0", "127.0.0.1:6000")
        );
        assert!(err(&two).contains("own listener `b`"));
        // Not ours: other ports, and a remote host behind a wildcard bind (the seed topology).
        assert!(Config::from_toml_str(&one("127.0.0.1:5672", "127.0.0.1:5673")).is_ok());
        assert!(Config::from_toml_str(&one("0.0.0.0:5672", "192.0.2.11:5672")).is_ok());
        assert!(Config::from_toml_str(&one("127.0.0.1:0", "127.0.0.1:0")).is_err());
    }

    #[test]
    fn round_trips_through_toml() {
        let cfg = Config::from_toml_str(FULL).unwrap();
        let text = toml::to_string(&cfg).unwrap();
        assert_eq!(Config::from_toml_str(&text).unwrap(), cfg);
    }
}
