//! Safe deploys under faults. Every case starts from a host where build `a`
//! is deployed and activated, injects one fault while Hydra offers a newer
//! build `b`, and checks what an operator would: hail's exit status, where
//! the profile points, its generations, and that `a` is still what was
//! activated last (the running service is intact).

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::common::hydra::Fault;
use crate::common::{
    JOB, PROFILE, Run, World, assert_exit, in_mount_namespace, recording_activate,
};

/// A world where build `a` is deployed.
fn deployed_a() -> (World, String) {
    let world = World::new();
    let (_, a) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    (world, a)
}

/// How many times b's activate ran.
fn b_runs(world: &World) -> usize {
    world
        .activations()
        .iter()
        .filter(|l| l.starts_with("label=b "))
        .count()
}

fn last_activation_label(world: &World) -> Option<String> {
    world.activations().last().and_then(|l| {
        l.split_whitespace()
            .next()
            .map(|w| w.trim_start_matches("label=").to_owned())
    })
}

/// `a` is still deployed: profile, generation, and last activation.
#[track_caller]
fn assert_a_intact(world: &World, a: &str, case: &str, run: &Run) {
    assert_eq!(
        world.profile_target().as_deref(),
        Some(a),
        "{case}: profile moved\n{run:?}"
    );
    assert_eq!(world.generations(), [1], "{case}: generations\n{run:?}");
    assert_eq!(
        last_activation_label(world).as_deref(),
        Some("a"),
        "{case}: last activation\n{run:?}"
    );
}

/// Publishes `b` built with `extra` appended to its recording activate.
fn publish_b(world: &World, extra: &str) -> (u64, String) {
    world.publish_with("b", extra)
}

type Inject = Box<dyn Fn(&World) -> Vec<String>>;

