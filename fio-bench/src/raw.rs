//! The raw-device baseline: fio with io_uring and O_DIRECT on a plain file,
//! run in the same invocation as whatever it is compared with.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use serde::Serialize;

/// One benchmark workload.
#[derive(Clone, Copy, Debug)]
pub struct Workload {
    pub name: &'static str,
    pub write: bool,
    pub random: bool,
    pub block_bytes: u64,
    pub depth: usize,
    /// The raw baseline flushes after every write (for targets that only
    /// acknowledge durable writes).
    pub fdatasync: bool,
}

/// The 4 KiB random and 1 MiB sequential workloads the storage benches share.
pub const STORAGE_WORKLOADS: [Workload; 5] = [
    Workload {
        name: "randwrite 4k qd1",
        write: true,
        random: true,
        block_bytes: 4096,
        depth: 1,
        fdatasync: true,
    },
    Workload {
        name: "randwrite 4k qd32",
        write: true,
        random: true,
        block_bytes: 4096,
        depth: 32,
        fdatasync: false,
    },
    Workload {
        name: "randread 4k qd1",
        write: false,
        random: true,
        block_bytes: 4096,
        depth: 1,
        fdatasync: false,
    },
    Workload {
        name: "randread 4k qd32",
        write: false,
        random: true,
        block_bytes: 4096,
        depth: 32,
        fdatasync: false,
    },
    Workload {
        name: "seqwrite 1m qd8",
        write: true,
        random: false,
        block_bytes: 1 << 20,
        depth: 8,
        fdatasync: false,
    },
];

/// What one workload achieved.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figures {
    pub iops: f64,
    pub mib_per_sec: f64,
    pub latency_us_mean: f64,
    pub latency_us_p99: f64,
}

impl Figures {
    /// Summarises per-operation latencies (microseconds) measured over
    /// `seconds` for operations of `block_bytes`.
    pub fn from_latencies(mut latencies_us: Vec<u32>, seconds: f64, block_bytes: u64) -> Figures {
        latencies_us.sort_unstable();
        let count = latencies_us.len() as f64;
        let p99_index = ((count * 0.99) as usize).min(latencies_us.len().saturating_sub(1));
        Figures {
            iops: count / seconds,
            mib_per_sec: count * block_bytes as f64 / seconds / (1 << 20) as f64,
            latency_us_mean: latencies_us.iter().map(|l| *l as f64).sum::<f64>() / count.max(1.0),
            latency_us_p99: latencies_us.get(p99_index).copied().unwrap_or(0) as f64,
        }
    }
}

/// Writes `size` bytes of `file` sequentially with fio (lays the file out).
pub fn prefill(file: &Path, size: u64) -> anyhow::Result<()> {
    crate::suite::prefill(&crate::suite::Target::raw_file(file), size)
}

/// Runs `workload` with fio on `file` (`size` bytes) for `runtime` seconds.
pub fn run(file: &Path, size: u64, workload: &Workload, runtime: u64) -> anyhow::Result<Figures> {
    let rw = match (workload.write, workload.random) {
        (true, true) => "randwrite",
        (true, false) => "write",
        (false, true) => "randread",
        (false, false) => "read",
    };
    let mut command = Command::new("fio");
    command.args([
        "--name=raw",
        &format!("--filename={}", file.display()),
        &format!("--size={size}"),
        "--ioengine=io_uring",
        "--direct=1",
        &format!("--rw={rw}"),
        &format!("--bs={}", workload.block_bytes),
        &format!("--iodepth={}", workload.depth),
        &format!("--runtime={runtime}"),
        "--time_based",
        "--ramp_time=1",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]);
    if workload.fdatasync {
        command.arg("--fdatasync=1");
    }
    let output = command.output().context("run fio (apt-get install fio)")?;
    if !output.status.success() {
        bail!("fio failed: {}", String::from_utf8_lossy(&output.stderr));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let start = text.find('{').context("fio printed no JSON")?;
    let json: serde_json::Value = serde_json::from_str(&text[start..]).context("parse fio JSON")?;
    let job = &json["jobs"][0][if workload.write { "write" } else { "read" }];
    let iops = job["iops"].as_f64().context("fio JSON has no iops")?;
    Ok(Figures {
        iops,
        mib_per_sec: job["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        // With --fdatasync=1 a write's cost includes its flush: use the time
        // per operation rather than the write's own latency.
        latency_us_mean: if workload.fdatasync {
            1e6 / iops.max(1e-9)
        } else {
            job["lat_ns"]["mean"].as_f64().unwrap_or(0.0) / 1000.0
        },
        latency_us_p99: job["clat_ns"]["percentile"]["99.000000"]
            .as_f64()
            .unwrap_or(0.0)
            / 1000.0,
    })
}
