//! Running a profile's `bin/activate`: in its own process group, with a
//! deadline, and with the tail of its stderr kept for the error message.
//!
//! Under systemd (hail runs in a unit: `INVOCATION_ID` is set) activate runs
//! in a transient unit of its own, `hail-activation-PROFILE.service`, through
//! `systemd-run --wait`. An activate script may restart services, hail's own
//! units included (a manager profile does exactly that); stopping
//! `hail@PROFILE.service` then ends hail, not the activation, which finishes
//! in its own cgroup. The next pass sees the activation still marked pending
//! and runs it again (activate scripts are idempotent by contract). The fixed
//! unit name also keeps two activations of one profile from overlapping.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::process;
use crate::profile::ProfileName;

/// Lines of activate's stderr quoted when it fails.
const STDERR_TAIL_LINES: usize = 10;
/// After SIGTERM, how long activate's process group may take to go.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After activate exits, how long its output may take to drain. A daemon it
/// started in the background can hold the pipes open forever; we do not wait
/// for that.
const DRAIN: Duration = Duration::from_millis(500);

type Tail = Arc<Mutex<VecDeque<String>>>;

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
    pub stderr_tail: Option<String>,
}

/// How activate is started.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    let script = script.to_path_buf();
    if !script.exists() {
        return Ok(Activation::NoScript);
    }
    let (mut cmd, deadline) = match runner {
        Runner::Direct => (activate_command(&script, env), timeout),
        // systemd enforces the timeout on the unit (RuntimeMaxSec); hail's own
        // deadline is only a backstop for a systemd-run that hangs.
        Runner::TransientUnit(unit) => {
            wait_for_unit(unit, timeout)?;
            (
                systemd_run_command(unit, &script, env, inherited_env(), timeout),
                timeout + KILL_GRACE * 6,
            )
        }
    };
    let started = crate::state::now();
    let shown = process::display(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
    let pid = child.id();

    let tail = Tail::default();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(std::thread::spawn(move || forward(out, None)));
    }
    if let Some(err) = child.stderr.take() {
        let tail = Arc::clone(&tail);
        readers.push(std::thread::spawn(move || forward(err, Some(tail))));
    }

    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let (status, timed_out): (std::io::Result<ExitStatus>, bool) = match done.recv_timeout(deadline)
    {
        Ok(status) => (status, false),
        Err(_) => {
            log::warn!(
                "{shown} did not finish within {} s; ending its process group",
                deadline.as_secs()
            );
            kill_group(pid, rustix::process::Signal::TERM);
            let status = match done.recv_timeout(KILL_GRACE) {
                Ok(status) => status,
                Err(_) => {
                    kill_group(pid, rustix::process::Signal::KILL);
                    done.recv()
                        .unwrap_or_else(|_| Err(std::io::Error::other("waiter vanished")))
                }
            };
            (status, true)
        }
    };
    // Whatever activate left behind in its group must not outlive a timeout.
    if timed_out {
        kill_group(pid, rustix::process::Signal::KILL);
    }
    let status = status.with_context(|| format!("cannot wait for {shown}"))?;
    drain(readers);
    let tail: Vec<String> = tail
        .lock()
        .map(|lines| lines.iter().cloned().collect())
        .unwrap_or_default();

    if status.success() && !timed_out {
        return Ok(Activation::Succeeded);
    }
    let mut tail = tail;
    if let Runner::TransientUnit(unit) = runner {
        tail.extend(journal_tail(unit, started));
    }
    let how = if timed_out {
        format!("timed out after {} s", timeout.as_secs())
    } else {
        process::describe(status)
    };
    Ok(Activation::Failed(ActivationFailure {
        how,
        stderr_tail: (!tail.is_empty()).then(|| tail.join("\n")),
    }))
}

/// The activate command: its own process group so a timeout can end
/// everything it started, and `/` as working directory so it never depends
/// on where hail was started.
pub fn activate_command(script: &Path, env: &[(&str, &str)]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(script);
    cmd.current_dir("/")
        .envs(env.iter().copied())
        // Only hail itself reports to systemd.
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
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
    cmd.env_remove("NOTIFY_SOCKET");
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
        .args(inherit.into_iter().map(|name| format!("--setenv={name}")))
        .args(env.iter().map(|(k, v)| format!("--setenv={k}={v}")))
        .arg("--")
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
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
        let output = Command::new("systemctl")
            .args(["show", "--property=ActiveState", "--value", unit])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .context("cannot ask systemd about the activation unit")?;
        let state = String::from_utf8_lossy(&output.stdout).trim().to_owned();
        if !matches!(
            state.as_str(),
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

/// The last lines activate wrote to its transient unit's journal.
fn journal_tail(unit: &str, since: u64) -> Vec<String> {
    let output = Command::new("journalctl")
        .arg(format!("--unit={unit}"))
        .arg(format!("--since=@{since}"))
        .args(["--output=cat", "--no-pager", "--quiet"])
        .arg(format!("--lines={STDERR_TAIL_LINES}"))
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output();
    match output {
        Ok(out) => String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Copies a child's output to our stderr line by line, keeping the last
/// lines in `tail` if given.
fn forward(from: impl std::io::Read, tail: Option<Tail>) {
    let mut stderr = std::io::stderr();
    for line in BufReader::new(from).split(b'\n').map_while(Result::ok) {
        let _ = stderr.write_all(&line);
        let _ = stderr.write_all(b"\n");
        if let Some(Ok(mut tail)) = tail.as_ref().map(|t| t.lock()) {
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(String::from_utf8_lossy(&line).into_owned());
        }
    }
}

/// Waits briefly for the output readers; abandons those whose pipe a
/// background process still holds.
fn drain(readers: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + DRAIN;
    for reader in readers {
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn kill_group(pid: u32, signal: rustix::process::Signal) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // The group may already be gone; that is what we wanted.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
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
                "--setenv=PATH",
                "--setenv=HAIL_BUILD_ID=4",
                "--setenv=HAIL_PREVIOUS_STORE_PATH=",
                "--",
                "/p/web/bin/activate",
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

    #[test]
    fn direct_activation_reports_failure_with_stderr() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let script = bin.join("activate");
        std::fs::write(&script, "#!/bin/sh\necho \"cwd=$(pwd) x=$X\" >&2\nexit 3\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
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
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let script = bin.join("activate");
        let marker = dir.path().join("survived");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n(sleep 2; touch {}) &\nsleep 30\n",
                marker.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
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
}
