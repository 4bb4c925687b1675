//! Containment and limits through cgroups: one cgroup per service, created
//! before its spawn, joined by the child before exec, emptied with SIGKILL
//! when the service ends (so a setsid or double-forked descendant never
//! outlives it) and removed after. v2 (unified) and v1 (one hierarchy per
//! controller) behind one trait; where neither can be used, `NoCgroups`
//! runs services without, and says which limit is not enforced and why.
//!
//! [`detect`] picks the hierarchy once at start. A service's cgroup is
//! `<the daemon's own cgroup>/<cgroup_parent>/<NAME>` (on v1, in the pids
//! hierarchy always, and in the memory and cpu ones for a service with that
//! limit). Each daemon owns its parent through a lock (an abstract socket
//! named after it); a second daemon on the same parent takes
//! `<cgroup_parent>-<hash of its data_dir>` instead, so that the start-up
//! sweep of leftovers never kills another daemon's services.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tracing::{info, warn};

mod detect;
pub mod fake;
mod files;
mod lock;
mod v1;
mod v2;

pub use detect::{Host, Settings, detect, detect_with};

/// What the cgroup enforces for one service.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// memory.max / memory.limit_in_bytes, with swap off for the service.
    pub memory_mib: Option<u64>,
    /// Thousandths of a core: cpu.max / cfs_quota_us over a 100 ms period.
    pub cpu_millicores: Option<u64>,
    /// pids.max.
    pub pids: Option<u64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    /// The config keys of the limits that are set.
    pub fn keys(&self) -> impl Iterator<Item = &'static str> {
        [
            ("memory_limit", self.memory_mib.is_some()),
            ("cpu_limit", self.cpu_millicores.is_some()),
            ("pids_limit", self.pids.is_some()),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
    }
}

/// Which kind of hierarchy a controller drives; logged once at start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    V2,
    V1,
    None,
}

impl Flavor {
    pub fn as_str(self) -> &'static str {
        match self {
            Flavor::V2 => "cgroup v2",
            Flavor::V1 => "cgroup v1",
            Flavor::None => "no cgroups",
        }
    }
}

/// A limit that is not enforced for a service, and why (for the one
/// warning per service, or the start failure under `require_limits`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unenforced {
    /// The config key: `memory_limit`, `cpu_limit` or `pids_limit`.
    pub limit: &'static str,
    pub reason: String,
}

impl fmt::Display for Unenforced {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not enforced: {}", self.limit, self.reason)
    }
}

/// Where a service was placed: its cgroup, when there is one, and what of
/// its limits could not be enforced.
#[derive(Debug)]
pub struct Placement {
    pub cgroup: Option<Arc<dyn ServiceCgroup>>,
    pub unenforced: Vec<Unenforced>,
    /// The new cgroup's `cgroup.procs` (one per v1 hierarchy), opened for
    /// writing: the child writes "0" to each, joining before it execs.
    /// Dropped once the child has been started, so a running service does
    /// not hold a descriptor for it (10,000 services would need 10,000
    /// more of the daemon's open-files limit).
    pub join: Vec<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cannot {action} {path}: {source}", path = .path.display())]
    Io {
        /// What was being done: "create", "write memory.max to", ...
        action: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Resource use of one service, as its cgroup counts it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub memory_bytes: Option<u64>,
    pub cpu_usec: Option<u64>,
}

/// Creates the services' cgroups under the daemon's cgroup parent.
pub trait ResourceController: Send + Sync + fmt::Debug {
    fn flavor(&self) -> Flavor;

    /// Create `parent/service` (emptying and reusing one left behind),
    /// write `limits` into it, and open what the child joins it with.
    /// Limits the hierarchy cannot take are listed in the placement, not
    /// errors; an error means the cgroup itself could not be made.
    fn create(&self, service: &str, limits: &Limits) -> Result<Placement, CgroupError>;

    /// Kill every process left in the cgroup of one of `services` under the
    /// parent (a previous daemon's, killed before it could stop them) and
    /// remove those cgroups. Only those names: a parent set by mistake to a
    /// directory of others' cgroups (a systemd slice, another daemon's
    /// parent above ours) must not have them killed. Called once at start,
    /// before any service is spawned. Returns the pids that were killed.
    fn sweep_leftovers(&self, services: &BTreeSet<String>) -> Vec<u32>;

    /// The parent this daemon claimed, relative to its own cgroup (the
    /// configured one or its hashed fallback): the guardian is told it, so
    /// that after the daemon's death it claims and sweeps that same one.
    fn claimed_parent(&self) -> Option<&Path> {
        None
    }

    /// The lock on the claimed parent, for the guardian to inherit.
    fn parent_lock(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// Take back the cgroup of `service`'s running process, handed over by
    /// an earlier daemon image (an in-place upgrade) at `path`: it is
    /// claimed as `create` claims a new one (a removal still pending from
    /// an earlier run cannot take it), and opened for probes to join.
    /// Nothing is written to it. `None` without cgroups, or when `path` is
    /// not this service's cgroup under our parent (then it is left alone,
    /// and the next start's sweep finds it).
    fn adopt(&self, _service: &str, _path: &Path) -> Option<Arc<dyn ServiceCgroup>> {
        None
    }
}

/// One service's cgroup (on v1, its directory in each hierarchy used).
pub trait ServiceCgroup: Send + Sync + fmt::Debug {
    /// For messages: the cgroup's path (on v1, in its first hierarchy).
    fn path(&self) -> &Path;

