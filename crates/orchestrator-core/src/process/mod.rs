//! Spawning processes, behind a trait so the service actors can be tested
//! with a fake that needs no real processes and obeys tokio's paused clock.

mod fake;
mod unix;

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;

use nix::sys::signal::Signal;

pub use crate::cgroup::Limits;
use crate::config::{Rlimit, RlimitValue, Sha256};

pub use fake::{FakeChildControl, FakeSpawner};
pub use unix::{ExitWatch, UnixSpawner, become_subreaper, reap_orphans, resolve_program};

/// Everything needed to start one process: plain data, so tests can assert on it.
/// `Default` is nothing but an empty argv: the posix_spawn fast path once
/// program, args, env and cwd are filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpawnSpec {
    pub service: String,
    pub program: PathBuf,
    /// argv[1..]; argv[0] is `program` as given.
    pub args: Vec<String>,
    /// The complete environment: nothing else is inherited.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Enforced through the service's cgroup; empty: no limit.
    pub limits: Limits,
    /// Applied in the child before exec, soft and hard alike.
    pub rlimits: Vec<(Rlimit, RlimitValue)>,
    /// Drop to this user (and group) before exec; `None`: the daemon's own.
    pub user: Option<UserSpec>,
    /// Run only a binary with this digest, executing the very descriptor
    /// that was hashed.
    pub sha256: Option<Sha256>,
    /// Refuse a binary (or `services_dir`) writable by group or others while
    /// the daemon is root; `None`: no check.
    pub strict: Option<StrictCheck>,
}

/// Who a service runs as: names or numeric ids, resolved at each spawn (an
/// account may be created after the daemon started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: String,
    /// `None`: the user's primary group. Supplementary groups are the user's.
    pub group: Option<String>,
}

/// Where a strict check stops walking up from the binary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StrictCheck {
    pub services_dir: PathBuf,
}

/// Why a process ended. Never encoded as a magic negative number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    Exited(i32),
    Signaled {
        signal: i32,
        core_dumped: bool,
    },
    /// SIGKILLed by the kernel's OOM killer for going past its cgroup's
    /// memory limit (MiB, when one was set).
    OomKilled {
        memory_limit_mib: Option<u64>,
    },
}

impl ExitReason {
    pub fn is_success(self) -> bool {
        self == ExitReason::Exited(0)
    }

    /// The shell convention (128 + signal for a signal death), for `last_exit_code`.
    pub fn code(self) -> i32 {
        match self {
            ExitReason::Exited(code) => code,
            ExitReason::Signaled { signal, .. } => 128 + signal,
            ExitReason::OomKilled { .. } => 128 + libc::SIGKILL,
        }
    }

    fn signal_name(signal: i32) -> String {
        Signal::try_from(signal)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("signal {signal}"))
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            ExitReason::Exited(code) => write!(f, "exited with code {code}"),
            ExitReason::Signaled {
                signal,
                core_dumped,
            } => {
                write!(f, "killed by {}", Self::signal_name(signal))?;
                if core_dumped {
                    write!(f, " (core dumped)")?;
                }
                Ok(())
            }
            ExitReason::OomKilled { memory_limit_mib } => {
                write!(f, "killed by the OOM killer")?;
                if let Some(mib) = memory_limit_mib {
                    write!(f, " (memory_limit {mib} MiB)")?;
                }
                Ok(())
            }
        }
    }
}

/// The read ends of a child's stdout and stderr pipes.
#[derive(Debug)]
pub struct ChildOutput {
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

pub type WaitFuture<'a> = Pin<Box<dyn Future<Output = io::Result<ExitReason>> + Send + 'a>>;

/// A spawned process that leads its own process group.
pub trait ChildProcess: Send {
    fn pid(&self) -> u32;

    /// The output pipes, once; `None` afterwards (or when there are none).
    fn take_output(&mut self) -> Option<ChildOutput>;

    /// Wait for the leader to end; SIGKILL whatever is left in its process
    /// group while the group id is certainly still ours (the leader not yet
    /// reaped); then reap it. Cancel-safe: dropping the future before it
    /// completes loses nothing.
    fn wait(&mut self) -> WaitFuture<'_>;

