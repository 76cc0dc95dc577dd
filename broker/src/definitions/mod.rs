//! Definitions: vhosts, users, permissions, policies, exchanges, queues and bindings, mutable at
//! run time, persisted in `<data-dir>/definitions.json`, and imported/exported in RabbitMQ's
//! definitions JSON format.
//!
//! # API (methods on [`BrokerShared`], for the management API and warren-ctl)
//! Every mutating call validates first, changes the in-memory state, then rewrites
//! `definitions.json` (atomically: temp file, fsync, rename, fsync of the directory) before it
//! returns, so success means "on disk". Errors are [`DefError`]: `NotFound` (HTTP 404),
//! `Invalid` (400, the message names the offending field or entry) and `Io` (500).
//!
//! | call | RabbitMQ equivalent |
//! |---|---|
//! | [`BrokerShared::vhost`], [`BrokerShared::vhost_list`] | `list_vhosts` |
//! | [`BrokerShared::add_vhost`] | `add_vhost`, `PUT /api/vhosts/{name}` (existing: metadata updated) |
//! | [`BrokerShared::delete_vhost`] (async) | `delete_vhost`: deletes its queues and exchanges, closes its connections (320) |
//! | [`BrokerShared::put_user`] | `add_user`, `PUT /api/users/{name}` (password or password_hash) |
//! | [`BrokerShared::delete_user`], [`BrokerShared::change_password`], [`BrokerShared::set_user_tags`] | same verbs |
//! | [`BrokerShared::set_permissions`], [`BrokerShared::clear_permissions`] | same verbs |
//! | [`BrokerShared::set_policy`], [`BrokerShared::clear_policy`], `shared.policies.list(..)` | same verbs |
//! | [`BrokerShared::export_definitions`] | `GET /api/definitions`, `export_definitions` |
//! | [`parse_definitions`] + [`BrokerShared::import_definitions`] | `POST /api/definitions`, `import_definitions` |
//!
//! Users come from `shared.auth` ([`crate::auth::AuthDb::users`], `all_permissions`, ...).
//!
//! # Policies
//! Policies and operator policies are validated as RabbitMQ validates them
//! ([`crate::policy::keys`]), stored, persisted (operator policies under `operator_policies`,
//! a key RabbitMQ's import ignores), exported and listed, and applied: setting, changing or
//! clearing one re-applies the vhost's policies to its live queues and exchanges at once
//! ([`BrokerShared::apply_policies`]). The `ha-*` keys are validated and stored; mirroring
//! follows them once clustering lands.
//!
//! # Vhost limits
//! [`BrokerShared::set_vhost_limits`] sets a vhost's `max-connections` / `max-queues` (the
//! management API's `/api/vhost-limits` and `/api/parameters/vhost-limits`). They are exported
//! and persisted as RabbitMQ exports them, a `parameters` entry of component `vhost-limits`
//! named `limits`, so they survive a restart and an export imports them into RabbitMQ (and
//! back); clustered, they are replicated like policies (`limits/<v>/limits`).
//!
//! # Import semantics
//! Additive, as RabbitMQ's: entries in the document are created or updated (a user's password
//! and tags are replaced), nothing absent from it is removed. The whole document is checked
//! before anything is applied (see [`import`]: unknown vhosts and users, bad regexes, hashes,
//! policy keys, exchange types, queue arguments and their nesting, inequivalent redeclarations,
//! bindings to missing ends). Of `parameters`, the `vhost-limits` ones are checked and set
//! (replacing the vhost's limits, as RabbitMQ's parameter does); other `parameters`,
//! `global_parameters` and `topic_permissions` are accepted and ignored (warren has no other
//! runtime parameters and no topic permissions); non-durable
//! queues and exchanges in a document are declared but, being transient, not persisted.
//!
//! # What is persisted
//! Vhosts, users (hashes only), permissions, policies, vhost limits, durable exchanges, durable
//! non-exclusive queues, and bindings whose source and destination are both durable. A change
//! that leaves the rendered file identical (an idempotent redeclare, a transient queue) does
//! not write.
//!
//! # Boot and the config file
//! [`boot`] runs before the listeners accept. When `definitions.json` exists it is loaded
//! (durable queues are created through `Vhost::declare_queue`, so the message store recovers
//! their contents); a file that cannot be read or parsed, or an entry that cannot be loaded,
//! stops the start with an error naming the file and the entry. With
//! `skip-invalid-definitions` the node starts instead with every entry that loads: each one
//! left out (with what depends on it) is logged at error level, and the original file is kept
//! as `definitions.json.rejected-<unix time>` before the file is rewritten without them. Then
//! the users, vhosts and permissions written in the config file
//! are applied on top (the config wins for the entries it names; a config user keeps its stored
//! hash when the config password still matches). The implicit defaults (user guest/guest,
//! vhost `/`, guest's permissions on `/`) are created only on first start, when no
//! definitions file exists: a deleted guest stays deleted, as in RabbitMQ.

