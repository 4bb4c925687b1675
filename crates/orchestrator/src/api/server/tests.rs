//! The router against a fake daemon, over a real Unix socket (and TCP for
//! the token and Host checks), through the CLI's own client.

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use hyper::Method;
use orchestrator_core::events::{EventBus, EventKind};
use orchestrator_core::output::{LogBlock, LogLine, Stream};
use orchestrator_core::wire::{ServiceInfo, State as ServiceState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::broadcast;

use super::*;
use crate::api::client::{Client, ClientError};
use crate::api::control::FollowedLogs;

const LIMITS: ConnectionLimits = ConnectionLimits {
    max_connections: 64,
    header_timeout: Duration::from_secs(10),
    idle_timeout: Duration::from_secs(10),
};

#[derive(Clone)]
struct FakeControl {
    services: Vec<ServiceInfo>,
    actions: Arc<Mutex<Vec<(String, Action)>>>,
    shutdowns: Arc<Mutex<u32>>,
    events: EventBus,
    logs: broadcast::Sender<LogBlock>,
    closing: tokio_util::sync::CancellationToken,
}

fn info(name: &str, state: &str) -> ServiceInfo {
    ServiceInfo {
        name: name.to_owned(),
        configured: true,
        enabled: true,
        state: serde_json::from_value::<ServiceState>(serde_json::json!(state)).unwrap(),
        pid: (state == "running").then_some(4242),
        uptime: (state == "running").then_some(7),
        restarts: 1,
        requested_starts: 0,
        last_exit_code: Some(0),
        last_exit_signal: None,
        completed: false,
        last_error: None,
        health: None,
        log_dropped_bytes: 0,
        generation: 1,
        memory_bytes: None,
        cpu_seconds: None,
        oom_kills: 0,
        reason: None,
        notify_rejected: 0,
        depends_on: Default::default(),
    }
}

fn line(seq: u64, text: &str) -> LogLine {
    LogLine {
        seq,
        // A second apart, for since=.
        time: UNIX_EPOCH + Duration::from_secs(seq),
        stream: Stream::Stdout,
        text: text.as_bytes().to_vec(),
    }
}

impl Control for FakeControl {
    async fn list(&self) -> Result<Vec<ServiceInfo>, ControlError> {
        Ok(self.services.clone())
    }

    async fn info(&self, name: &str) -> Result<ServiceInfo, ControlError> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| ControlError::UnknownService(name.to_owned()))
    }

    async fn act(&self, name: &str, action: Action) -> Result<ServiceInfo, ControlError> {
        let info = self.info(name).await?;
        if name == "broken" && action != Action::Stop {
            return Err(ControlError::Failed(
                "service broken: could not start: no such file".to_owned(),
            ));
        }
        self.actions.lock().unwrap().push((name.to_owned(), action));
        Ok(info)
    }

    async fn follow_logs(&self, name: &str, tail: usize) -> Result<FollowedLogs, ControlError> {
        self.info(name).await?;
        let recent: Vec<LogLine> = [line(1, "one"), line(2, "two"), line(3, "three")]
            .into_iter()
            .rev()
            .take(tail)
            .rev()
            .collect();
        Ok((recent, self.logs.subscribe()))
    }

    fn events(&self) -> crate::api::control::FollowedEvents {
        self.events.subscribe()
    }

    fn daemon(&self) -> orchestrator_core::wire::DaemonInfo {
        orchestrator_core::wire::DaemonInfo {
            pid: 77,
            version: "test".into(),
            state_stale: true,
            state_failed_writes: 3,
            events_file_dropped: 0,
            upgrades: 0,
            upgrade_failures: 0,
            last_upgrade_error: None,
        }
    }

    fn closing(&self) -> tokio_util::sync::CancellationToken {
        self.closing.clone()
    }

    async fn shutdown(&self) {
        *self.shutdowns.lock().unwrap() += 1;
    }

    async fn reload(&self) -> orchestrator_core::reload::ReloadOutcome {
        Err(orchestrator_core::reload::ReloadError::Invalid(vec![
            "first problem".into(),
            "second problem".into(),
        ]))
    }
}

