//! The in-place upgrade end to end (issue 15, SPEC sections 2, 4 and 5):
//! `orchestrator upgrade`, SIGUSR2 and `run --handover` with the real
//! binary, with services, and with something asked or going wrong at each
//! step of the switch.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use orchestrator_e2e::*;
use serde_json::Value;

/// A workspace with `extra` after its `[orchestrator]` table (services).
fn workspace(label: &str, extra: &str) -> TestDir {
    let dir = TestDir::new(label);
    dir.write_file(
        CONFIG,
        &format!("[orchestrator]\nshutdown_timeout = \"5s\"\n{extra}"),
        0o644,
    );
    dir
}

fn socket(dir: &TestDir) -> PathBuf {
    dir.data_dir().join("orchestrator.sock")
}

/// One request on a fresh connection (`Connection: close`), the whole
/// answer read; `Err` says what went wrong. The read is bounded by
/// [`DEADLINE`]: during a switch the request waits in the backlog.
fn http(socket: &Path, method: &str, path: &str) -> Result<(u16, String), String> {
    http_with_body(socket, method, path, "")
}

/// [`http`] with a JSON body.
fn http_with_body(
    socket: &Path,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(DEADLINE))
        .map_err(|e| e.to_string())?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| format!("write: {e}"))?;
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .map_err(|e| format!("read: {e}"))?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("no status line in {answer:?}"))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn daemon_info(dir: &TestDir) -> Value {
    let (status, body) = http(&socket(dir), "GET", "/v1/daemon").expect("GET /v1/daemon");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/v1/daemon: {e}: {body}"))
}

fn start(dir: &TestDir) -> Daemon {
    let daemon = run_daemon_in(dir);
    assert!(
        wait_until(DEADLINE, || http(&socket(dir), "GET", "/healthz").is_ok()),
        "the daemon does not answer; its log:\n{}",
        daemon.stderr_text()
    );
    daemon
}

/// [`start`], the daemon's switches pausing `pause_ms` once the services
/// are frozen (or until something is asked of it), so that a test can act
/// in that window.
fn start_pausing_switches(dir: &TestDir, pause_ms: u64) -> Daemon {
    let daemon = Daemon::start_with(dir.path(), &["-c", CONFIG, "run"], |command| {
        command.env("ORCHESTRATOR_TEST_SWITCH_PAUSE_MS", pause_ms.to_string());
    });
    assert!(
        wait_until(DEADLINE, || http(&socket(dir), "GET", "/healthz").is_ok()),
        "the daemon does not answer; its log:\n{}",
        daemon.stderr_text()
    );
    daemon
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).expect("read /proc/PID/exe")
}

/// The daemon's guardian: its child running `orchestrator ... guardian`.
fn guardian_of(daemon: u32) -> Option<u32> {
    all_pids().into_iter().find(|&pid| {
        stat(pid).is_some_and(|stat| stat.ppid as u32 == daemon)
            && cmdline(pid).is_some_and(|args| args.iter().any(|arg| arg == "guardian"))
    })
}

/// The events' kinds, oldest first (`events --json`).
fn event_kinds(dir: &TestDir) -> Vec<Value> {
    let stdout = cli_ok(dir, &["events", "--json", "-n", "100"]);
    stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect()
}

/// Polls `/healthz` on fresh connections until stopped; returns the
/// failures it saw and how many answers it had.
struct Poller {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Vec<String>, usize)>,
}

impl Poller {
    fn start(socket: PathBuf) -> Poller {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut failures = Vec::new();
            let mut answers = 0;
            while !stopping.load(Ordering::Acquire) {
                match http(&socket, "GET", "/healthz") {
                    Ok((200, _)) => answers += 1,
                    Ok((status, body)) => failures.push(format!("{status}: {body}")),
                    Err(error) => failures.push(error),
                }
            }
            (failures, answers)
        });
        Poller { stop, thread }
    }

    fn stop(self) -> (Vec<String>, usize) {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("the poller")
    }
}

