//! Releasing a running service's leader and adopting it again, with real
//! processes (the hand-over of an in-place upgrade, done here within one
//! process): nothing is signalled, no line of output is lost, and the
//! adopted child is supervised as a spawned one. The services are `/bin/sh`
//! scripts: the core crate cannot use the e2e crate's fixture, and sh is
//! what the other tests here run too.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator_core::cgroup::{Flavor, Host, Limits, ResourceController, Settings, detect_with};
use orchestrator_core::process::{
    AdoptError, ChildOutput, ExitReason, Released, Signal, SpawnSpec, Spawner, UnixSpawner,
    cgroup_removals_settled, reap_orphans,
};
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe::Receiver;

/// Only turns a hang into a failure: a loaded CI machine never gets near it.
const DEADLINE: Duration = Duration::from_secs(20);

/// Prints `line N` (N = 0, 1, ...) until the file `stop` appears in its
/// directory, then exits with 3.
const NUMBERED: &str =
    "i=0; while [ ! -e stop ]; do echo \"line $i\"; i=$((i+1)); sleep 0.01; done; exit 3";

fn sh(service: &str, dir: &Path, script: &str) -> SpawnSpec {
    SpawnSpec {
        service: service.to_owned(),
        program: "/bin/sh".into(),
        args: vec!["-c".to_owned(), script.to_owned()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.to_owned(),
        ..SpawnSpec::default()
    }
}

/// Reads whole lines from a pipe, a byte at a time so that nothing past
/// the line is taken from the pipe: what is left is for the next reader.
struct Lines(Receiver);

impl Lines {
    fn new(fd: OwnedFd) -> Lines {
        Lines(Receiver::from_owned_fd(fd).expect("a pipe's read end"))
    }

    async fn next(&mut self) -> String {
        let mut line = Vec::new();
        loop {
            let byte = tokio::time::timeout(DEADLINE, self.0.read_u8())
                .await
                .expect("no output within the deadline")
                .expect("the pipe ended");
            if byte == b'\n' {
                return String::from_utf8(line).unwrap();
            }
            line.push(byte);
        }
    }

    fn into_fd(self) -> OwnedFd {
        self.0.into_blocking_fd().unwrap()
    }
}

/// The state letter of /proc/PID/stat; `None` once the pid is gone.
fn state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Gone, or a zombie its new parent has not reaped yet: dead either way.
fn is_dead(pid: u32) -> bool {
    matches!(state(pid), None | Some('Z'))
}

fn released_output(released: &mut Released) -> (Lines, Lines) {
    let ChildOutput { stdout, stderr } = released.output.take().expect("the pipes come back");
    (Lines::new(stdout), Lines::new(stderr))
}

#[tokio::test]
async fn a_released_child_runs_on_and_its_adoption_stops_it_with_no_line_lost() {
    let dir = tempfile::tempdir().unwrap();
    let spawner = UnixSpawner::plain();
    let child = spawner
        .spawn(&sh("numbered", dir.path(), NUMBERED))
        .unwrap();
    let pid = child.pid();
    let mut released = child.release().expect("a service's leader is released");
    assert_eq!(released.pid, pid);
    assert!(released.pidfd.is_some(), "this kernel has pidfds");
    assert!(released.cgroup.is_none());

    // Still running and still writing: nothing was signalled, the pipes
    // were not closed.
    let (mut stdout, stderr) = released_output(&mut released);
    for n in 0..5 {
        assert_eq!(stdout.next().await, format!("line {n}"));
    }
    assert_eq!(state(pid).map(|s| s != 'Z'), Some(true), "pid {pid} runs");
    released.output = Some(ChildOutput {
        stdout: stdout.into_fd(),
        stderr: stderr.into_fd(),
    });

    let mut adopted = spawner.adopt(released, "numbered").expect("adopted");
    assert_eq!(adopted.pid(), pid);
    let output = adopted.take_output().expect("the pipes handed over");
    let mut stdout = Lines::new(output.stdout);
    for n in 5..10 {
        assert_eq!(stdout.next().await, format!("line {n}"), "no line lost");
    }
    adopted.signal_group(Signal::SIGTERM).unwrap();
    let reason = tokio::time::timeout(DEADLINE, adopted.wait())
        .await
        .expect("wait returns")
        .unwrap();
    assert_eq!(
        reason,
        ExitReason::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }
    );
    assert_eq!(state(pid), None, "reaped by wait");
}

