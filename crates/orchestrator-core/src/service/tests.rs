//! The state machine as a table, then the actor with the fake spawner on
//! tokio's paused clock: deterministic to the tick, no real processes.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::actor::spawn_with_machine;
use super::*;
use crate::config::{BackoffConfig, RestartPolicy};
use crate::events::{EventBus, EventKind};
use crate::name::ServiceName;
use crate::process::{ExitReason, FakeSpawner, SpawnSpec};

const MS: Duration = Duration::from_millis(1);

fn policy(restart: RestartPolicy, max_restarts: u32) -> Policy {
    Policy {
        restart,
        max_restarts,
        backoff: BackoffConfig {
            initial: 100 * MS,
            max: 800 * MS,
            reset_after: 1000 * MS,
        },
        start_limit: crate::config::StartLimit::default(),
        stop_signal: Signal::SIGTERM,
        stop_timeout: 1000 * MS,
        // Up at once: these tests are about the lifecycle, not readiness.
        ready: crate::service::ReadyWhen::Grace(Duration::ZERO),
    }
}

fn exact(restart: RestartPolicy, max_restarts: u32) -> Machine {
    Machine::new(policy(restart, max_restarts)).without_jitter()
}

/// The I/O effects of a step, without the events it published (those have
/// tests of their own below).
fn io(machine: &mut Machine, input: Input, now: Instant) -> Vec<Effect> {
    machine
        .step(input, now)
        .into_iter()
        .filter(|effect| !matches!(effect, Effect::Publish(_)))
        .collect()
}

/// Only the events a step published.
fn published(effects: Vec<Effect>) -> Vec<EventKind> {
    effects
        .into_iter()
        .filter_map(|effect| match effect {
            Effect::Publish(kind) => Some(kind),
            _ => None,
        })
        .collect()
}

fn code(code: i32) -> Input {
    Input::Exited(ExitReason::Exited(code))
}

/// Drive a machine from Stopped to Running at `now`.
fn running(machine: &mut Machine, now: Instant) {
    assert_eq!(io(machine, Input::Start, now), [Effect::Spawn]);
    assert_eq!(io(machine, Input::Spawned { pid: 42 }, now), []);
    assert_eq!(machine.state(), State::Running);
}

#[test]
fn start_spawns_and_runs() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    assert_eq!(m.state(), State::Stopped);
    assert_eq!(io(&mut m, Input::Start, now), [Effect::Spawn]);
    assert_eq!(m.state(), State::Starting);
    io(&mut m, Input::Spawned { pid: 7 }, now);
    assert_eq!(
        (m.state(), m.pid(), m.restarts()),
        (State::Running, Some(7), 0)
    );
    assert_eq!(
        io(&mut m, Input::Start, now),
        [],
        "start while running is a no-op"
    );
    assert_eq!(m.deadline(), None, "a running service arms no timer");
}

#[test]
fn restart_policy_table() {
    // (policy, exit, expected state after the exit)
    let table = [
        (RestartPolicy::Always, code(0), State::Restarting),
        (RestartPolicy::Always, code(1), State::Restarting),
        (RestartPolicy::OnFailure, code(0), State::Stopped),
        (RestartPolicy::OnFailure, code(2), State::Restarting),
        (
            RestartPolicy::OnFailure,
            Input::Exited(ExitReason::Signaled {
                signal: 9,
                core_dumped: false,
            }),
            State::Restarting,
        ),
        (RestartPolicy::Never, code(0), State::Stopped),
        (RestartPolicy::Never, code(1), State::Failed),
    ];
    for (restart, exit, expected) in table {
        let now = Instant::now();
        let mut m = exact(restart, 3);
        running(&mut m, now);
        io(&mut m, exit.clone(), now + MS);
        assert_eq!(m.state(), expected, "{restart:?} after {exit:?}");
        assert_eq!(m.pid(), None);
    }
}

#[test]
fn crash_loop_backs_off_exponentially_then_gives_up() {
    let mut now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 4);
    running(&mut m, now);
    let mut delays = Vec::new();
    loop {
        io(&mut m, code(1), now);
        let Some(until) = m.deadline() else { break };
        delays.push(until - now);
        now = until;
        assert_eq!(io(&mut m, Input::Timer, now), [Effect::Spawn]);
        io(&mut m, Input::Spawned { pid: 43 }, now);
    }
    assert_eq!(delays, [100 * MS, 200 * MS, 400 * MS, 800 * MS]);
    assert_eq!(m.state(), State::Failed);
    assert_eq!(m.restarts(), 4, "1 + max_restarts spawns in all");
    assert_eq!(
        m.requested_starts(),
        1,
        "only the first start was asked for"
    );
    assert_eq!(m.last_exit(), Some(ExitReason::Exited(1)));
    assert_eq!(
        m.last_error(),
        Some("gave up after 4 restarts: exited with code 1")
    );
}

#[test]
fn backoff_is_capped_at_max() {
    let backoff = policy(RestartPolicy::Always, 0).backoff;
    let delays: Vec<_> = (0..8).map(|n| Machine::backoff_base(&backoff, n)).collect();
    assert_eq!(
        delays,
        [100, 200, 400, 800, 800, 800, 800, 800].map(|ms| ms * MS)
    );
    assert_eq!(
        Machine::backoff_base(&backoff, 200),
        800 * MS,
        "no overflow"
    );
}

#[test]
fn max_restarts_zero_fails_at_first_exit() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 0);
    running(&mut m, now);
    io(&mut m, code(3), now);
    assert_eq!(m.state(), State::Failed);
    assert_eq!(m.deadline(), None);
}

#[test]
fn a_long_run_resets_the_failure_count() {
    let mut now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 10);
    running(&mut m, now);
    for _ in 0..3 {
        io(&mut m, code(1), now);
        now = m.deadline().unwrap();
        io(&mut m, Input::Timer, now);
        io(&mut m, Input::Spawned { pid: 1 }, now);
    }
    assert_eq!(m.consecutive_failures(), 3);
    now += 1000 * MS; // exactly reset_after of uptime
    io(&mut m, code(1), now);
    assert_eq!(m.consecutive_failures(), 1);
    assert_eq!(m.deadline(), Some(now + 100 * MS), "back at initial");
}

#[test]
fn jitter_stays_within_ten_percent() {
    for seed in 0..200 {
        let now = Instant::now();
        let mut m = Machine::new(policy(RestartPolicy::Always, 5)).with_seed(seed);
        running(&mut m, now);
        io(&mut m, code(1), now);
        let delay = m.deadline().unwrap() - now;
        assert!(
            (90 * MS..=110 * MS).contains(&delay),
            "seed {seed}: {delay:?}"
        );
    }
}

