//! Shared helpers for the integration tests: fast-timing configs, node startup, polling.
#![allow(dead_code)]

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use tokio::time::Instant;
use warren_cluster::{Cluster, ClusterConfig, Op, Timing};

pub const SECRET: &[u8] = b"test-cookie";

/// Log to the test's output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

pub fn config(name: &str, dir: &Path) -> ClusterConfig {
    ClusterConfig {
        timing: Timing::fast(),
        ..ClusterConfig::new(name, dir, SECRET)
    }
}

pub async fn start(name: &str, dir: &Path, join: &[&Cluster]) -> Cluster {
    start_with(config(name, dir), join).await
}

/// [`start`] with a config of the test's own.
pub async fn start_with(mut cfg: ClusterConfig, join: &[&Cluster]) -> Cluster {
    cfg.join = join
        .iter()
        .map(|c| c.advertised_addr().to_string())
        .collect();
    Cluster::start(cfg).await.expect("start")
}

/// Poll `f` every 20 ms until it is true, or panic after `within`.
pub async fn until<F: FnMut() -> bool>(within: Duration, what: &str, mut f: F) {
    let end = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Like [`until`] with an async probe.
pub async fn until_async<F, Fut>(within: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + within;
    while !f().await {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn put(key: &str, value: serde_json::Value) -> Op {
    Op::Put {
        key: key.into(),
        value,
    }
}

/// The value of `key` on `c`, if any.
pub fn get(c: &Cluster, key: &str) -> Option<serde_json::Value> {
    c.state().borrow().get(key).map(|v| (*v.value).clone())
}

pub fn voters(c: &Cluster) -> usize {
    c.state().borrow().voters().count()
}
