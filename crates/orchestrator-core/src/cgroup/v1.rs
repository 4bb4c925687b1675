//! cgroup v1: a hierarchy per controller. The pids hierarchy tracks every
//! service (enumeration, the kill loop, pids.max); memory and cpu
//! directories are made only for a service with that limit, as each one
//! costs the child one more write before it execs.

use std::collections::BTreeSet;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use super::detect::{Failure, Hierarchy, Settings};
use super::files;
use super::lock::{self, ParentLock};
use super::{
    CgroupError, Flavor, Limits, Placement, ResourceController, ServiceCgroup, Unenforced, Usage,
};

/// Our parent in one hierarchy.
#[derive(Debug, Clone)]
struct Level {
    /// Tells a co-mounted hierarchy (pids with memory, say) from another.
    mount: PathBuf,
    /// The daemon's own cgroup there.
    base: PathBuf,
    parent: PathBuf,
    controllers: Vec<String>,
}

impl Level {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

#[derive(Debug)]
pub(super) struct V1Controller {
    pids: Level,
    memory: Result<Level, String>,
    cpu: Result<Level, String>,
    /// The claimed parent, relative to the daemon's own cgroup.
    relative: PathBuf,
    /// `None` when the lock was inherited (a guardian's).
    lock: Option<ParentLock>,
    owners: Arc<super::Owners>,
}

pub(super) fn setup(
    pids: Hierarchy,
    memory: Result<Hierarchy, String>,
    cpu: Result<Hierarchy, String>,
    settings: &Settings<'_>,
) -> Result<V1Controller, Failure> {
    let (relative, lock) = if settings.parent_lock_inherited {
        (settings.cgroup_parent.to_owned(), None)
    } else {
        let (relative, lock) = lock::claim(&pids.base, settings.cgroup_parent, settings.data_dir)
            .map_err(Failure::Locked)?;
        (relative, Some(lock))
    };
    let level = |hierarchy: Hierarchy| -> Result<Level, String> {
        let parent = hierarchy.base.join(&relative);
        std::fs::create_dir_all(&parent).map_err(|error| files::explain_mkdir(&parent, &error))?;
        Ok(Level {
            mount: hierarchy.mount,
            base: hierarchy.base,
            parent,
            controllers: hierarchy.controllers,
        })
    };
    let pids = level(pids).map_err(Failure::Unusable)?;
    let other = |hierarchy: Result<Hierarchy, String>, controller: &str| {
        let hierarchy = hierarchy.map_err(|reason| {
            format!("{reason}: mount it (as /sys/fs/cgroup/{controller}), or use cgroup v2")
        })?;
        if hierarchy.mount == pids.mount {
            return Ok(pids.clone());
        }
        level(hierarchy)
    };
    let memory = other(memory, "memory");
    let cpu = other(cpu, "cpu");

    let mut used = vec!["pids"];
    for (controller, level) in [("memory", &memory), ("cpu", &cpu)] {
        match level {
            Ok(_) => used.push(controller),
            Err(reason) => warn!("{reason}"),
        }
    }
    info!(
        hierarchy = Flavor::V1.as_str(),
        parent = %pids.parent.display(),
        controllers = %used.join(" "),
        "services get a cgroup each under {} (and in the memory and cpu hierarchies when they have that limit)",
        pids.parent.display()
    );
    Ok(V1Controller {
        pids,
        memory,
        cpu,
        relative,
        lock,
        owners: Arc::default(),
    })
}

/// Write one limit; a refusal becomes an unenforced entry (and false).
fn limit(limit: &'static str, path: &Path, value: &str, unenforced: &mut Vec<Unenforced>) -> bool {
    match files::write(path, value) {
        Ok(()) => true,
        Err(error) => {
            let reason = if error.kind() == io::ErrorKind::NotFound {
                format!(
                    "{} is missing (an older kernel, or not a cgroup v1 hierarchy of that controller)",
                    path.display()
                )
            } else {
                format!("writing {value:?} to {} failed: {error}", path.display())
            };
            unenforced.push(Unenforced { limit, reason });
            false
        }
    }
}

impl V1Controller {
    /// The service's directory in `level`'s hierarchy, made unless it is
    /// the pids one (co-mounted); `None` (and an unenforced entry) when it
    /// cannot be made.
    fn extra_dir(
        &self,
        level: &Result<Level, String>,
        service: &str,
        limit: &'static str,
        dirs: &mut Vec<(PathBuf, bool)>,
        unenforced: &mut Vec<Unenforced>,
    ) -> Option<PathBuf> {
        let level = match level {
            Ok(level) => level,
            Err(reason) => {
                unenforced.push(Unenforced {
                    limit,
                    reason: reason.clone(),
                });
                return None;
            }
        };
        let dir = level.parent.join(service);
        if let Some((_, _)) = dirs.iter().find(|(known, _)| *known == dir) {
            return Some(dir);
        }
        match files::mkdir(&dir) {
            Ok(reused) => {
                dirs.push((dir.clone(), reused));
                Some(dir)
            }
            Err(error) => {
                unenforced.push(Unenforced {
                    limit,
                    reason: files::explain_mkdir(&dir, &error),
                });
                None
            }
        }
    }
}

impl ResourceController for V1Controller {
    fn flavor(&self) -> Flavor {
        Flavor::V1
    }