    /// Opens `cgroup.procs` of each directory for writing, for a child
    /// (a health probe) to join this cgroup: it writes "0" to each before
    /// it execs.
    fn open_join(&self) -> io::Result<Vec<OwnedFd>>;

    /// Every process in it now.
    fn pids(&self) -> io::Result<Vec<u32>>;

    /// Whether no process is left in it.
    fn is_empty(&self) -> io::Result<bool>;

    /// One pass of SIGKILL to everything in it: cgroup.kill on v2 where the
    /// kernel has it, else freeze, kill each listed pid, thaw. The caller
    /// repeats until `is_empty`, waiting between passes.
    fn kill_all(&self) -> io::Result<()>;

    fn usage(&self) -> Usage;

    /// How many of its processes the OOM killer has killed since creation.
    fn oom_kills(&self) -> u64;

    /// Remove the (empty) cgroup; `Ok` when it is already gone. Refused
    /// (EBUSY) while a process is left in it, as the kernel refuses: a
    /// service's end tries the removal before it looks for leftovers.
    fn remove(&self) -> io::Result<()>;
}

/// Where cgroups cannot be used: services run unconfined, and each limit
/// set is reported with `reason`.
#[derive(Debug, Clone)]
pub struct NoCgroups {
    pub reason: String,
}

impl ResourceController for NoCgroups {
    fn flavor(&self) -> Flavor {
        Flavor::None
    }

    fn create(&self, _service: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        let unenforced = limits
            .keys()
            .map(|limit| Unenforced {
                limit,
                reason: self.reason.clone(),
            })
            .collect();
        Ok(Placement {
            cgroup: None,
            unenforced,
            join: Vec::new(),
        })
    }

    fn sweep_leftovers(&self, _services: &BTreeSet<String>) -> Vec<u32> {
        Vec::new()
    }
}

/// The cpu limit's period (cpu.max, cpu.cfs_period_us): the kernel's default.
const CPU_PERIOD_USEC: u64 = 100_000;

/// The quota per period for `millicores`; the kernel refuses one under 1 ms,
/// so a smaller limit gets that.
fn cpu_quota_usec(millicores: u64) -> u64 {
    millicores.saturating_mul(CPU_PERIOD_USEC / 1000).max(1000)
}

fn mib_to_bytes(mib: u64) -> u64 {
    mib.saturating_mul(1 << 20)
}

/// How often a blocking wait for a cgroup to empty looks again.
const POLL: Duration = Duration::from_millis(5);

/// Kill passes until `cgroup` is empty or `timeout` has passed, blocking
/// the thread (start-up, tests, or `spawn_blocking`); `Ok(true)` when it
/// is empty.
pub fn kill_until_empty(cgroup: &dyn ServiceCgroup, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        if cgroup.is_empty()? {
            return Ok(true);
        }
        cgroup.kill_all()?;
        if Instant::now() >= deadline {
            return cgroup.is_empty();
        }
        std::thread::sleep(POLL);
    }
}

/// Which run of a service owns its cgroup directory. A service's exit is
/// reported once its cgroup is empty, but the kernel frees the last process
/// a moment after it stops being listed, and rmdir fails with EBUSY until
/// then: so the removal may finish in the background while the service's
/// next run makes the directory again. Both go through here, so a late
/// removal never takes a directory that a newer run has claimed.
#[derive(Debug, Default)]
pub(crate) struct Owners {
    /// The ticket of the run that last claimed each directory.
    runs: Mutex<HashMap<PathBuf, u64>>,
    next_ticket: AtomicU64,
}

/// A run's claim on its cgroup directory, for [`Owners::release`].
#[derive(Debug)]
pub(crate) struct Claim {
    owners: Arc<Owners>,
    key: PathBuf,
    ticket: u64,
}

impl Owners {
    /// Claims `key` for a new run. The guard keeps every removal out until
    /// it is dropped: hold it while the directories are made.
    pub(crate) fn claim(
        self: &Arc<Self>,
        key: &Path,
    ) -> (Claim, MutexGuard<'_, HashMap<PathBuf, u64>>) {
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let mut runs = self.runs.lock().unwrap_or_else(PoisonError::into_inner);
        runs.insert(key.to_owned(), ticket);
        let claim = Claim {
            owners: Arc::clone(self),
            key: key.to_owned(),
            ticket,
        };
        (claim, runs)
    }
}

impl Claim {
    /// Runs `remove` unless a newer run claimed the directory since (then
    /// it is that run's, and this is `Ok`).
    pub(crate) fn release(&self, remove: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        let mut runs = self
            .owners
            .runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if runs.get(&self.key) != Some(&self.ticket) {
            return Ok(());
        }
        remove()?;
        runs.remove(&self.key);
        Ok(())
    }
}

/// Whether the cgroup an upgrade handed over for `service` (`path`) is the
/// one this controller gives it (`ours`); said when not, for both
/// hierarchies alike.
fn adoptable(service: &str, path: &Path, ours: &Path) -> bool {
    if path == ours {
        return true;
    }
    warn!(
        service,
        "not adopting cgroup {} for service {service}: its cgroup here is {} (was \
         cgroup_parent changed?); it is left for the next start's sweep",
        path.display(),
        ours.display()
    );
    false
}

/// A cgroup that `create` found already there (a previous daemon's that the
/// sweep could not remove) is reused, but not with its processes in it: one
/// SIGKILL pass, without waiting for them to be gone (this runs on the
/// service's spawn path, on a runtime worker). A SIGKILLed process runs no
/// more code of its own; what survives is killed again at the service's
/// stop.
fn empty_reused(cgroup: &dyn ServiceCgroup, service: &str) {
    if let Err(error) = cgroup.kill_all() {
        warn!(
            service,
            "cannot empty {} (left by an earlier daemon): {error}; its processes are killed again when service {service} stops",
            cgroup.path().display()
        );
    }
}

/// How long the start-up sweep waits for leftovers to die.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Kill everything in `leftovers` until empty (bounded) and remove them;
/// the pids killed.
fn sweep(leftovers: Vec<Box<dyn ServiceCgroup>>) -> Vec<u32> {
    let deadline = Instant::now() + SWEEP_TIMEOUT;
    let mut killed = BTreeSet::new();
    let mut busy: Vec<&dyn ServiceCgroup> = leftovers.iter().map(|cgroup| &**cgroup).collect();
    while !busy.is_empty() {
        busy.retain(|cgroup| {
            if cgroup.is_empty().unwrap_or(true) {
                return false;
            }
            if let Ok(pids) = cgroup.pids() {
                killed.extend(pids);
            }
            let _ = cgroup.kill_all();
            true
        });
        if busy.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            for cgroup in &busy {
                warn!(
                    "processes left in {} by an earlier daemon survive SIGKILL after {:?} (stuck in the kernel, state D?): find them in its cgroup.procs",
                    cgroup.path().display(),
                    SWEEP_TIMEOUT
                );
            }
            break;
        }
        std::thread::sleep(POLL);
    }
    for cgroup in &leftovers {
        match cgroup.remove() {
            Ok(()) => {}
            Err(error) => warn!(
                "cannot remove {} (left by an earlier daemon): {error}; the next start tries again",
                cgroup.path().display()
            ),
        }
    }
    let killed: Vec<u32> = killed.into_iter().collect();
    if !killed.is_empty() {
        info!(
            "killed {} processes left in service cgroups by an earlier daemon: {killed:?}",
            killed.len()
        );
    }
    killed
}