struct Served {
    fake: FakeControl,
    client: Client,
    dir: std::path::PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn serve() -> Served {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("orchestrator-api-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("orchestrator.sock");
    let fake = FakeControl {
        services: vec![info("api", "running"), info("broken", "failed")],
        actions: Arc::default(),
        shutdowns: Arc::default(),
        events: EventBus::in_memory(),
        logs: broadcast::channel(4).0,
        closing: tokio_util::sync::CancellationToken::new(),
    };
    let listener = bind_unix(&socket).await.unwrap();
    let app = router(fake.clone());
    tokio::spawn(super::serve(
        OwnerOnly::new(listener),
        app,
        LIMITS,
        fake.closing.clone(),
        TaskTracker::new(),
    ));
    Served {
        fake,
        client: Client::new(&socket),
        dir,
    }
}

fn api_error(result: Result<impl std::fmt::Debug, ClientError>) -> (u16, String, String) {
    match result {
        Err(ClientError::Api { status, body }) => {
            let code = serde_json::to_value(body.code).unwrap();
            (
                status.as_u16(),
                code.as_str().unwrap().to_owned(),
                body.error,
            )
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test]
async fn lists_and_describes_services() {
    let served = serve().await;
    let all: Vec<ServiceInfo> = served
        .client
        .json(Method::GET, "/v1/services")
        .await
        .unwrap();
    assert_eq!(all, served.fake.services);
    let one: ServiceInfo = served
        .client
        .json(Method::GET, "/v1/services/api")
        .await
        .unwrap();
    assert_eq!(one.pid, Some(4242));
    let (status, code, message) = api_error(
        served
            .client
            .json::<ServiceInfo>(Method::GET, "/v1/services/nope")
            .await,
    );
    assert_eq!((status, code.as_str()), (404, "unknown_service"));
    assert!(message.contains("\"nope\""), "{message}");
}

#[tokio::test]
async fn actions_answer_with_the_service_after_it() {
    let served = serve().await;
    let after: ServiceInfo = served
        .client
        .json(Method::POST, "/v1/services/api/restart")
        .await
        .unwrap();
    assert_eq!(after.name, "api");
    assert_eq!(
        *served.fake.actions.lock().unwrap(),
        [("api".to_owned(), Action::Restart)]
    );
    let (status, code, message) = api_error(
        served
            .client
            .json::<ServiceInfo>(Method::POST, "/v1/services/broken/start")
            .await,
    );
    assert_eq!((status, code.as_str()), (409, "action_failed"));
    assert!(message.contains("no such file"));
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let served = serve().await;
    let cases: [(Method, &str, u16, &str); 6] = [
        (Method::POST, "/v1/services/api/explode", 404, "not_found"),
        (
            Method::GET,
            "/v1/services/api/stop",
            405,
            "method_not_allowed",
        ),
        (Method::GET, "/v2/nothing", 404, "not_found"),
        (Method::GET, "/v1/services/..%2Fetc", 400, "bad_name"),
        (Method::POST, "/v1/services/.hidden/stop", 400, "bad_name"),
        (
            Method::GET,
            "/v1/services/api/logs?tail=many",
            400,
            "bad_query",
        ),
    ];
    for (method, path, expected_status, expected_code) in cases {
        let (status, code, _) = api_error(
            served
                .client
                .json::<serde_json::Value>(method.clone(), path)
                .await,
        );
        assert_eq!(
            (status, code.as_str()),
            (expected_status, expected_code),
            "{method} {path}"
        );
    }
    assert!(served.fake.actions.lock().unwrap().is_empty());
}

#[tokio::test]
async fn huge_bodies_are_refused_unread() {
    let served = serve().await;
    let mut stream = tokio::net::UnixStream::connect(served.client.socket())
        .await
        .unwrap();
    stream
        .write_all(b"POST /v1/shutdown HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(*served.fake.shutdowns.lock().unwrap(), 0);
}

#[tokio::test]
async fn an_invalid_reload_lists_every_problem_and_shutdown_is_accepted() {
    let served = serve().await;
    let (status, code, message) = api_error(
        served
            .client
            .json::<serde_json::Value>(Method::POST, "/v1/reload")
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "invalid_config"));
    assert!(
        message.contains("first problem") && message.contains("second problem"),
        "{message}"
    );
    let response = served
        .client
        .request(Method::POST, "/v1/shutdown")
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 202);
    assert_eq!(*served.fake.shutdowns.lock().unwrap(), 1);
}

async fn collect_lines(client: &Client, path: &str) -> Vec<String> {
    let mut lines = Vec::new();
    client
        .lines(path, |line| {
            lines.push(String::from_utf8_lossy(line).into_owned());
            Ok(())
        })
        .await
        .unwrap();
    lines
}

#[tokio::test]
async fn logs_tail_is_ndjson() {
    let served = serve().await;
    let lines = collect_lines(&served.client, "/v1/services/api/logs?tail=2").await;
    let records: Vec<LogRecord> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        records,
        [
            LogRecord::Line {
                seq: 2,
                time: "1970-01-01T00:00:02.000Z".into(),
                stream: Stream::Stdout,
                text: "two".into()
            },
            LogRecord::Line {
                seq: 3,
                time: "1970-01-01T00:00:03.000Z".into(),
                stream: Stream::Stdout,
                text: "three".into()
            },
        ]
    );
}

fn seqs(lines: &[String]) -> Vec<u64> {
    lines
        .iter()
        .map(|l| match serde_json::from_str(l).unwrap() {
            LogRecord::Line { seq, .. } => seq,
            other => panic!("{other:?}"),
        })
        .collect()
}

#[tokio::test]
async fn logs_since_keeps_the_lines_from_then_on() {
    let served = serve().await;
    let client = &served.client;
    let since = "/v1/services/api/logs?since=1970-01-01T00:00:02Z";
    assert_eq!(seqs(&collect_lines(client, since).await), [2, 3]);
    let with_tail = format!("{since}&tail=1");
    assert_eq!(seqs(&collect_lines(client, &with_tail).await), [3]);
    let millis = "/v1/services/api/logs?since=1970-01-01T00:00:02.001Z";
    assert_eq!(seqs(&collect_lines(client, millis).await), [3]);
    let later = "/v1/services/api/logs?since=2000-01-01T00:00:00Z";
    assert!(collect_lines(client, later).await.is_empty());
    let (status, code, message) = api_error(
        client
            .json::<serde_json::Value>(Method::GET, "/v1/services/api/logs?since=10m")
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "bad_query"));
    assert!(
        message.contains("since") && message.contains("RFC 3339"),
        "{message}"
    );
}

/// The `data:` of each server-sent event, parsed.
fn sse_events(lines: &[String]) -> Vec<orchestrator_core::events::Event> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|data| serde_json::from_str(data.trim()).unwrap())
        .collect()
}

