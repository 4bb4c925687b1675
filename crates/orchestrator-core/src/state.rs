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
use std::sync::atomic::{AtomicU64, Ordering};
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

// ---- the lock ----

/// Held for the daemon's whole life; the kernel releases it when the daemon
/// dies, however it dies.
#[derive(Debug)]
pub struct DaemonLock {
    _file: Flock<File>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another orchestrator{} is already running on data_dir {}: stop it first (`orchestrator shutdown`) or give this one another data_dir", pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), dir.display())]
    Held { dir: PathBuf, pid: Option<u32> },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DaemonLock {
    /// Take `data_dir/lock`, or say who holds it. Never blocks.
    pub fn acquire(data_dir: &Path) -> Result<DaemonLock, LockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let path = data_dir.join("lock");
        let io_error = |source| LockError::Io {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io_error)?;
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
        Ok(DaemonLock { _file: locked })
    }
}

// ---- /proc ----

/// The parts of /proc/PID/stat that identify a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: u32,
    pub state: char,
    pub pgid: u32,
    pub sid: u32,
    /// Clock ticks after boot (field 22): with the pid, a process's identity.
    pub start_time: u64,
}

pub fn proc_stat(pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(pid, &text)
}

fn parse_stat(pid: u32, text: &str) -> Option<ProcStat> {
    // The command name (field 2) may hold spaces and parentheses: skip to
    // the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        pid,
        state: fields.first()?.chars().next()?,
        pgid: fields.get(2)?.parse().ok()?,
        sid: fields.get(3)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

fn all_processes() -> Vec<ProcStat> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_stat)
        .collect()
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
    #[error("{} is corrupt ({source}); ignoring it: processes it named, if any, are not cleaned up", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// What a previous daemon recorded; `None` when there is no record.
pub fn read_state(path: &Path) -> Result<Option<PersistedState>, StateError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StateError::Corrupt {
                    path: path.to_owned(),
                    source,
                })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Temp file, fsync, rename: a crash leaves the old record or the new one,
/// never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temp, path)?;
    if let Some(dir) = path.parent() {
        // The rename itself is durable only once the directory is synced.
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Keeps `data_dir/state` in step with the running processes. It learns of
/// them from the events (`started`, `exited`), synchronously, and one writer
/// task owns the file: bursts of changes (1000 services starting) become a
/// few writes, an idle daemon writes nothing, and a flush is a request to
/// that writer, never a second writer racing it for `state.tmp`.
#[derive(Clone)]
pub struct StateStore {
    inner: Arc<StoreInner>,
    flushes: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

struct StoreInner {
    path: PathBuf,
    services: Mutex<BTreeMap<String, ProcessRecord>>,
    dirty: Notify,
    /// Writes that failed since the start (disk full, data_dir removed...).
    failed_writes: AtomicU64,
}

impl StateStore {
    /// Start the writer, which records the current (empty) set at once;
    /// needs a tokio runtime.
    pub fn start(path: PathBuf) -> StateStore {
        let inner = Arc::new(StoreInner {
            path,
            services: Mutex::new(BTreeMap::new()),
            dirty: Notify::new(),
            failed_writes: AtomicU64::new(0),
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

    pub fn records(&self) -> BTreeMap<String, ProcessRecord> {
        self.lock().clone()
    }

    /// How many writes of the record failed so far.
    pub fn failed_writes(&self) -> u64 {
        self.inner.failed_writes.load(Ordering::Relaxed)
    }

    /// Returns once the file holds every change observed before the call
    /// (or the writer is gone: the runtime is ending).
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
async fn writer(inner: Arc<StoreInner>, mut flushes: mpsc::UnboundedReceiver<oneshot::Sender<()>>) {
    let mut waiting = Vec::new();
    loop {
        tokio::select! {
            () = inner.dirty.notified() => {}
            request = flushes.recv() => match request {
                Some(done) => waiting.push(done),
                None => return,
            },
        }
        // Take every flush queued meanwhile: one write answers them all.
        while let Ok(done) = flushes.try_recv() {
            waiting.push(done);
        }
        let writing = Arc::clone(&inner);
        // fsync may take a while: not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || writing.write()).await;
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

impl StoreInner {
    fn write(&self) {
        let state = PersistedState {
            daemon_pid: std::process::id(),
            boot_id: boot_id(),
            services: self
                .services
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        };
        let bytes = serde_json::to_vec_pretty(&state).unwrap_or_default();
        if let Err(error) = write_atomically(&self.path, &bytes) {
            self.failed_writes.fetch_add(1, Ordering::Relaxed);
            warn!(
                "cannot write {}: {error}; a crash now would leave its services unknown to the next daemon",
                self.path.display()
            );
        }
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
/// recorded: the leader with the same start time, or, if the leader is
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
            Some(stat) if stat.start_time == record.start_time => {
                pids.push((record.pid, record.start_time));
                let all = processes.get_or_insert_with(all_processes);
                pids.extend(members(all, record, true));
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
    all.iter()
        .filter(|p| {
            p.pgid == record.pgid
                && p.sid == record.sid
                && p.start_time >= record.start_time
                && p.pid != record.pid
                && p.state != 'Z'
        })
        .filter(|_| leader_alive || record.pgid == record.pid)
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

    #[test]
    fn state_round_trips_and_garbage_is_reported() {
        let dir = temp_dir("rw");
        let path = dir.join("state");
        assert!(read_state(&path).unwrap().is_none());
        let state = PersistedState {
            daemon_pid: 7,
            boot_id: boot_id(),
            services: BTreeMap::from([(
                "api".to_owned(),
                ProcessRecord {
                    pid: 10,
                    pgid: 10,
                    sid: 1,
                    start_time: 99,
                },
            )]),
        };
        write_atomically(&path, &serde_json::to_vec(&state).unwrap()).unwrap();
        assert_eq!(read_state(&path).unwrap(), Some(state));
        std::fs::write(&path, b"{\"daemon_pid\": 7, \"serv").unwrap();
        assert!(matches!(read_state(&path), Err(StateError::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(&dir);
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
        let store = StateStore::start(path.clone());
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
}
