//! Helpers shared by the integration tests (`crates/e2e/tests`, through the
//! library) and the end-to-end tests (`crates/orchestrator/tests`, through
//! the real binary): where the binaries are, throw-away workspaces, pollers
//! with generous deadlines, `/proc` readers, and guards that SIGKILL whatever
//! a failing test left behind.
//!
//! Every wait here synchronises on an event (a line in a file, a state, a
//! process gone); the deadlines only turn a hang into a failure.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use orchestrator_core::config::{
    BackoffConfig, Config, OrchestratorConfig, RestartPolicy, ServiceConfig,
};
use orchestrator_core::plan::{HostEnv, plan};
use orchestrator_core::service::{ServiceDefinition, ServiceHandle, ServiceStatus};

/// Signal numbers, for crates that do not depend on libc themselves.
pub use libc::{SIGHUP, SIGINT, SIGKILL, SIGTERM};

/// How long any wait may take before the test fails. Generous on purpose: a
/// loaded 2-core CI machine must never hit it; it only turns a hang into a
/// failure with a message.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// How often pollers look again.
const POLL: Duration = Duration::from_millis(10);

// ---------------------------------------------------------------------------
// Binaries

/// The fixture service (`src/bin/fixture-service.rs`).
pub fn fixture_bin() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| bin_of("orchestrator-e2e", "fixture-service"))
        .clone()
}

/// The `orchestrator` binary.
pub fn orchestrator_bin() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| bin_of("orchestrator", "orchestrator"))
        .clone()
}

/// Binary `name` of workspace package `package`, up to date.
///
/// Cargo builds, and names in `CARGO_BIN_EXE_<name>`, only the binaries of
/// the package under test: `cargo test -p orchestrator` on a fresh target
/// has no fixture, and one left by an earlier build may be stale. Otherwise
/// the binary is built here, once per test executable (the callers hold it
/// in a `OnceLock`), by the cargo that runs the tests, into the target
/// directory and profile of the running test executable. Cargo's own lock
/// on that directory serialises test executables that build at once, and
/// when the binary is up to date the build is a check of a fraction of a
/// second.
fn bin_of(package: &str, name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("CARGO_BIN_EXE_{name}")) {
        return PathBuf::from(path);
    }
    let profile_dir = profile_dir();
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory lies in the target directory");
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => panic!("no profile in {}", profile_dir.display()),
    };
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .arg("build")
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["--profile", profile])
        // Both packages, as `cargo test -p orchestrator` resolves them
        // (the e2e crate is its dev-dependency): the same features, so
        // the dependencies already built for the tests are reused.
        .args([
            "-p",
            "orchestrator",
            "-p",
            "orchestrator-e2e",
            "--bin",
            name,
        ])
        .stdin(Stdio::null());
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} to build {name}: {e}", cargo.display()));
    assert!(
        output.status.success(),
        "`{command:?}` failed to build {name} of {package}:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing after its build",
        bin.display()
    );
    bin
}

/// `target/PROFILE`: the `deps/` folder in it holds the running test
/// executable.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    exe.parent()
        .and_then(|deps| {
            if deps.ends_with("deps") {
                deps.parent()
            } else {
                Some(deps)
            }
        })
        .expect("the test executable lives in target/PROFILE/deps")
        .to_owned()
}

// ---------------------------------------------------------------------------
// Temporary workspaces

/// Numbers the daemons' output files within a directory.
static FILE_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the system temp dir. On drop, every process
/// whose `HOME` lies inside it (every service started from it, and what
/// they forked) is SIGKILLed, then it is removed. Set `ORCH_E2E_KEEP=1` to
/// keep it for a post-mortem.
#[derive(Debug)]
pub struct TestDir {
    /// Canonical, so paths the children report (getcwd) compare equal.
    path: PathBuf,
    // Declared after `path` and dropped after `TestDir::drop` has run: the
    // directory goes once nothing runs in it any more.
    _dir: tempfile::TempDir,
}

