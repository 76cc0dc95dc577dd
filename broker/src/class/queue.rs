//! queue.declare / bind / unbind / purge / delete.

use super::enc;
use super::exchange::default_exchange_refused;
use crate::connection::session::{PermKind, Session};
use crate::error::{AmqpError, ChannelError};
use crate::exchange::Destination;
use crate::queue::QueueArgs;
use crate::vhost::{no_queue, QueueSpec, Vhost};
use amq_protocol::protocol::{queue, AMQPClass};
use rand::Rng;

/// RabbitMQ's reply-to pseudo queue.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn server_name() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..22)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("amq.gen-{suffix}")
}

/// Resolves "" to the channel's last declared queue.
pub fn resolve_name(s: &Session, ch: u16, name: &str) -> Result<String, ChannelError> {
    if !name.is_empty() {
        return Ok(name.to_owned());
    }
    s.channels
        .get(&ch)
        .and_then(|c| c.last_queue.clone())
        .ok_or_else(|| ChannelError::not_found("no previously declared queue"))
}

fn declare_ok(name: &str, messages: u32, consumers: u32) -> AMQPClass {
    AMQPClass::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
        queue: name.into(),
        message_count: messages,
        consumer_count: consumers,
    }))
}

/// The checks queue.bind and queue.unbind share; returns the resolved queue name.
fn binding_queue(
    s: &Session,
    ch: u16,
    vhost: &Vhost,
    queue: &str,
    exchange: &str,
) -> Result<String, ChannelError> {
    let name = binding_checks(s, ch, vhost, queue, exchange)?;
    if vhost.queue(&name).is_none() {
        return Err(no_queue(&name, &vhost.name));
    }
    Ok(name)
}

/// What queue.bind and queue.unbind both check, in RabbitMQ's order: the default exchange,
/// then (for a queue that exists) exclusivity, then permissions. Returns the queue's name
/// (resolved if the client left it empty); the queue may not exist.
fn binding_checks(
    s: &Session,
    ch: u16,
    vhost: &Vhost,
    queue: &str,
    exchange: &str,
) -> Result<String, ChannelError> {
    let name = resolve_name(s, ch, queue)?;
    if exchange.is_empty() {
        return Err(default_exchange_refused());
    }
    if let Some(q) = vhost.queue(&name) {
        s.check_exclusive(&q)?;
    }
    s.check_perm(PermKind::Write, "queue", &name)?;
    s.check_perm(PermKind::Read, "exchange", exchange)?;
    Ok(name)
}

