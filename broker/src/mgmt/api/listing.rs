//! The query parameters of list endpoints, as RabbitMQ 3.10's management plugin reads them
//! (`rabbit_mgmt_util`): pure functions from a query and a list of JSON items to the answer.
//!
//! - `sort=KEY` (dotted paths such as `message_stats.publish_details.rate` reach into
//!   objects) sorts by KEY, then by the endpoint's default keys (`vhost`, `name` for most);
//!   without `sort` the default keys alone; `sort=` (empty) leaves the list as it is.
//!   `sort_reverse=true` reverses the sorted list. Values compare as Erlang terms do, since
//!   that is what RabbitMQ sorts: numbers < booleans and null < objects < lists < strings, a
//!   missing key counting as the number 0.
//! - `page=N` (from 1) with `page_size=M` (1..=500, 100 by default) turns the answer of the
//!   paginated endpoints (queues, exchanges, connections, channels, vhosts) into
//!   `{"items", "total_count", "filtered_count", "item_count", "page", "page_size",
//!   "page_count"}`. With a page, `name=TEXT` keeps the items whose `name` contains TEXT
//!   (ignoring case), or matches it as a regular expression with `use_regex=true`. Without a
//!   page, `name` is ignored, as in RabbitMQ.
//! - `columns=a,b.c` keeps only those keys of each item (`b.c`: key `c` of object `b`).
//! - `disable_stats=true`: the endpoint leaves out its statistics ([`strip_stats`]).
//!
//! Errors are RabbitMQ's: a page or page size that is not an integer (or a regular expression
//! that does not compile, once there is an item to match) is `400 {"error": "bad_request", "reason": "Pagination parameters
//! are invalid"}`, a page below 1 or a page size outside 1..=500 is `400 {"error":
//! "invalid_pagination_parameters", ...}` and a page past the last one is `400 {"error":
//! "page_out_of_range", ...}`.
//!
//! Bounds: a `use_regex` pattern is at most [`MAX_REGEX_LEN`] bytes and compiles within
//! [`REGEX_SIZE_LIMIT`] bytes of program (the `regex` crate runs in linear time, so no input
//! can make matching slow). Rust's regex syntax is not PCRE's: look-around and
//! back-references are refused (400) where RabbitMQ would accept them.

use serde_json::{json, Map, Value};
use std::cmp::Ordering;
use std::collections::HashMap;

/// RabbitMQ's page size when `page` is given without `page_size`.
pub const DEFAULT_PAGE_SIZE: i64 = 100;
/// RabbitMQ's largest page size.
pub const MAX_PAGE_SIZE: i64 = 500;
/// The longest `name` pattern taken with `use_regex=true`.
pub const MAX_REGEX_LEN: usize = 1024;
/// Compiled size limit of a `name` pattern (and of its lazy DFA).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The default sort of most lists (RabbitMQ's `["vhost", "name"]`).
pub const BY_VHOST_NAME: &[&str] = &["vhost", "name"];

/// Why a listing cannot be answered: RabbitMQ's `error` and `reason`, answered with 400.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListError {
    pub error: &'static str,
    pub reason: String,
}

impl ListError {
    fn invalid() -> Self {
        Self {
            error: "bad_request",
            reason: "Pagination parameters are invalid".into(),
        }
    }

    /// The JSON body RabbitMQ answers with.
    pub fn body(&self) -> Value {
        json!({"error": self.error, "reason": self.reason})
    }
}

/// How the name filter matches.
#[derive(Debug, Clone)]
enum NameFilter {
    /// Case-insensitive substring (lowercased already).
    Contains(String),
    Regex(regex::Regex),
    /// A pattern that does not compile: an error once an item is to be matched (RabbitMQ
    /// runs the pattern per item, so an empty list is no error).
    BadRegex,
}

/// `page`, `page_size`, `name`, `use_regex`.
#[derive(Debug, Clone)]
pub struct Pagination {
    pub page: i64,
    pub page_size: i64,
    filter: Option<NameFilter>,
}

/// The list parameters of one request.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub pagination: Option<Pagination>,
    /// Each column as its dotted path; None: every key.
    pub columns: Option<Vec<Vec<String>>>,
    /// None: the default sort; Some(empty): no sort at all.
    pub sort: Option<String>,
    pub sort_reverse: bool,
    pub disable_stats: bool,
}

