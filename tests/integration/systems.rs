//! Whole NixOS hosts. The systems are NixOS-like, built by real Nix for each
//! test: a `nixos-version`, a `bin/switch-to-configuration` that records its
//! arguments (and can fail), and `kernel`, `initrd` and `kernel-modules`
//! links to store paths of their own; published signed to the stand-in's
//! cache and deployed by real passes to the profile `system`, with real
//! generations. A fake `systemctl` first on PATH records a reboot.

use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::hydra::Fault;
use crate::common::{
    JOB, Run, World, assert_exit, assert_up_to_date, read_existing, read_if_exists,
    recording_activate,
};
use crate::observe::parse_prometheus;

const SYSTEM: &str = "system";

/// A NixOS-like system (`common/system.nix`).
const SYSTEM_NIX: &str = include_str!("common/system.nix");

/// Builds a system in the world's chroot store: its switch script records
/// `switch system=LABEL op=OPERATION build=… previous=… profile=… cwd=…`,
/// then runs `extra`. Returns its store path.
fn build_system(world: &World, label: &str, kernel: &str, extra: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let expr = world.path("system.nix");
    std::fs::write(&expr, SYSTEM_NIX).expect("write system.nix");
    let switch = world.path(&format!("switch-{label}-{n}.sh"));
    std::fs::write(
        &switch,
        format!(
            "#!/bin/sh\n\
             echo \"switch system={label} op=$1 build=$HAIL_BUILD_ID previous=$HAIL_PREVIOUS_STORE_PATH profile=$HAIL_PROFILE cwd=$(pwd)\" >> \"$HAIL_TEST_RECORD\"\n\
             {extra}\n"
        ),
    )
    .expect("write the switch script");
    let nonce = format!(
        "{}-{n}-{:?}",
        std::process::id(),
        std::time::SystemTime::now()
    );
    let outputs = world.cache.build_expr(&format!(
        "import {} {{ label = \"{label}\"; kernel = \"{kernel}\"; world = \"{}\"; \
         nonce = \"{nonce}\"; switch = {}; }}",
        expr.display(),
        world.tmp.path().display(),
        switch.display()
    ));
    outputs.last().expect("nix-build prints the path").clone()
}

/// Builds a system, publishes it signed and makes it Hydra's latest build.
fn publish_system(world: &World, label: &str, kernel: &str, extra: &str) -> (u64, String) {
    let path = build_system(world, label, kernel, extra);
    world.cache.publish(&path);
    let id = world.hydra.add_build(JOB, &path, Some(0));
    (id, path)
}

/// hail for the profile `system` of this world, with `extra` arguments.
fn hail_system(world: &World, extra: &[&str]) -> Command {
    let mut cmd = world.hail_for(SYSTEM, &world.hydra.job_uri(JOB));
    cmd.args(extra);
    cmd
}

fn system_pass(world: &World, extra: &[&str]) -> Run {
    world.run(hail_system(world, extra))
}

fn system_target(world: &World) -> Option<String> {
    world.profile_target_of(SYSTEM)
}

fn system_generations(world: &World) -> Vec<u64> {
    world.generations_of(SYSTEM)
}

/// What the switch scripts recorded, one line per run.
fn switches(world: &World) -> Vec<String> {
    world.activations()
}

/// A world with system `a` (kernel `k1`) deployed to the profile `system`.
fn deployed_a() -> (World, u64, String) {
    let world = World::new();
    let (id, a) = publish_system(&world, "a", "k1", "");
    assert_exit(&system_pass(&world, &[]), 0);
    (world, id, a)
}

