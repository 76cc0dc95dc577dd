//! RabbitMQ's definitions JSON (as `rabbitmqctl export_definitions` and
//! `GET /api/definitions` write it in 3.10), and the pure mapping between it and warren's types.
//! No I/O here: parsing, validation and AMQP field table <-> JSON conversion only.

use super::import::ImportMode;
use crate::auth::{HashAlgorithm, PasswordHash, PermissionSpec};
use crate::exchange::ExchangeKind;
use crate::policy::{ApplyTo, Policy, PolicyKind};
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Number, Value};

/// A whole definitions document. Unknown fields are ignored (newer RabbitMQ versions add some);
/// missing sections are empty.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Definitions {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbit_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rabbitmq_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_version: Option<String>,
    #[serde(default)]
    pub users: Vec<UserDef>,
    #[serde(default)]
    pub vhosts: Vec<VhostDef>,
    #[serde(default)]
    pub permissions: Vec<PermissionDef>,
    #[serde(default)]
    pub topic_permissions: Vec<Value>,
    #[serde(default)]
    pub parameters: Vec<Value>,
    #[serde(default)]
    pub global_parameters: Vec<Value>,
    #[serde(default)]
    pub policies: Vec<PolicyDef>,
    /// Operator policies (RabbitMQ keeps them as runtime parameters and does not export them;
    /// warren persists them here, a key RabbitMQ's import ignores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operator_policies: Vec<PolicyDef>,
    #[serde(default)]
    pub queues: Vec<QueueDef>,
    #[serde(default)]
    pub exchanges: Vec<ExchangeDef>,
    #[serde(default)]
    pub bindings: Vec<BindingDef>,
}

// === vhost limits ===

/// The runtime-parameter component RabbitMQ keeps a vhost's limits under (with the name
/// [`LIMITS_NAME`]); its definitions export lists them in `parameters`, as warren does.
pub const LIMITS_COMPONENT: &str = "vhost-limits";
pub const LIMITS_NAME: &str = "limits";
/// The limits RabbitMQ 3.10 knows for a vhost.
pub const LIMIT_NAMES: &[&str] = &["max-connections", "max-queues"];

/// A vhost's limits by name (a negative value is no limit).
pub type Limits = std::collections::BTreeMap<String, i64>;

/// RabbitMQ's text for a value that is not a number (its validation of one limit).
pub fn limit_not_a_number(name: &str, v: &Value) -> String {
    format!("Validation failed\n\n{name} should be a number, actually was {v}\n")
}

/// RabbitMQ's text for an unknown limit.
pub fn unknown_limit(name: &str, v: &Value) -> String {
    format!("Validation failed\n\nUnrecognised terms [{{<<\"{name}\">>,{v}}}] in limits\n")
}

/// Checks a limits object (`{"max-connections": 10, ...}`) as RabbitMQ validates the
/// `vhost-limits` parameter: known names, integer values.
pub fn limits_of(value: &Value) -> Result<Limits, String> {
    let Value::Object(m) = value else {
        return Err(format!("vhost limits must be an object, got {value}"));
    };
    let mut out = Limits::new();
    for (k, v) in m {
        let n = v.as_i64().ok_or_else(|| limit_not_a_number(k, v))?;
        if !LIMIT_NAMES.contains(&k.as_str()) {
            return Err(unknown_limit(k, v));
        }
        out.insert(k.clone(), n);
    }
    Ok(out)
}

/// The `parameters` entry of a vhost's limits.
pub fn limits_parameter(vhost: &str, limits: &Limits) -> Value {
    let value: Map<String, Value> = limits
        .iter()
        .map(|(k, n)| (k.clone(), Value::from(*n)))
        .collect();
    serde_json::json!({
        "value": value,
        "vhost": vhost,
        "component": LIMITS_COMPONENT,
        "name": LIMITS_NAME,
    })
}

