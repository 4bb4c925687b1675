//! Containment and limits, end to end on the machine's real cgroups (issue
//! 12): an OOM kill named and restarted, a fork loop stopped by pids_limit,
//! a busy loop held to its cpu_limit, and processes that escape their
//! process group (setsid) gone after a stop, after the daemon is killed (its
//! guardian), and after the daemon and its guardian are both killed (the
//! next daemon's sweep). Also a checksum mismatch that never runs.
//!
//! These need root and a cgroup hierarchy (v1 pids or v2); elsewhere each
//! test prints why it skips.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator_e2e::*;
use serde_json::Value;

const SIGKILL: i32 = 9;

/// Why cgroup tests cannot run here, if they cannot.
fn no_cgroups() -> Option<&'static str> {
    if !running_as_root() {
        return Some("not root: no cgroup can be created");
    }
    let v1 = Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists();
    let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    (!v1 && !v2).then_some("no cgroup v1 pids hierarchy and no cgroup v2 at /sys/fs/cgroup")
}

macro_rules! require_cgroups {
    () => {
        if let Some(reason) = no_cgroups() {
            eprintln!("skipped: {reason}");
            return;
        }
    };
}

/// A workspace with script services `(name, body, extra config lines)`.
fn workspace(label: &str, services: &[(&str, &str, &str)]) -> TestDir {
    let dir = TestDir::new(label);
    let mut toml = String::from("[orchestrator]\nshutdown_timeout = \"5s\"\n");
    for (name, body, extra) in services {
        dir.add_script_service(name, body);
        toml.push_str(&format!(
            "\n[services.{name}]\nstop_timeout = \"2s\"\nbackoff = {{ initial = \"100ms\", max = \"200ms\" }}\n{extra}\n"
        ));
    }
    dir.write_file(CONFIG, &toml, 0o644);
    dir
}

fn run_daemon(dir: &TestDir) -> Daemon {
    Daemon::start(dir.path(), &["-c", CONFIG, "run"])
}

fn pid_of(status: &Value) -> u32 {
    u32::try_from(status["pid"].as_u64().expect("a pid")).unwrap()
}

fn events_file(dir: &TestDir) -> Vec<Value> {
    read_lines(&dir.data_dir().join("events.jsonl"))
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The first line of the service's log that starts with `prefix`, waited for.
fn wait_line(dir: &TestDir, service: &str, prefix: &str) -> String {
    let mut found = None;
    let ok = wait_until(DEADLINE, || {
        found = read_lines(&dir.log_path(service))
            .into_iter()
            .find(|l| l.starts_with(prefix));
        found.is_some()
    });
    assert!(
        ok,
        "{service}: no line starting with {prefix:?}: {:?}",
        read_lines(&dir.log_path(service))
    );
    found.expect("found")
}

/// The directory of `pid`'s cgroup in the hierarchy whose /proc/PID/cgroup
/// line names `controller` (v1), or the unified one (v2).
fn cgroup_dir(pid: u32, controller: &str) -> Option<PathBuf> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == controller) {
            return Some(
                Path::new("/sys/fs/cgroup")
                    .join(controller)
                    .join(path.trim_start_matches('/')),
            );
        }
    }
    let unified = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(unified.trim_start_matches('/'));
    dir.join("cgroup.controllers").exists().then_some(dir)
}

/// The escapee script: a `setsid` child (its own session and group) that
/// prints its pid, then the leader sleeps.
const ESCAPING: &str = "setsid sh -c 'echo ESCAPEE pid=$$; exec sleep 1000' &\nexec sleep 999";

