//! Per-block checksums that ride with a payload.
//!
//! The store keeps a crc32c per 4 KiB block, and a frame carries a crc32c
//! of its whole payload. Computing both from the bytes walks a write's data
//! once per checksum and per copy: the primary hashed each 1 MiB write for
//! its store and again for each replica's frame, and every receiver hashed it
//! to check the frame and again for its store (nine passes per size-3 write,
//! 12% of the OSDs' CPU at 1 MiB sequential writes).
//!
//! A crc32c of two byte strings follows from the crc32c of each:
//! `crc(a ++ b) = shift(crc(a)) ^ crc(b)`, where `shift` is the linear map
//! that runs the CRC register over `b.len()` zero bytes (the conditioning of
//! crc32c, an initial value and a final xor of all ones, cancels out). With
//! `b` one 4 KiB block, `shift` is four table lookups. So a receiver hashes
//! the payload block by block, checks the frame's crc from the blocks'
//! crcs, and hands the blocks' crcs on with the data; a sender that already
//! has them derives the frame's crc without reading the data.

use std::sync::{Arc, OnceLock};

/// The block size the per-block checksums cover.
pub const CRC_BLOCK_BYTES: usize = 4096;

/// `shift` over one block of zeros, as four tables of 256 entries (one per
/// byte of the register).
fn shift_tables() -> &'static [[u32; 256]; 4] {
    static TABLES: OnceLock<[[u32; 256]; 4]> = OnceLock::new();
    TABLES.get_or_init(|| {
        // The map on each bit of the register: the raw register after
        // `CRC_BLOCK_BYTES` zeros. `crc32c_append` conditions its input and
        // output with a complement, which the complements here undo.
        let zeros = [0u8; CRC_BLOCK_BYTES];
        let mut bits = [0u32; 32];
        for (bit, image) in bits.iter_mut().enumerate() {
            *image = !crc32c::crc32c_append(!(1u32 << bit), &zeros);
        }
        let mut tables = [[0u32; 256]; 4];
        for (byte, table) in tables.iter_mut().enumerate() {
            for (value, entry) in table.iter_mut().enumerate() {
                *entry = (0..8)
                    .filter(|bit| value & (1 << bit) != 0)
                    .fold(0, |acc, bit| acc ^ bits[byte * 8 + bit]);
            }
        }
        tables
    })
}

/// The crc32c of the bytes whose crc32c is `crc` followed by one block
/// whose crc32c is `block_crc`.
fn append_block(tables: &[[u32; 256]; 4], crc: u32, block_crc: u32) -> u32 {
    let [b0, b1, b2, b3] = crc.to_le_bytes();
    tables[0][b0 as usize]
        ^ tables[1][b1 as usize]
        ^ tables[2][b2 as usize]
        ^ tables[3][b3 as usize]
        ^ block_crc
}

/// The crc32c of the bytes whose crc32c is `crc` followed by blocks of
/// `CRC_BLOCK_BYTES` whose crc32cs are `block_crcs`, without their bytes.
pub fn append_blocks(crc: u32, block_crcs: &[u32]) -> u32 {
    let tables = shift_tables();
    block_crcs
        .iter()
        .fold(crc, |acc, block| append_block(tables, acc, *block))
}

/// The crc32c of each `CRC_BLOCK_BYTES` block of `data` (the last one may
/// be shorter).
pub fn block_crcs(data: &[u8]) -> Vec<u32> {
    data.chunks(CRC_BLOCK_BYTES).map(crc32c::crc32c).collect()
}

/// The crc32cs of the whole 4 KiB blocks at the end of a payload, the
/// leftover bytes at its start being shorter than one block.
pub type BlockCrcs = Arc<[u32]>;

/// Hashes `payload` once: its crc32c, and, when it holds at least one
/// whole block, the crc32c of each whole block at its end (after the
/// `payload.len() % CRC_BLOCK_BYTES` bytes at its start: an op header).
pub fn payload_crcs(payload: &[u8]) -> (u32, Option<BlockCrcs>) {
    let blocks = payload.len() / CRC_BLOCK_BYTES;
    if blocks == 0 {
        return (crc32c::crc32c(payload), None);
    }
    let (head, body) = payload.split_at(payload.len() - blocks * CRC_BLOCK_BYTES);
    let tables = shift_tables();
    let mut crc = crc32c::crc32c(head);
    let mut crcs = Vec::with_capacity(blocks);
    for block in body.chunks_exact(CRC_BLOCK_BYTES) {
        let block_crc = crc32c::crc32c(block);
        crc = append_block(tables, crc, block_crc);
        crcs.push(block_crc);
    }
    (crc, Some(crcs.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    #[test]
    fn appending_block_crcs_equals_hashing_the_bytes() {
        for (head_len, blocks) in [(0, 1), (52, 1), (52, 3), (4095, 2), (1, 256), (0, 0)] {
            let data = bytes(head_len + blocks * CRC_BLOCK_BYTES, head_len as u64 + 7);
            let (head, body) = data.split_at(head_len);
            let combined = append_blocks(crc32c::crc32c(head), &block_crcs(body));
            assert_eq!(
                combined,
                crc32c::crc32c(&data),
                "{head_len} + {blocks} blocks"
            );
        }
    }

    #[test]
    fn payload_crcs_cover_the_whole_blocks_at_the_end() {
        for len in [0, 52, 4095, 4096, 4148, 3 * 4096 + 52, (1 << 20) + 52] {
            let data = bytes(len, len as u64);
            let (crc, crcs) = payload_crcs(&data);
            assert_eq!(crc, crc32c::crc32c(&data), "len {len}");
            let head = len % CRC_BLOCK_BYTES;
            match crcs {
                None => assert!(len < CRC_BLOCK_BYTES, "len {len}"),
                Some(crcs) => assert_eq!(&crcs[..], &block_crcs(&data[head..])[..], "len {len}"),
            }
        }
    }

    #[test]
    fn a_changed_byte_changes_the_combined_crc() {
        let mut data = bytes(52 + 2 * CRC_BLOCK_BYTES, 3);
        let (before, _) = payload_crcs(&data);
        data[52 + CRC_BLOCK_BYTES + 9] ^= 0x10;
        let (after, _) = payload_crcs(&data);
        assert_ne!(before, after);
        assert_eq!(after, crc32c::crc32c(&data));
    }
}
