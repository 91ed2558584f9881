//! The Nix profile hail keeps in step: where it points, and the nix calls
//! that change it. Reading the profile never runs nix; changing it always
//! goes through `nix-store --realise` and `nix-env`, whose argv is built here
//! and only here.

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process;
use crate::report;
use crate::state;
use crate::store_path::{StoreDir, StorePath};

/// A profile name relative to the profiles dir, such as `web` or
/// `hail-profiles/web`; validated so it can never escape that dir.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileName(String);

impl ProfileName {
    pub fn parse(name: &str) -> Result<Self, String> {
        const RULE: &str = "a profile name is one or more '/'-separated parts of \
                            A-Z a-z 0-9 . _ + -, relative to the profiles dir (e.g. web or hail-profiles/web)";
        if name.is_empty() {
            return Err(format!("the profile name is empty; {RULE}"));
        }
        if name.starts_with('/') {
            return Err(format!("{name:?} is absolute; {RULE}"));
        }
        if name.contains('\\') {
            return Err(format!(
                "{name:?} contains '\\': it looks like a systemd-escaped instance name. \
                 hail@NAME deploys the profile NAME as typed; for a profile whose name a unit \
                 cannot carry, name the instance anything and set HAIL_PROFILE in \
                 /etc/hail/NAME.env"
            ));
        }
        if let Some(bad) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._+-/".contains(*c)))
        {
            return Err(format!("{name:?} contains {bad:?}; {RULE}"));
        }
        if name.split('/').any(|part| matches!(part, "" | "." | "..")) {
            return Err(format!("{name:?} has an empty, '.' or '..' part; {RULE}"));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as `systemd-escape` writes it, for unit instance names:
    /// `hail-profiles/web` → `hail\x2dprofiles-web`.
    pub fn systemd_escaped(&self) -> String {
        let mut escaped = String::new();
        for (i, byte) in self.0.bytes().enumerate() {
            match byte {
                b'/' => escaped.push('-'),
                b'.' if i == 0 => escaped.push_str("\\x2e"),
                b if b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b':' => {
                    escaped.push(char::from(b));
                }
                b => escaped.push_str(&format!("\\x{b:02x}")),
            }
        }
        escaped
    }

    /// The name back from [`ProfileName::file_stem`].
    pub fn from_file_stem(stem: &str) -> Option<Self> {
        Self::parse(&stem.replace("%2F", "/")).ok()
    }

    /// A flat file name for per-profile files in the state dir
    /// (`hail-profiles/web` → `hail-profiles%2Fweb`); '%' is not allowed in
    /// names, so this is reversible and collision-free.
    pub fn file_stem(&self) -> String {
        self.0.replace('/', "%2F")
    }
}

impl fmt::Display for ProfileName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A profile at `PROFILES_DIR/NAME`, with generations `NAME-N-link` beside it.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: ProfileName,
    path: PathBuf,
}

impl Profile {
    pub fn new(profiles_dir: &Path, name: ProfileName) -> Self {
        let path = profiles_dir.join(name.as_str());
        Self { name, path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the profile exists (as a link; its target need not).
    pub fn exists(&self) -> bool {
        self.path.symlink_metadata().is_ok()
    }

    /// The store path the profile resolves to (profile → generation link →
    /// store path), or `None` if there is no profile yet. Runs no nix.
    pub fn current_target(&self, store: &StoreDir) -> Result<Option<StorePath>> {
        store_path_behind(&self.path, store)
    }

    /// Realises `store_path` (nix substitutes it from the binary caches
    /// nix.conf names), lets `inspect` look at its content, and only then
    /// switches the profile to it as a new generation; each nix call within
    /// `timeout`. On failure, or if `inspect` refuses it, the profile is
    /// unchanged.
    pub fn switch_to(
        &self,
        store_path: &StorePath,
        timeout: Duration,
        inspect: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        realise(store_path, timeout)?;
        inspect()?;
        if let Some(parent) = self.path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create profiles dir {}", parent.display()))?;
        }
        run_nix(nix_env_set(&self.path, store_path), timeout).with_context(|| {
            format!(
                "could not switch profile {} to {store_path}",
                self.path.display()
            )
        })
    }

    /// Points the profile back at an existing generation.
    pub fn switch_generation(&self, generation: u64, timeout: Duration) -> Result<()> {
        run_nix(nix_env_switch_generation(&self.path, generation), timeout).with_context(|| {
            format!(
                "could not switch profile {} back to generation {generation}",
                self.path.display()
            )
        })
    }

    /// Deletes generations that are not the current one.
    pub fn delete_generations(&self, generations: &[u64], timeout: Duration) -> Result<()> {
        run_nix(nix_env_delete_generations(&self.path, generations), timeout).with_context(|| {
            format!(
                "could not delete generations {generations:?} of profile {}",
                self.path.display()
            )
        })
    }

    /// Removes the profile and its generation `generation`, when a first
    /// deploy failed and there is nothing to go back to: a half-activated
    /// profile must not be activated again at boot. nix-env cannot delete the
    /// current generation, so the links are removed directly.
    pub fn remove(&self, generation: Option<u64>) -> Result<()> {
        let mut links = vec![self.path.clone()];
        if let Some(generation) = generation {
            links.push(self.generation_link(generation));
        }
        links
            .iter()
            .try_for_each(|link| state::remove_if_exists(link))
    }

    /// The store path generation `generation` points at, if it is one.
    pub fn generation_target(&self, generation: u64, store: &StoreDir) -> Option<StorePath> {
        let target = self.generation_link(generation).read_link().ok()?;
        store.parse(&target.to_string_lossy()).ok()
    }

    /// When generation `generation` was made (Unix time of its link).
    pub fn generation_time(&self, generation: u64) -> Option<u64> {
        let made = self
            .generation_link(generation)
            .symlink_metadata()
            .ok()?
            .modified()
            .ok()?;
        made.duration_since(std::time::UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs())
    }

    fn generation_link(&self, generation: u64) -> PathBuf {
        let base = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.path
            .with_file_name(format!("{base}-{generation}-link"))
    }

    /// Generation numbers of this profile, oldest first, from the links
    /// `NAME-N-link` beside it.
    pub fn generations(&self) -> Result<Vec<u64>> {
        let (Some(dir), Some(base)) = (self.path.parent(), self.path.file_name()) else {
            return Ok(Vec::new());
        };
        let prefix = format!("{}-", base.to_string_lossy());
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => {
                return Err(err).with_context(|| format!("cannot list {}", dir.display()));
            }
        };
        let mut generations: Vec<u64> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                name.strip_prefix(&prefix)?
                    .strip_suffix("-link")?
                    .parse()
                    .ok()
            })
            .collect();
        generations.sort_unstable();
        Ok(generations)
    }

    /// The generation the profile points at, if it points at one.
    pub fn current_generation(&self) -> Option<u64> {
        let target = self.path.read_link().ok()?;
        let base = self.path.file_name()?.to_string_lossy().into_owned();
        target
            .file_name()?
            .to_str()?
            .strip_prefix(&format!("{base}-"))?
            .strip_suffix("-link")?
            .parse()
            .ok()
    }
}

