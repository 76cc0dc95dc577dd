//! Management HTTP API and Prometheus endpoint over real sockets: every endpoint, the status
//! codes for bad input (400 with a reason, 401, 403, 404), AMQP traffic seen through the API.

mod support;

use support::http::{http, raw_http, Resp};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use warren_broker::config::{Config, PermissionConfig, UserConfig};
use warren_broker::Broker;

struct Node {
    amqp: SocketAddr,
    mgmt: SocketAddr,
    prom: SocketAddr,
    token: CancellationToken,
    join: JoinHandle<()>,
    /// The broker's data directory, removed when the test ends.
    _data: tempfile::TempDir,
}

fn user(name: &str, tags: &[&str]) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: format!("{name}-pw"),
        tags: tags.iter().map(|t| t.to_string()).collect(),
    }
}

fn perm(user: &str, vhost: &str) -> PermissionConfig {
    PermissionConfig {
        user: user.into(),
        vhost: vhost.into(),
        configure: ".*".into(),
        write: ".*".into(),
        read: ".*".into(),
    }
}

/// guest (administrator), mon (monitoring, no vhost), mgr (management on "/"), plain (no tags).
fn config() -> Config {
    let mut cfg = Config::for_tests();
    cfg.mgmt = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    cfg.prometheus = vec![SocketAddr::from(([127, 0, 0, 1], 0))];
    let mut guest = user("guest", &["administrator"]);
    guest.password = "guest".into();
    cfg.users = vec![
        guest,
        user("mon", &["monitoring"]),
        user("mgr", &["management"]),
        user("plain", &[]),
    ];
    cfg.vhosts = vec!["/".into(), "other".into()];
    cfg.permissions = vec![
        perm("guest", "/"),
        perm("guest", "other"),
        perm("mgr", "/"),
        perm("plain", "/"),
    ];
    cfg
}

async fn start() -> Node {
    start_with(config()).await
}

async fn start_with(mut cfg: Config) -> Node {
    let data = tempfile::tempdir().expect("tempdir");
    cfg.data_dir = data.path().to_owned();
    let bound = Broker::bind(cfg).await.expect("bind");
    let amqp = bound.amqp_addrs[0];
    let mgmt = bound.mgmt_addrs[0];
    let prom = bound.prometheus_addrs[0];
    let token = CancellationToken::new();
    let join = tokio::spawn(bound.run(token.clone()));
    Node {
        amqp,
        mgmt,
        prom,
        token,
        join,
        _data: data,
    }
}

impl Node {
    async fn stop(self) {
        self.token.cancel();
        if let Err(e) = self.join.await {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
        }
    }

    async fn connect(&self) -> Connection {
        Connection::connect(
            &format!("amqp://guest:guest@{}/%2f", self.amqp),
            ConnectionProperties::default(),
        )
        .await
        .expect("amqp connect")
    }

    /// As guest.
    async fn req(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        http(self.mgmt, method, path, Some(("guest", "guest")), body).await
    }

    async fn get(&self, path: &str) -> Value {
        let r = self.req("GET", path, None).await;
        assert_eq!(r.status, 200, "GET {path}: {}", r.text());
        r.json()
    }
}

#[tokio::test]
async fn missing_or_wrong_credentials_get_401_with_a_challenge() {
    let n = start().await;
    for auth in [
        None,
        Some(("guest", "wrong")),
        Some(("nobody", "x")),
        Some(("mon", "")),
    ] {
        let r = http(n.mgmt, "GET", "/api/overview", auth, None).await;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(
            r.headers.get("www-authenticate").map(String::as_str),
            Some("Basic realm=\"RabbitMQ Management\"")
        );
    }
    // A malformed Authorization header is a 401 too, never a crash.
    let mut s = tokio::net::TcpStream::connect(n.mgmt)
        .await
        .expect("connect");
    s.write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\nAuthorization: Basic !!!\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    assert!(
        buf.starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
    n.stop().await;
}

#[tokio::test]
async fn tags_decide_what_a_user_may_do() {
    let n = start().await;
    let as_ = |u: &'static str| {
        (
            u,
            if u == "guest" {
                "guest"
            } else {
                Box::leak(format!("{u}-pw").into_boxed_str()) as &str
            },
        )
    };
    // No management tag at all: 403.
    let r = http(n.mgmt, "GET", "/api/overview", Some(as_("plain")), None).await;
    assert_eq!(r.status, 403, "{}", r.text());
    // monitoring reads everything, changes nothing.
    let r = http(n.mgmt, "GET", "/api/queues/other", Some(as_("mon")), None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = http(n.mgmt, "GET", "/api/connections", Some(as_("mon")), None).await;
    assert_eq!(r.status, 200);
    let r = http(
        n.mgmt,
        "PUT",
        "/api/queues/%2F/monq",
        Some(as_("mon")),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 403, "{}", r.text());
    for path in ["/api/users", "/api/permissions", "/api/users/guest"] {
        let r = http(n.mgmt, "GET", path, Some(as_("mon")), None).await;
        assert_eq!(r.status, 403, "{path}");
    }
    let r = http(
        n.mgmt,
        "PUT",
        "/api/warren/app",
        Some(as_("mon")),
        Some(json!({"running": false})),
    )
    .await;
    assert_eq!(r.status, 403);
    // management: only its own vhosts.
    let r = http(n.mgmt, "GET", "/api/queues/other", Some(as_("mgr")), None).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = http(
        n.mgmt,
        "PUT",
        "/api/queues/%2F/mgrq",
        Some(as_("mgr")),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let r = http(n.mgmt, "GET", "/api/vhosts", Some(as_("mgr")), None).await;
    let names: Vec<_> = r
        .json()
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("/")]);
    let r = http(n.mgmt, "GET", "/api/whoami", Some(as_("mgr")), None).await;
    assert_eq!(r.json(), json!({"name": "mgr", "tags": ["management"]}));
    n.stop().await;
}

