//! How a warren cluster's definitions map onto the keys of the replicated key-value state
//! (`warren_cluster::ClusterState::kv`), and the values stored under them.
//!
//! | key | value |
//! |---|---|
//! | `vhost/<v>` | [`VhostDef`] |
//! | `user/<u>` | [`UserDef`] (password hash only) |
//! | `perm/<v>/<u>` | [`PermissionDef`] |
//! | `policy/<v>/<name>`, `opolicy/<v>/<name>` | [`PolicyDef`] (policy, operator policy) |
//! | `limits/<v>/limits` | the vhost's limits as RabbitMQ's `vhost-limits` parameter entry |
//! | `exchange/<v>/<x>` | [`ExchangeDef`] |
//! | `binding/<v>/<source>/<q|x>/<destination>/<routing key>/<arguments digest>` | [`BindingDef`] |
//! | `queue/<v>/<q>` | [`QueueValue`]: the definition, its exclusive owner and its placement |
//! | `node/<n>` | [`NodeValue`]: what node `n` tells the others (its management address) |
//! | `stopping/<n>` | present while node `n` is stopped on purpose |
//!
//! Every name is percent-encoded (`%` and `/`) so that a `/` in a name never splits a key, and a
//! vhost's keys all share the prefix `…/<v>/` (deleting a vhost is one `DeletePrefix` per kind).
//! Values are the shapes of RabbitMQ's definitions JSON where one exists, so the state reads
//! like an export.

use crate::definitions::json::{
    BindingDef, ExchangeDef, PermissionDef, PolicyDef, QueueDef, UserDef, VhostDef,
};
use crate::policy::PolicyKind;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

