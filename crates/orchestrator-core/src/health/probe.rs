//! One check of each kind: http, tcp, exec, grpc. Each is bounded by the
//! check's timeout and says why it failed in a few words fit for a status
//! column ("GET http://127.0.0.1:8080/healthz: status 500", "connect
//! 127.0.0.1:5432: connection refused", "timed out after 1s").
//!
//! Nothing is kept between checks (no connection pool, no client): a check
//! every few seconds gains nothing from one, and a fresh connection is also
//! what proves the service still accepts them.

use std::error::Error as _;
use std::fmt;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HOST, HeaderMap, TE, USER_AGENT};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::Probe;
use crate::cgroup::ServiceCgroup;
use crate::process::{ChildOutput, ChildProcess, ExitReason, SpawnError, SpawnSpec, Spawner};

/// Why a check failed. Its text is the reason a status column shows.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    /// No answer within the check's timeout (an exec probe's process group
    /// has been killed).
    #[error("timed out after {}", humantime::format_duration(*.0))]
    TimedOut(Duration),
    /// The probe answered no, or could not be carried out: why, in a few
    /// words that name the target.
    #[error("{0}")]
    Failed(String),
}

/// What an exec probe needs of the running service it checks: its probe
/// command runs as the service does (user, environment, working directory,
/// rlimits; see `SpawnSpec::for_probe`) and inside its cgroup.
#[derive(Clone)]
pub struct ExecContext {
    pub spawner: Arc<dyn Spawner>,
    /// The spec the service's running process was spawned from.
    pub spec: SpawnSpec,
    /// The running process's cgroup (`ChildProcess::cgroup`), if it has one.
    pub cgroup: Option<Arc<dyn ServiceCgroup>>,
}

impl fmt::Debug for ExecContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecContext")
            .field("spec", &self.spec)
            .field("cgroup", &self.cgroup.as_ref().map(|c| c.path().to_owned()))
            .finish_non_exhaustive()
    }
}

/// Carry out one check of `probe`, giving up after `timeout`. `exec` is
/// only used by an exec probe.
pub async fn check(probe: &Probe, timeout: Duration, exec: &ExecContext) -> Result<(), ProbeError> {
    let deadline = Instant::now() + timeout;
    let network = match probe {
        // It keeps its own deadline: a process group to kill, not just a
        // future to drop.
        Probe::Exec { argv } => return exec_check(argv, timeout, deadline, exec).await,
        Probe::Http { url, expect_status } => Box::pin(http(url, *expect_status))
            as std::pin::Pin<Box<dyn Future<Output = _> + Send + '_>>,
        Probe::Tcp { address } => Box::pin(tcp(address)),
        Probe::Grpc { address, service } => Box::pin(grpc(address, service, deadline)),
    };
    tokio::time::timeout_at(deadline, network)
        .await
        .unwrap_or(Err(ProbeError::TimedOut(timeout)))
}

// --- tcp --------------------------------------------------------------------

async fn tcp(address: &str) -> Result<(), ProbeError> {
    connect(address).await.map(drop).map_err(ProbeError::Failed)
}

/// A connection to "host:port": each address the name resolves to in turn,
/// as a client would. The error names the step ("resolve …", "connect …").
async fn connect(address: &str) -> Result<TcpStream, String> {
    let addresses = tokio::net::lookup_host(address)
        .await
        .map_err(|error| format!("resolve {address}: {}", io_reason(&error)))?;
    let mut last = None;
    for socket in addresses {
        match TcpStream::connect(socket).await {
            Ok(stream) => {
                // One small request each way: don't hold it back.
                let _ = stream.set_nodelay(true);
                return Ok(stream);
            }
            Err(error) => last = Some(error),
        }
    }
    Err(match last {
        Some(error) => format!("connect {address}: {}", io_reason(&error)),
        None => format!("resolve {address}: no address"),
    })
}

