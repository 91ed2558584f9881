//! `hail service activate|deactivate`: the logic behind the flake's
//! `lib.mkServiceProfile`. A service profile carries systemd units in
//! `lib/systemd/system/`; activating it installs them into a runtime unit
//! directory, reloads systemd, restarts exactly the units whose content
//! changed, starts the others if they are not running, stops and removes the
//! units an earlier version had and this one has not, and runs the profile's
//! health check. Running it twice changes nothing the second time.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::{self, Deadline, Echo};
use crate::state::{read_own_file, read_own_list, remove_if_exists, write_atomically};

/// Where a service profile's pieces are, relative to the profile.
const UNITS: &str = "lib/systemd/system";
const PRE_SWITCH: &str = "bin/pre-switch";
const HEALTH_CHECK: &str = "bin/health-check";
/// How often the health check is retried.
const HEALTH_RETRY: Duration = Duration::from_millis(500);
/// Bound on `bin/pre-switch` (as on activate, by default).
const PRE_SWITCH_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on each systemctl call: a start or stop job waits for the units'
/// own timeouts (90 s by default), a restart for both.
const SYSTEMCTL_TIMEOUT: Duration = Duration::from_secs(300);

/// A service profile being (de)activated.
pub struct Service {
    /// Names the profile's manifest; two profiles must not share a name.
    pub name: String,
    /// Where units are installed, e.g. `/run/systemd/system`.
    pub unit_dir: PathBuf,
}

/// What activation changed, for the log and the tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub installed: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Service {
    pub fn new(name: &str, unit_dir: PathBuf) -> Result<Self> {
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._+-@".contains(c));
        if !valid {
            bail!("service name {name:?} must be one or more of A-Z a-z 0-9 . _ + - @");
        }
        Ok(Self {
            name: name.to_owned(),
            unit_dir,
        })
    }

    /// The list of units this service installed, kept beside them so that
    /// it lives exactly as long as they do (a runtime dir empties at boot).
    fn manifest(&self) -> PathBuf {
        self.unit_dir
            .join(format!(".hail-service-{}.units", self.name))
    }

    /// Units whose new content is on disk but which were not restarted yet.
    fn pending_file(&self) -> PathBuf {
        self.unit_dir
            .join(format!(".hail-service-{}.restart", self.name))
    }

    fn pending_restarts(&self) -> BTreeSet<String> {
        unit_list(&self.pending_file()).into_iter().collect()
    }

    fn installed_units(&self) -> Vec<String> {
        unit_list(&self.manifest())
    }

    pub fn activate(&self, profile: &Path, health_timeout: Duration) -> Result<Changes> {
        let wanted = read_units(&profile.join(UNITS))?;
        self.check_ownership(&wanted)?;

        let pre_switch = profile.join(PRE_SWITCH);
        if pre_switch.exists() {
            log::info!("running {}", pre_switch.display());
            let deadline = Deadline::new(
                PRE_SWITCH_TIMEOUT,
                "make bin/pre-switch finish within 10 minutes",
            );
            process::run(Command::new(&pre_switch), deadline, Echo::Both)
                .context("the pre-switch step failed; nothing was switched")?;
        }

        std::fs::create_dir_all(&self.unit_dir)
            .with_context(|| format!("cannot create {}", self.unit_dir.display()))?;
        let mut changes = Changes::default();
        for (name, content) in &wanted {
            // A link there (a runtime mask, say) is replaced by the unit itself.
            match read_own_file(&self.unit_dir.join(name)) {
                Ok(old) if &old == content => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                    changes.installed.push(name.clone());
                }
                _ => changes.changed.push(name.clone()),
            }
        }
        // Restarts owed by an activation interrupted after it wrote units,
        // plus this one's, recorded before the units change on disk.
        let startable = |u: &String| !u.contains("@.");
        let owed: BTreeSet<String> = self.pending_restarts();
        let restart: BTreeSet<String> = owed
            .iter()
            .filter(|u| wanted.contains_key(*u))
            .chain(&changes.changed)
            .filter(|u| startable(u))
            .cloned()
            .collect();
        if !restart.is_empty() {
            let list: String = restart.iter().map(|u| format!("{u}\n")).collect();
            write_atomically(&self.pending_file(), list.as_bytes())?;
        }
        for name in changes.changed.iter().chain(&changes.installed) {
            write_atomically(&self.unit_dir.join(name), &wanted[name])?;
        }
        let dropped: Vec<String> = self
            .installed_units()
            .into_iter()
            .filter(|u| !wanted.contains_key(u))
            .collect();
        if !dropped.is_empty() {
            systemctl(&["stop"], &dropped).context("cannot stop units this version dropped")?;
            for unit in &dropped {
                remove_if_exists(&self.unit_dir.join(unit))?;
            }
            changes.removed = dropped;
        }
        let manifest: String = wanted.keys().map(|u| format!("{u}\n")).collect();
        write_atomically(&self.manifest(), manifest.as_bytes())?;

        if changes != Changes::default() || !owed.is_empty() {
            systemctl(&["daemon-reload"], &[])?;
        }
        if !restart.is_empty() {
            let restart: Vec<String> = restart.into_iter().collect();
            systemctl(&["try-restart"], &restart)?;
        }
        remove_if_exists(&self.pending_file())?;
        // `start` leaves running units alone and brings up new or stopped ones.
        let start: Vec<String> = wanted.keys().filter(|u| startable(u)).cloned().collect();
        if !start.is_empty() {
            systemctl(&["start"], &start)?;
        }
        log::info!(
            "service {}: installed {:?}, changed {:?}, removed {:?}",
            self.name,
            changes.installed,
            changes.changed,
            changes.removed
        );

        let health_check = profile.join(HEALTH_CHECK);
        if health_check.exists() {
            wait_healthy(&health_check, health_timeout)?;
        }
        Ok(changes)
    }

    /// Stops and removes everything this service installed.
    pub fn deactivate(&self) -> Result<Vec<String>> {
        let units = self.installed_units();
        if !units.is_empty() {
            systemctl(&["stop"], &units)?;
            for unit in &units {
                remove_if_exists(&self.unit_dir.join(unit))?;
            }
            systemctl(&["daemon-reload"], &[])?;
        }
        remove_if_exists(&self.manifest())?;
        remove_if_exists(&self.pending_file())?;
        log::info!("service {}: removed {units:?}", self.name);
        Ok(units)
    }

    /// Refuses to take over units another service profile installed.
    fn check_ownership(&self, wanted: &BTreeMap<String, Vec<u8>>) -> Result<()> {
        let Ok(entries) = std::fs::read_dir(&self.unit_dir) else {
            return Ok(());
        };
        let mine = self.manifest();
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
                continue;
            };
            if path == mine || !file.starts_with(".hail-service-") || !file.ends_with(".units") {
                continue;
            }
            if let Some(unit) = unit_list(&path).iter().find(|u| wanted.contains_key(*u)) {
                bail!(
                    "unit {unit} is already installed by another service profile ({}); \
                     a unit can belong to one service profile only",
                    path.display()
                );
            }
        }
        Ok(())
    }
}

