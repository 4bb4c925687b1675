//! Health checks of a running service: what a check is (from the config),
//! the probes that carry one out, and the monitor task that runs them on a
//! schedule and reports each change of verdict to the service's actor.

use std::time::Duration;

pub use crate::wire::Health;

/// `[services.NAME.health]`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub probe: Probe,
    /// From the end of one check to the start of the next; > 0.
    pub interval: Duration,
    /// Each check's deadline; > 0.
    pub timeout: Duration,
    /// Consecutive failures before the verdict is `unhealthy`; >= 1.
    pub retries: u32,
    /// After each start, failures don't count for this long (a pass does).
    pub start_period: Duration,
    pub on_unhealthy: OnUnhealthy,
}

impl HealthCheck {
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
    pub const DEFAULT_RETRIES: u32 = 3;
    pub const DEFAULT_START_PERIOD: Duration = Duration::ZERO;
}

/// What one check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// GET `url` (http:// only); healthy on 2xx/3xx, or exactly
    /// `expect_status` when set.
    Http {
        url: String,
        expect_status: Option<u16>,
    },
    /// A TCP connect to `address` ("host:port").
    Tcp { address: String },
    /// Run `argv` (no shell) with the service's environment, working
    /// directory, user and cgroup; healthy on exit 0; killed with its
    /// process group at the timeout.
    Exec { argv: Vec<String> },
    /// grpc.health.v1.Health/Check over h2c to `address` ("host:port");
    /// healthy on SERVING. `service` is the request's service name ("" =
    /// the server as a whole).
    Grpc { address: String, service: String },
}

impl Probe {
    /// "http", "tcp", "exec" or "grpc": the key that set it.
    pub fn kind(&self) -> &'static str {
        match self {
            Probe::Http { .. } => "http",
            Probe::Tcp { .. } => "tcp",
            Probe::Exec { .. } => "exec",
            Probe::Grpc { .. } => "grpc",
        }
    }
}

/// What happens once a service is unhealthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnUnhealthy {
    /// Stop it and treat that as a failure: the restart policy decides.
    #[default]
    Restart,
    /// Report it, nothing more.
    Nothing,
}

impl OnUnhealthy {
    pub fn as_str(self) -> &'static str {
        match self {
            OnUnhealthy::Restart => "restart",
            OnUnhealthy::Nothing => "none",
        }
    }
}

/// A change of verdict, from the monitor to the service's actor. Only
/// changes are sent (the first verdict of a process included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub health: Health,
    /// Why, for `unhealthy` (the last failure: "GET /healthz: status 500").
    pub detail: Option<String>,
}

pub mod monitor;
pub mod probe;

pub use monitor::{ProbeRunner, Prober, spawn_monitor, spawn_monitor_with};
pub use probe::{ExecContext, ProbeError};
