//! What the daemon has never reaches a service: neither its environment
//! nor a descriptor it inherited. One test in this file: it opens an
//! inheritable descriptor, which every process this test binary starts gets.

use std::collections::BTreeMap;

use orchestrator_e2e::*;

#[test]
fn nothing_of_the_daemon_leaks_into_a_service() {
    let dir = TestDir::new("isolation");
    dir.add_fixture_service("probe");
    dir.write_file(
        "orchestrator.toml",
        r#"
[orchestrator]
shutdown_timeout = "5s"

[services.probe]
args = ["--print-env", "--ready", "--sleep"]
"#,
        0o644,
    );
    // As if the daemon's own parent had leaked a descriptor to it.
    let leaked_file = dir.write_file("inherited.txt", "not for services\n", 0o644);
    let leaked = open_inheritable_fd(&leaked_file);
    let tmp = dir.join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let tmp = tmp.display().to_string();

    let mut daemon = Daemon::start_with(dir.path(), &["-c", "orchestrator.toml", "run"], |cmd| {
        cmd.env("ORCH_LEAK", "1")
            .env("PATH", "/usr/bin:/bin")
            .env("TMPDIR", &tmp);
    });
    let line = wait_for_line(&dir.log_path("probe"), "READY");
    let pid = field(&line, "pid");
    daemon.guard.add_pgid(field(&line, "pgid") as i32);

    // The daemon did inherit it...
    assert!(
        std::fs::read_link(format!("/proc/{}/fd/{leaked}", daemon.pid())).is_ok(),
        "the daemon should have inherited descriptor {leaked}"
    );
    // ...and the service sees only stdin, stdout and stderr.
    let fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(fds, [0, 1, 2]);

    let home = dir.service_data_dir("probe").display().to_string();
    let expected: BTreeMap<String, String> = [
        ("PATH", "/usr/bin:/bin"),
        ("HOME", home.as_str()),
        ("TMPDIR", tmp.as_str()),
        ("TEMP", tmp.as_str()),
        ("TMP", tmp.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(environ(pid).unwrap(), expected);
    let printed: BTreeMap<String, String> = read_lines(&dir.log_path("probe"))
        .iter()
        .filter_map(|l| l.strip_prefix("ENV ")?.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    assert_eq!(printed, expected);

    daemon.signal(SIGTERM);
    assert_eq!(daemon.wait_exit().code(), Some(0));
}
