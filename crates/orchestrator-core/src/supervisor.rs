//! The registry of services, as an actor that owns them: for each name its
//! handle, its definition and its actor's task. Callers hold a cheap
//! `SupervisorHandle`; the map changes only inside the supervisor's task, so
//! no lock guards it. Services can be added and removed while it runs
//! (reload), and an actor that panics is reported with its panic message
//! instead of vanishing.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinError, JoinSet};
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::cgroup::Usage;
use crate::events::{EventBus, EventKind};
use crate::handover::FrozenService;
use crate::name::ServiceName;
use crate::process::Spawner;
use crate::service::{
    ServiceDefinition, ServiceError, ServiceHandle, State, service_actor, service_actor_resumed,
};
use crate::wire::ServiceInfo;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("unknown service {0:?}: `orchestrator status` lists the known ones")]
    UnknownService(String),
    #[error("service {0:?} exists already; remove it first")]
    AlreadyExists(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the supervisor has ended (the daemon is shutting down)")]
    Gone,
    #[error("the daemon is shutting down; no service is added any more")]
    ShuttingDown,
    #[error("{}; every service goes on as before", join_errors(.0))]
    FreezeFailed(Vec<ServiceError>),
}

fn join_errors(errors: &[ServiceError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// One service as the supervisor owns it.
struct Entry {
    handle: ServiceHandle,
    definition: Arc<ServiceDefinition>,
    /// Set when its actor panicked: the service is no longer supervised.
    panic: Option<String>,
    /// 1 when it was first defined, +1 for each reload that changed it.
    generation: u64,
}

enum Command {
    Get(String, oneshot::Sender<Option<ServiceHandle>>),
    All(oneshot::Sender<Vec<ServiceHandle>>),
    /// The services enabled by their current definition.
    Enabled(oneshot::Sender<Vec<ServiceHandle>>),
    Info(Option<String>, oneshot::Sender<Option<Vec<ServiceInfo>>>),
    Definition(String, oneshot::Sender<Option<Arc<ServiceDefinition>>>),
    Add(
        Box<ServiceDefinition>,
        oneshot::Sender<Result<ServiceHandle, SupervisorError>>,
    ),
    /// Forget a service whose process is already stopped (callers stop it first).
    Remove(String, oneshot::Sender<Option<ServiceHandle>>),
    /// Every definition, sorted by name (what a reload compares against).
    Definitions(oneshot::Sender<Vec<Arc<ServiceDefinition>>>),
    /// Record a reload's new definition and hand out the handle, whose
    /// actor is then told.
    Replace(
        Arc<ServiceDefinition>,
        oneshot::Sender<Option<ServiceHandle>>,
    ),
    /// The daemon is shutting down: refuse every later Add, so a reload
    /// racing the shutdown cannot leave a new service running.
    Close(oneshot::Sender<()>),
    /// Every service's handle and definition, for the dependency order.
    Members(oneshot::Sender<BTreeMap<ServiceName, order::Member>>),
    /// An upgrade begins: no service is added any more; every service's
    /// handle and generation, to freeze them.
    BeginFreeze(oneshot::Sender<Vec<(ServiceHandle, u64)>>),
    /// A freeze given up: these services go on here (new actors from what
    /// their old ones handed over), and services may be added again.
    Unfreeze(Vec<FrozenService>, oneshot::Sender<()>),
}

/// A cheap, cloneable way to act on the services.
#[derive(Clone)]
pub struct SupervisorHandle {
    commands: mpsc::UnboundedSender<Command>,
    /// What services without a cgroup's counts use, from /proc.
    usage: Arc<crate::usage::UsageCache>,
}

/// Start one actor per definition (all stopped) and the supervisor that owns them.
pub fn spawn_supervisor(
    definitions: Vec<ServiceDefinition>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
) -> SupervisorHandle {
    spawn_supervisor_resumed(definitions, Vec::new(), spawner, events).0
}

/// [`spawn_supervisor`] after an upgrade: each service with a hand-over in
/// `resumed` goes on as it was (see `service_actor_resumed`; its generation
/// too), the others are stopped. Returns the hand-overs of services no
/// longer defined (removed from the configuration before the upgrade): the
/// caller stops their processes with [`stop_handed_over`].
pub fn spawn_supervisor_resumed(
    definitions: Vec<ServiceDefinition>,
    resumed: Vec<FrozenService>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
) -> (SupervisorHandle, Vec<FrozenService>) {
    spawn_supervisor_resumed_after(
        definitions,
        resumed,
        spawner,
        events,
        watch::channel(true).1,
    )
}

/// [`spawn_supervisor_resumed`], the services handed over adopting their
/// processes only once `adopt` says true (or its sender is gone): their
/// status answers from the state they were handed over in meanwhile, and a
/// command to one waits for it.
pub fn spawn_supervisor_resumed_after(
    definitions: Vec<ServiceDefinition>,
    resumed: Vec<FrozenService>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
    adopt: watch::Receiver<bool>,
) -> (SupervisorHandle, Vec<FrozenService>) {
    let mut supervisor = Supervisor {
        services: BTreeMap::new(),
        tasks: JoinSet::new(),
        task_names: HashMap::new(),
        spawner,
        events,
        closing: false,
        adopt,
    };
    let mut resumed: BTreeMap<String, FrozenService> = resumed
        .into_iter()
        .map(|frozen| (frozen.service.name.clone(), frozen))
        .collect();
    for definition in definitions {
        // Names are unique: the plan comes from a map keyed by name.
        match resumed.remove(definition.name.as_str()) {
            Some(frozen) => supervisor.add_resumed(Arc::new(definition), frozen),
            None => {
                let _ = supervisor.add(definition);
            }
        }
    }
    let (commands_tx, commands) = mpsc::unbounded_channel();
    tokio::spawn(supervisor.run(commands));
    let handle = SupervisorHandle {
        commands: commands_tx,
        usage: Arc::default(),
    };
    (handle, resumed.into_values().collect())
}

/// Stop the process of a service handed over by an upgrade but no longer
/// defined: adopted (untouched if it is not certainly ours), SIGTERM to its
/// group, SIGKILL after `timeout`, reaped (its cgroup removed). Returns the
/// pid stopped, if any.
pub async fn stop_handed_over(
    spawner: &Arc<dyn Spawner>,
    frozen: FrozenService,
    timeout: Duration,
) -> Option<u32> {
    let FrozenService {
        service,
        pidfd,
        stdout,
        stderr,
        notify,
        ..
    } = frozen;
    // Its output and notify socket are not read any more.
    drop((stdout, stderr, notify));
    let info = service.child?;
    let released = info.into_released(pidfd);
    let mut child = match spawner.adopt(released, &service.name) {
        Ok(child) => child,
        Err(error) => {
            warn!("{error}");
            return None;
        }
    };
    let pid = child.pid();
    info!(service = %service.name, pid, "no longer in the configuration after the upgrade: stopping it");
    let _ = child.signal_group(nix::sys::signal::Signal::SIGTERM);
    if tokio::time::timeout(timeout, child.wait()).await.is_err() {
        warn!(service = %service.name, pid, "did not stop within {timeout:?}: sent SIGKILL");
        let _ = child.signal_group(nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait().await;
    }
    Some(pid)
}

struct Supervisor {
    services: BTreeMap<ServiceName, Entry>,
    tasks: JoinSet<()>,
    task_names: HashMap<tokio::task::Id, ServiceName>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
    closing: bool,
    /// When services handed over may adopt their processes.
    adopt: watch::Receiver<bool>,
}

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_actor_end(joined);
                }
            }
        }
        // Every handle is gone. Dropping ours lets each actor see that and
        // kill its process; the tasks are awaited, not aborted, since an
        // aborted actor would leave its process running unsupervised.
        self.services.clear();
        while let Some(joined) = self.tasks.join_next_with_id().await {
            self.on_actor_end(joined);
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::Get(name, reply) => {
                let _ = reply.send(self.services.get(name.as_str()).map(|e| e.handle.clone()));
            }
            Command::All(reply) => {
                let _ = reply.send(self.services.values().map(|e| e.handle.clone()).collect());
            }
            Command::Enabled(reply) => {
                let _ = reply.send(
                    self.services
                        .values()
                        .filter(|e| e.definition.enabled)
                        .map(|e| e.handle.clone())
                        .collect(),
                );
            }
            Command::Info(None, reply) => {
                let _ = reply.send(Some(self.services.values().map(info_of).collect()));
            }
            Command::Info(Some(name), reply) => {
                let _ = reply.send(self.services.get(name.as_str()).map(|e| vec![info_of(e)]));
            }
            Command::Definition(name, reply) => {
                let _ = reply.send(
                    self.services
                        .get(name.as_str())
                        .map(|e| Arc::clone(&e.definition)),
                );
            }
            Command::Add(definition, reply) => {
                let _ = reply.send(self.add(*definition));
            }
            Command::Remove(name, reply) => {
                let _ = reply.send(self.services.remove(name.as_str()).map(|e| e.handle));
            }
            Command::Definitions(reply) => {
                let _ = reply.send(
                    self.services
                        .values()
                        .map(|e| Arc::clone(&e.definition))
                        .collect(),
                );
            }
            Command::Replace(definition, reply) => {
                let entry = self.services.get_mut(&definition.name);
                let _ = reply.send(entry.map(|entry| {
                    entry.definition = definition;
                    entry.generation += 1;
                    entry.handle.clone()
                }));
            }
            Command::Close(reply) => {
                self.closing = true;
                let _ = reply.send(());
            }
            Command::BeginFreeze(reply) => {
                self.closing = true;
                let _ = reply.send(
                    self.services
                        .values()
                        .map(|entry| (entry.handle.clone(), entry.generation))
                        .collect(),
                );
            }
            Command::Unfreeze(frozen, reply) => {
                for frozen in frozen {
                    let Some(entry) = self.services.get(frozen.service.name.as_str()) else {
                        continue;
                    };
                    let definition = Arc::clone(&entry.definition);
                    self.add_resumed(definition, frozen);
                }
                self.closing = false;
                let _ = reply.send(());
            }
            Command::Members(reply) => {
                let _ = reply.send(
                    self.services
                        .iter()
                        .map(|(name, entry)| {
                            let member = order::Member {
                                handle: entry.handle.clone(),
                                definition: Arc::clone(&entry.definition),
                            };
                            (name.clone(), member)
                        })
                        .collect(),
                );
            }
        }
    }

    fn add(&mut self, definition: ServiceDefinition) -> Result<ServiceHandle, SupervisorError> {
        if self.closing {
            return Err(SupervisorError::ShuttingDown);
        }
        if self.services.contains_key(&definition.name) {
            return Err(SupervisorError::AlreadyExists(definition.name.to_string()));
        }
        let definition = Arc::new(definition);
        let (handle, actor) = service_actor(
            Arc::clone(&definition),
            Arc::clone(&self.spawner),
            self.events.clone(),
        );
        let task = self.tasks.spawn(actor);
        self.task_names.insert(task.id(), definition.name.clone());
        self.services.insert(
            definition.name.clone(),
            Entry {
                handle: handle.clone(),
                definition,
                panic: None,
                generation: 1,
            },
        );
        Ok(handle)
    }

    /// A service's actor from what an old one (here or in the daemon before
    /// the upgrade) handed over; replaces an entry of that name.
    fn add_resumed(&mut self, definition: Arc<ServiceDefinition>, frozen: FrozenService) {
        let generation = frozen.service.generation.max(1);
        let (handle, actor) = service_actor_resumed(
            Arc::clone(&definition),
            Arc::clone(&self.spawner),
            self.events.clone(),
            frozen,
            self.adopt.clone(),
        );
        let task = self.tasks.spawn(actor);
        self.task_names.insert(task.id(), definition.name.clone());
        self.services.insert(
            definition.name.clone(),
            Entry {
                handle,
                definition,
                panic: None,
                generation,
            },
        );
    }

    fn on_actor_end(&mut self, joined: Result<(tokio::task::Id, ()), JoinError>) {
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(error) => error.id(),
        };
        let Some(name) = self.task_names.remove(&id) else {
            return;
        };
        let Err(error) = joined else {
            // A normal end: its handles were all dropped (removed, or the
            // daemon is going away).
            return;
        };
        let message = panic_message(error);
        error!(service = %name, "internal error: the task supervising this service ended: {message}; its process, if any, is no longer supervised");
        self.events.emit(
            Some(&name),
            EventKind::SupervisionLost {
                error: message.clone(),
            },
        );
        if let Some(entry) = self.services.get_mut(&name) {
            entry.panic = Some(message);
        }
    }
}

