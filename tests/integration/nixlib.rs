//! The flake's library functions (`nix/lib`: `mkServiceProfile`,
//! `mkManagerProfile`) and the blue-green example's Nix layer, built for real
//! by Nix in a chroot store with `common/stub-pkgs.nix` standing in for
//! nixpkgs' trivial builders: the profiles they make have exactly the layout
//! and the `bin/activate` that hail's `service` and `manager` subcommands
//! expect, and bad arguments are refused at evaluation with a clear message.
//! (`services::` deploys the same profiles under real systemd.)
//!
//! With nixpkgs' lib (see `nixos::`; CI always has it), the defaults that use
//! `pkgs.lib` are built too; without it that test fails in CI and prints a
//! loud SKIP elsewhere.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::common::cache::Cache;
use crate::units::{NIX_HINT, nix_instantiate, output_text, repo, run};

/// A chroot store to build in, and a way to read what was built.
struct Store {
    tmp: tempfile::TempDir,
    cache: Cache,
}

impl Store {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("hail-nixlib-")
            .tempdir()
            .expect("temp dir");
        let cache = Cache::new(tmp.path());
        Self { tmp, cache }
    }

    /// Builds `body` with `pkgs` (the stubs, with `lib` if given) and `hailLib`
    /// (nix/lib, hail at /opt/hail) in scope; returns its one output path.
    fn build(&self, lib: Option<&str>, body: &str) -> String {
        let paths = self.cache.build_expr(&expr(lib, body));
        assert_eq!(paths.len(), 1, "{paths:?}");
        paths[0].clone()
    }

    /// Where a store path (or a file in it) is on this machine.
    fn host(&self, path: &str) -> PathBuf {
        self.tmp
            .path()
            .join("hydra-store")
            .join(path.trim_start_matches('/'))
    }

    /// A file of the store, following symlinks inside the store.
    fn read(&self, path: &str) -> String {
        let host = self.resolve(path);
        std::fs::read_to_string(&host).unwrap_or_else(|e| panic!("{}: {e}", host.display()))
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let mut host = self.host(path);
        while let Ok(target) = std::fs::read_link(&host) {
            host = self.host(&target.to_string_lossy());
        }
        host
    }

    fn is_executable(&self, path: &str) -> bool {
        std::fs::metadata(self.resolve(path)).is_ok_and(|m| m.permissions().mode() & 0o111 != 0)
    }

    /// The names in a directory of the store.
    fn list(&self, dir: &str) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.resolve(dir))
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn expr(lib: Option<&str>, body: &str) -> String {
    let repo = repo();
    let lib = lib.map_or_else(|| "null".to_owned(), |l| format!("({l})"));
    format!(
        "let pkgs = import {}/tests/integration/common/stub-pkgs.nix {{ lib = {lib}; }}; \
         hailLib = import {}/nix/lib {{ hail = \"/opt/hail\"; }}; in {body}",
        repo.display(),
        repo.display()
    )
}