/// A `parameters` entry read as vhost limits: Ok(None) for another component (warren has no
/// other runtime parameters), an error for a `vhost-limits` entry RabbitMQ would refuse.
pub fn limits_from_parameter(p: &Value) -> Result<Option<(String, Limits)>, String> {
    if p.get("component").and_then(Value::as_str) != Some(LIMITS_COMPONENT) {
        return Ok(None);
    }
    let vhost = p
        .get("vhost")
        .and_then(Value::as_str)
        .ok_or("a vhost-limits parameter needs a vhost")?;
    match p.get("name").and_then(Value::as_str) {
        Some(LIMITS_NAME) => {}
        other => {
            return Err(format!(
                "a vhost-limits parameter is named '{LIMITS_NAME}', not {other:?}"
            ))
        }
    }
    let limits = limits_of(p.get("value").unwrap_or(&Value::Null))?;
    Ok(Some((vhost.to_owned(), limits)))
}

/// `tags`: RabbitMQ 3.10 writes a list, older versions a comma-separated string; both accepted.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Tags(pub Vec<String>);

impl<'de> Deserialize<'de> for Tags {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            List(Vec<String>),
            Null(()),
        }
        Ok(Tags(match Raw::deserialize(d)? {
            Raw::Text(s) => split_tags(&s),
            Raw::List(v) => v.into_iter().filter(|t| !t.is_empty()).collect(),
            Raw::Null(()) => Vec::new(),
        }))
    }
}