#[test]
fn an_oom_kill_is_named_counted_and_handled_by_the_restart_policy() {
    require_cgroups!();
    let dir = workspace(
        "cg-oom",
        &[(
            "hog",
            "exec python3 -c \"b = b'x' * (256 << 20); print('survived')\"",
            "memory_limit = 48\nrestart = \"on-failure\"\nmax_restarts = 1",
        )],
    );
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "hog", |s| s["state"] == "failed");
    // "while starting" when the kill came within start_grace, which
    // depends on how fast a loaded machine gets the memory.
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error
            .starts_with("gave up after 1 restart: killed by the OOM killer (memory_limit 48 MiB)"),
        "{status:#}"
    );
    assert_eq!(status["last_exit_signal"], "SIGKILL", "{status:#}");
    assert_eq!(status["last_exit_code"], 137, "{status:#}");
    assert_eq!(status["oom_kills"], 2, "both runs: {status:#}");
    assert_eq!(
        status["restarts"], 1,
        "restarted once, as max_restarts says"
    );
    assert!(
        !read_lines(&dir.log_path("hog"))
            .iter()
            .any(|l| l == "survived"),
        "the allocation went through a 48 MiB limit"
    );
    let oom_events = events_file(&dir)
        .iter()
        .filter(|e| e["event"] == "oom_killed" && e["memory_limit_mib"] == 48)
        .count();
    assert_eq!(oom_events, 2);
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

/// Forks 60 sleepers, or as many as it may, and says when a fork fails (a
/// shell would exit at its first failed fork).
const FORK_LOOP: &str = r#"exec python3 -c '
import os, sys, time
for i in range(60):
    try:
        if os.fork() == 0:
            time.sleep(1000)
            os._exit(0)
    except OSError as error:
        print("FORK FAILED after", i, error, flush=True)
        break
print("FORKED", flush=True)
time.sleep(1000)
'"#;

#[test]
fn pids_limit_stops_a_fork_loop() {
    require_cgroups!();
    let dir = workspace("cg-pids", &[("forker", FORK_LOOP, "pids_limit = 12")]);
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "forker", |s| s["state"] == "running");
    let failed = wait_line(&dir, "forker", "FORK FAILED");
    assert!(
        failed.contains("Resource temporarily unavailable"),
        "{failed}"
    );
    let live = live_processes_with_home(&dir.service_data_dir("forker"));
    assert!(
        !live.is_empty() && live.len() <= 12,
        "{} processes under a pids_limit of 12",
        live.len()
    );
    let pids_max = cgroup_dir(pid_of(&status), "pids").map(|dir| dir.join("pids.max"));
    if let Some(file) = pids_max.filter(|f| f.exists()) {
        assert_eq!(
            std::fs::read_to_string(&file).unwrap().trim(),
            "12",
            "{file:?}"
        );
    }
    cli_ok(&dir, &["stop", "forker"]);
    assert!(
        wait_until(DEADLINE, || live_processes_with_home(
            &dir.service_data_dir("forker")
        )
        .is_empty()),
        "the forked sleeps outlived the stop"
    );
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

#[test]
fn a_busy_loop_is_held_to_its_cpu_limit() {
    require_cgroups!();
    let dir = workspace(
        "cg-cpu",
        &[("spinner", "while :; do :; done", "cpu_limit = 0.2")],
    );
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "spinner", |s| s["state"] == "running");
    let pid = pid_of(&status);
    if let Some(dir) = cgroup_dir(pid, "cpu") {
        let quota = dir.join("cpu.cfs_quota_us");
        let max = dir.join("cpu.max");
        if quota.exists() {
            assert_eq!(std::fs::read_to_string(&quota).unwrap().trim(), "20000");
            assert_eq!(
                std::fs::read_to_string(dir.join("cpu.cfs_period_us"))
                    .unwrap()
                    .trim(),
                "100000"
            );
        } else if max.exists() {
            assert_eq!(
                std::fs::read_to_string(&max).unwrap().trim(),
                "20000 100000"
            );
        }
    }
    // The quota is a ceiling, whatever the load: over any stretch the loop
    // gets at most 0.2 of a core (plus a period of slack).
    let ticks = |pid: u32| -> f64 {
        (stat_field(pid, 14).unwrap() + stat_field(pid, 15).unwrap()) as f64 / 100.0
    };
    let (began, cpu_before) = (Instant::now(), ticks(pid));
    assert!(wait_until(DEADLINE, || began.elapsed() >= Duration::from_secs(2)));
    let (wall, cpu) = (began.elapsed().as_secs_f64(), ticks(pid) - cpu_before);
    assert!(
        cpu <= 0.2 * wall + 0.15,
        "{cpu:.2} s of CPU in {wall:.2} s under cpu_limit 0.2"
    );
    let status = wait_for_status(&dir, &daemon, "spinner", |s| s["cpu_seconds"].is_f64());
    assert!(
        status["memory_bytes"].as_u64().unwrap_or(0) > 0,
        "{status:#}"
    );
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

