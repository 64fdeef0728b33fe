//! The data-plane wire format between block clients and OSDs, and between
//! OSDs (replication).
//!
//! A frame is a fixed 40-byte header and a payload:
//!
//! ```text
//! 0  magic u16 (0xBA5A)   2 version u8 (1)   3 kind u8
//! 4  flags u32            8 request id u64   16 epoch u64
//! 24 payload length u32   28 payload crc32c u32
//! 32 status u32 (replies) 36 header crc32c u32 (of bytes 0..36)
//! ```
//!
//! All integers are little-endian. Request ids let many requests share one
//! connection and be answered out of order; every op carries the sender's
//! map epoch. Both header and payload are checksummed: a frame that fails to
//! parse or verify is a protocol error, and the connection that carried it is
//! closed (the decoder returns an error; it never panics on any input).
//! Payloads are `Bytes`: decoding splits the read buffer without copying.
//!
//! Rejected: gRPC on the data path (an allocation-heavy HTTP/2 stack per 4 KiB
//! op) and length-prefixed serde (no zero-copy payloads, no cheap header
//! check before reading a large body).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

pub mod crc;
pub mod op;

pub use crc::BlockCrcs;
pub use op::{ObjectRef, OpHeader, Status};

/// First two bytes of every frame.
pub const MAGIC: u16 = 0xBA5A;
/// The frame layout this code speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_BYTES: usize = 40;
/// Largest payload accepted: an 8 MiB op plus its op header.
pub const MAX_PAYLOAD_BYTES: usize = (8 << 20) + 4096;

/// Flag: this frame answers the request with the same id.
pub const FLAG_REPLY: u32 = 1;

/// Alignment of the blocks of large payloads in memory (`aligned_buffer`).
pub const PAYLOAD_ALIGN: usize = crc::CRC_BLOCK_BYTES;
/// Payloads at least this long are read into an aligned buffer of their own:
/// the store writes their blocks to disk straight from it with O_DIRECT
/// instead of copying them into an aligned buffer first (a copy per copy of
/// the data, 7% of the OSDs' CPU at 1 MiB writes). Shorter ones cost less to
/// copy than a buffer of their own.
pub const ALIGN_PAYLOADS_FROM: usize = 64 << 10;

/// An empty buffer with room for `capacity` bytes, placed so that the byte
/// at index `head` sits at a `PAYLOAD_ALIGN`-aligned address: read a payload
/// of `head` bytes of op header and then whole blocks into it, and the
/// blocks are aligned for O_DIRECT. It stays put as long as it is not grown
/// beyond `capacity`.
pub fn aligned_buffer(capacity: usize, head: usize) -> BytesMut {
    let mut buffer = BytesMut::with_capacity(capacity + PAYLOAD_ALIGN);
    let at = buffer.as_ptr() as usize + head;
    let skip = at.next_multiple_of(PAYLOAD_ALIGN) - at;
    buffer.resize(skip, 0);
    buffer.advance(skip);
    buffer
}

/// When a change may be acknowledged.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// Once data and metadata would survive power loss (NBD FUA, and every
    /// change the cluster makes itself: recovery, repair).
    #[default]
    Durable,
    /// Once applied (it survives the daemon's crash, not the machine's
    /// power loss) until the next `Flush`, as NBD allows for writes without
    /// FUA. The store syncs on its own within about a second anyway.
    Buffered,
}

impl Durability {
    /// The op flags that ask for this durability.
    pub fn op_flags(self) -> u32 {
        match self {
            Durability::Durable => 0,
            Durability::Buffered => op::OP_BUFFERED,
        }
    }

    /// The durability op flags ask for.
    pub fn from_op_flags(flags: u32) -> Durability {
        if flags & op::OP_BUFFERED != 0 {
            Durability::Buffered
        } else {
            Durability::Durable
        }
    }
}

