//! The CLI and the console against hostile output and a daemon that stops
//! answering or dies (issue 10, items 3, 9 and 10).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator_e2e::*;

// Not re-exported by the helpers; the same on every Linux architecture
// but alpha, mips, parisc and sparc.
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// The title-changing sequence, a screen clear, and a carriage return that
/// would put a forged daemon line over the real one's start.
const HOSTILE: &[&str] = &[
    "--print",
    "\u{1b}]0;pwned\u{7}title",
    "--print",
    "\u{1b}[2J\u{1b}[Hcleared",
    "--print",
    "real\r2026-01-01T00:00:00.000Z  INFO forged by the service",
    "--print",
    "csi \u{9b}31m and del \u{7f}",
];

/// A TOML basic string: control characters as `\uXXXX`, which `{:?}` does
/// not write.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A workspace with one fixture service `name` run with `args`, stopped
/// within `stop_timeout`; `extra` goes in `[orchestrator]`.
fn workspace(label: &str, name: &str, args: &[&str], extra: &str, stop_timeout: &str) -> TestDir {
    workspace_of(label, &[(name, args)], extra, stop_timeout)
}

/// [`workspace`] with several services.
fn workspace_of(
    label: &str,
    services: &[(&str, &[&str])],
    extra: &str,
    stop_timeout: &str,
) -> TestDir {
    let dir = TestDir::new(label);
    let mut toml = format!("[orchestrator]\nshutdown_timeout = \"5s\"\n{extra}\n");
    for (name, args) in services {
        dir.add_fixture_service(name);
        let args: Vec<String> = args.iter().map(|a| toml_string(a)).collect();
        toml.push_str(&format!(
            "\n[services.{name}]\nargs = [{}]\nstop_timeout = \"{stop_timeout}\"\n",
            args.join(", ")
        ));
    }
    dir.write_file(CONFIG, &toml, 0o644);
    dir
}

fn start_daemon(dir: &TestDir) -> Daemon {
    run_daemon_in(dir)
}

/// `orchestrator -c orchestrator.toml ARGS` to completion, output as bytes
/// (`run_cli` strips escape sequences, which is what is tested here), and
/// how long it took. Killed, and the test failed, after `deadline`.
fn run_raw(cwd: &Path, args: &[&str], deadline: Duration) -> (i32, Vec<u8>, String, Duration) {
    let child = Command::new(orchestrator_bin())
        .arg("-c")
        .arg(CONFIG)
        .args(args)
        .current_dir(cwd)
        .env_remove("ORCHESTRATOR_CONFIG")
        .env_remove("ORCHESTRATOR_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the orchestrator binary");
    let pid = child.id();
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(deadline) {
        Ok(output) => output.expect("wait for the orchestrator binary"),
        Err(_) => {
            send_signal(pid, SIGKILL);
            panic!(
                "`orchestrator {}` still waited after {deadline:?}",
                args.join(" ")
            );
        }
    };
    (
        output.status.code().unwrap_or(-1),
        output.stdout,
        String::from_utf8_lossy(&output.stderr).into_owned(),
        started.elapsed(),
    )
}

/// Control characters in `bytes` other than newline and tab.
fn raw_controls(bytes: &[u8]) -> Vec<char> {
    String::from_utf8_lossy(bytes)
        .chars()
        .filter(|&c| c.is_control() && c != '\n' && c != '\t')
        .collect()
}

fn wait_for_bytes(path: &Path, needle: &[u8]) {
    let found = wait_until(DEADLINE, || {
        read_bytes(path).windows(needle.len()).any(|w| w == needle)
    });
    assert!(found, "{} never held {needle:?}", path.display());
}

// ---------------------------------------------------------------------------
// Item 3: a service's control characters

