//! Metadata key and value encodings (format version 1).
//!
//! Keys are big-endian so that RocksDB's byte order groups an object's blocks
//! together and a PG's objects together:
//! - object:  pool u32 | seed u32 | home u32 (u32::MAX = none) | volume u64 | index u64
//! - block:   object key | block index u32
//!
//! Values carry their own version byte so a later layout can be told apart.

use std::fmt;

use basalt_placement::{HostId, ObjectId, PgId, PoolId, VolumeId};

use super::error::StoreError;

/// Length of an encoded PG prefix.
pub const PG_KEY_BYTES: usize = 12;
/// Length of an encoded object key.
pub const OBJECT_KEY_BYTES: usize = PG_KEY_BYTES + 16;
/// Length of an encoded block key.
pub const BLOCK_KEY_BYTES: usize = OBJECT_KEY_BYTES + 4;

const VALUE_VERSION: u8 = 1;
const NO_HOME: u32 = u32::MAX;

/// An object as the store knows it: its PG and its identity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub pg: PgId,
    pub object: ObjectId,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.pg, self.object)
    }
}

/// Returns which of `stripes` lock stripes guards `key`: unrelated objects
/// rarely share one.
pub fn stripe_of(key: &ObjectKey, stripes: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish() as usize % stripes
}

/// Encodes the key prefix shared by every object of `pg`.
pub fn pg_prefix(pg: PgId) -> [u8; PG_KEY_BYTES] {
    let mut out = [0u8; PG_KEY_BYTES];
    out[0..4].copy_from_slice(&pg.pool.0.to_be_bytes());
    out[4..8].copy_from_slice(&pg.seed.to_be_bytes());
    out[8..12].copy_from_slice(&pg.home.map_or(NO_HOME, |h| h.0).to_be_bytes());
    out
}

/// Encodes an object key.
pub fn object_key(key: &ObjectKey) -> [u8; OBJECT_KEY_BYTES] {
    let mut out = [0u8; OBJECT_KEY_BYTES];
    out[..PG_KEY_BYTES].copy_from_slice(&pg_prefix(key.pg));
    out[12..20].copy_from_slice(&key.object.volume.0.to_be_bytes());
    out[20..28].copy_from_slice(&key.object.index.to_be_bytes());
    out
}

/// Encodes the key of block `block_index` of an object.
pub fn block_key(key: &ObjectKey, block_index: u32) -> [u8; BLOCK_KEY_BYTES] {
    let mut out = [0u8; BLOCK_KEY_BYTES];
    out[..OBJECT_KEY_BYTES].copy_from_slice(&object_key(key));
    out[OBJECT_KEY_BYTES..].copy_from_slice(&block_index.to_be_bytes());
    out
}

fn be_u32(bytes: &[u8]) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[..4]);
    u32::from_be_bytes(array)
}

fn be_u64(bytes: &[u8]) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(array)
}

/// Decodes an object key.
pub fn decode_object_key(bytes: &[u8]) -> Result<ObjectKey, StoreError> {
    if bytes.len() < OBJECT_KEY_BYTES {
        return Err(StoreError::Corrupt(format!(
            "object key of {} bytes",
            bytes.len()
        )));
    }
    let home = be_u32(&bytes[8..12]);
    Ok(ObjectKey {
        pg: PgId {
            pool: PoolId(be_u32(&bytes[0..4])),
            seed: be_u32(&bytes[4..8]),
            home: (home != NO_HOME).then_some(HostId(home)),
        },
        object: ObjectId {
            volume: VolumeId(be_u64(&bytes[12..20])),
            index: be_u64(&bytes[20..28]),
        },
    })
}

/// Decodes a block key into its object and block index.
pub fn decode_block_key(bytes: &[u8]) -> Result<(ObjectKey, u32), StoreError> {
    if bytes.len() != BLOCK_KEY_BYTES {
        return Err(StoreError::Corrupt(format!(
            "block key of {} bytes",
            bytes.len()
        )));
    }
    Ok((
        decode_object_key(&bytes[..OBJECT_KEY_BYTES])?,
        be_u32(&bytes[OBJECT_KEY_BYTES..]),
    ))
}

/// Where one 4 KiB block of an object lives, and its checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockEntry {
    pub disk_block: u64,
    pub crc: u32,
}

impl BlockEntry {
    pub fn encode(&self) -> [u8; 13] {
        let mut out = [0u8; 13];
        out[0] = VALUE_VERSION;
        out[1..9].copy_from_slice(&self.disk_block.to_le_bytes());
        out[9..13].copy_from_slice(&self.crc.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BlockEntry, StoreError> {
        if bytes.len() != 13 || bytes[0] != VALUE_VERSION {
            return Err(StoreError::Corrupt(format!(
                "block entry of {} bytes, version {:?}",
                bytes.len(),
                bytes.first()
            )));
        }
        let mut disk = [0u8; 8];
        disk.copy_from_slice(&bytes[1..9]);
        let mut crc = [0u8; 4];
        crc.copy_from_slice(&bytes[9..13]);
        Ok(BlockEntry {
            disk_block: u64::from_le_bytes(disk),
            crc: u32::from_le_bytes(crc),
        })
    }
}

/// Per-object metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Version of the last change (the PG log version that made it).
    pub version: u64,
}

impl ObjectInfo {
    pub fn encode(&self) -> [u8; 9] {
        let mut out = [0u8; 9];
        out[0] = VALUE_VERSION;
        out[1..9].copy_from_slice(&self.version.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<ObjectInfo, StoreError> {
        if bytes.len() != 9 || bytes[0] != VALUE_VERSION {
            return Err(StoreError::Corrupt(format!(
                "object info of {} bytes",
                bytes.len()
            )));
        }
        let mut version = [0u8; 8];
        version.copy_from_slice(&bytes[1..9]);
        Ok(ObjectInfo {
            version: u64::from_le_bytes(version),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_and_sort_by_pg_then_object_then_block() {
        let key = |pool, seed, home: Option<u32>, volume, index| ObjectKey {
            pg: PgId {
                pool: PoolId(pool),
                seed,
                home: home.map(HostId),
            },
            object: ObjectId {
                volume: VolumeId(volume),
                index,
            },
        };
        let a = key(1, 2, None, 7, 300);
        let b = key(1, 2, None, 7, 301);
        let c = key(1, 3, Some(4), 0, 0);
        assert_eq!(decode_object_key(&object_key(&a)).unwrap(), a);
        assert_eq!(decode_object_key(&object_key(&c)).unwrap(), c);
        assert_eq!(decode_block_key(&block_key(&b, 9)).unwrap(), (b, 9));
        assert!(block_key(&a, 1023) < block_key(&b, 0));
        assert!(object_key(&b) < object_key(&c));
        assert!(object_key(&a).starts_with(&pg_prefix(a.pg)));
    }

    #[test]
    fn values_round_trip_and_reject_garbage() {
        let entry = BlockEntry {
            disk_block: 123_456_789,
            crc: 0xdead_beef,
        };
        assert_eq!(BlockEntry::decode(&entry.encode()).unwrap(), entry);
        assert!(BlockEntry::decode(&[2; 13]).is_err());
        assert!(BlockEntry::decode(&[1; 5]).is_err());
        let info = ObjectInfo { version: 42 };
        assert_eq!(ObjectInfo::decode(&info.encode()).unwrap(), info);
        assert!(ObjectInfo::decode(b"").is_err());
    }
}
