//! `basalt dev up|down`: a whole cluster on one machine, as separate
//! processes, node i on 127.0.1.i.
//!
//! `up` on a new directory creates the cluster (monitors on the first three
//! nodes, OSDs and an NBD gateway on every node, the default pool), waits until it is healthy
//! and writes `DIR/cluster.json`; on an existing directory it starts again
//! whatever is not running, with the same data. `down` stops every process
//! it started (SIGTERM, then SIGKILL after 5 s) and keeps the data.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use basalt_monitor::MonClient;
use basalt_placement::{ClusterMap, Placer};
use basalt_proto::monitor as pb;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::osd::parse_size;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// Cluster directory (data, logs, cluster.json).
    #[arg(long)]
    dir: PathBuf,
    /// Nodes (loopback addresses 127.0.1.1 ...).
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    #[arg(long, default_value_t = 1)]
    osds_per_node: u32,
    /// Size of each OSD's data file.
    #[arg(long, default_value = "8G")]
    osd_size: String,
    /// Write zeros over each OSD's data file when it is created (sparse
    /// otherwise): what benchmarks want, a disk-backed deployment's
    /// behaviour; slower first start and the full size on disk.
    #[arg(long)]
    osd_prezero: bool,
    /// Monitor port on each of the first three nodes.
    #[arg(long, default_value_t = 6789)]
    mon_port: u16,
    /// First OSD port on each node.
    #[arg(long, default_value_t = 6800)]
    osd_port: u16,
    /// NBD gateway port on each node.
    #[arg(long, default_value_t = 10809)]
    nbd_port: u16,
    /// Run each node's NBD gateway as its own process (`basalt nbd`)
    /// instead of inside the node's first OSD process (`basalt osd --nbd`),
    /// where it reaches that OSD without a socket.
    #[arg(long)]
    separate_gateways: bool,
    /// Seconds to wait for the cluster to be healthy.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Silence after which the monitors mark an OSD down, in milliseconds.
    #[arg(long, default_value_t = 6_000)]
    osd_down_after_ms: u64,
    /// Silence after which the monitors mark a down OSD out (its data is
    /// re-placed), in milliseconds.
    #[arg(long, default_value_t = 600_000)]
    osd_out_after_ms: u64,
}

#[derive(Args, Debug)]
pub struct DownArgs {
    #[arg(long)]
    dir: PathBuf,
}

/// One process of a dev cluster.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonRecord {
    pub kind: String,
    pub name: String,
    pub addr: String,
    pub pid: u32,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// The NBD address this process serves besides its own role (an OSD
    /// with its node's gateway inside); a `nbd` daemon serves at `addr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<String>,
}

impl DaemonRecord {
    /// A daemon not started yet, logging to `<logs>/<name>.log`.
    fn planned(kind: &str, name: String, addr: String, logs: &Path, args: Vec<String>) -> Self {
        DaemonRecord {
            kind: kind.into(),
            log: logs.join(format!("{name}.log")),
            name,
            addr,
            pid: 0,
            args,
            nbd: None,
        }
    }

    /// The NBD address this process serves, if any.
    pub fn nbd_addr(&self) -> Option<&str> {
        match self.kind.as_str() {
            "nbd" => Some(&self.addr),
            _ => self.nbd.as_deref(),
        }
    }
}

/// `DIR/cluster.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterRecord {
    pub nodes: u32,
    pub osds_per_node: u32,
    pub monitors: Vec<String>,
    pub daemons: Vec<DaemonRecord>,
}

fn record_path(dir: &Path) -> PathBuf {
    dir.join("cluster.json")
}

fn is_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != 0 && unsafe { libc::kill(pid as i32, 0) } == 0 && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

fn spawn(record: &mut DaemonRecord) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&record.log)
        .with_context(|| format!("open {}", record.log.display()))?;
    let exe = std::env::current_exe().context("locate the basalt binary")?;
    let child = Command::new(exe)
        .args(&record.args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: the daemon outlives this command.
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {}", record.name))?;
    record.pid = child.id();
    Ok(())
}

