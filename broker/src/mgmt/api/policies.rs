//! Policies and operator policies, two lists of the same shape:
//! - `GET /api/policies`, `GET /api/policies/{vhost}`, `GET|PUT|DELETE /api/policies/{vhost}/{name}`
//!   (changes need the administrator or policymaker tag)
//! - `GET /api/operator-policies`, `GET /api/operator-policies/{vhost}`,
//!   `GET|PUT|DELETE /api/operator-policies/{vhost}/{name}` (changes by administrators only)
//!
//! Keys are checked, and policies applied to live queues and exchanges, by
//! `BrokerShared::set_policy_kind`.

use super::{can_see, def_err, forbidden, ok, required_str, vhost, R};
use crate::mgmt::{created, no_content, ApiError, Req};
use crate::policy::PolicyKind;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Value};

fn policy_json(p: &crate::policy::Policy) -> Value {
    json!({
        "vhost": p.vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to.as_str(),
        "definition": p.definition,
        "priority": p.priority,
    })
}

/// GET /api/policies[/{vhost}] and /api/operator-policies[/{vhost}].
pub(super) fn list(
    shared: &BrokerShared,
    r: &Req,
    kind: PolicyKind,
    vh: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let only = match vh {
        Some(vh) => Some(vhost(shared, r, vh)?.name.to_string()),
        None => None,
    };
    Ok(shared
        .policies
        .list_kind(kind, only.as_deref())
        .iter()
        .filter(|p| can_see(shared, r, &p.vhost))
        .map(policy_json)
        .collect())
}

/// GET|PUT|DELETE /api/policies/{vhost}/{name} and /api/operator-policies/{vhost}/{name}.
pub(super) async fn one(
    shared: &BrokerShared,
    r: &Req,
    kind: PolicyKind,
    vh: &str,
    name: &str,
) -> R {
    let v = vhost(shared, r, vh)?;
    // Operator policies are for administrators only, as in RabbitMQ.
    let may_change = match kind {
        PolicyKind::User => r.caller.is_admin() || r.caller.has("policymaker"),
        PolicyKind::Operator => r.caller.is_admin(),
    };
    match r.method {
        Method::GET => shared
            .policies
            .get_kind(kind, &v.name, name)
            .map_or(Err(ApiError::NotFound), |p| ok(policy_json(&p))),
        Method::PUT => {
            if !may_change {
                return Err(forbidden());
            }
            let body = r.json()?;
            let pattern = required_str(&body, "pattern")?;
            let definition = match body.get("definition") {
                Some(Value::Object(m)) => m.clone(),
                None => return Err(ApiError::bad("Missing key: definition")),
                Some(_) => return Err(ApiError::bad("'definition' must be an object")),
            };
            let priority = match body.get("priority") {
                None | Some(Value::Null) => 0,
                Some(p) => p
                    .as_i64()
                    .or_else(|| p.as_str().and_then(|s| s.parse().ok()))
                    .ok_or_else(|| ApiError::bad("'priority' must be an integer"))?,
            };
            let apply_to = match body.get("apply-to").and_then(Value::as_str) {
                None => crate::policy::ApplyTo::All,
                Some(a) => crate::policy::ApplyTo::parse(a)
                    .ok_or_else(|| ApiError::bad(format!("invalid apply-to '{a}'")))?,
            };
            let existed = shared.policies.get_kind(kind, &v.name, name).is_some();
            shared
                .set_policy_kind(
                    kind,
                    crate::policy::Policy {
                        vhost: v.name.to_string(),
                        name: name.to_owned(),
                        pattern,
                        apply_to,
                        priority,
                        definition,
                    },
                )
                .await
                .map_err(def_err)?;
            Ok(if existed { no_content() } else { created() })
        }
        Method::DELETE => {
            if !may_change {
                return Err(forbidden());
            }
            shared
                .clear_policy_kind(kind, &v.name, name)
                .await
                .map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}
