//! The HTTP server: routes of SPEC section 5 over any `Control`, the Unix
//! socket listener (owner-only, peer uid checked) and the TCP listener
//! (bearer token, Host check).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path as UrlPath, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream, StreamExt};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use orchestrator_core::events::{Event, rfc3339};
use orchestrator_core::name::ServiceName;
use orchestrator_core::output::{LogBlock, LogLine};
use orchestrator_core::process::DESCRIPTORS_PER_SERVICE;
use orchestrator_core::reload::ReloadError;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::control::{Action, Control, ControlError};
use orchestrator_core::wire::{ErrorBody, ErrorCode, LogRecord};
use serde::Deserialize;

use super::metrics;

/// Request bodies are never needed by any route; anything large is refused.
const MAX_BODY_BYTES: usize = 64 * 1024;
const DEFAULT_TAIL: usize = 100;
const MAX_TAIL: usize = 100_000;

pub fn router<C: Control>(control: C) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics_text::<C>))
        .route("/v1/services", get(list::<C>))
        .route("/v1/services/{name}", get(info::<C>))
        .route("/v1/services/{name}/logs", get(logs::<C>))
        .route("/v1/services/{name}/{action}", post(act::<C>))
        .route("/v1/events", get(events::<C>))
        .route("/v1/daemon", get(daemon_info::<C>))
        .route("/v1/reload", post(reload::<C>))
        .route("/v1/shutdown", post(shutdown::<C>))
        .route("/v1/upgrade", post(upgrade::<C>))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such route; the routes are GET /v1/services, GET /v1/services/NAME, \
                 POST /v1/services/NAME/start|stop|restart, GET /v1/services/NAME/logs, \
                 GET /v1/events, GET /v1/daemon, POST /v1/reload, POST /v1/upgrade, POST /v1/shutdown, \
                 GET /metrics, GET /healthz (README: Control API)",
            )
        })
        .method_not_allowed_fallback(|| async {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_large_bodies))
        .with_state(control)
}

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response {
    let body = ErrorBody {
        error: message.into(),
        code,
    };
    (status, Json(body)).into_response()
}

fn control_error(failure: ControlError) -> Response {
    match failure {
        ControlError::UnknownService(name) => error_unknown(&name),
        ControlError::Failed(message) => {
            error(StatusCode::CONFLICT, ErrorCode::ActionFailed, message)
        }
        ControlError::ShuttingDown => error(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the daemon is shutting down",
        ),
    }
}

fn error_unknown(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        ErrorCode::UnknownService,
        format!("unknown service {name:?}: `orchestrator status` lists the known ones"),
    )
}

/// A request refused before it reached the daemon; small, unlike a Response.
struct BadRequest {
    code: ErrorCode,
    message: String,
}

impl IntoResponse for BadRequest {
    fn into_response(self) -> Response {
        error(StatusCode::BAD_REQUEST, self.code, self.message)
    }
}

/// A `{name}` that is not a valid service name is refused before any lookup.
fn checked_name(name: &str) -> Result<ServiceName, BadRequest> {
    ServiceName::parse(name).map_err(|invalid| BadRequest {
        code: ErrorCode::BadName,
        message: invalid.to_string(),
    })
}

/// Content-Length is checked up front, so a huge body is refused without
/// being read.
async fn refuse_large_bodies(request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BodyTooLarge,
            format!("request bodies are limited to {MAX_BODY_BYTES} bytes"),
        );
    }
    next.run(request).await
}

async fn daemon_info<C: Control>(State(control): State<C>) -> Response {
    Json(control.daemon()).into_response()
}

async fn metrics_text<C: Control>(State(control): State<C>, headers: HeaderMap) -> Response {
    let format = metrics::negotiate(
        headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok()),
    );
    match control.list().await {
        Ok(services) => {
            // /proc reads: no disk behind them, but file I/O all the same.
            let process = tokio::task::spawn_blocking(metrics::ProcessStats::read)
                .await
                .unwrap_or_default();
            (
                [(header::CONTENT_TYPE, format.content_type())],
                metrics::render(&control.daemon(), &process, &services, format),
            )
                .into_response()
        }
        Err(e) => control_error(e),
    }
}