#[test]
fn a_system_is_deployed_to_the_system_profile_only() {
    let world = World::new();
    let (id_a, a) = publish_system(&world, "a", "k1", "");

    // To any other profile: refused before the profile exists, nothing run.
    let run = world.pass(&[]);
    assert_exit(&run, 1);
    assert!(
        run.error().contains("is a NixOS system") && run.error().contains("use `--profile system`"),
        "{run:?}"
    );
    assert_eq!(world.profile_target(), None);
    assert!(world.generations().is_empty(), "{:?}", world.generations());
    assert!(switches(&world).is_empty(), "{:?}", switches(&world));

    // To the profile system: a new generation, and its switch ran.
    let run = system_pass(&world, &[]);
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(system_generations(&world), [1]);
    assert_eq!(
        switches(&world),
        [format!(
            "switch system=a op=switch build={id_a} previous= profile=system cwd=/"
        )]
    );

    // Something that is not a system is refused for the profile system.
    let plain = world.cache.build("plain", &recording_activate("plain", ""));
    world.cache.publish(&plain);
    world.hydra.add_build(JOB, &plain, Some(0));
    let run = system_pass(&world, &[]);
    assert_exit(&run, 1);
    assert!(run.error().contains("is not a NixOS system"), "{run:?}");
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(system_generations(&world), [1]);
    assert_eq!(switches(&world).len(), 1);
}

#[test]
fn a_system_is_switched_to_and_left_alone_at_boot() {
    let (world, _, a) = deployed_a();
    let (id_b, b) = publish_system(&world, "b", "k1", "");
    let run = system_pass(&world, &[]);
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(b.as_str()));
    assert_eq!(system_generations(&world), [1, 2]);
    assert_eq!(
        switches(&world).last().map(String::as_str),
        Some(
            format!("switch system=b op=switch build={id_b} previous={a} profile=system cwd=/")
                .as_str()
        )
    );

    // At boot NixOS activates the system itself: hail activate does nothing.
    let run = world.run(world.boot_activation_for(SYSTEM));
    assert_exit(&run, 0);
    assert!(
        run.stderr.contains("NixOS activates itself at boot"),
        "{run:?}"
    );
    assert_eq!(switches(&world).len(), 2);

    // --nixos-operation boot: only the boot default.
    let (id_c, _) = publish_system(&world, "c", "k1", "");
    assert_exit(&system_pass(&world, &["--nixos-operation", "boot"]), 0);
    assert!(
        switches(&world)
            .last()
            .is_some_and(|l| l.starts_with(&format!("switch system=c op=boot build={id_c} "))),
        "{:?}",
        switches(&world)
    );
}

#[test]
fn a_first_system_that_fails_to_switch_is_never_removed() {
    let world = World::new();
    let (_, a) = publish_system(&world, "a", "k1", "exit 4");
    let run = system_pass(&world, &[]);
    assert_exit(&run, 3);
    assert!(run.error().contains("does not remove it"), "{run:?}");
    // The boot loader's profile is still there, and the rollback stays
    // recorded for the next pass (or an operator).
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(system_generations(&world), [1]);
    assert!(
        world.state_of(SYSTEM)["rolling_back"].is_object(),
        "{run:?}"
    );
}

#[test]
fn a_failed_switch_rolls_back_to_the_previous_system() {
    let (world, _, a) = deployed_a();
    let (id_b, b) = publish_system(
        &world,
        "b",
        "k1",
        "echo 'warning: the following units failed: web.service' >&2; exit 4",
    );
    let run = system_pass(&world, &[]);
    assert_exit(&run, 3);
    let error = run.error();
    assert!(
        error.contains(&format!(
            "build {id_b} ({b}) failed to activate: switch-to-configuration switch exited with status 4"
        )),
        "{run:?}"
    );
    assert!(error.contains("rolled back to generation 1"), "{run:?}");
    assert!(error.contains("web.service"), "{run:?}");
    // Back at a, whose own switch ran again; b's generation is gone.
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(system_generations(&world), [1]);
    let ran = switches(&world);
    assert_eq!(ran.len(), 3, "{ran:?}");
    assert!(ran[1].starts_with("switch system=b op=switch "), "{ran:?}");
    assert!(
        ran[2].starts_with("switch system=a op=switch ")
            && ran[2].contains(&format!("previous={b} ")),
        "{ran:?}"
    );
    assert_eq!(world.state_of(SYSTEM)["failed"]["build_id"], json!(id_b));

    // The failed build is remembered: not switched to again.
    let run = system_pass(&world, &[]);
    assert_exit(&run, 3);
    assert!(run.error().contains("--retry-failed"), "{run:?}");
    assert_eq!(switches(&world).len(), 3);
    assert_eq!(system_generations(&world), [1]);
}

