//! Toxiproxy's HTTP API in warren-lb's terms: its JSON (proxies, toxics, errors) mapped to and
//! from listeners and fault rules. Pure: bytes and values in, values out; the routes that use
//! it are in `toxiproxy_api`.
//!
//! A proxy is a listener with one backend: `name`, `listen` (the bound address), `upstream` (the
//! backend), `enabled` (running or stopped), `toxics` (its fault rules). A listener from the
//! configuration file with several backends shows its first one as `upstream`.
//!
//! | toxic `type` | fault rule `kind` | attributes (Toxiproxy's units) |
//! |---|---|---|
//! | `latency` | `latency` | `latency`, `jitter`: ms |
//! | `bandwidth` | `bandwidth` | `rate`: KB/s of 1000 bytes (warren-lb's `rate` counts 1024) |
//! | `slicer` | `slicer` | `average_size`, `size_variation`: bytes; `delay`: µs |
//! | `limit_data` | `limit_data` | `bytes` |
//! | `timeout` | `timeout` | `timeout`: ms, 0 = never close |
//! | `slow_close` | `slow_close` | `delay`: ms |
//! | `reset_peer` | `reset`, style `rst` | `timeout`: 0 = at the first data of the stream (`after_bytes = 0`), else ms after the connection opened (`lifetime`) |
//!
//! `stream` is the rule's `direction` (`upstream` client->backend, `downstream`, the default),
//! `toxicity` its `toxicity` (per connection, 0..1). Attributes are whole numbers as in
//! Toxiproxy (its attribute fields are integers); missing ones are 0 and unknown ones ignored,
//! as Toxiproxy's decoder does. A rule that has no Toxiproxy form (a periodic reset, an
//! `on_amqp` trigger, `direction = "both"`, a disabled rule...) is shown with its `kind` as
//! `type` and its own keys as attributes, and can only be removed through this API.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use hyper::header::{HeaderMap, CONTENT_TYPE, ORIGIN, USER_AGENT};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::chaos::plan::kind_str;
use crate::config::{
    CloseStyle, Direction, FaultKind, FaultRule, HealthConfig, InFlight, ListenerConfig, Rate, Side,
};

/// The toxic types warren-lb serves, in Toxiproxy's documentation order.
pub const TOXIC_TYPES: &[&str] = &[
    "latency",
    "bandwidth",
    "slow_close",
    "timeout",
    "reset_peer",
    "slicer",
    "limit_data",
];

/// Toxiproxy's KB (its bandwidth sleeps `len` ms per `rate` bytes: 1000 bytes a KB) in
/// warren-lb's KB (1024 bytes).
const KB_RATIO: f64 = 1000.0 / 1024.0;

/// A Toxiproxy error: the body is `{"error": message, "status": status}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

// === impl ApiError ===

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 400 `bad request body: ...`, Toxiproxy's answer to a body it cannot decode.
    pub fn bad_body(detail: impl std::fmt::Display) -> Self {
        Self::new(400, format!("bad request body: {detail}"))
    }

    pub fn missing_field(field: &str) -> Self {
        Self::new(400, format!("missing required field: {field}"))
    }

    pub fn proxy_not_found() -> Self {
        Self::new(404, "proxy not found")
    }

    pub fn proxy_exists() -> Self {
        Self::new(409, "proxy already exists")
    }

    pub fn invalid_stream() -> Self {
        Self::new(
            400,
            "stream was invalid, can be either upstream or downstream",
        )
    }

    pub fn invalid_type(t: &str) -> Self {
        Self::new(
            400,
            format!(
                "invalid toxic type: `{}` (warren-lb serves {})",
                crate::backend::addr::shown(t),
                TOXIC_TYPES.join(", ")
            ),
        )
    }

    pub fn toxic_exists() -> Self {
        Self::new(409, "toxic already exists")
    }

    pub fn toxic_not_found() -> Self {
        Self::new(404, "toxic not found")
    }

    pub fn to_json(&self) -> Value {
        json!({ "error": self.message, "status": self.status })
    }
}

// ---------------------------------------------------------------- proxies

