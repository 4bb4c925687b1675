//! Each probe against a real peer on this machine: raw HTTP/1.1 served by
//! a TcpListener, an h2c gRPC health server built on hyper, real processes
//! for exec. Deadlines are generous (a loaded 2-core machine); waiting is
//! polling with a deadline, never a sleep that hopes.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderMap;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use orchestrator_core::cgroup::{Flavor, Limits, Settings, detect, kill_until_empty};
use orchestrator_core::health::Probe;
use orchestrator_core::health::probe::{ExecContext, ProbeError, check};
use orchestrator_core::process::{SpawnSpec, UnixSpawner};

/// Generous: the suite also runs on a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(20);

/// The timeout of a check expected to pass or fail on its own: far longer
/// than any of them takes, so it never decides one.
const ROOMY: Duration = Duration::from_secs(10);

/// A context for probes that are not exec: never used by them.
fn no_exec() -> ExecContext {
    ExecContext {
        spawner: Arc::new(UnixSpawner::plain()),
        spec: SpawnSpec::default(),
        cgroup: None,
    }
}

async fn run(probe: &Probe, timeout: Duration) -> Result<(), ProbeError> {
    run_with(probe, timeout, &no_exec()).await
}

/// The check, with a deadline of the test's own so a hang fails it.
async fn run_with(probe: &Probe, timeout: Duration, exec: &ExecContext) -> Result<(), ProbeError> {
    tokio::time::timeout(timeout + DEADLINE, check(probe, timeout, exec))
        .await
        .expect("the check ends by its own timeout")
}

fn failure(result: Result<(), ProbeError>) -> String {
    match result {
        Err(ProbeError::Failed(reason)) => reason,
        other => panic!("expected a failure, got {other:?}"),
    }
}

// --- http -------------------------------------------------------------------

/// Serves `response` (raw bytes) to every connection, after reading its
/// request head, which it passes on.
async fn serve_http(response: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (heads, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let heads = heads.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let _ = heads.send(head);
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (address, received)
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buffer = [0u8; 1024];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buffer[..n]),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn http(address: SocketAddr, path: &str, expect_status: Option<u16>) -> Probe {
    Probe::Http {
        url: format!("http://{address}{path}"),
        expect_status,
    }
}

#[tokio::test]
async fn http_2xx_is_healthy_and_the_request_is_a_plain_get() {
    let (address, mut heads) =
        serve_http("HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok").await;
    run(&http(address, "/healthz?deep=1", None), ROOMY)
        .await
        .unwrap();
    let head = heads.recv().await.unwrap();
    assert!(
        head.starts_with("GET /healthz?deep=1 HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("\r\nhost: {address}\r\n")),
        "{head}"
    );
}

#[tokio::test]
async fn http_an_ipv6_host_is_reached_and_named_in_brackets() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: no IPv6 loopback here");
        return;
    }
    let listener = TcpListener::bind("[::1]:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let (heads, mut received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let _ = heads.send(read_head(&mut stream).await);
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            .await;
    });
    run(&http(address, "/", None), ROOMY).await.unwrap();
    let head = received.recv().await.unwrap().to_ascii_lowercase();
    assert!(
        head.contains(&format!("\r\nhost: [::1]:{}\r\n", address.port())),
        "{head}"
    );
}

#[tokio::test]
async fn http_500_is_unhealthy_with_its_status() {
    let (address, _heads) =
        serve_http("HTTP/1.1 500 Internal Server Error\r\ncontent-length: 4\r\n\r\nboom").await;
    let reason = failure(run(&http(address, "/healthz", None), ROOMY).await);
    assert_eq!(reason, format!("GET http://{address}/healthz: status 500"));
}

#[tokio::test]
async fn http_a_redirect_is_an_answer_not_followed() {
    let (address, mut heads) = serve_http(
        "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/elsewhere\r\ncontent-length: 0\r\n\r\n",
    )
    .await;
    run(&http(address, "/", None), ROOMY).await.unwrap();
    heads.recv().await.unwrap();
    // One request only: port 1 was never tried (it would have failed).
    assert!(heads.try_recv().is_err());
}