/// A switch script that, once it has switched, waits until the test has cut
/// the host off from Hydra (`cut-LABEL` exists), as a new system with a
/// broken network would.
fn cuts_the_host_off(world: &World, label: &str) -> String {
    format!(
        "touch {switched}; i=0; while [ ! -e {cut} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done",
        switched = world.path(&format!("switched-{label}")).display(),
        cut = world.path(&format!("cut-{label}")).display(),
    )
}

/// Runs a pass whose switch to `label` waits in [`cuts_the_host_off`]:
/// Hydra stops answering once the switch ran.
fn pass_that_loses_hydra(world: &World, label: &str, extra: &[&str]) -> Run {
    pass_after_which_hydra(world, label, Fault::Close, extra)
}

/// Like [`pass_that_loses_hydra`], with `fault` in place of the lost connection.
fn pass_after_which_hydra(world: &World, label: &str, fault: Fault, extra: &[&str]) -> Run {
    std::thread::scope(|scope| {
        let pass = scope.spawn(|| system_pass(world, extra));
        let deadline = Instant::now() + Duration::from_secs(90);
        while !world.path(&format!("switched-{label}")).exists() {
            assert!(
                !pass.is_finished() && Instant::now() < deadline,
                "the switch to {label} never ran"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        world.hydra.fault("/latest", fault);
        std::fs::write(world.path(&format!("cut-{label}")), "").expect("cut the host off");
        pass.join().expect("the pass thread")
    })
}

fn latest_requests(world: &World) -> usize {
    world
        .hydra
        .api_requests()
        .iter()
        .filter(|r| r.path.ends_with("/latest"))
        .count()
}

#[test]
fn a_host_cut_off_from_hydra_by_its_new_system_rolls_back() {
    let (world, _, a) = deployed_a();
    // That first deploy asked Hydra again after its switch.
    assert_eq!(latest_requests(&world), 2);
    let (id_b, b) = publish_system(&world, "b", "k1", &cuts_the_host_off(&world, "b"));
    let run = pass_that_loses_hydra(&world, "b", &["--confirm-timeout", "3"]);
    assert_exit(&run, 3);
    let error = run.error();
    assert!(
        error.contains(&format!(
            "build {id_b} ({b}) failed to activate: switch-to-configuration switch succeeded, \
             but then hail could not reach Hydra for 3 s"
        )),
        "{run:?}"
    );
    assert!(error.contains("rolled back to generation 1"), "{run:?}");
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(system_generations(&world), [1]);
    let ran = switches(&world);
    assert!(
        ran.last()
            .is_some_and(|l| l.starts_with("switch system=a op=switch ")
                && l.contains(&format!("previous={b} "))),
        "{ran:?}"
    );

    assert_b_is_remembered_as_failed(&world);

    // --confirm-timeout 0: no check after the switch, so the same loss is no failure.
    let (_, c) = publish_system(&world, "c", "k1", &cuts_the_host_off(&world, "c"));
    let asked = latest_requests(&world);
    let run = pass_that_loses_hydra(&world, "c", &["--confirm-timeout", "0"]);
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(c.as_str()));
    assert_eq!(latest_requests(&world), asked + 1, "Hydra was asked again");
}

#[test]
fn an_idle_pass_on_a_system_is_one_request() {
    let (world, id_a, _) = deployed_a();
    let asked = world.hydra.requests().len();
    let run = system_pass(&world, &[]);
    assert_up_to_date(&run, id_a);
    let after: Vec<String> = world.hydra.requests()[asked..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(after, [format!("HEAD /job/hail/main/{JOB}/latest")]);
    assert_eq!(switches(&world).len(), 1);
}

#[test]
fn hydra_failing_after_a_switch_is_no_lost_network() {
    let (world, _, _) = deployed_a();
    let (id_b, b) = publish_system(&world, "b", "k1", &cuts_the_host_off(&world, "b"));
    // Hydra restarting behind its proxy: 502 for a while. The host reached
    // it, so the switch stands.
    let bad_gateway = Fault::Respond(502, "text/html", b"<h1>502 Bad Gateway</h1>".to_vec());
    let asked = latest_requests(&world);
    let run = pass_after_which_hydra(&world, "b", bad_gateway, &["--confirm-timeout", "3"]);
    assert_exit(&run, 0);
    assert!(
        run.stderr.contains(&format!("deployed build {id_b}")),
        "{run:?}"
    );
    assert_eq!(system_target(&world).as_deref(), Some(b.as_str()));
    assert_eq!(latest_requests(&world), asked + 2, "one check was enough");
    world.hydra.clear_faults();

    // A refusal is no answer to the pass's question: checked until the end,
    // then rolled back.
    let (_, c) = publish_system(&world, "c", "k1", &cuts_the_host_off(&world, "c"));
    let forbidden = Fault::Respond(403, "application/json", br#"{"error":"nope"}"#.to_vec());
    let run = pass_after_which_hydra(&world, "c", forbidden, &["--confirm-timeout", "2"]);
    assert_exit(&run, 3);
    assert!(
        run.error().contains("could not reach Hydra for 2 s"),
        "{run:?}"
    );
    assert_eq!(system_target(&world).as_deref(), Some(b.as_str()));
    assert_ne!(system_target(&world).as_deref(), Some(c.as_str()));
}

#[test]
fn a_pass_killed_while_it_checks_hydra_is_finished_by_the_next() {
    let (world, _, a) = deployed_a();
    let (id_b, b) = publish_system(&world, "b", "k1", &cuts_the_host_off(&world, "b"));

    // The switch to b cuts the host off; the pass is killed while it tries
    // to reach Hydra.
    let mut cmd = hail_system(&world, &["--confirm-timeout", "60"]);
    cmd.process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut pass = cmd.spawn().expect("start hail");
    let until = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(Instant::now() < deadline, "{what} never happened");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    until("the switch to b", &|| world.path("switched-b").exists());
    let asked = latest_requests(&world);
    world.hydra.fault("/latest", Fault::Close);
    std::fs::write(world.path("cut-b"), "").expect("cut the host off");
    until("the check after the switch", &|| {
        latest_requests(&world) > asked
    });
    let group = format!("-{}", pass.id());
    assert_exit(
        &world.run({
            let mut kill = Command::new("kill");
            kill.args(["-KILL", "--", &group]);
            kill
        }),
        0,
    );
    let _ = pass.wait();
    assert_eq!(system_target(&world).as_deref(), Some(b.as_str()));
    assert_eq!(
        world.state_of(SYSTEM)["deployed"]["activation"],
        json!("pending")
    );

    // Hydra is still out of reach: the next pass does not stop at asking it
    // what to deploy; it finishes the switch and its check, and rolls back.
    let run = system_pass(&world, &["--confirm-timeout", "2"]);
    assert_exit(&run, 3);
    let error = run.error();
    assert!(
        error.contains(&format!("build {id_b} ({b}) failed to activate"))
            && error.contains("could not reach Hydra for 2 s")
            && error.contains("rolled back to generation 1"),
        "{run:?}"
    );
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(system_generations(&world), [1]);
    let ran = switches(&world);
    assert!(
        ran.last()
            .is_some_and(|l| l.starts_with("switch system=a op=switch ")),
        "{ran:?}"
    );

    assert_b_is_remembered_as_failed(&world);
}

/// Once Hydra answers again, b (Hydra's latest) is remembered as failed and
/// not switched to again.
fn assert_b_is_remembered_as_failed(world: &World) {
    world.hydra.clear_faults();
    let before = switches(world).len();
    let run = system_pass(world, &[]);
    assert_exit(&run, 3);
    assert!(run.error().contains("failed to activate"), "{run:?}");
    assert_eq!(switches(world).len(), before);
}

/// A fake `systemctl` first on PATH, recording its arguments; returns the
/// PATH to run hail with and the file it records to.
fn fake_systemctl(world: &World) -> (std::ffi::OsString, PathBuf) {
    let bin = world.path("fake-bin");
    std::fs::create_dir_all(&bin).expect("fake bin dir");
    let log = world.path("systemctl.log");
    let systemctl = bin.join("systemctl");
    std::fs::write(
        &systemctl,
        format!("#!/bin/sh\necho \"$*\" >> {}\n", log.display()),
    )
    .expect("write the fake systemctl");
    std::fs::set_permissions(
        &systemctl,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("make it executable");
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").expect("PATH is set"),
    )))
    .expect("a PATH");
    (path, log)
}

/// The local time as `date` says, in minutes after midnight.
fn local_minute() -> u16 {
    let output = Command::new("date").arg("+%H:%M").output().expect("date");
    let text = String::from_utf8_lossy(&output.stdout);
    let (h, m) = text.trim().split_once(':').expect("HH:MM");
    h.parse::<u16>().expect("hours") * 60 + m.parse::<u16>().expect("minutes")
}

/// A window from `from` to `to` minutes after now (either may be negative).
fn window(from: i32, to: i32) -> String {
    let now = i32::from(local_minute());
    let time = |offset: i32| {
        let m = (now + offset).rem_euclid(24 * 60);
        format!("{:02}:{:02}", m / 60, m % 60)
    };
    format!("{}-{}", time(from), time(to))
}

/// A pass on the profile system with the fake systemctl, booted into `booted`.
fn pass_booted(world: &World, path: &std::ffi::OsStr, booted: &str, extra: &[&str]) -> Run {
    let mut cmd = hail_system(world, extra);
    cmd.env("PATH", path).env("HAIL_BOOTED_SYSTEM", booted);
    world.run(cmd)
}

/// The value of the metric `name` for the profile system, from valid Prometheus text.
fn metric(metrics: &Path, name: &str) -> Option<f64> {
    parse_prometheus(&read_existing(metrics), SYSTEM)
        .get(&format!("{name}{{profile=\"system\"}}"))
        .copied()
}

#[test]
fn a_new_kernel_is_booted_into_inside_the_reboot_window_only() {
    let (world, _, a) = deployed_a();
    let (path, rebooted) = fake_systemctl(&world);
    let metrics = world.path("system.prom");
    let metrics_arg = metrics.to_str().expect("a UTF-8 path");
    let (id_b, b) = publish_system(&world, "b", "k2", "");

    // Outside the window: b becomes the boot default, the reboot waits.
    let outside = window(60, 120);
    let run = pass_booted(
        &world,
        &path,
        &a,
        &[
            "--allow-reboot",
            "--reboot-window",
            &outside,
            "--metrics-file",
            metrics_arg,
        ],
    );
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(b.as_str()));
    assert!(
        switches(&world)
            .last()
            .is_some_and(|l| l.starts_with(&format!("switch system=b op=boot build={id_b} "))),
        "{:?}",
        switches(&world)
    );
    assert_eq!(
        read_if_exists(&rebooted),
        None,
        "rebooted outside the window"
    );
    assert!(run.stderr.contains("reboot pending"), "{run:?}");
    let reboot = &world.state_of(SYSTEM)["reboot"];
    assert_eq!(reboot["store_path"], json!(b));
    assert_eq!(reboot["by_hail"], json!(true));
    assert_eq!(reboot["requested"], Value::Null);
    let table = world.status_table();
    assert!(
        table.contains("reboot pending since")
            && table.contains(&format!("hail reboots the host inside {outside}")),
        "{table}"
    );
    assert_eq!(metric(&metrics, "hail_reboot_pending"), Some(1.0));
    assert_eq!(metric(&metrics, "hail_reboot_required"), Some(1.0));

    // A later pass inside the window reboots, switching nothing.
    let inside = window(-5, 5);
    let run = pass_booted(
        &world,
        &path,
        &a,
        &["--allow-reboot", "--reboot-window", &inside],
    );
    assert_exit(&run, 0);
    assert_eq!(
        read_if_exists(&rebooted).as_deref(),
        Some("reboot\n"),
        "{run:?}"
    );
    assert_eq!(switches(&world).len(), 2);
    assert!(world.state_of(SYSTEM)["reboot"]["requested"]["at"].is_u64());

    // Booted into b: nothing pending any more, no second reboot.
    let run = pass_booted(
        &world,
        &path,
        &b,
        &["--allow-reboot", "--metrics-file", metrics_arg],
    );
    assert_exit(&run, 0);
    assert_eq!(world.state_of(SYSTEM)["reboot"], Value::Null);
    assert_eq!(read_if_exists(&rebooted).as_deref(), Some("reboot\n"));
    assert_eq!(metric(&metrics, "hail_reboot_required"), Some(0.0));
}

