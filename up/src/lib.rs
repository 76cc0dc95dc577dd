//! `warren-up`: the seed's whole HA setup in one command. It starts N warren-broker nodes on
//! loopback (ports of their own), clusters them, applies the `ha-all` policy, puts warren-lb in
//! front (AMQP and management, round robin, health checks, idle timeout, the ELB's resets),
//! prints what runs where, then a status line every few seconds, and stops everything on
//! Ctrl-C. `warren-up kill|stop|start NODE` and `warren-up status` talk to a running one.
//!
//! # Layout
//! - [`config`]: the settings (defaults, TOML file, flags) and their checks.
//! - [`plan`]: node names, the state file in the data dir, warren-lb's generated config.
//! - [`proc`]: child processes: start, read their `listening` lines, signal, exits.
//! - [`api`]: the management and admin APIs through warren-ctl's HTTP client.
//! - [`status`]: the status line.
//! - [`control`]: the control socket (`kill`, `stop`, `start`, `status`).
//! - [`up`]: the supervisor that starts the topology and runs until stopped.

pub mod api;
pub mod config;
pub mod control;
pub mod plan;
pub mod proc;
pub mod status;
pub mod up;

pub use config::Config;
pub use up::run;