pub mod import;
pub mod json;
pub mod persist;

pub use import::ImportMode;
pub use json::{parse, Definitions};

use crate::auth::{PasswordHash, PermissionSpec, User, VhostMeta};
use crate::cluster::keys;
use crate::cluster::link::{def_error, user_def, vhost_def};
use crate::exchange::Destination;
use crate::policy::{Policy, PolicyKind};
use crate::vhost::Vhost;
use crate::BrokerShared;
use json::{
    table_to_json, BindingDef, ExchangeDef, PermissionDef, PolicyDef, QueueDef, Tags, UserDef,
    VhostDef, VhostMetadata,
};
use serde_json::{Map, Value};
use std::sync::Arc;
use tracing::{error, info, warn};
use warren_cluster::Op;

/// The RabbitMQ version whose definitions format (and field names) warren follows.
pub const RABBITMQ_COMPAT_VERSION: &str = "3.10.8";

/// Why a definitions call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DefError {
    /// The named vhost, user, permission or policy does not exist (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// Bad input; the message names the field or entry (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The change is in memory but could not be written to disk (HTTP 500).
    #[error("cannot write definitions: {0}")]
    Io(String),
    /// Clustered and the change could not be committed (no quorum, HTTP 503); nothing changed.
    #[error("{0}")]
    Unavailable(String),
}

/// What [`BrokerShared::export_definitions`] includes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportScope {
    /// Everything a RabbitMQ export has, transient queues and exchanges included (exclusive
    /// queues excepted).
    All,
    /// Only what survives a restart (the content of `definitions.json`).
    Durable,
}

fn put<T: serde::Serialize>(key: String, v: &T) -> Op {
    Op::Put {
        key,
        value: keys::to_value(v),
    }
}

/// Parses a definitions document ([`DefError::Invalid`] names the entry at fault).
pub fn parse_definitions(bytes: &[u8]) -> Result<Definitions, DefError> {
    json::parse(bytes).map_err(DefError::Invalid)
}

fn not_found_vhost(name: &str) -> DefError {
    DefError::NotFound(format!("vhost '{name}' does not exist"))
}

fn not_found_user(name: &str) -> DefError {
    DefError::NotFound(format!("user '{name}' does not exist"))
}

impl BrokerShared {
    // === vhosts ===

    /// The vhost named `name`, if it exists.
    pub fn vhost(&self, name: &str) -> Option<Arc<Vhost>> {
        self.vhosts.read().get(name).cloned()
    }

