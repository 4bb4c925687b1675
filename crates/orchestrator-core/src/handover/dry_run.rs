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
        "the new binary {} cannot read this daemon's hand-over (format {format}; {found}): it is older than this daemon, and would stop every service; upgrade to a binary at least as new (upgrade --binary PATH); nothing was changed",
        .binary.display()
    )]
    CannotReadHandover {
        binary: PathBuf,
        format: u32,
        /// What it said it reads, or how asking failed.
        found: String,
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

    // Asked before anything changes: a binary that cannot read what we would
    // hand it would exit at once after the exec, and the guardian would
    // then stop every service.
    let formats = run(binary, &[HANDOVER_FORMATS_VERB.as_ref()], timeout).await?;
    let reads: Vec<u32> = String::from_utf8_lossy(&formats.stdout)
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    if !formats.status.success() || !reads.contains(&super::FORMAT) {
        let found = if formats.status.success() {
            format!("it reads {reads:?}")
        } else {
            format!(
                "`{HANDOVER_FORMATS_VERB}` {}{}",
                describe(formats.status),
                first_lines(&formats.stderr)
            )
        };
        return Err(DryRunError::CannotReadHandover {
            binary: binary.to_owned(),
            format: super::FORMAT,
            found,
        });
    }

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

/// The hidden verb that prints the hand-over formats a binary reads, one
/// number each, space-separated.
pub const HANDOVER_FORMATS_VERB: &str = "handover-formats";

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
    use std::fs;

    use super::*;

    /// Long enough for a loaded machine to start a shell many times over;
    /// only the hanging cases wait it out.
    const PATIENT: Duration = Duration::from_secs(30);

    /// An executable `#!/bin/sh` script standing in for a new binary.
    fn script(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
        let path = dir.path().join(name);
        fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// Answers `--version` as an orchestrator does, and `-c FILE check` by
    /// the file's content: "ok" passes.
    const GOOD: &str = r#"
case "$1" in
  --version) echo "orchestrator 9.8.7"; exit 0 ;;
  handover-formats) echo "1"; exit 0 ;;
  -c) [ "$3" = check ] || exit 64
      [ "$(cat "$2")" = ok ] && exit 0
      echo "orchestrator: 1 configuration problem" >&2
      printf '  %s: unknown key \033[31m"x"\n' "$2" >&2
      exit 2 ;;
