//! Services that cannot even start fail with the reason in `last_error`,
//! and never keep a healthy neighbour from running. One test in this file:
//! it writes executables, which must all be closed before anything forks.

use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::config::{BackoffConfig, RestartPolicy, ServiceConfig};
use orchestrator_core::events::EventBus;
use orchestrator_core::process::UnixSpawner;
use orchestrator_core::service::State;
use orchestrator_core::supervisor::spawn_supervisor;
use orchestrator_e2e::*;

#[tokio::test]
async fn spawn_failures_are_explained_and_isolated() {
    let dir = TestDir::new("spawnfail");
    let guard = ProcessGuard::new();
    // Every file is written before the first spawn (see the file comment).
    let not_executable = dir.write_file("bin/noexec", "#!/bin/sh\nexit 0\n", 0o644);
    let no_shebang = dir.write_file("bin/noshebang", "echo 'ran through a shell'\n", 0o755);
    let missing = dir.join("bin/missing");

    let binary = |path: &std::path::Path, restart| ServiceConfig {
        binary_path: Some(path.to_owned()),
        restart: Some(restart),
        ..fixture(&[])
    };
    let config = config_in(
        &dir,
        vec![
            (
                // May retry: it waits out a (long) backoff.
                "missing",
                ServiceConfig {
                    backoff: BackoffConfig {
                        initial: Duration::from_secs(60),
                        max: Duration::from_secs(60),
                        reset_after: Duration::from_secs(60),
                    },
                    ..binary(&missing, RestartPolicy::Always)
                },
            ),
            ("noexec", binary(&not_executable, RestartPolicy::Never)),
            ("noshebang", binary(&no_shebang, RestartPolicy::Never)),
            ("healthy", fixture(&["--ready", "--sleep"])),
        ],
    );
    let supervisor = spawn_supervisor(
        definitions(&config),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    for handle in within("list", supervisor.services()).await.unwrap() {
        guard.watch(&handle);
    }
    let failures = within("start all", supervisor.start_all()).await.unwrap();
    assert_eq!(failures.len(), 3, "{failures:?}");

    // The healthy one runs regardless.
    assert!(supervisor.is_running("healthy").await);
    wait_for_line_async(&dir.log_path("healthy"), "READY").await;

    for (name, state, cause) in [
        ("missing", State::Restarting, "no such file"),
        ("noexec", State::Failed, "permission denied"),
        ("noshebang", State::Failed, "#!"),
    ] {
        let info = supervisor.info(name).await.unwrap();
        assert_eq!(info.state, state, "{name}: {info:?}");
        assert_eq!(info.pid, None, "{name}");
        let error = info.last_error.unwrap_or_default();
        assert!(
            error.contains(cause),
            "{name}: last_error {error:?} should mention {cause:?}"
        );
    }
    // Nothing ran the script through a shell.
    assert!(
        !read_lines(&dir.log_path("noshebang"))
            .iter()
            .any(|l| l.contains("ran through a shell"))
    );

    within("stop all", supervisor.stop_all()).await.unwrap();
    for info in supervisor.list().await.unwrap() {
        assert_eq!(info.state, State::Stopped, "{info:?}");
    }
}