impl TestDir {
    pub fn new(label: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("orch-e2e-{label}-"))
            .disable_cleanup(std::env::var_os("ORCH_E2E_KEEP").is_some())
            .tempdir()
            .expect("create the test directory");
        let path = fs::canonicalize(dir.path()).expect("canonicalize the test directory");
        TestDir { path, _dir: dir }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, relative: impl AsRef<Path>) -> PathBuf {
        self.path.join(relative)
    }

    /// `services/NAME/NAME` as a symlink to the fixture binary. A symlink,
    /// not a copy: a copy just written can fail to exec with ETXTBSY while
    /// another test thread forks.
    pub fn add_fixture_service(&self, name: &str) -> PathBuf {
        let dir = self.join("services").join(name);
        fs::create_dir_all(&dir).expect("create the service directory");
        let binary = dir.join(name);
        std::os::unix::fs::symlink(fixture_bin(), &binary).expect("link the fixture binary");
        binary
    }

    /// `services/NAME/NAME` as an executable `#!/bin/sh` script whose body is
    /// `body`. Write scripts before starting anything in the test, so no
    /// concurrent fork holds the file open for writing when it is executed.
    pub fn add_script_service(&self, name: &str, body: &str) -> PathBuf {
        let dir = self.join("services").join(name);
        fs::create_dir_all(&dir).expect("create the service directory");
        let binary = dir.join(name);
        self.write_file(&binary, &format!("#!/bin/sh\n{body}\n"), 0o755);
        binary
    }

    /// Write `contents` to `path` (absolute or relative to this directory)
    /// with `mode`, creating parent directories.
    pub fn write_file(&self, path: impl AsRef<Path>, contents: &str, mode: u32) -> PathBuf {
        let path = self.join(path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).expect("create the parent directory");
        }
        fs::write(&path, contents).expect("write the file");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod the file");
        path
    }

    /// The default data_dir: `.orchestrator` beside the configuration.
    pub fn data_dir(&self) -> PathBuf {
        self.join(".orchestrator")
    }

    /// `data_dir/logs/NAME.log` for the default data_dir.
    pub fn log_path(&self, service: &str) -> PathBuf {
        self.data_dir().join("logs").join(format!("{service}.log"))
    }

    /// The default data_dir of service NAME (its cwd and HOME).
    pub fn service_data_dir(&self, service: &str) -> PathBuf {
        self.join("services").join(service).join("data")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        kill_processes_with_home_under(&self.path);
    }
}

