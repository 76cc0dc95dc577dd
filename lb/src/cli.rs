//! The command line: flags, and how they become a [`Config`] (alone, or over a `--config` file).
//!
//! Flags override the file, as most servers do: the address and backend flags replace those of
//! the file's listener, the timeout flags set every listener's, and the chaos flags add their
//! rule to every listener (replacing a rule of the same name). The same overrides are applied
//! again on every SIGHUP reload, so a reload never undoes a flag. Kept in the library so that
//! tests turn the README's command lines into the configuration the binary would run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::config::{parse_duration, AdminConfig, Config, ConfigError, FaultRule, ListenerConfig};

/// The `--help` text after the flags: the duration syntax and the quick start's loss recipe.
const AFTER_HELP: &str = "\
Durations (DUR) are humane strings: 250ms, 30s, 5m, 1h30m.

Flags override the --config file: --listen and --backend replace the address and backends of the
file's listener (a file with several listeners takes neither), the other flags apply to every
listener. SIGHUP rereads the file and applies the flags again.

Lose a message on purpose (a publisher without confirms loses one per cut, one with confirms
republishes it):
  warren-lb --listen 127.0.0.1:5670 --backend 127.0.0.1:5672 --reset-after-publish 20 --reset-every 1s";

/// ELB-equivalent TCP load balancer with a chaos engine.
#[derive(Parser, Debug, Clone)]
#[command(name = "warren-lb", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Configuration file (TOML); SIGHUP reloads it. The flags below override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate FILE (with the flags applied; backends resolved) and exit: 0 if valid, 1 with a
    /// message if not.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    pub check_config: Option<PathBuf>,
    /// Listen on ADDR (repeat for more addresses, such as 127.0.0.1:5670 and [::1]:5670 for
    /// clients that resolve `localhost` to ::1 first). Each address is a listener of its own
    /// with the same settings and backends, named default, default-2, ... in order (with
    /// --config: the file's listener name, then NAME-2, ...).
    #[arg(long, value_name = "ADDR")]
    pub listen: Vec<SocketAddr>,
    /// Backend `host:port` (repeat); with --config, replaces the listener's backends.
    #[arg(long, value_name = "HOST:PORT")]
    pub backend: Vec<String>,
    /// Idle timeout: a connection that passes no payload byte for DUR is closed (default 60s,
    /// the ELB's).
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// Reset every live connection every DUR, as an ELB does (RST; bytes the proxy holds are
    /// discarded). Alone it rarely loses a message: see --reset-after-publish.
    #[arg(long, value_name = "DUR", value_parser = parse_duration)]
    pub reset_every: Option<Duration>,
    /// Reset each connection right after its Nth basic.publish reached the proxy, discarding the
    /// publish's content already read (RST, in_flight = drop): the message is lost unless the
    /// publisher waits for confirms and republishes. Every new connection counts from 1 again.
    /// The rule is named `reset-after-publish`.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub reset_after_publish: Option<u64>,
    /// max_connections of each listener (default 10000).
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Admin API address (overrides [admin] listen). Off loopback it needs a token.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// File holding the admin API token (overrides [admin] token_file); clients send
    /// `Authorization: Bearer <token>` or basic auth with the token as password.
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Connection threads (overrides [runtime] threads; default one per CPU). A new connection
    /// stays on the first thread until that one is busy (see `workers`).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Never use splice(2); always copy through buffers (overrides [runtime] splice).
    #[arg(long)]
    pub no_splice: bool,
    /// Seed of the chaos RNG (overrides [chaos] seed); the same seed and traffic replay the same
    /// faults.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Log filter (tracing EnvFilter syntax); default RUST_LOG or "info".
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,
}

