//! cgroups for real: the hierarchies of this host, as root. Each test says
//! why on stderr and returns where it cannot run (not root, hierarchy not
//! mounted). Parents are unique per test and removed even on failure.

use std::collections::BTreeSet;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use orchestrator_core::cgroup::{
    Flavor, Host, Limits, ResourceController, ServiceCgroup, Settings, detect_with,
    kill_until_empty,
};

/// Generous: the suite also runs on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);

fn unique_parent(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "orch-test-{}-{}-{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn is_root() -> bool {
    orchestrator_core::state::our_uid() == 0
}

fn mountinfo() -> String {
    std::fs::read_to_string("/proc/self/mountinfo").unwrap()
}

/// The real host, when it has a v1 pids hierarchy and we are root.
fn v1_host() -> Option<Host> {
    if !is_root() {
        eprintln!("skipped: cgroup tests need root");
        return None;
    }
    let has_pids = mountinfo().lines().any(|line| {
        line.split_once(" - ")
            .is_some_and(|(_, fs)| fs.starts_with("cgroup ") && fs.contains("pids"))
    });
    if !has_pids {
        eprintln!("skipped: no cgroup v1 pids hierarchy is mounted here");
        return None;
    }
    Some(Host::default())
}

/// The host seen with only its cgroup2 mount: on a hybrid host, the empty
/// unified hierarchy used as a v2 root.
fn v2_host(files: &Path) -> Option<Host> {
    if !is_root() {
        eprintln!("skipped: cgroup tests need root");
        return None;
    }
    let Some(line) = mountinfo()
        .lines()
        .find(|line| {
            line.split_once(" - ")
                .is_some_and(|(_, fs)| fs.starts_with("cgroup2 "))
        })
        .map(str::to_owned)
    else {
        eprintln!("skipped: no cgroup2 hierarchy is mounted here");
        return None;
    };
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own.lines().find(|line| line.starts_with("0::")).unwrap();
    std::fs::write(files.join("mountinfo"), format!("{line}\n")).unwrap();
    std::fs::write(files.join("cgroup"), format!("{own}\n")).unwrap();
    Some(Host {
        mountinfo: files.join("mountinfo"),
        self_cgroup: files.join("cgroup"),
        root: PathBuf::from("/"),
        pid: std::process::id(),
    })
}

