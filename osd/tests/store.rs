//! Object store behaviour on real files (io_uring, O_DIRECT) and on the
//! fault-injecting memory device: round trips, bad input, a full disk,
//! corruption, I/O errors and power loss.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use basalt_osd::store::{
    BLOCK_BYTES, BlockDevice, MemDevice, ObjectKey, ObjectStore, StoreConfig, StoreError,
    UringDevice,
};
use basalt_placement::{ObjectId, PgId, PoolId, VolumeId};
use basalt_wire::Durability;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: u64 = BLOCK_BYTES as u64;

fn key(volume: u64, index: u64) -> ObjectKey {
    ObjectKey {
        pg: PgId::new(PoolId(1), (volume % 8) as u32),
        object: ObjectId {
            volume: VolumeId(volume),
            index,
        },
    }
}

/// Deterministic pseudo-random bytes for write number `id`.
fn pattern(id: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(id).fill_bytes(&mut data);
    data
}

/// Seeds of the randomized tests: `default` unless `BASALT_STORE_SEED=S`
/// (that seed alone) or `BASALT_STORE_SEEDS=N` (seeds 0..N) says otherwise,
/// for longer hunts by hand than CI's.
fn seeds(default: std::ops::Range<u64>) -> std::ops::Range<u64> {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(seed) = var("BASALT_STORE_SEED") {
        return seed..seed + 1;
    }
    var("BASALT_STORE_SEEDS").map_or(default, |n| 0..n)
}

async fn uring_store(dir: &std::path::Path, size: u64) -> ObjectStore<UringDevice> {
    ObjectStore::format_dir(dir, size, false).unwrap();
    ObjectStore::open_dir(dir, StoreConfig::default())
        .await
        .unwrap()
}

/// Settings that defer small buffered writes at any depth (by default only
/// while at most two writes are in progress), up to 8 in flight.
fn deferring() -> StoreConfig {
    StoreConfig {
        deferred_writes_in_flight: 8,
        defer_while_writes_at_most: usize::MAX,
        ..StoreConfig::default()
    }
}

async fn mem_store(device: &Arc<MemDevice>, dir: &std::path::Path) -> ObjectStore<Arc<MemDevice>> {
    ObjectStore::open(device.clone(), &dir.join("meta"), StoreConfig::default())
        .await
        .unwrap()
}

/// What a reboot does to the store's metadata at `meta`: the buffered-change
/// log (in the page cache, never synced) is not replayed.
fn reboot(meta: &std::path::Path) {
    if meta
        .join(basalt_osd::store::buffered_log::LOG_FILE)
        .exists()
    {
        basalt_osd::store::buffered_log::forget_boot(meta).unwrap();
    }
}

/// Fails unless fsck finds `store` clean; then closes it.
async fn assert_clean_and_close<D: BlockDevice>(store: ObjectStore<D>) {
    let report = store.fsck().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    store.close().await;
}

/// Placement after random overwrites: a writer going through an object in
/// 4 KiB writes, between another object's random 4 KiB overwrites, lays it
/// out in one run on disk (a large read of it is one I/O), while the
/// overwrites fill the single holes earlier overwrites left, so a large
/// hole stays whole for a 1 MiB write. Plain next-fit interleaves the
/// first two and feeds the holes under the cursor to the 4 KiB writes.
#[tokio::test]
async fn placement_keeps_runs_and_large_holes() {
    let dir = tempfile::tempdir().unwrap();
    let store = uring_store(dir.path(), 64 << 20).await;
    let (a, b, c) = (key(3, 0), key(3, 1), key(3, 2));
    // b written whole, then every 4th block of it overwritten: once a
    // flush releases the old blocks, the disk has single holes.
    let whole = pattern(50, 256 * BLOCK_BYTES);
    store.write(&b, 0, &whole, 1).await.unwrap();
    let mut version = 1;
    for i in 0..64u64 {
        version += 1;
        let data = pattern(60 + i, BLOCK_BYTES);
        store
            .write(&b, (i * 4 + 1) * B, &data, version)
            .await
            .unwrap();
    }
    store.flush().await.unwrap();
    let b_before = store.block_placement(&b).await.unwrap();
    for i in 0..32u64 {
        let data = pattern(i, BLOCK_BYTES);
        store.write(&a, i * B, &data, i + 1).await.unwrap();
        version += 1;
        let other = pattern(100 + i, BLOCK_BYTES);
        store
            .write(&b, (i * 4 + 2) * B, &other, version)
            .await
            .unwrap();
    }
    let placement = store.block_placement(&a).await.unwrap();
    assert_eq!(placement.len(), 32);
    for pair in placement.windows(2) {
        assert_eq!(pair[1].1, pair[0].1 + 1, "not one run: {placement:?}");
    }
    // b's overwrites went into the holes earlier overwrites left, in b's
    // part of the disk, not next to a's run.
    let a_start = placement[0].1;
    for ((index, disk), (_, before)) in store
        .block_placement(&b)
        .await
        .unwrap()
        .into_iter()
        .zip(b_before)
        .filter(|((index, _), _)| index % 4 == 2 && *index < 128)
    {
        assert_ne!(disk, before, "block {index} not overwritten");
        assert!(
            disk < a_start,
            "block {index} at {disk}, past a's run at {a_start}"
        );
    }
    // A 1 MiB write after all this is still one run.
    let big = pattern(200, 256 * BLOCK_BYTES);
    store.write(&c, 0, &big, 1).await.unwrap();
    let runs = store
        .block_placement(&c)
        .await
        .unwrap()
        .windows(2)
        .filter(|pair| pair[1].1 != pair[0].1 + 1)
        .count();
    assert_eq!(runs, 0, "the 1 MiB write was split");
    let all = store.read(&a, 0, 32 * B).await.unwrap();
    for i in 0..32u64 {
        let at = (i * B) as usize;
        assert_eq!(&all[at..at + BLOCK_BYTES], &pattern(i, BLOCK_BYTES)[..]);
    }
    assert_clean_and_close(store).await;
}

