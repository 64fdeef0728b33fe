//! `Allocator`: which 4 KiB blocks of the disk are in use.
//!
//! Kept in memory only and rebuilt from the metadata at start: the metadata
//! is the truth, so a crash can never leak or double-allocate a block. Blocks
//! handed out for a write in flight are in use here but referenced by no
//! metadata yet; if the process dies they are free again after restart.
//! Next-fit from a moving cursor keeps sequential writes in long runs.
//!
//! A large allocation (a write of 64 KiB or more) first looks only at holes
//! of at least `LARGE_HOLE_BLOCKS` (or its own size): after random 4 KiB
//! overwrites the blocks they freed lie one by one all over the disk, and
//! plain next-fit laid a 1 MiB write over up to 256 of them, one I/O each,
//! to write and to read back. Single-block holes are left to small writes.

/// A run of consecutive disk blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u32,
}

/// Allocations of at least this many blocks look for large holes first.
const LARGE_ALLOC_BLOCKS: u64 = 16;
/// Smallest hole a large allocation takes in its first pass: 256 KiB.
const LARGE_HOLE_BLOCKS: u64 = 64;
/// Blocks the first pass looks through at most (1 GiB of disk).
const LARGE_HOLE_SCAN_MAX: u64 = 1 << 18;
/// After a first pass fell short, blocks to free before the next one.
const LARGE_HOLE_RETRY_AFTER_FREES: u64 = 1024;

/// A bitmap allocator over `block_count` blocks.
///
/// A second bitmap marks blocks shared by more than one object (snapshots,
/// clones): their reference counts live in the metadata, and only blocks
/// marked here need a metadata lookup before they can be freed.
#[derive(Debug)]
pub struct Allocator {
    words: Vec<u64>,
    shared: Vec<u64>,
    block_count: u64,
    free_count: u64,
    cursor: u64,
    /// Blocks given up but not yet reusable (see `hold`).
    held: Vec<u64>,
    /// Blocks freed since open, and that count when a large allocation's
    /// first pass last fell short (`None`: it did not).
    frees: u64,
    short_at: Option<u64>,
}

impl Allocator {
    /// Returns an allocator with every block free.
    pub fn new(block_count: u64) -> Allocator {
        let mut words = vec![0u64; block_count.div_ceil(64) as usize];
        // Blocks past the end are permanently used.
        let tail = block_count % 64;
        if tail != 0
            && let Some(last) = words.last_mut()
        {
            *last = !0u64 << tail;
        }
        Allocator {
            shared: vec![0u64; words.len()],
            words,
            block_count,
            free_count: block_count,
            cursor: 0,
            held: Vec::new(),
            frees: 0,
            short_at: None,
        }
    }

    /// Marks blocks `0 .. count` permanently used (the store's journal).
    pub fn reserve_prefix(&mut self, count: u64) {
        for block in 0..count.min(self.block_count) {
            self.mark_used(block);
        }
    }

    /// Keeps `block` (used, referenced by no metadata any more) out of reuse
    /// until `release_held`: its content may still be rewritten by a journal
    /// replay.
    pub fn hold(&mut self, block: u64) {
        assert!(self.is_used(block), "hold of free block {block}");
        self.held.push(block);
    }

    /// Returns the number of held blocks.
    pub fn held_count(&self) -> u64 {
        self.held.len() as u64
    }

    /// Returns the held blocks.
    pub fn held(&self) -> &[u64] {
        &self.held
    }

    /// Frees every held block.
    pub fn release_held(&mut self) {
        for block in std::mem::take(&mut self.held) {
            self.free(block);
        }
    }

    /// Returns the number of free blocks.
    pub fn free_count(&self) -> u64 {
        self.free_count
    }

