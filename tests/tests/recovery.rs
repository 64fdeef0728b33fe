//! Failure handling with real processes: an OSD that comes back after
//! missing writes catches up before it serves (no stale reads), and the
//! stand-ins that replace a dead OSD are backfilled until every member of
//! every acting set holds the same objects, byte for byte, while the monitor
//! leader is killed along the way.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use basalt_client::{BlockClient, ClientConfig, Durability, Volume};
use basalt_monitor::MonClient;
use basalt_osd::store::{ObjectStore, StoreConfig};
use basalt_placement::{ClusterMap, OsdId, Placer};
use basalt_tests::{DevCluster, basalt, open_new_volume, write_striped};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

const MIB: u64 = 1 << 20;

/// An object as a store holds it: version and (block index, bytes).
type StoredObject = (u64, Vec<(u32, Vec<u8>)>);

fn seeded(len: u64, seed: u64) -> Arc<Vec<u8>> {
    let mut data = vec![0u8; len as usize];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut data);
    Arc::new(data)
}

/// Creates volume `v` of `size` bytes and opens it through a new client.
async fn open_volume(cluster: &DevCluster, size: u64) -> (Arc<BlockClient>, Volume) {
    open_new_volume(&cluster.mons(), "v", size).await.unwrap()
}

/// Writes `data[range]` at queue depth 8 in 512 KiB requests; every write
/// must be acknowledged. Buffered (as NBD writes without FUA): acknowledged
/// once applied on every copy, not yet synced, which must survive any
/// daemon's SIGKILL just the same.
async fn write_all(volume: &Volume, data: &Arc<Vec<u8>>, start: u64, end: u64) {
    write_striped(
        volume,
        data,
        (start, end),
        (8, 512 * 1024),
        Durability::Buffered,
    )
    .await;
}

