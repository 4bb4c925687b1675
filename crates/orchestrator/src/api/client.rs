//! The CLI's side of the API: HTTP/1.1 over the daemon's Unix socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::body::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use orchestrator_core::wire::{ErrorBody, ErrorCode};

/// How long the CLI waits for the daemon to answer when not told
/// (`--timeout`). A live daemon answers in milliseconds; this leaves room
/// for a machine under heavy load before calling it not responding.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// [`DEFAULT_TIMEOUT`] as `--timeout` shows it.
pub const DEFAULT_TIMEOUT_ARG: &str = "10s";

/// How often a long action checks that the daemon is still alive.
const ALIVE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {}{}: {source}; {}", socket.display(), shown_origin(origin), unreachable_hint(source))]
    Unreachable {
        socket: PathBuf,
        /// How the socket was chosen ("from --socket"), when known.
        origin: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the daemon at {} is not responding: no answer within {} (--timeout)", socket.display(), seconds(*waited))]
    NotResponding { socket: PathBuf, waited: Duration },
    #[error("the connection to the daemon at {} was cut ({detail}): the daemon exited or was killed", socket.display())]
    Cut { socket: PathBuf, detail: String },
    #[error("{}", body.error)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

fn shown_origin(origin: &str) -> String {
    match origin {
        "" => String::new(),
        origin => format!(" ({origin})"),
    }
}

/// The socket is mode 0600: another user's daemon refuses us before any
/// question of whether it runs.
fn unreachable_hint(source: &std::io::Error) -> &'static str {
    match source.kind() {
        std::io::ErrorKind::PermissionDenied => {
            "only the daemon's user (or root) may use its socket: run the command as that user, e.g. with sudo"
        }
        _ => {
            "is it running? Start it with `orchestrator run`, or name its socket with --socket or $ORCHESTRATOR_SOCKET"
        }
    }
}

fn seconds(duration: Duration) -> String {
    format!("{}s", duration.as_secs_f64())
}

pub struct Client {
    socket: PathBuf,
    origin: String,
    timeout: Duration,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
            origin: String::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// How the socket was chosen, for the message when nothing answers.
    pub fn with_origin(self, origin: impl Into<String>) -> Self {
        Client {
            origin: origin.into(),
            ..self
        }
    }