/// Writes, overwrites, holes, discard, write-zeroes, delete, stat and PG
/// listing behave as specified on a real file, and survive a reopen.
#[tokio::test]
async fn round_trip_on_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let store = uring_store(dir.path(), 64 << 20).await;
    let a = key(7, 0);
    let data = pattern(1, 256 * 1024);
    store.write(&a, 8 * B, &data, 1).await.unwrap();
    // Holes around the data read as zeros.
    let all = store.read(&a, 0, 4 << 20).await.unwrap();
    assert!(all[..8 * B as usize].iter().all(|b| *b == 0));
    assert_eq!(&all[8 * B as usize..8 * B as usize + data.len()], &data[..]);
    assert!(all[8 * B as usize + data.len()..].iter().all(|b| *b == 0));
    // Exactly the data written in one piece (one run on disk: its I/O
    // buffer is handed out), and that run with a hole after it.
    let exact = store.read(&a, 8 * B, data.len() as u64).await.unwrap();
    assert_eq!(&exact[..], &data[..]);
    let tail = store
        .read(&a, 8 * B, data.len() as u64 + 4 * B)
        .await
        .unwrap();
    assert_eq!(tail.len(), data.len() + 4 * B as usize);
    assert_eq!(&tail[..data.len()], &data[..]);
    assert!(tail[data.len()..].iter().all(|b| *b == 0));
    // A partial overwrite in the middle.
    let patch = pattern(2, 3 * BLOCK_BYTES);
    store.write(&a, 10 * B, &patch, 2).await.unwrap();
    let mid = store.read(&a, 8 * B, 8 * B).await.unwrap();
    assert_eq!(&mid[..2 * BLOCK_BYTES], &data[..2 * BLOCK_BYTES]);
    assert_eq!(&mid[2 * BLOCK_BYTES..5 * BLOCK_BYTES], &patch[..]);
    assert_eq!(
        &mid[5 * BLOCK_BYTES..],
        &data[5 * BLOCK_BYTES..8 * BLOCK_BYTES]
    );
    let stat = store.stat(&a).await.unwrap().unwrap();
    assert_eq!(stat.version, 2);
    assert_eq!(stat.allocated_blocks, 64);
    // Discard frees blocks; write-zeroes with allocate keeps them.
    let (free_before, _) = store.space();
    store.discard(&a, 8 * B, 4 * B, 3).await.unwrap();
    assert_eq!(store.space().0, free_before + 4);
    assert!(
        store
            .read(&a, 8 * B, 4 * B)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    store
        .write_zeroes(&a, 12 * B, 2 * B, true, 4)
        .await
        .unwrap();
    assert_eq!(store.stat(&a).await.unwrap().unwrap().allocated_blocks, 60);
    assert!(
        store
            .read(&a, 12 * B, 2 * B)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    // Listing by PG, and delete.
    let b = key(15, 3); // same PG seed as `a` (15 % 8 == 7)
    store
        .write(&b, 0, &pattern(3, BLOCK_BYTES), 1)
        .await
        .unwrap();
    let listed: Vec<_> = store
        .list_pg(a.pg)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(listed, vec![a, b]);
    store.delete(&b).await.unwrap();
    assert!(store.stat(&b).await.unwrap().is_none());
    assert_eq!(store.list_pg(a.pg).unwrap().len(), 1);
    let report = store.fsck().await.unwrap();
    assert!(report.is_clean(), "{report:?}");
    let expected = store.read(&a, 0, 4 << 20).await.unwrap();
    store.close().await;

    // Everything is still there after a reopen.
    let store = ObjectStore::open_dir(dir.path(), StoreConfig::default())
        .await
        .unwrap();
    assert_eq!(store.read(&a, 0, 4 << 20).await.unwrap(), expected);
    assert!(store.fsck().await.unwrap().is_clean());
    store.close().await;
}

/// A format that stopped while zeroing (a data file, no metadata) is
/// formatted again at the next start; a formatted store never is.
/// `data` at an aligned address (what the frame decoder and the NBD gateway
/// hand the store for large payloads), or one byte off.
fn placed(data: &[u8], aligned: bool) -> bytes::Bytes {
    let mut buffer = basalt_wire::aligned_buffer(data.len() + 1, 0);
    if !aligned {
        buffer.extend_from_slice(&[0]);
    }
    buffer.extend_from_slice(data);
    let bytes = buffer.freeze();
    bytes.slice(usize::from(!aligned)..)
}

/// Writes from aligned `Bytes` go to the device without a copy, unaligned
/// ones are copied; both read back, with their block crcs given or not
/// (a wrong count is ignored), on io_uring and on the memory device.
#[tokio::test]
async fn writes_from_aligned_bytes_skip_the_copy() {
    let dir = tempfile::tempdir().unwrap();
    let uring = uring_store(&dir.path().join("uring"), 64 << 20).await;
    let device = Arc::new(MemDevice::new(16_384));
    let mem = mem_store(&device, dir.path()).await;
    let mut version = 0;
    for (id, blocks, aligned, crcs) in [
        (1, 64, true, true),
        (2, 64, true, false),
        (3, 16, false, true),
        (4, 300, true, true),
        (5, 1, true, true),
    ] {
        let data = pattern(id, blocks * BLOCK_BYTES);
        let bytes = placed(&data, aligned);
        assert_eq!(
            (bytes.as_ptr() as usize).is_multiple_of(BLOCK_BYTES),
            aligned
        );
        let mut block_crcs = basalt_wire::crc::block_crcs(&data);
        if !crcs {
            block_crcs.pop();
        }
        let offset = id * B;
        version += 1;
        let before = device.shared_writes();
        for durability in [Durability::Buffered, Durability::Durable] {
            uring
                .write_bytes_with(
                    &key(9, id),
                    offset,
                    &bytes,
                    Some(&block_crcs),
                    version,
                    durability,
                )
                .await
                .unwrap();
        }
        mem.write_bytes_with(
            &key(9, id),
            offset,
            &bytes,
            Some(&block_crcs),
            version,
            Durability::Buffered,
        )
        .await
        .unwrap();
        let shared = device.shared_writes() - before;
        assert_eq!(
            shared > 0,
            aligned,
            "write {id}: {shared} shared device writes"
        );
        let len = data.len() as u64;
        assert_eq!(
            &uring.read(&key(9, id), offset, len).await.unwrap()[..],
            &data[..]
        );
        assert_eq!(
            &mem.read(&key(9, id), offset, len).await.unwrap()[..],
            &data[..]
        );
        // From block 0 (a hole) on: the crcs a read returns are its data's.
        let (read, crcs) = uring
            .read_with_crcs(&key(9, id), 0, offset + len)
            .await
            .unwrap();
        assert_eq!(&read[offset as usize..], &data[..]);
        assert_eq!(crcs, basalt_wire::crc::block_crcs(&read), "write {id}");
    }
    assert_clean_and_close(uring).await;
    assert_clean_and_close(mem).await;
}

#[tokio::test]
async fn an_interrupted_format_is_formatted_again() {
    let dir = tempfile::tempdir().unwrap();
    let (data, _) = basalt_osd::store::object_store::store_paths(dir.path());
    std::fs::write(&data, vec![7u8; 12_345]).unwrap();
    ObjectStore::format_dir(dir.path(), 8 << 20, true).unwrap();
    assert_eq!(std::fs::metadata(&data).unwrap().len(), 8 << 20);
    let store = ObjectStore::open_dir(dir.path(), StoreConfig::default())
        .await
        .unwrap();
    store
        .write(&key(1, 0), 0, &pattern(1, BLOCK_BYTES), 1)
        .await
        .unwrap();
    store.close().await;
    let again = ObjectStore::format_dir(dir.path(), 8 << 20, true);
    assert!(
        matches!(again, Err(StoreError::Corrupt(_))),
        "formatted over a store: {again:?}"
    );
    let store = ObjectStore::open_dir(dir.path(), StoreConfig::default())
        .await
        .unwrap();
    assert_eq!(
        store.read(&key(1, 0), 0, B).await.unwrap()[..],
        pattern(1, BLOCK_BYTES)[..]
    );
    store.close().await;
}

/// Many writes in flight at once on one ring, to many objects, all land.
#[tokio::test]
async fn concurrent_writes_on_io_uring() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(uring_store(dir.path(), 64 << 20).await);
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let data = pattern(100 + i, 16 * BLOCK_BYTES);
            store.write(&key(i, 0), 0, &data, 1).await.unwrap();
            data
        }));
    }
    let mut expected = Vec::new();
    for task in tasks {
        expected.push(task.await.unwrap());
    }
    for (i, data) in expected.iter().enumerate() {
        let got = store.read(&key(i as u64, 0), 0, 16 * B).await.unwrap();
        assert_eq!(&got[..], &data[..], "object {i}");
    }
    assert!(store.fsck().await.unwrap().is_clean());
}

/// Unaligned, empty and out-of-range requests are refused with a clear
/// error, and the store keeps serving.
#[tokio::test]
async fn bad_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(1024));
    let store = mem_store(&device, dir.path()).await;
    let a = key(1, 0);
    let block = vec![1u8; BLOCK_BYTES];
    let cases = [
        store.write(&a, 100, &block, 1).await,
        store.write(&a, 0, &block[..100], 1).await,
        store.write(&a, 0, &[], 1).await,
        store
            .write(&a, (4 << 20) - B, &vec![0; 2 * BLOCK_BYTES], 1)
            .await,
        store.write(&a, u64::MAX - 4095, &block, 1).await,
        store.discard(&a, 3, B, 1).await,
    ];
    for result in cases {
        let err = result.unwrap_err();
        assert!(err.is_request_error(), "{err}");
        assert!(err.to_string().contains("vol.1.obj0"), "{err}");
    }
    assert!(matches!(
        store.read(&a, 0, 8 << 20).await.unwrap_err(),
        StoreError::InvalidRange { .. }
    ));
    store.write(&a, 0, &block, 1).await.unwrap();
    assert_eq!(&store.read(&a, 0, B).await.unwrap()[..], &block[..]);
    assert!(store.fsck().await.unwrap().is_clean());
}

/// A full disk reports ENOSPC on that write; the store stays consistent and
/// usable once space is freed.
#[tokio::test]
async fn full_disk_is_an_error_not_a_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(256));
    let store = mem_store(&device, dir.path()).await;
    let big = pattern(5, 1 << 20); // 256 blocks: everything
    store
        .write(&key(1, 0), 0, &big[..200 * BLOCK_BYTES], 1)
        .await
        .unwrap();
    let err = store
        .write(&key(2, 0), 0, &big[..100 * BLOCK_BYTES], 1)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::NoSpace {
                needed: 100,
                free: 56
            }
        ),
        "{err}"
    );
    // Overwriting needs fresh blocks too (copy-on-write): also refused.
    assert!(matches!(
        store
            .write(&key(1, 0), 0, &big[..100 * BLOCK_BYTES], 2)
            .await,
        Err(StoreError::NoSpace { .. })
    ));
    assert!(store.fsck().await.unwrap().is_clean());
    assert_eq!(
        &store.read(&key(1, 0), 0, 200 * B).await.unwrap()[..],
        &big[..200 * BLOCK_BYTES]
    );
    store.delete(&key(1, 0)).await.unwrap();
    store
        .write(&key(2, 0), 0, &big[..100 * BLOCK_BYTES], 1)
        .await
        .unwrap();
    assert!(store.fsck().await.unwrap().is_clean());
}

/// A flipped byte on disk turns into a checksum error naming the object and
/// offset; the bad bytes are never returned, and fsck finds it.
#[tokio::test]
async fn corruption_is_detected_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let store = uring_store(dir.path(), 16 << 20).await;
    let a = key(3, 9);
    let data = pattern(9, 8 * BLOCK_BYTES);
    store.write(&a, 4 * B, &data, 1).await.unwrap();
    let disk_block = store.locate(&a, 6).unwrap().unwrap();
    store.close().await;

    // Corrupt one byte of object block 6 in the data file, behind the store.
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("block"))
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, disk_block * B + 77).unwrap();
    byte[0] ^= 0x40;
    file.write_all_at(&byte, disk_block * B + 77).unwrap();
    file.sync_all().unwrap();

    let store = ObjectStore::open_dir(dir.path(), StoreConfig::default())
        .await
        .unwrap();
    let err = store.read(&a, 0, 4 << 20).await.unwrap_err();
    match &err {
        StoreError::Checksum { object, offset, .. } => {
            assert_eq!(*object, a);
            assert_eq!(*offset, 6 * B);
        }
        other => panic!("expected a checksum error, got {other}"),
    }
    assert!(err.to_string().contains("offset 24576"), "{err}");
    // Blocks next to it still read.
    assert_eq!(
        &store.read(&a, 4 * B, 2 * B).await.unwrap()[..],
        &data[..2 * BLOCK_BYTES]
    );
    let report = store.fsck().await.unwrap();
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(report.errors[0].contains("checksum mismatch"));
    store.close().await;
}

/// EIO on a data write fails that write only; EIO on a flush stops writes
/// (durability is unknown) but what was acknowledged still reads back.
#[tokio::test]
async fn io_errors_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(1024));
    let store = mem_store(&device, dir.path()).await;
    let a = key(1, 0);
    let good = pattern(1, 4 * BLOCK_BYTES);
    store.write(&a, 0, &good, 1).await.unwrap();
    // Its data goes in place behind its journal record: a read waits for it
    // (`a_failed_write_in_place_after_the_answer_fails_the_store`).
    assert_eq!(&store.read(&a, 0, 4 * B).await.unwrap()[..], &good[..]);
    device.fail_writes(true);
    // A write too large for the journal writes its data first: the failure
    // is that write's, and the store carries on.
    let err = store
        .write(&a, 0, &pattern(2, 16 * BLOCK_BYTES), 2)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
    device.fail_writes(false);
    assert_eq!(&store.read(&a, 0, 4 * B).await.unwrap()[..], &good[..]);
    assert!(store.fsck().await.unwrap().is_clean(), "no leaked blocks");
    device.fail_reads(true);
    assert!(matches!(
        store.read(&a, 0, B).await,
        Err(StoreError::Io { .. })
    ));
    device.fail_reads(false);
    // A failed flush: the store refuses writes from then on, since it can no
    // longer tell what is durable.
    device.fail_flushes(true);
    let err = store
        .write(&a, 0, &pattern(3, 4 * BLOCK_BYTES), 3)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    device.fail_flushes(false);
    let err = store.write(&a, 0, &good, 4).await.unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    store.close().await;
    let store = mem_store(&device, dir.path()).await;
    // The write whose flush failed was not acknowledged: its outcome is
    // unknown (its journal record reached the device's cache), but it is
    // all or nothing.
    let after = store.read(&a, 0, 4 * B).await.unwrap();
    assert!(
        after[..] == good[..] || after[..] == pattern(3, 4 * BLOCK_BYTES)[..],
        "neither the acknowledged data nor the failed write"
    );
    assert!(store.fsck().await.unwrap().is_clean());
    store.write(&a, 0, &good, 4).await.unwrap();
    // A small durable write goes out with its journal record (RWF_DSYNC):
    // when that fails, whether it reached the disk is unknown, so the store
    // fails as on a failed flush.
    device.fail_writes(true);
    let err = store
        .write(&a, 0, &pattern(5, 4 * BLOCK_BYTES), 5)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    device.fail_writes(false);
    let err = store.write(&a, 0, &good, 6).await.unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    store.close().await;
    let store = mem_store(&device, dir.path()).await;
    let after = store.read(&a, 0, 4 * B).await.unwrap();
    assert!(
        after[..] == good[..] || after[..] == pattern(5, 4 * BLOCK_BYTES)[..],
        "neither the acknowledged data nor the failed write"
    );
    assert!(store.fsck().await.unwrap().is_clean());
}

