//! Importing a definitions document: every entry is checked against the document and the
//! current state first, then the accepted entries are applied.
//!
//! Two modes ([`ImportMode`]):
//! - **Strict** (the HTTP API, `import_definitions`, a normal boot): the first entry at fault
//!   stops the import, its error names the entry, nothing is applied.
//! - **Skip invalid** (a boot with `skip-invalid-definitions`): an entry at fault is reported
//!   and left out, with everything that depends on it (the permissions of a rejected user, the
//!   queues of a rejected vhost, the bindings of a rejected queue), and the rest is applied.
//!
//! Checks: names, vhosts and users that exist (in the document or the broker), password
//! hashes, permission regexes, policies, exchange types, queue types and arguments,
//! inequivalent redeclarations, bindings to missing ends, and nesting: arguments nested deeper
//! than [`crate::nesting::MAX_DEPTH`] levels are refused here as over AMQP, so that everything
//! imported can be written to `definitions.json` and read back.

use super::json::{json_to_table, Definitions};
use crate::auth::{PasswordHash, User, VhostMeta};
use crate::exchange::Destination;
use crate::nesting;
use crate::policy::{Policy, PolicyKind};
use crate::queue::QueueArgs;
use crate::vhost::{QueueSpec, DEFAULT_EXCHANGES};
use crate::BrokerShared;
use serde_json::{Map, Value};
use std::collections::HashSet;
use tracing::info;

/// What an import does with an entry it cannot apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportMode {
    /// Refuse the whole document, naming the first entry at fault.
    Strict,
    /// Leave the entry out (and what depends on it), report it, apply the rest.
    SkipInvalid,
}

/// Entries left out, by section and index, and why.
struct Verdicts {
    mode: ImportMode,
    rejected: Vec<String>,
}

impl Verdicts {
    /// Records a failed check: an error in strict mode, a report otherwise. Returns whether
    /// the entry is accepted.
    fn judge(&mut self, r: Result<(), String>) -> Result<bool, String> {
        match (r, self.mode) {
            (Ok(()), _) => Ok(true),
            (Err(e), ImportMode::Strict) => Err(e),
            (Err(e), ImportMode::SkipInvalid) => {
                self.rejected.push(e);
                Ok(false)
            }
        }
    }
}

/// What the check decided: the accepted entries of each section (by index) and what they need.
struct ImportPlan {
    vhosts: HashSet<usize>,
    /// Accepted users with their credentials.
    users: Vec<(usize, PasswordHash)>,
    permissions: HashSet<usize>,
    policies: Vec<(PolicyKind, Policy)>,
    /// Accepted vhost limits (the `vhost-limits` entries of `parameters`), by vhost.
    limits: Vec<(String, super::json::Limits)>,
    /// Accepted exchanges that are declared (the predeclared ones are accepted and skipped).
    exchanges: HashSet<usize>,
    queues: HashSet<usize>,
    bindings: HashSet<usize>,
}

fn arguments_ok(arguments: &Map<String, Value>) -> Result<(), String> {
    if nesting::json_object_too_deep(arguments) {
        return Err(nesting::too_deep_text("arguments"));
    }
    Ok(())
}

impl BrokerShared {
    /// Imports a document additively in strict mode (see the module docs): an error names the
    /// entry and nothing is applied.
    pub async fn import_definitions(&self, d: &Definitions) -> Result<(), super::DefError> {
        if let Some(c) = self.cluster() {
            // Checked whole first; the vhosts, users, permissions and policies then go
            // through the cluster (every node applies them), the rest is declared here.
            let mut verdicts = Verdicts {
                mode: ImportMode::Strict,
                rejected: Vec::new(),
            };
            let plan = self
                .check_import(d, &mut verdicts)
                .map_err(super::DefError::Invalid)?;
            let mut replicated = d.clone();
            replicated.users = plan
                .users
                .iter()
                .map(|(i, cred)| {
                    crate::cluster::link::user_def(&User {
                        name: d.users[*i].name.clone(),
                        password: cred.clone(),
                        tags: d.users[*i].tags.0.clone(),
                    })
                })
                .collect();
            let mut ops = crate::cluster::link::definition_ops(&replicated);
            // Queues and exchanges that exist stay as they are (a queue keeps its master).
            let st = c.state();
            ops.extend(
                crate::cluster::link::topology_ops(d, c.node_name())
                    .into_iter()
                    .filter(|op| match op {
                        warren_cluster::Op::Put { key, .. } => st.get(key).is_none(),
                        _ => true,
                    }),
            );
            c.propose(ops)
                .await
                .map_err(crate::cluster::link::def_error)?;
        }
        self.persister.begin_batch();
        let r = self.import_in_memory(d, ImportMode::Strict);
        self.persister.end_batch();
        let p = self.persist_definitions();
        r.map_err(super::DefError::Invalid)?;
        p
    }

