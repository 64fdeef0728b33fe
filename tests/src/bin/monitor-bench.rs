//! monitor-bench: three `basalt mon` processes on loopback, measured.
//!
//! `cargo build --release -p basalt-cli && cargo run --release -p basalt-tests --bin monitor-bench -- [--json]`
//!
//! Reports committed volume operations per second under concurrent clients,
//! leader failover time (SIGKILL to the first commit on the new leader), and
//! the leader's CPU while N simulated OSDs (tasks in this process, not
//! processes) heartbeat at the OSD default interval.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use basalt_monitor::MonClient;
use basalt_proto::monitor as pb;
use basalt_tests::{Monitors, create_volume};
use clap::Parser;
use serde::Serialize;

#[derive(Parser, Debug)]
#[command(about = "Benchmark a three-monitor group")]
struct Args {
    /// Concurrent clients for the throughput phase.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Seconds of the throughput phase.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Simulated OSDs for the heartbeat phase.
    #[arg(long, default_value_t = 10_000)]
    osds: u32,
    /// Heartbeat interval of each simulated OSD (the OSD default).
    #[arg(long, default_value_t = 2_000)]
    heartbeat_interval_ms: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    committed_ops_per_sec: f64,
    clients: usize,
    failover_ms: f64,
    osds: u32,
    osd_boot_seconds: f64,
    heartbeats_per_sec: f64,
    leader_cpu_cores_heartbeats: f64,
}

fn progress(step: &str) {
    eprintln!("monitor-bench: {step}...");
}

/// CPU seconds (user + system) a process has used, from /proc.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    let after_name = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("no utime")?.parse()?;
    let stime: f64 = fields.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((utime + stime) / ticks)
}

async fn leader(mon: &MonClient, addrs: &[String]) -> anyhow::Result<usize> {
    for _ in 0..200 {
        if let Ok(status) = mon
            .call(|mut c| async move { c.status(pb::StatusRequest {}).await })
            .await
            && let Some(leader) = status.monitors.iter().find(|m| m.leader)
            && let Some(index) = addrs.iter().position(|a| *a == leader.addr)
        {
            return Ok(index);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::bail!("no leader elected")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    progress("starting three monitors");
    let mut monitors = Monitors::start(3, &["--osd-down-after-ms", "6000"])?;
    let addrs = monitors.mon_list();
    let mon = Arc::new(MonClient::new(&addrs)?);
    let leader_index = leader(&mon, &addrs).await?;
    mon.call(|mut c| async move {
        c.create_pool(pb::CreatePoolRequest {
            name: "rbd".into(),
            size: 3,
            min_size: 2,
            pg_count: 128,
            failure_domain: "host".into(),
        })
        .await
    })
    .await?;

    progress(&format!(
        "{} clients creating volumes for {} s",
        args.clients, args.seconds
    ));
    let committed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let (mon, committed) = (mon.clone(), committed.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                if create_volume(&mon, &format!("c{client}-{n}")).await.is_ok() {
                    committed.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
        }));
    }
    for task in tasks {
        task.await?;
    }
    let ops_per_sec = committed.load(Ordering::Relaxed) as f64 / args.seconds as f64;

    progress("killing the leader");
    monitors.daemons[leader_index].kill();
    let killed = Instant::now();
    let mut attempt = 0u64;
    loop {
        attempt += 1;
        if create_volume(&mon, &format!("failover-{attempt}"))
            .await
            .is_ok()
        {
            break;
        }
    }
    let failover = killed.elapsed();
    monitors.daemons[leader_index].restart()?;
    let leader_index = leader(&mon, &addrs).await?;
    let leader_pid = monitors.daemons[leader_index]
        .pid()
        .context("leader is not running")?;

    progress(&format!("booting {} simulated OSDs", args.osds));
    let boot_started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut boots = Vec::new();
    for _ in 0..64 {
        let (mon, next) = (mon.clone(), next.clone());
        let total = args.osds as u64;
        boots.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return anyhow::Ok(ids);
                }
                let reply = mon
                    .call(|mut c| async move {
                        c.osd_boot(pb::OsdBootRequest {
                            osd_id: 0,
                            new_osd: true,
                            host: format!("host{}", i / 10),
                            zone: format!("zone{}", i / 250),
                            addr: format!("127.0.2.{}:{}", 1 + i % 250, 7000 + i / 250),
                            weight: 1.0,
                            capacity_bytes: 1 << 40,
                        })
                        .await
                    })
                    .await?;
                ids.push(reply.osd_id);
            }
        }));
    }
    let mut ids = Vec::new();
    for boot in boots {
        ids.extend(boot.await??);
    }
    let boot_seconds = boot_started.elapsed().as_secs_f64();

    progress(&format!(
        "{} OSDs heartbeating every {} ms; measuring the leader's CPU",
        ids.len(),
        args.heartbeat_interval_ms
    ));
    let beats = Arc::new(AtomicU64::new(0));
    let stop = Instant::now() + Duration::from_secs(12);
    let interval = Duration::from_millis(args.heartbeat_interval_ms);
    let mut beaters = Vec::new();
    // A few hundred tasks, each beating for a slice of the OSDs, stagger the
    // heartbeats evenly over the interval as independent OSDs would.
    let slices = 200usize;
    for slice in 0..slices {
        let mine: Vec<u32> = ids.iter().copied().skip(slice).step_by(slices).collect();
        let (mon, beats) = (mon.clone(), beats.clone());
        beaters.push(tokio::spawn(async move {
            let offset = interval * slice as u32 / slices as u32;
            tokio::time::sleep(offset).await;
            let mut tick = tokio::time::interval(interval);
            while Instant::now() < stop {
                tick.tick().await;
                for osd in &mine {
                    let osd = *osd;
                    if mon
                        .call(|mut c| async move {
                            c.heartbeat(pb::HeartbeatRequest {
                                osd_id: osd,
                                epoch: 0,
                            })
                            .await
                        })
                        .await
                        .is_ok()
                    {
                        beats.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Measure over the middle of the run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = cpu_seconds(leader_pid)?;
    let beats_before = beats.load(Ordering::Relaxed);
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let cpu = (cpu_seconds(leader_pid)? - cpu_before) / measured.elapsed().as_secs_f64();
    let beat_rate =
        (beats.load(Ordering::Relaxed) - beats_before) as f64 / measured.elapsed().as_secs_f64();
    for beater in beaters {
        beater.await?;
    }

    let report = Report {
        committed_ops_per_sec: ops_per_sec,
        clients: args.clients,
        failover_ms: failover.as_secs_f64() * 1000.0,
        osds: args.osds,
        osd_boot_seconds: boot_seconds,
        heartbeats_per_sec: beat_rate,
        leader_cpu_cores_heartbeats: cpu,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "committed volume ops/s ({} clients): {:.0}",
            report.clients, report.committed_ops_per_sec
        );
        println!(
            "leader failover (kill -> first commit): {:.0} ms",
            report.failover_ms
        );
        println!(
            "{} OSDs booted in {:.1} s; {:.0} heartbeats/s; leader CPU {:.2} cores",
            report.osds,
            report.osd_boot_seconds,
            report.heartbeats_per_sec,
            report.leader_cpu_cores_heartbeats
        );
    }
    Ok(())
}
