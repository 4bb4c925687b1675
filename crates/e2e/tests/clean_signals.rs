//! A service starts with every signal at its default disposition and an
//! empty signal mask, whatever the daemon's own are. This file holds one
//! test on purpose: it changes the signal dispositions of the test process
//! itself, which would leak into any other test of the same binary.

use std::path::PathBuf;

use orchestrator_core::config::{Rlimit, RlimitValue};
use orchestrator_core::process::{ExitReason, SpawnSpec, Spawner, UnixSpawner};
use orchestrator_e2e::*;

/// A `/proc/PID/status` signal mask (`SigIgn:`, `SigBlk:`...), all 64 bits.
fn signal_mask(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("read /proc/{pid}/status: {error}"));
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    u64::from_str_radix(hex.trim(), 16).expect("a hex mask")
}

fn set_bits(mask: u64) -> Vec<u32> {
    (1..=64)
        .filter(|sig| mask & (1 << (sig - 1)) != 0)
        .collect()
}

#[tokio::test]
async fn a_child_starts_with_default_dispositions_and_an_empty_mask() {
    // As for a daemon started under nohup or by a script that traps
    // signals: ignored dispositions survive exec unless the spawn resets them.
    for signal in [libc::SIGHUP, libc::SIGQUIT] {
        // SAFETY: SIG_IGN installs no handler, so no async-signal-safety
        // rule applies; only this test's binary is affected (see the file
        // comment), and nothing in it relies on SIGHUP or SIGQUIT.
        let previous = unsafe { libc::signal(signal, libc::SIG_IGN) };
        assert_ne!(previous, libc::SIG_ERR, "ignore signal {signal}");
    }
    // A mask is per thread and inherited by what the thread spawns: block a
    // signal in this one, which is the one that spawns below.
    // SAFETY: both sets are initialised locals that outlive the call;
    // blocking SIGUSR1 in the test's own thread harms nothing.
    unsafe {
        let mut block: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut block);
        libc::sigaddset(&mut block, libc::SIGUSR1);
        let error = libc::pthread_sigmask(libc::SIG_BLOCK, &block, std::ptr::null_mut());
        assert_eq!(error, 0, "block SIGUSR1");
    }

    let dir = TestDir::new("sigdisp");
    let guard = ProcessGuard::new();
    // /bin/sleep installs no handler and ignores nothing of its own, so
    // whatever shows in its masks came from the spawn.
    let plain = SpawnSpec {
        service: "probe".to_owned(),
        program: PathBuf::from("/bin/sleep"),
        args: vec!["1000".to_owned()],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: dir.path().to_owned(),
        ..SpawnSpec::default()
    };
    // An rlimit takes the clone path, whose child resets the signals itself.
    let cloned = SpawnSpec {
        rlimits: vec![(Rlimit::Core, RlimitValue::Limited(0))],
        ..plain.clone()
    };
    for (path, spec) in [("posix_spawn", plain), ("clone", cloned)] {
        let mut child = UnixSpawner::plain()
            .spawn(&spec)
            .unwrap_or_else(|e| panic!("spawn /bin/sleep ({path}): {e}"));
        let pid = child.pid();
        guard.add_pgid(i32::try_from(pid).unwrap());
        // The spawn returns only after the exec succeeded: these masks are
        // the ones /bin/sleep started with.
        for field in ["SigIgn:", "SigBlk:", "SigCgt:"] {
            let mask = signal_mask(pid, field);
            assert_eq!(
                mask,
                0,
                "{path}: {field} {mask:016x}: signals {:?} of /proc/{pid}/status",
                set_bits(mask)
            );
        }
        // A real-time signal at its default ends the process, and the exit
        // still says which one (nix, for one, has no name for it).
        let realtime = libc::SIGRTMIN() + 4;
        assert!(
            signal_group(i32::try_from(pid).unwrap(), realtime),
            "signal the probe's group"
        );
        assert_eq!(
            within("reap the probe", child.wait()).await.unwrap(),
            ExitReason::Signaled {
                signal: realtime,
                core_dumped: false
            },
            "{path}"
        );
    }
    // The clone path blocked every signal in this thread around the clone:
    // it is back as it was.
    let mut current: libc::sigset_t = unsafe_zeroed_sigset();
    // SAFETY: a null new set only reads the mask into `current`, a local.
    let error = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut current) };
    assert_eq!(error, 0);
    for signal in 1..32 {
        // SAFETY: `current` is an initialised sigset_t.
        let blocked = unsafe { libc::sigismember(&current, signal) } == 1;
        assert_eq!(
            blocked,
            signal == libc::SIGUSR1,
            "signal {signal} in the test's mask"
        );
    }
}

fn unsafe_zeroed_sigset() -> libc::sigset_t {
    // SAFETY: a sigset_t is plain integers: all zeros is a valid (empty) set.
    unsafe { std::mem::zeroed() }
}
