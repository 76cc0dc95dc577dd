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
    pub quorum: bool,
    /// Quorum queues: a message delivered (and returned) more often than this is dropped or
    /// dead-lettered (`x-delivery-limit`).
    pub delivery_limit: Option<u64>,
    /// Where a new queue's master goes in a cluster (`x-queue-master-locator`).
    pub master_locator: Option<String>,
}

fn bad(name: &str, queue: &str, vhost: &str, what: &str) -> ChannelError {
    ChannelError::precondition_failed(format!(
        "invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {what}"
    ))
}

impl QueueArgs {
    /// Validates and parses `x-*` arguments; unknown arguments are kept but ignored (RabbitMQ).
    pub fn parse(args: &FieldTable, queue: &str, vhost: &str) -> Result<Self, ChannelError> {
        let mut out = QueueArgs::default();
        for (k, v) in args.inner() {
            let k = k.as_str();
            let non_neg = |min: i64| -> Result<u64, ChannelError> {
                match as_i64(v) {
                    Some(n) if n >= min => Ok(n as u64),
                    Some(n) => Err(bad(k, queue, vhost, &format!("{{value_too_small,{n}}}"))),
                    None => Err(bad(k, queue, vhost, "{unacceptable_type}")),
                }
            };
            match k {
                "x-message-ttl" => out.message_ttl = Some(non_neg(0)?),
                "x-expires" => out.expires = Some(non_neg(1)?),
                "x-max-length" => out.max_length = Some(non_neg(0)?),
                "x-max-length-bytes" => out.max_length_bytes = Some(non_neg(0)?),
                "x-max-priority" => {
                    let n = non_neg(0)?;
                    if !(1..=255).contains(&n) {
                        return Err(bad(k, queue, vhost, &format!("{{value_out_of_range,{n}}}")));
                    }
                    out.max_priority = Some(n as u8);
                }
                "x-overflow" => {
                    out.overflow_set = true;
                    out.overflow = match as_string(v).as_deref() {
                        Some("drop-head") => Overflow::DropHead,
                        Some("reject-publish") => Overflow::RejectPublish,
                        Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
                        _ => return Err(bad(k, queue, vhost, "{unacceptable_value}")),
                    }
                }
                "x-dead-letter-exchange" => {
                    out.dead_letter_exchange = Some(
                        as_string(v).ok_or_else(|| bad(k, queue, vhost, "{unacceptable_type}"))?,
                    )
                }
                "x-dead-letter-routing-key" => {
                    out.dead_letter_routing_key = Some(
                        as_string(v).ok_or_else(|| bad(k, queue, vhost, "{unacceptable_type}"))?,
                    )
                }
                "x-delivery-limit" => out.delivery_limit = Some(non_neg(0)?),
                "x-queue-master-locator" => match as_string(v).as_deref() {
                    Some(l @ ("client-local" | "min-masters" | "random")) => {
                        out.master_locator = Some(l.to_owned())
                    }
                    _ => return Err(bad(k, queue, vhost, "{unacceptable_value}")),
                },
                "x-single-active-consumer" => match v {
                    AMQPValue::Boolean(b) => out.single_active_consumer = *b,
                    _ => return Err(bad(k, queue, vhost, "{unacceptable_type}")),
                },
                "x-queue-type" => match as_string(v).as_deref() {
                    Some("classic") => {}
                    Some("quorum") => out.quorum = true,
                    _ => return Err(bad(k, queue, vhost, "{unacceptable_value}")),
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
        out.delivery_limit = lower(self.delivery_limit, num("delivery-limit"));
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
