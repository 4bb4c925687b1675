//! A controller without files, for the tests of what uses cgroups (the
//! spawner, the service actor, status): it records what was asked and
//! reports what the test sets.

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::{
    CgroupError, Flavor, Limits, Placement, ResourceController, ServiceCgroup, Unenforced, Usage,
};

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
pub struct FakeController {
    flavor: Flavor,
    state: Mutex<ControllerState>,
}

#[derive(Debug, Default)]
struct ControllerState {
    created: Vec<(String, Limits)>,
    cgroups: HashMap<String, Arc<FakeCgroup>>,
    unenforced: HashMap<String, Vec<Unenforced>>,
    failing: HashSet<String>,
    leftovers: Vec<u32>,
    sweeps: usize,
    adopted: Vec<(String, PathBuf)>,
}

impl Default for FakeController {
    fn default() -> Self {
        FakeController::new(Flavor::V2)
    }
}

impl FakeController {
    pub fn new(flavor: Flavor) -> Self {
        FakeController {
            flavor,
            state: Mutex::default(),
        }
    }

    /// What `create` reports as not enforced for `service`, from now on.
    pub fn set_unenforced(&self, service: &str, unenforced: Vec<Unenforced>) {
        lock(&self.state)
            .unenforced
            .insert(service.to_owned(), unenforced);
    }

    /// `create` fails for `service` from now on (EACCES).
    pub fn fail_create(&self, service: &str) {
        lock(&self.state).failing.insert(service.to_owned());
    }

    /// What the next `sweep_leftovers` returns.
    pub fn set_leftovers(&self, pids: Vec<u32>) {
        lock(&self.state).leftovers = pids;
    }

    /// Every `create` so far, in order.
    pub fn created(&self) -> Vec<(String, Limits)> {
        lock(&self.state).created.clone()
    }

    /// The last cgroup created for `service`.
    pub fn cgroup(&self, service: &str) -> Option<Arc<FakeCgroup>> {
        lock(&self.state).cgroups.get(service).cloned()
    }

    pub fn sweeps(&self) -> usize {
        lock(&self.state).sweeps
    }

    /// Every `adopt` so far: the service and the path it was given.
    pub fn adopted(&self) -> Vec<(String, PathBuf)> {
        lock(&self.state).adopted.clone()
    }
}

impl ResourceController for FakeController {
    fn flavor(&self) -> Flavor {
        self.flavor
    }

    fn create(&self, service: &str, limits: &Limits) -> Result<Placement, CgroupError> {
        let mut state = lock(&self.state);
        state.created.push((service.to_owned(), *limits));
        let path = PathBuf::from(format!("/fake-cgroup/{service}"));
        if state.failing.contains(service) {
            return Err(CgroupError::Io {
                action: format!("create service {service}'s cgroup"),
                path,
                source: io::Error::from_raw_os_error(libc::EACCES),
            });
        }
        let cgroup = Arc::new(FakeCgroup::new(path));
        state
            .cgroups
            .insert(service.to_owned(), Arc::clone(&cgroup));
        Ok(Placement {
            cgroup: Some(cgroup),
            unenforced: state.unenforced.get(service).cloned().unwrap_or_default(),
            join: Vec::new(),
        })
    }

    fn sweep_leftovers(&self, _services: &std::collections::BTreeSet<String>) -> Vec<u32> {
        let mut state = lock(&self.state);
        state.sweeps += 1;
        std::mem::take(&mut state.leftovers)
    }

    /// Any path is taken: the cgroup is the service's last one when the
    /// path matches (an adoption in the same test), else a new one.
    fn adopt(&self, service: &str, path: &Path) -> Option<Arc<dyn ServiceCgroup>> {
        let mut state = lock(&self.state);
        state.adopted.push((service.to_owned(), path.to_owned()));
        let cgroup = match state.cgroups.get(service) {
            Some(cgroup) if cgroup.path == path => Arc::clone(cgroup),
            _ => Arc::new(FakeCgroup::new(path.to_owned())),
        };
        state
            .cgroups
            .insert(service.to_owned(), Arc::clone(&cgroup));
        Some(cgroup)
    }
}

