//! The command line: compatible with the original hail, every option also
//! an environment variable so units can use `EnvironmentFile=`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::hydra::JobUri;
use crate::profile::ProfileName;

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

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot-time activation: run PROFILE/bin/activate if the profile exists
    /// (exits 0 if it does not).
    Activate(ActivateArgs),
}

#[derive(Debug, Args)]
pub struct ProfileArgs {
    /// The profile to deploy: PROFILES_DIR/PROFILE (may contain '/', e.g. hail-profiles/web).
    #[arg(long, env = "HAIL_PROFILE", value_parser = ProfileName::parse, required = true)]
    pub profile: Option<ProfileName>,

    /// Where profiles live.
    #[arg(
        long,
        env = "HAIL_PROFILES_DIR",
        value_name = "DIR",
        default_value = "/nix/var/nix/profiles"
    )]
    pub profiles_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct PassArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,

    /// The Hydra job to follow: http(s)://HOST[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB.
    #[arg(long, env = "HAIL_JOB_URI", value_name = "HYDRA_JOB_URI", value_parser = JobUri::parse, required = true)]
    pub job_uri: Option<JobUri>,

    /// netrc file with HTTP Basic credentials for the job URI's host (the
    /// `machine` entry for it, else `default`) [default: /etc/netrc if it exists].
    #[arg(long, env = "HAIL_NETRC_FILE", value_name = "FILE")]
    pub netrc_file: Option<PathBuf>,

    /// Where hail keeps per-profile locks [default: $STATE_DIRECTORY, else /var/lib/hail].
    #[arg(long, env = "HAIL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Seconds each HTTP exchange may take [default: 10 to connect, 60 in all].
    #[arg(long, env = "HAIL_TIMEOUT", value_name = "SECS", value_parser = parse_seconds)]
    pub timeout: Option<Duration>,

    /// Seconds a pass waits for another pass on the same profile to finish.
    #[arg(long, env = "HAIL_LOCK_TIMEOUT", value_name = "SECS", value_parser = parse_seconds, default_value = "1800")]
    pub lock_timeout: Duration,

    /// Seconds bin/activate may run before its process group is ended.
    #[arg(long, env = "HAIL_ACTIVATE_TIMEOUT", value_name = "SECS", value_parser = parse_seconds, default_value = "600")]
    pub activate_timeout: Duration,

    /// Ask Hydra and say what would be deployed; change nothing.
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
}

#[derive(Debug, Args)]
pub struct ActivateArgs {
    #[command(flatten)]
    pub profile: ProfileArgs,

    /// Seconds bin/activate may run before its process group is ended.
    #[arg(long, env = "HAIL_ACTIVATE_TIMEOUT", value_name = "SECS", value_parser = parse_seconds, default_value = "600")]
    pub activate_timeout: Duration,
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    text.parse::<f64>()
        .ok()
        .filter(|secs| secs.is_finite() && *secs > 0.0)
        .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
        .ok_or_else(|| format!("{text:?} is not a positive number of seconds"))
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
    fn seconds() {
        assert_eq!(parse_seconds("1.5"), Ok(Duration::from_millis(1500)));
        for bad in ["0", "-1", "x", "inf", "NaN", ""] {
            assert!(parse_seconds(bad).is_err(), "{bad}");
        }
    }
}