/// Dying while released (during an exec, in a real upgrade), the leader
/// stays a zombie for its adopter: the orphan reaper leaves it alone, and
/// the adopted child's wait reports its exit and kills what is left in its
/// group.
#[tokio::test]
async fn an_exit_while_released_is_reported_by_the_adopter_and_its_group_dies() {
    let dir = tempfile::tempdir().unwrap();
    let spawner = UnixSpawner::plain();
    let script = format!("sleep 1000 & echo \"grandchild $!\"; {NUMBERED}");
    let child = spawner.spawn(&sh("ending", dir.path(), &script)).unwrap();
    let pid = child.pid();
    let mut released = child.release().unwrap();
    let (mut stdout, stderr) = released_output(&mut released);
    let grandchild: u32 = stdout
        .next()
        .await
        .strip_prefix("grandchild ")
        .expect("the grandchild's pid first")
        .parse()
        .unwrap();
    assert_eq!(stdout.next().await, "line 0");

    std::fs::write(dir.path().join("stop"), "").unwrap();
    until("the released leader exits", || state(pid) == Some('Z')).await;
    reap_orphans();
    assert_eq!(
        state(pid),
        Some('Z'),
        "the orphan reaper took the exit of a released leader"
    );
    assert!(!is_dead(grandchild), "the grandchild runs on until adopted");

    released.output = Some(ChildOutput {
        stdout: stdout.into_fd(),
        stderr: stderr.into_fd(),
    });
    let mut adopted = spawner
        .adopt(released, "ending")
        .expect("a zombie is adopted");
    let reason = tokio::time::timeout(DEADLINE, adopted.wait())
        .await
        .expect("wait returns")
        .unwrap();
    assert_eq!(reason, ExitReason::Exited(3));
    until("the grandchild dies with its group", || is_dead(grandchild)).await;
}

#[tokio::test]
async fn adopting_what_is_not_the_released_child_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spawner = UnixSpawner::plain();
    let released = |pid: u32, pidfd: Option<OwnedFd>| Released {
        pid,
        cgroup: None,
        killed_by_us: false,
        oom_kills_at_start: 0,
        memory_limit_mib: None,
        pidfd,
        output: None,
    };

    // Not our child at all.
    let error = spawner.adopt(released(1, None), "init").err().unwrap();
    assert!(
        matches!(error, AdoptError::NotOurs { pid: 1, .. }),
        "{error}"
    );
    let text = error.to_string();
    assert!(text.contains("not a child of this process"), "{text}");
    assert!(text.contains("PID-reuse guard"), "{text}");

    // Our child, but the pidfd handed over with it is another's.
    let first = spawner
        .spawn(&sh("first", dir.path(), "sleep 1000"))
        .unwrap()
        .release()
        .unwrap();
    let mut second = spawner
        .spawn(&sh("second", dir.path(), "sleep 1000"))
        .unwrap()
        .release()
        .unwrap();
    let (first_pid, second_pid) = (first.pid, second.pid);
    let error = spawner
        .adopt(released(first_pid, second.pidfd.take()), "first")
        .err()
        .unwrap();
    let text = error.to_string();
    assert!(
        text.contains(&format!("refers to pid {second_pid}")),
        "{text}"
    );
    // Refused, and not touched.
    assert_eq!(state(first_pid).map(|s| s != 'Z'), Some(true));

    // Without a pidfd, one is opened for the verified child.
    let mut adopted_first = spawner.adopt(released(first_pid, None), "first").unwrap();
    // Not twice.
    let error = spawner
        .adopt(released(first_pid, None), "first")
        .err()
        .unwrap();
    assert!(
        error.to_string().contains("supervises it already"),
        "{error}"
    );
    let mut adopted_second = spawner.adopt(second, "second").unwrap();
    for adopted in [&mut adopted_first, &mut adopted_second] {
        adopted.signal_group(Signal::SIGKILL).unwrap();
        let reason = tokio::time::timeout(DEADLINE, adopted.wait())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            reason,
            ExitReason::Signaled {
                signal: libc::SIGKILL,
                core_dumped: false
            }
        );
    }
    drop(first);

    // Reaped since it was released: its pid may be anyone's now.
    let mut gone = spawner
        .spawn(&sh("gone", dir.path(), "exit 0"))
        .unwrap()
        .release()
        .unwrap();
    let gone_pid = gone.pid;
    let pidfd = gone.pidfd.take();
    let pid = rustix::process::Pid::from_raw(gone_pid as i32).unwrap();
    let deadline = Instant::now() + DEADLINE;
    while rustix::process::waitpid(Some(pid), rustix::process::WaitOptions::NOHANG)
        .unwrap()
        .is_none()
    {
        assert!(Instant::now() < deadline, "pid {gone_pid} never exited");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let error = spawner
        .adopt(released(gone_pid, pidfd), "gone")
        .err()
        .unwrap();
    assert!(matches!(error, AdoptError::NotOurs { .. }), "{error}");
}

