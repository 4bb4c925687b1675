//! sd_notify for services: the socket, its messages, and who may send them (filled by the notify work).
// TEMP STUB (not to be committed)
use std::time::Duration;
#[derive(Debug, thiserror::Error)]
#[error("stub")]
pub struct NotifyError;
pub struct NotifySocket;
impl NotifySocket {
    pub fn bind(_s: &str) -> Result<NotifySocket, NotifyError> {
        Err(NotifyError)
    }
    pub fn address(&self) -> &str {
        ""
    }
}
#[derive(Debug)]
pub enum NotifyReport {
    Ready,
    Status(String),
    WatchdogExpired { after: Duration },
    Rejected { pid: Option<u32> },
    Stopping,
}
pub fn environment(_s: &NotifySocket, _w: Option<Duration>) -> Vec<(String, String)> {
    vec![]
}
pub fn spawn_listener(
    _s: NotifySocket,
    _n: String,
    _p: u32,
    _c: Option<std::sync::Arc<dyn crate::cgroup::ServiceCgroup>>,
    _w: Option<Duration>,
    _r: tokio::sync::mpsc::UnboundedSender<NotifyReport>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {})
}
