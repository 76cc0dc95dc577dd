//! Command line (PerfTest's flag letters) and the validated run configuration.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use serde::Serialize;

use crate::{
    codec::STAMP_LEN,
    connection::{Endpoint, QueueSpec},
};

/// Largest body accepted with `-s` (RabbitMQ's default max message size).
pub const MAX_SIZE: usize = 128 * 1024 * 1024;

/// Load generator for AMQP 0-9-1 brokers, with RabbitMQ PerfTest's flags.
#[derive(Debug, Parser)]
#[command(name = "warren-perf", version, about)]
pub struct Args {
    /// Broker URI.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// Broker URI for the consumers (default: --uri), e.g. another node of a cluster than the
    /// producers'.
    #[arg(long)]
    pub consumer_uri: Option<String>,
    /// Producers (one connection each).
    #[arg(short = 'x', long = "producers", default_value_t = 1)]
    pub producers: u32,
    /// Consumers (one connection each).
    #[arg(short = 'y', long = "consumers", default_value_t = 1)]
    pub consumers: u32,
    /// Message body size in bytes; from 12 bytes up bodies carry a sequence and send time.
    #[arg(short = 's', long = "size", default_value_t = 12)]
    pub size: usize,
    /// Publish rate per producer in msg/s (0 = unlimited).
    #[arg(short = 'r', long = "rate", default_value_t = 0.0)]
    pub rate: f64,
    /// Consumer prefetch (basic.qos prefetch-count; 0 = unlimited).
    #[arg(short = 'q', long = "qos", default_value_t = 0)]
    pub qos: u16,
    /// Publisher confirms: most unconfirmed publishes per producer (absent = no confirms).
    #[arg(short = 'c', long = "confirm")]
    pub confirm: Option<u32>,
    /// Message flags; `persistent` sets delivery-mode 2 and declares the queue durable;
    /// `mandatory` publishes with the mandatory flag (unroutable ones are returned and counted).
    #[arg(short = 'f', long = "flag")]
    pub flags: Vec<String>,
    /// Run time in seconds.
    #[arg(short = 'z', long = "time", default_value_t = 10)]
    pub time: u64,
    /// Queue name (published to through the default exchange).
    #[arg(short = 'u', long = "queue", default_value = "warren-perf")]
    pub queue: String,
    /// Consume with no-ack.
    #[arg(short = 'a', long = "autoack")]
    pub auto_ack: bool,
    /// Acknowledge with `multiple` every N deliveries (0 or 1 = one ack per delivery).
    /// Capped at the prefetch so a consumer never stalls.
    #[arg(short = 'A', long = "multi-ack-every", default_value_t = 0)]
    pub multi_ack_every: u32,
    /// Declare the queue auto-delete (deleted when its last consumer goes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_delete: bool,
    /// Declare the queue exclusive (usable only by the declaring connection, so only with one
    /// connection in total).
    #[arg(long)]
    pub exclusive: bool,
    /// Bytes of publishes a producer writes per syscall at most.
    #[arg(long, default_value_t = 64 * 1024)]
    pub batch_bytes: usize,
    /// Threads driving the connections (default 1: all on the calling thread).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Broker process id: report its CPU time per message and memory (from /proc).
    #[arg(long)]
    pub broker_pid: Option<u32>,
    /// Print the final summary as JSON on stdout (progress then goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Write the final summary as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
    /// A label stored in the JSON summary (e.g. the broker's name).
    #[arg(long)]
    pub label: Option<String>,
    /// `idle`: each consumer stops once nothing arrived for a second, and the run ends when
    /// every producer and consumer has stopped (-z stays the limit); for draining a queue.
    #[arg(long, value_parser = ["idle"])]
    pub exit_when: Option<String>,
    /// Write the ids (body sequence numbers) of the confirmed publishes and of the consumed
    /// deliveries to this JSON file, as ranges with counts and duplicates: a loss check.
    /// At most one producer (ids are per producer); needs bodies of 12 bytes or more.
    #[arg(long)]
    pub ids_out: Option<PathBuf>,
}