/// The store path behind `link`, following symlinks until one names a path
/// directly in `store`; `None` if `link` does not exist. Runs no nix.
pub fn store_path_behind(link: &Path, store: &StoreDir) -> Result<Option<StorePath>> {
    const MAX_LINKS: usize = 40;
    let mut at = link.to_path_buf();
    for _ in 0..MAX_LINKS {
        if let Ok(store_path) = store.parse(&at.to_string_lossy()) {
            return Ok(Some(store_path));
        }
        let target = match at.read_link() {
            Ok(target) => target,
            Err(err) if err.kind() == io::ErrorKind::NotFound && at == link => {
                return Ok(None);
            }
            Err(err) if err.kind() == io::ErrorKind::InvalidInput => bail!(
                "profile {} resolves to {}, which is neither a symlink nor a path in {}; \
                 move it away so that hail can manage the profile",
                link.display(),
                at.display(),
                store.path().display()
            ),
            Err(err) => {
                return Err(err)
                    .with_context(|| format!("cannot read profile link {}", at.display()));
            }
        };
        at = match at.parent() {
            Some(parent) if target.is_relative() => parent.join(target),
            _ => target,
        };
    }
    bail!(
        "profile {} has more than {MAX_LINKS} levels of symlinks",
        link.display()
    )
}

/// Runs a nix command with its stderr echoed as it comes, ended after
/// `timeout` so that a stuck nix cannot hold the profile lock forever.
fn run_nix(cmd: Command, timeout: Duration) -> Result<()> {
    process::run(cmd, nix_deadline(timeout), process::Echo::Stderr)
}

fn nix_deadline(timeout: Duration) -> process::Deadline {
    process::Deadline::new(
        timeout,
        "raise --nix-timeout (HAIL_NIX_TIMEOUT) if substituting this build takes longer, \
         or check that the binary caches in nix.conf answer",
    )
}

