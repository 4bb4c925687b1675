//! Reload as a difference: the definitions a new configuration plans are
//! compared per service with the ones running, and only what changed is
//! touched. Every trigger (the verb, SIGHUP, the watchers) goes through one
//! `Reloader`, which runs one reload at a time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use humantime::format_duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::{Config, OrchestratorConfig};
use crate::discovery::Discovered;
use crate::events::EventBus;
use crate::name::ServiceName;
use crate::plan::{HostEnv, plan};
use crate::service::{ReadyWhen, ServiceDefinition, ServiceHandle};
use crate::supervisor::{StartedBy, SupervisorError, SupervisorHandle};
use crate::wire::{AppliedChange, ChangeAction, EventKind, ReloadReport};

/// What to do with one service. The definitions are boxed: most changes
/// of a reload are `Unchanged`, and a list of 10,000 changes each the size
/// of a definition was copied about while it grew and sorted.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    Added(Box<ServiceDefinition>),
    Removed(ServiceName),
    /// What it is spawned with changed: it restarts on the new definition.
    Restarted(Box<ServiceDefinition>, String),
    /// Only what applies live changed: same process, same counters.
    Updated(Box<ServiceDefinition>, String),
    Unchanged(ServiceName),
}

impl Change {
    pub fn service(&self) -> &str {
        match self {
            Change::Added(d) | Change::Restarted(d, _) | Change::Updated(d, _) => &d.name,
            Change::Removed(name) | Change::Unchanged(name) => name,
        }
    }

    pub fn action(&self) -> ChangeAction {
        match self {
            Change::Added(_) => ChangeAction::Added,
            Change::Removed(_) => ChangeAction::Removed,
            Change::Restarted(..) => ChangeAction::Restarted,
            Change::Updated(..) => ChangeAction::Updated,
            Change::Unchanged(_) => ChangeAction::Unchanged,
        }
    }

    pub fn reason(&self) -> Option<String> {
        match self {
            Change::Added(_) => Some("new in the configuration".to_owned()),
            Change::Removed(_) => Some("no longer in the configuration".to_owned()),
            Change::Restarted(_, reason) | Change::Updated(_, reason) => Some(reason.clone()),
            Change::Unchanged(_) => None,
        }
    }
}

/// Per service, sorted by name: what turns `old` into `new`.
pub fn diff(old: &[Arc<ServiceDefinition>], new: Vec<ServiceDefinition>) -> Vec<Change> {
    let mut old: BTreeMap<&str, &ServiceDefinition> =
        old.iter().map(|d| (d.name.as_str(), d.as_ref())).collect();
    let mut changes = Vec::with_capacity(new.len() + old.len());
    for definition in new {
        let Some(before) = old.remove(definition.name.as_str()) else {
            changes.push(Change::Added(Box::new(definition)));
            continue;
        };
        let spawn = spawn_changes(before, &definition);
        let live = live_changes(before, &definition);
        changes.push(if !spawn.is_empty() {
            let mut reason = spawn;
            reason.extend(live);
            Change::Restarted(Box::new(definition), reason.join(", "))
        } else if !live.is_empty() {
            Change::Updated(Box::new(definition), live.join(", "))
        } else {
            Change::Unchanged(definition.name)
        });
    }
    changes.extend(old.into_values().map(|d| Change::Removed(d.name.clone())));
    changes.sort_by(|a, b| a.service().cmp(b.service()));
    changes
}

/// What a new process would see differently.
fn spawn_changes(old: &ServiceDefinition, new: &ServiceDefinition) -> Vec<String> {
    let mut changed = Vec::new();
    let (a, b) = (&old.spawn, &new.spawn);
    if a.program != b.program {
        changed.push(format!(
            "program {} → {}",
            a.program.display(),
            b.program.display()
        ));
    }
    if a.args != b.args {
        changed.push("arguments".to_owned());
    }
    if a.env != b.env {
        changed.push("environment".to_owned());
    }
    if a.cwd != b.cwd {
        changed.push(format!(
            "data_dir {} → {}",
            a.cwd.display(),
            b.cwd.display()
        ));
    }
    // NOTIFY_SOCKET and WATCHDOG_USEC are in the process's environment,
    // read once at its start: only a new process sees them change.
    if old.notify != new.notify {
        changed.push(format!("notify {} → {}", old.notify, new.notify));
    }
    if old.watchdog != new.watchdog {
        let shown = |watchdog: Option<Duration>| {
            watchdog.map_or_else(
                || "off".to_owned(),
                |period| format_duration(period).to_string(),
            )
        };
        changed.push(format!(
            "watchdog {} → {}",
            shown(old.watchdog),
            shown(new.watchdog)
        ));
    }
    // With restart_on_binary_change off, both are None: a reload plans
    // with the setting the daemon started with (it needs a restart).
    match (&old.binary, &new.binary) {
        (Some(a), Some(b)) if a != b => changed.push("binary replaced on disk".to_owned()),
        // Absent (or unreadable) when last planned, there now: a deploy
        // after the daemon started; a failed service gets its start.
        (None, Some(_)) => changed.push("binary now on disk".to_owned()),
        // Gone: the running process goes on; its next start says why not.
        _ => {}
    }
    changed
}

