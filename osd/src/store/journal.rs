//! The store's metadata journal: durable commits in one device write.
//!
//! A synced RocksDB commit costs a WAL append and an `fdatasync` of a growing
//! file, which on ext4 is a file-system journal commit: several device writes
//! and flushes. A durable 4 KiB write paid that on top of its data write, so
//! the store reached about 0.4x of a raw `pwrite` + `fdatasync`.
//!
//! Instead, a durable group commit is one record written with `RWF_DSYNC`
//! into a preallocated region at the start of the data device (the first
//! `journal_blocks` blocks): the group's metadata changes, and for small
//! writes their data too ("inline"), so the write and the record go out
//! together and the acknowledgement waits for one write and one flush, as a
//! raw write with `fdatasync` does. The RocksDB batch of the group is applied
//! without a sync afterwards, and marks the record's sequence number as
//! applied (`journal_applied`, in the same batch).
//!
//! Small buffered writes of a client that flushes are journaled the same
//! way, but their record is a plain write: the client's FLUSH is then a
//! device flush alone. Such records can reach the disk out of order, so a
//! power loss may leave valid records after one it dropped; the lap after
//! an open starts numbering past anything the old lap could hold.
//!
//! A checkpoint (journal full, too many blocks held, `flush_and_release`, a
//! fallback sync or a clean close) flushes the device and syncs RocksDB with
//! the next record's sequence number as the start of a new lap
//! (`journal_lap`); the next record goes to block 0 again.
//!
//! # Replay (at open)
//! Records are read from block 0 while each one is valid (magic, the store's
//! secret nonce, crc32c over the whole record) and its sequence number is the
//! next of the lap (the first must be `journal_lap`); a torn record or one of
//! an earlier lap ends the scan. For every record of the lap, inline data is
//! written to its blocks again; the metadata changes of records after
//! `journal_applied` are applied in order. RocksDB recovers a prefix of its
//! writes (point-in-time recovery), and every change is a blind put or delete
//! of a whole value, so applying the records after the marker in order gives
//! exactly the state after the last record.
//!
//! Rewriting inline data is safe because a block written inline during a lap
//! is never reused during that lap: when a later change gives it up, it is
//! held (allocated, referenced by nothing) until the next checkpoint.
//!
//! The nonce keeps a client's data from being read as a record: inline data
//! sits at block boundaries inside records, and a scan that ran past the last
//! record of a lap lands on old bytes.

use super::buffer::BLOCK_BYTES;
use super::device::BlockDevice;
use super::error::StoreError;
use super::keys::{BLOCK_KEY_BYTES, BlockEntry, OBJECT_KEY_BYTES, ObjectInfo};
use super::meta::MetaOp;

const MAGIC: &[u8; 8] = b"BSLTJRN1";
/// Bytes of the fixed header at the start of a record.
const HEADER_BYTES: usize = 64;
/// Bytes of one inline run descriptor: start block u64, block count u32.
const RUN_BYTES: usize = 12;
/// Largest record: it must fit one I/O buffer.
pub const MAX_RECORD_BYTES: usize = super::buffer::LARGE_BUFFER_BYTES;
/// Largest single write whose data goes into the journal with its metadata.
pub const INLINE_MAX_BYTES: usize = 32 << 10;

/// Journal size for a device of `block_count` blocks: 64 MiB, or a
/// sixteenth of a small device; none below 1024 blocks.
pub fn default_journal_blocks(block_count: u64) -> u64 {
    if block_count < 1024 {
        0
    } else {
        (block_count / 16).min(16_384)
    }
}

/// One decoded record.
#[derive(Debug)]
pub struct Record {
    pub seq: u64,
    pub ops: Vec<MetaOp>,
    /// (first disk block, data) of each inline run.
    pub inline: Vec<(u64, Vec<u8>)>,
}

