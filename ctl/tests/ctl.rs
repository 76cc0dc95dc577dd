//! `warren-ctl` end to end: the built binary against a real warren-broker
//! process with its management API on port 0 (address read from the log).
//! Queues and messages come from a real AMQP client (lapin).
//!
//! Needs the `warren-broker` binary of the same build, which cargo does not build
//! for this crate's tests (`CARGO_BIN_EXE_*` exists only for binaries of the same
//! package, and a dev-dependency on warren-broker would not build its binaries):
//! build it first with `cargo build -p warren-broker` (`scripts/test` runs
//! `cargo build --workspace --bins` before the tests). It is looked up next to
//! this test's executable (`target/<profile>/deps/ctl-*` ->
//! `target/<profile>/warren-broker`), or taken from `WARREN_BROKER_BIN` as the
//! Python tests do.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::Value;

const CTL: &str = env!("CARGO_BIN_EXE_warren-ctl");
const SEED_POLICY: &str = r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#;

/// The warren-broker binary: `WARREN_BROKER_BIN`, else the one in this test's
/// target directory; panics with how to build it when it is missing.
fn broker_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("WARREN_BROKER_BIN") {
        return PathBuf::from(bin);
    }
    let exe = std::env::current_exe().expect("path of the test executable");
    // target/<profile>/deps/<this test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable in target/<profile>/deps");
    let bin = profile_dir.join(format!("warren-broker{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "warren-broker binary not found at {}: run `cargo build -p warren-broker` first \
         (scripts/test builds every binary), or set WARREN_BROKER_BIN",
        bin.display()
    );
    bin
}

/// A broker process with AMQP and management listeners on port 0.
struct Node {
    child: Child,
    amqp: String,
    mgmt: String,
    dir: PathBuf,
}

impl Node {
    fn start() -> Node {
        let dir = std::env::temp_dir().join(format!(
            "warren-ctl-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut child = Command::new(broker_bin())
            .args([
                "--amqp",
                "127.0.0.1:0",
                "--mgmt",
                "127.0.0.1:0",
                "--data-dir",
            ])
            .arg(dir.join("data"))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warren-broker");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        // Reads the listening lines, then keeps draining so the broker never blocks on the pipe.
        std::thread::spawn(move || {
            let re =
                regex::Regex::new(r"listening (?:proto|listener)=(\S+) addr=(\S+)").expect("regex");
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(c) = re.captures(&line) {
                    let _ = tx.send((c[1].to_string(), c[2].to_string()));
                }
            }
        });
        let (mut amqp, mut mgmt) = (None, None);
        while amqp.is_none() || mgmt.is_none() {
            match rx.recv_timeout(Duration::from_secs(15)) {
                Ok((proto, addr)) if proto == "amqp" => amqp = amqp.or(Some(addr)),
                Ok((proto, addr)) if proto == "mgmt" => mgmt = mgmt.or(Some(addr)),
                Ok(_) => {}
                Err(e) => {
                    let _ = child.kill();
                    panic!("broker did not log its amqp and mgmt listeners: {e}");
                }
            }
        }
        Node {
            child,
            amqp: amqp.expect("amqp"),
            mgmt: format!("http://{}", mgmt.expect("mgmt")),
            dir,
        }
    }

    fn ctl(&self, args: &[&str]) -> Out {
        let mut full = vec!["-n", self.mgmt.as_str()];
        full.extend_from_slice(args);
        ctl(&full)
    }

    async fn amqp(&self) -> Connection {
        Connection::connect(
            &format!("amqp://guest:guest@{}/%2f", self.amqp),
            ConnectionProperties::default(),
        )
        .await
        .expect("AMQP connect")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    #[track_caller]
    fn ok(self) -> Out {
        assert_eq!(self.code, 0, "warren-ctl failed: {self:?}");
        self
    }
    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).expect("JSON output")
    }
}

