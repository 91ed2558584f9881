//! Deployable profiles under real systemd (PID 1 in a container,
//! `common::container`): service profiles and manager profiles built by the
//! real `nix/lib` functions, and the blue-green example from
//! `examples/blue-green`, each built by real Nix in a chroot store (with
//! `common/stub-pkgs.nix` for nixpkgs' trivial builders), published to the
//! signed test cache, offered by the Hydra stand-in and deployed by real hail
//! passes (`systemctl start hail@…`) inside the container.
//!
//! The services are busybox `httpd`s and an nginx from the container's
//! Debian, on free ports of the loopback the container shares with the host:
//! the tests ask them over HTTP from here, as a client of the host would.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::container::Container;
use crate::common::{World, assert_exit};

/// `${hail}/bin/hail` in the profiles: where [`Container::with_hail`] puts the binary.
const HAIL_PREFIX: &str = "/usr/local";
const UNIT_DIR: &str = "/run/systemd/system";
/// Written by the service profiles' pre-switch step, one line per run.
const PRE_SWITCH_LOG: &str = "/var/lib/hail-test/pre-switch";
/// PATH for what the blue-green example runs, from the container's Debian.
const DEBIAN_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A Nix expression with `pkgs` (the stub builders) and `hailLib` (nix/lib with
/// the hail that `install` puts in the container) in scope.
fn nix_expr(body: &str) -> String {
    let repo = crate::units::repo();
    format!(
        "let pkgs = import {}/tests/integration/common/stub-pkgs.nix {{ }}; \
         hailLib = import {}/nix/lib {{ hail = \"{HAIL_PREFIX}\"; }}; in {body}",
        repo.display(),
        repo.display()
    )
}

/// Builds `body` (one derivation), publishes it signed and makes it the
/// latest successful build of `job`. Returns the build id and store path.
fn publish(world: &World, job: &str, body: &str) -> (u64, String) {
    let paths = world.cache.build_expr(&nix_expr(body));
    assert_eq!(paths.len(), 1, "{paths:?}");
    let path = paths[0].clone();
    world.cache.publish(&path);
    let id = world.hydra.add_build(job, &path, Some(0));
    (id, path)
}

/// A container with hail installed (see [`Container::with_hail`]) and the
/// directory the test profiles record into.
fn install(world: &World, instances: &[(&str, &str)]) -> Container {
    let container = Container::with_hail(world, instances);
    container.write("/var/lib/hail-test/.keep", "", 0o644);
    container
}

/// When the unit's current main process started, and its pid: equal before and
/// after means it was not restarted.
fn started(c: &Container, unit: &str) -> (String, String) {
    let at = c.show(unit, "ExecMainStartTimestampMonotonic");
    let pid = c.show(unit, "MainPID");
    assert!(
        at != "0" && !at.is_empty() && pid != "0",
        "{unit} is not running: {:?}",
        c.systemctl(&["status", unit])
    );
    (at, pid)
}

/// A pass of `instance`, which must succeed.
#[track_caller]
fn pass(c: &Container, instance: &str) {
    let unit = format!("hail@{instance}.service");
    let run = c.systemctl(&["start", &unit]);
    assert!(
        run.code == Some(0),
        "the pass failed: {run:?}\n{}",
        c.journal(&unit)
    );
}

/// A pass of `instance` that must fail (activation failed, rolled back).
#[track_caller]
fn failing_pass(c: &Container, instance: &str) -> String {
    let unit = format!("hail@{instance}.service");
    let run = c.systemctl(&["start", &unit]);
    let journal = c.journal(&unit);
    assert_ne!(run.code, Some(0), "the pass succeeded:\n{journal}");
    assert_eq!(c.show(&unit, "ExecMainStatus"), "3", "{journal}");
    journal
}

/// Runs the deployed profile's activate again, the way boot does.
#[track_caller]
fn reactivate(c: &Container, instance: &str) {
    let run = c.systemctl(&["restart", &format!("hail-activate@{instance}.service")]);
    assert_exit(&run, 0);
}

fn profile_target(c: &Container, profile: &str) -> String {
    c.exec(&[
        "readlink",
        "-f",
        &format!("/nix/var/nix/profiles/{profile}"),
    ])
    .out()
}

/// A file in the container, read in there (/run is the container's own tmpfs).
fn read(c: &Container, path: &str) -> Option<String> {
    let run = c.exec(&["cat", path]);
    (run.code == Some(0)).then_some(run.stdout)
}

/// `GET /` on 127.0.0.1:port over a new connection: the body, or why not.
fn get(port: u16) -> Result<String, String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))
        .and_then(|()| conn.set_write_timeout(Some(Duration::from_secs(5))))
        .map_err(|e| e.to_string())?;
    conn.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut response = String::new();
    conn.read_to_string(&mut response)
        .map_err(|e| format!("receive: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no complete answer: {response:?}"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200") {
        return Err(format!("{status}: {}", body.trim()));
    }
    Ok(body.trim().to_owned())
}

