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
//!
//! And a small allocation first looks only at holes *shorter* than
//! `LARGE_HOLE_BLOCKS` that it fits in whole. Next-fit alone let 4 KiB
//! writes eat the large holes from their start while the blocks those
//! writes freed piled up as single holes, so after a while of random
//! overwrites no large hole was left and 1 MiB writes were split again.
//! Filling the holes that random overwrites free at the rate they free
//! them keeps the large ones whole.

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
/// Blocks a small allocation's first pass looks through at most (256 MiB
/// of disk).
const SMALL_HOLE_SCAN_MAX: u64 = 1 << 16;
/// After a first pass fell short, blocks to free before the next one.
const LARGE_HOLE_RETRY_AFTER_FREES: u64 = 1024;
/// The same for small allocations: their pass skips used words and large
/// holes a word at a time (~1,000 steps over `SMALL_HOLE_SCAN_MAX`), and
/// the holes it looks for come back one free at a time.
const SMALL_HOLE_RETRY_AFTER_FREES: u64 = 64;

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
    /// The same for a small allocation's first pass.
    small_short_at: Option<u64>,
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
            small_short_at: None,
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
    /// nothing if fewer than `count` are free. A small allocation fills a
    /// small hole first.
    pub fn allocate(&mut self, count: u64, max_run: u32) -> Option<Vec<Run>> {
        self.allocate_placed(count, max_run, true)
    }

    /// `allocate`, from a large hole first even when small: for the first
    /// write of a run a writer will extend (`allocate_at`).
    pub fn allocate_run(&mut self, count: u64, max_run: u32) -> Option<Vec<Run>> {
        self.allocate_placed(count, max_run, false)
    }

    fn allocate_placed(&mut self, count: u64, max_run: u32, fill: bool) -> Option<Vec<Run>> {
        if count > self.free_count || count == 0 {
            return (count == 0).then(Vec::new);
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut remaining = count;
        let retry_after =
            |short_at: Option<u64>, wait: u64| short_at.is_none_or(|at| self.frees - at >= wait);
        let large = count >= LARGE_ALLOC_BLOCKS;
        if large || !fill {
            if retry_after(self.short_at, LARGE_HOLE_RETRY_AFTER_FREES) {
                let min_hole = if large {
                    count.min(LARGE_HOLE_BLOCKS)
                } else {
                    LARGE_HOLE_BLOCKS
                };
                remaining = self.take_holes(&mut runs, remaining, min_hole, u64::MAX, max_run);
                // Too few large holes: the next large allocations take what
                // there is, without scanning again, until enough was freed.
                self.short_at = (remaining > 0).then_some(self.frees);
            }
        } else if retry_after(self.small_short_at, SMALL_HOLE_RETRY_AFTER_FREES) {
            // One hole it fits in whole, shorter than a large one.
            remaining = self.take_holes(&mut runs, remaining, count, LARGE_HOLE_BLOCKS, max_run);
            self.small_short_at = (remaining > 0).then_some(self.frees);
        }
        remaining = self.take_holes(&mut runs, remaining, 1, u64::MAX, max_run);
        assert_eq!(remaining, 0, "free_count said {count} blocks were free");
        self.free_count -= count;
        Some(runs)
    }

    /// Allocates the `count` blocks from `start` on (as runs of at most
    /// `max_run` blocks) if every one of them is free; nothing otherwise.
    /// For a write that continues an object's previous block on disk.
    pub fn allocate_at(&mut self, start: u64, count: u64, max_run: u32) -> Option<Vec<Run>> {
        let end = start.checked_add(count)?;
        if count == 0 || end > self.block_count || (start..end).any(|b| self.is_used(b)) {
            return None;
        }
        let mut runs = Vec::new();
        for block in start..end {
            self.take(&mut runs, block, max_run);
        }
        self.free_count -= count;
        Some(runs)
    }

    /// Marks free `block` used and adds it to `runs` (to the last run when
    /// it follows it and that run is shorter than `max_run`). The caller
    /// counts it off `free_count`.
    fn take(&mut self, runs: &mut Vec<Run>, block: u64, max_run: u32) {
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
    }

    /// Takes up to `remaining` free blocks, next-fit from the cursor, from
    /// holes of at least `min_hole` and fewer than `max_hole` blocks, into
    /// `runs`; returns how many are still missing. One sweep of the disk at
    /// most (a bounded part of it when choosing holes by size).
    fn take_holes(
        &mut self,
        runs: &mut Vec<Run>,
        mut remaining: u64,
        min_hole: u64,
        max_hole: u64,
        max_run: u32,
    ) -> u64 {
        let limit = if max_hole < u64::MAX {
            self.block_count.min(SMALL_HOLE_SCAN_MAX)
        } else if min_hole > 1 {
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
            if min_hole > 1 || max_hole < u64::MAX {
                // Measure the hole (up to what decides, not past the end).
                let enough = if max_hole < u64::MAX {
                    max_hole
                } else {
                    min_hole
                };
                let mut len = 1;
                while len < enough && !self.is_used(block + len) {
                    len += 1;
                }
                if len >= max_hole {
                    // Too large: skip to its end (whole free words at once),
                    // from where the measure stopped.
                    len += self.hole_len(block + len);
                }
                if len < min_hole || len >= max_hole {
                    block += len;
                    scanned += len;
                    continue;
                }
            }
            // Take the hole from here, as far as it goes and is needed.
            while remaining > 0 && !self.is_used(block) {
                self.take(runs, block, max_run);
                remaining -= 1;
                block += 1;
                scanned += 1;
            }
        }
        self.cursor = block;
        remaining
    }

    /// Length of the hole starting at `start` (to the next used block or
    /// the end of the disk; 0 when `start` is used).
    fn hole_len(&self, start: u64) -> u64 {
        let mut block = start;
        while !self.is_used(block) {
            if block.is_multiple_of(64) && self.words[(block / 64) as usize] == 0 {
                block += 64;
            } else {
                block += 1;
            }
        }
        block - start
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

    /// Small allocations fill the holes random overwrites leave (whole,
    /// when they fit) instead of the start of a large hole next to the
    /// cursor, so the large hole is still whole for a large write after
    /// them; with no small hole left they take from the large one.
    #[test]
    fn small_allocations_leave_large_holes_whole() {
        let mut a = Allocator::new(4096);
        let _all = a.allocate(4096, 4096).unwrap();
        // A large hole right at the cursor, single holes after it, and one
        // hole of 5 blocks.
        for block in 1000..1400 {
            a.free(block);
        }
        for block in (2000..2400).step_by(8) {
            a.free(block);
        }
        for block in 3000..3005 {
            a.free(block);
        }
        a.cursor = 1000;
        for _ in 0..50 {
            let small = a.allocate(1, 256).unwrap();
            assert_eq!(small.len(), 1);
            assert!(
                (2000..2400).contains(&small[0].start),
                "took {small:?}, not a single hole"
            );
        }
        let four = a.allocate(4, 256).unwrap();
        assert_eq!(
            four,
            vec![Run {
                start: 3000,
                len: 4
            }],
            "one hole it fits in"
        );
        // The single holes are used up and the 5-block hole's last block
        // is too small for 2: next-fit takes it and the large hole's first.
        let two = a.allocate(2, 256).unwrap();
        assert_eq!(
            two,
            vec![
                Run {
                    start: 3004,
                    len: 1
                },
                Run {
                    start: 1000,
                    len: 1
                }
            ]
        );
        let large = a.allocate(256, 256).unwrap();
        assert_eq!(large.len(), 1, "the large hole is still one run: {large:?}");
    }

    /// A write placed after its object's previous block gets exactly the
    /// blocks that follow, when they are all free.
    #[test]
    fn allocate_at_takes_the_blocks_asked_for_or_none() {
        let mut a = Allocator::new(200);
        assert_eq!(
            a.allocate(10, 256).unwrap(),
            vec![Run { start: 0, len: 10 }]
        );
        assert_eq!(
            a.allocate_at(50, 5, 2).unwrap(),
            vec![
                Run { start: 50, len: 2 },
                Run { start: 52, len: 2 },
                Run { start: 54, len: 1 }
            ]
        );
        assert_eq!(a.free_count(), 185);
        assert!(a.allocate_at(53, 2, 256).is_none(), "53 is taken");
        assert!(a.allocate_at(198, 3, 256).is_none(), "past the end");
        assert!(a.allocate_at(u64::MAX, 3, 256).is_none());
        assert_eq!(a.free_count(), 185, "a refused allocation takes nothing");
        assert_eq!(a.allocate(1, 256).unwrap(), vec![Run { start: 10, len: 1 }]);
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
