//! Persistence for openraft: the log and vote ([`log`]), the state machine and its snapshots
//! ([`sm`]), both over the record format of [`file`].
//!
//! Everything lives directly in `data_dir`:
//! ```text
//! data_dir/node          identity: the node name this directory belongs to
//! data_dir/vote          last vote (atomic replace + fsync)
//! data_dir/purged        last purged log id (atomic replace + fsync)
//! data_dir/committed     last committed log id (overwritten, advisory)
//! data_dir/snapshot      last snapshot: meta + state (atomic replace + fsync)
//! data_dir/log/*.seg     log segments named by first index
//! ```

pub(crate) mod file;
pub(crate) mod log;
pub(crate) mod sm;
