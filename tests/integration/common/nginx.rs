//! A real nginx (`nginx-light`, installed by tests/run) on 127.0.0.1, with a
//! configuration of the test's own in a temporary prefix, stopped on drop.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// How long nginx may take to listen, per attempt.
const START_LIMIT: Duration = Duration::from_secs(10);
/// Ports are picked free and may be taken before nginx binds them: tries.
const START_ATTEMPTS: usize = 5;
/// How long a request's log line may lag behind its answer.
const LOG_LIMIT: Duration = Duration::from_secs(5);

pub struct Nginx {
    pub port: u16,
    child: Child,
    dir: TempDir,
}

/// One line of the access log: what a client asked and what nginx answered.
#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub uri: String,
    pub status: u16,
    /// Status line, headers and body, as nginx counts them (`$bytes_sent`).
    pub bytes_sent: u64,
    /// `$upstream_cache_status`: `HIT`, `MISS`, `BYPASS`, … or `-`.
    pub cache: String,
}

impl Nginx {
    /// Starts nginx whose `http {}` block holds `http(port, prefix)`: the
    /// caller's servers, which listen on `127.0.0.1:port` and may keep files
    /// under `prefix`. Every request is logged for [`Nginx::access_log`].
    pub fn start(http: impl Fn(u16, &Path) -> String) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hail-nginx-")
            .tempdir()
            .expect("temp dir");
        let p = dir.path().display().to_string();
        let mut errors = String::new();
        for _ in 0..START_ATTEMPTS {
            let port = super::free_port();
            let conf = format!(
                "daemon off; master_process off; pid {p}/nginx.pid; error_log {p}/error.log;\n\
                 events {{}}\n\
                 http {{\n\
                 log_format test '$request_method $request_uri $status $bytes_sent $upstream_cache_status';\n\
                 access_log {p}/access.log test;\n\
                 client_body_temp_path {p}; proxy_temp_path {p}; fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n\
                 {}\n}}\n",
                http(port, dir.path())
            );
            std::fs::write(dir.path().join("nginx.conf"), conf).expect("write nginx.conf");
            let mut child = Command::new("nginx")
                .args(["-p", &p, "-c", &format!("{p}/nginx.conf"), "-e"])
                .arg(format!("{p}/error.log"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("nginx (apt-get install nginx-light)");
            let deadline = Instant::now() + START_LIMIT;
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Self { port, child, dir };
                }
                if child.try_wait().expect("nginx status").is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    errors +=
                        &std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx did not start in {START_ATTEMPTS} attempts:\n{errors}");
    }

    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The access log once it has at least `lines` lines (nginx logs a
    /// request just after answering it), or after a few seconds: all of it.
    pub fn access_log_of(&self, lines: usize) -> Vec<Logged> {
        let deadline = Instant::now() + LOG_LIMIT;
        loop {
            let log = self.access_log();
            if log.len() >= lines || Instant::now() > deadline {
                return log;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Every request nginx has logged so far, oldest first.
    pub fn access_log(&self) -> Vec<Logged> {
        let log = super::read_if_exists(&self.dir.path().join("access.log")).unwrap_or_default();
        log.lines()
            .map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                let [method, uri, status, bytes_sent, cache] = fields[..] else {
                    panic!("unexpected access log line {line:?}");
                };
                Logged {
                    method: method.into(),
                    uri: uri.into(),
                    status: status.parse().expect("status in the access log"),
                    bytes_sent: bytes_sent.parse().expect("bytes in the access log"),
                    cache: cache.into(),
                }
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
