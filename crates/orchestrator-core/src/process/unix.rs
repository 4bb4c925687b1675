//! The real spawner: a clean environment, a process group of its own, and
//! the exit watched through a pidfd. Not `tokio::process`: tokio would hold
//! a second pidfd per child, and every descriptor the daemon holds is copied
//! (and closed again) by every spawn. Not `std::process` either: it leaves
//! signals ignored in the child (see `posix_spawn`).

mod clone_spawn;
mod posix_spawn;
mod prepare;
mod slots;

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{AccessFlags, Pid, access, pipe2};
use rustix::process::{PidfdFlags, WaitId, WaitIdOptions, WaitOptions};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{
    AdoptError, ChildOutput, ChildProcess, ExitReason, ReleaseError, Released, SpawnError,
    SpawnSpec, Spawner, WaitFuture,
};
use crate::cgroup::{NoCgroups, ResourceController, ServiceCgroup};

pub use prepare::Prepared;
pub use slots::reserve as reserve_spawn_slots;

/// Starts services: a preparation stage in the daemon (resolve the program
/// and the user, the strict check, open and hash the binary, create the
/// cgroup), then the launch. The launch is posix_spawn when nothing but a
/// clean start is asked for, else a clone that shares our memory (see
/// `clone_spawn`) and takes the extra steps between clone and exec.
#[derive(Debug)]
pub struct UnixSpawner {
    controller: Arc<dyn ResourceController>,
    require_limits: bool,
    /// Services already warned about limits their cgroup cannot enforce:
    /// one warning per service and daemon, not one per restart.
    warned: Mutex<HashSet<String>>,
}

impl UnixSpawner {
    /// `controller` places every service in a cgroup of its own (unless its
    /// flavor is `None`); `require_limits` turns a limit it cannot enforce
    /// into a failed start instead of a warning.
    pub fn new(controller: Arc<dyn ResourceController>, require_limits: bool) -> UnixSpawner {
        UnixSpawner {
            controller,
            require_limits,
            warned: Mutex::new(HashSet::new()),
        }
    }

    /// Without cgroups (tests, and hosts where none can be used).
    pub fn plain() -> UnixSpawner {
        UnixSpawner::new(
            Arc::new(NoCgroups {
                reason: "this daemon places no service in a cgroup".to_owned(),
            }),
            false,
        )
    }

    /// Everything that may allocate, block or fail before the process
    /// exists. Split from `launch` so a test can change the file system in
    /// between (a binary swapped after its hash must not be what runs).
    pub fn prepare(&self, spec: &SpawnSpec) -> Result<Prepared, SpawnError> {
        prepare::prepare(self, spec, prepare::Cgroup::Own)
    }

    /// `prepare` for a health check's command (see `Spawner::spawn_probe`):
    /// it joins `cgroup` rather than getting one of its own.
    pub fn prepare_probe(
        &self,
        spec: &SpawnSpec,
        cgroup: Option<&Arc<dyn ServiceCgroup>>,
    ) -> Result<Prepared, SpawnError> {
        prepare::prepare(self, spec, prepare::Cgroup::Join(cgroup))
    }

