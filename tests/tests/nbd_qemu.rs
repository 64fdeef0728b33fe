//! QEMU on the NBD gateway: a guest that boots with a volume as its virtio
//! disk, and QEMU's NBD client riding out a gateway restart
//! (`reconnect-delay`) and moving to another node's gateway.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use basalt_tests::{DevCluster, basalt, must_reach_nbd, must_run, must_succeed, start_gateway};

/// An interactive qemu-io whose commands are answered one at a time.
struct QemuIo {
    child: std::process::Child,
    lines: mpsc::Receiver<String>,
}

impl QemuIo {
    fn open(image_opts: &str) -> QemuIo {
        let mut child = Command::new("qemu-io")
            .args(["--image-opts", image_opts])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("qemu-io is needed (scripts/install-deps.sh)");
        let (sender, lines) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        QemuIo { child, lines }
    }

    /// Runs one command; returns its output once it reports completion or
    /// failure, or panics after `limit`.
    fn run(&mut self, command: &str, limit: Duration) -> String {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "{command}").unwrap();
        stdin.flush().unwrap();
        let started = Instant::now();
        let mut output = String::new();
        while started.elapsed() < limit {
            let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) else {
                continue;
            };
            output.push_str(&line);
            output.push('\n');
            // qemu-io prints "N KiB, 1 ops; ..." after a finished request
            // and "... failed: ..." after a failed one.
            if line.contains(" ops; ") || line.contains("failed") {
                return output;
            }
        }
        panic!("qemu-io gave no answer to {command:?} in {limit:?}: {output}");
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A gateway stopped gracefully closes its connections at once; QEMU's NBD
/// client with `reconnect-delay` reconnects when the gateway is back and
/// resends the write it was holding, so nothing fails. Then a fresh client
/// reads the same bytes through another node's gateway.
#[test]
fn qemu_reconnects_across_a_gateway_restart() {
    let cluster = DevCluster::up("1G").unwrap();
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "vm", "--size", "64M",
    ]));
    let (mut gateway, addr) =
        start_gateway(cluster.dir.path(), "nbd", &mons, "127.0.1.2", &[]).unwrap();
    must_reach_nbd(&format!("nbd://{addr}/vm"));
    let (host, port) = addr.split_once(':').unwrap();
    let mut io = QemuIo::open(&format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export=vm,reconnect-delay=30"
    ));
    let limit = Duration::from_secs(30);
    let first = io.run("write -P 0x5a 0 1M", limit);
    assert!(first.contains("wrote 1048576/1048576"), "{first}");

    let stopping = Instant::now();
    assert!(gateway.terminate(), "the gateway did not stop on SIGTERM");
    let stop_time = stopping.elapsed();
    assert!(
        stop_time < Duration::from_secs(3),
        "stopping the gateway took {stop_time:?}"
    );
    // Issued while no gateway runs: QEMU holds it until it reconnects.
    let stdin = io.child.stdin.as_mut().unwrap();
    writeln!(stdin, "write -P 0x6b 1M 1M").unwrap();
    stdin.flush().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    gateway.restart().unwrap();
    let mut answer = String::new();
    let started = Instant::now();
    while started.elapsed() < limit && !answer.contains(" ops; ") && !answer.contains("failed") {
        if let Ok(line) = io.lines.recv_timeout(Duration::from_millis(200)) {
            answer.push_str(&line);
            answer.push('\n');
        }
    }
    assert!(
        answer.contains("wrote 1048576/1048576"),
        "the write held across the restart failed: {answer}"
    );
    for (pattern, offset) in [("0x5a", "0"), ("0x6b", "1M")] {
        let read = io.run(&format!("read -P {pattern} {offset} 1M"), limit);
        assert!(read.contains("read 1048576/1048576"), "{read}");
        assert!(!read.contains("Pattern verification failed"), "{read}");
    }
    drop(io);

    // Another node's gateway (the one `dev up` started on node 3) serves the
    // same bytes once this one is gone.
    gateway.kill();
    let other = format!("nbd://127.0.1.3:{}/vm", cluster.nbd_port);
    let read = must_succeed(&must_run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read -P 0x5a 0 1M",
            "-c",
            "read -P 0x6b 1M 1M",
            &other,
        ],
    ));
    assert!(!read.contains("Pattern verification failed"), "{read}");
    assert!(read.matches("read 1048576/1048576").count() == 2, "{read}");
}

