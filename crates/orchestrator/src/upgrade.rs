//! The in-place upgrade, the binary's side (docs/upgrade.md): the request
//! (`POST /v1/upgrade`, SIGUSR2) and its dry run, the hand-over of the
//! daemon's own descriptors (its locks, listeners and guardian) beside the
//! frozen services, and the exec of the new binary.

use std::ffi::{CString, OsString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use orchestrator_core::handover::{self, FrozenService, Handover};
use orchestrator_core::reload::{ReloadError, ReloadHandle};
use orchestrator_core::wire::UpgradeAccepted;
use tokio::sync::mpsc;

/// How long each step of the dry run (`--version`, `check`) may take.
pub const DRY_RUN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the answers in flight may take to finish once the API stopped
/// accepting; a connection still open then is cut by the exec.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The hidden flag of `run` that names the hand-over's memfd.
pub const HANDOVER_FLAG: &str = "--handover";

/// Held for reading by each pass of the daemon's orphan reaper, and for
/// writing by a dry run: the reaper takes every exited child that is not a
/// service's, and would take the dry run's own children (`--version`,
/// `check`) before tokio's wait for them, which then fails with ECHILD.
/// (Registering them as the services' leaders are would be finer; that
/// registry is the engine's.)
pub static REAPING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// The version this binary reports: its own, or
/// `ORCHESTRATOR_REPORTED_VERSION` when set (for tests only: it stands in
/// for a second build with another version, which the upgrade tests would
/// otherwise have to compile).
pub fn version() -> &'static str {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION.get_or_init(|| {
        std::env::var("ORCHESTRATOR_REPORTED_VERSION")
            .ok()
            .filter(|version| !version.trim().is_empty())
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned())
    })
}

/// The command line and binary this process was started with, recorded at
/// start: the exec repeats the arguments, and the binary's path names the
/// new file once it has been replaced on disk (which is the point).
pub struct Origin {
    pub args: Vec<OsString>,
    pub binary: PathBuf,
}

impl Origin {
    pub fn record() -> Origin {
        let binary = std::env::current_exe()
            .ok()
            // "/usr/bin/orchestrator (deleted)" once the file was replaced:
            // the path is what names the new one.
            .map(|path| {
                let text = path.as_os_str().as_bytes();
                match text.strip_suffix(b" (deleted)") {
                    Some(stem) => PathBuf::from(std::ffi::OsStr::from_bytes(stem)),
                    None => path,
                }
            })
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        Origin {
            args: std::env::args_os().collect(),
            binary,
        }
    }
}

/// An upgrade whose dry run passed: the daemon goes on with the switch.
#[derive(Debug)]
pub struct Go {
    pub binary: PathBuf,
    pub to: String,
}

/// Takes upgrade requests (API, SIGUSR2), one at a time, and tells the
/// daemon's main task to switch once the new binary passed its dry run.
#[derive(Clone)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

struct Inner {
    default_binary: PathBuf,
    config: Option<PathBuf>,
    go: mpsc::Sender<Go>,
    busy: AtomicBool,
    upgrades: u64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// The running daemon's reloader: asked, before anything else, whether
    /// the configuration holds edits not applied yet.
    reloader: Mutex<Option<ReloadHandle>>,
}

impl Upgrader {
    /// `upgrades`: how many this process went through before (from the
    /// hand-over it resumed from, 0 at a fresh start).
    pub fn new(
        default_binary: PathBuf,
        config: Option<PathBuf>,
        upgrades: u64,
    ) -> (Upgrader, mpsc::Receiver<Go>) {
        let (go, requests) = mpsc::channel(1);
        let upgrader = Upgrader {
            inner: Arc::new(Inner {
                default_binary,
                config,
                go,
                busy: AtomicBool::new(false),
                upgrades,
                failures: AtomicU64::new(0),
                last_error: Mutex::new(None),
                reloader: Mutex::new(None),
            }),
        };
        (upgrader, requests)
    }

    pub fn upgrades(&self) -> u64 {
        self.inner.upgrades
    }