fn ctl(args: &[&str]) -> Out {
    let out = Command::new(CTL)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run warren-ctl");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn seed_set_policy_command_is_stored_and_listed() {
    let node = Node::start();
    let out = node.ctl(&["set_policy", "ha-all", "", SEED_POLICY]).ok();
    assert_eq!(
        out.stdout,
        format!(
            "Setting policy \"ha-all\" for pattern \"\" to \"{SEED_POLICY}\" with priority \"0\" for vhost \"/\" ...\n"
        )
    );
    let out = node.ctl(&["list_policies"]).ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines[0], "Listing policies for vhost \"/\" ...");
    assert_eq!(
        lines[1],
        "vhost\tname\tpattern\tapply-to\tdefinition\tpriority"
    );
    assert_eq!(
        lines[2..],
        [format!("/\tha-all\t\tall\t{SEED_POLICY}\t0").as_str()]
    );

    let out = node.ctl(&["list_policies", "--formatter", "json"]).ok();
    let v = out.json();
    let list = v.as_array().expect("array");
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["name"], "ha-all");
    assert_eq!(list[0]["pattern"], "");
    assert_eq!(list[0]["apply-to"], "all");
    assert_eq!(list[0]["priority"], 0);
    let def: Value = serde_json::from_str(list[0]["definition"].as_str().expect("definition text"))
        .expect("json");
    assert_eq!(
        def,
        serde_json::json!({"ha-mode": "all", "ha-sync-mode": "automatic"})
    );

    // Options, a second policy, and clear_policy.
    node.ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "--priority",
        "5",
        "lim",
        "^lim\\.",
        r#"{"max-length":10}"#,
    ])
    .ok();
    let out = node.ctl(&["-q", "list_policies"]).ok();
    assert!(
        out.stdout
            .contains("/\tlim\t^lim\\.\tqueues\t{\"max-length\":10}\t5\n"),
        "{}",
        out.stdout
    );
    node.ctl(&["clear_policy", "lim"]).ok();
    let out = node.ctl(&["-q", "list_policies"]).ok();
    assert!(!out.stdout.contains("\tlim\t"), "{}", out.stdout);
    let out = node.ctl(&["clear_policy", "lim"]);
    assert_eq!(out.code, 70, "{out:?}");
    // A definition that is not JSON is refused before any request.
    let out = node.ctl(&["set_policy", "bad", "", "{not json"]);
    assert_eq!(out.code, 65, "{out:?}");
    assert!(out.stderr.contains("not valid JSON"), "{}", out.stderr);
}

