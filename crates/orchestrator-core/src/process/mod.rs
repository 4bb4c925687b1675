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
use std::sync::Arc;

/// What `ChildProcess::signal_group` takes.
pub use nix::sys::signal::Signal;

pub use crate::cgroup::Limits;
use crate::cgroup::{CgroupError, ServiceCgroup, Unenforced};
use crate::config::{Rlimit, RlimitValue, Sha256};

pub use fake::{FakeChildControl, FakeSpawner};
pub use unix::{
    DESCRIPTORS_PER_SERVICE, ExitWatch, NofileRaise, Prepared, UnixSpawner, become_subreaper,
    cgroup_removals_settled, hold_handed_over, nofile_target, original_nofile, raise_nofile,
    reap_orphans, record_original_nofile, record_original_nofile_as, reserve_spawn_slots,
    resolve_program,
};

/// What to do when a start fails for want of descriptors: the bare
/// "Too many open files" does not say whose limit it is.
fn descriptor_hint(source: &io::Error) -> &'static str {
    match source.raw_os_error() {
        Some(libc::EMFILE) => {
            "; the daemon has used up its open-files limit: raise it (LimitNOFILE= in its \
             systemd unit, or `ulimit -n` before starting it) or run fewer services"
        }
        Some(libc::ENFILE) => "; the system has used up its open files: raise fs.file-max",
        _ => "",
    }
}

/// A variable of a service's environment: name and value.
pub type EnvVar = (Arc<str>, Arc<str>);

/// The value of `name` in a service's environment. The last entry of that
/// name wins, as later entries win in `plan` (which leaves none repeated).
pub fn env_value<'a>(env: &'a [EnvVar], name: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(key, _)| &**key == name)
        .map(|(_, value)| &**value)
}

/// Everything needed to start one process: plain data, so tests can assert on it.
/// `Default` is nothing but an empty argv: the posix_spawn fast path once
/// program, args, env and cwd are filled in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpawnSpec {
    pub service: String,
    pub program: PathBuf,
    /// argv[1..]; argv[0] is `program` as given.
    pub args: Vec<String>,
    /// The complete environment: nothing else is inherited. Shared
    /// strings: what every service has alike (the names, PATH, TMPDIR) is
    /// one allocation for all of them (see `plan`).
    pub env: Vec<EnvVar>,
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
    /// the daemon is root, and set no_new_privs for a service that does not
    /// run as root; `None` (`strict = false`): neither.
    pub strict: Option<StrictCheck>,
}

impl SpawnSpec {
    /// The spec of a health check's command `argv` (no shell) run for this
    /// service: its user, environment, working directory, rlimits and
    /// strict mode, with `argv` as program and arguments. What belongs to
    /// the service's own binary or cgroup is cleared: its sha256, its
    /// limits (the probe joins the cgroup that enforces them), and the
    /// hand-over of its working directory (done at the service's start).
    /// `None` for an empty argv.
    ///
    /// Strict mode stays: while the daemon is root, a probe binary that
    /// others may write would run their code as the service's user (and in
    /// its cgroup), which is what strict refuses for the service's own
    /// binary; it costs a few stat calls per check, nothing next to the
    /// spawn.
    pub fn for_probe(&self, argv: &[String]) -> Option<SpawnSpec> {
        let (program, args) = argv.split_first()?;
        Some(SpawnSpec {
            service: self.service.clone(),
            program: PathBuf::from(program),
            args: args.to_vec(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            limits: Limits::default(),
            rlimits: self.rlimits.clone(),
            user: self.user.as_ref().map(|user| UserSpec {
                owns_working_dir: false,
                ..user.clone()
            }),
            sha256: None,
            strict: self.strict.clone(),
        })
    }
}

/// Who a service runs as: names or numeric ids, resolved at each spawn (an
/// account may be created after the daemon started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSpec {
    pub user: String,
    /// `None`: the user's primary group. Supplementary groups are the user's.
    pub group: Option<String>,
    /// The working directory is the default one the daemon makes
    /// (`services_dir/NAME/data`): while it is empty and root's, it is given
    /// to the user. A configured data_dir is never chowned: its owner is
    /// the operator's choice (and it could be `/var/empty` or `/mnt`).
    pub owns_working_dir: bool,
}

