//! The configuration files shipped under `examples/` are what newcomers copy first: each one must
//! load and validate with the same code the binaries use.

use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_broker_example_config_is_valid() {
    let path = examples().join("broker.toml");
    let text = std::fs::read_to_string(&path).expect("examples/broker.toml");
    let cfg = warren_broker::config::Config::from_toml_str(&text)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cfg.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        cfg.vhosts.iter().any(|v| v == "celery"),
        "the example shows a second vhost"
    );
}

#[test]
fn every_load_balancer_example_config_is_valid() {
    let mut files = vec![examples().join("lb.toml")];
    files.extend(toml_files(&examples().join("chaos")));
    assert!(
        files.len() >= 6,
        "lb.toml and the five chaos recipes: {files:?}"
    );
    for path in files {
        let text = std::fs::read_to_string(&path).expect("example file");
        let cfg = warren_lb::Config::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        cfg.validate()
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}
