//! `orchestrator check` and `orchestrator discover`, as a user runs them.

use orchestrator_e2e::*;

/// The stderr line that reports `key` at `file:line`, if any.
fn problem_line<'a>(stderr: &'a str, file: &str, line: usize, key: &str) -> Option<&'a str> {
    let at = format!("{file}:{line}:");
    let key = format!(": {key}: ");
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with(&at) && l.contains(&key))
}

#[test]
fn check_accepts_a_valid_file_with_a_one_line_summary() {
    let dir = TestDir::new("check-ok");
    dir.add_fixture_service("api");
    dir.add_fixture_service("extra");
    dir.write_file(
        "orchestrator.toml",
        r#"
[orchestrator]
shutdown_timeout = "5s"

[services.api]
args = ["--ready", "--sleep"]
restart = "on-failure"
backoff = { initial = "100ms", max = "1s" }
"#,
        0o644,
    );
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 0, "stdout: {stdout}\nstderr: {stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stdout:?}");
    assert!(lines[0].contains("orchestrator.toml"), "{stdout}");
    assert!(lines[0].contains("valid"), "{stdout}");
    assert!(lines[0].contains("1 configured service"), "{stdout}");
    assert!(lines[0].contains("1 more discovered"), "{stdout}");
}

#[test]
fn check_reports_every_problem_with_file_line_and_key() {
    let dir = TestDir::new("check-bad");
    dir.add_fixture_service("api");
    let file = dir.write_file(
        "orchestrator.toml",
        // Line numbers matter: the text starts on line 1.
        r#"[orchestrator]
shutdown_timeout = "soon"
log_level = "loud"

[services.api]
restart = "sometimes"
stop_signal = "SIGNOPE"
argz = ["--ready"]
"#,
        0o644,
    );
    let file = file.display().to_string();
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("5 configuration problems"), "{stderr}");
    for (line, key) in [
        (2, "orchestrator.shutdown_timeout"),
        (3, "orchestrator.log_level"),
        (6, "services.api.restart"),
        (7, "services.api.stop_signal"),
        (8, "services.api.argz"),
    ] {
        assert!(
            problem_line(&stderr, &file, line, key).is_some(),
            "no problem for {key} at {file}:{line}:\n{stderr}"
        );
    }
    let unknown = problem_line(&stderr, &file, 8, "services.api.argz").unwrap();
    assert!(unknown.contains("unknown key"), "{unknown}");
    assert!(unknown.contains("did you mean \"args\"?"), "{unknown}");
}

