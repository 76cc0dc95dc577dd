//! Queue arguments (`x-*`) parsed and validated once at declare time.

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
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: Option<u8>,
    pub single_active_consumer: bool,
    pub quorum: bool,
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
    }
}
