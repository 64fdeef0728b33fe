//! Harness for multi-process tests: real `basalt` daemons on loopback
//! addresses with free ports and temporary directories, killed and restarted
//! by the tests, their logs checked for unexpected ERROR lines.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Returns the path of the `basalt` binary built with the tests.
pub fn basalt_bin() -> PathBuf {
    if let Ok(path) = std::env::var("BASALT_BIN") {
        return PathBuf::from(path);
    }
    // Test binaries live in target/<profile>/deps, bench binaries in
    // target/<profile>; `basalt` is in target/<profile>.
    let exe = std::env::current_exe().expect("test binary has a path");
    let here = exe.parent().expect("binary has a directory");
    let bin = [here.join("basalt"), here.join("../basalt")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join("../basalt"));
    assert!(
        bin.exists(),
        "{} is missing: build it first (cargo build -p basalt-cli) or set BASALT_BIN",
        bin.display()
    );
    bin
}

/// The workspace root of the checkout being tested. Read at run time (cargo
/// and nextest set `CARGO_MANIFEST_DIR` for test processes): a path baked in
/// at compile time names whichever checkout last built into a shared target
/// directory.
pub fn workspace_dir() -> PathBuf {
    let tests = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    tests.parent().map(Path::to_path_buf).unwrap_or(tests)
}

/// Returns the path of workspace binary `name` built in the same profile
/// as the running test (`cargo build` puts them side by side).
pub fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary has a path");
    let here = exe.parent().expect("binary has a directory");
    let bin = [here.join(name), here.join("..").join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| here.join("..").join(name));
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

/// Returns a port on `ip` that was free a moment ago.
pub fn free_port(ip: &str) -> u16 {
    let [port] = free_ports(ip);
    port
}

/// Returns `N` distinct ports on `ip` that were free a moment ago: all are
/// held while they are picked, since ports asked for one after another may
/// come back the same (a cluster's monitor, OSD and gateway ports then
/// collide, and a client reaches the wrong daemon).
pub fn free_ports<const N: usize>(ip: &str) -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind((ip, 0)).expect("bind a loopback address"))
        .collect();
    std::array::from_fn(|i| {
        listeners[i]
            .local_addr()
            .expect("bound socket has an address")
            .port()
    })
}

/// One daemon process with its log file.
pub struct Daemon {
    pub name: String,
    pub args: Vec<String>,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `basalt ARGS`, appending stderr and stdout to `log`.
    pub fn start(name: &str, args: Vec<String>, log: PathBuf) -> anyhow::Result<Daemon> {
        let mut daemon = Daemon {
            name: name.to_string(),
            args,
            log,
            child: None,
        };
        daemon.restart()?;
        Ok(daemon)
    }

