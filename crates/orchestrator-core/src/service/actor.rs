//! The task that owns one service: its machine, its child and its one timer.
//! Commands come in over a channel and are answered once applied; state goes
//! out over a watch channel, so reading it costs the actor nothing.

use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::inbox::{self, inbox};
use super::machine::{Effect, Input, Machine, Policy, State};
use crate::cgroup::{ServiceCgroup, Usage};
use crate::events::{EventBus, EventKind};
use crate::handover::{FrozenService, Partials, RecentLine, ReleasedChildInfo, ServiceHandover};
use crate::health::{Health, HealthReport, OnUnhealthy, monitor};
use crate::name::ServiceName;
use crate::notify::{NotifyReport, NotifySocket};
use crate::output::{FrozenPump, LogLine, ServiceOutput, spawn_pump, spawn_pump_resumed};
use crate::process::{ChildProcess, ExitReason, Released, SpawnError, SpawnSpec, Spawner};

/// Everything the actor needs to know about its service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceDefinition {
    pub name: ServiceName,
    /// It has a `[services.NAME]` section (rather than only a discovered binary).
    pub configured: bool,
    /// Started by `run` and by start-all.
    pub enabled: bool,
    /// The file `spawn.program` named at plan time, when
    /// `restart_on_binary_change` is on.
    pub binary: Option<crate::plan::BinaryId>,
    pub spawn: SpawnSpec,
    pub policy: Policy,
    pub log_path: PathBuf,
    pub log_max_bytes: u64,
    pub log_max_files: u32,
    pub log_file: crate::output::FileOptions,
    /// sd_notify: the process gets NOTIFY_SOCKET, and READY=1 makes it up
    /// (`policy.ready` says so too).
    pub notify: bool,
    /// WATCHDOG=1 pings expected at least this often (with `notify`).
    pub watchdog: Option<std::time::Duration>,
    /// Boxed: most services have none, and inline it would cost each of
    /// them its ~100 bytes.
    pub health: Option<Box<crate::health::HealthCheck>>,
    pub depends_on: Vec<crate::deps::Dependency>,
}

/// A snapshot of a service, published on every change.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    pub state: State,
    pub pid: Option<u32>,
    /// When the current process started (for uptime).
    pub running_since: Option<Instant>,
    /// Restarts after failures.
    pub restarts: u64,
    /// Starts and restarts users asked for.
    pub requested_starts: u64,
    pub last_exit: Option<ExitReason>,
    pub last_error: Option<String>,
    /// When a restart waiting out its backoff is due (state `restarting`).
    pub retry_at: Option<Instant>,
    /// Stopped because its process completed (see `Machine::completed`).
    pub completed: bool,
    /// The health check's verdict on the current process; `None` without a
    /// check (or while nothing runs).
    pub health: Option<Health>,
    /// The last STATUS= the current process sent (sd_notify).
    pub notify_status: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("service {service}: could not start: {reason}")]
    StartFailed { service: String, reason: String },
    #[error("service {service}: a later {by} request overrode this one")]
    Superseded { service: String, by: &'static str },
    #[error("service {service}: its supervisor task has ended (the daemon is shutting down)")]
    Gone { service: String },
    #[error("service {service}: the daemon is shutting down; nothing starts any more")]
    ShuttingDown { service: String },
    #[error(
        "service {service}: the daemon is upgrading; this request was not carried out (a start or stop already under way goes on in the new daemon): check `orchestrator status {service}` once the upgrade is done, and ask again if need be"
    )]
    Upgrading { service: String },
    #[error("service {service}: cannot be frozen for the upgrade: {reason}; it goes on as before")]
    FreezeRefused { service: String, reason: String },
    #[error(
        "service {service}: not started: its dependency {dependency} ({condition}) cannot be met: {reason}; start {dependency} (see `orchestrator status {dependency}`), then {service}"
    )]
    DependencyFailed {
        service: String,
        dependency: String,
        condition: crate::deps::Condition,
        reason: String,
    },
}

/// How far back an exit during start-up looks for its last stderr line.
const LAST_WORDS_SEARCH: usize = 64;
/// A last line quoted in an error is cut here (a line may be 64 KiB).
const LAST_WORDS_MAX_CHARS: usize = 300;

/// How long an exit waits for the process's remaining output.
const OUTPUT_DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How long a freeze waits for the log file to take the lines read so far.
const FREEZE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

type Reply = oneshot::Sender<Result<(), ServiceError>>;

enum Command {
    Start(Reply),
    /// A start the daemon makes on its own (not counted as a user's).
    AutoStart(Reply),
    Stop(Reply),
    Restart(Reply),
    /// Stop, and refuse every later start: the daemon is going away, and a
    /// process started now would outlive it.
    Shutdown(Reply),
    /// As Shutdown, but SIGKILL at once.
    Kill(Reply),
    /// A reload's new definition. `respawn`: what the process was started
    /// with changed, so a process that runs (or waits to) restarts on it.
    Reconfigure {
        definition: Arc<ServiceDefinition>,
        respawn: bool,
        reply: Reply,
    },
    /// Hand everything over for an upgrade and end, stopping nothing.
    Freeze(oneshot::Sender<Result<FrozenService, ServiceError>>),
}

/// A cheap, cloneable way to talk to one service's actor.
#[derive(Clone)]
pub struct ServiceHandle {
    name: ServiceName,
    configured: bool,
    enabled: bool,
    commands: inbox::Sender<Command>,
    status: watch::Receiver<ServiceStatus>,
    output: Arc<ServiceOutput>,
    resources: Arc<Resources>,
}

/// What the API reads of a service's current process without asking its
/// actor (which may be busy stopping it): its cgroup, and its OOM deaths.
#[derive(Debug, Default)]
pub struct Resources {
    /// Set by the actor while a process runs in a cgroup. A std mutex: held
    /// only to clone or replace the Arc, never across an await.
    cgroup: std::sync::Mutex<Option<Arc<dyn ServiceCgroup>>>,
    oom_kills: AtomicU64,
    /// sd_notify datagrams dropped: not sent by the service's own processes.
    notify_rejected: AtomicU64,
    /// Set while an ordered start waits on this service's dependencies (or
    /// gave up on them): why it is not started yet.
    waiting: std::sync::Mutex<Waiting>,
    /// Its actor handed the service over for an upgrade and ended: requests
    /// are answered `Upgrading`, not `Gone`.
    frozen: AtomicBool,
}

