//! The document through a real memfd, its compatibility rules, and the
//! descriptors kept across an exec.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};

use super::*;

fn sample() -> Handover {
    let mut handover = Handover::new("0.1.0", Some(PathBuf::from("/etc/orchestrator.toml")));
    handover.fds.insert("api_unix".to_owned(), 7);
    handover.next_event_seq = Some(1234);
    handover.services.push(ServiceHandover {
        name: "web".to_owned(),
        generation: 3,
        machine: MachineSnapshot {
            phase: PhaseSnapshot::Stopping {
                pid: 4242,
                then: AfterStopSnapshot::Start,
                remaining: Duration::from_millis(1500),
                killed: false,
            },
            failures: 2,
            restarts: 5,
            requested_starts: 1,
            closing: false,
            quick_failure_ages: vec![Duration::from_secs(3), Duration::from_millis(10)],
            last_exit: Some(ExitReasonSnapshot::OomKilled {
                memory_limit_mib: Some(64),
            }),
            last_error: Some("exited with code 1".to_owned()),
            fault: None,
            last_words: Some("panic: \u{1b}[31mboom".to_owned()),
            completed: false,
        },
        child: Some(ReleasedChildInfo {
            pid: 4242,
            pgid: 4242,
            cgroup: Some(PathBuf::from("/sys/fs/cgroup/orchestrator/web")),
            killed_by_us: false,
            oom_kills_at_start: 1,
            memory_limit_mib: Some(64),
        }),
        partial: Partials {
            stdout: b"half a li".to_vec(),
            stderr: vec![0, 255, b'\n' + 1],
        },
        recent: vec![RecentLine {
            seq: 41,
            time_unix_ms: 1_700_000_000_123,
            stream: Stream::Stderr,
            bytes: b"not utf-8: \xff".to_vec(),
        }],
        health: Some(Health::Unhealthy),
        output: crate::output::OutputCounters {
            stdout_lines: 40,
            stderr_lines: 2,
            dropped_bytes: 0,
        },
        frozen_at_monotonic_ns: Some(123_456_789),
        notify_status: Some("warming up: 3 of 8 caches".to_owned()),
    });
    handover
}

/// A memfd holding `bytes`, as another version's daemon would leave it.
fn memfd_with(bytes: &[u8]) -> OwnedFd {
    let fd = memfd_create(c"test-handover", MFdFlags::MFD_CLOEXEC).unwrap();
    let mut file = File::from(fd);
    file.write_all(bytes).unwrap();
    OwnedFd::from(file)
}

fn cloexec(fd: BorrowedFd<'_>) -> bool {
    FdFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFD).unwrap()).contains(FdFlag::FD_CLOEXEC)
}

#[test]
fn a_handover_survives_the_memfd_unchanged() {
    let handover = sample();
    let fd = write_memfd(&handover).unwrap();
    assert!(!cloexec(fd.as_fd()), "the memfd must survive the exec");
    assert_eq!(read_fd(fd).unwrap(), handover);
}

#[test]
fn the_memfd_is_sealed_and_rewound() {
    let fd = write_memfd(&sample()).unwrap();
    let mut file = File::from(fd);
    let mut first = [0u8; 1];
    file.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"{", "rewound to the document's start");
    assert!(file.write_all(b"x").is_err(), "sealed against writes");
}

#[test]
fn an_unknown_format_is_refused_naming_both_versions_and_what_to_do() {
    let json = br#"{"format": 99, "from_version": "7.0.0", "something": {"new": true}}"#;
    let error = read_fd(memfd_with(json)).unwrap_err();
    assert!(
        matches!(error, HandoverError::UnknownFormat { found: 99, .. }),
        "{error:?}"
    );
    let message = error.to_string();
    for part in [
        "format 99",
        "orchestrator 7.0.0",
        "reads format 1",
        "without --handover",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
}

#[test]
fn unknown_fields_are_ignored_and_later_fields_default() {
    // As a later version writes it (extra fields), and as version 1's first
    // builds may (no optional fields at all).
    let json = br#"{
        "format": 1,
        "from_version": "0.1.0",
        "written_at_unix_ms": 1700000000000,
        "a_field_from_the_future": [1, 2, 3],
        "services": [{
            "name": "db",
            "generation": 1,
            "future_per_service": {"x": 1},
            "machine": {
                "phase": {"phase": "backoff", "remaining": {"secs": 2, "nanos": 500}, "extra": 1},
                "failures": 1,
                "restarts": 4,
                "requested_starts": 0
            }
        }]
    }"#;
    let handover = read_fd(memfd_with(json)).unwrap();
    assert_eq!(handover.config, None);
    assert!(handover.fds.is_empty());
    assert_eq!(handover.next_event_seq, None);
    let service = &handover.services[0];
    assert_eq!(service.name, "db");
    assert_eq!(service.child, None);
    assert_eq!(service.partial, Partials::default());
    assert!(service.recent.is_empty());
    assert_eq!(service.health, None);
    assert_eq!(
        service.machine.phase,
        PhaseSnapshot::Backoff {
            remaining: Duration::new(2, 500)
        }
    );
    assert_eq!(service.machine.restarts, 4);
    assert!(service.machine.quick_failure_ages.is_empty());
}