/// The default hardening of a service (`strict = true`): while the daemon is
/// root, a binary, or a directory above it up to `services_dir`, writable by
/// group or others is refused; and a service that does not run as root gets
/// no_new_privs, so a setuid binary or file capabilities cannot raise it
/// back. `strict = false` (a `None` here) opts out of both, for a service
/// that must run, say, a setuid helper.
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

    /// The signal that ended the process, by name (`SIGKILL`; the OOM
    /// killer's too); `None` for an exit.
    pub fn signal_name(self) -> Option<String> {
        match self {
            ExitReason::Exited(_) => None,
            ExitReason::Signaled { signal, .. } => Some(Self::name_of(signal)),
            ExitReason::OomKilled { .. } => Some(Self::name_of(libc::SIGKILL)),
        }
    }

    fn name_of(signal: i32) -> String {
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
                write!(f, "killed by {}", Self::name_of(signal))?;
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

    /// Send `signal` to the whole process group (SIGKILL: and to everything
    /// in its cgroup). Only called before `wait` has returned: until the
    /// leader is reaped its pid, and so the group id, cannot be recycled.
    fn signal_group(&mut self, signal: Signal) -> io::Result<()>;

    /// The service's cgroup while it runs, for its resource usage; `None`
    /// without cgroups, and once `wait` has removed it.
    fn cgroup(&self) -> Option<Arc<dyn ServiceCgroup>> {
        None
    }

    /// Give the process up without signalling anything, for an in-place
    /// upgrade (docs/upgrade.md): it goes on running, still a child of this
    /// process and still counted as ours by the orphan reaper (so nothing
    /// reaps it behind the hand-over), and what identifies it comes back as
    /// data and descriptors, for [`Spawner::adopt`] (by this process after
    /// its exec, or again before it). Its cgroup is left in place.
    ///
    /// Only a service's leader, not yet reaped, can be released; on an error
    /// the child is dropped as any child is (see the spawner's `Drop`).
    fn release(self: Box<Self>) -> Result<Released, ReleaseError> {
        Err(ReleaseError::Unsupported { pid: self.pid() })
    }
}

/// A service's leader given up by [`ChildProcess::release`]: what
/// [`Spawner::adopt`] needs to supervise it again. Plain data plus the
/// descriptors; none of it kills anything when dropped, so a `Released`
/// that is neither adopted nor handed over leaves its process running
/// unsupervised (and, in the same process, never reaped as an orphan).
#[derive(Debug)]
pub struct Released {
    /// Also its process group id: a service's leader leads its group.
    pub pid: u32,
    /// Its cgroup's path (on v1, in the pids hierarchy), when it has one.
    pub cgroup: Option<PathBuf>,
    /// We sent SIGKILL already (a stop was under way): a SIGKILL death is
    /// then ours, not the OOM killer's.
    pub killed_by_us: bool,
    /// The cgroup's OOM kill count when the run started.
    pub oom_kills_at_start: u64,
    pub memory_limit_mib: Option<u64>,
    /// Readable once the leader has exited; `None` on kernels without
    /// pidfds (adopt then polls).
    pub pidfd: Option<OwnedFd>,
    /// The read ends of its pipes, unless they were taken before (then the
    /// taker hands them over itself).
    pub output: Option<ChildOutput>,
}

