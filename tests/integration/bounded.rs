//! Every command hail runs is bounded: in time (its whole process group is
//! ended at its deadline, and nothing of it is left behind) and in what hail
//! keeps of its output (a few KiB quoted, however much it wrote).

use serde_json::Value;

use crate::common::hydra::Fault;
use crate::common::{World, assert_exit};

/// Quoted output must stay this small in the state file and `hail status`.
const SMALL: usize = 16 * 1024;

/// A world where build `a` is deployed.
fn deployed_a() -> (World, String) {
    let world = World::new();
    let (_, a) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    (world, a)
}

/// Shell that records its own PID and starts a child that ignores SIGTERM
/// (only SIGKILL ends it), recording its PID too, in the file `pids`.
fn stubborn_group(pids: &std::path::Path) -> String {
    format!(
        "echo $$ >> '{0}'\n(trap '' TERM; exec sleep 1000) &\necho $! >> '{0}'\n",
        pids.display()
    )
}

/// Whether every process listed in `pids` is gone: ended (a zombie not yet
/// reaped counts as ended) or never started. Waits a little for the kernel
/// to finish the ones that were sent SIGKILL.
fn all_gone(pids: &std::path::Path) -> bool {
    let pids = std::fs::read_to_string(pids).expect("the script recorded its PIDs");
    assert!(!pids.trim().is_empty(), "no PIDs recorded");
    let gone = |pid: &str| match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    };
    (0..100).any(|_| {
        let all = pids.split_whitespace().all(gone);
        if !all {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        all
    })
}

#[test]
fn megabytes_of_activate_stderr_are_quoted_in_a_few_kib() {
    let (world, _) = deployed_a();
    let noisy = "head -c 5000000 /dev/zero | tr '\\0' x >&2\n\
                 echo >&2\n\
                 for i in $(seq 1 40); do echo \"line $i\" >&2; done\n\
                 head -c 100000 /dev/zero | tr '\\0' y >&2\n\
                 echo >&2\n\
                 echo 'the last words' >&2\n\
                 exit 1";
    let (id, _) = world.publish_with("b", noisy);
    let run = world.pass(&[]);
    assert_exit(&run, 3);

    let state_file = std::fs::read(world.state_dir().join("web.json")).unwrap();
    assert!(
        state_file.len() < SMALL,
        "state file is {} bytes",
        state_file.len()
    );
    let mut status = world.bare_hail();
    status
        .args(["status", "--json", "--state-dir"])
        .arg(world.state_dir());
    let status = world.run(status);
    assert_exit(&status, 0);
    assert!(
        status.stdout.len() < SMALL,
        "hail status --json is {} bytes",
        status.stdout.len()
    );

    let state: Value = serde_json::from_slice(&state_file).unwrap();
    assert_eq!(state["failed"]["build_id"], id);
    let message = state["last_error"]["message"].as_str().unwrap();
    // The last lines, in order, the long one cut to a few hundred bytes.
    let quoted: Vec<&str> = message
        .lines()
        .skip_while(|l| !l.contains("last lines of its stderr"))
        .skip(1)
        .collect();
    assert_eq!(quoted.first(), Some(&"line 23"), "{message}");
    assert_eq!(quoted.get(17), Some(&"line 40"), "{message}");
    let long = quoted.get(18).copied().unwrap_or_default();
    assert!(
        long.starts_with("yyyy") && long.ends_with("bytes cut]") && long.len() < 500,
        "{long}"
    );
    assert_eq!(quoted.get(19), Some(&"the last words"), "{message}");
    assert_eq!(quoted.len(), 20, "{message}");
}

#[test]
fn a_megabyte_hydra_error_is_quoted_in_a_few_hundred_bytes() {
    let (world, _) = deployed_a();
    world.publish("b");
    let said = format!("Hydra broke\n{}", "z".repeat(1_000_000));
    let body = serde_json::json!({ "error": said })
        .to_string()
        .into_bytes();
    world
        .hydra
        .fault("/latest", Fault::Respond(500, "application/json", body));
    let run = world.pass(&[]);
    assert_exit(&run, 1);
    assert!(
        run.stderr.len() < SMALL,
        "stderr is {} bytes",
        run.stderr.len()
    );
    assert!(
        run.error().contains("500 Internal Server Error for ")
            && run.error().contains(": Hydra broke zzz"),
        "{}",
        &run.stderr[..run.stderr.len().min(2000)]
    );
    let state_file = std::fs::read(world.state_dir().join("web.json")).unwrap();
    assert!(
        state_file.len() < SMALL,
        "state file is {} bytes",
        state_file.len()
    );
    let table = world.status_table();
    assert!(table.len() < SMALL, "hail status is {} bytes", table.len());
}

#[test]
fn stuck_nix_env_is_ended_at_nix_timeout() {
    let (world, a) = deployed_a();
    let (_, b) = world.publish("b");
    let stuck = world.path("stuck-bin");
    std::fs::create_dir(&stuck).unwrap();
    let pids = world.path("nix-env.pids");
    let script = format!(
        "#!/bin/sh\n{}echo 'copying path from the binary cache, forever' >&2\nwait\n",
        stubborn_group(&pids)
    );
    let nix_env = stuck.join("nix-env");
    std::fs::write(&nix_env, script).unwrap();
    std::fs::set_permissions(
        &nix_env,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = std::env::join_paths(
        std::iter::once(stuck.clone())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap())),
    )
    .unwrap();

    let mut cmd = world.hail();
    cmd.env("PATH", path).args(["--nix-timeout", "1"]);
    let run = world.run(cmd);
    assert_exit(&run, 1);
    let error = run.error();
    assert!(error.contains("nix-env --profile"), "{run:?}");
    assert!(error.contains("timed out after 1 s"), "{run:?}");
    assert!(error.contains("raise --nix-timeout"), "{run:?}");
    assert!(error.contains("forever"), "stderr not quoted\n{run:?}");
    // Echoed as it came, besides quoted in the error.
    assert!(run.stderr.matches("forever").count() >= 2, "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(world.generations(), [1]);
    assert!(
        all_gone(&pids),
        "a process of nix-env's group was left behind"
    );

    // The lock was released with the pass: the next one deploys.
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
}

#[test]
fn hanging_health_check_is_ended_at_the_health_timeout() {
    let world = World::new();
    let profile = world.path("service-profile");
    let bin = profile.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let pids = world.path("health-check.pids");
    let check = bin.join("health-check");
    std::fs::write(
        &check,
        format!(
            "#!/bin/sh\n{}echo 'still waiting for port 8080' >&2\nwait\n",
            stubborn_group(&pids)
        ),
    )
    .unwrap();
    std::fs::set_permissions(&check, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let mut cmd = world.bare_hail();
    cmd.args(["service", "activate", "--name", "web", "--unit-dir"])
        .arg(world.path("units"))
        .args(["--health-timeout", "1"])
        .arg(&profile);
    let run = world.run(cmd);
    assert_exit(&run, 1);
    assert!(
        run.stderr
            .contains("the health check did not pass within 1 s"),
        "{run:?}"
    );
    assert!(run.stderr.contains("timed out after"), "{run:?}");
    assert!(run.stderr.contains("raise --health-timeout"), "{run:?}");
    assert!(
        run.stderr.contains("still waiting for port 8080"),
        "{run:?}"
    );
    assert!(
        all_gone(&pids),
        "a process of the health check's group was left behind"
    );
}
