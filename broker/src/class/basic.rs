//! basic.*: qos, consume, cancel, publish (with mandatory returns, confirms, direct reply-to),
//! get, ack, nack, reject, recover.

use super::enc;
use super::queue::{resolve_name, REPLY_TO};
use crate::channel::{ChannelConsumer, HeldAck, HeldPublish, Settle, UnackedDelivery};
use crate::codec::{self, prop};
use crate::connection::session::{open_vhost, PermKind, Session};
use crate::error::{AmqpError, ChannelError, ConnectionError};
use crate::queue::{ConfirmTicket, ConsumerRef, ConsumerSpec, Delivery, Message, QueueHandle};
use crate::vhost::ReplyTarget;
use amq_protocol::protocol::basic;
use amq_protocol::protocol::AMQPClass;

use bytes::Bytes;
use rand::Rng;
use std::sync::Arc;

fn random_token(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    let suffix: String = (0..22)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect();
    format!("{prefix}{suffix}")
}

pub async fn handle(s: &mut Session, ch: u16, m: basic::AMQPMethod) -> Result<(), AmqpError> {
    match m {
        basic::AMQPMethod::Qos(q) => {
            let mut release = false;
            if let Some(c) = s.channels.get_mut(&ch) {
                if q.global {
                    // Applies to the channel's consumers now: their queues get their new
                    // capped prefetch, and deliveries beyond the global one are held here.
                    c.global_prefetch = q.prefetch_count;
                    for (tag, cc) in &c.consumers {
                        if let (Some(queue), false) = (&cc.queue, cc.no_ack) {
                            queue.set_prefetch(
                                ConsumerRef {
                                    conn_id: s.conn_id,
                                    channel: ch,
                                    generation: c.generation,
                                    tag: tag.clone(),
                                },
                                crate::channel::capped_prefetch(cc.prefetch, q.prefetch_count),
                            );
                        }
                    }
                    release = true;
                } else {
                    c.prefetch = q.prefetch_count;
                }
            }
            if release {
                s.release_held(ch).await;
            }
            enc(s.method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
            ))
        }
        basic::AMQPMethod::Consume(c) => consume(s, ch, c).await,
        basic::AMQPMethod::Cancel(c) => {
            let tag: Arc<str> = c.consumer_tag.as_str().into();
            let removed = s.channels.get_mut(&ch).and_then(|chan| {
                let gen = chan.generation;
                let token = chan.reply_to.clone();
                chan.consumers.remove(&tag).map(|cc| (cc, gen, token))
            });
            if let Some((cc, generation, token)) = removed {
                match cc.queue {
                    Some(q) => {
                        q.cancel(ConsumerRef {
                            conn_id: s.conn_id,
                            channel: ch,
                            generation,
                            tag: tag.clone(),
                        })
                        .await;
                        // Held deliveries of this consumer never reached the client.
                        if let Some(chan) = s.channels.get_mut(&ch) {
                            let (mine, rest) = std::mem::take(&mut chan.held)
                                .into_iter()
                                .partition(|d| d.consumer_tag == tag);
                            chan.held = rest;
                            crate::connection::session::requeue_held(mine).await;
                        }
                    }
                    None => {
                        if let (Some(t), Some(v)) = (token, &s.vhost) {
                            v.unregister_reply_to(&t);
                        }
                        if let Some(chan) = s.channels.get_mut(&ch) {
                            chan.reply_to = None;
                        }
                    }
                }
            }
            if !c.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                        consumer_tag: c.consumer_tag,
                    })),
                ))?;
            }
            Ok(())
        }
        basic::AMQPMethod::Get(g) => get(s, ch, g).await,
        basic::AMQPMethod::Ack(a) => {
            if let Some(tx) = s.channels.get_mut(&ch).and_then(|c| c.tx.as_mut()) {
                tx.acks.push(HeldAck::Ack {
                    tag: a.delivery_tag,
                    multiple: a.multiple,
                });
                return Ok(());
            }
            Ok(s.settle(ch, a.delivery_tag, a.multiple, Settle::Ack)
                .await?)
        }
        basic::AMQPMethod::Nack(n) => nack(s, ch, n.delivery_tag, n.multiple, n.requeue).await,
        basic::AMQPMethod::Reject(r) => nack(s, ch, r.delivery_tag, false, r.requeue).await,
        basic::AMQPMethod::Recover(r) => {
            recover(s, ch, r.requeue).await?;
            enc(s.method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
            ))
        }
        basic::AMQPMethod::RecoverAsync(r) => recover(s, ch, r.requeue).await,
        _ => Err(ConnectionError::command_invalid("unexpected basic method").into()),
    }
}

