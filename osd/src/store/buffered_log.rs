//! `BufferedLog`: the metadata changes of buffered writes (NBD writes without
//! FUA) and of journal records, kept in a memory-mapped file until they are
//! applied to RocksDB.
//!
//! A buffered write is acknowledged once its data write completed (or, a
//! deferred one, its data's copy is here too) and its changes are here: a
//! copy into a shared mapping of a file, no system call
//! and no RocksDB memtable insert on the write's path (they were 18% of the
//! OSD's CPU at homed QD1 4 KiB writes, ~11 µs per write). `MetaStore` keeps
//! the logged changes in memory too, where readers find them, and applies
//! them to RocksDB only once a device flush covers the data they point at
//! (`MetaStore::mark_flushed`): RocksDB's WAL may reach the disk at any time
//! (the kernel writes its pages back), and an entry there pointing at data a
//! power loss dropped would read as a checksum error, neither old nor new.
//!
//! The promise is the one RocksDB's unsynced WAL gave: the pages are in the
//! page cache, so the changes survive the daemon's SIGKILL, not a power loss.
//! Open replays the records RocksDB does not have yet (sequence numbers after
//! RocksDB's `buffered_applied` mark). After a reboot it replays nothing: the
//! kernel may have written back any subset of the pages, and a record older
//! than the journal's records could then be replayed over them. The file
//! carries the boot id it was written under for that.
//!
//! Layout: a 64-byte header (magic, boot id), then two halves, each a run of
//! records from its start: magic, payload length, sequence number, a
//! crc32c (of the length, number, journal mark and payload), the journal
//! mark (the journal record whose changes these are, 0: none) and the
//! payload (`journal::encode_ops`), padded to 8 bytes. Records follow each
//! other with consecutive numbers: in one half until a device flush makes
//! everything logged so far applicable, then, if the other half's records
//! are all in RocksDB, in the other half from its start (so one half drains
//! into RocksDB while the other takes new records); once RocksDB holds every
//! record, the next one starts its half over. A replay reads each half's run
//! (up to the first record that does not follow: an older run's leftover, a
//! torn record) and takes the records after the mark from both, in number
//! order, while the numbers follow on.
//!
//! The first format (`BSLTBUF1`: one run from offset 64, 24-byte record
//! headers, no journal marks) is still read, so an upgrade after a SIGKILL
//! keeps what that run logged.

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
/// Size of the mapped file. A record is at most one group's changes (64
/// writes of 1 MiB: about 800 KiB; deferred writes add their data, at most
/// a few of 32 KiB) and must fit in a half; a store syncs once its half is
/// half full (`MetaStore::log_filling`).
pub const LOG_BYTES: usize = 8 << 20;
const HALF_BYTES: usize = LOG_BYTES / 2;
const FILE_MAGIC: &[u8; 8] = b"BSLTBUF2";
/// The first format, read at open only (see the module comment).
const OLD_FILE_MAGIC: &[u8; 8] = b"BSLTBUF1";
const BOOT_ID_BYTES: usize = 36;
const FILE_HEADER_BYTES: usize = 64;
const RECORD_MAGIC: u32 = 0x4255_4652; // "RFUB"
const RECORD_HEADER_BYTES: usize = 32;
const OLD_RECORD_HEADER_BYTES: usize = 24;

/// The mapped log. Not synchronised: `MetaStore` keeps it under its lock.
pub struct BufferedLog {
    map: NonNull<u8>,
    _file: File,
    /// The half records go to (0 or 1).
    half: usize,
    /// Where the next record goes.
    at: usize,
    scratch: Vec<u8>,
}

/// One record of the log.
#[derive(Clone, Debug)]
pub struct Logged {
    pub seq: u64,
    /// The journal record whose changes these are: applying them marks it
    /// applied (`journal_applied`).
    pub journal: Option<u64>,
    pub ops: Vec<MetaOp>,
}

/// What a replay found (`BufferedLog::records`).
#[derive(Debug, Default)]
pub struct Replay {
    /// The records after the mark, in order, with consecutive numbers.
    pub records: Vec<Logged>,
    /// The file is in the first format: its records are applied as that
    /// format's code did, and the log starts over in this one.
    pub old_format: bool,
    /// Per half, the number of the last record taken from it (0: none).
    pub half_last: [u64; 2],
    /// Where the last record taken ends: new records go on from there.
    resume: Option<(usize, usize)>,
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

/// Where a half's records start and where it ends.
fn half_range(half: usize) -> (usize, usize) {
    if half == 0 {
        (FILE_HEADER_BYTES, HALF_BYTES)
    } else {
        (HALF_BYTES, LOG_BYTES)
    }
}

/// One record read back, with where it ends.
struct Read {
    logged: Logged,
    end: usize,
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
            half: 0,
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

