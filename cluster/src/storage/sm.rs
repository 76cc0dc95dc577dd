//! The state machine for openraft (`RaftStateMachine`): applies entries to [`ClusterState`],
//! publishes each new state and what changed, builds and installs snapshots.
//!
//! The state lives in memory. Durability comes from the log plus snapshots: a restarted node loads
//! its last snapshot (`data_dir/snapshot`: a record with the `SnapshotMeta`, a record with the
//! JSON state; replaced atomically: temp file, fsync, rename, fsync dir) and openraft re-applies
//! its log from there up to the saved commit index.
//!
//! After each `apply` call (openraft hands over batches of committed entries) the new state is
//! published as a fresh `Arc<ClusterState>` on a watch channel and the changes on a broadcast
//! channel, in log order, under one lock so a subscriber never sees an event before the state
//! that contains it.

use std::io::{self, Cursor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use super::file::{read_records, write_atomic};
use crate::state::{Applied, ClusterState, ResetReason};
use crate::types::{
    Entry, LogId, Request, Response, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const SNAPSHOT: &str = "snapshot";

/// The state machine handed to openraft; clones share everything.
#[derive(Clone)]
pub(crate) struct StateMachine {
    shared: Arc<Shared>,
}

struct Shared {
    root: PathBuf,
    mem: Mutex<Mem>,
    state_tx: watch::Sender<Arc<ClusterState>>,
    applied_tx: broadcast::Sender<Applied>,
}

#[derive(Default)]
struct Mem {
    state: Arc<ClusterState>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    snapshot: Option<(SnapshotMeta, Arc<Vec<u8>>)>,
    seq: u64,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

// === impl StateMachine ===

impl StateMachine {
    /// Load the last snapshot under `root`, if any, and publish its state.
    pub(crate) fn open(
        root: &Path,
        state_tx: watch::Sender<Arc<ClusterState>>,
        applied_tx: broadcast::Sender<Applied>,
    ) -> io::Result<StateMachine> {
        let mut mem = Mem::default();
        if let Some(recs) = read_records(root, SNAPSHOT)? {
            let [meta, body] = &recs[..] else {
                return Err(invalid("snapshot file: expected two records"));
            };
            let meta: SnapshotMeta = serde_json::from_slice(meta).map_err(invalid)?;
            let state: ClusterState = serde_json::from_slice(body).map_err(invalid)?;
            mem.state = Arc::new(state);
            mem.last_applied = meta.last_log_id;
            mem.membership = meta.last_membership.clone();
            mem.snapshot = Some((meta, Arc::new(body.clone())));
        }
        state_tx.send_replace(mem.state.clone());
        Ok(StateMachine {
            shared: Arc::new(Shared {
                root: root.to_path_buf(),
                mem: Mutex::new(mem),
                state_tx,
                applied_tx,
            }),
        })
    }

    /// Forget everything (the node rejoins under another node's state): delete the snapshot and
    /// publish an empty state.
    pub(crate) fn wipe(&self) -> io::Result<()> {
        match std::fs::remove_file(self.shared.root.join(SNAPSHOT)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let mut m = self.shared.mem.lock();
        *m = Mem {
            seq: m.seq,
            ..Mem::default()
        };
        self.shared.state_tx.send_replace(m.state.clone());
        let _ = self.shared.applied_tx.send(Applied::Reset {
            index: 0,
            reason: ResetReason::Rejoined,
        });
        Ok(())
    }

    /// The last applied membership.
    pub(crate) fn membership(&self) -> StoredMembership {
        self.shared.mem.lock().membership.clone()
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let m = self.shared.mem.lock();
        Ok((m.last_applied, m.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut m = self.shared.mem.lock();
        let mut st = (*m.state).clone();
        let mut events = Vec::new();
        let mut out = Vec::new();
        for e in entries {
            let index = e.log_id.index;
            m.last_applied = Some(e.log_id);
            st.last_applied = index;
            match e.payload {
                EntryPayload::Blank => out.push(Response::Noop),
                EntryPayload::Normal(Request::Batch(ops)) => match st.apply_batch(index, &ops) {
                    Ok(()) => {
                        out.push(Response::Applied);
                        events.push(Applied::Batch {
                            index,
                            ops: Arc::new(ops),
                        });
                    }
                    Err(c) => out.push(Response::Conflict(c)),
                },
                EntryPayload::Normal(Request::Evict { nodes, reason }) => {
                    st.apply_evict(index, &nodes, reason);
                    out.push(Response::Noop);
                    events.push(Applied::Evicted {
                        index,
                        nodes: nodes.iter().map(|(id, _)| *id).collect(),
                    });
                }
                EntryPayload::Membership(mem) => {
                    st.apply_membership(&mem);
                    m.membership = StoredMembership::new(Some(e.log_id), mem);
                    out.push(Response::Noop);
                    events.push(Applied::Membership { index });
                }
            }
        }
        let st = Arc::new(st);
        m.state = st.clone();
        self.shared.state_tx.send_replace(st);
        for ev in events {
            let _ = self.shared.applied_tx.send(ev);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let body = snapshot.into_inner();
        let sig = Some(meta.signature());
        let state: ClusterState = serde_json::from_slice(&body)
            .map_err(|e| StorageError::from(StorageIOError::read_snapshot(sig.clone(), &e)))?;
        let meta_json = serde_json::to_vec(meta)
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(sig.clone(), &e)))?;
        let body = Arc::new(body);
        persist(&self.shared.root, meta_json, body.clone())
            .await
            .map_err(|e| StorageError::from(StorageIOError::write_snapshot(sig, &e)))?;
        let mut m = self.shared.mem.lock();
        let state = Arc::new(state);
        m.state = state.clone();
        m.last_applied = meta.last_log_id;
        m.membership = meta.last_membership.clone();
        m.snapshot = Some((meta.clone(), body));
        self.shared.state_tx.send_replace(state);
        let _ = self.shared.applied_tx.send(Applied::Reset {
            index: meta.last_log_id.map_or(0, |l| l.index),
            reason: ResetReason::Snapshot,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let m = self.shared.mem.lock();
        Ok(m.snapshot.as_ref().map(|(meta, body)| Snapshot {
            meta: meta.clone(),
            snapshot: Box::new(Cursor::new(body.to_vec())),
        }))
    }
}

async fn persist(root: &Path, meta: Vec<u8>, body: Arc<Vec<u8>>) -> io::Result<()> {
    let root = root.to_path_buf();
    tokio::task::spawn_blocking(move || write_atomic(&root, SNAPSHOT, &[&meta, &body]))
        .await
        .map_err(io::Error::other)?
}

/// Builds a snapshot of the state as of the moment it runs.
pub(crate) struct SnapshotBuilder {
    shared: Arc<Shared>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (state, last, membership, seq) = {
            let mut m = self.shared.mem.lock();
            m.seq += 1;
            (m.state.clone(), m.last_applied, m.membership.clone(), m.seq)
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!("{}-{}", last.map_or(0, |l| l.index), seq),
        };
        let sig = Some(meta.signature());
        let werr = |e: &dyn std::fmt::Display| {
            StorageError::from(StorageIOError::write_snapshot(
                sig.clone(),
                &io::Error::other(e.to_string()),
            ))
        };
        let body = serde_json::to_vec(&*state).map_err(|e| werr(&e))?;
        let meta_json = serde_json::to_vec(&meta).map_err(|e| werr(&e))?;
        let body = Arc::new(body);
        persist(&self.shared.root, meta_json, body.clone())
            .await
            .map_err(|e| werr(&e))?;
        {
            let mut m = self.shared.mem.lock();
            let newer = m
                .snapshot
                .as_ref()
                .is_none_or(|(old, _)| old.last_log_id <= meta.last_log_id);
            if newer {
                m.snapshot = Some((meta.clone(), body.clone()));
            }
        }
        tracing::debug!(snapshot = %meta.snapshot_id, bytes = body.len(), "cluster snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(body.to_vec())),
        })
    }
}