#[test]
fn stop_signals_then_kills_after_the_timeout() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    assert_eq!(
        io(&mut m, Input::Stop, now),
        [Effect::SignalGroup(Signal::SIGTERM)]
    );
    assert!(m.is_stopping());
    assert_eq!(m.deadline(), Some(now + 1000 * MS));
    assert_eq!(io(&mut m, Input::Timer, now + 999 * MS), [], "not yet");
    assert_eq!(
        io(&mut m, Input::Timer, now + 1000 * MS),
        [Effect::SignalGroup(Signal::SIGKILL)]
    );
    assert_eq!(m.deadline(), None, "SIGKILL is sent once");
    let killed = Input::Exited(ExitReason::Signaled {
        signal: 9,
        core_dumped: false,
    });
    assert_eq!(io(&mut m, killed, now + 1001 * MS), []);
    assert_eq!(m.state(), State::Stopped);
    assert_eq!(
        m.last_error(),
        Some("stopped with SIGKILL: still running 1s (stop_timeout) after SIGTERM"),
        "a stop that had to kill says so"
    );
    // The next clean stop forgets it.
    running(&mut m, now + 2000 * MS);
    assert_eq!(m.last_error(), None);
    io(&mut m, Input::Stop, now + 2000 * MS);
    io(&mut m, code(0), now + 2001 * MS);
    assert_eq!(m.last_error(), None);
}

#[test]
fn a_restart_waiting_out_its_backoff_says_when() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    assert_eq!(m.retry_at(), None);
    io(&mut m, code(1), now + MS);
    assert_eq!(m.state(), State::Restarting);
    assert_eq!(m.retry_at(), Some(now + 101 * MS));
    io(&mut m, Input::Timer, now + 101 * MS);
    assert_eq!(m.retry_at(), None);
}

#[test]
fn a_stopped_service_never_restarts_on_a_late_exit_or_timer() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    io(&mut m, Input::Stop, now);
    // The process crashed on its own at the same moment: still a stop.
    assert_eq!(io(&mut m, code(1), now), []);
    assert_eq!(m.state(), State::Stopped);
    assert_eq!(io(&mut m, Input::Timer, now + 5000 * MS), []);
    assert_eq!(io(&mut m, code(1), now + 5000 * MS), []);
    assert_eq!(m.state(), State::Stopped);
}

#[test]
fn stop_during_backoff_cancels_the_restart() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    io(&mut m, code(1), now);
    assert_eq!(m.state(), State::Restarting);
    assert_eq!(io(&mut m, Input::Stop, now + MS), []);
    assert_eq!(m.state(), State::Stopped);
    assert_eq!(m.deadline(), None);
    assert_eq!(io(&mut m, Input::Timer, now + 1000 * MS), [], "stale timer");
    assert_eq!(m.state(), State::Stopped);
}

#[test]
fn restart_stops_then_spawns_and_counts() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Never, 3);
    running(&mut m, now);
    assert_eq!(
        io(&mut m, Input::Restart, now),
        [Effect::SignalGroup(Signal::SIGTERM)]
    );
    assert_eq!(io(&mut m, code(0), now), [Effect::Spawn]);
    io(&mut m, Input::Spawned { pid: 9 }, now);
    assert_eq!(
        (m.state(), m.restarts(), m.requested_starts()),
        (State::Running, 0, 2),
        "a restart asked for is counted apart from the restarts after failures"
    );
}

#[test]
fn a_user_start_resets_the_failure_count() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 0);
    running(&mut m, now);
    io(&mut m, code(1), now);
    assert_eq!(m.state(), State::Failed);
    running(&mut m, now);
    assert_eq!(m.consecutive_failures(), 0);
    assert_eq!(m.last_error(), None);
}

#[test]
fn spawn_failures_back_off_unless_never() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::OnFailure, 1);
    io(&mut m, Input::Start, now);
    io(
        &mut m,
        Input::SpawnFailed {
            error: "no such file".into(),
            permanent: false,
        },
        now,
    );
    assert_eq!(m.state(), State::Restarting);
    assert_eq!(m.last_error(), Some("no such file"));
    io(&mut m, Input::Timer, now + 100 * MS);
    io(
        &mut m,
        Input::SpawnFailed {
            error: "no such file".into(),
            permanent: false,
        },
        now + 100 * MS,
    );
    assert_eq!(m.state(), State::Failed);

    let mut never = exact(RestartPolicy::Never, 5);
    io(&mut never, Input::Start, now);
    io(
        &mut never,
        Input::SpawnFailed {
            error: "denied".into(),
            permanent: false,
        },
        now,
    );
    assert_eq!(never.state(), State::Failed);
}

/// A checksum mismatch (or a refused binary) cannot pass on a retry: the
/// service fails at once, with the reason, and no timer is left.
#[test]
fn a_permanent_spawn_failure_gives_up_at_once() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 10);
    io(&mut m, Input::Start, now);
    let effects = io(
        &mut m,
        Input::SpawnFailed {
            error: "checksum mismatch".into(),
            permanent: true,
        },
        now,
    );
    assert_eq!(m.state(), State::Failed);
    assert_eq!(m.last_error(), Some("checksum mismatch"));
    assert_eq!(m.deadline(), None);
    assert!(!effects.contains(&Effect::Spawn), "{effects:?}");
    // A user's start tries again (the binary may have been fixed).
    assert!(io(&mut m, Input::Start, now + MS).contains(&Effect::Spawn));
}

#[test]
fn kill_skips_the_grace_period() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    io(&mut m, Input::Stop, now);
    assert_eq!(
        io(&mut m, Input::Kill, now + MS),
        [Effect::SignalGroup(Signal::SIGKILL)]
    );
    assert_eq!(io(&mut m, Input::Kill, now + MS), [], "killed once");
    assert_eq!(m.deadline(), None);
}

// ---- readiness: start_grace, READY=1 / first probe pass, faults ----

fn with_ready(restart: RestartPolicy, ready: crate::service::ReadyWhen) -> Machine {
    let mut policy = policy(restart, 3);
    policy.ready = ready;
    Machine::new(policy).without_jitter()
}

fn spawned(machine: &mut Machine, now: Instant) {
    assert_eq!(io(machine, Input::Start, now), [Effect::Spawn]);
    io(machine, Input::Spawned { pid: 42 }, now);
}

