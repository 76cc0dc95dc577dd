//! exchange.declare / delete / bind / unbind.

use super::enc;
use crate::connection::session::{PermKind, Session};
use crate::error::{AmqpError, ChannelError};
use crate::exchange::{Destination, ExchangeKind};
use amq_protocol::protocol::{exchange, AMQPClass};

pub(super) fn default_exchange_refused() -> ChannelError {
    ChannelError::access_refused("operation not permitted on the default exchange")
}

/// The checks exchange.bind and exchange.unbind share: no default exchange on either end, write
/// on the destination, read on the source (RabbitMQ's rules).
fn check_e2e(s: &Session, source: &str, destination: &str) -> Result<(), ChannelError> {
    if source.is_empty() || destination.is_empty() {
        return Err(default_exchange_refused());
    }
    s.check_perm(PermKind::Write, "exchange", destination)?;
    s.check_perm(PermKind::Read, "exchange", source)
}

pub async fn handle(s: &mut Session, ch: u16, m: exchange::AMQPMethod) -> Result<(), AmqpError> {
    let vhost = s.vhost()?;
    match m {
        exchange::AMQPMethod::Declare(d) => {
            let name = d.exchange.as_str();
            if name.is_empty() {
                // Passive or not, as RabbitMQ.
                return Err(default_exchange_refused().into());
            }
            if d.passive {
                if vhost.exchange(name).is_none() {
                    crate::topology::catch_up(&s.shared).await;
                }
                if vhost.exchange(name).is_none() {
                    return Err(ChannelError::not_found(format!(
                        "no exchange '{name}' in vhost '{}'",
                        vhost.name
                    ))
                    .into());
                }
            } else {
                let kind = ExchangeKind::parse(d.kind.as_str()).ok_or_else(|| {
                    ChannelError::precondition_failed(format!("unknown exchange type '{}'", d.kind))
                })?;
                s.check_perm(PermKind::Configure, "exchange", name)?;
                if name.starts_with("amq.") && vhost.exchange(name).is_none() {
                    return Err(ChannelError::access_refused(format!(
                        "exchange name '{name}' contains reserved prefix 'amq.*'"
                    ))
                    .into());
                }
                crate::topology::declare_exchange(
                    &s.shared,
                    &vhost,
                    name,
                    kind,
                    d.durable,
                    d.auto_delete,
                    d.internal,
                    d.arguments,
                )
                .await?;
            }
            if !d.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {})),
                ))?;
            }
            Ok(())
        }
        exchange::AMQPMethod::Delete(d) => {
            let name = d.exchange.as_str();
            if name.is_empty() {
                return Err(default_exchange_refused().into());
            }
            if name.starts_with("amq.") {
                return Err(ChannelError::access_refused(format!(
                    "deletion of system exchange '{name}' in vhost '{}' not allowed",
                    vhost.name
                ))
                .into());
            }
            s.check_perm(PermKind::Configure, "exchange", name)?;
            crate::topology::delete_exchange(&s.shared, &vhost, name, d.if_unused).await?;
            if !d.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Exchange(exchange::AMQPMethod::DeleteOk(exchange::DeleteOk {})),
                ))?;
            }
            Ok(())
        }
        exchange::AMQPMethod::Bind(b) => {
            check_e2e(s, b.source.as_str(), b.destination.as_str())?;
            crate::topology::bind(
                &s.shared,
                &vhost,
                b.source.as_str(),
                Destination::Exchange(b.destination.as_str().into()),
                b.routing_key.as_str(),
                b.arguments,
            )
            .await?;
            if !b.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Exchange(exchange::AMQPMethod::BindOk(exchange::BindOk {})),
                ))?;
            }
            Ok(())
        }
        exchange::AMQPMethod::Unbind(b) => {
            check_e2e(s, b.source.as_str(), b.destination.as_str())?;
            crate::topology::unbind(
                &s.shared,
                &vhost,
                b.source.as_str(),
                Destination::Exchange(b.destination.as_str().into()),
                b.routing_key.as_str(),
                b.arguments,
            )
            .await?;
            if !b.nowait {
                enc(s.method(
                    ch,
                    AMQPClass::Exchange(exchange::AMQPMethod::UnbindOk(exchange::UnbindOk {})),
                ))?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}