#[test]
fn an_upgrade_to_a_copy_keeps_the_pid_the_guardian_and_the_socket() {
    let dir = workspace("upgrade-copy", "");
    let copy = dir.join("orchestrator-new");
    copy_executable(&orchestrator_bin(), &copy);
    let daemon = start(&dir);
    let pid = daemon.pid();
    let guardian = guardian_of(pid).expect("the daemon has a guardian");
    let before = daemon_info(&dir);
    assert_eq!(before["upgrades"], 0, "{before}");

    let poller = Poller::start(socket(&dir));
    let stdout = cli_ok(&dir, &["upgrade", "--binary", copy.to_str().unwrap()]);
    assert!(stdout.contains("daemon upgraded from"), "{stdout}");
    // Some answers after the switch too.
    let answered_after = wait_until(DEADLINE, || http(&socket(&dir), "GET", "/healthz").is_ok());
    let (failures, answers) = poller.stop();
    assert!(answered_after);
    assert!(
        failures.is_empty(),
        "a client saw failures during the upgrade ({answers} answers): {failures:?}\ndaemon log:\n{}",
        daemon.stderr_text()
    );

    let after = daemon_info(&dir);
    assert_eq!(after["pid"], pid, "the same process: {after}");
    assert_eq!(after["upgrades"], 1, "{after}");
    assert_eq!(exe_of(pid), copy, "the process runs the new binary");
    daemon.wait_for_log(&["upgraded from"]);
    // The guardian did not take the exec for a death: the same one watches.
    assert!(is_alive(guardian), "the guardian ended at the exec");
    assert_eq!(guardian_of(pid), Some(guardian));
    // The history goes on with `upgraded`, services or none.
    let events = event_kinds(&dir);
    let upgraded: Vec<&Value> = events
        .iter()
        .filter(|event| event["event"] == "upgraded")
        .collect();
    assert_eq!(upgraded.len(), 1, "{events:?}");
    assert_eq!(upgraded[0]["from"], before["version"], "{events:?}");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] > w[0]), "{seqs:?}");

    // A clean shutdown after it dismisses the guardian as usual.
    cli_ok(&dir, &["shutdown"]);
    assert!(
        wait_until(DEADLINE, || !is_alive(guardian)),
        "the guardian outlived the clean shutdown"
    );
    assert!(!daemon.stderr_text().contains("guardian ended"));
}

#[test]
fn the_guardian_still_watches_after_an_upgrade() {
    let dir = workspace("upgrade-guardian", "");
    let mut daemon = start(&dir);
    let pid = daemon.pid();
    let guardian = guardian_of(pid).expect("the daemon has a guardian");
    cli_ok(&dir, &["upgrade"]);
    assert!(is_alive(guardian), "the guardian ended at the exec");
    // Killed now, the daemon leaves its guardian to act: it ends once done.
    daemon.signal(libc::SIGKILL);
    daemon.wait_exit();
    assert!(
        wait_until(DEADLINE, || !is_alive(guardian)),
        "the guardian did not notice the daemon's death after the upgrade"
    );
    // And the next daemon starts on the same data_dir.
    let _next = start(&dir);
}

