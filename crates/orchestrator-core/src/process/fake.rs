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

use super::{ChildOutput, ChildProcess, ExitReason, SpawnError, SpawnSpec, Spawner, WaitFuture};

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
                    Ok(Box::new(FakeChild { control }) as Box<dyn ChildProcess>)
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
        Ok(Box::new(FakeChild { control }))
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
}

struct FakeChild {
    control: FakeChildControl,
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
}