/// Why an ordered start waits, and how many stops came: a stop ends every
/// ordered start in progress (each sees the count move on and does not
/// start the service after all); concurrent starts of the same service
/// do not end each other.
#[derive(Debug, Default)]
struct Waiting {
    stops: u64,
    reason: Option<String>,
}

impl Resources {
    fn set_cgroup(&self, cgroup: Option<Arc<dyn ServiceCgroup>>) {
        *self.cgroup.lock().unwrap_or_else(PoisonError::into_inner) = cgroup;
    }

    /// The cgroup's count of the running process's use; `None` without one.
    pub fn cgroup_usage(&self) -> Option<Usage> {
        let cgroup = self
            .cgroup
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        Some(cgroup.usage())
    }

    pub fn oom_kills(&self) -> u64 {
        self.oom_kills.load(Ordering::Relaxed)
    }

    /// An ordered start begins; its token for `set_waiting` and
    /// `still_wanted`.
    pub fn begin_waiting(&self) -> u64 {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stops
    }

    /// Say why the start `epoch` waits (or gave up); ignored once a stop or
    /// a later start has taken over.
    pub fn set_waiting(&self, epoch: u64, why: Option<String>) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        if waiting.stops == epoch {
            waiting.reason = why;
        }
    }

    /// The start `epoch` is still the one wanted: no stop came since.
    pub fn still_wanted(&self, epoch: u64) -> bool {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stops
            == epoch
    }

    /// A stop: any ordered start in progress will not start the service.
    pub fn cancel_waiting(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.stops += 1;
        waiting.reason = None;
    }

    fn clear_waiting_reason(&self) {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reason = None;
    }

    /// Send a start (`send`) unless a stop came since the ordered start
    /// `epoch` began; checked and sent under one lock, as `cancel_then`
    /// cancels and sends, so a stop and a start never cross.
    pub fn start_if_wanted<F>(&self, epoch: u64, send: impl FnOnce() -> F) -> Option<F> {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        (waiting.stops == epoch).then(send)
    }

    /// Cancel any ordered start in progress and send the stop (`send`)
    /// under the same lock (see `start_if_wanted`).
    pub fn cancel_then<F>(&self, send: impl FnOnce() -> F) -> F {
        let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        waiting.stops += 1;
        waiting.reason = None;
        send()
    }

    pub fn waiting(&self) -> Option<String> {
        self.waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .reason
            .clone()
    }

    pub fn notify_rejected(&self) -> u64 {
        self.notify_rejected.load(Ordering::Relaxed)
    }
}

