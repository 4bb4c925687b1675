//! The real spawner: a clean environment, a process group of its own, and
//! the exit watched through a pidfd. `std::process` rather than
//! `tokio::process`: tokio would hold a second pidfd per child, and every
//! descriptor the daemon holds is copied (and closed again) by every spawn.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Stdio;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nix::sys::signal::{Signal, killpg};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{ChildOutput, ChildProcess, ExitReason, SpawnError, SpawnSpec, Spawner, WaitFuture};

#[derive(Debug, Default, Clone, Copy)]
pub struct UnixSpawner;

impl Spawner for UnixSpawner {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Box<dyn ChildProcess>, SpawnError> {
        let mut command = std::process::Command::new(&spec.program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            // Its own group, so a stop reaches every process it forked.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // No pre_exec hook: without one the standard library may use
        // posix_spawn (vfork-like), which is much cheaper than fork for a big
        // daemon starting many services. It already resets the signal mask
        // and SIGPIPE's disposition in the child.
        // Spawned and registered under one lock, so the orphan reaper can
        // never mistake a service that died at once for an orphan.
        let mut own = own_children();
        let mut child = command.spawn().map_err(|source| SpawnError::Exec {
            program: spec.program.clone(),
            source,
        })?;
        let pid = child.id();
        own.insert(pid);
        drop(own);
        let output = match (child.stdout.take(), child.stderr.take()) {
            (Some(stdout), Some(stderr)) => Some(ChildOutput {
                stdout: OwnedFd::from(stdout),
                stderr: OwnedFd::from(stderr),
            }),
            _ => None,
        };
        // A pidfd tells us the leader exited while it is still a zombie, so
        // its group id is still certainly ours to signal. Kernels before 5.3
        // have none: then the exit is polled for (see `wait`).
        let exited = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .and_then(|p| rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok())
            .and_then(watch_pidfd);
        Ok(Box::new(UnixChild {
            child,
            pid,
            output,
            exited,
        }))
    }
}

/// Service leaders spawned here and not yet reaped by their actor: the
/// only children the orphan reaper must leave alone.
static OWN_CHILDREN: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn own_children() -> MutexGuard<'static, BTreeSet<u32>> {
    OWN_CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Make this process the reaper of its descendants' orphans (a service's
/// children whose parent died come to us, not to init), so their ends are
/// seen and their zombies reaped by `reap_orphans`.
pub fn become_subreaper() -> io::Result<()> {
    nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)
}

/// Reap every exited child that is not a service leader (those belong to
/// their actors, whose waits must not lose an exit status). Call on SIGCHLD.
/// Returns how many were reaped.
pub fn reap_orphans() -> usize {
    let own = own_children();
    let mut reaped = 0;
    for pid in child_pids() {
        if own.contains(&pid) {
            continue;
        }
        let Ok(raw) = i32::try_from(pid) else {
            continue;
        };
        if let Ok(status) = waitpid(Pid::from_raw(raw), Some(WaitPidFlag::WNOHANG))
            && status != WaitStatus::StillAlive
        {
            reaped += 1;
        }
    }
    reaped
}

/// Our children, from every thread's /proc children list (a child belongs
/// to the thread that forked it).
fn child_pids() -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            pids.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok()),
            );
        }
    }
    pids
}

/// Resolves when a process (any, not only a child of ours) has exited.
pub struct ExitWatch(AsyncFd<OwnedFd>);

impl ExitWatch {
    /// Pins `pid` now: a pid recycled later is not confused with it.
    pub fn new(pid: u32) -> io::Result<ExitWatch> {
        let raw = i32::try_from(pid)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
            .ok_or_else(|| io::Error::other(format!("invalid pid {pid}")))?;
        let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty())?;
        watch_pidfd(fd)
            .map(ExitWatch)
            .ok_or_else(|| io::Error::other("cannot watch a pidfd"))
    }

    pub async fn exited(&self) {
        let _ = self.0.readable().await;
    }
}

/// The unsoundness that deprecated `AsyncFd::with_interest` is about needs
/// a type whose raw fd can change under the registration; an `OwnedFd`
/// cannot, and this avoids an `unsafe` block for `register_with_interest`.
#[allow(deprecated)]
fn watch_pidfd(fd: OwnedFd) -> Option<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, Interest::READABLE).ok()
}

/// Kernels without pidfds (before 5.3) only: how often an exit is looked for.
const EXIT_POLL_WITHOUT_PIDFD: std::time::Duration = std::time::Duration::from_millis(100);

/// Whether our child `pid` has exited, without reaping it.
fn has_exited(pid: u32) -> io::Result<bool> {
    let raw = i32::try_from(pid).map_err(io::Error::other)?;
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(Pid::from_raw(raw)), flags) {
        Ok(WaitStatus::StillAlive) => Ok(false),
        Ok(_) => Ok(true),
        Err(errno) => Err(io::Error::from(errno)),
    }
}

struct UnixChild {
    child: std::process::Child,
    pid: u32,
    output: Option<ChildOutput>,
    /// Readable once the leader has exited (before it is reaped).
    exited: Option<AsyncFd<OwnedFd>>,
}

impl ChildProcess for UnixChild {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn take_output(&mut self) -> Option<ChildOutput> {
        self.output.take()
    }

    fn wait(&mut self) -> WaitFuture<'_> {
        Box::pin(async move {
            loop {
                match &self.exited {
                    // Readiness is not cleared: if this future is dropped
                    // and polled again, it passes straight through.
                    Some(exited) => drop(exited.readable().await?),
                    None => {
                        while !has_exited(self.pid)? {
                            tokio::time::sleep(EXIT_POLL_WITHOUT_PIDFD).await;
                        }
                    }
                }
                // The leader is a zombie now: whatever it left in its group
                // dies with it while the group id is certainly ours, so two
                // generations never run side by side and the pipes close.
                let _ = self.signal_group(Signal::SIGKILL);
                if let Some(status) = self.child.try_wait()? {
                    own_children().remove(&self.pid);
                    return Ok(match status.signal() {
                        Some(signal) => ExitReason::Signaled {
                            signal,
                            core_dumped: status.core_dumped(),
                        },
                        None => ExitReason::Exited(status.code().unwrap_or(-1)),
                    });
                }
                // Readable yet not reapable should not happen; never spin.
                tokio::time::sleep(EXIT_POLL_WITHOUT_PIDFD).await;
            }
        })
    }

    fn signal_group(&mut self, signal: Signal) -> io::Result<()> {
        let pgid = i32::try_from(self.pid)
            .ok()
            .filter(|&pid| pid > 1)
            .ok_or_else(|| io::Error::other(format!("refusing to signal group {}", self.pid)))?;
        match killpg(Pid::from_raw(pgid), signal) {
            Ok(()) => Ok(()),
            // Nobody left in the group: the goal of any signal we send is met.
            Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }
}