#[test]
fn a_services_control_characters_reach_the_terminal_escaped() {
    let mut args = HOSTILE.to_vec();
    args.extend(["--print", "after the hostile lines", "--sleep"]);
    // A 1 MB line of every byte but the newline, controls included.
    let flood: &[&str] = &[
        "--spew-bytes",
        "1000000",
        "--print",
        "after the flood",
        "--sleep",
    ];
    let dir = workspace_of("cli-escape", &[("evil", &args), ("flood", flood)], "", "1s");
    let daemon = start_daemon(&dir);
    let log = dir.log_path("evil");
    wait_for_bytes(&log, b"after the hostile lines");
    wait_for_bytes(&dir.log_path("flood"), b"after the flood");

    // The log file keeps what the service wrote.
    let raw = read_bytes(&log);
    let title = b"\x1b]0;pwned\x07";
    assert!(raw.windows(title.len()).any(|w| w == title));

    // The console (the daemon's stderr) shows it escaped.
    wait_for_bytes(&daemon.stderr, b"after the flood");
    let console = read_bytes(&daemon.stderr);
    let text = String::from_utf8_lossy(&console);
    assert_eq!(
        raw_controls(&console),
        [],
        "raw control characters on the console"
    );
    for shown in [
        r"\x1b]0;pwned\x07title",
        r"\x1b[2J\x1b[Hcleared",
        r"real\r2026-01-01T00:00:00.000Z  INFO forged by the service",
        r"csi \u{9b}31m and del \x7f",
    ] {
        assert!(text.contains(shown), "no {shown:?} on the console");
    }
    assert!(
        !text.lines().any(|l| l.starts_with("2026-01-01T")),
        "a forged line of its own"
    );

    // So does `logs`.
    let mut stdout = Vec::new();
    for name in ["evil", "flood"] {
        let (code, out, stderr, _) = run_raw(dir.path(), &["logs", name, "-n", "1000"], DEADLINE);
        assert_eq!(code, 0, "{stderr}");
        stdout.extend(out);
    }
    assert_eq!(
        raw_controls(&stdout),
        [],
        "raw control characters from `logs`"
    );
    let text = String::from_utf8_lossy(&stdout);
    for shown in [
        r"\x1b]0;pwned\x07title",
        r"real\r2026-01-01",
        r"\x01\x02\x03",
        "after the flood",
    ] {
        assert!(text.contains(shown), "no {shown:?} from `logs`");
    }
    drop(daemon);
}

#[test]
fn json_console_lines_stay_valid_json_without_raw_controls() {
    let mut args = HOSTILE.to_vec();
    args.extend(["--print", "after", "--sleep"]);
    let dir = workspace(
        "cli-escape-json",
        "evil",
        &args,
        "log_format = \"json\"",
        "1s",
    );
    let daemon = start_daemon(&dir);
    wait_for_bytes(&daemon.stderr, b"\"after\"");
    let console = read_bytes(&daemon.stderr);
    assert_eq!(
        raw_controls(&console),
        [],
        "raw control characters on the console"
    );
    let messages: Vec<String> = String::from_utf8_lossy(&console)
        .lines()
        .map(|line| {
            let value: serde_json::Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line:?}"));
            value["message"].as_str().unwrap_or_default().to_owned()
        })
        .collect();
    for sent in &HOSTILE[1..] {
        if !sent.starts_with("--") {
            assert!(
                messages.iter().any(|m| m == sent),
                "{sent:?} not in {messages:?}"
            );
        }
    }
    drop(daemon);
}

// ---------------------------------------------------------------------------
// Item 9: a daemon that does not answer

/// SIGSTOPs a process; SIGCONTs it on drop, so that a failing test leaves
/// nothing frozen behind for the daemon's own guard to trip over.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        assert!(send_signal(pid, SIGSTOP), "cannot stop {pid}");
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        send_signal(self.0, SIGCONT);
    }
}