pub async fn handle(s: &mut Session, ch: u16, m: queue::AMQPMethod) -> Result<(), AmqpError> {
    let vhost = s.vhost()?;
    let no_queue = |n: &str| no_queue(n, &vhost.name);
    match m {
        queue::AMQPMethod::Declare(d) => {
            if d.queue.as_str() == REPLY_TO && d.passive {
                if !d.nowait {
                    enc(s.method(ch, declare_ok(REPLY_TO, 0, 0)))?;
                }
                return Ok(());
            }
            let name = if d.queue.as_str().is_empty() {
                if d.passive {
                    resolve_name(s, ch, "")?
                } else {
                    server_name()
                }
            } else {
                d.queue.to_string()
            };
            let handle = if d.passive {
                if vhost.queue(&name).is_none() {
                    crate::topology::catch_up(&s.shared).await;
                }
                let q = vhost.queue(&name).ok_or_else(|| no_queue(&name))?;
                s.check_exclusive(&q)?;
                q.touch();
                q
            } else {
                s.check_perm(PermKind::Configure, "queue", &name)?;
                let client_named = !d.queue.as_str().is_empty();
                if client_named && name.starts_with("amq.") && vhost.queue(&name).is_none() {
                    return Err(ChannelError::access_refused(format!(
                        "queue name '{name}' contains reserved prefix 'amq.*'"
                    ))
                    .into());
                }
                let args = QueueArgs::parse(&d.arguments, &name, &vhost.name)?;
                args.check_declare(
                    &d.arguments,
                    d.durable,
                    d.exclusive,
                    d.auto_delete,
                    &name,
                    &vhost.name,
                )?;
                let spec = QueueSpec {
                    name: name.clone(),
                    durable: d.durable,
                    exclusive_owner: d.exclusive.then_some(s.conn_id),
                    auto_delete: d.auto_delete,
                    arguments: d.arguments,
                    args,
                };
                let (q, created) = crate::topology::declare_queue(&s.shared, &vhost, spec).await?;
                if created && d.exclusive {
                    s.exclusive_queues.push(q.clone());
                }
                if !created {
                    s.check_exclusive(&q)?;
                    q.touch();
                }
                q
            };
            if let Some(c) = s.channels.get_mut(&ch) {
                c.last_queue = Some(name.clone());
            }
            if !d.nowait {
                // Counted by the queue after this connection's publishes so far, as RabbitMQ's
                // queue process counts them: a publisher that had its confirms sees them.
                s.flush_publishes().await;
                let (messages, consumers) = handle.stat().await;
                enc(s.method(ch, declare_ok(&name, messages, consumers)))?;
            }
            Ok(())
        }
        queue::AMQPMethod::Bind(b) => {
            if vhost.queue(b.queue.as_str()).is_none()
                || vhost.exchange(b.exchange.as_str()).is_none()
            {
                crate::topology::catch_up(&s.shared).await;
            }
            let name = binding_queue(s, ch, &vhost, b.queue.as_str(), b.exchange.as_str())?;
            crate::topology::bind(
                &s.shared,
                &vhost,
                b.exchange.as_str(),
                Destination::Queue(name.as_str().into()),
                b.routing_key.as_str(),
                b.arguments,
            )
            .await?;
            if !b.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})),
                ))?;
            }
            Ok(())
        }
        queue::AMQPMethod::Unbind(b) => {
            // A queue that is gone has no bindings left: unbind-ok, as RabbitMQ.
            let name = binding_checks(s, ch, &vhost, b.queue.as_str(), b.exchange.as_str())?;
            crate::topology::unbind(
                &s.shared,
                &vhost,
                b.exchange.as_str(),
                Destination::Queue(name.as_str().into()),
                b.routing_key.as_str(),
                b.arguments,
            )
            .await?;
            enc(s.method(
                ch,
                AMQPClass::Queue(queue::AMQPMethod::UnbindOk(queue::UnbindOk {})),
            ))
        }
        queue::AMQPMethod::Purge(p) => {
            let name = resolve_name(s, ch, p.queue.as_str())?;
            if vhost.queue(&name).is_none() {
                crate::topology::catch_up(&s.shared).await;
            }
            let q = vhost.queue(&name).ok_or_else(|| no_queue(&name))?;
            s.check_exclusive(&q)?;
            s.check_perm(PermKind::Read, "queue", &name)?;
            let n = q.purge().await.unwrap_or(0);
            if !p.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::PurgeOk(queue::PurgeOk {
                        message_count: n,
                    })),
                ))?;
            }
            Ok(())
        }
        queue::AMQPMethod::Delete(d) => {
            let name = resolve_name(s, ch, d.queue.as_str())?;
            let n = match vhost.queue(&name) {
                None => 0,
                Some(q) => {
                    s.check_exclusive(&q)?;
                    s.check_perm(PermKind::Configure, "queue", &name)?;
                    let n = crate::topology::delete_queue(
                        &s.shared,
                        &vhost,
                        &q,
                        d.if_unused,
                        d.if_empty,
                    )
                    .await?;
                    s.exclusive_queues
                        .retain(|x| !std::sync::Arc::ptr_eq(x, &q));
                    n
                }
            };
            if !d.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                        message_count: n,
                    })),
                ))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
