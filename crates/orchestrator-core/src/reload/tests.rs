//! The diff as a table, then the supervisor applying it with the fake
//! spawner on tokio's paused clock.

use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::*;
use crate::config::RestartPolicy;
use crate::deps::{Condition, Dependency};
use crate::health::{HealthCheck, OnUnhealthy, Probe};
use crate::plan::BinaryId;
use crate::process::FakeSpawner;
use crate::service::State;
use crate::service::tests::definition;
use crate::supervisor::spawn_supervisor;

fn named(name: &str) -> ServiceDefinition {
    let mut definition = definition(RestartPolicy::Always, 3);
    definition.name = ServiceName::parse(name).unwrap();
    definition.spawn.service = name.to_owned();
    definition
}

fn binary(ino: u64) -> Option<BinaryId> {
    Some(BinaryId {
        dev: 1,
        ino,
        size: 10,
        mtime_ns: 5,
    })
}

type Edit = fn(&mut ServiceDefinition);

fn tcp_check() -> HealthCheck {
    HealthCheck {
        probe: Probe::Tcp {
            address: "127.0.0.1:5432".into(),
        },
        interval: HealthCheck::DEFAULT_INTERVAL,
        timeout: HealthCheck::DEFAULT_TIMEOUT,
        retries: HealthCheck::DEFAULT_RETRIES,
        start_period: HealthCheck::DEFAULT_START_PERIOD,
        on_unhealthy: OnUnhealthy::Restart,
    }
}

fn dependency(name: &str, condition: Condition) -> Dependency {
    Dependency {
        name: ServiceName::parse(name).unwrap(),
        condition,
    }
}

#[test]
fn each_change_gets_its_action_and_a_reason_naming_it() {
    let table: &[(&str, Edit, ChangeAction, &str)] = &[
        ("nothing", |_| {}, ChangeAction::Unchanged, ""),
        (
            "args",
            |d| d.spawn.args.push("-v".into()),
            ChangeAction::Restarted,
            "arguments",
        ),
        (
            "env",
            |d| d.spawn.env.push(("A".into(), "1".into())),
            ChangeAction::Restarted,
            "environment",
        ),
        (
            "program",
            |d| d.spawn.program = "/bin/false".into(),
            ChangeAction::Restarted,
            "program /bin/true → /bin/false",
        ),
        (
            "cwd",
            |d| d.spawn.cwd = "/elsewhere".into(),
            ChangeAction::Restarted,
            "data_dir",
        ),
        (
            "binary",
            |d| d.binary = binary(2),
            ChangeAction::Restarted,
            "binary replaced on disk",
        ),
        (
            "binary unknown now",
            |d| d.binary = None,
            ChangeAction::Unchanged,
            "",
        ),
        (
            "restart",
            |d| d.policy.restart = RestartPolicy::Never,
            ChangeAction::Updated,
            "restart",
        ),
        (
            "max_restarts",
            |d| d.policy.max_restarts = 9,
            ChangeAction::Updated,
            "max_restarts",
        ),
        (
            "backoff",
            |d| d.policy.backoff.initial = Duration::from_secs(7),
            ChangeAction::Updated,
            "backoff",
        ),
        (
            "start_limit",
            |d| d.policy.start_limit.burst = 1,
            ChangeAction::Updated,
            "start_limit",
        ),
        (
            "stop_signal",
            |d| d.policy.stop_signal = Signal::SIGINT,
            ChangeAction::Updated,
            "stop_signal",
        ),
        (
            "stop_timeout",
            |d| d.policy.stop_timeout = Duration::from_secs(99),
            ChangeAction::Updated,
            "stop_timeout",
        ),
        (
            "disabled",
            |d| d.enabled = false,
            ChangeAction::Updated,
            "enabled true → false",
        ),
        (
            "notify",
            |d| d.notify = true,
            ChangeAction::Restarted,
            "notify false → true",
        ),
        (
            "watchdog",
            |d| d.watchdog = Some(Duration::from_millis(1500)),
            ChangeAction::Restarted,
            "watchdog off → 1s 500ms",
        ),
        (
            "notify and its readiness",
            |d| {
                d.notify = true;
                d.policy.ready = ReadyWhen::Signalled {
                    timeout: Duration::from_secs(30),
                };
            },
            ChangeAction::Restarted,
            "notify false → true, readiness",
        ),
        (
            "start_grace",
            |d| d.policy.ready = ReadyWhen::Grace(Duration::from_secs(5)),
            ChangeAction::Updated,
            "start_grace",
        ),
        (
            "health",
            |d| d.health = Some(Box::new(tcp_check())),
            ChangeAction::Updated,
            "health",
        ),
        (
            "log file options",
            |d| d.log_file.timestamps = true,
            ChangeAction::Updated,
            "log file options",
        ),
        (
            "health and its readiness",
            |d| {
                d.health = Some(Box::new(tcp_check()));
                d.policy.ready = ReadyWhen::Signalled {
                    timeout: Duration::from_secs(30),
                };
            },
            ChangeAction::Updated,
            "readiness (start_grace, or notify and health within start_timeout), health",
        ),
        (
            "depends_on",
            |d| d.depends_on = vec![dependency("db", Condition::Healthy)],
            ChangeAction::Updated,
            "depends_on",
        ),
        (
            "both",
            |d| {
                d.spawn.args.push("-v".into());
                d.policy.max_restarts = 1;
            },
            ChangeAction::Restarted,
            "arguments, max_restarts",
        ),
    ];
    for (what, edit, action, reason) in table {
        let mut old = named("svc");
        old.binary = binary(1);
        let mut new = old.clone();
        edit(&mut new);
        let changes = diff(&[Arc::new(old)], vec![new]);
        assert_eq!(changes.len(), 1, "{what}");
        assert_eq!(changes[0].action(), *action, "{what}: {changes:?}");
        assert!(
            changes[0].reason().unwrap_or_default().contains(reason),
            "{what}: {:?} should name {reason:?}",
            changes[0].reason()
        );
    }
}

