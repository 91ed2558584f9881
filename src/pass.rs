//! One pass: the only place that decides. Ask Hydra, compare with the
//! profile and with what hail remembers, then switch, activate, and roll back
//! if activation fails.

use std::cell::Cell;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use log::Level;

use crate::activate::{self, Activation, ActivationFailure, Runner};
use crate::hydra::{self, Build};
use crate::metrics;
use crate::profile::Profile;
use crate::report::{self, message_id};
use crate::state::{
    self, ActivationState, Check, Deployment, FailedBuild, Hold, LastError, Previous, State,
    StateDir, Waiting,
};
use crate::store_path::{StoreDir, StorePath};

/// Exit status for failures that changed nothing.
pub const EXIT_FAILED: u8 = 1;
/// Exit status for a failed activation (rolled back), or a failed build
/// that is still Hydra's latest.
pub const EXIT_ACTIVATION_FAILED: u8 = 3;

pub struct Pass {
    pub hydra: hydra::Client,
    pub profile: Profile,
    pub store: StoreDir,
    pub state: StateDir,
    pub runner: Runner,
    pub lock_timeout: Duration,
    /// Bound on each nix-env call.
    pub nix_timeout: Duration,
    pub activate_timeout: Duration,
    pub dry_run: bool,
    /// Deploy a build even though its activation failed before.
    pub retry_failed: bool,
    /// Deploy Hydra's latest even though an operator rolled the profile back.
    pub force: bool,
    /// Deploy a build only once it has been finished this long.
    pub min_build_age: Option<Duration>,
    /// After a successful deploy, keep only this many generations.
    pub keep_generations: Option<u64>,
    pub metrics_file: Option<PathBuf>,
    /// What the pass is doing, which names the kind of a failure
    /// (`Default::default()` when building a pass).
    pub step: Cell<Step>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Step {
    #[default]
    State,
    Hydra,
    Nix,
    Activation,
}

impl Step {
    fn kind(self) -> &'static str {
        match self {
            Self::State => "state",
            Self::Hydra => "hydra",
            Self::Nix => "nix",
            Self::Activation => "activation",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    UpToDate,
    Deployed,
    /// An interrupted activation of the current build was run again.
    Reactivated,
    /// The profile was moved away from hail's deployment; hail holds off.
    Held,
    /// Hydra's build is newer but younger than `--min-build-age`.
    Waiting,
    WouldDeploy,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::UpToDate => "up-to-date",
            Self::Deployed => "deployed",
            Self::Reactivated => "reactivated",
            Self::Held => "held",
            Self::Waiting => "waiting",
            Self::WouldDeploy => "would-deploy",
        }
    }
}

/// What a pass does about Hydra's build; see [`Pass::plan`].
#[derive(Debug)]
enum Plan {
    /// Run the interrupted activation of the build the profile is at.
    Reactivate,
    UpToDate,
    /// The build failed to activate before: exit 3 without touching anything.
    RefuseFailed(FailedBuild),
    /// An operator moved the profile away from this deployment.
    Hold(Deployment),
    /// Newer, but younger than `--min-build-age`.
    Wait {
        eligible_at: u64,
    },
    Deploy,
}

/// An error that ends the pass with exit status 3: activation failed.
#[derive(Debug)]
pub struct ActivationFailed(pub String);

impl std::fmt::Display for ActivationFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ActivationFailed {}

/// The exit status an error stands for.
pub fn exit_status(err: &anyhow::Error) -> u8 {
    if err.chain().any(|cause| cause.is::<ActivationFailed>()) {
        EXIT_ACTIVATION_FAILED
    } else {
        EXIT_FAILED
    }
}

