//! Health, readiness and dependencies end to end (issue 13): the real
//! daemon and the fixture service with its health endpoint, its sd_notify
//! flags and its stderr line; every wait polls with a deadline.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use orchestrator_e2e::*;
use serde_json::Value;

/// A workspace with `toml` after a `[orchestrator]` table (5 s shutdown),
/// and the fixture installed as each of `services`.
fn workspace(label: &str, services: &[&str], toml: &str) -> TestDir {
    let dir = TestDir::new(label);
    for name in services {
        dir.add_fixture_service(name);
    }
    dir.write_file(
        CONFIG,
        &format!("[orchestrator]\nshutdown_timeout = \"5s\"\n{toml}"),
        0o644,
    );
    dir
}

/// Every event recorded so far (data_dir/events.jsonl).
fn events(dir: &TestDir) -> Vec<Value> {
    read_lines(&dir.data_dir().join("events.jsonl"))
        .iter()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn events_of(dir: &TestDir, service: &str, kind: &str) -> Vec<Value> {
    events(dir)
        .into_iter()
        .filter(|e| e["service"] == service && e["event"] == kind)
        .collect()
}

/// An event's time, as the RFC 3339 text orders (same length, UTC).
fn time_of(event: &Value) -> String {
    event["time"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn an_http_check_turns_unhealthy_and_the_service_is_restarted() {
    let dir = workspace("health-http", &["web"], "");
    let flag = dir.join("unhealthy");
    // Chosen free now: the check's URL is in the config, written first.
    let port = free_port();
    dir.write_file(
        CONFIG,
        &format!(
            "[orchestrator]\nshutdown_timeout = \"5s\"\n\
             [services.web]\nargs = [\"--http-health\", \"{port}\", \"--unhealthy-file\", \"{}\", \"--sleep\"]\n\
             backoff = {{ initial = \"50ms\", max = \"100ms\" }}\n\
             [services.web.health]\nhttp = \"http://127.0.0.1:{port}/healthz\"\n\
             interval = \"200ms\"\ntimeout = \"1s\"\nretries = 2\n",
            flag.display()
        ),
        0o644,
    );
    let daemon = run_daemon_in(&dir);
    let healthy = wait_for_status(&dir, &daemon, "web", |s| {
        s["state"] == "running" && s["health"] == "healthy"
    });
    let first_pid = healthy["pid"].as_u64().unwrap();
    std::fs::write(&flag, "").unwrap();
    let unhealthy = wait_until(DEADLINE, || {
        events_of(&dir, "web", "health_changed")
            .iter()
            .any(|e| e["health"] == "unhealthy")
    });
    assert!(
        unhealthy,
        "no unhealthy verdict; log:\n{}",
        daemon.stderr_text()
    );
    let faulted = wait_until(DEADLINE, || !events_of(&dir, "web", "faulted").is_empty());
    assert!(
        faulted,
        "not stopped as failed; log:\n{}",
        daemon.stderr_text()
    );
    let reason = events_of(&dir, "web", "faulted")[0]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("unhealthy") && reason.contains("500"),
        "{reason}"
    );
    std::fs::remove_file(&flag).unwrap();
    let again = wait_for_status(&dir, &daemon, "web", |s| {
        s["health"] == "healthy" && s["pid"].as_u64().is_some_and(|pid| pid != first_pid)
    });
    assert_eq!(again["restarts"], 1, "{again:#}");
    let table = cli_ok(&dir, &["status"]);
    assert!(
        table.contains("HEALTH") && table.contains("healthy"),
        "{table}"
    );
}

/// A TCP port that nothing listens on now (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

#[test]
fn tcp_and_exec_checks_make_their_services_healthy() {
    let port = free_port();
    let dir = workspace(
        "health-tcp-exec",
        &["tcp", "exec"],
        &format!(
            "[services.tcp]\nargs = [\"--tcp-listen\", \"{port}\", \"--sleep\"]\n\
             [services.tcp.health]\ntcp = \"127.0.0.1:{port}\"\ninterval = \"200ms\"\n\
             [services.exec]\nargs = [\"--sleep\"]\n\
             [services.exec.health]\nexec = [\"sh\", \"-c\", \"test \\\"$HOME\\\" = \\\"$(pwd)\\\"\"]\ninterval = \"200ms\"\n"
        ),
    );
    let daemon = run_daemon_in(&dir);
    for name in ["tcp", "exec"] {
        wait_for_status(&dir, &daemon, name, |s| {
            s["state"] == "running" && s["health"] == "healthy"
        });
    }
}

#[test]
fn a_service_with_a_check_is_starting_until_it_passes_and_fails_at_start_timeout() {
    let port = free_port();
    let dir = workspace(
        "health-start-timeout",
        &["never"],
        &format!(
            "[services.never]\nargs = [\"--sleep\"]\nrestart = \"never\"\nstart_timeout = \"1s\"\n\
             [services.never.health]\ntcp = \"127.0.0.1:{port}\"\ninterval = \"200ms\"\n"
        ),
    );
    let daemon = run_daemon_in(&dir);
    let failed = wait_for_status(&dir, &daemon, "never", |s| s["state"] == "failed");
    let error = failed["last_error"].as_str().unwrap();
    assert!(error.contains("not ready within 1s"), "{failed:#}");
}

/// The NOTIFY_SOCKET a fixture printed (`--print-env`) in its log.
fn notify_socket_of(dir: &TestDir, service: &str) -> String {
    let line = wait_for_line(&dir.log_path(service), "ENV NOTIFY_SOCKET=");
    line.rsplit("NOTIFY_SOCKET=").next().unwrap().to_owned()
}

fn send_notify(socket: &str, message: &str) {
    let name = socket.strip_prefix('@').expect("an abstract socket");
    let address = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sender = UnixDatagram::unbound().unwrap();
    sender.send_to_addr(message.as_bytes(), &address).unwrap();
}

#[test]
fn ready_by_notify_gates_a_dependent_and_a_foreign_datagram_is_ignored() {
    let dir = workspace(
        "notify-gate",
        &["db", "api"],
        &format!(
            "[services.db]\nnotify = true\nargs = [\"--print-env\", \"--until-file\", \"{}\", \"--notify\", \"READY=1\", \"--notify\", \"STATUS=serving\", \"--sleep\"]\n\
             [services.api]\nstart_grace = \"0s\"\ndepends_on = {{ db = \"healthy\" }}\nargs = [\"--sleep\"]\n",
            "go"
        ),
    );
    let go = dir.service_data_dir("db").join("go");
    let daemon = run_daemon_in(&dir);
    let socket = notify_socket_of(&dir, "db");
    // A datagram from another process (this test): dropped, counted.
    send_notify(&socket, "READY=1");
    let db = wait_for_status(&dir, &daemon, "db", |s| s["notify_rejected"] == 1);
    assert_eq!(db["state"], "starting", "{db:#}");
    let api = status_of(&dir, "api");
    assert_eq!(api["state"], "starting", "{api:#}");
    assert_eq!(api["reason"], "waiting for db (healthy)", "{api:#}");
    assert!(
        api["pid"].is_null(),
        "api must not run before db is ready: {api:#}"
    );
    std::fs::write(&go, "").unwrap();
    wait_for_status(&dir, &daemon, "api", |s| s["state"] == "running");
    let db = status_of(&dir, "db");
    assert_eq!(
        (db["state"].as_str(), db["reason"].as_str()),
        (Some("running"), Some("serving"))
    );
    let ready = time_of(&events_of(&dir, "db", "ready")[0]);
    let started = time_of(&events_of(&dir, "api", "started")[0]);
    assert!(
        ready <= started,
        "db ready at {ready}, api started at {started}"
    );
}

#[test]
fn a_silent_watchdog_restarts_the_service() {
    let dir = workspace(
        "notify-watchdog",
        &["dog"],
        "[services.dog]\nnotify = true\nwatchdog = \"1s\"\nbackoff = { initial = \"50ms\", max = \"100ms\" }\n\
         args = [\"--print-env\", \"--notify\", \"READY=1\", \"--watchdog-ping-ms\", \"100\", \"--watchdog-stop-file\", \"quiet\", \"--sleep\"]\n",
    );
    let quiet = dir.service_data_dir("dog").join("quiet");
    let daemon = run_daemon_in(&dir);
    let first = wait_for_status(&dir, &daemon, "dog", |s| s["state"] == "running");
    let env = wait_for_line(&dir.log_path("dog"), "ENV WATCHDOG_USEC=");
    assert!(env.ends_with("WATCHDOG_USEC=1000000"), "{env}");
    // Pinging every 100 ms: more than a watchdog period passes without a fault.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        events_of(&dir, "dog", "faulted").is_empty(),
        "pinged, yet faulted"
    );
    std::fs::write(&quiet, "").unwrap();
    let faulted = wait_until(DEADLINE, || !events_of(&dir, "dog", "faulted").is_empty());
    assert!(faulted, "log:\n{}", daemon.stderr_text());
    let reason = events_of(&dir, "dog", "faulted")[0]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("watchdog"), "{reason}");
    wait_for_status(&dir, &daemon, "dog", |s| {
        s["pid"] != first["pid"] && s["restarts"] == 1
    });
}