/// What the machine can take without a new process.
fn live_changes(old: &ServiceDefinition, new: &ServiceDefinition) -> Vec<String> {
    let mut changed = Vec::new();
    let (a, b) = (&old.policy, &new.policy);
    let mut field = |differs: bool, name: &str| {
        if differs {
            changed.push(name.to_owned());
        }
    };
    field(a.restart != b.restart, "restart");
    field(a.max_restarts != b.max_restarts, "max_restarts");
    field(a.backoff != b.backoff, "backoff");
    field(a.start_limit != b.start_limit, "start_limit");
    field(a.stop_signal != b.stop_signal, "stop_signal");
    field(a.stop_timeout != b.stop_timeout, "stop_timeout");
    // Readiness is the machine's to judge, from the next start on.
    let ready = match (a.ready, b.ready) {
        (ReadyWhen::Grace(_), ReadyWhen::Grace(_)) => "start_grace",
        (ReadyWhen::Signalled { .. }, ReadyWhen::Signalled { .. }) => "start_timeout",
        _ => "readiness (start_grace, or notify and health within start_timeout)",
    };
    field(a.ready != b.ready, ready);
    // The probes and the dependencies are the daemon's, not the process's.
    field(old.health != new.health, "health");
    field(
        old.log_file != new.log_file,
        "log file options (log_timestamps, log_max_age, log_compress)",
    );
    field(old.depends_on != new.depends_on, "depends_on");
    field(old.configured != new.configured, "configured");
    if old.enabled != new.enabled {
        changed.push(format!("enabled {} → {}", old.enabled, new.enabled));
    }
    changed
}

/// Global options the running daemon cannot take: each named, so the
/// operator knows a daemon restart is due.
pub fn needs_restart(old: &OrchestratorConfig, new: &OrchestratorConfig) -> Vec<String> {
    let mut changed = Vec::new();
    let mut field = |differs: bool, name: &str| {
        if differs {
            changed.push(format!(
                "[orchestrator] {name} changed: it needs a daemon restart"
            ));
        }
    };
    field(
        old.data_dir != new.data_dir,
        "data_dir (and the socket in it)",
    );
    field(old.http_listen != new.http_listen, "http_listen");
    field(
        old.restart_on_binary_change != new.restart_on_binary_change,
        "restart_on_binary_change",
    );
    // The watchers are armed at start-up on what they watch.
    field(old.watch != new.watch, "watch");
    field(
        old.services_dir != new.services_dir,
        "services_dir (for the watchers; the services are planned from the new one now)",
    );
    field(
        old.http_token_file != new.http_token_file,
        "http_token_file",
    );
    field(
        old.api_max_connections != new.api_max_connections,
        "api_max_connections",
    );
    field(
        old.api_header_timeout != new.api_header_timeout,
        "api_header_timeout",
    );
    field(
        old.api_idle_timeout != new.api_idle_timeout,
        "api_idle_timeout",
    );
    field(
        old.state_max_bytes != new.state_max_bytes,
        "state_max_bytes",
    );
    // The log writers are made with their service's actor.
    field(old.log_max_bytes != new.log_max_bytes, "log_max_bytes");
    field(old.log_max_files != new.log_max_files, "log_max_files");
    field(old.log_format != new.log_format, "log_format");
    // The resource controller (and the lock on its parent) is made once,
    // before the first spawn.
    field(old.cgroup_parent != new.cgroup_parent, "cgroup_parent");
    field(old.require_limits != new.require_limits, "require_limits");
    field(
        old.log_level != new.log_level,
        "log_level (the daemon's own log; services get the new --log-level)",
    );
    field(
        old.shutdown_timeout != new.shutdown_timeout,
        "shutdown_timeout (the daemon's own; the services' stop_timeout default applied)",
    );
    changed
}