/// Encodes metadata changes for a record.
pub fn encode_ops(ops: &[MetaOp], out: &mut Vec<u8>) {
    for op in ops {
        match op {
            MetaOp::PutBlock { key, entry } => {
                out.push(1);
                out.extend_from_slice(key);
                out.extend_from_slice(&entry.encode());
            }
            MetaOp::DeleteBlock { key } => {
                out.push(2);
                out.extend_from_slice(key);
            }
            MetaOp::PutObject { key, info } => {
                out.push(3);
                out.extend_from_slice(key);
                out.extend_from_slice(&info.encode());
            }
            MetaOp::DeleteObject { key } => {
                out.push(4);
                out.extend_from_slice(key);
            }
            MetaOp::PutRef { disk_block, count } => {
                out.push(5);
                out.extend_from_slice(&disk_block.to_le_bytes());
                out.extend_from_slice(&count.to_le_bytes());
            }
            MetaOp::DeleteRef { disk_block } => {
                out.push(6);
                out.extend_from_slice(&disk_block.to_le_bytes());
            }
            // The committer keeps deferred data out of records (a sync
            // waits for it to land); encoded whole all the same, so a
            // record always says exactly what its batch did.
            MetaOp::PutDeferred {
                key,
                disk_block,
                data,
            } => {
                out.push(7);
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&disk_block.to_le_bytes());
                out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                out.extend_from_slice(data);
            }
            MetaOp::DeleteDeferred { key, disk_block } => {
                out.push(8);
                out.extend_from_slice(&key.to_le_bytes());
                out.extend_from_slice(&disk_block.to_le_bytes());
            }
        }
    }
}

fn corrupt(what: &str) -> StoreError {
    StoreError::Corrupt(format!("journal record: {what}"))
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], StoreError> {
    if bytes.len() < n {
        return Err(corrupt("truncated change"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn array<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N], StoreError> {
    let mut out = [0u8; N];
    out.copy_from_slice(take(bytes, N)?);
    Ok(out)
}

/// Decodes what `encode_ops` wrote.
pub fn decode_ops(mut bytes: &[u8]) -> Result<Vec<MetaOp>, StoreError> {
    let mut ops = Vec::new();
    while !bytes.is_empty() {
        let tag = take(&mut bytes, 1)?[0];
        let op = match tag {
            1 => MetaOp::PutBlock {
                key: array::<BLOCK_KEY_BYTES>(&mut bytes)?,
                entry: BlockEntry::decode(take(&mut bytes, 13)?)?,
            },
            2 => MetaOp::DeleteBlock {
                key: array::<BLOCK_KEY_BYTES>(&mut bytes)?,
            },
            3 => MetaOp::PutObject {
                key: array::<OBJECT_KEY_BYTES>(&mut bytes)?,
                info: ObjectInfo::decode(take(&mut bytes, 9)?)?,
            },
            4 => MetaOp::DeleteObject {
                key: array::<OBJECT_KEY_BYTES>(&mut bytes)?,
            },
            5 => MetaOp::PutRef {
                disk_block: u64::from_le_bytes(array::<8>(&mut bytes)?),
                count: u32::from_le_bytes(array::<4>(&mut bytes)?),
            },
            6 => MetaOp::DeleteRef {
                disk_block: u64::from_le_bytes(array::<8>(&mut bytes)?),
            },
            7 => {
                let key = u64::from_le_bytes(array::<8>(&mut bytes)?);
                let disk_block = u64::from_le_bytes(array::<8>(&mut bytes)?);
                let len = u32::from_le_bytes(array::<4>(&mut bytes)?) as usize;
                MetaOp::PutDeferred {
                    key,
                    disk_block,
                    data: bytes::Bytes::copy_from_slice(take(&mut bytes, len)?),
                }
            }
            8 => MetaOp::DeleteDeferred {
                key: u64::from_le_bytes(array::<8>(&mut bytes)?),
                disk_block: u64::from_le_bytes(array::<8>(&mut bytes)?),
            },
            other => return Err(corrupt(&format!("unknown change tag {other}"))),
        };
        ops.push(op);
    }
    Ok(ops)
}

/// Blocks a record of `ops_bytes` encoded changes and `inline` runs of
/// `inline_blocks` blocks in all takes.
pub fn record_blocks(ops_bytes: usize, inline_runs: usize, inline_blocks: usize) -> usize {
    (HEADER_BYTES + ops_bytes + inline_runs * RUN_BYTES).div_ceil(BLOCK_BYTES) + inline_blocks
}

/// Fills `buf` (exactly `record_blocks(..)` blocks) with a record.
pub fn fill_record(buf: &mut [u8], nonce: u64, seq: u64, ops: &[u8], inline: &[(u64, &[u8])]) {
    buf.fill(0);
    let blocks = buf.len() / BLOCK_BYTES;
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&nonce.to_le_bytes());
    buf[16..24].copy_from_slice(&seq.to_le_bytes());
    buf[24..28].copy_from_slice(&(blocks as u32).to_le_bytes());
    buf[28..32].copy_from_slice(&(ops.len() as u32).to_le_bytes());
    buf[32..36].copy_from_slice(&(inline.len() as u32).to_le_bytes());
    let mut at = HEADER_BYTES;
    buf[at..at + ops.len()].copy_from_slice(ops);
    at += ops.len();
    for (start, data) in inline {
        buf[at..at + 8].copy_from_slice(&start.to_le_bytes());
        buf[at + 8..at + 12].copy_from_slice(&((data.len() / BLOCK_BYTES) as u32).to_le_bytes());
        at += RUN_BYTES;
    }
    let mut at = at.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    for (_, data) in inline {
        buf[at..at + data.len()].copy_from_slice(data);
        at += data.len();
    }
    debug_assert_eq!(at, buf.len(), "record size");
    let crc = record_crc(buf);
    buf[36..40].copy_from_slice(&crc.to_le_bytes());
}

/// The crc32c of a whole record, its own crc field read as zeros.
fn record_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&bytes[..36]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, &bytes[40..])
}

