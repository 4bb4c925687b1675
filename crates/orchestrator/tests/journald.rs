//! The daemon under systemd with its stderr in the journal, this test
//! standing in for journald: `JOURNAL_STREAM` names the file the daemon's
//! stderr goes to, and `ORCHESTRATOR_JOURNAL_SOCKET` a datagram socket
//! bound here. Also the log files' timestamps and start markers.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use orchestrator_e2e::*;

/// The fields of one native-protocol entry (text values only: the service
/// lines here have no newline).
fn fields(entry: &[u8]) -> BTreeMap<String, String> {
    String::from_utf8_lossy(entry)
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

#[test]
fn service_lines_go_to_the_journal_by_name_and_the_daemons_lines_lose_their_timestamps() {
    let dir = TestDir::new("journald");
    dir.add_fixture_service("api");
    dir.write_file(
        CONFIG,
        "[orchestrator]\nshutdown_timeout = \"5s\"\n\
         [services.api]\nargs = [\"--lines\", \"4\", \"--ready\", \"--sleep\"]\n",
        0o644,
    );
    let journal_path = dir.join("journal.sock");
    let journal = UnixDatagram::bind(&journal_path).expect("bind the stand-in journal socket");
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let stderr_path = dir.join("journal-stream.stderr");
    let stderr = fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let stream = format!("{}:{}", meta.dev(), meta.ino());
    let mut daemon = Daemon::start_with(dir.path(), &["-c", CONFIG, "run"], |command| {
        command
            .stderr(stderr)
            .env("JOURNAL_STREAM", &stream)
            .env("ORCHESTRATOR_JOURNAL_SOCKET", &journal_path);
    });
    let console = || String::from_utf8_lossy(&read_bytes(&stderr_path)).into_owned();

    let mut seen: Vec<BTreeMap<String, String>> = Vec::new();
    let mut buffer = vec![0u8; 65536];
    let end = Instant::now() + DEADLINE;
    let wanted = ["line 0 on stdout", "line 1 on stderr", "line 3 on stderr"];
    while Instant::now() < end
        && !wanted.iter().all(|w| {
            seen.iter()
                .any(|e| e.get("MESSAGE").is_some_and(|m| m == w))
        })
    {
        if let Ok(n) = journal.recv(&mut buffer) {
            seen.push(fields(&buffer[..n]));
        }
    }
    let entry = |message: &str| {
        seen.iter()
            .find(|e| e.get("MESSAGE").is_some_and(|m| m == message))
            .unwrap_or_else(|| {
                panic!(
                    "no journal entry {message:?} in {seen:#?}\ndaemon stderr:\n{}",
                    console()
                )
            })
    };
    let stdout = entry("line 0 on stdout");
    assert_eq!(stdout["SYSLOG_IDENTIFIER"], "api");
    assert_eq!(stdout["PRIORITY"], "6");
    assert_eq!(stdout["ORCHESTRATOR_SERVICE"], "api");
    assert_eq!(stdout["ORCHESTRATOR_STREAM"], "stdout");
    let stderr_entry = entry("line 1 on stderr");
    assert_eq!(stderr_entry["SYSLOG_IDENTIFIER"], "api");
    assert_eq!(stderr_entry["PRIORITY"], "4");
    assert_eq!(stderr_entry["ORCHESTRATOR_STREAM"], "stderr");

    // The log file has them as always.
    let log = dir.log_path("api");
    assert!(
        wait_until(DEADLINE, || read_lines(&log).len() >= 4),
        "{:?}",
        read_lines(&log)
    );
    assert!(read_lines(&log).iter().any(|l| l == "line 0 on stdout"));

    cli_ok(&dir, &["shutdown"]);
    daemon.wait_exit();
    let text = console();
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines
            .first()
            .is_some_and(|l| l.starts_with("<6>orchestrator ") && l.contains(" starting")),
        "{text}"
    );
    for line in &lines {
        // `<N>` and the message: the journal adds time and colour itself.
        let (priority, message) = line[1..]
            .split_once('>')
            .unwrap_or_else(|| panic!("{line:?}"));
        assert!(
            line.starts_with('<') && ["3", "4", "6", "7"].contains(&priority),
            "{line:?}"
        );
        assert!(
            !message.starts_with("20") && !message.contains('\x1b'),
            "a timestamp or colour: {line:?}"
        );
        assert!(
            !message.contains("line 0 on stdout"),
            "a service line on stderr: {line:?}"
        );
    }
    assert!(text.contains("<6>started service=api pid="), "{text}");
}

#[test]
fn timestamped_log_files_mark_each_start_of_the_service() {
    let dir = TestDir::new("log-timestamps");
    dir.add_fixture_service("api");
    dir.write_file(
        CONFIG,
        "[orchestrator]\nshutdown_timeout = \"5s\"\nlog_timestamps = true\n\
         [services.api]\nrestart = \"on-failure\"\nmax_restarts = 1\n\
         backoff = { initial = \"50ms\", max = \"50ms\" }\n\
         args = [\"--print\", \"hello\", \"--eprint\", \"oops\", \"--exit\", \"3\"]\n",
        0o644,
    );
    let daemon = run_daemon_in(&dir);
    let log = dir.log_path("api");
    let done = wait_until(DEADLINE, || {
        read_lines(&log)
            .iter()
            .filter(|l| l.ends_with(" stderr oops"))
            .count()
            == 2
    });
    assert!(
        done,
        "{:?}\ndaemon log:\n{}",
        read_lines(&log),
        daemon.stderr_text()
    );
    let lines = read_lines(&log);
    let markers: Vec<&String> = lines.iter().filter(|l| l.contains(" --- ")).collect();
    assert_eq!(markers.len(), 2, "{lines:#?}");
    assert!(
        markers[0].ends_with(" ---") && markers[0].contains("--- orchestrator: started pid "),
        "{lines:#?}"
    );
    assert!(!markers[0].contains("restart"), "{lines:#?}");
    assert!(markers[1].contains("(restart 1) ---"), "{lines:#?}");
    // In order: a marker, then that run's lines.
    assert!(
        lines[0].contains(" --- orchestrator: started"),
        "{lines:#?}"
    );
    for line in &lines {
        let (time, rest) = line.split_once(' ').unwrap();
        assert_eq!(time.len(), "2026-12-03T02:23:13.123Z".len(), "{line:?}");
        assert!(
            time.ends_with('Z') && time.as_bytes()[10] == b'T',
            "{line:?}"
        );
        assert!(
            rest.starts_with("--- ") || rest == "stdout hello" || rest == "stderr oops",
            "{line:?}"
        );
    }
    drop(daemon);
}