/// Carry out `changes`, all services at once; one that fails to start or
/// stop is a warning, never a reason to stop the others. Removed services
/// stop dependents first; added ones start in dependency order, after
/// every addition is known (one may depend on another added with it).
pub async fn apply(
    supervisor: &SupervisorHandle,
    changes: Vec<Change>,
) -> Result<ReloadReport, SupervisorError> {
    let mut report = ReloadReport::default();
    let mut removed = Vec::new();
    let mut added = Vec::new();
    let mut enabled_now = Vec::new();
    let mut tasks = JoinSet::new();
    for change in changes {
        report.applied.push(AppliedChange {
            service: change.service().to_owned(),
            action: change.action(),
            reason: change.reason(),
        });
        match change {
            Change::Unchanged(_) => {}
            Change::Removed(name) => removed.push(name),
            Change::Added(definition) => added.push(definition),
            Change::Restarted(definition, _) | Change::Updated(definition, _) => {
                // Enabled now, with dependencies: its actor leaves the
                // start to the dependency order below.
                if definition.enabled
                    && !definition.depends_on.is_empty()
                    && let Ok(before) = supervisor.definition(&definition.name).await
                    && !before.enabled
                {
                    enabled_now.push(definition.name.clone());
                }
                let respawn =
                    matches!(report.applied.last(), Some(c) if c.action == ChangeAction::Restarted);
                let supervisor = supervisor.clone();
                tasks.spawn(async move {
                    let name = definition.name.to_string();
                    let result = supervisor.reconfigure(*definition, respawn).await;
                    result.err().map(|error| (name, error))
                });
            }
        }
    }
    let mut failures: Vec<(String, SupervisorError)> = Vec::new();
    if !removed.is_empty() {
        // An error here is the supervisor gone: said below, after the
        // reconfigurations under way have been waited for.
        if let Err(error) = supervisor
            .stop_ordered(Some(&removed), ServiceHandle::shutdown_request)
            .await
        {
            failures.push(("-".to_owned(), error));
        }
        for name in removed {
            if let Err(error) = supervisor.remove(&name).await {
                failures.push((name.to_string(), error));
            }
        }
    }
    let mut to_start = Vec::new();
    for definition in added {
        let name = definition.name.clone();
        let enabled = definition.enabled;
        match supervisor.add(*definition).await {
            Ok(_) if enabled => to_start.push(name),
            Ok(_) => {}
            Err(error) => failures.push((name.to_string(), error)),
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Some(failure)) => failures.push(failure),
            Ok(None) => {}
            Err(error) => report.warnings.push(format!("internal error: {error}")),
        }
    }
    to_start.extend(enabled_now);
    if !to_start.is_empty() {
        match supervisor.start_ordered(&to_start, StartedBy::Daemon).await {
            Ok(outcomes) => {
                for (name, result) in outcomes {
                    if let Err(error) = result {
                        failures.push((name.to_string(), error.into()));
                    }
                }
            }
            Err(error) => failures.push(("-".to_owned(), error)),
        }
    }
    for (name, error) in failures {
        if error == SupervisorError::Gone {
            return Err(SupervisorError::Gone);
        }
        report.warnings.push(format!("{name}: {error}"));
    }
    report.warnings.sort();
    Ok(report)
}

/// Why a reload was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReloadError {
    #[error("the new configuration is invalid; nothing was changed: {}", .0.join("; "))]
    Invalid(Vec<String>),
    #[error("the daemon is shutting down; nothing was reloaded")]
    ShuttingDown,
}

pub type ReloadOutcome = Result<ReloadReport, ReloadError>;

/// Reads and validates the configuration anew, the way the daemon started:
/// the configuration with the problems that only keep one service from
/// starting (warnings, as at start-up), or every error that rejects it.
pub type Loader = Arc<dyn Fn() -> Result<Reread, Vec<String>> + Send + Sync>;

/// What a [`Loader`] read: the configuration, the warnings of its
/// validation, and the binaries of the services directory, which the
/// validation scanned (one scan per reload: with 6000 services it was a
/// third of the reload's time, and it ran twice).
#[derive(Debug, Clone)]
pub struct Reread {
    pub config: Config,
    pub warnings: Vec<String>,
    pub discovered: Vec<Discovered>,
    /// The plan the validation made of `config` and `discovered`, if it made
    /// one: reused when made as the reload would (with 6000 services, a
    /// second plan was a tenth of the reload).
    pub planned: Option<Planned>,
}

