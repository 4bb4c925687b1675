//! What a service is held to before its first instruction, with real
//! processes: rlimits, the user it runs as, no_new_privs, the checksum of
//! its binary (and the very file that was hashed being what runs), the
//! strict check of who may write it, its cgroup, and which stage a failed
//! start names. Executables are written from other processes
//! (`write_executable`), so the tests here may run side by side.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use orchestrator_core::cgroup::{
    CgroupError, Flavor, Limits, NoCgroups, Placement, ResourceController, ServiceCgroup, Usage,
};
use orchestrator_core::config::{Rlimit, RlimitValue, Sha256};
use orchestrator_core::process::{
    ChildProcess, ExitReason, Signal, SpawnError, SpawnSpec, Spawner, StrictCheck, UnixSpawner,
    UserSpec, mark_inherited_fds_cloexec,
};
use orchestrator_e2e::*;

/// A spec for `program ARGS` in `dir`, with a PATH and nothing else set.
fn spec(dir: &TestDir, service: &str, program: &Path, args: &[&str]) -> SpawnSpec {
    SpawnSpec {
        service: service.to_owned(),
        program: program.to_owned(),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.path().to_owned(),
        ..SpawnSpec::default()
    }
}

fn sleeper(dir: &TestDir, service: &str) -> SpawnSpec {
    spec(dir, service, Path::new("/bin/sleep"), &["1000"])
}

/// Spawn `spec`, its group killed by `guard` if the test fails.
fn spawn(spawner: &UnixSpawner, guard: &ProcessGuard, spec: &SpawnSpec) -> Box<dyn ChildProcess> {
    let child = spawner
        .spawn(spec)
        .unwrap_or_else(|e| panic!("spawn {}: {e}", spec.service));
    guard.add_pgid(i32::try_from(child.pid()).unwrap());
    child
}

async fn kill_and_wait(mut child: Box<dyn ChildProcess>) -> ExitReason {
    child.signal_group(Signal::SIGKILL).unwrap();
    within("reap the child", child.wait()).await.unwrap()
}

fn spawn_error(spawner: &UnixSpawner, spec: &SpawnSpec) -> SpawnError {
    match spawner.spawn(spec) {
        Ok(child) => panic!("{} started as pid {}", spec.service, child.pid()),
        Err(error) => error,
    }
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for part in parts {
        assert!(text.contains(part), "{text:?} should mention {part:?}");
    }
}

fn skip_unless_root(test: &str) -> bool {
    if running_as_root() {
        return false;
    }
    eprintln!("{test}: skipped, it needs root");
    true
}

#[tokio::test]
async fn rlimits_are_in_place_at_exec() {
    let dir = TestDir::new("rlimits");
    let guard = ProcessGuard::new();
    // Lowering needs no privilege: these pass as any user.
    let spec = SpawnSpec {
        rlimits: vec![
            (Rlimit::Nofile, RlimitValue::Limited(256)),
            (Rlimit::Core, RlimitValue::Limited(0)),
            (Rlimit::Stack, RlimitValue::Limited(4 << 20)),
            (Rlimit::Cpu, RlimitValue::Limited(3600)),
            (Rlimit::Fsize, RlimitValue::Limited(1 << 30)),
        ],
        ..sleeper(&dir, "limited")
    };
    let child = spawn(&UnixSpawner::plain(), &guard, &spec);
    let pid = child.pid();
    for (row, value) in [
        ("Max open files", "256"),
        ("Max core file size", "0"),
        ("Max stack size", "4194304"),
        ("Max cpu time", "3600"),
        ("Max file size", "1073741824"),
    ] {
        let (soft, hard) = proc_limit(pid, row).unwrap_or_else(|| panic!("no {row} for {pid}"));
        assert_eq!((soft.as_str(), hard.as_str()), (value, value), "{row}");
    }
    // The daemon's own are untouched (the child shares its memory, not its limits).
    let (soft, _) = proc_limit(std::process::id(), "Max open files").unwrap();
    assert_ne!(soft, "256");
    kill_and_wait(child).await;
}