async fn list<C: Control>(State(control): State<C>) -> Response {
    match control.list().await {
        Ok(services) => Json(services).into_response(),
        Err(e) => control_error(e),
    }
}

async fn info<C: Control>(State(control): State<C>, UrlPath(name): UrlPath<String>) -> Response {
    let name = match checked_name(&name) {
        Ok(name) => name,
        Err(bad) => return bad.into_response(),
    };
    match control.info(&name).await {
        Ok(info) => Json(info).into_response(),
        Err(e) => control_error(e),
    }
}

async fn act<C: Control>(
    State(control): State<C>,
    UrlPath((name, action)): UrlPath<(String, String)>,
    parsed: Result<Query<ActQuery>, QueryRejection>,
) -> Response {
    let with_dependents = match query(parsed, "with_dependents=true|false (restart only)") {
        Ok(ActQuery { with_dependents }) => with_dependents.is_some_and(|Flag(on)| on),
        Err(bad) => return bad.into_response(),
    };
    let Some(mut action) = Action::parse(&action) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no action {action:?}; use start, stop or restart"),
        );
    };
    if with_dependents {
        if action != Action::Restart {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadQuery,
                "with_dependents applies to restart only".to_owned(),
            );
        }
        action = Action::RestartWithDependents;
    }
    let name = match checked_name(&name) {
        Ok(name) => name,
        Err(bad) => return bad.into_response(),
    };
    match control.act(&name, action).await {
        Ok(info) => Json(info).into_response(),
        Err(e) => control_error(e),
    }
}

/// A yes/no query parameter: `true`/`false`, `1`/`0`, or present without a
/// value (`?follow`), as curl users write it.
#[derive(Debug, Clone, Copy)]
struct Flag(bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        match text.as_str() {
            "true" | "1" | "" => Ok(Flag(true)),
            "false" | "0" => Ok(Flag(false)),
            other => Err(serde::de::Error::custom(format!(
                "{other:?} is not a yes/no value: use true or false"
            ))),
        }
    }
}

#[derive(Debug, Deserialize)]
struct LogsQuery {
    tail: Option<usize>,
    follow: Option<Flag>,
    since: Option<Since>,
}

/// `since=`: an RFC 3339 time in UTC; only lines from then on.
#[derive(Debug, Clone, Copy)]
struct Since(std::time::SystemTime);

impl<'de> Deserialize<'de> for Since {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        crate::logview::parse_time(&text)
            .map(Since)
            .map_err(|error| {
                serde::de::Error::custom(format!(
                    "{text:?} is not an RFC 3339 time in UTC ({error}): write e.g. 2026-01-02T03:04:05Z"
                ))
            })
    }
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    follow: Option<Flag>,
    /// Only the last N of the history (before following).
    tail: Option<usize>,
    /// Only this service's events (daemon-wide ones are left out).
    service: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ActQuery {
    with_dependents: Option<Flag>,
}

/// The framework decodes the query (percent-encoding included); a value
/// that does not parse is answered in our error format, with its key.
fn query<T>(parsed: Result<Query<T>, QueryRejection>, accepted: &str) -> Result<T, BadRequest> {
    parsed
        .map(|Query(query)| query)
        .map_err(|rejection| BadRequest {
            code: ErrorCode::BadQuery,
            message: format!(
                "{}; the parameters are {accepted} (README: Control API)",
                rejection.body_text()
            ),
        })
}

fn record(line: &LogLine) -> LogRecord {
    LogRecord::Line {
        seq: line.seq,
        time: rfc3339(line.time),
        stream: line.stream,
        text: String::from_utf8_lossy(&line.text).into_owned(),
    }
}

