//! The files that are not Rust: every `.nix` file parses, `flake.lock` looks like a
//! genuine lock (and nothing like a local `path:` one), and the plain systemd units in
//! `systemd/` pass `systemd-analyze verify` without a single line of output. The units'
//! commands are also run for real to check the environment-only contract they rely on.
//!
//! Needs `nix-instantiate` and `systemd-analyze` on PATH (CI installs both; a missing tool
//! fails the test with an install hint). Also holds small helpers that `nixos.rs` shares.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The repository root.
pub(crate) fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The hail binary cargo built for these tests.
pub(crate) fn hail_bin() -> &'static str {
    env!("CARGO_BIN_EXE_hail")
}

pub(crate) const NIX_HINT: &str = "install Nix's command-line tools: `apt-get install -y nix-bin` \
     (Debian/Ubuntu), or enter `nix develop`";
pub(crate) const SYSTEMD_HINT: &str = "install systemd-analyze: `apt-get install -y systemd` \
     (Debian/Ubuntu), or enter `nix develop`";

/// Runs `cmd`, failing loudly when the program is not installed.
pub(crate) fn run(cmd: &mut Command, hint: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.stdin(Stdio::null()).output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not on PATH; this test needs it: {hint}")
        }
        Err(err) => panic!("cannot run `{program}`: {err}"),
    }
}

/// `nix-instantiate` with a store that needs no daemon and no write access: parsing and
/// evaluating these files never touches a store.
pub(crate) fn nix_instantiate() -> Command {
    let mut cmd = Command::new("nix-instantiate");
    cmd.args(["--store", "dummy://"]);
    cmd
}

pub(crate) fn output_text(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// `systemd-analyze verify UNITS…` in `dir` (unit names resolve from the current
/// directory). Returns everything it printed: `verify` exits 0 with only a warning for
/// many mistakes (an unknown key, `Type=oneshoot`), so any output is a failure.
pub(crate) fn systemd_verify(dir: &Path, units: &[&str]) -> (Output, String) {
    let output = run(
        Command::new("systemd-analyze")
            .arg("verify")
            .args(units)
            .current_dir(dir),
        SYSTEMD_HINT,
    );
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output, printed)
}

pub(crate) fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("hail-units-test-")
        .tempdir()
        .expect("temp dir")
}

/// Every `.nix` file of the repository, without `target/`, `.git/` or symlinks (`result`).
fn nix_files(dir: &Path, found: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|err| panic!("read {}: {err}", dir.display()))
        .map(|entry| entry.expect("directory entry"))
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    for entry in entries {
        let path = entry.path();
        let file_type = entry.file_type().expect("file type");
        let name = entry.file_name();
        if file_type.is_dir() {
            if name != OsStr::new("target") && name != OsStr::new(".git") {
                nix_files(&path, found);
            }
        } else if file_type.is_file() && path.extension() == Some(OsStr::new("nix")) {
            found.push(path);
        }
    }
}

#[test]
fn every_nix_file_parses() {
    let root = repo();
    let mut files = Vec::new();
    nix_files(&root, &mut files);
    let relative: BTreeSet<String> = files
        .iter()
        .map(|file| {
            file.strip_prefix(&root)
                .expect("inside the repo")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    for expected in [
        "flake.nix",
        "nixos/module.nix",
        "nixos/tests/eval.nix",
        "nixos/tests/vm.nix",
    ] {
        assert!(
            relative.contains(expected),
            "{expected} not found; .nix files: {relative:?}"
        );
    }

    let mut failures = Vec::new();
    for file in &files {
        let output = run(nix_instantiate().arg("--parse").arg(file), NIX_HINT);
        if !output.status.success() {
            failures.push(format!("{}:\n{}", file.display(), output_text(&output)));
        }
    }
    assert!(
        failures.is_empty(),
        "nix-instantiate --parse failed:\n{}",
        failures.join("\n")
    );
}

fn lock_string<'a>(node: &'a Value, key: &str, context: &str) -> &'a str {
    node.get(key)
        .and_then(Value::as_str)
        .filter(|value| !value.is_empty())
        .unwrap_or_else(|| panic!("flake.lock: {context} has no string `{key}`: {node}"))
}

