//! The one way hail runs an external command: in its own process group, stdin
//! closed, with a deadline that ends the whole group (SIGTERM, a grace period,
//! SIGKILL), and at most a few KiB of its output kept. A failure is explained
//! in one error: the command line, how it ended, the last lines of its stderr
//! and, for a timeout, what to do about it.

use std::collections::VecDeque;
use std::fmt;
use std::io::{Read, Write};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How many of a child's last lines an error may quote…
pub const QUOTED_LINES: usize = 20;
/// …and how many bytes of each: a quote is at most a few KiB however much
/// the child wrote.
pub const QUOTED_LINE_BYTES: usize = 400;
/// After SIGTERM, how long the group leader may take to go before SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After the child exits, how long its output may take to drain. A daemon it
/// started in the background can hold the pipes open forever; we do not wait
/// for that.
const DRAIN: Duration = Duration::from_millis(500);
/// Echoed output is written a line at a time, or in pieces this long for
/// longer lines, so a line without end cannot fill memory.
const ECHO_PIECE: usize = 8192;

/// Which of a child's output is copied to hail's stderr (the journal, under
/// systemd) as it is written. Whatever is not echoed is still kept for the
/// error message, bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Echo {
    Nothing,
    Stderr,
    /// stdout and stderr.
    Both,
}

/// How long a command may run, and what the error tells the operator to do
/// when it runs longer.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    after: Duration,
    advice: &'static str,
}

impl Deadline {
    pub const fn new(after: Duration, advice: &'static str) -> Self {
        Self { after, advice }
    }
}

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Exited(ExitStatus),
    /// Ran past its deadline; its process group was ended.
    TimedOut(Duration),
}

impl Ending {
    pub fn success(&self) -> bool {
        matches!(self, Self::Exited(status) if status.success())
    }
}

impl fmt::Display for Ending {
    /// "exited with status 1", "was killed by signal 9", "timed out after 600 s".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use std::os::unix::process::ExitStatusExt;
        match self {
            Self::Exited(status) => match (status.code(), status.signal()) {
                (Some(code), _) => write!(f, "exited with status {code}"),
                (None, Some(signal)) => write!(f, "was killed by signal {signal}"),
                (None, None) => write!(f, "ended with {status}"),
            },
            Self::TimedOut(after) if after.subsec_millis() == 0 => {
                write!(f, "timed out after {} s", after.as_secs())
            }
            Self::TimedOut(after) => write!(f, "timed out after {:.1} s", after.as_secs_f64()),
        }
    }
}

/// A child that has ended, with the last lines of what it wrote.
#[derive(Debug)]
pub struct Finished {
    pub ending: Ending,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// Sees each line of a child's stderr as it comes (without its line end),
/// say to report progress.
pub type Watch = Box<dyn FnMut(&str) + Send>;

/// Runs `cmd` to its end or its deadline (then ends its whole process group),
/// echoing its output as `echo` says. Fails only if it cannot be started.
pub fn run_bounded(cmd: Command, deadline: Duration, echo: Echo) -> Result<Finished> {
    run_watched(cmd, deadline, echo, None)
}

/// Like [`run_bounded`], with `watch` seeing its stderr line by line.
fn run_watched(
    mut cmd: Command,
    deadline: Duration,
    echo: Echo,
    watch: Option<Watch>,
) -> Result<Finished> {
    use std::os::unix::process::CommandExt;
    let shown = display(&cmd);
    cmd.env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| match cmd.get_program().to_str() {
            Some(program) if !program.contains('/') => {
                format!("cannot run {shown} (is it on PATH?)")
            }
            _ => format!("cannot run {shown}"),
        })?;
    let pid = child.id();
    let stdout = Arc::new(Mutex::new(LastLines::default()));
    let stderr = Arc::new(Mutex::new(LastLines::default()));
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(collect(out, echo == Echo::Both, None, Arc::clone(&stdout)));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(collect(
            err,
            echo != Echo::Nothing,
            watch,
            Arc::clone(&stderr),
        ));
    }

    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let waited = |timeout| done.recv_timeout(timeout).ok();
    let ending = match waited(deadline) {
        Some(status) => Ending::Exited(status.with_context(|| format!("cannot wait for {shown}"))?),
        None => {
            log::warn!(
                "{shown} did not finish within {} s; ending its process group",
                deadline.as_secs_f64()
            );
            kill_group(pid, rustix::process::Signal::TERM);
            waited(KILL_GRACE);
            // Whatever ignored SIGTERM, leader or not, must not outlive the deadline.
            kill_group(pid, rustix::process::Signal::KILL);
            Ending::TimedOut(deadline)
        }
    };
    drain(readers);
    let lines = |kept: &Mutex<LastLines>| kept.lock().map(|l| l.lines()).unwrap_or_default();
    Ok(Finished {
        ending,
        stdout: lines(&stdout),
        stderr: lines(&stderr),
    })
}