impl Pass {
    pub fn run(&self) -> Result<Outcome> {
        if self.dry_run {
            // A dry run changes nothing: no lock, no state, no nix.
            return self.dry_run();
        }
        report::status("waiting for the profile lock");
        let _lock = self.state.lock(&self.profile.name, self.lock_timeout)?;
        let mut state = self.state.load_for_update(&self.profile.name);
        let mut latest = None;
        let result = self.decide(&mut state, &mut latest);
        if !matches!(result, Ok(Outcome::Waiting)) {
            state.waiting = None;
        }
        self.record(&mut state, &result, latest);

        let saved =
            self.state
                .save(&self.profile.name, &state)
                .and_then(|()| match &self.metrics_file {
                    Some(path) => metrics::write(path, &self.profile.name, &state),
                    None => Ok(()),
                });
        if let Err(err) = saved {
            match result {
                // The pass's own error says more; the state is secondary.
                Err(_) => log::warn!("{err:#}"),
                Ok(_) => return Err(err),
            }
        }
        result
    }

    /// Notes how the pass went in the state: last check, last error, counters.
    fn record(&self, state: &mut State, result: &Result<Outcome>, latest: Option<u64>) {
        let at = state::now();
        match result {
            Ok(outcome) => {
                let at_latest = matches!(
                    outcome,
                    Outcome::UpToDate | Outcome::Deployed | Outcome::Reactivated
                );
                state.last_check = Some(Check {
                    at,
                    result: outcome.label().into(),
                    latest_build_id: latest,
                    at_latest,
                });
                if at_latest {
                    state.last_success = Some(at);
                }
                if *outcome == Outcome::Deployed {
                    state.counters.deploys += 1;
                }
            }
            Err(err) => {
                let exit_status = exit_status(err);
                let kind = self.step.get().kind();
                let result = if exit_status == EXIT_ACTIVATION_FAILED {
                    "activation-failed"
                } else {
                    "error"
                };
                state.last_check = Some(Check {
                    at,
                    result: result.into(),
                    latest_build_id: latest,
                    at_latest: false,
                });
                state.last_error = Some(LastError {
                    at,
                    message: format!("{err:#}"),
                    exit_status,
                    kind: kind.into(),
                });
                *state.counters.errors.entry(kind.into()).or_default() += 1;
            }
        }
    }

    /// Says what a pass would do now, from Hydra's answer, the profile and
    /// the state, and does none of it.
    fn dry_run(&self) -> Result<Outcome> {
        let build = self.hydra.latest_build()?;
        let current = self.profile.current_target(&self.store)?;
        let state = self.state.load(&self.profile.name);
        let (id, path) = (build.id, &build.out_path);
        let outcome = match self.plan(&state, &build, current.as_ref()) {
            Plan::Reactivate => {
                println!("would run the interrupted activation of build {id} {path} again");
                Outcome::Reactivated
            }
            Plan::UpToDate => {
                println!("up to date: build {id} {path}");
                Outcome::UpToDate
            }
            Plan::RefuseFailed(failed) => {
                println!(
                    "would not deploy build {id} {path}: it failed to activate at {} ({}); \
                     --retry-failed deploys it",
                    report::utc(failed.at),
                    failed.reason
                );
                Outcome::Held
            }
            Plan::Hold(deployed) => {
                println!(
                    "would hold: the profile was moved away from build {} that hail deployed; \
                     a build newer than {} (or --force) deploys",
                    deployed.build_id, deployed.build_id
                );
                Outcome::Held
            }
            Plan::Wait { eligible_at } => {
                println!(
                    "would wait: build {id} {path} becomes eligible at {} (--min-build-age)",
                    report::utc(eligible_at)
                );
                Outcome::Waiting
            }
            Plan::Deploy => {
                println!(
                    "would deploy build {id} {path} (profile {} is at {})",
                    self.profile.path().display(),
                    current
                        .as_ref()
                        .map_or("nothing yet".into(), |c| c.to_string())
                );
                Outcome::WouldDeploy
            }
        };
        Ok(outcome)
    }