/// Evaluates `body` (as `expr` does), which must fail; returns the error.
fn eval_error(body: &str) -> String {
    let output = run(
        nix_instantiate()
            .args(["--eval", "--strict", "-E"])
            .arg(expr(None, body)),
        NIX_HINT,
    );
    assert!(
        !output.status.success(),
        "{body} evaluated:\n{}",
        output_text(&output)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn service_profile_has_the_layout_hail_expects() {
    let store = Store::new();
    let unit_file = store.tmp.path().join("db.service");
    std::fs::write(&unit_file, "[Service]\nExecStart=/bin/db\n").expect("write unit");
    let profile = store.build(
        None,
        &format!(
            "hailLib.mkServiceProfile {{ inherit pkgs; name = \"web\"; \
             units = {{ \"web.service\" = \"[Service]\\nExecStart=/bin/web\\n\"; \
                        \"app@.service\" = pkgs.writeText \"app\" \"[Service]\\nExecStart=/bin/app %i\\n\"; \
                        \"db.service\" = {}; }}; \
             preSwitch = \"echo migrating\"; healthCheck = \"/bin/curl -fsS http://h/\"; \
             healthTimeout = 7; \
             unitDir = \"/run/it's here\"; }}",
            unit_file.display()
        ),
    );
    assert_eq!(
        store.list(&format!("{profile}/lib/systemd/system")),
        ["app@.service", "db.service", "web.service"]
    );
    assert_eq!(
        store.read(&format!("{profile}/lib/systemd/system/web.service")),
        "[Service]\nExecStart=/bin/web\n"
    );
    assert_eq!(
        store.read(&format!("{profile}/lib/systemd/system/app@.service")),
        "[Service]\nExecStart=/bin/app %i\n"
    );
    assert_eq!(
        store.read(&format!("{profile}/lib/systemd/system/db.service")),
        "[Service]\nExecStart=/bin/db\n"
    );
    assert_eq!(
        store.list(&format!("{profile}/bin")),
        ["activate", "deactivate", "health-check", "pre-switch"]
    );
    for bin in ["activate", "deactivate", "health-check", "pre-switch"] {
        assert!(
            store.is_executable(&format!("{profile}/bin/{bin}")),
            "{bin}"
        );
    }
    assert!(
        store
            .read(&format!("{profile}/bin/pre-switch"))
            .contains("echo migrating")
    );
    // A command line is shell text, not the name of an executable.
    assert_eq!(
        store.read(&format!("{profile}/bin/health-check")),
        "#!/bin/sh\n/bin/curl -fsS http://h/"
    );
    assert_eq!(
        store.read(&format!("{profile}/bin/activate")),
        format!(
            "#!/bin/sh\nexec '/opt/hail/bin/hail' service activate --name 'web' \
             --unit-dir '/run/it'\\''s here' --health-timeout '7' {profile}\n"
        )
    );
    assert_eq!(
        store.read(&format!("{profile}/bin/deactivate")),
        "#!/bin/sh\nexec '/opt/hail/bin/hail' service deactivate --name 'web' \
         --unit-dir '/run/it'\\''s here'\n"
    );
    // The generated scripts pass the arguments hail gets through a real shell.
    let argv = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "hail() {{ printf '[%s]' \"$@\"; }}; {}",
            store
                .read(&format!("{profile}/bin/deactivate"))
                .replace("exec '/opt/hail/bin/hail'", "hail")
        ))
        .output()
        .expect("sh");
    assert_eq!(
        String::from_utf8_lossy(&argv.stdout),
        "[service][deactivate][--name][web][--unit-dir][/run/it's here]"
    );

    // Defaults: no steps, /run/systemd/system, 60 s; hail from a function of pkgs.
    let profile = store.build(
        None,
        "(import ./nix/lib { hail = p: p.myHail; }).mkServiceProfile { \
           pkgs = pkgs // { myHail = \"/opt/other\"; }; name = \"a.b_c+d-e@f\"; \
           units.\"x.timer\" = \"[Timer]\\nOnCalendar=daily\\n\"; }"
            .replace("./nix/lib", &repo().join("nix/lib").to_string_lossy())
            .as_str(),
    );
    assert_eq!(
        store.list(&format!("{profile}/bin")),
        ["activate", "deactivate"]
    );
    assert_eq!(
        store.read(&format!("{profile}/bin/activate")),
        format!(
            "#!/bin/sh\nexec '/opt/other/bin/hail' service activate --name 'a.b_c+d-e@f' \
             --unit-dir '/run/systemd/system' --health-timeout '60' {profile}\n"
        )
    );
}

