//! Connection threads: each proxied connection lives on one thread for its whole life, and a new
//! connection goes to the first thread that is not busy.
//!
//! `[runtime] threads = N` (the binary's default: one per CPU) gives N connection threads, each
//! the only worker of a runtime of its own: thread 0 is the runtime that accepts (it also serves
//! health checks, the admin API and signals), threads 1..N are started here. Both directions of
//! a connection, its backend socket, timers and fault plan are polled by the thread that waits in
//! epoll for its sockets: nothing is stolen by a second worker, and no task moves between cores.
//!
//! Placement packs: a connection stays on the accepting thread while that thread spent less than
//! [`SPILL_BUSY`] of the last [`SAMPLE`] or more polling tasks; otherwise it goes to the first
//! thread below that mark (the least busy one when all are above it), its socket moved to that
//! thread's runtime. Why pack rather than spread: the messages of one exchange often arrive on
//! two connections at once (an AMQP client's confirm and its consumer's delivery), and one thread
//! that is awake already serves both for one wake-up, where two threads (or a work-stealing pool,
//! which wakes a sibling worker whenever one wake-up readies two tasks) each pay a wake-up and a
//! context switch per message. Spreading pays once a thread is busy, and then it happens.
//! The decision is made once, at accept: connections opened while the threads are idle stay
//! together even if their traffic grows later (as HAProxy's threads keep their connections).
//!
//! Without `[runtime] threads` the library makes no threads of its own (`Lb::bind` called from a
//! test): every connection stays on the runtime that accepts it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::runtime::{Handle, RuntimeMetrics};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A thread busier than this (share of wall time spent polling tasks) takes no new connection
/// while another one is below it.
pub const SPILL_BUSY: f64 = 0.5;
/// Busy shares are measured over at least this long (refreshed lazily, at accept).
pub const SAMPLE: Duration = Duration::from_millis(50);

/// The connection threads of a process; see the module doc.
pub struct Workers {
    /// Threads 1.. (thread 0 is the accepting runtime, whichever accepts).
    handles: Vec<Handle>,
    load: Mutex<Vec<Load>>,
    stop: CancellationToken,
}

/// The last busy-time sample of one runtime.
#[derive(Clone, Copy)]
struct Load {
    busy: Duration,
    at: Instant,
    share: f64,
}

/// Where a new connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The runtime that accepted it.
    Here,
    /// Connection thread `i` (1-based index into the started threads).
    Thread(usize),
}

// === impl Workers ===

impl Workers {
    /// Connection threads for `threads` (the accepting one included); `None` for one.
    pub fn start(threads: usize) -> io::Result<Option<Arc<Self>>> {
        if threads <= 1 {
            return Ok(None);
        }
        let stop = CancellationToken::new();
        let mut handles = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            // One worker, as the accepting runtime has: no work stealing between threads.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name(format!("warren-lb-conn-{i}"))
                .enable_all()
                .build()?;
            handles.push(rt.handle().clone());
            let until = stop.clone();
            // Holds the runtime until the workers are dropped, then drops it off any runtime.
            let spawned = std::thread::Builder::new()
                .name(format!("warren-lb-rt-{i}"))
                .spawn(move || rt.block_on(until.cancelled()));
            if let Err(e) = spawned {
                stop.cancel();
                return Err(e);
            }
        }
        let now = Instant::now();
        let load = vec![
            Load {
                busy: Duration::ZERO,
                at: now,
                share: 0.0,
            };
            threads
        ];
        Ok(Some(Arc::new(Self {
            handles,
            load: Mutex::new(load),
            stop,
        })))
    }

    /// Connection threads, the accepting one included.
    pub fn threads(&self) -> usize {
        self.handles.len() + 1
    }

    /// The runtime of connection thread `i` (1..threads()).
    pub fn handle(&self, i: usize) -> &Handle {
        &self.handles[i - 1]
    }

    /// Places a new connection accepted on the current runtime (see the module doc).
    pub fn place(&self) -> Place {
        let now = Instant::now();
        let here = Handle::current().metrics();
        let mut load = self.load.lock();
        let mut best = (0, f64::MAX);
        for (i, l) in load.iter_mut().enumerate() {
            if now.saturating_duration_since(l.at) >= SAMPLE {
                let busy = if i == 0 {
                    busy_time(&here)
                } else {
                    busy_time(&self.handles[i - 1].metrics())
                };
                *l = Load {
                    share: share(busy.saturating_sub(l.busy), now - l.at),
                    busy,
                    at: now,
                };
            }
            if l.share < SPILL_BUSY {
                return place(i);
            }
            if l.share < best.1 {
                best = (i, l.share);
            }
        }
        place(best.0)
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn place(i: usize) -> Place {
    if i == 0 {
        Place::Here
    } else {
        Place::Thread(i)
    }
}

/// Time the runtime's workers spent polling tasks since it started, per worker.
fn busy_time(m: &RuntimeMetrics) -> Duration {
    let n = m.num_workers().max(1);
    let total: Duration = (0..n).map(|w| m.worker_total_busy_duration(w)).sum();
    total / n as u32
}

fn share(busy: Duration, over: Duration) -> f64 {
    if over.is_zero() {
        return 0.0;
    }
    busy.as_secs_f64() / over.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_thread_needs_no_workers() {
        assert!(Workers::start(1).expect("start").is_none());
        assert!(Workers::start(0).expect("start").is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn packs_on_the_accepting_thread_while_it_is_idle() {
        let w = Workers::start(3).expect("start").expect("threads");
        assert_eq!(w.threads(), 3);
        for _ in 0..5 {
            assert_eq!(w.place(), Place::Here);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn spills_to_the_next_thread_when_the_accepting_one_is_busy() {
        let w = Workers::start(2).expect("start").expect("threads");
        // Keep this runtime's only worker busy for longer than a sample.
        tokio::spawn(async {
            let t0 = Instant::now();
            while t0.elapsed() < 3 * SAMPLE {
                std::hint::spin_loop();
            }
        })
        .await
        .expect("spin task");
        // The worker reports its busy time when it parks; then place from the worker, as the
        // accept loop does.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let placed = tokio::spawn(async move { w.place() }).await.expect("place");
        assert_eq!(placed, Place::Thread(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn spawned_tasks_run_on_their_thread() {
        let w = Workers::start(2).expect("start").expect("threads");
        let name = w
            .handle(1)
            .spawn(async { std::thread::current().name().map(str::to_string) })
            .await
            .expect("task ran");
        assert_eq!(name.as_deref(), Some("warren-lb-conn-1"));
    }
}