    /// Every vhost, sorted by name.
    pub fn vhost_list(&self) -> Vec<Arc<Vhost>> {
        let mut v: Vec<_> = self.vhosts.read().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Creates a vhost (or updates the metadata of an existing one); true if it was created.
    pub async fn add_vhost(&self, name: &str, meta: VhostMeta) -> Result<bool, DefError> {
        if name.is_empty() {
            return Err(DefError::Invalid("vhost name must not be empty".into()));
        }
        if self.cluster().is_some() {
            let created = self.vhost(name).is_none();
            let op = put(keys::vhost(name), &vhost_def(name, meta));
            self.replicate(vec![op]).await?;
            return Ok(created);
        }
        let created = self.add_vhost_in_memory(name, meta);
        self.persist_definitions()?;
        Ok(created)
    }

    pub(crate) fn add_vhost_in_memory(&self, name: &str, meta: VhostMeta) -> bool {
        let created = {
            let mut m = self.vhosts.write();
            if m.contains_key(name) {
                false
            } else {
                m.insert(name.to_owned(), self.new_vhost(name));
                true
            }
        };
        self.auth.put_vhost(name, meta);
        created
    }

    /// Deletes a vhost: its connections are closed (320 CONNECTION_FORCED), its queues
    /// deleted (consumers get basic.cancel), its exchanges, permissions and policies dropped.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), DefError> {
        if self.cluster().is_some() {
            if self.vhost(name).is_none() {
                return Err(not_found_vhost(name));
            }
            let mut ops = vec![Op::Delete {
                key: keys::vhost(name),
            }];
            ops.extend(
                keys::vhost_prefixes(name)
                    .into_iter()
                    .map(|prefix| Op::DeletePrefix { prefix }),
            );
            return self.replicate(ops).await;
        }
        if self.vhost(name).is_none() {
            return Err(not_found_vhost(name));
        }
        self.remove_vhost_locally(name).await;
        self.persist_definitions()
    }

    /// The vhost goes from this node: its connections are closed, its queues deleted, its
    /// permissions and policies dropped (no-op when it is not here).
    pub(crate) async fn remove_vhost_locally(&self, name: &str) {
        let Some(vh) = self.vhosts.write().remove(name) else {
            return;
        };
        self.auth.remove_vhost(name);
        self.policies.remove_vhost(name);
        vh.close_connections();
        let queues: Vec<_> = vh.snapshot().queues.values().cloned().collect();
        for q in queues {
            if let Err(e) = vh.delete_queue(&q, false, false).await {
                warn!(vhost = name, queue = %q.name, error = %e, "deleting queue of deleted vhost");
            }
        }
        info!(vhost = name, "vhost deleted");
    }

    // === users ===

    /// Creates or replaces a user. `credential` None keeps the password of an existing user
    /// (a new user then has none: password login refused, as RabbitMQ's empty hash).
    /// Returns true if the user was created.
    pub async fn put_user(
        &self,
        name: &str,
        credential: Option<PasswordHash>,
        tags: Vec<String>,
    ) -> Result<bool, DefError> {
        if name.is_empty() {
            return Err(DefError::Invalid("user name must not be empty".into()));
        }
        let password = match credential {
            Some(c) => c,
            None => self.auth.user(name).map(|u| u.password).unwrap_or_default(),
        };
        let user = User {
            name: name.to_owned(),
            password,
            tags,
        };
        if self.cluster().is_some() {
            let created = self.auth.user(name).is_none();
            self.replicate(vec![put(keys::user(name), &user_def(&user))])
                .await?;
            return Ok(created);
        }
        let created = self.auth.put_user(user);
        self.persist_definitions()?;
        Ok(created)
    }

    pub async fn delete_user(&self, name: &str) -> Result<(), DefError> {
        if self.cluster().is_some() {
            if self.auth.user(name).is_none() {
                return Err(not_found_user(name));
            }
            let mut ops = vec![Op::Delete {
                key: keys::user(name),
            }];
            for (user, vhost, _) in self.auth.all_permissions() {
                if user == name {
                    ops.push(Op::Delete {
                        key: keys::perm(&vhost, &user),
                    });
                }
            }
            return self.replicate(ops).await;
        }
        if !self.auth.remove_user(name) {
            return Err(not_found_user(name));
        }
        self.persist_definitions()
    }

    pub async fn change_password(&self, name: &str, password: &str) -> Result<(), DefError> {
        let hash = PasswordHash::new(password);
        self.update_user(name, |u| u.password = hash).await
    }

