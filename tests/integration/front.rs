//! hail behind `examples/hydra-cache`: a real nginx, configured with what the
//! example's NixOS snippet (`default.nix`) puts into nginx's configuration, in
//! front of the Hydra stand-in. hail must behave exactly as it does talking to
//! Hydra directly, while the stand-in sees the requests of one host where a
//! fleet asked.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::common::hydra::Fault;
use crate::common::nginx::{Logged, Nginx};
use crate::common::{
    JOB, Run, World, assert_exit, assert_unknown_jobset_is_named, assert_up_to_date,
    recording_activate,
};
use crate::units::{NIX_HINT, nix_instantiate, output_text, repo, run};

/// Passes a test makes while it waits for a cache entry to expire…
const RETRIES: usize = 60;
/// …this far apart: 15 s in all, for lifetimes of 2 s.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// nginx as `examples/hydra-cache` sets it up, in front of `world`'s stand-in.
struct Front {
    nginx: Nginx,
}

impl Front {
    /// A front whose `latest` redirects and build objects live `lifetime`
    /// (errors: the example's default).
    fn start(world: &World, lifetime: &str) -> Self {
        Self::start_with(world, &[("lifetime", lifetime)])
    }

    /// A front with these arguments of the example's module besides the
    /// upstream and cache dir.
    fn start_with(world: &World, args: &[(&str, &str)]) -> Self {
        let upstream = format!("127.0.0.1:{}", world.hydra.port());
        let nginx = Nginx::start(|port, dir| {
            let cache = dir.join("cache").display().to_string();
            let mut all = vec![("upstream", upstream.as_str()), ("cacheDir", &cache)];
            all.extend_from_slice(args);
            let snippet = nixos_snippet(&all);
            // Where NixOS puts them: the virtual host (its basicAuthFile as
            // the nginx module writes it, then extraConfig), then appendHttpConfig.
            let auth = snippet.basic_auth_file.map_or_else(String::new, |file| {
                format!("auth_basic secured;\nauth_basic_user_file {file};\n")
            });
            format!(
                "server {{\nlisten 127.0.0.1:{port};\nserver_name 127.0.0.1;\n{auth}{}\n}}\n{}",
                snippet.server, snippet.http
            )
        });
        Self { nginx }
    }

    fn job_uri(&self, job: &str) -> String {
        format!("{}/job/hail/main/{job}", self.nginx.origin())
    }

    /// What the front logged after the first `skip` lines, once it has
    /// logged `expected` more.
    fn log_since(&self, skip: usize, expected: usize) -> Vec<Logged> {
        self.nginx
            .access_log_of(skip + expected)
            .into_iter()
            .skip(skip)
            .collect()
    }
}

/// What `examples/hydra-cache/default.nix` gives nginx, for host 127.0.0.1.
struct Snippet {
    http: String,
    server: String,
    basic_auth_file: Option<String>,
}

/// Evaluates the example's NixOS module with these arguments (besides
/// `hostName`), as a NixOS configuration would import it.
fn nixos_snippet(args: &[(&str, &str)]) -> Snippet {
    let mut cmd = nix_instantiate();
    cmd.current_dir(repo())
        .args(["--eval", "--strict", "--json"]);
    let mut params = vec!["hostName".to_owned()];
    for (name, value) in args {
        cmd.args(["--argstr", name, value]);
        params.push((*name).to_owned());
    }
    cmd.arg("-E").arg(format!(
        "{{ {} }}@args: (import ./examples/hydra-cache args).services.nginx",
        params.join(", ")
    ));
    cmd.args(["--argstr", "hostName", "127.0.0.1"]);
    let output = run(&mut cmd, NIX_HINT);
    assert!(output.status.success(), "{}", output_text(&output));
    let nginx: Value = serde_json::from_slice(&output.stdout).expect("JSON from nix-instantiate");
    let text = |v: &Value| v.as_str().expect("a string").to_owned();
    assert_eq!(nginx["enable"], true);
    let host = &nginx["virtualHosts"]["127.0.0.1"];
    Snippet {
        http: text(&nginx["appendHttpConfig"]),
        server: text(&host["extraConfig"]),
        basic_auth_file: host.get("basicAuthFile").map(text),
    }
}

