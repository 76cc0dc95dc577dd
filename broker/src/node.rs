//! The node context: what one broker keeps about itself as a running node, apart from its
//! configuration and definitions: message memory and its limits, the resource alarms, queue
//! paging and the node's totals.
//!
//! Nothing here is process-wide. [`crate::Broker::bind`] makes one [`Node`] per broker, and
//! every part of the broker reaches it through `BrokerShared::node` or is handed its piece at
//! construction: vhosts and their queues (paging, totals), the store and the page files (the
//! memory account of the messages they rebuild), connections (alarms), the management API and
//! Prometheus (all of it). So several brokers can run in one process, each with its own
//! watermarks, alarms and paging: the clustering tests do, and so does `tests/nodes.rs`.
//!
//! Invariants worth naming:
//! - Every message is charged to exactly one node's [`Memory`] and released there; copies made
//!   from a message (dead-lettering) are charged to the original's account, messages rebuilt
//!   from disk to the account of the store or pager that reads them.
//! - The memory account is `&'static` and leaked (see [`Memory::leaked`]); the rest of the
//!   node goes with the last `Arc`.

use crate::alarm::{self, Monitor, NodeAlarms};
use crate::config::Config;
use crate::memory::Memory;
use crate::paging::Paging;
use crate::stats::NodeStats;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// One broker's node context (see the module docs).
#[derive(Debug)]
pub struct Node {
    /// Bytes held by this node's messages, and its memory limits.
    pub memory: &'static Memory,
    /// Memory and disk alarms; connections subscribe to them.
    pub alarms: NodeAlarms,
    /// The page directory and the memory-pressure signal queues watch.
    pub paging: Paging,
    /// Churn counters and what finished queues and connections left behind.
    pub stats: Arc<NodeStats>,
}

// === impl Node ===

impl Node {
    /// The node of a broker configured with `cfg`: memory limits resolved (and logged), the
    /// page directory wiped, the disk free limit set and the first alarm readings taken. The
    /// returned monitor keeps the alarms current once [`Node::run_monitor`] runs it.
    pub fn configure(cfg: &Config) -> (Arc<Self>, Monitor) {
        // Leaked, one small account per broker: messages hold it as `&'static` (see
        // `Memory::leaked`).
        let memory = Memory::leaked();
        let limits = memory.configure(cfg);
        info!(
            high_watermark = limits.high_watermark,
            paging_threshold = limits.paging_threshold,
            total_memory = limits.total_memory.unwrap_or(0),
            "memory limits"
        );
        let paging = Paging::configure(memory, &cfg.data_dir);
        let alarms = NodeAlarms::new(memory);
        let monitor = alarm::configure(&alarms, &paging, cfg);
        let node = Arc::new(Self {
            memory,
            alarms,
            paging,
            stats: Arc::default(),
        });
        (node, monitor)
    }

    /// A node without limits, page directory or monitor, for vhosts and queues made outside a
    /// broker (unit tests).
    pub fn standalone() -> Arc<Self> {
        let memory = Memory::leaked();
        Arc::new(Self {
            memory,
            alarms: NodeAlarms::new(memory),
            paging: Paging::without_dir(memory),
            stats: Arc::default(),
        })
    }

    /// Runs this node's alarm monitor until `shutdown`, then clears its alarms.
    pub async fn run_monitor(self: Arc<Self>, monitor: Monitor, shutdown: CancellationToken) {
        monitor.run(&self.alarms, &self.paging, shutdown).await;
    }
}
