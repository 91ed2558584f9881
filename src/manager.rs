//! `hail manager activate|deactivate`: the logic behind the flake's
//! `lib.mkManagerProfile`, the original hail's bootstrap done right. A
//! manager profile lists hail instances; activating it makes the host run
//! exactly those: their environment files, their timers (with the listed poll
//! period) and boot units enabled; instances it no longer lists are taken
//! down with their profile's `bin/deactivate`, their timer and boot unit
//! disabled and their files removed.
//!
//! hail runs a manager's activate in a transient unit of its own (see
//! `activate`), so reloading or restarting hail's units here cannot end the
//! pass that runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use crate::hydra::JobUri;
use crate::process::{self, Deadline, Echo};
use crate::profile::ProfileName;
use crate::state::{read_own_list, remove_if_exists, write_atomically};

/// Bound on an instance's `bin/deactivate` (as on activate, by default).
const DEACTIVATE_TIMEOUT: Duration = Duration::from_secs(600);

/// One instance as a manager profile lists it (`share/hail/instances.json`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Instance {
    pub job_uri: String,
    /// The profile; defaults to the instance's name.
    #[serde(default)]
    pub profile: Option<String>,
    #[serde(default)]
    pub netrc_file: Option<String>,
    /// A systemd time span; the timer's default (5 min) if absent.
    #[serde(default)]
    pub poll_period: Option<String>,
    #[serde(default = "yes")]
    pub activate_at_boot: bool,
    /// More environment for the instance (`HAIL_*` options, `NIX_CONFIG`).
    #[serde(default)]
    pub environment: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

pub struct Manager {
    /// Where instance environment files live: `/etc/hail`.
    pub config_dir: PathBuf,
    /// Where timer drop-ins go: `/etc/systemd/system`.
    pub unit_dir: PathBuf,
    pub profiles_dir: PathBuf,
}

/// An instance from the manager's list: its unit instance name (what
/// `hail@NAME` is started as) and the profile it deploys, both validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub profile: ProfileName,
    pub instance: Instance,
}

/// The variables the manager writes from an instance's own fields: not to be
/// set through `environment`, where they would escape the manager's checks
/// (two instances on one profile).
const RESERVED: [(&str, &str); 3] = [
    ("HAIL_PROFILE", "profile"),
    ("HAIL_JOB_URI", "jobUri"),
    ("HAIL_NETRC_FILE", "netrcFile"),
];

/// Whether `text` is a positive systemd time span (systemd.time(7)): numbers,
/// each with an optional unit, such as `300`, `5min` or `1h 30min`.
fn is_time_span(text: &str) -> bool {
    const UNITS: [&str; 29] = [
        "usec", "us", "µs", "msec", "ms", "seconds", "second", "sec", "s", "minutes", "minute",
        "min", "m", "hours", "hour", "hr", "h", "days", "day", "d", "weeks", "week", "w", "months",
        "month", "M", "years", "year", "y",
    ];
    // One line in a drop-in: blanks between the parts, nothing else.
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return false;
    }
    let mut rest = text.trim();
    let mut positive = false;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        match rest[..number_end].parse::<f64>() {
            Ok(number) if number.is_finite() => positive |= number > 0.0,
            _ => return false,
        }
        rest = rest[number_end..].trim_start();
        let unit_end = rest
            .find(|c: char| !c.is_alphabetic())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_end];
        if !unit.is_empty() && !UNITS.contains(&unit) {
            return false;
        }
        rest = rest[unit_end..].trim_start();
    }
    positive
}

/// A unit instance name that needs no systemd escaping, so that `%i` in the
/// units is the name as typed (the rule the NixOS module applies too).
fn valid_instance_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.:-".contains(c))
}

impl Manager {
    /// The instances this manager set up, `NAME PROFILE` a line, remembered
    /// beside their env files.
    fn manifest(&self) -> PathBuf {
        self.config_dir.join(".hail-manager.instances")
    }

    fn managed(&self) -> BTreeMap<String, ProfileName> {
        read_own_list(&self.manifest())
            .lines()
            .filter_map(|line| {
                // An older manifest lists the profile alone.
                let (name, profile) = line.split_once(' ').unwrap_or((line, line));
                let profile = ProfileName::parse(profile).ok()?;
                if !valid_instance_name(name) {
                    log::warn!(
                        "manager: cannot take down instance {name:?} (not a plain unit instance \
                         name); disable hail@ and hail-activate@ for it by hand"
                    );
                    return None;
                }
                Some((name.to_owned(), profile))
            })
            .collect()
    }

