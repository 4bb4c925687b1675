//! A spawner for tests: records every spec, fails on demand, and hands out
//! children that the test ends, or that ignore the stop signal. It never
//! touches a real process, so it runs under tokio's paused clock.

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::signal::Signal;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::cgroup::ServiceCgroup;

use super::{
    AdoptError, ChildOutput, ChildProcess, ExitReason, ReleaseError, Released, SpawnError,
    SpawnSpec, Spawner, WaitFuture,
};

#[derive(Clone, Default)]
pub struct FakeSpawner {
    inner: Arc<Mutex<FakeSpawnerState>>,
    spawned: Arc<Notify>,
}

#[derive(Default)]
struct FakeSpawnerState {
    specs: Vec<SpawnSpec>,
    spawn_times: Vec<Instant>,
    children: Vec<FakeChildControl>,
    failures: VecDeque<String>,
    fail_always: Option<String>,
    panic_next: Option<String>,
    ignore_stop_signal: bool,
    next_pid: u32,
    probes: FakeProbes,
    /// Every adoption: the service and the released pid.
    adopted: Vec<(String, u32)>,
}

/// What `spawn_probe` was asked for and does, apart from the services'
/// spawns (whose counts and specs the actor tests assert on).
#[derive(Default)]
struct FakeProbes {
    specs: Vec<SpawnSpec>,
    /// The path of the cgroup each probe joined, if any.
    cgroups: Vec<Option<PathBuf>>,
    children: Vec<FakeChildControl>,
    /// Probes exit at once with this; `None`: they run until the test ends them.
    exit: Option<ExitReason>,
    fail: Option<String>,
}

impl FakeSpawner {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, FakeSpawnerState> {
        self.inner.lock().expect("fake spawner lock poisoned")
    }

    /// The next spawn fails with `message`.
    pub fn fail_next(&self, message: &str) {
        self.state().failures.push_back(message.to_owned());
    }

    /// The next spawn panics with `message`, as a bug in the spawning code
    /// would: for tests of how a panicking service actor is reported.
    pub fn panic_next(&self, message: &str) {
        self.state().panic_next = Some(message.to_owned());
    }

    /// Every spawn fails with `message` (until `succeed` is called).
    pub fn fail_always(&self, message: &str) {
        self.state().fail_always = Some(message.to_owned());
    }

    pub fn succeed(&self) {
        let mut state = self.state();
        state.fail_always = None;
        state.failures.clear();
    }

    /// Children spawned from now on ignore every signal but SIGKILL.
    pub fn ignore_stop_signal(&self, ignore: bool) {
        self.state().ignore_stop_signal = ignore;
    }

    /// Every spawn attempt, failed ones included.
    pub fn specs(&self) -> Vec<SpawnSpec> {
        self.state().specs.clone()
    }

    pub fn spawn_count(&self) -> usize {
        self.state().specs.len()
    }

    pub fn spawn_times(&self) -> Vec<Instant> {
        self.state().spawn_times.clone()
    }

    /// Controls of the children that did start, oldest first.
    pub fn children(&self) -> Vec<FakeChildControl> {
        self.state().children.clone()
    }

    /// Every `adopt` call, refused ones included: the service and the pid.
    pub fn adopted(&self) -> Vec<(String, u32)> {
        self.state().adopted.clone()
    }

    pub fn last_child(&self) -> Option<FakeChildControl> {
        self.state().children.last().cloned()
    }

    /// Probes spawned from now on exit at once with `reason`; `None`: they
    /// run until the test ends them (through `probe_children`).
    pub fn set_probe_exit(&self, reason: Option<ExitReason>) {
        self.state().probes.exit = reason;
    }

    /// Every probe spawn fails with `message`; `None`: they succeed.
    pub fn fail_probes(&self, message: Option<&str>) {
        self.state().probes.fail = message.map(str::to_owned);
    }

    /// Every probe spawn attempt, failed ones included.
    pub fn probe_specs(&self) -> Vec<SpawnSpec> {
        self.state().probes.specs.clone()
    }

    /// For each probe spawn attempt, the cgroup it was to join.
    pub fn probe_cgroups(&self) -> Vec<Option<PathBuf>> {
        self.state().probes.cgroups.clone()
    }

    /// Controls of the probes that did start, oldest first.
    pub fn probe_children(&self) -> Vec<FakeChildControl> {
        self.state().probes.children.clone()
    }

    /// A new child's control; its pid comes from the one sequence.
    fn new_child(state: &mut FakeSpawnerState) -> FakeChildControl {
        state.next_pid += 1;
        FakeChildControl {
            pid: 1000 + state.next_pid,
            inner: Arc::new(Mutex::new(FakeChildState {
                ignore_stop_signal: state.ignore_stop_signal,
                ..FakeChildState::default()
            })),
            exited: Arc::new(Notify::new()),
        }
    }

