//! cgroup v2: one directory per service under `<own cgroup>/<parent>`, with
//! the memory, cpu and pids controllers enabled down to it where the
//! hierarchy offers them.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::{info, warn};

use super::detect::{Failure, Settings};
use super::files::{self, errno};
use super::lock::{self, ParentLock};
use super::{
    CgroupError, Flavor, Limits, Placement, ResourceController, ServiceCgroup, Unenforced, Usage,
};

/// The controllers our limits need, in the order the kernel lists them.
const CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// The leaf the daemon moves itself into when its own cgroup must pass
/// controllers on (see [`move_into_leaf`]).
pub(super) const DAEMON_LEAF: &str = "orchestrator-daemon";

#[derive(Debug)]
pub(super) struct V2Controller {
    /// The daemon's own cgroup (or the one above our leaf).
    base: PathBuf,
    /// `base/cgroup_parent` (or its hashed fallback); the services' cgroups
    /// are its children.
    parent: PathBuf,
    /// Controllers not enabled for the services' cgroups, and why.
    missing: BTreeMap<&'static str, String>,
    /// `parent` relative to `base`.
    relative: PathBuf,
    /// `None` when the lock was inherited (a guardian's).
    lock: Option<ParentLock>,
    owners: std::sync::Arc<super::Owners>,
}

pub(super) fn setup(
    own: &Path,
    settings: &Settings<'_>,
    pid: u32,
) -> Result<V2Controller, Failure> {
    // A daemon that moved itself into its leaf and then re-exec'ed
    // (upgrade) reads the leaf as its own cgroup: the services' parent is
    // still beside it, not under it.
    let base = match own.file_name() {
        Some(name) if name == DAEMON_LEAF => own.parent().unwrap_or(own).to_owned(),
        _ => own.to_owned(),
    };
    let available = files::read(&base.join("cgroup.controllers")).map_err(|error| {
        Failure::Unusable(format!(
            "cannot read {}: {error} (this daemon's cgroup in the cgroup2 hierarchy)",
            base.join("cgroup.controllers").display()
        ))
    })?;
    let (relative, lock) = if settings.parent_lock_inherited {
        (settings.cgroup_parent.to_owned(), None)
    } else {
        let (relative, lock) = lock::claim(&base, settings.cgroup_parent, settings.data_dir)
            .map_err(Failure::Locked)?;
        (relative, Some(lock))
    };
    let parent = base.join(&relative);
    std::fs::create_dir_all(&parent)
        .map_err(|error| Failure::Unusable(files::explain_mkdir(&parent, &error)))?;

    let mut missing = BTreeMap::new();
    let mut wanted = Vec::new();
    for controller in CONTROLLERS {
        if available.split_whitespace().any(|name| name == controller) {
            wanted.push(controller);
        } else {
            missing.insert(
                controller,
                format!(
                    "the {controller} controller is not available in {} (absent from its cgroup.controllers): enable it in the cgroup above (systemd: Delegate=yes), or on a hybrid host use the v1 {controller} hierarchy",
                    base.display()
                ),
            );
        }
    }
    // Each level from our own cgroup down to the parent passes the
    // controllers on to the next through its cgroup.subtree_control.
    let mut levels = vec![base.clone()];
    let mut level = base.clone();
    for part in relative.components() {
        level.push(part);
        levels.push(level.clone());
    }
    enable(&levels, &wanted, pid, &mut missing);

    let enabled: Vec<&str> = CONTROLLERS
        .iter()
        .copied()
        .filter(|controller| !missing.contains_key(controller))
        .collect();
    info!(
        hierarchy = Flavor::V2.as_str(),
        parent = %parent.display(),
        controllers = %enabled.join(" "),
        "services get a cgroup each under {}",
        parent.display()
    );
    for reason in missing.values() {
        warn!("{reason}");
    }
    Ok(V2Controller {
        base,
        parent,
        missing,
        relative,
        lock,
        owners: Default::default(),
    })
}

