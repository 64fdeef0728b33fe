//! `ObjectStore`: objects of up to `max_object_bytes` on one disk.
//!
//! # Write path (copy-on-write)
//! 1. Take the object's lock (striped) for writing.
//! 2. Allocate fresh blocks, compute each block's crc32c, write the data
//!    with O_DIRECT (several runs in parallel); a durable write of at most
//!    32 KiB on a store with a journal leaves its data to the committer.
//! 3. Hand the metadata change (new block entries, object version) to the
//!    committer, which groups concurrent changes. With a journal: one record
//!    written with RWF_DSYNC (changes and small writes' data, which goes to
//!    its blocks at the same time), then one unsynced RocksDB batch (see
//!    [`journal`](super::journal)). Without: one device flush for all their
//!    data, then one synced RocksDB batch.
//! 4. Free the blocks the object used before, only once the switch is
//!    durable (blocks written inline during the journal's current lap wait
//!    for its checkpoint).
//!
//! # Buffered changes
//! A change with `Durability::Buffered` (an NBD write without FUA) is
//! acknowledged once its data write completed and its metadata is in the
//! buffered-change log (`buffered_log`, a memory-mapped file): it survives
//! a crash of the daemon (the log is in the kernel's page cache, the data
//! went to the device with O_DIRECT), not a power loss. `flush` (NBD FLUSH)
//! makes every earlier change durable: one device flush, and the changes in
//! a journal record (or, without a journal, a synced RocksDB batch). The
//! committer also syncs on its own `BUFFERED_SYNC_AFTER` after the first
//! unsynced change, so the window is bounded even for a client that never
//! flushes.
//!
//! No change reaches RocksDB before a device flush covers the data it points
//! at (`MetaStore::mark_flushed`): RocksDB's WAL is written without a sync,
//! and the kernel may write it back at any time, so a change there ahead of
//! its data could outlive it in a power loss and leave the block reading as
//! a checksum error, neither old nor new. Logged changes wait in memory,
//! where readers find them, until the next sync's flush; the records of
//! the journal, written before their changes reach RocksDB, carry their
//! number into the log so that a replay knows which records RocksDB has.
//!
//! With a journal, while a client flushes (a FLUSH in the last
//! `EAGER_JOURNAL_AFTER_FLUSH`), a buffered write of at most 32 KiB goes out
//! like a small durable one, its record not flushed, when nothing but such
//! records is unsynced: the next FLUSH is then one device flush. While its
//! clients flush after about every write (`FlushPace`) and few writes are in
//! progress, such a write is made durable at once instead (its record
//! written with RWF_DSYNC), and the FLUSH that follows finds nothing to do.
//!
//! # Deferred writes
//! A buffered write of at most `DEFER_MAX_BYTES`, while fewer than
//! `StoreConfig::deferred_writes_in_flight` others are in flight and the
//! store is latency-bound (few writes in progress: see
//! `DEFER_WHILE_WRITES_AT_MOST`), is deferred (BlueStore's deferred
//! writes, without their sync): its data write to the fresh blocks starts,
//! and a copy of the data goes into the buffered-change log with its block
//! entries (`deferred` column family once applied to RocksDB; a store
//! without a journal puts both into an unsynced RocksDB batch). It is
//! acknowledged once logged, without waiting for the device: after a
//! SIGKILL the log (in the page cache) has the data, open replays it into
//! RocksDB and writes it in place again. The object stays locked until the
//! data lands, so nothing reads the blocks before. A sync first waits for
//! every data write begun (its flush then covers them), keeps deferred
//! copies out of its journal record and deletes those of the changes it
//! makes durable; as blocks a change gives up are freed only by a sync, no
//! copy is left when a block gets a new owner. A power loss before a sync
//! may lose it like any buffered change (the log is not replayed after a
//! reboot; what RocksDB got of it comes back as far as its unsynced WAL
//! does). A failed data write fails the store (the logged copy is written
//! again at the next open).
//!
//! Blocks a buffered change gives up stay allocated until a sync covers the
//! change: if the power went before, the old metadata (pointing at them)
//! comes back, and their contents must still be there.
//!
//! The only live copy of a block is never overwritten, so a crash at any
//! instant leaves every block wholly old or wholly new; metadata never
//! points at data that was not flushed first, so an acknowledged write is
//! never lost. The allocator is rebuilt from metadata at every open.
//!
//! # Read path
//! Block entries come from one RocksDB range scan, contiguous disk runs are
//! read with one I/O each, and every block is checked against its crc32c
//! before a byte is returned. Holes read as zeros.
//!
//! # Relocating scattered blocks
//! Copy-on-write scatters: each 4 KiB overwrite puts its block somewhere
//! else, and a 1 MiB read of data overwritten at random becomes up to 256
//! device reads. A large read that finds its blocks in short runs (fewer
//! than `RELOCATE_BLOCKS_PER_READ` per device read on average) queues the
//! range with the data it read; `relocate_scattered` (a background task of
//! the OSD) writes each queued range into one new run, under the object's
//! lock and only if its blocks are still the ones read, flushes it, and
//! commits the new block entries (same crcs, same version: nothing a
//! replica or a scrub compares changes) as a buffered change; the old
//! blocks are freed like an overwrite's. The data comes from the read,
//! checked against its crcs, so a relocation costs one sequential write
//! and a flush, and no read. The caller paces it
//! (`StoreConfig::relocate_bytes_per_sec`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_placement::PgId;
use basalt_wire::Durability;
use basalt_wire::crc::block_crcs;
use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use futures::future::join_all;
use tokio::sync::{RwLock, mpsc, oneshot};

use super::allocator::{Allocator, Run};
use super::buffer::{BLOCK_BYTES, IoBuf, LARGE_BUFFER_BYTES};
use super::device::BlockDevice;
use super::error::StoreError;
use super::journal::{self, INLINE_MAX_BYTES, MAX_RECORD_BYTES};
use super::keys::{BlockEntry, ObjectInfo, ObjectKey, block_key, object_key, stripe_of};
use super::map_cache::{BlockMap, MapCache};
use super::meta::{MetaOp, MetaStore, STORE_FORMAT_VERSION, Superblock};
use super::uring::{UringConfig, UringDevice};

/// Longest run of disk blocks one I/O covers (one large buffer).
const MAX_RUN_BLOCKS: u32 = (LARGE_BUFFER_BYTES / BLOCK_BYTES) as u32;
/// Object lock stripes: unrelated objects rarely share one.
const LOCK_STRIPES: usize = 4096;
/// Most metadata changes folded into one group commit.
const GROUP_COMMIT_MAX: usize = 512;
/// A buffered change is synced at the latest this long after it was applied.
const BUFFERED_SYNC_AFTER: Duration = Duration::from_secs(1);
/// Blocks given up by unsynced changes (held allocated until a sync) that
/// make the next group a synced one: 256 MiB.
const BUFFERED_FREE_MAX: usize = 65_536;
/// A small buffered write goes into the journal with its record (so a
/// later FLUSH is one device flush) while a client flushed within this long.
const EAGER_JOURNAL_AFTER_FLUSH: Duration = Duration::from_secs(2);
/// A small buffered write is made durable at once (its record written with
/// RWF_DSYNC, like a FUA write's) while the store's clients flush after
/// about every write: at most this many writes per flush on average, in
/// 256ths (1.5). See `FlushPace`.
const DURABLE_AT_WRITES_PER_FLUSH_256THS: u32 = 384;
/// ... and while at most this many writes are in progress on the store, now
/// and on a moving average (`InProgress::shallow`).
const EARLY_DURABLE_WHILE_WRITES_AT_MOST: usize = 2;
/// Largest buffered write that may be deferred (acknowledged once a copy of
/// its data is logged, before its write in place lands).
const DEFER_MAX_BYTES: usize = 32 << 10;
/// Default of `StoreConfig::deferred_writes_in_flight`. Deferring saves a
/// small write the device's latency and costs CPU (the data's copy into
/// the buffered log, then into RocksDB's WAL and memtable, and its
/// deletion at the next sync), so it is done only while the store is
/// latency-bound: while at most `DEFER_WHILE_WRITES_AT_MOST` writes are in
/// progress (a client at iodepth 1 or 2), never under load, where the CPU
/// is what bounds a client.
pub const DEFERRED_WRITES_IN_FLIGHT: usize = 4;
/// Default of `StoreConfig::defer_while_writes_at_most`: a small buffered
/// write is deferred while at most this many writes are in progress on the
/// store (itself included), now and on average over about the last eight
/// writes. The average keeps a loaded store from deferring in the moments
/// it happens to hold one or two writes: size-3 4 KiB writes at iodepth 32
/// leave each OSD about three in progress on average, often fewer.
pub const DEFER_WHILE_WRITES_AT_MOST: usize = 2;
/// Reads of at least this many present blocks (128 KiB) may find their
/// range scattered ("Relocating scattered blocks" above).
const RELOCATE_MIN_BLOCKS: usize = 32;
/// A range is scattered when it takes a device read per fewer than this
/// many blocks (64 KiB) on average.
const RELOCATE_BLOCKS_PER_READ: usize = 16;
/// Data of scattered ranges waiting for `relocate_scattered`, at most;
/// more are not queued.
const RELOCATE_QUEUE_MAX_BYTES: usize = 8 << 20;
/// Ranges relocated side by side: each ends with a device flush, and
/// flushes in flight together cost about one.
const RELOCATE_AT_ONCE: usize = 4;
/// Default of `StoreConfig::relocate_bytes_per_sec`. A relocation writes
/// what a read read, and a range that random writes keep scattering would
/// be rewritten after every large read of it (btrfs's autodefrag has the
/// same trap under databases): the pace bounds what relocation can take
/// from clients. 128 MiB/s rewrites a fragmented 1 GiB in 8 s of reads.
pub const RELOCATE_BYTES_PER_SEC: u64 = 128 << 20;

/// Settings of a store.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Largest object, in bytes (a multiple of 4 KiB). Default 4 MiB.
    pub max_object_bytes: u64,
    /// io_uring settings of the data device.
    pub uring: UringConfig,
    /// Objects whose block maps are kept in memory (`map_cache`): about
    /// 24 KiB each at 4 MiB objects. Default 1,024 (24 MiB, 4 GiB of data).
    pub map_cache_objects: usize,
    /// Deferred writes whose data may be still on its way to the device, at
    /// most (0: none are deferred). Past this many, small buffered writes
    /// wait for their data write like larger ones. Default
    /// `DEFERRED_WRITES_IN_FLIGHT`.
    pub deferred_writes_in_flight: usize,
    /// Writes in progress on the store (the deferring one included), now
    /// and on average lately, at most for a small buffered write to be
    /// deferred (`usize::MAX`: any number). Default
    /// `DEFER_WHILE_WRITES_AT_MOST`.
    pub defer_while_writes_at_most: usize,
    /// Pace of the relocation of ranges that large reads found scattered
    /// (`relocate_scattered`), in bytes a second; 0 turns it off (nothing
    /// is queued). The store only queues; its caller paces (the OSD
    /// daemon). Default `RELOCATE_BYTES_PER_SEC`.
    pub relocate_bytes_per_sec: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_object_bytes: 4 << 20,
            uring: UringConfig::default(),
            map_cache_objects: 1024,
            deferred_writes_in_flight: DEFERRED_WRITES_IN_FLIGHT,
            defer_while_writes_at_most: DEFER_WHILE_WRITES_AT_MOST,
            relocate_bytes_per_sec: RELOCATE_BYTES_PER_SEC,
        }
    }
}

/// Where a write's new blocks go on disk. Random small overwrites free
/// single blocks all over the disk; filling those (`Fill`) keeps the large
/// holes whole for large writes. A writer going through an object in order
/// gets its writes one after the other on disk instead (`NewRun` from a
/// large hole at the object's start, then `After` its previous block while
/// the blocks there are free), so a large read of what it wrote is one I/O
/// even while random writes go on beside it.
#[derive(Clone, Copy, Debug)]
enum Placement {
    Fill,
    NewRun,
    /// Right after this disk block (the object's block before the write's).
    After(u64),
}

/// What `stat` reports about an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectStat {
    pub version: u64,
    pub allocated_blocks: u64,
}

/// What `fsck` found.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    pub objects: u64,
    pub blocks: u64,
    pub free_blocks: u64,
    pub block_count: u64,
    pub errors: Vec<String>,
}

impl FsckReport {
    pub fn is_clean(&self) -> bool {
        self.errors.is_empty()
    }
}

struct Commit {
    ops: Vec<MetaOp>,
    /// The change points at data written since the last device flush.
    needs_flush: bool,
    durability: Durability,
    /// Disk blocks the change gives up: freed once it is durable.
    free: Vec<u64>,
    /// Data the committer writes to these (first) disk blocks, into the
    /// journal record too (a small durable write; see `journal`).
    inline: Vec<(u64, IoBuf)>,
    /// End the journal's lap: flush, sync RocksDB, release held blocks.
    checkpoint: bool,
    done: oneshot::Sender<Result<Option<HomeLanding>, String>>,
}

/// Ends when the data of a group's small writes, sent out with their
/// journal record, is in place (`Committer::write_home_behind`): their
/// objects stay locked until then.
type HomeLanding = futures::future::Shared<oneshot::Receiver<()>>;

/// What giving up a change's old blocks takes: reference-count updates to
/// commit with the change, then blocks to unshare and to free.
struct Release<'a> {
    ops: Vec<MetaOp>,
    free: Vec<u64>,
    unshare: Vec<u64>,
    _refs: Option<tokio::sync::MutexGuard<'a, ()>>,
}