/// Runs `cmd` (a pass) until `done` says its outcome is the awaited one, a
/// bounded number of times; returns that run.
#[track_caller]
fn pass_until(
    world: &World,
    what: &str,
    cmd: impl Fn() -> Command,
    done: impl Fn(&Run) -> bool,
) -> Run {
    let mut last = None;
    for _ in 0..RETRIES {
        let run = world.run(cmd());
        if done(&run) {
            return run;
        }
        last = Some(run);
        std::thread::sleep(RETRY_PAUSE);
    }
    panic!("{RETRIES} passes and still not {what}; the last one:\n{last:?}");
}

/// The paths of the stand-in's API requests from the `skip`th on, with their method.
fn upstream_since(world: &World, skip: usize) -> Vec<String> {
    world.hydra.api_requests()[skip..]
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

/// The front's answer to `JOB/latest` asked without credentials.
fn status_without_credentials(front: &Front) -> u16 {
    http_agent()
        .head(format!("{}/latest", front.job_uri(JOB)))
        .header("Accept", "application/json")
        .call()
        .expect("an answer from the front")
        .status()
        .as_u16()
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_redirects(0)
        .http_status_as_error(false)
        .build()
        .into()
}

#[test]
fn no_change_passes_are_answered_by_the_front() {
    let world = World::new();
    let front = Front::start(&world, "1h");
    let job = front.job_uri(JOB);
    let (id, path) = world.publish("a");

    let run = world.run(world.hail_with_job(&job));
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
    // The redirect names the front, port included: no warning about another origin.
    assert!(
        !run.stderr.contains("not on the job URI's origin"),
        "{run:?}"
    );
    // hail's HEAD became a GET, so that the answer serves both.
    assert_eq!(
        upstream_since(&world, 0),
        [
            format!("GET /job/hail/main/{JOB}/latest"),
            format!("GET /build/{id}")
        ]
    );
    for request in world.hydra.api_requests() {
        assert_eq!(request.header("Accept"), Some("application/json"));
        assert_eq!(
            request.header("Host"),
            Some(format!("127.0.0.1:{}", front.nginx.port).as_str())
        );
    }

    let upstream = world.hydra.api_requests().len();
    // The first pass: HEAD JOB/latest, GET /build/ID.
    let logged = front.nginx.access_log_of(2).len();
    for _ in 0..5 {
        let run = world.run(world.hail_with_job(&job));
        assert_up_to_date(&run, id);
    }
    assert_eq!(upstream_since(&world, upstream), Vec::<String>::new());
    let passes = front.log_since(logged, 5);
    assert_eq!(passes.len(), 5, "{passes:?}");
    for pass in &passes {
        assert_eq!(
            (pass.method.as_str(), pass.status, pass.cache.as_str()),
            ("HEAD", 302, "HIT"),
            "{pass:?}"
        );
        assert!(pass.bytes_sent < 512, "{pass:?}");
    }
    assert_eq!(world.generations(), [1]);
    assert_eq!(world.activations().len(), 1);

    // The price: within the lifetime, a newer build is not seen yet.
    world.publish("b");
    let run = world.run(world.hail_with_job(&job));
    assert_up_to_date(&run, id);
    assert_eq!(upstream_since(&world, upstream), Vec::<String>::new());
}

#[test]
fn a_newer_build_is_deployed_once_the_cache_expires() {
    let world = World::new();
    let front = Front::start(&world, "2s");
    let job = front.job_uri(JOB);
    let (_, a) = world.publish("a");
    assert_exit(&world.run(world.hail_with_job(&job)), 0);
    assert_eq!(world.profile_target().as_deref(), Some(a.as_str()));

    let (id_b, b) = world.publish("b");
    let run = pass_until(
        &world,
        "deployed",
        || world.hail_with_job(&job),
        |run| {
            assert_exit(run, 0);
            world.profile_target().as_deref() == Some(b.as_str())
        },
    );
    assert!(
        !run.stderr.contains("not on the job URI's origin"),
        "{run:?}"
    );
    assert_eq!(world.generations(), [1, 2]);
    let activations = world.activations();
    assert_eq!(activations.len(), 2, "{activations:?}");
    assert!(
        activations[1].starts_with(&format!("label=b build={id_b} store={b} previous={a} ")),
        "{activations:?}"
    );
}

#[test]
fn a_fleet_asking_at_once_sends_one_request_upstream() {
    let world = World::new();
    let front = Front::start(&world, "1h");
    let job = front.job_uri(JOB);
    let (id, path) = world.publish("a");
    // A busy Hydra: every host asks before the first answer is back.
    world
        .hydra
        .fault("/latest", Fault::Delay(Duration::from_secs(2)));
    let runs: Vec<Run> = std::thread::scope(|scope| {
        let hosts: Vec<_> = (0..8)
            .map(|_| {
                scope.spawn(|| {
                    let mut cmd = world.hail_with_job(&job);
                    cmd.arg("--dry-run");
                    world.run(cmd)
                })
            })
            .collect();
        hosts
            .into_iter()
            .map(|host| host.join().expect("a host's pass"))
            .collect()
    });
    for run in &runs {
        assert_exit(run, 0);
        assert!(
            run.out()
                .starts_with(&format!("would deploy build {id} {path} ")),
            "{run:?}"
        );
    }
    assert_eq!(
        upstream_since(&world, 0),
        [
            format!("GET /job/hail/main/{JOB}/latest"),
            format!("GET /build/{id}")
        ]
    );
}

#[test]
fn errors_are_not_cached_for_long() {
    let world = World::new();
    // Redirects live an hour: only the errors' own short lifetime lets the
    // fixed answers through.
    let front = Front::start(&world, "1h");
    let job = front.job_uri(JOB);
    let hail = || world.hail_with_job(&job);
    // The job has a build, but none succeeded.
    world.hydra.add_build(
        JOB,
        "/nix/store/ywd0s510ywbfhczmgis9ywb3y0q8xcwn-x",
        Some(1),
    );

    world.hydra.fault(
        "/latest",
        Fault::Respond(502, "text/html", b"<html>Bad Gateway</html>".to_vec()),
    );
    let run = world.run(hail());
    assert_exit(&run, 1);
    assert!(run.stderr.contains("502 Bad Gateway"), "{run:?}");
    world.hydra.clear_faults();

    // Then Hydra has no successful build: its 404, not the old 502.
    pass_until(&world, "answered with Hydra's 404", hail, |run| {
        assert_exit(run, 1);
        run.stderr
            .contains("There is no successful build to redirect to.")
    });

    let (_, path) = world.publish("a");
    pass_until(&world, "deployed", hail, |run| {
        run.code == Some(0) && world.profile_target().as_deref() == Some(path.as_str())
    });

    // An unknown jobset is reported with Hydra's own words through the front.
    assert_unknown_jobset_is_named(&world, &front.nginx.origin());
}

#[test]
fn a_renamed_jobset_is_reported_with_the_fronts_address() {
    let world = World::new();
    let front = Front::start(&world, "1h");
    let (_, path) = world.publish("a");
    world.hydra.rename_jobset("old", "main");
    let old = format!("{}/job/hail/old/{JOB}", front.nginx.origin());
    for _ in 0..2 {
        let run = world.run(world.hail_with_job(&old));
        assert_exit(&run, 1);
        assert!(
            run.stderr.contains(&format!(
                "with 301 Moved Permanently to \"{}/latest\": the job URI has moved",
                front.job_uri(JOB)
            )),
            "{run:?}"
        );
    }
    // The second answer came from the front.
    assert_eq!(
        upstream_since(&world, 0),
        [format!("GET /job/hail/old/{JOB}/latest")]
    );
    assert_eq!(world.profile_target(), None);

    let run = world.run(world.hail_with_job(&front.job_uri(JOB)));
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
}

#[test]
fn html_and_json_are_cached_apart() {
    let world = World::new();
    let front = Front::start(&world, "1h");
    let (id, path) = world.publish("a");
    let agent = http_agent();
    let build_url = format!("{}/build/{id}", front.nginx.origin());
    let browser = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8";
    // (content type, body) of a GET through the front, after checking the
    // headers every answer through it has.
    let get = |url: &str, accept: &str| {
        let mut response = agent
            .get(url)
            .header("Accept", accept)
            .call()
            .expect("an answer from the front");
        let headers = response.headers();
        assert_eq!(
            headers.get("Vary").and_then(|v| v.to_str().ok()),
            Some("Accept"),
            "{url}"
        );
        assert!(headers.get("Set-Cookie").is_none(), "{url}: {headers:?}");
        let content_type = headers
            .get("Content-Type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let body = response.body_mut().read_to_string().expect("a body");
        (response.status().as_u16(), content_type, body)
    };

    // A browser first: the HTML page is cached…
    let (status, html, _) = get(&build_url, browser);
    assert_eq!((status, html.as_str()), (200, "text/html; charset=utf-8"));
    // …and hail still gets JSON, and deploys.
    let run = world.run(world.hail_with_job(&front.job_uri(JOB)));
    assert_exit(&run, 0);
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));
    // Both cached now: each asker gets its own kind.
    let (_, html, _) = get(&build_url, browser);
    assert_eq!(html, "text/html; charset=utf-8");
    let (status, json, body) = get(&build_url, "application/json");
    assert_eq!((status, json.as_str()), (200, "application/json"));
    let build: Value = serde_json::from_str(&body).expect("a build object");
    assert_eq!(build["id"], id);
    let (status, _, _) = get(&format!("{}/latest", front.job_uri(JOB)), browser);
    assert_eq!(status, 302);

    // Hydra saw each kind of /build/ID once.
    let builds: Vec<String> = world
        .hydra
        .api_requests()
        .iter()
        .filter(|r| r.path == format!("/build/{id}"))
        .map(|r| r.header("Accept").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(builds, [browser, "application/json"]);
}

#[test]
fn an_unfinished_build_is_deployed_once_it_finishes() {
    let world = World::new();
    let front = Front::start(&world, "2s");
    let job = front.job_uri(JOB);
    let path = world.cache.build("a", &recording_activate("a", ""));
    world.cache.publish(&path);
    let id = world.hydra.add_build(JOB, &path, None);
    // Hydra's `latest` names finished builds only; a redirect to a queued one
    // is what a build restarted in between looks like.
    world.hydra.fault(
        "/latest",
        Fault::Redirect(format!("{}/build/{id}", front.nginx.origin())),
    );
    let run = world.run(world.hail_with_job(&job));
    assert_exit(&run, 1);
    assert!(run.stderr.contains("has not finished"), "{run:?}");
    assert_eq!(world.profile_target(), None);

    world.hydra.finish_build(id, 0);
    pass_until(
        &world,
        "deployed",
        || world.hail_with_job(&job),
        |run| run.code == Some(0) && world.profile_target().as_deref() == Some(path.as_str()),
    );
    assert_eq!(world.activations().len(), 1);
}

#[test]
fn answers_to_credentials_are_never_cached() {
    let world = World::new();
    let front = Front::start(&world, "1h");
    // An authenticating proxy behind the front (Hydra has no HTTP auth itself).
    world.hydra.require_basic_auth("ci", "s3cret");
    let netrc = world.path("netrc");
    std::fs::write(&netrc, "machine 127.0.0.1 login ci password s3cret\n").unwrap();
    std::fs::set_permissions(&netrc, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let (id, path) = world.publish("a");
    let hail = || {
        let mut cmd = world.hail_with_job(&front.job_uri(JOB));
        cmd.arg("--netrc-file").arg(&netrc).env(
            "NIX_CONFIG",
            format!(
                "{}netrc-file = {}\n",
                world.cache.client_nix_config(&world.hydra.origin()),
                netrc.display()
            ),
        );
        cmd
    };
    assert_exit(&world.run(hail()), 0);
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));

    // Every pass is Hydra's to answer, with the credentials.
    let upstream = world.hydra.api_requests().len();
    for _ in 0..3 {
        let run = world.run(hail());
        assert_up_to_date(&run, id);
    }
    let asked = &world.hydra.api_requests()[upstream..];
    assert_eq!(asked.len(), 3, "{asked:?}");
    assert!(asked.iter().all(|r| r.header("Authorization").is_some()));
    // Nothing they were told reaches a client without them.
    assert_eq!(status_without_credentials(&front), 401);
}