/// A block of a write: (write id, block index within the write).
type WriteBlock = Option<(u64, usize)>;

/// Per-writer model of what each block may hold after a crash.
#[derive(Default)]
struct Model {
    /// (object, block) -> (last acknowledged write, write in flight).
    blocks: HashMap<(ObjectKey, u64), (WriteBlock, WriteBlock)>,
}

impl Model {
    fn begin(&mut self, object: ObjectKey, first_block: u64, count: u64, id: u64) {
        for i in 0..count {
            self.blocks.entry((object, first_block + i)).or_default().1 = Some((id, i as usize));
        }
    }

    fn ack(&mut self, object: ObjectKey, first_block: u64, count: u64, id: u64) {
        for i in 0..count {
            let entry = self.blocks.entry((object, first_block + i)).or_default();
            entry.0 = Some((id, i as usize));
            entry.1 = None;
        }
    }
}

fn block_of(write: WriteBlock, write_len: &HashMap<u64, usize>) -> Vec<u8> {
    match write {
        None => vec![0; BLOCK_BYTES],
        Some((id, i)) => {
            pattern(id, write_len[&id])[i * BLOCK_BYTES..(i + 1) * BLOCK_BYTES].to_vec()
        }
    }
}

/// Copies of a store's metadata taken during a run, each with the journal
/// checkpoint count before and after it: a copy taken after the last
/// checkpoint is a state a power loss could leave RocksDB in (its writes
/// since are not synced).
#[derive(Default)]
struct MetaCopies(Vec<(std::path::PathBuf, u64, u64)>);

impl MetaCopies {
    fn take(&mut self, store: &ObjectStore<Arc<MemDevice>>, dir: &std::path::Path) {
        let before = store.journal_checkpoints();
        let path = dir.join(format!("meta-at-{}", self.0.len()));
        store.snapshot_metadata(&path).unwrap();
        self.0.push((path, before, store.journal_checkpoints()));
    }

    /// After the power loss (writers finished): closes `store`, brings the
    /// device back and opens on the latest copy taken after the last
    /// checkpoint, or on the live metadata if there is none. Returns the
    /// store and whether it was rolled back to a copy.
    async fn reopen(
        &self,
        store: Arc<ObjectStore<Arc<MemDevice>>>,
        device: &Arc<MemDevice>,
        dir: &std::path::Path,
    ) -> (ObjectStore<Arc<MemDevice>>, bool) {
        let store = Arc::try_unwrap(store).ok().unwrap();
        let checkpoints = store.journal_checkpoints();
        store.close().await;
        device.power_on();
        let copy = self
            .0
            .iter()
            .rev()
            .find(|(_, before, after)| *before == checkpoints && *after == checkpoints)
            .map(|(path, _, _)| path.clone());
        let rolled_back = copy.is_some();
        let meta = copy.unwrap_or_else(|| dir.join("meta"));
        reboot(&meta);
        let store = ObjectStore::open(device.clone(), &meta, StoreConfig::default())
            .await
            .unwrap();
        (store, rolled_back)
    }
}

/// Power loss at a random moment, many seeds: every acknowledged write is
/// intact, every block is wholly old or wholly new, fsck is clean.
///
/// RocksDB's writes since the journal's last checkpoint are not synced, so
/// a power loss may take them too: the metadata is rolled back to a copy
/// taken during the run after the last checkpoint (any such copy is a state
/// the power loss could leave), and the journal must bring back every
/// acknowledged write.
#[tokio::test]
async fn power_loss_keeps_every_acknowledged_write() {
    let mut rolled_back = 0;
    for seed in seeds(0..24) {
        let dir = tempfile::tempdir().unwrap();
        let device = Arc::new(MemDevice::new(16384));
        // Odd seeds: a disk with FUA, whose durable writes persist nothing
        // else (a journal record must not be trusted to cover earlier data).
        device.set_fua(seed % 2 == 1);
        let store = Arc::new(mem_store(&device, dir.path()).await);
        let model = Arc::new(Mutex::new(Model::default()));
        let lengths = Arc::new(Mutex::new(HashMap::new()));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let crash_after = rng.random_range(5..80u64);
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut writers = Vec::new();
        for writer in 0..6u64 {
            let (store, model, lengths, acked) =
                (store.clone(), model.clone(), lengths.clone(), acked.clone());
            let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + writer);
            writers.push(tokio::spawn(async move {
                for n in 0..1000u64 {
                    let object = key(writer * 2 + rng.random_range(0..2u64), 0);
                    let first = rng.random_range(0..1000u64);
                    let count = rng.random_range(1..=24u64);
                    let id = seed << 40 | writer << 20 | n;
                    let data = pattern(id, (count * B) as usize);
                    lengths.lock().unwrap().insert(id, data.len());
                    model.lock().unwrap().begin(object, first, count, id);
                    if store.write(&object, first * B, &data, id).await.is_err() {
                        return;
                    }
                    model.lock().unwrap().ack(object, first, count, id);
                    acked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }));
        }
        let mut snapshots = MetaCopies::default();
        while acked.load(std::sync::atomic::Ordering::SeqCst) < crash_after {
            snapshots.take(&store, dir.path());
            tokio::task::yield_now().await;
        }
        // The power goes: some unflushed blocks made it, most did not.
        let mut keep_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xfeed);
        device.power_loss(|_| keep_rng.random_bool(0.3));
        for writer in writers {
            writer.await.unwrap();
        }
        let (store, rolled) = snapshots.reopen(store, &device, dir.path()).await;
        rolled_back += usize::from(rolled);
        let report = store.fsck().await.unwrap();
        assert!(report.is_clean(), "seed {seed}: {report:?}");
        let blocks: Vec<_> = model.lock().unwrap().blocks.drain().collect();
        let lengths = lengths.lock().unwrap().clone();
        for ((object, block), (done, in_flight)) in &blocks {
            let got = store.read(object, block * B, B).await.unwrap();
            let old = block_of(*done, &lengths);
            let new = in_flight.map(|w| block_of(Some(w), &lengths));
            assert!(
                got[..] == old[..] || new.as_ref().is_some_and(|n| got[..] == n[..]),
                "seed {seed}: {object} block {block} lost its acknowledged content"
            );
        }
        store.close().await;
    }
    assert!(
        rolled_back >= 12,
        "only {rolled_back} of 24 runs rolled the metadata back"
    );
}

/// What a block of one writer may hold after a power loss when writes are
/// buffered and flushed now and then.
#[derive(Default)]
struct FlushModel {
    /// (object, block) -> (content a completed flush or FUA write made
    /// durable, contents written since, in flight included).
    blocks: HashMap<(ObjectKey, u64), (WriteBlock, Vec<WriteBlock>)>,
}

impl FlushModel {
    fn begin(&mut self, object: ObjectKey, first_block: u64, count: u64, id: u64) {
        for i in 0..count {
            let entry = self.blocks.entry((object, first_block + i)).or_default();
            entry.1.push(Some((id, i as usize)));
        }
    }

    /// A FUA write was acknowledged: its own blocks are durable.
    fn durable(&mut self, object: ObjectKey, first_block: u64, count: u64, id: u64) {
        for i in 0..count {
            let entry = self.blocks.entry((object, first_block + i)).or_default();
            *entry = (Some((id, i as usize)), Vec::new());
        }
    }

    /// A flush issued after every write so far was acknowledged completed:
    /// each block's latest content is durable.
    fn flushed(&mut self) {
        for entry in self.blocks.values_mut() {
            if let Some(latest) = entry.1.pop() {
                *entry = (latest, Vec::new());
            }
        }
    }
}