/// Runs `cmd` (see [`run_bounded`]) and fails, quoting the last lines of its
/// stderr, unless it exits 0 before its deadline.
pub fn run(cmd: Command, deadline: Deadline, echo: Echo) -> Result<()> {
    checked(cmd, deadline, echo, None).map(drop)
}

/// Like [`run`], with `watch` seeing its stderr line by line as it comes.
pub fn run_and_watch(cmd: Command, deadline: Deadline, echo: Echo, watch: Watch) -> Result<()> {
    checked(cmd, deadline, echo, Some(watch)).map(drop)
}

/// Like [`run`], for a command whose answer is on stdout: its last lines.
pub fn output(cmd: Command, deadline: Deadline) -> Result<Vec<String>> {
    checked(cmd, deadline, Echo::Nothing, None).map(|finished| finished.stdout)
}

fn checked(cmd: Command, deadline: Deadline, echo: Echo, watch: Option<Watch>) -> Result<Finished> {
    let shown = display(&cmd);
    let finished = run_watched(cmd, deadline.after, echo, watch)?;
    if finished.ending.success() {
        return Ok(finished);
    }
    let quoted = quote(finished.stderr)
        .map(|t| format!(":\n{t}"))
        .unwrap_or_default();
    match finished.ending {
        Ending::TimedOut(_) => bail!(
            "{shown} {} (its process group was ended); {}{quoted}",
            finished.ending,
            deadline.advice
        ),
        Ending::Exited(_) => bail!("{shown} {}{quoted}", finished.ending),
    }
}

/// The one place that decides how much of a child's output a message quotes:
/// the last [`QUOTED_LINES`] of `lines` (already cut to [`QUOTED_LINE_BYTES`]
/// each by [`LastLines`]), or `None` if there are none.
pub fn quote(lines: impl IntoIterator<Item = String>) -> Option<String> {
    let lines: Vec<String> = lines.into_iter().collect();
    let start = lines.len().saturating_sub(QUOTED_LINES);
    (!lines.is_empty()).then(|| lines[start..].join("\n"))
}

/// The last non-blank lines of a stream, each cut to [`QUOTED_LINE_BYTES`]:
/// bounded memory however much the stream carries.
#[derive(Debug, Default)]
pub struct LastLines {
    lines: VecDeque<String>,
    /// The start of the line being read, up to the bytes kept of it.
    partial: Vec<u8>,
    /// How long the line being read is, kept or not.
    partial_len: usize,
}

impl LastLines {
    /// Takes the next bytes of the stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (piece, rest, ends_line) = match bytes.iter().position(|b| *b == b'\n') {
                Some(at) => (&bytes[..at], &bytes[at + 1..], true),
                None => (bytes, &[][..], false),
            };
            // A few bytes over the limit, so a character cut at the limit
            // can still be decoded whole.
            let room = (QUOTED_LINE_BYTES + 4).saturating_sub(self.partial.len());
            self.partial
                .extend_from_slice(&piece[..piece.len().min(room)]);
            self.partial_len += piece.len();
            if ends_line {
                self.end_line();
            }
            bytes = rest;
        }
    }

    /// The lines so far, including one not yet ended.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self.lines.iter().cloned().collect();
        lines.extend(self.cut_partial());
        lines
    }

    fn end_line(&mut self) {
        if let Some(line) = self.cut_partial() {
            if self.lines.len() == QUOTED_LINES {
                self.lines.pop_front();
            }
            self.lines.push_back(line);
        }
        self.partial.clear();
        self.partial_len = 0;
    }

    /// The line being read, cut to [`QUOTED_LINE_BYTES`] on a character
    /// boundary, saying how much was cut; `None` if it is blank.
    fn cut_partial(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.partial);
        let text = text.trim_end_matches('\r');
        if text.trim().is_empty() {
            return None;
        }
        if self.partial_len <= QUOTED_LINE_BYTES {
            return Some(text.to_owned());
        }
        let mut end = QUOTED_LINE_BYTES.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        Some(format!(
            "{}… [{} bytes cut]",
            &text[..end],
            self.partial_len - end
        ))
    }
}

/// Reads a child's stream to its end into `kept`, echoing it to our stderr
/// if asked and showing it to `watch`, a line (or [`ECHO_PIECE`]) at a time.
fn collect(
    mut from: impl Read + Send + 'static,
    echo: bool,
    mut watch: Option<Watch>,
    kept: Arc<Mutex<LastLines>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; ECHO_PIECE];
        let mut pending = Vec::new();
        let line_wise = echo || watch.is_some();
        let mut pass_on = |lines: &[u8]| {
            if echo {
                let _ = std::io::stderr().lock().write_all(lines);
            }
            if let Some(watch) = watch.as_mut() {
                for line in lines
                    .strip_suffix(b"\n")
                    .unwrap_or(lines)
                    .split(|b| *b == b'\n')
                {
                    watch(&String::from_utf8_lossy(line));
                }
            }
        };
        loop {
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            };
            let chunk = &buf[..n];
            if line_wise {
                pending.extend_from_slice(chunk);
                let whole = match pending.iter().rposition(|b| *b == b'\n') {
                    Some(at) => at + 1,
                    None if pending.len() >= ECHO_PIECE => pending.len(),
                    None => 0,
                };
                if whole > 0 {
                    pass_on(&pending[..whole]);
                    pending.drain(..whole);
                }
            }
            if let Ok(mut kept) = kept.lock() {
                kept.push(chunk);
            }
        }
        if !pending.is_empty() {
            pending.push(b'\n');
            pass_on(&pending);
        }
    })
}

