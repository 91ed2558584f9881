//! The command line: compatible with the original hail, every option also
//! an environment variable so units can use `EnvironmentFile=`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::hydra::{JobUri, Selection};
use crate::profile::ProfileName;
use crate::system::{Operation, RebootWindow};

const EXIT_STATUS: &str = "\
Exit status:
  0  up to date, deployed, or (--dry-run) nothing changed
  1  failed; the profile was not changed
  2  usage error
  3  activation failed (and was rolled back), or the latest build is one
     whose activation failed before

Scheduling is systemd's job: hail@PROFILE.timer starts hail@PROFILE.service,
one pass per start (NixOS: services.hail.instances.<name>).";

/// Keep a Nix profile in step with the latest successful build of a Hydra
/// job: one pass per run.
///
/// A pass asks the job URI for its latest successful build; if its output
/// differs from what the profile points to, `nix-env` (from PATH) realises
/// it from the binary caches nix.conf names, switches the profile to it as a
/// new generation and runs PROFILE/bin/activate.
#[derive(Debug, Parser)]
#[command(name = "hail", version, after_help = EXIT_STATUS, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub pass: PassArgs,
}

impl Cli {
    /// Parses the command line, with what clap's rules cannot check as usage
    /// errors too: `requires` is met by `HAIL_ALLOW_REBOOT=false`, which
    /// turns reboots off, so a window would be ignored without a word.
    pub fn parse_checked() -> Result<Self, clap::Error> {
        use clap::CommandFactory;
        let cli = Self::try_parse()?;
        let nixos = &cli.pass.nixos;
        if nixos.reboot_window.is_some() && !nixos.allow_reboot {
            return Err(Self::command().error(
                clap::error::ErrorKind::ArgumentConflict,
                "--reboot-window (HAIL_REBOOT_WINDOW) needs --allow-reboot, which \
                 HAIL_ALLOW_REBOOT turns off: set HAIL_ALLOW_REBOOT=true or remove the window",
            ));
        }
        Ok(cli)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot-time activation: run PROFILE/bin/activate if the profile exists
    /// (exits 0 if it does not); a failure is recorded, and the next passes
    /// run the activation again (up to 3 failures in a row).
    Activate(ActivateArgs),
    /// Show what hail deployed and how its last passes went, from the state
    /// dir only (no network, no lock: works while a pass runs).
    Status(StatusArgs),
    /// Install, (re)start and health-check a service profile's systemd units
    /// (what `lib.mkServiceProfile`'s bin/activate runs), or take them down.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// Make this host run exactly the hail instances a manager profile lists
    /// (what `lib.mkManagerProfile`'s bin/activate runs), or take them down.
    #[command(subcommand)]
    Manager(ManagerCommand),
    /// The transient activation unit's ExecStopPost=: record how the
    /// activation ended (from systemd's $SERVICE_RESULT, $EXIT_CODE,
    /// $EXIT_STATUS) for the next pass.
    #[command(hide = true)]
    ActivationFinished(ActivationFinishedArgs),
}

#[derive(Debug, Args)]
pub struct ActivationFinishedArgs {
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    #[arg(long, value_parser = ProfileName::parse)]
    pub profile: ProfileName,
    /// The store path that was activated.
    #[arg(long, value_name = "PATH")]
    pub store_path: String,
    /// The activation's timeout, for saying that it ran past it.
    #[arg(long, value_name = "SECS", value_parser = parse_seconds)]
    pub timeout: Duration,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Install the units in PROFILE_DIR/lib/systemd/system, restart the
    /// changed ones, start the others, remove dropped ones, then run
    /// PROFILE_DIR/bin/health-check until it passes.
    Activate {
        #[command(flatten)]
        service: ServiceArgs,
        /// Seconds the health check may take to pass.
        #[arg(long, value_name = "SECS", value_parser = parse_seconds, default_value = "60")]
        health_timeout: Duration,
        /// The service profile (the store path or the profile link).
        profile_dir: PathBuf,
    },
    /// Stop and remove every unit the service installed.
    Deactivate {
        #[command(flatten)]
        service: ServiceArgs,
    },
}

#[derive(Debug, Args)]
pub struct ServiceArgs {
    /// The service's name (one service profile per name).
    #[arg(long)]
    pub name: String,
    /// Where units are installed; the runtime dir is empty after a reboot,
    /// when hail-activate@ installs them again.
    #[arg(long, value_name = "DIR", default_value = "/run/systemd/system")]
    pub unit_dir: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ManagerCommand {
    /// Set up the instances in INSTANCES (JSON: {"name": {"jobUri": …,
    /// "pollPeriod": …, "profile": …, "netrcFile": …, "activateAtBoot": …,
    /// "environment": {…}}}) and remove the ones no longer listed.
    Activate {
        #[command(flatten)]
        manager: ManagerArgs,
        instances: PathBuf,
    },
    /// Remove every instance this manager set up.
    Deactivate {
        #[command(flatten)]
        manager: ManagerArgs,
    },
}

#[derive(Debug, Args)]
pub struct ManagerArgs {
    /// Where instance environment files go (hail@.service reads /etc/hail/%I.env).
    #[arg(long, value_name = "DIR", default_value = "/etc/hail")]
    pub config_dir: PathBuf,
    /// Where timer drop-ins for poll periods go.
    #[arg(long, value_name = "DIR", default_value = "/etc/systemd/system")]
    pub unit_dir: PathBuf,
    /// Where the instances' profiles live (for their bin/deactivate).
    #[arg(long, env = "HAIL_PROFILES_DIR", value_name = "DIR", default_value = PROFILES_DIR)]
    pub profiles_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Profiles to show [default: every profile with state].
    #[arg(value_parser = ProfileName::parse)]
    pub profiles: Vec<ProfileName>,

