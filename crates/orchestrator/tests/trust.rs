//! What the daemon trusts in its data_dir (issue 10, items 2, 5 and 6),
//! end to end against the real binary: a data_dir others can write, files
//! planted in it by a hostile local user (a `state` naming their process, a
//! symlink, a FIFO, a huge file, an `events.jsonl` of theirs), data_dir
//! deleted under a running daemon, and a full disk followed by a SIGKILL.
//!
//! Every wait synchronises on something the daemon or a service produced
//! (its exit, `status --json`, the state file, a log line); the deadlines
//! only turn a hang into a failure.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use orchestrator_core::state::{PersistedState, ProcessRecord};
use orchestrator_e2e::*;
use serde_json::Value;

/// The uid a hostile local user has here: nobody.
const OTHER_UID: u32 = 65534;

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A workspace with one fixture service `api` that prints READY and sleeps;
/// `orchestrator_extra` goes in the `[orchestrator]` table.
fn workspace(label: &str, orchestrator_extra: &str) -> TestDir {
    let dir = TestDir::new(label);
    dir.add_fixture_service("api");
    dir.write_file(
        CONFIG,
        &format!(
            "[orchestrator]\nshutdown_timeout = \"5s\"\n{orchestrator_extra}\n\
             [services.api]\nargs = [\"--ready\", \"--sleep\"]\nstop_timeout = \"1s\"\n"
        ),
        0o644,
    );
    dir
}

fn run_daemon(dir: &TestDir) -> Daemon {
    Daemon::start(dir.path(), &["-c", CONFIG, "run"])
}

/// Wait until `status --json` shows api running with a pid; its group goes
/// to the daemon's guard.
fn wait_running(dir: &TestDir, daemon: &Daemon) -> u32 {
    let mut pid = None;
    let mut last = String::new();
    let running = wait_until(DEADLINE, || {
        let (code, stdout, stderr) = cli(dir, &["status", "--json", "api"]);
        last = format!("exit {code}\n{stdout}{stderr}");
        pid = serde_json::from_str::<Vec<Value>>(&stdout)
            .ok()
            .and_then(|services| {
                let api = services.first()?;
                (api["state"] == "running").then(|| api["pid"].as_u64())?
            })
            .and_then(|p| u32::try_from(p).ok());
        pid.is_some()
    });
    assert!(
        running,
        "api not running after {DEADLINE:?}; last status: {last}\ndaemon log:\n{}",
        daemon.stderr_text()
    );
    let pid = pid.expect("running");
    daemon.guard.add_pgid(pid as i32);
    pid
}

fn shutdown(dir: &TestDir, daemon: &mut Daemon) {
    cli_ok(dir, &["shutdown"]);
    assert_eq!(
        daemon.wait_exit().code(),
        Some(0),
        "log:\n{}",
        daemon.stderr_text()
    );
}

/// A process of the test's own that a hostile user would like the daemon
/// to kill: `sleep 60` leading its own group, SIGKILLed on drop.
struct Victim(Stranger);

impl Victim {
    fn start() -> Victim {
        Victim(Stranger::start())
    }

    fn is_alive(&mut self) -> bool {
        self.0.is_alive()
    }

    /// Exactly what a daemon records for it: with this, only where the
    /// record comes from can protect it.
    fn record(&self) -> PersistedState {
        let pid = self.0.pid();
        let mut start = None;
        assert!(wait_until(DEADLINE, || {
            start = start_time(pid);
            start.is_some()
        }));
        PersistedState {
            daemon_pid: 999_999,
            boot_id: orchestrator_core::state::boot_id(),
            services: BTreeMap::from([(
                "api".to_owned(),
                ProcessRecord {
                    pid,
                    pgid: pid,
                    sid: session_id(pid).expect("the victim's session"),
                    start_time: start.expect("a start time"),
                },
            )]),
        }
    }
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), None).expect("chown");
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---------------------------------------------------------------------------
// Item 2: a data_dir that others can write is not trusted