/// "a, b,c" -> ["a", "b", "c"].
pub fn split_tags(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

fn default_hashing() -> String {
    HashAlgorithm::SHA256.to_owned()
}
fn default_true() -> bool {
    true
}
fn default_apply_to() -> String {
    "all".to_owned()
}
fn default_match_all() -> String {
    ".*".to_owned()
}
fn empty_object() -> Value {
    Value::Object(Map::new())
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserDef {
    pub name: String,
    #[serde(default)]
    pub password_hash: String,
    #[serde(default = "default_hashing")]
    pub hashing_algorithm: String,
    /// A clear-text password (accepted on import, as RabbitMQ does; never exported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    #[serde(default)]
    pub tags: Tags,
    #[serde(default = "empty_object")]
    pub limits: Value,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VhostMetadata {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Tags,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VhostDef {
    pub name: String,
    #[serde(default)]
    pub limits: Value,
    #[serde(default)]
    pub metadata: VhostMetadata,
    /// Older exports put these at top level.
    #[serde(default, skip_serializing)]
    pub description: Option<String>,
    #[serde(default, skip_serializing)]
    pub tags: Option<Tags>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PermissionDef {
    pub user: String,
    pub vhost: String,
    #[serde(default = "default_match_all")]
    pub configure: String,
    #[serde(default = "default_match_all")]
    pub write: String,
    #[serde(default = "default_match_all")]
    pub read: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyDef {
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    #[serde(rename = "apply-to", default = "default_apply_to")]
    pub apply_to: String,
    pub definition: Value,
    #[serde(default)]
    pub priority: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    pub name: String,
    pub vhost: String,
    #[serde(default = "default_true")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub arguments: Map<String, Value>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeDef {
    pub name: String,
    pub vhost: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default = "default_true")]
    pub durable: bool,
    #[serde(default)]
    pub auto_delete: bool,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub arguments: Map<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BindingDef {
    pub source: String,
    pub vhost: String,
    pub destination: String,
    pub destination_type: String,
    #[serde(default)]
    pub routing_key: String,
    #[serde(default)]
    pub arguments: Map<String, Value>,
}

/// Parses a definitions document. Each entry is read on its own so that an error names the
/// section, the index and (when present) the name of the entry at fault.
pub fn parse(bytes: &[u8]) -> Result<Definitions, String> {
    parse_with(bytes, ImportMode::Strict).map(|(d, _)| d)
}

/// [`parse`], or with [`ImportMode::SkipInvalid`] every entry that does not parse left out and
/// reported (the second value). A document that is not a JSON object is an error either way.
pub fn parse_with(bytes: &[u8], mode: ImportMode) -> Result<(Definitions, Vec<String>), String> {
    let root: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        // Nested beyond serde_json's limit (128): cut what lies deeper than PRUNE_DEPTH so the
        // entry holding it can be named and left out (its arguments are then still too deep
        // for the import's own check).
        Err(e) if mode == ImportMode::SkipInvalid && e.to_string().contains("recursion limit") => {
            serde_json::from_slice(&prune_deep(bytes, PRUNE_DEPTH))
                .map_err(|e| format!("not valid JSON: {e}"))?
        }
        Err(e) => return Err(format!("not valid JSON: {e}")),
    };
    let Value::Object(mut root) = root else {
        return Err("definitions must be a JSON object".into());
    };
    let mut rejected = Vec::new();
    let mut section = |root: &mut Map<String, Value>, key: &str| -> Result<Vec<_>, String> {
        match root.remove(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (entry_label(key, i, &v), v))
                .collect()),
            Some(other) => {
                let e = format!("{key}: expected a list, got {other}");
                match mode {
                    ImportMode::Strict => Err(e),
                    ImportMode::SkipInvalid => {
                        rejected.push(e);
                        Ok(Vec::new())
                    }
                }
            }
        }
    };
    fn typed<T: serde::de::DeserializeOwned>(
        entries: Vec<(String, Value)>,
        mode: ImportMode,
        rejected: &mut Vec<String>,
    ) -> Result<Vec<T>, String> {
        let mut out = Vec::with_capacity(entries.len());
        for (label, v) in entries {
            match serde_json::from_value(v) {
                Ok(t) => out.push(t),
                Err(e) if mode == ImportMode::SkipInvalid => rejected.push(format!("{label}: {e}")),
                Err(e) => return Err(format!("{label}: {e}")),
            }
        }
        Ok(out)
    }
    let users = section(&mut root, "users")?;
    let vhosts = section(&mut root, "vhosts")?;
    let permissions = section(&mut root, "permissions")?;
    let topic_permissions = section(&mut root, "topic_permissions")?;
    let parameters = section(&mut root, "parameters")?;
    let global_parameters = section(&mut root, "global_parameters")?;
    let policies = section(&mut root, "policies")?;
    let operator_policies = section(&mut root, "operator_policies")?;
    let queues = section(&mut root, "queues")?;
    let exchanges = section(&mut root, "exchanges")?;
    let bindings = section(&mut root, "bindings")?;
    fn text(root: &mut Map<String, Value>, key: &str) -> Option<String> {
        match root.remove(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }
    let r = &mut rejected;
    let d = Definitions {
        rabbit_version: text(&mut root, "rabbit_version"),
        rabbitmq_version: text(&mut root, "rabbitmq_version"),
        product_name: text(&mut root, "product_name"),
        product_version: text(&mut root, "product_version"),
        users: typed(users, mode, r)?,
        vhosts: typed(vhosts, mode, r)?,
        permissions: typed(permissions, mode, r)?,
        topic_permissions: typed(topic_permissions, mode, r)?,
        parameters: typed(parameters, mode, r)?,
        global_parameters: typed(global_parameters, mode, r)?,
        policies: typed(policies, mode, r)?,
        operator_policies: typed(operator_policies, mode, r)?,
        queues: typed(queues, mode, r)?,
        exchanges: typed(exchanges, mode, r)?,
        bindings: typed(bindings, mode, r)?,
    };
    Ok((d, rejected))
}

/// How deep [`prune_deep`] keeps containers: well below serde_json's limit, well above what an
/// import accepts.
const PRUNE_DEPTH: usize = 64;

/// JSON text with every object or array nested deeper than `limit` replaced by `null`. A
/// single pass over the bytes with a counter (no recursion); strings are skipped as strings.
/// Input that is not JSON stays not JSON.
fn prune_deep(bytes: &[u8], limit: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    // Depth at which a pruned container opened; bytes are dropped until it closes.
    let mut cut: Option<usize> = None;
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    depth += 1;
                    if depth > limit && cut.is_none() {
                        cut = Some(depth);
                        out.extend_from_slice(b"null");
                    }
                }
                b'}' | b']' => {
                    if cut == Some(depth) {
                        cut = None;
                        depth = depth.saturating_sub(1);
                        continue;
                    }
                    depth = depth.saturating_sub(1);
                }
                _ => {}
            }
        }
        if cut.is_none() {
            out.push(b);
        }
    }
    out
}