    /// Checks, then applies the accepted entries. Returns the entries left out (always empty
    /// in strict mode, where the first one is the error).
    pub(super) fn import_in_memory(
        &self,
        d: &Definitions,
        mode: ImportMode,
    ) -> Result<Vec<String>, String> {
        let mut verdicts = Verdicts {
            mode,
            rejected: Vec::new(),
        };
        let plan = self.check_import(d, &mut verdicts)?;
        for (i, v) in d.vhosts.iter().enumerate() {
            if plan.vhosts.contains(&i) {
                self.add_vhost_in_memory(
                    &v.name,
                    VhostMeta {
                        description: v.description(),
                        tags: v.tags(),
                    },
                );
            }
        }
        for (i, cred) in plan.users {
            let u = &d.users[i];
            self.auth.put_user(User {
                name: u.name.clone(),
                password: cred,
                tags: u.tags.0.clone(),
            });
        }
        for (i, p) in d.permissions.iter().enumerate() {
            if plan.permissions.contains(&i) {
                self.auth.put_permissions(&p.user, &p.vhost, p.spec());
            }
        }
        let mut policy_vhosts = std::collections::BTreeSet::new();
        for (kind, p) in plan.policies {
            policy_vhosts.insert(p.vhost.clone());
            self.policies.put_kind(kind, p);
        }
        // Queues and exchanges that exist already take the imported policies now; those the
        // document declares below find them when they are made.
        for v in &policy_vhosts {
            self.apply_policies(v);
        }
        for (v, l) in plan.limits {
            if let Some(vh) = self.vhost(&v) {
                vh.set_limits(l);
            }
        }
        // Declaring can still fail on what the check cannot see; in skip mode that entry is
        // reported and the rest goes on.
        for (i, x) in d.exchanges.iter().enumerate() {
            if !plan.exchanges.contains(&i) {
                continue;
            }
            let r = (|| {
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
                .map(|_| ())
                .map_err(|e| e.reply_text())
            })()
            .map_err(|e| format!("exchanges[{i}] '{}': {e}", x.name));
            verdicts.judge(r)?;
        }
        for (i, q) in d.queues.iter().enumerate() {
            if !plan.queues.contains(&i) {
                continue;
            }
            // Clustered: a queue the cluster knows is made from its state (on its master with
            // what that node holds for it, a mirror's copy on disk included; a proxy elsewhere).
            if self
                .cluster()
                .is_some_and(|c| c.knows_queue(&q.vhost, &q.name))
            {
                continue;
            }
            let r = (|| {
                let vh = self
                    .vhost(&q.vhost)
                    .ok_or_else(|| format!("vhost '{}' vanished", q.vhost))?;
                let arguments = json_to_table(&q.arguments);
                let args =
                    QueueArgs::parse(&arguments, &q.name, &q.vhost).map_err(|e| e.reply_text())?;
                vh.declare_queue(QueueSpec {
                    name: q.name.clone(),
                    durable: q.durable,
                    exclusive_owner: None,
                    auto_delete: q.auto_delete,
                    arguments,
                    args,
                })
                .map(|_| ())
                .map_err(|e| e.reply_text())
            })()
            .map_err(|e| format!("queues[{i}] '{}' in vhost '{}': {e}", q.name, q.vhost));
            verdicts.judge(r)?;
        }
        for (i, b) in d.bindings.iter().enumerate() {
            if !plan.bindings.contains(&i) {
                continue;
            }
            // Clustered: a binding to a queue the cluster knows comes with that queue from the
            // cluster state (the queue was not declared above). At boot the state may not have
            // replayed the queue's declaration yet (a restarted node applies the log as it learns
            // what was committed), so a binding to a queue that is not here either waits for the
            // state too, instead of stopping the start.
            if b.destination_type == "queue"
                && self.cluster().is_some_and(|c| {
                    c.knows_queue(&b.vhost, &b.destination)
                        || self
                            .vhost(&b.vhost)
                            .is_some_and(|vh| vh.queue(&b.destination).is_none())
                })
            {
                continue;
            }
            let r = (|| {
                let vh = self
                    .vhost(&b.vhost)
                    .ok_or_else(|| format!("vhost '{}' vanished", b.vhost))?;
                let dest = match b.destination_type.as_str() {
                    "queue" => Destination::Queue(b.destination.as_str().into()),
                    _ => Destination::Exchange(b.destination.as_str().into()),
                };
                vh.bind(&b.source, dest, &b.routing_key, json_to_table(&b.arguments))
                    .map(|_| ())
                    .map_err(|e| e.reply_text())
            })()
            .map_err(|e| {
                format!(
                    "bindings[{i}] '{} -> {}' in vhost '{}': {e}",
                    b.source, b.destination, b.vhost
                )
            });
            verdicts.judge(r)?;
        }
        let other_parameters = d
            .parameters
            .iter()
            .filter(|p| matches!(super::json::limits_from_parameter(p), Ok(None)))
            .count();
        let ignored = other_parameters + d.global_parameters.len() + d.topic_permissions.len();
        if ignored > 0 {
            info!(
                count = ignored,
                "definitions import: parameters other than vhost-limits, global_parameters and \
                 topic_permissions ignored"
            );
        }
        Ok(verdicts.rejected)
    }