#[tokio::test]
async fn a_failing_child_step_names_the_service_and_its_stage() {
    let dir = TestDir::new("stages");
    let not_a_dir = dir.write_file("plain-file", "", 0o644);
    // An rlimit takes the spawn through the clone path, whose child reports
    // its own steps.
    let core = (Rlimit::Core, RlimitValue::Limited(0));
    let spec_in_file = SpawnSpec {
        cwd: not_a_dir.clone(),
        rlimits: vec![core],
        ..sleeper(&dir, "homeless")
    };
    let error = spawn_error(&UnixSpawner::plain(), &spec_in_file);
    assert!(matches!(error, SpawnError::Child { .. }), "{error:?}");
    assert_eq!(error.stage(), "chdir");
    assert_mentions(
        &error.to_string(),
        &[
            "service homeless",
            "stage \"chdir\"",
            "Not a directory",
            "data_dir",
        ],
    );

    // Above fs.nr_open: refused even to root.
    let spec_too_many = SpawnSpec {
        rlimits: vec![core, (Rlimit::Nofile, RlimitValue::Limited(1 << 40))],
        ..sleeper(&dir, "greedy")
    };
    let error = spawn_error(&UnixSpawner::plain(), &spec_too_many);
    assert_eq!(error.stage(), "rlimit nofile");
    assert_mentions(
        &error.to_string(),
        &[
            "service greedy",
            "stage \"rlimit nofile\"",
            "lower rlimits.nofile",
        ],
    );

    // An exec failure in the child is an exec failure, with its advice.
    let missing = SpawnSpec {
        rlimits: vec![core],
        ..spec(&dir, "ghost", &dir.join("no-such-binary"), &[])
    };
    let error = spawn_error(&UnixSpawner::plain(), &missing);
    assert_eq!(error.stage(), "exec");
    assert_mentions(&error.to_string(), &["service ghost", "no such file"]);
}

/// The uid, gid and groups of the process, and whether NoNewPrivs is set.
fn credentials(pid: u32) -> (Vec<String>, Vec<String>, Vec<String>, Vec<String>) {
    let words = |key| status_words(pid, key).unwrap_or_else(|| panic!("no {key} for {pid}"));
    (
        words("Uid"),
        words("Gid"),
        words("Groups"),
        words("NoNewPrivs"),
    )
}

/// Every thread of this (test) process is still root: the child's set*id
/// calls, made from memory it shares with us, changed nothing here.
fn assert_still_root() {
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        for key in ["Uid:", "Gid:"] {
            let line = status.lines().find(|l| l.starts_with(key)).unwrap_or(key);
            let ids: Vec<&str> = line.split_whitespace().skip(1).collect();
            assert!(
                ids.iter().all(|id| *id == "0"),
                "thread {:?} of the test lost root: {line}",
                task.file_name()
            );
        }
    }
}

