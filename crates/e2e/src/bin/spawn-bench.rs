//! The start cost of each way the spawner can start a process, measured
//! side by side: `spawn-bench [--n 1000] [--rounds 3] [--ballast-mib 0]`.
//!
//!   posix_spawn  the spawner's fast path (a plain spec)
//!   clone        the spawner's clone(CLONE_VM|CLONE_VFORK) path (forced by
//!                an rlimit; the child also resets 64 signals itself)
//!   fork         fork + execve, for comparison: what the clone path avoids
//!
//! Each start is `/bin/true`, spawned then waited for, one after the other.
//! Printed per way: the median over rounds of the mean time of the spawn
//! call (until the exec) and of spawn + exit + reap. `--ballast-mib N`
//! first touches N MiB, as a big daemon would hold: fork's page-table copy
//! grows with it, the other two do not. Release build: `cargo run --release
//! -p orchestrator-e2e --bin spawn-bench`. Not a test: it asserts nothing.

use std::ffi::CString;
use std::time::{Duration, Instant};

use orchestrator_core::config::{Rlimit, RlimitValue};
use orchestrator_core::process::{SpawnSpec, Spawner, UnixSpawner};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str, default: usize| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let n = value("--n", 1000);
    let rounds = value("--rounds", 3);
    let ballast_mib = value("--ballast-mib", 0);
    let ballast = touch(ballast_mib);

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    // The spawner registers each child's pidfd with the runtime's reactor.
    let _entered = runtime.enter();
    let plain = SpawnSpec {
        service: "bench".to_owned(),
        program: "/bin/true".into(),
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
        cwd: std::env::temp_dir(),
        ..SpawnSpec::default()
    };
    let cloned = SpawnSpec {
        rlimits: vec![(Rlimit::Core, RlimitValue::Limited(0))],
        ..plain.clone()
    };
    let spawner = UnixSpawner::plain();
    let ways: [&str; 3] = ["posix_spawn", "clone", "fork"];
    let mut results: Vec<Vec<(Duration, Duration)>> = vec![Vec::new(); ways.len()];
    for _ in 0..rounds {
        for (way, result) in ways.iter().zip(&mut results) {
            let (mut spawning, started) = (Duration::ZERO, Instant::now());
            for _ in 0..n {
                let t0 = Instant::now();
                match *way {
                    "fork" => {
                        let pid = fork_exec_true();
                        spawning += t0.elapsed();
                        wait_pid(pid);
                    }
                    _ => {
                        let spec = if *way == "clone" { &cloned } else { &plain };
                        let mut child = spawner.spawn(spec).expect("spawn /bin/true");
                        spawning += t0.elapsed();
                        runtime.block_on(child.wait()).expect("wait");
                    }
                }
            }
            result.push((spawning / n as u32, started.elapsed() / n as u32));
        }
    }
    println!(
        "{n} starts of /bin/true x {rounds} rounds, ballast {ballast_mib} MiB (touched {} pages)",
        ballast.len() / 4096
    );
    println!(
        "{:<12} {:>14} {:>22}",
        "way", "spawn call", "spawn + exit + reap"
    );
    for (way, mut result) in ways.into_iter().zip(results) {
        result.sort();
        let (spawn, total) = result[result.len() / 2];
        println!(
            "{way:<12} {:>11.1} us {:>19.1} us",
            spawn.as_secs_f64() * 1e6,
            total.as_secs_f64() * 1e6
        );
    }
}

/// `mib` MiB written page by page, so each page is really mapped.
fn touch(mib: usize) -> Vec<u8> {
    let mut ballast = vec![0u8; mib << 20];
    for page in ballast.chunks_mut(4096) {
        page[0] = 1;
    }
    ballast
}

/// fork, then execve /bin/true in the child; the child's pid.
fn fork_exec_true() -> libc::pid_t {
    let path = CString::new("/bin/true").unwrap();
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null()];
    // SAFETY: the child only calls execve and _exit, both async-signal-safe,
    // on memory prepared before the fork; nothing else runs in it.
    unsafe {
        let pid = libc::fork();
        if pid == 0 {
            libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
        assert!(pid > 0, "fork failed");
        pid
    }
}

fn wait_pid(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid writes the status into the local `status`.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {}
}