    pub async fn set_user_tags(&self, name: &str, tags: Vec<String>) -> Result<(), DefError> {
        self.update_user(name, |u| u.tags = tags).await
    }

    async fn update_user(&self, name: &str, f: impl FnOnce(&mut User)) -> Result<(), DefError> {
        if self.cluster().is_some() {
            let mut u = self.auth.user(name).ok_or_else(|| not_found_user(name))?;
            f(&mut u);
            return self
                .replicate(vec![put(keys::user(name), &user_def(&u))])
                .await;
        }
        if !self.auth.update_user(name, f) {
            return Err(not_found_user(name));
        }
        self.persist_definitions()
    }

    // === permissions ===

    pub async fn set_permissions(
        &self,
        user: &str,
        vhost: &str,
        spec: PermissionSpec,
    ) -> Result<(), DefError> {
        if self.auth.user(user).is_none() {
            return Err(not_found_user(user));
        }
        if !self.auth.vhost_exists(vhost) {
            return Err(not_found_vhost(vhost));
        }
        spec.validate().map_err(DefError::Invalid)?;
        if self.cluster().is_some() {
            let def = PermissionDef {
                user: user.to_owned(),
                vhost: vhost.to_owned(),
                configure: spec.configure,
                write: spec.write,
                read: spec.read,
            };
            return self
                .replicate(vec![put(keys::perm(vhost, user), &def)])
                .await;
        }
        self.auth.put_permissions(user, vhost, spec);
        self.persist_definitions()
    }

    pub async fn clear_permissions(&self, user: &str, vhost: &str) -> Result<(), DefError> {
        let missing = || {
            DefError::NotFound(format!(
                "user '{user}' has no permissions on vhost '{vhost}'"
            ))
        };
        if self.cluster().is_some() {
            if self.auth.permissions(user, vhost).is_none() {
                return Err(missing());
            }
            return self
                .replicate(vec![Op::Delete {
                    key: keys::perm(vhost, user),
                }])
                .await;
        }
        if !self.auth.remove_permissions(user, vhost) {
            return Err(missing());
        }
        self.persist_definitions()
    }

    // === policies ===

    /// Creates or replaces a policy (validated, see [`Policy::validate`]); it applies to the
    /// vhost's queues and exchanges at once.
    pub async fn set_policy(&self, p: Policy) -> Result<(), DefError> {
        self.set_policy_kind(PolicyKind::User, p).await
    }

    pub async fn clear_policy(&self, vhost: &str, name: &str) -> Result<(), DefError> {
        self.clear_policy_kind(PolicyKind::User, vhost, name).await
    }

    /// Creates or replaces a policy or an operator policy.
    pub async fn set_policy_kind(&self, kind: PolicyKind, p: Policy) -> Result<(), DefError> {
        if !self.auth.vhost_exists(&p.vhost) {
            return Err(not_found_vhost(&p.vhost));
        }
        p.validate_as(kind).map_err(DefError::Invalid)?;
        if self.cluster().is_some() {
            let key = keys::policy(kind, &p.vhost, &p.name);
            return self
                .replicate(vec![put(key, &PolicyDef::from_policy(&p))])
                .await;
        }
        let vhost = p.vhost.clone();
        if self.policies.put_kind(kind, p) {
            self.apply_policies(&vhost);
            self.persist_definitions()?;
        }
        Ok(())
    }

    pub async fn clear_policy_kind(
        &self,
        kind: PolicyKind,
        vhost: &str,
        name: &str,
    ) -> Result<(), DefError> {
        let exists = self
            .policies
            .list_kind(kind, Some(vhost))
            .iter()
            .any(|p| p.name == name);
        if !exists {
            return Err(DefError::NotFound(format!(
                "{} '{name}' in vhost '{vhost}' does not exist",
                match kind {
                    PolicyKind::User => "policy",
                    PolicyKind::Operator => "operator policy",
                }
            )));
        }
        if self.cluster().is_some() {
            return self
                .replicate(vec![Op::Delete {
                    key: keys::policy(kind, vhost, name),
                }])
                .await;
        }
        self.policies.remove_kind(kind, vhost, name);
        self.apply_policies(vhost);
        self.persist_definitions()
    }

