//! The in-place upgrade's hand-over (docs/upgrade.md): the versioned JSON
//! document the old daemon writes into a memfd before it execs the new
//! binary, the descriptors it keeps open across that exec, and the dry run
//! that checks the new binary before anything changes.
//!
//! Compatibility rule: a reader accepts the `format` values it knows and
//! ignores fields it does not; every field added after version 1 carries
//! `#[serde(default)]`, so a daemon of version N+1 reads N's document. A
//! change an old reader would misread bumps [`FORMAT`].
//!
//! Every serialized type lives here, not beside the code it mirrors (the
//! machine's phase, an exit reason): the format is visible, and reviewed, in
//! one file.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{FcntlArg, FdFlag, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::time::Instant;

use crate::output::LogLine;
use crate::process::ExitReason;
use crate::wire::{Health, Stream};

mod dry_run;
#[cfg(test)]
mod tests;

pub use dry_run::{DryRunError, dry_run};

/// The hand-over format this build writes, and the only one it reads.
pub const FORMAT: u32 = 1;

/// The formats this build reads. Version N+1 keeps N here as long as it can
/// still make sense of N's documents.
pub const READABLE_FORMATS: &[u32] = &[1];

/// A larger document is refused unread: even a thousand services with full
/// rings of recent lines stay far below it, so it can only be a wrong fd.
pub const MAX_DOCUMENT_BYTES: u64 = 256 * 1024 * 1024;

/// Everything the old daemon hands to the new one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handover {
    /// Bumped on a change an older reader would misread.
    pub format: u32,
    /// The old daemon's version (for the `upgraded {from, to}` event).
    pub from_version: String,
    /// Wall-clock time of the writing: timers are stored as remaining
    /// durations and the exec takes time; see [`Handover::taken_at`].
    pub written_at_unix_ms: u64,
    /// The `--config` the old daemon ran with.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// Every descriptor kept open across the exec, by name: "daemon_lock",
    /// "daemon_lock_name", "parent_lock", "api_unix", "api_tcp", and per
    /// service "NAME.stdout", "NAME.stderr", "NAME.pidfd", "NAME.notify".
    #[serde(default)]
    pub fds: BTreeMap<String, RawFd>,
    #[serde(default)]
    pub services: Vec<ServiceHandover>,
    /// The sequence number the next event takes, so the history goes on
    /// without a gap or a repeat even when events.jsonl missed some (or
    /// there is none); `None`: from events.jsonl, as at any start.
    #[serde(default)]
    pub next_event_seq: Option<u64>,
    /// The guardian the old daemon started (its control pipe is the fd
    /// "guardian"): the new daemon dismisses it at a clean shutdown and
    /// warns if it ends.
    #[serde(default)]
    pub guardian_pid: Option<u32>,
    /// The cgroup parent the old daemon claimed (maybe its fallback name),
    /// whose lock is the fd "parent_lock": taken as it is, not claimed anew.
    #[serde(default)]
    pub cgroup_parent: Option<PathBuf>,
    /// Upgrades this daemon process has gone through, this one included:
    /// `GET /v1/daemon` shows it, so `upgrade` tells the new daemon from
    /// the old one even when both are the same version.
    #[serde(default)]
    pub upgrades: u64,
    /// The open-files soft limit the first daemon started with, before it
    /// raised its own: services get it back, not the raised one the new
    /// image starts with. `None`: not recorded (an older writer).
    #[serde(default)]
    pub original_nofile: Option<u64>,
}

/// One service, frozen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceHandover {
    pub name: String,
    /// The spec generation it runs (a reload bumps it).
    pub generation: u64,
    pub machine: MachineSnapshot,
    /// The process it runs, released (not killed) by the old daemon.
    #[serde(default)]
    pub child: Option<ReleasedChildInfo>,
    /// Bytes of an unfinished line per stream, read but not yet framed.
    #[serde(default)]
    pub partial: Partials,
    /// The ring of recent lines, oldest first, with their seq numbers.
    #[serde(default)]
    pub recent: Vec<RecentLine>,
    #[serde(default)]
    pub health: Option<Health>,
    /// Its output's line and dropped-byte counts, continued by the next.
    #[serde(default)]
    pub output: crate::output::OutputCounters,
    /// CLOCK_MONOTONIC (nanoseconds) when `machine` was taken: the clock is
    /// the system's, the same on both sides of the exec and unmoved by a
    /// wall-clock change, so each timer resumes with exactly the time that
    /// passed since its own freeze. `None` (an older writer): the time
    /// since `written_at_unix_ms` is taken instead.
    #[serde(default)]
    pub frozen_at_monotonic_ns: Option<u64>,
    /// The last STATUS= its process sent over sd_notify (status shows it).
    #[serde(default)]
    pub notify_status: Option<String>,
}