/// Erlang's `list_to_integer`: an optional sign and digits (None otherwise). Values beyond
/// i64 saturate, which only matters for the page-out-of-range message.
fn erlang_integer(s: &str) -> Option<i64> {
    let (neg, digits) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let v = digits.bytes().fold(0i64, |acc, b| {
        acc.saturating_mul(10).saturating_add(i64::from(b - b'0'))
    });
    Some(if neg { -v } else { v })
}

fn int_param(q: &HashMap<String, String>, k: &str) -> Result<Option<i64>, ListError> {
    match q.get(k) {
        None => Ok(None),
        Some(s) => erlang_integer(s).map(Some).ok_or_else(ListError::invalid),
    }
}

/// Erlang's `string:tokens`: split on any of `seps`, empty tokens dropped.
fn tokens(s: &str, sep: char) -> impl Iterator<Item = &str> {
    s.split(sep).filter(|t| !t.is_empty())
}

impl ListQuery {
    /// Reads the list parameters of a query string (already decoded).
    pub fn parse(q: &HashMap<String, String>) -> Result<Self, ListError> {
        Ok(Self {
            pagination: pagination(q)?,
            columns: q.get("columns").map(|c| {
                tokens(c, ',')
                    .map(|col| tokens(col, '.').map(str::to_owned).collect())
                    .collect()
            }),
            sort: q.get("sort").cloned(),
            sort_reverse: q.get("sort_reverse").is_some_and(|v| v == "true"),
            disable_stats: q.get("disable_stats").is_some_and(|v| v == "true"),
        })
    }

    /// The answer to a list endpoint: `items` sorted (by `sort`, then `default_sort`), paged
    /// when `paged` and a page is asked for, trimmed to `columns`.
    pub fn apply(
        &self,
        mut items: Vec<Value>,
        default_sort: &[&str],
        paged: bool,
    ) -> Result<Value, ListError> {
        self.sort_items(&mut items, default_sort);
        let Some(p) = self.pagination.as_ref().filter(|_| paged) else {
            return Ok(Value::Array(self.select(items)));
        };
        let total = items.len();
        if matches!(p.filter, Some(NameFilter::BadRegex)) && total > 0 {
            return Err(ListError::invalid());
        }
        if let Some(f) = &p.filter {
            items.retain(|it| {
                let name = match it.get("name") {
                    Some(Value::String(s)) => s.as_str(),
                    _ => "",
                };
                match f {
                    NameFilter::Contains(t) => name.to_lowercase().contains(t.as_str()),
                    NameFilter::Regex(re) => re.is_match(name),
                    NameFilter::BadRegex => false,
                }
            });
        }
        let filtered = items.len();
        // RabbitMQ's lists:nthtail: a page may start just past the end (then it is empty),
        // not further.
        let offset = (p.page - 1).saturating_mul(p.page_size);
        if offset > i64::try_from(filtered).unwrap_or(i64::MAX) {
            return Err(ListError {
                error: "page_out_of_range",
                reason: format!(
                    "Page out of range, page: {} page size: {}, len: {filtered}",
                    p.page, p.page_size
                ),
            });
        }
        let offset = usize::try_from(offset).unwrap_or(usize::MAX);
        let size = usize::try_from(p.page_size).unwrap_or(usize::MAX);
        let page: Vec<Value> = items.into_iter().skip(offset).take(size).collect();
        let filtered_i = i64::try_from(filtered).unwrap_or(i64::MAX);
        let page_count = (filtered_i + p.page_size - 1) / p.page_size;
        Ok(json!({
            "total_count": total,
            "item_count": page.len(),
            "filtered_count": filtered,
            "page": p.page,
            "page_size": p.page_size,
            "page_count": page_count,
            "items": self.select(page),
        }))
    }

    fn sort_items(&self, items: &mut [Value], default_sort: &[&str]) {
        let mut keys: Vec<Vec<&str>> = Vec::new();
        match self.sort.as_deref() {
            Some("") => return,
            Some(s) => keys.push(tokens(s, '.').collect()),
            None => {}
        }
        keys.extend(default_sort.iter().map(|k| tokens(k, '.').collect()));
        items.sort_by(|a, b| {
            for k in &keys {
                match erlang_cmp(dotted(a, k), dotted(b, k)) {
                    Ordering::Equal => continue,
                    o => return o,
                }
            }
            Ordering::Equal
        });
        if self.sort_reverse {
            items.reverse();
        }
    }

    /// Each item trimmed to the columns asked for.
    pub fn select(&self, items: Vec<Value>) -> Vec<Value> {
        match &self.columns {
            None => items,
            Some(cols) => {
                let cols: Vec<Vec<&str>> = cols
                    .iter()
                    .map(|c| c.iter().map(String::as_str).collect())
                    .collect();
                items.into_iter().map(|it| columns(it, &cols)).collect()
            }
        }
    }
}