/// `queues[2] 'orders' in vhost '/'` style label of a raw entry.
fn entry_label(section: &str, i: usize, v: &Value) -> String {
    let field = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    let mut s = format!("{section}[{i}]");
    let name = match section {
        "bindings" => field("source")
            .zip(field("destination"))
            .map(|(a, b)| format!("{a} -> {b}")),
        "permissions" | "topic_permissions" => field("user"),
        _ => field("name"),
    };
    if let Some(n) = name {
        s.push_str(&format!(" '{n}'"));
    }
    if section != "vhosts" && section != "users" {
        if let Some(vh) = field("vhost") {
            s.push_str(&format!(" in vhost '{vh}'"));
        }
    }
    s
}

impl UserDef {
    pub fn label(&self, i: usize) -> String {
        format!("users[{i}] '{}'", self.name)
    }
    /// The stored credential: a clear-text `password` is hashed, else `password_hash` is
    /// checked and kept.
    pub fn credential(&self) -> Result<PasswordHash, String> {
        if let Some(p) = &self.password {
            return Ok(PasswordHash::new(p));
        }
        let algo = HashAlgorithm::parse(&self.hashing_algorithm).ok_or_else(|| {
            format!(
                "unsupported hashing_algorithm '{}' (supported: {}, {})",
                self.hashing_algorithm,
                HashAlgorithm::SHA256,
                HashAlgorithm::SHA512
            )
        })?;
        PasswordHash::from_stored(algo, &self.password_hash)
    }
}

impl VhostDef {
    pub fn description(&self) -> String {
        self.description
            .clone()
            .unwrap_or_else(|| self.metadata.description.clone())
    }
    pub fn tags(&self) -> Vec<String> {
        match &self.tags {
            Some(t) => t.0.clone(),
            None => self.metadata.tags.0.clone(),
        }
    }
}

impl PermissionDef {
    pub fn spec(&self) -> PermissionSpec {
        PermissionSpec {
            configure: self.configure.clone(),
            write: self.write.clone(),
            read: self.read.clone(),
        }
    }
}

impl PolicyDef {
    /// Converts and validates (pattern, apply-to, definition keys).
    pub fn to_policy(&self) -> Result<Policy, String> {
        self.to_policy_kind(PolicyKind::User)
    }

    /// [`PolicyDef::to_policy`] for a policy of `kind`.
    pub fn to_policy_kind(&self, kind: PolicyKind) -> Result<Policy, String> {
        let apply_to = ApplyTo::parse(&self.apply_to).ok_or_else(|| {
            format!(
                "apply-to '{}' is not one of queues, exchanges, all",
                self.apply_to
            )
        })?;
        let Value::Object(definition) = &self.definition else {
            return Err(format!(
                "definition must be a JSON object, got {}",
                self.definition
            ));
        };
        let p = Policy {
            vhost: self.vhost.clone(),
            name: self.name.clone(),
            pattern: self.pattern.clone(),
            apply_to,
            priority: self.priority,
            definition: definition.clone(),
        };
        p.validate_as(kind)?;
        Ok(p)
    }

    pub fn from_policy(p: &Policy) -> Self {
        Self {
            vhost: p.vhost.clone(),
            name: p.name.clone(),
            pattern: p.pattern.clone(),
            apply_to: p.apply_to.as_str().to_owned(),
            definition: Value::Object(p.definition.clone()),
            priority: p.priority,
        }
    }
}

impl ExchangeDef {
    pub fn exchange_kind(&self) -> Result<ExchangeKind, String> {
        ExchangeKind::parse(&self.kind).ok_or_else(|| {
            format!(
                "unknown exchange type '{}' (supported: direct, fanout, topic, headers)",
                self.kind
            )
        })
    }
}

// === AMQP field tables <-> JSON ===

/// A field table as JSON, the way RabbitMQ shows arguments: strings, numbers, booleans,
/// nested objects and arrays.
pub fn table_to_json(t: &FieldTable) -> Map<String, Value> {
    t.inner()
        .iter()
        .map(|(k, v)| (k.to_string(), value_to_json(v)))
        .collect()
}