/// CLOCK_MONOTONIC now, in nanoseconds (see
/// [`ServiceHandover::frozen_at_monotonic_ns`]).
pub fn monotonic_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// One service frozen for an upgrade, as the old daemon hands it over and
/// the new one resumes it: its plain data and its descriptors (each `None`
/// where there is none: no process, a stream that had ended, no notify).
#[derive(Debug)]
pub struct FrozenService {
    pub service: ServiceHandover,
    pub pidfd: Option<std::os::fd::OwnedFd>,
    pub stdout: Option<std::os::fd::OwnedFd>,
    pub stderr: Option<std::os::fd::OwnedFd>,
    /// Its sd_notify socket (bound to the name in its NOTIFY_SOCKET).
    pub notify: Option<std::os::fd::OwnedFd>,
    /// The version of the daemon that froze it (`Handover::from_version`
    /// after an exec): the `from` of the `upgraded` event. `None`: unknown.
    pub from_version: Option<String>,
    /// The wall-clock time its snapshot stands for (`written_at_unix_ms`
    /// after an exec): every timer of the machine counts the time since.
    /// `None`: taken as just now.
    pub frozen_at: Option<SystemTime>,
}

impl FrozenService {
    /// The instant of this process's clock the snapshot stands for: now
    /// minus the time since its freeze (CLOCK_MONOTONIC when the writer
    /// recorded it, else the wall time since `frozen_at`).
    pub fn taken_at(&self, now: Instant) -> Instant {
        if let Some(frozen_ns) = self.service.frozen_at_monotonic_ns {
            let since = Duration::from_nanos(monotonic_ns().saturating_sub(frozen_ns));
            return now.checked_sub(since).unwrap_or(now);
        }
        let Some(frozen_at) = self.frozen_at else {
            return now;
        };
        let since = SystemTime::now()
            .duration_since(frozen_at)
            .unwrap_or_default();
        now.checked_sub(since).unwrap_or(now)
    }
}

impl FrozenService {
    /// Its descriptors, each with the part it is.
    fn named_fds(&self) -> Vec<(&'static str, BorrowedFd<'_>)> {
        [
            ("pidfd", &self.pidfd),
            ("stdout", &self.stdout),
            ("stderr", &self.stderr),
            ("notify", &self.notify),
        ]
        .into_iter()
        .filter_map(|(part, fd)| fd.as_ref().map(|fd| (part, fd.as_fd())))
        .collect()
    }

    /// Every descriptor it holds: those an upgrade keeps across its exec.
    pub fn fds(&self) -> Vec<BorrowedFd<'_>> {
        self.named_fds().into_iter().map(|(_, fd)| fd).collect()
    }
}

/// The plain-data half of a released child (its descriptors are in
/// [`Handover::fds`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReleasedChildInfo {
    pub pid: u32,
    /// Its process group (the group signals go to).
    pub pgid: u32,
    /// Its cgroup directory, when it has one.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// The old daemon SIGKILLed it already: its end is not the OOM killer's.
    #[serde(default)]
    pub killed_by_us: bool,
    /// The cgroup's oom_kill count at its start, to tell an OOM kill later.
    #[serde(default)]
    pub oom_kills_at_start: u64,
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
}

impl ReleasedChildInfo {
    /// What a spawner adopts: this, with the pidfd handed over beside it
    /// (its pipes are resumed apart, by the pump).
    pub fn into_released(self, pidfd: Option<OwnedFd>) -> crate::process::Released {
        crate::process::Released {
            pid: self.pid,
            cgroup: self.cgroup,
            killed_by_us: self.killed_by_us,
            oom_kills_at_start: self.oom_kills_at_start,
            memory_limit_mib: self.memory_limit_mib,
            pidfd,
            output: None,
        }
    }
}

/// Unterminated output per stream. `Vec<u8>` is a JSON array of numbers:
/// bulky, but a partial line is short and serde_json needs no extra crate.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partials {
    #[serde(default)]
    pub stdout: Vec<u8>,
    #[serde(default)]
    pub stderr: Vec<u8>,
}