    /// Wait until at least `count` spawn attempts were made.
    pub async fn wait_for_spawns(&self, count: usize) {
        loop {
            let notified = self.spawned.notified();
            if self.spawn_count() >= count {
                return;
            }
            notified.await;
        }
    }
}

impl Spawner for FakeSpawner {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Box<dyn ChildProcess>, SpawnError> {
        let panic = self.state().panic_next.take();
        if let Some(message) = panic {
            panic!("{message}");
        }
        let result = {
            let mut state = self.state();
            state.specs.push(spec.clone());
            state.spawn_times.push(Instant::now());
            let failure = state
                .failures
                .pop_front()
                .or_else(|| state.fail_always.clone());
            match failure {
                Some(message) => Err(SpawnError::Injected(message)),
                None => {
                    let control = Self::new_child(&mut state);
                    state.children.push(control.clone());
                    Ok(Box::new(FakeChild {
                        control,
                        service: spec.service.clone(),
                        probe: false,
                    }) as Box<dyn ChildProcess>)
                }
            }
        };
        self.spawned.notify_waiters();
        result
    }

    fn spawn_probe(
        &self,
        spec: &SpawnSpec,
        cgroup: Option<&Arc<dyn ServiceCgroup>>,
    ) -> Result<Box<dyn ChildProcess>, SpawnError> {
        let mut state = self.state();
        state.probes.specs.push(spec.clone());
        state
            .probes
            .cgroups
            .push(cgroup.map(|cgroup| cgroup.path().to_owned()));
        if let Some(message) = state.probes.fail.clone() {
            return Err(SpawnError::Injected(message));
        }
        let control = Self::new_child(&mut state);
        if let Some(reason) = state.probes.exit {
            control.exit(reason);
        }
        state.probes.children.push(control.clone());
        Ok(Box::new(FakeChild {
            control,
            service: spec.service.clone(),
            probe: true,
        }))
    }

    /// A pid of a service's child this spawner started and nobody reaped,
    /// as the real spawner's check of /proc goes; the cgroup path, the
    /// pidfd and the pipes are taken as given.
    fn adopt(
        &self,
        released: Released,
        service: &str,
    ) -> Result<Box<dyn ChildProcess>, AdoptError> {
        let mut state = self.state();
        state.adopted.push((service.to_owned(), released.pid));
        let control = state
            .children
            .iter()
            .find(|control| control.pid == released.pid)
            .cloned();
        let refuse = |reason: &str| AdoptError::NotOurs {
            service: service.to_owned(),
            pid: released.pid,
            reason: reason.to_owned(),
        };
        let control = control.ok_or_else(|| refuse("no child of this spawner has that pid"))?;
        {
            let mut child = control.state();
            if child.reaped {
                return Err(refuse("it has been reaped already"));
            }
            child.released = false;
            child.adoptions += 1;
        }
        Ok(Box::new(FakeChild {
            control,
            service: service.to_owned(),
            probe: false,
        }))
    }
}

/// The test's side of a fake child.
#[derive(Clone)]
pub struct FakeChildControl {
    pid: u32,
    inner: Arc<Mutex<FakeChildState>>,
    exited: Arc<Notify>,
}

#[derive(Default)]
struct FakeChildState {
    exit: Option<ExitReason>,
    reaped: bool,
    ignore_stop_signal: bool,
    signals: Vec<(Instant, Signal)>,
    /// Given up by `release` and not adopted since.
    released: bool,
    adoptions: usize,
}

impl FakeChildControl {
    fn state(&self) -> MutexGuard<'_, FakeChildState> {
        self.inner.lock().expect("fake child lock poisoned")
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// End the child as if it exited or was killed on its own.
    pub fn exit(&self, reason: ExitReason) {
        let mut state = self.state();
        if state.exit.is_none() {
            state.exit = Some(reason);
        }
        drop(state);
        self.exited.notify_one();
    }

    /// Every signal sent to its group, with when it was sent.
    pub fn signals(&self) -> Vec<(Instant, Signal)> {
        self.state().signals.clone()
    }

    /// From now on it ignores every signal but SIGKILL.
    pub fn ignore_stop_signal_from_now(&self) {
        self.state().ignore_stop_signal = true;
    }

    pub fn is_reaped(&self) -> bool {
        self.state().reaped
    }

    /// Released and not adopted since.
    pub fn is_released(&self) -> bool {
        self.state().released
    }

    /// How many times a spawner adopted it.
    pub fn adoptions(&self) -> usize {
        self.state().adoptions
    }
}

struct FakeChild {
    control: FakeChildControl,
    service: String,
    probe: bool,
}

impl ChildProcess for FakeChild {
    fn pid(&self) -> u32 {
        self.control.pid
    }

    fn take_output(&mut self) -> Option<ChildOutput> {
        None
    }

