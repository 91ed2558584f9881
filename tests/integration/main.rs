//! hail's integration tests: one test binary (faster to link), one module per area.
//! Test names start with their module (`pass::`, `faults::`, `observe::`, `systemd::`, …),
//! which is how the flake's sandboxed check skips the ones that need a Nix store,
//! loopback servers or systemd.

mod bench;
mod bounded;
mod common;
mod docs;
mod faults;
mod files;
mod front;
mod messages;
mod nixlib;
mod nixos;
mod observe;
mod pass;
mod services;
mod systemd;
mod systems;
mod units;