/// Every `"type": "path"` anywhere in the document, as JSON pointers.
fn path_types(value: &Value, pointer: String, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            if map.get("type").and_then(Value::as_str) == Some("path") {
                found.push(pointer.clone());
            }
            for (key, child) in map {
                path_types(child, format!("{pointer}/{key}"), found);
            }
        }
        Value::Array(items) => {
            for (index, child) in items.iter().enumerate() {
                path_types(child, format!("{pointer}/{index}"), found);
            }
        }
        _ => {}
    }
}

#[test]
fn flake_lock_is_a_genuine_github_lock() {
    let text = std::fs::read_to_string(repo().join("flake.lock")).expect("read flake.lock");
    let lock: Value = serde_json::from_str(&text).expect("flake.lock is JSON");

    let mut paths = Vec::new();
    path_types(&lock, String::new(), &mut paths);
    assert!(
        paths.is_empty(),
        "flake.lock has \"type\": \"path\" entries (what `--override-input X path:…` writes) at {paths:?}; \
         write the lock from genuine published data (../shared/FLAKE-LOCK.md)"
    );

    assert_eq!(lock["version"], 7, "flake.lock version");
    let root_name = lock["root"]
        .as_str()
        .expect("flake.lock: `root` names a node");
    let nodes = lock["nodes"].as_object().expect("flake.lock: `nodes`");
    let root = nodes
        .get(root_name)
        .unwrap_or_else(|| panic!("flake.lock: no root node {root_name:?}"));
    let inputs = root["inputs"]
        .as_object()
        .expect("flake.lock: root node has `inputs`");
    let nixpkgs = inputs
        .get("nixpkgs")
        .and_then(Value::as_str)
        .expect("flake.lock: root input `nixpkgs` names a node");
    assert!(
        nodes.contains_key(nixpkgs),
        "flake.lock: no node {nixpkgs:?}"
    );

    let flake_nix = std::fs::read_to_string(repo().join("flake.nix")).expect("read flake.nix");
    let provenance = repo().join("../shared/FLAKE-LOCK.md");
    let provenance = std::fs::read_to_string(&provenance).ok();

    for (name, node) in nodes {
        if name == root_name {
            continue;
        }
        let locked = &node["locked"];
        let context = format!("node {name:?} `locked`");
        assert_eq!(
            lock_string(locked, "type", &context),
            "github",
            "flake.lock: {context}"
        );
        let owner = lock_string(locked, "owner", &context);
        let repo_name = lock_string(locked, "repo", &context);
        let rev = lock_string(locked, "rev", &context);
        assert!(
            rev.len() == 40
                && rev
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "flake.lock: {context}: rev {rev:?} is not 40 lowercase hex digits"
        );
        let nar_hash = lock_string(locked, "narHash", &context);
        let digest = nar_hash.strip_prefix("sha256-").unwrap_or_else(|| {
            panic!("flake.lock: {context}: narHash {nar_hash:?} is not sha256-…")
        });
        assert!(
            digest.len() == 44
                && digest.ends_with('=')
                && digest[..43]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'),
            "flake.lock: {context}: narHash {nar_hash:?} is not a base64 SHA-256"
        );
        let last_modified = locked["lastModified"].as_u64().unwrap_or_else(|| {
            panic!("flake.lock: {context}: lastModified is not an integer: {locked}")
        });
        assert!(
            last_modified > 1_500_000_000,
            "flake.lock: {context}: lastModified {last_modified} is not a plausible commit time"
        );

        // The lock must answer what flake.nix asks for, or Nix relocks (impossible offline).
        let original = &node["original"];
        let context = format!("node {name:?} `original`");
        assert_eq!(lock_string(original, "type", &context), "github");
        assert_eq!(lock_string(original, "owner", &context), owner);
        assert_eq!(lock_string(original, "repo", &context), repo_name);
        let url = match original.get("ref").and_then(Value::as_str) {
            Some(reference) => format!("github:{owner}/{repo_name}/{reference}"),
            None => format!("github:{owner}/{repo_name}"),
        };
        assert!(
            flake_nix.contains(&format!("\"{url}\"")),
            "flake.nix does not ask for {url:?}, which flake.lock's node {name:?} locks"
        );

        // Where the shared, cross-checked pins are at hand, the entry must be one of them.
        match &provenance {
            Some(pins) => {
                for value in [rev, nar_hash, &last_modified.to_string()] {
                    assert!(
                        pins.contains(value),
                        "flake.lock: node {name:?}: {value} is not among the genuine pins in \
                         ../shared/FLAKE-LOCK.md; never invent a lock entry"
                    );
                }
            }
            None => {
                // Only a developer's machine may lack the pins; CI has them.
                assert!(
                    std::env::var_os("CI").is_none(),
                    "../shared/FLAKE-LOCK.md is missing in CI: the lock cannot be compared \
                     with the published pins"
                );
                eprintln!(
                    "note units::flake_lock_is_a_genuine_github_lock: ../shared/FLAKE-LOCK.md not \
                     found, lock entries not compared with the published pins"
                );
            }
        }
    }
}