#[tokio::test]
async fn overview_nodes_and_small_endpoints() {
    let n = start().await;
    let o = n.get("/api/overview").await;
    assert_eq!(o["node"], "warren@127.0.0.1");
    assert_eq!(o["product_name"], "warren");
    assert_eq!(o["object_totals"]["queues"], 0);
    assert_eq!(o["object_totals"]["connections"], 0);
    assert_eq!(o["message_stats"]["publish"], 0);
    assert_eq!(o["message_stats"]["publish_details"]["rate"], 0.0);
    assert_eq!(o["queue_totals"]["messages"], 0);
    let protos: Vec<_> = o["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            (
                l["protocol"].as_str().map(str::to_owned),
                l["port"].as_u64(),
            )
        })
        .collect();
    assert!(protos.contains(&(Some("amqp".into()), Some(u64::from(n.amqp.port())))));
    assert!(protos.contains(&(Some("http".into()), Some(u64::from(n.mgmt.port())))));

    let nodes = n.get("/api/nodes").await;
    assert_eq!(nodes[0]["name"], "warren@127.0.0.1");
    assert_eq!(nodes[0]["running"], true);
    assert!(nodes[0]["mem_rss"].as_u64().expect("mem_rss") > 1_000_000);
    assert!(nodes[0]["mem_limit"].as_u64().expect("mem_limit") > 0);
    assert_eq!(nodes[0]["mem_alarm"], false);
    assert_eq!(nodes[0]["disk_free_alarm"], false);
    assert!(nodes[0]["fd_used"].as_u64().expect("fd_used") > 0);
    let one = n.get("/api/nodes/warren@127.0.0.1").await;
    assert_eq!(one["name"], "warren@127.0.0.1");
    assert_eq!(n.req("GET", "/api/nodes/nobody@x", None).await.status, 404);

    assert_eq!(
        n.get("/api/cluster-name").await,
        json!({"name": "warren@127.0.0.1"})
    );
    assert_eq!(
        n.get("/api/whoami").await,
        json!({"name": "guest", "tags": ["administrator"]})
    );
    assert_eq!(n.get("/api/health/checks/alarms").await["status"], "ok");
    assert_eq!(
        n.get("/api/health/checks/node-is-quorum-critical").await["status"],
        "ok"
    );
    assert_eq!(
        n.get("/api/aliveness-test/%2F").await,
        json!({"status": "ok"})
    );
    assert_eq!(
        n.req("GET", "/api/aliveness-test/nope", None).await.status,
        404
    );

    let vhosts = n.get("/api/vhosts").await;
    let names: Vec<_> = vhosts
        .as_array()
        .expect("list")
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("/"), json!("other")]);
    assert_eq!(n.get("/api/vhosts/other").await["name"], "other");
    assert_eq!(n.req("GET", "/api/vhosts/nope", None).await.status, 404);
    let users = n.get("/api/users").await;
    assert_eq!(users.as_array().expect("users").len(), 4);
    assert_eq!(n.get("/api/users/mon").await["tags"], json!(["monitoring"]));
    assert_eq!(n.req("GET", "/api/users/nope", None).await.status, 404);
    let perms = n.get("/api/permissions").await;
    assert!(perms.as_array().expect("perms").contains(
        &json!({"user": "mgr", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"})
    ));

    assert_eq!(n.req("GET", "/api/no-such-thing", None).await.status, 404);
    assert_eq!(n.req("GET", "/nothing-here", None).await.status, 404);
    assert_eq!(n.req("POST", "/api/connections/x", None).await.status, 404);
    assert_eq!(n.req("DELETE", "/api/warren/app", None).await.status, 405);
    n.stop().await;
}

#[tokio::test]
async fn ui_files_are_served_at_the_root() {
    let n = start().await;
    for (path, file, ctype) in [
        ("/", "index.html", "text/html"),
        ("/index.html", "index.html", "text/html"),
        ("/app.js", "app.js", "text/javascript"),
        ("/style.css", "style.css", "text/css"),
    ] {
        let r = http(n.mgmt, "GET", path, None, None).await;
        assert_eq!(r.status, 200, "{path}");
        assert!(r.headers["content-type"].starts_with(ctype), "{path}");
        let want =
            std::fs::read(format!("{}/ui/{file}", env!("CARGO_MANIFEST_DIR"))).expect("ui file");
        assert_eq!(r.body, want, "{path}");
    }
    n.stop().await;
}

#[tokio::test]
async fn queues_are_declared_listed_and_deleted() {
    let n = start().await;
    let r = n
        .req(
            "PUT",
            "/api/queues/%2F/q1",
            Some(
                json!({"durable": false, "auto_delete": false, "arguments": {"x-max-length": 10}}),
            ),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    // Same again: 204; different arguments: 400 with the AMQP reason.
    let r = n
        .req(
            "PUT",
            "/api/queues/%2F/q1",
            Some(json!({"durable": false, "arguments": {"x-max-length": 10}})),
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text());
    n.req(
        "PUT",
        "/api/queues/%2F/q1",
        Some(json!({"durable": true, "arguments": {"x-max-length": 10}})),
    )
    .await
    .bad_request("inequivalent arg 'durable'");
    n.req("PUT", "/api/queues/%2F/q2", Some(json!({"durable": "x"})))
        .await
        .bad_request("durable");
    n.req("PUT", "/api/queues/%2F/q2", Some(json!({"arguments": [1]})))
        .await
        .bad_request("arguments");
    n.req(
        "PUT",
        "/api/queues/%2F/q2",
        Some(json!({"arguments": {"x-max-length": "lots"}})),
    )
    .await
    .bad_request("x-max-length");
    let r = raw_http(
        n.mgmt,
        "PUT",
        "/api/queues/%2F/q2",
        Some(("guest", "guest")),
        Some("{nope".into()),
    )
    .await;
    r.bad_request("not_json");
    let r = n.req("PUT", "/api/queues/%2F/amq.q", Some(json!({}))).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(
        n.req("PUT", "/api/queues/nope/q", Some(json!({})))
            .await
            .status,
        404
    );

    let q = n.get("/api/queues/%2F/q1").await;
    assert_eq!(q["name"], "q1");
    assert_eq!(q["vhost"], "/");
    assert_eq!(q["durable"], false);
    assert_eq!(q["exclusive"], false);
    assert_eq!(q["arguments"], json!({"x-max-length": 10}));
    assert_eq!(q["messages"], 0);
    assert_eq!(q["consumers"], 0);
    assert_eq!(q["consumer_details"], json!([]));
    assert_eq!(q["message_stats"]["publish"], 0);
    let all = n.get("/api/queues").await;
    assert_eq!(all.as_array().expect("list").len(), 1);
    assert_eq!(n.get("/api/queues/other").await, json!([]));
    assert_eq!(n.req("GET", "/api/queues/%2F/nope", None).await.status, 404);
    assert_eq!(n.req("GET", "/api/queues/nope", None).await.status, 404);

    // Queue bindings: the default exchange's implicit one.
    let b = n.get("/api/queues/%2F/q1/bindings").await;
    assert_eq!(b[0]["source"], "");
    assert_eq!(b[0]["routing_key"], "q1");

    // if-empty refuses a queue holding messages.
    let r = n
        .req(
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            Some(json!({"properties": {}, "routing_key": "q1", "payload": "x", "payload_encoding": "string"})),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": true}));
    n.req("DELETE", "/api/queues/%2F/q1?if-empty=true", None)
        .await
        .bad_request("not empty");
    assert_eq!(
        n.req("DELETE", "/api/queues/%2F/q1", None).await.status,
        204
    );
    assert_eq!(
        n.req("DELETE", "/api/queues/%2F/q1", None).await.status,
        404
    );
    assert_eq!(n.get("/api/queues").await, json!([]));
    n.stop().await;
}

#[tokio::test]
async fn exchanges_are_declared_listed_and_deleted() {
    let n = start().await;
    // No type: direct, as RabbitMQ.
    let r = n
        .req(
            "PUT",
            "/api/exchanges/%2F/e0",
            Some(json!({"durable": true})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let e0 = n.get("/api/exchanges/%2F/e0").await;
    assert_eq!(
        (&e0["type"], &e0["durable"]),
        (&json!("direct"), &json!(true))
    );
    assert_eq!(
        n.req("DELETE", "/api/exchanges/%2F/e0", None).await.status,
        204
    );
    n.req(
        "PUT",
        "/api/exchanges/%2F/e1",
        Some(json!({"type": "weird"})),
    )
    .await
    .bad_request("weird");
    let r = n
        .req(
            "PUT",
            "/api/exchanges/%2F/e1",
            Some(json!({"type": "topic", "durable": false, "arguments": {"alternate-exchange": "ae"}})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        n.req(
            "PUT",
            "/api/exchanges/%2F/e1",
            Some(json!({"type": "topic", "durable": false}))
        )
        .await
        .status,
        204
    );
    n.req(
        "PUT",
        "/api/exchanges/%2F/e1",
        Some(json!({"type": "fanout", "durable": false})),
    )
    .await
    .bad_request("inequivalent arg 'type'");
    let e = n.get("/api/exchanges/%2F/e1").await;
    assert_eq!(
        e,
        json!({"name": "e1", "vhost": "/", "type": "topic", "durable": false, "auto_delete": false,
               "internal": false, "arguments": {"alternate-exchange": "ae"},
               "user_who_performed_action": "rmq-internal"})
    );
    let list = n.get("/api/exchanges/%2F").await;
    let names: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .map(|x| x["name"].as_str().unwrap_or("?").to_owned())
        .collect();
    for want in [
        "",
        "amq.direct",
        "amq.fanout",
        "amq.topic",
        "amq.headers",
        "e1",
    ] {
        assert!(
            names.contains(&want.to_owned()),
            "{want} missing from {names:?}"
        );
    }
    assert_eq!(n.get("/api/exchanges/%2F/amq.default").await["name"], "");
    assert_eq!(
        n.get("/api/exchanges").await.as_array().expect("all").len(),
        list.as_array().expect("list").len() * 2 - 1
    );
    assert_eq!(
        n.req("GET", "/api/exchanges/%2F/nope", None).await.status,
        404
    );
    assert_eq!(
        n.req("DELETE", "/api/exchanges/%2F/amq.direct", None)
            .await
            .status,
        403
    );
    assert_eq!(
        n.req(
            "PUT",
            "/api/exchanges/%2F/amq.new",
            Some(json!({"type": "direct"}))
        )
        .await
        .status,
        403
    );
    assert_eq!(
        n.req("DELETE", "/api/exchanges/%2F/e1", None).await.status,
        204
    );
    assert_eq!(
        n.req("DELETE", "/api/exchanges/%2F/e1", None).await.status,
        404
    );
    n.stop().await;
}

#[tokio::test]
async fn bindings_are_created_listed_and_deleted() {
    let n = start().await;
    n.req("PUT", "/api/queues/%2F/bq", Some(json!({}))).await;
    n.req(
        "PUT",
        "/api/exchanges/%2F/bx",
        Some(json!({"type": "direct"})),
    )
    .await;
    let r = n
        .req(
            "POST",
            "/api/bindings/%2F/e/bx/q/bq",
            Some(json!({"routing_key": "a#b", "arguments": {}})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        r.headers.get("location").map(String::as_str),
        Some("/api/bindings/%2F/e/bx/q/bq/a%2523b")
    );
    let r = n
        .req(
            "POST",
            "/api/bindings/%2F/e/bx/q/bq",
            Some(json!({"routing_key": "k2", "arguments": {"x": 1}})),
        )
        .await;
    assert_eq!(r.status, 201);
    let pair = n.get("/api/bindings/%2F/e/bx/q/bq").await;
    assert_eq!(pair.as_array().expect("pair").len(), 2);
    assert_eq!(
        pair[0],
        json!({"source": "bx", "vhost": "/", "destination": "bq", "destination_type": "queue",
               "routing_key": "a#b", "arguments": {}, "properties_key": "a%23b"})
    );
    let key2 = pair[1]["properties_key"].as_str().expect("key").to_owned();
    assert!(key2.starts_with("k2~"), "{key2}");
    assert_eq!(
        n.get(&format!("/api/bindings/%2F/e/bx/q/bq/{key2}")).await["arguments"],
        json!({"x": 1})
    );
    let all = n.get("/api/bindings/%2F").await;
    assert_eq!(all.as_array().expect("all").len(), 3, "{all}");
    assert_eq!(n.get("/api/bindings").await, all);
    assert_eq!(
        n.get("/api/exchanges/%2F/bx/bindings/source")
            .await
            .as_array()
            .expect("src")
            .len(),
        2
    );
    // Exchange to exchange.
    assert_eq!(
        n.req(
            "POST",
            "/api/bindings/%2F/e/amq.topic/e/bx",
            Some(json!({"routing_key": "#"}))
        )
        .await
        .status,
        201
    );
    assert_eq!(
        n.get("/api/exchanges/%2F/bx/bindings/destination").await[0]["source"],
        "amq.topic"
    );
    // The binding routes.
    let r = n
        .req(
            "POST",
            "/api/exchanges/%2F/bx/publish",
            Some(json!({"properties": {}, "routing_key": "a#b", "payload": "m", "payload_encoding": "string"})),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": true}));

    // Errors.
    assert_eq!(
        n.req("POST", "/api/bindings/%2F/e/bx/q/nope", Some(json!({})))
            .await
            .status,
        404
    );
    assert_eq!(
        n.req("POST", "/api/bindings/%2F/e/nope/q/bq", Some(json!({})))
            .await
            .status,
        404
    );
    assert_eq!(
        n.req(
            "POST",
            "/api/bindings/%2F/e/amq.default/q/bq",
            Some(json!({}))
        )
        .await
        .status,
        403
    );
    n.req(
        "POST",
        "/api/bindings/%2F/e/bx/q/bq",
        Some(json!({"routing_key": 5})),
    )
    .await
    .bad_request("routing_key");
    assert_eq!(
        n.req("GET", "/api/bindings/%2F/e/bx/q/bq/nokey", None)
            .await
            .status,
        404
    );

    assert_eq!(
        n.req("DELETE", "/api/bindings/%2F/e/bx/q/bq/a%2523b", None)
            .await
            .status,
        204
    );
    assert_eq!(
        n.req("DELETE", "/api/bindings/%2F/e/bx/q/bq/a%23b", None)
            .await
            .status,
        404
    );
    assert_eq!(
        n.req(
            "DELETE",
            &format!("/api/bindings/%2F/e/bx/q/bq/{key2}"),
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(n.get("/api/bindings/%2F/e/bx/q/bq").await, json!([]));
    n.stop().await;
}

#[tokio::test]
async fn publish_get_and_purge_through_the_api() {
    let n = start().await;
    n.req("PUT", "/api/queues/%2F/pq", Some(json!({}))).await;
    let pub_ = |payload: &str, enc: &str, props: Value| json!({"properties": props, "routing_key": "pq", "payload": payload, "payload_encoding": enc});
    let r = n
        .req(
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            Some(pub_(
                "hello",
                "string",
                json!({"content_type": "text/plain", "headers": {"h": 1}, "delivery_mode": 2}),
            )),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": true}));
    // base64 payload with a non-UTF-8 byte comes back as base64.
    let r = n
        .req(
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            Some(pub_("/w==", "base64", json!({}))),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": true}));
    let r = n
        .req(
            "POST",
            "/api/exchanges/%2F/amq.direct/publish",
            Some(json!({"properties": {}, "routing_key": "nowhere", "payload": "", "payload_encoding": "string"})),
        )
        .await;
    assert_eq!(r.json(), json!({"routed": false}));
    // Bad publishes.
    let path = "/api/exchanges/%2F/amq.default/publish";
    n.req("POST", path, Some(pub_("x", "rot13", json!({}))))
        .await
        .bad_request("rot13");
    n.req("POST", path, Some(pub_("!!", "base64", json!({}))))
        .await
        .bad_request("base64");
    n.req(
        "POST",
        path,
        Some(pub_("x", "string", json!({"delivery_mode": "fast"}))),
    )
    .await
    .bad_request("delivery_mode");
    n.req("POST", path, Some(json!({"payload": "x"})))
        .await
        .bad_request("routing_key");
    n.req("POST", path, Some(json!({"routing_key": "pq"})))
        .await
        .bad_request("payload");
    assert_eq!(
        n.req(
            "POST",
            "/api/exchanges/%2F/nope/publish",
            Some(pub_("x", "string", json!({})))
        )
        .await
        .status,
        404
    );

    // get with requeue leaves the messages; the second get sees them redelivered.
    let get = |count: u64, mode: &str| json!({"count": count, "ackmode": mode, "encoding": "auto"});
    let msgs = n
        .req(
            "POST",
            "/api/queues/%2F/pq/get",
            Some(get(5, "ack_requeue_true")),
        )
        .await
        .json();
    assert_eq!(msgs.as_array().expect("msgs").len(), 2, "{msgs}");
    assert_eq!(
        msgs[0],
        json!({"payload_bytes": 5, "redelivered": false, "exchange": "", "routing_key": "pq",
               "message_count": 1, "properties": {"content_type": "text/plain", "headers": {"h": 1}, "delivery_mode": 2},
               "payload": "hello", "payload_encoding": "string"})
    );
    assert_eq!(msgs[1]["payload"], "/w==");
    assert_eq!(msgs[1]["payload_encoding"], "base64");
    let msgs = n
        .req(
            "POST",
            "/api/queues/%2F/pq/get",
            Some(json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "base64"})),
        )
        .await
        .json();
    assert_eq!(msgs[0]["payload"], "aGVsbG8=");
    assert_eq!(msgs[0]["redelivered"], true);
    n.req(
        "POST",
        "/api/queues/%2F/pq/get",
        Some(json!({"count": 1, "ackmode": "bogus"})),
    )
    .await
    .bad_request("bogus");
    n.req(
        "POST",
        "/api/queues/%2F/pq/get",
        Some(json!({"ackmode": "ack_requeue_true"})),
    )
    .await
    .bad_request("count");
    assert_eq!(
        n.req(
            "POST",
            "/api/queues/%2F/nope/get",
            Some(get(1, "ack_requeue_true"))
        )
        .await
        .status,
        404
    );
    // Consuming get takes one message.
    let msgs = n
        .req(
            "POST",
            "/api/queues/%2F/pq/get",
            Some(get(1, "ack_requeue_false")),
        )
        .await
        .json();
    assert_eq!(msgs[0]["payload"], "hello");
    assert_eq!(n.get("/api/queues/%2F/pq").await["messages"], 1);
    // Purge empties it.
    assert_eq!(
        n.req("DELETE", "/api/queues/%2F/pq/contents", None)
            .await
            .status,
        204
    );
    assert_eq!(n.get("/api/queues/%2F/pq").await["messages"], 0);
    assert_eq!(
        n.req(
            "POST",
            "/api/queues/%2F/pq/get",
            Some(get(1, "ack_requeue_true"))
        )
        .await
        .json(),
        json!([])
    );
    assert_eq!(
        n.req("DELETE", "/api/queues/%2F/nope/contents", None)
            .await
            .status,
        404
    );
    n.stop().await;
}

#[tokio::test]
async fn connections_channels_and_consumers_are_listed_and_closed() {
    let n = start().await;
    let props = ConnectionProperties::default().with_connection_name("test-conn".into());
    let conn = Connection::connect(&format!("amqp://guest:guest@{}/%2f", n.amqp), props)
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(7, BasicQosOptions::default())
        .await
        .expect("qos");
    ch.queue_declare(
        "cq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let _consumer = ch
        .basic_consume(
            "cq".into(),
            "ctag".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let conns = n.get("/api/connections").await;
    assert_eq!(conns.as_array().expect("list").len(), 1, "{conns}");
    let c = &conns[0];
    let name = c["name"].as_str().expect("name").to_owned();
    assert!(name.ends_with(&format!(" -> {}", n.amqp)), "{name}");
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["state"], "running");
    assert_eq!(c["channels"], 1);
    assert_eq!(c["user_provided_name"], "test-conn");
    assert_eq!(c["client_properties"]["connection_name"], "test-conn");
    assert_eq!(
        c["peer_port"].as_u64(),
        Some(u64::from(
            c["name"]
                .as_str()
                .and_then(|s| s.split(" -> ").next())
                .and_then(|p| p.parse::<SocketAddr>().ok())
                .expect("peer")
                .port()
        ))
    );
    let quoted = name.replace(' ', "%20").replace('>', "%3E");
    assert_eq!(
        n.get(&format!("/api/connections/{quoted}")).await["name"],
        name
    );

    let chans = n.get("/api/channels").await;
    assert_eq!(chans[0]["name"], format!("{name} (1)"));
    assert_eq!(chans[0]["number"], 1);
    assert_eq!(chans[0]["prefetch_count"], 7);
    assert_eq!(chans[0]["consumer_count"], 1);
    assert_eq!(chans[0]["connection_details"]["name"], name);
    assert_eq!(
        n.get(&format!("/api/connections/{quoted}/channels")).await,
        chans
    );
    let chan_q = format!("{quoted}%20(1)");
    assert_eq!(n.get(&format!("/api/channels/{chan_q}")).await["number"], 1);
    assert_eq!(n.req("GET", "/api/channels/nope", None).await.status, 404);

    let cons = n.get("/api/consumers").await;
    assert_eq!(cons[0]["consumer_tag"], "ctag");
    assert_eq!(cons[0]["queue"], json!({"name": "cq", "vhost": "/"}));
    assert_eq!(cons[0]["ack_required"], true);
    assert_eq!(cons[0]["prefetch_count"], 7);
    assert_eq!(cons[0]["channel_details"]["connection_name"], name);
    assert_eq!(n.get("/api/consumers/%2F").await, cons);
    assert_eq!(n.get("/api/consumers/other").await, json!([]));
    assert_eq!(n.get("/api/queues/%2F/cq").await["consumer_details"], cons);

    // Closing it from the API: the client sees 320 CONNECTION_FORCED.
    assert_eq!(
        n.req("DELETE", "/api/connections/nope", None).await.status,
        404
    );
    assert_eq!(
        n.req("DELETE", &format!("/api/connections/{quoted}"), None)
            .await
            .status,
        204
    );
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = ch.basic_qos(1, BasicQosOptions::default()).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connection closed in time");
    assert!(
        format!("{err:?}").contains("320") || !conn.status().connected(),
        "{err:?}"
    );
    no_connections_left(&n).await;
    n.stop().await;
}

/// Waits (bounded) until the API lists no connection: a closed connection leaves the registry
/// once its task has released its channels.
async fn no_connections_left(n: &Node) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while n.get("/api/connections").await != json!([]) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("connections gone from /api/connections within 5 s");
}

/// The overview once the sampler (every second) has turned the traffic into non-zero
/// publish and deliver_get rates.
async fn overview_with_rates(n: &Node) -> Value {
    tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            let o = n.get("/api/overview").await;
            let ms = &o["message_stats"];
            let rate = |k: &str| ms[k]["rate"].as_f64().unwrap_or(0.0);
            if rate("publish_details") > 0.0 && rate("deliver_get_details") > 0.0 {
                return o;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("rates sampled within 6 s")
}

#[tokio::test]
async fn message_counts_and_rates_follow_amqp_traffic() {
    let n = start().await;
    let conn = n.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    ch.queue_declare(
        "rq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    for i in 0..50u32 {
        ch.basic_publish(
            "".into(),
            "rq".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    // 20 unroutable ones, 10 of them mandatory.
    for i in 0..20 {
        ch.basic_publish(
            "".into(),
            "nowhere".into(),
            BasicPublishOptions {
                mandatory: i % 2 == 0,
                ..Default::default()
            },
            b"x",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    // 30 delivered and acked (the rest delivered goes back when the consuming channel
    // closes), then 5 fetched with basic.get and not acked.
    let cch = conn.create_channel().await.expect("consumer channel");
    let mut consumer = cch
        .basic_consume(
            "rq".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let c2 = conn.create_channel().await.expect("channel 2");
    let mut got = 0;
    use futures_lite::StreamExt;
    while got < 30 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream")
            .expect("delivery");
        d.ack(BasicAckOptions::default()).await.expect("ack");
        got += 1;
    }
    cch.close(200, "done".into()).await.expect("close channel");
    for _ in 0..5 {
        c2.basic_get("rq".into(), BasicGetOptions::default())
            .await
            .expect("get")
            .expect("a message");
    }
    let o = overview_with_rates(&n).await;
    let ms = &o["message_stats"];
    assert_eq!(ms["publish"], 70, "{ms}");
    assert_eq!(ms["confirm"], 70, "{ms}");
    assert_eq!(ms["return_unroutable"], 10, "{ms}");
    assert_eq!(ms["drop_unroutable"], 10, "{ms}");
    assert_eq!(ms["get"], 5, "{ms}");
    assert_eq!(ms["ack"], 30, "{ms}");
    let delivered = ms["deliver"].as_u64().expect("deliver");
    assert!(delivered >= 30, "{ms}");
    assert_eq!(ms["deliver_get"].as_u64(), Some(delivered + 5), "{ms}");
    // All of it within the rate window: the rates are positive.
    assert!(
        ms["publish_details"]["rate"].as_f64().expect("rate") > 0.0,
        "{ms}"
    );
    assert!(
        ms["deliver_get_details"]["rate"].as_f64().expect("rate") > 0.0,
        "{ms}"
    );
    assert!(
        ms["confirm_details"]["rate"].as_f64().expect("rate") > 0.0,
        "{ms}"
    );
    assert_eq!(o["object_totals"]["queues"], 1);
    assert_eq!(o["object_totals"]["connections"], 1);
    assert_eq!(o["object_totals"]["channels"], 2);
    let q = n.get("/api/queues/%2F/rq").await;
    assert_eq!(q["message_stats"]["publish"], 50, "{q}");
    assert_eq!(q["message_stats"]["get"], 5, "{q}");
    assert_eq!(q["messages"], 20, "{q}");
    assert_eq!(q["messages_ready"], 15, "{q}");
    assert_eq!(q["messages_unacknowledged"], 5, "{q}");
    assert_eq!(
        q["message_stats"]["redeliver"].as_u64(),
        Some((delivered - 30).min(5)),
        "{q}"
    );
    // Counters survive the connection and queue going away.
    conn.close(200, "bye".into()).await.expect("close");
    n.req("DELETE", "/api/queues/%2F/rq", None).await;
    let o = n.get("/api/overview").await;
    assert_eq!(o["message_stats"]["publish"], 70);
    assert_eq!(o["message_stats"]["get"], 5);
    n.stop().await;
}

#[tokio::test]
async fn stop_app_closes_clients_and_refuses_amqp_until_started() {
    let n = start().await;
    assert_eq!(
        n.get("/api/warren/app").await,
        json!({"running": true, "paused_by_partition": false})
    );
    let conn = n.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    n.req("PUT", "/api/warren/app", Some(json!({"running": "no"})))
        .await
        .bad_request("running");
    n.req("PUT", "/api/warren/app", Some(json!({})))
        .await
        .bad_request("running");
    let r = n
        .req("PUT", "/api/warren/app", Some(json!({"running": false})))
        .await;
    assert_eq!(r.json(), json!({"running": false}));
    // The open connection is closed with 320.
    let err = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(e) = ch.basic_qos(1, BasicQosOptions::default()).await {
                return e;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("closed in time");
    assert!(
        format!("{err:?}").contains("320")
            || format!("{err:?}").contains("CONNECTION_FORCED")
            || !conn.status().connected(),
        "{err:?}"
    );
    // New AMQP connections fail while stopped; the API still answers.
    let refused = Connection::connect(
        &format!("amqp://guest:guest@{}/%2f", n.amqp),
        ConnectionProperties::default(),
    )
    .await;
    assert!(refused.is_err(), "connected while stopped");
    assert_eq!(
        n.get("/api/warren/app").await,
        json!({"running": false, "paused_by_partition": false})
    );
    no_connections_left(&n).await;
    let r = n
        .req("PUT", "/api/warren/app", Some(json!({"running": true})))
        .await;
    assert_eq!(r.json(), json!({"running": true}));
    let again = n.connect().await;
    again
        .create_channel()
        .await
        .expect("channel after start_app");
    n.stop().await;
}

#[tokio::test]
async fn prometheus_metrics_carry_rabbitmq_names_and_values() {
    let n = start().await;
    let conn = n.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm");
    ch.queue_declare(
        "mq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    for _ in 0..12 {
        ch.basic_publish(
            "".into(),
            "mq".into(),
            BasicPublishOptions::default(),
            b"0123456789",
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    for _ in 0..2 {
        ch.basic_get("mq".into(), BasicGetOptions { no_ack: true })
            .await
            .expect("get")
            .expect("msg");
    }
    let d = ch
        .basic_get("mq".into(), BasicGetOptions { no_ack: false })
        .await
        .expect("get")
        .expect("msg");
    let _ = d;
    let r = http(n.prom, "GET", "/metrics", None, None).await;
    assert_eq!(r.status, 200);
    assert!(r.headers["content-type"].starts_with("text/plain"));
    let text = r.text();
    let value = |series: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert_eq!(value("rabbitmq_connections"), 1.0);
    assert_eq!(value("rabbitmq_channels"), 1.0);
    assert_eq!(value("rabbitmq_queues"), 1.0);
    assert_eq!(value("rabbitmq_consumers"), 0.0);
    assert_eq!(value("rabbitmq_queue_messages_ready"), 9.0);
    assert_eq!(value("rabbitmq_queue_messages_unacked"), 1.0);
    assert_eq!(value("rabbitmq_queue_messages"), 10.0);
    assert_eq!(value("rabbitmq_queue_messages_ready_bytes"), 90.0);
    assert_eq!(
        value("rabbitmq_global_messages_received_total{protocol=\"amqp091\"}"),
        12.0
    );
    assert_eq!(
        value("rabbitmq_global_messages_confirmed_total{protocol=\"amqp091\"}"),
        12.0
    );
    let classic = "{protocol=\"amqp091\",queue_type=\"rabbit_classic_queue\"}";
    assert_eq!(
        value(&format!(
            "rabbitmq_global_messages_delivered_total{classic}"
        )),
        3.0
    );
    assert_eq!(
        value(&format!(
            "rabbitmq_global_messages_delivered_get_auto_ack_total{classic}"
        )),
        2.0
    );
    assert_eq!(
        value(&format!(
            "rabbitmq_global_messages_delivered_get_manual_ack_total{classic}"
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "rabbitmq_global_messages_acknowledged_total{classic}"
        )),
        0.0
    );
    assert_eq!(value("rabbitmq_connections_opened_total"), 1.0);
    assert!(value("rabbitmq_process_resident_memory_bytes") > 1e6);
    assert!(text.contains("# TYPE rabbitmq_queue_messages_ready gauge"));
    assert!(text.contains("# TYPE rabbitmq_global_messages_received_total counter"));
    // Per-queue series.
    let r = http(n.prom, "GET", "/metrics/per-object", None, None).await;
    let po = r.text();
    assert!(
        po.contains("rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"mq\"} 9\n"),
        "{po}"
    );
    assert!(
        po.contains("rabbitmq_queue_messages_published_total{vhost=\"/\",queue=\"mq\"} 12\n"),
        "{po}"
    );
    assert_eq!(http(n.prom, "GET", "/nope", None, None).await.status, 404);
    assert_eq!(
        http(n.prom, "POST", "/metrics", None, None).await.status,
        405
    );
    n.stop().await;
}

#[tokio::test]
async fn alarms_show_in_health_check_nodes_and_metrics() {
    use warren_broker::config::MemoryWatermark;
    let mut cfg = config();
    cfg.vm_memory_high_watermark = MemoryWatermark::Absolute(100 * 1024);
    cfg.vm_memory_high_watermark_paging_ratio = 10.0;
    let n = start_with(cfg).await;
    assert_eq!(
        n.get("/api/health/checks/alarms").await,
        json!({"status": "ok"})
    );
    n.req("PUT", "/api/queues/%2F/big", Some(json!({}))).await;
    let body = "x".repeat(10 * 1024);
    for _ in 0..20 {
        let r = n
            .req(
                "POST",
                "/api/exchanges/%2F/amq.default/publish",
                Some(json!({"properties": {}, "routing_key": "big", "payload": body, "payload_encoding": "string"})),
            )
            .await;
        assert_eq!(r.json(), json!({"routed": true}));
    }
    let r = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let r = n.req("GET", "/api/health/checks/alarms", None).await;
            if r.status != 200 {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("memory alarm within 5 s");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(
        r.json(),
        json!({"status": "failed", "reason": "resource alarm(s) in effect in the cluster",
               "alarms": [{"node": "warren@127.0.0.1", "resource": "memory"}]})
    );
    let node = n.get("/api/nodes/warren@127.0.0.1").await;
    assert_eq!(node["mem_alarm"], true);
    assert_eq!(node["mem_limit"], 100 * 1024);
    assert!(node["mem_used"].as_u64().expect("mem_used") > 100 * 1024);
    let m = http(n.prom, "GET", "/metrics", None, None).await.text();
    assert!(
        m.contains("\nrabbitmq_alarms_memory_used_watermark 1\n"),
        "{m}"
    );
    assert!(
        m.contains("\nrabbitmq_resident_memory_limit_bytes 102400\n"),
        "{m}"
    );
    // Purging clears it.
    assert_eq!(
        n.req("DELETE", "/api/queues/%2F/big/contents", None)
            .await
            .status,
        204
    );
    tokio::time::timeout(Duration::from_secs(5), async {
        while n.req("GET", "/api/health/checks/alarms", None).await.status != 200 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("alarm cleared within 5 s");
    assert_eq!(n.get("/api/nodes").await[0]["mem_alarm"], false);
    n.stop().await;
}

#[tokio::test]
async fn vhosts_users_permissions_policies_and_definitions() {
    let n = start().await;
    // vhosts
    let r = n
        .req(
            "PUT",
            "/api/vhosts/v1",
            Some(json!({"description": "first", "tags": "a,b"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(
        n.req("PUT", "/api/vhosts/v1", Some(json!({}))).await.status,
        204
    );
    n.req("PUT", "/api/vhosts/v2", Some(json!({"tags": 5})))
        .await
        .bad_request("tags");
    assert_eq!(n.get("/api/vhosts/v1").await["name"], "v1");
    // users: plain password, then a RabbitMQ hash
    let r = n
        .req(
            "PUT",
            "/api/users/u1",
            Some(json!({"password": "pw1", "tags": "management"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    n.req("PUT", "/api/users/u2", Some(json!({"tags": ""})))
        .await
        .bad_request("password");
    n.req(
        "PUT",
        "/api/users/u2",
        Some(json!({"password_hash": "x", "hashing_algorithm": "md5"})),
    )
    .await
    .bad_request("md5");
    let u = n.get("/api/users/u1").await;
    assert_eq!(u["tags"], json!(["management"]));
    assert_eq!(u["hashing_algorithm"], "rabbit_password_hashing_sha256");
    assert!(!u["password_hash"].as_str().expect("hash").is_empty());
    // u1 logs in with its password; without permissions it sees no vhost.
    let r = http(n.mgmt, "GET", "/api/vhosts", Some(("u1", "pw1")), None).await;
    assert_eq!(r.json(), json!([]));
    // permissions
    n.req(
        "PUT",
        "/api/permissions/v1/u1",
        Some(json!({"configure": ".*", "write": ".*"})),
    )
    .await
    .bad_request("read");
    let r = n
        .req(
            "PUT",
            "/api/permissions/v1/u1",
            Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(n.get("/api/permissions/v1/u1").await["read"], ".*");
    // The same entry listed per vhost and per user, as RabbitMQ does.
    let per_vhost = n.get("/api/vhosts/v1/permissions").await;
    let per_vhost = per_vhost.as_array().expect("list");
    assert_eq!(per_vhost.len(), 1, "{per_vhost:?}");
    assert_eq!(per_vhost[0]["user"], "u1");
    let per_user = n.get("/api/users/u1/permissions").await;
    let per_user = per_user.as_array().expect("list");
    assert_eq!(per_user.len(), 1, "{per_user:?}");
    assert_eq!(per_user[0]["vhost"], "v1");
    assert_eq!(
        n.req("GET", "/api/users/nobody/permissions", None)
            .await
            .status,
        404
    );
    assert_eq!(
        n.req("GET", "/api/vhosts/nope/permissions", None)
            .await
            .status,
        404
    );
    assert_eq!(
        n.req(
            "PUT",
            "/api/permissions/nope/u1",
            Some(json!({"configure": "", "write": "", "read": ""}))
        )
        .await
        .status,
        404
    );
    let r = http(n.mgmt, "GET", "/api/vhosts", Some(("u1", "pw1")), None).await;
    assert_eq!(r.json().as_array().expect("list").len(), 1);
    // policies
    let pol = json!({"pattern": "^ha\\.", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"}, "priority": 1, "apply-to": "queues"});
    let r = n.req("PUT", "/api/policies/%2F/ha-all", Some(pol)).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let p = n.get("/api/policies/%2F/ha-all").await;
    assert_eq!(p["apply-to"], "queues");
    assert_eq!(p["definition"]["ha-mode"], "all");
    assert_eq!(
        n.get("/api/policies").await.as_array().expect("list").len(),
        1
    );
    assert_eq!(
        n.get("/api/policies/%2F")
            .await
            .as_array()
            .expect("list")
            .len(),
        1
    );
    n.req(
        "PUT",
        "/api/policies/%2F/bad",
        Some(json!({"definition": {}})),
    )
    .await
    .bad_request("pattern");
    n.req(
        "PUT",
        "/api/policies/%2F/bad",
        Some(json!({"pattern": ".*", "definition": {}, "apply-to": "nothing"})),
    )
    .await
    .bad_request("apply-to");
    // definitions export / import round trip
    // Administrators need permissions on a vhost to declare in it, as in RabbitMQ.
    let r = n
        .req("PUT", "/api/queues/v1/dq", Some(json!({"durable": true})))
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    n.req(
        "PUT",
        "/api/permissions/v1/guest",
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    let r = n
        .req("PUT", "/api/queues/v1/dq", Some(json!({"durable": true})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let defs = n.get("/api/definitions").await;
    assert!(defs["users"]
        .as_array()
        .expect("users")
        .iter()
        .any(|u| u["name"] == "u1"));
    assert!(defs["queues"]
        .as_array()
        .expect("queues")
        .iter()
        .any(|q| q["name"] == "dq" && q["vhost"] == "v1"));
    assert!(defs["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .any(|p| p["name"] == "ha-all"));
    assert_eq!(
        n.req("DELETE", "/api/policies/%2F/ha-all", None)
            .await
            .status,
        204
    );
    assert_eq!(
        n.req("DELETE", "/api/policies/%2F/ha-all", None)
            .await
            .status,
        404
    );
    assert_eq!(n.req("DELETE", "/api/users/u1", None).await.status, 204);
    assert_eq!(n.req("GET", "/api/users/u1", None).await.status, 404);
    assert_eq!(n.req("DELETE", "/api/vhosts/v1", None).await.status, 204);
    assert_eq!(n.req("DELETE", "/api/vhosts/v1", None).await.status, 404);
    let r = n.req("POST", "/api/definitions", Some(defs)).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(n.get("/api/users/u1").await["tags"], json!(["management"]));
    assert_eq!(n.get("/api/queues/v1/dq").await["durable"], true);
    assert_eq!(n.get("/api/policies/%2F/ha-all").await["priority"], 1);
    let r = http(n.mgmt, "GET", "/api/vhosts", Some(("u1", "pw1")), None).await;
    assert_eq!(r.status, 200, "imported password hash must still verify");
    let r = raw_http(
        n.mgmt,
        "POST",
        "/api/definitions",
        Some(("guest", "guest")),
        Some("{bad".into()),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.text());
    // Non-administrators cannot change definitions.
    let r = http(
        n.mgmt,
        "PUT",
        "/api/vhosts/v9",
        Some(("mgr", "mgr-pw")),
        Some(json!({})),
    )
    .await;
    assert_eq!(r.status, 403);
    let r = http(
        n.mgmt,
        "GET",
        "/api/definitions",
        Some(("mon", "mon-pw")),
        None,
    )
    .await;
    assert_eq!(r.status, 403);
    n.stop().await;
}
