//! The daemon as a `Type=notify` systemd service: what systemd hears on
//! `$NOTIFY_SOCKET`, with this test standing in for systemd.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use orchestrator_e2e::*;

/// The next datagram, or `None` after `within`.
fn next_message(socket: &UnixDatagram, within: Duration) -> Option<String> {
    socket.set_read_timeout(Some(within)).unwrap();
    let mut buffer = [0u8; 4096];
    let read = socket.recv(&mut buffer).ok()?;
    Some(String::from_utf8_lossy(&buffer[..read]).into_owned())
}

#[test]
fn systemd_hears_ready_once_services_are_up_then_pings_and_stopping() {
    let dir = TestDir::new("systemd-notify");
    dir.add_fixture_service("api");
    dir.write_file(
        CONFIG,
        "[orchestrator]\nshutdown_timeout = \"5s\"\n[services.api]\nstart_grace = \"500ms\"\nargs = [\"--sleep\"]\n",
        0o644,
    );
    let path = dir.join("notify.sock");
    let systemd = UnixDatagram::bind(&path).expect("bind the stand-in notify socket");
    let launched = Instant::now();
    let mut daemon = Daemon::start_with(dir.path(), &["-c", CONFIG, "run"], |command| {
        command
            .env("NOTIFY_SOCKET", &path)
            .env("WATCHDOG_USEC", "400000");
    });
    // Watchdog pings may come first: they start with the daemon.
    let ready = std::iter::from_fn(|| next_message(&systemd, DEADLINE))
        .find(|message| message != "WATCHDOG=1")
        .unwrap_or_else(|| panic!("no READY=1; daemon log:\n{}", daemon.stderr_text()));
    assert!(ready.lines().any(|line| line == "READY=1"), "{ready:?}");
    assert!(ready.contains("STATUS=1 of 1 services up"), "{ready:?}");
    // Ready means up: after api's start_grace, and api runs.
    assert!(launched.elapsed() >= Duration::from_millis(500));
    assert_eq!(status_of(&dir, "api")["state"], "running");
    // WATCHDOG_USEC=400 ms: pings every 200 ms.
    let mut pings = 0;
    let end = Instant::now() + DEADLINE;
    while pings < 3 && Instant::now() < end {
        if next_message(&systemd, DEADLINE).as_deref() == Some("WATCHDOG=1") {
            pings += 1;
        }
    }
    assert_eq!(pings, 3, "watchdog pings");
    cli_ok(&dir, &["shutdown"]);
    let mut stopping = false;
    while let Some(message) = next_message(&systemd, DEADLINE) {
        if message.lines().any(|line| line == "STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "no STOPPING=1");
    daemon.wait_exit();
}

#[test]
fn a_notify_socket_that_is_not_there_does_not_stop_the_daemon() {
    let dir = TestDir::new("systemd-bad-socket");
    dir.add_fixture_service("api");
    dir.write_file(
        CONFIG,
        "[orchestrator]\n[services.api]\nstart_grace = \"0s\"\nargs = [\"--sleep\"]\n",
        0o644,
    );
    let mut daemon = Daemon::start_with(dir.path(), &["-c", CONFIG, "run"], |command| {
        command.env("NOTIFY_SOCKET", "relative/not-a-socket-path-that-exists");
    });
    let socket = dir.data_dir().join("orchestrator.sock");
    assert!(wait_until(DEADLINE, || socket.exists()));
    wait_for_status(&dir, &daemon, "api", |s| s["state"] == "running");
    // The daemon runs; sending to a socket that is not there fails quietly.
    cli_ok(&dir, &["shutdown"]);
    assert_eq!(daemon.wait_exit().code(), Some(0));
}