    /// The reloader of the daemon's current run (see [`Upgrader::request`]);
    /// `None` once that run has ended (its supervisor and state store must
    /// not be kept alive through it).
    pub fn set_reloader(&self, reloader: Option<ReloadHandle>) {
        *self
            .inner
            .reloader
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reloader;
    }

    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> Option<String> {
        self.inner
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The new daemon reads the configuration file as it is and takes each
    /// running process for what the file now defines: an edit not applied
    /// yet (no reload since) would leave a service running its old
    /// definition under the new one's name, silently. Refused instead.
    async fn nothing_unapplied(&self) -> Result<(), String> {
        let reloader = self
            .inner
            .reloader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(reloader) = reloader else {
            return Ok(());
        };
        match reloader.unapplied().await {
            Ok(found) if found.is_empty() => Ok(()),
            Ok(found) => {
                let list: Vec<String> = found
                    .iter()
                    .map(|unapplied| format!("{} ({})", unapplied.service, unapplied.reason))
                    .collect();
                Err(format!(
                    "the configuration was edited and not applied: a reload would restart {}; the new daemon would take each old process for its new definition: run `orchestrator reload` first, then upgrade; nothing was changed",
                    list.join(", ")
                ))
            }
            Err(ReloadError::Invalid(errors)) => Err(format!(
                "the configuration file is invalid now: {}; fix it (the new daemon would read it) and upgrade again; nothing was changed",
                errors.join("; ")
            )),
            Err(ReloadError::ShuttingDown) => {
                Err("the daemon is shutting down: nothing was changed".to_owned())
            }
        }
    }

    /// Dry-runs the new binary (`binary`, else the one the daemon was
    /// started from) and, when it passes, asks the main task to switch.
    /// `Err`: why nothing changed.
    pub async fn request(&self, binary: Option<PathBuf>) -> Result<UpgradeAccepted, String> {
        let inner = &self.inner;
        let binary = binary.unwrap_or_else(|| inner.default_binary.clone());
        if !binary.is_absolute() {
            return Err(format!(
                "the new binary {} is not an absolute path: give the daemon an absolute one (the verb makes it so); nothing was changed",
                binary.display()
            ));
        }
        if inner.busy.swap(true, Ordering::AcqRel) {
            return Err(
                "an upgrade is under way already: wait for it to end (`orchestrator status` answers again once it has); nothing else was changed"
                    .to_owned(),
            );
        }
        if let Err(refused) = self.nothing_unapplied().await {
            inner.busy.store(false, Ordering::Release);
            tracing::warn!("upgrade refused: {refused}");
            return Err(refused);
        }
        let checked = {
            let _no_reaping = REAPING.write().await;
            handover::dry_run(&binary, inner.config.as_deref(), DRY_RUN_TIMEOUT).await
        };
        let to = match checked {
            Ok(to) => to,
            Err(refused) => {
                inner.busy.store(false, Ordering::Release);
                tracing::warn!("upgrade refused: {refused}");
                return Err(refused.to_string());
            }
        };
        let accepted = UpgradeAccepted {
            from: version().to_owned(),
            to: to.clone(),
            binary: binary.clone(),
            upgrades: self.upgrades(),
            upgrade_failures: self.failures(),
        };
        if inner.go.send(Go { binary, to }).await.is_err() {
            inner.busy.store(false, Ordering::Release);
            return Err("the daemon is shutting down: nothing was changed".to_owned());
        }
        Ok(accepted)
    }

    /// An accepted upgrade failed after its dry run: this binary goes on,
    /// and `GET /v1/daemon` says why.
    pub fn failed(&self, why: String) {
        tracing::error!("upgrade failed: {why}; this daemon goes on as before");
        *self
            .inner
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(why);
        self.inner.failures.fetch_add(1, Ordering::AcqRel);
        self.inner.busy.store(false, Ordering::Release);
    }
}

/// What the daemon owns besides its services, lent to the hand-over.
pub struct Own<'a> {
    pub lock: [BorrowedFd<'a>; 2],
    pub parent_lock: Option<BorrowedFd<'a>>,
    pub cgroup_parent: Option<PathBuf>,
    pub api_unix: BorrowedFd<'a>,
    pub api_tcp: Option<BorrowedFd<'a>>,
    pub guardian: Option<(BorrowedFd<'a>, u32)>,
}

/// Writes the hand-over, keeps exactly its descriptors across the exec and
/// execs `binary` with the original arguments and `--handover FD`. Returns
/// only if it could not: then every descriptor is close-on-exec again and
/// the caller still owns everything, services included, to go on with.
pub fn exec(
    binary: &Path,
    origin: &Origin,
    config: Option<PathBuf>,
    upgrades: u64,
    own: &Own<'_>,
    services: &[FrozenService],
    last_look: &dyn Fn() -> Option<String>,
) -> String {
    let mut document = Handover::new(version(), config);
    document.upgrades = upgrades + 1;
    document.original_nofile = orchestrator_core::process::original_nofile();
    document.cgroup_parent = own.cgroup_parent.clone();
    document.guardian_pid = own.guardian.map(|(_, pid)| pid);
    let mut kept: Vec<BorrowedFd<'_>> = Vec::new();
    let named = (|| {
        keep(&mut document, &mut kept, "daemon_lock", own.lock[0])?;
        keep(&mut document, &mut kept, "daemon_lock_name", own.lock[1])?;
        if let Some(fd) = own.parent_lock {
            keep(&mut document, &mut kept, "parent_lock", fd)?;
        }
        keep(&mut document, &mut kept, "api_unix", own.api_unix)?;
        if let Some(fd) = own.api_tcp {
            keep(&mut document, &mut kept, "api_tcp", fd)?;
        }
        if let Some((fd, _)) = own.guardian {
            keep(&mut document, &mut kept, "guardian", fd)?;
        }
        for service in services {
            document.add_service(service)?;
            kept.extend(service.fds());
        }
        Ok::<(), handover::HandoverError>(())
    })();
    if let Err(error) = named {
        return error.to_string();
    }
    let memfd: OwnedFd = match handover::write_memfd(&document) {
        Ok(fd) => fd,
        Err(error) => return error.to_string(),
    };
    if let Err(error) = handover::keep_across_exec(&kept) {
        set_cloexec(&kept);
        return format!(
            "cannot keep the daemon's descriptors across the exec: {error}; nothing was changed"
        );
    }
    let argv = match arguments(origin, memfd_number(&memfd)) {
        Ok(argv) => argv,
        Err(error) => {
            set_cloexec(&kept);
            return error;
        }
    };
    let Ok(program) = CString::new(binary.as_os_str().as_bytes()) else {
        set_cloexec(&kept);
        return format!("the binary path {} holds a NUL byte", binary.display());
    };
    // Something asked of the daemon while the document was written would
    // die with the exec: the caller resumes in place instead.
    if let Some(why) = last_look() {
        set_cloexec(&kept);
        return why;
    }
    tracing::info!(
        binary = %binary.display(),
        services = services.len(),
        "handing over to the new binary"
    );
    crate::console::flush();
    // exec resets handled signals to their default action, which for these
    // is to end the process: one arriving before the new daemon has its
    // handlers would kill it and leave the services to the guardian.
    // Blocked on this (the exec'ing) thread, they stay pending across the
    // exec, and the new daemon takes them once its handlers are in place.
    let mut previous = nix::sys::signal::SigSet::empty();
    let blocked = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&daemon_signals()),
        Some(&mut previous),
    );
    // Returns only on failure: on success this process runs the new binary.
    let Err(errno) = nix::unistd::execv(&program, &argv);
    if blocked.is_ok() {
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_SETMASK,
            Some(&previous),
            None,
        );
    }
    set_cloexec(&kept);
    drop(memfd);
    format!(
        "cannot exec the new binary {}: {errno}; the services were not touched and this daemon goes on",
        binary.display()
    )
}

