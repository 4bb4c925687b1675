//! `env_file`, `${VAR}` and `instances`, through the real daemon and CLI.

use std::collections::BTreeMap;

use orchestrator_e2e::*;
use serde_json::Value;

/// The daemon's own environment gets this variable, which the
/// configuration expands with `${CONFIG_E2E_FROM_DAEMON}`.
const DAEMON_VAR: (&str, &str) = ("CONFIG_E2E_FROM_DAEMON", "daemon-value");

fn start(dir: &TestDir) -> Daemon {
    let daemon = Daemon::start_with(dir.path(), &["-c", CONFIG, "run"], |command| {
        command.env(DAEMON_VAR.0, DAEMON_VAR.1);
    });
    let socket = dir.data_dir().join("orchestrator.sock");
    assert!(
        wait_until(DEADLINE, || socket.exists()),
        "no control socket; daemon log:\n{}",
        daemon.stderr_text()
    );
    daemon
}

fn pid_of(info: &Value) -> u32 {
    let pid = info["pid"]
        .as_u64()
        .unwrap_or_else(|| panic!("no pid in {info}"));
    u32::try_from(pid).expect("a pid fits u32")
}

fn running(dir: &TestDir, daemon: &Daemon, name: &str) -> Value {
    wait_for_status(dir, daemon, name, |s| {
        s["state"] == "running" && s["pid"].is_u64()
    })
}

/// `status --json NAME` through the configuration, from an environment
/// without `${CONFIG_E2E_FROM_DAEMON}`: the client only needs the socket,
/// so a variable only the daemon has does not stop it.
fn status_by_config(dir: &TestDir, name: &str) -> Option<Value> {
    let (code, stdout, stderr) = cli(dir, &["status", "--json", name]);
    assert!(code <= 1, "status failed with {code}: {stderr}");
    serde_json::from_str::<Vec<Value>>(&stdout).ok()?.pop()
}

#[test]
fn env_files_and_daemon_variables_reach_the_service() {
    let dir = TestDir::new("env-file");
    dir.add_fixture_service("api");
    dir.write_file(
        "env/base.env",
        "# shared settings\nexport MODE=base\nLAYER=base\nQUOTED=\"a b\\n#c\"\n",
        0o644,
    );
    dir.write_file("env/override.env", "LAYER=override # wins\n", 0o644);
    dir.write_file(
        CONFIG,
        r#"
[services.api]
env_file = ["env/base.env", "env/override.env", "-env/absent.env"]
environment = { MODE = "table", URL = "http://${CONFIG_E2E_FROM_DAEMON}/${LAYER}" }
args = ["--print-env", "--print-args", "--arg", "token=${CONFIG_E2E_FROM_DAEMON}", "--ready", "--sleep"]
"#,
        0o644,
    );
    let daemon = start(&dir);
    let mut info = None;
    assert!(
        wait_until(DEADLINE, || {
            info = status_by_config(&dir, "api").filter(|s| s["state"] == "running");
            info.is_some()
        }),
        "api not running; daemon log:\n{}",
        daemon.stderr_text()
    );
    let info = info.expect("running");
    let log = dir.log_path("api");
    wait_for_line(&log, "ARG --ready");
    let lines = read_lines(&log);
    let env: BTreeMap<&str, &str> = lines
        .iter()
        .filter_map(|line| line.strip_prefix("ENV ")?.split_once('='))
        .collect();
    assert_eq!(
        env.get("MODE"),
        Some(&"table"),
        "the table wins: {lines:#?}"
    );
    assert_eq!(env.get("LAYER"), Some(&"override"), "the later file wins");
    assert_eq!(env.get("URL"), Some(&"http://daemon-value/override"));
    // The process sees exactly what the file said (newline and all).
    let real = environ(pid_of(&info)).expect("the service's environment");
    assert_eq!(real.get("QUOTED").map(String::as_str), Some("a b\n#c"));
    assert!(
        lines.iter().any(|line| line == "ARG token=daemon-value"),
        "{lines:#?}"
    );
}

