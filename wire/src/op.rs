//! The op header at the start of a payload, and reply status codes.
//!
//! ```text
//! 0  pool u32   4 seed u32   8 home u32 (u32::MAX = none)
//! 12 volume u64 20 object index u64
//! 28 offset u64 36 length u32 40 version u64 48 op flags u32   (52 bytes)
//! ```
//! Data (writes, read replies) follows the header in the same payload.

use basalt_placement::{HostId, ObjectId, PgId, PoolId, VolumeId};
use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::WireError;

/// Size of an encoded op header.
pub const OP_HEADER_BYTES: usize = 52;
const NO_HOME: u32 = u32::MAX;

/// Op flag (write-zeroes): keep the range allocated (NBD's NO_HOLE).
pub const OP_ALLOCATE: u32 = 1;
/// Op flag (`ObjPush`): a repair: replace a copy of the same version too.
pub const OP_REPAIR: u32 = 2;
/// Op flag (`PgScrub`, `PgDigest`): read and verify every block (deep scrub).
pub const OP_DEEP: u32 = 4;
/// Op flag (writes, write-zeroes, discards and their replications): may be
/// acknowledged before it is durable; a later `Kind::Flush` makes it durable.
pub const OP_BUFFERED: u32 = 8;

/// An object and the PG it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub pg: PgId,
    pub object: ObjectId,
}

/// What an op is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpHeader {
    pub object: ObjectRef,
    /// Byte offset inside the object.
    pub offset: u64,
    /// Bytes concerned.
    pub length: u32,
    /// The PG log version the primary assigned (replication ops).
    pub version: u64,
    pub flags: u32,
}

impl OpHeader {
    /// A header about a whole object (offset and length 0): peering,
    /// recovery and scrub requests.
    pub fn for_object(pg: PgId, object: ObjectId, flags: u32) -> OpHeader {
        OpHeader {
            object: ObjectRef { pg, object },
            offset: 0,
            length: 0,
            version: 0,
            flags,
        }
    }

    /// A header about a whole PG (object fields 0): `PgStat`, `PgList`,
    /// `PgScrub`, `PgDigest`.
    pub fn for_pg(pg: PgId, flags: u32) -> OpHeader {
        OpHeader::for_object(
            pg,
            ObjectId {
                volume: VolumeId(0),
                index: 0,
            },
            flags,
        )
    }

    /// Encodes the header followed by `data` into one payload.
    pub fn encode_with(&self, data: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(OP_HEADER_BYTES + data.len());
        out.put_u32_le(self.object.pg.pool.0);
        out.put_u32_le(self.object.pg.seed);
        out.put_u32_le(self.object.pg.home.map_or(NO_HOME, |h| h.0));
        out.put_u64_le(self.object.object.volume.0);
        out.put_u64_le(self.object.object.index);
        out.put_u64_le(self.offset);
        out.put_u32_le(self.length);
        out.put_u64_le(self.version);
        out.put_u32_le(self.flags);
        out.extend_from_slice(data);
        out.freeze()
    }

    /// Splits a payload into its op header and the data after it (no copy).
    pub fn decode(mut payload: Bytes) -> Result<(OpHeader, Bytes), WireError> {
        if payload.len() < OP_HEADER_BYTES {
            return Err(WireError::MalformedOp("payload shorter than an op header"));
        }
        let pool = payload.get_u32_le();
        let seed = payload.get_u32_le();
        let home = payload.get_u32_le();
        let volume = payload.get_u64_le();
        let index = payload.get_u64_le();
        let offset = payload.get_u64_le();
        let length = payload.get_u32_le();
        let version = payload.get_u64_le();
        let flags = payload.get_u32_le();
        Ok((
            OpHeader {
                object: ObjectRef {
                    pg: PgId {
                        pool: PoolId(pool),
                        seed,
                        home: (home != NO_HOME).then_some(HostId(home)),
                    },
                    object: ObjectId {
                        volume: VolumeId(volume),
                        index,
                    },
                },
                offset,
                length,
                version,
                flags,
            },
            payload,
        ))
    }
}