    /// Start what `prepare` made ready. Its cgroup, if any, goes with the
    /// child, or is removed again when the start fails.
    pub fn launch(&self, mut prepared: Prepared) -> Result<Box<dyn ChildProcess>, SpawnError> {
        let (stdout, stdout_child) = output_pipe(&prepared)?;
        let (stderr, stderr_child) = match prepared.merge_output {
            false => {
                let (read, write) = output_pipe(&prepared)?;
                (read, Some(write))
            }
            // The child's stderr is its stdout; ours reads as ended.
            true => (output_pipe(&prepared)?.0, None),
        };
        let stderr_child_fd = stderr_child.as_ref().unwrap_or(&stdout_child).as_fd();
        let mut slots = slots::take();
        if let Some(slots) = &mut slots {
            let program = prepared.exec_fd.as_ref().map(|exec| exec.fd.as_fd());
            slots
                .load(stdout_child.as_fd(), stderr_child_fd, program)
                .map_err(|source| {
                    prepared.io_error("spawn", "move the output pipes into place for", source)
                })?;
        }
        let stdin = match (&slots, prepared.needs_clone()) {
            (None, true) => Some(dev_null(&prepared)?),
            _ => None,
        };
        // Spawned and registered under one lock, so the orphan reaper can
        // never mistake a service that died at once for an orphan.
        let mut own = own_children();
        let spawned = match (&slots, &stdin) {
            (Some(slots), _) => {
                clone_spawn::spawn(&prepared, clone_spawn::Descriptors::Slots(slots))
                    .map_err(|failure| failure.into_error(&prepared))
            }
            (None, Some(stdin)) => clone_spawn::spawn(
                &prepared,
                clone_spawn::Descriptors::Copied([
                    stdin.as_fd(),
                    stdout_child.as_fd(),
                    stderr_child_fd,
                ]),
            )
            .map_err(|failure| failure.into_error(&prepared)),
            // posix_spawn, not fork: see `clone_spawn` for why.
            (None, None) => {
                posix_spawn::spawn(&prepared.launch, stdout_child.as_fd(), stderr_child_fd).map_err(
                    |source| SpawnError::Exec {
                        service: prepared.service.clone(),
                        program: prepared.program.clone(),
                        source,
                    },
                )
            }
        };
        // Only the child writes: its exit must close the pipes, and the
        // slots' copies of them go first.
        drop(slots);
        let pid = spawned?;
        let pid = u32::try_from(pid).expect("a spawn returns a positive pid");
        own.insert(pid, Held::Supervised);
        drop(own);
        drop((stdout_child, stderr_child, stdin));
        // A pidfd tells us the leader exited while it is still a zombie, so
        // its group id is still certainly ours to signal. Kernels before 5.3
        // have none: then the exit is polled for (see `wait`).
        let exited = rustix_pid(pid)
            .ok()
            .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok())
            .and_then(watch_pidfd);
        Ok(Box::new(UnixChild {
            pid,
            service: prepared.service.clone(),
            // A probe's child shares one pipe for both streams; it is not
            // the service's, and never handed over.
            releasable: !prepared.merge_output,
            released: false,
            output: Some(ChildOutput { stdout, stderr }),
            exited,
            reaped: false,
            outcome: None,
            cgroup: prepared.cgroup.take(),
            memory_limit_mib: prepared.memory_limit_mib,
            oom_kills_at_start: prepared.oom_kills_at_start,
            killed_by_us: false,
        }))
    }

    /// Whether this is the first time `service` is warned about.
    fn first_warning(&self, service: &str) -> bool {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        !warned.contains(service) && warned.insert(service.to_owned())
    }
}

impl Spawner for UnixSpawner {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Box<dyn ChildProcess>, SpawnError> {
        let prepared = self.prepare(spec)?;
        self.launch(prepared)
    }

    fn spawn_probe(
        &self,
        spec: &SpawnSpec,
        cgroup: Option<&Arc<dyn ServiceCgroup>>,
    ) -> Result<Box<dyn ChildProcess>, SpawnError> {
        let prepared = self.prepare_probe(spec, cgroup)?;
        self.launch(prepared)
    }

    fn sweep_leftovers(&self, services: &std::collections::BTreeSet<String>) -> Vec<u32> {
        self.controller.sweep_leftovers(services)
    }

    fn adopt(
        &self,
        released: Released,
        service: &str,
    ) -> Result<Box<dyn ChildProcess>, AdoptError> {
        let Released {
            pid,
            cgroup,
            killed_by_us,
            oom_kills_at_start,
            memory_limit_mib,
            pidfd,
            output,
        } = released;
        let not_ours = |reason: String| AdoptError::NotOurs {
            service: service.to_owned(),
            pid,
            reason,
        };
        // Checked and registered under the registry's lock: the orphan
        // reaper cannot reap it (should it have died) in between, which
        // would free its pid for reuse.
        let mut own = own_children();
        if own.get(&pid) == Some(&Held::Supervised) {
            return Err(not_ours(
                "this process supervises it already (it was not released)".to_owned(),
            ));
        }
        let pidfd = match pidfd {
            Some(fd) => {
                match pidfd_pid(&fd) {
                    Ok(Some(of)) if of == i64::from(pid) => {
                        // Kernels before 5.15 keep showing the number after
                        // the reap; waitid on the pidfd itself knows.
                        let options =
                            WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
                        if let Err(error) =
                            rustix::process::waitid(WaitId::PidFd(fd.as_fd()), options)
                        {
                            return Err(not_ours(format!(
                                "the process its pidfd refers to cannot be waited for ({error}): \
                                 it has been reaped since"
                            )));
                        }
                        // waitid answered for the pidfd: the process is our
                        // child and not reaped (ECHILD otherwise), what its
                        // /proc/PID/stat would say of its parent, without
                        // reading it (a thousand services resume at once).
                        leads_its_group(pid, service)?;
                    }
                    Ok(Some(of)) => {
                        return Err(not_ours(format!(
                            "the pidfd handed over with it refers to {}",
                            match of {
                                -1 => "a process that has been reaped since".to_owned(),
                                0 => "a process in another pid namespace".to_owned(),
                                other => format!("pid {other}"),
                            }
                        )));
                    }
                    Ok(None) => {
                        return Err(not_ours(
                            "the descriptor handed over as its pidfd shows no pid (not a pidfd, \
                             or a kernel before 5.4)"
                                .to_owned(),
                        ));
                    }
                    Err(source) => {
                        return Err(AdoptError::Io {
                            service: service.to_owned(),
                            pid,
                            path: PathBuf::from(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())),
                            source,
                        });
                    }
                }
                Some(fd)
            }
            // Our unreaped child (checked here): a pidfd opened now
            // refers to the very process.
            None => {
                check_adoptable(pid, service)?;
                rustix_pid(pid)
                    .ok()
                    .and_then(|p| rustix::process::pidfd_open(p, PidfdFlags::empty()).ok())
            }
        };
        own.insert(pid, Held::Supervised);
        drop(own);
        let cgroup = cgroup.and_then(|path| {
            let adopted = self.controller.adopt(service, &path);
            if adopted.is_none() && self.controller.flavor() != crate::cgroup::Flavor::None {
                tracing::warn!(
                    service,
                    "service {service}: its cgroup {} was not adopted: processes that left \
                     its process group are not killed when it ends; the next start's sweep \
                     removes them",
                    path.display()
                );
            }
            adopted
        });
        Ok(Box::new(UnixChild {
            pid,
            service: service.to_owned(),
            releasable: true,
            released: false,
            output,
            exited: pidfd.and_then(watch_pidfd),
            reaped: false,
            outcome: None,
            cgroup,
            memory_limit_mib,
            oom_kills_at_start,
            killed_by_us,
        }))
    }
}