/// One line of the recent ring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentLine {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub stream: Stream,
    /// Raw bytes, without the `\n`.
    pub bytes: Vec<u8>,
}

impl From<&LogLine> for RecentLine {
    fn from(line: &LogLine) -> Self {
        RecentLine {
            seq: line.seq,
            time_unix_ms: unix_ms(line.time),
            stream: line.stream,
            bytes: line.text.clone(),
        }
    }
}

impl From<RecentLine> for LogLine {
    fn from(line: RecentLine) -> Self {
        LogLine {
            seq: line.seq,
            time: UNIX_EPOCH + Duration::from_millis(line.time_unix_ms),
            stream: line.stream,
            text: line.bytes,
        }
    }
}

/// A service's state machine, frozen: its phase with each timer as the time
/// left, its counters, and what it remembers of the last run. Written by
/// `Machine::snapshot`, read by `Machine::restore`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineSnapshot {
    pub phase: PhaseSnapshot,
    /// Consecutive failures (the n of the backoff formula).
    pub failures: u32,
    pub restarts: u64,
    pub requested_starts: u64,
    /// The daemon began shutting it down: no start is accepted any more.
    #[serde(default)]
    pub closing: bool,
    /// How long ago each recent quick failure was, oldest first.
    #[serde(default)]
    pub quick_failure_ages: Vec<Duration>,
    #[serde(default)]
    pub last_exit: Option<ExitReasonSnapshot>,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Why the machine is stopping the process, in a fault's stop.
    #[serde(default)]
    pub fault: Option<String>,
    #[serde(default)]
    pub last_words: Option<String>,
    /// Stopped because its process completed (a one-shot that is done).
    #[serde(default)]
    pub completed: bool,
}

/// The phase of a frozen machine. There is no `Spawning`: a freeze waits
/// for the spawn's answer first, since a process may have been created
/// that only that answer names, and the new daemon must know its pid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum PhaseSnapshot {
    Stopped,
    Failed,
    Running {
        pid: u32,
        /// Up (state `running`) rather than `starting`.
        ready: bool,
        /// How long it had run when frozen.
        ran_for: Duration,
        /// EXTEND_TIMEOUT_USEC: its readiness deadline is at least this
        /// long after its start. Counted from the start, not from the
        /// freeze, so the shift is exact even once it has passed.
        #[serde(default)]
        start_extended_to: Option<Duration>,
    },
    Stopping {
        pid: u32,
        then: AfterStopSnapshot,
        /// Left of the stop's grace before SIGKILL (zero once `killed`).
        remaining: Duration,
        killed: bool,
    },
    Backoff {
        /// Left of the backoff before the restart.
        remaining: Duration,
    },
}

/// What follows a stop in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterStopSnapshot {
    StayStopped,
    Start,
    /// A fault's stop: the end counts as a failure.
    Fail,
}

/// [`ExitReason`] on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReasonSnapshot {
    Exited {
        code: i32,
    },
    Signaled {
        signal: i32,
        core_dumped: bool,
    },
    OomKilled {
        #[serde(default)]
        memory_limit_mib: Option<u64>,
    },
}

impl From<ExitReason> for ExitReasonSnapshot {
    fn from(reason: ExitReason) -> Self {
        match reason {
            ExitReason::Exited(code) => ExitReasonSnapshot::Exited { code },
            ExitReason::Signaled {
                signal,
                core_dumped,
            } => ExitReasonSnapshot::Signaled {
                signal,
                core_dumped,
            },
            ExitReason::OomKilled { memory_limit_mib } => {
                ExitReasonSnapshot::OomKilled { memory_limit_mib }
            }
        }
    }
}

impl From<ExitReasonSnapshot> for ExitReason {
    fn from(reason: ExitReasonSnapshot) -> Self {
        match reason {
            ExitReasonSnapshot::Exited { code } => ExitReason::Exited(code),
            ExitReasonSnapshot::Signaled {
                signal,
                core_dumped,
            } => ExitReason::Signaled {
                signal,
                core_dumped,
            },
            ExitReasonSnapshot::OomKilled { memory_limit_mib } => {
                ExitReason::OomKilled { memory_limit_mib }
            }
        }
    }
}

/// A machine that cannot be frozen now.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SnapshotError {
    #[error(
        "a spawn is in flight: the freeze must wait for its answer (Spawned or SpawnFailed) before taking the snapshot (a bug in the freeze)"
    )]
    Spawning,
}

