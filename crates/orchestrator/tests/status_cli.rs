//! `status` and the action verbs as an operator meets them (issue 14): the
//! SPEC's columns, signal names, the exit status scripts rely on, `-w`,
//! names checked before anything is done, `start --all` and disabled
//! services, and a stop that had to SIGKILL saying so.

use std::io::Read;
use std::process::{Command, Stdio};

use orchestrator_e2e::*;
use serde_json::Value;

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

const SERVICES: &str = r#"
[services.api]
args = ["--sleep"]
backoff = { initial = "30s", max = "30s" }

[services.job]
args = ["--exit", "0"]
restart = "never"

[services.spare]
enabled = false
args = ["--sleep"]
"#;

fn pid_of(status: &Value) -> u32 {
    status["pid"].as_u64().expect("a pid") as u32
}

#[test]
fn status_shows_the_spec_columns_and_exits_1_while_a_service_is_down() {
    let dir = workspace("status-columns", &["api", "job", "spare"], SERVICES);
    let daemon = run_daemon_in(&dir);
    let api = wait_for_status(&dir, &daemon, "api", |s| s["state"] == "running");
    wait_for_status(&dir, &daemon, "job", |s| {
        s["state"] == "stopped" && s["last_exit_code"] == 0
    });

    let (code, stdout, stderr) = cli(&dir, &["status"]);
    assert_eq!(
        code, 0,
        "all enabled services are up or done\n{stdout}{stderr}"
    );
    let header: Vec<&str> = stdout.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME",
            "STATE",
            "PID",
            "UPTIME",
            "RESTARTS",
            "LAST-EXIT",
            "CPU",
            "MEM",
            "REASON"
        ]
    );

    // Killed by a signal: LAST-EXIT names it, REASON says when it is retried.
    assert!(send_signal(pid_of(&api), SIGKILL));
    let restarting = wait_for_status(&dir, &daemon, "api", |s| s["state"] == "restarting");
    assert_eq!(restarting["last_exit_signal"], "SIGKILL", "{restarting}");
    assert_eq!(restarting["last_exit_code"], 137, "{restarting}");
    let (code, stdout, _) = cli(&dir, &["status"]);
    assert_eq!(code, 1, "an enabled service is down:\n{stdout}");
    let row = stdout
        .lines()
        .find(|line| line.starts_with("api "))
        .unwrap_or_else(|| panic!("no api row:\n{stdout}"));
    assert!(row.contains(" SIGKILL "), "{row}");
    assert!(
        row.contains("retry in ") && row.contains("killed by SIGKILL"),
        "{row}"
    );

    // Asked about the others only, status is happy again.
    let (code, stdout, _) = cli(&dir, &["status", "job", "spare"]);
    assert_eq!(code, 0, "{stdout}");
    let (code, _, _) = cli(&dir, &["status", "--json", "api"]);
    assert_eq!(code, 1, "--json exits the same way");
}

#[test]
fn actions_check_every_name_first_and_all_leaves_disabled_services_alone() {
    let dir = workspace("status-actions", &["api", "job", "spare"], SERVICES);
    let daemon = run_daemon_in(&dir);
    let api = wait_for_status(&dir, &daemon, "api", |s| s["state"] == "running");

    let (code, stdout, stderr) = cli(&dir, &["stop", "api", "nope"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(
        stderr.contains("\"nope\"") && stderr.contains("nothing was done"),
        "{stderr}"
    );
    let after = &status_json(&dir, &["api"])[0];
    assert_eq!(after["state"], "running", "api was not stopped: {after}");
    assert_eq!(after["pid"], api["pid"]);

    cli_ok(&dir, &["stop", "--all"]);
    let stdout = cli_ok(&dir, &["start", "--all"]);
    assert!(!stdout.contains("spare"), "spare is disabled:\n{stdout}");
    assert_eq!(status_json(&dir, &["spare"])[0]["state"], "stopped");
    assert_eq!(status_json(&dir, &["api"])[0]["state"], "running");
    // Named, a disabled service does start.
    cli_ok(&dir, &["start", "spare"]);
    assert_eq!(status_json(&dir, &["spare"])[0]["state"], "running");
}

#[test]
fn a_stop_that_needed_sigkill_says_so() {
    let dir = workspace(
        "status-sigkill",
        &["stubborn"],
        "[services.stubborn]\nargs = [\"--ignore-term\", \"--sleep\"]\nstop_timeout = \"300ms\"\n",
    );
    let daemon = run_daemon_in(&dir);
    wait_for_status(&dir, &daemon, "stubborn", |s| s["state"] == "running");
    let stdout = cli_ok(&dir, &["stop", "stubborn"]);
    assert!(
        stdout.contains("stopped") && stdout.contains("SIGKILL") && stdout.contains("SIGTERM"),
        "{stdout}"
    );
    let (_, table, _) = cli(&dir, &["status"]);
    assert!(table.contains("stopped with SIGKILL"), "{table}");
}

#[test]
fn status_w_redraws_until_interrupted() {
    let dir = workspace(
        "status-watch",
        &["api"],
        "[services.api]\nargs = [\"--sleep\"]\n",
    );
    let daemon = run_daemon_in(&dir);
    wait_for_status(&dir, &daemon, "api", |s| s["state"] == "running");
    let mut watcher = Command::new(orchestrator_bin())
        .args(["-c", CONFIG, "status", "-w", "--interval", "100ms"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run status -w");
    let mut stdout = watcher.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 4096];
        while let Ok(read) = stdout.read(&mut buffer) {
            if read == 0 || tx.send(buffer[..read].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    let tables = |seen: &[u8]| {
        String::from_utf8_lossy(seen)
            .lines()
            .filter(|line| line.starts_with("NAME "))
            .count()
    };
    let redrawn = wait_until(DEADLINE, || {
        while let Ok(chunk) = rx.try_recv() {
            seen.extend(chunk);
        }
        tables(&seen) >= 3
    });
    assert!(redrawn, "{}", String::from_utf8_lossy(&seen));
    assert!(watcher.try_wait().unwrap().is_none(), "still watching");
    assert!(send_signal(watcher.id(), SIGINT));
    let mut status = None;
    let ended = wait_until(DEADLINE, || {
        status = watcher.try_wait().unwrap();
        status.is_some()
    });
    if !ended {
        let _ = watcher.kill();
    }
    assert!(ended, "status -w did not end on SIGINT");
    assert_eq!(status.unwrap().code(), Some(0), "Ctrl-C ends it cleanly");
}