/// SIGKILL every process (of ours) whose environment has `HOME` inside
/// `dir`: the services the orchestrator started from a test directory get
/// `HOME` = their data_dir, and everything they fork inherits it.
pub fn kill_processes_with_home_under(dir: &Path) {
    let me = std::process::id();
    let Ok(entries) = fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(env) = environ(pid) else { continue };
        if env
            .get("HOME")
            .is_some_and(|home| Path::new(home).starts_with(dir))
        {
            send_signal(pid, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// Waiting

/// Poll `condition` every 10 ms until it holds (true) or `deadline` passed
/// (false). Blocking: for plain `#[test]`s, not inside a runtime.
pub fn wait_until(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// `wait_until` for async tests: sleeps on the runtime, so the actors keep
/// running on a current-thread runtime.
pub async fn wait_until_async(deadline: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Wait (at most [`DEADLINE`]) until the service's status satisfies
/// `predicate`; panics with `what` and the last status otherwise.
pub async fn wait_status(
    handle: &ServiceHandle,
    what: &str,
    predicate: impl FnMut(&ServiceStatus) -> bool,
) -> ServiceStatus {
    match tokio::time::timeout(DEADLINE, handle.wait_for(predicate)).await {
        Ok(Ok(status)) => status,
        Ok(Err(error)) => panic!("{}: waiting for {what}: {error}", handle.name()),
        Err(_) => panic!(
            "{}: still not {what} after {DEADLINE:?}; status {:?}",
            handle.name(),
            handle.status()
        ),
    }
}

/// Run `future` with a [`DEADLINE`], panicking with `what` on a hang.
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {DEADLINE:?}"))
}

// ---------------------------------------------------------------------------
// Files written by services

/// The file's bytes, or nothing when it does not exist yet.
pub fn read_bytes(path: &Path) -> Vec<u8> {
    fs::read(path).unwrap_or_default()
}

/// The file's lines (lossy UTF-8), or none when it does not exist yet.
pub fn read_lines(path: &Path) -> Vec<String> {
    String::from_utf8_lossy(&read_bytes(path))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Wait until some line of the file starts with `prefix`; returns that line.
pub fn wait_for_line(path: &Path, prefix: &str) -> String {
    let mut found = None;
    let ok = wait_until(DEADLINE, || {
        found = read_lines(path).into_iter().find(|l| l.starts_with(prefix));
        found.is_some()
    });
    assert!(
        ok,
        "no line starting with {prefix:?} in {} after {DEADLINE:?}; it holds:\n{}",
        path.display(),
        String::from_utf8_lossy(&read_bytes(path))
    );
    found.expect("found")
}

/// `wait_for_line` for async tests.
pub async fn wait_for_line_async(path: &Path, prefix: &str) -> String {
    let mut found = None;
    let ok = wait_until_async(DEADLINE, || {
        found = read_lines(path).into_iter().find(|l| l.starts_with(prefix));
        found.is_some()
    })
    .await;
    assert!(
        ok,
        "no line starting with {prefix:?} in {} after {DEADLINE:?}; it holds:\n{}",
        path.display(),
        String::from_utf8_lossy(&read_bytes(path))
    );
    found.expect("found")
}

/// The value of `key=VALUE` in a line such as `READY pid=12 pgid=12`.
pub fn field(line: &str, key: &str) -> u32 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key}= in {line:?}"))
}

/// Remove ANSI escape sequences (colours) from a log line.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            // Parameters and intermediates, then one final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------
// /proc

/// The fields of `/proc/PID/stat` the tests need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// `R`, `S`, `D`, `Z`, `T`, ...
    pub state: char,
    pub ppid: i32,
    pub pgid: i32,
}

/// `/proc/PID/stat`, or `None` when there is no such process.
pub fn stat(pid: u32) -> Option<Stat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split
    // after the last ')'.
    let rest = text.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    let pgid = fields.next()?.parse().ok()?;
    Some(Stat { state, ppid, pgid })
}

/// The process exists and is not a zombie (a zombie is dead: it only waits
/// for its parent, maybe an init that never reaps, to collect it).
pub fn is_alive(pid: u32) -> bool {
    stat(pid).is_some_and(|s| s.state != 'Z' && s.state != 'X')
}

/// `/proc/PID/environ` as a map, or `None` when unreadable.
pub fn environ(pid: u32) -> Option<BTreeMap<String, String>> {
    let bytes = fs::read(format!("/proc/{pid}/environ")).ok()?;
    Some(
        bytes
            .split(|&b| b == 0)
            .filter(|entry| !entry.is_empty())
            .filter_map(|entry| {
                let text = String::from_utf8_lossy(entry);
                let (key, value) = text.split_once('=')?;
                Some((key.to_owned(), value.to_owned()))
            })
            .collect(),
    )
}

/// `/proc/PID/cmdline` as argv.
pub fn cmdline(pid: u32) -> Option<Vec<String>> {
    let bytes = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        bytes
            .split(|&b| b == 0)
            .filter(|arg| !arg.is_empty())
            .map(|arg| String::from_utf8_lossy(arg).into_owned())
            .collect(),
    )
}

/// Every pid in `/proc`, in no particular order.
pub fn all_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect()
}

/// The live (not zombie) processes whose `HOME` is exactly `home`: a
/// service started with that data_dir and everything it forked.
pub fn live_processes_with_home(home: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            environ(pid)
                .and_then(|env| env.get("HOME").cloned())
                .is_some_and(|h| Path::new(&h) == home)
        })
        .filter(|&pid| is_alive(pid))
        .collect()
}

/// The live (not zombie) processes whose `HOME` lies inside `dir`.
pub fn live_processes_with_home_under(dir: &Path) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            environ(pid)
                .and_then(|env| env.get("HOME").cloned())
                .is_some_and(|h| Path::new(&h).starts_with(dir))
        })
        .filter(|&pid| is_alive(pid))
        .collect()
}

/// The children of `ppid` that are zombies (exited, not reaped yet).
pub fn zombie_children(ppid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|&pid| {
            stat(pid).is_some_and(|s| s.state == 'Z' && u32::try_from(s.ppid) == Ok(ppid))
        })
        .collect()
}

/// Fields of `/proc/PID/stat` after the command name, numbered as in
/// proc(5) (3 = state, 4 = ppid, ...): `stat_field(pid, 22)` is the start
/// time in clock ticks after boot.
pub fn stat_field(pid: u32, field: usize) -> Option<u64> {
    assert!(field >= 4, "fields 1 to 3 are not numbers");
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = text.rsplit_once(')')?.1;
    rest.split_whitespace().nth(field - 3)?.parse().ok()
}

