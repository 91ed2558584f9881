//! One pass against the Hydra stand-in, with real Nix switching real
//! profiles in a temporary profiles dir and a real signed binary cache.

use crate::common::hydra::{Bystander, Fault};
use crate::common::{JOB, World, assert_exit, assert_unknown_jobset_is_named, exists};

/// The pass did nothing: no profile, no generation, no activation, no state.
#[track_caller]
fn assert_untouched(world: &World) {
    assert_eq!(world.profile_target(), None);
    assert!(
        world.generations().is_empty(),
        "generations: {:?}",
        world.generations()
    );
    assert!(
        world.activations().is_empty(),
        "activations: {:?}",
        world.activations()
    );
}

fn narinfo_requests(world: &World) -> usize {
    world
        .hydra
        .requests()
        .iter()
        .filter(|r| r.path.ends_with(".narinfo"))
        .count()
}

#[test]
fn first_deploy_switches_and_activates() {
    let world = World::new();
    let (id, path) = world.publish("a");
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
    assert_eq!(world.generations(), [1]);
    assert_eq!(
        world.activations(),
        [format!(
            "label=a build={id} store={path} previous= profile=web cwd=/"
        )]
    );
    let api = world.hydra.api_requests();
    let paths: Vec<&str> = api.iter().map(|r| r.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            format!("/job/hail/main/{JOB}/latest"),
            format!("/build/{id}")
        ]
    );
    for request in &api {
        assert_eq!(
            request.header("Accept"),
            Some("application/json"),
            "{request:?}"
        );
    }
    // nix-env substituted it from the stand-in's cache.
    assert!(narinfo_requests(&world) >= 1);
}