/// The little-endian u32 at `at`.
pub(super) fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(out)
}

/// The little-endian u64 at `at`.
pub(super) fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(out)
}

/// Reads the header in a record's first block: (seq, blocks), or `None` if
/// it is not the start of one of this store's records.
pub fn parse_header(first_block: &[u8], nonce: u64) -> Option<(u64, usize)> {
    if first_block.len() < HEADER_BYTES
        || &first_block[0..8] != MAGIC
        || le_u64(first_block, 8) != nonce
    {
        return None;
    }
    let blocks = le_u32(first_block, 24) as usize;
    (blocks >= 1 && blocks * BLOCK_BYTES <= MAX_RECORD_BYTES)
        .then(|| (le_u64(first_block, 16), blocks))
}

/// Decodes a whole record: `Ok(None)` if it is not one (a torn write: the
/// checksum fails); an error if the checksum holds but the content cannot be
/// read (a record this code does not understand must not be skipped, or the
/// records after it would be lost).
pub fn decode_record(bytes: &[u8], nonce: u64) -> Result<Option<Record>, StoreError> {
    let Some((seq, blocks)) = parse_header(bytes, nonce) else {
        return Ok(None);
    };
    if bytes.len() != blocks * BLOCK_BYTES {
        return Ok(None);
    }
    if record_crc(bytes) != le_u32(bytes, 36) {
        return Ok(None);
    }
    decode_body(bytes, seq).map(Some)
}

/// The body of a record whose checksum holds.
fn decode_body(bytes: &[u8], seq: u64) -> Result<Record, StoreError> {
    let layout = || {
        corrupt(&format!(
            "record {seq} has a valid checksum but a bad layout"
        ))
    };
    let ops_bytes = le_u32(bytes, 28) as usize;
    let runs = le_u32(bytes, 32) as usize;
    let table_end = runs
        .checked_mul(RUN_BYTES)
        .and_then(|table| table.checked_add(HEADER_BYTES + ops_bytes))
        .filter(|end| *end <= bytes.len())
        .ok_or_else(layout)?;
    let ops = decode_ops(&bytes[HEADER_BYTES..HEADER_BYTES + ops_bytes])?;
    let mut at = HEADER_BYTES + ops_bytes;
    let mut data_at = table_end.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    let mut inline = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = le_u64(bytes, at);
        let len = le_u32(bytes, at + 8) as usize * BLOCK_BYTES;
        at += RUN_BYTES;
        let end = data_at
            .checked_add(len)
            .filter(|end| *end <= bytes.len())
            .ok_or_else(layout)?;
        inline.push((start, bytes[data_at..end].to_vec()));
        data_at = end;
    }
    if data_at != bytes.len() {
        return Err(layout());
    }
    Ok(Record { seq, ops, inline })
}

