//! The OSD: one storage daemon per disk.
//!
//! - [`store`]: the local object store (io_uring O_DIRECT data, RocksDB
//!   metadata, crc32c per 4 KiB block, copy-on-write, group commit).
//!
//! Replication, peering and recovery come with their own issues.

pub mod store;
