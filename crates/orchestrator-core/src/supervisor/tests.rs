//! The supervisor with the fake spawner on tokio's paused clock: services
//! added and removed while it runs, start-all, shutdown's deadline, and an
//! actor that panics.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

use super::*;
use crate::config::RestartPolicy;
use crate::events::{EventBus, EventKind};
use crate::process::{ExitReason, FakeSpawner};
use crate::service::tests::definition;

fn named(name: &str, enabled: bool) -> ServiceDefinition {
    let mut definition = definition(RestartPolicy::Always, 3);
    definition.name = ServiceName::parse(name).unwrap();
    definition.spawn.service = name.to_owned();
    definition.enabled = enabled;
    definition
}

fn supervisor(definitions: Vec<ServiceDefinition>) -> (SupervisorHandle, FakeSpawner, EventBus) {
    let spawner = FakeSpawner::new();
    let events = EventBus::in_memory();
    let handle = spawn_supervisor(definitions, Arc::new(spawner.clone()), events.clone());
    (handle, spawner, events)
}

#[tokio::test(start_paused = true)]
async fn start_all_starts_the_enabled_ones_and_reports_each_failure() {
    let (supervisor, spawner, _) =
        supervisor(vec![named("a", true), named("b", false), named("c", true)]);
    // The first spawn (of "a": services start in name order) fails.
    spawner.fail_next("no such file");
    let failures = supervisor.start_all().await.unwrap();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(
        failures[0].to_string().contains("service a"),
        "{failures:?}"
    );
    let states: Vec<(String, State)> = supervisor
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|info| (info.name, info.state))
        .collect();
    assert_eq!(
        states,
        [
            ("a".to_owned(), State::Restarting),
            ("b".to_owned(), State::Stopped),
            ("c".to_owned(), State::Running),
        ]
    );
    // Its reason says when the next try comes, and why it is needed.
    let a = supervisor.info("a").await.unwrap();
    let reason = a.reason.unwrap_or_default();
    assert!(
        reason.starts_with("retry in ") && reason.contains("no such file"),
        "{reason}"
    );
}

#[tokio::test(start_paused = true)]
async fn services_can_be_added_and_removed_while_it_runs() {
    let (supervisor, spawner, _) = supervisor(vec![named("a", true)]);
    supervisor.start_all().await.unwrap();
    let added = supervisor.add(named("b", true)).await.unwrap();
    added.start().await.unwrap();
    assert_eq!(supervisor.status("b").await.unwrap(), State::Running);
    assert!(matches!(
        supervisor.add(named("b", true)).await,
        Err(SupervisorError::AlreadyExists(name)) if name == "b"
    ));

    let child = spawner.last_child().unwrap();
    supervisor.remove("b").await.unwrap();
    assert!(child.is_reaped(), "a removed service's process is stopped");
    assert!(matches!(
        supervisor.info("b").await,
        Err(SupervisorError::UnknownService(_))
    ));
    let names: Vec<String> = supervisor
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|info| info.name)
        .collect();
    assert_eq!(names, ["a"]);
    assert_eq!(
        supervisor.definition("a").await.unwrap().name,
        "a",
        "the supervisor keeps each service's definition"
    );
}

