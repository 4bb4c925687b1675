//! The validated configuration, as the rest of the engine sees it: every path
//! absolute, every default applied, every value already checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::name::ServiceName;

pub use crate::deps::{Condition, Dependency};
pub use crate::health::{HealthCheck, OnUnhealthy, Probe};

/// A whole, validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it came from; `None` for zero-config (no file at all).
    pub source: Option<PathBuf>,
    pub orchestrator: OrchestratorConfig,
    /// `[services.NAME]` sections, by name (look one up with a `&str`).
    pub services: BTreeMap<ServiceName, ServiceConfig>,
}

impl Config {
    /// The names of its sections (an instance's is its base: `web` for
    /// `web@0`): the entries of services_dir it configures rather than
    /// discovers.
    pub fn section_names(&self) -> BTreeSet<&str> {
        self.services.keys().map(ServiceName::base).collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrchestratorConfig {
    /// Absolute. `services_dir/NAME/NAME` is service NAME's binary.
    pub services_dir: PathBuf,
    /// Absolute. State, logs and the control socket live here.
    pub data_dir: PathBuf,
    pub auto_restart: bool,
    pub shutdown_timeout: Duration,
    pub log_level: LogLevel,
    pub log_format: LogFormat,
    pub start_discovered: bool,
    /// A reload restarts a service whose binary was replaced on disk.
    pub restart_on_binary_change: bool,
    /// Rotate `data_dir/logs/NAME.log` when it would grow past this many bytes.
    pub log_max_bytes: u64,
    /// Rotated files kept beside the live one (`NAME.log.1` … `NAME.log.N`).
    pub log_max_files: u32,
    /// Each line of a log file is prefixed with its time and stream, and
    /// every start of the service leaves a marker line.
    pub log_timestamps: bool,
    /// Rotate a log file once it is this old (on its next write).
    pub log_max_age: Option<Duration>,
    /// Rotated log files are gzipped (`NAME.log.1.gz`), off the write path.
    pub log_compress: bool,
    /// A `data_dir/state` larger than this is ignored as corrupt, not read
    /// (a huge or sparse file must not exhaust the daemon's memory).
    pub state_max_bytes: u64,
    /// Also serve the API on TCP here (token required).
    pub http_listen: Option<std::net::SocketAddr>,
    /// Absolute; checked (exists, not readable by others, not empty) at load.
    pub http_token_file: Option<PathBuf>,
    /// Per listener; the daemon may lower it to keep descriptors for services.
    pub api_max_connections: usize,
    /// For each request's headers, and for an idle connection between requests.
    pub api_header_timeout: Duration,
    /// How long a response may stay blocked on a client that does not read.
    pub api_idle_timeout: Duration,
    /// Follow the config file and services_dir, reloading on a change.
    pub watch: bool,
    /// Relative to the daemon's own cgroup; each service gets
    /// `cgroup_parent/NAME`. Checked at load: relative, no `..`, no empty part.
    pub cgroup_parent: PathBuf,
    /// A limit that cannot be enforced fails the start instead of a warning.
    pub require_limits: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    pub enabled: bool,
    /// Absolute when set.
    pub binary_path: Option<PathBuf>,
    /// Exact argv (non-empty) instead of binary + injected flags + args.
    pub command: Option<Vec<String>>,
    pub args: Vec<String>,
    /// Absolute when set.
    pub data_dir: Option<PathBuf>,
    /// The `env_file` variables under the table's own (which win), with
    /// `${VAR}` and `{instance}` already expanded.
    pub environment: BTreeMap<String, String>,
    /// As written; already read into `environment` at load.
    pub env_file: Vec<EnvFile>,
    /// `instances = N` as written; the section is loaded as N services
    /// `NAME@0..NAME@N-1` (N > 1), each with `instance` set.
    pub instances: Option<u32>,
    /// Which section and index this instance of it is.
    pub instance: Option<Instance>,
    /// MiB.
    pub memory_limit: Option<u64>,
    /// Cores (1.5 = one and a half CPUs of time per period); > 0.
    pub cpu_limit: Option<f64>,
    /// Most processes (and threads) the service may have at once; >= 1.
    pub pids_limit: Option<u64>,
    /// setrlimit before exec, by resource; each sets soft and hard alike.
    pub rlimits: BTreeMap<Rlimit, RlimitValue>,
    /// Run as this user (a name or a numeric uid); needs the daemon to be root
    /// unless it is the daemon's own user.
    pub user: Option<String>,
    /// Run with this group (a name or a numeric gid) instead of the user's
    /// primary group.
    pub group: Option<String>,
    /// Refuse a binary or services_dir writable by group or others while the
    /// daemon runs as root.
    pub strict: bool,
    /// The binary's SHA-256; a binary that does not match is never run.
    pub sha256: Option<Sha256>,
    pub stop_signal: Signal,
    /// `None`: the orchestrator's shutdown_timeout.
    pub stop_timeout: Option<Duration>,
    /// `None`: from auto_restart (true → always, false → never).
    pub restart: Option<RestartPolicy>,
    pub max_restarts: u32,
    pub backoff: BackoffConfig,
    pub start_limit: StartLimit,
    /// Without a probe or notify: up once it has run this long.
    pub start_grace: Duration,
    /// sd_notify: NOTIFY_SOCKET is set, and it is starting until READY=1.
    pub notify: bool,
    /// How long READY=1 or a first passing probe may take; > 0.
    pub start_timeout: Duration,
    /// WATCHDOG=1 pings expected at least this often (needs notify).
    pub watchdog: Option<Duration>,
    /// In the order written; names checked against the other services.
    pub depends_on: Vec<Dependency>,
    pub health: Option<HealthCheck>,
    /// `None`: the orchestrator's log_timestamps / log_max_age.
    pub log_timestamps: Option<bool>,
    pub log_max_age: Option<Duration>,
}

/// One `env_file` entry: absolute path, and whether it may be missing
/// (written with a leading `-`, as systemd's EnvironmentFile=-).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvFile {
    pub path: PathBuf,
    pub optional: bool,
}

/// One instance of a section with `instances = N`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    /// The section's name, which names the binary `services_dir/NAME/NAME`.
    pub section: ServiceName,
    pub index: u32,
}