#[test]
fn a_reboot_that_boots_another_system_is_not_repeated() {
    let (world, _, a) = deployed_a();
    let (path, rebooted) = fake_systemctl(&world);
    let metrics = world.path("system.prom");
    let metrics_arg = metrics.to_str().expect("a UTF-8 path");
    let (_, b) = publish_system(&world, "b", "k2", "");
    let allow = ["--allow-reboot", "--metrics-file", metrics_arg];
    let reboots = || {
        read_if_exists(&rebooted)
            .unwrap_or_default()
            .lines()
            .filter(|l| *l == "reboot")
            .count()
    };

    // b needs a reboot: hail asks for one and marks it in the runtime dir.
    assert_exit(&pass_booted(&world, &path, &a, &allow), 0);
    assert_eq!(reboots(), 1);
    let requested = &world.state_of(SYSTEM)["reboot"]["requested"];
    let mark = world.runtime_dir().join("reboot-requested");
    assert_eq!(
        read_existing(&mark).trim(),
        requested["at"].to_string(),
        "the mark holds the request's time"
    );

    // The reboot did not happen (systemctl failed, say): the mark is still
    // there, this is the same boot, so the next pass asks again.
    assert_exit(&pass_booted(&world, &path, &a, &allow), 0);
    assert_eq!(reboots(), 2);

    // The host rebooted (emptying the runtime dir, as a boot empties /run;
    // the boot id cannot tell in a container) but booted a again, not b:
    // hail does not reboot again, says so once, and hands the reboot over.
    std::fs::remove_dir_all(world.runtime_dir()).expect("remove the runtime dir");
    let run = pass_booted(&world, &path, &a, &allow);
    assert_exit(&run, 0);
    assert_eq!(reboots(), 2, "{run:?}");
    assert!(
        run.stderr.contains(&format!(
            "but it booted {a} (another kernel, initrd or kernel modules): not rebooting again"
        )),
        "{run:?}"
    );
    let reboot = &world.state_of(SYSTEM)["reboot"];
    assert_eq!(reboot["store_path"], json!(b));
    assert!(reboot["booted_another"].is_u64(), "{reboot}");
    let table = world.status_table();
    assert!(
        table.contains("reboot required since")
            && table.contains("but it booted another system; reboot into it yourself"),
        "{table}"
    );
    assert_eq!(metric(&metrics, "hail_reboot_pending"), Some(0.0));
    assert_eq!(metric(&metrics, "hail_reboot_required"), Some(1.0));
    let run = pass_booted(&world, &path, &a, &allow);
    assert_exit(&run, 0);
    assert_eq!(reboots(), 2, "{run:?}");
    assert!(!run.stderr.contains("not rebooting again"), "{run:?}");

    // A new system is a new reboot hail carries out.
    let (_, c) = publish_system(&world, "c", "k3", "");
    assert_exit(&pass_booted(&world, &path, &a, &allow), 0);
    assert_eq!(reboots(), 3);
    let reboot = &world.state_of(SYSTEM)["reboot"];
    assert_eq!(reboot["store_path"], json!(c));
    assert_eq!(reboot["booted_another"], Value::Null);
    assert_eq!(metric(&metrics, "hail_reboot_pending"), Some(1.0));
}