    /// Send `signal` to the whole process group. Only called before `wait`
    /// has returned: until the leader is reaped its pid, and so the group id,
    /// cannot be recycled.
    fn signal_group(&mut self, signal: Signal) -> io::Result<()>;

    /// The cgroup it runs in, when it has one: for the API to read its use.
    fn cgroup(&self) -> Option<std::sync::Arc<dyn crate::cgroup::ServiceCgroup>> {
        None
    }
}

/// Why a process could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {program}: {source}{hint}", program = .program.display(), hint = spawn_hint(.program, .source))]
    Exec {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare working directory {dir}: {source}", dir = .dir.display())]
    WorkingDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Injected(String),
}

impl SpawnError {
    /// Whether retrying cannot help until the spec or the file changes (a
    /// reload then gives the service its next start): the service fails at
    /// once instead of backing off.
    pub fn is_permanent(&self) -> bool {
        match self {
            SpawnError::Exec { .. } | SpawnError::WorkingDir { .. } | SpawnError::Injected(_) => {
                false
            }
        }
    }
}

/// What to do about a failed exec. A program without a slash can only come
/// from `command` (binaries are always paths), so binary_path is no advice.
fn spawn_hint(program: &std::path::Path, error: &io::Error) -> &'static str {
    let bare = !program.as_os_str().as_encoded_bytes().contains(&b'/');
    match error.raw_os_error() {
        Some(libc::ENOENT) if bare => {
            " (not found in the service's PATH: install it, give command[0] as an absolute path, \
             or set PATH in the service's environment)"
        }
        Some(libc::ENOENT) => {
            " (no such file, or its #! interpreter is missing: check binary_path, command[0] \
             or services_dir/NAME/NAME, and the script's first line)"
        }
        Some(libc::EACCES) => " (permission denied: is the file executable?)",
        Some(libc::ENOEXEC) => " (not an executable format: a script needs a #! line)",
        Some(libc::E2BIG) => " (argument list or environment too large)",
        _ => "",
    }
}

pub trait Spawner: Send + Sync {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Box<dyn ChildProcess>, SpawnError>;

    /// Kill whatever a previous daemon left in the services' cgroups (a
    /// setsid or double-forked process its process group did not hold), and
    /// remove those cgroups. Called once at start, before any spawn; may
    /// block for a few seconds. Returns the pids it killed.
    fn sweep_leftovers(&self) -> Vec<u32> {
        Vec::new()
    }
}

/// Mark every descriptor above stderr close-on-exec, so nothing the daemon
/// inherited from its own parent leaks into the services. Descriptors the
/// daemon opens itself are close-on-exec already (Rust and tokio open them
/// so). The daemon calls it while it is still its only thread: it marks
/// whatever holds a listed number by the time it gets there.
pub fn mark_inherited_fds_cloexec() -> io::Result<()> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd")? {
        let name = entry?.file_name();
        if let Some(fd) = name.to_str().and_then(|n| n.parse::<i32>().ok())
            && fd > 2
        {
            fds.push(fd);
        }
    }
    for fd in fds {
        // SAFETY: fcntl(F_SETFD) on a bare number touches no memory of
        // ours. The number may not be what was listed: read_dir's own
        // descriptor is closed by now (EBADF, ignored; and why this is not
        // a BorrowedFd, which must stay open), and had another thread run,
        // it could hold a reused number for a descriptor of its own, which
        // has the flag already (see above): setting it again changes nothing.
        let _ = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok(())
}

#[cfg(test)]
mod hint_tests {
    use super::*;

    #[test]
    fn a_command_not_found_is_not_blamed_on_binary_path() {
        let enoent = || io::Error::from_raw_os_error(libc::ENOENT);
        let bare = SpawnError::Exec {
            program: PathBuf::from("no-such-program"),
            source: enoent(),
        }
        .to_string();
        assert!(!bare.contains("binary_path"), "{bare}");
        assert!(bare.contains("not found in the service's PATH"), "{bare}");
        let path = SpawnError::Exec {
            program: PathBuf::from("/srv/api/api"),
            source: enoent(),
        }
        .to_string();
        assert!(path.contains("check binary_path, command[0]"), "{path}");
    }
}