fn plan(args: &UpArgs, dir: &Path) -> anyhow::Result<ClusterRecord> {
    if args.nodes == 0 || args.nodes > 250 {
        bail!("--nodes must be between 1 and 250");
    }
    let size = parse_size(&args.osd_size)?;
    let mon_nodes = args.nodes.min(3);
    let monitors: Vec<String> = (1..=mon_nodes)
        .map(|i| format!("127.0.1.{i}:{}", args.mon_port))
        .collect();
    let peers: Vec<String> = (1..=mon_nodes)
        .map(|i| format!("mon{i}=127.0.1.{i}:{}", args.mon_port))
        .collect();
    let logs = dir.join("logs");
    let mut daemons = Vec::new();
    for i in 1..=mon_nodes {
        let addr = format!("127.0.1.{i}:{}", args.mon_port);
        daemons.push(DaemonRecord::planned(
            "mon",
            format!("mon{i}"),
            addr.clone(),
            &logs,
            vec![
                "mon".into(),
                "--id".into(),
                format!("mon{i}"),
                "--data".into(),
                dir.join(format!("mon{i}")).display().to_string(),
                "--listen".into(),
                addr,
                "--peers".into(),
                peers.join(","),
                "--osd-down-after-ms".into(),
                args.osd_down_after_ms.to_string(),
                "--osd-out-after-ms".into(),
                args.osd_out_after_ms.to_string(),
            ],
        ));
    }
    for i in 1..=args.nodes {
        for j in 0..args.osds_per_node {
            let addr = format!("127.0.1.{i}:{}", args.osd_port + j as u16);
            let name = format!("osd-node{i}-{j}");
            // The node's gateway lives in its first OSD's process.
            let nbd = (j == 0 && !args.separate_gateways)
                .then(|| format!("127.0.1.{i}:{}", args.nbd_port));
            let mut osd_args = vec![
                "--mon".into(),
                monitors.join(","),
                "osd".into(),
                "--data".into(),
                dir.join(&name).display().to_string(),
                "--listen".into(),
                addr.clone(),
                "--host".into(),
                format!("node{i}"),
                "--size".into(),
                size.to_string(),
            ];
            if let Some(nbd) = &nbd {
                osd_args.extend(["--nbd".into(), nbd.clone()]);
            }
            if args.osd_prezero {
                osd_args.push("--prezero".into());
            }
            daemons.push(DaemonRecord {
                nbd,
                ..DaemonRecord::planned("osd", name, addr, &logs, osd_args)
            });
        }
    }
    if args.separate_gateways {
        for i in 1..=args.nodes {
            let addr = format!("127.0.1.{i}:{}", args.nbd_port);
            daemons.push(DaemonRecord::planned(
                "nbd",
                format!("nbd{i}"),
                addr.clone(),
                &logs,
                vec![
                    "--mon".into(),
                    monitors.join(","),
                    "nbd".into(),
                    "--listen".into(),
                    addr,
                ],
            ));
        }
    }
    Ok(ClusterRecord {
        nodes: args.nodes,
        osds_per_node: args.osds_per_node,
        monitors,
        daemons,
    })
}

fn save(dir: &Path, record: &ClusterRecord) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec_pretty(record)?;
    std::fs::write(record_path(dir), bytes).context("write cluster.json")
}

