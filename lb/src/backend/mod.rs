//! Backends of a listener: the pool (membership, draining), selection, health checks, and what a
//! backend address may be (`addr`).

pub mod addr;
pub mod health;
pub mod pool;
pub mod select;

pub use pool::{Backend, Pool};
pub use select::{selector, Selector};