/// Kills what a failed test left in its cgroup, before the controller's
/// drop removes the parent.
struct CgroupCleanup(Option<PathBuf>);

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        let Some(dir) = &self.0 else { return };
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) takes no memory of ours; these pids are
                // in the test's own cgroup, nobody else's.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + DEADLINE;
        while std::fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Where a v1 memory hierarchy is mounted apart: the service's directory
/// there.
fn v1_memory_dir(parent: &str, service: &str) -> Option<PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let own = own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        let controllers = parts.next()?;
        (controllers.split(',').any(|c| c == "memory")).then(|| parts.next().unwrap().to_owned())
    })?;
    let mount = Path::new("/sys/fs/cgroup/memory");
    mount.join("cgroup.procs").exists().then(|| {
        mount
            .join(own.trim_start_matches('/'))
            .join(parent)
            .join(service)
    })
}

/// With cgroups (root on this host): the cgroup survives the release, comes
/// back with the adoption, and is emptied (a setsid descendant that left
/// the process group included) and removed after the exit.
#[tokio::test]
async fn an_adopted_childs_cgroup_is_emptied_and_removed_after_its_exit() {
    if orchestrator_core::state::our_uid() != 0 {
        eprintln!("skipped: cgroups need root");
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let parent = format!("orch-test-{}-adopt", std::process::id());
    let controller: Arc<dyn ResourceController> = detect_with(
        &Settings {
            cgroup_parent: Path::new(&parent),
            data_dir: data_dir.path(),
            parent_lock_inherited: false,
        },
        &Host::default(),
    );
    if controller.flavor() == Flavor::None {
        eprintln!("skipped: no cgroup hierarchy usable here");
        return;
    }
    let spawner = UnixSpawner::new(Arc::clone(&controller), false);
    let script = format!("setsid sleep 1000 & echo \"escaped $!\"; {NUMBERED}");
    let spec = SpawnSpec {
        limits: Limits {
            memory_mib: Some(256),
            ..Limits::default()
        },
        ..sh("contained", data_dir.path(), &script)
    };
    let child = spawner.spawn(&spec).unwrap();
    let mut cleanup = CgroupCleanup(child.cgroup().map(|c| c.path().to_owned()));
    let pid = child.pid();
    let mut released = child.release().unwrap();
    let path = released.cgroup.clone().expect("its cgroup's path");
    assert_eq!(cleanup.0.as_deref(), Some(path.as_path()));
    let (mut stdout, stderr) = released_output(&mut released);
    let escaped: u32 = stdout
        .next()
        .await
        .strip_prefix("escaped ")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(stdout.next().await, "line 0");
    let procs = std::fs::read_to_string(path.join("cgroup.procs")).unwrap();
    assert!(
        procs.lines().any(|line| line == pid.to_string()),
        "the released leader is still in {}",
        path.display()
    );

    released.output = Some(ChildOutput {
        stdout: stdout.into_fd(),
        stderr: stderr.into_fd(),
    });
    let mut adopted = spawner.adopt(released, "contained").unwrap();
    let cgroup = adopted.cgroup().expect("its cgroup is adopted");
    assert_eq!(cgroup.path(), path);
    assert!(cgroup.pids().unwrap().contains(&escaped));
    assert!(
        controller
            .adopt("contained", &path.with_file_name("elsewhere"))
            .is_none(),
        "only the service's own cgroup under our parent is adopted"
    );
    assert!(
        cgroup.usage().memory_bytes.is_some(),
        "its memory cgroup is adopted too"
    );
    drop(cgroup);

    adopted.signal_group(Signal::SIGTERM).unwrap();
    let reason = tokio::time::timeout(DEADLINE, adopted.wait())
        .await
        .expect("wait returns")
        .unwrap();
    assert_eq!(
        reason,
        ExitReason::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        }
    );
    assert!(adopted.cgroup().is_none(), "cleaned up by wait");
    until("the setsid descendant is killed", || is_dead(escaped)).await;
    cgroup_removals_settled(DEADLINE).await;
    until("the cgroup is removed", || !path.exists()).await;
    if let Some(memory) = v1_memory_dir(&parent, "contained") {
        until("the memory cgroup is removed", || !memory.exists()).await;
    }
    cleanup.0 = None;
    drop(adopted);
    drop(spawner);
    drop(controller);
}

