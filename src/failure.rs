//! What failed, as a type: the exit status, the journal, the state and the
//! metrics all read a failure's [`FailureKind`], so a new kind appears in
//! every one of them by construction.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Exit status for failures that changed nothing.
pub const EXIT_FAILED: u8 = 1;
/// Exit status for a failed activation (rolled back), or a failed build
/// that is still Hydra's latest.
pub const EXIT_ACTIVATION_FAILED: u8 = 3;

/// Which step of a pass failed.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    strum::VariantArray,
)]
#[serde(rename_all = "kebab-case")]
pub enum FailureKind {
    /// Asking Hydra: unreachable, an error answer, or one hail cannot use.
    Hydra,
    /// Realising the build or switching the profile with nix-env.
    Nix,
    /// Running an activation (and, when it fails, rolling back).
    Activation,
    /// The rest: the lock, the state, reading the profile.
    #[default]
    State,
}

impl FailureKind {
    /// Every kind, derived from the enum itself: a new one is counted
    /// everywhere without being listed by hand.
    pub const ALL: &'static [Self] = <Self as strum::VariantArray>::VARIANTS;

    /// The name in the state, the metrics and the journal.
    pub fn label(self) -> &'static str {
        match self {
            Self::Hydra => "hydra",
            Self::Nix => "nix",
            Self::Activation => "activation",
            Self::State => "state",
        }
    }

    pub fn exit_status(self) -> u8 {
        match self {
            Self::Activation => EXIT_ACTIVATION_FAILED,
            Self::Hydra | Self::Nix | Self::State => EXIT_FAILED,
        }
    }
}

/// An error with its kind and, for a failed activation, the build it is
/// about (its id if known, its store path) for the journal.
#[derive(Debug)]
pub struct Failure {
    pub kind: FailureKind,
    pub build: Option<(Option<u64>, String)>,
    error: anyhow::Error,
}

impl Failure {
    pub fn tagged(kind: FailureKind, error: anyhow::Error) -> anyhow::Error {
        anyhow::Error::new(Self {
            kind,
            build: None,
            error,
        })
    }

    /// A failed activation of the build at `store_path`.
    pub fn of_build(build_id: Option<u64>, store_path: &str, message: String) -> anyhow::Error {
        anyhow::Error::new(Self {
            kind: FailureKind::Activation,
            build: Some((build_id, store_path.to_owned())),
            error: anyhow::Error::msg(message),
        })
    }

    /// The failure in `err`'s chain, if it has one.
    fn find(err: &anyhow::Error) -> Option<&Self> {
        err.chain().find_map(|cause| cause.downcast_ref::<Self>())
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain here, and no source below: printed once.
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Failure {}

/// Tags the errors of one step with its kind (an error already tagged keeps
/// its kind).
pub trait FailedAs<T> {
    fn failed_as(self, kind: FailureKind) -> anyhow::Result<T>;
}

impl<T> FailedAs<T> for anyhow::Result<T> {
    fn failed_as(self, kind: FailureKind) -> anyhow::Result<T> {
        self.map_err(|err| match Failure::find(&err) {
            Some(_) => err,
            None => Failure::tagged(kind, err),
        })
    }
}

/// The kind of any error a pass returns; untagged ones are [`FailureKind::State`].
pub fn kind_of(err: &anyhow::Error) -> FailureKind {
    Failure::find(err).map_or_else(FailureKind::default, |failure| failure.kind)
}

/// The build an error is about, if it is a failed activation.
pub fn failed_build(err: &anyhow::Error) -> Option<(Option<u64>, &str)> {
    Failure::find(err)
        .and_then(|failure| failure.build.as_ref())
        .map(|(id, path)| (*id, path.as_str()))
}

/// The exit status an error stands for.
pub fn exit_status(err: &anyhow::Error) -> u8 {
    kind_of(err).exit_status()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn kinds_survive_context_and_print_once() {
        let err = Err::<(), _>(anyhow::anyhow!("connection refused"))
            .context("cannot reach Hydra")
            .failed_as(FailureKind::Hydra)
            .context("the pass failed")
            .unwrap_err();
        assert_eq!(kind_of(&err), FailureKind::Hydra);
        assert_eq!(exit_status(&err), EXIT_FAILED);
        assert_eq!(
            format!("{err:#}"),
            "the pass failed: cannot reach Hydra: connection refused"
        );
        // The first tag wins.
        let again = Err::<(), _>(err).failed_as(FailureKind::State).unwrap_err();
        assert_eq!(kind_of(&again), FailureKind::Hydra);
        assert_eq!(kind_of(&anyhow::anyhow!("untagged")), FailureKind::State);
    }

    #[test]
    fn activation_failures_exit_3_and_name_their_build() {
        let err = Failure::of_build(Some(4), "/nix/store/x-web", "activate exited 1".into());
        assert_eq!(exit_status(&err), EXIT_ACTIVATION_FAILED);
        assert_eq!(failed_build(&err), Some((Some(4), "/nix/store/x-web")));
        let labels: Vec<&str> = FailureKind::ALL.iter().map(|k| k.label()).collect();
        assert_eq!(labels, ["hydra", "nix", "activation", "state"]);
        for kind in FailureKind::ALL {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                serde_json::json!(kind.label())
            );
        }
    }
}
