//! The OSD: one storage daemon per disk.
//!
//! - [`store`]: the local object store (io_uring O_DIRECT data, RocksDB
//!   metadata, crc32c per 4 KiB block, copy-on-write, group commit).
//!
//! - [`daemon`]: the `basalt osd` daemon: boot, heartbeats, map, and the
//!   data plane with primary-copy replication.
//!
//! Peering, recovery and scrub come with the failure-handling work.

pub mod daemon;
pub mod store;