/// Reads the records of the current lap, from block 0 of the journal: the
/// first must have sequence number `lap`, each next one the following
/// number. Stops at the first block that is not such a record.
pub async fn scan<D: BlockDevice>(
    device: &D,
    journal_blocks: u64,
    nonce: u64,
    lap: u64,
) -> Result<Vec<Record>, StoreError> {
    let io = |source| StoreError::Io {
        op: "read journal",
        source,
    };
    let mut records = Vec::new();
    let mut block = 0u64;
    let mut expected = lap;
    while block < journal_blocks {
        let (first, result) = device.read(block, device.buffer(BLOCK_BYTES)).await;
        result.map_err(io)?;
        let Some((seq, blocks)) = parse_header(&first, nonce) else {
            break;
        };
        if seq != expected || block + blocks as u64 > journal_blocks {
            break;
        }
        let bytes = if blocks == 1 {
            first
        } else {
            let (whole, result) = device
                .read(block, device.buffer(blocks * BLOCK_BYTES))
                .await;
            result.map_err(io)?;
            whole
        };
        let Some(record) = decode_record(&bytes, nonce)? else {
            break;
        };
        records.push(record);
        block += blocks as u64;
        expected += 1;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_ops() -> Vec<MetaOp> {
        vec![
            MetaOp::PutBlock {
                key: [7; BLOCK_KEY_BYTES],
                entry: BlockEntry {
                    disk_block: 99,
                    crc: 0xdead_beef,
                },
            },
            MetaOp::DeleteBlock {
                key: [8; BLOCK_KEY_BYTES],
            },
            MetaOp::PutObject {
                key: [9; OBJECT_KEY_BYTES],
                info: ObjectInfo { version: 42 },
            },
            MetaOp::DeleteObject {
                key: [10; OBJECT_KEY_BYTES],
            },
            MetaOp::PutRef {
                disk_block: 5,
                count: 3,
            },
            MetaOp::DeleteRef { disk_block: 6 },
            MetaOp::PutDeferred {
                key: 70,
                disk_block: 7,
                data: bytes::Bytes::from_static(&[7; 16]),
            },
            MetaOp::DeleteDeferred {
                key: 71,
                disk_block: 8,
            },
        ]
    }

    fn record(nonce: u64, seq: u64, data: &[u8]) -> Vec<u8> {
        let mut ops = Vec::new();
        encode_ops(&sample_ops(), &mut ops);
        let blocks = record_blocks(ops.len(), 1, data.len() / BLOCK_BYTES);
        let mut buf = vec![0u8; blocks * BLOCK_BYTES];
        fill_record(&mut buf, nonce, seq, &ops, &[(1234, data)]);
        buf
    }

    #[test]
    fn records_round_trip_and_reject_tears_and_foreign_nonces() {
        let data: Vec<u8> = (0..2 * BLOCK_BYTES).map(|i| (i % 251) as u8).collect();
        let buf = record(77, 5, &data);
        assert_eq!(buf.len(), 3 * BLOCK_BYTES, "one header block, two data");
        let decoded = decode_record(&buf, 77)
            .expect("decodes")
            .expect("valid record");
        assert_eq!(decoded.seq, 5);
        assert_eq!(format!("{:?}", decoded.ops), format!("{:?}", sample_ops()));
        assert_eq!(decoded.inline, vec![(1234, data.clone())]);

        assert!(
            decode_record(&buf, 78).expect("decodes").is_none(),
            "another store's nonce"
        );
        let mut torn = buf.clone();
        torn[2 * BLOCK_BYTES..].fill(0);
        assert!(
            decode_record(&torn, 77).expect("decodes").is_none(),
            "last block not written"
        );
        let mut flipped = buf.clone();
        flipped[100] ^= 1;
        assert!(
            decode_record(&flipped, 77).expect("decodes").is_none(),
            "a flipped bit"
        );
        assert!(
            decode_record(&buf[..2 * BLOCK_BYTES], 77)
                .expect("decodes")
                .is_none()
        );
        // A record whose checksum holds but whose changes this code cannot
        // read is an error, not the end of the journal.
        let mut unknown = vec![0u8; BLOCK_BYTES];
        fill_record(&mut unknown, 77, 6, &[9, 9, 9], &[]);
        assert!(matches!(
            decode_record(&unknown, 77),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[tokio::test]
    async fn scan_reads_one_lap_in_order_and_stops_at_an_older_record() {
        let device = super::super::device::MemDevice::new(64);
        let data = vec![3u8; BLOCK_BYTES];
        let mut block = 0u64;
        // Lap starting at 10: records 10, 11; then an old record 4 of an
        // earlier lap, then a record 12 that must not be reached.
        for seq in [10u64, 11, 4, 12] {
            let bytes = record(1, seq, &data);
            let blocks = (bytes.len() / BLOCK_BYTES) as u64;
            let mut buf = device.buffer(bytes.len());
            buf.copy_from_slice(&bytes);
            let (_, result) = device.write(block, buf).await;
            result.expect("write");
            block += blocks;
        }
        let records = scan(&device, 64, 1, 10).await.expect("scan");
        assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [10, 11]);
        assert!(
            scan(&device, 64, 1, 11).await.expect("scan").is_empty(),
            "a lap must start at block 0"
        );
        assert!(scan(&device, 64, 2, 10).await.expect("scan").is_empty());
    }
}
