//! recovery-bench: recovery after losing an OSD, with and without client
//! load, on a 4-node dev cluster of real processes (size-3 pool).
//!
//! `cargo build --release -p basalt-cli && cargo run --release -p basalt-tests --bin recovery-bench -- [--gib 1] [--json]`
//!
//! Each round starts a fresh cluster, fills a volume so that every OSD holds
//! about `--gib` GiB, SIGKILLs one OSD and measures, from the monitors' down
//! verdict until every PG's primary reports it active and clean again: the
//! recovery bandwidth (bytes the primaries planned to copy, from their logs,
//! over that time)
//! and, in the loaded round, the client's 4 KiB random IOPS (70% reads,
//! writes buffered as the NBD gateway issues a guest's writes without FUA)
//! in that window as a fraction of its IOPS before the kill.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use basalt_client::{Durability, Volume};
use basalt_placement::{PgId, PoolId};
use basalt_tests::{DevCluster, open_new_volume};
use clap::Parser;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

const MIB: u64 = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "Measure recovery after losing an OSD")]
struct Args {
    /// Data each OSD holds before the kill, GiB.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// Client queue depth in the loaded round.
    #[arg(long, default_value_t = 16)]
    queue_depth: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default)]
struct Round {
    client_load: bool,
    volume_bytes: u64,
    down_verdict_seconds: f64,
    recovery_seconds: f64,
    recovered_objects: u64,
    recovered_bytes: u64,
    recovery_mib_per_sec: f64,
    client_iops_before: f64,
    client_iops_during: f64,
    client_iops_fraction: f64,
}

fn progress(step: &str) {
    eprintln!("recovery-bench: {step}");
}