/// When the process started, in clock ticks after boot (stat field 22):
/// with the pid, what identifies a process.
pub fn start_time(pid: u32) -> Option<u64> {
    stat_field(pid, 22)
}

/// The process's session id (stat field 6).
pub fn session_id(pid: u32) -> Option<u32> {
    stat_field(pid, 6).and_then(|s| u32::try_from(s).ok())
}

/// A `KEY: N kB` line of `/proc/PID/status` (`VmRSS`, `VmHWM`...), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The words of a `KEY:` line of `/proc/PID/status` (`Uid` gives the real,
/// effective, saved and filesystem uids; `Groups` the supplementary groups).
pub fn status_words(pid: u32, key: &str) -> Option<Vec<String>> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines().find_map(|line| {
        let value = line.strip_prefix(key)?.strip_prefix(':')?;
        Some(value.split_whitespace().map(str::to_owned).collect())
    })
}

/// The soft and hard values of a row of `/proc/PID/limits`, by its name
/// (`Max open files`, `Max core file size`...): numbers or `unlimited`.
pub fn proc_limit(pid: u32, name: &str) -> Option<(String, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        // The name is followed by padding: a longer name sharing the prefix
        // would go on with a letter.
        if !rest.starts_with(' ') {
            return None;
        }
        let mut words = rest.split_whitespace();
        Some((words.next()?.to_owned(), words.next()?.to_owned()))
    })
}

/// Write an executable file from another process (`sh`), so that no
/// descriptor open for writing on it is ever ours: a spawn on another test
/// thread that copied such a descriptor would make its exec fail with
/// ETXTBSY. Creates the parent directories.
pub fn write_executable(path: &Path, contents: &str, mode: u32) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("create the parent directory");
    }
    let status = Command::new("/bin/sh")
        .args([
            "-c",
            "printf '%s' \"$2\" > \"$1\" && chmod \"$3\" \"$1\"",
            "sh",
        ])
        .arg(path)
        .arg(contents)
        .arg(format!("{mode:o}"))
        .stdin(Stdio::null())
        .status()
        .expect("run sh to write an executable");
    assert!(status.success(), "writing {} failed", path.display());
}

/// Copy a file from another process (`cp`), for the reason given at
/// `write_executable`.
pub fn copy_executable(from: &Path, to: &Path) {
    let status = Command::new("cp")
        .arg(from)
        .arg(to)
        .stdin(Stdio::null())
        .status()
        .expect("run cp");
    assert!(status.success(), "copying {} failed", from.display());
}

/// The SHA-256 of a file as 64 hex digits, by `sha256sum`: an oracle
/// independent of the code under test.
pub fn sha256_hex(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run sha256sum");
    assert!(
        output.status.success(),
        "sha256sum {} failed",
        path.display()
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned()
}

/// Everything a child writes to the pipe `fd` until it closes (the child
/// and everything it started exited), within `DEADLINE`.
pub fn read_to_end(fd: std::os::fd::OwnedFd) -> String {
    use std::io::Read;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let result = fs::File::from(fd).read_to_string(&mut text).map(|_| text);
        let _ = sender.send(result);
    });
    receiver
        .recv_timeout(DEADLINE)
        .expect("the pipe was not closed in time")
        .expect("read the pipe")
}

/// The first line a child writes to the pipe `fd` (without its newline),
/// within `DEADLINE`. The rest of the pipe is read and dropped in the
/// background, so the child never blocks on a full pipe.
pub fn first_line(fd: std::os::fd::OwnedFd) -> String {
    use std::io::BufRead;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = std::io::BufReader::new(fs::File::from(fd));
        let mut line = String::new();
        let result = reader.read_line(&mut line).map(|_| line);
        let _ = sender.send(result);
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    receiver
        .recv_timeout(DEADLINE)
        .expect("no line in time")
        .expect("read the pipe")
        .trim_end_matches('\n')
        .to_owned()
}

