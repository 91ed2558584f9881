//! Store paths that can only exist after validation, so that nothing Hydra
//! sends reaches `nix-env` or the file system unchecked.

use std::fmt;
use std::path::{Path, PathBuf};

/// Nix's base-32 alphabet: digits and lower-case letters without e, o, u, t.
const NIX_BASE32: &str = "0123456789abcdfghijklmnpqrsvwxyz";
const HASH_LEN: usize = 32;
/// Nix refuses store path names longer than this.
const MAX_NAME_LEN: usize = 211;

/// Where the Nix store lives: `NIX_STORE_DIR`, or `/nix/store`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreDir(PathBuf);

impl StoreDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    pub fn from_env() -> Self {
        match std::env::var_os("NIX_STORE_DIR") {
            Some(dir) if !dir.is_empty() => Self::new(dir),
            _ => Self::new("/nix/store"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Validates `candidate` as a top-level path in this store:
    /// `STORE/` + 32 base-32 characters + `-` + a valid name, nothing more.
    pub fn parse(&self, candidate: &str) -> Result<StorePath, String> {
        let store = self.0.to_string_lossy();
        let store = store.trim_end_matches('/');
        let base = candidate
            .strip_prefix(store)
            .and_then(|rest| rest.strip_prefix('/'))
            .ok_or_else(|| format!("it is not in the Nix store {store}"))?;
        if base.contains('/') {
            return Err("it names something inside a store path, not a store path".into());
        }
        let (hash, name) = base
            .split_at_checked(HASH_LEN)
            .ok_or("its hash part is too short")?;
        if !hash.chars().all(|c| NIX_BASE32.contains(c)) {
            return Err("its hash part is not Nix base-32".into());
        }
        let name = name
            .strip_prefix('-')
            .ok_or("its hash part is not followed by '-'")?;
        check_name(name)?;
        Ok(StorePath(format!("{store}/{base}")))
    }
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("its name is empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("its name is longer than {MAX_NAME_LEN} characters"));
    }
    if name.starts_with('.') {
        return Err("its name starts with a period".into());
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "+-._?=".contains(*c)))
    {
        Some(bad) => Err(format!("its name contains the character {bad:?}")),
        None => Ok(()),
    }
}

/// A validated top-level store path, e.g. `/nix/store/0c0…-hello-2.12`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StorePath(String);

impl StorePath {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn as_path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello-2.12.1";

    fn parse(s: &str) -> Result<StorePath, String> {
        StoreDir::new("/nix/store").parse(s)
    }

    #[test]
    fn accepts_a_well_formed_path() {
        assert_eq!(parse(GOOD).map(|p| p.to_string()), Ok(GOOD.to_string()));
        assert!(parse("/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-a+b_c?d=e.f-1").is_ok());
    }

    #[test]
    fn honours_another_store_dir() {
        let store = StoreDir::new("/opt/store/");
        assert!(
            store
                .parse("/opt/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-x")
                .is_ok()
        );
        assert!(store.parse(GOOD).is_err());
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in [
            "",
            "/nix/store",
            "/nix/store/",
            "nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello",
            "/nix/storex/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm-hello",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrme-hello",
            "/nix/store/0C0B5JRRFG6X7MNYL2KJKZZWHM5XHRM8-hello",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello/bin",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-..",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-.hidden",
            "/nix/store/../../etc/passwd",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-a/../../../etc",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-a;rm -rf /",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-$(touch x)",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-a`id`",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-a\nb",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-a b",
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-é",
            " /nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-hello",
        ] {
            assert!(parse(bad).is_err(), "accepted {bad:?}");
        }
        let long = format!(
            "/nix/store/0c0b5jrrfg6x7mnyl2kjkzzwhm5xhrm8-{}",
            "a".repeat(212)
        );
        assert!(parse(&long).is_err());
    }
}