    /// Checks a document against itself and the current state; nothing is changed.
    fn check_import(&self, d: &Definitions, verdicts: &mut Verdicts) -> Result<ImportPlan, String> {
        let mut vhosts = HashSet::new();
        for (i, v) in d.vhosts.iter().enumerate() {
            let r = if v.name.is_empty() {
                Err(format!("vhosts[{i}]: name must not be empty"))
            } else {
                Ok(())
            };
            if verdicts.judge(r)? {
                vhosts.insert(i);
            }
        }
        let file_vhosts: HashSet<&str> =
            vhosts.iter().map(|&i| d.vhosts[i].name.as_str()).collect();
        let vhost_ok = |label: &str, v: &str| {
            if file_vhosts.contains(v) || self.auth.vhost_exists(v) {
                Ok(())
            } else {
                Err(format!("{label}: vhost '{v}' does not exist"))
            }
        };

        let mut users = Vec::new();
        for (i, u) in d.users.iter().enumerate() {
            let r = if u.name.is_empty() {
                Err(format!("users[{i}]: name must not be empty"))
            } else {
                u.credential().map_err(|e| format!("{}: {e}", u.label(i)))
            };
            match r {
                Ok(cred) => users.push((i, cred)),
                Err(e) => {
                    verdicts.judge(Err(e))?;
                }
            }
        }
        let file_users: HashSet<&str> = users
            .iter()
            .map(|&(i, _)| d.users[i].name.as_str())
            .collect();

        let mut permissions = HashSet::new();
        for (i, p) in d.permissions.iter().enumerate() {
            let label = format!("permissions[{i}] '{}' in vhost '{}'", p.user, p.vhost);
            let r = (|| {
                if !file_users.contains(p.user.as_str()) && self.auth.user(&p.user).is_none() {
                    return Err(format!("{label}: user '{}' does not exist", p.user));
                }
                vhost_ok(&label, &p.vhost)?;
                p.spec().validate().map_err(|e| format!("{label}: {e}"))
            })();
            if verdicts.judge(r)? {
                permissions.insert(i);
            }
        }

        let mut policies = Vec::new();
        for (section, kind, list) in [
            ("policies", PolicyKind::User, &d.policies),
            (
                "operator_policies",
                PolicyKind::Operator,
                &d.operator_policies,
            ),
        ] {
            for (i, p) in list.iter().enumerate() {
                let label = format!("{section}[{i}] '{}' in vhost '{}'", p.name, p.vhost);
                let r = vhost_ok(&label, &p.vhost)
                    .and_then(|()| p.to_policy_kind(kind).map_err(|e| format!("{label}: {e}")));
                match r {
                    Ok(policy) => policies.push((kind, policy)),
                    Err(e) => {
                        verdicts.judge(Err(e))?;
                    }
                }
            }
        }

        let mut limits = Vec::new();
        for (i, p) in d.parameters.iter().enumerate() {
            let r = super::json::limits_from_parameter(p).and_then(|l| match l {
                Some((v, l)) => vhost_ok(&format!("parameters[{i}]"), &v).map(|()| Some((v, l))),
                None => Ok(None),
            });
            match r {
                Ok(Some(l)) => limits.push(l),
                Ok(None) => {}
                Err(e) => {
                    verdicts.judge(Err(format!("parameters[{i}]: {e}")))?;
                }
            }
        }

        // Exchanges and queues the document declares (and that are accepted), per vhost, for
        // the binding checks.
        let mut new_x: HashSet<(&str, &str)> = HashSet::new();
        let mut new_q: HashSet<(&str, &str)> = HashSet::new();
        let mut exchanges = HashSet::new();
        for (i, x) in d.exchanges.iter().enumerate() {
            let label = format!("exchanges[{i}] '{}' in vhost '{}'", x.name, x.vhost);
            let r = (|| {
                vhost_ok(&label, &x.vhost)?;
                let kind = x.exchange_kind().map_err(|e| format!("{label}: {e}"))?;
                if x.name.is_empty() || x.name.starts_with("amq.") {
                    // The predeclared exchanges exist everywhere; anything else is reserved.
                    if x.name.is_empty()
                        || DEFAULT_EXCHANGES
                            .iter()
                            .any(|(n, k)| *n == x.name && *k == kind)
                    {
                        return Ok(false);
                    }
                    return Err(format!("{label}: the 'amq.' prefix is reserved"));
                }
                arguments_ok(&x.arguments).map_err(|e| format!("{label}: {e}"))?;
                let current = self.vhost(&x.vhost).and_then(|v| v.exchange(&x.name));
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
                Ok(true)
            })();
            match r {
                Ok(declare) => {
                    if declare {
                        exchanges.insert(i);
                        new_x.insert((x.vhost.as_str(), x.name.as_str()));
                    }
                }
                Err(e) => {
                    verdicts.judge(Err(e))?;
                }
            }
        }
        let mut queues = HashSet::new();
        for (i, q) in d.queues.iter().enumerate() {
            let label = format!("queues[{i}] '{}' in vhost '{}'", q.name, q.vhost);
            let r = (|| {
                vhost_ok(&label, &q.vhost)?;
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
                arguments_ok(&q.arguments).map_err(|e| format!("{label}: {e}"))?;
                let table = json_to_table(&q.arguments);
                QueueArgs::parse(&table, &q.name, &q.vhost)
                    // What a declare of this queue type refuses (a non-durable quorum queue, ...).
                    .and_then(|a| {
                        a.check_declare(&table, q.durable, false, q.auto_delete, &q.name, &q.vhost)
                    })
                    .map_err(|e| format!("{label}: {}", e.reply_text()))?;
                if let Some(cur) = self.vhost(&q.vhost).and_then(|v| v.queue(&q.name)) {
                    if cur.durable != q.durable || cur.auto_delete != q.auto_delete {
                        return Err(format!(
                            "{label}: inequivalent to the existing queue (durable or \
                             auto_delete differ)"
                        ));
                    }
                    if cur.exclusive_owner.is_some() {
                        return Err(format!("{label}: an exclusive queue of that name exists"));
                    }
                }
                Ok(())
            })();
            if verdicts.judge(r)? {
                queues.insert(i);
                new_q.insert((q.vhost.as_str(), q.name.as_str()));
            }
        }
        let mut bindings = HashSet::new();
        for (i, b) in d.bindings.iter().enumerate() {
            let label = format!(
                "bindings[{i}] '{} -> {}' in vhost '{}'",
                b.source, b.destination, b.vhost
            );
            let r = (|| {
                vhost_ok(&label, &b.vhost)?;
                arguments_ok(&b.arguments).map_err(|e| format!("{label}: {e}"))?;
                let vh = self.vhost(&b.vhost);
                let x_exists = |n: &str| {
                    new_x.contains(&(b.vhost.as_str(), n))
                        || (!n.is_empty() && DEFAULT_EXCHANGES.iter().any(|(d, _)| *d == n))
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
                Ok(())
            })();
            if verdicts.judge(r)? {
                bindings.insert(i);
            }
        }
        Ok(ImportPlan {
            vhosts,
            users,
            permissions,
            policies,
            limits,
            exchanges,
            queues,
            bindings,
        })
    }
}
