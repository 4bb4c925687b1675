//! Crash safety: one daemon per data_dir (a lock), a record of the
//! processes it runs (`data_dir/state`, written atomically), and the clean-up
//! of what a daemon that died (SIGKILL, OOM, power cut) left running.
//!
//! Identity is never a bare pid: a record holds the pid's start time
//! (/proc/PID/stat field 22), process group and session, and every process
//! found again is pinned with a pidfd before it is signalled, so a recycled
//! pid is never touched.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot};
use tracing::{info, warn};

use crate::events::{Event, EventKind};

// ---- trust ----

/// The uid the daemon runs as: the only owner of data_dir and its files that
/// it trusts.
pub fn our_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// Someone else could plant files there (a `state` naming their
    /// processes, a `lock` symlink to a file of ours...).
    #[error("refusing {what} {}: {reason}; anyone who can write there could make this daemon signal their processes or overwrite files. Fix: {fix}", path.display())]
    Untrusted {
        what: &'static str,
        path: PathBuf,
        reason: String,
        fix: String,
    },
    #[error("cannot check {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Refuse a data_dir (and its `logs/`) that is not owned by our uid or that
/// group or others can write. The data_dir path itself may be a symlink
/// (the operator chose it); `logs` inside it may not.
pub fn check_data_dir(data_dir: &Path) -> Result<(), TrustError> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let io_error = |path: &Path| {
        let path = path.to_owned();
        move |source| TrustError::Io { path, source }
    };
    // The path may be a symlink the operator made, but not someone else's:
    // a link planted at a path in /tmp could point the daemon anywhere.
    let link = std::fs::symlink_metadata(data_dir).map_err(io_error(data_dir))?;
    if link.file_type().is_symlink() && link.uid() != our_uid() && link.uid() != 0 {
        return Err(TrustError::Untrusted {
            what: "data_dir",
            path: data_dir.to_owned(),
            reason: format!(
                "it is a symbolic link owned by uid {}, not by this daemon's uid {}",
                link.uid(),
                our_uid()
            ),
            fix: format!(
                "`rm {}` and let the daemon create it, or set data_dir to the real path",
                shell_quote(data_dir)
            ),
        });
    }
    let meta = std::fs::metadata(data_dir).map_err(io_error(data_dir))?;
    check_private_dir("data_dir", data_dir, &meta)?;
    let logs = data_dir.join("logs");
    let meta = match std::fs::symlink_metadata(&logs) {
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&logs)
                .map_err(io_error(&logs))?;
            std::fs::symlink_metadata(&logs).map_err(io_error(&logs))?
        }
        other => other.map_err(io_error(&logs))?,
    };
    if meta.file_type().is_symlink() {
        return Err(TrustError::Untrusted {
            what: "the logs directory",
            path: logs.clone(),
            reason: "it is a symbolic link, so logs would be written wherever it points".to_owned(),
            fix: format!("`rm {}` (the daemon creates it)", shell_quote(&logs)),
        });
    }
    let _ = meta.mode();
    check_private_dir("the logs directory", &logs, &meta)
}

fn check_private_dir(
    what: &'static str,
    path: &Path,
    meta: &std::fs::Metadata,
) -> Result<(), TrustError> {
    use std::os::unix::fs::MetadataExt;
    let uid = our_uid();
    let quoted = shell_quote(path);
    let untrusted = |reason: String, fix: String| TrustError::Untrusted {
        what,
        path: path.to_owned(),
        reason,
        fix,
    };
    if !meta.is_dir() {
        return Err(untrusted(
            "it is not a directory".to_owned(),
            format!("move it away: `mv {quoted} {quoted}.old`"),
        ));
    }
    if meta.uid() != uid {
        return Err(untrusted(
            format!(
                "it is owned by uid {}, not by this daemon's uid {uid}",
                meta.uid()
            ),
            format!(
                "`chown {uid} {quoted} && chmod 700 {quoted}` (and check what was planted in it)"
            ),
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(untrusted(
            format!(
                "its mode {:04o} lets group or others write in it",
                meta.mode() & 0o7777
            ),
            format!("`chmod 700 {quoted}` (and check what was planted in it)"),
        ));
    }
    Ok(())
}

fn shell_quote(path: &Path) -> String {
    let text = path.display().to_string();
    if text
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"/._-+,:@".contains(&b))
    {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Open a file of data_dir for reading only if it is a regular file owned by
/// our uid: never through a symlink, never blocking on a FIFO.
fn open_trusted(path: &Path) -> Result<Option<(File, u64)>, OpenError> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(error) if error.raw_os_error() == Some(libc::ELOOP) => {
            return Err(OpenError::Untrusted("it is a symbolic link".to_owned()));
        }
        Err(error) => return Err(OpenError::Io(error)),
    };
    let meta = file.metadata().map_err(OpenError::Io)?;
    if !meta.is_file() {
        return Err(OpenError::Untrusted("it is not a regular file".to_owned()));
    }
    if meta.uid() != our_uid() {
        return Err(OpenError::Untrusted(format!(
            "it is owned by uid {}, not by this daemon's uid {}",
            meta.uid(),
            our_uid()
        )));
    }
    Ok(Some((file, meta.len())))
}

#[derive(Debug)]
enum OpenError {
    Untrusted(String),
    Io(io::Error),
}

/// Move an untrusted file out of the way (renaming a symlink moves the link,
/// not its target), so that nothing of ours reads or writes it again while
/// the operator can still look at it.
pub fn set_aside(path: &Path) -> io::Result<PathBuf> {
    let mut aside = path.as_os_str().to_owned();
    aside.push(".untrusted");
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)?;
    Ok(aside)
}

// ---- the lock ----

/// Held for the daemon's whole life; the kernel releases it when the daemon
/// dies, however it dies. Two holds: a flock on `data_dir/lock`, and an
/// abstract Unix socket named after the canonical data_dir path, which
/// deleting data_dir does not remove (a second daemon on a recreated
/// data_dir would otherwise run every service a second time).
#[derive(Debug)]
pub struct DaemonLock {
    _file: Flock<File>,
    _name: AbstractLock,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another orchestrator{} is already running on data_dir {}: stop it first (`orchestrator shutdown`) or give this one another data_dir", pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), dir.display())]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("the lock name of data_dir {} ({name:?}, an abstract Unix socket) is held by pid {pid} of uid {uid}, not an orchestrator of this uid: find it with `ss -xlp | grep {name}`, stop it, then start again", dir.display())]
    Squatted {
        dir: PathBuf,
        name: String,
        pid: u32,
        uid: u32,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] TrustError),
}

