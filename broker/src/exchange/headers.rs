//! Headers exchange matching (x-match all / any / all-with-x / any-with-x).

use amq_protocol::types::{AMQPValue, FieldTable};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    All,
    Any,
}

fn same_value(a: &AMQPValue, b: &AMQPValue) -> bool {
    use AMQPValue::*;
    match (a, b) {
        (LongString(x), LongString(y)) => x.as_bytes() == y.as_bytes(),
        (LongString(x), ShortString(y)) | (ShortString(y), LongString(x)) => {
            x.as_bytes() == y.as_str().as_bytes()
        }
        _ => match (crate::queue::args::as_i64(a), crate::queue::args::as_i64(b)) {
            (Some(x), Some(y)) => x == y,
            _ => a == b,
        },
    }
}

/// Does a message with `headers` match a binding with `args`?
pub fn headers_match(args: &FieldTable, headers: Option<&FieldTable>) -> bool {
    let (mode, with_x) = match args.inner().get("x-match") {
        Some(AMQPValue::LongString(s)) => match s.as_bytes() {
            b"any" => (Mode::Any, false),
            b"any-with-x" => (Mode::Any, true),
            b"all-with-x" => (Mode::All, true),
            _ => (Mode::All, false),
        },
        Some(AMQPValue::ShortString(s)) => match s.as_str() {
            "any" => (Mode::Any, false),
            "any-with-x" => (Mode::Any, true),
            "all-with-x" => (Mode::All, true),
            _ => (Mode::All, false),
        },
        _ => (Mode::All, false),
    };
    let empty = FieldTable::default();
    let headers = headers.unwrap_or(&empty);
    let mut considered = 0usize;
    for (k, v) in args.inner() {
        if k.as_str() == "x-match" || (!with_x && k.as_str().starts_with("x-")) {
            continue;
        }
        considered += 1;
        let hit = match headers.inner().get(k.as_str()) {
            None => false,
            Some(h) => matches!(v, AMQPValue::Void) || same_value(v, h),
        };
        match (mode, hit) {
            (Mode::Any, true) => return true,
            (Mode::All, false) => return false,
            _ => {}
        }
    }
    match mode {
        Mode::All => true,
        // RabbitMQ: "any" with no matchable keys matches nothing.
        Mode::Any => {
            let _ = considered;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, &str)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        t
    }

    #[test]
    fn all_and_any() {
        let b = table(&[("x-match", "all"), ("a", "1"), ("b", "2")]);
        assert!(headers_match(
            &b,
            Some(&table(&[("a", "1"), ("b", "2"), ("c", "3")]))
        ));
        assert!(!headers_match(&b, Some(&table(&[("a", "1")]))));
        let b = table(&[("x-match", "any"), ("a", "1"), ("b", "2")]);
        assert!(headers_match(&b, Some(&table(&[("a", "1")]))));
        assert!(!headers_match(&b, Some(&table(&[("a", "2")]))));
        assert!(!headers_match(&b, None));
        let b = table(&[("x-match", "all-with-x"), ("x-k", "v")]);
        assert!(headers_match(&b, Some(&table(&[("x-k", "v")]))));
        assert!(!headers_match(&b, Some(&table(&[]))));
    }
}
