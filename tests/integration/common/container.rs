//! Real systemd as PID 1: a minimal Debian 12 container booted with
//! `systemd-nspawn`, isolated the way `../shared/TESTING.md` ("systemd: two
//! levels") says it must be: nspawn runs inside a private mount namespace
//! (`unshare --mount --propagation private`) with a tmpfs on `/run/systemd`,
//! from a cgroup subtree of its own, so that neither the container's systemd
//! nor nspawn can touch the host's mounts or processes.
//!
//! The rootfs (`mmdebstrap --variant=minbase`, about 16 s and 275 MB) is built
//! once per package list under the cargo target dir, behind a lock file; each
//! container boots a fresh copy of it. The container shares the host's
//! network, so it reaches a Hydra stand-in on the host's 127.0.0.1.
//!
//! A container that reboots itself (`systemctl reboot` in there) makes nspawn
//! exit with status 133, on which `systemd-nspawn@.service` would start it
//! again; [`Container::wait_for_reboot`] does that. Each boot gets a boot ID
//! of its own (nspawn mounts a fresh one), and the journal is persistent.
//!
//! Dropping a [`Container`] always powers it off, ends what is left of it,
//! removes its cgroup subtree and its rootfs copy: after a pass, a failure or
//! a panic. Leftovers of a test process that was killed outright are reaped
//! by the next run.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::process::{Pid, Signal};

use super::{Run, World, run_bounded};

/// The Debian suite of the rootfs: the same as the host's, so the hail binary
/// that cargo built runs in it.
const SUITE: &str = "bookworm";
/// What the rootfs holds on top of `minbase`: systemd as init, nix-env for
/// hail, procps for looking around when a test fails (and `pgrep` for the
/// blue-green example), busybox (`httpd`, `wget`) and nginx for the service
/// profiles and the blue-green example (`services::`).
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "nix-bin",
    "procps",
    "busybox",
    "nginx",
];
/// Run by mmdebstrap on the finished rootfs (`$1`): Debian's nginx.service would
/// listen on port 80 of the network every container shares with the host.
const CUSTOMIZE_HOOKS: &[&str] = &["ln -sf /dev/null \"$1/etc/systemd/system/nginx.service\""];
/// Names of containers, cgroups and rootfs copies: `hail-test-PID-N`.
const PREFIX: &str = "hail-test-";
/// PATH for commands run in the container.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

const BOOT_LIMIT: Duration = Duration::from_secs(60);
const POWEROFF_LIMIT: Duration = Duration::from_secs(30);
/// How systemd-nspawn exits when the container rebooted (systemd-nspawn(1)).
const NSPAWN_REBOOTED: i32 = 133;

/// A booted (or powered-off) systemd container.
pub struct Container {
    name: String,
    /// Per-container directory: `rootfs/` and the console logs.
    dir: PathBuf,
    rootfs: PathBuf,
    /// Our cgroup subtree, one directory per hierarchy that systemd uses.
    cgroups: Vec<PathBuf>,
    /// `systemd-nspawn` (the launching shell and `unshare` exec into it).
    nspawn: Option<Child>,
    /// The container's PID 1, as the host sees it.
    leader: Option<u32>,
    boots: u32,
}

impl Container {
    /// A fresh copy of the test rootfs, not booted yet: write files into it
    /// with [`Container::write`], then [`Container::boot`].
    pub fn new() -> Self {
        check_prerequisites();
        reap_stale();
        let base = base_rootfs();
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = containers_dir().join(&name);
        let rootfs = dir.join("rootfs");
        let container = Self {
            name,
            dir,
            rootfs,
            cgroups: Vec::new(),
            nspawn: None,
            leader: None,
            boots: 0,
        };
        // From here on, Drop cleans up whatever exists.
        fs::create_dir_all(&container.dir).expect("container dir");
        let copied = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&base)
            .arg(&container.rootfs)
            .status()
            .expect("run cp");
        assert!(copied.success(), "cannot copy {}", base.display());
        container
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where `path` (absolute, as the container sees it) is on the host.
    /// Writing there is writing into the container, booted or not.
    pub fn path(&self, path: &str) -> PathBuf {
        self.rootfs.join(path.trim_start_matches('/'))
    }