#[test]
fn no_change_is_one_exchange_and_no_nix() {
    let world = World::new();
    let (id, path) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let requests = world.hydra.requests().len();
    let bytes = world.hydra.bytes_sent();

    // Hydra's redirect names the build hail deployed from the same source, and
    // the profile is still there: one request, nothing else. PATH holds only
    // nix commands that note it when they run.
    let bin = world.path("noting-bin");
    std::fs::create_dir(&bin).unwrap();
    let ran = world.path("ran");
    for command in ["nix", "nix-store", "nix-env", "systemd-run", "systemctl"] {
        let stub = bin.join(command);
        std::fs::write(
            &stub,
            format!("#!/bin/sh\necho {command} >> {}\nexit 99\n", ran.display()),
        )
        .unwrap();
        std::fs::set_permissions(&stub, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let mut cmd = world.hail();
    cmd.env("PATH", &bin);
    let run = world.run(cmd);
    assert_exit(&run, 0);
    assert!(
        !exists(&ran),
        "a no-change pass ran {:?}",
        std::fs::read_to_string(&ran)
    );
    assert!(
        run.stderr.contains(&format!("up to date: build {id}")),
        "{run:?}"
    );
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
    assert_eq!(world.generations(), [1]);
    assert_eq!(world.activations().len(), 1, "activate ran again");
    let after: Vec<String> = world.hydra.requests()[requests..]
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(after, [format!("/job/hail/main/{JOB}/latest")]);
    let received = world.hydra.bytes_sent() - bytes;
    assert!(received < 512, "a no-change pass received {received} bytes");

    // A dry run says the same from the same one request.
    let run = world.pass(&["--dry-run"]);
    assert_exit(&run, 0);
    assert_eq!(run.out(), format!("up to date: build {id} {path}"));
    assert_eq!(world.hydra.requests().len(), requests + 2);
}

#[test]
fn any_doubt_fetches_the_build_again() {
    let world = World::new();
    let (id, _) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let build_fetches = || {
        world
            .hydra
            .requests()
            .iter()
            .filter(|r| r.path == format!("/build/{id}"))
            .count()
    };
    let first = build_fetches();
    // Another output or selection: the id alone proves nothing.
    assert_exit(&world.pass(&["--system", "x86_64-linux"]), 0);
    assert_eq!(build_fetches(), first + 1);
    // No state: the same.
    std::fs::remove_file(world.state_dir().join("web.json")).unwrap();
    assert_exit(&world.pass(&[]), 0);
    assert_eq!(build_fetches(), first + 2);
    // That pass made the record whole again: back to one request.
    assert_exit(&world.pass(&[]), 0);
    assert_exit(&world.pass(&[]), 0);
    assert_eq!(build_fetches(), first + 2);
}

#[test]
fn newer_build_becomes_a_new_generation() {
    let world = World::new();
    let (_, a) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let (id_b, b) = world.publish("b");
    let run = world.pass(&[]);
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(b.as_str()));
    assert_eq!(world.generations(), [1, 2]);
    let activations = world.activations();
    assert_eq!(activations.len(), 2);
    assert_eq!(
        activations[1],
        format!("label=b build={id_b} store={b} previous={a} profile=web cwd=/")
    );
}

#[test]
fn dry_run_says_what_and_changes_nothing() {
    let world = World::new();
    let (id, path) = world.publish("a");
    let run = world.pass(&["--dry-run"]);
    assert_exit(&run, 0);
    assert!(
        run.stdout
            .contains(&format!("would deploy build {id} {path}")),
        "{run:?}"
    );
    assert_untouched(&world);
    assert!(!exists(&world.state_dir()));
    assert_eq!(narinfo_requests(&world), 0);
}

#[test]
fn boot_activation_with_and_without_a_profile() {
    let world = World::new();
    let activate = |world: &World| world.run(world.boot_activation());
    let run = activate(&world);
    assert_exit(&run, 0);
    assert!(run.stderr.contains("does not exist"), "{run:?}");
    assert_untouched(&world);

    let (id, path) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let run = activate(&world);
    assert_exit(&run, 0);
    let activations = world.activations();
    assert_eq!(activations.len(), 2);
    assert_eq!(
        activations[0],
        format!("label=a build={id} store={path} previous= profile=web cwd=/")
    );
    assert_eq!(
        activations[1],
        format!("label=a build={id} store={path} previous= profile=web cwd=/")
    );
    assert_eq!(world.generations(), [1]);
}

#[test]
fn failing_boot_activation_exits_3() {
    let world = World::new();
    world.publish_with(
        "a",
        "[ -z \"$HAIL_TEST_BOOT\" ] || { echo boot activation broke >&2; exit 4; }",
    );
    assert_exit(&world.pass(&[]), 0);
    let mut cmd = world.boot_activation();
    cmd.env("HAIL_TEST_BOOT", "1");
    let run = world.run(cmd);
    assert_exit(&run, 3);
    assert!(run.stderr.contains("boot activation broke"), "{run:?}");
}

#[test]
fn html_instead_of_json_is_reported() {
    // A proxy that drops the Accept header makes Hydra answer with HTML.
    let world = World::new();
    let (id, _) = world.publish("a");
    world.hydra.fault(
        &format!("/build/{id}"),
        Fault::Respond(
            200,
            "text/html; charset=utf-8",
            b"<html><body>Build 1</body></html>".to_vec(),
        ),
    );
    let run = world.pass(&[]);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("HTML instead of JSON"), "{run:?}");
    assert_untouched(&world);
}

#[test]
fn no_successful_build_reports_hydras_message() {
    let world = World::new();
    world.hydra.add_build(
        JOB,
        "/nix/store/ywd0s510ywbfhczmgis9ywb3y0q8xcwn-x",
        Some(1),
    );
    let run = world.pass(&[]);
    assert_exit(&run, 1);
    assert!(
        run.stderr
            .contains("There is no successful build to redirect to."),
        "{run:?}"
    );
    assert_untouched(&world);

    assert_unknown_jobset_is_named(&world, &world.hydra.origin());
}

#[test]
fn hydra_down() {
    let world = World::new();
    let port = crate::common::free_port();
    let cmd = world.hail_with_job(&format!("http://127.0.0.1:{port}/job/hail/main/{JOB}"));
    let run = world.run(cmd);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("connection refused"), "{run:?}");
    assert_untouched(&world);
}

#[test]
fn hanging_hydra_times_out() {
    let world = World::new();
    world.publish("a");
    world.hydra.fault("/latest", Fault::Hang);
    let started = std::time::Instant::now();
    let run = world.pass(&["--timeout", "1"]);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("did not answer"), "{run:?}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "--timeout was not honoured"
    );
    assert_untouched(&world);
}