#[test]
fn instances_run_apart_and_restart_alone() {
    let dir = TestDir::new("instances");
    dir.add_fixture_service("web");
    dir.write_file(
        CONFIG,
        r#"
[services.web]
instances = 3
args = ["--arg", "--port=90{instance}", "--ready", "--sleep"]
environment = { SLOT = "slot-{instance}" }
restart = "always"
backoff = { initial = "100ms", max = "100ms" }
"#,
        0o644,
    );
    let daemon = start(&dir);
    let names = ["web@0", "web@1", "web@2"];
    let mut pids = BTreeMap::new();
    for (index, name) in names.iter().enumerate() {
        let info = running(&dir, &daemon, name);
        let pid = pid_of(&info);
        let argv = cmdline(pid).expect("argv");
        assert!(
            argv.contains(&format!("--port=90{index}")),
            "{name}: {argv:?}"
        );
        let env = environ(pid).expect("environment");
        assert_eq!(env["SLOT"], format!("slot-{index}"));
        assert_eq!(
            env["HOME"],
            dir.join(format!("services/web/data/{index}"))
                .display()
                .to_string()
        );
        pids.insert(*name, pid);
    }
    // `status` lists each instance, and no plain "web".
    let listed: Vec<String> = status_json(&dir, &[])
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(listed, names, "{listed:?}");
    let text = cli_ok(&dir, &["status"]);
    for name in names {
        assert!(text.contains(name), "{text}");
    }
    // The group's name stands for its instances in status and logs too.
    let group: Vec<String> = status_json(&dir, &["web"])
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(group, names, "{group:?}");
    let logs = cli_ok(&dir, &["logs", "web", "-n", "100"]);
    for name in names {
        assert!(
            logs.lines()
                .any(|line| line.starts_with(&format!("{name} | "))),
            "{name} in\n{logs}"
        );
    }
    let (code, _, stderr) = cli(&dir, &["status", "web@7"]);
    assert_eq!(code, 1, "{stderr}");

    // One killed restarts alone; the others keep their process.
    assert!(send_signal(pids["web@1"], SIGKILL));
    let again = wait_for_status(&dir, &daemon, "web@1", |s| {
        s["state"] == "running"
            && s["pid"]
                .as_u64()
                .is_some_and(|pid| pid != u64::from(pids["web@1"]))
    });
    assert_eq!(again["restarts"], 1, "{again}");
    for name in ["web@0", "web@2"] {
        let info = status_of(&dir, name);
        assert_eq!(pid_of(&info), pids[name], "{name} kept its process");
        assert_eq!(info["restarts"], 0, "{info}");
    }
    assert!(dir.log_path("web@1").exists());
}

#[test]
fn check_names_an_undefined_variable_and_a_missing_env_file() {
    let dir = TestDir::new("check-env");
    dir.add_fixture_service("api");
    let file = dir.write_file(
        CONFIG,
        r#"[services.api]
args = ["--x=${CONFIG_E2E_SURELY_UNSET}"]
env_file = "missing.env"

[services."web@1"]
"#,
        0o644,
    );
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", CONFIG, "check"]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    let file = file.display().to_string();
    let line = |at: usize, key: &str| {
        let prefix = format!("{file}:{at}:");
        stderr
            .lines()
            .find(|l| l.trim_start().starts_with(&prefix) && l.contains(&format!(": {key}: ")))
            .unwrap_or_else(|| panic!("no problem for {key} at line {at}:\n{stderr}"))
            .to_owned()
    };
    let undefined = line(2, "services.api.args[0]");
    assert!(
        undefined.contains("undefined variable ${CONFIG_E2E_SURELY_UNSET}"),
        "{undefined}"
    );
    let missing = line(3, "services.api.env_file");
    assert!(
        missing.contains(&format!(
            "env file {} does not exist",
            dir.join("missing.env").display()
        )),
        "{missing}"
    );
    let section = line(5, "services.\"web@1\"");
    assert!(section.contains("set instances = N"), "{section}");

    // And `run` refuses the same file.
    let mut daemon = Daemon::start(dir.path(), &["-c", CONFIG, "run"]);
    assert_eq!(daemon.wait_exit().code(), Some(2));
    assert!(
        daemon.stderr_text().contains("CONFIG_E2E_SURELY_UNSET"),
        "{}",
        daemon.stderr_text()
    );
}