    /// Where hail keeps its state [default: $STATE_DIRECTORY, else /var/lib/hail].
    #[arg(long, env = "HAIL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// A stable JSON document for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The profile to deploy: PROFILES_DIR/PROFILE (may contain '/', e.g. hail-profiles/web).
    #[arg(long, env = "HAIL_PROFILE", value_parser = ProfileName::parse, required = true)]
    pub profile: Option<ProfileName>,

    /// Where profiles live.
    #[arg(long, env = "HAIL_PROFILES_DIR", value_name = "DIR", default_value = PROFILES_DIR)]
    pub profiles_dir: PathBuf,

    /// Seconds bin/activate may run before it is ended (its process group,
    /// or its transient unit under systemd).
    #[arg(long, env = "HAIL_ACTIVATE_TIMEOUT", value_name = "SECS", value_parser = parse_seconds, default_value = "600")]
    pub activate_timeout: Duration,
}

#[derive(Debug, Args)]
pub struct PassArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,

    /// The Hydra job to follow: http(s)://HOST[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB.
    #[arg(long, env = "HAIL_JOB_URI", value_name = "HYDRA_JOB_URI", value_parser = JobUriParser, required = true)]
    pub job_uri: Option<JobUri>,

    /// netrc file with HTTP Basic credentials for the job URI's host (the
    /// `machine` entry for it, else `default`) [default: /etc/netrc if it exists].
    #[arg(long, env = "HAIL_NETRC_FILE", value_name = "FILE")]
    pub netrc_file: Option<PathBuf>,

    #[command(flatten)]
    pub lock: LockArgs,

    /// Seconds each HTTP exchange may take [default: 10 to connect, 60 in all].
    #[arg(long, env = "HAIL_TIMEOUT", value_name = "SECS", value_parser = parse_seconds)]
    pub timeout: Option<Duration>,

    /// Seconds each nix call (realising the build, switching the profile,
    /// rolling back, deleting generations) may take before its process group
    /// is ended: a stuck substitution must not hold the profile lock forever.
    #[arg(long, env = "HAIL_NIX_TIMEOUT", value_name = "SECS", value_parser = parse_seconds, default_value = "1800")]
    pub nix_timeout: Duration,

    /// The build output to deploy, for jobs whose deployable output is not `out`.
    #[arg(long, env = "HAIL_OUTPUT", value_name = "NAME", default_value = "out", value_parser = parse_output)]
    pub output: String,

    #[command(flatten)]
    pub selection: SelectionArgs,

    /// Deploy a build only once it has been finished this long (e.g. 30min,
    /// 2h, 1d; plain numbers are seconds): canary hosts at 0, the fleet later.
    #[arg(long, env = "HAIL_MIN_BUILD_AGE", value_name = "DURATION", value_parser = parse_build_age)]
    pub min_build_age: Option<Duration>,