/// Power loss at a random moment while writers mix buffered writes (small
/// ones go into the journal unflushed while the client flushes, or durable
/// at once while it flushes after about every write; larger ones do not),
/// FUA writes and flushes: everything a completed flush or FUA
/// write covered is intact, every other block holds its durable content or
/// one written since (never another's data), fsck is clean. The metadata may
/// also be rolled back to a copy taken after the last checkpoint, as in
/// `power_loss_keeps_every_acknowledged_write`.
#[tokio::test]
async fn power_loss_with_flushes_keeps_every_flushed_write() {
    // Small writes made durable at once (`early_durable_writes`) in the
    // seeds that flush about every write, which exist to test them.
    let (mut flush_heavy_seeds, mut early) = (0, 0);
    for seed in seeds(0..24) {
        let dir = tempfile::tempdir().unwrap();
        let device = Arc::new(MemDevice::new(16384));
        device.set_fua(seed % 2 == 1);
        // Every third seed defers small buffered writes.
        let config = if seed % 3 == 0 {
            deferring()
        } else {
            StoreConfig::default()
        };
        let store = Arc::new(
            ObjectStore::open(device.clone(), &dir.path().join("meta"), config)
                .await
                .unwrap(),
        );
        let model = Arc::new(Mutex::new(FlushModel::default()));
        let lengths = Arc::new(Mutex::new(HashMap::new()));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Most seeds: the power goes right after the n-th flush returns,
        // nothing else runs in between (one thread), so a flush that
        // returned before its records were durable loses them. Others: at
        // any moment, after n writes or flushes.
        let on_flush = seed % 5 >= 2;
        let crash_after = rng.random_range(3..40u64);
        let flushes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let ops = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let crashed = Arc::new(AtomicBool::new(false));
        let large = if seed % 4 < 2 { 0.1 } else { 0.35 };
        // Every fourth seed flushes about after every write (its stores
        // then make small buffered writes durable at once).
        let flush_heavy = seed % 4 == 3;
        let flush_p = if flush_heavy { 0.55 } else { 0.25 };
        let mut writers = Vec::new();
        // One to three writers: alone, a writer's flushes often find every
        // change in records already.
        for writer in 0..seed % 3 + 1 {
            let (store, lengths) = (store.clone(), lengths.clone());
            let (flushes, crashed, device) = (flushes.clone(), crashed.clone(), device.clone());
            let ops = ops.clone();
            let model = model.clone();
            let mut rng = ChaCha8Rng::seed_from_u64(seed * 1000 + writer);
            writers.push(tokio::spawn(async move {
                // One model per writer: a flush covers what this writer had
                // acknowledged when it asked.
                let mut own = FlushModel::default();
                for n in 0..1000u64 {
                    if rng.random_bool(flush_p) {
                        if store.flush().await.is_err() {
                            break;
                        }
                        own.flushed();
                        ops.fetch_add(1, SeqCst);
                        if on_flush && flushes.fetch_add(1, SeqCst) + 1 == crash_after {
                            let mut keep_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbeef);
                            device.power_loss(|_| keep_rng.random_bool(0.4));
                            crashed.store(true, SeqCst);
                        }
                        continue;
                    }
                    let object = key(writer * 2 + rng.random_range(0..2u64), 0);
                    let first = rng.random_range(0..256u64);
                    // Up to 8 blocks (32 KiB) may go inline; some seeds
                    // write larger ones more often.
                    let count = if rng.random_bool(large) {
                        rng.random_range(9..=12u64)
                    } else {
                        rng.random_range(1..=8u64)
                    };
                    let durability = if rng.random_bool(0.05) {
                        Durability::Durable
                    } else {
                        Durability::Buffered
                    };
                    let id = seed << 40 | writer << 20 | n;
                    let data = pattern(id, (count * B) as usize);
                    lengths.lock().unwrap().insert(id, data.len());
                    own.begin(object, first, count, id);
                    if store
                        .write_with(&object, first * B, &data, id, durability)
                        .await
                        .is_err()
                    {
                        break;
                    }
                    if durability == Durability::Durable {
                        own.durable(object, first, count, id);
                    }
                    ops.fetch_add(1, SeqCst);
                }
                model.lock().unwrap().blocks.extend(own.blocks);
            }));
        }
        let mut snapshots = MetaCopies::default();
        while !crashed.load(SeqCst) {
            if !on_flush && ops.load(SeqCst) >= crash_after * 3 {
                let mut keep_rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbeef);
                device.power_loss(|_| keep_rng.random_bool(0.4));
                break;
            }
            snapshots.take(&store, dir.path());
            tokio::task::yield_now().await;
        }
        for writer in writers {
            writer.await.unwrap();
        }
        if flush_heavy {
            flush_heavy_seeds += 1;
            early += store.early_durable_writes();
        }
        let (store, _) = snapshots.reopen(store, &device, dir.path()).await;
        let report = store.fsck().await.unwrap();
        assert!(report.is_clean(), "seed {seed}: {report:?}");
        let blocks: Vec<_> = model.lock().unwrap().blocks.drain().collect();
        let lengths = lengths.lock().unwrap().clone();
        for ((object, block), (durable, since)) in &blocks {
            let got = store.read(object, block * B, B).await.unwrap();
            let allowed = std::iter::once(durable).chain(since.iter());
            assert!(
                allowed
                    .map(|w| block_of(*w, &lengths))
                    .any(|content| got[..] == content[..]),
                "seed {seed}: {object} block {block} holds neither its flushed content nor one written since"
            );
        }
        store.close().await;
    }
    assert!(
        flush_heavy_seeds < 3 || early > 0,
        "no write was made durable at once in {flush_heavy_seeds} seeds that flush after about every write"
    );
}

/// Writes `blocks` blocks of pattern `id` at the start of object `object`,
/// buffered.
async fn buffered(store: &ObjectStore<Arc<MemDevice>>, object: u64, id: u64, blocks: u64) {
    store
        .write_with(
            &key(object, 0),
            0,
            &pattern(id, (blocks * B) as usize),
            id,
            Durability::Buffered,
        )
        .await
        .unwrap();
}

/// Each (object, id, blocks) reads back what `buffered` wrote there.
async fn assert_holds_buffered(store: &ObjectStore<Arc<MemDevice>>, written: &[(u64, u64, u64)]) {
    for &(object, id, blocks) in written {
        assert_eq!(
            store.read(&key(object, 0), 0, blocks * B).await.unwrap()[..],
            pattern(id, (blocks * B) as usize)[..],
            "object {object}"
        );
    }
}

/// While a client flushes, a small buffered write goes to the journal with
/// its record (not flushed), so the next flush is one device flush and no
/// write; what it flushed survives a power loss. A larger buffered write,
/// or one from a client that never flushed, still leaves its changes for
/// the flush's record.
#[tokio::test]
async fn flush_after_small_buffered_writes_is_one_device_flush() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;

    // No flush yet: the flush writes a record, then flushes.
    buffered(&store, 1, 1, 1).await;
    let (writes, flushes) = device.counters();
    store.flush().await.unwrap();
    let (writes_after, flushes_after) = device.counters();
    assert!(writes_after > writes, "the flush must write a record");
    assert!(flushes_after > flushes);

    // The client flushes: small writes carry their own records.
    buffered(&store, 1, 2, 1).await;
    buffered(&store, 2, 3, 8).await;
    buffered(&store, 3, 4, 2).await;
    // Their data goes in place behind their records: a read waits for it.
    assert_holds_buffered(&store, &[(1, 2, 1), (2, 3, 8), (3, 4, 2)]).await;
    let (writes, flushes) = device.counters();
    store.flush().await.unwrap();
    assert_eq!(
        device.counters(),
        (writes, flushes + 1),
        "one device flush and no write"
    );
    // The power goes and takes every unflushed device write with it.
    let store = power_cycle(store, &device, dir.path()).await;
    let written = [(1, 2, 1), (2, 3, 8), (3, 4, 2), (4, 5, 9)];
    assert_holds_buffered(&store, &written[..3]).await;

    // A larger write's data is not in a record: the flush writes one.
    store.flush().await.unwrap();
    buffered(&store, 4, 5, 9).await;
    let (writes, _) = device.counters();
    store.flush().await.unwrap();
    assert!(
        device.counters().0 > writes,
        "the flush must write a record"
    );

    let store = power_cycle(store, &device, dir.path()).await;
    assert_holds_buffered(&store, &written).await;
    assert_clean_and_close(store).await;
}

/// A small buffered write is deferred: acknowledged once its data is in
/// RocksDB's WAL with its block entries, before its write in place lands.
/// When the daemon dies before that write reaches the device, the next open
/// writes the WAL's copy in place: every acknowledged write reads back.
/// Every sync deletes the copies (a restart must never write one over a
/// block's later owner).
#[tokio::test]
async fn deferred_writes_survive_a_kill_before_their_data_lands() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let meta = dir.path().join("meta");
    let open = || ObjectStore::open(device.clone(), &meta, deferring());
    let store = open().await.unwrap();
    let a = key(1, 0);
    store
        .write(&a, 0, &pattern(1, 4 * B as usize), 1)
        .await
        .unwrap();

    // A sync (here a durable write's) deletes the copies before it. (No
    // FLUSH: while a client flushes, small buffered writes go into the
    // journal instead.)
    buffered(&store, 2, 2, 1).await;
    assert_eq!(
        store.deferred_copies().unwrap(),
        1,
        "the write was not deferred"
    );
    store
        .write(&key(9, 0), 0, &pattern(9, B as usize), 9)
        .await
        .unwrap();
    assert_eq!(store.deferred_copies().unwrap(), 0, "a sync left copies");

    // These writes in place never reach the device.
    device.lose_writes(true);
    buffered(&store, 3, 3, 1).await;
    store
        .write_with(&a, B, &pattern(4, 2 * B as usize), 4, Durability::Buffered)
        .await
        .unwrap();
    buffered(&store, 2, 5, 8).await;
    store.kill().await;
    device.lose_writes(false);

    let store = open().await.unwrap();
    assert_eq!(store.deferred_copies().unwrap(), 0, "open left copies");
    assert_holds_buffered(&store, &[(3, 3, 1), (2, 5, 8)]).await;
    let mut want = pattern(1, 4 * B as usize);
    want[B as usize..3 * B as usize].copy_from_slice(&pattern(4, 2 * B as usize));
    assert_eq!(store.read(&a, 0, 4 * B).await.unwrap()[..], want[..]);
    assert_eq!(store.version(&a).await.unwrap(), Some(4));
    assert_clean_and_close(store).await;
}

/// While a client flushes, a small write is answered once its journal
/// record is written, its data still on the way to its blocks: the record
/// holds the data. The object stays locked until the data lands (a read
/// waits for it), a flush does not wait for it, a kill before it lands
/// loses nothing (the next open writes it in place from the record), and a
/// checkpoint, after which the record is not replayed, waits for it.
#[tokio::test]
async fn small_writes_are_answered_before_their_data_lands_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;
    store.flush().await.unwrap();
    let soon = Duration::from_secs(5);
    device.hold_writes_from(Some(store.journal_blocks()));
    tokio::time::timeout(soon, buffered(&store, 2, 2, 1))
        .await
        .expect("a small buffered write waited for its data in place");
    tokio::time::timeout(soon, store.write(&key(3, 0), 0, &pattern(3, B as usize), 3))
        .await
        .expect("a small durable write waited for its data in place")
        .unwrap();
    tokio::time::timeout(soon, store.flush())
        .await
        .expect("a flush waited for data its records hold")
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(200), store.read(&key(2, 0), 0, B))
            .await
            .is_err(),
        "a read found the new blocks before their data"
    );
    // The data never lands; the store is killed.
    device.lose_writes(true);
    device.hold_writes_from(None);
    store.kill().await;
    device.lose_writes(false);
    let store = mem_store(&device, dir.path()).await;
    assert_holds_buffered(&store, &[(2, 2, 1), (3, 3, 1)]).await;

    // A checkpoint ends the lap the records are in: it waits for the data.
    store.flush().await.unwrap();
    device.hold_writes_from(Some(store.journal_blocks()));
    tokio::time::timeout(soon, buffered(&store, 4, 4, 1))
        .await
        .expect("a small buffered write waited for its data in place");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), store.flush_and_release())
            .await
            .is_err(),
        "a checkpoint ended the lap before the data its records hold landed"
    );
    device.hold_writes_from(None);
    store.flush_and_release().await.unwrap();
    assert_holds_buffered(&store, &[(2, 2, 1), (3, 3, 1), (4, 4, 1)]).await;
    assert_clean_and_close(store).await;
}

