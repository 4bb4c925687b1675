//! `orchestrator reload` and SIGHUP against the real daemon: what restarts,
//! what keeps its pid, and what an invalid file leaves alone.

use std::collections::BTreeMap;

use orchestrator_e2e::*;
use serde_json::Value;

const SIGHUP: i32 = 1;
const SIGTERM: i32 = 15;

fn workspace(label: &str, services: &[&str], toml: &str) -> TestDir {
    let dir = TestDir::new(label);
    for name in services {
        dir.add_fixture_service(name);
    }
    write_config(&dir, toml, 0o644);
    dir
}

/// These tests drive reloads by the verb and SIGHUP, and check what each
/// one reports: the watchers, which would race them to every change, are
/// off (the last tests of this file cover them).
fn write_config(dir: &TestDir, toml: &str, mode: u32) -> std::path::PathBuf {
    dir.write_file(
        CONFIG,
        &format!("[orchestrator]\nwatch = false\n{toml}"),
        mode,
    )
}

fn service(name: &str, extra: &str) -> String {
    format!(
        "[services.{name}]\nargs = [\"--ready\", \"--sleep\"]\nstop_timeout = \"2s\"\n{extra}\n"
    )
}

fn start(dir: &TestDir) -> Daemon {
    Daemon::start(dir.path(), &["-c", CONFIG, "run"])
}

/// Every service's ServiceInfo by name, once each named one runs.
fn running(dir: &TestDir, names: &[&str]) -> BTreeMap<String, Value> {
    let mut infos = BTreeMap::new();
    let ok = wait_until(DEADLINE, || {
        // The daemon may not answer yet just after its start.
        let (code, stdout, _) = client(dir, &["status", "--json"]);
        // 1 only says a service is down; the listing is whole.
        if code > 1 {
            return false;
        }
        infos = serde_json::from_str::<Vec<Value>>(&stdout)
            .unwrap()
            .into_iter()
            .map(|info| (info["name"].as_str().unwrap().to_owned(), info))
            .collect();
        names
            .iter()
            .all(|name| infos.get(*name).is_some_and(|i| i["state"] == "running"))
    });
    assert!(ok, "not all of {names:?} run: {infos:#?}");
    infos
}

/// A client verb through the socket alone: with `-c` the client would read
/// (and refuse) a broken file itself before the daemon ever saw it.
fn client(dir: &TestDir, args: &[&str]) -> (i32, String, String) {
    let socket = dir.data_dir().join("orchestrator.sock");
    let mut all = vec!["--socket", socket.to_str().unwrap()];
    all.extend_from_slice(args);
    run_cli(dir.path(), &all)
}

fn pid(info: &Value) -> u64 {
    info["pid"].as_u64().expect("a pid")
}

/// A process per service, never two: the services' HOME is their data dir.
fn one_process_each(dir: &TestDir, names: &[&str]) {
    for name in names {
        let home = dir.service_data_dir(name);
        assert!(
            wait_until(DEADLINE, || live_processes_with_home(&home).len() == 1),
            "{name}: {:?}",
            live_processes_with_home(&home)
        );
    }
}

