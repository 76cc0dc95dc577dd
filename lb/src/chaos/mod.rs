//! The chaos engine: fault rules applied to a listener's connections, reproducibly.
//!
//! - `plan`: pure decisions (which rule applies to which connection, when a time trigger is due,
//!   where a byte trigger cuts the stream, how writes are paced), from a seeded RNG.
//! - `amqp`: the pure incremental AMQP frame scanner behind `on_amqp`.
//! - `inject`: the I/O side: the listener-wide `every` ticker, the close styles (`rst`, `fin`,
//!   `half`, `drop`) and fault events/metrics.
//!
//! Byte-level rules run inside the copy loop (`proxy::Duplex` owns the connection's
//! [`plan::ConnPlan`]); time-level rules run in the connection task's select loop.

pub mod amqp;
pub mod inject;
pub mod plan;