#[test]
fn services_that_appear_and_disappear_are_added_and_removed_in_name_order() {
    let old = vec![Arc::new(named("a")), Arc::new(named("b"))];
    let changes = diff(&old, vec![named("b"), named("c")]);
    let actions: Vec<(&str, ChangeAction)> = changes
        .iter()
        .map(|change| (change.service(), change.action()))
        .collect();
    assert_eq!(
        actions,
        [
            ("a", ChangeAction::Removed),
            ("b", ChangeAction::Unchanged),
            ("c", ChangeAction::Added),
        ]
    );
}

#[test]
fn global_options_that_cannot_apply_live_are_named() {
    let old = OrchestratorConfig::defaults_in(std::path::Path::new("/base"));
    let mut new = old.clone();
    assert!(needs_restart(&old, &new).is_empty());
    new.data_dir = "/other".into();
    new.http_listen = Some("127.0.0.1:1".parse().unwrap());
    new.state_max_bytes += 1;
    new.auto_restart = !new.auto_restart;
    new.cgroup_parent = "elsewhere".into();
    new.require_limits = true;
    let warnings = needs_restart(&old, &new).join("\n");
    for name in [
        "data_dir",
        "http_listen",
        "state_max_bytes",
        "cgroup_parent",
        "require_limits",
    ] {
        assert!(warnings.contains(name), "{warnings}");
    }
    assert!(!warnings.contains("auto_restart"), "{warnings}");
}

// ---- applying ----

async fn running(definitions: Vec<ServiceDefinition>) -> (SupervisorHandle, FakeSpawner) {
    let spawner = FakeSpawner::new();
    let supervisor = spawn_supervisor(
        definitions,
        Arc::new(spawner.clone()),
        EventBus::in_memory(),
    );
    assert!(supervisor.start_all().await.unwrap().is_empty());
    (supervisor, spawner)
}

