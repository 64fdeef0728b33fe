//! `fio-bench run --suite quick` against a small dev cluster of its own:
//! every workload has a result on every target (raw file, qemu-nbd, size-3
//! Basalt volumes unhomed and homed on the gateway's node, and a homed size-1
//! one), with non-zero IOPS, ordered latency
//! percentiles and daemon CPU accounted, and the table, summary and plot are
//! written. Two rounds: every figure is the mean of both, and both rounds'
//! raw JSON is kept. The harness cannot silently break.

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use basalt_tests::{must_run, must_succeed, sibling_bin};

#[test]
fn quick_suite_produces_a_sane_result_for_every_target_and_workload() {
    let out = tempfile::tempdir().unwrap();
    let bench = sibling_bin("fio-bench");
    let run = must_run(
        bench.to_str().unwrap(),
        &[
            "run",
            "--suite",
            "quick",
            "--nodes",
            "3",
            "--osd-size",
            "1G",
            "--size",
            "64M",
            "--rounds",
            "2",
            "--out",
            out.path().to_str().unwrap(),
        ],
    );
    let table = must_succeed(&run);
    assert!(table.contains("| workload | target | IOPS |"), "{table}");
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("summary.json")).unwrap()).unwrap();
    let results = summary["results"].as_array().unwrap();
    let targets = [
        "raw",
        "qemu-nbd",
        "basalt-size3",
        "basalt-size3-homed",
        "basalt-size1-homed",
    ];
    let workloads = [
        "randread-4k-qd1",
        "randread-4k-qd32",
        "randwrite-4k-qd1",
        "randwrite-4k-qd32",
        "randwrite-4k-qd1-fsync",
        "randrw-70-30-4k-qd16",
        "seqwrite-1m-qd8",
        "seqread-1m-qd8",
    ];
    assert_eq!(results.len(), targets.len() * workloads.len());
    for target in targets {
        for workload in workloads {
            let r = results
                .iter()
                .find(|r| r["target"] == target && r["workload"] == workload)
                .unwrap_or_else(|| panic!("no result for {workload} on {target}"));
            let f = |k: &str| r[k].as_f64().unwrap();
            assert!(f("iops") > 0.0, "{r}");
            assert!(f("mib_per_sec") > 0.0, "{r}");
            assert!(f("latency_us_p50") > 0.0, "{r}");
            assert!(f("latency_us_p50") <= f("latency_us_p99"), "{r}");
            assert!(f("latency_us_p99") <= f("latency_us_p999"), "{r}");
            let rounds: Vec<f64> = r["round_iops"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(rounds.len(), 2, "{r}");
            assert!(rounds.iter().all(|&iops| iops > 0.0), "{r}");
            let mean = rounds.iter().sum::<f64>() / 2.0;
            assert!(
                (f("iops") - mean).abs() < 1e-6 * mean,
                "not the rounds' mean: {r}"
            );
            if target.starts_with("basalt") {
                assert!(f("daemon_cores") > 0.0, "daemon CPU not accounted: {r}");
                assert!(f("iops_per_daemon_core") > 0.0, "{r}");
            }
            for name in [
                format!("{target}-{workload}.json"),
                format!("{target}-{workload}-round2.json"),
            ] {
                assert!(out.path().join("raw").join(&name).exists(), "no {name}");
            }
        }
    }
    let plot = std::fs::read_to_string(out.path().join("plot.svg")).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains("basalt-size1-homed"));
    let markdown = std::fs::read_to_string(out.path().join("results.md")).unwrap();
    assert!(markdown.contains("vs qemu-nbd"));
    // The data it wrote is gone (OSD files are GiBs each); logs stay.
    assert!(
        !out.path().join("raw.img").exists(),
        "raw baseline file left"
    );
    let cluster: Vec<_> = std::fs::read_dir(out.path().join("cluster"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        cluster.iter().all(|n| n == "logs" || n == "cluster.json"),
        "cluster data left: {cluster:?}"
    );
    assert!(
        cluster.iter().any(|n| n == "logs"),
        "logs removed: {cluster:?}"
    );
}