#[test]
fn a_link_at_the_reboot_mark_is_replaced_not_followed() {
    let (world, _, a) = deployed_a();
    let (path, rebooted) = fake_systemctl(&world);
    publish_system(&world, "b", "k2", "");
    let victim = world.path("victim");
    std::fs::write(&victim, "victim").unwrap();
    std::fs::create_dir_all(world.runtime_dir()).unwrap();
    let mark = world.runtime_dir().join("reboot-requested");
    std::os::unix::fs::symlink(&victim, &mark).unwrap();

    let run = pass_booted(&world, &path, &a, &["--allow-reboot"]);
    assert_exit(&run, 0);
    assert_eq!(read_if_exists(&rebooted).as_deref(), Some("reboot\n"));
    assert_eq!(read_existing(&victim), "victim", "{run:?}");
    assert!(mark.symlink_metadata().unwrap().file_type().is_file());
    let requested = &world.state_of(SYSTEM)["reboot"]["requested"];
    assert_eq!(read_existing(&mark).trim(), requested["at"].to_string());
}

#[test]
fn a_reboot_window_without_reboots_is_a_usage_error() {
    let world = World::new();
    // Without --allow-reboot (clap's rule), and with HAIL_ALLOW_REBOOT=false,
    // which meets that rule but turns reboots off: exit 2, nothing run.
    let missing = system_pass(&world, &["--reboot-window", "02:00-04:00"]);
    let mut cmd = hail_system(&world, &[]);
    cmd.env("HAIL_ALLOW_REBOOT", "false")
        .env("HAIL_REBOOT_WINDOW", "02:00-04:00");
    let turned_off = world.run(cmd);
    for run in [&missing, &turned_off] {
        assert_exit(run, 2);
        assert!(run.stderr.contains("--allow-reboot"), "{run:?}");
    }
    assert!(
        turned_off
            .stderr
            .contains("set HAIL_ALLOW_REBOOT=true or remove the window"),
        "{turned_off:?}"
    );
    assert!(world.hydra.requests().is_empty());
}