#[tokio::test(start_paused = true)]
async fn shutdown_kills_what_outlives_its_timeout_exactly_then() {
    let (supervisor, spawner, _) = supervisor(vec![named("stubborn", true)]);
    spawner.ignore_stop_signal(true);
    supervisor.start_all().await.unwrap();
    let child = spawner.last_child().unwrap();
    let t0 = Instant::now();
    // The service's own stop_timeout (1 s) is longer than the shutdown's.
    supervisor
        .shutdown(Duration::from_millis(300))
        .await
        .unwrap();
    let signals: Vec<(Duration, Signal)> = child
        .signals()
        .into_iter()
        .map(|(at, signal)| (at - t0, signal))
        .collect();
    assert_eq!(
        signals[..2],
        [
            (Duration::ZERO, Signal::SIGTERM),
            (Duration::from_millis(300), Signal::SIGKILL)
        ]
    );
    assert!(child.is_reaped());
    assert!(matches!(
        supervisor.start("stubborn").await,
        Err(SupervisorError::Service(ServiceError::ShuttingDown { .. }))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_panicking_actor_is_reported_and_the_others_go_on() {
    let (supervisor, spawner, events) = supervisor(vec![named("a", true), named("b", true)]);
    spawner.panic_next("spawner bug");
    let result = supervisor.start("a").await;
    assert!(
        matches!(
            result,
            Err(SupervisorError::Service(ServiceError::Gone { .. }))
        ),
        "{result:?}"
    );
    // The supervisor learns of the end on its own task: poll its view.
    let info = loop {
        let info = supervisor.info("a").await.unwrap();
        if info.state == State::Failed {
            break info;
        }
        tokio::task::yield_now().await;
    };
    let error = info.last_error.unwrap();
    assert!(error.contains("it panicked: spawner bug"), "{error}");
    assert!(events.history().iter().any(|event| matches!(
        &event.kind,
        EventKind::SupervisionLost { error } if error.contains("spawner bug")
    )));
    supervisor.start("b").await.unwrap();
    assert_eq!(supervisor.status("b").await.unwrap(), State::Running);
}

#[tokio::test(start_paused = true)]
async fn when_every_handle_is_gone_the_processes_die_with_it() {
    let (supervisor, spawner, _) = supervisor(vec![named("a", true)]);
    supervisor.start_all().await.unwrap();
    let child = spawner.last_child().unwrap();
    drop(supervisor);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !child.is_reaped() {
        assert!(
            Instant::now() < deadline,
            "the process outlived its supervisor"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(child.signals()[0].1, Signal::SIGKILL);
}

#[tokio::test(start_paused = true)]
async fn a_service_whose_actor_panicked_can_be_removed_and_added_again() {
    let (supervisor, spawner, _) = supervisor(vec![named("a", true)]);
    spawner.panic_next("spawner bug");
    let _ = supervisor.start("a").await;
    while supervisor.info("a").await.unwrap().state != State::Failed {
        tokio::task::yield_now().await;
    }
    supervisor.remove("a").await.unwrap();
    supervisor.add(named("a", true)).await.unwrap();
    supervisor.start("a").await.unwrap();
    assert_eq!(supervisor.status("a").await.unwrap(), State::Running);
}

// ---- dependency order ----

fn depending(name: &str, on: &[(&str, crate::deps::Condition)]) -> ServiceDefinition {
    let mut definition = named(name, true);
    definition.policy.ready = crate::service::ReadyWhen::Grace(Duration::from_millis(500));
    definition.depends_on = on
        .iter()
        .map(|(dependency, condition)| crate::deps::Dependency {
            name: ServiceName::parse(dependency).unwrap(),
            condition: *condition,
        })
        .collect();
    definition
}

/// `start NAME` on a task of its own, as a client's request would be.
fn start_in_background(
    supervisor: &SupervisorHandle,
    name: &'static str,
) -> tokio::task::JoinHandle<Result<(), SupervisorError>> {
    let supervisor = supervisor.clone();
    tokio::spawn(async move { supervisor.start(name).await })
}

/// The spawn of `service`, by the specs the fake spawner saw, in order.
fn spawn_order(spawner: &FakeSpawner) -> Vec<String> {
    spawner
        .specs()
        .into_iter()
        .map(|spec| spec.service)
        .collect()
}

#[tokio::test(start_paused = true)]
async fn a_start_starts_the_dependencies_first_and_waits_until_they_are_up() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started), ("cache", Started)]),
        depending("cache", &[]),
        depending("db", &[]),
        depending("web", &[("api", Started)]),
    ]);
    let started = Instant::now();
    supervisor.start("web").await.unwrap();
    // Three grace periods one after the other: db and cache together, then
    // api, then web.
    assert_eq!(started.elapsed(), Duration::from_millis(1500));
    let order = spawn_order(&spawner);
    assert_eq!(order.len(), 4, "{order:?}");
    assert_eq!(order[2..], ["api", "web"]);
    let times = spawner.spawn_times();
    assert_eq!(times[0], times[1], "independent services start together");
    assert_eq!(times[2] - times[0], Duration::from_millis(500));
    for name in ["api", "cache", "db", "web"] {
        assert_eq!(supervisor.status(name).await.unwrap(), State::Running);
    }
}