/// Faults that leave the profile untouched (exit 1) or roll back (exit 3).
fn table() -> Vec<(&'static str, i32, Inject)> {
    let html = |status: u16| {
        Fault::Respond(
            status,
            "text/html",
            format!("<html><title>{status}</title></html>").into_bytes(),
        )
    };
    let build_json = |world: &World, edit: &dyn Fn(&mut Value)| {
        let (id, b) = publish_b(world, "");
        let mut build = crate::common::hydra::build_object(id, JOB, &b, Some(0));
        edit(&mut build);
        world.hydra.set_build_json(id, build);
    };
    vec![
        (
            "Hydra down",
            1,
            Box::new(|world: &World| {
                publish_b(world, "");
                let port = crate::common::free_port();
                vec![
                    "--job-uri".into(),
                    format!("http://127.0.0.1:{port}/job/hail/main/{JOB}"),
                ]
            }),
        ),
        (
            "Hydra hangs",
            1,
            Box::new(|world: &World| {
                publish_b(world, "");
                world.hydra.fault("/latest", Fault::Hang);
                vec!["--timeout".into(), "1".into()]
            }),
        ),
        (
            "500 HTML",
            1,
            Box::new(move |world: &World| {
                let (id, _) = publish_b(world, "");
                world.hydra.fault(&format!("/build/{id}"), html(500));
                vec![]
            }),
        ),
        (
            "502 HTML",
            1,
            Box::new(move |world: &World| {
                publish_b(world, "");
                world.hydra.fault("/latest", html(502));
                vec![]
            }),
        ),
        (
            "truncated body",
            1,
            Box::new(|world: &World| {
                let (id, _) = publish_b(world, "");
                world.hydra.fault(
                    &format!("/build/{id}"),
                    Fault::Truncate(b"{\"id\":".to_vec()),
                );
                vec![]
            }),
        ),
        (
            "garbage body",
            1,
            Box::new(|world: &World| {
                let (id, _) = publish_b(world, "");
                world.hydra.fault(
                    &format!("/build/{id}"),
                    Fault::Respond(200, "application/json", b"\xff\xfe<<garbage".to_vec()),
                );
                vec![]
            }),
        ),
        (
            "oversized body",
            1,
            Box::new(|world: &World| {
                let (id, _) = publish_b(world, "");
                world.hydra.fault(
                    &format!("/build/{id}"),
                    Fault::Respond(200, "application/json", vec![b'['; 3 << 20]),
                );
                vec![]
            }),
        ),
        (
            "finished: true",
            1,
            Box::new(move |world: &World| {
                build_json(world, &|b| b["finished"] = json!(true));
                vec![]
            }),
        ),
        (
            "string id",
            1,
            Box::new(move |world: &World| {
                build_json(world, &|b| b["id"] = json!(b["id"].to_string()));
                vec![]
            }),
        ),
        (
            "missing buildoutputs",
            1,
            Box::new(move |world: &World| {
                build_json(world, &|b| {
                    b.as_object_mut().unwrap().remove("buildoutputs");
                });
                vec![]
            }),
        ),
        (
            "content-addressed (null path)",
            1,
            Box::new(move |world: &World| {
                build_json(world, &|b| b["buildoutputs"]["out"]["path"] = Value::Null);
                vec![]
            }),
        ),
        (
            "redirect loop",
            1,
            Box::new(|world: &World| {
                publish_b(world, "");
                let loop_to = world.hydra.job_uri(JOB) + "/latest";
                world.hydra.fault("/latest", Fault::Redirect(loop_to));
                vec![]
            }),
        ),
        (
            "narinfo 404",
            1,
            Box::new(|world: &World| {
                let b = world.cache.build("b", &recording_activate("b", ""));
                world.hydra.add_build(JOB, &b, Some(0));
                vec![]
            }),
        ),
        (
            "NAR does not match its hash",
            1,
            Box::new(|world: &World| {
                let (_, b) = publish_b(world, "");
                let other = world
                    .cache
                    .build("c", &recording_activate("c", "# other content"));
                world.cache.publish(&other);
                std::fs::copy(world.cache.nar_file(&other), world.cache.nar_file(&b)).unwrap();
                vec![]
            }),
        ),
        (
            "unsigned path, signatures required",
            1,
            Box::new(|world: &World| {
                let b = world.cache.build("b", &recording_activate("b", ""));
                world.cache.publish_unsigned(&b);
                world.hydra.add_build(JOB, &b, Some(0));
                vec![]
            }),
        ),
        (
            "activate exits 1",
            3,
            Box::new(|world: &World| {
                publish_b(world, "echo 'b cannot start: port 8080 in use' >&2; exit 1");
                vec![]
            }),
        ),
        (
            "activate hangs past the timeout",
            3,
            Box::new(|world: &World| {
                publish_b(world, "sleep 60");
                vec!["--activate-timeout".into(), "1".into()]
            }),
        ),
        (
            "activate is killed",
            3,
            Box::new(|world: &World| {
                publish_b(world, "kill -9 $$");
                vec![]
            }),
        ),
    ]
}

#[test]
fn table_of_faults_loses_nothing() {
    let cases = table();
    let count = cases.len();
    let started = Instant::now();
    for (name, expected_exit, inject) in cases {
        let (world, a) = deployed_a();
        let args = inject(&world);
        let cmd = match &args[..] {
            [flag, job_uri] if flag == "--job-uri" => world.hail_with_job(job_uri),
            _ => {
                let mut cmd = world.hail();
                cmd.args(&args);
                cmd
            }
        };
        let run = world.run(cmd);
        assert_eq!(
            run.code,
            Some(expected_exit),
            "{name}: exit status\n{run:?}"
        );
        assert_eq!(
            run.stderr
                .lines()
                .filter(|l| l.starts_with("hail[web]: error:"))
                .count(),
            1,
            "{name}: one error line\n{run:?}"
        );
        assert_a_intact(&world, &a, name, &run);
        if expected_exit == 3 {
            // Rolled back: a was activated again, told which build failed.
            let last = world.activations().last().cloned().unwrap_or_default();
            assert!(last.contains("previous=/nix/store/"), "{name}: {last}");
            assert!(
                run.stderr.contains("rolled back to generation 1"),
                "{name}\n{run:?}"
            );
            assert!(
                world.state_of(PROFILE)["failed"]["build_id"].is_u64(),
                "{name}: failed build not recorded"
            );
        }
    }
    eprintln!(
        "{count} faults injected in {:?}; nothing lost in any",
        started.elapsed()
    );
}