#[test]
fn a_reboot_is_not_asked_for_unless_it_can_be_marked() {
    let (world, _, a) = deployed_a();
    let (path, rebooted) = fake_systemctl(&world);
    publish_system(&world, "b", "k2", "");
    // The runtime dir cannot be created: a file stands in its way.
    std::fs::write(world.runtime_dir(), "not a dir").expect("block the runtime dir");
    let run = pass_booted(&world, &path, &a, &["--allow-reboot"]);
    assert_exit(&run, 0);
    assert_eq!(read_if_exists(&rebooted), None, "{run:?}");
    assert!(
        run.stderr.contains("cannot mark the reboot request in")
            && run.stderr.contains("not rebooting"),
        "{run:?}"
    );
    assert_eq!(world.state_of(SYSTEM)["reboot"]["requested"], Value::Null);
}

#[test]
fn without_allow_reboot_a_new_kernel_is_switched_to_and_reported() {
    let (world, _, a) = deployed_a();
    let (path, rebooted) = fake_systemctl(&world);
    let metrics = world.path("system.prom");
    let metrics_arg = metrics.to_str().expect("a UTF-8 path");
    let (_, b) = publish_system(&world, "b", "k2", "");
    let run = pass_booted(&world, &path, &a, &["--metrics-file", metrics_arg]);
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(b.as_str()));
    assert!(
        switches(&world)
            .last()
            .is_some_and(|l| l.starts_with("switch system=b op=switch ")),
        "{:?}",
        switches(&world)
    );
    assert!(
        run.stderr.contains(&format!(
            "reboot required: the kernel, initrd or kernel modules of {b} are not the booted \
             system's ({a}); reboot the host to run the new system (hail does with \
             --allow-reboot)"
        )),
        "{run:?}"
    );
    assert_eq!(read_if_exists(&rebooted), None);
    assert_eq!(world.state_of(SYSTEM)["reboot"]["by_hail"], json!(false));
    assert!(
        world.status_table().contains("reboot required since"),
        "{}",
        world.status_table()
    );
    assert_eq!(metric(&metrics, "hail_reboot_required"), Some(1.0));
    assert_eq!(metric(&metrics, "hail_reboot_pending"), Some(0.0));

    // With --allow-reboot, a system with the booted kernel is switched to
    // (no reboot), and nothing is required any more.
    let (_, c) = publish_system(&world, "c", "k1", "");
    let run = pass_booted(&world, &path, &a, &["--allow-reboot"]);
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(c.as_str()));
    assert!(
        switches(&world)
            .last()
            .is_some_and(|l| l.starts_with("switch system=c op=switch ")),
        "{:?}",
        switches(&world)
    );
    assert_eq!(read_if_exists(&rebooted), None);
    assert_eq!(world.state_of(SYSTEM)["reboot"], Value::Null);
}

