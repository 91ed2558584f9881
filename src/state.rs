//! Per-profile files in the state dir: the lock that keeps passes on one
//! profile from interleaving.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

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