#[derive(Debug, Error)]
pub enum HandoverError {
    #[error(
        "cannot create the hand-over memfd: {0}; the upgrade is abandoned and the daemon goes on as before (is memfd_create allowed here, e.g. by a seccomp filter?)"
    )]
    Memfd(#[source] nix::Error),
    #[error(
        "cannot encode the hand-over: {0}; the upgrade is abandoned and the daemon goes on as before (a bug: please report it)"
    )]
    Encode(#[source] serde_json::Error),
    #[error(
        "cannot write the hand-over into its memfd: {0}; the upgrade is abandoned and the daemon goes on as before (is memory short?)"
    )]
    Write(#[source] io::Error),
    #[error(
        "cannot read the hand-over from fd {fd}: {source}; start the daemon without --handover (services are then cleaned up as after a crash)"
    )]
    Read {
        fd: RawFd,
        #[source]
        source: io::Error,
    },
    #[error(
        "the hand-over on fd {fd} is larger than {max} bytes: not a hand-over; start the daemon without --handover (services are then cleaned up as after a crash)"
    )]
    TooLarge { fd: RawFd, max: u64 },
    #[error(
        "the hand-over would be {size} bytes, more than the {max} a new daemon reads (services' recent lines take most of it); nothing was changed: the daemon goes on"
    )]
    WouldBeTooLarge { size: u64, max: u64 },
    #[error(
        "the hand-over on fd {fd} is not a hand-over document: {source}; start the daemon without --handover (services are then cleaned up as after a crash)"
    )]
    Parse {
        fd: RawFd,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the hand-over is in format {found} (written by orchestrator {from_version}), but orchestrator {ours} reads format {readable} only: upgrade to a binary that reads format {found} (a newer one), or start this one without --handover (services are then cleaned up as after a crash)"
    )]
    UnknownFormat {
        found: u32,
        from_version: String,
        ours: &'static str,
        readable: String,
    },
    #[error(
        "the hand-over names two descriptors \"{name}\": a bug in the old daemon; the upgrade is abandoned"
    )]
    DuplicateFd { name: String },
    #[error(
        "the hand-over names no descriptor \"{name}\" (it has {known}): the old daemon did not keep it; that part is set up anew or the upgrade cannot resume it"
    )]
    MissingFd { name: String, known: String },
    #[error(
        "the hand-over's descriptor \"{name}\" (fd {fd}) is not open in this process: {source}; was the daemon started with --handover by hand? Start it without --handover (services are then cleaned up as after a crash)"
    )]
    ClosedFd {
        name: String,
        fd: RawFd,
        #[source]
        source: nix::Error,
    },
}

impl Handover {
    /// An empty document of this build's format, stamped now.
    pub fn new(from_version: impl Into<String>, config: Option<PathBuf>) -> Self {
        Handover {
            format: FORMAT,
            from_version: from_version.into(),
            written_at_unix_ms: unix_ms(SystemTime::now()),
            config,
            fds: BTreeMap::new(),
            services: Vec::new(),
            next_event_seq: None,
            guardian_pid: None,
            cgroup_parent: None,
            upgrades: 0,
            original_nofile: None,
        }
    }

    /// Adds a frozen service: a copy of its plain data to `services`, and
    /// each of its descriptors to `fds` as "svc.NAME.pidfd",
    /// "svc.NAME.stdout", "svc.NAME.stderr", "svc.NAME.notify". The caller
    /// keeps `frozen` (its descriptors open, FD_CLOEXEC cleared with
    /// [`keep_across_exec`] on [`FrozenService::fds`]) until the exec, and
    /// resumes it itself if the exec fails.
    pub fn add_service(&mut self, frozen: &FrozenService) -> Result<(), HandoverError> {
        for (part, fd) in frozen.named_fds() {
            self.add_fd(service_fd_name(&frozen.service.name, part), fd)?;
        }
        self.services.push(frozen.service.clone());
        Ok(())
    }

