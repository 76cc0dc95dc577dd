//! The `/api` endpoints. JSON field names follow RabbitMQ 3.10's management plugin for what
//! clients read.
//!
//! [`route`] is the route table: the one `match` on path segments, each arm calling into the
//! file that serves it (a few one-line answers, such as whoami, are given in place). The files,
//! one per resource group:
//! - `overview`: overview, cluster name, whoami, the alarms health check, the stop/start
//!   switch, this node's figures and memory breakdown;
//! - `cluster`: nodes (every member's figures, running, partitions), join and forget;
//! - `health`: the health checks of what stopping this node costs (mirror sync, quorum) and
//!   RabbitMQ's probes (listeners, local alarms, certificate expiration, ...);
//! - `connections`: connections, channels, consumers of this node;
//! - `cluster_wide`: the same listed through any node (every member's, merged), and one
//!   connection or channel served by the node that has it;
//! - `exchanges`: exchanges;
//! - `queues`: queues;
//! - `messages`: everything that sends a command to a queue: publish to an exchange, get from
//!   a queue, purge, the queue actions (sync, cancel_sync), the aliveness test;
//! - `bindings`: bindings, and the bindings of one exchange or queue;
//! - `access`: vhosts, users, permissions;
//! - `policies`: policies and operator policies;
//! - `definitions`: definitions export and import, whole or of one vhost;
//! - `params`: vhost limits, runtime and global parameters, feature flags, topic permissions
//!   and the other small lists RabbitMQ's tools ask for;
//! - `listing`: RabbitMQ's list parameters (`sort`, `page`, `columns`, ...), applied by
//!   [`listed`] to every list endpoint.
//!
//! The helpers below (answers, vhost lookup and visibility, permission checks, body fields,
//! message stats) are shared by all of them; the files do not import each other, except
//! `queues` listing a queue's consumers through `connections` and `cluster_wide`.

mod access;
mod bindings;
mod cluster;
mod cluster_wide;
mod connections;
mod definitions;
mod exchanges;
mod health;
mod listing;
mod messages;
mod overview;
mod params;
mod policies;
mod queues;

pub(super) use params::auth as auth_settings;

pub use overview::{cluster_name, fds, rss_bytes};

use super::{json as conv, json_resp, ApiError, Req, Resp};
use crate::connection::registry::ConnEntry;
use crate::policy::PolicyKind;
use crate::stats::{Counts, Rates};
use crate::vhost::Vhost;
use crate::BrokerShared;
use hyper::{Method, StatusCode};
use serde_json::{json, Map, Value};
use std::sync::Arc;

/// The RabbitMQ release whose management API shapes this one follows.
pub const COMPAT_VERSION: &str = "3.10.8";

type R = Result<Resp, ApiError>;

fn ok(v: Value) -> R {
    Ok(json_resp(StatusCode::OK, &v))
}