/// A command line that cannot become a configuration.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("nothing to do: give --config FILE, or --listen ADDR --backend HOST:PORT")]
    NothingToDo,
    #[error("--listen needs at least one --backend HOST:PORT")]
    NoBackend,
    #[error("--backend needs --listen ADDR (or --config FILE)")]
    BackendWithoutListen,
    #[error(
        "{flag} with a file of {count} listeners: which one is meant? Edit the file, or keep \
         one listener in it"
    )]
    Ambiguous { flag: &'static str, count: usize },
    #[error("--admin-token-file needs an admin API: give --admin ADDR or [admin] listen")]
    TokenWithoutAdmin,
    #[error(transparent)]
    Config(#[from] ConfigError),
}

// === impl Cli ===

impl Cli {
    /// Parses a command line (the program name first), as `main` does, without exiting.
    pub fn try_parse_args<I, T>(args: I) -> Result<Cli, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args)
    }

    /// The configuration this command line runs: the file's (if any) with the flags applied,
    /// validated and its token file read.
    pub fn load(&self) -> Result<Config, CliError> {
        let (mut cfg, origin) = match &self.config {
            Some(path) => (Config::parse_file(path)?, path.display().to_string()),
            None => (self.bare()?, "command line".to_string()),
        };
        self.apply_overrides(&mut cfg)?;
        cfg.check(&origin)?;
        Ok(cfg)
    }

    /// Without a file: a `default` listener template that the overrides fill in.
    fn bare(&self) -> Result<Config, CliError> {
        if self.listen.is_empty() {
            return Err(if self.backend.is_empty() {
                CliError::NothingToDo
            } else {
                CliError::BackendWithoutListen
            });
        }
        if self.backend.is_empty() {
            return Err(CliError::NoBackend);
        }
        Ok(Config {
            listeners: vec![ListenerConfig {
                name: "default".to_string(),
                ..ListenerConfig::default()
            }],
            ..Config::default()
        })
    }

    /// Applies the flags to a configuration (the file's, or the bare one); also used on every
    /// reload of the file.
    pub fn apply_overrides(&self, cfg: &mut Config) -> Result<(), CliError> {
        if !self.listen.is_empty() || !self.backend.is_empty() {
            let count = cfg.listeners.len();
            if count != 1 {
                let flag = if self.listen.is_empty() {
                    "--backend"
                } else {
                    "--listen"
                };
                return Err(CliError::Ambiguous { flag, count });
            }
            if !self.backend.is_empty() {
                cfg.listeners[0].backends = self.backend.clone();
            }
            if !self.listen.is_empty() {
                let template = cfg.listeners.remove(0);
                cfg.listeners = self
                    .listen
                    .iter()
                    .enumerate()
                    .map(|(i, bind)| ListenerConfig {
                        name: match i {
                            0 => template.name.clone(),
                            _ => format!("{}-{}", template.name, i + 1),
                        },
                        bind: *bind,
                        ..template.clone()
                    })
                    .collect();
            }
        }
        for l in &mut cfg.listeners {
            if let Some(idle) = self.idle_timeout {
                l.idle_timeout = idle;
            }
            if let Some(max) = self.max_connections {
                l.max_connections = max;
            }
            if let Some(every) = self.reset_every {
                put_rule(l, FaultRule::reset_every(every));
            }
            if let Some(n) = self.reset_after_publish {
                put_rule(l, FaultRule::reset_after_publish(n));
            }
        }
        if let Some(a) = self.admin {
            match &mut cfg.admin {
                Some(admin) => admin.listen = a,
                None => cfg.admin = Some(AdminConfig::new(a)),
            }
        }
        if let Some(path) = &self.admin_token_file {
            match &mut cfg.admin {
                Some(admin) => admin.token_file = Some(path.clone()),
                None => return Err(CliError::TokenWithoutAdmin),
            }
        }
        if let Some(t) = self.threads {
            cfg.runtime.threads = Some(t);
        }
        if self.no_splice {
            cfg.runtime.splice = Some(false);
        }
        if let Some(s) = self.seed {
            cfg.chaos.seed = Some(s);
        }
        Ok(())
    }
}