/// Runs `cmd` with NOTIFY_SOCKET set to a socket of the test's, read as
/// systemd reads it, while it runs (a full socket would block the sender);
/// returns the run and every `STATUS=` hail sent.
fn run_with_status(world: &World, mut cmd: Command) -> (Run, Vec<String>) {
    let dir = tempfile::tempdir().expect("socket dir");
    let socket_path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("a read timeout");
    cmd.env("NOTIFY_SOCKET", &socket_path);
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut statuses = Vec::new();
            let mut buf = vec![0; 65536];
            loop {
                match socket.recv(&mut buf) {
                    Ok(n) => statuses.extend(
                        String::from_utf8_lossy(&buf[..n])
                            .lines()
                            .filter_map(|l| l.strip_prefix("STATUS="))
                            .map(str::to_owned),
                    ),
                    Err(_) if done.load(Ordering::SeqCst) => return statuses,
                    Err(_) => {}
                }
            }
        });
        let run = world.run(cmd);
        done.store(true, Ordering::SeqCst);
        (run, reader.join().expect("the notify reader"))
    })
}

#[test]
fn substitution_progress_is_shown_for_systems_and_profiles() {
    let world = World::new();
    let (_, a) = publish_system(&world, "a", "k1", "");
    let (run, statuses) = run_with_status(&world, hail_system(&world, &[]));
    assert_exit(&run, 0);
    // The system, its kernel, initrd and modules.
    let copying: Vec<&String> = statuses
        .iter()
        .filter(|s| s.starts_with(&format!("realising {a}: copying path ")))
        .collect();
    assert_eq!(copying.len(), 4, "{statuses:?}");
    assert!(
        copying[3].contains("copying path 4 of 4 (") && copying[3].contains(" MiB download"),
        "{statuses:?}"
    );
    assert!(
        run.stderr
            .contains(&format!("realised {a}: fetched 4 path(s) (")),
        "{run:?}"
    );

    let (_, web) = world.publish("web");
    let (run, statuses) = run_with_status(&world, world.hail());
    assert_exit(&run, 0);
    assert!(
        statuses
            .iter()
            .any(|s| s.starts_with(&format!("realising {web}: copying path 1 of 1 ("))),
        "{statuses:?}"
    );
    assert!(run.stderr.contains("fetched 1 path(s)"), "{run:?}");
}