impl DaemonLock {
    /// Check data_dir (see [`check_data_dir`]), then take both holds, or say
    /// who has them. Never blocks.
    pub fn acquire(data_dir: &Path) -> Result<DaemonLock, LockError> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        check_data_dir(data_dir)?;
        let name = AbstractLock::acquire(data_dir)?;
        let path = data_dir.join("lock");
        let io_error = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        // O_NOFOLLOW: a `lock` symlink planted to one of our files would
        // otherwise have that file truncated below.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|error| {
                if error.raw_os_error() == Some(libc::ELOOP) {
                    LockError::Untrusted(TrustError::Untrusted {
                        what: "the lock file",
                        path: path.clone(),
                        reason: "it is a symbolic link".to_owned(),
                        fix: format!("`rm {}`", shell_quote(&path)),
                    })
                } else {
                    io_error(error)
                }
            })?;
        let meta = file.metadata().map_err(io_error)?;
        if !meta.is_file() || meta.uid() != our_uid() {
            return Err(LockError::Untrusted(TrustError::Untrusted {
                what: "the lock file",
                path: path.clone(),
                reason: format!(
                    "it is not a regular file of this daemon's uid {} (uid {})",
                    our_uid(),
                    meta.uid()
                ),
                fix: format!("`rm {}`", shell_quote(&path)),
            }));
        }
        let mut locked = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(locked) => locked,
            Err((mut file, nix::errno::Errno::EWOULDBLOCK)) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(LockError::Held {
                    dir: data_dir.to_owned(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err((_, errno)) => return Err(io_error(io::Error::from(errno))),
        };
        locked.set_len(0).map_err(io_error)?;
        writeln!(locked, "{}", std::process::id()).map_err(io_error)?;
        Ok(DaemonLock {
            _file: locked,
            _name: name,
        })
    }

    /// Its two holds, the locked file and the bound lock name, to keep
    /// across an upgrade's exec (the flock belongs to the open file, the
    /// name to the socket: both go on while a descriptor of each is open).
    pub fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        use std::os::fd::AsFd;
        [self._file.as_fd(), self._name.socket.as_fd()]
    }

    /// The lock of `data_dir` as the old daemon of an upgrade held it,
    /// from the two descriptors of [`DaemonLock::fds`] it kept across the
    /// exec: nothing is acquired anew, so no other daemon can slip in.
    pub fn from_fds(
        data_dir: &Path,
        file: std::os::fd::OwnedFd,
        name: std::os::fd::OwnedFd,
    ) -> Result<DaemonLock, LockError> {
        let path = data_dir.join("lock");
        // Locking again through the same open file is a no-op that cannot
        // block; it fails only if this is not that file.
        let locked = Flock::lock(File::from(file), FlockArg::LockExclusiveNonblock).map_err(
            |(_, errno)| LockError::Io {
                path: path.clone(),
                source: io::Error::from(errno),
            },
        )?;
        let canonical = std::fs::canonicalize(data_dir).map_err(|source| LockError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let listener = std::os::unix::net::UnixListener::from(name);
        // Blocking accepts, as the acceptor thread expects.
        listener
            .set_nonblocking(false)
            .map_err(|source| LockError::Io {
                path: path.clone(),
                source,
            })?;
        let name = AbstractLock::serve(abstract_name(&canonical), listener)?;
        Ok(DaemonLock {
            _file: locked,
            _name: name,
        })
    }
}

/// An abstract Unix socket bound (and listening, so a second daemon can ask
/// the kernel who holds it) for the daemon's life. A thread accepts and
/// drops connections so the backlog never fills.
#[derive(Debug)]
struct AbstractLock {
    name: String,
    /// A copy of the bound listener (the acceptor thread has the other), to
    /// hand the lock over across an upgrade's exec.
    socket: std::os::fd::OwnedFd,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

/// Longest abstract socket name (sun_path less its leading NUL).
const ABSTRACT_NAME_MAX: usize = 107;

/// `orchestrator-lock:` and the canonical data_dir path; a long path is
/// shortened to a hash of it and its tail (still shown in messages).
fn abstract_name(canonical: &Path) -> String {
    abstract_name_for("orchestrator-lock", canonical)
}

/// `PREFIX:` and a path, shortened as [`abstract_name`] describes: the name
/// of an abstract Unix socket that stands for a lock on that path.
pub(crate) fn abstract_name_for(prefix: &str, canonical: &Path) -> String {
    let path = canonical.display().to_string();
    let full = format!("{prefix}:{path}");
    if full.len() <= ABSTRACT_NAME_MAX {
        return full;
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in path.bytes() {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let head = format!("{prefix}:{hash:016x}:");
    let mut tail_start = path.len() - (ABSTRACT_NAME_MAX - head.len());
    while !path.is_char_boundary(tail_start) {
        tail_start += 1;
    }
    format!("{head}{}", &path[tail_start..])
}

impl AbstractLock {
    fn acquire(data_dir: &Path) -> Result<AbstractLock, LockError> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
        let canonical = std::fs::canonicalize(data_dir).map_err(|source| LockError::Io {
            path: data_dir.to_owned(),
            source,
        })?;
        let name = abstract_name(&canonical);
        let io_error = |source| LockError::Io {
            path: PathBuf::from(format!("@{name}")),
            source,
        };
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(io_error)?;
        let listener = match UnixListener::bind_addr(&addr) {
            Ok(listener) => listener,
            Err(error) if error.kind() == io::ErrorKind::AddrInUse => {
                // Held: ask the kernel who holds it (the listener's
                // credentials, given at connect even before an accept).
                let holder = UnixStream::connect_addr(&addr)
                    .and_then(|stream| Ok(rustix::net::sockopt::socket_peercred(&stream)?));
                return Err(match holder {
                    Ok(cred) if cred.uid.as_raw() != our_uid() => LockError::Squatted {
                        dir: data_dir.to_owned(),
                        name,
                        pid: cred.pid.as_raw_nonzero().get().unsigned_abs(),
                        uid: cred.uid.as_raw(),
                    },
                    Ok(cred) => LockError::Held {
                        dir: data_dir.to_owned(),
                        pid: Some(cred.pid.as_raw_nonzero().get().unsigned_abs()),
                    },
                    Err(_) => LockError::Held {
                        dir: data_dir.to_owned(),
                        pid: None,
                    },
                });
            }
            Err(error) => return Err(io_error(error)),
        };
        AbstractLock::serve(name, listener)
    }

    /// Accepts and drops connections on the bound lock `listener` from a
    /// thread of its own, for as long as the lock is held.
    fn serve(
        name: String,
        listener: std::os::unix::net::UnixListener,
    ) -> Result<AbstractLock, LockError> {
        let io_error = |source| LockError::Io {
            path: PathBuf::from(format!("@{name}")),
            source,
        };
        let socket = std::os::fd::OwnedFd::from(listener.try_clone().map_err(io_error)?);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let acceptor = std::thread::Builder::new()
            .name("lock-acceptor".into())
            .spawn(move || {
                for connection in listener.incoming() {
                    if stopping.load(Ordering::Acquire) {
                        return;
                    }
                    // EMFILE leaves the connection queued, so accept would
                    // fail again at once: back off instead of spinning.
                    if connection.is_err() {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            })
            .map_err(io_error)?;
        Ok(AbstractLock {
            name,
            socket,
            stop,
            acceptor: Some(acceptor),
        })
    }
}

impl Drop for AbstractLock {
    /// Unbinds the name before returning, so the same process can lock again
    /// (tests; a daemon simply exits).
    fn drop(&mut self) {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixStream};
        self.stop.store(true, Ordering::Release);
        let woken = SocketAddr::from_abstract_name(self.name.as_bytes())
            .and_then(|addr| UnixStream::connect_addr(&addr));
        if let (Ok(_), Some(acceptor)) = (woken, self.acceptor.take()) {
            let _ = acceptor.join();
        }
    }
}

// ---- /proc ----

/// The parts of /proc/PID/stat that identify a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub state: char,
    pub ppid: u32,
    pub pgid: u32,
    pub sid: u32,
    /// Clock ticks after boot (field 22): with the pid, a process's identity.
    pub start_time: u64,
    /// CPU time in user and kernel mode, in clock ticks (fields 14 and 15).
    pub cpu_ticks: u64,
    /// Resident pages (field 24).
    pub rss_pages: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = read_proc_line(Path::new(&format!("/proc/{pid}/stat"))).ok()?;
    parse_stat(pid, &text)
}

/// A short /proc file (a stat line, a descriptor's fdinfo), read into a
/// buffer on the stack: `fs::read_to_string` would first stat it for a size
/// that procfs does not give (a thousand services resume at once).
pub(crate) fn read_proc_line(path: &Path) -> io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut buffer = [0u8; 2048];
    let mut filled = 0;
    while filled < buffer.len() {
        match file.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(read) => filled += read,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    String::from_utf8(buffer[..filled].to_vec())
        .map_err(|error| io::Error::new(io::ErrorKind::InvalidData, error))
}

fn parse_stat(pid: u32, text: &str) -> Option<ProcStat> {
    // The command name (field 2) may hold spaces and parentheses: skip to
    // the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        pgid: fields.get(2)?.parse().ok()?,
        sid: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
        cpu_ticks: fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?,
        rss_pages: fields.get(21)?.parse().ok()?,
    })
}

