//! meta-bench: the CPU cost of the store's metadata batch for one 4 KiB
//! write, on its own.
//!
//! `cargo run --release -p basalt-osd --bin meta-bench -- --dir DIR [--writes 3000000] [--keys both|blocks|objects] [--batch N [--coalesce]] [--json]`
//!
//! Every write of the object store ends in one RocksDB batch: the block's
//! new entry (`blocks`) and the object's new version (`objects`). This
//! applies such batches, unsynced as a buffered write's are, for random
//! blocks of 3 volumes x 256 objects of 4 MiB (a 3 GiB working set, the
//! share of one OSD in fio-bench), from one thread as the committer does,
//! and reports the process's CPU time per write, memtable flushes and
//! compactions included. It exists to try RocksDB options: a memtable insert
//! is a skip-list search, the largest user-space cost of a replica under
//! 4 KiB random writes (docs/design.md, "Local object store").
//!
//! `--batch N` puts N writes' changes in one batch, as the buffered-change
//! application finds them waiting under load; `--coalesce` applies them as
//! it does, the last change per key in key order (`meta::coalesce`).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use basalt_fio_bench::suite::cpu_seconds;
use basalt_osd::store::keys::{BlockEntry, ObjectInfo, ObjectKey, block_key, object_key};
use basalt_osd::store::meta::{MetaOp, MetaStore, coalesce};
use basalt_placement::{ObjectId, PgId, PoolId, VolumeId};
use clap::{Parser, ValueEnum};
use serde::Serialize;

const VOLUMES: u64 = 3;
const OBJECTS_PER_VOLUME: u64 = 256;
const BLOCKS_PER_OBJECT: u64 = 1024;
const REPORT_EVERY: u64 = 500_000;

#[derive(Clone, Copy, Debug, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Keys {
    /// Block entry and object version, as a write has them.
    Both,
    /// The block entry alone.
    Blocks,
    /// The object version alone.
    Objects,
}

#[derive(Parser, Debug)]
#[command(about = "CPU time of the object store's per-write metadata batch")]
struct Args {
    /// Scratch directory for the database (its contents are replaced).
    #[arg(long)]
    dir: PathBuf,
    /// Batches to apply.
    #[arg(long, default_value_t = 3_000_000)]
    writes: u64,
    /// Which keys each batch puts.
    #[arg(long, value_enum, default_value_t = Keys::Both)]
    keys: Keys,
    /// Writes whose changes go in one RocksDB batch (the buffered changes
    /// an application finds waiting).
    #[arg(long, default_value_t = 1)]
    batch: u64,
    /// Apply each batch's changes coalesced and sorted (`meta::coalesce`).
    #[arg(long)]
    coalesce: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    keys: Keys,
    writes: u64,
    cpu_us_per_write: f64,
    wall_us_per_write: f64,
    /// CPU µs per write of each successive 500,000 writes (the memtables
    /// fill and flush in between).
    cpu_us_per_write_by_step: Vec<f64>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("clear {}", args.dir.display()))?;
    }
    let meta = MetaStore::open(&args.dir).context("open metadata database")?;
    // xorshift64: the same key sequence in every run.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let started = Instant::now();
    let cpu_start = process_cpu_seconds();
    let mut step_cpu = cpu_start;
    let mut steps = Vec::new();
    let mut pending: Vec<MetaOp> = Vec::new();
    for write in 0..args.writes {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let volume = state % VOLUMES;
        let index = (state >> 8) % OBJECTS_PER_VOLUME;
        let block = ((state >> 20) % BLOCKS_PER_OBJECT) as u32;
        let key = ObjectKey {
            pg: PgId {
                pool: PoolId(1),
                seed: (index % 32) as u32,
                home: None,
            },
            object: ObjectId {
                volume: VolumeId(volume),
                index,
            },
        };
        let ops = [
            MetaOp::PutBlock {
                key: block_key(&key, block),
                entry: BlockEntry {
                    disk_block: state >> 30,
                    crc: state as u32,
                },
            },
            MetaOp::PutObject {
                key: object_key(&key),
                info: ObjectInfo { version: write },
            },
        ];
        let batch = match args.keys {
            Keys::Both => &ops[..],
            Keys::Blocks => &ops[..1],
            Keys::Objects => &ops[1..],
        };
        pending.extend_from_slice(batch);
        if (write + 1) % args.batch.max(1) == 0 || write + 1 == args.writes {
            let ops = std::mem::take(&mut pending);
            let ops = if args.coalesce { coalesce(ops) } else { ops };
            meta.write(&ops, false).context("metadata batch")?;
        }
        if (write + 1) % REPORT_EVERY == 0 {
            let now = process_cpu_seconds();
            let per_write = (now - step_cpu) * 1e6 / REPORT_EVERY as f64;
            step_cpu = now;
            steps.push(per_write);
            if !args.json {
                eprintln!(
                    "{:>5}k writes: {per_write:.2} µs CPU per write",
                    (write + 1) / 1000
                );
            }
        }
    }
    let writes = args.writes.max(1) as f64;
    let report = Report {
        keys: args.keys,
        writes: args.writes,
        cpu_us_per_write: (process_cpu_seconds() - cpu_start) * 1e6 / writes,
        wall_us_per_write: started.elapsed().as_secs_f64() * 1e6 / writes,
        cpu_us_per_write_by_step: steps,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "{} writes ({:?}): {:.2} µs CPU, {:.2} µs wall per write",
            report.writes, report.keys, report.cpu_us_per_write, report.wall_us_per_write
        );
    }
    Ok(())
}

/// User + system CPU time of this process (every thread, RocksDB's
/// background flushes and compactions included).
fn process_cpu_seconds() -> f64 {
    cpu_seconds(&[std::process::id()])
}
