//! Definitions (administrators only):
//! - `GET /api/definitions`: everything, in RabbitMQ's definitions.json shape
//! - `POST /api/definitions`: import, 204 once applied
//! - `GET /api/definitions/{vhost}`: one vhost's policies, queues, exchanges and bindings,
//!   without their `vhost` fields (RabbitMQ's per-vhost shape)
//! - `POST /api/definitions/{vhost}`: imports such a document into that vhost (its users,
//!   vhosts and permissions, if any, are ignored, as RabbitMQ ignores them).
//!
//! An import keeps a queue or an exchange that exists already as it is, whatever the document
//! says of it, and imports the rest, as RabbitMQ does (an existing queue with other arguments
//! is no error); exchanges and queues named `amq.*` and the default exchange are skipped, as
//! in RabbitMQ. Each entry kept or skipped is logged, and the answer's
//! [`KEPT_HEADER`] counts them. Any other error stops the import, naming the entry, with
//! nothing applied. The export and import themselves are `crate::definitions`.

use super::{admin, def_err, ok, vhost, R};
use crate::definitions::Definitions;
use crate::mgmt::{no_content, ApiError, Req};
use crate::BrokerShared;
use hyper::header::HeaderValue;
use hyper::Method;
use serde_json::{json, Map, Value};

/// Response header of an import: how many entries were kept as they are or skipped.
pub const KEPT_HEADER: &str = "x-warren-definitions-kept";

/// GET|POST /api/definitions.
pub(super) async fn definitions(shared: &BrokerShared, r: &Req) -> R {
    admin(r)?;
    match r.method {
        Method::GET => {
            let d = shared.export_definitions(crate::definitions::ExportScope::All);
            ok(serde_json::to_value(&d).map_err(|e| ApiError::bad(e.to_string()))?)
        }
        Method::POST => {
            let d = crate::definitions::parse_definitions(&r.body).map_err(def_err)?;
            import(shared, d).await
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// The sections of a per-vhost document, with RabbitMQ's names.
const VHOST_SECTIONS: &[&str] = &["parameters", "policies", "queues", "exchanges", "bindings"];

/// GET|POST /api/definitions/{vhost}.
pub(super) async fn vhost_definitions(shared: &BrokerShared, r: &Req, vh: &str) -> R {
    admin(r)?;
    let v = vhost(shared, r, vh)?;
    match r.method {
        Method::GET => {
            let d = shared.export_definitions(crate::definitions::ExportScope::All);
            let all = serde_json::to_value(&d).map_err(|e| ApiError::bad(e.to_string()))?;
            let mut out = Map::new();
            out.insert("rabbit_version".into(), all["rabbit_version"].clone());
            out.insert("rabbitmq_version".into(), all["rabbitmq_version"].clone());
            for s in VHOST_SECTIONS {
                let items: Vec<Value> = all[*s]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter(|e| e["vhost"] == *v.name)
                            .cloned()
                            .map(|mut e| {
                                if let Some(m) = e.as_object_mut() {
                                    m.remove("vhost");
                                }
                                e
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.insert((*s).into(), Value::Array(items));
            }
            ok(Value::Object(out))
        }
        Method::POST => {
            let doc = r.json()?;
            let Value::Object(mut doc) = doc else {
                return Err(ApiError::bad("definitions must be a JSON object"));
            };
            let mut scoped = Map::new();
            for s in ["policies", "queues", "exchanges", "bindings"] {
                let items = match doc.remove(s) {
                    None | Some(Value::Null) => Vec::new(),
                    Some(Value::Array(a)) => a,
                    Some(_) => return Err(ApiError::bad(format!("{s}: expected a list"))),
                };
                let items: Vec<Value> = items
                    .into_iter()
                    .map(|mut e| {
                        if let Some(m) = e.as_object_mut() {
                            m.insert("vhost".into(), json!(&*v.name));
                        }
                        e
                    })
                    .collect();
                scoped.insert(s.into(), Value::Array(items));
            }
            let bytes = serde_json::to_vec(&Value::Object(scoped))
                .map_err(|e| ApiError::bad(e.to_string()))?;
            let d = crate::definitions::parse_definitions(&bytes).map_err(def_err)?;
            import(shared, d).await
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Leaves out of `d` what RabbitMQ's import leaves as it is: queues and exchanges that exist,
/// `amq.*` ones and the default exchange. Returns what was left out, one line each.
pub(super) fn keep_existing(shared: &BrokerShared, d: &mut Definitions) -> Vec<String> {
    let mut kept = Vec::new();
    d.exchanges.retain(|x| {
        let why = if x.name.is_empty() {
            Some("the default exchange is not imported")
        } else if x.name.starts_with("amq.") {
            Some("an exchange named amq.* is not imported")
        } else if shared
            .vhost(&x.vhost)
            .is_some_and(|v| v.exchange(&x.name).is_some())
        {
            Some("exists: kept as it is")
        } else {
            None
        };
        if let Some(why) = why {
            kept.push(format!(
                "exchange '{}' in vhost '{}': {why}",
                x.name, x.vhost
            ));
        }
        why.is_none()
    });
    d.queues.retain(|q| {
        let why = if q.name.starts_with("amq.") {
            Some("a queue named amq.* is not imported")
        } else if shared
            .vhost(&q.vhost)
            .is_some_and(|v| v.queue(&q.name).is_some())
        {
            Some("exists: kept as it is")
        } else {
            None
        };
        if let Some(why) = why {
            kept.push(format!("queue '{}' in vhost '{}': {why}", q.name, q.vhost));
        }
        why.is_none()
    });
    kept
}

async fn import(shared: &BrokerShared, mut d: Definitions) -> R {
    let kept = keep_existing(shared, &mut d);
    for k in &kept {
        tracing::info!(entry = %k, "definitions import: entry not applied");
    }
    shared.import_definitions(&d).await.map_err(def_err)?;
    let mut resp = no_content();
    resp.headers_mut()
        .insert(KEPT_HEADER, HeaderValue::from(kept.len()));
    Ok(resp)
}
