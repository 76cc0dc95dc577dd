//! The cluster node: storage, openraft and links tied together behind [`Cluster`].
//!
//! Lifecycle: `start` binds the listeners, opens the data dir and starts Raft. A node with no
//! data and no seeds bootstraps a one-node cluster; with seeds it joins (learner, then voter);
//! with data it simply restarts and catches up from whoever leads.
//!
//! A monitor task ticks every `link_heartbeat`: it keeps links to every member up, reports
//! quorum transitions, refreshes this node's address in the membership when it changed across a
//! restart, and in `ignore` mode forces a one-voter cluster when the only other voter of a
//! two-voter cluster without witness has been unreachable for `failure_detection`.
//!
//! Two operations replace the Raft instance under a lock (`restart`): the unsafe membership reset
//! ([`Cluster::force_single`]) and the reset-and-rejoin of an evicted node ([`Cluster::rejoin`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::{ChangeMembers, CommittedLeaderId, EntryPayload};
use parking_lot::{Mutex, RwLock};
use ring::hmac;
use tokio::net::TcpListener;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{ClusterConfig, PartitionHandling};
use crate::error::ClusterError;
use crate::net::handshake::{HandshakeError, Identity, PeerHello};
use crate::net::tls::Tls;
use crate::net::{AppMessage, CallError, Handler, Net, NetConfig, PeerEvent, PeerView};
use crate::rpc::{encode, OpError, RaftNet, RpcRequest, RpcResponse};
use crate::state::{Applied, ClusterState, EvictReason, Op};
use crate::storage::file::{read_records, write_atomic};
use crate::storage::log::LogStore;
use crate::storage::sm::StateMachine;
use crate::types::{
    node_id_of, Entry, LogId, Membership, NodeId, NodeInfo, Raft, Request, Response, Vote,
};

/// Largest proposal (its JSON encoding).
pub const MAX_PROPOSAL: usize = 1 << 20;

/// What [`Cluster::members`] reports about one member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberStatus {
    pub id: NodeId,
    pub name: String,
    pub addr: String,
    /// false: a learner still catching up.
    pub voter: bool,
    pub witness: bool,
    /// This node, or a link is up and something arrived within `failure_detection`.
    pub running: bool,
    /// Time since something last arrived from it (zero for this node).
    pub last_contact: Option<Duration>,
    /// Its link is down and its address refused a connection since: its process is gone
    /// (the host answers, nothing listens), so there is no need to wait for the failure
    /// detection time to call it down.
    pub refused: bool,
}

/// A cluster node. Cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: ClusterConfig,
    id: NodeId,
    info: NodeInfo,
    listen: Vec<SocketAddr>,
    net: Net,
    raft: RwLock<Raft>,
    log: Mutex<LogStore>,
    sm: StateMachine,
    raft_config: Arc<openraft::Config>,
    state_tx: watch::Sender<Arc<ClusterState>>,
    applied_tx: broadcast::Sender<Applied>,
    events: broadcast::Sender<PeerEvent>,
    restart: tokio::sync::Mutex<()>,
    rejoining: AtomicBool,
    /// `elect_if_leader_gone` is running.
    electing: AtomicBool,
    removed_told: AtomicBool,
    /// Why a peer said this node is no longer a member (forget / leave), once told.
    removed: Mutex<Option<EvictReason>>,
    /// This process discarded its metadata and rejoined at least once.
    rejoined: AtomicBool,
    refreshing_addr: AtomicBool,
    quorum: AtomicBool,
    stopped: AtomicBool,
    cancel: CancellationToken,
    tracker: TaskTracker,
    /// A weak handle on itself, for tasks started from `&self` callbacks.
    me: std::sync::OnceLock<Weak<Inner>>,
}

fn raft_err(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Raft(e.to_string())
}

fn op_err(e: OpError) -> ClusterError {
    match e {
        OpError::Conflict(index, c) => ClusterError::conflict(index, c),
        OpError::NotLeader(_) | OpError::NoLeader => ClusterError::Timeout("no leader".into()),
        OpError::NotInitialized(n) => {
            ClusterError::Refused(format!("{n} is not part of a cluster"))
        }
        OpError::Refused(why) => ClusterError::Refused(why),
        OpError::Other(why) => ClusterError::Raft(why),
    }
}

fn raft_config(cfg: &ClusterConfig) -> Result<openraft::Config, ClusterError> {
    let t = &cfg.timing;
    let ms = |d: Duration| d.as_millis() as u64;
    let c = openraft::Config {
        cluster_name: "warren".into(),
        heartbeat_interval: ms(t.raft_heartbeat),
        election_timeout_min: ms(t.election_timeout),
        // openraft's follower-side leader lease is election_timeout_max: a voter refuses
        // every vote request that long after the last heartbeat of a leader, even one whose
        // process is known dead. A narrow range keeps that (and so a failover whose dead
        // master was also the Raft leader) short; randomisation over 20 % still spreads the
        // candidates of a split vote.
        election_timeout_max: ms(t.election_timeout) * 6 / 5,
        install_snapshot_timeout: ms(t.election_timeout * 2).max(1000),
        max_payload_entries: 32,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(cfg.snapshot.every),
        max_in_snapshot_log_to_keep: cfg.snapshot.keep,
        snapshot_max_chunk_size: 256 << 10,
        ..Default::default()
    };
    c.validate()
        .map_err(|e| ClusterError::Config(e.to_string()))
}