/// Validated settings of one run.
#[derive(Clone, Debug)]
pub struct Config {
    /// Broker address and credentials.
    pub endpoint: Endpoint,
    /// Where the consumers connect (the same as `endpoint` unless --consumer-uri).
    pub consumer_endpoint: Endpoint,
    /// Producers.
    pub producers: u32,
    /// Consumers.
    pub consumers: u32,
    /// Body size.
    pub size: usize,
    /// Per-producer rate, 0 = unlimited.
    pub rate: f64,
    /// Prefetch per consumer.
    pub prefetch: u16,
    /// Confirm window per producer.
    pub confirms: Option<u32>,
    /// delivery-mode 2 and a durable queue.
    pub persistent: bool,
    /// basic.publish's mandatory flag.
    pub mandatory: bool,
    /// Run time.
    pub duration: Duration,
    /// Queue declaration.
    pub queue: QueueSpec,
    /// No-ack consumers.
    pub auto_ack: bool,
    /// Deliveries per ack.
    pub ack_every: u32,
    /// Bytes per producer write.
    pub batch_bytes: usize,
    /// Broker process to measure.
    pub broker_pid: Option<u32>,
    /// Consumers stop after this long without a delivery, and the run when all tasks stopped.
    pub exit_idle: Option<Duration>,
    /// Track message ids (for --ids-out).
    pub track_ids: bool,
    /// Echo of the settings for the report.
    pub echo: ConfigEcho,
}

/// The settings as recorded in the JSON summary.
#[derive(Clone, Debug, Serialize)]
pub struct ConfigEcho {
    /// Label given with `--label`.
    pub label: Option<String>,
    /// Host and port (no credentials).
    pub broker: String,
    /// The consumers' host and port when not `broker`.
    pub consumer_broker: Option<String>,
    /// -x
    pub producers: u32,
    /// -y
    pub consumers: u32,
    /// -s
    pub size: usize,
    /// -r
    pub rate: f64,
    /// -q
    pub qos: u16,
    /// -c
    pub confirm: Option<u32>,
    /// -f persistent
    pub persistent: bool,
    /// -f mandatory
    pub mandatory: bool,
    /// -z
    pub time_s: u64,
    /// -u
    pub queue: String,
    /// -a
    pub auto_ack: bool,
    /// Deliveries per ack (after capping).
    pub multi_ack_every: u32,
    /// Queue declare flags.
    pub durable: bool,
    /// Queue declare flags.
    pub auto_delete: bool,
    /// --exit-when.
    pub exit_when: Option<String>,
}

