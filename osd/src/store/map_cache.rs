//! `MapCache`: the block maps of recently used objects, in memory.
//!
//! Every 4 KiB read and write needs the entry (disk block, crc32c) of its
//! object blocks. From RocksDB that is a memtable or SST lookup: after a few
//! minutes of random writes, ~10 µs of skiplist search per lookup in this VM
//! (perf: `InlineSkipList::FindGreaterOrEqual` was 12% of the store's CPU at
//! QD1). Like BlueStore's onode cache, the store keeps the whole block map of
//! recently used objects here, loaded with one range scan on a miss.
//!
//! Coherence rests on the object locks: a map is loaded only under the
//! object's lock (read or write), and every change to an object's block
//! entries takes its map out before the change goes to the committer and
//! puts it back (updated) only once the commit succeeded, still under the
//! write lock. A caller cancelled while it waits leaves no map behind.
//! A map is loaded on an object's second miss, so a pass over many objects
//! costs point lookups, not whole-object loads that flush the cache.
//!
//! An entry also keeps the object's version (`None`: the object has no
//! record), under the same rules: every change to an object's record goes
//! through one of the paths above. A replica reads the version before every
//! replicated write (to drop a late one); from RocksDB that was a memtable
//! search of the `objects` column family, ~3% of an OSD's CPU at size-3 4 KiB
//! random writes (perf: `FindGreaterOrEqual` under `MetaStore::object_info`).

use std::collections::HashMap;
use std::sync::Mutex;

use super::keys::{BlockEntry, ObjectKey, stripe_of};

const SHARDS: usize = 16;

/// One object's block map (`None` for holes) and version (`None`: no
/// record).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockMap {
    pub version: Option<u64>,
    pub blocks: Vec<Option<BlockEntry>>,
    /// The block after the last write's (`None`: none since the map was
    /// loaded): a write that starts there goes on writing the object in
    /// order, and is placed right after it on disk when it can be.
    pub next: Option<u32>,
}

/// One shard: cached maps, and objects missed once (a map is loaded on
/// the second miss, so a scan over many objects does not flush the cache
/// and cost a whole-object load per 4 KiB I/O).
#[derive(Default)]
struct Shard {
    maps: HashMap<ObjectKey, BlockMap>,
    missed: std::collections::HashSet<ObjectKey>,
}

pub struct MapCache {
    shards: Vec<Mutex<Shard>>,
    per_shard: usize,
}

impl MapCache {
    /// A cache of up to `objects` block maps (0: none kept).
    pub fn new(objects: usize) -> MapCache {
        MapCache {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            per_shard: objects.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &ObjectKey) -> std::sync::MutexGuard<'_, Shard> {
        self.shards[stripe_of(key, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Entries `first .. first + count` of a cached map.
    pub fn get(&self, key: &ObjectKey, first: u32, count: u32) -> Option<Vec<Option<BlockEntry>>> {
        let shard = self.shard(key);
        let map = shard.maps.get(key)?;
        let (first, count) = (first as usize, count as usize);
        map.blocks.get(first..first + count).map(<[_]>::to_vec)
    }

    /// The disk block of the block before `first`, when a write starting at
    /// `first` continues the object's last write (a writer going through
    /// it in order) and that block is cached.
    pub fn stream_after(&self, key: &ObjectKey, first: u32) -> Option<u64> {
        let shard = self.shard(key);
        let map = shard.maps.get(key)?;
        if map.next != Some(first) {
            return None;
        }
        let previous = map.blocks.get(first.checked_sub(1)? as usize)?;
        previous.map(|entry| entry.disk_block)
    }

    /// The version of a cached object (`Some(None)`: cached, no record).
    pub fn version(&self, key: &ObjectKey) -> Option<Option<u64>> {
        self.shard(key).maps.get(key).map(|map| map.version)
    }

    /// Whether a miss on `key` should load its whole map: on its second
    /// miss (or while the cache has room).
    pub fn admit(&self, key: &ObjectKey) -> bool {
        if self.per_shard == 0 {
            return false;
        }
        let mut shard = self.shard(key);
        if shard.maps.len() < self.per_shard || shard.missed.remove(key) {
            return true;
        }
        if shard.missed.len() >= self.per_shard {
            shard.missed.clear();
        }
        shard.missed.insert(*key);
        false
    }

    /// Keeps `map`, the whole block map of an object, dropping another one
    /// if the shard is full.
    pub fn insert(&self, key: &ObjectKey, map: BlockMap) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(key);
        if shard.maps.len() >= self.per_shard
            && !shard.maps.contains_key(key)
            && let Some(victim) = shard.maps.keys().next().copied()
        {
            shard.maps.remove(&victim);
        }
        shard.maps.insert(*key, map);
    }

    /// Takes an object's map out (before a change is sent to the committer:
    /// if the caller is cancelled while waiting, no map is left that the
    /// change may have made stale).
    pub fn take(&self, key: &ObjectKey) -> Option<BlockMap> {
        self.shard(key).maps.remove(key)
    }

    /// Puts back a map taken before a committed write, with entries
    /// `first ..` set to the write's and the version it set.
    pub fn put_back(
        &self,
        key: &ObjectKey,
        mut map: BlockMap,
        first: u32,
        entries: &[BlockEntry],
        version: u64,
    ) {
        let first = first as usize;
        let Some(slots) = map.blocks.get_mut(first..first + entries.len()) else {
            return;
        };
        for (slot, entry) in slots.iter_mut().zip(entries) {
            *slot = Some(*entry);
        }
        map.version = Some(version);
        map.next = u32::try_from(first + entries.len()).ok();
        self.insert(key, map);
    }

    /// Forgets an object's map.
    pub fn invalidate(&self, key: &ObjectKey) {
        self.shard(key).maps.remove(key);
    }
}