#[test]
fn a_service_is_starting_until_its_grace_has_passed() {
    let now = Instant::now();
    let mut m = with_ready(
        RestartPolicy::Always,
        crate::service::ReadyWhen::Grace(1000 * MS),
    );
    spawned(&mut m, now);
    assert_eq!((m.state(), m.pid()), (State::Starting, Some(42)));
    assert_eq!(m.deadline(), Some(now + 1000 * MS));
    assert_eq!(published(m.step(Input::Timer, now + 999 * MS)), []);
    assert_eq!(m.state(), State::Starting, "an early timer changes nothing");
    assert_eq!(
        published(m.step(Input::Timer, now + 1000 * MS)),
        [EventKind::Ready]
    );
    assert_eq!((m.state(), m.deadline()), (State::Running, None));
}

#[test]
fn an_exit_within_the_grace_is_a_failed_start_naming_its_last_words() {
    let now = Instant::now();
    let mut m = with_ready(
        RestartPolicy::Never,
        crate::service::ReadyWhen::Grace(1000 * MS),
    );
    spawned(&mut m, now);
    m.step(Input::LastWords("cannot bind :8080".into()), now + 10 * MS);
    m.step(code(3), now + 10 * MS);
    assert_eq!(m.state(), State::Failed);
    assert_eq!(
        m.last_error(),
        Some("exited with code 3 while starting; its last words: cannot bind :8080")
    );
    // The words belong to that process: the next start's exit does not repeat them.
    spawned(&mut m, now + 20 * MS);
    m.step(code(4), now + 30 * MS);
    assert_eq!(m.last_error(), Some("exited with code 4 while starting"));
}

#[test]
fn a_signalled_start_waits_for_ready_and_fails_at_its_timeout() {
    let now = Instant::now();
    let ready = crate::service::ReadyWhen::Signalled { timeout: 5000 * MS };
    let mut m = with_ready(RestartPolicy::Always, ready);
    spawned(&mut m, now);
    assert_eq!(m.state(), State::Starting);
    assert_eq!(
        published(m.step(Input::Ready, now + MS)),
        [EventKind::Ready]
    );
    assert_eq!(m.state(), State::Running);
    assert_eq!(
        published(m.step(Input::Ready, now + 2 * MS)),
        [],
        "once only"
    );

    let mut m = with_ready(RestartPolicy::Always, ready);
    spawned(&mut m, now);
    let at = now + 5000 * MS;
    assert_eq!(
        m.step(Input::Timer, at),
        [
            Effect::Publish(EventKind::Faulted {
                reason: "not ready within 5s of its start".into()
            }),
            Effect::SignalGroup(Signal::SIGTERM),
        ]
    );
    assert_eq!(m.state(), State::Stopping);
    assert!(m.wants_to_run(), "a fault's stop is followed by a restart");
    m.step(code(143), at + MS);
    assert_eq!(m.state(), State::Restarting);
    assert_eq!(m.last_error(), Some("not ready within 5s of its start"));
    assert_eq!(m.consecutive_failures(), 1);
}

#[test]
fn extend_timeout_moves_a_starts_deadline_out_never_in() {
    let now = Instant::now();
    let ready = crate::service::ReadyWhen::Signalled { timeout: 5000 * MS };
    let mut m = with_ready(RestartPolicy::Always, ready);
    spawned(&mut m, now);
    m.step(Input::ExtendStart(1000 * MS), now + MS);
    assert_eq!(m.deadline(), Some(now + 5000 * MS), "never in");
    m.step(Input::ExtendStart(8000 * MS), now + 2000 * MS);
    assert_eq!(m.deadline(), Some(now + 10_000 * MS));
    assert_eq!(published(m.step(Input::Timer, now + 5000 * MS)), []);
    assert_eq!(m.state(), State::Starting);
    m.step(Input::Timer, now + 10_000 * MS);
    assert_eq!(
        m.state(),
        State::Stopping,
        "then it fails as any late start"
    );
    // The next process starts with the plain timeout.
    m.step(code(143), now + 10_001 * MS);
    let retry = m.deadline().unwrap();
    m.step(Input::Timer, retry);
    io(&mut m, Input::Spawned { pid: 43 }, retry);
    assert_eq!(m.deadline(), Some(retry + 5000 * MS));
}

#[test]
fn a_fault_stops_the_process_and_the_restart_policy_decides() {
    for (restart, after) in [
        (RestartPolicy::Always, State::Restarting),
        (RestartPolicy::OnFailure, State::Restarting),
        (RestartPolicy::Never, State::Failed),
    ] {
        let now = Instant::now();
        let mut m = exact(restart, 3);
        running(&mut m, now);
        let effects = m.step(
            Input::Faulted {
                reason: "unhealthy: status 500".into(),
            },
            now + MS,
        );
        assert!(effects.contains(&Effect::SignalGroup(Signal::SIGTERM)));
        assert_eq!(m.state(), State::Stopping);
        // A second fault while stopping changes nothing.
        assert_eq!(m.step(Input::Faulted { reason: "x".into() }, now + MS), []);
        // Exit 0 after the stop signal is still a failure: it was made to stop.
        let events = published(m.step(code(0), now + 2 * MS));
        assert!(
            matches!(
                &events[0],
                EventKind::Exited {
                    expected: false,
                    ..
                }
            ),
            "{events:?}"
        );
        assert_eq!(m.state(), after, "{restart:?}");
        assert!(m.last_error().unwrap().contains("unhealthy: status 500"));
    }
}

#[test]
fn a_stop_or_shutdown_during_a_faults_stop_stays_stopped() {
    for input in [Input::Stop, Input::Shutdown] {
        let now = Instant::now();
        let mut m = exact(RestartPolicy::Always, 3);
        running(&mut m, now);
        m.step(
            Input::Faulted {
                reason: "watchdog".into(),
            },
            now,
        );
        assert_eq!(
            published(m.step(input.clone(), now + MS)),
            [EventKind::StopRequested]
        );
        assert!(!m.wants_to_run());
        m.step(code(0), now + 2 * MS);
        assert_eq!(m.state(), State::Stopped, "{input:?}");
    }
}

#[test]
fn ready_and_faults_for_no_running_process_are_ignored() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    for input in [
        Input::Ready,
        Input::Faulted {
            reason: "late".into(),
        },
        Input::LastWords("late".into()),
    ] {
        assert_eq!(m.step(input, now), []);
        assert_eq!(m.state(), State::Stopped);
    }
}

// ---- the actor, with the fake spawner and the paused clock ----

