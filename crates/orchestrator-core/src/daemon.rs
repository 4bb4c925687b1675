//! The daemon's life: discover, plan, start everything, then wait on one
//! funnel of events (signals, and later the API and file watcher) until it
//! is told to shut down. The event source is a parameter, so tests drive a
//! whole daemon in-process.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::Config;
use crate::discovery::discover_unconfigured;
use crate::events::{EventBus, EventKind};
use crate::plan::{HostEnv, plan};
use crate::process::Spawner;
use crate::reload::{Loader, ReloadHandle, spawn_reloader};
use crate::service::ServiceDefinition;
use crate::state::{
    StateError, StateStore, check_data_dir, find_leftovers, read_state_at_most, set_aside,
    stop_leftovers,
};
use crate::supervisor::{SupervisorHandle, spawn_supervisor_resumed_after, stop_handed_over};
use nix::sys::signal::Signal;

#[derive(Debug)]
pub enum DaemonEvent {
    /// Stop every service gracefully, then return (SIGTERM, SIGINT).
    Shutdown,
    /// Kill every service now (a second SIGINT).
    ForceShutdown,
    /// Re-read the configuration (SIGHUP).
    Reload,
    /// Freeze every service for an upgrade (docs/upgrade.md) and hand them
    /// over; `run` then returns without stopping anything. On an error
    /// nothing is frozen and the daemon goes on.
    Freeze {
        reply: oneshot::Sender<Result<Vec<crate::handover::FrozenService>, FreezeError>>,
    },
}