    /// Writes a file into the container (parents created), with `mode`.
    pub fn write(&self, path: &str, contents: impl AsRef<[u8]>, mode: u32) {
        let host = self.path(path);
        if let Some(parent) = host.parent() {
            fs::create_dir_all(parent).expect("parent dir in the container");
        }
        fs::write(&host, contents).unwrap_or_else(|e| panic!("write {}: {e}", host.display()));
        fs::set_permissions(&host, fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Copies a host file into the container.
    pub fn install(&self, from: &Path, path: &str, mode: u32) {
        let contents = fs::read(from).unwrap_or_else(|e| panic!("read {}: {e}", from.display()));
        self.write(path, contents, mode);
    }

    /// A fresh container with hail installed as README says for other
    /// distributions: the binary in /usr/local/bin, the plain units in
    /// /etc/systemd/system, an env file `/etc/hail/INSTANCE.env` naming each
    /// `(instance, job)`'s job URI, and nix.conf trusting `world`'s cache.
    pub fn with_hail(world: &World, instances: &[(&str, &str)]) -> Self {
        let container = Self::new();
        container.install(
            Path::new(env!("CARGO_BIN_EXE_hail")),
            "/usr/local/bin/hail",
            0o755,
        );
        let units = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd");
        for unit in ["hail@.service", "hail@.timer", "hail-activate@.service"] {
            container.install(
                &units.join(unit),
                &format!("/etc/systemd/system/{unit}"),
                0o644,
            );
        }
        for (instance, job) in instances {
            container.write(
                &format!("/etc/hail/{instance}.env"),
                format!("HAIL_JOB_URI={}\n", world.hydra.job_uri(job)),
                0o644,
            );
        }
        container.write(
            "/etc/nix/nix.conf",
            world.cache.client_nix_config(&world.hydra.origin()),
            0o644,
        );
        container
    }

    /// A file in the container, if it exists (not following symlinks out of
    /// it: do not use this for paths that are symlinks).
    pub fn read(&self, path: &str) -> Option<String> {
        super::read_if_exists(&self.path(path))
    }

    /// Boots the container and waits until systemd says `running` (or
    /// `degraded`, listing the failed units).
    pub fn boot(&mut self) {
        assert!(self.nspawn.is_none(), "{} is already booted", self.name);
        let started = Instant::now();
        self.boots += 1;
        self.cgroups = cgroup_hierarchies()
            .into_iter()
            .map(|h| h.join(&self.name))
            .collect();
        for cgroup in &self.cgroups {
            fs::create_dir_all(cgroup)
                .unwrap_or_else(|e| panic!("create cgroup {}: {e}", cgroup.display()));
        }
        let console = self.console_log();
        let log = File::create(&console).expect("console log");
        // The shell moves itself into our cgroup subtree, then execs unshare,
        // which execs a shell that mounts the tmpfs and execs nspawn: the
        // child's pid ends up being nspawn's.
        let mut cmd = Command::new("sh");
        cmd.arg("-euc")
            .arg(
                r#"rootfs=$1 name=$2; shift 2
for cgroup in "$@"; do echo $$ > "$cgroup/cgroup.procs"; done
exec unshare --mount --propagation private -- sh -euc '
  mkdir -p /run/systemd
  mount -t tmpfs -o mode=0755 tmpfs /run/systemd
  exec systemd-nspawn -q -D "$1" -b --register=no --keep-unit --console=passive -M "$2"
' sh "$rootfs" "$name""#,
            )
            .arg("sh")
            .arg(&self.rootfs)
            .arg(&self.name)
            .args(&self.cgroups)
            .env_clear()
            .env("PATH", PATH)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("console log"))
            .stderr(log);
        // If this test process dies without dropping us, nspawn gets SIGTERM,
        // which powers the container off in order.
        // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
        unsafe {
            cmd.pre_exec(|| {
                rustix::process::set_parent_process_death_signal(Some(Signal::TERM))
                    .map_err(std::io::Error::from)
            });
        }
        let child = cmd.spawn().expect("start systemd-nspawn");
        let nspawn_pid = child.id();
        self.nspawn = Some(child);

        let deadline = Instant::now() + BOOT_LIMIT;
        let leader = loop {
            self.assert_nspawn_alive();
            if let Some(pid) = find_child(nspawn_pid, "systemd") {
                break pid;
            }
            assert!(
                Instant::now() < deadline,
                "{}: no systemd under nspawn after {BOOT_LIMIT:?}\n{}",
                self.name,
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.leader = Some(leader);
        let state = loop {
            self.assert_nspawn_alive();
            let run = self.exec(&["systemctl", "is-system-running"]);
            let state = run.stdout.trim().to_owned();
            if state == "running" || state == "degraded" {
                break state;
            }
            assert!(
                Instant::now() < deadline,
                "{}: systemd did not finish booting in {BOOT_LIMIT:?} (last state {state:?})\n{}",
                self.name,
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        if state == "degraded" {
            let failed = self.exec(&["systemctl", "--failed", "--no-legend"]);
            eprintln!("{}: booted degraded:\n{}", self.name, failed.stdout);
        }
        eprintln!(
            "{}: boot {} took {:.2?}",
            self.name,
            self.boots,
            started.elapsed()
        );
    }

    /// "Reboot": power off in order, wait, boot again (same rootfs).
    pub fn restart(&mut self) {
        self.poweroff();
        self.boot();
    }

    /// Waits (up to `limit`) for the container to reboot itself, then boots
    /// it again, as `systemd-nspawn@.service` would. Fails if nspawn goes on
    /// running, or exits for anything but a reboot (a poweroff, a crash).
    pub fn wait_for_reboot(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        let status = loop {
            let nspawn = self
                .nspawn
                .as_mut()
                .unwrap_or_else(|| panic!("{} is not booted", self.name));
            if let Some(status) = nspawn.try_wait().expect("wait for systemd-nspawn") {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "{}: did not reboot in {limit:?}\n{}",
                self.name,
                self.console_tail()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        self.nspawn = None;
        assert_eq!(
            status.code(),
            Some(NSPAWN_REBOOTED),
            "{}: systemd-nspawn exited with {status}, not for a reboot\n{}",
            self.name,
            self.console_tail()
        );
        eprintln!("{}: rebooted itself after boot {}", self.name, self.boots);
        // With nspawn gone, what is left of poweroff: the cgroup subtree.
        self.poweroff();
        self.boot();
    }

    /// This boot's ID, as `/proc/sys/kernel/random/boot_id` in the container
    /// says (with dashes; `journalctl --list-boots` shows it without).
    pub fn boot_id(&self) -> String {
        let run = self.exec(&["cat", "/proc/sys/kernel/random/boot_id"]);
        assert_eq!(run.code, Some(0), "cannot read the boot ID: {run:?}");
        run.out()
    }

    /// Powers the container off in order (SIGTERM to nspawn makes it send
    /// SIGRTMIN+3 to systemd), waits for it, then ends whatever is left in
    /// our cgroup subtree and removes the subtree.
    pub fn poweroff(&mut self) {
        if let Some(mut nspawn) = self.nspawn.take() {
            let started = Instant::now();
            signal(nspawn.id(), Signal::TERM);
            let deadline = Instant::now() + POWEROFF_LIMIT;
            loop {
                match nspawn.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!(
                            "{}: did not power off in {POWEROFF_LIMIT:?}; killing it",
                            self.name
                        );
                        signal(nspawn.id(), Signal::KILL);
                        if let Some(leader) = self.leader {
                            signal(leader, Signal::KILL);
                        }
                        let _ = nspawn.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            eprintln!("{}: poweroff took {:.2?}", self.name, started.elapsed());
        }
        self.leader = None;
        for cgroup in std::mem::take(&mut self.cgroups) {
            remove_cgroup(&cgroup);
        }
    }

    /// Runs a command in the container (all its namespaces, its root and
    /// working directory), with a clean environment; bounded in time.
    pub fn exec(&self, args: &[&str]) -> Run {
        let leader = self
            .leader
            .unwrap_or_else(|| panic!("{} is not booted", self.name));
        run_bounded(self.nsenter(leader, args))
    }

    /// `sh -c SCRIPT` in the container.
    pub fn sh(&self, script: &str) -> Run {
        self.exec(&["sh", "-c", script])
    }

    /// `systemctl ARGS…` in the container.
    pub fn systemctl(&self, args: &[&str]) -> Run {
        let mut all = vec!["systemctl", "--no-pager"];
        all.extend_from_slice(args);
        self.exec(&all)
    }

    /// `systemctl show UNIT -p PROPERTY --value`.
    pub fn show(&self, unit: &str, property: &str) -> String {
        self.systemctl(&["show", unit, "-p", property, "--value"])
            .out()
    }

    /// `systemctl is-active UNIT`: active, inactive, failed, activating, …
    pub fn is_active(&self, unit: &str) -> String {
        self.systemctl(&["is-active", unit]).out()
    }

    /// `systemctl is-enabled UNIT`.
    pub fn is_enabled(&self, unit: &str) -> String {
        self.systemctl(&["is-enabled", unit]).out()
    }

    /// The lines of a file, read inside the container (so /run is its own
    /// tmpfs); none if the file does not exist, and any other failure to read
    /// it fails the test.
    pub fn lines(&self, path: &str) -> Vec<String> {
        let run = self.exec(&["sh", "-c", "[ ! -e \"$1\" ] || cat -- \"$1\"", "sh", path]);
        assert_eq!(
            run.code,
            Some(0),
            "cannot read {path} in the container: {run:?}"
        );
        run.stdout.lines().map(str::to_owned).collect()
    }

    /// `journalctl -u UNIT` in the container, messages only.
    pub fn journal(&self, unit: &str) -> String {
        self.exec(&["journalctl", "--no-pager", "-o", "cat", "-u", unit])
            .stdout
    }

    fn nsenter(&self, leader: u32, args: &[&str]) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg("-t")
            .arg(leader.to_string())
            .args(["-m", "-u", "-i", "-p", "-C", "-r", "-w", "--"])
            .args(args)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("HOME", "/root")
            .env("TERM", "dumb")
            .stdin(Stdio::null());
        cmd
    }

    fn console_log(&self) -> PathBuf {
        self.dir.join(format!("console-{}.log", self.boots))
    }

    fn console_tail(&self) -> String {
        let text = fs::read_to_string(self.console_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("--- console of {} (last lines)\n{tail}", self.name)
    }

    fn assert_nspawn_alive(&mut self) {
        let nspawn = self.nspawn.as_mut().expect("nspawn started");
        if let Ok(Some(status)) = nspawn.try_wait() {
            self.nspawn = None;
            panic!(
                "{}: systemd-nspawn exited with {status} while booting\n{}",
                self.name,
                self.console_tail()
            );
        }
    }

    /// What helps most when a test failed: the end of the container's
    /// journal. Never panics (it runs from Drop while unwinding).
    fn dump_journal(&self) {
        let Some(leader) = self.leader else { return };
        let mut cmd = self.nsenter(
            leader,
            &[
                "timeout",
                "10",
                "journalctl",
                "--no-pager",
                "-n",
                "80",
                "-o",
                "short-monotonic",
            ],
        );
        if let Ok(out) = cmd.output() {
            eprintln!(
                "--- journal of {} (last lines)\n{}",
                self.name,
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_journal();
        }
        self.poweroff();
        remove_copy(&self.dir);
    }
}

/// The test needs these; CI installs them (`.ci/run`). Fail loudly, never skip.
fn check_prerequisites() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the systemd:: tests boot a container with systemd-nspawn and must run as root"
    );
    for (tool, package) in [
        ("systemd-nspawn", "systemd-container"),
        ("unshare", "util-linux"),
        ("nsenter", "util-linux"),
        ("cp", "coreutils"),
    ] {
        assert!(
            on_path(tool),
            "the systemd:: tests need {tool}: apt-get install -y {package}"
        );
    }
    assert!(
        !cgroup_hierarchies().is_empty(),
        "the systemd:: tests need a cgroup hierarchy for systemd: /sys/fs/cgroup as cgroup2 \
         (or /sys/fs/cgroup/systemd); none is mounted"
    );
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_else(|| std::env::split_paths(PATH).collect())
        .iter()
        .any(|dir| dir.join(tool).is_file())
}

/// The cgroup hierarchies a subtree is needed in: the unified hierarchy when
/// it is all there is, else the named `systemd` one plus the unified one of
/// a hybrid layout.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    ["systemd", "unified"]
        .iter()
        .map(|h| root.join(h))
        .filter(|h| h.join("cgroup.procs").exists())
        .collect()
}

/// Ends every process left in a cgroup subtree of ours and removes it.
fn remove_cgroup(cgroup: &Path) {
    if !cgroup.exists() {
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(cgroup, &mut dirs);
        let pids: Vec<u32> = dirs
            .iter()
            .filter_map(|d| fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|procs| {
                procs
                    .lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<u32>>()
            })
            .collect();
        for &pid in &pids {
            signal(pid, Signal::KILL);
        }
        // Deepest first: a cgroup with children cannot be removed.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        let mut left = false;
        for dir in &dirs {
            if fs::remove_dir(dir).is_err() && dir.exists() {
                left = true;
            }
        }
        if !left {
            return;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "cannot remove cgroup {} (processes {pids:?} remain)",
                cgroup.display()
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_path_buf());
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            collect_dirs(&entry.path(), out);
        }
    }
}

fn signal(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// A child of `parent` whose command name is `comm`.
fn find_child(parent: u32, comm: &str) -> Option<u32> {
    fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            // "PID (COMM) STATE PPID …"; COMM may contain spaces and parens.
            let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                return false;
            };
            let ppid = stat[close + 1..].split_whitespace().nth(1);
            &stat[open + 1..close] == comm && ppid == Some(parent.to_string().as_str())
        })
}

fn target_tmp() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn containers_dir() -> PathBuf {
    target_tmp().join("hail-test-containers")
}

/// Removes a rootfs copy, unless something is still mounted below it (then
/// removing could reach into whatever is mounted there: leave it, say so).
fn remove_copy(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|point| Path::new(point).starts_with(dir));
    if mounted {
        eprintln!(
            "not removing {}: something is mounted below it",
            dir.display()
        );
        return;
    }
    if let Err(e) = fs::remove_dir_all(dir) {
        eprintln!("cannot remove {}: {e}", dir.display());
    }
}

/// Cleans up after test processes that died without dropping their
/// containers (killed by a timeout, say): their cgroup subtrees and rootfs
/// copies, recognised by name (`hail-test-PID-N` with PID gone).
fn reap_stale() {
    let stale = |name: &str| {
        name.strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    for hierarchy in cgroup_hierarchies() {
        for entry in fs::read_dir(&hierarchy).into_iter().flatten().flatten() {
            if entry.file_name().to_str().is_some_and(stale) {
                eprintln!("removing stale cgroup {}", entry.path().display());
                remove_cgroup(&entry.path());
            }
        }
    }
    for entry in fs::read_dir(containers_dir())
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.file_name().to_str().is_some_and(stale) {
            eprintln!("removing stale container copy {}", entry.path().display());
            remove_copy(&entry.path());
        }
    }
}

/// FNV-1a: a stable name for a package list (std's hasher may change).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The test rootfs, built by the first test that needs it (others wait on the
/// lock file) and kept under the cargo target dir, one per package list.
fn base_rootfs() -> PathBuf {
    let packages = PACKAGES.join(",");
    let hooks = CUSTOMIZE_HOOKS.join("\n");
    let key = format!(
        "{SUITE}-{:016x}",
        fnv1a(format!("{SUITE} minbase {packages} {hooks}").as_bytes())
    );
    let root = target_tmp().join("hail-test-rootfs");
    let done = root.join(&key);
    // Renamed into place only when complete.
    if done.exists() {
        return done;
    }
    fs::create_dir_all(&root).expect("rootfs cache dir");
    let lock = File::create(root.join(format!("{key}.lock"))).expect("rootfs lock file");
    lock.lock().expect("lock the rootfs cache");
    if done.exists() {
        return done;
    }
    assert!(
        on_path("mmdebstrap"),
        "the systemd:: tests build a Debian rootfs with mmdebstrap: apt-get install -y mmdebstrap"
    );
    let partial = root.join(format!("{key}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).expect("remove a partial rootfs");
    }
    let log_path = root.join(format!("{key}.log"));
    let mut log = File::create(&log_path).expect("mmdebstrap log");
    eprintln!(
        "building the systemd test rootfs {} (once; about 20 s)",
        done.display()
    );
    let started = Instant::now();
    let status = Command::new("mmdebstrap")
        .args(["--variant=minbase", "--include"])
        .arg(&packages)
        .args(
            CUSTOMIZE_HOOKS
                .iter()
                .map(|h| format!("--customize-hook={h}")),
        )
        .arg(SUITE)
        .arg(&partial)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("mmdebstrap log"))
        .stderr(log.try_clone().expect("mmdebstrap log"))
        .status()
        .expect("run mmdebstrap");
    let _ = writeln!(log, "exit: {status}");
    assert!(
        status.success(),
        "mmdebstrap failed ({status}); see {}:\n{}",
        log_path.display(),
        fs::read_to_string(&log_path).unwrap_or_default()
    );
    fs::rename(&partial, &done).expect("put the rootfs in place");
    eprintln!("built the test rootfs in {:.1?}", started.elapsed());
    done
}