fn panic_message(error: JoinError) -> String {
    if error.is_cancelled() {
        return "it was cancelled".to_owned();
    }
    let payload = error.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .map_or_else(
            || "it panicked".to_owned(),
            |message| format!("it panicked: {message}"),
        )
}

fn info_of(entry: &Entry) -> ServiceInfo {
    let handle = &entry.handle;
    let status = handle.status();
    let mut info = ServiceInfo {
        name: handle.name().to_owned(),
        // From the definition, not the handle: a reload may have changed them.
        configured: entry.definition.configured,
        enabled: entry.definition.enabled,
        state: status.state,
        pid: status.pid,
        uptime: status
            .running_since
            .map(|since| Instant::now().saturating_duration_since(since).as_secs()),
        restarts: status.restarts,
        requested_starts: status.requested_starts,
        last_exit_code: status.last_exit.map(|reason| reason.code()),
        last_exit_signal: status.last_exit.and_then(|reason| reason.signal_name()),
        last_error: status.last_error.clone(),
        completed: status.completed,
        // SPEC: healthy, unhealthy or unknown whenever a check is set (a
        // stopped service's is unknown), none only without one.
        health: status.health.or(entry
            .definition
            .health
            .as_ref()
            .map(|_| crate::wire::Health::Unknown)),
        log_dropped_bytes: handle.output().dropped_bytes(),
        generation: entry.generation,
        memory_bytes: None,
        cpu_seconds: None,
        oom_kills: handle.resources().oom_kills(),
        reason: None,
        notify_rejected: handle.resources().notify_rejected(),
        depends_on: BTreeMap::new(),
    };
    if status.pid.is_some()
        && let Some(usage) = handle.resources().cgroup_usage()
    {
        set_usage(&mut info, usage);
    }
    info.reason = status.notify_status;
    if let Some(at) = status.retry_at
        && info.state == State::Restarting
    {
        // Whole seconds, rounded up: "retry in 0s" would read as overdue.
        let left = at.saturating_duration_since(Instant::now());
        let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        info.reason = Some(match &status.last_error {
            Some(error) => format!("retry in {seconds}s: {error}"),
            None => format!("retry in {seconds}s"),
        });
    }
    if let Some(waiting) = handle.resources().waiting()
        && matches!(
            info.state,
            State::Stopped | State::Failed | State::Restarting
        )
    {
        // A waiting start shows as one; one given up shows as not started.
        if waiting.starts_with("waiting") {
            info.state = State::Starting;
        }
        info.reason = Some(waiting);
    }
    info.depends_on = entry
        .definition
        .depends_on
        .iter()
        .map(|dependency| (dependency.name.to_string(), dependency.condition))
        .collect();
    if let Some(panic) = &entry.panic {
        info.state = State::Failed;
        info.last_error = Some(format!(
            "internal error: its supervising task ended ({panic}); restart the daemon"
        ));
    }
    info
}