pub(crate) fn definition(restart: RestartPolicy, max_restarts: u32) -> ServiceDefinition {
    let dir = std::env::temp_dir().join(format!("orchestrator-actor-test-{}", std::process::id()));
    ServiceDefinition {
        name: ServiceName::parse("svc").unwrap(),
        configured: true,
        enabled: true,
        binary: None,
        spawn: SpawnSpec {
            service: "svc".into(),
            program: PathBuf::from("/bin/true"),
            args: vec![],
            env: vec![],
            cwd: dir.join("data"),
            ..SpawnSpec::default()
        },
        policy: policy(restart, max_restarts),
        log_path: dir.join("logs/svc.log"),
        log_max_bytes: 1 << 20,
        log_max_files: 1,
        log_file: Default::default(),
        notify: false,
        watchdog: None,
        health: None,
        depends_on: Vec::new(),
    }
}

fn actor(restart: RestartPolicy, max_restarts: u32) -> (ServiceHandle, FakeSpawner) {
    let spawner = FakeSpawner::new();
    let def = definition(restart, max_restarts);
    let machine = Machine::new(def.policy.clone()).without_jitter();
    let (handle, _task) = spawn_with_machine(
        def,
        Arc::new(spawner.clone()),
        EventBus::in_memory(),
        machine,
    );
    (handle, spawner)
}

#[tokio::test(start_paused = true)]
async fn actor_crash_loop_spawns_at_exact_backoff_times() {
    let (handle, spawner) = actor(RestartPolicy::Always, 4);
    handle.start().await.unwrap();
    let t0 = Instant::now();
    for n in 1..=5 {
        spawner.wait_for_spawns(n).await;
        spawner.last_child().unwrap().exit(ExitReason::Exited(1));
    }
    let status = handle.wait_for(|s| s.state == State::Failed).await.unwrap();
    let offsets: Vec<_> = spawner.spawn_times().iter().map(|t| *t - t0).collect();
    assert_eq!(
        offsets,
        [0, 100, 300, 700, 1500].map(|ms| ms * MS),
        "spawns at base·2^k"
    );
    assert_eq!(status.restarts, 4);
    assert_eq!(status.last_exit, Some(ExitReason::Exited(1)));
    // And nothing more, however long we wait.
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(spawner.spawn_count(), 5);
}

#[tokio::test(start_paused = true)]
async fn actor_stop_escalates_to_sigkill_after_exactly_the_timeout() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    spawner.ignore_stop_signal(true);
    handle.start().await.unwrap();
    let t0 = Instant::now();
    handle.stop().await.unwrap();
    let child = spawner.last_child().unwrap();
    let signals = child.signals();
    assert_eq!(signals[0], (t0, Signal::SIGTERM));
    assert_eq!(signals[1], (t0 + 1000 * MS, Signal::SIGKILL));
    assert_eq!(handle.status().state, State::Stopped);
    assert!(child.is_reaped());
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(spawner.spawn_count(), 1, "never restarted after a stop");
}

#[tokio::test(start_paused = true)]
async fn actor_stop_returns_when_the_child_obeys() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    handle.start().await.unwrap();
    let t0 = Instant::now();
    handle.stop().await.unwrap();
    assert_eq!(Instant::now(), t0, "no waiting for a child that obeys");
    let signals = spawner.last_child().unwrap().signals();
    assert_eq!(signals[0].1, Signal::SIGTERM);
    // The leftover-killing SIGKILL after the leader was reaped.
    assert_eq!(signals[1].1, Signal::SIGKILL);
}

#[tokio::test(start_paused = true)]
async fn actor_stop_during_backoff_never_spawns_again() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    handle.start().await.unwrap();
    spawner.last_child().unwrap().exit(ExitReason::Exited(1));
    handle
        .wait_for(|s| s.state == State::Restarting)
        .await
        .unwrap();
    handle.stop().await.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(spawner.spawn_count(), 1);
    assert_eq!(handle.status().state, State::Stopped);
}

#[tokio::test(start_paused = true)]
async fn actor_exit_racing_a_stop_is_not_restarted() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    spawner.ignore_stop_signal(true);
    handle.start().await.unwrap();
    let child = spawner.last_child().unwrap();
    let stop = tokio::spawn({
        let handle = handle.clone();
        async move { handle.stop().await }
    });
    handle
        .wait_for(|s| s.state == State::Stopping)
        .await
        .unwrap();
    child.exit(ExitReason::Exited(1));
    stop.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(spawner.spawn_count(), 1);
    assert_eq!(handle.status().state, State::Stopped);
}

#[tokio::test(start_paused = true)]
async fn actor_start_reports_why_it_could_not_start() {
    let (handle, spawner) = actor(RestartPolicy::Always, 1);
    spawner.fail_always("exec failed: no such file");
    let error = handle.start().await.unwrap_err();
    assert_eq!(
        error.to_string(),
        "service svc: could not start: exec failed: no such file"
    );
    let status = handle.wait_for(|s| s.state == State::Failed).await.unwrap();
    assert!(status.last_error.unwrap().contains("no such file"));
    assert_eq!(spawner.spawn_count(), 2, "1 + max_restarts attempts");
    // A user start resets the count and, once the binary is fixed, runs.
    spawner.succeed();
    handle.start().await.unwrap();
    assert_eq!(handle.status().state, State::Running);
}

#[tokio::test(start_paused = true)]
async fn actor_restart_runs_a_new_process() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    handle.start().await.unwrap();
    let first = handle.status().pid.unwrap();
    handle.restart().await.unwrap();
    let status = handle.status();
    assert_ne!(status.pid.unwrap(), first);
    assert_eq!((status.restarts, status.requested_starts), (0, 2));
    assert_eq!(spawner.spawn_count(), 2);
}

#[tokio::test(start_paused = true)]
async fn actor_passes_the_spec_unchanged() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    handle.start().await.unwrap();
    assert_eq!(
        spawner.specs()[0],
        definition(RestartPolicy::Always, 3).spawn
    );
}

fn kinds(bus: &EventBus) -> Vec<String> {
    bus.history()
        .iter()
        .map(|e| {
            let json = serde_json::to_value(&e.kind).unwrap();
            json["event"].as_str().unwrap().to_owned()
        })
        .collect()
}

