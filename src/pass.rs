//! One pass: the only place that decides. Ask Hydra, compare with the
//! profile and with what hail remembers, then switch, activate, and roll back
//! if activation fails.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use log::Level;

use crate::activate::{self, Activation, ActivationFailure, EarlierActivation, Runner};
use crate::failure::{FailedAs, Failure, FailureKind, kind_of};
use crate::hydra::{self, Build, Latest};
use crate::metrics;
use crate::profile::Profile;
use crate::report::{self, About, message_id};
use crate::state::Prepared;
use crate::state::{
    self, ActivationState, Check, CheckResult, Deployment, FailedBuild, Hold, Previous, Rollback,
    State, StateDir, Waiting,
};
use crate::store_path::{StoreDir, StorePath};
use crate::system::{self, Nixos};

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
    /// How a NixOS system is deployed to the profile `system`.
    pub nixos: Nixos,
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
    /// What the state records; a dry run records nothing.
    fn recorded(self) -> Option<CheckResult> {
        match self {
            Self::UpToDate => Some(CheckResult::UpToDate),
            Self::Deployed => Some(CheckResult::Deployed),
            Self::Reactivated => Some(CheckResult::Reactivated),
            Self::Held => Some(CheckResult::Held),
            Self::Waiting => Some(CheckResult::Waiting),
            Self::WouldDeploy => None,
        }
    }
}