async fn nack(
    s: &mut Session,
    ch: u16,
    tag: u64,
    multiple: bool,
    requeue: bool,
) -> Result<(), AmqpError> {
    if let Some(tx) = s.channels.get_mut(&ch).and_then(|c| c.tx.as_mut()) {
        tx.acks.push(HeldAck::Nack {
            tag,
            multiple,
            requeue,
        });
        return Ok(());
    }
    let how = if requeue {
        Settle::Requeue
    } else {
        Settle::Discard
    };
    Ok(s.settle(ch, tag, multiple, how).await?)
}

async fn recover(s: &mut Session, ch: u16, requeue: bool) -> Result<(), AmqpError> {
    if !requeue {
        return Err(ConnectionError::not_implemented("requeue=false").into());
    }
    let items: Vec<UnackedDelivery> = match s.channels.get_mut(&ch) {
        Some(c) => c.unacked.drain(..).collect(),
        None => return Ok(()),
    };
    s.settle_items(ch, items, Settle::Requeue).await;
    Ok(())
}

async fn consume(s: &mut Session, ch: u16, c: basic::Consume) -> Result<(), AmqpError> {
    let vhost = s.vhost()?;
    let tag: Arc<str> = if c.consumer_tag.as_str().is_empty() {
        random_token("amq.ctag-").into()
    } else {
        c.consumer_tag.as_str().into()
    };
    let Some(chan) = s.channels.get(&ch) else {
        return Ok(());
    };
    if chan.consumers.contains_key(&tag) {
        return Err(
            ConnectionError::not_allowed(format!("attempt to reuse consumer tag '{tag}'")).into(),
        );
    }
    let consume_ok = |tag: &str| {
        AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
            consumer_tag: tag.into(),
        }))
    };
    if c.queue.as_str() == REPLY_TO {
        if !c.no_ack {
            return Err(
                ChannelError::precondition_failed("reply consumer cannot acknowledge").into(),
            );
        }
        let generation = chan.generation;
        if chan.reply_to.is_some() {
            return Err(ChannelError::precondition_failed("reply consumer already set").into());
        }
        let token = random_token("");
        vhost.register_reply_to(
            token.clone(),
            ReplyTarget {
                events: s.events_tx.clone(),
                channel: ch,
                generation,
                consumer_tag: tag.clone(),
            },
        );
        if let Some(chan) = s.channels.get_mut(&ch) {
            chan.reply_to = Some(token);
            chan.consumers.insert(
                tag.clone(),
                ChannelConsumer {
                    queue: None,
                    no_ack: true,
                    prefetch: 0,
                },
            );
        }
        if !c.nowait {
            enc(s.method(ch, consume_ok(&tag)))?;
        }
        return Ok(());
    }
    let name = resolve_name(s, ch, c.queue.as_str())?;
    if vhost.queue(&name).is_none() {
        crate::topology::catch_up(&s.shared).await;
    }
    let q = vhost.queue(&name).ok_or_else(|| {
        ChannelError::not_found(format!("no queue '{name}' in vhost '{}'", vhost.name))
    })?;
    s.check_exclusive(&q)?;
    s.check_perm(PermKind::Read, "queue", &name)?;
    if q.args.quorum && chan.global_prefetch > 0 {
        // RabbitMQ 3.10's quorum queues refuse a consumer under a global prefetch, closing
        // the connection.
        return Err(ConnectionError::not_implemented(format!(
            "queue '{name}' in vhost '{}' does not support global qos",
            vhost.name
        ))
        .into());
    }
    let priority = c
        .arguments
        .inner()
        .get("x-priority")
        .and_then(crate::queue::args::as_i64)
        .unwrap_or(0);
    let cancel_on_ha_failover = matches!(
        c.arguments.inner().get("x-cancel-on-ha-failover"),
        Some(amq_protocol::types::AMQPValue::Boolean(true))
    );
    let Some(chan) = s.channels.get_mut(&ch) else {
        return Ok(());
    };
    let spec = ConsumerSpec {
        tag: tag.clone(),
        conn_id: s.conn_id,
        channel: ch,
        generation: chan.generation,
        no_ack: c.no_ack,
        exclusive: c.exclusive,
        prefetch: chan.consumer_prefetch(),
        flow_active: chan.flow_active,
        priority,
        cancel_on_ha_failover,
        events: s.events_tx.clone(),
        conn: s.conn_shared.clone(),
    };
    // Register first so deliveries that race the reply find their consumer; consume-ok is
    // written before any delivery because events are handled only after this returns.
    chan.consumers.insert(
        tag.clone(),
        ChannelConsumer {
            queue: Some(q.clone()),
            no_ack: c.no_ack,
            prefetch: chan.prefetch,
        },
    );
    let mut q = q;
    let mut r = q.consume(spec.clone()).await;
    // Clustered: a queue whose master just died is promoted on another node within a few
    // failure-detection periods; the consume waits for it rather than failing (clients such
    // as Celery's worker treat a failed consume as fatal).
    if let (Err(e), Some(link)) = (&r, s.shared.cluster()) {
        if crate::cluster::remote::is_unreachable(e) {
            let deadline = tokio::time::Instant::now() + link.promotion_wait();
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                if let Some(now) = vhost.queue(&name) {
                    q = now;
                }
                r = q.consume(spec.clone()).await;
                match &r {
                    Err(e) if crate::cluster::remote::is_unreachable(e) => continue,
                    _ => break,
                }
            }
            if let Some(c) = s
                .channels
                .get_mut(&ch)
                .and_then(|c| c.consumers.get_mut(&tag))
            {
                c.queue = Some(q.clone());
            }
        }
    }
    if let Err(e) = r {
        if let Some(chan) = s.channels.get_mut(&ch) {
            chan.consumers.remove(&tag);
        }
        return Err(e.into());
    }
    if !c.nowait {
        enc(s.method(ch, consume_ok(&tag)))?;
    }
    Ok(())
}