/// Why services could not be frozen for an upgrade.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot freeze the services for the upgrade: {reason}; nothing was changed")]
    Refused { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create data_dir {dir}: {source}; check its parent's permissions or set [orchestrator] data_dir", dir = .dir.display())]
    DataDir {
        dir: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Untrusted(#[from] crate::state::TrustError),
    #[error(transparent)]
    Supervisor(#[from] crate::supervisor::SupervisorError),
}

/// What a run takes over from an upgrade (see [`run`]); the default is a
/// fresh start.
#[derive(Debug, Default)]
pub struct Resumed {
    /// The services the previous daemon froze.
    pub services: Vec<crate::handover::FrozenService>,
    /// The previous daemon's version, after an exec; `None` when the same
    /// binary resumes what a failed exec left (no upgrade happened).
    pub upgraded_from: Option<String>,
}

/// What the control plane needs to act on a running daemon.
#[derive(Clone)]
pub struct DaemonHandles {
    pub supervisor: SupervisorHandle,
    pub events: EventBus,
    /// The crash-recovery record; its `failed_writes()` is for the API to
    /// show (status/metrics).
    pub state: StateStore,
    /// Every reload goes through it (the API's, SIGHUP's, the watchers').
    pub reloader: ReloadHandle,
    /// How many services the daemon started with (configured and
    /// discovered), to size what depends on it.
    pub services: usize,
}

/// Run until a Shutdown (or ForceShutdown) event, or until `events` closes.
/// `events` is borrowed: what a run leaves in it (events sent while a
/// freeze was under way) is still there for the caller, who decides.
/// `ready` receives the handles as soon as the services exist (before they
/// have all started), so the API can answer during a long start. `loader`
/// reads the configuration anew for a reload, the way this one was read;
/// without it a reload reads nothing and rejects.
///
/// After an upgrade, `resumed.services` holds the services the previous daemon
/// froze (docs/upgrade.md): nothing is cleaned up as after a crash, each
/// defined one goes on as it was (same process, pipes, counters, timers;
/// not started again), one no longer defined has its process stopped, the
/// others start as at any start. `upgraded_from` (the old daemon's version,
/// after an exec; `None` at a fresh start and when a failed exec's services
/// are resumed by the same binary) is what makes this run an upgrade's: an
/// `upgraded {from, to}` event follows `daemon_started`, with or without
/// services, and nothing is cleaned up as after a crash.
///
/// A `Freeze` event freezes every service (after any reload in progress)
/// and answers with them; `run` then returns without stopping anything, for
/// the caller to exec the new binary. A freeze that fails changes nothing
/// and `run` goes on.
pub async fn run(
    config: Config,
    loader: Option<Loader>,
    spawner: Arc<dyn Spawner>,
    host: HostEnv,
    events: &mut mpsc::Receiver<DaemonEvent>,
    ready: Option<oneshot::Sender<DaemonHandles>>,
    resumed: Resumed,
) -> Result<(), DaemonError> {
    let Resumed {
        services: resumed,
        upgraded_from,
    } = resumed;
    let orchestrator = config.orchestrator.clone();
    create_private_dir(&orchestrator.data_dir)?;
    let discovered = discover_unconfigured(&config).unwrap_or_else(|error| {
        warn!("{error}");
        Vec::new()
    });
    let definitions = plan(&config, &discovered, &host);
    let loader = loader.unwrap_or_else(|| {
        Arc::new(|| {
            Err(vec![
                "this daemon was started without a way to re-read its configuration".to_owned(),
            ])
        })
    });
    // The definitions hold all the services need; the parsed sections are
    // not kept for the daemon's life (with 1000 services they weigh ~0.5 MiB).
    drop(config);
    let enabled = definitions.iter().filter(|d| d.enabled).count();
    info!(
        services = definitions.len(),
        enabled,
        services_dir = %orchestrator.services_dir.display(),
        "starting"
    );
    let bus = EventBus::persisted(orchestrator.data_dir.join("events.jsonl"));
    bus.emit(
        None,
        EventKind::DaemonStarted {
            pid: std::process::id(),
        },
    );
    if let Some(from) = &upgraded_from {
        let to = env!("CARGO_PKG_VERSION").to_owned();
        info!(from = %from, to = %to, services = resumed.len(), "resuming the services after an upgrade");
        bus.emit(
            None,
            EventKind::Upgraded {
                from: from.clone(),
                to,
            },
        );
    }
    let state_path = orchestrator.data_dir.join("state");
    // The services handed over are ours, running: not a dead daemon's
    // leftovers. (A daemon that died during an upgrade left no hand-over.)
    if resumed.is_empty() && upgraded_from.is_none() {
        stop_what_a_dead_daemon_left(&orchestrator, &definitions, &spawner, &bus).await;
    }
    // Those handed over are in the first record written, before anything
    // else changes.
    let handed_over_pids: Vec<(String, u32)> = resumed
        .iter()
        .filter_map(|frozen| {
            let child = frozen.service.child.as_ref()?;
            Some((frozen.service.name.clone(), child.pid))
        })
        .collect();
    let running = crate::state::handed_over_records(&state_path, &handed_over_pids);
    // Twice the services: a reload that adds some on a full disk still fits.
    let store = StateStore::start_with(
        state_path,
        definitions.len() * 2,
        Some(bus.clone()),
        running,
    );
    // The file is reserved (or its failure said) before the first spawn, so
    // no spawn waits on free space to be recorded.
    store.flush().await;
    let observer = store.clone();
    bus.set_observer(move |event| observer.observe(event));
    let planned = definitions.len();
    let handed_over: std::collections::BTreeSet<String> = resumed
        .iter()
        .map(|frozen| frozen.service.name.clone())
        .collect();
    let (adopt, adopt_after) = tokio::sync::watch::channel(false);
    let (supervisor, removed) = spawn_supervisor_resumed_after(
        definitions,
        resumed,
        Arc::clone(&spawner),
        bus.clone(),
        adopt_after,
    );
    for frozen in removed {
        let spawner = Arc::clone(&spawner);
        let store = store.clone();
        let timeout = orchestrator.shutdown_timeout;
        tokio::spawn(async move {
            let name = frozen.service.name.clone();
            stop_handed_over(&spawner, frozen, timeout).await;
            store.forget(&name);
        });
    }
    let reloader = spawn_reloader(
        loader,
        host,
        orchestrator.clone(),
        supervisor.clone(),
        bus.clone(),
    );
    if let Some(ready) = ready {
        let _ = ready.send(DaemonHandles {
            supervisor: supervisor.clone(),
            events: bus.clone(),
            state: store.clone(),
            reloader: reloader.clone(),
            services: planned,
        });
        // Whoever took the handles (the caller, polling this very future)
        // starts serving the API before this goes on: the services handed
        // over adopt their processes after its accept loop is queued, not
        // before it.
        tokio::task::yield_now().await;
    }
    adopt.send_replace(true);

    let systemd = crate::systemd::SystemdNotifier::from_env().map(std::sync::Arc::new);
    // From the runtime, not a thread: a stuck runtime stops the pings, and
    // systemd's watchdog then restarts the daemon.
    let watchdog = match (&systemd, crate::systemd::SystemdNotifier::watchdog_every()) {
        (Some(systemd), Some(every)) => {
            let systemd = std::sync::Arc::clone(systemd);
            Some(tokio::spawn(async move {
                let mut ticks = tokio::time::interval(every);
                loop {
                    ticks.tick().await;
                    systemd.send("WATCHDOG=1");
                }
            }))
        }
        _ => None,
    };
    let starter = supervisor.clone();
    let mut starting = tokio::spawn(async move { starter.start_all_except(&handed_over).await });
    let mut started = false;
    loop {
        tokio::select! {
            joined = &mut starting, if !started => {
                started = true;
                let mut status = "services started".to_owned();
                if let Ok(Ok(failures)) = joined {
                    // A reload during the start may have added services.
                    let running = enabled.saturating_sub(failures.len());
                    info!(running, failed = failures.len(), "all services started");
                    status = format!("{running} of {enabled} services up");
                }
                // Type=notify: the unit is started once its services are.
                if let Some(systemd) = &systemd {
                    systemd.send(&format!("READY=1\nSTATUS={status}"));
                }
                // The parse, the plan and a thousand spawns freed a lot the
                // idle daemon will not need again.
                tokio::task::spawn_blocking(crate::memory::return_free_memory);
            }
            event = events.recv() => match event {
                // Not awaited: the funnel must stay free for a shutdown
                // while a reload stops services.
                Some(DaemonEvent::Reload) => reloader.trigger(),
                Some(DaemonEvent::Freeze { reply }) => {
                    // A start still under way (the daemon's own, or one
                    // waiting for its dependencies) is an intent the freeze
                    // cannot hand over: the service would stay stopped in
                    // the new daemon. Refused until it is over.
                    // `is_finished`: the start may have ended in this very
                    // turn of the loop, its branch not taken yet.
                    let started = started || starting.is_finished();
                    if let Some(reason) = start_in_progress(started, &supervisor).await {
                        let _ = reply.send(Err(FreezeError::Refused { reason }));
                        continue;
                    }
                    // No reload acts during or after the freeze; one asked
                    // a moment ago (an edit just seen) must not be lost.
                    if !reloader.quiesce().await {
                        reloader.reopen();
                        let _ = reply.send(Err(FreezeError::Refused {
                            reason: "a reload was asked a moment ago (the configuration or services_dir changed): retry once it is applied".to_owned(),
                        }));
                        continue;
                    }
                    info!("freezing every service for the upgrade");
                    match supervisor.freeze_all().await {
                        Ok(frozen) => {
                            starting.abort();
                            if reply.send(Ok(frozen)).is_err() {
                                // Nobody takes them: dropping the hand-over
                                // would leave every process unsupervised.
                                warn!("the upgrade's freeze was answered, but nobody took the services; they are no longer supervised by this daemon");
                            }
                            if let Some(watchdog) = watchdog {
                                watchdog.abort();
                            }
                            // Not the usual exit: nothing is stopped,
                            // STOPPING=1 is not sent, no cgroup is removed.
                            store.flush().await;
                            bus.flush().await;
                            info!("services frozen and handed over");
                            return Ok(());
                        }
                        Err(error) => {
                            reloader.reopen();
                            warn!("the upgrade's freeze failed: {error}");
                            let _ = reply.send(Err(FreezeError::Refused {
                                reason: error.to_string(),
                            }));
                        }
                    }
                }
                Some(DaemonEvent::ForceShutdown) => {
                    reloader.close();
                    starting.abort();
                    if let Some(systemd) = &systemd {
                        systemd.send("STOPPING=1\nSTATUS=killing every service");
                    }
                    bus.emit(None, EventKind::DaemonStopping { reason: "forced".to_owned() });
                    supervisor.kill_all().await?;
                    break;
                }
                Some(DaemonEvent::Shutdown) | None => {
                    reloader.close();
                    starting.abort();
                    info!("shutting down");
                    if let Some(systemd) = &systemd {
                        systemd.send("STOPPING=1\nSTATUS=stopping every service");
                    }
                    bus.emit(None, EventKind::DaemonStopping { reason: "shutdown requested".to_owned() });
                    shutdown(&supervisor, orchestrator.shutdown_timeout, events).await?;
                    break;
                }
            }
        }
    }
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    store.flush().await;
    bus.flush().await;
    // The last services' cgroups may still be going (their removal is off
    // the exit path): nothing is left behind, and the parent can go too.
    crate::process::cgroup_removals_settled(CGROUP_REMOVAL_WAIT).await;
    info!("all services stopped; exiting");
    Ok(())
}

/// Why services cannot be frozen now, if a start is under way: the
/// daemon's start of every service (`started` false), or services waiting
/// for their dependencies.
async fn start_in_progress(started: bool, supervisor: &SupervisorHandle) -> Option<String> {
    if !started {
        return Some(
            "the daemon is still starting its services; retry once `orchestrator status` shows them up"
                .to_owned(),
        );
    }
    let waiting = supervisor
        .waiting_for_dependencies()
        .await
        .unwrap_or_default();
    (!waiting.is_empty()).then(|| {
        format!(
            "{} still wait{} for dependencies to start; retry once they run (or stop them)",
            waiting.join(", "),
            if waiting.len() == 1 { "s" } else { "" }
        )
    })
}

/// How long the daemon waits at its exit for its services' cgroups to be
/// removed; what is left then, the next start's sweep removes.
const CGROUP_REMOVAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a daemon that died left running is stopped: the processes its
/// record names (gracefully, by their current definitions' stop_signal and
/// stop_timeout), then whatever is still in the services' cgroups (escaped
/// from its process group: setsid, double fork).
async fn stop_what_a_dead_daemon_left(
    orchestrator: &crate::config::OrchestratorConfig,
    definitions: &[ServiceDefinition],
    spawner: &Arc<dyn Spawner>,
    bus: &EventBus,
) -> usize {
    let recorded = clean_up_after_a_crash(
        &orchestrator.data_dir.join("state"),
        orchestrator.state_max_bytes,
        definitions,
        orchestrator.shutdown_timeout,
        bus,
    )
    .await;
    // The cgroups of services known now or recorded by the daemon that
    // died (one removed from the config since still had its cgroup).
    let mut services: std::collections::BTreeSet<String> =
        definitions.iter().map(|d| d.name.to_string()).collect();
    if let Ok(Some(previous)) = read_state_at_most(
        &orchestrator.data_dir.join("state"),
        orchestrator.state_max_bytes,
    ) {
        services.extend(previous.services.into_keys());
    }
    let sweeper = Arc::clone(spawner);
    let swept = tokio::task::spawn_blocking(move || sweeper.sweep_leftovers(&services))
        .await
        .unwrap_or_default();
    let count = recorded + swept.len();
    for pid in swept {
        warn!(
            pid,
            "killed a process a previous daemon left in a service's cgroup"
        );
        bus.emit(None, EventKind::LeftoverStopped { pid });
    }
    count
}

/// In the guardian, once the daemon it watched died without stopping its
/// services: stop them now, as the next daemon would at its start, and
/// record it in the daemon's events. `config` is read anew for the
/// services' stop policies.
pub async fn recover_after_death(config: Config, spawner: Arc<dyn Spawner>, host: HostEnv) {
    let orchestrator = config.orchestrator.clone();
    let discovered = discover_unconfigured(&config).unwrap_or_default();
    let definitions = plan(&config, &discovered, &host);
    drop(config);
    let bus = EventBus::persisted(orchestrator.data_dir.join("events.jsonl"));
    let died = crate::state::read_state_at_most(
        &orchestrator.data_dir.join("state"),
        orchestrator.state_max_bytes,
    )
    .ok()
    .flatten()
    .map(|state| state.daemon_pid);
    let stopped = stop_what_a_dead_daemon_left(&orchestrator, &definitions, &spawner, &bus).await;
    if stopped > 0 {
        warn!(
            daemon = died,
            stopped,
            "the daemon ended without stopping its services (killed or crashed): its guardian stopped them"
        );
        bus.emit(
            None,
            EventKind::DaemonStopping {
                reason: format!(
                    "the daemon{} ended without stopping its services (killed or crashed); its guardian stopped {stopped} process(es)",
                    died.map(|pid| format!(" (pid {pid})")).unwrap_or_default()
                ),
            },
        );
    }
    bus.flush().await;
}

/// Stop whatever a daemon that died left running, before anything starts:
/// no orphan survives and no service runs twice. Only processes whose pid
/// and start time match the record are touched.
async fn clean_up_after_a_crash(
    state_path: &std::path::Path,
    state_max_bytes: u64,
    definitions: &[ServiceDefinition],
    default_timeout: std::time::Duration,
    bus: &EventBus,
) -> usize {
    let previous = match read_state_at_most(state_path, state_max_bytes) {
        Ok(Some(previous)) => previous,
        Ok(None) => return 0,
        Err(error @ StateError::Untrusted { .. }) => {
            tracing::error!("{error}");
            let aside = set_aside(state_path);
            if let Err(error) = &aside {
                warn!("cannot move {} aside: {error}", state_path.display());
            }
            bus.emit(
                None,
                EventKind::UntrustedFileIgnored {
                    path: state_path.display().to_string(),
                    reason: error.to_string(),
                },
            );
            return 0;
        }
        Err(error) => {
            warn!("{error}");
            return 0;
        }
    };
    let leftovers = find_leftovers(&previous);
    if leftovers.is_empty() {
        return 0;
    }
    warn!(
        processes = leftovers.len(),
        previous_daemon = previous.daemon_pid,
        "the previous daemon died and left services running; stopping them before starting anew"
    );
    let found: Vec<(String, u32)> = leftovers
        .iter()
        .map(|l| (l.service.clone(), l.pid))
        .collect();
    let (stopped, killed) = stop_leftovers(leftovers, |service| {
        definitions
            .iter()
            .find(|d| d.name == service)
            .map_or((Signal::SIGTERM, default_timeout), |d| {
                (d.policy.stop_signal, d.policy.stop_timeout)
            })
    })
    .await;
    let count = found.len();
    for (service, pid) in found {
        bus.emit(Some(&service), EventKind::LeftoverStopped { pid });
    }
    info!(stopped, killed, "cleaned up after the previous daemon");
    count
}

/// A graceful shutdown that a ForceShutdown event cuts short.
async fn shutdown(
    supervisor: &SupervisorHandle,
    timeout: std::time::Duration,
    events: &mut mpsc::Receiver<DaemonEvent>,
) -> Result<(), DaemonError> {
    let graceful = supervisor.shutdown(timeout);
    tokio::pin!(graceful);
    loop {
        tokio::select! {
            result = &mut graceful => return Ok(result?),
            event = events.recv() => match event {
                Some(DaemonEvent::ForceShutdown) => {
                    warn!("second interrupt: killing every service now");
                    return Ok(supervisor.kill_all().await?);
                }
                Some(_) => {}
                // Nobody can send a ForceShutdown any more: just finish.
                None => return Ok(graceful.await?),
            }
        }
    }
}

/// Make data_dir if need be, then refuse it unless only our uid can write
/// there: its files decide what the daemon signals.
fn create_private_dir(dir: &std::path::Path) -> Result<(), DaemonError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DaemonError::DataDir {
            dir: dir.to_owned(),
            source,
        })?;
    Ok(check_data_dir(dir)?)
}

#[cfg(test)]
mod tests {
    //! A whole daemon in-process: the fake spawner, the paused clock, and
    //! the event funnel driven by the test.

    use std::time::Duration;

    use super::*;
    use crate::process::FakeSpawner;
    use crate::state::read_state;

    /// Timeouts far beyond anything a test waits for: a SIGKILL seen before
    /// them came from the daemon's decision, not from a timer.
    const CONFIG: &str = r#"
[orchestrator]
services_dir = "services"
data_dir = "data"
shutdown_timeout = "1h"

[services.api]
command = ["/bin/true"]
stop_timeout = "1h"

[services.worker]
command = ["/bin/true"]
stop_timeout = "1h"

[services.spare]
command = ["/bin/true"]
enabled = false
"#;

    struct Daemon {
        dir: std::path::PathBuf,
        spawner: FakeSpawner,
        funnel: mpsc::Sender<DaemonEvent>,
        handles: DaemonHandles,
        task: tokio::task::JoinHandle<Result<(), DaemonError>>,
    }

    async fn start(test: &str) -> Daemon {
        start_with(test, None).await
    }

    async fn start_with(test: &str, loader: Option<Loader>) -> Daemon {
        let dir =
            std::env::temp_dir().join(format!("orchestrator-daemon-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = crate::config::parse(CONFIG, None, &dir).unwrap();
        let spawner = FakeSpawner::new();
        let (funnel, events) = mpsc::channel(4);
        let (ready, handles) = oneshot::channel();
        let host = HostEnv {
            path: "/usr/bin:/bin".to_owned(),
            tmpdir: "/tmp".to_owned(),
        };
        let spawner_for_run = Arc::new(spawner.clone());
        let task = tokio::spawn(async move {
            let mut events = events;
            run(
                config,
                loader,
                spawner_for_run,
                host,
                &mut events,
                Some(ready),
                Resumed::default(),
            )
            .await
        });
        let handles = handles.await.expect("the daemon hands out its handles");
        spawner.wait_for_spawns(2).await;
        for name in ["api", "worker"] {
            let service = handles.supervisor.service(name).await.unwrap();
            service
                .wait_for(|s| s.state == State::Running)
                .await
                .unwrap();
        }
        Daemon {
            dir,
            spawner,
            funnel,
            handles,
            task,
        }
    }

    use crate::service::State;

    #[tokio::test(start_paused = true)]
    async fn runs_the_enabled_services_and_stops_them_when_the_funnel_closes() {
        let daemon = start("close").await;
        assert_eq!(daemon.spawner.spawn_count(), 2, "spare is disabled");
        assert_eq!(
            daemon.handles.supervisor.status("spare").await.unwrap(),
            State::Stopped
        );
        drop(daemon.funnel);
        daemon.task.await.unwrap().unwrap();
        for child in daemon.spawner.children() {
            assert!(child.is_reaped());
            assert_eq!(child.signals()[0].1, nix::sys::signal::Signal::SIGTERM);
        }
        // The last record is written before `run` returns, by the one
        // writer: nothing running, nothing half-written left beside it.
        let state = read_state(&daemon.dir.join("data/state"))
            .unwrap()
            .expect("a state record");
        assert!(state.services.is_empty(), "{state:?}");
        assert!(!daemon.dir.join("data/state.tmp").exists());
        let kinds: Vec<String> = daemon
            .handles
            .events
            .history()
            .iter()
            .map(|event| format!("{}", serde_json::json!(event.kind)["event"]))
            .collect();
        assert_eq!(
            kinds.first().map(String::as_str),
            Some("\"daemon_started\"")
        );
        assert!(
            kinds.contains(&"\"daemon_stopping\"".to_owned()),
            "{kinds:?}"
        );
        let _ = std::fs::remove_dir_all(&daemon.dir);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_interrupt_kills_at_once_instead_of_waiting_out_the_grace() {
        let daemon = start("force").await;
        for child in daemon.spawner.children() {
            // Like a service that ignores SIGTERM.
            child.ignore_stop_signal_from_now();
        }
        let t0 = tokio::time::Instant::now();
        daemon.funnel.send(DaemonEvent::Shutdown).await.unwrap();
        for child in daemon.spawner.children() {
            while child.signals().is_empty() {
                tokio::task::yield_now().await;
            }
        }
        daemon
            .funnel
            .send(DaemonEvent::ForceShutdown)
            .await
            .unwrap();
        daemon.task.await.unwrap().unwrap();
        for child in daemon.spawner.children() {
            assert!(child.is_reaped());
            let (killed_at, signal) = child.signals()[1];
            assert_eq!(signal, nix::sys::signal::Signal::SIGKILL);
            assert!(
                killed_at - t0 < Duration::from_secs(60),
                "killed by a timer, not by the second interrupt: {:?}",
                killed_at - t0
            );
        }
        let _ = std::fs::remove_dir_all(&daemon.dir);
    }

    /// A loader that reads `CONFIG` with `edit` applied, from the test's dir.
    fn loader(test: &str, edit: fn(&str) -> String) -> Loader {
        let dir =
            std::env::temp_dir().join(format!("orchestrator-daemon-{test}-{}", std::process::id()));
        Arc::new(move || {
            let loaded = crate::config::parse_all(&edit(CONFIG), None, &dir).map_err(|errors| {
                errors
                    .problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
            })?;
            if loaded.problems.is_empty() {
                let discovered = crate::discovery::discover_unconfigured(&loaded.config)
                    .map_err(|error| vec![error.to_string()])?;
                Ok(crate::reload::Reread {
                    config: loaded.config,
                    warnings: Vec::new(),
                    discovered,
                    planned: None,
                })
            } else {
                Err(loaded.problems.iter().map(ToString::to_string).collect())
            }
        })
    }

    #[tokio::test(start_paused = true)]
    async fn sighup_reloads_and_an_invalid_file_changes_nothing() {
        // worker gains an argument, spare is enabled.
        let edited = |text: &str| {
            text.replace(
                "[services.worker]\ncommand = [\"/bin/true\"]",
                "[services.worker]\ncommand = [\"/bin/true\", \"-v\"]",
            )
            .replace("enabled = false", "enabled = true")
        };
        let daemon = start_with("sighup", Some(loader("sighup", edited))).await;
        let supervisor = &daemon.handles.supervisor;
        let api = supervisor.info("api").await.unwrap();
        let mut reloaded = daemon.handles.events.subscribe().1;
        daemon.funnel.send(DaemonEvent::Reload).await.unwrap();
        let report = loop {
            let event = reloaded.recv().await.unwrap();
            if let EventKind::Reloaded { report } = &event.kind {
                break report.clone();
            }
        };
        let actions: Vec<_> = report
            .applied
            .iter()
            .map(|c| (c.service.as_str(), c.action))
            .collect();
        use crate::wire::ChangeAction;
        assert_eq!(
            actions,
            [
                ("api", ChangeAction::Unchanged),
                ("spare", ChangeAction::Updated),
                ("worker", ChangeAction::Restarted)
            ]
        );
        assert_eq!(supervisor.info("api").await.unwrap().pid, api.pid);
        assert_eq!(supervisor.status("spare").await.unwrap(), State::Running);
        assert_eq!(daemon.spawner.spawn_count(), 4);
        drop(daemon.funnel);
        daemon.task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&daemon.dir);
    }

    #[tokio::test(start_paused = true)]
    async fn an_invalid_configuration_is_rejected_with_every_error() {
        let broken = |text: &str| {
            format!("{text}\n[services.api2]\nrestart = \"sometimes\"\nmax_restarts = -1\n")
        };
        let daemon = start_with("invalid", Some(loader("invalid", broken))).await;
        let before = daemon.handles.supervisor.list().await.unwrap();
        let outcome = daemon.handles.reloader.reload().await;
        let Err(crate::reload::ReloadError::Invalid(errors)) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            daemon
                .handles
                .events
                .history()
                .iter()
                .any(|event| matches!(event.kind, EventKind::ReloadFailed { .. }))
        );
        assert_eq!(daemon.handles.supervisor.list().await.unwrap(), before);
        assert_eq!(daemon.spawner.spawn_count(), 2);
        drop(daemon.funnel);
        daemon.task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&daemon.dir);
    }
}
