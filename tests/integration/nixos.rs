//! The NixOS module (`nixos/module.nix`), evaluated with nixpkgs' `lib` through
//! `nixos/tests/eval.nix`: the units it generates for a good configuration, and the
//! assertion (or evaluation) failures for bad ones.
//!
//! nixpkgs' lib comes from `NIXPKGS_LIB` (a path to nixpkgs' `lib` directory), else
//! `../shared/nixpkgs-lib/lib` beside the checkout (CI has it), else `<nixpkgs/lib>` on
//! `NIX_PATH`. Without any, a test fails in CI and prints a loud SKIP elsewhere;
//! `nix flake check` on a networked machine runs the same evaluation against the
//! locked nixpkgs (`checks.<system>.module-eval`).

use std::collections::BTreeSet;
use std::process::Output;

use serde_json::Value;

use crate::units::{
    HARDENING, NIX_HINT, NOT_HARDENING, hail_bin, nix_instantiate, nixpkgs_lib, output_text, repo,
    run, systemd_verify, temp_dir,
};

/// `nix-instantiate --eval --strict --json nixos/tests/eval.nix -A ATTR`.
fn eval(lib: &str, attr: &str) -> Output {
    run(
        nix_instantiate()
            .args(["--eval", "--strict", "--json"])
            .arg(repo().join("nixos/tests/eval.nix"))
            .args(["--arg", "lib", lib, "-A", attr]),
        NIX_HINT,
    )
}

/// Evaluates ATTR, which must succeed (nix prints partial JSON on errors: check the exit).
fn eval_json(lib: &str, attr: &str) -> Value {
    let output = eval(lib, attr);
    assert!(
        output.status.success(),
        "evaluating nixos/tests/eval.nix -A {attr} failed:\n{}",
        output_text(&output)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|err| panic!("-A {attr}: not JSON ({err}):\n{}", output_text(&output)))
}

fn keys(value: &Value) -> BTreeSet<&str> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {value}"))
        .keys()
        .map(String::as_str)
        .collect()
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not a list: {value}"))
        .iter()
        .map(|item| {
            item.as_str()
                .unwrap_or_else(|| panic!("not a string: {item}"))
        })
        .collect()
}

/// A `serviceConfig` value as NixOS writes it into a unit file: a list is one line per
/// element, which for the settings compared here is the same as one line of them all.
fn unit_value(value: &Value) -> String {
    match value {
        Value::Bool(true) => "yes".to_owned(),
        Value::Bool(false) => "no".to_owned(),
        Value::String(text) => text.clone(),
        Value::Array(_) => strings(value).join(" "),
        other => other.to_string(),
    }
}

/// The template runs with exactly the sandbox of the plain units in `systemd/`
/// ([`HARDENING`], which `units::systemd_units_follow_the_contract` checks there).
fn assert_sandboxed(name: &str, unit: &Value) {
    let config = unit["serviceConfig"]
        .as_object()
        .unwrap_or_else(|| panic!("{name}: no serviceConfig"));
    for (key, value) in HARDENING {
        let found = config.get(*key).map(unit_value);
        assert_eq!(found.as_deref(), Some(*value), "{name}: {key}");
    }
    let unlisted: Vec<&String> = config
        .keys()
        .filter(|key| {
            !NOT_HARDENING.contains(&key.as_str())
                && !HARDENING.iter().any(|(listed, _)| listed == key)
        })
        .collect();
    assert!(
        unlisted.is_empty(),
        "{name}: {unlisted:?} are neither in HARDENING nor known non-sandboxing keys"
    );
}

fn messages(case: &Value) -> Vec<&str> {
    strings(&case["failedAssertions"])
}

/// The failed assertions must be exactly one per entry of `expected`, each message
/// containing all of that entry's fragments.
fn assert_failures(cases: &Value, case: &str, expected: &[&[&str]]) {
    let found = messages(&cases[case]);
    assert_eq!(
        found.len(),
        expected.len(),
        "case {case}: expected {} failed assertions, got {found:#?}",
        expected.len()
    );
    for fragments in expected {
        assert!(
            found
                .iter()
                .any(|message| fragments.iter().all(|fragment| message.contains(fragment))),
            "case {case}: no failed assertion mentions all of {fragments:?}; got {found:#?}"
        );
    }
}