fn value_to_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => Value::Bool(*b),
        AMQPValue::ShortShortInt(x) => Value::from(*x),
        AMQPValue::ShortShortUInt(x) => Value::from(*x),
        AMQPValue::ShortInt(x) => Value::from(*x),
        AMQPValue::ShortUInt(x) => Value::from(*x),
        AMQPValue::LongInt(x) => Value::from(*x),
        AMQPValue::LongUInt(x) => Value::from(*x),
        AMQPValue::LongLongInt(x) => Value::from(*x),
        AMQPValue::Timestamp(x) => Value::from(*x),
        AMQPValue::Float(x) => Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        AMQPValue::Double(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
        AMQPValue::DecimalValue(d) => {
            Number::from_f64(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
                .map_or(Value::Null, Value::Number)
        }
        AMQPValue::ShortString(s) => Value::String(s.to_string()),
        AMQPValue::LongString(s) => Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        AMQPValue::ByteArray(b) => {
            Value::String(String::from_utf8_lossy(b.as_slice()).into_owned())
        }
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value_to_json).collect()),
        AMQPValue::FieldTable(t) => Value::Object(table_to_json(t)),
        AMQPValue::Void => Value::Null,
    }
}

/// JSON arguments as a field table: integers become signed 64-bit (`l`), other numbers
/// doubles, strings long strings.
pub fn json_to_table(m: &Map<String, Value>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in m {
        t.insert(ShortString::from(k.clone()), json_to_value(v));
    }
    t
}

