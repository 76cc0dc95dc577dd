//! Command-line parsing for `warren-ctl`, shaped like rabbitmqctl's.
//!
//! Options may come before or after the verb, as with rabbitmqctl
//! (`warren-ctl list_queues -q name messages`). One letter is overloaded:
//! `-p` before the verb is the password (`-u USER -p PASS`), after the verb it
//! is the virtual host (`set_permissions -p / bob ...`), which is how
//! rabbitmqctl users already write it. The long forms `--password` and
//! `--vhost` are never ambiguous.

use std::time::Duration;

use serde_json::Value;

use super::{CtlError, DEFAULT_PORT};

/// How list output is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formatter {
    /// rabbitmqctl's default: a header row and tab-separated rows.
    Table,
    /// rabbitmqctl's `--formatter json`.
    Json,
}

/// The management API a command talks to: `http://HOST:PORT[/prefix]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Host as written in the URL (IPv6 literals keep their brackets).
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub prefix: String,
    /// What messages call the node: the node name if one was given, else the URL.
    pub display: String,
}

impl Target {
    /// Parses `-n`: a URL (`http://127.0.0.1:15672`) or a node name
    /// (`warren@HOST`, or a bare `warren` meaning this host), which maps to
    /// `http://HOST:15672`.
    pub fn parse(s: &str) -> Result<Target, CtlError> {
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, path) = match rest.find('/') {
                Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
                None => (rest, ""),
            };
            if authority.contains('@') {
                return Err(CtlError::usage(format!(
                    "credentials in the node URL are not supported, use -u and -p: {s}"
                )));
            }
            let (host, port) = split_host_port(authority).ok_or_else(|| {
                CtlError::usage(format!("cannot read the host and port of node URL {s:?}"))
            })?;
            return Ok(Target {
                host,
                port,
                prefix: path.to_string(),
                display: s.trim_end_matches('/').to_string(),
            });
        }
        if s.contains("://") {
            return Err(CtlError::usage(format!(
                "only http:// node URLs are supported, got {s:?}"
            )));
        }
        let host = match s.split_once('@') {
            Some((_, host)) => host,
            None => "localhost",
        };
        if host.is_empty() || host.contains('/') {
            return Err(CtlError::usage(format!("cannot read node name {s:?}")));
        }
        // A node name's host part may carry no port; an IPv6 literal needs brackets in a URL.
        let host = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        Ok(Target {
            host,
            port: DEFAULT_PORT,
            prefix: String::new(),
            display: s.to_string(),
        })
    }

    /// The host to connect to (IPv6 brackets removed).
    pub fn connect_host(&self) -> &str {
        self.host.trim_start_matches('[').trim_end_matches(']')
    }

    /// The value of the Host header.
    pub fn host_header(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

impl Default for Target {
    fn default() -> Self {
        Target {
            host: "localhost".into(),
            port: DEFAULT_PORT,
            prefix: String::new(),
            display: format!("http://localhost:{DEFAULT_PORT}"),
        }
    }
}

fn split_host_port(authority: &str) -> Option<(String, u16)> {
    if authority.is_empty() {
        return None;
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let end = rest.find(']')?;
        let host = format!("[{}]", &rest[..end]);
        let after = &rest[end + 1..];
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => 80,
            None => return None,
        };
        return Some((host, port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), 80)),
    }
}

/// One parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    pub target: Target,
    pub user: String,
    pub password: String,
    pub formatter: Formatter,
    /// `-q`: no informational line.
    pub quiet: bool,
    /// `-s`: no informational line and no table header.
    pub silent: bool,
    pub no_table_headers: bool,
    /// Per-request timeout (await_startup: the whole wait).
    pub timeout: Option<Duration>,
    pub command: Command,
}

/// Columns a list verb may print, and the ones it prints by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Queues,
    Exchanges,
    Bindings,
    Connections,
    Channels,
    Consumers,
    Users,
    Vhosts,
    Policies,
    OperatorPolicies,
    Permissions,
}

