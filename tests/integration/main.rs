//! hail's integration tests: one test binary (faster to link), one module per area.
//! Test names start with their module (`pass::`, `faults::`, `systemd::`, `nixos::`, `units::`),
//! which is how the flake's sandboxed check skips the ones that need a Nix store,
//! loopback servers or systemd.

mod common;
mod faults;
mod observe;
mod pass;
