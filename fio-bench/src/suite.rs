//! The fio suites (`fio-bench/jobs/*.fio`, kept in the repository so anyone
//! can rerun them by hand) and one run of one workload against one target.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// The workloads of every suite, in the order they run (section names).
pub const WORKLOADS: [&str; 8] = [
    "randread-4k-qd1",
    "randread-4k-qd32",
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "randwrite-4k-qd1-fsync",
    "randrw-70-30-4k-qd16",
    "seqwrite-1m-qd8",
    "seqread-1m-qd8",
];

/// The suites, compiled in: the binary runs the suites of the source it was
/// built from wherever it runs (a path baked in at build time breaks when the
/// build cache is shared between checkouts).
const SUITES: [(&str, &str); 2] = [
    ("standard", include_str!("../jobs/standard.fio")),
    ("quick", include_str!("../jobs/quick.fio")),
];

/// Writes the job file of `suite` (`standard`, `quick`, or the path of a
/// `.fio` file of one's own) into `dir` and returns its path, so the run's
/// output holds exactly the jobs it ran.
pub fn job_file(suite: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let text = match SUITES.iter().find(|(name, _)| *name == suite) {
        Some((_, text)) => (*text).to_string(),
        None if suite.ends_with(".fio") => {
            std::fs::read_to_string(suite).with_context(|| format!("read job file {suite}"))?
        }
        None => bail!("no suite {suite:?}: standard, quick, or a path ending in .fio"),
    };
    let path = dir.join("suite.fio");
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

/// How fio reaches a target.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    /// Short name used in tables (`raw`, `qemu-nbd`, `basalt-size3`, ...).
    pub name: String,
    /// fio ioengine.
    pub engine: String,
    /// fio option lines naming the target (`filename=...`, `uri=...`;
    /// several lines for Ceph RBD: `pool=...`, `rbdname=...`).
    pub target: String,
    /// Processes whose CPU time counts as this target's (daemons).
    #[serde(skip)]
    pub pids: Vec<u32>,
}

impl Target {
    /// A file driven with io_uring and O_DIRECT: the device limit.
    pub fn raw_file(file: &Path) -> Target {
        Target {
            name: "raw".to_string(),
            engine: "io_uring".to_string(),
            target: format!("filename={}", file.display()),
            pids: Vec::new(),
        }
    }
}

/// What one workload achieved on one target.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Result {
    pub target: String,
    pub workload: String,
    pub iops: f64,
    pub mib_per_sec: f64,
    pub latency_us_mean: f64,
    pub latency_us_p50: f64,
    pub latency_us_p99: f64,
    pub latency_us_p999: f64,
    /// CPU seconds the target's daemons used per second of the run.
    pub daemon_cores: f64,
    /// IOPS per core of daemon CPU (0 when the target has no daemons).
    pub iops_per_daemon_core: f64,
    /// IOPS of each round (`--rounds`), in the order they ran.
    #[serde(default)]
    pub round_iops: Vec<f64>,
}

/// Combines the rounds of one workload on one target into one result:
/// IOPS, MiB/s and daemon cores are the rounds' means, the mean latency is
/// weighted by each round's IOPS, and each percentile is the mean of the
/// rounds' percentiles (fio reports percentiles, not histograms, so they
/// cannot be merged exactly). `None` without rounds.
pub fn combine(rounds: &[Result]) -> Option<Result> {
    let first = rounds.first()?;
    let n = rounds.len() as f64;
    let mean = |f: fn(&Result) -> f64| rounds.iter().map(f).sum::<f64>() / n;
    let iops = mean(|r| r.iops);
    let daemon_cores = mean(|r| r.daemon_cores);
    let total_iops: f64 = rounds.iter().map(|r| r.iops).sum();
    let latency_us_mean = if total_iops > 0.0 {
        rounds
            .iter()
            .map(|r| r.latency_us_mean * r.iops)
            .sum::<f64>()
            / total_iops
    } else {
        mean(|r| r.latency_us_mean)
    };
    Some(Result {
        target: first.target.clone(),
        workload: first.workload.clone(),
        iops,
        mib_per_sec: mean(|r| r.mib_per_sec),
        latency_us_mean,
        latency_us_p50: mean(|r| r.latency_us_p50),
        latency_us_p99: mean(|r| r.latency_us_p99),
        latency_us_p999: mean(|r| r.latency_us_p999),
        daemon_cores,
        iops_per_daemon_core: if daemon_cores > 0.0 {
            iops / daemon_cores
        } else {
            0.0
        },
        round_iops: rounds.iter().map(|r| r.iops).collect(),
    })
}

/// CPU seconds (user + system) used so far by `pids`, from /proc.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat, 12 and 13 here.
            let user: f64 = fields.get(11)?.parse().ok()?;
            let system: f64 = fields.get(12)?.parse().ok()?;
            Some((user + system) / ticks)
        })
        .sum()
}