/// Kills and removes what a test made, even when it fails half-way.
/// Declared after the controller, so dropped before it (the controller's
/// drop removes the parent, which must be empty by then).
#[derive(Default)]
struct Cleanup {
    cgroups: Vec<Arc<dyn ServiceCgroup>>,
    children: Vec<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for cgroup in &self.cgroups {
            let _ = kill_until_empty(&**cgroup, DEADLINE);
            let _ = cgroup.remove();
            // Where no controller is left to remove its parent (after a
            // failure half-way through the sweep test).
            if let Some(parent) = cgroup.path().parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `sh -c script`, joined to `cgroup` before exec the way the spawner does
/// it: "0" written to each join fd in the child.
fn spawn_joined(cgroup: &Arc<dyn ServiceCgroup>, script: &str) -> Child {
    let joined = cgroup.open_join().unwrap();
    let mut command = Command::new("/bin/sh");
    command.args(["-c", script]);
    // SAFETY: the hook runs in the child between fork and exec; it only
    // reads a slice of fds opened before the fork and calls write(2) on
    // them: no allocation, no lock.
    unsafe {
        command.pre_exec(move || {
            for fd in &joined {
                rustix::io::write(fd, b"0")?;
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

/// A service that escapes its process group and session: a `setsid` child,
/// a double-forked one, and the shell exec'ed into a sleep.
const ESCAPEES: &str = "setsid sleep 300 & (sleep 300 &); exec sleep 300";

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Waits until the cgroup holds exactly `count` processes, all `sleep`.
fn wait_for_sleepers(cgroup: &dyn ServiceCgroup, count: usize) -> Vec<u32> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let pids = cgroup.pids().unwrap();
        if pids.len() == count && pids.iter().all(|&pid| comm(pid) == "sleep") {
            return pids;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} sleeps in {}, found {pids:?}",
            cgroup.path().display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Gone, or a zombie waiting for its reaper: nothing runs.
fn is_dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
    }
}

/// The path of `pid`'s cgroup in the hierarchy whose line in
/// /proc/PID/cgroup has `controllers` ("" for v2).
fn cgroup_of(pid: u32, controllers: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let _id = parts.next()?;
        (parts.next()? == controllers).then(|| parts.next().unwrap().to_owned())
    })
}

/// The controller a daemon with this parent and data_dir would get on `host`.
fn detect_in(parent: &Path, data_dir: &Path, host: &Host) -> Arc<dyn ResourceController> {
    detect_with(
        &Settings {
            cgroup_parent: parent,
            data_dir,
            parent_lock_inherited: false,
        },
        host,
    )
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    std::fs::read_to_string(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .trim()
        .to_owned()
}

/// Kill, wait until empty, remove; then none of `pids` runs.
fn stop(cgroup: &dyn ServiceCgroup, child: &mut Child, pids: &[u32]) {
    assert!(
        kill_until_empty(cgroup, DEADLINE).unwrap(),
        "still populated"
    );
    cgroup.remove().unwrap();
    assert!(!cgroup.path().exists());
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    let deadline = Instant::now() + DEADLINE;
    while !pids.iter().all(|&pid| is_dead(pid)) {
        assert!(Instant::now() < deadline, "survivors among {pids:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn v1_limits_are_written_and_nothing_outlives_the_kill() {
    let Some(host) = v1_host() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let parent = unique_parent("v1");
    let controller = detect_in(Path::new(&parent), data_dir.path(), &host);
    let mut cleanup = Cleanup::default();
    assert_eq!(controller.flavor(), Flavor::V1);
    let limits = Limits {
        memory_mib: Some(64),
        cpu_millicores: Some(1500),
        pids: Some(50),
    };
    let placement = controller.create("svc", &limits).unwrap();
    assert_eq!(placement.unenforced, Vec::new());
    assert_eq!(placement.join.len(), 3, "pids, memory and cpu");
    let cgroup = placement.cgroup.unwrap();
    cleanup.cgroups.push(Arc::clone(&cgroup));
    assert_eq!(cgroup.open_join().unwrap().len(), 3);
    assert_eq!(read(cgroup.path().join("pids.max")), "50");

    cleanup.children.push(spawn_joined(&cgroup, ESCAPEES));
    let pids = wait_for_sleepers(&*cgroup, 3);
    // Each joined the three hierarchies before exec.
    for &pid in &pids {
        for controllers in ["pids", "memory", "cpu"] {
            let path = cgroup_of(pid, controllers).unwrap();
            assert!(
                path.ends_with(&format!("/{parent}/svc")),
                "{pid} is in {controllers}:{path}"
            );
        }
    }
    let memory = PathBuf::from(format!(
        "/sys/fs/cgroup/memory{}",
        cgroup_of(pids[0], "memory").unwrap()
    ));
    assert_eq!(read(memory.join("memory.limit_in_bytes")), "67108864");
    if memory.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(read(memory.join("memory.memsw.limit_in_bytes")), "67108864");
    }
    let cpu = PathBuf::from(format!(
        "/sys/fs/cgroup/cpu{}",
        cgroup_of(pids[0], "cpu").unwrap()
    ));
    assert_eq!(read(cpu.join("cpu.cfs_period_us")), "100000");
    assert_eq!(read(cpu.join("cpu.cfs_quota_us")), "150000");
    assert!(cgroup.usage().memory_bytes.is_some());

    let mut child = cleanup.children.pop().unwrap();
    stop(&*cgroup, &mut child, &pids);
    assert!(!memory.exists() && !cpu.exists());
}

#[test]
fn v1_an_oom_kill_is_counted() {
    let Some(host) = v1_host() else { return };
    let data_dir = tempfile::tempdir().unwrap();
    let parent = unique_parent("oom");
    let controller = detect_in(Path::new(&parent), data_dir.path(), &host);
    let mut cleanup = Cleanup::default();
    let limits = Limits {
        memory_mib: Some(16),
        ..Limits::default()
    };
    let placement = controller.create("hog", &limits).unwrap();
    assert_eq!(placement.unenforced, Vec::new());
    let cgroup = placement.cgroup.unwrap();
    cleanup.cgroups.push(Arc::clone(&cgroup));
    // tail keeps every byte of a file without newlines in memory.
    let mut child = spawn_joined(&cgroup, "exec tail /dev/zero");
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(cgroup.oom_kills() >= 1, "{status:?}");
}

#[test]
fn v2_containment_and_limits_it_cannot_take() {
    let files = tempfile::tempdir().unwrap();
    let Some(host) = v2_host(files.path()) else {
        return;
    };
    let parent = unique_parent("v2");
    let controller = detect_in(Path::new(&parent), files.path(), &host);
    let mut cleanup = Cleanup::default();
    assert_eq!(controller.flavor(), Flavor::V2);
    let limits = Limits {
        memory_mib: Some(64),
        cpu_millicores: Some(500),
        pids: Some(50),
    };
    let placement = controller.create("svc", &limits).unwrap();
    let cgroup = placement.cgroup.unwrap();
    cleanup.cgroups.push(Arc::clone(&cgroup));
    let available = read(cgroup.path().parent().unwrap().join("cgroup.controllers"));
    for (limit, controller, file, value) in [
        ("memory_limit", "memory", "memory.max", "67108864"),
        ("cpu_limit", "cpu", "cpu.max", "50000 100000"),
        ("pids_limit", "pids", "pids.max", "50"),
    ] {
        let reason = placement.unenforced.iter().find(|u| u.limit == limit);
        if available.split_whitespace().any(|c| c == controller) {
            assert!(reason.is_none(), "{reason:?}");
            assert_eq!(read(cgroup.path().join(file)), value);
        } else {
            // The hybrid host's unified hierarchy has none of them.
            let reason = reason.expect("reported as unenforced");
            assert!(reason.reason.contains(controller), "{reason}");
            eprintln!("as expected here: {reason}");
        }
    }

    cleanup.children.push(spawn_joined(&cgroup, ESCAPEES));
    let pids = wait_for_sleepers(&*cgroup, 3);
    let relative = format!("/{parent}/svc");
    for &pid in &pids {
        let path = cgroup_of(pid, "").unwrap();
        assert!(path.ends_with(&relative), "{pid} is in {path}");
    }
    assert!(!cgroup.is_empty().unwrap());
    let mut child = cleanup.children.pop().unwrap();
    stop(&*cgroup, &mut child, &pids);
}

#[test]
fn a_second_daemon_on_the_same_parent_takes_the_hashed_one() {
    if !is_root() {
        eprintln!("skipped: cgroup tests need root");
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let parent = unique_parent("twice");
    let settings = Settings {
        cgroup_parent: Path::new(&parent),
        data_dir: data_dir.path(),
        parent_lock_inherited: false,
    };
    let first = detect_with(&settings, &Host::default());
    if first.flavor() == Flavor::None {
        eprintln!("skipped: no cgroup hierarchy usable here");
        return;
    }
    let second = detect_with(&settings, &Host::default());
    assert_eq!(second.flavor(), first.flavor());
    let mut cleanup = Cleanup::default();
    let a = first
        .create("svc", &Limits::default())
        .unwrap()
        .cgroup
        .unwrap();
    cleanup.cgroups.push(Arc::clone(&a));
    let b = second
        .create("svc", &Limits::default())
        .unwrap()
        .cgroup
        .unwrap();
    cleanup.cgroups.push(Arc::clone(&b));
    assert!(
        a.path().ends_with(format!("{parent}/svc")),
        "{}",
        a.path().display()
    );
    let hashed = b.path().parent().unwrap().file_name().unwrap();
    let hashed = hashed.to_str().unwrap();
    let suffix = hashed.strip_prefix(&format!("{parent}-")).unwrap();
    assert!(suffix.len() == 8 && suffix.chars().all(|c| c.is_ascii_hexdigit()));
    // Both hold their locks: a third has nowhere to go.
    let third = detect_with(&settings, &Host::default());
    assert_eq!(third.flavor(), Flavor::None);
    drop(third);
    drop(cleanup);
    drop(second);
    // Its parent went with it.
    assert!(!b.path().parent().unwrap().exists());
}

#[test]
fn the_next_daemon_kills_what_a_killed_one_left() {
    if !is_root() {
        eprintln!("skipped: cgroup tests need root");
        return;
    }
    let data_dir = tempfile::tempdir().unwrap();
    let parent = unique_parent("sweep");
    let settings = Settings {
        cgroup_parent: Path::new(&parent),
        data_dir: data_dir.path(),
        parent_lock_inherited: false,
    };
    let first = detect_with(&settings, &Host::default());
    if first.flavor() == Flavor::None {
        eprintln!("skipped: no cgroup hierarchy usable here");
        return;
    }
    let mut cleanup = Cleanup::default();
    let cgroup = first
        .create("svc", &Limits::default())
        .unwrap()
        .cgroup
        .unwrap();
    cleanup.cgroups.push(Arc::clone(&cgroup));
    cleanup.children.push(spawn_joined(&cgroup, ESCAPEES));
    let pids = wait_for_sleepers(&*cgroup, 3);
    // What a SIGKILL of the daemon leaves: its lock released, the cgroup
    // and its processes still there.
    drop(first);
    assert!(cgroup.path().exists());

    // The lock is released once no process holds the socket; a child
    // another test forks in this process holds a copy until its exec, so
    // the next daemon may briefly find the name taken and fall back to the
    // hashed parent: wait for it to get the original one.
    let deadline = Instant::now() + DEADLINE;
    let next = loop {
        let next = detect_with(&settings, &Host::default());
        let probe = next
            .create("probe", &Limits::default())
            .unwrap()
            .cgroup
            .unwrap();
        probe.remove().unwrap();
        if probe.path().parent() == cgroup.path().parent() {
            break next;
        }
        assert!(Instant::now() < deadline, "the parent's lock stays held");
        drop(next);
        std::thread::sleep(Duration::from_millis(10));
    };
    // Only the named services' cgroups are swept: "other" stays.
    let other = next
        .create("other", &Limits::default())
        .expect("create a cgroup that is not a service of ours")
        .cgroup
        .expect("a cgroup");
    let known = BTreeSet::from(["svc".to_owned(), "probe".to_owned()]);
    let killed: BTreeSet<u32> = next.sweep_leftovers(&known).into_iter().collect();
    assert!(
        other.path().is_dir(),
        "a cgroup of an unknown name was swept"
    );
    other.remove().expect("remove the other cgroup");
    assert!(
        pids.iter().all(|pid| killed.contains(pid)),
        "{pids:?} not all in {killed:?}"
    );
    assert!(!cgroup.path().exists());
    let mut child = cleanup.children.pop().unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    let deadline = Instant::now() + DEADLINE;
    while !pids.iter().all(|&pid| is_dead(pid)) {
        assert!(Instant::now() < deadline, "survivors among {pids:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Not a check: what a service's cgroup costs. `cargo test --test cgroup
/// -- --ignored --nocapture cost`.
#[test]
#[ignore]
fn cost_of_a_service_cgroup() {
    const ROUNDS: u32 = 200;
    let files = tempfile::tempdir().unwrap();
    let hosts = [v1_host(), v2_host(files.path())];
    // The same spawn without a cgroup, for the difference.
    let started = Instant::now();
    for _ in 0..ROUNDS / 4 {
        let mut command = Command::new("/bin/sh");
        command.args(["-c", "exit 0"]);
        // SAFETY: an empty hook, only to take the same fork path.
        unsafe {
            command.pre_exec(|| Ok(()));
        }
        command.spawn().unwrap().wait().unwrap();
    }
    eprintln!(
        "without a cgroup: spawn(sh)+wait {:?}",
        started.elapsed() / (ROUNDS / 4)
    );
    for host in hosts.into_iter().flatten() {
        let data_dir = tempfile::tempdir().unwrap();
        let parent = unique_parent("cost");
        let controller = detect_in(Path::new(&parent), data_dir.path(), &host);
        for (label, limits) in [
            ("no limits", Limits::default()),
            (
                "all limits",
                Limits {
                    memory_mib: Some(64),
                    cpu_millicores: Some(500),
                    pids: Some(50),
                },
            ),
        ] {
            let started = Instant::now();
            for _ in 0..ROUNDS {
                let cgroup = controller.create("svc", &limits).unwrap().cgroup.unwrap();
                cgroup.remove().unwrap();
            }
            let bare = started.elapsed() / ROUNDS;
            let started = Instant::now();
            for _ in 0..ROUNDS / 4 {
                let cgroup = controller.create("svc", &limits).unwrap().cgroup.unwrap();
                let mut child = spawn_joined(&cgroup, "exit 0");
                child.wait().unwrap();
                assert!(kill_until_empty(&*cgroup, DEADLINE).unwrap());
                cgroup.remove().unwrap();
            }
            let spawned = started.elapsed() / (ROUNDS / 4);
            eprintln!(
                "{}: {label}: create+remove {bare:?}; create+spawn(sh, joined)+wait+remove {spawned:?}",
                controller.flavor().as_str()
            );
        }
    }
}
