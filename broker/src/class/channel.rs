//! channel.flow (open/close are handled by the connection state machine).

use super::enc;
use crate::connection::session::Session;
use crate::error::{AmqpError, ConnectionError};
use crate::queue::QueueCmd;
use amq_protocol::protocol::{channel, AMQPClass};
use std::sync::atomic::Ordering;

pub async fn handle(s: &mut Session, ch: u16, m: channel::AMQPMethod) -> Result<(), AmqpError> {
    match m {
        channel::AMQPMethod::Flow(f) => {
            if let Some(c) = s.channels.get(&ch) {
                c.shared.flow_active.store(f.active, Ordering::Relaxed);
                if f.active {
                    for q in c.consumer_queues() {
                        q.try_send(QueueCmd::Kick);
                    }
                }
            }
            enc(s.method(
                ch,
                AMQPClass::Channel(channel::AMQPMethod::FlowOk(channel::FlowOk {
                    active: f.active,
                })),
            ))
        }
        channel::AMQPMethod::FlowOk(_) => Ok(()),
        _ => Err(ConnectionError::command_invalid("unexpected channel method").into()),
    }
}
