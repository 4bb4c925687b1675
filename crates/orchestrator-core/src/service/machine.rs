//! The lifecycle of one service as a pure state machine: inputs in, effects
//! out, time passed in as a value. No runtime, no I/O: tested as a table.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::config::{BackoffConfig, RestartPolicy};
use crate::process::ExitReason;

/// The state users see (SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Stopped,
    Starting,
    Running,
    /// Waiting out a backoff before the next start.
    Restarting,
    /// Gave up, or could not start and may not retry.
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Restarting => "restarting",
            State::Failed => "failed",
        }
    }
}

/// What the service's rules are; fixed for the life of the machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub restart: RestartPolicy,
    pub max_restarts: u32,
    pub backoff: BackoffConfig,
    pub stop_signal: Signal,
    pub stop_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// The user asks for it to run.
    Start,
    /// The user asks for it to stop.
    Stop,
    /// The user asks for a stop followed by a start.
    Restart,
    /// Stop at once, without grace (a second Ctrl-C).
    Kill,
    /// The requested spawn succeeded.
    Spawned { pid: u32 },
    /// The requested spawn failed; the message says why.
    SpawnFailed { error: String },
    /// The process ended (and was reaped).
    Exited(ExitReason),
    /// The deadline from [`Machine::deadline`] passed.
    Timer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Start a new process; answer with `Spawned` or `SpawnFailed` before
    /// any other input.
    Spawn,
    /// Send this signal to the process group.
    SignalGroup(Signal),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterStop {
    StayStopped,
    Start,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Stopped,
    Failed,
    /// A Spawn effect is out; its answer comes next.
    Spawning,
    Running {
        since: Instant,
        pid: u32,
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
    /// Every spawn after the first one.
    restarts: u64,
    spawned_once: bool,
    last_exit: Option<ExitReason>,
    last_error: Option<String>,
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
            spawned_once: false,
            last_exit: None,
            last_error: None,
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

    pub fn state(&self) -> State {
        match self.phase {
            Phase::Stopped => State::Stopped,
            Phase::Failed => State::Failed,
            Phase::Spawning => State::Starting,
            // The process is alive until it has been reaped, whatever we asked of it.
            Phase::Running { .. } | Phase::Stopping { .. } => State::Running,
            Phase::Backoff { .. } => State::Restarting,
        }
    }

    /// True while a stop is in progress (the process is still alive).
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// True while it will start again on its own (after a stop or a backoff).
    pub fn wants_to_run(&self) -> bool {
        match self.phase {
            Phase::Spawning | Phase::Running { .. } | Phase::Backoff { .. } => true,
            Phase::Stopping { then, .. } => then == AfterStop::Start,
            Phase::Stopped | Phase::Failed => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self.phase {
            Phase::Running { pid, .. } | Phase::Stopping { pid, .. } => Some(pid),
            _ => None,
        }
    }

    /// When the current process started, while there is one.
    pub fn running_since(&self) -> Option<Instant> {
        match self.phase {
            Phase::Running { since, .. } => Some(since),
            _ => None,
        }
    }

    pub fn restarts(&self) -> u64 {
        self.restarts
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

    /// The one timer this machine needs, if any: the end of a backoff or
    /// of a stop's grace period.
    pub fn deadline(&self) -> Option<Instant> {
        match self.phase {
            Phase::Backoff { until } => Some(until),
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

    pub fn step(&mut self, input: Input, now: Instant) -> Vec<Effect> {
        match (self.phase, input) {
            (Phase::Stopped | Phase::Failed, Input::Start | Input::Restart) => {
                self.failures = 0;
                self.spawn()
            }
            (Phase::Backoff { .. }, Input::Start | Input::Restart) => {
                self.failures = 0;
                self.spawn()
            }
            (Phase::Running { .. } | Phase::Spawning, Input::Start) => Vec::new(),
            (Phase::Running { pid, .. }, Input::Restart) => {
                self.begin_stop(pid, AfterStop::Start, now)
            }
            (Phase::Stopping { .. }, Input::Start | Input::Restart) => {
                self.set_after_stop(AfterStop::Start);
                Vec::new()
            }

            (Phase::Running { pid, .. }, Input::Stop) => {
                self.begin_stop(pid, AfterStop::StayStopped, now)
            }
            (Phase::Stopping { .. }, Input::Stop) => {
                self.set_after_stop(AfterStop::StayStopped);
                Vec::new()
            }
            (Phase::Backoff { .. } | Phase::Failed, Input::Stop | Input::Kill) => {
                self.phase = Phase::Stopped;
                Vec::new()
            }
            (Phase::Stopped, Input::Stop | Input::Kill) => Vec::new(),

            (Phase::Running { pid, .. }, Input::Kill) => {
                self.phase = Phase::Stopping {
                    pid,
                    then: AfterStop::StayStopped,
                    deadline: now,
                    killed: true,
                };
                vec![Effect::SignalGroup(Signal::SIGKILL)]
            }
            (Phase::Stopping { pid, killed, .. }, Input::Kill) => {
                self.phase = Phase::Stopping {
                    pid,
                    then: AfterStop::StayStopped,
                    deadline: now,
                    killed: true,
                };
                if killed {
                    Vec::new()
                } else {
                    vec![Effect::SignalGroup(Signal::SIGKILL)]
                }
            }

            (Phase::Spawning, Input::Spawned { pid }) => {
                self.last_error = None;
                self.phase = Phase::Running { since: now, pid };
                Vec::new()
            }
            (Phase::Spawning, Input::SpawnFailed { error }) => {
                self.last_exit = None;
                let may_retry = self.policy.restart != RestartPolicy::Never;
                self.after_failure(error, may_retry, now)
            }

            (Phase::Running { since, .. }, Input::Exited(reason)) => {
                self.last_exit = Some(reason);
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
                    self.phase = Phase::Stopped;
                    return Vec::new();
                }
                self.after_failure(reason.to_string(), allowed, now)
            }
            (Phase::Stopping { then, .. }, Input::Exited(reason)) => {
                self.last_exit = Some(reason);
                self.last_error = None;
                match then {
                    AfterStop::StayStopped => {
                        self.phase = Phase::Stopped;
                        Vec::new()
                    }
                    AfterStop::Start => {
                        self.failures = 0;
                        self.spawn()
                    }
                }
            }

            (Phase::Backoff { until }, Input::Timer) if now >= until => self.spawn(),
            (
                Phase::Stopping {
                    pid,
                    then,
                    deadline,
                    killed: false,
                },
                Input::Timer,
            ) if now >= deadline => {
                self.phase = Phase::Stopping {
                    pid,
                    then,
                    deadline,
                    killed: true,
                };
                vec![Effect::SignalGroup(Signal::SIGKILL)]
            }

            // Anything else is stale or impossible (a timer that was
            // overtaken, an exit with no process): ignoring it is the safe
            // answer, since a stopped service must never start by accident.
            _ => Vec::new(),
        }
    }

    fn spawn(&mut self) -> Vec<Effect> {
        if self.spawned_once {
            self.restarts += 1;
        }
        self.spawned_once = true;
        self.phase = Phase::Spawning;
        vec![Effect::Spawn]
    }

    fn begin_stop(&mut self, pid: u32, then: AfterStop, now: Instant) -> Vec<Effect> {
        self.phase = Phase::Stopping {
            pid,
            then,
            deadline: now + self.policy.stop_timeout,
            killed: false,
        };
        vec![Effect::SignalGroup(self.policy.stop_signal)]
    }

    fn set_after_stop(&mut self, after: AfterStop) {
        if let Phase::Stopping { then, .. } = &mut self.phase {
            *then = after;
        }
    }

    /// A run (or a spawn) failed: back off and retry, or give up.
    fn after_failure(&mut self, error: String, may_retry: bool, now: Instant) -> Vec<Effect> {
        if !may_retry {
            self.last_error = Some(error);
            self.phase = Phase::Failed;
            return Vec::new();
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures > self.policy.max_restarts {
            self.last_error = Some(format!(
                "gave up after {} restart{}: {error}",
                self.policy.max_restarts,
                if self.policy.max_restarts == 1 {
                    ""
                } else {
                    "s"
                }
            ));
            self.phase = Phase::Failed;
            return Vec::new();
        }
        self.last_error = Some(error);
        let delay = self.next_delay();
        self.phase = Phase::Backoff { until: now + delay };
        Vec::new()
    }
}
