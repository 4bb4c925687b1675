//! sd_notify for services: the socket, its messages, and who may send them.
//!
//! A service with `notify = true` gets `NOTIFY_SOCKET`, the address of a
//! datagram socket of its own, and speaks systemd's protocol to it: so a
//! program written for `Type=notify` runs unchanged. Each datagram holds
//! newline-separated `KEY=VALUE` assignments (`READY=1`, `STATUS=...`,
//! `WATCHDOG=1`...). The listener task turns them into [`NotifyReport`]s
//! for the service's actor, and keeps the watchdog: armed at `READY=1`, reset
//! by each `WATCHDOG=1`, reported once when it runs out.
//!
//! The socket lives in the abstract namespace (no file in data_dir to clean
//! up, no path length limit), under a name with random bytes in it, so that
//! nobody can bind it first. Abstract names are listed in /proc/net/unix
//! though, so anyone may send to it: SO_PASSCRED has the kernel attach the
//! sender's pid to each datagram, and only the service's own processes (its
//! leader, its process group, its cgroup) are listened to.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::cgroup::ServiceCgroup;

/// The largest datagram read; a larger one is dropped whole. systemd's own
/// limit (PIPE_BUF): a sender that works with systemd fits.
pub const MAX_DATAGRAM: usize = 4096;

/// How much of a STATUS= text is kept, in characters: it is shown on one
/// line of `status`.
pub const MAX_STATUS_CHARS: usize = 200;

/// SO_RCVBUF of a service's socket. A service sends a few small datagrams
/// a second at most; this holds dozens of full-size ones while the listener
/// is not scheduled.
const RECEIVE_BUFFER: usize = 256 * 1024;

/// Room for the ancillary data of one datagram: the credentials, and the
/// descriptors of `BARRIER=1` (sd_notify_barrier sends one). The kernel
/// closes those that do not fit, so a sender of many costs us nothing.
const CONTROL_BUFFER: usize = 256;

/// After an unexpected receive error, before trying again: such an error
/// would otherwise repeat at once, in a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(100);

/// Random bytes in a socket's name.
const NAME_RANDOM_BYTES: usize = 16;

/// How much of the service's name goes into the socket's name (for `ss -x`
/// readers only): the abstract name must stay under 108 bytes.
const NAME_SERVICE_BYTES: usize = 48;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(
        "service {service}: cannot {action} (notify = true): {source}; {hint}",
        hint = error_hint(.service, .source)
    )]
    Socket {
        service: String,
        /// What was being done: "create its notify socket", ...
        action: String,
        #[source]
        source: io::Error,
    },
}

fn error_hint(service: &str, error: &io::Error) -> String {
    match error.raw_os_error() {
        Some(libc::EMFILE | libc::ENFILE) => {
            "the daemon is out of file descriptors: raise its nofile limit".to_owned()
        }
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT) => {
            format!("Unix sockets are not available here: set notify = false for service {service}")
        }
        _ => format!(
            "set notify = false for service {service} to start it without readiness notification"
        ),
    }
}

/// A service's notify socket, bound and not yet listened to.
#[derive(Debug)]
pub struct NotifySocket {
    fd: OwnedFd,
    /// NOTIFY_SOCKET: `@` and the abstract name.
    address: String,
}

impl NotifySocket {
    /// A new socket for `service`, bound to a fresh abstract name.
    pub fn bind(service: &str) -> Result<NotifySocket, NotifyError> {
        let fail = |action: &str, source: rustix::io::Errno| NotifyError::Socket {
            service: service.to_owned(),
            action: action.to_owned(),
            source: source.into(),
        };
        let fd = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::DGRAM,
            SocketFlags::CLOEXEC | SocketFlags::NONBLOCK,
            None,
        )
        .map_err(|e| fail("create its notify socket", e))?;
        // Before the bind: a datagram queued without credentials could
        // not be told apart from a forged one.
        rustix::net::sockopt::set_socket_passcred(&fd, true)
            .map_err(|e| fail("turn on SO_PASSCRED on its notify socket", e))?;
        rustix::net::sockopt::set_socket_recv_buffer_size(&fd, RECEIVE_BUFFER)
            .map_err(|e| fail("size the receive buffer of its notify socket", e))?;
        let mut random = [0u8; NAME_RANDOM_BYTES];
        fill_random(&mut random).map_err(|e| fail("get random bytes for its notify socket", e))?;
        let name = socket_name(service, &random);
        let address = SocketAddrUnix::new_abstract_name(name.as_bytes())
            .map_err(|e| fail(&format!("make the address @{name}"), e))?;
        rustix::net::bind(&fd, &address)
            .map_err(|e| fail(&format!("bind its notify socket to @{name}"), e))?;
        Ok(NotifySocket {
            fd,
            address: format!("@{name}"),
        })
    }

    /// The value of NOTIFY_SOCKET: `@` then the abstract name, as sd_notify
    /// expects it.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A second descriptor of the same socket (close-on-exec): what an
    /// upgrade hands over, since the listener owns the first one.
    pub fn try_clone_fd(&self) -> io::Result<OwnedFd> {
        self.fd.try_clone()
    }

    /// A socket bound by this daemon before an upgrade (or by the one
    /// before it), taken back from its descriptor: still bound to the name
    /// the service has in NOTIFY_SOCKET, with whatever it sent meanwhile
    /// queued. Set non-blocking again (the flag is the open file's, but
    /// nothing is assumed of the old owner).
    pub fn from_fd(fd: OwnedFd) -> NotifySocket {
        let _ = rustix::io::ioctl_fionbio(&fd, true);
        let address = rustix::net::getsockname(&fd)
            .ok()
            .and_then(|any| SocketAddrUnix::try_from(any).ok())
            .and_then(|unix| {
                unix.abstract_name()
                    .map(|name| format!("@{}", String::from_utf8_lossy(name)))
            })
            .unwrap_or_else(|| "(a handed-over socket)".to_owned());
        NotifySocket { fd, address }
    }
}

