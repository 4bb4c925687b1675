//! Prometheus exposition, built fresh from the services' state on each
//! scrape: nothing is kept or updated between scrapes, so an idle daemon
//! does no metrics work at all.
//!
//! Two formats from one model: OpenMetrics 1.0 for a client that asks for
//! it (Prometheus does), the classic text format 0.0.4 for every other one
//! (promtool, older scrapers, curl), which has no `info` type and names a
//! counter's family with its `_total`. Families are sorted by name and
//! series by labels, so two scrapes of the same state are the same text.

use std::fmt::Write as _;

use orchestrator_core::wire::{DaemonInfo, Health, ServiceInfo, State};

pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Text,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
            Format::Text => TEXT_CONTENT_TYPE,
        }
    }
}

/// OpenMetrics when the client lists it with a q above 0 (Prometheus sends
/// `application/openmetrics-text;version=1.0.0,...;q=0.5,...`), else the
/// classic text, which every scraper reads. Weighing it against the other
/// types' q-values would gain nothing: a client that names OpenMetrics at
/// all can read it.
pub fn negotiate(accept: Option<&str>) -> Format {
    let listed = accept.unwrap_or_default().split(',').any(|range| {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or_default();
        media.eq_ignore_ascii_case("application/openmetrics-text")
            && parts.all(|param| {
                let Some((key, value)) = param.split_once('=') else {
                    return true;
                };
                !key.trim().eq_ignore_ascii_case("q")
                    || value.trim().parse::<f64>().is_ok_and(|q| q > 0.0)
            })
    });
    if listed {
        Format::OpenMetrics
    } else {
        Format::Text
    }
}

/// The daemon's own process, as Prometheus client libraries report theirs
/// (`process_*`); `None` where /proc could not tell.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Blocking reads of /proc/self (no disk behind them, but still file
    /// I/O): call it off the runtime's workers.
    pub fn read() -> ProcessStats {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|&ticks| ticks > 0)
            .map(|ticks| ticks as f64);
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        // Fields after the command, which may itself hold spaces and ')'.
        let fields: Vec<&str> = stat
            .as_deref()
            .and_then(|stat| stat.rsplit_once(") "))
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // proc(5) numbers them from 1 with the pid and command first.
        let field = |number: usize| fields.get(number - 3)?.parse::<u64>().ok();
        let cpu_seconds = match (field(14), field(15), ticks) {
            (Some(user), Some(system), Some(ticks)) => Some((user + system) as f64 / ticks),
            _ => None,
        };
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|stat| {
            stat.lines()
                .find_map(|line| line.strip_prefix("btime "))
                .and_then(|value| value.trim().parse::<u64>().ok())
        });
        let start_time_seconds = match (field(22), boot_time, ticks) {
            (Some(start), Some(boot), Some(ticks)) => Some(boot as f64 + start as f64 / ticks),
            _ => None,
        };
        let resident_bytes = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|line| line.strip_prefix("VmRSS:"))
                    .and_then(|value| {
                        value
                            .trim()
                            .trim_end_matches("kB")
                            .trim()
                            .parse::<u64>()
                            .ok()
                    })
            })
            .map(|kib| kib * 1024);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|entries| entries.count() as u64);
        let max_fds = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .ok()
            .map(|(soft, _)| soft);
        ProcessStats {
            cpu_seconds,
            resident_bytes,
            open_fds,
            max_fds,
            start_time_seconds,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gauge,
    Counter,
    Info,
}

