//! hail under a real systemd (PID 1 in a container, `common::container`):
//! the units from `systemd/` installed the way README says, hail deploying
//! from the Hydra stand-in on the host's loopback, and everything checked the
//! way an operator would see it: `systemctl`, `journalctl`, the profile
//! symlink, `nix-env --list-generations`, and what `activate` wrote. Whole
//! NixOS hosts too: NixOS-like systems switched in their transient unit, and
//! a new kernel rebooted into through the container's systemd.

use std::time::{Duration, Instant};

use crate::common::container::Container;
use crate::common::hydra::Fault;
use crate::common::{JOB, World, assert_exit};

const INSTANCE: &str = "demo";
const PROFILE: &str = "/nix/var/nix/profiles/demo";
const PASS: &str = "hail@demo.service";
const TIMER: &str = "hail@demo.timer";
const BOOT: &str = "hail-activate@demo.service";
/// One line per finished activation, written by the test profiles' activate.
const ACTIVATIONS: &str = "/var/lib/hail-test/activations";
/// One line per started activation (the slow profiles only).
const STARTED: &str = "/var/lib/hail-test/started";

/// An activate that records one line per run, inside the container.
fn quick_activate(label: &str) -> String {
    format!(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/hail-test\n\
         echo \"label={label} build=${{HAIL_BUILD_ID:-}} store=$HAIL_STORE_PATH\" >> {ACTIVATIONS}\n"
    )
}

/// An activate that takes 3 s, recording its start and its end with its pid.
fn slow_activate(label: &str) -> String {
    format!(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/hail-test\n\
         echo \"start $$ label={label}\" >> {STARTED}\n\
         sleep 3\n\
         echo \"done $$ label={label}\" >> {ACTIVATIONS}\n"
    )
}

/// Builds a profile with this activate, publishes it signed and makes it the
/// job's latest successful build.
fn publish(world: &World, label: &str, activate: &str) -> (u64, String) {
    let path = world.cache.build(label, activate);
    world.cache.publish(&path);
    let id = world.hydra.add_build(JOB, &path, Some(0));
    (id, path)
}

/// A container with hail installed (see [`Container::with_hail`]), the
/// instance [`INSTANCE`] following [`JOB`].
fn install(world: &World) -> Container {
    Container::with_hail(world, &[(INSTANCE, JOB)])
}

/// Boots, checks that hail runs in there, enables the instance.
fn boot_and_enable(container: &mut Container) {
    container.boot();
    let version = container.exec(&["/usr/local/bin/hail", "--version"]);
    assert_exit(&version, 0);
    let enable = container.systemctl(&["enable", "--now", TIMER, BOOT]);
    assert_exit(&enable, 0);
}

/// Where the profile points, as `readlink -f` in the container says.
fn profile_target(container: &Container) -> String {
    target_of(container, PROFILE)
}

/// Where the link `path` points, as `readlink -f` in the container says.
fn target_of(container: &Container, path: &str) -> String {
    container.exec(&["readlink", "-f", path]).out()
}

/// The profile's generation numbers, from `nix-env --list-generations`.
fn generations(container: &Container) -> Vec<u64> {
    generations_of(container, PROFILE)
}

