//! The dry run of an upgrade: the new binary must say it is an orchestrator
//! and accept the current config before the daemon freezes anything.
//! Async (tokio::process): the daemon's control task awaits it while every
//! service goes on as before.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Output kept per stream; the rest is read and dropped, so a chatty binary
/// never blocks on a full pipe.
const OUTPUT_LIMIT: usize = 64 * 1024;
/// Pause before another try at running a binary still open for writing.
const ETXTBSY_RETRY: Duration = Duration::from_millis(20);
/// Lines of a failed check's stderr quoted in the error.
const QUOTED_LINES: usize = 5;
/// Characters kept of each quoted line.
const QUOTED_LINE_CHARS: usize = 300;

#[derive(Debug, Error)]
pub enum DryRunError {
    #[error(
        "the new binary {} does not exist: give the path of the orchestrator to upgrade to (upgrade --binary PATH); nothing was changed",
        .binary.display()
    )]
    NotFound { binary: PathBuf },
    #[error(
        "the new binary {} cannot be run: {reason}; give the path of an executable orchestrator (upgrade --binary PATH); nothing was changed",
        .binary.display()
    )]
    NotExecutable { binary: PathBuf, reason: String },
    #[error("cannot run the new binary {}: {source}; nothing was changed", .binary.display())]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not an orchestrator: `--version` {found}, where `orchestrator X.Y.Z` was expected; give the path of an orchestrator binary (upgrade --binary PATH); nothing was changed",
        .binary.display()
    )]
    NotOrchestrator { binary: PathBuf, found: String },
    #[error(
        "the new binary {} refuses the current config {}: `check` {status}{stderr}; fix the config (or pick a binary that accepts it) and retry; nothing was changed",
        .binary.display(),
        .config.display()
    )]
    CheckFailed {
        binary: PathBuf,
        config: PathBuf,
        /// "exited with code 1", "was killed by SIGSEGV".
        status: String,
        /// ": " and its first lines, escaped; empty when it printed nothing.
        stderr: String,
    },
    #[error(
        "`{command}` did not finish within {timeout:?} and was killed: the new binary hangs here; run that command by hand to see why; nothing was changed"
    )]
    TimedOut { command: String, timeout: Duration },
}

/// Checks the binary an upgrade would exec: `BINARY --version` must print
/// `orchestrator X.Y.Z...` (returned: the version), then, with a config,
/// `BINARY -c CONFIG check` must exit 0. Each run is bounded by `timeout`
/// and killed, its whole process group, when it overruns.
pub async fn dry_run(
    binary: &Path,
    config: Option<&Path>,
    timeout: Duration,
) -> Result<String, DryRunError> {
    let metadata = match tokio::fs::metadata(binary).await {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(DryRunError::NotFound {
                binary: binary.to_owned(),
            });
        }
        Err(error) => {
            return Err(DryRunError::NotExecutable {
                binary: binary.to_owned(),
                reason: error.to_string(),
            });
        }
    };
    if !metadata.is_file() {
        return Err(DryRunError::NotExecutable {
            binary: binary.to_owned(),
            reason: "it is not a regular file".to_owned(),
        });
    }
    if metadata.permissions().mode() & 0o111 == 0 {
        return Err(DryRunError::NotExecutable {
            binary: binary.to_owned(),
            reason: "it has no execute permission".to_owned(),
        });
    }

    let version = run(binary, &["--version".as_ref()], timeout).await?;
    let found = if version.status.success() {
        let stdout = String::from_utf8_lossy(&version.stdout);
        if let Some(version) = parse_version(&stdout) {
            version
        } else {
            return Err(DryRunError::NotOrchestrator {
                binary: binary.to_owned(),
                found: format!("printed {}", quote(&version.stdout)),
            });
        }
    } else {
        return Err(DryRunError::NotOrchestrator {
            binary: binary.to_owned(),
            found: format!(
                "{}{}",
                describe(version.status),
                first_lines(&version.stderr)
            ),
        });
    };

    if let Some(config) = config {
        let check = run(
            binary,
            &["-c".as_ref(), config.as_os_str(), "check".as_ref()],
            timeout,
        )
        .await?;
        if !check.status.success() {
            return Err(DryRunError::CheckFailed {
                binary: binary.to_owned(),
                config: config.to_owned(),
                status: describe(check.status),
                stderr: first_lines(&check.stderr),
            });
        }
    }
    Ok(found)
}

