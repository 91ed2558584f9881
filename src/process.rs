//! Running external commands with their failure explained: the command line,
//! how it ended and what it wrote to stderr end up in the error.

use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// How much of a failing child's stderr goes into an error message.
const STDERR_TAIL_LINES: usize = 20;

/// Runs `cmd` to completion with stdin closed and stdout discarded, and
/// fails with its stderr when it exits non-zero.
pub fn run(mut cmd: Command) -> Result<()> {
    let shown = display(&cmd);
    let output = cmd
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .with_context(|| format!("cannot run {shown} (is it on PATH?)"))?;
    if output.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    bail!(
        "{shown} {}{}",
        describe(output.status),
        tail(&stderr, STDERR_TAIL_LINES)
            .map(|t| format!(":\n{t}"))
            .unwrap_or_default()
    )
}

/// "exited with status 1", "was killed by signal 9".
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("was killed by signal {signal}"),
        (None, None) => format!("ended with {status}"),
    }
}

/// The last `lines` non-empty lines of `text`, or `None` if there are none.
pub fn tail(text: &str, lines: usize) -> Option<String> {
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = kept.len().saturating_sub(lines);
    (!kept.is_empty()).then(|| kept[start..].join("\n"))
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

    #[test]
    fn failure_carries_stderr_and_status() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo first >&2; echo last words >&2; exit 7"]);
        let err = run(cmd).unwrap_err().to_string();
        assert!(err.contains("exited with status 7"), "{err}");
        assert!(err.contains("last words"), "{err}");
    }

    #[test]
    fn missing_program_is_named() {
        let err = run(Command::new("hail-no-such-program")).unwrap_err();
        assert!(format!("{err:#}").contains("hail-no-such-program"));
    }

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2).as_deref(), Some("b\nc"));
        assert_eq!(tail("\n \n", 2), None);
    }
}