#[tokio::test]
async fn a_service_runs_as_its_user_with_no_new_privs() {
    if skip_unless_root("a_service_runs_as_its_user_with_no_new_privs") {
        return;
    }
    let dir = TestDir::new("user");
    let guard = ProcessGuard::new();
    let spawner = UnixSpawner::plain();
    let strict = Some(StrictCheck {
        services_dir: dir.join("services"),
    });
    let nobody = |user: &str, group: Option<&str>| UserSpec {
        user: user.to_owned(),
        group: group.map(str::to_owned),
        owns_working_dir: false,
    };
    let ids = vec!["65534".to_owned(); 4];
    let groups_of_nobody = ["65534".to_owned()];

    // By name: the user's primary group and its supplementary groups
    // (nobody has none but its own).
    let by_name = SpawnSpec {
        user: Some(nobody("nobody", None)),
        strict: strict.clone(),
        ..sleeper(&dir, "by-name")
    };
    let child = spawn(&spawner, &guard, &by_name);
    let (uid, gid, groups, nnp) = credentials(child.pid());
    assert_eq!((uid, gid), (ids.clone(), ids.clone()));
    assert_eq!(groups, groups_of_nobody);
    assert_eq!(nnp, ["1"], "a service that is not root gets no_new_privs");
    assert_still_root();
    kill_and_wait(child).await;

    // By number, with strict = false: no no_new_privs.
    let by_number = SpawnSpec {
        user: Some(nobody("65534", Some("nogroup"))),
        strict: None,
        ..sleeper(&dir, "by-number")
    };
    let child = spawn(&spawner, &guard, &by_number);
    let (uid, gid, groups, nnp) = credentials(child.pid());
    assert_eq!((uid, gid), (ids.clone(), ids));
    assert_eq!(groups, groups_of_nobody);
    assert_eq!(nnp, ["0"], "strict = false opts out of no_new_privs");
    kill_and_wait(child).await;

    // Root stays root, without no_new_privs.
    let root = SpawnSpec {
        strict: strict.clone(),
        ..sleeper(&dir, "root")
    };
    let child = spawn(&spawner, &guard, &root);
    let (uid, _, _, nnp) = credentials(child.pid());
    assert_eq!(uid, ["0", "0", "0", "0"]);
    assert_eq!(nnp, ["0"]);
    kill_and_wait(child).await;

    let unknown = SpawnSpec {
        user: Some(nobody("no-such-user-anywhere", None)),
        ..sleeper(&dir, "stranger")
    };
    let error = spawn_error(&spawner, &unknown);
    assert_eq!(error.stage(), "user");
    assert_mentions(
        &error.to_string(),
        &["service stranger", "no such user \"no-such-user-anywhere\""],
    );
}

#[tokio::test]
async fn a_service_that_is_not_root_gets_no_new_privs_without_a_user_too() {
    // As the daemon run by an ordinary user: only when the tests are.
    if running_as_root() {
        eprintln!(
            "a_service_that_is_not_root_gets_no_new_privs_without_a_user_too: skipped as root"
        );
        return;
    }
    let dir = TestDir::new("nnp");
    let guard = ProcessGuard::new();
    let spec = SpawnSpec {
        strict: Some(StrictCheck {
            services_dir: dir.join("services"),
        }),
        ..sleeper(&dir, "plain")
    };
    let child = spawn(&UnixSpawner::plain(), &guard, &spec);
    assert_eq!(credentials(child.pid()).3, ["1"]);
    kill_and_wait(child).await;
}

fn digest(hex: &str) -> Sha256 {
    Sha256::from_hex(hex).expect("64 hex digits")
}

#[tokio::test]
async fn a_checksum_mismatch_never_runs_the_binary() {
    let dir = TestDir::new("checksum");
    let guard = ProcessGuard::new();
    let marker = dir.join("ran");
    let script = dir.join("services/sum/sum");
    write_executable(
        &script,
        &format!(
            "#!/bin/sh\ntouch '{}'\necho \"ran as $0\"\n",
            marker.display()
        ),
        0o755,
    );
    let right = digest(&sha256_hex(&script));
    let wrong = digest(&"ab".repeat(32));
    let spawner = UnixSpawner::plain();

    let mismatch = SpawnSpec {
        sha256: Some(wrong),
        ..spec(&dir, "sum", &script, &[])
    };
    let error = spawn_error(&spawner, &mismatch);
    assert_eq!(error.stage(), "checksum");
    let text = error.to_string();
    assert!(
        text.starts_with(&format!("checksum mismatch: expected {wrong} got {right}")),
        "{text}"
    );
    assert_mentions(&text, &["service sum", &script.display().to_string()]);
    // Nothing was started at all: the error came before any process.
    assert!(!marker.exists(), "the mismatching binary ran");

    // The right digest runs it, a script through the descriptor that was
    // hashed (its interpreter reads /dev/fd/N).
    let matching = SpawnSpec {
        sha256: Some(right),
        ..mismatch
    };
    let mut child = spawn(&spawner, &guard, &matching);
    let output = child.take_output().unwrap();
    let line = first_line(output.stdout);
    assert!(line.starts_with("ran as /dev/fd/"), "{line}");
    assert_eq!(
        within("wait", child.wait()).await.unwrap(),
        ExitReason::Exited(0)
    );
    assert!(marker.exists());
}