#[test]
fn every_verb_gives_up_on_a_stopped_daemon() {
    let dir = workspace("cli-sigstop", "api", &["--ready", "--sleep"], "", "1s");
    let daemon = start_daemon(&dir);
    wait_for_bytes(&dir.log_path("api"), b"READY");
    let _stopped = Stopped::new(daemon.pid());
    let verbs: &[&[&str]] = &[
        &["status"],
        &["status", "api", "--json"],
        &["start", "api"],
        &["stop", "api"],
        &["restart", "--all"],
        &["logs", "api"],
        &["logs", "api", "-f"],
        &["events"],
        &["events", "-f"],
        &["reload"],
        &["shutdown"],
    ];
    let dir = &dir;
    std::thread::scope(|scope| {
        let mut runs = Vec::new();
        for &verb in verbs {
            runs.push(scope.spawn(move || {
                let mut args = verb.to_vec();
                args.extend(["--timeout", "1s"]);
                (verb, run_raw(dir.path(), &args, DEADLINE))
            }));
        }
        // Without --timeout, the default (10 s) applies.
        runs.push(scope.spawn(move || {
            (
                &["status"][..],
                run_raw(dir.path(), &["status"], DEADLINE * 2),
            )
        }));
        for run in runs {
            let (verb, (code, _, stderr, _)) = run.join().unwrap();
            assert_eq!(
                code,
                3,
                "`{}`: {stderr}; the daemon's log:\n{}",
                verb.join(" "),
                daemon.stderr_text()
            );
            assert!(
                stderr.contains("is not responding") && stderr.contains("orchestrator.sock"),
                "`{}`: {stderr}",
                verb.join(" ")
            );
        }
    });
}

#[test]
fn a_stop_longer_than_the_timeout_is_not_a_daemon_that_does_not_respond() {
    // The service ignores SIGTERM: the stop takes its whole stop_timeout.
    let dir = workspace(
        "cli-long-stop",
        "stubborn",
        &["--ignore-term", "--ready", "--sleep"],
        "",
        "5s",
    );
    let daemon = start_daemon(&dir);
    wait_for_bytes(&dir.log_path("stubborn"), b"READY");
    let (code, stdout, stderr, took) = run_raw(
        dir.path(),
        &["stop", "stubborn", "--timeout", "2s"],
        DEADLINE,
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(String::from_utf8_lossy(&stdout).contains("stopped"));
    assert!(
        took >= Duration::from_millis(4500),
        "the stop took {took:?}"
    );
    drop(daemon);
}

#[test]
fn a_daemon_killed_mid_stop_is_reported_as_gone() {
    let dir = workspace(
        "cli-kill-mid-stop",
        "stubborn",
        &["--ignore-term", "--ready", "--sleep"],
        "",
        "60s",
    );
    let daemon = start_daemon(&dir);
    wait_for_bytes(&dir.log_path("stubborn"), b"READY");
    let path = dir.path().to_owned();
    let stop = std::thread::spawn(move || run_raw(&path, &["stop", "stubborn"], DEADLINE));
    let requested = wait_until(DEADLINE, || {
        let (_, stdout, _, _) = run_raw(dir.path(), &["events"], DEADLINE);
        String::from_utf8_lossy(&stdout).contains("stubborn  stop requested")
    });
    assert!(requested, "the stop was never requested");
    daemon.signal(SIGKILL);
    let (code, _, stderr, _) = stop.join().unwrap();
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("was cut") || stderr.contains("cannot reach the daemon"),
        "{stderr}"
    );
    drop(daemon);
}

// ---------------------------------------------------------------------------
// Item 10: how a follow stream ends

#[test]
fn followers_say_the_daemon_shut_down() {
    let dir = workspace(
        "cli-follow-shutdown",
        "ticker",
        &["--tick-ms", "50"],
        "",
        "1s",
    );
    let daemon = start_daemon(&dir);
    let mut logs = CliFollower::start(dir.path(), &["-c", CONFIG, "logs", "ticker", "-f"]);
    logs.wait_for("with a tick", |l| l.contains("tick "));
    let mut events = CliFollower::start(dir.path(), &["-c", CONFIG, "events", "-f"]);
    events.wait_for("with the start", |l| l.contains("ticker  started"));
    let (code, _, stderr, _) = run_raw(dir.path(), &["shutdown"], DEADLINE);
    assert_eq!(code, 0, "{stderr}");
    for (what, follower) in [("logs -f", &mut logs), ("events -f", &mut events)] {
        let status = follower.wait_exit();
        let stderr = follower.stderr_text();
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{what}: {stderr}");
        assert_eq!(
            stderr.lines().last(),
            Some("orchestrator: the daemon shut down"),
            "{what}"
        );
    }
    drop(daemon);
}