impl ServiceHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// As first defined: a reload may have changed it since, and the
    /// supervisor's `info` has the current value.
    pub fn configured(&self) -> bool {
        self.configured
    }

    /// As first defined (see `configured`).
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn status(&self) -> ServiceStatus {
        self.status.borrow().clone()
    }

    pub fn output(&self) -> &Arc<ServiceOutput> {
        &self.output
    }

    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// A receiver that sees every status change (tests wait on it).
    pub fn subscribe(&self) -> watch::Receiver<ServiceStatus> {
        self.status.clone()
    }

    pub fn is_running(&self) -> bool {
        self.status.borrow().state == State::Running
    }

    /// Returns once the service runs, or with the reason it could not start.
    pub async fn start(&self) -> Result<(), ServiceError> {
        self.request(Command::Start).await
    }

    /// Returns once the process (and its group) is gone.
    pub async fn stop(&self) -> Result<(), ServiceError> {
        self.request(Command::Stop).await
    }

    /// Returns once the new process runs.
    pub async fn restart(&self) -> Result<(), ServiceError> {
        self.request(Command::Restart).await
    }

    /// Stop for good (the daemon is shutting down): later starts are
    /// refused. Returns once the process is gone.
    pub async fn shutdown(&self) -> Result<(), ServiceError> {
        self.request(Command::Shutdown).await
    }

    /// As `shutdown`, with SIGKILL at once.
    pub async fn kill(&self) -> Result<(), ServiceError> {
        self.request(Command::Kill).await
    }

    /// Run with a reload's new definition: the policy applies at once,
    /// keeping the process and its counters; an `enabled` change starts or
    /// stops it; `respawn` restarts a process that runs. Returns once that
    /// is done.
    pub async fn reconfigure(
        &self,
        definition: Arc<ServiceDefinition>,
        respawn: bool,
    ) -> Result<(), ServiceError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Reconfigure {
                definition,
                respawn,
                reply,
            })
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }

    /// Freeze the service for an upgrade (docs/upgrade.md): its health
    /// check and watchdog stop, its output pump stops between two reads and
    /// the log file takes what was read, its process is released (not
    /// signalled, not reaped), and everything comes back to be handed over;
    /// the actor then ends, stopping nothing. Later requests are answered
    /// `Upgrading`, and so are the starts and stops waiting for their
    /// outcome (the machine's stop or start goes on in the new daemon).
    /// The generation is left 0: the supervisor knows it.
    pub async fn freeze(&self) -> Result<FrozenService, ServiceError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Freeze(reply))
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }

    /// Handed over by a freeze: its actor has ended.
    pub fn is_frozen(&self) -> bool {
        self.resources.frozen.load(Ordering::Acquire)
    }

    /// Wait until the status satisfies `predicate`.
    pub async fn wait_for(
        &self,
        mut predicate: impl FnMut(&ServiceStatus) -> bool,
    ) -> Result<ServiceStatus, ServiceError> {
        let mut receiver = self.status.clone();
        receiver
            .wait_for(|status| predicate(status))
            .await
            .map(|status| status.clone())
            .map_err(|_| self.gone())
    }

    async fn request(&self, make: fn(Reply) -> Command) -> Result<(), ServiceError> {
        self.send(make).await
    }

    /// A start sent now: a user's (`start`) or the daemon's (`auto_start`).
    pub fn start_by(
        &self,
        user: bool,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + use<> {
        let make: fn(Reply) -> Command = if user {
            Command::Start
        } else {
            Command::AutoStart
        };
        self.send(make)
    }

    /// `stop`, sent now (not when the future is first polled).
    pub fn stop_request(
        &self,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + use<> {
        self.send(Command::Stop)
    }

    /// `shutdown`, sent now (not when the future is first polled).
    pub fn shutdown_request(
        &self,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + use<> {
        self.send(Command::Shutdown)
    }

    /// The daemon's own start (at start-up), sent now; the returned future
    /// tells how it went. Lets one task start many services at once without
    /// a task per service. Not counted in `requested_starts`.
    pub fn auto_start(
        &self,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + use<> {
        self.send(Command::AutoStart)
    }

    fn send(
        &self,
        make: fn(Reply) -> Command,
    ) -> impl std::future::Future<Output = Result<(), ServiceError>> + use<> {
        let (reply, answer) = oneshot::channel();
        let sent = self.commands.send(make(reply));
        let gone = self.gone();
        let resources = Arc::clone(&self.resources);
        let name = self.name.clone();
        let gone = move || {
            if resources.frozen.load(Ordering::Acquire) {
                ServiceError::Upgrading {
                    service: name.to_string(),
                }
            } else {
                gone
            }
        };
        async move {
            if sent.is_err() {
                return Err(gone());
            }
            answer.await.map_err(|_| gone())?
        }
    }

    fn gone(&self) -> ServiceError {
        if self.is_frozen() {
            return ServiceError::Upgrading {
                service: self.name.to_string(),
            };
        }
        ServiceError::Gone {
            service: self.name.to_string(),
        }
    }
}

/// Start the actor of one service on its own task (stopped; send `start`
/// to run it). The supervisor uses `service_actor` to own the task instead.
pub fn spawn_service(
    definition: ServiceDefinition,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
) -> (ServiceHandle, JoinHandle<()>) {
    let (handle, actor) = service_actor(Arc::new(definition), spawner, events);
    (handle, tokio::spawn(actor))
}

/// The handle of one service and the future of its actor, for the caller
/// to run on a task it owns.
pub fn service_actor(
    definition: Arc<ServiceDefinition>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
) -> (
    ServiceHandle,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let machine = Machine::new(definition.policy.clone());
    let (handle, actor) = new_actor(definition, spawner, events, machine);
    (handle, actor.run())
}

/// [`service_actor`] for a service frozen by an upgrade (or by a freeze
/// rolled back): its machine restored with every timer shifted by the time
/// since `frozen.frozen_at`, its process adopted (same pid), its output
/// going on from its pipes, partial lines, recent lines and counters, its
/// notify socket listened to again and its health check restarted from its
/// last verdict. A process that cannot be adopted (not certainly ours any
/// more) is not touched: the service takes it as an exit (`-1`) and its
/// restart policy decides. Emits no event (nothing changed for the user).
pub fn service_actor_resumed(
    definition: Arc<ServiceDefinition>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
    frozen: FrozenService,
    mut adopt: watch::Receiver<bool>,
) -> (
    ServiceHandle,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let taken_at = frozen.taken_at(Instant::now());
    let machine = Machine::restore(
        definition.policy.clone(),
        frozen.service.machine.clone(),
        taken_at,
    );
    let (handle, mut actor) = new_actor(definition, spawner, events, machine);
    let mut frozen = frozen;
    actor.restore_seen(&mut frozen.service);
    // Adopting the process (its pidfd, process group and cgroup checked)
    // is done by the task, not here: the supervisor spawns a thousand of
    // them at once and the runtime's workers share the work, while a
    // command sent meanwhile waits in the inbox for the resume to end. It
    // waits for `adopt` (the daemon opens it once the API is being served),
    // so the API answers from each service's restored state at once
    // instead of queuing behind a thousand adoptions.
    let run = async move {
        let _ = adopt.wait_for(|open| *open).await;
        actor.resume(frozen);
        actor.run().await;
    };
    (handle, run)
}

#[cfg(test)]
pub(crate) fn spawn_with_machine(
    definition: ServiceDefinition,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
    machine: Machine,
) -> (ServiceHandle, JoinHandle<()>) {
    let (handle, actor) = new_actor(Arc::new(definition), spawner, events, machine);
    (handle, tokio::spawn(actor.run()))
}

fn new_actor(
    definition: Arc<ServiceDefinition>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
    machine: Machine,
) -> (ServiceHandle, Actor) {
    let (commands_tx, commands) = inbox();
    let output = ServiceOutput::with_options(
        &definition.name,
        definition.log_path.clone(),
        definition.log_max_bytes,
        definition.log_max_files,
        definition.log_file,
    );
    output.attach_events(events.clone());
    let (status_tx, status_rx) = watch::channel(snapshot(&machine, &Watchers::default()));
    let handle = ServiceHandle {
        name: definition.name.clone(),
        configured: definition.configured,
        enabled: definition.enabled,
        commands: commands_tx,
        status: status_rx,
        output: Arc::clone(&output),
        resources: Arc::default(),
    };
    let actor = Actor {
        definition,
        spawner,
        events,
        machine,
        child: None,
        pump: None,
        output,
        commands,
        status: status_tx,
        resources: Arc::clone(&handle.resources),
        start_waiters: Vec::new(),
        stop_waiters: Vec::new(),
        watchers: Watchers::default(),
    };
    (handle, actor)
}

fn snapshot(machine: &Machine, watchers: &Watchers) -> ServiceStatus {
    ServiceStatus {
        health: watchers.health,
        notify_status: watchers.notify_status.clone(),
        state: machine.state(),
        pid: machine.pid(),
        running_since: machine.running_since(),
        restarts: machine.restarts(),
        requested_starts: machine.requested_starts(),
        last_exit: machine.last_exit(),
        last_error: machine.last_error().map(str::to_owned),
        retry_at: machine.retry_at(),
        completed: machine.completed(),
    }
}

struct Actor {
    definition: Arc<ServiceDefinition>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
    machine: Machine,
    child: Option<Box<dyn ChildProcess>>,
    /// The task reading the current child's output.
    pump: Option<crate::output::PumpHandle>,
    output: Arc<ServiceOutput>,
    commands: inbox::Receiver<Command>,
    status: watch::Sender<ServiceStatus>,
    resources: Arc<Resources>,
    start_waiters: Vec<Reply>,
    stop_waiters: Vec<Reply>,
    watchers: Watchers,
}

/// The tasks that watch the current process from outside (its health
/// check, its sd_notify socket) and what they said. Each process gets new
/// channels: a report from an earlier process cannot arrive.
#[derive(Default)]
struct Watchers {
    health_task: Option<JoinHandle<()>>,
    health_reports: Option<mpsc::UnboundedReceiver<HealthReport>>,
    notify_task: Option<JoinHandle<()>>,
    notify_reports: Option<mpsc::UnboundedReceiver<NotifyReport>>,
    health: Option<Health>,
    notify_status: Option<String>,
    /// A second descriptor of the current process's notify socket, which
    /// the listener owns: what a freeze hands over.
    notify_fd: Option<OwnedFd>,
    /// The sequence number of the last line the previous process printed:
    /// later lines are this process's.
    lines_before: Option<u64>,
}

impl Watchers {
    /// The process is gone: so are the watchers and what they said.
    fn stop(&mut self) {
        for task in [self.health_task.take(), self.notify_task.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
        self.health_reports = None;
        self.notify_reports = None;
        self.health = None;
        self.notify_status = None;
        self.notify_fd = None;
    }
}

/// Whether the machine took an input or refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Accepted,
    Refused,
}

enum Wakeup {
    Command(Command),
    HandlesGone,
    Exited(io::Result<ExitReason>),
    Timer,
    Health(Option<HealthReport>),
    Notify(Option<NotifyReport>),
}

async fn next_report<T>(receiver: &mut Option<mpsc::UnboundedReceiver<T>>) -> Option<T> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
}

async fn wait_child(child: &mut Option<Box<dyn ChildProcess>>) -> io::Result<ExitReason> {
    match child {
        Some(child) => child.wait().await,
        None => std::future::pending().await,
    }
}

/// The timer is boxed, and only while there is a deadline: inline, its
/// ~130 bytes would be in every idle service's task, deadline or not.
fn sleep_until(deadline: Option<Instant>) -> impl std::future::Future<Output = ()> + Send {
    let timer = deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline)));
    async move {
        match timer {
            Some(timer) => timer.await,
            None => std::future::pending().await,
        }
    }
}

