//! `UringDevice`: a file or block device driven by io_uring with O_DIRECT.
//!
//! The ring lives on the tokio runtime, without a thread of its own: a
//! caller pushes its request and submits it (`io_uring_enter`, never
//! waiting), and one reaper task, woken through an eventfd registered with
//! the ring (tokio's `AsyncFd`), drains completions and hands each back. On
//! the OSD's one-thread runtime an I/O so costs no thread hand-off at all:
//! a 4 KiB read used to wake the ring thread and then the runtime thread
//! again (four context switches per op with the network's two, each dear in
//! a VM); now the runtime thread submits and is woken once by the
//! completion. Each request owns its buffer until its completion arrives,
//! so a caller that drops its future can never leave the kernel writing
//! into freed memory; dropping the ring waits for what is in flight.
//!
//! Rejected: tokio-uring (unmaintained, !Send files, pins an old io-uring);
//! a ring thread per device (what this was): `store-bench`, same machine,
//! old and new binaries alternated: QD1 4 KiB read 96-109 us above raw fio
//! with the thread, 18-43 us without; QD32 reads 0.72-0.75x raw -> 0.79-0.96x;
//! QD1 durable writes 0.31-0.35x -> 0.41-0.46x; QD32 buffered writes about
//! even (0.46-0.53x -> 0.40-0.51x, the submissions now share the runtime's
//! threads). Also rejected: deferring submissions to the reaper task to
//! batch them (one more task hop per op, no gain measured). And polling
//! the ring for a while before the runtime thread sleeps (an
//! `on_thread_park` hook, `sched_yield` between looks, as qemu polls):
//! store-bench, QD1 4 KiB read latency over raw, alternated runs: 10.7-16.6
//! us without, 6.8-21.5 us with 60 or 200 us of polling; QD1 durable write
//! 0.63-0.71x raw either way. The wake-up it saves is a few microseconds
//! here, not worth CPU taken from the other daemons on the same cores.
//! Deferred completions (`IORING_SETUP_DEFER_TASKRUN`) were even with this
//! within the noise, for a ring only one thread may enter: docs/design.md.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use io_uring::{IoUring, opcode, types};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use super::buffer::{BLOCK_BYTES, BufferPool, IoBuf};
use super::device::{BlockDevice, check_range, read_only};

/// Settings of a ring.
#[derive(Clone, Debug)]
pub struct UringConfig {
    /// Most I/Os in flight at once (and ring size). Default 256.
    pub io_depth_max: u32,
    /// One-block registered buffers. Default 1024 (4 MiB).
    pub small_buffers: usize,
    /// 1 MiB registered buffers. Default 32 (32 MiB).
    pub large_buffers: usize,
}

impl Default for UringConfig {
    fn default() -> Self {
        Self {
            io_depth_max: 256,
            small_buffers: 1024,
            large_buffers: 32,
        }
    }
}

enum Kind {
    /// `dsync`: with RWF_DSYNC (the write and every completed one durable).
    Write {
        block: u64,
        dsync: bool,
    },
    Read {
        block: u64,
    },
    Flush,
}

struct Request {
    kind: Kind,
    buf: Option<IoBuf>,
    done: oneshot::Sender<(Option<IoBuf>, io::Result<()>)>,
}

/// A disk file opened with O_DIRECT, served by an io_uring on the tokio
/// runtime it was opened on.
pub struct UringDevice {
    ring: Arc<Mutex<Ring>>,
    /// Calls `io_uring_enter` outside the lock, one thread at a time.
    submitter: Arc<Submitter>,
    pool: BufferPool,
    block_count: u64,
    reaper: tokio::task::JoinHandle<()>,
}