/// "connection refused", not "Connection refused (os error 111)".
fn io_reason(error: &std::io::Error) -> String {
    match error.raw_os_error() {
        Some(errno) => lowercase_first(nix::errno::Errno::from_raw(errno).desc()),
        None => error.to_string(),
    }
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A hyper error and its causes, which its own text leaves out ("error
/// reading a body from connection: connection reset by peer").
fn hyper_reason(error: &hyper::Error) -> String {
    let mut reason = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io_reason(io),
            None => cause.to_string(),
        };
        reason.push_str(": ");
        reason.push_str(&text);
        source = cause.source();
    }
    reason
}

// --- http -------------------------------------------------------------------

/// At most this much of a response body is read (and thrown away): enough
/// for a server that only closes cleanly once its answer is read, and no
/// more, whatever a misbehaving endpoint streams.
const HTTP_BODY_LIMIT: usize = 4096;

/// GET `url` over HTTP/1.1 on a connection of its own; no redirect is
/// followed (a 3xx is an answer, and healthy unless `expect_status` says
/// otherwise).
async fn http(url: &str, expect_status: Option<u16>) -> Result<(), ProbeError> {
    let fail = |reason: String| ProbeError::Failed(format!("GET {url}: {reason}"));
    let uri: Uri = url
        .parse()
        .map_err(|error| fail(format!("invalid URL: {error}")))?;
    if uri.scheme_str() != Some("http") {
        return Err(fail("only http:// URLs can be checked".to_owned()));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| fail("no host in the URL".to_owned()))?;
    // The authority less any user:password@; a bracketed IPv6 host stays
    // bracketed, which both the Host header and the resolver expect.
    let host = match authority.port() {
        Some(port) => format!("{}:{port}", authority.host()),
        None => authority.host().to_owned(),
    };
    let address = format!(
        "{}:{}",
        authority.host(),
        authority.port_u16().unwrap_or(80)
    );
    let path = uri.path_and_query().map_or("/", |path| path.as_str());
    let request = Request::get(path)
        .header(HOST, &host)
        .header(USER_AGENT, "orchestrator-health-check")
        .body(Empty::<Bytes>::new())
        .map_err(|error| fail(format!("invalid request: {error}")))?;

    let stream = connect(&address).await.map_err(fail)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| fail(hyper_reason(&error)))?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let status = response.status();
        // The status is the verdict: a body cut short changes nothing.
        drain(response.into_body(), HTTP_BODY_LIMIT).await;
        Ok::<_, hyper::Error>(status)
    };
    let status = drive(exchange, connection)
        .await
        .map_err(|error| fail(hyper_reason(&error)))?;
    let healthy = match expect_status {
        Some(expected) => status.as_u16() == expected,
        None => status.is_success() || status.is_redirection(),
    };
    match (healthy, expect_status) {
        (true, _) => Ok(()),
        (false, Some(expected)) => Err(fail(format!(
            "status {} (expected {expected})",
            status.as_u16()
        ))),
        (false, None) => Err(fail(format!("status {}", status.as_u16()))),
    }
}

/// Run `exchange` while `connection` (hyper's I/O driver for it) is
/// polled alongside, in this task: no task spawned for an HTTP/1.1 check.
/// A connection that ends first may still have delivered the answer (a
/// server that closes right after it), so the exchange is awaited then too;
/// if it fails, the connection's own error says more.
async fn drive<T>(
    exchange: impl Future<Output = Result<T, hyper::Error>>,
    connection: impl Future<Output = Result<(), hyper::Error>>,
) -> Result<T, hyper::Error> {
    let mut exchange = pin!(exchange);
    tokio::select! {
        biased;
        result = &mut exchange => result,
        ended = connection => match (exchange.await, ended) {
            (Ok(value), _) => Ok(value),
            (Err(_), Err(error)) | (Err(error), Ok(())) => Err(error),
        },
    }
}

/// Read and discard up to about `limit` bytes of `body`.
async fn drain(mut body: Incoming, limit: usize) {
    let mut read = 0;
    while read < limit {
        match body.frame().await {
            Some(Ok(frame)) => read += frame.data_ref().map_or(0, Bytes::len),
            _ => break,
        }
    }
}

