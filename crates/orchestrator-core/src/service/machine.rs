//! The lifecycle of one service as a pure state machine: inputs in, effects
//! out, time passed in as a value. No runtime, no I/O: tested as a table.

use std::collections::VecDeque;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::config::{BackoffConfig, QUICK_FAILURE, RestartPolicy, START_LIMIT_DELAY, StartLimit};
use crate::handover::{AfterStopSnapshot, MachineSnapshot, PhaseSnapshot, SnapshotError};
use crate::process::ExitReason;
use crate::wire::EventKind;

pub use crate::wire::State;

/// What the service's rules are; fixed for the life of the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub restart: RestartPolicy,
    pub max_restarts: u32,
    pub backoff: BackoffConfig,
    pub start_limit: StartLimit,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
    pub ready: ReadyWhen,
}

/// When a started process counts as up (state `running`, a start answered,
/// its dependents free to start); until then it is `starting`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadyWhen {
    /// Once it has run this long (start_grace; zero: at once).
    Grace(Duration),
    /// On [`Input::Ready`] (READY=1, or a first passing probe); not ready
    /// within `timeout` is a failed start.
    Signalled { timeout: Duration },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The user asks for it to run.
    Start,
    /// The daemon starts it on its own (an enabled service at start-up):
    /// as Start, but not counted as a user's request.
    AutoStart,
    /// The user asks for it to stop.
    Stop,
    /// The user asks for a stop followed by a start.
    Restart,
    /// The daemon is going away: stop, and refuse every later start (a
    /// process started now would outlive the daemon).
    Shutdown,
    /// As Shutdown, without grace (a second Ctrl-C).
    Kill,
    /// The requested spawn succeeded.
    Spawned { pid: u32 },
    /// The requested spawn failed; the message says why. `permanent`: no
    /// retry can succeed until the spec or the file changes (a checksum
    /// mismatch, a refused binary): the service fails at once.
    SpawnFailed { error: String, permanent: bool },
    /// The process ended (and was reaped).
    Exited(ExitReason),
    /// The deadline from [`Machine::deadline`] passed.
    Timer,
    /// It said it is ready (READY=1), or its health check passed for the
    /// first time: a starting process is up.
    Ready,
    /// It runs but must not go on (unhealthy with on_unhealthy = restart,
    /// watchdog expired): stop it, then treat the end as a failure.
    Faulted { reason: String },
    /// What the process printed last on stderr, if anything: named with an
    /// exit during start-up. Sent just before its `Exited`.
    LastWords(String),
    /// EXTEND_TIMEOUT_USEC: a starting process needs this much longer from
    /// now (as systemd: the deadline moves out, never in).
    ExtendStart(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Start a new process; answer with `Spawned` or `SpawnFailed` before
    /// any other input.
    Spawn,
    /// Send this signal to the process group.
    SignalGroup(Signal),
    /// A lifecycle event for the event bus (and the daemon's log).
    Publish(EventKind),
    /// A start or restart was refused: the daemon is shutting down.
    Refused,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    StayStopped,
    Start,
    /// A stop the machine made because the process faulted (the reason is
    /// in `Machine::fault`): its end is a failure for the restart policy.
    Fail,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Stopped,
    Failed,
    /// A Spawn effect is out; its answer comes next.
    Spawning,
    /// The process runs; `ready` once it is up (by `policy.ready`); until
    /// then the state is `starting`.
    Running {
        since: Instant,
        pid: u32,
        ready: bool,
    },
    /// The stop signal was sent; waiting for the exit. `killed` once SIGKILL went out.
    Stopping {
        pid: u32,
        then: AfterStop,
        deadline: Instant,
        killed: bool,
    },
    Backoff {
        until: Instant,
    },
}

/// Jitter applied to every backoff delay: ±10 %.
pub const BACKOFF_JITTER: f64 = 0.1;