type Labels = Vec<(&'static str, String)>;

struct Family {
    /// Without `_total` (counters) or `_info` (info): OpenMetrics' name.
    name: &'static str,
    help: &'static str,
    kind: Kind,
    samples: Vec<(Labels, f64)>,
}

impl Family {
    fn new(name: &'static str, kind: Kind, help: &'static str) -> Self {
        Family {
            name,
            help,
            kind,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: Labels, value: f64) {
        self.samples.push((labels, value));
    }

    fn service(&mut self, service: &ServiceInfo, value: f64) {
        self.add(vec![("service", service.name.clone())], value);
    }
}

pub fn render(
    daemon: &DaemonInfo,
    process: &ProcessStats,
    services: &[ServiceInfo],
    format: Format,
) -> String {
    let mut families = Vec::new();
    let mut build = Family::new(
        "orchestrator_build",
        Kind::Info,
        "Build information of the daemon",
    );
    build.add(vec![("version", env!("CARGO_PKG_VERSION").to_owned())], 1.0);
    families.push(build);
    let mut single = |name, kind, help, value: f64| {
        let mut family = Family::new(name, kind, help);
        family.add(Vec::new(), value);
        families.push(family);
    };
    single(
        "orchestrator_state_record_stale",
        Kind::Gauge,
        "1 while the crash-recovery record (data_dir/state) cannot be written",
        f64::from(u8::from(daemon.state_stale)),
    );
    single(
        "orchestrator_state_write_failures",
        Kind::Counter,
        "Writes of the crash-recovery record that failed",
        daemon.state_failed_writes as f64,
    );
    single(
        "orchestrator_events_file_dropped",
        Kind::Counter,
        "Events events.jsonl lost because its writer was stuck",
        daemon.events_file_dropped as f64,
    );
    let process_metrics = [
        (
            "process_cpu_seconds",
            Kind::Counter,
            "Total user and system CPU time spent in seconds",
            process.cpu_seconds,
        ),
        (
            "process_resident_memory_bytes",
            Kind::Gauge,
            "Resident memory size in bytes",
            process.resident_bytes.map(|b| b as f64),
        ),
        (
            "process_open_fds",
            Kind::Gauge,
            "Number of open file descriptors",
            process.open_fds.map(|n| n as f64),
        ),
        (
            "process_max_fds",
            Kind::Gauge,
            "Maximum number of open file descriptors",
            process.max_fds.map(|n| n as f64),
        ),
        (
            "process_start_time_seconds",
            Kind::Gauge,
            "Start time of the process since unix epoch in seconds",
            process.start_time_seconds,
        ),
    ];
    for (name, kind, help, value) in process_metrics {
        if let Some(value) = value {
            single(name, kind, help, value);
        }
    }

    let mut up = Family::new(
        "orchestrator_service_up",
        Kind::Gauge,
        "1 when the service's process is running",
    );
    let mut state = Family::new(
        "orchestrator_service_state",
        Kind::Gauge,
        "1 for the state the service is in, 0 for the others",
    );
    let mut restarts = Family::new(
        "orchestrator_service_restarts",
        Kind::Counter,
        "Times the daemon restarted the service after a failure",
    );
    // Apart from `restarts`, so that a deploy's restarts never fire a
    // crash-loop alert.
    let mut requested_starts = Family::new(
        "orchestrator_service_requested_starts",
        Kind::Counter,
        "Starts and restarts of the service that a user asked for (CLI, API)",
    );
    let mut last_exit = Family::new(
        "orchestrator_service_last_exit_code",
        Kind::Gauge,
        "Exit code of the last process (128+N for a death by signal N)",
    );
    let mut uptime = Family::new(
        "orchestrator_service_uptime_seconds",
        Kind::Gauge,
        "Seconds the current process has run",
    );
    let mut healthy = Family::new(
        "orchestrator_service_healthy",
        Kind::Gauge,
        "1 when the service's health check passes (services with a check only)",
    );
    let mut memory = Family::new(
        "orchestrator_service_memory_bytes",
        Kind::Gauge,
        "Memory the service uses: its cgroup's count, else its processes' resident memory",
    );
    let mut cpu = Family::new(
        "orchestrator_service_cpu_seconds",
        Kind::Counter,
        "CPU time the service's processes have used",
    );
    let mut oom_kills = Family::new(
        "orchestrator_service_oom_kills",
        Kind::Counter,
        "Times the kernel's OOM killer ended the service (memory_limit)",
    );
    let mut notify_rejected = Family::new(
        "orchestrator_service_notify_rejected",
        Kind::Counter,
        "sd_notify datagrams dropped because the service's own processes did not send them",
    );
    let mut log_dropped = Family::new(
        "orchestrator_service_log_dropped_bytes",
        Kind::Counter,
        "Output bytes the service's log file could not take (disk full, ...)",
    );
    for service in services {
        up.service(
            service,
            f64::from(u8::from(service.state == State::Running)),
        );
        for candidate in State::ALL {
            state.add(
                vec![
                    ("service", service.name.clone()),
                    ("state", candidate.as_str().to_owned()),
                ],
                f64::from(u8::from(service.state == candidate)),
            );
        }
        restarts.service(service, service.restarts as f64);
        requested_starts.service(service, service.requested_starts as f64);
        if let Some(code) = service.last_exit_code {
            last_exit.service(service, f64::from(code));
        }
        if let Some(seconds) = service.uptime {
            uptime.service(service, seconds as f64);
        }
        log_dropped.service(service, service.log_dropped_bytes as f64);
        oom_kills.service(service, service.oom_kills as f64);
        notify_rejected.service(service, service.notify_rejected as f64);
        if let Some(bytes) = service.memory_bytes {
            memory.service(service, bytes as f64);
        }
        if let Some(seconds) = service.cpu_seconds {
            cpu.service(service, seconds);
        }
        if let Some(health) = service.health {
            healthy.service(service, f64::from(u8::from(health == Health::Healthy)));
        }
    }
    families.extend([
        up,
        state,
        restarts,
        requested_starts,
        last_exit,
        uptime,
        healthy,
        memory,
        cpu,
        oom_kills,
        notify_rejected,
        log_dropped,
    ]);
    encode(families, format)
}

fn encode(mut families: Vec<Family>, format: Format) -> String {
    families.sort_by_key(|family| family.name);
    let mut out = String::new();
    for mut family in families {
        family.samples.sort_by(|a, b| a.0.cmp(&b.0));
        let suffix = match family.kind {
            Kind::Counter => "_total",
            Kind::Info => "_info",
            Kind::Gauge => "",
        };
        let sample_name = format!("{}{suffix}", family.name);
        // The classic format names the family as its samples and has no
        // `info`: an info is a gauge there, as client_golang exposes one.
        let (family_name, kind) = match (format, family.kind) {
            (Format::OpenMetrics, Kind::Counter) => (family.name, "counter"),
            (Format::OpenMetrics, Kind::Info) => (family.name, "info"),
            (Format::Text, Kind::Counter) => (sample_name.as_str(), "counter"),
            (Format::Text, Kind::Info) => (sample_name.as_str(), "gauge"),
            (_, Kind::Gauge) => (family.name, "gauge"),
        };
        // Writing into a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP {family_name} {}",
            escape_help(family.help, format)
        );
        let _ = writeln!(out, "# TYPE {family_name} {kind}");
        for (labels, value) in &family.samples {
            out.push_str(&sample_name);
            if !labels.is_empty() {
                out.push('{');
                for (i, (key, value)) in labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    let _ = write!(out, "{key}=\"{}\"", escape_label(value));
                }
                out.push('}');
            }
            let _ = writeln!(out, " {}", number(*value));
        }
    }
    if format == Format::OpenMetrics {
        out.push_str("# EOF\n");
    }
    out
}