#[tokio::test]
async fn http_expect_status_must_match_exactly() {
    let (no_content, _a) = serve_http("HTTP/1.1 204 No Content\r\n\r\n").await;
    run(&http(no_content, "/", Some(204)), ROOMY).await.unwrap();
    let (ok, _b) = serve_http("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").await;
    let reason = failure(run(&http(ok, "/ready", Some(204)), ROOMY).await);
    assert_eq!(
        reason,
        format!("GET http://{ok}/ready: status 200 (expected 204)")
    );
    // A status that is otherwise a failure is healthy when expected.
    let (teapot, _c) = serve_http("HTTP/1.1 418 I'm a teapot\r\ncontent-length: 0\r\n\r\n").await;
    run(&http(teapot, "/", Some(418)), ROOMY).await.unwrap();
}

#[tokio::test]
async fn http_a_large_body_is_not_read_to_its_end() {
    // Claims a gigabyte and sends a little: the status is the answer.
    let (address, _heads) =
        serve_http("HTTP/1.1 200 OK\r\ncontent-length: 1000000000\r\n\r\nsome of it").await;
    run(&http(address, "/", None), ROOMY).await.unwrap();
}

#[tokio::test]
async fn http_a_silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    // Accepts, reads, never answers (the connection is held open).
    tokio::spawn(async move {
        let mut held = Vec::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            held.push(stream);
        }
    });
    let timeout = Duration::from_millis(300);
    let started = Instant::now();
    let result = run(&http(address, "/healthz", None), timeout).await;
    assert_eq!(result, Err(ProbeError::TimedOut(timeout)));
    assert!(started.elapsed() >= timeout);
    assert_eq!(
        ProbeError::TimedOut(timeout).to_string(),
        "timed out after 300ms"
    );
}

#[tokio::test]
async fn http_a_closed_port_is_refused() {
    let address = closed_port().await;
    let reason = failure(run(&http(address, "/healthz", None), ROOMY).await);
    assert_eq!(
        reason,
        format!("GET http://{address}/healthz: connect {address}: connection refused")
    );
}

// --- tcp --------------------------------------------------------------------

/// A port nothing listens on (bound, then let go).
async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

#[tokio::test]
async fn tcp_an_open_port_is_healthy() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let probe = Probe::Tcp {
        address: listener.local_addr().unwrap().to_string(),
    };
    run(&probe, ROOMY).await.unwrap();
    // Resolved by name too.
    let port = listener.local_addr().unwrap().port();
    let by_name = Probe::Tcp {
        address: format!("localhost:{port}"),
    };
    // localhost may resolve to ::1 first, where nothing listens: each
    // address is tried in turn.
    run(&by_name, ROOMY).await.unwrap();
}

#[tokio::test]
async fn tcp_a_closed_port_is_refused() {
    let address = closed_port().await;
    let probe = Probe::Tcp {
        address: address.to_string(),
    };
    let reason = failure(run(&probe, ROOMY).await);
    assert_eq!(reason, format!("connect {address}: connection refused"));
}

// --- grpc -------------------------------------------------------------------

type GrpcBody = BoxBody<Bytes, Infallible>;

/// A grpc.health.v1 server over h2c: SERVING for "" and "api",
/// NOT_SERVING for "db", NOT_FOUND (trailers-only) for any other service.
async fn serve_grpc() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(health_check);
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

async fn health_check(request: Request<Incoming>) -> Result<Response<GrpcBody>, Infallible> {
    let (parts, body) = request.into_parts();
    assert_eq!(parts.uri.path(), "/grpc.health.v1.Health/Check");
    assert_eq!(parts.headers["content-type"], "application/grpc");
    assert_eq!(parts.headers["te"], "trailers");
    let body = body.collect().await.unwrap().to_bytes();
    // The frame (uncompressed, its length), then field 1 if not empty.
    assert_eq!(body[0], 0);
    assert_eq!(
        u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize,
        body.len() - 5
    );
    let service = match &body[5..] {
        [] => String::new(),
        [0x0a, length, name @ ..] if usize::from(*length) == name.len() => {
            String::from_utf8(name.to_vec()).unwrap()
        }
        other => panic!("unexpected request message {other:?}"),
    };
    let serving = match service.as_str() {
        "" | "api" => 1u8,
        "db" => 2,
        _ => {
            // Trailers-only: the status among the headers, no body.
            let response = Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "5")
                .header("grpc-message", "unknown service")
                .body(Empty::new().boxed())
                .unwrap();
            return Ok(response);
        }
    };
    // HealthCheckResponse { status = 1 } after a field the probe does not
    // know (field 2, a varint): it must be skipped.
    let message = [0x10, 0x2a, 0x08, serving];
    let mut frame = vec![0, 0, 0, 0, message.len() as u8];
    frame.extend_from_slice(&message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().unwrap());
    let body = Full::new(Bytes::from(frame))
        .with_trailers(async move { Some(Ok(trailers)) })
        .boxed();
    Ok(Response::builder()
        .header("content-type", "application/grpc")
        .body(body)
        .unwrap())
}

