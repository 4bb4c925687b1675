//! `logs` over several services (merged in time order, `name | ` prefixes,
//! `--all`, `--grep`, `--since`, `-f`) and `events` filters (`-n`,
//! `--service`, `--json`, `-f -n`), against the real daemon.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use orchestrator_e2e::*;
use serde_json::Value;

/// Writes the configuration of `(name, script body)` services and
/// `(name, fixture args)` ones.
fn configure(dir: &TestDir, scripts: &[(&str, String)], fixtures: &[(&str, &[&str])]) {
    let mut toml = String::from("[orchestrator]\nshutdown_timeout = \"5s\"\n");
    for (name, body) in scripts {
        dir.add_script_service(name, body);
        toml.push_str(&format!("\n[services.{name}]\nstop_timeout = \"1s\"\n"));
    }
    for (name, args) in fixtures {
        dir.add_fixture_service(name);
        toml.push_str(&format!(
            "\n[services.{name}]\nargs = {args:?}\nstop_timeout = \"1s\"\n"
        ));
    }
    dir.write_file(CONFIG, &toml, 0o644);
}

/// Prints `n K` for each K of `mine`, each once the other service's log
/// file holds `n K-1` (the daemon has its line, and its time, by then),
/// and a little later, so no two lines share a millisecond. The last
/// number goes to stderr.
fn turn_taker(mine: &[u32], other_log: &Path, last_on_stderr: bool) -> String {
    let mut body = format!(
        "wait_for() {{ until grep -q \"^n $1\\$\" '{}' 2>/dev/null; do sleep 0.01; done; sleep 0.02; }}\n",
        other_log.display()
    );
    for (i, k) in mine.iter().enumerate() {
        if *k > 1 {
            body.push_str(&format!("wait_for {}\n", k - 1));
        }
        let to_stderr = last_on_stderr && i == mine.len() - 1;
        body.push_str(&format!(
            "echo 'n {k}'{}\n",
            if to_stderr { " >&2" } else { "" }
        ));
    }
    body.push_str("exec sleep 100000\n");
    body
}

/// Services `a` (n 1, 3, 5) and `bb` (n 2, 4, 6 on stderr), all six lines
/// printed once this returns.
fn interleaved(label: &str) -> (TestDir, Daemon) {
    let dir = TestDir::new(label);
    let a = turn_taker(&[1, 3, 5], &dir.log_path("bb"), false);
    let bb = turn_taker(&[2, 4, 6], &dir.log_path("a"), true);
    configure(&dir, &[("a", a), ("bb", bb)], &[]);
    let daemon = run_daemon_in(&dir);
    wait_for_line(&dir.log_path("bb"), "n 6");
    (dir, daemon)
}

/// `NAME | TIME STREAM TEXT` with the time replaced by `TIME` (checked).
fn masked(line: &str) -> String {
    let (prefix, rest) = line
        .split_once(" | ")
        .unwrap_or_else(|| panic!("no `name | ` in {line:?}"));
    let (time, rest) = rest.split_once(' ').unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "no time in {line:?}"
    );
    format!("{prefix} | TIME {rest}")
}

fn texts(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .map(|l| l.rsplit_once(' ').map_or("", |(_, n)| n).to_owned())
        .collect()
}

#[test]
fn logs_of_several_services_merge_in_time_order_with_aligned_names() {
    let (dir, _daemon) = interleaved("logs-merge");

    let stdout = cli_ok(&dir, &["logs", "a", "bb"]);
    let shown: Vec<String> = stdout.lines().map(masked).collect();
    assert_eq!(
        shown,
        [
            "a  | TIME stdout n 1",
            "bb | TIME stdout n 2",
            "a  | TIME stdout n 3",
            "bb | TIME stdout n 4",
            "a  | TIME stdout n 5",
            "bb | TIME stderr n 6",
        ],
        "{stdout}"
    );

    // Without a terminal: no colour, whatever NO_COLOR says.
    let raw = Command::new(orchestrator_bin())
        .args(["-c", CONFIG, "logs", "a", "bb"])
        .current_dir(dir.path())
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(raw.status.success());
    assert!(!raw.stdout.contains(&0x1b), "{raw:?}");

    // -n counts in all, the newest kept.
    let stdout = cli_ok(&dir, &["logs", "bb", "a", "-n", "2"]);
    assert_eq!(texts(&stdout), ["5", "6"], "{stdout}");
    assert!(stdout.starts_with("a  | "), "{stdout}");

    // --all: every service the daemon has, the same merge.
    let all = cli_ok(&dir, &["logs", "--all"]);
    assert_eq!(texts(&all), ["1", "2", "3", "4", "5", "6"], "{all}");

    // One name alone prints as it always has: no prefix.
    let alone = cli_ok(&dir, &["logs", "a"]);
    assert_eq!(texts(&alone), ["1", "3", "5"], "{alone}");
    assert!(alone.lines().all(|l| !l.contains(" | ")), "{alone}");
}