impl ListKind {
    pub fn supported(self) -> &'static [&'static str] {
        match self {
            ListKind::Queues => &[
                "name",
                "durable",
                "auto_delete",
                "arguments",
                "policy",
                "operator_policy",
                "effective_policy_definition",
                "pid",
                "owner_pid",
                "exclusive",
                "exclusive_consumer_pid",
                "exclusive_consumer_tag",
                "messages_ready",
                "messages_unacknowledged",
                "messages",
                "messages_ready_ram",
                "messages_unacknowledged_ram",
                "messages_ram",
                "messages_persistent",
                "message_bytes",
                "message_bytes_ready",
                "message_bytes_unacknowledged",
                "message_bytes_ram",
                "message_bytes_persistent",
                "head_message_timestamp",
                "consumers",
                "consumer_utilisation",
                "consumer_capacity",
                "memory",
                "slave_pids",
                "synchronised_slave_pids",
                "state",
                "type",
                "vhost",
                "node",
            ],
            ListKind::Exchanges => &[
                "name",
                "type",
                "durable",
                "auto_delete",
                "internal",
                "arguments",
                "policy",
                "vhost",
            ],
            ListKind::Bindings => &[
                "source_name",
                "source_kind",
                "destination_name",
                "destination_kind",
                "routing_key",
                "arguments",
                "vhost",
            ],
            ListKind::Connections => &[
                "name",
                "user",
                "peer_host",
                "peer_port",
                "host",
                "port",
                "state",
                "channels",
                "protocol",
                "vhost",
                "timeout",
                "frame_max",
                "channel_max",
                "recv_oct",
                "recv_cnt",
                "send_oct",
                "send_cnt",
                "ssl",
                "auth_mechanism",
                "client_properties",
                "connected_at",
                "node",
            ],
            ListKind::Channels => &[
                "pid",
                "name",
                "connection",
                "number",
                "user",
                "vhost",
                "transactional",
                "confirm",
                "consumer_count",
                "messages_unacknowledged",
                "messages_uncommitted",
                "acks_uncommitted",
                "messages_unconfirmed",
                "prefetch_count",
                "global_prefetch_count",
                "state",
                "node",
            ],
            ListKind::Consumers => &[
                "queue_name",
                "channel_pid",
                "consumer_tag",
                "ack_required",
                "prefetch_count",
                "active",
                "exclusive",
                "arguments",
            ],
            ListKind::Users => &["user", "tags"],
            ListKind::Vhosts => &["name", "description", "tags", "tracing", "cluster_state"],
            ListKind::Policies | ListKind::OperatorPolicies => &[
                "vhost",
                "name",
                "pattern",
                "apply-to",
                "definition",
                "priority",
            ],
            ListKind::Permissions => &["user", "configure", "write", "read"],
        }
    }

    pub fn default_columns(self) -> &'static [&'static str] {
        match self {
            ListKind::Queues => &["name", "messages"],
            ListKind::Exchanges => &["name", "type"],
            ListKind::Bindings => &[
                "source_name",
                "source_kind",
                "destination_name",
                "destination_kind",
                "routing_key",
                "arguments",
            ],
            ListKind::Connections => &["user", "peer_host", "peer_port", "state"],
            ListKind::Channels => &["pid", "user", "consumer_count", "messages_unacknowledged"],
            ListKind::Consumers => &[
                "queue_name",
                "channel_pid",
                "consumer_tag",
                "ack_required",
                "prefetch_count",
                "active",
                "arguments",
            ],
            ListKind::Users => &["user", "tags"],
            ListKind::Vhosts => &["name"],
            ListKind::Policies | ListKind::OperatorPolicies => self.supported(),
            ListKind::Permissions => self.supported(),
        }
    }

    /// Whether the verb takes `[column ...]` (the policy lists and list_permissions do not).
    fn takes_columns(self) -> bool {
        !matches!(
            self,
            ListKind::Policies | ListKind::OperatorPolicies | ListKind::Permissions
        )
    }

    /// Whether the verb lists one virtual host (`-p`), or the whole node.
    pub fn per_vhost(self) -> bool {
        matches!(
            self,
            ListKind::Queues
                | ListKind::Exchanges
                | ListKind::Bindings
                | ListKind::Consumers
                | ListKind::Policies
                | ListKind::OperatorPolicies
                | ListKind::Permissions
        )
    }
}