/// Whether `pid` is a process we may adopt: our child (not yet reaped, a
/// zombie included: its exit is what `wait` must report) that leads its
/// own process group, as every service leader does.
fn check_adoptable(pid: u32, service: &str) -> Result<(), AdoptError> {
    let path = PathBuf::from(format!("/proc/{pid}/stat"));
    let not_ours = |reason: String| AdoptError::NotOurs {
        service: service.to_owned(),
        pid,
        reason,
    };
    let stat = match crate::state::read_proc_line(&path) {
        Ok(stat) => stat,
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            return Err(not_ours("no such process".to_owned()));
        }
        Err(source) => {
            return Err(AdoptError::Io {
                service: service.to_owned(),
                pid,
                path,
                source,
            });
        }
    };
    let (ppid, pgrp) = parse_stat(&stat).ok_or_else(|| AdoptError::Io {
        service: service.to_owned(),
        pid,
        path: path.clone(),
        source: io::Error::new(io::ErrorKind::InvalidData, "unexpected format"),
    })?;
    let us = std::process::id();
    if ppid != us {
        return Err(not_ours(format!(
            "it is not a child of this process (pid {us}) but of pid {ppid}"
        )));
    }
    if pgrp != pid {
        return Err(not_ours(format!(
            "it does not lead its own process group (its group is {pgrp})"
        )));
    }
    Ok(())
}

/// Whether our child `pid` (known to be ours and unreaped) still leads its
/// own process group, which every service leader does: its group is what
/// signals go to.
fn leads_its_group(pid: u32, service: &str) -> Result<(), AdoptError> {
    let not_ours = |reason: String| AdoptError::NotOurs {
        service: service.to_owned(),
        pid,
        reason,
    };
    let process = rustix_pid(pid).map_err(|_| not_ours("no such process".to_owned()))?;
    match rustix::process::getpgid(Some(process)) {
        Ok(group) if group == process => Ok(()),
        Ok(group) => Err(not_ours(format!(
            "it does not lead its own process group (its group is {})",
            group.as_raw_nonzero()
        ))),
        Err(error) => Err(not_ours(format!(
            "its process group cannot be read: {error}"
        ))),
    }
}

/// The parent pid and the process group of a /proc/PID/stat line. The
/// command name (in parentheses) may hold anything, spaces and `)` too:
/// the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(u32, u32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    // state, ppid, pgrp, ...
    let mut fields = rest.split_whitespace().skip(1);
    let ppid = fields.next()?.parse().ok()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((ppid, pgrp))
}

/// The pid a pidfd refers to, from its fdinfo: `-1` once that process has
/// been reaped, `0` when it is outside our pid namespace; `None` when `fd`
/// is not a pidfd (or the kernel, before 5.4, shows no `Pid:` for one).
fn pidfd_pid(fd: &OwnedFd) -> io::Result<Option<i64>> {
    let info =
        crate::state::read_proc_line(Path::new(&format!("/proc/self/fdinfo/{}", fd.as_raw_fd())))?;
    Ok(info
        .lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|value| value.trim().parse().ok()))
}

/// A pipe for the child's stdout or stderr: (our read end, the child's end).
fn output_pipe(prepared: &Prepared) -> Result<(OwnedFd, OwnedFd), SpawnError> {
    let error =
        |source: io::Error| prepared.io_error("spawn", "create the output pipes for", source);
    let (read, write) = pipe2(OFlag::O_CLOEXEC).map_err(|e| error(e.into()))?;
    Ok((read, above_stdio(write).map_err(error)?))
}

