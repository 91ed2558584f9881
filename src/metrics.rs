//! Prometheus text metrics for one profile, written atomically after every
//! pass, for node_exporter's textfile collector.

use std::fmt::Write;
use std::path::Path;

use anyhow::Result;

use crate::failure::FailureKind;
use crate::profile::ProfileName;
use crate::state::{Reboot, State, write_atomically};

/// Renders the profile's state as Prometheus text exposition format.
pub fn render(profile: &ProfileName, state: &State) -> String {
    let label = format!("profile=\"{}\"", escape(profile.as_str()));
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{label}}} {value}"
        );
    };
    let check = state.last_check.as_ref();
    gauge(
        "hail_last_check_timestamp_seconds",
        "When the last pass ended (Unix time).",
        check.map_or(0, |c| c.at),
    );
    gauge(
        "hail_last_success_timestamp_seconds",
        "When the last pass that deployed or found the profile up to date ended (Unix time).",
        state.last_success.unwrap_or(0),
    );
    gauge(
        "hail_deployed_build_id",
        "Hydra build id of the deployed build (0: none, or not known).",
        state
            .deployed
            .as_ref()
            .and_then(|d| d.build_id)
            .unwrap_or(0),
    );
    gauge(
        "hail_latest_build_id",
        "Hydra build id the last pass saw as the one to deploy (0: none).",
        check.and_then(|c| c.latest_build_id).unwrap_or(0),
    );
    gauge(
        "hail_up_to_date",
        "1 if the profile was at that build when the last pass ended.",
        u64::from(check.is_some_and(|c| c.at_latest)),
    );
    gauge(
        "hail_held",
        "1 while hail holds off because the profile was rolled back by hand.",
        u64::from(state.held.is_some()),
    );
    gauge(
        "hail_waiting_build_id",
        "A newer build waiting for --min-build-age (0: none).",
        state.waiting.as_ref().map_or(0, |w| w.build_id),
    );
    gauge(
        "hail_failed_build_id",
        "A build whose activation failed and is not retried (0: none).",
        state.failed.as_ref().map_or(0, |f| f.build_id),
    );
    gauge(
        "hail_reboot_required",
        "1 while the NixOS system deployed needs a reboot to run its kernel, initrd or modules.",
        u64::from(state.reboot.is_some()),
    );
    gauge(
        "hail_reboot_pending",
        "1 while hail is to carry that reboot out itself (--allow-reboot).",
        u64::from(state.reboot.as_ref().is_some_and(Reboot::pending)),
    );
    let counters = &state.counters;
    let _ = writeln!(
        out,
        "# HELP hail_deploys_total Builds deployed and activated.\n# TYPE hail_deploys_total counter\nhail_deploys_total{{{label}}} {}",
        counters.deploys
    );
    let _ = writeln!(
        out,
        "# HELP hail_rollbacks_total Failed activations rolled back.\n# TYPE hail_rollbacks_total counter\nhail_rollbacks_total{{{label}}} {}",
        counters.rollbacks
    );
    let _ = writeln!(
        out,
        "# HELP hail_errors_total Failed passes by kind.\n# TYPE hail_errors_total counter"
    );
    for kind in FailureKind::ALL {
        let count = counters.errors.get(kind).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "hail_errors_total{{{label},kind=\"{}\"}} {count}",
            kind.label()
        );
    }
    out
}

pub fn write(path: &Path, profile: &ProfileName, state: &State) -> Result<()> {
    write_atomically(path, render(profile, state).as_bytes())
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