fn emit_a_few(events: &EventBus) {
    events.emit(None, EventKind::DaemonStarted { pid: 1 });
    events.emit(Some("api"), EventKind::Started { pid: 2 });
    events.emit(Some("db"), EventKind::Started { pid: 3 });
    events.emit(Some("api"), EventKind::Stopped);
}

#[tokio::test]
async fn events_take_a_tail_and_a_service() {
    let served = serve().await;
    emit_a_few(&served.fake.events);
    let client = &served.client;
    let seqs = |events: Vec<orchestrator_core::events::Event>| {
        events.iter().map(|e| e.seq).collect::<Vec<_>>()
    };
    let all = sse_events(&collect_lines(client, "/v1/events?follow=false").await);
    assert_eq!(seqs(all), [1, 2, 3, 4], "no tail= is the whole history");
    let last = sse_events(&collect_lines(client, "/v1/events?follow=false&tail=2").await);
    assert_eq!(seqs(last), [3, 4]);
    let none = sse_events(&collect_lines(client, "/v1/events?follow=false&tail=0").await);
    assert!(none.is_empty());
    let api = sse_events(&collect_lines(client, "/v1/events?follow=false&service=api").await);
    assert_eq!(seqs(api), [2, 4], "only api's: the daemon's own left out");
    let api_last =
        sse_events(&collect_lines(client, "/v1/events?follow=false&service=api&tail=1").await);
    assert_eq!(seqs(api_last), [4], "the tail of api's, not of all");
    let gone = sse_events(&collect_lines(client, "/v1/events?follow=false&service=old").await);
    assert!(gone.is_empty(), "a name not running is no error");

    for (path, expected) in [
        ("/v1/events?service=..%2Fx", "bad_name"),
        ("/v1/events?tail=many", "bad_query"),
        ("/v1/events?tail=-1", "bad_query"),
    ] {
        let (status, code, message) =
            api_error(client.json::<serde_json::Value>(Method::GET, path).await);
        assert_eq!(
            (status, code.as_str()),
            (400, expected),
            "{path}: {message}"
        );
    }
}

