//! The fixture's readiness flags against what will listen to them: the
//! sd_notify listener of the library (with the fixture as the service's
//! leader), a bare socket for the watchdog pings, and plain clients for its
//! HTTP and TCP servers. The daemon-level tests rely on these flags.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use orchestrator_core::notify::{NotifyReport, NotifySocket, environment, spawn_listener};
use orchestrator_e2e::*;
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// The fixture (no injected flags: they are optional), leading its own
/// process group, which `guard` kills at the end.
fn spawn_fixture(
    guard: &ProcessGuard,
    args: &[&str],
    env: &[orchestrator_core::process::EnvVar],
) -> Child {
    let child = Command::new(fixture_bin())
        .args(args)
        .envs(env.iter().map(|(k, v)| (&**k, &**v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    guard.add_pgid(child.id() as i32);
    child
}

fn finish(mut child: Child) {
    signal_group(child.id() as i32, SIGKILL);
    child.wait().unwrap();
}

/// Binds a notify socket, starts the fixture with its environment and
/// listens for the fixture as the service's leader.
fn notify_service(
    guard: &ProcessGuard,
    args: &[&str],
    watchdog: Option<Duration>,
) -> (Child, UnboundedReceiver<NotifyReport>) {
    let socket = NotifySocket::bind("fixture").unwrap();
    let child = spawn_fixture(guard, args, &environment(&socket, watchdog));
    let (sender, reports) = unbounded_channel();
    // Ends with the test's runtime.
    let _listener = spawn_listener(socket, "fixture".into(), child.id(), None, watchdog, sender);
    (child, reports)
}

async fn next(reports: &mut UnboundedReceiver<NotifyReport>) -> NotifyReport {
    within("a notify report", reports.recv())
        .await
        .expect("the listener runs")
}

#[tokio::test]
async fn notify_sends_status_and_ready_in_order() {
    let guard = ProcessGuard::new();
    let (child, mut reports) = notify_service(
        &guard,
        &[
            "--notify",
            "STATUS=warming up",
            "--notify",
            "READY=1",
            "--sleep",
        ],
        None,
    );
    assert_eq!(
        next(&mut reports).await,
        NotifyReport::Status("warming up".into())
    );
    assert_eq!(next(&mut reports).await, NotifyReport::Ready);
    finish(child);
}

#[tokio::test]
async fn notify_from_child_is_accepted_as_a_member_of_the_group() {
    let guard = ProcessGuard::new();
    let (child, mut reports) = notify_service(
        &guard,
        &[
            "--notify-from-child",
            "STATUS=from the child",
            "--notify-from-child",
            "READY=1",
            "--sleep",
        ],
        None,
    );
    assert_eq!(
        next(&mut reports).await,
        NotifyReport::Status("from the child".into())
    );
    assert_eq!(next(&mut reports).await, NotifyReport::Ready);
    finish(child);
}

#[tokio::test]
async fn the_watchdog_expires_once_the_pings_stop() {
    let guard = ProcessGuard::new();
    let dir = TestDir::new("watchdog");
    let stop = dir.join("stop-pinging");
    let watchdog = Duration::from_millis(500);
    let (child, mut reports) = notify_service(
        &guard,
        &[
            "--notify",
            "READY=1",
            "--watchdog-stop-file",
            stop.to_str().unwrap(),
            "--watchdog-ping-ms",
            "20",
            "--sleep",
        ],
        Some(watchdog),
    );
    assert_eq!(next(&mut reports).await, NotifyReport::Ready);
    std::fs::write(&stop, "").unwrap();
    match next(&mut reports).await {
        NotifyReport::WatchdogExpired { after } => assert!(after >= watchdog, "{after:?}"),
        other => panic!("expected the watchdog, got {other:?}"),
    }
    finish(child);
}

fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| tasks.count())
        .unwrap_or(0)
}

#[test]
fn watchdog_pings_are_sent_until_the_stop_file_exists() {
    let guard = ProcessGuard::new();
    let dir = TestDir::new("pings");
    let stop = dir.join("stop-pinging");
    // A bare socket: every datagram is seen, and none is interpreted.
    let name = format!("orchestrator-e2e-pings-{}", std::process::id());
    let socket = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(&name).unwrap()).unwrap();
    socket.set_read_timeout(Some(DEADLINE)).unwrap();
    let env = [("NOTIFY_SOCKET".into(), format!("@{name}").into())];
    let child = spawn_fixture(
        &guard,
        &[
            "--watchdog-ping-ms",
            "20",
            "--watchdog-stop-file",
            stop.to_str().unwrap(),
            "--sleep",
        ],
        &env,
    );
    let mut buf = [0u8; 64];
    for _ in 0..3 {
        let n = socket.recv(&mut buf).expect("a ping within the deadline");
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
    std::fs::write(&stop, "").unwrap();
    // The pinger's thread ends: nothing can be sent after that.
    assert!(
        wait_until(DEADLINE, || thread_count(child.id()) == 1),
        "the pinger is still running"
    );
    socket.set_nonblocking(true).unwrap();
    while let Ok(n) = socket.recv(&mut buf) {
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
    finish(child);
}

/// The first stdout line of `child` that starts with `prefix`.
fn port_line(child: &mut Child, prefix: &str) -> u16 {
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout);
    let mut line = String::new();
    lines.read_line(&mut line).unwrap();
    let port = line
        .trim_end()
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("expected {prefix}P, got {line:?}"));
    port.parse().unwrap()
}

/// The status code and the body of one request.
fn http(port: u16, method: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(stream, "{method} /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, body.to_owned())
}

#[test]
fn http_health_is_ok_and_500_while_the_unhealthy_file_exists() {
    let guard = ProcessGuard::new();
    let dir = TestDir::new("http-health");
    let unhealthy = dir.join("unhealthy");
    let mut child = spawn_fixture(
        &guard,
        &[
            "--http-health",
            "0",
            "--unhealthy-file",
            unhealthy.to_str().unwrap(),
            "--sleep",
        ],
        &[],
    );
    let port = port_line(&mut child, "HTTP port=");
    assert_eq!(http(port, "GET"), (200, "ok".to_owned()));
    std::fs::write(&unhealthy, "").unwrap();
    assert_eq!(http(port, "GET"), (500, "unhealthy".to_owned()));
    std::fs::remove_file(&unhealthy).unwrap();
    assert_eq!(http(port, "GET"), (200, "ok".to_owned()));
    assert_eq!(http(port, "POST").0, 405);
    // A client that says nothing does not hold up the next one.
    let _silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    assert_eq!(http(port, "GET").0, 200);
    finish(child);
}

#[test]
fn tcp_listen_accepts_connections() {
    let guard = ProcessGuard::new();
    let mut child = spawn_fixture(&guard, &["--tcp-listen", "0", "--sleep"], &[]);
    let port = port_line(&mut child, "TCP port=");
    for _ in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        // Accepted and dropped: EOF (or a reset), never a hang.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }
    finish(child);
}

#[test]
fn eprint_prints_its_text_on_stderr() {
    let output = Command::new(fixture_bin())
        .args(["--eprint", "fatal: no config", "--exit", "3"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        "fatal: no config\n"
    );
    assert!(output.stdout.is_empty());
}