#[test]
fn an_escaped_process_dies_with_its_service_on_stop() {
    require_cgroups!();
    let dir = workspace("cg-stop", &[("escaper", ESCAPING, "")]);
    let mut daemon = run_daemon(&dir);
    wait_for_status(&dir, &daemon, "escaper", |s| s["state"] == "running");
    let escapee = field(&wait_line(&dir, "escaper", "ESCAPEE"), "pid");
    assert!(is_alive(escapee));
    assert_ne!(
        session_id(escapee),
        session_id(daemon.pid()),
        "it left our session"
    );
    cli_ok(&dir, &["stop", "escaper"]);
    assert!(
        wait_until(DEADLINE, || !is_alive(escapee)),
        "the setsid escapee {escapee} outlived its service's stop"
    );
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

/// The guardian of a daemon killed with SIGKILL stops everything, escapees
/// included (through the cgroups).
#[test]
fn escaped_processes_die_with_a_killed_daemon() {
    require_cgroups!();
    let dir = workspace("cg-kill9", &[("escaper", ESCAPING, "")]);
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "escaper", |s| s["state"] == "running");
    let leader = pid_of(&status);
    let escapee = field(&wait_line(&dir, "escaper", "ESCAPEE"), "pid");
    // Whichever parent the daemon claimed (the configured one, or its
    // fallback when parallel tests hold that), the guardian sweeps it.
    let cgroup = cgroup_dir(leader, "pids").expect("the service's cgroup");
    assert!(cgroup.ends_with("escaper"), "{cgroup:?}");
    daemon.signal(SIGKILL);
    daemon.wait_exit();
    for pid in [leader, escapee] {
        assert!(
            wait_until(DEADLINE, || !is_alive(pid)),
            "{pid} outlived its SIGKILLed daemon"
        );
    }
    assert!(
        wait_until(DEADLINE, || !cgroup.exists()),
        "{cgroup:?} is left after the guardian's clean-up"
    );
}

/// Both the daemon and its guardian killed: the next daemon's sweep of the
/// services' cgroups finds the escapee the state record did not name.
#[test]
fn the_next_daemon_sweeps_what_the_record_could_not_name() {
    require_cgroups!();
    let dir = workspace("cg-sweep", &[("escaper", ESCAPING, "")]);
    let mut first = run_daemon(&dir);
    wait_for_status(&dir, &first, "escaper", |s| s["state"] == "running");
    let escapee = field(&wait_line(&dir, "escaper", "ESCAPEE"), "pid");
    let guardian = all_pids()
        .into_iter()
        .find(|&pid| {
            stat(pid).is_some_and(|s| s.ppid == first.pid() as i32)
                && cmdline(pid).is_some_and(|a| a.iter().any(|arg| arg == "guardian"))
        })
        .expect("the daemon's guardian");
    assert!(send_signal(guardian, SIGKILL));
    assert!(wait_until(DEADLINE, || !is_alive(guardian)));
    first.signal(SIGKILL);
    first.wait_exit();
    assert!(is_alive(escapee), "nothing stopped it yet");

    let mut second = run_daemon(&dir);
    wait_for_status(&dir, &second, "escaper", |s| s["state"] == "running");
    assert!(
        wait_until(DEADLINE, || !is_alive(escapee)),
        "the escapee {escapee} survived the next daemon's start"
    );
    assert!(
        events_file(&dir)
            .iter()
            .any(|e| e["event"] == "leftover_stopped" && e["pid"] == escapee),
        "no leftover_stopped for {escapee}"
    );
    cli_ok(&dir, &["shutdown"]);
    second.wait_exit();
}