fn ndjson(record: &LogRecord) -> Bytes {
    let mut bytes = serde_json::to_vec(record).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

async fn logs<C: Control>(
    State(control): State<C>,
    UrlPath(name): UrlPath<String>,
    parsed: Result<Query<LogsQuery>, QueryRejection>,
) -> Response {
    let name = match checked_name(&name) {
        Ok(name) => name,
        Err(bad) => return bad.into_response(),
    };
    let (tail, follow, since) =
        match query(parsed, "tail=N, follow=true|false and since=RFC3339-TIME") {
            // With since=, every line from then on unless tail= says fewer.
            Ok(LogsQuery {
                tail,
                follow,
                since,
            }) => (
                tail.unwrap_or(if since.is_some() {
                    MAX_TAIL
                } else {
                    DEFAULT_TAIL
                })
                .min(MAX_TAIL),
                follow.is_some_and(|Flag(follow)| follow),
                since,
            ),
            Err(bad) => return bad.into_response(),
        };
    let fetched = if since.is_some() { MAX_TAIL } else { tail };
    let (mut recent, receiver) = match control.follow_logs(&name, fetched).await {
        Ok(followed) => followed,
        Err(e) => return control_error(e),
    };
    if let Some(Since(since)) = since {
        recent.retain(|line| line.time >= since);
        let extra = recent.len().saturating_sub(tail);
        recent.drain(..extra);
    }
    let mut body = Vec::new();
    for line in &recent {
        body.extend_from_slice(&ndjson(&record(line)));
    }
    let headers = [(header::CONTENT_TYPE, "application/x-ndjson")];
    if !follow {
        return (headers, body).into_response();
    }
    let next_seq = recent.last().map(|line| line.seq + 1);
    let head = stream::once(async move { Ok::<_, Infallible>(Bytes::from(body)) });
    (
        headers,
        Body::from_stream(
            head.chain(follow_blocks(receiver, next_seq))
                .take_until(control.closing().cancelled_owned()),
        ),
    )
        .into_response()
}

/// Every later block as NDJSON; a gap in the line numbers (the follower was
/// too slow and the broadcast dropped blocks) becomes a `skipped` record.
fn follow_blocks(
    receiver: broadcast::Receiver<LogBlock>,
    next_seq: Option<u64>,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send {
    stream::unfold(
        (receiver, next_seq),
        |(mut receiver, mut next_seq)| async move {
            loop {
                match receiver.recv().await {
                    Ok(block) => {
                        let mut out = Vec::new();
                        if let Some(expected) = next_seq
                            && block.first_seq > expected
                        {
                            out.extend_from_slice(&ndjson(&LogRecord::Skipped {
                                skipped: block.first_seq - expected,
                            }));
                        }
                        for line in block.lines() {
                            out.extend_from_slice(&ndjson(&record(&line)));
                        }
                        next_seq = Some(block.first_seq + block.line_count);
                        return Some((Ok(Bytes::from(out)), (receiver, next_seq)));
                    }
                    // The gap shows in the next block's numbers.
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    )
}

fn sse_event(event: &Event) -> SseEvent {
    SseEvent::default()
        .id(event.seq.to_string())
        .json_data(event)
        .unwrap_or_default()
}

async fn events<C: Control>(
    State(control): State<C>,
    parsed: Result<Query<EventsQuery>, QueryRejection>,
) -> Response {
    let (follow, tail, service) = match query(parsed, "follow=true|false, tail=N and service=NAME")
    {
        Ok(EventsQuery {
            follow,
            tail,
            service,
        }) => (follow.is_none_or(|Flag(follow)| follow), tail, service),
        Err(bad) => return bad.into_response(),
    };
    // Not looked up: a removed service's events are still in the history.
    let service = match service.as_deref().map(checked_name).transpose() {
        Ok(service) => service.map(|name| name.to_string()),
        Err(bad) => return bad.into_response(),
    };
    let wanted = move |event: &Event| {
        service
            .as_deref()
            .is_none_or(|name| event.service.as_deref() == Some(name))
    };
    let (history, receiver) = control.events();
    let mut history: Vec<Result<SseEvent, Infallible>> = history
        .iter()
        .filter(|e| wanted(e))
        .map(|e| Ok(sse_event(e)))
        .collect();
    if let Some(tail) = tail {
        history.drain(..history.len().saturating_sub(tail));
    }
    let history = stream::iter(history);
    if !follow {
        return Sse::new(history).into_response();
    }
    let live = stream::unfold(receiver, move |mut receiver| {
        let wanted = wanted.clone();
        async move {
            let item = loop {
                match receiver.recv().await {
                    Ok(event) if wanted(&event) => break sse_event(&event),
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        break SseEvent::default()
                            .event("lagged")
                            .data(format!("{{\"missed\":{missed}}}"));
                    }
                    Err(RecvError::Closed) => return None,
                }
            };
            Some((Ok(item), receiver))
        }
    });
    let live = live.take_until(control.closing().cancelled_owned());
    Sse::new(history.chain(live)).into_response()
}

async fn reload<C: Control>(State(control): State<C>) -> Response {
    match control.reload().await {
        Ok(report) => Json(report).into_response(),
        // One problem a line: the CLI prints the message as it comes.
        Err(ReloadError::Invalid(problems)) => error(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidConfig,
            format!(
                "the new configuration is invalid; nothing was changed:\n  {}",
                problems.join("\n  ")
            ),
        ),
        Err(ReloadError::ShuttingDown) => control_error(ControlError::ShuttingDown),
    }
}

/// `POST /v1/upgrade`'s optional body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpgradeBody {
    binary: Option<PathBuf>,
}

/// 202 once the new binary passed its dry run (the switch follows), 409
/// with why when it did not: nothing changed then.
async fn upgrade<C: Control>(State(control): State<C>, body: Bytes) -> Response {
    let binary = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice::<UpgradeBody>(&body) {
            Ok(UpgradeBody { binary }) => binary,
            Err(problem) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadBody,
                    format!(
                        "the body is not {{\"binary\": \"PATH\"}}: {problem}; send that, or no body for the daemon's own binary"
                    ),
                );
            }
        }
    };
    match control.upgrade(binary).await {
        Ok(accepted) => (StatusCode::ACCEPTED, Json(accepted)).into_response(),
        Err(why) => error(StatusCode::CONFLICT, ErrorCode::UpgradeRefused, why),
    }
}

