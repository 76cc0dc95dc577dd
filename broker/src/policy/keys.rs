//! Policy definition keys: which ones exist, how RabbitMQ 3.10 validates them, which an
//! operator policy may set, and how a policy and an operator policy combine.
//!
//! Validation is pure and names the key at fault with RabbitMQ's wording ("-1 is not a valid
//! maximum length"); a key RabbitMQ does not know is refused ("... are not recognised policy
//! settings"), as RabbitMQ does, so a typo never passes silently.

use serde_json::{Map, Value};

use super::PolicyKind;

/// Keys a policy may set, as RabbitMQ 3.10 with its default plugins accepts them. Those that
/// take effect in warren: message-ttl, expires, max-length, max-length-bytes, overflow,
/// dead-letter-exchange, dead-letter-routing-key, delivery-limit, queue-master-locator,
/// alternate-exchange and the ha-* keys; the others are validated and stored.
pub const POLICY_KEYS: &[&str] = &[
    "alternate-exchange",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "queue-mode",
    "queue-version",
    "overflow",
    "delivery-limit",
    "max-age",
    "stream-max-segment-size-bytes",
    "queue-leader-locator",
    "initial-cluster-size",
    "queue-master-locator",
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-failure",
    "ha-promote-on-shutdown",
];

/// Keys an operator policy may set (RabbitMQ's operator_policy_validator list).
pub const OPERATOR_KEYS: &[&str] = &[
    "expires",
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "delivery-limit",
];

/// The value that applies when a policy and an operator policy both set `key`: the lower of
/// two numbers (RabbitMQ's merge strategy for every operator key), else the operator's.
pub fn merge(key: &str, policy: &Value, operator: &Value) -> Value {
    match (policy.as_i64(), operator.as_i64()) {
        (Some(a), Some(b)) if OPERATOR_KEYS.contains(&key) => Value::from(a.min(b)),
        _ => operator.clone(),
    }
}

/// Checks a definition for a policy of `kind`. The message names the offending key or value.
pub fn validate(kind: PolicyKind, def: &Map<String, Value>) -> Result<(), String> {
    if def.is_empty() {
        return Err("policy definition must not be empty".into());
    }
    let allowed = match kind {
        PolicyKind::User => POLICY_KEYS,
        PolicyKind::Operator => OPERATOR_KEYS,
    };
    let unknown: Vec<&str> = def
        .keys()
        .map(String::as_str)
        .filter(|k| !allowed.contains(k))
        .collect();
    if !unknown.is_empty() {
        return Err(format!(
            "{unknown:?} are not recognised {} settings",
            match kind {
                PolicyKind::User => "policy",
                PolicyKind::Operator => "operator policy",
            }
        ));
    }
    for (k, v) in def {
        validate_value(k, v)?;
    }
    validate_ha(def)
}

fn int_at_least(v: &Value, min: i64) -> bool {
    v.as_i64().is_some_and(|n| n >= min)
}

fn is_one_of(v: &Value, allowed: &[&str]) -> bool {
    v.as_str().is_some_and(|s| allowed.contains(&s))
}

/// One key's value, RabbitMQ's rules and wording.
fn validate_value(key: &str, v: &Value) -> Result<(), String> {
    let (ok, what) = match key {
        "alternate-exchange" => (v.is_string(), "is not a valid alternate exchange name"),
        "dead-letter-exchange" => (v.is_string(), "is not a valid dead letter exchange name"),
        "dead-letter-routing-key" => (v.is_string(), "is not a valid dead letter routing key"),
        "message-ttl" => (int_at_least(v, 0), "is not a valid message TTL"),
        "expires" => (int_at_least(v, 1), "is not a valid queue expiry"),
        "max-length" => (int_at_least(v, 0), "is not a valid maximum length"),
        "max-length-bytes" => (int_at_least(v, 0), "is not a valid maximum length in bytes"),
        "max-in-memory-length" | "max-in-memory-bytes" => {
            (int_at_least(v, 0), "is not a valid maximum memory in bytes")
        }
        "queue-mode" => (
            is_one_of(v, &["default", "lazy"]),
            "is not a valid queue-mode value",
        ),
        "queue-version" => (
            matches!(v.as_i64(), Some(1 | 2)),
            "is not a valid queue-version value",
        ),
        "overflow" => (
            is_one_of(v, &["drop-head", "reject-publish", "reject-publish-dlx"]),
            "is not a valid overflow value",
        ),
        "delivery-limit" => (int_at_least(v, 0), "is not a valid delivery limit"),
        "max-age" => (
            v.as_str().is_some_and(valid_max_age),
            "is not a valid max age",
        ),
        "stream-max-segment-size-bytes" => (int_at_least(v, 0), "is not a valid segment size"),
        "queue-leader-locator" => (
            is_one_of(v, &["client-local", "random", "least-leaders"]),
            "is not a valid queue leader locator value",
        ),
        "initial-cluster-size" => (int_at_least(v, 0), "is not a valid cluster size"),
        "queue-master-locator" => (
            is_one_of(v, &["client-local", "min-masters", "random"]),
            "invalid queue-master-locator value",
        ),
        // The ha-* keys are checked together in validate_ha.
        _ => (true, ""),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("{key}: {v} {what}"))
    }
}

