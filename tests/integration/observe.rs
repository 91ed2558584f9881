//! What an operator sees: `hail status`, journal fields, metrics; and which
//! build hail picks (`--output`, `--system`, `--latest-finished`,
//! `--wait-for-jobset`, `--min-build-age`), and generation pruning.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::hydra::{Fault, build_object};
use crate::common::{JOB, World, assert_exit, recording_activate};

#[test]
fn status_for_people_and_for_scripts() {
    let world = World::new();
    let run = world.status(&[]);
    assert_exit(&run, 0);
    assert!(run.stdout.contains("no profiles"), "{run:?}");

    let (_, a) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let (id_b, _) = world.publish_with("b", "echo 'b: config invalid' >&2; exit 1");
    assert_exit(&world.pass(&[]), 3);

    let run = world.status(&[]);
    assert_exit(&run, 0);
    eprintln!("hail status:\n{}", run.stdout);
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    assert!(
        lines[0].starts_with("PROFILE") && lines[0].contains("LAST CHECK"),
        "{run:?}"
    );
    assert!(lines[1].starts_with("web "), "{run:?}");
    assert!(lines[1].contains("build 1 (hail-test-a)"), "{run:?}");
    assert!(lines[1].contains("activation-failed"), "{run:?}");
    assert!(
        lines[1].contains(&format!("build {id_b} failed at")),
        "{run:?}"
    );

    let run = world.status(&["--json", "web"]);
    assert_exit(&run, 0);
    let doc: Value = serde_json::from_str(&run.stdout).expect("status --json is JSON");
    assert_eq!(doc["version"], 1);
    let web = &doc["profiles"]["web"];
    assert_eq!(web["deployed"]["build_id"], 1);
    assert_eq!(web["deployed"]["store_path"], a.as_str());
    assert_eq!(web["deployed"]["activation"], "done");
    assert_eq!(web["failed"]["build_id"], id_b);
    assert_eq!(web["last_check"]["result"], "activation-failed");
    assert_eq!(web["last_error"]["exit_status"], 3);
    assert_eq!(web["counters"]["rollbacks"], 1);
}

#[test]
fn status_answers_while_a_pass_holds_the_lock() {
    let world = World::new();
    // The pass holds the profile's lock until the test releases its activate.
    world.publish_with(
        "a",
        "while [ ! -e \"$(dirname \"$HAIL_TEST_RECORD\")/release\" ]; do sleep 0.05; done",
    );
    let mut pass = world.hail();
    pass.stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = pass.spawn().expect("start a pass");
    while !world.path("record").metadata().is_ok_and(|m| m.len() > 0) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // Were status to wait for the lock, it would wait forever (and the
    // bounded run would fail the test).
    let run = world.status(&["--json"]);
    assert_exit(&run, 0);
    assert!(child.try_wait().unwrap().is_none(), "the pass ended early");
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(doc["profiles"]["web"]["deployed"]["activation"], "pending");
    std::fs::write(world.path("release"), "").unwrap();
    assert!(child.wait().unwrap().success());
}

/// Parses Prometheus text for `profile`: every sample's family must be
/// declared with HELP and TYPE first, values must be numbers; returns
/// `name{labels}` → value.
pub fn parse_prometheus(text: &str, profile: &str) -> BTreeMap<String, f64> {
    let mut declared = BTreeMap::new();
    let mut samples = BTreeMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["gauge", "counter"].contains(&kind), "{line}");
            assert!(
                declared.insert(name.to_owned(), kind.to_owned()).is_none(),
                "family declared twice: {line}"
            );
        } else if line.starts_with("# HELP ") {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').expect("sample line");
            let name = series.split('{').next().unwrap();
            assert!(
                declared.contains_key(name),
                "sample before its TYPE: {line}"
            );
            assert!(
                series.ends_with('}') && series.contains(&format!("profile=\"{profile}\"")),
                "{line}"
            );
            if declared[name] == "counter" {
                assert!(name.ends_with("_total"), "{line}");
            }
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {line}"));
            assert!(
                samples.insert(series.to_owned(), value).is_none(),
                "duplicate series: {line}"
            );
        }
    }
    samples
}

