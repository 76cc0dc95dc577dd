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

/// The chaos recipes run next to the README quick start's broker (AMQP on 127.0.0.1:5672)
/// without edits: their listeners take another port and their backend is that broker; and the
/// command-line flags override them (another address, other backends), as README says.
#[test]
fn the_chaos_recipes_run_next_to_the_quick_start_broker_and_take_flags() {
    let broker: std::net::SocketAddr = "127.0.0.1:5672".parse().expect("address");
    for path in toml_files(&examples().join("chaos")) {
        let text = std::fs::read_to_string(&path).expect("example file");
        let cfg = warren_lb::Config::from_toml_str(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let name = path.display();
        assert_eq!(
            cfg.listeners.len(),
            1,
            "{name}: one listener, so --listen applies"
        );
        let l = &cfg.listeners[0];
        assert_ne!(l.bind, broker, "{name} binds the broker's port");
        assert_eq!(
            l.backends,
            [broker.to_string()],
            "{name}: the quick start's broker"
        );
        if let Some(admin) = &cfg.admin {
            assert_ne!(
                admin.listen, broker,
                "{name}: admin API on the broker's port"
            );
        }
        let args = [
            "warren-lb",
            "--config",
            path.to_str().expect("utf-8 path"),
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:5673",
            "--backend",
            "127.0.0.1:5674",
            "--admin",
            "127.0.0.1:0",
        ];
        let cfg = warren_lb::cli::Cli::try_parse_args(args)
            .expect("flags parse")
            .load()
            .unwrap_or_else(|e| panic!("{name} with flags: {e}"));
        let l = &cfg.listeners[0];
        assert_eq!(l.bind.port(), 0, "{name}: --listen overrides bind");
        assert_eq!(l.backends, ["127.0.0.1:5673", "127.0.0.1:5674"], "{name}");
        assert_eq!(
            cfg.admin.as_ref().map(|a| a.listen.port()),
            Some(0),
            "{name}"
        );
        assert!(!l.faults.is_empty(), "{name}: the file's rules stay");
    }
}