#[test]
fn followers_of_a_killed_daemon_exit_3() {
    let dir = workspace("cli-follow-kill", "ticker", &["--tick-ms", "50"], "", "1s");
    let daemon = start_daemon(&dir);
    let mut logs = CliFollower::start(dir.path(), &["-c", CONFIG, "logs", "ticker", "-f"]);
    logs.wait_for("with a tick", |l| l.contains("tick "));
    let mut events = CliFollower::start(dir.path(), &["-c", CONFIG, "events", "-f"]);
    events.wait_for("with the start", |l| l.contains("ticker  started"));
    daemon.signal(SIGKILL);
    for (what, follower) in [("logs -f", &mut logs), ("events -f", &mut events)] {
        let status = follower.wait_exit();
        let stderr = follower.stderr_text();
        assert_eq!(status.and_then(|s| s.code()), Some(3), "{what}: {stderr}");
        assert!(
            stderr.contains("the connection to the daemon at")
                && stderr.contains("was cut")
                && stderr.contains("exited or was killed"),
            "{what}: {stderr}"
        );
    }
    drop(daemon);
}

#[test]
fn a_slow_reader_of_logs_is_not_a_daemon_that_does_not_respond() {
    let flood: &[&str] = &["--spew-bytes", "1000000", "--print", "after", "--sleep"];
    let dir = workspace("cli-slow-reader", "flood", flood, "", "1s");
    let daemon = start_daemon(&dir);
    wait_for_bytes(&dir.log_path("flood"), b"after");
    let child = Command::new(orchestrator_bin())
        .args([
            "-c",
            CONFIG,
            "logs",
            "flood",
            "-n",
            "1000",
            "--timeout",
            "2s",
        ])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the orchestrator binary");
    // Hundreds of KiB of escaped output: the CLI blocks on the full pipe, which is
    // left unread for longer than the timeout. Not a synchronisation: the
    // longer the stall, the harder the test.
    std::thread::sleep(Duration::from_millis(3500));
    let output = child.wait_with_output().expect("wait for the CLI");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.stdout.len() > 128 * 1024,
        "{} bytes",
        output.stdout.len()
    );
    assert!(output.stdout.ends_with(b" after\n"));
    drop(daemon);
}

// ---------------------------------------------------------------------------
// `--all` on more services than the daemon takes connections

/// `stop --all` holds a connection per service until it is stopped: with
/// more services than the daemon's cap, the refused ones are asked again
/// rather than reported as a dead daemon (before: exit 3 after one line,
/// and services left running).
#[test]
fn stop_all_on_more_services_than_the_connection_cap_stops_them_all() {
    let names: Vec<String> = (0..12).map(|k| format!("s{k}")).collect();
    let services: Vec<(&str, &[&str])> = names
        .iter()
        .map(|name| (name.as_str(), &["--ready", "--ignore-term", "--sleep"][..]))
        .collect();
    let dir = workspace_of("all-over-cap", &services, "api_max_connections = 4", "1s");
    let daemon = start_daemon(&dir);
    let running = wait_until(DEADLINE, || {
        let (_, stdout, _, _) = run_raw(dir.path(), &["status", "--json"], DEADLINE);
        serde_json::from_slice::<Vec<serde_json::Value>>(&stdout)
            .is_ok_and(|all| all.len() == 12 && all.iter().all(|s| s["state"] == "running"))
    });
    assert!(running, "daemon log:\n{}", daemon.stderr_text());
    let (code, stdout, stderr, _) =
        run_raw(dir.path(), &["stop", "--all"], Duration::from_secs(60));
    let stdout = String::from_utf8_lossy(&stdout);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(
        // A loaded machine may need SIGKILL for some (said after "stopped").
        stdout
            .lines()
            .filter(|l| l.ends_with(": stopped") || l.contains(": stopped: stopped with SIGKILL"))
            .count(),
        12,
        "{stdout}"
    );
    drop(daemon);
}