    /// What to do about `build`, given where the profile points and what hail
    /// remembers. Decides only; changes nothing.
    fn plan(&self, state: &State, build: &Build, current: Option<&StorePath>) -> Plan {
        let current_str = current.map(StorePath::as_str);
        let latest = build.out_path.as_str();
        if let Some(deployed) = &state.deployed
            && deployed.activation == ActivationState::Pending
            && current_str == Some(latest)
            && deployed.store_path == latest
        {
            // Interrupted between the switch and the end of activate (killed,
            // power loss): the profile is at the build, activation is pending.
            return Plan::Reactivate;
        }
        if current_str == Some(latest) {
            return Plan::UpToDate;
        }
        if let Some(failed) = &state.failed
            && failed.build_id == build.id
            && failed.store_path == latest
            && !self.retry_failed
        {
            return Plan::RefuseFailed(failed.clone());
        }
        if !self.force
            && let Some(deployed) = &state.deployed
        {
            let switch_never_happened = deployed.activation == ActivationState::Pending
                && deployed.previous.as_ref().map(|p| p.store_path.as_str()) == current_str;
            let moved_by_hand =
                !switch_never_happened && current_str != Some(deployed.store_path.as_str());
            if moved_by_hand && build.id <= deployed.build_id {
                return Plan::Hold(deployed.clone());
            }
        }
        if let Some(min_age) = self.min_build_age
            && let Some(eligible_at) = build.stoptime.map(|t| t + min_age.as_secs())
            && eligible_at > state::now()
        {
            return Plan::Wait { eligible_at };
        }
        Plan::Deploy
    }

    fn decide(&self, state: &mut State, latest: &mut Option<u64>) -> Result<Outcome> {
        report::status(&format!("asking Hydra for {}", self.hydra.job()));
        self.step.set(Step::Hydra);
        let build = self.hydra.latest_build()?;
        *latest = Some(build.id);
        self.step.set(Step::State);
        let current = self.profile.current_target(&self.store)?;
        let current_str = current.as_ref().map(StorePath::as_str);
        let plan = self.plan(state, &build, current.as_ref());
        if !matches!(plan, Plan::Hold(_)) {
            state.held = None;
        }
        match plan {
            Plan::Reactivate => {
                report::event(
                    Level::Warn,
                    message_id::ACTIVATION_FAILED,
                    Some((build.id, build.out_path.as_str())),
                    format_args!(
                        "the activation of build {} was interrupted; running it again",
                        build.id
                    ),
                );
                self.activate(state, &build).map(|_| Outcome::Reactivated)
            }
            Plan::UpToDate => {
                report::event(
                    Level::Info,
                    message_id::UP_TO_DATE,
                    Some((build.id, build.out_path.as_str())),
                    format_args!("up to date: build {} ({})", build.id, build.out_path),
                );
                report::status(&format!("up to date: build {}", build.id));
                if state.deployed.as_ref().map(|d| d.store_path.as_str()) != current_str {
                    // Deployed by someone else (or hail's state was lost): adopt it.
                    state.deployed = Some(self.deployment(&build, ActivationState::Done, None));
                }
                state.failed = None;
                Ok(Outcome::UpToDate)
            }
            Plan::RefuseFailed(failed) => {
                report::status(&format!("build {} failed before; not retrying", build.id));
                Err(anyhow::Error::new(ActivationFailed(format!(
                    "build {} ({}) failed to activate {} ago ({}); it stays rolled back while it is \
                     Hydra's latest. A newer build deploys as usual; `--retry-failed` tries this one again",
                    build.id,
                    build.out_path,
                    ago(failed.at),
                    failed.reason
                ))))
            }
            Plan::Hold(deployed) => {
                report::event(
                    Level::Warn,
                    message_id::HELD,
                    Some((deployed.build_id, deployed.store_path.as_str())),
                    format_args!(
                        "holding: profile {} points to {} instead of build {} ({}) that hail deployed; \
                         someone rolled it back or switched generations. hail deploys again when Hydra \
                         has a build newer than {} (or run it with --force)",
                        self.profile.path().display(),
                        current_str.unwrap_or("nothing"),
                        deployed.build_id,
                        deployed.store_path,
                        deployed.build_id
                    ),
                );
                report::status(&format!(
                    "holding: build {} was rolled back by hand",
                    deployed.build_id
                ));
                let since = state.held.as_ref().map_or_else(state::now, |h| h.since);
                state.held = Some(Hold {
                    build_id: deployed.build_id,
                    profile_target: current_str.map(str::to_owned),
                    since,
                });
                Ok(Outcome::Held)
            }
            Plan::Wait { eligible_at } => {
                report::event(
                    Level::Info,
                    message_id::HELD,
                    Some((build.id, build.out_path.as_str())),
                    format_args!(
                        "build {} finished {} ago; it becomes eligible at {} (--min-build-age); \
                         the current deployment stays",
                        build.id,
                        ago(build.stoptime.unwrap_or_default()),
                        report::utc(eligible_at)
                    ),
                );
                report::status(&format!(
                    "waiting: build {} eligible at {}",
                    build.id,
                    report::utc(eligible_at)
                ));
                state.waiting = Some(Waiting {
                    build_id: build.id,
                    store_path: build.out_path.to_string(),
                    eligible_at,
                });
                Ok(Outcome::Waiting)
            }
            Plan::Deploy => self.deploy(state, &build, current),
        }
    }

