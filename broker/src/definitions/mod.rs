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
//! Validated (HA keys as RabbitMQ checks them), stored, persisted, exported and listed; not
//! enforced yet: mirroring follows the `ha-*` keys once clustering lands, and the other keys
//! (`message-ttl`, ...) are kept as given.
//!
//! # Import semantics
//! Additive, as RabbitMQ's: entries in the document are created or updated (a user's password
//! and tags are replaced), nothing absent from it is removed. The whole document is checked
//! before anything is applied (unknown vhosts and users, bad regexes, hashes, policy keys,
//! exchange types, queue arguments, inequivalent redeclarations, bindings to missing ends).
//! `parameters`, `global_parameters` and `topic_permissions` are accepted and ignored (warren
//! has no runtime parameters or topic permissions); non-durable queues and exchanges in a
//! document are declared but, being transient, not persisted.
//!
//! # What is persisted
//! Vhosts, users (hashes only), permissions, policies, durable exchanges, durable non-exclusive
//! queues, and bindings whose source and destination are both durable. A change that leaves the
//! rendered file identical (an idempotent redeclare, a transient queue) does not write.
//!
//! # Boot and the config file
//! [`boot`] runs before the listeners accept. When `definitions.json` exists it is loaded
//! (durable queues are created through `Vhost::declare_queue`, so the message store recovers
//! their contents); a file that cannot be read or parsed stops the start with an error naming
//! the file and the problem. Then the users, vhosts and permissions written in the config file
//! are applied on top (the config wins for the entries it names; a config user keeps its stored
//! hash when the config password still matches). The implicit defaults (user guest/guest,
//! vhost `/`, guest's permissions on `/`) are created only on first start, when no
//! definitions file exists: a deleted guest stays deleted, as in RabbitMQ.

pub mod json;
pub mod persist;

pub use json::{parse, Definitions};