pub const DEFAULT_START_GRACE: Duration = Duration::from_secs(1);
pub const DEFAULT_START_TIMEOUT: Duration = Duration::from_secs(30);

/// A start-rate limit, as systemd's StartLimitBurst/StartLimitIntervalSec:
/// once `burst` runs in `interval` died at once (or failed to spawn), every
/// restart waits at least [`START_LIMIT_DELAY`], whatever the backoff says,
/// so that no configuration makes a crash loop spin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartLimit {
    pub burst: u32,
    pub interval: Duration,
}

/// A run shorter than this "died at once" for the start limit: long enough
/// that an exec and a crash at start-up fall under it, short enough that a
/// service living 200 ms (a deliberate fast restart) never does.
pub const QUICK_FAILURE: Duration = Duration::from_millis(100);
/// The least restart delay once the start limit is hit.
pub const START_LIMIT_DELAY: Duration = Duration::from_secs(1);

impl Default for StartLimit {
    fn default() -> Self {
        StartLimit {
            burst: 5,
            interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffConfig {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `api | line`: service name first, one line per line.
    Text,
    /// The tracing key=value lines (`... INFO line service=api stream=stdout`).
    KeyValue,
    Json,
}

pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_RESTARTS: u32 = 10;
pub const DEFAULT_LOG_MAX_BYTES: u64 = 50 * 1024 * 1024;
pub const DEFAULT_LOG_MAX_FILES: u32 = 5;
/// ~170 bytes a service: room for 350 000 services.
pub const DEFAULT_STATE_MAX_BYTES: u64 = 64 * 1024 * 1024;
pub const DEFAULT_API_MAX_CONNECTIONS: usize = 256;
pub const DEFAULT_API_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_CGROUP_PARENT: &str = "orchestrator";
pub const DEFAULT_API_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for BackoffConfig {
    fn default() -> Self {
        BackoffConfig {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(30),
            reset_after: Duration::from_secs(60),
        }
    }
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            enabled: true,
            binary_path: None,
            command: None,
            args: Vec::new(),
            data_dir: None,
            environment: BTreeMap::new(),
            env_file: Vec::new(),
            instances: None,
            instance: None,
            memory_limit: None,
            cpu_limit: None,
            pids_limit: None,
            rlimits: BTreeMap::new(),
            user: None,
            group: None,
            strict: true,
            sha256: None,
            stop_signal: Signal::SIGTERM,
            stop_timeout: None,
            restart: None,
            max_restarts: DEFAULT_MAX_RESTARTS,
            backoff: BackoffConfig::default(),
            start_limit: StartLimit::default(),
            start_grace: DEFAULT_START_GRACE,
            notify: false,
            start_timeout: DEFAULT_START_TIMEOUT,
            watchdog: None,
            depends_on: Vec::new(),
            health: None,
            log_timestamps: None,
            log_max_age: None,
        }
    }
}

impl OrchestratorConfig {
    /// Defaults for a configuration file (or none) in `base_dir`.
    pub fn defaults_in(base_dir: &std::path::Path) -> Self {
        OrchestratorConfig {
            services_dir: base_dir.join("services"),
            data_dir: base_dir.join(".orchestrator"),
            auto_restart: true,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            log_level: LogLevel::Info,
            log_format: LogFormat::Text,
            start_discovered: true,
            restart_on_binary_change: true,
            log_max_bytes: DEFAULT_LOG_MAX_BYTES,
            log_max_files: DEFAULT_LOG_MAX_FILES,
            log_timestamps: false,
            log_max_age: None,
            log_compress: false,
            state_max_bytes: DEFAULT_STATE_MAX_BYTES,
            http_listen: None,
            http_token_file: None,
            api_max_connections: DEFAULT_API_MAX_CONNECTIONS,
            api_header_timeout: DEFAULT_API_HEADER_TIMEOUT,
            api_idle_timeout: DEFAULT_API_IDLE_TIMEOUT,
            watch: true,
            cgroup_parent: PathBuf::from(DEFAULT_CGROUP_PARENT),
            require_limits: false,
        }
    }
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "error",
            LogLevel::Warn => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

impl RestartPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartPolicy::Always => "always",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Never => "never",
        }
    }
}

