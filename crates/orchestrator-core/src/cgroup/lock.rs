//! One daemon per cgroup parent. Several daemons may run on one host (the
//! test suite runs dozens, with the same service names), and each kills
//! whatever it finds in its parent at start: two sharing one would kill each
//! other's services. The lock is an abstract Unix socket bound to the
//! parent's path: the kernel releases it when the process dies, even by
//! SIGKILL, so a stale lock never blocks a restart.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

/// Held while bound; a datagram socket nobody sends to is enough, as the
/// bound name itself is the lock.
#[derive(Debug)]
pub(super) struct ParentLock {
    _socket: UnixDatagram,
}

/// Longest abstract socket name (sun_path less its leading NUL).
const NAME_MAX: usize = 107;

const PREFIX: &str = "orchestrator-cgroup:";

/// FNV-1a: stable across builds and runs, unlike std's hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// `orchestrator-cgroup:` and the parent's absolute path; a long path is
/// shortened to a hash of it and its tail.
pub(super) fn lock_name(parent: &Path) -> String {
    let path = parent.display().to_string();
    let full = format!("{PREFIX}{path}");
    if full.len() <= NAME_MAX {
        return full;
    }
    let head = format!("{PREFIX}{:016x}:", fnv1a64(path.as_bytes()));
    let mut tail_start = path.len() - (NAME_MAX - head.len());
    while !path.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!("{head}{}", &path[tail_start..])
}

/// The fallback parent of a daemon whose configured one is taken:
/// `<cgroup_parent>-<8 hex digits>` of its data_dir, the same after a
/// restart, so a daemon killed with SIGKILL finds its own leftovers.
pub(super) fn hashed_parent(cgroup_parent: &Path, data_dir: &Path) -> PathBuf {
    let data_dir = std::fs::canonicalize(data_dir)
        .or_else(|_| std::path::absolute(data_dir))
        .unwrap_or_else(|_| data_dir.to_owned());
    let hash = fnv1a64(data_dir.as_os_str().as_encoded_bytes());
    // Folded to 32 bits: 8 hex digits keep the cgroup name short.
    let short = (hash ^ (hash >> 32)) as u32;
    PathBuf::from(format!("{}-{short:08x}", cgroup_parent.display()))
}

impl ParentLock {
    /// The bound socket: a process that holds a copy (the guardian) holds
    /// the lock too, for as long as it keeps it open.
    pub(super) fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self._socket.as_fd()
    }

    /// `Ok(None)` when another process holds it.
    pub(super) fn try_acquire(parent: &Path) -> io::Result<Option<ParentLock>> {
        let name = lock_name(parent);
        let addr = SocketAddr::from_abstract_name(name.as_bytes())?;
        match UnixDatagram::bind_addr(&addr) {
            Ok(socket) => Ok(Some(ParentLock { _socket: socket })),
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => Ok(None),
            Err(error) => Err(error),
        }
    }
}

/// Take the configured parent, else the hashed one; returns the parent
/// (relative to `base`) that this daemon now owns, or why it owns none.
///
/// A hashed parent that exists and is free comes first: only a daemon with
/// this data_dir makes it, so it holds what an earlier life of this daemon
/// left (killed with its guardian while it ran on the fallback), and the
/// start-up sweep must look there, not in a configured parent that has
/// become free since.
pub(super) fn claim(
    base: &Path,
    cgroup_parent: &Path,
    data_dir: &Path,
) -> Result<(PathBuf, ParentLock), String> {
    let hashed = hashed_parent(cgroup_parent, data_dir);
    let order = if base.join(&hashed).is_dir() {
        [hashed.clone(), cgroup_parent.to_owned()]
    } else {
        [cgroup_parent.to_owned(), hashed.clone()]
    };
    for relative in order {
        let parent = base.join(&relative);
        match ParentLock::try_acquire(&parent) {
            Ok(Some(lock)) => return Ok((relative, lock)),
            Ok(None) => continue,
            Err(error) => {
                return Err(format!(
                    "cannot lock the cgroup parent {} (abstract socket @{}): {error}",
                    parent.display(),
                    lock_name(&parent)
                ));
            }
        }
    }
    Err(format!(
        "the cgroup parents {} and {} are both held by other orchestrator daemons on this host: give this one another cgroup_parent in [orchestrator]",
        base.join(cgroup_parent).display(),
        base.join(&hashed).display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_shortened_to_fit() {
        let long = PathBuf::from(format!("/sys/fs/cgroup/{}", "x".repeat(200)));
        let name = lock_name(&long);
        assert!(name.len() <= NAME_MAX, "{name}");
        assert!(name.starts_with(PREFIX));
        assert_eq!(
            lock_name(Path::new("/sys/fs/cgroup/orchestrator")),
            "orchestrator-cgroup:/sys/fs/cgroup/orchestrator"
        );
    }

    #[test]
    fn the_hashed_parent_depends_only_on_data_dir() {
        let a = hashed_parent(Path::new("orchestrator"), Path::new("/nonexistent/a"));
        let again = hashed_parent(Path::new("orchestrator"), Path::new("/nonexistent/a"));
        let b = hashed_parent(Path::new("orchestrator"), Path::new("/nonexistent/b"));
        assert_eq!(a, again);
        assert_ne!(a, b);
        let name = a.to_str().unwrap();
        let suffix = name.strip_prefix("orchestrator-").unwrap();
        assert_eq!(suffix.len(), 8);
        assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn an_existing_hashed_parent_is_claimed_first() {
        let base = std::env::temp_dir().join(format!("lock-test-hashed-{}", std::process::id()));
        let data_dir = Path::new("/nonexistent/data-hashed");
        let hashed = hashed_parent(Path::new("orch"), data_dir);
        std::fs::create_dir_all(base.join(&hashed)).unwrap();
        let (first, _a) = claim(&base, Path::new("orch"), data_dir).unwrap();
        assert_eq!(first, hashed, "where the last life left its services");
        let (second, _b) = claim(&base, Path::new("orch"), data_dir).unwrap();
        assert_eq!(second, Path::new("orch"));
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_second_claim_falls_back_then_fails() {
        let base = PathBuf::from(format!(
            "/nonexistent/lock-test-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let data_dir = Path::new("/nonexistent/data");
        let (first, _a) = claim(&base, Path::new("orch"), data_dir).unwrap();
        assert_eq!(first, Path::new("orch"));
        let (second, _b) = claim(&base, Path::new("orch"), data_dir).unwrap();
        assert_eq!(second, hashed_parent(Path::new("orch"), data_dir));
        let third = claim(&base, Path::new("orch"), data_dir).unwrap_err();
        assert!(
            third.contains("held by other orchestrator daemons"),
            "{third}"
        );
    }
}