const UNIT_FILES: [&str; 3] = ["hail@.service", "hail@.timer", "hail-activate@.service"];

/// Copies `systemd/` to a temporary directory with `ExecStart`'s `/usr/local/bin/hail` (which
/// `verify` requires to exist) replaced by the test build of hail.
fn units_for_verify() -> tempfile::TempDir {
    let dir = temp_dir();
    let mut found = BTreeSet::new();
    for entry in std::fs::read_dir(repo().join("systemd")).expect("read systemd/") {
        let entry = entry.expect("directory entry");
        let name = entry.file_name().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(entry.path()).expect("read unit");
        assert!(
            name.ends_with(".timer") || text.contains("ExecStart=/usr/local/bin/hail "),
            "systemd/{name} does not run /usr/local/bin/hail"
        );
        std::fs::write(
            dir.path().join(&name),
            text.replace("/usr/local/bin/hail", hail_bin()),
        )
        .expect("write unit");
        found.insert(name);
    }
    let expected: BTreeSet<String> = UNIT_FILES.iter().map(ToString::to_string).collect();
    assert_eq!(found, expected, "unit files in systemd/");
    dir
}

#[test]
fn systemd_units_verify_without_a_word() {
    let dir = units_for_verify();
    for units in [
        &[
            "hail@web.service",
            "hail@web.timer",
            "hail-activate@web.service",
        ][..],
        // A profile name with a dash, typed as it is.
        &[
            "hail@my-web.service",
            "hail@my-web.timer",
            "hail-activate@my-web.service",
        ][..],
    ] {
        let (output, printed) = systemd_verify(dir.path(), units);
        assert!(
            output.status.success() && printed.trim().is_empty(),
            "systemd-analyze verify {units:?} complained:\n{}",
            output_text(&output)
        );
    }
}

#[test]
fn systemd_verify_catches_a_bad_unit() {
    // The check above is only worth something if a broken unit makes verify speak up.
    let dir = units_for_verify();
    let good = std::fs::read_to_string(dir.path().join("hail@.service")).expect("read unit");
    assert!(good.contains("Type=oneshot"));
    std::fs::write(
        dir.path().join("hail@.service"),
        good.replace("Type=oneshot", "Type=oneshoot"),
    )
    .expect("write unit");
    let (_, printed) = systemd_verify(dir.path(), &["hail@web.service"]);
    assert!(
        printed.contains("oneshoot"),
        "systemd-analyze verify said nothing about Type=oneshoot: {printed:?}"
    );
}

/// The sandbox of `hail@.service` and `hail-activate@.service`, in `systemd/` and in the
/// NixOS module's templates alike: `[Service]` key and value as a unit file says it.
pub(crate) const HARDENING: &[(&str, &str)] = &[
    ("NoNewPrivileges", "yes"),
    ("PrivateTmp", "yes"),
    ("ProtectClock", "yes"),
    ("ProtectControlGroups", "yes"),
    ("ProtectHostname", "yes"),
    ("ProtectKernelLogs", "yes"),
    ("ProtectKernelModules", "yes"),
    ("ProtectKernelTunables", "yes"),
    ("LockPersonality", "yes"),
    ("RestrictRealtime", "yes"),
    ("RestrictSUIDSGID", "yes"),
    ("SystemCallArchitectures", "native"),
    ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
];

/// `[Service]` keys of the two service units that are not sandboxing: everything else
/// there must be in [`HARDENING`], so that the units and the module cannot drift apart.
pub(crate) const NOT_HARDENING: &[&str] = &[
    "Type",
    "RemainAfterExit",
    "Environment",
    "EnvironmentFile",
    "ExecStart",
    "SuccessExitStatus",
    "NotifyAccess",
    "StateDirectory",
    "TimeoutStartSec",
    "UMask",
];

