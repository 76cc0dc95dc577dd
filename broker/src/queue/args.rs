//! Queue arguments (`x-*`) parsed and validated once at declare time, and resolved against
//! the policies that apply to the queue ([`QueueArgs::resolve`]).

use crate::error::ChannelError;
use amq_protocol::types::{AMQPValue, FieldTable};

/// Integer value of any AMQP integer type.
pub fn as_i64(v: &AMQPValue) -> Option<i64> {
    Some(match v {
        AMQPValue::ShortShortInt(x) => *x as i64,
        AMQPValue::ShortShortUInt(x) => *x as i64,
        AMQPValue::ShortInt(x) => *x as i64,
        AMQPValue::ShortUInt(x) => *x as i64,
        AMQPValue::LongInt(x) => *x as i64,
        AMQPValue::LongUInt(x) => *x as i64,
        AMQPValue::LongLongInt(x) => *x,
        AMQPValue::Timestamp(x) => i64::try_from(*x).ok()?,
        _ => return None,
    })
}

/// String value of a short or long string.
pub fn as_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// What happens when a queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    #[default]
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// Parsed queue arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    /// `x-overflow` was given (a policy's `overflow` applies only when it was not).
    pub overflow_set: bool,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    /// `x-queue-type: quorum`: the quorum semantics one node can honour (see [`QueueArgs::check_declare`]
    /// and the queue core: `x-delivery-count`, delivery limits, quorum's overflow).
    pub quorum: bool,
    /// Quorum queues: a message returned more often than this is dropped or dead-lettered
    /// (`x-delivery-limit`, or the policy's `delivery-limit`). Any integer, as RabbitMQ 3.10
    /// takes it: a negative one drops a message at its first return.
    pub delivery_limit: Option<i64>,
    /// Where a new queue's master goes in a cluster (`x-queue-master-locator`).
    pub master_locator: Option<String>,
}

fn bad(name: &str, queue: &str, vhost: &str, what: &str) -> ChannelError {
    ChannelError::precondition_failed(format!(
        "invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {what}"
    ))
}

/// RabbitMQ's name of a field-table value's type, as its errors print it.
fn type_name(v: &AMQPValue) -> &'static str {
    match v {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) => "shortstr",
        AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// Arguments RabbitMQ 3.10.8 refuses for a quorum queue ("... of queue type
/// rabbit_quorum_queue"), checked there one by one.
const NOT_FOR_QUORUM: &[&str] = &[
    "x-initial-cluster-size",
    "x-max-age",
    "x-max-priority",
    "x-queue-master-locator",
    "x-queue-mode",
    "x-queue-version",
    "x-stream-max-segment-size-bytes",
];

/// Arguments RabbitMQ 3.10.8 refuses for a classic queue (they belong to quorum queues or
/// streams), checked there one by one.
const NOT_FOR_CLASSIC: &[&str] = &[
    "x-dead-letter-strategy",
    "x-delivery-limit",
    "x-initial-cluster-size",
    "x-max-age",
    "x-max-in-memory-bytes",
    "x-max-in-memory-length",
    "x-queue-leader-locator",
    "x-quorum-initial-group-size",
    "x-stream-max-segment-size-bytes",
];