#[test]
fn rollback_names_the_build_status_and_stderr() {
    let (world, _) = deployed_a();
    let deployed_at = world.state_of(PROFILE)["deployed"]["at"].clone();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let (id, b) = publish_b(
        &world,
        "echo 'b cannot start: port 8080 in use' >&2; exit 1",
    );
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    let error = run.error();
    assert!(
        error.contains(&format!("build {id} ({b}) failed to activate")),
        "{run:?}"
    );
    assert!(error.contains("exited with status 1"), "{run:?}");
    assert!(error.contains("port 8080 in use"), "{run:?}");
    // Nothing of this pass's own is reported as left by an interrupted one.
    assert!(
        !run.stderr.contains("left by an interrupted write"),
        "{run:?}"
    );
    // The failed generation is gone, a was re-activated knowing what failed.
    assert_eq!(world.generations(), [1]);
    assert!(
        world
            .activations()
            .last()
            .unwrap()
            .ends_with(&format!("previous={b} profile=web cwd=/"))
    );
    // The restored deployment keeps its own history.
    assert_eq!(world.state_of(PROFILE)["deployed"]["at"], deployed_at);
    assert_eq!(world.state_of(PROFILE)["deployed"]["build_id"], 1);
}

#[test]
fn failed_build_is_not_retried_until_a_newer_one() {
    let (world, a) = deployed_a();
    let (id_b, _) = publish_b(&world, "exit 1");
    assert_exit(&world.pass(&[]), 3);
    let activations = world.activations().len();

    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(
        run.stderr.contains(&format!("build {id_b}")) && run.stderr.contains("--retry-failed"),
        "{run:?}"
    );
    assert_eq!(
        world.activations().len(),
        activations,
        "the failed build was retried"
    );
    assert_a_intact(&world, &a, "second pass", &run);
    let run = world.pass(&["--dry-run"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout
            .contains(&format!("would not deploy build {id_b}")),
        "{run:?}"
    );

    let run = world.pass(&["--retry-failed"]);
    assert_exit(&run, 3);
    assert_eq!(
        world.activations().len(),
        activations + 2,
        "retry: b tried, a re-activated"
    );

    let (_, c) = world.publish("c");
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(c.as_str()));
    assert_eq!(world.state_of(PROFILE)["failed"], Value::Null);
}

#[test]
fn first_deploy_that_fails_removes_the_profile() {
    let world = World::new();
    world.publish_with("a", "exit 1");
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(run.stderr.contains("removed the profile"), "{run:?}");
    assert_eq!(world.profile_target(), None);
    assert!(world.generations().is_empty(), "{:?}", world.generations());
    // Nothing half-activated is left for boot.
    assert_exit(&world.run(world.boot_activation()), 0);
    assert_eq!(world.activations().len(), 1);
}

#[test]
fn failed_first_deploy_is_undone_with_its_deactivate() {
    let world = World::new();
    let deactivate =
        "#!/bin/sh\necho \"deactivated build=$HAIL_BUILD_ID\" >> \"$HAIL_TEST_RECORD\"\n";
    let path =
        world
            .cache
            .build_with_deactivate("a", &recording_activate("a", "exit 1"), deactivate);
    world.cache.publish(&path);
    let id = world.hydra.add_build(JOB, &path, Some(0));
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(
        run.stderr
            .contains("ran its bin/deactivate and removed the profile"),
        "{run:?}"
    );
    assert_eq!(world.profile_target(), None);
    assert_eq!(
        world.activations().last().map(String::as_str),
        Some(format!("deactivated build={id}").as_str())
    );
}