#[tokio::test(start_paused = true)]
async fn a_waiting_service_shows_what_it_waits_for() {
    use crate::deps::Condition::Started;
    let (supervisor, _, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
    ]);
    let starting = start_in_background(&supervisor, "api");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let info = supervisor.info("api").await.unwrap();
    assert_eq!(info.state, State::Starting);
    assert_eq!(info.reason.as_deref(), Some("waiting for db (started)"));
    starting.await.unwrap().unwrap();
    let info = supervisor.info("api").await.unwrap();
    assert_eq!((info.state, info.reason), (State::Running, None));
}

#[tokio::test(start_paused = true)]
async fn a_dependency_that_fails_leaves_its_dependents_not_started_saying_why() {
    use crate::deps::Condition::Healthy;
    let mut db = depending("db", &[]);
    db.policy.restart = RestartPolicy::Never;
    let (supervisor, spawner, _) = supervisor(vec![depending("api", &[("db", Healthy)]), db]);
    spawner.fail_next("no such file");
    let error = supervisor.start("api").await.unwrap_err().to_string();
    assert!(
        error.contains(
            "service api: not started: its dependency db (healthy) cannot be met: db failed"
        ),
        "{error}"
    );
    assert_eq!(spawn_order(&spawner), ["db"], "api never spawned");
    let info = supervisor.info("api").await.unwrap();
    assert_eq!(info.state, State::Stopped);
    assert!(info.reason.unwrap().starts_with("not started: "));
}

#[tokio::test(start_paused = true)]
async fn a_completed_dependency_is_not_run_again() {
    use crate::deps::Condition::Completed;
    let mut migrate = depending("migrate", &[]);
    migrate.policy.restart = RestartPolicy::OnFailure;
    let (supervisor, spawner, _) =
        supervisor(vec![depending("api", &[("migrate", Completed)]), migrate]);
    let starting = start_in_background(&supervisor, "api");
    while spawner.spawn_count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    spawner.last_child().unwrap().exit(ExitReason::Exited(0));
    starting.await.unwrap().unwrap();
    assert_eq!(spawn_order(&spawner), ["migrate", "api"]);
    supervisor.stop("api").await.unwrap();
    supervisor.start("api").await.unwrap();
    assert_eq!(spawn_order(&spawner), ["migrate", "api", "api"]);
}

#[tokio::test(start_paused = true)]
async fn shutdown_stops_dependents_before_their_dependencies() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
        depending("web", &[("api", Started)]),
    ]);
    supervisor.start_all().await.unwrap();
    // Each takes 100 ms to stop: the order shows in the signal times.
    for child in spawner.children() {
        child.ignore_stop_signal_from_now();
    }
    let children: Vec<(String, _)> = spawn_order(&spawner)
        .into_iter()
        .zip(spawner.children())
        .collect();
    let stopper = {
        let children = children.clone();
        tokio::spawn(async move {
            loop {
                for (_, child) in &children {
                    if !child.signals().is_empty() && !child.is_reaped() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        child.exit(ExitReason::Exited(0));
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    supervisor.shutdown(Duration::from_secs(30)).await.unwrap();
    stopper.abort();
    let first_signal = |name: &str| {
        children
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, child)| child.signals().first().map(|(at, _)| *at))
            .unwrap()
    };
    assert!(first_signal("web") < first_signal("api"));
    assert!(first_signal("api") < first_signal("db"));
}

#[tokio::test(start_paused = true)]
async fn a_stop_while_waiting_for_dependencies_means_it_does_not_start_later() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
    ]);
    let starting = start_in_background(&supervisor, "api");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(supervisor.status("api").await.unwrap(), State::Starting);
    supervisor.stop("api").await.unwrap();
    let error = starting.await.unwrap().unwrap_err().to_string();
    assert!(error.contains("a later stop request overrode"), "{error}");
    assert_eq!(spawn_order(&spawner), ["db"], "api never spawned");
    let info = supervisor.info("api").await.unwrap();
    assert_eq!((info.state, info.reason), (State::Stopped, None));
}