fn pagination(q: &HashMap<String, String>) -> Result<Option<Pagination>, ListError> {
    // Both are read (and must be integers) even when there is no page, as in RabbitMQ.
    let page = int_param(q, "page")?;
    let size = int_param(q, "page_size")?;
    let Some(page) = page else {
        return Ok(None);
    };
    let valid = page > 0 && size.is_none_or(|s| s > 0 && s <= MAX_PAGE_SIZE);
    if !valid {
        return Err(ListError {
            error: "invalid_pagination_parameters",
            reason: format!(
                "Invalid pagination parameters: page number {page}, page size {}",
                size.map_or_else(|| "undefined".to_owned(), |s| s.to_string())
            ),
        });
    }
    let name = q.get("name").filter(|n| !n.is_empty());
    let filter = match name {
        None => None,
        Some(n) if q.get("use_regex").is_some_and(|v| v == "true") => {
            let re = (n.len() <= MAX_REGEX_LEN)
                .then(|| {
                    regex::RegexBuilder::new(n)
                        .case_insensitive(true)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .dfa_size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .ok()
                })
                .flatten();
            Some(re.map_or(NameFilter::BadRegex, NameFilter::Regex))
        }
        Some(n) => Some(NameFilter::Contains(n.to_lowercase())),
    };
    Ok(Some(Pagination {
        page,
        page_size: size.unwrap_or(DEFAULT_PAGE_SIZE),
        filter,
    }))
}

/// The value at a dotted path; None when a step is missing (RabbitMQ then sorts it as 0).
fn dotted<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// Erlang's term order class of a JSON value (RabbitMQ's facts are Erlang terms).
fn rank(v: &Value) -> u8 {
    match v {
        Value::Number(_) => 0,
        Value::Bool(_) | Value::Null => 1,    // atoms
        Value::Object(_) => 2,                // maps
        Value::Array(a) if a.is_empty() => 3, // nil
        Value::Array(_) => 4,
        Value::String(_) => 5, // binaries
    }
}

/// The atom a JSON scalar stands for (null is RabbitMQ's `undefined`).
fn atom(v: &Value) -> &'static str {
    match v {
        Value::Bool(true) => "true",
        Value::Bool(false) => "false",
        _ => "undefined",
    }
}

/// Compares two values as Erlang compares the terms they come from; a missing value is 0.
pub fn erlang_cmp(a: Option<&Value>, b: Option<&Value>) -> Ordering {
    let zero = json!(0);
    cmp_values(a.unwrap_or(&zero), b.unwrap_or(&zero))
}

fn cmp_values(a: &Value, b: &Value) -> Ordering {
    match rank(a).cmp(&rank(b)) {
        Ordering::Equal => {}
        o => return o,
    }
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x.cmp(&y),
            _ => {
                let (x, y) = (x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0));
                x.partial_cmp(&y).unwrap_or(Ordering::Equal)
            }
        },
        (Value::String(x), Value::String(y)) => x.as_bytes().cmp(y.as_bytes()),
        (Value::Array(x), Value::Array(y)) => {
            for (p, q) in x.iter().zip(y) {
                match cmp_values(p, q) {
                    Ordering::Equal => continue,
                    o => return o,
                }
            }
            x.len().cmp(&y.len())
        }
        (Value::Object(x), Value::Object(y)) => cmp_maps(x, y),
        _ => atom(a).cmp(atom(b)),
    }
}

/// Erlang map order: by size, then keys in order, then values in key order.
fn cmp_maps(x: &Map<String, Value>, y: &Map<String, Value>) -> Ordering {
    let o = x.len().cmp(&y.len());
    if o != Ordering::Equal {
        return o;
    }
    let mut kx: Vec<&String> = x.keys().collect();
    let mut ky: Vec<&String> = y.keys().collect();
    kx.sort();
    ky.sort();
    let o = kx.cmp(&ky);
    if o != Ordering::Equal {
        return o;
    }
    for k in kx {
        match cmp_values(&x[k.as_str()], &y[k.as_str()]) {
            Ordering::Equal => continue,
            o => return o,
        }
    }
    Ordering::Equal
}

