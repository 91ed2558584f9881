//! Running a profile's `bin/activate`: in its own process group, with a
//! deadline, its output passed on and the tail of its stderr kept for the
//! error message (all through [`process::run_bounded`]).
//!
//! Under systemd (hail runs in a unit: `INVOCATION_ID` is set) activate runs
//! in a transient unit of its own, `hail-activation-PROFILE.service`, through
//! `systemd-run --wait`. An activate script may restart services, hail's own
//! units included (a manager profile does exactly that); stopping
//! `hail@PROFILE.service` then ends hail, not the activation, which finishes
//! in its own cgroup. When it ends, the unit's `ExecStopPost=` runs
//! `hail activation-finished`, which records how it went in the state dir, so
//! that the next pass can learn the outcome ([`earlier_activation`]) instead
//! of running activate again. The fixed unit name also keeps two activations
//! of one profile from overlapping.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::process::{self, Deadline, Echo};
use crate::profile::{self, ProfileName};
use crate::state::{self, StateDir};
use crate::store_path::{StoreDir, StorePath};

/// How long systemd gives the transient unit to stop once its time is up
/// (SIGTERM, then SIGKILL), and its `ExecStopPost=` to record the outcome.
const UNIT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// What hail allows `systemd-run --wait` beyond the activation's own timeout
/// (the unit stopping, then recording): only a backstop for a systemd-run
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

impl ActivationFailure {
    /// Its stderr's last lines, to end an error message with (or nothing).
    pub fn quoted_stderr(&self) -> String {
        self.stderr_tail
            .as_deref()
            .map(|tail| format!("\nlast lines of its stderr:\n{tail}"))
            .unwrap_or_default()
    }
}

/// How activate is started.
#[derive(Debug, Clone)]
pub enum Runner {
    /// A child of hail in its own process group.
    Direct,
    /// A transient systemd unit, via `systemd-run --wait`.
    TransientUnit(TransientUnit),
}

#[derive(Debug, Clone)]
pub struct TransientUnit {
    /// `hail-activation-PROFILE.service`.
    pub name: String,
    /// `None` if hail cannot name its own executable for `ExecStopPost=`:
    /// activations then leave no record.
    recorder: Option<Recorder>,
}

/// What `ExecStopPost=` needs to record an activation's outcome.
#[derive(Debug, Clone)]
struct Recorder {
    hail: PathBuf,
    state_dir: StateDir,
    profile: ProfileName,
    store: StoreDir,
}