/// Waits until 127.0.0.1:port answers `want` (up to 10 s).
#[track_caller]
fn assert_answers(port: u16, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(port);
        if got.as_deref() == Ok(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "127.0.0.1:{port} answers {got:?}, not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits (up to 30 s) for `unit` to be active.
#[track_caller]
fn wait_for_active(c: &Container, unit: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.is_active(unit) != "active" {
        assert!(
            Instant::now() < deadline,
            "{unit} is not active: {:?}\n{}",
            c.systemctl(&["status", unit]),
            c.journal(unit)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[track_caller]
fn assert_refuses(port: u16) {
    let got = get(port);
    assert!(got.is_err(), "127.0.0.1:{port} still answers {got:?}");
}

/// A unit running busybox httpd on 127.0.0.1:port serving `body` (Nix text) as
/// its index; `www` overrides the served directory (a missing one breaks it).
fn httpd_unit(version: &str, port: u16, www: Option<&str>) -> String {
    let dir = www.map_or_else(
        || {
            format!(
                "${{pkgs.runCommand \"www-{version}\" {{ }} \"mkdir $out; echo {version} > $out/index.html\"}}"
            )
        },
        str::to_owned,
    );
    format!(
        "''\n[Unit]\nDescription=test httpd {version}\n[Service]\n\
         ExecStart=/bin/busybox httpd -f -p 127.0.0.1:{port} -h {dir}\n''"
    )
}

#[test]
fn service_profile_restarts_what_changed_and_rolls_back() {
    let begun = Instant::now();
    let world = World::new();
    let mut container = install(&world, &[("demo", "demo")]);
    container.boot();
    let (web, side) = (crate::common::free_port(), crate::common::free_port());
    assert_exit(
        &container.systemctl(&["enable", "hail-activate@demo.service"]),
        0,
    );
    let c = &container;

    // A service profile: two units, a pre-switch step and a health check.
    let profile = |version: &str, web_www: Option<&str>, with_side: bool, pre: &str| {
        let side_unit = if with_side {
            format!(
                "\"demo-side.service\" = {};",
                httpd_unit("side", side, None)
            )
        } else {
            String::new()
        };
        format!(
            "hailLib.mkServiceProfile {{ inherit pkgs; name = \"demo\"; \
             units = {{ \"demo-web.service\" = {}; {side_unit} }}; \
             preSwitch = \"{pre}\"; \
             healthCheck = \"busybox wget -q -O - http://127.0.0.1:{web}/ | grep -qx {version}\"; \
             healthTimeout = 3; }}",
            httpd_unit(version, web, web_www)
        )
    };
    let log_pre = |version: &str| format!("echo {version} >> {PRE_SWITCH_LOG}");

    // 1. First deploy: both units installed and running, the pre-switch step ran.
    let (_, v1) = publish(&world, "demo", &profile("v1", None, true, &log_pre("v1")));
    pass(c, "demo");
    assert_eq!(profile_target(c, "demo"), v1);
    assert_answers(web, "v1");
    assert_answers(side, "side");
    assert!(read(c, &format!("{UNIT_DIR}/demo-web.service")).is_some());
    assert_eq!(c.lines(PRE_SWITCH_LOG), ["v1"]);
    let web_v1 = started(c, "demo-web.service");
    let side_v1 = started(c, "demo-side.service");

    // 2. A second pass changes nothing (up to date); running activate again
    // (as boot does) restarts nothing.
    pass(c, "demo");
    reactivate(c, "demo");
    assert_eq!(started(c, "demo-web.service"), web_v1, "web restarted");
    assert_eq!(started(c, "demo-side.service"), side_v1, "side restarted");
    let journal = c.journal("hail-activation-demo.service");
    assert!(
        journal.contains("service demo: installed [], changed [], removed []"),
        "{journal}"
    );
    assert_eq!(c.lines(PRE_SWITCH_LOG), ["v1", "v1"]);

    // 3. A new build changing one unit restarts it, the other one stays up.
    let (_, v2) = publish(&world, "demo", &profile("v2", None, true, &log_pre("v2")));
    pass(c, "demo");
    assert_eq!(profile_target(c, "demo"), v2);
    assert_answers(web, "v2");
    let web_v2 = started(c, "demo-web.service");
    assert_ne!(web_v2, web_v1, "the changed unit was not restarted");
    assert_eq!(
        started(c, "demo-side.service"),
        side_v1,
        "the unchanged unit restarted"
    );

    // An activation interrupted after writing a changed unit but before
    // restarting it left a restart owed: the next activation pays it.
    let owed = format!("{UNIT_DIR}/.hail-service-demo.restart");
    let write_owed = c.exec(&["sh", "-c", &format!("echo demo-side.service > {owed}")]);
    assert_exit(&write_owed, 0);
    reactivate(c, "demo");
    assert_ne!(
        started(c, "demo-side.service"),
        side_v1,
        "the owed restart was not made"
    );
    assert_eq!(
        started(c, "demo-web.service"),
        web_v2,
        "web restarted without cause"
    );
    assert_eq!(read(c, &owed), None, "the owed restart stayed recorded");
    let side_v1 = started(c, "demo-side.service");

    // 4. A build whose new version fails its health check is rolled back, and
    // the previous version's activate puts the old unit back.
    let (id3, _) = publish(
        &world,
        "demo",
        &profile("v3", Some("/nonexistent-v3"), true, &log_pre("v3")),
    );
    let journal = failing_pass(c, "demo");
    assert!(
        journal.contains(&format!("build {id3}")) && journal.contains("health check"),
        "{journal}"
    );
    assert_eq!(profile_target(c, "demo"), v2);
    assert_answers(web, "v2");
    assert!(
        read(c, &format!("{UNIT_DIR}/demo-web.service")).is_some_and(|u| u.contains("www-v2")),
        "the old unit is not back"
    );
    assert_eq!(
        started(c, "demo-side.service"),
        side_v1,
        "the unchanged unit restarted"
    );
    assert_eq!(
        c.lines(PRE_SWITCH_LOG),
        ["v1", "v1", "v2", "v2", "v3", "v2"]
    );
    let web_back = started(c, "demo-web.service");

    // 5. A failing pre-switch step switches nothing.
    let (id4, _) = publish(&world, "demo", &profile("v4", None, true, "exit 1"));
    let journal = failing_pass(c, "demo");
    assert!(
        journal.contains(&format!("build {id4}")) && journal.contains("pre-switch"),
        "{journal}"
    );
    assert_eq!(profile_target(c, "demo"), v2);
    assert_answers(web, "v2");
    assert_eq!(started(c, "demo-web.service"), web_back, "web restarted");
    assert!(read(c, &format!("{UNIT_DIR}/demo-web.service")).is_some_and(|u| u.contains("www-v2")));

    // 6. A build without one of the units stops and removes it; the other is
    // the same as before and stays up.
    let (_, v5) = publish(&world, "demo", &profile("v2", None, false, &log_pre("v5")));
    pass(c, "demo");
    assert_eq!(profile_target(c, "demo"), v5);
    assert_eq!(c.is_active("demo-side.service"), "inactive");
    assert!(read(c, &format!("{UNIT_DIR}/demo-side.service")).is_none());
    assert_refuses(side);
    assert_eq!(started(c, "demo-web.service"), web_back, "web restarted");

    // 7. After a reboot (/run is empty), hail-activate@demo puts the units back.
    container.restart();
    let c = &container;
    assert_eq!(c.is_active("hail-activate@demo.service"), "active");
    assert_answers(web, "v2");
    assert_eq!(c.is_active("demo-web.service"), "active");

    // 8. bin/deactivate stops and removes what activate installed.
    let run = c.exec(&["/nix/var/nix/profiles/demo/bin/deactivate"]);
    assert_exit(&run, 0);
    assert_refuses(web);
    assert_eq!(c.is_active("demo-web.service"), "inactive");
    let left = c.exec(&["ls", "-A", UNIT_DIR]);
    assert!(
        !left.stdout.contains("demo-") && !left.stdout.contains(".hail-service-demo"),
        "left in {UNIT_DIR}: {left:?}"
    );

    eprintln!("service profile scenario took {:.1?}", begun.elapsed());
}

#[test]
fn manager_profile_adds_and_removes_instances() {
    let begun = Instant::now();
    let world = World::new();
    // Bootstrap, by hand: the manager's own instance.
    let mut container = install(&world, &[("manager", "manager")]);
    container.boot();
    let c = &container;
    let (web, api) = (crate::common::free_port(), crate::common::free_port());

    // The manager lists itself too, as README suggests, so that its own poll
    // period is managed (and its activation re-runs itself at once: see below).
    let manager = |names: &[&str]| {
        let instances: String = std::iter::once(&"manager")
            .chain(names)
            .map(|n| {
                format!(
                    "{n} = {{ jobUri = \"{}\"; pollPeriod = \"1min\"; \
                     environment.HAIL_TIMEOUT = \"30\"; }}; ",
                    world.hydra.job_uri(n)
                )
            })
            .collect();
        format!("hailLib.mkManagerProfile {{ inherit pkgs; instances = {{ {instances} }}; }}")
    };
    let service = |name: &str, port: u16| {
        format!(
            "hailLib.mkServiceProfile {{ inherit pkgs; name = \"{name}\"; \
             units.\"{name}-http.service\" = {}; }}",
            httpd_unit(name, port, None)
        )
    };

    // 1. The manager's first version sets up two instances.
    publish(&world, "manager", &manager(&["web", "api"]));
    pass(c, "manager");
    for name in ["web", "api"] {
        let env = c.read(&format!("/etc/hail/{name}.env")).unwrap_or_default();
        assert!(
            env.contains(&format!("HAIL_JOB_URI=\"{}\"", world.hydra.job_uri(name)))
                && env.contains("HAIL_TIMEOUT=\"30\""),
            "/etc/hail/{name}.env: {env:?}"
        );
        let timer = format!("hail@{name}.timer");
        assert_eq!(c.is_enabled(&timer), "enabled");
        assert_eq!(c.is_active(&timer), "active");
        let triggers = c.show(&timer, "TimersMonotonic");
        assert!(
            triggers.contains("OnUnitInactiveUSec=1min") && triggers.contains("OnBootUSec=1min"),
            "{timer}: {triggers}"
        );
        assert_eq!(
            c.is_enabled(&format!("hail-activate@{name}.service")),
            "enabled"
        );
    }

    // The manager's activate ran in its own transient unit, not in hail@manager.
    let activation = c.journal("hail-activation-manager.service");
    assert!(
        activation.contains("manager: instances [\"api\", \"manager\", \"web\"]"),
        "{activation}"
    );
    // New to the list, with a profile: the manager started its own boot unit,
    // which activated the manager again once this activation had finished.
    wait_for_active(c, "hail-activate@manager.service");

    // Their jobs deploy service profiles.
    publish(&world, "web", &service("web", web));
    publish(&world, "api", &service("api", api));
    pass(c, "web");
    pass(c, "api");
    assert_answers(web, "web");
    assert_answers(api, "api");
    let web_started = started(c, "web-http.service");

    // 2. Its next version drops api: api's service is deactivated, its timer
    // and boot unit are gone; web goes on untouched.
    publish(&world, "manager", &manager(&["web"]));
    pass(c, "manager");
    assert_refuses(api);
    assert_eq!(c.is_active("api-http.service"), "inactive");
    assert!(read(c, &format!("{UNIT_DIR}/api-http.service")).is_none());
    assert_eq!(c.is_active("hail@api.timer"), "inactive");
    assert_eq!(c.is_enabled("hail@api.timer"), "disabled");
    assert_eq!(c.is_enabled("hail-activate@api.service"), "disabled");
    assert!(c.read("/etc/hail/api.env").is_none());
    let timers = c.systemctl(&["list-timers", "--all", "--no-legend"]);
    assert!(!timers.stdout.contains("hail@api"), "{timers:?}");
    assert_eq!(c.is_active("hail@web.timer"), "active");
    assert_answers(web, "web");
    assert_eq!(started(c, "web-http.service"), web_started, "web restarted");

    // 3. Listed again, api comes back: its profile (deployed, deactivated when
    // it was dropped) is activated again, although its pass finds it up to date.
    publish(&world, "manager", &manager(&["web", "api"]));
    pass(c, "manager");
    assert_eq!(c.is_active("hail@api.timer"), "active");
    assert_answers(api, "api");
    pass(c, "api");
    assert_answers(api, "api");
    assert_eq!(started(c, "web-http.service"), web_started, "web restarted");

    eprintln!("manager scenario took {:.1?}", begun.elapsed());
}

/// Requests through the proxy, one connection each, as fast as it answers,
/// until stopped: every answer's body, or the error.
struct RequestLoop {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Result<String, String>>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RequestLoop {
    fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&results));
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let got = get(port);
                r.lock().expect("results").push(got);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Self {
            stop,
            results,
            thread: Some(thread),
        }
    }

    /// Stops after a last moment of traffic; returns what every request got.
    fn finish(mut self) -> Vec<Result<String, String>> {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            thread.join().expect("the request loop");
        }
        std::mem::take(&mut *self.results.lock().expect("results"))
    }
}

impl Drop for RequestLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// No request failed, and there were enough of them to mean something.
#[track_caller]
fn assert_all_served(results: &[Result<String, String>], what: &str) {
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: {failed:?}",
        failed.len(),
        results.len()
    );
    let v: std::collections::BTreeMap<&str, usize> =
        results
            .iter()
            .flatten()
            .fold(Default::default(), |mut counts, body| {
                *counts.entry(body.as_str()).or_default() += 1;
                counts
            });
    eprintln!("{what}: {} requests, all served: {v:?}", results.len());
    assert!(
        results.len() >= 20,
        "{what}: only {} requests were made",
        results.len()
    );
}

#[test]
fn blue_green_switches_without_dropping_a_request() {
    let begun = Instant::now();
    let world = World::new();
    let mut container = install(&world, &[("demo", "demo")]);
    container.boot();
    assert_exit(
        &container.systemctl(&["enable", "hail-activate@demo.service"]),
        0,
    );
    let c = &container;
    let (proxy, blue, green) = (
        crate::common::free_port(),
        crate::common::free_port(),
        crate::common::free_port(),
    );

    // The example, as a Hydra job would build it; the app is a busybox httpd
    // serving its version, which a broken version cannot serve.
    let example = |version: &str, broken: bool| {
        let www = if broken {
            "/nonexistent".to_owned()
        } else {
            format!(
                "${{pkgs.runCommand \"www-{version}\" {{ }} \"mkdir $out; echo {version} > $out/index.html\"}}"
            )
        };
        format!(
            "import {}/examples/blue-green {{ inherit pkgs; name = \"app\"; \
             serve = port: \"/bin/busybox httpd -f -p 127.0.0.1:${{toString port}} -h {www}\"; \
             healthCheck = port: \"busybox wget -q -O - http://127.0.0.1:${{toString port}}/ | grep -qx {version}\"; \
             ports = {{ proxy = {proxy}; blue = {blue}; green = {green}; }}; healthTimeout = 3; \
             nginx = \"/usr/sbin/nginx\"; path = \"{DEBIAN_PATH}\"; }}",
            crate::units::repo().display()
        )
    };

    // 1. The first version comes up as blue behind the proxy.
    let (_, v1) = publish(&world, "demo", &example("v1", false));
    pass(c, "demo");
    assert_eq!(profile_target(c, "demo"), v1);
    assert_answers(proxy, "v1");
    assert_answers(blue, "v1");
    assert_eq!(c.is_active("app@blue.service"), "active");
    assert_eq!(c.is_active("app@green.service"), "inactive");
    let blue_v1 = started(c, "app@blue.service");
    let proxy_started = started(c, "app-proxy.service");

    // 2. Activating it again changes nothing and restarts nothing.
    reactivate(c, "demo");
    assert_eq!(started(c, "app@blue.service"), blue_v1, "blue restarted");
    assert_eq!(
        started(c, "app-proxy.service"),
        proxy_started,
        "proxy restarted"
    );
    assert_eq!(c.is_active("app@green.service"), "inactive");

    // 3. The next version starts as green, traffic moves, blue stops: under a
    // request loop that never stops, not one request fails.
    let (_, v2) = publish(&world, "demo", &example("v2", false));
    let requests = RequestLoop::start(proxy);
    std::thread::sleep(Duration::from_millis(300));
    pass(c, "demo");
    let results = requests.finish();
    assert_all_served(&results, "switching to v2");
    assert_eq!(results.first(), Some(&Ok("v1".to_owned())));
    assert_eq!(results.last(), Some(&Ok("v2".to_owned())));
    assert_eq!(profile_target(c, "demo"), v2);
    assert_eq!(c.is_active("app@green.service"), "active");
    assert_eq!(c.is_active("app@blue.service"), "inactive");
    assert_refuses(blue);
    assert_eq!(
        started(c, "app-proxy.service"),
        proxy_started,
        "the proxy restarted instead of reloading"
    );
    let green_v2 = started(c, "app@green.service");

    // 4. A version that fails its health check never gets traffic: the pass is
    // rolled back, green goes on serving throughout.
    let (id3, _) = publish(&world, "demo", &example("v3", true));
    let requests = RequestLoop::start(proxy);
    std::thread::sleep(Duration::from_millis(300));
    let journal = failing_pass(c, "demo");
    let results = requests.finish();
    assert!(journal.contains(&format!("build {id3}")), "{journal}");
    assert_all_served(&results, "the failing v3");
    assert!(
        results.iter().all(|r| r.as_deref() == Ok("v2")),
        "something else than v2 answered: {:?}",
        results
            .iter()
            .filter(|r| r.as_deref() != Ok("v2"))
            .collect::<Vec<_>>()
    );
    assert_eq!(profile_target(c, "demo"), v2);
    assert_eq!(started(c, "app@green.service"), green_v2, "green restarted");
    assert_eq!(c.is_active("app@blue.service"), "inactive");
    let activation = c.journal("hail-activation-demo.service");
    assert!(
        activation.contains("blue did not pass its health check"),
        "{activation}"
    );

    // 5. bin/deactivate takes it all down.
    assert_exit(&c.exec(&["/nix/var/nix/profiles/demo/bin/deactivate"]), 0);
    assert_refuses(proxy);
    assert_refuses(green);
    for unit in ["app-proxy.service", "app@green.service", "app@blue.service"] {
        assert_eq!(c.is_active(unit), "inactive", "{unit}");
        assert!(read(c, &format!("{UNIT_DIR}/{unit}")).is_none(), "{unit}");
    }

    eprintln!("blue-green scenario took {:.1?}", begun.elapsed());
}