    fn deployment(
        &self,
        build: &Build,
        activation: ActivationState,
        previous: Option<Previous>,
    ) -> Deployment {
        Deployment {
            build_id: build.id,
            store_path: build.out_path.to_string(),
            generation: self.profile.current_generation(),
            job: self.hydra.job().to_string(),
            at: state::now(),
            activation,
            previous,
        }
    }

    fn deploy(
        &self,
        state: &mut State,
        build: &Build,
        current: Option<StorePath>,
    ) -> Result<Outcome> {
        log::info!("deploying build {} ({})", build.id, build.out_path);
        self.step.set(Step::State);
        let previous = current.map(|path| {
            let same = state
                .deployed
                .as_ref()
                .filter(|d| d.store_path == path.as_str());
            Previous {
                build_id: same.map(|d| d.build_id),
                at: same.map(|d| d.at),
                store_path: path.to_string(),
                generation: self.profile.current_generation(),
            }
        });
        let before = state.deployed.take();
        // Record the intent first: a pass killed after the switch finds the
        // activation pending and finishes it.
        let mut intent = self.deployment(build, ActivationState::Pending, previous);
        intent.generation = None;
        state.deployed = Some(intent);
        self.state.save(&self.profile.name, state)?;

        report::status(&format!("realising build {} {}", build.id, build.out_path));
        self.step.set(Step::Nix);
        if let Err(err) = self.profile.switch_to(&build.out_path, self.nix_timeout) {
            state.deployed = before;
            return Err(err.context(format!("build {} was not deployed", build.id)));
        }
        // The generation is known now; it reaches the disk with the pass's
        // final save (a pass killed before then finds it from the profile).
        if let Some(deployed) = &mut state.deployed {
            deployed.generation = self.profile.current_generation();
        }
        self.activate(state, build)?;
        if let Some(keep) = self.keep_generations {
            self.prune(state, keep);
        }
        Ok(Outcome::Deployed)
    }

    /// Deletes all but the newest `keep` generations; never the current one.
    /// A failure here is worth a warning, not a failed deploy.
    fn prune(&self, state: &State, keep: u64) {
        let current = self.profile.current_generation();
        let deployed = state.deployed.as_ref().and_then(|d| d.generation);
        let generations = match self.profile.generations() {
            Ok(generations) => generations,
            Err(err) => return log::warn!("not pruning generations: {err:#}"),
        };
        let keep_from = generations
            .len()
            .saturating_sub(usize::try_from(keep).unwrap_or(usize::MAX));
        let old: Vec<u64> = generations[..keep_from]
            .iter()
            .copied()
            .filter(|g| Some(*g) != current && Some(*g) != deployed)
            .collect();
        if old.is_empty() {
            return;
        }
        match self.profile.delete_generations(&old, self.nix_timeout) {
            Ok(()) => log::info!("deleted old generations {old:?} (--keep-generations {keep})"),
            Err(err) => log::warn!("{err:#}"),
        }
    }

