//! Users, vhosts and permission regexes from the config.

mod support;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use warren_broker::config::{Config, PermissionConfig, UserConfig};

#[tokio::test]
async fn configure_permission_regex_is_enforced_per_vhost() {
    let cfg = Config {
        users: vec![UserConfig {
            name: "alice".into(),
            password: "pw".into(),
            tags: vec![],
        }],
        vhosts: vec!["/".into(), "apps".into()],
        permissions: vec![PermissionConfig {
            user: "alice".into(),
            vhost: "apps".into(),
            configure: "^alice-".into(),
            write: ".*".into(),
            read: ".*".into(),
        }],
        ..Config::for_tests()
    };
    let b = support::start_with(cfg).await;
    // No permissions on "/": refused at connection.open.
    let e = Connection::connect(
        &format!("amqp://alice:pw@{}/%2f", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .expect_err("no access to /");
    assert_eq!(support::amqp_code(&e), Some(530));
    // guest is not configured any more.
    let e = Connection::connect(&b.uri(), ConnectionProperties::default())
        .await
        .expect_err("guest removed");
    assert_eq!(support::amqp_code(&e), Some(403));

    let c = Connection::connect(
        &format!("amqp://alice:pw@{}/apps", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .expect("alice on apps");
    let ch = c.create_channel().await.expect("ch");
    ch.queue_declare(
        "alice-q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("allowed name");
    let e = ch
        .queue_declare(
            "bob-q".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect_err("configure refused");
    assert_eq!(support::amqp_code(&e), Some(403));
    b.shutdown().await;
}

#[tokio::test]
async fn max_connections_refuses_extra_clients() {
    let b = support::start_with(Config {
        max_connections: 1,
        ..Config::for_tests()
    })
    .await;
    let first = b.connect().await;
    assert!(first.status().connected());
    let second = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        Connection::connect(&b.uri(), ConnectionProperties::default()),
    )
    .await
    .expect("refused promptly");
    let err = second.expect_err("second connection must be refused");
    assert_eq!(
        support::amqp_code(&err),
        Some(530),
        "refused with NOT_ALLOWED at connection.open: {err}"
    );
    assert!(
        err.to_string().contains("connection limit (1) is reached"),
        "{err}"
    );
    drop(first);
    b.shutdown().await;
}
