//! The real `orchestrator run`: signals, its own log, zero-config.

use std::time::{Duration, Instant};

use orchestrator_e2e::*;

/// A workspace with `orchestrator.toml` = `toml` and a fixture symlink at
/// `services/NAME/NAME` for each name.
fn workspace(label: &str, services: &[&str], toml: &str) -> TestDir {
    let dir = TestDir::new(label);
    for name in services {
        dir.add_fixture_service(name);
    }
    dir.write_file("orchestrator.toml", toml, 0o644);
    dir
}

/// Wait for `READY` in the service's log; record its group; return its pid.
fn ready(dir: &TestDir, daemon: &Daemon, service: &str) -> u32 {
    let line = wait_for_line(&dir.log_path(service), "READY");
    daemon.guard.add_pgid(field(&line, "pgid") as i32);
    field(&line, "pid")
}

fn shutdown_on(signal: i32) {
    let dir = workspace(
        "shutdown",
        &["family", "single"],
        r#"
[orchestrator]
shutdown_timeout = "10s"

[services.family]
args = ["--grandchild", "--ready", "--sleep"]
stop_timeout = "2s"

[services.single]
args = ["--ready", "--sleep"]
stop_timeout = "2s"
"#,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    let family = ready(&dir, &daemon, "family");
    let single = ready(&dir, &daemon, "single");
    let grandchild = field(&wait_for_line(&dir.log_path("family"), "GRANDCHILD"), "pid");
    for pid in [family, single, grandchild] {
        assert!(is_alive(pid), "{pid} runs before the signal");
    }

    daemon.signal(signal);
    let status = daemon.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "a clean shutdown exits 0; log:\n{}",
        daemon.stderr_text()
    );
    for pid in [family, single, grandchild] {
        assert!(
            wait_until(DEADLINE, || !is_alive(pid)),
            "{pid} outlived the daemon: {:?}",
            stat(pid)
        );
    }
    let log = daemon.stderr_text();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("all services stopped; exiting"), "{log}");
}

#[test]
fn sigterm_stops_every_service_and_exits_0() {
    shutdown_on(SIGTERM);
}

#[test]
fn sigint_stops_every_service_and_exits_0() {
    shutdown_on(SIGINT);
}

#[test]
fn a_second_sigint_kills_at_once() {
    let dir = workspace(
        "double-int",
        &["stubborn"],
        r#"
[orchestrator]
shutdown_timeout = "60s"

[services.stubborn]
args = ["--ignore-term", "--ready", "--sleep"]
stop_timeout = "30s"
"#,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    // READY comes after SIGTERM is ignored.
    let pid = ready(&dir, &daemon, "stubborn");

    daemon.signal(SIGINT);
    // The graceful stop has begun (SIGTERM sent, and ignored).
    daemon.wait_for_log(&["stop requested", "service=stubborn"]);
    assert!(is_alive(pid));

    let second = Instant::now();
    daemon.signal(SIGINT);
    let status = daemon.wait_exit();
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(15),
        "the second SIGINT took {took:?}: it waited out the stop_timeout"
    );
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.stderr_text());
    assert!(
        wait_until(DEADLINE, || !is_alive(pid)),
        "{pid} outlived the daemon"
    );
}

#[test]
fn shutdown_timeout_caps_a_slow_stop() {
    let dir = workspace(
        "shutdown-cap",
        &["stubborn"],
        r#"
[orchestrator]
shutdown_timeout = "1s"

[services.stubborn]
args = ["--ignore-term", "--ready", "--sleep"]
stop_timeout = "60s"
"#,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    let pid = ready(&dir, &daemon, "stubborn");
    let began = Instant::now();
    daemon.signal(SIGTERM);
    let status = daemon.wait_exit();
    let took = began.elapsed();
    assert_eq!(status.code(), Some(0), "log:\n{}", daemon.stderr_text());
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(15),
        "shutdown took {took:?}: neither the 1s shutdown_timeout nor the 60s stop_timeout"
    );
    assert!(
        wait_until(DEADLINE, || !is_alive(pid)),
        "{pid} outlived the daemon"
    );
    assert!(
        daemon.stderr_text().contains("shutdown_timeout"),
        "{}",
        daemon.stderr_text()
    );
}