    /// Runs the deployed build's activate; rolls back if it fails.
    fn activate(&self, state: &mut State, build: &Build) -> Result<()> {
        report::status(&format!("activating build {}", build.id));
        self.step.set(Step::Activation);
        let id = build.id.to_string();
        let previous = state
            .deployed
            .as_ref()
            .and_then(|d| d.previous.as_ref())
            .map(|p| p.store_path.clone())
            .unwrap_or_default();
        let env = [
            ("HAIL_PROFILE", self.profile.name.as_str()),
            ("HAIL_BUILD_ID", id.as_str()),
            ("HAIL_STORE_PATH", build.out_path.as_str()),
            ("HAIL_PREVIOUS_STORE_PATH", previous.as_str()),
        ];
        let activation = activate::run(
            self.profile.path(),
            &self.runner,
            &env,
            self.activate_timeout,
        )?;
        match activation {
            Activation::Succeeded | Activation::NoScript => {
                let (level, note) = match activation {
                    Activation::NoScript => (
                        Level::Warn,
                        ", but it has no bin/activate: nothing was activated",
                    ),
                    _ => (Level::Info, ""),
                };
                report::event(
                    level,
                    message_id::DEPLOYED,
                    Some((build.id, build.out_path.as_str())),
                    format_args!("deployed build {} ({}){note}", build.id, build.out_path),
                );
                if let Some(deployed) = &mut state.deployed {
                    deployed.activation = ActivationState::Done;
                }
                state.failed = None;
                report::status(&format!("deployed build {}", build.id));
                Ok(())
            }
            Activation::Failed(failure) => Err(self.roll_back(state, build, failure)),
        }
    }

    /// Puts the previous generation back (or removes a profile that had
    /// none), re-activates it, remembers the failed build, and returns the
    /// error that ends the pass with exit status 3.
    fn roll_back(
        &self,
        state: &mut State,
        build: &Build,
        failure: ActivationFailure,
    ) -> anyhow::Error {
        report::status(&format!(
            "activation of build {} failed; rolling back",
            build.id
        ));
        report::event(
            Level::Warn,
            message_id::ACTIVATION_FAILED,
            Some((build.id, build.out_path.as_str())),
            format_args!(
                "activation of build {} ({}) {}; rolling back",
                build.id, build.out_path, failure.how
            ),
        );
        state.counters.rollbacks += 1;
        state.failed = Some(FailedBuild {
            build_id: build.id,
            store_path: build.out_path.to_string(),
            at: state::now(),
            reason: format!("activate {}", failure.how),
        });
        let deployed = state.deployed.take();
        // The profile is at the failed build's generation until we switch back.
        let failed_generation = deployed
            .as_ref()
            .and_then(|d| d.generation)
            .or_else(|| self.profile.current_generation());
        let previous = deployed.and_then(|d| d.previous);

        let outcome = match previous.as_ref().and_then(|p| p.generation.map(|g| (p, g))) {
            Some((previous, generation)) => {
                self.restore(state, build, previous, generation, failed_generation)
            }
            None => self.remove_profile(build, failed_generation),
        };
        let outcome = outcome.unwrap_or_else(|err| format!("ROLLING BACK FAILED TOO: {err:#}"));
        report::event(
            Level::Warn,
            message_id::ROLLED_BACK,
            Some((build.id, build.out_path.as_str())),
            format_args!("build {}: {outcome}", build.id),
        );
        report::status(&format!(
            "activation of build {} failed; {outcome}",
            build.id
        ));
        anyhow::Error::new(ActivationFailed(format!(
            "build {} ({}) failed to activate: activate {}; {outcome}{}",
            build.id,
            build.out_path,
            failure.how,
            failure
                .stderr_tail
                .map(|t| format!("\nlast lines of its stderr:\n{t}"))
                .unwrap_or_default()
        )))
    }

