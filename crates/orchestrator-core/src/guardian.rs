//! The guardian: a small process of our own binary that the daemon starts
//! before any service, holding only the read end of a pipe from it. A daemon
//! that ends without dismissing it (SIGKILL, a crash, the OOM killer) closes
//! that pipe by dying, and the guardian then stops what it supervised, as
//! the next daemon would at its start — but at once, so nothing runs on
//! unsupervised in between, even if no daemon ever starts again. systemd
//! does this for a unit's cgroup when its main process dies; this is the
//! same guarantee without systemd.
//!
//! A daemon starting on the same data_dir waits for a previous daemon's
//! guardian to finish before it spawns anything, so the two never act on
//! the same services.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::state::abstract_name_for;

/// What the daemon writes before it exits normally: its services are
/// stopped already, and the guardian leaves without doing anything.
const DISMISS: u8 = b'q';
/// Where the guardian finds its daemon's cgroup-parent lock (the first
/// descriptor after stdio); it keeps it open until it exits.
pub const PARENT_LOCK_FD: i32 = 3;
/// What the guardian writes once it holds its lock.
const READY: u8 = b'r';

/// How long a starting daemon waits for a previous daemon's guardian.
pub const PREVIOUS_GUARDIAN_WAIT: Duration = Duration::from_secs(60);
/// How long a daemon waits for its new guardian to be ready.
const READY_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum GuardianError {
    #[error(
        "the guardian of a daemon that died is still stopping its services on data_dir {dir} after {waited:?}; it stops them within their stop_timeout: try again, or find it with `ss -xlp | grep orchestrator-guardian`", dir = .dir.display()
    )]
    PreviousStillRunning {
        dir: std::path::PathBuf,
        waited: Duration,
    },
    #[error(
        "cannot start the guardian ({action}): {source}; services would outlive a daemon killed with SIGKILL until the next daemon starts"
    )]
    Spawn {
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The abstract socket a guardian binds for its life: the lock a starting
/// daemon waits on.
fn lock_address(data_dir: &Path) -> io::Result<SocketAddr> {
    let canonical = std::fs::canonicalize(data_dir)?;
    let name = abstract_name_for("orchestrator-guardian", &canonical);
    SocketAddr::from_abstract_name(name.as_bytes())
}

/// Whether a guardian holds the lock of `data_dir` now. Probing binds the
/// name for an instant, so a guardian starting right then retries its bind.
fn is_held(data_dir: &Path) -> io::Result<bool> {
    match UnixListener::bind_addr(&lock_address(data_dir)?) {
        Ok(_probe) => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::AddrInUse => Ok(true),
        Err(error) => Err(error),
    }
}

/// Wait until no guardian of a previous daemon on `data_dir` is left: it
/// may still be stopping that daemon's services. Call with the data_dir
/// lock held and before starting our own guardian.
pub async fn wait_for_previous(data_dir: &Path, timeout: Duration) -> Result<(), GuardianError> {
    let began = Instant::now();
    let mut said = false;
    loop {
        match is_held(data_dir) {
            Ok(false) => return Ok(()),
            Ok(true) if began.elapsed() >= timeout => {
                return Err(GuardianError::PreviousStillRunning {
                    dir: data_dir.to_owned(),
                    waited: began.elapsed(),
                });
            }
            Ok(true) => {
                if !said {
                    tracing::warn!(
                        "the previous daemon on this data_dir died; waiting for its guardian to stop its services"
                    );
                    said = true;
                }
                tokio::time::sleep(POLL).await;
            }
            // Cannot tell: no guardian is the likelier case, and waiting
            // would not help.
            Err(error) => {
                tracing::debug!("cannot probe the guardian lock: {error}");
                return Ok(());
            }
        }
    }
}

/// The daemon's side: the pipe whose closing by death wakes the guardian.
#[derive(Debug)]
pub struct Guardian {
    control: std::fs::File,
    pid: u32,
}

impl Guardian {
    /// Start `program ARGS` (our own binary in its guardian mode) in a
    /// process group of its own (a Ctrl-C to the daemon's terminal is not
    /// for it), and return once it holds its lock.
    /// `parent_lock`: the daemon's lock on its cgroup parent, given to the
    /// guardian as descriptor [`PARENT_LOCK_FD`]: the guardian holds the
    /// parent from then on, so no daemon started after ours died can claim
    /// it (and have its new services swept) before the guardian is done.
    pub async fn spawn(
        program: &Path,
        args: &[OsString],
        parent_lock: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<Guardian, GuardianError> {
        let spawn_error = |action| move |source| GuardianError::Spawn { action, source };
        let (control_read, control_write) = std::io::pipe().map_err(spawn_error("pipe"))?;
        let (ready_read, ready_write) = std::io::pipe().map_err(spawn_error("pipe"))?;
        let child = {
            use std::os::fd::AsRawFd;
            use std::os::unix::process::CommandExt;
            let mut command = Command::new(program);
            command
                .args(args)
                .stdin(Stdio::from(control_read))
                .stdout(Stdio::from(ready_write))
                .process_group(0);
            if let Some(lock) = parent_lock {
                let lock = lock.as_raw_fd();
                // SAFETY: runs in the child between fork and exec, where
                // only async-signal-safe calls are allowed: dup2 and fcntl
                // are. `lock` is a descriptor the parent keeps open for the
                // whole spawn (borrowed for this call), so it is valid in
                // the child's copy of the table. dup2 onto itself would
                // keep close-on-exec, hence the fcntl in that case.
                unsafe {
                    command.pre_exec(move || {
                        if lock == PARENT_LOCK_FD {
                            let flags = libc::fcntl(lock, libc::F_GETFD);
                            if flags < 0
                                || libc::fcntl(lock, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                            {
                                return Err(io::Error::last_os_error());
                            }
                        } else if libc::dup2(lock, PARENT_LOCK_FD) < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
            }
            command.spawn().map_err(spawn_error("spawn"))?
        };
        let pid = child.id();
        // Reaped by the orphan reaper if it ever ends before us.
        drop(child);
        match read_byte(ready_read, READY_WAIT).await {
            Ok(Some(READY)) => Ok(Guardian {
                control: std::fs::File::from(OwnedFd::from(control_write)),
                pid,
            }),
            Ok(_) => Err(GuardianError::Spawn {
                action: "wait for it",
                source: io::Error::other("it ended before it was ready (see its messages above)"),
            }),
            Err(source) => Err(GuardianError::Spawn {
                action: "wait for it",
                source,
            }),
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The daemon's end of the control pipe: kept open across an upgrade's
    /// exec, the guardian sees no end and goes on watching the same pid,
    /// now running the new binary.
    pub fn control_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.control.as_fd()
    }

    /// The guardian an old daemon started, taken over after an upgrade's
    /// exec from its control pipe and pid.
    pub fn from_parts(control: OwnedFd, pid: u32) -> Guardian {
        Guardian {
            control: std::fs::File::from(control),
            pid,
        }
    }

    /// The daemon is exiting normally with every service stopped: the
    /// guardian leaves without acting.
    pub fn dismiss(mut self) {
        let _ = self.control.write_all(&[DISMISS]);
    }
}

/// One byte from `pipe`, or `None` at its end, waiting at most `timeout`.
async fn read_byte(pipe: io::PipeReader, timeout: Duration) -> io::Result<Option<u8>> {
    use tokio::io::AsyncReadExt;
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(pipe))?;
    let mut byte = [0u8];
    match tokio::time::timeout(timeout, pipe.read(&mut byte)).await {
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )),
        Ok(read) => Ok((read? > 0).then_some(byte[0])),
    }
}

/// How the guardian's watch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DaemonEnd {
    /// The daemon said it was exiting normally.
    Dismissed,
    /// The pipe closed without a word: the daemon died.
    Died,
}

/// The guardian's side, in its own process: hold the lock of `data_dir`,
/// say so on stdout, then block until the daemon dismisses us or dies. The
/// returned lock must be held until the clean-up is done.
pub fn watch_daemon(data_dir: &Path) -> io::Result<(UnixListener, DaemonEnd)> {
    let address = lock_address(data_dir)?;
    // A daemon probing the name holds it for an instant: retry a while.
    let began = Instant::now();
    let lock = loop {
        match UnixListener::bind_addr(&address) {
            Ok(lock) => break lock,
            Err(error)
                if error.kind() == io::ErrorKind::AddrInUse && began.elapsed() < READY_WAIT =>
            {
                std::thread::sleep(POLL);
            }
            Err(error) => return Err(error),
        }
    };
    let mut stdout = io::stdout().lock();
    stdout.write_all(&[READY])?;
    stdout.flush()?;
    drop(stdout);
    // Nothing else of ours may hold the daemon's side open.
    let mut control = io::stdin().lock();
    let mut byte = [0u8];
    loop {
        match control.read(&mut byte) {
            Ok(0) => return Ok((lock, DaemonEnd::Died)),
            Ok(_) if byte[0] == DISMISS => return Ok((lock, DaemonEnd::Dismissed)),
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            // A broken pipe cannot tell us more than an end would.
            Err(_) => return Ok((lock, DaemonEnd::Died)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_held_lock_is_waited_for_and_a_free_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        wait_for_previous(dir.path(), Duration::from_secs(1))
            .await
            .expect("nobody holds it");
        let lock = UnixListener::bind_addr(&lock_address(dir.path()).unwrap()).unwrap();
        let error = wait_for_previous(dir.path(), Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(
            error.to_string().contains("still stopping its services"),
            "{error}"
        );
        let released = tokio::spawn({
            let dir = dir.path().to_owned();
            async move { wait_for_previous(&dir, Duration::from_secs(30)).await }
        });
        // Not a synchronisation: released before or after the wait began,
        // the wait must end.
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(lock);
        released.await.unwrap().expect("released: the wait ends");
    }
}
