//! Whole NixOS hosts: a build whose output is a NixOS system goes only to the
//! profile `system`, and is activated as `nixos-rebuild` does it, with its
//! own `bin/switch-to-configuration`. After a switch hail makes sure the host
//! can still reach Hydra (or the pass rolls back), and a new kernel, initrd
//! or set of kernel modules means a reboot: reported, or (`--allow-reboot`)
//! carried out, as NixOS's `system.autoUpgrade` does, inside a window.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use log::Level;

use crate::activate::{self, Activation, ActivationFailure, Runner};
use crate::failure::{Failure, FailureKind};
use crate::hydra::{self, Build};
use crate::process::{self, Deadline};
use crate::profile::{Profile, ProfileName};
use crate::report::{self, About, message_id};
use crate::state::{self, Reboot, RebootRequest, State};
use crate::store_path::{StoreDir, StorePath};

/// The one profile a NixOS system is deployed to (`/nix/var/nix/profiles/system`,
/// whose generations NixOS boots).
pub const SYSTEM_PROFILE: &str = "system";

/// Where NixOS links the system it booted.
const BOOTED_SYSTEM: &str = "/run/booted-system";

/// Where hail marks a reboot it asked for: a tmpfs that every boot empties.
const RUNTIME_DIR: &str = "/run/hail";

/// The mark's name in the runtime dir; it holds the request's time.
const REBOOT_MARK: &str = "reboot-requested";

/// What a system must have for a new one to run without a reboot: the links
/// `system.autoUpgrade` compares.
const BOOT_FILES: [&str; 3] = ["kernel", "initrd", "kernel-modules"];

/// How long to wait between tries to reach Hydra after a switch.
const CONFIRM_RETRY: Duration = Duration::from_secs(2);

/// Bound on `date` and `systemctl reboot`.
const QUICK_COMMAND: Duration = Duration::from_secs(60);

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

/// How hail deploys NixOS systems: the options and the booted system.
#[derive(Debug, Clone)]
pub struct Nixos {
    /// `--nixos-operation`, when no reboot is allowed.
    pub operation: Operation,
    /// After a switch, how long hail keeps trying to reach Hydra before it
    /// rolls back; zero: it does not check.
    pub confirm_timeout: Duration,
    /// Make a system that needs a reboot the boot default and reboot.
    pub allow_reboot: bool,
    /// Reboot only inside this window.
    pub reboot_window: Option<RebootWindow>,
    /// `/run/booted-system`, or `HAIL_BOOTED_SYSTEM`.
    pub booted: PathBuf,
    /// `/run/hail`, or `HAIL_RUNTIME_DIR`.
    pub runtime_dir: PathBuf,
}

impl Nixos {
    /// The booted system as NixOS links it, unless `HAIL_BOOTED_SYSTEM` names another.
    pub fn booted_system_from_env() -> PathBuf {
        path_from_env("HAIL_BOOTED_SYSTEM", BOOTED_SYSTEM)
    }

    /// hail's runtime dir, unless `HAIL_RUNTIME_DIR` names another.
    pub fn runtime_dir_from_env() -> PathBuf {
        path_from_env("HAIL_RUNTIME_DIR", RUNTIME_DIR)
    }

    /// Whether `system` needs a reboot to run: its kernel, initrd or kernel
    /// modules are not the booted system's. `None` if there is no booted
    /// system to compare with (not NixOS).
    fn needs_reboot(&self, system: &Path) -> Option<bool> {
        let links = |system: &Path| BOOT_FILES.map(|file| system.join(file).read_link().ok());
        self.booted
            .exists()
            .then(|| links(system) != links(&self.booted))
    }

    /// Marks, in the runtime dir, that hail asks for a reboot at `at`.
    fn mark_reboot_request(&self, at: u64) -> Result<()> {
        let mark = self.runtime_dir.join(REBOOT_MARK);
        state::write_atomically(&mark, at.to_string().as_bytes())
            .with_context(|| format!("cannot mark the reboot request in {}", mark.display()))
    }

    /// Whether the host booted since hail asked for `requested`: the boot id
    /// changed, or the mark is gone (a boot empties the runtime dir) or is
    /// another request's. A container may see its host's boot id, which its
    /// own reboot keeps; the mark tells there too.
    fn rebooted_since(&self, requested: &RebootRequest) -> bool {
        let boot_id_changed = current_boot_id().is_some_and(|id| id != requested.boot_id);
        let mark = state::read_own_file(&self.runtime_dir.join(REBOOT_MARK)).ok();
        boot_id_changed
            || mark.as_deref().map(<[u8]>::trim_ascii) != Some(requested.at.to_string().as_bytes())
    }