/// Adds `rule` to the listener, in place of a rule of the same name.
fn put_rule(l: &mut ListenerConfig, rule: FaultRule) {
    match l.faults.iter_mut().find(|r| r.name == rule.name) {
        Some(r) => *r = rule,
        None => l.faults.push(rule),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::{Direction, FaultKind, InFlight};

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("warren-lb").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn the_quick_start_flags_make_a_publish_cut() {
        let cfg = cli(&[
            "--listen",
            "127.0.0.1:5670",
            "--backend",
            "127.0.0.1:5672",
            "--reset-after-publish",
            "20",
            "--reset-every",
            "1s",
        ])
        .load()
        .unwrap();
        let l = &cfg.listeners[0];
        assert_eq!(l.name, "default");
        let cut = l
            .faults
            .iter()
            .find(|r| r.name == "reset-after-publish")
            .unwrap();
        assert_eq!(cut.kind, FaultKind::Reset);
        assert_eq!(cut.on_amqp.as_deref(), Some("basic.publish"));
        assert_eq!(cut.nth, Some(20));
        assert_eq!(cut.direction, Direction::Upstream);
        assert_eq!(cut.in_flight, Some(InFlight::Drop));
        let every = l.faults.iter().find(|r| r.name == "reset-every").unwrap();
        assert_eq!(every.every, Some(Duration::from_secs(1)));
    }

    #[test]
    fn zero_publishes_is_refused() {
        let r = Cli::try_parse_from(["warren-lb", "--reset-after-publish", "0"]);
        assert!(r.is_err());
    }

    #[test]
    fn missing_pieces_are_named() {
        assert!(matches!(cli(&[]).load(), Err(CliError::NothingToDo)));
        assert!(matches!(
            cli(&["--listen", "127.0.0.1:0"]).load(),
            Err(CliError::NoBackend)
        ));
        assert!(matches!(
            cli(&["--backend", "127.0.0.1:5672"]).load(),
            Err(CliError::BackendWithoutListen)
        ));
    }

    #[test]
    fn repeated_listen_names_the_listeners_after_the_first() {
        let cfg = cli(&[
            "--listen",
            "127.0.0.1:0",
            "--listen",
            "[::1]:0",
            "--backend",
            "127.0.0.1:5672",
        ])
        .load()
        .unwrap();
        let names: Vec<_> = cfg.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["default", "default-2"]);
    }

    #[test]
    fn flags_override_a_file_and_replace_a_rule_of_the_same_name() {
        let mut cfg = Config::from_toml_str(
            r#"
            [[listener]]
            name = "amqp"
            bind = "127.0.0.1:5670"
            backends = ["127.0.0.1:5673", "127.0.0.1:5674"]
            idle_timeout = "60s"
            [[listener.fault]]
            name = "reset-every"
            kind = "reset"
            every = "30s"
            "#,
        )
        .unwrap();
        cli(&[
            "--listen",
            "127.0.0.1:0",
            "--backend",
            "127.0.0.1:5672",
            "--idle-timeout",
            "5s",
            "--reset-every",
            "2s",
        ])
        .apply_overrides(&mut cfg)
        .unwrap();
        let l = &cfg.listeners[0];
        assert_eq!(l.name, "amqp");
        assert_eq!(l.bind.port(), 0);
        assert_eq!(l.backends, ["127.0.0.1:5672"]);
        assert_eq!(l.idle_timeout, Duration::from_secs(5));
        assert_eq!(l.faults.len(), 1, "{:?}", l.faults);
        assert_eq!(l.faults[0].every, Some(Duration::from_secs(2)));
    }

    #[test]
    fn listen_with_a_file_of_two_listeners_is_ambiguous() {
        let mut cfg = Config::from_toml_str(
            r#"
            [[listener]]
            name = "amqp"
            bind = "127.0.0.1:5670"
            backends = ["127.0.0.1:5672"]
            [[listener]]
            name = "mgmt"
            bind = "127.0.0.1:15670"
            backends = ["127.0.0.1:15672"]
            "#,
        )
        .unwrap();
        let e = cli(&["--listen", "127.0.0.1:0"])
            .apply_overrides(&mut cfg)
            .unwrap_err();
        assert!(e.to_string().contains("2 listeners"), "{e}");
        // Flags that name no address still apply to both.
        cli(&["--idle-timeout", "9s"])
            .apply_overrides(&mut cfg)
            .unwrap();
        assert!(cfg
            .listeners
            .iter()
            .all(|l| l.idle_timeout == Duration::from_secs(9)));
    }
}
