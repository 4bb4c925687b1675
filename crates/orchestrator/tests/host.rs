//! orchestrator on a host: finding the daemon from any folder, /metrics for
//! both kinds of scrapers, shell completions, the man page and the systemd
//! unit.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use orchestrator_e2e::*;

/// `orchestrator ARGS` in `cwd` with `ORCHESTRATOR_SOCKET` set (or not);
/// returns (exit code, stdout, stderr).
fn run_with_socket_env(cwd: &Path, socket: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new(orchestrator_bin());
    command
        .args(args)
        .current_dir(cwd)
        .env_remove("ORCHESTRATOR_CONFIG")
        .env_remove("ORCHESTRATOR_SOCKET")
        .stdin(Stdio::null());
    if let Some(socket) = socket {
        command.env("ORCHESTRATOR_SOCKET", socket);
    }
    let output = command.output().expect("run the orchestrator binary");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// GET /metrics on the Unix socket with this Accept header; returns the
/// Content-Type and the body.
fn scrape(socket: &Path, accept: Option<&str>) -> (String, String) {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    let accept = accept.map_or(String::new(), |value| format!("Accept: {value}\r\n"));
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let content_type = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-type")
                .then(|| value.trim().to_owned())
        })
        .expect("a Content-Type");
    (content_type, body.to_owned())
}

