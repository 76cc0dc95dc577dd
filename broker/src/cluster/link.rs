//! A broker's running cluster: started by [`crate::Broker::bind`] when `cluster-listen` is set.
//!
//! [`ClusterLink::propose`] is how every replicated change is made: the batch is committed
//! through Raft and the call returns once this node's broker has applied it (the apply loop
//! of [`super::apply`] publishes how far it got), so a caller that changed something reads its
//! own write. Without a quorum a proposal fails with [`ClusterError::Timeout`] after the
//! propose timeout (the management API answers 503).

use super::apply::Applier;
use super::keys;
use super::settings;
use crate::definitions::{DefError, Definitions, ExportScope};
use crate::BrokerShared;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use warren_cluster::{Cluster, ClusterError, ClusterState, MemberStatus, Op};

/// The key a fresh cluster's first node claims (with `CheckVersion 0`) when it seeds the
/// cluster with its definitions: whoever commits first seeds, nobody twice.
pub const SEEDED_KEY: &str = "meta/seeded";

/// How long [`ClusterLink::propose`] waits for the local apply after the commit.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// The cluster of this broker.
pub struct ClusterLink {
    pub cluster: Cluster,
    /// Log index up to which the broker has applied the replicated state.
    applied: watch::Sender<u64>,
    stop: CancellationToken,
    /// This node's side of the queues mastered elsewhere.
    remote: Arc<super::remote::Remote>,
    /// The mirror streams of the queues mastered here.
    pub(crate) replication: Arc<super::replicate::Replication>,
    /// The copies of the queues this node mirrors.
    pub(crate) mirrors: Arc<super::mirror::Mirrors>,
    failure_detection: Duration,
    /// This node's side of the queues it masters, for the others.
    _serve: Arc<super::serve::Serve>,
    /// The queue handles of this node that are proxies (by address), and their masters.
    proxies: parking_lot::Mutex<std::collections::HashMap<usize, warren_cluster::NodeId>>,
}

impl std::fmt::Debug for ClusterLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterLink")
            .field("node", &self.cluster.node_name())
            .field("applied", &*self.applied.borrow())
            .finish()
    }
}

/// What a failed proposal means to a definitions call.
/// Three failure-detection periods and 2 s: time enough for a promotion after the master's
/// node dies.
fn promotion_wait(failure_detection: Duration) -> Duration {
    failure_detection * 3 + Duration::from_secs(2)
}

pub fn def_error(e: ClusterError) -> DefError {
    match e {
        ClusterError::Conflict { key, .. } => DefError::Invalid(format!(
            "changed concurrently on another node ({key}); retry"
        )),
        e => DefError::Unavailable(format!("cluster: {e}")),
    }
}

impl ClusterLink {
    /// Start (bootstrap, join or restart) the cluster of `shared` and catch up with it; the
    /// broker then loads its stored definitions and calls [`ClusterLink::begin`].
    pub async fn start(shared: &Arc<BrokerShared>) -> Result<Arc<ClusterLink>, String> {
        let cfg = settings::cluster_config(&shared.config)?;
        let failure_detection = cfg.timing.failure_detection;
        let cluster = Cluster::start(cfg)
            .await
            .map_err(|e| format!("cluster: {e}"))?;
        for a in cluster.listen_addrs() {
            info!(proto = %"cluster", addr = %a, "listening");
        }
        let remote = super::remote::Remote::start(
            cluster.clone(),
            shared.node.memory,
            promotion_wait(failure_detection),
        );
        let serve = super::serve::Serve::start(shared, cluster.clone());
        let replication = super::replicate::Replication::start(cluster.clone());
        let fenced: super::mirror::Fenced = {
            let state = cluster.state();
            Box::new(move |q, epoch| {
                let st = state.borrow();
                st.get(&keys::queue(&q.vhost, &q.name))
                    .and_then(|v| v.value["placement"]["epoch"].as_u64())
                    .is_some_and(|current| current > epoch)
            })
        };
        let mirrors = super::mirror::Mirrors::start(
            cluster.clone(),
            shared.node.memory,
            shared.store.clone(),
            fenced,
        );
        let link = Arc::new(ClusterLink {
            cluster,
            applied: watch::channel(0).0,
            stop: CancellationToken::new(),
            remote,
            replication,
            mirrors,
            failure_detection,
            _serve: serve,
            proxies: parking_lot::Mutex::default(),
        });
        link.catch_up().await;
        Ok(link)
    }