impl Runner {
    /// A transient unit when hail itself runs under systemd and
    /// `systemd-run` is on PATH; a direct child otherwise.
    pub fn detect(profile: &ProfileName, state_dir: &StateDir, store: &StoreDir) -> Self {
        let under_systemd = std::env::var_os("INVOCATION_ID").is_some_and(|id| !id.is_empty());
        if !(under_systemd && on_path("systemd-run")) {
            return Self::Direct;
        }
        let recorder = std::env::current_exe().ok().map(|hail| Recorder {
            hail,
            state_dir: state_dir.clone(),
            profile: profile.clone(),
            store: store.clone(),
        });
        Self::TransientUnit(TransientUnit {
            name: transient_unit_name(profile),
            recorder,
        })
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
/// unit's journal. In a transient unit, the outcome is recorded for the
/// store path the profile points to (see [`earlier_activation`]); an earlier
/// record is forgotten first.
pub fn run(
    profile: &Path,
    runner: &Runner,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Activation> {
    execute(
        &profile.join("bin/activate"),
        &[],
        Some(profile),
        runner,
        env,
        timeout,
    )
}

/// The activation of a NixOS system: `SYSTEM/bin/switch-to-configuration
/// OPERATION` (`switch`, `boot`), run as [`run`] runs activate (the same
/// environment, deadline, process group or transient unit), its outcome
/// recorded for the system `profile` points to. A switch may restart any
/// unit, hail's own included: the transient unit is what lets it finish.
pub fn run_switch(
    profile: &Path,
    system: &StorePath,
    operation: &str,
    runner: &Runner,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Activation> {
    execute(
        &system.as_path().join("bin/switch-to-configuration"),
        &[operation],
        Some(profile),
        runner,
        env,
        timeout,
    )
}

/// Like [`run`], for another of the profile's scripts (`bin/deactivate`),
/// whose outcome is not recorded.
pub fn run_script(
    script: &Path,
    runner: &Runner,
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<Activation> {
    execute(script, &[], None, runner, env, timeout)
}

/// Runs `script ARGS…`; under a transient unit with a recorder, records its
/// outcome for the store path behind `recorded_profile`, if given.
fn execute(
    script: &Path,
    args: &[&str],
    recorded_profile: Option<&Path>,
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
                process::run_bounded(activate_command(script, args, env), timeout, Echo::Both)?;
            return Ok(outcome(&finished, Vec::new()));
        }
        Runner::TransientUnit(unit) => unit,
    };
    wait_for_unit(&unit.name, timeout)?;
    let recording = match (&unit.recorder, recorded_profile) {
        (Some(recorder), Some(profile)) => {
            let store_path =
                profile::store_path_behind(profile, &recorder.store).unwrap_or_else(|err| {
                    log::warn!("{err:#}; this activation leaves no record");
                    None
                });
            forget_activation(&recorder.state_dir, &recorder.profile)?;
            store_path.and_then(|path| {
                let stop_post = recorder.stop_post(&path, timeout)?;
                Some((recorder, path, stop_post))
            })
        }
        _ => None,
    };
    let started = state::now();
    let cmd = systemd_run_command(
        &unit.name,
        script,
        args,
        env,
        inherited_env(),
        timeout,
        recording
            .as_ref()
            .map(|(_, _, stop_post)| stop_post.as_str()),
    );
    // systemd ends the unit at RuntimeMaxSec; hail's deadline is a backstop.
    let finished = process::run_bounded(cmd, timeout + SYSTEMD_RUN_BACKSTOP, Echo::Both)?;
    let record = recording.and_then(|(recorder, path, _)| {
        read_record(&recorder.state_dir, &recorder.profile)
            .filter(|record| record.store_path == path.as_str())
    });
    Ok(match record {
        // The unit's own account: its result, and its own lines in the journal.
        Some(record) => record.outcome(&unit.name),
        // No record (the unit never started, or nothing to record it with):
        // systemd-run's account, and whatever the unit logged since.
        None if finished.ending.success() => Activation::Succeeded,
        None => outcome(
            &finished,
            journal_tail(&unit.name, JournalRun::Since(started)),
        ),
    })
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

/// The activate command, `script ARGS…`: `/` as working directory so it
/// never depends on where hail was started, and `env` added to hail's
/// environment. The runner gives it its own process group and closes stdin.
pub fn activate_command(script: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(script);
    cmd.args(args).current_dir("/").envs(env.iter().copied());
    cmd
}

/// `systemd-run --wait` for activate in the transient unit `unit`: working
/// directory `/`, hail's environment (`inherit`, by name) plus `env`, and
/// systemd's own timeout, which ends the unit's whole cgroup. `stop_post`,
/// if given, runs when the unit has ended, however it ended.
pub fn systemd_run_command(
    unit: &str,
    script: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    inherit: impl IntoIterator<Item = String>,
    timeout: Duration,
    stop_post: Option<&str>,
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
        .args(stop_post.map(|line| format!("--property=ExecStopPost={line}")))
        .args(inherit.into_iter().map(|name| format!("--setenv={name}")))
        .args(env.iter().map(|(k, v)| format!("--setenv={k}={v}")))
        .arg("--")
        .arg(script)
        .args(args);
    cmd
}

/// Waits while an activation started by an earlier, interrupted pass still
/// runs in `unit` (say `hail@PROFILE` was restarted mid-activation): two
/// activations of one profile must not overlap.
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

/// Names of hail's environment variables that an activation in a transient
/// unit inherits: an allow-list, because a transient unit's environment is
/// readable by every local user (`systemctl show -p Environment`), while
/// hail's may hold secrets (an `EnvironmentFile=` with `NIX_CONFIG` access
/// tokens). hail's own settings (`HAIL_*`), the search path and the locale.
fn inherited_env() -> Vec<String> {
    std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .filter(|name| inherited(name))
        .collect()
}

fn inherited(name: &str) -> bool {
    const NAMES: &[&str] = &["PATH", "LANG", "LANGUAGE", "TZ", "TZDIR", "LOCALE_ARCHIVE"];
    NAMES.contains(&name) || name.starts_with("LC_") || name.starts_with("HAIL_")
}

/// Which run of a unit to read from the journal.
#[derive(Debug, Clone, Copy)]
enum JournalRun<'a> {
    /// The run with this invocation ID.
    Invocation(&'a str),
    /// Whatever ran since this Unix time.
    Since(u64),
}

/// `journalctl` for the last lines the unit's own processes logged in one
/// run: `_SYSTEMD_UNIT=` matches them only, not PID 1's messages about the
/// unit ("Main process exited…"), which `--unit=` would add.
fn journalctl_command(unit: &str, run: JournalRun<'_>) -> Command {
    let mut cmd = Command::new("journalctl");
    cmd.arg(format!("_SYSTEMD_UNIT={unit}"));
    match run {
        JournalRun::Invocation(id) => cmd.arg(format!("_SYSTEMD_INVOCATION_ID={id}")),
        JournalRun::Since(at) => cmd.arg(format!("--since=@{at}")),
    };
    cmd.args(["--output=cat", "--no-pager", "--quiet"])
        .arg(format!("--lines={}", process::QUOTED_LINES));
    cmd
}

/// The last lines activate wrote to its transient unit's journal; none if
/// the journal cannot be read (the failure is reported without them).
fn journal_tail(unit: &str, run: JournalRun<'_>) -> Vec<String> {
    let deadline = Deadline::new(
        SYSTEMD_QUERY_TIMEOUT,
        "the journal does not answer; look at `journalctl --verify`",
    );
    process::output(journalctl_command(unit, run), deadline).unwrap_or_else(|err| {
        log::warn!("cannot read the activation's output from the journal: {err:#}");
        Vec::new()
    })
}

/// How an activation in a transient unit ended, as its `ExecStopPost=`
/// wrote it down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct ActivationRecord {
    store_path: String,
    result: RecordedResult,
    /// "exited with status 1", "timed out after 600 s", …
    how: String,
    finished_at: u64,
    /// The unit's run, for its lines in the journal.
    #[serde(default)]
    invocation_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RecordedResult {
    Success,
    Failed,
}

impl ActivationRecord {
    fn outcome(self, unit: &str) -> Activation {
        match self.result {
            RecordedResult::Success => Activation::Succeeded,
            RecordedResult::Failed => {
                // Without the invocation ID, the journal cannot say which
                // lines are this run's: quote none rather than wrong ones.
                let lines = self
                    .invocation_id
                    .as_deref()
                    .map(|id| journal_tail(unit, JournalRun::Invocation(id)))
                    .unwrap_or_default();
                Activation::Failed(ActivationFailure {
                    how: self.how,
                    stderr_tail: process::quote(lines),
                })
            }
        }
    }
}

/// An activation that ran in the transient unit while no pass waited for it
/// (hail was stopped or restarted during it), as the unit recorded it.
#[derive(Debug)]
pub struct EarlierActivation {
    pub finished_at: u64,
    /// `Succeeded`, or `Failed` with how and the script's last lines.
    pub outcome: Activation,
}

/// What became of an earlier activation of `store_path` that this pass did
/// not see end: waits (at most `timeout`) while it still runs, then returns
/// what its unit recorded; `None` if there is no record for `store_path`
/// (it never ran in a transient unit, or did not get to record), and always
/// for the direct runner.
pub fn earlier_activation(
    runner: &Runner,
    state_dir: &StateDir,
    profile: &ProfileName,
    store_path: &StorePath,
    timeout: Duration,
) -> Result<Option<EarlierActivation>> {
    let Runner::TransientUnit(unit) = runner else {
        return Ok(None);
    };
    wait_for_unit(&unit.name, timeout)?;
    Ok(read_record(state_dir, profile)
        .filter(|record| record.store_path == store_path.as_str())
        .map(|record| EarlierActivation {
            finished_at: record.finished_at,
            outcome: record.outcome(&unit.name),
        }))
}

/// `STATE_DIR/PROFILE.activation`: not `.json`, which would make it look
/// like the state file of a profile named `PROFILE.activation`.
fn record_file(state_dir: &StateDir, profile: &ProfileName) -> PathBuf {
    state_dir
        .path()
        .join(format!("{}.activation", profile.file_stem()))
}

/// Forgets the record of the profile's last activation (done before each new
/// one, so a record always describes the latest).
pub fn forget_activation(state_dir: &StateDir, profile: &ProfileName) -> Result<()> {
    state::remove_if_exists(&record_file(state_dir, profile))
}

/// The profile's activation record; `None` if there is none, or (reported)
/// if it cannot be read.
fn read_record(state_dir: &StateDir, profile: &ProfileName) -> Option<ActivationRecord> {
    let path = record_file(state_dir, profile);
    let text = match state::read_own_file(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return None,
        Err(err) => {
            log::warn!("cannot read {} ({err}); ignoring it", path.display());
            return None;
        }
    };
    match serde_json::from_slice::<ActivationRecord>(&text) {
        Ok(mut record) => {
            // It becomes a journalctl match: only what systemd would write.
            record.invocation_id = record
                .invocation_id
                .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()));
            Some(record)
        }
        Err(err) => {
            log::warn!("{} is corrupt ({err}); ignoring it", path.display());
            None
        }
    }
}

impl Recorder {
    /// `ExecStopPost=` for the transient unit: `hail activation-finished`
    /// for `store_path`. `None` if a path in it cannot be passed to systemd
    /// verbatim (it would expand `$` and `%`): that activation leaves no record.
    fn stop_post(&self, store_path: &StorePath, timeout: Duration) -> Option<String> {
        let args = [
            self.hail.to_str()?,
            "activation-finished",
            "--state-dir",
            self.state_dir.path().to_str()?,
            "--profile",
            self.profile.as_str(),
            "--store-path",
            store_path.as_str(),
            "--timeout",
            &timeout.as_secs_f64().to_string(),
        ];
        let verbatim = |arg: &&str| !arg.chars().any(|c| c.is_control() || "\"\\$%".contains(c));
        args.iter()
            .all(verbatim)
            .then(|| args.map(|arg| format!("\"{arg}\"")).join(" "))
    }
}

/// `hail activation-finished`, the transient unit's `ExecStopPost=`: writes
/// down how the activation of `store_path` ended, from what systemd tells
/// it in `$SERVICE_RESULT`, `$EXIT_CODE` and `$EXIT_STATUS`.
pub fn record_finished(
    state_dir: &StateDir,
    profile: &ProfileName,
    store_path: &StorePath,
    timeout: Duration,
) -> Result<()> {
    let var = |name| std::env::var(name).unwrap_or_default();
    let (result, how) = how_it_ended(
        &var("SERVICE_RESULT"),
        &var("EXIT_CODE"),
        &var("EXIT_STATUS"),
        timeout,
    );
    let record = ActivationRecord {
        store_path: store_path.to_string(),
        result,
        how,
        finished_at: state::now(),
        invocation_id: std::env::var("INVOCATION_ID").ok(),
    };
    let json = serde_json::to_vec_pretty(&record).context("cannot serialise the record")?;
    state::write_atomically(&record_file(state_dir, profile), &json)
}

/// The outcome systemd reports to `ExecStopPost=` (systemd.exec(5), "$SERVICE_RESULT").
fn how_it_ended(
    service_result: &str,
    exit_code: &str,
    exit_status: &str,
    timeout: Duration,
) -> (RecordedResult, String) {
    let how = match (service_result, exit_code) {
        ("timeout", _) => process::Ending::TimedOut(timeout).to_string(),
        (_, "exited") => format!("exited with status {exit_status}"),
        (_, "killed" | "dumped") => format!("was killed by signal SIG{exit_status}"),
        ("", _) => "ended without saying how (no $SERVICE_RESULT)".into(),
        (result, _) => format!("failed ({result})"),
    };
    let result = if service_result == "success" {
        RecordedResult::Success
    } else {
        RecordedResult::Failed
    };
    (result, how)
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

    const STORE_PATH: &str = "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello";

    fn recorder(hail: &str, state_dir: &str) -> Recorder {
        Recorder {
            hail: hail.into(),
            state_dir: StateDir::new(state_dir),
            profile: ProfileName::parse("hail-profiles/web").unwrap(),
            store: StoreDir::new("/nix/store"),
        }
    }

    fn store_path() -> StorePath {
        StoreDir::new("/nix/store").parse(STORE_PATH).unwrap()
    }

    #[test]
    fn activations_in_a_unit_inherit_no_secrets() {
        for name in ["PATH", "LANG", "LC_ALL", "HAIL_PROFILES_DIR", "TZ"] {
            assert!(inherited(name), "{name}");
        }
        for name in [
            "NIX_CONFIG",
            "AWS_SECRET_ACCESS_KEY",
            "INVOCATION_ID",
            "NOTIFY_SOCKET",
            "CREDENTIALS_DIRECTORY",
        ] {
            assert!(!inherited(name), "{name}");
        }
    }

    #[test]
    fn systemd_run_argv() {
        let recorder = recorder("/nix/store/abc-hail/bin/hail", "/var/lib/hail");
        let stop_post = recorder
            .stop_post(&store_path(), Duration::from_millis(1500))
            .unwrap();
        let cmd = systemd_run_command(
            "hail-activation-web.service",
            Path::new("/p/web/bin/activate"),
            &[],
            &[("HAIL_BUILD_ID", "4"), ("HAIL_PREVIOUS_STORE_PATH", "")],
            ["PATH".to_string()],
            Duration::from_secs(600),
            Some(&stop_post),
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
                "--property=ExecStopPost=\"/nix/store/abc-hail/bin/hail\" \"activation-finished\" \
                 \"--state-dir\" \"/var/lib/hail\" \"--profile\" \"hail-profiles/web\" \
                 \"--store-path\" \"/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello\" \
                 \"--timeout\" \"1.5\"",
                "--setenv=PATH",
                "--setenv=HAIL_BUILD_ID=4",
                "--setenv=HAIL_PREVIOUS_STORE_PATH=",
                "--",
                "/p/web/bin/activate",
            ]
        );
        let without = systemd_run_command(
            "u.service",
            Path::new("/s"),
            &[],
            &[],
            [],
            Duration::from_secs(1),
            None,
        );
        assert!(!argv(&without).iter().any(|a| a.contains("ExecStopPost")));
    }

    #[test]
    fn a_switch_runs_the_systems_own_script_with_its_operation() {
        let script = store_path().as_path().join("bin/switch-to-configuration");
        let env = [("HAIL_PROFILE", "system")];
        let direct = activate_command(&script, &["boot"], &env);
        assert_eq!(
            argv(&direct),
            [
                format!("{STORE_PATH}/bin/switch-to-configuration"),
                "boot".into()
            ]
        );
        assert_eq!(direct.get_current_dir(), Some(Path::new("/")));
        let unit = systemd_run_command(
            "hail-activation-system.service",
            &script,
            &["switch"],
            &env,
            [],
            Duration::from_secs(600),
            None,
        );
        assert_eq!(
            argv(&unit)[argv(&unit).len() - 4..],
            [
                "--setenv=HAIL_PROFILE=system".to_owned(),
                "--".into(),
                format!("{STORE_PATH}/bin/switch-to-configuration"),
                "switch".into(),
            ]
        );
    }

    #[test]
    fn stop_post_refuses_what_systemd_would_expand() {
        for state_dir in [
            "/var/lib/$HOME",
            "/var/lib/%i",
            "/var/\"lib",
            "/var/lib\\x",
            "/a\nb",
        ] {
            assert_eq!(
                recorder("/bin/hail", state_dir).stop_post(&store_path(), Duration::from_secs(1)),
                None,
                "{state_dir:?}"
            );
        }
        let spaced = recorder("/opt/my hail/hail", "/var/lib/hail")
            .stop_post(&store_path(), Duration::from_secs(1))
            .unwrap();
        assert!(spaced.starts_with("\"/opt/my hail/hail\" "), "{spaced}");
    }

    #[test]
    fn journalctl_argv_matches_the_units_own_lines() {
        assert_eq!(
            argv(&journalctl_command(
                "hail-activation-web.service",
                JournalRun::Invocation("0123456789abcdef0123456789abcdef")
            )),
            [
                "journalctl",
                "_SYSTEMD_UNIT=hail-activation-web.service",
                "_SYSTEMD_INVOCATION_ID=0123456789abcdef0123456789abcdef",
                "--output=cat",
                "--no-pager",
                "--quiet",
                "--lines=20",
            ]
        );
        assert_eq!(
            argv(&journalctl_command(
                "u.service",
                JournalRun::Since(1700000000)
            ))[1..3],
            ["_SYSTEMD_UNIT=u.service", "--since=@1700000000"]
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

    #[test]
    fn how_systemd_says_it_ended() {
        let ended = |r, c, s| how_it_ended(r, c, s, Duration::from_secs(600));
        assert_eq!(
            ended("success", "exited", "0"),
            (RecordedResult::Success, "exited with status 0".into())
        );
        assert_eq!(
            ended("exit-code", "exited", "3"),
            (RecordedResult::Failed, "exited with status 3".into())
        );
        assert_eq!(
            ended("signal", "killed", "KILL"),
            (
                RecordedResult::Failed,
                "was killed by signal SIGKILL".into()
            )
        );
        assert_eq!(
            ended("timeout", "killed", "TERM"),
            (RecordedResult::Failed, "timed out after 600 s".into())
        );
        assert_eq!(
            ended("oom-kill", "", ""),
            (RecordedResult::Failed, "failed (oom-kill)".into())
        );
        assert_eq!(ended("", "", "").0, RecordedResult::Failed);
    }

    #[test]
    fn records_are_read_back_for_their_store_path() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::new(dir.path());
        let profile = ProfileName::parse("hail-profiles/web").unwrap();
        assert_eq!(read_record(&state_dir, &profile), None);

        std::fs::write(
            dir.path().join("hail-profiles%2Fweb.activation"),
            format!(
                r#"{{"store_path": "{STORE_PATH}", "result": "failed", "how": "exited with status 3",
                    "finished_at": 1700000000, "invocation_id": "not hex; --since=x"}}"#
            ),
        )
        .unwrap();
        assert_eq!(
            read_record(&state_dir, &profile),
            Some(ActivationRecord {
                store_path: STORE_PATH.into(),
                result: RecordedResult::Failed,
                how: "exited with status 3".into(),
                finished_at: 1700000000,
                invocation_id: None,
            })
        );

        // What `hail activation-finished` writes reads back as written.
        let record = ActivationRecord {
            store_path: STORE_PATH.into(),
            result: RecordedResult::Success,
            how: "exited with status 0".into(),
            finished_at: 1,
            invocation_id: Some("0123456789abcdef0123456789abcdef".into()),
        };
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""result":"success""#), "{json}");
        std::fs::write(record_file(&state_dir, &profile), json).unwrap();
        assert_eq!(read_record(&state_dir, &profile), Some(record));

        forget_activation(&state_dir, &profile).unwrap();
        assert_eq!(read_record(&state_dir, &profile), None);
        forget_activation(&state_dir, &profile).unwrap();

        std::fs::write(record_file(&state_dir, &profile), "{\"store_path\": 1").unwrap();
        assert_eq!(read_record(&state_dir, &profile), None);
    }

    #[test]
    fn direct_runner_has_no_earlier_activation() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = earlier_activation(
            &Runner::Direct,
            &StateDir::new(dir.path()),
            &ProfileName::parse("web").unwrap(),
            &store_path(),
            Duration::from_secs(1),
        )
        .unwrap();
        assert!(earlier.is_none());
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
