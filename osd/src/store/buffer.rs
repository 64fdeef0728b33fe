//! `IoBuf` and `BufferPool`: 4 KiB-aligned buffers for O_DIRECT I/O.
//!
//! O_DIRECT needs buffers aligned to the logical block size; io_uring's fixed
//! buffers save the kernel a page pin per I/O. The pool carves one aligned
//! allocation into small (one block) and large (up to `LARGE_BUFFER_BYTES`)
//! slots that a ring registers once. When the pool is empty a buffer comes
//! from the heap instead (still aligned, just not registered), so a burst
//! never fails for lack of buffers.
//!
//! A buffer handed to the kernel must outlive any future that gave it up:
//! every `IoBuf` is owned (moved into the request, handed back on completion)
//! and frees itself on drop, back into the pool when it came from there.
//!
//! A write may also go out straight from the `Bytes` its data arrived in,
//! when they happen to be aligned (`IoBuf::shared`: the frame decoder and the
//! NBD gateway put large payloads' blocks at aligned addresses): no copy into
//! a pool slot. Such a buffer is read-only; nothing reads into it.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

/// Size of one store block and the O_DIRECT alignment.
pub const BLOCK_BYTES: usize = 4096;
// Block crcs hashed on arrival (`basalt_wire::crc`) are the store's.
const _: () = assert!(BLOCK_BYTES == basalt_wire::crc::CRC_BLOCK_BYTES);

/// Size of a large pool slot: the longest run one I/O covers.
pub const LARGE_BUFFER_BYTES: usize = 1 << 20;

/// An owned, 4 KiB-aligned byte buffer, possibly a registered pool slot.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    capacity: usize,
    origin: Origin,
}

enum Origin {
    Heap,
    Pool {
        pool: Arc<PoolInner>,
        slot: u16,
    },
    /// Read-only memory of a `Bytes`, held (never read through this field)
    /// until the buffer is dropped.
    Shared {
        _bytes: bytes::Bytes,
    },
}

// SAFETY: an IoBuf uniquely owns its memory (a heap allocation or a pool slot
// that no one else holds until the buffer is dropped), or holds a reference
// to immutable `Bytes` and never hands out mutable access to it.
unsafe impl Send for IoBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates a zeroed heap buffer of `len` bytes (rounded up to a block).
    pub fn heap(len: usize) -> IoBuf {
        let capacity = len.max(1).next_multiple_of(BLOCK_BYTES);
        let layout = Layout::from_size_align(capacity, BLOCK_BYTES)
            .expect("block-rounded sizes form a valid layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        IoBuf {
            ptr,
            len,
            capacity,
            origin: Origin::Heap,
        }
    }

    /// A read-only buffer over `bytes`, when they are block-aligned in
    /// memory and a non-zero number of blocks long (what O_DIRECT takes);
    /// `None` otherwise. Only ever written from, never read into.
    pub fn shared(bytes: bytes::Bytes) -> Option<IoBuf> {
        let len = bytes.len();
        if len == 0
            || !len.is_multiple_of(BLOCK_BYTES)
            || !(bytes.as_ptr() as usize).is_multiple_of(BLOCK_BYTES)
        {
            return None;
        }
        let ptr = NonNull::new(bytes.as_ptr().cast_mut())?;
        Some(IoBuf {
            ptr,
            len,
            capacity: len,
            origin: Origin::Shared { _bytes: bytes },
        })
    }

    /// Whether this buffer is read-only memory of a `Bytes` (`shared`).
    pub fn is_shared(&self) -> bool {
        matches!(self.origin, Origin::Shared { .. })
    }

    /// Returns the registered buffer index, if this is a pool slot.
    pub fn fixed_index(&self) -> Option<u16> {
        match &self.origin {
            Origin::Heap | Origin::Shared { .. } => None,
            Origin::Pool { slot, .. } => Some(*slot),
        }
    }

    /// Returns the start of the buffer, for the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Returns the start of the buffer, for the kernel to fill.
    ///
    /// # Panics
    /// On a shared buffer, which is read-only.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        assert!(!self.is_shared(), "a shared IoBuf is read-only");
        self.ptr.as_ptr()
    }

    /// Returns the capacity in bytes.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sets the length, which must fit the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.capacity, "IoBuf length {len} over capacity");
        self.len = len;
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for capacity >= len bytes, initialised (zeroed
        // at allocation, or a `Bytes`' contents), and owned or kept alive by
        // the `Bytes` held.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    /// # Panics
    /// On a shared buffer, which is read-only.
    fn deref_mut(&mut self) -> &mut [u8] {
        assert!(!self.is_shared(), "a shared IoBuf is read-only");
        // SAFETY: as in `deref`, and `&mut self` gives exclusive access (a
        // shared buffer never gets here).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        match &self.origin {
            Origin::Heap => {
                let layout = Layout::from_size_align(self.capacity, BLOCK_BYTES)
                    .expect("layout was valid at allocation");
                // SAFETY: allocated in `heap` with this layout.
                unsafe { dealloc(self.ptr.as_ptr(), layout) };
            }
            Origin::Pool { pool, slot } => pool.release(*slot),
            Origin::Shared { .. } => {}
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("len", &self.len)
            .field("fixed_index", &self.fixed_index())
            .finish()
    }
}

