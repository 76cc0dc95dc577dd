//! Declaring and deleting exchanges, queues and bindings, on one node or in a cluster: what
//! the AMQP classes, the management API and the definitions import call.
//!
//! On a node of its own these are the vhost's calls. Clustered, exchanges, bindings and
//! (non-exclusive) queues are cluster-wide: a change is committed through the cluster first
//! and made on every node as it applies (`cluster/apply.rs`; a queue runs on its master, the
//! node that declared it, and is a proxy elsewhere), then answered here like the single-node
//! call (the equivalence checks of a redeclare are the vhost's). Exclusive queues stay on
//! their connection's node. Without a quorum the change is refused: 541 INTERNAL_ERROR closes
//! the connection, so the client reconnects (through a load balancer, to another node).

use crate::cluster::keys::{self, Placement, QueueValue};
use crate::cluster::link::ClusterLink;
use crate::definitions::json::{table_to_json, BindingDef, ExchangeDef, QueueDef};
use crate::error::{AmqpError, ChannelError, ConnectionError};
use crate::exchange::{Destination, ExchangeKind};
use crate::queue::QueueHandle;
use crate::vhost::{QueueSpec, Vhost};
use crate::BrokerShared;
use amq_protocol::types::FieldTable;
use std::sync::Arc;
use warren_cluster::{ClusterError, Op};

/// Clustered: when something a client names is not on this node, it may have been made on
/// another node a moment ago (a client that declared through one node and binds or consumes
/// through another): catch up with everything committed so far before answering 404.
pub async fn catch_up(shared: &BrokerShared) {
    if let Some(link) = shared.cluster() {
        let _ = link.propose(Vec::new()).await;
    }
}

fn unavailable(e: ClusterError) -> AmqpError {
    ConnectionError::internal(format!("cluster unavailable: {e}")).into()
}

/// Commit `ops`; a failed version check is fine (someone else made the same object first):
/// either way, returns once this node applied the outcome.
async fn commit(link: &ClusterLink, ops: Vec<Op>) -> Result<(), AmqpError> {
    match link.propose(ops).await {
        Ok(_) => Ok(()),
        Err(ClusterError::Conflict { index, .. }) => {
            link.wait_applied(index).await.map_err(unavailable)
        }
        Err(e) => Err(unavailable(e)),
    }
}

fn binding_def(
    vhost: &str,
    source: &str,
    destination: &Destination,
    routing_key: &str,
    arguments: &FieldTable,
) -> BindingDef {
    let (destination, destination_type) = match destination {
        Destination::Queue(q) => (q.to_string(), "queue"),
        Destination::Exchange(x) => (x.to_string(), "exchange"),
    };
    BindingDef {
        source: source.to_owned(),
        vhost: vhost.to_owned(),
        destination,
        destination_type: destination_type.to_owned(),
        routing_key: routing_key.to_owned(),
        arguments: table_to_json(arguments),
    }
}

/// The binding keys in the cluster that touch `pred`.
fn binding_keys(link: &ClusterLink, vhost: &str, pred: impl Fn(&BindingDef) -> bool) -> Vec<Op> {
    let st = link.state();
    let prefix = format!("binding/{}/", keys::enc(vhost));
    st.prefix(&prefix)
        .filter(|(_, v)| keys::from_value::<BindingDef>(&v.value).is_some_and(|b| pred(&b)))
        .map(|(k, _)| Op::Delete { key: k.clone() })
        .collect()
}

/// The ops that delete queue `name` of `vhost` and its bindings (for the queue hook too).
pub fn queue_delete_ops(link: &ClusterLink, vhost: &str, name: &str) -> Vec<Op> {
    let mut ops = vec![Op::Delete {
        key: keys::queue(vhost, name),
    }];
    ops.extend(binding_keys(link, vhost, |b| {
        b.destination_type == "queue" && b.destination == name
    }));
    ops
}

/// queue.declare (not passive). Returns the handle and whether this call created it.
pub async fn declare_queue(
    shared: &BrokerShared,
    vh: &Arc<Vhost>,
    spec: QueueSpec,
) -> Result<(QueueHandle, bool), AmqpError> {
    let link = match shared.cluster() {
        Some(l) if spec.exclusive_owner.is_none() => l,
        _ => return Ok(vh.declare_queue(spec)?),
    };
    if vh.queue(&spec.name).is_some() {
        return Ok(vh.declare_queue(spec)?);
    }
    vh.check_queue_limit(&spec.name, vh.snapshot().queues.len())?;
    let key = keys::queue(&vh.name, &spec.name);
    let value = QueueValue {
        def: QueueDef {
            name: spec.name.clone(),
            vhost: vh.name.to_string(),
            durable: spec.durable,
            auto_delete: spec.auto_delete,
            arguments: table_to_json(&spec.arguments),
            kind: None,
        },
        exclusive: None,
        placement: Placement {
            master: crate::cluster::locator::master_for(
                link,
                &shared.config.node_name,
                spec.args
                    .resolve(&vh.applied(&spec.name, true).definition)
                    .master_locator
                    .as_deref(),
            ),
            ..Placement::default()
        },
    };
    let mine = link
        .propose(vec![
            Op::CheckVersion {
                key: key.clone(),
                version: 0,
            },
            Op::Put {
                key,
                value: keys::to_value(&value),
            },
        ])
        .await;
    let created = match mine {
        Ok(_) => true,
        Err(ClusterError::Conflict { index, .. }) => {
            link.wait_applied(index).await.map_err(unavailable)?;
            false
        }
        Err(e) => return Err(unavailable(e)),
    };
    let (q, _) = vh.declare_queue(spec)?;
    Ok((q, created))
}