/// Dispatches one authenticated request.
pub async fn route(shared: &Arc<BrokerShared>, r: &Req) -> R {
    let segs: Vec<&str> = r.segs.iter().map(String::as_str).collect();
    let m = &r.method;
    let get = m == Method::GET;
    match segs.as_slice() {
        ["overview"] if get => cluster_wide::overview(shared, r).await,
        ["cluster-name"] if get => ok(json!({"name": overview::cluster_name(shared)})),
        ["nodes"] if get => cluster::list(shared, r).await,
        ["nodes", name] if get => cluster::node_named(shared, r, name).await,
        ["nodes", name, "memory"] if get => {
            let here = if *name == shared.config.node_name {
                ok(overview::memory(shared))
            } else {
                Err(ApiError::NotFound)
            };
            cluster_wide::on_its_node(shared, r, &segs, here).await
        }
        ["whoami"] if get => ok(json!({"name": r.caller.name, "tags": r.caller.tags})),
        ["connections"] if get => {
            let local = connections::list(shared, r);
            cluster_wide::merged(shared, r, &segs, local, &CONNECTIONS).await
        }
        ["connections", name] => {
            let here = connections::one(shared, r, name);
            cluster_wide::on_its_node(shared, r, &segs, here).await
        }
        ["connections", name, "channels"] if get => {
            let here = connections::channels_of(shared, r, name).await;
            let here = match here {
                Ok(items) => listed(r, items, &CHANNELS_OF),
                Err(e) => Err(e),
            };
            cluster_wide::on_its_node(shared, r, &segs, here).await
        }
        ["channels"] if get => {
            let local = connections::channels(shared, r).await;
            cluster_wide::merged(shared, r, &segs, local, &CHANNELS).await
        }
        ["channels", name] if get => {
            let here = connections::channel(shared, r, name).await;
            cluster_wide::on_its_node(shared, r, &segs, here).await
        }
        ["consumers"] if get => {
            no_stats_disabled(r)?;
            let local = connections::consumers(shared, r, None).await;
            cluster_wide::merged(shared, r, &segs, local, &CONSUMERS).await
        }
        ["consumers", vh] if get => {
            no_stats_disabled(r)?;
            let v = vhost(shared, r, vh)?;
            let local = connections::consumers(shared, r, Some(&v.name)).await;
            cluster_wide::merged(shared, r, &segs, local, &CONSUMERS).await
        }
        ["exchanges"] if get => listed(
            r,
            visible_vhosts(shared, r)
                .iter()
                .flat_map(|v| exchanges::list(shared, v))
                .collect(),
            &EXCHANGES,
        ),
        ["exchanges", vh] if get => listed(
            r,
            exchanges::list(shared, &*vhost(shared, r, vh)?),
            &EXCHANGES,
        ),
        ["exchanges", vh, name] => exchanges::one(shared, r, vh, name).await,
        ["exchanges", vh, name, "publish"] if m == Method::POST => {
            messages::publish(shared, r, vh, name).await
        }
        ["exchanges", vh, name, "bindings", dir @ ("source" | "destination")] if get => listed(
            r,
            bindings::of_exchange(shared, r, vh, name, dir)?,
            &BINDINGS,
        ),
        ["queues"] if get => listed(
            r,
            visible_vhosts(shared, r)
                .iter()
                .flat_map(|v| queues::list(shared, v))
                .collect(),
            &QUEUES,
        ),
        ["queues", vh] if get => listed(r, queues::list(shared, &*vhost(shared, r, vh)?), &QUEUES),
        ["queues", vh, name] => queues::one(shared, r, vh, name).await,
        ["queues", vh, name, "get"] if m == Method::POST => {
            messages::get(shared, r, vh, name).await
        }
        ["queues", vh, name, "contents"] if m == Method::DELETE => {
            messages::purge(shared, r, vh, name).await
        }
        ["queues", vh, name, "actions"] if m == Method::POST => {
            messages::action(shared, r, vh, name).await
        }
        ["queues", vh, name, "bindings"] if get => {
            listed(r, bindings::of_queue(shared, r, vh, name)?, &BINDINGS)
        }
        ["bindings"] if get => listed(
            r,
            visible_vhosts(shared, r)
                .iter()
                .flat_map(|v| bindings::list(v))
                .collect(),
            &BINDINGS,
        ),
        ["bindings", vh] if get => listed(r, bindings::list(&*vhost(shared, r, vh)?), &BINDINGS),
        ["bindings", vh, "e", src, kind @ ("q" | "e"), dst] => {
            bindings::pair(shared, r, vh, src, kind, dst).await
        }
        ["bindings", vh, "e", src, kind @ ("q" | "e"), dst, props] => {
            bindings::one(shared, r, vh, src, kind, dst, props).await
        }
        ["vhosts"] if get => listed(
            r,
            visible_vhosts(shared, r)
                .iter()
                .map(|v| access::vhost_json(shared, v))
                .collect(),
            &VHOSTS,
        ),
        ["vhosts", vh] if get => ok(access::vhost_json(shared, &*vhost(shared, r, vh)?)),
        ["vhosts", vh, kind @ ("connections" | "channels")] if get => {
            let v = vhost(shared, r, vh)?;
            let local = if *kind == "connections" {
                connections::list(shared, r)
            } else {
                connections::channels(shared, r).await
            };
            let (all, _) = cluster_wide::gather(shared, r, &[kind], local).await;
            let mine = match all {
                Value::Array(a) => a.into_iter().filter(|c| c["vhost"] == *v.name).collect(),
                _ => Vec::new(),
            };
            listed(r, mine, &CHANNELS_OF)
        }
        ["vhosts", vh, "topic-permissions"] if get => {
            admin(r)?;
            vhost(shared, r, vh)?;
            listed(r, Vec::new(), &PERMISSIONS)
        }
        ["users", "without-permissions"] if get => {
            listed(r, params::users_without_permissions(shared, r)?, &USERS)
        }
        ["users", name, "topic-permissions"] if get => {
            admin(r)?;
            shared.auth.user(name).ok_or(ApiError::NotFound)?;
            listed(r, Vec::new(), &PERMISSIONS)
        }
        ["topic-permissions"] if get => {
            admin(r)?;
            listed(r, Vec::new(), &PERMISSIONS)
        }
        ["topic-permissions", _, _] if get => {
            admin(r)?;
            Err(ApiError::NotFound)
        }
        ["vhost-limits"] if get => listed(r, params::vhost_limits(shared, r, None)?, &UNSORTED),
        ["vhost-limits", vh] if get => {
            listed(r, params::vhost_limits(shared, r, Some(vh))?, &UNSORTED)
        }
        ["vhost-limits", vh, name] => params::vhost_limit(shared, r, vh, name).await,
        ["parameters"] if get => listed(r, params::parameters(shared, r, None, None)?, &PLAIN),
        ["parameters", c] if get => {
            listed(r, params::parameters(shared, r, Some(c), None)?, &PLAIN)
        }
        ["parameters", c, vh] if get => {
            listed(r, params::parameters(shared, r, Some(c), Some(vh))?, &PLAIN)
        }
        ["parameters", c, vh, name] => params::parameter(shared, r, c, vh, name).await,
        ["global-parameters"] if get => listed(r, params::global_parameters(shared), &PLAIN),
        ["global-parameters", name] => params::global_parameter(shared, r, name),
        ["feature-flags"] if get => listed(r, params::feature_flags(), &PLAIN),
        ["extensions"] if get => ok(json!([])),
        ["users"] if get => listed(r, access::users(shared, r)?, &USERS),
        ["users", name] if get => access::user(shared, r, name),
        ["permissions"] if get => listed(r, access::permissions(shared, r)?, &PERMISSIONS),
        ["vhosts", vh, "permissions"] if get => {
            listed(r, access::vhost_permissions(shared, r, vh)?, &PERMISSIONS)
        }
        ["users", name, "permissions"] if get => {
            listed(r, access::user_permissions(shared, r, name)?, &PERMISSIONS)
        }
        ["vhosts", name] => access::vhost_ep(shared, r, name).await,
        ["users", name] => access::user_ep(shared, r, name).await,
        ["permissions", vh, user] => access::permission_ep(shared, r, vh, user).await,
        ["policies"] if get => listed(
            r,
            policies::list(shared, r, PolicyKind::User, None)?,
            &POLICIES,
        ),
        ["policies", vh] if get => listed(
            r,
            policies::list(shared, r, PolicyKind::User, Some(vh))?,
            &POLICIES,
        ),
        ["policies", vh, name] => policies::one(shared, r, PolicyKind::User, vh, name).await,
        ["operator-policies"] if get => listed(
            r,
            policies::list(shared, r, PolicyKind::Operator, None)?,
            &POLICIES,
        ),
        ["operator-policies", vh] if get => listed(
            r,
            policies::list(shared, r, PolicyKind::Operator, Some(vh))?,
            &POLICIES,
        ),
        ["operator-policies", vh, name] => {
            policies::one(shared, r, PolicyKind::Operator, vh, name).await
        }
        ["definitions"] => definitions::definitions(shared, r).await,
        ["definitions", vh] => definitions::vhost_definitions(shared, r, vh).await,
        ["health", "checks", "alarms"] if get => overview::health_alarms(shared),
        ["healthchecks", "node"] if get => health::node_check(shared, None),
        ["healthchecks", "node", node] if get => health::node_check(shared, Some(node)),
        ["health", "checks", "local-alarms"] if get => health::local_alarms(shared),
        ["health", "checks", "port-listener", port] if get => health::port_listener(shared, port),
        ["health", "checks", "protocol-listener", proto] if get => {
            health::protocol_listener(shared, proto)
        }
        ["health", "checks", "virtual-hosts"] if get => health::virtual_hosts(),
        ["health", "checks", "certificate-expiration", within, unit] if get => {
            health::certificate_expiration(shared, within, unit)
        }
        ["health", "checks", "node-is-quorum-critical"] if get => health::quorum_critical(shared),
        ["health", "checks", "node-is-mirror-sync-critical"] if get => {
            health::mirror_sync_critical(shared)
        }
        ["aliveness-test", vh] if get => messages::aliveness(shared, r, vh).await,
        ["warren", "app"] => overview::app(shared, r),
        ["warren", "cluster", "join"] => cluster::join(shared, r).await,
        ["warren", "cluster", "nodes", name] => cluster::forget(shared, r, name).await,
        _ => Err(ApiError::NotFound),
    }
}

