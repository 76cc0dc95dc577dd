//! Policies (RabbitMQ's `set_policy`): named, per vhost, a regex on queue and/or exchange names,
//! a priority and a definition object.
//!
//! Policies are validated, stored, persisted and listed. They are not enforced yet: the HA keys
//! (`ha-mode`, `ha-params`, `ha-sync-mode`, `ha-promote-on-failure`, `ha-promote-on-shutdown`)
//! take effect with clustering, and other keys (`message-ttl`, `max-length`, ...) are kept as
//! given for export and for the management API. Validation is pure ([`Policy::validate`]).

use parking_lot::RwLock;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ApplyTo {
    Queues,
    Exchanges,
    #[default]
    All,
}

impl ApplyTo {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "queues" => Some(Self::Queues),
            "exchanges" => Some(Self::Exchanges),
            "all" => Some(Self::All),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queues => "queues",
            Self::Exchanges => "exchanges",
            Self::All => "all",
        }
    }
}

/// One policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub vhost: String,
    pub name: String,
    /// Regex on queue / exchange names.
    pub pattern: String,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: Map<String, Value>,
}

impl Policy {
    /// Checks the pattern and the definition as RabbitMQ does for the keys warren knows (HA
    /// keys); other keys are stored as given. Returns a message naming the offending key.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("policy name must not be empty".into());
        }
        regex::Regex::new(&self.pattern)
            .map_err(|e| format!("invalid pattern '{}': {e}", self.pattern))?;
        if self.definition.is_empty() {
            return Err("policy definition must not be empty".into());
        }
        if crate::nesting::json_object_too_deep(&self.definition) {
            return Err(crate::nesting::too_deep_text("policy definition"));
        }
        validate_ha(&self.definition)
    }

    /// Whether the policy's pattern and apply-to select a queue (`is_queue`) or exchange name.
    pub fn matches(&self, name: &str, is_queue: bool) -> bool {
        let kind_ok = match self.apply_to {
            ApplyTo::All => true,
            ApplyTo::Queues => is_queue,
            ApplyTo::Exchanges => !is_queue,
        };
        kind_ok
            && regex::Regex::new(&self.pattern)
                .map(|r| r.is_match(name))
                .unwrap_or(false)
    }
}

fn str_key<'a>(def: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, String> {
    match def.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(format!("{key}: expected a string, got {v}")),
    }
}

fn one_of(def: &Map<String, Value>, key: &str, allowed: &[&str]) -> Result<(), String> {
    if let Some(s) = str_key(def, key)? {
        if !allowed.contains(&s) {
            return Err(format!("{key}: '{s}' is not one of {}", allowed.join(", ")));
        }
    }
    Ok(())
}

/// RabbitMQ's rules for classic mirrored queue keys.
fn validate_ha(def: &Map<String, Value>) -> Result<(), String> {
    let mode = str_key(def, "ha-mode")?;
    let params = def.get("ha-params");
    match (mode, params) {
        (None, Some(_)) => return Err("ha-params: only valid together with ha-mode".into()),
        (Some("all"), None) | (None, None) => {}
        (Some("all"), Some(_)) => {
            return Err("ha-params: must not be given when ha-mode is 'all'".into())
        }
        (Some("exactly"), Some(p)) => match p.as_i64() {
            Some(n) if n >= 1 => {}
            _ => {
                return Err(format!(
                    "ha-params: ha-mode 'exactly' needs an integer >= 1, got {p}"
                ))
            }
        },
        (Some("nodes"), Some(Value::Array(nodes))) => {
            if nodes.is_empty() {
                return Err("ha-params: ha-mode 'nodes' needs at least one node name".into());
            }
            if let Some(bad) = nodes.iter().find(|n| !n.is_string()) {
                return Err(format!("ha-params: node names must be strings, got {bad}"));
            }
        }
        (Some("nodes"), Some(p)) => {
            return Err(format!(
                "ha-params: ha-mode 'nodes' needs a list of node names, got {p}"
            ))
        }
        (Some(m @ ("exactly" | "nodes")), None) => {
            return Err(format!("ha-params: required when ha-mode is '{m}'"))
        }
        (Some(m), _) => return Err(format!("ha-mode: '{m}' is not one of all, exactly, nodes")),
    }
    for key in [
        "ha-sync-mode",
        "ha-promote-on-failure",
        "ha-promote-on-shutdown",
    ] {
        if mode.is_none() && def.contains_key(key) {
            return Err(format!("{key}: only valid together with ha-mode"));
        }
    }
    one_of(def, "ha-sync-mode", &["manual", "automatic"])?;
    one_of(def, "ha-promote-on-failure", &["always", "when-synced"])?;
    one_of(def, "ha-promote-on-shutdown", &["always", "when-synced"])?;
    if let Some(v) = def.get("ha-sync-batch-size") {
        if v.as_i64().is_none_or(|n| n < 1) {
            return Err(format!(
                "ha-sync-batch-size: expected an integer >= 1, got {v}"
            ));
        }
    }
    Ok(())
}

/// All policies of the node, keyed by (vhost, name).
#[derive(Debug, Default)]
pub struct PolicyStore {
    inner: RwLock<BTreeMap<(String, String), Policy>>,
}

