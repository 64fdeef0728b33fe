//! The NBD gateway with real clients (libnbd's nbdinfo and nbdcopy,
//! qemu-img, qemu-io) on a 3-node dev cluster: listing, seeded data in and
//! out, odd offsets, an unknown export and a garbage connection, after all of
//! which the gateway still serves.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

use basalt_tests::{DevCluster, basalt, must_reach_nbd, must_run, must_succeed, start_gateway};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[test]
fn standard_clients_read_and_write_through_the_gateway() {
    let cluster = DevCluster::up("1G").unwrap();
    let dir = &cluster.dir;
    let dev_nbd_port = cluster.nbd_port;
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "disk", "--size", "384M",
    ]));
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "copy", "--size", "384M",
    ]));
    let (mut gateway, nbd_addr) =
        start_gateway(dir.path(), "nbd", &mons, "127.0.1.2", &[]).unwrap();
    let uri = format!("nbd://{nbd_addr}/disk");
    must_reach_nbd(&uri);
    let listed = must_succeed(&must_run(
        "nbdinfo",
        &["--list", &format!("nbd://{nbd_addr}")],
    ));
    assert!(listed.contains("export=\"disk\""), "{listed}");
    let info = must_succeed(&must_run("nbdinfo", &[&uri]));
    assert!(info.contains("export-size: 402653184"), "{info}");
    assert!(
        info.contains("can_flush: true") && info.contains("can_fua: true"),
        "{info}"
    );

    // 256 MiB of seeded data in and out with nbdcopy, compared; qemu-img agrees.
    let mut data = vec![0u8; 256 << 20];
    ChaCha8Rng::seed_from_u64(8).fill_bytes(&mut data);
    let input = dir.path().join("in.bin");
    let output = dir.path().join("out.bin");
    std::fs::write(&input, &data).unwrap();
    must_succeed(&must_run("nbdcopy", &[input.to_str().unwrap(), &uri]));
    must_succeed(&must_run("nbdcopy", &[&uri, output.to_str().unwrap()]));
    let back = std::fs::read(&output).unwrap();
    assert!(
        back[..data.len()] == data[..],
        "nbdcopy read back different bytes"
    );
    assert!(
        back[data.len()..].iter().all(|b| *b == 0),
        "the unwritten tail is a hole"
    );
    let compare = must_succeed(&must_run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            output.to_str().unwrap(),
            &uri,
        ],
    ));
    assert!(compare.contains("identical"), "{compare}");
    // qemu-img convert out of the gateway (to qcow2) and into it (another
    // volume); both compare identical.
    let qcow2 = dir.path().join("out.qcow2");
    must_succeed(&must_run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            &uri,
            qcow2.to_str().unwrap(),
        ],
    ));
    let copy_uri = format!("nbd://{nbd_addr}/copy");
    must_succeed(&must_run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().unwrap(),
            &copy_uri,
        ],
    ));
    for (format, image) in [
        ("qcow2", qcow2.to_str().unwrap()),
        ("raw", copy_uri.as_str()),
    ] {
        let compare = must_succeed(&must_run(
            "qemu-img",
            &["compare", "-f", format, "-F", "raw", image, &uri],
        ));
        assert!(compare.contains("identical"), "{format}: {compare}");
    }

    // Odd offsets and lengths past the copied data (qemu-io
    // read-modify-writes around 4 KiB blocks); neighbours stay zero.
    let io = must_succeed(&must_run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 314573800 3000",
            "-c",
            "read -P 0xab 314573800 3000",
            "-c",
            "read -P 0 314576800 96",
            &uri,
        ],
    ));
    assert!(!io.contains("Pattern verification failed"), "{io}");

    // BLOCK_STATUS (structured replies, base:allocation) tells data from holes.
    let map = must_succeed(&must_run("nbdinfo", &["--map", &uri]));
    let extents: Vec<Vec<&str>> = map
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let expected = [
        ["0", "268435456", "0", "data"],
        ["268435456", "46137344", "3", "hole,zero"],
        ["314572800", "4096", "0", "data"],
        ["314576896", "88076288", "3", "hole,zero"],
    ];
    for (got, want) in extents.iter().zip(expected.iter()) {
        assert_eq!(got, want, "{map}");
    }
    assert_eq!(extents.len(), expected.len(), "{map}");

    // An unknown export is refused cleanly; garbage closes only its own
    // connection; the gateway keeps serving.
    let missing = must_run("nbdinfo", &[&format!("nbd://{nbd_addr}/nope")]);
    assert!(!missing.status.success());
    let mut raw = std::net::TcpStream::connect(&nbd_addr).unwrap();
    let mut hello = [0u8; 18];
    raw.read_exact(&mut hello).unwrap();
    raw.write_all(&[0xff; 64]).unwrap();
    let mut rest = Vec::new();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = raw.read_to_end(&mut rest);
    let info = must_succeed(&must_run("nbdinfo", &["--size", &uri]));
    assert_eq!(info.trim(), "402653184");
    // The gateway `dev up` started on node 3 serves the same volume.
    let node3 = format!("nbd://127.0.1.3:{dev_nbd_port}/disk");
    let size = must_succeed(&must_run("nbdinfo", &["--size", &node3]));
    assert_eq!(size.trim(), "402653184");
    assert!(gateway.is_running());

    // A connected client shows in `basalt status` (gateways report every 2 s).
    let mut holder = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "-u", &uri, "-c", "import time; time.sleep(20)"])
        .spawn()
        .unwrap();
    let mut seen = false;
    for _ in 0..60 {
        let out = basalt(&["--mon", &mons, "status", "--json"]);
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        seen = status["gateways"].as_array().is_some_and(|gateways| {
            gateways.iter().any(|g| {
                g["addr"] == nbd_addr.as_str()
                    && g["clients"]
                        .as_array()
                        .is_some_and(|c| c.iter().any(|c| c["export"] == "disk"))
            })
        });
        if seen {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(seen, "status never listed the connected NBD client");
    gateway.kill();

    // A read-only gateway: the flag is advertised and writes get EPERM.
    let (_read_only, ro_addr) =
        start_gateway(dir.path(), "nbd-ro", &mons, "127.0.1.3", &["--read-only"]).unwrap();
    let ro_uri = format!("nbd://{ro_addr}/disk");
    let info = must_reach_nbd(&ro_uri);
    assert!(info.contains("is_read_only: true"), "{info}");
    // nbdsh is `python3 -m nbd`; Debian's python3 has the binding (the one
    // first on PATH may not). Strict mode off, so libnbd sends the write and
    // the gateway itself must refuse it.
    let write = must_run(
        "/usr/bin/python3",
        &[
            "-m",
            "nbd",
            "-u",
            &ro_uri,
            "-c",
            "h.set_strict_mode(0); h.pwrite(b'x' * 4096, 0)",
        ],
    );
    let stderr = String::from_utf8_lossy(&write.stderr);
    assert!(
        !write.status.success(),
        "a write to a read-only export succeeded"
    );
    assert!(
        stderr.contains("command failed: Operation not permitted"),
        "expected the gateway's EPERM, got: {stderr}"
    );
    let read = must_succeed(&must_run("nbdinfo", &["--size", &ro_uri]));
    assert_eq!(read.trim(), "402653184");
}

/// fio writes with crc32c verification headers through the gateway at queue
/// depth 32 over two connections; one OSD is SIGKILLed in the middle. fio
/// sees no error (requests wait for the map change and are retried), and a
/// verify pass afterwards finds every block intact.
#[test]
fn osd_killed_under_fio_loses_nothing() {
    let cluster = DevCluster::up("1G").unwrap();
    let nbd_port = cluster.nbd_port;
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "fio", "--size", "64M",
    ]));
    let uri = format!("nbd://127.0.1.1:{nbd_port}/fio");
    let fio_args = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            "--size=32M",
            "--offset_increment=32M",
            "--verify=crc32c",
            "--randrepeat=1",
            "--verify_state_save=0",
            "--group_reporting",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    // The kill must land while fio writes: run fio in the background.
    let mut fio = Command::new("fio")
        .args(fio_args(&["--do_verify=0", "--overwrite=1"]))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        fio.try_wait().unwrap().is_none(),
        "fio finished before the kill; make it write more"
    );
    let victim = cluster
        .processes()
        .into_iter()
        .find(|(kind, name, _)| kind == "osd" && name == "osd-node2-0")
        .map(|(_, _, pid)| pid)
        .unwrap();
    // SAFETY: SIGKILL to an OSD process this test started.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let done = fio.wait_with_output().unwrap();
    assert!(
        done.status.success(),
        "fio saw an error: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let verify = must_run("fio", &fio_args(&["--verify_only"]));
    let text = must_succeed(&verify);
    assert!(!text.contains("verify: bad"), "{text}");
}