/// Enable `wanted` in each level's cgroup.subtree_control, top down;
/// controllers that cannot be go into `missing` with the reason.
pub(super) fn enable(
    levels: &[PathBuf],
    wanted: &[&'static str],
    pid: u32,
    missing: &mut BTreeMap<&'static str, String>,
) {
    let mut wanted = wanted.to_vec();
    for (depth, level) in levels.iter().enumerate() {
        let file = level.join("cgroup.subtree_control");
        let current = files::read(&file).unwrap_or_default();
        let todo: Vec<&'static str> = wanted
            .iter()
            .copied()
            .filter(|controller| !current.split_whitespace().any(|name| name == *controller))
            .collect();
        let mut failed = write_subtree(&file, &todo);
        // cgroup v2's no-internal-processes rule: a cgroup other than the
        // root cannot both hold processes and pass controllers to its
        // children. Under systemd with Delegate=yes, the delegated cgroup
        // holds the daemon itself; moving the daemon into a leaf below it
        // empties it, and the write then succeeds.
        if depth == 0 && failed.iter().any(|(_, error)| errno(error) == libc::EBUSY) {
            match move_into_leaf(level, pid) {
                Ok(()) => {
                    let retry: Vec<&'static str> = failed.iter().map(|(c, _)| *c).collect();
                    failed = write_subtree(&file, &retry);
                }
                Err(reason) => {
                    for (controller, _) in failed.drain(..) {
                        missing.insert(
                            controller,
                            format!(
                                "the {controller} controller cannot be enabled in {}: {reason}",
                                file.display()
                            ),
                        );
                        wanted.retain(|c| *c != controller);
                    }
                }
            }
        }
        for (controller, error) in failed {
            let why = if errno(&error) == libc::EBUSY {
                format!(
                    "{} holds processes, and cgroup v2 lets a cgroup hold processes or pass controllers on, not both",
                    level.display()
                )
            } else {
                error.to_string()
            };
            missing.insert(
                controller,
                format!(
                    "the {controller} controller cannot be enabled in {}: {why}: run the daemon in a cgroup of its own (systemd: Delegate=yes)",
                    file.display()
                ),
            );
            wanted.retain(|c| *c != controller);
        }
    }
}

/// Write "+a +b" at once; when that fails, each alone, so one refused
/// controller does not keep the others off. Returns those refused.
fn write_subtree(file: &Path, todo: &[&'static str]) -> Vec<(&'static str, io::Error)> {
    if todo.is_empty() {
        return Vec::new();
    }
    let line: Vec<String> = todo.iter().map(|c| format!("+{c}")).collect();
    if files::write(file, &line.join(" ")).is_ok() {
        return Vec::new();
    }
    todo.iter()
        .filter_map(|controller| {
            files::write(file, &format!("+{controller}"))
                .err()
                .map(|error| (*controller, error))
        })
        .collect()
}

/// Move the daemon (`pid`, with all its threads: cgroup.procs takes the
/// whole process) from `own` into `own/orchestrator-daemon`, so that `own`
/// holds no process and may enable controllers for its children. Only
/// when the daemon is alone there: moving it out of a cgroup it shares
/// (a login session's scope) would not empty it.
pub(super) fn move_into_leaf(own: &Path, pid: u32) -> Result<(), String> {
    let procs = files::read_pids(&own.join("cgroup.procs"))
        .map_err(|error| format!("cannot read {}/cgroup.procs: {error}", own.display()))?;
    let others: Vec<u32> = procs.iter().copied().filter(|p| *p != pid).collect();
    if !others.is_empty() || !procs.contains(&pid) {
        return Err(format!(
            "{} holds other processes (pids {others:?}) besides this daemon (pid {pid}), and cgroup v2 lets a cgroup hold processes or pass controllers on, not both: run the daemon in a cgroup of its own (systemd: Delegate=yes)",
            own.display()
        ));
    }
    let leaf = own.join(DAEMON_LEAF);
    files::mkdir(&leaf).map_err(|error| files::explain_mkdir(&leaf, &error))?;
    files::write(&leaf.join("cgroup.procs"), &pid.to_string()).map_err(|error| {
        format!(
            "cannot move this daemon (pid {pid}) into {}: {error}",
            leaf.display()
        )
    })?;
    info!(
        "moved this daemon (pid {pid}) into {} so that {} can pass controllers on to the services' cgroups",
        leaf.display(),
        own.display()
    );
    Ok(())
}

fn limit_key(controller: &str) -> &'static str {
    match controller {
        "memory" => "memory_limit",
        "cpu" => "cpu_limit",
        _ => "pids_limit",
    }
}

impl V2Controller {
    /// Write one limit; a refusal becomes an unenforced entry (and false).
    fn limit(
        &self,
        dir: &Path,
        controller: &'static str,
        file: &str,
        value: &str,
        unenforced: &mut Vec<Unenforced>,
    ) -> bool {
        let limit = limit_key(controller);
        if let Some(reason) = self.missing.get(controller) {
            unenforced.push(Unenforced {
                limit,
                reason: reason.clone(),
            });
            return false;
        }
        let path = dir.join(file);
        if let Err(error) = files::write(&path, value) {
            let reason = if error.kind() == io::ErrorKind::NotFound {
                format!(
                    "{} is missing: the {controller} controller is not enabled in {}/cgroup.subtree_control",
                    path.display(),
                    self.parent.display()
                )
            } else {
                format!("writing {value:?} to {} failed: {error}", path.display())
            };
            unenforced.push(Unenforced { limit, reason });
            return false;
        }
        true
    }
}

impl ResourceController for V2Controller {
    fn flavor(&self) -> Flavor {
        Flavor::V2
    }

    fn create(&self, service: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        let dir = self.parent.join(service);
        // Held while the directory is made: the previous run's removal, if
        // it is still under way, cannot take it from under us.
        let (claim, making) = self.owners.claim(&dir);
        let reused = files::mkdir(&dir).map_err(|source| CgroupError::Io {
            action: format!("create service {service}'s cgroup"),
            path: dir.clone(),
            source,
        })?;
        drop(making);
        let cgroup = V2Cgroup { dir, claim: None };
        if reused {
            super::empty_reused(&cgroup, service);
            // Back to no limit where this spawn sets none (the defaults of
            // a new cgroup); errors leave the old value, which the next
            // write may fix.
            for (file, set) in [
                ("memory.max", limits.memory_mib.is_some()),
                ("memory.swap.max", limits.memory_mib.is_some()),
                ("cpu.max", limits.cpu_millicores.is_some()),
                ("pids.max", limits.pids.is_some()),
            ] {
                if !set {
                    let _ = files::write(&cgroup.dir.join(file), "max");
                }
            }
        }
        let mut unenforced = Vec::new();
        if let Some(mib) = limits.memory_mib {
            let bytes = super::mib_to_bytes(mib).to_string();
            if self.limit(&cgroup.dir, "memory", "memory.max", &bytes, &mut unenforced) {
                // Without swap off, a service at its limit would swap
                // instead of being held to it. Absent without swap
                // accounting, where there is nothing to turn off.
                let swap = cgroup.dir.join("memory.swap.max");
                match files::write(&swap, "0") {
                    Err(error) if error.kind() != io::ErrorKind::NotFound => {
                        unenforced.push(Unenforced {
                            limit: "memory_limit",
                            reason: format!(
                                "memory.max is set but swap is not off: writing \"0\" to {} failed: {error}",
                                swap.display()
                            ),
                        });
                    }
                    _ => {}
                }
            }
        }
        if let Some(millicores) = limits.cpu_millicores {
            let value = format!(
                "{} {}",
                super::cpu_quota_usec(millicores),
                super::CPU_PERIOD_USEC
            );
            let _ = self.limit(&cgroup.dir, "cpu", "cpu.max", &value, &mut unenforced);
        }
        if let Some(pids) = limits.pids {
            let _ = self.limit(
                &cgroup.dir,
                "pids",
                "pids.max",
                &pids.to_string(),
                &mut unenforced,
            );
        }
        let procs = match files::open_procs(&cgroup.dir) {
            Ok(fd) => fd,
            Err(source) => {
                let _ = files::rmdir(&cgroup.dir);
                return Err(CgroupError::Io {
                    action: format!("open (for service {service} to join its cgroup)"),
                    path: cgroup.dir.join("cgroup.procs"),
                    source,
                });
            }
        };
        Ok(Placement {
            cgroup: Some(std::sync::Arc::new(V2Cgroup {
                dir: cgroup.dir,
                claim: Some(claim),
            })),
            unenforced,
            join: vec![procs],
        })
    }

    fn claimed_parent(&self) -> Option<&Path> {
        Some(&self.relative)
    }

    fn adopt(&self, service: &str, path: &Path) -> Option<Arc<dyn ServiceCgroup>> {
        let dir = self.parent.join(service);
        if !super::adoptable(service, path, &dir) {
            return None;
        }
        let (claim, making) = self.owners.claim(&dir);
        // Opening cgroup.procs proves the cgroup is there and usable.
        let procs = files::open_procs(&dir);
        drop(making);
        match procs {
            Ok(_) => Some(Arc::new(V2Cgroup {
                dir,
                claim: Some(claim),
            })),
            Err(error) => {
                warn!(
                    service,
                    "cannot adopt cgroup {} of service {service}: opening its cgroup.procs \
                     failed: {error}; the service runs on without it (its process group \
                     still contains it), the next start's sweep removes it",
                    dir.display()
                );
                None
            }
        }
    }

    fn parent_lock(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.lock.as_ref().map(ParentLock::as_fd)
    }

    fn sweep_leftovers(&self, services: &std::collections::BTreeSet<String>) -> Vec<u32> {
        let leftovers: Vec<Box<dyn ServiceCgroup>> = files::subdirs(&self.parent)
            .into_iter()
            .filter(|name| services.contains(name))
            .map(|name| {
                Box::new(V2Cgroup {
                    dir: self.parent.join(name),
                    claim: None,
                }) as Box<dyn ServiceCgroup>
            })
            .collect();
        super::sweep(leftovers)
    }
}

impl Drop for V2Controller {
    /// The parent goes with the daemon, when its services' cgroups are
    /// gone; parallel test daemons would otherwise leave one each.
    fn drop(&mut self) {
        files::remove_chain(&self.parent, &self.base);
    }
}

#[derive(Debug)]
pub(super) struct V2Cgroup {
    dir: PathBuf,
    /// `None` for a previous daemon's, found by the sweep.
    claim: Option<super::Claim>,
}

impl ServiceCgroup for V2Cgroup {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn open_join(&self) -> io::Result<Vec<OwnedFd>> {
        Ok(vec![files::open_procs(&self.dir)?])
    }

    fn pids(&self) -> io::Result<Vec<u32>> {
        files::read_pids(&self.dir.join("cgroup.procs"))
    }

    fn is_empty(&self) -> io::Result<bool> {
        // `populated` also counts processes in cgroups below, which
        // cgroup.procs does not list.
        match files::read(&self.dir.join("cgroup.events")) {
            Ok(events) => {
                if let Some(populated) = files::keyed(&events, "populated") {
                    return Ok(populated == 0);
                }
            }
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            Err(_) => {}
        }
        Ok(self.pids()?.is_empty())
    }

    fn kill_all(&self) -> io::Result<()> {
        // cgroup.kill (Linux 5.14) kills the whole subtree at once, forks
        // in flight included.
        match files::write(&self.dir.join("cgroup.kill"), "1") {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
            Err(_) => {}
        }
        // Frozen, nothing in the cgroup can fork while its list is read and
        // killed; SIGKILL still ends frozen tasks. cgroup.freeze needs 5.2.
        let freeze = self.dir.join("cgroup.freeze");
        let frozen = files::write(&freeze, "1").is_ok();
        let outcome = self
            .pids()
            .map(|pids| files::kill_pids(&pids, || self.pids()));
        if frozen {
            let _ = files::write(&freeze, "0");
        }
        outcome
    }

    fn usage(&self) -> Usage {
        Usage {
            memory_bytes: files::read_u64(&self.dir.join("memory.current")),
            cpu_usec: files::read(&self.dir.join("cpu.stat"))
                .ok()
                .and_then(|stat| files::keyed(&stat, "usage_usec")),
        }
    }

    fn oom_kills(&self) -> u64 {
        files::read(&self.dir.join("memory.events"))
            .ok()
            .and_then(|events| files::keyed(&events, "oom_kill"))
            .unwrap_or(0)
    }

    fn remove(&self) -> io::Result<()> {
        match &self.claim {
            Some(claim) => claim.release(|| files::rmdir(&self.dir)),
            None => files::rmdir(&self.dir),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::sync::Arc;

    use super::*;
    use crate::cgroup::detect::{Host, detect_with};

    /// A temp folder laid out like a pure v2 /sys/fs/cgroup, with the
    /// daemon in its root cgroup.
    struct Tree {
        dir: tempfile::TempDir,
    }

    impl Tree {
        fn new(controllers: &str) -> Tree {
            let dir = tempfile::tempdir().unwrap();
            let cgroup = dir.path().join("sys/fs/cgroup");
            fs::create_dir_all(&cgroup).unwrap();
            fs::write(cgroup.join("cgroup.controllers"), controllers).unwrap();
            fs::write(cgroup.join("cgroup.subtree_control"), "").unwrap();
            fs::write(
                dir.path().join("mountinfo"),
                "30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
            )
            .unwrap();
            fs::write(dir.path().join("cgroup"), "0::/\n").unwrap();
            Tree { dir }
        }

        fn cgroup(&self) -> PathBuf {
            self.dir.path().join("sys/fs/cgroup")
        }

        /// A cgroup directory as the kernel would make it: the files our
        /// code writes or reads exist, empty.
        fn mkdir(&self, relative: &str, files: &[&str]) -> PathBuf {
            let dir = self.cgroup().join(relative);
            fs::create_dir_all(&dir).unwrap();
            for file in files {
                fs::write(dir.join(file), "").unwrap();
            }
            dir
        }

        fn detect(&self, parent: &str) -> Arc<dyn ResourceController> {
            let host = Host {
                mountinfo: self.dir.path().join("mountinfo"),
                self_cgroup: self.dir.path().join("cgroup"),
                root: self.dir.path().to_owned(),
                pid: std::process::id(),
            };
            let settings = Settings {
                cgroup_parent: Path::new(parent),
                data_dir: self.dir.path(),
                parent_lock_inherited: false,
            };
            detect_with(&settings, &host)
        }
    }

    const SERVICE_FILES: &[&str] = &[
        "cgroup.procs",
        "cgroup.kill",
        "cgroup.events",
        "memory.max",
        "memory.swap.max",
        "cpu.max",
        "pids.max",
    ];

    fn read(path: PathBuf) -> String {
        fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    #[test]
    fn limits_are_written_where_the_kernel_reads_them() {
        let tree = Tree::new("cpuset cpu io memory hugetlb pids rdma misc\n");
        tree.mkdir("orch", &["cgroup.subtree_control"]);
        let service = tree.mkdir("orch/api", SERVICE_FILES);
        let controller = tree.detect("orch");
        assert_eq!(controller.flavor(), Flavor::V2);
        // Both levels above the services pass the controllers on.
        assert_eq!(
            read(tree.cgroup().join("cgroup.subtree_control")),
            "+cpu +memory +pids"
        );
        assert_eq!(
            read(tree.cgroup().join("orch/cgroup.subtree_control")),
            "+cpu +memory +pids"
        );

        let limits = Limits {
            memory_mib: Some(256),
            cpu_millicores: Some(1500),
            pids: Some(128),
        };
        let placement = controller.create("api", &limits).unwrap();
        assert_eq!(placement.unenforced, Vec::new());
        assert_eq!(placement.join.len(), 1);
        let cgroup = placement.cgroup.unwrap();
        assert_eq!(cgroup.path(), service);
        assert_eq!(read(service.join("memory.max")), (256u64 << 20).to_string());
        assert_eq!(read(service.join("memory.swap.max")), "0");
        assert_eq!(read(service.join("cpu.max")), "150000 100000");
        assert_eq!(read(service.join("pids.max")), "128");

        cgroup.kill_all().unwrap();
        assert_eq!(read(service.join("cgroup.kill")), "1");
    }

    #[test]
    fn a_reused_cgroup_loses_the_limits_this_spawn_does_not_set() {
        let tree = Tree::new("cpu memory pids");
        tree.mkdir("orch", &["cgroup.subtree_control"]);
        let service = tree.mkdir("orch/api", SERVICE_FILES);
        fs::write(service.join("memory.max"), "1048576").unwrap();
        fs::write(service.join("pids.max"), "5").unwrap();
        let controller = tree.detect("orch");
        let limits = Limits {
            cpu_millicores: Some(5),
            ..Limits::default()
        };
        let placement = controller.create("api", &limits).unwrap();
        assert_eq!(placement.unenforced, Vec::new());
        assert_eq!(read(service.join("memory.max")), "max");
        assert_eq!(read(service.join("pids.max")), "max");
        // The kernel's floor of 1 ms per period.
        assert_eq!(read(service.join("cpu.max")), "1000 100000");
    }

    #[test]
    fn controllers_the_hierarchy_lacks_are_named_as_unenforced() {
        let tree = Tree::new("memory\n");
        tree.mkdir("orch", &["cgroup.subtree_control"]);
        // memory.max missing too: enabled above, yet not there.
        let service = tree.mkdir("orch/api", &["cgroup.procs"]);
        let controller = tree.detect("orch");
        assert_eq!(
            read(tree.cgroup().join("cgroup.subtree_control")),
            "+memory"
        );
        let limits = Limits {
            memory_mib: Some(64),
            cpu_millicores: Some(1000),
            pids: Some(10),
        };
        let placement = controller.create("api", &limits).unwrap();
        let by_limit: BTreeMap<&str, &str> = placement
            .unenforced
            .iter()
            .map(|u| (u.limit, u.reason.as_str()))
            .collect();
        assert_eq!(by_limit.len(), 3, "{by_limit:?}");
        assert!(
            by_limit["memory_limit"].contains("memory.max is missing"),
            "{by_limit:?}"
        );
        assert!(by_limit["memory_limit"].contains(&service.display().to_string()));
        assert!(by_limit["cpu_limit"].contains("cpu controller is not available"));
        assert!(by_limit["cpu_limit"].contains("cgroup.controllers"));
        assert!(by_limit["pids_limit"].contains("pids controller is not available"));
    }

    #[test]
    fn usage_oom_kills_and_population_come_from_the_interface_files() {
        let tree = Tree::new("cpu memory pids");
        tree.mkdir("orch", &["cgroup.subtree_control"]);
        let service = tree.mkdir("orch/api", SERVICE_FILES);
        fs::write(service.join("memory.current"), "1234\n").unwrap();
        fs::write(
            service.join("cpu.stat"),
            "usage_usec 5678\nuser_usec 5000\nsystem_usec 678\n",
        )
        .unwrap();
        fs::write(
            service.join("memory.events"),
            "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\noom_group_kill 0\n",
        )
        .unwrap();
        let controller = tree.detect("orch");
        let cgroup = controller
            .create("api", &Limits::default())
            .unwrap()
            .cgroup
            .unwrap();
        fs::write(service.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        assert_eq!(
            cgroup.usage(),
            Usage {
                memory_bytes: Some(1234),
                cpu_usec: Some(5678)
            }
        );
        assert_eq!(cgroup.oom_kills(), 2);
        assert!(!cgroup.is_empty().unwrap());
        fs::write(service.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(cgroup.is_empty().unwrap());
    }

    #[test]
    fn without_cgroup_kill_it_freezes_kills_each_pid_and_thaws() {
        let tree = Tree::new("cpu memory pids");
        tree.mkdir("orch", &["cgroup.subtree_control"]);
        let service = tree.mkdir("orch/api", &["cgroup.procs", "cgroup.freeze"]);
        let controller = tree.detect("orch");
        let cgroup = controller
            .create("api", &Limits::default())
            .unwrap()
            .cgroup
            .unwrap();
        let mut sleeper = std::process::Command::new("sleep")
            .arg("300")
            .spawn()
            .unwrap();
        fs::write(service.join("cgroup.procs"), format!("{}\n", sleeper.id())).unwrap();
        cgroup.kill_all().unwrap();
        let status = sleeper.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert_eq!(read(service.join("cgroup.freeze")), "0");
    }

    #[test]
    fn a_daemon_in_its_leaf_finds_its_parent_beside_it() {
        let tree = Tree::new("cpu memory pids");
        fs::write(
            tree.dir.path().join("cgroup"),
            format!("0::/svc/{DAEMON_LEAF}\n"),
        )
        .unwrap();
        let svc = tree.mkdir("svc", &["cgroup.controllers", "cgroup.subtree_control"]);
        fs::write(svc.join("cgroup.controllers"), "cpu memory pids").unwrap();
        tree.mkdir("svc/orch", &["cgroup.subtree_control"]);
        tree.mkdir("svc/orch/api", SERVICE_FILES);
        let controller = tree.detect("orch");
        let cgroup = controller
            .create("api", &Limits::default())
            .unwrap()
            .cgroup
            .unwrap();
        assert_eq!(cgroup.path(), svc.join("orch/api"));
    }

    #[test]
    fn moving_into_the_leaf_only_when_alone() {
        let tree = Tree::new("cpu memory pids");
        let own = tree.mkdir("svc", &[]);
        fs::write(own.join("cgroup.procs"), "41\n42\n").unwrap();
        let shared = move_into_leaf(&own, 42).unwrap_err();
        assert!(shared.contains("[41]"), "{shared}");
        assert!(!own.join(DAEMON_LEAF).exists());
        fs::write(own.join("cgroup.procs"), "42\n").unwrap();
        // A real leaf has its cgroup.procs made by the kernel.
        tree.mkdir(&format!("svc/{DAEMON_LEAF}"), &["cgroup.procs"]);
        move_into_leaf(&own, 42).unwrap();
        assert_eq!(read(own.join(DAEMON_LEAF).join("cgroup.procs")), "42");
    }
}
