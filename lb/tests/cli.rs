//! Process level: the command line a newcomer types. `--help`, flags over a `--config` file (the
//! shipped examples run next to the quick start's broker), and a port already in use.

#![allow(clippy::unwrap_used)] // integration tests: a failed unwrap is a failed test

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_warren-lb");

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples")
        .join(name)
}

async fn output(args: &[&str]) -> Output {
    let run = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(WAIT, run)
        .await
        .expect("warren-lb exited in time")
        .unwrap()
}

/// Spawns warren-lb and reads `listening listener=NAME addr=ADDR` lines until `names` are known.
async fn spawn_and_read_addrs(
    args: &[&str],
    names: &[&str],
) -> (Child, HashMap<String, SocketAddr>) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut found = HashMap::new();
    let read = async {
        while !names.iter().all(|n| found.contains_key(*n)) {
            let Some(l) = lines.next_line().await.unwrap() else {
                panic!("warren-lb exited before listening on {names:?}");
            };
            eprintln!("[warren-lb] {l}");
            if let Some(rest) = l.split("listening listener=").nth(1) {
                let (name, rest) = rest.split_once(' ').unwrap();
                let addr = rest
                    .strip_prefix("addr=")
                    .unwrap()
                    .split_whitespace()
                    .next();
                found.insert(name.to_string(), addr.unwrap().parse().unwrap());
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("listening in time");
    // Keep draining stderr so that the process never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, found)
}

#[tokio::test]
async fn help_and_version_exit_0_and_help_documents_durations_and_the_loss_flag() {
    for flag in ["--help", "-h"] {
        let out = output(&[flag]).await;
        assert_eq!(out.status.code(), Some(0), "{flag}");
        let text = String::from_utf8_lossy(&out.stdout);
        for needle in [
            "--reset-after-publish",
            "--reset-every",
            "250ms",
            "--config",
        ] {
            assert!(text.contains(needle), "{flag} lacks {needle}:\n{text}");
        }
    }
    let out = output(&["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("warren-lb "));
}

#[tokio::test]
async fn flags_override_a_config_file() {
    let b = echo_backend().await;
    let backend = b.addr.to_string();
    let file = example("chaos/elb.toml");
    let (mut child, addrs) = spawn_and_read_addrs(
        &[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--backend",
            &backend,
            "--admin",
            "127.0.0.1:0",
            "--idle-timeout",
            "7s",
            "--reset-after-publish",
            "5",
        ],
        &["amqp", "admin"],
    )
    .await;
    // The file's listener, on the flag's address, to the flag's backend.
    let mut s = connect_echo(addrs["amqp"], b"through the file's listener").await;
    roundtrip(&mut s, b"again").await;
    assert_eq!(b.served(), 1, "the flag's backend served it");
    let l = get_json(addrs["admin"], "/listeners/amqp").await;
    assert_eq!(l["idle_timeout"], "7s", "{l}");
    let backends: Vec<String> = l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["address"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(backends, [backend]);
    // The file's rule stays, the flag's rule is added.
    let rules = get_json(addrs["admin"], "/listeners/amqp/faults").await;
    let names: Vec<&str> = rules
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["elb-periodic", "reset-after-publish"], "{rules}");
    assert_eq!(rules[1]["on_amqp"], "basic.publish");
    assert_eq!(rules[1]["nth"], 5);
    child.start_kill().unwrap();
    let _ = child.wait().await;
}

/// One line on stderr that names the address and says what to do; exit 1.
fn assert_one_error_line(out: &Output, addr: SocketAddr, flag: &str) {
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.to_ascii_lowercase().contains("error"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line:\n{stderr}");
    let line = errors[0];
    assert!(line.starts_with("error: "), "{line}");
    assert!(line.contains(&addr.to_string()), "{line}");
    assert!(line.contains("address already in use"), "{line}");
    assert!(line.contains(flag), "names the flag to change: {line}");
}

#[tokio::test]
async fn a_port_in_use_is_one_clear_error_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let b = echo_backend().await;
    let backend = b.addr.to_string();
    let out = output(&["--listen", &addr.to_string(), "--backend", &backend]).await;
    assert_one_error_line(&out, addr, "--listen");
    let out = output(&[
        "--listen",
        "127.0.0.1:0",
        "--backend",
        &backend,
        "--admin",
        &addr.to_string(),
    ])
    .await;
    assert_one_error_line(&out, addr, "--admin");
}

#[tokio::test]
async fn a_command_line_that_cannot_run_says_what_is_missing() {
    let out = output(&["--listen", "127.0.0.1:0"]).await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--listen needs at least one --backend"),
        "{stderr}"
    );
    let out = output(&[
        "--config",
        example("lb.toml").to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ])
    .await;
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("2 listeners"), "{stderr}");
}