/// The reported attack: a data_dir of mode 1777, a `state` planted by
/// another user naming their own process. The daemon refuses to start, says
/// how to fix it, and once fixed ignores the planted file.
#[test]
fn a_data_dir_others_can_write_is_refused_and_a_planted_state_kills_nothing() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to plant a file owned by another uid");
        return;
    }
    let dir = workspace("trust-1777", "");
    let data = dir.data_dir();
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o1777);
    let mut victim = Victim::start();
    let state = data.join("state");
    std::fs::write(&state, serde_json::to_vec(&victim.record()).unwrap()).unwrap();
    chown(&state, OTHER_UID);

    let mut refused = run_daemon(&dir);
    assert_eq!(refused.wait_exit().code(), Some(1));
    let log = refused.stderr_text();
    assert!(
        log.contains(&format!("`chmod 700 {}`", data.display())),
        "the fix is named: {log}"
    );
    assert!(victim.is_alive(), "the victim was signalled");

    // The operator applies the fix; the planted file stays.
    chmod(&data, 0o700);
    let mut daemon = run_daemon(&dir);
    let pid = wait_running(&dir, &daemon);
    assert_ne!(pid, victim.0.pid());
    assert!(victim.is_alive(), "the victim was signalled");
    let line = daemon.wait_for_log(&["ignoring", "state", "owned by uid 65534"]);
    assert!(line.contains("ERROR"), "said loudly: {line}");
    assert!(data.join("state.untrusted").exists(), "set aside");
    let events = cli_ok(&dir, &["events"]);
    assert!(events.contains("ignored"), "{events}");
    shutdown(&dir, &mut daemon);
    assert!(victim.is_alive());
}

#[test]
fn a_data_dir_owned_by_another_uid_is_refused_with_the_chown() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give data_dir to another uid");
        return;
    }
    let dir = workspace("trust-owner", "");
    let data = dir.data_dir();
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    chown(&data, OTHER_UID);
    let mut daemon = run_daemon(&dir);
    assert_eq!(daemon.wait_exit().code(), Some(1));
    let log = daemon.stderr_text();
    assert!(
        log.contains(&format!("`chown 0 {}", data.display())),
        "{log}"
    );
    assert!(!data.join("lock").exists(), "touched nothing");
}

/// Symlinks planted in data_dir before it was made private: nothing is
/// read or written through them.
#[test]
fn planted_symlinks_in_data_dir_are_not_followed() {
    let dir = workspace("trust-links", "");
    let data = dir.data_dir();
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    let mut victim = Victim::start();
    // `state` -> a file elsewhere holding a record that names the victim.
    let elsewhere = dir.write_file(
        "elsewhere/record",
        &serde_json::to_string(&victim.record()).unwrap(),
        0o600,
    );
    let record = std::fs::read(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, data.join("state")).unwrap();
    // `events.jsonl` -> a file whose forged history must not be shown.
    let forged = dir.write_file(
        "elsewhere/events",
        "{\"seq\":41,\"time\":\"2026-01-01T00:00:00.000Z\",\"event\":\"daemon_started\",\"pid\":4242}\n",
        0o600,
    );
    std::os::unix::fs::symlink(&forged, data.join("events.jsonl")).unwrap();

    let mut daemon = run_daemon(&dir);
    wait_running(&dir, &daemon);
    assert!(victim.is_alive(), "the victim was signalled");
    daemon.wait_for_log(&["ignoring", "state", "symbolic link"]);
    daemon.wait_for_log(&["ignoring", "events.jsonl", "symbolic link"]);
    let events = cli_ok(&dir, &["events"]);
    assert!(!events.contains("4242"), "forged history shown: {events}");
    shutdown(&dir, &mut daemon);
    assert!(victim.is_alive());
    assert_eq!(std::fs::read(&elsewhere).unwrap(), record, "target changed");
    assert!(
        read_bytes(&forged).starts_with(b"{\"seq\":41"),
        "target changed"
    );
    assert!(data.join("state.untrusted").is_symlink());
}

