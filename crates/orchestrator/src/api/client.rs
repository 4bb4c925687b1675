//! The CLI's side of the API: HTTP/1.1 over the daemon's Unix socket.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use orchestrator_core::wire::{ErrorBody, ErrorCode};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the daemon at {}: {source}; is it running? Start it with `orchestrator run` (or pass --socket)", socket.display())]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", body.error)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Self {
        Client {
            socket: socket.to_owned(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(&self) -> Result<UnixStream, ClientError> {
        UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })
    }

    /// The pid of the process serving the socket (the daemon), from the
    /// kernel's record of the connection's peer.
    pub async fn server_pid(&self) -> Result<u32, ClientError> {
        let stream = self.connect().await?;
        stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok())
            .ok_or_else(|| ClientError::Protocol("cannot tell the daemon's pid".to_owned()))
    }

    /// Send one request on a fresh connection; non-2xx answers become
    /// `ClientError::Api`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
    ) -> Result<Response<Incoming>, ClientError> {
        let stream = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        tokio::spawn(async move {
            // Ends when the response is read or the daemon goes away.
            let _ = connection.await;
        });
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "localhost")
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = read_body(response).await?;
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            error: format!("{status}: {}", String::from_utf8_lossy(&bytes).trim()),
            code: ErrorCode::Unknown,
        });
        Err(ClientError::Api { status, body })
    }

    pub async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ClientError> {
        let response = self.request(method, path).await?;
        let bytes = read_body(response).await?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(format!("{path}: {e}")))
    }

    /// Feed each line of the body to `on_line` as it arrives (for NDJSON and
    /// server-sent events), until the daemon ends the body.
    /// Streams the body line by line into `on_line` until it ends, or until
    /// `on_line` fails (its output went away).
    pub async fn lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&[u8]) -> std::io::Result<()>,
    ) -> Result<(), ClientError> {
        let mut body = self.request(Method::GET, path).await?.into_body();
        let mut pending: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Protocol(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            let mut start = 0;
            while let Some(offset) = memchr_newline(&pending[start..]) {
                on_line(&pending[start..start + offset]).map_err(ClientError::Output)?;
                start += offset + 1;
            }
            pending.drain(..start);
        }
        if !pending.is_empty() {
            on_line(&pending).map_err(ClientError::Output)?;
        }
        Ok(())
    }
}

fn memchr_newline(bytes: &[u8]) -> Option<usize> {
    bytes.iter().position(|&b| b == b'\n')
}

async fn read_body(response: Response<Incoming>) -> Result<Bytes, ClientError> {
    response
        .into_body()
        .collect()
        .await
        .map(|collected| collected.to_bytes())
        .map_err(|e| ClientError::Protocol(e.to_string()))
}