/// How many descriptors the process has open.
pub fn fd_count(pid: u32) -> Option<usize> {
    Some(fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// The test process's own process group.
pub fn own_pgid() -> i32 {
    // SAFETY: getpgrp has no preconditions and cannot fail.
    unsafe { libc::getpgrp() }
}

/// Send `signal` to `pid`; true when it was delivered.
pub fn send_signal(pid: u32, signal: i32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    if pid <= 1 {
        return false;
    }
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Send `signal` to the process group `pgid`; true when it was delivered.
pub fn signal_group(pgid: i32, signal: i32) -> bool {
    // Never group 0 (our own), 1 or a negative "every process".
    if pgid <= 1 || pgid == own_pgid() {
        return false;
    }
    // SAFETY: killpg has no memory-safety preconditions.
    unsafe { libc::killpg(pgid, signal) == 0 }
}

/// Open `path` on a descriptor that is *not* close-on-exec, as a daemon
/// might inherit one from its parent; returns the raw descriptor (leaked on
/// purpose: it lives until the test process exits).
pub fn open_inheritable_fd(path: &Path) -> i32 {
    use std::os::fd::IntoRawFd;
    let fd = fs::File::open(path).expect("open a file").into_raw_fd();
    // SAFETY: plain fcntl calls on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFD);
        assert!(flags >= 0, "F_GETFD: {}", io::Error::last_os_error());
        assert_eq!(
            libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC),
            0,
            "F_SETFD: {}",
            io::Error::last_os_error()
        );
    }
    fd
}

/// Whether `fd` of this process is close-on-exec.
pub fn is_cloexec(fd: i32) -> bool {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    flags >= 0 && flags & libc::FD_CLOEXEC != 0
}

// ---------------------------------------------------------------------------
// Guards

/// SIGKILLs, on drop, every process group recorded in it and the current
/// process group of every service handle given to it: a failing test (or one
/// that ends while its runtime still holds children) never leaks processes.
#[derive(Default)]
pub struct ProcessGuard {
    pgids: Mutex<Vec<i32>>,
    handles: Mutex<Vec<ServiceHandle>>,
}

impl ProcessGuard {
    pub fn new() -> ProcessGuard {
        ProcessGuard::default()
    }

    pub fn add_pgid(&self, pgid: i32) {
        self.pgids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pgid);
    }

    /// Kill whatever process this service runs when the guard drops.
    pub fn watch(&self, handle: &ServiceHandle) {
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(handle.clone());
    }
}