/// A verb with its arguments.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    ClusterStatus,
    JoinCluster {
        node: String,
    },
    ForgetClusterNode {
        node: String,
    },
    StopApp,
    StartApp,
    Status,
    AwaitStartup,
    List {
        kind: ListKind,
        vhost: String,
        columns: Vec<String>,
    },
    /// set_policy, or set_operator_policy when `operator`.
    SetPolicy {
        operator: bool,
        vhost: String,
        name: String,
        pattern: String,
        definition: String,
        priority: i64,
        apply_to: String,
    },
    /// set_vhost_limits: the vhost's whole limits object (`{"max-connections": N, ...}`).
    SetVhostLimits {
        vhost: String,
        definition: String,
    },
    ClearVhostLimits {
        vhost: String,
    },
    /// clear_policy, or clear_operator_policy when `operator`.
    ClearPolicy {
        operator: bool,
        vhost: String,
        name: String,
    },
    AddUser {
        name: String,
        password: String,
    },
    DeleteUser {
        name: String,
    },
    ChangePassword {
        name: String,
        password: String,
    },
    SetUserTags {
        name: String,
        tags: Vec<String>,
    },
    SetPermissions {
        vhost: String,
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    AddVhost {
        name: String,
    },
    DeleteVhost {
        name: String,
    },
    ExportDefinitions {
        path: String,
    },
    ImportDefinitions {
        path: String,
    },
    PurgeQueue {
        vhost: String,
        name: String,
    },
    /// `sync_queue` (`cancel`: `cancel_sync_queue`).
    SyncQueue {
        vhost: String,
        name: String,
        cancel: bool,
    },
    DeleteQueue {
        vhost: String,
        name: String,
        if_empty: bool,
        if_unused: bool,
    },
    Help,
    /// `--version` / `-V`: the program's name and version.
    Version,
}

/// Every verb, for the usage text.
pub const VERBS: &[(&str, &str)] = &[
    ("add_user", "<username> <password>"),
    ("add_vhost", "<vhost>"),
    ("await_startup", "[--timeout <seconds>]"),
    ("change_password", "<username> <password>"),
    ("clear_operator_policy", "[-p <vhost>] <name>"),
    ("clear_policy", "[-p <vhost>] <name>"),
    ("clear_vhost_limits", "[-p <vhost>]"),
    ("cluster_status", ""),
    ("delete_queue", "[-p <vhost>] [--if-empty] [--if-unused] <queue>"),
    ("delete_user", "<username>"),
    ("delete_vhost", "<vhost>"),
    ("export_definitions", "<file | ->"),
    ("forget_cluster_node", "<node>"),
    ("import_definitions", "<file | ->"),
    ("join_cluster", "<node>"),
    ("list_bindings", "[-p <vhost>] [<column> ...]"),
    ("list_channels", "[<column> ...]"),
    ("list_connections", "[<column> ...]"),
    ("list_consumers", "[-p <vhost>] [<column> ...]"),
    ("list_exchanges", "[-p <vhost>] [<column> ...]"),
    ("list_permissions", "[-p <vhost>]"),
    ("list_operator_policies", "[-p <vhost>]"),
    ("list_policies", "[-p <vhost>]"),
    ("list_queues", "[-p <vhost>] [<column> ...]"),
    ("list_users", "[<column> ...]"),
    ("list_vhosts", "[<column> ...]"),
    ("purge_queue", "[-p <vhost>] <queue>"),
    ("sync_queue", "[-p <vhost>] <queue>"),
    ("cancel_sync_queue", "[-p <vhost>] <queue>"),
    (
        "set_permissions",
        "[-p <vhost>] <username> <conf> <write> <read>",
    ),
    (
        "set_operator_policy",
        "[-p <vhost>] [--priority <n>] [--apply-to <queues|all>] <name> <pattern> <definition>",
    ),
    (
        "set_policy",
        "[-p <vhost>] [--priority <n>] [--apply-to <queues|exchanges|all>] <name> <pattern> <definition>",
    ),
    ("set_user_tags", "<username> [<tag> ...]"),
    ("set_vhost_limits", "[-p <vhost>] <definition>"),
    ("start_app", ""),
    ("status", ""),
    ("stop_app", ""),
];