#[tokio::test(start_paused = true)]
async fn two_starts_of_the_same_dependent_both_succeed() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
        depending("web", &[("api", Started)]),
    ]);
    let (api, web) = tokio::join!(supervisor.start("api"), supervisor.start("web"));
    api.unwrap();
    web.unwrap();
    assert_eq!(spawner.spawn_count(), 3, "{:?}", spawn_order(&spawner));
}

#[tokio::test(start_paused = true)]
async fn a_service_disabled_by_a_reload_while_waiting_does_not_start_later() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
    ]);
    let starting = {
        let supervisor = supervisor.clone();
        tokio::spawn(async move { supervisor.start_all().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut disabled = depending("api", &[("db", Started)]);
    disabled.enabled = false;
    supervisor.reconfigure(disabled, false).await.unwrap();
    starting.await.unwrap().unwrap();
    assert_eq!(spawn_order(&spawner), ["db"], "api never spawned");
    assert_eq!(supervisor.status("api").await.unwrap(), State::Stopped);
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_ordered_start_leaves_no_waiting_reason() {
    use crate::deps::Condition::Started;
    let (supervisor, _, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
    ]);
    let starting = start_in_background(&supervisor, "api");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(supervisor.status("api").await.unwrap(), State::Starting);
    // The client went away: the request's future is dropped mid-wait.
    starting.abort();
    let _ = starting.await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let info = supervisor.info("api").await.unwrap();
    assert_eq!((info.state, info.reason), (State::Stopped, None));
}

#[tokio::test(start_paused = true)]
async fn a_dependency_in_its_backoff_is_waited_for_not_restarted_at_once() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
    ]);
    spawner.fail_next("no such file");
    let _ = supervisor.start("db").await;
    assert_eq!(supervisor.status("db").await.unwrap(), State::Restarting);
    let failures_before = spawner.spawn_count();
    let starting = start_in_background(&supervisor, "api");
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(
        spawner.spawn_count(),
        failures_before,
        "the backoff was cut short"
    );
    starting.await.unwrap().unwrap();
    assert_eq!(spawn_order(&spawner)[1..], ["db", "api"]);
}