/// A proxy as sent to `POST /proxies`, `POST /proxies/{name}` and in `/populate`'s list. Keys
/// not listed here are ignored (the Go client sends `toxics` back when it saves a proxy).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct ProxyInput {
    pub name: Option<String>,
    pub listen: Option<String>,
    pub upstream: Option<String>,
    pub enabled: Option<bool>,
}

/// One proxy object.
pub fn parse_proxy(body: &[u8]) -> Result<ProxyInput, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::bad_body)
}

/// A new proxy: its name and upstream, required and not empty.
pub fn parse_new_proxy(body: &[u8]) -> Result<ProxyInput, ApiError> {
    let p = parse_proxy(body)?;
    if p.name.as_deref().unwrap_or("").is_empty() {
        return Err(ApiError::missing_field("name"));
    }
    if p.upstream.as_deref().unwrap_or("").is_empty() {
        return Err(ApiError::missing_field("upstream"));
    }
    Ok(p)
}

/// `/populate`'s list; every proxy needs a name and an upstream (checked before any is made).
pub fn parse_populate(body: &[u8]) -> Result<Vec<ProxyInput>, ApiError> {
    let list: Vec<ProxyInput> = serde_json::from_slice(body).map_err(ApiError::bad_body)?;
    for (i, p) in list.iter().enumerate() {
        if p.name.as_deref().unwrap_or("").is_empty() {
            return Err(ApiError::missing_field(&format!("name at proxy {}", i + 1)));
        }
        if p.upstream.as_deref().unwrap_or("").is_empty() {
            return Err(ApiError::missing_field(&format!(
                "upstream at proxy {}",
                i + 1
            )));
        }
    }
    Ok(list)
}

/// A proxy's `listen`, parsed: an address, or a host name to resolve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Addr(SocketAddr),
    Name(String, u16),
}

/// `listen` as Toxiproxy's `net.Listen` reads it: `ip:port`, `[ipv6]:port`, `host:port`,
/// `:port` (every IPv4 interface). An empty `listen` is `127.0.0.1:0` (Toxiproxy listens on every
/// interface then; a proxy reachable from elsewhere should be asked for).
pub fn parse_listen(s: &str) -> Result<Listen, ApiError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(Listen::Addr(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(Listen::Addr(a));
    }
    let bad = || {
        ApiError::bad_body(format!(
            "listen `{}` is not host:port",
            crate::backend::addr::shown(s)
        ))
    };
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    match host {
        "" => Ok(Listen::Addr(SocketAddr::from((
            Ipv4Addr::UNSPECIFIED,
            port,
        )))),
        "localhost" => Ok(Listen::Addr(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))),
        h if h.len() <= 253
            && h.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            }) =>
        {
            Ok(Listen::Name(h.to_string(), port))
        }
        _ => Err(bad()),
    }
}

/// The listener a new proxy is: one backend, and settings that behave as Toxiproxy's proxies
/// do where warren-lb's defaults are an ELB's: the longest idle timeout (Toxiproxy has none),
/// no drain (a deleted or disabled proxy closes its connections at once), health checks once in
/// 30 days (one backend: there is no choice for them to make, and Toxiproxy opens no connection
/// of its own to the upstream).
pub fn proxy_listener(
    name: &str,
    bind: SocketAddr,
    upstream: &str,
    faults: Vec<FaultRule>,
) -> ListenerConfig {
    ListenerConfig {
        name: name.to_string(),
        bind,
        backends: vec![upstream.to_string()],
        idle_timeout: Duration::from_secs(3600),
        drain_timeout: Duration::ZERO,
        health: HealthConfig {
            interval: Duration::from_secs(30 * 24 * 3600),
            ..HealthConfig::default()
        },
        faults,
        ..ListenerConfig::default()
    }
}

/// A proxy's JSON: `{name, listen, upstream, enabled, toxics}`.
pub fn proxy_json(
    name: &str,
    listen: SocketAddr,
    backends: &[String],
    enabled: bool,
    faults: &[FaultRule],
) -> Value {
    json!({
        "name": name,
        "listen": listen.to_string(),
        "upstream": backends.first().map(String::as_str).unwrap_or(""),
        "enabled": enabled,
        "toxics": faults.iter().map(toxic_json).collect::<Vec<_>>(),
    })
}

// ---------------------------------------------------------------- toxics