fn grpc(address: SocketAddr, service: &str) -> Probe {
    Probe::Grpc {
        address: address.to_string(),
        service: service.to_owned(),
    }
}

#[tokio::test]
async fn grpc_serving_is_healthy() {
    let address = serve_grpc().await;
    run(&grpc(address, ""), ROOMY).await.unwrap();
    run(&grpc(address, "api"), ROOMY).await.unwrap();
}

#[tokio::test]
async fn grpc_not_serving_is_unhealthy() {
    let address = serve_grpc().await;
    let reason = failure(run(&grpc(address, "db"), ROOMY).await);
    assert_eq!(
        reason,
        format!("grpc {address} service \"db\": NOT_SERVING")
    );
}

#[tokio::test]
async fn grpc_an_error_status_is_reported_with_its_message() {
    let address = serve_grpc().await;
    let reason = failure(run(&grpc(address, "nope"), ROOMY).await);
    assert_eq!(
        reason,
        format!("grpc {address} service \"nope\": grpc-status 5 (NOT_FOUND): unknown service")
    );
}

#[tokio::test]
async fn grpc_a_closed_port_is_refused() {
    let address = closed_port().await;
    let reason = failure(run(&grpc(address, ""), ROOMY).await);
    assert_eq!(
        reason,
        format!("grpc {address}: connect {address}: connection refused")
    );
}

// --- exec -------------------------------------------------------------------

fn unique(tag: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "health-{}-{}-{tag}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// A service's spec as the actor would have it: a clean environment, its
/// own directory.
fn service_spec(dir: &Path) -> SpawnSpec {
    SpawnSpec {
        service: "svc".to_owned(),
        program: "/bin/false".into(),
        env: vec![
            ("PATH".into(), "/usr/bin:/bin".into()),
            ("PROBE_VAR".into(), "from the service".into()),
        ],
        cwd: dir.to_owned(),
        ..SpawnSpec::default()
    }
}

fn exec_context(dir: &Path) -> ExecContext {
    ExecContext {
        spawner: Arc::new(UnixSpawner::plain()),
        spec: service_spec(dir),
        cgroup: None,
    }
}

fn sh(script: &str) -> Probe {
    Probe::Exec {
        argv: vec!["/bin/sh".to_owned(), "-c".to_owned(), script.to_owned()],
    }
}

#[tokio::test]
async fn exec_exit_0_is_healthy_and_runs_as_the_service() {
    let dir = tempfile::tempdir().unwrap();
    let exec = exec_context(dir.path());
    run_with(&sh("exit 0"), ROOMY, &exec).await.unwrap();
    // The service's environment (none of the test's: cargo sets
    // CARGO_MANIFEST_DIR for it) and working directory; a bare name found
    // through the service's PATH.
    let script = format!(
        "test \"$PROBE_VAR\" = 'from the service' && test \"$PATH\" = /usr/bin:/bin \
         && test -z \"$CARGO_MANIFEST_DIR\" && test \"$(pwd -P)\" = '{}'",
        dir.path().canonicalize().unwrap().display()
    );
    run_with(&sh(&script), ROOMY, &exec).await.unwrap();
    let bare = Probe::Exec {
        argv: vec!["true".to_owned()],
    };
    run_with(&bare, ROOMY, &exec).await.unwrap();
}

#[tokio::test]
async fn exec_a_failure_reports_its_code_and_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let exec = exec_context(dir.path());
    let script = "echo starting; echo 'db: connection refused' >&2; echo; exit 3";
    let reason = failure(run_with(&sh(script), ROOMY, &exec).await);
    assert_eq!(reason, "exec exited with code 3: db: connection refused");
    let silent = failure(run_with(&sh("exit 1"), ROOMY, &exec).await);
    assert_eq!(silent, "exec exited with code 1");
    let killed = failure(run_with(&sh("kill -9 $$"), ROOMY, &exec).await);
    assert_eq!(killed, "exec killed by SIGKILL");
}

