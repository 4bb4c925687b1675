//! Containment and limits through cgroups: one cgroup per service, created
//! before its spawn, joined by the child before exec, emptied with SIGKILL
//! when the service ends (so a setsid or double-forked descendant never
//! outlives it) and removed after. v2 (unified) and v1 (one hierarchy per
//! controller) behind one trait; where neither can be used, `NoCgroups`
//! runs services without, and says which limit is not enforced and why.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod fake;

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

    /// Kill every process left in a service cgroup under the parent (a
    /// previous daemon's, killed before it could stop them) and remove
    /// those cgroups. Called once at start, before any service is spawned.
    /// Returns the pids that were killed.
    fn sweep_leftovers(&self) -> Vec<u32>;
}

/// One service's cgroup (on v1, its directory in each hierarchy used).
pub trait ServiceCgroup: Send + Sync + fmt::Debug {
    /// For messages: the cgroup's path (on v1, in its first hierarchy).
    fn path(&self) -> &Path;

    /// `cgroup.procs` of each directory, opened for writing before the
    /// spawn: the child writes "0" to each, joining before it execs.
    fn join_fds(&self) -> &[OwnedFd];

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

    /// Remove the (empty) cgroup; `Ok` when it is already gone.
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
        let mut unenforced = Vec::new();
        for (limit, set) in [
            ("memory_limit", limits.memory_mib.is_some()),
            ("cpu_limit", limits.cpu_millicores.is_some()),
            ("pids_limit", limits.pids.is_some()),
        ] {
            if set {
                unenforced.push(Unenforced {
                    limit,
                    reason: self.reason.clone(),
                });
            }
        }
        Ok(Placement {
            cgroup: None,
            unenforced,
        })
    }

    fn sweep_leftovers(&self) -> Vec<u32> {
        Vec::new()
    }
}