    fn wait(&mut self) -> WaitFuture<'_> {
        Box::pin(async move {
            loop {
                let notified = self.control.exited.notified();
                {
                    let mut state = self.control.state();
                    if let Some(reason) = state.exit {
                        // As the real child does: leftovers of the group get
                        // SIGKILL before the leader is reaped.
                        state.signals.push((Instant::now(), Signal::SIGKILL));
                        state.reaped = true;
                        return Ok(reason);
                    }
                }
                notified.await;
            }
        })
    }

    fn signal_group(&mut self, signal: Signal) -> io::Result<()> {
        let mut state = self.control.state();
        state.signals.push((Instant::now(), signal));
        let dies = signal == Signal::SIGKILL || !state.ignore_stop_signal;
        if dies && state.exit.is_none() && !state.reaped {
            state.exit = Some(ExitReason::Signaled {
                signal: signal as i32,
                core_dumped: false,
            });
            drop(state);
            self.control.exited.notify_one();
        }
        Ok(())
    }

    fn release(self: Box<Self>) -> Result<Released, ReleaseError> {
        let (service, pid) = (self.service.clone(), self.control.pid);
        if self.probe {
            return Err(ReleaseError::Probe { service, pid });
        }
        let mut state = self.control.state();
        if state.reaped {
            return Err(ReleaseError::Reaped { service, pid });
        }
        state.released = true;
        Ok(Released {
            pid,
            cgroup: None,
            killed_by_us: false,
            oom_kills_at_start: 0,
            memory_limit_mib: None,
            pidfd: None,
            output: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(service: &str) -> SpawnSpec {
        SpawnSpec {
            service: service.to_owned(),
            program: "/bin/true".into(),
            ..SpawnSpec::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_child_is_not_signalled_and_its_adoption_waits_for_it() {
        let spawner = FakeSpawner::new();
        let child = spawner.spawn(&spec("api")).unwrap();
        let control = spawner.last_child().unwrap();
        let released = child.release().unwrap();
        assert_eq!(released.pid, control.pid());
        assert!(control.is_released());
        assert!(control.signals().is_empty(), "nothing is signalled");
        assert!(!control.is_reaped());

        let mut adopted = spawner.adopt(released, "api").unwrap();
        assert_eq!(adopted.pid(), control.pid());
        assert!(!control.is_released());
        assert_eq!(control.adoptions(), 1);
        assert_eq!(spawner.adopted(), vec![("api".to_owned(), control.pid())]);
        adopted.signal_group(Signal::SIGTERM).unwrap();
        let reason = adopted.wait().await.unwrap();
        assert_eq!(
            reason,
            ExitReason::Signaled {
                signal: libc::SIGTERM,
                core_dumped: false
            }
        );
        assert!(control.is_reaped());
    }

    #[tokio::test(start_paused = true)]
    async fn an_exit_while_released_is_what_the_adopted_child_reports() {
        let spawner = FakeSpawner::new();
        let child = spawner.spawn(&spec("api")).unwrap();
        let control = spawner.last_child().unwrap();
        let released = child.release().unwrap();
        control.exit(ExitReason::Exited(3));
        let mut adopted = spawner.adopt(released, "api").unwrap();
        assert_eq!(adopted.wait().await.unwrap(), ExitReason::Exited(3));
    }

    #[tokio::test(start_paused = true)]
    async fn probes_reaped_children_and_unknown_pids_are_refused() {
        let spawner = FakeSpawner::new();
        let probe = spawner.spawn_probe(&spec("api"), None).unwrap();
        assert!(matches!(
            probe.release(),
            Err(ReleaseError::Probe { ref service, .. }) if service == "api"
        ));

        let mut child = spawner.spawn(&spec("api")).unwrap();
        let control = spawner.last_child().unwrap();
        control.exit(ExitReason::Exited(0));
        child.wait().await.unwrap();
        let error = child.release().unwrap_err();
        assert!(matches!(error, ReleaseError::Reaped { .. }), "{error}");
        assert!(error.to_string().contains("service api"), "{error}");

        let stranger = Released {
            pid: 4242,
            cgroup: None,
            killed_by_us: false,
            oom_kills_at_start: 0,
            memory_limit_mib: None,
            pidfd: None,
            output: None,
        };
        let error = spawner.adopt(stranger, "api").err().unwrap();
        assert!(
            matches!(error, AdoptError::NotOurs { pid: 4242, .. }),
            "{error}"
        );
        assert!(error.to_string().contains("PID-reuse guard"), "{error}");
        let reaped = Released {
            pid: control.pid(),
            cgroup: None,
            killed_by_us: false,
            oom_kills_at_start: 0,
            memory_limit_mib: None,
            pidfd: None,
            output: None,
        };
        assert!(spawner.adopt(reaped, "api").is_err());
    }
}