    pub fn with_timeout(self, timeout: Duration) -> Self {
        Client { timeout, ..self }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `work`, or `NotResponding` once the timeout has passed: a stopped
    /// (SIGSTOP) or wedged daemon still has its socket accept connections
    /// (the kernel queues them), so nothing else would ever end the wait.
    async fn bounded<T>(
        &self,
        work: impl Future<Output = Result<T, ClientError>>,
    ) -> Result<T, ClientError> {
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or_else(|_| Err(self.not_responding()))
    }

    fn not_responding(&self) -> ClientError {
        ClientError::NotResponding {
            socket: self.socket.clone(),
            waited: self.timeout,
        }
    }

    /// A hyper error on an exchange that had started: a connection closed
    /// or reset before the answer ended is the daemon going away, not a
    /// protocol problem.
    fn broken(&self, error: hyper::Error) -> ClientError {
        let cut = error.is_incomplete_message()
            || error.is_canceled()
            || error.is_closed()
            || std::error::Error::source(&error).is_some_and(|s| s.is::<std::io::Error>());
        if cut {
            ClientError::Cut {
                socket: self.socket.clone(),
                detail: error.to_string(),
            }
        } else {
            ClientError::Protocol(error.to_string())
        }
    }

    async fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                origin: self.origin.clone(),
                source,
            })
    }

    /// The pid of the process serving the socket (the daemon), from the
    /// kernel's record of the connection's peer.
    pub async fn server_pid(&self) -> Result<u32, ClientError> {
        let stream = self.bounded(self.connect()).await?;
        stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok())
            .ok_or_else(|| ClientError::Protocol("cannot tell the daemon's pid".to_owned()))
    }

    /// Send one request on a fresh connection and wait (bounded) for the
    /// head of the answer; non-2xx answers become `ClientError::Api`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        self.bounded(self.send(method, path)).await
    }

    /// [`Client::request`] without the bound.
    async fn send(&self, method: Method, path: &str) -> Result<Response<Incoming>, ClientError> {
        self.send_body(method, path, None).await
    }

    /// [`Client::json_unbounded`] with a JSON body.
    pub async fn json_with_body<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_vec(body).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = self.send_body(method, path, Some(body)).await?;
        let bytes = self.read_body(response).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    async fn send_body(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.broken(e))?;
        tokio::spawn(async move {
            // Ends when the response is read or the daemon goes away.
            let _ = connection.await;
        });
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost");
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.broken(e))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = self.read_body(response).await?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            error: format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
            code: ErrorCode::Unknown,
        });
        Err(ClientError::Api { status, body })
    }

    /// A question: the whole answer within the timeout.
    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        self.bounded(self.json_unbounded(method, path)).await
    }

    /// An answer with no bound on its wait: an action's comes once it is
    /// applied, which takes as long as the service needs (a stop waits up
    /// to its stop_timeout, which may be minutes). Run it beside
    /// [`Client::until_unresponsive`], which ends the wait for a daemon
    /// that stopped answering.
    pub async fn json_unbounded<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path).await?;
        let bytes = self.read_body(response).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    /// Returns the first failure of [`Client::alive`], checking every
    /// second; never returns while the daemon answers.
    pub async fn until_unresponsive(&self) -> ClientError {
        loop {
            match self.alive().await {
                Ok(()) => {}
                // Any HTTP answer (503 busy included) is a live daemon; a
                // connection closed before the answer is a busy daemon
                // refusing it, or one that just died, which the next check
                // tells apart (a dead daemon's socket refuses to connect).
                Err(ClientError::Api { .. } | ClientError::Cut { .. }) => {}
                Err(error) => return error,
            }
            tokio::time::sleep(ALIVE_EVERY).await;
        }
    }

    /// Whether the daemon answers its health check within the timeout: it
    /// is answered by the API server alone, so it says the process runs
    /// and serves, whatever its services are doing.
    pub async fn alive(&self) -> Result<(), ClientError> {
        self.bounded(async {
            let response = self.send(Method::GET, "/healthz").await?;
            self.read_body(response).await.map(drop)
        })
        .await
    }

    /// Streams the body line by line into `on_line` until it ends, or until
    /// `on_line` fails (its output went away). Only the head of the answer
    /// is awaited within the timeout: see [`Client::lines_within`]. (The
    /// verbs say whether they follow; the server's tests use this.)
    #[cfg(test)]
    pub async fn lines(
        &self,
        path: &str,
        on_line: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        self.lines_within(path, true, on_line).await
    }

    /// [`Client::lines`]. A follow stream (`follow`) is as long as the
    /// daemon keeps it open and may be silent as long: only its head is
    /// awaited within the timeout. Any other answer must keep coming: each
    /// wait for more of it is bounded, but not the whole, which includes
    /// the time `on_line` takes to write to a reader that may be slow
    /// (`logs -n 10000 | less`).
    pub async fn lines_within(
        &self,
        path: &str,
        follow: bool,
        mut on_line: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let mut lines = self.open_lines(path, follow).await?;
        while let Some(line) = lines.next_line().await? {
            on_line(&line).map_err(ClientError::Output)?;
        }
        Ok(())
    }

    /// The answer to `path`, once its head has come (within the timeout),
    /// to be read line by line: for a follow stream, the daemon has
    /// subscribed by then, so nothing printed later is missed.
    pub async fn open_lines(&self, path: &str, follow: bool) -> Result<Lines, ClientError> {
        let response = self.request(Method::GET, path).await?;
        Ok(Lines {
            client: Client {
                socket: self.socket.clone(),
                origin: self.origin.clone(),
                timeout: self.timeout,
            },
            body: response.into_body(),
            follow,
            pending: Vec::new(),
            start: 0,
            ended: false,
        })
    }

    async fn read_body(&self, response: Response<Incoming>) -> Result<Bytes, ClientError> {
        response
            .into_body()
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .map_err(|e| self.broken(e))
    }
}

/// A streamed answer, line by line ([`Client::open_lines`]).
pub struct Lines {
    client: Client,
    body: Incoming,
    follow: bool,
    pending: Vec<u8>,
    /// Where the next line starts in `pending`.
    start: usize,
    ended: bool,
}

impl Lines {
    /// The next line without its `\n`; `None` once the answer has ended
    /// (a last line without `\n` included). A follow stream may wait as long
    /// as the daemon is silent; any other answer must keep coming, each
    /// wait for more of it bounded by the timeout.
    pub async fn next_line(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        loop {
            if let Some(offset) = memchr_newline(&self.pending[self.start..]) {
                let line = self.pending[self.start..self.start + offset].to_vec();
                self.start += offset + 1;
                return Ok(Some(line));
            }
            self.pending.drain(..self.start);
            self.start = 0;
            if self.ended {
                return Ok((!self.pending.is_empty()).then(|| std::mem::take(&mut self.pending)));
            }
            let frame = if self.follow {
                self.body.frame().await
            } else {
                let body = &mut self.body;
                self.client
                    .bounded(async { Ok(body.frame().await) })
                    .await?
            };
            let Some(frame) = frame else {
                self.ended = true;
                continue;
            };
            let frame = frame.map_err(|e| self.client.broken(e))?;
            if let Ok(data) = frame.into_data() {
                self.pending.extend_from_slice(&data);
            }
        }
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}