#[test]
fn the_daemon_log_tags_service_lines_with_service_and_stream() {
    let dir = workspace(
        "daemonlog",
        &["talker"],
        r#"
[orchestrator]
shutdown_timeout = "5s"

[services.talker]
args = ["--lines", "4", "--invalid-utf8", "--ready", "--sleep"]
"#,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    ready(&dir, &daemon, "talker");
    // The compact format: the name first, `|` for stdout, `!` for stderr.
    daemon.wait_for_log(&["talker       | ", "Z line 0 on stdout"]);
    daemon.wait_for_log(&["talker       ! ", "Z line 1 on stderr"]);
    daemon.wait_for_log(&["talker       | ", "Z READY pid="]);
    // Invalid UTF-8 is shown with replacement characters (the file keeps
    // the bytes: see the integration tests).
    daemon.wait_for_log(&["talker       | ", "bad \u{fffd}\u{fffd} bytes"]);
    daemon.wait_for_log(&["started", "service=talker", "pid="]);
    // The service file holds the raw lines, both streams. Its writer runs
    // apart from the console's, so the file may trail the console a little.
    let expected = [
        "line 0 on stdout",
        "line 1 on stderr",
        "line 2 on stdout",
        "line 3 on stderr",
    ];
    let log = dir.log_path("talker");
    let complete = || {
        let lines = read_lines(&log);
        expected.iter().all(|e| lines.iter().any(|l| l == e))
    };
    assert!(
        wait_until(DEADLINE, complete),
        "{expected:?}: {:?}",
        read_lines(&log)
    );
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

#[test]
fn a_service_s_last_lines_come_before_the_daemon_s_note_of_its_exit() {
    let dir = workspace(
        "lastwords",
        &["dying"],
        r#"
[orchestrator]
shutdown_timeout = "5s"

[services.dying]
args = ["--lines", "2000", "--exit", "3"]
restart = "never"
"#,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    daemon.wait_for_log(&["exited with code 3", "service=dying"]);
    let log = daemon.stderr_text();
    let lines: Vec<&str> = log.lines().collect();
    let exit_note = lines
        .iter()
        .position(|l| l.contains("exited with code 3"))
        .unwrap();
    // Both streams: the console thread must keep the daemon's own events
    // in order with the service lines handed to it.
    for last in ["line 1998 on stdout", "line 1999 on stderr"] {
        let at = lines
            .iter()
            .position(|l| l.contains(last))
            .unwrap_or_else(|| panic!("{last} missing from the daemon log:\n{log}"));
        assert!(at < exit_note, "{last} after the exit note:\n{log}");
    }
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

#[test]
fn zero_config_runs_what_it_discovers() {
    let dir = TestDir::new("zeroconf");
    // A script service: zero-config passes only the injected flags, so the
    // script adds what makes the fixture announce itself.
    dir.add_script_service(
        "zero",
        &format!(
            "exec '{}' \"$@\" --print-args --ready --sleep",
            fixture_bin().display()
        ),
    );
    let mut daemon = Daemon::start(dir.path(), &["run"]);
    let pid = ready(&dir, &daemon, "zero");
    let args: Vec<String> = read_lines(&dir.log_path("zero"))
        .into_iter()
        .filter_map(|l| l.strip_prefix("ARG ").map(str::to_owned))
        .skip(1)
        .collect();
    assert_eq!(
        args,
        [
            "--service",
            "zero",
            "--log-level",
            "info",
            "--print-args",
            "--ready",
            "--sleep"
        ]
    );
    assert!(dir.service_data_dir("zero").is_dir());
    assert!(daemon.stderr_text().contains("services=1"));

    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
    assert!(wait_until(DEADLINE, || !is_alive(pid)));
}

#[test]
fn sighup_with_the_same_file_reloads_and_changes_nothing() {
    let dir = workspace(
        "sighup",
        &["steady"],
        "[services.steady]\nargs = [\"--ready\", \"--sleep\"]\nstop_timeout = \"2s\"\n",
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    let pid = ready(&dir, &daemon, "steady");
    daemon.signal(SIGHUP);
    daemon.wait_for_log(&["reload applied", "0 changed"]);
    assert!(is_alive(pid), "SIGHUP must not touch the services");
    assert_eq!(
        read_lines(&dir.log_path("steady"))
            .iter()
            .filter(|l| l.starts_with("READY"))
            .count(),
        1,
        "nothing was restarted"
    );
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
    assert!(wait_until(DEADLINE, || !is_alive(pid)));
}

#[test]
fn a_service_that_cannot_start_stops_neither_the_daemon_nor_the_others() {
    let dir = workspace(
        "badneighbour",
        &["good", "crashy"],
        r#"
[orchestrator]
shutdown_timeout = "5s"

[services.ghost]
binary_path = "nowhere/ghost"
restart = "never"

[services.crashy]
args = ["--exit", "3"]
max_restarts = 1
backoff = { initial = "50ms", max = "100ms" }

[services.good]
args = ["--ready", "--sleep"]
"#,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    let pid = ready(&dir, &daemon, "good");
    daemon.wait_for_log(&["service=ghost", "no such file"]);
    daemon.wait_for_log(&["service=crashy", "gave up after 1 restart"]);
    assert!(is_alive(pid), "the healthy service still runs");
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
    assert!(wait_until(DEADLINE, || !is_alive(pid)));
}

/// The signals set in a `/proc/PID/status` mask such as `SigIgn`, glibc's
/// internal 32 and 33 included.
fn signals_in(status: &[String], field: &str) -> Vec<u32> {
    let line = status
        .iter()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status:?}"));
    let mask = u64::from_str_radix(line.trim(), 16).expect("a hex mask");
    (1..=64)
        .filter(|sig| mask & (1 << (sig - 1)) != 0)
        .collect()
}

#[test]
fn services_start_with_default_signal_dispositions_and_an_empty_mask() {
    let dir = workspace(
        "sigdisp",
        &[],
        r#"
[services.probe]
command = ["grep", "^Sig", "/proc/self/status"]
restart = "never"
"#,
    );
    // As when started in the background by a script, or under nohup: the
    // daemon inherits ignored signals.
    let mut daemon = Daemon::start_after_shell(
        dir.path(),
        "trap '' HUP INT QUIT USR1 USR2 TERM",
        &["-c", "orchestrator.toml", "run"],
    );
    let log = dir.log_path("probe");
    wait_for_line(&log, "SigCgt:");
    let status = read_lines(&log);
    assert_eq!(signals_in(&status, "SigBlk:"), [] as [u32; 0], "blocked");
    assert_eq!(signals_in(&status, "SigIgn:"), [] as [u32; 0], "ignored");
    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
}

/// When whoever reads the daemon's stderr goes away (a closed terminal,
/// `orchestrator run | head`), every write fails with EPIPE. The daemon must
/// keep supervising and still shut down cleanly.
#[test]
fn a_broken_stderr_changes_nothing() {
    use std::process::{Command, Stdio};
    let dir = workspace(
        "broken-stderr",
        &["crashy", "steady"],
        r#"
[orchestrator]
shutdown_timeout = "5s"
[services.crashy]
args = ["--lines", "4", "--exit", "1"]
max_restarts = 1000
backoff = { initial = "50ms", max = "50ms" }
[services.steady]
args = ["--ready", "--sleep"]
"#,
    );
    let mut child = Command::new(orchestrator_bin())
        .args(["-c", "orchestrator.toml", "run"])
        .current_dir(dir.path())
        .env_remove("ORCHESTRATOR_CONFIG")
        .env_remove("ORCHESTRATOR_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the daemon");
    // Nobody will ever read it: every later write gets EPIPE.
    drop(child.stderr.take());
    let daemon_pid = child.id();
    let guard = ProcessGuard::new();
    let steady = wait_for_line(&dir.log_path("steady"), "READY");
    guard.add_pgid(field(&steady, "pgid") as i32);

    // Crash after crash is logged (to the broken stderr) and restarted.
    let restarted = wait_until(Duration::from_secs(20), || {
        let (code, stdout, _) = run_cli(
            dir.path(),
            &["-c", "orchestrator.toml", "status", "crashy", "--json"],
        );
        // 1: crashy is down part of the time; the listing is whole.
        code <= 1
            && serde_json::from_str::<serde_json::Value>(&stdout)
                .ok()
                .and_then(|v| v[0]["restarts"].as_u64())
                .is_some_and(|restarts| restarts >= 3)
    });
    assert!(restarted, "crashy was not restarted again and again");

    assert!(send_signal(daemon_pid, 15), "SIGTERM to the daemon");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the daemon") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0), "{status:?}");
}