/// Definitions planned from a [`Reread`], and what they were planned with.
#[derive(Debug, Clone)]
pub struct Planned {
    pub host: HostEnv,
    pub definitions: Vec<ServiceDefinition>,
}

/// A service whose running process a reload would replace, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unapplied {
    pub service: String,
    pub reason: String,
}

/// Asks for reloads; cheap to clone.
#[derive(Clone)]
pub struct ReloadHandle {
    requests: mpsc::UnboundedSender<oneshot::Sender<ReloadOutcome>>,
    checks: mpsc::UnboundedSender<oneshot::Sender<Result<Vec<Unapplied>, ReloadError>>>,
    closing: Arc<AtomicBool>,
    /// True while a reload runs.
    busy: tokio::sync::watch::Receiver<bool>,
    /// Requests sent and not yet taken by the reloader.
    queued: Arc<AtomicUsize>,
}

impl ReloadHandle {
    /// Asks now (not when first polled); the future gives the report of a
    /// reload that began after this call. Requests made while one runs
    /// share the one run that follows it.
    pub fn reload(&self) -> impl std::future::Future<Output = ReloadOutcome> + use<> {
        let (reply, answer) = oneshot::channel();
        let sent = !self.closing.load(Ordering::Acquire) && self.send(reply);
        async move {
            if !sent {
                return Err(ReloadError::ShuttingDown);
            }
            answer.await.unwrap_or(Err(ReloadError::ShuttingDown))
        }
    }

    /// The services a reload would restart now: their process runs a
    /// definition the configuration on disk no longer has (edited and not
    /// reloaded). Nothing is applied. An upgrade refuses while there is
    /// one: the new daemon would read the edited file and take the old
    /// process for the new definition.
    pub async fn unapplied(&self) -> Result<Vec<Unapplied>, ReloadError> {
        let (reply, answer) = oneshot::channel();
        if self.checks.send(reply).is_err() {
            return Err(ReloadError::ShuttingDown);
        }
        answer.await.unwrap_or(Err(ReloadError::ShuttingDown))
    }

    /// Ask for a reload and do not wait for it (a signal).
    pub fn trigger(&self) {
        let (reply, _) = oneshot::channel();
        if !self.closing.load(Ordering::Acquire) {
            self.send(reply);
        }
    }

    fn send(&self, reply: oneshot::Sender<ReloadOutcome>) -> bool {
        self.queued.fetch_add(1, Ordering::AcqRel);
        if self.requests.send(reply).is_ok() {
            return true;
        }
        self.queued.fetch_sub(1, Ordering::AcqRel);
        false
    }

    /// Refuse every later reload (the daemon is shutting down).
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// Refuse every later reload and wait for the one running, if any, to
    /// be done (an upgrade freezes the services only then). False when a
    /// request was still queued (a watcher saw an edit a moment ago): it
    /// would be refused, and the edit taken for what runs; the caller then
    /// gives up and [`Self::reopen`]s.
    pub async fn quiesce(&self) -> bool {
        self.close();
        let mut busy = self.busy.clone();
        let _ = busy.wait_for(|busy| !*busy).await;
        self.queued.load(Ordering::Acquire) == 0
    }

    /// Take reloads again (an upgrade given up).
    pub fn reopen(&self) {
        self.closing.store(false, Ordering::Release);
    }
}

/// The task that runs reloads one at a time.
pub fn spawn_reloader(
    loader: Loader,
    host: HostEnv,
    current: OrchestratorConfig,
    supervisor: SupervisorHandle,
    events: EventBus,
) -> ReloadHandle {
    let (requests, mut pending) = mpsc::unbounded_channel::<oneshot::Sender<ReloadOutcome>>();
    let (checks, mut checking) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let closing = Arc::new(AtomicBool::new(false));
    let (busy_tx, busy) = tokio::sync::watch::channel(false);
    let handle = ReloadHandle {
        requests,
        checks,
        queued: Arc::clone(&queued),
        closing: Arc::clone(&closing),
        busy,
    };
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                first = pending.recv() => match first {
                    Some(first) => first,
                    None => return,
                },
                Some(reply) = checking.recv() => {
                    let found = unapplied_once(&loader, &host, &current, &supervisor).await;
                    let _ = reply.send(found);
                    continue;
                }
            };
            // Everyone who asked before this run began is answered by it:
            // a burst of requests costs one reload (plus one for those
            // that come in while it runs).
            let mut waiters = vec![first];
            while let Ok(more) = pending.try_recv() {
                waiters.push(more);
            }
            queued.fetch_sub(waiters.len(), Ordering::AcqRel);
            busy_tx.send_replace(true);
            let outcome = if closing.load(Ordering::Acquire) {
                Err(ReloadError::ShuttingDown)
            } else {
                reload_once(&loader, &host, &current, &supervisor, &events).await
            };
            busy_tx.send_replace(false);
            for waiter in waiters {
                let _ = waiter.send(outcome.clone());
            }
        }
    });
    handle
}