/// Makes `store_path` valid in the store, substituting it and its closure
/// within `timeout`; its progress goes to systemd's `STATUS=` as nix reports
/// it, and what was fetched to the log.
fn realise(store_path: &StorePath, timeout: Duration) -> Result<()> {
    let progress = Arc::new(Mutex::new(Substitution::default()));
    let seen = Arc::clone(&progress);
    let what = store_path.to_string();
    let watch = Box::new(move |line: &str| {
        let now = seen.lock().ok().and_then(|mut progress| progress.see(line));
        if let Some(now) = now {
            report::status(&format!("realising {what}: {now}"));
        }
    });
    let started = Instant::now();
    process::run_and_watch(
        nix_store_realise(store_path),
        nix_deadline(timeout),
        process::Echo::Stderr,
        watch,
    )
    .with_context(|| format!("could not realise {store_path}"))?;
    if let Some(fetched) = progress.lock().ok().and_then(|p| p.summary()) {
        log::info!(
            "realised {store_path}: {fetched} in {} s",
            started.elapsed().as_secs()
        );
    }
    Ok(())
}

/// What nix has said so far about substituting a path, from its stderr:
/// `these 3 paths will be fetched (12.50 MiB download, 40.10 MiB
/// unpacked):`, then `copying path '…' from '…'...` for each.
#[derive(Debug, Default)]
struct Substitution {
    /// The paths nix announced, and their sizes as it wrote them.
    announced: Option<(u64, String)>,
    copied: u64,
}

impl Substitution {
    /// Takes one line of nix's stderr; returns the progress to show if the
    /// line changed it.
    fn see(&mut self, line: &str) -> Option<String> {
        if let Some(announced) = fetch_announcement(line) {
            let shown = format!("fetching {} path(s) ({})", announced.0, announced.1);
            self.announced = Some(announced);
            return Some(shown);
        }
        if !(line.starts_with("copying path '") && line.contains("' from '")) {
            return None;
        }
        self.copied += 1;
        Some(match &self.announced {
            Some((paths, sizes)) => format!("copying path {} of {paths} ({sizes})", self.copied),
            None => format!("copying path {}", self.copied),
        })
    }

    /// What was fetched in all; `None` if nothing was.
    fn summary(&self) -> Option<String> {
        let sizes = self
            .announced
            .as_ref()
            .map(|(_, sizes)| format!(" ({sizes})"))
            .unwrap_or_default();
        (self.copied > 0).then(|| format!("fetched {} path(s){sizes}", self.copied))
    }
}

/// nix's `this path will be fetched (…):` or `these N paths will be
/// fetched (…):` as (N, the sizes in the parentheses).
fn fetch_announcement(line: &str) -> Option<(u64, String)> {
    let (count, rest) = if let Some(rest) = line.strip_prefix("this path will be fetched (") {
        (1, rest)
    } else {
        let rest = line.strip_prefix("these ")?;
        let (count, rest) = rest.split_once(" paths will be fetched (")?;
        (count.parse().ok()?, rest)
    };
    let sizes = rest.strip_suffix("):")?;
    Some((count, sizes.to_owned()))
}

/// `nix-store --realise --no-gc-warning STORE_PATH`: substitutes the path
/// (it has no derivation here); no GC root, since `nix-env --set` makes the
/// generation that keeps it, and so no warning about one.
pub fn nix_store_realise(store_path: &StorePath) -> Command {
    let mut cmd = Command::new("nix-store");
    cmd.args(["--realise", "--no-gc-warning", store_path.as_str()]);
    cmd
}

/// `nix-env --profile PROFILE --set STORE_PATH`: one atomic switch to a new
/// generation. The store path is a validated argument, never shell text.
pub fn nix_env_set(profile: &Path, store_path: &StorePath) -> Command {
    nix_env(
        profile,
        [OsString::from("--set"), store_path.as_str().into()],
    )
}

/// `nix-env --profile PROFILE --switch-generation N`.
pub fn nix_env_switch_generation(profile: &Path, generation: u64) -> Command {
    nix_env(
        profile,
        [
            OsString::from("--switch-generation"),
            generation.to_string().into(),
        ],
    )
}

/// `nix-env --profile PROFILE --delete-generations N…`.
pub fn nix_env_delete_generations(profile: &Path, generations: &[u64]) -> Command {
    nix_env(
        profile,
        std::iter::once(OsString::from("--delete-generations"))
            .chain(generations.iter().map(|g| g.to_string().into())),
    )
}

