//! `fio-bench run`: the fixed fio suite against Basalt volumes and the
//! baselines (raw file with io_uring, qemu-nbd on that file, Ceph RBD when
//! configured) in one invocation; writes a markdown table, raw fio JSON, a
//! summary JSON and an SVG plot under `--out`.
//!
//! `cargo build --release -p basalt-cli -p basalt-fio-bench && cargo run --release -p basalt-fio-bench --bin fio-bench -- run --suite standard --out /var/tmp/fio-bench`

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use basalt_fio_bench::report;
use basalt_fio_bench::suite::{self, Target, WORKLOADS};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "fio-bench",
    about = "fio against Basalt and its baselines, side by side"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a suite.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Use the running dev cluster in DIR (`basalt dev up --dir DIR`).
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// Otherwise start a dev cluster of this many nodes under --out.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// OSD data file size of a cluster fio-bench starts. Node1's OSD holds
    /// a copy of all three volumes (3 x --size) and the blocks overwrites
    /// keep allocated until the next sync.
    #[arg(long, default_value = "5G")]
    osd_size: String,
    /// Leave the started cluster's OSD data files sparse. By default they
    /// are written with zeros first, as the raw and qemu-nbd targets' file
    /// is prefilled: otherwise the first write to every block of an OSD
    /// pays the file system's block allocation (an ext4 journal commit at
    /// the next flush), which a disk-backed OSD never does.
    #[arg(long)]
    sparse_osds: bool,
    /// `standard` or `quick` (fio-bench/jobs/<suite>.fio, compiled in), or
    /// the path of a job file of one's own.
    #[arg(long, default_value = "standard")]
    suite: String,
    /// Where results go.
    #[arg(long, default_value = "fio-bench-out")]
    out: PathBuf,
    /// Size of every target (volume, raw file), e.g. 1G.
    #[arg(long, default_value = "1G")]
    size: String,
    /// Runs of every workload on every target. Within a workload the
    /// targets take turns, round after round, so that the machine's drift
    /// (tens of percent within minutes on a shared machine) falls on every
    /// target alike; each figure is the rounds' mean (`suite::combine`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=20))]
    rounds: u32,
    /// Ceph configuration file; with --ceph-pool, Ceph RBD is measured too
    /// (image `fio-bench` in that pool, which must exist).
    #[arg(long)]
    ceph_conf: Option<PathBuf>,
    #[arg(long)]
    ceph_pool: Option<String>,
    /// Keep the data of what the run created: the started cluster's OSD and
    /// monitor directories (prezeroed OSD files: 3 x --osd-size) and the
    /// raw baseline file. By default they are removed when the run ends;
    /// results, fio's JSON and the cluster's logs stay.
    #[arg(long)]
    keep_data: bool,
}

fn basalt_bin() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("BASALT_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("find our own binary")?;
    let dir = exe.parent().context("binary has a directory")?;
    [dir.join("basalt"), dir.join("../basalt")]
        .into_iter()
        .find(|p| p.exists())
        .context("the basalt binary is not next to fio-bench: cargo build -p basalt-cli (same profile) or set BASALT_BIN")
}

