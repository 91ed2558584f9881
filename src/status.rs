//! `hail status`: what hail deployed and how its passes went, read from the
//! state dir alone (no network, no lock), as a table or as JSON.

use std::fmt::Write;

use anyhow::Result;
use serde_json::json;

use crate::profile::ProfileName;
use crate::report::utc;
use crate::state::{ActivationState, Deployment, State, StateDir};

/// The JSON document's format version; bumped only on incompatible changes.
const JSON_VERSION: u32 = 1;

pub fn show(states: &StateDir, only: &[ProfileName], as_json: bool) -> Result<String> {
    let profiles = if only.is_empty() {
        states.profiles()?
    } else {
        only.to_vec()
    };
    let rows: Vec<(ProfileName, State)> = profiles
        .into_iter()
        .map(|name| {
            let state = states.load(&name);
            (name, state)
        })
        .collect();
    Ok(if as_json {
        json_document(&rows)
    } else {
        table(&rows, states)
    })
}

fn json_document(rows: &[(ProfileName, State)]) -> String {
    let profiles: serde_json::Map<String, serde_json::Value> = rows
        .iter()
        .map(|(name, state)| {
            (
                name.to_string(),
                serde_json::to_value(state).unwrap_or_default(),
            )
        })
        .collect();
    let doc = json!({ "version": JSON_VERSION, "profiles": profiles });
    format!("{doc:#}\n")
}

fn table(rows: &[(ProfileName, State)], states: &StateDir) -> String {
    if rows.is_empty() {
        return format!(
            "no profiles in {} yet (hail keeps state there once a pass has run)\n",
            states.path().display()
        );
    }
    let mut lines = vec![[
        "PROFILE".to_owned(),
        "DEPLOYED".to_owned(),
        "SINCE".to_owned(),
        "LAST CHECK".to_owned(),
        "RESULT".to_owned(),
        "NOTES".to_owned(),
    ]];
    for (name, state) in rows {
        let deployed = state.deployed.as_ref();
        let check = state.last_check.as_ref();
        lines.push([
            name.to_string(),
            deployed.map_or("-".into(), Deployment::describe),
            deployed.map_or("-".into(), |d| utc(d.at)),
            check.map_or("never".into(), |c| utc(c.at)),
            check.map_or("-".into(), |c| c.result.label().to_owned()),
            notes(state),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|col| {
            lines
                .iter()
                .map(|l| l[col].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for line in lines {
        let mut row = String::new();
        for (col, cell) in line.iter().enumerate() {
            if col == 5 {
                row.push_str(cell);
            } else {
                let _ = write!(row, "{cell:<width$}  ", width = widths[col]);
            }
        }
        out.push_str(row.trim_end());
        out.push('\n');
    }
    out
}

fn notes(state: &State) -> String {
    let mut notes = Vec::new();
    if let Some(d) = &state.deployed {
        match d.activation {
            ActivationState::Pending => {
                notes.push(format!("activation of {} pending", d.describe()));
            }
            ActivationState::Failed => notes.push(format!(
                "activation of {} failed {} time(s) in a row{}",
                d.describe(),
                d.activation_failures,
                state
                    .last_error
                    .as_ref()
                    .and_then(|e| e.message.lines().next().map(|l| format!(": {l}")))
                    .unwrap_or_default()
            )),
            ActivationState::Done => {}
        }
    }
    if let Some(rollback) = &state.rolling_back {
        notes.push(format!(
            "rollback from build {} interrupted; the next pass finishes it",
            rollback.build_id
        ));
    }
    if let Some(held) = &state.held {
        notes.push(format!(
            "held since {}: {} was rolled back by hand",
            utc(held.since),
            held.build_id
                .map_or("the newest generation".to_owned(), |id| format!(
                    "build {id}"
                ))
        ));
    }
    if let Some(failed) = &state.failed {
        notes.push(format!(
            "build {} failed at {} ({}), not retried",
            failed.build_id,
            utc(failed.at),
            failed.reason
        ));
    }
    if let Some(reboot) = &state.reboot {
        notes.push(format!(
            "{} since {}: {}",
            reboot.label(),
            utc(reboot.since),
            crate::system::who_reboots(reboot)
        ));
    }
    if let Some(waiting) = &state.waiting {
        notes.push(match waiting.eligible_at {
            Some(at) => format!("build {} eligible at {}", waiting.build_id, utc(at)),
            None => format!("build {} waits: its age is unknown", waiting.build_id),
        });
    }
    if let Some(check) = &state.last_check
        && let Some(error) = &state.last_error
        && error.at == check.at
    {
        let first_line = error.message.lines().next().unwrap_or_default();
        notes.push(format!("error: {first_line}"));
    }
    notes.join("; ")
}