/// The child's stdin.
fn dev_null(prepared: &Prepared) -> Result<OwnedFd, SpawnError> {
    let error =
        |source: io::Error| prepared.io_error("spawn", "open /dev/null as stdin of", source);
    let file = std::fs::File::open("/dev/null").map_err(error)?;
    above_stdio(file.into()).map_err(error)
}

/// `fd`, or a copy numbered 3 or more when it is 0, 1 or 2 (a daemon
/// started with its stdio closed): the child moves its descriptors onto 0,
/// 1 and 2, and one already there would be overwritten by another's move,
/// or keep its close-on-exec flag (dup2 onto itself changes nothing).
fn above_stdio(fd: OwnedFd) -> io::Result<OwnedFd> {
    if fd.as_raw_fd() > 2 {
        return Ok(fd);
    }
    Ok(rustix::io::fcntl_dupfd_cloexec(&fd, 3)?)
}

/// The daemon's RLIMIT_NOFILE soft limit from before it raised its own.
static ORIGINAL_NOFILE: OnceLock<u64> = OnceLock::new();

/// Record the open-files soft limit the daemon was started with. Call it
/// before raising that limit (only the first call counts): each service then
/// gets this one back, not the daemon's raised one, unless it sets
/// rlimits.nofile. Programs written for the usual 1024 (select(2) users)
/// break past it, and a service that wants more says so.
pub fn record_original_nofile() {
    if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = ORIGINAL_NOFILE.set(soft);
    }
}

/// [`record_original_nofile`] with a value the daemon was given: after an
/// upgrade, the limit the first daemon started with (the new image starts
/// with the raised one). Only the first record counts.
pub fn record_original_nofile_as(soft: u64) {
    let _ = ORIGINAL_NOFILE.set(soft);
}

/// Descriptors the daemon holds for each running service at most: its two
/// output pipes, its pidfd, on cgroup v1 its cgroup's `cgroup.procs`, and
/// its log file once it has written.
pub const DESCRIPTORS_PER_SERVICE: u64 = 5;

/// What [`raise_nofile`] left the daemon with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileRaise {
    /// The limits before and after.
    pub before: (u64, u64),
    pub after: (u64, u64),
}

/// The RLIMIT_NOFILE (soft, hard) to ask for: the soft limit up to the
/// hard one, as systemd and most servers do, and the hard one up to
/// `needed` (never past the kernel's `nr_open`) when it is short, which
/// only a privileged daemon may do. Never lowers either.
pub fn nofile_target(current: (u64, u64), needed: u64, nr_open: u64) -> (u64, u64) {
    let (soft, hard) = current;
    let hard = hard.max(needed.min(nr_open));
    (soft.max(hard), hard)
}

/// Raises the daemon's open-files limit for `needed` descriptors (see
/// [`nofile_target`]); without the privilege to raise the hard limit, the
/// soft one still goes up to it. Call [`record_original_nofile`] first: the
/// services get that one back.
pub fn raise_nofile(needed: u64) -> io::Result<NofileRaise> {
    let before = getrlimit(Resource::RLIMIT_NOFILE)?;
    // The kernel refuses a hard limit above nr_open even to root.
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(before.1);
    let (soft, hard) = nofile_target(before, needed, nr_open);
    if (soft, hard) != before
        && setrlimit(Resource::RLIMIT_NOFILE, soft, hard).is_err()
        && before.0 < before.1
    {
        // Unprivileged: the hard limit stays, the soft one may reach it.
        setrlimit(Resource::RLIMIT_NOFILE, before.1, before.1)?;
    }
    Ok(NofileRaise {
        before,
        after: getrlimit(Resource::RLIMIT_NOFILE)?,
    })
}

/// The open-files soft limit the daemon started with, once recorded.
pub fn original_nofile() -> Option<u64> {
    ORIGINAL_NOFILE.get().copied()
}

/// The recorded original soft limit, when it differs from the current one
/// (which the child inherits); with the current hard limit.
fn nofile_to_restore() -> Option<(u64, u64)> {
    let original = *ORIGINAL_NOFILE.get()?;
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    (soft != original).then_some((original.min(hard), hard))
}

/// A `SpawnSpec` as the C calls take it, prepared before the spawn lock is
/// taken.
#[derive(Debug)]
struct Launch {
    /// The file to execute: `program` itself, or where the service's PATH
    /// finds it.
    path: CString,
    /// `program` as given, then the arguments.
    argv: Vec<CString>,
    /// `NAME=value`, exactly the spec's environment.
    envp: Vec<CString>,
    cwd: CString,
}