#[test]
fn a_client_in_any_folder_finds_the_daemon_through_orchestrator_socket() {
    let dir = TestDir::new("host-env-socket");
    dir.add_fixture_service("api");
    dir.write_file(
        CONFIG,
        "[orchestrator]\nshutdown_timeout = \"5s\"\n[services.api]\nargs = [\"--sleep\"]\n",
        0o644,
    );
    // The variable tells clients where to look; a daemon started where it
    // is set still listens where its configuration says.
    let decoy = dir.join("decoy.sock");
    let mut daemon = Daemon::start_with(dir.path(), &["-c", CONFIG, "run"], |command| {
        command.env("ORCHESTRATOR_SOCKET", &decoy);
    });
    let socket = dir.data_dir().join("orchestrator.sock");
    assert!(
        wait_until(DEADLINE, || socket.exists()),
        "no control socket; daemon log:\n{}",
        daemon.stderr_text()
    );
    assert!(
        !decoy.exists(),
        "the daemon listened on $ORCHESTRATOR_SOCKET"
    );

    // Another folder, whose own (broken) file is not even read: the
    // variable is enough, as --socket is.
    let elsewhere = TestDir::new("host-elsewhere");
    elsewhere.write_file(CONFIG, "this is [ not toml\n", 0o644);
    let mut last = String::new();
    let running = wait_until(DEADLINE, || {
        let (code, stdout, stderr) = run_with_socket_env(
            elsewhere.path(),
            Some(&socket),
            &["status", "--json", "api"],
        );
        last = format!("exit {code}\nstdout: {stdout}\nstderr: {stderr}");
        code == 0
            && serde_json::from_str::<serde_json::Value>(&stdout)
                .is_ok_and(|services| services[0]["state"] == "running")
    });
    assert!(running, "{last}\ndaemon log:\n{}", daemon.stderr_text());

    // /metrics: the classic text unless OpenMetrics is asked for.
    let (content_type, text) = scrape(&socket, None);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    for expected in [
        "# TYPE orchestrator_build_info gauge",
        "orchestrator_service_up{service=\"api\"} 1",
        "# TYPE process_open_fds gauge",
        "# TYPE process_cpu_seconds_total counter",
        "process_max_fds ",
        "process_resident_memory_bytes ",
        "process_start_time_seconds ",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    assert!(!text.contains("# EOF"), "{text}");
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (content_type, text) = scrape(&socket, Some(prometheus));
    assert!(
        content_type.starts_with("application/openmetrics-text; version=1.0.0"),
        "{content_type}"
    );
    assert!(text.contains("# TYPE orchestrator_build info"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");

    let (code, stdout, stderr) =
        run_with_socket_env(elsewhere.path(), Some(&socket), &["shutdown"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(daemon.wait_exit().success(), "{}", daemon.stderr_text());
}

#[test]
fn with_nothing_to_go_by_the_client_tries_the_standard_socket_and_says_so() {
    let standard = Path::new("/run/orchestrator/orchestrator.sock");
    let host_config = Path::new("/etc/orchestrator/orchestrator.toml");
    if standard.exists() || host_config.exists() {
        eprintln!("note: this machine has a host daemon or its config; not testing the fallback");
        return;
    }
    let dir = TestDir::new("host-nothing");
    let (code, _, stderr) = run_with_socket_env(dir.path(), None, &["status"]);
    assert_eq!(code, 3, "{stderr}");
    for expected in [
        "/run/orchestrator/orchestrator.sock",
        "standard socket",
        "ORCHESTRATOR_SOCKET",
    ] {
        assert!(stderr.contains(expected), "{expected:?} not in {stderr}");
    }
    // Through the variable, the message says so.
    let gone = dir.join("gone.sock");
    let (code, _, stderr) = run_with_socket_env(dir.path(), Some(&gone), &["status"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains(&format!("{} (from $ORCHESTRATOR_SOCKET)", gone.display())),
        "{stderr}"
    );
}

#[test]
fn global_flags_only_where_they_do_something() {
    let dir = TestDir::new("host-no-socket");
    for args in [
        &["--socket", "x.sock", "check"][..],
        &["--socket", "x.sock", "discover"],
        &["check", "--socket", "x.sock"],
        &["discover", "--socket", "x.sock"],
        &["--socket", "x.sock", "completions", "bash"],
        &["--timeout", "5s", "check"],
        &["run", "--timeout", "5s"],
        &["-c", "x.toml", "completions", "bash"],
    ] {
        let (code, stdout, stderr) = run_with_socket_env(dir.path(), None, args);
        assert_eq!(code, 2, "{args:?}\nstdout: {stdout}\nstderr: {stderr}");
    }
    for verb in ["check", "discover"] {
        let (_, help, _) = run_with_socket_env(dir.path(), None, &[verb, "--help"]);
        for flag in ["--socket", "--timeout"] {
            assert!(!help.contains(flag), "{verb} --help offers {flag}:\n{help}");
        }
    }
    // Where it does something, after the verb as well as before it.
    let gone = dir.join("gone.sock");
    let gone = gone.to_str().unwrap();
    for args in [
        &["status", "--socket", gone][..],
        &["--socket", gone, "status"],
    ] {
        let (code, _, stderr) = run_with_socket_env(dir.path(), None, args);
        assert_eq!(code, 3, "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("{gone} (from --socket)")),
            "{stderr}"
        );
    }
}

#[test]
fn completions_for_every_shell_and_bash_parses_its_own() {
    let dir = TestDir::new("host-completions");
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let (code, script, stderr) = run_with_socket_env(dir.path(), None, &["completions", shell]);
        assert_eq!(code, 0, "{shell}: {stderr}");
        for verb in ["status", "restart", "completions"] {
            assert!(script.contains(verb), "{shell}: no {verb} in\n{script}");
        }
        if shell == "bash" {
            let file = dir.write_file("orchestrator.bash", &script, 0o644);
            let checked = Command::new("bash").arg("-n").arg(&file).output().unwrap();
            assert!(
                checked.status.success(),
                "bash -n: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }
    let (code, _, stderr) = run_with_socket_env(dir.path(), None, &["completions", "tcsh"]);
    assert_eq!(code, 2, "{stderr}");
}

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

#[test]
fn the_man_page_in_contrib_is_what_the_binary_prints() {
    let dir = TestDir::new("host-man");
    let (code, page, stderr) = run_with_socket_env(dir.path(), None, &["manpage"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(page.starts_with(".ie"), "not roff:\n{page}");
    assert!(page.contains("completions"), "{page}");
    let file = repo_file("contrib/orchestrator.1");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&file, &page).unwrap();
        return;
    }
    let kept = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        kept == page,
        "contrib/orchestrator.1 is not what `orchestrator manpage` prints (the CLI's help changed); \
         regenerate it with `UPDATE_SNAPSHOTS=1 cargo test -p orchestrator --test host` and commit it"
    );
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let analyze = Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "systemd-analyze is missing; .ci/run installs systemd"
        );
        eprintln!("note: systemd-analyze not found; the unit file is not verified");
        return;
    }
    let unit = std::fs::read_to_string(repo_file("contrib/orchestrator.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/local/bin/orchestrator "),
        "{unit}"
    );
    // verify checks that the programs exist: this build's binary stands in
    // for the installed one.
    let unit = unit.replace(
        "/usr/local/bin/orchestrator",
        orchestrator_bin().to_str().unwrap(),
    );
    let dir = TestDir::new("host-unit");
    let file = dir.write_file("orchestrator.service", &unit, 0o644);
    let output = Command::new(analyze)
        .arg("verify")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    // Unknown keys and bad values are only warnings (exit 0): any line
    // about our unit fails too.
    assert!(
        output.status.success() && !stderr.contains("orchestrator.service"),
        "systemd-analyze verify: {}\n{stderr}",
        output.status
    );
    for setting in [
        "Type=notify",
        "KillMode=mixed",
        "Delegate=yes",
        "RuntimeDirectory=orchestrator",
        "StateDirectory=orchestrator",
        "ConfigurationDirectory=orchestrator",
    ] {
        assert!(
            unit.lines().any(|line| line == setting),
            "{setting} missing"
        );
    }
}

#[test]
fn run_makes_the_folder_of_its_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = TestDir::new("host-socket-dir");
    dir.write_file(CONFIG, "[orchestrator]\nshutdown_timeout = \"5s\"\n", 0o644);
    // As /run/orchestrator for a host daemon started without systemd.
    let socket = dir.join("run/orchestrator/orchestrator.sock");
    let socket_arg = socket.to_str().unwrap();
    let mut daemon = Daemon::start(dir.path(), &["-c", CONFIG, "--socket", socket_arg, "run"]);
    assert!(
        wait_until(DEADLINE, || socket.exists()),
        "no socket; daemon log:\n{}",
        daemon.stderr_text()
    );
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(socket.parent().unwrap()), 0o755);
    assert_eq!(mode(&socket), 0o600);
    let (code, stdout, stderr) =
        run_with_socket_env(dir.path(), None, &["shutdown", "--socket", socket_arg]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    assert!(daemon.wait_exit().success(), "{}", daemon.stderr_text());
}
