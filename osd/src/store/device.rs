//! `BlockDevice`: the store's only path to its disk.
//!
//! Production uses [`UringDevice`](super::uring::UringDevice) (io_uring,
//! O_DIRECT); tests use [`MemDevice`], which keeps what was flushed apart from
//! what was only written, so a simulated power loss drops exactly the writes a
//! volatile disk cache would, and which can fail I/O or flip bits on demand.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::Mutex;

use super::buffer::{BLOCK_BYTES, BufferPool, IoBuf};

/// A disk of 4 KiB blocks with asynchronous, positional I/O.
///
/// Writes may sit in a volatile cache until `flush` returns; completed
/// writes and reads are not ordered with respect to I/O still in flight.
pub trait BlockDevice: Send + Sync + 'static {
    /// Number of 4 KiB blocks.
    fn block_count(&self) -> u64;

    /// Returns an aligned buffer of `len` bytes suited to this device.
    fn buffer(&self, len: usize) -> IoBuf;

    /// Writes `buf` (a whole number of blocks) at `block`. The buffer comes
    /// back whatever the outcome.
    fn write(&self, block: u64, buf: IoBuf)
    -> impl Future<Output = (IoBuf, io::Result<()>)> + Send;

    /// Writes `buf` at `block` and makes that write durable (RWF_DSYNC).
    /// Only this write: a device with FUA persists it alone, so earlier
    /// writes still need a `flush`. Here a write, then a flush.
    fn write_durable(
        &self,
        block: u64,
        buf: IoBuf,
    ) -> impl Future<Output = (IoBuf, io::Result<()>)> + Send {
        write_then_flush(self, block, buf)
    }

    /// Reads `buf.len()` bytes (a whole number of blocks) from `block`.
    fn read(&self, block: u64, buf: IoBuf) -> impl Future<Output = (IoBuf, io::Result<()>)> + Send;

    /// Makes every completed write durable.
    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send;
}

/// A durable write on a device without FUA: the write, then a flush.
async fn write_then_flush<D: BlockDevice + ?Sized>(
    device: &D,
    block: u64,
    buf: IoBuf,
) -> (IoBuf, io::Result<()>) {
    let (buf, result) = device.write(block, buf).await;
    match result {
        Ok(()) => (buf, device.flush().await),
        Err(e) => (buf, Err(e)),
    }
}