#[tokio::test]
async fn a_binary_swapped_after_its_hash_is_not_what_runs() {
    let dir = TestDir::new("swap");
    let guard = ProcessGuard::new();
    let spawner = UnixSpawner::plain();
    let impostor = dir.join("impostor");
    write_executable(&impostor, "#!/bin/sh\necho SWAPPED\n", 0o755);

    // A real binary (the fixture), hashed, then replaced by a rename.
    let binary = dir.join("services/elf/elf");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    copy_executable(&fixture_bin(), &binary);
    let elf = SpawnSpec {
        sha256: Some(digest(&sha256_hex(&binary))),
        ..spec(
            &dir,
            "elf",
            &binary,
            &["--print", "ORIGINAL", "--exit", "0"],
        )
    };
    let prepared = spawner.prepare(&elf).unwrap();
    std::fs::rename(&impostor, &binary).unwrap();
    let mut child = spawner.launch(prepared).unwrap();
    guard.add_pgid(i32::try_from(child.pid()).unwrap());
    let output = child.take_output().unwrap();
    assert_eq!(first_line(output.stdout), "ORIGINAL");
    within("wait", child.wait()).await.unwrap();
    // The next start hashes the new file, and refuses it.
    assert_eq!(spawn_error(&spawner, &elf).stage(), "checksum");

    // A script the same way: its interpreter reads the hashed file too.
    let script = dir.join("services/sh/sh");
    write_executable(&script, "#!/bin/sh\necho ORIGINAL\n", 0o755);
    write_executable(&impostor, "#!/bin/sh\necho SWAPPED\n", 0o755);
    let sh = SpawnSpec {
        sha256: Some(digest(&sha256_hex(&script))),
        ..spec(&dir, "sh", &script, &[])
    };
    let prepared = spawner.prepare(&sh).unwrap();
    std::fs::rename(&impostor, &script).unwrap();
    let mut child = spawner.launch(prepared).unwrap();
    guard.add_pgid(i32::try_from(child.pid()).unwrap());
    let output = child.take_output().unwrap();
    assert_eq!(read_to_end(output.stdout), "ORIGINAL\n");
    within("wait", child.wait()).await.unwrap();
}

#[tokio::test]
async fn strict_refuses_what_others_may_write() {
    if skip_unless_root("strict_refuses_what_others_may_write") {
        return;
    }
    let dir = TestDir::new("strict");
    let guard = ProcessGuard::new();
    let spawner = UnixSpawner::plain();
    let services = dir.join("services");
    let binary = services.join("loose/loose");
    write_executable(&binary, "#!/bin/sh\nexit 0\n", 0o775);
    let chmod = |path: &Path, mode| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(&services, 0o755);
    chmod(binary.parent().unwrap(), 0o755);
    let strict = SpawnSpec {
        strict: Some(StrictCheck {
            services_dir: services.clone(),
        }),
        ..spec(&dir, "loose", &binary, &[])
    };
    let error = spawn_error(&spawner, &strict);
    assert_eq!(error.stage(), "strict");
    let shown = binary.display().to_string();
    assert_mentions(
        &error.to_string(),
        &[
            "service loose",
            &shown,
            "mode 0775",
            &format!("chmod go-w {shown}"),
            "strict = false",
        ],
    );

    // A directory on the way up to services_dir counts too.
    chmod(&binary, 0o755);
    chmod(&services, 0o777);
    let error = spawn_error(&spawner, &strict);
    assert_mentions(
        &error.to_string(),
        &[&services.display().to_string(), "mode 0777"],
    );

    // strict = false runs it.
    let relaxed = SpawnSpec {
        strict: None,
        ..strict
    };
    let mut child = spawn(&spawner, &guard, &relaxed);
    assert_eq!(
        within("wait", child.wait()).await.unwrap(),
        ExitReason::Exited(0)
    );
    chmod(&services, 0o755);
}