struct Inner<D> {
    device: Arc<D>,
    meta: Arc<MetaStore>,
    allocator: Arc<Mutex<Allocator>>,
    locks: Vec<Arc<RwLock<()>>>,
    /// Deferred writes whose data write may not have landed yet.
    landings: Arc<Landings>,
    /// Writes between their start and their answer (`write_inner`): the
    /// depth deferring looks at (`StoreConfig::defer_while_writes_at_most`).
    write_depth: WriteDepth,
    /// Writes deferred since open.
    deferred_writes: std::sync::atomic::AtomicU64,
    /// How many writes clients make between their flushes.
    flush_pace: FlushPace,
    /// Buffered writes made durable at once since open (`FlushPace`).
    early_durable_writes: std::sync::atomic::AtomicU64,
    /// Serialises changes to shared blocks' reference counts, from reading
    /// a count to committing the new one.
    refs_lock: tokio::sync::Mutex<()>,
    commits: mpsc::UnboundedSender<Commit>,
    failed: Arc<AtomicBool>,
    /// Skip the device flush: the metadata sync's flush covers the data.
    data_flush_in_metadata_sync: Arc<AtomicBool>,
    /// Blocks of the metadata journal at the start of the device (0: none).
    journal_blocks: u64,
    /// Journal checkpoints (laps ended) since open.
    checkpoints: Arc<std::sync::atomic::AtomicU64>,
    /// Block maps of recently used objects.
    maps: MapCache,
    /// When a client last asked for a flush: milliseconds since `opened`,
    /// plus one (0: never).
    flushed_at: std::sync::atomic::AtomicU64,
    opened: Instant,
    /// Ranges large reads found scattered, oldest first.
    scattered: Mutex<Vec<Scattered>>,
    scattered_ready: tokio::sync::Notify,
    /// Blocks `relocate_scattered` moved since open.
    relocated_blocks: std::sync::atomic::AtomicU64,
    config: StoreConfig,
}

/// A range a large read found scattered, with what it read: the entries
/// (to tell whether the range changed since) and the data (checked).
struct Scattered {
    key: ObjectKey,
    first: u32,
    entries: Vec<Option<BlockEntry>>,
    data: Bytes,
}

/// The object store of one OSD.
pub struct ObjectStore<D: BlockDevice> {
    inner: Arc<Inner<D>>,
    committer: tokio::task::JoinHandle<()>,
}

/// Paths of a store directory: the data file and the metadata database.
pub fn store_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("block"), dir.join("meta"))
}

impl ObjectStore<UringDevice> {
    /// Creates `dir` with a data file of `size_bytes` (rounded down to whole
    /// blocks) and formats it. With `prezero`, the file is written with zeros
    /// so later writes are pure overwrites (no extent conversion on flush).
    pub fn format_dir(dir: &Path, size_bytes: u64, prezero: bool) -> Result<(), StoreError> {
        let io = |op| move |source| StoreError::Io { op, source };
        std::fs::create_dir_all(dir).map_err(io("create store directory"))?;
        let (data_path, meta_path) = store_paths(dir);
        if data_path.exists() {
            if meta_path.exists() {
                return Err(StoreError::Corrupt(format!(
                    "{} already exists; refusing to format over it",
                    data_path.display()
                )));
            }
            // A format that stopped before its metadata was written (a
            // crash or SIGTERM while zeroing): no store ever opened on this
            // file, so it holds nothing to keep.
            tracing::warn!(
                path = %data_path.display(),
                "data file without metadata: an interrupted format; formatting again"
            );
        }
        let size = size_bytes - size_bytes % BLOCK_BYTES as u64;
        if size < 64 * BLOCK_BYTES as u64 {
            return Err(StoreError::NoSpace {
                needed: 64,
                free: size / BLOCK_BYTES as u64,
            });
        }
        let file = std::fs::File::create(&data_path).map_err(io("create data file"))?;
        let block_count = size / BLOCK_BYTES as u64;
        let journal_blocks = journal::default_journal_blocks(block_count);
        if prezero {
            write_zeros(&file, size).map_err(io("zero data file"))?;
        } else {
            file.set_len(size).map_err(io("size data file"))?;
            // The journal is rewritten all the time: written extents make
            // each record one data write and a flush, with no extent
            // conversion to commit.
            write_zeros(&file, journal_blocks * BLOCK_BYTES as u64).map_err(io("zero journal"))?;
        }
        file.sync_all().map_err(io("sync data file"))?;
        let meta = MetaStore::open(&meta_path)?;
        meta.put_superblock(&Superblock {
            format_version: STORE_FORMAT_VERSION,
            block_bytes: BLOCK_BYTES as u32,
            block_count,
            prezeroed: prezero,
            journal_blocks,
            journal_nonce: rand::random::<u64>(),
        })?;
        Ok(())
    }

    /// Opens the formatted store in `dir` on io_uring.
    pub async fn open_dir(dir: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        let (data_path, meta_path) = store_paths(dir);
        if !meta_path.exists() {
            return Err(StoreError::NotFormatted(dir.to_path_buf()));
        }
        let device =
            UringDevice::open(&data_path, &config.uring).map_err(|source| StoreError::Io {
                op: "open data device",
                source,
            })?;
        let store = Self::open(device, &meta_path, config).await?;
        // When the data file was written in full and the metadata lives on
        // the same block device, the synced metadata commit's flush (the
        // RocksDB WAL fsync flushes the device cache) also makes the group's
        // data durable: its O_DIRECT writes completed before the commit was
        // issued and changed no file-system metadata. One flush per group
        // instead of two.
        let same_device = {
            use std::os::unix::fs::MetadataExt;
            let data = std::fs::metadata(&data_path).map(|m| m.dev());
            let meta = std::fs::metadata(&meta_path).map(|m| m.dev());
            matches!((data, meta), (Ok(a), Ok(b)) if a == b)
        };
        let prezeroed = store.inner.meta.superblock()?.is_some_and(|s| s.prezeroed);
        if same_device && prezeroed {
            store
                .inner
                .data_flush_in_metadata_sync
                .store(true, Ordering::Release);
        }
        tracing::debug!(same_device, prezeroed, "store flush policy chosen");
        Ok(store)
    }
}

impl<D: BlockDevice> ObjectStore<D> {
    /// Opens a store on `device` with metadata at `meta_path`, formatting it
    /// if the metadata has no superblock yet. Rebuilds the allocator.
    pub async fn open(
        device: D,
        meta_path: &Path,
        config: StoreConfig,
    ) -> Result<Self, StoreError> {
        if config.max_object_bytes == 0
            || !config.max_object_bytes.is_multiple_of(BLOCK_BYTES as u64)
        {
            return Err(StoreError::Corrupt(format!(
                "max_object_bytes {} is not a positive multiple of 4096",
                config.max_object_bytes
            )));
        }
        let meta = MetaStore::open(meta_path)?;
        let superblock = match meta.superblock()? {
            Some(superblock) => superblock,
            None => {
                let superblock = Superblock {
                    format_version: STORE_FORMAT_VERSION,
                    block_bytes: BLOCK_BYTES as u32,
                    block_count: device.block_count(),
                    prezeroed: false,
                    journal_blocks: journal::default_journal_blocks(device.block_count()),
                    journal_nonce: rand::random::<u64>(),
                };
                meta.put_superblock(&superblock)?;
                superblock
            }
        };
        if superblock.format_version != STORE_FORMAT_VERSION
            || superblock.block_bytes != BLOCK_BYTES as u32
        {
            return Err(StoreError::Corrupt(format!(
                "unsupported store format {superblock:?}"
            )));
        }
        if superblock.block_count > device.block_count() {
            return Err(StoreError::Corrupt(format!(
                "store has {} blocks but the device only {}",
                superblock.block_count,
                device.block_count()
            )));
        }
        if superblock.journal_blocks >= superblock.block_count {
            return Err(StoreError::Corrupt(format!(
                "journal of {} blocks on a store of {}",
                superblock.journal_blocks, superblock.block_count
            )));
        }
        // What the last run left: journal records' inline data and deferred
        // writes' copies written in place again, the records' changes
        // logged behind the ones the buffered-change log kept (readers find
        // them all); then one device flush covers all of it, and only then
        // does RocksDB get the changes.
        let next_seq = replay_journal(&device, &meta, &superblock).await?;
        let replayed_deferred = replay_deferred(&device, &meta, &superblock).await?;
        let logged = meta.logged_seq();
        device.flush().await.map_err(|source| StoreError::Io {
            op: "flush data device at open",
            source,
        })?;
        meta.mark_flushed(logged);
        meta.apply_buffered()?;
        let mut allocator = Allocator::new(superblock.block_count);
        allocator.reserve_prefix(superblock.journal_blocks);
        meta.for_each_ref(|disk_block, _| {
            allocator.set_shared(disk_block, true);
            Ok(())
        })?;
        meta.for_each_block(|object, index, entry| {
            if allocator.mark_used(entry.disk_block) || allocator.is_shared(entry.disk_block) {
                Ok(())
            } else {
                Err(StoreError::Corrupt(format!(
                    "disk block {} of {object} block {index} is referenced twice (unshared), in the journal or out of range",
                    entry.disk_block
                )))
            }
        })?;
        tracing::debug!(
            used = superblock.block_count - allocator.free_count(),
            free = allocator.free_count(),
            "store allocator rebuilt"
        );
        // The flush above made the previous run's buffered writes durable
        // (a client's next FLUSH would no longer know about them); the
        // synced batch below ends the journal's lap.
        let journal = (superblock.journal_blocks > 0).then(|| JournalState {
            blocks: superblock.journal_blocks,
            nonce: superblock.journal_nonce,
            next_block: 0,
            next_seq,
            lap_inline: std::collections::HashSet::new(),
        });
        meta.write_marked(
            &replayed_deferred,
            None,
            journal.as_ref().map(|j| j.next_seq),
            true,
        )?;
        let device = Arc::new(device);
        let meta = Arc::new(meta);
        let allocator = Arc::new(Mutex::new(allocator));
        let failed = Arc::new(AtomicBool::new(false));
        let skip_flush = Arc::new(AtomicBool::new(false));
        let checkpoints = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (commits, rx) = mpsc::unbounded_channel();
        let landings = Arc::new(Landings::default());
        let committer = tokio::spawn(
            Committer {
                landings: landings.clone(),
                device: device.clone(),
                meta: meta.clone(),
                allocator: allocator.clone(),
                failed: failed.clone(),
                skip_flush: skip_flush.clone(),
                unsynced: Unsynced::default(),
                journal,
                checkpoints: checkpoints.clone(),
                applying: None,
                home: None,
            }
            .run(rx),
        );
        Ok(ObjectStore {
            inner: Arc::new(Inner {
                device,
                meta,
                allocator,
                locks: (0..LOCK_STRIPES)
                    .map(|_| Arc::new(RwLock::new(())))
                    .collect(),
                landings,
                write_depth: WriteDepth::default(),
                deferred_writes: std::sync::atomic::AtomicU64::new(0),
                flush_pace: FlushPace::new(),
                early_durable_writes: std::sync::atomic::AtomicU64::new(0),
                refs_lock: tokio::sync::Mutex::new(()),
                commits,
                failed,
                data_flush_in_metadata_sync: skip_flush,
                journal_blocks: superblock.journal_blocks,
                checkpoints,
                maps: MapCache::new(config.map_cache_objects),
                flushed_at: std::sync::atomic::AtomicU64::new(0),
                opened: Instant::now(),
                scattered: Mutex::new(Vec::new()),
                scattered_ready: tokio::sync::Notify::new(),
                relocated_blocks: std::sync::atomic::AtomicU64::new(0),
                config,
            }),
            committer,
        })
    }

    /// Stops the committer and releases the device and metadata, so the
    /// store can be opened again at once.
    pub async fn close(self) {
        let ObjectStore { inner, committer } = self;
        drop(inner);
        let _ = committer.await;
    }

    /// Stops the store as a SIGKILL stops its daemon: the committer is cut
    /// off where it is, nothing more is synced, flushed or checkpointed.
    /// What the next open recovers is what a restart after a kill would.
    /// For tests.
    pub async fn kill(self) {
        let ObjectStore { inner, committer } = self;
        committer.abort();
        let _ = committer.await;
        // Deferred data writes hold the store open until they end.
        inner.landings.wait_begun().await;
        // So do other holders of the store, and buffered changes being
        // applied on a blocking thread hold the metadata open.
        while Arc::strong_count(&inner) > 1 || Arc::strong_count(&inner.meta) > 1 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        drop(inner);
    }

    /// Small buffered writes deferred since open (acknowledged before
    /// their data write landed).
    pub fn deferred_writes(&self) -> u64 {
        self.inner.deferred_writes.load(Ordering::Relaxed)
    }

    /// Small buffered writes made durable at once since open, their
    /// clients flushing after about every write (`FlushPace`).
    pub fn early_durable_writes(&self) -> u64 {
        self.inner.early_durable_writes.load(Ordering::Relaxed)
    }

    /// Deferred writes whose copy of the data waits (logged or in RocksDB)
    /// for the next sync to delete it.
    pub fn deferred_copies(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        self.inner.meta.for_each_deferred(|_, _, _| {
            count += 1;
            Ok(())
        })?;
        Ok(count)
    }

    /// Returns whether a group commit skips the separate data flush because
    /// the metadata sync covers it (prezeroed data file on the metadata's
    /// device).
    pub fn data_flush_in_metadata_sync(&self) -> bool {
        self.inner
            .data_flush_in_metadata_sync
            .load(Ordering::Acquire)
    }

    /// Returns the device.
    pub fn device(&self) -> &D {
        &self.inner.device
    }

    /// Returns (free, total) blocks. Blocks held until the journal's next
    /// checkpoint count as free: a write that needs them gets them.
    pub fn space(&self) -> (u64, u64) {
        let allocator = self.allocator();
        (
            allocator.free_count() + allocator.held_count(),
            allocator.block_count(),
        )
    }

    /// Metadata changes logged and not yet in RocksDB (waiting for a flush
    /// to cover their data, or for their application after it).
    pub fn buffered_waiting(&self) -> usize {
        self.inner.meta.unapplied()
    }

    /// Returns the number of blocks of the metadata journal (0: none).
    pub fn journal_blocks(&self) -> u64 {
        self.inner.journal_blocks
    }

    /// Returns how many journal checkpoints (synced RocksDB commits that end
    /// a lap) ran since open.
    pub fn journal_checkpoints(&self) -> u64 {
        self.inner.checkpoints.load(Ordering::Acquire)
    }

    /// Copies the metadata database, as of now, to `path`. Between two
    /// journal checkpoints this is a state a power loss could leave it in
    /// (its writes since the last checkpoint were not synced), which is how
    /// tests roll it back.
    pub fn snapshot_metadata(&self, path: &Path) -> Result<(), StoreError> {
        self.inner.meta.snapshot_to(path)
    }

    fn allocator(&self) -> std::sync::MutexGuard<'_, Allocator> {
        self.inner
            .allocator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn stripe(&self, key: &ObjectKey) -> usize {
        stripe_of(key, LOCK_STRIPES)
    }

    fn lock(&self, key: &ObjectKey) -> &RwLock<()> {
        &self.inner.locks[self.stripe(key)]
    }