/// queue.delete: the number of messages it had.
pub async fn delete_queue(
    shared: &BrokerShared,
    vh: &Arc<Vhost>,
    q: &QueueHandle,
    if_unused: bool,
    if_empty: bool,
) -> Result<u32, AmqpError> {
    let n = vh.delete_queue(q, if_unused, if_empty).await?;
    if let Some(link) = shared.cluster() {
        if q.exclusive_owner.is_none() {
            commit(link, queue_delete_ops(link, &vh.name, &q.name)).await?;
        }
    }
    Ok(n)
}

/// exchange.declare (not passive; `kind` validated).
#[allow(clippy::too_many_arguments)]
pub async fn declare_exchange(
    shared: &BrokerShared,
    vh: &Arc<Vhost>,
    name: &str,
    kind: ExchangeKind,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    if let Some(link) = shared.cluster() {
        if vh.exchange(name).is_none() {
            let key = keys::exchange(&vh.name, name);
            let def = ExchangeDef {
                name: name.to_owned(),
                vhost: vh.name.to_string(),
                kind: kind.as_str().to_owned(),
                durable,
                auto_delete,
                internal,
                arguments: table_to_json(&arguments),
            };
            let ops = vec![
                Op::CheckVersion {
                    key: key.clone(),
                    version: 0,
                },
                Op::Put {
                    key,
                    value: keys::to_value(&def),
                },
            ];
            commit(link, ops).await?;
        }
    }
    // Created by the apply above (or by an earlier declare): the equivalence check.
    Ok(vh.declare_exchange(name, kind, durable, auto_delete, internal, arguments)?)
}

/// exchange.delete.
pub async fn delete_exchange(
    shared: &BrokerShared,
    vh: &Arc<Vhost>,
    name: &str,
    if_unused: bool,
) -> Result<(), AmqpError> {
    let Some(link) = shared.cluster() else {
        return Ok(vh.delete_exchange(name, if_unused)?);
    };
    let Some(ex) = vh.exchange(name) else {
        return Ok(());
    };
    if if_unused && !ex.bindings().is_empty() {
        return Err(ChannelError::precondition_failed(format!(
            "exchange '{name}' in vhost '{}' in use",
            vh.name
        ))
        .into());
    }
    let mut ops = vec![Op::Delete {
        key: keys::exchange(&vh.name, name),
    }];
    ops.extend(binding_keys(link, &vh.name, |b| {
        b.source == name || (b.destination_type == "exchange" && b.destination == name)
    }));
    commit(link, ops).await?;
    // Applied here already; a binding made only on this node goes with it too.
    Ok(vh.delete_exchange(name, false)?)
}

/// queue.bind / exchange.bind.
pub async fn bind(
    shared: &BrokerShared,
    vh: &Arc<Vhost>,
    source: &str,
    destination: Destination,
    routing_key: &str,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    if let Some(link) = shared.cluster() {
        let exclusive = match &destination {
            Destination::Queue(q) => vh.queue(q).is_some_and(|q| q.exclusive_owner.is_some()),
            Destination::Exchange(_) => false,
        };
        if !exclusive {
            // Both ends must exist: the vhost's check, on a copy that changes nothing.
            if vh.check_binding(source, &destination).is_err() {
                catch_up(shared).await;
                vh.check_binding(source, &destination)?;
            }
            let def = binding_def(&vh.name, source, &destination, routing_key, &arguments);
            commit(
                link,
                vec![Op::Put {
                    key: keys::binding(&def),
                    value: keys::to_value(&def),
                }],
            )
            .await?;
            return Ok(());
        }
    }
    Ok(vh.bind(source, destination, routing_key, arguments)?)
}

/// queue.unbind / exchange.unbind.
pub async fn unbind(
    shared: &BrokerShared,
    vh: &Arc<Vhost>,
    source: &str,
    destination: Destination,
    routing_key: &str,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    if let Some(link) = shared.cluster() {
        let def = binding_def(&vh.name, source, &destination, routing_key, &arguments);
        let key = keys::binding(&def);
        if link.state().get(&key).is_some() {
            commit(link, vec![Op::Delete { key }]).await?;
        }
    }
    Ok(vh.unbind(source, destination, routing_key, arguments)?)
}