// ---------------------------------------------------------------------------
// Cgroups, through controllers of the test's own.

/// A "cgroup" whose join descriptor is a pipe: what the child writes to
/// join shows up at its other end.
#[derive(Debug)]
struct PipeCgroup {
    path: PathBuf,
    join: OwnedFd,
    joined: Mutex<Option<OwnedFd>>,
    oom_kills: AtomicU64,
    kill_passes: AtomicUsize,
    /// A process that left the leader's group is in it, until a kill pass.
    leftover: AtomicBool,
    /// Looks at what is left in it (each a read of its list, for real).
    looks: AtomicUsize,
    removed: AtomicBool,
}

impl ServiceCgroup for PipeCgroup {
    fn path(&self) -> &Path {
        &self.path
    }
    fn open_join(&self) -> std::io::Result<Vec<OwnedFd>> {
        Ok(vec![self.join.try_clone()?])
    }
    fn pids(&self) -> std::io::Result<Vec<u32>> {
        Ok(Vec::new())
    }
    fn is_empty(&self) -> std::io::Result<bool> {
        self.looks.fetch_add(1, Ordering::SeqCst);
        Ok(!self.leftover.load(Ordering::SeqCst))
    }
    fn kill_all(&self) -> std::io::Result<()> {
        self.kill_passes.fetch_add(1, Ordering::SeqCst);
        self.leftover.store(false, Ordering::SeqCst);
        Ok(())
    }
    fn usage(&self) -> Usage {
        Usage::default()
    }
    fn oom_kills(&self) -> u64 {
        self.oom_kills.load(Ordering::SeqCst)
    }
    /// Refused while something is left, as the kernel refuses.
    fn remove(&self) -> std::io::Result<()> {
        if self.leftover.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.removed.store(true, Ordering::SeqCst);
        Ok(())
    }
}

#[derive(Debug, Default)]
struct PipeController {
    made: Mutex<Vec<Arc<PipeCgroup>>>,
}

impl PipeController {
    fn last(&self) -> Arc<PipeCgroup> {
        self.made
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a cgroup was made")
    }
}

impl ResourceController for PipeController {
    fn flavor(&self) -> Flavor {
        Flavor::V2
    }
    fn create(&self, service: &str, _limits: &Limits) -> Result<Placement, CgroupError> {
        let (read, write) = std::io::pipe().expect("a pipe");
        let write = OwnedFd::from(write);
        let join = vec![write.try_clone().expect("a dup of the pipe")];
        let cgroup = Arc::new(PipeCgroup {
            path: PathBuf::from(format!("/pipe/{service}")),
            join: write,
            joined: Mutex::new(Some(read.into())),
            oom_kills: AtomicU64::new(0),
            kill_passes: AtomicUsize::new(0),
            leftover: AtomicBool::new(false),
            looks: AtomicUsize::new(0),
            removed: AtomicBool::new(false),
        });
        self.made.lock().unwrap().push(Arc::clone(&cgroup));
        Ok(Placement {
            cgroup: Some(cgroup),
            unenforced: Vec::new(),
            join,
        })
    }
    fn sweep_leftovers(&self, _services: &std::collections::BTreeSet<String>) -> Vec<u32> {
        Vec::new()
    }
}

