//! No descriptor of the parent leaks into a service. This file holds one
//! test on purpose: it opens inheritable descriptors in the test process,
//! which would leak into the children of any other test running beside it.

use std::collections::BTreeMap;
use std::sync::Arc;

use orchestrator_core::events::EventBus;
use orchestrator_core::process::{UnixSpawner, mark_inherited_fds_cloexec, reserve_spawn_slots};
use orchestrator_core::service::spawn_service;
use orchestrator_e2e::*;

/// The open descriptors of `pid` and what they point at, seen from outside.
fn open_fds(pid: u32) -> BTreeMap<i32, String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect()
}

#[tokio::test]
async fn only_stdin_stdout_and_stderr_reach_the_child() {
    let dir = TestDir::new("fds");
    let guard = ProcessGuard::new();
    let leaked_file = dir.write_file("inherited.txt", "not for services\n", 0o644);
    let leaked = open_inheritable_fd(&leaked_file);
    assert!(!is_cloexec(leaked));
    // As the daemon does: the spawn slots above what it inherited, below
    // everything it opens later. A child keeps only the bottom of the table,
    // up to the slots: what lies above never reaches it, inheritable or not.
    reserve_spawn_slots();
    let above_file = dir.write_file("above.txt", "opened after the slots\n", 0o644);
    let above = open_inheritable_fd(&above_file);
    assert!(above > leaked);
    let own_stdio = open_fds(std::process::id());
    let own_stdio: Vec<_> = (0..3).map(|fd| own_stdio.get(&fd).cloned()).collect();

    let config = config_in(
        &dir,
        vec![("fds", fixture(&["--print-fds", "--ready", "--sleep"]))],
    );
    let (handle, _task) = spawn_service(
        definition(&config, "fds"),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    let log = dir.log_path("fds");

    // Without the daemon's precaution the descriptor does leak: this proves
    // the check below can fail.
    within("start", handle.start()).await.unwrap();
    wait_for_line_async(&log, "READY").await;
    let pid = handle.status().pid.unwrap();
    assert_eq!(
        open_fds(pid).get(&leaked).map(String::as_str),
        Some(leaked_file.to_str().unwrap()),
        "the unprotected descriptor reached the child"
    );
    assert_eq!(open_fds(pid).get(&above), None, "only the bottom is copied");
    within("stop", handle.stop()).await.unwrap();

    // What the daemon does at start.
    mark_inherited_fds_cloexec().unwrap();
    assert!(is_cloexec(leaked));
    within("start", handle.start()).await.unwrap();
    let pid = handle.status().pid.unwrap();
    wait_for_line_async(&log, &format!("READY pid={pid} ")).await;

    let fds = open_fds(pid);
    assert_eq!(
        fds.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2],
        "{fds:?}"
    );
    assert_eq!(fds[&0], "/dev/null");
    assert!(fds[&1].starts_with("pipe:"), "{fds:?}");
    assert!(fds[&2].starts_with("pipe:"), "{fds:?}");
    assert_ne!(fds[&1], fds[&2], "separate pipes for stdout and stderr");

    // The child's own view agrees (minus the descriptor it lists with).
    let own_listing = format!("/proc/{pid}/fd");
    let printed: Vec<String> = read_lines(&log)
        .into_iter()
        .skip_while(|line| !line.starts_with("READY "))
        .skip(1)
        .filter(|line| line.starts_with("FD ") && !line.ends_with(&own_listing))
        .collect();
    assert_eq!(
        printed,
        [
            "FD 0 /dev/null".to_owned(),
            format!("FD 1 {}", fds[&1]),
            format!("FD 2 {}", fds[&2]),
        ]
    );
    within("stop", handle.stop()).await.unwrap();
    // The child shared our table until it took its own copy: it moved its
    // pipes onto 0, 1 and 2 of the copy, never of ours.
    let after = open_fds(std::process::id());
    let after: Vec<_> = (0..3).map(|fd| after.get(&fd).cloned()).collect();
    assert_eq!(after, own_stdio, "the spawning process's stdio is its own");
}