impl Drop for ProcessGuard {
    fn drop(&mut self) {
        let mut pgids = std::mem::take(&mut *self.pgids.lock().unwrap_or_else(|e| e.into_inner()));
        for handle in self
            .handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            if let Some(pid) = handle.status().pid.and_then(|p| i32::try_from(p).ok()) {
                pgids.push(pid);
            }
        }
        for pgid in pgids {
            signal_group(pgid, libc::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------
// Library-level configurations

/// A fixture service: `binary_path` = the fixture, `args` as given, never
/// restarted, a 1 s stop_timeout and a fast backoff.
pub fn fixture(args: &[&str]) -> ServiceConfig {
    ServiceConfig {
        binary_path: Some(fixture_bin()),
        args: args.iter().map(|a| (*a).to_owned()).collect(),
        restart: Some(RestartPolicy::Never),
        stop_timeout: Some(Duration::from_secs(1)),
        backoff: BackoffConfig {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(200),
            reset_after: Duration::from_secs(60),
        },
        ..ServiceConfig::default()
    }
}

/// A configuration rooted in `dir` (services_dir `dir/services`, data_dir
/// `dir/.orchestrator`) with these services and a short shutdown_timeout.
pub fn config_in(dir: &TestDir, services: Vec<(&str, ServiceConfig)>) -> Config {
    let mut orchestrator = OrchestratorConfig::defaults_in(dir.path());
    orchestrator.shutdown_timeout = Duration::from_secs(2);
    Config {
        source: None,
        orchestrator,
        services: services
            .into_iter()
            .map(|(name, service)| (name.parse().expect("a valid service name"), service))
            .collect(),
    }
}

/// The definitions the daemon would run for `config` (nothing discovered),
/// with the test process's PATH and TMPDIR.
pub fn definitions(config: &Config) -> Vec<ServiceDefinition> {
    plan(config, &[], &HostEnv::from_process())
}

/// The one definition named `name`.
pub fn definition(config: &Config, name: &str) -> ServiceDefinition {
    definitions(config)
        .into_iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no service {name} in the plan"))
}

// ---------------------------------------------------------------------------
// The real daemon

/// `orchestrator ARGS` running in `cwd` with stdout and stderr in files,
/// `ORCHESTRATOR_CONFIG` and `ORCHESTRATOR_LOG` unset. On drop it is
/// SIGKILLed and reaped, and so are the process groups recorded in `guard`.
pub struct Daemon {
    child: Child,
    status: Option<ExitStatus>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub guard: ProcessGuard,
}

impl Daemon {
    pub fn start(cwd: &Path, args: &[&str]) -> Daemon {
        Daemon::start_with(cwd, args, |_| {})
    }

    /// `start` with a chance to adjust the command (extra environment...).
    pub fn start_with(cwd: &Path, args: &[&str], adjust: impl FnOnce(&mut Command)) -> Daemon {
        let mut command = Command::new(orchestrator_bin());
        command.args(args);
        Daemon::spawn(cwd, command, adjust)
    }

    /// `start` through `sh -c 'PRELUDE; exec orchestrator ARGS'`, to give
    /// the daemon what a shell can set up (`trap '' USR1`, `ulimit`...).
    /// The daemon keeps the shell's pid.
    pub fn start_after_shell(cwd: &Path, prelude: &str, args: &[&str]) -> Daemon {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(format!("{prelude}; exec \"$0\" \"$@\""))
            .arg(orchestrator_bin())
            .args(args);
        Daemon::spawn(cwd, command, |_| {})
    }

    fn spawn(cwd: &Path, mut command: Command, adjust: impl FnOnce(&mut Command)) -> Daemon {
        let n = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let stdout = cwd.join(format!("daemon-{n}.stdout"));
        let stderr = cwd.join(format!("daemon-{n}.stderr"));
        command
            .current_dir(cwd)
            .env_remove("ORCHESTRATOR_CONFIG")
            .env_remove("ORCHESTRATOR_SOCKET")
            .env_remove("ORCHESTRATOR_LOG")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).expect("create the stdout file"))
            .stderr(fs::File::create(&stderr).expect("create the stderr file"));
        // Its own process group, as under systemd or a shell's job control:
        // in the test's group, a daemon a test has stopped (SIGSTOP) would
        // get the kernel's SIGHUP + SIGCONT whenever that group became
        // orphaned by some other exit, and wake up mid-test.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        adjust(&mut command);
        let child = command.spawn().expect("spawn the orchestrator binary");
        Daemon {
            child,
            status: None,
            stdout,
            stderr,
            guard: ProcessGuard::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        assert!(
            self.status.is_none() && send_signal(self.pid(), signal),
            "cannot signal the daemon"
        );
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait on the daemon");
        }
        self.status
    }

    /// Its exit status, waiting at most [`DEADLINE`].
    pub fn wait_exit(&mut self) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let mut status = None;
        let exited = wait_until(DEADLINE, || {
            status = self.child.try_wait().expect("try_wait on the daemon");
            status.is_some()
        });
        assert!(
            exited,
            "the daemon did not exit within {DEADLINE:?}; its log:\n{}",
            self.stderr_text()
        );
        self.status = status;
        status.expect("exited")
    }

    /// Its stderr (its own log) so far, without colours.
    pub fn stderr_text(&self) -> String {
        strip_ansi(&String::from_utf8_lossy(&read_bytes(&self.stderr)))
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&read_bytes(&self.stdout)).into_owned()
    }

    /// Wait until its log holds a line containing every one of `parts`.
    /// Double quotes are ignored on both sides, so `service=api` matches
    /// a field logged as `service=api` or `service="api"`.
    pub fn wait_for_log(&self, parts: &[&str]) -> String {
        let unquote = |s: &str| s.replace('"', "");
        let parts: Vec<String> = parts.iter().map(|p| unquote(p)).collect();
        let mut found = None;
        let ok = wait_until(DEADLINE, || {
            found = self
                .stderr_text()
                .lines()
                .find(|line| {
                    let line = unquote(line);
                    parts.iter().all(|p| line.contains(p.as_str()))
                })
                .map(str::to_owned);
            found.is_some()
        });
        assert!(
            ok,
            "no daemon log line with {parts:?} after {DEADLINE:?}; its log:\n{}",
            self.stderr_text()
        );
        found.expect("found")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // `guard` drops next and kills the recorded groups.
    }
}

/// Run `orchestrator ARGS` in `cwd` to completion (at most [`DEADLINE`]);
/// returns (exit code, stdout, stderr).
/// The configuration file the end-to-end workspaces write.
pub const CONFIG: &str = "orchestrator.toml";