#[test]
fn what_is_not_a_handover_is_refused() {
    for bytes in [&b""[..], b"not json", b"{\"no_format\": 1}", b"[1, 2]"] {
        let error = read_fd(memfd_with(bytes)).unwrap_err();
        assert!(matches!(error, HandoverError::Parse { .. }), "{error:?}");
        assert!(error.to_string().contains("without --handover"), "{error}");
    }
    let json = serde_json::to_vec(&sample()).unwrap();
    let error = read_bounded(memfd_with(&json), json.len() as u64 - 1).unwrap_err();
    assert!(matches!(error, HandoverError::TooLarge { .. }), "{error:?}");
    assert_eq!(
        read_bounded(memfd_with(&json), json.len() as u64).unwrap(),
        sample_at(&json)
    );
}

/// The sample as it was serialized (its timestamp is taken at creation).
fn sample_at(json: &[u8]) -> Handover {
    serde_json::from_slice(json).unwrap()
}

#[test]
fn keep_across_exec_clears_cloexec_on_exactly_those() {
    let (a, b) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let c = memfd_with(b"c");
    for fd in [a.as_fd(), b.as_fd(), c.as_fd()] {
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).unwrap();
    }
    keep_across_exec(&[a.as_fd(), c.as_fd()]).unwrap();
    assert!(!cloexec(a.as_fd()));
    assert!(cloexec(b.as_fd()), "not named: still closed on exec");
    assert!(!cloexec(c.as_fd()));
    // Idempotent: a descriptor already kept stays kept.
    keep_across_exec(&[a.as_fd()]).unwrap();
    assert!(!cloexec(a.as_fd()));
}

#[test]
fn a_named_fd_is_taken_back_once_and_closed_on_exec_again() {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    keep_across_exec(&[write.as_fd()]).unwrap();
    let mut handover = Handover::new("0.1.0", None);
    handover.add_fd("web.stdout", write.as_fd()).unwrap();
    let error = handover.add_fd("web.stdout", read.as_fd()).unwrap_err();
    assert!(
        matches!(error, HandoverError::DuplicateFd { .. }),
        "{error:?}"
    );
    // As across an exec: the number is all the new process has.
    let number = write.into_raw_fd();
    assert_eq!(handover.fds["web.stdout"], number);

    let taken = handover.take_fd("web.stdout").unwrap();
    assert_eq!(taken.as_raw_fd(), number);
    assert!(
        cloexec(taken.as_fd()),
        "its own children must not inherit it"
    );
    File::from(taken).write_all(b"through\n").unwrap();
    // Not read to its end: a process another test forks meanwhile may hold
    // the writer, kept across exec on purpose above.
    let mut got = [0u8; 8];
    File::from(read).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"through\n");

    let error = handover.take_fd("web.stdout").unwrap_err();
    assert!(
        matches!(error, HandoverError::MissingFd { .. }),
        "{error:?}"
    );
    assert!(error.to_string().contains("\"web.stdout\""), "{error}");
}