/// A service's fake cgroup: no join fds, so a child joins nothing.
#[derive(Debug)]
pub struct FakeCgroup {
    path: PathBuf,
    state: Mutex<CgroupState>,
}

#[derive(Debug)]
struct CgroupState {
    pids: Vec<u32>,
    oom_kills: u64,
    usage: Usage,
    kill_calls: usize,
    /// Whether `kill_all` empties it, as the kernel would.
    kill_empties: bool,
    removed: bool,
}

impl FakeCgroup {
    fn new(path: PathBuf) -> Self {
        FakeCgroup {
            path,
            state: Mutex::new(CgroupState {
                pids: Vec::new(),
                oom_kills: 0,
                usage: Usage::default(),
                kill_calls: 0,
                kill_empties: true,
                removed: false,
            }),
        }
    }

    pub fn set_pids(&self, pids: Vec<u32>) {
        lock(&self.state).pids = pids;
    }

    pub fn set_oom_kills(&self, count: u64) {
        lock(&self.state).oom_kills = count;
    }

    pub fn set_usage(&self, usage: Usage) {
        lock(&self.state).usage = usage;
    }

    /// false: `kill_all` leaves its pids (processes stuck in the kernel).
    pub fn set_kill_empties(&self, empties: bool) {
        lock(&self.state).kill_empties = empties;
    }

    pub fn kill_calls(&self) -> usize {
        lock(&self.state).kill_calls
    }

    pub fn removed(&self) -> bool {
        lock(&self.state).removed
    }
}

impl ServiceCgroup for FakeCgroup {
    fn path(&self) -> &Path {
        &self.path
    }

    fn open_join(&self) -> io::Result<Vec<OwnedFd>> {
        Ok(Vec::new())
    }

    fn pids(&self) -> io::Result<Vec<u32>> {
        Ok(lock(&self.state).pids.clone())
    }

    fn is_empty(&self) -> io::Result<bool> {
        Ok(lock(&self.state).pids.is_empty())
    }

    fn kill_all(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        state.kill_calls += 1;
        if state.kill_empties {
            state.pids.clear();
        }
        Ok(())
    }

    fn usage(&self) -> Usage {
        lock(&self.state).usage
    }

    fn oom_kills(&self) -> u64 {
        lock(&self.state).oom_kills
    }

    /// EBUSY while it has pids, as rmdir would.
    fn remove(&self) -> io::Result<()> {
        let mut state = lock(&self.state);
        if !state.pids.is_empty() {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        state.removed = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_reports_what_the_test_sets() {
        let fake = FakeController::default();
        fake.set_unenforced(
            "api",
            vec![Unenforced {
                limit: "cpu_limit",
                reason: "test".into(),
            }],
        );
        let limits = Limits {
            cpu_millicores: Some(500),
            ..Limits::default()
        };
        let placement = fake.create("api", &limits).unwrap();
        assert_eq!(placement.unenforced.len(), 1);
        assert_eq!(fake.created(), vec![("api".to_owned(), limits)]);
        let cgroup = fake.cgroup("api").unwrap();
        cgroup.set_pids(vec![10, 11]);
        cgroup.set_oom_kills(2);
        let seen = placement.cgroup.unwrap();
        assert_eq!(seen.oom_kills(), 2);
        assert!(seen.remove().is_err());
        seen.kill_all().unwrap();
        assert!(seen.is_empty().unwrap());
        assert_eq!(cgroup.kill_calls(), 1);
        seen.remove().unwrap();
        assert!(cgroup.removed());

        fake.fail_create("db");
        assert!(fake.create("db", &Limits::default()).is_err());
        let adopted = fake.adopt("api", Path::new("/fake-cgroup/api")).unwrap();
        assert!(
            Arc::ptr_eq(&fake.cgroup("api").unwrap(), &cgroup),
            "the same cgroup as created"
        );
        assert_eq!(adopted.path(), Path::new("/fake-cgroup/api"));
        assert_eq!(
            fake.adopted(),
            vec![("api".to_owned(), PathBuf::from("/fake-cgroup/api"))]
        );
        fake.set_leftovers(vec![7]);
        assert_eq!(fake.sweep_leftovers(&Default::default()), vec![7]);
        assert_eq!(fake.sweeps(), 1);
    }
}
