//! Dead-lettering: the copy of a message that goes to a queue's dead-letter exchange, with the
//! `x-death` history RabbitMQ gives it. Pure: the queue core decides when (expired, maxlen,
//! rejected, delivery_limit) and emits the copy as an effect; the actor routes it.

use super::args;
use super::Message;
use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};

/// The message to publish to `dlx` with routing key `rk` (the original's when None) for `msg`
/// leaving queue `queue` for `reason`, at `now_secs` (Unix time). None when it would go round
/// a dead-letter cycle without any rejection in it (RabbitMQ drops it then).
pub fn dead_letter_copy(
    msg: &Message,
    queue: &str,
    reason: &str,
    dlx: &str,
    rk: Option<&str>,
    now_secs: u64,
) -> Option<Message> {
    let rk = rk.map_or_else(|| msg.routing_key().to_string(), str::to_owned);
    let mut headers = msg.headers().unwrap_or_default();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |t: &FieldTable| {
        matches!(t.inner().get("queue"), Some(AMQPValue::LongString(q)) if q.as_bytes() == queue.as_bytes())
            && matches!(t.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == reason.as_bytes())
    };
    let existing = deaths
        .iter()
        .position(|d| matches!(d, AMQPValue::FieldTable(t) if same(t)));
    // A cycle without any rejection would loop forever: drop, as RabbitMQ does.
    if existing.is_some() && reason != "rejected" {
        let cycle_free = deaths.iter().any(|d| {
            matches!(d, AMQPValue::FieldTable(t)
                if matches!(t.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == b"rejected"))
        });
        if !cycle_free {
            return None;
        }
    }
    let entry = match existing {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            let count = t.inner().get("count").and_then(args::as_i64).unwrap_or(0);
            t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            t.insert("time".into(), AMQPValue::Timestamp(now_secs));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            t.insert("time".into(), AMQPValue::Timestamp(now_secs));
            t.insert(
                "exchange".into(),
                AMQPValue::LongString(msg.exchange().into()),
            );
            let mut keys = FieldArray::default();
            keys.push(AMQPValue::LongString(msg.routing_key().into()));
            t.insert("routing-keys".into(), AMQPValue::FieldArray(keys));
            if let Some(exp) = msg.properties().expiration() {
                t.insert(
                    "original-expiration".into(),
                    AMQPValue::LongString(exp.as_str().into()),
                );
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
    for (k, v) in [
        ("x-first-death-queue", queue),
        ("x-first-death-reason", reason),
        ("x-first-death-exchange", msg.exchange()),
    ] {
        if !headers.contains_key(k) {
            headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
        }
    }
    let mut props = msg.properties().with_headers(headers);
    if props.expiration().is_some() {
        // Drop the per-message TTL so the dead-lettered copy does not expire again at once.
        props = strip_expiration(props);
    }
    // The copy is charged to the original's node, as it stays there.
    Message::new(
        msg.memory(),
        dlx.into(),
        rk.as_str().into(),
        props,
        bytes::Bytes::copy_from_slice(msg.body()),
    )
    .ok()
}

fn strip_expiration(p: AMQPProperties) -> AMQPProperties {
    // AMQPProperties has no setter to clear a field: rebuild without expiration.
    let mut n = AMQPProperties::default();
    if let Some(v) = p.content_type() {
        n = n.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        n = n.with_content_encoding(v.clone());
    }
    if let Some(v) = p.headers() {
        n = n.with_headers(v.clone());
    }
    if let Some(v) = p.delivery_mode() {
        n = n.with_delivery_mode(*v);
    }
    if let Some(v) = p.priority() {
        n = n.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        n = n.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        n = n.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        n = n.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        n = n.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        n = n.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        n = n.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        n = n.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        n = n.with_cluster_id(v.clone());
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(headers: Option<FieldTable>) -> Message {
        let mut p = AMQPProperties::default().with_expiration("100".into());
        if let Some(h) = headers {
            p = p.with_headers(h);
        }
        Message::new(
            &crate::memory::UNIT_TESTS,
            "ex".into(),
            "rk".into(),
            p,
            bytes::Bytes::from_static(b"b"),
        )
        .expect("msg")
    }

    fn death(m: &Message, i: usize) -> FieldTable {
        match m.headers().as_ref().and_then(|h| h.inner().get("x-death")) {
            Some(AMQPValue::FieldArray(a)) => match &a.as_slice()[i] {
                AMQPValue::FieldTable(t) => t.clone(),
                other => panic!("{other:?}"),
            },
            other => panic!("no x-death: {other:?}"),
        }
    }

    #[test]
    fn the_first_death_records_where_and_why_and_drops_the_ttl() {
        let d = dead_letter_copy(&msg(None), "q", "expired", "dlx", None, 7).expect("copy");
        assert_eq!(d.exchange(), "dlx");
        assert_eq!(d.routing_key(), "rk");
        assert!(d.properties().expiration().is_none());
        let t = death(&d, 0);
        assert_eq!(t.inner().get("count"), Some(&AMQPValue::LongLongInt(1)));
        assert_eq!(
            t.inner().get("reason"),
            Some(&AMQPValue::LongString("expired".into()))
        );
        assert_eq!(
            t.inner().get("original-expiration"),
            Some(&AMQPValue::LongString("100".into()))
        );
        let h = d.headers().expect("headers");
        assert_eq!(
            h.inner().get("x-first-death-queue"),
            Some(&AMQPValue::LongString("q".into()))
        );
    }

    #[test]
    fn a_repeated_death_counts_up_and_a_cycle_without_rejection_is_dropped() {
        let once = dead_letter_copy(&msg(None), "q", "rejected", "dlx", Some("k2"), 1).expect("1");
        assert_eq!(once.routing_key(), "k2");
        let twice = dead_letter_copy(&once, "q", "rejected", "dlx", None, 2).expect("2");
        assert_eq!(
            death(&twice, 0).inner().get("count"),
            Some(&AMQPValue::LongLongInt(2))
        );
        // Expired twice in the same queue with no rejection in between: a loop, dropped.
        let e1 = dead_letter_copy(&msg(None), "q", "expired", "dlx", None, 1).expect("1");
        assert!(dead_letter_copy(&e1, "q", "expired", "dlx", None, 2).is_none());
        // With a rejection in the history it may go round again.
        assert!(dead_letter_copy(&twice, "q", "expired", "dlx", None, 3).is_some());
    }
}
