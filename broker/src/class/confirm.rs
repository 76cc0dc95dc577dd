//! confirm.select.

use super::enc;
use crate::channel::Confirms;
use crate::connection::session::Session;
use crate::error::{AmqpError, ChannelError};
use amq_protocol::protocol::{confirm, AMQPClass};

pub async fn handle(s: &mut Session, ch: u16, m: confirm::AMQPMethod) -> Result<(), AmqpError> {
    let confirm::AMQPMethod::Select(sel) = m else {
        return Ok(());
    };
    let Some(c) = s.channels.get_mut(&ch) else {
        return Ok(());
    };
    if c.tx.is_some() {
        return Err(
            ChannelError::precondition_failed("cannot switch from tx to confirm mode").into(),
        );
    }
    if c.confirms.is_none() {
        c.confirms = Some(Confirms::new());
    }
    if !sel.nowait {
        enc(s.method(
            ch,
            AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
        ))?;
    }
    Ok(())
}