#[test]
fn broken_answers_are_errors_that_change_nothing() {
    let html_502 =
        b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>".to_vec();
    let cases: Vec<(&str, Fault, &str)> = vec![
        (
            "latest",
            Fault::Respond(502, "text/html", html_502.clone()),
            "502 Bad Gateway",
        ),
        (
            "build",
            Fault::Respond(502, "text/html", html_502),
            "502 Bad Gateway",
        ),
        (
            "build",
            Fault::Respond(200, "application/json", b"\x00garbage{{".to_vec()),
            "not valid JSON",
        ),
        (
            "build",
            Fault::Respond(
                200,
                "application/json",
                br#"{"id":1,"finished":1,"#.to_vec(),
            ),
            "not valid JSON",
        ),
        (
            "build",
            Fault::Truncate(br#"{"id":1,"finished":1,"#.to_vec()),
            "broke off",
        ),
        (
            "build",
            Fault::Respond(200, "application/json", vec![b' '; 2 * 1024 * 1024]),
            "larger than",
        ),
        (
            "latest",
            Fault::Redirect("http://127.0.0.1:1/eval/3?name=main".into()),
            "not a Hydra build URL",
        ),
        (
            "latest",
            Fault::Respond(301, "text/html", Vec::new()),
            "has moved",
        ),
        (
            "latest",
            Fault::Respond(
                403,
                "application/json",
                br#"{"error":"This page requires you to sign in."}"#.to_vec(),
            ),
            "requires you to sign in",
        ),
    ];
    for (target, fault, expected) in cases {
        let world = World::new();
        let (id, _) = world.publish("a");
        let suffix = if target == "latest" {
            "/latest".to_string()
        } else {
            format!("/build/{id}")
        };
        world.hydra.fault(&suffix, fault.clone());
        let run = world.pass(&[]);
        assert_exit(&run, 1);
        assert!(
            run.stderr.contains(expected),
            "{fault:?}: expected {expected:?} in {run:?}"
        );
        assert_eq!(
            run.stderr
                .lines()
                .filter(|l| l.starts_with("hail[web]: error:"))
                .count(),
            1,
            "one error line: {run:?}"
        );
        assert_untouched(&world);
    }
}

#[test]
fn unfinished_and_failed_builds_are_not_deployed() {
    for (status, expected) in [
        (None, "has not finished"),
        (Some(1), "buildstatus 1 (failed)"),
    ] {
        let world = World::new();
        let path = world.cache.build("a", "#!/bin/sh\n");
        world.cache.publish(&path);
        let id = world.hydra.add_build(JOB, &path, status);
        world.hydra.fault(
            "/latest",
            Fault::Redirect(format!("{}/build/{id}", world.hydra.origin())),
        );
        let run = world.pass(&[]);
        assert_exit(&run, 1);
        assert!(run.stderr.contains(expected), "{run:?}");
        assert_untouched(&world);
    }
}

#[test]
fn malformed_store_paths_are_refused_before_anything_runs() {
    let world = World::new();
    let marker = world.path("pwned");
    let hash = "ywd0s510ywbfhczmgis9ywb3y0q8xcwn";
    let evil = [
        "/nix/store/../../tmp".to_string(),
        format!("/nix/store/{hash}-x/../../../tmp"),
        format!("/nix/store/{hash}-x;touch {}", marker.display()),
        format!("/nix/store/{hash}-$(touch {})", marker.display()),
        format!("/nix/store/{hash}-x`touch {}`", marker.display()),
        format!("/nix/store/{hash}-x\ntouch {}", marker.display()),
        format!("{}", world.path("elsewhere").display()),
        "/nix/store/tooshort-x".to_string(),
    ];
    for path in evil {
        let id = world.hydra.add_build(JOB, &path, Some(0));
        let run = world.pass(&[]);
        assert_exit(&run, 1);
        assert!(run.stderr.contains(&format!("build {id}")), "{run:?}");
        assert!(
            run.stderr.contains("not a valid store path"),
            "{path:?}: {run:?}"
        );
        assert!(!exists(&marker), "something was executed");
        assert_untouched(&world);
        assert_eq!(narinfo_requests(&world), 0, "nix was asked about {path:?}");
    }
}

#[test]
fn redirect_to_another_host_fetches_from_the_job_uri() {
    let world = World::new();
    let other = Bystander::start();
    world
        .hydra
        .location_origin(&format!("http://{}", other.addr));
    world.hydra.require_basic_auth("ci", "s3cret");
    let netrc = world.path("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login ci password s3cret\n").unwrap();
    std::fs::set_permissions(&netrc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (id, path) = world.publish("a");
    let mut cmd = world.hail();
    cmd.arg("--netrc-file").arg(&netrc);
    // nix reads its own netrc for the cache behind the same proxy.
    let nix_config = format!(
        "{}netrc-file = {}\n",
        world.cache.client_nix_config(&world.hydra.origin()),
        netrc.display()
    );
    cmd.env("NIX_CONFIG", nix_config);
    let run = world.run(cmd);
    assert_exit(&run, 0);
    assert!(
        run.stderr.contains("not on the job URI's origin"),
        "{run:?}"
    );
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
    assert!(
        other.connections().is_empty(),
        "the other host was contacted: {:?}",
        other.connections()
    );
    let build = world
        .hydra
        .api_requests()
        .into_iter()
        .find(|r| r.path == format!("/build/{id}"));
    assert!(build.is_some_and(|r| r.header("Authorization").is_some()));
    assert!(!run.stderr.contains("s3cret"));
}

#[test]
fn basic_auth_from_netrc() {
    let world = World::new();
    world.hydra.require_basic_auth("ci", "s3cret");
    let (_, path) = world.publish("a");

    let run = world.pass(&[]);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("requires credentials"), "{run:?}");
    assert_untouched(&world);

    let netrc = world.path("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1\n  login ci\n  password wrong\n").unwrap();
    let run = world.pass(&["--netrc-file", netrc.to_str().unwrap()]);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("was refused"), "{run:?}");
    assert!(
        run.stderr.contains("readable by group or others"),
        "{run:?}"
    );
    assert!(
        !run.stderr.contains("wrong"),
        "the password was logged: {run:?}"
    );

    std::fs::write(&netrc, "machine 127.0.0.1 login ci password s3cret\n").unwrap();
    std::fs::set_permissions(&netrc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let mut cmd = world.hail();
    cmd.env("HAIL_NETRC_FILE", &netrc).env(
        "NIX_CONFIG",
        format!(
            "{}netrc-file = {}\n",
            world.cache.client_nix_config(&world.hydra.origin()),
            netrc.display()
        ),
    );
    let run = world.run(cmd);
    assert_exit(&run, 0);
    assert!(!run.stderr.contains("readable by group"), "{run:?}");
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));

    let run = world.pass(&["--netrc-file", world.path("missing").to_str().unwrap()]);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("cannot read netrc file"), "{run:?}");

    std::fs::write(&netrc, "machine 127.0.0.1 login\n").unwrap();
    let run = world.pass(&["--netrc-file", netrc.to_str().unwrap()]);
    assert_exit(&run, 1);
    assert!(
        run.stderr
            .contains(&format!("netrc file {} is malformed", netrc.display())),
        "{run:?}"
    );
    // A password with a space: where, never what.
    std::fs::write(&netrc, "machine 127.0.0.1 login ci password Summer 2024!\n").unwrap();
    let run = world.pass(&["--netrc-file", netrc.to_str().unwrap()]);
    assert_exit(&run, 1);
    assert!(
        run.stderr
            .contains("is malformed (an unexpected word at line 1, column"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("2024"), "{run:?}");
}