/// The generation numbers of the profile at `profile`.
fn generations_of(container: &Container, profile: &str) -> Vec<u64> {
    let run = container.exec(&["nix-env", "-p", profile, "--list-generations"]);
    assert_exit(&run, 0);
    run.stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Waits (up to `limit`) for `check` to hold; panics with `what` otherwise.
#[track_caller]
fn wait_for(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "waited {limit:?} for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The unit's journal, once it says `needle` (journald may lag a little).
#[track_caller]
fn journal_with(container: &Container, unit: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let journal = container.journal(unit);
        if journal.contains(needle) {
            return journal;
        }
        assert!(
            Instant::now() < deadline,
            "journalctl -u {unit} does not say {needle:?}:\n{journal}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn timer_pass_failure_and_activation_at_boot() {
    let started = Instant::now();
    let world = World::new();
    let mut container = install(&world);
    boot_and_enable(&mut container);
    let c = &container;

    // 1. The timer is active and has the next pass scheduled.
    assert_eq!(c.is_active(TIMER), "active");
    assert_eq!(c.systemctl(&["is-enabled", TIMER]).out(), "enabled");
    let next = c.show(TIMER, "NextElapseUSecMonotonic");
    assert!(
        !next.is_empty() && next != "infinity" && next != "0",
        "no next run scheduled: NextElapseUSecMonotonic={next:?}"
    );
    let timers = c.systemctl(&["list-timers", "--all", TIMER]);
    assert!(timers.stdout.contains(PASS), "{timers:?}");
    // Boot activation without a profile yet: succeeds, activates nothing.
    wait_for(
        Duration::from_secs(30),
        "the boot activation to finish",
        || c.is_active(BOOT) != "activating",
    );
    assert_eq!(c.is_active(BOOT), "active");
    journal_with(c, BOOT, "does not exist yet");
    assert!(
        c.read(ACTIVATIONS).is_none(),
        "activate ran without a profile"
    );

    // 2. A pass deploys the job's latest build and activates it.
    let (id, path) = publish(&world, "a", &quick_activate("a"));
    let pass = c.systemctl(&["start", PASS]);
    assert_exit(&pass, 0);
    assert_eq!(profile_target(c), path);
    assert_eq!(generations(c), [1]);
    assert_eq!(
        c.lines(ACTIVATIONS),
        [format!("label=a build={id} store={path}")]
    );
    assert_eq!(c.show(PASS, "Result"), "success");
    journal_with(c, PASS, &format!("deployed build {id}"));
    // Every record names the profile: `journalctl HAIL_PROFILE=demo` finds them.
    let by_profile = c.exec(&["journalctl", "--no-pager", "-o", "cat", "HAIL_PROFILE=demo"]);
    assert!(
        by_profile.stdout.contains(&format!("deployed build {id}")),
        "{by_profile:?}"
    );

    // 3. Another pass changes nothing.
    let pass = c.systemctl(&["start", PASS]);
    assert_exit(&pass, 0);
    journal_with(c, PASS, &format!("up to date: build {id}"));
    assert_eq!(profile_target(c), path);
    assert_eq!(generations(c), [1]);
    assert_eq!(c.lines(ACTIVATIONS).len(), 1, "activate ran again");

    // 5. After a reboot, hail-activate@demo activated the profile again.
    container.restart();
    let c = &container;
    wait_for(
        Duration::from_secs(30),
        "the boot activation to finish",
        || !matches!(c.is_active(BOOT).as_str(), "activating" | "inactive"),
    );
    assert_eq!(c.is_active(BOOT), "active");
    assert_eq!(
        c.lines(ACTIVATIONS),
        [
            format!("label=a build={id} store={path}"),
            format!("label=a build={id} store={path}"),
        ]
    );
    // The boot activation's records name the profile, the job and the build.
    let job_field = format!("HAIL_JOB_URI={}", world.hydra.job_uri(JOB));
    let boot_records = c.exec(&[
        "journalctl",
        "--no-pager",
        "-o",
        "cat",
        "-u",
        BOOT,
        "HAIL_PROFILE=demo",
        &job_field,
        &format!("HAIL_BUILD_ID={id}"),
    ]);
    assert!(
        boot_records.stdout.contains(&format!("activated {path}")),
        "{boot_records:?}"
    );
    assert_eq!(c.is_active(TIMER), "active");
    assert_eq!(profile_target(c), path);

    // 4. A failing pass leaves the unit failed, with the reason in the journal.
    // Last, because the stand-in's faults stay for the rest of its life.
    world.hydra.fault(
        "/latest",
        Fault::Respond(502, "text/html", b"<html>502 Bad Gateway</html>".to_vec()),
    );
    let pass = c.systemctl(&["start", PASS]);
    assert_ne!(pass.code, Some(0), "{pass:?}");
    assert_eq!(c.systemctl(&["is-failed", PASS]).out(), "failed");
    assert_eq!(c.show(PASS, "Result"), "exit-code");
    journal_with(c, PASS, "unexpected answer from Hydra: 502");
    assert_eq!(profile_target(c), path);
    assert_eq!(generations(c), [1]);
    assert_eq!(c.lines(ACTIVATIONS).len(), 2, "activate ran on a failure");

    eprintln!("systemd scenario took {:.1?}", started.elapsed());
}

/// Waits for a slow activate of `label` to start; returns its pid.
fn wait_for_start(container: &Container, label: &str) -> String {
    let suffix = format!(" label={label}");
    let mut pid = None;
    wait_for(
        Duration::from_secs(30),
        &format!("activate of {label} to start"),
        || {
            pid = container.lines(STARTED).iter().find_map(|l| {
                l.strip_prefix("start ")?
                    .strip_suffix(&suffix)
                    .map(str::to_owned)
            });
            pid.is_some()
        },
    );
    pid.expect("a start line")
}

/// Waits for the activate run `pid` of `label` to finish.
fn wait_for_done(container: &Container, pid: &str, label: &str) {
    let line = format!("done {pid} label={label}");
    wait_for(
        Duration::from_secs(30),
        &format!("the activate that was running ({line:?}) to finish; it was killed?"),
        || container.lines(ACTIVATIONS).contains(&line),
    );
}

#[test]
fn stopping_or_restarting_a_pass_does_not_kill_its_activation() {
    let started = Instant::now();
    let world = World::new();
    let mut container = install(&world);
    boot_and_enable(&mut container);
    let c = &container;

    let (_, a) = publish(&world, "a", &quick_activate("a"));
    assert_exit(&c.systemctl(&["start", PASS]), 0);
    assert_eq!(profile_target(c), a);

    // `systemctl stop` while a new build is being activated.
    let (_, b) = publish(&world, "b", &slow_activate("b"));
    assert_exit(&c.systemctl(&["start", "--no-block", PASS]), 0);
    let pid = wait_for_start(c, "b");
    let stop = c.systemctl(&["stop", PASS]);
    assert_exit(&stop, 0);
    let state = c.is_active(PASS);
    assert!(state == "inactive", "{PASS} is {state} after stop");
    wait_for_done(c, &pid, "b");
    assert_eq!(profile_target(c), b);
    assert_eq!(generations(c), [1, 2]);
    // The next pass finds the activation finished in its own unit and
    // records the deploy: no new generation, and activate did not run twice.
    assert_exit(&c.systemctl(&["start", PASS]), 0);
    assert_eq!(c.show(PASS, "Result"), "success");
    assert_eq!(profile_target(c), b);
    assert_eq!(generations(c), [1, 2]);
    let runs = |label: &str| {
        c.lines(STARTED)
            .iter()
            .filter(|l| l.ends_with(&format!(" label={label}")))
            .count()
    };
    assert_eq!(
        runs("b"),
        1,
        "activate of b ran again\n{:?}\n{}\n{}",
        c.exec(&["ls", "-la", "/var/lib/hail"]),
        c.journal("hail-activation-demo.service"),
        c.journal(PASS)
    );
    journal_with(c, PASS, "succeeded in its own unit");
    let state: serde_json::Value =
        serde_json::from_str(&c.read("/var/lib/hail/demo.json").expect("state file"))
            .expect("state JSON");
    assert_eq!(state["deployed"]["store_path"], b.as_str());
    assert_eq!(state["deployed"]["activation"], "done");
    assert_eq!(state["deployed"]["generation"], 2);
    assert_eq!(state["last_check"]["result"], "deployed");

    // `systemctl restart` while a new build is being activated.
    let (_, new) = publish(&world, "c", &slow_activate("c"));
    assert_exit(&c.systemctl(&["start", "--no-block", PASS]), 0);
    let pid = wait_for_start(c, "c");
    let restart = c.systemctl(&["restart", PASS]);
    wait_for_done(c, &pid, "c");
    assert_eq!(
        profile_target(c),
        new,
        "the profile is not at the build whose activation ran; restart: {restart:?}"
    );
    assert_eq!(generations(c), [1, 2, 3]);
    assert_exit(&restart, 0);
    assert_eq!(c.show(PASS, "Result"), "success");
    assert_ne!(c.systemctl(&["is-failed", PASS]).out(), "failed");
    // The restarted pass waited for that activation and took its result.
    assert_eq!(runs("c"), 1, "activate of c ran again after the restart");

    eprintln!("safe-deploy scenario took {:.1?}", started.elapsed());
}

#[test]
fn systemctl_status_shows_what_a_pass_is_doing() {
    let world = World::new();
    let mut container = install(&world);
    boot_and_enable(&mut container);
    let c = &container;

    let (id, path) = publish(&world, "a", &slow_activate("a"));
    assert_exit(&c.systemctl(&["start", "--no-block", PASS]), 0);
    let pid = wait_for_start(c, "a");
    let status = c.systemctl(&["status", PASS]);
    assert!(
        status.stdout.contains(&format!("activating build {id}")),
        "`systemctl status {PASS}` does not show the step (STATUS=) while activate runs; \
         StatusText={:?}\n{status:?}",
        c.show(PASS, "StatusText")
    );
    wait_for_done(c, &pid, "a");
    wait_for(Duration::from_secs(30), "the pass to end", || {
        c.is_active(PASS) != "activating"
    });
    assert_eq!(c.show(PASS, "Result"), "success");
    assert_eq!(profile_target(c), path);
}

#[test]
fn instance_names_are_profile_names_as_typed() {
    let world = World::new();
    let (id, path) = publish(&world, "a", &quick_activate("a"));
    let mut container = install(&world);
    let job = world.hydra.job_uri(JOB);
    container.write(
        "/etc/hail/my-web.env",
        format!("HAIL_JOB_URI={job}\n"),
        0o644,
    );
    // A profile a unit name cannot carry: any instance name, HAIL_PROFILE in its env file.
    container.write(
        "/etc/hail/nested.env",
        format!("HAIL_JOB_URI={job}\nHAIL_PROFILE=hail-profiles/web\n"),
        0o644,
    );
    container.boot();
    let c = &container;

    assert_exit(&c.systemctl(&["start", "hail@my-web.service"]), 0);
    assert_eq!(
        c.exec(&["readlink", "-f", "/nix/var/nix/profiles/my-web"])
            .out(),
        path
    );
    assert_exit(&c.exec(&["test", "!", "-e", "/nix/var/nix/profiles/my"]), 0);
    assert_exit(&c.systemctl(&["start", "hail-activate@my-web.service"]), 0);
    assert_eq!(
        c.lines(ACTIVATIONS),
        [
            format!("label=a build={id} store={path}"),
            format!("label=a build={id} store={path}"),
        ]
    );

    assert_exit(&c.systemctl(&["start", "hail@nested.service"]), 0);
    assert_eq!(
        c.exec(&["readlink", "-f", "/nix/var/nix/profiles/hail-profiles/web"])
            .out(),
        path
    );

    // An instance nobody configured: the boot unit fails as loudly as the pass.
    for unit in ["hail@nobody.service", "hail-activate@nobody.service"] {
        assert_ne!(c.systemctl(&["start", unit]).code, Some(0), "{unit}");
        assert_eq!(c.is_active(unit), "failed", "{unit}");
    }
}

#[test]
fn a_failed_activation_quotes_the_scripts_own_stderr() {
    let world = World::new();
    let mut container = install(&world);
    boot_and_enable(&mut container);
    let c = &container;
    let (_, a) = publish(&world, "a", &quick_activate("a"));
    assert_exit(&c.systemctl(&["start", PASS]), 0);
    let (id, _) = publish(
        &world,
        "b",
        "#!/bin/sh\necho 'first words' >&2\necho 'the port is taken' >&2\nexit 1\n",
    );
    assert_ne!(c.systemctl(&["start", PASS]).code, Some(0));
    assert_eq!(profile_target(c), a);
    let state: serde_json::Value =
        serde_json::from_str(&c.read("/var/lib/hail/demo.json").expect("state file"))
            .expect("state JSON");
    let error = state["last_error"]["message"].as_str().unwrap_or_default();
    assert!(
        error.contains(&format!("build {id}")) && error.contains("the port is taken"),
        "{error}"
    );
    let quoted = error
        .split_once("last lines of its stderr:")
        .map(|(_, lines)| lines)
        .unwrap_or_default();
    assert_eq!(
        quoted
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>(),
        ["first words", "the port is taken"],
        "{error}"
    );
}

/// An activate that takes 3 s, then records what confines it (its
/// `NoNewPrivs` and `Seccomp_filters` lines, its mount and UTS namespaces) and
/// leaves a file in /tmp.
fn probing_activate(label: &str) -> String {
    format!(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/hail-test\n\
         echo \"start $$ label={label}\" >> {STARTED}\n\
         sleep 3\n\
         {{ grep -E '^(NoNewPrivs|Seccomp_filters):' /proc/self/status; \
         readlink /proc/self/ns/mnt /proc/self/ns/uts; }} > /var/lib/hail-test/confinement\n\
         touch /tmp/hail-test-{label}\n\
         echo \"done $$ label={label}\" >> {ACTIVATIONS}\n"
    )
}

/// What confines process `pid` of the container, as [`probing_activate`]
/// records it.
fn confinement(c: &Container, pid: &str) -> Vec<String> {
    let run = c.sh(&format!(
        "grep -E '^(NoNewPrivs|Seccomp_filters):' /proc/{pid}/status; \
         readlink /proc/{pid}/ns/mnt /proc/{pid}/ns/uts"
    ));
    assert_exit(&run, 0);
    let lines: Vec<String> = run.stdout.lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), 4, "{run:?}");
    lines
}

/// How many seccomp filters a [`confinement`] shows.
fn seccomp_filters(confinement: &[String]) -> u32 {
    confinement[1]
        .strip_prefix("Seccomp_filters:\t")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no filter count: {confinement:?}"))
}

#[test]
fn sandboxed_pass_deploys_to_a_read_only_store_activates_unconfined_and_rolls_back() {
    let world = World::new();
    let mut container = install(&world);
    // The store read-only, as NixOS mounts it: nix-env has to make it writable
    // in a mount namespace of its own, inside hail@'s sandbox.
    container.write(
        "/etc/fstab",
        "/nix/store /nix/store none bind,ro 0 0\n",
        0o644,
    );
    // Hydra and the cache by name, which hail and nix-env resolve with
    // RestrictAddressFamilies= in force.
    let origin = world.hydra.origin();
    let by_name = origin.replace("127.0.0.1", "hydra.hail.test");
    assert_ne!(by_name, origin);
    container.write("/etc/hosts", "127.0.0.1 localhost hydra.hail.test\n", 0o644);
    container.write(
        &format!("/etc/hail/{INSTANCE}.env"),
        // A secret, as an environment file holds access tokens.
        format!(
            "HAIL_JOB_URI={}\nSECRET_PROBE=hunter2\n",
            world.hydra.job_uri(JOB).replace(&origin, &by_name)
        ),
        0o644,
    );
    container.write(
        "/etc/nix/nix.conf",
        world.cache.client_nix_config(&by_name),
        0o644,
    );
    boot_and_enable(&mut container);
    let c = &container;
    let touch = c.exec(&["touch", "/nix/store/hail-test-probe"]);
    assert_ne!(touch.code, Some(0), "the store is writable: {touch:?}");
    // PID 1 (nspawn gives it a seccomp filter of its own).
    let pid1 = confinement(c, "1");
    assert_eq!(pid1[0], "NoNewPrivs:\t0");

    // A pass deploys a build; while its activation runs, the pass is
    // sandboxed (no new privileges, more seccomp filters, its own mount and
    // UTS namespaces) and the activation is not.
    let (id, a) = publish(&world, "a", &probing_activate("a"));
    assert_exit(&c.systemctl(&["start", "--no-block", PASS]), 0);
    let pid = wait_for_start(c, "a");
    let pass = confinement(c, &c.show(PASS, "MainPID"));
    assert_eq!(pass[0], "NoNewPrivs:\t1", "{pass:?}");
    assert!(
        seccomp_filters(&pass) > seccomp_filters(&pid1),
        "no seccomp filter of hail@'s own: {pass:?}, PID 1: {pid1:?}"
    );
    assert_ne!(pass[2], pid1[2], "hail@ shares PID 1's mount namespace");
    assert_ne!(pass[3], pid1[3], "hail@ shares PID 1's hostname");
    // Anyone can read a unit's environment: the activation's holds no secret.
    let environment = c.show("hail-activation-demo.service", "Environment");
    assert!(environment.contains("PATH="), "{environment}");
    assert!(!environment.contains("hunter2"), "{environment}");
    wait_for_done(c, &pid, "a");
    wait_for(Duration::from_secs(30), "the pass to end", || {
        c.is_active(PASS) != "activating"
    });
    assert_eq!(c.show(PASS, "Result"), "success", "{}", c.journal(PASS));
    assert_eq!(profile_target(c), a);
    assert_eq!(generations(c), [1]);
    journal_with(c, PASS, &format!("deployed build {id}"));
    assert_eq!(
        c.lines("/var/lib/hail-test/confinement"),
        pid1,
        "the activation ran confined"
    );
    // Its /tmp is the system's, not the pass's private one.
    assert_exit(&c.exec(&["test", "-e", "/tmp/hail-test-a"]), 0);

    // The boot-time activation, sandboxed the same way, activates unconfined.
    assert_exit(&c.exec(&["rm", "/var/lib/hail-test/confinement"]), 0);
    assert_exit(&c.systemctl(&["restart", BOOT]), 0);
    assert_eq!(c.lines("/var/lib/hail-test/confinement"), pid1);

    // A build whose activation fails is rolled back, from inside the sandbox.
    let (id, _) = publish(
        &world,
        "b",
        "#!/bin/sh\necho 'b does not start' >&2\nexit 1\n",
    );
    let run = c.systemctl(&["start", PASS]);
    assert_ne!(run.code, Some(0), "{run:?}");
    assert_eq!(c.show(PASS, "ExecMainStatus"), "3", "{}", c.journal(PASS));
    let journal = journal_with(c, PASS, "rolled back to generation 1");
    assert!(
        journal.contains(&format!("activation of build {id} ("))
            && journal.contains("exited with status 1; rolling back"),
        "{journal}"
    );
    assert_eq!(profile_target(c), a);
    assert_eq!(generations(c), [1]);
}

// Whole NixOS hosts: NixOS-like systems (see `systems::`) deployed to the
// profile `system` by `hail@system.service`, switched in
// `hail-activation-system.service`, and rebooted into through systemd.

const SYSTEM_PROFILE: &str = "/nix/var/nix/profiles/system";
const SYSTEM_PASS: &str = "hail@system.service";
const SYSTEM_BOOT: &str = "hail-activate@system.service";
const SWITCH_UNIT: &str = "hail-activation-system.service";
/// One line per switch-to-configuration run: `switch label=… op=… build=…`.
const SWITCHES: &str = "/var/lib/hail-test/switches";
/// The system the last switch-to-configuration made the boot default.
const BOOT_DEFAULT: &str = "/var/lib/hail-test/boot-default";
/// Created by the test to let a [`gated`] switch finish.
const RELEASE: &str = "/var/lib/hail-test/release";

/// A NixOS-like system (`common/system.nix`).
const SYSTEM_NIX: &str = include_str!("common/system.nix");

/// A switch-to-configuration that records its run in [`SWITCHES`], makes its
/// system the boot default ([`BOOT_DEFAULT`], as the real one installs a
/// boot entry), then runs `extra`.
fn switch_script(label: &str, extra: &str) -> String {
    format!(
        "#!/bin/sh\nset -e\nmkdir -p /var/lib/hail-test\n\
         echo \"switch label={label} op=$1 build=$HAIL_BUILD_ID\" >> {SWITCHES}\n\
         ln -sfn \"$(dirname \"$(dirname \"$0\")\")\" {BOOT_DEFAULT}\n\
         {extra}\n"
    )
}

/// The part of a switch that records its start with its pid, waits until the
/// test creates [`RELEASE`] (a minute at most), then records its end: as
/// [`slow_activate`], without a guess at how long the test needs.
fn gated(label: &str) -> String {
    format!(
        "echo \"start $$ label={label}\" >> {STARTED}\n\
         i=0; while [ ! -e {RELEASE} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n\
         echo \"done $$ label={label}\" >> {ACTIVATIONS}"
    )
}

/// Builds a system with this switch and `kernel`'s boot files, publishes it
/// signed and makes it the job's latest successful build.
fn publish_system(world: &World, label: &str, kernel: &str, switch: &str) -> (u64, String) {
    let expr = world.path("system.nix");
    std::fs::write(&expr, SYSTEM_NIX).expect("write system.nix");
    let script = world.path(&format!("switch-{label}.sh"));
    std::fs::write(&script, switch).expect("write the switch script");
    let outputs = world.cache.build_expr(&format!(
        "import {} {{ label = \"{label}\"; kernel = \"{kernel}\"; switch = {}; }}",
        expr.display(),
        script.display()
    ));
    let path = outputs.last().expect("nix-build prints the path").clone();
    world.cache.publish(&path);
    let id = world.hydra.add_build(JOB, &path, Some(0));
    (id, path)
}

/// The instance `system`'s env file: the job, the profile `system`, and `extra` lines.
fn write_system_env(container: &Container, world: &World, extra: &str) {
    container.write(
        "/etc/hail/system.env",
        format!(
            "HAIL_JOB_URI={}\nHAIL_PROFILE=system\n{extra}",
            world.hydra.job_uri(JOB)
        ),
        0o644,
    );
}

/// The state file of the profile `system`.
fn system_state(container: &Container) -> serde_json::Value {
    serde_json::from_str(
        &container
            .read("/var/lib/hail/system.json")
            .expect("state file"),
    )
    .expect("state JSON")
}

/// `hail status` in the container.
fn hail_status(container: &Container) -> String {
    let run = container.exec(&["/usr/local/bin/hail", "status"]);
    assert_exit(&run, 0);
    run.stdout
}

#[test]
fn a_system_switch_runs_detached_and_survives_a_restart_of_hails_unit() {
    let started = Instant::now();
    let world = World::new();
    let mut container = install(&world);
    write_system_env(&container, &world, "");
    container.boot();
    let c = &container;

    let (id_a, a) = publish_system(&world, "a", "k1", &switch_script("a", ""));
    assert_exit(&c.systemctl(&["start", SYSTEM_PASS]), 0);
    assert_eq!(target_of(c, SYSTEM_PROFILE), a);
    assert_eq!(
        c.lines(SWITCHES),
        [format!("switch label=a op=switch build={id_a}")]
    );

    // A pass switches to b; the switch is the main process of the transient
    // unit, not of hail@system.
    let (id_b, b) = publish_system(&world, "b", "k1", &switch_script("b", &gated("b")));
    assert_exit(&c.systemctl(&["start", "--no-block", SYSTEM_PASS]), 0);
    let pid = wait_for_start(c, "b");
    assert_eq!(
        c.show(SWITCH_UNIT, "MainPID"),
        pid,
        "the switch does not run as {SWITCH_UNIT}\n{:?}",
        c.exec(&["cat", &format!("/proc/{pid}/cgroup")])
    );
    let first_pass = c.show(SYSTEM_PASS, "MainPID");
    assert_ne!(first_pass, "0", "{SYSTEM_PASS} is not running");

    // Restarted mid-switch: the new pass finds the switch still running and
    // waits for it, instead of running it again.
    assert_exit(&c.systemctl(&["restart", "--no-block", SYSTEM_PASS]), 0);
    journal_with(
        c,
        SYSTEM_PASS,
        &format!("an earlier activation is still running in {SWITCH_UNIT}"),
    );
    assert_ne!(c.show(SYSTEM_PASS, "MainPID"), first_pass, "not restarted");
    // The switch lived through the restart.
    assert_exit(&c.exec(&["kill", "-0", &pid]), 0);
    c.write(RELEASE, "", 0o644);
    wait_for_done(c, &pid, "b");
    wait_for(Duration::from_secs(30), "the restarted pass to end", || {
        c.is_active(SYSTEM_PASS) != "activating"
    });
    assert_eq!(
        c.show(SYSTEM_PASS, "Result"),
        "success",
        "{}",
        c.journal(SYSTEM_PASS)
    );
    journal_with(c, SYSTEM_PASS, "succeeded in its own unit");
    assert_eq!(
        c.lines(SWITCHES),
        [
            format!("switch label=a op=switch build={id_a}"),
            format!("switch label=b op=switch build={id_b}"),
        ],
        "the switch to b did not run exactly once"
    );
    assert_eq!(c.lines(STARTED).len(), 1);
    assert_eq!(target_of(c, SYSTEM_PROFILE), b);
    assert_eq!(generations_of(c, SYSTEM_PROFILE), [1, 2]);
    let state = system_state(c);
    assert_eq!(state["deployed"]["store_path"], b.as_str());
    assert_eq!(state["deployed"]["build_id"], id_b);
    assert_eq!(state["deployed"]["activation"], "done");
    assert_eq!(state["last_check"]["result"], "deployed");

    // The pass after: up to date, nothing switched.
    assert_exit(&c.systemctl(&["start", SYSTEM_PASS]), 0);
    journal_with(c, SYSTEM_PASS, &format!("up to date: build {id_b}"));
    assert_eq!(c.lines(SWITCHES).len(), 2);

    // At boot NixOS activates the system itself: hail-activate@system does nothing.
    assert_exit(&c.systemctl(&["start", SYSTEM_BOOT]), 0);
    journal_with(c, SYSTEM_BOOT, "which NixOS activates itself at boot");
    assert_eq!(c.lines(SWITCHES).len(), 2, "hail-activate@system switched");

    // Again, but system c cuts the host off from Hydra, and the pass is
    // restarted mid-switch: the restarted pass, which finds the switch done
    // in its own unit, checks that Hydra still answers before it asks Hydra
    // anything else, and rolls back to b.
    write_system_env(c, &world, "HAIL_CONFIRM_TIMEOUT=3\n");
    assert_exit(&c.exec(&["rm", "-f", RELEASE]), 0);
    let (id_c, c_path) = publish_system(&world, "c", "k1", &switch_script("c", &gated("c")));
    assert_exit(&c.systemctl(&["start", "--no-block", SYSTEM_PASS]), 0);
    let pid = wait_for_start(c, "c");
    assert_exit(&c.systemctl(&["restart", "--no-block", SYSTEM_PASS]), 0);
    let waiting = format!("an earlier activation is still running in {SWITCH_UNIT}");
    wait_for(
        Duration::from_secs(30),
        "the restarted pass to wait",
        || c.journal(SYSTEM_PASS).matches(&waiting).count() >= 2,
    );
    world.hydra.fault("/latest", Fault::Close);
    c.write(RELEASE, "", 0o644);
    wait_for_done(c, &pid, "c");
    wait_for(Duration::from_secs(60), "the restarted pass to end", || {
        c.is_active(SYSTEM_PASS) != "activating"
    });
    assert_eq!(c.show(SYSTEM_PASS, "Result"), "exit-code");
    let journal = journal_with(c, SYSTEM_PASS, "could not reach Hydra for 3 s");
    assert!(
        journal.contains(&format!("build {id_c} ({c_path}) failed to activate"))
            && journal.contains("rolled back to generation 2"),
        "{journal}"
    );
    assert_eq!(target_of(c, SYSTEM_PROFILE), b);
    assert_eq!(generations_of(c, SYSTEM_PROFILE), [1, 2]);
    assert_eq!(
        c.lines(SWITCHES)[2..],
        [
            format!("switch label=c op=switch build={id_c}"),
            format!("switch label=b op=switch build={id_b}"),
        ],
        "c switched once, then b again"
    );
    world.hydra.clear_faults();

    eprintln!("system switch scenario took {:.1?}", started.elapsed());
}

/// A unit that stands in for NixOS's boot (stage 2 links `/run/booted-system`):
/// links it to the system the last switch-to-configuration made the boot default.
fn booted_system_unit() -> String {
    format!(
        "[Unit]\n\
         Description=hail test: link the booted system, as NixOS's stage 2 does\n\
         ConditionPathExists={BOOT_DEFAULT}\n\
         [Service]\n\
         Type=oneshot\n\
         RemainAfterExit=yes\n\
         ExecStart=/bin/sh -c 'ln -sfn \"$$(readlink {BOOT_DEFAULT})\" /run/booted-system'\n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// A reboot window from `from` to `to` minutes after the container's local time.
fn window_from_now(container: &Container, from: u16, to: u16) -> String {
    let now = container.exec(&["date", "+%H:%M"]).out();
    let minute = now
        .split_once(':')
        .and_then(|(h, m)| Some(h.parse::<u16>().ok()? * 60 + m.parse::<u16>().ok()?))
        .unwrap_or_else(|| panic!("`date +%H:%M` said {now:?}"));
    let time = |offset: u16| {
        let m = (minute + offset) % (24 * 60);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    format!("{}-{}", time(from), time(to))
}

/// The boots `journalctl --list-boots` knows, oldest first, by boot ID.
fn journal_boots(container: &Container) -> Vec<String> {
    let run = container.exec(&["journalctl", "--list-boots", "--no-pager"]);
    assert_exit(&run, 0);
    // "IDX BOOT-ID FIRST-ENTRY LAST-ENTRY", under a header.
    run.stdout
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            fields.next()?.parse::<i32>().ok()?;
            fields.next().map(str::to_owned)
        })
        .collect()
}

#[test]
fn a_new_kernel_reboots_through_systemd() {
    let started = Instant::now();
    let world = World::new();
    let mut container = install(&world);
    write_system_env(&container, &world, "HAIL_ALLOW_REBOOT=true\n");
    container.write(
        "/etc/systemd/system/hail-test-booted-system.service",
        booted_system_unit(),
        0o644,
    );
    container.boot();
    assert_exit(
        &container.systemctl(&["enable", "hail-test-booted-system.service"]),
        0,
    );

    // The host runs system a (kernel k1): deployed, then booted into.
    let (id_a, a) = publish_system(&world, "a", "k1", &switch_script("a", ""));
    assert_exit(&container.systemctl(&["start", SYSTEM_PASS]), 0);
    container.restart();
    let c = &container;
    assert_eq!(target_of(c, "/run/booted-system"), a);

    // System b has another kernel: a pass makes it the boot default and
    // asks systemd to reboot; the container reboots.
    let (id_b, b) = publish_system(&world, "b", "k2", &switch_script("b", ""));
    let before = c.boot_id();
    assert_exit(&c.systemctl(&["start", "--no-block", SYSTEM_PASS]), 0);
    container.wait_for_reboot(Duration::from_secs(30));
    let c = &container;
    let after = c.boot_id();
    assert_ne!(after, before);
    // The journal's last boot before this one is the boot hail asked from,
    // and systemd carried out a reboot then, as hail asked.
    let boots = journal_boots(c);
    assert_eq!(
        boots[boots.len() - 2..],
        [before.replace('-', ""), after.replace('-', "")]
    );
    let previous_boot = |args: &[&str]| {
        let mut all = vec!["journalctl", "--no-pager", "-o", "cat", "-b", "-1"];
        all.extend_from_slice(args);
        c.exec(&all).stdout
    };
    let hail_said = previous_boot(&["-u", SYSTEM_PASS]);
    assert!(
        hail_said.contains(&format!("rebooting into {b}")),
        "{hail_said}"
    );
    let systemd_said = previous_boot(&["_PID=1"]);
    assert!(
        systemd_said.contains("Reached target reboot.target"),
        "{systemd_said}"
    );
    // Recorded before it asked. (Not the boot ID it saw: under
    // ProtectKernelTunables= in nspawn, hail@ reads the host kernel's, not the
    // container's; systemd issue 28059.)
    assert!(system_state(c)["reboot"]["requested"]["at"].is_u64());
    assert_eq!(
        c.lines(SWITCHES),
        [
            format!("switch label=a op=switch build={id_a}"),
            format!("switch label=b op=boot build={id_b}"),
        ]
    );
    assert_eq!(target_of(c, SYSTEM_PROFILE), b);
    assert_eq!(generations_of(c, SYSTEM_PROFILE), [1, 2]);

    // Booted into b: the next pass finds nothing pending.
    assert_eq!(target_of(c, "/run/booted-system"), b);
    assert_exit(&c.systemctl(&["start", SYSTEM_PASS]), 0);
    journal_with(
        c,
        SYSTEM_PASS,
        &format!("the host runs the kernel of {b} now: no reboot needed"),
    );
    assert_eq!(system_state(c)["reboot"], serde_json::Value::Null);
    let status = hail_status(c);
    assert!(!status.contains("reboot"), "{status}");

    // Outside the reboot window, system c (kernel k3) only becomes the boot
    // default: the reboot waits, and `hail status` says so.
    let window = window_from_now(c, 60, 120);
    write_system_env(
        c,
        &world,
        &format!("HAIL_ALLOW_REBOOT=true\nHAIL_REBOOT_WINDOW={window}\n"),
    );
    let (id_c, c_path) = publish_system(&world, "c", "k3", &switch_script("c", ""));
    assert_exit(&c.systemctl(&["start", SYSTEM_PASS]), 0);
    assert_eq!(target_of(c, SYSTEM_PROFILE), c_path);
    assert_eq!(
        c.lines(SWITCHES).last(),
        Some(&format!("switch label=c op=boot build={id_c}"))
    );
    let state = system_state(c);
    assert_eq!(state["reboot"]["store_path"], c_path.as_str());
    assert_eq!(state["reboot"]["requested"], serde_json::Value::Null);
    let status = hail_status(c);
    assert!(
        status.contains("reboot pending since")
            && status.contains(&format!("hail reboots the host inside {window}")),
        "{status}"
    );
    let journal = c.journal(SYSTEM_PASS);
    assert!(
        !journal.contains(&format!("rebooting into {c_path}")),
        "{journal}"
    );
    let running = c.systemctl(&["is-system-running"]).out();
    assert!(
        matches!(running.as_str(), "running" | "degraded"),
        "the container is {running}"
    );
    assert_eq!(c.boot_id(), after);

    // The boot loader keeps b (as if the operator picked it in the boot
    // menu): the reboot for system d (kernel k4) boots b again. hail reboots
    // once for d and not again, though hail@ sees the host kernel's boot id,
    // which a reboot of the container keeps: the mark in /run/hail tells.
    write_system_env(c, &world, "HAIL_ALLOW_REBOOT=true\n");
    let keep_b = format!("ln -sfn {b} {BOOT_DEFAULT}");
    let (_, d) = publish_system(&world, "d", "k4", &switch_script("d", &keep_b));
    assert_exit(&c.systemctl(&["start", "--no-block", SYSTEM_PASS]), 0);
    container.wait_for_reboot(Duration::from_secs(30));
    let c = &container;
    let booted_b = c.boot_id();
    assert_eq!(target_of(c, "/run/booted-system"), b);
    assert_exit(&c.systemctl(&["start", SYSTEM_PASS]), 0);
    journal_with(
        c,
        SYSTEM_PASS,
        &format!("hail rebooted the host for {d} at "),
    );
    let state = system_state(c);
    assert_eq!(state["reboot"]["store_path"], d.as_str());
    assert!(state["reboot"]["booted_another"].is_u64(), "{state}");
    let status = hail_status(c);
    assert!(
        status.contains("reboot required since")
            && status.contains("but it booted another system; reboot into it yourself"),
        "{status}"
    );
    assert_exit(&c.systemctl(&["start", SYSTEM_PASS]), 0);
    let running = c.systemctl(&["is-system-running"]).out();
    assert!(
        matches!(running.as_str(), "running" | "degraded"),
        "the container is {running}, not left alone"
    );
    assert_eq!(c.boot_id(), booted_b);

    eprintln!("reboot scenario took {:.1?}", started.elapsed());
}
