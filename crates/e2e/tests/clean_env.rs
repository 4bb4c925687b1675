//! The environment of a service is exactly what the contract lists. This
//! file holds one test on purpose: it sets a variable in the test process,
//! which is only sound while no other test thread reads the environment.

use std::collections::BTreeMap;
use std::sync::Arc;

use orchestrator_core::config::ServiceConfig;
use orchestrator_core::events::EventBus;
use orchestrator_core::plan::HostEnv;
use orchestrator_core::process::UnixSpawner;
use orchestrator_core::supervisor::spawn_supervisor;
use orchestrator_e2e::*;

fn printed_env(lines: &[String]) -> BTreeMap<String, String> {
    lines
        .iter()
        .filter_map(|line| line.strip_prefix("ENV "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[tokio::test]
async fn the_child_environment_is_exactly_the_contract() {
    // SAFETY: the only test of this binary, and it runs before anything
    // else here starts a thread that could read the environment.
    unsafe {
        std::env::set_var("ORCH_SECRET", "must-not-leak");
        std::env::set_var("LD_PRELOAD_ORCH_TEST", "must-not-leak-either");
    }
    let dir = TestDir::new("env");
    let guard = ProcessGuard::new();
    let host = HostEnv::from_process();
    let args = ["--print-env", "--ready", "--sleep"];
    let config = config_in(
        &dir,
        vec![
            (
                "limited",
                ServiceConfig {
                    environment: [("API_MODE".to_owned(), "prod".to_owned())].into(),
                    memory_limit: Some(64),
                    ..fixture(&args)
                },
            ),
            (
                "overrides",
                ServiceConfig {
                    environment: [
                        ("TMPDIR".to_owned(), "/var/tmp/mine".to_owned()),
                        ("HOME".to_owned(), "/nowhere".to_owned()),
                    ]
                    .into(),
                    ..fixture(&args)
                },
            ),
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
    assert!(failures.is_empty(), "{failures:?}");

    let base = |home: &str, tmp: &str| -> BTreeMap<String, String> {
        [
            ("PATH", host.path.as_str()),
            ("HOME", home),
            ("TMPDIR", tmp),
            ("TEMP", tmp),
            ("TMP", tmp),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    };
    let limited_home = dir.service_data_dir("limited").display().to_string();
    let mut limited = base(&limited_home, &host.tmpdir);
    limited.insert("API_MODE".into(), "prod".into());
    limited.insert("GOMEMLIMIT".into(), "64MiB".into());
    // The service's own environment wins over the defaults; no GOMEMLIMIT
    // without a memory_limit.
    let mut overrides = base("/nowhere", &host.tmpdir);
    overrides.insert("TMPDIR".into(), "/var/tmp/mine".into());

    for (name, expected) in [("limited", limited), ("overrides", overrides)] {
        wait_for_line_async(&dir.log_path(name), "READY").await;
        let pid = supervisor.info(name).await.unwrap().pid.expect("running");
        assert_eq!(
            environ(pid).expect("read /proc/PID/environ"),
            expected,
            "{name}: /proc/{pid}/environ"
        );
        assert_eq!(
            printed_env(&read_lines(&dir.log_path(name))),
            expected,
            "{name}: as the child sees it"
        );
    }
    within("stop all", supervisor.stop_all()).await.unwrap();
}
