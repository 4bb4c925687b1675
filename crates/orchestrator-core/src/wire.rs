//! The wire contract: every type that crosses the control API (and is kept
//! on disk as events), defined once here. The server, the CLI, the metrics
//! and the tests all speak these types; nothing on the wire is a free-form
//! string that a reader has to compare against a literal.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The state users see (SPEC section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Stopped,
    Starting,
    Running,
    /// A stop was asked for and the process has not ended yet.
    Stopping,
    /// Waiting out a backoff before the next start.
    Restarting,
    /// Gave up, or could not start and may not retry.
    Failed,
}

impl State {
    pub const ALL: [State; 6] = [
        State::Stopped,
        State::Starting,
        State::Running,
        State::Stopping,
        State::Restarting,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Stopped => "stopped",
            State::Starting => "starting",
            State::Running => "running",
            State::Stopping => "stopping",
            State::Restarting => "restarting",
            State::Failed => "failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A service's health beside its state; absent when it has no check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    Unknown,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// What the API and `status` report for one service (SPEC section 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub configured: bool,
    pub enabled: bool,
    pub state: State,
    pub pid: Option<u32>,
    /// Seconds the current process has run; `None` when there is none.
    pub uptime: Option<u64>,
    /// Restarts the daemon made after failures.
    pub restarts: u64,
    /// Starts and restarts that a user asked for (SPEC: a field of their own).
    #[serde(default)]
    pub requested_starts: u64,
    pub last_exit_code: Option<i32>,
    /// The signal that ended the last process (`SIGKILL`), when one did;
    /// `last_exit_code` is then 128 + its number, as a shell reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit_signal: Option<String>,
    pub last_error: Option<String>,
    /// Stopped because its process ended by itself with code 0 and is not
    /// restarted (a one-shot that is done), not because it was stopped.
    #[serde(default, skip_serializing_if = "is_false")]
    pub completed: bool,
    /// `None` when no check is set.
    pub health: Option<Health>,
    /// Output bytes the log file could not take (disk full...), in all.
    #[serde(default)]
    pub log_dropped_bytes: u64,
    /// The configuration generation it runs: 1 when first defined, +1 for
    /// each reload that changed it.
    #[serde(default = "first_generation")]
    pub generation: u64,
    /// Memory the service uses now, in bytes: its cgroup's count (page
    /// cache included) where it has one, else the resident memory of its
    /// process group. `None` when nothing runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU time its processes have used, in seconds: the cgroup's count,
    /// else that of the live processes of its process group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Times the kernel's OOM killer ended it since the daemon started.
    #[serde(default)]
    pub oom_kills: u64,
    /// Why it is in its state, when there is more to say: "waiting for db
    /// (healthy)", a dependency that failed, or the STATUS= it sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// sd_notify datagrams dropped since the daemon started: not sent by
    /// the service's own processes.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub notify_rejected: u64,
    /// Its `depends_on`: each service and the condition it waits for.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub depends_on: BTreeMap<String, crate::deps::Condition>,
}

fn is_false(flag: &bool) -> bool {
    !flag
}

fn is_zero(count: &u64) -> bool {
    *count == 0
}

fn first_generation() -> u64 {
    1
}

/// Which pipe of the child a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The daemon's own facts (`GET /v1/daemon`), beside its services'.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub version: String,
    /// The crash-recovery record (data_dir/state) could not be written at
    /// the last try: a daemon killed now could leave services unknown to
    /// the next one.
    pub state_stale: bool,
    /// Writes of that record that failed since the daemon started.
    pub state_failed_writes: u64,
    /// Events that events.jsonl lost (its writer was stuck); they stayed in
    /// memory and reached followers.
    pub events_file_dropped: u64,
    /// Upgrades this daemon process went through (`upgrade`, SIGUSR2):
    /// it grows when a new binary has taken over.
    #[serde(default)]
    pub upgrades: u64,
    /// Upgrades that were accepted (their dry run passed) but failed
    /// afterwards, leaving this binary running, with the last one's reason.
    #[serde(default)]
    pub upgrade_failures: u64,
    #[serde(default)]
    pub last_upgrade_error: Option<String>,
}

/// The answer to `POST /v1/upgrade` once the new binary passed its dry run
/// (202): the upgrade goes on in the background; the new daemon is the one
/// whose `GET /v1/daemon` shows `upgrades` past `upgrades` here, while
/// `upgrade_failures` past the one here means it failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeAccepted {
    pub from: String,
    /// The version the new binary reported in its dry run.
    pub to: String,
    pub binary: std::path::PathBuf,
    pub upgrades: u64,
    pub upgrade_failures: u64,
}