#[tokio::test]
async fn following_events_of_one_service_starts_from_its_last_ones() {
    let served = serve().await;
    emit_a_few(&served.fake.events);
    let mut lines = served
        .client
        .open_lines("/v1/events?follow=true&service=api&tail=1", true)
        .await
        .unwrap();
    let mut next_event = async || loop {
        let line = lines
            .next_line()
            .await
            .unwrap()
            .expect("the stream goes on");
        let line = String::from_utf8(line).unwrap();
        if let Some(data) = line.strip_prefix("data:") {
            return serde_json::from_str::<orchestrator_core::events::Event>(data.trim()).unwrap();
        }
    };
    assert_eq!(next_event().await.seq, 4, "the last of api's first");
    served
        .fake
        .events
        .emit(Some("db"), EventKind::Started { pid: 5 });
    served
        .fake
        .events
        .emit(Some("api"), EventKind::Started { pid: 6 });
    let live = next_event().await;
    assert_eq!(
        (live.seq, live.kind),
        (6, EventKind::Started { pid: 6 }),
        "db's event was left out"
    );
}

#[tokio::test]
async fn the_daemon_answers_for_itself() {
    let served = serve().await;
    let info: orchestrator_core::wire::DaemonInfo =
        served.client.json(Method::GET, "/v1/daemon").await.unwrap();
    assert_eq!(
        (info.pid, info.state_stale, info.state_failed_writes),
        (77, true, 3)
    );
    let metrics = collect_lines(&served.client, "/metrics").await;
    assert!(
        metrics
            .iter()
            .any(|l| l == "orchestrator_state_record_stale 1"),
        "{metrics:?}"
    );
}

/// When the daemon closes, followers get the end of their stream (a clean
/// end, read as success), not a cut connection.
#[tokio::test]
async fn follow_streams_end_cleanly_when_the_daemon_closes() {
    let served = serve().await;
    let follow = |path: &'static str| {
        let client = Client::new(served.client.socket());
        tokio::spawn(async move { client.lines(path, |_| Ok(())).await })
    };
    let logs = follow("/v1/services/api/logs?follow=true");
    let events = follow("/v1/events");
    while served.fake.logs.receiver_count() == 0 {
        tokio::task::yield_now().await;
    }
    served.fake.closing.cancel();
    for (what, task) in [("logs", logs), ("events", events)] {
        let ended = tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .unwrap_or_else(|_| panic!("the {what} stream did not end"));
        let result = ended.unwrap();
        assert!(result.is_ok(), "{what}: {result:?}");
    }
}