/// RabbitMQ's stream max-age: a number and a unit (Y, M, D, h, m, s).
fn valid_max_age(s: &str) -> bool {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    !n.is_empty() && matches!(unit, "Y" | "M" | "D" | "h" | "m" | "s")
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn def(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn the_seed_policy_and_every_effective_key_validate() {
        for d in [
            json!({"ha-mode": "all", "ha-sync-mode": "automatic"}),
            json!({"ha-mode": "exactly", "ha-params": 2, "ha-promote-on-failure": "always"}),
            json!({"ha-mode": "nodes", "ha-params": ["warren@a"], "ha-promote-on-shutdown": "when-synced"}),
            json!({"message-ttl": 0, "expires": 1, "max-length": 0, "max-length-bytes": 10,
                   "overflow": "reject-publish-dlx", "dead-letter-exchange": "dlx",
                   "dead-letter-routing-key": "rk", "delivery-limit": 3,
                   "queue-master-locator": "min-masters", "alternate-exchange": "ae"}),
            json!({"max-age": "7D", "queue-mode": "lazy", "queue-version": 2}),
        ] {
            validate(PolicyKind::User, &def(d.clone())).unwrap_or_else(|e| panic!("{d}: {e}"));
        }
        validate(
            PolicyKind::Operator,
            &def(json!({"max-length": 1, "expires": 1000, "delivery-limit": 2})),
        )
        .expect("operator keys");
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let cases = [
            (json!({"max-length": -1}), "is not a valid maximum length"),
            (json!({"expires": 0}), "is not a valid queue expiry"),
            (json!({"message-ttl": "1s"}), "is not a valid message TTL"),
            (json!({"overflow": "nope"}), "is not a valid overflow value"),
            (
                json!({"dead-letter-exchange": 1}),
                "dead letter exchange name",
            ),
            (
                json!({"queue-master-locator": "x"}),
                "invalid queue-master-locator",
            ),
            (json!({"max-age": "7 days"}), "is not a valid max age"),
            (
                json!({"foo": 1}),
                "[\"foo\"] are not recognised policy settings",
            ),
            (json!({"ha-mode": "some"}), "ha-mode"),
            (json!({"ha-mode": "all", "ha-params": 2}), "ha-params"),
            (json!({"ha-mode": "exactly"}), "ha-params"),
            (json!({"ha-mode": "exactly", "ha-params": 0}), "ha-params"),
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
            (json!({"ha-sync-mode": "manual"}), "ha-sync-mode"),
            (json!({}), "empty"),
        ];
        for (d, needle) in cases {
            let e = validate(PolicyKind::User, &def(d.clone())).expect_err(&d.to_string());
            assert!(e.contains(needle), "{d}: {e}");
        }
        let e = validate(
            PolicyKind::Operator,
            &def(json!({"dead-letter-exchange": "x"})),
        )
        .expect_err("not an operator key");
        assert!(e.contains("not recognised operator policy settings"), "{e}");
    }

    #[test]
    fn numbers_merge_to_the_lower_and_the_operator_wins_otherwise() {
        assert_eq!(merge("max-length", &json!(10), &json!(3)), json!(3));
        assert_eq!(merge("max-length", &json!(2), &json!(3)), json!(2));
        assert_eq!(merge("expires", &json!(1000), &json!(500)), json!(500));
        assert_eq!(
            merge("queue-mode", &json!("lazy"), &json!("default")),
            json!("default")
        );
    }
}
