//! channel.flow (open/close are handled by the connection state machine).

use super::enc;
use crate::connection::session::Session;
use crate::error::{AmqpError, ConnectionError};
use amq_protocol::protocol::{channel, AMQPClass};

pub async fn handle(s: &mut Session, ch: u16, m: channel::AMQPMethod) -> Result<(), AmqpError> {
    match m {
        channel::AMQPMethod::Flow(f) => {
            if let Some(c) = s.channels.get_mut(&ch) {
                c.flow_active = f.active;
                for q in c.consumer_queues() {
                    q.flow(s.conn_id, ch, c.generation, f.active);
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