/// Checks that an I/O of `len` bytes at `block` fits a device of
/// `block_count` blocks.
pub(crate) fn check_range(block: u64, len: usize, block_count: u64) -> io::Result<()> {
    if len == 0 || !len.is_multiple_of(BLOCK_BYTES) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let blocks = (len / BLOCK_BYTES) as u64;
    if block
        .checked_add(blocks)
        .is_none_or(|end| end > block_count)
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

/// An in-memory disk with a volatile write cache and fault injection.
pub struct MemDevice {
    block_count: u64,
    pool: BufferPool,
    state: Mutex<MemState>,
    /// Plain writes at or past this block wait while it is set
    /// (`hold_writes_from`).
    hold: tokio::sync::watch::Sender<Option<u64>>,
}

#[derive(Default)]
struct MemState {
    /// Blocks that survive a power loss.
    durable: HashMap<u64, Box<[u8]>>,
    /// Blocks written since the last flush, newest content.
    volatile: HashMap<u64, Box<[u8]>>,
    /// After a power loss every I/O fails, as on a dead disk.
    powered_off: bool,
    /// Fail every write with EIO while set.
    fail_writes: bool,
    /// Fail the writes `hold_writes_from` held, once released, with EIO.
    fail_held: bool,
    /// Report every write done and keep nothing while set.
    lose_writes: bool,
    /// Fail every read with EIO while set.
    fail_reads: bool,
    /// Fail every flush with EIO while set.
    fail_flushes: bool,
    /// `write_durable` persists only its own blocks (a disk with FUA).
    fua: bool,
    writes: u64,
    flushes: u64,
    /// Writes served straight from a caller's `Bytes` (`IoBuf::shared`).
    shared_writes: u64,
}

impl MemDevice {
    /// Creates a zero-filled device of `block_count` blocks.
    pub fn new(block_count: u64) -> MemDevice {
        MemDevice {
            block_count,
            pool: BufferPool::new(64, 8),
            state: Mutex::new(MemState::default()),
            hold: tokio::sync::watch::channel(None).0,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulates a power loss: each unflushed block write is dropped, except
    /// that `keep(block)` may keep some (a cache that flushed part of itself;
    /// always whole blocks, as disks with 4 KiB atomic writes do). Every later
    /// I/O fails until `power_on`.
    pub fn power_loss(&self, mut keep: impl FnMut(u64) -> bool) {
        let mut state = self.state();
        let volatile = std::mem::take(&mut state.volatile);
        for (block, data) in volatile {
            if keep(block) {
                state.durable.insert(block, data);
            }
        }
        state.powered_off = true;
    }

    /// Brings the device back after `power_loss`, with its durable content.
    pub fn power_on(&self) {
        self.state().powered_off = false;
    }

    /// Makes plain writes at or past `block` wait (`Some`), as writes in
    /// flight do, until called again with `None` (or another block); they
    /// then land as the device is at that moment (`lose_writes`).
    pub fn hold_writes_from(&self, block: Option<u64>) {
        self.hold.send_replace(block);
    }

    /// Makes writes fail with EIO (`true`) or succeed again.
    pub fn fail_writes(&self, fail: bool) {
        self.state().fail_writes = fail;
    }

    /// Makes the writes that `hold_writes_from` holds fail with EIO when
    /// they are let go (`true`), while every other write succeeds: a write
    /// in flight that fails, and nothing else.
    pub fn fail_held_writes(&self, fail: bool) {
        self.state().fail_held = fail;
    }

    /// Makes writes report success and keep nothing (`true`), as the
    /// writes in flight when a daemon is killed may never reach the device;
    /// or keep their data again.
    pub fn lose_writes(&self, lose: bool) {
        self.state().lose_writes = lose;
    }

    /// Makes reads fail with EIO (`true`) or succeed again.
    pub fn fail_reads(&self, fail: bool) {
        self.state().fail_reads = fail;
    }

    /// Makes `write_durable` a FUA write (`true`: only its own blocks become
    /// durable) or a write and a flush of the whole cache (the default).
    pub fn set_fua(&self, fua: bool) {
        self.state().fua = fua;
    }

    /// Makes flushes fail with EIO (`true`) or succeed again.
    pub fn fail_flushes(&self, fail: bool) {
        self.state().fail_flushes = fail;
    }

    /// Flips one bit of `block` at `byte`, in whatever copy is current.
    pub fn flip_bit(&self, block: u64, byte: usize) {
        let mut state = self.state();
        let current = match state.volatile.get(&block) {
            Some(data) => data.clone(),
            None => state
                .durable
                .get(&block)
                .cloned()
                .unwrap_or_else(|| vec![0; BLOCK_BYTES].into_boxed_slice()),
        };
        let mut corrupted = current;
        corrupted[byte % BLOCK_BYTES] ^= 0x01;
        match state.volatile.get_mut(&block) {
            Some(slot) => *slot = corrupted,
            None => {
                state.durable.insert(block, corrupted);
            }
        }
    }

    /// Returns (writes, flushes) served so far.
    pub fn counters(&self) -> (u64, u64) {
        let state = self.state();
        (state.writes, state.flushes)
    }

    /// Returns how many writes so far came straight from a caller's `Bytes`
    /// (no copy into an aligned buffer).
    pub fn shared_writes(&self) -> u64 {
        self.state().shared_writes
    }
}

impl MemDevice {
    /// A write: into the volatile cache, or (`durable`, a FUA write)
    /// straight to what survives a power loss.
    fn store_blocks(&self, block: u64, buf: IoBuf, durable: bool) -> (IoBuf, io::Result<()>) {
        if let Err(e) = check_range(block, buf.len(), self.block_count) {
            return (buf, Err(e));
        }
        let mut state = self.state();
        if state.powered_off || state.fail_writes {
            return (buf, Err(eio()));
        }
        state.writes += 1;
        if state.lose_writes {
            return (buf, Ok(()));
        }
        for (i, chunk) in buf.chunks(BLOCK_BYTES).enumerate() {
            let b = block + i as u64;
            let data = chunk.to_vec().into_boxed_slice();
            if durable {
                state.volatile.remove(&b);
                state.durable.insert(b, data);
            } else {
                state.volatile.insert(b, data);
            }
        }
        state.shared_writes += u64::from(buf.is_shared());
        drop(state);
        (buf, Ok(()))
    }
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

/// A read into a shared (read-only) buffer (`IoBuf::shared`).
pub(crate) fn read_only() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        "read into a read-only shared buffer",
    )
}

impl BlockDevice for MemDevice {
    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn buffer(&self, len: usize) -> IoBuf {
        self.pool.get(len)
    }

    async fn write(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        let mut hold = self.hold.subscribe();
        let mut held = false;
        while hold.borrow_and_update().is_some_and(|from| block >= from) {
            held = true;
            if hold.changed().await.is_err() {
                break;
            }
        }
        if held && self.state().fail_held {
            return (buf, Err(eio()));
        }
        self.store_blocks(block, buf, false)
    }

    async fn write_durable(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        if !self.state().fua {
            return write_then_flush(self, block, buf).await;
        }
        self.store_blocks(block, buf, true)
    }

    async fn read(&self, block: u64, mut buf: IoBuf) -> (IoBuf, io::Result<()>) {
        if let Err(e) = check_range(block, buf.len(), self.block_count) {
            return (buf, Err(e));
        }
        if buf.is_shared() {
            return (buf, Err(read_only()));
        }
        let state = self.state();
        if state.powered_off || state.fail_reads {
            return (buf, Err(eio()));
        }
        for (i, chunk) in buf.chunks_mut(BLOCK_BYTES).enumerate() {
            let b = block + i as u64;
            match state.volatile.get(&b).or_else(|| state.durable.get(&b)) {
                Some(data) => chunk.copy_from_slice(data),
                None => chunk.fill(0),
            }
        }
        drop(state);
        (buf, Ok(()))
    }

    async fn flush(&self) -> io::Result<()> {
        let mut state = self.state();
        if state.powered_off || state.fail_flushes {
            return Err(eio());
        }
        let volatile = std::mem::take(&mut state.volatile);
        state.durable.extend(volatile);
        state.flushes += 1;
        Ok(())
    }
}

impl<T: BlockDevice> BlockDevice for std::sync::Arc<T> {
    fn block_count(&self) -> u64 {
        (**self).block_count()
    }

    fn buffer(&self, len: usize) -> IoBuf {
        (**self).buffer(len)
    }

    fn write(
        &self,
        block: u64,
        buf: IoBuf,
    ) -> impl Future<Output = (IoBuf, io::Result<()>)> + Send {
        (**self).write(block, buf)
    }

    fn write_durable(
        &self,
        block: u64,
        buf: IoBuf,
    ) -> impl Future<Output = (IoBuf, io::Result<()>)> + Send {
        (**self).write_durable(block, buf)
    }

    fn read(&self, block: u64, buf: IoBuf) -> impl Future<Output = (IoBuf, io::Result<()>)> + Send {
        (**self).read(block, buf)
    }

    fn flush(&self) -> impl Future<Output = io::Result<()>> + Send {
        (**self).flush()
    }
}
