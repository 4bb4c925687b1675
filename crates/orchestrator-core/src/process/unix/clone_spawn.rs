//! The spawn for a service that needs more between fork and exec than
//! posix_spawn offers: joining its cgroup, rlimits, another user, no_new_privs,
//! executing the very descriptor that was hashed.
//!
//! The child is made the way glibc's posix_spawn makes its own: clone with
//! CLONE_VM | CLONE_VFORK on a stack of its own. It shares our memory, so no
//! page table is copied (fork's cost grows with the daemon's size, and
//! every page it touches afterwards would fault for copy-on-write), and we
//! are suspended until it has exec'd or exited. Sharing our memory is also
//! what dictates the rules for the child's code here:
//!
//! - no allocation, no lock, no panic (no indexing, no formatting, no
//!   `expect`), no Rust std I/O: another thread of the daemon may hold the
//!   allocator's lock, and anything the child changed in memory stays
//!   changed for us;
//! - raw system calls only, through `syscall(2)`: glibc's setuid, setgid
//!   and setgroups would broadcast the change to every thread of the
//!   *daemon* (the nptl setxid machinery), and its sigaction refuses the two
//!   signals it uses internally;
//! - everything it reads is prepared by the parent beforehand (`Plan`), and
//!   all it writes is its result, in two atomics of the parent's frame.
//!
//! It shares our descriptor table too, when the spawn has slots (see
//! `slots`): its first change to the table is to leave it for a copy of the
//! slots' end of it, so until then it must not open, close or move any
//! descriptor (that would be the daemon's).

use std::ffi::{CStr, c_char, c_int, c_long, c_void};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use rustix::process::WaitOptions;

use super::prepare::{ChildRlimit, Credentials, Prepared};
use super::rustix_pid;
use super::slots::Loaded;
use crate::config::Rlimit;
use crate::process::{ChildStage, SpawnError};

// The kernel's sigset_t is _NSIG / 8 = 8 bytes everywhere but on MIPS,
// whose 128 signals this file does not handle.
#[cfg(any(target_arch = "mips", target_arch = "mips64"))]
compile_error!("clone_spawn assumes 64 signals (a kernel sigset_t of 8 bytes)");
const KERNEL_SIGSET_BYTES: c_long = 8;

/// The child's stack. It runs a few small frames (the deepest is
/// `syscall(2)` under `run_child`); a guard page below turns an overflow
/// into a SIGSEGV of the child instead of a write into our heap.
const STACK_BYTES: usize = 64 * 1024;

/// How the spawn failed.
pub(super) enum Failure {
    /// Before the child existed (its stack, the clone itself).
    Setup {
        action: &'static str,
        source: io::Error,
    },
    /// In the child, which has exited and been reaped.
    Child { stage: ChildStage, errno: c_int },
}

impl Failure {
    pub(super) fn into_error(self, prepared: &Prepared) -> SpawnError {
        match self {
            Failure::Setup { action, source } => prepared.io_error("spawn", action, source),
            Failure::Child {
                stage: ChildStage::Exec,
                errno,
            } => SpawnError::Exec {
                service: prepared.service.clone(),
                program: prepared.program.clone(),
                source: io::Error::from_raw_os_error(errno),
            },
            Failure::Child { stage, errno } => SpawnError::Child {
                service: prepared.service.clone(),
                program: prepared.program.clone(),
                stage,
                source: io::Error::from_raw_os_error(errno),
            },
        }
    }
}

/// Everything the child reads, as plain numbers and pointers into data the
/// parent owns and keeps alive (and unchanged: it is suspended) until the
/// child has exec'd or exited.
struct Plan<'a> {
    path: &'a CStr,
    argv: &'a [*const c_char],
    envp: &'a [*const c_char],
    cwd: &'a CStr,
    /// Executed instead of `path` when it is not negative.
    exec_fd: RawFd,
    /// A script's descriptor must survive the exec (see `ExecFd`).
    exec_fd_survives: bool,
    join_fds: &'a [RawFd],
    rlimits: &'a [ChildRlimit],
    /// Moved onto 0, 1 and 2. Never 0, 1 or 2 themselves (`above_stdio`).
    stdio: [RawFd; 3],
    /// With a shared table: the descriptors the child keeps, those below
    /// this (`stdio` and `exec_fd` among them).
    keep_below: Option<RawFd>,
    credentials: Option<&'a Credentials>,
    no_new_privs: bool,
}