impl Launch {
    fn new(spec: &SpawnSpec, path: &Path) -> io::Result<Launch> {
        let argv = std::iter::once(spec.program.as_os_str().as_bytes())
            .chain(spec.args.iter().map(|arg| arg.as_bytes()))
            .map(c_string)
            .collect::<io::Result<_>>()?;
        let envp = spec
            .env
            .iter()
            .map(|(name, value)| c_string(format!("{name}={value}").as_bytes()))
            .collect::<io::Result<_>>()?;
        Ok(Launch {
            path: c_string(path.as_os_str().as_bytes())?,
            argv,
            envp,
            cwd: c_string(spec.cwd.as_os_str().as_bytes())?,
        })
    }
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{:?} holds a NUL byte", String::from_utf8_lossy(bytes)),
        )
    })
}

/// Where execvp in the child would find `program`: a name without a slash
/// is looked up in the service's own PATH (not the daemon's, which glibc's
/// posix_spawnp would use), relative entries from the service's directory.
pub fn resolve_program(program: &Path, env: &[super::EnvVar], cwd: &Path) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_owned());
    }
    // glibc's execvp default when there is no PATH.
    let search = super::env_value(env, "PATH").unwrap_or("/bin:/usr/bin");
    let mut denied = false;
    for dir in search.split(':') {
        // An empty entry is the current directory.
        let candidate = cwd.join(dir).join(program);
        match access(&candidate, AccessFlags::X_OK) {
            Ok(()) if candidate.is_file() => return Ok(candidate),
            Ok(()) => {}
            // As execvp: a file found but not executable is reported if
            // nothing better turns up later in the PATH.
            Err(Errno::EACCES) => denied = true,
            Err(_) => {}
        }
    }
    Err(io::Error::from_raw_os_error(if denied {
        libc::EACCES
    } else {
        libc::ENOENT
    }))
}

/// Service leaders spawned here and not yet reaped by their actor: the
/// only children the orphan reaper must leave alone.
/// A released one is still ours (unreaped, its exit status is for its
/// adopter), but may be adopted; a supervised one may not be, twice.
static OWN_CHILDREN: Mutex<BTreeMap<u32, Held>> = Mutex::new(BTreeMap::new());

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Supervised,
    Released,
}

fn own_children() -> MutexGuard<'static, BTreeMap<u32, Held>> {
    OWN_CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Marks `pids` (the services an upgrade handed over, before they are
/// adopted) as ours: the orphan reaper of the new image, installed before
/// the adoption, must not take an exit status their adopters will wait for.
pub fn hold_handed_over(pids: impl IntoIterator<Item = u32>) {
    let mut own = own_children();
    for pid in pids {
        own.entry(pid).or_insert(Held::Released);
    }
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
        if own.contains_key(&pid) {
            continue;
        }
        let Ok(pid) = rustix_pid(pid) else {
            continue;
        };
        if let Ok(Some(_)) = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG) {
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
        let fd = rustix::process::pidfd_open(rustix_pid(pid)?, PidfdFlags::empty())?;
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
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    Ok(rustix::process::waitid(WaitId::Pid(rustix_pid(pid)?), options)?.is_some())
}

/// A pid for rustix. The wait functions are all rustix's: nix's fail on a
/// death by a real-time signal (it has no `Signal` for one), even when the
/// call itself reaped the child.
fn rustix_pid(pid: u32) -> io::Result<rustix::process::Pid> {
    i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
        .ok_or_else(|| io::Error::other(format!("invalid pid {pid}")))
}

/// Reap our exited child `pid`; `None` while it still runs.
fn reap(pid: u32) -> io::Result<Option<ExitReason>> {
    let reaped = rustix::process::waitpid(Some(rustix_pid(pid)?), WaitOptions::NOHANG)?;
    // Without WUNTRACED or WCONTINUED, a status is an exit or a death.
    Ok(reaped.map(|(_, status)| {
        let status = status.as_raw();
        if libc::WIFSIGNALED(status) {
            ExitReason::Signaled {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            }
        } else {
            ExitReason::Exited(libc::WEXITSTATUS(status))
        }
    }))
}

struct UnixChild {
    pid: u32,
    service: String,
    /// A service's leader (not a probe's command): `release` may give it up.
    releasable: bool,
    /// Given up by `release`: dropping it must not touch the process.
    released: bool,
    output: Option<ChildOutput>,
    /// Readable once the leader has exited (before it is reaped).
    exited: Option<AsyncFd<OwnedFd>>,
    reaped: bool,
    /// The leader's end, once reaped, kept until its cgroup is cleaned up
    /// too: `wait` stays cancel-safe through the cleanup.
    outcome: Option<io::Result<ExitReason>>,
    /// `None` without cgroups, and once `wait` has removed it.
    cgroup: Option<Arc<dyn ServiceCgroup>>,
    memory_limit_mib: Option<u64>,
    /// The cgroup's OOM kill count when it was made: more at the end means
    /// the OOM killer struck during this run.
    oom_kills_at_start: u64,
    /// We sent SIGKILL (stop_timeout, kill): a SIGKILL death is then ours,
    /// even if the OOM killer took some other process of the service.
    killed_by_us: bool,
}

/// How long `wait` keeps killing what is left in the cgroup of a service
/// whose leader ended, and retrying its removal, before leaving it to the
/// next start's sweep.
const CGROUP_EMPTY_DEADLINE: Duration = Duration::from_secs(5);

/// Between two passes of that.
const CGROUP_POLL: Duration = Duration::from_millis(5);

/// A child dropped unreaped (its actor panicked, or the daemon is leaving
/// on an error path) would run on unsupervised. While it is unreaped its
/// group id is still ours, so the group is killed, and the leader is handed
/// to the orphan reaper, which reaps it on the SIGCHLD that follows.
impl Drop for UnixChild {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        if self.reaped {
            // Dropped during the cleanup of `wait`: one more pass over the
            // cgroup, nothing that waits.
            if let Some(cgroup) = &self.cgroup {
                let _ = cgroup.kill_all();
            }
            return;
        }
        // All under the registry's lock, which the orphan reaper takes
        // too: it cannot reap the leader between our check and the kill
        // (which would free the group id for reuse). A leader already dead
        // is reaped here; one still dying is left out of the registry, so
        // the orphan reaper takes it on the SIGCHLD of its death. The kill
        // includes one pass over the cgroup; the cgroup itself is left in
        // place (it cannot be removed before its processes are gone, and
        // this must not wait): the next daemon's sweep removes it.
        let mut own = own_children();
        let _ = self.signal_group(Signal::SIGKILL);
        if let Ok(Some(_)) = reap(self.pid) {
            self.reaped = true;
        }
        own.remove(&self.pid);
    }
}