/// What a frame asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Ping = 1,
    Read = 2,
    Write = 3,
    WriteZeroes = 4,
    Discard = 5,
    /// Primary -> replica: apply a write already ordered by the primary.
    RepWrite = 6,
    RepWriteZeroes = 7,
    RepDiscard = 8,
    /// Which 4 KiB blocks of an object are allocated.
    BlockStatus = 9,
    /// How many objects this OSD holds for a PG (the op header's PG; the
    /// object fields are ignored). Reply payload: count, u64.
    PgStat = 10,
    /// Peering, OSD -> OSD: every object this OSD holds for the op header's
    /// PG. Reply payload: (volume u64, index u64, version u64) per object.
    PgList = 11,
    /// Recovery, OSD -> OSD: an object's whole contents. Reply payload: see
    /// `op::ObjectContents`; status `Invalid` if the object does not exist.
    ObjPull = 12,
    /// Recovery, primary -> member: replace an object with the contents in
    /// the payload (`op::ObjectContents`) unless it holds that version or a
    /// newer one.
    ObjPush = 13,
    /// Admin -> primary: scrub the op header's PG (`OP_DEEP` for a deep
    /// scrub). Reply payload: the report as JSON.
    PgScrub = 14,
    /// Scrub, primary -> member: per object of the PG, its version and block
    /// checksums. Reply payload: see `op::ObjectDigest`.
    PgDigest = 15,
    /// Client -> OSD: make every change this OSD acknowledged so far durable
    /// (its `OP_BUFFERED` writes included). The payload is ignored.
    Flush = 16,
    /// Primary -> former member: the op header's PG is clean on its acting
    /// set at the frame's epoch; remove every object of it this OSD holds,
    /// unless this OSD is a member at that epoch or has a newer map. Reply
    /// payload: objects removed, u64.
    PgRemove = 17,
    /// Former member -> primary: this OSD (id: u32 payload after the op
    /// header) holds objects of the op header's PG without being a member;
    /// the primary removes them (`PgRemove`) once the PG is clean.
    PgNotify = 18,
}