#[test]
fn a_binary_that_fails_the_dry_run_changes_nothing() {
    let dir = workspace("upgrade-refused", "");
    let impostor = dir.write_file("impostor", "#!/bin/sh\necho 'orchestrator nine'\n", 0o755);
    let daemon = start(&dir);
    let pid = daemon.pid();
    let exe = exe_of(pid);

    let (code, _, stderr) = cli(&dir, &["upgrade", "--binary", "/bin/false"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("is not an orchestrator"), "{stderr}");
    assert!(stderr.contains("nothing was changed"), "{stderr}");

    let (code, _, stderr) = cli(&dir, &["upgrade", "--binary", impostor.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("orchestrator nine"), "{stderr}");

    let (code, _, stderr) = cli(&dir, &["upgrade", "--binary", "/nonexistent/orchestrator"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("does not exist"), "{stderr}");

    // An older orchestrator: a real one for everything but the hand-over
    // (it does not know the verb that says which formats it reads).
    let older = dir.write_file(
        "older",
        &format!(
            "#!/bin/sh
[ \"$1\" = handover-formats ] && exit 2
exec {} \"$@\"
",
            orchestrator_bin().display()
        ),
        0o755,
    );
    let (code, _, stderr) = cli(&dir, &["upgrade", "--binary", older.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("cannot read this daemon's hand-over"),
        "{stderr}"
    );

    let info = daemon_info(&dir);
    assert_eq!(info["pid"], pid);
    assert_eq!(info["upgrades"], 0, "{info}");
    assert_eq!(exe_of(pid), exe, "no exec happened");
}

/// A configuration edited and not applied (no watcher, no reload): the new
/// daemon would read it and take the running process for the new
/// definition. The upgrade is refused until a reload has applied it.
#[test]
fn an_upgrade_with_edits_not_applied_is_refused_until_a_reload() {
    let config = |args: &str| {
        format!(
            "[orchestrator]\nshutdown_timeout = \"5s\"\nwatch = false\n[services.steady]\nargs = [{args}]\n"
        )
    };
    let dir = workspace("upgrade-unapplied", "");
    dir.write_file(CONFIG, &config("\"--ready\", \"--sleep\""), 0o644);
    dir.add_fixture_service("steady");
    let daemon = start(&dir);
    let before = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    dir.write_file(
        CONFIG,
        &config("\"--ready\", \"--print-args\", \"--sleep\""),
        0o644,
    );
    let (code, _, stderr) = cli(&dir, &["upgrade"]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("edited and not applied") && stderr.contains("steady"),
        "{stderr}"
    );
    assert!(stderr.contains("orchestrator reload"), "{stderr}");
    assert_eq!(daemon_info(&dir)["upgrades"], 0);
    // Applied: the upgrade goes through.
    let (code, _, stderr) = cli(&dir, &["reload"]);
    assert_eq!(code, 0, "{stderr}");
    let after = wait_for_status(&dir, &daemon, "steady", |s| {
        s["state"] == "running" && s["pid"] != before["pid"]
    });
    let (code, _, stderr) = cli(&dir, &["upgrade"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        wait_until(DEADLINE, || http(&socket(&dir), "GET", "/v1/daemon")
            .is_ok_and(|(_, body)| body.contains("\"upgrades\":1"))),
        "{}",
        daemon.stderr_text()
    );
    let resumed = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    assert_eq!(resumed["pid"], after["pid"]);
}

#[test]
fn a_new_build_with_another_version_takes_over() {
    let dir = workspace("upgrade-version", "");
    // A second build, as far as versions go (ORCHESTRATOR_REPORTED_VERSION
    // is for tests only).
    let wrapper = dir.write_file(
        "orchestrator-9",
        &format!(
            "#!/bin/sh\nORCHESTRATOR_REPORTED_VERSION=9.9.9 exec {} \"$@\"\n",
            orchestrator_bin().display()
        ),
        0o755,
    );
    let daemon = start(&dir);
    let stdout = cli_ok(&dir, &["upgrade", "--binary", wrapper.to_str().unwrap()]);
    assert!(
        stdout.contains("from 0.") && stdout.contains("to 9.9.9"),
        "{stdout}"
    );
    let info = daemon_info(&dir);
    assert_eq!(info["version"], "9.9.9", "{info}");
    assert_eq!(info["pid"], daemon.pid());
    daemon.wait_for_log(&["orchestrator 9.9.9 upgraded from 0."]);
}

#[test]
fn sigusr2_upgrades_to_the_binary_the_daemon_started_from() {
    let dir = workspace("upgrade-usr2", "");
    let daemon = start(&dir);
    daemon.signal(libc::SIGUSR2);
    assert!(
        wait_until(DEADLINE, || {
            http(&socket(&dir), "GET", "/v1/daemon")
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|info| info["upgrades"] == 1)
        }),
        "no upgrade after SIGUSR2; the daemon's log:\n{}",
        daemon.stderr_text()
    );
    assert_eq!(daemon_info(&dir)["pid"], daemon.pid());
    assert_eq!(exe_of(daemon.pid()), orchestrator_bin());
}

#[test]
fn a_handover_of_an_unknown_format_is_refused_before_anything() {
    let dir = workspace("upgrade-format", "");
    let document = dir.write_file(
        "handover.json",
        r#"{"format": 99, "from_version": "7.0.0", "written_at_unix_ms": 0}"#,
        0o600,
    );
    let fd = open_inheritable_fd(&document);
    let mut daemon = Daemon::start(
        dir.path(),
        &["-c", CONFIG, "run", "--handover", &fd.to_string()],
    );
    let status = daemon.wait_exit();
    assert!(!status.success(), "it ran with a handover it cannot read");
    let stderr = daemon.stderr_text();
    assert!(
        stderr.contains("format 99") && stderr.contains("7.0.0"),
        "{stderr}"
    );
    assert!(!socket(&dir).exists(), "it started serving: {stderr}");
}

// ---------------------------------------------------------------------------
// With services: need the engine's freeze and resume (branch u1).

#[test]
fn services_keep_their_pids_output_and_timers_across_an_upgrade() {
    let dir = workspace(
        "upgrade-services",
        "\n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\n\
         \n[services.flooder]\nargs = [\"--flood\", \"200000\", \"--sleep\"]\n\
         \n[services.crasher]\nargs = [\"--sleep-ms\", \"50\", \"--exit\", \"3\"]\n\
         backoff = { initial = \"2s\", max = \"2s\" }\n\
         \n[services.stubborn]\nargs = [\"--ignore-term\", \"--sleep\"]\nstop_timeout = \"3s\"\n",
    );
    for name in ["steady", "flooder", "crasher", "stubborn"] {
        dir.add_fixture_service(name);
    }
    let copy = dir.join("orchestrator-new");
    copy_executable(&orchestrator_bin(), &copy);
    let daemon = start(&dir);
    let steady = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    let stubborn = wait_for_status(&dir, &daemon, "stubborn", |s| s["state"] == "running");
    wait_for_status(&dir, &daemon, "crasher", |s| {
        s["restarts"].as_u64() >= Some(1)
    });
    // A stop in progress: SIGTERM is ignored, SIGKILL comes after 3 s.
    let (code, _, _) = cli(&dir, &["--timeout", "1s", "stop", "stubborn"]);
    let _ = code;

    let poller = Poller::start(socket(&dir));
    cli_ok(&dir, &["upgrade", "--binary", copy.to_str().unwrap()]);
    let (failures, _) = poller.stop();
    assert!(failures.is_empty(), "{failures:?}");

    let after = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    assert_eq!(after["pid"], steady["pid"], "the same process");
    // The stubborn one is stopped by its SIGKILL, on time, by the new daemon.
    wait_for_status(&dir, &daemon, "stubborn", |s| s["state"] == "stopped");
    let stubborn_pid = stubborn["pid"].as_u64().unwrap() as u32;
    assert!(!is_alive(stubborn_pid));
    // The crasher restarts again after its backoff, counting on.
    let crasher = status_json(&dir, &["crasher"])[0]["restarts"]
        .as_u64()
        .unwrap();
    wait_for_status(&dir, &daemon, "crasher", |s| {
        s["restarts"].as_u64() > Some(crasher)
    });
    // Every flooded line once, in order.
    assert!(wait_until(DEADLINE, || {
        read_lines(&dir.log_path("flooder"))
            .iter()
            .filter(|line| line.contains("flood "))
            .count()
            >= 200_000
    }));
    let numbers: Vec<u64> = read_lines(&dir.log_path("flooder"))
        .iter()
        .filter_map(|line| {
            let at = line.find("flood ")?;
            line[at + 6..at + 18].parse().ok()
        })
        .collect();
    assert_eq!(numbers, (0..200_000).collect::<Vec<u64>>());
    assert!(
        event_kinds(&dir)
            .iter()
            .any(|event| event["event"] == "upgraded"),
        "no upgraded event"
    );
    cli_ok(&dir, &["shutdown"]);
    assert!(!is_alive(steady["pid"].as_u64().unwrap() as u32));
    drop(daemon);
}

/// The new binary dies right after the exec, before it resumes anything:
/// the guardian stops the services as after a crash, and the next daemon
/// starts them once (no orphan of the old run, no second copy).
#[test]
fn a_new_daemon_that_dies_after_the_exec_is_recovered_as_a_crash() {
    let dir = workspace(
        "upgrade-crash",
        "\n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\n",
    );
    dir.add_fixture_service("steady");
    // A real orchestrator for the dry run (version, formats, check); its
    // `run` dies at once, as a new build that crashes at start would.
    let crashing = dir.write_file(
        "crashing",
        &format!(
            "#!/bin/sh\nfor arg in \"$@\"; do [ \"$arg\" = run ] && exit 70; done\nexec {} \"$@\"\n",
            orchestrator_bin().display()
        ),
        0o755,
    );
    let mut daemon = start(&dir);
    let before = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    let old_pid = before["pid"].as_u64().unwrap() as u32;

    let (code, _, stderr) = cli(&dir, &["upgrade", "--binary", crashing.to_str().unwrap()]);
    assert_ne!(code, 0, "the new daemon died: {stderr}");
    let status = daemon.wait_exit();
    assert_eq!(
        status.code(),
        Some(70),
        "the daemon's process ran the crashing build"
    );
    assert!(
        wait_until(DEADLINE, || !is_alive(old_pid)),
        "the guardian did not stop the service its daemon left"
    );

    let next = start(&dir);
    let after = wait_for_status(&dir, &next, "steady", |s| s["state"] == "running");
    let new_pid = after["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, old_pid);
    assert_eq!(
        live_processes_with_home(&dir.service_data_dir("steady")),
        vec![new_pid],
        "one copy of the service"
    );
    cli_ok(&dir, &["shutdown"]);
    drop(next);
}

/// A SIGTERM sent while the new binary is still starting (here a wrapper
/// that waits before it execs the real one) is neither lost nor fatal: it
/// stays blocked and pending across the exec, and the new daemon, once its
/// handlers are in place, shuts down cleanly, stopping its services itself.
#[test]
fn a_sigterm_during_the_switch_is_a_clean_shutdown_of_the_new_daemon() {
    let dir = workspace(
        "upgrade-sigterm",
        "\n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\n",
    );
    dir.add_fixture_service("steady");
    let started = dir.join("new-binary-started");
    // Perl, not sh: dash clears the signal mask when it starts, which would
    // take away what this test is about; perl keeps it across its exec.
    let slow = dir.write_file(
        "slow",
        &format!(
            "#!/usr/bin/perl\nif (grep {{ $_ eq 'run' }} @ARGV) {{ open(my $f, '>', '{}'); close($f); select(undef, undef, undef, 1); }}\nexec('{}', @ARGV) or die;\n",
            started.display(),
            orchestrator_bin().display()
        ),
        0o755,
    );
    let mut daemon = start(&dir);
    let steady = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    let service = steady["pid"].as_u64().unwrap() as u32;
    let upgrade = std::process::Command::new(orchestrator_bin())
        .args(["-c", CONFIG, "upgrade", "--binary", slow.to_str().unwrap()])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run upgrade");
    assert!(
        wait_until(DEADLINE, || started.exists()),
        "the new binary never started; daemon log:\n{}",
        daemon.stderr_text()
    );
    daemon.signal(SIGTERM);
    let status = daemon.wait_exit();
    assert_eq!(
        status.code(),
        Some(0),
        "a clean shutdown by the new daemon; its log:\n{}",
        daemon.stderr_text()
    );
    assert!(
        daemon.stderr_text().contains("all services stopped"),
        "{}",
        daemon.stderr_text()
    );
    assert!(!is_alive(service));
    let mut upgrade = upgrade;
    let _ = upgrade.kill();
    let _ = upgrade.wait();
}

/// A SIGTERM that comes while the services are frozen (before the exec)
/// would die with the exec: the upgrade is abandoned instead, and the
/// daemon shuts down cleanly, stopping every service.
#[test]
fn a_sigterm_while_the_services_are_frozen_shuts_down_instead_of_upgrading() {
    let dir = workspace(
        "upgrade-sigterm-frozen",
        "\n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\n",
    );
    dir.add_fixture_service("steady");
    let mut daemon = start_pausing_switches(&dir, 60000);
    let steady = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    let service = steady["pid"].as_u64().unwrap() as u32;
    let (code, body) = http(&socket(&dir), "POST", "/v1/upgrade").expect("upgrade");
    assert_eq!(code, 202, "{body}");
    daemon.wait_for_log(&["pausing the switch"]);
    daemon.signal(SIGTERM);
    let status = daemon.wait_exit();
    let log = daemon.stderr_text();
    assert_eq!(status.code(), Some(0), "a clean shutdown; log:\n{log}");
    assert!(
        log.contains("a shutdown or a reload was asked during the upgrade's switch"),
        "{log}"
    );
    assert!(log.contains("all services stopped"), "{log}");
    assert!(!log.contains("handing over to the new binary"), "{log}");
    assert!(!is_alive(service));
}

/// A reload asked while the services are frozen (SIGHUP here; a watcher's
/// alike) would die with the exec, and the edit behind it be taken for what
/// runs: the upgrade is abandoned, the services resumed in place, the
/// reload carried out.
#[test]
fn a_reload_while_the_services_are_frozen_abandons_the_upgrade() {
    let dir = workspace(
        "upgrade-sighup-frozen",
        "watch = false\n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\n",
    );
    dir.add_fixture_service("steady");
    let mut daemon = start_pausing_switches(&dir, 60000);
    let steady = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    let (code, body) = http(&socket(&dir), "POST", "/v1/upgrade").expect("upgrade");
    assert_eq!(code, 202, "{body}");
    daemon.wait_for_log(&["pausing the switch"]);
    daemon.signal(SIGHUP);
    let info = loop_until_info(&dir, |info| info["upgrade_failures"] == 1);
    assert_eq!(info["upgrades"], 0, "{info}");
    assert!(
        info["last_upgrade_error"]
            .as_str()
            .is_some_and(|error| error.contains("a shutdown or a reload was asked")),
        "{info}"
    );
    daemon.wait_for_log(&["reloading the configuration"]);
    let after = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    assert_eq!(after["pid"], steady["pid"], "resumed, not restarted");
    cli_ok(&dir, &["shutdown"]);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr_text());
}

/// The exec fails after the freeze (the new binary vanished meanwhile):
/// the old binary resumes its services in place, counts the failure, and
/// does not claim an upgrade in the history.
#[test]
fn an_exec_that_fails_resumes_the_services_in_place() {
    let dir = workspace(
        "upgrade-exec-fails",
        "\n[services.steady]\nargs = [\"--ready\", \"--sleep\"]\n",
    );
    dir.add_fixture_service("steady");
    let copy = dir.join("orchestrator-new");
    copy_executable(&orchestrator_bin(), &copy);
    let mut daemon = start_pausing_switches(&dir, 2000);
    let steady = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    let body = format!("{{\"binary\": \"{}\"}}", copy.display());
    let (code, answer) =
        http_with_body(&socket(&dir), "POST", "/v1/upgrade", &body).expect("upgrade");
    assert_eq!(code, 202, "{answer}");
    daemon.wait_for_log(&["pausing the switch"]);
    std::fs::remove_file(&copy).unwrap();
    let info = loop_until_info(&dir, |info| info["upgrade_failures"] == 1);
    assert_eq!(info["upgrades"], 0, "{info}");
    assert!(
        info["last_upgrade_error"]
            .as_str()
            .is_some_and(|error| error.contains("cannot exec the new binary")),
        "{info}"
    );
    let after = wait_for_status(&dir, &daemon, "steady", |s| s["state"] == "running");
    assert_eq!(after["pid"], steady["pid"], "the same process, resumed");
    assert!(
        !event_kinds(&dir)
            .iter()
            .any(|event| event["event"] == "upgraded"),
        "no upgrade happened"
    );
    cli_ok(&dir, &["shutdown"]);
    let status = daemon.wait_exit();
    assert_eq!(status.code(), Some(0), "{}", daemon.stderr_text());
    assert!(!is_alive(steady["pid"].as_u64().unwrap() as u32));
}

fn loop_until_info(dir: &TestDir, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let met = wait_until(DEADLINE, || {
        if let Ok((200, body)) = http(&socket(dir), "GET", "/v1/daemon")
            && let Ok(info) = serde_json::from_str::<Value>(&body)
        {
            last = info;
            return done(&last);
        }
        false
    });
    assert!(met, "/v1/daemon never matched; last: {last}");
    last
}

/// The daemon raises its own open-files limit and gives each service the
/// one it was started with. The new image starts with the raised one: the
/// original comes with the hand-over, so a service started after the
/// upgrade gets what one started before it got.
#[test]
fn services_started_after_an_upgrade_get_the_original_open_files_limit() {
    let dir = workspace(
        "upgrade-nofile",
        "\n[services.limits]\ncommand = [\"/bin/sh\", \"-c\", \"echo nofile=$(ulimit -n); exec sleep 1000\"]\n",
    );
    let daemon = Daemon::start_after_shell(dir.path(), "ulimit -Sn 1000", &["-c", CONFIG, "run"]);
    assert!(
        wait_until(DEADLINE, || http(&socket(&dir), "GET", "/healthz").is_ok()),
        "the daemon does not answer; its log:\n{}",
        daemon.stderr_text()
    );
    wait_for_status(&dir, &daemon, "limits", |s| s["state"] == "running");
    assert!(
        wait_until(DEADLINE, || read_lines(&dir.log_path("limits"))
            .contains(&"nofile=1000".to_owned())),
        "before: {:?}",
        read_lines(&dir.log_path("limits"))
    );
    cli_ok(&dir, &["upgrade"]);
    cli_ok(&dir, &["restart", "limits"]);
    assert!(
        wait_until(DEADLINE, || read_lines(&dir.log_path("limits"))
            .iter()
            .filter(|line| line.starts_with("nofile="))
            .count()
            == 2),
        "after: {:?}",
        read_lines(&dir.log_path("limits"))
    );
    let lines: Vec<String> = read_lines(&dir.log_path("limits"))
        .into_iter()
        .filter(|line| line.starts_with("nofile="))
        .collect();
    assert_eq!(lines, ["nofile=1000", "nofile=1000"], "{lines:?}");
    cli_ok(&dir, &["shutdown"]);
}

/// What a service said over sd_notify (STATUS=, its readiness) is not lost
/// at the switch: `status` shows it as before.
#[test]
fn a_services_notify_status_survives_an_upgrade() {
    let dir = workspace(
        "upgrade-notify",
        "\n[services.db]\nnotify = true\nargs = [\"--notify\", \"READY=1\", \"--notify\", \"STATUS=serving\", \"--sleep\"]\n",
    );
    dir.add_fixture_service("db");
    let daemon = start(&dir);
    let before = wait_for_status(&dir, &daemon, "db", |s| {
        s["state"] == "running" && s["reason"] == "serving"
    });
    cli_ok(&dir, &["upgrade"]);
    let after = status_json(&dir, &["db"]).remove(0);
    assert_eq!(after["pid"], before["pid"], "{after:#}");
    assert_eq!(
        (after["state"].as_str(), after["reason"].as_str()),
        (Some("running"), Some("serving")),
        "{after:#}"
    );
    cli_ok(&dir, &["shutdown"]);
}

/// A start still under way (here a service waiting for a dependency that
/// never becomes healthy) cannot be handed over: the upgrade is refused
/// and changes nothing, rather than leaving that service stopped.
#[test]
fn an_upgrade_while_a_start_waits_for_its_dependencies_is_refused() {
    let dir = workspace(
        "upgrade-waiting",
        "\n[services.db]\nargs = [\"--sleep\"]\nstart_timeout = \"60s\"\n\
         [services.db.health]\nexec = [\"false\"]\ninterval = \"200ms\"\n\
         \n[services.web]\nargs = [\"--sleep\"]\ndepends_on = { db = \"healthy\" }\n",
    );
    dir.add_fixture_service("db");
    dir.add_fixture_service("web");
    let copy = dir.join("orchestrator-new");
    copy_executable(&orchestrator_bin(), &copy);
    let daemon = start(&dir);
    wait_for_status(&dir, &daemon, "web", |s| {
        s["reason"]
            .as_str()
            .is_some_and(|reason| reason.starts_with("waiting for db"))
    });
    let (code, _, stderr) = cli(&dir, &["upgrade", "--binary", copy.to_str().unwrap()]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("still"), "{stderr}");
    let info = daemon_info(&dir);
    assert_eq!(info["upgrades"], 0, "{info}");
    assert_eq!(info["pid"], daemon.pid());
}