impl UnixChild {
    /// `signal` to the process group alone; the cgroup is not looked at.
    fn signal_process_group(&self, signal: Signal) -> io::Result<()> {
        // Reaped (a `wait` cut short while it emptied the cgroup): the
        // group id may belong to someone else by now; the cgroup is ours.
        if self.reaped {
            return Ok(());
        }
        let pgid = i32::try_from(self.pid)
            .ok()
            .filter(|&pid| pid > 1)
            .ok_or_else(|| io::Error::other(format!("refusing to signal group {}", self.pid)))?;
        match killpg(Pid::from_raw(pgid), signal) {
            Ok(()) => Ok(()),
            // Nobody left in the group: the goal of any signal we send is met.
            Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }

    /// Wait for the leader's exit, kill its group and reap it.
    async fn reap_leader(&mut self) -> io::Result<ExitReason> {
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
            // generations never run side by side and the pipes close. Not
            // counted as our kill: the leader's own death came first. Its
            // cgroup, if any, is emptied next (`clean_up_cgroup`).
            let _ = self.signal_process_group(Signal::SIGKILL);
            match reap(self.pid) {
                Ok(Some(reason)) => {
                    self.reaped = true;
                    own_children().remove(&self.pid);
                    return Ok(self.oom_or(reason));
                }
                Ok(None) => {}
                // Reaped by someone else (ECHILD): no longer ours to
                // signal, not even from Drop.
                Err(error) => {
                    self.reaped = true;
                    own_children().remove(&self.pid);
                    return Err(error);
                }
            }
            // Readable yet not reapable should not happen; never spin.
            tokio::time::sleep(EXIT_POLL_WITHOUT_PIDFD).await;
        }
    }

    /// A SIGKILL is the OOM killer's when the cgroup counted a kill during
    /// this run (it counts before it sends the signal).
    fn oom_or(&self, reason: ExitReason) -> ExitReason {
        match (reason, &self.cgroup) {
            (
                ExitReason::Signaled {
                    signal: libc::SIGKILL,
                    ..
                },
                Some(cgroup),
            ) if !self.killed_by_us && cgroup.oom_kills() > self.oom_kills_at_start => {
                ExitReason::OomKilled {
                    memory_limit_mib: self.memory_limit_mib,
                }
            }
            _ => reason,
        }
    }