// === list endpoints ===

/// How one list endpoint answers RabbitMQ's list parameters (see `listing`).
pub(super) struct ListSpec {
    /// The default sort keys.
    sort: &'static [&'static str],
    /// Whether `page` applies (RabbitMQ pages queues, exchanges, connections, channels and
    /// vhosts only).
    paged: bool,
    /// With `disable_stats=true`: the keys kept (None: statistics dropped, see
    /// [`listing::strip_stats`]).
    basic: Option<&'static [&'static str]>,
    /// With `disable_stats=true` and no `basic`: further keys dropped.
    stats: &'static [&'static str],
}

const fn spec(sort: &'static [&'static str], paged: bool) -> ListSpec {
    ListSpec {
        sort,
        paged,
        basic: None,
        stats: &[],
    }
}

/// RabbitMQ's basic queue columns: what a queue listing keeps with `disable_stats=true`.
const QUEUE_BASIC: &[&str] = &[
    "name",
    "vhost",
    "durable",
    "auto_delete",
    "exclusive",
    "arguments",
    "node",
    "type",
    "state",
    "policy",
];

const QUEUES: ListSpec = ListSpec {
    basic: Some(QUEUE_BASIC),
    ..spec(listing::BY_VHOST_NAME, true)
};
const EXCHANGES: ListSpec = spec(listing::BY_VHOST_NAME, true);
const CONNECTIONS: ListSpec = ListSpec {
    stats: &["recv_oct", "recv_cnt", "send_oct", "send_cnt", "send_pend"],
    ..spec(listing::BY_VHOST_NAME, true)
};
const CHANNELS: ListSpec = spec(listing::BY_VHOST_NAME, true);
/// A connection's channels, and the connections and channels of one vhost: not paged.
const CHANNELS_OF: ListSpec = spec(listing::BY_VHOST_NAME, false);
const CONSUMERS: ListSpec = spec(listing::BY_VHOST_NAME, false);
const VHOSTS: ListSpec = ListSpec {
    stats: &[
        "messages",
        "messages_ready",
        "messages_unacknowledged",
        "recv_oct",
        "send_oct",
    ],
    ..spec(&["name"], true)
};
const BINDINGS: ListSpec = spec(
    &[
        "vhost",
        "source",
        "type",
        "destination",
        "routing_key",
        "properties_key",
    ],
    false,
);
const USERS: ListSpec = spec(listing::BY_VHOST_NAME, false);
const PERMISSIONS: ListSpec = spec(&["vhost", "user"], false);
const POLICIES: ListSpec = spec(&["priority"], false);
/// Most other lists (parameters, feature flags, ...).
pub(super) const PLAIN: ListSpec = spec(listing::BY_VHOST_NAME, false);
/// Limits: RabbitMQ does not sort them.
const UNSORTED: ListSpec = spec(&[], false);

