//! A real, signed binary cache: profiles are built by real Nix in a chroot
//! store (so they are not in /nix/store until hail substitutes them) and
//! copied with `nix copy` into a `file://` cache that the Hydra stand-in
//! serves over HTTP.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

/// Options for the helper nix commands: never reach for cache.nixos.org,
/// build as root without build users, and let the builder see /bin/sh.
pub const BUILDER_NIX_CONFIG: &str = "substituters =\nbuild-users-group =\nsandbox = true\nsandbox-paths = /bin /lib /lib64 /usr\nexperimental-features = nix-command\n";

pub struct Cache {
    root: PathBuf,
    pub dir: PathBuf,
    secret_key: PathBuf,
    pub public_key: String,
}

impl Cache {
    pub fn new(base: &Path) -> Self {
        let root = base.join("hydra-store");
        let dir = base.join("cache");
        std::fs::create_dir_all(&dir).expect("cache dir");
        let secret_key = base.join("cache.sk");
        let public = base.join("cache.pk");
        let name = format!(
            "hail-test-{}",
            base.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        run(nix_command("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(&name)
            .arg(&secret_key)
            .arg(&public));
        let public_key = std::fs::read_to_string(&public)
            .expect("public key")
            .trim()
            .to_owned();
        Self {
            root,
            dir,
            secret_key,
            public_key,
        }
    }

    /// Builds a profile whose `bin/activate` is `activate`, unique to this
    /// call, in the chroot store. Returns its store path.
    pub fn build(&self, label: &str, activate: &str) -> String {
        self.build_with_deactivate(label, activate, "")
    }

    /// Like [`Cache::build`], with a `bin/deactivate` too (unless empty).
    pub fn build_with_deactivate(&self, label: &str, activate: &str, deactivate: &str) -> String {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nonce = format!(
            "{}-{}-{:?}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
        );
        let expr =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/integration/common/profile.nix");
        let out = run(nix_command("nix-build")
            .arg("--store")
            .arg(self.store_uri())
            .arg("--no-out-link")
            .arg(expr)
            .args([
                "--argstr",
                "label",
                label,
                "--argstr",
                "nonce",
                &nonce,
                "--argstr",
                "activate",
                activate,
                "--argstr",
                "deactivate",
                deactivate,
            ]));
        out.lines()
            .last()
            .expect("nix-build prints the path")
            .to_owned()
    }

    /// Builds the Nix expression `expr` in the chroot store (with the host's
    /// /bin/sh as the only builder tool: see `stub-pkgs.nix`). Returns its
    /// output paths, in the order nix-build prints them.
    pub fn build_expr(&self, expr: &str) -> Vec<String> {
        let out = run(nix_command("nix-build")
            .arg("--store")
            .arg(self.store_uri())
            .args(["--no-out-link", "-E", expr]));
        out.lines().map(str::to_owned).collect()
    }

    /// Copies `path` into the cache, signed with the cache's key.
    pub fn publish(&self, path: &str) {
        let to = format!(
            "file://{}?secret-key={}",
            self.dir.display(),
            self.secret_key.display()
        );
        self.copy(path, &to);
    }

    /// Copies `path` into the cache without a signature.
    pub fn publish_unsigned(&self, path: &str) {
        let to = format!("file://{}", self.dir.display());
        self.copy(path, &to);
    }

    fn copy(&self, path: &str, to: &str) {
        run(nix_command("nix")
            .args(["copy", "--from"])
            .arg(self.store_uri())
            .args(["--to", to, path]));
    }

    fn store_uri(&self) -> String {
        format!("local?root={}", self.root.display())
    }

    /// The nix.conf text a host needs to substitute from this cache at `origin`.
    pub fn client_nix_config(&self, origin: &str) -> String {
        format!(
            "substituters = {origin}\ntrusted-public-keys = {}\nnarinfo-cache-negative-ttl = 0\nnarinfo-cache-positive-ttl = 0\nbuild-users-group =\nconnect-timeout = 5\n",
            self.public_key
        )
    }

    /// The compressed NAR of `path` in the cache, as its narinfo names it.
    pub fn nar_file(&self, path: &str) -> PathBuf {
        let hash = path
            .trim_start_matches("/nix/store/")
            .split('-')
            .next()
            .unwrap_or_default();
        let narinfo = std::fs::read_to_string(self.dir.join(format!("{hash}.narinfo")))
            .expect("the path is in the cache");
        let url = narinfo
            .lines()
            .find_map(|l| l.strip_prefix("URL: "))
            .expect("narinfo has a URL");
        self.dir.join(url)
    }
}

pub fn nix_command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    cmd.env("NIX_CONFIG", BUILDER_NIX_CONFIG)
        .env_remove("NIX_REMOTE");
    cmd
}

/// Runs a helper command, panicking with its stderr if it fails.
pub fn run(cmd: &mut Command) -> String {
    let output = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} — the tests need Nix: apt-get install -y nix-bin")
    });
    assert!(
        output.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