impl Kind {
    fn from_u8(value: u8) -> Option<Kind> {
        Some(match value {
            1 => Kind::Ping,
            2 => Kind::Read,
            3 => Kind::Write,
            4 => Kind::WriteZeroes,
            5 => Kind::Discard,
            6 => Kind::RepWrite,
            7 => Kind::RepWriteZeroes,
            8 => Kind::RepDiscard,
            9 => Kind::BlockStatus,
            10 => Kind::PgStat,
            11 => Kind::PgList,
            12 => Kind::ObjPull,
            13 => Kind::ObjPush,
            14 => Kind::PgScrub,
            15 => Kind::PgDigest,
            16 => Kind::Flush,
            17 => Kind::PgRemove,
            18 => Kind::PgNotify,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Clone, Debug)]
pub struct Frame {
    pub kind: Kind,
    pub flags: u32,
    pub request_id: u64,
    pub epoch: u64,
    /// For replies: the outcome.
    pub status: u32,
    pub payload: Bytes,
    /// More payload, sent right after `payload` without joining the two
    /// (an op header in `payload`, a write's data here: the data is never
    /// copied on its way to the socket). On the wire it is one payload, so
    /// decoded frames have an empty tail.
    pub tail: Bytes,
    /// The crc32c of each 4 KiB block at the end of the payload (payload,
    /// then tail), when known (`crc`): the decoder hashes a payload block by
    /// block and keeps them, so a write's data is hashed once on arrival
    /// for the frame and the store both; a sender that has them (a primary
    /// passing a write on to its replicas) gets the frame's crc without
    /// reading the data. Not compared by `==`: it is derived from the
    /// payload.
    pub data_crcs: Option<BlockCrcs>,
}

impl PartialEq for Frame {
    fn eq(&self, other: &Frame) -> bool {
        self.kind == other.kind
            && self.flags == other.flags
            && self.request_id == other.request_id
            && self.epoch == other.epoch
            && self.status == other.status
            && self.payload == other.payload
            && self.tail == other.tail
    }
}

impl Eq for Frame {}

impl Frame {
    /// Returns whether this frame is a reply.
    pub fn is_reply(&self) -> bool {
        self.flags & FLAG_REPLY != 0
    }

    /// Bytes of payload on the wire (payload and tail).
    pub fn payload_len(&self) -> usize {
        self.payload.len() + self.tail.len()
    }

    /// Refuses a payload above `MAX_PAYLOAD_BYTES` (what every receiver
    /// refuses).
    pub fn check_size(&self) -> Result<(), WireError> {
        match self.payload_len() {
            len if len > MAX_PAYLOAD_BYTES => Err(WireError::PayloadTooLarge(len)),
            _ => Ok(()),
        }
    }

    /// The crc32c of the whole payload (payload, then tail); with
    /// `data_crcs`, only the bytes before the blocks they cover are read.
    pub fn payload_crc(&self) -> u32 {
        if let Some(crcs) = &self.data_crcs {
            let covered = crcs.len() * crc::CRC_BLOCK_BYTES;
            if let Some(head) = self.payload_len().checked_sub(covered) {
                let crc = match head.checked_sub(self.payload.len()) {
                    None => crc32c::crc32c(&self.payload[..head]),
                    Some(from_tail) => crc32c::crc32c_append(
                        crc32c::crc32c(&self.payload),
                        &self.tail[..from_tail],
                    ),
                };
                return crc::append_blocks(crc, crcs);
            }
        }
        crc32c::crc32c_append(crc32c::crc32c(&self.payload), &self.tail)
    }

    /// The crc32c of each 4 KiB block of `data_len` bytes at the end of the
    /// payload, when this frame carries exactly those (an op's data after
    /// its op header).
    pub fn data_crcs_of(&self, data_len: usize) -> Option<&BlockCrcs> {
        self.data_crcs
            .as_ref()
            .filter(|crcs| crcs.len() * crc::CRC_BLOCK_BYTES == data_len && data_len > 0)
    }

    /// Splits an op request into its op header and its data, whether the
    /// data follows the header in `payload` (a decoded frame) or is the
    /// tail (a frame handed over in-process). No copy.
    pub fn op(&self) -> Result<(OpHeader, Bytes), WireError> {
        let (header, data) = OpHeader::decode(self.payload.clone())?;
        match (data.is_empty(), self.tail.is_empty()) {
            (_, true) => Ok((header, data)),
            (true, false) => Ok((header, self.tail.clone())),
            (false, false) => Err(WireError::MalformedOp(
                "data both after the op header and in the tail",
            )),
        }
    }

    /// Writes the 40-byte header to `dst`.
    fn put_header(&self, dst: &mut BytesMut) {
        let start = dst.len();
        dst.put_u16_le(MAGIC);
        dst.put_u8(VERSION);
        dst.put_u8(self.kind as u8);
        dst.put_u32_le(self.flags);
        dst.put_u64_le(self.request_id);
        dst.put_u64_le(self.epoch);
        dst.put_u32_le(self.payload_len() as u32);
        dst.put_u32_le(self.payload_crc());
        dst.put_u32_le(self.status);
        let header_crc = crc32c::crc32c(&dst[start..start + 36]);
        dst.put_u32_le(header_crc);
    }
}

/// Payloads at least this long are sent from their own buffer (one more
/// iovec); shorter ones are copied next to their header.
const COPY_BELOW: usize = 2048;

/// Encoded frames ready for one vectored write: headers and short payloads
/// are copied into one buffer, long payloads and tails are referenced, not
/// copied (`Buf` over the pieces in order; `write_all_buf` on a socket
/// sends them with `writev`).
#[derive(Default)]
pub struct FrameBatch {
    pieces: std::collections::VecDeque<Bytes>,
    small: BytesMut,
}

impl FrameBatch {
    /// Appends `frame`; refuses a payload above the maximum.
    pub fn push(&mut self, frame: &Frame) -> Result<(), WireError> {
        frame.check_size()?;
        frame.put_header(&mut self.small);
        for part in [&frame.payload, &frame.tail] {
            if part.len() < COPY_BELOW {
                self.small.extend_from_slice(part);
            } else {
                self.seal();
                self.pieces.push_back(part.clone());
            }
        }
        Ok(())
    }

    /// Moves the copied bytes so far into the piece list.
    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.pieces.push_back(self.small.split().freeze());
        }
    }