/// What a pass does about Hydra's build; see [`Pass::plan`].
#[derive(Debug)]
enum Plan {
    /// Run the interrupted activation of the build the profile is at.
    Reactivate,
    /// Run the activation that failed at boot again; no rollback if it fails.
    RetryActivation(Deployment),
    /// The activation failed too often in a row: exit 3 until someone acts.
    GiveUpActivation(Deployment),
    UpToDate,
    /// The build failed to activate before: exit 3 without touching anything.
    RefuseFailed(FailedBuild),
    /// An operator moved the profile away from this deployment.
    Hold(Deployment),
    /// Newer, but younger than `--min-build-age`, or of unknown age
    /// (`None`: Hydra gave no usable stoptime), which never deploys early.
    Wait {
        eligible_at: Option<u64>,
    },
    Deploy,
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
        let result = match state.rolling_back.clone() {
            // The profile may point at a build that failed: put it back
            // first, whatever Hydra says (or whether it answers at all).
            Some(rollback) => Err(self.finish_rollback(&mut state, &rollback)),
            None => self.decide(&mut state, &mut latest),
        };
        if !matches!(result, Ok(Outcome::Waiting)) {
            state.waiting = None;
        }
        self.record(&mut state, &result, latest);
        let reboot_into =
            self.nixos
                .note_reboot(&self.profile, &self.store, &mut state, result.is_ok());

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
                // The profile changed: exit 1 ("nothing changed") would be false.
                Ok(Outcome::Deployed | Outcome::Reactivated) => report::event(
                    Level::Error,
                    message_id::ERROR,
                    About::default(),
                    format_args!("the deployment succeeded, but {err:#}"),
                ),
                Ok(_) => return Err(err),
            }
        }
        if let Some(system) = reboot_into {
            system::reboot(&system);
        }
        result
    }

    /// Notes how the pass went in the state: last check, last error, counters.
    fn record(&self, state: &mut State, result: &Result<Outcome>, latest: Option<u64>) {
        let at = state::now();
        match result {
            Ok(outcome) => {
                let Some(result) = outcome.recorded() else {
                    return;
                };
                let at_latest = matches!(
                    outcome,
                    Outcome::UpToDate | Outcome::Deployed | Outcome::Reactivated
                );
                state.last_check = Some(Check {
                    at,
                    result,
                    latest_build_id: latest,
                    at_latest,
                });
                if at_latest {
                    state.last_success = Some(at);
                }
                if *outcome == Outcome::Deployed {
                    state.counters.deploys = state.counters.deploys.saturating_add(1);
                }
            }
            Err(err) => {
                let kind = kind_of(err);
                state.last_check = Some(Check {
                    at,
                    result: match kind {
                        FailureKind::Activation => CheckResult::ActivationFailed,
                        _ => CheckResult::Error,
                    },
                    latest_build_id: latest,
                    at_latest: false,
                });
                state.record_error(kind, format!("{err:#}"));
            }
        }
    }

    /// Says what a pass would do now, from Hydra's answer, the profile and
    /// the state, and does none of it.
    fn dry_run(&self) -> Result<Outcome> {
        let current = self.profile.current_target(&self.store)?;
        let state = self.state.load(&self.profile.name);
        let known = unchanged_build(&state, current.as_ref(), &self.hydra.source());
        let (latest, _) = self.hydra.latest(known, state.evaluations.as_ref());
        let build = match latest.failed_as(FailureKind::Hydra)? {
            Latest::Unchanged(id) => {
                let path = state
                    .deployed
                    .as_ref()
                    .map_or("", |d| d.store_path.as_str());
                println!("up to date: build {id} {path}");
                return Ok(Outcome::UpToDate);
            }
            Latest::Build(build) => build,
        };
        let (id, path) = (build.id, &build.out_path);
        let outcome = match self.plan(&state, &build, current.as_ref()) {
            Plan::Reactivate => {
                println!("would run the interrupted activation of build {id} {path} again");
                Outcome::Reactivated
            }
            Plan::RetryActivation(deployed) => {
                println!(
                    "would run the activation of build {id} {path} again: it failed {} time(s) in a row",
                    deployed.activation_failures
                );
                Outcome::Reactivated
            }
            Plan::GiveUpActivation(deployed) => {
                println!(
                    "would not activate build {id} {path} again: it failed {} times in a row",
                    deployed.activation_failures
                );
                Outcome::Held
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
                    "would hold: the profile was moved away from {} that was deployed; \
                     {} (or --force) deploys",
                    deployed.describe(),
                    what_ends_a_hold(&deployed)
                );
                Outcome::Held
            }
            Plan::Wait { eligible_at } => {
                println!(
                    "would wait: build {id} {path} {} (--min-build-age)",
                    eligibility(eligible_at)
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
            && current_str == Some(latest)
            && deployed.store_path == latest
        {
            match deployed.activation {
                // Interrupted between the switch and the end of activate
                // (killed, power loss): the profile is at the build.
                ActivationState::Pending => return Plan::Reactivate,
                // Activated once, then failed (at boot): run it again, a few times.
                ActivationState::Failed
                    if deployed.activation_failures < MAX_ACTIVATION_FAILURES =>
                {
                    return Plan::RetryActivation(deployed.clone());
                }
                ActivationState::Failed => return Plan::GiveUpActivation(deployed.clone()),
                ActivationState::Done => {}
            }
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
            // Held until Hydra offers a newer build than the one moved away
            // from (for one hail did not deploy: another build than it).
            let not_newer = match deployed.build_id {
                Some(id) => build.id <= id,
                None => deployed.store_path == latest,
            };
            if moved_by_hand && not_newer {
                return Plan::Hold(deployed.clone());
            }
        }
        if let Some(min_age) = self.min_build_age {
            // Fails closed: an unknown (or absurd) stoptime is not old enough.
            let eligible_at = build
                .stoptime
                .and_then(|t| t.checked_add(min_age.as_secs()));
            if eligible_at.is_none_or(|at| at > state::now()) {
                return Plan::Wait { eligible_at };
            }
        }
        Plan::Deploy
    }

    fn decide(&self, state: &mut State, latest: &mut Option<u64>) -> Result<Outcome> {
        let current = self.profile.current_target(&self.store)?;
        self.reconcile(state, current.as_ref());
        if let Some(build) = self.unfinished_system_switch(state, current.as_ref()) {
            return self.resume_activation(state, &build);
        }
        report::status(&format!("asking Hydra for {}", self.hydra.job()));
        let known = unchanged_build(state, current.as_ref(), &self.hydra.source());
        let (answer, evaluations) = self.hydra.latest(known, state.evaluations.as_ref());
        if evaluations.is_some() {
            state.evaluations = evaluations;
        }
        let build = match answer.failed_as(FailureKind::Hydra)? {
            Latest::Unchanged(id) => {
                *latest = Some(id);
                let path = state
                    .deployed
                    .as_ref()
                    .map_or("", |d| d.store_path.as_str());
                report_up_to_date(id, path);
                return Ok(Outcome::UpToDate);
            }
            Latest::Build(build) => build,
        };
        *latest = Some(build.id);
        let current_str = current.as_ref().map(StorePath::as_str);
        let plan = self.plan(state, &build, current.as_ref());
        if !matches!(plan, Plan::Hold(_)) {
            state.held = None;
        }
        match plan {
            Plan::Reactivate => self.resume_activation(state, &build),
            Plan::RetryActivation(deployed) => {
                report::event(
                    Level::Warn,
                    message_id::ACTIVATION_FAILED,
                    About::build(build.id, build.out_path.as_str()),
                    format_args!(
                        "the activation of build {} failed {} time(s) in a row (at boot); running it again",
                        build.id, deployed.activation_failures
                    ),
                );
                self.retry_activation(state, &build)
            }
            Plan::GiveUpActivation(deployed) => Err(Failure::of_build(
                Some(build.id),
                build.out_path.as_str(),
                format!(
                    "the activation of build {} ({}) failed {} times in a row; hail does not run it \
                     again. Fix what it needs and run `systemctl start hail-activate@INSTANCE` (or \
                     `hail activate`), or publish a new build{}",
                    build.id,
                    build.out_path,
                    deployed.activation_failures,
                    state
                        .last_error
                        .as_ref()
                        .map(|e| format!("; the last error: {}", e.message))
                        .unwrap_or_default()
                ),
            )),
            Plan::UpToDate => {
                report_up_to_date(build.id, build.out_path.as_str());
                let source = self.hydra.source();
                let known = state.deployed.as_ref().is_some_and(|d| {
                    d.store_path == build.out_path.as_str()
                        && d.build_id == Some(build.id)
                        && d.source.as_deref() == Some(source.as_str())
                });
                if !known {
                    // Deployed by someone else (or hail's state was lost): adopt
                    // it, keeping when it was deployed if the record knows.
                    let at = state
                        .deployed
                        .as_ref()
                        .filter(|d| d.store_path == build.out_path.as_str())
                        .map(|d| d.at);
                    let mut adopted = self.deployment(&build, ActivationState::Done, None);
                    adopted.at = at.unwrap_or(adopted.at);
                    state.deployed = Some(adopted);
                }
                state.failed = None;
                Ok(Outcome::UpToDate)
            }
            Plan::RefuseFailed(failed) => {
                report::status(&format!("build {} failed before; not retrying", build.id));
                Err(Failure::of_build(
                    Some(build.id),
                    build.out_path.as_str(),
                    format!(
                        "build {} ({}) failed to activate {} ago ({}); it stays rolled back while \
                         it is Hydra's latest. A newer build deploys as usual; `--retry-failed` \
                         tries this one again",
                        build.id,
                        build.out_path,
                        ago(failed.at),
                        failed.reason
                    ),
                ))
            }
            Plan::Hold(deployed) => {
                let moved_from = deployed.describe();
                report::event(
                    Level::Warn,
                    message_id::HELD,
                    About {
                        build_id: deployed.build_id,
                        store_path: Some(&deployed.store_path),
                    },
                    format_args!(
                        "holding: profile {} points to {} instead of {moved_from} that was deployed; \
                         someone rolled it back or switched generations. hail deploys again when Hydra \
                         has {} (or run it with --force)",
                        self.profile.path().display(),
                        current_str.unwrap_or("nothing"),
                        what_ends_a_hold(&deployed),
                    ),
                );
                report::status(&format!("holding: {moved_from} was rolled back by hand"));
                let since = state.held.as_ref().map_or_else(state::now, |h| h.since);
                state.held = Some(Hold {
                    build_id: deployed.build_id,
                    profile_target: current_str.map(str::to_owned),
                    since,
                });
                Ok(Outcome::Held)
            }
            Plan::Wait { eligible_at } => {
                let age = match build.stoptime {
                    Some(stoptime) if eligible_at.is_some() => {
                        format!("finished {} ago", ago(stoptime))
                    }
                    _ => {
                        "has no usable stoptime in Hydra's answer, so its age is unknown".to_owned()
                    }
                };
                report::event(
                    Level::Info,
                    message_id::HELD,
                    About::build(build.id, build.out_path.as_str()),
                    format_args!(
                        "build {} {age}; it {} (--min-build-age); the current deployment stays",
                        build.id,
                        eligibility(eligible_at)
                    ),
                );
                report::status(&format!(
                    "waiting: build {} {}",
                    build.id,
                    eligibility(eligible_at)
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

    fn reconcile(&self, state: &mut State, current: Option<&StorePath>) {
        let Some(current) = current else { return };
        adopt_profile(state, &self.profile, &self.store, self.hydra.job(), current);
        // A pass killed after its switch saved no generation number.
        if let Some(deployed) = &mut state.deployed
            && deployed.generation.is_none()
            && deployed.store_path == current.as_str()
        {
            deployed.generation = self.profile.current_generation();
        }
    }

    /// A NixOS system the profile was switched to by a pass that ended
    /// before the switch and its check did (killed, or its unit restarted
    /// while the switch went on in its own). It is finished before Hydra is
    /// asked anything: the check is whether the host still reaches Hydra, and
    /// a host the new system cut off could not ask what to deploy instead.
    fn unfinished_system_switch(
        &self,
        state: &State,
        current: Option<&StorePath>,
    ) -> Option<Build> {
        if !system::is_system_profile(&self.profile.name) {
            return None;
        }
        let deployed = state
            .deployed
            .as_ref()
            .filter(|d| d.activation == ActivationState::Pending)?;
        let current = current.filter(|c| c.as_str() == deployed.store_path)?;
        Some(Build {
            id: deployed.build_id?,
            out_path: current.clone(),
            stoptime: None,
            system: String::new(),
        })
    }

    /// The pass that switched to `build` ended before its activation did
    /// (killed, or its unit stopped or restarted). An activation that went
    /// on in its own transient unit and recorded its end counts as it
    /// ended: not run a second time. Otherwise activate runs again.
    fn resume_activation(&self, state: &mut State, build: &Build) -> Result<Outcome> {
        let switched_at = state.deployed.as_ref().map_or(0, |d| d.at);
        let earlier = activate::earlier_activation(
            &self.runner,
            &self.state,
            &self.profile.name,
            &build.out_path,
            self.activate_timeout,
        )
        .failed_as(FailureKind::Activation)?
        .filter(|earlier| earlier.finished_at >= switched_at)
        // A system switch that succeeded is checked as in the pass itself.
        .map(|earlier| EarlierActivation {
            outcome: self
                .nixos
                .confirm(&self.profile.name, earlier.outcome, &self.hydra, build),
            ..earlier
        });
        let Some(earlier) = earlier else {
            report::event(
                Level::Warn,
                message_id::ACTIVATION_FAILED,
                About::build(build.id, build.out_path.as_str()),
                format_args!(
                    "the activation of build {} was interrupted; running it again",
                    build.id
                ),
            );
            return self.activate(state, build, Outcome::Reactivated);
        };
        match earlier.outcome {
            Activation::Failed(failure) => Err(self.roll_back(state, build, failure)),
            Activation::Succeeded | Activation::NoScript => {
                mark_activated(state);
                report::event(
                    Level::Info,
                    message_id::DEPLOYED,
                    About::build(build.id, build.out_path.as_str()),
                    format_args!(
                        "deployed build {} ({}): its activation outlived the pass that started it \
                         and succeeded in its own unit",
                        build.id, build.out_path
                    ),
                );
                report::status(&format!("deployed build {}", build.id));
                Ok(Outcome::Deployed)
            }
        }
    }

    /// Runs the activation of the deployed build again after it failed at
    /// boot. It worked once, so a failure is not rolled back: it is counted,
    /// and retried by the next passes up to [`MAX_ACTIVATION_FAILURES`].
    fn retry_activation(&self, state: &mut State, build: &Build) -> Result<Outcome> {
        report::status(&format!("activating build {} again", build.id));
        // As for a first activation: what success leads to, written first.
        let success = self.prepare_success(state, build, Outcome::Reactivated, mark_reactivated);
        let activation = self.run_activate(Some(build.id), build.out_path.as_str(), "")?;
        let Some(deployed) = state.deployed.as_mut() else {
            anyhow::bail!("no deployment recorded for build {}", build.id);
        };
        match activation {
            Activation::Succeeded | Activation::NoScript => {
                mark_reactivated(state);
                if let Some(Err(err)) = success.map(Prepared::commit) {
                    log::warn!("{err:#}");
                }
                report::event(
                    Level::Info,
                    message_id::DEPLOYED,
                    About::build(build.id, build.out_path.as_str()),
                    format_args!("activated build {} ({}) again", build.id, build.out_path),
                );
                Ok(Outcome::Reactivated)
            }
            Activation::Failed(failure) => {
                deployed.activation_failures = deployed.activation_failures.saturating_add(1);
                Err(Failure::of_build(
                    Some(build.id),
                    build.out_path.as_str(),
                    format!(
                        "activation of build {} ({}) {} again ({} failure(s) in a row, at most {}){}",
                        build.id,
                        build.out_path,
                        failure.how,
                        deployed.activation_failures,
                        MAX_ACTIVATION_FAILURES,
                        failure.quoted_stderr()
                    ),
                ))
            }
        }
    }

    fn deployment(
        &self,
        build: &Build,
        activation: ActivationState,
        previous: Option<Previous>,
    ) -> Deployment {
        Deployment {
            build_id: Some(build.id),
            store_path: build.out_path.to_string(),
            generation: self.profile.current_generation(),
            job: self.hydra.job().to_string(),
            source: Some(self.hydra.source()),
            at: state::now(),
            activation,
            activation_failures: 0,
            previous,
        }
    }

    fn deploy(
        &self,
        state: &mut State,
        build: &Build,
        current: Option<StorePath>,
    ) -> Result<Outcome> {
        report::event(
            Level::Info,
            message_id::DEPLOYING,
            About::build(build.id, build.out_path.as_str()),
            format_args!("deploying build {} ({})", build.id, build.out_path),
        );
        let previous = current.map(|path| {
            let same = state
                .deployed
                .as_ref()
                .filter(|d| d.store_path == path.as_str());
            Previous {
                build_id: same.and_then(|d| d.build_id),
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
        let switched = self
            .profile
            .switch_to(&build.out_path, self.nix_timeout, || {
                system::check_deployable(&self.profile.name, &build.out_path)
            });
        if let Err(err) = switched {
            state.deployed = before;
            return Err(err.context(format!("build {} was not deployed", build.id)))
                .failed_as(FailureKind::Nix);
        }
        // The generation is known now; it reaches the disk with the pass's
        // final save (a pass killed before then finds it from the profile).
        if let Some(deployed) = &mut state.deployed {
            deployed.generation = self.profile.current_generation();
        }
        self.activate(state, build, Outcome::Deployed)?;
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
    fn activate(&self, state: &mut State, build: &Build, outcome: Outcome) -> Result<Outcome> {
        report::status(&format!("activating build {}", build.id));
        // What the state says if activate succeeds, written now: should
        // activate fill the disk, the rename that commits it needs no space,
        // and the next pass does not run the same activation again.
        let success = self.prepare_success(state, build, outcome, mark_activated);
        let previous = state
            .deployed
            .as_ref()
            .and_then(|d| d.previous.as_ref())
            .map(|p| p.store_path.clone())
            .unwrap_or_default();
        let activation = self.run_activate(Some(build.id), build.out_path.as_str(), &previous)?;
        let activation = self
            .nixos
            .confirm(&self.profile.name, activation, &self.hydra, build);
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
                    About::build(build.id, build.out_path.as_str()),
                    format_args!("deployed build {} ({}){note}", build.id, build.out_path),
                );
                mark_activated(state);
                if let Some(Err(err)) = success.map(Prepared::commit) {
                    log::warn!("{err:#}");
                }
                report::status(&format!("deployed build {}", build.id));
                Ok(outcome)
            }
            Activation::Failed(failure) => {
                // Not left for the rollback's save to find and call stale.
                drop(success);
                Err(self.roll_back(state, build, failure))
            }
        }
    }

    /// The state as this pass saves it if activating `build` succeeds,
    /// prepared for [`Prepared::commit`]; `None` if it cannot be written now
    /// (the final save tries again).
    fn prepare_success(
        &self,
        state: &State,
        build: &Build,
        outcome: Outcome,
        mark: fn(&mut State),
    ) -> Option<Prepared> {
        let mut success = state.clone();
        mark(&mut success);
        success.waiting = None;
        self.record(&mut success, &Ok(outcome), Some(build.id));
        self.state
            .prepare(&self.profile.name, &success)
            .map_err(|err| log::warn!("{err:#}"))
            .ok()
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
            About::build(build.id, build.out_path.as_str()),
            format_args!(
                "activation of build {} ({}) {}; rolling back",
                build.id, build.out_path, failure.how
            ),
        );
        state.counters.rollbacks = state.counters.rollbacks.saturating_add(1);
        let activation = self.activation_name(build.out_path.as_str());
        state.failed = Some(FailedBuild {
            build_id: build.id,
            store_path: build.out_path.to_string(),
            at: state::now(),
            reason: format!("{activation} {}", failure.how),
        });
        let deployed = state.deployed.take();
        let rollback = Rollback {
            build_id: build.id,
            store_path: build.out_path.to_string(),
            // The profile is at the failed build's generation until we switch back.
            generation: deployed
                .as_ref()
                .and_then(|d| d.generation)
                .or_else(|| self.profile.current_generation()),
            previous: deployed.and_then(|d| d.previous),
        };
        state.rolling_back = Some(rollback.clone());
        // On disk before the profile moves: a pass killed from here on is
        // finished by the next one, and the failed build is not retried.
        if let Err(err) = self.state.save(&self.profile.name, state) {
            log::warn!("{err:#}");
        }
        let outcome = self.complete_rollback(state, &rollback);
        Failure::of_build(
            Some(build.id),
            build.out_path.as_str(),
            format!(
                "build {} ({}) failed to activate: {activation} {}; {outcome}{}",
                build.id,
                build.out_path,
                failure.how,
                failure.quoted_stderr()
            ),
        )
    }

    /// A pass was killed while it rolled back: finish the rollback before
    /// anything else, and end with exit status 3 as that pass would have.
    fn finish_rollback(&self, state: &mut State, rollback: &Rollback) -> anyhow::Error {
        report::event(
            Level::Warn,
            message_id::ACTIVATION_FAILED,
            About::build(rollback.build_id, &rollback.store_path),
            format_args!(
                "the rollback from build {} ({}), whose activation failed, was interrupted; \
                 finishing it",
                rollback.build_id, rollback.store_path
            ),
        );
        let outcome = self.complete_rollback(state, rollback);
        Failure::of_build(
            Some(rollback.build_id),
            &rollback.store_path,
            format!(
                "build {} ({}) failed to activate and the rollback was interrupted; {outcome}",
                rollback.build_id, rollback.store_path
            ),
        )
    }

    /// Switches back (or removes the profile) and re-activates; what it did,
    /// for messages. The rollback stays recorded if it fails, so that the
    /// next pass tries again.
    fn complete_rollback(&self, state: &mut State, rollback: &Rollback) -> String {
        let previous = rollback
            .previous
            .as_ref()
            .and_then(|p| p.generation.map(|g| (p, g)));
        let outcome = match previous {
            Some((previous, generation)) => self.restore(state, rollback, previous, generation),
            None => self.remove_profile(state, rollback),
        };
        let outcome = match outcome {
            Ok(outcome) => {
                state.rolling_back = None;
                outcome
            }
            Err(err) => format!(
                "ROLLING BACK FAILED TOO: {err:#}; the next pass tries again (see `hail status`)"
            ),
        };
        report::event(
            Level::Warn,
            message_id::ROLLED_BACK,
            About::build(rollback.build_id, &rollback.store_path),
            format_args!("build {}: {outcome}", rollback.build_id),
        );
        report::status(&format!(
            "activation of build {} failed; {outcome}",
            rollback.build_id
        ));
        outcome
    }

    /// A first deploy failed: undo what its activate did (with its own
    /// `bin/deactivate`, if it has one) and remove the profile, so that
    /// nothing half-activated comes back at boot.
    fn remove_profile(&self, state: &mut State, rollback: &Rollback) -> Result<String> {
        // The boot loader reads the system profile: without it the host has
        // nothing to boot. Leave it to an operator (the rollback stays recorded).
        if system::is_system_profile(&self.profile.name) {
            anyhow::bail!(
                "the system profile had no earlier generation to go back to, and hail does not \
                 remove it: boot the previous configuration, or run `nixos-rebuild switch` with \
                 one that works"
            );
        }
        let failed = self
            .store
            .parse(&rollback.store_path)
            .map_err(|why| anyhow::anyhow!("the failed build's store path: {why}"))?;
        let deactivate = failed.as_path().join("bin/deactivate");
        let undone =
            match self.run_deactivate(&deactivate, Some(rollback.build_id), failed.as_str())? {
                Activation::NoScript => "",
                Activation::Succeeded => "ran its bin/deactivate and ",
                Activation::Failed(failure) => {
                    log::warn!(
                        "bin/deactivate of build {} {}",
                        rollback.build_id,
                        failure.how
                    );
                    "its bin/deactivate failed; "
                }
            };
        self.profile.remove(rollback.generation)?;
        state.deployed = None;
        Ok(format!(
            "{undone}removed the profile (there was no previous generation)"
        ))
    }

    fn restore(
        &self,
        state: &mut State,
        rollback: &Rollback,
        previous: &Previous,
        generation: u64,
    ) -> Result<String> {
        if self.profile.current_generation() != Some(generation) {
            self.profile
                .switch_generation(generation, self.nix_timeout)?;
        }
        if let Some(failed) = rollback.generation.filter(|g| *g != generation)
            && self.profile.generations()?.contains(&failed)
        {
            self.profile
                .delete_generations(&[failed], self.nix_timeout)?;
        }
        state.deployed = Some(Deployment {
            build_id: previous.build_id,
            store_path: previous.store_path.clone(),
            generation: Some(generation),
            job: self.hydra.job().to_string(),
            source: None,
            at: previous.at.unwrap_or_else(state::now),
            activation: ActivationState::Done,
            activation_failures: 0,
            previous: None,
        });
        let back = format!(
            "rolled back to generation {generation} ({})",
            previous.store_path
        );
        let activation = self.run_activate(
            previous.build_id,
            &previous.store_path,
            &rollback.store_path,
        )?;
        match activation {
            Activation::Succeeded | Activation::NoScript => {
                Ok(format!("{back} and re-activated it"))
            }
            Activation::Failed(again) => Ok(format!(
                "{back}, but re-activating it failed too: {} {}",
                self.activation_name(&previous.store_path),
                again.how
            )),
        }
    }

    /// Runs the profile's `bin/activate` (a system's: its
    /// `switch-to-configuration`) with the environment every script hail
    /// runs sees (its outcome is recorded under systemd; see `activate`).
    fn run_activate(
        &self,
        build_id: Option<u64>,
        store_path: &str,
        previous: &str,
    ) -> Result<Activation> {
        self.with_script_env(build_id, store_path, previous, |env| {
            if system::is_system_profile(&self.profile.name) {
                self.nixos.switch(
                    &self.profile,
                    &self.store,
                    &self.runner,
                    env,
                    self.activate_timeout,
                )
            } else {
                activate::run(
                    self.profile.path(),
                    &self.runner,
                    env,
                    self.activate_timeout,
                )
            }
        })
        .failed_as(FailureKind::Activation)
    }

    /// What activates `store_path` in this profile, for messages.
    fn activation_name(&self, store_path: &str) -> String {
        self.nixos.activation_name(&self.profile.name, store_path)
    }

    /// Runs a build's `bin/deactivate` with the same environment.
    fn run_deactivate(
        &self,
        script: &std::path::Path,
        build_id: Option<u64>,
        store_path: &str,
    ) -> Result<Activation> {
        self.with_script_env(build_id, store_path, "", |env| {
            activate::run_script(script, &self.runner, env, self.activate_timeout)
        })
    }

    fn with_script_env<T>(
        &self,
        build_id: Option<u64>,
        store_path: &str,
        previous: &str,
        run: impl FnOnce(&[(&str, &str)]) -> T,
    ) -> T {
        with_script_env(&self.profile, build_id, store_path, previous, run)
    }
}

/// Calls `run` with the environment of every script hail runs (activate,
/// deactivate): `HAIL_PROFILE`, `HAIL_BUILD_ID` (empty if unknown),
/// `HAIL_STORE_PATH`, `HAIL_PREVIOUS_STORE_PATH` (empty if none).
fn with_script_env<T>(
    profile: &Profile,
    build_id: Option<u64>,
    store_path: &str,
    previous: &str,
    run: impl FnOnce(&[(&str, &str)]) -> T,
) -> T {
    let id = build_id.map(|id| id.to_string()).unwrap_or_default();
    run(&[
        ("HAIL_PROFILE", profile.name.as_str()),
        ("HAIL_BUILD_ID", id.as_str()),
        ("HAIL_STORE_PATH", store_path),
        ("HAIL_PREVIOUS_STORE_PATH", previous),
    ])
}

/// Makes the record agree with the profile when the state does not say
/// what it points at (a first pass, or lost or corrupt state): the profile's
/// generation is adopted as deployed, or, when a newer generation exists
/// (someone rolled back), the newest one, which the hold then protects from
/// being deployed again.
fn adopt_profile(
    state: &mut State,
    profile: &Profile,
    store: &StoreDir,
    job: &hydra::JobUri,
    current: &StorePath,
) {
    if state.deployed.is_some() {
        return;
    }
    let current_generation = profile.current_generation();
    let newest = profile
        .generations()
        .map_err(|err| log::warn!("{err:#}"))
        .ok()
        .and_then(|generations| generations.last().copied());
    let rolled_back_from = newest
        .filter(|newest| current_generation.is_some_and(|c| c < *newest))
        .and_then(|newest| Some((newest, profile.generation_target(newest, store)?)));
    let (generation, store_path) = match rolled_back_from {
        Some((newest, path)) => {
            log::warn!(
                "hail has no record of profile {}; it is at generation {} while generation \
                 {newest} ({path}) is newer: treating that as rolled back by hand",
                profile.path().display(),
                current_generation.unwrap_or_default()
            );
            (Some(newest), path.to_string())
        }
        None => (current_generation, current.to_string()),
    };
    state.deployed = Some(Deployment {
        build_id: None,
        at: generation
            .and_then(|g| profile.generation_time(g))
            .unwrap_or_else(state::now),
        store_path,
        generation,
        job: job.to_string(),
        source: None,
        activation: ActivationState::Done,
        activation_failures: 0,
        previous: None,
    });
}

/// The deployment's activation succeeded.
fn mark_activated(state: &mut State) {
    mark_reactivated(state);
    state.failed = None;
}

/// The deployed build activated again after a failure: done, and no failed
/// build forgotten (one may be Hydra's newer build).
fn mark_reactivated(state: &mut State) {
    if let Some(deployed) = &mut state.deployed {
        deployed.activation = ActivationState::Done;
        deployed.activation_failures = 0;
    }
}

/// Failed activations of one deployment in a row after which the passes
/// stop running it again (the boot activation always runs).
pub const MAX_ACTIVATION_FAILURES: u32 = 3;

/// `hail activate`: run the profile's activation again, at boot. A failure
/// is recorded in the state, so that `hail status` shows it and the next
/// passes run the activation again instead of calling the profile up to date.
pub struct BootActivation {
    pub profile: Profile,
    pub store: StoreDir,
    pub state: StateDir,
    pub job: hydra::JobUri,
    pub runner: Runner,
    pub lock_timeout: Duration,
    pub activate_timeout: Duration,
}

impl BootActivation {
    pub fn run(&self) -> Result<()> {
        if system::is_system_profile(&self.profile.name) {
            log::info!(
                "profile {} holds NixOS systems, which NixOS activates itself at boot; \
                 nothing to do",
                self.profile.path().display()
            );
            return Ok(());
        }
        let Some(current) = self.profile.current_target(&self.store)? else {
            log::info!(
                "profile {} does not exist yet; nothing to activate",
                self.profile.path().display()
            );
            return Ok(());
        };
        let _lock = self.state.lock(&self.profile.name, self.lock_timeout)?;
        let mut state = self.state.load_for_update(&self.profile.name);
        if let Some(rollback) = &state.rolling_back {
            anyhow::bail!(
                "not activating profile {}: the rollback from build {}, whose activation failed, \
                 is unfinished; the next pass (hail@) finishes it",
                self.profile.path().display(),
                rollback.build_id
            );
        }
        adopt_profile(&mut state, &self.profile, &self.store, &self.job, &current);
        if let Some(deployed) = &state.deployed
            && deployed.job != self.job.to_string()
        {
            anyhow::bail!(
                "profile {} is deployed from {}, not from {}: the hail instance of this job does \
                 not deploy it. Check HAIL_PROFILE and HAIL_JOB_URI in the instance's environment \
                 file (/etc/hail/INSTANCE.env)",
                self.profile.path().display(),
                deployed.job,
                self.job
            );
        }
        let this_deployment = state
            .deployed
            .as_mut()
            .filter(|d| d.store_path == current.as_str());
        let build_id = this_deployment.as_ref().and_then(|d| d.build_id);
        report::status(&format!("activating {current}"));
        let about = About {
            build_id,
            store_path: Some(current.as_str()),
        };
        let activation = with_script_env(&self.profile, build_id, current.as_str(), "", |env| {
            activate::run(
                self.profile.path(),
                &self.runner,
                env,
                self.activate_timeout,
            )
        })
        .context("boot-time activation")
        .failed_as(FailureKind::Activation)?;
        let result = match activation {
            Activation::Succeeded | Activation::NoScript => {
                if let Some(deployed) = this_deployment {
                    deployed.activation = ActivationState::Done;
                    deployed.activation_failures = 0;
                }
                match activation {
                    Activation::NoScript => {
                        log::warn!("{current} has no bin/activate: nothing to activate")
                    }
                    _ => report::event(
                        Level::Info,
                        message_id::DEPLOYED,
                        about,
                        format_args!("activated {current}"),
                    ),
                }
                Ok(())
            }
            Activation::Failed(failure) => {
                let failures = match this_deployment {
                    Some(deployed) => {
                        deployed.activation = ActivationState::Failed;
                        deployed.activation_failures =
                            deployed.activation_failures.saturating_add(1);
                        deployed.activation_failures
                    }
                    None => 1,
                };
                report::event(
                    Level::Error,
                    message_id::ACTIVATION_FAILED,
                    about,
                    format_args!("boot-time activation of {current} {}", failure.how),
                );
                let message = format!(
                    "activation of {current} {} ({failures} failure(s) in a row; the next passes run \
                     it again, up to {MAX_ACTIVATION_FAILURES}){}",
                    failure.how,
                    failure.quoted_stderr()
                );
                state.record_error(FailureKind::Activation, message.clone());
                Err(Failure::of_build(build_id, current.as_str(), message))
            }
        };
        if let Err(err) = self.state.save(&self.profile.name, &state) {
            // The activation's own result is what the operator needs.
            log::warn!("{err:#}");
        }
        result
    }
}

/// The build id that, if Hydra names it, leaves nothing to do: the deployed
/// build, fully activated, from the same source, where the profile still
/// points, with no hold, failure, wait or rollback to look into. Any doubt
/// is `None`, and the pass fetches the build as usual.
fn unchanged_build(state: &State, current: Option<&StorePath>, source: &str) -> Option<u64> {
    let deployed = state.deployed.as_ref()?;
    let settled = state.held.is_none()
        && state.failed.is_none()
        && state.waiting.is_none()
        && state.rolling_back.is_none()
        && deployed.activation == ActivationState::Done;
    let same = current.map(StorePath::as_str) == Some(deployed.store_path.as_str())
        && deployed.source.as_deref() == Some(source);
    if settled && same {
        deployed.build_id
    } else {
        None
    }
}

fn report_up_to_date(build_id: u64, store_path: &str) {
    report::event(
        Level::Info,
        message_id::UP_TO_DATE,
        About::build(build_id, store_path),
        format_args!("up to date: build {build_id} ({store_path})"),
    );
    report::status(&format!("up to date: build {build_id}"));
}

/// What Hydra must offer for a hold to end, for messages.
fn what_ends_a_hold(deployed: &Deployment) -> String {
    match deployed.build_id {
        Some(id) => format!("a build newer than {id}"),
        None => "another build".to_owned(),
    }
}

/// When a waiting build may deploy, for messages.
fn eligibility(eligible_at: Option<u64>) -> String {
    match eligible_at {
        Some(at) => format!("becomes eligible at {}", report::utc(at)),
        None => "is not deployed while its age is unknown".to_owned(),
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