#[test]
fn usage_errors_exit_2_and_create_nothing() {
    let world = World::new();
    world.publish("a");
    let job = world.hydra.job_uri(JOB);
    for (args, expected) in [
        (vec!["--profile", "../etc", "--job-uri", &job], "'..' part"),
        (vec!["--profile", "/abs", "--job-uri", &job], "absolute"),
        (vec!["--profile", "we b", "--job-uri", &job], "contains"),
        (vec!["--profile", "", "--job-uri", &job], "empty"),
        (
            vec!["--profile", "web", "--job-uri", &job, "--poll-period", "60"],
            "hail@PROFILE.timer",
        ),
        (
            vec![
                "--profile",
                "web",
                "--job-uri",
                "https://hydra.example.org/project/x",
            ],
            "/job/PROJECT/JOBSET/JOB",
        ),
        (vec!["--job-uri", &job], "--profile"),
        // clap's own message, plus where a unit would set it.
        (vec!["--job-uri", &job], "HAIL_PROFILE in the environment"),
        (
            vec!["--profile", "web", "--latest-finished", "--wait-for-jobset"],
            "cannot be used with",
        ),
    ] {
        let mut cmd = world.bare_hail();
        cmd.args(&args)
            .arg("--profiles-dir")
            .arg(world.profiles_dir())
            .arg("--state-dir")
            .arg(world.state_dir());
        let run = world.run(cmd);
        assert_exit(&run, 2);
        assert!(run.stderr.contains(expected), "{args:?}: {run:?}");
        assert!(
            !exists(&world.profiles_dir()) && !exists(&world.state_dir()),
            "{args:?} created files"
        );
        assert!(world.hydra.requests().is_empty());
    }
}