/// A unit file's settings as (section, key, value), comments and blank lines dropped.
fn unit_settings(name: &str) -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo().join("systemd").join(name)).expect("read unit");
    let mut section = String::new();
    let mut settings = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = header.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("systemd/{name}: not a setting: {line:?}"));
        settings.push((section.clone(), key.to_string(), value.to_string()));
    }
    settings
}

fn assert_setting(settings: &[(String, String, String)], unit: &str, expected: &str) {
    let (section, rest) = expected.split_once('/').expect("Section/Key=Value");
    let (key, value) = rest.split_once('=').expect("Key=Value");
    assert!(
        settings
            .iter()
            .any(|(s, k, v)| s == section && k == key && v == value),
        "systemd/{unit}: [{section}] has no {key}={value}; it has {settings:?}"
    );
}

#[test]
fn systemd_units_follow_the_contract() {
    let pass = unit_settings("hail@.service");
    for expected in [
        "Unit/Wants=network-online.target",
        "Unit/After=network-online.target",
        "Service/Type=oneshot",
        "Service/Environment=HAIL_PROFILE=%i",
        "Service/EnvironmentFile=/etc/hail/%i.env",
        "Service/ExecStart=/usr/local/bin/hail --oneshot",
        "Service/TimeoutStartSec=4h",
        "Service/NotifyAccess=main",
        "Service/StateDirectory=hail",
    ] {
        assert_setting(&pass, "hail@.service", expected);
    }
    let path = pass
        .iter()
        .find_map(|(_, key, value)| {
            (key == "Environment")
                .then(|| value.strip_prefix("PATH="))
                .flatten()
        })
        .expect("hail@.service sets PATH");
    let dirs: Vec<&str> = path.split(':').collect();
    for dir in ["/nix/var/nix/profiles/default/bin", "/usr/bin"] {
        assert!(
            dirs.contains(&dir),
            "hail@.service PATH lacks {dir}: {path}"
        );
    }

    let timer = unit_settings("hail@.timer");
    for expected in [
        "Timer/OnBootSec=1min",
        "Timer/OnUnitInactiveSec=5min",
        "Timer/RandomizedDelaySec=1min",
        "Timer/Persistent=true",
        "Install/WantedBy=timers.target",
    ] {
        assert_setting(&timer, "hail@.timer", expected);
    }

    let boot = unit_settings("hail-activate@.service");
    for expected in [
        "Service/Type=oneshot",
        "Service/RemainAfterExit=yes",
        "Service/Environment=HAIL_PROFILE=%i",
        "Service/EnvironmentFile=/etc/hail/%i.env",
        "Service/ExecStart=/usr/local/bin/hail activate",
        "Service/TimeoutStartSec=1h",
        "Service/NotifyAccess=main",
        "Service/StateDirectory=hail",
        "Install/WantedBy=multi-user.target",
    ] {
        assert_setting(&boot, "hail-activate@.service", expected);
    }

    // Both run sandboxed, the same way, and with nothing else that sandboxes.
    for (unit, settings) in [("hail@.service", &pass), ("hail-activate@.service", &boot)] {
        for (key, value) in HARDENING {
            assert_setting(settings, unit, &format!("Service/{key}={value}"));
        }
        let unlisted: Vec<&str> = settings
            .iter()
            .filter(|(section, key, _)| {
                section == "Service"
                    && !NOT_HARDENING.contains(&key.as_str())
                    && !HARDENING.iter().any(|(listed, _)| listed == key)
            })
            .map(|(_, key, _)| key.as_str())
            .collect();
        assert!(
            unlisted.is_empty(),
            "systemd/{unit}: {unlisted:?} are neither in HARDENING nor known non-sandboxing keys"
        );
    }
}