impl PolicyStore {
    /// Stores a validated policy; returns true if it changed anything.
    pub fn put(&self, p: Policy) -> bool {
        let key = (p.vhost.clone(), p.name.clone());
        let mut m = self.inner.write();
        if m.get(&key) == Some(&p) {
            return false;
        }
        m.insert(key, p);
        true
    }

    /// Returns false if there was no such policy.
    pub fn remove(&self, vhost: &str, name: &str) -> bool {
        self.inner
            .write()
            .remove(&(vhost.to_owned(), name.to_owned()))
            .is_some()
    }

    pub fn remove_vhost(&self, vhost: &str) {
        self.inner.write().retain(|(v, _), _| v != vhost);
    }

    pub fn get(&self, vhost: &str, name: &str) -> Option<Policy> {
        self.inner
            .read()
            .get(&(vhost.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Policies sorted by vhost then name; only `vhost`'s when given.
    pub fn list(&self, vhost: Option<&str>) -> Vec<Policy> {
        self.inner
            .read()
            .values()
            .filter(|p| vhost.is_none_or(|v| p.vhost == v))
            .cloned()
            .collect()
    }

    /// The policy RabbitMQ would apply to a queue or exchange: the matching one with the
    /// highest priority (ties: the first by name).
    pub fn effective(&self, vhost: &str, name: &str, is_queue: bool) -> Option<Policy> {
        let m = self.inner.read();
        let mut best: Option<&Policy> = None;
        for p in m
            .values()
            .filter(|p| p.vhost == vhost && p.matches(name, is_queue))
        {
            if best.is_none_or(|b| p.priority > b.priority) {
                best = Some(p);
            }
        }
        best.cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pol(def: Value) -> Policy {
        Policy {
            vhost: "/".into(),
            name: "p".into(),
            pattern: "".into(),
            apply_to: ApplyTo::All,
            priority: 0,
            definition: def.as_object().cloned().expect("object"),
        }
    }

    #[test]
    fn seed_ha_all_policy_is_valid() {
        pol(json!({"ha-mode": "all", "ha-sync-mode": "automatic"}))
            .validate()
            .expect("valid");
        pol(json!({"ha-mode": "exactly", "ha-params": 2, "ha-promote-on-failure": "always"}))
            .validate()
            .expect("valid");
        pol(
            json!({"ha-mode": "nodes", "ha-params": ["warren@a", "warren@b"],
                   "ha-promote-on-shutdown": "when-synced"}),
        )
        .validate()
        .expect("valid");
        pol(json!({"message-ttl": 1000, "anything-else": [1, 2]}))
            .validate()
            .expect("other keys stored as given");
    }

    #[test]
    fn bad_ha_keys_are_named() {
        let cases = [
            (json!({"ha-mode": "some"}), "ha-mode"),
            (json!({"ha-mode": "all", "ha-params": 2}), "ha-params"),
            (json!({"ha-mode": "exactly"}), "ha-params"),
            (json!({"ha-mode": "exactly", "ha-params": 0}), "ha-params"),
            (json!({"ha-mode": "exactly", "ha-params": "2"}), "ha-params"),
            (json!({"ha-mode": "nodes", "ha-params": 3}), "ha-params"),
            (json!({"ha-mode": "nodes", "ha-params": []}), "ha-params"),
            (json!({"ha-mode": "nodes", "ha-params": [1]}), "ha-params"),
            (json!({"ha-params": 2}), "ha-params"),
            (
                json!({"ha-mode": "all", "ha-sync-mode": "auto"}),
                "ha-sync-mode",
            ),
            (
                json!({"ha-mode": "all", "ha-promote-on-failure": "never"}),
                "ha-promote-on-failure",
            ),
            (
                json!({"ha-mode": "all", "ha-promote-on-shutdown": 1}),
                "ha-promote-on-shutdown",
            ),
            (json!({"ha-sync-mode": "manual"}), "ha-sync-mode"),
            (json!({"ha-mode": 1}), "ha-mode"),
            (json!({}), "empty"),
        ];
        for (def, key) in cases {
            let e = pol(def.clone()).validate().expect_err(&def.to_string());
            assert!(e.contains(key), "{def}: {e}");
        }
        let mut p = pol(json!({"ha-mode": "all"}));
        p.pattern = "([".into();
        assert!(p.validate().expect_err("bad regex").contains("pattern"));
    }

    #[test]
    fn store_put_is_idempotent_and_effective_picks_priority() {
        let s = PolicyStore::default();
        let mut a = pol(json!({"ha-mode": "all"}));
        a.pattern = "^ha\\.".into();
        assert!(s.put(a.clone()));
        assert!(!s.put(a.clone()));
        let mut b = a.clone();
        b.name = "b".into();
        b.priority = 5;
        b.apply_to = ApplyTo::Exchanges;
        assert!(s.put(b));
        assert_eq!(
            s.effective("/", "ha.q", true).map(|p| p.name),
            Some("p".into())
        );
        assert_eq!(
            s.effective("/", "ha.x", false).map(|p| p.name),
            Some("b".into())
        );
        assert!(s.effective("/", "other", true).is_none());
        assert_eq!(s.list(Some("/")).len(), 2);
        assert!(s.list(Some("v")).is_empty());
        assert!(s.remove("/", "b"));
        assert!(!s.remove("/", "b"));
    }
}