#[tokio::test]
async fn the_child_joins_its_cgroup_before_exec_and_it_is_removed_after() {
    let dir = TestDir::new("join");
    let guard = ProcessGuard::new();
    let controller = Arc::new(PipeController::default());
    let spawner = UnixSpawner::new(Arc::clone(&controller) as _, true);
    let spec = SpawnSpec {
        limits: Limits {
            memory_mib: Some(64),
            ..Limits::default()
        },
        ..sleeper(&dir, "joined")
    };
    let mut child = spawn(&spawner, &guard, &spec);
    let cgroup = controller.last();
    assert!(child.cgroup().is_some(), "the daemon can read its usage");
    // The join descriptor is close-on-exec: only the child, before its
    // exec, can have written to it, and the spawn returned after the exec.
    let read_end = cgroup.joined.lock().unwrap().take().unwrap();
    assert_eq!(read_available(read_end), b"0");
    assert!(!cgroup.removed.load(Ordering::SeqCst));

    // The OOM killer's kill (the kernel's SIGKILL, not ours) is told from
    // any other SIGKILL. Something the leader started outside its group
    // is left in the cgroup.
    cgroup.oom_kills.store(1, Ordering::SeqCst);
    cgroup.leftover.store(true, Ordering::SeqCst);
    assert!(send_signal(child.pid(), 9));
    assert_eq!(
        within("wait", child.wait()).await.unwrap(),
        ExitReason::OomKilled {
            memory_limit_mib: Some(64)
        }
    );
    assert!(
        cgroup.removed.load(Ordering::SeqCst),
        "removed after the end"
    );
    assert!(child.cgroup().is_none());
    assert!(
        cgroup.kill_passes.load(Ordering::SeqCst) >= 1,
        "what the leader left in its cgroup is killed"
    );

    // Our own SIGKILL (stop_timeout) is ours, whatever the OOM count says.
    let mut child = spawn(
        &spawner,
        &guard,
        &SpawnSpec {
            limits: Limits {
                memory_mib: Some(64),
                ..Limits::default()
            },
            ..sleeper(&dir, "stopped")
        },
    );
    let cgroup = controller.last();
    cgroup.oom_kills.store(1, Ordering::SeqCst);
    child.signal_group(Signal::SIGKILL).unwrap();
    assert_eq!(
        within("wait", child.wait()).await.unwrap(),
        ExitReason::Signaled {
            signal: 9,
            core_dumped: false
        }
    );
    // Nothing was left: the removal itself was the look, no list was read.
    assert!(cgroup.removed.load(Ordering::SeqCst));
    assert_eq!(cgroup.looks.load(Ordering::SeqCst), 0);

    // A start that fails after the cgroup was made removes it again.
    let controller = Arc::new(PipeController::default());
    let spawner = UnixSpawner::new(Arc::clone(&controller) as _, true);
    let failing = SpawnSpec {
        cwd: dir.join("missing-dir"),
        ..sleeper(&dir, "failing")
    };
    assert_eq!(spawn_error(&spawner, &failing).stage(), "chdir");
    assert!(controller.last().removed.load(Ordering::SeqCst));
}

/// The open descriptors of `pid` and what they point at.
fn open_fds(pid: u32) -> Vec<(i32, String)> {
    let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list /proc/PID/fd")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let fd = entry.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(entry.path()).ok()?;
            Some((fd, target.display().to_string()))
        })
        .collect();
    fds.sort();
    fds
}