impl QueueArgs {
    /// Validates and parses `x-*` arguments; unknown arguments are kept but ignored (RabbitMQ).
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<Self, ChannelError> {
        let mut out = QueueArgs::default();
        for (k, v) in args.inner() {
            let k = k.as_str();
            // RabbitMQ's checks and texts: a negative value, zero where it must be positive,
            // a value of another type.
            let non_neg = |min: i64| -> Result<u64, ChannelError> {
                match as_i64(v) {
                    Some(n) if n >= min => Ok(n as u64),
                    Some(n) if n < 0 => {
                        Err(bad(k, queue, vhost, &format!("{{value_negative,{n}}}")))
                    }
                    Some(n) => Err(bad(k, queue, vhost, &format!("{{value_zero,{n}}}"))),
                    None => Err(bad(
                        k,
                        queue,
                        vhost,
                        &format!("\"expected integer, got {}\"", type_name(v)),
                    )),
                }
            };
            let wrong_type = || {
                bad(
                    k,
                    queue,
                    vhost,
                    &format!("{{unacceptable_type,{}}}", type_name(v)),
                )
            };
            match k {
                "x-message-ttl" => out.message_ttl = Some(non_neg(0)?),
                "x-expires" => out.expires = Some(non_neg(1)?),
                "x-max-length" => out.max_length = Some(non_neg(0)?),
                "x-max-length-bytes" => out.max_length_bytes = Some(non_neg(0)?),
                "x-max-priority" => {
                    // 0 is taken and makes no priority queue, as in RabbitMQ.
                    let n = non_neg(0)?;
                    if n > 255 {
                        return Err(bad(k, queue, vhost, &format!("{{max_value_exceeded,{n}}}")));
                    }
                    out.max_priority = (n > 0).then_some(n as u8);
                }
                "x-overflow" => {
                    out.overflow_set = true;
                    out.overflow = match as_string(v).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        Some(_) => return Err(bad(k, queue, vhost, "invalid_overflow")),
                        None => return Err(wrong_type()),
                    }
                }
                "x-dead-letter-exchange" | "x-dead-letter-routing-key" => {
                    let name = as_string(v).ok_or_else(|| {
                        ChannelError::precondition_failed(format!(
                            "invalid type '{}' for arg '{k}' in queue '{queue}' in vhost '{vhost}'",
                            type_name(v)
                        ))
                    })?;
                    if k == "x-dead-letter-exchange" {
                        out.dead_letter_exchange = Some(name);
                    } else {
                        out.dead_letter_routing_key = Some(name);
                    }
                }
                // RabbitMQ 3.10 checks nothing here: an integer is the limit, anything else
                // is no limit.
                "x-delivery-limit" => out.delivery_limit = as_i64(v),
                "x-queue-master-locator" => match as_string(v).as_deref() {
                    Some(l @ ("client-local" | "min-masters" | "random")) => {
                        out.master_locator = Some(l.to_owned())
                    }
                    _ => return Err(bad(k, queue, vhost, "{unacceptable_value}")),
                },
                "x-single-active-consumer" => match v {
                    AMQPValue::Boolean(b) => out.single_active_consumer = *b,
                    _ => return Err(wrong_type()),
                },
                "x-queue-type" => match as_string(v).as_deref() {
                    Some("classic") => {}
                    Some("quorum") => out.quorum = true,
                    Some(other) => {
                        return Err(bad(
                            k,
                            queue,
                            vhost,
                            &format!("\"unsupported queue type '{other}'\""),
                        ))
                    }
                    None => return Err(wrong_type()),
                },
                _ => {}
            }
        }
        if out.dead_letter_routing_key.is_some() && out.dead_letter_exchange.is_none() {
            return Err(ChannelError::precondition_failed(format!(
                "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': \
                 Key x-dead-letter-exchange should be present"
            )));
        }
        Ok(out)
    }

    /// What RabbitMQ 3.10.8 checks of a queue's type at declare, after the arguments' values
    /// ([`QueueArgs::parse`]), in its order: the arguments the type refuses, then (quorum)
    /// the properties a replicated queue cannot have (auto-delete, exclusive, non-durable)
    /// and the values of quorum's own arguments. `args` is the declared table.
    pub fn check_declare(
        &self,
        args: &FieldTable,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        queue: &str,
        vhost: &str,
    ) -> Result<(), ChannelError> {
        let (refused, kind) = if self.quorum {
            (NOT_FOR_QUORUM, "rabbit_quorum_queue")
        } else {
            (NOT_FOR_CLASSIC, "rabbit_classic_queue")
        };
        if let Some(k) = refused.iter().find(|k| args.inner().contains_key(**k)) {
            return Err(ChannelError::precondition_failed(format!(
                "invalid arg '{k}' for queue '{queue}' in vhost '{vhost}' of queue type {kind}"
            )));
        }
        if !self.quorum {
            return Ok(());
        }
        let property = |p: &str| {
            ChannelError::precondition_failed(format!(
                "invalid property '{p}' for queue '{queue}' in vhost '{vhost}'"
            ))
        };
        if auto_delete {
            return Err(property("auto-delete"));
        }
        if exclusive {
            return Err(property("exclusive-owner"));
        }
        if !durable {
            return Err(property("non-durable"));
        }
        for (k, v) in args.inner() {
            let k = k.as_str();
            let int = |min: i64| match as_i64(v) {
                Some(n) if n >= min => Ok(()),
                Some(n) if n < 0 => Err(bad(k, queue, vhost, &format!("{{value_negative,{n}}}"))),
                Some(n) => Err(bad(k, queue, vhost, &format!("{{value_zero,{n}}}"))),
                None => Err(bad(
                    k,
                    queue,
                    vhost,
                    &format!("\"expected integer, got {}\"", type_name(v)),
                )),
            };
            match k {
                "x-quorum-initial-group-size" => int(1)?,
                "x-max-in-memory-length" | "x-max-in-memory-bytes" => int(0)?,
                "x-dead-letter-strategy" => match as_string(v).as_deref() {
                    Some("at-most-once" | "at-least-once") => {}
                    Some(_) => return Err(bad(k, queue, vhost, "invalid_dlx_strategy")),
                    None => {
                        return Err(bad(
                            k,
                            queue,
                            vhost,
                            &format!("{{unacceptable_type,{}}}", type_name(v)),
                        ))
                    }
                },
                "x-queue-leader-locator" => match as_string(v).as_deref() {
                    Some("client-local" | "balanced") => {}
                    _ => return Err(bad(k, queue, vhost, "invalid_queue_locator_arg")),
                },
                _ => {}
            }
        }
        Ok(())
    }

    /// The settings that take effect once the policies are applied (`def` is the merged
    /// definition of the queue's policy and operator policy), by RabbitMQ 3.10's rules for
    /// each key: limits and times take the lower of argument and policy (`expires`,
    /// `message-ttl`, `max-length`, `max-length-bytes`, `delivery-limit`); the argument wins
    /// for the others (`dead-letter-exchange`, `dead-letter-routing-key`, `overflow`,
    /// `queue-master-locator`). The policy's values were validated when it was set.
    pub fn resolve(&self, def: &serde_json::Map<String, serde_json::Value>) -> QueueArgs {
        let mut out = self.clone();
        let num = |k: &str| def.get(k).and_then(serde_json::Value::as_u64);
        let text = |k: &str| {
            def.get(k)
                .and_then(serde_json::Value::as_str)
                .map(str::to_owned)
        };
        let lower = |arg: Option<u64>, pol: Option<u64>| match (arg, pol) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        };
        out.expires = lower(self.expires, num("expires"));
        out.message_ttl = lower(self.message_ttl, num("message-ttl"));
        out.max_length = lower(self.max_length, num("max-length"));
        out.max_length_bytes = lower(self.max_length_bytes, num("max-length-bytes"));
        out.delivery_limit = match (
            self.delivery_limit,
            def.get("delivery-limit")
                .and_then(serde_json::Value::as_i64),
        ) {
            (Some(a), Some(p)) => Some(a.min(p)),
            (a, p) => a.or(p),
        };
        if self.dead_letter_exchange.is_none() {
            out.dead_letter_exchange = text("dead-letter-exchange");
        }
        if self.dead_letter_routing_key.is_none() {
            out.dead_letter_routing_key = text("dead-letter-routing-key");
        }
        if self.master_locator.is_none() {
            out.master_locator = text("queue-master-locator");
        }
        if !self.overflow_set {
            out.overflow = match text("overflow").as_deref() {
                Some("reject-publish") => Overflow::RejectPublish,
                Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                _ => Overflow::DropHead,
            };
        }
        if out.quorum && out.overflow == Overflow::RejectPublishDlx {
            // RabbitMQ 3.10's quorum queues take it (logging a warning) and drop the head.
            out.overflow = Overflow::DropHead;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn policies_resolve_against_arguments_by_rabbitmq_rules() {
        let mut t = FieldTable::default();
        t.insert("x-max-length".into(), AMQPValue::LongInt(5));
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(100));
        t.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("mine".into()),
        );
        t.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        let declared = QueueArgs::parse(&t, "q", "/").expect("ok");
        let def = json!({"max-length": 3, "message-ttl": 1000, "expires": 60000,
                         "dead-letter-exchange": "theirs", "dead-letter-routing-key": "rk",
                         "overflow": "drop-head", "max-length-bytes": 10});
        let a = declared.resolve(def.as_object().expect("object"));
        assert_eq!(a.max_length, Some(3), "the lower limit");
        assert_eq!(a.message_ttl, Some(100), "the lower TTL");
        assert_eq!(a.expires, Some(60000), "the policy's alone");
        assert_eq!(a.max_length_bytes, Some(10));
        assert_eq!(
            a.dead_letter_exchange.as_deref(),
            Some("mine"),
            "the argument wins"
        );
        assert_eq!(a.dead_letter_routing_key.as_deref(), Some("rk"));
        assert_eq!(a.overflow, Overflow::RejectPublish, "the argument wins");
        // Without arguments the policy decides; with no policy the arguments stand.
        let bare = QueueArgs::default().resolve(def.as_object().expect("object"));
        assert_eq!(bare.overflow, Overflow::DropHead);
        assert_eq!(bare.dead_letter_exchange.as_deref(), Some("theirs"));
        let none = declared.resolve(&serde_json::Map::new());
        assert_eq!(none, declared);
        let rp = QueueArgs::default().resolve(
            json!({"overflow": "reject-publish-dlx"})
                .as_object()
                .expect("object"),
        );
        assert_eq!(rp.overflow, Overflow::RejectPublishDlx);
    }

    fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    fn quorum_with(extra: &[(&str, AMQPValue)]) -> FieldTable {
        let mut pairs = vec![("x-queue-type", AMQPValue::LongString("quorum".into()))];
        pairs.extend_from_slice(extra);
        table(&pairs)
    }

    /// The reply text of declaring `args` (durable, exclusive, auto-delete), or None if taken.
    fn declare(
        args: &FieldTable,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
    ) -> Option<String> {
        let parsed = match QueueArgs::parse(args, "q", "/") {
            Ok(p) => p,
            Err(e) => return Some(e.reply_text()),
        };
        parsed
            .check_declare(args, durable, exclusive, auto_delete, "q", "/")
            .err()
            .map(|e| {
                assert_eq!(e.reply_code(), 406);
                e.reply_text()
            })
    }

    #[test]
    fn quorum_queues_refuse_what_rabbitmq_3_10_refuses_with_its_texts() {
        let q = quorum_with(&[]);
        assert_eq!(declare(&q, true, false, false), None);
        let property = |p: &str| {
            Some(format!(
                "PRECONDITION_FAILED - invalid property '{p}' for queue 'q' in vhost '/'"
            ))
        };
        assert_eq!(declare(&q, false, false, false), property("non-durable"));
        assert_eq!(declare(&q, true, true, false), property("exclusive-owner"));
        // RabbitMQ's order: auto-delete, then exclusive, then durability.
        assert_eq!(declare(&q, false, true, true), property("auto-delete"));
        assert_eq!(declare(&q, false, true, false), property("exclusive-owner"));
        for k in [
            "x-max-priority",
            "x-queue-mode",
            "x-queue-master-locator",
            "x-max-age",
        ] {
            let v = match k {
                "x-max-priority" => AMQPValue::LongInt(5),
                "x-queue-master-locator" => AMQPValue::LongString("min-masters".into()),
                _ => AMQPValue::LongString("lazy".into()),
            };
            // Checked before the properties.
            assert_eq!(
                declare(&quorum_with(&[(k, v)]), false, false, false),
                Some(format!(
                    "PRECONDITION_FAILED - invalid arg '{k}' for queue 'q' in vhost '/' \
                     of queue type rabbit_quorum_queue"
                )),
                "{k}"
            );
        }
        // Taken: quorum's own arguments and those it shares with classic queues.
        for (k, v) in [
            ("x-delivery-limit", AMQPValue::LongInt(-1)),
            ("x-delivery-limit", AMQPValue::LongString("a".into())),
            ("x-quorum-initial-group-size", AMQPValue::LongInt(3)),
            ("x-max-in-memory-length", AMQPValue::LongInt(3)),
            (
                "x-dead-letter-strategy",
                AMQPValue::LongString("at-least-once".into()),
            ),
            (
                "x-overflow",
                AMQPValue::LongString("reject-publish-dlx".into()),
            ),
            ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ("x-expires", AMQPValue::LongInt(1000)),
        ] {
            assert_eq!(
                declare(&quorum_with(&[(k, v)]), true, false, false),
                None,
                "{k}"
            );
        }
        assert_eq!(
            declare(
                &quorum_with(&[("x-quorum-initial-group-size", AMQPValue::LongInt(0))]),
                true,
                false,
                false
            ),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-quorum-initial-group-size' for queue 'q' \
                 in vhost '/': {value_zero,0}"
                    .into()
            )
        );
        // reject-publish-dlx is taken and acts as drop-head (RabbitMQ logs a warning).
        let a = QueueArgs::parse(
            &quorum_with(&[(
                "x-overflow",
                AMQPValue::LongString("reject-publish-dlx".into()),
            )]),
            "q",
            "/",
        )
        .expect("ok");
        assert_eq!(
            a.resolve(&serde_json::Map::new()).overflow,
            Overflow::DropHead
        );
    }

    #[test]
    fn classic_queues_refuse_quorum_and_stream_arguments() {
        for k in [
            "x-delivery-limit",
            "x-quorum-initial-group-size",
            "x-max-in-memory-length",
        ] {
            assert_eq!(
                declare(&table(&[(k, AMQPValue::LongInt(3))]), true, false, false),
                Some(format!(
                    "PRECONDITION_FAILED - invalid arg '{k}' for queue 'q' in vhost '/' \
                     of queue type rabbit_classic_queue"
                ))
            );
        }
        let classic = |extra: (&str, AMQPValue)| {
            table(&[
                ("x-queue-type", AMQPValue::LongString("classic".into())),
                extra,
            ])
        };
        assert_eq!(
            declare(
                &classic(("x-max-priority", AMQPValue::LongInt(0))),
                false,
                true,
                true
            ),
            None,
            "0 is taken (no priorities)"
        );
        assert_eq!(
            declare(
                &classic(("x-max-length", AMQPValue::LongInt(-1))),
                false,
                false,
                false
            ),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-max-length' for queue 'q' in vhost '/': \
                 {value_negative,-1}"
                    .into()
            )
        );
        assert_eq!(
            declare(
                &classic(("x-message-ttl", AMQPValue::LongString("a".into()))),
                false,
                false,
                false
            ),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-message-ttl' for queue 'q' in vhost '/': \
                 \"expected integer, got longstr\""
                    .into()
            )
        );
        assert_eq!(
            declare(
                &table(&[("x-queue-type", AMQPValue::LongString("foo".into()))]),
                true,
                false,
                false
            ),
            Some(
                "PRECONDITION_FAILED - invalid arg 'x-queue-type' for queue 'q' in vhost '/': \
                 \"unsupported queue type 'foo'\""
                    .into()
            )
        );
    }

    #[test]
    fn parses_known_args() {
        let mut t = FieldTable::default();
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(100));
        t.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        t.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(5));
        let a = QueueArgs::parse(&t, "q", "/").expect("ok");
        assert_eq!(a.message_ttl, Some(100));
        assert_eq!(a.overflow, Overflow::RejectPublish);
        assert_eq!(a.max_priority, Some(5));
        let mut t = FieldTable::default();
        t.insert("x-message-ttl".into(), AMQPValue::LongInt(-1));
        assert_eq!(
            QueueArgs::parse(&t, "q", "/").map_err(|e| e.reply_code()),
            Err(406)
        );
        let mut t = FieldTable::default();
        t.insert(
            "x-queue-master-locator".into(),
            AMQPValue::LongString("x".into()),
        );
        assert_eq!(
            QueueArgs::parse(&t, "q", "/").map_err(|e| e.reply_code()),
            Err(406)
        );
    }
}