#[test]
fn dependencies_start_in_order_and_stop_in_reverse() {
    let dir = workspace(
        "deps-order",
        &["db", "api", "web"],
        "[services.db]\nargs = [\"--ignore-term\", \"--sleep\"]\nstart_grace = \"300ms\"\nstop_timeout = \"300ms\"\n\
         [services.api]\ndepends_on = [\"db\"]\nargs = [\"--ignore-term\", \"--sleep\"]\nstart_grace = \"300ms\"\nstop_timeout = \"300ms\"\n\
         [services.web]\ndepends_on = { api = \"started\" }\nargs = [\"--ignore-term\", \"--sleep\"]\nstart_grace = \"300ms\"\nstop_timeout = \"300ms\"\n",
    );
    let mut daemon = run_daemon_in(&dir);
    wait_for_status(&dir, &daemon, "web", |s| s["state"] == "running");
    let started: Vec<String> = ["db", "api", "web"]
        .iter()
        .map(|name| time_of(&events_of(&dir, name, "started")[0]))
        .collect();
    let ready: Vec<String> = ["db", "api"]
        .iter()
        .map(|name| time_of(&events_of(&dir, name, "ready")[0]))
        .collect();
    assert!(
        ready[0] <= started[1],
        "api started before db was up: {started:?} {ready:?}"
    );
    assert!(
        ready[1] <= started[2],
        "web started before api was up: {started:?} {ready:?}"
    );
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
    // Each ignores SIGTERM for its 300 ms stop_timeout: the requests are
    // 300 ms apart when in order.
    let stops: Vec<String> = ["web", "api", "db"]
        .iter()
        .map(|name| time_of(&events_of(&dir, name, "stop_requested")[0]))
        .collect();
    assert!(
        stops[0] < stops[1] && stops[1] < stops[2],
        "stop order: {stops:?}"
    );
}