/// Percent-encodes `%` and `/` in one key component.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`enc`]; None for a malformed escape.
pub fn dec(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars();
    while let Some(c) = it.next() {
        if c == '%' {
            let code: String = [it.next()?, it.next()?].iter().collect();
            match code.as_str() {
                "25" => out.push('%'),
                "2F" => out.push('/'),
                _ => return None,
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

pub fn vhost(v: &str) -> String {
    format!("vhost/{}", enc(v))
}

pub fn user(u: &str) -> String {
    format!("user/{}", enc(u))
}

pub fn perm(v: &str, u: &str) -> String {
    format!("perm/{}/{}", enc(v), enc(u))
}

pub fn policy(kind: PolicyKind, v: &str, name: &str) -> String {
    let p = match kind {
        PolicyKind::User => "policy",
        PolicyKind::Operator => "opolicy",
    };
    format!("{p}/{}/{}", enc(v), enc(name))
}

/// A vhost's limits (the name is the parameter's, so the vhost's prefix covers it).
pub fn limits(v: &str) -> String {
    format!("limits/{}/limits", enc(v))
}

pub fn exchange(v: &str, x: &str) -> String {
    format!("exchange/{}/{}", enc(v), enc(x))
}

pub fn queue(v: &str, q: &str) -> String {
    format!("queue/{}/{}", enc(v), enc(q))
}

/// A binding's key: its ends, routing key and a digest of its arguments (bindings that differ
/// only in their arguments are different bindings).
pub fn binding(b: &BindingDef) -> String {
    let kind = if b.destination_type == "exchange" {
        "x"
    } else {
        "q"
    };
    format!(
        "binding/{}/{}/{kind}/{}/{}/{}",
        enc(&b.vhost),
        enc(&b.source),
        enc(&b.destination),
        enc(&b.routing_key),
        args_digest(&b.arguments)
    )
}

/// Every key prefix of one vhost's definitions, for deleting the vhost.
pub fn vhost_prefixes(v: &str) -> Vec<String> {
    let v = enc(v);
    [
        "perm", "policy", "opolicy", "limits", "exchange", "binding", "queue",
    ]
    .iter()
    .map(|k| format!("{k}/{v}/"))
    .collect()
}

/// A short stable digest of binding arguments (canonical JSON: keys sorted by serde_json).
fn args_digest(args: &Map<String, Value>) -> String {
    if args.is_empty() {
        return "-".into();
    }
    let text = Value::Object(args.clone()).to_string();
    let d = Sha256::digest(text.as_bytes());
    d[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// A key parsed back into what it names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Vhost(String),
    User(String),
    Perm {
        vhost: String,
        user: String,
    },
    Policy {
        kind: PolicyKind,
        vhost: String,
        name: String,
    },
    Limits {
        vhost: String,
    },
    Exchange {
        vhost: String,
        name: String,
    },
    Binding {
        vhost: String,
    },
    Queue {
        vhost: String,
        name: String,
    },
}

/// Parses a key written by this module; None for anything else.
pub fn parse(key: &str) -> Option<Key> {
    let mut parts = key.split('/');
    let kind = parts.next()?;
    let mut next = || parts.next().and_then(dec);
    Some(match kind {
        "vhost" => Key::Vhost(next()?),
        "user" => Key::User(next()?),
        "perm" => Key::Perm {
            vhost: next()?,
            user: next()?,
        },
        "policy" | "opolicy" => Key::Policy {
            kind: if kind == "policy" {
                PolicyKind::User
            } else {
                PolicyKind::Operator
            },
            vhost: next()?,
            name: next()?,
        },
        "limits" => Key::Limits { vhost: next()? },
        "exchange" => Key::Exchange {
            vhost: next()?,
            name: next()?,
        },
        "binding" => Key::Binding { vhost: next()? },
        "queue" => Key::Queue {
            vhost: next()?,
            name: next()?,
        },
        _ => return None,
    })
}

/// Where a queue lives: its master, its mirrors (in-sync ones in `in_sync`, oldest first: the
/// order promotion follows) and an epoch that grows with every change of master.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub master: String,
    #[serde(default)]
    pub mirrors: Vec<String>,
    #[serde(default)]
    pub in_sync: Vec<String>,
    #[serde(default)]
    pub epoch: u64,
}

/// An exclusive queue's owner: the node and connection that declared it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub node: String,
    pub conn: u64,
}

/// What `queue/<v>/<q>` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueValue {
    #[serde(flatten)]
    pub def: QueueDef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exclusive: Option<Owner>,
    pub placement: Placement,
}

/// Values written and read by the broker; `to_value` never fails for these types.
pub fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub fn from_value<T: serde::de::DeserializeOwned>(v: &Value) -> Option<T> {
    serde_json::from_value(v.clone()).ok()
}

/// The value types, re-exported for the rest of `cluster/`.
pub type Vhost = VhostDef;
pub type User = UserDef;
pub type Perm = PermissionDef;
pub type Pol = PolicyDef;
pub type Exch = ExchangeDef;
pub type Bind = BindingDef;

/// `node/<name>`: what a node tells the others about itself, beyond the Raft membership
/// ([`NodeValue`]). Written by the node itself (see [`super::status`]).
pub fn node(name: &str) -> String {
    format!("node/{}", enc(name))
}

/// Present while node `name` is stopping or stopped on purpose (SIGTERM, `stop`), so that its
/// queues fail over by `ha-promote-on-shutdown` rather than `ha-promote-on-failure`; removed
/// when the node starts again.
pub fn stopping(name: &str) -> String {
    format!("stopping/{}", enc(name))
}

/// What `node/<name>` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeValue {
    /// `host:port` of its management API (plain HTTP), None without one: where the other
    /// nodes ask for its connections, channels and consumers.
    #[serde(default)]
    pub mgmt: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_slashes_and_percents_round_trip_through_keys() {
        for name in ["/", "a/b", "100%", "%2F", "plain", ""] {
            assert_eq!(dec(&enc(name)).as_deref(), Some(name));
            assert_eq!(
                parse(&queue(name, name)),
                Some(Key::Queue {
                    vhost: name.into(),
                    name: name.into()
                })
            );
        }
        assert_eq!(
            parse(&policy(PolicyKind::Operator, "/", "p")),
            Some(Key::Policy {
                kind: PolicyKind::Operator,
                vhost: "/".into(),
                name: "p".into()
            })
        );
        assert_eq!(parse("unknown/x"), None);
        assert_eq!(dec("%zz"), None);
    }

    #[test]
    fn a_vhost_owns_every_key_under_its_prefixes() {
        let b = BindingDef {
            source: "x".into(),
            vhost: "a/b".into(),
            destination: "q".into(),
            destination_type: "queue".into(),
            routing_key: "rk/1".into(),
            arguments: Map::new(),
        };
        let prefixes = vhost_prefixes("a/b");
        for k in [
            binding(&b),
            queue("a/b", "q"),
            exchange("a/b", "x"),
            perm("a/b", "u"),
        ] {
            assert!(prefixes.iter().any(|p| k.starts_with(p)), "{k}");
        }
        assert!(!queue("a", "b/q").starts_with(&prefixes[5]));
        let mut with_args = b.clone();
        with_args
            .arguments
            .insert("x-match".into(), Value::from("all"));
        assert_ne!(binding(&b), binding(&with_args));
    }

    #[test]
    fn a_queue_value_reads_like_an_export_plus_its_placement() {
        let v = QueueValue {
            def: QueueDef {
                name: "q".into(),
                vhost: "/".into(),
                durable: true,
                auto_delete: false,
                arguments: Map::new(),
                kind: None,
            },
            exclusive: None,
            placement: Placement {
                master: "warren@a".into(),
                mirrors: vec!["warren@b".into()],
                in_sync: vec!["warren@b".into()],
                epoch: 3,
            },
        };
        let j = to_value(&v);
        assert_eq!(j["name"], "q");
        assert_eq!(j["placement"]["master"], "warren@a");
        assert_eq!(from_value::<QueueValue>(&j), Some(v));
    }
}
