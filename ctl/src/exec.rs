//! Runs one parsed command against the management API.
//!
//! Everything here goes through the [`Api`] trait, so the unit tests script
//! the API's answers and check both the requests made and the text printed.
//! Messages mirror rabbitmqctl's: an informational line first (unless `-q`
//! or `--formatter json`), then the result on stdout; failures come back as
//! [`CtlError`] with their exit code, and the binary prints them on stderr.

use std::io::{Read, Write};
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::args::{parse_definition, usage, Command, Formatter, Invocation, ListKind};
use super::format;
use super::{encode_segment as enc, exit, Api, CtlError, Method, TransportError};

/// How long await_startup waits when no `--timeout` is given (rabbitmqctl's default).
pub const AWAIT_STARTUP_DEFAULT: Duration = Duration::from_secs(300);
/// Pause between await_startup attempts.
pub const AWAIT_STARTUP_POLL: Duration = Duration::from_millis(200);

/// An HTTP failure that is not fatal by itself: status and the API's reason.
struct HttpFailure {
    status: u16,
    reason: String,
}

struct Ctx<'a> {
    inv: &'a Invocation,
    api: &'a mut dyn Api,
    out: &'a mut dyn Write,
}

/// Runs `inv` and writes its output to `out`.
pub fn run(inv: &Invocation, api: &mut dyn Api, out: &mut dyn Write) -> Result<(), CtlError> {
    let mut cx = Ctx { inv, api, out };
    cx.run()
}

fn reason_of(body: &[u8]) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => match (v.get("reason"), v.get("error")) {
            (Some(Value::String(r)), _) => r.clone(),
            (Some(r), _) if !r.is_null() => r.to_string(),
            (_, Some(Value::String(e))) => e.clone(),
            _ => v.to_string(),
        },
        Err(_) => String::from_utf8_lossy(body)
            .trim()
            .chars()
            .take(300)
            .collect(),
    }
}