    /// Entries of blocks `first .. first + count` of an object, `None` for
    /// holes, from the map cache (loading the object's map on a miss). The
    /// caller holds the object's lock.
    fn entries(
        &self,
        key: &ObjectKey,
        first: u32,
        count: u32,
    ) -> Result<Vec<Option<BlockEntry>>, StoreError> {
        if let Some(entries) = self.inner.maps.get(key, first, count) {
            return Ok(entries);
        }
        if !self.inner.maps.admit(key) {
            return self.inner.meta.blocks(key, first, count);
        }
        let blocks = (self.inner.config.max_object_bytes / BLOCK_BYTES as u64) as usize;
        let mut map = BlockMap {
            version: self.inner.meta.object_info(key)?.map(|info| info.version),
            blocks: vec![None; blocks],
            next: None,
        };
        for (index, entry) in self.inner.meta.object_blocks(key)? {
            // Blocks past today's largest object (a smaller
            // `max_object_bytes` than when written) are out of every range
            // a request may name; fsck still sees them.
            if let Some(slot) = map.blocks.get_mut(index as usize) {
                *slot = Some(entry);
            }
        }
        let (start, end) = (first as usize, first as usize + count as usize);
        let out = map
            .blocks
            .get(start..end)
            .ok_or_else(|| StoreError::Corrupt(format!("{key}: blocks {start}..{end} out of map")))?
            .to_vec();
        self.inner.maps.insert(key, map);
        Ok(out)
    }

    /// Runs `commit`, a change to `key` that does not update its cached
    /// map, with that map dropped before the commit is sent (a caller
    /// cancelled while it waits must leave no map behind) and again after.
    async fn without_map<T>(&self, key: &ObjectKey, commit: impl Future<Output = T>) -> T {
        self.inner.maps.invalidate(key);
        let result = commit.await;
        self.inner.maps.invalidate(key);
        result
    }

    fn check_range(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<(), StoreError> {
        let block = BLOCK_BYTES as u64;
        if len == 0 || !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(StoreError::InvalidAlignment {
                object: *key,
                offset,
                len,
            });
        }
        let max = self.inner.config.max_object_bytes;
        if offset.checked_add(len).is_none_or(|end| end > max) {
            return Err(StoreError::InvalidRange {
                object: *key,
                offset,
                len,
                max,
            });
        }
        Ok(())
    }