struct PoolInner {
    base: NonNull<u8>,
    layout: Layout,
    /// (offset, capacity) of each slot; the slot number is its fixed index.
    slots: Vec<(usize, usize)>,
    free_small: Mutex<Vec<u16>>,
    free_large: Mutex<Vec<u16>>,
    small_count: usize,
}

// SAFETY: the region is plain memory; slots are handed out exclusively under
// the free-list mutexes.
unsafe impl Send for PoolInner {}
// SAFETY: as above.
unsafe impl Sync for PoolInner {}

impl PoolInner {
    fn release(&self, slot: u16) {
        let list = if (slot as usize) < self.small_count {
            &self.free_small
        } else {
            &self.free_large
        };
        list.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        // SAFETY: allocated in `BufferPool::new` with this layout; every IoBuf
        // holds an Arc to us, so none is alive.
        unsafe { dealloc(self.base.as_ptr(), self.layout) };
    }
}

/// A fixed set of aligned buffers that a ring can register once.
#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<PoolInner>,
}

impl BufferPool {
    /// Creates a pool of `small_count` one-block slots and `large_count`
    /// slots of `LARGE_BUFFER_BYTES`.
    pub fn new(small_count: usize, large_count: usize) -> BufferPool {
        assert!(small_count + large_count <= u16::MAX as usize);
        let total = (small_count * BLOCK_BYTES + large_count * LARGE_BUFFER_BYTES).max(BLOCK_BYTES);
        let layout =
            Layout::from_size_align(total, BLOCK_BYTES).expect("pool size forms a valid layout");
        // SAFETY: non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let base = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        let mut slots = Vec::with_capacity(small_count + large_count);
        for i in 0..small_count {
            slots.push((i * BLOCK_BYTES, BLOCK_BYTES));
        }
        let large_base = small_count * BLOCK_BYTES;
        for i in 0..large_count {
            slots.push((large_base + i * LARGE_BUFFER_BYTES, LARGE_BUFFER_BYTES));
        }
        let free_small = (0..small_count as u16).rev().collect();
        let free_large = (small_count as u16..(small_count + large_count) as u16)
            .rev()
            .collect();
        BufferPool {
            inner: Arc::new(PoolInner {
                base,
                layout,
                slots,
                free_small: Mutex::new(free_small),
                free_large: Mutex::new(free_large),
                small_count,
            }),
        }
    }