/// A binary whose checksum does not match is never executed: the service
/// fails at once with both digests, and the binary's side effect never
/// appears.
#[test]
fn a_checksum_mismatch_never_runs_the_binary() {
    let dir = TestDir::new("cg-sha");
    let marker = dir.join("ran");
    dir.add_script_service(
        "tampered",
        &format!("touch {}\nexec sleep 1000", marker.display()),
    );
    let wrong = "0".repeat(64);
    dir.write_file(
        CONFIG,
        &format!("[services.tampered]\nsha256 = \"{wrong}\"\n"),
        0o644,
    );
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "tampered", |s| s["state"] == "failed");
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("checksum mismatch: expected 0000") && error.contains(" got "),
        "{status:#}"
    );
    assert_eq!(
        status["restarts"], 0,
        "a mismatch is not retried: {status:#}"
    );
    assert!(!marker.exists(), "the tampered binary ran");
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

/// `user` drops the service to that account, in a working directory it was
/// given, with no_new_privs; the daemon stays root.
#[test]
fn a_service_runs_as_its_user_in_a_directory_it_owns() {
    if !running_as_root() {
        eprintln!("skipped: not root, so no user can be switched to");
        return;
    }
    let Some(nobody) = nix::unistd::User::from_name("nobody").ok().flatten() else {
        eprintln!("skipped: no user nobody on this host");
        return;
    };
    let dir = TestDir::new("cg-user");
    // The directories above the service's must be searchable by nobody.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    dir.add_script_service("dropped", "id -u > whoami\necho WROTE\nexec sleep 1000");
    dir.write_file(CONFIG, "[services.dropped]\nuser = \"nobody\"\n", 0o644);
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "dropped", |s| s["state"] == "running");
    wait_line(&dir, "dropped", "WROTE");
    let data = dir.service_data_dir("dropped");
    assert_eq!(
        std::fs::read_to_string(data.join("whoami")).unwrap().trim(),
        nobody.uid.to_string()
    );
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&data).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (nobody.uid.as_raw(), nobody.gid.as_raw())
        );
    }
    let proc_status = std::fs::read_to_string(format!("/proc/{}/status", pid_of(&status))).unwrap();
    let line = |key: &str| {
        proc_status
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
    };
    let uid = nobody.uid.to_string();
    assert_eq!(line("Uid:"), [uid.as_str(); 4], "{proc_status}");
    assert_eq!(line("NoNewPrivs:"), ["1"], "{proc_status}");
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

/// A cgroup_parent that looks like a flag still reaches the guardian as a
/// value (`--cgroup-parent=-odd`), and the services live under it.
#[test]
fn a_parent_that_starts_with_a_dash_is_handed_to_the_guardian() {
    require_cgroups!();
    let dir = TestDir::new("cg-dash");
    dir.add_script_service("dashed", "exec sleep 1000");
    let parent = format!("-odd-{}", std::process::id());
    dir.write_file(
        CONFIG,
        &format!("[orchestrator]\ncgroup_parent = \"{parent}\"\n[services.dashed]\n"),
        0o644,
    );
    let mut daemon = run_daemon(&dir);
    let status = wait_for_status(&dir, &daemon, "dashed", |s| s["state"] == "running");
    let cgroup = cgroup_dir(pid_of(&status), "pids").expect("the service's cgroup");
    assert!(
        cgroup.to_string_lossy().contains(&parent),
        "{cgroup:?} is not under {parent}"
    );
    let guardian = all_pids().into_iter().find(|&pid| {
        stat(pid).is_some_and(|s| s.ppid == daemon.pid() as i32)
            && cmdline(pid).is_some_and(|a| a.iter().any(|arg| arg == "guardian"))
    });
    let guardian = guardian.unwrap_or_else(|| panic!("no guardian:\n{}", daemon.stderr_text()));
    assert!(
        cmdline(guardian)
            .unwrap()
            .contains(&format!("--cgroup-parent={parent}")),
        "{:?}",
        cmdline(guardian)
    );
    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
}