    /// Empty the cgroup of whatever escaped the process group (a setsid or
    /// double-forked descendant), then remove it. Gives up after
    /// `CGROUP_EMPTY_DEADLINE`, with a warning: the next daemon's sweep
    /// finds it. Idempotent, so a cancelled `wait` can run it again.
    async fn clean_up_cgroup(&mut self) {
        let Some(cgroup) = self.cgroup.clone() else {
            return;
        };
        // Usually the cgroup is empty by now: the group went with its
        // leader. The kernel refuses to remove a cgroup that holds a
        // process, so removing it first is also the look: reading its list
        // (in each v1 hierarchy: an open, a read and a close each) cost a
        // fleet's stop ~5 % of its CPU. Anything refused goes the long way.
        if cgroup.remove().is_ok() {
            self.cgroup = None;
            return;
        }
        let deadline = tokio::time::Instant::now() + CGROUP_EMPTY_DEADLINE;
        let path = cgroup.path().display().to_string();
        loop {
            // Each look and each kill reads the cgroup's list, which a
            // fleet stopping at once pays a thousand times over.
            match cgroup.is_empty() {
                Ok(true) => break,
                Ok(false) if tokio::time::Instant::now() < deadline => {
                    let _ = cgroup.kill_all();
                    tokio::time::sleep(CGROUP_POLL).await;
                }
                Ok(false) => {
                    tracing::warn!(
                        cgroup = %path,
                        "processes left in cgroup {path} survived SIGKILL for {CGROUP_EMPTY_DEADLINE:?} \
                         after the service ended (stage \"cgroup cleanup\"): left for the next \
                         start's sweep; look for processes stuck in the D state"
                    );
                    self.cgroup = None;
                    return;
                }
                Err(error) => {
                    tracing::warn!(
                        cgroup = %path,
                        "cannot list the processes of cgroup {path} after the service ended \
                         (stage \"cgroup cleanup\"): {error}; left for the next start's sweep"
                    );
                    self.cgroup = None;
                    return;
                }
            }
        }
        self.cgroup = None;
        match cgroup.remove() {
            Ok(()) => {}
            // The kernel frees a cgroup's last process a little after it
            // stops being listed. Nothing of the service runs any more, so
            // its exit is reported now and the removal finishes in the
            // background: waiting for it here cost every restart a poll
            // period or more. A next run that makes the directory first
            // keeps it (cgroup::Owners).
            Err(error) if error.raw_os_error() == Some(libc::EBUSY) => {
                // Made here and moved in: a task dropped before it first
                // runs (the runtime going away) still counts itself out.
                let pending = PendingRemovals::start();
                tokio::spawn(async move {
                    let _pending = pending;
                    loop {
                        tokio::time::sleep(CGROUP_POLL).await;
                        match cgroup.remove() {
                            Ok(()) => return,
                            Err(error)
                                if error.raw_os_error() == Some(libc::EBUSY)
                                    && tokio::time::Instant::now() < deadline => {}
                            Err(error) => {
                                warn_not_removed(&path, &error);
                                return;
                            }
                        }
                    }
                });
            }
            Err(error) => warn_not_removed(&path, &error),
        }
    }
}

fn warn_not_removed(path: &str, error: &io::Error) {
    tracing::warn!(
        cgroup = %path,
        "cannot remove cgroup {path} after the service ended \
         (stage \"cgroup cleanup\"): {error}; left for the next start's sweep"
    );
}

/// Cgroup removals still under way in the background; one guard each.
static PENDING_REMOVALS: AtomicUsize = AtomicUsize::new(0);
static REMOVALS_DONE: tokio::sync::Notify = tokio::sync::Notify::const_new();

struct PendingRemovals;

impl PendingRemovals {
    fn start() -> Self {
        PENDING_REMOVALS.fetch_add(1, Ordering::SeqCst);
        PendingRemovals
    }
}

impl Drop for PendingRemovals {
    fn drop(&mut self) {
        if PENDING_REMOVALS.fetch_sub(1, Ordering::SeqCst) == 1 {
            REMOVALS_DONE.notify_waiters();
        }
    }
}

