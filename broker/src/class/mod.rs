//! One file per AMQP class. [`dispatch`] is the single `match` on the class of a complete
//! command coming out of the connection state machine.

pub mod basic;
pub mod channel;
pub mod confirm;
pub mod exchange;
pub mod queue;
pub mod tx;

use crate::connection::session::Session;
use crate::connection::state::Command;
use crate::error::{AmqpError, ConnectionError};
use amq_protocol::protocol::{access, AMQPClass};

/// Runs one command on channel `ch`.
pub async fn dispatch(s: &mut Session, ch: u16, cmd: Command) -> Result<(), AmqpError> {
    match cmd {
        Command::Publish(p) => {
            let p = *p;
            basic::publish(s, ch, p.publish, p.header, p.body)
                .await
                .map_err(|e| e.with_method(60, 40))
        }
        Command::Method(m) => {
            let (cid, mid) = (m.get_amqp_class_id(), m.get_amqp_method_id());
            let r = match m {
                AMQPClass::Basic(m) => basic::handle(s, ch, m).await,
                AMQPClass::Exchange(m) => exchange::handle(s, ch, m).await,
                AMQPClass::Queue(m) => queue::handle(s, ch, m).await,
                AMQPClass::Channel(m) => channel::handle(s, ch, m).await,
                AMQPClass::Confirm(m) => confirm::handle(s, ch, m).await,
                AMQPClass::Tx(m) => tx::handle(s, ch, m).await,
                AMQPClass::Access(access::AMQPMethod::Request(_)) => s
                    .method(
                        ch,
                        AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                    )
                    .map_err(|e| ConnectionError::from(e).into()),
                _ => Err(ConnectionError::command_invalid("unexpected method").into()),
            };
            r.map_err(|e| e.with_method(cid, mid))
        }
    }
}

/// Encoding failures are internal errors.
pub(crate) fn enc(r: Result<(), crate::error::CodecError>) -> Result<(), AmqpError> {
    r.map_err(|e| AmqpError::Connection(e.into()))
}
