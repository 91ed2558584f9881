//! Per-profile files in the state dir: the lock that keeps passes on one
//! profile from interleaving, and the JSON document that remembers what hail
//! deployed, what failed, and how the last pass went.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions, Permissions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rustix::fs::OFlags;
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::failure::FailureKind;
use crate::profile::ProfileName;

/// How often a waiting pass retries the lock.
const LOCK_RETRY: Duration = Duration::from_millis(50);

/// How many corrupt copies of one state file are kept:
/// `PROFILE.json.corrupt`, then `PROFILE.json.corrupt.1` and so on.
const CORRUPT_COPIES: usize = 10;

/// Random characters in a temporary file's name (`.NAME.tmp-XXXXXX`).
const TEMP_RANDOM: usize = 6;

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
        let file = open_own(
            &path,
            OpenOptions::new().create(true).truncate(false).write(true),
        )
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
        let text = match read_own_file(&path) {
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
        match parse_state(&text) {
            Ok(state) => state,
            Err(err) => {
                let kept = if keep_corrupt_aside {
                    match set_aside(&path) {
                        Ok(aside) => format!(" (the old file is {})", aside.display()),
                        Err(why) => format!(" (not kept: {why:#})"),
                    }
                } else {
                    String::new()
                };
                log::warn!(
                    "state file {} is corrupt ({err:#}); starting from an empty state{kept}",
                    path.display()
                );
                State::default()
            }
        }
    }

    /// Writes the state atomically: a temporary file, fsync, rename, fsync
    /// of the dir. A crash leaves the old state or the new one, never half.
    pub fn save(&self, profile: &ProfileName, state: &State) -> Result<()> {
        self.prepare(profile, state)?.commit()
    }

    /// The state, written to its temporary file only, for a later
    /// [`Prepared::commit`] that needs no free space.
    pub fn prepare(&self, profile: &ProfileName, state: &State) -> Result<Prepared> {
        let path = self.state_file(profile);
        let json = serde_json::to_vec_pretty(state).context("cannot serialise state")?;
        prepare_atomically(&path, &json)
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

/// A state document: a JSON object that serde reads as a [`State`], every
/// field of the JSON type hail writes. serde alone also fills a struct from
/// an array (`[]` is an empty `State`), which no state hail wrote looks like.
fn parse_state(text: &[u8]) -> Result<State> {
    let read: Value = serde_json::from_slice(text)?;
    let state: State = serde_json::from_value(read.clone())?;
    if let Some((field, found, wanted)) = mistyped(&read, &serde_json::to_value(&state)?) {
        let field = match field.as_str() {
            "" => "the document".to_owned(),
            field => format!("field {field}"),
        };
        bail!("{field} is {}, not {}", json_type(found), json_type(wanted));
    }
    Ok(state)
}

/// The first field (`a.b`; "" for the document itself) whose JSON type in
/// `read` differs from the one in `written`, with both values. Fields that
/// only one of them has are not compared.
fn mistyped<'a>(read: &'a Value, written: &'a Value) -> Option<(String, &'a Value, &'a Value)> {
    match (read, written) {
        (Value::Object(read), Value::Object(written)) => read.iter().find_map(|(key, value)| {
            let (field, found, wanted) = mistyped(value, written.get(key)?)?;
            let field = match field.as_str() {
                "" => key.clone(),
                field => format!("{key}.{field}"),
            };
            Some((field, found, wanted))
        }),
        _ if std::mem::discriminant(read) == std::mem::discriminant(written) => None,
        _ => Some((String::new(), read, written)),
    }
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Keeps a corrupt state file for a person to look at, under the first free
/// name of `PROFILE.json.corrupt`, `PROFILE.json.corrupt.1`, …: an earlier
/// copy, or anything planted at those names, is never replaced.
fn set_aside(path: &Path) -> Result<PathBuf> {
    for n in 0..CORRUPT_COPIES {
        let extension = match n {
            0 => "json.corrupt".to_owned(),
            n => format!("json.corrupt.{n}"),
        };
        let aside = path.with_extension(extension);
        // A hard link, unlike a rename, fails if the new name exists.
        match std::fs::hard_link(path, &aside) {
            Ok(()) => {
                std::fs::remove_file(path)
                    .with_context(|| format!("cannot remove {}", path.display()))?;
                return Ok(aside);
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(err) => {
                return Err(err).with_context(|| format!("cannot link it to {}", aside.display()));
            }
        }
    }
    bail!(
        "{CORRUPT_COPIES} corrupt copies of {} exist already; remove old ones",
        path.display()
    )
}

/// Flags for opening the files hail keeps: a symbolic link at the name is not
/// followed (hail never makes one, and through it hail, as root, would read
/// or write any file), and a FIFO planted there cannot block the open.
fn own_file_flags() -> i32 {
    // O_NOFOLLOW | O_NONBLOCK fit an i32 (std's custom_flags type).
    (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits() as i32
}

/// Opens one of hail's own files (the lock, the state, a manifest), which
/// must be a regular file and not a symbolic link.
fn open_own(path: &Path, options: &mut OpenOptions) -> std::io::Result<File> {
    let file = options
        .custom_flags(own_file_flags())
        .open(path)
        .map_err(|err| match Errno::from_io_error(&err) {
            Some(Errno::LOOP) => std::io::Error::other(
                "it is a symbolic link, which hail does not follow; remove it",
            ),
            _ => err,
        })?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("it is not a regular file; remove it"));
    }
    Ok(file)
}

/// The content of a file hail wrote itself, read without following a link.
pub fn read_own_file(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut content = Vec::new();
    open_own(path, OpenOptions::new().read(true))?.read_to_end(&mut content)?;
    Ok(content)
}

/// The text of a list hail wrote itself (a manifest): empty if there is
/// none, and if it cannot be read, reported and empty.
pub fn read_own_list(path: &Path) -> String {
    match read_own_file(path) {
        Ok(content) => String::from_utf8_lossy(&content).into_owned(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => {
            log::warn!("ignoring {} ({err})", path.display());
            String::new()
        }
    }
}

/// Writes `contents` to `path` atomically: a new temporary file beside it,
/// `.NAME.tmp-XXXXXX`, created exclusively (so nothing planted at any name
/// is followed, truncated or written), fsync, rename over `path` (which
/// replaces a symbolic link there, never writes through it), fsync of the
/// dir. A crash leaves the old content or the new, and at worst a temporary
/// file, which the next write of `path` removes.
pub fn write_atomically(path: &Path, contents: &[u8]) -> Result<()> {
    prepare_atomically(path, contents)?.commit()
}

/// The first half of [`write_atomically`]: the new content, durable in its
/// temporary file, which [`Prepared::commit`] renames into place. A rename
/// needs no free space, so content prepared before a step that may fill the
/// disk can still be committed after it. Dropped uncommitted, the temporary
/// file is removed.
pub fn prepare_atomically(path: &Path, contents: &[u8]) -> Result<Prepared> {
    let dir = match path.parent() {
        Some(dir) if dir != Path::new("") => dir,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("cannot write {}: it names no file", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let prefix = temp_prefix(name);
    remove_stale_temporaries(dir, &prefix);
    let write = || -> std::io::Result<tempfile::NamedTempFile> {
        let mut tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .rand_bytes(TEMP_RANDOM)
            // What File::create gives: 0666 less the umask.
            .permissions(Permissions::from_mode(0o666))
            .tempfile_in(dir)?;
        tmp.write_all(contents)?;
        tmp.as_file().sync_all()?;
        Ok(tmp)
    };
    let tmp = write().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(Prepared {
        tmp,
        path: path.to_owned(),
        dir: dir.to_owned(),
    })
}

/// New content for a file, waiting in its temporary file; see [`prepare_atomically`].
#[derive(Debug)]
pub struct Prepared {
    tmp: tempfile::NamedTempFile,
    path: PathBuf,
    dir: PathBuf,
}

impl Prepared {
    /// Renames the new content into place and makes the rename durable.
    pub fn commit(self) -> Result<()> {
        let Self { tmp, path, dir } = self;
        tmp.persist(&path)
            .map_err(|err| err.error)
            .and_then(|_| File::open(&dir)?.sync_all())
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Removes `path` (a link is removed, not followed); one that is not there
/// already is fine.
pub fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// `.NAME.tmp-`: the start of every temporary file name for NAME.
fn temp_prefix(name: &OsStr) -> std::ffi::OsString {
    let mut prefix = std::ffi::OsString::from(".");
    prefix.push(name);
    prefix.push(".tmp-");
    prefix
}

/// Removes the temporary files an interrupted write of the same file left
/// behind (hail killed between creating one and renaming it). Only regular
/// files named exactly like them; a link or anything else is left alone.
/// Whoever writes a file is its only writer at the time (the profile lock
/// covers the state and metrics files), so none of them is in use.
fn remove_stale_temporaries(dir: &Path, prefix: &OsStr) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let is_temporary = name
            .as_encoded_bytes()
            .strip_prefix(prefix.as_encoded_bytes())
            .is_some_and(|random| {
                random.len() == TEMP_RANDOM && random.iter().all(u8::is_ascii_alphanumeric)
            });
        // DirEntry::file_type does not follow a link.
        if is_temporary && entry.file_type().is_ok_and(|t| t.is_file()) {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => log::info!("removed {}, left by an interrupted write", path.display()),
                Err(err) => log::warn!("cannot remove {} ({err})", path.display()),
            }
        }
    }
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
    /// What `--wait-for-jobset` judged, so that no evaluation is read twice.
    pub evaluations: Option<crate::hydra::EvalMemo>,
    /// A rollback under way: saved before the profile is switched back and
    /// cleared when it is done, so that the next pass finishes one that was
    /// interrupted.
    pub rolling_back: Option<Rollback>,
    /// The NixOS system the profile points to needs a reboot to run (its
    /// kernel, initrd or kernel modules are not the booted system's).
    pub reboot: Option<Reboot>,
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
    /// Failed passes by kind.
    pub errors: std::collections::BTreeMap<FailureKind, u64>,
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
    /// What the build id means: job, build selection and output
    /// (`hydra::Client::source`). A pass with the same source whose Hydra
    /// names this build id needs no more than that one answer.
    #[serde(default)]
    pub source: Option<String>,
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
pub struct Reboot {
    /// The system that needs it.
    pub store_path: String,
    pub since: u64,
    /// hail reboots the host itself (`--allow-reboot`): a reboot *pending*;
    /// otherwise someone must: a reboot *required*.
    pub by_hail: bool,
    /// `--reboot-window`, if hail reboots only inside one.
    #[serde(default)]
    pub window: Option<String>,
    /// When hail asked for the reboot.
    #[serde(default)]
    pub requested: Option<RebootRequest>,
    /// When hail found that the host rebooted as it asked but booted another
    /// system: hail does not reboot for this system again (no reboot loop), so
    /// the reboot is someone's to do, as without `--allow-reboot`.
    #[serde(default)]
    pub booted_another: Option<u64>,
}

impl Reboot {
    /// Whether hail is to carry the reboot out itself.
    pub fn pending(&self) -> bool {
        self.by_hail && self.booted_another.is_none()
    }

    /// "reboot pending" or "reboot required", as status, metrics and the journal say it.
    pub fn label(&self) -> &'static str {
        if self.pending() {
            "reboot pending"
        } else {
            "reboot required"
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebootRequest {
    pub at: u64,
    /// The boot it was asked in (`/proc/sys/kernel/random/boot_id`): a
    /// later boot that still does not run the system is not rebooted again.
    /// (In a container that may be the host kernel's, which a reboot of the
    /// container keeps; the marker in the runtime dir tells there.)
    pub boot_id: String,
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
    pub result: CheckResult,
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
    pub kind: FailureKind,
}

/// How a pass ended, as `hail status` and the metrics show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckResult {
    UpToDate,
    Deployed,
    /// An interrupted or failed activation of the current build ran again.
    Reactivated,
    /// The profile was moved away from hail's deployment; hail holds off.
    Held,
    /// Hydra's build is newer but younger than `--min-build-age`.
    Waiting,
    Error,
    ActivationFailed,
}

impl CheckResult {
    pub fn label(self) -> &'static str {
        match self {
            Self::UpToDate => "up-to-date",
            Self::Deployed => "deployed",
            Self::Reactivated => "reactivated",
            Self::Held => "held",
            Self::Waiting => "waiting",
            Self::Error => "error",
            Self::ActivationFailed => "activation-failed",
        }
    }
}

impl State {
    /// Remembers a failure: the last error, and one more of its kind.
    pub fn record_error(&mut self, kind: FailureKind, message: String) {
        self.last_error = Some(LastError {
            at: now(),
            message,
            exit_status: kind.exit_status(),
            kind,
        });
        // Saturating: the count comes from the state file, whatever it says.
        let count = self.counters.errors.entry(kind).or_default();
        *count = count.saturating_add(1);
    }
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

    #[test]
    fn json_that_is_not_a_state_document_is_corrupt() {
        // What serde alone does with State (a #[serde(default)] struct): it
        // fills a struct from an array, so `[]` is an empty state and an array
        // where a struct belongs is read field by field; other types fail.
        assert_eq!(
            serde_json::from_str::<State>("[]").unwrap(),
            State::default()
        );
        let counters: State = serde_json::from_str(r#"{"counters": [3]}"#).unwrap();
        assert_eq!(counters.counters.deploys, 3);
        for text in ["3", "\"x\"", "null"] {
            assert!(serde_json::from_str::<State>(text).is_err(), "{text}");
        }

        for (text, why) in [
            ("[]", "the document is an array, not an object"),
            (
                r#"{"counters": [3]}"#,
                "field counters is an array, not an object",
            ),
            (
                r#"{"deployed": {"build_id": 1, "store_path": "/nix/store/x", "generation": null,
                    "job": "j", "at": 0, "activation": "done", "previous": [null, "/nix/store/y", null]}}"#,
                "field deployed.previous is an array, not an object",
            ),
            ("3", "invalid type: integer `3`, expected struct State"),
            ("null", "invalid type: null, expected struct State"),
        ] {
            let err = parse_state(text.as_bytes()).unwrap_err();
            assert!(format!("{err:#}").contains(why), "{text}: {err:#}");
        }
        // Unknown fields (a newer hail's) and missing ones are no reason.
        let state = parse_state(br#"{"counters": {"deploys": 2}, "future": [1]}"#).unwrap();
        assert_eq!(state.counters.deploys, 2);
    }

    #[test]
    fn writes_replace_links_and_remove_stale_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "victim").unwrap();
        let target = dir.path().join("web.json");
        std::os::unix::fs::symlink(&victim, &target).unwrap();
        let stale = dir.path().join(".web.json.tmp-Ab12Cd");
        std::fs::write(&stale, "stale").unwrap();

        write_atomically(&target, b"new").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
        assert!(std::fs::symlink_metadata(&target).unwrap().is_file());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "new");
        assert!(!stale.exists());
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