    // === vhost limits ===

    /// Replaces a vhost's limits (RabbitMQ's `vhost-limits` parameter; empty clears them):
    /// persisted with the definitions and, clustered, replicated to every node.
    pub async fn set_vhost_limits(
        &self,
        vhost: &str,
        limits: json::Limits,
    ) -> Result<(), DefError> {
        let v = self.vhost(vhost).ok_or_else(|| not_found_vhost(vhost))?;
        if self.cluster().is_some() {
            let key = keys::limits(vhost);
            let op = if limits.is_empty() {
                Op::Delete { key }
            } else {
                Op::Put {
                    key,
                    value: json::limits_parameter(vhost, &limits),
                }
            };
            return self.replicate(vec![op]).await;
        }
        v.set_limits(limits);
        self.persist_definitions()
    }

    /// Clustered: commit `ops` through the cluster and wait until this node applied them.
    async fn replicate(&self, ops: Vec<Op>) -> Result<(), DefError> {
        let c = self
            .cluster()
            .ok_or_else(|| DefError::Unavailable("not clustered".into()))?;
        c.propose(ops).await.map(|_| ()).map_err(def_error)
    }

    /// Re-applies the policies to the queues and exchanges of `vhost` (after a change).
    pub fn apply_policies(&self, vhost: &str) {
        if let Some(v) = self.vhost(vhost) {
            v.apply_policies();
        }
    }

    // === export / import ===