#[test]
fn manual_rollback_is_respected() {
    let (world, a) = deployed_a();
    let (id_b, b) = world.publish("b");
    assert_exit(&world.pass(&[]), 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));

    // The operator rolls back by hand.
    crate::common::cache::run(
        Command::new("nix-env")
            .arg("-p")
            .arg(world.profile_path())
            .arg("--rollback"),
    );
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    let activations = world.activations().len();

    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("holding"), "{run:?}");
    assert!(run.stderr.contains(&format!("build {id_b}")), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(world.activations().len(), activations);
    assert_eq!(world.state_of(PROFILE)["held"]["build_id"], json!(id_b));
    // A dry run says so too, and changes nothing.
    let run = world.pass(&["--dry-run"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout.contains(&format!(
            "would hold: the profile was moved away from build {id_b}"
        )),
        "{run:?}"
    );
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));

    // --force deploys the latest regardless.
    let run = world.pass(&["--force"]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));

    // Rolled back again, then a newer build arrives: it deploys.
    crate::common::cache::run(
        Command::new("nix-env")
            .arg("-p")
            .arg(world.profile_path())
            .arg("--switch-generation")
            .arg("1"),
    );
    assert_exit(&world.pass(&[]), 0);
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    let (_, c) = world.publish("c");
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(c.as_str()));
    assert_eq!(world.state_of(PROFILE)["held"], Value::Null);
}

/// Starts hail in its own process group (as systemd would kill a unit's
/// cgroup), waits until `ready` holds, then SIGKILLs the whole group.
fn kill_pass_when(world: &World, ready: impl Fn() -> bool) {
    let mut cmd = world.hail();
    cmd.process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = cmd.spawn().expect("start hail");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "hail never reached the point to kill it"
        );
        assert!(
            child.try_wait().expect("poll hail").is_none(),
            "hail ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let group = format!("-{}", child.id());
    let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
    let _ = child.wait();
}

#[test]
fn killed_during_substitution_converges() {
    let (world, a) = deployed_a();
    let (_, b) = publish_b(&world, "");
    world.hydra.fault(".nar.xz", Fault::Hang);
    kill_pass_when(&world, || {
        world
            .hydra
            .requests()
            .iter()
            .any(|r| r.path.ends_with(".nar.xz"))
    });
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(world.generations(), [1]);

    world.hydra.clear_faults();
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    assert_eq!(world.generations(), [1, 2]);
    assert_eq!(last_activation_label(&world).as_deref(), Some("b"));
}

#[test]
fn killed_during_activation_converges() {
    let (world, _) = deployed_a();
    // Activation hangs the first time only (the marker survives the kill).
    let once = "m=\"$(dirname \"$HAIL_TEST_RECORD\")/slept\"; [ -e \"$m\" ] || { touch \"$m\"; sleep 60; }";
    let (_, b) = publish_b(&world, once);
    kill_pass_when(&world, || world.path("slept").exists());
    assert_eq!(
        world.profile_target().as_deref(),
        Some(b.as_str()),
        "nix-env --set is atomic and ran"
    );
    assert_eq!(
        world.state_of(PROFILE)["deployed"]["activation"],
        json!("pending")
    );

    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("interrupted"), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    assert_eq!(world.generations(), [1, 2]);
    let b_runs = b_runs(&world);
    assert_eq!(b_runs, 2, "activate of b ran again to completion");
    assert_eq!(
        world.state_of(PROFILE)["deployed"]["activation"],
        json!("done")
    );

    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("up to date"), "{run:?}");
}

#[test]
fn concurrent_passes_two_and_five() {
    for n in [2, 5] {
        let (world, _) = deployed_a();
        let (_, b) = publish_b(&world, "sleep 0.5");
        let runs: Vec<Run> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..n).map(|_| s.spawn(|| world.pass(&[]))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for run in &runs {
            assert_exit(run, 0);
        }
        assert_eq!(
            world.profile_target().as_deref(),
            Some(b.as_str()),
            "{n} passes"
        );
        assert_eq!(world.generations(), [1, 2], "{n} passes");
        let b_runs = b_runs(&world);
        assert_eq!(b_runs, 1, "{n} passes activated b {b_runs} times");
    }
}

#[test]
fn read_only_profiles_dir() {
    let (world, a) = deployed_a();
    publish_b(&world, "");
    // A read-only bind mount in a private mount namespace: root ignores
    // permission bits, not a read-only mount.
    let dir = world.profiles_dir();
    let cmd = in_mount_namespace(
        "mount --bind \"$0\" \"$0\" && mount -o remount,bind,ro \"$0\" && exec \"$@\"",
        dir.as_os_str(),
        &[],
        &world.hail(),
    );
    let run = world.run(cmd);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("nix-env"), "{run:?}");
    assert_a_intact(&world, &a, "read-only profiles dir", &run);
}

