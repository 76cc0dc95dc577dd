//! Whatever the broker accepts it can store and load again, and a damaged definitions file
//! never keeps a node down silently: the start is refused naming the entry, or, with
//! `--skip-invalid-definitions`, the node starts with every entry that loads and reports the
//! others. Driven through the real binary, over AMQP (lapin) and the management API.

mod support;

use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use support::http::http;
use support::proc::{spawn, BrokerProc};

/// JSON nested `levels` deep: arrays around a leaf (`[[["x"]]]` is 3).
fn deep_json(levels: usize) -> Value {
    let mut v = json!("x");
    for _ in 0..levels {
        v = json!([v]);
    }
    v
}

/// A field table value nested `levels` deep (as the value of one argument).
fn deep_amqp(levels: usize) -> AMQPValue {
    let mut v = AMQPValue::LongString("x".into());
    for _ in 0..levels {
        let mut a = lapin::types::FieldArray::default();
        a.push(v);
        v = AMQPValue::FieldArray(a);
    }
    v
}

async fn start(data: &std::path::Path, extra: &[&str]) -> BrokerProc {
    let mut args = vec![
        "--amqp",
        "127.0.0.1:0",
        "--mgmt",
        "127.0.0.1:0",
        "--data-dir",
        data.to_str().expect("utf-8 path"),
    ];
    args.extend_from_slice(extra);
    spawn(args, &[], &["amqp", "mgmt"]).await
}

fn mgmt(b: &BrokerProc) -> SocketAddr {
    b.addr("mgmt").parse().expect("mgmt addr")
}

