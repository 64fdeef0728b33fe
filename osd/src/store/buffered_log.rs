//! `BufferedLog`: the metadata changes of buffered writes (NBD writes without
//! FUA), kept in a memory-mapped file until they are applied to RocksDB.
//!
//! A buffered write is acknowledged once its data write completed (or, a
//! deferred one, its data's copy is here too) and its changes are here: a
//! copy into a shared mapping of a file, no system call
//! and no RocksDB memtable insert on the write's path (they were 18% of the
//! OSD's CPU at homed QD1 4 KiB writes, ~11 µs per write). The store applies
//! the changes to RocksDB right after the writers are answered (`MetaStore`
//! applies them before any other read or write of RocksDB, so nothing reads
//! around them).
//!
//! The promise is the one RocksDB's unsynced WAL gave: the pages are in the
//! page cache, so the changes survive the daemon's SIGKILL, not a power loss.
//! Open replays the records RocksDB does not have yet (sequence numbers after
//! RocksDB's `buffered_applied` mark). After a reboot it replays nothing: the
//! kernel may have written back any subset of the pages, and a record older
//! than the journal's records could then be replayed over them. The file
//! carries the boot id it was written under for that.
//!
//! Layout: a 64-byte header (magic, boot id), then records from offset 64:
//! magic, payload length, sequence number and a crc32c of the three and the
//! payload (`journal::encode_ops`), padded to 8 bytes. Records run with
//! consecutive sequence numbers; once RocksDB holds every change, the next
//! record starts at offset 64 again (an application that ran while more
//! were logged leaves the log as it is), so a replay reads from 64 while
//! the numbers follow on, walks past the records RocksDB has and stops at
//! the first record that does not follow (an older lap's leftover, a torn
//! record).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use super::error::StoreError;
use super::journal;
use super::meta::MetaOp;

/// File name inside the metadata directory (RocksDB ignores names it did not
/// make).
pub const LOG_FILE: &str = "BASALT-BUFFERED";
/// Size of the mapped file: a record is at most one group's changes (64
/// writes of 1 MiB: about 800 KiB; deferred writes add their data, at most
/// a few of 32 KiB); a full log is applied to RocksDB and starts over.
pub const LOG_BYTES: usize = 8 << 20;
const FILE_MAGIC: &[u8; 8] = b"BSLTBUF1";
const BOOT_ID_BYTES: usize = 36;
const FILE_HEADER_BYTES: usize = 64;
const RECORD_MAGIC: u32 = 0x4255_4652; // "RFUB"
const RECORD_HEADER_BYTES: usize = 24;

/// The mapped log. Not synchronised: `MetaStore` keeps it under its lock.
pub struct BufferedLog {
    map: NonNull<u8>,
    _file: File,
    /// Where the next record goes.
    at: usize,
    scratch: Vec<u8>,
}

// SAFETY: the mapping is owned by this value and only reached through
// `&mut self` (or `&self` for reads of bytes nothing else writes).
unsafe impl Send for BufferedLog {}
unsafe impl Sync for BufferedLog {}

