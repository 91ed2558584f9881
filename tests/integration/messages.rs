//! What hail tells the operator when Hydra says no: each message names what
//! real Hydra means by its answer (`/work/shared/hydra/HYDRA.md`), in every
//! way of choosing the build.

use crate::common::hydra::{Bystander, Fault};
use crate::common::{JOB, Run, World, assert_exit};

/// A well-formed store path that is not in any cache: these passes stop at Hydra.
const OUT: &str = "/nix/store/ywd0s510ywbfhczmgis9ywb3y0q8xcwn-hail-test-agent-2";

/// Every way of choosing the build; each asks Hydra different endpoints.
const MODES: [&[&str]; 4] = [
    &[],
    &["--system", "x86_64-linux"],
    &["--latest-finished"],
    &["--wait-for-jobset"],
];

/// The one error line of a failed pass, and that the profile was not touched.
#[track_caller]
fn error_line(world: &World, run: &Run) -> String {
    assert_exit(run, 1);
    assert_eq!(world.profile_target(), None, "{run:?}");
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("hail[web]: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "one error line: {run:?}");
    errors[0].to_owned()
}

#[test]
fn private_hydra_403_says_basic_auth_cannot_help() {
    let world = World::new();
    world.hydra.add_build(JOB, OUT, Some(0));
    world.hydra.make_private();
    for mode in MODES {
        let error = error_line(&world, &world.pass(mode));
        assert!(
            error.contains("403 Forbidden")
                && error.contains("This page requires you to sign in.")
                && error.contains("`private = 1`")
                && error.contains("ignores HTTP Basic auth")
                && error.contains("set `private = 0`"),
            "{mode:?}: {error}"
        );
    }

    // Through a proxy that checks HTTP Basic auth, with the right netrc
    // entry: the proxy lets hail through, and Hydra still refuses.
    world.hydra.require_basic_auth("ci", "s3cret");
    let netrc = world.path("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login ci password s3cret\n").unwrap();
    std::fs::set_permissions(&netrc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let run = world.pass(&["--netrc-file", netrc.to_str().unwrap()]);
    let error = error_line(&world, &run);
    assert!(
        error.contains("ignores HTTP Basic auth") && error.contains("set `private = 0`"),
        "{error}"
    );
    let last = world.hydra.api_requests().pop().unwrap();
    assert!(last.header("Authorization").is_some(), "{last:?}");
    assert!(!run.stderr.contains("s3cret"));
}

#[test]
fn renamed_jobset_is_a_moved_job_uri_in_every_mode() {
    let world = World::new();
    world.hydra.add_build(JOB, OUT, Some(0));
    world.hydra.rename_jobset("old", "main");
    let origin = world.hydra.origin();
    let moved_to = [
        format!("{origin}/job/hail/main/{JOB}/latest"),
        format!("{origin}/job/hail/main/{JOB}/latest-for/x86_64-linux"),
        format!("{origin}/job/hail/main/{JOB}/latest-finished"),
        format!("{origin}/jobset/hail/main/latest-eval"),
    ];
    for (mode, location) in MODES.into_iter().zip(moved_to) {
        let mut cmd = world.hail_with_job(&format!("{origin}/job/hail/old/{JOB}"));
        cmd.args(mode);
        let error = error_line(&world, &world.run(cmd));
        assert!(
            error.contains(&format!("301 Moved Permanently to {location:?}"))
                && error.contains("the job URI has moved"),
            "{mode:?}: {error}"
        );
        assert!(!error.contains("HTML"), "{mode:?}: {error}");
    }
}

#[test]
fn missing_jobset_is_no_such_jobset_in_every_mode() {
    let world = World::new();
    world.hydra.add_build(JOB, OUT, Some(0));
    let job_uri = format!("{}/job/hail/nosuch/{JOB}", world.hydra.origin());
    for mode in MODES {
        let mut cmd = world.hail_with_job(&job_uri);
        cmd.args(mode);
        let error = error_line(&world, &world.run(cmd));
        assert!(
            error.contains("no such jobset hail/nosuch")
                && error.contains("Jobset \u{2018}nosuch\u{2019} doesn't exist."),
            "{mode:?}: {error}"
        );
        assert!(!error.contains("no successful build"), "{mode:?}: {error}");
    }
}

#[test]
fn wait_for_jobset_names_the_missing_system_and_the_missing_job() {
    let world = World::new();
    let x86 = world
        .hydra
        .add_build_in(JOB, "x86_64-linux", OUT, Some(0), Some(1));
    let arm = "/nix/store/dddddddddddddddddddddddddddddddd-hail-test-agent-2";
    world
        .hydra
        .add_build_in(JOB, "aarch64-linux", arm, Some(0), Some(2));

    // Evaluation 2 built the job, but for another system only.
    let run = world.pass(&["--wait-for-jobset", "--system", "x86_64-linux", "--dry-run"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout
            .contains(&format!("would deploy build {x86} {OUT}")),
        "{run:?}"
    );
    assert!(
        run.stderr
            .contains("evaluation 2 has no build of agent for x86_64-linux"),
        "{run:?}"
    );

    // No evaluation built it for this system at all.
    let run = world.pass(&["--wait-for-jobset", "--system", "riscv64-linux"]);
    let error = error_line(&world, &run);
    assert!(
        error.contains("has no build of agent for riscv64-linux in its newest 2 evaluations")
            && error.contains("aarch64-linux, x86_64-linux")
            && error.contains("--system"),
        "{error}"
    );

    // A job that no evaluation has is named as such, not waited for.
    let mut cmd = world.hail_with_job(&world.hydra.job_uri("nosuchjob"));
    cmd.arg("--wait-for-jobset");
    let error = error_line(&world, &world.run(cmd));
    assert!(
        error.contains("jobset hail/main has no job nosuchjob in its newest 2 evaluations"),
        "{error}"
    );
    assert!(!error.contains("waiting"), "{error}");
}

#[test]
fn location_on_another_origin_warns_where_the_build_was_fetched() {
    let world = World::new();
    let other = Bystander::start();
    world
        .hydra
        .location_origin(&format!("http://{}", other.addr));
    let id = world.hydra.add_build(JOB, OUT, Some(0));
    let run = world.pass(&["--dry-run"]);
    assert_exit(&run, 0);
    let build_url = format!("{}/build/{id}", world.hydra.origin());
    let warning = run
        .stderr
        .lines()
        .find(|l| l.contains("warning:") && l.contains(&format!("http://{}", other.addr)))
        .unwrap_or_else(|| panic!("no warning about the other origin: {run:?}"));
    assert!(
        warning.contains(&format!("fetching build {id} from {build_url} instead")),
        "{warning}"
    );
    assert!(!warning.contains("from there"), "{warning}");
    assert!(other.connections().is_empty());
}

#[test]
fn evals_page_over_a_mebibyte_is_read() {
    // Real Hydra lists every build id of 20 evaluations a page: over 1 MiB
    // on a large jobset (HYDRA.md).
    let world = World::new();
    let id = world
        .hydra
        .add_build_in(JOB, "x86_64-linux", OUT, Some(0), Some(1));
    let many_builds: Vec<u64> = (1_000_000..1_200_000).chain([id]).collect();
    let page = serde_json::json!({
        "evals": [{ "id": 1, "hasnewbuilds": 1, "builds": many_builds }],
        "first": "?page=1",
        "last": "?page=1",
    });
    let body = page.to_string().into_bytes();
    assert!(body.len() > 1024 * 1024);
    world.hydra.fault(
        "/jobset/hail/main/evals?page=1",
        Fault::Respond(200, "application/json", body),
    );
    let run = world.pass(&["--wait-for-jobset", "--dry-run"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout
            .contains(&format!("would deploy build {id} {OUT}")),
        "{run:?}"
    );
}