/// Why a child could not be released.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(
        "process {pid} cannot be handed over: this kind of child does not support release; \
         stop it before the upgrade"
    )]
    Unsupported { pid: u32 },
    #[error(
        "service {service}: its health check's command (pid {pid}) cannot be handed over; \
         let it finish (or kill it) before the upgrade, the new daemon runs the next check"
    )]
    Probe { service: String, pid: u32 },
    #[error(
        "service {service}: its process {pid} has already been reaped, there is nothing to \
         hand over; report its exit instead"
    )]
    Reaped { service: String, pid: u32 },
}

/// Why [`Spawner::adopt`] refused a released process. Nothing was signalled:
/// a pid that is not the process handed over may be anyone's by now.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    #[error(
        "service {service}: refusing to adopt pid {pid}: {reason} (the PID-reuse guard: it \
         is not certainly the process that was handed over); it was not touched, start the \
         service afresh"
    )]
    NotOurs {
        service: String,
        pid: u32,
        reason: String,
    },
    #[error(
        "service {service}: cannot adopt pid {pid}: reading {path} failed: {source}; it was \
         not touched, start the service afresh",
        path = .path.display()
    )]
    Io {
        service: String,
        pid: u32,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "service {service}: cannot adopt pid {pid}: this spawner does not adopt processes; \
         start the service afresh"
    )]
    Unsupported { service: String, pid: u32 },
}

/// Why a process could not be started. Every variant but the two that
/// come from elsewhere (`WorkingDir`, the actor's; `Injected`, the fake's)
/// names the service and the stage that failed (see `stage`), and its text
/// says what to do.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The program was not found, or the kernel refused to execute it.
    #[error(
        "service {service}: cannot start {program} (stage \"exec\"): {source}{hint}",
        program = .program.display(),
        hint = spawn_hint(.program, .source)
    )]
    Exec {
        service: String,
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A step of the child between clone and exec failed; the program never ran.
    #[error(
        "service {service}: cannot start {program}: stage \"{stage}\" failed in the child \
         before exec: {source}{hint}",
        program = .program.display(),
        hint = .stage.hint(.source)
    )]
    Child {
        service: String,
        program: PathBuf,
        stage: ChildStage,
        #[source]
        source: io::Error,
    },
    /// An OS call of the preparation (opening or hashing the binary, a
    /// strict check's stat, the pipes, the clone itself) failed.
    #[error(
        "service {service}: cannot {action} {path} (stage \"{stage}\"): {source}{hint}",
        path = .path.display(),
        hint = descriptor_hint(.source)
    )]
    Io {
        service: String,
        stage: &'static str,
        /// What was being done, as a verb phrase: "open", "hash", ...
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "service {service}: cannot create its cgroup (stage \"cgroup\"): {source}; \
         check cgroup_parent and that the daemon may create cgroups there"
    )]
    Cgroup {
        service: String,
        #[source]
        source: CgroupError,
    },
    #[error(
        "service {service}: require_limits is set and {list} (stage \"limits\"): run the \
         daemon where those cgroup controllers are available, remove the limits, or set \
         require_limits = false",
        list = join_unenforced(.unenforced)
    )]
    LimitsUnenforced {
        service: String,
        unenforced: Vec<Unenforced>,
    },
    /// The user or group is unknown, or its look-up failed; `detail` says
    /// which and what to do.
    #[error("service {service}: cannot resolve user/group (stage \"user\"): {detail}")]
    User { service: String, detail: String },
    #[error(
        "service {service}: refusing to run: {path} is writable by group or others \
         (mode {mode:04o}) and the daemon runs as root (stage \"strict\"); run \
         `chmod go-w {path}` or set strict = false for the service",
        path = .path.display()
    )]
    Strict {
        service: String,
        path: PathBuf,
        /// The permission bits (`st_mode & 0o7777`).
        mode: u32,
    },
    #[error(
        "checksum mismatch: expected {expected} got {actual} for {path} (service {service}, \
         stage \"checksum\"): it was not run; deploy the binary that sha256 names, or set \
         sha256 to the new binary's digest",
        path = .path.display()
    )]
    Checksum {
        service: String,
        path: PathBuf,
        expected: Sha256,
        actual: Sha256,
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
    /// Whether retrying cannot help until the spec, the file or the host
    /// changes (a start or a reload then gives the service its next try):
    /// the service fails at once instead of backing off.
    pub fn is_permanent(&self) -> bool {
        match self {
            SpawnError::Checksum { .. }
            | SpawnError::Strict { .. }
            | SpawnError::LimitsUnenforced { .. } => true,
            // A binary, an account or a directory may appear; a cgroup or a
            // descriptor may be had on the next try.
            SpawnError::Exec { .. }
            | SpawnError::Child { .. }
            | SpawnError::Io { .. }
            | SpawnError::Cgroup { .. }
            | SpawnError::User { .. }
            | SpawnError::WorkingDir { .. }
            | SpawnError::Injected(_) => false,
        }
    }

    /// Which stage failed, as the message quotes it.
    pub fn stage(&self) -> &'static str {
        match self {
            SpawnError::Exec { .. } => "exec",
            SpawnError::Child { stage, .. } => stage.as_str(),
            SpawnError::Io { stage, .. } => stage,
            SpawnError::Cgroup { .. } => "cgroup",
            SpawnError::LimitsUnenforced { .. } => "limits",
            SpawnError::User { .. } => "user",
            SpawnError::Strict { .. } => "strict",
            SpawnError::Checksum { .. } => "checksum",
            SpawnError::WorkingDir { .. } => "working directory",
            SpawnError::Injected(_) => "injected",
        }
    }
}

