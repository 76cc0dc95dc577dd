//! Publisher blocking under resource alarms (sans-io), following RabbitMQ's reader:
//!
//! - While an alarm is set, the first content frame (header or body of a `basic.publish`) the
//!   connection reads makes it **blocked**: the shell stops reading the socket, right after
//!   that frame. Nothing more from this client is processed, publishes and anything else
//!   (acks included), until every alarm has cleared. A connection that never publishes
//!   during the alarm keeps running, so consumers can drain queues and clear it.
//! - A client that advertised the `connection.blocked` capability gets `connection.blocked`
//!   (reason "low on memory", "low on disk", "low on memory & disk") once when blocked, and
//!   `connection.unblocked` once every alarm has cleared. A second alarm while blocked sends
//!   nothing new.
//! - Heartbeats keep being sent while blocked, and missing client heartbeats do not close the
//!   connection (its bytes are not being read); the receive monitor restarts on unblock.

use crate::alarm::Alarms;
use amq_protocol::protocol::{connection, AMQPClass};

/// Per-connection throttle state.
#[derive(Debug, Default)]
pub struct Throttle {
    alarms: Alarms,
    /// A publish arrived while an alarm was set (reset when the alarms clear).
    publishing: bool,
    /// The client advertised the `connection.blocked` capability.
    notify: bool,
    /// We sent connection.blocked and owe connection.unblocked.
    blocked_sent: bool,
    out: Option<AMQPClass>,
}

impl Throttle {
    pub fn new(alarms: Alarms) -> Self {
        Self {
            alarms,
            ..Self::default()
        }
    }

    /// The client's `connection.blocked` capability (from connection.start-ok).
    pub fn set_notify(&mut self, notify: bool) {
        self.notify = notify;
    }

    /// Reads from the client are paused.
    pub fn is_blocked(&self) -> bool {
        self.publishing && self.alarms.any()
    }

    /// A content frame of a publish was read; `memory_over`: the node's message memory is at
    /// or above its watermark right now. Returns whether the connection is now blocked.
    ///
    /// `memory_over` blocks at once, before the alarm monitor has raised the alarm: under a
    /// flood the monitor task may run milliseconds later, and a pipelining publisher would
    /// add a lot in between. The monitor then publishes its reading (also when nothing
    /// changed, see `crate::alarm`), which [`Throttle::on_alarms`] takes as the truth.
    pub fn on_publish(&mut self, memory_over: bool) -> bool {
        if memory_over {
            self.alarms.memory = true;
        }
        if self.alarms.any() {
            self.publishing = true;
            self.maybe_send_blocked();
        }
        self.is_blocked()
    }

    /// The node's alarms changed.
    pub fn on_alarms(&mut self, alarms: Alarms) {
        self.alarms = alarms;
        if !alarms.any() {
            self.publishing = false;
            if self.blocked_sent {
                self.blocked_sent = false;
                self.out = Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(
                    connection::Unblocked {},
                )));
            }
        } else {
            self.maybe_send_blocked();
        }
    }

    fn maybe_send_blocked(&mut self) {
        if self.is_blocked() && self.notify && !self.blocked_sent {
            self.blocked_sent = true;
            self.out = Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(
                connection::Blocked {
                    reason: self.alarms.reason().into(),
                },
            )));
        }
    }

    /// A method to send on channel 0, if any.
    pub fn poll_output(&mut self) -> Option<AMQPClass> {
        self.out.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: Alarms = Alarms {
        memory: true,
        disk: false,
    };
    const DISK: Alarms = Alarms {
        memory: false,
        disk: true,
    };
    const BOTH: Alarms = Alarms {
        memory: true,
        disk: true,
    };

    fn blocked_reason(t: &mut Throttle) -> Option<String> {
        match t.poll_output() {
            Some(AMQPClass::Connection(connection::AMQPMethod::Blocked(b))) => {
                Some(b.reason.to_string())
            }
            other => panic!("expected connection.blocked, got {other:?}"),
        }
    }

    fn unblocked(t: &mut Throttle) -> bool {
        matches!(
            t.poll_output(),
            Some(AMQPClass::Connection(connection::AMQPMethod::Unblocked(_)))
        )
    }

    #[test]
    fn no_alarm_never_blocks() {
        let mut t = Throttle::new(Alarms::default());
        t.set_notify(true);
        assert!(!t.on_publish(false));
        assert!(t.poll_output().is_none());
    }

    #[test]
    fn a_publisher_blocks_on_its_first_publish_during_an_alarm() {
        let mut t = Throttle::new(Alarms::default());
        t.set_notify(true);
        t.on_alarms(MEM);
        assert!(
            !t.is_blocked(),
            "not publishing: still reading (consumers drain)"
        );
        assert!(t.poll_output().is_none());
        assert!(t.on_publish(false));
        assert_eq!(blocked_reason(&mut t).as_deref(), Some("low on memory"));
        t.on_alarms(BOTH);
        assert!(t.is_blocked());
        assert!(
            t.poll_output().is_none(),
            "one connection.blocked per block"
        );
        t.on_alarms(DISK);
        assert!(t.is_blocked(), "blocked until every alarm clears");
        assert!(t.poll_output().is_none());
        t.on_alarms(Alarms::default());
        assert!(!t.is_blocked());
        assert!(unblocked(&mut t));
        assert!(t.poll_output().is_none());
        // The next alarm needs a new publish to block again.
        t.on_alarms(DISK);
        assert!(!t.is_blocked());
        assert!(t.on_publish(false));
        assert_eq!(blocked_reason(&mut t).as_deref(), Some("low on disk"));
    }

    #[test]
    fn a_client_without_the_capability_is_blocked_silently() {
        let mut t = Throttle::new(MEM);
        assert!(t.on_publish(false));
        assert!(t.poll_output().is_none());
        t.on_alarms(Alarms::default());
        assert!(!t.is_blocked());
        assert!(t.poll_output().is_none());
    }

    #[test]
    fn memory_at_the_watermark_blocks_before_the_monitor_speaks_and_its_reading_decides() {
        let mut t = Throttle::new(Alarms::default());
        t.set_notify(true);
        assert!(t.on_publish(true), "blocked on the counter alone");
        assert_eq!(blocked_reason(&mut t).as_deref(), Some("low on memory"));
        // The monitor confirms: still blocked, nothing new sent.
        t.on_alarms(MEM);
        assert!(t.is_blocked());
        assert!(t.poll_output().is_none());
        t.on_alarms(Alarms::default());
        assert!(unblocked(&mut t));
        // The monitor found memory already back below the watermark: that reading unblocks.
        assert!(t.on_publish(true));
        assert_eq!(blocked_reason(&mut t).as_deref(), Some("low on memory"));
        t.on_alarms(Alarms::default());
        assert!(!t.is_blocked());
        assert!(unblocked(&mut t));
        // A disk alarm set meanwhile is kept and named with memory.
        t.on_alarms(DISK);
        assert!(t.on_publish(true));
        assert_eq!(
            blocked_reason(&mut t).as_deref(),
            Some("low on memory & disk")
        );
    }
}