#[test]
fn logs_grep_and_since_filter_the_lines() {
    let (dir, _daemon) = interleaved("logs-filter");

    let stdout = cli_ok(&dir, &["logs", "--all", "--grep", "n [246]$"]);
    assert_eq!(texts(&stdout), ["2", "4", "6"], "{stdout}");
    // -n takes the last matching lines, not the matches among the last.
    let stdout = cli_ok(&dir, &["logs", "a", "bb", "--grep", "n [13]$", "-n", "1"]);
    assert_eq!(texts(&stdout), ["3"], "{stdout}");

    let (code, stdout, stderr) = cli(&dir, &["logs", "a", "--grep", "n (1"]);
    assert_eq!(code, 2, "{stdout}{stderr}");
    assert!(stderr.contains("regular expression"), "{stderr}");

    let stdout = cli_ok(&dir, &["logs", "a", "bb", "--since", "1h"]);
    assert_eq!(texts(&stdout).len(), 6, "{stdout}");
    let stdout = cli_ok(
        &dir,
        &["logs", "a", "bb", "--since", "2999-01-01T00:00:00Z"],
    );
    assert_eq!(stdout, "", "nothing is that recent");
    // From the time of n 4 on (times are those the daemon gave).
    let all = cli_ok(&dir, &["logs", "a", "bb"]);
    let fourth = all.lines().nth(3).unwrap();
    let time = fourth
        .split(" | ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let stdout = cli_ok(&dir, &["logs", "a", "bb", "--since", time]);
    assert_eq!(texts(&stdout), ["4", "5", "6"], "{stdout}");

    let (code, _, stderr) = cli(&dir, &["logs", "a", "--since", "last tuesday"]);
    assert_eq!(code, 2, "{stderr}");
}

fn tick_of(line: &str) -> Option<(String, u64)> {
    let (name, rest) = line.split_once(" | ")?;
    let tick = rest.split(" tick ").nth(1)?.trim().parse().ok()?;
    Some((name.trim().to_owned(), tick))
}

#[test]
fn logs_follow_of_several_services_sees_new_lines_of_each() {
    let dir = TestDir::new("logs-follow-multi");
    let fixtures: [(&str, &[&str]); 2] =
        [("t1", &["--tick-ms", "50"]), ("t2", &["--tick-ms", "70"])];
    configure(&dir, &[], &fixtures);
    let mut daemon = run_daemon_in(&dir);
    wait_for_line(&dir.log_path("t1"), "tick 1");
    wait_for_line(&dir.log_path("t2"), "tick 1");
    let mut follower = CliFollower::start(
        dir.path(),
        &["-c", CONFIG, "logs", "t1", "t2", "-f", "-n", "2"],
    );
    // Each service's ticks come once each and in order: the 2 recent lines,
    // then the live ones of both.
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    let mut ticks = 0;
    while ticks < 12 || last.len() < 2 {
        let line = follower.wait_for("with a tick", |l| l.contains(" tick "));
        let (name, tick) = tick_of(&line).unwrap_or_else(|| panic!("{line:?}"));
        if let Some(before) = last.get(&name) {
            assert_eq!(tick, before + 1, "{name}: {:?}", follower.seen());
        }
        last.insert(name, tick);
        ticks += 1;
    }
    assert!(follower.is_running(), "-f keeps following");

    // A daemon that goes away ends it as for one service: exit 3.
    daemon.signal(9);
    daemon.wait_exit();
    let status = follower.wait_exit();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(3),
        "{}",
        follower.stderr_text()
    );
}

fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[test]
fn events_take_n_a_service_and_json() {
    let (dir, _daemon) = interleaved("events-filters");
    // More history than is asked for.
    cli_ok(&dir, &["restart", "a", "bb"]);

    let stdout = cli_ok(&dir, &["events", "-n", "3", "--json"]);
    let events = json_lines(&stdout);
    assert_eq!(events.len(), 3, "{stdout}");
    for event in &events {
        assert!(
            event["seq"].is_u64() && event["event"].is_string(),
            "{event}"
        );
    }
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

    let everything = json_lines(&cli_ok(&dir, &["events", "--json", "-n", "1000"]));
    assert!(everything.len() > 3, "{everything:?}");
    assert_eq!(
        &everything[everything.len() - 3..],
        &events[..],
        "the last 3"
    );

    let a = cli_ok(&dir, &["events", "--service", "a"]);
    assert!(a.contains("  a  started"), "{a}");
    assert!(a.lines().all(|l| l.contains("  a  ")), "only a's:\n{a}");
    let a = json_lines(&cli_ok(&dir, &["events", "--service", "a", "--json"]));
    assert!(
        !a.is_empty() && a.iter().all(|e| e["service"] == "a"),
        "{a:?}"
    );
}

#[test]
fn events_follow_starts_from_the_last_n() {
    let (dir, _daemon) = interleaved("events-follow");
    cli_ok(&dir, &["restart", "a"]);
    let history = json_lines(&cli_ok(&dir, &["events", "--json", "-n", "1000"]));
    let last = history.last().unwrap()["seq"].as_u64().unwrap();
    assert!(last > 3, "enough history to tell: {history:?}");

    let mut follower = CliFollower::start(
        dir.path(),
        &["-c", CONFIG, "events", "-f", "-n", "2", "--json"],
    );
    let first = follower.wait_for("an event", |l| l.starts_with('{'));
    let first: Value = serde_json::from_str(&first).unwrap();
    assert!(
        first["seq"].as_u64().unwrap() + 1 >= last,
        "the last 2 at most, not the whole history: {first} (last was {last})"
    );
    cli_ok(&dir, &["restart", "bb"]);
    follower.wait_for("the restart", |l| {
        l.contains("\"event\":\"started\"") && l.contains("\"bb\"")
    });
    assert!(follower.is_running(), "-f keeps following");
}
