//! Bindings:
//! - `GET /api/bindings`, `GET /api/bindings/{vhost}`
//! - `GET|POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}` (POST answers 201 with
//!   the new binding's URL in `Location`)
//! - `GET|DELETE /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{properties_key}`
//! - `GET /api/exchanges/{vhost}/{name}/bindings/{source|destination}`
//! - `GET /api/queues/{vhost}/{name}/bindings`
//!
//! Listings include the default exchange's implicit binding to every queue, as RabbitMQ's. A
//! binding is named by its [`properties_key`].

use super::{body_arguments, check_perm, exchange_url_name, ok, optional_str, vhost, Perm, R};
use crate::exchange::{Binding, Destination};
use crate::mgmt::json as conv;
use crate::mgmt::{created, no_content, percent_decode, ApiError, Req};
use crate::vhost::Vhost;
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Value};

/// RabbitMQ's properties key: the routing key, URL-quoted, plus "~" and a hash of the
/// arguments when there are any.
fn properties_key(rk: &str, args: &Value) -> String {
    let mut k = String::new();
    for b in rk.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
            k.push(b as char);
        } else {
            k.push_str(&format!("%{b:02X}"));
        }
    }
    if args.as_object().is_some_and(|m| !m.is_empty()) {
        // FNV-1a of the canonical JSON text: stable across calls and restarts.
        let mut h: u64 = 0xcbf29ce484222325;
        for b in args.to_string().bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100000001b3);
        }
        k.push('~');
        k.push_str(&conv::b64_encode(&h.to_be_bytes()).replace(['+', '/', '='], ""));
    }
    if k.is_empty() {
        k.push('~');
    }
    k
}

fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    let (dest, kind) = match &b.destination {
        Destination::Queue(q) => (q, "queue"),
        Destination::Exchange(e) => (e, "exchange"),
    };
    let args = conv::table(&b.arguments);
    json!({
        "source": source,
        "vhost": vhost,
        "destination": &**dest,
        "destination_type": kind,
        "routing_key": b.routing_key,
        "arguments": args,
        "properties_key": properties_key(&b.routing_key, &args),
    })
}

/// The bindings of one vhost: the default exchange's to each queue by queue name, then each
/// exchange's by exchange name.
pub(super) fn list(v: &Vhost) -> Vec<Value> {
    let topo = v.snapshot();
    let mut qn: Vec<_> = topo.queues.keys().cloned().collect();
    qn.sort();
    let mut out: Vec<Value> = qn
        .iter()
        .map(|q| {
            json!({
                "source": "",
                "vhost": &*v.name,
                "destination": &**q,
                "destination_type": "queue",
                "routing_key": &**q,
                "arguments": {},
                "properties_key": properties_key(q, &json!({})),
            })
        })
        .collect();
    let mut en: Vec<_> = topo.exchanges.keys().cloned().collect();
    en.sort();
    for n in en {
        if let Some(e) = topo.exchanges.get(&n) {
            for b in e.bindings() {
                out.push(binding_json(&v.name, &e.name, b));
            }
        }
    }
    out
}

/// GET /api/exchanges/{vhost}/{name}/bindings/{source|destination}.
pub(super) fn of_exchange(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
    name: &str,
    dir: &str,
) -> Result<Vec<Value>, ApiError> {
    let v = vhost(shared, r, vh)?;
    let name = exchange_url_name(name);
    if v.exchange(name).is_none() {
        return Err(ApiError::NotFound);
    }
    Ok(list(&v)
        .into_iter()
        .filter(|b| {
            if dir == "source" {
                b["source"] == name
            } else {
                b["destination"] == name && b["destination_type"] == "exchange"
            }
        })
        .collect())
}

/// GET /api/queues/{vhost}/{name}/bindings.
pub(super) fn of_queue(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
    name: &str,
) -> Result<Vec<Value>, ApiError> {
    let v = vhost(shared, r, vh)?;
    if v.queue(name).is_none() {
        return Err(ApiError::NotFound);
    }
    Ok(list(&v)
        .into_iter()
        .filter(|b| b["destination"] == name && b["destination_type"] == "queue")
        .collect())
}

fn destination(kind: &str, name: &str) -> Destination {
    if kind == "q" {
        Destination::Queue(name.into())
    } else {
        Destination::Exchange(name.into())
    }
}