impl UringDevice {
    /// Opens `path` (which must exist and be a whole number of blocks long)
    /// and starts its completion reaper on the current tokio runtime.
    pub fn open(path: &Path, config: &UringConfig) -> io::Result<UringDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)?;
        let len = device_len(&file)?;
        let block_count = len / BLOCK_BYTES as u64;
        let pool = BufferPool::new(config.small_buffers, config.large_buffers);
        // SAFETY: eventfd returns a new descriptor we own, or -1.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let event = unsafe { OwnedFd::from_raw_fd(raw) };
        let depth = config.io_depth_max.max(8);
        let ring = Ring::new(file, &event, depth, &pool)?;
        let submitter = Arc::new(Submitter {
            ring_fd: ring.ring.as_raw_fd(),
            pending: AtomicUsize::new(0),
            scheduled: AtomicBool::new(false),
        });
        let ring = Arc::new(Mutex::new(ring));
        // SAFETY: the OwnedFd is a valid open eventfd that the AsyncFd owns
        // for its whole life, so the descriptor stays the same.
        let event =
            unsafe { AsyncFd::register_with_interest(event, tokio::io::Interest::READABLE) }
                .map_err(io::Error::from)?;
        let reaper = tokio::spawn(reap(ring.clone(), submitter.clone(), event));
        Ok(UringDevice {
            ring,
            submitter,
            pool,
            block_count,
            reaper,
        })
    }

    async fn submit(&self, kind: Kind, buf: Option<IoBuf>) -> (Option<IoBuf>, io::Result<()>) {
        let (done, wait) = oneshot::channel();
        let request = Request { kind, buf, done };
        {
            let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.backlog.push_back(request);
            ring.push_backlog();
        }
        // Outside the lock: the submission runs the block layer inline
        // (long in a VM), and another thread may push meanwhile.
        self.submitter.kick_soon(&self.ring);
        match wait.await {
            Ok(result) => result,
            Err(_) => (None, Err(io::Error::other("the ring dropped a request"))),
        }
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        // The reaper holds the ring until it goes; in-flight requests keep
        // their buffers until the ring's own drop has waited for them.
        self.reaper.abort();
    }
}

/// Drains completions whenever the ring's eventfd fires.
async fn reap(ring: Arc<Mutex<Ring>>, submitter: Arc<Submitter>, event: AsyncFd<OwnedFd>) {
    loop {
        let mut ready = match event.readable().await {
            Ok(ready) => ready,
            Err(e) => {
                tracing::error!("io_uring completion wait failed: {e}");
                return;
            }
        };
        let mut count = 0u64;
        // SAFETY: reads 8 bytes into a valid u64 from our non-blocking
        // eventfd; EAGAIN (nothing yet) is fine.
        unsafe {
            libc::read(
                event.get_ref().as_raw_fd(),
                (&mut count as *mut u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        // Not reading the counter (edge-triggered epoll is woken by every
        // signal anyway; one system call less) made QD1 reads slower:
        // homed size-1 QD1 4 KiB read 1.16-1.17x -> 0.86-0.97x of qemu-nbd,
        // node1's OSD restarted from either binary in turn, twice.
        // Cleared before draining: a completion posted from here on fires
        // the eventfd again.
        ready.clear_ready();
        let waiting = {
            let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
            ring.reap();
            ring.push_backlog();
            // Requests just given slots, or entries an earlier submission
            // left behind.
            !ring.ring.submission().is_empty()
        };
        // Only when there is something to submit: an empty `io_uring_enter`
        // per completion was a third of a QD1 request's syscalls.
        if waiting {
            submitter.kick();
        }
    }
}

/// Submits the ring's queued entries from whichever thread asks, one thread
/// at a time: `io_uring_enter` takes the ring's kernel mutex, and two
/// threads submitting at once spun on it (6% of the OSD's CPU at QD32). A
/// thread that finds a submission running leaves its entries to that one,
/// which goes round again before it stops.
struct Submitter {
    ring_fd: RawFd,
    /// Kicks not yet covered by a submission; nonzero while one runs.
    pending: AtomicUsize,
    /// A deferred submission is spawned and has not started yet.
    scheduled: AtomicBool,
}

impl Submitter {
    /// Submits soon: on a tokio runtime, from a task spawned now, which the
    /// scheduler runs after the tasks already ready, so the entries all of
    /// them queue go to the kernel in one `io_uring_enter` (one notification
    /// of the device: in a VM each one is an exit to the host; `iowrite16`
    /// of virtio's notify was 8% of all CPU at QD32 with one enter per
    /// request). Outside a runtime, at once.
    fn kick_soon(self: &Arc<Self>, ring: &Arc<Mutex<Ring>>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.kick();
            return;
        };
        if self.scheduled.swap(true, Ordering::AcqRel) {
            // The spawned submission has not started: it will see the
            // entries published before this call (it takes the flag back
            // with a swap that synchronises with ours).
            return;
        }
        // Taking the flag back also when the task is dropped unpolled (a
        // runtime shutting down): a flag left set would stop every later
        // submission.
        struct Scheduled(Arc<Submitter>);
        impl Drop for Scheduled {
            fn drop(&mut self) {
                self.0.scheduled.swap(false, Ordering::AcqRel);
            }
        }
        let scheduled = Scheduled(self.clone());
        // Weak: a ring dropped meanwhile has closed its descriptor.
        let ring = Arc::downgrade(ring);
        runtime.spawn(async move {
            let submitter = scheduled.0.clone();
            drop(scheduled);
            if let Some(_open) = ring.upgrade() {
                submitter.kick();
            }
        });
    }

    fn kick(&self) {
        if self.pending.fetch_add(1, Ordering::AcqRel) != 0 {
            // The running submitter sees this kick and submits again; the
            // entries were published (under the ring lock) before it.
            return;
        }
        loop {
            let seen = self.pending.load(Ordering::Acquire);
            submit(self.ring_fd);
            if self
                .pending
                .compare_exchange(seen, 0, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }
}

/// Submits whatever the submission queue holds (`io_uring_enter` without
/// waiting). Safe from any thread while the ring lives: the kernel
/// serialises submissions and takes only entries published under the lock.
fn submit(ring_fd: RawFd) {
    let mut again = 0;
    loop {
        // SAFETY: io_uring_enter on our ring's descriptor, no arguments to
        // read or write: to_submit is a bound (the kernel submits what the
        // queue holds), min_complete 0, no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_io_uring_enter,
                ring_fd,
                u32::MAX,
                0u32,
                0u32,
                std::ptr::null::<libc::c_void>(),
                0usize,
            )
        };
        if rc >= 0 {
            return;
        }
        match io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            // Out of kernel request memory for now: nothing else may come to
            // submit these entries again, so retry a little here.
            Some(libc::EAGAIN) if again < 100 => {
                again += 1;
                std::thread::yield_now();
            }
            // The completion queue is full (cannot happen with in-flight
            // requests capped at the queue size): the reaper drains it and
            // submits again.
            Some(libc::EBUSY) | Some(libc::EAGAIN) => return,
            _ => {
                tracing::error!("io_uring submit failed: {}", io::Error::last_os_error());
                return;
            }
        }
    }
}

/// Returns the size of a regular file or block device.
fn device_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    use std::os::unix::fs::FileTypeExt;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: the ioctl writes one u64 into `size`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}

