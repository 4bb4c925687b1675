//! posix_spawn called directly. It is the cheap way to start a process from a
//! big daemon (the calling thread is suspended until the exec; the address
//! space is shared, never copied), but `std::process` cannot be asked for
//! what a service is promised: it puts only SIGPIPE in the set of signals
//! reset to their default, and glibc's posix_spawn sets its two internal
//! signals (32 and 33) to SIG_IGN in the child, which exec keeps.

use std::ffi::{CStr, c_int, c_short, c_ulong};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::Launch;

/// Start `launch` in a process group of its own with every signal at its
/// default disposition and an empty mask, stdin on /dev/null and stdout and
/// stderr on the given descriptors. Returns the child's pid; an error is the
/// errno of whatever failed, the exec included (glibc reports it).
pub(super) fn spawn(
    launch: &Launch,
    stdout: BorrowedFd<'_>,
    stderr: BorrowedFd<'_>,
) -> io::Result<libc::pid_t> {
    let attributes = Attributes::clean_start()?;
    let mut actions = FileActions::new()?;
    actions.open(0, c"/dev/null", libc::O_RDONLY)?;
    // The copies lose close-on-exec (glibc clears it even when a descriptor
    // already has the target number); the pipe ends themselves have it.
    actions.dup2(stdout, 1)?;
    actions.dup2(stderr, 2)?;
    actions.chdir(&launch.cwd)?;
    let argv = null_terminated(&launch.argv);
    let envp = null_terminated(&launch.envp);
    let mut pid: libc::pid_t = 0;
    // SAFETY: `pid` is a valid place for the result; `launch.path` and the
    // strings `argv` and `envp` point to are owned by `launch`, which
    // outlives the call, and both arrays end in a null pointer; `actions`
    // and `attributes` are initialised. posix_spawn writes only `pid` (the
    // `*mut` in the type of argv and envp is C's legacy, not a write).
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            launch.path.as_ptr(),
            &actions.0,
            &attributes.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    })?;
    Ok(pid)
}

/// A C array of pointers into `strings`, ended by a null pointer.
fn null_terminated(strings: &[std::ffi::CString]) -> Vec<*mut libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr().cast_mut())
        .chain(std::iter::once(std::ptr::null_mut()))
        .collect()
}

