//! What the API can ask of the daemon, as a trait: the server is tested
//! against a fake, and runs against the real supervisor.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use orchestrator_core::daemon::DaemonEvent;
use orchestrator_core::events::{Event, EventBus};
use orchestrator_core::output::{LogBlock, LogLine};
use orchestrator_core::reload::{ReloadHandle, ReloadOutcome};
use orchestrator_core::service::ServiceError;
use orchestrator_core::state::StateStore;
use orchestrator_core::supervisor::{SupervisorError, SupervisorHandle};
use orchestrator_core::wire::{DaemonInfo, ServiceInfo, UpgradeAccepted};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Restart,
    /// Restart, stopping what depends on it first and starting that again
    /// after (`?with_dependents=true`).
    RestartWithDependents,
}

impl Action {
    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "start" => Some(Action::Start),
            "stop" => Some(Action::Stop),
            "restart" => Some(Action::Restart),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ControlError {
    UnknownService(String),
    /// The action was carried out but did not succeed (e.g. could not start).
    Failed(String),
    ShuttingDown,
}

impl From<SupervisorError> for ControlError {
    fn from(error: SupervisorError) -> Self {
        match error {
            SupervisorError::UnknownService(name) => ControlError::UnknownService(name),
            SupervisorError::AlreadyExists(_) | SupervisorError::FreezeFailed(_) => {
                ControlError::Failed(error.to_string())
            }
            SupervisorError::Gone
            | SupervisorError::ShuttingDown
            | SupervisorError::Service(
                ServiceError::ShuttingDown { .. } | ServiceError::Gone { .. },
            ) => ControlError::ShuttingDown,
            SupervisorError::Service(error) => ControlError::Failed(error.to_string()),
        }
    }
}

pub type FollowedLogs = (Vec<LogLine>, broadcast::Receiver<LogBlock>);
pub type FollowedEvents = (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>);

pub trait Control: Clone + Send + Sync + 'static {
    fn list(&self) -> impl Future<Output = Result<Vec<ServiceInfo>, ControlError>> + Send;
    fn info(&self, name: &str) -> impl Future<Output = Result<ServiceInfo, ControlError>> + Send;
    /// Returns once the action is applied: a stop when the process is gone,
    /// a start when it runs.
    fn act(
        &self,
        name: &str,
        action: Action,
    ) -> impl Future<Output = Result<ServiceInfo, ControlError>> + Send;
    fn follow_logs(
        &self,
        name: &str,
        tail: usize,
    ) -> impl Future<Output = Result<FollowedLogs, ControlError>> + Send;
    fn events(&self) -> FollowedEvents;
    /// The daemon's own facts: its pid, version and crash-record health.
    fn daemon(&self) -> DaemonInfo;
    fn shutdown(&self) -> impl Future<Output = ()> + Send;
    /// Re-read the configuration and apply the difference; returns once
    /// it is applied.
    fn reload(&self) -> impl Future<Output = ReloadOutcome> + Send;
    /// Cancelled once the daemon has stopped every service and is about to
    /// exit: follow streams end cleanly then, instead of being cut.
    fn closing(&self) -> CancellationToken;
    /// Dry-run `binary` (the daemon's own start path when `None`) and, if it
    /// passes, start the upgrade to it; `Err` says why nothing changed.
    fn upgrade(
        &self,
        binary: Option<PathBuf>,
    ) -> impl Future<Output = Result<UpgradeAccepted, String>> + Send {
        let _ = binary;
        async { Err("this server cannot upgrade its daemon".to_owned()) }
    }
}

/// The real daemon behind the API.
#[derive(Clone)]
pub struct DaemonControl {
    pub supervisor: SupervisorHandle,
    pub events: EventBus,
    pub daemon: mpsc::Sender<DaemonEvent>,
    pub closing: CancellationToken,
    pub state: StateStore,
    pub reloader: ReloadHandle,
    pub upgrader: crate::upgrade::Upgrader,
}

impl Control for DaemonControl {
    async fn list(&self) -> Result<Vec<ServiceInfo>, ControlError> {
        Ok(self.supervisor.list().await?)
    }

    async fn info(&self, name: &str) -> Result<ServiceInfo, ControlError> {
        Ok(self.supervisor.info(name).await?)
    }

    async fn act(&self, name: &str, action: Action) -> Result<ServiceInfo, ControlError> {
        match action {
            Action::Start => self.supervisor.start(name).await?,
            Action::Stop => self.supervisor.stop(name).await?,
            Action::Restart => {
                let service = self.supervisor.service(name).await?;
                service.restart().await.map_err(SupervisorError::from)?;
            }
            Action::RestartWithDependents => self.supervisor.restart_with_dependents(name).await?,
        }
        Ok(self.supervisor.info(name).await?)
    }

    async fn follow_logs(&self, name: &str, tail: usize) -> Result<FollowedLogs, ControlError> {
        let service = self.supervisor.service(name).await?;
        Ok(service.output().follow(tail))
    }

    fn events(&self) -> FollowedEvents {
        self.events.subscribe()
    }

    fn daemon(&self) -> DaemonInfo {
        DaemonInfo {
            pid: std::process::id(),
            version: crate::upgrade::version().to_owned(),
            state_stale: self.state.is_stale(),
            state_failed_writes: self.state.failed_writes(),
            events_file_dropped: self.events.file_dropped(),
            upgrades: self.upgrader.upgrades(),
            upgrade_failures: self.upgrader.failures(),
            last_upgrade_error: self.upgrader.last_error(),
        }
    }

    async fn shutdown(&self) {
        let _ = self.daemon.send(DaemonEvent::Shutdown).await;
    }

    async fn reload(&self) -> ReloadOutcome {
        self.reloader.reload().await
    }

    fn closing(&self) -> CancellationToken {
        self.closing.clone()
    }

    async fn upgrade(&self, binary: Option<PathBuf>) -> Result<UpgradeAccepted, String> {
        self.upgrader.request(binary).await
    }
}