#[test]
fn check_names_every_service_in_a_cycle() {
    let dir = workspace(
        "deps-cycle",
        &["a", "b", "c"],
        "[services.a]\ndepends_on = [\"b\"]\n[services.b]\ndepends_on = [\"c\"]\n[services.c]\ndepends_on = [\"a\"]\n",
    );
    let (code, stdout, stderr) = cli(&dir, &["check"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    let text = format!("{stdout}{stderr}");
    assert!(text.contains("cycle"), "{text}");
    for name in ["a", "b", "c"] {
        assert!(text.contains(name), "{name} not named: {text}");
    }
}

#[test]
fn a_start_of_a_service_that_dies_at_once_fails_with_its_last_stderr_line() {
    let dir = workspace(
        "start-grace",
        &["crash"],
        "[services.crash]\nenabled = false\nrestart = \"never\"\n\
         args = [\"--eprint\", \"listen tcp :8080: address already in use\", \"--sleep-ms\", \"200\", \"--exit\", \"3\"]\n",
    );
    let daemon = run_daemon_in(&dir);
    let (code, stdout, stderr) = cli(&dir, &["start", "crash"]);
    assert_eq!(code, 1, "{stdout}{stderr}\nlog:\n{}", daemon.stderr_text());
    assert!(
        stderr.contains("exited with code 3 while starting")
            && stderr.contains("listen tcp :8080: address already in use"),
        "{stderr}"
    );
}

#[test]
fn stop_names_the_running_dependents_and_restart_with_dependents_restarts_them() {
    let dir = workspace(
        "deps-stop-note",
        &["db", "api"],
        "[services.db]\nstart_grace = \"0s\"\nargs = [\"--sleep\"]\n\
         [services.api]\nstart_grace = \"0s\"\ndepends_on = [\"db\"]\nargs = [\"--sleep\"]\n",
    );
    let daemon = run_daemon_in(&dir);
    let api = wait_for_status(&dir, &daemon, "api", |s| s["state"] == "running");
    let db = status_of(&dir, "db");
    let (code, _, stderr) = cli(&dir, &["restart", "db", "--with-dependents"]);
    assert_eq!(code, 0, "{stderr}");
    let api_after = status_of(&dir, "api");
    let db_after = status_of(&dir, "db");
    assert_ne!(api_after["pid"], api["pid"], "api was restarted too");
    assert_ne!(db_after["pid"], db["pid"]);
    assert_eq!(api_after["state"], "running");
    let (code, _, stderr) = cli(&dir, &["stop", "db"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("api depends on db"), "{stderr}");
    assert_eq!(status_of(&dir, "api")["state"], "running", "no cascade");
}