/// Pipes taken before the release are the taker's to hand over.
#[tokio::test]
async fn a_release_returns_the_pipes_not_yet_taken_only() {
    let dir = tempfile::tempdir().unwrap();
    let spawner = UnixSpawner::plain();
    let mut child = spawner
        .spawn(&sh("taken", dir.path(), "echo hello; sleep 1000"))
        .unwrap();
    let output = child.take_output().unwrap();
    let released = child.release().unwrap();
    assert!(released.output.is_none(), "taken before: not handed back");
    let mut lines = Lines::new(output.stdout);
    assert_eq!(lines.next().await, "hello");
    assert!(released.pidfd.is_some());
    let mut adopted = spawner.adopt(released, "taken").unwrap();
    assert!(adopted.take_output().is_none());
    adopted.signal_group(Signal::SIGKILL).unwrap();
    tokio::time::timeout(DEADLINE, adopted.wait())
        .await
        .unwrap()
        .unwrap();
}

/// Ours and unreaped (its pidfd says so), but it left its process group
/// for another one of the session: signals to its group would miss it, so
/// it is not adopted (and not touched).
#[tokio::test]
async fn a_child_that_left_its_process_group_is_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let spawner = UnixSpawner::plain();
    let ours = rustix::process::getpgrp().as_raw_nonzero().get();
    let joined = dir.path().join("joined");
    let child = spawner
        .spawn(&sh(
            "wanderer",
            dir.path(),
            &format!(
                "exec perl -e 'setpgrp(0, {ours}) or die $!; open(my $f, \">\", \"{}\"); close($f); sleep 1000'",
                joined.display()
            ),
        ))
        .unwrap();
    until("the child moved to our group", || joined.exists()).await;
    let pid = child.pid();
    let mut released = child.release().unwrap();
    assert!(released.pidfd.is_some(), "released with its pidfd");
    let pidfd = released.pidfd.take();
    let error = spawner
        .adopt(
            Released {
                pid,
                cgroup: None,
                killed_by_us: false,
                oom_kills_at_start: 0,
                memory_limit_mib: None,
                pidfd,
                output: None,
            },
            "wanderer",
        )
        .err()
        .expect("refused");
    let text = error.to_string();
    assert!(
        text.contains(&format!(
            "does not lead its own process group (its group is {ours})"
        )),
        "{text}"
    );
    assert_eq!(state(pid).map(|s| s != 'Z'), Some(true), "not touched");
    // Cleaned up by pid: it is in our group now.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
}