impl Actor {
    /// An `async move` block rather than an `async fn`: an `async fn` keeps
    /// its by-value `self` twice in its state (argument and local), which
    /// for a thousand idle services is half a megabyte.
    #[allow(clippy::manual_async_fn)]
    fn run(mut self) -> impl std::future::Future<Output = ()> + Send {
        async move {
            loop {
                let deadline = self.machine.deadline();
                // A deadline already due (a backoff of 0) fires now: the timer
                // wheel would round it up to its next millisecond tick.
                let wakeup = if deadline.is_some_and(|d| d <= Instant::now()) {
                    Wakeup::Timer
                } else {
                    tokio::select! {
                        command = self.commands.recv() => match command {
                            Some(command) => Wakeup::Command(command),
                            None => Wakeup::HandlesGone,
                        },
                        result = wait_child(&mut self.child) => Wakeup::Exited(result),
                        () = sleep_until(deadline) => Wakeup::Timer,
                        report = next_report(&mut self.watchers.health_reports) => Wakeup::Health(report),
                        report = next_report(&mut self.watchers.notify_reports) => Wakeup::Notify(report),
                    }
                };
                match wakeup {
                    Wakeup::Command(Command::Freeze(reply)) => {
                        // Boxed (as is `on_exit`): the largest states of this
                        // future would otherwise be its size, for every idle
                        // service, though they are seldom there.
                        let frozen = match Box::pin(self.freeze()).await {
                            Ok(frozen) => frozen,
                            Err(error) => {
                                let _ = reply.send(Err(error));
                                continue;
                            }
                        };
                        match reply.send(Ok(frozen)) {
                            Ok(()) => {
                                self.resources.frozen.store(true, Ordering::Release);
                                let name = self.definition.name.to_string();
                                for waiter in self
                                    .start_waiters
                                    .drain(..)
                                    .chain(self.stop_waiters.drain(..))
                                {
                                    let _ = waiter.send(Err(ServiceError::Upgrading {
                                        service: name.clone(),
                                    }));
                                }
                                // Ends without stopping anything: the process
                                // is the next daemon's now.
                                return;
                            }
                            // Nobody took it (the freeze was given up): the
                            // service goes on here, as it was.
                            Err(Ok(frozen)) => self.resume(frozen),
                            Err(Err(_)) => {}
                        }
                    }
                    Wakeup::Command(command) => self.on_command(command),
                    Wakeup::Exited(result) => Box::pin(self.on_exit(result)).await,
                    Wakeup::Timer => {
                        self.feed(Input::Timer);
                    }
                    Wakeup::Health(Some(report)) => self.on_health(report),
                    Wakeup::Notify(Some(report)) => self.on_notify(report),
                    // A watcher ended on its own: nothing more will come from it.
                    Wakeup::Health(None) => self.watchers.health_reports = None,
                    Wakeup::Notify(None) => self.watchers.notify_reports = None,
                    Wakeup::HandlesGone => {
                        self.abandon().await;
                        return;
                    }
                }
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        let definition = Arc::clone(&self.definition);
        let name = &definition.name;
        let (input, reply, starts) = match command {
            Command::Start(reply) => (Input::Start, reply, true),
            Command::AutoStart(reply) => (Input::AutoStart, reply, true),
            Command::Restart(reply) => {
                info!(service = %name, "restart requested");
                (Input::Restart, reply, true)
            }
            Command::Stop(reply) => (Input::Stop, reply, false),
            Command::Shutdown(reply) => (Input::Shutdown, reply, false),
            Command::Kill(reply) => (Input::Kill, reply, false),
            // Taken in `run`, where it can be awaited.
            Command::Freeze(reply) => {
                let _ = reply.send(Err(ServiceError::FreezeRefused {
                    service: name.to_string(),
                    reason: "internal error: the freeze reached the wrong handler".to_owned(),
                }));
                return;
            }
            Command::Reconfigure {
                definition,
                respawn,
                reply,
            } => match self.reconfigure(definition, respawn) {
                Some((input, starts)) => (input, reply, starts),
                None => {
                    // A live change may have settled the state (gave up).
                    self.publish();
                    let _ = reply.send(Ok(()));
                    return;
                }
            },
        };
        let by = match input {
            Input::Start | Input::AutoStart => "start",
            Input::Restart => "restart",
            Input::Kill => "kill",
            _ => "stop",
        };
        // The machine decides first: a refused request changes nothing,
        // not even the waiters of the request it would have overridden.
        let stops = matches!(input, Input::Stop | Input::Shutdown | Input::Kill);
        if self.apply(input) == Outcome::Refused {
            let _ = reply.send(Err(ServiceError::ShuttingDown {
                service: name.to_string(),
            }));
            return;
        }
        if stops {
            // Stopped, whoever asked: an ordered start still waiting on its
            // dependencies must not start it later.
            self.resources.cancel_waiting();
        }
        // The reply waits for the outcome, which `publish` settles.
        if starts {
            supersede(&mut self.stop_waiters, name, by);
            self.start_waiters.push(reply);
        } else {
            supersede(&mut self.start_waiters, name, by);
            self.stop_waiters.push(reply);
        }
        self.publish();
    }

    /// Swap in a reload's definition; returns what the machine must do
    /// about it, if anything, and whether that is a start.
    fn reconfigure(
        &mut self,
        definition: Arc<ServiceDefinition>,
        respawn: bool,
    ) -> Option<(Input, bool)> {
        let was_enabled = self.definition.enabled;
        let health_changed = self.definition.health != definition.health;
        for effect in self.machine.set_policy(definition.policy.clone()) {
            if let Effect::Publish(kind) = effect {
                self.announce(kind);
            }
        }
        if self.definition.log_file != definition.log_file {
            self.output.set_file_options(definition.log_file);
        }
        self.definition = definition;
        let enabled = self.definition.enabled;
        let name = &self.definition.name;
        if was_enabled && !enabled {
            info!(service = %name, "disabled by a reload: stopping");
            return Some((Input::Stop, false));
        }
        if health_changed && self.child.is_some() {
            // The running process is checked by the new rules from now on.
            let cgroup = self.child.as_ref().and_then(|child| child.cgroup());
            self.start_health_monitor(cgroup);
        }
        let name = &self.definition.name;
        // One with dependencies is started by the reload in dependency order.
        if enabled && !was_enabled && self.definition.depends_on.is_empty() {
            info!(service = %name, "enabled by a reload: starting");
            return Some((Input::AutoStart, true));
        }
        // A stop in progress stays a stop (no lost stop); a service that
        // gave up gets one more try, since its new spec may be the fix.
        let failed = self.machine.state() == State::Failed;
        if respawn && (self.machine.wants_to_run() || (enabled && failed)) {
            info!(service = %name, "its spec changed in a reload: restarting");
            return Some((Input::Restart, true));
        }
        None
    }

    /// The last lines of a process are in its pipes when it exits: read
    /// them before reporting the exit, so a stop (or the daemon's exit)
    /// never loses them. Killing the leader's group closed the pipes unless
    /// an escaped grandchild holds them; that one is not waited for beyond
    /// the deadline, and its pump keeps logging on its own.
    async fn drain_output(&mut self) {
        let Some(mut pump) = self.pump.take() else {
            return;
        };
        if tokio::time::timeout(OUTPUT_DRAIN_TIMEOUT, &mut pump)
            .await
            .is_err()
        {
            debug!(service = %self.definition.name, "output still open after the exit; not waiting for it");
        }
    }

    async fn on_exit(&mut self, result: io::Result<ExitReason>) {
        let reason = result.unwrap_or_else(|err| {
            // Only possible if something else reaped our child; treat it as
            // dead, since it is no longer ours to signal.
            error!(service = %self.definition.name, error = %err, "lost track of the process");
            ExitReason::Exited(-1)
        });
        // Reaped: its group was emptied by `wait`, and nothing may signal
        // it again.
        self.child = None;
        self.resources.set_cgroup(None);
        self.watchers.stop();
        if let ExitReason::OomKilled { memory_limit_mib } = reason {
            self.resources.oom_kills.fetch_add(1, Ordering::Relaxed);
            self.announce(EventKind::OomKilled { memory_limit_mib });
        }
        self.drain_output().await;
        if self.machine.state() == State::Starting
            && let Some(words) = self.last_words()
        {
            self.machine.step(Input::LastWords(words), Instant::now());
        }
        self.feed(Input::Exited(reason));
    }

    /// The last line the current process printed on stderr, if any.
    fn last_words(&self) -> Option<String> {
        let before = self.watchers.lines_before;
        self.output
            .tail(LAST_WORDS_SEARCH)
            .into_iter()
            .rev()
            .take_while(|line| before.is_none_or(|before| line.seq > before))
            .find(|line| line.stream == crate::wire::Stream::Stderr && !line.text.is_empty())
            .map(|line| {
                let text = String::from_utf8_lossy(&line.text);
                let mut words: String = text.chars().take(LAST_WORDS_MAX_CHARS).collect();
                if words.len() < text.len() {
                    words.push('…');
                }
                words
            })
    }

    /// The health check of the current process, on a task of its own. Its
    /// exec probes get the service's spec without NOTIFY_SOCKET: a probe
    /// must not be able to say READY=1 or feed the watchdog for it.
    fn start_health_monitor(&mut self, cgroup: Option<Arc<dyn ServiceCgroup>>) {
        if let Some(task) = self.watchers.health_task.take() {
            task.abort();
        }
        self.watchers.health_reports = None;
        self.watchers.health = None;
        let Some(check) = &self.definition.health else {
            return;
        };
        let (reports, receiver) = mpsc::unbounded_channel();
        self.watchers.health_task = Some(monitor::spawn_monitor(
            self.definition.name.to_string(),
            (**check).clone(),
            crate::health::probe::ExecContext {
                spawner: Arc::clone(&self.spawner),
                spec: self.definition.spawn.clone(),
                cgroup,
            },
            reports,
            !self.definition.notify,
        ));
        self.watchers.health_reports = Some(receiver);
        self.watchers.health = Some(Health::Unknown);
    }

    fn on_health(&mut self, report: HealthReport) {
        if self.child.is_none() || self.watchers.health == Some(report.health) {
            return;
        }
        self.watchers.health = Some(report.health);
        self.announce(EventKind::HealthChanged {
            health: report.health,
            detail: report.detail.clone(),
        });
        let on_unhealthy = self
            .definition
            .health
            .as_ref()
            .map(|check| check.on_unhealthy);
        match report.health {
            // With notify, READY=1 makes it up; the check only reports.
            Health::Healthy if !self.definition.notify => self.feed(Input::Ready),
            Health::Unhealthy
                if on_unhealthy == Some(OnUnhealthy::Restart) && self.machine.is_ready() =>
            {
                let detail = report
                    .detail
                    .unwrap_or_else(|| "its check failed".to_owned());
                self.feed(Input::Faulted {
                    reason: format!("unhealthy: {detail}"),
                });
            }
            _ => self.publish(),
        }
    }

    fn on_notify(&mut self, report: NotifyReport) {
        if self.child.is_none() {
            return;
        }
        match report {
            NotifyReport::Ready => self.feed(Input::Ready),
            NotifyReport::Status(text) => {
                self.watchers.notify_status = Some(text);
                self.publish();
            }
            NotifyReport::ExtendTimeout { by } => self.feed(Input::ExtendStart(by)),
            NotifyReport::WatchdogExpired { after } => self.feed(Input::Faulted {
                reason: format!("watchdog: no WATCHDOG=1 for {after:?}"),
            }),
            NotifyReport::Rejected { pid } => {
                let count = self
                    .resources
                    .notify_rejected
                    .fetch_add(1, Ordering::Relaxed);
                // Said once, then counted: a flood of foreign datagrams must not flood the log.
                if count == 0 {
                    warn!(service = %self.definition.name, sender = ?pid, "dropped an sd_notify message not sent by the service's own processes (further ones are only counted)");
                }
            }
            // Reported for completeness; nothing to do about them.
            _ => {}
        }
    }

    /// Run `input` through the machine, carry out the effects, publish.
    fn feed(&mut self, input: Input) {
        self.apply(input);
        self.publish();
    }

    /// Run `input` through the machine and carry out the effects.
    fn apply(&mut self, input: Input) -> Outcome {
        let mut outcome = Outcome::Accepted;
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for effect in self.machine.step(input, Instant::now()) {
                match effect {
                    Effect::Spawn => inputs.push_back(self.spawn()),
                    Effect::SignalGroup(signal) => self.signal(signal),
                    Effect::Publish(kind) => self.announce(kind),
                    Effect::Refused => outcome = Outcome::Refused,
                }
            }
        }
        outcome
    }

    /// A lifecycle event: into the daemon's log, then onto the bus.
    fn announce(&self, kind: EventKind) {
        let name = &self.definition.name;
        match &kind {
            EventKind::Started { pid } => info!(service = %name, pid, "started"),
            EventKind::SpawnFailed { error } => warn!(service = %name, "{error}"),
            EventKind::Exited {
                reason, expected, ..
            } => {
                if *expected {
                    info!(service = %name, "stopped ({reason})");
                } else {
                    warn!(service = %name, "{reason}");
                }
            }
            EventKind::RestartScheduled { delay_ms, .. } => {
                // One unit for delays, as in the events.
                let delay = crate::wire::seconds(*delay_ms);
                info!(service = %name, "restarting in {delay}");
            }
            EventKind::GaveUp { error } => error!(service = %name, "failed: {error}"),
            EventKind::OomKilled { .. } => {
                warn!(service = %name, "killed by the OOM killer: it went past memory_limit")
            }
            EventKind::StopRequested => info!(service = %name, "stop requested"),
            EventKind::StopTimedOut => warn!(
                service = %name,
                "did not stop within {:?}: sent SIGKILL",
                self.definition.policy.stop_timeout
            ),
            _ => {}
        }
        self.events.emit(Some(name), kind);
    }

    fn spawn(&mut self) -> Input {
        let spec = &self.definition.spawn;
        if let Err(source) = std::fs::create_dir_all(&spec.cwd) {
            let error = SpawnError::WorkingDir {
                dir: spec.cwd.clone(),
                source,
            };
            return Input::SpawnFailed {
                error: error.to_string(),
                permanent: error.is_permanent(),
            };
        }
        let notify = if self.definition.notify {
            match NotifySocket::bind(&self.definition.name) {
                Ok(socket) => Some(socket),
                Err(error) => {
                    return Input::SpawnFailed {
                        error: error.to_string(),
                        permanent: false,
                    };
                }
            }
        } else {
            None
        };
        let with_notify;
        let spec = match &notify {
            Some(socket) => {
                let mut spec = spec.clone();
                spec.env
                    .extend(crate::notify::environment(socket, self.definition.watchdog));
                with_notify = spec;
                &with_notify
            }
            None => spec,
        };
        self.watchers.lines_before = self.output.tail(1).last().map(|line| line.seq);
        match self.spawner.spawn(spec) {
            Ok(mut child) => {
                let cgroup = child.cgroup();
                if let Some(socket) = notify {
                    self.watchers.notify_fd = match socket.try_clone_fd() {
                        Ok(fd) => Some(fd),
                        Err(error) => {
                            warn!(service = %self.definition.name, "cannot keep a second descriptor of the notify socket ({error}): an upgrade will not hand it over, and the service's sd_notify messages after it are not read");
                            None
                        }
                    };
                    let (reports, receiver) = mpsc::unbounded_channel();
                    self.watchers.notify_task = Some(crate::notify::spawn_listener(
                        socket,
                        self.definition.name.to_string(),
                        child.pid(),
                        cgroup.clone(),
                        self.definition.watchdog,
                        reports,
                    ));
                    self.watchers.notify_reports = Some(receiver);
                }
                self.start_health_monitor(cgroup.clone());
                // Whatever an ordered start said while it waited is moot now.
                self.resources.clear_waiting_reason();
                self.output
                    .mark_started(child.pid(), self.machine.restarts());
                if let Some(output) = child.take_output() {
                    self.pump = Some(spawn_pump(
                        Arc::clone(&self.output),
                        output.stdout,
                        output.stderr,
                    ));
                }
                let pid = child.pid();
                self.resources.set_cgroup(cgroup);
                self.child = Some(child);
                Input::Spawned { pid }
            }
            Err(error) => Input::SpawnFailed {
                error: error.to_string(),
                permanent: error.is_permanent(),
            },
        }
    }

    fn signal(&mut self, signal: nix::sys::signal::Signal) {
        let name = &self.definition.name;
        match &mut self.child {
            Some(child) => {
                debug!(service = %name, pid = child.pid(), "sending {signal} to the process group");
                if let Err(err) = child.signal_group(signal) {
                    warn!(service = %name, "cannot send {signal}: {err}");
                }
            }
            None => debug!(service = %name, "no process to send {signal} to"),
        }
    }

    fn publish(&mut self) {
        let next = snapshot(&self.machine, &self.watchers);
        self.status.send_if_modified(|current| {
            if *current == next {
                false
            } else {
                *current = next;
                true
            }
        });
        self.settle_waiters();
    }

    /// Answer the requests whose outcome is now known.
    fn settle_waiters(&mut self) {
        let state = self.machine.state();
        if !self.start_waiters.is_empty() {
            let outcome = match state {
                State::Running => Some(Ok(())),
                State::Restarting | State::Failed => Some(Err(ServiceError::StartFailed {
                    service: self.definition.name.to_string(),
                    reason: self
                        .machine
                        .last_error()
                        .unwrap_or("it exited at once")
                        .to_owned(),
                })),
                // A one-shot that did its work (exit 0, not restarted): a
                // stop request would have answered these waiters already.
                State::Stopped if self.machine.last_exit().is_some_and(|e| e.is_success()) => {
                    Some(Ok(()))
                }
                State::Stopped => Some(Err(ServiceError::Superseded {
                    service: self.definition.name.to_string(),
                    by: "stop",
                })),
                _ => None,
            };
            if let Some(outcome) = outcome {
                for waiter in self.start_waiters.drain(..) {
                    let _ = waiter.send(outcome.clone());
                }
            }
        }
        if !self.stop_waiters.is_empty() && matches!(state, State::Stopped | State::Failed) {
            for waiter in self.stop_waiters.drain(..) {
                let _ = waiter.send(Ok(()));
            }
        }
    }

    /// Every handle is gone: nobody can stop this process later, so kill it now.
    async fn abandon(&mut self) {
        self.watchers.stop();
        if let Some(child) = &mut self.child {
            let _ = child.signal_group(nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait().await;
        }
    }
}

impl Actor {
    /// See [`ServiceHandle::freeze`]. Refused (nothing changed) only when
    /// the machine cannot be snapshotted, which a spawn in flight would
    /// cause: spawns are answered within the step that makes them, so
    /// between two commands there is none.
    async fn freeze(&mut self) -> Result<FrozenService, ServiceError> {
        let name = self.definition.name.to_string();
        if let Err(error) = self.machine.snapshot(Instant::now()) {
            return Err(ServiceError::FreezeRefused {
                service: name,
                reason: error.to_string(),
            });
        }
        // Nothing acts on the process any more: the health check and the
        // notify listener (with its watchdog) stop; what they reported
        // already is applied first (a READY=1 read is not lost).
        for task in [
            self.watchers.health_task.take(),
            self.watchers.notify_task.take(),
        ]
        .into_iter()
        .flatten()
        {
            task.abort();
        }
        if let Some(mut reports) = self.watchers.notify_reports.take() {
            while let Ok(report) = reports.try_recv() {
                self.on_notify(report);
            }
        }
        if let Some(mut reports) = self.watchers.health_reports.take() {
            while let Ok(report) = reports.try_recv() {
                self.on_health(report);
            }
        }
        // The pump stops between two reads; the log file takes every line
        // read so far, so the next daemon appends after the last of them.
        let mut pipes = FrozenPump::default();
        if let Some(pump) = self.pump.take() {
            match pump.freeze().await {
                Ok(frozen) => pipes = frozen,
                Err(error) => warn!(service = %name, "{error}"),
            }
        }
        if tokio::time::timeout(FREEZE_FLUSH_TIMEOUT, self.output.flush_file())
            .await
            .is_err()
        {
            warn!(service = %name, "its log file did not take the last lines within {FREEZE_FLUSH_TIMEOUT:?} (a slow or hung disk): lines still queued may be missing from the file after the upgrade (they are in `logs`)");
        }
        let released = match self.child.take() {
            Some(child) => match child.release() {
                Ok(released) => Some(released),
                Err(error) => {
                    error!(service = %name, "{error}");
                    None
                }
            },
            None => None,
        };
        self.resources.set_cgroup(None);
        let frozen_at_monotonic_ns = crate::handover::monotonic_ns();
        let machine =
            self.machine
                .snapshot(Instant::now())
                .map_err(|error| ServiceError::FreezeRefused {
                    service: name.clone(),
                    reason: error.to_string(),
                })?;
        let mut pidfd = None;
        let child = released.map(|released| {
            let Released {
                pid,
                cgroup,
                killed_by_us,
                oom_kills_at_start,
                memory_limit_mib,
                pidfd: fd,
                output,
            } = released;
            pidfd = fd;
            // Pipes nobody read yet (no pump took them): handed over as they are.
            if !pipes.has_pipes()
                && let Some(output) = output
            {
                pipes.stdout = Some(output.stdout);
                pipes.stderr = Some(output.stderr);
            }
            ReleasedChildInfo {
                pid,
                pgid: pid,
                cgroup,
                killed_by_us,
                oom_kills_at_start,
                memory_limit_mib,
            }
        });
        let FrozenPump {
            stdout,
            stderr,
            stdout_partial,
            stderr_partial,
        } = pipes;
        let notify = if child.is_some() {
            self.watchers.notify_fd.take()
        } else {
            None
        };
        Ok(FrozenService {
            service: ServiceHandover {
                name,
                generation: 0,
                machine,
                child,
                partial: Partials {
                    stdout: stdout_partial,
                    stderr: stderr_partial,
                },
                recent: self
                    .output
                    .recent_lines()
                    .iter()
                    .map(RecentLine::from)
                    .collect(),
                health: self.watchers.health,
                output: self.output.counters(),
                frozen_at_monotonic_ns: Some(frozen_at_monotonic_ns),
                notify_status: self.watchers.notify_status.clone(),
            },
            pidfd,
            stdout,
            stderr,
            notify,
            from_version: Some(env!("CARGO_PKG_VERSION").to_owned()),
            frozen_at: Some(std::time::SystemTime::now()),
        })
    }

    /// Take back what a freeze handed over (see [`service_actor_resumed`]);
    /// the machine was restored already.
    fn resume(&mut self, frozen: FrozenService) {
        let FrozenService {
            service,
            pidfd,
            stdout,
            stderr,
            notify,
            ..
        } = frozen;
        let name = self.definition.name.to_string();
        let Some(info) = service.child else {
            if let Some(pid) = self.machine.pid() {
                self.lost_on_resume(format!(
                    "its process {pid} was not handed over by the previous daemon"
                ));
            }
            return self.publish();
        };
        let released = info.into_released(pidfd);
        let child = match self.spawner.adopt(released, &name) {
            Ok(child) => child,
            Err(error) => {
                self.lost_on_resume(error.to_string());
                return self.publish();
            }
        };
        let cgroup = child.cgroup();
        let pipes = FrozenPump {
            stdout,
            stderr,
            stdout_partial: service.partial.stdout,
            stderr_partial: service.partial.stderr,
        };
        if pipes.has_pipes() {
            self.pump = Some(spawn_pump_resumed(Arc::clone(&self.output), pipes));
        }
        if let Some(fd) = notify {
            let socket = NotifySocket::from_fd(fd);
            self.watchers.notify_fd = socket.try_clone_fd().ok();
            let (reports, receiver) = mpsc::unbounded_channel();
            self.watchers.notify_task = Some(crate::notify::spawn_listener_resumed(
                socket,
                name.clone(),
                child.pid(),
                cgroup.clone(),
                self.definition.watchdog,
                self.machine.is_ready(),
                reports,
            ));
            self.watchers.notify_reports = Some(receiver);
        }
        self.start_health_monitor(cgroup.clone());
        if self.watchers.health.is_some() {
            // Its last verdict stands until the check says otherwise.
            self.watchers.health = service.health.or(self.watchers.health);
        }
        self.resources.set_cgroup(cgroup);
        debug!(service = %name, pid = child.pid(), "resumed after the upgrade");
        self.child = Some(child);
        self.publish();
    }

    /// What the service showed before the freeze (its recent lines and
    /// output counters, its last STATUS= and health verdict), restored at
    /// once, before its process is adopted: the API answers with it
    /// meanwhile. No system call.
    fn restore_seen(&mut self, service: &mut crate::handover::ServiceHandover) {
        let recent: Vec<LogLine> = std::mem::take(&mut service.recent)
            .into_iter()
            .map(LogLine::from)
            .collect();
        self.output.resume(recent, service.output);
        // What it said last stands until it says something else.
        self.watchers.notify_status = service.notify_status.clone();
        self.watchers.health = service.health;
        self.publish();
    }

    /// The machine has a process the resume could not take back: it is not
    /// touched (it may not be ours any more), and counts as an exit.
    fn lost_on_resume(&mut self, why: String) {
        error!(service = %self.definition.name, "after the upgrade: {why}; the service takes it as an exit");
        if self.machine.pid().is_some() {
            self.apply(Input::Exited(ExitReason::Exited(-1)));
        }
    }
}

fn supersede(waiters: &mut Vec<Reply>, service: &str, by: &'static str) {
    for waiter in waiters.drain(..) {
        let _ = waiter.send(Err(ServiceError::Superseded {
            service: service.to_owned(),
            by,
        }));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use crate::process::FakeSpawner;

    /// A thousand idle services each keep this future: it must hold the
    /// actor once, not twice as an `async fn` taking `self` by value would,
    /// and no seldom state inline (the freeze's and an exit's handling, a
    /// timer: with them it was 456 bytes on top of the actor, 288 without;
    /// the select's inbox, boxed wait and two watchers' receives remain).
    #[test]
    fn the_actor_task_holds_its_state_once() {
        let definition = crate::service::tests::definition(crate::config::RestartPolicy::Always, 3);
        let machine = Machine::new(definition.policy.clone());
        let (_handle, actor) = new_actor(
            Arc::new(definition),
            Arc::new(FakeSpawner::new()),
            EventBus::in_memory(),
            machine,
        );
        let future = actor.run();
        assert!(
            std::mem::size_of_val(&future) <= std::mem::size_of::<Actor>() + 320,
            "actor future {} bytes, actor {} bytes",
            std::mem::size_of_val(&future),
            std::mem::size_of::<Actor>()
        );
    }
}