async fn fill(volume: &Volume, size: u64) -> anyhow::Result<()> {
    let chunk = 4 * MIB;
    let next = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for writer in 0..8u64 {
        let (volume, next) = (volume.clone(), next.clone());
        writers.push(tokio::spawn(async move {
            let mut data = vec![0u8; chunk as usize];
            ChaCha8Rng::seed_from_u64(writer).fill_bytes(&mut data);
            loop {
                let offset = next.fetch_add(chunk, Ordering::Relaxed);
                if offset >= size {
                    return Ok::<(), anyhow::Error>(());
                }
                volume.write(offset, &data, Durability::Durable).await?;
            }
        }));
    }
    let started = Instant::now();
    loop {
        let done = next.load(Ordering::Relaxed).min(size);
        eprint!(
            "\rrecovery-bench: filling {} / {} MiB",
            done / MIB,
            size / MIB
        );
        if writers.iter().all(|w| w.is_finished()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(" in {:.1} s", started.elapsed().as_secs_f64());
    for writer in writers {
        writer.await??;
    }
    Ok(())
}

/// Runs 4 KiB random I/O (70% reads) at `depth` until `stop`, counting ops.
fn start_load(volume: Volume, size: u64, depth: usize, ops: Arc<AtomicU64>, stop: Arc<AtomicU64>) {
    for worker in 0..depth {
        let (volume, ops, stop) = (volume.clone(), ops.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(1000 + worker as u64);
            let block = vec![0x5au8; 4096];
            while stop.load(Ordering::Relaxed) == 0 {
                let offset = rng.random_range(0..size / 4096) * 4096;
                let ok = if rng.random_bool(0.7) {
                    volume.read(offset, 4096).await.is_ok()
                } else {
                    // As the NBD gateway writes for a guest (no FUA).
                    volume
                        .write(offset, &block, Durability::Buffered)
                        .await
                        .is_ok()
                };
                if ok {
                    ops.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

/// Sum of `objects=N` on the "recovering" lines of every OSD log: the
/// copies each primary planned (made by recovery or, first, by client ops).
fn recovered_objects(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains(": recovering ")) {
            if let Some(n) = line
                .split_whitespace()
                .find_map(|f| f.strip_prefix("objects="))
                .and_then(|n| n.parse::<u64>().ok())
            {
                total += n;
            }
        }
    }
    total
}

async fn round(args: &Args, client_load: bool) -> anyhow::Result<Round> {
    progress(if client_load {
        "round with client load: starting a 4-node cluster"
    } else {
        "round without client load: starting a 4-node cluster"
    });
    let cluster = DevCluster::up_nodes(4, "4G").context("dev up")?;
    let mons = cluster.mons();
    // Each OSD holds 3/4 of the volume (three copies over four OSDs).
    let size = ((args.gib * 4.0 / 3.0 * 1024.0) as u64 / 4).max(1) * 4 * MIB;
    let (client, volume) = open_new_volume(&mons, "bench", size).await?;
    fill(&volume, size).await?;

    let ops = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicU64::new(0));
    let mut report = Round {
        client_load,
        volume_bytes: size,
        ..Round::default()
    };
    if client_load {
        start_load(
            volume.clone(),
            size,
            args.queue_depth,
            ops.clone(),
            stop.clone(),
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = ops.load(Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(5)).await;
        report.client_iops_before = (ops.load(Ordering::Relaxed) - before) as f64 / 5.0;
        progress(&format!(
            "client IOPS before: {:.0}",
            report.client_iops_before
        ));
    }
    let already = recovered_objects(cluster.dir.path());
    let killed = Instant::now();
    cluster.kill("osd-node4-0");
    progress("killed osd-node4-0; waiting for the down verdict");
    loop {
        let map = client.refresh_map().await?;
        if map.osds.values().any(|o| !o.up) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let down = Instant::now();
    report.down_verdict_seconds = (down - killed).as_secs_f64();
    let ops_at_down = ops.load(Ordering::Relaxed);
    let pg_count = client.map().pools.get(&PoolId(0)).map_or(0, |p| p.pg_count);
    loop {
        let mut active = 0;
        for seed in 0..pg_count {
            if let Ok((_, phase)) = client.pg_stat(PgId::new(PoolId(0), seed)).await
                && phase == "active"
            {
                active += 1;
            }
        }
        let done_ops = ops.load(Ordering::Relaxed) - ops_at_down;
        eprint!(
            "\rrecovery-bench: {active}/{pg_count} PGs active, {:.1} s, client ops since the verdict {done_ops}",
            down.elapsed().as_secs_f64()
        );
        if client_load {
            eprintln!();
        }
        if active == pg_count {
            break;
        }
        anyhow::ensure!(
            down.elapsed() < Duration::from_secs(600),
            "recovery did not finish in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!();
    let done = Instant::now();
    report.recovery_seconds = (done - down).as_secs_f64();
    if client_load {
        report.client_iops_during =
            (ops.load(Ordering::Relaxed) - ops_at_down) as f64 / report.recovery_seconds;
        report.client_iops_fraction = report.client_iops_during / report.client_iops_before;
        stop.store(1, Ordering::Relaxed);
    }
    report.recovered_objects = recovered_objects(cluster.dir.path()) - already;
    if report.recovered_objects == 0 {
        eprintln!(
            "recovery-bench: no \"recovering\" lines in {}/logs",
            cluster.dir.path().display()
        );
    }
    report.recovered_bytes = report.recovered_objects * 4 * MIB;
    report.recovery_mib_per_sec =
        report.recovered_bytes as f64 / MIB as f64 / report.recovery_seconds;
    drop(volume);
    drop(client);
    cluster.down()?;
    Ok(report)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let idle = round(&args, false).await?;
    let loaded = round(&args, true).await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "idle": idle, "loaded": loaded }))?
        );
        return Ok(());
    }
    println!(
        "| round | data per OSD | down verdict | recovery | objects | MiB/s | client IOPS before | during | fraction |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in [&idle, &loaded] {
        println!(
            "| {} | {:.2} GiB | {:.1} s | {:.1} s | {} | {:.0} | {} | {} | {} |",
            if r.client_load {
                "with client load"
            } else {
                "idle"
            },
            r.volume_bytes as f64 * 0.75 / (1u64 << 30) as f64,
            r.down_verdict_seconds,
            r.recovery_seconds,
            r.recovered_objects,
            r.recovery_mib_per_sec,
            if r.client_load {
                format!("{:.0}", r.client_iops_before)
            } else {
                "-".into()
            },
            if r.client_load {
                format!("{:.0}", r.client_iops_during)
            } else {
                "-".into()
            },
            if r.client_load {
                format!("{:.2}", r.client_iops_fraction)
            } else {
                "-".into()
            },
        );
    }
    Ok(())
}
