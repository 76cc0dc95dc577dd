//! Process level: the built binary, its log contract, --check-config, SIGHUP reload, SIGTERM drain.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const BIN: &str = env!("CARGO_BIN_EXE_warren-lb");

struct Proc {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn warren-lb");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stderr).lines();
            while let Ok(Some(l)) = r.next_line().await {
                eprintln!("[warren-lb] {l}");
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc { child, lines }
    }

    /// Waits for a stderr line containing `needle`.
    async fn line(&mut self, needle: &str) -> String {
        let fut = async {
            loop {
                match self.lines.recv().await {
                    Some(l) if l.contains(needle) => return l,
                    Some(_) => {}
                    None => panic!("warren-lb exited before logging `{needle}`"),
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .unwrap_or_else(|_| panic!("no `{needle}` in the log within {WAIT:?}"))
    }

    /// Reads `listening listener=<name> addr=<addr>` lines until `names` are all known.
    async fn addrs(&mut self, names: &[&str]) -> HashMap<String, SocketAddr> {
        let mut found = HashMap::new();
        while !names.iter().all(|n| found.contains_key(*n)) {
            let l = self.line("listening listener=").await;
            let (name, addr) = parse_listening(&l).expect("contract line");
            found.insert(name, addr);
        }
        found
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {pid}");
    }

    async fn exit_code(&mut self) -> Option<i32> {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("exited in time")
            .unwrap()
            .code()
    }
}

/// The contract of docs/CONTRACTS.md: `listening listener=(\S+) addr=(\S+)`.
fn parse_listening(line: &str) -> Option<(String, SocketAddr)> {
    let rest = &line[line.find("listening listener=")? + "listening listener=".len()..];
    let (name, rest) = rest.split_once(' ')?;
    let addr = rest.strip_prefix("addr=")?.split_whitespace().next()?;
    Some((name.to_string(), addr.parse().ok()?))
}

fn temp_file(tag: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-lb-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

fn lb_toml(backends: &[SocketAddr], extra_listener: Option<SocketAddr>) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    let mut t = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"amqp\"\nbind = \"127.0.0.1:0\"\nbackends = [{}]\ndrain_timeout = \"60s\"\n\n[listener.health]\ninterval = \"1h\"\n",
        list.join(", ")
    );
    if let Some(b) = extra_listener {
        t.push_str(&format!(
            "\n[[listener]]\nname = \"extra\"\nbind = \"127.0.0.1:0\"\nbackends = [\"{b}\"]\n"
        ));
    }
    t
}

async fn check_config(path: &Path) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(path)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_binary_reports_its_bound_addresses_and_proxies() {
    let b = echo_backend().await;
    let backend = b.addr.to_string();
    let mut p = Proc::spawn(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend,
        "--admin",
        "127.0.0.1:0",
        "--idle-timeout",
        "30s",
        "--reset-every",
        "1h",
        "--threads",
        "2",
        "--no-splice",
        "--seed",
        "7",
        "--max-connections",
        "20000",
    ]);
    let addrs = p.addrs(&["default", "admin"]).await;
    let mut s = connect_echo(addrs["default"], b"through the binary").await;
    roundtrip(&mut s, b"again").await;
    let (status, _) = http(addrs["admin"], "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let rules = get_json(addrs["admin"], "/listeners/default/faults").await;
    assert_eq!(rules[0]["every"], "1h");
    let l = get_json(addrs["admin"], "/listeners/default").await;
    assert_eq!(l["max_connections"], 20000);
    assert_eq!(l["idle_timeout"], "30s");
    drop(s);
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn check_config_exit_codes_and_messages() {
    let ok = temp_file("ok", &lb_toml(&["127.0.0.1:5672".parse().unwrap()], None));
    let (code, out, _) = check_config(&ok).await;
    assert_eq!(code, 0);
    assert!(out.contains("ok"), "{out}");

    let unknown = temp_file(
        "unknown",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\nidle_timout = \"5s\"\n",
    );
    let (code, _, err) = check_config(&unknown).await;
    assert_eq!(code, 1);
    assert!(err.contains("idle_timout"), "names the key: {err}");
    assert!(err.contains("unknown.toml"), "names the file: {err}");

    let bad_dur = temp_file(
        "baddur",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\nidle_timeout = \"5 parsecs\"\n",
    );
    let (code, _, err) = check_config(&bad_dur).await;
    assert_eq!(code, 1);
    assert!(err.contains("invalid duration `5 parsecs`"), "{err}");

    let range = temp_file(
        "range",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\nidle_timeout = \"2h\"\n",
    );
    let (code, _, err) = check_config(&range).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("idle_timeout") && err.contains("1s..3600s"),
        "{err}"
    );

    let dup = temp_file(
        "dup",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n",
    );
    let (code, _, err) = check_config(&dup).await;
    assert_eq!(code, 1);
    assert!(err.contains("`a` is used more than once"), "{err}");

    let (code, _, err) = check_config(Path::new("/nonexistent/lb.toml")).await;
    assert_eq!(code, 1);
    assert!(err.contains("cannot read /nonexistent/lb.toml"), "{err}");
}

#[tokio::test]
async fn a_bad_config_file_stops_startup_before_binding() {
    let bad = temp_file("startbad", "[[listener]]\nname = \"a\"\nbogus = 1\n");
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bogus"), "{err}");
    assert!(!err.contains("listening"), "{err}");
}

#[tokio::test]
async fn sighup_reload_keeps_open_connections_and_applies_the_new_backends() {
    let (a, b, c) = (
        echo_backend().await,
        echo_backend().await,
        echo_backend().await,
    );
    let path = temp_file("reload", &lb_toml(&[a.addr], None));
    let mut p = Proc::spawn(&["--config", path.to_str().unwrap()]);
    let addrs = p.addrs(&["amqp", "admin"]).await;
    let mut old = connect_echo(addrs["amqp"], b"before reload").await;
    assert_eq!(a.served(), 1);

    std::fs::write(&path, lb_toml(&[b.addr], Some(c.addr))).unwrap();
    p.signal("-HUP");
    let extra = p.addrs(&["extra"]).await["extra"];
    p.line("configuration reloaded").await;

    // The established connection survives (its backend drains)...
    roundtrip(&mut old, b"after reload").await;
    // ...new connections use the new backend list, and the added listener serves.
    drop(connect_echo(addrs["amqp"], b"new").await);
    drop(connect_echo(addrs["amqp"], b"new").await);
    drop(connect_echo(extra, b"extra").await);
    assert_eq!((a.served(), b.served(), c.served()), (1, 2, 1));
    let l = get_json(addrs["admin"], "/listeners/amqp").await;
    let draining: Vec<_> = l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|x| x["draining"] == true)
        .map(|x| x["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(draining, vec![a.addr.to_string()]);

    // A broken file is refused and the running configuration stays.
    std::fs::write(&path, "[[listener]]\nname = 3\n").unwrap();
    p.signal("-HUP");
    p.line("reload failed").await;
    roundtrip(&mut old, b"still alive").await;
    drop(connect_echo(addrs["amqp"], b"new").await);
    assert_eq!(b.served(), 3);

    drop(old);
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn sigterm_drains_live_connections_then_exits_0() {
    let b = echo_backend().await;
    let path = temp_file("term", &lb_toml(&[b.addr], None));
    let mut p = Proc::spawn(&["--config", path.to_str().unwrap()]);
    let addrs = p.addrs(&["amqp"]).await;
    let mut live = connect_echo(addrs["amqp"], b"hello").await;
    p.signal("-TERM");
    p.line("shutting down").await;
    // New connections are refused once the listener is closed...
    until_not_listening(addrs["amqp"]).await;
    // ...the live one is still served, and the process waits for it.
    roundtrip(&mut live, b"draining").await;
    assert!(
        p.child.try_wait().unwrap().is_none(),
        "still running while a connection is live"
    );
    drop(live);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_second_sigterm_exits_at_once() {
    let b = echo_backend().await;
    let path = temp_file("term2", &lb_toml(&[b.addr], None));
    let mut p = Proc::spawn(&["--config", path.to_str().unwrap()]);
    let addrs = p.addrs(&["amqp"]).await;
    let _live = connect_echo(addrs["amqp"], b"hello").await;
    p.signal("-TERM");
    p.line("shutting down").await;
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, Some(1));
}

#[tokio::test]
async fn the_example_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lb.toml");
    let (code, out, err) = check_config(&path).await;
    assert_eq!(code, 0, "{out}{err}");
    let cfg = warren_lb::Config::load(&path).unwrap();
    assert_eq!(cfg.listeners.len(), 2);
    assert_eq!(cfg.listeners[0].faults[0].name, "elb-periodic");
}

#[tokio::test]
async fn a_closed_stderr_does_not_stop_signal_handling() {
    let b = echo_backend().await;
    let backend = b.addr.to_string();
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--backend", &backend])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let l = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
            .expect("a listening line");
        if let Some((_, addr)) = parse_listening(&l) {
            break addr;
        }
    };
    // Nobody reads the log any more: every later log write fails with EPIPE.
    drop(lines);
    drop(connect_echo(addr, b"logs go nowhere").await);
    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

// ---------------------------------------------------------------- admin API security

fn token_path(tag: &str, token: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("warren-lb-proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.token"));
    std::fs::write(&p, format!("{token}\n")).unwrap();
    p
}

async fn check_config_with(path: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("--check-config")
        .arg(path)
        .args(args)
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn check_config_refuses_a_public_admin_api_without_a_token() {
    let listener =
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:0\"\nbackends = [\"127.0.0.1:1\"]\n";
    let public = temp_file(
        "public-admin",
        &format!("[admin]\nlisten = \"0.0.0.0:9901\"\n\n{listener}"),
    );
    let (code, _, err) = check_config(&public).await;
    assert_eq!(code, 1);
    assert!(
        err.contains("0.0.0.0:9901")
            && err.contains("not a loopback address")
            && err.contains("token_file")
            && err.contains("--admin-token-file"),
        "says what is wrong and how to fix it: {err}"
    );
    // The flag fixes it; an empty token file does not.
    let tok = token_path("public-admin", "s3cret");
    let (code, out, err) =
        check_config_with(&public, &["--admin-token-file", tok.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{out}{err}");
    let empty = token_path("empty", "   ");
    let (code, _, err) =
        check_config_with(&public, &["--admin-token-file", empty.to_str().unwrap()]).await;
    assert_eq!(code, 1);
    assert!(err.contains("empty"), "{err}");
    // So does token_file in the file; --admin moves a loopback API off loopback.
    let with_file = temp_file(
        "public-admin-file",
        &format!(
            "[admin]\nlisten = \"0.0.0.0:9901\"\ntoken_file = \"{}\"\n\n{listener}",
            tok.display()
        ),
    );
    assert_eq!(check_config(&with_file).await.0, 0);
    let local = temp_file(
        "local-admin",
        &format!("[admin]\nlisten = \"127.0.0.1:9901\"\n\n{listener}"),
    );
    assert_eq!(check_config(&local).await.0, 0);
    let (code, _, err) = check_config_with(&local, &["--admin", "0.0.0.0:9901"]).await;
    assert_eq!(code, 1, "{err}");
}

#[tokio::test]
async fn check_config_refuses_backends_that_are_invalid_or_warren_lb_itself() {
    for (tag, backends, bind, why) in [
        (
            "bad-ip",
            "\"999.1.1.1:1\"",
            "127.0.0.1:0",
            "invalid IPv4 address",
        ),
        (
            "bad-port",
            "\"127.0.0.1:70000\"",
            "127.0.0.1:0",
            "invalid port",
        ),
        (
            "own",
            "\"127.0.0.1:5999\"",
            "127.0.0.1:5999",
            "own listener `a`",
        ),
        (
            "own-wild",
            "\"127.0.0.1:5999\"",
            "0.0.0.0:5999",
            "own listener `a`",
        ),
        (
            "own-admin",
            "\"127.0.0.1:9901\"",
            "127.0.0.1:0",
            "own admin API",
        ),
        (
            "own-admin-name",
            "\"localhost:9901\"",
            "127.0.0.1:0",
            "own admin API",
        ),
        (
            "unresolvable",
            "\"no-such-host.invalid:1\"",
            "127.0.0.1:0",
            "does not resolve",
        ),
    ] {
        let text = format!(
            "[admin]\nlisten = \"127.0.0.1:9901\"\n\n[[listener]]\nname = \"a\"\nbind = \"{bind}\"\nbackends = [{backends}]\n"
        );
        let (code, _, err) = check_config(&temp_file(tag, &text)).await;
        assert_eq!(code, 1, "{tag}");
        assert!(err.contains(why), "{tag}: {err}");
    }
}

#[tokio::test]
async fn startup_refuses_a_public_admin_api_without_a_token() {
    // 0.0.0.0:0 is never bound: the configuration is refused first.
    let out = Command::new(BIN)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:1",
            "--admin",
            "0.0.0.0:0",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--admin-token-file"),
        "{err}"
    );
    assert!(!err.contains("listening"), "{err}");
}

#[tokio::test]
async fn startup_refuses_a_backend_that_is_its_own_listener() {
    // A port free right now, used both as the listener and (by name) as its backend.
    let port = dead_addr().await.port();
    let listen = format!("127.0.0.1:{port}");
    let backend = format!("localhost:{port}");
    // Refused at once; if it ever served, it would loop until killed: bound the wait.
    let run = Command::new(BIN)
        .args(["--listen", &listen, "--backend", &backend])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, run)
        .await
        .expect("exited at once")
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("own listener `default`"), "{err}");
    assert!(!err.contains("listening listener="), "{err}");
}

#[tokio::test]
async fn the_admin_token_file_flag_protects_the_api_and_sighup_rereads_it() {
    let b = echo_backend().await;
    let path = temp_file("token-proc", &lb_toml(&[b.addr], None));
    let tok = token_path("proc", "first-token");
    let mut p = Proc::spawn(&[
        "--config",
        path.to_str().unwrap(),
        "--admin-token-file",
        tok.to_str().unwrap(),
    ]);
    let admin = p.addrs(&["admin"]).await["admin"];
    let get = |auth: Option<&'static str>| async move {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", *a)).collect();
        request(admin, "GET", "/listeners", &headers, None)
            .await
            .status
    };
    assert_eq!(get(None).await, 401);
    assert_eq!(get(Some("Bearer wrong")).await, 401);
    assert_eq!(get(Some("Bearer first-token")).await, 200);
    assert_eq!(
        request(admin, "GET", "/healthz", &[], None).await.status,
        200
    );

    // A new token takes effect on SIGHUP (the flag applies to reloads too).
    std::fs::write(&tok, "second-token\n").unwrap();
    p.signal("-HUP");
    p.line("configuration reloaded").await;
    assert_eq!(get(Some("Bearer first-token")).await, 401);
    assert_eq!(get(Some("Bearer second-token")).await, 200);
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn sighup_with_a_backend_on_its_own_admin_port_is_refused_and_logged() {
    let (a, b) = (echo_backend().await, echo_backend().await);
    let path = temp_file("reload-own", &lb_toml(&[a.addr], None));
    let mut p = Proc::spawn(&["--config", path.to_str().unwrap()]);
    let addrs = p.addrs(&["amqp", "admin"]).await;
    let admin = addrs["admin"];
    std::fs::write(&path, lb_toml(&[b.addr, admin], None)).unwrap();
    p.signal("-HUP");
    let line = p.line("reload failed").await;
    assert!(
        line.contains(&admin.to_string()) && line.contains("own admin API"),
        "{line}"
    );
    // The running configuration stays: `a` only, and the admin API is not on the data port.
    drop(connect_echo(addrs["amqp"], b"x").await);
    drop(connect_echo(addrs["amqp"], b"y").await);
    assert_eq!((a.served(), b.served()), (2, 0));
    // A syntactically bad backend is refused the same way.
    std::fs::write(
        &path,
        lb_toml(&[b.addr], None).replace(&b.addr.to_string(), "999.1.1.1:1"),
    )
    .unwrap();
    p.signal("-HUP");
    let line = p.line("reload failed").await;
    assert!(line.contains("999.1.1.1"), "{line}");
    drop(connect_echo(addrs["amqp"], b"z").await);
    assert_eq!(a.served(), 3);
    p.signal("-TERM");
    assert_eq!(p.exit_code().await, Some(0));
}