#[test]
fn output_to_a_reader_that_went_away_is_not_a_crash() {
    // As `orchestrator discover | head -0`: stdout is a pipe whose reader
    // has closed, so the first write fails with EPIPE.
    let dir = TestDir::new("epipe");
    dir.add_fixture_service("api");
    dir.write_file("orchestrator.toml", "[orchestrator]\n", 0o644);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = std::process::Command::new(orchestrator_bin())
        .args(["-c", "orchestrator.toml", "discover"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
    assert!(stderr.is_empty(), "nothing to report: {stderr}");
}

#[test]
fn check_rejects_an_unknown_key_and_an_unknown_dependency() {
    let dir = TestDir::new("check-unknown");
    let file = dir.write_file(
        "orchestrator.toml",
        "[orchestrator]\nlog_levle = \"info\"\n[services.api]\ndepends_on = [\"db\"]\n",
        0o644,
    );
    let file = file.display().to_string();
    let (code, _, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 2, "{stderr}");
    let typo = problem_line(&stderr, &file, 2, "orchestrator.log_levle").expect(&stderr);
    assert!(typo.contains("did you mean \"log_level\"?"), "{typo}");
    let unknown = problem_line(&stderr, &file, 4, "services.api.depends_on[0]").expect(&stderr);
    assert!(
        unknown.contains("depends on db, which is neither configured"),
        "{unknown}"
    );
}

#[test]
fn check_rejects_a_service_whose_binary_is_missing() {
    let dir = TestDir::new("check-missing");
    dir.write_file(
        "orchestrator.toml",
        "[services.ghost]\nargs = [\"--sleep\"]\n",
        0o644,
    );
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    let expected = dir.join("services/ghost/ghost").display().to_string();
    assert!(
        stderr
            .lines()
            .any(|l| l.contains("services.ghost") && l.contains(&expected)),
        "{stderr}"
    );
}

#[test]
fn check_names_a_missing_config_file() {
    let dir = TestDir::new("check-nofile");
    let (code, _, stderr) = run_cli(dir.path(), &["-c", "nowhere.toml", "check"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("nowhere.toml"), "{stderr}");
}

#[test]
fn discover_lists_binaries_and_whether_each_is_configured() {
    let dir = TestDir::new("discover");
    dir.add_fixture_service("api");
    dir.add_fixture_service("worker");
    // Not services: a file that is not executable, a directory without a
    // binary, and a name that is not a valid service name.
    dir.write_file("services/notes/notes", "plain text\n", 0o644);
    std::fs::create_dir_all(dir.join("services/empty")).unwrap();
    dir.add_fixture_service(".hidden");
    dir.write_file(
        "orchestrator.toml",
        "[services.api]\nargs = [\"--sleep\"]\n",
        0o644,
    );
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "discover"]);
    assert_eq!(code, 0, "{stderr}");
    // What is not a service is named on stderr, with why.
    for (entry, why) in [
        ("notes", "notes/notes is not executable; chmod +x "),
        ("empty", "no binary empty/empty inside"),
        (".hidden", "name invalid: "),
    ] {
        let path = dir.join("services").join(entry).display().to_string();
        assert!(
            stderr
                .lines()
                .any(|l| l.starts_with(&format!("orchestrator: skipped {path}: {why}"))),
            "{entry}: {stderr}"
        );
    }
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    let api = dir.join("services/api/api").display().to_string();
    let worker = dir.join("services/worker/worker").display().to_string();
    assert_eq!(rows[0], ["api", "yes", api.as_str()], "{stdout}");
    assert_eq!(rows[1][0], "worker", "{stdout}");
    assert_eq!(rows[1][1], "no", "{stdout}");
    assert!(
        stdout
            .lines()
            .nth(2)
            .unwrap()
            .contains("runs with defaults")
    );
    assert_eq!(rows[1].last(), Some(&worker.as_str()), "{stdout}");

    // With start_discovered = false the same binary is listed, not started.
    dir.write_file(
        "orchestrator.toml",
        "[orchestrator]\nstart_discovered = false\n",
        0o644,
    );
    let (code, stdout, _) = run_cli(dir.path(), &["-c", "orchestrator.toml", "discover"]);
    assert_eq!(code, 0);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("worker") && l.contains("not started")),
        "{stdout}"
    );
}

#[test]
fn discover_with_no_services_says_so() {
    let dir = TestDir::new("discover-none");
    let (code, stdout, _) = run_cli(dir.path(), &["discover"]);
    assert_eq!(code, 0);
    assert!(stdout.contains("no service binaries"), "{stdout}");
}

#[test]
fn discover_aligns_its_columns_whatever_their_length() {
    let dir = TestDir::new("discover-align");
    dir.add_fixture_service("a-rather-long-service-name");
    dir.add_fixture_service("db");
    dir.write_file("orchestrator.toml", "[services.db]\n", 0o644);
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "discover"]);
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    // Every column starts where its header does, on every row.
    let header = lines[0];
    let configured = header.find("CONFIGURED").unwrap();
    let binary = header.find("BINARY").unwrap();
    for line in &lines[1..] {
        let cells: Vec<&str> = line.split("  ").filter(|c| !c.is_empty()).collect();
        assert_eq!(line.find(cells[1].trim()), Some(configured), "{stdout}");
        assert_eq!(
            line.rfind(cells.last().unwrap().trim()),
            Some(binary),
            "{stdout}"
        );
        assert_eq!(line.trim_end(), *line, "no trailing blanks: {line:?}");
    }
}

/// Services `good` (the fixture) and every kind of program that cannot
/// start, in one file; the line numbers matter.
fn broken_workspace(label: &str) -> (TestDir, String) {
    let dir = TestDir::new(label);
    dir.add_fixture_service("good");
    dir.write_file("services/empty/empty", "", 0o755);
    dir.write_file("services/plain/plain", "echo no shebang\n", 0o755);
    dir.write_file("services/dos/dos", "#!/bin/sh\r\nexec sleep 60\r\n", 0o755);
    std::fs::create_dir_all(dir.join("services/folder/folder")).unwrap();
    let file = dir.write_file(
        "orchestrator.toml",
        r#"[orchestrator]
shutdown_timeout = "5s"
[services.good]
args = ["--ready", "--sleep"]
[services.ghost]
binary_path = "bin/ghost"
[services.empty]
[services.plain]
[services.dos]
[services.folder]
[services.typo]
restart = "sometimes"
"#,
        0o644,
    );
    (dir, file.display().to_string())
}

