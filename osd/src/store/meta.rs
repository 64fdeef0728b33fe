//! `MetaStore`: the store's metadata in RocksDB.
//!
//! Column families:
//! - `objects`: object key -> `ObjectInfo` (exists iff the object exists);
//! - `blocks`: block key -> `BlockEntry` (disk block and crc32c); a hole has
//!   no entry;
//! - `pg_log`, `pg_info`: for replication and peering (written by later
//!   layers, in the same atomic batches as the data they describe);
//! - `snap_refs`: reference counts of disk blocks shared with snapshots;
//! - `deferred`: (a rising number, first disk block) -> the data of a small
//!   buffered write whose write in place may not have landed yet (see
//!   `object_store`'s deferred writes); deleted at the next sync;
//! - `default`: the superblock.
//!
//! One key per block (not per extent) keeps a 4 KiB overwrite to one small
//! put and makes copy-on-write a pure metadata switch.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options};
use serde::{Deserialize, Serialize};

use super::buffered_log::{BufferedLog, Logged};
use super::error::StoreError;
use super::keys::{
    BLOCK_KEY_BYTES, BlockEntry, OBJECT_KEY_BYTES, ObjectInfo, ObjectKey, block_key,
    decode_block_key, decode_object_key, object_key, pg_prefix,
};
use basalt_placement::PgId;

pub const CF_OBJECTS: &str = "objects";
pub const CF_BLOCKS: &str = "blocks";
pub const CF_PG_LOG: &str = "pg_log";
pub const CF_PG_INFO: &str = "pg_info";
pub const CF_SNAP_REFS: &str = "snap_refs";
pub const CF_DEFERRED: &str = "deferred";
const COLUMN_FAMILIES: [&str; 6] = [
    CF_OBJECTS,
    CF_BLOCKS,
    CF_PG_LOG,
    CF_PG_INFO,
    CF_SNAP_REFS,
    CF_DEFERRED,
];
const SUPERBLOCK_KEY: &[u8] = b"superblock";
/// Sequence number of the last journal record whose changes are applied.
const JOURNAL_APPLIED_KEY: &[u8] = b"journal_applied";
/// Sequence number of the first record of the journal's current lap.
const JOURNAL_LAP_KEY: &[u8] = b"journal_lap";
/// Sequence number of the last buffered-change log record applied.
const BUFFERED_APPLIED_KEY: &[u8] = b"buffered_applied";

/// The store layout version this code reads and writes.
pub const STORE_FORMAT_VERSION: u32 = 1;

/// What a store is: written once at format time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superblock {
    pub format_version: u32,
    pub block_bytes: u32,
    pub block_count: u64,
    /// The data file was written in full at format time: every later write
    /// is an in-place overwrite that changes no file-system metadata.
    #[serde(default)]
    pub prezeroed: bool,
    /// Blocks at the start of the device that hold the metadata journal
    /// (`journal`); 0 for stores formatted before it existed.
    #[serde(default)]
    pub journal_blocks: u64,
    /// Random number every journal record carries: client data copied into
    /// the journal can never pass for a record.
    #[serde(default)]
    pub journal_nonce: u64,
}

/// One change inside an atomic metadata batch.
#[derive(Clone, Debug)]
pub enum MetaOp {
    PutBlock {
        key: [u8; BLOCK_KEY_BYTES],
        entry: BlockEntry,
    },
    DeleteBlock {
        key: [u8; BLOCK_KEY_BYTES],
    },
    PutObject {
        key: [u8; OBJECT_KEY_BYTES],
        info: ObjectInfo,
    },
    DeleteObject {
        key: [u8; OBJECT_KEY_BYTES],
    },
    /// Sets the reference count of a shared disk block (>= 2).
    PutRef {
        disk_block: u64,
        count: u32,
    },
    /// The disk block is referenced once again.
    DeleteRef {
        disk_block: u64,
    },
    /// Data being written to disk blocks from `disk_block` on, kept under
    /// `key` (rising within a run of the store) until the write in place
    /// is known to have landed (a deferred write).
    PutDeferred {
        key: u64,
        disk_block: u64,
        data: bytes::Bytes,
    },
    /// The deferred data under `key` (for `disk_block`) is on the device.
    DeleteDeferred {
        key: u64,
        disk_block: u64,
    },
}

/// The RocksDB database of one store.
///
/// Changes logged with `write_buffered` wait in the buffered-change log
/// (`buffered_log`) and in memory, where every reader finds them
/// (`pending`), until `apply_buffered` puts them into RocksDB; it puts only
/// those a device flush covers (`mark_flushed`): RocksDB never holds an
/// entry pointing at data a power loss could still drop.
pub struct MetaStore {
    db: DB,
    buffered: Mutex<Buffered>,
    /// Held while buffered changes are applied (one application at a time).
    applying: Mutex<()>,
}

/// Where a change lands: column family (`op_target`) and key, zero-padded.
type Target = (u8, [u8; BLOCK_KEY_BYTES]);

/// Changes logged but not in RocksDB yet.
struct Buffered {
    log: BufferedLog,
    /// The records not in RocksDB, in log order.
    records: VecDeque<Logged>,
    /// The last change logged per target, with its record's number: what a
    /// reader finds before RocksDB. Dropped once applied (unless a later
    /// record changed the target again).
    pending: BTreeMap<Target, (u64, MetaOp)>,
    /// Number of the last record logged.
    seq: u64,
    /// Records up to this one point only at data a device flush covers:
    /// they may be applied.
    flushed: u64,
    /// Number of the last record applied (RocksDB's `buffered_applied`).
    applied: u64,
    /// Per half of the log, the number of the last record in it (0: none).
    half_last: [u64; 2],
    /// Since when records wait to be applied (flushed, not applied).
    since: Option<std::time::Instant>,
}

impl Buffered {
    /// Changes of records that may be applied and are not.
    fn flushed_ops(&self) -> usize {
        self.records
            .iter()
            .take_while(|r| r.seq <= self.flushed)
            .map(|r| r.ops.len())
            .sum()
    }
}

/// Changes per RocksDB batch when buffered changes are applied: a batch of
/// thousands is milliseconds of one core's work, and on a machine with few
/// cores the runtime thread waited behind it.
const APPLY_CHUNK: usize = 256;

/// RocksDB info logs (`LOG`, `LOG.old.*`) kept in the metadata directory.
const INFO_LOGS_KEPT: usize = 8;