// --- grpc -------------------------------------------------------------------
//
// grpc.health.v1.Health/Check, by hand. Its two messages have one field
// each (HealthCheckRequest { string service = 1; } and HealthCheckResponse
// { ServingStatus status = 1; }); tonic and prost, with their code
// generation, would be two large dependencies and a build script for
// those few bytes. The wire format (protobuf encoding in gRPC's
// length-prefixed frames over HTTP/2) is stable and small enough to write
// down here.

/// gRPC's cap on a response is 4 MiB; a health answer is a few bytes, so
/// anything past this is not one.
const GRPC_RESPONSE_LIMIT: usize = 4096;

/// HealthCheckResponse.ServingStatus.SERVING.
const SERVING: u64 = 1;

/// The Check call over h2c (HTTP/2 without TLS, by prior knowledge).
/// Healthy when grpc-status is 0 and the answer is SERVING.
async fn grpc(address: &str, service: &str, deadline: Instant) -> Result<(), ProbeError> {
    let fail = |reason: String| match service {
        "" => ProbeError::Failed(format!("grpc {address}: {reason}")),
        _ => ProbeError::Failed(format!("grpc {address} service {service:?}: {reason}")),
    };
    let request = Request::post(format!("http://{address}/grpc.health.v1.Health/Check"))
        .header(CONTENT_TYPE, "application/grpc")
        // Required by gRPC: the status comes in trailers.
        .header(TE, "trailers")
        .header(USER_AGENT, "orchestrator-health-check")
        .body(Full::new(Bytes::from(grpc_frame(&encode_request(service)))))
        .map_err(|error| fail(format!("invalid request: {error}")))?;
    let stream = connect(address).await.map_err(fail)?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(UntilDeadline(deadline), TokioIo::new(stream))
            .await
            .map_err(|error| fail(hyper_reason(&error)))?;
    let exchange = async {
        let response = sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let (data, trailers) = collect(body).await?;
        Ok::<_, hyper::Error>((parts.status, parts.headers, data, trailers))
    };
    let (status, headers, data, trailers) = drive(exchange, connection)
        .await
        .map_err(|error| fail(hyper_reason(&error)))?;
    if status != StatusCode::OK {
        return Err(fail(format!("HTTP status {}", status.as_u16())));
    }
    let data = data.ok_or_else(|| fail("answer too large for a health check".to_owned()))?;
    // A call that fails at once may answer with headers alone
    // ("trailers-only"): the status is among them.
    let grpc_status = [trailers.as_ref(), Some(&headers)]
        .into_iter()
        .flatten()
        .find_map(|map| Some((map.get("grpc-status")?, map)));
    let Some((code, map)) = grpc_status else {
        return Err(fail("no grpc-status in the answer".to_owned()));
    };
    let code = code.to_str().unwrap_or("?");
    if code != "0" {
        let message = map
            .get("grpc-message")
            .and_then(|message| message.to_str().ok())
            .filter(|message| !message.is_empty())
            .map_or(String::new(), |message| format!(": {message}"));
        let name = code.parse().ok().and_then(grpc_code_name).unwrap_or("?");
        return Err(fail(format!("grpc-status {code} ({name}){message}")));
    }
    let message = grpc_message(&data).map_err(|reason| fail(reason.to_owned()))?;
    match decode_status(message).map_err(|reason| fail(reason.to_owned()))? {
        SERVING => Ok(()),
        0 => Err(fail("UNKNOWN".to_owned())),
        2 => Err(fail("NOT_SERVING".to_owned())),
        3 => Err(fail("SERVICE_UNKNOWN".to_owned())),
        other => Err(fail(format!("serving status {other}"))),
    }
}

/// Runs what hyper's HTTP/2 client spawns (the connection's I/O task) as
/// tokio tasks that end at the check's deadline at the latest: a server
/// that never answers nor closes cannot keep one alive after the check.
#[derive(Clone, Copy)]
struct UntilDeadline(Instant);

impl<F> hyper::rt::Executor<F> for UntilDeadline
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        tokio::spawn(tokio::time::timeout_at(self.0, future));
    }
}

