//! Output as rabbitmqctl 3.10 prints it: tab-separated tables with a header
//! row, or `--formatter json` (one object per line inside `[` `]`).
//!
//! Also the mapping from management API objects to rabbitmqctl's column
//! names (`source_name` is the API's `source`, `channel_pid` a consumer's
//! channel name, and so on).

use serde_json::{Map, Value};

use super::args::ListKind;

/// One table cell: strings as they are, `[a, b]` for lists of strings,
/// `[]` for empty arguments, compact JSON for other objects.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) if a.iter().all(Value::is_string) => {
            let items: Vec<&str> = a.iter().filter_map(Value::as_str).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Array(a) if a.is_empty() => "[]".to_string(),
        Value::Object(o) if o.is_empty() => "[]".to_string(),
        other => other.to_string(),
    }
}

/// A table: header row (unless `headers` is false), then one tab-separated row per item.
pub fn table(columns: &[String], rows: &[Vec<Value>], headers: bool) -> String {
    let mut out = String::new();
    if headers {
        out.push_str(&columns.join("\t"));
        out.push('\n');
    }
    for row in rows {
        let cells: Vec<String> = row.iter().map(cell).collect();
        out.push_str(&cells.join("\t"));
        out.push('\n');
    }
    out
}

/// rabbitmqctl's JSON list layout: `[`, first object, `,`-led following
/// objects, `]`, each on its own line; keys in column order.
pub fn json_list(columns: &[String], rows: &[Vec<Value>]) -> String {
    let mut out = String::from("[\n");
    for (i, row) in rows.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('{');
        for (j, (col, v)) in columns.iter().zip(row).enumerate() {
            if j > 0 {
                out.push(',');
            }
            out.push_str(&Value::String(col.clone()).to_string());
            out.push(':');
            out.push_str(&v.to_string());
        }
        out.push_str("}\n");
    }
    out.push_str("]\n");
    out
}

fn get<'a>(item: &'a Value, path: &[&str]) -> Option<&'a Value> {
    let mut v = item;
    for key in path {
        v = v.get(key)?;
    }
    Some(v)
}

