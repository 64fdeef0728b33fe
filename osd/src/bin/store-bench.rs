//! store-bench: the object store against fio on a raw file, same disk, same
//! working-set size, same run.
//!
//! `cargo run --release -p basalt-osd --bin store-bench -- --dir DIR --size 4G [--json]`
//!
//! Workloads (4 KiB unless said): random write QD1 (durable: the store syncs
//! before acknowledging, raw fio runs with `--fdatasync=1`), random write
//! QD32 and 1 MiB sequential write QD8 (raw fio without sync; the store
//! with the same promise, `Durability::Buffered`: data written with O_DIRECT,
//! metadata in the unsynced WAL, as an NBD write without FUA; both are also
//! run durable, as extra rows), random read QD1 and QD32. The store's
//! working set and the raw file are both half of `--size` (copy-on-write
//! needs free blocks) and both prefilled. Raw and store runs alternate for
//! `--rounds` rounds; each row shows the round with the median ratio and
//! lists every round's ratio.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use basalt_fio_bench::raw::{self, Figures, STORAGE_WORKLOADS, Workload};
use basalt_osd::store::{ObjectKey, ObjectStore, StoreConfig, UringDevice};
use basalt_placement::{ObjectId, PgId, PoolId, VolumeId};
use basalt_wire::Durability;
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

const OBJECT_BYTES: u64 = 4 << 20;

#[derive(Parser, Debug)]
#[command(about = "Benchmark the OSD object store against raw fio")]
struct Args {
    /// Scratch directory (created; its contents are replaced).
    #[arg(long)]
    dir: PathBuf,
    /// Store size, e.g. 4G; the working set is half of it.
    #[arg(long, default_value = "4G")]
    size: String,
    /// Seconds per workload and round.
    #[arg(long, default_value_t = 5)]
    runtime: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Run only the workloads whose name contains this (e.g. "qd1").
    #[arg(long)]
    only: Option<String>,
    /// Rounds of raw fio and store runs, alternated; each row reports the
    /// round with the median ratio (this machine's speed drifts by tens of
    /// percent between runs a few seconds apart).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

#[derive(Debug, Serialize)]
struct Row {
    workload: String,
    /// How the store acknowledged writes (`durable`, `buffered`; reads: `-`).
    store_writes: &'static str,
    raw: Figures,
    store: Figures,
    ratio: f64,
    /// Every round's ratio, sorted; the row shows the median round.
    round_ratios: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    randwrite_qd1_vs_raw_fdatasync: f64,
    randwrite_qd32_vs_raw: f64,
    randwrite_qd32_durable_vs_raw: f64,
    randread_qd32_vs_raw: f64,
    randread_qd1_vs_raw: f64,
    randread_qd1_latency_delta_us: f64,
    seqwrite_vs_raw: f64,
    seqwrite_durable_vs_raw: f64,
    working_set_bytes: u64,
    runtime_seconds: u64,
    rows: Vec<Row>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let size = parse_size(&args.size)?;
    let working_set = (size / 2) / OBJECT_BYTES * OBJECT_BYTES;
    if working_set < OBJECT_BYTES {
        bail!("--size must be at least 8M");
    }
    if Command::new("fio").arg("--version").output().is_err() {
        bail!("fio is not installed (apt-get install fio, or run scripts/install-deps.sh)");
    }
    if args.dir.exists() {
        std::fs::remove_dir_all(&args.dir)
            .with_context(|| format!("clear {}", args.dir.display()))?;
    }
    std::fs::create_dir_all(&args.dir).context("create scratch directory")?;
    let raw_file = args.dir.join("raw.img");
    let store_dir = args.dir.join("store");

    progress(&format!(
        "prefilling a {} MiB raw file with fio",
        working_set >> 20
    ));
    raw::prefill(&raw_file, working_set)?;
    progress(&format!(
        "formatting a {} MiB store (zero-filled, as fio's file is)",
        size >> 20
    ));
    ObjectStore::format_dir(&store_dir, size, true).context("format store")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start runtime")?;
    let store = Arc::new(
        runtime
            .block_on(ObjectStore::open_dir(&store_dir, StoreConfig::default()))
            .context("open store")?,
    );
    progress(&format!(
        "flush policy: {}",
        if store.journal_blocks() > 0 {
            "one RWF_DSYNC journal record per durable group (writes up to 32 KiB inline)"
        } else if store.data_flush_in_metadata_sync() {
            "one flush per group (metadata sync covers the prezeroed data file)"
        } else {
            "data flush, then metadata sync"
        }
    ));
    progress("prefilling the store's working set");
    runtime.block_on(prefill_store(&store, working_set))?;