    /// The records `after + 1, after + 2, ...` as the last run left them;
    /// nothing when the machine restarted since they were written (see the
    /// module comment). Err only for a record whose crc holds but whose
    /// changes do not decode (a bug, not a torn write).
    pub fn records(&self, after: u64) -> Result<Replay, StoreError> {
        let bytes = self.bytes();
        let old_format = &bytes[..8] == OLD_FILE_MAGIC;
        if &bytes[..8] != FILE_MAGIC && !old_format {
            return Ok(Replay::default());
        }
        if boot_id().as_ref().map(|id| &id[..]) != Some(&bytes[8..8 + BOOT_ID_BYTES]) {
            tracing::warn!(
                "buffered-change log written before the machine restarted: not replayed \
                 (buffered writes not flushed before a power loss may be lost)"
            );
            return Ok(Replay::default());
        }
        // Each half's run, in number order (the first format has one run).
        let mut runs: Vec<(usize, Vec<Read>)> = if old_format {
            vec![(
                0,
                read_run(bytes, FILE_HEADER_BYTES, LOG_BYTES, true, after)?,
            )]
        } else {
            let mut runs = Vec::with_capacity(2);
            for half in 0..2 {
                let (start, end) = half_range(half);
                runs.push((half, read_run(bytes, start, end, false, after)?));
            }
            runs
        };
        runs.sort_by_key(|(_, run)| run.first().map_or(u64::MAX, |r| r.logged.seq));
        // Records RocksDB has (an application leaves the log as it is while
        // newer records are logged: `MetaStore::apply_buffered`) are walked
        // past; the rest must follow on from the mark.
        let mut replay = Replay {
            old_format,
            ..Replay::default()
        };
        let mut next = after.saturating_add(1);
        'runs: for (half, run) in runs {
            for read in run {
                if read.logged.seq < next {
                    continue;
                }
                if read.logged.seq != next {
                    tracing::warn!(
                        expected = next,
                        found = read.logged.seq,
                        "buffered-change log: records do not follow on; replay ends here"
                    );
                    break 'runs;
                }
                next += 1;
                replay.half_last[half] = read.logged.seq;
                replay.resume = Some((half, read.end));
                replay.records.push(read.logged);
            }
        }
        Ok(replay)
    }

    /// Starts the log for this boot. A log of another boot (or of the first
    /// format) is zeroed first: its records were not replayed, and
    /// RocksDB's mark may have gone back with the power, so the numbers of
    /// new records could meet an old record's and read as its continuation.
    /// New records go on after the last record `replay` took (they are not
    /// in RocksDB yet), or from the start.
    pub fn start(&mut self, replay: &Replay) -> Result<(), StoreError> {
        let id = boot_id().unwrap_or_else(|| {
            tracing::warn!(
                "no boot id (/proc/sys/kernel/random/boot_id): buffered writes not applied \
                 to RocksDB when the daemon dies will not be replayed"
            );
            [0; BOOT_ID_BYTES]
        });
        let bytes = self.bytes_mut();
        let fresh = &bytes[..8] != FILE_MAGIC || bytes[8..8 + BOOT_ID_BYTES] != id;
        if fresh {
            bytes.fill(0);
        }
        bytes[..8].copy_from_slice(FILE_MAGIC);
        bytes[8..8 + BOOT_ID_BYTES].copy_from_slice(&id);
        match replay.resume {
            Some((half, at)) if !fresh && !replay.old_format => {
                self.half = half;
                self.at = at;
            }
            _ => {
                self.half = 0;
                self.restart();
            }
        }
        Ok(())
    }

    /// The half records go to.
    pub fn half(&self) -> usize {
        self.half
    }

    /// RocksDB holds every record of this half: the next record goes to its
    /// start (what follows it there is older and ends a replay).
    pub fn restart(&mut self) {
        self.at = half_range(self.half).0;
    }

    /// The next record goes to the start of the other half, whose records
    /// must all be in RocksDB.
    pub fn switch(&mut self) {
        self.half = 1 - self.half;
        self.restart();
    }

    /// Appends `ops` as record `seq` (of journal record `journal`). `false`
    /// when it does not fit behind the records already in this half.
    pub fn append(&mut self, seq: u64, journal: Option<u64>, ops: &[MetaOp]) -> bool {
        let mut payload = std::mem::take(&mut self.scratch);
        payload.clear();
        journal::encode_ops(ops, &mut payload);
        let at = self.at;
        let end = at + RECORD_HEADER_BYTES + payload.len();
        let fits = end <= half_range(self.half).1 && u32::try_from(payload.len()).is_ok();
        if fits {
            let mut header = [0u8; RECORD_HEADER_BYTES];
            header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
            header[8..16].copy_from_slice(&seq.to_le_bytes());
            header[24..32].copy_from_slice(&journal.unwrap_or(0).to_le_bytes());
            let crc = record_crc(&header, &payload, false);
            header[16..20].copy_from_slice(&crc.to_le_bytes());
            let bytes = self.bytes_mut();
            bytes[at + RECORD_HEADER_BYTES..end].copy_from_slice(&payload);
            bytes[at..at + RECORD_HEADER_BYTES].copy_from_slice(&header);
            self.at = padded(end);
        }
        self.scratch = payload;
        fits
    }