fn buffer_back(buf: Option<IoBuf>, len: usize) -> IoBuf {
    buf.unwrap_or_else(|| IoBuf::heap(len))
}

impl UringDevice {
    async fn write_kind(&self, block: u64, buf: IoBuf, dsync: bool) -> (IoBuf, io::Result<()>) {
        let len = buf.len();
        if let Err(e) = check_range(block, len, self.block_count) {
            return (buf, Err(e));
        }
        let (buf, result) = self.submit(Kind::Write { block, dsync }, Some(buf)).await;
        (buffer_back(buf, len), result)
    }
}

impl BlockDevice for UringDevice {
    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn buffer(&self, len: usize) -> IoBuf {
        self.pool.get(len)
    }

    async fn write(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        self.write_kind(block, buf, false).await
    }

    async fn write_durable(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        self.write_kind(block, buf, true).await
    }

    async fn read(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        let len = buf.len();
        if let Err(e) = check_range(block, len, self.block_count) {
            return (buf, Err(e));
        }
        if buf.is_shared() {
            return (buf, Err(read_only()));
        }
        let (buf, result) = self.submit(Kind::Read { block }, Some(buf)).await;
        (buffer_back(buf, len), result)
    }

    async fn flush(&self) -> io::Result<()> {
        self.submit(Kind::Flush, None).await.1
    }
}

/// The ring and its requests in flight.
struct Ring {
    ring: IoUring,
    _file: File,
    depth: usize,
    slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Request>,
}