/// The usage text (printed for `help` and after usage errors).
pub fn usage() -> String {
    let mut s = String::from(
        "Usage: warren-ctl [-n <url|node>] [-u <user>] [-p <password>] [--formatter json] [-q] \
         [-t <seconds>] <command> [<command options>]\n\
         \x20      warren-ctl --help | --version\n\n\
         rabbitmqctl's commands, spoken to a node's management HTTP API.\n\n\
         -n accepts a management API URL (http://127.0.0.1:15672) or a node name (warren@HOST, \
         meaning http://HOST:15672).\n\
         Without -n: http://localhost:15672, as guest/guest (guest logs in from loopback only).\n\
         Before the command, -p is the password; after it, -p (or --vhost) is the virtual host.\n\
         -t sets the request timeout in seconds; -q leaves out the informational line, -s the \
         header row too.\n\n\
         Commands:\n",
    );
    for (verb, args) in VERBS {
        s.push_str(format!("  {verb} {args}").trim_end());
        s.push('\n');
    }
    s
}

#[derive(Default)]
struct Raw {
    positional: Vec<String>,
    help: bool,
    version: bool,
    node: Option<String>,
    user: Option<String>,
    password: Option<String>,
    vhost: Option<String>,
    formatter: Option<String>,
    quiet: bool,
    silent: bool,
    no_table_headers: bool,
    timeout: Option<String>,
    apply_to: Option<String>,
    priority: Option<String>,
    if_empty: bool,
    if_unused: bool,
}