#[test]
fn metrics_file_is_valid_prometheus_text() {
    let world = World::new();
    let metrics = world.path("metrics/hail-web.prom");
    let metrics_arg = metrics.to_str().unwrap().to_owned();
    world.publish("a");
    assert_exit(&world.pass(&["--metrics-file", &metrics_arg]), 0);
    let samples = parse_prometheus(&std::fs::read_to_string(&metrics).unwrap(), "web");
    assert_eq!(samples["hail_deployed_build_id{profile=\"web\"}"], 1.0);
    assert_eq!(samples["hail_up_to_date{profile=\"web\"}"], 1.0);
    assert_eq!(samples["hail_deploys_total{profile=\"web\"}"], 1.0);
    assert!(samples["hail_last_success_timestamp_seconds{profile=\"web\"}"] > 1.7e9);

    world.publish_with("b", "exit 1");
    assert_exit(&world.pass(&["--metrics-file", &metrics_arg]), 3);
    world.hydra.fault(
        "/latest",
        Fault::Respond(502, "text/html", b"<html>502</html>".to_vec()),
    );
    assert_exit(&world.pass(&["--metrics-file", &metrics_arg]), 1);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let samples = parse_prometheus(&text, "web");
    assert_eq!(samples["hail_up_to_date{profile=\"web\"}"], 0.0);
    assert_eq!(samples["hail_failed_build_id{profile=\"web\"}"], 2.0);
    assert_eq!(samples["hail_rollbacks_total{profile=\"web\"}"], 1.0);
    assert_eq!(
        samples["hail_errors_total{profile=\"web\",kind=\"activation\"}"],
        1.0
    );
    assert_eq!(
        samples["hail_errors_total{profile=\"web\",kind=\"hydra\"}"],
        1.0
    );
    assert_eq!(samples["hail_deployed_build_id{profile=\"web\"}"], 1.0);

    // Prometheus's own linter, where Debian's prometheus package is installed.
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&metrics).unwrap())
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(err) => {
            // tests/run installs it; only a developer's machine may skip.
            assert!(
                std::env::var_os("CI").is_none(),
                "promtool is missing in CI ({err}): apt-get install prometheus"
            );
            eprintln!(
                "SKIP promtool check metrics: promtool not installed (apt-get install prometheus)"
            );
        }
    }
}

/// Reads one datagram in the journal's native protocol into fields.
fn journal_fields(datagram: &[u8]) -> BTreeMap<String, String> {
    let mut fields = BTreeMap::new();
    let mut rest = datagram;
    while !rest.is_empty() {
        let line_end = rest.iter().position(|b| *b == b'\n').unwrap_or(rest.len());
        let line = &rest[..line_end];
        if let Some(eq) = line.iter().position(|b| *b == b'=') {
            fields.insert(
                String::from_utf8_lossy(&line[..eq]).into_owned(),
                String::from_utf8_lossy(&line[eq + 1..]).into_owned(),
            );
            rest = &rest[(line_end + 1).min(rest.len())..];
        } else {
            // NAME\n, 64-bit little-endian length, value, \n
            let name = String::from_utf8_lossy(line).into_owned();
            let after = &rest[line_end + 1..];
            let len = u64::from_le_bytes(after[..8].try_into().unwrap()) as usize;
            fields.insert(
                name,
                String::from_utf8_lossy(&after[8..8 + len]).into_owned(),
            );
            rest = &after[(8 + len + 1).min(after.len())..];
        }
    }
    fields
}