/// A toxic as sent to `POST /proxies/{name}/toxics`. Unknown keys are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ToxicInput {
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    stream: Option<String>,
    toxicity: Option<f64>,
    attributes: Option<Map<String, Value>>,
}

/// A toxic update (`POST`/`PATCH /proxies/{name}/toxics/{toxic}`): attributes merged into the
/// toxic's, and its toxicity. Type, stream and name do not change.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ToxicUpdate {
    toxicity: Option<f64>,
    attributes: Option<Map<String, Value>>,
}

/// The fault rule of a new toxic, checked in Toxiproxy's order: the body decodes, the stream is
/// valid, the type is known, the name (default `{type}_{stream}`) is free among `existing`, the
/// attributes make sense.
pub fn new_toxic(body: &[u8], existing: &[FaultRule]) -> Result<FaultRule, ApiError> {
    let t: ToxicInput = serde_json::from_slice(body).map_err(ApiError::bad_body)?;
    let stream = t.stream.unwrap_or_else(|| "downstream".to_string());
    let direction = parse_stream(&stream)?;
    let kind = t.kind.unwrap_or_default();
    let name = match t.name {
        Some(n) if !n.is_empty() => n,
        _ => format!("{kind}_{stream}"),
    };
    if !TOXIC_TYPES.contains(&kind.as_str()) {
        return Err(ApiError::invalid_type(&kind));
    }
    if existing.iter().any(|r| r.name == name) {
        return Err(ApiError::toxic_exists());
    }
    check_toxic_name(&name)?;
    let attrs = t.attributes.unwrap_or_default();
    rule_of(&name, &kind, direction, t.toxicity.unwrap_or(1.0), &attrs)
}

/// `rule` with the update in `body` applied. A rule without a Toxiproxy form cannot be updated
/// here (400 naming the admin API route that can).
pub fn update_toxic(rule: &FaultRule, body: &[u8]) -> Result<FaultRule, ApiError> {
    let u: ToxicUpdate = serde_json::from_slice(body).map_err(ApiError::bad_body)?;
    let Some((kind, mut attrs)) = toxic_form(rule) else {
        return Err(ApiError::new(
            400,
            format!(
                "toxic `{}` is a warren-lb fault rule of kind `{}` with no Toxiproxy form; \
                 change it with PUT /listeners/{{name}}/faults",
                rule.name,
                kind_str(rule.kind)
            ),
        ));
    };
    for (k, v) in u.attributes.unwrap_or_default() {
        attrs.insert(k, v);
    }
    rule_of(
        &rule.name,
        kind,
        rule.direction,
        u.toxicity.unwrap_or(rule.toxicity),
        &attrs,
    )
}

/// A toxic's JSON: `{name, type, stream, toxicity, attributes}`.
pub fn toxic_json(rule: &FaultRule) -> Value {
    let (kind, attributes) = match toxic_form(rule) {
        Some((kind, attrs)) => (kind.to_string(), attrs),
        None => (kind_str(rule.kind).to_string(), own_keys(rule)),
    };
    let stream = match rule.direction {
        Direction::Upstream => "upstream",
        Direction::Downstream => "downstream",
        Direction::Both => "both",
    };
    json!({
        "name": rule.name,
        "type": kind,
        "stream": stream,
        "toxicity": rule.toxicity,
        "attributes": attributes,
    })
}

fn parse_stream(s: &str) -> Result<Direction, ApiError> {
    match s.to_ascii_lowercase().as_str() {
        "upstream" => Ok(Direction::Upstream),
        "downstream" => Ok(Direction::Downstream),
        _ => Err(ApiError::invalid_stream()),
    }
}

fn check_toxic_name(name: &str) -> Result<(), ApiError> {
    if name.chars().count() > crate::listener_set::MAX_NAME_LEN
        || name.chars().any(char::is_control)
    {
        return Err(ApiError::bad_body(format!(
            "toxic names are at most {} characters, without control characters",
            crate::listener_set::MAX_NAME_LEN
        )));
    }
    Ok(())
}

/// Attribute `key`: a whole number >= 0; missing or null is 0.
fn attr(attrs: &Map<String, Value>, key: &str) -> Result<u64, ApiError> {
    match attrs.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| {
            ApiError::bad_body(format!(
                "attributes.{key} must be a whole number >= 0, not {}",
                crate::backend::addr::shown(&v.to_string())
            ))
        }),
    }
}

