//! hail: keep a Nix profile in step with the latest successful build of a
//! Hydra job, one pass per run.

pub mod activate;
pub mod cli;
pub mod credentials;
pub mod failure;
pub mod hydra;
pub mod manager;
pub mod metrics;
pub mod pass;
pub mod process;
pub mod profile;
pub mod report;
pub mod service;
pub mod state;
pub mod status;
pub mod store_path;
pub mod system;

use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::activate::Runner;
use crate::cli::{Cli, Command, ManagerCommand, ServiceCommand};
use crate::pass::Pass;
use crate::profile::Profile;
use crate::state::StateDir;
use crate::store_path::StoreDir;

/// The whole program: parse, run, print one error with its chain.
pub fn main() -> ExitCode {
    let cli = Cli::parse_checked().unwrap_or_else(|err| cli::exit_with(err));
    let (profile, job) = match &cli.command {
        Some(Command::Activate(args)) => (args.profile.profile.as_ref(), Some(&args.job_uri)),
        Some(Command::ActivationFinished(args)) => (Some(&args.profile), None),
        Some(Command::Status(_) | Command::Service(_) | Command::Manager(_)) => (None, None),
        None => (cli.pass.profile.profile.as_ref(), cli.pass.job_uri.as_ref()),
    };
    report::init(
        profile.map(|p| p.as_str()),
        job.map(|j| j.to_string()).as_deref(),
    );
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            let about = failure::failed_build(&err).map_or_else(Default::default, |(id, path)| {
                report::About {
                    build_id: id,
                    store_path: Some(path),
                }
            });
            report::event(
                log::Level::Error,
                report::message_id::ERROR,
                about,
                format_args!("{err:#}"),
            );
            let first_line = format!("{err:#}");
            report::status(&format!(
                "failed: {}",
                first_line.lines().next().unwrap_or_default()
            ));
            ExitCode::from(failure::exit_status(&err))
        }
    }
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    let store = StoreDir::from_env();
    match cli.command {
        Some(Command::Activate(args)) => {
            let profile = profile_from(&args.profile)?;
            let state = state_dir(args.lock.state_dir);
            let boot = pass::BootActivation {
                runner: Runner::detect(&profile.name, &state, &store),
                profile,
                store,
                state,
                job: args.job_uri,
                lock_timeout: args.lock.lock_timeout,
                activate_timeout: args.profile.activate_timeout,
            };
            boot.run()?;
        }
        Some(Command::Service(command)) => match command {
            ServiceCommand::Activate {
                service,
                health_timeout,
                profile_dir,
            } => {
                service::Service::new(&service.name, service.unit_dir)?
                    .activate(&profile_dir, health_timeout)?;
            }
            ServiceCommand::Deactivate { service } => {
                service::Service::new(&service.name, service.unit_dir)?.deactivate()?;
            }
        },
        Some(Command::Manager(command)) => {
            let (args, instances) = match command {
                ManagerCommand::Activate { manager, instances } => (manager, Some(instances)),
                ManagerCommand::Deactivate { manager } => (manager, None),
            };
            let manager = manager::Manager {
                config_dir: args.config_dir,
                unit_dir: args.unit_dir,
                profiles_dir: args.profiles_dir,
            };
            match instances {
                Some(file) => {
                    let json = std::fs::read_to_string(&file).with_context(|| {
                        format!("cannot read the instance list {}", file.display())
                    })?;
                    manager.activate(&manager::Manager::parse_instances(&json)?)?;
                }
                None => manager.deactivate()?,
            }
        }
        Some(Command::ActivationFinished(args)) => {
            let store_path = store
                .parse(&args.store_path)
                .map_err(|e| anyhow::anyhow!("--store-path {}: {e}", args.store_path))?;
            activate::record_finished(
                &StateDir::new(args.state_dir),
                &args.profile,
                &store_path,
                args.timeout,
            )?;
        }
        Some(Command::Status(args)) => {
            print!(
                "{}",
                status::show(&state_dir(args.state_dir), &args.profiles, args.json)?
            );
        }
        None => {
            let args = cli.pass;
            let profile = profile_from(&args.profile)?;
            let job = args
                .job_uri
                .ok_or_else(|| anyhow::anyhow!("--job-uri is required"))?;
            let credentials = credentials::for_host(args.netrc_file.as_deref(), &job.host)?;
            let timeouts = args
                .timeout
                .map_or(hydra::Timeouts::DEFAULT, hydra::Timeouts::total);
            let hydra = hydra::Client::new(hydra::ClientConfig {
                job,
                credentials,
                timeouts,
                store: store.clone(),
                selection: args.selection.selection(),
                output: args.output,
            })?;
            let state = state_dir(args.lock.state_dir);
            let pass = Pass {
                hydra,
                runner: Runner::detect(&profile.name, &state, &store),
                profile,
                store,
                state,
                lock_timeout: args.lock.lock_timeout,
                nix_timeout: args.nix_timeout,
                activate_timeout: args.profile.activate_timeout,
                dry_run: args.dry_run,
                retry_failed: args.retry_failed,
                force: args.force,
                min_build_age: args.min_build_age,
                keep_generations: args.keep_generations,
                metrics_file: args.metrics_file,
                nixos: system::Nixos {
                    operation: args.nixos.nixos_operation,
                    confirm_timeout: args.nixos.confirm_timeout,
                    allow_reboot: args.nixos.allow_reboot,
                    reboot_window: args.nixos.reboot_window,
                    booted: system::Nixos::booted_system_from_env(),
                    runtime_dir: system::Nixos::runtime_dir_from_env(),
                },
            };
            pass.run()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn state_dir(dir: Option<std::path::PathBuf>) -> StateDir {
    dir.map_or_else(StateDir::default_from_env, StateDir::new)
}

fn profile_from(args: &cli::ProfileArgs) -> Result<Profile> {
    let name = args
        .profile
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--profile is required"))?;
    Ok(Profile::new(&args.profiles_dir, name))
}
