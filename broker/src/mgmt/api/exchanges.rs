//! Exchanges:
//! - `GET /api/exchanges`, `GET /api/exchanges/{vhost}`
//! - `GET|PUT|DELETE /api/exchanges/{vhost}/{name}`
//!
//! "amq.default" in a URL names the default exchange, which is listed first in every vhost and
//! cannot be changed. Publishing to an exchange is in `messages`, an exchange's bindings in
//! `bindings`.

use super::{
    body_arguments, body_bool, check_perm, exchange_url_name, ok, required_str, vhost, Perm, R,
};
use crate::exchange::ExchangeKind;
use crate::mgmt::json as conv;
use crate::mgmt::{created, no_content, ApiError, Req};
use crate::vhost::Vhost;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Value};

/// RabbitMQ's message stats of an exchange: `publish_in` once a message was published to it,
/// `publish_out` once it routed one to a queue (each queue counts once); None before either.
fn exchange_stats(
    shared: &BrokerShared,
    vhost: &str,
    e: &crate::exchange::Exchange,
) -> Option<Value> {
    let (pin, pout) = e.stats.counts();
    if pin == 0 {
        return None;
    }
    let (rin, rout) = shared.sampler.exchange_rates(vhost, &e.name);
    let mut m = serde_json::Map::new();
    m.insert("publish_in".into(), json!(pin));
    m.insert("publish_in_details".into(), json!({ "rate": rin }));
    if pout > 0 {
        m.insert("publish_out".into(), json!(pout));
        m.insert("publish_out_details".into(), json!({ "rate": rout }));
    }
    Some(Value::Object(m))
}

fn exchange_json(shared: &BrokerShared, vhost: &str, e: &crate::exchange::Exchange) -> Value {
    let mut v = json!({
        "name": &*e.name,
        "vhost": vhost,
        "type": e.kind.as_str(),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": conv::table(&e.arguments),
        "user_who_performed_action": "rmq-internal",
    });
    if let Value::Object(m) = &mut v {
        // Present only when a policy applies, as in RabbitMQ.
        if let Some(p) = &e.policy {
            m.insert("policy".into(), json!(p.name));
        }
        if let Some(s) = exchange_stats(shared, vhost, e) {
            m.insert("message_stats".into(), s);
        }
    }
    v
}

fn default_exchange_json(shared: &BrokerShared, v: &Vhost) -> Value {
    let mut out = json!({
        "name": "",
        "vhost": &*v.name,
        "type": "direct",
        "durable": true,
        "auto_delete": false,
        "internal": false,
        "arguments": {},
        "user_who_performed_action": "rmq-internal",
    });
    let stats = v
        .exchange("")
        .and_then(|e| exchange_stats(shared, &v.name, &e));
    if let (Some(s), Value::Object(m)) = (stats, &mut out) {
        m.insert("message_stats".into(), s);
    }
    out
}

/// The exchanges of one vhost: the default exchange, then the others by name.
pub(super) fn list(shared: &BrokerShared, v: &Vhost) -> Vec<Value> {
    let topo = v.snapshot();
    let mut names: Vec<_> = topo.exchanges.keys().cloned().collect();
    names.sort();
    let mut out = vec![default_exchange_json(shared, v)];
    for n in names {
        if let Some(e) = topo.exchanges.get(&n) {
            if !e.name.is_empty() {
                out.push(exchange_json(shared, &v.name, e));
            }
        }
    }
    out
}

/// GET|PUT|DELETE /api/exchanges/{vhost}/{name}.
pub(super) async fn one(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    let name = exchange_url_name(name);
    match r.method {
        Method::GET => {
            if name.is_empty() {
                return ok(default_exchange_json(shared, &v));
            }
            let e = v.exchange(name).ok_or(ApiError::NotFound)?;
            ok(exchange_json(shared, &v.name, &e))
        }
        Method::PUT => {
            let body = r.json()?;
            if name.is_empty() {
                return Err(ApiError::Forbidden(
                    "operation not permitted on the default exchange".into(),
                ));
            }
            check_perm(shared, r, &v, Perm::Configure, name)?;
            // RabbitMQ's default when the body names no type.
            let t = match body.get("type") {
                None | Some(Value::Null) => "direct".to_owned(),
                Some(_) => required_str(&body, "type")?,
            };
            let kind = ExchangeKind::parse(&t)
                .ok_or_else(|| ApiError::bad(format!("invalid exchange type '{t}'")))?;
            if name.starts_with("amq.") && v.exchange(name).is_none() {
                return Err(ApiError::Forbidden(format!(
                    "exchange name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            // Not durable unless asked, as RabbitMQ's PUT (exchange.declare's default).
            let durable = body_bool(&body, "durable", false)?;
            let auto_delete = body_bool(&body, "auto_delete", false)?;
            let internal = body_bool(&body, "internal", false)?;
            let args = body_arguments(&body)?;
            let existed = v.exchange(name).is_some();
            crate::topology::declare_exchange(
                shared,
                &v,
                name,
                kind,
                durable,
                auto_delete,
                internal,
                args,
            )
            .await?;
            Ok(if existed { no_content() } else { created() })
        }
        Method::DELETE => {
            if name.is_empty() || name.starts_with("amq.") {
                return Err(ApiError::Forbidden(format!(
                    "operation not permitted on exchange '{name}'"
                )));
            }
            check_perm(shared, r, &v, Perm::Configure, name)?;
            if v.exchange(name).is_none() {
                return Err(ApiError::NotFound);
            }
            crate::topology::delete_exchange(shared, &v, name, r.query_flag("if-unused")).await?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}