    /// After a successful deploy, delete all but the newest N generations
    /// (never the current one).
    #[arg(long, env = "HAIL_KEEP_GENERATIONS", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub keep_generations: Option<u64>,

    /// Write Prometheus metrics for this profile here after every pass
    /// (atomically; point it into node_exporter's textfile directory).
    #[arg(long, env = "HAIL_METRICS_FILE", value_name = "PATH")]
    pub metrics_file: Option<PathBuf>,

    /// Ask Hydra and say what a pass would do now (deploy, or why it would
    /// hold, wait or refuse); change nothing.
    #[arg(long, env = "HAIL_DRY_RUN")]
    pub dry_run: bool,

    /// Deploy Hydra's latest build even if its activation failed before
    /// (failed builds are otherwise not retried while they are the latest).
    #[arg(long, env = "HAIL_RETRY_FAILED")]
    pub retry_failed: bool,

    /// Deploy Hydra's latest build even if an operator rolled the profile
    /// back from it (hail otherwise holds until a newer build appears).
    #[arg(long, env = "HAIL_FORCE")]
    pub force: bool,

    /// Accepted for compatibility; every run is one pass.
    #[arg(long)]
    pub oneshot: bool,

    /// Not supported: the original's polling loop is systemd's job now.
    #[arg(long, hide = true, value_name = "SECS", value_parser = reject_poll_period)]
    pub poll_period: Option<String>,

    // Last: its help heading applies to the options after it.
    #[command(flatten)]
    pub nixos: NixosArgs,
}

/// How hail deploys a NixOS system (a build with nixos-version and
/// bin/switch-to-configuration) to the profile `system`.
#[derive(Debug, Args)]
#[command(next_help_heading = "NixOS systems (--profile system)")]
pub struct NixosArgs {
    /// What the new system's bin/switch-to-configuration does: switch
    /// (activate it now and make it the boot default) or boot (only the boot
    /// default). With --allow-reboot: boot when the system needs a reboot,
    /// switch otherwise.
    #[arg(
        long,
        env = "HAIL_NIXOS_OPERATION",
        value_name = "OPERATION",
        value_enum,
        default_value = "switch"
    )]
    pub nixos_operation: Operation,

    /// After a switch, seconds hail keeps trying to reach Hydra (its
    /// JOB/latest) before it rolls the switch back as failed; 0 does not check.
    #[arg(long, env = "HAIL_CONFIRM_TIMEOUT", value_name = "SECS", value_parser = parse_seconds_or_off, default_value = "60")]
    pub confirm_timeout: Duration,

    /// When the new system's kernel, initrd or kernel modules differ from the
    /// booted system's, make it the boot default (switch-to-configuration
    /// boot) and reboot (systemctl reboot); otherwise switch. Without it hail
    /// always uses --nixos-operation and reports "reboot required".
    #[arg(long, env = "HAIL_ALLOW_REBOOT")]
    pub allow_reboot: bool,

    /// Reboot only between these local times (e.g. 02:00-04:30; may wrap
    /// midnight); outside it the reboot stays pending for a later pass.
    /// Needs --allow-reboot.
    #[arg(long, env = "HAIL_REBOOT_WINDOW", value_name = "HH:MM-HH:MM", value_parser = RebootWindow::parse, requires = "allow_reboot")]
    pub reboot_window: Option<RebootWindow>,
}

/// Where hail keeps its per-profile state and locks, and how long to wait for a lock.
#[derive(Debug, Args)]
pub struct LockArgs {
    /// Where hail keeps per-profile state and locks [default: $STATE_DIRECTORY, else /var/lib/hail].
    #[arg(long, env = "HAIL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Seconds to wait for another pass on the same profile to finish.
    #[arg(long, env = "HAIL_LOCK_TIMEOUT", value_name = "SECS", value_parser = parse_seconds, default_value = "1800")]
    pub lock_timeout: Duration,
}

/// Which of the job's builds to deploy: one of `--latest-finished`,
/// `--wait-for-jobset` and `--gate-job` (an argument group), `--system`
/// with none of them or with `--wait-for-jobset`.
#[derive(Debug, Args)]
pub struct SelectionArgs {
    /// Only builds for this system (Hydra's latest-for/SYSTEM); otherwise the
    /// highest build id of any system wins.
    #[arg(long, env = "HAIL_SYSTEM", value_name = "SYSTEM", value_parser = parse_system)]
    pub system: Option<String>,