fn fill_random(buf: &mut [u8]) -> Result<(), rustix::io::Errno> {
    let mut filled = 0;
    while filled < buf.len() {
        match rustix::rand::getrandom(&mut buf[filled..], rustix::rand::GetRandomFlags::empty()) {
            Ok(n) => filled += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `orchestrator/SERVICE/HEX`: readable in `ss -x`, unguessable by the hex.
fn socket_name(service: &str, random: &[u8]) -> String {
    let mut cut = service.len().min(NAME_SERVICE_BYTES);
    while !service.is_char_boundary(cut) {
        cut -= 1;
    }
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("orchestrator/{}/{hex}", &service[..cut])
}

/// The environment a notify service gets: NOTIFY_SOCKET, and WATCHDOG_USEC
/// with a watchdog. No WATCHDOG_PID: the pid is not known before the spawn,
/// and sd_watchdog_enabled takes its absence as "this process".
pub fn environment(
    socket: &NotifySocket,
    watchdog: Option<Duration>,
) -> Vec<crate::process::EnvVar> {
    let mut env = vec![("NOTIFY_SOCKET".into(), socket.address().into())];
    if let Some(timeout) = watchdog.filter(|t| !t.is_zero()) {
        env.push((
            "WATCHDOG_USEC".into(),
            timeout.as_micros().max(1).to_string().into(),
        ));
    }
    env
}

/// What the listener tells the service's actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyReport {
    /// READY=1: start-up is complete. Sent at the first one, and at the
    /// first one after each RELOADING=1; repeats are not reported.
    Ready,
    /// STATUS=...: control characters removed, at most
    /// [`MAX_STATUS_CHARS`] characters; "" clears it. Sent when it changes.
    Status(String),
    /// No WATCHDOG=1 for `after` since READY=1 or the last ping; or
    /// WATCHDOG=trigger, which the service sends to be treated as hung
    /// (honoured with or without a watchdog set, as systemd does; `after`
    /// is then the time since the last ping, READY=1, or the listener's
    /// start). Sent once; the listener keeps reading but watches no more.
    WatchdogExpired { after: Duration },
    /// A datagram from a process that is not the service's (`pid`), or
    /// without credentials (`None`: e.g. a sender in a pid namespace that
    /// ours cannot see). It was not acted on.
    Rejected { pid: Option<u32> },
    /// RELOADING=1: the service is reloading its configuration; the next
    /// READY=1 is reported again.
    Reloading,
    /// STOPPING=1: the service is shutting down on its own. Sent once.
    Stopping,
    /// EXTEND_TIMEOUT_USEC=...: the service asks for this much more time,
    /// from now, before the current timeout (start or stop).
    ExtendTimeout { by: Duration },
}

/// One assignment of a datagram that the listener acts on. MAINPID= is
/// ignored: the leader is the service's main process, the one the
/// supervisor waits on, and stays so. Unknown keys are ignored as systemd
/// ignores them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Assignment {
    Ready,
    Reloading,
    Stopping,
    Status(String),
    Watchdog,
    WatchdogTrigger,
    ExtendTimeout(Duration),
}

/// The assignments of one datagram that mean something to us, in order.
fn parse(text: &str) -> Vec<Assignment> {
    text.split('\n')
        .filter_map(|line| {
            let (key, value) = line.split_once('=')?;
            match (key, value) {
                ("READY", "1") => Some(Assignment::Ready),
                ("RELOADING", "1") => Some(Assignment::Reloading),
                ("STOPPING", "1") => Some(Assignment::Stopping),
                ("STATUS", text) => Some(Assignment::Status(sanitize_status(text))),
                ("WATCHDOG", "1") => Some(Assignment::Watchdog),
                ("WATCHDOG", "trigger") => Some(Assignment::WatchdogTrigger),
                ("EXTEND_TIMEOUT_USEC", usec) => usec
                    .parse()
                    .ok()
                    .map(|usec| Assignment::ExtendTimeout(Duration::from_micros(usec))),
                _ => None,
            }
        })
        .collect()
}

/// Control characters out (a status is printed on a terminal), and cut to
/// [`MAX_STATUS_CHARS`].
fn sanitize_status(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_STATUS_CHARS)
        .collect()
}