pub fn up(args: UpArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    std::fs::create_dir_all(args.dir.join("logs")).context("create cluster directory")?;
    let dir = args
        .dir
        .canonicalize()
        .context("resolve cluster directory")?;
    let mut record = match std::fs::read(record_path(&dir)) {
        Ok(bytes) => serde_json::from_slice(&bytes).context("parse cluster.json")?,
        Err(_) => plan(&args, &dir)?,
    };
    let mut started_count = 0;
    for daemon in record.daemons.iter_mut() {
        if !is_alive(daemon.pid) {
            spawn(daemon)?;
            started_count += 1;
        }
    }
    save(&dir, &record)?;
    eprintln!(
        "started {started_count} of {} processes; waiting for the cluster to be healthy",
        record.daemons.len()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start runtime")?;
    let osds = record.daemons.iter().filter(|d| d.kind == "osd").count();
    runtime.block_on(wait_healthy(
        &record,
        osds,
        Duration::from_secs(args.timeout),
    ))?;
    println!(
        "cluster up in {:.1} s: {} monitors, {osds} OSDs on {} nodes",
        started.elapsed().as_secs_f64(),
        record.monitors.len(),
        record.nodes
    );
    println!("  monitors: {}", record.monitors.join(","));
    if let Some(gateway) = record.daemons.iter().find_map(|d| d.nbd_addr()) {
        println!("  volumes:  nbd://{gateway}/<volume> (and every other node's gateway)");
    }
    println!("  state:    {}", record_path(&dir).display());
    println!("  logs:     {}", dir.join("logs").display());
    println!("try:");
    println!(
        "  export BASALT_MON={}; basalt status; basalt volume create vm1 --size 10G",
        record.monitors.join(",")
    );
    println!("stop with: basalt dev down --dir {}", dir.display());
    Ok(())
}

async fn wait_healthy(record: &ClusterRecord, osds: usize, limit: Duration) -> anyhow::Result<()> {
    let mut mon = MonClient::new(&record.monitors)?;
    mon.retry_for = Duration::from_secs(2);
    let deadline = Instant::now() + limit;
    let mut pool_created = false;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match check(&mon, record, osds, &mut pool_created).await {
            Ok(None) => return Ok(()),
            Ok(Some(waiting)) => last = waiting,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "cluster not healthy after {limit:?}: {last} (see the logs in {})",
        record
            .daemons
            .first()
            .and_then(|d| d.log.parent())
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    )
}

/// Returns `None` when healthy, or what is still missing.
async fn check(
    mon: &MonClient,
    record: &ClusterRecord,
    osds: usize,
    pool_created: &mut bool,
) -> anyhow::Result<Option<String>> {
    let reply = mon
        .call(|mut c| async move { c.get_map(pb::GetMapRequest { epoch: 0 }).await })
        .await?;
    let map: ClusterMap = serde_json::from_slice(&reply.map_json)?;
    let up = map.osds.values().filter(|o| o.up && o.in_).count();
    if up < osds {
        return Ok(Some(format!("{up} of {osds} OSDs up")));
    }
    if map.pool_by_name("rbd").is_none() && !*pool_created {
        let size = record.nodes.min(3);
        let pgs = (32 * osds as u32).next_power_of_two().clamp(32, 1024);
        let request = pb::CreatePoolRequest {
            name: "rbd".into(),
            size,
            min_size: size.min(2),
            pg_count: pgs,
            failure_domain: "host".into(),
        };
        let created = mon
            .call(|mut c| {
                let request = request.clone();
                async move { c.create_pool(request).await }
            })
            .await;
        match created {
            Ok(_) => *pool_created = true,
            Err(e) if e.code() == tonic::Code::AlreadyExists => *pool_created = true,
            Err(e) => return Ok(Some(format!("creating pool rbd: {e}"))),
        }
        return Ok(Some("pool rbd created".into()));
    }
    let placer = Placer::new(&map);
    for id in map.pools.keys() {
        if let Err(e) = placer.check_pool(*id) {
            return Ok(Some(e.to_string()));
        }
    }
    for gateway in record.daemons.iter().filter_map(|d| d.nbd_addr()) {
        if tokio::net::TcpStream::connect(gateway).await.is_err() {
            return Ok(Some(format!("NBD gateway {gateway} not listening yet")));
        }
    }
    Ok(None)
}

pub fn down(args: DownArgs) -> anyhow::Result<()> {
    let bytes = std::fs::read(record_path(&args.dir))
        .with_context(|| format!("{} has no cluster.json", args.dir.display()))?;
    let record: ClusterRecord = serde_json::from_slice(&bytes).context("parse cluster.json")?;
    let running: Vec<&DaemonRecord> = record.daemons.iter().filter(|d| is_alive(d.pid)).collect();
    for daemon in &running {
        // SAFETY: sends SIGTERM to a pid we started.
        unsafe { libc::kill(daemon.pid as i32, libc::SIGTERM) };
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && running.iter().any(|d| is_alive(d.pid)) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut killed = 0;
    for daemon in running.iter().filter(|d| is_alive(d.pid)) {
        // SAFETY: sends SIGKILL to a pid we started.
        unsafe { libc::kill(daemon.pid as i32, libc::SIGKILL) };
        killed += 1;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && running.iter().any(|d| is_alive(d.pid)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<String> = running
        .iter()
        .filter(|d| is_alive(d.pid))
        .map(|d| format!("{} (pid {})", d.name, d.pid))
        .collect();
    if !left.is_empty() {
        bail!("still running: {}", left.join(", "));
    }
    println!(
        "stopped {} processes ({killed} needed SIGKILL); data kept in {}",
        running.len(),
        args.dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Up {
        #[command(flatten)]
        args: UpArgs,
    }

    fn plan_of(extra: &[&str]) -> ClusterRecord {
        let mut argv = vec!["up", "--dir", "/unused"];
        argv.extend_from_slice(extra);
        let up = Up::try_parse_from(argv).unwrap();
        plan(&up.args, Path::new("/unused")).unwrap()
    }

    /// By default each node's first OSD process serves its node's NBD
    /// address and no gateway process exists; `--separate-gateways` gives
    /// one `basalt nbd` per node and OSDs without `--nbd`.
    #[test]
    fn gateways_live_in_the_first_osd_unless_asked_apart() {
        let record = plan_of(&["--nodes", "3", "--osds-per-node", "2", "--osd-prezero"]);
        assert!(record.daemons.iter().all(|d| d.kind != "nbd"));
        let gateways: Vec<(&str, &str)> = record
            .daemons
            .iter()
            .filter_map(|d| d.nbd_addr().map(|a| (d.name.as_str(), a)))
            .collect();
        assert_eq!(
            gateways,
            vec![
                ("osd-node1-0", "127.0.1.1:10809"),
                ("osd-node2-0", "127.0.1.2:10809"),
                ("osd-node3-0", "127.0.1.3:10809"),
            ]
        );
        for osd in record.daemons.iter().filter(|d| d.kind == "osd") {
            let nbd_arg = osd.args.windows(2).find(|w| w[0] == "--nbd");
            assert_eq!(
                nbd_arg.map(|w| w[1].as_str()),
                osd.nbd.as_deref(),
                "{}",
                osd.name
            );
            assert!(osd.args.iter().any(|a| a == "--prezero"), "{}", osd.name);
        }

        let apart = plan_of(&["--nodes", "2", "--separate-gateways"]);
        assert!(apart.daemons.iter().all(|d| d.nbd.is_none()));
        assert!(
            apart
                .daemons
                .iter()
                .filter(|d| d.kind == "osd")
                .all(|d| !d.args.iter().any(|a| a == "--nbd" || a == "--prezero"))
        );
        let gateways: Vec<&str> = apart.daemons.iter().filter_map(|d| d.nbd_addr()).collect();
        assert_eq!(gateways, vec!["127.0.1.1:10809", "127.0.1.2:10809"]);
        assert!(
            apart
                .daemons
                .iter()
                .filter(|d| d.kind == "nbd")
                .all(|d| d.args.contains(&"nbd".to_string()))
        );
    }
}