#[test]
fn manager_profile_has_the_layout_hail_expects() {
    let store = Store::new();
    let profile = store.build(
        None,
        "hailLib.mkManagerProfile { inherit pkgs; instances = { \
           web = { jobUri = \"https://hydra.example.org/job/p/j/web\"; pollPeriod = \"1min\"; \
                   environment.NIX_CONFIG = \"connect-timeout = 5\"; }; \
           db = { jobUri = \"https://hydra.example.org/job/p/j/db\"; profile = \"hail-profiles/db\"; \
                  netrcFile = \"/run/secrets/netrc\"; activateAtBoot = false; }; }; }",
    );
    let instances: Value =
        serde_json::from_str(&store.read(&format!("{profile}/share/hail/instances.json")))
            .expect("instances.json is JSON");
    assert_eq!(
        instances,
        json!({
            "web": {"jobUri": "https://hydra.example.org/job/p/j/web", "pollPeriod": "1min",
                    "environment": {"NIX_CONFIG": "connect-timeout = 5"}},
            "db": {"jobUri": "https://hydra.example.org/job/p/j/db", "profile": "hail-profiles/db",
                   "netrcFile": "/run/secrets/netrc", "activateAtBoot": false},
        })
    );
    assert_eq!(
        store.read(&format!("{profile}/bin/activate")),
        format!(
            "#!/bin/sh\nexec '/opt/hail/bin/hail' manager activate \
             {profile}/share/hail/instances.json\n"
        )
    );
    assert_eq!(
        store.read(&format!("{profile}/bin/deactivate")),
        "#!/bin/sh\nexec '/opt/hail/bin/hail' manager deactivate\n"
    );
    assert!(store.is_executable(&format!("{profile}/bin/activate")));
}

#[test]
fn bad_arguments_are_refused_at_evaluation() {
    let service =
        |args: &str| format!("(hailLib.mkServiceProfile {{ inherit pkgs; {args} }}).drvPath");
    let unit = "units.\"web.service\" = \"[Service]\";";
    for (args, message) in [
        (
            format!("name = \"a b\"; {unit}"),
            "name \"a b\" must be one or more of",
        ),
        (
            "name = \"web\"; units.\"web\" = \"\";".to_owned(),
            "web: not a systemd unit file name",
        ),
        (
            "name = \"web\"; units.\"../x.service\" = \"\";".to_owned(),
            "../x.service: not a systemd unit file name",
        ),
        ("name = \"web\"; units = { };".to_owned(), "units is empty"),
        (
            format!("name = \"web\"; {unit} unitDir = \"run\";"),
            "unitDir \"run\" must be an absolute path",
        ),
        (
            "name = \"web\"; units.\"web.service\" = 3;".to_owned(),
            "units.\"web.service\" must be the unit's text",
        ),
    ] {
        let err = eval_error(&service(&args));
        assert!(err.contains(message), "{args}: {err}");
    }
    let err = eval_error(
        "(hailLib.mkManagerProfile { inherit pkgs; instances.web = { \
           jobUri = \"https://h/job/p/j/web\"; netrcFile = /etc/netrc; }; }).drvPath",
    );
    assert!(
        err.contains("instances.web.netrcFile is a Nix path"),
        "{err}"
    );
}

#[test]
fn blue_green_example_builds_and_its_scripts_parse() {
    for script in ["blue-green.sh", "nginx-reload.sh"] {
        let path = repo().join("examples/blue-green").join(script);
        let output = run(std::process::Command::new("sh").arg("-n").arg(&path), "");
        assert!(
            output.status.success(),
            "{script}: {}",
            output_text(&output)
        );
    }
    let store = Store::new();
    let profile = store.build(None, &blue_green_expr(""));
    assert_blue_green_layout(&store, &profile);
    let activate = store.read(&format!("{profile}/bin/activate"));
    assert!(
        activate.contains("export PATH='/bin:/usr/bin'"),
        "{activate}"
    );
    let proxy = store.read(&format!("{profile}/share/blue-green/proxy.service"));
    assert!(
        proxy.contains("ExecStart=/usr/sbin/nginx -e stderr -c /nix/store/"),
        "{proxy}"
    );

    // A new version changes the colours' units and nothing of the proxy, which
    // is then reloaded, not restarted.
    let next = store.build(None, &blue_green_expr("-v2"));
    for same in ["proxy.service", "blue/upstream.conf", "green/upstream.conf"] {
        assert_eq!(
            store.read(&format!("{profile}/share/blue-green/{same}")),
            store.read(&format!("{next}/share/blue-green/{same}")),
            "{same}"
        );
    }
    assert_ne!(
        store.read(&format!("{profile}/share/blue-green/blue/unit")),
        store.read(&format!("{next}/share/blue-green/blue/unit"))
    );
}

