//! Errors of the object store.

use std::io;

use super::keys::ObjectKey;

/// What an object store operation can fail with.
///
/// `Invalid*`, `NoSpace` and `Checksum` concern one request: the store stays
/// usable. `Io`, `Meta`, `Corrupt` and `Failed` mean the disk or metadata
/// misbehaved; after a failed flush the store refuses further writes, since
/// it can no longer tell what is durable.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{object}: range {offset}+{len} is not 4 KiB-aligned or empty")]
    InvalidAlignment {
        object: ObjectKey,
        offset: u64,
        len: u64,
    },
    #[error("{object}: range {offset}+{len} goes past the maximum object size {max}")]
    InvalidRange {
        object: ObjectKey,
        offset: u64,
        len: u64,
        max: u64,
    },
    #[error("{0} already exists")]
    ObjectExists(ObjectKey),
    #[error("{0} does not exist")]
    ObjectNotFound(ObjectKey),
    #[error("no space: {needed} blocks needed, {free} free")]
    NoSpace { needed: u64, free: u64 },
    #[error(
        "checksum mismatch in {object} at offset {offset} (disk block {disk_block}): \
         expected {expected:#010x}, read {actual:#010x}"
    )]
    Checksum {
        object: ObjectKey,
        offset: u64,
        disk_block: u64,
        expected: u32,
        actual: u32,
    },
    #[error("{op} failed: {source}")]
    Io {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("metadata: {0}")]
    Meta(#[from] rocksdb::Error),
    #[error("{0} is not a formatted store (no meta/ directory); run `basalt osd format` first")]
    NotFormatted(std::path::PathBuf),
    #[error("store is corrupt: {0}")]
    Corrupt(String),
    #[error("store stopped after an earlier failure: {0}")]
    Failed(String),
}

impl StoreError {
    /// Returns whether this error concerns only the request (bad input or a
    /// full disk), not the health of the store.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            StoreError::InvalidAlignment { .. }
                | StoreError::InvalidRange { .. }
                | StoreError::NoSpace { .. }
                | StoreError::ObjectExists(_)
                | StoreError::ObjectNotFound(_)
        )
    }
}
