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