    fn check_failed(&self) -> Result<(), StoreError> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(StoreError::Failed(
                "an earlier flush or commit failed".into(),
            ));
        }
        Ok(())
    }

    async fn commit(
        &self,
        ops: Vec<MetaOp>,
        needs_flush: bool,
        durability: Durability,
        free: Vec<u64>,
    ) -> Result<(), StoreError> {
        self.send_commit(ops, needs_flush, durability, free, Vec::new(), false)
            .await
            .map(drop)
    }

    async fn send_commit(
        &self,
        ops: Vec<MetaOp>,
        needs_flush: bool,
        durability: Durability,
        free: Vec<u64>,
        inline: Vec<(u64, IoBuf)>,
        checkpoint: bool,
    ) -> Result<Option<HomeLanding>, StoreError> {
        let (done, wait) = oneshot::channel();
        self.inner
            .commits
            .send(Commit {
                ops,
                needs_flush,
                durability,
                free,
                inline,
                checkpoint,
                done,
            })
            .map_err(|_| StoreError::Failed("committer stopped".into()))?;
        match wait.await {
            Ok(Ok(home)) => Ok(home),
            Ok(Err(message)) => Err(StoreError::Failed(message)),
            Err(_) => Err(StoreError::Failed("committer stopped".into())),
        }
    }

    /// Makes every change acknowledged so far durable (NBD FLUSH): one device
    /// flush, with a journal record before it when some buffered change is
    /// not in the journal yet (a metadata sync without a journal); nothing
    /// when no buffered change waits.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        let now = self.inner.opened.elapsed().as_millis() as u64 + 1;
        self.inner.flushed_at.store(now, Ordering::Relaxed);
        self.inner.flush_pace.flushed();
        self.sync().await
    }

    /// Makes every change acknowledged so far durable, without counting as
    /// a client's flush (`flush` does).
    async fn sync(&self) -> Result<(), StoreError> {
        self.commit(Vec::new(), false, Durability::Durable, Vec::new())
            .await
    }

    /// `flush`, and ends the journal's lap: blocks held until then come
    /// free.
    pub async fn flush_and_release(&self) -> Result<(), StoreError> {
        self.check_failed()?;
        self.send_commit(
            Vec::new(),
            false,
            Durability::Durable,
            Vec::new(),
            Vec::new(),
            true,
        )
        .await
        .map(drop)
    }

    /// Writes `data` at byte `offset` of an object (both 4 KiB-aligned) and
    /// sets the object's version. Returns once data and metadata are durable.
    pub async fn write(
        &self,
        key: &ObjectKey,
        offset: u64,
        data: &[u8],
        version: u64,
    ) -> Result<(), StoreError> {
        self.write_with(key, offset, data, version, Durability::Durable)
            .await
    }

    /// `write`, acknowledged as `durability` says.
    pub async fn write_with(
        &self,
        key: &ObjectKey,
        offset: u64,
        data: &[u8],
        version: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.write_inner(key, offset, data, None, None, version, durability)
            .await
    }

    /// `write_with` for data held in `Bytes`: written to the device straight
    /// from them when they are block-aligned in memory (`IoBuf::shared`; the
    /// frame decoder and the NBD gateway place large payloads so), copied
    /// into aligned buffers otherwise. `crcs` are the crc32c of each block
    /// when the caller has them (hashed once on arrival:
    /// `basalt_wire::crc`); they are what the block map records, so they
    /// must be the data's. Without them, or with a wrong count, the store
    /// hashes the data itself.
    pub async fn write_bytes_with(
        &self,
        key: &ObjectKey,
        offset: u64,
        data: &Bytes,
        crcs: Option<&[u32]>,
        version: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.write_inner(key, offset, data, Some(data), crcs, version, durability)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn write_inner(
        &self,
        key: &ObjectKey,
        offset: u64,
        data: &[u8],
        shared: Option<&Bytes>,
        crcs: Option<&[u32]>,
        version: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.check_range(key, offset, data.len() as u64)?;
        self.check_failed()?;
        let in_progress = self.inner.write_depth.enter();
        let since_flush = self.inner.flush_pace.wrote();
        // A client that flushes after each write waits for that flush
        // anyway: a record written durably now (one RWF_DSYNC write) makes
        // the flush a no-op, where a plain record and then the flush took
        // two device round trips and two wake-ups of this thread (homed
        // size-1 QD1 write + flush: see `FlushPace`).
        let durability = if durability == Durability::Buffered
            && self.inner.journal_blocks > 0
            && data.len() <= INLINE_MAX_BYTES
            && self.client_flushes()
            && self.inner.flush_pace.after_each_write(since_flush)
            && in_progress.shallow(EARLY_DURABLE_WHILE_WRITES_AT_MOST)
        {
            self.inner
                .early_durable_writes
                .fetch_add(1, Ordering::Relaxed);
            Durability::Durable
        } else {
            durability
        };
        let guard = self.inner.locks[self.stripe(key)]
            .clone()
            .write_owned()
            .await;
        let first = (offset / BLOCK_BYTES as u64) as u32;
        let count = (data.len() / BLOCK_BYTES) as u32;
        // A write at an object's start, or one that continues its last
        // write (its map cached), goes where a run can grow (`allocate`).
        let placement = match self.inner.maps.stream_after(key, first) {
            Some(previous) => Placement::After(previous),
            None if first == 0 => Placement::NewRun,
            None => Placement::Fill,
        };
        let runs = self.allocate_or_flush(count as u64, placement).await?;

        let crcs: std::borrow::Cow<'_, [u32]> = match crcs {
            Some(crcs) if crcs.len() == count as usize => {
                debug_assert!(
                    block_crcs(data) == crcs,
                    "block crcs given with a write are not its data's"
                );
                crcs.into()
            }
            _ => block_crcs(data).into(),
        };
        // A small durable write goes out with its journal record, from the
        // committer: one device round trip instead of two. So does a small
        // buffered one while the client flushes: its record is written
        // then (not flushed), and the FLUSH is a device flush alone.
        let inline = self.inner.journal_blocks > 0
            && data.len() <= INLINE_MAX_BYTES
            && (durability == Durability::Durable || self.client_flushes());
        let mut buffers = Vec::with_capacity(runs.len());
        let mut data_offset = 0;
        for run in &runs {
            let len = run.len as usize * BLOCK_BYTES;
            let range = data_offset..data_offset + len;
            let buf = match shared.and_then(|bytes| IoBuf::shared(bytes.slice(range.clone()))) {
                Some(buf) => buf,
                None => {
                    let buf = buffer_with(&self.inner.device, &data[range]);
                    debug_assert_eq!(
                        crc32c::crc32c(&buf[..BLOCK_BYTES]),
                        crcs[data_offset / BLOCK_BYTES],
                        "buffer copy changed the data"
                    );
                    buf
                }
            };
            data_offset += len;
            buffers.push((run.start, buf));
        }
        // A small buffered write on a latency-bound store is deferred: a
        // copy of its data is logged with its block entries while it is
        // written in place, and it is acknowledged once logged, not when
        // the device answers (see "Deferred writes" above).
        let defer = !inline
            && durability == Durability::Buffered
            && data.len() <= DEFER_MAX_BYTES
            && in_progress.shallow(self.inner.config.defer_while_writes_at_most)
            && self.inner.landings.in_flight() < self.inner.config.deferred_writes_in_flight;
        let mut deferred = Vec::new();
        let mut landing = None;
        if defer {
            self.inner.deferred_writes.fetch_add(1, Ordering::Relaxed);
            let landed = Landings::begin(&self.inner.landings);
            let mut at = 0;
            for (run, (start, buf)) in buffers.iter().enumerate() {
                let range = at..at + buf.len();
                at = range.end;
                deferred.push(MetaOp::PutDeferred {
                    // At most 8 runs (32 KiB): 4 bits.
                    key: landed.seq << 4 | run as u64,
                    disk_block: *start,
                    data: match shared {
                        Some(bytes) => bytes.slice(range),
                        None => Bytes::copy_from_slice(&data[range]),
                    },
                });
            }
            let (device, failed) = (self.inner.device.clone(), self.inner.failed.clone());
            let writes = std::mem::take(&mut buffers);
            // The write ends its landing itself: a sync waits for it, and
            // that sync may be the one this write's commit is in.
            landing = Some(tokio::spawn(async move {
                let writes = writes
                    .into_iter()
                    .map(|(start, buf)| device.write(start, buf));
                let error = join_all(writes)
                    .await
                    .into_iter()
                    .find_map(|(_, result)| result.err());
                if let Some(error) = &error {
                    // The data was acknowledged; only the logged copy
                    // (written in place again at the next open) holds it.
                    tracing::error!("deferred data write failed, refusing further writes: {error}");
                    failed.store(true, Ordering::Release);
                }
                drop(landed);
            }));
        } else if !inline {
            let writes = buffers
                .drain(..)
                .map(|(start, buf)| self.inner.device.write(start, buf));
            let results = join_all(writes).await;
            if let Some(source) = results.into_iter().find_map(|(_, r)| r.err()) {
                self.allocator().free_runs(&runs);
                return Err(StoreError::Io {
                    op: "write data",
                    source,
                });
            }
        }

        let old = match self.entries(key, first, count) {
            Ok(old) => old,
            Err(e) => {
                land(landing, None).await;
                self.allocator().free_runs(&runs);
                return Err(e);
            }
        };
        let mut ops = Vec::with_capacity(count as usize + 1);
        let mut new_entries = Vec::with_capacity(count as usize);
        let mut index = first;
        let mut crc_iter = crcs.iter();
        for run in &runs {
            for disk_block in run.start..run.start + run.len as u64 {
                let crc = *crc_iter.next().expect("one crc per allocated block");
                let entry = BlockEntry { disk_block, crc };
                ops.push(MetaOp::PutBlock {
                    key: block_key(key, index),
                    entry,
                });
                new_entries.push(entry);
                index += 1;
            }
        }
        ops.push(MetaOp::PutObject {
            key: object_key(key),
            info: ObjectInfo { version },
        });
        ops.extend(deferred);
        let release = match self
            .release(old.into_iter().flatten().map(|e| e.disk_block).collect())
            .await
        {
            Ok(release) => release,
            Err(e) => {
                land(landing, None).await;
                self.allocator().free_runs(&runs);
                return Err(e);
            }
        };
        // On failure whether the batch reached RocksDB is unknown: keep the
        // new blocks allocated (the store is failed; a restart rebuilds).
        let map = self.inner.maps.take(key);
        let result = self
            .commit_release(ops, !inline, durability, release, buffers)
            .await;
        if let (Ok(_), Some(map)) = (&result, map) {
            self.inner
                .maps
                .put_back(key, map, first, &new_entries, version);
        }
        // The object stays locked until its data is in place: a read must
        // not find the new blocks before they hold it.
        if landing.is_some() {
            tokio::spawn(land(landing, Some(guard)));
        } else if let Ok(Some(home)) = &result {
            tokio::spawn(land(Some(home.clone()), Some(guard)));
        }
        result.map(drop)
    }

    /// Whether a client asked for a flush lately (see
    /// `EAGER_JOURNAL_AFTER_FLUSH`).
    fn client_flushes(&self) -> bool {
        let at = self.inner.flushed_at.load(Ordering::Relaxed);
        at != 0
            && (self.inner.opened.elapsed().as_millis() as u64 + 1).saturating_sub(at)
                < EAGER_JOURNAL_AFTER_FLUSH.as_millis() as u64
    }

    /// Plans giving up `disk_blocks` (old blocks of a change): exclusive ones
    /// are freed after the commit; shared ones lose one reference in the same
    /// commit. The caller holds the object's lock, so an exclusive block
    /// cannot become shared meanwhile.
    async fn release(&self, disk_blocks: Vec<u64>) -> Result<Release<'_>, StoreError> {
        let partition = |disk_blocks: Vec<u64>| -> (Vec<u64>, Vec<u64>) {
            let allocator = self.allocator();
            disk_blocks
                .into_iter()
                .partition(|b| allocator.is_shared(*b))
        };
        let (shared, free) = partition(disk_blocks);
        if shared.is_empty() {
            return Ok(Release {
                ops: Vec::new(),
                free,
                unshare: Vec::new(),
                _refs: None,
            });
        }
        let refs = self.inner.refs_lock.lock().await;
        // Tell shared from exclusive again under the lock: another object
        // sharing a block may have dropped its reference (and unshared the
        // block) while we waited.
        let (shared, now_exclusive) = partition(shared);
        let mut release = Release {
            ops: Vec::new(),
            free: free.into_iter().chain(now_exclusive).collect(),
            unshare: Vec::new(),
            _refs: Some(refs),
        };
        for disk_block in shared {
            let count = self.inner.meta.block_ref(disk_block)?.ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "shared disk block {disk_block} has no reference count"
                ))
            })?;
            if count > 2 {
                release.ops.push(MetaOp::PutRef {
                    disk_block,
                    count: count - 1,
                });
            } else {
                release.ops.push(MetaOp::DeleteRef { disk_block });
                release.unshare.push(disk_block);
            }
        }
        Ok(release)
    }

    /// Commits `ops` with `release`'s reference-count changes; its
    /// exclusive blocks are freed once the commit is durable.
    async fn commit_release(
        &self,
        mut ops: Vec<MetaOp>,
        needs_flush: bool,
        durability: Durability,
        release: Release<'_>,
        inline: Vec<(u64, IoBuf)>,
    ) -> Result<Option<HomeLanding>, StoreError> {
        let Release {
            ops: ref_ops,
            free,
            unshare,
            _refs,
        } = release;
        ops.extend(ref_ops);
        let home = self
            .send_commit(ops, needs_flush, durability, free, inline, false)
            .await?;
        let mut allocator = self.allocator();
        for block in &unshare {
            allocator.set_shared(*block, false);
        }
        Ok(home)
    }

    /// Makes `target` a copy of `source` that shares its blocks (a snapshot
    /// or clone): no data is copied; each shared block's reference count goes
    /// up, and a later write to either object lands in fresh blocks.
    pub async fn clone_object(
        &self,
        source: &ObjectKey,
        target: &ObjectKey,
        version: u64,
    ) -> Result<(), StoreError> {
        self.check_failed()?;
        if source == target {
            return Err(StoreError::ObjectExists(*target));
        }
        let (first, second) = (self.stripe(source), self.stripe(target));
        let _first = self.inner.locks[first.min(second)].write().await;
        let _second = if first != second {
            Some(self.inner.locks[first.max(second)].write().await)
        } else {
            None
        };
        if self.inner.meta.object_info(target)?.is_some() {
            return Err(StoreError::ObjectExists(*target));
        }
        if self.inner.meta.object_info(source)?.is_none() {
            return Err(StoreError::ObjectNotFound(*source));
        }
        let blocks = self.inner.meta.object_blocks(source)?;
        let _refs = self.inner.refs_lock.lock().await;
        let mut ops = Vec::with_capacity(blocks.len() * 2 + 1);
        for (index, entry) in &blocks {
            let count = if self.allocator().is_shared(entry.disk_block) {
                self.inner
                    .meta
                    .block_ref(entry.disk_block)?
                    .ok_or_else(|| {
                        StoreError::Corrupt(format!(
                            "shared disk block {} has no reference count",
                            entry.disk_block
                        ))
                    })?
            } else {
                1
            };
            ops.push(MetaOp::PutBlock {
                key: block_key(target, *index),
                entry: *entry,
            });
            ops.push(MetaOp::PutRef {
                disk_block: entry.disk_block,
                count: count + 1,
            });
        }
        ops.push(MetaOp::PutObject {
            key: object_key(target),
            info: ObjectInfo { version },
        });
        self.without_map(
            target,
            self.commit(ops, false, Durability::Durable, Vec::new()),
        )
        .await?;
        let mut allocator = self.allocator();
        for (_, entry) in &blocks {
            allocator.set_shared(entry.disk_block, true);
        }
        Ok(())
    }

    /// Allocates `count` blocks where `placement` says (`Placement`).
    fn allocate(&self, count: u64, placement: Placement) -> Result<Vec<Run>, StoreError> {
        let mut allocator = self.allocator();
        let runs = match placement {
            Placement::Fill => allocator.allocate(count, MAX_RUN_BLOCKS),
            Placement::NewRun => allocator.allocate_run(count, MAX_RUN_BLOCKS),
            Placement::After(previous) => previous
                .checked_add(1)
                .and_then(|start| allocator.allocate_at(start, count, MAX_RUN_BLOCKS))
                .or_else(|| allocator.allocate_run(count, MAX_RUN_BLOCKS)),
        };
        runs.ok_or(StoreError::NoSpace {
            needed: count,
            free: allocator.free_count(),
        })
    }

    /// `allocate`; when the disk looks full, syncs first (blocks given up by
    /// buffered changes come free then) and tries once more.
    async fn allocate_or_flush(
        &self,
        count: u64,
        placement: Placement,
    ) -> Result<Vec<Run>, StoreError> {
        match self.allocate(count, placement) {
            Err(StoreError::NoSpace { .. }) => {
                self.flush_and_release().await?;
                self.allocate(count, placement)
            }
            other => other,
        }
    }

    /// Reads `len` bytes at `offset` of an object (both 4 KiB-aligned).
    /// Holes and missing objects read as zeros; a block whose checksum does
    /// not match is an error naming the object and offset, never data.
    pub async fn read(&self, key: &ObjectKey, offset: u64, len: u64) -> Result<Bytes, StoreError> {
        Ok(self.read_with_crcs(key, offset, len).await?.0)
    }

    /// `read`, with the crc32c of each block read (checked against the
    /// data; a hole's is a zero block's): an OSD's reply frame takes its
    /// crc from them instead of hashing the data again (`basalt_wire::crc`).
    pub async fn read_with_crcs(
        &self,
        key: &ObjectKey,
        offset: u64,
        len: u64,
    ) -> Result<(Bytes, Vec<u32>), StoreError> {
        self.check_range(key, offset, len)?;
        let _guard = self.lock(key).read().await;
        let first = (offset / BLOCK_BYTES as u64) as u32;
        let count = (len / BLOCK_BYTES as u64) as u32;
        let entries = self.entries(key, first, count)?;

        // Group consecutive object blocks stored in consecutive disk blocks.
        let mut runs: Vec<(u32, u64, u32)> = Vec::new(); // (slot, disk, len)
        for (slot, entry) in entries.iter().enumerate() {
            let Some(entry) = entry else { continue };
            match runs.last_mut() {
                Some((start_slot, disk, run_len))
                    if *start_slot + *run_len == slot as u32
                        && *disk + *run_len as u64 == entry.disk_block
                        && *run_len < MAX_RUN_BLOCKS =>
                {
                    *run_len += 1;
                }
                _ => runs.push((slot as u32, entry.disk_block, 1)),
            }
        }
        let reads = runs.iter().map(|(_, disk, run_len)| {
            let buf = self.inner.device.buffer(*run_len as usize * BLOCK_BYTES);
            self.inner.device.read(*disk, buf)
        });
        let results = join_all(reads).await;
        // One run covering the whole range (a 4 KiB read; a large one of
        // data written in one piece): the I/O buffer itself is handed out,
        // and goes back to the pool when the caller drops it. Callers send
        // it on at once; one that held many would only make later reads
        // take heap buffers (the pool's 1 MiB slots are few). Copying a
        // 1 MiB read out of its slot was 10% of the OSD's CPU at homed
        // size-1 1 MiB sequential read (perf).
        let whole = runs.len() == 1 && runs[0].0 == 0 && runs[0].2 == count;
        // Built in slot order (runs are), zeros only where holes are: a
        // zeroed buffer written over cost a second pass over every large
        // read.
        let mut out = if whole {
            BytesMut::new()
        } else {
            BytesMut::with_capacity(len as usize)
        };
        let mut only = None;
        for ((slot, disk, run_len), (buf, result)) in runs.iter().zip(results) {
            result.map_err(|source| StoreError::Io {
                op: "read data",
                source,
            })?;
            if !whole {
                // The hole before this run (if any) reads as zeros.
                out.resize(*slot as usize * BLOCK_BYTES, 0);
            }
            for i in 0..*run_len as usize {
                let block = &buf[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES];
                let slot_index = *slot as usize + i;
                let expected = entries[slot_index].map_or(0, |e| e.crc);
                let actual = crc32c::crc32c(block);
                if actual != expected {
                    return Err(StoreError::Checksum {
                        object: *key,
                        offset: offset + (slot_index * BLOCK_BYTES) as u64,
                        disk_block: disk + i as u64,
                        expected,
                        actual,
                    });
                }
                if !whole {
                    out.extend_from_slice(block);
                }
            }
            if whole {
                only = Some(buf);
            }
        }
        let crcs = entries
            .iter()
            .map(|entry| entry.map_or_else(zero_block_crc, |e| e.crc))
            .collect();
        // The buffer goes back to the pool when the caller drops the bytes.
        match only {
            Some(buf) => Ok((Bytes::from_owner(buf), crcs)),
            None => {
                out.resize(len as usize, 0);
                let data = out.freeze();
                self.note_scattered(key, first, entries, runs.len(), &data);
                Ok((data, crcs))
            }
        }
    }

    /// Queues a range just read for `relocate_scattered` when its blocks
    /// lie in short runs (`reads` device reads, against the fewest its
    /// holes allow) and none is shared (a snapshot's block would be
    /// copied, not moved).
    fn note_scattered(
        &self,
        key: &ObjectKey,
        first: u32,
        entries: Vec<Option<BlockEntry>>,
        reads: usize,
        data: &Bytes,
    ) {
        if self.inner.config.relocate_bytes_per_sec == 0
            || entries.len() < RELOCATE_MIN_BLOCKS
            || self.inner.failed.load(Ordering::Relaxed)
        {
            return;
        }
        let present = entries.iter().flatten().count();
        // Holes split reads too, and no relocation removes those splits:
        // only the reads past the fewest count.
        let fewest = fewest_reads(&entries);
        if present < RELOCATE_MIN_BLOCKS
            || reads.saturating_sub(fewest) * RELOCATE_BLOCKS_PER_READ <= present
        {
            return;
        }
        if self.shares_blocks(&entries) {
            return;
        }
        let mut queue = self.scattered();
        let queued: usize = queue.iter().map(|s| s.data.len()).sum();
        if queued + data.len() > RELOCATE_QUEUE_MAX_BYTES
            || queue.iter().any(|s| s.key == *key && s.first == first)
        {
            return;
        }
        queue.push(Scattered {
            key: *key,
            first,
            entries,
            data: data.clone(),
        });
        drop(queue);
        self.inner.scattered_ready.notify_one();
    }

    /// Whether any of `entries`' blocks is shared with another object.
    fn shares_blocks(&self, entries: &[Option<BlockEntry>]) -> bool {
        let allocator = self.allocator();
        entries
            .iter()
            .flatten()
            .any(|e| allocator.is_shared(e.disk_block))
    }

    fn scattered(&self) -> std::sync::MutexGuard<'_, Vec<Scattered>> {
        self.inner
            .scattered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Ends once a large read queued a scattered range (at once if one
    /// did since the last call).
    pub async fn scattered_ready(&self) {
        self.inner.scattered_ready.notified().await;
    }

    /// Scattered ranges queued and not relocated yet.
    pub fn scattered_waiting(&self) -> usize {
        self.scattered().len()
    }

    /// `StoreConfig::relocate_bytes_per_sec` of this store.
    pub fn relocate_bytes_per_sec(&self) -> u64 {
        self.inner.config.relocate_bytes_per_sec
    }

    /// Blocks relocated since open.
    pub fn relocated_blocks(&self) -> u64 {
        self.inner.relocated_blocks.load(Ordering::Relaxed)
    }

    /// Writes each queued scattered range into one new run, oldest first
    /// (`relocate_next` until none is left); returns the blocks moved, or
    /// the first error (the other ranges are relocated still).
    pub async fn relocate_scattered(&self) -> Result<u64, StoreError> {
        let (mut moved, mut error) = (0, None);
        while let Some(result) = self.relocate_next().await {
            match result {
                Ok(blocks) => moved += blocks,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        error.map_or(Ok(moved), Err)
    }

    /// Writes the oldest queued scattered ranges (up to
    /// `RELOCATE_AT_ONCE`, side by side) into one new run each
    /// ("Relocating scattered blocks" above) and returns the blocks moved,
    /// or the first error; `None` when none is queued. A range written
    /// since its read, shared since, or one no long enough hole is free
    /// for, is dropped: its next read decides again. Cancelling it leaves
    /// the ranges where they were (the blocks it allocated are lost until
    /// the next open).
    pub async fn relocate_next(&self) -> Option<Result<u64, StoreError>> {
        let ranges: Vec<Scattered> = {
            let mut queue = self.scattered();
            let take = queue.len().min(RELOCATE_AT_ONCE);
            queue.drain(..take).collect()
        };
        if ranges.is_empty() {
            return None;
        }
        let (mut moved, mut error) = (0, None);
        for result in join_all(ranges.into_iter().map(|range| self.relocate(range))).await {
            match result {
                Ok(blocks) => moved += blocks,
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        self.inner
            .relocated_blocks
            .fetch_add(moved, Ordering::Relaxed);
        Some(error.map_or(Ok(moved), Err))
    }

    async fn relocate(&self, range: Scattered) -> Result<u64, StoreError> {
        self.check_failed()?;
        let Scattered {
            key,
            first,
            entries,
            data,
        } = range;
        let _guard = self.lock(&key).write().await;
        if self.entries(&key, first, entries.len() as u32)? != entries {
            return Ok(0);
        }
        // A clone since the read shares the blocks (it needs this lock, so
        // they stay as they are now).
        if self.shares_blocks(&entries) {
            return Ok(0);
        }
        let present: Vec<(usize, BlockEntry)> = entries
            .iter()
            .enumerate()
            .filter_map(|(slot, entry)| entry.map(|e| (slot, e)))
            .collect();
        let runs = match self.allocate(present.len() as u64, Placement::NewRun) {
            Ok(runs) => runs,
            Err(StoreError::NoSpace { .. }) => return Ok(0),
            Err(e) => return Err(e),
        };
        // Only worth a write when the range ends up in (almost) the fewest
        // runs it fits in.
        if runs.len() > present.len().div_ceil(MAX_RUN_BLOCKS as usize) + 1 {
            self.allocator().free_runs(&runs);
            return Ok(0);
        }
        let mut ops = Vec::with_capacity(present.len());
        let mut moved = Vec::with_capacity(present.len());
        let mut buffers = Vec::with_capacity(runs.len());
        let mut blocks = present.iter();
        for run in &runs {
            let mut buf = self.inner.device.buffer(run.len as usize * BLOCK_BYTES);
            for (i, disk_block) in (run.start..run.start + run.len as u64).enumerate() {
                let Some((slot, old)) = blocks.next() else {
                    break;
                };
                let at = slot * BLOCK_BYTES;
                let block = &data[at..at + BLOCK_BYTES];
                debug_assert_eq!(
                    crc32c::crc32c(block),
                    old.crc,
                    "relocated data is not the block's"
                );
                buf[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].copy_from_slice(block);
                let entry = BlockEntry {
                    disk_block,
                    crc: old.crc,
                };
                let index = first + *slot as u32;
                ops.push(MetaOp::PutBlock {
                    key: block_key(&key, index),
                    entry,
                });
                moved.push((index as usize, entry));
            }
            buffers.push((run.start, buf));
        }
        let writes = buffers
            .into_iter()
            .map(|(start, buf)| self.inner.device.write(start, buf));
        let written = match join_all(writes)
            .await
            .into_iter()
            .find_map(|(_, r)| r.err())
        {
            None => self.inner.device.flush().await,
            Some(e) => Err(e),
        };
        // Flushed before the entries are committed: the data may have been
        // flushed by a client already, and RocksDB may make an unsynced
        // batch durable on its own (a memtable flush) before the next sync
        // flushes the device; its entries must never point at data the
        // device could still lose.
        if let Err(source) = written {
            self.allocator().free_runs(&runs);
            return Err(StoreError::Io {
                op: "relocate data",
                source,
            });
        }
        let release = match self
            .release(present.iter().map(|(_, e)| e.disk_block).collect())
            .await
        {
            Ok(release) => release,
            Err(e) => {
                self.allocator().free_runs(&runs);
                return Err(e);
            }
        };
        // No version change: the object's contents are the same.
        let map = self.inner.maps.take(&key);
        self.commit_release(ops, false, Durability::Buffered, release, Vec::new())
            .await?;
        if let Some(mut map) = map {
            for (index, entry) in &moved {
                if let Some(slot) = map.blocks.get_mut(*index) {
                    *slot = Some(*entry);
                }
            }
            self.inner.maps.insert(&key, map);
        }
        Ok(moved.len() as u64)
    }

    /// Makes a range read as zeros. With `allocate`, zero blocks are written
    /// (space stays reserved, as NBD's NO_HOLE asks); otherwise the range is
    /// discarded.
    pub async fn write_zeroes(
        &self,
        key: &ObjectKey,
        offset: u64,
        len: u64,
        allocate: bool,
        version: u64,
    ) -> Result<(), StoreError> {
        self.write_zeroes_with(key, offset, len, allocate, version, Durability::Durable)
            .await
    }

    /// `write_zeroes`, acknowledged as `durability` says.
    pub async fn write_zeroes_with(
        &self,
        key: &ObjectKey,
        offset: u64,
        len: u64,
        allocate: bool,
        version: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        if allocate {
            self.check_range(key, offset, len)?;
            let zeros = vec![0u8; len as usize];
            self.write_with(key, offset, &zeros, version, durability)
                .await
        } else {
            self.discard_with(key, offset, len, version, durability)
                .await
        }
    }

    /// Frees a range: it reads as zeros afterwards.
    pub async fn discard(
        &self,
        key: &ObjectKey,
        offset: u64,
        len: u64,
        version: u64,
    ) -> Result<(), StoreError> {
        self.discard_with(key, offset, len, version, Durability::Durable)
            .await
    }

    /// `discard`, acknowledged as `durability` says.
    pub async fn discard_with(
        &self,
        key: &ObjectKey,
        offset: u64,
        len: u64,
        version: u64,
        durability: Durability,
    ) -> Result<(), StoreError> {
        self.check_range(key, offset, len)?;
        self.check_failed()?;
        let _guard = self.lock(key).write().await;
        let first = (offset / BLOCK_BYTES as u64) as u32;
        let count = (len / BLOCK_BYTES as u64) as u32;
        let old = self.entries(key, first, count)?;
        let mut ops: Vec<MetaOp> = old
            .iter()
            .enumerate()
            .filter(|(_, e)| e.is_some())
            .map(|(i, _)| MetaOp::DeleteBlock {
                key: block_key(key, first + i as u32),
            })
            .collect();
        ops.push(MetaOp::PutObject {
            key: object_key(key),
            info: ObjectInfo { version },
        });
        let release = self
            .release(old.into_iter().flatten().map(|e| e.disk_block).collect())
            .await?;
        self.without_map(
            key,
            self.commit_release(ops, false, durability, release, Vec::new())
                .map(|result| result.map(drop)),
        )
        .await
    }

    /// Returns an object's version and its allocated blocks with their data
    /// (block index, 4 KiB), every block verified against its checksum; `None`
    /// if the object does not exist. Recovery's source side.
    pub async fn object_contents(
        &self,
        key: &ObjectKey,
    ) -> Result<Option<(u64, Vec<(u32, Bytes)>)>, StoreError> {
        let Some(version) = self.version(key).await? else {
            return Ok(None);
        };
        let blocks = self.allocated_blocks(key).await?;
        let mut contents = Vec::with_capacity(blocks.len());
        // Read contiguous runs of allocated blocks in one request each.
        let mut position = 0;
        while position < blocks.len() {
            let first = blocks[position];
            let mut count = 1;
            while position + count < blocks.len()
                && blocks[position + count] == first + count as u32
            {
                count += 1;
            }
            let data = self
                .read(
                    key,
                    u64::from(first) * BLOCK_BYTES as u64,
                    (count * BLOCK_BYTES) as u64,
                )
                .await?;
            for i in 0..count {
                contents.push((
                    first + i as u32,
                    data.slice(i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES),
                ));
            }
            position += count;
        }
        // A write between the stat and the reads would make the version
        // claim newer data than we hold only if it raced; recovery runs
        // while its PG serves no writes, so stat and blocks agree.
        Ok(Some((version, contents)))
    }

    /// Returns an object's version and the checksum of each allocated block
    /// (block index, crc32c), from metadata only when `deep` is false; with
    /// `deep` every block is read and verified, and a block whose data does
    /// not match its checksum is reported as `Err(Checksum)`.
    pub async fn object_digest(
        &self,
        key: &ObjectKey,
        deep: bool,
    ) -> Result<Option<(u64, Vec<(u32, u32)>)>, StoreError> {
        if deep {
            return Ok(self.object_contents(key).await?.map(|(version, blocks)| {
                let crcs = blocks
                    .iter()
                    .map(|(index, data)| (*index, crc32c::crc32c(data)))
                    .collect();
                (version, crcs)
            }));
        }
        let _guard = self.lock(key).read().await;
        let Some(info) = self.inner.meta.object_info(key)? else {
            return Ok(None);
        };
        let crcs = self
            .inner
            .meta
            .object_blocks(key)?
            .into_iter()
            .map(|(index, entry)| (index, entry.crc))
            .collect();
        Ok(Some((info.version, crcs)))
    }

    /// Replaces an object with `blocks` (block index, 4 KiB of data) at
    /// `version`, unless it already holds `version` (and not `force`) or a
    /// newer one (returns whether it replaced). Recovery's target side. Until the last step the
    /// object carries version 0, older than any real write, so a crash half
    /// way leaves it to be copied again rather than half-new under the new
    /// version.
    pub async fn replace_object(
        &self,
        key: &ObjectKey,
        blocks: &[(u32, Bytes)],
        version: u64,
        force: bool,
    ) -> Result<bool, StoreError> {
        // `force` (repair of a bad copy) replaces an equal version too, never
        // a newer one.
        if self
            .version(key)
            .await?
            .is_some_and(|held| held > version || (held == version && !force))
        {
            return Ok(false);
        }
        let max = self.inner.config.max_object_bytes;
        let mut position = 0;
        let mut runs: Vec<(u32, Vec<u8>)> = Vec::new();
        while position < blocks.len() {
            let (first, _) = blocks[position];
            let mut data = Vec::new();
            let mut index = first;
            while position < blocks.len() && blocks[position].0 == index {
                if blocks[position].1.len() != BLOCK_BYTES {
                    return Err(StoreError::InvalidAlignment {
                        object: *key,
                        offset: u64::from(index) * BLOCK_BYTES as u64,
                        len: blocks[position].1.len() as u64,
                    });
                }
                data.extend_from_slice(&blocks[position].1);
                position += 1;
                index += 1;
            }
            runs.push((first, data));
        }
        if runs.is_empty() {
            // Nothing allocated: one discard sets the version atomically.
            self.discard(key, 0, max, version).await?;
            return Ok(true);
        }
        self.discard(key, 0, max, 0).await?;
        let last = runs.len() - 1;
        for (i, (first, data)) in runs.iter().enumerate() {
            let run_version = if i == last { version } else { 0 };
            self.write(
                key,
                u64::from(*first) * BLOCK_BYTES as u64,
                data,
                run_version,
            )
            .await?;
        }
        Ok(true)
    }

    /// Removes an object and frees its blocks. Deleting a missing object is
    /// not an error.
    pub async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        self.check_failed()?;
        let _guard = self.lock(key).write().await;
        let blocks = self.inner.meta.object_blocks(key)?;
        let mut ops: Vec<MetaOp> = blocks
            .iter()
            .map(|(index, _)| MetaOp::DeleteBlock {
                key: block_key(key, *index),
            })
            .collect();
        ops.push(MetaOp::DeleteObject {
            key: object_key(key),
        });
        let release = self
            .release(blocks.iter().map(|(_, e)| e.disk_block).collect())
            .await?;
        self.without_map(
            key,
            self.commit_release(ops, false, Durability::Durable, release, Vec::new())
                .map(|result| result.map(drop)),
        )
        .await
    }

    /// Returns an object's version, or `None` if it does not exist: from
    /// the map cache, else one point lookup (`stat` also counts the
    /// allocated blocks, a scan of up to 1,024 entries, far too slow for
    /// every replicated write).
    pub async fn version(&self, key: &ObjectKey) -> Result<Option<u64>, StoreError> {
        let _guard = self.lock(key).read().await;
        if let Some(version) = self.inner.maps.version(key) {
            return Ok(version);
        }
        Ok(self.inner.meta.object_info(key)?.map(|info| info.version))
    }

    /// Returns an object's version and allocated size, or `None`.
    pub async fn stat(&self, key: &ObjectKey) -> Result<Option<ObjectStat>, StoreError> {
        let _guard = self.lock(key).read().await;
        let Some(info) = self.inner.meta.object_info(key)? else {
            return Ok(None);
        };
        let allocated_blocks = self.inner.meta.object_blocks(key)?.len() as u64;
        Ok(Some(ObjectStat {
            version: info.version,
            allocated_blocks,
        }))
    }

    /// Returns where an object's allocated blocks lie: (block index, disk
    /// block), in index order. For tools and tests of the layout.
    pub async fn block_placement(&self, key: &ObjectKey) -> Result<Vec<(u32, u64)>, StoreError> {
        let _guard = self.lock(key).read().await;
        Ok(self
            .inner
            .meta
            .object_blocks(key)?
            .into_iter()
            .map(|(index, entry)| (index, entry.disk_block))
            .collect())
    }

    /// Returns the allocated 4 KiB blocks of an object (block indexes), for
    /// block-status queries.
    pub async fn allocated_blocks(&self, key: &ObjectKey) -> Result<Vec<u32>, StoreError> {
        let placement = self.block_placement(key).await?;
        Ok(placement.into_iter().map(|(index, _)| index).collect())
    }

    /// Returns every object of `pg` with its version.
    pub fn list_pg(&self, pg: PgId) -> Result<Vec<(ObjectKey, u64)>, StoreError> {
        Ok(self
            .inner
            .meta
            .list_pg(pg)?
            .into_iter()
            .map(|(key, info)| (key, info.version))
            .collect())
    }

    /// Returns every object of the store with its version.
    pub fn objects(&self) -> Result<Vec<(ObjectKey, u64)>, StoreError> {
        Ok(self
            .inner
            .meta
            .all_objects()?
            .into_iter()
            .map(|(key, info)| (key, info.version))
            .collect())
    }

    /// Returns the disk block holding block `index` of an object (for tests
    /// and repair tools).
    pub fn locate(&self, key: &ObjectKey, index: u32) -> Result<Option<u64>, StoreError> {
        Ok(self.inner.meta.blocks(key, index, 1)?[0].map(|e| e.disk_block))
    }

    /// Checks the whole store: every block entry in range and referenced
    /// once, every entry's object present, the allocator equal to the set of
    /// referenced blocks, and every block's checksum. Run it while no writes
    /// are in flight (blocks of writes in flight look leaked).
    pub async fn fsck(&self) -> Result<FsckReport, StoreError> {
        // Syncs first: blocks that buffered changes gave up stay allocated
        // (with the committer, not the allocator) until a sync, and would
        // look leaked. The sync also waits for deferred writes' data, which
        // would read as corrupt while on its way. (Not `flush`: that marks
        // a client as flushing. A failed store is checked as it is.)
        if self.check_failed().is_ok() {
            self.sync().await?;
        }
        self.inner.landings.wait_begun().await;
        let block_count = self.allocator().block_count();
        let mut report = FsckReport {
            block_count,
            ..FsckReport::default()
        };
        let objects = self.inner.meta.all_objects()?;
        report.objects = objects.len() as u64;
        let known: std::collections::HashSet<ObjectKey> =
            objects.iter().map(|(key, _)| *key).collect();
        let mut seen = Allocator::new(block_count);
        seen.reserve_prefix(self.inner.journal_blocks);
        let mut extra_refs: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        let mut to_check: Vec<(ObjectKey, u32, BlockEntry)> = Vec::new();
        self.inner.meta.for_each_block(|object, index, entry| {
            report.blocks += 1;
            if !known.contains(&object) {
                report
                    .errors
                    .push(format!("{object} block {index}: object has no info record"));
            }
            if entry.disk_block >= block_count {
                report.errors.push(format!(
                    "{object} block {index}: disk block {} out of range",
                    entry.disk_block
                ));
            } else if entry.disk_block < self.inner.journal_blocks {
                report.errors.push(format!(
                    "{object} block {index}: disk block {} lies in the journal",
                    entry.disk_block
                ));
            } else if !seen.mark_used(entry.disk_block) {
                *extra_refs.entry(entry.disk_block).or_default() += 1;
            } else {
                to_check.push((object, index, entry));
            }
            Ok(())
        })?;
        let mut recorded: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        self.inner.meta.for_each_ref(|disk_block, count| {
            recorded.insert(disk_block, count);
            Ok(())
        })?;
        for (disk_block, extra) in &extra_refs {
            let actual = extra + 1;
            if recorded.get(disk_block) != Some(&actual) {
                report.errors.push(format!(
                    "disk block {disk_block} is referenced {actual} times but its count says {:?}",
                    recorded.get(disk_block)
                ));
            }
        }
        for (disk_block, count) in &recorded {
            if !extra_refs.contains_key(disk_block) {
                report.errors.push(format!(
                    "disk block {disk_block} has count {count} but is referenced once or never"
                ));
            }
        }
        {
            let allocator = self.allocator();
            // Held blocks (given up, kept until the journal's checkpoint)
            // are in use and referenced by nothing.
            for &block in allocator.held() {
                if !seen.mark_used(block) {
                    report.errors.push(format!(
                        "disk block {block} is held for the journal but still referenced"
                    ));
                }
            }
            report.free_blocks = allocator.free_count() + allocator.held_count();
            let mut mismatches = 0u64;
            for block in 0..block_count {
                if allocator.is_used(block) != seen.is_used(block) {
                    mismatches += 1;
                    if mismatches <= 10 {
                        report.errors.push(format!(
                            "allocator: disk block {block} is {} but {}",
                            if allocator.is_used(block) {
                                "used"
                            } else {
                                "free"
                            },
                            if seen.is_used(block) {
                                "referenced"
                            } else {
                                "unreferenced"
                            }
                        ));
                    }
                }
            }
            if mismatches > 10 {
                report
                    .errors
                    .push(format!("allocator: {mismatches} mismatches in all"));
            }
        }
        for chunk in to_check.chunks(64) {
            let reads = chunk.iter().map(|(_, _, entry)| {
                let buf = self.inner.device.buffer(BLOCK_BYTES);
                self.inner.device.read(entry.disk_block, buf)
            });
            for ((object, index, entry), (buf, result)) in chunk.iter().zip(join_all(reads).await) {
                match result {
                    Err(e) => report.errors.push(format!(
                        "{object} block {index}: read of disk block {} failed: {e}",
                        entry.disk_block
                    )),
                    Ok(()) => {
                        let actual = crc32c::crc32c(&buf);
                        if actual != entry.crc {
                            report.errors.push(format!(
                                "{object} block {index}: checksum mismatch at disk block {} \
                                 (expected {:#010x}, read {actual:#010x})",
                                entry.disk_block, entry.crc
                            ));
                        }
                    }
                }
            }
        }
        Ok(report)
    }
}

/// What the committer applied without a sync.
#[derive(Default)]
struct Unsynced {
    /// When the oldest unsynced change was applied; `None`: nothing waits.
    since: Option<Instant>,
    /// Some unsynced change points at data not flushed yet.
    data: bool,
    /// Blocks given up by unsynced changes.
    free: Vec<u64>,
    /// Their metadata changes, for the next journal record.
    ops: Vec<MetaOp>,
    /// Too many changes for one record: the next sync is a checkpoint.
    overflow: bool,
    /// Keys of deferred writes applied since the last sync: the sync
    /// deletes their data from RocksDB.
    deferred: Vec<(u64, u64)>,
}

/// Unsynced changes kept for the next journal record, at most (about 750
/// KiB encoded): beyond, the next sync is a checkpoint.
const UNSYNCED_OPS_MAX: usize = 16_384;

/// Buffered changes that, waiting, make the committer apply them at once
/// (`Committer::apply_buffered`); fewer are left to gather for up to
/// `APPLY_GATHER_FOR`.
const APPLY_GATHER_OPS: usize = 4_096;
const APPLY_GATHER_FOR: Duration = Duration::from_millis(50);
/// At most this many changes waiting, a write alone applies them on the
/// runtime thread after its reply; more go to the blocking thread.
const APPLY_ALONE_OPS: usize = 64;

/// Blocks held until a checkpoint that make one happen: 64 MiB.
const HELD_MAX: u64 = 16_384;
/// Deferred writes whose copy waits (logged or in RocksDB) that make the
/// next group a synced one (which deletes them): about 16 MiB at 4 KiB,
/// what a restart writes in place again at most.
const DEFERRED_SYNC_MAX: usize = 4096;

/// Where the committer is in the metadata journal.
struct JournalState {
    blocks: u64,
    nonce: u64,
    /// Where the next record goes.
    next_block: u64,
    next_seq: u64,
    /// Disk blocks written inline during this lap: a replay may write them
    /// again, so when a change gives one up it is held, not freed, until the
    /// next checkpoint.
    lap_inline: std::collections::HashSet<u64>,
}

/// Groups metadata changes. A group with a durable change (or one that
/// follows buffered changes for too long) is made durable at once for all
/// of them: with a journal, one record written with RWF_DSYNC and an
/// unsynced RocksDB batch; without, one device flush for all the data
/// written since the last one, then one synced RocksDB batch. A group of
/// buffered changes is logged (with a journal; applied to RocksDB later,
/// `apply_buffered`) or one unsynced batch. A failed flush or commit fails
/// the store: it can no longer tell what is durable.
struct Committer<D> {
    landings: Arc<Landings>,
    device: Arc<D>,
    meta: Arc<MetaStore>,
    allocator: Arc<Mutex<Allocator>>,
    failed: Arc<AtomicBool>,
    skip_flush: Arc<AtomicBool>,
    unsynced: Unsynced,
    journal: Option<JournalState>,
    checkpoints: Arc<std::sync::atomic::AtomicU64>,
    /// Buffered changes being put into RocksDB (`apply_buffered`).
    applying: Option<tokio::task::JoinHandle<()>>,
    /// The data of the group being committed, written in place behind its
    /// record (`write_home_behind`).
    home: Option<HomeLanding>,
}

impl<D: BlockDevice> Committer<D> {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Commit>) {
        loop {
            // A failed store refuses every commit at once: woken for its
            // unsynced changes, it would be woken again at once, for ever.
            let failed = self.failed.load(Ordering::Acquire);
            let sync_at = (self.unsynced.since)
                .filter(|_| !failed)
                .map(|since| since + BUFFERED_SYNC_AFTER);
            let apply_at = self.gathered_until().filter(|_| !failed);
            let first = tokio::select! {
                commit = rx.recv() => commit,
                () = sleep_until_some(sync_at) => {
                    self.sync_alone().await;
                    continue;
                }
                () = sleep_until_some(apply_at) => {
                    self.apply_buffered(false);
                    continue;
                }
            };
            let Some(first) = first else { break };
            let mut group = vec![first];
            while group.len() < GROUP_COMMIT_MAX {
                match rx.try_recv() {
                    Ok(commit) => group.push(commit),
                    Err(_) => break,
                }
            }
            let result = self.commit(&mut group).await;
            let home = self.home.take();
            let alone = group.len() == 1 && rx.is_empty();
            for commit in group {
                let _ = commit.done.send(result.clone().map(|()| home.clone()));
            }
            self.apply_buffered(alone);
        }
        if let Some(applying) = self.applying.take() {
            let _ = applying.await;
        }
        // Closing: nothing buffered stays unsynced, and with a journal the
        // lap ends, so the next open has nothing to replay.
        if self.journal.is_some() && !self.failed.load(Ordering::Acquire) {
            if let Err(message) = self.checkpoint(Vec::new(), Vec::new(), Vec::new()).await {
                tracing::error!("store checkpoint at close failed: {message}");
            }
        } else {
            self.sync_alone().await;
        }
    }

    /// When buffered changes left to gather (`apply_buffered`) are due:
    /// with no more writes coming, the committer wakes up for them rather
    /// than leaving them to the next sync or to a reader, which would apply
    /// them on its own path. While an application runs, it looks again a
    /// gathering time later.
    fn gathered_until(&self) -> Option<Instant> {
        // Set exactly while changes wait.
        let since = self.meta.buffered_waiting().1?;
        if self.applying.as_ref().is_some_and(|a| !a.is_finished()) {
            return Some(Instant::now() + APPLY_GATHER_FOR);
        }
        Some(since + APPLY_GATHER_FOR)
    }

    /// Puts logged changes a flush covers into RocksDB, off the writers'
    /// path: the memtable insert and WAL write were ~11 µs of a homed 4 KiB
    /// write's ~60 µs of CPU on the OSD's one runtime thread. Under load (a
    /// group of several writes, or more waiting) on a blocking thread,
    /// beside the runtime thread, once `APPLY_GATHER_OPS` changes wait or
    /// the first has waited `APPLY_GATHER_FOR`: one large batch, coalesced
    /// and in key order, costs a fraction of the memtable work of many
    /// small ones. A write `alone` (QD1) with few changes waiting has them
    /// applied by a task of this runtime that runs after the writer's reply
    /// is sent: waking a thread costs the runtime thread ~4 µs, and on two
    /// cores that thread takes the core the client needs to send its next
    /// request. One application at a time; the blocking one goes on while
    /// more are logged. Changes no flush covers yet wait for the next sync
    /// (`MetaStore::mark_flushed`); readers find them meanwhile.
    fn apply_buffered(&mut self, alone: bool) {
        if self.applying.as_ref().is_some_and(|a| !a.is_finished()) {
            return;
        }
        let (waiting, since) = self.meta.buffered_waiting();
        if waiting == 0 {
            return;
        }
        let alone = alone && waiting <= APPLY_ALONE_OPS;
        if !alone
            && waiting < APPLY_GATHER_OPS
            && since.is_some_and(|since| since.elapsed() < APPLY_GATHER_FOR)
        {
            // Left to gather: the next group looks again, and so does the
            // committer when they are due (`gathered_until`).
            return;
        }
        let meta = self.meta.clone();
        let failed = self.failed.clone();
        let apply = move || {
            while meta.has_buffered() {
                if let Err(e) = meta.apply_buffered() {
                    tracing::error!("store commit failed, refusing further writes: {e}");
                    failed.store(true, Ordering::Release);
                    return;
                }
                if alone {
                    return;
                }
            }
        };
        self.applying = Some(if alone {
            tokio::spawn(async move {
                // Spawned tasks run in turn, and the reply still has tasks
                // to pass through (the op's service task, the gateway's
                // request task, its socket writer): a yield puts this one
                // behind all of them (tokio runs yielded tasks once the
                // queue is empty).
                tokio::task::yield_now().await;
                apply()
            })
        } else {
            tokio::task::spawn_blocking(apply)
        });
    }

    /// Applies every logged buffered change now: a few on this thread,
    /// more (up to `APPLY_GATHER_OPS` may be gathering) on the blocking
    /// thread, after the application in progress, if any.
    async fn apply_buffered_now(&mut self) -> Result<(), String> {
        if let Some(applying) = self.applying.take() {
            let _ = applying.await;
        }
        let meta = self.meta.clone();
        let applied = if meta.buffered_waiting().0 <= APPLY_ALONE_OPS {
            meta.apply_buffered()
        } else {
            tokio::task::spawn_blocking(move || meta.apply_buffered())
                .await
                .map_err(|e| format!("metadata commit task failed: {e}"))?
        };
        applied.map_err(|e| format!("metadata commit failed: {e}"))
    }

    /// Syncs what earlier groups left unsynced.
    async fn sync_alone(&mut self) {
        if self.unsynced.since.is_some() {
            let mut group = Vec::new();
            let _ = self.commit(&mut group).await;
        }
    }

    async fn commit(&mut self, group: &mut [Commit]) -> Result<(), String> {
        if self.failed.load(Ordering::Acquire) {
            return Err("store failed earlier".to_string());
        }
        let mut ops: Vec<MetaOp> = group
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.ops))
            .collect();
        let free: Vec<u64> = group
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.free))
            .collect();
        let inline: Vec<(u64, IoBuf)> = group
            .iter_mut()
            .flat_map(|c| std::mem::take(&mut c.inline))
            .collect();
        let needs_flush = group.iter().any(|c| c.needs_flush);
        let checkpoint = group.iter().any(|c| c.checkpoint);
        let sync = group.is_empty()
            || checkpoint
            || group.iter().any(|c| c.durability == Durability::Durable)
            || self.unsynced.free.len() + free.len() >= BUFFERED_FREE_MAX
            || self.unsynced.deferred.len() >= DEFERRED_SYNC_MAX
            || self.unsynced.overflow
            || self.meta.log_filling()
            || self
                .unsynced
                .since
                .is_some_and(|since| since.elapsed() >= BUFFERED_SYNC_AFTER);
        if ops.is_empty()
            && free.is_empty()
            && !checkpoint
            && (!sync || self.unsynced.since.is_none())
        {
            // A flush with nothing unsynced: already durable.
            return Ok(());
        }
        if sync {
            self.settle_deferred(&mut ops).await?;
        }
        let result = if self.journal.is_some() {
            if checkpoint || self.unsynced.overflow {
                self.checkpoint(ops, free, inline).await
            } else if sync && ops.is_empty() && inline.is_empty() && self.unsynced.ops.is_empty() {
                // Every unsynced change is in a record written already.
                self.flush_records(free).await
            } else if sync {
                self.commit_journaled(ops, free, inline, needs_flush, true)
                    .await
            } else if inline.is_empty() {
                self.apply_unsynced(ops, free, needs_flush).await
            } else if !needs_flush && self.unsynced.ops.is_empty() {
                // Small buffered writes while the client flushes: their
                // record now, so that its FLUSH is one device flush.
                self.commit_journaled(ops, free, inline, false, false).await
            } else {
                // Changes in the journal must stay in commit order, and a
                // record must not point at data that may never reach the
                // disk (a larger write's, not flushed): these wait for the
                // next sync's record like other buffered changes.
                match write_home(&self.device, inline).await {
                    Ok(()) => self.apply_unsynced(ops, free, true).await,
                    Err(message) => Err(message),
                }
            }
        } else {
            self.commit_plain(ops, free, needs_flush, sync).await
        };
        if let Err(message) = &result {
            tracing::error!("store commit failed, refusing further writes: {message}");
            self.failed.store(true, Ordering::Release);
        }
        result
    }

    /// Without a journal: a buffered group's changes are logged (like a
    /// journal's store's); a sync is a device flush if needed, the logged
    /// changes applied, then the group's RocksDB batch, synced.
    async fn commit_plain(
        &mut self,
        ops: Vec<MetaOp>,
        free: Vec<u64>,
        needs_flush: bool,
        sync: bool,
    ) -> Result<(), String> {
        if !sync {
            self.log(&ops, None).await?;
            self.note_unsynced(ops, free, needs_flush);
            return Ok(());
        }
        let flush_data =
            (needs_flush || self.unsynced.data) && !self.skip_flush.load(Ordering::Acquire);
        let logged = self.meta.logged_seq();
        if flush_data {
            self.device
                .flush()
                .await
                .map_err(|e| format!("data flush failed: {e}"))?;
        }
        // Without data to flush, the logged changes point at none unflushed
        // (skipping the flush, the metadata sync's flush covers it).
        self.meta.mark_flushed(logged);
        self.apply_buffered_now().await?;
        commit_synced(&self.meta, ops, None).await?;
        let unsynced = std::mem::take(&mut self.unsynced);
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        for block in unsynced.free.into_iter().chain(free) {
            allocator.free(block);
        }
        Ok(())
    }

    /// A buffered group: its changes, deferred writes' copies included, go
    /// to the buffered-change log (applied to RocksDB once a sync's flush
    /// covers their data). It does not wait for the device (but when the
    /// log is full), so it runs on the committer task.
    async fn apply_unsynced(
        &mut self,
        ops: Vec<MetaOp>,
        free: Vec<u64>,
        needs_flush: bool,
    ) -> Result<(), String> {
        // Deferred copies too: the log survives what RocksDB's unsynced
        // WAL did (a SIGKILL, not a power loss), and open writes the copies
        // in place again before it applies the log (`replay_deferred`).
        self.log(&ops, None).await?;
        self.note_unsynced(ops, free, needs_flush);
        Ok(())
    }

    /// Logs changes (of journal record `journal`) in the buffered-change
    /// log. When it has no room (both halves hold records not in RocksDB:
    /// changes came faster than syncs, see `MetaStore::log_filling`), every
    /// record logged is flushed and applied first, on this path; changes
    /// too many for half the log go straight to RocksDB then, behind the
    /// rest (their data is flushed too).
    async fn log(&mut self, ops: &[MetaOp], journal: Option<u64>) -> Result<(), String> {
        let logged = |meta: &MetaStore| {
            meta.write_buffered_marked(ops, journal)
                .map_err(|e| format!("metadata commit failed: {e}"))
        };
        if logged(&self.meta)? {
            return Ok(());
        }
        self.flush_and_apply().await?;
        if logged(&self.meta)? {
            return Ok(());
        }
        self.meta
            .write_marked(ops, journal, None, false)
            .map_err(|e| format!("metadata commit failed: {e}"))
    }

    /// Makes every logged change applicable and applies it now: waits for
    /// the data writes begun, flushes the device, then applies.
    async fn flush_and_apply(&mut self) -> Result<(), String> {
        self.wait_landed().await?;
        let logged = self.meta.logged_seq();
        self.device
            .flush()
            .await
            .map_err(|e| format!("data flush failed: {e}"))?;
        self.meta.mark_flushed(logged);
        self.apply_buffered_now().await
    }

    /// Records a change applied without a sync; with a journal, its
    /// metadata changes are kept for the next record (but deferred data,
    /// which the sync deletes instead).
    fn note_unsynced(&mut self, mut ops: Vec<MetaOp>, free: Vec<u64>, needs_flush: bool) {
        let keep_ops = self.journal.is_some();
        let unsynced = &mut self.unsynced;
        unsynced.since.get_or_insert_with(Instant::now);
        unsynced.data |= needs_flush;
        unsynced.free.extend(free);
        ops.retain(|op| match op {
            MetaOp::PutDeferred {
                key, disk_block, ..
            } => {
                unsynced.deferred.push((*key, *disk_block));
                false
            }
            _ => true,
        });
        if keep_ops && !unsynced.overflow {
            if unsynced.ops.len() + ops.len() > UNSYNCED_OPS_MAX {
                unsynced.overflow = true;
                unsynced.ops = Vec::new();
            } else {
                unsynced.ops.extend(ops);
            }
        }
    }

    /// Before a sync: waits until the data of every deferred write has
    /// landed (the sync's device flush must cover it, and its record must
    /// not point at data still on its way), then drops the group's own
    /// deferred copies from `ops` and adds the deletion of those applied
    /// since the last sync. A deferred copy is thus never in a record, and
    /// every sync deletes the copies before it: a block given up by a
    /// change is free only after a sync, so its copy is gone by the time
    /// another change can own it, and a restart never writes a stale copy
    /// over a newer owner's data.
    async fn settle_deferred(&mut self, ops: &mut Vec<MetaOp>) -> Result<(), String> {
        let own = holds_deferred(ops);
        if !own && self.unsynced.deferred.is_empty() {
            return Ok(());
        }
        self.wait_landed().await?;
        ops.retain(|op| !matches!(op, MetaOp::PutDeferred { .. }));
        ops.extend(
            self.unsynced
                .deferred
                .drain(..)
                .map(|(key, disk_block)| MetaOp::DeleteDeferred { key, disk_block }),
        );
        Ok(())
    }

    /// Waits for every data write begun behind a journal record or a
    /// deferred write's copy. One that failed (the store is failed then)
    /// leaves its record or copy the only one: no lap may end and no copy
    /// be deleted, so that the next open writes the data in place again.
    async fn wait_landed(&self) -> Result<(), String> {
        self.landings.wait_begun().await;
        if self.failed.load(Ordering::Acquire) {
            return Err(
                "a data write behind its journal record or deferred copy failed; \
                 both stay for the next open"
                    .to_string(),
            );
        }
        Ok(())
    }

    fn journal(&mut self) -> Result<&mut JournalState, String> {
        self.journal
            .as_mut()
            .ok_or_else(|| "store has no journal".to_string())
    }

    /// A durable group with a journal: one record (the changes left
    /// unsynced before, the group's changes, its inline data) while the
    /// inline data goes to its blocks; then the group's RocksDB batch,
    /// unsynced, marking the record applied.
    ///
    /// When nothing but inline data was written since the last flush, the
    /// record is one RWF_DSYNC write. Otherwise (`data_before`: data of
    /// larger or buffered writes, or records not flushed yet), it is a plain
    /// write followed by a device flush: a FUA write would make the record
    /// durable but not that data, and replay stops at the first record
    /// missing.
    ///
    /// Not `durable` (small buffered writes, nothing else unsynced but
    /// earlier such records): a plain write, not flushed. A power loss keeps
    /// it whole (its data is in it, checked by its crc) or drops it and
    /// every later record, which is what an unflushed write may do.
    async fn commit_journaled(
        &mut self,
        ops: Vec<MetaOp>,
        free: Vec<u64>,
        mut inline: Vec<(u64, IoBuf)>,
        data_before: bool,
        durable: bool,
    ) -> Result<(), String> {
        let mut flush_after = durable && (data_before || self.unsynced.data);
        let encode = |unsynced: &[MetaOp], inline: &[(u64, IoBuf)]| {
            let inline_blocks: usize = inline.iter().map(|(_, b)| b.len() / BLOCK_BYTES).sum();
            let mut encoded = Vec::with_capacity((unsynced.len() + ops.len()) * 48);
            journal::encode_ops(unsynced, &mut encoded);
            journal::encode_ops(&ops, &mut encoded);
            let blocks = journal::record_blocks(encoded.len(), inline.len(), inline_blocks);
            (encoded, blocks as u64)
        };
        let (capacity, room) = {
            let journal = self.journal()?;
            (journal.blocks, journal.blocks - journal.next_block)
        };
        let max_blocks = capacity.min((MAX_RECORD_BYTES / BLOCK_BYTES) as u64);
        let (mut encoded, mut blocks) = encode(&self.unsynced.ops, &inline);
        if blocks > max_blocks && !inline.is_empty() {
            // Too much inline data for one record (a large group of small
            // writes): their data goes to its blocks now, the record holds
            // the changes only and the flush after it covers the data.
            write_home(&self.device, std::mem::take(&mut inline)).await?;
            if !durable {
                // A record must not point at data not flushed: these
                // changes wait for the next sync's record.
                return self.apply_unsynced(ops, free, true).await;
            }
            flush_after = true;
            (encoded, blocks) = encode(&self.unsynced.ops, &inline);
        }
        if blocks > max_blocks {
            return self.checkpoint(ops, free, inline).await;
        }
        if blocks > room {
            // The lap is full: end it (the unsynced changes become durable
            // with it), then this record starts the next one.
            self.checkpoint(Vec::new(), Vec::new(), Vec::new()).await?;
            flush_after = false;
            (encoded, blocks) = encode(&[], &inline);
        }
        let (nonce, seq, at) = {
            let journal = self.journal()?;
            (journal.nonce, journal.next_seq, journal.next_block)
        };
        let mut record = self.device.buffer(blocks as usize * BLOCK_BYTES);
        {
            let runs: Vec<(u64, &[u8])> = inline.iter().map(|(b, buf)| (*b, &buf[..])).collect();
            journal::fill_record(&mut record, nonce, seq, &encoded, &runs);
        }
        let inline_runs: Vec<(u64, u64)> = inline
            .iter()
            .map(|(b, buf)| (*b, (buf.len() / BLOCK_BYTES) as u64))
            .collect();
        // The inline data is in the record, which a replay writes in place
        // again: the writers need not wait for it to land. It goes out once
        // the record is written: sent together, the two completed together.
        let (record_written, after_record) = oneshot::channel();
        if !inline.is_empty() {
            self.write_home_behind(inline, after_record);
        }
        let record_write = async {
            if !durable {
                let (_, written) = self.device.write(at, record).await;
                written.map_err(|e| format!("journal write failed: {e}"))
            } else if flush_after {
                let (_, written) = self.device.write(at, record).await;
                written.map_err(|e| format!("journal write failed: {e}"))?;
                self.device
                    .flush()
                    .await
                    .map_err(|e| format!("flush after journal write failed: {e}"))
            } else {
                let (_, written) = self.device.write_durable(at, record).await;
                written.map_err(|e| format!("journal write failed: {e}"))
            }
        };
        record_write.await?;
        let _ = record_written.send(());
        // The record's changes go into the log after every change logged
        // before (a replay after a kill applies them in that order), marked
        // with its number: RocksDB gets them once a flush covers the record
        // (a durable record is covered now, and so is every change logged
        // before it, as its data was flushed with or before it).
        self.log(&ops, Some(seq)).await?;
        if durable {
            self.meta.mark_flushed(self.meta.logged_seq());
        }
        let journal = self.journal()?;
        journal.next_block += blocks;
        journal.next_seq += 1;
        for (start, len) in inline_runs {
            journal.lap_inline.extend(start..start + len);
        }
        if !durable {
            // The record holds every unsynced change now; the blocks they
            // gave up wait for the flush that makes it durable.
            let unsynced = &mut self.unsynced;
            unsynced.ops.clear();
            unsynced.since.get_or_insert_with(Instant::now);
            unsynced.data = true;
            unsynced.free.extend(free);
            return Ok(());
        }
        self.release_synced(free).await
    }

    /// Writes a group's inline data in place without the writers waiting:
    /// its record holds it, and a replay writes it in place again. Their
    /// objects stay locked until it lands (`HomeLanding`), and a checkpoint,
    /// which ends the lap the record is in, waits for it (`Landings`). A
    /// failed write fails the store: the record is then the only copy, and
    /// the next open writes it in place again.
    ///
    /// It starts when `after` fires or is dropped (the record written, or
    /// its write failed).
    fn write_home_behind(&mut self, inline: Vec<(u64, IoBuf)>, after: oneshot::Receiver<()>) {
        let (landed_tx, landed_rx) = oneshot::channel();
        let landed = Landings::begin(&self.landings);
        let (device, failed) = (self.device.clone(), self.failed.clone());
        tokio::spawn(async move {
            let _ = after.await;
            // Behind the writers' replies, which have tasks to pass through
            // still (as the QD1 application of buffered changes does).
            tokio::task::yield_now().await;
            if let Err(message) = write_home(&device, inline).await {
                tracing::error!(
                    "{message}: the data is in its journal record; refusing further writes"
                );
                failed.store(true, Ordering::Release);
            }
            drop(landed);
            let _ = landed_tx.send(());
        });
        self.home = Some(landed_rx.shared());
    }

    /// A sync when every unsynced change is in a record already written:
    /// one device flush makes them durable.
    async fn flush_records(&mut self, free: Vec<u64>) -> Result<(), String> {
        let logged = self.meta.logged_seq();
        self.device
            .flush()
            .await
            .map_err(|e| format!("flush of journal records failed: {e}"))?;
        self.meta.mark_flushed(logged);
        self.release_synced(free).await
    }

    /// After a durable record: the blocks given up by the changes it made
    /// durable come free (held, if written inline during this lap), and a
    /// checkpoint follows when too many are held.
    async fn release_synced(&mut self, free: Vec<u64>) -> Result<(), String> {
        let unsynced = std::mem::take(&mut self.unsynced);
        let held = {
            let journal = self.journal.as_mut().ok_or("store has no journal")?;
            let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
            for block in unsynced.free.into_iter().chain(free) {
                if journal.lap_inline.remove(&block) {
                    allocator.hold(block);
                } else {
                    allocator.free(block);
                }
            }
            allocator.held_count()
        };
        if held >= HELD_MAX {
            self.checkpoint(Vec::new(), Vec::new(), Vec::new()).await?;
        }
        Ok(())
    }

    /// Ends the journal's lap: inline data to its blocks, a device flush,
    /// then `ops` in a synced RocksDB batch that starts the next lap. Every
    /// held block comes free.
    async fn checkpoint(
        &mut self,
        mut ops: Vec<MetaOp>,
        free: Vec<u64>,
        inline: Vec<(u64, IoBuf)>,
    ) -> Result<(), String> {
        self.settle_deferred(&mut ops).await?;
        // Data written behind its record (`write_home_behind`) must be in
        // place before the lap that holds the record ends.
        self.wait_landed().await?;
        write_home(&self.device, inline).await?;
        // Every logged change goes into RocksDB before the batch that ends
        // the lap (the lap's records are not replayed after it).
        self.flush_and_apply().await?;
        let lap = self.journal()?.next_seq;
        commit_synced(&self.meta, ops, Some(lap)).await?;
        self.checkpoints.fetch_add(1, Ordering::AcqRel);
        let journal = self.journal()?;
        journal.next_block = 0;
        journal.lap_inline.clear();
        let unsynced = std::mem::take(&mut self.unsynced);
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        allocator.release_held();
        for block in unsynced.free.into_iter().chain(free) {
            allocator.free(block);
        }
        Ok(())
    }
}