/// A store whose client flushed, then wrote pattern 2 over the 2 blocks at
/// the start of object 1 (buffered, small): the write was answered from its
/// journal record, and its data's write in place is held.
async fn answered_with_data_held(
    dir: &std::path::Path,
) -> (Arc<MemDevice>, ObjectStore<Arc<MemDevice>>) {
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir).await;
    buffered(&store, 1, 1, 2).await;
    store.flush().await.unwrap();
    device.hold_writes_from(Some(store.journal_blocks()));
    buffered(&store, 1, 2, 2).await;
    (device, store)
}

/// After long enough for a sync or checkpoint started beside it to be
/// waiting for the held writes, lets them go failing.
async fn fail_held_writes_soon(device: &MemDevice) {
    tokio::time::sleep(Duration::from_millis(100)).await;
    device.fail_held_writes(true);
    device.hold_writes_from(None);
}

/// CPU time of the calling thread: the test's runtime thread, where the
/// store's committer runs too (other tests of the process do not count).
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for clock_gettime to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime failed");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// A store that failed with changes left unsynced stays idle: its
/// committer does not wake up again and again to sync them (each try fails
/// at once), which kept an OSD's one runtime thread busy.
#[tokio::test]
async fn a_failed_store_leaves_its_committer_idle() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;
    // A change left unsynced: its sync is due 1 s after it.
    buffered(&store, 1, 1, 1).await;
    device.fail_flushes(true);
    assert!(store.flush().await.is_err(), "the flush did not fail");
    let before = thread_cpu();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let used = thread_cpu() - before;
    assert!(
        used < Duration::from_millis(400),
        "{used:?} of CPU in 2 s with nothing to do"
    );
    device.fail_flushes(false);
    store.close().await;
}

/// A small write's data that fails to go in place after the write was
/// answered (from its journal record) fails the store: its record is the
/// only copy. Reads of it fail their checksum rather than return old data,
/// and the next open writes it in place from the record.
#[tokio::test]
async fn a_failed_write_in_place_after_the_answer_fails_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (device, store) = answered_with_data_held(dir.path()).await;
    device.fail_writes(true);
    device.hold_writes_from(None);
    assert!(
        matches!(
            store.read(&key(1, 0), 0, 2 * B).await,
            Err(StoreError::Checksum { .. })
        ),
        "a read returned data that never landed"
    );
    let err = store
        .write_with(
            &key(2, 0),
            0,
            &pattern(3, B as usize),
            3,
            Durability::Buffered,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Failed(_)), "{err}");
    device.fail_writes(false);
    store.close().await;
    let store = mem_store(&device, dir.path()).await;
    assert_holds_buffered(&store, &[(1, 2, 2)]).await;
    assert_clean_and_close(store).await;
}

/// Buffered changes reach RocksDB once the sync that covers their data has
/// run, even when no more writes come: the committer wakes up for the sync
/// (at most `BUFFERED_SYNC_AFTER`, 1 s, after the first change) and for the
/// application after it, rather than leaving them to a later write's path.
#[tokio::test]
async fn buffered_changes_reach_rocksdb_after_their_sync_without_more_writes() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;
    // Written together, the writes make one group.
    futures::future::join_all((1..=8).map(|object| buffered(&store, object, object, 1))).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(
        store.buffered_waiting() > 0,
        "applied before a flush covered them"
    );
    let flushes = device.counters().1;
    // The sync after 1 s, then the application.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(device.counters().1 > flushes, "no sync ran");
    assert_eq!(store.buffered_waiting(), 0, "synced changes still wait");
    let expected: Vec<(u64, u64, u64)> = (1..=8).map(|object| (object, object, 1)).collect();
    assert_holds_buffered(&store, &expected).await;
    assert_clean_and_close(store).await;
}

/// A checkpoint waits for the data written in place behind journal records
/// before it ends their lap; when that write fails meanwhile, the record is
/// the only copy of an acknowledged write: the checkpoint fails and leaves
/// the lap for the next open, which writes the data in place from it.
#[tokio::test]
async fn a_checkpoint_keeps_the_lap_when_a_write_in_place_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (device, store) = answered_with_data_held(dir.path()).await;
    let (checkpoint, ()) = tokio::join!(store.flush_and_release(), fail_held_writes_soon(&device));
    assert!(
        checkpoint.is_err(),
        "a checkpoint ended the lap of a record whose data failed to land"
    );
    device.fail_held_writes(false);
    store.close().await;
    let store = mem_store(&device, dir.path()).await;
    assert_holds_buffered(&store, &[(1, 2, 2)]).await;
    assert_clean_and_close(store).await;
}

/// By default a small buffered write is deferred only while the store is
/// latency-bound: written one at a time (a client at iodepth 1), each is;
/// of many at once, only those that found at most one other in progress.
/// The deferred ones whose data never reached the device read back after
/// a kill, from the logged copies.
#[tokio::test]
async fn small_writes_are_deferred_one_at_a_time_and_not_under_load() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;
    // These writes in place never reach the device.
    device.lose_writes(true);
    for object in 1..=8 {
        buffered(&store, object, object, 1).await;
    }
    assert_eq!(
        store.deferred_writes(),
        8,
        "writes one at a time were not all deferred"
    );
    device.lose_writes(false);

    let writes = (11..=42).map(|object| buffered(&store, object, object, 1));
    futures::future::join_all(writes).await;
    let deferred = store.deferred_writes() - 8;
    assert!(
        deferred <= 2,
        "{deferred} of 32 writes at once were deferred (at most the first two may be)"
    );
    store.kill().await;

    let store = mem_store(&device, dir.path()).await;
    assert_eq!(store.deferred_copies().unwrap(), 0, "open left copies");
    let written: Vec<_> = (1..=8).chain(11..=42).map(|o| (o, o, 1)).collect();
    assert_holds_buffered(&store, &written).await;
    assert_clean_and_close(store).await;
}

/// The same for deferred writes: a sync waits for their data before it
/// deletes their copies in RocksDB; when the data fails to land, the copy
/// is the only one, and the sync fails without deleting it.
#[tokio::test]
async fn a_sync_keeps_deferred_copies_when_their_data_fails_to_land() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let meta = dir.path().join("meta");
    let store = ObjectStore::open(device.clone(), &meta, deferring())
        .await
        .unwrap();
    buffered(&store, 1, 1, 1).await;
    store.flush_and_release().await.unwrap();
    device.hold_writes_from(Some(store.journal_blocks()));
    buffered(&store, 2, 2, 1).await;
    assert_eq!(store.deferred_copies().unwrap(), 1, "not deferred");
    let (sync, ()) = tokio::join!(store.flush(), fail_held_writes_soon(&device));
    assert!(
        sync.is_err(),
        "a sync deleted the copy of deferred data that failed to land"
    );
    device.fail_held_writes(false);
    store.close().await;
    let store = ObjectStore::open(device.clone(), &meta, deferring())
        .await
        .unwrap();
    assert_holds_buffered(&store, &[(1, 1, 1), (2, 2, 1)]).await;
    assert_clean_and_close(store).await;
}

/// A client that flushes after every write: once the store has seen that
/// pace, its small buffered writes are durable when answered (a power loss
/// right after one, before its flush, keeps it) and the flush that follows
/// leaves the device alone. Such a write after a larger buffered one (whose
/// data no record holds) flushes that data too. A client that flushes after
/// every fourth write gets buffered writes, from the start and once the
/// store has seen its new pace.
#[tokio::test]
async fn writes_of_a_client_that_flushes_after_each_are_durable_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    // A durable write persists its own blocks only: nothing else written
    // and not flushed survives the power loss below.
    device.set_fua(true);
    let store = mem_store(&device, dir.path()).await;
    for object in 1..=40u64 {
        buffered(&store, object, object, 1).await;
        if object % 4 == 0 {
            store.flush().await.unwrap();
        }
    }
    assert_eq!(
        store.early_durable_writes(),
        0,
        "writes of a client flushing after every fourth were made durable"
    );
    for object in 41..=80u64 {
        buffered(&store, object, object, 1).await;
        store.flush().await.unwrap();
    }
    let early = store.early_durable_writes();
    assert!(
        (20..=40).contains(&early),
        "{early} of 40 writes each followed by a flush were made durable at once"
    );
    // A larger write's data is in place only: the small write made durable
    // after it must flush it (its record holds the larger one's blocks).
    store.flush().await.unwrap();
    buffered(&store, 100, 100, 16).await;
    buffered(&store, 101, 101, 1).await;
    assert_eq!(store.early_durable_writes(), early + 1);
    store.flush().await.unwrap();
    let early = early + 1;
    buffered(&store, 81, 81, 1).await;
    let (_, flushes) = device.counters();
    store.flush().await.unwrap();
    assert_eq!(
        device.counters().1,
        flushes,
        "the flush after a write made durable flushed the device"
    );
    // RocksDB's unsynced writes after this point go with the power.
    let meta = dir.path().join("meta-before");
    store.snapshot_metadata(&meta).unwrap();
    buffered(&store, 82, 82, 1).await;
    assert_eq!(store.early_durable_writes(), early + 2);
    // Writes without flushes: buffered again from the third on.
    for object in 83..=90u64 {
        buffered(&store, object, object, 1).await;
    }
    assert_eq!(
        store.early_durable_writes(),
        early + 3,
        "writes of a client that stopped flushing were still made durable"
    );
    let store = power_cycle_to(store, &device, &meta, |_| false).await;
    let mut written: Vec<_> = (1..=83).map(|o| (o, o, 1)).collect();
    written.extend([(100, 100, 16), (101, 101, 1)]);
    assert_holds_buffered(&store, &written).await;

    // The pace learned again, then a flush after every fourth write: the
    // first two writes after a flush are made durable until the average
    // passes 1.5 writes per flush (two flushes), none after.
    for object in 201..=240u64 {
        buffered(&store, object, object, 1).await;
        store.flush().await.unwrap();
    }
    let learned = store.early_durable_writes();
    assert!(
        learned >= 20,
        "{learned} of 40 writes made durable after a reopen"
    );
    let mut per_flush = Vec::new();
    for round in 0..6u64 {
        let before = store.early_durable_writes();
        for object in 0..4 {
            buffered(&store, 300 + round * 4 + object, 1, 1).await;
        }
        store.flush().await.unwrap();
        per_flush.push(store.early_durable_writes() - before);
    }
    assert!(
        per_flush[2..].iter().all(|&n| n == 0) && per_flush[..2].iter().all(|&n| n <= 2),
        "writes made durable per round of four writes and a flush: {per_flush:?}"
    );
    assert_clean_and_close(store).await;
}