    /// Returns whether nothing is left to send.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.small.is_empty()
    }

    /// Finishes the batch: everything pushed becomes sendable (`Buf` sees
    /// only finished pieces).
    pub fn finish(&mut self) {
        self.seal();
    }
}

impl Buf for FrameBatch {
    fn remaining(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    fn chunk(&self) -> &[u8] {
        self.pieces.front().map(|b| &b[..]).unwrap_or_default()
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, piece) in dst.iter_mut().zip(self.pieces.iter()) {
            *slot = std::io::IoSlice::new(piece);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        while cnt > 0 {
            let Some(front) = self.pieces.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.pieces.pop_front();
        }
    }
}

/// Why bytes on a connection are not a valid frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("bad magic {0:#06x}")]
    BadMagic(u16),
    #[error("unsupported frame version {0}")]
    UnsupportedVersion(u8),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD_BYTES}-byte limit")]
    PayloadTooLarge(usize),
    #[error("malformed op: {0}")]
    MalformedOp(&'static str),
    #[error("connection: {0}")]
    Io(String),
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e.to_string())
    }
}

/// Encodes and decodes frames on a byte stream.
#[derive(Debug, Default)]
pub struct FrameCodec {
    /// A header already validated, waiting for its payload.
    pending: Option<(Kind, u32, u64, u64, u32, usize, u32)>,
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if self.pending.is_none() {
            if src.len() < HEADER_BYTES {
                src.reserve(HEADER_BYTES - src.len());
                return Ok(None);
            }
            let header = &src[..HEADER_BYTES];
            let mut cursor = header;
            let magic = cursor.get_u16_le();
            let version = cursor.get_u8();
            let kind = cursor.get_u8();
            let flags = cursor.get_u32_le();
            let request_id = cursor.get_u64_le();
            let epoch = cursor.get_u64_le();
            let payload_len = cursor.get_u32_le() as usize;
            let payload_crc = cursor.get_u32_le();
            let status = cursor.get_u32_le();
            let header_crc = cursor.get_u32_le();
            if magic != MAGIC {
                return Err(WireError::BadMagic(magic));
            }
            if crc32c::crc32c(&header[..36]) != header_crc {
                return Err(WireError::HeaderChecksum);
            }
            if version != VERSION {
                return Err(WireError::UnsupportedVersion(version));
            }
            let kind = Kind::from_u8(kind).ok_or(WireError::UnknownKind(kind))?;
            if payload_len > MAX_PAYLOAD_BYTES {
                return Err(WireError::PayloadTooLarge(payload_len));
            }
            src.advance(HEADER_BYTES);
            if payload_len >= ALIGN_PAYLOADS_FROM && src.len() < payload_len {
                // The rest of the payload is read straight into a buffer
                // that puts its whole blocks at aligned addresses (room for
                // the next frame's header too); what arrived of it already
                // is copied over, as growing the old buffer would.
                let head = payload_len % crc::CRC_BLOCK_BYTES;
                let mut aligned = aligned_buffer(payload_len + HEADER_BYTES, head);
                aligned.extend_from_slice(src);
                *src = aligned;
            }
            self.pending = Some((
                kind,
                flags,
                request_id,
                epoch,
                status,
                payload_len,
                payload_crc,
            ));
        }
        let Some((kind, flags, request_id, epoch, status, payload_len, payload_crc)) = self.pending
        else {
            return Ok(None);
        };
        if src.len() < payload_len {
            src.reserve(payload_len - src.len());
            return Ok(None);
        }
        let payload = src.split_to(payload_len).freeze();
        self.pending = None;
        let (crc, data_crcs) = crc::payload_crcs(&payload);
        if crc != payload_crc {
            return Err(WireError::PayloadChecksum);
        }
        Ok(Some(Frame {
            kind,
            flags,
            request_id,
            epoch,
            status,
            payload,
            tail: Bytes::new(),
            data_crcs,
        }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        frame.check_size()?;
        dst.reserve(HEADER_BYTES + frame.payload_len());
        frame.put_header(dst);
        dst.extend_from_slice(&frame.payload);
        dst.extend_from_slice(&frame.tail);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(payload: &[u8]) -> Frame {
        Frame {
            kind: Kind::Write,
            flags: 2,
            request_id: 77,
            epoch: 12,
            status: 0,
            payload: Bytes::copy_from_slice(payload),
            tail: Bytes::new(),
            data_crcs: None,
        }
    }

    fn encode(frame: Frame) -> BytesMut {
        let mut out = BytesMut::new();
        FrameCodec::default().encode(frame, &mut out).unwrap();
        out
    }

    #[test]
    fn frames_round_trip_even_when_split() {
        let original = frame(b"hello block world");
        let bytes = encode(original.clone());
        let mut codec = FrameCodec::default();
        let mut buffer = BytesMut::new();
        let mut decoded = None;
        for byte in bytes.iter() {
            buffer.put_u8(*byte);
            if let Some(frame) = codec.decode(&mut buffer).unwrap() {
                decoded = Some(frame);
            }
        }
        assert_eq!(decoded, Some(original));
        assert!(buffer.is_empty());
    }

    /// A large payload read in pieces (as from a socket) comes out with its
    /// whole blocks at an aligned address, ready for O_DIRECT; a short one
    /// is left where it lands.
    #[test]
    fn large_payloads_arrive_with_aligned_blocks() {
        for (head, blocks) in [(52, 64), (0, 32), (52, 1)] {
            let payload: Vec<u8> = (0..head + blocks * crc::CRC_BLOCK_BYTES)
                .map(|i| (i % 251) as u8)
                .collect();
            let original = frame(&payload);
            let bytes = encode(original.clone());
            let mut codec = FrameCodec::default();
            let mut buffer = BytesMut::new();
            let mut decoded = None;
            for piece in bytes.chunks(5000) {
                buffer.extend_from_slice(piece);
                if let Some(frame) = codec.decode(&mut buffer).unwrap() {
                    decoded = Some(frame);
                }
            }
            let decoded = decoded.expect("a whole frame");
            assert_eq!(decoded, original);
            let data = decoded.payload.slice(head..);
            if payload.len() >= ALIGN_PAYLOADS_FROM {
                assert_eq!(
                    data.as_ptr() as usize % PAYLOAD_ALIGN,
                    0,
                    "{head} + {blocks}"
                );
            }
            assert_eq!(
                decoded.data_crcs_of(data.len()).map(|c| c.to_vec()),
                Some(crc::block_crcs(&data))
            );
        }
    }

    #[test]
    fn aligned_buffers_place_their_head_before_an_aligned_address() {
        for head in [0, 52, 4095] {
            let mut buffer = aligned_buffer(1 << 20, head);
            assert!(buffer.is_empty() && buffer.capacity() >= 1 << 20);
            let start = buffer.as_ptr() as usize;
            buffer.resize(1 << 20, 3);
            assert_eq!(
                buffer.as_ptr() as usize,
                start,
                "filling it must not move it"
            );
            assert_eq!((start + head) % PAYLOAD_ALIGN, 0);
        }
    }

    #[test]
    fn corruption_is_a_protocol_error() {
        let bytes = encode(frame(b"payload"));
        for (position, expected) in [
            (0, WireError::BadMagic(0xBA5B)),
            (5, WireError::HeaderChecksum),
            (HEADER_BYTES + 1, WireError::PayloadChecksum),
        ] {
            let mut corrupt = bytes.clone();
            corrupt[position] ^= 1;
            let err = FrameCodec::default().decode(&mut corrupt).unwrap_err();
            assert_eq!(err, expected);
        }
    }

    /// An op's data is the same whether it follows the op header in the
    /// payload (decoded from the wire) or is the tail (handed over in
    /// process); data in both places is malformed.
    #[test]
    fn op_data_comes_from_the_payload_or_the_tail() {
        let header = OpHeader::for_pg(
            basalt_placement::PgId {
                pool: basalt_placement::PoolId(1),
                seed: 2,
                home: None,
            },
            0,
        );
        let data = Bytes::from_static(&[9u8; 100]);
        let mut joined = frame(&[]);
        joined.payload = header.encode_with(&data);
        let mut split = frame(&[]);
        split.payload = header.encode_with(&[]);
        split.tail = data.clone();
        assert_eq!(joined.op().unwrap(), (header, data.clone()));
        assert_eq!(split.op().unwrap(), (header, data.clone()));
        assert_eq!(split.payload_len(), joined.payload_len());
        assert_eq!(split.payload_crc(), joined.payload_crc());
        let mut both = joined.clone();
        both.tail = data;
        assert!(matches!(both.op(), Err(WireError::MalformedOp(_))));
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused() {
        let mut header = BytesMut::new();
        header.put_u16_le(MAGIC);
        header.put_u8(VERSION);
        header.put_u8(3);
        header.put_u32_le(0);
        header.put_u64_le(1);
        header.put_u64_le(1);
        header.put_u32_le(u32::MAX);
        header.put_u32_le(0);
        header.put_u32_le(0);
        let crc = crc32c::crc32c(&header);
        header.put_u32_le(crc);
        assert!(matches!(
            FrameCodec::default().decode(&mut header.clone()),
            Err(WireError::PayloadTooLarge(_))
        ));
        header[3] = 200;
        let crc = crc32c::crc32c(&header[..36]);
        header[36..40].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            FrameCodec::default().decode(&mut header),
            Err(WireError::UnknownKind(200))
        );
    }

    proptest! {
        /// No input makes the decoder panic: it yields frames, asks for more,
        /// or reports a protocol error.
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::default();
            let mut buffer = BytesMut::from(&data[..]);
            while let Ok(Some(_)) = codec.decode(&mut buffer) {}
        }

        /// Valid frames with random fields and payloads survive a round trip.
        #[test]
        fn random_frames_round_trip(
            id in any::<u64>(), epoch in any::<u64>(), status in any::<u32>(),
            payload in prop::collection::vec(any::<u8>(), 0..2048),
        ) {
            let original = Frame {
                kind: Kind::Read, flags: FLAG_REPLY, request_id: id, epoch, status,
                payload: Bytes::from(payload),
                tail: Bytes::new(),
                data_crcs: None,
            };
            let mut bytes = encode(original.clone());
            prop_assert_eq!(FrameCodec::default().decode(&mut bytes).unwrap(), Some(original));
        }

        /// Frames with tails, batched for vectored writes and sent in short
        /// writes of random sizes, decode to the frames with payload and
        /// tail joined, in order, and the batch's bytes are exactly the
        /// codec's.
        #[test]
        fn batched_frames_with_tails_arrive_joined(
            parts in prop::collection::vec(
                (prop::collection::vec(any::<u8>(), 0..3000), prop::collection::vec(any::<u8>(), 0..5000)),
                1..6,
            ),
            write_sizes in prop::collection::vec(1usize..4000, 1..40),
        ) {
            let frames: Vec<Frame> = parts
                .iter()
                .enumerate()
                .map(|(i, (payload, tail))| Frame {
                    kind: Kind::Write, flags: 0, request_id: i as u64, epoch: 3, status: 0,
                    payload: Bytes::from(payload.clone()),
                    tail: Bytes::from(tail.clone()),
                    data_crcs: None,
                })
                .collect();
            let mut batch = FrameBatch::default();
            let mut expected = BytesMut::new();
            for frame in &frames {
                batch.push(frame).unwrap();
                FrameCodec::default().encode(frame.clone(), &mut expected).unwrap();
            }
            batch.finish();
            prop_assert_eq!(batch.remaining(), expected.len());
            // What a socket taking `size` bytes per write would receive.
            let mut sent = Vec::new();
            let mut sizes = write_sizes.iter().cycle();
            while batch.has_remaining() {
                let mut slices = [std::io::IoSlice::new(&[]); 8];
                let count = batch.chunks_vectored(&mut slices);
                prop_assert!(count > 0);
                let mut take = *sizes.next().unwrap();
                let mut taken = 0;
                for slice in &slices[..count] {
                    let n = slice.len().min(take);
                    sent.extend_from_slice(&slice[..n]);
                    take -= n;
                    taken += n;
                    if take == 0 {
                        break;
                    }
                }
                batch.advance(taken);
            }
            prop_assert!(batch.is_empty());
            prop_assert_eq!(&sent[..], &expected[..]);
            let mut buffer = BytesMut::from(&sent[..]);
            let mut codec = FrameCodec::default();
            for frame in &frames {
                let decoded = codec.decode(&mut buffer).unwrap().unwrap();
                let mut joined = frame.payload.to_vec();
                joined.extend_from_slice(&frame.tail);
                prop_assert_eq!(&decoded.payload[..], &joined[..]);
                prop_assert_eq!(decoded.request_id, frame.request_id);
                let whole = joined.len() / crc::CRC_BLOCK_BYTES * crc::CRC_BLOCK_BYTES;
                let expected_crcs = crc::block_crcs(&joined[joined.len() - whole..]);
                match &decoded.data_crcs {
                    Some(crcs) => prop_assert_eq!(&crcs[..], &expected_crcs[..]),
                    None => prop_assert!(expected_crcs.is_empty()),
                }
            }
        }

        /// A frame sent with its data's block crcs attached (a primary
        /// passing a write on), or passed on as decoded, is the same bytes
        /// on the wire as the frame hashed in full; wrong crcs make the
        /// receiver refuse it.
        #[test]
        fn frames_with_block_crcs_encode_the_same(
            header in prop::collection::vec(any::<u8>(), 0..200),
            blocks in 1usize..4,
            seed in any::<u8>(),
        ) {
            let data: Vec<u8> = (0..blocks * crc::CRC_BLOCK_BYTES)
                .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
                .collect();
            let plain = Frame {
                kind: Kind::RepWrite, flags: 0, request_id: 5, epoch: 9, status: 0,
                payload: Bytes::from(header.clone()),
                tail: Bytes::from(data.clone()),
                data_crcs: None,
            };
            let mut with_crcs = plain.clone();
            with_crcs.data_crcs = Some(crc::block_crcs(&data).into());
            let expected = encode(plain);
            prop_assert_eq!(&encode(with_crcs.clone())[..], &expected[..]);

            let decoded = FrameCodec::default()
                .decode(&mut expected.clone())
                .unwrap()
                .unwrap();
            prop_assert_eq!(decoded.data_crcs_of(data.len()), with_crcs.data_crcs.as_ref());
            prop_assert_eq!(&encode(decoded)[..], &expected[..]);

            let mut wrong = with_crcs;
            let mut crcs = wrong.data_crcs.take().unwrap().to_vec();
            crcs[blocks - 1] ^= 1;
            wrong.data_crcs = Some(crcs.into());
            let mut bytes = encode(wrong);
            prop_assert_eq!(
                FrameCodec::default().decode(&mut bytes),
                Err(WireError::PayloadChecksum)
            );
        }
    }
}