    /// Only builds from evaluations with no unfinished builds (Hydra's latest-finished).
    #[arg(
        long,
        env = "HAIL_LATEST_FINISHED",
        group = "build_selection",
        conflicts_with = "system"
    )]
    pub latest_finished: bool,

    /// Only this job's build from the newest evaluation in which every build
    /// finished successfully (reads up to 3 pages of evaluations and the
    /// builds of up to 10, each evaluation once: while Hydra's newest
    /// finished evaluation is unchanged, one small request).
    #[arg(long, env = "HAIL_WAIT_FOR_JOBSET", group = "build_selection")]
    pub wait_for_jobset: bool,

    /// Only this job's build from the evaluation in which JOB, a job of the
    /// same jobset that succeeds only when everything that must does (an
    /// aggregate such as releaseTools.aggregate), last succeeded. Small
    /// requests whatever the jobset's size: while JOB's latest build is
    /// unchanged, one.
    #[arg(
        long,
        env = "HAIL_GATE_JOB",
        value_name = "JOB",
        value_parser = parse_job_name,
        group = "build_selection",
        conflicts_with = "system"
    )]
    pub gate_job: Option<String>,
}

impl SelectionArgs {
    pub fn selection(self) -> Selection {
        match self {
            Self {
                gate_job: Some(gate),
                ..
            } => Selection::Gated { gate },
            Self {
                wait_for_jobset: true,
                system,
                ..
            } => Selection::WholeJobset { system },
            Self {
                latest_finished: true,
                ..
            } => Selection::LatestFinished,
            Self {
                system: Some(system),
                ..
            } => Selection::LatestFor(system),
            Self { system: None, .. } => Selection::Latest,
        }
    }
}

#[derive(Debug, Args)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,

    /// The Hydra job the profile is deployed from (the instance's HAIL_JOB_URI):
    /// hail refuses to activate a profile that it deployed from another job.
    #[arg(long, env = "HAIL_JOB_URI", value_name = "HYDRA_JOB_URI", value_parser = JobUriParser)]
    pub job_uri: JobUri,

    #[command(flatten)]
    pub lock: LockArgs,
}

/// Exits as clap does for `err` (status 2 for usage errors); for a missing
/// required argument it also names the environment variable that can give it,
/// which is how the units configure hail.
pub fn exit_with(err: clap::Error) -> ! {
    use clap::CommandFactory;
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if err.kind() == ErrorKind::MissingRequiredArgument
        && let Some(ContextValue::Strings(missing)) = err.get(ContextKind::InvalidArg)
    {
        let command = Cli::command();
        let args: Vec<&clap::Arg> = std::iter::once(&command)
            .chain(command.get_subcommands())
            .flat_map(clap::Command::get_arguments)
            .collect();
        let notes: Vec<String> = missing
            .iter()
            .filter_map(|shown| {
                let long = shown.split_whitespace().next()?.strip_prefix("--")?;
                let arg = args.iter().find(|arg| arg.get_long() == Some(long))?;
                let env = arg.get_env()?.to_string_lossy();
                Some(format!(
                    "note: --{long} can also be given as {env} in the environment"
                ))
            })
            .collect();
        if !notes.is_empty() {
            let _ = err.print();
            eprintln!("{}", notes.join("\n"));
            std::process::exit(2);
        }
    }
    err.exit()
}

/// Nix's profiles directory, unless `--profiles-dir` says otherwise.
const PROFILES_DIR: &str = "/nix/var/nix/profiles";

/// The longest a deadline may be: long enough for any real pass, short
/// enough that deadline arithmetic never comes near overflowing.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);
/// The longest `--min-build-age`.
pub const MAX_BUILD_AGE: Duration = Duration::from_secs(366 * 86_400);

/// The shortest deadline: 1 ms (a unit's `RuntimeMaxSec=` counts in them).
const MIN_DEADLINE: Duration = Duration::from_millis(1);

/// A number of seconds from [`MIN_DEADLINE`] to [`MAX_DEADLINE`].
pub fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs = text
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs >= MIN_DEADLINE.as_secs_f64())
        .ok_or_else(|| format!("{text:?} is not a number of seconds of at least 0.001"))?;
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= MAX_DEADLINE)
        .ok_or_else(|| {
            format!(
                "{text} seconds is more than the limit of {} s (24 h)",
                MAX_DEADLINE.as_secs()
            )
        })
}