async fn shutdown<C: Control>(State(control): State<C>) -> Response {
    control.shutdown().await;
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "shutting down"})),
    )
        .into_response()
}

// ---- listeners ----

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("another daemon is already running on {}: stop it first (orchestrator shutdown), or give this one another data_dir", .0.display())]
    AlreadyRunning(PathBuf),
    #[error("cannot create the control socket {}: {source}", path.display())]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Bind the control socket, owner-only. A socket left by a dead daemon is
/// replaced; a live one is never stolen.
pub async fn bind_unix(path: &Path) -> Result<UnixListener, ListenError> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ListenError::AlreadyRunning(path.to_owned()));
        }
        let _ = std::fs::remove_file(path);
    }
    let socket_error = |source| ListenError::Socket {
        path: path.to_owned(),
        source,
    };
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(socket_error)?;
    Ok(listener)
}

/// Accepts only peers running as our own user (or root): the file mode
/// already says so, and this holds even if someone loosens it.
pub struct OwnerOnly {
    listener: UnixListener,
    uid: u32,
}

impl OwnerOnly {
    pub fn new(listener: UnixListener) -> Self {
        OwnerOnly {
            listener,
            uid: nix::unistd::getuid().as_raw(),
        }
    }

    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }
}

/// A listener the API is served on.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Refuse + Unpin + Send + 'static;

    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// Whether this peer may talk to us at all; asked after the connection
    /// cap, so a flood is refused without even this much work.
    fn admit(&self, _io: &Self::Io) -> bool {
        true
    }
}