/// What the configuration on disk plans now: the global options, every
/// service's definition, and the warnings; or every error that rejects it.
async fn plan_anew(
    loader: &Loader,
    host: &HostEnv,
    current: &OrchestratorConfig,
) -> Result<(OrchestratorConfig, Vec<ServiceDefinition>, Vec<String>), Vec<String>> {
    let loader = Arc::clone(loader);
    let host = host.clone();
    // Binaries are tracked (or not) as they were at start: the running
    // definitions were planned so, and comparing like with like is what
    // tells a binary that appeared from one that was never looked at.
    let tracking = current.restart_on_binary_change;
    // Reading files and scanning services_dir block: off the runtime.
    tokio::task::spawn_blocking(move || {
        let Reread {
            mut config,
            warnings,
            discovered,
            planned,
        } = loader()?;
        let asked = config.orchestrator.restart_on_binary_change;
        let definitions = match planned {
            Some(planned) if planned.host == host && asked == tracking => planned.definitions,
            _ => {
                config.orchestrator.restart_on_binary_change = tracking;
                let definitions = plan(&config, &discovered, &host);
                config.orchestrator.restart_on_binary_change = asked;
                definitions
            }
        };
        Ok::<_, Vec<String>>((config.orchestrator, definitions, warnings))
    })
    .await
    .unwrap_or_else(|error| Err(vec![format!("internal error while loading: {error}")]))
}

/// See [`ReloadHandle::unapplied`].
async fn unapplied_once(
    loader: &Loader,
    host: &HostEnv,
    current: &OrchestratorConfig,
    supervisor: &SupervisorHandle,
) -> Result<Vec<Unapplied>, ReloadError> {
    let (_, definitions, _) = plan_anew(loader, host, current)
        .await
        .map_err(ReloadError::Invalid)?;
    let old = supervisor
        .definitions()
        .await
        .map_err(|_| ReloadError::ShuttingDown)?;
    Ok(diff(&old, definitions)
        .into_iter()
        .filter_map(|change| match change {
            Change::Restarted(definition, reason) => Some(Unapplied {
                service: definition.name.to_string(),
                reason,
            }),
            _ => None,
        })
        .collect())
}

async fn reload_once(
    loader: &Loader,
    host: &HostEnv,
    // What the daemon started with, never updated: an option that needs a
    // restart is reported on every reload until the daemon restarts.
    current: &OrchestratorConfig,
    supervisor: &SupervisorHandle,
    events: &EventBus,
) -> ReloadOutcome {
    info!("reloading the configuration");
    let planned = plan_anew(loader, host, current).await;
    let (orchestrator, definitions, found) = match planned {
        Ok(planned) => planned,
        Err(errors) => {
            for problem in &errors {
                error!("reload rejected: {problem}");
            }
            events.emit(
                None,
                EventKind::ReloadFailed {
                    errors: errors.clone(),
                },
            );
            return Err(ReloadError::Invalid(errors));
        }
    };
    let old = supervisor
        .definitions()
        .await
        .map_err(|_| ReloadError::ShuttingDown)?;
    let changes = diff(&old, definitions);
    let mut warnings = needs_restart(current, &orchestrator);
    warnings.extend(found);
    let mut report = match apply(supervisor, changes).await {
        Ok(report) => report,
        Err(_) => return Err(ReloadError::ShuttingDown),
    };
    report.warnings.splice(0..0, warnings);
    for change in &report.applied {
        if change.action != ChangeAction::Unchanged {
            info!(
                service = %change.service,
                action = ?change.action,
                reason = change.reason.as_deref().unwrap_or(""),
                "reload"
            );
        }
    }
    for warning in &report.warnings {
        warn!("reload: {warning}");
    }
    let unchanged = report
        .applied
        .iter()
        .filter(|change| change.action == ChangeAction::Unchanged)
        .count();
    info!(
        "reload applied: {} changed, {unchanged} unchanged",
        report.applied.len() - unchanged
    );
    events.emit(
        None,
        EventKind::Reloaded {
            report: report.clone(),
        },
    );
    Ok(report)
}

#[cfg(test)]
mod tests;
