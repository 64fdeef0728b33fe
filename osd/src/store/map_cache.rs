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
//! entries updates or drops its map while the writer still holds the write
//! lock, after its commit returned (or failed).

use std::collections::HashMap;
use std::sync::Mutex;

use super::keys::{BlockEntry, ObjectKey, stripe_of};

const SHARDS: usize = 16;

/// One object's block map: `None` for holes.
type BlockMap = Vec<Option<BlockEntry>>;

pub struct MapCache {
    shards: Vec<Mutex<HashMap<ObjectKey, BlockMap>>>,
    per_shard: usize,
}

impl MapCache {
    /// A cache of up to `objects` block maps (0: none kept).
    pub fn new(objects: usize) -> MapCache {
        MapCache {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_shard: objects.div_ceil(SHARDS),
        }
    }

    fn shard(&self, key: &ObjectKey) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, BlockMap>> {
        self.shards[stripe_of(key, SHARDS)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Entries `first .. first + count` of a cached map.
    pub fn get(&self, key: &ObjectKey, first: u32, count: u32) -> Option<Vec<Option<BlockEntry>>> {
        let shard = self.shard(key);
        let map = shard.get(key)?;
        let (first, count) = (first as usize, count as usize);
        map.get(first..first + count).map(<[_]>::to_vec)
    }

    /// Keeps `map`, the whole block map of an object, dropping another one
    /// if the shard is full.
    pub fn insert(&self, key: &ObjectKey, map: BlockMap) {
        if self.per_shard == 0 {
            return;
        }
        let mut shard = self.shard(key);
        if shard.len() >= self.per_shard
            && !shard.contains_key(key)
            && let Some(victim) = shard.keys().next().copied()
        {
            shard.remove(&victim);
        }
        shard.insert(*key, map);
    }

    /// Sets entries `first ..` of a cached map (after a committed write).
    pub fn update(&self, key: &ObjectKey, first: u32, entries: &[BlockEntry]) {
        let mut shard = self.shard(key);
        let Some(map) = shard.get_mut(key) else {
            return;
        };
        let first = first as usize;
        match map.get_mut(first..first + entries.len()) {
            Some(slots) => {
                for (slot, entry) in slots.iter_mut().zip(entries) {
                    *slot = Some(*entry);
                }
            }
            None => {
                shard.remove(key);
            }
        }
    }

    /// Forgets an object's map.
    pub fn invalidate(&self, key: &ObjectKey) {
        self.shard(key).remove(key);
    }
}