/// `basalt volume map` attaches a volume to /dev/nbdX through the kernel's
/// netlink interface. Where the nbd module is loaded the device is written
/// and the bytes read back through the gateway; where it is missing (our
/// test machines) both commands fail with a message that says so.
#[test]
fn volume_map_attaches_the_kernel_client_or_says_why_not() {
    if !std::path::Path::new("/sys/module/nbd").exists() {
        let map = basalt(&["volume", "map", "vm1", "--nbd", "127.0.1.1:1"]);
        let stderr = String::from_utf8_lossy(&map.stderr);
        assert!(!map.status.success());
        assert!(
            stderr.contains("nbd driver is not available") && stderr.contains("modprobe nbd"),
            "{stderr}"
        );
        let unmap = basalt(&["volume", "unmap", "/dev/nbd0"]);
        assert!(!unmap.status.success());
        assert!(String::from_utf8_lossy(&unmap.stderr).contains("modprobe nbd"));
        let unmap = basalt(&["volume", "unmap", "/dev/nbdx"]);
        assert!(String::from_utf8_lossy(&unmap.stderr).contains("not an nbd device"));
        return;
    }
    let cluster = DevCluster::up("1G").unwrap();
    let mons = cluster.mon_list();
    must_succeed(&basalt(&[
        "--mon", &mons, "volume", "create", "kernel", "--size", "64M",
    ]));
    let gateway = format!("127.0.1.1:{}", cluster.nbd_port);
    let mapped = must_succeed(&basalt(&[
        "--json", "volume", "map", "kernel", "--nbd", &gateway,
    ]));
    let mapped: serde_json::Value = serde_json::from_str(&mapped).unwrap();
    let device = mapped["device"].as_str().unwrap().to_string();
    let mut data = vec![0u8; 1 << 20];
    ChaCha8Rng::seed_from_u64(11).fill_bytes(&mut data);
    let input = cluster.dir.path().join("in.bin");
    std::fs::write(&input, &data).unwrap();
    must_succeed(&must_run(
        "dd",
        &[
            &format!("if={}", input.display()),
            &format!("of={device}"),
            "bs=1M",
            "oflag=direct",
            "conv=fsync",
        ],
    ));
    must_succeed(&basalt(&["volume", "unmap", "kernel"]));
    let output = cluster.dir.path().join("out.bin");
    must_succeed(&must_run(
        "nbdcopy",
        &[&format!("nbd://{gateway}/kernel"), output.to_str().unwrap()],
    ));
    assert!(std::fs::read(&output).unwrap()[..data.len()] == data[..]);
}