impl Ring {
    fn new(file: File, event: &OwnedFd, depth: u32, pool: &BufferPool) -> io::Result<Ring> {
        let ring = IoUring::builder().build(depth.next_power_of_two())?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's allocation, which every
        // in-flight request's buffer keeps alive, and `Drop for Ring` waits
        // for those before the ring goes.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        ring.submitter().register_eventfd(event.as_raw_fd())?;
        let depth = depth as usize;
        Ok(Ring {
            ring,
            _file: file,
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            backlog: VecDeque::new(),
        })
    }

    fn in_flight(&self) -> usize {
        self.depth - self.free_slots.len()
    }

    /// Completes every request the kernel has finished.
    fn reap(&mut self) {
        let completions: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|cqe| (cqe.user_data(), cqe.result()))
            .collect();
        for (user_data, result) in completions {
            self.complete(user_data as usize, result);
        }
    }

    /// Moves waiting requests into free slots of the submission queue.
    fn push_backlog(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(request) = self.backlog.pop_front() else {
                return;
            };
            let Some(slot) = self.free_slots.pop() else {
                self.backlog.push_front(request);
                return;
            };
            let entry = build_entry(&request).user_data(slot as u64);
            // SAFETY: the entry points into `request.buf`, which we keep in
            // `slots[slot]` until its completion arrives.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                self.free_slots.push(slot);
                self.backlog.push_front(request);
                return;
            }
            self.slots[slot] = Some(request);
        }
    }

    fn complete(&mut self, slot: usize, result: i32) {
        let Some(request) = self.slots.get_mut(slot).and_then(Option::take) else {
            tracing::error!("completion for unknown ring slot {slot}");
            return;
        };
        self.free_slots.push(slot);
        let expected = request.buf.as_ref().map_or(0, |b| b.len());
        let outcome = if result < 0 {
            Err(io::Error::from_raw_os_error(-result))
        } else if matches!(request.kind, Kind::Flush) || result as usize == expected {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short I/O: {result} of {expected} bytes"),
            ))
        };
        let _ = request.done.send((request.buf, outcome));
    }
}

impl Drop for Ring {
    /// The kernel may still write into the buffers of requests in flight:
    /// wait for them (bounded) before the ring and buffers go.
    fn drop(&mut self) {
        for request in self.backlog.drain(..) {
            let _ = request.done.send((
                request.buf,
                Err(io::Error::other("device is shutting down")),
            ));
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while self.in_flight() > 0 && std::time::Instant::now() < deadline {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) => {
                    tracing::error!("io_uring wait at close failed: {e}");
                    break;
                }
            }
            self.reap();
        }
        if self.in_flight() > 0 {
            // Leak the buffers rather than let the kernel write into freed
            // memory.
            for slot in self.slots.iter_mut() {
                if let Some(request) = slot.take() {
                    std::mem::forget(request);
                }
            }
        }
    }
}

fn build_entry(request: &Request) -> io_uring::squeue::Entry {
    let file = types::Fixed(0);
    match (&request.kind, &request.buf) {
        (Kind::Write { block, dsync }, Some(buf)) => {
            let offset = block * BLOCK_BYTES as u64;
            // RWF_DSYNC on an O_DIRECT write: the kernel writes with FUA
            // (this write durable, nothing else) or follows with the file's
            // fdatasync (a device flush, and a file-system journal commit if
            // the file's extents changed). Callers that need earlier writes
            // durable flush instead.
            let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
            match buf.fixed_index() {
                Some(index) => opcode::WriteFixed::new(file, buf.as_ptr(), buf.len() as u32, index)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
                None => opcode::Write::new(file, buf.as_ptr(), buf.len() as u32)
                    .offset(offset)
                    .rw_flags(flags)
                    .build(),
            }
        }
        (Kind::Read { block }, Some(buf)) => {
            let offset = block * BLOCK_BYTES as u64;
            // The kernel writes through this pointer; the buffer is ours
            // exclusively while the request sits in its slot.
            let ptr = buf.as_ptr() as *mut u8;
            match buf.fixed_index() {
                Some(index) => opcode::ReadFixed::new(file, ptr, buf.len() as u32, index)
                    .offset(offset)
                    .build(),
                None => opcode::Read::new(file, ptr, buf.len() as u32)
                    .offset(offset)
                    .build(),
            }
        }
        (Kind::Flush, _) | (_, None) => opcode::Fsync::new(file)
            .flags(types::FsyncFlags::DATASYNC)
            .build(),
    }
}
