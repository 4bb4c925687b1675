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
use orchestrator_core::events::{Event, rfc3339};
use orchestrator_core::name::ServiceName;
use orchestrator_core::output::{LogBlock, LogLine};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;

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
        .route("/v1/reload", post(reload))
        .route("/v1/shutdown", post(shutdown::<C>))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such route; see SPEC section 5 for the API",
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

async fn metrics_text<C: Control>(State(control): State<C>) -> Response {
    match control.list().await {
        Ok(services) => (
            [(header::CONTENT_TYPE, metrics::CONTENT_TYPE)],
            metrics::render(&services),
        )
            .into_response(),
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
) -> Response {
    let Some(action) = Action::parse(&action) else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            format!("no action {action:?}; use start, stop or restart"),
        );
    };
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
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    follow: Option<Flag>,
}

/// The framework decodes the query (percent-encoding included); a value
/// that does not parse is answered in our error format, with its key.
fn query<T>(parsed: Result<Query<T>, QueryRejection>) -> Result<T, BadRequest> {
    parsed
        .map(|Query(query)| query)
        .map_err(|rejection| BadRequest {
            code: ErrorCode::BadQuery,
            message: format!(
                "{}; see SPEC section 5 for the parameters",
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
    let (tail, follow) = match query(parsed) {
        Ok(LogsQuery { tail, follow }) => (
            tail.unwrap_or(DEFAULT_TAIL).min(MAX_TAIL),
            follow.is_some_and(|Flag(follow)| follow),
        ),
        Err(bad) => return bad.into_response(),
    };
    let (recent, receiver) = match control.follow_logs(&name, tail).await {
        Ok(followed) => followed,
        Err(e) => return control_error(e),
    };
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
    let follow = match query(parsed) {
        Ok(EventsQuery { follow }) => follow.is_none_or(|Flag(follow)| follow),
        Err(bad) => return bad.into_response(),
    };
    let (history, receiver) = control.events();
    let history: Vec<Result<SseEvent, Infallible>> =
        history.iter().map(|e| Ok(sse_event(e))).collect();
    let history = stream::iter(history);
    if !follow {
        return Sse::new(history).into_response();
    }
    let live = stream::unfold(receiver, |mut receiver| async move {
        let item = match receiver.recv().await {
            Ok(event) => sse_event(&event),
            Err(RecvError::Lagged(missed)) => SseEvent::default()
                .event("lagged")
                .data(format!("{{\"missed\":{missed}}}")),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(item), receiver))
    });
    let live = live.take_until(control.closing().cancelled_owned());
    Sse::new(history.chain(live)).into_response()
}

async fn reload() -> Response {
    error(
        StatusCode::NOT_IMPLEMENTED,
        ErrorCode::NotImplemented,
        "reload is not supported yet by this version: restart the daemon to apply a new configuration",
    )
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
}

impl axum::serve::Listener for OwnerOnly {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => match stream.peer_cred() {
                    Ok(cred) if cred.uid() == self.uid || cred.uid() == 0 => return (stream, addr),
                    Ok(cred) => {
                        tracing::warn!(
                            uid = cred.uid(),
                            "refused a control connection from another user"
                        );
                    }
                    Err(error) => {
                        tracing::warn!("cannot read a control client's credentials: {error}")
                    }
                },
                Err(error) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("control socket accept failed: {error}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
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
