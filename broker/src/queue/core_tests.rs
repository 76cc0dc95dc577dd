//! The queue core driven directly, with the time passed in: no runtime, no clock, no vhost.
//! Plus the actor shell under tokio's paused clock, where time only moves when told to.

use super::*;
use crate::policy::Applied;
use crate::queue::args::Overflow;
use crate::queue::{ConnShared, QueuePolicy};
use crate::store::TransientLog;
use amq_protocol::protocol::basic::AMQPProperties;
use std::time::Duration;

fn handle(args: QueueArgs) -> QueueHandle {
    let (tx, _rx) = mpsc::channel(16);
    Arc::new(QueueInfo {
        name: "q".into(),
        vhost: "/".into(),
        durable: false,
        auto_delete: false,
        exclusive_owner: None,
        policy: parking_lot::Mutex::new(Arc::new(QueuePolicy::new(&args, Applied::default()))),
        policy_changed: Default::default(),
        args,
        arguments: Default::default(),
        tx,
        message_count: Default::default(),
        consumer_count: Default::default(),
        stats: Default::default(),
    })
}

fn core(args: QueueArgs, t0: Instant) -> QueueCore {
    QueueCore::new(handle(args), Box::new(TransientLog), None, t0, 1_000_000)
}

fn msg(body: &str) -> Arc<Message> {
    Arc::new(
        Message::new(
            &crate::memory::UNIT_TESTS,
            "".into(),
            "q".into(),
            AMQPProperties::default(),
            bytes::Bytes::copy_from_slice(body.as_bytes()),
        )
        .expect("message"),
    )
}

fn publish(c: &mut QueueCore, body: &str, confirm: Option<ConfirmTicket>, now: Instant) {
    c.command(
        QueueCmd::Publish {
            msg: msg(body),
            confirm,
        },
        now,
    );
}

/// Ready messages (the core's own count; the handle's is published at the end of a turn).
/// basic.get with no_ack, answered in the same call.
fn get_no_ack(c: &mut QueueCore, now: Instant) -> Option<GetResult> {
    let (reply, r) = tokio::sync::oneshot::channel();
    c.command(
        QueueCmd::Get {
            no_ack: true,
            reply,
        },
        now,
    );
    r.blocking_recv().expect("reply")
}

fn ready(c: &QueueCore) -> usize {
    c.ready.len
}

fn dead_letters(effects: &[Effect]) -> Vec<(String, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::DeadLetter(m) => {
                let reason = match m
                    .properties
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-first-death-reason").cloned())
                {
                    Some(amq_protocol::types::AMQPValue::LongString(r)) => {
                        String::from_utf8_lossy(r.as_bytes()).into_owned()
                    }
                    other => format!("{other:?}"),
                };
                Some((String::from_utf8_lossy(&m.body).into_owned(), reason))
            }
            _ => None,
        })
        .collect()
}

fn ticket(tx: &ClientTx, seq: u64) -> ConfirmTicket {
    ConfirmTicket {
        events: tx.clone(),
        conn_id: 1,
        channel: 1,
        generation: 0,
        seq,
    }
}

fn confirms(rx: &mut mpsc::UnboundedReceiver<ClientEvent>) -> Vec<(u64, bool)> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        if let ClientEvent::Confirm { seq, ok, .. } = ev {
            out.push((seq, ok));
        }
    }
    out
}

#[test]
fn messages_expire_at_the_time_passed_in_and_dead_letter() {
    let t0 = Instant::now();
    let mut c = core(
        QueueArgs {
            message_ttl: Some(100),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        },
        t0,
    );
    for b in ["a", "b", "c"] {
        publish(&mut c, b, None, t0);
    }
    assert_eq!(c.poll_timeout(t0), Some(t0 + Duration::from_millis(100)));
    c.turn(t0 + Duration::from_millis(99), false);
    assert_eq!(ready(&c), 3);
    assert!(dead_letters(&c.take_effects()).is_empty());
    c.turn(t0 + Duration::from_millis(100), false);
    assert_eq!(ready(&c), 0);
    let dl = dead_letters(&c.take_effects());
    assert_eq!(
        dl,
        [("a", "expired"), ("b", "expired"), ("c", "expired")]
            .map(|(b, r)| (b.to_owned(), r.to_owned()))
    );
    assert_eq!(c.poll_timeout(t0 + Duration::from_millis(100)), None);
}