    /// Returns the number of blocks managed.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Returns whether `block` is in use.
    pub fn is_used(&self, block: u64) -> bool {
        block >= self.block_count || self.words[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Returns whether `block` is shared by several objects.
    pub fn is_shared(&self, block: u64) -> bool {
        block < self.block_count && self.shared[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// Marks `block` as shared (`true`) or held by one object.
    pub fn set_shared(&mut self, block: u64, shared: bool) {
        if block >= self.block_count {
            return;
        }
        let word = &mut self.shared[(block / 64) as usize];
        if shared {
            *word |= 1 << (block % 64);
        } else {
            *word &= !(1 << (block % 64));
        }
    }

    /// Marks `block` used while rebuilding; returns false if it already was
    /// (a block referenced twice) or is out of range.
    pub fn mark_used(&mut self, block: u64) -> bool {
        if self.is_used(block) {
            return false;
        }
        self.words[(block / 64) as usize] |= 1 << (block % 64);
        self.free_count -= 1;
        true
    }

    /// Allocates `count` blocks as runs of at most `max_run` blocks, or
    /// nothing if fewer than `count` are free.
    pub fn allocate(&mut self, count: u64, max_run: u32) -> Option<Vec<Run>> {
        if count > self.free_count || count == 0 {
            return (count == 0).then(Vec::new);
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut remaining = count;
        let retry = self
            .short_at
            .is_none_or(|at| self.frees - at >= LARGE_HOLE_RETRY_AFTER_FREES);
        if count >= LARGE_ALLOC_BLOCKS && retry {
            let min_hole = count.min(LARGE_HOLE_BLOCKS);
            remaining = self.take_holes(&mut runs, remaining, min_hole, max_run);
            // Too few large holes: the next large allocations take what
            // there is, without scanning again, until enough was freed.
            self.short_at = (remaining > 0).then_some(self.frees);
        }
        remaining = self.take_holes(&mut runs, remaining, 1, max_run);
        assert_eq!(remaining, 0, "free_count said {count} blocks were free");
        self.free_count -= count;
        Some(runs)
    }

    /// Takes up to `remaining` free blocks, next-fit from the cursor, from
    /// holes of at least `min_hole` blocks, into `runs`; returns how many
    /// are still missing. One sweep of the disk at most (a bounded part of
    /// it when looking for large holes).
    fn take_holes(
        &mut self,
        runs: &mut Vec<Run>,
        mut remaining: u64,
        min_hole: u64,
        max_run: u32,
    ) -> u64 {
        let limit = if min_hole > 1 {
            self.block_count.min(LARGE_HOLE_SCAN_MAX)
        } else {
            self.block_count
        };
        let mut block = self.cursor;
        let mut scanned = 0u64;
        while remaining > 0 && scanned < limit {
            if block >= self.block_count {
                block = 0;
            }
            // Skip whole used words quickly.
            let word = self.words[(block / 64) as usize];
            if block.is_multiple_of(64) && word == !0u64 {
                block += 64;
                scanned += 64;
                continue;
            }
            if self.is_used(block) {
                block += 1;
                scanned += 1;
                continue;
            }
            if min_hole > 1 {
                // Measure the hole (up to `min_hole`, not past the end).
                let mut len = 1;
                while len < min_hole && !self.is_used(block + len) {
                    len += 1;
                }
                if len < min_hole {
                    block += len;
                    scanned += len;
                    continue;
                }
            }
            // Take the hole from here, as far as it goes and is needed.
            while remaining > 0 && !self.is_used(block) {
                self.words[(block / 64) as usize] |= 1 << (block % 64);
                match runs.last_mut() {
                    Some(run) if run.start + run.len as u64 == block && run.len < max_run => {
                        run.len += 1;
                    }
                    _ => runs.push(Run {
                        start: block,
                        len: 1,
                    }),
                }
                remaining -= 1;
                block += 1;
                scanned += 1;
            }
        }
        self.cursor = block;
        remaining
    }

    /// Frees one block; freeing a free or shared block is a bug.
    pub fn free(&mut self, block: u64) {
        assert!(self.is_used(block), "double free of block {block}");
        assert!(!self.is_shared(block), "free of shared block {block}");
        assert!(
            block < self.block_count,
            "free of block {block} out of range"
        );
        self.words[(block / 64) as usize] &= !(1 << (block % 64));
        self.free_count += 1;
        self.frees += 1;
    }

    /// Frees every block of `runs`.
    pub fn free_runs(&mut self, runs: &[Run]) {
        for run in runs {
            for block in run.start..run.start + run.len as u64 {
                self.free(block);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_runs_and_refuses_when_full() {
        let mut a = Allocator::new(100);
        let runs = a.allocate(10, 4).unwrap();
        assert_eq!(runs.iter().map(|r| r.len as u64).sum::<u64>(), 10);
        assert!(runs.iter().all(|r| r.len <= 4));
        assert_eq!(a.free_count(), 90);
        assert!(a.allocate(91, 64).is_none());
        assert_eq!(a.free_count(), 90, "a refused allocation takes nothing");
        let rest = a.allocate(90, 64).unwrap();
        assert_eq!(rest.iter().map(|r| r.len as u64).sum::<u64>(), 90);
        assert_eq!(a.free_count(), 0);
        a.free_runs(&runs);
        assert_eq!(a.free_count(), 10);
        let again = a.allocate(10, 64).unwrap();
        assert_eq!(again, vec![Run { start: 0, len: 10 }]);
    }

    /// After single blocks were freed all over a full disk, a large
    /// allocation takes a large hole, not the single blocks; a small one
    /// fills single holes; when no large hole is left the large one still
    /// gets its blocks.
    #[test]
    fn large_allocations_take_large_holes() {
        let mut a = Allocator::new(4096);
        let all = a.allocate(4096, 4096).unwrap();
        assert_eq!(a.free_count(), 0);
        drop(all);
        // Every 8th block of the first half free, and one hole of 300
        // blocks near the end.
        for block in (0..2048).step_by(8) {
            a.free(block);
        }
        for block in 3500..3800 {
            a.free(block);
        }
        a.cursor = 0;
        let large = a.allocate(256, 256).unwrap();
        assert_eq!(
            large,
            vec![Run {
                start: 3500,
                len: 256
            }]
        );
        let small = a.allocate(1, 256).unwrap();
        assert_eq!(small.len(), 1);
        assert!(small[0].start >= 3756, "next-fit goes on from the cursor");
        // 44 blocks left in the large hole: below LARGE_HOLE_BLOCKS for a
        // 64-block request, so those come from the single holes.
        a.cursor = 0;
        let medium = a.allocate(64, 256).unwrap();
        assert_eq!(medium.iter().map(|r| r.len as u64).sum::<u64>(), 64);
        assert!(medium.iter().all(|r| r.len == 1 && r.start < 2048));
        assert_eq!(a.free_count(), 256 + 300 - 256 - 1 - 64);
    }

    #[test]
    fn rebuild_detects_double_references() {
        let mut a = Allocator::new(70);
        assert!(a.mark_used(65));
        assert!(!a.mark_used(65));
        assert!(!a.mark_used(70), "past the end");
        assert_eq!(a.free_count(), 69);
        let all = a.allocate(69, 1000).unwrap();
        assert!(
            all.iter()
                .all(|r| !(r.start..r.start + r.len as u64).contains(&65))
        );
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut a = Allocator::new(8);
        a.free(3);
    }
}