async fn reload(supervisor: &SupervisorHandle, new: Vec<ServiceDefinition>) -> ReloadReport {
    let old = supervisor.definitions().await.unwrap();
    apply(supervisor, diff(&old, new)).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn removed_stop_added_start_changed_restart_and_unchanged_keep_their_pid() {
    let (supervisor, spawner) = running(vec![named("keep"), named("gone"), named("edit")]).await;
    let keep = supervisor.info("keep").await.unwrap();
    let edit = supervisor.info("edit").await.unwrap();
    let mut edited = named("edit");
    edited.spawn.args.push("--new".into());
    let report = reload(&supervisor, vec![named("keep"), edited, named("new")]).await;
    assert!(report.warnings.is_empty(), "{report:?}");
    let actions: Vec<_> = report.applied.iter().map(|c| c.action).collect();
    assert_eq!(
        actions,
        [
            ChangeAction::Restarted,
            ChangeAction::Removed,
            ChangeAction::Unchanged,
            ChangeAction::Added
        ]
    );
    let now = supervisor.info("keep").await.unwrap();
    assert_eq!((now.pid, now.generation), (keep.pid, 1));
    let now = supervisor.info("edit").await.unwrap();
    assert_eq!(now.state, State::Running);
    assert_ne!(now.pid, edit.pid);
    assert_eq!(now.generation, 2);
    assert_eq!(
        spawner
            .specs()
            .iter()
            .rfind(|spec| spec.service == "edit")
            .unwrap()
            .args,
        ["--new"],
        "restarted on the new definition"
    );
    assert!(supervisor.info("gone").await.is_err());
    assert_eq!(supervisor.status("new").await.unwrap(), State::Running);
    // keep, gone, edit, then edit again and new: nothing twice.
    assert_eq!(spawner.spawn_count(), 5);
}

/// `instances = N` of one section, loaded and planned as the reloader does.
fn web_instances(count: u32) -> Vec<ServiceDefinition> {
    let text = format!(
        "[services.web]\ninstances = {count}\ncommand = [\"/bin/true\", \"--port=80{{instance}}\"]\n"
    );
    let config = crate::config::parse_in(&text, None, std::path::Path::new("/srv"), &|_| None)
        .unwrap()
        .config;
    crate::plan::plan(
        &config,
        &[],
        &HostEnv {
            path: "/bin".into(),
            tmpdir: "/tmp".into(),
        },
    )
}

#[tokio::test(start_paused = true)]
async fn fewer_instances_remove_the_last_and_leave_the_others_running() {
    let (supervisor, _spawner) = running(web_instances(3)).await;
    let before: Vec<_> = running_pids(&supervisor, &["web@0", "web@1"]).await;
    let report = reload(&supervisor, web_instances(2)).await;
    let actions: Vec<(&str, ChangeAction)> = report
        .applied
        .iter()
        .map(|change| (change.service.as_str(), change.action))
        .collect();
    assert_eq!(
        actions,
        [
            ("web@0", ChangeAction::Unchanged),
            ("web@1", ChangeAction::Unchanged),
            ("web@2", ChangeAction::Removed),
        ]
    );
    assert!(supervisor.info("web@2").await.is_err());
    assert_eq!(running_pids(&supervisor, &["web@0", "web@1"]).await, before);
    // And back up: only web@2 is added.
    let report = reload(&supervisor, web_instances(3)).await;
    let added: Vec<&str> = report
        .applied
        .iter()
        .filter(|change| change.action == ChangeAction::Added)
        .map(|change| change.service.as_str())
        .collect();
    assert_eq!(added, ["web@2"]);
}

async fn running_pids(supervisor: &SupervisorHandle, names: &[&str]) -> Vec<Option<u32>> {
    let mut pids = Vec::new();
    for name in names {
        let info = supervisor.info(name).await.unwrap();
        assert_eq!(info.state, State::Running, "{name}");
        pids.push(info.pid);
    }
    pids
}

#[tokio::test(start_paused = true)]
async fn a_live_change_keeps_the_process_and_its_counters() {
    let (supervisor, spawner) = running(vec![named("svc")]).await;
    // One failure and its restart, so there is a counter to keep.
    spawner.children()[0].exit(crate::process::ExitReason::Exited(1));
    let service = supervisor.service("svc").await.unwrap();
    service
        .wait_for(|s| s.state == State::Running && s.restarts == 1)
        .await
        .unwrap();
    let before = supervisor.info("svc").await.unwrap();
    let mut new = named("svc");
    new.policy.max_restarts = 0;
    new.policy.stop_signal = Signal::SIGINT;
    let report = reload(&supervisor, vec![new]).await;
    assert_eq!(report.applied[0].action, ChangeAction::Updated);
    let after = supervisor.info("svc").await.unwrap();
    assert_eq!(after.pid, before.pid);
    assert_eq!(after.restarts, 1);
    assert_eq!(after.generation, 2);
    // The new stop signal is the one a stop sends.
    supervisor.stop("svc").await.unwrap();
    let last = spawner.children().last().unwrap().clone();
    assert_eq!(last.signals()[0].1, Signal::SIGINT);
}

#[tokio::test(start_paused = true)]
async fn readiness_changes_wait_for_the_next_start_and_notify_restarts_at_once() {
    let (supervisor, spawner) = running(vec![named("svc")]).await;
    let before = supervisor.info("svc").await.unwrap();
    let mut checked = named("svc");
    checked.health = Some(Box::new(tcp_check()));
    checked.depends_on = vec![dependency("db", Condition::Started)];
    checked.policy.ready = ReadyWhen::Grace(Duration::from_secs(3));
    let report = reload(&supervisor, vec![checked.clone()]).await;
    assert_eq!(
        report.applied[0].action,
        ChangeAction::Updated,
        "{report:?}"
    );
    let after = supervisor.info("svc").await.unwrap();
    assert_eq!(after.pid, before.pid);
    assert_eq!(spawner.spawn_count(), 1);
    // The definition the supervisor holds is the new one.
    let held = supervisor.definitions().await.unwrap();
    assert_eq!(held[0].health, checked.health);
    assert_eq!(held[0].depends_on, checked.depends_on);

    let mut notifying = checked;
    notifying.notify = true;
    notifying.watchdog = Some(Duration::from_secs(10));
    let report = reload(&supervisor, vec![notifying]).await;
    assert_eq!(
        report.applied[0].action,
        ChangeAction::Restarted,
        "{report:?}"
    );
    assert_eq!(
        report.applied[0].reason.as_deref(),
        Some("notify false → true, watchdog off → 10s")
    );
    assert_eq!(spawner.spawn_count(), 2);
    assert_ne!(supervisor.info("svc").await.unwrap().pid, before.pid);
}

#[tokio::test(start_paused = true)]
async fn enabled_changes_start_and_stop_without_counting_as_restarts() {
    let mut off = named("off");
    off.enabled = false;
    let (supervisor, _spawner) = running(vec![named("on"), off.clone()]).await;
    let mut on_now_off = named("on");
    on_now_off.enabled = false;
    let mut off_now_on = off;
    off_now_on.enabled = true;
    reload(&supervisor, vec![on_now_off, off_now_on]).await;
    assert_eq!(supervisor.status("on").await.unwrap(), State::Stopped);
    assert_eq!(supervisor.status("off").await.unwrap(), State::Running);
    let info = supervisor.info("on").await.unwrap();
    assert!(!info.enabled);
    assert_eq!(info.restarts, 0);
}

#[tokio::test(start_paused = true)]
async fn a_changed_service_in_backoff_restarts_once_on_the_new_spec() {
    let (supervisor, spawner) = running(vec![named("svc")]).await;
    let service = supervisor.service("svc").await.unwrap();
    spawner.children()[0].exit(crate::process::ExitReason::Exited(1));
    service
        .wait_for(|s| s.state == State::Restarting)
        .await
        .unwrap();
    let mut new = named("svc");
    new.spawn.args.push("--fixed".into());
    reload(&supervisor, vec![new]).await;
    assert_eq!(supervisor.status("svc").await.unwrap(), State::Running);
    assert_eq!(spawner.spawn_count(), 2);
    // The backoff's own timer must not start a second process.
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(spawner.spawn_count(), 2);
    assert_eq!(spawner.specs()[1].args, ["--fixed"]);
}

#[tokio::test(start_paused = true)]
async fn a_change_during_a_stop_does_not_undo_the_stop() {
    let mut slow = named("svc");
    slow.policy.stop_timeout = Duration::from_secs(3600);
    let (supervisor, spawner) = running(vec![slow.clone()]).await;
    let child = spawner.children()[0].clone();
    child.ignore_stop_signal_from_now();
    let stopping = tokio::spawn({
        let supervisor = supervisor.clone();
        async move { supervisor.stop("svc").await }
    });
    let service = supervisor.service("svc").await.unwrap();
    service
        .wait_for(|s| s.state == State::Stopping)
        .await
        .unwrap();
    let mut new = slow;
    new.spawn.args.push("--new".into());
    reload(&supervisor, vec![new]).await;
    child.exit(crate::process::ExitReason::Exited(0));
    stopping.await.unwrap().unwrap();
    assert_eq!(supervisor.status("svc").await.unwrap(), State::Stopped);
    assert_eq!(spawner.spawn_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn after_shutdown_began_nothing_is_added_or_started() {
    let (supervisor, spawner) = running(vec![named("svc")]).await;
    supervisor.shutdown(Duration::from_secs(5)).await.unwrap();
    let mut changed = named("svc");
    changed.spawn.args.push("--new".into());
    let report = reload(&supervisor, vec![changed, named("late")]).await;
    // The stopped service is not restarted, so only the addition fails.
    assert_eq!(report.warnings.len(), 1, "{report:?}");
    assert!(supervisor.info("late").await.is_err());
    assert_eq!(supervisor.status("svc").await.unwrap(), State::Stopped);
    assert_eq!(spawner.spawn_count(), 1);
}

// ---- one reload at a time ----

#[tokio::test]
async fn requests_made_during_a_reload_share_one_more_run() {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicUsize;

    let dir = std::env::temp_dir().join(format!("orchestrator-reloader-{}", std::process::id()));
    let config = crate::config::parse("", None, &dir).unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    // The first load waits here until the test has queued its requests.
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let loader: Loader = {
        let calls = Arc::clone(&calls);
        let config = config.clone();
        Arc::new(move || {
            if calls.fetch_add(1, Ordering::SeqCst) == 0 {
                let _ = gate.lock().unwrap().recv();
            }
            Ok(Reread {
                config: config.clone(),
                warnings: Vec::new(),
                discovered: Vec::new(),
                planned: None,
            })
        })
    };
    let (supervisor, _spawner) = running(vec![]).await;
    let reloader = spawn_reloader(
        loader,
        HostEnv::from_process(),
        config.orchestrator.clone(),
        supervisor,
        EventBus::in_memory(),
    );
    let first = tokio::spawn(reloader.reload());
    while calls.load(Ordering::SeqCst) == 0 {
        tokio::task::yield_now().await;
    }
    // Each is queued by the call itself, while the first run is held.
    let later: Vec<_> = (0..10).map(|_| reloader.reload()).collect();
    release.send(()).unwrap();
    assert!(first.await.unwrap().is_ok());
    for outcome in later {
        assert!(outcome.await.is_ok());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one run, then one for all ten"
    );
    reloader.close();
    assert_eq!(reloader.reload().await, Err(ReloadError::ShuttingDown));
}

/// The in-process cost of a reload of 1000 services with one changed: the
/// diff and its application (no file reading). Run with --ignored.
#[tokio::test]
#[ignore = "a measurement, not a check"]
async fn measure_a_reload_of_a_thousand_services_with_one_changed() {
    let all: Vec<ServiceDefinition> = (0..1000).map(|i| named(&format!("s{i:04}"))).collect();
    let (supervisor, spawner) = running(all.clone()).await;
    let mut new = all;
    new[500].spawn.args.push("--changed".into());
    let began = std::time::Instant::now();
    let report = reload(&supervisor, new).await;
    let took = began.elapsed();
    let changed = report
        .applied
        .iter()
        .filter(|c| c.action != ChangeAction::Unchanged)
        .count();
    assert_eq!(changed, 1);
    assert_eq!(spawner.spawn_count(), 1001);
    println!("reload of 1000 services, one changed: {took:?}");
}

/// A binary that was absent (or unreadable) when last planned and is there
/// now is compared from then on: a deploy after the daemon started counts.
#[tokio::test(start_paused = true)]
async fn a_binary_unknown_once_is_compared_once_it_appears() {
    let (supervisor, spawner) = running(vec![named("svc")]).await;
    let mut deployed = named("svc");
    deployed.binary = binary(1);
    let report = reload(&supervisor, vec![deployed]).await;
    assert_eq!(report.applied[0].action, ChangeAction::Restarted);
    let mut upgraded = named("svc");
    upgraded.binary = binary(2);
    let report = reload(&supervisor, vec![upgraded]).await;
    assert_eq!(report.applied[0].action, ChangeAction::Restarted);
    assert_eq!(spawner.spawn_count(), 3);
}

/// `restart = "never"` taken live during a backoff gives the pending
/// restart up instead of carrying it out.
#[tokio::test(start_paused = true)]
async fn restart_never_taken_live_during_a_backoff_gives_up() {
    let (supervisor, spawner) = running(vec![named("svc")]).await;
    let service = supervisor.service("svc").await.unwrap();
    spawner.children()[0].exit(crate::process::ExitReason::Exited(1));
    service
        .wait_for(|s| s.state == State::Restarting)
        .await
        .unwrap();
    let mut never = named("svc");
    never.policy.restart = RestartPolicy::Never;
    let report = reload(&supervisor, vec![never]).await;
    assert_eq!(report.applied[0].action, ChangeAction::Updated);
    tokio::time::sleep(Duration::from_secs(120)).await;
    assert_eq!(spawner.spawn_count(), 1, "no restart after the change");
    let status = service.status();
    assert_eq!(status.state, State::Failed);
    assert!(
        status.last_error.unwrap().contains("never"),
        "the reason names the new rule"
    );
}
