//! Backends of a listener: the pool (membership, draining), selection, and health checks.

pub mod health;
pub mod pool;
pub mod select;

pub use pool::{Backend, Pool};
pub use select::{selector, Selector};