#[test]
fn corrupt_state_file_is_reported_not_fatal() {
    let (world, _) = deployed_a();
    std::fs::write(
        world.state_dir().join("web.json"),
        b"{\"deployed\": {\"build_id\": \"x",
    )
    .unwrap();
    let (_, b) = publish_b(&world, "");
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("is corrupt"), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    assert_eq!(
        world.state_of(PROFILE)["deployed"]["activation"],
        json!("done")
    );
}

/// The row of the test profile in `hail status`, as cells split on runs of spaces.
fn status_deployed_cell(world: &World) -> String {
    let table = world.status_table();
    let row = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no row for web in:\n{table}"));
    row.split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .nth(1)
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn killed_while_rolling_back_is_finished_by_the_next_pass() {
    let world = World::new();
    // a's activate hangs the first time it runs as a rollback (it then sees
    // the failed build as HAIL_PREVIOUS_STORE_PATH).
    let once = "[ -z \"$HAIL_PREVIOUS_STORE_PATH\" ] || { m=\"$(dirname \"$HAIL_TEST_RECORD\")/slept\"; [ -e \"$m\" ] || { touch \"$m\"; sleep 60; }; }";
    let (_, a) = world.publish_with("a", once);
    assert_exit(&world.pass(&[]), 0);
    let (id_b, _) = publish_b(&world, "exit 1");
    kill_pass_when(&world, || world.path("slept").exists());
    assert_eq!(
        world.state_of(PROFILE)["rolling_back"]["build_id"],
        json!(id_b)
    );
    assert_eq!(b_runs(&world), 1);

    // The next pass finishes the rollback instead of deploying b again.
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(run.stderr.contains("interrupted"), "{run:?}");
    assert_a_intact(&world, &a, "after finishing the rollback", &run);
    assert_eq!(b_runs(&world), 1, "b was activated again\n{run:?}");
    let saved = world.state_of(PROFILE);
    assert_eq!(saved["rolling_back"], Value::Null);
    assert_eq!(saved["failed"]["build_id"], json!(id_b));
    assert_eq!(saved["deployed"]["store_path"], json!(a));

    // And the one after that refuses b as a failed build, touching nothing.
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(run.stderr.contains("failed to activate"), "{run:?}");
    assert_a_intact(&world, &a, "the pass after", &run);
}

#[test]
fn hold_survives_a_lost_state_file() {
    let (world, a) = deployed_a();
    let (_, b) = world.publish("b");
    assert_exit(&world.pass(&[]), 0);
    crate::common::cache::run(
        Command::new("nix-env")
            .arg("-p")
            .arg(world.profile_path())
            .arg("--rollback"),
    );
    std::fs::write(world.state_dir().join("web.json"), b"{\"deployed\": tru").unwrap();
    let activations = world.activations().len();

    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("is corrupt"), "{run:?}");
    assert!(run.stderr.contains("holding"), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(world.activations().len(), activations, "{run:?}");
    assert_eq!(world.state_of(PROFILE)["held"]["profile_target"], json!(a));
    assert_eq!(world.state_of(PROFILE)["deployed"]["store_path"], json!(b));

    // A newer build ends the hold as usual.
    let (_, c) = world.publish("c");
    assert_exit(&world.pass(&[]), 0);
    assert_eq!(world.profile_target().as_deref(), Some(c.as_str()));
}

#[test]
fn status_names_a_profile_hail_did_not_deploy() {
    let world = World::new();
    // A profile set up by hand, before hail.
    let x = world.cache.build("x", &recording_activate("x", ""));
    world.cache.publish(&x);
    std::fs::create_dir_all(world.profiles_dir()).unwrap();
    crate::common::cache::run(
        Command::new("nix-env")
            .arg("-p")
            .arg(world.profile_path())
            .arg("--set")
            .arg(&x)
            .env(
                "NIX_CONFIG",
                world.cache.client_nix_config(&world.hydra.origin()),
            ),
    );
    // Hydra is down: the pass fails, but the record says what is deployed.
    let port = crate::common::free_port();
    let run =
        world.run(world.hail_with_job(&format!("http://127.0.0.1:{port}/job/hail/main/{JOB}")));
    assert_exit(&run, 1);
    assert_eq!(status_deployed_cell(&world), "generation 1 (hail-test-x)");

    // Hydra's first build fails to activate: back at x, still named.
    let (_, _) = publish_b(&world, "exit 1");
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert_eq!(world.profile_target().as_deref(), Some(x.as_str()));
    assert_eq!(status_deployed_cell(&world), "generation 1 (hail-test-x)");
}

#[test]
fn unknown_build_age_is_never_deployed_early() {
    for (case, stoptime) in [
        ("missing", None),
        ("null", Some(Value::Null)),
        ("malformed", Some(json!("yesterday"))),
        ("absurd", Some(json!(u64::MAX))),
    ] {
        let (world, a) = deployed_a();
        let (id, b) = publish_b(&world, "");
        let mut build = crate::common::hydra::build_object(id, JOB, &b, Some(0));
        match &stoptime {
            None => {
                build.as_object_mut().unwrap().remove("stoptime");
            }
            Some(value) => build["stoptime"] = value.clone(),
        }
        world.hydra.set_build_json(id, build);
        let run = world.pass(&["--min-build-age", "1h"]);
        assert_exit(&run, 0);
        assert!(run.stderr.contains("age is unknown"), "{case}: {run:?}");
        assert_a_intact(&world, &a, case, &run);
        assert_eq!(
            world.state_of(PROFILE)["waiting"]["build_id"],
            json!(id),
            "{case}"
        );
    }
}

#[test]
fn a_failed_boot_activation_is_recorded_and_retried_by_passes() {
    let world = World::new();
    // Boot activations (no HAIL_BUILD_ID... until hail knows the build) fail
    // while the flag file exists.
    let flag = world.path("broken");
    let (id, a) = world.publish_with(
        "a",
        &format!(
            "[ ! -e {} ] || {{ echo the database is not up >&2; exit 4; }}",
            flag.display()
        ),
    );
    assert_exit(&world.pass(&[]), 0);
    std::fs::write(&flag, "").unwrap();

    let run = world.run(world.boot_activation());
    assert_exit(&run, 3);
    assert!(run.stderr.contains("the database is not up"), "{run:?}");
    let saved = world.state_of(PROFILE);
    assert_eq!(saved["deployed"]["activation"], json!("failed"));
    assert_eq!(saved["deployed"]["activation_failures"], json!(1));
    let table = world.status_table();
    assert!(
        table.contains("activation of build") && table.contains("failed 1 time(s)"),
        "{table}"
    );

    // The next pass does not call it up to date: it activates again, and
    // counts the failure (no rollback: it worked before).
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(run.stderr.contains("running it again"), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(
        world.state_of(PROFILE)["deployed"]["activation_failures"],
        json!(2)
    );
    let runs = world.activations().len();
    assert_exit(&world.pass(&[]), 3);
    assert_eq!(world.activations().len(), runs + 1);
    // Bounded: the third failure in a row was the last try.
    let run = world.pass(&[]);
    assert_exit(&run, 3);
    assert!(run.stderr.contains("3 times in a row"), "{run:?}");
    assert_eq!(world.activations().len(), runs + 1, "{run:?}");

    // Fixed, and activated by hand (or at the next boot): up to date again.
    std::fs::remove_file(&flag).unwrap();
    assert_exit(&world.run(world.boot_activation()), 0);
    assert_eq!(
        world.state_of(PROFILE)["deployed"]["activation"],
        json!("done")
    );
    assert_eq!(world.state_of(PROFILE)["deployed"]["build_id"], json!(id));
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("up to date"), "{run:?}");
}

#[test]
fn boot_activation_refuses_a_profile_deployed_from_another_job() {
    let (world, _) = deployed_a();
    let mut cmd = world.bare_hail();
    cmd.args(["activate", "--profile", "web", "--job-uri"])
        .arg(world.hydra.job_uri("other"))
        .arg("--profiles-dir")
        .arg(world.profiles_dir())
        .arg("--state-dir")
        .arg(world.state_dir());
    let run = world.run(cmd);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("not from"), "{run:?}");
    assert_eq!(world.activations().len(), 1);
}