async fn get(s: &mut Session, ch: u16, g: basic::Get) -> Result<(), AmqpError> {
    let vhost = s.vhost()?;
    let name = resolve_name(s, ch, g.queue.as_str())?;
    if vhost.queue(&name).is_none() {
        crate::topology::catch_up(&s.shared).await;
    }
    let q = vhost.queue(&name).ok_or_else(|| {
        ChannelError::not_found(format!("no queue '{name}' in vhost '{}'", vhost.name))
    })?;
    s.check_exclusive(&q)?;
    s.check_perm(PermKind::Read, "queue", &name)?;
    let got = q.get(g.no_ack).await;
    if let Some(chan) = s.channels.get(&ch) {
        chan.stats
            .got(g.no_ack, got.as_ref().map(|r| r.redelivered));
    }
    match got {
        None => enc(s.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
        )),
        Some(r) => {
            let Some(chan) = s.channels.get_mut(&ch) else {
                return Ok(());
            };
            let tag = chan.take_tag();
            if !g.no_ack {
                chan.unacked.push_back(UnackedDelivery {
                    tag,
                    queue: q.clone(),
                    msg_id: r.msg_id,
                    counted: false,
                });
            }
            enc(s.method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::GetOk(basic::GetOk {
                    delivery_tag: tag,
                    redelivered: r.redelivered,
                    exchange: r.msg.exchange().into(),
                    routing_key: r.msg.routing_key().into(),
                    message_count: r.remaining,
                })),
            ))?;
            s.content(ch, &r.msg);
            Ok(())
        }
    }
}