struct Output {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

async fn run(
    binary: &Path,
    args: &[&std::ffi::OsStr],
    timeout: Duration,
) -> Result<Output, DryRunError> {
    let deadline = Instant::now() + timeout;
    let command_line = || {
        let mut line = binary.display().to_string();
        for arg in args {
            line.push(' ');
            line.push_str(&arg.to_string_lossy());
        }
        line
    };
    let timed_out = || DryRunError::TimedOut {
        command: command_line(),
        timeout,
    };
    let mut command = Command::new(binary);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own group: a timeout kills whatever it started too.
        .process_group(0)
        .kill_on_drop(true);
    let mut child = loop {
        match command.spawn() {
            Ok(child) => break child,
            // A binary just written (by an installer, or by a thread of ours
            // whose descriptor a concurrent fork still holds) is busy for a
            // moment: worth retrying within the time given.
            Err(error)
                if error.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline =>
            {
                tokio::time::sleep(ETXTBSY_RETRY).await;
            }
            Err(source) => return Err(spawn_error(binary, source)),
        }
    };
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let status = match tokio::time::timeout_at(deadline, child.wait()).await {
        Ok(status) => status.map_err(|source| DryRunError::Spawn {
            binary: binary.to_owned(),
            source,
        })?,
        Err(_) => {
            // Not reaped yet, so the group id is still the child's own.
            if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = child.kill().await;
            stdout.abort();
            stderr.abort();
            return Err(timed_out());
        }
    };
    // A process it left behind may hold its pipes open: bounded as well.
    let (stdout, stderr) =
        match tokio::time::timeout_at(deadline, async { (stdout.await, stderr.await) }).await {
            Ok((Ok(stdout), Ok(stderr))) => (stdout, stderr),
            _ => return Err(timed_out()),
        };
    Ok(Output {
        status,
        stdout,
        stderr,
    })
}

fn collect(pipe: Option<impl AsyncRead + Unpin + Send + 'static>) -> JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let Some(mut pipe) = pipe else {
            return kept;
        };
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf).await {
                Ok(0) | Err(_) => return kept,
                Ok(n) => {
                    let room = OUTPUT_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
    })
}

fn spawn_error(binary: &Path, source: io::Error) -> DryRunError {
    let binary = binary.to_owned();
    let reason = match source.raw_os_error() {
        Some(libc::EACCES) => "permission denied (on it, or on a directory above it)",
        Some(libc::ENOEXEC) => "it is not a program this machine runs",
        // The file exists (checked above): its #! interpreter or its
        // dynamic loader does not.
        Some(libc::ENOENT) => "its interpreter or loader does not exist",
        Some(libc::ETXTBSY) => "it is still being written",
        _ => return DryRunError::Spawn { binary, source },
    };
    DryRunError::NotExecutable {
        binary,
        reason: reason.to_owned(),
    }
}

/// `orchestrator X.Y.Z...` on the first line: the version, as printed.
fn parse_version(stdout: &str) -> Option<String> {
    let line = stdout.lines().next()?.trim();
    let version = line
        .strip_prefix("orchestrator ")?
        .split_whitespace()
        .next()?;
    let mut parts = version.splitn(3, '.');
    let numeric = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    let major = parts.next()?;
    let minor = parts.next()?;
    let patch = parts.next()?;
    let patch_digits = patch.bytes().take_while(u8::is_ascii_digit).count();
    (numeric(major) && numeric(minor) && patch_digits > 0).then(|| version.to_owned())
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(signal) => format!("was killed by {}", signal.as_str()),
            Err(_) => format!("was killed by signal {signal}"),
        },
        (None, None) => "ended abnormally".to_owned(),
    }
}

/// ": line; line; ..." of the first non-empty lines, escaped so that a
/// control character cannot garble the terminal that shows the error.
fn first_lines(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<String> = text
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty())
        .take(QUOTED_LINES)
        .map(escape)
        .collect();
    if lines.is_empty() {
        return String::new();
    }
    let more = text.lines().filter(|line| !line.trim().is_empty()).count() > QUOTED_LINES;
    format!(": {}{}", lines.join("; "), if more { "; ..." } else { "" })
}

fn escape(line: &str) -> String {
    let mut out: String = line
        .chars()
        .take(QUOTED_LINE_CHARS)
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            escaped
        })
        .collect();
    if line.chars().nth(QUOTED_LINE_CHARS).is_some() {
        out.push_str("...");
    }
    out
}

fn quote(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let first = text.lines().next().unwrap_or("");
    if first.trim().is_empty() {
        "nothing".to_owned()
    } else {
        format!("\"{}\"", escape(first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_the_first_line() {
        let cases = [
            ("orchestrator 0.1.0\n", Some("0.1.0")),
            ("orchestrator 12.3.45-rc.1 (abc)\n", Some("12.3.45-rc.1")),
            ("orchestrator 1.2.3", Some("1.2.3")),
            ("orchestrator 1.2\n", None),
            ("orchestrator x.2.3\n", None),
            ("nginx version: 1.2.3\n", None),
            ("", None),
            ("\norchestrator 1.2.3\n", None),
        ];
        for (stdout, want) in cases {
            assert_eq!(parse_version(stdout).as_deref(), want, "{stdout:?}");
        }
    }

    #[test]
    fn quoted_stderr_is_short_and_escaped() {
        assert_eq!(first_lines(b""), "");
        assert_eq!(first_lines(b"\n\n"), "");
        assert_eq!(
            first_lines(b"bad\x1b[31m\n\nworse\n"),
            ": bad\\u{1b}[31m; worse"
        );
        let many = "a\nb\nc\nd\ne\nf\n";
        assert_eq!(first_lines(many.as_bytes()), ": a; b; c; d; e; ...");
        let long = "x".repeat(QUOTED_LINE_CHARS + 10);
        assert!(first_lines(long.as_bytes()).ends_with("x..."));
    }
}