#[test]
fn a_full_disk_after_the_switch_does_not_make_the_exit_status_lie() {
    let (world, _) = deployed_a();
    let state_dir = world.state_dir();
    // b's activate fills the state dir's file system: the pass's final save fails.
    let (_, b) = publish_b(
        &world,
        &format!(
            "dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null
             echo probe >{state}/probe || touch {full}; rm -f {state}/probe",
            state = state_dir.display(),
            full = world.path("disk-was-full").display()
        ),
    );
    let read = two_passes_on_a_small_state_dir(&world);
    let stderr1 = read("stderr1");
    assert_eq!(
        read("rc1").trim(),
        "0",
        "deployed, whatever the save said:\n{stderr1}"
    );
    assert!(world.path("disk-was-full").exists(), "{stderr1}");
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    assert_eq!(read("rc2").trim(), "0", "{}", read("stderr2"));
    assert!(
        read("stderr2").contains("up to date"),
        "{}",
        read("stderr2")
    );
    let b_runs = b_runs(&world);
    assert_eq!(b_runs, 1, "the second pass activated b again");
    let saved: Value = serde_json::from_str(&read("state-after")).unwrap();
    assert_eq!(saved["deployed"]["activation"], json!("done"));
}

/// Runs two passes in one mount namespace, on a 256 KiB tmpfs over the state
/// dir (copied in first), as a full /var would be; the `filler` file an
/// activate may write there is removed between them. Returns a reader of
/// what they left in the world's dir: `rc1`, `stderr1`, `rc2`, `stderr2`,
/// `state-after`.
fn two_passes_on_a_small_state_dir(world: &World) -> impl Fn(&str) -> String + '_ {
    let cmd = in_mount_namespace(
        "set -u; state=$1; out=$2; shift 2
             cp -a \"$state\" \"$out/state-before\"
             mount -t tmpfs -o size=256k hail-test \"$state\" || exit 90
             cp -a \"$out/state-before/.\" \"$state/\"
             \"$@\" 2>\"$out/stderr1\"; echo $? >\"$out/rc1\"
             rm -f \"$state/filler\"
             \"$@\" 2>\"$out/stderr2\"; echo $? >\"$out/rc2\"
             cp \"$state/web.json\" \"$out/state-after\"",
        OsStr::new("sh"),
        &[world.state_dir().as_os_str(), world.tmp.path().as_os_str()],
        &world.hail(),
    );
    let run = world.run(cmd);
    assert_exit(&run, 0);
    |name: &str| std::fs::read_to_string(world.path(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn a_full_disk_after_a_retried_activation_does_not_run_it_again() {
    let (world, _) = deployed_a();
    // b's activate: the deploy's run succeeds, the boot activation fails,
    // and the pass's retry fills the state dir's file system and succeeds.
    let (_, b) = publish_b(
        &world,
        &format!(
            "n=$(grep -c '^label=b ' \"$HAIL_TEST_RECORD\")
             [ \"$n\" -ne 2 ] || exit 1
             if [ \"$n\" -eq 3 ]; then dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null; fi
             exit 0",
            state = world.state_dir().display()
        ),
    );
    assert_exit(&world.pass(&[]), 0);
    assert_exit(&world.run(world.boot_activation()), 3);
    assert_eq!(b_runs(&world), 2);

    let read = two_passes_on_a_small_state_dir(&world);
    assert_eq!(read("rc1").trim(), "0", "{}", read("stderr1"));
    assert!(read("stderr1").contains("again"), "{}", read("stderr1"));
    assert_eq!(read("rc2").trim(), "0", "{}", read("stderr2"));
    assert!(
        read("stderr2").contains("up to date"),
        "{}",
        read("stderr2")
    );
    assert_eq!(b_runs(&world), 3, "the second pass activated b again");
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    let saved: Value = serde_json::from_str(&read("state-after")).unwrap();
    assert_eq!(saved["deployed"]["activation"], json!("done"));
}