/// The process group in the text of /proc/PID/stat. The command name (the
/// second field) may hold spaces and parentheses, and bytes that are not
/// UTF-8: the fields after it start after the last `)`.
fn stat_process_group(stat: &[u8]) -> Option<u32> {
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&stat[close + 1..]).ok()?;
    // state, ppid, pgrp, ...
    rest.split_ascii_whitespace().nth(2)?.parse().ok()
}

fn process_group(pid: u32) -> Option<u32> {
    stat_process_group(&std::fs::read(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `pid` is one of the service's processes: its leader, a member of
/// the leader's process group, or in its cgroup (which also holds those
/// that left the group with setsid).
fn sender_allowed(pid: u32, leader_pid: u32, cgroup: Option<&dyn ServiceCgroup>) -> bool {
    if pid == 0 {
        return false;
    }
    pid == leader_pid
        || process_group(pid) == Some(leader_pid)
        || cgroup.is_some_and(|cgroup| cgroup.pids().is_ok_and(|pids| pids.contains(&pid)))
}

/// The watchdog of one service's run.
#[derive(Debug)]
struct Watchdog {
    timeout: Option<Duration>,
    /// When it was armed or last pinged; `None` until READY=1.
    last: Option<Instant>,
    /// When the listener started: the reference of a trigger before READY=1.
    started: Instant,
    fired: bool,
}

impl Watchdog {
    fn new(timeout: Option<Duration>, now: Instant) -> Watchdog {
        Watchdog {
            timeout: timeout.filter(|t| !t.is_zero()),
            last: None,
            started: now,
            fired: false,
        }
    }

    /// At READY=1, as systemd arms it once start-up is complete (the start
    /// timeout covers the time before). Only the first arms it.
    fn arm(&mut self, now: Instant) {
        if self.timeout.is_some() && self.last.is_none() {
            self.last = Some(now);
        }
    }

    /// WATCHDOG=1. Before READY=1 it changes nothing: there is nothing
    /// armed to reset yet.
    fn ping(&mut self, now: Instant) {
        if self.last.is_some() {
            self.last = Some(now);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        if self.fired {
            return None;
        }
        Some(self.last? + self.timeout?)
    }

    /// The report when the deadline has passed at `now` (once).
    fn expire(&mut self, now: Instant) -> Option<NotifyReport> {
        if now < self.deadline()? {
            return None;
        }
        self.fire(now)
    }

    /// WATCHDOG=trigger.
    fn trigger(&mut self, now: Instant) -> Option<NotifyReport> {
        if self.fired {
            return None;
        }
        self.fire(now)
    }

    fn fire(&mut self, now: Instant) -> Option<NotifyReport> {
        self.fired = true;
        let since = self.last.unwrap_or(self.started);
        Some(NotifyReport::WatchdogExpired {
            after: now.saturating_duration_since(since),
        })
    }
}

/// One datagram as received.
#[derive(Debug)]
struct Datagram {
    /// The sender's pid from SCM_CREDENTIALS; `None` without them or when
    /// the kernel gave 0 (a sender our pid namespace cannot see).
    pid: Option<u32>,
    /// Its full length, which may exceed `bytes` (then it is dropped).
    len: usize,
    bytes: Vec<u8>,
    /// Descriptors it carried (BARRIER=1): closed once it has been handled,
    /// which tells a sd_notify_barrier caller that everything it sent
    /// before has been. Whatever else a sender passes is closed as well.
    fds: Vec<OwnedFd>,
}

/// Where the listener's datagrams come from: the socket, or a test's channel.
trait Source: Send {
    fn next(&mut self) -> impl Future<Output = io::Result<Datagram>> + Send;
}

struct SocketSource {
    fd: AsyncFd<OwnedFd>,
    buf: Box<[u8; MAX_DATAGRAM]>,
}

impl Source for SocketSource {
    async fn next(&mut self) -> io::Result<Datagram> {
        loop {
            let mut guard = self.fd.readable().await?;
            let buf = &mut self.buf;
            match guard.try_io(|fd| receive(fd.get_ref().as_fd(), &mut buf[..])) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// Reads one datagram with its credentials and descriptors.
///
/// By hand, with libc: rustix's `UCred` holds the pid as a non-zero `Pid`,
/// and the kernel reports pid 0 for a sender outside our pid namespace (a
/// host process sending into a container sharing the host's network, say),
/// so rustix's parsing of SCM_CREDENTIALS would be undefined behaviour
/// exactly when a stranger writes. Here the control data is parsed as bytes.
fn receive(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut control = [0u8; CONTROL_BUFFER];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let (received, msg) = loop {
        // SAFETY: msghdr is plain integers and pointers, for which all
        // zeroes is valid (null name, no buffers). The pointers set next
        // are to `iov` (one entry, pointing at `buf`) and `control`, which
        // outlive the call, with their true lengths: the kernel writes only
        // within them. MSG_CMSG_CLOEXEC: a received descriptor never leaks
        // into a process spawned meanwhile.
        let (result, msg) = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = control.len() as _;
            let result = libc::recvmsg(
                fd.as_raw_fd(),
                &mut msg,
                libc::MSG_CMSG_CLOEXEC | libc::MSG_TRUNC | libc::MSG_DONTWAIT,
            );
            (result, msg)
        };
        if result >= 0 {
            break (result as usize, msg);
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    };
    // A size_t with glibc, a socklen_t with musl.
    #[allow(clippy::unnecessary_cast)]
    let control_len = (msg.msg_controllen as usize).min(control.len());
    let (pid, raw_fds) = parse_control(&control[..control_len]);
    let fds = raw_fds
        .into_iter()
        // SAFETY: the kernel has just installed these descriptors in our
        // table for this datagram; nothing else knows their numbers, so
        // each gets its only owner here.
        .map(|raw| unsafe { OwnedFd::from_raw_fd(raw) })
        .collect();
    // MSG_TRUNC in the flags too: a kernel that ignores it on receive still
    // says the datagram was cut.
    let len = if msg.msg_flags & libc::MSG_TRUNC != 0 {
        received.max(buf.len() + 1)
    } else {
        received
    };
    Ok(Datagram {
        pid,
        len,
        bytes: buf[..len.min(buf.len())].to_vec(),
        fds,
    })
}

/// The sender's pid and the descriptor numbers in a datagram's control
/// data, laid out as the kernel writes it: per message a header {size_t
/// len; int level; int type}, then its data, each aligned to size_t.
fn parse_control(control: &[u8]) -> (Option<u32>, Vec<RawFd>) {
    const WORD: usize = size_of::<usize>();
    const HEADER: usize = (WORD + 8).next_multiple_of(WORD);
    let mut pid = None;
    let mut fds = Vec::new();
    let mut at = 0;
    while at + HEADER <= control.len() {
        let word = |offset: usize, n: usize| &control[at + offset..at + offset + n];
        let len = usize::from_ne_bytes(word(0, WORD).try_into().expect("a word"));
        let level = i32::from_ne_bytes(word(WORD, 4).try_into().expect("four bytes"));
        let kind = i32::from_ne_bytes(word(WORD + 4, 4).try_into().expect("four bytes"));
        if len < HEADER || len > control.len() - at {
            break;
        }
        let data = &control[at + HEADER..at + len];
        match (level, kind) {
            (libc::SOL_SOCKET, libc::SCM_CREDENTIALS) if data.len() >= 4 => {
                let raw = i32::from_ne_bytes(data[..4].try_into().expect("four bytes"));
                pid = u32::try_from(raw).ok().filter(|&p| p != 0);
            }
            (libc::SOL_SOCKET, libc::SCM_RIGHTS) => {
                fds.extend(
                    data.chunks_exact(4)
                        .map(|raw| RawFd::from_ne_bytes(raw.try_into().expect("four bytes"))),
                );
            }
            _ => {}
        }
        at += len.next_multiple_of(WORD);
    }
    (pid, fds)
}

/// Reads the datagrams of `socket` and reports what the service says, until
/// aborted or until `reports`' receiver is dropped. See [`NotifyReport`]
/// for what is sent when. Only datagrams from the service's processes are
/// acted on: from `leader_pid`, from a process in its process group, or
/// from one in `cgroup`; any other is reported as
/// [`NotifyReport::Rejected`] and dropped. With `watchdog`, it is armed at
/// READY=1 and expires when no WATCHDOG=1 comes for that long.
pub fn spawn_listener(
    socket: NotifySocket,
    service: String,
    leader_pid: u32,
    cgroup: Option<Arc<dyn ServiceCgroup>>,
    watchdog: Option<Duration>,
    reports: UnboundedSender<NotifyReport>,
) -> JoinHandle<()> {
    spawn_listener_resumed(
        socket, service, leader_pid, cgroup, watchdog, false, reports,
    )
}

/// [`spawn_listener`] for a process resumed after an upgrade: `ready` when
/// it had said READY=1 already (it will not say it again), and then its
/// watchdog is armed anew from now, for a whole period (the old listener's
/// last ping time is not handed over).
pub fn spawn_listener_resumed(
    socket: NotifySocket,
    service: String,
    leader_pid: u32,
    cgroup: Option<Arc<dyn ServiceCgroup>>,
    watchdog: Option<Duration>,
    ready: bool,
    reports: UnboundedSender<NotifyReport>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let address = socket.address;
        let fd = match watch(socket.fd) {
            Ok(fd) => fd,
            Err(e) => {
                error!(
                    service,
                    "cannot listen on the notify socket {address}: {e}; the service's \
                     sd_notify messages are not read, so it cannot become ready by notify"
                );
                return;
            }
        };
        let source = SocketSource {
            fd,
            buf: Box::new([0; MAX_DATAGRAM]),
        };
        let now = Instant::now();
        let mut listener = Listener::new(service, leader_pid, cgroup, watchdog, now);
        if ready {
            listener.ready = true;
            listener.watchdog.arm(now);
        }
        run(source, listener, reports).await;
    })
}

/// See `process::unix::watch_pidfd`: sound for an `OwnedFd`.
#[allow(deprecated)]
fn watch(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    AsyncFd::with_interest(fd, Interest::READABLE)
}

async fn run<S: Source>(
    mut source: S,
    mut listener: Listener,
    reports: UnboundedSender<NotifyReport>,
) {
    loop {
        let deadline = listener.watchdog.deadline();
        tokio::select! {
            // The watchdog before the datagrams: a stranger's flood of them
            // must not hold off its expiry.
            biased;
            () = reports.closed() => return,
            () = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)),
                if deadline.is_some() =>
            {
                if let Some(report) = listener.watchdog.expire(Instant::now()) {
                    listener.log_expiry(&report);
                    if reports.send(report).is_err() {
                        return;
                    }
                }
            }
            received = source.next() => match received {
                Ok(mut datagram) => {
                    // Closed once its reports are sent: a barrier then
                    // tells the sender that the actor can see them.
                    let barrier = std::mem::take(&mut datagram.fds);
                    for report in listener.handle(datagram, Instant::now()) {
                        if reports.send(report).is_err() {
                            return;
                        }
                    }
                    drop(barrier);
                }
                Err(e) => {
                    warn!(
                        service = listener.service,
                        "cannot read from the notify socket: {e}; trying again"
                    );
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            },
        }
    }
}

/// What the listener knows between datagrams.
struct Listener {
    service: String,
    leader_pid: u32,
    cgroup: Option<Arc<dyn ServiceCgroup>>,
    watchdog: Watchdog,
    /// Ready reported, since the start or the last RELOADING=1.
    ready: bool,
    stopping: bool,
    status: Option<String>,
    rejected: u64,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("service", &self.service)
            .field("leader_pid", &self.leader_pid)
            .field("watchdog", &self.watchdog)
            .field("ready", &self.ready)
            .field("rejected", &self.rejected)
            .finish_non_exhaustive()
    }
}

impl Listener {
    fn new(
        service: String,
        leader_pid: u32,
        cgroup: Option<Arc<dyn ServiceCgroup>>,
        watchdog: Option<Duration>,
        now: Instant,
    ) -> Listener {
        Listener {
            service,
            leader_pid,
            cgroup,
            watchdog: Watchdog::new(watchdog, now),
            ready: false,
            stopping: false,
            status: None,
            rejected: 0,
        }
    }

    /// The reports for one datagram, in the order of its assignments.
    fn handle(&mut self, datagram: Datagram, now: Instant) -> Vec<NotifyReport> {
        let Datagram {
            pid, len, bytes, ..
        } = datagram;
        let mut reports = Vec::new();
        // A ping that comes after the deadline does not undo the expiry.
        if let Some(report) = self.watchdog.expire(now) {
            self.log_expiry(&report);
            reports.push(report);
        }
        let allowed =
            pid.is_some_and(|pid| sender_allowed(pid, self.leader_pid, self.cgroup.as_deref()));
        if !allowed {
            self.rejected += 1;
            // Logarithmic: a flood must not flood the log too.
            if self.rejected.is_power_of_two() {
                let sender = pid.map_or_else(
                    || "without credentials".to_owned(),
                    |p| format!("from pid {p}"),
                );
                warn!(
                    service = self.service,
                    rejected = self.rejected,
                    "dropped an sd_notify message {sender}: not a process of the service \
                     (leader {}, its process group or cgroup)",
                    self.leader_pid
                );
            }
            reports.push(NotifyReport::Rejected { pid });
            return reports;
        }
        if len > bytes.len() {
            warn!(
                service = self.service,
                "dropped an sd_notify message of {len} bytes: over the limit of {MAX_DATAGRAM}"
            );
            return reports;
        }
        let text = String::from_utf8_lossy(&bytes);
        debug!(service = self.service, pid, message = %text.escape_debug(), "sd_notify");
        for assignment in parse(&text) {
            match assignment {
                Assignment::Ready => {
                    if !self.ready {
                        self.ready = true;
                        self.watchdog.arm(now);
                        reports.push(NotifyReport::Ready);
                    }
                }
                Assignment::Reloading => {
                    self.ready = false;
                    reports.push(NotifyReport::Reloading);
                }
                Assignment::Stopping => {
                    if !self.stopping {
                        self.stopping = true;
                        reports.push(NotifyReport::Stopping);
                    }
                }
                Assignment::Status(status) => {
                    if self.status.as_ref() != Some(&status) {
                        self.status = Some(status.clone());
                        reports.push(NotifyReport::Status(status));
                    }
                }
                Assignment::Watchdog => self.watchdog.ping(now),
                Assignment::WatchdogTrigger => {
                    if let Some(report) = self.watchdog.trigger(now) {
                        info!(
                            service = self.service,
                            "the service asked to be treated as hung (WATCHDOG=trigger)"
                        );
                        reports.push(report);
                    }
                }
                Assignment::ExtendTimeout(by) => reports.push(NotifyReport::ExtendTimeout { by }),
            }
        }
        reports
    }

    fn log_expiry(&self, report: &NotifyReport) {
        if let NotifyReport::WatchdogExpired { after } = report {
            warn!(
                service = self.service,
                "watchdog: no WATCHDOG=1 for {}",
                humantime::format_duration(*after)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cgroup::ResourceController;
    use crate::cgroup::fake::FakeController;

    fn own_pid() -> u32 {
        std::process::id()
    }

    #[test]
    fn parses_the_assignments_it_knows_in_order() {
        let text = "READY=1\nSTATUS=warming up\nWATCHDOG=1\nWATCHDOG=trigger\nSTOPPING=1\n\
                    RELOADING=1\nMAINPID=42\nEXTEND_TIMEOUT_USEC=1500000\nFOO=bar\n";
        assert_eq!(
            parse(text),
            vec![
                Assignment::Ready,
                Assignment::Status("warming up".into()),
                Assignment::Watchdog,
                Assignment::WatchdogTrigger,
                Assignment::Stopping,
                Assignment::Reloading,
                Assignment::ExtendTimeout(Duration::from_millis(1500)),
            ]
        );
    }

    #[test]
    fn ignores_other_values_and_malformed_lines() {
        assert!(parse("READY=0\nREADY\nWATCHDOG=2\n=1\nEXTEND_TIMEOUT_USEC=soon\n\n").is_empty());
        assert_eq!(
            parse("READY=1"),
            vec![Assignment::Ready],
            "no final newline"
        );
        assert_eq!(
            parse("STATUS=a=b"),
            vec![Assignment::Status("a=b".into())],
            "the value runs to the end of the line"
        );
        assert_eq!(parse("STATUS="), vec![Assignment::Status(String::new())]);
    }

    #[test]
    fn status_loses_control_characters_and_is_capped() {
        assert_eq!(sanitize_status("a\tb\x1b[31mc\x7f\r"), "ab[31mc");
        let long = "é".repeat(MAX_STATUS_CHARS + 50);
        let kept = sanitize_status(&long);
        assert_eq!(kept.chars().count(), MAX_STATUS_CHARS);
    }

    #[test]
    fn stat_parsing_survives_odd_command_names() {
        assert_eq!(stat_process_group(b"42 (sleep) S 1 42 42 0 -1"), Some(42));
        assert_eq!(
            stat_process_group(b"42 (a) b (c) ) R 7 99 42 0 -1 4194560"),
            Some(99),
            "parentheses and spaces in the name"
        );
        assert_eq!(
            stat_process_group(b"42 (\xff\xfe) S 1 77 77"),
            Some(77),
            "a name that is not UTF-8"
        );
        assert_eq!(stat_process_group(b"42 (sleep S 1 42"), None);
        assert_eq!(stat_process_group(b"42 (x) S 1"), None);
        assert_eq!(stat_process_group(b""), None);
    }

    #[test]
    fn reads_its_own_process_group() {
        let expected = rustix::process::getpgrp().as_raw_pid() as u32;
        assert_eq!(process_group(own_pid()), Some(expected));
    }

    #[test]
    fn sender_check_with_the_current_process() {
        let me = own_pid();
        let group = process_group(me).unwrap();
        assert!(sender_allowed(me, me, None), "the leader itself");
        assert!(sender_allowed(me, group, None), "a member of its group");
        // No process has pid u32::MAX - 1 nor leads a group of that number.
        let stranger_leader = u32::MAX - 1;
        assert!(!sender_allowed(me, stranger_leader, None));
        assert!(!sender_allowed(0, 0, None), "pid 0 is never anyone's");

        let controller = FakeController::default();
        let placement = controller.create("svc", &Default::default()).unwrap();
        let cgroup = placement.cgroup.unwrap();
        assert!(!sender_allowed(me, stranger_leader, Some(&*cgroup)));
        controller.cgroup("svc").unwrap().set_pids(vec![1, me]);
        assert!(
            sender_allowed(me, stranger_leader, Some(&*cgroup)),
            "listed in the service's cgroup"
        );
    }

    #[test]
    fn socket_names_are_bounded_and_unpredictable() {
        let long = "x".repeat(64);
        let socket = NotifySocket::bind(&long).unwrap();
        let address = socket.address();
        assert!(address.starts_with("@orchestrator/"), "{address}");
        // sun_path holds 108 bytes, the first of them the abstract NUL.
        assert!(address.len() <= 107, "{address}");
        let other = NotifySocket::bind(&long).unwrap();
        assert_ne!(address, other.address());
        assert_eq!(
            socket_name("é".repeat(40).as_str(), &[0xab]).len(),
            13 + 48 + 1 + 2
        );
    }

    #[test]
    fn the_environment_has_the_socket_and_the_watchdog() {
        let socket = NotifySocket::bind("env").unwrap();
        assert_eq!(
            environment(&socket, None),
            vec![("NOTIFY_SOCKET".into(), socket.address().into())]
        );
        let env = environment(&socket, Some(Duration::from_millis(1500)));
        assert_eq!(env[1], ("WATCHDOG_USEC".into(), "1500000".into()));
        assert_eq!(environment(&socket, Some(Duration::ZERO)).len(), 1);
    }

    #[test]
    fn the_socket_is_close_on_exec_non_blocking_and_passes_credentials() {
        let socket = NotifySocket::bind("flags").unwrap();
        let fd_flags = rustix::io::fcntl_getfd(&socket.fd).unwrap();
        assert!(fd_flags.contains(rustix::io::FdFlags::CLOEXEC));
        let status = nix::fcntl::fcntl(&socket.fd, nix::fcntl::FcntlArg::F_GETFL).unwrap();
        assert_ne!(status & libc::O_NONBLOCK, 0);
        assert!(rustix::net::sockopt::socket_passcred(&socket.fd).unwrap());
    }

    // The listener's loop, fed by a channel instead of the socket, so that
    // tokio's paused clock decides everything.

    struct ChannelSource(tokio::sync::mpsc::UnboundedReceiver<Datagram>);

    impl Source for ChannelSource {
        async fn next(&mut self) -> io::Result<Datagram> {
            match self.0.recv().await {
                Some(datagram) => Ok(datagram),
                // The test is over: wait to be dropped.
                None => std::future::pending().await,
            }
        }
    }

    fn from(pid: u32, text: &str) -> Datagram {
        Datagram {
            pid: Some(pid),
            len: text.len(),
            bytes: text.as_bytes().to_vec(),
            fds: Vec::new(),
        }
    }

    struct Harness {
        datagrams: tokio::sync::mpsc::UnboundedSender<Datagram>,
        reports: tokio::sync::mpsc::UnboundedReceiver<NotifyReport>,
        task: JoinHandle<()>,
    }

    impl Harness {
        fn start(watchdog: Option<Duration>) -> Harness {
            let (datagrams, source) = tokio::sync::mpsc::unbounded_channel();
            let (sender, reports) = tokio::sync::mpsc::unbounded_channel();
            let listener = Listener::new("svc".into(), own_pid(), None, watchdog, Instant::now());
            let task = tokio::spawn(run(ChannelSource(source), listener, sender));
            Harness {
                datagrams,
                reports,
                task,
            }
        }

        fn send(&self, text: &str) {
            self.datagrams.send(from(own_pid(), text)).unwrap();
        }

        async fn next(&mut self) -> NotifyReport {
            self.reports.recv().await.expect("the listener runs")
        }

        /// Lets the listener handle what was sent, without the clock moving
        /// (paused, it only moves when every task waits).
        async fn settle(&self) {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        }

        fn nothing_yet(&mut self) {
            assert_eq!(self.reports.try_recv().ok(), None);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_is_armed_at_ready_and_expires_once() {
        let mut h = Harness::start(Some(Duration::from_secs(10)));
        // Long before READY=1: not armed, so nothing expires.
        tokio::time::sleep(Duration::from_secs(60)).await;
        h.send("WATCHDOG=1");
        h.settle().await;
        h.nothing_yet();
        let ready_at = Instant::now();
        h.send("READY=1");
        assert_eq!(h.next().await, NotifyReport::Ready);
        assert_eq!(
            h.next().await,
            NotifyReport::WatchdogExpired {
                after: Duration::from_secs(10)
            }
        );
        assert_eq!(ready_at.elapsed(), Duration::from_secs(10));
        tokio::time::sleep(Duration::from_secs(60)).await;
        h.send("WATCHDOG=1");
        h.send("WATCHDOG=trigger");
        h.settle().await;
        h.nothing_yet();
        h.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn each_ping_resets_the_watchdog() {
        let mut h = Harness::start(Some(Duration::from_secs(10)));
        let start = Instant::now();
        h.send("READY=1");
        assert_eq!(h.next().await, NotifyReport::Ready);
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(8)).await;
            h.send("WATCHDOG=1");
            h.settle().await;
            h.nothing_yet();
        }
        // The last ping was at 40 s.
        assert_eq!(
            h.next().await,
            NotifyReport::WatchdogExpired {
                after: Duration::from_secs(10)
            }
        );
        assert_eq!(start.elapsed(), Duration::from_secs(50));
    }

    #[tokio::test(start_paused = true)]
    async fn trigger_fires_at_once_even_without_a_watchdog() {
        let mut h = Harness::start(Some(Duration::from_secs(10)));
        h.send("READY=1");
        assert_eq!(h.next().await, NotifyReport::Ready);
        tokio::time::sleep(Duration::from_secs(3)).await;
        h.send("WATCHDOG=trigger");
        assert_eq!(
            h.next().await,
            NotifyReport::WatchdogExpired {
                after: Duration::from_secs(3)
            }
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        h.nothing_yet();

        let mut h = Harness::start(None);
        tokio::time::sleep(Duration::from_secs(2)).await;
        h.send("WATCHDOG=trigger");
        assert_eq!(
            h.next().await,
            NotifyReport::WatchdogExpired {
                after: Duration::from_secs(2)
            },
            "since the listener started"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_watchdog_nothing_expires() {
        let mut h = Harness::start(None);
        h.send("READY=1");
        assert_eq!(h.next().await, NotifyReport::Ready);
        tokio::time::sleep(Duration::from_secs(3600)).await;
        h.nothing_yet();
    }

    #[tokio::test(start_paused = true)]
    async fn reports_ready_once_per_start_or_reload_and_status_changes() {
        let mut h = Harness::start(None);
        h.send("STATUS=warming up\nEXTEND_TIMEOUT_USEC=5000000");
        assert_eq!(h.next().await, NotifyReport::Status("warming up".into()));
        assert_eq!(
            h.next().await,
            NotifyReport::ExtendTimeout {
                by: Duration::from_secs(5)
            }
        );
        h.send("READY=1\nSTATUS=warming up");
        h.send("READY=1\nSTATUS=serving");
        assert_eq!(h.next().await, NotifyReport::Ready);
        assert_eq!(h.next().await, NotifyReport::Status("serving".into()));
        h.send("RELOADING=1");
        h.send("READY=1");
        h.send("STOPPING=1");
        h.send("STOPPING=1\nSTATUS=");
        assert_eq!(h.next().await, NotifyReport::Reloading);
        assert_eq!(h.next().await, NotifyReport::Ready);
        assert_eq!(h.next().await, NotifyReport::Stopping);
        assert_eq!(h.next().await, NotifyReport::Status(String::new()));
        h.settle().await;
        h.nothing_yet();
    }

    #[tokio::test(start_paused = true)]
    async fn strangers_and_oversize_datagrams_are_not_acted_on() {
        let mut h = Harness::start(Some(Duration::from_secs(10)));
        let stranger = u32::MAX - 1;
        h.datagrams.send(from(stranger, "READY=1")).unwrap();
        assert_eq!(
            h.next().await,
            NotifyReport::Rejected {
                pid: Some(stranger)
            }
        );
        h.datagrams
            .send(Datagram {
                pid: None,
                ..from(0, "READY=1")
            })
            .unwrap();
        assert_eq!(h.next().await, NotifyReport::Rejected { pid: None });
        h.datagrams
            .send(Datagram {
                len: MAX_DATAGRAM + 1,
                ..from(own_pid(), "READY=1")
            })
            .unwrap();
        h.settle().await;
        h.nothing_yet();
        // Nothing armed the watchdog either.
        tokio::time::sleep(Duration::from_secs(60)).await;
        h.nothing_yet();
    }

    #[tokio::test(start_paused = true)]
    async fn ends_when_the_receiver_is_dropped() {
        let h = Harness::start(Some(Duration::from_secs(10)));
        drop(h.reports);
        tokio::time::timeout(Duration::from_secs(1), h.task)
            .await
            .expect("the listener ended")
            .unwrap();
    }

    #[test]
    fn parses_control_data_as_the_kernel_lays_it_out() {
        const WORD: usize = size_of::<usize>();
        let header = (WORD + 8).next_multiple_of(WORD);
        let message = |level: i32, kind: i32, data: &[u8]| {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&(header + data.len()).to_ne_bytes());
            bytes.extend_from_slice(&level.to_ne_bytes());
            bytes.extend_from_slice(&kind.to_ne_bytes());
            bytes.resize(header, 0);
            bytes.extend_from_slice(data);
            bytes.resize(bytes.len().next_multiple_of(WORD), 0);
            bytes
        };
        let mut ucred = Vec::new();
        for value in [4242i32, 1000, 1000] {
            ucred.extend_from_slice(&value.to_ne_bytes());
        }
        let creds = message(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &ucred);
        assert_eq!(parse_control(&creds), (Some(4242), vec![]));
        let mut both = creds.clone();
        let fds: Vec<u8> = [7i32, 9].iter().flat_map(|fd| fd.to_ne_bytes()).collect();
        both.extend_from_slice(&message(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fds));
        assert_eq!(parse_control(&both), (Some(4242), vec![7, 9]));
        let mut zero = ucred.clone();
        zero[..4].copy_from_slice(&0i32.to_ne_bytes());
        assert_eq!(
            parse_control(&message(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &zero)).0,
            None,
            "pid 0: a sender we cannot see"
        );
        let mut other = message(libc::SOL_IP, 1, &[1, 2, 3, 4]);
        other.extend_from_slice(&creds);
        assert_eq!(parse_control(&other).0, Some(4242), "after another message");
        assert_eq!(parse_control(&creds[..header + 2]).0, None, "cut short");
        assert_eq!(parse_control(&[]).0, None);
    }
}