    /// What `switch-to-configuration` does with `system`: as
    /// `system.autoUpgrade` decides, `boot` (and a reboot) if reboots are
    /// allowed and it needs one, else `switch`; without `--allow-reboot`,
    /// `--nixos-operation`.
    pub fn operation(&self, system: &Path) -> Operation {
        if !self.allow_reboot {
            return self.operation;
        }
        match self.needs_reboot(system) {
            Some(true) => Operation::Boot,
            _ => Operation::Switch,
        }
    }

    /// What activates `store_path` in `profile`, for messages: `activate`,
    /// or for a system `switch-to-configuration switch` (or `boot`).
    pub fn activation_name(&self, profile: &ProfileName, store_path: &str) -> String {
        if is_system_profile(profile) {
            let operation = self.operation(Path::new(store_path));
            format!("switch-to-configuration {}", operation.as_str())
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
        let operation = self.operation(system.as_path());
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
            && self.operation(build.out_path.as_path()) == Operation::Switch;
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
            let err = match hydra.confirm_reachable() {
                Ok(()) => return activation,
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

    /// Brings the state's reboot record up to date with the system `profile`
    /// points to and the booted one, saying so when it changes. Returns the
    /// system to reboot into now, if hail is to reboot (`--allow-reboot`,
    /// inside the window, after a pass that succeeded), marking the request
    /// in the state, which must be saved before [`reboot`].
    pub fn note_reboot(
        &self,
        profile: &Profile,
        store: &StoreDir,
        state: &mut State,
        pass_succeeded: bool,
    ) -> Option<String> {
        if !is_system_profile(&profile.name) {
            return None;
        }
        let current = profile.current_target(store).ok().flatten();
        let needed = match &current {
            Some(system) => match self.needs_reboot(system.as_path()) {
                Some(needed) => needed,
                None => {
                    log::warn!(
                        "cannot tell whether {system} needs a reboot: {} does not exist (set \
                         HAIL_BOOTED_SYSTEM if the booted system is linked elsewhere)",
                        self.booted.display()
                    );
                    false
                }
            },
            None => false,
        };
        let system = match current {
            Some(system) if needed => system.to_string(),
            _ => {
                if let Some(done) = state.reboot.take() {
                    log::info!(
                        "the host runs the kernel of {} now: no reboot needed",
                        done.store_path
                    );
                }
                return None;
            }
        };
        let window = self.reboot_window.map(|w| w.to_string());
        let reboot = match &mut state.reboot {
            Some(reboot) if reboot.store_path == system => {
                reboot.by_hail = self.allow_reboot;
                reboot.window = window;
                reboot
            }
            recorded => {
                let reboot = recorded.insert(Reboot {
                    store_path: system.clone(),
                    since: state::now(),
                    by_hail: self.allow_reboot,
                    window,
                    requested: None,
                    booted_another: None,
                });
                report::event(
                    Level::Warn,
                    message_id::REBOOT,
                    About {
                        build_id: state
                            .deployed
                            .as_ref()
                            .filter(|d| d.store_path == system)
                            .and_then(|d| d.build_id),
                        store_path: Some(&system),
                    },
                    format_args!(
                        "{}: the kernel, initrd or kernel modules of {system} are not the booted \
                         system's ({}); {}",
                        reboot.label(),
                        self.booted.display(),
                        who_reboots(reboot)
                    ),
                );
                reboot
            }
        };
        if reboot.pending()
            && let Some(requested) = &reboot.requested
            && self.rebooted_since(requested)
        {
            // Rebooting again would boot the same entry again, and again.
            reboot.booted_another = Some(state::now());
            report::event(
                Level::Warn,
                message_id::REBOOT,
                About {
                    build_id: None,
                    store_path: Some(&system),
                },
                format_args!(
                    "hail rebooted the host for {system} at {}, but it booted {} (another \
                     kernel, initrd or kernel modules): not rebooting again for this system. \
                     Choose it in the boot menu, roll the profile back (hail holds), or publish \
                     a new build",
                    report::utc(requested.at),
                    std::fs::read_link(&self.booted)
                        .unwrap_or_else(|_| self.booted.clone())
                        .display()
                ),
            );
        }
        report::status(&format!("{}: {}", reboot.label(), who_reboots(reboot)));
        if !(reboot.pending() && pass_succeeded) {
            return None;
        }
        match self.reboot_window.map(|w| w.contains_now()).transpose() {
            Ok(Some(false)) => None,
            Ok(_) => {
                let at = state::now();
                if let Err(err) = self.mark_reboot_request(at) {
                    // Without the mark a reboot into another system could not
                    // be told from none, and hail could reboot again and again.
                    log::warn!("{err:#}; not rebooting");
                    return None;
                }
                reboot.requested = Some(RebootRequest {
                    at,
                    boot_id: current_boot_id().unwrap_or_default(),
                });
                Some(system)
            }
            Err(err) => {
                log::warn!("{err:#}; not rebooting now");
                None
            }
        }
    }
}

/// Who reboots the host and when, for the journal, `STATUS=` and `hail status`.
pub fn who_reboots(reboot: &Reboot) -> String {
    let asked = reboot.requested.as_ref().map(|r| report::utc(r.at));
    match (&reboot.window, reboot.by_hail, asked, reboot.booted_another) {
        (_, false, _, _) => {
            "reboot the host to run the new system (hail does with --allow-reboot)".to_owned()
        }
        (_, true, Some(at), Some(_)) => format!(
            "hail rebooted the host at {at}, but it booted another system; reboot into it yourself"
        ),
        (_, true, Some(at), None) => format!("hail asked for it at {at}"),
        (None, true, None, _) => "hail reboots the host".to_owned(),
        (Some(window), true, None, _) => format!("hail reboots the host inside {window}"),
    }
}

/// Reboots the host into `system` (`systemctl reboot`); the state was saved.
/// A failure is logged: the pass's own outcome stands, and the next pass
/// inside the window tries again.
pub fn reboot(system: &str) {
    report::event(
        Level::Warn,
        message_id::REBOOT,
        About {
            build_id: None,
            store_path: Some(system),
        },
        format_args!("rebooting into {system}"),
    );
    report::status(&format!("rebooting into {system}"));
    let deadline = Deadline::new(QUICK_COMMAND, "look at `systemctl status reboot.target`");
    if let Err(err) = process::run(reboot_command(), deadline, process::Echo::Both) {
        report::event(
            Level::Error,
            message_id::ERROR,
            About::default(),
            format_args!("could not reboot into {system}: {err:#}; the next pass tries again"),
        );
    }
}

/// `systemctl reboot`.
fn reboot_command() -> Command {
    let mut cmd = Command::new("systemctl");
    cmd.arg("reboot");
    cmd
}

/// `var` from the environment, unless unset or empty: then `default`.
fn path_from_env(var: &str, default: &str) -> PathBuf {
    std::env::var_os(var)
        .filter(|path| !path.is_empty())
        .map_or_else(|| PathBuf::from(default), PathBuf::from)
}

/// This boot's id, to tell whether the host rebooted since hail asked.
fn current_boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|id| id.trim().to_owned())
}

/// `--reboot-window HH:MM-HH:MM`, local time: from its start up to (not
/// including) its end, across midnight if the end comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebootWindow {
    /// Minutes after midnight.
    start: u16,
    end: u16,
}