#[derive(Debug, Clone)]
pub struct Machine {
    policy: Policy,
    phase: Phase,
    /// Consecutive failures: the n of the backoff formula.
    failures: u32,
    /// Restarts the machine made on its own after failures.
    restarts: u64,
    /// Starts and restarts a user asked for that led to a new process.
    requested_starts: u64,
    /// Set by Shutdown and Kill, never cleared: no start is accepted any more.
    closing: bool,
    /// When recent runs died at once (at most `start_limit.burst` kept).
    quick_failures: VecDeque<Instant>,
    last_exit: Option<ExitReason>,
    last_error: Option<String>,
    /// Why the machine is stopping the process (with `AfterStop::Fail`).
    fault: Option<String>,
    /// The process's last line on stderr, for an exit during start-up.
    last_words: Option<String>,
    /// The last process ended by itself with code 0 and the policy does
    /// not restart it: done, not down (a one-shot). Until the next spawn.
    completed: bool,
    /// A starting process asked for more time (EXTEND_TIMEOUT_USEC): its
    /// readiness deadline is at least this.
    start_extended_to: Option<Instant>,
    jitter: f64,
    rng: fastrand::Rng,
}

impl Machine {
    pub fn new(policy: Policy) -> Self {
        Machine {
            policy,
            phase: Phase::Stopped,
            failures: 0,
            restarts: 0,
            requested_starts: 0,
            closing: false,
            quick_failures: VecDeque::new(),
            last_exit: None,
            last_error: None,
            fault: None,
            last_words: None,
            completed: false,
            start_extended_to: None,
            jitter: BACKOFF_JITTER,
            rng: fastrand::Rng::new(),
        }
    }

    /// Exact delays, for tests that check the backoff sequence to the tick.
    pub fn without_jitter(mut self) -> Self {
        self.jitter = 0.0;
        self
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.rng = fastrand::Rng::with_seed(seed);
        self
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// A reload's live change: the phase, the pid, the counters and any
    /// deadline already set stay; the next decision follows the new rules.
    /// A reload's rules, taken live: phase, pid, counters and timers stay.
    /// A pending restart that the new rules no longer allow (`never`, or
    /// fewer restarts than already made) is given up at once rather than
    /// carried out. Returns the events that publishes.
    pub fn set_policy(&mut self, policy: Policy) -> Vec<Effect> {
        self.policy = policy;
        let mut out = Vec::new();
        if let Phase::Backoff { .. } = self.phase {
            let error = self
                .last_error
                .clone()
                .unwrap_or_else(|| "it failed".to_owned());
            if self.policy.restart == RestartPolicy::Never {
                self.give_up(
                    format!("restart = \"never\" since a reload: {error}"),
                    &mut out,
                );
            } else if self.failures > self.policy.max_restarts {
                let restarts = self.policy.max_restarts;
                let plural = if restarts == 1 { "" } else { "s" };
                self.give_up(
                    format!("gave up after {restarts} restart{plural}: {error}"),
                    &mut out,
                );
            }
        }
        out
    }

    pub fn state(&self) -> State {
        match self.phase {
            Phase::Stopped => State::Stopped,
            Phase::Failed => State::Failed,
            Phase::Spawning => State::Starting,
            Phase::Running { ready: false, .. } => State::Starting,
            Phase::Running { ready: true, .. } => State::Running,
            Phase::Stopping { .. } => State::Stopping,
            Phase::Backoff { .. } => State::Restarting,
        }
    }

    /// True while a stop is in progress (the process is still alive).
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// True once the daemon began shutting it down for good.
    pub fn is_closing(&self) -> bool {
        self.closing
    }

    /// True while it will start again on its own (after a stop or a backoff).
    pub fn wants_to_run(&self) -> bool {
        match self.phase {
            Phase::Spawning | Phase::Running { .. } | Phase::Backoff { .. } => true,
            Phase::Stopping { then, .. } => then != AfterStop::StayStopped,
            Phase::Stopped | Phase::Failed => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self.phase {
            Phase::Running { pid, .. } | Phase::Stopping { pid, .. } => Some(pid),
            Phase::Stopped | Phase::Failed | Phase::Spawning | Phase::Backoff { .. } => None,
        }
    }

    /// When the current process started, while it runs unasked to stop.
    pub fn running_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running { since, .. } => Some(since),
            _ => None,
        }
    }