#[test]
fn good_configuration_generates_the_units() {
    let Some(lib) = nixpkgs_lib("nixos::good_configuration_generates_the_units") else {
        return;
    };
    let hail = format!(
        "{}/bin/hail",
        eval_json(&lib, "hailPackage").as_str().expect("path")
    );
    let nix = eval_json(&lib, "nixPackage");
    let nix = nix.as_str().expect("path");
    let systemd = eval_json(&lib, "systemdPackage");
    let systemd = systemd.as_str().expect("path");
    let cases = eval_json(&lib, "cases");
    let good = &cases["good"];
    let services = &good["services"];
    let timers = &good["timers"];

    assert!(messages(good).is_empty(), "good config fails: {good:#}");
    assert_eq!(
        keys(services),
        BTreeSet::from([
            "hail@",
            "hail@web",
            "hail@db",
            "hail@odd-args",
            "hail-activate@",
            "hail-activate@web",
            "hail-activate@db",
            "hail-activate@odd-args",
            "hail-removed-instances",
        ]),
        "services (no units for the disabled instance)"
    );
    // It remembers the enabled instances' profiles (not the disabled one's) and
    // deactivates profiles that were remembered and are gone.
    let removal = &services["hail-removed-instances"];
    let script = removal["script"].as_str().expect("a script");
    assert!(
        script.contains("current='hail-profiles/db\nodd-args\nweb\n'")
            && script.contains("deactivate=/nix/var/nix/profiles/$profile/bin/deactivate")
            && script.contains("list=/var/lib/hail/nixos-instances"),
        "{script}"
    );
    assert!(removal["unitConfig"].get("ConditionPathExists").is_none());
    assert_eq!(strings(&removal["wantedBy"]), ["multi-user.target"]);
    assert_eq!(removal["serviceConfig"]["StateDirectory"], "hail");
    // Bounded, each deactivate and the whole; the list replaced by a new file.
    assert_eq!(removal["serviceConfig"]["TimeoutStartSec"], "1h");
    assert!(
        script.contains("timeout --kill-after=10s 600s \"$deactivate\"")
            && script.contains("tmp=$(mktemp \"$list.XXXXXXXX\")"),
        "{script}"
    );
    let syntax = std::process::Command::new("bash")
        .args(["-n", "-c", script])
        .output()
        .expect("bash");
    assert!(syntax.status.success(), "{}", output_text(&syntax));
    // A manager profile's bin/deactivate finds its instances' profiles there.
    assert_eq!(
        removal["environment"]["HAIL_PROFILES_DIR"],
        "/nix/var/nix/profiles"
    );
    // It runs the profiles' bin/deactivate itself: no sandbox, like an activation.
    for (key, _) in HARDENING {
        assert!(
            removal["serviceConfig"].get(*key).is_none(),
            "hail-removed-instances sets {key}"
        );
    }
    assert_eq!(
        keys(timers),
        BTreeSet::from(["hail@web", "hail@db", "hail@odd-args"])
    );

    // The pass template: `hail --oneshot` and nothing else, never restarted by a switch.
    let template = &services["hail@"];
    assert_eq!(template["serviceConfig"]["Type"], "oneshot");
    assert_eq!(
        template["serviceConfig"]["ExecStart"],
        format!("{hail} --oneshot")
    );
    assert_eq!(template["serviceConfig"]["StateDirectory"], "hail");
    assert_eq!(template["serviceConfig"]["NotifyAccess"], "main");
    // Above hail's own deadlines, like the plain units.
    assert_eq!(template["serviceConfig"]["TimeoutStartSec"], "4h");
    assert_eq!(template["restartIfChanged"], false);
    assert_eq!(template["unitConfig"]["X-StopOnRemoval"], false);
    assert_eq!(template["overrideStrategy"], "asDropinIfExists");
    assert_eq!(template["environment"]["HAIL_PROFILE"], "%i");
    assert_eq!(
        template["environment"]["HAIL_PROFILES_DIR"],
        "/nix/var/nix/profiles"
    );
    assert_eq!(template["environment"]["HAIL_STATE_DIR"], "/var/lib/hail");
    assert_sandboxed("hail@", template);
    assert!(
        strings(&template["path"]).contains(&nix),
        "nix on the template's path"
    );
    assert!(
        strings(&template["path"]).contains(&systemd),
        "systemd-run (hail runs bin/activate with it) on the template's path"
    );
    assert!(strings(&template["wants"]).contains(&"network-online.target"));
    assert!(strings(&template["after"]).contains(&"network-online.target"));
    assert!(strings(&template["wantedBy"]).is_empty());

    // Instance drop-ins: the environment, and nix-env still on PATH.
    for (name, profile, job) in [
        ("web", "web", "https://hydra.example.org/job/infra/main/web"),
        (
            "db",
            "hail-profiles/db",
            "http://hydra.internal:3000/hydra/job/infra/main/db/",
        ),
    ] {
        let dropin = &services[format!("hail@{name}").as_str()];
        assert_eq!(dropin["overrideStrategy"], "asDropin", "hail@{name}");
        assert_eq!(dropin["restartIfChanged"], false, "hail@{name}");
        let env = &dropin["environment"];
        assert_eq!(env["HAIL_PROFILE"], profile, "hail@{name}");
        assert_eq!(env["HAIL_JOB_URI"], job, "hail@{name}");
        let path = env["PATH"].as_str().expect("drop-in PATH");
        for package in [nix, systemd] {
            assert!(
                path.split(':').any(|dir| dir == format!("{package}/bin")),
                "hail@{name}: the drop-in's PATH= replaces the template's and must hold \
                 {package}/bin: {path}"
            );
        }
        assert!(strings(&dropin["wantedBy"]).is_empty(), "hail@{name}");
    }
    let web = &services["hail@web"];
    assert_eq!(
        web["environment"]["HAIL_NETRC_FILE"],
        "/run/secrets/hydra-netrc"
    );
    assert_eq!(web["environment"]["NIX_CONFIG"], "connect-timeout = 5");
    assert_eq!(
        web["serviceConfig"],
        serde_json::json!({ "EnvironmentFile": "/run/secrets/hail-web.env" }),
        "no extraArgs: the drop-in leaves ExecStart alone, and reads the secrets file"
    );
    assert!(
        services["hail@db"]["environment"]
            .get("HAIL_NETRC_FILE")
            .is_none()
    );
    assert!(
        services["hail@db"]["serviceConfig"]
            .get("EnvironmentFile")
            .is_none()
    );

    // extraArgs: ExecStart reset, then one command, each argument quoted for systemd.
    assert_eq!(
        services["hail@db"]["serviceConfig"]["ExecStart"],
        serde_json::json!(["", format!(r#"{hail} --oneshot "--timeout" "600""#)])
    );
    assert_eq!(
        services["hail@odd-args"]["serviceConfig"]["ExecStart"],
        serde_json::json!([
            "",
            format!(r#"{hail} --oneshot "--state-dir" "/srv/hail 100%% \"$$HOME\" it's""#)
        ])
    );

    // Timers: one per instance, pollPeriod after the last pass.
    for (name, period, delay) in [("web", "5min", "1min"), ("db", "1h", "10min")] {
        let timer = &timers[format!("hail@{name}").as_str()];
        let config = &timer["timerConfig"];
        assert_eq!(config["OnUnitInactiveSec"], period, "hail@{name}.timer");
        assert_eq!(config["RandomizedDelaySec"], delay, "hail@{name}.timer");
        assert_eq!(config["OnBootSec"], "1min", "hail@{name}.timer");
        assert_eq!(config["Persistent"], true, "hail@{name}.timer");
        assert_eq!(
            strings(&timer["wantedBy"]),
            ["timers.target"],
            "hail@{name}.timer"
        );
        assert_eq!(timer["overrideStrategy"], "asDropinIfExists");
    }

    // Boot-time activation: a template, and a drop-in wanted by multi-user.target only
    // for instances with activateAtBoot.
    let boot = &services["hail-activate@"];
    assert_eq!(boot["serviceConfig"]["Type"], "oneshot");
    assert_eq!(boot["serviceConfig"]["RemainAfterExit"], true);
    assert_eq!(
        boot["serviceConfig"]["ExecStart"],
        format!("{hail} activate")
    );
    assert_eq!(boot["environment"]["HAIL_PROFILE"], "%i");
    assert_eq!(
        boot["environment"]["HAIL_PROFILES_DIR"],
        template["environment"]["HAIL_PROFILES_DIR"]
    );
    assert_eq!(
        boot["environment"]["HAIL_STATE_DIR"],
        template["environment"]["HAIL_STATE_DIR"]
    );
    assert_eq!(boot["serviceConfig"]["StateDirectory"], "hail");
    assert_sandboxed("hail-activate@", boot);
    assert_eq!(boot["restartIfChanged"], false);
    assert!(strings(&boot["after"]).contains(&"nix-daemon.socket"));
    assert!(strings(&boot["wantedBy"]).is_empty());
    let boot_web = &services["hail-activate@web"];
    assert_eq!(boot_web["overrideStrategy"], "asDropin");
    assert_eq!(strings(&boot_web["wantedBy"]), ["multi-user.target"]);
    assert_eq!(boot_web["environment"]["HAIL_PROFILE"], "web");
    // The same job as hail@web, which `hail activate` checks the profile against.
    assert_eq!(
        boot_web["environment"]["HAIL_JOB_URI"],
        services["hail@web"]["environment"]["HAIL_JOB_URI"]
    );
    // ...and the same secrets, read by systemd from outside the store.
    assert_eq!(
        boot_web["serviceConfig"]["EnvironmentFile"],
        "/run/secrets/hail-web.env"
    );
    // db (activateAtBoot = false) keeps a drop-in naming its profile, for a manual
    // `systemctl start hail-activate@db`, but boot does not start it.
    let boot_db = &services["hail-activate@db"];
    assert!(strings(&boot_db["wantedBy"]).is_empty(), "{boot_db:#}");
    assert_eq!(boot_db["environment"]["HAIL_PROFILE"], "hail-profiles/db");
    assert!(boot_db["serviceConfig"].get("EnvironmentFile").is_none());
    assert!(good["tmpfiles"].as_array().is_some_and(Vec::is_empty));
}

#[test]
fn no_instance_generates_nothing() {
    let Some(lib) = nixpkgs_lib("nixos::no_instance_generates_nothing") else {
        return;
    };
    let cases = eval_json(&lib, "cases");

    // A system that imports the module and defines no instance: not a single unit.
    let empty = &cases["empty"];
    assert_eq!(empty["services"], serde_json::json!({}));
    assert_eq!(empty["timers"], serde_json::json!({}));
    assert_eq!(empty["tmpfiles"], serde_json::json!([]));
    assert!(messages(empty).is_empty());

    // Only disabled instances: the unit that takes them down, with no profile to keep,
    // and nothing else.
    let disabled = &cases["onlyDisabled"];
    let services = &disabled["services"];
    assert_eq!(keys(services), BTreeSet::from(["hail-removed-instances"]));
    let removal = &services["hail-removed-instances"];
    let script = removal["script"].as_str().expect("a script");
    assert!(script.contains("current=''\n"), "{script}");
    assert_eq!(strings(&removal["wantedBy"]), ["multi-user.target"]);
    assert!(removal["unitConfig"].get("ConditionPathExists").is_none());
    assert_eq!(disabled["timers"], serde_json::json!({}));
    assert!(messages(disabled).is_empty());
}

#[test]
fn directories_come_from_one_option_each() {
    let Some(lib) = nixpkgs_lib("nixos::directories_come_from_one_option_each") else {
        return;
    };
    let cases = eval_json(&lib, "cases");

    // Both moved, the state directory still under /var/lib: StateDirectory= says it.
    let custom = &cases["customDirs"];
    let services = &custom["services"];
    assert_eq!(
        keys(services),
        BTreeSet::from([
            "hail@",
            "hail@web",
            "hail-activate@",
            "hail-activate@web",
            "hail-removed-instances",
        ])
    );
    for name in ["hail@", "hail-activate@"] {
        let unit = &services[name];
        assert_eq!(
            unit["environment"]["HAIL_PROFILES_DIR"], "/nix/var/nix/profiles/hail",
            "{name}"
        );
        assert_eq!(
            unit["environment"]["HAIL_STATE_DIR"], "/var/lib/hail-deploy",
            "{name}"
        );
        assert_eq!(
            unit["serviceConfig"]["StateDirectory"], "hail-deploy",
            "{name}"
        );
    }
    let removal = &services["hail-removed-instances"];
    assert_eq!(removal["serviceConfig"]["StateDirectory"], "hail-deploy");
    assert_eq!(
        removal["environment"]["HAIL_PROFILES_DIR"],
        "/nix/var/nix/profiles/hail"
    );
    let script = removal["script"].as_str().expect("a script");
    assert!(
        script.contains("list=/var/lib/hail-deploy/nixos-instances\n")
            && script.contains("deactivate=/nix/var/nix/profiles/hail/$profile/bin/deactivate\n")
            && !script.contains("/var/lib/hail/")
            && !script.contains("/nix/var/nix/profiles/$profile"),
        "{script}"
    );
    assert_eq!(
        services["hail@web"]["environment"]["HAIL_METRICS_FILE"],
        "/var/lib/prometheus-node-exporter-text-files/hail-web.prom"
    );
    assert_eq!(custom["tmpfiles"], serde_json::json!([]));
    assert!(messages(custom).is_empty(), "{custom:#}");

    // Outside /var/lib: no StateDirectory= anywhere, systemd-tmpfiles makes it.
    let outside = &cases["stateOutsideVarLib"];
    let services = &outside["services"];
    for name in ["hail@", "hail-activate@", "hail-removed-instances"] {
        let unit = &services[name];
        assert_eq!(
            unit["environment"]["HAIL_STATE_DIR"], "/srv/hail/state",
            "{name}"
        );
        assert!(
            unit["serviceConfig"].get("StateDirectory").is_none(),
            "{name}: {unit:#}"
        );
    }
    assert!(
        services["hail-removed-instances"]["script"]
            .as_str()
            .is_some_and(|script| script.contains("list=/srv/hail/state/nixos-instances\n"))
    );
    assert_eq!(
        outside["tmpfiles"],
        serde_json::json!(["d /srv/hail/state 0755 root root -"])
    );
    assert!(messages(outside).is_empty(), "{outside:#}");
}

#[test]
fn bad_configurations_fail_with_the_fix() {
    let Some(lib) = nixpkgs_lib("nixos::bad_configurations_fail_with_the_fix") else {
        return;
    };
    let cases = eval_json(&lib, "cases");

    assert_failures(
        &cases,
        "duplicateProfile",
        &[&[
            "services.hail.instances.{web, web-canary} all deploy the profile",
            "\"web\"",
            "give each its own",
        ]],
    );

    let uri_options: Vec<String> = ["no-scheme", "latest", "credentials", "jobset", "query"]
        .iter()
        .map(|name| format!("services.hail.instances.{name}.jobUri"))
        .collect();
    let uri_cases: Vec<[&str; 3]> = uri_options
        .iter()
        .map(|option| {
            [
                option.as_str(),
                "is not a Hydra job URL",
                "/job/PROJECT/JOBSET/JOB",
            ]
        })
        .collect();
    let uri_expected: Vec<&[&str]> = uri_cases.iter().map(|c| &c[..]).collect();
    assert_failures(&cases, "badJobUri", &uri_expected);

    let profile_names = [
        "absolute",
        "dotdot",
        "empty",
        "space",
        "double-slash",
        "trailing-slash",
        "dot",
    ];
    let profile_options: Vec<String> = profile_names
        .iter()
        .map(|name| format!("services.hail.instances.{name}.profile"))
        .collect();
    let profile_cases: Vec<[&str; 3]> = profile_options
        .iter()
        .map(|option| {
            [
                option.as_str(),
                "is not a valid profile name",
                "hail-profiles/web",
            ]
        })
        .collect();
    let profile_expected: Vec<&[&str]> = profile_cases.iter().map(|c| &c[..]).collect();
    assert_failures(&cases, "badProfile", &profile_expected);

    // "my web" is a bad unit instance name and, as the default profile, a bad profile.
    assert_failures(
        &cases,
        "badInstanceName",
        &[
            &[
                "services.hail.instances.\"my web\"",
                "becomes the systemd unit",
            ],
            &[
                "services.hail.instances.\"my web\".profile",
                "is not a valid profile name",
            ],
        ],
    );

    assert_failures(
        &cases,
        "badPollPeriod",
        &[
            &[
                "services.hail.instances.db.pollPeriod = \"0\" is not a positive systemd time",
                "the timer would poll only at boot",
            ],
            &["services.hail.instances.web.pollPeriod = \"5 parsecs\" is not a positive"],
        ],
    );

    assert_failures(
        &cases,
        "reservedEnvironment",
        &[&[
            "services.hail.instances.web.environment sets HAIL_ALLOW_REBOOT, HAIL_JOB_URI, HAIL_STATE_DIR",
            "use services.hail.instances.web.allowReboot, services.hail.instances.web.jobUri, services.hail.stateDir instead",
        ]],
    );

    assert_failures(
        &cases,
        "badDirs",
        &[
            &[
                "services.hail.profilesDir = \"/nix/var/nix/profiles/\"",
                "is not a usable directory",
                "(no \"/\" at the end)",
            ],
            &[
                "services.hail.stateDir = \"/var/lib/my hail\"",
                "is not a usable directory",
            ],
        ],
    );
}

/// The `HAIL_*` variables a system instance's options set, from `hail@NAME`'s environment.
fn system_variables<'a>(case: &'a Value, name: &str) -> BTreeSet<(&'a str, &'a str)> {
    let environment = &case["services"][format!("hail@{name}").as_str()]["environment"];
    environment
        .as_object()
        .unwrap_or_else(|| panic!("hail@{name}: no environment in {case:#}"))
        .iter()
        .filter(|(key, _)| {
            [
                "HAIL_NIXOS_OPERATION",
                "HAIL_CONFIRM_TIMEOUT",
                "HAIL_ALLOW_REBOOT",
                "HAIL_REBOOT_WINDOW",
            ]
            .contains(&key.as_str())
        })
        .map(|(key, value)| (key.as_str(), value.as_str().expect("a string")))
        .collect()
}

#[test]
fn a_system_instance_hands_its_options_to_hail() {
    let Some(lib) = nixpkgs_lib("nixos::a_system_instance_hands_its_options_to_hail") else {
        return;
    };
    let cases = eval_json(&lib, "cases");
    for case in [
        "systemRebooting",
        "systemDefaults",
        "systemBoot",
        "autoUpgradeAndProfiles",
    ] {
        assert!(
            messages(&cases[case]).is_empty(),
            "case {case} fails: {:#}",
            cases[case]
        );
    }

    // Every option reaches hail, in the syntax of its command line.
    let rebooting = &cases["systemRebooting"];
    assert_eq!(
        system_variables(rebooting, "system"),
        BTreeSet::from([
            ("HAIL_NIXOS_OPERATION", "switch"),
            ("HAIL_CONFIRM_TIMEOUT", "300"),
            ("HAIL_ALLOW_REBOOT", "true"),
            ("HAIL_REBOOT_WINDOW", "23:30-04:00"),
        ])
    );
    assert_eq!(
        rebooting["services"]["hail@system"]["environment"]["HAIL_PROFILE"],
        "system"
    );
    // The profile beside it gets none of them, and is still activated at boot.
    assert!(system_variables(rebooting, "web").is_empty());
    assert_eq!(
        strings(&rebooting["services"]["hail-activate@web"]["wantedBy"]),
        ["multi-user.target"]
    );
    // NixOS activates the system it boots: no hail-activate@ at boot for it.
    assert!(
        strings(&rebooting["services"]["hail-activate@system"]["wantedBy"]).is_empty(),
        "{rebooting:#}"
    );

    // The profile decides, not the instance's name; the defaults are hail's, spelt out.
    let defaults = &cases["systemDefaults"];
    assert_eq!(
        system_variables(defaults, "host"),
        BTreeSet::from([
            ("HAIL_NIXOS_OPERATION", "switch"),
            ("HAIL_CONFIRM_TIMEOUT", "60"),
            ("HAIL_ALLOW_REBOOT", "false"),
        ])
    );
    assert!(strings(&defaults["services"]["hail-activate@host"]["wantedBy"]).is_empty());
    assert_eq!(
        system_variables(&cases["systemBoot"], "host"),
        BTreeSet::from([
            ("HAIL_NIXOS_OPERATION", "boot"),
            ("HAIL_CONFIRM_TIMEOUT", "0"),
            ("HAIL_ALLOW_REBOOT", "false"),
        ])
    );
}

#[test]
fn system_misconfigurations_fail_with_the_fix() {
    let Some(lib) = nixpkgs_lib("nixos::system_misconfigurations_fail_with_the_fix") else {
        return;
    };
    let cases = eval_json(&lib, "cases");
    assert_failures(
        &cases,
        "systemOptionsElsewhere",
        &[&[
            "services.hail.instances.web sets allowReboot, confirmTimeout, operation, rebootWindow,",
            "deploying a NixOS system uses (profile = \"system\")",
            "set services.hail.instances.web.profile = \"system\"",
        ]],
    );
    assert_failures(
        &cases,
        "rebootWindowWithoutAllowReboot",
        &[&[
            "services.hail.instances.system.rebootWindow is set",
            "services.hail.instances.system.allowReboot = true",
            "or remove rebootWindow",
        ]],
    );
    assert_failures(
        &cases,
        "emptyRebootWindow",
        &[&[
            "services.hail.instances.system.rebootWindow is empty (lower = upper = \"03:00\")",
            "it to null to reboot at any time",
        ]],
    );
    assert_failures(
        &cases,
        "twoSystemInstances",
        &[&[
            "services.hail.instances.{system, system-canary} all deploy the profile",
            "\"system\". Two instances would fight over it",
            "a host runs one NixOS system",
            "Keep one instance with profile = \"system\"",
        ]],
    );
    assert_failures(
        &cases,
        "systemOutsideNixosProfiles",
        &[&[
            "deploys to /nix/var/nix/profiles/hail/system",
            "NixOS boots only the generations of /nix/var/nix/profiles/system",
            "leave services.hail.profilesDir at \"/nix/var/nix/profiles\"",
        ]],
    );
    assert_failures(
        &cases,
        "autoUpgradeToo",
        &[&[
            "services.hail.instances.system deploys this host's NixOS system",
            "system.autoUpgrade.enable is true",
            "Set system.autoUpgrade.enable = false",
        ]],
    );
}

#[test]
fn missing_or_mistyped_values_fail_to_evaluate() {
    let Some(lib) = nixpkgs_lib("nixos::missing_or_mistyped_values_fail_to_evaluate") else {
        return;
    };
    for (attr, expected) in [
        ("missingJobUri", "services.hail.instances.web.jobUri"),
        ("noPackage", "services.hail.package is not set"),
        (
            "secretInStore",
            "services.hail.instances.web.environmentFile' is not of type `null or absolute path not in the Nix store'",
        ),
        (
            "badRebootTime",
            "services.hail.instances.system.rebootWindow.upper' is not of type `string matching the pattern",
        ),
    ] {
        let output = eval(&lib, attr);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "-A {attr} must fail mentioning {expected:?}:\n{}",
            output_text(&output)
        );
    }
}

#[test]
fn nix_side_expectations_hold() {
    // What the flake's checks.<system>.module-eval asserts, run here too.
    let Some(lib) = nixpkgs_lib("nixos::nix_side_expectations_hold") else {
        return;
    };
    assert_eq!(
        eval_json(&lib, "failedExpectations"),
        serde_json::json!([]),
        "nixos/tests/eval.nix expectations"
    );
}

/// `"KEY=VALUE"` as NixOS writes an `Environment=` line (the pair as a JSON string).
fn environment_line(key: &str, value: &Value) -> String {
    let pair = format!("{key}={}", value.as_str().expect("string value"));
    format!(
        "Environment={}\n",
        serde_json::to_string(&pair).expect("JSON string")
    )
}

#[test]
fn generated_service_lines_pass_systemd_analyze() {
    // The module's ExecStart quoting and environment values, written the way NixOS renders
    // them into a template and drop-in, must not make systemd say a word.
    let Some(lib) = nixpkgs_lib("nixos::generated_service_lines_pass_systemd_analyze") else {
        return;
    };
    let fake_hail = format!(
        "{}/bin/hail",
        eval_json(&lib, "hailPackage").as_str().expect("path")
    );
    let cases = eval_json(&lib, "cases");
    let dir = temp_dir();
    for (case, instance) in [
        ("good", "web"),
        ("good", "db"),
        ("good", "odd-args"),
        ("systemRebooting", "system"),
    ] {
        let services = &cases[case]["services"];
        for template in ["hail@", "hail-activate@"] {
            let dropin = &services[format!("{template}{instance}").as_str()];
            let mut unit = String::from("[Unit]\nDescription=hail module check\n[Service]\n");
            for section in [&services[template], dropin] {
                for (key, value) in section["environment"].as_object().expect("environment") {
                    unit.push_str(&environment_line(key, value));
                }
                for (key, value) in section["serviceConfig"].as_object().expect("serviceConfig") {
                    let values = match value {
                        Value::Array(items) => items.clone(),
                        other => vec![other.clone()],
                    };
                    for value in values {
                        let text = match value {
                            Value::String(text) => text,
                            Value::Bool(flag) => flag.to_string(),
                            other => other.to_string(),
                        };
                        let text = text.replace(&fake_hail, hail_bin());
                        unit.push_str(&format!("{key}={text}\n"));
                    }
                }
            }
            let file = format!("check-{template}.service").replace('@', &format!("-{instance}@"));
            std::fs::write(dir.path().join(&file), &unit).expect("write unit");
            let name = file.replace("@.", &format!("@{instance}."));
            let (output, printed) = systemd_verify(dir.path(), &[&name]);
            assert!(
                output.status.success() && printed.trim().is_empty(),
                "systemd-analyze verify complained about the lines generated for {template}{instance}:\n{unit}\n{}",
                output_text(&output)
            );
        }
    }
}

/// hail's flake outputs, evaluated offline against a stand-in nixpkgs (the
/// real lib, fake packages: `common/stub-nixpkgs-flake.nix`) with
/// `--override-input`: what exists, what it is called, and that every
/// integration-test area is skipped by name in the sandboxed package check.
#[test]
fn flake_outputs_evaluate_against_a_stub_nixpkgs() {
    let Some(lib) =
        crate::units::nixpkgs_lib_dir("nixos::flake_outputs_evaluate_against_a_stub_nixpkgs")
    else {
        return;
    };
    let tmp = temp_dir();
    let stub = tmp.path().join("stub-nixpkgs");
    std::fs::create_dir(&stub).unwrap();
    let copied = std::process::Command::new("cp")
        .args(["-r", &lib])
        .arg(stub.join("lib"))
        .status()
        .expect("cp");
    assert!(copied.success());
    std::fs::copy(
        repo().join("tests/integration/common/stub-nixpkgs-flake.nix"),
        stub.join("flake.nix"),
    )
    .unwrap();
    let eval = |attr: &str, apply: &str| -> Value {
        let out = run(
            std::process::Command::new("nix")
                .args(["--extra-experimental-features", "nix-command flakes"])
                .args([
                    "eval",
                    "--json",
                    "--no-write-lock-file",
                    "--override-input",
                    "nixpkgs",
                ])
                .arg(format!("path:{}", stub.display()))
                .arg(format!("{}#{attr}", repo().display()))
                .args(["--apply", apply]),
            NIX_HINT,
        );
        assert!(
            out.status.success(),
            "nix eval .#{attr}: {}",
            output_text(&out)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let names = "builtins.attrNames";
    for system in ["x86_64-linux", "aarch64-linux"] {
        let packages = eval(
            &format!("packages.{system}"),
            "ps: builtins.mapAttrs (_: p: p.name) ps",
        );
        assert_eq!(
            packages,
            serde_json::json!({ "default": "hail-0.1.0", "hail": "hail-0.1.0" })
        );
        let program = eval(&format!("apps.{system}.default.program"), "p: p");
        assert!(
            program.as_str().is_some_and(|p| p.ends_with("/bin/hail")),
            "{program}"
        );
        let checks = eval(&format!("checks.{system}"), names);
        assert_eq!(
            checks,
            serde_json::json!(["hail", "module-eval", "module-units", "vm", "vm-system"])
        );
        // The VM tests as far as the stub goes: each file imported, its test named.
        for (check, name) in [("vm", "hail"), ("vm-system", "hail-system")] {
            assert_eq!(
                eval(&format!("checks.{system}.{check}.name"), "n: n"),
                format!("vm-test-run-{name}")
            );
        }
        assert_eq!(
            eval(&format!("checks.{system}.module-eval.failed"), "f: f"),
            ""
        );
    }
    assert_eq!(
        eval("nixosModules", names),
        serde_json::json!(["default", "hail"])
    );
    assert_eq!(eval("overlays.default", "builtins.isFunction"), true);
    assert_eq!(
        eval("lib", names),
        serde_json::json!(["mkBlueGreenProfile", "mkManagerProfile", "mkServiceProfile"])
    );
    // Every integration-test area (a `mod` in tests/integration/main.rs) needs a
    // host, so the sandboxed package check must skip it by name.
    let skips = eval("packages.x86_64-linux.hail.passthru.checkFlags", "f: f");
    let main = std::fs::read_to_string(repo().join("tests/integration/main.rs")).unwrap();
    for area in main
        .lines()
        .filter_map(|l| l.strip_prefix("mod ")?.strip_suffix(';'))
        .filter(|area| *area != "common")
    {
        let flag = format!("--skip={area}::");
        assert!(
            skips.as_array().unwrap().iter().any(|s| s == flag.as_str()),
            "flake.nix checkFlags lacks {flag}: {skips}"
        );
    }
}
