//! tx.select / commit / rollback: publishes and acks are held until commit.

use super::enc;
use crate::channel::{HeldAck, Settle, Tx};
use crate::connection::session::Session;
use crate::error::{AmqpError, ChannelError};
use amq_protocol::protocol::{tx, AMQPClass};

pub async fn handle(s: &mut Session, ch: u16, m: tx::AMQPMethod) -> Result<(), AmqpError> {
    let not_tx = || ChannelError::precondition_failed("channel is not transactional");
    match m {
        tx::AMQPMethod::Select(_) => {
            if let Some(c) = s.channels.get_mut(&ch) {
                if c.confirms.is_some() {
                    return Err(ChannelError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    )
                    .into());
                }
                if c.tx.is_none() {
                    c.tx = Some(Tx::default());
                }
            }
            enc(s.method(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {}))))
        }
        tx::AMQPMethod::Commit(_) => {
            let held = match s.channels.get_mut(&ch).and_then(|c| c.tx.as_mut()) {
                Some(t) => std::mem::take(t),
                None => return Err(not_tx().into()),
            };
            for p in held.publishes {
                super::basic::route_and_enqueue(
                    s,
                    ch,
                    &p.exchange,
                    &p.routing_key,
                    p.mandatory,
                    p.header,
                    p.body,
                )
                .await?;
            }
            for a in held.acks {
                match a {
                    HeldAck::Ack { tag, multiple } => {
                        s.settle(ch, tag, multiple, Settle::Ack).await?
                    }
                    HeldAck::Nack {
                        tag,
                        multiple,
                        requeue,
                    } => {
                        let how = if requeue {
                            Settle::Requeue
                        } else {
                            Settle::Discard
                        };
                        s.settle(ch, tag, multiple, how).await?
                    }
                }
            }
            enc(s.method(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {}))))
        }
        tx::AMQPMethod::Rollback(_) => {
            match s.channels.get_mut(&ch).and_then(|c| c.tx.as_mut()) {
                Some(t) => *t = Tx::default(),
                None => return Err(not_tx().into()),
            }
            enc(s.method(
                ch,
                AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
            ))
        }
        _ => Ok(()),
    }
}