/// `logs` -> a directory elsewhere: the services' output would be written
/// there (O_NOFOLLOW guards only the last component).
#[test]
fn a_logs_symlink_is_refused() {
    let dir = workspace("trust-logs", "");
    let data = dir.data_dir();
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    let elsewhere = dir.join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::os::unix::fs::symlink(&elsewhere, data.join("logs")).unwrap();
    let mut daemon = run_daemon(&dir);
    assert_eq!(daemon.wait_exit().code(), Some(1));
    let log = daemon.stderr_text();
    assert!(
        log.contains("symbolic link") && log.contains("rm "),
        "{log}"
    );
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// A FIFO as `state` hung the daemon's start (a read waits for a writer);
/// a huge sparse one made it read it all into memory.
#[test]
fn a_fifo_or_a_huge_state_file_does_not_stop_the_start() {
    for label in ["fifo", "huge"] {
        let dir = workspace(&format!("trust-{label}"), "");
        let data = dir.data_dir();
        std::fs::create_dir(&data).unwrap();
        chmod(&data, 0o700);
        let state = data.join("state");
        if label == "fifo" {
            nix::unistd::mkfifo(&state, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        } else {
            let file = std::fs::File::create(&state).unwrap();
            file.set_len(64 << 30).unwrap();
        }
        let mut daemon = run_daemon(&dir);
        wait_running(&dir, &daemon);
        let expected = if label == "fifo" {
            "not a regular file"
        } else {
            "is corrupt"
        };
        daemon.wait_for_log(&["state", expected]);
        shutdown(&dir, &mut daemon);
    }
}

// ---------------------------------------------------------------------------
// Item 5: deleting data_dir under a running daemon

#[test]
fn deleting_data_dir_does_not_let_a_second_daemon_run_the_services_again() {
    let dir = workspace("trust-rmrf", "");
    let mut first = run_daemon(&dir);
    let pid = wait_running(&dir, &first);
    let home = dir.service_data_dir("api");
    // Like `rm -rf`, racing the daemon's own writes (a log line may land
    // in a directory being emptied): again until it is gone.
    let removed = wait_until(DEADLINE, || remove_all(&dir.data_dir()));
    assert!(removed, "cannot remove data_dir");

    let mut second = run_daemon(&dir);
    assert_eq!(
        second.wait_exit().code(),
        Some(1),
        "log:\n{}",
        second.stderr_text()
    );
    let log = second.stderr_text();
    assert!(
        log.contains(&format!("(pid {})", first.pid())),
        "names the running daemon: {log}"
    );
    assert_eq!(live_processes_with_home(&home), vec![pid], "api runs once");
    assert!(first.try_exit().is_none());
    // Its control socket went with data_dir: stop it by signal.
    first.signal(nix::libc::SIGTERM);
    assert_eq!(first.wait_exit().code(), Some(0));
    assert!(live_processes_with_home(&home).is_empty());
}

// ---------------------------------------------------------------------------
// Item 6: a full disk, then a SIGKILL

/// `rm -rf path` once: whether the path is gone.
fn remove_all(path: &Path) -> bool {
    match std::fs::remove_dir_all(path) {
        Ok(()) => true,
        Err(error) => error.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Fill the filesystem of `path` until a write fails with ENOSPC.
fn fill(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(error) => panic!("filling the disk: {error}"),
        }
    }
    // The last partial block too.
    while file.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
}

#[test]
fn a_full_disk_does_not_make_the_record_stale_so_a_sigkill_runs_nothing_twice() {
    let dir = workspace("trust-full", "data_dir = \"data\"");
    let data = dir.join("data");
    let _tmpfs = match Tmpfs::mount(&data, "2m") {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("SKIPPED a_full_disk_does_not_make_the_record_stale: {reason}");
            return;
        }
    };
    let home = dir.service_data_dir("api");
    let mut first = run_daemon(&dir);
    let old = wait_running(&dir, &first);
    fill(&data.join("filler"));

    // A spawn while the disk is full: it must reach the record.
    cli_ok(&dir, &["restart", "api"]);
    let new = wait_running(&dir, &first);
    assert_ne!(new, old);
    let state = data.join("state");
    let recorded = wait_until(DEADLINE, || {
        orchestrator_core::state::read_state(&state)
            .ok()
            .flatten()
            .is_some_and(|s| s.services.get("api").map(|r| r.pid) == Some(new))
    });
    assert!(
        recorded,
        "the record does not name the new pid {new}: {:?}\nlog:\n{}",
        orchestrator_core::state::read_state(&state),
        first.stderr_text()
    );
    // Log lines and events may fail to reach their files; the record not.
    let log = first.stderr_text();
    assert!(
        !log.lines()
            .any(|l| l.contains("cannot write") && l.contains(&state.display().to_string())),
        "{log}"
    );

    first.signal(nix::libc::SIGKILL);
    first.wait_exit();

    // A daemon restarted on the still full disk cleans up, and keeps its
    // record in the file reserved by the one before.
    let mut second = run_daemon(&dir);
    let newer = wait_running(&dir, &second);
    assert!(
        wait_until(DEADLINE, || !is_alive(new)),
        "the process of the killed daemon still runs beside the new one"
    );
    let recorded = wait_until(DEADLINE, || {
        orchestrator_core::state::read_state(&state)
            .ok()
            .flatten()
            .is_some_and(|s| s.services.get("api").map(|r| r.pid) == Some(newer))
    });
    assert!(
        recorded,
        "the record does not name {newer}: {:?}\nlog:\n{}",
        orchestrator_core::state::read_state(&state),
        second.stderr_text()
    );
    second.signal(nix::libc::SIGKILL);
    second.wait_exit();

    std::fs::remove_file(data.join("filler")).unwrap();
    let mut third = run_daemon(&dir);
    let newest = wait_running(&dir, &third);
    assert!(
        wait_until(DEADLINE, || !is_alive(newer)),
        "the process of the second killed daemon still runs beside the new one"
    );
    assert_eq!(live_processes_with_home(&home), vec![newest]);
    shutdown(&dir, &mut third);
}

// ---------------------------------------------------------------------------
// A careless operator, a squatter

/// data_dir on a read-only file system: refused at once with the reason,
/// not a daemon that runs services it can never record.
#[test]
fn a_read_only_data_dir_is_refused_with_the_reason() {
    let dir = workspace("trust-ro", "data_dir = \"data\"");
    let data = dir.join("data");
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    std::fs::create_dir(data.join("logs")).unwrap();
    chmod(&data.join("logs"), 0o700);
    let _mount = match Tmpfs::bind_read_only(&data) {
        Ok(mount) => mount,
        Err(reason) => {
            eprintln!("SKIPPED a_read_only_data_dir_is_refused_with_the_reason: {reason}");
            return;
        }
    };
    let mut daemon = run_daemon(&dir);
    assert_eq!(daemon.wait_exit().code(), Some(1));
    let log = daemon.stderr_text();
    assert!(log.contains("Read-only file system"), "{log}");
    assert!(live_processes_with_home(&dir.service_data_dir("api")).is_empty());
}

/// The lock's abstract name held by a process that is not a daemon (a
/// squatter): the daemon refuses to run and names the holder's pid, rather
/// than running without its guarantee.
#[test]
fn a_held_lock_name_is_refused_naming_its_holder() {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixListener};
    let dir = workspace("trust-squat", "");
    let data = dir.data_dir();
    std::fs::create_dir(&data).unwrap();
    chmod(&data, 0o700);
    let name = format!("orchestrator-lock:{}", data.display());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let _squatter = UnixListener::bind_addr(&addr).unwrap();
    let mut daemon = run_daemon(&dir);
    assert_eq!(daemon.wait_exit().code(), Some(1));
    let log = daemon.stderr_text();
    assert!(
        log.contains(&format!("(pid {})", std::process::id())),
        "{log}"
    );
    assert!(live_processes_with_home(&dir.service_data_dir("api")).is_empty());
}
