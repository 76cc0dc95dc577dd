//! Policies and operator policies (RabbitMQ's `set_policy` / `set_operator_policy`): named, per
//! vhost, a regex on queue and/or exchange names, a priority and a definition object.
//!
//! Which policy applies to an object follows RabbitMQ 3.10: of the policies of the object's
//! vhost whose `pattern` matches its name and whose `apply-to` matches its kind, the one with
//! the highest `priority` (ties: the first by name); at most one policy and one operator policy
//! per object. [`PolicyStore::applied`] returns both and their merged definition (where both
//! set a key, [`keys::merge`]: the lower number). How the merged definition combines with a
//! queue's own `x-*` arguments is [`crate::queue::QueueArgs::resolve`]'s job; for exchanges,
//! `alternate-exchange` applies when the exchange has no argument of that name.
//!
//! Setting, changing or clearing a policy re-applies to live queues and exchanges at once
//! (see `BrokerShared::apply_policies` in `definitions/`). Definitions are validated by
//! [`keys::validate`] (RabbitMQ's rules and wording; unknown keys refused).

pub mod keys;

use parking_lot::RwLock;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A user policy or an operator policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyKind {
    User,
    Operator,
}

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
    /// Checks a user policy: name, pattern and definition (see [`keys::validate`]).
    pub fn validate(&self) -> Result<(), String> {
        self.validate_as(PolicyKind::User)
    }

    /// Checks the policy as a policy of `kind`; the message names the offending key.
    pub fn validate_as(&self, kind: PolicyKind) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("policy name must not be empty".into());
        }
        regex::Regex::new(&self.pattern)
            .map_err(|e| format!("invalid pattern '{}': {e}", self.pattern))?;
        if crate::nesting::json_object_too_deep(&self.definition) {
            return Err(crate::nesting::too_deep_text("policy definition"));
        }
        keys::validate(kind, &self.definition)
    }
}

/// A stored policy with its compiled pattern.
#[derive(Debug)]
struct Entry {
    policy: Arc<Policy>,
    re: regex::Regex,
}

impl Entry {
    fn matches(&self, name: &str, is_queue: bool) -> bool {
        let kind_ok = match self.policy.apply_to {
            ApplyTo::All => true,
            ApplyTo::Queues => is_queue,
            ApplyTo::Exchanges => !is_queue,
        };
        kind_ok && self.re.is_match(name)
    }
}

/// The policies that apply to one queue or exchange, and what they say together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Applied {
    pub policy: Option<Arc<Policy>>,
    pub operator_policy: Option<Arc<Policy>>,
    /// The two definitions merged (RabbitMQ's `effective_policy_definition`).
    pub definition: Map<String, Value>,
}

impl Applied {
    /// The name of the applied policy, if any.
    pub fn policy_name(&self) -> Option<&str> {
        self.policy.as_deref().map(|p| p.name.as_str())
    }
    /// The name of the applied operator policy, if any.
    pub fn operator_policy_name(&self) -> Option<&str> {
        self.operator_policy.as_deref().map(|p| p.name.as_str())
    }
}

type Table = BTreeMap<(String, String), Entry>;

/// All policies and operator policies of the node, keyed by (vhost, name).
#[derive(Debug, Default)]
pub struct PolicyStore {
    user: RwLock<Table>,
    operator: RwLock<Table>,
}

impl PolicyStore {
    fn table(&self, kind: PolicyKind) -> &RwLock<Table> {
        match kind {
            PolicyKind::User => &self.user,
            PolicyKind::Operator => &self.operator,
        }
    }

    /// Stores a user policy (validated by the caller); returns true if it changed anything.
    pub fn put(&self, p: Policy) -> bool {
        self.put_kind(PolicyKind::User, p)
    }

    /// Stores a policy of `kind`; returns true if it changed anything. A pattern that does not
    /// compile is not stored (validation refuses it first).
    pub fn put_kind(&self, kind: PolicyKind, p: Policy) -> bool {
        let Ok(re) = regex::Regex::new(&p.pattern) else {
            return false;
        };
        let key = (p.vhost.clone(), p.name.clone());
        let mut m = self.table(kind).write();
        if m.get(&key).is_some_and(|e| *e.policy == p) {
            return false;
        }
        m.insert(
            key,
            Entry {
                policy: Arc::new(p),
                re,
            },
        );
        true
    }

    /// Removes a user policy; false if there was none.
    pub fn remove(&self, vhost: &str, name: &str) -> bool {
        self.remove_kind(PolicyKind::User, vhost, name)
    }

    pub fn remove_kind(&self, kind: PolicyKind, vhost: &str, name: &str) -> bool {
        self.table(kind)
            .write()
            .remove(&(vhost.to_owned(), name.to_owned()))
            .is_some()
    }

    /// Drops every policy and operator policy of a deleted vhost.
    pub fn remove_vhost(&self, vhost: &str) {
        for t in [&self.user, &self.operator] {
            t.write().retain(|(v, _), _| v != vhost);
        }
    }

    pub fn get(&self, vhost: &str, name: &str) -> Option<Policy> {
        self.get_kind(PolicyKind::User, vhost, name)
    }

    pub fn get_kind(&self, kind: PolicyKind, vhost: &str, name: &str) -> Option<Policy> {
        self.table(kind)
            .read()
            .get(&(vhost.to_owned(), name.to_owned()))
            .map(|e| Policy::clone(&e.policy))
    }