/// Tags arrive as a list (3.10) or a comma-separated string (older APIs).
pub fn tags_of(v: Option<&Value>) -> Vec<String> {
    match v {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        Some(Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// The value of rabbitmqctl column `column` for one API object of a `kind` listing.
pub fn column_value(kind: ListKind, column: &str, item: &Value) -> Value {
    let field = |path: &[&str]| get(item, path).cloned().unwrap_or(Value::Null);
    match (kind, column) {
        (ListKind::Bindings, "source_name") => field(&["source"]),
        (ListKind::Bindings, "source_kind") => Value::String("exchange".into()),
        (ListKind::Bindings, "destination_name") => field(&["destination"]),
        (ListKind::Bindings, "destination_kind") => field(&["destination_type"]),
        (
            ListKind::Bindings | ListKind::Consumers | ListKind::Queues | ListKind::Exchanges,
            "arguments",
        ) => match get(item, &["arguments"]) {
            Some(Value::Object(o)) if o.is_empty() => Value::Array(Vec::new()),
            Some(v) => v.clone(),
            None => Value::Array(Vec::new()),
        },
        (ListKind::Consumers, "queue_name") => field(&["queue", "name"]),
        (ListKind::Consumers, "channel_pid") => field(&["channel_details", "name"]),
        (ListKind::Channels, "pid") => field(&["name"]),
        (ListKind::Channels, "connection") => field(&["connection_details", "name"]),
        (ListKind::Queues, "pid") => field(&["node"]),
        (ListKind::Queues, "owner_pid") => field(&["owner_pid_details", "name"]),
        (ListKind::Queues, "slave_pids") => field(&["slave_nodes"]),
        (ListKind::Queues, "synchronised_slave_pids") => field(&["synchronised_slave_nodes"]),
        (ListKind::Queues, "type") => match get(item, &["type"]) {
            Some(v) => v.clone(),
            None => Value::String("classic".into()),
        },
        (ListKind::Users, "user") => field(&["name"]),
        (ListKind::Users, "tags") => Value::Array(
            tags_of(get(item, &["tags"]))
                .into_iter()
                .map(Value::String)
                .collect(),
        ),
        (ListKind::Vhosts, "tags") => Value::Array(
            tags_of(get(item, &["tags"]))
                .into_iter()
                .map(Value::String)
                .collect(),
        ),
        // rabbitmqctl prints a policy definition as its JSON text (a string in JSON output too).
        (ListKind::Policies | ListKind::OperatorPolicies, "definition") => {
            match get(item, &["definition"]) {
                Some(Value::String(s)) => Value::String(s.clone()),
                Some(v) => Value::String(v.to_string()),
                None => Value::Null,
            }
        }
        _ => field(&[column]),
    }
}

/// Rows for `columns` from an API list answer (non-objects are skipped).
pub fn rows(kind: ListKind, columns: &[String], items: &[Value]) -> Vec<Vec<Value>> {
    items
        .iter()
        .filter(|i| i.is_object())
        .map(|item| {
            columns
                .iter()
                .map(|c| column_value(kind, c, item))
                .collect()
        })
        .collect()
}

/// `key: value` lines for the status and cluster_status reports, with a
/// header line per section (rabbitmqctl's layout without the terminal colours).
pub fn sections(sections: &[(&str, Vec<String>)]) -> String {
    let mut out = String::new();
    for (i, (title, lines)) in sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(title);
        out.push_str("\n\n");
        if lines.is_empty() {
            out.push_str("(none)\n");
        }
        for l in lines {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

/// Pretty JSON for single-object reports (status, cluster_status).
pub fn json_object(map: Map<String, Value>) -> String {
    let mut s = serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cols(c: &[&str]) -> Vec<String> {
        c.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn queue_table_like_rabbitmqctl() {
        let items = vec![
            json!({"name": "q1", "messages": 1, "durable": true, "consumers": 0, "vhost": "/"}),
            json!({"name": "q2", "messages": 0, "durable": false, "consumers": 1, "vhost": "/"}),
        ];
        let c = cols(&["name", "messages", "consumers", "durable"]);
        let r = rows(ListKind::Queues, &c, &items);
        assert_eq!(
            table(&c, &r, true),
            "name\tmessages\tconsumers\tdurable\nq1\t1\t0\ttrue\nq2\t0\t1\tfalse\n"
        );
        assert_eq!(table(&c, &r, false), "q1\t1\t0\ttrue\nq2\t0\t1\tfalse\n");
    }

    #[test]
    fn json_list_layout_like_rabbitmqctl() {
        let c = cols(&["name", "messages"]);
        let r = vec![vec![json!("q1"), json!(1)], vec![json!("q2"), json!(0)]];
        assert_eq!(
            json_list(&c, &r),
            "[\n{\"name\":\"q1\",\"messages\":1}\n,{\"name\":\"q2\",\"messages\":0}\n]\n"
        );
        assert_eq!(json_list(&c, &[]), "[\n]\n");
    }

    #[test]
    fn policy_row_shows_definition_as_json_text() {
        let item = json!({"vhost": "/", "name": "ha-all", "pattern": "", "apply-to": "all",
            "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}, "priority": 0});
        let c = cols(ListKind::Policies.default_columns());
        let r = rows(ListKind::Policies, &c, &[item]);
        assert_eq!(
            table(&c, &r, true),
            "vhost\tname\tpattern\tapply-to\tdefinition\tpriority\n\
             /\tha-all\t\tall\t{\"ha-mode\":\"all\",\"ha-sync-mode\":\"automatic\"}\t0\n"
        );
        assert_eq!(
            json_list(&c, &r),
            "[\n{\"vhost\":\"/\",\"name\":\"ha-all\",\"pattern\":\"\",\"apply-to\":\"all\",\
             \"definition\":\"{\\\"ha-mode\\\":\\\"all\\\",\\\"ha-sync-mode\\\":\\\"automatic\\\"}\",\
             \"priority\":0}\n]\n"
        );
    }

    #[test]
    fn bindings_consumers_users_map_api_fields() {
        let b = json!({"source": "", "vhost": "/", "destination": "q1", "destination_type": "queue",
            "routing_key": "q1", "arguments": {}, "properties_key": "q1"});
        let c = cols(ListKind::Bindings.default_columns());
        assert_eq!(
            table(&c, &rows(ListKind::Bindings, &c, &[b]), false),
            "\texchange\tq1\tqueue\tq1\t[]\n"
        );
        let cons = json!({"queue": {"name": "q2", "vhost": "/"}, "channel_details": {"name": "ch 1"},
            "consumer_tag": "ctag1", "ack_required": true, "prefetch_count": 0, "active": true,
            "arguments": {"x-priority": 3}});
        let c = cols(ListKind::Consumers.default_columns());
        assert_eq!(
            table(&c, &rows(ListKind::Consumers, &c, &[cons]), false),
            "q2\tch 1\tctag1\ttrue\t0\ttrue\t{\"x-priority\":3}\n"
        );
        let users = [
            json!({"name": "guest", "tags": ["administrator", "monitoring"]}),
            json!({"name": "old", "tags": "management,policymaker"}),
            json!({"name": "none", "tags": []}),
        ];
        let c = cols(ListKind::Users.default_columns());
        let r = rows(ListKind::Users, &c, &users);
        assert_eq!(
            table(&c, &r, true),
            "user\ttags\nguest\t[administrator, monitoring]\nold\t[management, policymaker]\nnone\t[]\n"
        );
        assert_eq!(
            json_list(&c, &r[..1]),
            "[\n{\"user\":\"guest\",\"tags\":[\"administrator\",\"monitoring\"]}\n]\n"
        );
    }

    #[test]
    fn missing_fields_are_blank_and_null() {
        let c = cols(&["name", "messages"]);
        let r = rows(
            ListKind::Queues,
            &c,
            &[json!({"name": "fresh"}), json!("not an object")],
        );
        assert_eq!(r.len(), 1);
        assert_eq!(table(&c, &r, false), "fresh\t\n");
        assert_eq!(
            json_list(&c, &r),
            "[\n{\"name\":\"fresh\",\"messages\":null}\n]\n"
        );
    }

    #[test]
    fn sections_layout() {
        let s = sections(&[
            ("Basics", vec!["Cluster name: c".into()]),
            ("Alarms", vec![]),
        ]);
        assert_eq!(s, "Basics\n\nCluster name: c\n\nAlarms\n\n(none)\n");
    }
}
