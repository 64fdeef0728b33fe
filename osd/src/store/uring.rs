//! `UringDevice`: a file or block device driven by io_uring with O_DIRECT.
//!
//! One OS thread owns the ring (SINGLE_ISSUER + DEFER_TASKRUN), the
//! registered file and the registered buffers. Tokio tasks hand it requests
//! through a channel and wake it through an eventfd that the ring itself
//! polls, so the thread sleeps in one place (`submit_and_wait`) whether it
//! waits for new requests or for completions. Each request owns its buffer
//! until its completion arrives, so a caller that drops its future can never
//! leave the kernel writing into freed memory.
//!
//! Rejected: tokio-uring (unmaintained, !Send files, pins an old io-uring)
//! and running the ring on the tokio runtime (a blocking `submit_and_wait`
//! would stall network tasks).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::thread::JoinHandle;

use io_uring::{IoUring, opcode, types};
use tokio::sync::oneshot;

use super::buffer::{BLOCK_BYTES, BufferPool, IoBuf};
use super::device::{BlockDevice, check_range};

/// user_data of the eventfd read that wakes the ring.
const WAKE: u64 = u64::MAX;

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
    Write { block: u64 },
    Read { block: u64 },
    Flush,
}

struct Request {
    kind: Kind,
    buf: Option<IoBuf>,
    done: oneshot::Sender<(Option<IoBuf>, io::Result<()>)>,
}

enum Message {
    Io(Request),
    Shutdown,
}

struct Shared {
    tx: Sender<Message>,
    wake: OwnedFd,
}

impl Shared {
    fn send(&self, message: Message) -> Result<(), Message> {
        self.tx.send(message).map_err(|e| e.0)?;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. A failed
        // write can only mean the counter is saturated, which still wakes.
        unsafe {
            libc::write(
                self.wake.as_raw_fd(),
                (&one as *const u64).cast(),
                std::mem::size_of::<u64>(),
            )
        };
        Ok(())
    }
}

/// A disk file opened with O_DIRECT and served by its own io_uring thread.
pub struct UringDevice {
    shared: Arc<Shared>,
    pool: BufferPool,
    block_count: u64,
    thread: Option<JoinHandle<()>>,
}

impl UringDevice {
    /// Opens `path` (which must exist and be a whole number of blocks long)
    /// and starts its ring thread.
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
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(raw) };
        let wake_fd = wake.as_raw_fd();
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let depth = config.io_depth_max.max(8);
        let thread_pool = pool.clone();
        let thread = std::thread::Builder::new()
            .name("osd-ring".into())
            .spawn(move || {
                let ring = match Ring::new(file, wake_fd, depth, &thread_pool) {
                    Ok(ring) => {
                        let _ = ready_tx.send(Ok(()));
                        ring
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                ring.run(rx);
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("ring thread exited during setup"))??;
        Ok(UringDevice {
            shared: Arc::new(Shared { tx, wake }),
            pool,
            block_count,
            thread: Some(thread),
        })
    }

    async fn submit(&self, kind: Kind, buf: Option<IoBuf>) -> (Option<IoBuf>, io::Result<()>) {
        let (done, wait) = oneshot::channel();
        let request = Request { kind, buf, done };
        if let Err(Message::Io(request)) = self.shared.send(Message::Io(request)) {
            return (
                request.buf,
                Err(io::Error::other("ring thread has stopped")),
            );
        }
        match wait.await {
            Ok(result) => result,
            Err(_) => (None, Err(io::Error::other("ring thread dropped a request"))),
        }
    }
}

impl Drop for UringDevice {
    fn drop(&mut self) {
        let _ = self.shared.send(Message::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
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

impl BlockDevice for UringDevice {
    fn block_count(&self) -> u64 {
        self.block_count
    }

    fn buffer(&self, len: usize) -> IoBuf {
        self.pool.get(len)
    }

    async fn write(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        let len = buf.len();
        if let Err(e) = check_range(block, len, self.block_count) {
            return (buf, Err(e));
        }
        let (buf, result) = self.submit(Kind::Write { block }, Some(buf)).await;
        (buffer_back(buf, len), result)
    }

    async fn read(&self, block: u64, buf: IoBuf) -> (IoBuf, io::Result<()>) {
        let len = buf.len();
        if let Err(e) = check_range(block, len, self.block_count) {
            return (buf, Err(e));
        }
        let (buf, result) = self.submit(Kind::Read { block }, Some(buf)).await;
        (buffer_back(buf, len), result)
    }

    async fn flush(&self) -> io::Result<()> {
        self.submit(Kind::Flush, None).await.1
    }
}

/// The ring thread's state.
struct Ring {
    ring: IoUring,
    _file: File,
    wake_fd: RawFd,
    wake_buf: Box<u64>,
    depth: usize,
    slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    backlog: VecDeque<Request>,
}

impl Ring {
    fn new(file: File, wake_fd: RawFd, depth: u32, pool: &BufferPool) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(depth.next_power_of_two())?;
        ring.submitter().register_files(&[file.as_raw_fd()])?;
        let iovecs = pool.iovecs();
        // SAFETY: the iovecs describe the pool's allocation, which the pool
        // (cloned into this thread's closure) keeps alive longer than the ring.
        unsafe { ring.submitter().register_buffers(&iovecs)? };
        let depth = depth as usize;
        let mut this = Ring {
            ring,
            _file: file,
            wake_fd,
            wake_buf: Box::new(0),
            depth,
            slots: (0..depth).map(|_| None).collect(),
            free_slots: (0..depth).rev().collect(),
            backlog: VecDeque::new(),
        };
        this.arm_wake()?;
        Ok(this)
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(
            types::Fd(self.wake_fd),
            (&mut *self.wake_buf as *mut u64).cast(),
            8,
        )
        .build()
        .user_data(WAKE);
        // SAFETY: wake_buf is boxed and lives as long as the ring.
        unsafe { self.ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("submission queue full while arming wake-up"))
    }

    fn run(mut self, rx: Receiver<Message>) {
        let mut closing = false;
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Message::Io(request)) => self.backlog.push_back(request),
                    Ok(Message::Shutdown) | Err(TryRecvError::Disconnected) => {
                        closing = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => break,
                }
            }
            self.push_backlog();
            let in_flight = self.depth - self.free_slots.len();
            if closing && in_flight == 0 {
                for request in self.backlog.drain(..) {
                    let _ = request.done.send((
                        request.buf,
                        Err(io::Error::other("device is shutting down")),
                    ));
                }
                return;
            }
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EBUSY) {
                    continue;
                }
                tracing::error!("io_uring submit failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            let completions: Vec<(u64, i32)> = self
                .ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result()))
                .collect();
            for (user_data, result) in completions {
                if user_data == WAKE {
                    if let Err(e) = self.arm_wake() {
                        tracing::error!("failed to re-arm ring wake-up: {e}");
                    }
                    continue;
                }
                self.complete(user_data as usize, result);
            }
        }
    }

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

fn build_entry(request: &Request) -> io_uring::squeue::Entry {
    let file = types::Fixed(0);
    match (&request.kind, &request.buf) {
        (Kind::Write { block }, Some(buf)) => {
            let offset = block * BLOCK_BYTES as u64;
            match buf.fixed_index() {
                Some(index) => opcode::WriteFixed::new(file, buf.as_ptr(), buf.len() as u32, index)
                    .offset(offset)
                    .build(),
                None => opcode::Write::new(file, buf.as_ptr(), buf.len() as u32)
                    .offset(offset)
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
