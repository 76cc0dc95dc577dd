//! Who may do what where: vhosts, users and their permissions.
//! - `GET /api/vhosts`, `GET|PUT|DELETE /api/vhosts/{vhost}`
//! - `GET /api/users`, `GET|PUT|DELETE /api/users/{name}` (administrators only)
//! - `GET /api/permissions`, `GET /api/vhosts/{vhost}/permissions`,
//!   `GET /api/users/{name}/permissions`, `GET|PUT|DELETE /api/permissions/{vhost}/{user}`
//!   (administrators only)
//!
//! Changes go through `BrokerShared`'s definitions methods, which persist them.

use super::{
    admin, def_err, details, grouped_message_stats, ok, optional_str, required_str, vhost, R,
};
use crate::mgmt::{created, no_content, ApiError, Req};
use crate::vhost::Vhost;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Map, Value};

pub(super) fn vhost_json(shared: &BrokerShared, v: &Vhost) -> Value {
    let qs: Vec<_> = v.snapshot().queues.values().cloned().collect();
    let ready: u64 = qs.iter().map(|q| u64::from(q.message_count())).sum();
    let unacked: u64 = qs
        .iter()
        .map(|q| q.stats.unacked.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let mut m = Map::new();
    m.insert("name".into(), json!(&*v.name));
    let meta = shared.auth.vhost_meta(&v.name).unwrap_or_default();
    m.insert("description".into(), json!(meta.description));
    m.insert("tags".into(), json!(meta.tags));
    m.insert(
        "metadata".into(),
        json!({"description": meta.description, "tags": meta.tags}),
    );
    m.insert("tracing".into(), json!(false));
    m.insert("default_queue_type".into(), json!("classic"));
    m.insert(
        "cluster_state".into(),
        json!({ shared.config.node_name.clone(): "running" }),
    );
    details(&mut m, "messages", ready + unacked, 0.0);
    details(&mut m, "messages_ready", ready, 0.0);
    details(&mut m, "messages_unacknowledged", unacked, 0.0);
    let (mut recv, mut send) = (0, 0);
    let (mut recv_rate, mut send_rate) = (0.0, 0.0);
    for e in shared.registry.connections() {
        if e.opened.lock().as_ref().is_none_or(|o| o.vhost != *v.name) {
            continue;
        }
        let c = e.stats.counts();
        recv += c.recv_oct;
        send += c.send_oct;
        let r = shared.sampler.conn_rates(e.id);
        recv_rate += r.recv_oct;
        send_rate += r.send_oct;
    }
    details(&mut m, "recv_oct", recv, recv_rate);
    details(&mut m, "send_oct", send, send_rate);
    // The vhost's message stats: what the channels opened on it counted, closed ones
    // included, as RabbitMQ's (absent until one of them published or consumed).
    let (counts, rates) = shared.sampler.vhost_stats(shared, v);
    if let Some(s) = grouped_message_stats(&counts, &rates) {
        m.insert("message_stats".into(), s);
    }
    Value::Object(m)
}

pub(super) fn user_json(u: &crate::auth::User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password.hash,
        "hashing_algorithm": u.password.algorithm.as_str(),
        "tags": u.tags,
        "limits": {},
    })
}

/// Tags as RabbitMQ accepts them: a list or a comma-separated string.
fn tags_of(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| ApiError::bad("tags must be strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::bad("'tags' must be a string or a list")),
    }
}