fn basalt(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(basalt_bin()?)
        .args(args)
        .output()
        .context("run basalt")?;
    if !output.status.success() {
        bail!(
            "basalt {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn free_port(ip: &str) -> anyhow::Result<u16> {
    Ok(free_ports::<1>(ip)?[0])
}

/// `N` distinct ports on `ip` that were free a moment ago: all are held
/// while they are picked, since ports asked for one after another may come
/// back the same (the cluster's monitor, OSD and gateway ports would then
/// collide, and fio reach a daemon that does not speak NBD).
fn free_ports<const N: usize>(ip: &str) -> anyhow::Result<[u16; N]> {
    let mut ports = [0; N];
    let mut listeners = Vec::with_capacity(N);
    for port in &mut ports {
        let listener = std::net::TcpListener::bind((ip, 0))?;
        *port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok(ports)
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let number: u64 = number.parse().with_context(|| format!("size {text:?}"))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => bail!("size {text:?}: unknown unit"),
    };
    Ok(number << shift)
}

/// Stops what fio-bench started, also on error, and (without
/// `--keep-data`) removes the data it wrote.
struct Cleanup {
    qemu_nbd: Option<Child>,
    cluster: Option<PathBuf>,
    raw_file: Option<PathBuf>,
    keep_data: bool,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut child) = self.qemu_nbd.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = self.cluster.take() {
            eprintln!("fio-bench: stopping the dev cluster");
            let _ = basalt(&["dev", "down", "--dir", &dir.display().to_string()]);
            if !self.keep_data {
                remove_cluster_data(&dir);
            }
        }
        if let Some(file) = self.raw_file.take()
            && !self.keep_data
        {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Removes a stopped dev cluster's data (every entry of its directory but
/// its logs and `cluster.json`).
fn remove_cluster_data(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name == "logs" || name == "cluster.json" {
            continue;
        }
        let path = entry.path();
        let removed = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if let Err(e) = removed {
            eprintln!("fio-bench: could not remove {}: {e}", path.display());
        }
    }
    eprintln!(
        "fio-bench: removed the cluster's data under {} (logs kept; --keep-data keeps it all)",
        dir.display()
    );
}

fn progress(text: &str) {
    eprintln!("fio-bench: {text}");
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let size = parse_size(&args.size)?;
    let raw_dir = args.out.join("raw");
    std::fs::create_dir_all(&raw_dir).with_context(|| format!("create {}", raw_dir.display()))?;
    let job_file = suite::job_file(&args.suite, &args.out)?;
    let mut cleanup = Cleanup {
        qemu_nbd: None,
        cluster: None,
        raw_file: None,
        keep_data: args.keep_data,
    };

    // The cluster.
    let cluster_dir = match &args.cluster {
        Some(dir) => dir.clone(),
        None => {
            let dir = args.out.join("cluster");
            progress(&format!(
                "starting a {}-node dev cluster in {}",
                args.nodes,
                dir.display()
            ));
            let [mon, osd, nbd] = free_ports("127.0.1.1")?;
            let (dir_text, nodes, mon, osd, nbd) = (
                dir.display().to_string(),
                args.nodes.to_string(),
                mon.to_string(),
                osd.to_string(),
                nbd.to_string(),
            );
            let mut up = vec![
                "dev",
                "up",
                "--dir",
                &dir_text,
                "--nodes",
                &nodes,
                "--osd-size",
                &args.osd_size,
                "--mon-port",
                &mon,
                "--osd-port",
                &osd,
                "--nbd-port",
                &nbd,
                "--timeout",
                "600",
            ];
            if !args.sparse_osds {
                up.push("--osd-prezero");
            }
            basalt(&up)?;
            cleanup.cluster = Some(dir.clone());
            dir
        }
    };
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cluster_dir.join("cluster.json"))
            .with_context(|| format!("read {}/cluster.json", cluster_dir.display()))?,
    )
    .context("parse cluster.json")?;
    let mons = record["monitors"]
        .as_array()
        .context("cluster.json lists no monitors")?
        .iter()
        .filter_map(|m| m.as_str())
        .collect::<Vec<_>>()
        .join(",");
    let daemons = record["daemons"]
        .as_array()
        .context("cluster.json lists no daemons")?;
    // A gateway is its own process (`kind` nbd, at `addr`) or lives in an
    // OSD's process (`nbd` names its address).
    let gateway = daemons
        .iter()
        .filter_map(|d| {
            if d["kind"] == "nbd" {
                d["addr"].as_str()
            } else {
                d["nbd"].as_str()
            }
        })
        .find(|a| a.starts_with("127.0.1.1:"))
        .context("no NBD gateway on node1 in cluster.json")?
        .to_string();
    let daemon_pids: Vec<u32> = daemons
        .iter()
        .filter(|d| d["kind"] == "osd" || d["kind"] == "nbd")
        .filter_map(|d| d["pid"].as_u64().map(|p| p as u32))
        .collect();

    // Volumes: size 3 in `rbd`, unhomed (each PG's primary wherever
    // placement puts it: for two thirds of the writes another node, one
    // more network hop) and homed on node1 (the gateway's node: the primary
    // there, two replicas elsewhere, as a VM or pod placed next to its
    // data has it), and size 1 homed on node1.
    let size_text = size.to_string();
    if basalt(&["--mon", &mons, "pool", "ls", "--json"])?.contains("\"fiobench1\"") {
        progress("pool fiobench1 exists");
    } else {
        basalt(&[
            "--mon",
            &mons,
            "pool",
            "create",
            "fiobench1",
            "--size",
            "1",
            "--min-size",
            "1",
            "--pgs",
            "32",
        ])?;
    }
    for (name, pool, home) in [
        ("fb-size3", "rbd", None),
        ("fb-size3h", "rbd", Some("node1")),
        ("fb-size1", "fiobench1", Some("node1")),
    ] {
        let exists = basalt(&["--mon", &mons, "volume", "info", name, "--pool", pool]).is_ok();
        if !exists {
            let mut create = vec![
                "--mon", &mons, "volume", "create", name, "--size", &size_text, "--pool", pool,
            ];
            if let Some(home) = home {
                create.extend(["--home", home]);
            }
            basalt(&create)?;
        }
    }

    // Baselines: a raw file, and qemu-nbd exporting it.
    let raw_file = args.out.join("raw.img");
    let qemu_port = free_port("127.0.0.1")?;
    cleanup.raw_file = Some(raw_file.clone());
    let mut targets = vec![Target::raw_file(&raw_file)];
    progress(&format!(
        "prefilling the raw file {} ({size} bytes)",
        raw_file.display()
    ));
    suite::prefill(&targets[0], size)?;
    let qemu = Command::new("qemu-nbd")
        .args([
            "-t",
            "-f",
            "raw",
            "--cache=none",
            "--aio=io_uring",
            "-b",
            "127.0.0.1",
            "-p",
            &qemu_port.to_string(),
            "-x",
            "disk",
            "--shared=8",
        ])
        .arg(&raw_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-nbd (apt-get install qemu-utils)")?;
    let qemu_pid = qemu.id();
    cleanup.qemu_nbd = Some(qemu);
    let qemu_uri = format!("nbd://127.0.0.1:{qemu_port}/disk");
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", qemu_port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    targets.push(Target {
        name: "qemu-nbd".into(),
        engine: "nbd".into(),
        target: format!("uri={qemu_uri}"),
        pids: vec![qemu_pid],
    });
    for (name, export) in [
        ("basalt-size3", "fb-size3"),
        ("basalt-size3-homed", "fb-size3h"),
        ("basalt-size1-homed", "fiobench1/fb-size1"),
    ] {
        targets.push(Target {
            name: name.into(),
            engine: "nbd".into(),
            target: format!("uri=nbd://{gateway}/{export}"),
            pids: daemon_pids.clone(),
        });
    }
    if let (Some(conf), Some(pool)) = (&args.ceph_conf, &args.ceph_pool) {
        targets.push(Target {
            name: "ceph-rbd".into(),
            engine: "rbd".into(),
            // fio's rbd engine reads the configuration from CEPH_CONF.
            target: format!("pool={pool}\nrbdname=fio-bench\nclientname=admin"),
            pids: Vec::new(),
        });
        // SAFETY: single-threaded here; fio children inherit it.
        unsafe { std::env::set_var("CEPH_CONF", conf) };
    }
    for target in &targets[2..] {
        progress(&format!("prefilling {}", target.name));
        suite::prefill(target, size)?;
    }

    // The suite: every workload on every target, one fio run each per
    // round; within a workload the targets take turns.
    let total = WORKLOADS.len() * targets.len() * args.rounds as usize;
    let mut results = Vec::new();
    let mut step = 0;
    for workload in WORKLOADS {
        let mut rounds: Vec<Vec<suite::Result>> = vec![Vec::new(); targets.len()];
        for round in 1..=args.rounds {
            for (t, target) in targets.iter().enumerate() {
                step += 1;
                let result = suite::run(&job_file, workload, target, size, &raw_dir, round)?;
                let of_rounds = if args.rounds > 1 {
                    format!(" (round {round}/{})", args.rounds)
                } else {
                    String::new()
                };
                progress(&format!(
                    "[{step}/{total}] {workload} on {}{of_rounds}: {:.0} IOPS, {:.1} MiB/s, p99 {:.0} µs",
                    target.name, result.iops, result.mib_per_sec, result.latency_us_p99
                ));
                rounds[t].push(result);
            }
        }
        results.extend(rounds.iter().filter_map(|r| suite::combine(r)));
    }

    let names: Vec<String> = targets.iter().map(|t| t.name.clone()).collect();
    let machine = machine();
    let table = report::markdown(&results, &WORKLOADS, &names);
    let markdown = format!(
        "# fio-bench, {} suite\n\n{machine}\nTarget size {size} bytes; {} round(s), figures are the rounds' means; Basalt on a {}-node dev cluster (`{}`), fio's nbd engine through node1's gateway; `daemon cores` = CPU of every OSD and gateway process during the run.\n\n{table}",
        args.suite,
        args.rounds,
        record["nodes"].as_u64().unwrap_or(0),
        cluster_dir.display()
    );
    std::fs::write(args.out.join("results.md"), &markdown).context("write results.md")?;
    std::fs::write(
        args.out.join("summary.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "suite": args.suite,
            "size_bytes": size,
            "rounds": args.rounds,
            "machine": machine,
            "targets": targets,
            "results": results,
        }))?,
    )
    .context("write summary.json")?;
    std::fs::write(
        args.out.join("plot.svg"),
        report::svg(&results, &WORKLOADS, &names),
    )
    .context("write plot.svg")?;
    println!("{markdown}");
    progress(&format!(
        "wrote {}/results.md, summary.json, plot.svg and raw/",
        args.out.display()
    ));
    Ok(())
}

/// One line about the machine the run was on.
fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let fio = Command::new("fio")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("Machine: {cores} cores, kernel {}, {fio}.\n", kernel.trim())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Run(args) => run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fio-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