/// Whether `ops` carry a deferred write's data.
fn holds_deferred(ops: &[MetaOp]) -> bool {
    ops.iter()
        .any(|op| matches!(op, MetaOp::PutDeferred { .. }))
}

/// Sleeps until `at`, or for ever when there is no `at`.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Waits for a write's data to land in place (if it is on its way: a
/// deferred write's task, or a small write's data behind its record), then
/// lets the object go (`guard`).
async fn land<F: std::future::Future>(
    landing: Option<F>,
    guard: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
) {
    if let Some(write) = landing {
        // A task's landing ends when the task does, even if it panicked; a
        // data write behind its record ends even if its sender is dropped.
        let _ = write.await;
    }
    drop(guard);
}

/// Deferred writes whose data write was started and has not landed yet.
#[derive(Default)]
struct Landings {
    state: Mutex<LandingState>,
    landed: tokio::sync::Notify,
}

#[derive(Default)]
struct LandingState {
    next: u64,
    pending: std::collections::BTreeSet<u64>,
}

impl Landings {
    fn state(&self) -> std::sync::MutexGuard<'_, LandingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A deferred write starts its data write; it has ended (landed or
    /// failed) when the returned value is dropped.
    fn begin(landings: &Arc<Landings>) -> Landed {
        let mut state = landings.state();
        let seq = state.next;
        state.next += 1;
        state.pending.insert(seq);
        Landed {
            landings: landings.clone(),
            seq,
        }
    }