fn join_unenforced(unenforced: &[Unenforced]) -> String {
    let parts: Vec<String> = unenforced.iter().map(ToString::to_string).collect();
    parts.join("; ")
}

/// A step the child takes between clone and exec, in that order (exec
/// failures are `SpawnError::Exec`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildStage {
    ProcessGroup,
    JoinCgroup,
    Rlimit(Rlimit),
    Stdio,
    Chdir,
    Setgroups,
    Setgid,
    Setuid,
    NoNewPrivs,
    Exec,
}

impl ChildStage {
    pub fn as_str(self) -> &'static str {
        match self {
            ChildStage::ProcessGroup => "setpgid",
            ChildStage::JoinCgroup => "join cgroup",
            ChildStage::Rlimit(rlimit) => match rlimit {
                Rlimit::Nofile => "rlimit nofile",
                Rlimit::Nproc => "rlimit nproc",
                Rlimit::Core => "rlimit core",
                Rlimit::Memlock => "rlimit memlock",
                Rlimit::Stack => "rlimit stack",
                Rlimit::As => "rlimit as",
                Rlimit::Cpu => "rlimit cpu",
                Rlimit::Fsize => "rlimit fsize",
            },
            ChildStage::Stdio => "stdio",
            ChildStage::Chdir => "chdir",
            ChildStage::Setgroups => "setgroups",
            ChildStage::Setgid => "setgid",
            ChildStage::Setuid => "setuid",
            ChildStage::NoNewPrivs => "no_new_privs",
            ChildStage::Exec => "exec",
        }
    }

    /// What to do about it.
    fn hint(self, error: &io::Error) -> &'static str {
        let errno = error.raw_os_error();
        match self {
            ChildStage::JoinCgroup => {
                " (the service's cgroup refused the process: was it removed, or is a limit \
                 such as pids_limit already reached? check cgroup_parent)"
            }
            ChildStage::Rlimit(Rlimit::Nofile) if errno == Some(libc::EPERM) => {
                " (raising a hard limit needs root, and nofile can never exceed \
                 /proc/sys/fs/nr_open: lower rlimits.nofile)"
            }
            ChildStage::Rlimit(_) if errno == Some(libc::EPERM) => {
                " (raising a hard limit above the daemon's needs root: lower the value in \
                 rlimits or run the daemon as root)"
            }
            ChildStage::Chdir => {
                " (the working directory must be a directory the daemon can enter: check \
                 the service's data_dir)"
            }
            ChildStage::Setgroups | ChildStage::Setgid | ChildStage::Setuid
                if errno == Some(libc::EPERM) =>
            {
                " (changing user or group needs the daemon to run as root: remove user and \
                 group from the service, or run the daemon as root)"
            }
            ChildStage::Exec => spawn_hint(std::path::Path::new("/"), error),
            _ => "",
        }
    }
}