#[tokio::test]
async fn exec_a_lot_of_output_does_not_block_it() {
    let dir = tempfile::tempdir().unwrap();
    let exec = exec_context(dir.path());
    // Far more than a pipe holds, then the line that counts.
    let script = "i=0; while [ $i -lt 2000 ]; do echo 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'; i=$((i+1)); done; echo last >&2; exit 2";
    let reason = failure(run_with(&sh(script), ROOMY, &exec).await);
    assert_eq!(reason, "exec exited with code 2: last");
}

#[tokio::test]
async fn exec_a_missing_program_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let exec = exec_context(dir.path());
    let probe = Probe::Exec {
        argv: vec!["/nonexistent/check".to_owned()],
    };
    let reason = failure(run_with(&probe, ROOMY, &exec).await);
    assert_eq!(reason, "exec /nonexistent/check: no such file or directory");
}

/// `(state, pgid)` of every process now.
fn processes() -> Vec<(u32, char, u32)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's ")": state, ppid, pgrp, ...
        let Some((_, rest)) = stat.rsplit_once(") ") else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(state), Some(pgid)) = (
            fields.first().and_then(|s| s.chars().next()),
            fields.get(2).and_then(|p| p.parse().ok()),
        ) {
            found.push((pid, state, pgid));
        }
    }
    found
}

#[tokio::test]
async fn exec_a_hanging_probe_is_killed_with_its_grandchildren_at_its_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let exec = exec_context(dir.path());
    // The shell's pid is its group's id: written where the test finds it.
    let probe = sh("echo $$ > pgid; sleep 1000 & sleep 1000");
    let timeout = Duration::from_millis(500);
    let started = Instant::now();
    let result = run_with(&probe, timeout, &exec).await;
    assert_eq!(result, Err(ProbeError::TimedOut(timeout)));
    assert!(started.elapsed() >= timeout);
    let pgid: u32 = std::fs::read_to_string(dir.path().join("pgid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The leader is reaped (gone entirely) and nothing of its group runs
    // (a grandchild may linger as a zombie until init reaps it).
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left: Vec<_> = processes()
            .into_iter()
            .filter(|&(pid, state, group)| group == pgid && (pid == pgid || state != 'Z'))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there from group {pgid}: {left:?}"
        );
        // Lets the task that reaps the leader run.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn exec_a_probe_runs_in_the_services_cgroup_and_leaves_it_there() {
    if orchestrator_core::state::our_uid() != 0 {
        eprintln!("skipped: a cgroup of our own needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let parent = unique("cgroup");
    let controller = detect(&Settings {
        cgroup_parent: Path::new(&parent),
        data_dir: dir.path(),
        parent_lock_inherited: false,
    });
    if controller.flavor() == Flavor::None {
        eprintln!("skipped: no cgroup hierarchy can be used here");
        return;
    }
    let cgroup = controller
        .create("svc", &Limits::default())
        .unwrap()
        .cgroup
        .expect("a cgroup for the service");
    let exec = ExecContext {
        spawner: Arc::new(UnixSpawner::new(controller.clone(), false)),
        spec: service_spec(dir.path()),
        cgroup: Some(Arc::clone(&cgroup)),
    };
    // Every hierarchy the service was placed in lists it.
    let script = format!(
        "grep -q '/{parent}/svc$' /proc/self/cgroup || {{ cat /proc/self/cgroup; exit 1; }}"
    );
    let result = run_with(&sh(&script), ROOMY, &exec).await;
    // The probe ended and left the cgroup to its service.
    assert!(cgroup.path().exists(), "{}", cgroup.path().display());
    assert!(kill_until_empty(&*cgroup, DEADLINE).unwrap());
    cgroup.remove().unwrap();
    drop(exec);
    drop(controller);
    result.unwrap();
}