/// basic.publish after content assembly.
pub async fn publish(
    s: &mut Session,
    ch: u16,
    p: basic::Publish,
    header: Vec<u8>,
    body: Bytes,
) -> Result<(), AmqpError> {
    if p.immediate {
        return Err(ConnectionError::not_implemented("immediate=true").into());
    }
    s.check_perm(PermKind::Write, "exchange", p.exchange.as_str())?;
    // Short strings of a received header are UTF-8 (checked by the decoder).
    let text = |flag| codec::header_property(&header, flag).map(String::from_utf8_lossy);
    if let Some(uid) = text(prop::USER_ID) {
        if uid != s.user.as_str() {
            return Err(ChannelError::precondition_failed(format!(
                "user_id property set to '{}' but authenticated user was '{}'",
                uid, s.user
            ))
            .into());
        }
    }
    if let Some(exp) = text(prop::EXPIRATION) {
        if exp.parse::<u64>().is_err() {
            return Err(ChannelError::precondition_failed(format!(
                "invalid expiration '{exp}': no_integer"
            ))
            .into());
        }
    }
    if let Some(tx) = s.channels.get_mut(&ch).and_then(|c| c.tx.as_mut()) {
        tx.publishes.push(HeldPublish {
            exchange: p.exchange.to_string(),
            routing_key: p.routing_key.to_string(),
            mandatory: p.mandatory,
            header,
            body,
        });
        return Ok(());
    }
    route_and_enqueue(
        s,
        ch,
        p.exchange.as_str(),
        p.routing_key.as_str(),
        p.mandatory,
        header,
        body,
    )
    .await
}