/// The child's plan and its result, shared through CLONE_VM.
struct Shared<'a> {
    plan: Plan<'a>,
    /// `stage_code` of the step that failed; 0 while none has.
    stage: AtomicU32,
    errno: AtomicI32,
}

/// Where the child's descriptors come from.
pub(super) enum Descriptors<'a> {
    /// Slots loaded with its stdio and program: it shares our table, then
    /// keeps a copy of the slots' end of it.
    Slots(&'a Loaded),
    /// Its stdio 0, 1 and 2 in a private copy of our whole table.
    Copied([BorrowedFd<'a>; 3]),
}

/// Start `prepared` with the descriptors of `descriptors` as 0, 1 and 2.
/// Returns once the child has exec'd (its pid) or failed (then it is
/// reaped).
pub(super) fn spawn(
    prepared: &Prepared,
    descriptors: Descriptors<'_>,
) -> Result<libc::pid_t, Failure> {
    let launch = &prepared.launch;
    let argv = null_terminated(&launch.argv);
    let envp = null_terminated(&launch.envp);
    let join_fds: Vec<RawFd> = prepared.join.iter().map(AsRawFd::as_raw_fd).collect();
    let (stdio, exec_fd, keep_below) = match descriptors {
        Descriptors::Slots(slots) => (
            slots.stdio(),
            prepared.exec_fd.as_ref().map_or(-1, |_| slots.program()),
            Some(slots.keep_below()),
        ),
        Descriptors::Copied(stdio) => (
            stdio.map(|fd| fd.as_raw_fd()),
            prepared
                .exec_fd
                .as_ref()
                .map_or(-1, |exec| exec.fd.as_raw_fd()),
            None,
        ),
    };
    let shared = Shared {
        plan: Plan {
            path: &launch.path,
            argv: &argv,
            envp: &envp,
            cwd: &launch.cwd,
            exec_fd,
            exec_fd_survives: prepared.exec_fd.as_ref().is_some_and(|exec| exec.script),
            join_fds: &join_fds,
            rlimits: &prepared.rlimits,
            stdio,
            keep_below,
            credentials: prepared.credentials.as_ref(),
            no_new_privs: prepared.no_new_privs,
        },
        stage: AtomicU32::new(0),
        errno: AtomicI32::new(0),
    };
    let stack = PooledStack::take().map_err(|source| Failure::Setup {
        action: "map a stack for the child of",
        source,
    })?;
    // Every signal blocked in this thread, 32 and 33 (glibc's own) included,
    // which is why it is the raw call: the child inherits the mask, so none
    // of the daemon's handlers can run in it before it has reset them all.
    let everything: u64 = !0;
    let mut previous: u64 = 0;
    // SAFETY: rt_sigprocmask reads one kernel sigset from `everything` and
    // writes one into `previous`, both live locals of that size.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as c_long,
            &raw const everything,
            &raw mut previous,
            KERNEL_SIGSET_BYTES,
        );
    }
    // SAFETY: `child_main` follows the rules of the file comment, and takes
    // `shared`, which lives on this frame until after clone returns: with
    // CLONE_VFORK that is after the child has exec'd or exited, the last
    // moment it can touch our memory. The stack is ours, unused by anything
    // else, and `top` is the 16-byte-aligned end that clone expects (stacks
    // grow down on every architecture Linux and Rust share). SIGCHLD as the
    // exit signal makes it an ordinary child: waitpid and pidfds work.
    // CLONE_FILES only with slots: the child then leaves the shared table
    // before its first change to it (see `run_child`).
    let share_files = match keep_below {
        Some(_) => libc::CLONE_FILES,
        None => 0,
    };
    let pid = unsafe {
        libc::clone(
            child_main,
            stack.top(),
            libc::CLONE_VM | libc::CLONE_VFORK | share_files | libc::SIGCHLD,
            (&raw const shared).cast_mut().cast::<c_void>(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: as above; `previous` holds the mask saved there.
    unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            libc::SIG_SETMASK as c_long,
            &raw const previous,
            std::ptr::null_mut::<u64>(),
            KERNEL_SIGSET_BYTES,
        );
    }
    if pid < 0 {
        return Err(Failure::Setup {
            action: "clone a child for",
            source: clone_error,
        });
    }
    let stage = shared.stage.load(Ordering::Acquire);
    if stage == 0 {
        return Ok(pid);
    }
    // It has called _exit (that is what resumed us): reap it now, while it
    // is certainly ours (the caller holds the lock the orphan reaper takes).
    if let Ok(pid) = rustix_pid(pid as u32) {
        while let Err(rustix::io::Errno::INTR) =
            rustix::process::waitpid(Some(pid), WaitOptions::empty())
        {}
    }
    Err(Failure::Child {
        stage: stage_of(stage).unwrap_or(ChildStage::Exec),
        errno: shared.errno.load(Ordering::Acquire),
    })
}

/// A C array of pointers into `strings`, ended by a null pointer.
fn null_terminated(strings: &[std::ffi::CString]) -> Vec<*const c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// A child stage as one number, for the child to store.
fn stage_code(stage: ChildStage) -> u32 {
    match stage {
        ChildStage::ProcessGroup => 1,
        ChildStage::JoinCgroup => 2,
        ChildStage::Stdio => 3,
        ChildStage::Chdir => 4,
        ChildStage::Setgroups => 5,
        ChildStage::Setgid => 6,
        ChildStage::Setuid => 7,
        ChildStage::NoNewPrivs => 8,
        ChildStage::Exec => 9,
        ChildStage::Rlimit(rlimit) => 100 + rlimit as u32,
    }
}

/// Every stage the child reports, once each.
fn all_stages() -> impl Iterator<Item = ChildStage> {
    [
        ChildStage::ProcessGroup,
        ChildStage::JoinCgroup,
        ChildStage::Stdio,
        ChildStage::Chdir,
        ChildStage::Setgroups,
        ChildStage::Setgid,
        ChildStage::Setuid,
        ChildStage::NoNewPrivs,
        ChildStage::Exec,
    ]
    .into_iter()
    .chain(Rlimit::ALL.into_iter().map(ChildStage::Rlimit))
}

fn stage_of(code: u32) -> Option<ChildStage> {
    all_stages().find(|&stage| stage_code(stage) == code)
}

fn resource(rlimit: Rlimit) -> c_long {
    let resource = match rlimit {
        Rlimit::Nofile => libc::RLIMIT_NOFILE,
        Rlimit::Nproc => libc::RLIMIT_NPROC,
        Rlimit::Core => libc::RLIMIT_CORE,
        Rlimit::Memlock => libc::RLIMIT_MEMLOCK,
        Rlimit::Stack => libc::RLIMIT_STACK,
        Rlimit::As => libc::RLIMIT_AS,
        Rlimit::Cpu => libc::RLIMIT_CPU,
        Rlimit::Fsize => libc::RLIMIT_FSIZE,
    };
    resource as c_long
}

/// The child's stack: anonymous memory with a guard page at its low end.
/// The address as a number: a stack kept in the pool below moves between
/// threads, and is only ever handed to clone.
struct Stack {
    base: usize,
    len: usize,
}

/// Stacks kept for the next spawns: mapping one, guarding it and unmapping
/// it again cost three system calls and page faults per spawn, a fifth of
/// the daemon's CPU for 1000 health-check commands a second. A stack is
/// free again once clone returns (the child has exec'd or exited).
static STACKS: std::sync::Mutex<Vec<Stack>> = std::sync::Mutex::new(Vec::new());

/// As many as spawns can run at once, with some to spare.
const POOLED_STACKS: usize = 4;

/// A stack from the pool (or a new one), back to the pool when dropped.
struct PooledStack(Option<Stack>);

impl PooledStack {
    fn take() -> io::Result<PooledStack> {
        let pooled = STACKS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .pop();
        match pooled {
            Some(stack) => Ok(PooledStack(Some(stack))),
            None => Ok(PooledStack(Some(Stack::new()?))),
        }
    }

    fn top(&self) -> *mut c_void {
        self.0.as_ref().map_or(std::ptr::null_mut(), Stack::top)
    }
}

impl Drop for PooledStack {
    fn drop(&mut self) {
        let Some(stack) = self.0.take() else {
            return;
        };
        let mut pool = STACKS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pool.len() < POOLED_STACKS {
            pool.push(stack);
        }
        // Else dropped here: unmapped.
    }
}

impl Stack {
    fn new() -> io::Result<Stack> {
        // SAFETY: sysconf reads a constant of the process.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&page| page > 0)
            .unwrap_or(4096);
        let len = STACK_BYTES + page;
        // SAFETY: a fresh private anonymous mapping that aliases nothing.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = Stack {
            base: base as usize,
            len,
        };
        // SAFETY: the first page of the mapping just made, which nothing uses.
        if unsafe { libc::mprotect(base, page, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The end the stack grows down from; page-aligned, so 16-byte-aligned.
    fn top(&self) -> *mut c_void {
        (self.base + self.len) as *mut c_void
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once; the child that
        // used it last has exec'd or exited by the time its spawn lets go
        // of it (clone with CLONE_VFORK has returned).
        unsafe { libc::munmap(self.base as *mut c_void, self.len) };
    }
}

// ---------------------------------------------------------------------------
// The child. Everything below runs between clone and exec (see the file
// comment for its rules).

extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` is the `Shared` of `spawn`'s frame, alive and unchanged
    // until this child execs or exits (the parent is suspended meanwhile);
    // it is only read here, but for its atomics.
    let shared = unsafe { &*arg.cast::<Shared<'_>>() };
    let (stage, errno) = run_child(&shared.plan);
    shared.errno.store(errno, Ordering::Relaxed);
    // Release: the parent's Acquire load sees the errno too.
    shared.stage.store(stage_code(stage), Ordering::Release);
    // SAFETY: _exit ends this process alone (it is its own thread group)
    // without running atexit handlers or destructors, which are the
    // parent's. 127, as a shell reports a command it could not run.
    unsafe { libc::_exit(127) }
}

/// The steps, in order; returns only when one failed: which, and its errno.
fn run_child(plan: &Plan<'_>) -> (ChildStage, c_int) {
    // A group of its own first, as posix_spawn's SETPGROUP: signals the
    // daemon sends the service's group reach everything it starts.
    // SAFETY: numbers only.
    if let Err(errno) = unsafe { sys(libc::SYS_setpgid, [0; 6]) } {
        return (ChildStage::ProcessGroup, errno);
    }
    // Into the cgroup before anything could fork or exec, so nothing the
    // service starts is ever outside it. "0" means the writing process.
    let zero = c"0";
    for &fd in plan.join_fds {
        // SAFETY: writes 1 byte from `zero`, a static string.
        match unsafe {
            sys(
                libc::SYS_write,
                [fd as c_long, zero.as_ptr() as c_long, 1, 0, 0, 0],
            )
        } {
            Ok(1) => {}
            Ok(_) => return (ChildStage::JoinCgroup, libc::EIO),
            Err(errno) => return (ChildStage::JoinCgroup, errno),
        }
    }
    // Before the user changes: raising a hard limit needs root.
    for rlimit in plan.rlimits {
        let value = libc::rlimit64 {
            rlim_cur: rlimit.soft,
            rlim_max: rlimit.hard,
        };
        let args = [
            0,
            resource(rlimit.rlimit),
            (&raw const value) as c_long,
            0,
            0,
            0,
        ];
        // SAFETY: prlimit64 of this process (0) reads one rlimit64 from the
        // local `value`; the old-limit pointer is null.
        if let Err(errno) = unsafe { sys(libc::SYS_prlimit64, args) } {
            return (ChildStage::Rlimit(rlimit.rlimit), errno);
        }
    }
    if let Some(keep_below) = plan.keep_below {
        // A table of our own with the bottom of the shared one: the slots
        // (and whatever lay below them at start-up), not the thousands of
        // descriptors above, which a copy would reference one by one and
        // the exec close one by one.
        let args = [
            keep_below as c_long,
            c_long::from(u32::MAX),
            libc::CLOSE_RANGE_UNSHARE as c_long,
            0,
            0,
            0,
        ];
        // SAFETY: numbers only. It changes only this child's table, which
        // it makes its own first.
        if unsafe { sys(libc::SYS_close_range, args) }.is_err() {
            // Before Linux 5.9: a copy of the whole table, as without slots.
            // SAFETY: numbers only.
            if let Err(errno) = unsafe {
                sys(
                    libc::SYS_unshare,
                    [libc::CLONE_FILES as c_long, 0, 0, 0, 0, 0],
                )
            } {
                return (ChildStage::Stdio, errno);
            }
        }
    }
    // The copies on 0, 1 and 2 lose close-on-exec; the originals keep it.
    for (target, fd) in (0..).zip(plan.stdio) {
        // SAFETY: numbers only; `fd` is never `target` (see `Plan::stdio`).
        if let Err(errno) = unsafe { sys(libc::SYS_dup3, [fd as c_long, target, 0, 0, 0, 0]) } {
            return (ChildStage::Stdio, errno);
        }
    }
    // SAFETY: reads the NUL-terminated `cwd` of the plan.
    if let Err(errno) = unsafe {
        sys(
            libc::SYS_chdir,
            [plan.cwd.as_ptr() as c_long, 0, 0, 0, 0, 0],
        )
    } {
        return (ChildStage::Chdir, errno);
    }
    if let Some(credentials) = plan.credentials {
        // Groups first: once the uid is not root, they cannot change.
        let groups = &credentials.groups;
        let args = [
            groups.len() as c_long,
            groups.as_ptr() as c_long,
            0,
            0,
            0,
            0,
        ];
        // SAFETY: reads `groups.len()` gids from the plan's vector. Raw, not
        // glibc's setgroups, which would change every thread of the daemon.
        if let Err(errno) = unsafe { sys(libc::SYS_setgroups, args) } {
            return (ChildStage::Setgroups, errno);
        }
        let gid = credentials.gid as c_long;
        // SAFETY: numbers only; raw for the same reason.
        if let Err(errno) = unsafe { sys(libc::SYS_setresgid, [gid, gid, gid, 0, 0, 0]) } {
            return (ChildStage::Setgid, errno);
        }
        let uid = credentials.uid as c_long;
        // SAFETY: numbers only; raw for the same reason.
        if let Err(errno) = unsafe { sys(libc::SYS_setresuid, [uid, uid, uid, 0, 0, 0]) } {
            return (ChildStage::Setuid, errno);
        }
    }
    if plan.no_new_privs {
        let args = [libc::PR_SET_NO_NEW_PRIVS as c_long, 1, 0, 0, 0, 0];
        // SAFETY: numbers only.
        if let Err(errno) = unsafe { sys(libc::SYS_prctl, args) } {
            return (ChildStage::NoNewPrivs, errno);
        }
    }
    // Every signal to its default (exec resets handled ones, but keeps an
    // ignored one ignored). A zeroed kernel sigaction is SIG_DFL with no
    // flags and an empty mask whatever the architecture's field order, and
    // 32 bytes cover the largest layout. SIGKILL and SIGSTOP fail (EINVAL),
    // and are at their default anyway.
    let default_action = [0u64; 4];
    for signal in 1..=64 {
        let action = (&raw const default_action) as c_long;
        // SAFETY: reads one kernel sigaction from the local `default_action`
        // (large enough, see above); the old-action pointer is null.
        let _ = unsafe {
            sys(
                libc::SYS_rt_sigaction,
                [signal, action, 0, KERNEL_SIGSET_BYTES, 0, 0],
            )
        };
    }
    if plan.exec_fd >= 0 && plan.exec_fd_survives {
        let args = [plan.exec_fd as c_long, libc::F_SETFD as c_long, 0, 0, 0, 0];
        // SAFETY: numbers only; clears close-on-exec in this child's own
        // descriptor table (a copy by now), not the daemon's.
        if let Err(errno) = unsafe { sys(libc::SYS_fcntl, args) } {
            return (ChildStage::Exec, errno);
        }
    }
    // Last, so that nothing but the default actions meets a pending signal.
    let no_signal: u64 = 0;
    let mask = (&raw const no_signal) as c_long;
    // SAFETY: reads one kernel sigset from the local `no_signal`.
    let _ = unsafe {
        sys(
            libc::SYS_rt_sigprocmask,
            [
                libc::SIG_SETMASK as c_long,
                mask,
                0,
                KERNEL_SIGSET_BYTES,
                0,
                0,
            ],
        )
    };
    let argv = plan.argv.as_ptr() as c_long;
    let envp = plan.envp.as_ptr() as c_long;
    let exec = if plan.exec_fd >= 0 {
        let empty = c"";
        let flags = libc::AT_EMPTY_PATH as c_long;
        let args = [
            plan.exec_fd as c_long,
            empty.as_ptr() as c_long,
            argv,
            envp,
            flags,
            0,
        ];
        // SAFETY: `empty` is a static string; `argv` and `envp` are the
        // plan's null-terminated arrays of pointers to NUL-terminated
        // strings, all owned by the parent's `Launch`.
        unsafe { sys(libc::SYS_execveat, args) }
    } else {
        // SAFETY: as above, with the plan's NUL-terminated `path`.
        unsafe {
            sys(
                libc::SYS_execve,
                [plan.path.as_ptr() as c_long, argv, envp, 0, 0, 0],
            )
        }
    };
    match exec {
        Err(errno) => (ChildStage::Exec, errno),
        // execve does not return but to fail.
        Ok(_) => (ChildStage::Exec, libc::EINVAL),
    }
}

/// One raw system call. glibc's `syscall(2)` moves the arguments into
/// registers and traps: no lock, no allocation, no signal juggling. On
/// failure it sets errno, which in this child is the suspended parent
/// thread's (same thread pointer), read here at once and never by the
/// parent after a successful clone.
///
/// # Safety
///
/// Each pointer argument must point to live memory of the size and type
/// that call number reads or writes; every argument beyond what the call
/// takes is ignored by the kernel.
unsafe fn sys(number: c_long, args: [c_long; 6]) -> Result<c_long, c_int> {
    let [a, b, c, d, e, f] = args;
    // SAFETY: the caller's contract above.
    let result = unsafe { libc::syscall(number, a, b, c, d, e, f) };
    if result == -1 {
        // SAFETY: __errno_location returns this thread's errno slot, always valid.
        Err(unsafe { *libc::__errno_location() })
    } else {
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_stage_round_trips_through_its_code() {
        for stage in all_stages() {
            assert_ne!(stage_code(stage), 0);
            assert_eq!(stage_of(stage_code(stage)), Some(stage));
        }
        // Nine steps and eight rlimits, each with a code of its own.
        let codes: std::collections::BTreeSet<u32> = all_stages().map(stage_code).collect();
        assert_eq!(codes.len(), 9 + Rlimit::ALL.len());
        assert_eq!(stage_of(0), None);
    }

    #[test]
    fn stacks_go_back_to_a_bounded_pool() {
        let taken: Vec<PooledStack> = (0..POOLED_STACKS + 2)
            .map(|_| PooledStack::take().unwrap())
            .collect();
        assert!(taken.iter().all(|stack| !stack.top().is_null()));
        drop(taken);
        // Other tests spawn meanwhile and take some back: never more kept.
        assert!(STACKS.lock().unwrap().len() <= POOLED_STACKS);
    }
}