/// `orchestrator -c orchestrator.toml ARGS` in the workspace.
pub fn cli(dir: &TestDir, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["-c", CONFIG];
    all.extend_from_slice(args);
    run_cli(dir.path(), &all)
}

/// `cli` that must exit 0; returns stdout.
pub fn cli_ok(dir: &TestDir, args: &[&str]) -> String {
    let (code, stdout, stderr) = cli(dir, args);
    assert_eq!(
        code,
        0,
        "`orchestrator {}` failed\nstdout: {stdout}\nstderr: {stderr}",
        args.join(" ")
    );
    stdout
}

/// `status --json [NAMES]`, parsed.
pub fn status_json(dir: &TestDir, names: &[&str]) -> Vec<serde_json::Value> {
    let mut args = vec!["status", "--json"];
    args.extend_from_slice(names);
    // Exit 1 only says that an enabled service is down: the JSON is whole.
    let (code, stdout, stderr) = cli(dir, &args);
    assert!(
        code == 0 || code == 1,
        "`orchestrator {}` failed with {code}\nstdout: {stdout}\nstderr: {stderr}",
        args.join(" ")
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("status --json: {e}\n{stdout}"))
}

/// `orchestrator -c orchestrator.toml run` in the workspace, once its
/// control socket exists.
pub fn run_daemon_in(dir: &TestDir) -> Daemon {
    let daemon = Daemon::start(dir.path(), &["-c", CONFIG, "run"]);
    let socket = dir.data_dir().join("orchestrator.sock");
    assert!(
        wait_until(DEADLINE, || socket.exists()),
        "no control socket; daemon log:\n{}",
        daemon.stderr_text()
    );
    daemon
}

/// Poll `status --json NAME` until `predicate` holds; returns that status.
/// On a timeout, the last status and the daemon's log.
pub fn wait_for_status(
    dir: &TestDir,
    daemon: &Daemon,
    name: &str,
    predicate: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = serde_json::Value::Null;
    let met = wait_until(DEADLINE, || {
        let (_, stdout, _) = cli(dir, &["status", "--json", name]);
        if let Ok(mut services) = serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
            && let Some(service) = services.pop()
        {
            last = service;
        }
        predicate(&last)
    });
    assert!(
        met,
        "{name}: condition not met within {DEADLINE:?}; last status: {last:#}\ndaemon log:\n{}",
        daemon.stderr_text()
    );
    last
}

/// The one ServiceInfo of `name`, as JSON.
pub fn status_of(dir: &TestDir, name: &str) -> serde_json::Value {
    let mut services = status_json(dir, &[name]);
    assert_eq!(services.len(), 1, "{services:?}");
    services.remove(0)
}

pub fn run_cli(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    let child = Command::new(orchestrator_bin())
        .args(args)
        .current_dir(cwd)
        .env_remove("ORCHESTRATOR_CONFIG")
        .env_remove("ORCHESTRATOR_SOCKET")
        .env_remove("ORCHESTRATOR_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the orchestrator binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let output = match rx.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("wait for the orchestrator binary"),
        Err(_) => {
            send_signal(pid, libc::SIGKILL);
            panic!(
                "`orchestrator {}` did not finish within {DEADLINE:?}",
                args.join(" ")
            );
        }
    };
    (
        output.status.code().unwrap_or(-1),
        strip_ansi(&String::from_utf8_lossy(&output.stdout)),
        strip_ansi(&String::from_utf8_lossy(&output.stderr)),
    )
}

/// `orchestrator ARGS` left running in `cwd` (`logs -f`, `events -f`), its
/// stdout read line by line on a thread and its stderr kept. SIGKILLed and
/// reaped on drop.
pub struct CliFollower {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::sync::Arc<Mutex<String>>,
    /// Closed by the stderr reader at end of file: after the exit, what it
    /// printed is complete only once this is disconnected.
    stderr_done: std::sync::mpsc::Receiver<()>,
}

