//! Runtime parameters and the small read-only lists RabbitMQ's management UI and tools ask
//! for, with RabbitMQ 3.10's shapes:
//! - `GET /api/vhost-limits`, `GET /api/vhost-limits/{vhost}`,
//!   `PUT|DELETE /api/vhost-limits/{vhost}/{max-connections|max-queues}` (`{"value": N}`,
//!   administrators only). The broker enforces them as RabbitMQ does: connection.open on a
//!   vhost at `max-connections` is refused (530), a queue.declare that would pass
//!   `max-queues` fails (406); a negative value is no limit, 0 admits nothing. Limits are
//!   kept with the definitions (`BrokerShared::set_vhost_limits`): persisted, exported as
//!   RabbitMQ's `vhost-limits` parameter, and replicated to every member of a cluster.
//! - `GET /api/parameters[/{component}[/{vhost}[/{name}]]]`: the vhost limits, as RabbitMQ
//!   lists them (component `vhost-limits`, name `limits`); warren has no other runtime
//!   parameters (no federation or shovel), so every other component is empty.
//! - `GET /api/global-parameters[/{name}]`: `cluster_name`.
//! - `GET /api/topic-permissions` (and per vhost and user): empty, warren has no topic
//!   permissions.
//! - `GET /api/users/without-permissions`: users with no permission in any vhost.
//! - `GET /api/feature-flags`: the RabbitMQ 3.10 feature flags whose behaviour warren has, all
//!   enabled.
//! - `GET /api/extensions`: none (the UI has no plugins).
//! - `GET /api/auth`: no OAuth 2 / UAA sign-in.

use super::{admin, def_err, ok, vhost, visible_vhosts, R};
use crate::definitions::json::{limit_not_a_number, unknown_limit, LIMIT_NAMES};
use crate::mgmt::{json_resp, no_content, ApiError, Req};
use crate::vhost::Vhost;
use crate::BrokerShared;
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};

fn limits_value(v: &Vhost) -> Option<Value> {
    let l = v.limits();
    if l.is_empty() {
        return None;
    }
    let m: Map<String, Value> = l.into_iter().map(|(k, n)| (k, json!(n))).collect();
    Some(Value::Object(m))
}

fn limits_json(v: &Vhost) -> Option<Value> {
    limits_value(v).map(|value| json!({"vhost": &*v.name, "value": value}))
}

/// GET /api/vhost-limits[/{vhost}].
pub(super) fn vhost_limits(
    shared: &BrokerShared,
    r: &Req,
    vh: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let vhosts = match vh {
        Some(vh) => vec![vhost(shared, r, vh)?],
        None => visible_vhosts(shared, r),
    };
    Ok(vhosts.iter().filter_map(|v| limits_json(v)).collect())
}

/// A limit's value as RabbitMQ validates it: a number (an integer here).
fn limit_of(body: &Value, name: &str) -> Result<i64, ApiError> {
    match body.get("value") {
        None => Err(ApiError::bad("[{key_missing,value}]")),
        Some(v) => v
            .as_i64()
            .ok_or_else(|| ApiError::bad(limit_not_a_number(name, v))),
    }
}