fn sha256_of(bytes: &[u8], dir: &std::path::Path) -> String {
    let path = dir.join("sha-input.bin");
    std::fs::write(&path, bytes).unwrap();
    let out = must_succeed(&must_run("sha256sum", &[path.to_str().unwrap()]));
    out.split_whitespace().next().unwrap().to_string()
}

/// A QEMU guest (Debian's kernel, a busybox initramfs built by
/// `scripts/guest-image.sh`) boots with a volume as its virtio disk, writes
/// 8 MiB through its page cache and with O_DIRECT, syncs, reads it back and
/// discards 1 MiB; the host then reads the same bytes through nbdcopy and
/// sees the discarded MiB as zeros.
#[test]
fn qemu_guest_writes_and_the_host_reads_the_same_bytes() {
    let workspace = basalt_tests::workspace_dir();
    let image = must_succeed(&must_run(
        "bash",
        &[workspace.join("scripts/guest-image.sh")],
    ));
    let image = std::path::PathBuf::from(image.trim());
    let cluster = DevCluster::up("1G").unwrap();
    let dir = cluster.dir.path();
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "guest", "--size", "64M",
    ]));
    let uri = format!("nbd://127.0.1.1:{}/guest", cluster.nbd_port);
    must_reach_nbd(&uri);
    // Something for the guest's discard to remove.
    must_succeed(&must_run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0xcd 10M 1M", &uri],
    ));

    let console = dir.join("console.log");
    let qemu = must_run(
        "timeout",
        &[
            "300",
            "qemu-system-x86_64",
            "-accel",
            // TCG by default: /dev/kvm on our machines is PVM, on which a
            // stock kernel does not boot in useful time.
            &std::env::var("BASALT_GUEST_ACCEL").unwrap_or_else(|_| "tcg".into()),
            "-machine",
            "pc",
            "-m",
            "384",
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            &format!("file:{}", console.display()),
            "-kernel",
            image.join("vmlinuz").to_str().unwrap(),
            "-initrd",
            image.join("initrd.img").to_str().unwrap(),
            "-append",
            "console=ttyS0 quiet panic=-1 basalt.offset_mib=2 basalt.mib=8 basalt.trim_mib=1",
            "-drive",
            &format!("file={uri},format=raw,if=virtio,discard=unmap,cache=none"),
        ],
    );
    let console_text =
        String::from_utf8_lossy(&std::fs::read(&console).unwrap_or_default()).replace('\r', "");
    let report: Vec<&str> = console_text
        .lines()
        .filter(|l| l.starts_with("BASALT-GUEST "))
        .collect();
    assert!(
        qemu.status.success() && report.contains(&"BASALT-GUEST RESULT PASS"),
        "guest failed (qemu {:?}): {}\n{}\n{console_text}",
        qemu.status,
        String::from_utf8_lossy(&qemu.stderr),
        report.join("\n")
    );
    let write = report
        .iter()
        .find(|l| l.starts_with("BASALT-GUEST WRITE "))
        .unwrap();
    let guest_sha = write
        .split_whitespace()
        .find_map(|field| field.strip_prefix("sha256="))
        .unwrap();

    let copy = dir.join("volume.bin");
    must_succeed(&must_run(
        "nbdcopy",
        &[uri.as_str(), copy.to_str().unwrap()],
    ));
    let volume = std::fs::read(&copy).unwrap();
    const MIB: usize = 1 << 20;
    assert_eq!(
        sha256_of(&volume[2 * MIB..10 * MIB], dir),
        guest_sha,
        "the host reads other bytes than the guest wrote"
    );
    assert!(
        volume[10 * MIB..11 * MIB].iter().all(|b| *b == 0),
        "the guest's discard did not reach the volume"
    );
    assert!(volume[..2 * MIB].iter().all(|b| *b == 0));
    assert!(volume[11 * MIB..].iter().all(|b| *b == 0));
}