    /// A first deploy failed: undo what its activate did (with its own
    /// `bin/deactivate`, if it has one) and remove the profile, so that
    /// nothing half-activated comes back at boot.
    fn remove_profile(&self, build: &Build, generation: Option<u64>) -> Result<String> {
        let id = build.id.to_string();
        let env = [
            ("HAIL_PROFILE", self.profile.name.as_str()),
            ("HAIL_BUILD_ID", id.as_str()),
            ("HAIL_STORE_PATH", build.out_path.as_str()),
        ];
        let deactivate = build.out_path.as_path().join("bin/deactivate");
        let undone =
            match activate::run_script(&deactivate, &self.runner, &env, self.activate_timeout)? {
                Activation::NoScript => "",
                Activation::Succeeded => "ran its bin/deactivate and ",
                Activation::Failed(failure) => {
                    log::warn!("bin/deactivate of build {} {}", build.id, failure.how);
                    "its bin/deactivate failed; "
                }
            };
        self.profile.remove(generation)?;
        Ok(format!(
            "{undone}removed the profile (there was no previous generation)"
        ))
    }

    fn restore(
        &self,
        state: &mut State,
        build: &Build,
        previous: &Previous,
        generation: u64,
        failed_generation: Option<u64>,
    ) -> Result<String> {
        self.profile
            .switch_generation(generation, self.nix_timeout)?;
        if let Some(failed) = failed_generation.filter(|g| *g != generation) {
            self.profile
                .delete_generations(&[failed], self.nix_timeout)?;
        }
        state.deployed = previous.build_id.map(|build_id| Deployment {
            build_id,
            store_path: previous.store_path.clone(),
            generation: Some(generation),
            job: self.hydra.job().to_string(),
            at: previous.at.unwrap_or_else(state::now),
            activation: ActivationState::Done,
            previous: None,
        });
        let id = previous
            .build_id
            .map(|id| id.to_string())
            .unwrap_or_default();
        let env = [
            ("HAIL_PROFILE", self.profile.name.as_str()),
            ("HAIL_BUILD_ID", id.as_str()),
            ("HAIL_STORE_PATH", previous.store_path.as_str()),
            ("HAIL_PREVIOUS_STORE_PATH", build.out_path.as_str()),
        ];
        let back = format!(
            "rolled back to generation {generation} ({})",
            previous.store_path
        );
        match activate::run(
            self.profile.path(),
            &self.runner,
            &env,
            self.activate_timeout,
        )? {
            Activation::Succeeded | Activation::NoScript => {
                Ok(format!("{back} and re-activated it"))
            }
            Activation::Failed(again) => Ok(format!(
                "{back}, but re-activating it failed too: activate {}",
                again.how
            )),
        }
    }
}

/// `hail activate`: re-run the profile's activation, e.g. at boot.
pub fn activate_existing(
    profile: &Profile,
    store: &StoreDir,
    runner: &Runner,
    timeout: Duration,
) -> Result<()> {
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
    match activate::run(profile.path(), runner, &env, timeout).context("boot-time activation")? {
        Activation::Succeeded => {
            log::info!("activated {current}");
            Ok(())
        }
        Activation::NoScript => {
            log::warn!("{current} has no bin/activate: nothing to activate");
            Ok(())
        }
        Activation::Failed(failure) => Err(anyhow::Error::new(ActivationFailed(format!(
            "activation of {current} {}{}",
            failure.how,
            failure
                .stderr_tail
                .map(|t| format!("\nlast lines of its stderr:\n{t}"))
                .unwrap_or_default()
        )))),
    }
}

/// "5 min", "3 h": how long ago a Unix time was.
fn ago(at: u64) -> String {
    let secs = state::now().saturating_sub(at);
    match secs {
        0..120 => format!("{secs} s"),
        120..7200 => format!("{} min", secs / 60),
        7200..172_800 => format!("{} h", secs / 3600),
        _ => format!("{} days", secs / 86_400),
    }
}