    let mut rows = Vec::new();
    for workload in STORAGE_WORKLOADS {
        if args
            .only
            .as_ref()
            .is_some_and(|only| !workload.name.contains(only.as_str()))
        {
            continue;
        }
        // The store makes the promise raw fio's job makes; unsynced raw
        // writes are also compared with durable store writes.
        let mut modes = vec![if workload.fdatasync {
            Durability::Durable
        } else {
            Durability::Buffered
        }];
        if workload.write && !workload.fdatasync {
            modes.push(Durability::Durable);
        }
        let rounds = args.rounds.max(1);
        // Per mode, per round: (raw, store).
        let mut runs: Vec<Vec<(Figures, Figures)>> = vec![Vec::new(); modes.len()];
        for round in 1..=rounds {
            progress(&format!(
                "{}: raw fio (round {round}/{rounds})",
                workload.name
            ));
            let raw = raw::run(&raw_file, working_set, &workload, args.runtime)?;
            for (n, durability) in modes.iter().enumerate() {
                progress(&format!(
                    "{}: store ({}, round {round}/{rounds})",
                    workload.name,
                    mode_label(workload.write, *durability)
                ));
                let store_figures = runtime.block_on(store_run(
                    store.clone(),
                    working_set,
                    workload,
                    *durability,
                    Duration::from_secs(args.runtime),
                ))?;
                runs[n].push((raw, store_figures));
            }
        }
        for (n, (durability, mut pairs)) in modes.into_iter().zip(runs).enumerate() {
            let label = mode_label(workload.write, durability);
            let ratio = |(raw, store): &(Figures, Figures)| store.iops / raw.iops.max(1e-9);
            pairs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
            let (raw, store_figures) = pairs[pairs.len() / 2];
            rows.push(Row {
                workload: if n == 0 {
                    workload.name.to_string()
                } else {
                    format!("{} ({label})", workload.name)
                },
                store_writes: label,
                raw,
                ratio: store_figures.iops / raw.iops.max(1e-9),
                store: store_figures,
                round_ratios: pairs.iter().map(ratio).collect(),
            });
        }
    }
    if let Ok(store) = Arc::try_unwrap(store) {
        runtime.block_on(store.close());
    }
    let ratio = |name: &str| {
        rows.iter()
            .find(|r| r.workload == name)
            .map_or(0.0, |r| r.ratio)
    };
    let qd1_read = rows
        .iter()
        .find(|r| r.workload == "randread 4k qd1")
        .map_or(0.0, |r| r.store.latency_us_mean - r.raw.latency_us_mean);
    let report = Report {
        randwrite_qd1_vs_raw_fdatasync: ratio("randwrite 4k qd1"),
        randwrite_qd32_vs_raw: ratio("randwrite 4k qd32"),
        randwrite_qd32_durable_vs_raw: ratio("randwrite 4k qd32 (durable)"),
        randread_qd32_vs_raw: ratio("randread 4k qd32"),
        randread_qd1_vs_raw: ratio("randread 4k qd1"),
        randread_qd1_latency_delta_us: qd1_read,
        seqwrite_vs_raw: ratio("seqwrite 1m qd8"),
        seqwrite_durable_vs_raw: ratio("seqwrite 1m qd8 (durable)"),
        working_set_bytes: working_set,
        runtime_seconds: args.runtime,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}

fn mode_label(write: bool, durability: Durability) -> &'static str {
    match (write, durability) {
        (false, _) => "-",
        (true, Durability::Durable) => "durable",
        (true, Durability::Buffered) => "buffered",
    }
}

fn progress(step: &str) {
    eprintln!("store-bench: {step}...");
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, shift) = match text.chars().last() {
        Some('K' | 'k') => (&text[..text.len() - 1], 10),
        Some('M' | 'm') => (&text[..text.len() - 1], 20),
        Some('G' | 'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value: u64 = number
        .parse()
        .with_context(|| format!("size {text:?} is not a number with K/M/G"))?;
    value
        .checked_mul(1 << shift)
        .with_context(|| format!("size {text:?} too large"))
}

fn object_key(index: u64) -> ObjectKey {
    ObjectKey {
        pg: PgId::new(PoolId(0), (index % 64) as u32),
        object: ObjectId {
            volume: VolumeId(1),
            index,
        },
    }
}

async fn prefill_store(
    store: &Arc<ObjectStore<UringDevice>>,
    working_set: u64,
) -> anyhow::Result<()> {
    let objects = working_set / OBJECT_BYTES;
    let chunk = vec![0x5au8; 1 << 20];
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..8u64 {
        let store = store.clone();
        let chunk = chunk.clone();
        tasks.spawn(async move {
            let mut index = worker;
            while index < objects {
                for part in 0..OBJECT_BYTES / (1 << 20) {
                    store
                        .write(&object_key(index), part << 20, &chunk, 1)
                        .await?;
                }
                index += 8;
            }
            anyhow::Ok(())
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.context("prefill task")??;
    }
    Ok(())
}

async fn store_run(
    store: Arc<ObjectStore<UringDevice>>,
    working_set: u64,
    workload: Workload,
    durability: Durability,
    runtime: Duration,
) -> anyhow::Result<Figures> {
    let blocks_in_set = working_set / workload.block_bytes;
    let ramp = Duration::from_secs(1);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workload.depth as u64 {
        let store = store.clone();
        tasks.spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(worker);
            let data = vec![0xa5u8; workload.block_bytes as usize];
            let mut latencies_us: Vec<u32> = Vec::new();
            let mut sequential = worker * blocks_in_set / workload.depth as u64;
            let mut version = 2u64;
            loop {
                let now = Instant::now();
                if now.duration_since(started) > ramp + runtime {
                    break;
                }
                let block = if workload.random {
                    rng.random_range(0..blocks_in_set)
                } else {
                    sequential = (sequential + 1) % blocks_in_set;
                    sequential
                };
                let offset = block * workload.block_bytes;
                let key = object_key(offset / OBJECT_BYTES);
                let within = offset % OBJECT_BYTES;
                if workload.write {
                    version += 1;
                    store
                        .write_with(&key, within, &data, version, durability)
                        .await?;
                } else {
                    store.read(&key, within, workload.block_bytes).await?;
                }
                if now.duration_since(started) >= ramp {
                    latencies_us.push(now.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            anyhow::Ok(latencies_us)
        });
    }
    let mut latencies: Vec<u32> = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result.context("bench task")??);
    }
    if latencies.is_empty() {
        bail!("{}: no operation completed", workload.name);
    }
    Ok(Figures::from_latencies(
        latencies,
        runtime.as_secs_f64(),
        workload.block_bytes,
    ))
}

fn print_table(report: &Report) {
    println!(
        "{:<30} {:>9} {:>11} {:>11} {:>7} {:>10} {:>10} {:>10} {:>10}  rounds",
        "workload",
        "store ack",
        "raw IOPS",
        "store IOPS",
        "ratio",
        "raw mean",
        "store mean",
        "raw p99",
        "store p99"
    );
    for row in &report.rows {
        println!(
            "{:<30} {:>9} {:>11.0} {:>11.0} {:>7.2} {:>8.0}us {:>8.0}us {:>8.0}us {:>8.0}us  {}",
            row.workload,
            row.store_writes,
            row.raw.iops,
            row.store.iops,
            row.ratio,
            row.raw.latency_us_mean,
            row.store.latency_us_mean,
            row.raw.latency_us_p99,
            row.store.latency_us_p99,
            row.round_ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
        );
    }
    println!();
    println!(
        "randwrite_qd1_vs_raw_fdatasync {:.2}  randwrite_qd32_vs_raw {:.2} (durable {:.2})  \
         randread_qd32_vs_raw {:.2}  randread_qd1_latency_delta_us {:.1}  seqwrite_vs_raw {:.2} (durable {:.2})",
        report.randwrite_qd1_vs_raw_fdatasync,
        report.randwrite_qd32_vs_raw,
        report.randwrite_qd32_durable_vs_raw,
        report.randread_qd32_vs_raw,
        report.randread_qd1_latency_delta_us,
        report.seqwrite_vs_raw,
        report.seqwrite_durable_vs_raw
    );
}