/// A list endpoint's answer under the request's list parameters (a 400 of RabbitMQ's when
/// they are invalid).
pub(super) fn listed(r: &Req, mut items: Vec<Value>, spec: &ListSpec) -> R {
    let q = match listing::ListQuery::parse(&r.query) {
        Ok(q) => q,
        Err(e) => return Ok(json_resp(StatusCode::BAD_REQUEST, &e.body())),
    };
    if q.disable_stats {
        for it in &mut items {
            listing::strip_stats(it, spec.basic, spec.stats);
        }
    }
    match q.apply(items, spec.sort, spec.paged) {
        Ok(v) => ok(v),
        Err(e) => Ok(json_resp(StatusCode::BAD_REQUEST, &e.body())),
    }
}

/// Consumers are statistics: RabbitMQ refuses to list them with `disable_stats=true`.
fn no_stats_disabled(r: &Req) -> Result<(), ApiError> {
    if r.query_flag("disable_stats") {
        return Err(ApiError::bad(
            "Stats in management UI are disabled on this node",
        ));
    }
    Ok(())
}

// === who may see and change what ===

fn forbidden() -> ApiError {
    ApiError::Forbidden("Not administrator user".into())
}

fn admin(r: &Req) -> Result<(), ApiError> {
    if r.caller.is_admin() {
        Ok(())
    } else {
        Err(forbidden())
    }
}