impl Config {
    /// Checks the arguments and builds the configuration.
    pub fn from_args(a: &Args) -> Result<Self, String> {
        let endpoint = Endpoint::from_uri(&a.uri).map_err(|e| format!("--uri: {e}"))?;
        let consumer_endpoint = match &a.consumer_uri {
            Some(u) => Endpoint::from_uri(u).map_err(|e| format!("--consumer-uri: {e}"))?,
            None => endpoint.clone(),
        };
        let (mut persistent, mut mandatory) = (false, false);
        for f in &a.flags {
            match f.as_str() {
                "persistent" => persistent = true,
                "mandatory" => mandatory = true,
                other => {
                    return Err(format!(
                        "-f {other}: only `persistent` and `mandatory` are supported"
                    ))
                }
            }
        }
        if a.time == 0 {
            return Err("-z must be at least 1 second (runs are bounded)".into());
        }
        if a.producers == 0 && a.consumers == 0 {
            return Err("nothing to do: -x 0 -y 0".into());
        }
        if a.queue.is_empty() || a.queue.len() > 255 {
            return Err("-u: queue name must be 1 to 255 bytes".into());
        }
        if !(a.rate >= 0.0 && a.rate.is_finite()) {
            return Err("-r must be >= 0".into());
        }
        if a.size > MAX_SIZE {
            return Err(format!("-s: at most {MAX_SIZE} bytes"));
        }
        if a.confirm == Some(0) {
            return Err("-c must be >= 1".into());
        }
        if a.ids_out.is_some() {
            if a.producers > 1 {
                return Err("--ids-out: at most one producer (ids are per producer)".into());
            }
            if a.size < STAMP_LEN {
                return Err(format!(
                    "--ids-out: -s must be at least {STAMP_LEN} (ids are in the body)"
                ));
            }
        }
        if a.batch_bytes == 0 {
            return Err("--batch-bytes must be > 0".into());
        }
        let mut ack_every = a.multi_ack_every.max(1);
        if !a.auto_ack && a.qos > 0 && ack_every > u32::from(a.qos) {
            ack_every = u32::from(a.qos);
        }
        let queue = QueueSpec {
            name: a.queue.clone(),
            durable: persistent,
            auto_delete: a.auto_delete,
            exclusive: a.exclusive,
        };
        let echo = ConfigEcho {
            label: a.label.clone(),
            broker: format!("{}:{}", endpoint.host, endpoint.port),
            consumer_broker: (consumer_endpoint != endpoint)
                .then(|| format!("{}:{}", consumer_endpoint.host, consumer_endpoint.port)),
            producers: a.producers,
            consumers: a.consumers,
            size: a.size,
            rate: a.rate,
            qos: a.qos,
            confirm: a.confirm,
            persistent,
            mandatory,
            time_s: a.time,
            queue: a.queue.clone(),
            auto_ack: a.auto_ack,
            multi_ack_every: ack_every,
            durable: queue.durable,
            auto_delete: queue.auto_delete,
            exit_when: a.exit_when.clone(),
        };
        Ok(Self {
            endpoint,
            consumer_endpoint,
            producers: a.producers,
            consumers: a.consumers,
            size: a.size,
            rate: a.rate,
            prefetch: a.qos,
            confirms: a.confirm,
            persistent,
            mandatory,
            duration: Duration::from_secs(a.time),
            queue,
            auto_ack: a.auto_ack,
            ack_every,
            batch_bytes: a.batch_bytes,
            broker_pid: a.broker_pid,
            exit_idle: a.exit_when.as_deref().map(|_| Duration::from_secs(1)),
            track_ids: a.ids_out.is_some(),
            echo,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let a = Args::try_parse_from(std::iter::once("warren-perf").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        Config::from_args(&a)
    }

    #[test]
    fn perftest_flags() {
        let c = parse(&[
            "-x",
            "2",
            "-y",
            "3",
            "-s",
            "1024",
            "-r",
            "500",
            "-q",
            "100",
            "-c",
            "50",
            "-f",
            "persistent",
            "-z",
            "5",
            "-u",
            "q1",
            "-A",
            "10",
            "--uri",
            "amqp://a:b@127.0.0.1:5999/v",
        ])
        .unwrap();
        assert_eq!((c.producers, c.consumers, c.size), (2, 3, 1024));
        assert_eq!(c.rate, 500.0);
        assert_eq!((c.prefetch, c.confirms, c.ack_every), (100, Some(50), 10));
        assert!(c.persistent && c.queue.durable && c.queue.auto_delete);
        assert_eq!(c.duration, Duration::from_secs(5));
        assert_eq!(c.queue.name, "q1");
        assert_eq!(c.endpoint.port, 5999);
        assert_eq!(c.endpoint.vhost, "v");
        assert!(!c.auto_ack);
    }

    #[test]
    fn defaults_and_checks() {
        let c = parse(&["-a"]).unwrap();
        assert!(c.auto_ack && !c.persistent && c.confirms.is_none());
        assert_eq!(c.ack_every, 1);
        assert!(parse(&["-f", "immediate"]).is_err());
        let m = parse(&["-f", "mandatory", "-f", "persistent"]).unwrap();
        assert!(m.mandatory && m.persistent && !c.mandatory);
        assert!(parse(&["-s", "200000000"]).is_err());
        assert!(parse(&["-z", "0"]).is_err());
        assert!(parse(&["-c", "0"]).is_err());
        assert!(parse(&["-x", "0", "-y", "0"]).is_err());
        // Ack batches never exceed the prefetch.
        assert_eq!(parse(&["-q", "5", "-A", "50"]).unwrap().ack_every, 5);
        assert_eq!(c.consumer_endpoint, c.endpoint);
        assert!(c.exit_idle.is_none() && !c.track_ids);
        assert!(
            !parse(&["--auto-delete", "false"])
                .unwrap()
                .queue
                .auto_delete
        );
    }

    #[test]
    fn consumers_on_another_node_drain_and_ids() {
        let c = parse(&[
            "--uri",
            "amqp://127.0.0.1:5001",
            "--consumer-uri",
            "amqp://127.0.0.1:5002",
            "-x",
            "0",
            "--exit-when",
            "idle",
            "--ids-out",
            "/tmp/ids.json",
            "-s",
            "1024",
        ])
        .unwrap();
        assert_eq!((c.endpoint.port, c.consumer_endpoint.port), (5001, 5002));
        assert_eq!(c.echo.consumer_broker.as_deref(), Some("127.0.0.1:5002"));
        assert_eq!(c.exit_idle, Some(Duration::from_secs(1)));
        assert!(c.track_ids);
        assert!(parse(&["--exit-when", "empty"]).is_err());
        // Ids are per producer and live in the body.
        assert!(parse(&["-x", "2", "-s", "1024", "--ids-out", "/tmp/x"]).is_err());
        assert!(parse(&["-s", "4", "--ids-out", "/tmp/x"]).is_err());
    }
}
