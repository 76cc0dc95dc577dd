//! The cluster port facing strangers: wrong secrets, junk, slow or huge handshakes, TLS.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use warren_cluster::{Cluster, ClusterError, ClusterTls, Timing};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Every test of this binary logs (warn and up) into one captured buffer: under `cargo test`
/// they share the process, and the global subscriber can be set only once.
fn capture() -> Captured {
    static LOGS: std::sync::OnceLock<Captured> = std::sync::OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Captured::default();
        let sink = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .try_init();
        logs
    })
    .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused_and_both_sides_say_why() {
    let logs = capture();
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let a = start("a@auth", da.path(), &[]).await;
    let mut cfg = config("b@auth", db.path());
    cfg.secret = b"not-the-cookie".to_vec();
    cfg.join = vec![a.advertised_addr().to_string()];
    cfg.timing = Timing {
        join_timeout: Duration::from_millis(1500),
        ..Timing::fast()
    };
    let err = match Cluster::start(cfg).await {
        Err(e) => e,
        Ok(_) => panic!("joined with a wrong secret"),
    };
    assert!(matches!(err, ClusterError::Join(_)), "{err}");
    assert!(
        err.to_string().contains("cluster secret rejected by peer"),
        "{err}"
    );
    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(
        text.contains("peer presented a wrong cluster secret"),
        "{text}"
    );
    assert!(text.contains("cluster secret rejected by peer"), "{text}");
    assert!(!text.contains("not-the-cookie") && !text.contains("test-cookie"));
    assert_eq!(voters(&a), 1);
    a.shutdown().await;
}

/// Wait until the server closes `s` (EOF or reset), or panic after `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 4096];
    let res = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(res.is_ok(), "the server did not close the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bytes_on_the_cluster_port_do_not_hurt() {
    capture();
    let da = tempfile::tempdir().unwrap();
    let a = start("a@hostile", da.path(), &[]).await;
    let port = a.listen_addrs()[0];
    let limit = Timing::fast().handshake_timeout + Duration::from_secs(2);
    // Random bytes (xorshift, fixed seed).
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let junk: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let mut s = TcpStream::connect(port).await.unwrap();
    let _ = s.write_all(&junk).await;
    closed_within(&mut s, limit).await;
    // The magic, then a 4 GiB length prefix.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(b"WRNCLST1\xff\xff\xff\xff\x01").await.unwrap();
    closed_within(&mut s, limit).await;
    // The magic and the start of a hello that never completes: the handshake times out.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(b"WRNCLST1\x00\x00\x0f\xa0\x01{\"proto\"")
        .await
        .unwrap();
    closed_within(&mut s, limit).await;
    // A hello with a bad body.
    let mut s = TcpStream::connect(port).await.unwrap();
    s.write_all(b"WRNCLST1\x00\x00\x00\x03\x01{}")
        .await
        .unwrap();
    closed_within(&mut s, limit).await;
    // A pile of idle connections.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(TcpStream::connect(port).await.unwrap());
    }
    // Through all of it the node works and a real peer can join.
    a.propose(vec![put("still", json!("alive"))]).await.unwrap();
    let db = tempfile::tempdir().unwrap();
    drop(idle);
    let b = start("b@hostile", db.path(), &[&a]).await;
    until(Duration::from_secs(5), "b caught up", || {
        get(&b, "still").is_some()
    })
    .await;
    a.shutdown().await;
    b.shutdown().await;
}

fn write_tls(dir: &std::path::Path) -> (ClusterTls, ClusterTls) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let node = |n: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        std::fs::write(dir.join(format!("{n}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{n}.key")), key.serialize_pem()).unwrap();
        ClusterTls {
            cert: dir.join(format!("{n}.pem")),
            key: dir.join(format!("{n}.key")),
            ca: dir.join("ca.pem"),
        }
    };
    (node("a"), node("b"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_links_work_and_plain_peers_are_refused() {
    capture();
    let certs = tempfile::tempdir().unwrap();
    let (ta, tb) = write_tls(certs.path());
    let da = tempfile::tempdir().unwrap();
    let db = tempfile::tempdir().unwrap();
    let dc = tempfile::tempdir().unwrap();
    let mut ca = config("a@tls", da.path());
    ca.tls = Some(ta);
    let a = Cluster::start(ca).await.unwrap();
    let mut cb = config("b@tls", db.path());
    cb.tls = Some(tb);
    cb.join = vec![a.advertised_addr().to_string()];
    let b = Cluster::start(cb).await.unwrap();
    b.propose(vec![put("over", json!("tls"))]).await.unwrap();
    until(Duration::from_secs(5), "a applied", || {
        get(&a, "over").is_some()
    })
    .await;
    // A node without TLS (right secret) cannot join.
    let mut cc = config("c@tls", dc.path());
    cc.join = vec![a.advertised_addr().to_string()];
    cc.timing = Timing {
        join_timeout: Duration::from_millis(1000),
        ..Timing::fast()
    };
    assert!(Cluster::start(cc).await.is_err());
    assert_eq!(voters(&a), 2);
    a.shutdown().await;
    b.shutdown().await;
}