/// `ORCHESTRATOR_TEST_SWITCH_PAUSE_MS` (for tests only): how long a switch
/// pauses once the services are frozen, before the exec, so that a test
/// can act in that window.
pub fn test_switch_pause() -> Option<Duration> {
    std::env::var("ORCHESTRATOR_TEST_SWITCH_PAUSE_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

/// The signals the daemon handles, each of which would end it while it has
/// no handler (in the window of an exec).
pub fn daemon_signals() -> nix::sys::signal::SigSet {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    for signal in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
        Signal::SIGUSR2,
    ] {
        set.add(signal);
    }
    set
}

/// Takes the signals an upgrade's exec left pending and blocked (see
/// `exec`): called once the daemon's handlers are installed. Harmless at a
/// cold start, where none is blocked.
pub fn unblock_daemon_signals() {
    if let Err(error) = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&daemon_signals()),
        None,
    ) {
        tracing::warn!("cannot unblock the daemon's signals after an upgrade: {error}");
    }
}

/// Names `fd` in the document and adds it to those kept across the exec.
fn keep<'a>(
    document: &mut Handover,
    kept: &mut Vec<BorrowedFd<'a>>,
    name: &str,
    fd: BorrowedFd<'a>,
) -> Result<(), handover::HandoverError> {
    document.add_fd(name, fd)?;
    kept.push(fd);
    Ok(())
}