#[test]
fn profile_names_with_slashes_get_their_folders() {
    let world = World::new();
    let (_, path) = world.publish("a");
    let mut cmd = world.bare_hail();
    cmd.args(["--profile", "hail-profiles/web", "--profiles-dir"])
        .arg(world.profiles_dir())
        .arg("--state-dir")
        .arg(world.state_dir())
        .arg("--job-uri")
        .arg(world.hydra.job_uri(JOB));
    assert_exit(&world.run(cmd), 0);
    let target = std::fs::canonicalize(world.profiles_dir().join("hail-profiles/web")).unwrap();
    assert_eq!(target.to_str(), Some(path.as_str()));
}

#[test]
fn path_missing_from_the_cache_changes_nothing() {
    let world = World::new();
    let (_, a) = world.publish("a");
    assert_exit(&world.pass(&[]), 0);
    let missing = world.cache.build("b", "#!/bin/sh\n");
    world.hydra.add_build(JOB, &missing, Some(0));
    let run = world.pass(&[]);
    assert_exit(&run, 1);
    assert!(
        run.error()
            .contains(&format!("nix-store --realise --no-gc-warning {missing}")),
        "{run:?}"
    );
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));
    assert_eq!(world.generations(), [1]);
    assert_eq!(world.activations().len(), 1);
}

#[test]
fn concurrent_passes_deploy_once() {
    let world = World::new();
    let (_, path) = world.publish_with("a", "sleep 1");
    let runs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2).map(|_| s.spawn(|| world.pass(&[]))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for run in &runs {
        assert_exit(run, 0);
    }
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
    assert_eq!(world.generations(), [1]);
    assert_eq!(world.activations().len(), 1);
    assert!(runs.iter().any(|r| r.stderr.contains("up to date")));
}