/// Was this connection opened by the caller?
fn owns(r: &Req, e: &ConnEntry) -> bool {
    e.opened
        .lock()
        .as_ref()
        .is_some_and(|o| o.user == r.caller.name)
}

/// May the caller see this vhost's objects?
fn can_see(shared: &BrokerShared, r: &Req, vhost: &str) -> bool {
    r.caller.is_monitor() || shared.auth.permissions(&r.caller.name, vhost).is_some()
}

fn visible_vhosts(shared: &BrokerShared, r: &Req) -> Vec<Arc<Vhost>> {
    shared
        .vhost_list()
        .into_iter()
        .filter(|v| can_see(shared, r, &v.name))
        .collect()
}

/// A vhost the caller may see, or 404.
fn vhost(shared: &BrokerShared, r: &Req, name: &str) -> Result<Arc<Vhost>, ApiError> {
    let v = shared.vhost(name).ok_or(ApiError::NotFound)?;
    if !can_see(shared, r, name) {
        return Err(ApiError::Forbidden(format!(
            "access to vhost '{name}' refused for user '{}'",
            r.caller.name
        )));
    }
    Ok(v)
}

#[derive(Clone, Copy)]
enum Perm {
    Configure,
    Write,
    Read,
}

/// Object permissions for changes through the API (administrators included, as RabbitMQ).
fn check_perm(
    shared: &BrokerShared,
    r: &Req,
    v: &Vhost,
    perm: Perm,
    name: &str,
) -> Result<(), ApiError> {
    let Some(p) = shared.auth.permissions(&r.caller.name, &v.name) else {
        return Err(ApiError::Forbidden(format!(
            "access to vhost '{}' refused for user '{}'",
            v.name, r.caller.name
        )));
    };
    let (pat, what) = match perm {
        Perm::Configure => (&p.configure, "configure"),
        Perm::Write => (&p.write, "write"),
        Perm::Read => (&p.read, "read"),
    };
    if pat.allows(name) {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "{what} access to '{name}' in vhost '{}' refused for user '{}'",
            v.name, r.caller.name
        )))
    }
}

fn visible_conns(shared: &BrokerShared, r: &Req) -> Vec<Arc<ConnEntry>> {
    shared
        .registry
        .connections()
        .into_iter()
        .filter(|e| r.caller.is_monitor() || owns(r, e))
        .collect()
}