/// A store on `device` that a client flushed (so its small buffered writes
/// go into the journal), and a copy of its metadata taken then: RocksDB's
/// unsynced writes may go with the power, and it comes back as that copy.
async fn flushed_store_and_copy(
    device: &Arc<MemDevice>,
    dir: &std::path::Path,
) -> (ObjectStore<Arc<MemDevice>>, std::path::PathBuf) {
    let store = mem_store(device, dir).await;
    store.flush().await.unwrap();
    let meta = dir.join("meta-before");
    store.snapshot_metadata(&meta).unwrap();
    (store, meta)
}

/// Cuts the power (keeping the unflushed writes to blocks `keep` says) and
/// reopens on the metadata at `meta`.
async fn power_cycle_to(
    store: ObjectStore<Arc<MemDevice>>,
    device: &Arc<MemDevice>,
    meta: &std::path::Path,
    keep: impl FnMut(u64) -> bool,
) -> ObjectStore<Arc<MemDevice>> {
    device.power_loss(keep);
    store.close().await;
    device.power_on();
    reboot(meta);
    ObjectStore::open(device.clone(), meta, StoreConfig::default())
        .await
        .unwrap()
}

/// Records written without a flush can outlive an earlier one a power loss
/// dropped. The next lap must not number its records so that such a
/// leftover reads as its continuation: here the leftover would bring back a
/// stale write over a flushed one.
#[tokio::test]
async fn records_left_after_a_lost_one_are_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let (store, meta) = flushed_store_and_copy(&device, dir.path()).await;
    for object in 1..=3u64 {
        buffered(&store, object, object, 1).await;
    }
    // The cache kept every write but the first record's first block.
    let store = power_cycle_to(store, &device, &meta, |block| block != 0).await;
    store.flush().await.unwrap();
    buffered(&store, 2, 20, 1).await;
    store.flush().await.unwrap();
    let store = power_cycle_to(store, &device, &meta, |_| false).await;
    assert_eq!(
        store.read(&key(2, 0), 0, B).await.unwrap()[..],
        pattern(20, B as usize)[..],
        "a record of the lap before the power loss was replayed"
    );
    assert_clean_and_close(store).await;
}

/// A small buffered write that follows a larger one (whose data is not in
/// any record and not flushed) must not put that write's change into an
/// unflushed record: a power loss that kept the record but not the data
/// would point the object at blocks that never got it.
#[tokio::test]
async fn a_record_never_points_at_unflushed_data() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let (store, meta) = flushed_store_and_copy(&device, dir.path()).await;
    buffered(&store, 1, 1, 9).await;
    buffered(&store, 2, 2, 1).await;
    // The cache kept the journal, not the data blocks.
    let journal = store.journal_blocks();
    let store = power_cycle_to(store, &device, &meta, |block| block < journal).await;
    for (object, blocks) in [(1, 9), (2, 1)] {
        let got = store.read(&key(object, 0), 0, blocks * B).await.unwrap();
        let new = pattern(object, (blocks * B) as usize);
        assert!(
            got.iter().all(|b| *b == 0) || got[..] == new[..],
            "object {object} is neither old nor new"
        );
    }
    assert_clean_and_close(store).await;
}

/// A store on `device` whose object `key(1, 0)` was written durably
/// (`blocks` blocks of pattern 1) and then overwritten buffered (pattern 2).
/// Returns it with the free block count and the device's flush count from
/// before the overwrite.
async fn durable_then_buffered(
    device: &Arc<MemDevice>,
    dir: &std::path::Path,
    blocks: u64,
) -> (ObjectStore<Arc<MemDevice>>, u64, u64) {
    let store = mem_store(device, dir).await;
    let a = key(1, 0);
    store
        .write(&a, 0, &pattern(1, (blocks * B) as usize), 1)
        .await
        .unwrap();
    let (free_before, _) = store.space();
    let (_, flushes_before) = device.counters();
    store
        .write_with(
            &a,
            0,
            &pattern(2, (blocks * B) as usize),
            2,
            Durability::Buffered,
        )
        .await
        .unwrap();
    (store, free_before, flushes_before)
}

/// Cuts the power (every unflushed device write is lost) and reopens.
async fn power_cycle(
    store: ObjectStore<Arc<MemDevice>>,
    device: &Arc<MemDevice>,
    dir: &std::path::Path,
) -> ObjectStore<Arc<MemDevice>> {
    device.power_loss(|_| false);
    store.close().await;
    device.power_on();
    reboot(&dir.join("meta"));
    mem_store(device, dir).await
}

/// Buffered changes (NBD writes without FUA) are acknowledged without a
/// device flush or a metadata sync; the blocks they give up stay allocated
/// until a sync covers them (power loss would bring the old metadata back);
/// `flush` makes all of them durable: a power loss that drops every unflushed
/// device write afterwards loses nothing.
#[tokio::test]
async fn buffered_changes_are_durable_after_flush() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    // A disk with FUA: the journal record a flush writes must not be
    // trusted to carry the buffered data with it.
    device.set_fua(true);
    let (store, free_before, flushes_before) = durable_then_buffered(&device, dir.path(), 64).await;
    let a = key(1, 0);
    for i in 0..16u64 {
        store
            .write_with(
                &key(2, i),
                0,
                &pattern(100 + i, (16 * B) as usize),
                3,
                Durability::Buffered,
            )
            .await
            .unwrap();
    }
    store
        .discard_with(&key(2, 15), 0, 16 * B, 4, Durability::Buffered)
        .await
        .unwrap();
    assert_eq!(
        device.counters().1,
        flushes_before,
        "a buffered change must not flush the device"
    );
    assert_eq!(
        store.space().0,
        free_before - 64 - 16 * 16,
        "blocks given up by unsynced changes must stay allocated"
    );
    // Readable at once.
    assert_eq!(
        store.read(&a, 0, 64 * B).await.unwrap()[..],
        pattern(2, (64 * B) as usize)[..]
    );

    store.flush().await.unwrap();
    assert!(
        device.counters().1 > flushes_before,
        "flush must flush the device"
    );
    assert_eq!(
        store.space().0,
        free_before - 15 * 16,
        "after the sync the old and discarded blocks are free"
    );
    // A second flush with nothing buffered does no I/O.
    let (_, flushes) = device.counters();
    store.flush().await.unwrap();
    assert_eq!(device.counters().1, flushes);

    // The power goes and takes every unflushed device write with it.
    let store = power_cycle(store, &device, dir.path()).await;
    assert_eq!(
        store.read(&a, 0, 64 * B).await.unwrap()[..],
        pattern(2, (64 * B) as usize)[..]
    );
    for i in 0..15u64 {
        assert_eq!(
            store.read(&key(2, i), 0, 16 * B).await.unwrap()[..],
            pattern(100 + i, (16 * B) as usize)[..],
            "object {i}"
        );
    }
    assert!(
        store
            .read(&key(2, 15), 0, 16 * B)
            .await
            .unwrap()
            .iter()
            .all(|b| *b == 0)
    );
    assert_clean_and_close(store).await;
}

/// A client that never flushes still gets its buffered changes synced
/// within about a second, and the blocks they gave up come free then.
#[tokio::test]
async fn buffered_changes_are_synced_without_a_flush() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let (store, free_before, flushes_before) = durable_then_buffered(&device, dir.path(), 32).await;
    let a = key(1, 0);
    assert_eq!(store.space().0, free_before - 32);
    let mut waited = std::time::Duration::ZERO;
    while store.space().0 != free_before && waited < std::time::Duration::from_secs(10) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waited += std::time::Duration::from_millis(50);
    }
    assert_eq!(
        store.space().0,
        free_before,
        "the committer never synced on its own"
    );
    assert!(device.counters().1 > flushes_before);
    let store = power_cycle(store, &device, dir.path()).await;
    assert_eq!(
        store.read(&a, 0, 32 * B).await.unwrap()[..],
        pattern(2, (32 * B) as usize)[..]
    );
    store.close().await;
}