/// Runs hail as if its stderr were connected to the journal, with the
/// journal's socket replaced (in a private mount namespace) by one the test
/// reads; returns every record hail sent.
fn pass_into_journal(world: &World) -> (i32, Vec<BTreeMap<String, String>>) {
    let dir = tempfile::tempdir().unwrap();
    let socket = UnixDatagram::bind(dir.path().join("socket")).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stderr_file = std::fs::File::create(dir.path().join("stderr")).unwrap();
    let meta = stderr_file.metadata().unwrap();
    let mut cmd = crate::common::in_mount_namespace(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && mount --bind \"$0\" /run/systemd/journal && exec \"$@\"",
        dir.path().as_os_str(),
        &[],
        &world.hail(),
    );
    cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .stderr(stderr_file);
    let status = cmd.status().expect("run hail");
    let mut records = Vec::new();
    let mut buf = vec![0; 65536];
    while let Ok(n) = socket.recv(&mut buf) {
        // The logger probes the socket with an empty datagram first.
        if n > 0 {
            records.push(journal_fields(&buf[..n]));
        }
    }
    let stderr = std::fs::read_to_string(dir.path().join("stderr")).unwrap();
    assert!(
        !stderr.contains("hail[web]"),
        "logged to stderr instead of the journal: {stderr}"
    );
    (status.code().unwrap_or(-1), records)
}

fn records_with<'a>(
    records: &'a [BTreeMap<String, String>],
    message_id: &str,
) -> Vec<&'a BTreeMap<String, String>> {
    records
        .iter()
        .filter(|r| r.get("MESSAGE_ID").map(String::as_str) == Some(message_id))
        .collect()
}

#[test]
fn journal_records_carry_fields_and_message_ids() {
    let world = World::new();
    let (id, a) = world.publish("a");
    let job = world.hydra.job_uri(JOB);
    let (code, records) = pass_into_journal(&world);
    assert_eq!(code, 0);
    assert!(!records.is_empty(), "nothing reached the journal socket");
    for record in &records {
        assert_eq!(
            record.get("HAIL_PROFILE").map(String::as_str),
            Some("web"),
            "{record:?}"
        );
        assert_eq!(record["HAIL_JOB_URI"], job, "{record:?}");
        assert_eq!(record["SYSLOG_IDENTIFIER"], "hail", "{record:?}");
    }
    let deployed = records
        .iter()
        .find(|r| {
            r.get("MESSAGE_ID").map(String::as_str) == Some("251f8a6c551b4b19b4be55e60031ffc1")
        })
        .expect("a 'deployed' record");
    assert_eq!(deployed["HAIL_BUILD_ID"], id.to_string());
    assert_eq!(deployed["HAIL_STORE_PATH"], a);
    assert_eq!(deployed["PRIORITY"], "5"); // systemd-journal-logger maps info to notice

    let (code, records) = pass_into_journal(&world);
    assert_eq!(code, 0);
    assert!(
        records
            .iter()
            .any(|r| r.get("MESSAGE_ID").map(String::as_str)
                == Some("46bbe7bae8fb484ab2b15bf5fc5c4cc1")),
        "no 'up to date' record: {records:?}"
    );

    // Every record about a build carries its id and store path: deploying,
    // deployed, and for a failed one, the failure, the rollback and the error.
    let deploying = records_with(&records, "657c27ae229f4b18a640c11d7ba911db");
    assert!(
        deploying.is_empty(),
        "an up-to-date pass deployed: {deploying:?}"
    );
    let (id_b, b) = world.publish_with("b", "echo broken >&2; exit 1");
    let (code, records) = pass_into_journal(&world);
    assert_eq!(code, 3);
    for message_id in [
        "657c27ae229f4b18a640c11d7ba911db", // deploying
        "3ae9cc2b13824065822447e427e83f74", // activation failed
        "896b2940203e46dcbc031352a55f528d", // rolled back
        "882b1e906bcc447aa9697b1e6b85d52d", // the pass's error
    ] {
        let about = records_with(&records, message_id);
        assert!(!about.is_empty(), "no {message_id} record: {records:?}");
        for record in about {
            assert_eq!(record["HAIL_BUILD_ID"], id_b.to_string(), "{record:?}");
            assert_eq!(record["HAIL_STORE_PATH"], b, "{record:?}");
        }
    }

    world
        .hydra
        .fault("/latest", Fault::Respond(502, "text/html", Vec::new()));
    let (code, records) = pass_into_journal(&world);
    assert_eq!(code, 1);
    let error = records
        .iter()
        .find(|r| {
            r.get("MESSAGE_ID").map(String::as_str) == Some("882b1e906bcc447aa9697b1e6b85d52d")
        })
        .expect("an 'error' record");
    assert_eq!(error["PRIORITY"], "3");
    assert!(error["MESSAGE"].contains("502"), "{error:?}");
}