/// Routes a publish and hands it to its queues (also used by tx.commit). `header` is a
/// content header payload checked by [`crate::inbound`], announcing `body`'s size.
pub async fn route_and_enqueue(
    s: &mut Session,
    ch: u16,
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    mut header: Vec<u8>,
    body: Bytes,
) -> Result<(), AmqpError> {
    // Borrowed, not cloned: every publish would otherwise count the vhost's `Arc` up and down.
    let vhost = open_vhost(&s.vhost)?;
    // RabbitMQ accepts "amq.default" as a name for the default exchange.
    let exchange = if exchange == "amq.default" {
        ""
    } else {
        exchange
    };
    // Direct reply-to: the requester publishes with reply_to = the pseudo queue.
    if codec::header_property(&header, prop::REPLY_TO) == Some(REPLY_TO.as_bytes()) {
        let token = s
            .channels
            .get(&ch)
            .and_then(|c| c.reply_to.clone())
            .ok_or_else(|| {
                ChannelError::precondition_failed("fast reply consumer does not exist")
            })?;
        let properties =
            Message::decode_properties(&header).with_reply_to(format!("{REPLY_TO}.{token}").into());
        header = crate::inbound::with_properties(&header, &properties)
            .map_err(|e| AmqpError::Connection(e.into()))?;
    }
    let seq = s
        .channels
        .get_mut(&ch)
        .and_then(|c| c.confirms.as_mut())
        .map(|c| c.take_seq());
    let msg = Arc::new(
        Message::received(s.shared.node.memory, exchange, routing_key, &header, &body)
            .map_err(|e| AmqpError::Connection(e.into()))?,
    );
    // The responder publishes to the default exchange with the generated name.
    if exchange.is_empty() {
        if let Some(token) = routing_key.strip_prefix("amq.rabbitmq.reply-to.") {
            let target = vhost.reply_target(token);
            if let Some(t) = target {
                let _ = t.events.send(crate::queue::ClientEvent::Deliver(Delivery {
                    channel: t.channel,
                    generation: t.generation,
                    consumer_tag: t.consumer_tag.clone(),
                    queue: None,
                    msg_id: 0,
                    msg: msg.clone(),
                    redelivered: false,
                    no_ack: true,
                }));
                confirm_now(s, ch, seq);
                return Ok(());
            }
            unroutable(s, ch, mandatory, &msg)?;
            confirm_now(s, ch, seq);
            return Ok(());
        }
    }
    let mut targets: Vec<QueueHandle> = Vec::new();
    if s.shared.cluster().is_some() && !exchange.is_empty() && vhost.exchange(exchange).is_none() {
        crate::topology::catch_up(&s.shared).await;
    }
    {
        let topo = vhost.snapshot();
        // Looked up once, by the message's own copy of the name: an empty name as decoded
        // (`String::new()`) has a dangling pointer, and comparing it with the default
        // exchange's key costs ~90 ns here (glibc's vector memcmp reads through it even for
        // zero bytes, and the CPU takes a slow path on the unmapped page), 7.9 % of the
        // broker's CPU on the transient benchmark.
        let x = topo.exchanges.get(msg.exchange());
        if !exchange.is_empty() {
            match x {
                None => {
                    return Err(ChannelError::not_found(format!(
                        "no exchange '{exchange}' in vhost '{}'",
                        vhost.name
                    ))
                    .into())
                }
                Some(x) if x.internal => {
                    return Err(ChannelError::access_refused(format!(
                        "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                        vhost.name
                    ))
                    .into())
                }
                _ => {}
            }
        }
        crate::vhost::route_in(&topo, &msg, &mut targets);
        if let Some(x) = x {
            x.stats.published(targets.len());
        }
    }
    if targets.is_empty() {
        unroutable(s, ch, mandatory, &msg)?;
        confirm_now(s, ch, seq);
        return Ok(());
    }
    let ticket = match (seq, s.channels.get_mut(&ch)) {
        (Some(seq), Some(c)) => {
            if let Some(conf) = c.confirms.as_mut() {
                conf.pending.insert(seq, (targets.len() as u32, false));
            }
            Some(ConfirmTicket {
                events: s.events_tx.clone(),
                conn_id: s.conn_id,
                channel: ch,
                generation: c.generation,
                seq,
            })
        }
        _ => None,
    };
    // The last queue takes the message (and the ticket) itself: no count up and down for it.
    let mut targets = targets.into_iter();
    let last = targets.next_back();
    for q in targets {
        s.queue_publish(q, msg.clone(), ticket.clone());
    }
    if let Some(q) = last {
        s.queue_publish(q, msg, ticket);
    }
    Ok(())
}

fn confirm_now(s: &mut Session, ch: u16, seq: Option<u64>) {
    if let Some(seq) = seq {
        if let Some(c) = s.channels.get_mut(&ch).and_then(|c| c.confirms.as_mut()) {
            c.done_acks.push(seq);
        }
        s.mark_confirm_dirty(ch);
    }
}

fn unroutable(s: &mut Session, ch: u16, mandatory: bool, msg: &Message) -> Result<(), AmqpError> {
    let st = &s.stats;
    crate::stats::bump(
        if mandatory {
            &st.return_unroutable
        } else {
            &st.drop_unroutable
        },
        1,
    );
    if let Some(c) = s.channels.get(&ch) {
        let st = &c.stats;
        crate::stats::bump(
            if mandatory {
                &st.return_unroutable
            } else {
                &st.drop_unroutable
            },
            1,
        );
    }
    if mandatory {
        enc(s.method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code: 312,
                reply_text: "NO_ROUTE".into(),
                exchange: msg.exchange().into(),
                routing_key: msg.routing_key().into(),
            })),
        ))?;
        s.content(ch, msg);
    }
    Ok(())
}