#[test]
fn a_full_queue_drops_its_head_or_nacks_the_publish() {
    let t0 = Instant::now();
    let mut c = core(
        QueueArgs {
            max_length: Some(2),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        },
        t0,
    );
    for b in ["1", "2", "3"] {
        publish(&mut c, b, None, t0);
    }
    assert_eq!(ready(&c), 2);
    assert_eq!(
        dead_letters(&c.take_effects()),
        [("1".to_owned(), "maxlen".to_owned())]
    );
    let mut c = core(
        QueueArgs {
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            overflow_set: true,
            ..Default::default()
        },
        t0,
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    publish(&mut c, "kept", Some(ticket(&tx, 1)), t0);
    publish(&mut c, "refused", Some(ticket(&tx, 2)), t0);
    assert_eq!(confirms(&mut rx), vec![(1, true), (2, false)]);
    assert_eq!(ready(&c), 1);
}

#[test]
fn a_new_policy_takes_effect_at_the_next_turn() {
    let t0 = Instant::now();
    let mut c = core(QueueArgs::default(), t0);
    for i in 0..10 {
        publish(&mut c, &i.to_string(), None, t0);
    }
    let def = serde_json::json!({"max-length": 4});
    let applied = Applied {
        definition: def.as_object().cloned().expect("object"),
        ..Default::default()
    };
    assert!(c.handle.set_policy(applied));
    assert_eq!(ready(&c), 10, "nothing happens before the turn");
    c.turn(t0, false);
    assert_eq!(ready(&c), 4);
    let got = get_no_ack(&mut c, t0).expect("a message");
    assert_eq!(&got.msg.body[..], b"6", "the oldest six went");
    assert_eq!(ready(&c), 3);
}

#[test]
fn an_idle_queue_with_expires_deletes_itself_at_its_deadline() {
    let t0 = Instant::now();
    let mut c = core(
        QueueArgs {
            expires: Some(1000),
            ..Default::default()
        },
        t0,
    );
    assert_eq!(c.poll_timeout(t0), Some(t0 + Duration::from_secs(1)));
    c.command(QueueCmd::Touch, t0 + Duration::from_millis(500));
    c.turn(t0 + Duration::from_millis(1200), false);
    assert!(!c.is_deleted(), "touched at 500 ms: expires at 1.5 s");
    c.turn(t0 + Duration::from_millis(1500), false);
    assert!(c.is_deleted());
    assert!(matches!(c.take_effects().as_slice(), [Effect::Deleted]));
}

fn consumer(events: &ClientTx, conn: &Arc<ConnShared>) -> ConsumerSpec {
    ConsumerSpec {
        tag: "c".into(),
        conn_id: 7,
        channel: 1,
        generation: 0,
        no_ack: false,
        exclusive: false,
        prefetch: 0,
        priority: 0,
        cancel_on_ha_failover: false,
        events: events.clone(),
        flow_active: true,
        conn: conn.clone(),
    }
}

#[test]
fn deliveries_to_a_vanished_connection_come_back_unredelivered() {
    let t0 = Instant::now();
    let mut c = core(QueueArgs::default(), t0);
    let (events, _erx) = mpsc::unbounded_channel();
    let conn = Arc::new(ConnShared::default());
    let (reply, _r) = tokio::sync::oneshot::channel();
    c.command(
        QueueCmd::Consume {
            spec: consumer(&events, &conn),
            reply,
        },
        t0,
    );
    publish(&mut c, "m", None, t0);
    let delivered = match c.take_effects().pop() {
        Some(Effect::Deliver {
            deliveries,
            conn: k,
            ..
        }) => {
            assert!(Arc::ptr_eq(&k, &conn));
            deliveries
        }
        other => panic!("expected a delivery, got {other:?}"),
    };
    assert_eq!(ready(&c), 0);
    assert_eq!(conn.pending.load(Ordering::Relaxed), 1);
    c.undeliverable(&conn, delivered, t0);
    c.turn(t0, false);
    assert_eq!(ready(&c), 1, "back in the queue");
    assert_eq!(conn.pending.load(Ordering::Relaxed), 0);
    assert!(
        c.consumers.is_empty(),
        "the consumer went with its connection"
    );
    let got = get_no_ack(&mut c, t0).expect("a message");
    assert!(!got.redelivered, "the client never saw it");
}

#[test]
fn a_message_seen_before_stays_redelivered_when_a_later_delivery_is_undeliverable() {
    let t0 = Instant::now();
    let mut c = core(QueueArgs::default(), t0);
    let (events, _erx) = mpsc::unbounded_channel();
    let first = Arc::new(ConnShared::default());
    let deliver_to = |c: &mut QueueCore, conn: &Arc<ConnShared>| {
        let (reply, _r) = tokio::sync::oneshot::channel();
        c.command(
            QueueCmd::Consume {
                spec: consumer(&events, conn),
                reply,
            },
            t0,
        );
        c.turn(t0, false);
        match c.take_effects().pop() {
            Some(Effect::Deliver { deliveries, .. }) => deliveries,
            other => panic!("expected a delivery, got {other:?}"),
        }
    };
    publish(&mut c, "m", None, t0);
    let seen = deliver_to(&mut c, &first);
    assert!(!seen[0].redelivered);
    // The first client saw it and gave it back (its channel closed).
    c.command(
        QueueCmd::Reject {
            ids: vec![seen[0].msg_id],
            requeue: true,
        },
        t0,
    );
    c.command(
        QueueCmd::Cancel {
            conn_id: 7,
            channel: 1,
            generation: 0,
            tag: "c".into(),
        },
        t0,
    );
    // The next delivery never reaches its client: back in the queue, still redelivered.
    let second = Arc::new(ConnShared::default());
    let lost = deliver_to(&mut c, &second);
    assert!(lost[0].redelivered);
    c.undeliverable(&second, lost, t0);
    let got = get_no_ack(&mut c, t0).expect("a message");
    assert!(got.redelivered, "the first client saw it");
}

#[test]
fn a_quorum_queue_dead_letters_a_message_returned_past_its_delivery_limit() {
    let t0 = Instant::now();
    let mut c = core(
        QueueArgs {
            quorum: true,
            delivery_limit: Some(1),
            dead_letter_exchange: Some("dlx".into()),
            ..Default::default()
        },
        t0,
    );
    publish(&mut c, "poison", None, t0);
    for round in 0..3 {
        let (reply, r) = tokio::sync::oneshot::channel();
        c.command(
            QueueCmd::Get {
                no_ack: false,
                reply,
            },
            t0,
        );
        let Some(got) = r.blocking_recv().expect("reply") else {
            assert_eq!(round, 2, "delivered twice: the limit is one return");
            break;
        };
        c.command(
            QueueCmd::Reject {
                ids: vec![got.msg_id],
                requeue: true,
            },
            t0,
        );
    }
    assert_eq!(
        dead_letters(&c.take_effects()),
        [("poison".to_owned(), "delivery_limit".to_owned())]
    );
}

/// The actor shell under tokio's paused clock: a TTL and an idle expiry fire when (and only
/// when) the clock is advanced past them.
#[tokio::test(start_paused = true)]
async fn the_actor_acts_on_its_deadlines_under_a_paused_clock() {
    use crate::vhost::{QueueSpec, Vhost};
    let v = Vhost::new("v", crate::node::Node::standalone());
    let spec = |name: &str, args: QueueArgs| QueueSpec {
        name: name.into(),
        durable: false,
        exclusive_owner: None,
        auto_delete: false,
        arguments: Default::default(),
        args,
    };
    let (ttl, _) = v
        .declare_queue(spec(
            "ttl",
            QueueArgs {
                message_ttl: Some(60_000),
                ..Default::default()
            },
        ))
        .expect("declare");
    let (idle, _) = v
        .declare_queue(spec(
            "idle",
            QueueArgs {
                expires: Some(3_600_000),
                ..Default::default()
            },
        ))
        .expect("declare");
    ttl.publish(vec![(msg("m"), None)]).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(ttl.message_count(), 1);
    tokio::time::sleep(Duration::from_secs(59)).await;
    assert_eq!(ttl.message_count(), 1, "not yet");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(ttl.message_count(), 0, "expired after a minute");
    assert!(v.queue("idle").is_some());
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(v.queue("idle").is_none(), "an hour idle: gone");
    drop(idle);
}