/// Fills the first `size` bytes of `target` sequentially (1 MiB, QD8).
pub fn prefill(target: &Target, size: u64) -> anyhow::Result<()> {
    // Engine options (uri=...) are only known after --ioengine.
    let output = Command::new("fio")
        .args([
            "--name=prefill".to_string(),
            format!("--ioengine={}", target.engine),
        ])
        .args(target.target.lines().map(|line| format!("--{line}")))
        .args([
            &format!("--size={size}"),
            "--direct=1",
            "--rw=write",
            "--bs=1M",
            "--iodepth=8",
            "--output-format=json",
        ])
        .output()
        .context("run fio (apt-get install fio)")?;
    if !output.status.success() {
        bail!(
            "prefill of {} failed: {}{}",
            target.name,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Runs one section of `job_file` against `target`; keeps fio's JSON in
/// `raw_dir` (`TARGET-WORKLOAD.json` for round 1, `...-roundN.json` after).
pub fn run(
    job_file: &Path,
    workload: &str,
    target: &Target,
    size: u64,
    raw_dir: &Path,
    round: u32,
) -> anyhow::Result<Result> {
    // The job file as run, with the target's option lines in place (kept
    // next to the raw results, so the exact run can be repeated).
    let text = std::fs::read_to_string(job_file)
        .with_context(|| format!("read {}", job_file.display()))?;
    let materialised = raw_dir.join(format!("{}.fio", target.name));
    std::fs::write(&materialised, text.replace("${FIO_TARGET}", &target.target))
        .context("write the job file")?;
    let cpu_before = cpu_seconds(&target.pids);
    let started = std::time::Instant::now();
    let output = Command::new("fio")
        .arg(&materialised)
        .arg(format!("--section={workload}"))
        .arg("--output-format=json")
        .env("FIO_ENGINE", &target.engine)
        .env("FIO_SIZE", size.to_string())
        .output()
        .context("run fio (apt-get install fio)")?;
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&target.pids) - cpu_before;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "fio {workload} on {} failed: {text}{}",
            target.name,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // fio's nbd engine prints a line before its JSON.
    let start = text.find('{').context("fio printed no JSON")?;
    let suffix = if round > 1 {
        format!("-round{round}")
    } else {
        String::new()
    };
    std::fs::write(
        raw_dir.join(format!("{}-{workload}{suffix}.json", target.name)),
        &text[start..],
    )
    .context("write raw fio JSON")?;
    let json: serde_json::Value = serde_json::from_str(&text[start..]).context("parse fio JSON")?;
    parse(&json, workload, target, cpu / seconds.max(1e-9))
}

/// Reads the figures of one job from fio's JSON.
pub fn parse(
    json: &serde_json::Value,
    workload: &str,
    target: &Target,
    daemon_cores: f64,
) -> anyhow::Result<Result> {
    let job = &json["jobs"][0];
    let (mut iops, mut bytes, mut weighted) = (0.0, 0.0, [0.0f64; 4]);
    for side in ["read", "write"] {
        let figures = &job[side];
        let side_iops = figures["iops"].as_f64().unwrap_or(0.0);
        if side_iops <= 0.0 {
            continue;
        }
        iops += side_iops;
        bytes += figures["bw_bytes"].as_f64().unwrap_or(0.0);
        let percentile =
            |p: &str| figures["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
        let values = [
            figures["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0,
            percentile("50.000000"),
            percentile("99.000000"),
            percentile("99.900000"),
        ];
        // Mixed workloads: latencies weighted by each side's share of ops.
        for (total, value) in weighted.iter_mut().zip(values) {
            *total += value * side_iops;
        }
    }
    if iops <= 0.0 {
        bail!("fio reported no I/O for {workload} on {}", target.name);
    }
    let [mean, p50, p99, p999] = weighted.map(|w| w / iops);
    Ok(Result {
        target: target.name.clone(),
        workload: workload.to_string(),
        iops,
        mib_per_sec: bytes / (1 << 20) as f64,
        latency_us_mean: mean,
        latency_us_p50: p50,
        latency_us_p99: p99,
        latency_us_p999: p999,
        daemon_cores,
        iops_per_daemon_core: if daemon_cores > 0.0 {
            iops / daemon_cores
        } else {
            0.0
        },
        round_iops: vec![iops],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(iops: f64, mean: f64, p99: f64, cores: f64) -> Result {
        Result {
            target: "t".into(),
            workload: "w".into(),
            iops,
            mib_per_sec: iops / 256.0,
            latency_us_mean: mean,
            latency_us_p50: mean,
            latency_us_p99: p99,
            latency_us_p999: p99 * 2.0,
            daemon_cores: cores,
            iops_per_daemon_core: iops / cores,
            round_iops: vec![iops],
        }
    }

    #[test]
    fn rounds_combine_into_means_with_latency_weighted_by_iops() {
        let combined = combine(&[
            round(1000.0, 100.0, 300.0, 0.5),
            round(3000.0, 50.0, 100.0, 1.5),
        ])
        .expect("two rounds");
        assert_eq!(combined.iops, 2000.0);
        assert_eq!(combined.mib_per_sec, 2000.0 / 256.0);
        // 1,000 ops at 100 µs and 3,000 at 50 µs.
        assert_eq!(combined.latency_us_mean, 62.5);
        assert_eq!(combined.latency_us_p99, 200.0);
        assert_eq!(combined.latency_us_p999, 400.0);
        assert_eq!(combined.daemon_cores, 1.0);
        assert_eq!(combined.iops_per_daemon_core, 2000.0);
        assert_eq!(combined.round_iops, vec![1000.0, 3000.0]);
        assert!(combine(&[]).is_none());
    }
}