/// Runs `cmd` with a time limit; kills it and fails the test when it is exceeded.
fn run_limited(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start hail");
    let started = Instant::now();
    loop {
        if child.try_wait().expect("wait for hail").is_some() {
            return child.wait_with_output().expect("hail output");
        }
        if started.elapsed() > limit {
            child.kill().ok();
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                pipe.read_to_string(&mut stderr).ok();
            }
            child.wait().ok();
            panic!("hail ran longer than {limit:?}; stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The units configure hail through the environment only (`HAIL_*` and `$STATE_DIRECTORY`);
/// run exactly their commands that way.
fn hail_like_a_unit(dir: &Path) -> Command {
    let mut cmd = Command::new(hail_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("HAIL_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("HAIL_PROFILE", "web")
        .env("HAIL_PROFILES_DIR", dir.join("profiles"))
        .env("STATE_DIRECTORY", dir.join("state"))
        .env("HAIL_TIMEOUT", "30")
        .current_dir(dir);
    std::fs::create_dir_all(dir.join("profiles")).expect("profiles dir");
    std::fs::create_dir_all(dir.join("state")).expect("state dir");
    cmd
}

#[test]
fn boot_activation_command_succeeds_without_a_profile() {
    // hail-activate@web.service before the first deployment: `hail activate`, nothing to do.
    let dir = temp_dir();
    let output = run_limited(
        hail_like_a_unit(dir.path())
            .env(
                "HAIL_JOB_URI",
                "https://hydra.example.org/job/infra/main/web",
            )
            .arg("activate"),
        Duration::from_secs(60),
    );
    assert_eq!(
        output.status.code(),
        Some(0),
        "`hail activate` with HAIL_PROFILE=web and no profile:\n{}",
        output_text(&output)
    );
}

#[test]
fn pass_command_takes_everything_from_the_environment() {
    // hail@web.service with a Hydra that is down: a failed pass (1), not a usage error (2),
    // so `hail --oneshot` plus the unit's environment is a complete invocation.
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        listener.local_addr().expect("local address").port()
    };
    let dir = temp_dir();
    let output = run_limited(
        hail_like_a_unit(dir.path())
            .env(
                "HAIL_JOB_URI",
                format!("http://127.0.0.1:{port}/job/infra/main/web"),
            )
            .arg("--oneshot"),
        Duration::from_secs(90),
    );
    assert_eq!(
        output.status.code(),
        Some(1),
        "`hail --oneshot` configured by environment only, Hydra unreachable:\n{}",
        output_text(&output)
    );
    assert!(
        std::fs::read_dir(dir.path().join("profiles"))
            .expect("profiles dir")
            .next()
            .is_none(),
        "a failed pass created something in the profiles dir"
    );
}

/// A Nix expression for nixpkgs' lib, or `None` after printing why the test is skipped.
pub(crate) fn nixpkgs_lib(test: &str) -> Option<String> {
    let path = nixpkgs_lib_dir(test)?;
    assert!(
        !path.contains(['"', '\\', '$']),
        "nixpkgs lib path {path:?}: quotes, backslashes and dollars are not supported"
    );
    Some(format!("import (/. + \"{path}\")"))
}

/// The directory of nixpkgs' lib, or `None` after printing why the test is skipped.
pub(crate) fn nixpkgs_lib_dir(test: &str) -> Option<String> {
    let path = match std::env::var("NIXPKGS_LIB") {
        Ok(path) if !path.is_empty() => {
            let path = Path::new(&path)
                .canonicalize()
                .unwrap_or_else(|err| panic!("NIXPKGS_LIB={path}: {err}"));
            assert!(
                path.join("default.nix").is_file() && path.join("modules.nix").is_file(),
                "NIXPKGS_LIB={} is not nixpkgs' lib directory (no default.nix/modules.nix)",
                path.display()
            );
            path.to_string_lossy().into_owned()
        }
        _ => {
            // The steering side's copy, beside the project (`../shared/nixpkgs-lib`),
            // which CI has too.
            let shared = repo().join("../shared/nixpkgs-lib/lib");
            if shared.join("default.nix").is_file() {
                return Some(
                    shared
                        .canonicalize()
                        .unwrap_or_else(|err| panic!("{}: {err}", shared.display()))
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            let found = run(
                nix_instantiate().args(["--find-file", "nixpkgs/lib"]),
                NIX_HINT,
            );
            if !found.status.success() {
                // Skipping is for a developer's machine only; CI must evaluate.
                assert!(
                    std::env::var_os("CI").is_none(),
                    "{test}: no nixpkgs lib in CI: ../shared/nixpkgs-lib/lib is missing \
                     (or set NIXPKGS_LIB=/path/to/nixpkgs/lib)"
                );
                eprintln!("SKIP {test}: no nixpkgs lib (set NIXPKGS_LIB=/path/to/nixpkgs/lib)");
                return None;
            }
            String::from_utf8_lossy(&found.stdout).trim().to_string()
        }
    };
    Some(path)
}