/// PUT|DELETE /api/vhosts/{vhost} (GET is in the route table, for the caller's vhosts).
pub(super) async fn vhost_ep(shared: &BrokerShared, r: &Req, name: &str) -> R {
    match r.method {
        Method::PUT => {
            admin(r)?;
            let body = r.json()?;
            let description = optional_str(&body, "description")?;
            let tags = tags_of(body.get("tags"))?;
            let is_new = shared
                .add_vhost(name, crate::auth::VhostMeta { description, tags })
                .await
                .map_err(def_err)?;
            Ok(if is_new { created() } else { no_content() })
        }
        Method::DELETE => {
            admin(r)?;
            shared.delete_vhost(name).await.map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// GET /api/users.
pub(super) fn users(shared: &BrokerShared, r: &Req) -> Result<Vec<Value>, ApiError> {
    admin(r)?;
    Ok(shared.auth.users().iter().map(user_json).collect())
}

/// GET /api/users/{name}.
pub(super) fn user(shared: &BrokerShared, r: &Req, name: &str) -> R {
    admin(r)?;
    shared
        .auth
        .user(name)
        .map_or(Err(ApiError::NotFound), |u| ok(user_json(&u)))
}

/// PUT|DELETE /api/users/{name}.
pub(super) async fn user_ep(shared: &BrokerShared, r: &Req, name: &str) -> R {
    admin(r)?;
    match r.method {
        Method::PUT => {
            let body = r.json()?;
            if !body.is_object() {
                return Err(ApiError::bad("not_json"));
            }
            let tags = tags_of(body.get("tags"))?;
            let cred = match (body.get("password"), body.get("password_hash")) {
                (Some(Value::String(p)), _) => Some(crate::auth::PasswordHash::new(p)),
                (Some(_), _) => return Err(ApiError::bad("'password' must be a string")),
                (None, Some(Value::String(h))) => {
                    let alg = match body.get("hashing_algorithm").and_then(Value::as_str) {
                        None => crate::auth::HashAlgorithm::default(),
                        Some(a) => crate::auth::HashAlgorithm::parse(a).ok_or_else(|| {
                            ApiError::bad(format!("unsupported hashing_algorithm '{a}'"))
                        })?,
                    };
                    if h.is_empty() {
                        None
                    } else {
                        Some(
                            crate::auth::PasswordHash::from_stored(alg, h)
                                .map_err(ApiError::BadRequest)?,
                        )
                    }
                }
                (None, Some(_)) => return Err(ApiError::bad("'password_hash' must be a string")),
                (None, None) => {
                    if shared.auth.user(name).is_none() {
                        return Err(ApiError::bad(
                            "Must specify either password or password_hash",
                        ));
                    }
                    None
                }
            };
            let is_new = shared.put_user(name, cred, tags).await.map_err(def_err)?;
            Ok(if is_new { created() } else { no_content() })
        }
        Method::DELETE => {
            shared.delete_user(name).await.map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// GET /api/permissions.
pub(super) fn permissions(shared: &BrokerShared, r: &Req) -> Result<Vec<Value>, ApiError> {
    admin(r)?;
    Ok(permission_list(shared, |_, _| true))
}

/// GET /api/vhosts/{vhost}/permissions.
pub(super) fn vhost_permissions(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
) -> Result<Vec<Value>, ApiError> {
    admin(r)?;
    let v = vhost(shared, r, vh)?;
    Ok(permission_list(shared, |_, pv| pv == &*v.name))
}

/// GET /api/users/{name}/permissions.
pub(super) fn user_permissions(
    shared: &BrokerShared,
    r: &Req,
    name: &str,
) -> Result<Vec<Value>, ApiError> {
    admin(r)?;
    if shared.auth.user(name).is_none() {
        return Err(ApiError::NotFound);
    }
    Ok(permission_list(shared, |u, _| u == name))
}

/// GET|PUT|DELETE /api/permissions/{vhost}/{user}.
pub(super) async fn permission_ep(shared: &BrokerShared, r: &Req, vh: &str, user: &str) -> R {
    admin(r)?;
    match r.method {
        Method::GET => shared
            .auth
            .permissions(user, vh)
            .map_or(Err(ApiError::NotFound), |p| ok(perm_json(user, vh, &p))),
        Method::PUT => {
            let body = r.json()?;
            let field = |k: &str| required_str(&body, k);
            let spec = crate::auth::PermissionSpec {
                configure: field("configure")?,
                write: field("write")?,
                read: field("read")?,
            };
            let existed = shared.auth.permissions(user, vh).is_some();
            shared
                .set_permissions(user, vh, spec)
                .await
                .map_err(def_err)?;
            Ok(if existed { no_content() } else { created() })
        }
        Method::DELETE => {
            shared.clear_permissions(user, vh).await.map_err(def_err)?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Permission entries `(user, vhost)` accepted by `keep`, as RabbitMQ lists them.
fn permission_list(shared: &BrokerShared, keep: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    shared
        .auth
        .permission_entries()
        .into_iter()
        .filter(|(u, v, _)| keep(u, v))
        .map(|(u, v, p)| perm_json(&u, &v, &p))
        .collect()
}

fn perm_json(user: &str, vhost: &str, p: &crate::auth::Permissions) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "configure": p.configure.as_str(),
        "write": p.write.as_str(),
        "read": p.read.as_str(),
    })
}