impl Accept for OwnerOnly {
    type Io = UnixStream;

    async fn accept(&mut self) -> io::Result<UnixStream> {
        self.listener.accept().await.map(|(stream, _)| stream)
    }

    fn admit(&self, stream: &UnixStream) -> bool {
        match stream.peer_cred() {
            Ok(cred) if cred.uid() == self.uid || cred.uid() == 0 => true,
            Ok(cred) => {
                tracing::warn!(
                    uid = cred.uid(),
                    "refused a control connection from another user"
                );
                false
            }
            Err(error) => {
                tracing::warn!("cannot read a control client's credentials: {error}");
                false
            }
        }
    }
}

impl Accept for TcpListener {
    type Io = TcpStream;

    async fn accept(&mut self) -> io::Result<TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // Answers are written whole; Nagle would only delay their last bytes.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Turning a connection over the cap away without waiting on it.
pub trait Refuse {
    fn refuse(self);
}

impl Refuse for UnixStream {
    fn refuse(self) {
        if let Ok(stream) = self.into_std() {
            refuse(stream);
        }
    }
}

impl Refuse for TcpStream {
    fn refuse(self) {
        if let Ok(stream) = self.into_std() {
            refuse(stream);
        }
    }
}

/// Non-blocking throughout: what the client already sent is read and
/// dropped first, since closing a socket with unread data resets it and
/// the client would lose the answer; the answer is sent if the socket
/// takes it at once, else the client only sees the close.
fn refuse(mut stream: impl io::Read + io::Write) {
    let mut sent = [0u8; 4096];
    let _ = stream.read(&mut sent);
    let _ = stream.write(REFUSAL);
}

/// Descriptors kept free beyond the services' for the daemon's own work
/// (state and event files, rotations, the spawn's temporary pipes, a
/// reload adding services).
pub const FDS_MARGIN: usize = 64;
/// Even a starved daemon keeps a few API connections per listener.
const MIN_CONNECTIONS: usize = 4;

/// `configured` connections per listener, lowered so that `listeners` full
/// listeners still leave the services (and the daemon) the descriptors
/// they need under RLIMIT_NOFILE: no client load can make a restart fail
/// with EMFILE. `open_now` is what the daemon already holds.
pub fn connection_cap(
    configured: usize,
    listeners: usize,
    services: usize,
    nofile: u64,
    open_now: usize,
) -> usize {
    let nofile = usize::try_from(nofile).unwrap_or(usize::MAX);
    let reserved = open_now
        .saturating_add(services.saturating_mul(DESCRIPTORS_PER_SERVICE as usize))
        .saturating_add(FDS_MARGIN);
    let spare = nofile.saturating_sub(reserved) / listeners.max(1);
    configured.min(spare.max(MIN_CONNECTIONS))
}

/// `connection_cap` for this process, from its limit and /proc/self/fd.
pub fn connection_cap_here(configured: usize, listeners: usize, services: usize) -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    let nofile = getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let open_now = std::fs::read_dir("/proc/self/fd").map_or(64, |dir| dir.count());
    connection_cap(configured, listeners, services, nofile, open_now)
}

/// What every API connection is held to (the `api_*` keys).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Open connections per listener.
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Hyper's per-connection buffer bound (read and write), its minimum
/// being 8 KiB: our requests are a line and a few headers, and answers are
/// streamed, so more only lets a client make us hold more memory.
const MAX_CONNECTION_BUFFER: usize = 16 * 1024;