/// `--confirm-timeout`: like [`parse_seconds`], or `0`: off.
fn parse_seconds_or_off(text: &str) -> Result<Duration, String> {
    match text.trim().parse::<f64>() {
        Ok(0.0) => Ok(Duration::ZERO),
        _ => parse_seconds(text).map_err(|why| format!("{why} (or 0, to not check)")),
    }
}

/// `--min-build-age`: a duration of at most [`MAX_BUILD_AGE`].
fn parse_build_age(text: &str) -> Result<Duration, String> {
    let age = parse_duration(text)?;
    if age > MAX_BUILD_AGE {
        return Err(format!(
            "{text:?} is more than the limit of {} days",
            MAX_BUILD_AGE.as_secs() / 86_400
        ));
    }
    Ok(age)
}

/// `90` (seconds), `90s`, `30min`, `2h`, `1d`, `1h 30min`: time spans as
/// systemd and `humantime` write them.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text)
        .map_err(|why| format!("{text:?} is not a duration ({why}; e.g. 0, 90s, 30min, 2h, 1d)"))
}

/// Parses `--job-uri` without echoing the value, as clap's own errors do:
/// a URI may carry a password.
#[derive(Debug, Clone, Copy)]
struct JobUriParser;

impl clap::builder::TypedValueParser for JobUriParser {
    type Value = JobUri;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<JobUri, clap::Error> {
        let name = arg.map_or_else(|| "--job-uri".to_owned(), ToString::to_string);
        let text = value.to_str().unwrap_or_default();
        value
            .to_str()
            .ok_or_else(|| "it is not UTF-8".to_owned())
            .and_then(JobUri::parse)
            .map_err(|why| {
                // Whatever the reason quotes, never the password.
                let why = why.replace(text, &without_userinfo(text));
                clap::Error::raw(
                    clap::error::ErrorKind::ValueValidation,
                    format!("invalid value for '{name}': {why}\n"),
                )
                .with_cmd(cmd)
            })
    }
}

/// `https://user:pw@host/…` → `https://***@host/…`.
fn without_userinfo(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***{}", &rest[at..]),
        None => uri.to_owned(),
    }
}

fn parse_output(name: &str) -> Result<String, String> {
    parse_word(name, "_+.-", "a derivation output name (e.g. out, bin)")
}

/// A Hydra job name, as it stands in a job URI (`hosts.web1`, `tested`).
fn parse_job_name(job: &str) -> Result<String, String> {
    parse_word(job, "._+-", "a Hydra job name (e.g. tested)")
}

fn parse_system(system: &str) -> Result<String, String> {
    parse_word(system, "_-", "a Nix system (e.g. x86_64-linux)")
}

/// A non-empty word of ASCII letters, digits and `extra`.
fn parse_word(word: &str, extra: &str, what: &str) -> Result<String, String> {
    let valid = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || extra.contains(c));
    valid
        .then(|| word.to_owned())
        .ok_or_else(|| format!("{word:?} is not {what}"))
}

fn reject_poll_period(_: &str) -> Result<String, String> {
    Err(
        "hail runs exactly one pass per start; polling is hail@PROFILE.timer's job \
         (NixOS: services.hail.instances.<name>.pollPeriod; elsewhere: \
         `systemctl edit hail@PROFILE.timer`, OnUnitInactiveSec=)"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("0", 0),
            ("90", 90),
            ("90s", 90),
            ("30min", 1800),
            ("2h", 7200),
            ("1d", 86_400),
            ("1h 30min", 5400),
        ] {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
        for bad in ["", "x", "5 parsecs", "-1h", "h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn userinfo_is_never_shown() {
        assert_eq!(
            without_userinfo("https://ci:s3cret@hydra/job/p/j/web"),
            "https://***@hydra/job/p/j/web"
        );
        assert_eq!(without_userinfo("https://hydra/a@b"), "https://hydra/a@b");
        assert_eq!(without_userinfo("not a uri"), "not a uri");
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "x", "inf", "NaN", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_seconds_or_off("0"), Ok(Duration::ZERO));
        assert_eq!(parse_seconds_or_off("60"), Ok(Duration::from_secs(60)));
        for bad in ["-1", "x", "90000"] {
            assert!(parse_seconds_or_off(bad).is_err(), "{bad}");
        }
    }
}