/// nginx terminating TLS with a certificate from a private CA, proxying to
/// the stand-in (as a reverse proxy in front of Hydra would).
struct TlsProxy {
    port: u16,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl TlsProxy {
    fn start(upstream: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(d)
                .output()
                .expect("openssl (apt-get install openssl)");
            assert!(
                out.status.success(),
                "openssl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"],
                &ec[..],
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.pem",
                    "-days",
                    "2",
                    "-subj",
                    "/CN=hail test CA",
                ],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    "srv.key",
                    "-out",
                    "srv.csr",
                    "-subj",
                    "/CN=localhost",
                ],
            ]
            .concat(),
        );
        std::fs::write(
            d.join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "srv.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "srv.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
        let port = crate::common::free_port();
        let p = d.display();
        let conf = format!(
            "daemon off; master_process off; pid {p}/nginx.pid; error_log {p}/error.log;\nevents {{}}\n\
             http {{ access_log off; client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n\
             server {{ listen 127.0.0.1:{port} ssl; ssl_certificate {p}/srv.pem; ssl_certificate_key {p}/srv.key;\n\
             location / {{ proxy_pass {upstream}; proxy_set_header Host $http_host; }} }} }}\n"
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let child = std::process::Command::new("nginx")
            .args(["-c", &format!("{p}/nginx.conf"), "-p", &p.to_string()])
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx (apt-get install nginx-light)");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Self { port, child, dir }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn https_hydra_behind_a_private_ca() {
    let world = World::new();
    let (id, path) = world.publish("a");
    let proxy = TlsProxy::start(&world.hydra.origin());
    let job = format!("https://localhost:{}/job/hail/main/{JOB}", proxy.port);
    let dry_run = |var: Option<&str>| {
        let mut cmd = world.hail_with_job(&job);
        cmd.arg("--dry-run")
            .env_remove("SSL_CERT_FILE")
            .env_remove("NIX_SSL_CERT_FILE");
        if let Some(var) = var {
            cmd.env(var, proxy.ca());
        }
        world.run(cmd)
    };
    // The system trust store does not know the private CA: refused.
    let run = dry_run(None);
    assert_exit(&run, 1);
    assert!(run.stderr.to_lowercase().contains("certificate"), "{run:?}");
    // Trusting it through either variable works, over TLS.
    for var in ["SSL_CERT_FILE", "NIX_SSL_CERT_FILE"] {
        let run = dry_run(Some(var));
        assert_exit(&run, 0);
        assert!(
            run.stdout
                .contains(&format!("would deploy build {id} {path}")),
            "{var}: {run:?}"
        );
    }
    // Every request reached the stand-in through the proxy with the JSON Accept.
    let api = world.hydra.api_requests();
    assert_eq!(api.len(), 4, "{api:?}");
    assert!(
        api.iter()
            .all(|r| r.header("Accept") == Some("application/json"))
    );
    // A CA file that is missing is named.
    let mut cmd = world.hail_with_job(&job);
    cmd.arg("--dry-run")
        .env_remove("NIX_SSL_CERT_FILE")
        .env("SSL_CERT_FILE", world.path("no-such-ca.pem"));
    let run = world.run(cmd);
    assert_exit(&run, 1);
    assert!(run.stderr.contains("no-such-ca.pem"), "{run:?}");
}

#[test]
fn numbers_out_of_range_exit_2_naming_the_option_and_its_limit() {
    let world = World::new();
    world.publish("a");
    for (option, value, limit) in [
        ("--timeout", "1e30", "86400 s"),
        ("--lock-timeout", "1e19", "86400 s"),
        ("--activate-timeout", "100000", "86400 s"),
        // A deadline that would round to nothing.
        ("--timeout", "1e-12", "at least 0.001"),
        ("--nix-timeout", "0.0004", "at least 0.001"),
        ("--min-build-age", "18446744073709551615", "366 days"),
        ("--min-build-age", "400d", "366 days"),
    ] {
        let run = world.pass(&[option, value]);
        assert_exit(&run, 2);
        assert!(
            run.stderr.contains(option) && run.stderr.contains(limit),
            "{option} {value}: {run:?}"
        );
        assert!(
            !exists(&world.profiles_dir()),
            "{option} {value} created files"
        );
        assert!(world.hydra.requests().is_empty());
    }
    // The same through the environment, as a unit's env file sets it.
    let mut cmd = world.hail();
    cmd.env("HAIL_LOCK_TIMEOUT", "1e19");
    let run = world.run(cmd);
    assert_exit(&run, 2);
    assert!(run.stderr.contains("--lock-timeout"), "{run:?}");
}

#[test]
fn a_password_in_the_job_uri_is_never_printed() {
    let world = World::new();
    let job = world
        .hydra
        .job_uri(JOB)
        .replace("http://", "http://ci:s3cret@");
    let mut by_option = world.bare_hail();
    by_option.args(["--profile", "web", "--job-uri", &job]);
    let mut by_env = world.bare_hail();
    by_env.args(["--profile", "web"]).env("HAIL_JOB_URI", &job);
    for cmd in [by_option, by_env] {
        let run = world.run(cmd);
        assert_exit(&run, 2);
        assert!(run.stderr.contains("netrc"), "{run:?}");
        assert!(
            !run.stderr.contains("s3cret") && !run.stdout.contains("s3cret"),
            "{run:?}"
        );
    }
    assert!(world.hydra.requests().is_empty());
}