/// The answer to a connection over the cap.
const REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
content-length: 99\r\nconnection: close\r\nretry-after: 1\r\n\r\n\
{\"error\":\"too many connections to the control API (api_max_connections); try again\",\"code\":\"busy\"}\n";

/// How often a full listener is reported in the log at most.
const FULL_REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `closing`: each connection runs as a
/// task of `tasks` and ends gracefully then (an answer in progress is
/// finished; follow streams end on `closing` themselves). Returns the
/// listener, still bound: an upgrade hands it to the new binary, and the
/// connections that arrive meanwhile wait in its backlog.
pub async fn serve<L: Accept>(
    mut listener: L,
    app: Router,
    limits: ConnectionLimits,
    closing: CancellationToken,
    tasks: TaskTracker,
) -> L {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        // Counted from the start of each request's head, and while a
        // keep-alive connection waits for the next one: a silent, slow or
        // idle client is closed after it.
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_CONNECTION_BUFFER);
    let mut last_full_report: Option<Instant> = None;
    loop {
        let io = tokio::select! {
            biased;
            () = closing.cancelled() => return listener,
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("API accept failed: {error}");
                    tokio::select! {
                        () = closing.cancelled() => return listener,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            },
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            io.refuse();
            if last_full_report.is_none_or(|at| at.elapsed() >= FULL_REPORT_INTERVAL) {
                last_full_report = Some(Instant::now());
                tracing::warn!(
                    limit = limits.max_connections,
                    "API connections at their limit (api_max_connections): refusing more"
                );
            }
            continue;
        };
        if !listener.admit(&io) {
            continue;
        }
        let io = TokioIo::new(StallLimit::new(io, limits.idle_timeout));
        let first_request = Arc::new(Notify::new());
        let service = MarksRequests {
            inner: TowerToHyperService::new(app.clone()),
            seen: Arc::clone(&first_request),
        };
        let connection = http.serve_connection(io, service);
        let closing = closing.clone();
        let open = OpenConnection::new(slot);
        tasks.spawn(async move {
            let _open = open;
            tokio::pin!(connection);
            let result = tokio::select! {
                result = connection.as_mut() => result,
                () = closing.cancelled() => {
                    // hyper closes a connection on which it has seen no
                    // byte yet at once: one accepted a moment ago, whose
                    // client has sent (or is sending) its request, would
                    // see a reset instead of an answer (an upgrade's switch
                    // hit it). Its first request is awaited, briefly, and
                    // answered; then the connection closes.
                    let idle = tokio::select! {
                        biased;
                        () = first_request.notified() => false,
                        result = connection.as_mut() => {
                            if let Err(error) = result {
                                tracing::debug!("API connection ended: {error}");
                            }
                            return;
                        }
                        () = tokio::time::sleep(FIRST_REQUEST_GRACE) => true,
                    };
                    if idle {
                        tracing::debug!("closing an API connection that sent no request within {FIRST_REQUEST_GRACE:?} of the server stopping");
                    }
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = result {
                tracing::debug!("API connection ended: {error}");
            }
        });
    }
}

/// How long a stopping server (a shutdown, an upgrade's switch) waits for
/// the first request of a connection it accepted: far longer than a client
/// takes between its connect and its write, short enough that a silent
/// connection barely holds the switch up.
const FIRST_REQUEST_GRACE: Duration = Duration::from_millis(500);

/// The API as a connection serves it, saying when a request has come (the
/// first one is what a stopping server waits for, see `serve`). Its
/// `Notify` keeps the signal for a waiter that comes later.
struct MarksRequests<S> {
    inner: S,
    seen: Arc<Notify>,
}

impl<S, R> hyper::service::Service<R> for MarksRequests<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: R) -> Self::Future {
        self.seen.notify_one();
        self.inner.call(request)
    }
}

/// A connection's slot under the cap, and its part in deciding when a
/// burst of connections is over.
struct OpenConnection {
    _slot: OwnedSemaphorePermit,
}

/// Connections open on all listeners, and served since memory was last
/// handed back to the system.
static OPEN: AtomicUsize = AtomicUsize::new(0);
static SERVED_SINCE_TRIM: AtomicUsize = AtomicUsize::new(0);