impl Ctx<'_> {
    fn info(&mut self, line: &str) -> Result<(), CtlError> {
        if self.inv.quiet || self.inv.formatter == Formatter::Json {
            return Ok(());
        }
        self.print(&format!("{line}\n"))
    }

    fn print(&mut self, s: &str) -> Result<(), CtlError> {
        self.out
            .write_all(s.as_bytes())
            .map_err(|e| CtlError::new(exit::SOFTWARE, format!("cannot write output: {e}")))
    }

    fn node(&self) -> &str {
        &self.inv.target.display
    }

    /// One request. Transport and authentication failures are fatal (`Err`);
    /// other HTTP failures come back as `Ok(Err(..))` for the caller to word.
    fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Result<Value, HttpFailure>, CtlError> {
        let reply = match self.api.call(method, path, body) {
            Ok(r) => r,
            Err(TransportError::Timeout) => {
                return Err(CtlError::new(
                    exit::TEMP_FAIL,
                    format!(
                        "node {} did not answer {} {path} in time",
                        self.node(),
                        method.as_str()
                    ),
                ))
            }
            Err(e) => {
                return Err(CtlError::new(
                    exit::UNAVAILABLE,
                    format!(
                        "unable to reach node {} ({e}). Is it running, with its management API on that address?",
                        self.node()
                    ),
                ))
            }
        };
        match reply.status {
            200..=299 => {
                if reply.body.iter().all(u8::is_ascii_whitespace) {
                    return Ok(Ok(Value::Null));
                }
                serde_json::from_slice(&reply.body).map(Ok).map_err(|e| {
                    CtlError::new(
                        exit::SOFTWARE,
                        format!(
                            "node {} answered {path} with invalid JSON: {e}",
                            self.node()
                        ),
                    )
                })
            }
            401 => Err(CtlError::new(
                exit::NO_PERM,
                format!(
                    "authentication failed for user \"{}\" on node {} (wrong username or password, \
                     or the user may not log in from this host); use -u and -p",
                    self.inv.user,
                    self.node()
                ),
            )),
            403 => Err(CtlError::new(
                exit::NO_PERM,
                format!(
                    "user \"{}\" is not allowed to do this ({}); it needs the administrator tag",
                    self.inv.user,
                    reason_of(&reply.body)
                ),
            )),
            status => {
                let reason = reason_of(&reply.body);
                Ok(Err(HttpFailure {
                    status,
                    reason: if reason.is_empty() {
                        format!("HTTP {status}")
                    } else {
                        reason
                    },
                }))
            }
        }
    }

    /// A request whose every HTTP failure is an error (exit 70).
    fn ok(&mut self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, CtlError> {
        self.send(method, path, body)?.map_err(|f| {
            CtlError::new(
                exit::SOFTWARE,
                format!(
                    "{} {path} failed ({}): {}",
                    method.as_str(),
                    f.status,
                    f.reason
                ),
            )
        })
    }

    /// A request where 404 means `missing` (with its own exit code).
    fn or_missing(
        &mut self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        missing: impl FnOnce() -> CtlError,
    ) -> Result<Value, CtlError> {
        match self.send(method, path, body)? {
            Ok(v) => Ok(v),
            Err(f) if f.status == 404 => Err(missing()),
            Err(f) => Err(CtlError::new(exit::SOFTWARE, f.reason)),
        }
    }

    fn user(&mut self, name: &str) -> Result<Value, CtlError> {
        let missing = || CtlError::new(exit::NO_USER, format!("User \"{name}\" does not exist"));
        self.or_missing(
            Method::Get,
            &format!("/api/users/{}", enc(name)),
            None,
            missing,
        )
    }

    fn run(&mut self) -> Result<(), CtlError> {
        let inv = self.inv;
        match &inv.command {
            Command::Help => self.print(&usage()),
            Command::Version => self.print(&format!("warren-ctl {}\n", env!("CARGO_PKG_VERSION"))),
            Command::List {
                kind,
                vhost,
                columns,
            } => self.list(*kind, vhost, columns),
            Command::JoinCluster { node } => {
                self.info(&format!("Clustering node {} with {node}", self.node()))?;
                let body = json!({ "node": node });
                match self.send(Method::Post, "/api/warren/cluster/join", Some(&body))? {
                    Ok(_) => Ok(()),
                    Err(f) if no_endpoint(f.status) => Err(CtlError::new(
                        exit::SOFTWARE,
                        format!(
                            "node {} cannot join a cluster (is it a warren node?)",
                            self.node()
                        ),
                    )),
                    Err(f) => Err(CtlError::new(exit::SOFTWARE, f.reason)),
                }
            }
            Command::ForgetClusterNode { node } => {
                self.info(&format!("Removing node {node} from the cluster"))?;
                let path = format!("/api/warren/cluster/nodes/{}", enc(node));
                self.or_missing(Method::Delete, &path, None, || {
                    CtlError::new(
                        exit::SOFTWARE,
                        format!("Node {node} is not a member of this cluster"),
                    )
                })
                .map(|_| ())
            }
            Command::StopApp => {
                self.info(&format!(
                    "Stopping warren application on node {} ...",
                    self.node()
                ))?;
                self.set_app(false)
            }
            Command::StartApp => {
                self.info(&format!("Starting node {} ...", self.node()))?;
                self.set_app(true)
            }
            Command::SetPolicy {
                operator,
                vhost,
                name,
                pattern,
                definition,
                priority,
                apply_to,
            } => {
                let (what, resource) = policy_kind(*operator);
                self.info(&format!(
                    "Setting {what} \"{name}\" for pattern \"{pattern}\" to \"{definition}\" \
                     with priority \"{priority}\" for vhost \"{vhost}\" ..."
                ))?;
                let definition = parse_definition(definition)?;
                let body = json!({
                    "pattern": pattern,
                    "definition": definition,
                    "priority": priority,
                    "apply-to": apply_to,
                });
                let path = format!("/api/{resource}/{}/{}", enc(vhost), enc(name));
                match self.send(Method::Put, &path, Some(&body))? {
                    Ok(_) => Ok(()),
                    Err(f) if f.status == 404 => Err(CtlError::new(
                        exit::SOFTWARE,
                        format!(
                            "PUT {path} answered 404: virtual host \"{vhost}\" does not exist, \
                             or node {} does not manage policies",
                            self.node()
                        ),
                    )),
                    Err(f) => Err(CtlError::new(
                        exit::SOFTWARE,
                        format!("{what} refused: {}", f.reason),
                    )),
                }
            }
            Command::SetVhostLimits { vhost, definition } => {
                self.info(&format!(
                    "Applying limits \"{definition}\" to vhost \"{vhost}\" ..."
                ))?;
                let value = parse_definition(definition)?;
                let path = format!("/api/parameters/vhost-limits/{}/limits", enc(vhost));
                let body = json!({"value": value});
                match self.send(Method::Put, &path, Some(&body))? {
                    Ok(_) => Ok(()),
                    Err(f) => Err(CtlError::new(
                        exit::SOFTWARE,
                        format!("vhost limits refused: {}", f.reason),
                    )),
                }
            }
            Command::ClearVhostLimits { vhost } => {
                self.info(&format!("Clearing vhost \"{vhost}\" limits ..."))?;
                let path = format!("/api/parameters/vhost-limits/{}/limits", enc(vhost));
                match self.send(Method::Delete, &path, None)? {
                    Ok(_) => Ok(()),
                    Err(f) => Err(CtlError::new(
                        exit::SOFTWARE,
                        format!("clearing vhost limits refused: {}", f.reason),
                    )),
                }
            }
            Command::ClearPolicy {
                operator,
                vhost,
                name,
            } => {
                let (what, resource) = policy_kind(*operator);
                self.info(&format!(
                    "Clearing {what} \"{name}\" on vhost \"{vhost}\" ..."
                ))?;
                let path = format!("/api/{resource}/{}/{}", enc(vhost), enc(name));
                self.or_missing(Method::Delete, &path, None, || {
                    CtlError::new(
                        exit::SOFTWARE,
                        format!("{what} \"{name}\" does not exist in vhost \"{vhost}\""),
                    )
                })
                .map(drop)
            }
            Command::AddUser { name, password } => {
                self.info(&format!("Adding user \"{name}\" ..."))?;
                let path = format!("/api/users/{}", enc(name));
                if self.send(Method::Get, &path, None)?.is_ok() {
                    return Err(CtlError::new(
                        exit::SOFTWARE,
                        format!("User \"{name}\" already exists"),
                    ));
                }
                self.ok(
                    Method::Put,
                    &path,
                    Some(&json!({"password": password, "tags": ""})),
                )?;
                self.info(
                    "Done. Don't forget to grant the user permissions to some virtual hosts! \
                     See 'warren-ctl help' for set_permissions.",
                )
            }
            Command::DeleteUser { name } => {
                self.info(&format!("Deleting user \"{name}\" ..."))?;
                let path = format!("/api/users/{}", enc(name));
                self.or_missing(Method::Delete, &path, None, || {
                    CtlError::new(exit::NO_USER, format!("User \"{name}\" does not exist"))
                })
                .map(drop)
            }
            Command::ChangePassword { name, password } => {
                self.info(&format!("Changing password for user \"{name}\" ..."))?;
                let user = self.user(name)?;
                let tags = format::tags_of(user.get("tags")).join(",");
                let path = format!("/api/users/{}", enc(name));
                self.ok(
                    Method::Put,
                    &path,
                    Some(&json!({"password": password, "tags": tags})),
                )
                .map(drop)
            }
            Command::SetUserTags { name, tags } => {
                self.info(&format!(
                    "Setting tags for user \"{name}\" to [{}] ...",
                    tags.join(", ")
                ))?;
                let user = self.user(name)?;
                // Re-send the stored hash: a PUT without password fields would leave the user
                // without a password.
                let mut body = Map::new();
                body.insert("tags".into(), Value::String(tags.join(",")));
                for key in ["password_hash", "hashing_algorithm"] {
                    if let Some(v) = user.get(key) {
                        body.insert(key.into(), v.clone());
                    }
                }
                let path = format!("/api/users/{}", enc(name));
                self.ok(Method::Put, &path, Some(&Value::Object(body)))
                    .map(drop)
            }
            Command::SetPermissions {
                vhost,
                user,
                configure,
                write,
                read,
            } => {
                self.info(&format!(
                    "Setting permissions for user \"{user}\" in vhost \"{vhost}\" ..."
                ))?;
                self.user(user)?;
                let path = format!("/api/permissions/{}/{}", enc(vhost), enc(user));
                let body = json!({"configure": configure, "write": write, "read": read});
                self.or_missing(Method::Put, &path, Some(&body), || {
                    CtlError::new(
                        exit::SOFTWARE,
                        format!("Virtual host \"{vhost}\" does not exist"),
                    )
                })
                .map(drop)
            }
            Command::AddVhost { name } => {
                self.info(&format!("Adding vhost \"{name}\" ..."))?;
                let path = format!("/api/vhosts/{}", enc(name));
                self.ok(Method::Put, &path, Some(&json!({}))).map(drop)
            }
            Command::DeleteVhost { name } => {
                self.info(&format!("Deleting vhost \"{name}\" ..."))?;
                let path = format!("/api/vhosts/{}", enc(name));
                self.or_missing(Method::Delete, &path, None, || {
                    CtlError::new(
                        exit::SOFTWARE,
                        format!("Virtual host \"{name}\" does not exist"),
                    )
                })
                .map(drop)
            }
            Command::PurgeQueue { vhost, name } => {
                self.info(&format!("Purging queue '{name}' in vhost '{vhost}' ..."))?;
                let path = format!("/api/queues/{}/{}/contents", enc(vhost), enc(name));
                self.or_missing(Method::Delete, &path, None, || queue_missing(vhost, name))
                    .map(drop)
            }
            Command::SyncQueue {
                vhost,
                name,
                cancel,
            } => {
                let (verb, action) = if *cancel {
                    ("Stopping synchronising", "cancel_sync")
                } else {
                    ("Synchronising", "sync")
                };
                self.info(&format!("{verb} queue '{name}' in vhost '{vhost}' ..."))?;
                let path = format!("/api/queues/{}/{}/actions", enc(vhost), enc(name));
                let body = serde_json::json!({ "action": action });
                self.or_missing(Method::Post, &path, Some(&body), || {
                    queue_missing(vhost, name)
                })
                .map(drop)
            }
            Command::DeleteQueue {
                vhost,
                name,
                if_empty,
                if_unused,
            } => {
                self.info(&format!("Deleting queue '{name}' on vhost '{vhost}' ..."))?;
                let path = format!("/api/queues/{}/{}", enc(vhost), enc(name));
                let q = self.or_missing(Method::Get, &path, None, || queue_missing(vhost, name))?;
                let mut query = Vec::new();
                if *if_empty {
                    query.push("if-empty=true");
                }
                if *if_unused {
                    query.push("if-unused=true");
                }
                let del = if query.is_empty() {
                    path
                } else {
                    format!("{path}?{}", query.join("&"))
                };
                match self.send(Method::Delete, &del, None)? {
                    Ok(_) => {}
                    Err(f) if f.status == 404 => return Err(queue_missing(vhost, name)),
                    Err(f) => {
                        return Err(CtlError::new(
                            exit::SOFTWARE,
                            format!("queue '{name}' was not deleted: {}", f.reason),
                        ))
                    }
                }
                let ready = q.get("messages_ready").and_then(Value::as_u64).unwrap_or(0);
                self.info(&format!(
                    "Queue was successfully deleted with {ready} ready messages"
                ))
            }
            Command::ExportDefinitions { path } => {
                if path != "-" {
                    self.info(&format!(
                        "Exporting definitions in JSON to a file at \"{path}\" ..."
                    ))?;
                }
                let defs = self.ok(Method::Get, "/api/definitions", None)?;
                let mut text = serde_json::to_string_pretty(&defs).unwrap_or_default();
                text.push('\n');
                if path == "-" {
                    return self.print(&text);
                }
                std::fs::write(path, text).map_err(|e| {
                    CtlError::new(exit::CANT_CREATE, format!("cannot write {path}: {e}"))
                })
            }
            Command::ImportDefinitions { path } => {
                if path != "-" {
                    self.info(&format!(
                        "Importing definitions in JSON from a file at \"{path}\" ..."
                    ))?;
                }
                let text = read_input(path)?;
                let defs: Value = serde_json::from_str(&text).map_err(|e| {
                    CtlError::data(format!("{path} is not a JSON definitions document: {e}"))
                })?;
                if !defs.is_object() {
                    return Err(CtlError::data(format!(
                        "{path} is not a JSON definitions document (expected an object)"
                    )));
                }
                match self.send(Method::Post, "/api/definitions", Some(&defs))? {
                    Ok(_) => Ok(()),
                    Err(f) => Err(CtlError::new(
                        exit::DATA_ERR,
                        format!("the node refused the definitions: {}", f.reason),
                    )),
                }
            }
            Command::Status => self.status(),
            Command::ClusterStatus => self.cluster_status(),
            Command::AwaitStartup => self.await_startup(),
        }
    }

    fn set_app(&mut self, running: bool) -> Result<(), CtlError> {
        let body = json!({ "running": running });
        match self.send(Method::Put, "/api/warren/app", Some(&body))? {
            Ok(_) => Ok(()),
            Err(f) if no_endpoint(f.status) => Err(CtlError::new(
                exit::SOFTWARE,
                format!(
                    "node {} has no /api/warren/app endpoint (is it a warren node?)",
                    self.node()
                ),
            )),
            Err(f) => Err(CtlError::new(exit::SOFTWARE, f.reason)),
        }
    }

    fn list(&mut self, kind: ListKind, vhost: &str, columns: &[String]) -> Result<(), CtlError> {
        let v = enc(vhost);
        let (line, path) = match kind {
            ListKind::Queues => (
                format!("Listing queues for vhost {vhost} ..."),
                format!("/api/queues/{v}"),
            ),
            ListKind::Exchanges => (
                format!("Listing exchanges for vhost {vhost} ..."),
                format!("/api/exchanges/{v}"),
            ),
            ListKind::Bindings => (
                format!("Listing bindings for vhost {vhost}..."),
                format!("/api/bindings/{v}"),
            ),
            ListKind::Connections => ("Listing connections ...".into(), "/api/connections".into()),
            ListKind::Channels => ("Listing channels ...".into(), "/api/channels".into()),
            ListKind::Consumers => (
                format!("Listing consumers in vhost {vhost} ..."),
                format!("/api/consumers/{v}"),
            ),
            ListKind::Users => ("Listing users ...".into(), "/api/users".into()),
            ListKind::Vhosts => ("Listing vhosts ...".into(), "/api/vhosts".into()),
            ListKind::Policies => (
                format!("Listing policies for vhost \"{vhost}\" ..."),
                format!("/api/policies/{v}"),
            ),
            ListKind::OperatorPolicies => (
                format!("Listing operator policy overrides for vhost \"{vhost}\" ..."),
                format!("/api/operator-policies/{v}"),
            ),
            ListKind::Permissions => (
                format!("Listing permissions for vhost \"{vhost}\" ..."),
                format!("/api/vhosts/{v}/permissions"),
            ),
        };
        self.info(&line)?;
        let answer = self.or_missing(Method::Get, &path, None, || {
            CtlError::new(
                exit::SOFTWARE,
                format!("Virtual host \"{vhost}\" does not exist"),
            )
        })?;
        let Value::Array(items) = answer else {
            return Err(CtlError::new(
                exit::SOFTWARE,
                format!(
                    "node {} answered {path} with something other than a list",
                    self.node()
                ),
            ));
        };
        let rows = format::rows(kind, columns, &items);
        let text = match self.inv.formatter {
            Formatter::Json => format::json_list(columns, &rows),
            Formatter::Table => format::table(columns, &rows, !self.inv.no_table_headers),
        };
        self.print(&text)
    }

    /// The overview plus this node's entry of /api/nodes.
    fn overview_and_nodes(&mut self) -> Result<(Value, Vec<Value>), CtlError> {
        let overview = self.ok(Method::Get, "/api/overview", None)?;
        let nodes = match self.ok(Method::Get, "/api/nodes", None)? {
            Value::Array(a) => a,
            _ => Vec::new(),
        };
        Ok((overview, nodes))
    }

    fn status(&mut self) -> Result<(), CtlError> {
        let (ov, nodes) = self.overview_and_nodes()?;
        let node_name = ov
            .get("node")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        // Named as rabbitmqctl names it (the node, not the URL asked), once the node said who
        // it is.
        let named = if node_name.is_empty() {
            self.node().to_string()
        } else {
            node_name.clone()
        };
        self.info(&format!("Status of node {named} ..."))?;
        let node = nodes
            .iter()
            .find(|n| n.get("name").and_then(Value::as_str) == Some(&node_name))
            .or_else(|| nodes.first())
            .cloned()
            .unwrap_or(Value::Null);
        let product = format!(
            "{} {}",
            ov.get("product_name")
                .and_then(Value::as_str)
                .unwrap_or("warren"),
            ov.get("product_version")
                .or_else(|| ov.get("rabbitmq_version"))
                .and_then(Value::as_str)
                .unwrap_or("")
        );
        let alarms = node_alarms(&node);
        let n = |k: &str| node.get(k).cloned().unwrap_or(Value::Null);
        let listeners: Vec<Value> = match ov.get("listeners") {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        if self.inv.formatter == Formatter::Json {
            let mut m = Map::new();
            m.insert("node".into(), Value::String(node_name));
            m.insert("product".into(), Value::String(product.trim().to_string()));
            m.insert("running".into(), n("running"));
            m.insert(
                "uptime_seconds".into(),
                node.get("uptime")
                    .and_then(Value::as_u64)
                    .map(|ms| ms / 1000)
                    .into(),
            );
            m.insert("alarms".into(), json!(alarms));
            for k in [
                "mem_used",
                "mem_rss",
                "mem_limit",
                "disk_free",
                "disk_free_limit",
                "fd_used",
                "fd_total",
            ] {
                m.insert(k.into(), n(k));
            }
            m.insert(
                "object_totals".into(),
                ov.get("object_totals").cloned().unwrap_or(Value::Null),
            );
            m.insert("listeners".into(), Value::Array(listeners));
            return self.print(&format::json_object(m));
        }
        let c = |v: Value| format::cell(&v);
        let mut runtime = vec![
            format!("Node name: {node_name}"),
            format!("Product: {}", product.trim()),
        ];
        if let Some(ms) = node.get("uptime").and_then(Value::as_u64) {
            runtime.push(format!("Uptime (seconds): {}", ms / 1000));
        }
        if let Some(pid) = node.get("os_pid") {
            runtime.push(format!("OS PID: {}", format::cell(pid)));
        }
        let totals = ov.get("object_totals").cloned().unwrap_or(Value::Null);
        let totals_lines = [
            "connections",
            "channels",
            "queues",
            "consumers",
            "exchanges",
        ]
        .iter()
        .filter_map(|k| totals.get(k).map(|v| format!("{k}: {}", format::cell(v))))
        .collect();
        let listener_lines = listeners
            .iter()
            .map(|l| {
                format!(
                    "Interface: {}, port: {}, protocol: {}",
                    c(l.get("ip_address").cloned().unwrap_or(Value::Null)),
                    c(l.get("port").cloned().unwrap_or(Value::Null)),
                    c(l.get("protocol").cloned().unwrap_or(Value::Null)),
                )
            })
            .collect();
        let text = format::sections(&[
            ("Runtime", runtime),
            ("Alarms", alarms),
            ("Memory", memory_lines(&node)),
            (
                "Free Disk Space",
                vec![
                    format!(
                        "Low free disk space watermark: {}",
                        gb(&n("disk_free_limit"))
                    ),
                    format!("Free disk space: {}", gb(&n("disk_free"))),
                ],
            ),
            (
                "File Descriptors",
                vec![format!(
                    "Total: {}, limit: {}",
                    c(n("fd_used")),
                    c(n("fd_total"))
                )],
            ),
            ("Totals", totals_lines),
            ("Listeners", listener_lines),
        ]);
        self.print(&text)
    }

    fn cluster_status(&mut self) -> Result<(), CtlError> {
        let (ov, nodes) = self.overview_and_nodes()?;
        let named = match ov.get("node").and_then(Value::as_str) {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => self.node().to_string(),
        };
        self.info(&format!("Cluster status of node {named} ..."))?;
        let cluster = ov
            .get("cluster_name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let name_of = |n: &Value| {
            n.get("name")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let disk: Vec<String> = nodes.iter().map(name_of).collect();
        let running: Vec<String> = nodes
            .iter()
            .filter(|n| n.get("running").and_then(Value::as_bool).unwrap_or(true))
            .map(name_of)
            .collect();
        let mut alarms = Vec::new();
        let mut partitions = Vec::new();
        for n in &nodes {
            for a in node_alarms(n) {
                alarms.push(format!("Node {}: {a}", name_of(n)));
            }
            if let Some(Value::Array(p)) = n.get("partitions") {
                for other in p {
                    partitions.push(format!(
                        "Node {} cannot communicate with {}",
                        name_of(n),
                        format::cell(other)
                    ));
                }
            }
        }
        if self.inv.formatter == Formatter::Json {
            let mut m = Map::new();
            m.insert("cluster_name".into(), Value::String(cluster));
            m.insert("disk_nodes".into(), json!(disk));
            m.insert("running_nodes".into(), json!(running));
            m.insert("alarms".into(), json!(alarms));
            m.insert("partitions".into(), json!(partitions));
            return self.print(&format::json_object(m));
        }
        let text = format::sections(&[
            ("Basics", vec![format!("Cluster name: {cluster}")]),
            ("Disk Nodes", disk),
            ("Running Nodes", running),
            ("Network Partitions", partitions),
            ("Alarms", alarms),
        ]);
        self.print(&text)
    }

    /// Waits until the API answers and (on warren) the application runs.
    fn await_startup(&mut self) -> Result<(), CtlError> {
        let limit = self.inv.timeout.unwrap_or(AWAIT_STARTUP_DEFAULT);
        let deadline = tokio::time::Instant::now() + limit;
        let mut last;
        loop {
            last = match self.send(Method::Get, "/api/overview", None) {
                Ok(Ok(_)) => match self.send(Method::Get, "/api/warren/app", None) {
                    Ok(Ok(app)) if app.get("running").and_then(Value::as_bool) == Some(false) => {
                        "the node answers but its application is stopped".to_string()
                    }
                    // 404: a management API without warren's app endpoint (RabbitMQ): it is up.
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(f)) if no_endpoint(f.status) => return Ok(()),
                    Ok(Err(f)) => f.reason,
                    Err(e) if e.code == exit::NO_PERM => return Err(e),
                    Err(e) => e.message,
                },
                Ok(Err(f)) => format!("HTTP {}: {}", f.status, f.reason),
                Err(e) if e.code == exit::NO_PERM => return Err(e),
                Err(e) => e.message,
            };
            if tokio::time::Instant::now() + AWAIT_STARTUP_POLL > deadline {
                break;
            }
            std::thread::sleep(AWAIT_STARTUP_POLL);
        }
        Err(CtlError::new(
            exit::TEMP_FAIL,
            format!(
                "node {} did not start within {:.1}s; last: {last}",
                self.node(),
                limit.as_secs_f64()
            ),
        ))
    }
}

/// Statuses a management API gives for a path it does not have (RabbitMQ's
/// Cowboy answers 406 to `Accept: application/json` on unknown paths).
fn no_endpoint(status: u16) -> bool {
    matches!(status, 404..=406)
}

fn queue_missing(vhost: &str, name: &str) -> CtlError {
    CtlError::new(
        exit::SOFTWARE,
        format!("queue '{name}' in vhost '{vhost}' not found"),
    )
}

/// The Memory section of `status`. warren reports the process's resident memory as `mem_rss`
/// and, as `mem_used`, the bytes its messages hold (what the memory alarm compares with the
/// watermark); RabbitMQ has no `mem_rss` and its `mem_used` is the process's memory.
fn memory_lines(node: &Value) -> Vec<String> {
    let n = |k: &str| node.get(k).cloned().unwrap_or(Value::Null);
    let mut lines = Vec::new();
    match node.get("mem_rss") {
        Some(rss) if !rss.is_null() => {
            lines.push(format!(
                "Total memory used: {} (resident, process)",
                gb(rss)
            ));
            lines.push(format!(
                "Message memory (the alarm's measure): {}",
                gb(&n("mem_used"))
            ));
        }
        _ => lines.push(format!("Total memory used: {}", gb(&n("mem_used")))),
    }
    lines.push(format!("Memory high watermark: {}", gb(&n("mem_limit"))));
    lines
}

/// Bytes as rabbitmqctl's status prints them ("0.1386 gb").
fn gb(v: &Value) -> String {
    match v.as_f64() {
        Some(b) => format!("{:.4} gb", b / 1e9),
        None => format::cell(v),
    }
}

fn node_alarms(node: &Value) -> Vec<String> {
    let mut alarms = Vec::new();
    if node.get("mem_alarm").and_then(Value::as_bool) == Some(true) {
        alarms.push("memory".to_string());
    }
    if node.get("disk_free_alarm").and_then(Value::as_bool) == Some(true) {
        alarms.push("disk".to_string());
    }
    alarms
}

fn read_input(path: &str) -> Result<String, CtlError> {
    let mut text = String::new();
    let res = if path == "-" {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::read_to_string(path).map(|t| text = t)
    };
    res.map_err(|e| CtlError::new(exit::NO_INPUT, format!("cannot read {path}: {e}")))?;
    Ok(text)
}

/// How a policy verb names its kind, and the API resource for it.
fn policy_kind(operator: bool) -> (&'static str, &'static str) {
    if operator {
        ("operator policy", "operator-policies")
    } else {
        ("policy", "policies")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::parse;
    use crate::Reply;
    use std::collections::VecDeque;

    /// Answers scripted per request, recording what was asked.
    #[derive(Default)]
    struct Fake {
        answers: VecDeque<Result<Reply, TransportError>>,
        seen: Vec<(Method, String, Option<Value>)>,
    }

    impl Fake {
        fn answer(mut self, status: u16, body: Value) -> Self {
            let body = if body.is_null() {
                Vec::new()
            } else {
                body.to_string().into_bytes()
            };
            self.answers.push_back(Ok(Reply { status, body }));
            self
        }
        fn fail(mut self, e: TransportError) -> Self {
            self.answers.push_back(Err(e));
            self
        }
    }

    impl Api for Fake {
        fn call(
            &mut self,
            method: Method,
            path: &str,
            body: Option<&Value>,
        ) -> Result<Reply, TransportError> {
            self.seen.push((method, path.to_string(), body.cloned()));
            self.answers
                .pop_front()
                .unwrap_or(Err(TransportError::Protocol("no scripted answer".into())))
        }
    }

    fn go(args: &[&str], fake: &mut Fake) -> (Result<(), CtlError>, String) {
        let inv = parse(args.iter().copied()).expect("valid command line");
        let mut out = Vec::new();
        let r = run(&inv, fake, &mut out);
        (r, String::from_utf8(out).expect("utf-8 output"))
    }

    #[test]
    fn seed_set_policy_puts_the_policy() {
        let mut api = Fake::default().answer(201, Value::Null);
        let (r, out) = go(
            &[
                "set_policy",
                "ha-all",
                "",
                r#"{"ha-mode":"all","ha-sync-mode":"automatic"}"#,
            ],
            &mut api,
        );
        r.expect("succeeds");
        assert_eq!(
            out,
            "Setting policy \"ha-all\" for pattern \"\" to \"{\"ha-mode\":\"all\",\"ha-sync-mode\":\"automatic\"}\" \
             with priority \"0\" for vhost \"/\" ...\n"
        );
        assert_eq!(
            api.seen,
            vec![(
                Method::Put,
                "/api/policies/%2F/ha-all".to_string(),
                Some(
                    json!({"pattern": "", "definition": {"ha-mode": "all", "ha-sync-mode": "automatic"},
                            "priority": 0, "apply-to": "all"})
                )
            )]
        );
    }

    #[test]
    fn set_vhost_limits_puts_the_limits_parameter() {
        let mut api = Fake::default().answer(204, Value::Null);
        let (r, _) = go(
            &["set_vhost_limits", "-p", "v1", r#"{"max-connections": 8}"#],
            &mut api,
        );
        r.expect("succeeds");
        assert_eq!(
            api.seen,
            vec![(
                Method::Put,
                "/api/parameters/vhost-limits/v1/limits".to_string(),
                Some(json!({"value": {"max-connections": 8}}))
            )]
        );
        let mut api = Fake::default().answer(204, Value::Null);
        let (r, _) = go(&["clear_vhost_limits"], &mut api);
        r.expect("succeeds");
        assert_eq!(
            api.seen,
            vec![(
                Method::Delete,
                "/api/parameters/vhost-limits/%2F/limits".to_string(),
                None
            )]
        );
    }

    #[test]
    fn bad_policy_json_is_a_data_error_without_a_request() {
        let mut api = Fake::default();
        let (r, _) = go(&["set_policy", "p", "", "{bad"], &mut api);
        assert_eq!(r.expect_err("bad json").code, exit::DATA_ERR);
        assert!(api.seen.is_empty());
    }

    #[test]
    fn list_queues_table_and_quiet_and_json() {
        let qs = json!([{"name": "q1", "messages": 1, "vhost": "/"}, {"name": "q2", "messages": 0, "vhost": "/"}]);
        let mut api = Fake::default().answer(200, qs.clone());
        let (r, out) = go(&["list_queues"], &mut api);
        r.expect("ok");
        assert_eq!(
            out,
            "Listing queues for vhost / ...\nname\tmessages\nq1\t1\nq2\t0\n"
        );
        assert_eq!(api.seen[0].1, "/api/queues/%2F");

        let mut api = Fake::default().answer(200, qs.clone());
        let (_, out) = go(&["-q", "list_queues", "-p", "v 1"], &mut api);
        assert_eq!(out, "name\tmessages\nq1\t1\nq2\t0\n");
        assert_eq!(api.seen[0].1, "/api/queues/v%201");

        let mut api = Fake::default().answer(200, qs);
        let (_, out) = go(&["list_queues", "--formatter", "json"], &mut api);
        assert_eq!(
            out,
            "[\n{\"name\":\"q1\",\"messages\":1}\n,{\"name\":\"q2\",\"messages\":0}\n]\n"
        );
    }

    #[test]
    fn http_failures_map_to_exit_codes() {
        let cases: Vec<(Fake, &[&str], i32)> = vec![
            (
                Fake::default().fail(TransportError::Unreachable("refused".into())),
                &["list_users"],
                exit::UNAVAILABLE,
            ),
            (
                Fake::default().fail(TransportError::Timeout),
                &["list_users"],
                exit::TEMP_FAIL,
            ),
            (
                Fake::default().answer(401, json!({"error": "not_authorised"})),
                &["list_users"],
                exit::NO_PERM,
            ),
            (
                Fake::default().answer(403, json!({"error": "not_authorised"})),
                &["list_users"],
                exit::NO_PERM,
            ),
            (
                Fake::default().answer(404, json!({"error": "Object Not Found"})),
                &["delete_user", "x"],
                exit::NO_USER,
            ),
            (
                Fake::default().answer(404, json!({"error": "Object Not Found"})),
                &["change_password", "x", "y"],
                exit::NO_USER,
            ),
            (
                Fake::default().answer(404, json!({})),
                &["purge_queue", "q"],
                exit::SOFTWARE,
            ),
            (
                Fake::default().answer(404, json!({})),
                &["list_queues", "-p", "nov"],
                exit::SOFTWARE,
            ),
            (
                Fake::default().answer(200, json!({"name": "bob"})),
                &["add_user", "bob", "pw"],
                exit::SOFTWARE,
            ),
            (
                Fake::default().answer(500, json!({"reason": "boom"})),
                &["add_vhost", "v"],
                exit::SOFTWARE,
            ),
            (
                Fake::default().answer(200, json!({"not": "a list"})),
                &["list_vhosts"],
                exit::SOFTWARE,
            ),
            (
                Fake::default().answer(404, json!({})),
                &["stop_app"],
                exit::SOFTWARE,
            ),
        ];
        for (mut api, args, code) in cases {
            let (r, _) = go(args, &mut api);
            let e = r.expect_err("must fail");
            assert_eq!(e.code, code, "{args:?}: {}", e.message);
        }
    }

    #[test]
    fn clustering_verbs_call_the_cluster_endpoints() {
        let mut api = Fake::default().answer(204, Value::Null);
        let (r, _) = go(&["join_cluster", "warren@h2:25672"], &mut api);
        r.expect("joined");
        assert_eq!(api.seen.len(), 1, "{:?}", api.seen);
        assert!(format!("{:?}", api.seen[0]).contains("/api/warren/cluster/join"));
        assert!(format!("{:?}", api.seen[0]).contains("warren@h2:25672"));
        let mut api = Fake::default().answer(404, Value::Null);
        let (r, _) = go(&["forget_cluster_node", "warren@h9"], &mut api);
        let e = r.expect_err("not a member");
        assert!(e.message.contains("not a member"), "{}", e.message);
        assert!(format!("{:?}", api.seen[0]).contains("/api/warren/cluster/nodes/warren"));
    }

    #[test]
    fn set_user_tags_keeps_the_password_hash() {
        let user = json!({"name": "bob", "password_hash": "h", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": []});
        let mut api = Fake::default().answer(200, user).answer(204, Value::Null);
        let (r, out) = go(
            &["set_user_tags", "bob", "administrator", "monitoring"],
            &mut api,
        );
        r.expect("ok");
        assert_eq!(
            out,
            "Setting tags for user \"bob\" to [administrator, monitoring] ...\n"
        );
        assert_eq!(
            api.seen[1],
            (
                Method::Put,
                "/api/users/bob".to_string(),
                Some(
                    json!({"tags": "administrator,monitoring", "password_hash": "h",
                            "hashing_algorithm": "rabbit_password_hashing_sha256"})
                )
            )
        );
    }

    #[test]
    fn delete_queue_reports_ready_count_and_passes_conditions() {
        let mut api = Fake::default()
            .answer(200, json!({"name": "q", "messages_ready": 3}))
            .answer(204, Value::Null);
        let (r, out) = go(&["delete_queue", "--if-empty", "q"], &mut api);
        r.expect("ok");
        assert_eq!(
            out,
            "Deleting queue 'q' on vhost '/' ...\nQueue was successfully deleted with 3 ready messages\n"
        );
        assert_eq!(api.seen[1].1, "/api/queues/%2F/q?if-empty=true");
    }

    #[test]
    fn start_and_stop_app_use_the_warren_endpoint() {
        let mut api = Fake::default().answer(204, Value::Null);
        let (r, out) = go(&["-n", "warren@h1", "stop_app"], &mut api);
        r.expect("ok");
        assert_eq!(out, "Stopping warren application on node warren@h1 ...\n");
        assert_eq!(
            api.seen[0],
            (
                Method::Put,
                "/api/warren/app".into(),
                Some(json!({"running": false}))
            )
        );
        let mut api = Fake::default().answer(204, Value::Null);
        go(&["start_app"], &mut api).0.expect("ok");
        assert_eq!(api.seen[0].2, Some(json!({"running": true})));
    }

    #[test]
    fn await_startup_retries_until_the_app_runs() {
        let mut api = Fake::default()
            .fail(TransportError::Unreachable("refused".into()))
            .answer(200, json!({}))
            .answer(200, json!({"running": false}))
            .answer(200, json!({}))
            .answer(200, json!({"running": true}));
        let (r, _) = go(&["await_startup", "--timeout", "30"], &mut api);
        r.expect("started");
        assert_eq!(api.seen.len(), 5);
    }

    #[test]
    fn await_startup_times_out() {
        let mut api = Fake::default();
        for _ in 0..10 {
            api = api.fail(TransportError::Unreachable("refused".into()));
        }
        let (r, _) = go(&["await_startup", "-t", "0.5"], &mut api);
        let e = r.expect_err("times out");
        assert_eq!(e.code, exit::TEMP_FAIL);
        assert!(e.message.contains("refused"), "{}", e.message);
    }

    #[test]
    fn cluster_status_lists_partitions_and_nodes_not_running() {
        let mut api = Fake::default()
            .answer(200, json!({"cluster_name": "a@h", "node": "a@h"}))
            .answer(
                200,
                json!([
                    {"name": "a@h", "running": true, "partitions": ["c@h"]},
                    {"name": "b@h", "running": true, "partitions": []},
                    {"name": "c@h", "running": false, "partitions": ["a@h"]},
                ]),
            );
        let (r, out) = go(&["cluster_status"], &mut api);
        r.expect("ok");
        assert!(out.contains("Running Nodes\n\na@h\nb@h\n\n"), "{out}");
        assert!(
            out.contains(
                "Network Partitions\n\nNode a@h cannot communicate with c@h\n\
                 Node c@h cannot communicate with a@h\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn cluster_status_lists_nodes_and_alarms() {
        let mut api = Fake::default()
            .answer(200, json!({"cluster_name": "c1", "node": "warren@a"}))
            .answer(
                200,
                json!([{"name": "warren@a", "running": true, "mem_alarm": true, "partitions": []}]),
            );
        let (r, out) = go(&["cluster_status"], &mut api);
        r.expect("ok");
        assert_eq!(
            out,
            "Cluster status of node warren@a ...\nBasics\n\nCluster name: c1\n\n\
             Disk Nodes\n\nwarren@a\n\nRunning Nodes\n\nwarren@a\n\nNetwork Partitions\n\n(none)\n\n\
             Alarms\n\nNode warren@a: memory\n"
        );
    }
}
