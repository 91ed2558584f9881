//! Per-profile files in the state dir: the lock that keeps passes on one
//! profile from interleaving, and the JSON document that remembers what hail
//! deployed, what failed, and how the last pass went.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::profile::ProfileName;

/// How often a waiting pass retries the lock.
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// The state dir: `--state-dir`, `$STATE_DIRECTORY` (systemd's
/// `StateDirectory=`), or `/var/lib/hail`.
#[derive(Debug, Clone)]
pub struct StateDir(PathBuf);

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    /// The default when `--state-dir` is not given.
    pub fn default_from_env() -> Self {
        // systemd may list several directories, separated by ':'.
        let from_systemd = std::env::var("STATE_DIRECTORY")
            .ok()
            .and_then(|dirs| dirs.split(':').next().map(str::to_owned))
            .filter(|dir| !dir.is_empty());
        Self::new(from_systemd.unwrap_or_else(|| "/var/lib/hail".into()))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    fn file(&self, profile: &ProfileName, extension: &str) -> PathBuf {
        self.0.join(format!("{}.{extension}", profile.file_stem()))
    }

    /// Takes the profile's exclusive lock, waiting at most `wait` for a pass
    /// that holds it. The lock lasts as long as the returned guard.
    pub fn lock(&self, profile: &ProfileName, wait: Duration) -> Result<ProfileLock> {
        std::fs::create_dir_all(&self.0)
            .with_context(|| format!("cannot create state dir {}", self.0.display()))?;
        let path = self.file(profile, "lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let deadline = Instant::now() + wait;
        let mut announced = false;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(ProfileLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) => {}
                Err(std::fs::TryLockError::Error(err)) => {
                    return Err(err).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "another hail pass on profile {profile} still holds {} after {} s; \
                     try again later (or look for a stuck pass)",
                    path.display(),
                    wait.as_secs()
                );
            }
            if !announced {
                log::info!("waiting for another pass on this profile to finish");
                announced = true;
            }
            std::thread::sleep(LOCK_RETRY);
        }
    }
}

/// Held while a pass runs; the kernel releases it when hail exits, however it exits.
#[derive(Debug)]
pub struct ProfileLock {
    _file: File,
}

impl StateDir {
    pub fn state_file(&self, profile: &ProfileName) -> PathBuf {
        self.file(profile, "json")
    }

    /// The profile's state, for reading only (`hail status`, `--dry-run`): a
    /// missing file is an empty state, and so is a corrupt or unreadable one
    /// (reported).
    pub fn load(&self, profile: &ProfileName) -> State {
        self.read(profile, false)
    }

    /// Like [`StateDir::load`], for a pass that will write the state back: a
    /// corrupt file is first kept aside as `PROFILE.json.corrupt`.
    pub fn load_for_update(&self, profile: &ProfileName) -> State {
        self.read(profile, true)
    }

    fn read(&self, profile: &ProfileName, keep_corrupt_aside: bool) -> State {
        let path = self.state_file(profile);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return State::default(),
            Err(err) => {
                log::warn!(
                    "cannot read state file {} ({err}); starting from an empty state",
                    path.display()
                );
                return State::default();
            }
        };
        match serde_json::from_slice(&text) {
            Ok(state) => state,
            Err(err) => {
                let aside = path.with_extension("json.corrupt");
                let kept = if keep_corrupt_aside && std::fs::rename(&path, &aside).is_ok() {
                    format!(" (the old file is {})", aside.display())
                } else {
                    String::new()
                };
                log::warn!(
                    "state file {} is corrupt ({err}); starting from an empty state{kept}",
                    path.display()
                );
                State::default()
            }
        }
    }

    /// Writes the state atomically: a temporary file, fsync, rename, fsync
    /// of the dir. A crash leaves the old state or the new one, never half.
    pub fn save(&self, profile: &ProfileName, state: &State) -> Result<()> {
        let path = self.state_file(profile);
        let json = serde_json::to_vec_pretty(state).context("cannot serialise state")?;
        write_atomically(&path, &json)
    }

    /// Every profile with a state file, for `hail status`.
    pub fn profiles(&self) -> Result<Vec<ProfileName>> {
        let entries = match std::fs::read_dir(&self.0) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(err).with_context(|| format!("cannot list {}", self.0.display()));
            }
        };
        let mut names: Vec<ProfileName> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let stem = name.strip_suffix(".json")?;
                ProfileName::from_file_stem(stem)
            })
            .collect();
        names.sort();
        Ok(names)
    }
}

pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(err).context(format!("cannot write {}", path.display()))
    })
}

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What hail knows about one profile. Store paths here are for people and
/// comparisons only; nothing read from this file is passed to nix.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The build hail deployed last (or is deploying).
    pub deployed: Option<Deployment>,
    /// A build whose activation failed and was rolled back: not retried
    /// while it is Hydra's latest.
    pub failed: Option<FailedBuild>,
    /// Set while hail holds off because the profile was moved away from what
    /// it deployed (an operator's rollback).
    pub held: Option<Hold>,
    /// A newer build that is not old enough yet (`--min-build-age`).
    pub waiting: Option<Waiting>,
    /// A rollback under way: saved before the profile is switched back and
    /// cleared when it is done, so that the next pass finishes one that was
    /// interrupted.
    pub rolling_back: Option<Rollback>,
    pub last_check: Option<Check>,
    pub last_error: Option<LastError>,
    /// When the last pass that deployed or found the profile up to date ended.
    pub last_success: Option<u64>,
    pub counters: Counters,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub deploys: u64,
    pub rollbacks: u64,
    /// Failed passes by kind: hydra, nix, activation, state.
    pub errors: std::collections::BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Waiting {
    pub build_id: u64,
    pub store_path: String,
    /// When the build becomes old enough to deploy; `None` while its age
    /// is unknown (Hydra gave no usable stoptime).
    pub eligible_at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    /// Hydra's build id; `None` for a profile hail found rather than
    /// deployed (its first pass, or after its state was lost).
    pub build_id: Option<u64>,
    pub store_path: String,
    pub generation: Option<u64>,
    pub job: String,
    /// When the switch happened.
    pub at: u64,
    pub activation: ActivationState,
    /// Failed activations in a row of this deployment (at boot, and the
    /// passes' retries); the passes stop retrying at a bound.
    #[serde(default)]
    pub activation_failures: u32,
    /// What the profile pointed at before, for rolling back.
    pub previous: Option<Previous>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationState {
    /// Recorded before the switch; cleared when activate succeeded. Found
    /// set by a later pass, it means hail was interrupted.
    Pending,
    Done,
    /// A later activation (at boot) failed; the next passes run it again.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Previous {
    pub build_id: Option<u64>,
    pub store_path: String,
    pub generation: Option<u64>,
    /// When it was deployed, if hail deployed it.
    #[serde(default)]
    pub at: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailedBuild {
    pub build_id: u64,
    pub store_path: String,
    pub at: u64,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// The build whose activation failed.
    pub build_id: u64,
    pub store_path: String,
    /// Its generation, deleted once the profile is back.
    pub generation: Option<u64>,
    /// What to go back to; `None`: the profile is removed.
    pub previous: Option<Previous>,
}

impl Deployment {
    /// "build 4 (…-web)", or "generation 3 (…-web)" when the build is unknown.
    pub fn describe(&self) -> String {
        let name = self.store_path.rsplit('/').next().unwrap_or_default();
        let name = name.split_once('-').map_or(name, |(_, n)| n);
        match (self.build_id, self.generation) {
            (Some(id), _) => format!("build {id} ({name})"),
            (None, Some(generation)) => format!("generation {generation} ({name})"),
            (None, None) => format!("an unknown build ({name})"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hold {
    /// The build hail deployed and the operator moved away from.
    pub build_id: Option<u64>,
    /// Where the profile points instead.
    pub profile_target: Option<String>,
    pub since: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Check {
    pub at: u64,
    pub result: String,
    pub latest_build_id: Option<u64>,
    /// Whether the profile was at the build Hydra offered when the pass ended.
    #[serde(default)]
    pub at_latest: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastError {
    pub at: u64,
    pub message: String,
    pub exit_status: u8,
    #[serde(default)]
    pub kind: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_survives_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let states = StateDir::new(dir.path());
        let name = ProfileName::parse("hail-profiles/web").unwrap();
        assert_eq!(states.load(&name), State::default());
        let state = State {
            failed: Some(FailedBuild {
                build_id: 5,
                store_path: "/nix/store/x".into(),
                at: 1,
                reason: "r".into(),
            }),
            ..State::default()
        };
        states.save(&name, &state).unwrap();
        assert_eq!(states.load(&name), state);
        assert_eq!(states.profiles().unwrap(), vec![name.clone()]);

        std::fs::write(states.state_file(&name), b"{\"deployed\": tru").unwrap();
        assert_eq!(states.load(&name), State::default());
        assert!(!dir.path().join("hail-profiles%2Fweb.json.corrupt").exists());
        assert_eq!(states.load_for_update(&name), State::default());
        assert!(dir.path().join("hail-profiles%2Fweb.json.corrupt").exists());
    }
}