fn def_err(e: crate::definitions::DefError) -> ApiError {
    match e {
        crate::definitions::DefError::NotFound(_) => ApiError::NotFound,
        crate::definitions::DefError::Invalid(m) => ApiError::BadRequest(m),
        crate::definitions::DefError::Io(m) => ApiError::Internal(m),
        crate::definitions::DefError::Unavailable(m) => ApiError::Unavailable(m),
    }
}

// === request bodies and URLs ===

/// A string field of a request body that must be there (400 naming the key otherwise).
fn required_str(body: &Value, key: &str) -> Result<String, ApiError> {
    match body.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None => Err(ApiError::bad(format!("Missing key: {key}"))),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a string"))),
    }
}

/// A string field of a request body that may be absent or null (empty then).
fn optional_str(body: &Value, key: &str) -> Result<String, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(ApiError::bad(format!("'{key}' must be a string"))),
    }
}

fn body_bool(body: &Value, k: &str, default: bool) -> Result<bool, ApiError> {
    match body.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(_) => Err(ApiError::bad(format!("'{k}' must be a boolean"))),
    }
}

/// The `arguments` of a request body: an object, absent or null (none), or an empty list,
/// which RabbitMQ takes for none (pyrabbit2 sends `"arguments": []`).
fn body_arguments(body: &Value) -> Result<amq_protocol::types::FieldTable, ApiError> {
    match body.get("arguments") {
        Some(Value::Array(a)) if a.is_empty() => Ok(Default::default()),
        a => conv::input_table(a.unwrap_or(&Value::Null), "arguments").map_err(ApiError::bad),
    }
}

/// "amq.default" in a URL names the default exchange.
fn exchange_url_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

// === message stats ===

fn details(m: &mut Map<String, Value>, k: &str, count: u64, rate: f64) {
    m.insert(k.into(), json!(count));
    m.insert(format!("{k}_details"), json!({ "rate": rate }));
}

/// The keys of RabbitMQ's message stats of a channel or vhost that come from publishing.
const PUBLISH_KEYS: &[&str] = &["publish", "confirm", "return_unroutable", "drop_unroutable"];
/// The keys that come from consuming and getting.
const DELIVER_KEYS: &[&str] = &[
    "get",
    "get_no_ack",
    "deliver",
    "deliver_no_ack",
    "redeliver",
    "ack",
    "deliver_get",
    "get_empty",
];

/// RabbitMQ's message_stats of a channel or vhost: the publishing keys once something was
/// published, the delivering keys once something was delivered, got (or found empty) or
/// acknowledged; None while neither happened (RabbitMQ then has no `message_stats` key).
fn grouped_message_stats(c: &Counts, r: &Rates) -> Option<Value> {
    let mut keys = Vec::new();
    if c.publish > 0 {
        keys.extend_from_slice(PUBLISH_KEYS);
    }
    if c.deliver_get() + c.get_empty + c.ack + c.redeliver > 0 {
        keys.extend_from_slice(DELIVER_KEYS);
    }
    (!keys.is_empty()).then(|| message_stats(c, r, &keys))
}

/// RabbitMQ's message_stats object for the given keys.
fn message_stats(c: &Counts, r: &Rates, keys: &[&str]) -> Value {
    let mut m = Map::new();
    for k in keys {
        let (n, rate) = match *k {
            "publish" => (c.publish, r.publish),
            "confirm" => (c.confirm, r.confirm),
            "deliver" => (c.deliver, r.deliver),
            "deliver_no_ack" => (c.deliver_no_ack, r.deliver_no_ack),
            "get" => (c.get, r.get),
            "get_no_ack" => (c.get_no_ack, r.get_no_ack),
            "get_empty" => (c.get_empty, r.get_empty),
            "deliver_get" => (c.deliver_get(), r.deliver_get),
            "ack" => (c.ack, r.ack),
            "redeliver" => (c.redeliver, r.redeliver),
            "return_unroutable" => (c.return_unroutable, r.return_unroutable),
            "drop_unroutable" => (c.drop_unroutable, r.drop_unroutable),
            _ => (0, 0.0),
        };
        details(&mut m, k, n, rate);
    }
    Value::Object(m)
}
