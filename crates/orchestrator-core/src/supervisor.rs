//! The registry of services: handles by name, start-all, stop-all and
//! shutdown. It owns the actors; callers hold a cheap `SupervisorHandle`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::events::EventBus;
use crate::process::Spawner;
use crate::service::{ServiceDefinition, ServiceError, ServiceHandle, State, spawn_service};

/// What the API and `status` report for one service (SPEC section 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    pub name: String,
    pub configured: bool,
    pub enabled: bool,
    pub state: String,
    pub pid: Option<u32>,
    /// Seconds the current process has run; `None` when there is none.
    pub uptime: Option<u64>,
    pub restarts: u64,
    pub last_exit_code: Option<i32>,
    pub last_error: Option<String>,
    /// `healthy`, `unhealthy`, `unknown`, or `None` when no check is set.
    pub health: Option<String>,
    /// Output bytes the log file could not take (disk full...), in all.
    #[serde(default)]
    pub log_dropped_bytes: u64,
}

impl ServiceInfo {
    pub fn of(handle: &ServiceHandle) -> Self {
        let status = handle.status();
        ServiceInfo {
            name: handle.name().to_owned(),
            configured: handle.configured(),
            enabled: handle.enabled(),
            state: status.state.as_str().to_owned(),
            pid: status.pid,
            uptime: status
                .running_since
                .map(|since| Instant::now().saturating_duration_since(since).as_secs()),
            restarts: status.restarts,
            last_exit_code: status.last_exit.map(|reason| reason.code()),
            last_error: status.last_error,
            health: None,
            log_dropped_bytes: handle.output().dropped_bytes(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SupervisorError {
    #[error("unknown service {0:?}: `orchestrator status` lists the known ones")]
    UnknownService(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("the supervisor has ended (the daemon is shutting down)")]
    Gone,
}

enum Command {
    Get(String, oneshot::Sender<Option<ServiceHandle>>),
    All(oneshot::Sender<Vec<ServiceHandle>>),
}

/// A cheap, cloneable way to act on the services.
#[derive(Clone)]
pub struct SupervisorHandle {
    commands: mpsc::UnboundedSender<Command>,
}

/// Start one actor per definition (all stopped) and the registry that owns them.
pub fn spawn_supervisor(
    definitions: Vec<ServiceDefinition>,
    spawner: Arc<dyn Spawner>,
    events: EventBus,
) -> SupervisorHandle {
    let mut services = BTreeMap::new();
    for definition in definitions {
        let (handle, _task) = spawn_service(definition, Arc::clone(&spawner), events.clone());
        services.insert(handle.name().to_owned(), handle);
    }
    let (commands_tx, mut commands) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        // The registry changes only here, so no lock guards it. When every
        // handle is dropped the loop ends and so do the actors' handles.
        while let Some(command) = commands.recv().await {
            match command {
                Command::Get(name, reply) => {
                    let _ = reply.send(services.get(&name).cloned());
                }
                Command::All(reply) => {
                    let _ = reply.send(services.values().cloned().collect());
                }
            }
        }
    });
    SupervisorHandle {
        commands: commands_tx,
    }
}

impl SupervisorHandle {
    pub async fn service(&self, name: &str) -> Result<ServiceHandle, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Get(name.to_owned(), reply))
            .map_err(|_| SupervisorError::Gone)?;
        answer
            .await
            .map_err(|_| SupervisorError::Gone)?
            .ok_or_else(|| SupervisorError::UnknownService(name.to_owned()))
    }

    /// Every service, sorted by name.
    pub async fn services(&self) -> Result<Vec<ServiceHandle>, SupervisorError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::All(reply))
            .map_err(|_| SupervisorError::Gone)?;
        answer.await.map_err(|_| SupervisorError::Gone)
    }

    pub async fn start(&self, name: &str) -> Result<(), SupervisorError> {
        Ok(self.service(name).await?.start().await?)
    }

    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        Ok(self.service(name).await?.stop().await?)
    }

    pub async fn restart(&self, name: &str) -> Result<(), SupervisorError> {
        Ok(self.service(name).await?.restart().await?)
    }

    pub async fn status(&self, name: &str) -> Result<State, SupervisorError> {
        Ok(self.service(name).await?.status().state)
    }

    pub async fn is_running(&self, name: &str) -> bool {
        matches!(self.status(name).await, Ok(State::Running))
    }

    pub async fn info(&self, name: &str) -> Result<ServiceInfo, SupervisorError> {
        Ok(ServiceInfo::of(&self.service(name).await?))
    }

    pub async fn list(&self) -> Result<Vec<ServiceInfo>, SupervisorError> {
        Ok(self.services().await?.iter().map(ServiceInfo::of).collect())
    }

    /// Start every enabled service, all at once; one that cannot start
    /// never holds up the others. Returns each failure.
    pub async fn start_all(&self) -> Result<Vec<ServiceError>, SupervisorError> {
        let handles = self.services().await?;
        // Every request goes out first, so the actors start in parallel;
        // the answers are then collected here, with no task per service.
        let starts: Vec<_> = handles
            .iter()
            .filter(|handle| handle.enabled())
            .map(ServiceHandle::start_now)
            .collect();
        let mut failures = Vec::new();
        for start in starts {
            if let Err(error) = start.await {
                failures.push(error);
            }
        }
        Ok(failures)
    }

    /// Stop every service in parallel; returns when all are down.
    pub async fn stop_all(&self) -> Result<(), SupervisorError> {
        let handles = self.services().await?;
        for_each_parallel(handles, |handle| async move { handle.stop().await }).await;
        Ok(())
    }

    /// Stop everything within `timeout`; whatever still runs then is killed.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), SupervisorError> {
        let handles = self.services().await?;
        info!(services = handles.len(), "stopping every service");
        let stops = for_each_parallel(
            handles.clone(),
            |handle| async move { handle.shutdown().await },
        );
        if tokio::time::timeout(timeout, stops).await.is_err() {
            warn!("shutdown_timeout of {timeout:?} passed: killing what is left");
            self.kill_all().await?;
        }
        Ok(())
    }

    /// SIGKILL every service's process group now; returns when all are reaped.
    pub async fn kill_all(&self) -> Result<(), SupervisorError> {
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
