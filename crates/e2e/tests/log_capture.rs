//! Output capture with real pipes: every line reaches `data_dir/logs/NAME.log`
//! exactly once, in order, whole, byte for byte.

use std::sync::Arc;

use orchestrator_core::events::EventBus;
use orchestrator_core::output::{MAX_LINE_BYTES as MAX_LINE, Stream};
use orchestrator_core::process::{ExitReason, UnixSpawner};
use orchestrator_core::service::{ServiceHandle, State, spawn_service};
use orchestrator_e2e::*;

/// Run a fixture that prints and exits 0; returns once it has exited.
async fn run_to_exit(
    dir: &TestDir,
    guard: &ProcessGuard,
    name: &str,
    args: &[&str],
) -> ServiceHandle {
    let mut all = args.to_vec();
    all.extend(["--exit", "0"]);
    let config = config_in(dir, vec![(name, fixture(&all))]);
    let (handle, _task) = spawn_service(
        definition(&config, name),
        Arc::new(UnixSpawner::plain()),
        EventBus::in_memory(),
    );
    guard.watch(&handle);
    let _ = within("start", handle.start()).await;
    let status = wait_exited(&handle).await;
    assert_eq!(status, Some(ExitReason::Exited(0)), "{name} exited cleanly");
    handle
}

/// Wait until the service's output has counted `count` lines on `stream`
/// (a line is counted once its bytes went to the file).
async fn wait_for_count(handle: &ServiceHandle, stream: Stream, count: u64) {
    let output = handle.output();
    let reached = wait_until_async(DEADLINE, || output.lines(stream) >= count).await;
    assert!(
        reached,
        "{} lines on {} after {DEADLINE:?}, expected {count}",
        output.lines(stream),
        stream.as_str()
    );
    assert_eq!(
        output.lines(stream),
        count,
        "no extra lines on {}",
        stream.as_str()
    );
}

async fn wait_exited(handle: &ServiceHandle) -> Option<ExitReason> {
    wait_status(handle, "stopped after its exit", |s| {
        s.state == State::Stopped && s.last_exit.is_some()
    })
    .await
    .last_exit
}

#[tokio::test]
async fn a_flood_arrives_complete_and_in_order() {
    const LINES: usize = 200_000;
    let dir = TestDir::new("flood");
    let guard = ProcessGuard::new();
    let count = LINES.to_string();
    let handle = run_to_exit(&dir, &guard, "flood", &["--flood", &count]).await;
    wait_for_count(&handle, Stream::Stdout, LINES as u64).await;
    assert_eq!(handle.output().lines(Stream::Stderr), 0);
    assert_eq!(handle.output().dropped_bytes(), 0);

    // Every flood line is 100 bytes with its newline.
    let bytes = read_bytes(&dir.log_path("flood"));
    assert_eq!(bytes.len(), LINES * 100, "nothing more, nothing less");
    let filler = "y".repeat(80);
    for (k, line) in bytes.split(|&b| b == b'\n').take(LINES).enumerate() {
        let expected = format!("flood {k:012} {filler}");
        assert!(
            line == expected.as_bytes(),
            "line {k} is {:?}, expected {expected:?}",
            String::from_utf8_lossy(line)
        );
    }
}

#[tokio::test]
async fn both_streams_arrive_whole_and_unmixed() {
    const LINES: usize = 5_000;
    let dir = TestDir::new("streams");
    let guard = ProcessGuard::new();
    let count = LINES.to_string();
    let handle = run_to_exit(&dir, &guard, "both", &["--lines", &count]).await;
    wait_for_count(&handle, Stream::Stdout, LINES as u64 / 2).await;
    wait_for_count(&handle, Stream::Stderr, LINES as u64 / 2).await;

    let lines = read_lines(&dir.log_path("both"));
    assert_eq!(lines.len(), LINES);

    let mut seen = vec![false; LINES];
    let mut last = [None::<usize>, None];
    for line in &lines {
        let (k, stream) = line
            .strip_prefix("line ")
            .and_then(|rest| rest.split_once(" on "))
            .and_then(|(k, stream)| Some((k.parse::<usize>().ok()?, stream)))
            .unwrap_or_else(|| panic!("a mixed or broken line: {line:?}"));
        let expected_stream = if k % 2 == 0 { "stdout" } else { "stderr" };
        assert_eq!(stream, expected_stream, "line {line:?}");
        assert!(!seen[k], "line {k} twice");
        seen[k] = true;
        // Each stream keeps its own order.
        let slot = &mut last[k % 2];
        assert!(slot.is_none_or(|prev| prev < k), "{line:?} out of order");
        *slot = Some(k);
    }
    assert!(seen.iter().all(|&s| s), "every line arrived");
}

#[tokio::test]
async fn a_final_line_without_newline_is_delivered() {
    let dir = TestDir::new("partial");
    let guard = ProcessGuard::new();
    let handle = run_to_exit(
        &dir,
        &guard,
        "partial",
        &["--ready", "--partial", "the end, no newline"],
    )
    .await;
    wait_for_count(&handle, Stream::Stdout, 2).await;
    let path = dir.log_path("partial");
    let lines = read_lines(&path);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines[0].starts_with("READY "));
    assert_eq!(lines[1], "the end, no newline");
    let bytes = read_bytes(&path);
    assert!(
        bytes.ends_with(b"the end, no newline\n") || bytes.ends_with(b"the end, no newline"),
        "{:?}",
        String::from_utf8_lossy(&bytes)
    );
}

#[tokio::test]
async fn invalid_utf8_is_kept_byte_for_byte() {
    let dir = TestDir::new("utf8");
    let guard = ProcessGuard::new();
    let handle = run_to_exit(&dir, &guard, "bytes", &["--invalid-utf8", "--ready"]).await;
    wait_for_count(&handle, Stream::Stdout, 2).await;
    let bytes = read_bytes(&dir.log_path("bytes"));
    assert!(
        bytes.starts_with(b"bad \xff\xfe bytes\nREADY "),
        "the raw bytes are kept: {bytes:?}"
    );
}

#[tokio::test]
async fn an_over_long_line_is_split_in_16_kib_pieces_without_loss() {
    let dir = TestDir::new("longline");
    let guard = ProcessGuard::new();
    let handle = run_to_exit(&dir, &guard, "long", &["--long-line", "40000"]).await;
    // 40000 = 16384 + 16384 + 7232, each piece with a newline.
    wait_for_count(&handle, Stream::Stdout, 3).await;
    let bytes = read_bytes(&dir.log_path("long"));
    let pieces: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let lengths: Vec<usize> = pieces.iter().map(|p| p.len()).collect();
    assert_eq!(lengths, [MAX_LINE, MAX_LINE, 40_000 - 2 * MAX_LINE, 0]);
    assert!(pieces.iter().all(|p| p.iter().all(|&b| b == b'x')));
}

#[tokio::test]
async fn a_line_of_exactly_16_kib_stays_whole() {
    let dir = TestDir::new("edgeline");
    let guard = ProcessGuard::new();
    let exact = MAX_LINE.to_string();
    let over = (MAX_LINE + 1).to_string();
    let handle = run_to_exit(
        &dir,
        &guard,
        "edge",
        &["--long-line", &exact, "--long-line", &over],
    )
    .await;
    wait_for_count(&handle, Stream::Stdout, 3).await;
    let bytes = read_bytes(&dir.log_path("edge"));
    let lengths: Vec<usize> = bytes.split(|&b| b == b'\n').map(<[u8]>::len).collect();
    assert_eq!(lengths, [MAX_LINE, MAX_LINE, 1, 0]);
}