    /// Bytes of records in this half since its start.
    pub fn used(&self) -> usize {
        self.at - half_range(self.half).0
    }

    /// Bytes a half holds.
    pub fn half_capacity(&self) -> usize {
        let (start, end) = half_range(self.half);
        end - start
    }
}

/// The run of records from `start` (up to `end`): consecutive numbers from
/// the first record on, up to the first that is torn, does not follow or
/// is not a record. The changes of records up to `after` are not decoded.
fn read_run(
    bytes: &[u8],
    start: usize,
    end: usize,
    old_format: bool,
    after: u64,
) -> Result<Vec<Read>, StoreError> {
    let header_bytes = if old_format {
        OLD_RECORD_HEADER_BYTES
    } else {
        RECORD_HEADER_BYTES
    };
    let mut run = Vec::new();
    let mut previous: Option<u64> = None;
    let mut at = start;
    while at + header_bytes <= end {
        let header = &bytes[at..at + header_bytes];
        let magic = journal::le_u32(header, 0);
        let len = journal::le_u32(header, 4) as usize;
        let seq = journal::le_u64(header, 8);
        let crc = journal::le_u32(header, 16);
        let record_end = at + header_bytes + len;
        let follows = previous.is_none_or(|previous| seq == previous.wrapping_add(1));
        if magic != RECORD_MAGIC || !follows || record_end > end {
            break;
        }
        let payload = &bytes[at + header_bytes..record_end];
        if record_crc(header, payload, old_format) != crc {
            break;
        }
        let journal = if old_format {
            0
        } else {
            journal::le_u64(header, 24)
        };
        let ops = if seq > after {
            journal::decode_ops(payload)?
        } else {
            Vec::new()
        };
        run.push(Read {
            logged: Logged {
                seq,
                journal: (journal != 0).then_some(journal),
                ops,
            },
            end: padded(record_end),
        });
        previous = Some(seq);
        at = padded(record_end);
    }
    Ok(run)
}

fn padded(at: usize) -> usize {
    at.next_multiple_of(8)
}