#[test]
fn check_reports_what_run_would_fail_on_with_line_and_column_in_one_pass() {
    let (dir, file) = broken_workspace("check-runnable");
    let (code, stdout, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 2, "stdout: {stdout}\nstderr: {stderr}");
    assert!(stderr.contains("6 configuration problems"), "{stderr}");
    for (line, column, key, says) in [
        (
            6,
            15,
            "services.ghost.binary_path",
            "bin/ghost does not exist; fix binary_path",
        ),
        (7, 11, "services.empty", "is empty (0 bytes)"),
        (8, 11, "services.plain", "nor a script starting with #!"),
        (9, 11, "services.dos", "has Windows line endings"),
        (10, 11, "services.folder", "is a directory, not a program"),
        // A schema problem, in the same pass.
        (12, 11, "services.typo.restart", "invalid value"),
    ] {
        let at = format!("{file}:{line}:{column}: {key}: ");
        assert!(
            stderr
                .lines()
                .any(|l| l.trim_start().starts_with(&at) && l.contains(says)),
            "no {at}…{says}… in:\n{stderr}"
        );
    }
    assert!(!stderr.contains("services.good"), "{stderr}");
}

#[test]
fn run_starts_the_good_service_beside_the_broken_ones() {
    let (dir, _) = broken_workspace("run-runnable");
    // Only the schema problem would stop the daemon: fix it.
    let text = std::fs::read_to_string(dir.join("orchestrator.toml")).unwrap();
    dir.write_file(
        "orchestrator.toml",
        &text.replace("\"sometimes\"", "\"never\""),
        0o644,
    );
    let mut daemon = Daemon::start(dir.path(), &["-c", "orchestrator.toml", "run"]);
    let line = wait_for_line(&dir.log_path("good"), "READY");
    daemon.guard.add_pgid(field(&line, "pgid") as i32);
    let logged = daemon.wait_for_log(&[
        "service=dos",
        "has Windows line endings",
        "other services start",
    ]);
    assert!(
        logged.contains("orchestrator.toml:9:11: services.dos"),
        "{logged}"
    );
    daemon.wait_for_log(&["service=ghost", "does not exist"]);
    daemon.signal(SIGTERM);
    assert_eq!(
        daemon.wait_exit().code(),
        Some(0),
        "{}",
        daemon.stderr_text()
    );
}

#[test]
fn run_refuses_a_data_dir_that_is_a_file_saying_where() {
    let dir = TestDir::new("run-datadir");
    dir.write_file("state", "", 0o644);
    let file = dir.write_file(
        "orchestrator.toml",
        "[orchestrator]\ndata_dir = \"state\"\n",
        0o644,
    );
    let (code, _, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "run"]);
    assert_eq!(code, 2, "{stderr}");
    let at = format!("{}:2:12: orchestrator.data_dir: data_dir ", file.display());
    assert!(stderr.contains(&at), "{stderr}");
}

#[test]
fn check_says_services_dir_is_a_file_or_missing_at_its_line() {
    let dir = TestDir::new("check-servicesdir");
    dir.write_file("notadir", "", 0o644);
    let file = dir.write_file(
        "orchestrator.toml",
        "[orchestrator]\nservices_dir = \"notadir\"\n",
        0o644,
    );
    let (code, _, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 2, "{stderr}");
    let at = format!("{}:2:16: orchestrator.services_dir: ", file.display());
    assert!(
        stderr
            .lines()
            .any(|l| l.contains(&at) && l.contains("is a file, not a directory")),
        "{stderr}"
    );

    dir.write_file(
        "orchestrator.toml",
        "[orchestrator]\nservices_dir = \"nowhere\"\n",
        0o644,
    );
    // From another directory: the path is the file's, not the cwd's.
    let elsewhere = TestDir::new("check-servicesdir-cwd");
    let config = dir.join("orchestrator.toml").display().to_string();
    let (code, _, stderr) = run_cli(elsewhere.path(), &["-c", &config, "check"]);
    assert_eq!(code, 2, "{stderr}");
    let missing = dir.join("nowhere").display().to_string();
    assert!(
        stderr.contains(&format!("services_dir {missing} does not exist")),
        "{stderr}"
    );
}

#[test]
fn check_reports_a_command_not_found_in_the_service_path() {
    let dir = TestDir::new("check-command");
    let file = dir.write_file(
        "orchestrator.toml",
        "[services.web]\ncommand = [\"no-such-program\"]\n",
        0o644,
    );
    let (code, _, stderr) = run_cli(dir.path(), &["-c", "orchestrator.toml", "check"]);
    assert_eq!(code, 2, "{stderr}");
    let at = format!("{}:2:11: services.web.command: ", file.display());
    assert!(stderr.contains(&at), "{stderr}");
}
