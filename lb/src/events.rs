//! Events: health transitions, backend (de)registration, injected faults.
//!
//! Each event is one JSON object (see [`Event`]). The bus keeps the most recent ones in a ring
//! buffer for `GET /events` and broadcasts new ones for `?follow=1`; every event is also logged.
//! Pushing and subscribing take the same short lock, so a follower sees the backlog and then every
//! later event exactly once.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::broadcast;

/// How many events `GET /events` returns at most.
pub const RING_CAPACITY: usize = 1024;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Event {
    /// RFC 3339, UTC.
    pub ts: String,
    pub listener: String,
    /// Connection id, for events about one connection.
    pub conn: Option<u64>,
    /// What happened: `backend_up`, `backend_down`, `fail_open`, `backend_registered`,
    /// `backend_draining`, `backend_removed`, `listener_added`, `listener_removed`, `idle_timeout`,
    /// and the faults: `reset`, `limit_data`, `timeout`, `refused`, and `latency` / `bandwidth` /
    /// `slicer` / `slow_close` (cause `applied`: the rule starts to shape a connection).
    pub event: String,
    pub rule: Option<String>,
    pub cause: Option<String>,
    pub style: Option<String>,
    pub side: Option<String>,
    pub backend: Option<String>,
    /// Bytes read from the client but never delivered to the backend.
    pub discarded_upstream: u64,
    /// Bytes read from the backend but never delivered to the client.
    pub discarded_downstream: u64,
}

impl Event {
    pub fn new(listener: &str, event: &str) -> Self {
        Self {
            ts: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            listener: listener.to_string(),
            event: event.to_string(),
            ..Self::default()
        }
    }

    pub fn backend(mut self, addr: &str) -> Self {
        self.backend = Some(addr.to_string());
        self
    }

    pub fn cause(mut self, cause: impl Into<String>) -> Self {
        self.cause = Some(cause.into());
        self
    }

    pub fn conn(mut self, id: u64) -> Self {
        self.conn = Some(id);
        self
    }
}

#[derive(Debug)]
pub struct EventBus {
    ring: Mutex<VecDeque<Arc<str>>>,
    tx: broadcast::Sender<Arc<str>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(RING_CAPACITY);
        Self {
            ring: Mutex::new(VecDeque::with_capacity(RING_CAPACITY)),
            tx,
        }
    }

    /// Records, broadcasts and logs one event.
    pub fn emit(&self, ev: Event) {
        let line: Arc<str> = match serde_json::to_string(&ev) {
            Ok(s) => s.into(),
            Err(_) => return,
        };
        tracing::info!(
            target: "warren_lb::events",
            listener = %ev.listener,
            event = %ev.event,
            backend = ev.backend.as_deref().unwrap_or(""),
            conn = ev.conn.unwrap_or(0),
            cause = ev.cause.as_deref().unwrap_or(""),
            "event {line}"
        );
        let mut ring = self.ring.lock();
        if ring.len() == RING_CAPACITY {
            ring.pop_front();
        }
        ring.push_back(line.clone());
        // No subscriber is not an error.
        let _ = self.tx.send(line);
    }

    /// The backlog as JSON lines.
    pub fn recent(&self) -> Vec<Arc<str>> {
        self.ring.lock().iter().cloned().collect()
    }

    /// The backlog plus a receiver of every later event, without gap or duplicate.
    pub fn follow(&self) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let ring = self.ring.lock();
        let rx = self.tx.subscribe();
        (ring.iter().cloned().collect(), rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_is_bounded_and_follow_sees_later_events() {
        let bus = EventBus::new();
        for i in 0..RING_CAPACITY + 5 {
            bus.emit(Event::new("l", "backend_up").conn(i as u64));
        }
        let recent = bus.recent();
        assert_eq!(recent.len(), RING_CAPACITY);
        assert!(recent[0].contains("\"conn\":5,"), "{}", recent[0]);
        let (backlog, mut rx) = bus.follow();
        assert_eq!(backlog.len(), RING_CAPACITY);
        bus.emit(Event::new("l", "backend_down"));
        let next = rx.try_recv().unwrap();
        let v: serde_json::Value = serde_json::from_str(&next).unwrap();
        assert_eq!(v["event"], "backend_down");
        assert_eq!(v["listener"], "l");
        assert!(v["ts"].as_str().unwrap().ends_with('Z'));
        assert_eq!(v["discarded_upstream"], 0);
    }
}