    /// Returns a buffer of `len` bytes: a pool slot when one fits and is
    /// free, else a heap buffer. Contents are unspecified (callers overwrite
    /// or read into it).
    pub fn get(&self, len: usize) -> IoBuf {
        let list = if len <= BLOCK_BYTES {
            &self.inner.free_small
        } else if len <= LARGE_BUFFER_BYTES {
            &self.inner.free_large
        } else {
            return IoBuf::heap(len);
        };
        let slot = list.lock().unwrap_or_else(|e| e.into_inner()).pop();
        match slot {
            Some(slot) => {
                let (offset, capacity) = self.inner.slots[slot as usize];
                // SAFETY: offset lies inside the pool's allocation.
                let ptr = unsafe { NonNull::new_unchecked(self.inner.base.as_ptr().add(offset)) };
                IoBuf {
                    ptr,
                    len,
                    capacity,
                    origin: Origin::Pool {
                        pool: self.inner.clone(),
                        slot,
                    },
                }
            }
            None => IoBuf::heap(len),
        }
    }

    /// Returns `(address, length)` of every slot, in fixed-index order, for
    /// registration with a ring. Valid while the pool lives.
    pub fn iovecs(&self) -> Vec<libc::iovec> {
        self.inner
            .slots
            .iter()
            .map(|(offset, capacity)| libc::iovec {
                // SAFETY: offset lies inside the allocation.
                iov_base: unsafe { self.inner.base.as_ptr().add(*offset) }.cast(),
                iov_len: *capacity,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_hands_out_aligned_slots_and_takes_them_back() {
        let pool = BufferPool::new(2, 1);
        let a = pool.get(4096);
        let b = pool.get(100);
        let c = pool.get(4096); // small slots exhausted: heap
        assert_eq!(a.as_ptr() as usize % BLOCK_BYTES, 0);
        assert!(a.fixed_index().is_some() && b.fixed_index().is_some());
        assert!(c.fixed_index().is_none());
        assert_eq!(c.as_ptr() as usize % BLOCK_BYTES, 0);
        let big = pool.get(8192);
        assert_eq!(big.fixed_index(), Some(2));
        assert_eq!(big.len(), 8192);
        drop(a);
        let again = pool.get(4096);
        assert!(again.fixed_index().is_some());
        assert!(pool.get(2 << 20).fixed_index().is_none());
    }

    /// `blocks` blocks of `fill`, and where in them the first aligned
    /// address is (room for one more block of those).
    fn backing(blocks: usize, fill: u8) -> (bytes::Bytes, usize) {
        let mut backing = bytes::BytesMut::with_capacity(blocks * BLOCK_BYTES);
        backing.resize(blocks * BLOCK_BYTES, fill);
        let bytes = backing.freeze();
        let at = bytes.as_ptr() as usize;
        (bytes, at.next_multiple_of(BLOCK_BYTES) - at)
    }

    #[test]
    fn shared_buffers_take_aligned_bytes_only() {
        let (bytes, skip) = backing(4, 7);
        let aligned = bytes.slice(skip..skip + 2 * BLOCK_BYTES);
        let buf = IoBuf::shared(aligned.clone()).expect("aligned blocks");
        assert!(buf.is_shared() && buf.fixed_index().is_none());
        assert_eq!(buf.as_ptr(), aligned.as_ptr());
        assert_eq!(&buf[..], &aligned[..]);
        assert!(IoBuf::shared(bytes.slice(skip + 1..skip + 1 + BLOCK_BYTES)).is_none());
        assert!(IoBuf::shared(bytes.slice(skip..skip + 100)).is_none());
        assert!(IoBuf::shared(bytes::Bytes::new()).is_none());
        // The buffer keeps the memory alive after every other handle is gone.
        drop((bytes, aligned));
        assert!(buf.iter().all(|b| *b == 7));
    }

    #[test]
    #[should_panic(expected = "read-only")]
    fn shared_buffers_are_read_only() {
        let (bytes, skip) = backing(2, 0);
        let mut buf = IoBuf::shared(bytes.slice(skip..skip + BLOCK_BYTES)).expect("aligned");
        buf[0] = 1;
    }

    #[test]
    fn buffers_are_writable_to_their_length() {
        let pool = BufferPool::new(1, 1);
        let mut buf = pool.get(3 * BLOCK_BYTES);
        buf.fill(0xab);
        assert!(buf.iter().all(|b| *b == 0xab));
        assert_eq!(buf.capacity(), LARGE_BUFFER_BYTES);
    }
}
