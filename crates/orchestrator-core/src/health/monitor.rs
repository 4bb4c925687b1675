//! The task that runs a service's health check on its schedule (filled by the health work).
// TEMP STUB (not to be committed)
use std::sync::Arc;
pub struct ExecContext {
    pub spawner: Arc<dyn crate::process::Spawner>,
    pub spec: crate::process::SpawnSpec,
    pub cgroup: Option<Arc<dyn crate::cgroup::ServiceCgroup>>,
}
pub fn spawn_monitor(
    _n: String,
    _c: super::HealthCheck,
    _e: ExecContext,
    _r: tokio::sync::mpsc::UnboundedSender<super::HealthReport>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {})
}
