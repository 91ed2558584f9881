//! The files hail (root) writes are never a way into the rest of the machine: a
//! symbolic link planted at the name of any of them — the lock, the state file,
//! the metrics file, a `.corrupt` copy, the units, env files, drop-ins and
//! manifests of `hail service`/`hail manager`, and the temporary names the
//! previous implementation used (`STEM.tmp.PID`, planted by a script hail runs,
//! which knows hail's pid as `$PPID`) — never makes hail create, truncate or
//! write the file it points to. Also: stale temporary files are removed, a
//! corrupt state file's copy never replaces an earlier one, and a state file
//! that is JSON but not a state document is set aside as corrupt.

use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{PROFILE, Run, World, assert_exit, exists, run_bounded};

/// A file outside the dirs hail writes, which a planted link points at: it
/// must never change, and if it did not exist, never appear.
struct Victim {
    path: PathBuf,
    content: Option<Vec<u8>>,
}

impl Victim {
    fn existing(dir: &Path, name: &str, content: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, content).unwrap();
        Self {
            path,
            content: Some(content.into()),
        }
    }

    fn missing(dir: &Path, name: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        Self {
            path: dir.join(name),
            content: None,
        }
    }

    /// Plants a symbolic link to this victim at `link`.
    fn plant_at(&self, link: &Path) {
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        let _ = std::fs::remove_file(link);
        symlink(&self.path, link).unwrap();
    }

    #[track_caller]
    fn assert_untouched(&self, run: &Run) {
        match &self.content {
            Some(content) => assert_eq!(
                std::fs::read(&self.path).ok().as_ref(),
                Some(content),
                "{} changed\n{run:?}",
                self.path.display()
            ),
            None => assert!(
                !exists(&self.path),
                "{} was created\n{run:?}",
                self.path.display()
            ),
        }
    }
}

/// `path` is a regular file (not a link) holding `expected` somewhere.
#[track_caller]
fn assert_regular_with(path: &Path, expected: &str, run: &Run) {
    let meta = path.symlink_metadata();
    assert!(
        meta.as_ref().is_ok_and(|m| m.file_type().is_file()),
        "{} is not a regular file ({meta:?})\n{run:?}",
        path.display()
    );
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.contains(expected),
        "{} lacks {expected:?}: {text}\n{run:?}",
        path.display()
    );
}

fn metrics_path(world: &World) -> PathBuf {
    world.path("metrics/hail-web.prom")
}

fn pass_with_metrics(world: &World) -> Run {
    let metrics = metrics_path(world);
    world.pass(&["--metrics-file", metrics.to_str().unwrap()])
}