#[tokio::test(start_paused = true)]
async fn actor_publishes_lifecycle_events() {
    let spawner = FakeSpawner::new();
    let bus = EventBus::in_memory();
    let def = definition(RestartPolicy::Always, 1);
    let machine = Machine::new(def.policy.clone()).without_jitter();
    let (handle, _task) = spawn_with_machine(def, Arc::new(spawner.clone()), bus.clone(), machine);
    handle.start().await.unwrap();
    spawner.last_child().unwrap().exit(ExitReason::Exited(2));
    spawner.wait_for_spawns(2).await;
    handle
        .wait_for(|s| s.state == State::Running)
        .await
        .unwrap();
    spawner.last_child().unwrap().exit(ExitReason::Exited(2));
    handle.wait_for(|s| s.state == State::Failed).await.unwrap();
    assert_eq!(
        kinds(&bus),
        [
            "started",
            "exited",
            "restart_scheduled",
            "started",
            "exited",
            "gave_up"
        ]
    );
    let history = bus.history();
    assert!(history.iter().all(|e| e.service.as_deref() == Some("svc")));
    assert_eq!(
        history[1].kind,
        EventKind::Exited {
            reason: "exited with code 2".into(),
            exit_code: 2,
            expected: false
        }
    );
    assert_eq!(
        history[2].kind,
        EventKind::RestartScheduled {
            delay_ms: 100,
            failures: 1,
            start_limited: false,
        }
    );
}

#[tokio::test(start_paused = true)]
async fn actor_reports_a_stop_that_timed_out() {
    let spawner = FakeSpawner::new();
    spawner.ignore_stop_signal(true);
    let bus = EventBus::in_memory();
    let (handle, _task) = spawn_service(
        definition(RestartPolicy::Always, 1),
        Arc::new(spawner.clone()),
        bus.clone(),
    );
    handle.start().await.unwrap();
    handle.stop().await.unwrap();
    assert_eq!(
        kinds(&bus),
        [
            "started",
            "stop_requested",
            "stop_timed_out",
            "exited",
            "stopped"
        ]
    );
    match &bus.history()[3].kind {
        EventKind::Exited { expected, .. } => assert!(expected),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn actor_refuses_starts_once_shut_down() {
    let (handle, spawner) = actor(RestartPolicy::Always, 3);
    handle.start().await.unwrap();
    handle.shutdown().await.unwrap();
    assert_eq!(handle.status().state, State::Stopped);
    for attempt in [handle.start().await, handle.restart().await] {
        assert_eq!(
            attempt,
            Err(ServiceError::ShuttingDown {
                service: "svc".into()
            })
        );
    }
    assert_eq!(spawner.spawn_count(), 1);
}

// ---- what the machine publishes ----

#[test]
fn a_crash_loop_publishes_exit_backoff_and_giving_up() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 1);
    m.step(Input::Start, now);
    assert_eq!(
        published(m.step(Input::Spawned { pid: 5 }, now)),
        [EventKind::Started { pid: 5 }]
    );
    assert_eq!(
        published(m.step(code(1), now)),
        [
            EventKind::Exited {
                reason: "exited with code 1".into(),
                exit_code: 1,
                expected: false,
            },
            EventKind::RestartScheduled {
                delay_ms: 100,
                failures: 1,
                start_limited: false,
            },
        ]
    );
    assert_eq!(published(m.step(Input::Timer, now + 100 * MS)), []);
    m.step(Input::Spawned { pid: 6 }, now + 100 * MS);
    let last = published(m.step(code(1), now + 100 * MS));
    assert_eq!(
        last[1],
        EventKind::GaveUp {
            error: "gave up after 1 restart: exited with code 1".into()
        }
    );
}

#[test]
fn a_stop_publishes_request_exit_and_stopped_and_a_timeout_once() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    assert_eq!(
        published(m.step(Input::Stop, now)),
        [EventKind::StopRequested]
    );
    assert_eq!(
        published(m.step(Input::Timer, now + 1000 * MS)),
        [EventKind::StopTimedOut]
    );
    let killed = Input::Exited(ExitReason::Signaled {
        signal: 9,
        core_dumped: false,
    });
    assert_eq!(
        published(m.step(killed, now + 1001 * MS)),
        [
            EventKind::Exited {
                reason: "killed by SIGKILL".into(),
                exit_code: 137,
                expected: true,
            },
            EventKind::Stopped,
        ]
    );
}

#[test]
fn a_stop_in_backoff_is_requested_and_stopped_at_once() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    m.step(code(1), now);
    assert_eq!(
        published(m.step(Input::Stop, now)),
        [EventKind::StopRequested, EventKind::Stopped]
    );
    assert_eq!(published(m.step(Input::Stop, now)), [], "stopped already");
}

#[test]
fn a_spawn_failure_is_published_with_its_backoff() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    m.step(Input::Start, now);
    let events = published(m.step(
        Input::SpawnFailed {
            error: "denied".into(),
            permanent: false,
        },
        now,
    ));
    assert_eq!(
        events,
        [
            EventKind::SpawnFailed {
                error: "denied".into()
            },
            EventKind::RestartScheduled {
                delay_ms: 100,
                failures: 1,
                start_limited: false,
            },
        ]
    );
}

// ---- closing: the daemon is going away ----

#[test]
fn after_shutdown_every_start_is_refused() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    assert_eq!(
        io(&mut m, Input::Shutdown, now),
        [Effect::SignalGroup(Signal::SIGTERM)]
    );
    assert!(m.is_closing());
    assert_eq!(m.step(Input::Start, now), [Effect::Refused]);
    assert_eq!(m.step(Input::Restart, now), [Effect::Refused]);
    assert_eq!(
        m.state(),
        State::Stopping,
        "a refused start changes nothing"
    );
    io(&mut m, code(0), now);
    assert_eq!(m.state(), State::Stopped);
    assert_eq!(m.step(Input::Start, now), [Effect::Refused]);
}

#[test]
fn a_shutdown_during_a_restart_does_not_start_again() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    io(&mut m, Input::Restart, now);
    assert!(m.wants_to_run());
    assert_eq!(io(&mut m, Input::Shutdown, now), []);
    assert_eq!(io(&mut m, code(0), now), [], "no spawn after the exit");
    assert_eq!(m.state(), State::Stopped);
}

#[test]
fn kill_closes_too_and_stops_a_backoff() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    m.step(code(1), now);
    assert_eq!(published(m.step(Input::Kill, now)), [EventKind::Stopped]);
    assert_eq!(m.state(), State::Stopped);
    assert_eq!(m.step(Input::Start, now), [Effect::Refused]);
}

