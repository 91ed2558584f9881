//! Shared test helpers: a world with a Hydra stand-in, a signed binary cache,
//! temporary profiles and state dirs, and the real hail binary.

#![allow(dead_code)] // Not every test module uses every helper.

pub mod cache;
pub mod container;
pub mod hydra;
pub mod nginx;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use cache::Cache;
use hydra::Hydra;
use tempfile::TempDir;

/// No hail run in a test may take longer than this.
const RUN_LIMIT: Duration = Duration::from_secs(120);

pub const PROFILE: &str = "web";
pub const JOB: &str = "agent";

/// An activate script that records what it saw, one line per run.
pub fn recording_activate(label: &str, extra: &str) -> String {
    format!(
        "#!/bin/sh\n\
         echo \"label={label} build=$HAIL_BUILD_ID store=$HAIL_STORE_PATH previous=$HAIL_PREVIOUS_STORE_PATH profile=$HAIL_PROFILE cwd=$(pwd)\" >> \"$HAIL_TEST_RECORD\"\n\
         {extra}\n"
    )
}

pub struct World {
    pub tmp: TempDir,
    pub hydra: Hydra,
    pub cache: Cache,
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Debug for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Run {
    /// Standard output without surrounding white space.
    pub fn out(&self) -> String {
        self.stdout.trim().to_owned()
    }

    /// Standard error from hail's `error:` line on (what it printed before,
    /// such as activate's own output, left out).
    pub fn error(&self) -> String {
        self.stderr
            .lines()
            .skip_while(|l| !l.contains("error:"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl From<Output> for Run {
    fn from(output: Output) -> Self {
        Self {
            code: output.status.code(),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl World {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("hail-test-")
            .tempdir()
            .expect("temp dir");
        let hydra = Hydra::start();
        let cache = Cache::new(tmp.path());
        hydra.serve_cache(cache.dir.clone());
        std::fs::write(tmp.path().join("record"), "").expect("record file");
        Self { tmp, hydra, cache }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    pub fn profiles_dir(&self) -> PathBuf {
        self.path("profiles")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// Builds a profile with a recording activate (plus `extra` shell),
    /// publishes it signed, and makes it Hydra's latest successful build.
    pub fn publish_with(&self, label: &str, extra: &str) -> (u64, String) {
        let path = self.cache.build(label, &recording_activate(label, extra));
        self.cache.publish(&path);
        let id = self.hydra.add_build(JOB, &path, Some(0));
        (id, path)
    }

    pub fn publish(&self, label: &str) -> (u64, String) {
        self.publish_with(label, "")
    }

    /// The hail binary, with a clean environment for this world: the profile,
    /// the job URI, temporary dirs, and nix configured for the stand-in's cache.
    pub fn hail(&self) -> Command {
        self.hail_with_job(&self.hydra.job_uri(JOB))
    }

    /// Like [`World::hail`], following another job URI.
    pub fn hail_with_job(&self, job_uri: &str) -> Command {
        self.hail_for(PROFILE, job_uri)
    }

    /// Like [`World::hail`], for another profile and job URI.
    pub fn hail_for(&self, profile: &str, job_uri: &str) -> Command {
        let mut cmd = self.bare_hail();
        cmd.args(["--oneshot", "--profile", profile, "--job-uri", job_uri])
            .arg("--profiles-dir")
            .arg(self.profiles_dir())
            .arg("--state-dir")
            .arg(self.state_dir());
        cmd
    }

    /// hail's runtime dir (`HAIL_RUNTIME_DIR`): removing it is what a reboot
    /// does to `/run/hail`.
    pub fn runtime_dir(&self) -> PathBuf {
        self.path("run")
    }

    /// The hail binary with this world's environment but no arguments.
    pub fn bare_hail(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hail"));
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("HAIL_")
                || [
                    "NOTIFY_SOCKET",
                    "JOURNAL_STREAM",
                    "INVOCATION_ID",
                    "STATE_DIRECTORY",
                    "NIX_REMOTE",
                ]
                .contains(&key.as_ref())
            {
                cmd.env_remove(key.as_ref());
            }
        }
        cmd.env(
            "NIX_CONFIG",
            self.cache.client_nix_config(&self.hydra.origin()),
        )
        .env("HAIL_TEST_RECORD", self.path("record"))
        // Stands in for /run/hail, which a reboot empties.
        .env("HAIL_RUNTIME_DIR", self.runtime_dir())
        .stdin(Stdio::null());
        cmd
    }

    /// `hail activate` for the test profile, as hail-activate@web runs it.
    pub fn boot_activation(&self) -> Command {
        self.boot_activation_for(PROFILE)
    }

    /// `hail activate` for `profile`.
    pub fn boot_activation_for(&self, profile: &str) -> Command {
        let mut cmd = self.bare_hail();
        cmd.args(["activate", "--profile", profile, "--job-uri"])
            .arg(self.hydra.job_uri(JOB))
            .arg("--profiles-dir")
            .arg(self.profiles_dir())
            .arg("--state-dir")
            .arg(self.state_dir());
        cmd
    }

    /// `hail status` over this world's state dir, with `extra` arguments.
    pub fn status(&self, extra: &[&str]) -> Run {
        let mut cmd = self.bare_hail();
        cmd.arg("status")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(extra);
        self.run(cmd)
    }

    /// `hail status` as an operator reads it: the table (exit 0 asserted).
    pub fn status_table(&self) -> String {
        let run = self.status(&[]);
        assert_exit(&run, 0);
        run.stdout
    }

    /// The state file hail keeps for `profile` (`null` while there is none;
    /// one that is not JSON fails the test).
    pub fn state_of(&self, profile: &str) -> serde_json::Value {
        let path = self
            .state_dir()
            .join(format!("{}.json", profile.replace('/', "%2F")));
        match read_if_exists(&path) {
            Some(text) => serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("{} is not JSON: {err}", path.display())),
            None => serde_json::Value::Null,
        }
    }

    /// Runs a command to completion (bounded), capturing its output.
    pub fn run(&self, cmd: Command) -> Run {
        run_bounded(cmd)
    }

    /// Runs hail with these extra arguments.
    pub fn pass(&self, extra: &[&str]) -> Run {
        let mut cmd = self.hail();
        cmd.args(extra);
        self.run(cmd)
    }

    pub fn profile_path(&self) -> PathBuf {
        self.profiles_dir().join(PROFILE)
    }

    /// Where the profile points, fully resolved; `None` if there is no profile.
    pub fn profile_target(&self) -> Option<String> {
        self.profile_target_of(PROFILE)
    }

    /// Where `profile` points, fully resolved; `None` if there is no such profile.
    pub fn profile_target_of(&self, profile: &str) -> Option<String> {
        match std::fs::canonicalize(self.profiles_dir().join(profile)) {
            Ok(path) => Some(path.to_string_lossy().into_owned()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
            Err(err) => panic!("cannot resolve the profile: {err}"),
        }
    }

    /// The profile's generation numbers, from its `web-N-link` links (none
    /// while there is no profiles dir; any other error fails the test).
    pub fn generations(&self) -> Vec<u64> {
        self.generations_of(PROFILE)
    }

    /// The generation numbers of `profile` (a name without `/`), as [`World::generations`].
    pub fn generations_of(&self, profile: &str) -> Vec<u64> {
        let prefix = format!("{profile}-");
        let dir = self.profiles_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
            Err(err) => panic!("cannot list {}: {err}", dir.display()),
        };
        let mut gens: Vec<u64> = entries
            .map(|entry| entry.unwrap_or_else(|err| panic!("cannot list {}: {err}", dir.display())))
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_prefix(&prefix)?
                    .strip_suffix("-link")?
                    .parse()
                    .ok()
            })
            .collect();
        gens.sort_unstable();
        gens
    }

    /// One line per activate run, as the recording activate wrote them.
    pub fn activations(&self) -> Vec<String> {
        // World::new creates the file: not reading it is a failure, not "none".
        read_existing(&self.path("record"))
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// `cmd`, started by `sh -c script` in a private mount namespace of its own
/// (`unshare --mount`), where the script may mount over the test's dirs: it
/// sees `$0` = `arg0`, then `args`, then the command and its arguments; the
/// command keeps its environment.
pub fn in_mount_namespace(script: &str, arg0: &OsStr, args: &[&OsStr], cmd: &Command) -> Command {
    let mut wrapped = Command::new("unshare");
    wrapped
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(arg0)
        .args(args)
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    wrapped
}

pub fn run_bounded(mut cmd: Command) -> Run {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(RUN_LIMIT) {
        Ok(output) => output.expect("collect output").into(),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("{cmd:?} ran longer than {RUN_LIMIT:?}");
        }
    }
}

/// Asserts `run` exited with `code`, showing its output otherwise.
#[track_caller]
pub fn assert_exit(run: &Run, code: i32) {
    assert_eq!(run.code, Some(code), "unexpected exit status:\n{run:?}");
}

/// A pass on jobset `nosuch` of the Hydra at `origin` (the stand-in, or a
/// front before it) fails, naming the jobset in Hydra's own words.
#[track_caller]
pub fn assert_unknown_jobset_is_named(world: &World, origin: &str) {
    let run = world.run(world.hail_with_job(&format!("{origin}/job/hail/nosuch/{JOB}")));
    assert_exit(&run, 1);
    assert!(
        run.stderr
            .contains("Jobset \u{2018}nosuch\u{2019} doesn't exist."),
        "{run:?}"
    );
}

/// A pass that found build `id` deployed: exit 0, "up to date".
#[track_caller]
pub fn assert_up_to_date(run: &Run, id: u64) {
    assert_exit(run, 0);
    assert!(
        run.stderr.contains(&format!("up to date: build {id}")),
        "{run:?}"
    );
}

/// A file the test made: failing to read it fails the test.
pub fn read_existing(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("cannot read {}: {err}", path.display()))
}

/// A file that may not exist yet: `None` then; any other error fails the test.
pub fn read_if_exists(path: &Path) -> Option<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => panic!("cannot read {}: {err}", path.display()),
    }
}

pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}