#[cfg(test)]
mod owner_tests {
    use std::cell::Cell;

    use super::*;

    #[test]
    fn a_late_removal_leaves_a_directory_a_newer_run_claimed() {
        let owners = Arc::new(Owners::default());
        let key = Path::new("/sys/fs/cgroup/orchestrator/api");
        let (first, making) = owners.claim(key);
        drop(making);
        let (second, making) = owners.claim(key);
        drop(making);
        let removed = Cell::new(0);
        let remove = || {
            removed.set(removed.get() + 1);
            Ok(())
        };
        first.release(remove).unwrap();
        assert_eq!(removed.get(), 0, "the second run owns it now");
        second.release(remove).unwrap();
        assert_eq!(removed.get(), 1, "its own run removes it");
        // Released: a second removal of the same run is harmless.
        second.release(remove).unwrap();
        assert_eq!(removed.get(), 1);
    }

    #[test]
    fn a_removal_that_fails_keeps_the_claim_for_the_next_try() {
        let owners = Arc::new(Owners::default());
        let key = Path::new("/sys/fs/cgroup/orchestrator/api");
        let (claim, making) = owners.claim(key);
        drop(making);
        let busy = || Err(io::Error::from_raw_os_error(libc::EBUSY));
        assert_eq!(
            claim.release(busy).unwrap_err().raw_os_error(),
            Some(libc::EBUSY)
        );
        let removed = Cell::new(false);
        claim
            .release(|| {
                removed.set(true);
                Ok(())
            })
            .unwrap();
        assert!(removed.get(), "still its own after the failed try");
    }

    /// A claim holds the lock while its directory is made (the guard it
    /// returns), and a removal checks its ticket and removes under that
    /// same lock: so a removal that saw its own ticket cannot interleave
    /// with a newer run making the directory again.
    #[test]
    fn a_removal_runs_under_the_lock_that_making_a_directory_holds() {
        let owners = Arc::new(Owners::default());
        let key = Path::new("/sys/fs/cgroup/orchestrator/api");
        let (claim, making) = owners.claim(key);
        assert!(owners.runs.try_lock().is_err(), "held while making");
        drop(making);
        let mut locked_during_removal = false;
        claim
            .release(|| {
                locked_during_removal = owners.runs.try_lock().is_err();
                Ok(())
            })
            .unwrap();
        assert!(locked_during_removal);
    }
}