    fn in_flight(&self) -> usize {
        self.state().pending.len()
    }

    /// Waits until every data write begun so far has ended (not those begun
    /// meanwhile, so a steady stream of writes cannot hold it up).
    async fn wait_begun(&self) {
        let target = self.state().next;
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            if self
                .state()
                .pending
                .first()
                .is_none_or(|first| *first >= target)
            {
                return;
            }
            landed.await;
        }
    }
}

/// How many writes a store gets between two flushes, on a moving average
/// over about the last eight flushes. A client that flushes after every
/// write (a database committing one page at a time, fio's `fsync=1`) waits
/// for each flush; its small buffered writes are then made durable when
/// written (`write_inner`), which leaves its flushes nothing to do. A store
/// starts at four writes per flush, so fourteen writes each followed by a
/// flush turn it on. A flush with no write since the last one counts as
/// such: two clients that each write and flush in turn (write, write,
/// flush, flush) are at one write per flush. A third write without a flush
/// turns it off at once (`after_each_write`). It is a hint
/// shared by every client of the store (racing updates may lose one): a
/// write of another client that comes first or second after a flush is made
/// durable too, so at most two writes per flush pay a device flush they did
/// not ask for, and only while writes per flush stay that low, which other
/// clients' writes raise.
///
/// Homed size-1 4 KiB random write at QD1 with a flush after each
/// (fio-bench's `randwrite-4k-qd1-fsync`), node1's OSD restarted with either
/// build in turn, 8 s runs, qemu-nbd measured beside each (2026-12-01):
/// 1,999-2,238 -> 2,328-2,641 IOPS (0.69-0.79x -> 0.89-0.92x qemu-nbd); the
/// OSD's CPU per write + flush 97-116 -> 80-87 µs user and 164-176 ->
/// 122-132 µs system: a flush that finds nothing to do costs no io_uring
/// request, no io-wq thread and no wake-up for its completion.
struct FlushPace {
    since_flush: std::sync::atomic::AtomicU32,
    /// Writes per flush in 256ths; each flush moves it an eighth of the way
    /// to its own count.
    average_256ths: std::sync::atomic::AtomicU32,
}