/// Waits (at most `limit`) for the services' cgroups still being removed
/// in the background: before the daemon exits, so that it leaves no empty
/// cgroup behind and its parent can go too.
pub async fn cgroup_removals_settled(limit: Duration) {
    let settled = async {
        loop {
            // Registered before the count is read: a last removal ending
            // in between still wakes us.
            let done = REMOVALS_DONE.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if PENDING_REMOVALS.load(Ordering::SeqCst) == 0 {
                return;
            }
            done.await;
        }
    };
    let _ = tokio::time::timeout(limit, settled).await;
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
            if self.outcome.is_none() {
                let outcome = self.reap_leader().await;
                self.outcome = Some(outcome);
            }
            self.clean_up_cgroup().await;
            self.outcome
                .take()
                .unwrap_or_else(|| Err(io::Error::other("wait called again after it returned")))
        })
    }

    fn signal_group(&mut self, signal: Signal) -> io::Result<()> {
        if signal == Signal::SIGKILL {
            // Ours: a later death by SIGKILL is not the OOM killer's.
            self.killed_by_us = true;
            if let Some(cgroup) = &self.cgroup {
                // What escaped the group (setsid) is still in the cgroup.
                let _ = cgroup.kill_all();
            }
        }
        self.signal_process_group(signal)
    }

    fn cgroup(&self) -> Option<Arc<dyn ServiceCgroup>> {
        self.cgroup.clone()
    }

    fn release(mut self: Box<Self>) -> Result<Released, ReleaseError> {
        if !self.releasable {
            return Err(ReleaseError::Probe {
                service: self.service.clone(),
                pid: self.pid,
            });
        }
        if self.reaped {
            return Err(ReleaseError::Reaped {
                service: self.service.clone(),
                pid: self.pid,
            });
        }
        // The pid stays in the registry: unreaped, it is still ours, and
        // the orphan reaper must not take its exit status from whoever
        // adopts it (this image, or the next after exec, which starts with
        // an empty registry that adopt fills before its reaper runs).
        self.released = true;
        own_children().insert(self.pid, Held::Released);
        Ok(Released {
            pid: self.pid,
            cgroup: self.cgroup.take().map(|cgroup| cgroup.path().to_owned()),
            killed_by_us: self.killed_by_us,
            oom_kills_at_start: self.oom_kills_at_start,
            memory_limit_mib: self.memory_limit_mib,
            pidfd: self.exited.take().map(AsyncFd::into_inner),
            output: self.output.take(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn file(dir: &Path, name: &str, mode: u32) {
        let path = dir.join(name);
        std::fs::write(&path, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn the_open_files_target_takes_the_hard_limit_and_raises_it_only_when_short() {
        // Enough below the hard limit: the soft one goes up to it.
        assert_eq!(
            nofile_target((1024, 524_288), 4_000, 1_048_576),
            (524_288, 524_288)
        );
        // Short: the hard one goes up to what is needed...
        assert_eq!(
            nofile_target((1024, 20_000), 41_000, 1_048_576),
            (41_000, 41_000)
        );
        // ...but never past nr_open, and nothing is ever lowered.
        assert_eq!(
            nofile_target((1024, 20_000), 2_000_000, 1_048_576),
            (1_048_576, 1_048_576)
        );
        assert_eq!(
            nofile_target((65_536, 65_536), 10, 1_048_576),
            (65_536, 65_536)
        );
    }

    #[test]
    fn a_bare_name_is_found_in_the_services_own_path() {
        let root = std::env::temp_dir().join(format!("orchestrator-path-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (first, second, cwd) = (root.join("first"), root.join("second"), root.join("cwd"));
        for dir in [&first, &second, &cwd.join("rel")] {
            std::fs::create_dir_all(dir).unwrap();
        }
        file(&first, "tool", 0o644);
        file(&second, "tool", 0o755);
        file(&first, "locked", 0o644);
        file(&cwd.join("rel"), "local", 0o755);
        std::fs::create_dir(second.join("dir")).unwrap();
        let path = format!("{}:rel:{}", first.display(), second.display());
        let env = [("PATH".into(), path.into())];
        let resolve = |program: &str| resolve_program(Path::new(program), &env, &cwd);

        // Past a file that cannot be executed, as execvp goes on.
        assert_eq!(resolve("tool").unwrap(), second.join("tool"));
        // A relative entry counts from the service's directory.
        assert_eq!(resolve("local").unwrap(), cwd.join("rel").join("local"));
        let errno = |program| resolve(program).unwrap_err().raw_os_error();
        assert_eq!(errno("locked"), Some(libc::EACCES));
        assert_eq!(errno("missing"), Some(libc::ENOENT));
        assert_eq!(errno("dir"), Some(libc::ENOENT));
        // A name with a slash is not looked up.
        assert_eq!(resolve("./tool").unwrap(), Path::new("./tool"));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn the_stat_fields_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 109 0 0 0";
        assert_eq!(parse_stat(stat), Some((17, 4242)));
        assert_eq!(parse_stat("4242 (x"), None);
    }

    #[test]
    fn unenforced_limits_are_warned_about_once_per_service() {
        let spawner = UnixSpawner::plain();
        assert!(spawner.first_warning("api"));
        assert!(!spawner.first_warning("api"));
        assert!(spawner.first_warning("db"));
    }

    /// A child dropped unreaped (an actor that panicked) is killed with its
    /// group and reaped as an orphan: nothing runs on unsupervised.
    #[tokio::test]
    async fn a_child_dropped_unreaped_is_killed_and_reaped_as_an_orphan() {
        let dir = std::env::temp_dir().join(format!("orchestrator-drop-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let spec = SpawnSpec {
            service: "dropped".to_owned(),
            program: "/bin/sleep".into(),
            args: vec!["60".to_owned()],
            env: vec![],
            cwd: dir.clone(),
            ..SpawnSpec::default()
        };
        let child = UnixSpawner::plain().spawn(&spec).expect("spawn /bin/sleep");
        let pid = child.pid();
        drop(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        // Gone entirely: killed, then reaped (as the SIGCHLD handler would).
        while std::path::Path::new(&format!("/proc/{pid}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid} still exists after its handle was dropped"
            );
            reap_orphans();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
