//! An in-place upgrade's engine half with real processes, without the exec:
//! a daemon (`daemon::run`, in-process) freezes its services on
//! `DaemonEvent::Freeze` and returns without stopping them; a second daemon
//! in the same process, on the same data_dir, resumes them. The services
//! are `/bin/sh` scripts, as in the other tests here.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orchestrator_core::daemon::{DaemonEvent, DaemonHandles, Resumed, run};
use orchestrator_core::handover::FrozenService;
use orchestrator_core::plan::HostEnv;
use orchestrator_core::process::{Spawner, UnixSpawner};
use orchestrator_core::service::State;
use orchestrator_core::wire::Stream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Only turns a hang into a failure: a loaded machine never gets near it.
const DEADLINE: Duration = Duration::from_secs(60);

/// How many numbered lines the flooder writes, as fast as sh can.
const FLOOD_LINES: u32 = 200_000;

fn config() -> String {
    format!(
        r#"
[orchestrator]
log_max_bytes = 1000000000
shutdown_timeout = "10s"

[services.flood]
command = ["/bin/sh", "-c", "i=0; while [ $i -lt {FLOOD_LINES} ]; do echo \"line $i\"; i=$((i+1)); done; while [ ! -e stop ]; do sleep 0.05; done; echo done; exec sleep 1000"]
stop_timeout = "5s"

[services.crash]
command = ["/bin/sh", "-c", "exit 1"]
restart = "always"
max_restarts = 1000
backoff = {{ initial = "3s", max = "3s" }}

[services.calm]
command = ["/bin/sh", "-c", "exec sleep 1000"]
stop_timeout = "5s"
"#
    )
}

struct Daemon {
    funnel: mpsc::Sender<DaemonEvent>,
    handles: DaemonHandles,
    task: JoinHandle<Result<(), orchestrator_core::daemon::DaemonError>>,
}

async fn start(dir: &Path, spawner: &Arc<dyn Spawner>, resumed: Vec<FrozenService>) -> Daemon {
    // As after an exec: the run resumes what an older daemon froze.
    let upgraded_from = (!resumed.is_empty()).then(|| "0.0.9".to_owned());
    let config = orchestrator_core::config::parse(&config(), None, dir).unwrap();
    let (funnel, events) = mpsc::channel(4);
    let (ready, handles) = oneshot::channel();
    let host = HostEnv {
        path: "/usr/bin:/bin".to_owned(),
        tmpdir: "/tmp".to_owned(),
    };
    let spawner = Arc::clone(spawner);
    let task = tokio::spawn(async move {
        let mut events = events;
        run(
            config,
            None,
            spawner,
            host,
            &mut events,
            Some(ready),
            Resumed {
                services: resumed,
                upgraded_from,
            },
        )
        .await
    });
    let handles = tokio::time::timeout(DEADLINE, handles)
        .await
        .expect("handles within the deadline")
        .expect("the daemon hands out its handles");
    Daemon {
        funnel,
        handles,
        task,
    }
}

async fn until<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !done().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is not alive: it is gone but for its reaping.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_owned())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}

fn dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("orchestrator-freeze-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_go_on_across_a_freeze_and_a_resume_in_a_second_daemon() {
    let dir = dir("resume");
    let spawner: Arc<dyn Spawner> = Arc::new(UnixSpawner::plain());
    let first = start(&dir, &spawner, Vec::new()).await;
    let supervisor = first.handles.supervisor.clone();
    for name in ["flood", "calm"] {
        let handle = supervisor.service(name).await.unwrap();
        tokio::time::timeout(DEADLINE, handle.wait_for(|s| s.state == State::Running))
            .await
            .expect("running within the deadline")
            .unwrap();
    }
    let crash = supervisor.service("crash").await.unwrap();
    tokio::time::timeout(DEADLINE, crash.wait_for(|s| s.state == State::Restarting))
        .await
        .expect("in its backoff within the deadline")
        .unwrap();
    let crash_restarts = crash.status().restarts;
    // Frozen in the middle of the flood (on a fast machine it may be over).
    let flood = supervisor.service("flood").await.unwrap();
    until("the flood began", || {
        let flood = flood.clone();
        async move { flood.output().lines(Stream::Stdout) > 1000 }
    })
    .await;
    let pids: Vec<(String, u32)> = {
        let mut pids = Vec::new();
        for name in ["flood", "calm"] {
            pids.push((
                name.to_owned(),
                supervisor.info(name).await.unwrap().pid.unwrap(),
            ));
        }
        pids
    };

    let (reply, answer) = oneshot::channel();
    first
        .funnel
        .send(DaemonEvent::Freeze { reply })
        .await
        .unwrap();
    let frozen = tokio::time::timeout(DEADLINE, answer)
        .await
        .expect("frozen within the deadline")
        .unwrap()
        .expect("every service frozen");
    tokio::time::timeout(DEADLINE, first.task)
        .await
        .expect("the first daemon returns")
        .unwrap()
        .unwrap();
    assert_eq!(frozen.len(), 3);
    for (name, pid) in &pids {
        assert!(alive(*pid), "{name} ({pid}) runs on after the freeze");
    }
    drop(first.funnel);

    let second = start(&dir, &spawner, frozen).await;
    let supervisor = second.handles.supervisor.clone();
    for (name, pid) in &pids {
        let info = supervisor.info(name).await.unwrap();
        assert_eq!(info.pid, Some(*pid), "{name}: the same process");
        assert_eq!(info.state, State::Running, "{name}");
    }
    // The backoff ends in the second daemon: the crash service runs again.
    let crash = supervisor.service("crash").await.unwrap();
    until("the backoff's restart", || {
        let crash = crash.clone();
        async move { crash.status().restarts > crash_restarts }
    })
    .await;

    // Every numbered line is in the log file exactly once, in order.
    let definition = supervisor.definition("flood").await.unwrap();
    std::fs::write(definition.spawn.cwd.join("stop"), "").unwrap();
    let log = definition.log_path.clone();
    let data_dir = log.parent().and_then(Path::parent).unwrap().to_owned();
    until("the flood's last line in its log file", || {
        let log = log.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::fs::read_to_string(&log).is_ok_and(|text| text.ends_with("done\n"))
            })
            .await
            .unwrap()
        }
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    let mut expected = 0u32;
    for line in text.lines() {
        if line == "done" {
            continue;
        }
        assert_eq!(line, format!("line {expected}"), "after line {expected}");
        expected += 1;
    }
    assert_eq!(expected, FLOOD_LINES, "every line, once");

    // The history goes on with the upgrade.
    let events = data_dir.join("events.jsonl");
    until("upgraded in events.jsonl", || {
        let events = events.clone();
        async move {
            std::fs::read_to_string(&events).is_ok_and(|text| text.contains("\"upgraded\""))
        }
    })
    .await;

    // Stopping the second daemon stops everything.
    second.funnel.send(DaemonEvent::Shutdown).await.unwrap();
    tokio::time::timeout(DEADLINE, second.task)
        .await
        .expect("the second daemon stops")
        .unwrap()
        .unwrap();
    for (name, pid) in &pids {
        assert!(!alive(*pid), "{name} ({pid}) is stopped");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