impl FlushPace {
    fn new() -> FlushPace {
        FlushPace {
            since_flush: std::sync::atomic::AtomicU32::new(0),
            average_256ths: std::sync::atomic::AtomicU32::new(4 * 256),
        }
    }

    /// Counts a write; returns the writes since the last flush, this one
    /// included.
    fn wrote(&self) -> u32 {
        self.since_flush
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1)
    }

    fn flushed(&self) {
        let writes = self.since_flush.swap(0, Ordering::Relaxed).min(1 << 16);
        let average = self.average_256ths.load(Ordering::Relaxed);
        let average = an_eighth_toward(u64::from(average), u64::from(writes));
        self.average_256ths.store(average as u32, Ordering::Relaxed);
    }

    /// Whether clients flush after about every write: on average lately,
    /// and still (a write that finds `since_flush` writes, itself included,
    /// since the last flush). A client that stops flushing so gets buffered
    /// writes again from its third write on.
    fn after_each_write(&self, since_flush: u32) -> bool {
        since_flush <= 2
            && self.average_256ths.load(Ordering::Relaxed) <= DURABLE_AT_WRITES_PER_FLUSH_256THS
    }
}

/// Moves a moving average kept in 256ths an eighth of the way to `count`
/// (`FlushPace`, `WriteDepth`).
fn an_eighth_toward(average_256ths: u64, count: u64) -> u64 {
    (average_256ths * 7 + count * 256) / 8
}

