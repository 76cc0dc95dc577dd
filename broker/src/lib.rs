//! warren-broker: AMQP 0-9-1 broker (see README).