#[test]
fn output_selects_another_output() {
    let world = World::new();
    let out = world.cache.build("out", &recording_activate("out", ""));
    let bin = world.cache.build("bin", &recording_activate("bin", ""));
    world.cache.publish(&bin);
    let id = world.hydra.add_build(JOB, &out, Some(0));
    let mut build = build_object(id, JOB, &out, Some(0));
    build["buildoutputs"]["bin"] = serde_json::json!({ "path": bin });
    world.hydra.set_build_json(id, build);
    let run = world.pass(&["--output", "bin"]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(bin.as_str()));
    let run = world.pass(&["--output", "doc"]);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("no output \"doc\""), "{run:?}");
}

#[test]
fn system_picks_latest_for() {
    let world = World::new();
    let x86 = world.cache.build("x86", &recording_activate("x86", ""));
    world.cache.publish(&x86);
    let x86_id = world
        .hydra
        .add_build_in(JOB, "x86_64-linux", &x86, Some(0), Some(1));
    let arm_id = world.hydra.add_build_in(
        JOB,
        "aarch64-linux",
        "/nix/store/dddddddddddddddddddddddddddddddd-arm",
        Some(0),
        Some(1),
    );
    // Without --system the highest id wins, whatever its system.
    let run = world.pass(&["--dry-run"]);
    assert!(
        run.stdout
            .contains(&format!("would deploy build {arm_id} ")),
        "{run:?}"
    );
    let run = world.pass(&["--system", "x86_64-linux"]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(x86.as_str()));
    assert!(
        world
            .hydra
            .api_requests()
            .iter()
            .any(|r| r.path.ends_with("/latest-for/x86_64-linux"))
    );
    assert!(world.activations()[0].contains(&format!("build={x86_id} ")));
    let run = world.pass(&["--system", "riscv64-linux"]);
    assert_exit(&run, 1);
    assert!(
        run.stderr
            .contains("no successful build for platform `riscv64-linux'"),
        "{run:?}"
    );
}

/// A deployable build of JOB in evaluation `eval`: built, published signed,
/// and successful on Hydra.
fn publish_in_eval(world: &World, label: &str, eval: u64) -> (u64, String) {
    let path = world.cache.build(label, &recording_activate(label, ""));
    world.cache.publish(&path);
    let id = world
        .hydra
        .add_build_in(JOB, "x86_64-linux", &path, Some(0), Some(eval));
    (id, path)
}

/// A build of another job of the jobset in evaluation `eval` (queued if
/// `status` is `None`).
fn other_job_in_eval(world: &World, status: Option<i64>, eval: u64) -> u64 {
    let path = "/nix/store/dddddddddddddddddddddddddddddddd-other";
    world
        .hydra
        .add_build_in("other", "x86_64-linux", path, status, Some(eval))
}

#[test]
fn latest_finished_skips_evaluations_still_building() {
    let world = World::new();
    let (id_a, a) = publish_in_eval(&world, "a", 1);
    let (id_b, b) = publish_in_eval(&world, "b", 2);
    let other = other_job_in_eval(&world, None, 2);
    let run = world.pass(&["--latest-finished"]);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(a.as_str()),
        "{run:?}"
    );
    assert!(world.activations()[0].contains(&format!("build={id_a} ")));
    world.hydra.finish_build(other, 1);
    // Finished, even though failed: latest-finished only waits for the queue.
    assert_exit(&world.pass(&["--latest-finished"]), 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    assert!(world.activations()[1].contains(&format!("build={id_b} ")));
}