/// Writes in progress on a store: how many now, and a moving average of
/// that count as each write found it.
#[derive(Default)]
struct WriteDepth {
    now: AtomicUsize,
    /// In 256ths (rounded down: a steady depth leaves it less than 8/256
    /// below); each write moves it an eighth of the way to its own depth.
    average_256ths: AtomicUsize,
}

impl WriteDepth {
    /// Counts a write in until the returned value is dropped.
    fn enter(&self) -> InProgress<'_> {
        let depth = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        // Racing updates may lose one: it is a hint.
        let average = self.average_256ths.load(Ordering::Relaxed);
        let average = an_eighth_toward(average as u64, depth as u64) as usize;
        self.average_256ths.store(average, Ordering::Relaxed);
        InProgress {
            count: &self.now,
            depth,
            average_256ths: average,
        }
    }
}

/// A write counted in `WriteDepth` until dropped.
struct InProgress<'a> {
    count: &'a AtomicUsize,
    /// Writes in progress when this one started, itself included.
    depth: usize,
    /// The moving average then, in 256ths.
    average_256ths: usize,
}

impl InProgress<'_> {
    /// Whether the store is latency-bound: at most `limit` writes in
    /// progress now and on average lately (`DEFER_WHILE_WRITES_AT_MOST`).
    fn shallow(&self, limit: usize) -> bool {
        self.depth <= limit && self.average_256ths <= limit.saturating_mul(256)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One deferred write's data write in flight (see `Landings::begin`).
struct Landed {
    landings: Arc<Landings>,
    seq: u64,
}

impl Drop for Landed {
    fn drop(&mut self) {
        self.landings.state().pending.remove(&self.seq);
        self.landings.landed.notify_waiters();
    }
}

/// Writes the data of the deferred writes the last run left in RocksDB to
/// their blocks again (a write in place the daemon's death may have cut
/// short) and returns the changes that delete them, for the open's synced
/// batch (after its device flush). A leftover entry is never stale: its
/// blocks cannot be given to another change before a sync, and every sync
/// deletes the entries before it (see "Deferred writes").
async fn replay_deferred<D: BlockDevice>(
    device: &D,
    meta: &MetaStore,
    superblock: &Superblock,
) -> Result<Vec<MetaOp>, StoreError> {
    let mut writes = Vec::new();
    let mut deletes = Vec::new();
    meta.for_each_deferred(|key, disk_block, data| {
        if data.is_empty()
            || !data.len().is_multiple_of(BLOCK_BYTES)
            || data.len() > DEFER_MAX_BYTES
            || !in_data_area(superblock, disk_block, data.len())
        {
            return Err(StoreError::Corrupt(format!(
                "deferred write of {} bytes at disk block {disk_block}, outside the data area",
                data.len()
            )));
        }
        writes.push((disk_block, buffer_with(device, data)));
        deletes.push(MetaOp::DeleteDeferred { key, disk_block });
        Ok(())
    })?;
    for (disk_block, buf) in writes {
        write_replayed(device, disk_block, buf, "replay deferred write").await?;
    }
    if !deletes.is_empty() {
        tracing::info!(
            writes = deletes.len(),
            "deferred writes of the last run written in place again"
        );
    }
    Ok(deletes)
}

/// Whether `len` bytes from disk block `start` on lie in the data area
/// (past the journal, before the end): open checks what it replays (a
/// journal record's inline data, a deferred write's copy) before writing it.
fn in_data_area(superblock: &Superblock, start: u64, len: usize) -> bool {
    let blocks = (len / BLOCK_BYTES) as u64;
    start >= superblock.journal_blocks
        && start
            .checked_add(blocks)
            .is_some_and(|end| end <= superblock.block_count)
}

/// The fewest device reads that can cover `entries` (a range's block
/// entries, `None` for holes): one per stretch of present blocks, each at
/// most `MAX_RUN_BLOCKS` long.
fn fewest_reads(entries: &[Option<BlockEntry>]) -> usize {
    entries
        .chunk_by(|a, b| a.is_some() == b.is_some())
        .filter(|stretch| stretch[0].is_some())
        .map(|stretch| stretch.len().div_ceil(MAX_RUN_BLOCKS as usize))
        .sum()
}

/// A buffer of `device`'s (aligned for its I/O) holding a copy of `data`.
fn buffer_with<D: BlockDevice>(device: &D, data: &[u8]) -> IoBuf {
    let mut buf = device.buffer(data.len());
    buf.copy_from_slice(data);
    buf
}

/// Writes data open replays to disk blocks from `start` on.
async fn write_replayed<D: BlockDevice>(
    device: &D,
    start: u64,
    buf: IoBuf,
    op: &'static str,
) -> Result<(), StoreError> {
    let (_, result) = device.write(start, buf).await;
    result.map_err(|source| StoreError::Io { op, source })
}

/// The crc32c of a block of zeros (a hole reads as one).
fn zero_block_crc() -> u32 {
    static CRC: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *CRC.get_or_init(|| crc32c::crc32c(&[0; BLOCK_BYTES]))
}

/// Writes `len` zero bytes at the start of `file`.
fn write_zeros(file: &std::fs::File, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let chunk = vec![0u8; 4 << 20];
    let mut writer = std::io::BufWriter::new(file);
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        writer.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    writer.flush()
}

/// Writes inline data to its blocks (plain writes, all at once).
async fn write_home<D: BlockDevice>(
    device: &Arc<D>,
    inline: Vec<(u64, IoBuf)>,
) -> Result<(), String> {
    let results = join_all(inline.into_iter().map(|(b, buf)| device.write(b, buf))).await;
    match results.into_iter().find_map(|(_, r)| r.err()) {
        Some(e) => Err(format!("data write failed: {e}")),
        None => Ok(()),
    }
}

/// One synced RocksDB batch (on a blocking thread), starting a journal lap
/// at `lap`. Every logged change must be applied already.
async fn commit_synced(
    meta: &Arc<MetaStore>,
    ops: Vec<MetaOp>,
    lap: Option<u64>,
) -> Result<(), String> {
    let meta = meta.clone();
    tokio::task::spawn_blocking(move || meta.write_marked(&ops, None, lap, true))
        .await
        .map_err(|e| format!("metadata commit task failed: {e}"))?
        .map_err(|e| format!("metadata commit failed: {e}"))
}

/// Logs a replayed journal record's changes at open; when the log has no
/// room, what it holds is flushed and applied first (as
/// `Committer::log`).
async fn log_at_open<D: BlockDevice>(
    device: &D,
    meta: &MetaStore,
    ops: &[MetaOp],
    seq: u64,
) -> Result<(), StoreError> {
    if meta.write_buffered_marked(ops, Some(seq))? {
        return Ok(());
    }
    let logged = meta.logged_seq();
    device.flush().await.map_err(|source| StoreError::Io {
        op: "flush data device at open",
        source,
    })?;
    meta.mark_flushed(logged);
    meta.apply_buffered()?;
    if meta.write_buffered_marked(ops, Some(seq))? {
        return Ok(());
    }
    meta.write_marked(ops, Some(seq), None, false)
}

/// Replays the journal's current lap (see `journal`): inline data to its
/// blocks again, the changes of records not applied yet into the
/// buffered-change log (`log_at_open`).
/// Returns the sequence number of the next record.
async fn replay_journal<D: BlockDevice>(
    device: &D,
    meta: &MetaStore,
    superblock: &Superblock,
) -> Result<u64, StoreError> {
    let (applied, lap) = meta.journal_marks()?;
    let mut next = (applied + 1).max(lap);
    if superblock.journal_blocks == 0 {
        return Ok(next);
    }
    let records = journal::scan(
        device,
        superblock.journal_blocks,
        superblock.journal_nonce,
        lap,
    )
    .await?;
    let mut replayed = 0usize;
    for record in &records {
        for (start, data) in &record.inline {
            if !in_data_area(superblock, *start, data.len()) {
                return Err(StoreError::Corrupt(format!(
                    "journal record {} writes blocks {start}+{}, outside the data area",
                    record.seq,
                    data.len() / BLOCK_BYTES
                )));
            }
            write_replayed(
                device,
                *start,
                buffer_with(device, data),
                "replay journal data",
            )
            .await?;
        }
        if record.seq > applied {
            log_at_open(device, meta, &record.ops, record.seq).await?;
            replayed += 1;
        }
        next = next.max(record.seq + 1);
    }
    if !records.is_empty() {
        tracing::info!(
            records = records.len(),
            replayed,
            applied,
            "journal lap replayed"
        );
    }
    // Records written without a flush (small buffered writes) can outlive
    // an earlier one a power loss dropped, so valid records of this lap may
    // lie beyond the end of the scan, numbered from `next` on. The next lap
    // starts past every number this lap can hold (one record per block at
    // most), so none of them can pass for one of its records.
    Ok(next + superblock.journal_blocks)
}