/// Parses the arguments after the program name.
pub fn parse<I, S>(args: I) -> Result<Invocation, CtlError>
where
    I: IntoIterator<Item = S>,
    S: Into<String>,
{
    let mut raw = Raw::default();
    let mut it = args.into_iter().map(Into::into);
    let mut only_positional = false;
    while let Some(arg) = it.next() {
        if only_positional || !arg.starts_with('-') || arg == "-" {
            raw.positional.push(arg);
            continue;
        }
        if arg == "--" {
            only_positional = true;
            continue;
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let verb_seen = !raw.positional.is_empty();
        let mut value = |name: &str| -> Result<String, CtlError> {
            match inline.clone().or_else(|| it.next()) {
                Some(v) => Ok(v),
                None => Err(CtlError::usage(format!("option {name} needs a value"))),
            }
        };
        match flag.as_str() {
            "-n" | "--node" => raw.node = Some(value(&flag)?),
            "-u" | "--username" | "--user" => raw.user = Some(value(&flag)?),
            "--password" => raw.password = Some(value(&flag)?),
            "-p" if !verb_seen => raw.password = Some(value(&flag)?),
            "-p" | "--vhost" => raw.vhost = Some(value(&flag)?),
            "--formatter" => raw.formatter = Some(value(&flag)?),
            "-q" | "--quiet" => raw.quiet = true,
            "-s" | "--silent" => raw.silent = true,
            "--no-table-headers" => raw.no_table_headers = true,
            "-t" | "--timeout" => raw.timeout = Some(value(&flag)?),
            "--apply-to" => raw.apply_to = Some(value(&flag)?),
            "--priority" => raw.priority = Some(value(&flag)?),
            "--if-empty" | "-e" => raw.if_empty = true,
            "--if-unused" => raw.if_unused = true,
            "-h" | "--help" => raw.help = true,
            "-V" | "--version" => raw.version = true,
            _ => return Err(CtlError::usage(format!("unknown option {arg}"))),
        }
    }
    build(raw)
}

fn build(raw: Raw) -> Result<Invocation, CtlError> {
    let formatter = match raw.formatter.as_deref() {
        None | Some("table") => Formatter::Table,
        Some("json") => Formatter::Json,
        Some(other) => {
            return Err(CtlError::usage(format!(
                "unknown formatter {other:?} (supported: table, json)"
            )))
        }
    };
    let timeout = match raw.timeout.as_deref() {
        None => None,
        Some(t) => match t.parse::<f64>() {
            Ok(secs) if secs.is_finite() && secs > 0.0 && secs < 1e9 => {
                Some(Duration::from_secs_f64(secs))
            }
            _ => {
                return Err(CtlError::usage(format!(
                    "timeout must be a positive number of seconds, got {t:?}"
                )))
            }
        },
    };
    let target = match raw.node.as_deref() {
        Some(n) => Target::parse(n)?,
        None => Target::default(),
    };
    // `--help` and `--version` win over everything else on the line, as in most tools.
    let early = if raw.help {
        Some(Command::Help)
    } else if raw.version {
        Some(Command::Version)
    } else {
        None
    };
    if let Some(command) = early {
        return Ok(Invocation {
            target,
            user: raw.user.unwrap_or_else(|| "guest".to_string()),
            password: raw.password.unwrap_or_else(|| "guest".to_string()),
            formatter,
            quiet: raw.quiet,
            silent: raw.silent,
            no_table_headers: raw.no_table_headers,
            timeout,
            command,
        });
    }
    let mut pos = raw.positional.into_iter();
    let verb = pos.next();
    let args: Vec<String> = pos.collect();
    let vhost = raw.vhost.clone().unwrap_or_else(|| "/".to_string());
    let Some(verb) = verb else {
        return Err(CtlError::usage("no command given".to_string()));
    };
    let exact = |n: usize| -> Result<&[String], CtlError> {
        match args.len().cmp(&n) {
            std::cmp::Ordering::Equal => Ok(&args[..]),
            std::cmp::Ordering::Less => Err(CtlError::usage(format!(
                "{verb}: not enough arguments ({})",
                usage_of(&verb)
            ))),
            std::cmp::Ordering::Greater => Err(CtlError::usage(format!(
                "{verb}: too many arguments ({})",
                usage_of(&verb)
            ))),
        }
    };
    let list = |kind: ListKind| -> Result<Command, CtlError> {
        if !kind.takes_columns() && !args.is_empty() {
            return Err(CtlError::usage(format!(
                "{verb}: too many arguments ({})",
                usage_of(&verb)
            )));
        }
        let bad: Vec<&str> = args
            .iter()
            .map(String::as_str)
            .filter(|c| !kind.supported().contains(c))
            .collect();
        if !bad.is_empty() {
            return Err(CtlError::usage(format!(
                "Info key(s) {} are not supported (supported: {})",
                bad.join(","),
                kind.supported().join(", ")
            )));
        }
        let columns = if args.is_empty() {
            kind.default_columns()
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            args.clone()
        };
        Ok(Command::List {
            kind,
            vhost: vhost.clone(),
            columns,
        })
    };
    let command = match verb.as_str() {
        "help" | "--help" | "-h" => Command::Help,
        "cluster_status" => {
            exact(0)?;
            Command::ClusterStatus
        }
        "join_cluster" => Command::JoinCluster {
            node: exact(1)?[0].clone(),
        },
        "forget_cluster_node" => Command::ForgetClusterNode {
            node: exact(1)?[0].clone(),
        },
        "stop_app" => {
            exact(0)?;
            Command::StopApp
        }
        "start_app" => {
            exact(0)?;
            Command::StartApp
        }
        "status" => {
            exact(0)?;
            Command::Status
        }
        "await_startup" => {
            exact(0)?;
            Command::AwaitStartup
        }
        "list_queues" => list(ListKind::Queues)?,
        "list_exchanges" => list(ListKind::Exchanges)?,
        "list_bindings" => list(ListKind::Bindings)?,
        "list_connections" => list(ListKind::Connections)?,
        "list_channels" => list(ListKind::Channels)?,
        "list_consumers" => list(ListKind::Consumers)?,
        "list_users" => list(ListKind::Users)?,
        "list_vhosts" => list(ListKind::Vhosts)?,
        "list_policies" => list(ListKind::Policies)?,
        "list_operator_policies" => list(ListKind::OperatorPolicies)?,
        "list_permissions" => list(ListKind::Permissions)?,
        verb @ ("set_policy" | "set_operator_policy") => {
            let a = exact(3)?;
            let priority = match raw.priority.as_deref() {
                None => 0,
                Some(p) => p.parse::<i64>().map_err(|_| {
                    CtlError::usage(format!("--priority must be an integer, got {p:?}"))
                })?,
            };
            let apply_to = raw.apply_to.clone().unwrap_or_else(|| "all".to_string());
            if ![
                "all",
                "queues",
                "exchanges",
                "classic_queues",
                "quorum_queues",
                "streams",
            ]
            .contains(&apply_to.as_str())
            {
                return Err(CtlError::usage(format!(
                    "--apply-to must be queues, exchanges or all, got {apply_to:?}"
                )));
            }
            Command::SetPolicy {
                operator: verb == "set_operator_policy",
                vhost,
                name: a[0].clone(),
                pattern: a[1].clone(),
                definition: a[2].clone(),
                priority,
                apply_to,
            }
        }
        "set_vhost_limits" => Command::SetVhostLimits {
            vhost,
            definition: exact(1)?[0].clone(),
        },
        "clear_vhost_limits" => {
            exact(0)?;
            Command::ClearVhostLimits { vhost }
        }
        verb @ ("clear_policy" | "clear_operator_policy") => Command::ClearPolicy {
            operator: verb == "clear_operator_policy",
            vhost,
            name: exact(1)?[0].clone(),
        },
        "add_user" => {
            let a = exact(2)?;
            Command::AddUser {
                name: a[0].clone(),
                password: a[1].clone(),
            }
        }
        "delete_user" => Command::DeleteUser {
            name: exact(1)?[0].clone(),
        },
        "change_password" => {
            let a = exact(2)?;
            Command::ChangePassword {
                name: a[0].clone(),
                password: a[1].clone(),
            }
        }
        "set_user_tags" => {
            let Some((name, tags)) = args.split_first() else {
                return Err(CtlError::usage(format!(
                    "{verb}: not enough arguments ({})",
                    usage_of(&verb)
                )));
            };
            Command::SetUserTags {
                name: name.clone(),
                tags: tags.to_vec(),
            }
        }
        "set_permissions" => {
            let a = exact(4)?;
            Command::SetPermissions {
                vhost,
                user: a[0].clone(),
                configure: a[1].clone(),
                write: a[2].clone(),
                read: a[3].clone(),
            }
        }
        "add_vhost" => Command::AddVhost {
            name: exact(1)?[0].clone(),
        },
        "delete_vhost" => Command::DeleteVhost {
            name: exact(1)?[0].clone(),
        },
        "export_definitions" => Command::ExportDefinitions {
            path: exact(1)?[0].clone(),
        },
        "import_definitions" => Command::ImportDefinitions {
            path: exact(1)?[0].clone(),
        },
        "purge_queue" => Command::PurgeQueue {
            vhost,
            name: exact(1)?[0].clone(),
        },
        verb @ ("sync_queue" | "cancel_sync_queue") => Command::SyncQueue {
            vhost,
            name: exact(1)?[0].clone(),
            cancel: verb == "cancel_sync_queue",
        },
        "delete_queue" => Command::DeleteQueue {
            vhost,
            name: exact(1)?[0].clone(),
            if_empty: raw.if_empty,
            if_unused: raw.if_unused,
        },
        other => return Err(CtlError::usage(format!("command '{other}' not found"))),
    };
    Ok(Invocation {
        target,
        user: raw.user.unwrap_or_else(|| "guest".to_string()),
        password: raw.password.unwrap_or_else(|| "guest".to_string()),
        formatter,
        quiet: raw.quiet || raw.silent,
        silent: raw.silent,
        no_table_headers: raw.no_table_headers || raw.silent,
        timeout,
        command,
    })
}

fn usage_of(verb: &str) -> String {
    match VERBS.iter().find(|(v, _)| *v == verb) {
        Some((v, "")) => format!("usage: {v}"),
        Some((v, a)) => format!("usage: {v} {a}"),
        None => String::new(),
    }
}

/// Checks a policy definition the way the API will read it: a JSON object.
pub fn parse_definition(s: &str) -> Result<Value, CtlError> {
    match serde_json::from_str::<Value>(s) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(CtlError::data(format!(
            "policy definition must be a JSON object, got {s}"
        ))),
        Err(e) => Err(CtlError::data(format!(
            "policy definition is not valid JSON ({e}): {s}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit;

    fn p(args: &[&str]) -> Result<Invocation, CtlError> {
        parse(args.iter().copied())
    }

    #[test]
    fn seed_set_policy_line() {
        let inv = p(&[
            "set_policy",
            "ha-all",
            "",
            r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#,
        ])
        .expect("parses");
        assert_eq!(
            inv.command,
            Command::SetPolicy {
                operator: false,
                vhost: "/".into(),
                name: "ha-all".into(),
                pattern: "".into(),
                definition: r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#.into(),
                priority: 0,
                apply_to: "all".into(),
            }
        );
        assert_eq!(inv.user, "guest");
        assert_eq!(inv.password, "guest");
        assert_eq!(inv.target, Target::default());
    }

    #[test]
    fn set_policy_options_anywhere() {
        let inv = p(&[
            "set_policy",
            "--apply-to",
            "queues",
            "-p",
            "v1",
            "--priority=7",
            "n",
            "^a",
            "{}",
        ])
        .expect("parses");
        match inv.command {
            Command::SetPolicy {
                vhost,
                priority,
                apply_to,
                ..
            } => {
                assert_eq!(vhost, "v1");
                assert_eq!(priority, 7);
                assert_eq!(apply_to, "queues");
            }
            other => panic!("wrong command {other:?}"),
        }
    }

    #[test]
    fn dash_p_is_password_before_the_verb_and_vhost_after() {
        let inv = p(&["-u", "bob", "-p", "secret", "list_queues", "-p", "v2"]).expect("parses");
        assert_eq!(inv.user, "bob");
        assert_eq!(inv.password, "secret");
        assert_eq!(
            inv.command,
            Command::List {
                kind: ListKind::Queues,
                vhost: "v2".into(),
                columns: vec!["name".into(), "messages".into()],
            }
        );
        let inv = p(&["--vhost", "v3", "--password", "x", "list_exchanges"]).expect("parses");
        assert_eq!(inv.password, "x");
        assert!(matches!(inv.command, Command::List { ref vhost, .. } if vhost == "v3"));
    }

    #[test]
    fn list_columns_are_checked() {
        let inv = p(&["list_queues", "name", "messages", "consumers", "durable"]).expect("parses");
        assert!(
            matches!(inv.command, Command::List { ref columns, .. } if columns == &["name", "messages", "consumers", "durable"])
        );
        let err = p(&["list_queues", "nosuchcol"]).expect_err("bad column");
        assert_eq!(err.code, exit::USAGE);
        assert!(err.message.contains("nosuchcol"), "{}", err.message);
        assert_eq!(
            p(&["list_policies", "name"]).expect_err("no columns").code,
            exit::USAGE
        );
    }

    #[test]
    fn usage_errors() {
        for bad in [
            &[][..],
            &["nosuchverb"],
            &["set_policy", "a", "b"],
            &["add_user", "bob"],
            &["delete_user"],
            &["delete_user", "a", "b"],
            &["list_queues", "--formatter", "xml"],
            &["--timeout", "soon", "status"],
            &["set_policy", "--priority", "high", "n", "", "{}"],
            &["set_policy", "--apply-to", "everything", "n", "", "{}"],
            &["status", "--bogus"],
            &["-n"],
            &["-n", "https://h:1", "status"],
            &["join_cluster"],
        ] {
            let err = p(bad).expect_err("must be refused");
            assert_eq!(err.code, exit::USAGE, "{bad:?}: {}", err.message);
        }
    }

    #[test]
    fn flags() {
        let inv = p(&["list_users", "-q", "--formatter", "json", "-t", "2.5"]).expect("parses");
        assert!(inv.quiet);
        assert!(!inv.no_table_headers);
        assert_eq!(inv.formatter, Formatter::Json);
        assert_eq!(inv.timeout, Some(Duration::from_millis(2500)));
        let inv = p(&["-s", "list_users"]).expect("parses");
        assert!(inv.quiet && inv.no_table_headers);
        let inv = p(&["delete_queue", "--if-empty", "--if-unused", "q"]).expect("parses");
        assert!(matches!(
            inv.command,
            Command::DeleteQueue {
                if_empty: true,
                if_unused: true,
                ..
            }
        ));
        // After `--` a value may start with a dash.
        let inv = p(&["add_user", "--", "bob", "-pw-"]).expect("parses");
        assert!(matches!(inv.command, Command::AddUser { ref password, .. } if password == "-pw-"));
    }

    #[test]
    fn targets() {
        let t = Target::parse("http://127.0.0.1:15673").expect("url");
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("127.0.0.1", 15673, "")
        );
        let t = Target::parse("http://example.test/prefix/").expect("url with path");
        assert_eq!(
            (t.host.as_str(), t.port, t.prefix.as_str()),
            ("example.test", 80, "/prefix")
        );
        let t = Target::parse("http://[::1]:8080").expect("v6");
        assert_eq!((t.connect_host(), t.port), ("::1", 8080));
        assert_eq!(t.host_header(), "[::1]:8080");
        let t = Target::parse("warren@10.0.0.11").expect("node");
        assert_eq!((t.host.as_str(), t.port), ("10.0.0.11", DEFAULT_PORT));
        assert_eq!(t.display, "warren@10.0.0.11");
        let t = Target::parse("warren").expect("bare node");
        assert_eq!(t.host, "localhost");
        let t = Target::parse("warren@::1").expect("v6 node");
        assert_eq!(t.host_header(), format!("[::1]:{DEFAULT_PORT}"));
        for bad in [
            "http://",
            "http://h:notaport",
            "http://u:p@h:1",
            "ftp://h",
            "warren@",
            "http://[::1",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn definitions_must_be_json_objects() {
        assert!(parse_definition(r#"{"ha-mode":"all"}"#).is_ok());
        for bad in ["{bad", "[1]", "\"s\"", ""] {
            assert_eq!(
                parse_definition(bad).expect_err(bad).code,
                exit::DATA_ERR,
                "{bad}"
            );
        }
    }
}
