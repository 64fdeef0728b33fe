//! The OSD: one storage daemon per disk.
//!
//! - [`store`]: the local object store (io_uring O_DIRECT data, RocksDB
//!   metadata, crc32c per 4 KiB block, copy-on-write, group commit).
//!
//! - [`daemon`]: the `basalt osd` daemon: boot, heartbeats, map, and the
//!   data plane with primary-copy replication.
//!
//! - [`recovery`]: peering and recovery planning (pure), carried out by the
//!   daemon's primary for every PG whose acting set changed.
//!
//! Scrub comes with the rest of the failure-handling work.

pub mod daemon;
pub mod recovery;
pub mod store;