#[tokio::test]
async fn a_slow_follower_is_told_how_many_lines_it_missed() {
    let served = serve().await;
    let logs = served.fake.logs.clone();
    let records = Arc::new(Mutex::new(Vec::new()));
    let reader = tokio::spawn({
        let client = Client::new(served.client.socket());
        let records = Arc::clone(&records);
        async move {
            client
                .lines("/v1/services/api/logs?tail=3&follow=true", |line| {
                    let record = serde_json::from_slice::<LogRecord>(line).unwrap();
                    records.lock().unwrap().push(record);
                    Ok(())
                })
                .await
        }
    });
    // Once the follower is subscribed, send more blocks than the channel
    // holds before it can read them: it must lag.
    while logs.receiver_count() == 0 {
        tokio::task::yield_now().await;
    }
    let block = |first_seq: u64| LogBlock {
        first_seq,
        time: UNIX_EPOCH,
        stream: Stream::Stderr,
        line_count: 1,
        bytes: Arc::new(b"burst\n".to_vec()),
    };
    for seq in 4..14 {
        let _ = logs.send(block(seq));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while records.lock().unwrap().len() < 8 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    reader.abort();
    let records = records.lock().unwrap().clone();
    assert_eq!(records.len(), 3 + 1 + 4, "{records:?}");
    assert_eq!(records[3], LogRecord::Skipped { skipped: 6 });
    assert!(
        matches!(&records[4], LogRecord::Line { seq: 10, stream, .. } if *stream == Stream::Stderr)
    );
}

/// Query values are percent-decoded by the framework (`%32` is `2`, `%66alse`
/// is `false`), and a bad value is refused with its key.
#[tokio::test]
async fn query_values_are_percent_decoded() {
    let served = serve().await;
    let encoded = collect_lines(&served.client, "/v1/services/api/logs?tail=%32").await;
    let plain = collect_lines(&served.client, "/v1/services/api/logs?tail=2").await;
    assert_eq!(encoded, plain);
    assert_eq!(encoded.len(), 2);
    served
        .fake
        .events
        .emit(Some("api"), EventKind::Started { pid: 9 });
    // Without the decoding this would follow forever.
    let events = collect_lines(&served.client, "/v1/events?follow=%66alse").await;
    assert!(events.iter().any(|l| l.starts_with("id")), "{events:?}");
    let (status, code, message) = api_error(
        served
            .client
            .json::<serde_json::Value>(Method::GET, "/v1/services/api/logs?follow=%6Eo")
            .await,
    );
    assert_eq!((status, code.as_str()), (400, "bad_query"));
    assert!(
        message.contains("follow") && message.contains("\"no\""),
        "{message}"
    );
}

#[tokio::test]
async fn events_come_as_server_sent_events() {
    let served = serve().await;
    served
        .fake
        .events
        .emit(Some("api"), EventKind::Started { pid: 9 });
    let lines = collect_lines(&served.client, "/v1/events?follow=false").await;
    let data: Vec<&String> = lines.iter().filter(|l| l.starts_with("data:")).collect();
    assert_eq!(data.len(), 1, "{lines:?}");
    let event: orchestrator_core::events::Event =
        serde_json::from_str(data[0].trim_start_matches("data:").trim()).unwrap();
    assert_eq!(event.kind, EventKind::Started { pid: 9 });
    assert!(
        lines.iter().any(|l| l == "id: 1" || l == "id:1"),
        "{lines:?}"
    );
}

#[tokio::test]
async fn metrics_and_healthz() {
    let served = serve().await;
    let response = served
        .client
        .request(Method::GET, "/metrics")
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let lines = collect_lines(&served.client, "/metrics").await;
    assert!(lines.contains(&"orchestrator_service_up{service=\"api\"} 1".to_owned()));
    let lines = collect_lines(&served.client, "/healthz").await;
    assert_eq!(lines, ["ok"]);
}

async fn raw_tcp(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn tcp_needs_the_token_and_a_local_host_name() {
    let served = serve().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tcp_router(served.fake.clone(), addr, "s3cret".to_owned());
    tokio::spawn(super::serve(
        listener,
        app,
        LIMITS,
        served.fake.closing.clone(),
        TaskTracker::new(),
    ));
    let host = format!("127.0.0.1:{}", addr.port());
    let get = |path: &str, host: &str, auth: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n")
    };
    let cases = [
        (get("/v1/services", &host, ""), "HTTP/1.1 401"),
        (
            get("/v1/services", &host, "Authorization: Bearer wrong\r\n"),
            "HTTP/1.1 401",
        ),
        (
            get("/v1/services", &host, "Authorization: Bearer s3cret\r\n"),
            "HTTP/1.1 200",
        ),
        (
            get("/metrics", &host, "Authorization: Bearer s3cre\r\n"),
            "HTTP/1.1 401",
        ),
        (get("/healthz", &host, ""), "HTTP/1.1 200"),
        (
            get("/v1/services", &host, "Authorization: bearer s3cret\r\n"),
            "HTTP/1.1 200",
        ),
        (
            get("/v1/services", &host, "Authorization: Bearer S3CRET\r\n"),
            "HTTP/1.1 401",
        ),
        (
            get("/v1/services", &host, "Authorization: Basic s3cret\r\n"),
            "HTTP/1.1 401",
        ),
        (
            get(
                "/v1/services",
                &format!("localhost:{}", addr.port()),
                "Authorization: Bearer s3cret\r\n",
            ),
            "HTTP/1.1 200",
        ),
        (
            get(
                "/v1/services",
                "evil.example",
                "Authorization: Bearer s3cret\r\n",
            ),
            "HTTP/1.1 421",
        ),
        (get("/healthz", "evil.example", ""), "HTTP/1.1 421"),
        // An absolute-form target names the host too (RFC 9112 3.2.2: it
        // wins over the Host header), so it passes the same test.
        (
            get(
                "http://evil.example/v1/services",
                &host,
                "Authorization: Bearer s3cret\r\n",
            ),
            "HTTP/1.1 421",
        ),
        (
            get("http://evil.example/healthz", &host, ""),
            "HTTP/1.1 421",
        ),
        (
            get(
                &format!("http://evil.example:{}/healthz", addr.port()),
                &host,
                "",
            ),
            "HTTP/1.1 421",
        ),
        (
            get(
                &format!("http://{host}/v1/services"),
                &host,
                "Authorization: Bearer s3cret\r\n",
            ),
            "HTTP/1.1 200",
        ),
        (
            get(
                &format!("http://localhost:{}/healthz", addr.port()),
                &host,
                "",
            ),
            "HTTP/1.1 200",
        ),
        (
            get(&format!("http://{host}/healthz"), "evil.example", ""),
            "HTTP/1.1 421",
        ),
    ];
    for (request, expected) in cases {
        let answer = raw_tcp(addr, &request).await;
        assert!(answer.starts_with(expected), "{request:?} → {answer}");
    }
    let shutdown = format!(
        "POST /v1/shutdown HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    assert!(raw_tcp(addr, &shutdown).await.starts_with("HTTP/1.1 401"));
    assert_eq!(*served.fake.shutdowns.lock().unwrap(), 0);
}

#[test]
fn token_comparison_is_exact() {
    assert!(token_matches(b"abc", b"abc"));
    assert!(!token_matches(b"abc", b"abd"));
    assert!(!token_matches(b"abc", b"ab"));
    assert!(!token_matches(b"", b"a"));
    assert!(token_matches(b"", b""));
}

#[tokio::test]
async fn a_live_socket_is_never_stolen_and_a_stale_one_is_replaced() {
    let served = serve().await;
    let socket = served.client.socket().to_owned();
    assert!(matches!(
        bind_unix(&socket).await,
        Err(ListenError::AlreadyRunning(_))
    ));
    let stale = served.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    let listener = bind_unix(&stale).await.unwrap();
    drop(listener);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn the_connection_cap_leaves_the_services_their_descriptors() {
    // Plenty of descriptors: the configured cap stands.
    assert_eq!(connection_cap(256, 2, 10, 1 << 20, 30), 256);
    // 1024 descriptors, 160 services (800 at five each), 30 open, 64
    // margin: 130 left for two listeners.
    assert_eq!(connection_cap(256, 2, 160, 1024, 30), 65);
    assert_eq!(connection_cap(256, 1, 160, 1024, 30), 130);
    // Starved: a few connections all the same, never more than asked.
    assert_eq!(connection_cap(256, 2, 300, 1024, 30), 4);
    assert_eq!(connection_cap(2, 2, 300, 1024, 30), 2);
}

#[test]
fn the_refusal_is_well_formed() {
    let text = std::str::from_utf8(REFUSAL).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
    assert!(
        head.contains(&format!("content-length: {}\r\n", body.len())),
        "{head}"
    );
    let error: ErrorBody = serde_json::from_str(body).unwrap();
    assert_eq!(error.code, ErrorCode::Busy);
}

/// A client that stops reading a big answer: the write stalls, and after
/// the idle limit the connection fails instead of waiting forever.
#[tokio::test]
async fn a_write_stalled_past_the_limit_fails() {
    let limit = Duration::from_millis(200);
    let (near, mut far) = tokio::io::duplex(64);
    let mut limited = StallLimit::new(near, limit);
    let big = vec![b'x'; 4096];
    let started = std::time::Instant::now();
    let error = limited.write_all(&big).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::TimedOut);
    assert!(started.elapsed() >= limit);
    // Progress resets the limit: a stall that ended does not count later.
    let mut sink = vec![0u8; 64];
    far.read_exact(&mut sink).await.unwrap();
    limited.write_all(&big[..64]).await.unwrap();
    assert!(limited.stalled.is_none());
}

/// A TCP API server with one connection accepted (its task exists) and
/// nothing sent on it yet, then told to stop (its listener returned).
async fn connected_then_stopped() -> (tokio::net::TcpStream, std::net::SocketAddr, TaskTracker) {
    let served = serve().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = tcp_router(served.fake.clone(), addr, "s3cret".to_owned());
    let closing = tokio_util::sync::CancellationToken::new();
    let tasks = TaskTracker::new();
    let server = tokio::spawn(super::serve(
        listener,
        app,
        LIMITS,
        closing.clone(),
        tasks.clone(),
    ));
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tasks.is_empty() {
        assert!(tokio::time::Instant::now() < deadline, "never accepted");
        tokio::task::yield_now().await;
    }
    closing.cancel();
    drop(server.await.unwrap());
    (stream, addr, tasks)
}

#[tokio::test]
async fn a_connection_accepted_just_before_the_server_stops_is_answered() {
    // The race of an upgrade's switch: accepted, then the server stops
    // before the client's request has arrived. The client must get its
    // answer, not a reset.
    let (mut stream, addr, tasks) = connected_then_stopped().await;
    stream
        .write_all(
            format!(
                "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
                addr.port()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    tasks.close();
    tasks.wait().await;
}

#[tokio::test]
async fn a_silent_connection_does_not_hold_a_stopping_server() {
    let (mut stream, _, tasks) = connected_then_stopped().await;
    tasks.close();
    // Closed after the grace (500 ms), not held open until the client
    // speaks or the header timeout (10 s here) ends it.
    tokio::time::timeout(Duration::from_secs(4), tasks.wait())
        .await
        .expect("the silent connection was still served after 4s");
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
}
