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

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Direction, IteratorMode, Options};
use serde::{Deserialize, Serialize};

use super::buffered_log::BufferedLog;
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
/// Buffered changes (`write_buffered`) wait in the buffered-change log
/// (`buffered_log`) and in memory until `apply_buffered`; every other read
/// or write applies them first, so nothing sees RocksDB without them.
pub struct MetaStore {
    db: DB,
    buffered: Mutex<Buffered>,
    /// Held while buffered changes are applied.
    applying: Mutex<()>,
}

/// Changes logged but not in RocksDB yet.
struct Buffered {
    log: BufferedLog,
    /// In log order.
    ops: Vec<MetaOp>,
    /// Number of the last record logged.
    seq: u64,
    /// When the oldest change in `ops` was logged.
    since: Option<std::time::Instant>,
}

/// Changes per RocksDB batch when buffered changes are applied: a batch of
/// thousands is milliseconds of one core's work, and on a machine with few
/// cores the runtime thread waited behind it.
const APPLY_CHUNK: usize = 256;

/// RocksDB info logs (`LOG`, `LOG.old.*`) kept in the metadata directory.
const INFO_LOGS_KEPT: usize = 8;

impl MetaStore {
    /// Opens (creating if missing) the metadata database at `path`.
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
        // The buffered changes the last run logged and RocksDB does not
        // have (a SIGKILL before they were applied) go in first.
        let log = BufferedLog::open(path)?;
        let applied = read_mark(&db, BUFFERED_APPLIED_KEY)?;
        let (ops, last) = log.records(applied)?;
        let meta = MetaStore {
            db,
            buffered: Mutex::new(Buffered {
                log,
                ops: Vec::new(),
                seq: last,
                since: None,
            }),
            applying: Mutex::new(()),
        };
        if last > applied {
            tracing::info!(
                changes = ops.len(),
                records = last - applied,
                "buffered changes replayed from the log"
            );
            meta.write_batch(&ops, None, None, Some(last), false)?;
        }
        meta.lock_buffered().log.start()?;
        Ok(meta)
    }

    fn lock_buffered(&self) -> MutexGuard<'_, Buffered> {
        self.buffered.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs buffered changes: applied to RocksDB by the next
    /// `apply_buffered` or any other read or write. They survive a SIGKILL
    /// of the daemon, not a power loss (like an unsynced RocksDB batch).
    pub fn write_buffered(&self, ops: &[MetaOp]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let mut buffered = self.lock_buffered();
        let seq = buffered.seq + 1;
        if !buffered.log.append(seq, ops) {
            // The log is full: apply what it holds, which starts it over
            // (the committer is the one writer, and it is here).
            drop(buffered);
            self.apply_buffered()?;
            buffered = self.lock_buffered();
            if !buffered.log.append(seq, ops) {
                // Larger than the log: straight to RocksDB, behind the rest.
                drop(buffered);
                return self.write_batch(ops, None, None, None, false);
            }
        }
        buffered.seq = seq;
        buffered.ops.extend_from_slice(ops);
        buffered.since.get_or_insert_with(std::time::Instant::now);
        Ok(())
    }

    /// Whether buffered changes wait for `apply_buffered`.
    pub fn has_buffered(&self) -> bool {
        !self.lock_buffered().ops.is_empty()
    }

    /// How many buffered changes wait for `apply_buffered`, and since when
    /// the oldest of them does.
    pub fn buffered_waiting(&self) -> (usize, Option<std::time::Instant>) {
        let buffered = self.lock_buffered();
        (buffered.ops.len(), buffered.since)
    }

    /// Applies the buffered changes to RocksDB (unsynced batches of
    /// `APPLY_CHUNK` changes, the last one marking them applied:
    /// `write_in_chunks`). May run on another thread while more are
    /// logged: the changes are taken out
    /// under the lock, applied under `applying` (which every reader and
    /// writer of RocksDB waits for), and the log starts over once RocksDB
    /// has all it holds. So no change waits exactly when no application is
    /// running and the log was started over: an application that finds
    /// newer records behind its own leaves them waiting for the next one.
    ///
    /// The batch holds the changes coalesced (`coalesce`): the last one per
    /// key, in key order.
    pub fn apply_buffered(&self) -> Result<(), StoreError> {
        let _applying = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let (ops, seq) = {
            let mut buffered = self.lock_buffered();
            if buffered.ops.is_empty() {
                return Ok(());
            }
            buffered.since = None;
            (std::mem::take(&mut buffered.ops), buffered.seq)
        };
        let ops = if ops.len() > 1 { coalesce(ops) } else { ops };
        if let Err(e) = self.write_in_chunks(&ops, seq) {
            let mut buffered = self.lock_buffered();
            let newer = std::mem::replace(&mut buffered.ops, ops);
            buffered.ops.extend(newer);
            buffered.since.get_or_insert_with(std::time::Instant::now);
            return Err(e);
        }
        let mut buffered = self.lock_buffered();
        if buffered.seq == seq {
            buffered.log.restart();
        }
        Ok(())
    }

    /// Writes coalesced buffered changes (at least one: `apply_buffered`
    /// returns before when none wait) in batches of `APPLY_CHUNK`, the last
    /// one marking `seq` applied, yielding the CPU in between. A kill
    /// between two leaves the log to replay whole, which gives the same
    /// state (every change is a blind put or delete, replayed in order).
    /// Readers wait for all of them (`applying`).
    fn write_in_chunks(&self, ops: &[MetaOp], seq: u64) -> Result<(), StoreError> {
        let mut chunks = ops.chunks(APPLY_CHUNK).peekable();
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            self.write_batch(chunk, None, None, last.then_some(seq), false)?;
            if !last {
                std::thread::yield_now();
            }
        }
        Ok(())
    }

    /// Applies buffered changes before a read or another write.
    fn settle(&self) -> Result<(), StoreError> {
        self.apply_buffered()
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Corrupt(format!("column family {name} missing")))
    }

    /// Returns the superblock, if the store was formatted.
    pub fn superblock(&self) -> Result<Option<Superblock>, StoreError> {
        self.settle()?;
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
        self.settle()?;
        if count == 1 {
            // One block (a 4 KiB op): a point lookup is much cheaper than a
            // range scan.
            let value = self.db.get_cf(self.cf(CF_BLOCKS)?, block_key(key, first))?;
            return Ok(vec![value.map(|v| BlockEntry::decode(&v)).transpose()?]);
        }
        let mut out = vec![None; count as usize];
        let start = block_key(key, first);
        let end = block_key(key, first + count);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(end.to_vec());
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_BLOCKS)?,
            options,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            let (k, v) = item?;
            let (_, index) = decode_block_key(&k)?;
            let slot = index
                .checked_sub(first)
                .filter(|s| *s < count)
                .ok_or_else(|| StoreError::Corrupt(format!("block index {index} out of scan")))?;
            out[slot as usize] = Some(BlockEntry::decode(&v)?);
        }
        Ok(out)
    }

    /// Returns every block entry of an object, in block order.
    pub fn object_blocks(&self, key: &ObjectKey) -> Result<Vec<(u32, BlockEntry)>, StoreError> {
        self.settle()?;
        let prefix = object_key(key);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(prefix_end(&prefix));
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_BLOCKS)?,
            options,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            let (_, index) = decode_block_key(&k)?;
            out.push((index, BlockEntry::decode(&v)?));
        }
        Ok(out)
    }

    /// Returns an object's info, if it exists.
    pub fn object_info(&self, key: &ObjectKey) -> Result<Option<ObjectInfo>, StoreError> {
        self.settle()?;
        match self.db.get_cf(self.cf(CF_OBJECTS)?, object_key(key))? {
            None => Ok(None),
            Some(bytes) => ObjectInfo::decode(&bytes).map(Some),
        }
    }

    /// Returns every object of `pg` with its info, in key order.
    pub fn list_pg(&self, pg: PgId) -> Result<Vec<(ObjectKey, ObjectInfo)>, StoreError> {
        self.settle()?;
        let prefix = pg_prefix(pg);
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(prefix_end(&prefix));
        let iter = self.db.iterator_cf_opt(
            self.cf(CF_OBJECTS)?,
            options,
            IteratorMode::From(&prefix, Direction::Forward),
        );
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            out.push((decode_object_key(&k)?, ObjectInfo::decode(&v)?));
        }
        Ok(out)
    }

    /// Calls `visit` for every block entry of the store.
    pub fn for_each_block(
        &self,
        mut visit: impl FnMut(ObjectKey, u32, BlockEntry) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.settle()?;
        for item in self
            .db
            .iterator_cf(self.cf(CF_BLOCKS)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            let (object, index) = decode_block_key(&k)?;
            visit(object, index, BlockEntry::decode(&v)?)?;
        }
        Ok(())
    }

    /// Returns every object of the store.
    pub fn all_objects(&self) -> Result<Vec<(ObjectKey, ObjectInfo)>, StoreError> {
        self.settle()?;
        let mut out = Vec::new();
        for item in self
            .db
            .iterator_cf(self.cf(CF_OBJECTS)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            out.push((decode_object_key(&k)?, ObjectInfo::decode(&v)?));
        }
        Ok(out)
    }

    /// Returns the reference count of a shared disk block, if it is shared.
    pub fn block_ref(&self, disk_block: u64) -> Result<Option<u32>, StoreError> {
        self.settle()?;
        match self
            .db
            .get_cf(self.cf(CF_SNAP_REFS)?, disk_block.to_be_bytes())?
        {
            None => Ok(None),
            Some(bytes) => decode_ref(&bytes).map(Some),
        }
    }

    /// Calls `visit` for every shared disk block and its reference count.
    pub fn for_each_ref(
        &self,
        mut visit: impl FnMut(u64, u32) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.settle()?;
        for item in self
            .db
            .iterator_cf(self.cf(CF_SNAP_REFS)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            if k.len() != 8 {
                return Err(StoreError::Corrupt(format!("ref key of {} bytes", k.len())));
            }
            let mut disk = [0u8; 8];
            disk.copy_from_slice(&k);
            visit(u64::from_be_bytes(disk), decode_ref(&v)?)?;
        }
        Ok(())
    }

    /// Calls `visit` for every deferred write's key, first disk block and
    /// data, in key order.
    pub fn for_each_deferred(
        &self,
        mut visit: impl FnMut(u64, u64, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.settle()?;
        for item in self
            .db
            .iterator_cf(self.cf(CF_DEFERRED)?, IteratorMode::Start)
        {
            let (k, v) = item?;
            let key: [u8; 16] = k.as_ref().try_into().map_err(|_| {
                StoreError::Corrupt(format!("deferred write key of {} bytes", k.len()))
            })?;
            let (seq, disk) = key.split_at(8);
            let seq: [u8; 8] = seq.try_into().unwrap_or_default();
            let disk: [u8; 8] = disk.try_into().unwrap_or_default();
            visit(u64::from_be_bytes(seq), u64::from_be_bytes(disk), &v)?;
        }
        Ok(())
    }

    /// Writes a consistent copy of the database, as of now, to `path` (a
    /// RocksDB checkpoint: hard links and a flushed memtable).
    pub fn snapshot_to(&self, path: &Path) -> Result<(), StoreError> {
        self.settle()?;
        rocksdb::checkpoint::Checkpoint::new(&self.db)?.create_checkpoint(path)?;
        Ok(())
    }

    /// Returns the journal's (applied, lap) marks: 0 when never written.
    pub fn journal_marks(&self) -> Result<(u64, u64), StoreError> {
        self.settle()?;
        Ok((
            read_mark(&self.db, JOURNAL_APPLIED_KEY)?,
            read_mark(&self.db, JOURNAL_LAP_KEY)?,
        ))
    }

    /// Applies `ops` atomically; with `sync`, durably before returning.
    /// No ops with `sync` syncs the WAL (earlier unsynced batches).
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
fn op_target(op: &MetaOp) -> (u8, [u8; BLOCK_KEY_BYTES]) {
    let mut out = [0u8; BLOCK_KEY_BYTES];
    let family = match op {
        MetaOp::PutBlock { key, .. } | MetaOp::DeleteBlock { key } => {
            out.copy_from_slice(key);
            0
        }
        MetaOp::PutObject { key, .. } | MetaOp::DeleteObject { key } => {
            out[..OBJECT_KEY_BYTES].copy_from_slice(key);
            1
        }
        MetaOp::PutRef { disk_block, .. } | MetaOp::DeleteRef { disk_block } => {
            out[..8].copy_from_slice(&disk_block.to_be_bytes());
            2
        }
        MetaOp::PutDeferred {
            key, disk_block, ..
        }
        | MetaOp::DeleteDeferred { key, disk_block } => {
            out[..16].copy_from_slice(&deferred_key(*key, *disk_block));
            3
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

    #[test]
    fn buffered_changes_are_read_before_they_are_applied() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        meta.write_buffered(&[put_ref(7, 2)]).unwrap();
        assert!(meta.has_buffered());
        assert_eq!(meta.block_ref(7).unwrap(), Some(2));
        assert!(!meta.has_buffered(), "a read applies what waits");
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
            buffered.write_buffered(chunk).unwrap();
        }
        buffered.apply_buffered().unwrap();
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
        meta.write_buffered(&ops).unwrap();
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
        meta.write_buffered(&[put_ref(7, 2)]).unwrap();
        meta.write_buffered(&[put_ref(8, 3), put_ref(7, 4)])
            .unwrap();
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
        meta.write_buffered(&[put_ref(7, 2)]).unwrap();
        meta.apply_buffered().unwrap();
        // A later change that is not buffered, then one that is.
        meta.write(&[MetaOp::DeleteRef { disk_block: 7 }], false)
            .unwrap();
        meta.write_buffered(&[put_ref(9, 5)]).unwrap();
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
            meta.write_buffered(chunk).unwrap();
        }
        let applying = {
            let meta = meta.clone();
            std::thread::spawn(move || meta.apply_buffered().unwrap())
        };
        // Once the application has taken the changes, log one more.
        while meta.buffered_waiting().0 != 0 {
            std::thread::yield_now();
        }
        meta.write_buffered(&[put_ref(1_000_000, 7)]).unwrap();
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
        meta.write_buffered(&[put_ref(7, 2)]).unwrap();
        meta.apply_buffered().unwrap();
        meta.write_buffered(&[put_ref(8, 3)]).unwrap();
        drop(meta);
        buffered_log::forget_boot(dir.path()).unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(7).unwrap(), Some(2));
        assert_eq!(meta.block_ref(8).unwrap(), None);
        // The log works on for this boot.
        meta.write_buffered(&[put_ref(10, 2)]).unwrap();
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(10).unwrap(), Some(2));
    }

    #[test]
    fn a_full_log_is_applied_and_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let meta = MetaStore::open(dir.path()).unwrap();
        // About 13 bytes per change: enough records to fill the log twice.
        let per_record = 1_000;
        let records = 2 * buffered_log::LOG_BYTES / (per_record * 13) + 1;
        for record in 0..records as u64 {
            let ops: Vec<MetaOp> = (0..per_record as u64)
                .map(|i| put_ref(i, (record + 2) as u32))
                .collect();
            meta.write_buffered(&ops).unwrap();
        }
        drop(meta);
        let meta = MetaStore::open(dir.path()).unwrap();
        assert_eq!(meta.block_ref(0).unwrap(), Some(records as u32 + 1));
        assert_eq!(meta.block_ref(999).unwrap(), Some(records as u32 + 1));
    }
}
