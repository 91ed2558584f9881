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
use crate::state::write_atomically;

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

impl Manager {
    /// The instances this manager set up, remembered beside their env files.
    fn manifest(&self) -> PathBuf {
        self.config_dir.join(".hail-manager.instances")
    }

    fn managed(&self) -> Vec<ProfileName> {
        std::fs::read_to_string(self.manifest())
            .unwrap_or_default()
            .lines()
            .filter_map(|l| ProfileName::parse(l).ok())
            .collect()
    }

    pub fn parse_instances(json: &str) -> Result<BTreeMap<ProfileName, Instance>> {
        let raw: BTreeMap<String, Instance> =
            serde_json::from_str(json).context("the manager's instance list is not valid")?;
        let mut instances = BTreeMap::new();
        for (name, instance) in raw {
            let profile = ProfileName::parse(instance.profile.as_deref().unwrap_or(&name))
                .map_err(|e| anyhow!("instance {name:?}: {e}"))?;
            JobUri::parse(&instance.job_uri).map_err(|e| anyhow!("instance {name:?}: {e}"))?;
            for (key, value) in &instance.environment {
                if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    bail!("instance {name:?}: {key:?} is not an environment variable name");
                }
                if value.chars().any(|c| c.is_control() && c != '\t') {
                    bail!(
                        "instance {name:?}: the value of {key} has a control character (newline?)"
                    );
                }
            }
            if instances.insert(profile.clone(), instance).is_some() {
                bail!("two instances deploy profile {profile}; give each its own profile");
            }
        }
        Ok(instances)
    }

    pub fn activate(&self, instances: &BTreeMap<ProfileName, Instance>) -> Result<()> {
        let before = self.managed();
        for gone in before.iter().filter(|p| !instances.contains_key(*p)) {
            self.remove(gone)?;
        }
        for (profile, instance) in instances {
            self.install(profile, instance)?;
        }
        let manifest: String = instances.keys().map(|p| format!("{p}\n")).collect();
        write_atomically(&self.manifest(), manifest.as_bytes())?;
        systemctl(&["daemon-reload"])?;
        for (profile, instance) in instances {
            let unit = profile.systemd_escaped();
            systemctl(&["enable", "--now", &format!("hail@{unit}.timer")])?;
            let boot = format!("hail-activate@{unit}.service");
            if instance.activate_at_boot {
                systemctl(&["enable", &boot])?;
            } else {
                systemctl(&["disable", &boot])?;
            }
            // An instance this manager did not run before, whose profile exists
            // (say it was dropped, which deactivated it, and is listed again):
            // its pass would find the profile up to date and not activate it, so
            // the boot unit does. Not waited for: if the instance is this
            // manager itself, that activation waits for the one running now.
            let profile_exists = self.profiles_dir.join(profile.as_str()).exists();
            if !before.contains(profile) && profile_exists {
                systemctl(&["start", "--no-block", &boot])?;
            }
        }
        log::info!(
            "manager: instances {:?}",
            instances
                .keys()
                .map(ProfileName::as_str)
                .collect::<Vec<_>>()
        );
        Ok(())
    }

    /// Takes down every instance this manager set up.
    pub fn deactivate(&self) -> Result<()> {
        for profile in self.managed() {
            self.remove(&profile)?;
        }
        remove_file(&self.manifest())?;
        systemctl(&["daemon-reload"])
    }

    fn env_file(&self, profile: &ProfileName) -> PathBuf {
        self.config_dir.join(format!("{profile}.env"))
    }

    fn timer_dropin(&self, profile: &ProfileName) -> PathBuf {
        self.unit_dir
            .join(format!("hail@{}.timer.d", profile.systemd_escaped()))
            .join("hail-manager.conf")
    }

    fn install(&self, profile: &ProfileName, instance: &Instance) -> Result<()> {
        let mut env = BTreeMap::new();
        env.insert("HAIL_PROFILE".to_owned(), profile.to_string());
        env.insert("HAIL_JOB_URI".to_owned(), instance.job_uri.clone());
        if let Some(netrc) = &instance.netrc_file {
            env.insert("HAIL_NETRC_FILE".to_owned(), netrc.clone());
        }
        env.extend(instance.environment.clone());
        let text: String = env
            .iter()
            .map(|(k, v)| format!("{k}={}\n", quote_env(v)))
            .collect();
        write_atomically(&self.env_file(profile), text.as_bytes())?;

        let dropin = self.timer_dropin(profile);
        match &instance.poll_period {
            Some(period) => {
                if period.is_empty() || period.chars().any(|c| c.is_control()) {
                    bail!("instance {profile}: poll period {period:?} is not a time span");
                }
                // The empty assignment resets every trigger, so OnBootSec comes back too.
                let conf = format!(
                    "[Timer]\nOnUnitInactiveSec=\nOnBootSec=1min\nOnUnitInactiveSec={period}\n"
                );
                write_atomically(&dropin, conf.as_bytes())?;
            }
            None => remove_file(&dropin)?,
        }
        Ok(())
    }

    fn remove(&self, profile: &ProfileName) -> Result<()> {
        let unit = profile.systemd_escaped();
        log::info!("manager: removing instance {profile}");
        // Stop polling first, so no pass redeploys what is being taken down.
        systemctl(&[
            "disable",
            "--now",
            &format!("hail@{unit}.timer"),
            &format!("hail-activate@{unit}.service"),
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
                .with_context(|| format!("deactivating instance {profile}"))?;
        }
        remove_file(&self.env_file(profile))?;
        let dropin = self.timer_dropin(profile);
        remove_file(&dropin)?;
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

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
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
        let names: Vec<&str> = instances.keys().map(|p| p.as_str()).collect();
        assert_eq!(names, ["hail-profiles/db", "web"]);
        assert!(!instances[&ProfileName::parse("hail-profiles/db").unwrap()].activate_at_boot);

        for bad in [
            r#"{"web": {"jobUri": "ftp://x/job/p/j/web"}}"#,
            r#"{"../x": {"jobUri": "https://h/job/p/j/web"}}"#,
            r#"{"a": {"jobUri": "https://h/job/p/j/a", "profile": "x"}, "b": {"jobUri": "https://h/job/p/j/b", "profile": "x"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "pollperiod": "1min"}}"#,
            r#"{"web": {"jobUri": "https://h/job/p/j/web", "environment": {"A B": "x"}}}"#,
        ] {
            assert!(Manager::parse_instances(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_values_are_quoted() {
        assert_eq!(quote_env(r#"a "b" \c"#), r#""a \"b\" \\c""#);
    }
}