#[test]
fn a_front_that_checks_logins_caches_for_the_hosts_that_pass() {
    let world = World::new();
    let htpasswd = world.path("htpasswd");
    let hashed = Command::new("openssl")
        .args(["passwd", "-apr1", "s3cret"])
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(hashed.status.success(), "{}", output_text(&hashed));
    let hashed = String::from_utf8(hashed.stdout).expect("UTF-8 from openssl");
    std::fs::write(&htpasswd, format!("web1:{}", hashed.trim())).unwrap();
    let front = Front::start_with(
        &world,
        &[
            ("lifetime", "1h"),
            ("basicAuthFile", htpasswd.to_str().expect("a UTF-8 path")),
        ],
    );
    let netrc = |password: &str| {
        let file = world.path(&format!("netrc-{password}"));
        std::fs::write(
            &file,
            format!("machine 127.0.0.1 login web1 password {password}\n"),
        )
        .unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        file
    };
    let (right, wrong) = (netrc("s3cret"), netrc("guess"));
    let hail = |netrc: &std::path::Path| {
        let mut cmd = world.hail_with_job(&front.job_uri(JOB));
        cmd.arg("--netrc-file").arg(netrc);
        cmd
    };
    let (id, path) = world.publish("a");
    assert_exit(&world.run(hail(&right)), 0);
    assert_eq!(world.profile_target().as_deref(), Some(path.as_str()));

    // Logged in, no-change passes are the front's to answer.
    let upstream = world.hydra.api_requests().len();
    for _ in 0..3 {
        let run = world.run(hail(&right));
        assert_up_to_date(&run, id);
    }
    assert_eq!(upstream_since(&world, upstream), Vec::<String>::new());
    // Without the password, or with a wrong one, the cached answer is not
    // handed out: the front refuses first.
    let run = world.run(hail(&wrong));
    assert_exit(&run, 1);
    assert!(run.stderr.contains("401"), "{run:?}");
    assert_eq!(status_without_credentials(&front), 401);
    assert_eq!(upstream_since(&world, upstream), Vec::<String>::new());
    assert_eq!(world.generations(), [1]);
}

#[test]
fn the_nixos_snippet_fills_in_every_parameter() {
    let snippet = nixos_snippet(&[]);
    let both = format!("{}{}", snippet.http, snippet.server);
    assert!(!both.contains('@'), "a parameter left unfilled:\n{both}");
    for default in [
        "proxy_cache_path /var/cache/nginx/hydra ",
        "server 127.0.0.1:3000;",
        "proxy_cache_valid 301 302 10s;",
        "proxy_cache_valid 200 10s;",
        "proxy_cache_valid 404 500 502 503 504 2s;",
        "map \"0|$http_authorization|$cookie_hydra_session\" $hydra_cache_skip",
    ] {
        assert!(both.contains(default), "{default:?} not in:\n{both}");
    }
}