/// The body's data (`None` past `GRPC_RESPONSE_LIMIT`) and its trailers.
async fn collect(mut body: Incoming) -> Result<(Option<Vec<u8>>, Option<HeaderMap>), hyper::Error> {
    let mut data = Some(Vec::new());
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame?.into_data() {
            Ok(chunk) => {
                data = data.filter(|data| data.len() + chunk.len() <= GRPC_RESPONSE_LIMIT);
                if let Some(data) = &mut data {
                    data.extend_from_slice(&chunk);
                }
            }
            Err(frame) => trailers = frame.into_trailers().ok().or(trailers),
        }
    }
    Ok((data, trailers))
}

/// gRPC's status codes, for the reason text.
fn grpc_code_name(code: u32) -> Option<&'static str> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES.get(usize::try_from(code).ok()?).copied()
}

/// HealthCheckRequest { service = 1 }: the field's key (field 1, wire type
/// 2, length-delimited: 0x0a), the length as a varint, the UTF-8 bytes.
/// An empty string is left out, as proto3 leaves out every default.
fn encode_request(service: &str) -> Vec<u8> {
    let mut message = Vec::with_capacity(service.len() + 6);
    if !service.is_empty() {
        message.push(0x0a);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    message
}

/// A gRPC message on the wire: a flag byte (0: not compressed), the
/// length as a big-endian u32, the message.
fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let length = u32::try_from(message.len()).expect("a health request is a few bytes");
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0);
    frame.extend_from_slice(&length.to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// The one message of a response body (see `grpc_frame`).
fn grpc_message(body: &[u8]) -> Result<&[u8], &'static str> {
    let (&flag, rest) = body.split_first().ok_or("empty answer")?;
    if flag != 0 {
        // We sent no grpc-accept-encoding, so a server may not compress.
        return Err("compressed answer");
    }
    let (length, rest) = rest.split_first_chunk::<4>().ok_or("truncated answer")?;
    let length = usize::try_from(u32::from_be_bytes(*length)).map_err(|_| "truncated answer")?;
    rest.get(..length).ok_or("truncated answer")
}

/// HealthCheckResponse.status (field 1, a varint enum); 0 (UNKNOWN) when
/// absent, as proto3 leaves a default out. Fields this does not know are
/// skipped by their wire type, so a newer server's additions are harmless.
fn decode_status(mut message: &[u8]) -> Result<u64, &'static str> {
    const MALFORMED: &str = "malformed HealthCheckResponse";
    let mut status = 0;
    while !message.is_empty() {
        let key = varint(&mut message).ok_or(MALFORMED)?;
        let (field, wire_type) = (key >> 3, key & 7);
        let skip = match wire_type {
            0 => {
                let value = varint(&mut message).ok_or(MALFORMED)?;
                if field == 1 {
                    status = value;
                }
                0
            }
            1 => 8,
            2 => usize::try_from(varint(&mut message).ok_or(MALFORMED)?).map_err(|_| MALFORMED)?,
            5 => 4,
            // 3 and 4 (groups) are gone from proto3; 6 and 7 never existed.
            _ => return Err(MALFORMED),
        };
        message = message.get(skip..).ok_or(MALFORMED)?;
    }
    Ok(status)
}

/// A base-128 varint, least significant group first; `None` when the
/// bytes end inside one or it runs past 10 bytes.
fn varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = bytes.split_first()?;
        *bytes = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

// --- exec -------------------------------------------------------------------

/// How much of an exec probe's output is kept: its end, where the reason
/// for a failure usually is.
const EXEC_OUTPUT_TAIL: usize = 4096;

/// The longest last line a failure quotes: it goes into a status column.
const EXEC_REASON_CHARS: usize = 200;