fn memfd_number(fd: &OwnedFd) -> RawFd {
    use std::os::fd::AsRawFd;
    fd.as_raw_fd()
}

/// Every descriptor close-on-exec again, after an exec that did not happen:
/// the services spawned from now on must not inherit them.
fn set_cloexec(fds: &[BorrowedFd<'_>]) {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    for fd in fds {
        let flags = fcntl(*fd, FcntlArg::F_GETFD)
            .map(FdFlag::from_bits_retain)
            .unwrap_or(FdFlag::empty());
        let _ = fcntl(*fd, FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC));
    }
}

/// The original command line without a previous `--handover FD`, then
/// `--handover FD`: `run` is the last verb, so the flag goes on it.
fn arguments(origin: &Origin, memfd: RawFd) -> Result<Vec<CString>, String> {
    let mut args: Vec<OsString> = Vec::with_capacity(origin.args.len() + 2);
    let mut skip_value = false;
    for arg in &origin.args {
        if skip_value {
            skip_value = false;
            continue;
        }
        if arg == HANDOVER_FLAG {
            skip_value = true;
            continue;
        }
        if arg.as_bytes().starts_with(b"--handover=") {
            continue;
        }
        args.push(arg.clone());
    }
    if args.is_empty() {
        args.push("orchestrator".into());
    }
    args.push(HANDOVER_FLAG.into());
    args.push(memfd.to_string().into());
    args.into_iter()
        .map(|arg| {
            CString::new(arg.as_bytes()).map_err(|_| {
                format!(
                    "the daemon's argument {:?} holds a NUL byte",
                    arg.to_string_lossy()
                )
            })
        })
        .collect()
}

/// The resuming side: the descriptors of the old daemon's own parts, taken
/// from the hand-over (each `None` where the old daemon had none).
pub struct Inherited {
    pub lock: Option<(OwnedFd, OwnedFd)>,
    pub parent_lock: Option<OwnedFd>,
    pub api_unix: Option<OwnedFd>,
    pub api_tcp: Option<OwnedFd>,
    pub guardian: Option<(OwnedFd, u32)>,
}

impl Inherited {
    pub fn take(document: &mut Handover) -> Result<Inherited, handover::HandoverError> {
        let mut optional = |name: &str| {
            if document.fds.contains_key(name) {
                document.take_fd(name).map(Some)
            } else {
                Ok(None)
            }
        };
        let lock_file = optional("daemon_lock")?;
        let lock_name = optional("daemon_lock_name")?;
        let parent_lock = optional("parent_lock")?;
        let api_unix = optional("api_unix")?;
        let api_tcp = optional("api_tcp")?;
        let guardian = optional("guardian")?;
        Ok(Inherited {
            lock: lock_file.zip(lock_name),
            parent_lock,
            api_unix,
            api_tcp,
            guardian: guardian.zip(document.guardian_pid),
        })
    }
}

/// A listening socket handed over, made a tokio listener again.
pub fn unix_listener(fd: OwnedFd) -> std::io::Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

pub fn tcp_listener(fd: OwnedFd) -> std::io::Result<tokio::net::TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    listener.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(listener)
}

/// A borrowed descriptor of anything that has one.
pub fn borrow<T: AsFd>(owner: &T) -> BorrowedFd<'_> {
    owner.as_fd()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_replaces_a_previous_one_and_goes_last() {
        let origin = Origin {
            args: ["orchestrator", "-c", "x.toml", "run", "--handover", "7"]
                .map(OsString::from)
                .to_vec(),
            binary: PathBuf::from("/bin/orchestrator"),
        };
        let args: Vec<String> = arguments(&origin, 12)
            .unwrap()
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            ["orchestrator", "-c", "x.toml", "run", "--handover", "12"]
        );
        let origin = Origin {
            args: ["orchestrator", "run", "--handover=3", "--socket", "/s"]
                .map(OsString::from)
                .to_vec(),
            binary: PathBuf::from("/bin/orchestrator"),
        };
        let args: Vec<String> = arguments(&origin, 4)
            .unwrap()
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            ["orchestrator", "run", "--socket", "/s", "--handover", "4"]
        );
    }
}