    pub fn parse_instances(json: &str) -> Result<BTreeMap<String, Listed>> {
        let raw: BTreeMap<String, Instance> =
            serde_json::from_str(json).context("the manager's instance list is not valid")?;
        let mut instances: BTreeMap<String, Listed> = BTreeMap::new();
        for (name, instance) in raw {
            if !valid_instance_name(&name) {
                bail!(
                    "instance {name:?}: the name becomes the unit hail@{name}.service, so it may \
                     only contain letters, digits and \"_.:-\"; set the profile with \"profile\""
                );
            }
            let profile = ProfileName::parse(instance.profile.as_deref().unwrap_or(&name))
                .map_err(|e| anyhow!("instance {name:?}: {e}"))?;
            JobUri::parse(&instance.job_uri).map_err(|e| anyhow!("instance {name:?}: {e}"))?;
            for (key, value) in &instance.environment {
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    bail!("instance {name:?}: {key:?} is not an environment variable name");
                }
                if let Some((_, field)) = RESERVED.iter().find(|(reserved, _)| reserved == key) {
                    bail!(
                        "instance {name:?}: set {field:?} instead of {key} in \"environment\" \
                         (the manager writes {key} from it, and checks it)"
                    );
                }
                if value.chars().any(|c| c.is_control() && c != '\t') {
                    bail!(
                        "instance {name:?}: the value of {key} has a control character (newline?)"
                    );
                }
            }
            if let Some(period) = &instance.poll_period
                && !is_time_span(period)
            {
                bail!(
                    "instance {name:?}: poll period {period:?} is not a systemd time span such as \
                     \"5min\" or \"1h 30min\" (systemd would ignore it, and the timer would poll \
                     only at boot)"
                );
            }
            if let Some((other, _)) = instances.iter().find(|(_, l)| l.profile == profile) {
                bail!(
                    "instances {other:?} and {name:?} both deploy profile {profile}; give each its \
                     own profile"
                );
            }
            instances.insert(name, Listed { profile, instance });
        }
        Ok(instances)
    }

    pub fn activate(&self, instances: &BTreeMap<String, Listed>) -> Result<()> {
        let before = self.managed();
        for (gone, profile) in before.iter().filter(|(n, _)| !instances.contains_key(*n)) {
            self.remove(gone, profile)?;
        }
        for (name, listed) in instances {
            self.install(name, listed)?;
        }
        let manifest: String = instances
            .iter()
            .map(|(name, listed)| format!("{name} {}\n", listed.profile))
            .collect();
        write_atomically(&self.manifest(), manifest.as_bytes())?;
        systemctl(&["daemon-reload"])?;
        for (name, listed) in instances {
            systemctl(&["enable", "--now", &format!("hail@{name}.timer")])?;
            let boot = format!("hail-activate@{name}.service");
            if listed.instance.activate_at_boot {
                systemctl(&["enable", &boot])?;
            } else {
                systemctl(&["disable", &boot])?;
            }
            // An instance this manager did not run before, whose profile exists
            // (say it was dropped, which deactivated it, and is listed again):
            // its pass would find the profile up to date and not activate it, so
            // the boot unit does. Not waited for: if the instance is this
            // manager itself, that activation waits for the one running now.
            let profile_exists = self.profiles_dir.join(listed.profile.as_str()).exists();
            if before.get(name) != Some(&listed.profile) && profile_exists {
                systemctl(&["start", "--no-block", &boot])?;
            }
        }
        log::info!(
            "manager: instances {:?}",
            instances.keys().collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Takes down every instance this manager set up.
    pub fn deactivate(&self) -> Result<()> {
        for (name, profile) in self.managed() {
            self.remove(&name, &profile)?;
        }
        remove_if_exists(&self.manifest())?;
        systemctl(&["daemon-reload"])
    }

    /// `CONFIG_DIR/NAME.env`, which hail@NAME and hail-activate@NAME read.
    fn env_file(&self, name: &str) -> PathBuf {
        self.config_dir.join(format!("{name}.env"))
    }

    fn timer_dropin(&self, name: &str) -> PathBuf {
        self.unit_dir
            .join(format!("hail@{name}.timer.d"))
            .join("hail-manager.conf")
    }

    fn install(&self, name: &str, listed: &Listed) -> Result<()> {
        let instance = &listed.instance;
        let mut env = BTreeMap::new();
        env.insert("HAIL_PROFILE".to_owned(), listed.profile.to_string());
        env.insert("HAIL_JOB_URI".to_owned(), instance.job_uri.clone());
        if let Some(netrc) = &instance.netrc_file {
            env.insert("HAIL_NETRC_FILE".to_owned(), netrc.clone());
        }
        env.extend(instance.environment.clone());
        let text: String = env
            .iter()
            .map(|(k, v)| format!("{k}={}\n", quote_env(v)))
            .collect();
        let env_file = self.env_file(name);
        create_own_dirs(&self.config_dir, &env_file)?;
        write_atomically(&env_file, text.as_bytes())?;

        let dropin = self.timer_dropin(name);
        match &instance.poll_period {
            Some(period) => {
                // A time span (parse_instances checked it). The empty assignment
                // resets every trigger, so OnBootSec comes back too.
                let conf = format!(
                    "[Timer]\nOnUnitInactiveSec=\nOnBootSec=1min\nOnUnitInactiveSec={period}\n"
                );
                create_own_dirs(&self.unit_dir, &dropin)?;
                write_atomically(&dropin, conf.as_bytes())?;
            }
            None => remove_if_exists(&dropin)?,
        }
        Ok(())
    }

    fn remove(&self, name: &str, profile: &ProfileName) -> Result<()> {
        log::info!("manager: removing instance {name} (profile {profile})");
        // Stop polling first, so no pass redeploys what is being taken down.
        systemctl(&[
            "disable",
            "--now",
            &format!("hail@{name}.timer"),
            &format!("hail-activate@{name}.service"),
        ])?;
        let deactivate = self
            .profiles_dir
            .join(profile.as_str())
            .join("bin/deactivate");
        if deactivate.exists() {
            let deadline = Deadline::new(
                DEACTIVATE_TIMEOUT,
                "make bin/deactivate finish within 10 minutes",
            );
            process::run(Command::new(&deactivate), deadline, Echo::Both)
                .with_context(|| format!("deactivating instance {name}"))?;
        }
        remove_if_exists(&self.env_file(name))?;
        let dropin = self.timer_dropin(name);
        remove_if_exists(&dropin)?;
        if let Some(dir) = dropin.parent() {
            let _ = std::fs::remove_dir(dir);
        }
        Ok(())
    }
}

/// A value for an `EnvironmentFile=`: double-quoted, with `\` and `"` escaped.
fn quote_env(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Creates the directories between `base` (the admin's choice, which may be
/// a link) and `file`: hail makes them, so a symbolic link at one of them was
/// planted, and through it hail would write its file into another directory.
fn create_own_dirs(base: &Path, file: &Path) -> Result<()> {
    let Some(between) = file.parent().and_then(|dir| dir.strip_prefix(base).ok()) else {
        return Ok(());
    };
    std::fs::create_dir_all(base).with_context(|| format!("cannot create {}", base.display()))?;
    let mut dir = base.to_path_buf();
    for part in between.components() {
        dir.push(part);
        match std::fs::create_dir(&dir) {
            Err(err) if err.kind() != std::io::ErrorKind::AlreadyExists => {
                return Err(err).with_context(|| format!("cannot create {}", dir.display()));
            }
            _ => {}
        }
        let meta = dir
            .symlink_metadata()
            .with_context(|| format!("cannot create {}", dir.display()))?;
        if meta.is_symlink() {
            bail!(
                "{} is a symbolic link, not a directory hail made; remove it",
                dir.display()
            );
        }
    }
    Ok(())
}

fn systemctl(args: &[&str]) -> Result<()> {
    crate::service::systemctl(args, &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_lists() {
        let instances = Manager::parse_instances(
            r#"{"web": {"jobUri": "https://hydra.example.org/job/p/j/web", "pollPeriod": "1min",
                "environment": {"NIX_CONFIG": "a = b"}},
               "db": {"jobUri": "https://hydra.example.org/job/p/j/db", "profile": "hail-profiles/db",
                "activateAtBoot": false}}"#,
        )
        .unwrap();
        let names: Vec<&str> = instances.keys().map(String::as_str).collect();
        assert_eq!(names, ["db", "web"]);
        assert_eq!(instances["db"].profile.as_str(), "hail-profiles/db");
        assert!(!instances["db"].instance.activate_at_boot);

        for bad in [
            r#"{"web": {"jobUri": "ftp://x/job/p/j/web"}}"#,
            r#"{"../x": {"jobUri": "https://h/job/p/j/web"}}"#,
            r#"{"a/b": {"jobUri": "https://h/job/p/j/web"}}"#,
            r#"{"a": {"jobUri": "https://h/job/p/j/a", "profile": "x"}, "b": {"jobUri": "https://h/job/p/j/b", "profile": "x"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "pollperiod": "1min"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "environment": {"A B": "x"}}}"#,
            // Another instance's profile, past the check on "profile".
            r#"{"a": {"jobUri": "https://h/job/p/j/a", "environment": {"HAIL_PROFILE": "b"}}, "b": {"jobUri": "https://h/job/p/j/b"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "environment": {"HAIL_JOB_URI": "https://h/job/p/j/x"}}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "pollPeriod": "5 parsecs"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "pollPeriod": "0"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "pollPeriod": ""}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "pollPeriod": "5min\nOnBootSec=0"}}"#,
        ] {
            assert!(Manager::parse_instances(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn time_spans() {
        for good in [
            "300",
            "5min",
            "1h 30min",
            "1h30min",
            " 2 d ",
            "0.5h",
            "10s 500ms",
            "1µs",
        ] {
            assert!(is_time_span(good), "{good:?}");
        }
        for bad in [
            "",
            "0",
            "0min",
            "5 parsecs",
            "min",
            "5min;",
            "1..5s",
            "-5min",
            "inf",
            "5\nmin",
        ] {
            assert!(!is_time_span(bad), "{bad:?}");
        }
    }

    #[test]
    fn env_values_are_quoted() {
        assert_eq!(quote_env(r#"a "b" \c"#), r#""a \"b\" \\c""#);
    }
}