/// The crc of a record: its length and number (and, but in the first
/// format, its journal mark) and its payload.
fn record_crc(header: &[u8], payload: &[u8], old_format: bool) -> u32 {
    let crc = crc32c::crc32c(&header[4..16]);
    let crc = if old_format {
        crc
    } else {
        crc32c::crc32c_append(crc, &header[24..32])
    };
    crc32c::crc32c_append(crc, payload)
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

    /// The numbers the replayed records' changes name, and the last
    /// record's number (`after` when none).
    fn replayed(log: &BufferedLog, after: u64) -> (Vec<u64>, u64) {
        let replay = log.records(after).unwrap();
        let last = replay.records.last().map_or(after, |r| r.seq);
        let blocks = replay
            .records
            .iter()
            .flat_map(|r| &r.ops)
            .map(|op| match op {
                MetaOp::PutRef { disk_block, .. } => *disk_block,
                _ => u64::MAX,
            })
            .collect();
        (blocks, last)
    }

    fn started(dir: &Path) -> BufferedLog {
        let mut log = BufferedLog::open(dir).unwrap();
        log.start(&Replay::default()).unwrap();
        log
    }

    #[test]
    fn replays_the_records_after_the_mark_and_stops_at_older_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        for seq in 1..=3 {
            assert!(log.append(seq, None, &[put(seq as u32, 100 + seq)]));
        }
        // Applied up to 3; the next lap writes 4 over 1 and leaves 2 and 3.
        log.restart();
        assert!(log.append(4, None, &[put(9, 104), put(10, 105)]));
        drop(log);
        let log = BufferedLog::open(dir.path()).unwrap();
        assert_eq!(replayed(&log, 3), (vec![104, 105], 4));
        // A mark past the records: nothing left to replay.
        assert_eq!(replayed(&log, 4), (vec![], 4));
    }

    /// Records go on in the other half after a switch; a replay takes both
    /// halves' records in number order, journal marks with them, and new
    /// records go on after the last one it took.
    #[test]
    fn records_go_on_in_the_other_half_and_replay_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        assert!(log.append(1, None, &[put(1, 101)]));
        assert!(log.append(2, Some(77), &[put(2, 102)]));
        log.switch();
        assert_eq!((log.half(), log.used()), (1, 0));
        assert!(log.append(3, None, &[put(3, 103)]));
        // Record 1 applied: half 0 keeps 2 waiting; the replay starts at 2.
        drop(log);
        let mut log = BufferedLog::open(dir.path()).unwrap();
        let replay = log.records(1).unwrap();
        let seqs: Vec<u64> = replay.records.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, vec![2, 3]);
        assert_eq!(replay.records[0].journal, Some(77));
        assert_eq!(replay.records[1].journal, None);
        assert_eq!(replay.half_last, [2, 3]);
        log.start(&replay).unwrap();
        assert_eq!(log.half(), 1);
        assert!(log.append(4, None, &[put(4, 104)]));
        drop(log);
        let log = BufferedLog::open(dir.path()).unwrap();
        assert_eq!(replayed(&log, 1), (vec![102, 103, 104], 4));
        // Half 1 started over while half 0 holds older records: those are
        // walked past, and a gap ends the replay.
        let mut log = log;
        log.start(&Replay::default()).unwrap();
        log.half = 1;
        log.restart();
        assert!(log.append(5, None, &[put(5, 105)]));
        assert_eq!(
            replayed(&log, 2),
            (vec![], 2),
            "3 and 4 are gone: 5 must not follow 2"
        );
        assert_eq!(replayed(&log, 4), (vec![105], 5));
    }

    #[test]
    fn a_torn_record_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        assert!(log.append(1, None, &[put(1, 101)]));
        let second = log.at;
        assert!(log.append(2, None, &[put(2, 102)]));
        assert!(log.append(3, None, &[put(3, 103)]));
        // One payload byte of record 2 changed: 2 and 3 are not replayed.
        let byte = second + RECORD_HEADER_BYTES + 3;
        log.bytes_mut()[byte] ^= 1;
        assert_eq!(replayed(&log, 0), (vec![101], 1));
        // So is a changed journal mark.
        log.bytes_mut()[byte] ^= 1;
        log.bytes_mut()[second + 24] ^= 1;
        assert_eq!(replayed(&log, 0), (vec![101], 1));
    }

    #[test]
    fn nothing_is_replayed_after_a_reboot() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        assert!(log.append(1, None, &[put(1, 101)]));
        drop(log);
        forget_boot(dir.path()).unwrap();
        let log = BufferedLog::open(dir.path()).unwrap();
        assert_eq!(replayed(&log, 0), (vec![], 0));
    }

    #[test]
    fn records_of_another_boot_never_continue_new_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        for seq in 11..=13 {
            assert!(log.append(seq, None, &[put(seq as u32, 100 + seq)]));
        }
        drop(log);
        // A power loss: RocksDB's mark went back to 10 and the records are
        // not replayed; the next run logs 11 again, the same size as the
        // old 11, so the old 12 follows it.
        forget_boot(dir.path()).unwrap();
        let mut log = BufferedLog::open(dir.path()).unwrap();
        let replay = log.records(10).unwrap();
        assert!(replay.records.is_empty());
        log.start(&replay).unwrap();
        assert!(log.append(11, None, &[put(11, 211)]));
        drop(log);
        let log = BufferedLog::open(dir.path()).unwrap();
        assert_eq!(replayed(&log, 10), (vec![211], 11));
    }

    /// A log the first format wrote (one run, 24-byte headers) is read.
    #[test]
    fn a_log_of_the_first_format_is_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        let mut payload = Vec::new();
        journal::encode_ops(&[put(1, 301)], &mut payload);
        let mut header = [0u8; OLD_RECORD_HEADER_BYTES];
        header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        header[4..8].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[8..16].copy_from_slice(&5u64.to_le_bytes());
        let crc = record_crc(&header, &payload, true);
        header[16..20].copy_from_slice(&crc.to_le_bytes());
        let bytes = log.bytes_mut();
        bytes[..8].copy_from_slice(OLD_FILE_MAGIC);
        let at = FILE_HEADER_BYTES;
        bytes[at..at + OLD_RECORD_HEADER_BYTES].copy_from_slice(&header);
        bytes[at + OLD_RECORD_HEADER_BYTES..at + OLD_RECORD_HEADER_BYTES + payload.len()]
            .copy_from_slice(&payload);
        drop(log);
        let mut log = BufferedLog::open(dir.path()).unwrap();
        let replay = log.records(4).unwrap();
        assert!(replay.old_format);
        assert_eq!(replayed(&log, 4), (vec![301], 5));
        // Started over in this format.
        log.start(&replay).unwrap();
        assert!(log.append(6, None, &[put(6, 306)]));
        assert_eq!(replayed(&log, 5), (vec![306], 6));
    }

    #[test]
    fn a_record_too_large_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = started(dir.path());
        let many: Vec<MetaOp> = (0..LOG_BYTES as u32 / 16).map(|i| put(i, 1)).collect();
        assert!(!log.append(1, None, &many));
        assert_eq!(log.used(), 0);
    }
}