/// One record of a logs response (newline-delimited JSON): a line, or a
/// note that a slow follower missed some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LogRecord {
    Line {
        seq: u64,
        time: String,
        stream: Stream,
        /// Lossy UTF-8; the log file keeps the raw bytes.
        text: String,
    },
    Skipped {
        skipped: u64,
    },
}

/// What a reload did, per service (`POST /v1/reload`, the `reloaded` event).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReloadReport {
    pub applied: Vec<AppliedChange>,
    /// Changes that need a daemon restart, and other things the operator
    /// should know; the rest was applied anyway.
    #[serde(default)]
    pub warnings: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedChange {
    pub service: String,
    pub action: ChangeAction,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeAction {
    Added,
    Removed,
    Restarted,
    Updated,
    Unchanged,
}

/// Every error answer: a message for people, a code for programs. The CLI
/// chooses its exit code from `code`, never from the HTTP status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    pub code: ErrorCode,
}

/// The stable codes of error answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// No such route.
    NotFound,
    MethodNotAllowed,
    UnknownService,
    /// A path segment that is not a valid service name.
    BadName,
    /// A query parameter that does not parse.
    BadQuery,
    BodyTooLarge,
    /// The action was carried out and did not succeed (a start that failed).
    ActionFailed,
    ShuttingDown,
    /// A configuration that does not validate (reload).
    InvalidConfig,
    NotImplemented,
    /// TCP only: a Host header that names neither the listen address nor loopback.
    BadHost,
    /// TCP only: a missing or wrong bearer token.
    Unauthorized,
    /// Too many connections to the control API right now; try again.
    Busy,
    /// `POST /v1/upgrade`: the new binary failed its dry run, or an upgrade
    /// is under way already; nothing was changed.
    UpgradeRefused,
    /// A request body that does not parse.
    BadBody,
    /// A code this client does not know (a newer daemon).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The request itself was wrong (as opposed to the operation failing).
    pub fn is_usage(self) -> bool {
        matches!(
            self,
            ErrorCode::BadName
                | ErrorCode::BadQuery
                | ErrorCode::InvalidConfig
                | ErrorCode::BadBody
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event, across daemon restarts.
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    DaemonStarted {
        pid: u32,
    },
    DaemonStopping {
        reason: String,
    },
    /// The daemon was replaced in place by another binary (an upgrade):
    /// every service went on as it was.
    Upgraded {
        from: String,
        to: String,
    },
    Started {
        pid: u32,
    },
    SpawnFailed {
        error: String,
    },
    Exited {
        /// "exited with code 1", "killed by SIGKILL", ...
        reason: String,
        exit_code: i32,
        /// It was asked to stop.
        expected: bool,
    },
    RestartScheduled {
        delay_ms: u64,
        /// Consecutive failures so far (the n of the backoff).
        failures: u32,
        /// The start limit put a floor under the delay.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        start_limited: bool,
    },
    GaveUp {
        error: String,
    },
    /// The kernel's OOM killer ended it: it went past its memory limit.
    OomKilled {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        memory_limit_mib: Option<u64>,
    },
    /// A process left running by a daemon that died was stopped at start.
    LeftoverStopped {
        pid: u32,
    },
    /// The service's log file stopped taking lines (disk full, removed
    /// directory...): they still reach the daemon's log and `logs`.
    LogWriteFailed {
        path: String,
    },
    LogWriteResumed {
        path: String,
        /// Dropped from the file so far, in all.
        dropped_bytes: u64,
    },
    /// A starting process is up: start_grace passed, READY=1 came, or its
    /// health check passed for the first time.
    Ready,
    /// It runs but must not go on (unhealthy with on_unhealthy = restart,
    /// a silent watchdog, not ready within start_timeout): it is stopped
    /// and that counts as a failure.
    Faulted {
        reason: String,
    },
    /// The verdict of its health check changed.
    HealthChanged {
        health: Health,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    StopRequested,
    /// SIGKILL after stop_timeout.
    StopTimedOut,
    Stopped,
    ReloadFailed {
        errors: Vec<String>,
    },
    /// The task supervising the service ended unexpectedly (a bug): the
    /// service is no longer supervised.
    SupervisionLost {
        error: String,
    },
    /// The crash-recovery record (`data_dir/state`) cannot be written: a
    /// daemon killed now would leave the services started since unknown to
    /// the next one.
    StateWriteFailed {
        path: String,
        error: String,
    },
    StateWriteResumed {
        /// Writes that failed so far, in all.
        failed_writes: u64,
    },
    /// A file of data_dir that is not this daemon's (another owner, a
    /// symlink, a FIFO...) was set aside and not used.
    UntrustedFileIgnored {
        path: String,
        reason: String,
    },
    /// A reload was applied: what it did, per service.
    Reloaded {
        report: ReloadReport,
    },
}

impl Event {
    /// One line for humans: `TIME SERVICE what happened`.
    pub fn describe(&self) -> String {
        let service = self.service.as_deref().unwrap_or("-");
        let what = match &self.kind {
            EventKind::DaemonStarted { pid } => format!("daemon started (pid {pid})"),
            EventKind::DaemonStopping { reason } => format!("daemon stopping: {reason}"),
            EventKind::Upgraded { from, to } => {
                format!("daemon upgraded from {from} to {to}; every service went on as it was")
            }
            EventKind::Started { pid } => format!("started (pid {pid})"),
            EventKind::SpawnFailed { error } => format!("could not start: {error}"),
            EventKind::Exited {
                reason, expected, ..
            } => {
                if *expected {
                    format!("stopped: {reason}")
                } else {
                    format!("exited unexpectedly: {reason}")
                }
            }
            EventKind::RestartScheduled {
                delay_ms,
                failures,
                start_limited,
            } => {
                let limited = if *start_limited {
                    ", slowed: it keeps dying at once"
                } else {
                    ""
                };
                format!(
                    "restart in {} (failure {failures}{limited})",
                    seconds(*delay_ms)
                )
            }
            EventKind::GaveUp { error } => format!("gave up: {error}"),
            EventKind::OomKilled { memory_limit_mib } => match memory_limit_mib {
                Some(mib) => format!("killed by the OOM killer (memory_limit {mib} MiB)"),
                None => "killed by the OOM killer".to_owned(),
            },
            EventKind::LeftoverStopped { pid } => {
                format!("stopped pid {pid}, left running by a daemon that died")
            }
            EventKind::LogWriteFailed { path } => {
                format!(
                    "cannot write {path}; its lines are dropped from the file until it works again"
                )
            }
            EventKind::LogWriteResumed {
                path,
                dropped_bytes,
            } => format!("writing {path} again ({dropped_bytes} bytes dropped so far)"),
            EventKind::Ready => "ready".to_owned(),
            EventKind::Faulted { reason } => format!("stopping it as failed: {reason}"),
            EventKind::HealthChanged { health, detail } => match detail {
                Some(detail) => format!("{health}: {detail}"),
                None => health.to_string(),
            },
            EventKind::StopRequested => "stop requested".to_owned(),
            EventKind::StopTimedOut => "did not stop in time: sent SIGKILL".to_owned(),
            EventKind::Stopped => "stopped".to_owned(),
            EventKind::SupervisionLost { error } => {
                format!("no longer supervised (internal error): {error}")
            }
            EventKind::Reloaded { report } => {
                let changed = report
                    .applied
                    .iter()
                    .filter(|change| change.action != ChangeAction::Unchanged)
                    .count();
                let mut text = format!("reloaded: {changed} service(s) changed");
                for warning in &report.warnings {
                    text.push_str("; ");
                    text.push_str(warning);
                }
                text
            }
            EventKind::ReloadFailed { errors } => {
                format!("reload rejected: {}", errors.join("; "))
            }
            EventKind::StateWriteFailed { path, error } => format!(
                "cannot write {path}: {error}; a daemon killed now would leave services unknown to the next one"
            ),
            EventKind::StateWriteResumed { failed_writes } => {
                format!("state record written again ({failed_writes} writes failed so far)")
            }
            EventKind::UntrustedFileIgnored { path, reason } => {
                format!("ignored {path}: {reason}")
            }
        };
        format!("{}  {service}  {what}", self.time)
    }
}

/// Every delay in event text is in seconds, as `status` shows durations:
/// `1.1s`, `0.05s`, `30s` (no trailing zeros), never a mix of ms and s.
pub fn seconds(millis: u64) -> String {
    let whole = millis / 1000;
    match millis % 1000 {
        0 => format!("{whole}s"),
        part => {
            let fraction = format!("{part:03}");
            format!("{whole}.{}s", fraction.trim_end_matches('0'))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restart_text(delay_ms: u64) -> String {
        Event {
            seq: 1,
            time: "T".into(),
            service: Some("api".into()),
            kind: EventKind::RestartScheduled {
                delay_ms,
                failures: 2,
                start_limited: false,
            },
        }
        .describe()
    }

    #[test]
    fn delays_read_in_seconds_only() {
        assert_eq!(restart_text(1100), "T  api  restart in 1.1s (failure 2)");
        assert_eq!(restart_text(50), "T  api  restart in 0.05s (failure 2)");
        assert_eq!(restart_text(30_000), "T  api  restart in 30s (failure 2)");
        assert_eq!(restart_text(1234), "T  api  restart in 1.234s (failure 2)");
        assert_eq!(restart_text(0), "T  api  restart in 0s (failure 2)");
    }
}
