//! [`Dormant`]: a future that is polled again only after it asked to be.
//!
//! A connection task waits on its copy and, next to it, on orders that almost never come (admin
//! resets, rule changes, fault timers, drain and shutdown). `select!` polls every branch on every
//! wake-up, so each proxied message would also poll those waiters, and some of them (the
//! listener's rule watch, a backend's drain token, the process-wide shutdown token) take a lock
//! that every connection shares. Wrapped in a `Dormant`, the waiters are polled with a waker of
//! their own, and polled again only once that waker fired: a data wake-up costs one atomic swap.
//!
//! Invariant worth naming: the task's waker is registered (or confirmed unchanged) on every poll,
//! *before* the woken flag is read, so a wake-up racing with a poll is never lost.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use parking_lot::Mutex;

/// See the module doc. Created woken, so the first poll reaches the inner future.
pub struct Dormant<F> {
    inner: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// The waker handed to the inner future (wakes `signal`).
    waker: Waker,
    /// The task waker last stored in `signal` (compared without taking its lock).
    task: Option<Waker>,
}

struct Signal {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        let task = self.task.lock().clone();
        if let Some(w) = task {
            w.wake();
        }
    }
}

// === impl Dormant ===

impl<F: Future> Dormant<F> {
    pub fn new(inner: F) -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Self {
            inner: Box::pin(inner),
            waker: Waker::from(signal.clone()),
            signal,
            task: None,
        }
    }
}

impl<F: Future> Future for Dormant<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        if !this.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *this.signal.task.lock() = Some(cx.waker().clone());
            this.task = Some(cx.waker().clone());
        }
        if !this.signal.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let mut inner_cx = Context::from_waker(&this.waker);
        this.inner.as_mut().poll(&mut inner_cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    /// Counts its polls; ready once `open` is notified.
    async fn counted(polls: &AtomicUsize, open: &tokio::sync::Notify) {
        let notified = open.notified();
        tokio::pin!(notified);
        std::future::poll_fn(|cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            notified.as_mut().poll(cx)
        })
        .await
    }

    #[tokio::test]
    async fn polled_only_when_its_own_waker_fired() {
        let polls = AtomicUsize::new(0);
        let open = tokio::sync::Notify::new();
        let mut dormant = std::pin::pin!(Dormant::new(counted(&polls, &open)));
        // Ten polls of the task that nothing woke for the dormant future: its inner future
        // is polled by the first one only.
        for _ in 0..10 {
            tokio::select! {
                biased;
                _ = &mut dormant => panic!("not opened yet"),
                _ = std::future::ready(()) => {}
            }
        }
        assert_eq!(polls.load(Ordering::Relaxed), 1);
        open.notify_one();
        tokio::time::timeout(Duration::from_secs(5), &mut dormant)
            .await
            .expect("woken by its own waker");
        assert_eq!(polls.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_wake_from_another_thread_reaches_the_task() {
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        let waiter = tokio::spawn(Dormant::new(async move { t.cancelled().await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        std::thread::spawn(move || token.cancel());
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("task ran");
    }
}