fn ms(attrs: &Map<String, Value>, key: &str) -> Result<Duration, ApiError> {
    attr(attrs, key).map(Duration::from_millis)
}

/// A rule of `kind` with nothing else set (`FaultRule` has no `Default`: `kind` has none).
fn blank_rule(name: &str, kind: FaultKind, direction: Direction, toxicity: f64) -> FaultRule {
    FaultRule {
        name: name.to_string(),
        kind,
        direction,
        toxicity,
        enabled: true,
        every: None,
        style: None,
        ..FaultRule::reset_every(Duration::ZERO)
    }
}

/// The fault rule of a Toxiproxy toxic; checks what the rule needs.
fn rule_of(
    name: &str,
    kind: &str,
    direction: Direction,
    toxicity: f64,
    attrs: &Map<String, Value>,
) -> Result<FaultRule, ApiError> {
    if !(0.0..=1.0).contains(&toxicity) {
        return Err(ApiError::bad_body("toxicity must be within 0..1"));
    }
    let rule = |k| blank_rule(name, k, direction, toxicity);
    let r = match kind {
        "latency" => FaultRule {
            latency: Some(ms(attrs, "latency")?),
            jitter: Some(ms(attrs, "jitter")?).filter(|j| !j.is_zero()),
            ..rule(FaultKind::Latency)
        },
        "bandwidth" => {
            let rate = attr(attrs, "rate")?;
            if rate == 0 {
                return Err(ApiError::bad_body(
                    "attributes.rate must be greater than 0 (a rate of 0 stops the data in \
                     Toxiproxy; a timeout toxic with timeout 0 does that)",
                ));
            }
            FaultRule {
                rate: Some(Rate::Number(rate as f64 * KB_RATIO)),
                ..rule(FaultKind::Bandwidth)
            }
        }
        "slicer" => {
            let average = attr(attrs, "average_size")?;
            if average == 0 {
                return Err(ApiError::bad_body(
                    "attributes.average_size must be greater than 0",
                ));
            }
            FaultRule {
                average_size: Some(average),
                size_variation: Some(attr(attrs, "size_variation")?),
                delay: Some(Duration::from_micros(attr(attrs, "delay")?)),
                ..rule(FaultKind::Slicer)
            }
        }
        "limit_data" => FaultRule {
            bytes: Some(attr(attrs, "bytes")?),
            ..rule(FaultKind::LimitData)
        },
        "timeout" => FaultRule {
            timeout: Some(ms(attrs, "timeout")?),
            ..rule(FaultKind::Timeout)
        },
        "slow_close" => FaultRule {
            delay: Some(ms(attrs, "delay")?),
            ..rule(FaultKind::SlowClose)
        },
        "reset_peer" => {
            let after = ms(attrs, "timeout")?;
            let base = FaultRule {
                style: Some(CloseStyle::Rst),
                ..rule(FaultKind::Reset)
            };
            if after.is_zero() {
                FaultRule {
                    after_bytes: Some(0),
                    ..base
                }
            } else {
                FaultRule {
                    lifetime: Some(after),
                    ..base
                }
            }
        }
        other => return Err(ApiError::invalid_type(other)),
    };
    r.check().map_err(ApiError::bad_body)?;
    if [r.latency, r.jitter, r.delay, r.timeout, r.lifetime]
        .iter()
        .flatten()
        .any(|d| *d > Duration::from_secs(30 * 24 * 3600))
    {
        return Err(ApiError::bad_body("durations must be at most 30 days"));
    }
    Ok(r)
}