/// A resource `rlimits` can set, as setrlimit(2) names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rlimit {
    Nofile,
    Nproc,
    Core,
    Memlock,
    Stack,
    As,
    Cpu,
    Fsize,
}

impl Rlimit {
    pub const ALL: [Rlimit; 8] = [
        Rlimit::Nofile,
        Rlimit::Nproc,
        Rlimit::Core,
        Rlimit::Memlock,
        Rlimit::Stack,
        Rlimit::As,
        Rlimit::Cpu,
        Rlimit::Fsize,
    ];

    /// The key in `rlimits = { ... }`.
    pub fn as_str(self) -> &'static str {
        match self {
            Rlimit::Nofile => "nofile",
            Rlimit::Nproc => "nproc",
            Rlimit::Core => "core",
            Rlimit::Memlock => "memlock",
            Rlimit::Stack => "stack",
            Rlimit::As => "as",
            Rlimit::Cpu => "cpu",
            Rlimit::Fsize => "fsize",
        }
    }
}

/// One resource's limit: a number (bytes, seconds or a count, as
/// setrlimit(2) counts that resource) or no limit at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RlimitValue {
    Limited(u64),
    Unlimited,
}

/// A SHA-256 digest, parsed from 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256(pub [u8; 32]);

impl Sha256 {
    /// 64 hex digits, either case; `None` otherwise.
    pub fn from_hex(text: &str) -> Option<Sha256> {
        let bytes = text.as_bytes();
        if bytes.len() != 64 {
            return None;
        }
        let mut digest = [0u8; 32];
        for (out, pair) in digest.iter_mut().zip(bytes.chunks_exact(2)) {
            let high = (pair[0] as char).to_digit(16)?;
            let low = (pair[1] as char).to_digit(16)?;
            *out = u8::try_from(high * 16 + low).ok()?;
        }
        Some(Sha256(digest))
    }
}

impl std::fmt::Display for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl std::fmt::Debug for Sha256 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sha256({self})")
    }
}