impl Drop for BufferedLog {
    fn drop(&mut self) {
        // SAFETY: `map` is the start of a live mapping of LOG_BYTES bytes
        // made in `open`, unmapped only here.
        unsafe {
            libc::munmap(self.map.as_ptr().cast(), LOG_BYTES);
        }
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> StoreError {
    move |source| StoreError::Io { op, source }
}

/// This boot's id (Linux); `None` when unknown, which never matches.
fn boot_id() -> Option<[u8; BOOT_ID_BYTES]> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    text.trim().as_bytes().try_into().ok()
}

impl BufferedLog {
    /// Opens (creating and allocating if missing) the log in `dir`. Records
    /// are read with `records`; `start` must come before the first `append`.
    pub fn open(dir: &Path) -> Result<BufferedLog, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOG_FILE))
            .map_err(io("open buffered-change log"))?;
        let len = file
            .metadata()
            .map_err(io("stat buffered-change log"))?
            .len();
        if len != LOG_BYTES as u64 {
            file.set_len(LOG_BYTES as u64)
                .map_err(io("size buffered-change log"))?;
            // Blocks allocated now: a store into the mapping never has to
            // find space (a full file system would make it a SIGBUS).
            // SAFETY: plain system call on an open descriptor.
            let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, LOG_BYTES as libc::off_t) };
            if rc != 0 {
                // No fallocate here: zeros, written.
                use std::os::unix::fs::FileExt;
                let zeros = vec![0u8; 1 << 20];
                for at in (0..LOG_BYTES).step_by(zeros.len()) {
                    file.write_all_at(&zeros, at as u64)
                        .map_err(io("allocate buffered-change log"))?;
                }
            }
            file.sync_all().map_err(io("sync buffered-change log"))?;
        }
        // SAFETY: a shared read-write mapping of the whole file, whose size
        // was just set; checked for failure below.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LOG_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                file.as_raw_fd(),
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return Err(io("map buffered-change log")(
                std::io::Error::last_os_error(),
            ));
        }
        let map = NonNull::new(raw.cast::<u8>()).ok_or_else(|| StoreError::Io {
            op: "map buffered-change log",
            source: std::io::Error::other("null mapping"),
        })?;
        Ok(BufferedLog {
            map,
            _file: file,
            at: FILE_HEADER_BYTES,
            scratch: Vec::new(),
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: LOG_BYTES mapped bytes, alive as long as `self`.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), LOG_BYTES) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as `bytes`, and `&mut self` makes this the only access.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr(), LOG_BYTES) }
    }

    /// The changes of records `after + 1, after + 2, ...` as the last run
    /// left them, in order, with the last one's number; nothing when the
    /// machine restarted since they were written (see the module comment).
    /// Err only for a record whose crc holds but whose changes do not
    /// decode (a bug, not a torn write).
    pub fn records(&self, after: u64) -> Result<(Vec<MetaOp>, u64), StoreError> {
        let bytes = self.bytes();
        let mut ops = Vec::new();
        let mut last = after;
        if &bytes[..8] != FILE_MAGIC {
            return Ok((ops, last));
        }
        if boot_id().as_ref().map(|id| &id[..]) != Some(&bytes[8..8 + BOOT_ID_BYTES]) {
            tracing::warn!(
                "buffered-change log written before the machine restarted: not replayed \
                 (buffered writes not flushed before a power loss may be lost)"
            );
            return Ok((ops, last));
        }
        // The log may start with records RocksDB has already: an
        // application that ran while more were logged does not start the
        // log over (`MetaStore::apply_buffered`). They are walked past, as
        // long as the numbers follow on.
        let mut previous: Option<u64> = None;
        let mut at = FILE_HEADER_BYTES;
        while at + RECORD_HEADER_BYTES <= LOG_BYTES {
            let header = &bytes[at..at + RECORD_HEADER_BYTES];
            let magic = journal::le_u32(header, 0);
            let len = journal::le_u32(header, 4) as usize;
            let seq = journal::le_u64(header, 8);
            let crc = journal::le_u32(header, 16);
            let end = at + RECORD_HEADER_BYTES + len;
            let follows = match previous {
                None => seq <= after.saturating_add(1),
                Some(previous) => seq == previous.wrapping_add(1),
            };
            if magic != RECORD_MAGIC || !follows || end > LOG_BYTES {
                break;
            }
            let payload = &bytes[at + RECORD_HEADER_BYTES..end];
            if record_crc(&header[4..16], payload) != crc {
                break;
            }
            if seq > after {
                ops.extend(journal::decode_ops(payload)?);
                last = seq;
            }
            previous = Some(seq);
            at = padded(end);
        }
        Ok((ops, last))
    }

    /// Starts the log over, for this boot: the next record goes to the
    /// start. Every change in it must be in RocksDB. A log of another boot
    /// is zeroed first: its records were not replayed, and RocksDB's mark
    /// may have gone back with the power, so the numbers of new records
    /// could meet an old record's and read as its continuation.
    pub fn start(&mut self) -> Result<(), StoreError> {
        let id = boot_id().unwrap_or_else(|| {
            tracing::warn!(
                "no boot id (/proc/sys/kernel/random/boot_id): buffered writes not applied \
                 to RocksDB when the daemon dies will not be replayed"
            );
            [0; BOOT_ID_BYTES]
        });
        let bytes = self.bytes_mut();
        if &bytes[..8] != FILE_MAGIC || bytes[8..8 + BOOT_ID_BYTES] != id {
            bytes.fill(0);
        }
        bytes[..8].copy_from_slice(FILE_MAGIC);
        bytes[8..8 + BOOT_ID_BYTES].copy_from_slice(&id);
        self.restart();
        Ok(())
    }

    /// RocksDB holds every change logged: the next record goes to the start
    /// (what follows it there is older and ends a replay).
    pub fn restart(&mut self) {
        self.at = FILE_HEADER_BYTES;
    }

    /// Appends `ops` as record `seq`. `false` when it does not fit behind
    /// the records already there (apply them, `restart`, try again) or at
    /// all (apply `ops` to RocksDB directly).
    pub fn append(&mut self, seq: u64, ops: &[MetaOp]) -> bool {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        journal::encode_ops(ops, &mut payload);
        let at = self.at;
        let end = at + RECORD_HEADER_BYTES + payload.len();
        let fits = end <= LOG_BYTES && u32::try_from(payload.len()).is_ok();
        if fits {
            let mut header = [0u8; RECORD_HEADER_BYTES];
            header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            header[8..16].copy_from_slice(&seq.to_le_bytes());
            let crc = record_crc(&header[4..16], &payload);
            header[16..20].copy_from_slice(&crc.to_le_bytes());
            let bytes = self.bytes_mut();
            bytes[at + RECORD_HEADER_BYTES..end].copy_from_slice(&payload);
            bytes[at..at + RECORD_HEADER_BYTES].copy_from_slice(&header);
            self.at = padded(end);
        }
        self.scratch = payload;
        fits
    }

    /// Bytes of records since the last `restart`.
    pub fn used(&self) -> usize {
        self.at - FILE_HEADER_BYTES
    }
}