/// A burst is this many connections served...
const TRIM_AFTER_SERVED: usize = 256;
/// ...and it is over once at most this many remain (long-lived followers).
const TRIM_WHEN_OPEN: usize = 8;

impl OpenConnection {
    fn new(slot: OwnedSemaphorePermit) -> Self {
        OPEN.fetch_add(1, Ordering::Relaxed);
        SERVED_SINCE_TRIM.fetch_add(1, Ordering::Relaxed);
        OpenConnection { _slot: slot }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let open = OPEN.fetch_sub(1, Ordering::Relaxed) - 1;
        if open <= TRIM_WHEN_OPEN
            && SERVED_SINCE_TRIM.load(Ordering::Relaxed) >= TRIM_AFTER_SERVED
            && SERVED_SINCE_TRIM.swap(0, Ordering::Relaxed) >= TRIM_AFTER_SERVED
        {
            tokio::task::spawn_blocking(orchestrator_core::memory::return_free_memory);
        }
    }
}

/// An answer the client stopped reading: once a write has waited this
/// long, the connection fails with TimedOut and is closed. Quiet follow
/// streams write nothing, so they never wait here.
struct StallLimit<I> {
    io: I,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> StallLimit<I> {
    fn new(io: I, limit: Duration) -> Self {
        StallLimit {
            io,
            limit,
            stalled: None,
        }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client read nothing for {limit:?} (api_idle_timeout)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for StallLimit<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for StallLimit<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, poll)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, poll)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, poll)
    }
}

/// The TCP API: every route but /healthz needs the bearer token, and a
/// request naming a foreign Host is refused (no DNS rebinding from a browser).
pub fn tcp_router<C: Control>(control: C, listen: SocketAddr, token: String) -> Router {
    let guard = Arc::new(TcpGuard { listen, token });
    router(control).layer(middleware::from_fn(move |request: Request, next: Next| {
        let guard = Arc::clone(&guard);
        async move { guard.check(request, next).await }
    }))
}

struct TcpGuard {
    listen: SocketAddr,
    token: String,
}

impl TcpGuard {
    async fn check(&self, request: Request, next: Next) -> Response {
        // An absolute-form target (`GET http://host/...`) names the host
        // the client meant, over the Host header (RFC 9112 3.2.2): both
        // must pass, or a rebinding page could pick the one we don't check.
        let target_allowed = request
            .uri()
            .authority()
            .is_none_or(|authority| self.host_allowed(authority.as_str()));
        let header_allowed = request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .is_some_and(|host| self.host_allowed(host));
        if !target_allowed || !header_allowed {
            return error(
                StatusCode::MISDIRECTED_REQUEST,
                ErrorCode::BadHost,
                "the Host header (and an absolute request target) must name the listen address or a loopback name",
            );
        }
        if request.uri().path() != "/healthz" && !self.authorized(request.headers()) {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "send Authorization: Bearer <token from http_token_file>",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                "Bearer".parse().expect("static header"),
            );
            return response;
        }
        next.run(request).await
    }

    fn host_allowed(&self, host: &str) -> bool {
        let port = self.listen.port();
        let allowed = [
            self.listen.to_string(),
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            format!("[::1]:{port}"),
        ];
        allowed.iter().any(|a| a.eq_ignore_ascii_case(host))
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        headers
            .get(header::AUTHORIZATION)
            .map(|h| h.as_bytes())
            // The scheme is case-insensitive (RFC 9110), the token is not.
            .filter(|h| h.len() > 7 && h[..7].eq_ignore_ascii_case(b"bearer "))
            .is_some_and(|h| token_matches(&h[7..], self.token.as_bytes()))
    }
}

/// Compares in time independent of the contents, so the time taken does
/// not tell an attacker how much of a guessed token was right (only its
/// length, which a token read from a file does not need to hide).
fn token_matches(given: &[u8], token: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.ct_eq(token))
}

#[cfg(test)]
mod tests;