/// Outcome of an op, in a reply's status field.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Status {
    Ok = 0,
    /// The sender's epoch differs from the OSD's; the reply's epoch field
    /// holds the OSD's. Retry with a newer map.
    StaleEpoch = 1,
    /// This OSD is not the PG's primary at its epoch; retry after a map
    /// refresh.
    NotPrimary = 2,
    /// Bad request (alignment, range): do not retry.
    Invalid = 3,
    NoSpace = 4,
    /// Storage failed on an OSD; the client may retry.
    Io = 5,
    /// Fewer than min_size copies are available: writes wait or fail.
    Degraded = 6,
    /// A replica did not answer in time; retry.
    Busy = 7,
    /// A checksum failure on read (never bad bytes).
    Checksum = 8,
}

impl Status {
    pub fn from_u32(value: u32) -> Status {
        match value {
            0 => Status::Ok,
            1 => Status::StaleEpoch,
            2 => Status::NotPrimary,
            3 => Status::Invalid,
            4 => Status::NoSpace,
            5 => Status::Io,
            6 => Status::Degraded,
            7 => Status::Busy,
            8 => Status::Checksum,
            _ => Status::Io,
        }
    }

    /// Returns whether a client should retry (after refreshing its map).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Status::StaleEpoch | Status::NotPrimary | Status::Busy | Status::Degraded | Status::Io
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn op_headers_round_trip_without_copying_data() {
        let header = OpHeader {
            object: ObjectRef {
                pg: PgId {
                    pool: PoolId(3),
                    seed: 0x55,
                    home: Some(HostId(2)),
                },
                object: ObjectId {
                    volume: VolumeId(9),
                    index: 1234,
                },
            },
            offset: 8192,
            length: 4096,
            version: 77,
            flags: OP_ALLOCATE,
        };
        let payload = header.encode_with(&[7u8; 4096]);
        let (decoded, data) = OpHeader::decode(payload).unwrap();
        assert_eq!(decoded, header);
        assert_eq!(data.len(), 4096);
        assert!(OpHeader::decode(Bytes::from_static(b"short")).is_err());
    }
}

/// An object's whole contents as recovery moves it: its version and its
/// allocated 4 KiB blocks.
///
/// ```text
/// 0 version u64   8 block count u32   12 block index u32 * count   then 4096 * count bytes
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectContents {
    pub version: u64,
    pub blocks: Vec<(u32, Bytes)>,
}

/// Size of one block in `ObjectContents`.
pub const CONTENTS_BLOCK_BYTES: usize = 4096;

impl ObjectContents {
    /// Encodes the contents (copies the block data once).
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(12 + self.blocks.len() * (4 + CONTENTS_BLOCK_BYTES));
        out.put_u64_le(self.version);
        out.put_u32_le(self.blocks.len() as u32);
        for (index, _) in &self.blocks {
            out.put_u32_le(*index);
        }
        for (_, data) in &self.blocks {
            out.extend_from_slice(data);
        }
        out.freeze()
    }

    /// Decodes contents; block data are slices of `payload` (no copy).
    pub fn decode(mut payload: Bytes) -> Result<ObjectContents, WireError> {
        if payload.len() < 12 {
            return Err(WireError::MalformedOp(
                "object contents shorter than 12 bytes",
            ));
        }
        let version = payload.get_u64_le();
        let count = payload.get_u32_le() as usize;
        let needed = count
            .checked_mul(4 + CONTENTS_BLOCK_BYTES)
            .ok_or(WireError::MalformedOp(
                "object contents block count overflows",
            ))?;
        if payload.len() != needed {
            return Err(WireError::MalformedOp("object contents length mismatch"));
        }
        let mut indexes = Vec::with_capacity(count);
        for _ in 0..count {
            indexes.push(payload.get_u32_le());
        }
        if indexes.windows(2).any(|w| w[0] >= w[1]) {
            return Err(WireError::MalformedOp(
                "object contents blocks out of order",
            ));
        }
        let blocks = indexes
            .into_iter()
            .enumerate()
            .map(|(i, index)| {
                (
                    index,
                    payload.slice(i * CONTENTS_BLOCK_BYTES..(i + 1) * CONTENTS_BLOCK_BYTES),
                )
            })
            .collect();
        Ok(ObjectContents { version, blocks })
    }
}