    /// Seed a fresh cluster with this node's definitions, apply the replicated state, and
    /// spawn the apply loop and the placement controller.
    pub async fn begin(self: &Arc<Self>, shared: &Arc<BrokerShared>) -> Result<(), String> {
        let link = self.clone();
        link.seed(shared).await?;
        let mut applier = Applier::from_local(shared);
        let mut state = link.cluster.state();
        let st = state.borrow_and_update().clone();
        applier.reconcile(shared, &link, &st).await;
        link.applied.send_replace(st.last_applied);
        link.apply_config(shared).await;
        if shared.config.cluster_partition_handling == settings::PartitionHandling::PauseMinority {
            link.pause_in_minority(shared);
        }
        let me = link.clone();
        let weak = Arc::downgrade(shared);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = me.stop.cancelled() => return,
                    r = state.changed() => if r.is_err() { return },
                }
                let st = state.borrow_and_update().clone();
                let Some(shared) = weak.upgrade() else { return };
                applier.reconcile(&shared, &me, &st).await;
                me.applied.send_replace(st.last_applied);
            }
        });
        // Started again: a failover from here is a failure again.
        let stopping = keys::stopping(link.node_name());
        if link.state().get(&stopping).is_some() {
            let me = link.clone();
            tokio::spawn(async move {
                if let Err(e) = me.propose(vec![Op::Delete { key: stopping }]).await {
                    warn!(error = %e, "cannot clear this node's stopping mark");
                }
            });
        }
        super::controller::spawn(&link, shared);
        super::status::announce(&link, shared);
        Ok(())
    }

    /// Whether [`ClusterLink::shutdown`] was called.
    pub fn stopped(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Test hook: this node's mirrors acknowledge nothing while `hold` is set (see
    /// `Mirrors::hold_acks`).
    pub fn hold_mirror_acks(&self, hold: bool) {
        self.mirrors.hold_acks(hold);
    }

    /// `cluster-failure-detection-ms`.
    pub fn failure_detection(&self) -> Duration {
        self.failure_detection
    }

    /// How long a consumer of a queue whose master died waits for the promotion (a consume
    /// that arrives meanwhile, or a consumer that was attached) before it is refused or
    /// cancelled.
    pub fn promotion_wait(&self) -> Duration {
        promotion_wait(self.failure_detection)
    }

    /// The proxy `old` was replaced by `new`: commands still sent to `old` go to `new`, and
    /// the consumers that waited for the promotion consume on through it.
    pub(crate) fn proxy_replaced(
        &self,
        old: &crate::queue::QueueHandle,
        new: &crate::queue::QueueHandle,
    ) {
        self.remote.replaced(old, new);
    }

    /// `sync_queue` (`cancel`: `cancel_sync_queue`) of the queue mastered here; false if it
    /// is not.
    pub fn sync_local(&self, queue: &super::wire::QueueRef, cancel: bool) -> bool {
        if cancel {
            self.replication.cancel_sync(queue)
        } else {
            self.replication.sync_now(queue)
        }
    }

    /// `sync_queue` / `cancel_sync_queue` asked of any node: carried out by the queue's
    /// master. Err: no such clustered queue, or its master cannot be asked.
    pub async fn sync_queue(&self, vhost: &str, name: &str, cancel: bool) -> Result<(), String> {
        let queue = super::wire::QueueRef {
            vhost: vhost.to_owned(),
            name: name.to_owned(),
        };
        let st = self.state();
        let master = st
            .get(&keys::queue(vhost, name))
            .and_then(|v| v.value["placement"]["master"].as_str().map(str::to_owned))
            .ok_or_else(|| format!("no queue '{name}' in vhost '{vhost}'"))?;
        if master == self.node_name() {
            return if self.sync_local(&queue, cancel) {
                Ok(())
            } else {
                Err(format!("queue '{name}' is not running here yet"))
            };
        }
        self.remote
            .sync(warren_cluster::node_id_of(&master), queue, cancel)
            .await
    }

    /// `pause_minority`: while this node cannot reach a majority of the voters it serves no
    /// client (connections closed with 320, new ones refused, as after stop_app), so clients
    /// and load balancers go to the majority; it resumes when the majority is back.
    fn pause_in_minority(self: &Arc<Self>, shared: &Arc<BrokerShared>) {
        let mut events = self.cluster.peer_events();
        let weak = Arc::downgrade(shared);
        let me = self.clone();
        let pause = move |shared: &BrokerShared, minority: bool| {
            if shared.registry.set_paused(minority) {
                if minority {
                    warn!(
                        "cluster partition handling pause_minority: this node is in a minority; \
                         closing client connections and refusing new ones until the majority \
                         is back"
                    );
                    shared
                        .registry
                        .close_all("node paused: it cannot reach a majority of the cluster");
                } else {
                    info!("majority reachable again: serving clients (pause_minority)");
                }
            }
        };
        pause(shared, !self.cluster.has_quorum());
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    _ = me.stop.cancelled() => return,
                    ev = events.recv() => ev,
                };
                let Some(shared) = weak.upgrade() else { return };
                match ev {
                    Ok(warren_cluster::PeerEvent::QuorumLost) => pause(&shared, true),
                    Ok(warren_cluster::PeerEvent::QuorumRegained) => pause(&shared, false),
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        pause(&shared, !me.cluster.has_quorum());
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }

    /// Commit `ops` and wait until this node's broker has applied them. Fails at once when a
    /// majority of the voters is out of reach.
    pub async fn propose(&self, ops: Vec<Op>) -> Result<u64, ClusterError> {
        if !self.cluster.has_quorum() {
            return Err(ClusterError::Timeout(
                "no quorum: a majority of the cluster's voters is out of reach".into(),
            ));
        }
        let idx = self.cluster.propose(ops).await?;
        self.wait_applied(idx).await?;
        Ok(idx)
    }

    /// Wait until this node's broker has applied the log up to `idx`.
    pub async fn wait_applied(&self, idx: u64) -> Result<(), ClusterError> {
        let mut rx = self.applied.subscribe();
        let applied = tokio::time::timeout(APPLY_WAIT, async {
            rx.wait_for(|a| *a >= idx).await.is_ok()
        })
        .await;
        match applied {
            Ok(true) => Ok(()),
            _ => Err(ClusterError::Timeout(format!(
                "committed at index {idx} but not applied here in time"
            ))),
        }
    }

    /// Serve `handle` as a proxy of the queue mastered on `master`.
    pub(crate) fn run_proxy(
        &self,
        handle: crate::queue::QueueHandle,
        rx: tokio::sync::mpsc::Receiver<crate::queue::QueueCmd>,
        master: warren_cluster::NodeId,
    ) {
        self.proxies
            .lock()
            .insert(Arc::as_ptr(&handle) as usize, master);
        self.remote.run_proxy(handle, rx, master);
    }

    /// Whether the cluster state has this queue: it is then made on this node from the state
    /// (a local queue where this node is its master, a proxy elsewhere), not from the stored
    /// definitions.
    pub fn knows_queue(&self, vhost: &str, name: &str) -> bool {
        let state = self.cluster.state();
        let known = state.borrow().get(&keys::queue(vhost, name)).is_some();
        known
    }

    /// Whether `q` is a proxy of a queue mastered on another node.
    pub fn is_proxy(&self, q: &crate::queue::QueueHandle) -> bool {
        self.proxies.lock().contains_key(&(Arc::as_ptr(q) as usize))
    }

    /// The master `q` is a proxy of.
    pub fn proxy_master(&self, q: &crate::queue::QueueHandle) -> Option<warren_cluster::NodeId> {
        self.proxies.lock().get(&(Arc::as_ptr(q) as usize)).copied()
    }

    /// A queue left this node's vhost `vhost` (deleted, auto-deleted, expired): if it was
    /// mastered here, the cluster is told (the other nodes drop their proxies).
    pub fn queue_removed(self: &Arc<Self>, q: &crate::queue::QueueHandle) {
        if self
            .proxies
            .lock()
            .remove(&(Arc::as_ptr(q) as usize))
            .is_some()
            || q.exclusive_owner.is_some()
        {
            return;
        }
        let key = keys::queue(&q.vhost, &q.name);
        let st = self.state();
        let mine = st
            .get(&key)
            .is_some_and(|v| v.value["placement"]["master"] == self.node_name());
        if !mine {
            return;
        }
        info!(queue = %q.name, vhost = %q.vhost, "a queue mastered here is gone: the cluster drops it");
        let ops = crate::topology::queue_delete_ops(self, &q.vhost, &q.name);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.propose(ops).await {
                warn!(error = %e, "cannot tell the cluster a queue is gone; it stays listed until retried");
            }
        });
    }

    /// The replicated state as applied by the cluster layer (may be ahead of the broker).
    pub fn state(&self) -> Arc<ClusterState> {
        self.cluster.state().borrow().clone()
    }

    pub fn members(&self) -> Vec<MemberStatus> {
        self.cluster.members()
    }

    pub fn node_name(&self) -> &str {
        self.cluster.node_name()
    }

    /// Stop the apply loop and the cluster node.
    pub async fn shutdown(&self) {
        // A stop on purpose: the queues mastered here fail over by ha-promote-on-shutdown.
        let mark = vec![Op::Put {
            key: keys::stopping(self.node_name()),
            value: json!({ "at_ms": crate::stats::epoch_ms() }),
        }];
        if self.cluster.has_quorum() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.cluster.propose(mark)).await;
        }
        self.stop.cancel();
        self.cluster.shutdown().await;
    }

    /// A restarted node commits an empty batch before it serves: once that is applied here,
    /// so is everything committed before it (what changed while this node was away). Without
    /// a quorum for 30 s it starts with what it has and says so.
    async fn catch_up(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.cluster.propose(Vec::new()).await {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    warn!(
                        error = %e,
                        "cannot reach a quorum to catch up: serving with the definitions this \
                         node has; changes made meanwhile arrive when the cluster is back"
                    );
                    return;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// A cluster that nobody seeded yet takes this node's definitions (vhosts, users,
    /// permissions, policies): what it loaded from its data dir, or the defaults of a first
    /// start. A node that joins an existing cluster takes the cluster's instead.
    async fn seed(&self, shared: &BrokerShared) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if self.state().get(SEEDED_KEY).is_some() {
                return Ok(());
            }
            let d = shared.export_definitions(ExportScope::Durable);
            let mut ops = vec![
                Op::CheckVersion {
                    key: SEEDED_KEY.into(),
                    version: 0,
                },
                Op::Put {
                    key: SEEDED_KEY.into(),
                    value: json!({ "by": self.node_name() }),
                },
            ];
            ops.extend(definition_ops(&d));
            ops.extend(topology_ops(&d, self.node_name()));
            match self.cluster.propose(ops).await {
                Ok(_) => {
                    info!(
                        vhosts = d.vhosts.len(),
                        users = d.users.len(),
                        policies = d.policies.len() + d.operator_policies.len(),
                        "seeded the cluster with this node's definitions"
                    );
                    return Ok(());
                }
                Err(ClusterError::Conflict { .. }) => return Ok(()),
                Err(e) if tokio::time::Instant::now() < deadline => {
                    warn!(error = %e, "seeding the cluster's definitions; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(format!("cluster: cannot seed the definitions: {e}")),
            }
        }
    }

    /// Users, vhosts and permissions written in the config file win, as on a single node:
    /// the entries that differ from the cluster's are proposed (in the background when there
    /// is no quorum now).
    async fn apply_config(&self, shared: &BrokerShared) {
        let cfg = &shared.config;
        if cfg.vhosts.is_empty() && cfg.users.is_empty() && cfg.permissions.is_empty() {
            return;
        }
        let st = self.state();
        let mut ops = Vec::new();
        for v in &cfg.vhosts {
            if st.get(&keys::vhost(v)).is_none() {
                ops.push(put(keys::vhost(v), &vhost_def(v, Default::default())));
            }
        }
        for u in &cfg.users {
            let same = shared
                .auth
                .user(&u.name)
                .is_some_and(|cur| cur.password.verify(&u.password) && cur.tags == u.tags);
            if !same || st.get(&keys::user(&u.name)).is_none() {
                let user = crate::auth::User {
                    name: u.name.clone(),
                    password: crate::auth::PasswordHash::new(&u.password),
                    tags: u.tags.clone(),
                };
                ops.push(put(keys::user(&u.name), &user_def(&user)));
            }
        }
        for p in &cfg.permissions {
            let def = crate::definitions::json::PermissionDef {
                user: p.user.clone(),
                vhost: p.vhost.clone(),
                configure: p.configure.clone(),
                write: p.write.clone(),
                read: p.read.clone(),
            };
            let key = keys::perm(&p.vhost, &p.user);
            if st.get(&key).map(|v| &*v.value) != Some(&keys::to_value(&def)) {
                ops.push(put(key, &def));
            }
        }
        if ops.is_empty() {
            return;
        }
        if let Err(e) = self.propose(ops).await {
            error!(error = %e, "cannot apply the config file's users, vhosts and permissions to the cluster");
        }
    }
}

fn put<T: serde::Serialize>(key: String, v: &T) -> Op {
    Op::Put {
        key,
        value: keys::to_value(v),
    }
}

/// A vhost as the cluster stores it.
pub fn vhost_def(name: &str, meta: crate::auth::VhostMeta) -> crate::definitions::json::VhostDef {
    use crate::definitions::json::{Tags, VhostDef, VhostMetadata};
    VhostDef {
        name: name.to_owned(),
        limits: Value::Array(Vec::new()),
        metadata: VhostMetadata {
            description: meta.description,
            tags: Tags(meta.tags),
        },
        description: None,
        tags: None,
    }
}

/// A user as the cluster stores it (the password hash, never the password).
pub fn user_def(u: &crate::auth::User) -> crate::definitions::json::UserDef {
    use crate::definitions::json::{Tags, UserDef};
    UserDef {
        name: u.name.clone(),
        password_hash: u.password.hash.clone(),
        hashing_algorithm: u.password.algorithm.as_str().to_owned(),
        password: None,
        tags: Tags(u.tags.clone()),
        limits: Value::Object(Default::default()),
    }
}

/// The `Put`s that store a document's vhosts, users, permissions and policies.
pub fn definition_ops(d: &Definitions) -> Vec<Op> {
    use crate::policy::PolicyKind;
    let mut ops = Vec::new();
    for v in &d.vhosts {
        ops.push(put(keys::vhost(&v.name), v));
    }
    for u in &d.users {
        ops.push(put(keys::user(&u.name), u));
    }
    for p in &d.permissions {
        ops.push(put(keys::perm(&p.vhost, &p.user), p));
    }
    for p in &d.policies {
        ops.push(put(keys::policy(PolicyKind::User, &p.vhost, &p.name), p));
    }
    for p in &d.operator_policies {
        ops.push(put(
            keys::policy(PolicyKind::Operator, &p.vhost, &p.name),
            p,
        ));
    }
    for p in &d.parameters {
        if let Ok(Some((vhost, _))) = crate::definitions::json::limits_from_parameter(p) {
            ops.push(put(keys::limits(&vhost), p));
        }
    }
    ops
}

/// The `Put`s that store a document's exchanges (not the predeclared ones), queues (mastered
/// by `master`) and bindings.
pub fn topology_ops(d: &Definitions, master: &str) -> Vec<Op> {
    let mut ops = Vec::new();
    for x in &d.exchanges {
        if x.name.is_empty() || x.name.starts_with("amq.") {
            continue;
        }
        ops.push(put(keys::exchange(&x.vhost, &x.name), x));
    }
    for q in &d.queues {
        let v = keys::QueueValue {
            def: q.clone(),
            exclusive: None,
            placement: keys::Placement {
                master: master.to_owned(),
                ..Default::default()
            },
        };
        ops.push(put(keys::queue(&q.vhost, &q.name), &v));
    }
    for b in &d.bindings {
        if b.source.is_empty() {
            continue;
        }
        ops.push(put(keys::binding(b), b));
    }
    ops
}
