//! SIGKILL in the middle of writes, 20 times in a row, on a real file with
//! io_uring and a real RocksDB: after each restart every acknowledged write
//! reads back exactly, every block is wholly old or wholly new, and fsck is
//! clean.
//!
//! The writer is this same test binary, re-run as a child with
//! `--exact crash_child --ignored` and the store directory in its
//! environment. It logs `B` before and `A` after each write to an append-only
//! log (a plain write(2): SIGKILL does not lose the page cache), so the parent
//! knows what was acknowledged. Every other write goes through
//! `write_bytes_with` from an aligned buffer (written to disk without a copy,
//! as large payloads from the network are), the rest through `write`; every
//! fourth is a small buffered write (in even rounds deferred: acknowledged
//! before its data is written in place; in odd rounds its changes wait in the
//! buffered-change log).

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use basalt_osd::store::{BLOCK_BYTES, ObjectKey, ObjectStore, StoreConfig};
use basalt_placement::{ObjectId, PgId, PoolId, VolumeId};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const B: u64 = BLOCK_BYTES as u64;
const WRITERS: u64 = 4;
/// Kill-and-restart rounds; `BASALT_CRASH_ROUNDS=N` runs more by hand.
const ROUNDS: u64 = 20;

fn key(volume: u64) -> ObjectKey {
    ObjectKey {
        pg: PgId::new(PoolId(2), volume as u32 % 4),
        object: ObjectId {
            volume: VolumeId(volume),
            index: 0,
        },
    }
}

fn pattern(id: u64, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(id).fill_bytes(&mut data);
    data
}