/// Both ends must exist (404 otherwise).
fn binding_ends(v: &Vhost, src: &str, kind: &str, dst: &str) -> Result<(), ApiError> {
    let src_ok = src.is_empty() || v.exchange(src).is_some();
    let dst_ok = if kind == "q" {
        v.queue(dst).is_some()
    } else {
        v.exchange(dst).is_some()
    };
    if src_ok && dst_ok {
        Ok(())
    } else {
        Err(ApiError::NotFound)
    }
}

fn pair_bindings(v: &Vhost, src: &str, kind: &str, dst: &str) -> Vec<Value> {
    let want = if kind == "q" { "queue" } else { "exchange" };
    list(v)
        .into_iter()
        .filter(|b| b["source"] == src && b["destination"] == dst && b["destination_type"] == want)
        .collect()
}

/// GET|POST /api/bindings/{vhost}/e/{source}/{q|e}/{destination}.
pub(super) async fn pair(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
    src: &str,
    kind: &str,
    dst: &str,
) -> R {
    let v = vhost(shared, r, vh)?;
    let src = exchange_url_name(src);
    binding_ends(&v, src, kind, dst)?;
    match r.method {
        Method::GET => ok(Value::Array(pair_bindings(&v, src, kind, dst))),
        Method::POST => {
            if src.is_empty() {
                return Err(ApiError::Forbidden(
                    "operation not permitted on the default exchange".into(),
                ));
            }
            let body = r.json()?;
            if !body.is_object() {
                return Err(ApiError::bad("not_json"));
            }
            let rk = optional_str(&body, "routing_key")?;
            let args = body_arguments(&body)?;
            check_perm(shared, r, &v, Perm::Write, dst)?;
            check_perm(shared, r, &v, Perm::Read, src)?;
            let key = properties_key(&rk, &conv::table(&args));
            crate::topology::bind(shared, &v, src, destination(kind, dst), &rk, args).await?;
            let mut resp = created();
            let loc = format!(
                "/api/bindings/{}/e/{}/{kind}/{}/{}",
                quote(&v.name),
                quote(src),
                quote(dst),
                quote(&key)
            );
            if let Ok(h) = hyper::header::HeaderValue::from_str(&loc) {
                resp.headers_mut().insert(hyper::header::LOCATION, h);
            }
            Ok(resp)
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

fn quote(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            o.push_str(&format!("%{b:02X}"));
        }
    }
    o
}

/// GET|DELETE /api/bindings/{vhost}/e/{source}/{q|e}/{destination}/{properties_key}.
pub(super) async fn one(
    shared: &BrokerShared,
    r: &Req,
    vh: &str,
    src: &str,
    kind: &str,
    dst: &str,
    props: &str,
) -> R {
    let v = vhost(shared, r, vh)?;
    let src = exchange_url_name(src);
    binding_ends(&v, src, kind, dst)?;
    let b = pair_bindings(&v, src, kind, dst)
        .into_iter()
        .find(|b| {
            // The key as listed (clients quote it once more in the URL, as for RabbitMQ),
            // or the key's own unquoted form.
            b["properties_key"]
                .as_str()
                .is_some_and(|k| k == props || percent_decode(k) == props)
        })
        .ok_or(ApiError::NotFound)?;
    match r.method {
        Method::GET => ok(b),
        Method::DELETE => {
            if src.is_empty() {
                return Err(ApiError::Forbidden(
                    "operation not permitted on the default exchange".into(),
                ));
            }
            check_perm(shared, r, &v, Perm::Write, dst)?;
            check_perm(shared, r, &v, Perm::Read, src)?;
            let rk = b["routing_key"].as_str().unwrap_or("").to_owned();
            let args = conv::to_table(&b["arguments"]).unwrap_or_default();
            crate::topology::unbind(shared, &v, src, destination(kind, dst), &rk, args).await?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn properties_keys_like_rabbitmq() {
        assert_eq!(properties_key("a.#", &json!({})), "a.%23");
        assert_eq!(properties_key("", &json!({})), "~");
        let k = properties_key("k", &json!({"x-match": "all"}));
        assert!(k.starts_with("k~") && k.len() > 3, "{k}");
        assert_eq!(k, properties_key("k", &json!({"x-match": "all"})));
        assert_ne!(k, properties_key("k", &json!({"x-match": "any"})));
    }
}