fn set_usage(info: &mut ServiceInfo, usage: Usage) {
    info.memory_bytes = usage.memory_bytes;
    // Microseconds to seconds: exact enough for a column and a counter.
    info.cpu_seconds = usage.cpu_usec.map(|usec| usec as f64 / 1e6);
}

/// Services without a cgroup (or whose cgroup does not count memory or
/// CPU): their process groups' use, from one /proc scan for all of them
/// (shared by the callers of a second: see `UsageCache`), in the caller's
/// task rather than the supervisor's.
async fn fill_usage_from_proc(cache: &Arc<crate::usage::UsageCache>, infos: &mut [ServiceInfo]) {
    let lacking = |info: &ServiceInfo| {
        info.pid.is_some() && (info.memory_bytes.is_none() || info.cpu_seconds.is_none())
    };
    let groups: Vec<u32> = infos
        .iter()
        .filter(|i| lacking(i))
        .filter_map(|i| i.pid)
        .collect();
    if groups.is_empty() {
        return;
    }
    let usage = cache.usage(groups).await;
    for info in infos.iter_mut().filter(|i| lacking(i)) {
        if let Some(found) = info.pid.and_then(|pid| usage.get(&pid)) {
            if info.memory_bytes.is_none() {
                info.memory_bytes = found.memory_bytes;
            }
            if info.cpu_seconds.is_none() {
                info.cpu_seconds = found.cpu_usec.map(|usec| usec as f64 / 1e6);
            }
        }
    }
}