impl RebootWindow {
    pub fn parse(text: &str) -> Result<Self, String> {
        let usage = || {
            format!(
                "{text:?} is not a window of local times HH:MM-HH:MM (e.g. 02:00-04:30, or \
                 23:00-01:00 across midnight)"
            )
        };
        let (start, end) = text.split_once('-').ok_or_else(usage)?;
        let (start, end) = (
            minute_of_day(start).ok_or_else(usage)?,
            minute_of_day(end).ok_or_else(usage)?,
        );
        if start == end {
            return Err(format!(
                "{text:?} is an empty window; leave --reboot-window out to reboot at any time"
            ));
        }
        Ok(Self { start, end })
    }

    /// Whether `minute` (after midnight) is inside the window.
    fn contains(self, minute: u16) -> bool {
        if self.start < self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    /// Whether the local time now is inside the window.
    fn contains_now(self) -> Result<bool> {
        let deadline = Deadline::new(QUICK_COMMAND, "check the system's clock and time zone");
        let now = process::output(local_time_command(), deadline)
            .context("cannot read the local time for --reboot-window")?
            .join("");
        let minute = minute_of_day(&now)
            .ok_or_else(|| anyhow!("`date +%H:%M` printed {now:?}, not a time"))?;
        Ok(self.contains(minute))
    }
}

/// `HH:MM` as minutes after midnight.
fn minute_of_day(time: &str) -> Option<u16> {
    let (hours, minutes) = time.trim().split_once(':')?;
    let (hours, minutes): (u16, u16) = (hours.parse().ok()?, minutes.parse().ok()?);
    (hours < 24 && minutes < 60).then_some(hours * 60 + minutes)
}

impl fmt::Display for RebootWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let time = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", time(self.start), time(self.end))
    }
}