    /// User policies sorted by vhost then name; only `vhost`'s when given.
    pub fn list(&self, vhost: Option<&str>) -> Vec<Policy> {
        self.list_kind(PolicyKind::User, vhost)
    }

    pub fn list_kind(&self, kind: PolicyKind, vhost: Option<&str>) -> Vec<Policy> {
        self.table(kind)
            .read()
            .values()
            .filter(|e| vhost.is_none_or(|v| e.policy.vhost == v))
            .map(|e| Policy::clone(&e.policy))
            .collect()
    }

    /// The user policy RabbitMQ would apply to a queue or exchange, if any.
    pub fn effective(&self, vhost: &str, name: &str, is_queue: bool) -> Option<Policy> {
        select(&self.user.read(), vhost, name, is_queue).map(|p| Policy::clone(&p))
    }

    /// The policy and operator policy that apply to a queue (`is_queue`) or exchange, and
    /// their merged definition.
    pub fn applied(&self, vhost: &str, name: &str, is_queue: bool) -> Applied {
        let policy = select(&self.user.read(), vhost, name, is_queue);
        let operator_policy = if is_queue {
            select(&self.operator.read(), vhost, name, true)
        } else {
            None
        };
        let mut definition = policy
            .as_ref()
            .map(|p| p.definition.clone())
            .unwrap_or_default();
        if let Some(op) = &operator_policy {
            for (k, v) in &op.definition {
                let merged = match definition.get(k) {
                    Some(mine) => keys::merge(k, mine, v),
                    None => v.clone(),
                };
                definition.insert(k.clone(), merged);
            }
        }
        Applied {
            policy,
            operator_policy,
            definition,
        }
    }
}

/// The matching policy with the highest priority; ties go to the first by name (the table is
/// ordered by vhost, then name).
fn select(t: &Table, vhost: &str, name: &str, is_queue: bool) -> Option<Arc<Policy>> {
    let mut best: Option<&Entry> = None;
    for e in t
        .range((vhost.to_owned(), String::new())..)
        .take_while(|((v, _), _)| v == vhost)
        .map(|(_, e)| e)
        .filter(|e| e.matches(name, is_queue))
    {
        if best.is_none_or(|b| e.policy.priority > b.policy.priority) {
            best = Some(e);
        }
    }
    best.map(|e| e.policy.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pol(name: &str, pattern: &str, priority: i64, def: Value) -> Policy {
        Policy {
            vhost: "/".into(),
            name: name.into(),
            pattern: pattern.into(),
            apply_to: ApplyTo::All,
            priority,
            definition: def.as_object().cloned().expect("object"),
        }
    }

    #[test]
    fn the_highest_priority_wins_and_ties_go_to_the_first_name() {
        let s = PolicyStore::default();
        assert!(s.put(pol("b", "^q", 1, json!({"max-length": 1}))));
        assert!(
            !s.put(pol("b", "^q", 1, json!({"max-length": 1}))),
            "idempotent"
        );
        s.put(pol("a", "^q", 1, json!({"max-length": 2})));
        s.put(pol("c", "^q\\.hi", 5, json!({"max-length": 3})));
        let mut x = pol("x", "^q", 9, json!({"alternate-exchange": "ae"}));
        x.apply_to = ApplyTo::Exchanges;
        s.put(x);
        assert_eq!(s.applied("/", "q.hi", true).policy_name(), Some("c"));
        assert_eq!(s.applied("/", "q.lo", true).policy_name(), Some("a"));
        assert_eq!(s.applied("/", "q.lo", false).policy_name(), Some("x"));
        assert_eq!(s.applied("/", "other", true), Applied::default());
        assert_eq!(s.applied("other-vhost", "q.lo", true), Applied::default());
        assert!(s.remove("/", "a"));
        assert_eq!(s.applied("/", "q.lo", true).policy_name(), Some("b"));
    }

    #[test]
    fn an_operator_policy_merges_to_the_lower_limit_and_adds_its_keys() {
        let s = PolicyStore::default();
        s.put(pol(
            "lim",
            "^pq$",
            1,
            json!({"max-length": 10, "dead-letter-exchange": "dlx"}),
        ));
        s.put_kind(
            PolicyKind::Operator,
            pol("op", "^pq", 0, json!({"max-length": 3, "expires": 100})),
        );
        let a = s.applied("/", "pq", true);
        assert_eq!(a.policy_name(), Some("lim"));
        assert_eq!(a.operator_policy_name(), Some("op"));
        assert_eq!(
            Value::Object(a.definition),
            json!({"max-length": 3, "dead-letter-exchange": "dlx", "expires": 100})
        );
        // Exchanges never get operator policies.
        assert_eq!(s.applied("/", "pq", false).operator_policy_name(), None);
        assert_eq!(s.list_kind(PolicyKind::Operator, None).len(), 1);
        s.remove_vhost("/");
        assert_eq!(s.applied("/", "pq", true), Applied::default());
    }

    #[test]
    fn validation_checks_name_pattern_kind_and_keys() {
        let mut p = pol("p", "([", 0, json!({"max-length": 1}));
        assert!(p.validate().expect_err("regex").contains("pattern"));
        p.pattern = ".*".into();
        p.validate().expect("valid");
        p.validate_as(PolicyKind::Operator)
            .expect("an operator key");
        p.definition
            .insert("alternate-exchange".into(), json!("ae"));
        p.validate().expect("a policy key");
        assert!(p
            .validate_as(PolicyKind::Operator)
            .expect_err("not an operator key")
            .contains("not recognised"));
        p.name.clear();
        assert!(p.validate().is_err());
    }
}