#[test]
fn stale_answers_and_exits_change_nothing_in_any_phase() {
    // Every phase that is not waiting for them ignores spawn answers,
    // exits and early timers.
    let now = Instant::now();
    let stale = [
        Input::Spawned { pid: 1 },
        Input::SpawnFailed {
            error: "late".into(),
            permanent: false,
        },
        Input::Timer,
    ];
    let mut phases: Vec<Machine> = Vec::new();
    let stopped = exact(RestartPolicy::Always, 3);
    phases.push(stopped.clone());
    let mut run = stopped.clone();
    running(&mut run, now);
    phases.push(run.clone());
    let mut failed = exact(RestartPolicy::Never, 3);
    running(&mut failed, now);
    failed.step(code(1), now);
    phases.push(failed);
    for machine in phases {
        for input in &stale {
            let mut m = machine.clone();
            let before = (m.state(), m.pid(), m.restarts(), m.deadline());
            assert_eq!(
                m.step(input.clone(), now),
                [],
                "{input:?} in {:?}",
                before.0
            );
            assert_eq!(
                (m.state(), m.pid(), m.restarts(), m.deadline()),
                before,
                "{input:?}"
            );
        }
    }
}

// ---- the start limit: no configuration makes a crash loop spin ----

fn no_backoff() -> Machine {
    let mut policy = policy(RestartPolicy::Always, u32::MAX);
    policy.backoff = BackoffConfig {
        initial: Duration::ZERO,
        max: Duration::ZERO,
        reset_after: Duration::from_secs(60),
    };
    Machine::new(policy).without_jitter()
}

/// Each restart delay of a service that dies `lived` after each start.
fn delays(m: &mut Machine, lived: Duration, runs: usize) -> Vec<(Duration, bool)> {
    let mut now = Instant::now();
    io(m, Input::Start, now);
    let mut delays = Vec::new();
    for _ in 0..runs {
        io(m, Input::Spawned { pid: 1 }, now);
        now += lived;
        let limited = m.step(code(1), now).into_iter().find_map(|e| match e {
            Effect::Publish(EventKind::RestartScheduled { start_limited, .. }) => {
                Some(start_limited)
            }
            _ => None,
        });
        let until = m.deadline().expect("a restart is scheduled");
        delays.push((until - now, limited.expect("a restart_scheduled event")));
        now = until;
        assert_eq!(io(m, Input::Timer, now), [Effect::Spawn]);
    }
    delays
}

#[test]
fn a_loop_that_dies_at_once_is_slowed_after_the_burst_even_with_no_backoff() {
    let mut m = no_backoff();
    let seen = delays(&mut m, Duration::ZERO, 8);
    let immediate = (Duration::ZERO, false);
    let floored = (crate::config::START_LIMIT_DELAY, true);
    assert_eq!(
        seen,
        [
            immediate, immediate, immediate, immediate, floored, floored, floored, floored
        ],
        "the first restarts stay immediate; from the 5th quick death on, at least 1 s"
    );
}

#[test]
fn runs_that_lived_a_while_are_not_a_spin() {
    // As the side-by-side benchmark does: a service living 0.2 s with no
    // backoff is restarted at once, every time.
    let mut m = no_backoff();
    let seen = delays(&mut m, Duration::from_millis(200), 30);
    assert!(
        seen.iter()
            .all(|&(delay, limited)| delay.is_zero() && !limited),
        "{seen:?}"
    );
}

#[test]
fn quick_deaths_spread_wider_than_the_interval_do_not_hit_the_limit() {
    let mut m = no_backoff();
    let mut now = Instant::now();
    io(&mut m, Input::Start, now);
    for _ in 0..10 {
        io(&mut m, Input::Spawned { pid: 1 }, now);
        m.step(code(1), now);
        assert_eq!(m.deadline(), Some(now), "immediate");
        // Waits 3 s before the next start: 5 deaths take 12 s > 10 s.
        now += Duration::from_secs(3);
        io(&mut m, Input::Timer, now);
    }
}

#[test]
fn spawn_failures_count_as_quick_deaths() {
    let mut m = no_backoff();
    let now = Instant::now();
    io(&mut m, Input::Start, now);
    let mut last = Duration::ZERO;
    for _ in 0..6 {
        io(
            &mut m,
            Input::SpawnFailed {
                error: "no such file".into(),
                permanent: false,
            },
            now,
        );
        last = m.deadline().unwrap() - now;
        io(&mut m, Input::Timer, now + last);
    }
    assert_eq!(last, crate::config::START_LIMIT_DELAY);
}

#[test]
fn a_failed_spawn_keeps_the_last_exit_code() {
    // A killed service whose restart cannot spawn still shows 137.
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, now);
    m.step(
        Input::Exited(ExitReason::Signaled {
            signal: 9,
            core_dumped: false,
        }),
        now,
    );
    let restart_at = m.deadline().unwrap();
    io(&mut m, Input::Timer, restart_at);
    m.step(
        Input::SpawnFailed {
            error: "no such file".into(),
            permanent: false,
        },
        now,
    );
    assert_eq!(m.last_exit().map(ExitReason::code), Some(137));
    assert_eq!(m.last_error(), Some("no such file"));
}

#[tokio::test(start_paused = true)]
async fn an_actor_whose_process_dies_at_once_with_no_backoff_does_not_spin() {
    let spawner = FakeSpawner::new();
    let mut def = definition(RestartPolicy::Always, u32::MAX);
    def.policy.backoff = BackoffConfig {
        initial: Duration::ZERO,
        max: Duration::ZERO,
        reset_after: Duration::from_secs(60),
    };
    let machine = Machine::new(def.policy.clone());
    let (handle, _task) = spawn_with_machine(
        def,
        Arc::new(spawner.clone()),
        EventBus::in_memory(),
        machine,
    );
    // Every spawn fails: the quickest death there is.
    spawner.fail_always("exec failed");
    let _ = handle.start().await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let spawns = spawner.spawn_count();
    // 5 quick ones, then one a second: about 15 in 10 s, not thousands.
    assert!((5..=20).contains(&spawns), "{spawns} spawns in 10 s");
}

/// An OOM kill is named as such (event, counter, last_error) and handled by
/// the restart policy like any other failure.
#[tokio::test(start_paused = true)]
async fn an_oom_kill_is_named_counted_and_restarted() {
    let spawner = FakeSpawner::new();
    let def = definition(RestartPolicy::OnFailure, 3);
    let machine = Machine::new(def.policy.clone()).without_jitter();
    let bus = EventBus::in_memory();
    let (handle, _task) = spawn_with_machine(def, Arc::new(spawner.clone()), bus.clone(), machine);
    handle.start().await.unwrap();
    spawner.last_child().unwrap().exit(ExitReason::OomKilled {
        memory_limit_mib: Some(256),
    });
    let status = handle
        .wait_for(|s| s.state == State::Restarting)
        .await
        .unwrap();
    assert_eq!(
        status.last_error.as_deref(),
        Some("killed by the OOM killer (memory_limit 256 MiB)")
    );
    assert_eq!(handle.resources().oom_kills(), 1);
    let kinds: Vec<EventKind> = bus.history().iter().map(|e| e.kind.clone()).collect();
    assert!(
        kinds.contains(&EventKind::OomKilled {
            memory_limit_mib: Some(256)
        }),
        "{kinds:?}"
    );
    spawner.wait_for_spawns(2).await;
    assert_eq!(handle.status().restarts, 1);
}