/// Run `argv` as the service would run it (see `ExecContext`) in a process
/// group of its own; healthy on exit 0. At `deadline` the whole group is
/// killed (grandchildren included) and reaped in the background.
async fn exec_check(
    argv: &[String],
    timeout: Duration,
    deadline: Instant,
    exec: &ExecContext,
) -> Result<(), ProbeError> {
    let spec = exec
        .spec
        .for_probe(argv)
        .ok_or_else(|| ProbeError::Failed("exec: empty command".to_owned()))?;
    // Quick and synchronous, as a service's own spawn.
    let child = exec
        .spawner
        .spawn_probe(&spec, exec.cgroup.as_ref())
        .map_err(|error| ProbeError::Failed(spawn_reason(&error)))?;
    let mut child = ProbeChild(Some(child));
    let output = child.get().take_output();
    let mut tail = Tail::default();
    let exited = {
        let mut reading = pin!(read_output(output, &mut tail));
        let mut read_all = false;
        let exited = loop {
            tokio::select! {
                // Output is read while it runs: a probe that writes more
                // than a pipe holds must not block on it.
                () = &mut reading, if !read_all => read_all = true,
                exited = child.get().wait() => break exited,
                () = tokio::time::sleep_until(deadline) => {
                    child.kill();
                    return Err(ProbeError::TimedOut(timeout));
                }
            }
        };
        child.0 = None;
        // The group is dead by now (wait kills what the leader left in it),
        // so the pipes close at once; only something that left the group
        // could hold them open, and it gets until the deadline.
        if !read_all {
            let _ = tokio::time::timeout_at(deadline, reading).await;
        }
        exited
    };
    match exited {
        Ok(ExitReason::Exited(0)) => Ok(()),
        Ok(reason) => Err(ProbeError::Failed(match tail.last_line() {
            Some(line) => format!("exec {reason}: {line}"),
            None => format!("exec {reason}"),
        })),
        Err(error) => Err(ProbeError::Failed(format!(
            "exec: wait: {}",
            io_reason(&error)
        ))),
    }
}

/// A spawn failure in probe words: "exec curl: no such file or directory"
/// rather than the service-start advice about binary_path.
fn spawn_reason(error: &SpawnError) -> String {
    match error {
        SpawnError::Exec {
            program, source, ..
        } => format!("exec {}: {}", program.display(), io_reason(source)),
        other => format!("exec: {other}"),
    }
}

/// A running probe. Dropped before its `wait` returned (its timeout, or the
/// monitor aborted mid-check when the service ends), its group is killed
/// and it is reaped by a task of its own, so no probe outlives its check
/// and no zombie is left for whoever else reaps.
struct ProbeChild(Option<Box<dyn ChildProcess>>);

impl ProbeChild {
    fn get(&mut self) -> &mut dyn ChildProcess {
        self.0.as_deref_mut().expect("a probe child until reaped")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.signal_group(Signal::SIGKILL);
            // Off the runtime (shutting down): the child's own drop kills
            // the group again and leaves the leader to the orphan reaper.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = child.wait().await;
                });
            }
        }
    }
}

impl Drop for ProbeChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `EXEC_OUTPUT_TAIL` bytes of a probe's output. The real
/// spawner gives a probe one pipe for both streams, so this is the order
/// they were written in; from two pipes, the order they were read in.
#[derive(Default)]
struct Tail(Vec<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
        if self.0.len() > EXEC_OUTPUT_TAIL {
            let excess = self.0.len() - EXEC_OUTPUT_TAIL;
            self.0.drain(..excess);
        }
    }

    /// The last line that is not blank, trimmed and cut to a status
    /// column's size.
    fn last_line(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.0);
        let line = text.lines().map(str::trim).rfind(|line| !line.is_empty())?;
        Some(match line.char_indices().nth(EXEC_REASON_CHARS) {
            Some((cut, _)) => format!("{}…", &line[..cut]),
            None => line.to_owned(),
        })
    }
}

/// Read both pipes into `tail` until both end.
async fn read_output(output: Option<ChildOutput>, tail: &mut Tail) {
    let Some(ChildOutput { stdout, stderr }) = output else {
        return;
    };
    let mut stdout = pipe::Receiver::from_owned_fd(stdout).ok();
    let mut stderr = pipe::Receiver::from_owned_fd(stderr).ok();
    let (mut out_buffer, mut err_buffer) = ([0u8; 1024], [0u8; 1024]);
    loop {
        tokio::select! {
            read = read_some(&mut stdout, &mut out_buffer), if stdout.is_some() => match read {
                Some(n) => tail.push(&out_buffer[..n]),
                None => stdout = None,
            },
            read = read_some(&mut stderr, &mut err_buffer), if stderr.is_some() => match read {
                Some(n) => tail.push(&err_buffer[..n]),
                None => stderr = None,
            },
            else => return,
        }
    }
}