esac
exit 64"#;

    fn config(dir: &tempfile::TempDir, content: &str) -> PathBuf {
        let path = dir.path().join("orchestrator.toml");
        fs::write(&path, content).unwrap();
        path
    }

    #[tokio::test]
    async fn a_good_binary_passes_and_says_its_version() {
        let dir = tempfile::tempdir().unwrap();
        let binary = script(&dir, "orchestrator", GOOD);
        assert_eq!(dry_run(&binary, None, PATIENT).await.unwrap(), "9.8.7");
        let config = config(&dir, "ok");
        assert_eq!(
            dry_run(&binary, Some(&config), PATIENT).await.unwrap(),
            "9.8.7"
        );
    }

    #[tokio::test]
    async fn a_refused_config_is_named_with_the_first_lines_of_stderr_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let binary = script(&dir, "orchestrator", GOOD);
        let config = config(&dir, "bad");
        let error = dry_run(&binary, Some(&config), PATIENT).await.unwrap_err();
        let DryRunError::CheckFailed { status, stderr, .. } = &error else {
            panic!("{error:?}");
        };
        assert_eq!(status, "exited with code 2");
        assert!(stderr.contains("1 configuration problem"), "{stderr}");
        assert!(stderr.contains("unknown key \\u{1b}[31m"), "{stderr}");
        let message = error.to_string();
        assert!(message.contains("orchestrator.toml"), "{message}");
        assert!(message.contains("nothing was changed"), "{message}");
    }

    /// An older orchestrator: it knows neither the verb nor our format, and
    /// after the exec it would exit at once, leaving the services to the
    /// guardian. Refused while nothing has changed.
    #[tokio::test]
    async fn a_binary_that_cannot_read_our_hand_over_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let older = script(
            &dir,
            "older",
            &GOOD.replace(r#"  handover-formats) echo "1"; exit 0 ;;"#, ""),
        );
        let error = dry_run(&older, None, PATIENT).await.unwrap_err();
        assert!(
            matches!(&error, DryRunError::CannotReadHandover { format: 1, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("nothing was changed"), "{error}");
        let newer_only = script(
            &dir,
            "newer",
            &GOOD.replace(r#"echo "1"; exit 0"#, r#"echo "2 3"; exit 0"#),
        );
        let error = dry_run(&newer_only, None, PATIENT).await.unwrap_err();
        assert!(error.to_string().contains("it reads [2, 3]"), "{error}");
    }

    #[tokio::test]
    async fn what_is_not_an_orchestrator_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = script(&dir, "nginx", "echo \"nginx version: 1.25.3\"");
        let error = dry_run(&other, None, PATIENT).await.unwrap_err();
        assert!(
            matches!(&error, DryRunError::NotOrchestrator { found, .. } if found.contains("nginx version")),
            "{error:?}"
        );
        let failing = script(&dir, "failing", "echo \"unknown option\" >&2; exit 3");
        let error = dry_run(&failing, None, PATIENT).await.unwrap_err();
        assert!(
            matches!(&error, DryRunError::NotOrchestrator { found, .. }
                if found == "exited with code 3: unknown option"),
            "{error:?}"
        );
        let silent = script(&dir, "silent", "exit 0");
        let error = dry_run(&silent, None, PATIENT).await.unwrap_err();
        assert!(error.to_string().contains("printed nothing"), "{error}");
    }

    #[tokio::test]
    async fn a_missing_or_unrunnable_binary_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let error = dry_run(&dir.path().join("absent"), None, PATIENT)
            .await
            .unwrap_err();
        assert!(matches!(error, DryRunError::NotFound { .. }), "{error:?}");
        assert!(error.to_string().contains("--binary PATH"), "{error}");

        let error = dry_run(dir.path(), None, PATIENT).await.unwrap_err();
        assert!(
            matches!(&error, DryRunError::NotExecutable { reason, .. } if reason.contains("not a regular file")),
            "{error:?}"
        );

        let plain = script(&dir, "plain", GOOD);
        fs::set_permissions(&plain, fs::Permissions::from_mode(0o644)).unwrap();
        let error = dry_run(&plain, None, PATIENT).await.unwrap_err();
        assert!(
            matches!(&error, DryRunError::NotExecutable { reason, .. } if reason.contains("execute permission")),
            "{error:?}"
        );

        let orphan = dir.path().join("orphan");
        fs::write(&orphan, "#!/nonexistent/interpreter\n").unwrap();
        fs::set_permissions(&orphan, fs::Permissions::from_mode(0o755)).unwrap();
        let error = dry_run(&orphan, None, PATIENT).await.unwrap_err();
        assert!(
            matches!(&error, DryRunError::NotExecutable { reason, .. } if reason.contains("interpreter")),
            "{error:?}"
        );
    }

    /// The hanging binary, and what it started, are killed: none outlives
    /// the dry run.
    #[tokio::test]
    async fn a_hanging_binary_times_out_and_is_killed_with_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let pids = dir.path().join("pids");
        let binary = script(
            &dir,
            "hangs",
            &format!(
                "sleep 1000 & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; wait",
                pids = pids.display()
            ),
        );
        let error = dry_run(&binary, None, Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(
            matches!(&error, DryRunError::TimedOut { command, .. } if command.ends_with("hangs --version")),
            "{error:?}"
        );
        assert!(error.to_string().contains("was killed"), "{error}");
        // On a loaded machine the script may not have got as far as writing
        // its pids in 300 ms; then there is nothing left to check.
        let Ok(written) = fs::read_to_string(&pids) else {
            return;
        };
        let deadline = std::time::Instant::now() + PATIENT;
        for pid in written.split_whitespace() {
            let stat = format!("/proc/{pid}/stat");
            loop {
                let alive = fs::read_to_string(&stat).is_ok_and(|stat| {
                    !stat
                        .rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                });
                if !alive {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "pid {pid} outlived the dry run"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

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