fn json_to_value(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => AMQPValue::LongLongInt(i),
            (None, Some(f)) => AMQPValue::Double(f),
            (None, None) => AMQPValue::Void,
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.clone())),
        Value::Array(a) => {
            let mut arr = FieldArray::default();
            for x in a {
                arr.push(json_to_value(x));
            }
            AMQPValue::FieldArray(arr)
        }
        Value::Object(o) => AMQPValue::FieldTable(json_to_table(o)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const FIXTURE: &str = include_str!("../../tests/fixtures/rabbitmq-3.10-export.json");

    #[test]
    fn rabbitmq_export_parses() {
        let d = parse(FIXTURE.as_bytes()).expect("parse");
        assert_eq!(d.rabbit_version.as_deref(), Some("3.10.8"));
        let alice = d.users.iter().find(|u| u.name == "alice").expect("alice");
        assert_eq!(alice.tags.0, vec!["management", "monitoring"]);
        assert!(alice.credential().expect("hash").verify("s3cret-pass"));
        assert_eq!(d.vhosts.len(), 2);
        let ha = d
            .policies
            .iter()
            .find(|p| p.name == "ha-all")
            .expect("ha-all");
        let p = ha.to_policy().expect("valid");
        assert_eq!(p.apply_to, ApplyTo::Queues);
        assert_eq!(p.priority, 1);
        assert_eq!(d.queues.len(), 3);
        assert_eq!(d.exchanges.len(), 2);
        assert_eq!(d.bindings.len(), 3);
    }

    #[test]
    fn tags_as_string_or_list() {
        let u: UserDef = serde_json::from_value(
            json!({"name": "a", "password_hash": "", "tags": "administrator, management"}),
        )
        .expect("string tags");
        assert_eq!(u.tags.0, vec!["administrator", "management"]);
        let u: UserDef =
            serde_json::from_value(json!({"name": "a", "tags": ["monitoring"]})).expect("list");
        assert_eq!(u.tags.0, vec!["monitoring"]);
        let u: UserDef = serde_json::from_value(json!({"name": "a", "tags": ""})).expect("empty");
        assert!(u.tags.0.is_empty());
    }

    #[test]
    fn pruning_cuts_only_what_is_too_deep_and_respects_strings() {
        let text = br#"{"a": [[["x"]]], "s": "[[[{", "b": {"c": [1, {"d": 2}]}}"#;
        let pruned = prune_deep(text, 2);
        let v: Value = serde_json::from_slice(&pruned).expect("still JSON");
        assert_eq!(
            v,
            json!({"a": [null], "s": "[[[{", "b": {"c": null}}),
            "{}",
            String::from_utf8_lossy(&pruned)
        );
        // Deep enough to stop serde_json, shallow enough after pruning.
        let deep = format!(
            r#"{{"q": {}"x"{}, "e": "\"]"}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        let v: Value = serde_json::from_slice(&prune_deep(deep.as_bytes(), 64)).expect("parses");
        assert_eq!(v["e"], "\"]");
        assert!(crate::nesting::json_exceeds(&v["q"], 16));
    }

    #[test]
    fn skip_mode_leaves_out_the_entries_that_do_not_parse() {
        let doc = json!({
            "vhosts": [{"name": "/"}, {"nome": "typo"}, {"name": "b"}],
            "queues": "not a list",
            "users": [{"name": "u", "tags": 7}]
        })
        .to_string();
        let e = parse(doc.as_bytes()).expect_err("strict");
        assert!(e.starts_with("queues: expected a list"), "{e}");
        let (d, rejected) = parse_with(doc.as_bytes(), ImportMode::SkipInvalid).expect("lenient");
        let names: Vec<_> = d.vhosts.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["/", "b"]);
        assert!(d.users.is_empty() && d.queues.is_empty());
        assert_eq!(rejected.len(), 3, "{rejected:?}");
        assert!(rejected
            .iter()
            .any(|r| r.starts_with("queues: expected a list")));
        assert!(rejected.iter().any(|r| r.starts_with("vhosts[1]")));
        assert!(rejected.iter().any(|r| r.starts_with("users[0] 'u'")));
        // Not JSON at all: an error in either mode.
        assert!(parse_with(b"{\"vhosts\": [", ImportMode::SkipInvalid).is_err());
    }

    #[test]
    fn errors_name_the_entry() {
        let e = parse(br#"{"queues": [{"name": "ok", "vhost": "/"}, {"name": "q2"}]}"#)
            .expect_err("missing vhost");
        assert!(e.starts_with("queues[1] 'q2'"), "{e}");
        assert!(e.contains("vhost"), "{e}");
        let e = parse(br#"{"users": {"name": "x"}}"#).expect_err("not a list");
        assert!(e.contains("users: expected a list"), "{e}");
        let e = parse(b"[1]").expect_err("not an object");
        assert!(e.contains("JSON object"), "{e}");
        let e = parse(b"{").expect_err("bad json");
        assert!(e.contains("not valid JSON"), "{e}");
        let e = parse(
            br#"{"bindings": [{"source": "a", "destination": "b", "vhost": "/", "destination_type": 3}]}"#,
        )
        .expect_err("bad type");
        assert!(e.starts_with("bindings[0] 'a -> b' in vhost '/'"), "{e}");
    }

    #[test]
    fn bad_user_hash_and_policy_are_explained() {
        let u: UserDef = serde_json::from_value(
            json!({"name": "a", "password_hash": "abc", "hashing_algorithm": "rabbit_password_hashing_md5"}),
        )
        .expect("parse");
        assert!(u
            .credential()
            .expect_err("md5")
            .contains("hashing_algorithm"));
        let p: PolicyDef = serde_json::from_value(
            json!({"vhost": "/", "name": "p", "pattern": "", "apply-to": "everything", "definition": {"ha-mode": "all"}}),
        )
        .expect("parse");
        assert!(p.to_policy().expect_err("apply-to").contains("apply-to"));
    }

    #[test]
    fn arguments_round_trip_through_json() {
        let m = json!({"x-message-ttl": 60000, "x-dead-letter-exchange": "dlx", "flag": true,
                       "ratio": 0.5, "nested": {"a": [1, "b"]}, "none": null});
        let m = m.as_object().cloned().expect("object");
        let t = json_to_table(&m);
        assert_eq!(
            crate::queue::args::as_i64(t.inner().get("x-message-ttl").expect("ttl")),
            Some(60000)
        );
        assert_eq!(table_to_json(&t), m);
    }

    #[test]
    fn definitions_serialize_with_rabbitmq_field_names() {
        let d = parse(FIXTURE.as_bytes()).expect("parse");
        let v = serde_json::to_value(&d).expect("serialize");
        assert_eq!(v["policies"][0]["apply-to"], "queues");
        assert_eq!(v["queues"][0]["type"], "classic");
        assert_eq!(v["exchanges"][0]["type"], "fanout");
        assert!(v["users"][0].get("password").is_none());
        let again = parse(&serde_json::to_vec(&v).expect("bytes")).expect("reparse");
        assert_eq!(again.users, d.users);
        assert_eq!(again.queues, d.queues);
        assert_eq!(again.bindings, d.bindings);
    }
}