/// The Toxiproxy type and attributes of `rule`, if it has that form: enabled, one stream, and
/// only the keys the type's mapping sets.
fn toxic_form(rule: &FaultRule) -> Option<(&'static str, Map<String, Value>)> {
    if !rule.enabled || rule.direction == Direction::Both {
        return None;
    }
    let keys = own_keys(rule);
    let only = |allowed: &[&str]| keys.keys().all(|k| allowed.contains(&k.as_str()));
    let millis =
        |d: Option<Duration>| u64::try_from(d.unwrap_or_default().as_millis()).unwrap_or(u64::MAX);
    let mut attrs = Map::new();
    let mut put = |k: &str, v: u64| {
        attrs.insert(k.to_string(), Value::from(v));
    };
    let kind = match rule.kind {
        FaultKind::Latency if only(&["latency", "jitter"]) => {
            put("latency", millis(rule.latency));
            put("jitter", millis(rule.jitter));
            "latency"
        }
        FaultKind::Bandwidth if only(&["rate"]) => {
            let Some(Rate::Number(kb)) = rule.rate else {
                return None;
            };
            put("rate", (kb / KB_RATIO).round() as u64);
            "bandwidth"
        }
        FaultKind::Slicer if only(&["average_size", "size_variation", "delay"]) => {
            put("average_size", rule.average_size.unwrap_or(0));
            put("size_variation", rule.size_variation.unwrap_or(0));
            let micros = rule.delay.unwrap_or_default().as_micros();
            put("delay", u64::try_from(micros).unwrap_or(u64::MAX));
            "slicer"
        }
        FaultKind::LimitData if only(&["bytes"]) => {
            put("bytes", rule.bytes.unwrap_or(0));
            "limit_data"
        }
        FaultKind::Timeout if only(&["timeout"]) => {
            put("timeout", millis(rule.timeout));
            "timeout"
        }
        FaultKind::SlowClose if only(&["delay"]) => {
            put("delay", millis(rule.delay));
            "slow_close"
        }
        FaultKind::Reset
            if only(&["after_bytes", "lifetime", "style", "side", "in_flight"])
                && matches!(rule.style, None | Some(CloseStyle::Rst))
                && matches!(rule.side, None | Some(Side::Both))
                && matches!(rule.in_flight, None | Some(InFlight::Drop)) =>
        {
            match (rule.after_bytes, rule.lifetime) {
                (Some(0), None) => put("timeout", 0),
                (None, Some(l)) if !l.is_zero() => put("timeout", millis(Some(l))),
                _ => return None,
            }
            "reset_peer"
        }
        _ => return None,
    };
    Some((kind, attrs))
}

/// The keys of `rule` other than those every rule has (`name`, `kind`, `direction`,
/// `toxicity`, `enabled`, all shown in a toxic's own fields), as the admin API writes them.
/// `enabled` stays when false: a disabled rule says so.
fn own_keys(rule: &FaultRule) -> Map<String, Value> {
    let mut m = match serde_json::to_value(rule) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    };
    for k in ["name", "kind", "direction", "toxicity"] {
        m.remove(k);
    }
    if rule.enabled {
        m.remove("enabled");
    }
    m
}

/// The first path segments Toxiproxy's API owns.
pub const PATHS: &[&str] = &["proxies", "reset", "version", "populate"];

/// True for a request to Toxiproxy's API whose body may skip the admin API's
/// `Content-Type: application/json` rule: the Java client (toxiproxy-java, which Testcontainers
/// uses) sends its JSON with HttpURLConnection's default type,
/// `application/x-www-form-urlencoded`. The rule is there against browsers (a page can send a
/// form-typed body without a CORS preflight), so the exception holds only where nothing says a
/// browser sent the request: no `Origin`, no `Sec-Fetch-*`, and a `User-Agent` that is not a
/// browser's (every browser's starts with `Mozilla/`, and a page cannot set another without a
/// preflight, which the admin API never grants). The body must still be a JSON object or
/// list, which a browser form cannot encode that way.
pub fn form_typed_json_allowed(path: &str, headers: &HeaderMap) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let form = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            t.trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        });
    let browser_ua = match headers.get(USER_AGENT).map(|v| v.as_bytes()) {
        None => true,
        Some(ua) => ua.len() < 8 || ua[..8].eq_ignore_ascii_case(b"mozilla/"),
    };
    let fetch_metadata = headers.keys().any(|k| k.as_str().starts_with("sec-fetch-"));
    PATHS.contains(&first)
        && form
        && !browser_ua
        && !fetch_metadata
        && !headers.contains_key(ORIGIN)
}