fn write_script(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, format!("#!/bin/sh\nset -e\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn a_link_at_the_lock_is_refused() {
    let world = World::new();
    world.publish("a");
    let victims = world.path("victims");
    let lock = world.state_dir().join("web.lock");
    for victim in [
        Victim::existing(&victims, "passwd", "root:x:0:0\n"),
        Victim::missing(&victims, "new-file"),
    ] {
        victim.plant_at(&lock);
        let run = world.pass(&[]);
        assert_exit(&run, 1);
        assert!(
            run.stderr.contains(&format!(
                "cannot open lock file {}: it is a symbolic link, which hail does not follow; remove it",
                lock.display()
            )),
            "{run:?}"
        );
        victim.assert_untouched(&run);
        assert_eq!(world.profile_target(), None, "deployed anyway\n{run:?}");
    }
}

#[test]
fn links_at_the_state_and_metrics_files_are_replaced_not_followed() {
    let world = World::new();
    let (_, a) = world.publish("a");
    let victims = world.path("victims");
    let state = world.state_dir().join("web.json");
    // Another profile's state: following the link, hail would count from 41.
    let state_victim = Victim::existing(&victims, "api.json", r#"{"counters": {"deploys": 41}}"#);
    let metrics_victim = Victim::existing(&victims, "other.prom", "other_metric 1\n");
    state_victim.plant_at(&state);
    metrics_victim.plant_at(&metrics_path(&world));
    let run = pass_with_metrics(&world);
    assert_exit(&run, 0);
    assert!(
        run.stderr.contains(&format!(
            "cannot read state file {} (it is a symbolic link, which hail does not follow",
            state.display()
        )),
        "{run:?}"
    );
    state_victim.assert_untouched(&run);
    metrics_victim.assert_untouched(&run);
    assert_regular_with(&state, &a, &run);
    assert_eq!(world.state_of(PROFILE)["counters"]["deploys"], 1, "{run:?}");
    assert_regular_with(
        &metrics_path(&world),
        "hail_deploys_total{profile=\"web\"} 1",
        &run,
    );

    let state_victim = Victim::missing(&victims, "new-state");
    let metrics_victim = Victim::missing(&victims, "new-metrics");
    state_victim.plant_at(&state);
    metrics_victim.plant_at(&metrics_path(&world));
    let run = pass_with_metrics(&world);
    assert_exit(&run, 0);
    state_victim.assert_untouched(&run);
    metrics_victim.assert_untouched(&run);
    assert_regular_with(&state, &a, &run);
    assert_regular_with(
        &metrics_path(&world),
        "hail_up_to_date{profile=\"web\"} 1",
        &run,
    );
}

#[test]
fn links_at_temporary_names_are_never_written_through() {
    let world = World::new();
    // The previous implementation wrote `web.tmp.PID` for `web.json` and
    // `hail-web.tmp.PID` for `hail-web.prom`; activate knows hail's pid ($PPID) and
    // plants links there before the pass writes its final state.
    let (_, a) = world.publish_with(
        "a",
        r#"dir=$(dirname "$HAIL_TEST_RECORD")
ln -s "$dir/victims/passwd" "$dir/state/web.tmp.$PPID"
ln -s "$dir/victims/new-file" "$dir/metrics/hail-web.tmp.$PPID""#,
    );
    let victims = world.path("victims");
    let existing = Victim::existing(&victims, "passwd", "root:x:0:0\n");
    let missing = Victim::missing(&victims, "new-file");
    std::fs::create_dir_all(world.path("metrics")).unwrap();
    let run = pass_with_metrics(&world);
    assert_exit(&run, 0);
    existing.assert_untouched(&run);
    missing.assert_untouched(&run);
    assert_regular_with(&world.state_dir().join("web.json"), &a, &run);
    assert_eq!(world.state_of(PROFILE)["deployed"]["activation"], "done");
    assert_regular_with(&metrics_path(&world), "hail_deploys_total", &run);
}

#[test]
fn corrupt_copies_are_kept_not_clobbered() {
    let world = World::new();
    world.publish("a");
    let victims = world.path("victims");
    let state_dir = world.state_dir();
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::write(state_dir.join("web.json.corrupt"), "an earlier copy").unwrap();
    let victim = Victim::existing(&victims, "passwd", "root:x:0:0\n");
    victim.plant_at(&state_dir.join("web.json.corrupt.1"));
    std::fs::write(state_dir.join("web.json"), "{\"deployed\": tru").unwrap();
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    let kept = state_dir.join("web.json.corrupt.2");
    assert!(
        run.stderr
            .contains(&format!("(the old file is {})", kept.display())),
        "{run:?}"
    );
    assert_eq!(
        std::fs::read_to_string(state_dir.join("web.json.corrupt")).unwrap(),
        "an earlier copy"
    );
    victim.assert_untouched(&run);
    assert!(
        std::fs::symlink_metadata(state_dir.join("web.json.corrupt.1"))
            .unwrap()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_to_string(&kept).unwrap(),
        "{\"deployed\": tru"
    );
    assert_eq!(world.state_of(PROFILE)["deployed"]["activation"], "done");
}

#[test]
fn stale_temporary_files_are_removed() {
    let world = World::new();
    world.publish("a");
    let state_dir = world.state_dir();
    let metrics_dir = world.path("metrics");
    std::fs::create_dir_all(&state_dir).unwrap();
    std::fs::create_dir_all(&metrics_dir).unwrap();
    // Left by passes killed between creating a temporary file and renaming it.
    let stale = [
        state_dir.join(".web.json.tmp-Ab12Cd"),
        metrics_dir.join(".hail-web.prom.tmp-zz99YY"),
    ];
    for path in &stale {
        std::fs::write(path, "half a state").unwrap();
    }
    let victim = Victim::existing(&world.path("victims"), "passwd", "root:x:0:0\n");
    // Not hail's own temporaries of these files: another profile's, other
    // shapes, a link and a directory of the right shape.
    let others = [
        state_dir.join(".api.json.tmp-Ab12Cd"),
        state_dir.join(".web.json.tmp-Ab12Cde"),
        state_dir.join("web.json.tmp-Ab12Cd"),
        state_dir.join(".web.json.tmp-dir123"),
        state_dir.join(".web.json.tmp-link12"),
    ];
    std::fs::write(&others[0], "api's").unwrap();
    std::fs::write(&others[1], "longer").unwrap();
    std::fs::write(&others[2], "no dot").unwrap();
    std::fs::create_dir(&others[3]).unwrap();
    victim.plant_at(&others[4]);

    let run = pass_with_metrics(&world);
    assert_exit(&run, 0);
    for path in &stale {
        assert!(!exists(path), "{} is still there\n{run:?}", path.display());
    }
    for path in &others {
        assert!(exists(path), "{} was removed\n{run:?}", path.display());
    }
    victim.assert_untouched(&run);
}

#[test]
fn state_that_is_json_but_not_a_state_is_set_aside() {
    let world = World::new();
    world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let state = world.state_dir().join("web.json");
    let aside = world.state_dir().join("web.json.corrupt");
    for text in [
        "[]",
        "3",
        "\"x\"",
        "null",
        r#"{"counters": []}"#,
        r#"{"deployed": "x"}"#,
    ] {
        std::fs::write(&state, text).unwrap();
        // Reading only: reported, left where it is.
        let mut status = world.bare_hail();
        status
            .arg("status")
            .arg("--state-dir")
            .arg(world.state_dir());
        let run = world.run(status);
        assert_exit(&run, 0);
        assert!(run.stderr.contains("is corrupt"), "{text}: {run:?}");
        assert_eq!(std::fs::read_to_string(&state).unwrap(), text);
        assert!(!exists(&aside), "{text}: status set it aside");

        let run = world.pass(&[]);
        assert_exit(&run, 0);
        assert!(run.stderr.contains("is corrupt"), "{text}: {run:?}");
        assert_eq!(std::fs::read_to_string(&aside).unwrap(), text, "{run:?}");
        assert_eq!(world.state_of(PROFILE)["deployed"]["activation"], "done");
        std::fs::remove_file(&aside).unwrap();
    }
}

#[test]
fn counters_at_their_limit_stay_there() {
    let world = World::new();
    world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let state = world.state_dir().join("web.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    doc["counters"] = serde_json::json!({
        "deploys": u64::MAX, "rollbacks": u64::MAX, "errors": {"hydra": u64::MAX}
    });
    std::fs::write(&state, doc.to_string()).unwrap();

    // An error and a deploy count one more each: no overflow, no panic.
    let broken = world.hail_with_job(&format!("{}/job/hail/nosuch/web", world.hydra.origin()));
    assert_exit(&world.run(broken), 1);
    world.publish("b");
    assert_exit(&world.pass(&[]), 0);
    let counters = &world.state_of(PROFILE)["counters"];
    assert_eq!(counters["deploys"], u64::MAX);
    assert_eq!(counters["errors"]["hydra"], u64::MAX);
    assert_eq!(counters["rollbacks"], u64::MAX);
}

/// A `systemctl` stand-in first on PATH that records its arguments.
fn systemctl_stub(dir: &Path) -> (String, PathBuf) {
    let record = dir.join("systemctl.log");
    write_script(
        &dir.join("bin/systemctl"),
        &format!("echo \"$*\" >> '{}'", record.display()),
    );
    let path = format!(
        "{}:{}",
        dir.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    (path, record)
}

fn hail_with_path(path: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hail"));
    cmd.env("PATH", path);
    cmd
}

#[test]
fn service_activate_never_writes_through_links() {
    let tmp = tempfile::Builder::new()
        .prefix("hail-files-test-")
        .tempdir()
        .unwrap();
    let dir = tmp.path();
    let (path, record) = systemctl_stub(dir);
    let units = dir.join("units");
    let victims = dir.join("victims");
    let profile = dir.join("profile");
    std::fs::create_dir_all(profile.join("lib/systemd/system")).unwrap();
    std::fs::write(
        profile.join("lib/systemd/system/web.service"),
        "[Service]\nExecStart=/bin/true\n",
    )
    .unwrap();
    // The previous implementation's temporary names for the unit and for the
    // manifest and restart list; pre-switch runs just before they are written.
    write_script(
        &profile.join("bin/pre-switch"),
        &format!(
            "ln -s '{v}/unit-tmp' \"{u}/web.tmp.$PPID\"\nln -s '{v}/new-list' \"{u}/.hail-service-web.tmp.$PPID\"",
            v = victims.display(),
            u = units.display()
        ),
    );
    let unit_victim = Victim::existing(&victims, "unit", "[Service]\nExecStart=/victim\n");
    let tmp_victim = Victim::existing(&victims, "unit-tmp", "unit tmp victim\n");
    let list_victim = Victim::missing(&victims, "new-list");
    // Another service's manifest: following it, hail would take its units for
    // its own and stop and remove them as dropped.
    let manifest_victim = Victim::existing(&victims, "manifest", "other.service\n");
    let pending_victim = Victim::missing(&victims, "new-pending");
    unit_victim.plant_at(&units.join("web.service"));
    manifest_victim.plant_at(&units.join(".hail-service-web.units"));
    pending_victim.plant_at(&units.join(".hail-service-web.restart"));
    std::fs::write(units.join("other.service"), "[Service]\n").unwrap();

    let mut cmd = hail_with_path(&path);
    cmd.args(["service", "activate", "--name", "web", "--unit-dir"])
        .arg(&units)
        .arg(&profile);
    let run = run_bounded(cmd);
    assert_exit(&run, 0);
    for victim in [
        &unit_victim,
        &tmp_victim,
        &list_victim,
        &manifest_victim,
        &pending_victim,
    ] {
        victim.assert_untouched(&run);
    }
    assert_regular_with(&units.join("web.service"), "ExecStart=/bin/true", &run);
    assert_regular_with(&units.join(".hail-service-web.units"), "web.service", &run);
    assert!(exists(&units.join("other.service")), "{run:?}");
    let calls = crate::common::read_if_exists(&record).unwrap_or_default();
    assert!(!calls.contains("other.service"), "{calls}\n{run:?}");
    assert!(calls.contains("start web.service"), "{calls}\n{run:?}");
    assert!(
        run.stderr
            .contains("it is a symbolic link, which hail does not follow"),
        "{run:?}"
    );
}

struct ManagerDirs {
    _tmp: tempfile::TempDir,
    path: String,
    record: PathBuf,
    config: PathBuf,
    units: PathBuf,
    profiles: PathBuf,
    victims: PathBuf,
    instances: PathBuf,
}

impl ManagerDirs {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("hail-files-test-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().to_owned();
        let (path, record) = systemctl_stub(&dir);
        let instances = dir.join("instances.json");
        std::fs::write(
            &instances,
            r#"{"web": {"jobUri": "https://hydra.example.org/job/p/j/web", "pollPeriod": "1min"}}"#,
        )
        .unwrap();
        Self {
            _tmp: tmp,
            path,
            record,
            config: dir.join("config"),
            units: dir.join("units"),
            profiles: dir.join("profiles"),
            victims: dir.join("victims"),
            instances,
        }
    }

    fn dropin_dir(&self) -> PathBuf {
        self.units.join("hail@web.timer.d")
    }

    fn activate(&self) -> Run {
        let mut cmd = hail_with_path(&self.path);
        cmd.args(["manager", "activate", "--config-dir"])
            .arg(&self.config)
            .arg("--unit-dir")
            .arg(&self.units)
            .arg("--profiles-dir")
            .arg(&self.profiles)
            .arg(&self.instances);
        run_bounded(cmd)
    }

    fn calls(&self) -> String {
        crate::common::read_if_exists(&self.record).unwrap_or_default()
    }
}

#[test]
fn manager_activate_never_writes_through_links() {
    let m = ManagerDirs::new();
    // An instance the manager ran before and no longer lists: its deactivate
    // runs before the new files are written, and plants links at the names
    // the previous implementation used for their temporary files.
    std::fs::create_dir_all(&m.config).unwrap();
    std::fs::write(m.config.join(".hail-manager.instances"), "old\n").unwrap();
    std::fs::create_dir_all(m.dropin_dir()).unwrap();
    write_script(
        &m.profiles.join("old/bin/deactivate"),
        &format!(
            "ln -s '{v}/env-tmp' \"{c}/web.tmp.$PPID\"\n\
             ln -s '{v}/new-manifest' \"{c}/.hail-manager.tmp.$PPID\"\n\
             ln -s '{v}/dropin-tmp' \"{d}/hail-manager.tmp.$PPID\"",
            v = m.victims.display(),
            c = m.config.display(),
            d = m.dropin_dir().display()
        ),
    );
    let env_victim = Victim::existing(&m.victims, "env", "SECRET=1\n");
    let env_tmp_victim = Victim::existing(&m.victims, "env-tmp", "env tmp victim\n");
    let manifest_tmp_victim = Victim::missing(&m.victims, "new-manifest");
    let dropin_victim = Victim::missing(&m.victims, "new-dropin");
    let dropin_tmp_victim = Victim::existing(&m.victims, "dropin-tmp", "dropin tmp victim\n");
    env_victim.plant_at(&m.config.join("web.env"));
    dropin_victim.plant_at(&m.dropin_dir().join("hail-manager.conf"));

    let run = m.activate();
    assert_exit(&run, 0);
    for victim in [
        &env_victim,
        &env_tmp_victim,
        &manifest_tmp_victim,
        &dropin_victim,
        &dropin_tmp_victim,
    ] {
        victim.assert_untouched(&run);
    }
    assert_regular_with(
        &m.config.join("web.env"),
        "HAIL_JOB_URI=\"https://hydra.example.org/job/p/j/web\"",
        &run,
    );
    assert_regular_with(
        &m.dropin_dir().join("hail-manager.conf"),
        "OnUnitInactiveSec=1min",
        &run,
    );
    assert_regular_with(&m.config.join(".hail-manager.instances"), "web", &run);
    assert!(m.calls().contains("enable --now hail@web.timer"), "{run:?}");
}

#[test]
fn manager_activate_follows_no_link_at_its_manifest_or_drop_in_dir() {
    let m = ManagerDirs::new();
    // Following this manifest, hail would take "victim" for an instance it
    // set up, disable its units and remove its env file.
    let manifest_victim = Victim::existing(&m.victims, "instances", "victim\n");
    manifest_victim.plant_at(&m.config.join(".hail-manager.instances"));
    std::fs::write(m.config.join("victim.env"), "HAIL_PROFILE=victim\n").unwrap();
    // Through a linked drop-in dir, hail would write into another directory.
    let elsewhere = m.victims.join("cron.d");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::create_dir_all(&m.units).unwrap();
    symlink(&elsewhere, m.dropin_dir()).unwrap();

    let run = m.activate();
    assert_exit(&run, 1);
    assert!(
        run.stderr.contains(&format!(
            "{} is a symbolic link, not a directory hail made; remove it",
            m.dropin_dir().display()
        )),
        "{run:?}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0, "{run:?}");

    std::fs::remove_file(m.dropin_dir()).unwrap();
    let run = m.activate();
    assert_exit(&run, 0);
    assert!(
        run.stderr
            .contains("it is a symbolic link, which hail does not follow"),
        "{run:?}"
    );
    manifest_victim.assert_untouched(&run);
    assert!(exists(&m.config.join("victim.env")), "{run:?}");
    assert!(!m.calls().contains("victim"), "{}\n{run:?}", m.calls());
    assert_regular_with(&m.config.join(".hail-manager.instances"), "web", &run);
    assert_regular_with(
        &m.dropin_dir().join("hail-manager.conf"),
        "OnUnitInactiveSec=1min",
        &run,
    );
}