fn padded(at: usize) -> usize {
    at.next_multiple_of(8)
}

fn record_crc(fields: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(fields), payload)
}

/// Rewrites the boot id of the log in `dir`, as if it had been written
/// before a reboot. For tests of what a power loss leaves.
pub fn forget_boot(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let file = OpenOptions::new().write(true).open(dir.join(LOG_FILE))?;
    file.write_all_at(&[b'x'; BOOT_ID_BYTES], 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A change that names a number (`disk_block`) the tests can follow.
    fn put(index: u32, disk_block: u64) -> MetaOp {
        MetaOp::PutRef {
            disk_block,
            count: index + 2,
        }
    }

    fn blocks(ops: &[MetaOp]) -> Vec<u64> {
        ops.iter()
            .map(|op| match op {
                MetaOp::PutRef { disk_block, .. } => *disk_block,
                _ => u64::MAX,
            })
            .collect()
    }

    #[test]
    fn replays_the_records_after_the_mark_and_stops_at_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        log.start().unwrap();
        for seq in 1..=3 {
            assert!(log.append(seq, &[put(seq as u32, 100 + seq)]));
        }
        // Applied up to 3; the next lap writes 4 over 1 and leaves 2 and 3.
        log.restart();
        assert!(log.append(4, &[put(9, 104), put(10, 105)]));
        drop(log);
        let log = BufferedLog::open(dir.path()).unwrap();
        let (ops, last) = log.records(3).unwrap();
        assert_eq!((blocks(&ops), last), (vec![104, 105], 4));
        // A mark past the records: nothing left to replay.
        assert_eq!(log.records(4).unwrap().0.len(), 0);
    }

    #[test]
    fn a_torn_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        log.start().unwrap();
        assert!(log.append(1, &[put(1, 101)]));
        let second = log.at;
        assert!(log.append(2, &[put(2, 102)]));
        assert!(log.append(3, &[put(3, 103)]));
        // One payload byte of record 2 changed: 2 and 3 are not replayed.
        let byte = second + RECORD_HEADER_BYTES + 3;
        log.bytes_mut()[byte] ^= 1;
        let (ops, last) = log.records(0).unwrap();
        assert_eq!((blocks(&ops), last), (vec![101], 1));
    }

    #[test]
    fn nothing_is_replayed_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        log.start().unwrap();
        assert!(log.append(1, &[put(1, 101)]));
        drop(log);
        forget_boot(dir.path()).unwrap();
        let log = BufferedLog::open(dir.path()).unwrap();
        let (ops, last) = log.records(0).unwrap();
        assert_eq!((ops.len(), last), (0, 0));
    }

    #[test]
    fn records_of_another_boot_never_continue_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        log.start().unwrap();
        for seq in 11..=13 {
            assert!(log.append(seq, &[put(seq as u32, 100 + seq)]));
        }
        drop(log);
        // A power loss: RocksDB's mark went back to 10 and the records are
        // not replayed; the next run logs 11 again, the same size as the
        // old 11, so the old 12 follows it.
        forget_boot(dir.path()).unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        assert_eq!(log.records(10).unwrap().0.len(), 0);
        log.start().unwrap();
        assert!(log.append(11, &[put(11, 211)]));
        drop(log);
        let log = BufferedLog::open(dir.path()).unwrap();
        let (ops, last) = log.records(10).unwrap();
        assert_eq!((blocks(&ops), last), (vec![211], 11));
    }

    #[test]
    fn a_record_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        log.start().unwrap();
        let many: Vec<MetaOp> = (0..LOG_BYTES as u32 / 8).map(|i| put(i, 1)).collect();
        assert!(!log.append(1, &many));
        assert_eq!(log.used(), 0);
    }
}