fn blue_green_expr(version: &str) -> String {
    format!(
        "import {}/examples/blue-green {{ inherit pkgs; name = \"app\"; \
         serve = port: \"/opt/app{version}/bin/serve ${{toString port}}\"; \
         healthCheck = port: \"curl -fsS http://127.0.0.1:${{toString port}}/health\"; \
         ports = {{ proxy = 9080; blue = 9081; green = 9082; }}; \
         nginx = \"/usr/sbin/nginx\"; path = \"/bin:/usr/bin\"; }}",
        repo().display()
    )
}

fn assert_blue_green_layout(store: &Store, profile: &str) {
    let share = format!("{profile}/share/blue-green");
    assert_eq!(
        store.list(&format!("{profile}/bin")),
        ["activate", "blue-green", "deactivate"]
    );
    assert_eq!(store.list(&share), ["blue", "green", "proxy.service"]);
    for colour in ["blue", "green"] {
        assert_eq!(
            store.list(&format!("{share}/{colour}")),
            ["health-check", "unit", "upstream.conf"]
        );
        assert!(store.is_executable(&format!("{share}/{colour}/health-check")));
    }
    let blue = store.read(&format!("{share}/blue/unit"));
    assert!(blue.contains("ExecStart=/opt/app"), "{blue}");
    assert!(blue.contains("/bin/serve 9081\n"), "{blue}");
    assert!(
        store
            .read(&format!("{share}/green/upstream.conf"))
            .contains("server 127.0.0.1:9082;")
    );
    assert!(
        store
            .read(&format!("{share}/blue/health-check"))
            .contains("http://127.0.0.1:9081/health")
    );
    let activate = store.read(&format!("{profile}/bin/activate"));
    assert!(
        activate.contains(&format!("export BG_SHARE={share}\n"))
            && activate.contains(&format!("exec {profile}/bin/blue-green activate\n")),
        "{activate}"
    );
    for bin in ["activate", "deactivate", "blue-green"] {
        assert!(
            store.is_executable(&format!("{profile}/bin/{bin}")),
            "{bin}"
        );
    }
}

#[test]
fn defaults_that_use_nixpkgs_lib() {
    let Some(lib) = crate::units::nixpkgs_lib("nixlib::defaults_that_use_nixpkgs_lib") else {
        return;
    };
    let store = Store::new();
    // Packages as nixpkgs' lib sees them; nothing here builds them.
    let fake = |name: &str| {
        format!(
            "{name} = {{ type = \"derivation\"; name = \"{name}\"; \
             outPath = \"/nix/store/00000000000000000000000000000000-{name}\"; }};"
        )
    };
    let packages: String = ["coreutils", "diffutils", "procps", "systemd", "nginx"]
        .iter()
        .map(|p| fake(p))
        .collect();
    let profile = store.build(
        Some(&lib),
        &format!(
            "let p = pkgs // {{ {packages} }}; in \
             assert p.lib.isDerivation (hailLib.mkServiceProfile {{ pkgs = p; name = \"x\"; \
               units.\"x.service\" = \"\"; }}); \
             assert p.lib.isDerivation (hailLib.mkManagerProfile {{ pkgs = p; instances = {{ }}; }}); \
             import {}/examples/blue-green {{ pkgs = p; name = \"app\"; \
               serve = port: \"/opt/app/bin/serve ${{toString port}}\"; \
               healthCheck = port: \"curl -fsS http://127.0.0.1:${{toString port}}/health\"; \
               ports = {{ proxy = 9080; blue = 9081; green = 9082; }}; }}",
            repo().display()
        ),
    );
    assert_blue_green_layout(&store, &profile);
    let store_path = |p: &str| format!("/nix/store/00000000000000000000000000000000-{p}");
    let activate = store.read(&format!("{profile}/bin/activate"));
    let path = ["coreutils", "diffutils", "procps", "systemd"]
        .map(|p| format!("{}/bin", store_path(p)))
        .join(":");
    assert!(
        activate.contains(&format!("export PATH='{path}'\n")),
        "{activate}"
    );
    let proxy = store.read(&format!("{profile}/share/blue-green/proxy.service"));
    assert!(
        proxy.contains(&format!(
            "ExecStart={}/bin/nginx -e stderr",
            store_path("nginx")
        )),
        "{proxy}"
    );
}