/// posix_spawn's functions return an errno rather than setting it.
fn check(code: c_int) -> io::Result<()> {
    match code {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

struct Attributes(libc::posix_spawnattr_t);

impl Attributes {
    fn clean_start() -> io::Result<Attributes> {
        let mut raw = MaybeUninit::uninit();
        // SAFETY: posix_spawnattr_init initialises the object it is given;
        // it is only assumed initialised once that succeeded.
        let mut attributes = unsafe {
            check(libc::posix_spawnattr_init(raw.as_mut_ptr()))?;
            Attributes(raw.assume_init())
        };
        let every = every_signal();
        let none = no_signal();
        let flags = libc::POSIX_SPAWN_SETSIGDEF
            | libc::POSIX_SPAWN_SETSIGMASK
            | libc::POSIX_SPAWN_SETPGROUP;
        // SAFETY: the attributes object is initialised and borrowed mutably;
        // the two sets are initialised locals that the calls copy from.
        unsafe {
            check(libc::posix_spawnattr_setsigdefault(
                &mut attributes.0,
                &every,
            ))?;
            check(libc::posix_spawnattr_setsigmask(&mut attributes.0, &none))?;
            // Group 0: a new group whose id is the child's pid.
            check(libc::posix_spawnattr_setpgroup(&mut attributes.0, 0))?;
            check(libc::posix_spawnattr_setflags(
                &mut attributes.0,
                flags as c_short,
            ))?;
        }
        Ok(attributes)
    }
}

impl Drop for Attributes {
    fn drop(&mut self) {
        // SAFETY: initialised in `clean_start` and destroyed only here.
        unsafe { libc::posix_spawnattr_destroy(&mut self.0) };
    }
}

struct FileActions(libc::posix_spawn_file_actions_t);

impl FileActions {
    fn new() -> io::Result<FileActions> {
        let mut raw = MaybeUninit::uninit();
        // SAFETY: posix_spawn_file_actions_init initialises the object it is
        // given; it is only assumed initialised once that succeeded.
        unsafe {
            check(libc::posix_spawn_file_actions_init(raw.as_mut_ptr()))?;
            Ok(FileActions(raw.assume_init()))
        }
    }

    fn open(&mut self, fd: c_int, path: &CStr, flags: c_int) -> io::Result<()> {
        // SAFETY: the object is initialised; glibc copies the path, which
        // is a valid NUL-terminated string for the duration of the call.
        check(unsafe {
            libc::posix_spawn_file_actions_addopen(&mut self.0, fd, path.as_ptr(), flags, 0)
        })
    }

    fn dup2(&mut self, from: BorrowedFd<'_>, to: c_int) -> io::Result<()> {
        // SAFETY: the object is initialised; only descriptor numbers are
        // recorded, and `from` is open until the spawn that uses them.
        check(unsafe { libc::posix_spawn_file_actions_adddup2(&mut self.0, from.as_raw_fd(), to) })
    }

    fn chdir(&mut self, dir: &CStr) -> io::Result<()> {
        // SAFETY: the object is initialised; glibc copies the path, which
        // is a valid NUL-terminated string for the duration of the call.
        check(unsafe { libc::posix_spawn_file_actions_addchdir_np(&mut self.0, dir.as_ptr()) })
    }
}

impl Drop for FileActions {
    fn drop(&mut self) {
        // SAFETY: initialised in `new` and destroyed only here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut self.0) };
    }
}

fn no_signal() -> libc::sigset_t {
    // Zeroed first: glibc's sigemptyset clears only the words the kernel
    // uses, not the whole (128-byte) type.
    let mut set = MaybeUninit::<libc::sigset_t>::zeroed();
    // SAFETY: a sigset_t is plain integers, so all zeros is an initialised
    // value, and sigemptyset cannot fail for a valid pointer.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        set.assume_init()
    }
}

/// Signals 1 to 64, the internal 32 and 33 included. glibc's sigaddset
/// refuses those two and sigfillset leaves them out, yet they are the very
/// ones its posix_spawn sets to SIG_IGN in the child unless the sigdefault
/// set holds them (the child tests membership without that restriction).
/// So the bits are set directly: in glibc's (and musl's) layout, signal n is
/// bit (n - 1) of an array of unsigned longs, counted word by word.
fn every_signal() -> libc::sigset_t {
    const WORDS: usize = 64 / c_ulong::BITS as usize;
    const _: () = assert!(size_of::<libc::sigset_t>() >= WORDS * size_of::<c_ulong>());
    const _: () = assert!(align_of::<libc::sigset_t>() >= align_of::<c_ulong>());
    let mut set = no_signal();
    // SAFETY: a sigset_t is an array of unsigned longs at least WORDS long
    // and aligned as one (both checked above); `set` is an initialised local
    // and this is its only borrow.
    let words = unsafe { &mut *(&raw mut set).cast::<[c_ulong; WORDS]>() };
    *words = [c_ulong::MAX; WORDS];
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_signal_holds_the_internal_ones_and_nothing_past_64() {
        let set = every_signal();
        for signal in 1..=64 {
            // sigismember, unlike sigaddset, answers for 32 and 33 too.
            // SAFETY: `set` is an initialised sigset_t.
            let member = unsafe { libc::sigismember(&set, signal) };
            assert_eq!(member, 1, "signal {signal}");
        }
        let none = no_signal();
        // SAFETY: reading the bytes of an initialised plain-integer struct.
        let bytes = |set: &libc::sigset_t| unsafe {
            std::slice::from_raw_parts(
                (set as *const libc::sigset_t).cast::<u8>(),
                size_of::<libc::sigset_t>(),
            )
            .to_vec()
        };
        assert_eq!(bytes(&set)[8..], bytes(&none)[8..], "beyond signal 64");
        assert!(bytes(&none).iter().all(|&b| b == 0));
    }
}
