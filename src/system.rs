//! Whole NixOS hosts: a build whose output is a NixOS system goes only to the
//! profile `system`, whose generations NixOS boots, and nothing else goes
//! there; it is activated as `nixos-rebuild` does it, with its own
//! `bin/switch-to-configuration`. After a switch hail makes sure the host
//! can still reach Hydra, or the pass rolls back.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};

use crate::activate::{self, Activation, ActivationFailure, Runner};
use crate::failure::{Failure, FailureKind};
use crate::hydra::{self, Build};
use crate::profile::{Profile, ProfileName};
use crate::report;
use crate::store_path::{StoreDir, StorePath};

/// The one profile a NixOS system is deployed to (`/nix/var/nix/profiles/system`,
/// whose generations NixOS boots).
pub const SYSTEM_PROFILE: &str = "system";

/// How long to wait between tries to reach Hydra after a switch.
const CONFIRM_RETRY: Duration = Duration::from_secs(2);

/// What `switch-to-configuration` does with the new system.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Operation {
    /// Activate it now and make it the boot default.
    Switch,
    /// Make it the boot default only: it runs from the next boot.
    Boot,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Switch => "switch",
            Self::Boot => "boot",
        }
    }
}

/// Whether the store path `path` is a NixOS system: it has `nixos-version`
/// and `bin/switch-to-configuration`.
pub fn is_system(path: &Path) -> bool {
    path.join("nixos-version").is_file() && path.join("bin/switch-to-configuration").is_file()
}

/// Whether `profile` is the profile NixOS systems go to.
pub fn is_system_profile(profile: &ProfileName) -> bool {
    profile.as_str() == SYSTEM_PROFILE
}

/// Refuses (exit 1, before the profile changes) a NixOS system for any
/// profile but `system`, and anything else for `system`, whose generations
/// NixOS puts in the boot menu. Run on the realised path.
pub fn check_deployable(profile: &ProfileName, store_path: &StorePath) -> Result<()> {
    let system = is_system(store_path.as_path());
    let refusal = match (system, is_system_profile(profile)) {
        (true, false) => format!(
            "{store_path} is a NixOS system (it has nixos-version and \
             bin/switch-to-configuration); hail deploys a system only to the profile \
             {SYSTEM_PROFILE}, not to {profile}: use `--profile {SYSTEM_PROFILE}` \
             (HAIL_PROFILE={SYSTEM_PROFILE}) for this job"
        ),
        (false, true) => format!(
            "{store_path} is not a NixOS system (it lacks nixos-version or \
             bin/switch-to-configuration), and the profile {SYSTEM_PROFILE} holds only \
             systems (NixOS boots its generations); deploy it to a profile of its own"
        ),
        _ => return Ok(()),
    };
    Err(Failure::tagged(FailureKind::State, anyhow!(refusal)))
}

/// How hail deploys NixOS systems.
#[derive(Debug, Clone)]
pub struct Nixos {
    /// `--nixos-operation`.
    pub operation: Operation,
    /// After a switch, how long hail keeps trying to reach Hydra before it
    /// rolls back; zero: it does not check.
    pub confirm_timeout: Duration,
}

impl Nixos {
    /// What activates a build in `profile`, for messages: `activate`, or
    /// for a system `switch-to-configuration switch` (or `boot`).
    pub fn activation_name(&self, profile: &ProfileName) -> String {
        if is_system_profile(profile) {
            format!("switch-to-configuration {}", self.operation.as_str())
        } else {
            "activate".to_owned()
        }
    }