#[tokio::test]
async fn the_clone_path_leaks_no_descriptor_but_a_scripts_own() {
    // What the daemon does at start (see fds.rs): descriptors this test
    // process inherited from cargo are not the spawner's to close. Only
    // adds close-on-exec, which no test here relies on not having.
    mark_inherited_fds_cloexec().unwrap();
    let dir = TestDir::new("clonefds");
    let guard = ProcessGuard::new();
    let script = dir.join("services/script/script");
    write_executable(
        &script,
        "#!/bin/sh
exec sleep 1000\n",
        0o755,
    );
    let spawner = UnixSpawner::new(Arc::new(PipeController::default()), true);
    // Everything the clone path opens for the child: the hashed binary, a
    // cgroup's join descriptor, /dev/null, the pipes.
    let sleep = Path::new("/bin/sleep");
    let elf = SpawnSpec {
        sha256: Some(digest(&sha256_hex(sleep))),
        rlimits: vec![(Rlimit::Core, RlimitValue::Limited(0))],
        ..sleeper(&dir, "elf")
    };
    let child = spawn(&spawner, &guard, &elf);
    let fds = open_fds(child.pid());
    let numbers: Vec<i32> = fds.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(numbers, [0, 1, 2], "{fds:?}");
    assert_eq!(fds[0].1, "/dev/null");
    assert!(
        fds[1].1.starts_with("pipe:") && fds[2].1.starts_with("pipe:"),
        "{fds:?}"
    );
    kill_and_wait(child).await;

    // A script's interpreter reads it from /dev/fd/N, the one descriptor
    // left open for it (sh execs sleep, which inherits it).
    let hashed_script = SpawnSpec {
        sha256: Some(digest(&sha256_hex(&script))),
        ..spec(&dir, "script", &script, &[])
    };
    let child = spawn(&spawner, &guard, &hashed_script);
    let pid = child.pid();
    assert!(
        wait_until(DEADLINE, || cmdline(pid)
            .is_some_and(|argv| argv.first().is_some_and(|a| a == "sleep"))),
        "the script did not exec sleep"
    );
    let fds = open_fds(pid);
    let extra: Vec<&(i32, String)> = fds.iter().filter(|(fd, _)| *fd > 2).collect();
    assert_eq!(extra.len(), 1, "{fds:?}");
    assert_eq!(extra[0].1, script.display().to_string());
    kill_and_wait(child).await;
}

#[tokio::test]
async fn limits_that_cannot_be_enforced_fail_the_start_under_require_limits() {
    let dir = TestDir::new("require");
    let guard = ProcessGuard::new();
    let no_cgroups = || {
        Arc::new(NoCgroups {
            reason: "no cgroup hierarchy is mounted".to_owned(),
        })
    };
    let spec = SpawnSpec {
        limits: Limits {
            memory_mib: Some(64),
            pids: Some(10),
            ..Limits::default()
        },
        ..sleeper(&dir, "limited")
    };
    let error = spawn_error(&UnixSpawner::new(no_cgroups(), true), &spec);
    assert_eq!(error.stage(), "limits");
    assert_mentions(
        &error.to_string(),
        &[
            "service limited",
            "memory_limit is not enforced: no cgroup hierarchy is mounted",
            "pids_limit is not enforced",
            "require_limits = false",
        ],
    );
    // Without require_limits it runs (and warns, once).
    let spawner = UnixSpawner::new(no_cgroups(), false);
    for _ in 0..2 {
        let child = spawn(&spawner, &guard, &spec);
        assert!(child.cgroup().is_none());
        kill_and_wait(child).await;
    }
}

/// Real v1 pids cgroups under /sys/fs/cgroup/pids, one per service.
#[derive(Debug)]
struct PidsV1 {
    root: PathBuf,
}

#[derive(Debug)]
struct PidsCgroup {
    path: PathBuf,
}

impl PidsCgroup {
    fn read_pids(&self) -> std::io::Result<Vec<u32>> {
        Ok(std::fs::read_to_string(self.path.join("cgroup.procs"))?
            .lines()
            .filter_map(|l| l.parse().ok())
            .collect())
    }
}