/// The daemon's guardian holds the daemon's cgroup parent from the moment
/// the daemon dies until its sweep is done: a daemon started meanwhile with
/// the same cgroup_parent gets the fallback name, never the parent whose
/// leftovers are about to be swept (and its services with them). The
/// guardian is kept busy by a leader that ignores SIGTERM for its whole
/// stop_timeout. (Not SIGSTOP: a stopped guardian whose parent dies is in
/// an orphaned process group, which the kernel sends SIGHUP, and it dies.)
#[test]
fn a_killed_daemons_parent_stays_held_by_its_guardian_until_the_sweep() {
    require_cgroups!();
    let parent = format!("orch-held-{}", std::process::id());
    let config = |service: &str| {
        format!(
            "[orchestrator]\ncgroup_parent = \"{parent}\"\nshutdown_timeout = \"5s\"\n[services.{service}]\nstop_timeout = \"6s\"\n"
        )
    };
    let first = TestDir::new("cg-held-1");
    first.add_script_service(
        "escaper",
        "trap '' TERM\nsetsid sh -c 'echo ESCAPEE pid=$$; exec sleep 1000' &\nwhile :; do sleep 1; done",
    );
    first.write_file(CONFIG, &config("escaper"), 0o644);
    let mut daemon = run_daemon(&first);
    let status = wait_for_status(&first, &daemon, "escaper", |s| s["state"] == "running");
    let held = cgroup_dir(pid_of(&status), "pids").expect("the service's cgroup");
    assert!(held.parent().unwrap().ends_with(&parent), "{held:?}");
    let escapee = field(&wait_line(&first, "escaper", "ESCAPEE"), "pid");
    let guardian = all_pids()
        .into_iter()
        .find(|&pid| {
            stat(pid).is_some_and(|s| s.ppid == daemon.pid() as i32)
                && cmdline(pid).is_some_and(|a| a.iter().any(|arg| arg == "guardian"))
        })
        .expect("the daemon's guardian");
    // It holds the parent's lock from the start, by the descriptor the
    // daemon gave it: nothing can claim the parent between the daemon's
    // death and the guardian's sweep (a window too short to hit on purpose).
    let lock = format!("@orchestrator-cgroup:{}", held.parent().unwrap().display());
    assert_eq!(
        unix_socket_name(guardian, 3).as_deref(),
        Some(lock.as_str()),
        "the guardian's descriptor 3"
    );
    daemon.signal(SIGKILL);
    daemon.wait_exit();
    // The guardian now waits out the leader's 6 s stop_timeout.

    let second = TestDir::new("cg-held-2");
    second.add_script_service("other", "exec sleep 1000");
    second.write_file(CONFIG, &config("other"), 0o644);
    let mut other = run_daemon(&second);
    let status = wait_for_status(&second, &other, "other", |s| s["state"] == "running");
    let elsewhere = cgroup_dir(pid_of(&status), "pids").expect("the service's cgroup");
    assert_ne!(
        elsewhere.parent(),
        held.parent(),
        "a new daemon took the parent the guardian is to sweep"
    );
    assert!(
        is_alive(guardian),
        "the guardian ended too soon for this test"
    );
    assert!(
        wait_until(DEADLINE, || !is_alive(escapee)),
        "the guardian did not sweep {escapee}"
    );
    assert!(
        is_alive(pid_of(&status)),
        "the new daemon's service was left alone"
    );
    cli_ok(&second, &["shutdown"]);
    other.wait_exit();
}

/// The address a Unix socket descriptor of `pid` is bound to
/// (`@name` for an abstract one), from /proc/net/unix.
fn unix_socket_name(pid: u32, fd: u32) -> Option<String> {
    let link = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let inode = link
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .to_owned();
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(6) == Some(&inode.as_str())).then(|| fields.get(7).map(|s| s.to_string()))?
    })
}