/// A service with notify and an exec check: the check passes (the fake's
/// probes exit 0), yet with notify only READY=1 makes it up; and the probe
/// runs without NOTIFY_SOCKET, so it cannot say READY=1 for the service.
#[tokio::test(start_paused = true)]
async fn an_exec_probe_of_a_notify_service_gets_no_notify_socket() {
    let spawner = FakeSpawner::new();
    spawner.set_probe_exit(Some(ExitReason::Exited(0)));
    let mut def = definition(RestartPolicy::Always, 3);
    def.notify = true;
    def.policy.ready = crate::service::ReadyWhen::Signalled {
        timeout: Duration::from_secs(30),
    };
    def.health = Some(Box::new(crate::health::HealthCheck {
        probe: crate::health::Probe::Exec {
            argv: vec!["/bin/true".into()],
        },
        interval: Duration::from_millis(100),
        timeout: Duration::from_secs(1),
        retries: 1,
        start_period: Duration::ZERO,
        on_unhealthy: crate::health::OnUnhealthy::Restart,
    }));
    let machine = Machine::new(def.policy.clone()).without_jitter();
    let (handle, _task) = spawn_with_machine(
        def,
        Arc::new(spawner.clone()),
        EventBus::in_memory(),
        machine,
    );
    // The request goes out now; its answer (after READY=1) is not awaited.
    drop(handle.auto_start());
    let status = handle
        .wait_for(|s| s.health == Some(crate::wire::Health::Healthy))
        .await
        .unwrap();
    assert_eq!(
        status.state,
        State::Starting,
        "notify: only READY=1 makes it up"
    );
    let service_env = &spawner.specs()[0].env;
    assert!(service_env.iter().any(|(k, _)| &**k == "NOTIFY_SOCKET"));
    let probe = &spawner.probe_specs()[0];
    assert!(
        !probe
            .env
            .iter()
            .any(|(k, _)| &**k == "NOTIFY_SOCKET" || &**k == "WATCHDOG_USEC"),
        "{:?}",
        probe.env
    );
}

#[test]
fn only_a_process_that_ended_by_itself_with_0_has_completed() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Never, 3);
    assert!(!m.completed(), "never run is not completed");
    running(&mut m, now);
    io(&mut m, code(0), now + MS);
    assert_eq!(m.state(), State::Stopped);
    assert!(m.completed(), "a one-shot that is done");
    let snapshot = m.snapshot(now + MS).unwrap();
    let restored = Machine::restore(m.policy().clone(), snapshot, now + MS);
    assert!(restored.completed(), "still done after an upgrade");
    running(&mut m, now + 2 * MS);
    assert!(!m.completed(), "runs again");
    io(&mut m, Input::Stop, now + 3 * MS);
    io(&mut m, code(0), now + 4 * MS);
    assert_eq!(m.state(), State::Stopped);
    assert!(!m.completed(), "stopped by a user, even with code 0");
    let mut m = exact(RestartPolicy::OnFailure, 3);
    running(&mut m, now);
    io(&mut m, code(1), now + MS);
    assert!(!m.completed(), "a failure is not completion");
}

// ---- Freezing for an upgrade: Machine::snapshot and Machine::restore ----

/// The machine in each phase a freeze can meet, built at `t0`.
fn frozen_phases(t0: Instant) -> Vec<(&'static str, Machine)> {
    use crate::service::ReadyWhen;
    let mut phases = Vec::new();

    phases.push(("stopped", exact(RestartPolicy::Always, 3)));

    let mut m = exact(RestartPolicy::Always, 0);
    running(&mut m, t0);
    m.step(code(1), t0 + 5 * MS);
    assert_eq!(m.state(), State::Failed);
    phases.push(("failed", m));

    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    phases.push(("running", m));

    let mut m = with_ready(RestartPolicy::Always, ReadyWhen::Grace(5000 * MS));
    spawned(&mut m, t0);
    phases.push(("starting in its grace", m));

    let mut m = with_ready(
        RestartPolicy::Always,
        ReadyWhen::Signalled { timeout: 2000 * MS },
    );
    spawned(&mut m, t0);
    m.step(Input::ExtendStart(9000 * MS), t0 + 100 * MS);
    phases.push(("starting, extended", m));

    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(Input::Stop, t0 + 10 * MS);
    phases.push(("stopping", m));

    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(Input::Restart, t0 + 10 * MS);
    phases.push(("stopping to restart", m));

    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(
        Input::Faulted {
            reason: "unhealthy".to_owned(),
        },
        t0 + 10 * MS,
    );
    phases.push(("stopping a fault", m));

    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(Input::Shutdown, t0 + 10 * MS);
    m.step(Input::Timer, t0 + 1010 * MS);
    phases.push(("stopping, killed, closing", m));

    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(Input::LastWords("panic: boom".to_owned()), t0 + 20 * MS);
    m.step(code(1), t0 + 20 * MS);
    m.step(Input::Timer, t0 + 120 * MS);
    m.step(Input::Spawned { pid: 43 }, t0 + 120 * MS);
    m.step(code(2), t0 + 130 * MS);
    assert_eq!(m.state(), State::Restarting);
    phases.push(("backoff", m));

    phases
}

/// Everything a caller can see of a machine, with each instant as an
/// offset from `base`: equal for machines that differ only by that shift.
fn observed(m: &Machine, base: Instant) -> String {
    let offset = |at: Option<Instant>| at.map(|at| at - base);
    format!(
        "{:?} pid={:?} ready={} closing={} wants={} restarts={} requested={} failures={} \
         exit={:?} error={:?} deadline={:?} retry_at={:?} since={:?}",
        m.state(),
        m.pid(),
        m.is_ready(),
        m.is_closing(),
        m.wants_to_run(),
        m.restarts(),
        m.requested_starts(),
        m.consecutive_failures(),
        m.last_exit(),
        m.last_error(),
        offset(m.deadline()),
        offset(m.retry_at()),
        offset(m.running_since()),
    )
}

