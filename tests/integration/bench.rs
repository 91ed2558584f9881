//! The benchmark scripts still work: `bench/run`'s quick mode (one repetition,
//! no warm-up; issue #7) and `bench/fleet`'s (10 hosts, a short period; issue
//! #13) run against this build of hail and write reports with every section. No
//! time is asserted: the numbers of a quick run mean nothing, and the machine
//! running the tests is busy.

use std::path::Path;
use std::process::Command;

use crate::common::{assert_exit, run_bounded};

#[test]
fn quick_mode_runs() {
    let out = tempfile::Builder::new()
        .prefix("hail-bench-test-")
        .tempdir()
        .expect("temp dir");
    let results = out.path().join("results.md");
    let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/run"));
    cmd.args(["--quick", "--hail", env!("CARGO_BIN_EXE_hail"), "--out"])
        .arg(&results)
        .env("TMPDIR", out.path());
    let run = run_bounded(cmd);
    assert_exit(&run, 0);

    let report = std::fs::read_to_string(&results).expect("bench/run wrote its results file");
    for expected in [
        "Quick mode",
        "## 1. No-change pass",
        "| hail --oneshot (no change) |",
        "| floor: one curl of JOB/latest |",
        "| baseline: curl + jq + readlink |",
        "## 2. Deploy pass",
        "| hail --oneshot (deploy) |",
        "| by hand: nix-env --set + activate |",
        "## 3. Many instances: 100 profiles on one host",
        "| requests / hour |",
        "## 4. Binary size and start-up",
        "| hail --version |",
    ] {
        assert!(
            report.contains(expected),
            "{expected:?} missing from {}:\n{report}",
            results.display()
        );
    }
    // bench/run cleans up after itself: nothing but the results is left.
    let left: Vec<_> = std::fs::read_dir(out.path())
        .expect("temp dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["results.md"], "bench/run left files behind");
}

#[test]
fn fleet_quick_mode_runs() {
    let out = tempfile::Builder::new()
        .prefix("hail-fleet-test-")
        .tempdir()
        .expect("temp dir");
    let results = out.path().join("fleet.md");
    let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/fleet"));
    cmd.args(["--quick", "--hail", env!("CARGO_BIN_EXE_hail"), "--out"])
        .arg(&results)
        .env("TMPDIR", out.path());
    let run = run_bounded(cmd);
    assert_exit(&run, 0);

    let report = std::fs::read_to_string(&results).expect("bench/fleet wrote its results file");
    for expected in [
        "Quick mode",
        "### No-change pass",
        "| Direct | 1 | HEAD 302 |",
        "| Behind the front | 1 | HEAD 302 (HIT) |",
        "### Measured: 10 hosts",
        "| Direct | 10/10 |",
        "| Behind the front | 10/10 |",
        "### Extrapolated: 1,000 and 10,000 hosts",
    ] {
        assert!(
            report.contains(expected),
            "{expected:?} missing from {}:\n{report}",
            results.display()
        );
    }
    assert!(!report.contains("**Failures**"), "{report}");
    let left: Vec<_> = std::fs::read_dir(out.path())
        .expect("temp dir")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left, ["fleet.md"], "bench/fleet left files behind");
}
