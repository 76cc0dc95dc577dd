//! Queues:
//! - `GET /api/queues`, `GET /api/queues/{vhost}`
//! - `GET|PUT|DELETE /api/queues/{vhost}/{name}` (GET adds `consumer_details` from
//!   `connections`, every node's through `cluster_wide`)
//!
//! Getting and purging messages are in `messages`, a queue's bindings in `bindings`.

use super::{
    body_arguments, body_bool, check_perm, cluster_wide, connections, details, message_stats, ok,
    vhost, Perm, R,
};
use crate::mgmt::json as conv;
use crate::mgmt::{created, no_content, ApiError, Req};
use crate::queue::QueueArgs;
use crate::vhost::{QueueSpec, Vhost};
use crate::BrokerShared;
use hyper::Method;
use serde_json::{json, Map, Value};

const QUEUE_KEYS: &[&str] = &[
    "ack",
    "deliver",
    "deliver_get",
    "deliver_no_ack",
    "get",
    "get_empty",
    "get_no_ack",
    "publish",
    "redeliver",
];

fn queue_json(shared: &BrokerShared, q: &crate::queue::QueueInfo) -> Value {
    let ld = std::sync::atomic::Ordering::Relaxed;
    let ready = u64::from(q.message_count());
    let unacked = q.stats.unacked.load(ld);
    let bytes = q.stats.ready_bytes.load(ld);
    let unacked_bytes = q.activity.unacked_bytes.load(ld);
    let quorum = q.args.quorum;
    let paged = q.stats.paged_out.load(ld).min(ready);
    let paged_bytes = q.stats.paged_out_bytes.load(ld).min(bytes);
    let rates = shared.sampler.queue_rates(&q.vhost, &q.name);
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.into(), v);
    };
    put("name", json!(&*q.name));
    put("vhost", json!(&*q.vhost));
    put("durable", json!(q.durable));
    put("auto_delete", json!(q.auto_delete));
    put("exclusive", json!(q.exclusive_owner.is_some()));
    put("arguments", conv::table(&q.arguments));
    // Clustered: where the queue lives (its master) and its mirrors, as RabbitMQ shows them.
    let placement = shared.cluster().and_then(|c| {
        let st = c.state();
        let v = st.get(&crate::cluster::keys::queue(&q.vhost, &q.name))?;
        crate::cluster::keys::from_value::<crate::cluster::keys::QueueValue>(&v.value)
    });
    let node = match placement {
        Some(qv) => {
            put("slave_nodes", json!(qv.placement.mirrors));
            put("synchronised_slave_nodes", json!(qv.placement.in_sync));
            json!(qv.placement.master)
        }
        None => json!(shared.config.node_name),
    };
    put("node", node.clone());
    if quorum {
        // A quorum queue of one member, the node it lives on, as RabbitMQ shows one.
        put("leader", node.clone());
        put("members", json!([node.clone()]));
        put("online", json!([node]));
        put("messages_dlx", json!(0));
        put("message_bytes_dlx", json!(0));
    }
    put("type", json!(if quorum { "quorum" } else { "classic" }));
    put("state", json!("running"));
    let policy = q.policy();
    put("policy", json!(policy.applied.policy_name()));
    put(
        "operator_policy",
        json!(policy.applied.operator_policy_name()),
    );
    put(
        "effective_policy_definition",
        Value::Object(policy.applied.definition.clone()),
    );
    put("exclusive_consumer_tag", Value::Null);
    put("single_active_consumer_tag", Value::Null);
    let consumers = q.consumer_count();
    put("consumers", json!(consumers));
    // RabbitMQ's share of time the queue could hand a message to a consumer at once, a moving
    // average with a half-life of a second (0 without consumers).
    let capacity = q
        .activity
        .consumer_capacity(consumers, tokio::time::Instant::now());
    put("consumer_capacity", json!(capacity));
    put("consumer_utilisation", json!(capacity));
    // Classic queues say since when they have done nothing, once they have been idle for a
    // second (RabbitMQ's hibernation); RabbitMQ's quorum queues do not.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if let Some(t) = q.activity.idle_since_ms(now_ms).filter(|_| !quorum) {
        put(
            "idle_since",
            json!(crate::queue::activity::format_idle_since(t)),
        );
    }
    put("message_bytes", json!(bytes + unacked_bytes));
    put("message_bytes_ready", json!(bytes));
    put("message_bytes_unacknowledged", json!(unacked_bytes));
    put(
        "message_bytes_ram",
        json!(bytes - paged_bytes + unacked_bytes),
    );
    put("message_bytes_persistent", json!(0));
    put("message_bytes_paged_out", json!(paged_bytes));
    put("messages_ram", json!(ready - paged + unacked));
    put("messages_ready_ram", json!(ready - paged));
    put("messages_unacknowledged_ram", json!(unacked));
    put("messages_persistent", json!(0));
    put("messages_paged_out", json!(paged));
    put("memory", json!(bytes + unacked_bytes));
    put("head_message_timestamp", Value::Null);
    put(
        "message_stats",
        message_stats(&q.stats.counts(), &rates, QUEUE_KEYS),
    );
    details(&mut m, "messages", ready + unacked, 0.0);
    details(&mut m, "messages_ready", ready, 0.0);
    details(&mut m, "messages_unacknowledged", unacked, 0.0);
    Value::Object(m)
}