/// Every process of the host, as /proc lists them now.
pub fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids: Vec<u32> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .collect();
    // Nearly all of a scan is the kernel making each stat line (and, the
    // first time, each process's /proc entry): with thousands of processes
    // a thread per core divides the wait of a `status` that needs a scan.
    let threads = scan_threads().min(pids.len() / PIDS_PER_SCAN_THREAD);
    proc_stats(&pids, threads)
}

/// [`proc_stat`] of each of `pids`, on `threads` threads (this one among
/// them).
fn proc_stats(pids: &[u32], threads: usize) -> Vec<ProcStat> {
    let read =
        |pids: &[u32]| -> Vec<ProcStat> { pids.iter().copied().filter_map(proc_stat).collect() };
    if threads <= 1 || pids.len() < 2 {
        return read(pids);
    }
    let part = pids.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let others: Vec<_> = pids
            .chunks(part)
            .skip(1)
            .map(|others| {
                std::thread::Builder::new()
                    .name("proc-scan".into())
                    .stack_size(SCAN_THREAD_STACK_BYTES)
                    .spawn_scoped(scope, move || read(others))
                    .map_err(|_| others)
            })
            .collect();
        let mut all = read(&pids[..part]);
        for other in others {
            match other {
                Ok(thread) => all.extend(thread.join().unwrap_or_default()),
                // No thread to be had: this one reads that part too.
                Err(pids) => all.extend(read(pids)),
            }
        }
        all
    })
}

/// Below this many processes per thread a second thread costs more than it
/// saves (a scan of 500 takes a few milliseconds).
const PIDS_PER_SCAN_THREAD: usize = 500;

/// A scan thread reads into a small stack buffer only.
const SCAN_THREAD_STACK_BYTES: usize = 64 * 1024;

/// The cores this process may run on, read once (it reads cgroup files).
fn scan_threads() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from))
}

// ---- the record ----

/// One running service process, as recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub pid: u32,
    pub pgid: u32,
    pub sid: u32,
    pub start_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersistedState {
    pub daemon_pid: u32,
    /// /proc/sys/kernel/random/boot_id when written: pids and start times
    /// mean nothing across a reboot, so a record from another boot names
    /// no process of ours.
    #[serde(default)]
    pub boot_id: String,
    pub services: BTreeMap<String, ProcessRecord>,
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is corrupt ({reason}); ignoring it: processes it named, if any, are not cleaned up", path.display())]
    Corrupt { path: PathBuf, reason: String },
    /// Not a regular file of our uid: whoever planted it must not choose
    /// what the daemon signals.
    #[error("ignoring {}: {reason}; the processes it names, if any, are not cleaned up", path.display())]
    Untrusted { path: PathBuf, reason: String },
}

// The file: two slots of equal size, written in place, preallocated, so
// that recording a spawn needs no new block (a full disk cannot make the
// record stale) and a crash in the middle of a write tears one slot only:
//
//   slot = MAGIC (8) | generation u64 LE | payload length u32 LE
//        | CRC-32 of the 12 bytes before it and the payload (u32 LE)
//        | payload: PersistedState as JSON | zeros up to the slot size
//
// The file is two slots long; the reader takes the valid slot with the
// highest generation. Generation g goes to slot g % 2.
const MAGIC: &[u8; 8] = b"ORCHST2\n";
const HEADER: usize = 24;
/// Generous for one record: a 64-byte name and four numbers in JSON.
const RECORD_BYTES: usize = 192;
/// The default of `state_max_bytes`: a larger file is not read, so a huge
/// or sparse file cannot exhaust the daemon's memory.
pub const STATE_MAX_BYTES: u64 = crate::config::DEFAULT_STATE_MAX_BYTES;

/// The slot size that holds `services` records with room to spare.
fn slot_size_for(services: usize) -> usize {
    let needed = HEADER + 256 + services.max(16) * RECORD_BYTES;
    needed.next_multiple_of(4096)
}