    fn create(&self, service: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        let pids_dir = self.pids.parent.join(service);
        // Held while the directories are made: the previous run's removal,
        // if it is still under way, cannot take them from under us.
        let (claim, making) = self.owners.claim(&pids_dir);
        let reused = files::mkdir(&pids_dir).map_err(|source| CgroupError::Io {
            action: format!("create service {service}'s cgroup"),
            path: pids_dir.clone(),
            source,
        })?;
        let mut dirs = vec![(pids_dir.clone(), reused)];
        let mut unenforced = Vec::new();
        let memory = limits.memory_mib.and_then(|_| {
            self.extra_dir(
                &self.memory,
                service,
                "memory_limit",
                &mut dirs,
                &mut unenforced,
            )
        });
        let cpu = limits.cpu_millicores.and_then(|_| {
            self.extra_dir(&self.cpu, service, "cpu_limit", &mut dirs, &mut unenforced)
        });
        // cpuacct.usage comes free where cpuacct shares a hierarchy with a
        // directory made anyway; a separate one is not worth a write per
        // spawn.
        let cpuacct = match (&cpu, &self.cpu) {
            (Some(dir), Ok(level)) if level.has("cpuacct") => Some(dir.clone()),
            _ if self.pids.has("cpuacct") => Some(pids_dir.clone()),
            _ => None,
        };
        drop(making);
        let cgroup = V1Cgroup {
            dirs: dirs.iter().map(|(dir, _)| dir.clone()).collect(),
            memory: memory.clone(),
            cpuacct,
            claim: Some(claim),
        };
        if dirs.iter().any(|(_, reused)| *reused) {
            super::empty_reused(&cgroup, service);
            if limits.pids.is_none() {
                let _ = files::write(&pids_dir.join("pids.max"), "max");
            }
            if let Some(dir) = &memory {
                // memsw may never be below limit_in_bytes: unlimited first,
                // so the writes below pass in any order of old and new.
                let _ = files::write(&dir.join("memory.memsw.limit_in_bytes"), "-1");
            }
        }

        if let (Some(mib), Some(dir)) = (limits.memory_mib, &memory) {
            let bytes = super::mib_to_bytes(mib).to_string();
            if limit(
                "memory_limit",
                &dir.join("memory.limit_in_bytes"),
                &bytes,
                &mut unenforced,
            ) {
                // memory + swap at the same value: no swap. Absent without
                // swap accounting (swapaccount=0), with nothing to turn off.
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                match files::write(&memsw, &bytes) {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => {
                        unenforced.push(Unenforced {
                            limit: "memory_limit",
                            reason: format!(
                                "memory.limit_in_bytes is set but swap is not off: writing {bytes:?} to {} failed: {error}",
                                memsw.display()
                            ),
                        });
                    }
                    _ => {}
                }
            }
        }
        if let (Some(millicores), Some(dir)) = (limits.cpu_millicores, &cpu) {
            // The period first: the quota is checked against it.
            if limit(
                "cpu_limit",
                &dir.join("cpu.cfs_period_us"),
                &super::CPU_PERIOD_USEC.to_string(),
                &mut unenforced,
            ) {
                let _ = limit(
                    "cpu_limit",
                    &dir.join("cpu.cfs_quota_us"),
                    &super::cpu_quota_usec(millicores).to_string(),
                    &mut unenforced,
                );
            }
        }
        if let Some(pids) = limits.pids {
            let _ = limit(
                "pids_limit",
                &pids_dir.join("pids.max"),
                &pids.to_string(),
                &mut unenforced,
            );
        }

        let mut join = Vec::with_capacity(cgroup.dirs.len());
        for dir in &cgroup.dirs {
            match files::open_procs(dir) {
                Ok(fd) => join.push(fd),
                Err(source) => {
                    let _ = cgroup.remove();
                    return Err(CgroupError::Io {
                        action: format!("open (for service {service} to join its cgroup)"),
                        path: dir.join("cgroup.procs"),
                        source,
                    });
                }
            }
        }
        Ok(Placement {
            cgroup: Some(Arc::new(cgroup)),
            unenforced,
            join,
        })
    }