#[test]
fn a_named_fd_that_is_not_open_is_refused_by_name() {
    let mut handover = Handover::new("0.1.0", None);
    // Far above any descriptor limit: closed whatever other tests open.
    handover.fds.insert("api_tcp".to_owned(), i32::MAX - 1);
    let error = handover.take_fd("api_tcp").unwrap_err();
    assert!(matches!(error, HandoverError::ClosedFd { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("\"api_tcp\""), "{message}");
    assert!(message.contains("without --handover"), "{message}");
}

#[test]
fn recent_lines_convert_both_ways() {
    let line = LogLine {
        seq: 9,
        time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_456),
        stream: Stream::Stdout,
        text: b"hello".to_vec(),
    };
    let wire = RecentLine::from(&line);
    assert_eq!(wire.time_unix_ms, 1_700_000_000_456);
    assert_eq!(LogLine::from(wire), line);
}

#[test]
fn exit_reasons_convert_both_ways() {
    for reason in [
        ExitReason::Exited(3),
        ExitReason::Signaled {
            signal: 11,
            core_dumped: true,
        },
        ExitReason::OomKilled {
            memory_limit_mib: None,
        },
    ] {
        assert_eq!(ExitReason::from(ExitReasonSnapshot::from(reason)), reason);
    }
}

#[test]
fn taken_at_counts_the_time_since_the_writing() {
    let now = Instant::now();
    let mut handover = Handover::new("0.1.0", None);
    handover.written_at_unix_ms -= 5_000;
    let passed = now - handover.taken_at(now);
    assert!(passed >= Duration::from_secs(5), "{passed:?}");
    // A wall clock set back: no time passed, rather than a negative one.
    handover.written_at_unix_ms = unix_ms(SystemTime::now()) + 60_000;
    assert_eq!(handover.taken_at(now), now);
}

#[test]
fn descriptors_left_unclaimed_are_taken_to_be_closed() {
    // Close-on-exec: a process another test starts meanwhile holds it for
    // an instant at most.
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut handover = Handover::new("0.1.0", None);
    handover
        .add_fd("a_name_from_the_past", write.as_fd())
        .unwrap();
    handover.fds.insert("gone".to_owned(), i32::MAX - 1);
    let _ = write.into_raw_fd();
    let left = handover.take_remaining_fds();
    assert!(handover.fds.is_empty());
    let names: Vec<&str> = left.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(names, ["a_name_from_the_past", "gone"]);
    assert!(left[0].1.is_ok());
    assert!(matches!(left[1].1, Err(HandoverError::ClosedFd { .. })));
    drop(left);
    // The pipe's only writer was the one left over: closed now.
    let mut got = Vec::new();
    File::from(read).read_to_end(&mut got).unwrap();
    assert!(got.is_empty());
}

#[test]
fn a_frozen_service_goes_through_the_document_with_its_descriptors() {
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let mut service = sample().services.remove(0);
    service.name = "api".to_owned();
    let frozen = FrozenService {
        service: service.clone(),
        pidfd: None,
        stdout: Some(read),
        stderr: None,
        notify: None,
        from_version: None,
        frozen_at: None,
    };
    let mut handover = Handover::new("0.1.0", None);
    handover.add_service(&frozen).unwrap();
    assert_eq!(frozen.fds().len(), 1);
    assert_eq!(
        handover.fds.keys().collect::<Vec<_>>(),
        ["svc.api.stdout"],
        "only the descriptors it has"
    );
    // Twice the same name is a bug of the writer, refused.
    assert!(matches!(
        handover.add_service(&frozen),
        Err(HandoverError::DuplicateFd { .. })
    ));
    let number = frozen.stdout.unwrap().into_raw_fd();
    let mut handover: Handover =
        serde_json::from_slice(&serde_json::to_vec(&handover).unwrap()).unwrap();
    // As across an exec: the numbers are all the new process has.
    let mut taken = handover.take_services().unwrap();
    assert_eq!(taken.len(), 1);
    let api = taken.pop().unwrap();
    assert_eq!(api.service, service);
    let stdout = api.stdout.expect("its stdout");
    assert_eq!(stdout.as_raw_fd(), number);
    assert!(api.pidfd.is_none() && api.stderr.is_none() && api.notify.is_none());
    assert!(handover.fds.is_empty(), "each taken once");
    File::from(write).write_all(b"x").unwrap();
    let mut got = [0u8; 1];
    File::from(stdout).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"x");
}

#[test]
fn timers_count_the_monotonic_time_since_each_services_own_freeze() {
    let mut frozen = FrozenService {
        service: sample().services.remove(0),
        pidfd: None,
        stdout: None,
        stderr: None,
        notify: None,
        from_version: None,
        // A wall clock far off (stepped back a day during the switch) must
        // not move the timers: the monotonic stamp wins.
        frozen_at: Some(SystemTime::now() + Duration::from_secs(86_400)),
    };
    frozen.service.frozen_at_monotonic_ns = Some(monotonic_ns() - 2_000_000_000);
    let now = Instant::now();
    let since = now - frozen.taken_at(now);
    assert!(
        since >= Duration::from_secs(2) && since < Duration::from_secs(60),
        "{since:?}"
    );
    // Without the stamp (an older writer), the wall time since frozen_at.
    frozen.service.frozen_at_monotonic_ns = None;
    frozen.frozen_at = Some(SystemTime::now() - Duration::from_secs(3));
    let since = now - frozen.taken_at(now);
    assert!(
        since >= Duration::from_secs(3) && since < Duration::from_secs(60),
        "{since:?}"
    );
}