    /// Starts the process again with the same arguments.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is still running", self.name);
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open {}", self.log.display()))?;
        let child = Command::new(basalt_bin())
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILLs the process and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the process (a graceful stop) and waits up to 10 s for it
    /// to exit, then SIGKILLs it. Returns whether it exited on its own.
    pub fn terminate(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: a signal to a child this harness started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Returns the process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Returns whether the process is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Returns the log's lines at ERROR level that match none of `allowed`.
    pub fn unexpected_errors(&self, allowed: &[&str]) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter(|line| line.contains(" ERROR ") || line.starts_with("ERROR"))
            .filter(|line| !allowed.iter().any(|a| line.contains(a)))
            .map(String::from)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A monitor group of real processes on 127.0.1.1, 127.0.1.2, ...
pub struct Monitors {
    pub dir: tempfile::TempDir,
    pub daemons: Vec<Daemon>,
    pub addrs: Vec<SocketAddr>,
}

impl Monitors {
    /// Starts `count` monitors with extra arguments for each.
    pub fn start(count: usize, extra: &[&str]) -> anyhow::Result<Monitors> {
        let dir = tempfile::tempdir().context("temp dir")?;
        let names: Vec<String> = (0..count)
            .map(|i| ((b'a' + i as u8) as char).to_string())
            .collect();
        let addrs: Vec<SocketAddr> = (0..count)
            .map(|i| {
                let ip = format!("127.0.1.{}", i + 1);
                let port = free_port(&ip);
                format!("{ip}:{port}")
                    .parse()
                    .expect("valid socket address")
            })
            .collect();
        let peers: Vec<String> = names
            .iter()
            .zip(&addrs)
            .map(|(n, a)| format!("{n}={a}"))
            .collect();
        let mut daemons = Vec::new();
        for (name, addr) in names.iter().zip(&addrs) {
            let mut args = vec![
                "mon".to_string(),
                "--id".into(),
                name.clone(),
                "--data".into(),
                dir.path().join(format!("mon-{name}")).display().to_string(),
                "--listen".into(),
                addr.to_string(),
                "--peers".into(),
                peers.join(","),
            ];
            args.extend(extra.iter().map(|s| s.to_string()));
            daemons.push(Daemon::start(
                &format!("mon.{name}"),
                args,
                dir.path().join(format!("mon-{name}.log")),
            )?);
        }
        Ok(Monitors {
            dir,
            daemons,
            addrs,
        })
    }

    /// The `--mon` list for clients.
    pub fn mon_list(&self) -> Vec<String> {
        self.addrs.iter().map(ToString::to_string).collect()
    }

    /// Returns the data directory of monitor `index`.
    pub fn data_dir(&self, index: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("mon-{}", (b'a' + index as u8) as char))
    }

    /// Fails if any monitor logged an ERROR line not matching `allowed`.
    pub fn assert_clean_logs(&self, allowed: &[&str]) {
        for daemon in &self.daemons {
            let errors = daemon.unexpected_errors(allowed);
            assert!(
                errors.is_empty(),
                "{} logged unexpected errors:\n{}",
                daemon.name,
                errors.join("\n")
            );
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or fails after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if started.elapsed() > limit {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of environment variable `name` parsed, or `default` when it is
/// unset or does not parse (the knobs that run a randomized test longer).
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `basalt ARGS` (logging at warn) and returns its output.
pub fn basalt(args: &[&str]) -> std::process::Output {
    basalt_logging("warn", args)
}

/// Runs `basalt ARGS` with `RUST_LOG=level` (which daemons it starts inherit).
pub fn basalt_logging(level: &str, args: &[&str]) -> std::process::Output {
    Command::new(basalt_bin())
        .args(args)
        .env("RUST_LOG", level)
        .output()
        .expect("the basalt binary runs")
}

/// A 3-node cluster from `basalt dev up` on free ports in a temporary
/// directory; `dev down` runs on drop, so a failing test leaves nothing.
pub struct DevCluster {
    pub dir: tempfile::TempDir,
    pub mon_port: u16,
    pub osd_port: u16,
    pub nbd_port: u16,
    osd_size: String,
    nodes: u32,
    /// More `dev up` arguments (e.g. `--osd-out-after-ms 8000`).
    up_args: Vec<String>,
}

impl DevCluster {
    /// Starts a cluster whose OSDs have `osd_size` data files, and waits
    /// until it is healthy.
    pub fn up(osd_size: &str) -> anyhow::Result<DevCluster> {
        DevCluster::up_nodes(3, osd_size)
    }

    /// Starts a cluster of `nodes` nodes (one OSD each).
    pub fn up_nodes(nodes: u32, osd_size: &str) -> anyhow::Result<DevCluster> {
        DevCluster::up_nodes_with(nodes, osd_size, &[])
    }

    /// Starts a cluster of `nodes` nodes with more `dev up` arguments.
    pub fn up_nodes_with(
        nodes: u32,
        osd_size: &str,
        up_args: &[&str],
    ) -> anyhow::Result<DevCluster> {
        let [mon_port, osd_port, nbd_port] = free_ports("127.0.1.1");
        let cluster = DevCluster {
            up_args: up_args.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir().context("temp dir")?,
            mon_port,
            osd_port,
            nbd_port,
            osd_size: osd_size.to_string(),
            nodes,
        };
        cluster.up_again()?;
        Ok(cluster)
    }

    /// Runs `dev up` on the cluster's directory (a restart keeps the data).
    pub fn up_again(&self) -> anyhow::Result<()> {
        let dir = self.dir.path().display().to_string();
        let (mon, osd, nbd) = (
            self.mon_port.to_string(),
            self.osd_port.to_string(),
            self.nbd_port.to_string(),
        );
        // The daemons inherit RUST_LOG from `dev up`: info, so their logs
        // show peering and recovery (tests grep them; benches count them).
        let nodes = self.nodes.to_string();
        let mut args = vec![
            "dev",
            "up",
            "--dir",
            &dir,
            "--nodes",
            &nodes,
            "--osd-size",
            &self.osd_size,
            "--mon-port",
            &mon,
            "--osd-port",
            &osd,
            "--nbd-port",
            &nbd,
        ];
        args.extend(self.up_args.iter().map(String::as_str));
        let out = basalt_logging("info", &args);
        if !out.status.success() {
            bail!(
                "dev up failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `dev down` (data is kept).
    pub fn down(&self) -> anyhow::Result<()> {
        let out = basalt(&[
            "dev",
            "down",
            "--dir",
            &self.dir.path().display().to_string(),
        ]);
        if !out.status.success() {
            bail!("dev down failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// The monitor addresses.
    pub fn mons(&self) -> Vec<String> {
        (1..=3)
            .map(|i| format!("127.0.1.{i}:{}", self.mon_port))
            .collect()
    }

    /// The `--mon` list.
    pub fn mon_list(&self) -> String {
        self.mons().join(",")
    }

    /// The cluster's `cluster.json`.
    pub fn record(&self) -> serde_json::Value {
        let bytes = std::fs::read(self.dir.path().join("cluster.json")).unwrap_or_default();
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null)
    }
}

impl Drop for DevCluster {
    fn drop(&mut self) {
        let _ = self.down();
    }
}

impl DevCluster {
    /// SIGKILLs the process named `name` (as in `cluster.json`, e.g.
    /// `osd-node2-0`) and waits until it is gone (a zombie at most);
    /// returns its pid. Dying takes a while (an OSD's io_uring waits for
    /// its I/O in flight): `up_again` right after a bare SIGKILL found the
    /// OSD still running and did not restart it.
    pub fn kill(&self, name: &str) -> u32 {
        let pid = self
            .processes()
            .into_iter()
            .find(|(_, n, _)| n == name)
            .map(|(_, _, pid)| pid)
            .unwrap_or_else(|| panic!("no process {name} in cluster.json"));
        // SAFETY: SIGKILL to a daemon this cluster started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .map(|(_, rest)| rest.trim_start().to_string())
                });
            match state {
                Some(rest) if !rest.starts_with('Z') => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return pid,
            }
        }
        panic!("{name} (pid {pid}) still running 10 s after SIGKILL");
    }

    /// Returns (kind, name, pid) of every process the cluster started.
    pub fn processes(&self) -> Vec<(String, String, u32)> {
        self.record()["daemons"]
            .as_array()
            .map(|daemons| {
                daemons
                    .iter()
                    .map(|d| {
                        (
                            d["kind"].as_str().unwrap_or_default().to_string(),
                            d["name"].as_str().unwrap_or_default().to_string(),
                            d["pid"].as_u64().unwrap_or(0) as u32,
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Panics unless every daemon of the cluster is still running and no
    /// daemon's log shows a panic (a task's, which the daemon survives).
    pub fn assert_alive_without_panics(&self) {
        for (kind, name, pid) in self.processes() {
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid as i32, 0) } == 0;
            assert!(alive, "{kind} {name} died");
        }
        let logs = std::fs::read_dir(self.dir.path().join("logs"))
            .into_iter()
            .flatten();
        for entry in logs.flatten() {
            let path = entry.path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(!text.contains("panicked"), "{}: a panic", path.display());
        }
    }
}

/// Creates a 1 GiB volume `name` in pool `rbd`.
pub async fn create_volume(
    mon: &basalt_monitor::MonClient,
    name: &str,
) -> Result<(), basalt_monitor::MonClientError> {
    create_volume_sized(mon, name, 1 << 30).await
}

/// Creates a volume `name` of `size_bytes` in pool `rbd`.
pub async fn create_volume_sized(
    mon: &basalt_monitor::MonClient,
    name: &str,
    size_bytes: u64,
) -> Result<(), basalt_monitor::MonClientError> {
    let request = basalt_proto::monitor::CreateVolumeRequest {
        name: name.to_string(),
        pool: "rbd".into(),
        size_bytes,
        object_size_bytes: 0,
        home: String::new(),
    };
    mon.call(|mut c| {
        let request = request.clone();
        async move { c.create_volume(request).await }
    })
    .await
    .map(|_| ())
}

/// Creates volume `name` of `size_bytes` in pool `rbd` on the cluster at
/// `mons` and opens it through a new block client.
pub async fn open_new_volume(
    mons: &[String],
    name: &str,
    size_bytes: u64,
) -> anyhow::Result<(
    std::sync::Arc<basalt_client::BlockClient>,
    basalt_client::Volume,
)> {
    use basalt_client::{BlockClient, ClientConfig};
    use basalt_monitor::MonClient;
    create_volume_sized(&MonClient::new(mons)?, name, size_bytes).await?;
    let client = BlockClient::connect(MonClient::new(mons)?, ClientConfig::default()).await?;
    let volume = client.open("rbd", name).await?;
    Ok((client, volume))
}

/// Writes `data[start..end]` to `volume` at queue depth `depth`: writer `w`
/// takes chunks `w, w + depth, ...` of `chunk` bytes. Panics if any write is
/// not acknowledged.
pub async fn write_striped(
    volume: &basalt_client::Volume,
    data: &std::sync::Arc<Vec<u8>>,
    (start, end): (u64, u64),
    (depth, chunk): (u64, u64),
    durability: basalt_client::Durability,
) {
    let mut writers = Vec::new();
    for writer in 0..depth {
        let (volume, data) = (volume.clone(), data.clone());
        writers.push(tokio::spawn(async move {
            let mut offset = start + writer * chunk;
            while offset < end {
                let slice = &data[offset as usize..(offset + chunk) as usize];
                if let Err(e) = volume.write(offset, slice, durability).await {
                    panic!("write at {offset} not acknowledged: {e}");
                }
                offset += depth * chunk;
            }
        }));
    }
    for writer in writers {
        if let Err(e) = writer.await {
            panic!("writer failed: {e}");
        }
    }
}

/// Runs `program ARGS` to completion; panics if it cannot be started (the
/// tools come from `scripts/install-deps.sh`).
pub fn must_run<S: AsRef<std::ffi::OsStr>>(program: &str, args: &[S]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (scripts/install-deps.sh): {e}"))
}

/// Returns the stdout of a successful run; panics with its output otherwise.
pub fn must_succeed(output: &std::process::Output) -> String {
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Waits until an NBD server answers at `uri` (up to 10 s); returns
/// `nbdinfo`'s output for it.
pub fn must_reach_nbd(uri: &str) -> String {
    let started = Instant::now();
    loop {
        let out = must_run("nbdinfo", &[uri]);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no NBD server at {uri}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts an NBD gateway (`basalt nbd`) on a free port of `ip`, logging to
/// `DIR/<name>.log`; returns it with its address.
pub fn start_gateway(
    dir: &std::path::Path,
    name: &str,
    mons: &str,
    ip: &str,
    extra: &[&str],
) -> anyhow::Result<(Daemon, String)> {
    let addr = format!("{ip}:{}", free_port(ip));
    let mut args = vec![
        "--mon".to_string(),
        mons.to_string(),
        "nbd".into(),
        "--listen".into(),
        addr.clone(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = Daemon::start(name, args, dir.join(format!("{name}.log")))?;
    Ok((daemon, addr))
}