/// A clone shares its source's blocks (reference counted): no data copied,
/// later writes to either side copy on write, deletes free a block only
/// when its last reference goes, and all of it survives a reopen.
#[tokio::test]
async fn clones_share_blocks_until_written() {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;
    let (total_free, _) = store.space();
    let a = key(1, 0);
    let snap = key(1, 1);
    let snap2 = key(1, 2);
    let original = pattern(1, 16 * BLOCK_BYTES);
    store.write(&a, 0, &original, 1).await.unwrap();
    store.clone_object(&a, &snap, 2).await.unwrap();
    assert_eq!(store.space().0, total_free - 16, "a clone copies no data");
    assert_eq!(
        &store.read(&snap, 0, 16 * B).await.unwrap()[..],
        &original[..]
    );

    let patch = pattern(2, 4 * BLOCK_BYTES);
    store.write(&a, 0, &patch, 3).await.unwrap();
    assert_eq!(store.space().0, total_free - 20);
    assert_eq!(&store.read(&a, 0, 4 * B).await.unwrap()[..], &patch[..]);
    assert_eq!(
        &store.read(&snap, 0, 16 * B).await.unwrap()[..],
        &original[..]
    );

    store.clone_object(&snap, &snap2, 4).await.unwrap();
    store.delete(&snap).await.unwrap();
    assert_eq!(
        store.space().0,
        total_free - 20,
        "snap2 still holds the old blocks"
    );
    assert_eq!(
        &store.read(&snap2, 0, 16 * B).await.unwrap()[..],
        &original[..]
    );
    store.discard(&a, 8 * B, 8 * B, 5).await.unwrap();
    assert_eq!(
        &store.read(&snap2, 0, 16 * B).await.unwrap()[..],
        &original[..]
    );
    let report = store.fsck().await.unwrap();
    assert!(report.is_clean(), "{report:?}");

    assert!(matches!(
        store.clone_object(&a, &snap2, 6).await,
        Err(StoreError::ObjectExists(_))
    ));
    assert!(matches!(
        store.clone_object(&key(9, 9), &key(9, 10), 6).await,
        Err(StoreError::ObjectNotFound(_))
    ));
    store.close().await;

    let store = mem_store(&device, dir.path()).await;
    assert!(store.fsck().await.unwrap().is_clean());
    assert_eq!(
        &store.read(&snap2, 0, 16 * B).await.unwrap()[..],
        &original[..]
    );
    store.delete(&a).await.unwrap();
    store.delete(&snap2).await.unwrap();
    assert_eq!(store.space().0, total_free, "every block is free again");
    assert!(store.fsck().await.unwrap().is_clean());
}

/// Random writes (small and large, durable and buffered), discards,
/// write-zeroes, clones, deletes and reads on a few objects, against a model
/// of every block. The block-map cache holds 2 objects of 6, so maps are
/// loaded, updated, dropped and evicted all the time; any stale map reads
/// wrong bytes. The cache keeps each object's version too: after every
/// operation the version read must be the model's (a stale cached one
/// would let a replica drop a newer write or apply an older one). After a
/// reopen (empty cache) everything reads the same.
#[tokio::test]
async fn random_operations_read_back_what_a_model_says() {
    for seed in seeds(0..8) {
        eprintln!("seed {seed}");
        model_run(seed).await;
    }
}

async fn model_run(seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(16384));
    // Even seeds defer small buffered writes at any depth, odd ones never.
    let deferring = seed.is_multiple_of(2);
    let config = StoreConfig {
        map_cache_objects: 2,
        deferred_writes_in_flight: if deferring { 8 } else { 0 },
        defer_while_writes_at_most: usize::MAX,
        ..StoreConfig::default()
    };
    let store = ObjectStore::open(device.clone(), &dir.path().join("meta"), config.clone())
        .await
        .unwrap();
    const BLOCKS: u64 = 64;
    let objects: Vec<ObjectKey> = (0..6).map(|i| key(40 + i, 0)).collect();
    // object -> block -> (write id, block within the write), None: zeros.
    let mut model: HashMap<ObjectKey, Vec<WriteBlock>> = objects
        .iter()
        .map(|k| (*k, vec![None; BLOCKS as usize]))
        .collect();
    let mut exists: HashMap<ObjectKey, bool> = objects.iter().map(|k| (*k, false)).collect();
    let mut versions: HashMap<ObjectKey, Option<u64>> =
        objects.iter().map(|k| (*k, None)).collect();
    let mut lengths = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for id in 1..=600u64 {
        if id % 50 == 0 {
            // A sync: deferred writes' copies go, given-up blocks come free.
            store.flush().await.unwrap();
        }
        let object = objects[rng.random_range(0..objects.len())];
        let first = rng.random_range(0..BLOCKS);
        let count = rng.random_range(1..=(BLOCKS - first).min(16));
        match rng.random_range(0..10u32) {
            0..=4 => {
                let data = pattern(id, (count * B) as usize);
                lengths.insert(id, data.len());
                let durability = if rng.random_bool(0.5) {
                    Durability::Durable
                } else {
                    Durability::Buffered
                };
                store
                    .write_with(&object, first * B, &data, id, durability)
                    .await
                    .unwrap();
                let blocks = model.get_mut(&object).unwrap();
                for i in 0..count {
                    blocks[(first + i) as usize] = Some((id, i as usize));
                }
                exists.insert(object, true);
                versions.insert(object, Some(id));
            }
            5 => {
                store
                    .discard(&object, first * B, count * B, id)
                    .await
                    .unwrap();
                let blocks = model.get_mut(&object).unwrap();
                for i in first..first + count {
                    blocks[i as usize] = None;
                }
                exists.insert(object, true);
                versions.insert(object, Some(id));
            }
            6 => {
                store.delete(&object).await.unwrap();
                model.insert(object, vec![None; BLOCKS as usize]);
                exists.insert(object, false);
                versions.insert(object, None);
            }
            7 => {
                let target = objects[rng.random_range(0..objects.len())];
                // Read the target first, so a map of the missing object is
                // cached when the clone creates it.
                let _ = store.read(&target, 0, B).await.unwrap();
                let result = store.clone_object(&object, &target, id).await;
                if exists[&object] && !exists[&target] && object != target {
                    result.unwrap();
                    let blocks = model[&object].clone();
                    model.insert(target, blocks);
                    exists.insert(target, true);
                    versions.insert(target, Some(id));
                } else {
                    assert!(result.is_err(), "clone {object} -> {target}");
                }
            }
            _ => {
                let got = store.read(&object, first * B, count * B).await.unwrap();
                for i in 0..count {
                    let want = block_of(model[&object][(first + i) as usize], &lengths);
                    let at = (i * B) as usize;
                    assert_eq!(
                        &got[at..at + BLOCK_BYTES],
                        &want[..],
                        "op {id}: {object} block {}",
                        first + i
                    );
                }
            }
        }
        for object in &objects {
            assert_eq!(
                store.version(object).await.unwrap(),
                versions[object],
                "op {id}: version of {object}"
            );
        }
    }
    async fn check(
        store: ObjectStore<Arc<MemDevice>>,
        objects: &[ObjectKey],
        model: &HashMap<ObjectKey, Vec<WriteBlock>>,
        lengths: &HashMap<u64, usize>,
        versions: &HashMap<ObjectKey, Option<u64>>,
    ) -> ObjectStore<Arc<MemDevice>> {
        for object in objects {
            assert_eq!(store.version(object).await.unwrap(), versions[object]);
            let got = store.read(object, 0, BLOCKS * B).await.unwrap();
            for block in 0..BLOCKS {
                let want = block_of(model[object][block as usize], lengths);
                let at = (block * B) as usize;
                assert_eq!(
                    &got[at..at + BLOCK_BYTES],
                    &want[..],
                    "{object} block {block}"
                );
            }
        }
        let report = store.fsck().await.unwrap();
        assert!(report.is_clean(), "{report:?}");
        store
    }
    let store = check(store, &objects, &model, &lengths, &versions).await;
    store.close().await;
    let store = ObjectStore::open(device.clone(), &dir.path().join("meta"), config.clone())
        .await
        .unwrap();
    let store = check(store, &objects, &model, &lengths, &versions).await;
    // Killed with the last writes' data on its way to the device (lost):
    // their copies in RocksDB bring it back. Without deferral a write is
    // acknowledged only once its data landed: killed after the writes.
    device.lose_writes(deferring);
    for object in &objects {
        let id = 10_000 + object.object.volume.0;
        let data = pattern(id, B as usize);
        lengths.insert(id, data.len());
        store
            .write_with(object, 0, &data, id, Durability::Buffered)
            .await
            .unwrap();
        model.get_mut(object).unwrap()[0] = Some((id, 0));
        versions.insert(*object, Some(id));
    }
    store.kill().await;
    device.lose_writes(false);
    let store = ObjectStore::open(device.clone(), &dir.path().join("meta"), config)
        .await
        .unwrap();
    check(store, &objects, &model, &lengths, &versions)
        .await
        .close()
        .await;
}

/// Writes a 1 MiB object whole, then every other block of it again
/// (copy-on-write scatters those), leaving block 10 a hole; flushes.
/// Returns what the object holds and its version.
async fn scattered_object<D: BlockDevice>(
    store: &ObjectStore<D>,
    object: &ObjectKey,
) -> (Vec<u8>, u64) {
    let mut expected = pattern(300, 256 * BLOCK_BYTES);
    store.write(object, 0, &expected, 1).await.unwrap();
    let mut version = 1;
    for i in (0..256u64).step_by(2) {
        version += 1;
        let data = pattern(400 + i, BLOCK_BYTES);
        store.write(object, i * B, &data, version).await.unwrap();
        expected[(i * B) as usize..((i + 1) * B) as usize].copy_from_slice(&data);
    }
    version += 1;
    store.discard(object, 10 * B, B, version).await.unwrap();
    expected[(10 * B) as usize..(11 * B) as usize].fill(0);
    store.flush().await.unwrap();
    (expected, version)
}

/// A store on a fresh `MemDevice` holding `scattered_object` at `object`;
/// returns the device, the store and what the object holds.
async fn scattered_on_mem_device(
    dir: &std::path::Path,
    object: &ObjectKey,
) -> (Arc<MemDevice>, ObjectStore<Arc<MemDevice>>, Vec<u8>) {
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir).await;
    let (expected, _) = scattered_object(&store, object).await;
    (device, store, expected)
}

/// Device reads a 1 MiB read of `object` takes: runs of consecutive disk
/// blocks for consecutive object blocks.
async fn runs_of<D: BlockDevice>(store: &ObjectStore<D>, object: &ObjectKey) -> usize {
    let placement = store.block_placement(object).await.unwrap();
    1 + placement
        .windows(2)
        .filter(|pair| pair[1].0 != pair[0].0 + 1 || pair[1].1 != pair[0].1 + 1)
        .count()
}