fn nix_env<I: IntoIterator<Item = OsString>>(profile: &Path, args: I) -> Command {
    let mut cmd = Command::new("nix-env");
    cmd.arg("--profile").arg(profile).args(args);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::argv;

    #[test]
    fn profile_names() {
        for good in ["web", "hail-profiles/web", "a.b_c+d-e", "x/y/z", "web.1"] {
            assert!(ProfileName::parse(good).is_ok(), "{good}");
        }
        for bad in [
            "", "/web", "web/", "a//b", "./web", "a/./b", "..", "a/../b", "we b", "web;id", "$x",
            "wéb", "a\nb", "a\\x2bb",
        ] {
            assert!(ProfileName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn file_stem_is_flat() {
        let name = ProfileName::parse("hail-profiles/web").unwrap();
        assert_eq!(name.file_stem(), "hail-profiles%2Fweb");
        assert_eq!(ProfileName::from_file_stem(&name.file_stem()), Some(name));
    }

    #[test]
    fn nix_env_set_argv() {
        let store = StoreDir::new("/nix/store");
        let path = store
            .parse("/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello")
            .unwrap();
        assert_eq!(
            argv(&nix_env_set(Path::new("/p/web"), &path)),
            [
                "nix-env",
                "--profile",
                "/p/web",
                "--set",
                "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello"
            ]
        );
    }

    #[test]
    fn nix_store_realise_argv() {
        let path = StoreDir::new("/nix/store")
            .parse("/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello")
            .unwrap();
        assert_eq!(
            argv(&nix_store_realise(&path)),
            [
                "nix-store",
                "--realise",
                "--no-gc-warning",
                "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello"
            ]
        );
    }

    #[test]
    fn substitution_progress_from_nixs_own_lines() {
        // As nix 2.8's nix-store --realise writes them.
        let mut progress = Substitution::default();
        assert_eq!(progress.summary(), None);
        let shown: Vec<Option<String>> = [
            "these 2 paths will be fetched (0.29 MiB download, 1.10 MiB unpacked):",
            "  /nix/store/b0rcmh12v25sbwzwhm7597mjzibaxkr8-kernel",
            "copying path '/nix/store/b0rcmh12v25sbwzwhm7597mjzibaxkr8-kernel' from 'https://hydra.example.org'...",
            "copying path '/nix/store/x14f5f3k017k50dpcm2hqzk9cb28wf76-sys' from 'https://hydra.example.org'...",
            "warning: something else",
        ]
        .iter()
        .map(|line| progress.see(line))
        .collect();
        assert_eq!(
            shown,
            [
                Some("fetching 2 path(s) (0.29 MiB download, 1.10 MiB unpacked)".to_owned()),
                None,
                Some("copying path 1 of 2 (0.29 MiB download, 1.10 MiB unpacked)".to_owned()),
                Some("copying path 2 of 2 (0.29 MiB download, 1.10 MiB unpacked)".to_owned()),
                None,
            ]
        );
        assert_eq!(
            progress.summary().as_deref(),
            Some("fetched 2 path(s) (0.29 MiB download, 1.10 MiB unpacked)")
        );

        let mut one = Substitution::default();
        one.see("this path will be fetched (0.01 MiB download, 0.03 MiB unpacked):");
        assert_eq!(
            one.see("copying path '/nix/store/x-a' from 'file:///c'...")
                .as_deref(),
            Some("copying path 1 of 1 (0.01 MiB download, 0.03 MiB unpacked)")
        );
        // Unannounced (another nix's wording): still counted.
        let mut bare = Substitution::default();
        assert_eq!(
            bare.see("copying path '/nix/store/x-a' from 'file:///c'...")
                .as_deref(),
            Some("copying path 1")
        );
        assert_eq!(bare.summary().as_deref(), Some("fetched 1 path(s)"));
        // nix copy's lines (to a cache) are not substitution.
        assert_eq!(
            bare.see("copying path '/nix/store/x-a' to 'file:///c'..."),
            None
        );
    }

    #[test]
    fn rollback_argvs() {
        let profile = Path::new("/p/web");
        assert_eq!(
            argv(&nix_env_switch_generation(profile, 3)),
            ["nix-env", "--profile", "/p/web", "--switch-generation", "3"]
        );
        assert_eq!(
            argv(&nix_env_delete_generations(profile, &[4, 5])),
            [
                "nix-env",
                "--profile",
                "/p/web",
                "--delete-generations",
                "4",
                "5"
            ]
        );
    }

    #[test]
    fn resolves_links_without_nix() {
        let dir = std::env::temp_dir().join(format!("hail-profile-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = StoreDir::new("/nix/store");
        let profile = Profile::new(&dir, ProfileName::parse("web").unwrap());
        assert_eq!(profile.current_target(&store).unwrap(), None);
        let target = "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello";
        std::os::unix::fs::symlink(target, dir.join("web-7-link")).unwrap();
        std::os::unix::fs::symlink("web-7-link", dir.join("web")).unwrap();
        assert_eq!(
            profile.current_target(&store).unwrap().unwrap().as_str(),
            target
        );
        assert_eq!(profile.current_generation(), Some(7));
        assert_eq!(profile.generations().unwrap(), vec![7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