fn crc32(parts: &[&[u8]]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for part in parts {
        for &byte in *part {
            crc = TABLE[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    !crc
}

/// One slot's bytes (header and payload; the rest of the slot is left as is).
fn encode_slot(generation: u64, payload: &[u8]) -> Vec<u8> {
    let mut slot = Vec::with_capacity(HEADER + payload.len());
    slot.extend_from_slice(MAGIC);
    slot.extend_from_slice(&generation.to_le_bytes());
    // A slot is far below 4 GiB (STATE_MAX_BYTES).
    slot.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = crc32(&[&slot[8..20], payload]);
    slot.extend_from_slice(&crc.to_le_bytes());
    slot.extend_from_slice(payload);
    slot
}

/// (generation, payload) of a valid slot.
fn decode_slot(slot: &[u8]) -> Option<(u64, &[u8])> {
    if slot.len() < HEADER || &slot[..8] != MAGIC {
        return None;
    }
    let generation = u64::from_le_bytes(slot[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(slot[16..20].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(slot[20..24].try_into().ok()?);
    let payload = slot.get(HEADER..HEADER.checked_add(len)?)?;
    (crc32(&[&slot[8..20], payload]) == crc).then_some((generation, payload))
}

/// The newest valid record of a two-slot file.
fn decode_file(bytes: &[u8]) -> Result<(u64, PersistedState), String> {
    if !bytes.len().is_multiple_of(2) || bytes.len() < 2 * HEADER {
        return Err(format!("{} bytes is not two slots", bytes.len()));
    }
    let (first, second) = bytes.split_at(bytes.len() / 2);
    let newest = [decode_slot(first), decode_slot(second)]
        .into_iter()
        .flatten()
        .max_by_key(|(generation, _)| *generation)
        .ok_or_else(|| "no slot has a valid checksum".to_owned())?;
    serde_json::from_slice(newest.1)
        .map(|state| (newest.0, state))
        .map_err(|error| error.to_string())
}

/// The records of the processes an upgrade handed over, as (service, pid),
/// for [`StateStore::start_with`]. The record at `path` is this very
/// process's (an exec keeps the pid), written before the switch: a process
/// it names with the same pid is taken from it without reading /proc again;
/// any other (the record was stale) is looked up in /proc, as a `started`
/// event is.
pub fn handed_over_records(
    path: &Path,
    handed_over: &[(String, u32)],
) -> BTreeMap<String, ProcessRecord> {
    let on_disk = read_state(path)
        .ok()
        .flatten()
        .filter(|state| state.daemon_pid == std::process::id() && state.boot_id == boot_id())
        .map(|state| state.services)
        .unwrap_or_default();
    handed_over
        .iter()
        .filter_map(|(name, pid)| {
            let record = match on_disk.get(name) {
                Some(record) if record.pid == *pid => *record,
                _ => {
                    let stat = proc_stat(*pid)?;
                    ProcessRecord {
                        pid: *pid,
                        pgid: stat.pgid,
                        sid: stat.sid,
                        start_time: stat.start_time,
                    }
                }
            };
            Some((name.clone(), record))
        })
        .collect()
}

/// What a previous daemon recorded; `None` when there is no record. Reads
/// this format and, once, for an upgrade, the JSON file of earlier versions.
pub fn read_state(path: &Path) -> Result<Option<PersistedState>, StateError> {
    read_state_at_most(path, STATE_MAX_BYTES)
}

/// [`read_state`] of a file of at most `max_bytes` (`state_max_bytes`).
pub fn read_state_at_most(
    path: &Path,
    max_bytes: u64,
) -> Result<Option<PersistedState>, StateError> {
    let read_error = |source| StateError::Read {
        path: path.to_owned(),
        source,
    };
    let corrupt = |reason: String| StateError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let (file, len) = match open_trusted(path) {
        Ok(Some(opened)) => opened,
        Ok(None) => return Ok(None),
        Err(OpenError::Untrusted(reason)) => {
            return Err(StateError::Untrusted {
                path: path.to_owned(),
                reason,
            });
        }
        Err(OpenError::Io(source)) => return Err(read_error(source)),
    };
    if len > max_bytes {
        return Err(corrupt(format!(
            "{len} bytes, more than state_max_bytes ({max_bytes})"
        )));
    }
    let mut bytes = Vec::new();
    file.take(max_bytes)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if is_slot_file(&bytes) {
        return decode_file(&bytes)
            .map(|(_, state)| Some(state))
            .map_err(corrupt);
    }
    // The previous version's format: one JSON document.
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|error| corrupt(error.to_string()))
}

/// Either slot starts with the magic: a tear of the first slot's head must
/// not make the whole file look like the old JSON format.
fn is_slot_file(bytes: &[u8]) -> bool {
    let (first, second) = bytes.split_at(bytes.len() / 2);
    first.starts_with(MAGIC) || (bytes.len().is_multiple_of(2) && second.starts_with(MAGIC))
}

/// The state file, open for writing in place.
struct SlotFile {
    file: File,
    slot_size: usize,
    generation: u64,
}

impl SlotFile {
    /// A fresh file at `path` with both slots reserved, holding `payload`
    /// as generation 1: temp file, preallocate, write, fsync, rename, so a
    /// crash leaves the old record or the new one. Creating it is the one
    /// moment that needs free space.
    fn create(path: &Path, services: usize, payload: &[u8]) -> io::Result<SlotFile> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        if let Some(dir) = path.parent() {
            // data_dir deleted under us: make it again, private.
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let slot_size =
            slot_size_for(services).max((HEADER + payload.len()).next_multiple_of(4096) * 2);
        let temp = path.with_extension("tmp");
        match std::fs::remove_file(&temp) {
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            _ => {}
        }
        // O_EXCL and O_NOFOLLOW: never through something planted there.
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&temp)?;
        let length = i64::try_from(2 * slot_size).map_err(io::Error::other)?;
        nix::fcntl::posix_fallocate(&file, 0, length).map_err(io::Error::from)?;
        // Generation 0 in slot 0, where `write` puts even generations: the
        // next write (1) lands in the other slot, so a tear there falls
        // back to this record instead of leaving none.
        file.write_all(&encode_slot(0, payload))?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Some(dir) = path.parent() {
            // The rename itself is durable only once the directory is synced.
            File::open(dir)?.sync_all()?;
        }
        Ok(SlotFile {
            file,
            slot_size,
            generation: 0,
        })
    }

    /// The file a previous daemon reserved, taken over in place: a daemon
    /// restarted on a full disk keeps its record without a new block. Only
    /// a regular file of our uid in this format, its blocks allocated.
    fn reuse(path: &Path) -> Option<SlotFile> {
        use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()?;
        let meta = file.metadata().ok()?;
        let len = meta.len();
        if !meta.is_file()
            || meta.uid() != our_uid()
            || len > STATE_MAX_BYTES
            || len < 2 * HEADER as u64
            || !len.is_multiple_of(2)
            // Sparse: writing would need blocks after all.
            || meta.blocks() * 512 < len
        {
            return None;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).ok()?;
        if !is_slot_file(&bytes) {
            return None;
        }
        let (first, second) = bytes.split_at(bytes.len() / 2);
        let generation = [decode_slot(first), decode_slot(second)]
            .into_iter()
            .flatten()
            .map(|(generation, _)| generation)
            .max()
            .unwrap_or(0);
        Some(SlotFile {
            file,
            slot_size: bytes.len() / 2,
            generation,
        })
    }

    /// Overwrite the older slot: the blocks are reserved, so this needs no
    /// space. `Ok(false)` when the payload does not fit a slot.
    fn write(&mut self, payload: &[u8]) -> io::Result<bool> {
        use std::os::unix::fs::FileExt;
        if HEADER + payload.len() > self.slot_size {
            return Ok(false);
        }
        let generation = self.generation + 1;
        let offset = (generation % 2) * self.slot_size as u64;
        self.file
            .write_all_at(&encode_slot(generation, payload), offset)?;
        self.file.sync_data()?;
        self.generation = generation;
        Ok(true)
    }

    /// The file was unlinked (data_dir removed): writes would go nowhere.
    fn is_deleted(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().is_ok_and(|meta| meta.nlink() == 0)
    }
}

/// Keeps `data_dir/state` in step with the running processes. It learns of
/// them from the events (`started`, `exited`), synchronously, and one writer
/// task owns the file: bursts of changes (1000 services starting) become a
/// few writes, an idle daemon writes nothing, and a flush is a request to
/// that writer, never a second writer racing it.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<StoreInner>,
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

struct StoreInner {
    path: PathBuf,
    /// Records to reserve room for at first.
    capacity: usize,
    services: Mutex<BTreeMap<String, ProcessRecord>>,
    dirty: Notify,
    /// Writes that failed since the start (disk full, data_dir removed...).
    failed_writes: AtomicU64,
    /// The last write failed: the record on disk is stale.
    failing: AtomicBool,
    /// Where failures and recoveries are announced.
    events: Option<crate::events::EventBus>,
}

/// How long after a failed write the writer tries again by itself.
const RETRY_AFTER: Duration = Duration::from_secs(1);

impl StateStore {
    /// Start the writer, which records the current (empty) set at once;
    /// needs a tokio runtime. `capacity`: how many services to reserve room
    /// for (past it the file is made anew, which needs free space).
    pub fn start(
        path: PathBuf,
        capacity: usize,
        events: Option<crate::events::EventBus>,
    ) -> StateStore {
        Self::start_with(path, capacity, events, BTreeMap::new())
    }

    /// [`Self::start`] with processes running already (an upgrade's, see
    /// [`handed_over_records`]): its first write records them.
    pub fn start_with(
        path: PathBuf,
        capacity: usize,
        events: Option<crate::events::EventBus>,
        running: BTreeMap<String, ProcessRecord>,
    ) -> StateStore {
        let inner = Arc::new(StoreInner {
            path,
            capacity,
            services: Mutex::new(running),
            dirty: Notify::new(),
            failed_writes: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            events,
        });
        let (flushes, requests) = mpsc::unbounded_channel();
        tokio::spawn(writer(Arc::clone(&inner), requests));
        inner.dirty.notify_one();
        StateStore { inner, flushes }
    }

    /// Feed every event here (see `EventBus::set_observer`).
    pub fn observe(&self, event: &Event) {
        let Some(service) = &event.service else {
            return;
        };
        let changed = match event.kind {
            EventKind::Started { pid } => match proc_stat(pid) {
                Some(stat) => {
                    self.lock().insert(
                        service.clone(),
                        ProcessRecord {
                            pid,
                            pgid: stat.pgid,
                            sid: stat.sid,
                            start_time: stat.start_time,
                        },
                    );
                    true
                }
                // Gone already: its exit will follow.
                None => false,
            },
            EventKind::Exited { .. } => self.lock().remove(service).is_some(),
            _ => false,
        };
        if changed {
            self.inner.dirty.notify_one();
        }
    }

    /// Forget `service`'s process (stopped without an `exited` event).
    pub fn forget(&self, service: &str) {
        if self.lock().remove(service).is_some() {
            self.inner.dirty.notify_one();
        }
    }

    pub fn records(&self) -> BTreeMap<String, ProcessRecord> {
        self.lock().clone()
    }

    /// How many writes of the record failed so far.
    pub fn failed_writes(&self) -> u64 {
        self.inner.failed_writes.load(Ordering::Relaxed)
    }

    /// The last write failed: the record on disk may name fewer processes
    /// than run (status and metrics say so).
    pub fn is_stale(&self) -> bool {
        self.inner.failing.load(Ordering::Relaxed)
    }

    /// Returns once a write covering every change observed before the call
    /// was attempted (or the writer is gone: the runtime is ending).
    pub async fn flush(&self) {
        let (done, written) = oneshot::channel();
        if self.flushes.send(done).is_ok() {
            let _ = written.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, ProcessRecord>> {
        self.inner
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The one writer of the state file. A flush request is answered after a
/// write that started after it arrived, so it covers every earlier change.
/// After a failure it tries again every [`RETRY_AFTER`] until a write works.
async fn writer(inner: Arc<StoreInner>, mut flushes: mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
    let mut waiting = Vec::new();
    let mut file: Option<SlotFile> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            () = inner.dirty.notified() => {}
            request = flushes.recv() => match request {
                Some(done) => waiting.push(done),
                None => return,
            },
            () = tokio::time::sleep(RETRY_AFTER), if failing => {}
        }
        // Take every flush queued meanwhile: one write answers them all.
        while let Ok(done) = flushes.try_recv() {
            waiting.push(done);
        }
        let writing = Arc::clone(&inner);
        let mut current = file.take();
        // fsync may take a while: not on a runtime worker.
        let outcome = tokio::task::spawn_blocking(move || {
            let result = writing.write(&mut current);
            (current, result)
        })
        .await;
        let result = match outcome {
            Ok((current, result)) => {
                file = current;
                result
            }
            Err(error) => Err(io::Error::other(error.to_string())),
        };
        match result {
            Ok(()) if failing => {
                failing = false;
                inner.failing.store(false, Ordering::Relaxed);
                let failed = inner.failed_writes.load(Ordering::Relaxed);
                info!(path = %inner.path.display(), failed_writes = failed, "the state record is written again");
                if let Some(events) = &inner.events {
                    events.emit(
                        None,
                        EventKind::StateWriteResumed {
                            failed_writes: failed,
                        },
                    );
                }
            }
            Ok(()) => {}
            Err(error) => {
                inner.failed_writes.fetch_add(1, Ordering::Relaxed);
                inner.failing.store(true, Ordering::Relaxed);
                if !failing {
                    failing = true;
                    tracing::error!(
                        "cannot write {}: {error}; until it works (retried every second), a daemon killed now would leave the services started since unknown to the next one, which could then run them twice",
                        inner.path.display()
                    );
                    if let Some(events) = &inner.events {
                        events.emit(
                            None,
                            EventKind::StateWriteFailed {
                                path: inner.path.display().to_string(),
                                error: error.to_string(),
                            },
                        );
                    }
                }
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

impl StoreInner {
    fn write(&self, file: &mut Option<SlotFile>) -> io::Result<()> {
        let state = PersistedState {
            daemon_pid: std::process::id(),
            boot_id: boot_id(),
            services: self
                .services
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        let payload = serde_json::to_vec(&state).map_err(io::Error::other)?;
        if file.is_none() {
            *file = SlotFile::reuse(&self.path);
        }
        if let Some(open) = file.as_mut() {
            if open.is_deleted() {
                warn!(
                    "{} was deleted (data_dir removed?): making it again",
                    self.path.display()
                );
            } else if open.write(&payload)? {
                return Ok(());
            }
        }
        // No reserved file yet, it is gone, or the record outgrew it: a new
        // file (the only write that needs free space).
        let services = self.capacity.max(state.services.len() * 2);
        *file = Some(SlotFile::create(&self.path, services, &payload)?);
        Ok(())
    }
}

// ---- recovery ----

/// A process a dead daemon left running, pinned by a pidfd.
pub struct Leftover {
    pub service: String,
    pub pid: u32,
    pidfd: AsyncFd<OwnedFd>,
}

/// The processes of `state` that still run and are certainly the ones it
/// recorded: the leader with the same start time, group and session, or, if the leader is
/// gone, members of its group and session started no earlier than it, as
/// long as no other process has taken the leader's pid (which would mean
/// the group id was recycled).
pub fn find_leftovers(state: &PersistedState) -> Vec<Leftover> {
    let mut leftovers = Vec::new();
    if state.boot_id != boot_id() {
        return leftovers;
    }
    let mut processes: Option<Vec<ProcStat>> = None;
    for (service, record) in &state.services {
        let mut pids = Vec::new();
        match proc_stat(record.pid) {
            // Dead already (a zombie nobody reaped yet, e.g. after a
            // guardian stopped it): nothing to stop, but its pid is taken,
            // so its group's other members are still ours to find.
            Some(stat) if stat.start_time == record.start_time && stat.state == 'Z' => {
                let all = processes.get_or_insert_with(all_processes);
                pids.extend(members(all, record, true));
            }
            Some(stat)
                if stat.start_time == record.start_time
                    && (stat.pgid, stat.sid) == (record.pgid, record.sid) =>
            {
                pids.push((record.pid, record.start_time));
                let all = processes.get_or_insert_with(all_processes);
                pids.extend(members(all, record, true));
            }
            // Same pid and start time but another group or session: not
            // proven ours (a record naming someone else's process, or a
            // service that left its group); said, not signalled.
            Some(stat) if stat.start_time == record.start_time => {
                warn!(
                    service = %service,
                    pid = record.pid,
                    "the state record names a process whose group or session is not the recorded one ({}/{} for {}/{}); not stopping it: if it is a service of the previous daemon, stop it by hand",
                    stat.pgid, stat.sid, record.pgid, record.sid
                );
            }
            // Another process has the pid: the group id may be recycled.
            Some(_) => {}
            None => {
                let all = processes.get_or_insert_with(all_processes);
                pids.extend(members(all, record, false));
            }
        }
        for (pid, start_time) in pids {
            if let Some(pidfd) = pin(pid, start_time) {
                leftovers.push(Leftover {
                    service: service.clone(),
                    pid,
                    pidfd,
                });
            }
        }
    }
    leftovers
}

fn members(all: &[ProcStat], record: &ProcessRecord, leader_alive: bool) -> Vec<(u32, u64)> {
    if !leader_alive && record.pgid != record.pid {
        return Vec::new();
    }
    let group: Vec<&ProcStat> = all
        .iter()
        .filter(|p| {
            p.pgid == record.pgid
                && p.sid == record.sid
                && p.start_time >= record.start_time
                && p.pid != record.pid
                && p.state != 'Z'
        })
        .collect();
    if leader_alive {
        return group.iter().map(|p| (p.pid, p.start_time)).collect();
    }
    // Without the leader, its pid may have been reused (after the whole
    // old group died) by a process of the same terminal session that
    // became a group leader and exited, leaving its job's members with the
    // same ids. What a dead daemon left is orphaned: reparented to init,
    // or children of such orphans. A job's members have a live parent of
    // their own (the shell), so they are left alone.
    let mut kept: std::collections::BTreeSet<u32> = std::collections::BTreeSet::new();
    loop {
        let before = kept.len();
        for p in &group {
            if p.ppid == 1 || kept.contains(&p.ppid) {
                kept.insert(p.pid);
            }
        }
        if kept.len() == before {
            break;
        }
    }
    group
        .iter()
        .filter(|p| kept.contains(&p.pid))
        .map(|p| (p.pid, p.start_time))
        .collect()
}

/// A pidfd for `pid` if it is still the process that started at
/// `start_time`: checked after opening, so the pidfd names that process.
fn pin(pid: u32, start_time: u64) -> Option<AsyncFd<OwnedFd>> {
    let raw = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
    let fd = rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()).ok()?;
    if proc_stat(pid)?.start_time != start_time {
        return None;
    }
    watch(fd)
}

/// See `process::unix::watch_pidfd`: sound for an `OwnedFd`.
#[allow(deprecated)]
fn watch(fd: OwnedFd) -> Option<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, Interest::READABLE).ok()
}

fn send(leftover: &Leftover, signal: Signal) {
    let signal = rustix::process::Signal::from_named_raw(signal as i32);
    if let Some(signal) = signal {
        let _ = rustix::process::pidfd_send_signal(leftover.pidfd.get_ref(), signal);
    }
}

/// Stop what a dead daemon left, all in parallel: each process gets its
/// service's stop signal, then SIGKILL after its stop timeout. Returns
/// (processes stopped, of which needed SIGKILL).
pub async fn stop_leftovers(
    leftovers: Vec<Leftover>,
    policy: impl Fn(&str) -> (Signal, Duration),
) -> (usize, usize) {
    let total = leftovers.len();
    let mut stops = tokio::task::JoinSet::new();
    for leftover in leftovers {
        let (signal, timeout) = policy(&leftover.service);
        info!(service = %leftover.service, pid = leftover.pid, "stopping a process left by a daemon that died");
        stops.spawn(async move {
            send(&leftover, signal);
            // A stopped (SIGSTOP) process must run to act on the signal.
            send(&leftover, Signal::SIGCONT);
            if tokio::time::timeout(timeout, leftover.pidfd.readable())
                .await
                .is_ok()
            {
                return false;
            }
            send(&leftover, Signal::SIGKILL);
            if tokio::time::timeout(Duration::from_secs(5), leftover.pidfd.readable())
                .await
                .is_err()
            {
                warn!(
                    pid = leftover.pid,
                    "a leftover process survives SIGKILL (stuck in the kernel?)"
                );
            }
            true
        });
    }
    let mut killed = 0;
    while let Some(joined) = stops.join_next().await {
        if joined.unwrap_or(false) {
            killed += 1;
        }
    }
    (total, killed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_names() {
        let text =
            "1234 (a) b (c)) S 1 1234 1200 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 100";
        let stat = parse_stat(1234, text).unwrap();
        assert_eq!(
            (stat.state, stat.pgid, stat.sid, stat.start_time),
            ('S', 1234, 1200, 987654)
        );
        assert_eq!((stat.cpu_ticks, stat.rss_pages), (1 + 2, 100));
    }

    #[test]
    fn a_scan_split_over_threads_reads_every_pid_once() {
        let me = std::process::id();
        // A pid that cannot exist (above pid_max's ceiling) is skipped.
        let mut pids = vec![me; 10];
        pids.push(u32::MAX);
        for threads in [1, 3, 11, 40] {
            let stats = proc_stats(&pids, threads);
            assert_eq!(stats.len(), 10, "{threads} threads");
            assert!(stats.iter().all(|stat| stat.pid == me));
        }
        assert!(all_processes().iter().any(|stat| stat.pid == me));
    }

    #[test]
    fn reads_our_own_stat() {
        let me = proc_stat(std::process::id()).unwrap();
        assert!(me.start_time > 0);
    }

    fn temp_dir(label: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("orchestrator-state-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_second_lock_on_the_same_data_dir_is_refused_with_the_pid() {
        let dir = temp_dir("lock");
        let first = DaemonLock::acquire(&dir).unwrap();
        match DaemonLock::acquire(&dir) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        DaemonLock::acquire(&dir).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn sample(pid: u32) -> PersistedState {
        PersistedState {
            daemon_pid: 7,
            boot_id: boot_id(),
            services: BTreeMap::from([(
                "api".to_owned(),
                ProcessRecord {
                    pid,
                    pgid: pid,
                    sid: 1,
                    start_time: 99,
                },
            )]),
        }
    }

    /// A two-slot file as the store writes it, generations `1..=last`.
    fn write_slots(path: &Path, states: &[PersistedState]) {
        let payload = serde_json::to_vec(&states[0]).unwrap();
        let mut file = SlotFile::create(path, 4, &payload).unwrap();
        for state in &states[1..] {
            assert!(file.write(&serde_json::to_vec(state).unwrap()).unwrap());
        }
    }

    #[test]
    fn state_round_trips_and_garbage_is_reported() {
        let dir = temp_dir("rw");
        let path = dir.join("state");
        assert!(read_state(&path).unwrap().is_none());
        write_slots(&path, &[sample(10), sample(11), sample(12)]);
        assert_eq!(read_state(&path).unwrap(), Some(sample(12)));
        std::fs::write(&path, b"{\"daemon_pid\": 7, \"serv").unwrap();
        assert!(matches!(read_state(&path), Err(StateError::Corrupt { .. })));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(read_state(&path), Err(StateError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The previous version wrote one JSON document: read once, at the
    /// upgrade, and replaced by the store's first write.
    #[tokio::test]
    async fn an_old_json_record_is_read_and_then_replaced() {
        let dir = temp_dir("upgrade");
        let path = dir.join("state");
        std::fs::write(&path, serde_json::to_vec_pretty(&sample(10)).unwrap()).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(sample(10)));
        let store = StateStore::start(path.clone(), 4, None);
        store.flush().await;
        assert!(std::fs::read(&path).unwrap().starts_with(MAGIC));
        assert!(read_state(&path).unwrap().unwrap().services.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A crash in the middle of a write tears one slot: the other still
    /// holds the generation before.
    #[test]
    fn a_torn_slot_leaves_the_previous_record() {
        use std::os::unix::fs::FileExt;
        let dir = temp_dir("torn");
        let path = dir.join("state");
        write_slots(&path, &[sample(10), sample(11), sample(12)]);
        let len = std::fs::metadata(&path).unwrap().len();
        let bytes = std::fs::read(&path).unwrap();
        let newest = |slot: &[u8]| decode_slot(slot).map(|(generation, _)| generation);
        let (first, second) = bytes.split_at(len as usize / 2);
        // Tear the payload of the slot holding the newest record (12).
        let (newest_at, other_at) = if newest(first) > newest(second) {
            (0, len / 2)
        } else {
            (len / 2, 0)
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"XXXX", newest_at + HEADER as u64 + 5)
            .unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(sample(11)));
        // Both torn: corrupt, not a guess.
        file.write_all_at(b"XXXX", other_at + HEADER as u64 + 5)
            .unwrap();
        assert!(matches!(read_state(&path), Err(StateError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Recording a spawn rewrites reserved blocks in place: the file keeps
    /// its inode and its allocation, so a full disk cannot refuse it.
    #[tokio::test]
    async fn records_are_written_in_place_in_reserved_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = temp_dir("inplace");
        let path = dir.join("state");
        let store = StateStore::start(path.clone(), 50, None);
        store.flush().await;
        let before = std::fs::metadata(&path).unwrap();
        assert!(before.blocks() * 512 >= before.len(), "preallocated");
        let me = proc_stat(std::process::id()).unwrap();
        for i in 0..50u64 {
            store.observe(&Event {
                seq: i,
                time: String::new(),
                service: Some(format!("service-with-a-rather-long-name-{i:030}")),
                kind: EventKind::Started { pid: me.pid },
            });
            store.flush().await;
        }
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (after.ino(), after.len(), after.blocks()),
            (before.ino(), before.len(), before.blocks())
        );
        assert_eq!(read_state(&path).unwrap().unwrap().services.len(), 50);
        assert_eq!(store.failed_writes(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A restarted daemon takes over the reserved file in place (on a full
    /// disk a new one could not be made), after the leftovers it named were
    /// dealt with.
    #[tokio::test]
    async fn a_new_store_reuses_the_reserved_file_in_place() {
        use std::os::unix::fs::MetadataExt;
        let dir = temp_dir("reuse");
        let path = dir.join("state");
        write_slots(&path, &[sample(10), sample(11), sample(12)]);
        let before = std::fs::metadata(&path).unwrap();
        let store = StateStore::start(path.clone(), 4, None);
        store.flush().await;
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!((after.ino(), after.len()), (before.ino(), before.len()));
        assert!(read_state(&path).unwrap().unwrap().services.is_empty());
        // The old JSON format is never written in place.
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, serde_json::to_vec(&sample(10)).unwrap()).unwrap();
        let store = StateStore::start(path.clone(), 4, None);
        store.flush().await;
        assert!(std::fs::read(&path).unwrap().starts_with(MAGIC));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// data_dir removed under a running daemon: the next record makes it
    /// again instead of going to an unlinked file.
    #[tokio::test]
    async fn a_deleted_state_file_is_made_again() {
        let dir = temp_dir("deleted");
        let path = dir.join("data").join("state");
        let store = StateStore::start(path.clone(), 4, None);
        store.flush().await;
        std::fs::remove_dir_all(dir.join("data")).unwrap();
        store.observe(&Event {
            seq: 1,
            time: String::new(),
            service: Some("api".to_owned()),
            kind: EventKind::Started {
                pid: std::process::id(),
            },
        });
        store.flush().await;
        let state = read_state(&path).unwrap().expect("a record again");
        assert!(state.services.contains_key("api"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What a hostile local user could plant as `state`: never read.
    #[test]
    fn a_state_that_is_not_a_regular_file_of_ours_is_untrusted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("untrusted");
        let path = dir.join("state");
        let elsewhere = dir.join("elsewhere");
        std::fs::write(&elsewhere, serde_json::to_vec(&sample(10)).unwrap()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(matches!(
            read_state(&path),
            Err(StateError::Untrusted { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        // A FIFO: the read would wait forever for a writer.
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(matches!(
            read_state(&path),
            Err(StateError::Untrusted { .. })
        ));
        std::fs::remove_file(&path).unwrap();
        if our_uid() == 0 {
            std::fs::write(&path, serde_json::to_vec(&sample(10)).unwrap()).unwrap();
            std::os::unix::fs::chown(&path, Some(65534), None).unwrap();
            assert!(matches!(
                read_state(&path),
                Err(StateError::Untrusted { .. })
            ));
            std::fs::remove_file(&path).unwrap();
        }
        // Huge (sparse): refused by its size, not read into memory.
        let file = File::create(&path).unwrap();
        file.set_len(STATE_MAX_BYTES + 1).unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .unwrap();
        assert!(matches!(read_state(&path), Err(StateError::Corrupt { .. })));
        // state_max_bytes sets the bound.
        std::fs::remove_file(&path).unwrap();
        write_slots(&path, &[sample(10)]);
        assert!(read_state_at_most(&path, 1 << 20).unwrap().is_some());
        assert!(matches!(
            read_state_at_most(&path, 4096),
            Err(StateError::Corrupt { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `state.tmp` left by a crash, or planted as a symlink: replaced,
    /// never written through.
    #[test]
    fn a_planted_state_tmp_is_not_written_through() {
        let dir = temp_dir("tmplink");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = dir.join("state");
        std::os::unix::fs::symlink(&victim, dir.join("state.tmp")).unwrap();
        write_slots(&path, &[sample(10)]);
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(read_state(&path).unwrap(), Some(sample(10)));
        assert!(!dir.join("state.tmp").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_data_dir_others_can_write_is_refused_with_the_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("trust");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let error = check_data_dir(&dir).unwrap_err().to_string();
        assert!(
            error.contains(&format!("`chmod 700 {}`", dir.display())),
            "{error}"
        );
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o750)).unwrap();
        check_data_dir(&dir).unwrap();
        assert!(dir.join("logs").is_dir());
        std::fs::set_permissions(dir.join("logs"), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = check_data_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("logs"), "{error}");
        std::fs::remove_dir(dir.join("logs")).unwrap();
        std::os::unix::fs::symlink("/tmp", dir.join("logs")).unwrap();
        let error = check_data_dir(&dir).unwrap_err().to_string();
        assert!(error.contains("symbolic link"), "{error}");
        std::fs::remove_file(dir.join("logs")).unwrap();
        if our_uid() == 0 {
            let link = dir.with_extension("link");
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&dir, &link).unwrap();
            check_data_dir(&link).unwrap();
            std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
            let error = check_data_dir(&link).unwrap_err().to_string();
            assert!(
                error.contains("symbolic link owned by uid 65534"),
                "{error}"
            );
            std::fs::remove_file(&link).unwrap();
            std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
            let error = check_data_dir(&dir).unwrap_err().to_string();
            assert!(
                error.contains(&format!("`chown 0 {}", dir.display())),
                "{error}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A `lock` symlink planted to a file of ours would have had that file
    /// truncated and overwritten with our pid.
    #[test]
    fn a_lock_symlink_is_refused_and_its_target_untouched() {
        let dir = temp_dir("locklink");
        let victim = dir.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        std::os::unix::fs::symlink(&victim, data.join("lock")).unwrap();
        let error = DaemonLock::acquire(&data).unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Deleting data_dir removes the lock file, not the daemon's hold.
    #[test]
    fn the_lock_outlives_the_deletion_of_data_dir() {
        let dir = temp_dir("lockdel");
        let data = dir.join("data");
        std::fs::create_dir(&data).unwrap();
        let first = DaemonLock::acquire(&data).unwrap();
        std::fs::remove_dir_all(&data).unwrap();
        std::fs::create_dir(&data).unwrap();
        match DaemonLock::acquire(&data) {
            Err(LockError::Held { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        DaemonLock::acquire(&data).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn long_data_dir_paths_make_bounded_distinct_names() {
        let long = |tail: &str| PathBuf::from(format!("/{}/{tail}", "x".repeat(200)));
        let (a, b) = (abstract_name(&long("a")), abstract_name(&long("b")));
        assert!(a.len() <= ABSTRACT_NAME_MAX && b.len() <= ABSTRACT_NAME_MAX);
        assert_ne!(a, b);
        assert_eq!(
            abstract_name(Path::new("/var/lib/orch")),
            "orchestrator-lock:/var/lib/orch"
        );
    }

    /// Pid and start time match, but not the group and session: not proven
    /// to be the recorded process, so not signalled.
    #[test]
    fn a_leader_in_another_group_or_session_is_not_a_leftover() {
        let me = proc_stat(std::process::id()).unwrap();
        let state = PersistedState {
            daemon_pid: 1,
            boot_id: boot_id(),
            services: BTreeMap::from([(
                "api".to_owned(),
                ProcessRecord {
                    pid: me.pid,
                    pgid: me.pgid + 1,
                    sid: me.sid + 1,
                    start_time: me.start_time,
                },
            )]),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        assert!(find_leftovers(&state).is_empty());
    }

    #[test]
    fn a_recycled_pid_is_not_a_leftover() {
        // Our own pid, with a start time that is not ours: a stranger now
        // holds the pid the record names.
        let me = proc_stat(std::process::id()).unwrap();
        let state = PersistedState {
            daemon_pid: 1,
            boot_id: boot_id(),
            services: BTreeMap::from([(
                "api".to_owned(),
                ProcessRecord {
                    pid: me.pid,
                    pgid: me.pgid,
                    sid: me.sid,
                    start_time: me.start_time + 1,
                },
            )]),
        };
        assert!(find_leftovers(&state).is_empty());
    }

    #[test]
    fn a_record_from_another_boot_names_nothing() {
        // Ourselves, exactly: a leftover in this boot, nothing in another.
        let me = proc_stat(std::process::id()).unwrap();
        let record = ProcessRecord {
            pid: me.pid,
            pgid: me.pgid,
            sid: me.sid,
            start_time: me.start_time,
        };
        let mut state = PersistedState {
            daemon_pid: 1,
            boot_id: boot_id(),
            services: BTreeMap::from([("me".to_owned(), record)]),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        assert!(!find_leftovers(&state).is_empty());
        state.boot_id = "another-boot".to_owned();
        assert!(find_leftovers(&state).is_empty());
    }

    /// One writer owns the file: flushes and background writes never race
    /// for `state.tmp` (a race made clean shutdowns warn "cannot write
    /// state: No such file or directory" and could leave an older record).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flushes_and_background_writes_never_race() {
        let dir = std::env::temp_dir().join(format!("orchestrator-state-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state");
        let store = StateStore::start(path.clone(), 7, None);
        let me = std::process::id();
        for round in 0..300u64 {
            let kind = if round % 2 == 0 {
                EventKind::Started { pid: me }
            } else {
                EventKind::Exited {
                    reason: "exited with code 0".to_owned(),
                    exit_code: 0,
                    expected: true,
                }
            };
            store.observe(&Event {
                seq: round,
                time: String::new(),
                service: Some(format!("s{}", round % 7)),
                kind,
            });
            if round % 3 == 0 {
                store.flush().await;
                let on_disk = read_state(&path).unwrap().expect("a record");
                assert_eq!(on_disk.services, store.records(), "round {round}");
            }
        }
        store.flush().await;
        assert_eq!(store.failed_writes(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The first in-place write after the file is made must not go over
    /// the only valid record (a tear there would leave none).
    #[test]
    fn a_torn_second_generation_falls_back_to_the_first() {
        use std::os::unix::fs::FileExt;
        let dir = temp_dir("torn2");
        let path = dir.join("state");
        write_slots(&path, &[sample(10), sample(11)]);
        let len = std::fs::metadata(&path).unwrap().len();
        let bytes = std::fs::read(&path).unwrap();
        let (first, _) = bytes.split_at(len as usize / 2);
        let second_generation_slot = if decode_slot(first).is_some_and(|s| s.0 == 2) {
            0
        } else {
            len / 2
        };
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(b"XXXX", second_generation_slot + HEADER as u64 + 5)
            .unwrap();
        assert_eq!(read_state(&path).ok().flatten(), Some(sample(10)));
    }

    /// Without its leader, a recorded group may be a reused id: only
    /// orphans (parent init) and their descendants count as leftovers, not
    /// a shell job that took the id in the same session.
    #[test]
    fn without_the_leader_only_orphans_count() {
        let record = ProcessRecord {
            pid: 100,
            pgid: 100,
            sid: 50,
            start_time: 10,
        };
        let process = |pid, ppid, start_time| ProcStat {
            pid,
            state: 'S',
            ppid,
            pgid: 100,
            sid: 50,
            start_time,
            cpu_ticks: 0,
            rss_pages: 0,
        };
        let all = [
            process(200, 1, 20),   // the service's worker, orphaned
            process(201, 200, 21), // its child
            process(300, 77, 30),  // a shell job's first member (parent: the shell)
            process(301, 300, 31), // and its child
        ];
        let pids = |leader_alive| -> Vec<u32> {
            members(&all, &record, leader_alive)
                .into_iter()
                .map(|(pid, _)| pid)
                .collect()
        };
        assert_eq!(pids(false), [200, 201]);
        assert_eq!(
            pids(true),
            [200, 201, 300, 301],
            "a live leader proves the group"
        );
    }
}