/// `date +%H:%M`: the local time as `system.autoUpgrade` reads it for its window.
fn local_time_command() -> Command {
    let mut cmd = Command::new("date");
    cmd.arg("+%H:%M");
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::argv;

    #[test]
    fn reboot_windows() {
        let window = |text| RebootWindow::parse(text).unwrap();
        let at = |h: u16, m: u16| h * 60 + m;
        let night = window("02:00-04:30");
        assert_eq!(night.to_string(), "02:00-04:30");
        assert!(!night.contains(at(1, 59)));
        assert!(night.contains(at(2, 0)));
        assert!(night.contains(at(4, 29)));
        assert!(!night.contains(at(4, 30)));
        let midnight = window("23:00-1:00");
        assert_eq!(midnight.to_string(), "23:00-01:00");
        for inside in [at(23, 0), at(23, 59), at(0, 0), at(0, 59)] {
            assert!(midnight.contains(inside), "{inside}");
        }
        for outside in [at(1, 0), at(12, 0), at(22, 59)] {
            assert!(!midnight.contains(outside), "{outside}");
        }
        for bad in [
            "",
            "02:00",
            "2-4",
            "24:00-01:00",
            "01:60-02:00",
            "a:b-c:d",
            "-01:00-02:00",
        ] {
            let err = RebootWindow::parse(bad).unwrap_err();
            assert!(err.contains("HH:MM-HH:MM"), "{bad:?}: {err}");
        }
        assert!(
            RebootWindow::parse("03:00-03:00")
                .unwrap_err()
                .contains("empty window")
        );
    }

    #[test]
    fn argvs() {
        assert_eq!(argv(&reboot_command()), ["systemctl", "reboot"]);
        assert_eq!(argv(&local_time_command()), ["date", "+%H:%M"]);
    }

    /// A NixOS-like system in `dir`: `nixos-version`, a switch script, and
    /// boot files linking to `kernel`.
    fn fake_system(dir: &Path, kernel: &str) {
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("nixos-version"), "26.05").unwrap();
        std::fs::write(dir.join("bin/switch-to-configuration"), "").unwrap();
        for file in BOOT_FILES {
            std::os::unix::fs::symlink(format!("/nix/store/{kernel}/{file}"), dir.join(file))
                .unwrap();
        }
    }

    fn nixos(booted: &Path, allow_reboot: bool) -> Nixos {
        Nixos {
            operation: Operation::Switch,
            confirm_timeout: Duration::from_secs(60),
            allow_reboot,
            reboot_window: None,
            booted: booted.to_owned(),
            runtime_dir: booted.with_file_name("run"),
        }
    }

    #[test]
    fn a_new_kernel_is_booted_into_only_when_reboots_are_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let (booted, same, newer) = (
            dir.path().join("booted"),
            dir.path().join("same"),
            dir.path().join("newer"),
        );
        fake_system(&booted, "k1");
        fake_system(&same, "k1");
        fake_system(&newer, "k2");
        let allowed = nixos(&booted, true);
        assert_eq!(allowed.needs_reboot(&same), Some(false));
        assert_eq!(allowed.needs_reboot(&newer), Some(true));
        assert_eq!(allowed.operation(&same), Operation::Switch);
        assert_eq!(allowed.operation(&newer), Operation::Boot);
        let not_allowed = nixos(&booted, false);
        assert_eq!(not_allowed.operation(&newer), Operation::Switch);
        let boot = Nixos {
            operation: Operation::Boot,
            ..not_allowed
        };
        assert_eq!(boot.operation(&same), Operation::Boot);
        // Not NixOS: nothing to compare with, so no reboot.
        let elsewhere = nixos(&dir.path().join("none"), true);
        assert_eq!(elsewhere.needs_reboot(&newer), None);
        assert_eq!(elsewhere.operation(&newer), Operation::Switch);

        let system = ProfileName::parse("system").unwrap();
        let web = ProfileName::parse("web").unwrap();
        let newer = newer.to_string_lossy();
        assert_eq!(
            allowed.activation_name(&system, &newer),
            "switch-to-configuration boot"
        );
        assert_eq!(allowed.activation_name(&web, &newer), "activate");
    }

    #[test]
    fn systems_go_to_the_system_profile_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path());
        let system_path = dir
            .path()
            .join("0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-nixos-system-web");
        fake_system(&system_path, "k1");
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