    /// The definitions document (RabbitMQ 3.10 shape), sorted so equal states render equal.
    pub fn export_definitions(&self, scope: ExportScope) -> Definitions {
        let durable_only = scope == ExportScope::Durable;
        let users = self
            .auth
            .users()
            .into_iter()
            .map(|u| UserDef {
                name: u.name,
                password_hash: u.password.hash,
                hashing_algorithm: u.password.algorithm.as_str().to_owned(),
                password: None,
                tags: Tags(u.tags),
                limits: Value::Object(Map::new()),
            })
            .collect();
        let vhosts = self
            .auth
            .vhosts_meta()
            .into_iter()
            .map(|(name, m)| VhostDef {
                name,
                limits: Value::Array(Vec::new()),
                metadata: VhostMetadata {
                    description: m.description,
                    tags: Tags(m.tags),
                },
                description: None,
                tags: None,
            })
            .collect();
        let permissions = self
            .auth
            .all_permissions()
            .into_iter()
            .map(|(user, vhost, s)| PermissionDef {
                user,
                vhost,
                configure: s.configure,
                write: s.write,
                read: s.read,
            })
            .collect();
        let policies = self
            .policies
            .list(None)
            .iter()
            .map(PolicyDef::from_policy)
            .collect();
        let operator_policies = self
            .policies
            .list_kind(PolicyKind::Operator, None)
            .iter()
            .map(PolicyDef::from_policy)
            .collect();
        let mut queues = Vec::new();
        let mut exchanges = Vec::new();
        let mut bindings = Vec::new();
        for vh in self.vhost_list() {
            let topo = vh.snapshot();
            let queue_kept = |name: &str| {
                topo.queues
                    .get(name)
                    .is_some_and(|q| q.exclusive_owner.is_none() && (q.durable || !durable_only))
            };
            let exchange_kept = |name: &str| {
                topo.exchanges
                    .get(name)
                    .is_some_and(|x| !name.is_empty() && (x.durable || !durable_only))
            };
            let mut qnames: Vec<_> = topo.queues.keys().collect();
            qnames.sort();
            for n in qnames {
                let Some(q) = topo.queues.get(n).filter(|_| queue_kept(n)) else {
                    continue;
                };
                queues.push(QueueDef {
                    name: n.to_string(),
                    vhost: vh.name.to_string(),
                    durable: q.durable,
                    auto_delete: q.auto_delete,
                    arguments: table_to_json(&q.arguments),
                    kind: Some(if q.args.quorum { "quorum" } else { "classic" }.to_owned()),
                });
            }
            let mut xnames: Vec<_> = topo.exchanges.keys().collect();
            xnames.sort();
            for n in xnames {
                let Some(x) = topo.exchanges.get(n) else {
                    continue;
                };
                // Bindings from every exchange (amq.* included) whose ends are kept.
                if exchange_kept(n) {
                    for b in x.bindings() {
                        let (dest, dtype, ok) = match &b.destination {
                            Destination::Queue(q) => (q, "queue", queue_kept(q)),
                            Destination::Exchange(e) => (e, "exchange", exchange_kept(e)),
                        };
                        if ok {
                            bindings.push(BindingDef {
                                source: n.to_string(),
                                vhost: vh.name.to_string(),
                                destination: dest.to_string(),
                                destination_type: dtype.to_owned(),
                                routing_key: b.routing_key.clone(),
                                arguments: table_to_json(&b.arguments),
                            });
                        }
                    }
                }
                if n.is_empty() || n.starts_with("amq.") || !exchange_kept(n) {
                    continue;
                }
                exchanges.push(ExchangeDef {
                    name: n.to_string(),
                    vhost: vh.name.to_string(),
                    kind: x.kind.as_str().to_owned(),
                    durable: x.durable,
                    auto_delete: x.auto_delete,
                    internal: x.internal,
                    arguments: table_to_json(&x.arguments),
                });
            }
        }
        bindings.sort_by(|a, b| {
            (
                &a.vhost,
                &a.source,
                &a.destination_type,
                &a.destination,
                &a.routing_key,
            )
                .cmp(&(
                    &b.vhost,
                    &b.source,
                    &b.destination_type,
                    &b.destination,
                    &b.routing_key,
                ))
        });
        // Vhost limits are runtime parameters in RabbitMQ's export.
        let parameters = self
            .vhost_list()
            .iter()
            .filter_map(|v| {
                let l = v.limits();
                (!l.is_empty()).then(|| json::limits_parameter(&v.name, &l))
            })
            .collect();
        Definitions {
            rabbit_version: Some(RABBITMQ_COMPAT_VERSION.to_owned()),
            rabbitmq_version: Some(RABBITMQ_COMPAT_VERSION.to_owned()),
            product_name: Some("warren".to_owned()),
            product_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            users,
            vhosts,
            permissions,
            topic_permissions: Vec::new(),
            parameters,
            global_parameters: Vec::new(),
            policies,
            operator_policies,
            queues,
            exchanges,
            bindings,
        }
    }

    // === persistence ===

    /// Writes `definitions.json` if the durable definitions changed since the last write.
    pub fn persist_definitions(&self) -> Result<(), DefError> {
        if self.persister.in_batch() {
            return Ok(());
        }
        self.persister
            .write_if_changed(|| self.render_durable())
            .map(|_| ())
            .map_err(|e| {
                let path = self
                    .persister
                    .path()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default();
                error!(path = %path, error = %e, "cannot write definitions");
                DefError::Io(format!("{path}: {e}"))
            })
    }