    pub fn restarts(&self) -> u64 {
        self.restarts
    }

    pub fn requested_starts(&self) -> u64 {
        self.requested_starts
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.failures
    }

    pub fn last_exit(&self) -> Option<ExitReason> {
        self.last_exit
    }

    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Stopped because its process completed (ended by itself with code 0,
    /// not to be restarted), rather than stopped by a user or never run.
    pub fn completed(&self) -> bool {
        self.completed && self.phase == Phase::Stopped
    }

    /// When a restart waiting out its backoff is due.
    pub fn retry_at(&self) -> Option<Instant> {
        match self.phase {
            Phase::Backoff { until } => Some(until),
            _ => None,
        }
    }

    /// True once the current process is up (state `running`).
    pub fn is_ready(&self) -> bool {
        matches!(self.phase, Phase::Running { ready: true, .. })
    }

    /// The one timer this machine needs, if any: the end of a backoff, of
    /// a stop's grace period, or of a start's wait for readiness.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Backoff { until } => Some(until),
            Phase::Running {
                since,
                ready: false,
                ..
            } => Some(match self.policy.ready {
                ReadyWhen::Grace(grace) => since + grace,
                ReadyWhen::Signalled { timeout } => {
                    (since + timeout).max(self.start_extended_to.unwrap_or(since))
                }
            }),
            Phase::Stopping {
                deadline,
                killed: false,
                ..
            } => Some(deadline),
            _ => None,
        }
    }

    /// Base delay before restart number n+1 after n+1 consecutive failures:
    /// `min(initial·2^n, max)`, before jitter.
    pub fn backoff_base(backoff: &BackoffConfig, n: u32) -> Duration {
        let factor = 1u32.checked_shl(n).unwrap_or(u32::MAX);
        backoff
            .initial
            .checked_mul(factor)
            .unwrap_or(backoff.max)
            .min(backoff.max)
    }

    fn next_delay(&mut self) -> Duration {
        let base = Self::backoff_base(&self.policy.backoff, self.failures.saturating_sub(1));
        if self.jitter == 0.0 {
            return base;
        }
        let factor = 1.0 + self.jitter * (self.rng.f64() * 2.0 - 1.0);
        base.mul_f64(factor)
    }

    /// Every (input, phase) pair is spelled out: a new input or phase makes
    /// the compiler point at each transition that needs a decision.
    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        let mut out = Vec::new();
        match input {
            Input::Start | Input::AutoStart | Input::Restart if self.closing => {
                out.push(Effect::Refused);
            }
            Input::Start | Input::AutoStart => match self.phase {
                Phase::Stopped | Phase::Failed | Phase::Backoff { .. } => {
                    self.failures = 0;
                    if input == Input::Start {
                        self.requested_starts += 1;
                    }
                    self.spawn(&mut out);
                }
                Phase::Stopping { then, .. } => {
                    if then == AfterStop::StayStopped && input == Input::Start {
                        self.requested_starts += 1;
                    }
                    self.set_after_stop(AfterStop::Start);
                }
                // Already runs (or is being started): nothing to do.
                Phase::Running { .. } | Phase::Spawning => {}
            },
            Input::Restart => match self.phase {
                Phase::Stopped | Phase::Failed | Phase::Backoff { .. } => {
                    self.failures = 0;
                    self.requested_starts += 1;
                    self.spawn(&mut out);
                }
                Phase::Running { pid, .. } => {
                    self.requested_starts += 1;
                    self.begin_stop(pid, AfterStop::Start, now, &mut out);
                }
                Phase::Stopping { then, .. } => {
                    if then == AfterStop::StayStopped {
                        self.requested_starts += 1;
                    }
                    self.set_after_stop(AfterStop::Start);
                }
                // The spawn's answer comes before any command.
                Phase::Spawning => {}
            },
            Input::Stop | Input::Shutdown => {
                if input == Input::Shutdown {
                    self.closing = true;
                }
                match self.phase {
                    Phase::Running { pid, .. } => {
                        self.begin_stop(pid, AfterStop::StayStopped, now, &mut out);
                    }
                    Phase::Stopping { then, .. } => {
                        if then != AfterStop::StayStopped {
                            out.push(Effect::Publish(EventKind::StopRequested));
                        }
                        self.set_after_stop(AfterStop::StayStopped);
                    }
                    // Nothing runs (a backoff, or failed): stopped at once.
                    Phase::Backoff { .. } | Phase::Failed => {
                        self.phase = Phase::Stopped;
                        out.push(Effect::Publish(EventKind::StopRequested));
                        out.push(Effect::Publish(EventKind::Stopped));
                    }
                    Phase::Stopped | Phase::Spawning => {}
                }
            }
            Input::Kill => {
                self.closing = true;
                match self.phase {
                    Phase::Running { pid, .. } => {
                        out.push(Effect::Publish(EventKind::StopRequested));
                        self.kill(pid, now, &mut out);
                    }
                    Phase::Stopping { pid, killed, .. } => {
                        if killed {
                            self.set_after_stop(AfterStop::StayStopped);
                        } else {
                            self.kill(pid, now, &mut out);
                        }
                    }
                    Phase::Backoff { .. } | Phase::Failed => {
                        self.phase = Phase::Stopped;
                        out.push(Effect::Publish(EventKind::Stopped));
                    }
                    Phase::Stopped | Phase::Spawning => {}
                }
            }
            Input::Spawned { pid } => match self.phase {
                Phase::Spawning => {
                    self.last_error = None;
                    self.last_words = None;
                    self.start_extended_to = None;
                    let ready = self.policy.ready == ReadyWhen::Grace(Duration::ZERO);
                    self.phase = Phase::Running {
                        since: now,
                        pid,
                        ready,
                    };
                    out.push(Effect::Publish(EventKind::Started { pid }));
                }
                // Answers only ever follow a Spawn effect.
                Phase::Stopped
                | Phase::Failed
                | Phase::Running { .. }
                | Phase::Stopping { .. }
                | Phase::Backoff { .. } => {}
            },
            Input::SpawnFailed { error, permanent } => match self.phase {
                Phase::Spawning => {
                    // last_exit stays: it is the last process's, and a
                    // failed spawn made none.
                    out.push(Effect::Publish(EventKind::SpawnFailed {
                        error: error.clone(),
                    }));
                    let may_retry = !permanent && self.policy.restart != RestartPolicy::Never;
                    self.after_failure(error, may_retry, true, now, &mut out);
                }
                Phase::Stopped
                | Phase::Failed
                | Phase::Running { .. }
                | Phase::Stopping { .. }
                | Phase::Backoff { .. } => {}
            },
            Input::Exited(reason) => match self.phase {
                Phase::Running { since, ready, .. } => {
                    self.last_exit = Some(reason);
                    out.push(exited(reason, false));
                    let last_words = self.last_words.take();
                    if now.saturating_duration_since(since) >= self.policy.backoff.reset_after {
                        self.failures = 0;
                    }
                    let allowed = match self.policy.restart {
                        RestartPolicy::Always => true,
                        RestartPolicy::OnFailure => !reason.is_success(),
                        RestartPolicy::Never => false,
                    };
                    if !allowed && reason.is_success() {
                        self.last_error = None;
                        self.completed = true;
                        self.phase = Phase::Stopped;
                    } else {
                        let quick = now.saturating_duration_since(since) < QUICK_FAILURE;
                        let error = match (ready, last_words) {
                            (true, _) => reason.to_string(),
                            (false, None) => format!("{reason} while starting"),
                            (false, Some(words)) => {
                                format!("{reason} while starting; its last words: {words}")
                            }
                        };
                        self.after_failure(error, allowed, quick, now, &mut out);
                    }
                }
                Phase::Stopping { then, killed, .. } => {
                    self.last_exit = Some(reason);
                    // A stop that had to kill says so: the service ignores
                    // its stop signal, which its operator wants to know.
                    self.last_error = killed.then(|| {
                        format!(
                            "stopped with SIGKILL: still running {:?} (stop_timeout) after {}",
                            self.policy.stop_timeout,
                            self.policy.stop_signal.as_str()
                        )
                    });
                    self.last_words = None;
                    out.push(exited(reason, then != AfterStop::Fail));
                    let fault = self.fault.take();
                    match then {
                        AfterStop::Fail if !self.closing => {
                            let error = fault.unwrap_or_else(|| "it faulted".to_owned());
                            let allowed = self.policy.restart != RestartPolicy::Never;
                            self.after_failure(error, allowed, false, now, &mut out);
                        }
                        AfterStop::Fail => {
                            self.phase = Phase::Stopped;
                            out.push(Effect::Publish(EventKind::Stopped));
                        }
                        AfterStop::StayStopped => {
                            self.phase = Phase::Stopped;
                            out.push(Effect::Publish(EventKind::Stopped));
                        }
                        AfterStop::Start if self.closing => {
                            self.phase = Phase::Stopped;
                            out.push(Effect::Publish(EventKind::Stopped));
                        }
                        AfterStop::Start => {
                            self.failures = 0;
                            self.spawn(&mut out);
                        }
                    }
                }
                // No process: a stale report, and a stopped service must
                // never start by accident.
                Phase::Stopped | Phase::Failed | Phase::Spawning | Phase::Backoff { .. } => {}
            },
            Input::Timer => match self.phase {
                Phase::Running {
                    since,
                    pid,
                    ready: false,
                } if self.deadline().is_some_and(|deadline| now >= deadline) => {
                    match self.policy.ready {
                        ReadyWhen::Grace(_) => self.become_ready(since, pid, &mut out),
                        ReadyWhen::Signalled { timeout } => self.fault(
                            pid,
                            format!("not ready within {timeout:?} of its start"),
                            now,
                            &mut out,
                        ),
                    }
                }
                Phase::Backoff { until } if now >= until => {
                    self.restarts += 1;
                    self.spawn(&mut out);
                }
                Phase::Stopping {
                    pid,
                    then,
                    deadline,
                    killed: false,
                } if now >= deadline => {
                    self.phase = Phase::Stopping {
                        pid,
                        then,
                        deadline,
                        killed: true,
                    };
                    out.push(Effect::SignalGroup(Signal::SIGKILL));
                    out.push(Effect::Publish(EventKind::StopTimedOut));
                }
                // A timer that was overtaken (early, or for a phase since left).
                Phase::Backoff { .. }
                | Phase::Stopping { .. }
                | Phase::Stopped
                | Phase::Failed
                | Phase::Spawning
                | Phase::Running { .. } => {}
            },
            Input::Ready => match self.phase {
                Phase::Running {
                    since,
                    pid,
                    ready: false,
                } => self.become_ready(since, pid, &mut out),
                // Late (a stop began) or repeated: nothing changes.
                Phase::Running { ready: true, .. }
                | Phase::Stopping { .. }
                | Phase::Stopped
                | Phase::Failed
                | Phase::Spawning
                | Phase::Backoff { .. } => {}
            },
            Input::Faulted { reason } => match self.phase {
                Phase::Running { pid, .. } => self.fault(pid, reason, now, &mut out),
                // A stop is under way already, or nothing runs.
                Phase::Stopping { .. }
                | Phase::Stopped
                | Phase::Failed
                | Phase::Spawning
                | Phase::Backoff { .. } => {}
            },
            Input::LastWords(words) => {
                if let Phase::Running { .. } = self.phase {
                    self.last_words = Some(words);
                }
            }
            Input::ExtendStart(more) => {
                if let Phase::Running { ready: false, .. } = self.phase {
                    let until = now + more;
                    self.start_extended_to =
                        Some(self.start_extended_to.map_or(until, |at| at.max(until)));
                }
            }
        }
        out
    }

    /// The machine frozen for an upgrade: each deadline becomes the time
    /// left at `now`, each instant an age. Refused while a spawn is in
    /// flight (`Spawning`): the freeze waits for the spawn's answer, since
    /// only that answer names the process the new daemon must adopt.
    pub fn snapshot(&self, now: Instant) -> Result<MachineSnapshot, SnapshotError> {
        let phase = match self.phase {
            Phase::Stopped => PhaseSnapshot::Stopped,
            Phase::Failed => PhaseSnapshot::Failed,
            Phase::Spawning => return Err(SnapshotError::Spawning),
            Phase::Running { since, pid, ready } => PhaseSnapshot::Running {
                pid,
                ready,
                ran_for: now.saturating_duration_since(since),
                start_extended_to: self
                    .start_extended_to
                    .filter(|_| !ready)
                    .map(|to| to.saturating_duration_since(since)),
            },
            Phase::Stopping {
                pid,
                then,
                deadline,
                killed,
            } => PhaseSnapshot::Stopping {
                pid,
                then: match then {
                    AfterStop::StayStopped => AfterStopSnapshot::StayStopped,
                    AfterStop::Start => AfterStopSnapshot::Start,
                    AfterStop::Fail => AfterStopSnapshot::Fail,
                },
                remaining: deadline.saturating_duration_since(now),
                killed,
            },
            Phase::Backoff { until } => PhaseSnapshot::Backoff {
                remaining: until.saturating_duration_since(now),
            },
        };
        Ok(MachineSnapshot {
            phase,
            failures: self.failures,
            restarts: self.restarts,
            requested_starts: self.requested_starts,
            closing: self.closing,
            quick_failure_ages: self
                .quick_failures
                .iter()
                .map(|&at| now.saturating_duration_since(at))
                .collect(),
            last_exit: self.last_exit.map(Into::into),
            last_error: self.last_error.clone(),
            fault: self.fault.clone(),
            last_words: self.last_words.clone(),
            completed: self.completed,
        })
    }

    /// A frozen machine thawed at `now` (the instant the snapshot stands
    /// for in this process: `Handover::taken_at`), under `policy`: the same
    /// state and counters, every timer due after the time it had left.
    /// Jitter and its generator start afresh; they only shape later delays.
    pub fn restore(policy: Policy, snapshot: MachineSnapshot, now: Instant) -> Machine {
        // The monotonic clock is the system's, so an age never reaches
        // back before it starts; were it to, `now` is the lenient side.
        let ago = |age: Duration| now.checked_sub(age).unwrap_or(now);
        let mut start_extended_to = None;
        let phase = match snapshot.phase {
            PhaseSnapshot::Stopped => Phase::Stopped,
            PhaseSnapshot::Failed => Phase::Failed,
            PhaseSnapshot::Running {
                pid,
                ready,
                ran_for,
                start_extended_to: extended,
            } => {
                let since = ago(ran_for);
                start_extended_to = extended.map(|by| since + by);
                Phase::Running { since, pid, ready }
            }
            PhaseSnapshot::Stopping {
                pid,
                then,
                remaining,
                killed,
            } => Phase::Stopping {
                pid,
                then: match then {
                    AfterStopSnapshot::StayStopped => AfterStop::StayStopped,
                    AfterStopSnapshot::Start => AfterStop::Start,
                    AfterStopSnapshot::Fail => AfterStop::Fail,
                },
                deadline: now + remaining,
                killed,
            },
            PhaseSnapshot::Backoff { remaining } => Phase::Backoff {
                until: now + remaining,
            },
        };
        Machine {
            phase,
            failures: snapshot.failures,
            restarts: snapshot.restarts,
            requested_starts: snapshot.requested_starts,
            closing: snapshot.closing,
            quick_failures: snapshot.quick_failure_ages.into_iter().map(ago).collect(),
            last_exit: snapshot.last_exit.map(Into::into),
            last_error: snapshot.last_error,
            fault: snapshot.fault,
            last_words: snapshot.last_words,
            completed: snapshot.completed,
            start_extended_to,
            ..Machine::new(policy)
        }
    }

    fn become_ready(&mut self, since: Instant, pid: u32, out: &mut Vec<Effect>) {
        self.phase = Phase::Running {
            since,
            pid,
            ready: true,
        };
        out.push(Effect::Publish(EventKind::Ready));
    }

    /// Stop a process that must not go on; its end counts as a failure.
    fn fault(&mut self, pid: u32, reason: String, now: Instant, out: &mut Vec<Effect>) {
        out.push(Effect::Publish(EventKind::Faulted {
            reason: reason.clone(),
        }));
        self.fault = Some(reason);
        self.begin_stop(pid, AfterStop::Fail, now, out);
    }

    fn spawn(&mut self, out: &mut Vec<Effect>) {
        self.completed = false;
        self.phase = Phase::Spawning;
        out.push(Effect::Spawn);
    }

    fn begin_stop(&mut self, pid: u32, then: AfterStop, now: Instant, out: &mut Vec<Effect>) {
        self.phase = Phase::Stopping {
            pid,
            then,
            deadline: now + self.policy.stop_timeout,
            killed: false,
        };
        if then == AfterStop::StayStopped {
            out.push(Effect::Publish(EventKind::StopRequested));
        }
        out.push(Effect::SignalGroup(self.policy.stop_signal));
    }

    fn kill(&mut self, pid: u32, now: Instant, out: &mut Vec<Effect>) {
        self.phase = Phase::Stopping {
            pid,
            then: AfterStop::StayStopped,
            deadline: now,
            killed: true,
        };
        out.push(Effect::SignalGroup(Signal::SIGKILL));
    }

    fn set_after_stop(&mut self, after: AfterStop) {
        if let Phase::Stopping { then, .. } = &mut self.phase {
            *then = after;
        }
    }

    /// A run (or a spawn) failed: back off and retry, or give up. `quick`:
    /// it died at once (or never ran), which the start limit counts.
    fn after_failure(
        &mut self,
        error: String,
        may_retry: bool,
        quick: bool,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        if !may_retry {
            self.give_up(error, out);
            return;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures > self.policy.max_restarts {
            let restarts = self.policy.max_restarts;
            let plural = if restarts == 1 { "" } else { "s" };
            self.give_up(
                format!("gave up after {restarts} restart{plural}: {error}"),
                out,
            );
            return;
        }
        self.last_error = Some(error);
        let mut delay = self.next_delay();
        let start_limited = quick && self.count_quick_failure(now);
        if start_limited {
            delay = delay.max(START_LIMIT_DELAY);
        }
        self.phase = Phase::Backoff { until: now + delay };
        out.push(Effect::Publish(EventKind::RestartScheduled {
            delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            failures: self.failures,
            start_limited,
        }));
    }

    /// Notes a run that died at once; true when `burst` of them fell within
    /// the last `interval`: the start limit is hit.
    fn count_quick_failure(&mut self, now: Instant) -> bool {
        let limit = self.policy.start_limit;
        let window_start = now.checked_sub(limit.interval);
        while self
            .quick_failures
            .front()
            .is_some_and(|&at| window_start.is_some_and(|start| at <= start))
        {
            self.quick_failures.pop_front();
        }
        self.quick_failures.push_back(now);
        let burst = usize::try_from(limit.burst).unwrap_or(usize::MAX);
        while self.quick_failures.len() > burst {
            self.quick_failures.pop_front();
        }
        self.quick_failures.len() >= burst
    }

    fn give_up(&mut self, error: String, out: &mut Vec<Effect>) {
        out.push(Effect::Publish(EventKind::GaveUp {
            error: error.clone(),
        }));
        self.last_error = Some(error);
        self.phase = Phase::Failed;
    }
}

fn exited(reason: ExitReason, expected: bool) -> Effect {
    Effect::Publish(EventKind::Exited {
        reason: reason.to_string(),
        exit_code: reason.code(),
        expected,
    })
}
