//! Prometheus text exposition, built fresh from the services' state on each
//! scrape: nothing is kept or updated between scrapes, so an idle daemon
//! does no metrics work at all.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use orchestrator_core::wire::{DaemonInfo, Health, ServiceInfo, State};

pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(&'static str, String)>;

pub fn render(daemon: &DaemonInfo, services: &[ServiceInfo]) -> String {
    let mut registry = Registry::with_prefix("orchestrator");
    let build = Info::new(vec![("version", env!("CARGO_PKG_VERSION").to_owned())]);
    registry.register("build", "Build information of the daemon", build);
    let stale = Gauge::<i64>::default();
    stale.set(i64::from(daemon.state_stale));
    registry.register(
        "state_record_stale",
        "1 while the crash-recovery record (data_dir/state) cannot be written",
        stale,
    );
    let failed_writes = Counter::<u64>::default();
    failed_writes.inc_by(daemon.state_failed_writes);
    registry.register(
        "state_write_failures",
        "Writes of the crash-recovery record that failed",
        failed_writes,
    );
    let events_dropped = Counter::<u64>::default();
    events_dropped.inc_by(daemon.events_file_dropped);
    registry.register(
        "events_file_dropped",
        "Events events.jsonl lost because its writer was stuck",
        events_dropped,
    );

    let up = Family::<Labels, Gauge>::default();
    let state = Family::<Labels, Gauge>::default();
    let restarts = Family::<Labels, Counter>::default();
    let last_exit = Family::<Labels, Gauge>::default();
    let uptime = Family::<Labels, Gauge>::default();
    let healthy = Family::<Labels, Gauge>::default();
    let log_dropped = Family::<Labels, Counter>::default();
    let memory = Family::<Labels, Gauge>::default();
    let cpu = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    let oom_kills = Family::<Labels, Counter>::default();
    let notify_rejected = Family::<Labels, Counter>::default();
    for service in services {
        let name = || vec![("service", service.name.clone())];
        up.get_or_create(&name())
            .set(i64::from(service.state == State::Running));
        for candidate in State::ALL {
            let mut labels = name();
            labels.push(("state", candidate.as_str().to_owned()));
            state
                .get_or_create(&labels)
                .set(i64::from(service.state == candidate));
        }
        restarts.get_or_create(&name()).inc_by(service.restarts);
        if let Some(code) = service.last_exit_code {
            last_exit.get_or_create(&name()).set(i64::from(code));
        }
        if let Some(seconds) = service.uptime {
            uptime
                .get_or_create(&name())
                .set(i64::try_from(seconds).unwrap_or(i64::MAX));
        }
        log_dropped
            .get_or_create(&name())
            .inc_by(service.log_dropped_bytes);
        oom_kills.get_or_create(&name()).inc_by(service.oom_kills);
        notify_rejected
            .get_or_create(&name())
            .inc_by(service.notify_rejected);
        if let Some(bytes) = service.memory_bytes {
            memory
                .get_or_create(&name())
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        if let Some(seconds) = service.cpu_seconds {
            cpu.get_or_create(&name()).inc_by(seconds);
        }
        if let Some(health) = service.health {
            healthy
                .get_or_create(&name())
                .set(i64::from(health == Health::Healthy));
        }
    }
    registry.register("service_up", "1 when the service's process is running", up);
    registry.register(
        "service_state",
        "1 for the state the service is in, 0 for the others",
        state,
    );
    registry.register(
        "service_restarts",
        "Times the daemon restarted the service after a failure",
        restarts,
    );
    registry.register(
        "service_last_exit_code",
        "Exit code of the last process (128+N for a death by signal N)",
        last_exit,
    );
    registry.register(
        "service_uptime_seconds",
        "Seconds the current process has run",
        uptime,
    );
    registry.register(
        "service_healthy",
        "1 when the service's health check passes (services with a check only)",
        healthy,
    );
    registry.register(
        "service_memory_bytes",
        "Memory the service uses: its cgroup's count, else its processes' resident memory",
        memory,
    );
    registry.register(
        "service_cpu_seconds",
        "CPU time the service's processes have used",
        cpu,
    );
    registry.register(
        "service_oom_kills",
        "Times the kernel's OOM killer ended the service (memory_limit)",
        oom_kills,
    );
    registry.register(
        "service_notify_rejected",
        "sd_notify datagrams dropped because the service's own processes did not send them",
        notify_rejected,
    );
    registry.register(
        "service_log_dropped_bytes",
        "Output bytes the service's log file could not take (disk full, ...)",
        log_dropped,
    );
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, &registry);
    text
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

    #[test]
    fn renders_prometheus_families() {
        let daemon = DaemonInfo {
            pid: 1,
            version: "0".into(),
            state_stale: true,
            state_failed_writes: 4,
            events_file_dropped: 0,
        };
        let text = render(
            &daemon,
            &[
                ServiceInfo {
                    memory_bytes: Some(1 << 20),
                    cpu_seconds: Some(1.5),
                    ..info("api", "running", 3, Some(1))
                },
                ServiceInfo {
                    oom_kills: 2,
                    ..info("db", "failed", 10, Some(137))
                },
            ],
        );
        for expected in [
            "# TYPE orchestrator_build info",
            "orchestrator_service_up{service=\"api\"} 1",
            "orchestrator_service_up{service=\"db\"} 0",
            "orchestrator_service_state{service=\"db\",state=\"failed\"} 1",
            "orchestrator_service_state{service=\"db\",state=\"running\"} 0",
            "# TYPE orchestrator_service_restarts counter",
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
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        assert!(!text.contains("service_uptime_seconds{service=\"db\"}"));
    }
}