impl ServiceCgroup for PidsCgroup {
    fn path(&self) -> &Path {
        &self.path
    }
    fn open_join(&self) -> std::io::Result<Vec<OwnedFd>> {
        let procs = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))?;
        Ok(vec![procs.into()])
    }
    fn pids(&self) -> std::io::Result<Vec<u32>> {
        self.read_pids()
    }
    fn is_empty(&self) -> std::io::Result<bool> {
        Ok(self.read_pids()?.is_empty())
    }
    fn kill_all(&self) -> std::io::Result<()> {
        for pid in self.read_pids()? {
            send_signal(pid, SIGKILL);
        }
        Ok(())
    }
    fn usage(&self) -> Usage {
        Usage::default()
    }
    fn oom_kills(&self) -> u64 {
        0
    }
    fn remove(&self) -> std::io::Result<()> {
        match std::fs::remove_dir(&self.path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

impl ResourceController for PidsV1 {
    fn flavor(&self) -> Flavor {
        Flavor::V1
    }
    fn create(&self, service: &str, _limits: &Limits) -> Result<Placement, CgroupError> {
        let path = self
            .root
            .join(format!("orch-e2e-{}-{service}", std::process::id()));
        let io = |action: &str, source| CgroupError::Io {
            action: action.to_owned(),
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(&path).map_err(|e| io("create", e))?;
        let cgroup = PidsCgroup { path: path.clone() };
        let join = cgroup
            .open_join()
            .map_err(|e| io("open cgroup.procs of", e))?;
        Ok(Placement {
            cgroup: Some(Arc::new(cgroup)),
            unenforced: Vec::new(),
            join,
        })
    }
    fn sweep_leftovers(&self, _services: &std::collections::BTreeSet<String>) -> Vec<u32> {
        Vec::new()
    }
}

#[tokio::test]
async fn a_real_cgroup_holds_the_service_from_its_first_instruction_to_its_last_descendant() {
    let root = PathBuf::from("/sys/fs/cgroup/pids");
    if skip_unless_root("a_real_cgroup_holds_the_service...") {
        return;
    }
    if !root.join("cgroup.procs").exists() {
        eprintln!("a_real_cgroup_holds_the_service...: skipped, no v1 pids hierarchy at {root:?}");
        return;
    }
    let dir = TestDir::new("pids");
    let guard = ProcessGuard::new();
    let spawner = UnixSpawner::new(Arc::new(PidsV1 { root: root.clone() }), true);
    let name = "pidsgroup";
    let cgroup_dir = root.join(format!("orch-e2e-{}-{name}", std::process::id()));
    let fixture = fixture_bin();
    // The fixture reads /proc/self/cgroup first thing; a setsid child
    // escapes its process group (and lives 10 minutes) but not its cgroup.
    let spec = spec(
        &dir,
        name,
        &fixture,
        &[
            "--print-cgroup",
            "--orphan-life-ms",
            "600000",
            "--setsid-child",
            "--exit",
            "0",
        ],
    );
    let mut child = spawn(&spawner, &guard, &spec);
    // The descriptor the child joined through was closed once it ran: a
    // running service costs the daemon none (10,000 of them would).
    let procs = cgroup_dir.join("cgroup.procs");
    let held: Vec<PathBuf> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| *target == procs)
        .collect();
    assert_eq!(held, Vec::<PathBuf>::new(), "still open after the spawn");
    let output = child.take_output().unwrap();
    // The setsid child's output goes to /dev/null: EOF comes with the leader.
    let text = read_to_end(output.stdout);
    let pids_line = text
        .lines()
        .find(|l| l.starts_with("CGROUP ") && l.contains(":pids:"))
        .unwrap_or_else(|| panic!("no pids line in {text:?}"));
    assert!(
        pids_line.ends_with(&format!(":pids:/orch-e2e-{}-{name}", std::process::id())),
        "{pids_line}"
    );
    let escaped: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("SETSID_CHILD pid="))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no SETSID_CHILD in {text:?}"));
    assert_eq!(
        within("wait", child.wait()).await.unwrap(),
        ExitReason::Exited(0)
    );
    assert!(!is_alive(escaped), "the setsid child outlived its service");
    assert!(!cgroup_dir.exists(), "{cgroup_dir:?} was not removed");
}

/// What is in the pipe now (at least one byte), within `DEADLINE`.
fn read_available(fd: OwnedFd) -> Vec<u8> {
    use std::io::Read;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buffer = [0u8; 64];
        let result = std::fs::File::from(fd)
            .read(&mut buffer)
            .map(|n| buffer[..n].to_vec());
        let _ = sender.send(result);
    });
    receiver
        .recv_timeout(DEADLINE)
        .expect("nothing was written to the join descriptor")
        .expect("read the pipe")
}
