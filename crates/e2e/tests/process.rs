//! Real processes through the library: process groups, working directory,
//! argv, stopping (grace, SIGKILL, grandchildren), crash loops, and a child
//! that closes its output early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator_core::config::{LogLevel, RestartPolicy, ServiceConfig};
use orchestrator_core::events::EventBus;
use orchestrator_core::process::{ExitReason, UnixSpawner};
use orchestrator_core::service::{ServiceHandle, State, spawn_service};
use orchestrator_e2e::*;

/// Start service `name` alone (its actor, no supervisor) and wait until it runs.
async fn start_one(
    dir: &TestDir,
    guard: &ProcessGuard,
    name: &str,
    service: ServiceConfig,
) -> ServiceHandle {
    let config = config_in(dir, vec![(name, service)]);
    let (handle, _task) = spawn_service(
        definition(&config, name),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    within("start", handle.start())
        .await
        .unwrap_or_else(|e| panic!("{name} did not start: {e}"));
    handle
}

fn lines_with_prefix(lines: &[String], prefix: &str) -> Vec<String> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(prefix).map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn each_service_leads_its_own_process_group() {
    let dir = TestDir::new("pgroup");
    let guard = ProcessGuard::new();
    let handle = start_one(&dir, &guard, "grp", fixture(&["--ready", "--sleep"])).await;
    let ready = wait_for_line_async(&dir.log_path("grp"), "READY").await;
    let pid = handle.status().pid.expect("a running service has a pid");
    assert_eq!(field(&ready, "pid"), pid);
    let stat = stat(pid).expect("the child is alive");
    assert_eq!(stat.pgid, pid as i32, "the child leads its own group");
    assert_eq!(field(&ready, "pgid"), pid, "as the child itself sees it");
    assert_ne!(stat.pgid, own_pgid(), "not in the test's group");
    within("stop", handle.stop()).await.unwrap();
    assert_eq!(handle.status().state, State::Stopped);
}

#[tokio::test]
async fn cwd_and_home_are_the_data_dir_which_is_created() {
    let dir = TestDir::new("cwd");
    let guard = ProcessGuard::new();
    let args = ["--print-cwd", "--print-env", "--ready", "--sleep"];

    // Default data_dir: services_dir/NAME/data, created at the first start.
    let default_dir = dir.service_data_dir("plain");
    assert!(!default_dir.exists());
    let plain = start_one(&dir, &guard, "plain", fixture(&args)).await;

    // A configured data_dir, several levels that do not exist yet.
    let custom_dir = dir.join("elsewhere/deep/state");
    let custom = start_one(
        &dir,
        &guard,
        "custom",
        ServiceConfig {
            data_dir: Some(custom_dir.clone()),
            ..fixture(&args)
        },
    )
    .await;

    for (name, expected) in [("plain", &default_dir), ("custom", &custom_dir)] {
        wait_for_line_async(&dir.log_path(name), "READY").await;
        assert!(expected.is_dir(), "{} was created", expected.display());
        let lines = read_lines(&dir.log_path(name));
        assert_eq!(
            lines_with_prefix(&lines, "CWD "),
            [expected.display().to_string()],
            "{name}: cwd"
        );
        assert_eq!(
            lines_with_prefix(&lines, "ENV HOME="),
            [expected.display().to_string()],
            "{name}: HOME"
        );
    }
    within("stop", plain.stop()).await.unwrap();
    within("stop", custom.stop()).await.unwrap();
}

#[tokio::test]
async fn argv_is_injected_flags_then_args_verbatim_without_a_shell() {
    let dir = TestDir::new("argv");
    let guard = ProcessGuard::new();
    let tricky = [
        "$(touch M)",
        "`touch M`",
        "a b",
        "*",
        "; touch M",
        "'\"",
        "",
    ];
    let mut args = vec!["--print-args"];
    for arg in &tricky {
        args.extend(["--arg", arg]);
    }
    args.extend(["--ready", "--sleep"]);

    let mut config = config_in(&dir, vec![("argv", fixture(&args))]);
    config.orchestrator.log_level = LogLevel::Debug;
    let (handle, _task) = spawn_service(
        definition(&config, "argv"),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    within("start", handle.start()).await.unwrap();
    wait_for_line_async(&dir.log_path("argv"), "READY").await;

    let pid = handle.status().pid.unwrap();
    let mut expected = vec![
        fixture_bin().display().to_string(),
        "--service".into(),
        "argv".into(),
        "--log-level".into(),
        "debug".into(),
    ];
    expected.extend(args.iter().map(|a| (*a).to_owned()));
    let printed = lines_with_prefix(&read_lines(&dir.log_path("argv")), "ARG ");
    assert_eq!(printed, expected, "argv as the child sees it");
    assert_eq!(
        std::fs::read(format!("/proc/{pid}/cmdline")).unwrap(),
        expected
            .iter()
            .flat_map(|a| a.bytes().chain([0]))
            .collect::<Vec<u8>>(),
        "argv byte for byte"
    );
    // No shell ran: nothing was touched anywhere it could have been.
    assert!(!dir.service_data_dir("argv").join("M").exists());
    assert!(!dir.join("M").exists());
    within("stop", handle.stop()).await.unwrap();
}

#[tokio::test]
async fn command_is_the_exact_argv_and_is_looked_up_in_the_service_path() {
    let dir = TestDir::new("command");
    let guard = ProcessGuard::new();
    let bin_dir = fixture_bin().parent().unwrap().display().to_string();

    // An absolute command: exactly this argv, no injected flags.
    let absolute = vec![
        fixture_bin().display().to_string(),
        "--print-args".to_owned(),
        "--ready".to_owned(),
        "--sleep".to_owned(),
    ];
    let exact = start_one(
        &dir,
        &guard,
        "exact",
        ServiceConfig {
            binary_path: None,
            command: Some(absolute.clone()),
            ..fixture(&[])
        },
    )
    .await;

    // A bare name: found in the service's own PATH (from `environment`).
    let bare = vec![
        "fixture-service".to_owned(),
        "--print-args".to_owned(),
        "--ready".to_owned(),
        "--sleep".to_owned(),
    ];
    let looked_up = start_one(
        &dir,
        &guard,
        "lookup",
        ServiceConfig {
            binary_path: None,
            command: Some(bare.clone()),
            environment: [("PATH".to_owned(), bin_dir)].into(),
            ..fixture(&[])
        },
    )
    .await;

    for (name, argv) in [("exact", &absolute), ("lookup", &bare)] {
        wait_for_line_async(&dir.log_path(name), "READY").await;
        let printed = lines_with_prefix(&read_lines(&dir.log_path(name)), "ARG ");
        assert_eq!(&printed, argv, "{name}: argv");
    }
    within("stop", exact.stop()).await.unwrap();
    within("stop", looked_up.stop()).await.unwrap();
}

#[tokio::test]
async fn a_child_ignoring_sigterm_gets_sigkill_after_stop_timeout() {
    let dir = TestDir::new("ignoreterm");
    let guard = ProcessGuard::new();
    let stop_timeout = Duration::from_millis(500);
    let handle = start_one(
        &dir,
        &guard,
        "stubborn",
        ServiceConfig {
            stop_timeout: Some(stop_timeout),
            ..fixture(&["--ignore-term", "--ready", "--sleep"])
        },
    )
    .await;
    // READY comes after SIG_IGN is installed.
    wait_for_line_async(&dir.log_path("stubborn"), "READY").await;
    let pid = handle.status().pid.unwrap();

    let began = Instant::now();
    within("stop", handle.stop()).await.unwrap();
    let took = began.elapsed();

    let status = handle.status();
    assert_eq!(status.state, State::Stopped);
    assert_eq!(
        status.last_exit,
        Some(ExitReason::Signaled {
            signal: libc::SIGKILL,
            core_dumped: false
        })
    );
    assert!(
        took >= stop_timeout,
        "SIGKILL came after {took:?}, before the stop_timeout of {stop_timeout:?}"
    );
    // stop() returned only once the process was reaped.
    assert!(!is_alive(pid), "{pid} is still alive after stop()");
}

#[tokio::test]
async fn stop_takes_the_grandchildren_too() {
    let dir = TestDir::new("grandchild-stop");
    let guard = ProcessGuard::new();
    let handle = start_one(
        &dir,
        &guard,
        "parent",
        fixture(&["--grandchild", "--ready", "--sleep"]),
    )
    .await;
    let line = wait_for_line_async(&dir.log_path("parent"), "GRANDCHILD").await;
    wait_for_line_async(&dir.log_path("parent"), "READY").await;
    let grandchild = field(&line, "pid");
    let leader = handle.status().pid.unwrap();
    assert_eq!(stat(grandchild).unwrap().pgid, leader as i32);
    assert!(is_alive(grandchild));

    within("stop", handle.stop()).await.unwrap();
    assert_eq!(
        handle.status().last_exit,
        Some(ExitReason::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        })
    );
    assert!(
        wait_until_async(DEADLINE, || !is_alive(grandchild)).await,
        "grandchild {grandchild} outlived its stopped service: {:?}",
        stat(grandchild)
    );
}

#[tokio::test]
async fn what_the_leader_leaves_behind_is_killed_when_it_exits() {
    let dir = TestDir::new("grandchild-exit");
    let guard = ProcessGuard::new();
    let config = config_in(
        &dir,
        vec![(
            "leaver",
            fixture(&["--grandchild", "--ready", "--exit", "1"]),
        )],
    );
    let (handle, _task) = spawn_service(
        definition(&config, "leaver"),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    // The leader may be gone before the answer: either outcome is fine.
    let _ = within("start", handle.start()).await;
    let line = wait_for_line_async(&dir.log_path("leaver"), "GRANDCHILD").await;
    let grandchild = field(&line, "pid");
    guard.add_pgid(stat(grandchild).map_or(0, |s| s.pgid));

    let status = wait_status(&handle, "failed", |s| s.state == State::Failed).await;
    assert_eq!(status.last_exit, Some(ExitReason::Exited(1)));
    assert!(
        wait_until_async(DEADLINE, || !is_alive(grandchild)).await,
        "grandchild {grandchild} outlived its leader: {:?}",
        stat(grandchild)
    );
}

#[tokio::test]
async fn a_crash_loop_spawns_exactly_one_plus_max_restarts_then_fails() {
    let dir = TestDir::new("crashloop");
    let guard = ProcessGuard::new();
    let pid_file = dir.join("pids");
    let pid_arg = pid_file.display().to_string();
    let service = ServiceConfig {
        restart: Some(RestartPolicy::Always),
        max_restarts: 3,
        ..fixture(&["--pid-file", &pid_arg, "--exit", "1"])
    };
    let backoff_max = service.backoff.max;
    let config = config_in(&dir, vec![("crashy", service)]);
    let (handle, _task) = spawn_service(
        definition(&config, "crashy"),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    let _ = within("start", handle.start()).await;

    let status = wait_status(&handle, "failed", |s| s.state == State::Failed).await;
    assert_eq!(read_lines(&pid_file).len(), 4, "1 + max_restarts spawns");
    assert_eq!(status.restarts, 3);
    assert_eq!(status.last_exit, Some(ExitReason::Exited(1)));
    assert_eq!(status.pid, None);
    let error = status.last_error.expect("failed keeps its reason");
    assert!(
        error.contains("gave up after 3 restarts") && error.contains("exited with code 1"),
        "last_error: {error}"
    );

    // Nothing is pending any more: no spawn comes later. This wait checks
    // an absence, so it has to be a bounded wait (a few backoff periods).
    tokio::time::sleep(backoff_max * 3).await;
    assert_eq!(
        read_lines(&pid_file).len(),
        4,
        "a failed service spawned again"
    );
    assert_eq!(handle.status().state, State::Failed);
}

#[tokio::test]
async fn a_child_that_closes_its_output_keeps_running() {
    let dir = TestDir::new("closeout");
    let guard = ProcessGuard::new();
    let pid_file = dir.join("pid");
    let pid_arg = pid_file.display().to_string();
    let handle = start_one(
        &dir,
        &guard,
        "quiet",
        fixture(&[
            "--ready",
            "--close-stdout",
            "--pid-file",
            &pid_arg,
            "--sleep",
        ]),
    )
    .await;
    let pid = handle.status().pid.unwrap();
    wait_for_line_async(&dir.log_path("quiet"), "READY").await;
    // The pid file is written after both pipes were closed.
    assert!(wait_until_async(DEADLINE, || read_lines(&pid_file).len() == 1).await);
    for fd in [1, 2] {
        assert_eq!(
            std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap(),
            std::path::Path::new("/dev/null")
        );
    }
    // End of output is not the end of the process. Checking an absence
    // needs a bounded wait: the state must not move for a while.
    let moved = wait_until_async(Duration::from_millis(500), || {
        let status = handle.status();
        status.state != State::Running || status.pid != Some(pid)
    })
    .await;
    assert!(
        !moved,
        "closing stdout changed the state: {:?}",
        handle.status()
    );
    assert!(is_alive(pid));

    within("stop", handle.stop()).await.unwrap();
    assert_eq!(
        handle.status().last_exit,
        Some(ExitReason::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        })
    );
}

#[tokio::test]
async fn restart_replaces_the_process() {
    let dir = TestDir::new("restart");
    let guard = ProcessGuard::new();
    let handle = start_one(
        &dir,
        &guard,
        "again",
        fixture(&["--grandchild", "--ready", "--sleep"]),
    )
    .await;
    let first = handle.status().pid.unwrap();
    let first_grandchild = field(
        &wait_for_line_async(&dir.log_path("again"), "GRANDCHILD").await,
        "pid",
    );

    within("restart", handle.restart()).await.unwrap();
    let status = handle.status();
    let second = status.pid.expect("running again");
    assert_ne!(second, first);
    assert_eq!((status.restarts, status.requested_starts), (0, 2));
    assert_eq!(status.state, State::Running);
    wait_for_line_async(&dir.log_path("again"), &format!("READY pid={second} ")).await;
    // The old generation is entirely gone once the new one runs.
    assert!(!is_alive(first), "the old leader survived a restart");
    assert!(
        wait_until_async(DEADLINE, || !is_alive(first_grandchild)).await,
        "the old grandchild survived a restart"
    );
    within("stop", handle.stop()).await.unwrap();
}

#[tokio::test]
async fn a_stop_during_backoff_cancels_the_pending_restart() {
    let dir = TestDir::new("stop-backoff");
    let guard = ProcessGuard::new();
    let pid_file = dir.join("pids");
    let pid_arg = pid_file.display().to_string();
    let mut service = ServiceConfig {
        restart: Some(RestartPolicy::Always),
        ..fixture(&["--pid-file", &pid_arg, "--exit", "1"])
    };
    service.backoff.initial = Duration::from_millis(300);
    service.backoff.max = Duration::from_millis(300);
    let config = config_in(&dir, vec![("flappy", service)]);
    let (handle, _task) = spawn_service(
        definition(&config, "flappy"),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    let _ = within("start", handle.start()).await;
    wait_status(&handle, "restarting", |s| s.state == State::Restarting).await;
    within("stop", handle.stop()).await.unwrap();
    assert_eq!(handle.status().state, State::Stopped);
    let spawns = read_lines(&pid_file).len();
    // An absence again: no spawn for a few backoff periods.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(
        read_lines(&pid_file).len(),
        spawns,
        "a stopped service started"
    );
    assert_eq!(handle.status().state, State::Stopped);
}