#[test]
fn wait_for_jobset_deploys_only_fully_successful_evaluations() {
    let world = World::new();
    let (_, a) = publish_in_eval(&world, "a", 1);
    other_job_in_eval(&world, Some(0), 1);
    publish_in_eval(&world, "b", 2);
    let broken = other_job_in_eval(&world, None, 2);

    // Evaluation 2 is still building: deploy a from evaluation 1.
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(a.as_str()),
        "{run:?}"
    );
    assert!(
        run.stderr.contains("evaluation 2 has 1 unfinished builds"),
        "{run:?}"
    );
    // It fails: still a.
    world.hydra.finish_build(broken, 1);
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(a.as_str()),
        "{run:?}"
    );
    // A fully green evaluation 3 deploys.
    let (_, c) = publish_in_eval(&world, "c", 3);
    other_job_in_eval(&world, Some(0), 3);
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(c.as_str()),
        "{run:?}"
    );
    let api: Vec<String> = world
        .hydra
        .api_requests()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert!(
        api.iter().any(|p| p == "/jobset/hail/main/evals?page=1"),
        "{api:?}"
    );
    assert!(api.iter().any(|p| p == "/eval/3/builds"), "{api:?}");
}

#[test]
fn wait_for_jobset_deploys_an_evaluation_mended_by_a_restart() {
    let world = World::new();
    let (_, a) = publish_in_eval(&world, "a", 1);
    other_job_in_eval(&world, Some(0), 1);
    let (_, b) = publish_in_eval(&world, "b", 2);
    let broken = other_job_in_eval(&world, Some(1), 2);
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert!(
        run.stderr.contains("evaluation 2 has 1 failed builds"),
        "{run:?}"
    );

    // Someone restarts the failed build in Hydra and it succeeds; Hydra's
    // newest finished evaluation is evaluation 2 throughout.
    world.hydra.finish_build(broken, 0);
    // Within the hour hail trusts its verdict: one request, still a.
    let asked = world.hydra.api_requests().len();
    assert_exit(&world.pass(&["--wait-for-jobset"]), 0);
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(world.hydra.api_requests().len(), asked + 1);

    // An hour later (the verdict's time, moved back in the state file),
    // evaluation 2 is read again, and b deploys.
    let file = world.state_dir().join("web.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let memo = &mut state["evaluations"];
    let judged = memo["verdicts"]["2"]["failed"]["at"].as_u64().unwrap();
    memo["verdicts"]["2"]["failed"]["at"] = (judged - 3601).into();
    memo["rejudge_at"] = (judged - 1).into();
    std::fs::write(&file, state.to_string()).unwrap();
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(b.as_str()),
        "{run:?}"
    );
}

/// A build of the gate job `tested` in evaluation `eval`, `status` 0 or failed.
fn gate_in_eval(world: &World, status: i64, eval: u64) -> u64 {
    let path = "/nix/store/tttttttttttttttttttttttttttttttt-tested";
    world
        .hydra
        .add_build_in("tested", "x86_64-linux", path, Some(status), Some(eval))
}

#[test]
fn gate_job_deploys_from_the_gates_evaluation_in_small_requests() {
    let world = World::new();
    let (_, a) = publish_in_eval(&world, "a", 1);
    let gate_1 = gate_in_eval(&world, 0, 1);
    publish_in_eval(&world, "b", 2);
    gate_in_eval(&world, 1, 2);
    let gated = ["--gate-job", "tested"];

    // The gate failed in evaluation 2: a, from evaluation 1.
    let run = world.pass(&gated);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(a.as_str()),
        "{run:?}"
    );
    let api = |skip: usize| -> Vec<String> {
        world.hydra.api_requests()[skip..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    };
    assert_eq!(
        api(0)[..3],
        [
            "HEAD /job/hail/main/tested/latest".to_owned(),
            format!("GET /build/{gate_1}"),
            format!("HEAD /eval/1/job/{JOB}"),
        ]
    );

    // Nothing new: one small request.
    let asked = world.hydra.api_requests().len();
    let run = world.pass(&gated);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("up to date"), "{run:?}");
    assert_eq!(api(asked), ["HEAD /job/hail/main/tested/latest"]);

    // The gate succeeds in evaluation 3: c deploys.
    let (id_c, c) = publish_in_eval(&world, "c", 3);
    gate_in_eval(&world, 0, 3);
    let run = world.pass(&gated);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(c.as_str()),
        "{run:?}"
    );
    assert!(world.activations()[1].contains(&format!("build={id_c} ")));

    // A gate whose evaluation has no build of the job: said, nothing changed.
    gate_in_eval(&world, 0, 4);
    let run = world.pass(&gated);
    assert_exit(&run, 1);
    assert!(
        run.error()
            .contains(&format!("is {JOB} one of its constituents?")),
        "{run:?}"
    );
    assert_eq!(world.profile_target().as_deref(), Some(c.as_str()));

    // One selection at a time, and a job name.
    for extra in [
        &["--gate-job", "tested", "--system", "x86_64-linux"][..],
        &["--gate-job", "tested", "--wait-for-jobset"],
        &["--gate-job", "a/b"],
    ] {
        assert_exit(&world.pass(extra), 2);
    }
}

