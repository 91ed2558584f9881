//! Running a profile's `bin/activate`: in its own process group, with a
//! deadline, its output passed on and the tail of its stderr kept for the
//! error message (all through [`process::run_bounded`]).
//!
//! Under systemd (hail runs in a unit: `INVOCATION_ID` is set) activate runs
//! in a transient unit of its own, `hail-activation-PROFILE.service`, through
//! `systemd-run --wait`. An activate script may restart services, hail's own
//! units included (a manager profile does exactly that); stopping
//! `hail@PROFILE.service` then ends hail, not the activation, which finishes
//! in its own cgroup. The next pass sees the activation still marked pending
//! and runs it again (activate scripts are idempotent by contract). The fixed
//! unit name also keeps two activations of one profile from overlapping.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::process::{self, Deadline, Echo};
use crate::profile::ProfileName;
use crate::state;

/// How long systemd gives the transient unit to stop once its time is up
/// (SIGTERM, then SIGKILL).
const UNIT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// What hail allows `systemd-run --wait` beyond the activation's own timeout
/// (the unit stopping): only a backstop for a systemd-run
/// that hangs, since systemd ends the unit itself.
const SYSTEMD_RUN_BACKSTOP: Duration = Duration::from_secs(60);
/// Bound on each question to systemd or the journal.
const SYSTEMD_QUERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub enum Activation {
    /// The profile has no `bin/activate`: nothing to run.
    NoScript,
    Succeeded,
    Failed(ActivationFailure),
}

#[derive(Debug)]
pub struct ActivationFailure {
    /// "exited with status 1", "was killed by signal 9", "timed out after 600 s".
    pub how: String,
    /// The last lines of its stderr, bounded by [`process::quote`].
    pub stderr_tail: Option<String>,
}

/// How activate is started.
#[derive(Debug, Clone)]
pub enum Runner {
    /// A child of hail in its own process group.
    Direct,
    /// A transient systemd unit with this name, via `systemd-run --wait`.
    TransientUnit(String),
}

impl Runner {
    /// A transient unit when hail itself runs under systemd and
    /// `systemd-run` is on PATH; a direct child otherwise.
    pub fn detect(profile: &ProfileName) -> Self {
        let under_systemd = std::env::var_os("INVOCATION_ID").is_some_and(|id| !id.is_empty());
        if under_systemd && on_path("systemd-run") {
            Self::TransientUnit(transient_unit_name(profile))
        } else {
            Self::Direct
        }
    }
}

