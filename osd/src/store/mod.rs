//! The local object store of one OSD.
//!
//! Data lives in 4 KiB blocks of one file or block device, read and written
//! through io_uring with O_DIRECT ([`uring`]); metadata (per-block location
//! and crc32c, object versions, PG state) lives in RocksDB ([`meta`]). Writes
//! are copy-on-write and group-committed ([`object_store`]). Every disk access
//! goes through the [`device::BlockDevice`] trait, so tests run the same store
//! on [`device::MemDevice`], which loses unflushed writes, fails I/O or flips
//! bits on demand.
//!
//! A durable commit is one record in the metadata journal ([`journal`]) at
//! the start of the device, written with RWF_DSYNC; small writes carry their
//! data in it, and RocksDB is synced only at the journal's checkpoints.
//! A buffered commit (an NBD write without FUA) logs its changes in a
//! memory-mapped file ([`buffered_log`]) and is applied to RocksDB after the
//! writer is answered.
//!
//! Rejected: overwriting blocks in place with a journal for all data (twice
//! the data written, and snapshots would need a separate copy-on-write
//! layer; only writes of at most 32 KiB are written twice), and one metadata
//! record per extent (a 4 KiB overwrite in the middle of an extent would
//! rewrite or split the record).

pub mod allocator;
pub mod buffer;
pub mod buffered_log;
pub mod device;
pub mod error;
pub mod journal;
pub mod keys;
pub mod map_cache;
pub mod meta;
pub mod object_store;
pub mod uring;

pub use buffer::BLOCK_BYTES;
pub use device::{BlockDevice, MemDevice};
pub use error::StoreError;
pub use keys::ObjectKey;
pub use object_store::{
    DEFER_WHILE_WRITES_AT_MOST, DEFERRED_WRITES_IN_FLIGHT, FsckReport, ObjectStat, ObjectStore,
    RELOCATE_BYTES_PER_SEC, StoreConfig,
};
pub use uring::{UringConfig, UringDevice};