#[test]
fn min_build_age_waits_then_deploys() {
    let world = World::new();
    let (_, a) = world.publish("a");
    assert_exit(&world.pass(&["--min-build-age", "1h"]), 0); // finished long ago
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    let (id_b, b) = world.publish("b");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    world.hydra.set_stoptime(id_b, now - 60);
    let run = world.pass(&["--min-build-age", "1h"]);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("eligible at"), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    let run = world.status(&[]);
    assert!(
        run.stdout.contains(&format!("build {id_b} eligible at")),
        "{run:?}"
    );
    // A canary host with no minimum deploys at once; the same host does once the build is old enough.
    world.hydra.set_stoptime(id_b, now - 7200);
    assert_exit(&world.pass(&["--min-build-age", "1h"]), 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
}

#[test]
fn keep_generations_prunes_old_ones() {
    let world = World::new();
    for label in ["a", "b", "c", "d"] {
        world.publish(label);
        assert_exit(&world.pass(&["--keep-generations", "2"]), 0);
    }
    assert_eq!(world.generations(), [3, 4]);
    let run = world.pass(&["--keep-generations", "0"]);
    assert_exit(&run, 2);
}

#[test]
fn wait_for_jobset_reads_no_evaluation_twice() {
    let world = World::new();
    let (_, a) = publish_in_eval(&world, "a", 1);
    other_job_in_eval(&world, Some(0), 1);
    publish_in_eval(&world, "b", 2);
    other_job_in_eval(&world, Some(1), 2);
    let paths_since = |from: usize| -> Vec<String> {
        world.hydra.api_requests()[from..]
            .iter()
            .map(|r| format!("{} {}", r.method, r.path))
            .collect()
    };

    // Evaluation 2 has a failed build: deploy a from evaluation 1.
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    let judged = world.hydra.api_requests().len();

    // Nothing new was evaluated: one small request, nothing read again.
    for extra in [&[][..], &["--dry-run"][..]] {
        let from = world.hydra.api_requests().len();
        let mut args = vec!["--wait-for-jobset"];
        args.extend(extra);
        let run = world.pass(&args);
        assert_exit(&run, 0);
        assert!(
            run.stderr.contains("up to date") || run.stdout.contains("up to date"),
            "{run:?}"
        );
        assert_eq!(
            paths_since(from),
            ["HEAD /jobset/hail/main/latest-eval"],
            "{extra:?}"
        );
    }
    assert!(judged > 1);

    // A new evaluation: only it is read, not evaluations 1 and 2 again. Its
    // job is built for two systems: without --system the highest id wins.
    let (_, c_x86) = publish_in_eval(&world, "c", 3);
    let c_arm = world.cache.build("c-arm", &recording_activate("c-arm", ""));
    world.cache.publish(&c_arm);
    world
        .hydra
        .add_build_in(JOB, "aarch64-linux", &c_arm, Some(0), Some(3));
    other_job_in_eval(&world, Some(0), 3);
    let from = world.hydra.api_requests().len();
    let run = world.pass(&["--wait-for-jobset"]);
    assert_exit(&run, 0);
    assert_eq!(
        world.profile_target().as_deref(),
        Some(c_arm.as_str()),
        "{run:?}"
    );
    assert_ne!(c_arm, c_x86);
    let read = paths_since(from);
    assert!(read.contains(&"GET /eval/3/builds".to_owned()), "{read:?}");
    assert!(
        !read
            .iter()
            .any(|r| r.contains("/eval/1/") || r.contains("/eval/2/")),
        "{read:?}"
    );
}
