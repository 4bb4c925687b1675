//! A service gets the open-files soft limit the daemon was started with,
//! not the one the daemon raised for itself, unless it sets its own. One
//! test in this file: it changes the limits of the test process itself.

use std::path::PathBuf;

use orchestrator_core::config::{Rlimit, RlimitValue};
use orchestrator_core::process::{Signal, SpawnSpec, Spawner, UnixSpawner, record_original_nofile};
use orchestrator_e2e::*;

fn set_nofile(soft: u64, hard: u64) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the local `limit`.
    let result = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(result, 0, "setrlimit NOFILE {soft} {hard}");
}

fn nofile_of(pid: u32) -> (String, String) {
    proc_limit(pid, "Max open files").expect("a Max open files row")
}

#[tokio::test]
async fn a_service_gets_the_daemons_original_open_files_limit() {
    let (_, hard) = nofile_of(std::process::id());
    let hard: u64 = hard.parse().unwrap_or(1 << 20);
    // As the daemon does: recorded at 512, then raised to the hard limit.
    set_nofile(512.min(hard), hard);
    record_original_nofile();
    set_nofile(hard, hard);

    let dir = TestDir::new("nofile");
    let guard = ProcessGuard::new();
    let plain = SpawnSpec {
        service: "nofile".to_owned(),
        program: PathBuf::from("/bin/sleep"),
        args: vec!["1000".to_owned()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.path().to_owned(),
        ..SpawnSpec::default()
    };
    let own = SpawnSpec {
        rlimits: vec![(Rlimit::Nofile, RlimitValue::Limited(300))],
        ..plain.clone()
    };
    let spawner = UnixSpawner::plain();
    for (spec, expected) in [
        (plain, (512.min(hard).to_string(), hard.to_string())),
        (own, ("300".to_owned(), "300".to_owned())),
    ] {
        let mut child = spawner.spawn(&spec).expect("spawn /bin/sleep");
        guard.add_pgid(i32::try_from(child.pid()).unwrap());
        assert_eq!(nofile_of(child.pid()), expected, "{:?}", spec.rlimits);
        child.signal_group(Signal::SIGKILL).unwrap();
        within("reap", child.wait()).await.unwrap();
    }
}