#[tokio::test(start_paused = true)]
async fn a_partial_ordered_stop_keeps_the_order_through_a_service_left_out() {
    use crate::deps::Condition::Started;
    let (supervisor, spawner, _) = supervisor(vec![
        depending("api", &[("db", Started)]),
        depending("db", &[]),
        depending("web", &[("api", Started)]),
    ]);
    supervisor.start_all().await.unwrap();
    let children: Vec<(String, _)> = spawn_order(&spawner)
        .into_iter()
        .zip(spawner.children())
        .collect();
    for (_, child) in &children {
        child.ignore_stop_signal_from_now();
    }
    let stopper = {
        let children = children.clone();
        tokio::spawn(async move {
            loop {
                for (_, child) in &children {
                    if !child.signals().is_empty() && !child.is_reaped() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        child.exit(ExitReason::Exited(0));
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let names = [
        ServiceName::parse("db").unwrap(),
        ServiceName::parse("web").unwrap(),
    ];
    supervisor
        .stop_ordered(Some(&names), ServiceHandle::stop_request)
        .await
        .unwrap();
    stopper.abort();
    let first_signal = |name: &str| {
        let (_, child) = children.iter().find(|(n, _)| n == name).unwrap();
        child.signals().first().map(|(at, _)| *at)
    };
    assert!(first_signal("web").unwrap() < first_signal("db").unwrap());
    assert_eq!(first_signal("api"), None, "api was not asked to stop");
}

mod freeze {
    //! An upgrade's freeze and resume, within one process: every phase
    //! handed over and taken back by a new supervisor.

    use super::*;
    use crate::handover::PhaseSnapshot;

    const S: Duration = Duration::from_secs(1);

    fn slow(name: &str, enabled: bool) -> ServiceDefinition {
        let mut definition = named(name, enabled);
        definition.policy.backoff.initial = 10 * S;
        definition.policy.backoff.max = 10 * S;
        definition.policy.stop_timeout = 10 * S;
        definition
    }

    fn definitions() -> Vec<ServiceDefinition> {
        let mut failing = slow("fail", true);
        failing.policy.max_restarts = 0;
        vec![
            slow("back", true),
            failing,
            slow("idle", false),
            slow("run", true),
            slow("stop", true),
        ]
    }

    fn child_of(spawner: &FakeSpawner, pid: u32) -> crate::process::FakeChildControl {
        spawner
            .children()
            .into_iter()
            .find(|child| child.pid() == pid)
            .expect("a child with that pid")
    }

    async fn state_is(supervisor: &SupervisorHandle, name: &str, state: State) {
        let handle = supervisor.service(name).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(60),
            handle.wait_for(|s| s.state == state),
        )
        .await
        .unwrap_or_else(|_| panic!("{name} never became {state:?}"))
        .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn every_phase_is_handed_over_and_goes_on_in_a_new_supervisor() {
        let (old, spawner, _) = supervisor(definitions());
        old.start_all().await.unwrap();
        let pid = |name: &'static str| {
            let old = old.clone();
            async move { old.info(name).await.unwrap().pid.unwrap() }
        };
        // back: its process failed, a restart waits out 10 s of backoff.
        let back_pid = pid("back").await;
        child_of(&spawner, back_pid).exit(ExitReason::Exited(1));
        state_is(&old, "back", State::Restarting).await;
        let retry_at = old
            .service("back")
            .await
            .unwrap()
            .status()
            .retry_at
            .unwrap();
        // fail: no restart allowed, so it gives up.
        child_of(&spawner, pid("fail").await).exit(ExitReason::Exited(1));
        state_is(&old, "fail", State::Failed).await;
        // stop: SIGTERM sent, ignored; SIGKILL due 10 s later.
        let stop_pid = pid("stop").await;
        let stopping = child_of(&spawner, stop_pid);
        stopping.ignore_stop_signal_from_now();
        let stop_request = old.service("stop").await.unwrap().stop_request();
        state_is(&old, "stop", State::Stopping).await;
        let kill_due = Instant::now() + 10 * S;
        let run_pid = pid("run").await;
        let run_before = old.info("run").await.unwrap();
        let spawns = spawner.spawn_count();

        tokio::time::advance(3 * S).await;
        let mut frozen = old.freeze_all().await.unwrap();
        // The paused clock stands still between the freeze and the resume;
        // the real one does not (a loaded machine may take a while): timers
        // resume from "now" on the paused clock, exactly.
        for service in &mut frozen {
            service.frozen_at = None;
            service.service.frozen_at_monotonic_ns = None;
        }
        let names: Vec<&str> = frozen.iter().map(|f| f.service.name.as_str()).collect();
        assert_eq!(names, ["back", "fail", "idle", "run", "stop"]);
        assert!(frozen.iter().all(|f| f.service.generation == 1));
        assert!(matches!(
            frozen[3].service.machine.phase,
            PhaseSnapshot::Running { pid, .. } if pid == run_pid
        ));
        // Nothing was signalled or reaped; the old handles say why they fail.
        assert!(!child_of(&spawner, run_pid).is_reaped());
        assert!(child_of(&spawner, run_pid).is_released());
        assert_eq!(stopping.signals().len(), 1, "only the SIGTERM");
        assert!(matches!(
            stop_request.await,
            Err(ServiceError::Upgrading { .. })
        ));
        assert!(matches!(
            old.stop("run").await,
            Err(SupervisorError::Service(ServiceError::Upgrading { .. }))
        ));
        assert!(matches!(
            old.add(named("new", true)).await,
            Err(SupervisorError::ShuttingDown)
        ));

        let events = EventBus::in_memory();
        let (new, removed) = spawn_supervisor_resumed(
            definitions(),
            frozen,
            Arc::new(spawner.clone()),
            events.clone(),
        );
        assert!(removed.is_empty());
        let run_after = new.info("run").await.unwrap();
        assert_eq!(run_after.pid, Some(run_pid), "same process");
        assert_eq!(run_after.state, State::Running);
        assert_eq!(run_after.restarts, run_before.restarts);
        assert_eq!(run_after.requested_starts, run_before.requested_starts);
        assert_eq!(new.status("fail").await.unwrap(), State::Failed);
        assert_eq!(new.status("idle").await.unwrap(), State::Stopped);
        assert_eq!(new.status("back").await.unwrap(), State::Restarting);
        assert_eq!(new.status("stop").await.unwrap(), State::Stopping);
        assert_eq!(child_of(&spawner, run_pid).adoptions(), 1);
        assert_eq!(spawner.spawn_count(), spawns, "nothing spawned anew");

        // The backoff restarts at its time, the stop escalates at its own.
        spawner.wait_for_spawns(spawns + 1).await;
        let restarted_at = *spawner.spawn_times().last().unwrap();
        // Within tokio's timer granularity (1 ms), on the paused clock.
        let tick = Duration::from_millis(1);
        let near = |at: Instant, due: Instant| at + tick >= due && at <= due + tick;
        assert!(
            near(restarted_at, retry_at),
            "restarted {:?} from the original retry time",
            restarted_at.max(retry_at) - restarted_at.min(retry_at)
        );
        state_is(&new, "stop", State::Stopped).await;
        let (killed_at, signal) = *stopping.signals().get(1).expect("a SIGKILL");
        assert_eq!(signal, Signal::SIGKILL);
        assert!(near(killed_at, kill_due), "the original kill time");
        assert!(stopping.is_reaped());

        // Users act on the new supervisor as usual.
        new.stop("run").await.unwrap();
        assert!(child_of(&spawner, run_pid).is_reaped());
        new.start("idle").await.unwrap();
        assert_eq!(new.status("idle").await.unwrap(), State::Running);
        // Nothing said the services changed.
        assert!(
            !events
                .history()
                .iter()
                .any(|event| event.service.as_deref() == Some("run")
                    && matches!(event.kind, EventKind::Started { .. })),
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_freeze_right_after_a_start_waits_for_its_spawn() {
        let (old, spawner, _) = supervisor(vec![slow("run", false)]);
        let handle = old.service("run").await.unwrap();
        let start = handle.start_by(true);
        let frozen = old.freeze_all().await.unwrap();
        let child = spawner.last_child().expect("the start spawned");
        assert!(matches!(
            frozen[0].service.machine.phase,
            PhaseSnapshot::Running { pid, .. } if pid == child.pid()
        ));
        assert!(frozen[0].service.child.is_some());
        // The start was answered (up, or interrupted by the upgrade).
        let _ = start.await;
        assert!(!child.is_reaped());
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_handed_over_but_no_longer_defined_is_stopped() {
        let (old, spawner, _) = supervisor(vec![slow("gone", true), slow("kept", true)]);
        old.start_all().await.unwrap();
        let gone_pid = old.info("gone").await.unwrap().pid.unwrap();
        let frozen = old.freeze_all().await.unwrap();
        let spawner_dyn: Arc<dyn Spawner> = Arc::new(spawner.clone());
        let (new, removed) = spawn_supervisor_resumed(
            vec![slow("kept", true)],
            frozen,
            Arc::clone(&spawner_dyn),
            EventBus::in_memory(),
        );
        assert_eq!(removed.len(), 1);
        let stopped = stop_handed_over(&spawner_dyn, removed.into_iter().next().unwrap(), S).await;
        assert_eq!(stopped, Some(gone_pid));
        assert!(child_of(&spawner, gone_pid).is_reaped());
        assert_eq!(new.status("kept").await.unwrap(), State::Running);
    }
}