/// The child: writes random extents (4 KiB to 1 MiB) from several tasks
/// until it is killed (or 60 s pass, so an orphan cannot linger).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by crash_kill_restart_twenty_times as a child process"]
async fn crash_child() {
    let dir = PathBuf::from(std::env::var("BASALT_CRASH_DIR").unwrap());
    let round: u64 = std::env::var("BASALT_CRASH_ROUND")
        .unwrap()
        .parse()
        .unwrap();
    // Even rounds: small buffered writes deferred at any depth (by default
    // only while few writes are in progress), acknowledged before their
    // data lands. Odd rounds: never deferred, their changes wait in the
    // buffered-change log until applied to RocksDB.
    let config = StoreConfig {
        deferred_writes_in_flight: if round.is_multiple_of(2) { 8 } else { 0 },
        defer_while_writes_at_most: usize::MAX,
        ..StoreConfig::default()
    };
    let store = std::sync::Arc::new(ObjectStore::open_dir(&dir, config).await.unwrap());
    let log = std::sync::Arc::new(std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(dir.join("acks.log"))
            .unwrap(),
    ));
    let started = Instant::now();
    let mut tasks = Vec::new();
    if !round.is_multiple_of(2) {
        // A client that flushes now and then: small buffered writes then
        // go out as journal records written without a flush, whose changes
        // are logged and applied after the reply.
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            while started.elapsed() < Duration::from_secs(60) {
                tokio::time::sleep(Duration::from_millis(20)).await;
                store.flush().await.unwrap();
            }
        }));
    }
    for writer in 0..WRITERS {
        let (store, log) = (store.clone(), log.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(round << 8 | writer);
            for n in 0u64.. {
                if started.elapsed() > Duration::from_secs(60) {
                    return;
                }
                let volume = writer;
                // Every fourth write is a small buffered one (an NBD write
                // without FUA): deferred, acknowledged before its data
                // lands, and it must survive the kill all the same.
                let buffered = n % 4 == 3;
                let count = if buffered && n % 8 == 7 {
                    // A larger buffered write: not in a journal record
                    // while the client flushes; its change waits in the
                    // buffered-change log, behind small writes' records.
                    rng.random_range(9..=64u64)
                } else if buffered {
                    rng.random_range(1..=8u64)
                } else {
                    rng.random_range(1..=256u64)
                };
                let first = rng.random_range(0..=(1024 - count));
                let id = round << 40 | writer << 32 | n;
                let data = pattern(id, (count * B) as usize);
                writeln!(log.lock().unwrap(), "B {id} {volume} {first} {count}").unwrap();
                if n % 2 == 0 {
                    store
                        .write(&key(volume), first * B, &data, id)
                        .await
                        .unwrap();
                } else {
                    let mut aligned = basalt_wire::aligned_buffer(data.len(), 0);
                    aligned.extend_from_slice(&data);
                    let aligned = aligned.freeze();
                    store
                        .write_bytes_with(
                            &key(volume),
                            first * B,
                            &aligned,
                            None,
                            id,
                            if buffered {
                                basalt_wire::Durability::Buffered
                            } else {
                                basalt_wire::Durability::Durable
                            },
                        )
                        .await
                        .unwrap();
                }
                writeln!(log.lock().unwrap(), "A {id}").unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

struct Extent {
    volume: u64,
    first: u64,
    count: u64,
}

/// (volume, block) -> (last acknowledged (id, index), in-flight (id, index)).
type Expected = HashMap<(u64, u64), (Option<(u64, u64)>, Option<(u64, u64)>)>;

/// What each block may hold, built from the log round by round. After a
/// restart the outcome of each write that was in flight is settled (it landed
/// or it did not), so `settle` folds what was read back into the model before
/// the next round's log is read.
#[derive(Default)]
struct Model {
    expected: Expected,
    lengths: HashMap<u64, u64>,
    extents: HashMap<u64, Extent>,
    consumed: usize,
}

impl Model {
    /// Reads the log lines written since the last call.
    fn ingest(&mut self, log: &Path) {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let new = &text[self.consumed..];
        self.consumed = text.len();
        for line in new.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                ["B", id, volume, first, count] => {
                    let id: u64 = id.parse().unwrap();
                    let extent = Extent {
                        volume: volume.parse().unwrap(),
                        first: first.parse().unwrap(),
                        count: count.parse().unwrap(),
                    };
                    self.lengths.insert(id, extent.count);
                    for i in 0..extent.count {
                        self.expected
                            .entry((extent.volume, extent.first + i))
                            .or_default()
                            .1 = Some((id, i));
                    }
                    self.extents.insert(id, extent);
                }
                ["A", id] => {
                    let id: u64 = id.parse().unwrap();
                    let extent = self.extents.get(&id).unwrap_or_else(|| {
                        panic!("acknowledgement of write {id} that never began")
                    });
                    for i in 0..extent.count {
                        let entry = self
                            .expected
                            .entry((extent.volume, extent.first + i))
                            .or_default();
                        entry.0 = Some((id, i));
                        entry.1 = None;
                    }
                }
                other => panic!("malformed log line {other:?}"),
            }
        }
    }

    /// Records that `block` was read back holding the in-flight write
    /// (`landed`) or its last acknowledged content.
    fn settle(&mut self, block: (u64, u64), landed: bool) {
        if let Some(entry) = self.expected.get_mut(&block) {
            if landed {
                entry.0 = entry.1;
            }
            entry.1 = None;
        }
    }
}

/// Returns the content block `index` of write `id` put down (or zeros),
/// generating each write's data once.
fn block_of(
    write: Option<(u64, u64)>,
    lengths: &HashMap<u64, u64>,
    cache: &mut HashMap<u64, Vec<u8>>,
) -> Vec<u8> {
    match write {
        None => vec![0; BLOCK_BYTES],
        Some((id, i)) => {
            let data = cache
                .entry(id)
                .or_insert_with(|| pattern(id, (lengths[&id] * B) as usize));
            data[(i * B) as usize..((i + 1) * B) as usize].to_vec()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_kill_restart_twenty_times() {
    let dir = tempfile::tempdir().unwrap();
    ObjectStore::format_dir(dir.path(), 128 << 20, false).unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);
    let mut total_acked = 0;
    let mut model = Model::default();
    let rounds = std::env::var("BASALT_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROUNDS);
    for round in 0..rounds {
        let mut child = Command::new(&exe)
            .args(["--exact", "crash_child", "--ignored", "--nocapture"])
            .env("BASALT_CRASH_DIR", dir.path())
            .env("BASALT_CRASH_ROUND", round.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Kill once some writes are in (the log grows), at a random moment.
        let log = dir.path().join("acks.log");
        let before = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0) == before {
            assert!(Instant::now() < deadline, "child wrote nothing in 30 s");
            assert!(child.try_wait().unwrap().is_none(), "child exited early");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(20..250)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // A kill can cut the child's last log line (a write may stop at a
        // page boundary). A cut "B" means its write never started; a cut "A"
        // counts as not acknowledged. Drop the fragment before the next child
        // appends.
        let text = std::fs::read(&log).unwrap_or_default();
        let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |p| p + 1);
        if whole < text.len() {
            let file = std::fs::OpenOptions::new().write(true).open(&log).unwrap();
            file.set_len(whole as u64).unwrap();
        }

        let store = ObjectStore::open_dir(dir.path(), StoreConfig::default())
            .await
            .unwrap();
        let report = store.fsck().await.unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
        model.ingest(&log);
        let mut settled = Vec::new();
        let mut cache = HashMap::new();
        let mut objects: HashMap<u64, bytes::Bytes> = HashMap::new();
        for volume in 0..WRITERS {
            objects.insert(volume, store.read(&key(volume), 0, 4 << 20).await.unwrap());
        }
        for ((volume, block), (done, in_flight)) in &model.expected {
            let got = &objects[volume][(block * B) as usize..((block + 1) * B) as usize];
            let old = block_of(*done, &model.lengths, &mut cache);
            let new = in_flight.map(|w| block_of(Some(w), &model.lengths, &mut cache));
            let landed = new.as_ref().is_some_and(|n| got == &n[..]);
            assert!(
                got == &old[..] || landed,
                "round {round}: volume {volume} block {block} does not hold its acknowledged data"
            );
            settled.push(((*volume, *block), landed));
        }
        for (block, landed) in settled {
            model.settle(block, landed);
        }
        total_acked = model
            .expected
            .values()
            .filter(|(done, _)| done.is_some())
            .count();
        store.close().await;
    }
    assert!(total_acked > 0, "the children acknowledged nothing");
}
