//! The `basalt` binary's offline tools and its error messages: `osd format`,
//! `osd fsck` (clean, missing store), and a bad size. (Corruption found by
//! fsck is tested on the store itself: `osd/tests/store.rs`.)

#![allow(clippy::unwrap_used)] // Tests: a failed unwrap is a failed test.

use basalt_tests::basalt;

#[test]
fn osd_format_and_fsck_report_clean_stores_and_refuse_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("osd");
    let data = data.to_str().unwrap();
    let out = basalt(&["osd", "format", "--data", data, "--size", "64M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = basalt(&["osd", "fsck", "--data", data, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["block_count"], 16384);
    assert_eq!(report["errors"].as_array().unwrap().len(), 0);

    // Formatting over an existing store is refused.
    let again = basalt(&["osd", "format", "--data", data, "--size", "64M"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("refusing to format"));

    // A directory that is not a store: a clear message, non-zero exit.
    let missing = basalt(&[
        "osd",
        "fsck",
        "--data",
        dir.path().join("nope").to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("not a formatted store"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    // A size that is not a size.
    let bad = basalt(&[
        "osd",
        "format",
        "--data",
        dir.path().join("x").to_str().unwrap(),
        "--size",
        "12Q",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("12Q"));
}