use crate::auth::{PasswordHash, PermissionSpec, User, VhostMeta};
use crate::exchange::{Destination, ExchangeKind};
use crate::policy::Policy;
use crate::queue::QueueArgs;
use crate::vhost::{QueueSpec, Vhost};
use crate::BrokerShared;
use json::{
    json_to_table, table_to_json, BindingDef, ExchangeDef, PermissionDef, PolicyDef, QueueDef,
    Tags, UserDef, VhostDef, VhostMetadata,
};
use serde_json::{Map, Value};
use std::collections::HashSet;
use std::sync::Arc;
use tracing::{error, info, warn};

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
    pub fn add_vhost(&self, name: &str, meta: VhostMeta) -> Result<bool, DefError> {
        if name.is_empty() {
            return Err(DefError::Invalid("vhost name must not be empty".into()));
        }
        let created = self.add_vhost_in_memory(name, meta);
        self.persist_definitions()?;
        Ok(created)
    }

    fn add_vhost_in_memory(&self, name: &str, meta: VhostMeta) -> bool {
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
        let vh = self
            .vhosts
            .write()
            .remove(name)
            .ok_or_else(|| not_found_vhost(name))?;
        self.auth.remove_vhost(name);
        self.policies.remove_vhost(name);
        vh.close_connections();
        let persisted = self.persist_definitions();
        let queues: Vec<_> = vh.snapshot().queues.values().cloned().collect();
        for q in queues {
            if let Err(e) = vh.delete_queue(&q, false, false).await {
                warn!(vhost = name, queue = %q.name, error = %e, "deleting queue of deleted vhost");
            }
        }
        info!(vhost = name, "vhost deleted");
        persisted
    }

    // === users ===

    /// Creates or replaces a user. `credential` None keeps the password of an existing user
    /// (a new user then has none: password login refused, as RabbitMQ's empty hash).
    /// Returns true if the user was created.
    pub fn put_user(
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
        let created = self.auth.put_user(User {
            name: name.to_owned(),
            password,
            tags,
        });
        self.persist_definitions()?;
        Ok(created)
    }

    pub fn delete_user(&self, name: &str) -> Result<(), DefError> {
        if !self.auth.remove_user(name) {
            return Err(not_found_user(name));
        }
        self.persist_definitions()
    }

    pub fn change_password(&self, name: &str, password: &str) -> Result<(), DefError> {
        let hash = PasswordHash::new(password);
        if !self.auth.update_user(name, |u| u.password = hash) {
            return Err(not_found_user(name));
        }
        self.persist_definitions()
    }

    pub fn set_user_tags(&self, name: &str, tags: Vec<String>) -> Result<(), DefError> {
        if !self.auth.update_user(name, |u| u.tags = tags) {
            return Err(not_found_user(name));
        }
        self.persist_definitions()
    }

    // === permissions ===

    pub fn set_permissions(
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
        self.auth.put_permissions(user, vhost, spec);
        self.persist_definitions()
    }

    pub fn clear_permissions(&self, user: &str, vhost: &str) -> Result<(), DefError> {
        if !self.auth.remove_permissions(user, vhost) {
            return Err(DefError::NotFound(format!(
                "user '{user}' has no permissions on vhost '{vhost}'"
            )));
        }
        self.persist_definitions()
    }

    // === policies ===

    /// Creates or replaces a policy (validated, see [`Policy::validate`]).
    pub fn set_policy(&self, p: Policy) -> Result<(), DefError> {
        if !self.auth.vhost_exists(&p.vhost) {
            return Err(not_found_vhost(&p.vhost));
        }
        p.validate().map_err(DefError::Invalid)?;
        if self.policies.put(p) {
            self.persist_definitions()?;
        }
        Ok(())
    }

    pub fn clear_policy(&self, vhost: &str, name: &str) -> Result<(), DefError> {
        if !self.policies.remove(vhost, name) {
            return Err(DefError::NotFound(format!(
                "policy '{name}' in vhost '{vhost}' does not exist"
            )));
        }
        self.persist_definitions()
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
        Definitions {
            rabbit_version: Some(RABBITMQ_COMPAT_VERSION.to_owned()),
            rabbitmq_version: Some(RABBITMQ_COMPAT_VERSION.to_owned()),
            product_name: Some("warren".to_owned()),
            product_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            users,
            vhosts,
            permissions,
            topic_permissions: Vec::new(),
            parameters: Vec::new(),
            global_parameters: Vec::new(),
            policies,
            queues,
            exchanges,
            bindings,
        }
    }

    /// Imports a document additively (see the module docs). Everything is checked first; an
    /// error names the entry and nothing is applied.
    pub fn import_definitions(&self, d: &Definitions) -> Result<(), DefError> {
        self.persister.begin_batch();
        let r = self.import_in_memory(d);
        self.persister.end_batch();
        let p = self.persist_definitions();
        r.map_err(DefError::Invalid)?;
        p
    }

    fn import_in_memory(&self, d: &Definitions) -> Result<(), String> {
        let plan = self.check_import(d)?;
        for v in &d.vhosts {
            self.add_vhost_in_memory(
                &v.name,
                VhostMeta {
                    description: v.description(),
                    tags: v.tags(),
                },
            );
        }
        for (u, cred) in d.users.iter().zip(plan.credentials) {
            self.auth.put_user(User {
                name: u.name.clone(),
                password: cred,
                tags: u.tags.0.clone(),
            });
        }
        for p in &d.permissions {
            self.auth.put_permissions(&p.user, &p.vhost, p.spec());
        }
        for p in plan.policies {
            self.policies.put(p);
        }
        for (i, x) in d.exchanges.iter().enumerate() {
            if plan.skip_exchanges.contains(&i) {
                continue;
            }
            let vh = self
                .vhost(&x.vhost)
                .ok_or_else(|| format!("vhost '{}' vanished", x.vhost))?;
            vh.declare_exchange(
                &x.name,
                x.exchange_kind()?,
                x.durable,
                x.auto_delete,
                x.internal,
                json_to_table(&x.arguments),
            )
            .map_err(|e| format!("exchanges[{i}] '{}': {}", x.name, e.reply_text()))?;
        }
        for (i, q) in d.queues.iter().enumerate() {
            let vh = self
                .vhost(&q.vhost)
                .ok_or_else(|| format!("vhost '{}' vanished", q.vhost))?;
            let arguments = json_to_table(&q.arguments);
            let label = || format!("queues[{i}] '{}' in vhost '{}'", q.name, q.vhost);
            let args = QueueArgs::parse(&arguments, &q.name, &q.vhost)
                .map_err(|e| format!("{}: {}", label(), e.reply_text()))?;
            vh.declare_queue(QueueSpec {
                name: q.name.clone(),
                durable: q.durable,
                exclusive_owner: None,
                auto_delete: q.auto_delete,
                arguments,
                args,
            })
            .map_err(|e| format!("{}: {}", label(), e.reply_text()))?;
        }
        for (i, b) in d.bindings.iter().enumerate() {
            let vh = self
                .vhost(&b.vhost)
                .ok_or_else(|| format!("vhost '{}' vanished", b.vhost))?;
            let dest = match b.destination_type.as_str() {
                "queue" => Destination::Queue(b.destination.as_str().into()),
                _ => Destination::Exchange(b.destination.as_str().into()),
            };
            vh.bind(&b.source, dest, &b.routing_key, json_to_table(&b.arguments))
                .map_err(|e| {
                    format!(
                        "bindings[{i}] '{} -> {}' in vhost '{}': {}",
                        b.source,
                        b.destination,
                        b.vhost,
                        e.reply_text()
                    )
                })?;
        }
        let ignored = d.parameters.len() + d.global_parameters.len() + d.topic_permissions.len();
        if ignored > 0 {
            info!(
                count = ignored,
                "definitions import: parameters, global_parameters and topic_permissions ignored"
            );
        }
        Ok(())
    }

    /// Checks a document against itself and the current state; nothing is changed.
    fn check_import(&self, d: &Definitions) -> Result<ImportPlan, String> {
        let file_vhosts: HashSet<&str> = d.vhosts.iter().map(|v| v.name.as_str()).collect();
        let vhost_ok = |v: &str| file_vhosts.contains(v) || self.auth.vhost_exists(v);
        let file_users: HashSet<&str> = d.users.iter().map(|u| u.name.as_str()).collect();
        for (i, v) in d.vhosts.iter().enumerate() {
            if v.name.is_empty() {
                return Err(format!("vhosts[{i}]: name must not be empty"));
            }
        }
        let mut credentials = Vec::new();
        for (i, u) in d.users.iter().enumerate() {
            if u.name.is_empty() {
                return Err(format!("users[{i}]: name must not be empty"));
            }
            credentials.push(u.credential().map_err(|e| format!("{}: {e}", u.label(i)))?);
        }
        for (i, p) in d.permissions.iter().enumerate() {
            let label = format!("permissions[{i}] '{}' in vhost '{}'", p.user, p.vhost);
            if !file_users.contains(p.user.as_str()) && self.auth.user(&p.user).is_none() {
                return Err(format!("{label}: user '{}' does not exist", p.user));
            }
            if !vhost_ok(&p.vhost) {
                return Err(format!("{label}: vhost '{}' does not exist", p.vhost));
            }
            p.spec().validate().map_err(|e| format!("{label}: {e}"))?;
        }
        let mut policies = Vec::new();
        for (i, p) in d.policies.iter().enumerate() {
            let label = format!("policies[{i}] '{}' in vhost '{}'", p.name, p.vhost);
            if !vhost_ok(&p.vhost) {
                return Err(format!("{label}: vhost '{}' does not exist", p.vhost));
            }
            policies.push(p.to_policy().map_err(|e| format!("{label}: {e}"))?);
        }
        // Exchanges and queues each document declares, per vhost, for the binding checks.
        let mut new_x: HashSet<(&str, &str)> = HashSet::new();
        let mut new_q: HashSet<(&str, &str)> = HashSet::new();
        let mut skip_exchanges = HashSet::new();
        for (i, x) in d.exchanges.iter().enumerate() {
            let label = format!("exchanges[{i}] '{}' in vhost '{}'", x.name, x.vhost);
            if !vhost_ok(&x.vhost) {
                return Err(format!("{label}: vhost '{}' does not exist", x.vhost));
            }
            let kind = x.exchange_kind().map_err(|e| format!("{label}: {e}"))?;
            let current = self.vhost(&x.vhost).and_then(|v| v.exchange(&x.name));
            if x.name.is_empty() || x.name.starts_with("amq.") {
                // The predeclared exchanges exist everywhere; anything else is reserved.
                if x.name.is_empty()
                    || DEFAULT_EXCHANGE_KINDS
                        .iter()
                        .any(|(n, k)| *n == x.name && *k == kind)
                {
                    skip_exchanges.insert(i);
                    continue;
                }
                return Err(format!("{label}: the 'amq.' prefix is reserved"));
            }
            if let Some(cur) = current {
                if cur.kind != kind
                    || cur.durable != x.durable
                    || cur.auto_delete != x.auto_delete
                    || cur.internal != x.internal
                {
                    return Err(format!(
                        "{label}: inequivalent to the existing exchange (type, durable, \
                         auto_delete or internal differ)"
                    ));
                }
            }
            new_x.insert((x.vhost.as_str(), x.name.as_str()));
        }
        for (i, q) in d.queues.iter().enumerate() {
            let label = format!("queues[{i}] '{}' in vhost '{}'", q.name, q.vhost);
            if !vhost_ok(&q.vhost) {
                return Err(format!("{label}: vhost '{}' does not exist", q.vhost));
            }
            if q.name.is_empty() {
                return Err(format!("{label}: name must not be empty"));
            }
            if let Some(k) = q.kind.as_deref() {
                if k != "classic" && k != "quorum" {
                    return Err(format!(
                        "{label}: queue type '{k}' is not supported (classic, quorum)"
                    ));
                }
            }
            QueueArgs::parse(&json_to_table(&q.arguments), &q.name, &q.vhost)
                .map_err(|e| format!("{label}: {}", e.reply_text()))?;
            if let Some(cur) = self.vhost(&q.vhost).and_then(|v| v.queue(&q.name)) {
                if cur.durable != q.durable || cur.auto_delete != q.auto_delete {
                    return Err(format!(
                        "{label}: inequivalent to the existing queue (durable or auto_delete \
                         differ)"
                    ));
                }
                if cur.exclusive_owner.is_some() {
                    return Err(format!("{label}: an exclusive queue of that name exists"));
                }
            }
            new_q.insert((q.vhost.as_str(), q.name.as_str()));
        }
        for (i, b) in d.bindings.iter().enumerate() {
            let label = format!(
                "bindings[{i}] '{} -> {}' in vhost '{}'",
                b.source, b.destination, b.vhost
            );
            if !vhost_ok(&b.vhost) {
                return Err(format!("{label}: vhost '{}' does not exist", b.vhost));
            }
            let vh = self.vhost(&b.vhost);
            let x_exists = |n: &str| {
                new_x.contains(&(b.vhost.as_str(), n))
                    || DEFAULT_EXCHANGE_KINDS.iter().any(|(d, _)| *d == n)
                    || vh.as_ref().is_some_and(|v| v.exchange(n).is_some())
            };
            let q_exists = |n: &str| {
                new_q.contains(&(b.vhost.as_str(), n))
                    || vh.as_ref().is_some_and(|v| v.queue(n).is_some())
            };
            if b.source.is_empty() {
                return Err(format!(
                    "{label}: bindings of the default exchange cannot be declared"
                ));
            }
            if !x_exists(&b.source) {
                return Err(format!(
                    "{label}: source exchange '{}' does not exist",
                    b.source
                ));
            }
            let dest_ok = match b.destination_type.as_str() {
                "queue" => q_exists(&b.destination),
                "exchange" => x_exists(&b.destination),
                other => {
                    return Err(format!(
                        "{label}: destination_type '{other}' is not queue or exchange"
                    ))
                }
            };
            if !dest_ok {
                return Err(format!(
                    "{label}: destination {} '{}' does not exist",
                    b.destination_type, b.destination
                ));
            }
        }
        Ok(ImportPlan {
            credentials,
            policies,
            skip_exchanges,
        })
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
        let vh = Vhost::with_store(name, self.store.clone());
        let me = self.me.clone();
        vh.set_durable_hook(Box::new(move || {
            if let Some(s) = me.upgrade() {
                // Errors are logged inside; an AMQP declare has no way to report them.
                let _ = s.persist_definitions();
            }
        }));
        vh
    }
}

const DEFAULT_EXCHANGE_KINDS: &[(&str, ExchangeKind)] = &[
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
];

struct ImportPlan {
    credentials: Vec<PasswordHash>,
    policies: Vec<Policy>,
    skip_exchanges: HashSet<usize>,
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
            let refuse = |e: String| {
                format!(
                    "corrupt definitions file {}: {e}; refusing to start without the stored \
                     definitions (repair the file, or move it away to start empty)",
                    path.display()
                )
            };
            let d = json::parse(&bytes).map_err(refuse)?;
            shared.import_in_memory(&d).map_err(refuse)?;
            shared.persister.set_last(bytes);
            info!(
                path = %path.display(),
                vhosts = d.vhosts.len(),
                users = d.users.len(),
                queues = d.queues.len(),
                exchanges = d.exchanges.len(),
                bindings = d.bindings.len(),
                policies = d.policies.len(),
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