/// `hail-activation-PROFILE.service`, PROFILE escaped as `systemd-escape` would.
pub fn transient_unit_name(profile: &ProfileName) -> String {
    format!("hail-activation-{}.service", profile.systemd_escaped())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Runs `PROFILE/bin/activate` with working directory `/`, hail's own
/// environment plus `env`, stdin closed; its stdout and stderr pass through
/// to hail's stderr (the journal, under systemd), or go to the transient
/// unit's journal.
pub fn run(
    profile: &Path,
    runner: &Runner,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Activation> {
    run_script(&profile.join("bin/activate"), runner, env, timeout)
}

/// Like [`run`], for another of the profile's scripts (`bin/deactivate`).
pub fn run_script(
    script: &Path,
    runner: &Runner,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Activation> {
    if !script.exists() {
        return Ok(Activation::NoScript);
    }
    let unit = match runner {
        Runner::Direct => {
            let finished =
                process::run_bounded(activate_command(script, env), timeout, Echo::Both)?;
            return Ok(outcome(&finished, Vec::new()));
        }
        Runner::TransientUnit(unit) => unit,
    };
    wait_for_unit(unit, timeout)?;
    let started = state::now();
    let cmd = systemd_run_command(unit, script, env, inherited_env(), timeout);
    // systemd ends the unit at RuntimeMaxSec; hail's deadline is a backstop.
    let finished = process::run_bounded(cmd, timeout + SYSTEMD_RUN_BACKSTOP, Echo::Both)?;
    if finished.ending.success() {
        return Ok(Activation::Succeeded);
    }
    // systemd-run's own lines, if any, then what the script logged.
    Ok(outcome(&finished, journal_tail(unit, started)))
}

/// The activation's outcome from how its process ended, quoting the last
/// lines of its stderr and then `more`.
fn outcome(finished: &process::Finished, more: Vec<String>) -> Activation {
    if finished.ending.success() {
        return Activation::Succeeded;
    }
    Activation::Failed(ActivationFailure {
        how: finished.ending.to_string(),
        stderr_tail: process::quote(finished.stderr.iter().cloned().chain(more)),
    })
}

/// The activate command: `/` as working directory so it never depends on
/// where hail was started, and `env` added to hail's environment. The runner
/// gives it its own process group and closes stdin.
pub fn activate_command(script: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(script);
    cmd.current_dir("/").envs(env.iter().copied());
    cmd
}

/// `systemd-run --wait` for activate in the transient unit `unit`: working
/// directory `/`, hail's environment (`inherit`, by name) plus `env`, and
/// systemd's own timeout, which ends the unit's whole cgroup.
pub fn systemd_run_command(
    unit: &str,
    script: &Path,
    env: &[(&str, &str)],
    inherit: impl IntoIterator<Item = String>,
    timeout: Duration,
) -> Command {
    let mut cmd = Command::new("systemd-run");
    cmd.arg(format!("--unit={unit}"))
        .args([
            "--wait",
            "--collect",
            "--quiet",
            "--service-type=exec",
            "--no-ask-password",
        ])
        .arg("--description=hail activation")
        .arg("--working-directory=/")
        .arg(format!(
            "--property=RuntimeMaxSec={}ms",
            timeout.as_millis()
        ))
        .arg(format!(
            "--property=TimeoutStopSec={}s",
            UNIT_STOP_TIMEOUT.as_secs()
        ))
        .args(inherit.into_iter().map(|name| format!("--setenv={name}")))
        .args(env.iter().map(|(k, v)| format!("--setenv={k}={v}")))
        .arg("--")
        .arg(script);
    cmd
}

/// Waits while an activation started by an earlier, interrupted pass still
/// runs in `unit` (say `hail@PROFILE` was restarted mid-activation): two
/// activations of one profile must not overlap. Its result is gone with it
/// (`--collect`), so the caller then runs activate again, which is
/// idempotent by contract.
fn wait_for_unit(unit: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut announced = false;
    loop {
        let state = process::output(
            systemctl_active_state_command(unit),
            Deadline::new(
                SYSTEMD_QUERY_TIMEOUT,
                "systemd does not answer; look at `systemctl status`",
            ),
        )
        .context("cannot ask systemd about the activation unit")?
        .join("");
        if !matches!(
            state.trim(),
            "active" | "activating" | "deactivating" | "reloading"
        ) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "an earlier activation is still running in {unit} after {} s; \
                 look at `journalctl -u {unit}` or stop it with `systemctl stop {unit}`",
                timeout.as_secs()
            );
        }
        if !announced {
            log::warn!(
                "an earlier activation is still running in {unit}; waiting for it to finish"
            );
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `systemctl show --property=ActiveState --value UNIT`.
fn systemctl_active_state_command(unit: &str) -> Command {
    let mut cmd = Command::new("systemctl");
    cmd.args(["show", "--property=ActiveState", "--value", unit]);
    cmd
}

/// Names of hail's environment variables that activate inherits, less
/// those systemd sets for hail's own unit.
fn inherited_env() -> Vec<String> {
    const UNIT_ONLY: &[&str] = &[
        "INVOCATION_ID",
        "NOTIFY_SOCKET",
        "JOURNAL_STREAM",
        "MAINPID",
        "SYSTEMD_EXEC_PID",
        "MANAGERPID",
        "WATCHDOG_PID",
        "WATCHDOG_USEC",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "TRIGGER_UNIT",
        "TRIGGER_TIMER_REALTIME_USEC",
        "TRIGGER_TIMER_MONOTONIC_USEC",
    ];
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| !UNIT_ONLY.contains(&name.as_str()) && !name.contains('='))
        .collect()
}

/// `journalctl` for the last lines the unit's own processes logged since
/// `since` (Unix time): `_SYSTEMD_UNIT=` matches them only, not PID 1's
/// messages about the unit ("Main process exited…"), which `--unit=` would add.
fn journalctl_command(unit: &str, since: u64) -> Command {
    let mut cmd = Command::new("journalctl");
    cmd.arg(format!("_SYSTEMD_UNIT={unit}"))
        .arg(format!("--since=@{since}"))
        .args(["--output=cat", "--no-pager", "--quiet"])
        .arg(format!("--lines={}", process::QUOTED_LINES));
    cmd
}

/// The last lines activate wrote to its transient unit's journal; none if
/// the journal cannot be read (the failure is reported without them).
fn journal_tail(unit: &str, since: u64) -> Vec<String> {
    let deadline = Deadline::new(
        SYSTEMD_QUERY_TIMEOUT,
        "the journal does not answer; look at `journalctl --verify`",
    );
    process::output(journalctl_command(unit, since), deadline).unwrap_or_else(|err| {
        log::warn!("cannot read the activation's output from the journal: {err:#}");
        Vec::new()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::argv;

    #[test]
    fn transient_unit_names_are_escaped() {
        let name = |p: &str| transient_unit_name(&ProfileName::parse(p).unwrap());
        assert_eq!(name("web"), "hail-activation-web.service");
        assert_eq!(
            name("hail-profiles/web"),
            "hail-activation-hail\\x2dprofiles-web.service"
        );
        assert_eq!(name("a+b.c"), "hail-activation-a\\x2bb.c.service");
        assert_eq!(name(".x"), "hail-activation-\\x2ex.service");
    }

    #[test]
    fn systemd_run_argv() {
        let cmd = systemd_run_command(
            "hail-activation-web.service",
            Path::new("/p/web/bin/activate"),
            &[("HAIL_BUILD_ID", "4"), ("HAIL_PREVIOUS_STORE_PATH", "")],
            ["PATH".to_string()],
            Duration::from_secs(600),
        );
        assert_eq!(
            argv(&cmd),
            [
                "systemd-run",
                "--unit=hail-activation-web.service",
                "--wait",
                "--collect",
                "--quiet",
                "--service-type=exec",
                "--no-ask-password",
                "--description=hail activation",
                "--working-directory=/",
                "--property=RuntimeMaxSec=600000ms",
                "--property=TimeoutStopSec=15s",
                "--setenv=PATH",
                "--setenv=HAIL_BUILD_ID=4",
                "--setenv=HAIL_PREVIOUS_STORE_PATH=",
                "--",
                "/p/web/bin/activate",
            ]
        );
    }

    #[test]
    fn journalctl_argv_matches_the_units_own_lines() {
        assert_eq!(
            argv(&journalctl_command(
                "hail-activation-web.service",
                1700000000
            )),
            [
                "journalctl",
                "_SYSTEMD_UNIT=hail-activation-web.service",
                "--since=@1700000000",
                "--output=cat",
                "--no-pager",
                "--quiet",
                "--lines=20",
            ]
        );
    }

    #[test]
    fn systemctl_argv() {
        assert_eq!(
            argv(&systemctl_active_state_command("u.service")),
            [
                "systemctl",
                "show",
                "--property=ActiveState",
                "--value",
                "u.service"
            ]
        );
    }

    /// Runs activate, retrying while another test's fork still holds the
    /// freshly written script open for writing (ETXTBSY).
    fn run_fresh(profile: &Path, env: &[(&str, &str)], timeout: Duration) -> Activation {
        for _ in 0..100 {
            match run(profile, &Runner::Direct, env, timeout) {
                Err(err) if format!("{err:#}").contains("Text file busy") => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other.unwrap(),
            }
        }
        panic!("the script stayed busy");
    }

    fn write_activate(profile: &Path, script: &str) {
        let bin = profile.join("bin");
        std::fs::create_dir(&bin).unwrap();
        let activate = bin.join("activate");
        std::fs::write(&activate, script).unwrap();
        std::fs::set_permissions(
            &activate,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
    }

    #[test]
    fn direct_activation_reports_failure_with_stderr() {
        let dir = tempfile::tempdir().unwrap();
        write_activate(
            dir.path(),
            "#!/bin/sh\necho \"cwd=$(pwd) x=$X\" >&2\nexit 3\n",
        );
        let outcome = run_fresh(dir.path(), &[("X", "y")], Duration::from_secs(10));
        match outcome {
            Activation::Failed(failure) => {
                assert_eq!(failure.how, "exited with status 3");
                assert_eq!(failure.stderr_tail.as_deref(), Some("cwd=/ x=y"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn direct_activation_times_out_and_ends_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        write_activate(
            dir.path(),
            &format!(
                "#!/bin/sh\n(sleep 2; touch {}) &\nsleep 30\n",
                marker.display()
            ),
        );
        let outcome = run_fresh(dir.path(), &[], Duration::from_millis(300));
        assert!(
            matches!(&outcome, Activation::Failed(f) if f.how.starts_with("timed out")),
            "{outcome:?}"
        );
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !marker.exists(),
            "a process activate started outlived the timeout"
        );
    }

    #[test]
    fn a_missing_script_is_no_script() {
        let dir = tempfile::tempdir().unwrap();
        let outcome = run(dir.path(), &Runner::Direct, &[], Duration::from_secs(1)).unwrap();
        assert!(matches!(outcome, Activation::NoScript), "{outcome:?}");
    }
}