impl fmt::Display for ChildStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

    /// Start a health check's command for a running service: `spec` is the
    /// service's own (see `SpawnSpec::for_probe`), and the child joins
    /// `cgroup`, the service's existing cgroup, when there is one. Nothing
    /// is created for it: no cgroup (so `spec.limits` are the service's
    /// cgroup's, not applied again), no hash check (`spec.sha256` is the
    /// service binary's digest, not the probe's), no working directory
    /// handed over. The child is not the owner of `cgroup`: its `wait`
    /// neither empties nor removes it, and its `cgroup()` is `None`. Its
    /// stdout and stderr share one pipe (as `2>&1`), so its output reads
    /// in the order it was written: `take_output` gives that pipe as
    /// `stdout`, and a `stderr` that reads as ended at once.
    ///
    /// An `Arc` rather than a borrow: the unix spawner's prepared spawn
    /// holds the cgroup's join descriptors until the launch.
    fn spawn_probe(
        &self,
        spec: &SpawnSpec,
        cgroup: Option<&Arc<dyn ServiceCgroup>>,
    ) -> Result<Box<dyn ChildProcess>, SpawnError>;

    /// Kill whatever a previous daemon left in the cgroups of `services` (a
    /// setsid or double-forked process its process group did not hold), and
    /// remove those cgroups. Called once at start, before any spawn; may
    /// block for a few seconds. Returns the pids it killed.
    fn sweep_leftovers(&self, _services: &std::collections::BTreeSet<String>) -> Vec<u32> {
        Vec::new()
    }

    /// Supervise again a process that [`ChildProcess::release`] gave up
    /// (in this process, before or after an exec): the child returned
    /// behaves as a spawned one (its `wait` reaps it, `signal_group`
    /// reaches its group, its cgroup is emptied and removed after it ends),
    /// and `take_output` gives the pipes in `released.output`. Refused
    /// unless the pid is certainly the process handed over: still our
    /// child, leading its group, and the one `released.pidfd` refers to.
    fn adopt(
        &self,
        released: Released,
        service: &str,
    ) -> Result<Box<dyn ChildProcess>, AdoptError> {
        Err(AdoptError::Unsupported {
            service: service.to_owned(),
            pid: released.pid,
        })
    }
}

/// Mark every descriptor above stderr close-on-exec, so nothing the daemon
/// inherited from its own parent leaks into the services. Descriptors the
/// daemon opens itself are close-on-exec already (Rust and tokio open them
/// so). The daemon calls it while it is still its only thread: it marks
/// whatever holds a listed number by the time it gets there.
pub fn mark_inherited_fds_cloexec() -> io::Result<()> {
    // One call for them all (Linux 5.11): after an upgrade there are
    // thousands (each service's pipes and pidfd), and the switch waits.
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing and
    // touches no memory of ours: it sets a flag on every open descriptor
    // from 3 up.
    let marked = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if marked == 0 {
        return Ok(());
    }
    // An older kernel: one descriptor at a time.
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
            service: "api".to_owned(),
            program: PathBuf::from("no-such-program"),
            source: enoent(),
        }
        .to_string();
        assert!(!bare.contains("binary_path"), "{bare}");
        assert!(bare.contains("not found in the service's PATH"), "{bare}");
        let path = SpawnError::Exec {
            service: "api".to_owned(),
            program: PathBuf::from("/srv/api/api"),
            source: enoent(),
        }
        .to_string();
        assert!(path.contains("check binary_path, command[0]"), "{path}");
    }
}