/// Integers without a fraction, other values as Rust writes them (which
/// both formats parse); never NaN or infinite here.
fn number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value}")
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

/// The classic format escapes only `\` and newlines in HELP.
fn escape_help(text: &str, format: Format) -> String {
    let text = text.replace('\\', "\\\\").replace('\n', "\\n");
    match format {
        Format::OpenMetrics => text.replace('"', "\\\""),
        Format::Text => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, state: &str, restarts: u64, code: Option<i32>) -> ServiceInfo {
        ServiceInfo {
            name: name.to_owned(),
            configured: true,
            enabled: true,
            state: serde_json::from_value(serde_json::json!(state)).unwrap(),
            pid: None,
            uptime: (state == "running").then_some(42),
            restarts,
            requested_starts: 0,
            last_exit_code: code,
            last_exit_signal: None,
            completed: false,
            last_error: None,
            health: None,
            log_dropped_bytes: 0,
            generation: 1,
            memory_bytes: None,
            cpu_seconds: None,
            oom_kills: 0,
            reason: None,
            notify_rejected: 0,
            depends_on: Default::default(),
        }
    }

    fn daemon() -> DaemonInfo {
        DaemonInfo {
            pid: 1,
            version: "0".into(),
            state_stale: true,
            state_failed_writes: 4,
            events_file_dropped: 0,
            upgrades: 0,
            upgrade_failures: 0,
            last_upgrade_error: None,
        }
    }

    fn process() -> ProcessStats {
        ProcessStats {
            cpu_seconds: Some(0.25),
            resident_bytes: Some(8 << 20),
            open_fds: Some(12),
            max_fds: Some(65536),
            start_time_seconds: Some(1_700_000_000.5),
        }
    }

    fn services() -> Vec<ServiceInfo> {
        vec![
            ServiceInfo {
                memory_bytes: Some(1 << 20),
                cpu_seconds: Some(1.5),
                requested_starts: 2,
                health: Some(Health::Healthy),
                ..info("api", "running", 3, Some(1))
            },
            ServiceInfo {
                oom_kills: 2,
                ..info("db", "failed", 10, Some(137))
            },
            info("cache", "stopped", 0, None),
        ]
    }

    const SHARED: [&str; 16] = [
        "orchestrator_build_info{version=\"",
        "orchestrator_service_requested_starts_total{service=\"api\"} 2",
        "orchestrator_service_up{service=\"api\"} 1",
        "orchestrator_service_up{service=\"db\"} 0",
        "orchestrator_service_state{service=\"db\",state=\"failed\"} 1",
        "orchestrator_service_state{service=\"db\",state=\"running\"} 0",
        "orchestrator_service_restarts_total{service=\"api\"} 3",
        "orchestrator_service_last_exit_code{service=\"db\"} 137",
        "orchestrator_service_uptime_seconds{service=\"api\"} 42",
        "orchestrator_service_log_dropped_bytes_total{service=\"db\"} 0",
        "orchestrator_state_record_stale 1",
        "orchestrator_state_write_failures_total 4",
        "orchestrator_events_file_dropped_total 0",
        "orchestrator_service_oom_kills_total{service=\"db\"} 2",
        "orchestrator_service_memory_bytes{service=\"api\"} 1048576",
        "orchestrator_service_cpu_seconds_total{service=\"api\"} 1.5",
    ];

    const PROCESS: [&str; 5] = [
        "process_cpu_seconds_total 0.25",
        "process_resident_memory_bytes 8388608",
        "process_open_fds 12",
        "process_max_fds 65536",
        "process_start_time_seconds 1700000000.5",
    ];

    #[test]
    fn renders_openmetrics() {
        let text = render(&daemon(), &process(), &services(), Format::OpenMetrics);
        for expected in SHARED.iter().chain(&PROCESS).chain(&[
            "# TYPE orchestrator_build info",
            "# TYPE orchestrator_service_restarts counter",
            "# TYPE process_cpu_seconds counter",
            "orchestrator_service_healthy{service=\"api\"} 1",
        ]) {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("service_uptime_seconds{service=\"db\"}"));
        assert!(!text.contains("service_healthy{service=\"db\"}"));
    }

    #[test]
    fn renders_the_classic_text_format() {
        let text = render(&daemon(), &process(), &services(), Format::Text);
        for expected in SHARED.iter().chain(&PROCESS).chain(&[
            "# TYPE orchestrator_build_info gauge",
            "# HELP orchestrator_service_restarts_total Times",
            "# TYPE orchestrator_service_restarts_total counter",
            "# TYPE process_cpu_seconds_total counter",
            "# TYPE process_open_fds gauge",
        ]) {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        for absent in [
            "# EOF",
            " info\n",
            "# TYPE orchestrator_service_restarts counter",
        ] {
            assert!(!text.contains(absent), "{absent:?} in\n{text}");
        }
    }

    #[test]
    fn the_same_state_is_the_same_text_whatever_the_input_order() {
        let mut reversed = services();
        reversed.reverse();
        for format in [Format::OpenMetrics, Format::Text] {
            let once = render(&daemon(), &process(), &services(), format);
            assert_eq!(once, render(&daemon(), &process(), &reversed, format));
            // Sorted: families by name, then series by labels.
            let families: Vec<&str> = once
                .lines()
                .filter_map(|line| line.strip_prefix("# TYPE "))
                .map(|line| line.split(' ').next().unwrap())
                .collect();
            let mut sorted = families.clone();
            sorted.sort();
            assert_eq!(families, sorted);
            let up: Vec<&str> = once
                .lines()
                .filter(|line| line.starts_with("orchestrator_service_up{"))
                .collect();
            assert_eq!(
                up,
                [
                    "orchestrator_service_up{service=\"api\"} 1",
                    "orchestrator_service_up{service=\"cache\"} 0",
                    "orchestrator_service_up{service=\"db\"} 0",
                ]
            );
        }
    }

    #[test]
    fn labels_and_help_are_escaped() {
        let odd = info("a\"b\\c\nd", "running", 0, None);
        let text = render(&daemon(), &process(), &[odd], Format::Text);
        assert!(
            text.contains("orchestrator_service_up{service=\"a\\\"b\\\\c\\nd\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn process_stats_of_this_process() {
        let stats = ProcessStats::read();
        assert!(stats.cpu_seconds.is_some_and(|s| s >= 0.0), "{stats:?}");
        assert!(stats.resident_bytes.is_some_and(|b| b > 0), "{stats:?}");
        let open = stats.open_fds.expect("open fds");
        let max = stats.max_fds.expect("max fds");
        assert!(open >= 3 && open <= max, "{stats:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let started = stats.start_time_seconds.expect("start time");
        // Within a day of now: started before now, and not in 1970.
        assert!(
            started <= now + 1.0 && started > now - 86_400.0,
            "{stats:?}"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(negotiate(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(
            negotiate(Some(
                "text/plain;q=0.9, Application/OpenMetrics-Text; q=0.5"
            )),
            Format::OpenMetrics
        );
        for accept in [
            None,
            Some(""),
            Some("*/*"),
            Some("text/plain"),
            Some("text/plain;version=0.0.4"),
            Some("application/openmetrics-text;q=0"),
            Some("application/json"),
        ] {
            assert_eq!(negotiate(accept), Format::Text, "{accept:?}");
        }
    }

    /// What promtool says of `text`, `None` when it is not installed. The
    /// classic format through `promtool check metrics` (its parser and
    /// linter: any output fails); OpenMetrics, which that command cannot
    /// read, through Prometheus' OpenMetrics parser behind `promtool tsdb
    /// create-blocks-from openmetrics` (strict: `# EOF`, types, syntax),
    /// which wants a timestamp on each sample.
    fn promtool(text: &str, format: Format) -> Option<(bool, String)> {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let dir = orchestrator_e2e::TestDir::new("promtool");
        let mut command = Command::new("promtool");
        match format {
            Format::Text => command.args(["check", "metrics"]),
            Format::OpenMetrics => {
                let stamped: String = text
                    .lines()
                    .map(|line| match line.starts_with('#') {
                        true => format!("{line}\n"),
                        false => format!("{line} 1700000000\n"),
                    })
                    .collect();
                let file = dir.write_file("metrics.om", &stamped, 0o644);
                command
                    .args(["tsdb", "create-blocks-from", "openmetrics"])
                    .arg(file)
                    .arg(dir.join("blocks"))
            }
        };
        let mut child = match command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(child) => child,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return None,
            Err(error) => panic!("cannot run promtool: {error}"),
        };
        let mut stdin = child.stdin.take().unwrap();
        if format == Format::Text {
            stdin.write_all(text.as_bytes()).unwrap();
        }
        drop(stdin);
        let output = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        let clean = output.status.success()
            && (format == Format::OpenMetrics
                || (stdout.trim().is_empty() && stderr.trim().is_empty()));
        Some((clean, format!("{stdout}{stderr}")))
    }

    #[test]
    fn promtool_accepts_both_formats() {
        for format in [Format::Text, Format::OpenMetrics] {
            let text = render(&daemon(), &process(), &services(), format);
            match promtool(&text, format) {
                Some((clean, said)) => {
                    assert!(clean, "promtool on {format:?}:\n{said}\n{text}")
                }
                None if std::env::var_os("CI").is_some() => {
                    panic!("promtool is missing; .ci/run installs it")
                }
                None => {
                    eprintln!("note: promtool not found; {format:?} not checked with it");
                    return;
                }
            }
        }
        // And it would fail: the OpenMetrics text is no classic text.
        let open = render(&daemon(), &process(), &services(), Format::OpenMetrics);
        if let Some((clean, _)) = promtool(&open, Format::Text) {
            assert!(!clean, "promtool check metrics took OpenMetrics");
        }
    }
}