async fn wait_for_map(client: &BlockClient, what: &str, check: impl Fn(&ClusterMap) -> bool) {
    let started = Instant::now();
    loop {
        if let Ok(map) = client.refresh_map().await
            && check(&map)
        {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `pg ls` shows every PG `want` (e.g. `active+clean`).
fn wait_for_pgs(mons: &str, want: &str) {
    let started = Instant::now();
    let mut last = Vec::new();
    while started.elapsed() < Duration::from_secs(60) {
        let out = basalt(&["--mon", mons, "pg", "ls", "--json"]);
        if out.status.success() {
            let pgs: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            if !pgs.is_empty() && pgs.iter().all(|pg| pg["state"] == want) {
                return;
            }
            last = pgs
                .into_iter()
                .filter(|pg| pg["state"] != want)
                .take(5)
                .collect();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!("PGs never all {want}: {last:?}");
}

/// Returns each OSD's data directory, from `cluster.json` and `osd.json`.
fn osd_dirs(cluster: &DevCluster) -> HashMap<OsdId, String> {
    let record = cluster.record();
    let mut dirs = HashMap::new();
    for daemon in record["daemons"].as_array().unwrap() {
        if daemon["kind"] != "osd" {
            continue;
        }
        let args: Vec<String> = serde_json::from_value(daemon["args"].clone()).unwrap();
        let data_dir = args[args.iter().position(|a| a == "--data").unwrap() + 1].clone();
        let identity: serde_json::Value =
            serde_json::from_slice(&std::fs::read(Path::new(&data_dir).join("osd.json")).unwrap())
                .unwrap();
        dirs.insert(OsdId(identity["osd_id"].as_u64().unwrap() as u32), data_dir);
    }
    dirs
}

/// Returns the name of the monitor leader (`mon1`...), as `status` says.
fn leader(mons: &str) -> String {
    let out = basalt(&["--mon", mons, "status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["leader"].as_str().unwrap().to_string()
}

/// Runs a deep scrub of every PG; returns (objects seen, mismatches).
fn deep_scrub(mons: &str) -> (u64, Vec<serde_json::Value>) {
    let out = basalt(&["--mon", mons, "--json", "scrub", "--all", "--deep"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reports: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let objects = reports.iter().map(|r| r["objects"].as_u64().unwrap()).sum();
    let mismatches = reports
        .into_iter()
        .flat_map(|r| r["mismatches"].as_array().cloned().unwrap_or_default())
        .collect();
    (objects, mismatches)
}

/// A deep scrub of every PG finds nothing to repair.
fn assert_scrub_clean(mons: &str) {
    let (objects, mismatches) = deep_scrub(mons);
    assert!(mismatches.is_empty(), "scrub found {mismatches:?}");
    assert!(objects > 0, "scrub saw no objects");
}

fn down_count(map: &ClusterMap) -> usize {
    map.osds.values().filter(|o| !o.up).count()
}

/// An OSD is SIGKILLed, and the monitor leader with it; the volume is
/// rewritten while it is down; the OSD is restarted. It is primary of about
/// a third of the PGs again, and every byte read back is the new data: it
/// caught up before serving, where it used to serve what it had. A deep
/// scrub then finds every copy identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_osd_catches_up_before_it_serves() {
    let cluster = DevCluster::up("1G").unwrap();
    let size = 128 * MIB;
    let (client, volume) = open_volume(&cluster, size).await;
    let old = seeded(size, 1);
    write_all(&volume, &old, 0, size).await;

    cluster.kill("osd-node1-0");
    // The monitor leader goes too: I/O must continue under the new one.
    let leader = leader(&cluster.mon_list());
    cluster.kill(&leader);
    let new = seeded(size, 2);
    // Writes wait for the down verdict, then go on with two copies.
    write_all(&volume, &new, 0, size).await;
    wait_for_map(&client, "the OSD marked down", |m| down_count(m) == 1).await;

    cluster.up_again().unwrap();
    wait_for_map(&client, "every OSD up", |m| down_count(m) == 0).await;
    let back = volume.read(0, size).await.unwrap();
    let stale = (0..size / (4 * MIB))
        .filter(|i| {
            let range = (i * 4 * MIB) as usize..((i + 1) * 4 * MIB) as usize;
            back[range.clone()] != new[range]
        })
        .count();
    assert_eq!(stale, 0, "{stale} objects read back stale or wrong");
    wait_for_pgs(&cluster.mon_list(), "active+clean");
    assert_scrub_clean(&cluster.mon_list());
}

/// 4 nodes, size 3: 256 MiB of seeded data written at queue depth 16; an
/// OSD SIGKILLed in the middle; writing continues after the map change;
/// `pg ls` shows the stand-ins backfilling with progress; once the OSD is
/// marked out every PG is active+clean with three copies, every
/// acknowledged byte reads back and a deep scrub finds nothing. Then the
/// OSD returns: it takes its PGs back, the stand-ins drop their copies, and
/// the stores (read offline after `dev down`) hold every object exactly on
/// the members of its PG's acting set, with the same version and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stand_ins_are_backfilled_to_identical_copies() {
    let cluster = DevCluster::up_nodes_with(
        4,
        "1G",
        &["--osd-down-after-ms", "3000", "--osd-out-after-ms", "8000"],
    )
    .unwrap();
    let size = 256 * MIB;
    let (client, volume) = open_volume(&cluster, size).await;
    let first = seeded(size, 3);
    let writer = {
        let (volume, first) = (volume.clone(), first.clone());
        tokio::spawn(async move {
            write_striped(
                &volume,
                &first,
                (0, size),
                (16, 256 * 1024),
                Durability::Buffered,
            )
            .await
        })
    };
    // What `pg ls` shows along the way.
    let states = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let watching = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let watcher = {
        let (states, watching, mons) = (states.clone(), watching.clone(), cluster.mon_list());
        std::thread::spawn(move || {
            while watching.load(std::sync::atomic::Ordering::Relaxed) {
                let out = basalt(&["--mon", &mons, "pg", "ls", "--json"]);
                let pgs: Vec<serde_json::Value> =
                    serde_json::from_slice(&out.stdout).unwrap_or_default();
                let mut states = states.lock().unwrap();
                for pg in pgs {
                    states.insert(pg["state"].as_str().unwrap_or_default().to_string());
                }
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(
        !writer.is_finished(),
        "the OSD must die in the middle of the writes"
    );
    cluster.kill("osd-node2-0");
    writer.await.unwrap();
    wait_for_map(&client, "the OSD marked down", |m| down_count(m) == 1).await;

    // Writing continues after the map change: the second half again.
    let second = seeded(size, 4);
    write_striped(
        &volume,
        &second,
        (size / 2, size),
        (16, 256 * 1024),
        Durability::Buffered,
    )
    .await;
    wait_for_map(&client, "the OSD marked out", |m| {
        m.osds.values().any(|o| !o.in_)
    })
    .await;
    // The backfill shows before the wait for clean: `pg ls` may still show
    // every PG clean just after the map change, before the primaries took
    // it up (a run once ended here with nothing seen).
    let backfilling = |s: &String| {
        s.strip_prefix("active+backfilling+degraded ")
            .and_then(|progress| progress.split_once('/'))
            .is_some_and(|(done, all)| done.parse::<u64>().is_ok() && all.parse::<u64>().is_ok())
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !states.lock().unwrap().iter().any(backfilling) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_for_pgs(&cluster.mon_list(), "active+clean");
    watching.store(false, std::sync::atomic::Ordering::Relaxed);
    watcher.join().unwrap();
    let states = states.lock().unwrap().clone();
    assert!(
        states.iter().any(backfilling),
        "pg ls never showed a stand-in being backfilled with progress: {states:?}"
    );

    let mut expected = first[..(size / 2) as usize].to_vec();
    expected.extend_from_slice(&second[(size / 2) as usize..]);
    let back = volume.read(0, size).await.unwrap();
    assert!(back[..] == expected[..], "acknowledged data lost");
    let map = client.refresh_map().await.unwrap();
    let placer = Placer::new(&map);
    for seed in 0..map.pools[&basalt_placement::PoolId(0)].pg_count {
        let pg = basalt_placement::PgId::new(basalt_placement::PoolId(0), seed);
        let acting = placer.acting_set(pg).unwrap().members;
        assert_eq!(acting.len(), 3, "{pg} is not back to three copies");
    }
    assert_scrub_clean(&cluster.mon_list());

    // The OSD comes back: it gets its PGs back (catching up on what it
    // missed) and the stand-ins drop their copies.
    cluster.up_again().unwrap();
    wait_for_map(&client, "the OSD up and in", |m| {
        m.osds.values().all(|o| o.up && o.in_)
    })
    .await;
    wait_for_pgs(&cluster.mon_list(), "active+clean");
    let back = volume.read(0, size).await.unwrap();
    assert!(back[..] == expected[..], "acknowledged data lost");
    let map: ClusterMap = client.refresh_map().await.unwrap().as_ref().clone();
    drop(volume);
    drop(client);
    assert_scrub_clean(&cluster.mon_list());

    cluster.down().unwrap();
    // Every PG's acting members hold the same objects at the same versions
    // with the same bytes.
    let mut stores: HashMap<OsdId, BTreeMap<(String, u64), StoredObject>> = HashMap::new();
    for (id, data_dir) in osd_dirs(&cluster) {
        let store = ObjectStore::open_dir(Path::new(&data_dir), StoreConfig::default())
            .await
            .unwrap();
        assert!(store.fsck().await.unwrap().is_clean(), "{data_dir}");
        let mut objects = BTreeMap::new();
        for seed in 0..map.pools[&basalt_placement::PoolId(0)].pg_count {
            let pg = basalt_placement::PgId::new(basalt_placement::PoolId(0), seed);
            for (key, _) in store.list_pg(pg).unwrap() {
                let (version, blocks) = store.object_contents(&key).await.unwrap().unwrap();
                objects.insert(
                    (pg.to_string(), key.object.index),
                    (
                        version,
                        blocks.into_iter().map(|(i, b)| (i, b.to_vec())).collect(),
                    ),
                );
            }
        }
        stores.insert(id, objects);
        store.close().await;
    }
    let placer = Placer::new(&map);
    // No OSD keeps objects of a PG it is not a member of (strays removed).
    for (osd, objects) in &stores {
        for (pg, index) in objects.keys() {
            let pg_id = (0..map.pools[&basalt_placement::PoolId(0)].pg_count)
                .map(|seed| basalt_placement::PgId::new(basalt_placement::PoolId(0), seed))
                .find(|p| p.to_string() == *pg)
                .unwrap();
            assert!(
                placer.acting_set(pg_id).unwrap().members.contains(osd),
                "{osd} keeps a stray copy of object {index} of {pg}"
            );
        }
    }
    let mut checked = 0;
    for seed in 0..map.pools[&basalt_placement::PoolId(0)].pg_count {
        let pg = basalt_placement::PgId::new(basalt_placement::PoolId(0), seed);
        let acting = placer.acting_set(pg).unwrap().members;
        assert_eq!(acting.len(), 3, "{pg} is not back to three copies");
        let copies: Vec<BTreeMap<_, _>> = acting
            .iter()
            .map(|osd| {
                stores[osd]
                    .iter()
                    .filter(|((p, _), _)| *p == pg.to_string())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .collect();
        for (osd, copy) in acting.iter().zip(&copies).skip(1) {
            assert!(
                copy == &copies[0],
                "{pg}: {osd} differs from the primary {} ({} vs {} objects)",
                acting[0],
                copy.len(),
                copies[0].len()
            );
        }
        checked += copies[0].len();
    }
    assert_eq!(
        checked as u64,
        size / (4 * MIB),
        "every object accounted for"
    );
}

/// Flips a byte of block `block` of `key` in the store at `dir` (stopped).
async fn corrupt(dir: &str, key: &basalt_osd::store::ObjectKey, block: u32) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let store = ObjectStore::open_dir(Path::new(dir), StoreConfig::default())
        .await
        .unwrap();
    let disk_block = store.locate(key, block).unwrap().unwrap();
    store.close().await;
    let (data, _) = basalt_osd::store::object_store::store_paths(Path::new(dir));
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data)
        .unwrap();
    let at = disk_block * 4096 + 100;
    let mut byte = [0u8; 1];
    file.seek(SeekFrom::Start(at)).unwrap();
    file.read_exact(&mut byte).unwrap();
    byte[0] ^= 0xff;
    file.seek(SeekFrom::Start(at)).unwrap();
    file.write_all(&byte).unwrap();
    file.sync_all().unwrap();
}

/// A byte flipped on disk in the primary's copy of one block and in a
/// replica's copy of another: reads return the right bytes (the primary
/// repairs itself from a replica that verifies), a deep scrub reports the
/// replica's bad copy and repairs it, and a second scrub finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_copies_are_never_read_and_scrub_repairs_them() {
    let cluster = DevCluster::up("1G").unwrap();
    let size = 16 * MIB;
    let (client, volume) = open_volume(&cluster, size).await;
    let data = seeded(size, 5);
    write_all(&volume, &data, 0, size).await;
    let map = client.refresh_map().await.unwrap();
    let pg = map.pg_of_object(volume.id, 0).unwrap();
    let acting = Placer::new(&map).acting_set(pg).unwrap().members;
    let key = basalt_osd::store::ObjectKey {
        pg,
        object: basalt_placement::ObjectId {
            volume: volume.id,
            index: 0,
        },
    };
    drop(volume);
    drop(client);

    cluster.down().unwrap();
    let dirs = osd_dirs(&cluster);
    corrupt(&dirs[&acting[0]], &key, 0).await;
    corrupt(&dirs[&acting[1]], &key, 1).await;
    cluster.up_again().unwrap();

    let client = BlockClient::connect(
        MonClient::new(&cluster.mons()).unwrap(),
        ClientConfig::default(),
    )
    .await
    .unwrap();
    let volume = client.open("rbd", "v").await.unwrap();
    let back = volume.read(0, size).await.unwrap();
    assert!(back[..] == data[..], "a read returned bad bytes");

    let (_, found) = deep_scrub(&cluster.mon_list());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0]["osd"], acting[1].0);
    assert_eq!(found[0]["repaired"], true);
    assert!(found[0]["problem"].as_str().unwrap().contains("checksum"));
    let (_, again) = deep_scrub(&cluster.mon_list());
    assert!(again.is_empty(), "scrub after repair: {again:?}");
    let back = volume.read(0, size).await.unwrap();
    assert!(back[..] == data[..]);
}

/// Writes numbered 4 KiB blocks, one at a time, to one object while that
/// object's primary is SIGKILLed. Afterwards the block holds the last
/// acknowledged write or the one in flight at the kill (never an older
/// one: nothing acknowledged lost or reordered), every other block of the
/// sequence reads back what was acknowledged there, and every copy agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_pgs_primary_mid_writes_loses_and_reorders_nothing() {
    let cluster = DevCluster::up_nodes(4, "1G").unwrap();
    let (client, volume) = open_volume(&cluster, 16 * MIB).await;
    let map = client.refresh_map().await.unwrap();
    let pg = map.pg_of_object(volume.id, 0).unwrap();
    let primary = Placer::new(&map).acting_set(pg).unwrap().members[0];
    // `dev up` names each OSD's data directory after its process.
    let victim = Path::new(&osd_dirs(&cluster)[&primary])
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();

    // Sequence n goes to block n % 64 of object 0; the last word of every
    // block carries its sequence number.
    let block = |n: u64| {
        let mut data = vec![(n % 251) as u8; 4096];
        data[4088..].copy_from_slice(&n.to_le_bytes());
        data
    };
    // The writer goes on until told to stop (after the kill and the
    // failover): how many writes fit in a while depends on the machine.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let writer = {
        let (volume, stop, acked) = (volume.clone(), stop.clone(), acked.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                n += 1;
                volume
                    .write((n % 64) * 4096, &block(n), Durability::Buffered)
                    .await
                    .unwrap();
                acked.store(n, std::sync::atomic::Ordering::SeqCst);
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let before_kill = acked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        before_kill >= 64,
        "only {before_kill} writes before the kill"
    );
    cluster.kill(&victim);
    wait_for_map(&client, "the primary marked down", |m| down_count(m) == 1).await;
    // Writes go on against the new primary for a while.
    let after_failover = acked.load(std::sync::atomic::Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(std::sync::atomic::Ordering::SeqCst) < after_failover + 64 {
        assert!(
            Instant::now() < deadline && !writer.is_finished(),
            "writes stopped after the failover"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.await.unwrap();
    let back = volume.read(0, 64 * 4096).await.unwrap();
    for slot in 0..64u64 {
        // The last write of the sequence to this block.
        let last = (1..=written).rev().find(|n| n % 64 == slot).unwrap();
        let got = &back[(slot * 4096) as usize..((slot + 1) * 4096) as usize];
        let seq = u64::from_le_bytes(got[4088..].try_into().unwrap());
        assert_eq!(
            seq, last,
            "block {slot} holds write {seq}, not the last acknowledged {last}"
        );
        assert!(
            got[..4088].iter().all(|b| *b == (last % 251) as u8),
            "block {slot} torn"
        );
    }
    wait_for_pgs(&cluster.mon_list(), "active+clean");
    assert_scrub_clean(&cluster.mon_list());
}

/// Runs of consecutive disk blocks for consecutive object blocks: the
/// device reads a whole read of the object takes.
fn runs(placement: &[(u32, u64)]) -> usize {
    1 + placement
        .windows(2)
        .filter(|pair| pair[1].0 != pair[0].0 + 1 || pair[1].1 != pair[0].1 + 1)
        .count()
}

/// Random overwrites scatter a volume's blocks (copy-on-write); 1 MiB
/// reads make each primary queue the scattered ranges, and every OSD is
/// SIGKILLed right after, while their relocators work through the queue
/// (the last reads' ranges at least are on their way). After the restart
/// every byte reads back; reading again lets the OSDs' relocators finish,
/// the copies still agree (deep scrub), every store is clean offline
/// (fsck), and each object has a copy laid out in a few runs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scattered_ranges_are_relocated_and_survive_a_kill() {
    let cluster = DevCluster::up("1G").unwrap();
    let size = 8 * MIB;
    let (client, volume) = open_volume(&cluster, size).await;
    let first = seeded(size, 5);
    write_all(&volume, &first, 0, size).await;
    let mut expected = first.to_vec();
    let second = seeded(size, 6);
    for block in (0..size / 4096).step_by(2) {
        let range = (block * 4096) as usize..((block + 1) * 4096) as usize;
        volume
            .write(block * 4096, &second[range.clone()], Durability::Buffered)
            .await
            .unwrap();
        expected[range.clone()].copy_from_slice(&second[range]);
    }
    let read_all = || async {
        let mut back = Vec::with_capacity(size as usize);
        for at in (0..size).step_by(MIB as usize) {
            back.extend_from_slice(&volume.read(at, MIB).await.unwrap());
        }
        back
    };
    assert!(
        read_all().await == expected,
        "scattered data read back wrong"
    );
    for osd in ["osd-node1-0", "osd-node2-0", "osd-node3-0"] {
        cluster.kill(osd);
    }
    cluster.up_again().unwrap();
    wait_for_map(&client, "every OSD up", |m| down_count(m) == 0).await;
    assert!(read_all().await == expected, "data lost to the kill");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(read_all().await == expected, "data lost to the relocation");
    assert_scrub_clean(&cluster.mon_list());
    drop(volume);
    drop(client);

    cluster.down().unwrap();
    let mut layouts: HashMap<u64, Vec<usize>> = HashMap::new();
    for (_, data_dir) in osd_dirs(&cluster) {
        let store = ObjectStore::open_dir(Path::new(&data_dir), StoreConfig::default())
            .await
            .unwrap();
        let report = store.fsck().await.unwrap();
        assert!(report.is_clean(), "{data_dir}: {report:?}");
        for (key, _) in store.objects().unwrap() {
            let placement = store.block_placement(&key).await.unwrap();
            layouts
                .entry(key.object.index)
                .or_default()
                .push(runs(&placement));
        }
        store.close().await;
    }
    assert_eq!(layouts.len(), 2, "{layouts:?}");
    for (object, copies) in &layouts {
        assert_eq!(copies.len(), 3, "object {object}: {copies:?}");
        // Scattered: ~512 runs; relocated: one per 1 MiB read.
        assert!(
            copies.iter().min().is_some_and(|runs| *runs <= 8),
            "object {object} was not relocated on any copy: {copies:?}"
        );
    }
}