impl SupervisorHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(make(reply))
            .map_err(|_| SupervisorError::Gone)?;
        answer.await.map_err(|_| SupervisorError::Gone)
    }

    pub async fn service(&self, name: &str) -> Result<ServiceHandle, SupervisorError> {
        self.ask(|reply| Command::Get(name.to_owned(), reply))
            .await?
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))
    }

    /// Every service, sorted by name.
    pub async fn services(&self) -> Result<Vec<ServiceHandle>, SupervisorError> {
        self.ask(Command::All).await
    }

    /// The definition a service runs with.
    pub async fn definition(&self, name: &str) -> Result<Arc<ServiceDefinition>, SupervisorError> {
        self.ask(|reply| Command::Definition(name.to_owned(), reply))
            .await?
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))
    }

    /// Supervise one more service (stopped; start it to run it).
    pub async fn add(
        &self,
        definition: ServiceDefinition,
    ) -> Result<ServiceHandle, SupervisorError> {
        self.ask(|reply| Command::Add(Box::new(definition), reply))
            .await?
    }

    /// Stop a service and forget it; returns once its process is gone.
    pub async fn remove(&self, name: &str) -> Result<(), SupervisorError> {
        let handle = self.service(name).await?;
        match handle.shutdown().await {
            // Its actor is gone (it panicked): its process was killed when
            // the actor dropped it, so there is nothing left to stop.
            Ok(()) | Err(ServiceError::Gone { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        self.ask(|reply| Command::Remove(name.to_owned(), reply))
            .await?
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))?;
        Ok(())
    }

    /// Every definition, sorted by name.
    pub async fn definitions(&self) -> Result<Vec<Arc<ServiceDefinition>>, SupervisorError> {
        self.ask(Command::Definitions).await
    }

    /// Run a service with a reload's definition (see
    /// [`ServiceHandle::reconfigure`]); its generation goes up by one.
    pub async fn reconfigure(
        &self,
        definition: ServiceDefinition,
        respawn: bool,
    ) -> Result<(), SupervisorError> {
        let name = definition.name.to_string();
        let definition = Arc::new(definition);
        let handle = self
            .ask(|reply| Command::Replace(Arc::clone(&definition), reply))
            .await?
            .ok_or(SupervisorError::UnknownService(name))?;
        Ok(handle.reconfigure(definition, respawn).await?)
    }

    /// Freeze every service at once for an upgrade (see
    /// [`ServiceHandle::freeze`]), each with its generation. All or none:
    /// when one cannot be frozen, those frozen already go on here as they
    /// were (new actors, same processes and pipes) and the error names each
    /// failure. From the start of the freeze no service is added (a reload
    /// must be quiesced by the caller first). A service whose actor had
    /// ended (an internal error) has nothing to hand over and is left out.
    pub async fn freeze_all(&self) -> Result<Vec<FrozenService>, SupervisorError> {
        let members = self.ask(Command::BeginFreeze).await?;
        let mut tasks = JoinSet::new();
        for (handle, generation) in members {
            tasks.spawn(async move {
                let name = handle.name().to_owned();
                let result = handle.freeze().await;
                (name, generation, result)
            });
        }
        let mut frozen = Vec::new();
        let mut failures = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, generation, Ok(mut service))) => {
                    service.service.generation = generation;
                    frozen.push(service);
                }
                Ok((name, _, Err(ServiceError::Gone { .. }))) => {
                    warn!(service = %name, "its supervising task had ended: nothing to hand over, the new daemon starts it afresh if it is enabled");
                }
                Ok((_, _, Err(error))) => failures.push(error),
                Err(error) => failures.push(ServiceError::FreezeRefused {
                    service: "?".to_owned(),
                    reason: format!("internal error: {error}"),
                }),
            }
        }
        if failures.is_empty() {
            frozen.sort_by(|a, b| a.service.name.cmp(&b.service.name));
            return Ok(frozen);
        }
        let (reply, answer) = oneshot::channel();
        let _ = self.commands.send(Command::Unfreeze(frozen, reply));
        let _ = answer.await;
        Err(SupervisorError::FreezeFailed(failures))
    }

    /// From now on no service is added (the daemon is shutting down).
    pub async fn close(&self) -> Result<(), SupervisorError> {
        self.ask(Command::Close).await
    }

    /// Start `name` after whatever it depends on (see `order`); returns
    /// once it is up, or why it could not start.
    pub async fn start(&self, name: &str) -> Result<(), SupervisorError> {
        let name = ServiceName::parse(name)
            .map_err(|_| SupervisorError::UnknownService(name.to_owned()))?;
        let outcomes = self
            .start_ordered(std::slice::from_ref(&name), StartedBy::User)
            .await?;
        for (_, result) in outcomes {
            result?;
        }
        Ok(())
    }

    /// Stop `name` alone: what depends on it keeps running (the caller
    /// says so; no surprise cascade).
    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        let handle = self.service(name).await?;
        let stop = handle.resources().cancel_then(|| handle.stop_request());
        Ok(stop.await?)
    }

    pub async fn restart(&self, name: &str) -> Result<(), SupervisorError> {
        Ok(self.service(name).await?.restart().await?)
    }

    pub async fn status(&self, name: &str) -> Result<State, SupervisorError> {
        Ok(self.info(name).await?.state)
    }

    pub async fn is_running(&self, name: &str) -> bool {
        matches!(self.status(name).await, Ok(State::Running))
    }

    pub async fn info(&self, name: &str) -> Result<ServiceInfo, SupervisorError> {
        let mut infos = self
            .ask(|reply| Command::Info(Some(name.to_owned()), reply))
            .await?
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))?;
        fill_usage_from_proc(&self.usage, &mut infos).await;
        infos
            .pop()
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))
    }

    /// Every service's info, sorted by name.
    pub async fn list(&self) -> Result<Vec<ServiceInfo>, SupervisorError> {
        let mut infos = self
            .ask(|reply| Command::Info(None, reply))
            .await?
            .unwrap_or_default();
        fill_usage_from_proc(&self.usage, &mut infos).await;
        Ok(infos)
    }

    /// Those services whose start waits for a dependency (their `reason`
    /// says what for): without the usage `list` reads from /proc.
    pub async fn waiting_for_dependencies(&self) -> Result<Vec<String>, SupervisorError> {
        let infos = self
            .ask(|reply| Command::Info(None, reply))
            .await?
            .unwrap_or_default();
        Ok(infos
            .into_iter()
            .filter(|service| {
                service
                    .reason
                    .as_deref()
                    .is_some_and(|reason| reason.starts_with("waiting for"))
            })
            .map(|service| service.name)
            .collect())
    }

    /// Start every enabled service, all at once; one that cannot start
    /// never holds up the others. Returns each failure.
    pub async fn start_all(&self) -> Result<Vec<ServiceError>, SupervisorError> {
        self.start_all_except(&std::collections::BTreeSet::new())
            .await
    }

    /// `start_all`, leaving out the services named in `skip` (after an
    /// upgrade: those handed over, which go on as they were).
    pub async fn start_all_except(
        &self,
        skip: &std::collections::BTreeSet<String>,
    ) -> Result<Vec<ServiceError>, SupervisorError> {
        // The current definitions decide, not the handles' copies: a reload
        // may have changed `enabled` since.
        let handles = self.ask(Command::Enabled).await?;
        let names: Vec<ServiceName> = handles
            .iter()
            .filter(|handle| !skip.contains(handle.name()))
            .filter_map(|handle| ServiceName::parse(handle.name()).ok())
            .collect();
        let outcomes = self.start_ordered(&names, StartedBy::Daemon).await?;
        Ok(outcomes
            .into_iter()
            .filter_map(|(_, result)| result.err())
            .collect())
    }

    /// Stop every service, dependents before their dependencies, the rest
    /// in parallel; returns when all are down.
    pub async fn stop_all(&self) -> Result<(), SupervisorError> {
        self.stop_ordered(None, ServiceHandle::stop_request).await
    }

    /// Stop everything within `timeout`; whatever still runs then is killed.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), SupervisorError> {
        self.close().await?;
        info!("stopping every service");
        let stops = self.stop_ordered(None, ServiceHandle::shutdown_request);
        if tokio::time::timeout(timeout, stops).await.is_err() {
            warn!("shutdown_timeout of {timeout:?} passed: killing what is left");
            self.kill_all().await?;
        }
        Ok(())
    }

    /// SIGKILL every service's process group now; returns when all are reaped.
    pub async fn kill_all(&self) -> Result<(), SupervisorError> {
        self.close().await?;
        let handles = self.services().await?;
        for_each_parallel(handles, |handle| async move { handle.kill().await }).await;
        Ok(())
    }
}

async fn for_each_parallel<F, Fut>(handles: Vec<ServiceHandle>, action: F)
where
    F: Fn(ServiceHandle) -> Fut,
    Fut: std::future::Future<Output = Result<(), ServiceError>> + Send + 'static,
{
    let mut tasks = JoinSet::new();
    for handle in handles {
        tasks.spawn(action(handle));
    }
    while let Some(joined) = tasks.join_next().await {
        if let Ok(Err(error)) = joined {
            warn!("{error}");
        }
    }
}

mod order;
pub use order::StartedBy;

#[cfg(test)]
mod tests;
