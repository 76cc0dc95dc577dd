//! Definitions: the mutable API, RabbitMQ definitions JSON import/export, RabbitMQ password
//! hashes over AMQP, and persistence across restarts of the real binary.

mod support;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;
use warren_broker::auth::{PasswordHash, PermissionSpec, VhostMeta};
use warren_broker::config::Config;
use warren_broker::definitions::{parse_definitions, DefError, ExportScope};
use warren_broker::policy::{ApplyTo, Policy};

const FIXTURE: &[u8] = include_bytes!("fixtures/rabbitmq-3.10-export.json");

async fn connect_as(
    addr: SocketAddr,
    user: &str,
    pass: &str,
    vhost: &str,
) -> lapin::Result<Connection> {
    let vhost = vhost.replace('/', "%2f");
    Connection::connect(
        &format!("amqp://{user}:{pass}@{addr}/{vhost}"),
        ConnectionProperties::default(),
    )
    .await
}

async fn passive_queue(ch: &lapin::Channel, name: &str) -> lapin::Result<lapin::Queue> {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

async fn passive_exchange(ch: &lapin::Channel, name: &str) -> lapin::Result<()> {
    ch.exchange_declare(
        name.into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
}

fn ha_policy(vhost: &str) -> Policy {
    let def = serde_json::json!({"ha-mode": "all", "ha-sync-mode": "automatic"});
    Policy {
        vhost: vhost.into(),
        name: "ha-all".into(),
        pattern: "".into(),
        apply_to: ApplyTo::All,
        priority: 0,
        definition: def.as_object().cloned().expect("object"),
    }
}

#[tokio::test]
async fn rabbitmq_export_imports_and_its_hash_authenticates_over_amqp() {
    let b = start().await;
    let d = parse_definitions(FIXTURE).expect("parse RabbitMQ export");
    b.shared.import_definitions(&d).await.expect("import");

    // alice's RabbitMQ sha256 hash logs in over AMQP with her password, on her vhost.
    let c = connect_as(b.addr, "alice", "s3cret-pass", "celery-vh")
        .await
        .expect("alice logs in with the password behind RabbitMQ's hash");
    let ch = c.create_channel().await.expect("channel");
    let q = passive_queue(&ch, "alice-work")
        .await
        .expect("queue imported");
    assert_eq!(q.name().as_str(), "alice-work");
    // Her binding from amq.direct came along: a publish reaches the queue.
    publish(&ch, "amq.direct", "work", b"job").await;
    assert_eq!(
        get_body(&ch, "alice-work").await.as_deref(),
        Some(&b"job"[..])
    );
    // Her permissions too: configure only on ^alice-.*
    let e = ch
        .queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("configure refused outside ^alice-");
    assert_eq!(amqp_code(&e), Some(403));
    c.close(200, "bye".into()).await.ok();

    assert!(connect_as(b.addr, "alice", "wrong", "celery-vh")
        .await
        .is_err());

    // Exchanges, arguments and the exchange-to-exchange binding on "/".
    let (_c, ch) = b.channel().await;
    passive_exchange(&ch, "orders").await.expect("orders");
    passive_exchange(&ch, "audit").await.expect("audit");
    let vh = b.shared.vhost("/").expect("/");
    let q = vh.queue("orders.eu").expect("orders.eu");
    assert!(q.durable);
    assert_eq!(q.args.message_ttl, Some(60000));
    assert_eq!(q.args.max_length, Some(1000));
    assert_eq!(q.args.dead_letter_exchange.as_deref(), Some("audit"));
    assert!(vh.queue("transient-q").is_some_and(|q| !q.durable));
    publish(&ch, "orders", "eu.de", b"o1").await;
    assert_eq!(
        get_body(&ch, "orders.eu").await.as_deref(),
        Some(&b"o1"[..])
    );

    let pols = b.shared.policies.list(None);
    assert_eq!(pols.len(), 2);
    let ha = b
        .shared
        .policies
        .get("celery-vh", "ha-all")
        .expect("ha-all");
    assert_eq!(ha.apply_to, ApplyTo::Queues);
    assert_eq!(ha.priority, 1);
    assert_eq!(ha.definition["ha-sync-mode"], "automatic");
    let alice = b.shared.auth.user("alice").expect("alice");
    assert_eq!(alice.tags, vec!["management", "monitoring"]);
    b.shutdown().await;
}

#[tokio::test]
async fn export_then_import_round_trips() {
    let a = start().await;
    a.shared
        .import_definitions(&parse_definitions(FIXTURE).expect("parse"))
        .await
        .expect("import");
    let exported = a.shared.export_definitions(ExportScope::All);
    let text = serde_json::to_vec(&exported).expect("json");
    // RabbitMQ's field names in what we write.
    let v: serde_json::Value = serde_json::from_slice(&text).expect("value");
    // Sorted by vhost then name: "/" ttl-pol, then celery-vh ha-all.
    assert_eq!(v["policies"][0]["apply-to"], "all");
    assert_eq!(v["policies"][1]["apply-to"], "queues");
    assert_eq!(v["policies"][1]["definition"]["ha-mode"], "all");
    assert!(v["users"][0]["password_hash"].is_string());
    assert_eq!(
        v["users"][0]["hashing_algorithm"],
        "rabbit_password_hashing_sha256"
    );
    assert_eq!(exported.queues.len(), 3, "{:?}", exported.queues);
    assert_eq!(exported.exchanges.len(), 2);
    assert_eq!(exported.bindings.len(), 3);

    let b = start().await;
    b.shared
        .import_definitions(&parse_definitions(&text).expect("reparse"))
        .await
        .expect("import into a second broker");
    let again = b.shared.export_definitions(ExportScope::All);
    assert_eq!(again, exported);
    // Importing the same document again changes nothing (additive, idempotent).
    b.shared.import_definitions(&again).await.expect("reimport");
    assert_eq!(b.shared.export_definitions(ExportScope::All), exported);
    // The hash survived the trip: alice still logs in on the second broker.
    let c = connect_as(b.addr, "alice", "s3cret-pass", "celery-vh")
        .await
        .expect("login");
    c.close(200, "bye".into()).await.ok();
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn bad_definitions_are_refused_with_the_entry_named_and_nothing_applied() {
    let b = start().await;
    let cases: &[(&str, &str)] = &[
        (
            r#"{"queues": [{"name": "q", "vhost": "nope"}]}"#,
            "queues[0] 'q' in vhost 'nope': vhost 'nope' does not exist",
        ),
        (
            r#"{"users": [{"name": "u", "password_hash": "xx", "hashing_algorithm": "rabbit_password_hashing_md5"}]}"#,
            "users[0] 'u'",
        ),
        (
            r#"{"users": [{"name": "u", "password_hash": "bm90IGEgaGFzaA=="}]}"#,
            "password_hash has",
        ),
        (
            r#"{"permissions": [{"user": "ghost", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"}]}"#,
            "user 'ghost' does not exist",
        ),
        (
            r#"{"permissions": [{"user": "guest", "vhost": "/", "configure": "(", "write": ".*", "read": ".*"}]}"#,
            "invalid configure regex",
        ),
        (
            r#"{"policies": [{"vhost": "/", "name": "p", "pattern": "", "definition": {"ha-mode": "exactly"}}]}"#,
            "policies[0] 'p' in vhost '/': ha-params",
        ),
        (
            r#"{"exchanges": [{"name": "x", "vhost": "/", "type": "x-weird"}]}"#,
            "unknown exchange type 'x-weird'",
        ),
        (
            r#"{"queues": [{"name": "q", "vhost": "/", "arguments": {"x-max-priority": 1000}}]}"#,
            "queues[0] 'q'",
        ),
        (
            r#"{"bindings": [{"source": "missing", "vhost": "/", "destination": "q", "destination_type": "queue"}]}"#,
            "source exchange 'missing' does not exist",
        ),
        (
            r#"{"bindings": [{"source": "amq.direct", "vhost": "/", "destination": "q", "destination_type": "queue"}]}"#,
            "destination queue 'q' does not exist",
        ),
        (
            r#"{"exchanges": [{"name": "amq.mine", "vhost": "/", "type": "direct"}]}"#,
            "reserved",
        ),
        (
            r#"{"vhosts": [{"name": "v"}], "queues": [{"name": 5, "vhost": "v"}]}"#,
            "queues[0]",
        ),
    ];
    let before = b.shared.export_definitions(ExportScope::All);
    for (doc, want) in cases {
        let err = match parse_definitions(doc.as_bytes()) {
            Err(e) => e,
            Ok(d) => b.shared.import_definitions(&d).await.expect_err(doc),
        };
        let DefError::Invalid(msg) = err else {
            panic!("{doc}: expected Invalid, got {err:?}");
        };
        assert!(msg.contains(want), "{doc}\n  got: {msg}\n  want: {want}");
    }
    // A document with a valid vhost followed by a bad queue leaves no trace of the vhost.
    let d = parse_definitions(
        br#"{"vhosts": [{"name": "half"}], "queues": [{"name": "q", "vhost": "half", "arguments": {"x-overflow": "sideways"}}]}"#,
    )
    .expect("parse");
    assert!(b.shared.import_definitions(&d).await.is_err());
    assert!(b.shared.vhost("half").is_none());
    assert_eq!(b.shared.export_definitions(ExportScope::All), before);
    b.shutdown().await;
}

#[tokio::test]
async fn api_manages_vhosts_users_permissions_and_policies() {
    let b = start().await;
    let s = &b.shared;
    assert!(s
        .add_vhost("apps", VhostMeta::default())
        .await
        .expect("add"));
    assert!(!s
        .add_vhost("apps", VhostMeta::default())
        .await
        .expect("again"));
    assert!(matches!(
        s.add_vhost("", VhostMeta::default()).await,
        Err(DefError::Invalid(_))
    ));
    assert!(s
        .put_user(
            "bob",
            Some(PasswordHash::new("pw1")),
            vec!["monitoring".into()]
        )
        .await
        .expect("user"));
    assert_eq!(
        s.set_permissions(
            "bob",
            "apps",
            PermissionSpec {
                configure: "(".into(),
                ..PermissionSpec::all()
            }
        )
        .await,
        Err(DefError::Invalid(
            "invalid configure regex '(': regex parse error:\n    (\n    ^\nerror: unclosed group"
                .into()
        ))
    );
    assert!(matches!(
        s.set_permissions("nobody", "apps", PermissionSpec::all())
            .await,
        Err(DefError::NotFound(_))
    ));
    assert!(matches!(
        s.set_permissions("bob", "nowhere", PermissionSpec::all())
            .await,
        Err(DefError::NotFound(_))
    ));
    // No permissions yet: access to the vhost refused.
    assert!(connect_as(b.addr, "bob", "pw1", "apps").await.is_err());
    s.set_permissions("bob", "apps", PermissionSpec::all())
        .await
        .expect("perms");
    let c = connect_as(b.addr, "bob", "pw1", "apps")
        .await
        .expect("bob in apps");
    c.close(200, "bye".into()).await.ok();
    s.change_password("bob", "pw2").await.expect("change");
    assert!(connect_as(b.addr, "bob", "pw1", "apps").await.is_err());
    connect_as(b.addr, "bob", "pw2", "apps")
        .await
        .expect("new password")
        .close(200, "bye".into())
        .await
        .ok();
    s.set_user_tags("bob", vec!["administrator".into()])
        .await
        .expect("tags");
    assert_eq!(s.auth.user("bob").expect("bob").tags, vec!["administrator"]);
    // put_user without a credential keeps the password.
    s.put_user("bob", None, vec![]).await.expect("retag");
    connect_as(b.addr, "bob", "pw2", "apps")
        .await
        .expect("kept")
        .close(200, "bye".into())
        .await
        .ok();

    s.set_policy(ha_policy("apps")).await.expect("policy");
    let mut bad = ha_policy("apps");
    bad.definition
        .insert("ha-sync-mode".into(), "sometimes".into());
    assert!(
        matches!(s.set_policy(bad).await, Err(DefError::Invalid(m)) if m.contains("ha-sync-mode"))
    );
    assert!(matches!(
        s.set_policy(ha_policy("nowhere")).await,
        Err(DefError::NotFound(_))
    ));
    assert_eq!(s.policies.list(Some("apps")).len(), 1);
    s.clear_policy("apps", "ha-all").await.expect("clear");
    assert!(matches!(
        s.clear_policy("apps", "ha-all").await,
        Err(DefError::NotFound(_))
    ));

    s.clear_permissions("bob", "apps")
        .await
        .expect("clear perms");
    assert!(matches!(
        s.clear_permissions("bob", "apps").await,
        Err(DefError::NotFound(_))
    ));
    s.delete_user("bob").await.expect("delete user");
    assert!(matches!(
        s.delete_user("bob").await,
        Err(DefError::NotFound(_))
    ));
    assert!(connect_as(b.addr, "bob", "pw2", "apps").await.is_err());
    b.shutdown().await;
}

#[tokio::test]
async fn deleting_a_vhost_closes_its_connections_and_deletes_its_queues() {
    let b = start().await;
    let s = &b.shared;
    s.add_vhost("doomed", VhostMeta::default())
        .await
        .expect("add");
    s.set_permissions("guest", "doomed", PermissionSpec::all())
        .await
        .expect("perms");
    s.set_policy(ha_policy("doomed")).await.expect("policy");
    let c = connect_as(b.addr, "guest", "guest", "doomed")
        .await
        .expect("connect");
    let ch = c.create_channel().await.expect("channel");
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    // Persistent messages in the durable queue: the store keeps them until the vhost goes.
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            "dq".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    assert_eq!(s.store.stored_messages("doomed", "dq"), 5);
    let q = s
        .vhost("doomed")
        .expect("vhost")
        .queue("dq")
        .expect("queue");
    // Another vhost's connection is untouched.
    let (other, other_ch) = b.channel().await;

    s.delete_vhost("doomed").await.expect("delete");
    assert!(s.vhost("doomed").is_none());
    assert!(s.auth.permissions("guest", "doomed").is_none());
    assert!(s.policies.list(Some("doomed")).is_empty());
    // The connection is closed by the broker (320), within a bound.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while c.status().connected() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connection still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The queue actor is gone (its mailbox closed).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !q.is_gone() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its stored messages are released with it (a queue-delete record, segments reclaimable).
    assert_eq!(s.store.stored_messages("doomed", "dq"), 0);
    assert_eq!(
        s.delete_vhost("doomed").await,
        Err(DefError::NotFound("vhost 'doomed' does not exist".into()))
    );
    assert!(connect_as(b.addr, "guest", "guest", "doomed")
        .await
        .is_err());
    assert!(other.status().connected());
    declare(&other_ch, "still-fine", FieldTable::default()).await;
    let exported = s.export_definitions(ExportScope::Durable);
    assert!(exported.vhosts.iter().all(|v| v.name != "doomed"));
    assert!(exported.queues.iter().all(|q| q.vhost != "doomed"));
    b.shutdown().await;
}

// === persistence ===

fn file_inode(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir.join("definitions.json"))
        .expect("definitions.json exists")
        .ino()
}

#[tokio::test]
async fn idempotent_redeclare_does_not_rewrite_the_file_and_transients_never_do() {
    let b = start().await;
    let dir = b.data.path().to_owned();
    let ino0 = file_inode(&dir);
    let (_c, ch) = b.channel().await;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("dq".into(), durable, FieldTable::default())
        .await
        .expect("declare");
    let ino1 = file_inode(&dir);
    assert_ne!(ino0, ino1, "a new durable queue rewrites the file");
    // Celery-style redeclare on every connect: no write.
    for _ in 0..3 {
        ch.queue_declare("dq".into(), durable, FieldTable::default())
            .await
            .expect("redeclare");
    }
    ch.queue_declare(
        "tq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("transient");
    ch.exchange_declare(
        "tx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("transient exchange");
    ch.queue_bind(
        "dq".into(),
        "tx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind from transient");
    assert_eq!(file_inode(&dir), ino1, "nothing durable changed");
    let text = std::fs::read_to_string(dir.join("definitions.json")).expect("read");
    assert!(text.contains("\"dq\""));
    assert!(!text.contains("\"tq\"") && !text.contains("\"tx\""));
    b.shutdown().await;
}

#[tokio::test]
async fn definitions_survive_restart_of_the_binary_and_transients_do_not() {
    let data = tempfile::tempdir().expect("tempdir");
    // Run 1, in process: everything through the API and AMQP.
    let mut cfg = Config::for_tests();
    cfg.data_dir = data.path().to_owned();
    let bound = warren_broker::Broker::bind(cfg).await.expect("bind");
    let addr = bound.amqp_addrs[0];
    let s = bound.shared.clone();
    let token = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(bound.run(token.clone()));
    s.add_vhost(
        "billing",
        VhostMeta {
            description: "money".into(),
            tags: vec!["prod".into()],
        },
    )
    .await
    .expect("vhost");
    s.put_user(
        "carol",
        Some(PasswordHash::new("c-pass")),
        vec!["management".into()],
    )
    .await
    .expect("user");
    s.set_permissions(
        "carol",
        "billing",
        PermissionSpec {
            configure: "^c\\.".into(),
            write: ".*".into(),
            read: ".*".into(),
        },
    )
    .await
    .expect("perms");
    s.set_policy(ha_policy("billing")).await.expect("policy");
    let c = connect_as(addr, "carol", "c-pass", "billing")
        .await
        .expect("carol");
    let ch = c.create_channel().await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "c.events".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("durable exchange");
    ch.queue_declare(
        "c.invoices".into(),
        durable,
        table(vec![("x-max-priority", 5u8.into())]),
    )
    .await
    .expect("durable queue");
    ch.queue_bind(
        "c.invoices".into(),
        "c.events".into(),
        "invoice.*".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.queue_declare(
        "c.scratch".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("transient queue");
    ch.exchange_declare(
        "c.tmp".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("transient exchange");
    c.close(200, "bye".into()).await.ok();
    token.cancel();
    run.await.expect("run 1 ended");
    drop(s);

    // Run 2: the real binary on the same data dir.
    let data_dir = data.path().to_str().expect("utf-8 path");
    let p = support::proc::spawn(
        ["--amqp", "127.0.0.1:0", "--data-dir", data_dir],
        &[],
        &["amqp"],
    )
    .await;
    let addr: SocketAddr = p.addr("amqp").parse().expect("amqp address");
    let c = connect_as(addr, "carol", "c-pass", "billing")
        .await
        .expect("carol, her vhost and permissions came back");
    let ch = c.create_channel().await.expect("channel");
    passive_exchange(&ch, "c.events")
        .await
        .expect("durable exchange back");
    passive_queue(&ch, "c.invoices")
        .await
        .expect("durable queue back");
    // The binding is back: a publish through the exchange lands in the queue.
    publish(&ch, "c.events", "invoice.paid", b"inv-1").await;
    assert_eq!(
        get_body(&ch, "c.invoices").await.as_deref(),
        Some(&b"inv-1"[..])
    );
    let e = passive_queue(&ch, "c.scratch")
        .await
        .expect_err("transient queue gone");
    assert_eq!(amqp_code(&e), Some(404));
    let ch = c.create_channel().await.expect("channel");
    let e = passive_exchange(&ch, "c.tmp")
        .await
        .expect_err("transient exchange gone");
    assert_eq!(amqp_code(&e), Some(404));
    // Permissions came back as set: configure only on ^c\.
    let ch = c.create_channel().await.expect("channel");
    let e = ch
        .queue_declare(
            "elsewhere".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("configure refused");
    assert_eq!(amqp_code(&e), Some(403));
    c.close(200, "bye".into()).await.ok();
    p.term().await;

    // Run 3, in process again: the API sees the same definitions (and the binary's run did
    // not lose any of them).
    let mut cfg = Config::for_tests();
    cfg.data_dir = data.path().to_owned();
    let bound = warren_broker::Broker::bind(cfg).await.expect("bind again");
    let s = bound.shared.clone();
    let meta = s.auth.vhosts_meta();
    let billing = meta.iter().find(|(n, _)| n == "billing").expect("billing");
    assert_eq!(billing.1.description, "money");
    assert_eq!(billing.1.tags, vec!["prod"]);
    assert_eq!(
        s.auth.user("carol").expect("carol").tags,
        vec!["management"]
    );
    assert_eq!(
        s.auth
            .permissions("carol", "billing")
            .expect("perms")
            .spec
            .configure,
        "^c\\."
    );
    let pol = s.policies.get("billing", "ha-all").expect("policy back");
    assert_eq!(pol.definition["ha-mode"], "all");
    let q = s
        .vhost("billing")
        .expect("vhost")
        .queue("c.invoices")
        .expect("queue");
    assert_eq!(q.args.max_priority, Some(5));
    assert!(s
        .vhost("billing")
        .expect("vhost")
        .queue("c.scratch")
        .is_none());
    // The implicit guest from the first start is still there (and only created once).
    assert!(s.auth.user("guest").is_some());
    drop(bound);
}

#[tokio::test]
async fn deleted_guest_stays_deleted_and_config_users_are_applied_on_top() {
    let data = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_tests();
    cfg.data_dir = data.path().to_owned();
    {
        let bound = warren_broker::Broker::bind(cfg.clone())
            .await
            .expect("bind");
        bound
            .shared
            .put_user("admin", Some(PasswordHash::new("a")), vec![])
            .await
            .expect("admin");
        bound
            .shared
            .delete_user("guest")
            .await
            .expect("delete guest");
    }
    let bound = warren_broker::Broker::bind(cfg.clone())
        .await
        .expect("bind 2");
    assert!(
        bound.shared.auth.user("guest").is_none(),
        "implicit guest not recreated"
    );
    assert!(bound.shared.auth.user("admin").is_some());
    drop(bound);
    // A user named in the config file is (re)applied with the config's password.
    cfg.users = vec![warren_broker::config::UserConfig {
        name: "ops".into(),
        password: "ops-pass".into(),
        tags: vec!["monitoring".into()],
    }];
    let bound = warren_broker::Broker::bind(cfg.clone())
        .await
        .expect("bind 3");
    let ops = bound.shared.auth.user("ops").expect("ops");
    assert!(ops.password.verify("ops-pass"));
    assert!(
        bound.shared.auth.user("admin").is_some(),
        "stored users kept"
    );
    drop(bound);
    // Unchanged config password: the stored hash is kept, the file is not rewritten.
    let ino = file_inode(data.path());
    let bound = warren_broker::Broker::bind(cfg).await.expect("bind 4");
    assert_eq!(
        bound.shared.auth.user("ops").expect("ops").password,
        ops.password
    );
    assert_eq!(file_inode(data.path()), ino);
}

#[tokio::test]
async fn corrupt_definitions_file_refuses_start_with_a_clear_message() {
    let data = tempfile::tempdir().expect("tempdir");
    let path = data.path().join("definitions.json");
    std::fs::write(
        &path,
        b"{\"vhosts\": [{\"name\": \"/\"}], \"queues\": [{\"na",
    )
    .expect("write");
    // The binary exits non-zero and says which file and what is wrong.
    let out = Command::new(env!("CARGO_BIN_EXE_warren-broker"))
        .args(["--amqp", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .stdin(Stdio::null())
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt definitions file"), "{err}");
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains("not valid JSON"), "{err}");
    assert!(!err.contains("definitions loaded"), "{err}");
    // The file is left as it was for the operator to repair.
    assert!(std::fs::read(&path).expect("read").ends_with(b"\"na"));

    // Well-formed JSON with a bad entry: also refused, naming the entry.
    std::fs::write(
        &path,
        br#"{"vhosts": [{"name": "/"}],
             "queues": [{"name": "q", "vhost": "/", "arguments": {"x-max-priority": "high"}}]}"#,
    )
    .expect("write");
    let mut cfg = Config::for_tests();
    cfg.data_dir = data.path().to_owned();
    let e = warren_broker::Broker::bind(cfg)
        .await
        .err()
        .expect("refused");
    let msg = e.to_string();
    assert!(msg.contains("queues[0] 'q' in vhost '/'"), "{msg}");
    assert!(msg.contains("x-max-priority"), "{msg}");
}