    /// The activation of the system `profile` points to: its
    /// `bin/switch-to-configuration`, run as activate is (see
    /// [`activate::run_switch`]).
    pub fn switch(
        &self,
        profile: &Profile,
        store: &StoreDir,
        runner: &Runner,
        env: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<Activation> {
        let system = profile
            .current_target(store)?
            .with_context(|| format!("profile {} does not exist", profile.path().display()))?;
        let operation = self.operation;
        report::status(&format!(
            "switch-to-configuration {} for {system}",
            operation.as_str()
        ));
        activate::run_switch(
            profile.path(),
            &system,
            operation.as_str(),
            runner,
            env,
            timeout,
        )
    }

    /// After a successful `switch` to `build`, whether the host can still
    /// reach Hydra: the `JOB/latest` exchange, again until it succeeds or
    /// `--confirm-timeout` runs out. A host the new system cut off is a
    /// failed activation, rolled back like one. Anything else is `activation`
    /// unchanged.
    pub fn confirm(
        &self,
        profile: &ProfileName,
        activation: Activation,
        hydra: &hydra::Client,
        build: &Build,
    ) -> Activation {
        let switched = is_system_profile(profile)
            && matches!(activation, Activation::Succeeded)
            && self.operation == Operation::Switch;
        if !switched || self.confirm_timeout.is_zero() {
            return activation;
        }
        let secs = self.confirm_timeout.as_secs_f64();
        report::status(&format!(
            "switched to build {}; checking that Hydra still answers (up to {secs} s)",
            build.id
        ));
        let deadline = Instant::now() + self.confirm_timeout;
        let mut tries = 0;
        loop {
            tries += 1;
            let err = match hydra.latest(Some(build.id)) {
                Ok(_) => return activation,
                Err(err) => err,
            };
            let now = Instant::now();
            if now >= deadline {
                return Activation::Failed(ActivationFailure {
                    how: format!(
                        "succeeded, but then hail could not reach Hydra for {secs} s ({tries} \
                         tries; the last: {err:#}): the new system may have cut the host off"
                    ),
                    stderr_tail: None,
                });
            }
            if tries == 1 {
                log::warn!(
                    "cannot reach Hydra after switching to build {} ({err:#}); trying again for \
                     up to {secs} s before rolling back",
                    build.id
                );
            }
            std::thread::sleep(CONFIRM_RETRY.min(deadline - now));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_path::StoreDir;

    /// A NixOS-like system in `dir`: `nixos-version` and a switch script.
    fn fake_system(dir: &Path) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("nixos-version"), "26.05").unwrap();
        std::fs::write(dir.join("bin/switch-to-configuration"), "").unwrap();
    }

    #[test]
    fn messages_name_what_activates() {
        let boot = Nixos {
            operation: Operation::Boot,
            confirm_timeout: Duration::from_secs(60),
        };
        let name = |profile| boot.activation_name(&ProfileName::parse(profile).unwrap());
        assert_eq!(name("system"), "switch-to-configuration boot");
        assert_eq!(name("web"), "activate");
    }

    #[test]
    fn systems_go_to_the_system_profile_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path());
        let system_path = dir
            .path()
            .join("0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-nixos-system-web");
        fake_system(&system_path);
        let other_path = dir.path().join("1c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-web");
        std::fs::create_dir_all(other_path.join("bin")).unwrap();
        std::fs::write(other_path.join("bin/activate"), "").unwrap();
        let parse = |path: &Path| store.parse(&path.to_string_lossy()).unwrap();
        let (system_build, other_build) = (parse(&system_path), parse(&other_path));
        let profile = |name| ProfileName::parse(name).unwrap();

        assert!(check_deployable(&profile("system"), &system_build).is_ok());
        assert!(check_deployable(&profile("web"), &other_build).is_ok());
        let refused = check_deployable(&profile("web"), &system_build).unwrap_err();
        assert!(
            format!("{refused:#}").contains("use `--profile system`"),
            "{refused:#}"
        );
        assert_eq!(crate::failure::exit_status(&refused), 1);
        let refused = check_deployable(&profile("system"), &other_build).unwrap_err();
        assert!(
            format!("{refused:#}").contains("is not a NixOS system"),
            "{refused:#}"
        );
        // Half a system is no system.
        std::fs::remove_file(system_path.join("nixos-version")).unwrap();
        assert!(!is_system(&system_path));
    }
}