/// The queues of one vhost, by name.
pub(super) fn list(shared: &BrokerShared, v: &Vhost) -> Vec<Value> {
    let topo = v.snapshot();
    let mut qs: Vec<_> = topo.queues.values().cloned().collect();
    qs.sort_by(|a, b| a.name.cmp(&b.name));
    qs.iter().map(|q| queue_json(shared, q)).collect()
}

/// GET|PUT|DELETE /api/queues/{vhost}/{name}.
pub(super) async fn one(shared: &BrokerShared, r: &Req, vh: &str, name: &str) -> R {
    let v = vhost(shared, r, vh)?;
    match r.method {
        Method::GET => {
            let q = v.queue(name).ok_or(ApiError::NotFound)?;
            let mut j = queue_json(shared, &q);
            // Its consumers on every node (they consume through their own node's proxy).
            let local = connections::consumers(shared, r, Some(&v.name)).await;
            let (cons, _) = cluster_wide::gather(shared, r, &["consumers", &*v.name], local).await;
            if let (Some(obj), Value::Array(all)) = (j.as_object_mut(), cons) {
                let mine: Vec<_> = all
                    .into_iter()
                    .filter(|c| c["queue"]["name"] == *name)
                    .collect();
                obj.insert("consumer_details".into(), Value::Array(mine));
                obj.insert("deliveries".into(), json!([]));
                obj.insert("incoming".into(), json!([]));
            }
            ok(j)
        }
        Method::PUT => {
            let body = r.json()?;
            if !body.is_object() {
                return Err(ApiError::bad("not_json"));
            }
            if name.is_empty() || name.len() > 255 {
                return Err(ApiError::bad("queue name must be 1 to 255 bytes"));
            }
            check_perm(shared, r, &v, Perm::Configure, name)?;
            if name.starts_with("amq.") && v.queue(name).is_none() {
                return Err(ApiError::Forbidden(format!(
                    "queue name '{name}' contains reserved prefix 'amq.*'"
                )));
            }
            // Not durable unless asked, as RabbitMQ's PUT (queue.declare's default).
            let durable = body_bool(&body, "durable", false)?;
            let auto_delete = body_bool(&body, "auto_delete", false)?;
            let arguments = body_arguments(&body)?;
            let args = QueueArgs::parse(&arguments, name, &v.name)?;
            args.check_declare(&arguments, durable, false, auto_delete, name, &v.name)?;
            let spec = QueueSpec {
                name: name.to_owned(),
                durable,
                exclusive_owner: None,
                auto_delete,
                arguments,
                args,
            };
            let (_, created_now) = crate::topology::declare_queue(shared, &v, spec).await?;
            Ok(if created_now { created() } else { no_content() })
        }
        Method::DELETE => {
            check_perm(shared, r, &v, Perm::Configure, name)?;
            let q = v.queue(name).ok_or(ApiError::NotFound)?;
            let (if_unused, if_empty) = (r.query_flag("if-unused"), r.query_flag("if-empty"));
            crate::topology::delete_queue(shared, &v, &q, if_unused, if_empty).await?;
            Ok(no_content())
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}