/// The data dir belongs to one node name: refuse to start another node on it.
fn check_identity(cfg: &ClusterConfig) -> Result<(), ClusterError> {
    match read_records(&cfg.data_dir, "node")? {
        Some(recs) => {
            let name = recs
                .first()
                .map(|r| String::from_utf8_lossy(r).into_owned());
            if name.as_deref() != Some(cfg.node_name.as_str()) {
                return Err(ClusterError::Config(format!(
                    "data dir {} belongs to node {:?}, not {:?}",
                    cfg.data_dir.display(),
                    name.unwrap_or_default(),
                    cfg.node_name
                )));
            }
        }
        None => write_atomic(&cfg.data_dir, "node", &[cfg.node_name.as_bytes()])?,
    }
    Ok(())
}

// === impl Cluster ===

impl Cluster {
    /// Bind, open storage, start Raft, then bootstrap, join or restart (see the module doc).
    pub async fn start(cfg: ClusterConfig) -> Result<Cluster, ClusterError> {
        cfg.validate()?;
        let id = node_id_of(&cfg.node_name);
        std::fs::create_dir_all(&cfg.data_dir)?;
        check_identity(&cfg)?;
        let mut listeners = Vec::new();
        let mut listen = Vec::new();
        for a in &cfg.listen {
            let l = TcpListener::bind(a).await?;
            listen.push(l.local_addr()?);
            listeners.push(l);
        }
        let advertise = cfg
            .advertise
            .clone()
            .unwrap_or_else(|| listen[0].to_string());
        let tls = cfg.tls.as_ref().map(Tls::load).transpose()?;
        let info = NodeInfo {
            name: cfg.node_name.clone(),
            addr: advertise.clone(),
            witness: cfg.witness,
        };
        let (state_tx, _) = watch::channel(Arc::new(ClusterState::default()));
        let (applied_tx, _) = broadcast::channel(4096);
        let (events, _) = broadcast::channel(1024);
        let log = LogStore::open(&cfg.data_dir)?;
        let sm = StateMachine::open(&cfg.data_dir, state_tx.clone(), applied_tx.clone())?;
        let pristine = log.is_pristine() && sm.membership().log_id().is_none();
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let net = Net::new(
            NetConfig {
                identity: Identity {
                    id,
                    name: cfg.node_name.clone(),
                    advertise,
                    boot,
                    key: hmac::Key::new(hmac::HMAC_SHA256, &cfg.secret),
                },
                timing: cfg.timing.clone(),
                tls,
                app_queue: cfg.app_queue,
                app_inbox: cfg.app_inbox,
            },
            events.clone(),
        );
        let raft_config = Arc::new(raft_config(&cfg)?);
        let raft = new_raft(id, &raft_config, &net, &cfg, &log, &sm).await?;
        let inner = Arc::new(Inner {
            cfg,
            id,
            info,
            listen,
            net: net.clone(),
            raft: RwLock::new(raft),
            log: Mutex::new(log),
            sm,
            raft_config,
            state_tx,
            applied_tx,
            events,
            restart: tokio::sync::Mutex::new(()),
            rejoining: AtomicBool::new(false),
            electing: AtomicBool::new(false),
            removed_told: AtomicBool::new(false),
            removed: Mutex::new(None),
            rejoined: AtomicBool::new(false),
            refreshing_addr: AtomicBool::new(false),
            quorum: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            cancel: CancellationToken::new(),
            tracker: TaskTracker::new(),
            me: std::sync::OnceLock::new(),
        });
        let _ = inner.me.set(Arc::downgrade(&inner));
        let handler: Arc<dyn Handler> = inner.clone();
        let weak: Weak<dyn Handler> = Arc::downgrade(&handler);
        net.set_handler(weak);
        net.serve(listeners);
        inner.sync_peers();
        let cluster = Cluster {
            inner: inner.clone(),
        };
        if pristine {
            let res = if inner.cfg.join.is_empty() {
                inner.bootstrap().await
            } else {
                let seeds = inner.cfg.join.clone();
                inner.join(&seeds, inner.cfg.timing.join_timeout).await
            };
            if let Err(e) = res {
                cluster.shutdown().await;
                return Err(e);
            }
        } else {
            info!(node = %inner.info.name, "cluster node restarted from its data dir");
        }
        let m = inner.clone();
        inner.tracker.spawn(async move { m.monitor().await });
        let w = cluster.clone();
        let mut events = inner.events.subscribe();
        inner.tracker.spawn(async move {
            // A leader whose process is known gone is replaced at once (see
            // `elect_if_leader_gone`): on its `Gone`, and each link heartbeat for a leader
            // learnt of after its `Gone` went by.
            let mut tick = tokio::time::interval(w.inner.cfg.timing.link_heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = w.inner.cancel.cancelled() => return,
                    _ = tick.tick() => {}
                    ev = events.recv() => {
                        if matches!(ev, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                            return;
                        }
                    }
                }
                w.elect_if_leader_gone().await;
            }
        });
        Ok(cluster)
    }

    /// This node's id ([`node_id_of`] its name).
    pub fn node_id(&self) -> NodeId {
        self.inner.id
    }

    pub fn node_name(&self) -> &str {
        &self.inner.info.name
    }

    /// The bound inter-node listeners.
    pub fn listen_addrs(&self) -> Vec<SocketAddr> {
        self.inner.listen.clone()
    }

    /// The address peers dial.
    pub fn advertised_addr(&self) -> &str {
        &self.inner.info.addr
    }

    /// Propose an atomic batch from any node (forwarded to the leader). Returns its log index once
    /// it is committed and applied on this node. A failed `CheckVersion` is
    /// [`ClusterError::Conflict`]: the batch was committed but applied nothing.
    ///
    /// If leadership changes while a proposal is in flight, it may be retried and so applied
    /// twice; a `Timeout` leaves the outcome unknown. Batches that must apply once carry a
    /// `CheckVersion`.
    pub async fn propose(&self, ops: Vec<Op>) -> Result<u64, ClusterError> {
        self.inner.propose(ops).await
    }

    /// The applied state on this node.
    pub fn state(&self) -> watch::Receiver<Arc<ClusterState>> {
        self.inner.state_tx.subscribe()
    }

    /// Changes as they are applied, in log order. On `RecvError::Lagged`, or
    /// [`Applied::Reset`], re-read [`Cluster::state`] whole.
    pub fn applied(&self) -> broadcast::Receiver<Applied> {
        self.inner.applied_tx.subscribe()
    }

    /// Every member with its link status.
    pub fn members(&self) -> Vec<MemberStatus> {
        self.inner.members()
    }

    /// The current Raft leader, as this node knows it.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.leader()
    }

    /// Waits until this node's view of the Raft leader is other than `seen`, and returns it
    /// (never, once the node stopped).
    pub async fn leader_change(&self, seen: Option<NodeId>) -> Option<NodeId> {
        let mut m = self.inner.raft().metrics();
        loop {
            let now = m.borrow_and_update().current_leader;
            if now != seen {
                return now;
            }
            if m.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether this node leads with [`Cluster::state`] holding everything committed before its
    /// term, waiting up to `within` for that. A new leader learns that its predecessors' last
    /// entries are committed only when the first entry of its own term commits; until that
    /// is applied here, its state may lack them (a stopping mark the old leader committed just
    /// before it exited), and a decision on that state would be made on a stale view.
    pub async fn leads_with_current_state(&self, within: Duration) -> bool {
        let mut m = self.inner.raft().metrics();
        let me = Some(self.inner.id);
        let ready = |m: &openraft::RaftMetrics<NodeId, _>| {
            m.current_leader == me
                && m.last_applied
                    .is_some_and(|l| l.leader_id.term == m.current_term)
        };
        let settled = tokio::time::timeout(within, async {
            match m.wait_for(|m| ready(m) || m.current_leader != me).await {
                Ok(m) => ready(&m),
                Err(_) => false,
            }
        })
        .await;
        settled.unwrap_or(false)
    }

    /// If the leader this node follows is gone (its link dropped and its address refused a
    /// connection: the process died), start an election now instead of waiting for the
    /// election timeout. Returns whether it did.
    ///
    /// openraft's voters refuse every vote request for a leader lease after their leader's last
    /// heartbeat, while their vote for it stands. So every running voter that knows the leader
    /// gone stands as a candidate at once: its vote is then its own, not the dead leader's, and
    /// it grants any higher term whose log is as complete as its own. Each asks again after a
    /// random 10-40 ms, each time at a higher term, until the same new leader is seen twice in
    /// a row (three election timeouts at most), but only while its vote is its own or the dead
    /// leader's: a voter that granted another candidate lets it win (a new term from it would
    /// unseat that candidate, whose log may be the more complete). The random spacing ends a
    /// split vote, and every voter keeps trying, so one whose log is behind cannot keep
    /// outbidding the one that can win, as a single fixed candidate would.
    pub async fn elect_if_leader_gone(&self) -> bool {
        let inner = &self.inner;
        let Some(dead) = inner.leader() else {
            return false;
        };
        if dead == inner.id || !inner.net.status(dead).refused {
            return false;
        }
        let me_voter = inner.members().iter().any(|m| m.id == inner.id && m.voter);
        if !me_voter || inner.electing.swap(true, Ordering::AcqRel) {
            return false;
        }
        let raft = inner.raft();
        let end = tokio::time::Instant::now() + inner.cfg.timing.election_timeout * 3;
        let mut seen = None;
        while tokio::time::Instant::now() < end && !inner.cancel.is_cancelled() {
            let (leader, voted) = {
                let m = raft.metrics();
                let m = m.borrow();
                (m.current_leader, m.vote.leader_id().voted_for())
            };
            match leader {
                Some(l) if l != dead => {
                    if seen == Some(l) {
                        break;
                    }
                    seen = Some(l);
                }
                _ => {
                    seen = None;
                    if voted.is_none() || voted == Some(dead) || voted == Some(inner.id) {
                        let _ = raft.trigger().elect().await;
                    }
                }
            }
            let pause = rand::Rng::gen_range(&mut rand::thread_rng(), 10..=40);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        inner.electing.store(false, Ordering::Release);
        true
    }

    /// Whether this node answered pings from a majority of voters (itself included if it votes)
    /// within the lease: what `pause_minority` and a queue master's right to confirm check.
    pub fn has_quorum(&self) -> bool {
        self.inner.has_quorum()
    }

    /// Remove another member (rabbitmqctl forget_cluster_node). It should be stopped: if it runs,
    /// it is told it was removed on its next contact and stays out until reset.
    pub async fn forget(&self, node: &str) -> Result<(), ClusterError> {
        let st = self.inner.state_tx.borrow().clone();
        let id = st
            .members
            .values()
            .find(|m| m.name == node)
            .map_or_else(|| node_id_of(node), |m| m.id);
        if id == self.inner.id {
            return Err(ClusterError::Refused(
                "a node cannot forget itself: use leave".into(),
            ));
        }
        if !st.members.contains_key(&id) {
            return Err(ClusterError::UnknownNode(node.to_string()));
        }
        self.inner
            .serve_remove(id, EvictReason::Forgotten)
            .await
            .map(|_| ())
            .map_err(op_err)
    }

    /// Leave the cluster cleanly: this node is removed from the membership, shut down, and its
    /// Raft data deleted (a later start with the same data dir begins afresh).
    pub async fn leave(&self) -> Result<(), ClusterError> {
        self.inner
            .serve_remove(self.inner.id, EvictReason::Left)
            .await
            .map_err(op_err)?;
        self.shutdown().await;
        LogStore::wipe(&self.inner.cfg.data_dir)?;
        self.inner.sm.wipe()?;
        Ok(())
    }

    /// Queue an app message to `to` on `channel`. Ordered per peer (so per channel); never blocks:
    /// a full outbound queue (`app_queue` messages) is [`ClusterError::QueueFull`] and the
    /// message is not queued. See the `net` module doc for what a link failure does to messages.
    pub fn send(&self, to: NodeId, channel: u8, payload: Bytes) -> Result<(), ClusterError> {
        self.inner.net.send_app(to, channel, payload)
    }

    /// Receive the app messages of `channel` (a later call for the same channel replaces this
    /// subscriber). Messages for a channel nobody subscribed to are dropped. If a subscriber
    /// falls behind by `app_inbox` messages for long, the sender's link is closed (Down/Up).
    pub fn subscribe_app(&self, channel: u8) -> mpsc::Receiver<AppMessage> {
        self.inner.net.subscribe(channel)
    }

    /// Set once a peer told this node it was removed (forget / leave): it stays out until reset.
    /// (The same as [`PeerEvent::RemovedFromCluster`], for whoever subscribed too late.)
    pub fn removed(&self) -> Option<EvictReason> {
        *self.inner.removed.lock()
    }

    /// Whether this process discarded its metadata and rejoined under a survivor (the same as
    /// [`PeerEvent::Rejoined`], for whoever subscribed too late).
    pub fn rejoined(&self) -> bool {
        self.inner.rejoined.load(Ordering::Acquire)
    }

    /// Links coming up and going down, quorum transitions, evictions.
    pub fn peer_events(&self) -> broadcast::Receiver<PeerEvent> {
        self.inner.events.subscribe()
    }

    /// Unsafe membership reset: make this node the only voter and carry on alone.
    ///
    /// For a two-voter cluster without witness that lost one node (RabbitMQ's `ignore` mode does
    /// the equivalent implicitly; `partition_handling = Ignore` calls this automatically). Safe
    /// when the other node is really down (crashed or killed): it is recorded as evicted, and
    /// when it comes back it discards its metadata and rejoins under this node. Unsafe under a
    /// partition: both sides may do it and diverge ([`PeerEvent::SplitBrain`]).
    pub async fn force_single(&self) -> Result<(), ClusterError> {
        self.inner.force_single().await
    }

    /// Discard this node's metadata and join again through `seeds` (reset + join_cluster): how
    /// an operator resolves a split brain, and what an evicted node does by itself.
    pub async fn rejoin(&self, seeds: Vec<String>) -> Result<(), ClusterError> {
        self.inner.clone().reset_and_rejoin(seeds).await
    }

    /// Test hook (fault injection): drop all traffic with these peers (links closed, new links
    /// refused both ways) until called again with another set (`&[]` heals).
    pub fn set_partition(&self, blocked: &[NodeId]) {
        self.inner.net.set_partition(blocked);
    }

    /// Stop Raft, close links and listeners, flush the log.
    pub async fn shutdown(&self) {
        self.inner.shutdown().await;
    }
}

async fn new_raft(
    id: NodeId,
    config: &Arc<openraft::Config>,
    net: &Net,
    cfg: &ClusterConfig,
    log: &LogStore,
    sm: &StateMachine,
) -> Result<Raft, ClusterError> {
    let network = RaftNet {
        net: net.clone(),
        backoff: cfg.timing.link_heartbeat * 2,
    };
    Raft::new(id, config.clone(), network, log.clone(), sm.clone())
        .await
        .map_err(raft_err)
}

// === impl Inner ===

impl Inner {
    fn raft(&self) -> Raft {
        self.raft.read().clone()
    }

    fn state(&self) -> Arc<ClusterState> {
        self.state_tx.borrow().clone()
    }

    fn leader(&self) -> Option<NodeId> {
        self.raft().metrics().borrow().current_leader
    }

    fn deadline(&self, d: Duration) -> Instant {
        Instant::now() + d
    }

    async fn bootstrap(&self) -> Result<(), ClusterError> {
        let raft = self.raft();
        let nodes = BTreeMap::from([(self.id, self.info.clone())]);
        raft.initialize(nodes).await.map_err(raft_err)?;
        info!(node = %self.info.name, "bootstrapped a new cluster");
        let deadline = self.deadline(self.cfg.timing.join_timeout);
        self.wait_state(deadline, |s| s.members.contains_key(&self.id))
            .await
    }

    async fn wait_state(
        &self,
        deadline: Instant,
        pred: impl Fn(&ClusterState) -> bool,
    ) -> Result<(), ClusterError> {
        let mut rx = self.state_tx.subscribe();
        let res = tokio::time::timeout_at(deadline, rx.wait_for(|s| pred(s)))
            .await
            .map(|r| r.map(|_| ()));
        match res {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ClusterError::Shutdown),
            Err(_) => Err(ClusterError::Timeout("waiting for the local state".into())),
        }
    }

    async fn wait_applied(&self, index: u64, deadline: Instant) -> Result<(), ClusterError> {
        self.wait_state(deadline, |s| s.last_applied >= index)
            .await
            .map_err(|e| match e {
                ClusterError::Timeout(_) => {
                    ClusterError::Timeout(format!("committed at {index} but not yet applied here"))
                }
                e => e,
            })
    }

    /// Join through `seeds`, or bootstrap a new cluster when this node has seen every node the
    /// seeds name, none belongs to a cluster yet and this node's name is the lowest, so that
    /// nodes started together from the same seed list form one cluster. "Every node": each seed
    /// resolved and each address it resolved to answered; until then (a name that does not
    /// resolve yet, a peer not listening yet) the node waits and looks again. Seeds that name
    /// this node only (a StatefulSet's first pod, alone behind its headless service) bootstrap.
    async fn join(&self, seeds: &[String], within: Duration) -> Result<(), ClusterError> {
        let deadline = self.deadline(within);
        let mut backoff = Duration::from_millis(100);
        let mut last_err = "no seed reachable".to_string();
        loop {
            let mut uninit = Vec::new();
            let mut reached = 0usize;
            let mut seen_all = true;
            for seed in seeds {
                let addrs: Vec<SocketAddr> = match tokio::net::lookup_host(seed.as_str()).await {
                    Ok(a) => a.collect(),
                    Err(e) => {
                        last_err = format!("{seed}: {e}");
                        seen_all = false;
                        continue;
                    }
                };
                seen_all &= !addrs.is_empty();
                for addr in addrs {
                    if self.listen.contains(&addr) {
                        continue;
                    }
                    let peer = match self.net.connect(&addr.to_string()).await {
                        Ok(p) => p,
                        // Whichever end sees its own id first says so: the dialer, or the
                        // listener (which rejects the dialer).
                        Err(
                            HandshakeError::SelfConnection
                            | HandshakeError::Refused(
                                crate::net::handshake::RejectReason::SelfConnection,
                            ),
                        ) => continue,
                        Err(e) => {
                            last_err = format!("{addr}: {e}");
                            seen_all = false;
                            continue;
                        }
                    };
                    reached += 1;
                    let req = RpcRequest::Join {
                        id: self.id,
                        info: self.info.clone(),
                        fresh: true,
                    };
                    match self.remote_op(peer, &req, deadline).await {
                        Ok(index) => {
                            self.wait_applied(index, deadline).await?;
                            info!(via = %addr, "joined the cluster");
                            return Ok(());
                        }
                        Err(OpError::NotInitialized(name)) => uninit.push(name),
                        Err(e) => {
                            last_err = format!("{addr}: {e}");
                            seen_all = false;
                        }
                    }
                }
            }
            if seen_all && uninit.len() == reached && uninit.iter().all(|n| self.info.name < *n) {
                if reached == 0 {
                    info!("the seeds name this node only: bootstrapping");
                } else {
                    info!("no seed belongs to a cluster yet and this node's name is the lowest: bootstrapping");
                }
                return self.bootstrap().await;
            }
            if Instant::now() >= deadline || self.cancel.is_cancelled() {
                return Err(ClusterError::Join(last_err));
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// Send a cluster request to `to`, retrying while its link comes up.
    async fn remote_op(
        &self,
        to: NodeId,
        req: &RpcRequest,
        deadline: Instant,
    ) -> Result<u64, OpError> {
        let body = encode(req);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.net.call(to, body.clone(), left).await {
                Ok(b) => {
                    return match serde_json::from_slice::<RpcResponse>(&b) {
                        Ok(RpcResponse::Done(r)) => r,
                        Ok(RpcResponse::Refused(why)) => Err(OpError::Refused(why)),
                        Ok(other) => Err(OpError::Other(format!("unexpected response {other:?}"))),
                        Err(e) => Err(OpError::Other(format!("bad response: {e}"))),
                    }
                }
                Err(CallError::Timeout) => return Err(OpError::Other("timed out".into())),
                Err(CallError::Unreachable) => {
                    if Instant::now() >= deadline || self.cancel.is_cancelled() {
                        return Err(OpError::Other(format!("node {to:016x} unreachable")));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn propose(&self, ops: Vec<Op>) -> Result<u64, ClusterError> {
        let size = serde_json::to_vec(&ops).map_or(usize::MAX, |b| b.len());
        if size > MAX_PROPOSAL {
            return Err(ClusterError::TooLarge(size, MAX_PROPOSAL));
        }
        let deadline = self.deadline(self.cfg.timing.propose_timeout);
        let body = encode(&RpcRequest::Propose(ops.clone()));
        loop {
            if self.stopped.load(Ordering::Relaxed) {
                return Err(ClusterError::Shutdown);
            }
            let r = match self.leader() {
                Some(l) if l == self.id => {
                    match tokio::time::timeout_at(deadline, self.propose_here(ops.clone())).await {
                        Ok(r) => r,
                        Err(_) => {
                            return Err(ClusterError::Timeout(
                                "not committed in time (no quorum?): outcome unknown".into(),
                            ))
                        }
                    }
                }
                Some(l) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match self.net.call(l, body.clone(), left).await {
                        Ok(b) => match serde_json::from_slice::<RpcResponse>(&b) {
                            Ok(RpcResponse::Done(r)) => r,
                            Ok(RpcResponse::Refused(_)) => Err(OpError::NoLeader),
                            Ok(other) => {
                                Err(OpError::Other(format!("unexpected response {other:?}")))
                            }
                            Err(e) => Err(OpError::Other(format!("bad response: {e}"))),
                        },
                        Err(CallError::Unreachable) => Err(OpError::NoLeader),
                        Err(CallError::Timeout) => {
                            return Err(ClusterError::Timeout(
                                "forwarded proposal: outcome unknown".into(),
                            ))
                        }
                    }
                }
                None => Err(OpError::NoLeader),
            };
            match r {
                Ok(index) => {
                    self.wait_applied(index, deadline).await?;
                    return Ok(index);
                }
                Err(OpError::Conflict(index, c)) => {
                    self.wait_applied(index, deadline).await?;
                    return Err(ClusterError::conflict(index, c));
                }
                Err(OpError::NotLeader(_) | OpError::NoLeader) => {
                    if Instant::now() >= deadline {
                        return Err(ClusterError::Timeout("no leader".into()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(op_err(e)),
            }
        }
    }

    /// Write a batch through the local Raft (which must lead).
    async fn propose_here(&self, ops: Vec<Op>) -> Result<u64, OpError> {
        self.write(Request::Batch(ops)).await
    }

    async fn write(&self, req: Request) -> Result<u64, OpError> {
        match self.raft().client_write(req).await {
            Ok(resp) => {
                let index = resp.log_id.index;
                match resp.data {
                    Response::Conflict(c) => Err(OpError::Conflict(index, c)),
                    _ => Ok(index),
                }
            }
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(OpError::NotLeader(f.leader_id))
            }
            // The Raft instance is being replaced (force_single, rejoin) or is shutting down:
            // retry against the next one (the caller stops at its deadline or on shutdown).
            Err(RaftError::Fatal(_)) => Err(OpError::NoLeader),
            Err(e) => Err(OpError::Other(e.to_string())),
        }
    }

    /// Serve here if this node leads, else forward to the leader.
    async fn at_leader(&self, req: RpcRequest, deadline: Instant) -> Option<Result<u64, OpError>> {
        loop {
            match self.leader() {
                Some(l) if l == self.id => return None,
                Some(l) => return Some(self.remote_op(l, &req, deadline).await),
                None => {
                    if Instant::now() >= deadline {
                        return Some(Err(OpError::NoLeader));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    async fn change(
        &self,
        changes: ChangeMembers<NodeId, NodeInfo>,
        deadline: Instant,
    ) -> Result<u64, OpError> {
        loop {
            match self.raft().change_membership(changes.clone(), false).await {
                Ok(resp) => return Ok(resp.log_id.index),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    return Err(OpError::NotLeader(f.leader_id))
                }
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(OpError::Other(e.to_string())),
            }
        }
    }

    async fn serve_join(&self, id: NodeId, info: NodeInfo, fresh: bool) -> Result<u64, OpError> {
        let raft = self.raft();
        if !raft.is_initialized().await.unwrap_or(false) {
            return Err(OpError::NotInitialized(self.info.name.clone()));
        }
        let deadline = self.deadline(self.cfg.timing.join_timeout);
        let req = RpcRequest::Join {
            id,
            info: info.clone(),
            fresh,
        };
        if let Some(r) = self.at_leader(req, deadline).await {
            return r;
        }
        let stored = raft.metrics().borrow().membership_config.clone();
        let mem = stored.membership();
        if !fresh && mem.get_node(&id).is_none() {
            // An address refresh from a node that is no longer a member (forgotten, left or
            // forced out while away): it must not bring itself back.
            return Err(OpError::Refused(format!("{} is not a member", info.name)));
        }
        if let Some(existing) = mem.get_node(&id) {
            if existing.name != info.name {
                return Err(OpError::Refused(format!(
                    "node id {id:016x} already belongs to {}",
                    existing.name
                )));
            }
            if mem.voter_ids().any(|v| v == id) {
                if *existing == info {
                    return Ok(stored.log_id().map_or(0, |l| l.index));
                }
                info!(node = %info.name, addr = %info.addr, "updating a member's address");
                return self
                    .change(
                        ChangeMembers::SetNodes(BTreeMap::from([(id, info)])),
                        deadline,
                    )
                    .await;
            }
        }
        info!(node = %info.name, addr = %info.addr, witness = info.witness, "adding a node as learner");
        loop {
            match raft.add_learner(id, info.clone(), true).await {
                Ok(_) => break,
                Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                ))) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    return Err(OpError::NotLeader(f.leader_id))
                }
                Err(e) => return Err(OpError::Other(e.to_string())),
            }
        }
        info!(node = %info.name, "promoting the learner to voter");
        self.change(ChangeMembers::AddVoterIds(BTreeSet::from([id])), deadline)
            .await
    }

    async fn serve_remove(&self, id: NodeId, reason: EvictReason) -> Result<u64, OpError> {
        let deadline = self.deadline(self.cfg.timing.join_timeout);
        if let Some(r) = self
            .at_leader(RpcRequest::Remove { id, reason }, deadline)
            .await
        {
            return r;
        }
        let stored = self.raft().metrics().borrow().membership_config.clone();
        let mem = stored.membership();
        let Some(node) = mem.get_node(&id) else {
            return Ok(stored.log_id().map_or(0, |l| l.index));
        };
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        if voters.contains(&id) && voters.len() == 1 {
            return Err(OpError::Refused("cannot remove the last voter".into()));
        }
        info!(node = %node.name, ?reason, "removing a node from the cluster");
        self.write(Request::Evict {
            nodes: vec![(id, node.name.clone())],
            reason,
        })
        .await?;
        let change = if voters.contains(&id) {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.change(change, deadline).await
    }

    fn has_quorum(&self) -> bool {
        let stored = self.raft().metrics().borrow().membership_config.clone();
        let now = Instant::now();
        let lease = self.cfg.timing.lease;
        let alive = |id: NodeId| {
            id == self.id
                || self
                    .net
                    .last_ack(id)
                    .is_some_and(|t| now.saturating_duration_since(t) <= lease)
        };
        let configs = stored.membership().get_joint_config();
        !configs.is_empty()
            && configs.iter().all(|voters| {
                !voters.is_empty()
                    && voters.iter().filter(|v| alive(**v)).count() * 2 > voters.len()
            })
    }

    fn members(&self) -> Vec<crate::node::MemberStatus> {
        let st = self.state();
        let now = Instant::now();
        let fd = self.cfg.timing.failure_detection;
        st.members
            .values()
            .map(|m| {
                let (running, last_contact, refused) = if m.id == self.id {
                    (true, Some(Duration::ZERO), false)
                } else {
                    let s = self.net.status(m.id);
                    let ago = s.last_rx.map(|t| now.saturating_duration_since(t));
                    (s.up && ago.is_some_and(|a| a <= fd), ago, s.refused)
                };
                MemberStatus {
                    id: m.id,
                    name: m.name.clone(),
                    addr: m.addr.clone(),
                    voter: m.voter,
                    witness: m.witness,
                    running,
                    last_contact,
                    refused,
                }
            })
            .collect()
    }

    /// Feed member addresses to the link layer and keep links to members up.
    fn sync_peers(&self) {
        let st = self.state();
        for m in st.members.values().filter(|m| m.id != self.id) {
            self.net.set_member_addr(m.id, &m.addr);
            self.net.ensure_link(m.id);
        }
    }

    async fn monitor(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.cfg.timing.link_heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.sync_peers();
            let q = self.has_quorum();
            if q != self.quorum.swap(q, Ordering::Relaxed) {
                if q {
                    info!("cluster quorum regained");
                    let _ = self.events.send(PeerEvent::QuorumRegained);
                } else {
                    warn!("cluster quorum lost: a majority of voters is out of reach");
                    let _ = self.events.send(PeerEvent::QuorumLost);
                }
            }
            self.refresh_addr();
            self.auto_force().await;
        }
    }

    /// After a restart on another address, tell the leader (the membership keeps addresses).
    fn refresh_addr(self: &Arc<Self>) {
        let st = self.state();
        let Some(me) = st.members.get(&self.id) else {
            return;
        };
        if me.addr == self.info.addr || self.refreshing_addr.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        self.tracker.spawn(async move {
            let r = inner.serve_join(inner.id, inner.info.clone(), false).await;
            if let Err(e) = r {
                tracing::debug!(error = %e, "address refresh failed; retrying later");
            }
            inner.refreshing_addr.store(false, Ordering::Release);
        });
    }

    /// `ignore` mode: carry on alone when the other voter of a two-voter cluster is gone.
    async fn auto_force(&self) {
        if self.cfg.partition_handling != PartitionHandling::Ignore
            || self.rejoining.load(Ordering::Relaxed)
        {
            return;
        }
        let st = self.state();
        let voters: Vec<_> = st.voters().collect();
        if voters.len() != 2
            || voters.iter().any(|m| m.witness)
            || !voters.iter().any(|m| m.id == self.id)
        {
            return;
        }
        let Some(other) = voters.iter().find(|m| m.id != self.id) else {
            return;
        };
        let fd = self.cfg.timing.failure_detection;
        if self.net.down_for(other.id).is_some_and(|d| d >= fd) {
            warn!(
                peer = %other.name,
                "the only other voter has been unreachable for {fd:?} (partition handling: ignore): \
                 continuing as a one-voter cluster"
            );
            if let Err(e) = self.force_single().await {
                warn!(error = %e, "forcing a one-voter cluster failed");
            }
        }
    }

    async fn force_single(&self) -> Result<(), ClusterError> {
        let _g = self.restart.lock().await;
        let raft = self.raft();
        let stored = raft.metrics().borrow().membership_config.clone();
        let mem = stored.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        if !voters.contains(&self.id) {
            return Err(ClusterError::Refused("this node is not a voter".into()));
        }
        let evicted: Vec<(NodeId, String)> = voters
            .iter()
            .filter(|v| **v != self.id)
            .map(|v| {
                (
                    *v,
                    mem.get_node(v).map(|n| n.name.clone()).unwrap_or_default(),
                )
            })
            .collect();
        if evicted.is_empty() {
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, NodeInfo> = mem
            .nodes()
            .filter(|(id, _)| **id == self.id || !voters.contains(id))
            .map(|(id, n)| (*id, n.clone()))
            .collect();
        raft.shutdown().await.map_err(raft_err)?;
        let log = self.log.lock().clone();
        let last = log.last_log_id();
        let term = last
            .map_or(0, |l| l.leader_id.term)
            .max(log.vote().map_or(0, |v| v.leader_id.term))
            + 1;
        let next = last.map_or(1, |l| l.index + 1);
        // Vote first: entries of term T+1 must never sit under an older vote.
        log.store_vote(&Vote::new(term, self.id)).await?;
        let leader = CommittedLeaderId::new(term, self.id);
        let entries: Vec<Entry> = vec![
            Entry {
                log_id: LogId::new(leader, next),
                payload: EntryPayload::Normal(Request::Evict {
                    nodes: evicted.clone(),
                    reason: EvictReason::ForcedOut,
                }),
            },
            Entry {
                log_id: LogId::new(leader, next + 1),
                payload: EntryPayload::Membership(Membership::new(
                    vec![BTreeSet::from([self.id])],
                    nodes,
                )),
            },
        ];
        log.append_durable(entries).await?;
        let raft = new_raft(
            self.id,
            &self.raft_config,
            &self.net,
            &self.cfg,
            &log,
            &self.sm,
        )
        .await?;
        *self.raft.write() = raft;
        let names: Vec<&str> = evicted.iter().map(|(_, n)| n.as_str()).collect();
        warn!(evicted = ?names, "forced a one-voter cluster (unsafe membership reset)");
        let deadline = self.deadline(self.cfg.timing.propose_timeout);
        self.wait_applied(next + 1, deadline).await
    }

    async fn reset_and_rejoin(self: Arc<Self>, mut seeds: Vec<String>) -> Result<(), ClusterError> {
        if self.rejoining.swap(true, Ordering::AcqRel) {
            return Err(ClusterError::Refused("already rejoining".into()));
        }
        let res = async {
            let _g = self.restart.lock().await;
            warn!(?seeds, "discarding this node's cluster metadata to rejoin");
            let raft = self.raft();
            raft.shutdown().await.map_err(raft_err)?;
            let log = self.log.lock().clone();
            log.close();
            LogStore::wipe(&self.cfg.data_dir)?;
            self.sm.wipe()?;
            let log = LogStore::open(&self.cfg.data_dir)?;
            let raft = new_raft(
                self.id,
                &self.raft_config,
                &self.net,
                &self.cfg,
                &log,
                &self.sm,
            )
            .await?;
            *self.log.lock() = log;
            *self.raft.write() = raft;
            seeds.extend(self.cfg.join.iter().cloned());
            self.join(&seeds, self.cfg.timing.join_timeout).await?;
            warn!("rejoined the cluster; metadata from before is discarded");
            self.rejoined.store(true, Ordering::Release);
            let _ = self.events.send(PeerEvent::Rejoined);
            Ok(())
        }
        .await;
        self.rejoining.store(false, Ordering::Release);
        res
    }

    async fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        self.cancel.cancel();
        let _ = self.raft().shutdown().await;
        self.net.shutdown().await;
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
        self.log.lock().clone().close();
    }

    async fn serve(self: &Arc<Self>, from: NodeId, req: RpcRequest) -> RpcResponse {
        let is_raft = matches!(
            req,
            RpcRequest::AppendEntries(_) | RpcRequest::Vote(_) | RpcRequest::InstallSnapshot(_)
        );
        if is_raft {
            let st = self.state();
            if let (Some(e), false) = (st.evicted.get(&from), st.members.contains_key(&from)) {
                self.net.retell(from, PeerView::Evicted(e.reason));
                return RpcResponse::Refused("you were evicted from this cluster".into());
            }
        }
        let raft = self.raft();
        match req {
            RpcRequest::AppendEntries(r) => {
                RpcResponse::AppendEntries(raft.append_entries(r).await)
            }
            RpcRequest::Vote(r) => RpcResponse::Vote(raft.vote(r).await),
            RpcRequest::InstallSnapshot(r) => {
                RpcResponse::InstallSnapshot(raft.install_snapshot(r).await)
            }
            RpcRequest::Propose(ops) => {
                let t = self.cfg.timing.propose_timeout;
                match tokio::time::timeout(t, self.propose_here(ops)).await {
                    Ok(r) => RpcResponse::Done(r),
                    Err(_) => {
                        RpcResponse::Done(Err(OpError::Other("not committed in time".into())))
                    }
                }
            }
            RpcRequest::Join { id, info, fresh } => {
                RpcResponse::Done(self.serve_join(id, info, fresh).await)
            }
            RpcRequest::Remove { id, reason } => {
                RpcResponse::Done(self.serve_remove(id, reason).await)
            }
        }
    }
}

impl Handler for Inner {
    fn view_of(&self, peer: NodeId) -> PeerView {
        let st = self.state();
        if st.members.contains_key(&peer) {
            PeerView::Member
        } else if let Some(e) = st.evicted.get(&peer) {
            PeerView::Evicted(e.reason)
        } else {
            PeerView::Unknown
        }
    }

    fn on_linked(&self, peer: &PeerHello) {
        tracing::debug!(peer = %peer.name, view = ?peer.view, "linked; the peer's view of us");
        let PeerView::Evicted(reason) = peer.view else {
            return;
        };
        let st = self.state();
        if st.evicted.contains_key(&peer.id) {
            error!(
                peer = %peer.name,
                "split brain: this node and {} each carried on without the other; \
                 choose one to keep and call rejoin on the other",
                peer.name
            );
            let _ = self.events.send(PeerEvent::SplitBrain(peer.id));
            return;
        }
        match reason {
            EvictReason::ForcedOut => {
                let trusted = st.members.get(&peer.id).is_some_and(|m| m.voter);
                if !trusted || self.rejoining.load(Ordering::Relaxed) {
                    tracing::debug!(
                        peer = %peer.name,
                        trusted,
                        "told it was forced out, but not rejoining (peer not a known voter here, \
                         or a rejoin is under way)"
                    );
                    return;
                }
                warn!(
                    peer = %peer.name,
                    "{} carried on without this node while it was away: rejoining under it",
                    peer.name
                );
                // Only `Inner` behind an Arc reaches here (the link layer holds a Weak of it).
                let Some(me) = self.self_arc() else { return };
                let seeds = vec![peer.addr.clone()];
                self.tracker.spawn(async move {
                    if let Err(e) = me.reset_and_rejoin(seeds).await {
                        error!(error = %e, "rejoin failed");
                    }
                });
            }
            EvictReason::Forgotten | EvictReason::Left => {
                *self.removed.lock() = Some(reason);
                if !self.removed_told.swap(true, Ordering::Relaxed) {
                    error!(
                        peer = %peer.name,
                        "this node was removed from the cluster ({reason:?}); \
                         reset its data dir to join again"
                    );
                    let _ = self.events.send(PeerEvent::RemovedFromCluster(reason));
                }
            }
        }
    }

    fn on_request(
        self: Arc<Self>,
        from: NodeId,
        body: Bytes,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send>> {
        Box::pin(async move {
            let resp = match serde_json::from_slice::<RpcRequest>(&body) {
                Ok(req) => self.serve(from, req).await,
                Err(e) => RpcResponse::Refused(format!("bad request: {e}")),
            };
            encode(&resp)
        })
    }

    fn wants_link(&self, peer: NodeId) -> bool {
        !self.cancel.is_cancelled() && self.state().members.contains_key(&peer)
    }
}

impl Inner {
    /// An owning handle on this node, through the link layer's weak reference.
    fn self_arc(&self) -> Option<Arc<Inner>> {
        self.me.get().and_then(Weak::upgrade)
    }
}
