//! Topic pattern matching: words separated by `.`, `*` matches one word, `#` zero or more.
//!
//! Matching is a dynamic program over (pattern word, key word) so that hostile patterns with
//! many `#` stay linear in pattern length times key length.

/// Splits a routing key or pattern into words; the empty string is zero words (as RabbitMQ).
fn words(s: &str) -> Vec<&str> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split('.').collect()
    }
}

/// Does `key` match the binding `pattern`?
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    let p = words(pattern);
    let k = words(key);
    // reach[j] = pattern prefix consumed so far can match key prefix of length j.
    let mut reach = vec![false; k.len() + 1];
    reach[0] = true;
    for pw in &p {
        let mut next = vec![false; k.len() + 1];
        match *pw {
            "#" => {
                let mut any = false;
                for j in 0..=k.len() {
                    any |= reach[j];
                    next[j] = any;
                }
            }
            "*" => {
                for j in 0..k.len() {
                    if reach[j] {
                        next[j + 1] = true;
                    }
                }
            }
            w => {
                for j in 0..k.len() {
                    if reach[j] && k[j] == w {
                        next[j + 1] = true;
                    }
                }
            }
        }
        reach = next;
    }
    reach[k.len()]
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn examples() {
        assert!(topic_matches("a.*.c", "a.b.c"));
        assert!(!topic_matches("a.*.c", "a.c"));
        assert!(topic_matches("a.#.c", "a.c"));
        assert!(topic_matches("a.#.c", "a.x.y.c"));
        assert!(topic_matches("#", ""));
        assert!(topic_matches("#", "a.b"));
        assert!(!topic_matches("*", ""));
        assert!(topic_matches("", ""));
        assert!(!topic_matches("", "a"));
        assert!(topic_matches(
            "*.reply.celery.pidbox",
            "x.reply.celery.pidbox"
        ));
        assert!(topic_matches("#.#.#", "a"));
    }
}