#[tokio::test]
async fn lists_show_what_an_amqp_client_made() {
    let node = Node::start();
    let conn = node.amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "ctl.q1".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    for body in [&b"one"[..], b"two"] {
        ch.basic_publish(
            "".into(),
            "ctl.q1".into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("publish done");
    }
    ch.queue_declare(
        "ctl.q2".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let _consumer = ch
        .basic_consume(
            "ctl.q2".into(),
            "ctl-tag".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");

    let out = node
        .ctl(&["list_queues", "name", "messages", "consumers", "durable"])
        .ok();
    let mut lines: Vec<&str> = out.stdout.lines().collect();
    assert_eq!(lines.remove(0), "Listing queues for vhost / ...");
    assert_eq!(lines.remove(0), "name\tmessages\tconsumers\tdurable");
    lines.sort();
    assert_eq!(lines, ["ctl.q1\t2\t0\ttrue", "ctl.q2\t0\t1\tfalse"]);

    // -q drops the informational line but keeps the header, as rabbitmqctl does.
    let out = node.ctl(&["list_queues", "-q"]).ok();
    assert!(out.stdout.starts_with("name\tmessages\n"), "{}", out.stdout);

    let out = node
        .ctl(&["--formatter", "json", "list_queues", "name", "messages"])
        .ok();
    let v = out.json();
    let q1 = v
        .as_array()
        .expect("array")
        .iter()
        .find(|q| q["name"] == "ctl.q1")
        .expect("ctl.q1 listed");
    assert_eq!(q1, &serde_json::json!({"name": "ctl.q1", "messages": 2}));

    let out = node.ctl(&["-q", "list_exchanges"]).ok();
    assert!(out.stdout.starts_with("name\ttype\n"), "{}", out.stdout);
    assert!(out.stdout.contains("amq.topic\ttopic\n"), "{}", out.stdout);
    assert!(
        out.stdout.contains("\n\tdirect\n"),
        "default exchange: {}",
        out.stdout
    );

    let out = node.ctl(&["-q", "list_bindings"]).ok();
    assert!(
        out.stdout
            .contains("\texchange\tctl.q1\tqueue\tctl.q1\t[]\n"),
        "{}",
        out.stdout
    );

    let out = node.ctl(&["-q", "list_connections", "user", "state"]).ok();
    assert_eq!(out.stdout, "user\tstate\nguest\trunning\n");

    let out = node
        .ctl(&["-q", "list_channels", "user", "consumer_count"])
        .ok();
    assert_eq!(out.stdout, "user\tconsumer_count\nguest\t1\n");

    let out = node
        .ctl(&[
            "-q",
            "list_consumers",
            "queue_name",
            "consumer_tag",
            "ack_required",
        ])
        .ok();
    assert_eq!(
        out.stdout,
        "queue_name\tconsumer_tag\tack_required\nctl.q2\tctl-tag\ttrue\n"
    );

    // sync_queue and cancel_sync_queue: a single node has no mirrors to synchronise, and
    // says so by succeeding, as RabbitMQ does for an unmirrored queue.
    let out = node.ctl(&["sync_queue", "ctl.q1"]).ok();
    assert_eq!(
        out.stdout,
        "Synchronising queue 'ctl.q1' in vhost '/' ...\n"
    );
    let out = node.ctl(&["cancel_sync_queue", "ctl.q1"]).ok();
    assert_eq!(
        out.stdout,
        "Stopping synchronising queue 'ctl.q1' in vhost '/' ...\n"
    );

    // purge_queue and delete_queue.
    let out = node.ctl(&["purge_queue", "ctl.q1"]).ok();
    assert_eq!(out.stdout, "Purging queue 'ctl.q1' in vhost '/' ...\n");
    let q = ch
        .queue_declare(
            "ctl.q1".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(q.message_count(), 0);
    let out = node.ctl(&["delete_queue", "ctl.q1"]).ok();
    assert_eq!(
        out.stdout,
        "Deleting queue 'ctl.q1' on vhost '/' ...\nQueue was successfully deleted with 0 ready messages\n"
    );
    let out = node.ctl(&["-q", "list_queues"]).ok();
    assert!(!out.stdout.contains("ctl.q1"), "{}", out.stdout);
    let out = node.ctl(&["delete_queue", "ctl.q1"]);
    assert_eq!(out.code, 70, "{out:?}");
    assert!(out.stderr.contains("not found"), "{}", out.stderr);
    conn.close(200, "bye".into()).await.expect("close");
}

#[test]
fn users_vhosts_and_permissions() {
    let node = Node::start();
    let out = node.ctl(&["add_user", "bob", "pw1"]).ok();
    assert!(
        out.stdout.starts_with("Adding user \"bob\" ...\n"),
        "{}",
        out.stdout
    );
    assert_eq!(node.ctl(&["add_user", "bob", "again"]).code, 70);
    node.ctl(&["set_user_tags", "bob", "administrator"]).ok();
    let out = node.ctl(&["-q", "list_users"]).ok();
    assert!(
        out.stdout.contains("bob\t[administrator]\n"),
        "{}",
        out.stdout
    );
    node.ctl(&["set_permissions", "-p", "/", "bob", ".*", ".*", ".*"])
        .ok();
    let out = node.ctl(&["-q", "list_permissions"]).ok();
    assert!(out.stdout.contains("bob\t.*\t.*\t.*\n"), "{}", out.stdout);

    // The new user's credentials work, and change_password replaces them.
    let as_bob = |pw: &str| ctl(&["-n", &node.mgmt, "-u", "bob", "-p", pw, "-q", "list_vhosts"]);
    assert_eq!(as_bob("pw1").ok().stdout, "name\n/\n");
    node.ctl(&["change_password", "bob", "pw2"]).ok();
    let out = as_bob("pw1");
    assert_eq!(out.code, 77, "{out:?}");
    assert!(
        out.stderr.contains("authentication failed"),
        "{}",
        out.stderr
    );
    as_bob("pw2").ok();
    // set_user_tags kept the password.
    node.ctl(&["set_user_tags", "bob", "administrator", "monitoring"])
        .ok();
    as_bob("pw2").ok();

    node.ctl(&["add_vhost", "v2"]).ok();
    let out = node.ctl(&["--formatter", "json", "list_vhosts"]).ok();
    let vhosts = out.json();
    let names: Vec<&str> = vhosts
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    assert!(names.contains(&"v2") && names.contains(&"/"), "{names:?}");
    node.ctl(&["delete_vhost", "v2"]).ok();
    assert_eq!(node.ctl(&["delete_vhost", "v2"]).code, 70);

    node.ctl(&["delete_user", "bob"]).ok();
    let out = node.ctl(&["delete_user", "bob"]);
    assert_eq!(out.code, 67, "{out:?}");
    assert!(
        out.stderr.contains("User \"bob\" does not exist"),
        "{}",
        out.stderr
    );
    assert_eq!(node.ctl(&["change_password", "bob", "x"]).code, 67);
}

#[test]
fn definitions_export_and_import() {
    let node = Node::start();
    node.ctl(&["set_policy", "ha-all", "", SEED_POLICY]).ok();
    node.ctl(&["add_vhost", "exported"]).ok();
    let file = node.dir.join("defs.json");
    let path = file.to_str().expect("utf-8 path");
    node.ctl(&["export_definitions", path]).ok();
    let defs: Value =
        serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
    let policies = defs["policies"].as_array().expect("policies");
    assert!(policies.iter().any(|p| p["name"] == "ha-all"), "{defs}");
    // `-` writes the same document to stdout.
    let out = node.ctl(&["export_definitions", "-"]).ok();
    let again: Value = serde_json::from_str(&out.stdout).expect("json on stdout");
    assert_eq!(again["policies"], defs["policies"]);

    node.ctl(&["clear_policy", "ha-all"]).ok();
    node.ctl(&["delete_vhost", "exported"]).ok();
    node.ctl(&["import_definitions", path]).ok();
    let out = node.ctl(&["-q", "list_policies"]).ok();
    assert!(
        out.stdout
            .contains(&format!("/\tha-all\t\tall\t{SEED_POLICY}\t0")),
        "{}",
        out.stdout
    );
    let out = node.ctl(&["-q", "list_vhosts"]).ok();
    assert!(
        out.stdout.lines().any(|l| l == "exported"),
        "{}",
        out.stdout
    );

    let missing = node.dir.join("nope.json");
    let out = node.ctl(&["import_definitions", missing.to_str().expect("path")]);
    assert_eq!(out.code, 66, "{out:?}");
    let bad = node.dir.join("bad.json");
    std::fs::write(&bad, "{ not json").expect("write");
    assert_eq!(
        node.ctl(&["import_definitions", bad.to_str().expect("path")])
            .code,
        65
    );
}

#[test]
fn app_stop_start_status_and_await_startup() {
    let node = Node::start();
    node.ctl(&["await_startup", "--timeout", "10"]).ok();
    let out = node.ctl(&["--formatter", "json", "status"]).ok();
    let status = out.json();
    let name = status["node"].as_str().expect("node name").to_string();
    assert!(name.starts_with("warren@"), "{status}");
    let rss = status["mem_rss"].as_u64().expect("mem_rss");
    assert!(rss > 1_000_000, "the process's resident memory: {status}");
    // Named by the node's name, not the URL it was reached at; memory is the process's.
    let out = node.ctl(&["status"]).ok();
    assert!(
        out.stdout
            .starts_with(&format!("Status of node {name} ...\n")),
        "{}",
        out.stdout
    );
    let used = out
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Total memory used: "))
        .unwrap_or_else(|| panic!("no memory line: {}", out.stdout));
    assert!(used.ends_with("gb (resident, process)"), "{used}");
    let gb: f64 = used
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .expect("a number of gb");
    assert!(gb > 0.0, "not the message bytes of an idle node: {used}");
    assert!(out.stdout.contains("Listeners"), "{}", out.stdout);
    assert!(out.stdout.contains("protocol: amqp"), "{}", out.stdout);

    let out = node.ctl(&["cluster_status"]).ok();
    assert!(out.stdout.contains("Running Nodes\n\n"), "{}", out.stdout);
    let out = node.ctl(&["--formatter", "json", "cluster_status"]).ok();
    let v = out.json();
    assert_eq!(
        v["running_nodes"].as_array().expect("running").len(),
        1,
        "{v}"
    );

    let out = node.ctl(&["stop_app"]).ok();
    assert!(
        out.stdout
            .starts_with("Stopping warren application on node"),
        "{}",
        out.stdout
    );
    // Stopped: the API answers but await_startup keeps waiting, until its timeout.
    let out = node.ctl(&["await_startup", "--timeout", "1"]);
    assert_eq!(out.code, 75, "{out:?}");
    assert!(out.stderr.contains("stopped"), "{}", out.stderr);
    node.ctl(&["start_app"]).ok();
    node.ctl(&["await_startup", "--timeout", "10"]).ok();
}

#[test]
fn clustering_verbs_on_a_node_that_is_not_clustered_say_how_to_cluster_it() {
    let node = Node::start();
    node.ctl(&["stop_app"]).ok();
    let out = node.ctl(&["join_cluster", "warren@127.0.0.1:1"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("--cluster-listen"), "{}", out.stderr);
    let out = node.ctl(&["forget_cluster_node", "warren@elsewhere"]);
    assert_ne!(out.code, 0, "{out:?}");
    assert!(out.stderr.contains("--cluster-listen"), "{}", out.stderr);
    node.ctl(&["start_app"]).ok();
}

#[test]
fn help_and_version_exit_0_and_state_the_default_target() {
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["-n", "warren@x", "--help"],
    ] {
        let out = Command::new(CTL)
            .args(args)
            .output()
            .expect("run warren-ctl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}");
        assert!(stdout.starts_with("Usage: warren-ctl"), "{stdout}");
        assert!(
            stdout.contains("Without -n: http://localhost:15672, as guest/guest"),
            "{stdout}"
        );
        assert!(stdout.contains("list_queues"), "{stdout}");
    }
    for flag in ["--version", "-V"] {
        let out = Command::new(CTL)
            .arg(flag)
            .output()
            .expect("run warren-ctl");
        assert_eq!(out.status.code(), Some(0), "{flag}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("warren-ctl {}\n", env!("CARGO_PKG_VERSION"))
        );
    }
}

#[test]
fn bad_arguments_exit_64_with_usage() {
    for args in [
        &[][..],
        &["no_such_verb"],
        &["set_policy", "only-a-name"],
        &["list_queues", "no_such_column"],
        &["add_user", "bob"],
        &["list_queues", "--formatter", "yaml"],
        &["--bogus-flag", "status"],
    ] {
        let out = ctl(args);
        assert_eq!(out.code, 64, "{args:?}: {out:?}");
        assert!(out.stderr.starts_with("Error: "), "{}", out.stderr);
        assert!(out.stderr.contains("Usage: warren-ctl"), "{}", out.stderr);
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
}

#[test]
fn unreachable_node_exits_69_and_await_startup_times_out() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = ctl(&["-n", &url, "list_queues"]);
    assert_eq!(out.code, 69, "{out:?}");
    assert!(
        out.stderr.contains("unable to reach node"),
        "{}",
        out.stderr
    );
    let out = ctl(&["-n", &url, "await_startup", "--timeout", "0.6"]);
    assert_eq!(out.code, 75, "{out:?}");
}

#[test]
fn wrong_password_exits_77() {
    let node = Node::start();
    let out = ctl(&[
        "-n",
        &node.mgmt,
        "-u",
        "guest",
        "-p",
        "wrong",
        "list_queues",
    ]);
    assert_eq!(out.code, 77, "{out:?}");
    assert!(
        out.stderr.contains("authentication failed"),
        "{}",
        out.stderr
    );
}

#[tokio::test]
async fn operator_policies_and_list_queues_show_the_policies_that_apply() {
    let node = Node::start();
    let conn = node.amqp().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "capped".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    for i in 0..5u8 {
        ch.basic_publish(
            "".into(),
            "capped".into(),
            BasicPublishOptions::default(),
            &[i],
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    node.ctl(&[
        "set_policy",
        "--apply-to",
        "queues",
        "cap",
        "^capped$",
        r#"{"max-length":3}"#,
    ])
    .ok();
    let out = node
        .ctl(&[
            "set_operator_policy",
            "--apply-to",
            "queues",
            "ops",
            "^cap",
            r#"{"max-length":2,"message-ttl":60000}"#,
        ])
        .ok();
    assert!(
        out.stdout.starts_with("Setting operator policy \"ops\""),
        "{}",
        out.stdout
    );
    // The queue is cut to the lower limit at once.
    let mut lines = String::new();
    for _ in 0..50 {
        lines = node
            .ctl(&[
                "-q",
                "list_queues",
                "name",
                "messages",
                "policy",
                "operator_policy",
            ])
            .ok()
            .stdout;
        if lines.contains("capped\t2\t") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(lines.contains("capped\t2\tcap\tops\n"), "{lines}");
    let v = node
        .ctl(&[
            "list_queues",
            "name",
            "effective_policy_definition",
            "--formatter",
            "json",
        ])
        .ok()
        .json();
    let q = v
        .as_array()
        .and_then(|a| a.iter().find(|q| q["name"] == "capped"))
        .expect("capped listed");
    assert_eq!(
        q["effective_policy_definition"],
        serde_json::json!({"max-length": 2, "message-ttl": 60000})
    );
    let out = node.ctl(&["-q", "list_operator_policies"]).ok();
    assert!(
        out.stdout
            .contains("/\tops\t^cap\tqueues\t{\"max-length\":2,\"message-ttl\":60000}\t0\n"),
        "{}",
        out.stdout
    );
    // Not an operator key: refused with the reason.
    let out = node.ctl(&[
        "set_operator_policy",
        "bad",
        ".",
        r#"{"dead-letter-exchange":"x"}"#,
    ]);
    assert_eq!(out.code, 70, "{out:?}");
    assert!(out.stderr.contains("not recognised"), "{}", out.stderr);
    node.ctl(&["clear_operator_policy", "ops"]).ok();
    let out = node.ctl(&["-q", "list_operator_policies"]).ok();
    assert!(!out.stdout.contains("ops"), "{}", out.stdout);
    let out = node.ctl(&["clear_operator_policy", "ops"]);
    assert_eq!(out.code, 70, "{out:?}");
}