/// RabbitMQ's `extract_column_items`: an object keeps the keys some column starts with,
/// each trimmed to the rest of those columns (a column that ends there keeps the whole
/// value); lists are trimmed item by item; other values stay.
fn columns(v: Value, cols: &[Vec<&str>]) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let mut rest: Vec<Vec<&str>> = Vec::new();
                let mut whole = false;
                for c in cols {
                    if c.first() == Some(&k.as_str()) {
                        if c.len() == 1 {
                            whole = true;
                        } else {
                            rest.push(c[1..].to_vec());
                        }
                    }
                }
                if whole {
                    out.insert(k, v);
                } else if !rest.is_empty() {
                    out.insert(k, columns(v, &rest));
                }
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(|x| columns(x, cols)).collect()),
        other => other,
    }
}

/// `disable_stats=true`: an item without its statistics. With `keep`, only those keys stay
/// (RabbitMQ's basic columns of queues); otherwise `message_stats`, every `*_details` rate and
/// the keys in `also` go.
pub fn strip_stats(v: &mut Value, keep: Option<&[&str]>, also: &[&str]) {
    let Value::Object(m) = v else {
        return;
    };
    match keep {
        Some(keep) => m.retain(|k, _| keep.contains(&k.as_str())),
        None => m.retain(|k, _| {
            k != "message_stats" && !k.ends_with("_details") && !also.contains(&k.as_str())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(s: &[(&str, &str)]) -> HashMap<String, String> {
        s.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn parse(s: &[(&str, &str)]) -> Result<ListQuery, ListError> {
        ListQuery::parse(&query(s))
    }

    fn names(v: &Value) -> Vec<&str> {
        let items = v.get("items").unwrap_or(v);
        items
            .as_array()
            .map(|a| a.iter().filter_map(|i| i["name"].as_str()).collect())
            .unwrap_or_default()
    }

    fn sample() -> Vec<Value> {
        vec![
            json!({"name": "b", "vhost": "/", "messages": 3, "stats": {"rate": 1.5}}),
            json!({"name": "A", "vhost": "/", "messages": 10, "stats": {"rate": 0.5}}),
            json!({"name": "c", "vhost": "/", "stats": {}}),
            json!({"name": "a", "vhost": "/v", "messages": 1}),
        ]
    }

    #[test]
    fn default_sort_is_vhost_then_name_by_bytes() {
        let q = parse(&[]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(names(&v), ["A", "b", "c", "a"]);
    }

    #[test]
    fn sort_by_key_and_dotted_path_missing_is_zero() {
        let q = parse(&[("sort", "messages")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(names(&v), ["c", "a", "b", "A"]);
        let q = parse(&[("sort", "stats.rate"), ("sort_reverse", "true")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(names(&v), ["b", "A", "a", "c"]);
        // An empty sort leaves the order as it was, reverse or not.
        let q = parse(&[("sort", ""), ("sort_reverse", "true")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(names(&v), ["b", "A", "c", "a"]);
    }

    #[test]
    fn erlang_term_order() {
        let order = [
            json!(-1),
            json!(0.5),
            json!(2),
            json!(false),
            json!(true),
            Value::Null,
            json!({"a": 1}),
            json!({"a": 1, "b": 0}),
            json!([]),
            json!([1]),
            json!([1, 2]),
            json!(""),
            json!("a"),
        ];
        for w in order.windows(2) {
            assert_eq!(
                erlang_cmp(Some(&w[0]), Some(&w[1])),
                Ordering::Less,
                "{} < {}",
                w[0],
                w[1]
            );
        }
        assert_eq!(erlang_cmp(None, Some(&json!(0))), Ordering::Equal);
        assert_eq!(
            erlang_cmp(Some(&json!(1.0)), Some(&json!(1))),
            Ordering::Equal
        );
    }

    #[test]
    fn pages_with_counts() {
        let q = parse(&[("page", "2"), ("page_size", "3")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(
            v,
            json!({"total_count": 4, "item_count": 1, "filtered_count": 4, "page": 2,
                   "page_size": 3, "page_count": 2,
                   "items": [{"name": "a", "vhost": "/v", "messages": 1}]})
        );
        // Just past the end: an empty page; further: out of range.
        let q = parse(&[("page", "3"), ("page_size", "2")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(v["item_count"], 0);
        assert_eq!(v["items"], json!([]));
        let q = parse(&[("page", "4"), ("page_size", "2")]).expect("valid");
        let e = q.apply(sample(), BY_VHOST_NAME, true).expect_err("out");
        assert_eq!(e.error, "page_out_of_range");
        assert_eq!(e.reason, "Page out of range, page: 4 page size: 2, len: 4");
        // Page 1 of nothing is an empty page.
        let q = parse(&[("page", "1")]).expect("valid");
        let v = q.apply(Vec::new(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(v["page_count"], 0);
        assert_eq!(v["page_size"], 100);
        // Not a paginated endpoint: the plain list.
        let v = q.apply(sample(), BY_VHOST_NAME, false).expect("ok");
        assert!(v.is_array());
    }

    #[test]
    fn bad_pagination_parameters_are_rabbitmqs_errors() {
        let e = parse(&[("page", "x")]).expect_err("bad");
        assert_eq!(
            e.body(),
            json!({"error": "bad_request", "reason": "Pagination parameters are invalid"})
        );
        assert_eq!(
            parse(&[("page", "")]).expect_err("bad").error,
            "bad_request"
        );
        // page_size must be an integer even without a page.
        assert_eq!(
            parse(&[("page_size", "abc")]).expect_err("bad").error,
            "bad_request"
        );
        assert!(parse(&[("page_size", "0")])
            .expect("no page")
            .pagination
            .is_none());
        let e = parse(&[("page", "0")]).expect_err("bad");
        assert_eq!(e.error, "invalid_pagination_parameters");
        assert_eq!(
            e.reason,
            "Invalid pagination parameters: page number 0, page size undefined"
        );
        let e = parse(&[("page", "1"), ("page_size", "501")]).expect_err("bad");
        assert_eq!(
            e.reason,
            "Invalid pagination parameters: page number 1, page size 501"
        );
        assert!(parse(&[("page", "+1"), ("page_size", "500")]).is_ok());
        // A bad pattern is an error once there is something to match it with.
        let q = parse(&[("page", "1"), ("name", "("), ("use_regex", "true")]).expect("parsed");
        let e = q.apply(sample(), BY_VHOST_NAME, true).expect_err("re");
        assert_eq!(e.error, "bad_request");
        assert!(q.apply(Vec::new(), BY_VHOST_NAME, true).is_ok());
        let long = "a".repeat(MAX_REGEX_LEN + 1);
        let q = parse(&[("page", "1"), ("name", &long), ("use_regex", "true")]).expect("parsed");
        assert!(q.apply(sample(), BY_VHOST_NAME, true).is_err());
        let q = parse(&[("page", "1"), ("name", &long)]).expect("parsed");
        assert!(q.apply(sample(), BY_VHOST_NAME, true).is_ok());
    }

    #[test]
    fn name_filter_substring_or_regex_only_with_a_page() {
        let q = parse(&[("page", "1"), ("name", "A")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(names(&v), ["A", "a"]);
        assert_eq!(v["filtered_count"], 2);
        assert_eq!(v["total_count"], 4);
        let q = parse(&[("page", "1"), ("name", "^[bc]$"), ("use_regex", "true")]).expect("ok");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(names(&v), ["b", "c"]);
        // Not a regex unless asked: "^" is text.
        let q = parse(&[("page", "1"), ("name", "^b")]).expect("valid");
        assert_eq!(
            q.apply(sample(), BY_VHOST_NAME, true).expect("ok")["filtered_count"],
            0
        );
        let q = parse(&[("name", "b")]).expect("valid");
        assert_eq!(
            names(&q.apply(sample(), BY_VHOST_NAME, true).expect("ok")).len(),
            4
        );
    }

    #[test]
    fn columns_keep_keys_and_dotted_paths() {
        let q = parse(&[("columns", "name,stats.rate,,nope")]).expect("valid");
        let v = q.apply(sample(), BY_VHOST_NAME, true).expect("ok");
        assert_eq!(
            v,
            json!([{"name": "A", "stats": {"rate": 0.5}}, {"name": "b", "stats": {"rate": 1.5}},
                   {"name": "c", "stats": {}}, {"name": "a"}])
        );
        // Inside a page, the items are trimmed, not the page object; lists item by item.
        let q = parse(&[("columns", "name,l.x"), ("page", "1")]).expect("valid");
        let items = vec![json!({"name": "n", "l": [{"x": 1, "y": 2}], "z": 0})];
        let v = q.apply(items, BY_VHOST_NAME, true).expect("ok");
        assert_eq!(v["items"], json!([{"name": "n", "l": [{"x": 1}]}]));
        assert_eq!(v["total_count"], 1);
    }

    #[test]
    fn stats_stripped() {
        let mut v = json!({"name": "q", "messages": 1, "messages_details": {"rate": 0.0},
                           "message_stats": {}, "durable": true});
        let mut w = v.clone();
        strip_stats(&mut v, None, &["messages"]);
        assert_eq!(v, json!({"name": "q", "durable": true}));
        strip_stats(&mut w, Some(&["name"]), &[]);
        assert_eq!(w, json!({"name": "q"}));
    }
}
