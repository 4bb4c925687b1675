//! The few file operations cgroup interface files need, shared by v1 and
//! v2: each value is written with one write(2), as the kernel parses it per
//! call, and a missing file or directory is told apart from other failures.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub(super) fn errno(error: &io::Error) -> i32 {
    error.raw_os_error().unwrap_or(0)
}

/// Write `text` to an existing interface file. Never creates one: a missing
/// file means the controller is not there, which callers report.
pub(super) fn write(path: &Path, text: &str) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).truncate(true).open(path)?;
    file.write_all(text.as_bytes())
}

pub(super) fn read(path: &Path) -> io::Result<String> {
    fs::read_to_string(path)
}

/// A file holding one number (memory.current, cpuacct.usage, ...).
pub(super) fn read_u64(path: &Path) -> Option<u64> {
    read(path).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed file ("oom_kill 3", "usage_usec 12").
pub(super) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        if name == key {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}

pub(super) fn parse_pids(text: &str) -> Vec<u32> {
    text.split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect()
}

/// The pids in a cgroup.procs file; none when the cgroup is gone, which is
/// what a caller asking "who is left" wants to hear.
pub(super) fn read_pids(procs: &Path) -> io::Result<Vec<u32>> {
    match read(procs) {
        Ok(text) => Ok(parse_pids(&text)),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(error) => Err(error),
    }
}

/// SIGKILL each pid that is still in the cgroup once pinned. A listed
/// process may exit (and its number be reused by someone else's) between
/// the read of cgroup.procs and the kill: each is pinned with a pidfd first,
/// then `still_listed` reads the cgroup again, and only a pinned process
/// whose number is still listed is signalled, through its pidfd: a number
/// still listed after the pin is the pinned process's (it cannot have been
/// reused while that one was unreaped), and the signal goes to the pinned
/// process whatever its number does afterwards. Never pid 0 or 1
/// (a cgroup.procs lists 0 for a process outside our pid namespace) and
/// never ourselves, whatever a file says. Kernels without pidfds (before
/// 5.3) get a plain kill by number.
pub(super) fn kill_pids(pids: &[u32], still_listed: impl FnOnce() -> io::Result<Vec<u32>>) {
    let own = std::process::id();
    let candidates: Vec<rustix::process::Pid> = pids
        .iter()
        .filter(|&&pid| pid > 1 && pid != own)
        .filter_map(|&pid| i32::try_from(pid).ok())
        .filter_map(rustix::process::Pid::from_raw)
        .collect();
    let mut pinned = Vec::with_capacity(candidates.len());
    for pid in candidates {
        match rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()) {
            Ok(pidfd) => pinned.push((pid, pidfd)),
            // Gone already: the goal.
            Err(rustix::io::Errno::SRCH) => {}
            // No pidfds at all (before 5.3): by number, as before them.
            // ESRCH from the kill: it died meanwhile, which is the goal.
            Err(rustix::io::Errno::NOSYS) => {
                let _ = kill(Pid::from_raw(pid.as_raw_nonzero().get()), Signal::SIGKILL);
            }
            // Out of descriptors (EMFILE...): never by number; the caller's
            // next pass tries again.
            Err(_) => {}
        }
    }
    if pinned.is_empty() {
        return;
    }
    let listed: std::collections::BTreeSet<u32> =
        still_listed().unwrap_or_default().into_iter().collect();
    for (pid, pidfd) in pinned {
        if listed.contains(&pid.as_raw_nonzero().get().unsigned_abs()) {
            let _ = rustix::process::pidfd_send_signal(&pidfd, rustix::process::Signal::KILL);
        }
    }
}

/// mkdir; `Ok(true)` when it was already there.
pub(super) fn mkdir(path: &Path) -> io::Result<bool> {
    match fs::create_dir(path) {
        Ok(()) => Ok(false),
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => Ok(true),
        Err(error) => Err(error),
    }
}

/// rmdir; a cgroup already gone is removed.
pub(super) fn rmdir(path: &Path) -> io::Result<()> {
    match fs::remove_dir(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// `dir/cgroup.procs` for the child to write "0" to before it execs; opened
/// here, in the daemon, so the child needs no path lookup or allocation.
pub(super) fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(dir.join("cgroup.procs"))?;
    Ok(OwnedFd::from(file))
}

/// The names of the directories (child cgroups) in `dir`.
pub(super) fn subdirs(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

/// rmdir `dir` and then each of its parents up to (not including) `base`,
/// stopping at the first that is not empty: the daemon's cgroup parent,
/// removed when the daemon ends so that parallel test daemons leave nothing.
pub(super) fn remove_chain(dir: &Path, base: &Path) {
    let mut dir = dir;
    while dir != base && dir.starts_with(base) {
        if fs::remove_dir(dir).is_err() {
            return;
        }
        let Some(parent) = dir.parent() else {
            return;
        };
        dir = parent;
    }
}

/// Why `path` could not be made, and what to do about it.
pub(super) fn explain_mkdir(path: &Path, error: &io::Error) -> String {
    match errno(error) {
        libc::EACCES | libc::EPERM => format!(
            "no permission to create {}: run as root or delegate the subtree (systemd Delegate=yes)",
            path.display()
        ),
        libc::EROFS => format!(
            "cannot create {}: the cgroup filesystem is mounted read-only (as in most containers): mount it read-write, or run the daemon where it is",
            path.display()
        ),
        _ => format!("cannot create {}: {error}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pid read from a cgroup is killed only if the cgroup still lists it
    /// once pinned: a number that left (and might now be someone else's) is
    /// spared.
    #[test]
    fn only_pids_still_listed_once_pinned_are_killed() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        kill_pids(&[pid], || Ok(Vec::new()));
        assert!(
            child.try_wait().unwrap().is_none(),
            "killed although no longer listed"
        );
        kill_pids(&[pid, 0, 1, std::process::id()], || Ok(vec![pid]));
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
    }
}