    fn claimed_parent(&self) -> Option<&Path> {
        Some(&self.relative)
    }

    fn adopt(&self, service: &str, path: &Path) -> Option<Arc<dyn ServiceCgroup>> {
        let pids_dir = self.pids.parent.join(service);
        if !super::adoptable(service, path, &pids_dir) {
            return None;
        }
        // Claimed, but nothing is made: the guard that keeps removals out
        // while directories are made is not needed (and a thousand services
        // adopted at once would queue on it).
        let (claim, making) = self.owners.claim(&pids_dir);
        drop(making);
        // Which extra directories the run had is not handed over: those
        // that exist are its (a limit's; or an earlier run's, empty, which
        // the removal after the exit takes as well). Opening cgroup.procs is
        // what tells: one call per hierarchy, where a stat and then the open
        // took three (a thousand services resume at once).
        let mut dirs = vec![pids_dir.clone()];
        let procs = (|| {
            let mut procs = vec![files::open_procs(&pids_dir)?];
            let mut extra = |level: &Result<Level, String>| -> io::Result<Option<PathBuf>> {
                let Ok(level) = level else {
                    return Ok(None);
                };
                let dir = level.parent.join(service);
                if dirs.contains(&dir) {
                    return Ok(Some(dir));
                }
                match files::open_procs(&dir) {
                    Ok(fd) => {
                        procs.push(fd);
                        dirs.push(dir.clone());
                        Ok(Some(dir))
                    }
                    Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(error) => Err(error),
                }
            };
            let memory = extra(&self.memory)?;
            let cpu = extra(&self.cpu)?;
            Ok::<_, io::Error>((procs, memory, cpu))
        })();
        let procs = procs.map(|(procs, memory, cpu)| {
            let cpuacct = match (&cpu, &self.cpu) {
                (Some(dir), Ok(level)) if level.has("cpuacct") => Some(dir.clone()),
                _ if self.pids.has("cpuacct") => Some(pids_dir.clone()),
                _ => None,
            };
            (procs, memory, cpuacct)
        });
        match procs {
            // The descriptors only proved each directory there: dropped.
            Ok((_procs, memory, cpuacct)) => Some(Arc::new(V1Cgroup {
                dirs,
                memory,
                cpuacct,
                claim: Some(claim),
            })),
            Err(error) => {
                warn!(
                    service,
                    "cannot adopt cgroup {} of service {service}: opening its cgroup.procs \
                     failed: {error}; the service runs on without it (its process group \
                     still contains it), the next start's sweep removes it",
                    pids_dir.display()
                );
                None
            }
        }
    }