async fn queue_exists(ch: &lapin::Channel, name: &str) -> bool {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

#[tokio::test]
async fn everything_accepted_over_amqp_and_http_loads_after_a_restart() {
    let data = tempfile::tempdir().expect("tempdir");
    let b = start(data.path(), &[]).await;
    let api = mgmt(&b);
    let guest = Some(("guest", "guest"));

    // HTTP: 16 levels of arguments are accepted (the arguments object is the first), deeper
    // ones refused with a reason, whatever the endpoint.
    let r = http(
        api,
        "PUT",
        "/api/queues/%2f/http16",
        guest,
        Some(json!({"durable": true, "arguments": {"x-a": deep_json(15)}})),
    )
    .await;
    assert!(r.status == 201 || r.status == 204, "{}", r.text());
    for (levels, reason) in [
        (16, "'arguments' nested deeper than 16 levels"),
        (124, "request body nested deeper than 20 levels"),
    ] {
        let r = http(
            api,
            "PUT",
            "/api/queues/%2f/http-deep",
            guest,
            Some(json!({"durable": true, "arguments": {"x-a": deep_json(levels)}})),
        )
        .await;
        r.bad_request(reason);
    }
    let r = http(
        api,
        "PUT",
        "/api/policies/%2f/deep",
        guest,
        Some(json!({"pattern": "^x$", "definition": {"max-length": 1, "x": deep_json(16)}})),
    )
    .await;
    r.bad_request("nested deeper than 16 levels");
    let r = http(
        api,
        "POST",
        "/api/exchanges/%2f/amq.default/publish",
        guest,
        Some(
            json!({"routing_key": "http16", "payload": "p", "payload_encoding": "string",
                    "properties": {"headers": {"h": deep_json(16)}}}),
        ),
    )
    .await;
    r.bad_request("nested deeper than 16 levels");

    // AMQP: the same limit, a channel error beyond it.
    let (_c, ch) = b.connect().await;
    let mut ok = FieldTable::default();
    ok.insert("x-a".into(), deep_amqp(15));
    ch.queue_declare(
        "amqp16".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        ok,
    )
    .await
    .expect("16 levels of arguments over AMQP");
    let mut deep = FieldTable::default();
    deep.insert("x-a".into(), deep_amqp(125));
    let e = ch
        .queue_declare(
            "amqp-deep".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            deep,
        )
        .await
        .expect_err("126 levels accepted");
    assert_eq!(support::amqp_code(&e), Some(406), "{e}");

    // Both durable queues are in the file and the node starts again with them.
    b.term().await;
    let b = start(data.path(), &[]).await;
    let (_c, ch) = b.connect().await;
    assert!(queue_exists(&ch, "http16").await);
    assert!(queue_exists(&ch, "amqp16").await);
    assert!(!queue_exists(&b.connect().await.1, "amqp-deep").await);
    b.term().await;
}

/// A definitions file an older version (or a hand edit) left with bad entries: a vhost without
/// a name, a user with an unknown hash algorithm and that user's permission, a queue with a
/// bad argument and the binding to it, and a queue whose arguments nest 200 levels (beyond
/// what the JSON parser reads at all). Around them, good entries.
fn damaged_definitions() -> String {
    json!({
        "vhosts": [{"name": "/"}, {"name": ""}],
        "users": [
            {"name": "guest", "password": "guest", "tags": "administrator"},
            {"name": "eve", "password_hash": "abc", "hashing_algorithm": "rot13", "tags": ""}
        ],
        "permissions": [
            {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"},
            {"user": "eve", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}
        ],
        "queues": [
            {"name": "q-ok", "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}},
            {"name": "q-prio", "vhost": "/", "durable": true, "auto_delete": false,
             "arguments": {"x-max-priority": "high"}},
            {"name": "q-deep", "vhost": "/", "durable": true, "auto_delete": false,
             "arguments": {"x-a": "DEEP"}}
        ],
        "exchanges": [],
        "bindings": [
            {"source": "amq.direct", "vhost": "/", "destination": "q-ok",
             "destination_type": "queue", "routing_key": "ok", "arguments": {}},
            {"source": "amq.direct", "vhost": "/", "destination": "q-prio",
             "destination_type": "queue", "routing_key": "prio", "arguments": {}}
        ]
    })
    .to_string()
    // serde_json would not write (or read) 200 levels: splice them in as text.
    .replace(
        "\"DEEP\"",
        &format!("{}\"x\"{}", "[".repeat(200), "]".repeat(200)),
    )
}

#[tokio::test]
async fn a_damaged_definitions_file_is_refused_or_loaded_without_its_bad_entries_on_request() {
    let data = tempfile::tempdir().expect("tempdir");
    let path = data.path().join("definitions.json");
    let damaged = damaged_definitions();
    std::fs::write(&path, &damaged).expect("write");

    // Without the flag: refused, saying what is wrong and what to do.
    let out = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--amqp", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt definitions file"), "{err}");
    assert!(err.contains("--skip-invalid-definitions"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), damaged);

    // With it: up, every bad entry (and what depends on it) named in the log, the rest loaded.
    let b = start(data.path(), &["--skip-invalid-definitions"]).await;
    // The definitions are loaded before any client is served; the log reader may lag behind.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while !b.logged("definitions loaded") {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", b.log.lock());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = b.log.lock().clone();
    for entry in [
        "vhosts[1]",
        "users[1] 'eve'",
        "permissions[1] 'eve'",
        "queues[1] 'q-prio'",
        "queues[2] 'q-deep'",
        "bindings[1] 'amq.direct -> q-prio'",
    ] {
        assert_eq!(
            log.iter()
                .filter(|l| l.contains("definition left out") && l.contains(entry))
                .count(),
            1,
            "{entry} not reported once: {log:?}"
        );
    }
    assert_eq!(b.log_count("definition left out"), 6, "{log:?}");
    let (_c, ch) = b.connect().await;
    assert!(queue_exists(&ch, "q-ok").await);
    let (_c2, ch2) = b.connect().await;
    assert!(!queue_exists(&ch2, "q-prio").await);
    // The accepted binding routes.
    ch.basic_publish(
        "amq.direct".into(),
        "ok".into(),
        BasicPublishOptions::default(),
        b"routed",
        Default::default(),
    )
    .await
    .expect("publish")
    .await
    .expect("publish done");
    assert_eq!(
        support::get_body(&ch, "q-ok").await.as_deref(),
        Some(&b"routed"[..])
    );
    // The original is kept next to the rewritten file.
    let kept: Vec<_> = std::fs::read_dir(data.path())
        .expect("ls")
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("definitions.json.rejected-")
        })
        .collect();
    assert_eq!(kept.len(), 1);
    assert_eq!(
        std::fs::read_to_string(kept[0].path()).expect("read"),
        damaged
    );
    b.term().await;

    // The rewritten file loads without the flag.
    let b = start(data.path(), &[]).await;
    let (_c, ch) = b.connect().await;
    assert!(queue_exists(&ch, "q-ok").await);
    b.term().await;
}