    /// Takes every service of the document with its descriptors (those the
    /// old daemon named for it; a part it did not name is `None`). Only in
    /// the process that received the document across an exec, as
    /// [`Handover::take_fd`].
    pub fn take_services(&mut self) -> Result<Vec<FrozenService>, HandoverError> {
        let services = std::mem::take(&mut self.services);
        let mut frozen = Vec::with_capacity(services.len());
        for service in services {
            let mut part = |part: &str| -> Result<Option<OwnedFd>, HandoverError> {
                let name = service_fd_name(&service.name, part);
                if !self.fds.contains_key(&name) {
                    return Ok(None);
                }
                self.take_fd(&name).map(Some)
            };
            let pidfd = part("pidfd")?;
            let stdout = part("stdout")?;
            let stderr = part("stderr")?;
            let notify = part("notify")?;
            frozen.push(FrozenService {
                service,
                pidfd,
                stdout,
                stderr,
                notify,
                // Timers are shifted by the time since the old daemon wrote
                // the document; `upgraded` says which version it was.
                from_version: Some(self.from_version.clone()),
                frozen_at: Some(UNIX_EPOCH + Duration::from_millis(self.written_at_unix_ms)),
            });
        }
        Ok(frozen)
    }

    /// Names `fd` in the document. The caller keeps it open (and clears its
    /// FD_CLOEXEC with [`keep_across_exec`]) until the exec.
    pub fn add_fd(
        &mut self,
        name: impl Into<String>,
        fd: BorrowedFd<'_>,
    ) -> Result<(), HandoverError> {
        let name = name.into();
        if self.fds.contains_key(&name) {
            return Err(HandoverError::DuplicateFd { name });
        }
        self.fds.insert(name, fd.as_raw_fd());
        Ok(())
    }

    /// Takes the descriptor the old daemon named `name` as this process's
    /// own, once (the entry is removed), and sets its FD_CLOEXEC again: the
    /// services this daemon spawns later must not inherit it.
    ///
    /// Only for the process that received this document across an exec:
    /// there the numbers belong to nothing else; anywhere else a number may
    /// be another owner's descriptor.
    pub fn take_fd(&mut self, name: &str) -> Result<OwnedFd, HandoverError> {
        let Some(fd) = self.fds.remove(name) else {
            return Err(HandoverError::MissingFd {
                name: name.to_owned(),
                known: self.known_fds(),
            });
        };
        let closed = |source| HandoverError::ClosedFd {
            name: name.to_owned(),
            fd,
            source,
        };
        // SAFETY: F_GETFD on any number is sound: a closed one is EBADF.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags < 0 {
            return Err(closed(nix::Error::last()));
        }
        // SAFETY: the number is open (F_GETFD succeeded) and, in the process
        // that received the hand-over, owned by nothing else: the old daemon
        // kept it across the exec for us, and the entry was just removed so
        // it is taken at most once.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let flags = FdFlag::from_bits_retain(flags);
        // Usually marked already (the daemon marks every inherited one at
        // once): thousands are taken during a switch.
        if !flags.contains(FdFlag::FD_CLOEXEC) {
            fcntl(owned.as_fd(), FcntlArg::F_SETFD(flags | FdFlag::FD_CLOEXEC)).map_err(closed)?;
        }
        Ok(owned)
    }

    /// Takes every descriptor still named, once the resume has taken what it
    /// knows: names this build does not use (an older writer's extras) are
    /// closed by dropping them, rather than held open for the daemon's life.
    pub fn take_remaining_fds(&mut self) -> Vec<(String, Result<OwnedFd, HandoverError>)> {
        let names: Vec<String> = self.fds.keys().cloned().collect();
        names
            .into_iter()
            .map(|name| {
                let fd = self.take_fd(&name);
                (name, fd)
            })
            .collect()
    }

    /// The point in this process's clock the document was written at: now
    /// minus the wall time since `written_at_unix_ms` (none if the wall
    /// clock went back). `Machine::restore` takes it as `now`, so the exec's
    /// own duration counts against every timer.
    pub fn taken_at(&self, now: Instant) -> Instant {
        let since = unix_ms(SystemTime::now()).saturating_sub(self.written_at_unix_ms);
        now.checked_sub(Duration::from_millis(since)).unwrap_or(now)
    }

    fn known_fds(&self) -> String {
        if self.fds.is_empty() {
            return "none".to_owned();
        }
        self.fds
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The name of a service's descriptor in [`Handover::fds`].
pub fn service_fd_name(service: &str, part: &str) -> String {
    format!("svc.{service}.{part}")
}

/// Reads the hand-over document from descriptor `fd`, the number the old
/// daemon put on our command line (`run --handover FD`). Call it first
/// thing, before any thread starts: the number is checked to be open, then
/// owned (and closed once read).
pub fn read_inherited(fd: RawFd) -> Result<Handover, HandoverError> {
    // SAFETY: F_GETFD on any number is sound: a closed one is EBADF.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(HandoverError::ClosedFd {
            name: "handover".to_owned(),
            fd,
            source: nix::Error::last(),
        });
    }
    // SAFETY: the number is open (F_GETFD succeeded) and, in the process
    // the old daemon exec'ed with `--handover FD`, owned by nothing else:
    // it names the memfd that daemon kept across the exec for us, and it is
    // taken once, here, before any other code of ours opens anything.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    read_fd(owned)
}

