//! One pass: the only place that decides. Ask Hydra, compare with the
//! profile, switch and activate if they differ.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::activate::{self, Activation};
use crate::hydra::{self, Build};
use crate::profile::Profile;
use crate::report;
use crate::state::StateDir;
use crate::store_path::StoreDir;

pub struct Pass {
    pub hydra: hydra::Client,
    pub profile: Profile,
    pub store: StoreDir,
    pub state: StateDir,
    pub lock_timeout: Duration,
    pub activate_timeout: Duration,
    pub dry_run: bool,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    UpToDate,
    Deployed,
    WouldDeploy,
}

/// The pass failed at activation (exit status 3), after the profile changed.
#[derive(Debug)]
pub struct ActivationFailed;

impl std::fmt::Display for ActivationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("activation failed")
    }
}

impl std::error::Error for ActivationFailed {}

impl Pass {
    pub fn run(&self) -> Result<Outcome> {
        // A dry run changes nothing, so it needs no lock (nor a writable state dir).
        let _lock = if self.dry_run {
            None
        } else {
            report::status("waiting for the profile lock");
            Some(self.state.lock(&self.profile.name, self.lock_timeout)?)
        };

        report::status(&format!("asking Hydra for {}", self.hydra.job()));
        let build = self.hydra.latest_build()?;
        let current = self.profile.current_target(&self.store)?;

        if current.as_ref() == Some(&build.out_path) {
            log::info!("up to date: build {} ({})", build.id, build.out_path);
            report::status(&format!("up to date: build {}", build.id));
            return Ok(Outcome::UpToDate);
        }
        if self.dry_run {
            println!(
                "would deploy build {} {} (profile {} is at {})",
                build.id,
                build.out_path,
                self.profile.path().display(),
                current
                    .as_ref()
                    .map_or("nothing yet".into(), |c| c.to_string())
            );
            return Ok(Outcome::WouldDeploy);
        }
        self.deploy(&build, current.as_ref().map(|c| c.as_str()).unwrap_or(""))?;
        Ok(Outcome::Deployed)
    }

    fn deploy(&self, build: &Build, previous: &str) -> Result<()> {
        log::info!("deploying build {} ({})", build.id, build.out_path);
        report::status(&format!("realising build {} {}", build.id, build.out_path));
        self.profile
            .switch_to(&build.out_path)
            .with_context(|| format!("build {} was not deployed", build.id))?;

        report::status(&format!("activating build {}", build.id));
        let id = build.id.to_string();
        let env = [
            ("HAIL_PROFILE", self.profile.name.as_str()),
            ("HAIL_BUILD_ID", id.as_str()),
            ("HAIL_STORE_PATH", build.out_path.as_str()),
            ("HAIL_PREVIOUS_STORE_PATH", previous),
        ];
        match activate::run(self.profile.path(), &env, self.activate_timeout)? {
            Activation::Succeeded => {
                log::info!("deployed build {} ({})", build.id, build.out_path);
                report::status(&format!("deployed build {}", build.id));
                Ok(())
            }
            Activation::NoScript => {
                log::warn!(
                    "deployed build {} ({}), but it has no bin/activate: nothing was activated",
                    build.id,
                    build.out_path
                );
                report::status(&format!(
                    "deployed build {} (nothing to activate)",
                    build.id
                ));
                Ok(())
            }
            Activation::Failed(failure) => {
                report::status(&format!("activation of build {} failed", build.id));
                Err(anyhow::Error::new(ActivationFailed).context(format!(
                    "activation of build {} ({}) {}{}",
                    build.id,
                    build.out_path,
                    failure.how,
                    failure
                        .stderr_tail
                        .map(|t| format!("; its last words:\n{t}"))
                        .unwrap_or_default()
                )))
            }
        }
    }
}

/// `hail activate`: re-run the profile's activation, e.g. at boot.
pub fn activate_existing(profile: &Profile, store: &StoreDir, timeout: Duration) -> Result<()> {
    let Some(current) = profile.current_target(store)? else {
        log::info!(
            "profile {} does not exist yet; nothing to activate",
            profile.path().display()
        );
        return Ok(());
    };
    report::status(&format!("activating {current}"));
    let env = [
        ("HAIL_PROFILE", profile.name.as_str()),
        ("HAIL_STORE_PATH", current.as_str()),
    ];
    match activate::run(profile.path(), &env, timeout)? {
        Activation::Succeeded => {
            log::info!("activated {current}");
            Ok(())
        }
        Activation::NoScript => {
            log::warn!("{current} has no bin/activate: nothing to activate");
            Ok(())
        }
        Activation::Failed(failure) => Err(anyhow::Error::new(ActivationFailed).context(format!(
            "activation of {current} {}{}",
            failure.how,
            failure
                .stderr_tail
                .map(|t| format!("; its last words:\n{t}"))
                .unwrap_or_default()
        ))),
    }
}