/// A value a reader found: in RocksDB, or a change not applied yet.
enum Found<'a> {
    Stored(&'a [u8]),
    Pending(&'a MetaOp),
}

impl Found<'_> {
    fn block(&self) -> Result<BlockEntry, StoreError> {
        match self {
            Found::Stored(bytes) => BlockEntry::decode(bytes),
            Found::Pending(MetaOp::PutBlock { entry, .. }) => Ok(*entry),
            Found::Pending(op) => Err(mismatch(op)),
        }
    }

    fn object(&self) -> Result<ObjectInfo, StoreError> {
        match self {
            Found::Stored(bytes) => ObjectInfo::decode(bytes),
            Found::Pending(MetaOp::PutObject { info, .. }) => Ok(*info),
            Found::Pending(op) => Err(mismatch(op)),
        }
    }

    fn count(&self) -> Result<u32, StoreError> {
        match self {
            Found::Stored(bytes) => decode_ref(bytes),
            Found::Pending(MetaOp::PutRef { count, .. }) => Ok(*count),
            Found::Pending(op) => Err(mismatch(op)),
        }
    }

    fn data(&self) -> Result<&[u8], StoreError> {
        match self {
            Found::Stored(bytes) => Ok(bytes),
            Found::Pending(MetaOp::PutDeferred { data, .. }) => Ok(&data[..]),
            Found::Pending(op) => Err(mismatch(op)),
        }
    }
}

fn mismatch(op: &MetaOp) -> StoreError {
    StoreError::Corrupt(format!("pending change {op:?} in the wrong column family"))
}

/// Whether a change puts a value (not a deletion).
fn is_put(op: &MetaOp) -> bool {
    matches!(
        op,
        MetaOp::PutBlock { .. }
            | MetaOp::PutObject { .. }
            | MetaOp::PutRef { .. }
            | MetaOp::PutDeferred { .. }
    )
}

/// Key length of a column family's keys (`op_target`'s numbering).
fn family_key_len(family: u8) -> usize {
    match family {
        FAMILY_BLOCKS => BLOCK_KEY_BYTES,
        FAMILY_OBJECTS => OBJECT_KEY_BYTES,
        FAMILY_REFS => 8,
        FAMILY_DEFERRED => 16,
        _ => BLOCK_KEY_BYTES,
    }
}

// The order of the column families in a coalesced batch (`coalesce`):
// deferred writes' copies (and their deletions) first, so that an
// application cut between two of its batches (`APPLY_CHUNK`) never leaves
// a block entry in RocksDB without the copy of the data it points at, nor
// a block's new owner without the deletion of the copy that held it.
const FAMILY_DEFERRED: u8 = 0;
const FAMILY_BLOCKS: u8 = 1;
const FAMILY_OBJECTS: u8 = 2;
const FAMILY_REFS: u8 = 3;

fn target(family: u8, key: &[u8]) -> Target {
    let mut out = [0u8; BLOCK_KEY_BYTES];
    let len = key.len().min(BLOCK_KEY_BYTES);
    out[..len].copy_from_slice(&key[..len]);
    (family, out)
}