/// A 1 MiB read of an object whose blocks random overwrites scattered
/// queues its range; the relocation writes it into one run (the hole
/// stays a hole: two runs), with the same bytes, crcs and version, and
/// frees the old blocks once synced; a read of the relocated range queues
/// nothing; it all survives a reopen and fsck finds it clean.
#[tokio::test]
async fn scattered_reads_are_relocated_into_one_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = uring_store(dir.path(), 64 << 20).await;
    let object = key(5, 0);
    let (expected, version) = scattered_object(&store, &object).await;
    let scattered = runs_of(&store, &object).await;
    assert!(scattered > 100, "only {scattered} runs: not scattered");
    let (free_before, _) = store.space();
    // A small read does not queue anything; a large one does.
    store.read(&object, 0, 16 * B).await.unwrap();
    assert_eq!(store.scattered_waiting(), 0);
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    assert_eq!(store.scattered_waiting(), 1);

    assert_eq!(store.relocate_scattered().await.unwrap(), 255);
    assert_eq!(store.relocated_blocks(), 255);
    assert_eq!(
        runs_of(&store, &object).await,
        2,
        "not one run on each side of the hole"
    );
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    assert_eq!(
        store.scattered_waiting(),
        0,
        "a relocated range was queued again"
    );
    assert_eq!(store.version(&object).await.unwrap(), Some(version));
    // The old blocks stay allocated until a sync: a power loss before it
    // brings back the entries pointing at them.
    assert_eq!(store.space().0, free_before - 255);
    // They come free with the next sync: nothing leaked.
    store.flush().await.unwrap();
    assert_eq!(store.space().0, free_before);
    store.close().await;

    let store = ObjectStore::open_dir(dir.path(), StoreConfig::default())
        .await
        .unwrap();
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    assert_eq!(runs_of(&store, &object).await, 2);
    assert_clean_and_close(store).await;
}

/// A queued range written after its read is left as it is (relocating
/// what the read saw would bring back the data the write replaced), and
/// stores that do not relocate queue nothing.
#[tokio::test]
async fn a_range_written_after_its_read_is_not_relocated() {
    let dir = tempfile::tempdir().unwrap();
    let store = uring_store(dir.path(), 64 << 20).await;
    let object = key(5, 1);
    let (mut expected, version) = scattered_object(&store, &object).await;
    store.read(&object, 0, 256 * B).await.unwrap();
    assert_eq!(store.scattered_waiting(), 1);
    let data = pattern(999, BLOCK_BYTES);
    store
        .write(&object, 77 * B, &data, version + 1)
        .await
        .unwrap();
    expected[(77 * B) as usize..(78 * B) as usize].copy_from_slice(&data);
    assert_eq!(store.relocate_scattered().await.unwrap(), 0);
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    store.close().await;

    let config = StoreConfig {
        relocate_bytes_per_sec: 0,
        ..StoreConfig::default()
    };
    let store = ObjectStore::open_dir(dir.path(), config).await.unwrap();
    store.read(&object, 0, 256 * B).await.unwrap();
    assert_eq!(store.scattered_waiting(), 0);
    assert_clean_and_close(store).await;
}

/// A relocation is a buffered change: a power loss before the next sync
/// brings back the old block entries, and the old blocks still hold their
/// data, even after small writes (which fill single holes) took space
/// meanwhile and the device kept them.
#[tokio::test]
async fn a_power_loss_after_a_relocation_keeps_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let object = key(5, 2);
    let (device, store, expected) = scattered_on_mem_device(dir.path(), &object).await;
    let meta = dir.path().join("meta-before");
    store.snapshot_metadata(&meta).unwrap();
    store.read(&object, 0, 256 * B).await.unwrap();
    assert_eq!(store.relocate_scattered().await.unwrap(), 255);
    // Small writes fill single holes: the old blocks, were they free.
    for i in 0..128u64 {
        let data = pattern(500 + i, BLOCK_BYTES);
        store
            .write_with(
                &key(5, 3),
                (255 - 2 * i) * B,
                &data,
                i + 1,
                Durability::Buffered,
            )
            .await
            .unwrap();
    }
    let store = power_cycle_to(store, &device, &meta, |_| true).await;
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    assert!(
        runs_of(&store, &object).await > 100,
        "the relocation outlived the power loss"
    );
    assert_clean_and_close(store).await;
}

/// A relocation's entries wait for a flush before they reach RocksDB, and
/// the run they point at is on the device by then: a power loss right after
/// the relocation keeps the old layout (RocksDB does not have the entries
/// yet), one after they reached RocksDB keeps the new, and the data reads
/// back whole either way.
#[tokio::test]
async fn a_relocation_is_on_the_device_before_its_entries_are() {
    let dir = tempfile::tempdir().unwrap();
    let object = key(5, 4);
    let (device, store, expected) = scattered_on_mem_device(dir.path(), &object).await;
    store.read(&object, 0, 256 * B).await.unwrap();
    assert_eq!(store.relocate_scattered().await.unwrap(), 255);
    let meta = dir.path().join("meta-after");
    store.snapshot_metadata(&meta).unwrap();
    let store = power_cycle_to(store, &device, &meta, |_| false).await;
    assert!(
        runs_of(&store, &object).await > 100,
        "the relocation's entries reached RocksDB before a flush"
    );
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    // Again, with the entries applied (the committer's sync, then the
    // application after it) before the power goes.
    store.read(&object, 0, 256 * B).await.unwrap();
    assert_eq!(store.relocate_scattered().await.unwrap(), 255);
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.buffered_waiting() > 0 {
        assert!(
            Instant::now() < deadline,
            "the relocation's entries were never applied"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let meta = dir.path().join("meta-applied");
    store.snapshot_metadata(&meta).unwrap();
    let store = power_cycle_to(store, &device, &meta, |_| false).await;
    assert_eq!(
        runs_of(&store, &object).await,
        2,
        "the relocation's entries were lost"
    );
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    assert_clean_and_close(store).await;
}

/// Reads split by holes alone are not queued (no relocation joins them),
/// nor are ranges sharing blocks with a snapshot (moving them would copy
/// the blocks), nor small reads.
#[tokio::test]
async fn holes_shared_blocks_and_small_reads_are_not_relocated() {
    let dir = tempfile::tempdir().unwrap();
    let store = uring_store(dir.path(), 64 << 20).await;
    let holes = key(5, 5);
    for i in (0..256u64).step_by(2) {
        let data = pattern(600 + i, BLOCK_BYTES);
        store.write(&holes, i * B, &data, i + 1).await.unwrap();
    }
    store.read(&holes, 0, 256 * B).await.unwrap();
    assert_eq!(store.scattered_waiting(), 0, "holes alone queued a range");

    let object = key(5, 6);
    let (expected, version) = scattered_object(&store, &object).await;
    store.read(&object, 0, 16 * B).await.unwrap();
    assert_eq!(store.scattered_waiting(), 0, "a 64 KiB read queued a range");
    store
        .clone_object(&object, &key(5, 7), version)
        .await
        .unwrap();
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    assert_eq!(
        store.scattered_waiting(),
        0,
        "a snapshot's blocks were queued"
    );
    assert_clean_and_close(store).await;
}

/// A write that comes while its range is being relocated waits for the
/// relocation (the object's lock) and is what reads see afterwards: a
/// relocation committing after it would put the old block back.
#[tokio::test]
async fn a_write_during_a_relocation_waits_for_it_and_wins() {
    let dir = tempfile::tempdir().unwrap();
    let object = key(5, 8);
    let (device, store, mut expected) = scattered_on_mem_device(dir.path(), &object).await;
    let store = Arc::new(store);
    store.read(&object, 0, 256 * B).await.unwrap();
    // The relocation's data write is held; the journal's are not.
    device.hold_writes_from(Some(store.journal_blocks()));
    let relocation = tokio::spawn({
        let store = store.clone();
        async move { store.relocate_scattered().await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let data = pattern(777, BLOCK_BYTES);
    let write = tokio::spawn({
        let (store, data) = (store.clone(), data.clone());
        async move {
            store
                .write_with(&object, 33 * B, &data, 1_000, Durability::Buffered)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!write.is_finished(), "the write went past the relocation");
    device.hold_writes_from(None);
    assert_eq!(relocation.await.unwrap().unwrap(), 255);
    write.await.unwrap().unwrap();
    expected[(33 * B) as usize..(34 * B) as usize].copy_from_slice(&data);
    assert_eq!(
        &store.read(&object, 0, 256 * B).await.unwrap()[..],
        &expected[..]
    );
    let store = Arc::into_inner(store).unwrap();
    assert_clean_and_close(store).await;
}

/// A small buffered write's unflushed journal record: its changes must not
/// reach RocksDB before a flush covers the record. Before they were held
/// back (found 2026-12-01), they were written to RocksDB (unsynced) right
/// after the record; a power loss that kept RocksDB's copy (its WAL written
/// back) and dropped the record and the data in place left the block reading
/// as a checksum error, neither the old data nor the new.
#[tokio::test]
async fn an_unflushed_records_changes_never_outlive_its_data() {
    unflushed_change_outlives_its_data(1).await;
}

/// The same for a larger buffered write (not in a record): its change went
/// from the buffered-change log into RocksDB before a flush covered its data.
#[tokio::test]
async fn a_larger_buffered_writes_change_never_outlives_its_data() {
    unflushed_change_outlives_its_data(9).await;
}

/// Writes `blocks` blocks of object 1 and flushes (a client that flushes),
/// overwrites them buffered, copies the metadata (what RocksDB may keep of
/// its unsynced writes), cuts the power keeping no unflushed write, reopens
/// on the copy: the blocks must read as the old data or the new.
async fn unflushed_change_outlives_its_data(blocks: u64) {
    let dir = tempfile::tempdir().unwrap();
    let device = Arc::new(MemDevice::new(4096));
    let store = mem_store(&device, dir.path()).await;
    buffered(&store, 1, 1, blocks).await;
    store.flush().await.unwrap();
    buffered(&store, 1, 2, blocks).await;
    assert_eq!(store.early_durable_writes(), 0);
    let meta = dir.path().join("meta-after");
    store.snapshot_metadata(&meta).unwrap();
    let store = power_cycle_to(store, &device, &meta, |_| false).await;
    let len = (blocks * B) as usize;
    let got = store.read(&key(1, 0), 0, blocks * B).await;
    assert!(
        matches!(&got, Ok(data) if data[..] == pattern(1, len)[..] || data[..] == pattern(2, len)[..]),
        "neither the old data nor the new: {:?}",
        got.map(|d| d.len())
    );
    assert_clean_and_close(store).await;
}
