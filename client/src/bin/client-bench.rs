//! client-bench: block I/O through `basalt-client` on a running cluster,
//! size-3 and size-1 pools, with fio on a raw file as the baseline in the
//! same run.
//!
//! `basalt dev up --dir DIR && cargo run --release -p basalt-client --bin client-bench -- --cluster DIR [--json]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use basalt_client::{BlockClient, ClientConfig, Durability, Volume};
use basalt_fio_bench::raw::{self, Figures, STORAGE_WORKLOADS, Workload};
use basalt_monitor::MonClient;
use basalt_proto::monitor as pb;
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Benchmark the block client against a running cluster")]
struct Args {
    /// A dev cluster directory (reads its cluster.json).
    #[arg(long)]
    cluster: PathBuf,
    /// Volume size, bytes (working set).
    #[arg(long, default_value_t = 1 << 30)]
    size: u64,
    /// Seconds per workload.
    #[arg(long, default_value_t = 6)]
    runtime: u64,
    /// Scratch file for the raw fio baseline.
    #[arg(long, default_value = "/var/tmp/client-bench-raw.img")]
    raw_file: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    workload: &'static str,
    raw: Figures,
    size3: Figures,
    size1: Figures,
}

fn progress(step: &str) {
    eprintln!("client-bench: {step}...");
}

async fn run(volume: &Volume, workload: Workload, runtime: Duration) -> anyhow::Result<Figures> {
    let blocks = volume.size_bytes / workload.block_bytes;
    let started = Instant::now();
    let ramp = Duration::from_secs(1);
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workload.depth as u64 {
        let volume = volume.clone();
        tasks.spawn(async move {
            let mut rng = ChaCha8Rng::seed_from_u64(worker);
            let data = vec![0x3cu8; workload.block_bytes as usize];
            let mut next = worker * blocks / workload.depth as u64;
            let mut latencies: Vec<u32> = Vec::new();
            while started.elapsed() < ramp + runtime {
                let block = if workload.random {
                    rng.random_range(0..blocks)
                } else {
                    next = (next + 1) % blocks;
                    next
                };
                let now = Instant::now();
                if workload.write {
                    volume
                        .write(block * workload.block_bytes, &data, Durability::Durable)
                        .await?;
                } else {
                    volume
                        .read(block * workload.block_bytes, workload.block_bytes)
                        .await?;
                }
                if now.duration_since(started) >= ramp {
                    latencies.push(now.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::new();
    while let Some(result) = tasks.join_next().await {
        latencies.extend(result??);
    }
    Ok(Figures::from_latencies(
        latencies,
        runtime.as_secs_f64(),
        workload.block_bytes,
    ))
}

async fn volume_in(
    mon: &MonClient,
    client: &Arc<BlockClient>,
    pool: &str,
    size: u32,
    name: &str,
    bytes: u64,
) -> anyhow::Result<Volume> {
    let pool_name = pool.to_string();
    let created = mon
        .call(|mut c| {
            let name = pool_name.clone();
            async move {
                c.create_pool(pb::CreatePoolRequest {
                    name,
                    size,
                    min_size: size.min(2),
                    pg_count: 128,
                    failure_domain: "host".into(),
                })
                .await
            }
        })
        .await;
    if let Err(e) = created
        && e.code() != tonic::Code::AlreadyExists
    {
        return Err(e.into());
    }
    let request = pb::CreateVolumeRequest {
        name: name.into(),
        pool: pool.into(),
        size_bytes: bytes,
        object_size_bytes: 0,
        home: String::new(),
    };
    let created = mon
        .call(|mut c| {
            let request = request.clone();
            async move { c.create_volume(request).await }
        })
        .await;
    if let Err(e) = created
        && e.code() != tonic::Code::AlreadyExists
    {
        return Err(e.into());
    }
    let volume = client.open(pool, name).await?;
    let chunk = vec![0x5au8; 1 << 20];
    let mut offset = 0;
    while offset < bytes {
        volume.write(offset, &chunk, Durability::Durable).await?;
        offset += 1 << 20;
    }
    Ok(volume)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(args.cluster.join("cluster.json")).context("read cluster.json")?,
    )?;
    let monitors: Vec<String> = serde_json::from_value(record["monitors"].clone())?;
    let mon = MonClient::new(&monitors)?;
    let client = BlockClient::connect(MonClient::new(&monitors)?, ClientConfig::default()).await?;
    progress("creating and prefilling a size-3 and a size-1 volume");
    let size3 = volume_in(&mon, &client, "rbd", 3, "bench-size3", args.size).await?;
    let size1 = volume_in(&mon, &client, "bench1", 1, "bench-size1", args.size).await?;
    progress("prefilling the raw baseline file");
    raw::prefill(&args.raw_file, args.size)?;
    let runtime = Duration::from_secs(args.runtime);
    let mut rows = Vec::new();
    for workload in STORAGE_WORKLOADS {
        progress(workload.name);
        rows.push(Row {
            workload: workload.name,
            raw: raw::run(&args.raw_file, args.size, &workload, args.runtime)?,
            size3: run(&size3, workload, runtime).await?,
            size1: run(&size1, workload, runtime).await?,
        });
    }
    let _ = std::fs::remove_file(&args.raw_file);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<19} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
            "workload", "raw IOPS", "size3", "size1", "raw lat", "s3 lat", "s1 lat"
        );
        for row in &rows {
            println!(
                "{:<19} {:>10.0} {:>10.0} {:>10.0} {:>7.0}us {:>7.0}us {:>7.0}us",
                row.workload,
                row.raw.iops,
                row.size3.iops,
                row.size1.iops,
                row.raw.latency_us_mean,
                row.size3.latency_us_mean,
                row.size1.latency_us_mean
            );
        }
    }
    Ok(())
}