/// Waits briefly for the output readers; abandons those whose pipe a
/// background process still holds.
fn drain(readers: Vec<JoinHandle<()>>) {
    let deadline = Instant::now() + DRAIN;
    for reader in readers {
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

fn kill_group(pid: u32, signal: rustix::process::Signal) {
    let pid = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // The group may already be gone; that is what we wanted.
        let _ = rustix::process::kill_process_group(pid, signal);
    }
}

/// The program and its arguments.
pub fn argv(cmd: &Command) -> Vec<String> {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy().into_owned())
        .collect()
}

/// The command line as a person would type it, for messages.
pub fn display(cmd: &Command) -> String {
    argv(cmd).join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADVICE: &str = "do something about it";

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    fn deadline(secs: f64) -> Deadline {
        Deadline::new(Duration::from_secs_f64(secs), ADVICE)
    }

    #[test]
    fn failure_carries_stderr_and_status() {
        let cmd = sh("echo first >&2; echo last words >&2; exit 7");
        let err = run(cmd, deadline(10.0), Echo::Nothing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("exited with status 7"), "{err}");
        assert!(err.contains("last words"), "{err}");
        assert!(!err.contains(ADVICE), "{err}");
    }

    #[test]
    fn missing_program_is_named() {
        let err = run(
            Command::new("hail-no-such-program"),
            deadline(10.0),
            Echo::Nothing,
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("hail-no-such-program"));
    }

    #[test]
    fn output_is_stdout() {
        let lines = output(sh("echo one; echo two; echo noise >&2"), deadline(10.0)).unwrap();
        assert_eq!(lines, ["one", "two"]);
    }

    #[test]
    fn watch_sees_each_stderr_line() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&seen);
        let watch: Watch = Box::new(move |line: &str| {
            if let Ok(mut lines) = lines.lock() {
                lines.push(line.to_owned());
            }
        });
        let cmd = sh("echo out; printf 'one\\ntwo\\n' >&2; sleep 0.1; printf 'no end' >&2");
        run_and_watch(cmd, deadline(10.0), Echo::Nothing, watch).unwrap();
        assert_eq!(*seen.lock().unwrap(), ["one", "two", "no end"]);
    }

    #[test]
    fn timeout_ends_the_group_and_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survived");
        // The background child ignores SIGTERM: only SIGKILL ends it.
        let script = format!(
            "(trap '' TERM; sleep 2; touch {}) & echo started >&2; sleep 30",
            marker.display()
        );
        let err = run(sh(&script), deadline(0.3), Echo::Nothing)
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out after 0.3 s"), "{err}");
        assert!(err.contains(ADVICE), "{err}");
        assert!(err.contains("started"), "{err}");
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            !marker.exists(),
            "a process of the group outlived the timeout"
        );
    }

    #[test]
    fn last_lines_are_bounded() {
        let mut kept = LastLines::default();
        for i in 0..100 {
            kept.push(format!("line {i}\n\n").as_bytes());
        }
        // One long line in pieces, with a multi-byte character at the cut.
        kept.push(&[b'x'; QUOTED_LINE_BYTES - 1]);
        kept.push("é".as_bytes());
        kept.push(&vec![b'y'; 1 << 20]);
        kept.push(b"\r\nno end");
        let lines = kept.lines();
        assert_eq!(lines.len(), QUOTED_LINES + 1);
        assert_eq!(lines[0], "line 81");
        assert_eq!(lines[QUOTED_LINES - 2], "line 99");
        let long = &lines[QUOTED_LINES - 1];
        assert_eq!(
            *long,
            format!(
                "{}… [{} bytes cut]",
                "x".repeat(QUOTED_LINE_BYTES - 1),
                (1 << 20) + 2 + 1
            )
        );
        assert_eq!(lines[QUOTED_LINES], "no end");
        let quoted = quote(lines).unwrap();
        assert!(quoted.starts_with("line 82\n"), "{quoted}");
        assert!(quoted.len() < QUOTED_LINES * (QUOTED_LINE_BYTES + 32));
        assert_eq!(quote(Vec::new()), None);
    }

    #[test]
    fn megabytes_of_stderr_are_quoted_in_a_few_kib() {
        let cmd = sh("head -c 3000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo done >&2; exit 1");
        let err = run(cmd, deadline(30.0), Echo::Nothing)
            .unwrap_err()
            .to_string();
        assert!(err.len() < 2048, "{} bytes", err.len());
        assert!(err.ends_with("bytes cut]\ndone"), "{err}");
    }
}