/// PUT|DELETE /api/vhost-limits/{vhost}/{name}.
pub(super) async fn vhost_limit(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    admin(r)?;
    let Some(v) = shared.vhost(vh) else {
        return Ok(json_resp(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "reason": "vhost_not_found"}),
        ));
    };
    match r.method {
        Method::PUT => {
            let body = r.json()?;
            let n = limit_of(&body, name)?;
            if !LIMIT_NAMES.contains(&name) {
                return Err(ApiError::bad(unknown_limit(name, &json!(n))));
            }
            let mut l = v.limits();
            l.insert(name.to_owned(), n);
            shared.set_vhost_limits(&v.name, l).await.map_err(def_err)?;
            tracing::info!(vhost = %v.name, limit = name, value = n, "vhost limit set");
            Ok(no_content())
        }
        Method::DELETE => {
            let mut l = v.limits();
            if l.remove(name).is_some() {
                shared.set_vhost_limits(&v.name, l).await.map_err(def_err)?;
            }
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// GET /api/parameters[/{component}[/{vhost}]].
pub(super) fn parameters(
    shared: &BrokerShared,
    r: &Req,
    component: Option<&str>,
    vh: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let vhosts = match vh {
        Some(vh) => vec![vhost(shared, r, vh)?],
        None => visible_vhosts(shared, r),
    };
    if component.is_some_and(|c| c != "vhost-limits") {
        return Ok(Vec::new());
    }
    Ok(vhosts
        .iter()
        .filter_map(|v| {
            limits_value(v).map(|value| {
                json!({"vhost": &*v.name, "component": "vhost-limits", "name": "limits",
                       "value": value})
            })
        })
        .collect())
}

/// GET|PUT|DELETE /api/parameters/{component}/{vhost}/{name}: the vhost limits as one
/// parameter (`vhost-limits` / `limits`); other components are unknown.
pub(super) async fn parameter(
    shared: &BrokerShared,
    r: &Req,
    component: &str,
    vh: &str,
    name: &str,
) -> R {
    let v = vhost(shared, r, vh)?;
    if component != "vhost-limits" || name != "limits" {
        return match r.method {
            Method::GET | Method::DELETE => Err(ApiError::NotFound),
            _ => Err(ApiError::bad(format!(
                "Validation failed\n\ncomponent {component} not found\n"
            ))),
        };
    }
    match r.method {
        Method::GET => {
            let value = limits_value(&v).ok_or(ApiError::NotFound)?;
            ok(json!({"vhost": &*v.name, "component": component, "name": name, "value": value}))
        }
        Method::PUT => {
            admin(r)?;
            let body = r.json()?;
            let Some(value @ Value::Object(_)) = body.get("value") else {
                return Err(ApiError::bad("[{key_missing,value}]"));
            };
            let limits =
                crate::definitions::json::limits_of(value).map_err(ApiError::BadRequest)?;
            shared
                .set_vhost_limits(&v.name, limits)
                .await
                .map_err(def_err)?;
            Ok(no_content())
        }
        Method::DELETE => {
            admin(r)?;
            shared
                .set_vhost_limits(&v.name, Default::default())
                .await
                .map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// GET /api/global-parameters.
pub(super) fn global_parameters(shared: &BrokerShared) -> Vec<Value> {
    vec![json!({"name": "cluster_name", "value": super::cluster_name(shared)})]
}

/// GET /api/global-parameters/{name}.
pub(super) fn global_parameter(shared: &BrokerShared, r: &Req, name: &str) -> R {
    if r.method != Method::GET {
        return Err(ApiError::MethodNotAllowed);
    }
    global_parameters(shared)
        .into_iter()
        .find(|p| p["name"] == name)
        .map_or(Err(ApiError::NotFound), ok)
}

/// GET /api/users/without-permissions.
pub(super) fn users_without_permissions(
    shared: &BrokerShared,
    r: &Req,
) -> Result<Vec<Value>, ApiError> {
    admin(r)?;
    let with: std::collections::HashSet<String> = shared
        .auth
        .permission_entries()
        .into_iter()
        .map(|(u, _, _)| u)
        .collect();
    Ok(shared
        .auth
        .users()
        .iter()
        .filter(|u| !with.contains(&u.name))
        .map(super::access::user_json)
        .collect())
}

/// GET /api/feature-flags: RabbitMQ 3.10's flags for behaviour warren has.
pub(super) fn feature_flags() -> Vec<Value> {
    [
        (
            "drop_unroutable_metric",
            "Count unroutable publishes to be dropped in stats",
            "rabbitmq_management_agent",
        ),
        (
            "empty_basic_get_metric",
            "Count AMQP `basic.get` on empty queues in stats",
            "rabbitmq_management_agent",
        ),
        (
            "implicit_default_bindings",
            "Default bindings are now implicit, instead of being stored in the database",
            "rabbit",
        ),
        (
            "virtual_host_metadata",
            "Virtual host metadata (description, tags, etc)",
            "rabbit",
        ),
    ]
    .iter()
    .map(|(name, desc, by)| {
        json!({"name": name, "desc": desc, "doc_url": "", "state": "enabled",
               "stability": "stable", "provided_by": by})
    })
    .collect()
}

/// GET /api/auth: the UI's sign-in is basic auth only.
/// `GET /api/auth`: how to log in (no OAuth here). Served before authentication.
pub(crate) fn auth() -> Value {
    json!({"enable_uaa": false, "uaa_client_id": "", "uaa_location": ""})
}