/// Bytes read from `pipe`; `None` at its end (or an error), or when there
/// is no pipe.
async fn read_some(pipe: &mut Option<pipe::Receiver>, buffer: &mut [u8]) -> Option<usize> {
    match pipe.as_mut()?.read(buffer).await {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_is_a_framed_message_with_field_one() {
        assert_eq!(grpc_frame(&encode_request("")), [0, 0, 0, 0, 0]);
        assert_eq!(
            grpc_frame(&encode_request("db")),
            [0, 0, 0, 0, 4, 0x0a, 2, b'd', b'b']
        );
        // A name of 200 bytes takes a two-byte length.
        let long = "x".repeat(200);
        let message = encode_request(&long);
        assert_eq!(&message[..3], [0x0a, 0xc8, 0x01]);
        assert_eq!(message.len(), 3 + 200);
    }

    #[test]
    fn varints_round_trip() {
        for value in [0, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut bytes = Vec::new();
            put_varint(&mut bytes, value);
            let mut slice = bytes.as_slice();
            assert_eq!(varint(&mut slice), Some(value));
            assert!(slice.is_empty());
        }
        assert_eq!(varint(&mut &[0x80u8][..]), None, "ends inside");
        assert_eq!(varint(&mut &[0xffu8; 11][..]), None, "too long");
    }

    #[test]
    fn the_status_is_found_among_unknown_fields() {
        assert_eq!(decode_status(&[]), Ok(0), "absent: UNKNOWN");
        assert_eq!(decode_status(&[0x08, 1]), Ok(SERVING));
        assert_eq!(decode_status(&[0x08, 2]), Ok(2));
        // Unknown fields of each wire type around it: a varint (field 2),
        // 64-bit (3), length-delimited (4), 32-bit (5).
        let message = [
            0x10, 0x96, 0x01, //
            0x19, 1, 2, 3, 4, 5, 6, 7, 8, //
            0x22, 3, b'a', b'b', b'c', //
            0x08, 1, //
            0x2d, 1, 2, 3, 4,
        ];
        assert_eq!(decode_status(&message), Ok(SERVING));
        assert!(decode_status(&[0x22, 5, b'a']).is_err(), "cut short");
        assert!(decode_status(&[0x0b]).is_err(), "a group");
        assert!(decode_status(&[0x08]).is_err(), "no value");
    }

    #[test]
    fn a_response_body_holds_one_uncompressed_message() {
        assert_eq!(
            grpc_message(&[0, 0, 0, 0, 2, 0x08, 1, 0xff]),
            Ok(&[0x08, 1][..])
        );
        assert!(grpc_message(&[1, 0, 0, 0, 0]).is_err(), "compressed");
        assert!(
            grpc_message(&[0, 0, 0, 0, 3, 0x08, 1]).is_err(),
            "truncated"
        );
        assert!(grpc_message(&[0, 0, 0]).is_err());
        assert!(grpc_message(&[]).is_err());
    }

    #[test]
    fn the_tail_keeps_the_end_and_quotes_its_last_line() {
        let mut tail = Tail::default();
        assert_eq!(tail.last_line(), None);
        tail.push(b"first\nsecond line  \n\n  \n");
        assert_eq!(tail.last_line().as_deref(), Some("second line"));
        tail.push(&[b'x'; EXEC_OUTPUT_TAIL]);
        assert_eq!(tail.0.len(), EXEC_OUTPUT_TAIL);
        let line = tail.last_line().unwrap();
        assert_eq!(line.chars().count(), EXEC_REASON_CHARS + 1);
        assert!(line.ends_with('…'));
    }

    #[test]
    fn io_errors_read_as_a_status_column_would() {
        let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_reason(&refused), "connection refused");
        assert_eq!(
            ProbeError::TimedOut(Duration::from_millis(1500)).to_string(),
            "timed out after 1s 500ms"
        );
    }
}
