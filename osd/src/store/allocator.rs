//! `Allocator`: which 4 KiB blocks of the disk are in use.
//!
//! Kept in memory only and rebuilt from the metadata at start: the metadata
//! is the truth, so a crash can never leak or double-allocate a block. Blocks
//! handed out for a write in flight are in use here but referenced by no
//! metadata yet; if the process dies they are free again after restart.
//! Next-fit from a moving cursor keeps sequential writes in long runs.

/// A run of consecutive disk blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub start: u64,
    pub len: u32,
}

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
        let mut block = self.cursor;
        let mut scanned = 0u64;
        while remaining > 0 && scanned < self.block_count {
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
            if !self.is_used(block) {
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
            }
            block += 1;
            scanned += 1;
        }
        assert_eq!(remaining, 0, "free_count said {count} blocks were free");
        self.free_count -= count;
        self.cursor = block;
        Some(runs)
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