/// Through JSON, as across the exec.
fn thaw(m: &Machine, frozen_at: Instant, thawed_at: Instant) -> Machine {
    let snapshot = m.snapshot(frozen_at).unwrap();
    let json = serde_json::to_string(&snapshot).unwrap();
    let snapshot = serde_json::from_str(&json).unwrap();
    Machine::restore(m.policy().clone(), snapshot, thawed_at).without_jitter()
}

#[test]
fn every_phase_survives_a_freeze_with_its_timers_shifted() {
    let t0 = Instant::now();
    let frozen_at = t0 + 200 * MS;
    // The exec took this long: every deadline moves out by it.
    let gap = 750 * MS;
    for (name, m) in frozen_phases(t0) {
        let restored = thaw(&m, frozen_at, frozen_at + gap);
        assert_eq!(
            observed(&restored, t0 + gap),
            observed(&m, t0),
            "{name}: the same machine, {gap:?} later"
        );
    }
}

#[test]
fn a_restored_machine_goes_on_exactly_as_the_original() {
    let t0 = Instant::now();
    let frozen_at = t0 + 200 * MS;
    let gap = 750 * MS;
    // The same inputs, the restored machine `gap` later, give the same
    // effects: the counters, last words and quick failures carried over.
    let inputs = [
        Input::Timer,
        Input::Ready,
        Input::Spawned { pid: 44 },
        Input::LastWords("bye".to_owned()),
        code(1),
        Input::Timer,
        Input::Spawned { pid: 45 },
        code(0),
    ];
    for (name, mut m) in frozen_phases(t0) {
        let mut restored = thaw(&m, frozen_at, frozen_at + gap);
        for (i, input) in inputs.iter().enumerate() {
            // Each input at the original's next deadline, if any, else soon.
            let at = m.deadline().unwrap_or(frozen_at + (i as u32) * 10 * MS);
            let at = at.max(frozen_at);
            let want = m.step(input.clone(), at);
            let got = restored.step(input.clone(), at + gap);
            assert_eq!(got, want, "{name}: step {i} ({input:?})");
            assert_eq!(
                observed(&restored, t0 + gap),
                observed(&m, t0),
                "{name}: after step {i} ({input:?})"
            );
        }
    }
}

#[test]
fn a_spawn_in_flight_cannot_be_frozen() {
    let now = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    m.step(Input::Start, now);
    assert_eq!(
        m.snapshot(now).unwrap_err(),
        crate::handover::SnapshotError::Spawning
    );
    m.step(Input::Spawned { pid: 9 }, now);
    assert!(m.snapshot(now).is_ok());
}

#[test]
fn a_restored_stop_escalates_to_sigkill_at_its_remaining_time() {
    let t0 = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(Input::Stop, t0);
    // Frozen with 400 ms of the 1000 ms grace left; thawed 2 s later.
    let thawed_at = t0 + 2600 * MS;
    let mut m = thaw(&m, t0 + 600 * MS, thawed_at);
    assert_eq!(m.deadline(), Some(thawed_at + 400 * MS));
    assert_eq!(io(&mut m, Input::Timer, thawed_at + 399 * MS), []);
    assert_eq!(
        m.step(Input::Timer, thawed_at + 400 * MS),
        [
            Effect::SignalGroup(Signal::SIGKILL),
            Effect::Publish(EventKind::StopTimedOut)
        ]
    );
    assert_eq!(io(&mut m, code(137), thawed_at + 401 * MS), []);
    assert_eq!(m.state(), State::Stopped);
}

#[tokio::test(start_paused = true)]
async fn actor_a_restored_backoff_restarts_at_its_remaining_time() {
    let t0 = Instant::now();
    let mut m = exact(RestartPolicy::Always, 3);
    running(&mut m, t0);
    m.step(code(1), t0);
    m.step(Input::Timer, t0 + 100 * MS);
    m.step(Input::Spawned { pid: 43 }, t0 + 100 * MS);
    m.step(code(1), t0 + 100 * MS);
    // Second failure: 200 ms of backoff, 150 ms of it left when frozen.
    assert_eq!(m.retry_at(), Some(t0 + 300 * MS));
    let snapshot = m.snapshot(t0 + 150 * MS).unwrap();

    let spawner = FakeSpawner::new();
    let def = definition(RestartPolicy::Always, 3);
    let restored = Machine::restore(def.policy.clone(), snapshot, t0).without_jitter();
    let (handle, _task) = spawn_with_machine(
        def,
        Arc::new(spawner.clone()),
        EventBus::in_memory(),
        restored,
    );
    assert_eq!(handle.status().state, State::Restarting);
    spawner.wait_for_spawns(1).await;
    assert_eq!(spawner.spawn_times(), [t0 + 150 * MS]);
    let status = handle
        .wait_for(|s| s.state == State::Running)
        .await
        .unwrap();
    assert_eq!(status.restarts, 2, "counted on from the old daemon's");
}

#[test]
fn quick_failures_before_a_freeze_count_toward_the_start_limit_after_it() {
    let mut rules = policy(RestartPolicy::Always, 10);
    rules.start_limit = crate::config::StartLimit {
        burst: 2,
        interval: 10_000 * MS,
    };
    let limited = |effects: Vec<Effect>| {
        published(effects).into_iter().find_map(|kind| match kind {
            EventKind::RestartScheduled { start_limited, .. } => Some(start_limited),
            _ => None,
        })
    };
    let t0 = Instant::now();
    let mut m = Machine::new(rules.clone()).without_jitter();
    running(&mut m, t0);
    assert_eq!(limited(m.step(code(1), t0 + 10 * MS)), Some(false));

    // Frozen when that quick failure was 9.90 s or 9.94 s old; thawed (on
    // another clock) and failing quickly again 70 ms later: 9.97 s is
    // inside the 10 s window, 10.01 s is not.
    for (age, hits_the_limit) in [(9900 * MS, true), (9940 * MS, false)] {
        let snapshot = m.snapshot(t0 + 10 * MS + age).unwrap();
        assert_eq!(snapshot.quick_failure_ages, [age]);
        let thawed_at = t0 + 60_000 * MS;
        let mut m = Machine::restore(rules.clone(), snapshot, thawed_at).without_jitter();
        assert_eq!(io(&mut m, Input::Timer, thawed_at), [Effect::Spawn]);
        m.step(Input::Spawned { pid: 50 }, thawed_at);
        assert_eq!(
            limited(m.step(code(1), thawed_at + 70 * MS)),
            Some(hits_the_limit),
            "quick failure {age:?} old at the freeze"
        );
    }
}