/// One object as a scrub sees it on one member.
///
/// ```text
/// 0 volume u64   8 index u64   16 version u64   24 state u8
/// 25 block count u32   29 (block index u32, crc32c u32) * count
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectDigest {
    pub object: ObjectId,
    pub version: u64,
    /// 0: readable; 1: a block failed its checksum; 2: could not be read.
    pub state: u8,
    pub crcs: Vec<(u32, u32)>,
}

impl ObjectDigest {
    /// Encodes a list of digests.
    pub fn encode_all(digests: &[ObjectDigest]) -> Bytes {
        let mut out = BytesMut::new();
        for digest in digests {
            out.put_u64_le(digest.object.volume.0);
            out.put_u64_le(digest.object.index);
            out.put_u64_le(digest.version);
            out.put_u8(digest.state);
            out.put_u32_le(digest.crcs.len() as u32);
            for (index, crc) in &digest.crcs {
                out.put_u32_le(*index);
                out.put_u32_le(*crc);
            }
        }
        out.freeze()
    }

    /// Decodes a list of digests; never panics on malformed input.
    pub fn decode_all(mut payload: Bytes) -> Result<Vec<ObjectDigest>, WireError> {
        let mut digests = Vec::new();
        while payload.has_remaining() {
            if payload.remaining() < 29 {
                return Err(WireError::MalformedOp("digest shorter than 29 bytes"));
            }
            let volume = VolumeId(payload.get_u64_le());
            let index = payload.get_u64_le();
            let version = payload.get_u64_le();
            let state = payload.get_u8();
            let count = payload.get_u32_le() as usize;
            if payload.remaining() < count.saturating_mul(8) {
                return Err(WireError::MalformedOp("digest block list cut short"));
            }
            let crcs = (0..count)
                .map(|_| (payload.get_u32_le(), payload.get_u32_le()))
                .collect();
            digests.push(ObjectDigest {
                object: ObjectId { volume, index },
                version,
                state,
                crcs,
            });
        }
        Ok(digests)
    }
}

#[cfg(test)]
mod contents_tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn contents_round_trip_and_reject_lies() {
        let contents = ObjectContents {
            version: 77,
            blocks: vec![
                (0, Bytes::from(vec![1u8; 4096])),
                (5, Bytes::from(vec![2u8; 4096])),
            ],
        };
        let bytes = contents.encode();
        assert_eq!(ObjectContents::decode(bytes.clone()).unwrap(), contents);
        for cut in 0..bytes.len() {
            assert!(ObjectContents::decode(bytes.slice(..cut)).is_err());
        }
        let mut huge = BytesMut::new();
        huge.put_u64_le(1);
        huge.put_u32_le(u32::MAX);
        assert!(ObjectContents::decode(huge.freeze()).is_err());
        let digests = vec![ObjectDigest {
            object: ObjectId {
                volume: VolumeId(3),
                index: 4,
            },
            version: 9,
            state: 1,
            crcs: vec![(0, 11), (7, 12)],
        }];
        let encoded = ObjectDigest::encode_all(&digests);
        assert_eq!(ObjectDigest::decode_all(encoded.clone()).unwrap(), digests);
        for cut in 1..encoded.len() {
            assert!(ObjectDigest::decode_all(encoded.slice(..cut)).is_err());
        }
        let mut unordered = BytesMut::from(&bytes[..]);
        unordered[12..16].copy_from_slice(&9u32.to_le_bytes());
        assert!(ObjectContents::decode(unordered.freeze()).is_err());
    }
}