impl MetaStore {
    /// Opens (creating if missing) the metadata database at `path`.
    ///
    /// The changes the last run logged and RocksDB does not have (a SIGKILL
    /// before they were applied) wait again, as not flushed: readers find
    /// them, and the store applies them once its open has flushed the data
    /// device (`mark_flushed`).
    pub fn open(path: &Path) -> Result<MetaStore, StoreError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        options.increase_parallelism(2);
        options.set_max_background_jobs(2);
        // Reuse WAL files: a synced append then changes no file size, so the
        // sync is one device flush rather than a journal commit and a flush.
        options.set_recycle_log_file_num(4);
        // After a power loss RocksDB comes back with a prefix of its writes:
        // journal replay (`journal`) relies on it.
        options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // One writer (the committer): memtable inserts need no concurrency,
        // and the insert hints (`column_family_options`) work only without.
        options.set_allow_concurrent_memtable_write(false);
        // RocksDB starts a new info log at every open and kept up to 1,000
        // old ones (`LOG.old.*`, ~120 KB each on a busy OSD).
        options.set_keep_log_file_num(INFO_LOGS_KEPT);
        let mut descriptors = Vec::with_capacity(COLUMN_FAMILIES.len());
        for name in COLUMN_FAMILIES {
            descriptors.push(ColumnFamilyDescriptor::new(
                name,
                column_family_options(name)?,
            ));
        }
        let db = DB::open_cf_descriptors(&options, path, descriptors)?;
        let log = BufferedLog::open(path)?;
        let mut applied = read_mark(&db, BUFFERED_APPLIED_KEY)?;
        let mut replay = log.records(applied)?;
        let meta = MetaStore {
            db,
            buffered: Mutex::new(Buffered {
                log,
                records: VecDeque::new(),
                pending: BTreeMap::new(),
                seq: applied,
                flushed: applied,
                applied,
                half_last: [0; 2],
                since: None,
            }),
            applying: Mutex::new(()),
        };
        if replay.old_format && !replay.records.is_empty() {
            // The first format's records: applied now, as its code did.
            let ops: Vec<MetaOp> = replay.records.iter().flat_map(|r| r.ops.clone()).collect();
            let last = replay.records.last().map_or(applied, |r| r.seq);
            tracing::info!(
                changes = ops.len(),
                "buffered changes of the first log format applied"
            );
            meta.write_batch(&ops, None, None, Some(last), false)?;
            applied = last;
            replay.records.clear();
        }
        {
            let mut buffered = meta.lock_buffered();
            buffered.log.start(&replay)?;
            if let Some(last) = replay.records.last() {
                tracing::info!(
                    records = replay.records.len(),
                    "buffered changes of the last run wait for the open's flush"
                );
                buffered.seq = last.seq;
                buffered.half_last = replay.half_last;
            } else {
                buffered.seq = applied;
            }
            buffered.flushed = applied;
            buffered.applied = applied;
            for record in replay.records {
                for op in &record.ops {
                    let (family, key) = op_target(op);
                    buffered
                        .pending
                        .insert((family, key), (record.seq, op.clone()));
                }
                buffered.records.push_back(record);
            }
        }
        Ok(meta)
    }

    fn lock_buffered(&self) -> MutexGuard<'_, Buffered> {
        self.buffered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs changes: readers find them at once; RocksDB gets them once a
    /// device flush covers them (`mark_flushed`) and `apply_buffered` runs.
    /// They survive a SIGKILL of the daemon, not a power loss. `false`
    /// (nothing logged) when the log has no room: both halves hold records
    /// not applied yet (flush, apply, try again), or the changes are more
    /// than a half holds.
    pub fn write_buffered(&self, ops: &[MetaOp]) -> Result<bool, StoreError> {
        self.write_buffered_marked(ops, None)
    }

    /// `write_buffered` of the changes of journal record `journal`: applying
    /// them marks the record applied (`journal_applied`).
    pub fn write_buffered_marked(
        &self,
        ops: &[MetaOp],
        journal: Option<u64>,
    ) -> Result<bool, StoreError> {
        if ops.is_empty() && journal.is_none() {
            return Ok(true);
        }
        let mut guard = self.lock_buffered();
        let buffered = &mut *guard;
        let seq = buffered.seq + 1;
        if !buffered.log.append(seq, journal, ops) {
            let other = 1 - buffered.log.half();
            if buffered.half_last[other] > buffered.applied {
                return Ok(false);
            }
            buffered.log.switch();
            buffered.half_last[other] = 0;
            if !buffered.log.append(seq, journal, ops) {
                return Ok(false);
            }
        }
        buffered.seq = seq;
        buffered.half_last[buffered.log.half()] = seq;
        for op in ops {
            buffered.pending.insert(op_target(op), (seq, op.clone()));
        }
        buffered.records.push_back(Logged {
            seq,
            journal,
            ops: ops.to_vec(),
        });
        Ok(true)
    }

    /// Number of the last record logged.
    pub fn logged_seq(&self) -> u64 {
        self.lock_buffered().seq
    }

    /// A device flush covers the data the records up to `through` point at
    /// (the caller read `logged_seq` before the flush began, after every
    /// data write of theirs completed): they may be applied. New records go
    /// to the other half of the log if its records are all in RocksDB, so
    /// that this one can start over once they are too.
    pub fn mark_flushed(&self, through: u64) {
        let mut guard = self.lock_buffered();
        let buffered = &mut *guard;
        let through = through.min(buffered.seq);
        if through > buffered.flushed {
            buffered.flushed = through;
            if buffered.since.is_none() && buffered.flushed > buffered.applied {
                buffered.since = Some(std::time::Instant::now());
            }
        }
        let half = buffered.log.half();
        if buffered.half_last[half] > buffered.applied
            && buffered.half_last[1 - half] <= buffered.applied
        {
            buffered.log.switch();
            buffered.half_last[1 - half] = 0;
        }
    }

    /// Whether the log's current half is half full: a sync soon (its flush
    /// lets the records drain into RocksDB and the log switch halves) keeps
    /// the log from running out of room, which would stall a write.
    pub fn log_filling(&self) -> bool {
        let buffered = self.lock_buffered();
        buffered.log.used() * 2 >= buffered.log.half_capacity()
    }

    /// Whether changes wait that `apply_buffered` would apply now.
    pub fn has_buffered(&self) -> bool {
        let buffered = self.lock_buffered();
        buffered.flushed > buffered.applied
    }

    /// How many changes `apply_buffered` would apply now, and since when
    /// the first of them may be applied.
    pub fn buffered_waiting(&self) -> (usize, Option<std::time::Instant>) {
        let buffered = self.lock_buffered();
        (buffered.flushed_ops(), buffered.since)
    }

    /// How many changes are logged and not in RocksDB, flushed or not.
    pub fn unapplied(&self) -> usize {
        let buffered = self.lock_buffered();
        buffered.records.iter().map(|r| r.ops.len()).sum()
    }

    /// Applies the logged records a flush covers to RocksDB (unsynced
    /// batches of `APPLY_CHUNK` changes, the last one marking them applied,
    /// and the journal record of the newest with a mark applied too:
    /// `write_in_chunks`). May run on another thread while more are
    /// logged: the records are taken out under the lock, applied under
    /// `applying`, and their changes stay where readers find them until
    /// RocksDB has them. The log's half starts over once RocksDB has every
    /// record logged.
    ///
    /// The batch holds the changes coalesced (`coalesce`): the last one per
    /// key, in key order. A failed application leaves the records out of
    /// the queue (the store fails) but logged and readable: the next open
    /// replays them.
    pub fn apply_buffered(&self) -> Result<(), StoreError> {
        let _applying = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let (ops, last, journal) = {
            let mut buffered = self.lock_buffered();
            let mut ops = Vec::new();
            let mut last = None;
            let mut journal = None;
            while buffered
                .records
                .front()
                .is_some_and(|r| r.seq <= buffered.flushed)
            {
                let Some(record) = buffered.records.pop_front() else {
                    break;
                };
                ops.extend(record.ops);
                last = Some(record.seq);
                journal = journal.max(record.journal);
            }
            let Some(last) = last else {
                return Ok(());
            };
            buffered.since = None;
            (ops, last, journal)
        };
        let ops = if ops.len() > 1 { coalesce(ops) } else { ops };
        self.write_in_chunks(&ops, last, journal)?;
        let mut guard = self.lock_buffered();
        let buffered = &mut *guard;
        buffered.applied = last;
        for op in &ops {
            if let std::collections::btree_map::Entry::Occupied(entry) =
                buffered.pending.entry(op_target(op))
                && entry.get().0 <= last
            {
                entry.remove();
            }
        }
        if buffered.seq == last {
            buffered.log.restart();
            let half = buffered.log.half();
            buffered.half_last[half] = 0;
        }
        if buffered.flushed > buffered.applied {
            buffered.since.get_or_insert_with(std::time::Instant::now);
        }
        Ok(())
    }

    /// Writes coalesced buffered changes (at least one record's) in batches
    /// of `APPLY_CHUNK`, the last one marking `seq` applied (and `journal`),
    /// yielding the CPU in between. A kill between two leaves the log to
    /// replay whole, which gives the same state (every change is a blind
    /// put or delete, replayed in order).
    fn write_in_chunks(
        &self,
        ops: &[MetaOp],
        seq: u64,
        journal: Option<u64>,
    ) -> Result<(), StoreError> {
        if ops.is_empty() {
            return self.write_batch(&[], journal, None, Some(seq), false);
        }
        let mut chunks = ops.chunks(APPLY_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            if last {
                self.write_batch(chunk, journal, None, Some(seq), false)?;
            } else {
                self.write_batch(chunk, None, None, None, false)?;
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Before a write straight to RocksDB: every logged record must be in
    /// it first (RocksDB takes changes in the order they were made), so
    /// they must all be flushed.
    fn settle(&self) -> Result<(), StoreError> {
        self.apply_buffered()?;
        let buffered = self.lock_buffered();
        if buffered.applied < buffered.seq {
            return Err(StoreError::Corrupt(format!(
                "a metadata write straight to RocksDB while logged changes up to {} wait for a \
                 device flush (flushed up to {})",
                buffered.seq, buffered.flushed
            )));
        }
        Ok(())
    }

    /// The change waiting for RocksDB at `key` of `family`, if any.
    fn pending_get(&self, family: u8, key: &[u8]) -> Option<MetaOp> {
        let buffered = self.lock_buffered();
        if buffered.pending.is_empty() {
            return None;
        }
        buffered
            .pending
            .get(&target(family, key))
            .map(|(_, op)| op.clone())
    }

    /// The changes waiting for RocksDB in `family` with keys from `start`
    /// up to (not including) `end`, in key order, with their keys.
    fn pending_range(
        &self,
        family: u8,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> Vec<(Vec<u8>, MetaOp)> {
        let buffered = self.lock_buffered();
        if buffered.pending.is_empty() {
            return Vec::new();
        }
        let len = family_key_len(family);
        let below_end = |key: &[u8]| end.is_none_or(|end| key < end);
        buffered
            .pending
            .range(target(family, start)..)
            .take_while(|((f, key), _)| *f == family && below_end(&key[..len]))
            .map(|((_, key), (_, op))| (key[..len].to_vec(), op.clone()))
            .collect()
    }

    /// One value: the change waiting for RocksDB, or RocksDB's.
    fn get(
        &self,
        family: u8,
        cf: &str,
        key: &[u8],
        decode: impl FnOnce(Found<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        match self.pending_get(family, key) {
            Some(op) if is_put(&op) => decode(Found::Pending(&op)),
            Some(_) => Ok(()),
            None => match self.db.get_pinned_cf(self.cf(cf)?, key)? {
                Some(bytes) => decode(Found::Stored(&bytes)),
                None => Ok(()),
            },
        }
    }

    /// Calls `visit` for every key of `family` from `start` up to `end` (in
    /// key order) with its value: RocksDB's, or the change waiting for it,
    /// which wins (a deletion hides the key).
    fn scan(
        &self,
        family: u8,
        cf: &str,
        start: &[u8],
        end: Option<Vec<u8>>,
        mut visit: impl FnMut(&[u8], Found<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        // The pending changes first, then RocksDB: a change applied in
        // between is in RocksDB by the time the iterator is made, and the
        // copy taken before still has it (it leaves the pending set only
        // once RocksDB has it).
        let pending = self.pending_range(family, start, end.as_deref());
        let mut options = rocksdb::ReadOptions::default();
        if let Some(end) = end {
            options.set_iterate_upper_bound(end);
        }
        let iter = self.db.iterator_cf_opt(
            self.cf(cf)?,
            options,
            IteratorMode::From(start, Direction::Forward),
        );
        let mut pending = pending.into_iter().peekable();
        for item in iter {
            let (key, value) = item?;
            let mut replaced = false;
            while let Some((pending_key, op)) = pending.next_if(|(k, _)| k[..] <= key[..]) {
                replaced = pending_key[..] == key[..];
                if is_put(&op) {
                    visit(&pending_key, Found::Pending(&op))?;
                }
            }
            if !replaced {
                visit(&key, Found::Stored(&value))?;
            }
        }
        for (key, op) in pending {
            if is_put(&op) {
                visit(&key, Found::Pending(&op))?;
            }
        }
        Ok(())
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Corrupt(format!("column family {name} missing")))
    }

    /// Returns the superblock, if the store was formatted.
    pub fn superblock(&self) -> Result<Option<Superblock>, StoreError> {
        match self.db.get(SUPERBLOCK_KEY)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("superblock: {e}"))),
        }
    }

    /// Writes the superblock durably.
    pub fn put_superblock(&self, superblock: &Superblock) -> Result<(), StoreError> {
        self.settle()?;
        let bytes = serde_json::to_vec(superblock)
            .map_err(|e| StoreError::Corrupt(format!("superblock: {e}")))?;
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(true);
        self.db.put_opt(SUPERBLOCK_KEY, bytes, &options)?;
        Ok(())
    }

    /// Returns the entries of blocks `first .. first + count` of an object,
    /// `None` for holes. One seek and a short scan.
    pub fn blocks(
        &self,
        key: &ObjectKey,
        first: u32,
        count: u32,
    ) -> Result<Vec<Option<BlockEntry>>, StoreError> {
        if count == 1 {
            // One block (a 4 KiB op): a point lookup is much cheaper than a
            // range scan.
            let mut out = None;
            self.get(FAMILY_BLOCKS, CF_BLOCKS, &block_key(key, first), |found| {
                out = Some(found.block()?);
                Ok(())
            })?;
            return Ok(vec![out]);
        }
        let mut out = vec![None; count as usize];
        let start = block_key(key, first);
        let end = block_key(key, first + count);
        self.scan(
            FAMILY_BLOCKS,
            CF_BLOCKS,
            &start,
            Some(end.to_vec()),
            |k, found| {
                let (_, index) = decode_block_key(k)?;
                let slot = index
                    .checked_sub(first)
                    .filter(|s| *s < count)
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!("block index {index} out of scan"))
                    })?;
                out[slot as usize] = Some(found.block()?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Returns every block entry of an object, in block order.
    pub fn object_blocks(&self, key: &ObjectKey) -> Result<Vec<(u32, BlockEntry)>, StoreError> {
        let prefix = object_key(key);
        let mut out = Vec::new();
        self.scan(
            FAMILY_BLOCKS,
            CF_BLOCKS,
            &prefix,
            Some(prefix_end(&prefix)),
            |k, found| {
                let (_, index) = decode_block_key(k)?;
                out.push((index, found.block()?));
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Returns an object's info, if it exists.
    pub fn object_info(&self, key: &ObjectKey) -> Result<Option<ObjectInfo>, StoreError> {
        let mut out = None;
        self.get(FAMILY_OBJECTS, CF_OBJECTS, &object_key(key), |found| {
            out = Some(found.object()?);
            Ok(())
        })?;
        Ok(out)
    }

    /// Returns every object of `pg` with its info, in key order.
    pub fn list_pg(&self, pg: PgId) -> Result<Vec<(ObjectKey, ObjectInfo)>, StoreError> {
        let prefix = pg_prefix(pg);
        let mut out = Vec::new();
        self.scan(
            FAMILY_OBJECTS,
            CF_OBJECTS,
            &prefix,
            Some(prefix_end(&prefix)),
            |k, found| {
                out.push((decode_object_key(k)?, found.object()?));
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Calls `visit` for every block entry of the store.
    pub fn for_each_block(
        &self,
        mut visit: impl FnMut(ObjectKey, u32, BlockEntry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.scan(FAMILY_BLOCKS, CF_BLOCKS, &[], None, |k, found| {
            let (object, index) = decode_block_key(k)?;
            visit(object, index, found.block()?)
        })
    }

    /// Returns every object of the store.
    pub fn all_objects(&self) -> Result<Vec<(ObjectKey, ObjectInfo)>, StoreError> {
        let mut out = Vec::new();
        self.scan(FAMILY_OBJECTS, CF_OBJECTS, &[], None, |k, found| {
            out.push((decode_object_key(k)?, found.object()?));
            Ok(())
        })?;
        Ok(out)
    }

    /// Returns the reference count of a shared disk block, if it is shared.
    pub fn block_ref(&self, disk_block: u64) -> Result<Option<u32>, StoreError> {
        let mut out = None;
        self.get(
            FAMILY_REFS,
            CF_SNAP_REFS,
            &disk_block.to_be_bytes(),
            |found| {
                out = Some(found.count()?);
                Ok(())
            },
        )?;
        Ok(out)
    }

    /// Calls `visit` for every shared disk block and its reference count.
    pub fn for_each_ref(
        &self,
        mut visit: impl FnMut(u64, u32) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.scan(FAMILY_REFS, CF_SNAP_REFS, &[], None, |k, found| {
            let disk: [u8; 8] = k
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("ref key of {} bytes", k.len())))?;
            visit(u64::from_be_bytes(disk), found.count()?)
        })
    }

    /// Calls `visit` for every deferred write's key, first disk block and
    /// data, in key order.
    pub fn for_each_deferred(
        &self,
        mut visit: impl FnMut(u64, u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.scan(FAMILY_DEFERRED, CF_DEFERRED, &[], None, |k, found| {
            let key: [u8; 16] = k.try_into().map_err(|_| {
                StoreError::Corrupt(format!("deferred write key of {} bytes", k.len()))
            })?;
            let (seq, disk) = key.split_at(8);
            let seq: [u8; 8] = seq.try_into().unwrap_or_default();
            let disk: [u8; 8] = disk.try_into().unwrap_or_default();
            visit(
                u64::from_be_bytes(seq),
                u64::from_be_bytes(disk),
                found.data()?,
            )
        })
    }

    /// Writes a consistent copy of RocksDB, as of now, to `path` (a RocksDB
    /// checkpoint: hard links and a flushed memtable). Changes waiting for
    /// a device flush are not in it: it is what a power loss could leave.
    pub fn snapshot_to(&self, path: &Path) -> Result<(), StoreError> {
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(path)?;
        Ok(())
    }

    /// Returns the journal's (applied, lap) marks: 0 when never written.
    /// The applied mark counts the journal records whose changes wait in
    /// the log (`write_buffered_marked`).
    pub fn journal_marks(&self) -> Result<(u64, u64), StoreError> {
        let logged = {
            let buffered = self.lock_buffered();
            buffered.records.iter().filter_map(|r| r.journal).max()
        };
        let applied = read_mark(&self.db, JOURNAL_APPLIED_KEY)?;
        Ok((
            applied.max(logged.unwrap_or(0)),
            read_mark(&self.db, JOURNAL_LAP_KEY)?,
        ))
    }

    /// Applies `ops` atomically; with `sync`, durably before returning.
    /// No ops with `sync` syncs the WAL (earlier unsynced batches). Every
    /// logged change must be flushed (`settle`).
    pub fn write(&self, ops: &[MetaOp], sync: bool) -> Result<(), StoreError> {
        self.write_marked(ops, None, None, sync)
    }

    /// `write`, setting the journal's applied and lap marks in the same
    /// batch.
    pub fn write_marked(
        &self,
        ops: &[MetaOp],
        applied: Option<u64>,
        lap: Option<u64>,
        sync: bool,
    ) -> Result<(), StoreError> {
        self.settle()?;
        self.write_batch(ops, applied, lap, None, sync)
    }

    /// One RocksDB batch of `ops` and the marks given.
    fn write_batch(
        &self,
        ops: &[MetaOp],
        applied: Option<u64>,
        lap: Option<u64>,
        buffered: Option<u64>,
        sync: bool,
    ) -> Result<(), StoreError> {
        if ops.is_empty() && applied.is_none() && lap.is_none() && buffered.is_none() {
            if sync {
                self.db.flush_wal(true)?;
            }
            return Ok(());
        }
        let objects = self.cf(CF_OBJECTS)?;
        let blocks = self.cf(CF_BLOCKS)?;
        let refs = self.cf(CF_SNAP_REFS)?;
        let deferred = self.cf(CF_DEFERRED)?;
        let mut batch = rocksdb::WriteBatch::default();
        for op in ops {
            match op {
                MetaOp::PutBlock { key, entry } => batch.put_cf(blocks, key, entry.encode()),
                MetaOp::DeleteBlock { key } => batch.delete_cf(blocks, key),
                MetaOp::PutObject { key, info } => batch.put_cf(objects, key, info.encode()),
                MetaOp::DeleteObject { key } => batch.delete_cf(objects, key),
                MetaOp::PutRef { disk_block, count } => {
                    batch.put_cf(refs, disk_block.to_be_bytes(), encode_ref(*count))
                }
                MetaOp::DeleteRef { disk_block } => batch.delete_cf(refs, disk_block.to_be_bytes()),
                MetaOp::PutDeferred {
                    key,
                    disk_block,
                    data,
                } => batch.put_cf(deferred, deferred_key(*key, *disk_block), data),
                MetaOp::DeleteDeferred { key, disk_block } => {
                    batch.delete_cf(deferred, deferred_key(*key, *disk_block))
                }
            }
        }
        if let Some(applied) = applied {
            batch.put(JOURNAL_APPLIED_KEY, applied.to_le_bytes());
        }
        if let Some(lap) = lap {
            batch.put(JOURNAL_LAP_KEY, lap.to_le_bytes());
        }
        if let Some(buffered) = buffered {
            batch.put(BUFFERED_APPLIED_KEY, buffered.to_le_bytes());
        }
        let mut options = rocksdb::WriteOptions::default();
        options.set_sync(sync);
        self.db.write_opt(batch, &options)?;
        Ok(())
    }
}

/// Where a change lands: its column family and key. Two changes with the
/// same target leave the later one's result.
fn op_target(op: &MetaOp) -> Target {
    let mut out = [0u8; BLOCK_KEY_BYTES];
    let family = match op {
        MetaOp::PutBlock { key, .. } | MetaOp::DeleteBlock { key } => {
            out.copy_from_slice(key);
            FAMILY_BLOCKS
        }
        MetaOp::PutObject { key, .. } | MetaOp::DeleteObject { key } => {
            out[..OBJECT_KEY_BYTES].copy_from_slice(key);
            FAMILY_OBJECTS
        }
        MetaOp::PutRef { disk_block, .. } | MetaOp::DeleteRef { disk_block } => {
            out[..8].copy_from_slice(&disk_block.to_be_bytes());
            FAMILY_REFS
        }
        MetaOp::PutDeferred {
            key, disk_block, ..
        }
        | MetaOp::DeleteDeferred { key, disk_block } => {
            out[..16].copy_from_slice(&deferred_key(*key, *disk_block));
            FAMILY_DEFERRED
        }
    };
    (family, out)
}

/// The changes of `ops` that survive their application in order (the
/// last one per key), sorted by column family and key: the same RocksDB
/// state in one atomic batch, with fewer memtable inserts, and each insert
/// next to the one before it.
pub fn coalesce(ops: Vec<MetaOp>) -> Vec<MetaOp> {
    let mut indexed: Vec<(u8, [u8; BLOCK_KEY_BYTES], usize, MetaOp)> = ops
        .into_iter()
        .enumerate()
        .map(|(i, op)| {
            let (family, key) = op_target(&op);
            (family, key, i, op)
        })
        .collect();
    // Later changes of one key sort first; `dedup` keeps the first.
    indexed.sort_unstable_by(|a, b| {
        (a.0, a.1, std::cmp::Reverse(a.2)).cmp(&(b.0, b.1, std::cmp::Reverse(b.2)))
    });
    indexed.dedup_by(|later, earlier| later.0 == earlier.0 && later.1 == earlier.1);
    indexed.into_iter().map(|(_, _, _, op)| op).collect()
}

/// A sequence-number mark of the default column family: 0 when never
/// written.
fn read_mark(db: &DB, key: &[u8]) -> Result<u64, StoreError> {
    match db.get(key)? {
        None => Ok(0),
        Some(bytes) => {
            let array: [u8; 8] = bytes.as_slice().try_into().map_err(|_| {
                StoreError::Corrupt(format!("metadata mark of {} bytes", bytes.len()))
            })?;
            Ok(u64::from_le_bytes(array))
        }
    }
}

/// Options of one column family.
///
/// `objects` and `blocks` get a memtable insert hint per object (RocksDB's
/// `memtable_insert_with_hint_prefix_extractor`, prefix = the object key):
/// each memtable insert starts its skip-list search from where the last
/// insert for the same object ended instead of from the top of the list.
/// Every write changes one object's version (the same `objects` key over
/// and over, the case the option is made for: `meta-bench --keys objects`
/// 5.4 -> 3.8 µs of CPU per batch) and some of its blocks (random 4 KiB
/// blocks gained nothing in `meta-bench --keys blocks`; at homed QD1 the
/// skip-list search was 1.8% of the OSD's CPU with the `objects` hint alone
/// and 1.4% with both, one profile each). The hint applies to
/// non-concurrent memtable writes only; the store has one writer, the
/// committer, and turns concurrent memtable writes off.
fn column_family_options(name: &str) -> Result<Options, StoreError> {
    if name == CF_DEFERRED {
        // Keys rise (a counter shifted by 4 bits, big-endian, its first
        // byte 0 for 2^52 writes): with one hint for all of them, each insert goes next to
        // the last one instead of searching the skip list from the top.
        return Ok(Options::default().get_options_from_string(
            "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.1",
        )?);
    }
    if name == CF_OBJECTS || name == CF_BLOCKS {
        let hint = format!(
            "memtable_insert_with_hint_prefix_extractor=rocksdb.FixedPrefix.{OBJECT_KEY_BYTES}"
        );
        return Ok(Options::default().get_options_from_string(hint)?);
    }
    Ok(Options::default())
}

/// Key of a deferred write's data: its number, then its first disk block.
fn deferred_key(key: u64, disk_block: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&key.to_be_bytes());
    out[8..].copy_from_slice(&disk_block.to_be_bytes());
    out
}

fn encode_ref(count: u32) -> [u8; 5] {
    let mut out = [0u8; 5];
    out[0] = 1;
    out[1..].copy_from_slice(&count.to_le_bytes());
    out
}

fn decode_ref(bytes: &[u8]) -> Result<u32, StoreError> {
    if bytes.len() != 5 || bytes[0] != 1 {
        return Err(StoreError::Corrupt(format!(
            "ref value of {} bytes",
            bytes.len()
        )));
    }
    let mut count = [0u8; 4];
    count.copy_from_slice(&bytes[1..]);
    Ok(u32::from_le_bytes(count))
}

/// Returns the smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff: no upper bound exists; use a key past any real one.
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::buffered_log;

    fn put_ref(disk_block: u64, count: u32) -> MetaOp {
        MetaOp::PutRef { disk_block, count }
    }

    /// Logs `ops` (the log has room) and marks everything logged flushed.
    fn logged_and_flushed(meta: &MetaStore, ops: &[MetaOp]) {
        assert!(meta.write_buffered(ops).unwrap());
        meta.mark_flushed(meta.logged_seq());
    }

    /// What a copy of RocksDB alone holds at `key`'s reference count.
    fn in_rocksdb(meta: &MetaStore, disk_block: u64) -> Option<u32> {
        let copy = tempfile::tempdir().unwrap();
        let path = copy.path().join("copy");
        meta.snapshot_to(&path).unwrap();
        let db = DB::open_cf_descriptors(
            &Options::default(),
            &path,
            COLUMN_FAMILIES.map(|name| ColumnFamilyDescriptor::new(name, Options::default())),
        )
        .unwrap();
        let value = db
            .get_cf(
                db.cf_handle(CF_SNAP_REFS).unwrap(),
                disk_block.to_be_bytes(),
            )
            .unwrap();
        value.map(|v| decode_ref(&v).unwrap())
    }

    /// A logged change is read at once, but reaches RocksDB only once a
    /// device flush covers it: RocksDB's WAL may reach the disk at any
    /// time, and the change may point at data a power loss drops.
    #[test]
    fn buffered_changes_are_read_at_once_and_applied_only_once_flushed() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        assert!(meta.write_buffered(&[put_ref(7, 2)]).unwrap());
        assert_eq!(meta.block_ref(7).unwrap(), Some(2));
        assert!(!meta.has_buffered());
        meta.apply_buffered().unwrap();
        assert_eq!(meta.unapplied(), 1, "applied before a flush covered it");
        assert_eq!(in_rocksdb(&meta, 7), None);
        // A straight write would put RocksDB's changes out of order.
        assert!(meta.write(&[put_ref(9, 3)], false).is_err());
        meta.mark_flushed(meta.logged_seq());
        assert!(meta.has_buffered());
        // A change logged after the flush waits for the next one.
        assert!(meta.write_buffered(&[put_ref(8, 4)]).unwrap());
        meta.apply_buffered().unwrap();
        assert_eq!(in_rocksdb(&meta, 7), Some(2));
        assert_eq!(in_rocksdb(&meta, 8), None);
        assert_eq!(meta.block_ref(8).unwrap(), Some(4));
        assert_eq!(meta.unapplied(), 1);
    }

    /// Readers merge the changes waiting for RocksDB with what it holds:
    /// puts add or replace keys, deletions hide them, in key order.
    #[test]
    fn readers_merge_waiting_changes_with_rocksdb() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        meta.write(&[put_ref(2, 2), put_ref(4, 4), put_ref(6, 6)], false)
            .unwrap();
        assert!(
            meta.write_buffered(&[
                put_ref(1, 11),
                MetaOp::DeleteRef { disk_block: 4 },
                put_ref(6, 16),
                put_ref(7, 17),
                put_ref(5, 15),
                MetaOp::DeleteRef { disk_block: 5 },
                MetaOp::DeleteRef { disk_block: 9 },
            ])
            .unwrap()
        );
        let mut refs = Vec::new();
        meta.for_each_ref(|block, count| {
            refs.push((block, count));
            Ok(())
        })
        .unwrap();
        assert_eq!(refs, vec![(1, 11), (2, 2), (6, 16), (7, 17)]);
        assert_eq!(meta.block_ref(4).unwrap(), None);
        assert_eq!(meta.block_ref(6).unwrap(), Some(16));
        // A block range of an object: pending entries inside it only.
        let object = ObjectKey {
            pg: PgId {
                pool: basalt_placement::PoolId(1),
                seed: 0,
                home: None,
            },
            object: basalt_placement::ObjectId {
                volume: basalt_placement::VolumeId(4),
                index: 1,
            },
        };
        let next = ObjectKey {
            object: basalt_placement::ObjectId {
                volume: basalt_placement::VolumeId(4),
                index: 2,
            },
            ..object
        };
        let entry = |disk_block| BlockEntry { disk_block, crc: 1 };
        meta.mark_flushed(meta.logged_seq());
        meta.apply_buffered().unwrap();
        meta.write(
            &[
                MetaOp::PutBlock {
                    key: block_key(&object, 1),
                    entry: entry(101),
                },
                MetaOp::PutBlock {
                    key: block_key(&object, 3),
                    entry: entry(103),
                },
            ],
            false,
        )
        .unwrap();
        assert!(
            meta.write_buffered(&[
                MetaOp::PutBlock {
                    key: block_key(&object, 2),
                    entry: entry(202),
                },
                MetaOp::DeleteBlock {
                    key: block_key(&object, 3),
                },
                MetaOp::PutBlock {
                    key: block_key(&next, 0),
                    entry: entry(300),
                },
            ])
            .unwrap()
        );
        let indexes = |list: Vec<(u32, BlockEntry)>| -> Vec<(u32, u64)> {
            list.into_iter().map(|(i, e)| (i, e.disk_block)).collect()
        };
        assert_eq!(
            indexes(meta.object_blocks(&object).unwrap()),
            vec![(1, 101), (2, 202)]
        );
        let range: Vec<Option<u64>> = meta
            .blocks(&object, 0, 4)
            .unwrap()
            .into_iter()
            .map(|e| e.map(|e| e.disk_block))
            .collect();
        assert_eq!(range, vec![None, Some(101), Some(202), None]);
        assert_eq!(
            meta.blocks(&object, 2, 1).unwrap()[0].map(|e| e.disk_block),
            Some(202)
        );
        assert_eq!(indexes(meta.object_blocks(&next).unwrap()), vec![(0, 300)]);
    }

    /// The changes of a journal record, logged with its number, count as
    /// applied for the journal at once and mark it in RocksDB with them.
    #[test]
    fn a_journal_records_changes_mark_it_applied() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        assert!(
            meta.write_buffered_marked(&[put_ref(7, 2)], Some(5))
                .unwrap()
        );
        assert!(meta.write_buffered_marked(&[], Some(6)).unwrap());
        assert_eq!(meta.journal_marks().unwrap().0, 6);
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.journal_marks().unwrap().0, 6, "replayed with its mark");
        meta.mark_flushed(meta.logged_seq());
        meta.apply_buffered().unwrap();
        assert_eq!(read_mark(&meta.db, JOURNAL_APPLIED_KEY).unwrap(), 6);
        assert_eq!(in_rocksdb(&meta, 7), Some(2));
    }

    /// Everything a store's column families hold, in order.
    type Contents = (
        Vec<(ObjectKey, u32, u64, u32)>,
        Vec<(ObjectKey, u64)>,
        Vec<(u64, u32)>,
    );

    fn contents(meta: &MetaStore) -> Contents {
        let mut blocks = Vec::new();
        meta.for_each_block(|key, index, entry| {
            blocks.push((key, index, entry.disk_block, entry.crc));
            Ok(())
        })
        .unwrap();
        let objects = meta
            .all_objects()
            .unwrap()
            .into_iter()
            .map(|(key, info)| (key, info.version))
            .collect();
        let mut refs = Vec::new();
        meta.for_each_ref(|block, count| {
            refs.push((block, count));
            Ok(())
        })
        .unwrap();
        (blocks, objects, refs)
    }

    /// A buffered application writes the changes coalesced and sorted: the
    /// store must end exactly as it does with every change applied in turn
    /// (puts and deletes of the same keys, over and over, in one batch).
    #[test]
    fn coalesced_changes_leave_the_state_of_the_changes_in_turn() {
        let object = |index: u64| ObjectKey {
            pg: PgId {
                pool: basalt_placement::PoolId(1),
                seed: (index % 3) as u32,
                home: None,
            },
            object: basalt_placement::ObjectId {
                volume: basalt_placement::VolumeId(4),
                index,
            },
        };
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut ops = Vec::new();
        for version in 0..5_000u64 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let key = object(state % 5);
            let block = ((state >> 8) % 12) as u32;
            ops.push(match (state >> 20) % 7 {
                0 => MetaOp::DeleteBlock {
                    key: block_key(&key, block),
                },
                1 => MetaOp::DeleteObject {
                    key: object_key(&key),
                },
                2 => MetaOp::PutObject {
                    key: object_key(&key),
                    info: ObjectInfo { version },
                },
                3 => put_ref(state >> 40 & 15, 2 + (version % 5) as u32),
                4 => MetaOp::DeleteRef {
                    disk_block: state >> 40 & 15,
                },
                _ => MetaOp::PutBlock {
                    key: block_key(&key, block),
                    entry: BlockEntry {
                        disk_block: version,
                        crc: state as u32,
                    },
                },
            });
        }
        let in_turn = tempfile::tempdir().unwrap();
        let in_turn = MetaStore::open(in_turn.path()).unwrap();
        for op in &ops {
            in_turn.write(std::slice::from_ref(op), false).unwrap();
        }
        let coalesced = coalesce(ops.clone());
        assert!(
            coalesced.len() < ops.len() / 10,
            "{} changes left",
            coalesced.len()
        );
        let buffered = tempfile::tempdir().unwrap();
        let buffered = MetaStore::open(buffered.path()).unwrap();
        for chunk in ops.chunks(700) {
            logged_and_flushed(&buffered, chunk);
        }
        buffered.apply_buffered().unwrap();
        assert_eq!(buffered.unapplied(), 0);
        let expected = contents(&in_turn);
        assert!(!expected.0.is_empty() && !expected.1.is_empty() && !expected.2.is_empty());
        assert_eq!(contents(&buffered), expected);
    }

    /// Buffered changes go to RocksDB in several batches (`APPLY_CHUNK`),
    /// the applied mark with the last: a kill after some of them replays
    /// the whole log at the next open and ends in the same state.
    #[test]
    fn a_kill_between_the_batches_of_an_application_loses_nothing() {
        let ops: Vec<MetaOp> = (0..3 * APPLY_CHUNK as u64)
            .map(|block| put_ref(block, 2 + (block % 7) as u32))
            .chain((0..APPLY_CHUNK as u64).map(|block| MetaOp::DeleteRef { disk_block: block }))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        logged_and_flushed(&meta, &ops);
        // The first batch of the application, then the kill.
        let coalesced = coalesce(ops.clone());
        assert!(coalesced.len() > APPLY_CHUNK);
        meta.write_batch(&coalesced[..APPLY_CHUNK], None, None, None, false)
            .unwrap();
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        let in_turn = tempfile::tempdir().unwrap();
        let in_turn = MetaStore::open(in_turn.path()).unwrap();
        for op in &ops {
            in_turn.write(std::slice::from_ref(op), false).unwrap();
        }
        assert_eq!(contents(&meta), contents(&in_turn));
        assert_eq!(meta.block_ref(0).unwrap(), None);
        assert_eq!(
            meta.block_ref(APPLY_CHUNK as u64).unwrap(),
            Some(2 + (APPLY_CHUNK % 7) as u32)
        );
    }

    #[test]
    fn a_kill_before_they_are_applied_keeps_them() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        assert!(meta.write_buffered(&[put_ref(7, 2)]).unwrap());
        logged_and_flushed(&meta, &[put_ref(8, 3), put_ref(7, 4)]);
        // Dropped unapplied, as a SIGKILL leaves it.
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(7).unwrap(), Some(4));
        assert_eq!(meta.block_ref(8).unwrap(), Some(3));
    }

    /// Restarts do not pile up RocksDB info logs.
    #[test]
    fn old_info_logs_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..INFO_LOGS_KEPT + 6 {
            drop(MetaStore::open(dir.path()).unwrap());
        }
        let logs = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|entry| {
                let entry = entry.as_ref().unwrap();
                entry.file_name().to_string_lossy().starts_with("LOG")
            })
            .count();
        assert!(logs > 1, "no old info log kept");
        assert!(logs <= INFO_LOGS_KEPT + 1, "{logs} info logs kept");
    }

    #[test]
    fn applied_changes_are_not_replayed_over_later_ones() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        logged_and_flushed(&meta, &[put_ref(7, 2)]);
        meta.apply_buffered().unwrap();
        // A later change that is not buffered, then one that is.
        meta.write(&[MetaOp::DeleteRef { disk_block: 7 }], false)
            .unwrap();
        assert!(meta.write_buffered(&[put_ref(9, 5)]).unwrap());
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(7).unwrap(), None);
        assert_eq!(meta.block_ref(9).unwrap(), Some(5));
    }

    /// An application that runs while more changes are logged leaves the
    /// log as it is (applied records, then newer ones): a kill then must
    /// replay the newer ones. (As first written, the replay stopped at the
    /// first applied record and lost them.)
    #[test]
    fn changes_logged_during_an_application_survive_a_kill() {
        let dir = tempfile::tempdir().unwrap();
        let meta = std::sync::Arc::new(MetaStore::open(dir.path()).unwrap());
        // Enough changes that their application takes a while.
        let ops: Vec<MetaOp> = (0..200_000u64).map(|i| put_ref(i, 2)).collect();
        for chunk in ops.chunks(20_000) {
            logged_and_flushed(&meta, chunk);
        }
        let applying = {
            let meta = meta.clone();
            std::thread::spawn(move || meta.apply_buffered().unwrap())
        };
        // Once the application has taken the changes, log one more.
        while meta.buffered_waiting().0 != 0 {
            std::thread::yield_now();
        }
        assert!(meta.write_buffered(&[put_ref(1_000_000, 7)]).unwrap());
        let raced = !applying.is_finished();
        applying.join().unwrap();
        // Dropped with the last change unapplied, as a SIGKILL leaves it.
        drop(std::sync::Arc::into_inner(meta).unwrap());
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(
            meta.block_ref(1_000_000).unwrap(),
            Some(7),
            "a change logged during an application was lost (raced: {raced})"
        );
        assert_eq!(meta.block_ref(199_999).unwrap(), Some(2));
    }

    #[test]
    fn after_a_reboot_unapplied_changes_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        logged_and_flushed(&meta, &[put_ref(7, 2)]);
        meta.apply_buffered().unwrap();
        logged_and_flushed(&meta, &[put_ref(8, 3)]);
        drop(meta);
        buffered_log::forget_boot(dir.path()).unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(7).unwrap(), Some(2));
        assert_eq!(meta.block_ref(8).unwrap(), None);
        // The log works on for this boot.
        assert!(meta.write_buffered(&[put_ref(10, 2)]).unwrap());
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(10).unwrap(), Some(2));
    }

    /// A log whose halves both hold records not in RocksDB refuses more;
    /// once they are flushed and applied it takes records again, and every
    /// change survives a kill.
    #[test]
    fn a_full_log_refuses_until_flushed_and_applied() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        // About 13 bytes per change.
        let per_record = 1_000u64;
        let changes = |record: u64| -> Vec<MetaOp> {
            (0..per_record)
                .map(|i| put_ref(i, (record + 2) as u32))
                .collect()
        };
        let mut records = 0;
        while meta.write_buffered(&changes(records)).unwrap() {
            records += 1;
        }
        let capacity = buffered_log::LOG_BYTES as u64 / (per_record * 13);
        assert!(
            records > capacity * 3 / 4 && records <= capacity,
            "{records} records logged, about {capacity} fit"
        );
        assert_eq!(meta.block_ref(0).unwrap(), Some(records as u32 + 1));
        meta.mark_flushed(meta.logged_seq());
        meta.apply_buffered().unwrap();
        assert_eq!(meta.unapplied(), 0);
        assert!(meta.write_buffered(&changes(records)).unwrap());
        // Too many changes for half the log: refused even when empty.
        let too_many: Vec<MetaOp> = (0..buffered_log::LOG_BYTES as u64 / 16)
            .map(|i| put_ref(i, 2))
            .collect();
        meta.mark_flushed(meta.logged_seq());
        meta.apply_buffered().unwrap();
        assert!(!meta.write_buffered(&too_many).unwrap());
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(0).unwrap(), Some(records as u32 + 2));
        assert_eq!(meta.block_ref(999).unwrap(), Some(records as u32 + 2));
    }
}
