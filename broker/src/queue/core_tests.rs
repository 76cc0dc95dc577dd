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
        activity: Default::default(),
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
            from: None,
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
                    .headers()
                    .as_ref()
                    .and_then(|h| h.inner().get("x-first-death-reason").cloned())
                {
                    Some(amq_protocol::types::AMQPValue::LongString(r)) => {
                        String::from_utf8_lossy(r.as_bytes()).into_owned()
                    }
                    other => format!("{other:?}"),
                };
                Some((String::from_utf8_lossy(m.body()).into_owned(), reason))
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
    assert_eq!(got.msg.body(), b"6", "the oldest six went");
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

/// basic.get with acknowledgement, answered in the same call.
fn get_ack(c: &mut QueueCore, now: Instant) -> Option<GetResult> {
    let (reply, r) = tokio::sync::oneshot::channel();
    c.command(
        QueueCmd::Get {
            no_ack: false,
            reply,
        },
        now,
    );
    r.blocking_recv().expect("reply")
}

fn requeue(c: &mut QueueCore, id: u64, now: Instant) {
    c.command(
        QueueCmd::Reject {
            ids: vec![id],
            requeue: true,
        },
        now,
    );
}

fn header(m: &Message, key: &str) -> Option<amq_protocol::types::AMQPValue> {
    m.headers()
        .as_ref()
        .and_then(|h| h.inner().get(key).cloned())
}

fn quorum(limit: Option<i64>) -> QueueArgs {
    QueueArgs {
        quorum: true,
        delivery_limit: limit,
        dead_letter_exchange: Some("dlx".into()),
        ..Default::default()
    }
}

#[test]
fn a_quorum_queue_dead_letters_a_message_returned_past_its_delivery_limit() {
    let t0 = Instant::now();
    let mut c = core(quorum(Some(2)), t0);
    publish(&mut c, "poison", None, t0);
    // As RabbitMQ 3.10.8: a limit of two returns delivers three times, counted 0, 1, 2.
    let mut seen = Vec::new();
    while let Some(got) = get_ack(&mut c, t0) {
        seen.push((header(&got.msg, "x-delivery-count"), got.redelivered));
        requeue(&mut c, got.msg_id, t0);
    }
    use amq_protocol::types::AMQPValue::LongLongInt;
    assert_eq!(
        seen,
        [
            (Some(LongLongInt(0)), false),
            (Some(LongLongInt(1)), true),
            (Some(LongLongInt(2)), true)
        ]
    );
    let effects = c.take_effects();
    assert_eq!(
        dead_letters(&effects),
        [("poison".to_owned(), "delivery_limit".to_owned())]
    );
    // The dead-lettered copy is the message as published: no x-delivery-count (RabbitMQ).
    let Some(Effect::DeadLetter(m)) = effects.first() else {
        panic!("expected a dead letter, got {effects:?}");
    };
    assert_eq!(header(m, "x-delivery-count"), None);
    assert!(c.deliveries.is_empty(), "its count went with it");
}

#[test]
fn quorum_deliveries_to_consumers_carry_x_delivery_count_and_classic_ones_do_not() {
    let t0 = Instant::now();
    let (events, _erx) = mpsc::unbounded_channel();
    let conn = Arc::new(ConnShared::default());
    for (args, want) in [
        (
            quorum(None),
            Some(amq_protocol::types::AMQPValue::LongLongInt(2)),
        ),
        (QueueArgs::default(), None),
    ] {
        let mut c = core(args, t0);
        // A consumer's first delivery has none (RabbitMQ 3.10.8).
        let (reply, _r) = tokio::sync::oneshot::channel();
        c.command(
            QueueCmd::Consume {
                spec: consumer(&events, &conn),
                reply,
            },
            t0,
        );
        publish(&mut c, "m", None, t0);
        let Some(Effect::Deliver { deliveries, .. }) = c.take_effects().pop() else {
            panic!("expected a delivery");
        };
        assert_eq!(header(&deliveries[0].msg, "x-delivery-count"), None);
        requeue(&mut c, deliveries[0].msg_id, t0);
        c.command(
            QueueCmd::Cancel {
                conn_id: 7,
                channel: 1,
                generation: 0,
                tag: "c".into(),
            },
            t0,
        );
        c.take_effects();
        let first = get_ack(&mut c, t0).expect("a message");
        let want_get = want
            .clone()
            .map(|_| amq_protocol::types::AMQPValue::LongLongInt(1));
        assert_eq!(header(&first.msg, "x-delivery-count"), want_get);
        requeue(&mut c, first.msg_id, t0);
        let (reply, _r) = tokio::sync::oneshot::channel();
        c.command(
            QueueCmd::Consume {
                spec: consumer(&events, &conn),
                reply,
            },
            t0,
        );
        let Some(Effect::Deliver { deliveries, .. }) = c.take_effects().pop() else {
            panic!("expected a delivery");
        };
        assert_eq!(header(&deliveries[0].msg, "x-delivery-count"), want);
        assert!(deliveries[0].redelivered);
        // No limit: returned as often as the client likes.
        for _ in 0..5 {
            requeue(&mut c, deliveries[0].msg_id, t0);
            assert_eq!(ready(&c) + c.unacked.len(), 1);
        }
        conn.pending.store(0, Ordering::Relaxed);
    }
}

