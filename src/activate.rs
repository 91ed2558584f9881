//! Running a profile's `bin/activate`: in its own process group, with a
//! deadline, and with the tail of its stderr kept for the error message.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::process;

/// Lines of activate's stderr quoted when it fails.
const STDERR_TAIL_LINES: usize = 10;
/// After SIGTERM, how long activate's process group may take to go.
const KILL_GRACE: Duration = Duration::from_secs(5);
/// After activate exits, how long its output may take to drain. A daemon it
/// started in the background can hold the pipes open forever; we do not wait
/// for that.
const DRAIN: Duration = Duration::from_millis(500);

type Tail = Arc<Mutex<VecDeque<String>>>;

#[derive(Debug)]
pub enum Activation {
    /// The profile has no `bin/activate`: nothing to run.
    NoScript,
    Succeeded,
    Failed(ActivationFailure),
}

#[derive(Debug)]
pub struct ActivationFailure {
    /// "exited with status 1", "was killed by signal 9", "timed out after 600 s".
    pub how: String,
    pub stderr_tail: Option<String>,
}

/// Runs `PROFILE/bin/activate` with working directory `/`, hail's own
/// environment plus `env`, stdin closed; its stdout and stderr pass through
/// to hail's stderr (the journal, under systemd).
pub fn run(profile: &Path, env: &[(&str, &str)], timeout: Duration) -> Result<Activation> {
    let script = profile.join("bin/activate");
    if !script.exists() {
        return Ok(Activation::NoScript);
    }
    let mut cmd = activate_command(&script, env);
    let shown = process::display(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {shown}"))?;
    let pid = child.id();

    let tail = Tail::default();
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(std::thread::spawn(move || forward(out, None)));
    }
    if let Some(err) = child.stderr.take() {
        let tail = Arc::clone(&tail);
        readers.push(std::thread::spawn(move || forward(err, Some(tail))));
    }

    let (done_tx, done) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait());
    });
    let (status, timed_out): (std::io::Result<ExitStatus>, bool) = match done.recv_timeout(timeout)
    {
        Ok(status) => (status, false),
        Err(_) => {
            log::error!(
                "{shown} did not finish within {} s; ending its process group",
                timeout.as_secs()
            );
            kill_group(pid, rustix::process::Signal::TERM);
            let status = match done.recv_timeout(KILL_GRACE) {
                Ok(status) => status,
                Err(_) => {
                    kill_group(pid, rustix::process::Signal::KILL);
                    done.recv()
                        .unwrap_or_else(|_| Err(std::io::Error::other("waiter vanished")))
                }
            };
            (status, true)
        }
    };
    // Whatever activate left behind in its group must not outlive a timeout.
    if timed_out {
        kill_group(pid, rustix::process::Signal::KILL);
    }
    let status = status.with_context(|| format!("cannot wait for {shown}"))?;
    drain(readers);
    let tail: Vec<String> = tail
        .lock()
        .map(|lines| lines.iter().cloned().collect())
        .unwrap_or_default();

    if status.success() && !timed_out {
        return Ok(Activation::Succeeded);
    }
    let how = if timed_out {
        format!("timed out after {} s", timeout.as_secs())
    } else {
        process::describe(status)
    };
    Ok(Activation::Failed(ActivationFailure {
        how,
        stderr_tail: (!tail.is_empty()).then(|| tail.join("\n")),
    }))
}

/// The activate command: its own process group so a timeout can end
/// everything it started, and `/` as working directory so it never depends
/// on where hail was started.
pub fn activate_command(script: &Path, env: &[(&str, &str)]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(script);
    cmd.current_dir("/")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    cmd
}

/// Copies a child's output to our stderr line by line, keeping the last
/// lines in `tail` if given.
fn forward(from: impl std::io::Read, tail: Option<Tail>) {
    let mut stderr = std::io::stderr();
    for line in BufReader::new(from).split(b'\n').map_while(Result::ok) {
        let _ = stderr.write_all(&line);
        let _ = stderr.write_all(b"\n");
        if let Some(Ok(mut tail)) = tail.as_ref().map(|t| t.lock()) {
            if tail.len() == STDERR_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(String::from_utf8_lossy(&line).into_owned());
        }
    }
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