/// Writes `handover` as JSON into a new memfd, sealed against change and
/// rewound, with FD_CLOEXEC cleared: ready to be named on the new binary's
/// command line. Blocking, but on memory only (no disk): fine from the
/// freeze's last step.
pub fn write_memfd(handover: &Handover) -> Result<OwnedFd, HandoverError> {
    let json = serde_json::to_vec(handover).map_err(HandoverError::Encode)?;
    // Refused here, before the exec, not by the new daemon after it (which
    // could only exit and leave the services to the guardian).
    let size = json.len() as u64;
    if size > MAX_DOCUMENT_BYTES {
        return Err(HandoverError::WouldBeTooLarge {
            size,
            max: MAX_DOCUMENT_BYTES,
        });
    }
    // Created close-on-exec and opened up only at the end: a process spawned
    // meanwhile (a health probe still ending) must not inherit it.
    let fd = memfd_create(
        c"orchestrator-handover",
        MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING,
    )
    .map_err(HandoverError::Memfd)?;
    let mut file = File::from(fd);
    file.write_all(&json).map_err(HandoverError::Write)?;
    // Sealed: the reader gets exactly what was written, whoever else holds it.
    fcntl(
        file.as_fd(),
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_SEAL,
        ),
    )
    .map_err(|errno| HandoverError::Write(errno.into()))?;
    file.seek(SeekFrom::Start(0))
        .map_err(HandoverError::Write)?;
    let fd = OwnedFd::from(file);
    keep_across_exec(&[fd.as_fd()]).map_err(HandoverError::Write)?;
    Ok(fd)
}

/// Reads a hand-over document from `fd` (the memfd named by `--handover`),
/// refusing a format this build does not know before looking further.
/// Blocking, on memory: call it before the runtime starts or from
/// `spawn_blocking`.
pub fn read_fd(fd: OwnedFd) -> Result<Handover, HandoverError> {
    read_bounded(fd, MAX_DOCUMENT_BYTES)
}

fn read_bounded(fd: OwnedFd, max: u64) -> Result<Handover, HandoverError> {
    let raw = fd.as_raw_fd();
    let mut file = File::from(fd);
    let read = |source| HandoverError::Read { fd: raw, source };
    // Rewound again: the offset is shared with whoever held it before.
    file.seek(SeekFrom::Start(0)).map_err(read)?;
    let mut json = Vec::new();
    file.take(max + 1).read_to_end(&mut json).map_err(read)?;
    if json.len() as u64 > max {
        return Err(HandoverError::TooLarge { fd: raw, max });
    }
    parse(&json, raw)
}

fn parse(json: &[u8], fd: RawFd) -> Result<Handover, HandoverError> {
    /// The part every format has: read first, so that an unknown format is
    /// named as such rather than as whatever field it changed.
    #[derive(Deserialize)]
    struct Envelope {
        format: u32,
        #[serde(default)]
        from_version: String,
    }
    let envelope: Envelope =
        serde_json::from_slice(json).map_err(|source| HandoverError::Parse { fd, source })?;
    if !READABLE_FORMATS.contains(&envelope.format) {
        return Err(HandoverError::UnknownFormat {
            found: envelope.format,
            from_version: if envelope.from_version.is_empty() {
                "of an unknown version".to_owned()
            } else {
                envelope.from_version
            },
            ours: env!("CARGO_PKG_VERSION"),
            readable: READABLE_FORMATS
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    serde_json::from_slice(json).map_err(|source| HandoverError::Parse { fd, source })
}

/// Clears FD_CLOEXEC on exactly these descriptors (their other flags kept),
/// so they survive the exec into the new binary; every other descriptor of
/// the daemon stays close-on-exec.
pub fn keep_across_exec(fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    for fd in fds {
        // FD_CLOEXEC is the only descriptor flag there is: cleared without
        // reading the others first (thousands are kept during a switch).
        fcntl(*fd, FcntlArg::F_SETFD(FdFlag::empty()))?;
    }
    Ok(())
}

fn unix_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    })
}