fn valid_unit_name(name: &str) -> bool {
    const SUFFIXES: &[&str] = &[
        ".service", ".socket", ".timer", ".path", ".target", ".mount", ".slice",
    ];
    !name.starts_with('.')
        && SUFFIXES.iter().any(|s| name.ends_with(s))
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c))
}

/// The valid unit names in a list hail wrote (a manifest, the restart list).
fn unit_list(path: &Path) -> Vec<String> {
    read_own_list(path)
        .lines()
        .filter(|l| valid_unit_name(l))
        .map(str::to_owned)
        .collect()
}

/// Units in a profile's `lib/systemd/system`, by name, with their content.
fn read_units(dir: &Path) -> Result<BTreeMap<String, Vec<u8>>> {
    let mut units = BTreeMap::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(units),
        Err(err) => return Err(err).with_context(|| format!("cannot list {}", dir.display())),
    };
    for entry in entries {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if !valid_unit_name(&name) {
            bail!("{} is not a systemd unit file name", path.display());
        }
        let content =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        units.insert(name, content);
    }
    Ok(units)
}

/// `systemctl VERB… UNIT…`.
pub fn systemctl_command(verb: &[&str], units: &[String]) -> Command {
    let mut cmd = Command::new("systemctl");
    cmd.args(verb).args(units);
    cmd
}

/// Runs `systemctl VERB… UNIT…`, bounded.
pub fn systemctl(verb: &[&str], units: &[String]) -> Result<()> {
    let deadline = Deadline::new(
        SYSTEMCTL_TIMEOUT,
        "a unit's start or stop job is stuck; see `systemctl list-jobs`",
    );
    process::run(systemctl_command(verb, units), deadline, Echo::Stderr)
}

/// Runs the health check until it succeeds or `timeout` passes.
fn wait_healthy(check: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        // Each try gets what is left of the health timeout, so a check that
        // hangs cannot hold activation beyond it.
        let left = Deadline::new(
            deadline.saturating_duration_since(Instant::now()),
            "raise --health-timeout (healthTimeout) if the service needs longer to become healthy",
        );
        match process::run(Command::new(check), left, Echo::Nothing) {
            Ok(()) => {
                log::info!("health check passed");
                return Ok(());
            }
            Err(err) if Instant::now() >= deadline => {
                return Err(err.context(format!(
                    "the health check did not pass within {} s",
                    timeout.as_secs()
                )));
            }
            Err(_) => std::thread::sleep(HEALTH_RETRY),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::argv;

    #[test]
    fn unit_names() {
        for good in [
            "web.service",
            "app@.service",
            "app@blue.service",
            "x.timer",
            "a\\x2db.socket",
        ] {
            assert!(valid_unit_name(good), "{good}");
        }
        for bad in [
            "",
            ".hail-service-x.units",
            "web",
            "web.conf",
            "../x.service",
            "a b.service",
            "a/b.service",
        ] {
            assert!(!valid_unit_name(bad), "{bad}");
        }
    }

    #[test]
    fn systemctl_argv() {
        let cmd = systemctl_command(&["try-restart"], &["a.service".into(), "b.socket".into()]);
        assert_eq!(
            argv(&cmd),
            ["systemctl", "try-restart", "a.service", "b.socket"]
        );
    }
}