#[test]
fn a_negative_delivery_limit_drops_at_the_first_return_and_policies_take_the_lower() {
    let t0 = Instant::now();
    let mut c = core(quorum(Some(-1)), t0);
    publish(&mut c, "m", None, t0);
    let got = get_ack(&mut c, t0).expect("a message");
    requeue(&mut c, got.msg_id, t0);
    assert!(
        get_ack(&mut c, t0).is_none(),
        "RabbitMQ 3.10.8 drops it too"
    );
    // A delivery-limit policy on a queue without the argument.
    let mut c = core(quorum(None), t0);
    let def = serde_json::json!({"delivery-limit": 0});
    assert!(c.handle.set_policy(Applied {
        definition: def.as_object().cloned().expect("object"),
        ..Default::default()
    }));
    c.turn(t0, false);
    publish(&mut c, "m", None, t0);
    let got = get_ack(&mut c, t0).expect("a message");
    requeue(&mut c, got.msg_id, t0);
    assert!(
        get_ack(&mut c, t0).is_none(),
        "limit 0: dropped at its first return"
    );
    assert_eq!(
        dead_letters(&c.take_effects()),
        [("m".to_owned(), "delivery_limit".to_owned())]
    );
}

#[test]
fn a_quorum_queue_takes_one_message_past_its_limit_before_refusing() {
    let t0 = Instant::now();
    let mut c = core(
        QueueArgs {
            quorum: true,
            max_length: Some(1),
            overflow: Overflow::RejectPublish,
            overflow_set: true,
            ..Default::default()
        },
        t0,
    );
    let (tx, mut rx) = mpsc::unbounded_channel();
    for seq in 1..=3 {
        publish(&mut c, "m", Some(ticket(&tx, seq)), t0);
    }
    // RabbitMQ 3.10.8's quorum queues refuse once over the limit: 2 of 3 taken.
    assert_eq!(confirms(&mut rx), vec![(1, true), (2, true), (3, false)]);
    assert_eq!(ready(&c), 2);
}

#[test]
fn unacked_bytes_follow_deliveries_acks_and_returns() {
    let t0 = Instant::now();
    let mut c = core(QueueArgs::default(), t0);
    for b in ["aa", "bbb", "cccc"] {
        publish(&mut c, b, None, t0);
    }
    let unacked_bytes = |c: &mut QueueCore| {
        c.turn(t0, false);
        c.handle.activity.unacked_bytes.load(Ordering::Relaxed)
    };
    let a = get_ack(&mut c, t0).expect("aa");
    let b = get_ack(&mut c, t0).expect("bbb");
    assert_eq!(unacked_bytes(&mut c), 5);
    assert_eq!(c.handle.stats.ready_bytes.load(Ordering::Relaxed), 4);
    c.command(
        QueueCmd::Ack {
            ids: vec![a.msg_id],
        },
        t0,
    );
    assert_eq!(unacked_bytes(&mut c), 3);
    requeue(&mut c, b.msg_id, t0);
    assert_eq!(unacked_bytes(&mut c), 0);
    assert_eq!(c.handle.stats.ready_bytes.load(Ordering::Relaxed), 7);
    // Deliveries to a connection that is gone come back: their bytes too.
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
    assert_eq!(unacked_bytes(&mut c), 7);
    let Some(Effect::Deliver { deliveries, .. }) = c.take_effects().pop() else {
        panic!("expected a delivery");
    };
    c.undeliverable(&conn, deliveries, t0);
    assert_eq!(unacked_bytes(&mut c), 0);
}

#[test]
fn consumer_capacity_falls_while_messages_wait_and_rises_when_consumers_take_them() {
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    let mut c = core(QueueArgs::default(), t0);
    let (events, _erx) = mpsc::unbounded_channel();
    let conn = Arc::new(ConnShared::default());
    let (reply, _r) = tokio::sync::oneshot::channel();
    let mut spec = consumer(&events, &conn);
    spec.prefetch = 1;
    c.command(QueueCmd::Consume { spec, reply }, t0);
    c.turn(t0, false);
    let capacity = |c: &QueueCore, at: Instant| c.handle.activity.consumer_capacity(1, at);
    assert_eq!(capacity(&c, t0 + s), 1.0, "nothing waited");
    publish(&mut c, "1", None, t0);
    publish(&mut c, "2", None, t0);
    c.turn(t0, false);
    // "2" waits for the consumer's prefetch from t0: one half-life later, halfway down.
    assert!((capacity(&c, t0 + s) - 0.5).abs() < 1e-6);
    let Some(Effect::Deliver { deliveries, .. }) = c.take_effects().into_iter().next() else {
        panic!("expected a delivery");
    };
    c.command(
        QueueCmd::Ack {
            ids: vec![deliveries[0].msg_id],
        },
        t0 + 2 * s,
    );
    c.turn(t0 + 2 * s, false);
    // "2" went at once; the consumer could take more: rising from a quarter.
    let later = capacity(&c, t0 + 3 * s);
    assert!((later - 0.625).abs() < 1e-6, "{later}");
    assert_eq!(c.handle.activity.consumer_capacity(0, t0 + 3 * s), 0.0);
}

#[test]
fn the_queue_publishes_when_it_last_worked() {
    let t0 = Instant::now();
    let mut c = core(QueueArgs::default(), t0);
    c.turn(t0, false);
    let busy = |c: &QueueCore| c.handle.activity.busy_at_ms.load(Ordering::Relaxed);
    assert_eq!(busy(&c), 1_000_000, "the wall clock the core was given");
    publish(&mut c, "m", None, t0 + Duration::from_millis(2500));
    c.turn(t0 + Duration::from_secs(10), false);
    assert_eq!(busy(&c), 1_002_500, "a turn with nothing to do is no work");
    assert_eq!(c.handle.activity.idle_since_ms(1_003_000), None);
    assert_eq!(c.handle.activity.idle_since_ms(1_003_500), Some(1_002_500));
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
    ttl.publish(vec![(msg("m"), None)], None).await;
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