impl CliFollower {
    pub fn start(cwd: &Path, args: &[&str]) -> CliFollower {
        use std::io::{BufRead, Read};
        let mut child = Command::new(orchestrator_bin())
            .args(args)
            .current_dir(cwd)
            .env_remove("ORCHESTRATOR_CONFIG")
            .env_remove("ORCHESTRATOR_SOCKET")
            .env_remove("ORCHESTRATOR_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the orchestrator binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(strip_ansi(&line)).is_err() {
                    return;
                }
            }
        });
        let stderr = std::sync::Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("piped stderr");
        let kept = std::sync::Arc::clone(&stderr);
        let (done, stderr_done) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _done = done;
            let mut chunk = [0u8; 4096];
            // Kept as it arrives so a failing wait shows what was said so far.
            while let Ok(read @ 1..) = pipe.read(&mut chunk) {
                kept.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&String::from_utf8_lossy(&chunk[..read]));
            }
        });
        CliFollower {
            child,
            lines,
            seen: Vec::new(),
            stderr,
            stderr_done,
        }
    }

    /// The next line of stdout satisfying `predicate` (earlier lines are
    /// kept in [`CliFollower::seen`]); panics after [`DEADLINE`].
    pub fn wait_for(&mut self, what: &str, mut predicate: impl FnMut(&str) -> bool) -> String {
        let end = Instant::now() + DEADLINE;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if predicate(&line) {
                        return line;
                    }
                }
                Err(error) => panic!(
                    "no line {what} from the follower ({error}); it printed:\n{}\nstderr: {}",
                    self.seen.join("\n"),
                    self.stderr.lock().unwrap_or_else(|e| e.into_inner())
                ),
            }
        }
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Its exit status once it ends on its own; `None` if it still runs
    /// after [`DEADLINE`].
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(DEADLINE, || {
            status = self.child.try_wait().expect("try_wait on the follower");
            status.is_some()
        });
        if status.is_some() {
            // The exit can be seen before the reader thread has taken the
            // last of stderr; wait for its end of file so `stderr_text` is whole.
            let _ = self.stderr_done.recv_timeout(DEADLINE);
        }
        status
    }

    /// Every line it printed, reading to the end of its stdout (call once it
    /// has exited; gives up after [`DEADLINE`]).
    pub fn all_lines(&mut self) -> &[String] {
        let end = Instant::now() + DEADLINE;
        while let Ok(line) = self
            .lines
            .recv_timeout(end.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        &self.seen
    }

    /// What it wrote on stderr so far (all of it once [`CliFollower::wait_exit`]
    /// has returned a status).
    pub fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// It has not exited (yet).
    pub fn is_running(&mut self) -> bool {
        self.child
            .try_wait()
            .expect("try_wait on the follower")
            .is_none()
    }
}

impl Drop for CliFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A mount made for a test (a tmpfs, or a read-only bind); unmounted on
/// drop.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mount a tmpfs of `size` (as `mount -o size=`) on `dir`, or say why
    /// not.
    pub fn mount(dir: &Path, size: &str) -> Result<Tmpfs, String> {
        if !running_as_root() {
            return Err("not running as root".to_owned());
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let output = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Tmpfs(dir.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = |lazy: bool| {
            let mut command = std::process::Command::new("umount");
            if lazy {
                command.arg("-l");
            }
            command
                .arg(&self.0)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !umount(false) {
            umount(true);
        }
    }
}

impl Tmpfs {
    /// `dir` bound read-only onto itself (unmounted on drop), or why not.
    pub fn bind_read_only(dir: &Path) -> Result<Tmpfs, String> {
        if !running_as_root() {
            return Err("not running as root".to_owned());
        }
        let run = |args: &[&str]| -> Result<(), String> {
            let output = std::process::Command::new("mount")
                .args(args)
                .arg(dir)
                .arg(dir)
                .output()
                .map_err(|e| format!("cannot run mount: {e}"))?;
            if output.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "mount failed: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ))
            }
        };
        run(&["--bind"])?;
        let mounted = Tmpfs(dir.to_owned());
        run(&["-o", "remount,bind,ro"])?;
        Ok(mounted)
    }
}

/// Whether this process runs as root (mounts need it): /proc/self belongs
/// to the process's effective uid.
pub fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A process of the test's own (a stranger to the daemon), SIGKILLed and
/// reaped on drop.
pub struct Stranger(std::process::Child);

impl Stranger {
    /// `sleep 60` in a process group of its own, like a service leader.
    pub fn start() -> Stranger {
        use std::os::unix::process::CommandExt;
        let child = std::process::Command::new("sleep")
            .arg("60")
            .process_group(0)
            .stdin(std::process::Stdio::null())
            .spawn()
            .expect("spawn sleep");
        Stranger(child)
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    pub fn is_alive(&mut self) -> bool {
        self.0
            .try_wait()
            .expect("try_wait on the stranger")
            .is_none()
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