#[test]
fn holds_dry_runs_build_ages_and_pruning_work_for_systems() {
    let (world, _, a) = deployed_a();
    let (id_b, _) = publish_system(&world, "b", "k1", "");
    assert_exit(&system_pass(&world, &[]), 0);

    // An operator rolls the system back: hail holds, switching nothing.
    crate::common::cache::run(
        Command::new("nix-env")
            .arg("-p")
            .arg(world.profiles_dir().join(SYSTEM))
            .arg("--rollback"),
    );
    let run = system_pass(&world, &[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("holding"), "{run:?}");
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(switches(&world).len(), 2);
    assert_eq!(world.state_of(SYSTEM)["held"]["build_id"], json!(id_b));

    // A newer build, too young: a dry run says what would happen, a pass waits.
    let (id_c, c) = publish_system(&world, "c", "k1", "");
    let run = system_pass(&world, &["--dry-run"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout
            .contains(&format!("would deploy build {id_c} {c}")),
        "{run:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    world.hydra.set_stoptime(id_c, now - 60);
    let run = system_pass(&world, &["--min-build-age", "1h"]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("eligible at"), "{run:?}");
    assert_eq!(system_target(&world).as_deref(), Some(a.as_str()));
    assert_eq!(switches(&world).len(), 2);

    // Old enough: deployed, and the old generations pruned.
    world.hydra.set_stoptime(id_c, now - 7200);
    let run = system_pass(
        &world,
        &["--min-build-age", "1h", "--keep-generations", "1"],
    );
    assert_exit(&run, 0);
    assert_eq!(system_target(&world).as_deref(), Some(c.as_str()));
    assert_eq!(system_generations(&world), [3]);
    assert!(
        switches(&world).last().is_some_and(|l| l
            .starts_with(&format!("switch system=c op=switch build={id_c} "))
            && l.contains(&format!("previous={a} "))),
        "{:?}",
        switches(&world)
    );
}