    fn render_durable(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(&self.export_definitions(ExportScope::Durable))
            .unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// A new vhost wired to persist its durable changes.
    pub(crate) fn new_vhost(&self, name: &str) -> Arc<Vhost> {
        let vh = Vhost::with_store(name, self.node.clone(), self.store.clone());
        vh.set_policies(self.policies.clone());
        let me = self.me.clone();
        vh.set_durable_hook(Box::new(move || {
            if let Some(s) = me.upgrade() {
                // Errors are logged inside; an AMQP declare has no way to report them.
                let _ = s.persist_definitions();
            }
        }));
        let me = self.me.clone();
        vh.set_log_hook(Box::new(move |q, (log, events)| {
            match me.upgrade().and_then(|s| s.cluster().cloned()) {
                Some(c) => {
                    let (log, events) = c.replication.wrap(&q.vhost, &q.name, log, events);
                    (log, Some(events))
                }
                None => (log, events),
            }
        }));
        let me = self.me.clone();
        vh.set_queue_hook(Box::new(move |q| {
            if let Some(c) = me.upgrade().and_then(|s| s.cluster().cloned()) {
                c.queue_removed(q);
            }
        }));
        vh
    }
}

/// Loads the stored definitions and applies the config file's users, vhosts and permissions
/// (see the module docs). Called once by [`crate::Broker::bind`] before any listener accepts.
pub(crate) fn boot(shared: &BrokerShared) -> Result<(), String> {
    let cfg = &shared.config;
    let stored = match shared.persister.path() {
        None => None,
        Some(p) => match std::fs::read(p) {
            Ok(b) => Some((p.to_owned(), b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        },
    };
    match stored {
        Some((path, bytes)) => {
            let mode = if cfg.skip_invalid_definitions {
                ImportMode::SkipInvalid
            } else {
                ImportMode::Strict
            };
            let refuse = |e: String| {
                let hint = match mode {
                    ImportMode::Strict => {
                        "; refusing to start without the stored definitions (repair the file, \
                         move it away to start empty, or start with --skip-invalid-definitions \
                         to load the other entries)"
                    }
                    ImportMode::SkipInvalid => {
                        "; nothing in it can be loaded (repair the file, or move it away to \
                         start empty)"
                    }
                };
                format!("corrupt definitions file {}: {e}{hint}", path.display())
            };
            let (d, mut rejected) = json::parse_with(&bytes, mode).map_err(refuse)?;
            rejected.extend(shared.import_in_memory(&d, mode).map_err(refuse)?);
            if rejected.is_empty() {
                shared.persister.set_last(bytes);
            } else {
                // The file is rewritten without the rejected entries: keep the original.
                let kept = path
                    .with_extension(format!("json.rejected-{}", crate::stats::epoch_ms() / 1000));
                std::fs::write(&kept, &bytes)
                    .map_err(|e| format!("cannot keep a copy as {}: {e}", kept.display()))?;
                for entry in &rejected {
                    error!(path = %path.display(), entry = %entry, "definition left out");
                }
                warn!(
                    path = %path.display(),
                    rejected = rejected.len(),
                    original = %kept.display(),
                    "started with --skip-invalid-definitions: entries left out of the definitions"
                );
            }
            info!(
                path = %path.display(),
                vhosts = d.vhosts.len(),
                users = d.users.len(),
                queues = d.queues.len(),
                exchanges = d.exchanges.len(),
                bindings = d.bindings.len(),
                policies = d.policies.len(),
                left_out = rejected.len(),
                "definitions loaded"
            );
            apply_config(shared, &cfg.vhosts, &cfg.users, &cfg.permissions);
        }
        None => apply_config(
            shared,
            &cfg.effective_vhosts(),
            &cfg.effective_users(),
            &cfg.effective_permissions(),
        ),
    }
    shared.persister.end_batch();
    shared.persist_definitions().map_err(|e| e.to_string())
}

fn apply_config(
    shared: &BrokerShared,
    vhosts: &[String],
    users: &[crate::config::UserConfig],
    perms: &[crate::config::PermissionConfig],
) {
    for v in vhosts {
        if shared.vhost(v).is_none() {
            shared.add_vhost_in_memory(v, VhostMeta::default());
        }
    }
    for u in users {
        let password = match shared.auth.user(&u.name) {
            Some(cur) if cur.password.verify(&u.password) => cur.password,
            _ => PasswordHash::new(&u.password),
        };
        shared.auth.put_user(User {
            name: u.name.clone(),
            password,
            tags: u.tags.clone(),
        });
    }
    for p in perms {
        shared.auth.put_permissions(
            &p.user,
            &p.vhost,
            PermissionSpec {
                configure: p.configure.clone(),
                write: p.write.clone(),
                read: p.read.clone(),
            },
        );
    }
}