fn stop(mut daemon: Daemon) {
    daemon.signal(SIGTERM);
    assert_eq!(
        daemon.wait_exit().code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
}

#[test]
fn added_removed_changed_live_and_unchanged_each_get_their_due() {
    let names = ["keep", "gone", "edit", "live", "new"];
    let first = [
        service("keep", ""),
        service("gone", ""),
        service("edit", ""),
        service("live", "max_restarts = 3"),
    ]
    .concat();
    let dir = workspace("reload-diff", &names, &first);
    // `new` has a binary but no section yet: keep it from being discovered.
    std::fs::remove_file(dir.join("services/new/new")).unwrap();
    let daemon = start(&dir);
    let before = running(&dir, &["keep", "gone", "edit", "live"]);

    dir.add_fixture_service("new");
    // Gone from services_dir too, or it would stay as a discovered service.
    std::fs::remove_dir_all(dir.join("services/gone")).unwrap();
    let second = [
        service("keep", ""),
        service("edit", "environment = { COLOUR = \"blue\" }"),
        service("live", "max_restarts = 7\nstop_signal = \"SIGINT\""),
        service("new", ""),
    ]
    .concat();
    write_config(&dir, &second, 0o644);
    let out = cli_ok(&dir, &["reload"]);
    for line in [
        "restarted  edit (environment)",
        "removed    gone",
        "updated    live (max_restarts, stop_signal)",
        "added      new",
        "1 unchanged",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }

    let after = running(&dir, &["keep", "edit", "live", "new"]);
    assert!(!after.contains_key("gone"));
    assert!(
        wait_until(DEADLINE, || !is_alive(pid(&before["gone"]) as u32)),
        "a removed service stops"
    );
    assert_eq!(pid(&after["keep"]), pid(&before["keep"]));
    assert_eq!(after["keep"]["generation"], 1);
    assert_eq!(pid(&after["live"]), pid(&before["live"]), "live-only");
    assert_eq!(after["live"]["generation"], 2);
    assert_ne!(pid(&after["edit"]), pid(&before["edit"]));
    assert_eq!(after["edit"]["generation"], 2);
    let env = environ(pid(&after["edit"]) as u32).unwrap();
    assert_eq!(env.get("COLOUR").map(String::as_str), Some("blue"));
    one_process_each(&dir, &["keep", "edit", "live", "new"]);
    stop(daemon);
}

#[test]
fn an_invalid_file_changes_nothing_and_exits_2_with_every_problem() {
    let toml = [service("a", ""), service("b", "")].concat();
    let dir = workspace("reload-invalid", &["a", "b"], &toml);
    let daemon = start(&dir);
    let before = running(&dir, &["a", "b"]);
    let broken = format!(
        "{}[services.b]\nargs = [\"--ready\"]\nmax_restarts = -1\nrestart = \"sometimes\"\n",
        service("a", "")
    );
    write_config(&dir, &broken, 0o644);
    let (code, stdout, stderr) = client(&dir, &["reload"]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("max_restarts") && stderr.contains("restart"),
        "{stderr}"
    );
    let after = running(&dir, &["a", "b"]);
    for name in ["a", "b"] {
        assert_eq!(after[name]["pid"], before[name]["pid"]);
        assert_eq!(after[name]["restarts"], before[name]["restarts"]);
        assert_eq!(
            after[name]["requested_starts"],
            before[name]["requested_starts"]
        );
        assert_eq!(after[name]["generation"], 1);
    }
    daemon.wait_for_log(&["reload rejected"]);
    stop(daemon);
}

#[test]
fn sighup_applies_the_edited_file() {
    let dir = workspace(
        "reload-sighup",
        &["a", "b"],
        &[service("a", ""), service("b", "")].concat(),
    );
    let daemon = start(&dir);
    let before = running(&dir, &["a", "b"]);
    let edited = [
        service("a", ""),
        service("b", "args = [\"--arg\", \"x\", \"--ready\", \"--sleep\"]"),
    ]
    .concat()
    .replacen(
        "[services.b]\nargs = [\"--ready\", \"--sleep\"]\n",
        "[services.b]\n",
        1,
    );
    write_config(&dir, &edited, 0o644);
    daemon.signal(SIGHUP);
    daemon.wait_for_log(&["reload applied", "1 changed"]);
    let after = running(&dir, &["a", "b"]);
    assert_eq!(after["a"]["pid"], before["a"]["pid"]);
    assert_ne!(after["b"]["pid"], before["b"]["pid"]);
    let argv = cmdline(pid(&after["b"]) as u32).unwrap();
    assert!(argv.contains(&"x".to_owned()), "{argv:?}");
    stop(daemon);
}

#[test]
fn a_binary_dropped_into_services_dir_is_started_by_reload() {
    let dir = TestDir::new("reload-dropped");
    dir.add_fixture_service("first");
    write_config(&dir, "", 0o644);
    let daemon = start(&dir);
    running(&dir, &["first"]);
    dir.add_fixture_service("second");
    let out = cli_ok(&dir, &["reload"]);
    assert!(out.contains("added      second"), "{out}");
    running(&dir, &["first", "second"]);
    one_process_each(&dir, &["first", "second"]);
    stop(daemon);
}

#[test]
fn a_replaced_binary_restarts_its_service_and_only_that_one() {
    let dir = TestDir::new("reload-binary");
    dir.add_fixture_service("other");
    // The new version: a script that runs the fixture, written before
    // anything starts (no fork can hold it open for writing).
    let v2 = dir.write_file(
        "v2/up",
        &format!("#!/bin/sh\nexec {} \"$@\"\n", fixture_bin().display()),
        0o755,
    );
    dir.add_fixture_service("up");
    write_config(
        &dir,
        &[service("up", ""), service("other", "")].concat(),
        0o644,
    );
    let daemon = start(&dir);
    let before = running(&dir, &["up", "other"]);
    // Unchanged on disk: nothing restarts.
    let out = cli_ok(&dir, &["reload"]);
    assert!(out.contains("2 unchanged"), "{out}");
    // A symlink swap, as a deploy does: a new inode behind the same path.
    let binary = dir.join("services/up/up");
    let staged = dir.join("services/up/.up.new");
    std::os::unix::fs::symlink(&v2, &staged).unwrap();
    std::fs::rename(&staged, &binary).unwrap();
    let out = cli_ok(&dir, &["reload"]);
    assert!(
        out.contains("restarted  up (binary replaced on disk)"),
        "{out}"
    );
    let after = running(&dir, &["up", "other"]);
    assert_ne!(after["up"]["pid"], before["up"]["pid"]);
    assert_eq!(after["other"]["pid"], before["other"]["pid"]);
    one_process_each(&dir, &["up", "other"]);
    stop(daemon);
}

#[test]
fn a_burst_of_reloads_ends_in_the_right_state_without_a_duplicate() {
    let dir = workspace(
        "reload-burst",
        &["steady", "edit", "extra"],
        &[service("steady", ""), service("edit", "")].concat(),
    );
    std::fs::remove_file(dir.join("services/extra/extra")).unwrap();
    let daemon = start(&dir);
    let before = running(&dir, &["steady", "edit"]);
    dir.add_fixture_service("extra");
    write_config(
        &dir,
        &[
            service("steady", ""),
            service("edit", "environment = { V = \"2\" }"),
        ]
        .concat(),
        0o644,
    );
    // 50 at once: half by SIGHUP, half by the verb.
    std::thread::scope(|scope| {
        let mut verbs = Vec::new();
        for i in 0..50 {
            if i % 2 == 0 {
                daemon.signal(SIGHUP);
            } else {
                verbs.push(scope.spawn(|| cli(&dir, &["reload"])));
            }
        }
        for verb in verbs {
            let (code, stdout, stderr) = verb.join().unwrap();
            assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
        }
    });
    let after = running(&dir, &["steady", "edit", "extra"]);
    assert_eq!(after["steady"]["pid"], before["steady"]["pid"]);
    assert_eq!(after["steady"]["generation"], 1);
    assert_eq!(after["edit"]["generation"], 2, "restarted once: {after:#?}");
    assert_eq!(after["edit"]["restarts"], 0);
    one_process_each(&dir, &["steady", "edit", "extra"]);
    let env = environ(pid(&after["edit"]) as u32).unwrap();
    assert_eq!(env.get("V").map(String::as_str), Some("2"));
    stop(daemon);
}

// ---------------------------------------------------------------------------
// The watchers (watch = true, the default): no verb, no signal

#[test]
fn an_edited_file_and_a_dropped_binary_are_applied_by_the_watchers_alone() {
    let dir = TestDir::new("reload-watched");
    dir.add_fixture_service("first");
    dir.write_file(CONFIG, &service("first", ""), 0o644);
    let daemon = start(&dir);
    let before = running(&dir, &["first"]);
    // An editor's write-to-temp-and-rename of the config: a new service.
    dir.add_fixture_service("second");
    std::fs::remove_file(dir.join("services/second/second")).unwrap();
    let temp = dir.write_file(
        "orchestrator.toml.swp",
        &format!(
            "{}[services.second]\ncommand = [\"sleep\", \"300\"]\n",
            service("first", "")
        ),
        0o644,
    );
    std::fs::rename(&temp, dir.join(CONFIG)).unwrap();
    daemon.wait_for_log(&["reload applied"]);
    running(&dir, &["first", "second"]);
    // A binary dropped into services_dir: discovered and started.
    dir.add_fixture_service("third");
    let after = running(&dir, &["first", "second", "third"]);
    assert_eq!(after["first"]["pid"], before["first"]["pid"], "untouched");
    one_process_each(&dir, &["first", "third"]);
    stop(daemon);
}
