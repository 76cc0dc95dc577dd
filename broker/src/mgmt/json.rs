//! Conversions between AMQP field tables / message properties and the JSON the management API
//! speaks (RabbitMQ's shapes), plus base64 for payloads. Pure functions.

use amq_protocol::protocol::basic::AMQPProperties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use serde_json::{json, Map, Value};

/// An AMQP value as JSON (byte arrays and timestamps as RabbitMQ shows them).
pub fn value(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::DecimalValue(d) => json!(d.value as f64 / 10f64.powi(i32::from(d.scale))),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(value).collect()),
        AMQPValue::Timestamp(t) => json!(t),
        AMQPValue::FieldTable(t) => table(t),
        AMQPValue::ByteArray(b) => json!(String::from_utf8_lossy(b.as_slice())),
        AMQPValue::Void => Value::Null,
    }
}

/// A field table as a JSON object.
pub fn table(t: &FieldTable) -> Value {
    let mut m = Map::new();
    for (k, v) in t.inner() {
        m.insert(k.to_string(), value(v));
    }
    Value::Object(m)
}

/// A JSON value as an AMQP value (integers as signed 64-bit, as RabbitMQ does).
pub fn to_amqp(v: &Value) -> AMQPValue {
    match v {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(a) => {
            let mut fa = FieldArray::default();
            for x in a {
                fa.push(to_amqp(x));
            }
            AMQPValue::FieldArray(fa)
        }
        Value::Object(_) => AMQPValue::FieldTable(to_table(v).unwrap_or_default()),
    }
}

/// A JSON object as a field table; None if `v` is not an object (null gives an empty table).
pub fn to_table(v: &Value) -> Option<FieldTable> {
    match v {
        Value::Null => Some(FieldTable::default()),
        Value::Object(m) => {
            let mut t = FieldTable::default();
            for (k, x) in m {
                t.insert(ShortString::from(k.as_str()), to_amqp(x));
            }
            Some(t)
        }
        _ => None,
    }
}

/// A field table given over HTTP (`what` names it in errors): an object or null, nested at
/// most [`crate::nesting::MAX_DEPTH`] levels like a table that arrives over AMQP.
pub fn input_table(v: &Value, what: &str) -> Result<FieldTable, String> {
    if crate::nesting::json_too_deep(v) {
        return Err(crate::nesting::too_deep_text(&format!("'{what}'")));
    }
    to_table(v).ok_or_else(|| format!("'{what}' must be an object"))
}

/// Message properties as RabbitMQ's management API shows them (only the set ones).
pub fn properties(p: &AMQPProperties) -> Value {
    let mut m = Map::new();
    let mut s = |k: &str, v: Option<&ShortString>| {
        if let Some(v) = v {
            m.insert(k.into(), json!(v.as_str()));
        }
    };
    s("content_type", p.content_type().as_ref());
    s("content_encoding", p.content_encoding().as_ref());
    s("correlation_id", p.correlation_id().as_ref());
    s("reply_to", p.reply_to().as_ref());
    s("expiration", p.expiration().as_ref());
    s("message_id", p.message_id().as_ref());
    s("type", p.kind().as_ref());
    s("user_id", p.user_id().as_ref());
    s("app_id", p.app_id().as_ref());
    s("cluster_id", p.cluster_id().as_ref());
    if let Some(h) = p.headers() {
        m.insert("headers".into(), table(h));
    }
    if let Some(d) = p.delivery_mode() {
        m.insert("delivery_mode".into(), json!(d));
    }
    if let Some(x) = p.priority() {
        m.insert("priority".into(), json!(x));
    }
    if let Some(t) = p.timestamp() {
        m.insert("timestamp".into(), json!(t));
    }
    Value::Object(m)
}

/// Builds message properties from the management API's JSON; Err names the bad field.
pub fn to_properties(v: &Value) -> Result<AMQPProperties, String> {
    let Some(m) = v.as_object() else {
        if v.is_null() {
            return Ok(AMQPProperties::default());
        }
        return Err("properties must be an object".into());
    };
    let mut p = AMQPProperties::default();
    for (k, x) in m {
        let text = || -> Result<ShortString, String> {
            match x {
                Value::String(s) if s.len() <= 255 => Ok(ShortString::from(s.as_str())),
                Value::Number(n) => Ok(ShortString::from(n.to_string())),
                _ => Err(format!("property '{k}' must be a string")),
            }
        };
        let int = || -> Result<u64, String> {
            x.as_u64()
                .or_else(|| x.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| format!("property '{k}' must be a non-negative integer"))
        };
        p = match k.as_str() {
            "content_type" => p.with_content_type(text()?),
            "content_encoding" => p.with_content_encoding(text()?),
            "correlation_id" => p.with_correlation_id(text()?),
            "reply_to" => p.with_reply_to(text()?),
            "expiration" => p.with_expiration(text()?),
            "message_id" => p.with_message_id(text()?),
            "type" => p.with_type(text()?),
            "user_id" => p.with_user_id(text()?),
            "app_id" => p.with_app_id(text()?),
            "cluster_id" => p.with_cluster_id(text()?),
            "delivery_mode" => {
                p.with_delivery_mode(u8::try_from(int()?).map_err(|_| "bad delivery_mode")?)
            }
            "priority" => p.with_priority(u8::try_from(int()?).map_err(|_| "bad priority")?),
            "timestamp" => p.with_timestamp(int()?),
            "headers" => p.with_headers(input_table(x, "headers")?),
            other => return Err(format!("unknown property '{other}'")),
        };
    }
    Ok(p)
}

/// Standard base64 with padding.
pub fn b64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Decodes standard base64 (padding optional, whitespace ignored); None if malformed.
pub fn b64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    use base64::Engine as _;
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    LENIENT.decode(compact).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for s in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            b"foobar",
            &[0, 255, 128],
        ] {
            let e = b64_encode(s);
            assert_eq!(b64_decode(&e).as_deref(), Some(s), "{e}");
        }
        assert_eq!(b64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(b64_encode(b"fo"), "Zm8=");
        assert_eq!(b64_decode("Zm8"), Some(b"fo".to_vec()));
        assert_eq!(b64_decode("Z!!"), None);
        assert_eq!(b64_decode("Z"), None);
    }

    #[test]
    fn tables_round_trip_through_json() {
        let v = json!({"x-max-length": 10, "s": "a", "b": true, "d": 1.5, "l": [1, "x"], "t": {"k": 1}});
        let t = to_table(&v).expect("object");
        assert_eq!(table(&t), v);
        assert!(to_table(&json!([1])).is_none());
    }

    #[test]
    fn properties_round_trip_and_reject_bad_fields() {
        let v = json!({"content_type": "text/plain", "delivery_mode": 2, "priority": 3,
                       "headers": {"h": 1}, "correlation_id": "c", "timestamp": 5});
        let p = to_properties(&v).expect("valid");
        assert_eq!(properties(&p), v);
        assert!(to_properties(&json!({"delivery_mode": "x"})).is_err());
        assert!(to_properties(&json!({"nope": 1})).is_err());
        assert!(to_properties(&json!({"priority": 300})).is_err());
    }
}