/// A free run-time address for `listen` never given: `127.0.0.1:0`.
pub fn default_listen() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toxic(body: Value) -> Result<FaultRule, ApiError> {
        new_toxic(body.to_string().as_bytes(), &[])
    }

    fn round_trip(body: Value) -> Value {
        toxic_json(&toxic(body).unwrap())
    }

    #[test]
    fn every_type_maps_to_its_rule_and_back() {
        let r = toxic(json!({"type": "latency", "attributes": {"latency": 250, "jitter": 20}}))
            .unwrap();
        assert_eq!(r.kind, FaultKind::Latency);
        assert_eq!(r.name, "latency_downstream");
        assert_eq!(r.direction, Direction::Downstream);
        assert_eq!(r.toxicity, 1.0);
        assert_eq!(r.latency, Some(Duration::from_millis(250)));
        assert_eq!(r.jitter, Some(Duration::from_millis(20)));
        assert_eq!(
            toxic_json(&r),
            json!({"name": "latency_downstream", "type": "latency", "stream": "downstream",
                   "toxicity": 1.0, "attributes": {"latency": 250, "jitter": 20}})
        );
        for (t, attrs) in [
            ("latency", json!({"latency": 0, "jitter": 0})),
            ("bandwidth", json!({"rate": 100})),
            ("bandwidth", json!({"rate": 1})),
            (
                "slicer",
                json!({"average_size": 64, "size_variation": 8, "delay": 1500}),
            ),
            ("limit_data", json!({"bytes": 1000})),
            ("timeout", json!({"timeout": 0})),
            ("timeout", json!({"timeout": 500})),
            ("slow_close", json!({"delay": 300})),
            ("reset_peer", json!({"timeout": 0})),
            ("reset_peer", json!({"timeout": 1200})),
        ] {
            let v = round_trip(json!({"name": "x", "type": t, "stream": "upstream",
                                      "toxicity": 0.5, "attributes": attrs}));
            assert_eq!(
                v,
                json!({"name": "x", "type": t, "stream": "upstream", "toxicity": 0.5,
                       "attributes": attrs}),
                "{t}"
            );
        }
    }

    #[test]
    fn units_are_toxiproxys() {
        let r = toxic(json!({"type": "bandwidth", "attributes": {"rate": 1024}})).unwrap();
        // 1024 Toxiproxy KB/s = 1,024,000 bytes/s = 1000 warren-lb KB/s.
        assert_eq!(r.rate, Some(Rate::Number(1000.0)));
        let r = toxic(json!({"type": "slicer", "attributes": {"average_size": 10, "delay": 250}}))
            .unwrap();
        assert_eq!(r.delay, Some(Duration::from_micros(250)));
        assert_eq!(r.size_variation, Some(0));
        let r = toxic(json!({"type": "slow_close", "attributes": {"delay": 250}})).unwrap();
        assert_eq!(r.delay, Some(Duration::from_millis(250)));
        let r = toxic(json!({"type": "reset_peer", "stream": "upstream"})).unwrap();
        assert_eq!(
            (r.kind, r.after_bytes, r.lifetime, r.style),
            (FaultKind::Reset, Some(0), None, Some(CloseStyle::Rst))
        );
        assert_eq!(r.direction, Direction::Upstream);
        let r = toxic(json!({"type": "reset_peer", "attributes": {"timeout": 50}})).unwrap();
        assert_eq!(
            (r.after_bytes, r.lifetime),
            (None, Some(Duration::from_millis(50)))
        );
        // Missing attributes are 0, unknown ones ignored (Toxiproxy's decoder).
        let r = toxic(json!({"type": "timeout", "attributes": {"bogus": "x"}})).unwrap();
        assert_eq!(r.timeout, Some(Duration::ZERO));
    }

    #[test]
    fn toxiproxy_error_shapes() {
        let e = |body: &str| new_toxic(body.as_bytes(), &[]).unwrap_err();
        assert_eq!(e("{").status, 400);
        assert!(e("{").message.starts_with("bad request body: "));
        assert_eq!(e(""), e(""));
        assert_eq!(
            e(r#"{"type": "latency", "stream": "sideways"}"#),
            ApiError::invalid_stream()
        );
        let bad = e(r#"{"type": "noop"}"#);
        assert_eq!(bad.status, 400);
        assert!(bad.message.starts_with("invalid toxic type"), "{bad:?}");
        assert!(bad.message.contains("reset_peer"), "{bad:?}");
        assert_eq!(e("{}").status, 400);
        for attrs in [
            r#"{"latency": -1}"#,
            r#"{"latency": 1.5}"#,
            r#"{"latency": "100"}"#,
        ] {
            let x = e(&format!(r#"{{"type": "latency", "attributes": {attrs}}}"#));
            assert_eq!(x.status, 400, "{attrs}");
            assert!(x.message.contains("attributes.latency"), "{x:?}");
        }
        assert_eq!(e(r#"{"type": "latency", "attributes": []}"#).status, 400);
        assert_eq!(e(r#"{"type": "bandwidth"}"#).status, 400);
        assert_eq!(e(r#"{"type": "slicer"}"#).status, 400);
        assert_eq!(e(r#"{"type": "latency", "toxicity": 1.5}"#).status, 400);
        assert_eq!(
            e(r#"{"type": "latency", "attributes": {"latency": 99999999999999}}"#).status,
            400
        );
        let taken = toxic(json!({"type": "latency"})).unwrap();
        assert_eq!(
            new_toxic(br#"{"type": "latency"}"#, &[taken]).unwrap_err(),
            ApiError::toxic_exists()
        );
        assert_eq!(
            ApiError::proxy_not_found().to_json(),
            json!({"error": "proxy not found", "status": 404})
        );
        assert_eq!(ApiError::proxy_exists().status, 409);
    }

    #[test]
    fn stream_is_case_insensitive_and_names_default_to_type_and_stream() {
        let r = toxic(json!({"type": "latency", "stream": "UpStream"})).unwrap();
        assert_eq!(r.direction, Direction::Upstream);
        assert_eq!(r.name, "latency_UpStream");
        let r = toxic(json!({"type": "latency", "name": ""})).unwrap();
        assert_eq!(r.name, "latency_downstream");
    }

    #[test]
    fn updates_merge_attributes_and_keep_toxicity() {
        let r = toxic(json!({"type": "latency", "toxicity": 0.25,
                             "attributes": {"latency": 100, "jitter": 5}}))
        .unwrap();
        let u = update_toxic(&r, br#"{"attributes": {"latency": 300}}"#).unwrap();
        assert_eq!(u.latency, Some(Duration::from_millis(300)));
        assert_eq!(u.jitter, Some(Duration::from_millis(5)));
        assert_eq!(u.toxicity, 0.25);
        assert_eq!(u.name, r.name);
        let u = update_toxic(&r, br#"{"toxicity": 1}"#).unwrap();
        assert_eq!((u.toxicity, u.latency), (1.0, r.latency));
        assert_eq!(update_toxic(&r, b"[").unwrap_err().status, 400);
    }

    #[test]
    fn rules_without_a_toxiproxy_form_show_as_themselves() {
        let every: FaultRule =
            toml::from_str("name='elb'\nkind='reset'\nevery='30s'\nstyle='rst'").unwrap();
        let v = toxic_json(&every);
        assert_eq!(v["type"], "reset");
        assert_eq!(v["stream"], "both");
        assert_eq!(v["attributes"], json!({"every": "30s", "style": "rst"}));
        assert_eq!(update_toxic(&every, b"{}").unwrap_err().status, 400);
        let mut off = toxic(json!({"type": "latency", "attributes": {"latency": 5}})).unwrap();
        off.enabled = false;
        let v = toxic_json(&off);
        assert_eq!(v["attributes"]["enabled"], false);
        // A configured bandwidth in warren-lb's KB/s shows in Toxiproxy's, rounded.
        let bw: FaultRule =
            toml::from_str("name='b'\nkind='bandwidth'\nrate=100\ndirection='upstream'").unwrap();
        assert_eq!(toxic_json(&bw)["attributes"], json!({"rate": 102}));
        let refuse: FaultRule = toml::from_str("name='r'\nkind='refuse'").unwrap();
        assert_eq!(toxic_json(&refuse)["type"], "refuse");
    }

    #[test]
    fn proxies_parse_as_toxiproxy_reads_them() {
        let p = parse_new_proxy(
            br#"{"name": "redis", "listen": "127.0.0.1:0", "upstream": "127.0.0.1:6379",
                 "toxics": [], "extra": 1}"#,
        )
        .unwrap();
        assert_eq!(p.name.as_deref(), Some("redis"));
        assert_eq!(p.enabled, None);
        assert_eq!(
            parse_new_proxy(br#"{"upstream": "a:1"}"#).unwrap_err(),
            ApiError::missing_field("name")
        );
        assert_eq!(
            parse_new_proxy(br#"{"name": "a", "upstream": ""}"#).unwrap_err(),
            ApiError::missing_field("upstream")
        );
        assert_eq!(parse_new_proxy(b"nope").unwrap_err().status, 400);
        assert_eq!(
            parse_populate(br#"[{"name": "a", "upstream": "b:1"}, {"name": "c"}]"#).unwrap_err(),
            ApiError::missing_field("upstream at proxy 2")
        );
        assert_eq!(parse_populate(b"{}").unwrap_err().status, 400);
    }

    #[test]
    fn listen_addresses_parse_as_net_listen_reads_them() {
        let a = |s: &str| match parse_listen(s).unwrap() {
            Listen::Addr(a) => a.to_string(),
            Listen::Name(h, p) => format!("name {h} {p}"),
        };
        assert_eq!(a("127.0.0.1:0"), "127.0.0.1:0");
        assert_eq!(a("[::1]:8080"), "[::1]:8080");
        assert_eq!(a(":26379"), "0.0.0.0:26379");
        assert_eq!(a("localhost:1"), "127.0.0.1:1");
        assert_eq!(a(""), "127.0.0.1:0");
        assert_eq!(a("toxiproxy.internal:80"), "name toxiproxy.internal 80");
        for bad in ["127.0.0.1", "a:b", "a b:1", "host:70000", "::1:1:"] {
            assert_eq!(parse_listen(bad).unwrap_err().status, 400, "{bad}");
        }
    }

    #[test]
    fn form_typed_json_only_from_what_is_not_a_browser() {
        let h = |pairs: &[(&'static str, &str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.append(*k, v.parse().unwrap());
            }
            m
        };
        let form = ("content-type", "application/x-www-form-urlencoded");
        let java = ("user-agent", "Java/17.0.9");
        assert!(form_typed_json_allowed("/proxies", &h(&[form, java])));
        assert!(form_typed_json_allowed(
            "/proxies/a/toxics/b",
            &h(&[form, java])
        ));
        assert!(form_typed_json_allowed("/populate", &h(&[form, java])));
        // Not Toxiproxy's API, not a form type, a browser, or no user agent at all.
        assert!(!form_typed_json_allowed(
            "/listeners/a/faults",
            &h(&[form, java])
        ));
        for ct in ["text/plain", "multipart/form-data; boundary=x"] {
            assert!(!form_typed_json_allowed(
                "/proxies",
                &h(&[("content-type", ct), java])
            ));
        }
        assert!(!form_typed_json_allowed("/proxies", &h(&[java])));
        let firefox = (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Firefox/128.0",
        );
        assert!(!form_typed_json_allowed("/proxies", &h(&[form, firefox])));
        assert!(!form_typed_json_allowed("/proxies", &h(&[form])));
        assert!(!form_typed_json_allowed(
            "/proxies",
            &h(&[form, ("user-agent", "x")])
        ));
        for browserish in [
            ("origin", "http://127.0.0.1:1"),
            ("sec-fetch-mode", "no-cors"),
        ] {
            assert!(!form_typed_json_allowed(
                "/proxies",
                &h(&[form, java, browserish])
            ));
        }
    }

    #[test]
    fn a_proxy_is_a_listener_with_one_backend() {
        let cfg = proxy_listener("p", default_listen(), "127.0.0.1:9", vec![]);
        cfg.validate().unwrap();
        assert_eq!(cfg.backends, ["127.0.0.1:9"]);
        let v = proxy_json(
            "p",
            "127.0.0.1:4000".parse().unwrap(),
            &cfg.backends,
            true,
            &[],
        );
        assert_eq!(
            v,
            json!({"name": "p", "listen": "127.0.0.1:4000", "upstream": "127.0.0.1:9",
                   "enabled": true, "toxics": []})
        );
    }
}