    fn parent_lock(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.lock.as_ref().map(ParentLock::as_fd)
    }

    fn sweep_leftovers(&self, services: &BTreeSet<String>) -> Vec<u32> {
        let mut levels = vec![&self.pids];
        for level in [&self.memory, &self.cpu].into_iter().flatten() {
            if !levels.iter().any(|known| known.parent == level.parent) {
                levels.push(level);
            }
        }
        let names: BTreeSet<String> = levels
            .iter()
            .flat_map(|level| files::subdirs(&level.parent))
            .filter(|name| services.contains(name))
            .collect();
        let leftovers = names
            .into_iter()
            .map(|name| {
                let dirs: Vec<PathBuf> = levels
                    .iter()
                    .map(|level| level.parent.join(&name))
                    .filter(|dir| dir.is_dir())
                    .collect();
                Box::new(V1Cgroup {
                    dirs,
                    memory: None,
                    cpuacct: None,
                    claim: None,
                }) as Box<dyn ServiceCgroup>
            })
            .collect();
        super::sweep(leftovers)
    }
}

impl Drop for V1Controller {
    /// The parents go with the daemon, once its services' cgroups are gone.
    fn drop(&mut self) {
        files::remove_chain(&self.pids.parent, &self.pids.base);
        for level in [&self.memory, &self.cpu].into_iter().flatten() {
            files::remove_chain(&level.parent, &level.base);
        }
    }
}

/// A service's directories, the pids one first.
#[derive(Debug)]
pub(super) struct V1Cgroup {
    dirs: Vec<PathBuf>,
    memory: Option<PathBuf>,
    cpuacct: Option<PathBuf>,
    /// `None` for a previous daemon's, found by the sweep.
    claim: Option<super::Claim>,
}

impl ServiceCgroup for V1Cgroup {
    fn path(&self) -> &Path {
        self.dirs.first().map_or(Path::new(""), PathBuf::as_path)
    }

    fn open_join(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs.iter().map(|dir| files::open_procs(dir)).collect()
    }

    /// Every directory's: a child that died between its joins is in some
    /// only, and each must be empty to be removed.
    fn pids(&self) -> io::Result<Vec<u32>> {
        let mut all = BTreeSet::new();
        for dir in &self.dirs {
            all.extend(files::read_pids(&dir.join("cgroup.procs"))?);
        }
        Ok(all.into_iter().collect())
    }

    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.pids()?.is_empty())
    }

    /// No freezer: a SIGKILLed process cannot complete a fork, so what one
    /// pass misses (a child forked after the list was read) the next finds.
    fn kill_all(&self) -> io::Result<()> {
        files::kill_pids(&self.pids()?, || self.pids());
        Ok(())
    }

    fn usage(&self) -> Usage {
        Usage {
            memory_bytes: self
                .memory
                .as_ref()
                .and_then(|dir| files::read_u64(&dir.join("memory.usage_in_bytes"))),
            cpu_usec: self
                .cpuacct
                .as_ref()
                .and_then(|dir| files::read_u64(&dir.join("cpuacct.usage")))
                .map(|nanos| nanos / 1000),
        }
    }

    /// memory.oom_control's `oom_kill` (Linux 4.13).
    fn oom_kills(&self) -> u64 {
        self.memory
            .as_ref()
            .and_then(|dir| files::read(&dir.join("memory.oom_control")).ok())
            .and_then(|control| files::keyed(&control, "oom_kill"))
            .unwrap_or(0)
    }

    /// Each directory; the first failure (EBUSY: still populated) is
    /// returned after trying the rest.
    fn remove(&self) -> io::Result<()> {
        let remove = || {
            let mut outcome = Ok(());
            for dir in &self.dirs {
                if let Err(error) = files::rmdir(dir)
                    && outcome.is_ok()
                {
                    outcome = Err(error);
                }
            }
            outcome
        };
        match &self.claim {
            Some(claim) => claim.release(remove),
            None => remove(),
        }
    }
}
