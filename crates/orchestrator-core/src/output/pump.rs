//! The task that drains a child's stdout and stderr.
//!
//! One task serves both pipes of a child, to keep the cost of an idle
//! service to one small future: it waits for readiness without holding a
//! buffer, then reads into a 64 KiB buffer owned by the worker thread, frames
//! and queues the lines for the file (never writing it here: see
//! `writer`), and releases the buffer before awaiting again.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::net::unix::pipe::Receiver;
use tokio::sync::oneshot;
use tokio::task::{JoinError, JoinHandle};

use super::framing::{Framer, Sink};
use super::{Console, LogBlock, ServiceOutput, Stream, console};

/// The default capacity of a Linux pipe.
const DEFAULT_PIPE_BYTES: usize = 64 * 1024;

/// A read that returns this much found the pipe at least half full: its
/// service writes faster than one wake-up of ours. Not only a full pipe:
/// the pump, which leaves the file to a writer thread, reads so soon after
/// a service's write that a flood seldom leaves 64 KiB for one read.
const GROW_AFTER_READ_BYTES: usize = DEFAULT_PIPE_BYTES / 2;

/// One read takes at most what a default pipe holds. Larger reads (256 KiB
/// from a grown pipe) measured no cheaper per byte, and each worker keeps
/// the pages a flood touched.
const READ_BUF_BYTES: usize = DEFAULT_PIPE_BYTES;

/// What a pipe grows to once its service has half filled it: a service that
/// writes faster than one wake-up of ours drains then runs ahead by a
/// megabyte instead of blocking every 64 KiB. The kernel allocates the pages
/// only while they hold unread bytes (but accounts the whole size to the
/// user: see [`MAX_GROWN_PIPES`]); its own cap (fs.pipe-max-size, 1 MiB by
/// default) applies.
const GROWN_PIPE_BYTES: usize = 1024 * 1024;

/// Pipes grown at one time, across all services. The kernel charges a pipe's
/// whole size (not the pages in use) to its user, and once an unprivileged
/// user passes `fs.pipe-user-pages-soft` (64 MiB by default) each new pipe
/// of that user, later services' output pipes among them, gets only 8 KiB.
/// Sixteen grown pipes stay at a quarter of that limit.
const MAX_GROWN_PIPES: usize = 16;

static GROWN_PIPES: GrowthBudget = GrowthBudget::new(MAX_GROWN_PIPES);

/// Reads per wake-up before the other stream (and other tasks, through
/// tokio's cooperative budget) get a turn; a flooding stream must not starve
/// a quiet one.
const READS_PER_TURN: usize = 16;

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> =
        RefCell::new(vec![0; READ_BUF_BYTES].into_boxed_slice());
}

/// Reads both pipes until EOF on both, that is until every writer
/// (grandchildren included) has closed them; partial last lines are
/// delivered at EOF. Aborting the task also delivers them (on drop);
/// [`PumpHandle::freeze`] instead stops it between two reads and hands back
/// the pipes and the partial lines, for [`spawn_pump_resumed`].
///
/// Must be called within a tokio runtime. The fds may be blocking; they are
/// switched to non-blocking mode here.
pub fn spawn_pump(output: Arc<ServiceOutput>, stdout: OwnedFd, stderr: OwnedFd) -> PumpHandle {
    spawn(
        output,
        [Some(stdout), Some(stderr)],
        [Vec::new(), Vec::new()],
        false,
    )
}

/// Starts a pump where a frozen one stopped (in this daemon or, after an
/// upgrade, in the one before): its framers begin with the partial lines,
/// and whatever the child wrote meanwhile is still in the pipes. A stream
/// that had ended stays ended. Must be called within a tokio runtime.
pub fn spawn_pump_resumed(output: Arc<ServiceOutput>, frozen: FrozenPump) -> PumpHandle {
    let FrozenPump {
        stdout,
        stderr,
        stdout_partial,
        stderr_partial,
    } = frozen;
    spawn(
        output,
        [stdout, stderr],
        [stdout_partial, stderr_partial],
        true,
    )
}

fn spawn(
    output: Arc<ServiceOutput>,
    fds: [Option<OwnedFd>; 2],
    partials: [Vec<u8>; 2],
    resumed: bool,
) -> PumpHandle {
    let (freeze, frozen) = oneshot::channel();
    let service = Arc::clone(&output.name);
    let task = tokio::spawn(async move {
        let [stdout, stderr] = fds;
        let [stdout_partial, stderr_partial] = partials;
        let readers = [
            Reader::new(&output, Stream::Stdout, stdout, stdout_partial, resumed),
            Reader::new(&output, Stream::Stderr, stderr, stderr_partial, resumed),
        ];
        let mut pump = Pump { output, readers };
        match pump.run(Some(frozen)).await {
            Ended::Eof => FrozenPump::default(),
            Ended::Frozen => pump.take_parts(),
        }
    });
    PumpHandle {
        service,
        freeze: Some(freeze),
        task,
    }
}

/// A running pump. Awaiting it waits for the end of both streams (as the
/// task's `JoinHandle` would); dropping it leaves the pump running.
#[derive(Debug)]
pub struct PumpHandle {
    service: Arc<str>,
    /// Dropped with the handle, which the pump takes as "never freeze".
    freeze: Option<oneshot::Sender<()>>,
    task: JoinHandle<FrozenPump>,
}

/// What a pump stopped by [`PumpHandle::freeze`] leaves: enough for
/// [`spawn_pump_resumed`] (here, or in the next daemon) to go on without
/// losing or repeating a byte.
#[derive(Debug, Default)]
pub struct FrozenPump {
    /// Still open, the child's end too: what it writes meanwhile waits in
    /// the pipe. `None` once the stream had ended (its last line, whole or
    /// not, was delivered then).
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
    /// The start of the line being read, without a `\n`: not delivered
    /// anywhere yet (console, `logs`, file), so the resumed pump delivers it
    /// once, whole.
    pub stdout_partial: Vec<u8>,
    pub stderr_partial: Vec<u8>,
}

impl FrozenPump {
    /// Whether any stream is still open, that is whether there is anything
    /// to resume.
    pub fn has_pipes(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some()
    }
}

/// Why a pump could not be frozen. Its pipes are closed by then: the
/// child's next write to them fails.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error(
        "service {service}: its output pump was aborted before it could be frozen; its pipes are closed, restart the service to capture its output again"
    )]
    Aborted { service: String },
    #[error(
        "service {service}: its output pump failed ({reason}); its pipes are closed, restart the service to capture its output again (and report this bug)"
    )]
    Panicked { service: String, reason: String },
}

impl PumpHandle {
    /// Stops the pump once its current read is framed and handed on (to the
    /// console, `logs` and the log file's queue, as every read is), and
    /// returns the pipes and partial lines. Waits for a console that is
    /// behind, not for the disk: call [`ServiceOutput::flush_file`] for
    /// that. A pump that had ended returns no pipes.
    pub async fn freeze(mut self) -> Result<FrozenPump, FreezeError> {
        if let Some(freeze) = self.freeze.take() {
            // A pump that has ended no longer listens: nothing to stop.
            let _ = freeze.send(());
        }
        (&mut self.task).await.map_err(|err| {
            let service = self.service.to_string();
            if err.is_cancelled() {
                FreezeError::Aborted { service }
            } else {
                FreezeError::Panicked {
                    service,
                    reason: err.to_string(),
                }
            }
        })
    }

    /// Stops the pump at once; the partial lines read so far are still
    /// delivered, and the pipes closed.
    pub fn abort(&self) {
        self.task.abort();
    }

    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

impl Future for PumpHandle {
    type Output = Result<(), JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // A pump not asked to freeze returns no pipes: nothing is dropped.
        Pin::new(&mut self.task)
            .poll(cx)
            .map(|ended| ended.map(drop))
    }
}

enum Ended {
    Eof,
    Frozen,
}

struct Pump {
    output: Arc<ServiceOutput>,
    readers: [Reader; 2],
}

/// What woke an idle pump.
enum Woken {
    Freeze,
    Stdout(io::Result<()>),
    Stderr(io::Result<()>),
    FlushBurst,
}

impl Pump {
    async fn run(&mut self, mut freeze: Option<oneshot::Receiver<()>>) -> Ended {
        let output = &self.output;
        let [out, err] = &mut self.readers;
        // When the blocks a burst left waiting go to the file (see
        // `writer::push_from_pump`). Boxed, and only while a burst waits:
        // a timer inline would weigh on every idle service's pump.
        let mut flush_timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        while out.is_open() || err.is_open() {
            // Polled by hand rather than through `select!` over the readers'
            // `readable()` futures: those would be kept in this future while
            // it waits (~170 bytes each), that is by every idle service.
            // The order is a bias: a flooding child keeps its pipe ready,
            // and the freeze must still win at the next turn.
            let woken = std::future::poll_fn(|cx| {
                if let Some(receiver) = &mut freeze {
                    match Pin::new(receiver).poll(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Woken::Freeze),
                        // The handle is gone: "never freeze".
                        Poll::Ready(Err(_)) => freeze = None,
                        Poll::Pending => {}
                    }
                }
                if let Poll::Ready(ready) = out.poll_readable(cx) {
                    return Poll::Ready(Woken::Stdout(ready));
                }
                if let Poll::Ready(ready) = err.poll_readable(cx) {
                    return Poll::Ready(Woken::Stderr(ready));
                }
                if let Some(timer) = &mut flush_timer
                    && timer.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Woken::FlushBurst);
                }
                Poll::Pending
            })
            .await;
            let more = match woken {
                Woken::Freeze => return Ended::Frozen,
                Woken::Stdout(ready) => out.on_ready(ready, output),
                Woken::Stderr(ready) => err.on_ready(ready, output),
                Woken::FlushBurst => {
                    output.flush_burst();
                    flush_timer = None;
                    false
                }
            };
            if flush_timer.is_none() && output.burst_waiting() {
                flush_timer = Some(Box::pin(tokio::time::sleep(super::writer::BURST_GAP)));
            }
            // Before reading more: a console that is behind holds this
            // service's output back (its pipe fills), not the runtime.
            for reader in [&mut *out, &mut *err] {
                reader.hand_to_console(output).await;
            }
            // Likewise a file that is behind (a slow or hung disk). A freeze
            // does not wait for it: it reads no more anyway, and what was
            // read is queued already.
            tokio::select! {
                biased;
                () = freeze_requested(&mut freeze) => return Ended::Frozen,
                () = output.file_room() => {}
            }
            if more {
                // A stream that never runs dry would otherwise keep this
                // worker thread for the whole cooperative budget (128 turns,
                // over 100 MiB), delaying the other services' output.
                tokio::task::yield_now().await;
            }
        }
        // The actor reports the exit once the pump has ended (or after its
        // deadline): by then the last lines are in the file too.
        output.file_flushed().await;
        Ended::Eof
    }

    /// The pipes and partial lines of a frozen pump; what is left to drop
    /// then delivers nothing.
    fn take_parts(&mut self) -> FrozenPump {
        let [out, err] = &mut self.readers;
        let (stdout, stdout_partial) = out.take_parts(&self.output);
        let (stderr, stderr_partial) = err.take_parts(&self.output);
        FrozenPump {
            stdout,
            stderr,
            stdout_partial,
            stderr_partial,
        }
    }
}

/// Resolves once a freeze is asked for; never when the handle is gone.
async fn freeze_requested(freeze: &mut Option<oneshot::Receiver<()>>) {
    if let Some(receiver) = freeze {
        if receiver.await.is_ok() {
            return;
        }
        *freeze = None;
    }
    std::future::pending().await
}

impl Drop for Pump {
    /// The actor may abort a pump whose pipe a grandchild keeps open; the
    /// partial lines read so far are still delivered.
    fn drop(&mut self) {
        for reader in &mut self.readers {
            reader.finish(&self.output);
            // No timer of this pump will send what waits: now, then.
            self.output.flush_burst();
            if let Some(console) = console()
                && !reader.for_console.is_empty()
            {
                console.try_send_blocks(
                    Arc::clone(&self.output.name),
                    std::mem::take(&mut reader.for_console),
                );
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drained {
    /// The pipe is empty for now.
    Empty,
    /// Read `READS_PER_TURN` buffers; there may be more.
    TurnOver,
    /// The stream has ended (or failed).
    Eof,
}

struct Reader {
    stream: Stream,
    /// `None` once closed.
    rx: Option<Receiver>,
    framer: Framer,
    /// Whether growing the pipe was tried already.
    grow_tried: bool,
    /// Held while the pipe is grown; given back when it closes.
    growth: Option<GrowthSlot>,
    /// Blocks read but not yet handed to the console.
    for_console: Vec<LogBlock>,
}

impl Reader {
    /// `partial`: the start of a line a frozen pump had read, framed
    /// first. `resumed`: the pipe may have been grown by that pump.
    fn new(
        output: &Arc<ServiceOutput>,
        stream: Stream,
        fd: Option<OwnedFd>,
        partial: Vec<u8>,
        resumed: bool,
    ) -> Self {
        let rx = fd.and_then(|fd| match receiver(fd) {
            Ok(rx) => Some(rx),
            Err(err) => {
                tracing::warn!(
                    service = %output.name,
                    stream = stream.as_str(),
                    error = %err,
                    "cannot read the service's output stream; closing it"
                );
                None
            }
        });
        let mut reader = Self {
            stream,
            rx,
            framer: Framer::new(),
            grow_tried: false,
            growth: None,
            for_console: Vec::new(),
        };
        if resumed {
            reader.adopt_growth();
        }
        if !partial.is_empty() {
            // Framed as a read: the framer holds it (or, longer than a
            // line may be, cuts it) exactly as the frozen pump's did.
            let mut sink = StreamSink::new(output, stream);
            reader.framer.feed(&partial, &mut sink);
            reader.for_console.extend(sink.commit());
        }
        if !reader.is_open() {
            reader.finish(output);
        }
        reader
    }

    /// A pipe grown by the frozen pump counts in this daemon's budget too
    /// (while there is room), and is not grown again.
    fn adopt_growth(&mut self) {
        let Some(rx) = &self.rx else {
            return;
        };
        let grown = fcntl(rx, FcntlArg::F_GETPIPE_SZ)
            .is_ok_and(|size| usize::try_from(size).is_ok_and(|size| size > DEFAULT_PIPE_BYTES));
        if grown {
            self.grow_tried = true;
            self.growth = GROWN_PIPES.take();
        }
    }

    /// Gives up the pipe (deregistered from the runtime, blocking again)
    /// and the partial line, undelivered.
    fn take_parts(&mut self, output: &Arc<ServiceOutput>) -> (Option<OwnedFd>, Vec<u8>) {
        self.growth = None;
        // Left non-blocking: whoever resumes it reads it so (a thousand
        // services freeze at once; each flag change is a system call).
        let fd = self
            .rx
            .take()
            .and_then(|rx| match rx.into_nonblocking_fd() {
                Ok(fd) => Some(fd),
                Err(err) => {
                    // The descriptor is closed by now: the stream has ended for
                    // the pump that would resume it.
                    read_failed(output, self.stream, &err);
                    None
                }
            });
        if fd.is_none() {
            // No pump will read the rest of this line: it ends here, as at
            // an end of stream.
            self.finish(output);
        }
        (fd, self.framer.take_partial())
    }

    fn is_open(&self) -> bool {
        self.rx.is_some()
    }

    /// Never ready once closed.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &self.rx {
            Some(rx) => rx.poll_read_ready(cx),
            None => Poll::Pending,
        }
    }

    /// Returns whether the pipe may still hold data (the turn ran out).
    fn on_ready(&mut self, ready: io::Result<()>, output: &Arc<ServiceOutput>) -> bool {
        let drained = match ready {
            Ok(()) => self.drain(output),
            Err(err) => {
                read_failed(output, self.stream, &err);
                Drained::Eof
            }
        };
        if drained == Drained::Eof {
            self.rx = None;
            self.growth = None;
            self.finish(output);
        }
        drained == Drained::TurnOver
    }

    /// Reads what the pipe holds, up to `READS_PER_TURN` buffers.
    fn drain(&mut self, output: &Arc<ServiceOutput>) -> Drained {
        let Some(rx) = &self.rx else {
            return Drained::Eof;
        };
        let framer = &mut self.framer;
        let stream = self.stream;
        let mut sink = StreamSink::new(output, stream);
        let mut filled = false;
        // No `.await` in here: the buffer is borrowed from the thread.
        let drained = READ_BUF.with_borrow_mut(|buf| {
            for _ in 0..READS_PER_TURN {
                match rx.try_read(buf) {
                    Ok(0) => return Drained::Eof,
                    Ok(n) => {
                        filled |= n >= GROW_AFTER_READ_BYTES;
                        framer.feed(&buf[..n], &mut sink);
                    }
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Drained::Empty,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        read_failed(output, stream, &err);
                        return Drained::Eof;
                    }
                }
            }
            Drained::TurnOver
        });
        self.for_console.extend(sink.commit());
        if filled && !self.grow_tried {
            self.grow_tried = true;
            self.growth = grow_pipe(rx, output, stream);
        }
        drained
    }

    fn finish(&mut self, output: &Arc<ServiceOutput>) {
        let mut sink = StreamSink::new(output, self.stream);
        self.framer.finish(&mut sink);
        self.for_console.extend(sink.commit());
    }

    async fn hand_to_console(&mut self, output: &ServiceOutput) {
        if self.for_console.is_empty() {
            return;
        }
        let blocks = std::mem::take(&mut self.for_console);
        if let Some(console) = console() {
            console.send_blocks(Arc::clone(&output.name), blocks).await;
        }
    }
}

fn read_failed(output: &ServiceOutput, stream: Stream, err: &io::Error) {
    tracing::warn!(
        service = %output.name,
        stream = stream.as_str(),
        error = %err,
        "reading the service's output failed; closing the stream"
    );
}

/// Best effort: a pipe that cannot grow (a socket or pty, the per-user
/// pipe memory limit reached, [`MAX_GROWN_PIPES`] grown already) keeps
/// working at its size.
fn grow_pipe(rx: &Receiver, output: &ServiceOutput, stream: Stream) -> Option<GrowthSlot> {
    let slot = GROWN_PIPES.take()?;
    let size = i32::try_from(GROWN_PIPE_BYTES).unwrap_or(i32::MAX);
    match fcntl(rx, FcntlArg::F_SETPIPE_SZ(size)) {
        Ok(_) => Some(slot),
        Err(err) => {
            tracing::debug!(
                service = %output.name,
                stream = stream.as_str(),
                error = %err,
                "cannot grow the output pipe; it keeps its size"
            );
            None
        }
    }
}

/// A count of things in use, with a cap.
struct GrowthBudget {
    used: AtomicUsize,
    cap: usize,
}

impl GrowthBudget {
    const fn new(cap: usize) -> Self {
        Self {
            used: AtomicUsize::new(0),
            cap,
        }
    }

    fn take(&'static self) -> Option<GrowthSlot> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.cap).then_some(used + 1)
            })
            .ok()
            .map(|_| GrowthSlot { budget: self })
    }
}

/// One unit of a [`GrowthBudget`], given back on drop.
struct GrowthSlot {
    budget: &'static GrowthBudget,
}

impl Drop for GrowthSlot {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sets O_NONBLOCK ourselves rather than through `Receiver::from_owned_fd`,
/// which also insists on a FIFO: a socket pair or a pty works the same way.
fn receiver(fd: OwnedFd) -> io::Result<Receiver> {
    let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
    if !flags.contains(OFlag::O_NONBLOCK) {
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    }
    Receiver::from_owned_fd_unchecked(fd)
}

/// Delivers framed output of one stream to the service.
struct StreamSink<'a> {
    output: &'a Arc<ServiceOutput>,
    stream: Stream,
    /// Lines framed since the last write to the file.
    unwritten_lines: u64,
    /// Looked up once per batch rather than once per line.
    console: Option<&'static dyn Console>,
    /// Each line becomes a tracing event: there is no console, and the
    /// daemon's log level shows service lines.
    traced: bool,
    /// Blocks for the console, handed over together when the batch ends.
    blocks: Vec<LogBlock>,
}

impl<'a> StreamSink<'a> {
    fn new(output: &'a Arc<ServiceOutput>, stream: Stream) -> Self {
        Self {
            output,
            stream,
            unwritten_lines: 0,
            console: console(),
            traced: console().is_none()
                && tracing::enabled!(target: "service", tracing::Level::INFO),
            blocks: Vec::new(),
        }
    }

    /// Returns the blocks for the console. (Lines are counted by the file
    /// writer, once it has taken care of them.)
    fn commit(self) -> Vec<LogBlock> {
        self.blocks
    }
}

impl Sink for StreamSink<'_> {
    fn wants_lines(&self) -> bool {
        self.traced
    }

    fn counted(&mut self, count: u64) {
        self.unwritten_lines += count;
    }

    fn line(&mut self, line: &[u8]) {
        self.counted(1);
        if self.traced {
            self.output.publish_line(self.stream, line);
        }
    }

    fn write(&mut self, segments: &[&[u8]]) {
        let lines = std::mem::take(&mut self.unwritten_lines);
        let block = self.output.write_file(self.stream, segments, lines);
        if let (Some(block), Some(_)) = (block, self.console) {
            self.blocks.push(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{PipeWriter, Read, Write};
    use std::path::Path;
    use std::time::Duration;

    use super::*;
    use crate::output::MAX_LINE_BYTES;
    use crate::output::logfile::hang::Hang;
    use crate::output::test_support::TempDir;
    use crate::output::writer::{self, MAX_QUEUED_BYTES};

    fn pipe() -> (OwnedFd, PipeWriter) {
        let (reader, writer) = std::io::pipe().unwrap();
        (reader.into(), writer)
    }

    /// Writes `data` from a thread in pieces of varying size (cutting lines
    /// anywhere), then closes the pipe.
    fn write_in_thread(mut writer: PipeWriter, data: Vec<u8>) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let sizes = [1, 7, 100, 4093, 65536, 100_000, 333];
            let mut rest = &data[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let (now, later) = rest.split_at((*size).min(rest.len()));
                writer.write_all(now).unwrap();
                rest = later;
            }
        })
    }

    fn numbered(prefix: &str, range: std::ops::Range<usize>) -> Vec<u8> {
        let mut data = Vec::new();
        for i in range {
            writeln!(
                data,
                "{prefix} {i:08} the quick brown fox jumps over the lazy dog, again and again"
            )
            .unwrap();
        }
        data
    }

    async fn pump_bytes(output: &Arc<ServiceOutput>, stdout: Vec<u8>, stderr: Vec<u8>) {
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        let out = write_in_thread(out_w, stdout);
        let err = write_in_thread(err_w, stderr);
        pump.await.unwrap();
        out.join().unwrap();
        err.join().unwrap();
    }

    /// The live file last, the oldest rotated one first.
    fn read_rotated(path: &Path) -> (usize, Vec<Vec<u8>>) {
        let mut files = Vec::new();
        for k in (1..).map(|k| format!("{}.{k}", path.display())) {
            match fs::read(&k) {
                Ok(bytes) => files.push(bytes),
                Err(_) => break,
            }
        }
        files.reverse();
        files.push(fs::read(path).unwrap());
        let count = fs::read_dir(path.parent().unwrap()).unwrap().count();
        (count, files)
    }

    /// Every running service keeps a pump waiting: its future must not hold
    /// a readiness future per pipe nor a timer while it waits (with them it
    /// was 616 bytes; 288 without).
    #[tokio::test]
    async fn an_idle_pumps_future_is_small() {
        let tmp = TempDir::new("size");
        let output = ServiceOutput::new("size", tmp.path().join("size.log"), 0, 0);
        let (out_r, _out_w) = pipe();
        let (err_r, _err_w) = pipe();
        let readers = [
            Reader::new(&output, Stream::Stdout, Some(out_r), Vec::new(), false),
            Reader::new(&output, Stream::Stderr, Some(err_r), Vec::new(), false),
        ];
        let mut pump = Pump { output, readers };
        let (_freeze, frozen) = oneshot::channel();
        let future = pump.run(Some(frozen));
        let size = std::mem::size_of_val(&future);
        assert!(size <= 320, "an idle pump's future is {size} bytes");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn flood_loses_no_line() {
        let tmp = TempDir::new("flood");
        let path = tmp.path().join("logs/flood.log");
        let output = ServiceOutput::new("flood", path.clone(), 0, 0);
        let data = numbered("out", 0..200_000);
        pump_bytes(&output, data.clone(), Vec::new()).await;
        assert_eq!(output.lines(Stream::Stdout), 200_000);
        assert_eq!(output.lines(Stream::Stderr), 0);
        assert_eq!(output.dropped_bytes(), 0);
        assert!(fs::read(&path).unwrap() == data, "file differs from input");
    }

    /// A burst of small writes is sent to the file in batches, but its
    /// last blocks do not wait for more output (nor for the pipe to close):
    /// the pump's timer sends them. A lone line goes at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_bursts_last_lines_reach_the_file_while_the_pipe_stays_open() {
        let tmp = TempDir::new("burst");
        let path = tmp.path().join("logs/burst.log");
        let output = ServiceOutput::new("burst", path.clone(), 0, 0);
        let (out_r, mut out_w) = pipe();
        let (err_r, err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        // Polled from a blocking thread: the pump runs on the workers.
        let wait_for_file = |expected: Vec<u8>| {
            let path = path.clone();
            tokio::task::spawn_blocking(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while fs::read(&path).ok().as_deref() != Some(&expected[..]) {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the file never got its {} bytes",
                        expected.len()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
        };
        out_w.write_all(b"alone\n").unwrap();
        let mut expected = b"alone\n".to_vec();
        wait_for_file(expected.clone()).await.unwrap();
        // A hundred writes of a line each, far less than a batch in all.
        let burst = numbered("burst", 0..100);
        for line in burst.split_inclusive(|&byte| byte == b'\n') {
            out_w.write_all(line).unwrap();
        }
        expected.extend_from_slice(&burst);
        wait_for_file(expected).await.unwrap();
        drop(out_w);
        drop(err_w);
        pump.await.unwrap();
    }

    fn pipe_size(fd: &impl std::os::fd::AsFd) -> i32 {
        fcntl(fd, FcntlArg::F_GETPIPE_SZ).unwrap()
    }

    #[test]
    fn pipes_grow_within_their_budget_and_give_it_back() {
        static BUDGET: GrowthBudget = GrowthBudget::new(2);
        let first = BUDGET.take().expect("first");
        let second = BUDGET.take().expect("second");
        assert!(BUDGET.take().is_none(), "a third is over the budget");
        drop(first);
        let third = BUDGET.take().expect("a slot given back is free again");
        drop((second, third));
        assert_eq!(BUDGET.used.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_pipe_grows_once_its_service_fills_it() {
        let tmp = TempDir::new("grow");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        let (quiet_r, mut quiet_w) = pipe();
        let (full_r, mut full_w) = pipe();
        let default_size = pipe_size(&full_w);
        // Filled before the pump reads: its first read takes a whole buffer.
        let line = numbered("x", 0..1)[..].to_vec();
        let mut fill = Vec::new();
        while fill.len() + line.len() <= DEFAULT_PIPE_BYTES.min(default_size as usize) {
            fill.extend_from_slice(&line);
        }
        fill.resize(DEFAULT_PIPE_BYTES.min(default_size as usize), b'\n');
        full_w.write_all(&fill).unwrap();
        quiet_w.write_all(b"one line\n").unwrap();
        let pump = spawn_pump(output.clone(), quiet_r, full_r);
        let lines = fill.iter().filter(|&&b| b == b'\n').count() as u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while output.lines(Stream::Stderr) < lines || output.lines(Stream::Stdout) < 1 {
            assert!(std::time::Instant::now() < deadline, "the pump never read");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pipe_size(&full_w) as usize, GROWN_PIPE_BYTES);
        assert_eq!(
            pipe_size(&quiet_w),
            default_size,
            "a quiet pipe stays small"
        );
        drop((quiet_w, full_w));
        pump.await.unwrap();
    }

    #[tokio::test]
    async fn timestamps_and_start_markers_follow_the_options_of_the_moment() {
        let tmp = TempDir::new("stamped");
        let path = tmp.path().join("svc.log");
        let options = crate::output::FileOptions {
            timestamps: true,
            ..Default::default()
        };
        let output = ServiceOutput::with_options("svc", path.clone(), 0, 0, options);
        output.mark_started(41, 0);
        pump_bytes(&output, b"out\n".to_vec(), b"err\n".to_vec()).await;
        // A reload turns them off: raw bytes again, and no marker.
        output.set_file_options(Default::default());
        output.mark_started(42, 1);
        pump_bytes(&output, b"raw\n".to_vec(), Vec::new()).await;
        let text = String::from_utf8(fs::read(&path).unwrap()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(
            lines[0].ends_with("Z --- orchestrator: started pid 41 ---"),
            "{text}"
        );
        let mut stamped: Vec<&str> = lines[1..3]
            .iter()
            .map(|l| l.split_once("Z ").unwrap().1)
            .collect();
        stamped.sort();
        assert_eq!(stamped, ["stderr err", "stdout out"], "{text}");
        assert_eq!(lines[3], "raw", "{text}");
        assert_eq!(output.lines(Stream::Stdout), 2, "markers are no lines");
    }

    #[tokio::test]
    async fn streams_interleave_without_mixing_inside_a_line() {
        let tmp = TempDir::new("interleave");
        let path = tmp.path().join("svc.log");
        let output = ServiceOutput::new("svc", path.clone(), 0, 0);
        let n = 50_000;
        pump_bytes(&output, numbered("out", 0..n), numbered("err", 0..n)).await;
        assert_eq!(output.lines(Stream::Stdout), n as u64);
        assert_eq!(output.lines(Stream::Stderr), n as u64);

        let file = fs::read(&path).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for line in file.split_inclusive(|&b| b == b'\n') {
            match &line[..4] {
                b"out " => out.extend_from_slice(line),
                b"err " => err.extend_from_slice(line),
                _ => panic!("mixed line {:?}", String::from_utf8_lossy(line)),
            }
        }
        assert!(out == numbered("out", 0..n), "stdout lines differ");
        assert!(err == numbered("err", 0..n), "stderr lines differ");
    }

    #[tokio::test]
    async fn raw_bytes_partial_lines_and_long_lines_reach_the_file() {
        let tmp = TempDir::new("raw");
        let path = tmp.path().join("svc.log");
        let output = ServiceOutput::new("svc", path.clone(), 0, 0);
        let mut stdout = b"dos\r\n\n\xff\xfe\x80 not utf-8\n".to_vec();
        stdout.extend(vec![b'L'; MAX_LINE_BYTES + 10]);
        stdout.extend(b"\nno newline at the end");
        pump_bytes(&output, stdout, b"err without newline".to_vec()).await;

        let mut expected = b"dos\r\n\n\xff\xfe\x80 not utf-8\n".to_vec();
        expected.extend(vec![b'L'; MAX_LINE_BYTES]);
        expected.extend(b"\nLLLLLLLLLL\nno newline at the end\n");
        let file = fs::read(&path).unwrap();
        // The stderr line lands before, after or between the stdout writes,
        // but whole.
        let err_line = b"err without newline\n";
        let at = file
            .windows(err_line.len())
            .position(|w| w == err_line)
            .expect("stderr line in the file");
        let mut without_err = file[..at].to_vec();
        without_err.extend(&file[at + err_line.len()..]);
        assert!(
            without_err == expected,
            "file: {:?}",
            String::from_utf8_lossy(&file)
        );
        assert_eq!(output.lines(Stream::Stdout), 6);
        assert_eq!(output.lines(Stream::Stderr), 1);
    }

    #[tokio::test]
    async fn rotation_loses_and_splits_no_line() {
        let tmp = TempDir::new("rotate");
        let path = tmp.path().join("svc.log");
        let max_bytes = 10_000;
        let output = ServiceOutput::new("svc", path.clone(), max_bytes, 1000);
        let data = numbered("out", 0..20_000);
        pump_bytes(&output, data.clone(), Vec::new()).await;

        let (count, files) = read_rotated(&path);
        assert!(files.len() > 100, "{} files", files.len());
        assert!(count <= 1001);
        for file in &files[..files.len() - 1] {
            assert!(file.len() as u64 <= max_bytes && file.len() as u64 > max_bytes - 100);
        }
        for file in &files {
            assert!(file.is_empty() || file.ends_with(b"\n"));
        }
        assert!(files.concat() == data, "lines lost or reordered");
    }

    #[tokio::test]
    async fn rotation_keeps_at_most_max_files() {
        let tmp = TempDir::new("rotate-few");
        let path = tmp.path().join("svc.log");
        let output = ServiceOutput::new("svc", path.clone(), 4096, 3);
        let data = numbered("out", 0..10_000);
        pump_bytes(&output, data.clone(), Vec::new()).await;

        let (count, files) = read_rotated(&path);
        assert_eq!(count, 4);
        assert_eq!(files.len(), 4);
        let kept = files.concat();
        assert!(data.ends_with(&kept));
        assert_eq!(data[data.len() - kept.len() - 1], b'\n');
        assert_eq!(output.dropped_bytes(), 0);
    }

    #[tokio::test]
    async fn unwritable_log_path_still_drains_the_pipes() {
        let tmp = TempDir::new("unwritable");
        let blocker = tmp.path().join("not-a-dir");
        fs::write(&blocker, b"").unwrap();
        let output = ServiceOutput::new("svc", blocker.join("logs/svc.log"), 0, 0);
        let stdout = numbered("out", 0..10_000);
        let stderr = numbered("err", 0..10);
        let total = (stdout.len() + stderr.len()) as u64;
        pump_bytes(&output, stdout, stderr).await;
        assert_eq!(output.lines(Stream::Stdout), 10_000);
        assert_eq!(output.lines(Stream::Stderr), 10);
        assert_eq!(output.dropped_bytes(), total);
    }

    #[tokio::test]
    async fn closed_pipes_end_the_pump_at_once() {
        let tmp = TempDir::new("closed");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        pump_bytes(&output, Vec::new(), Vec::new()).await;
        assert_eq!(output.lines(Stream::Stdout), 0);
        assert!(
            !output.log_path().exists(),
            "no output, no file (nor a descriptor)"
        );
    }

    #[tokio::test]
    async fn aborting_the_pump_delivers_the_partial_line() {
        let tmp = TempDir::new("abort");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        let (out_r, mut out_w) = pipe();
        let (err_r, _err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        // One write below PIPE_BUF arrives in one read.
        out_w.write_all(b"done\npartial").unwrap();
        let seen = async {
            while output.lines(Stream::Stdout) < 1 {
                tokio::task::yield_now().await;
            }
        };
        // The timeout only turns a hang into a failure.
        tokio::time::timeout(Duration::from_secs(30), seen)
            .await
            .unwrap();
        pump.abort();
        assert!(pump.await.unwrap_err().is_cancelled());
        // Counted once the writer has written it.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while output.lines(Stream::Stdout) < 2 {
            assert!(std::time::Instant::now() < deadline, "never written");
            tokio::task::yield_now().await;
        }
        assert_eq!(output.lines(Stream::Stdout), 2);
        assert_eq!(fs::read(output.log_path()).unwrap(), b"done\npartial\n");
    }

    /// Releases a hung file after `after` unless dropped first, so that code
    /// which waits for the file fails the test instead of hanging it.
    struct Watchdog {
        cancel: Option<std::sync::mpsc::Sender<()>>,
        fired: Arc<std::sync::atomic::AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Watchdog {
        fn release_after(hang: Hang, after: Duration) -> Self {
            let (cancel, cancelled) = std::sync::mpsc::channel::<()>();
            let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let flag = Arc::clone(&fired);
            let thread = std::thread::spawn(move || {
                if cancelled.recv_timeout(after).is_err() {
                    flag.store(true, Ordering::SeqCst);
                }
                drop(hang);
            });
            Self {
                cancel: Some(cancel),
                fired,
                thread: Some(thread),
            }
        }

        fn fired(&self) -> bool {
            self.fired.load(Ordering::SeqCst)
        }
    }

    impl Drop for Watchdog {
        fn drop(&mut self) {
            drop(self.cancel.take());
            if let Some(thread) = self.thread.take() {
                let _ = thread.join();
            }
        }
    }

    /// One thread for the runtime, as a hung write on it would freeze all
    /// of it: the other service's lines would wait for the watchdog.
    #[tokio::test]
    async fn a_hung_log_file_holds_back_only_its_own_service() {
        let tmp = TempDir::new("hung");
        let hung_path = tmp.path().join("hung.log");
        let hung = ServiceOutput::new("hung", hung_path.clone(), 0, 0);
        let other = ServiceOutput::new("other", tmp.path().join("other.log"), 0, 0);
        let watchdog = Watchdog::release_after(Hang::new(&hung_path), Duration::from_secs(30));

        // Far more than its queue, a grown pipe and a pump turn hold.
        let hung_data = numbered("hung", 0..200_000);
        assert!(hung_data.len() > 4 * MAX_QUEUED_BYTES as usize);
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        drop(err_w);
        let hung_pump = spawn_pump(hung.clone(), out_r, err_r);
        let hung_writer = write_in_thread(out_w, hung_data.clone());

        let other_data = numbered("other", 0..20_000);
        pump_bytes(&other, other_data.clone(), Vec::new()).await;
        assert!(
            !watchdog.fired(),
            "the other service's output waited for the hung file"
        );
        assert!(fs::read(other.log_path()).unwrap() == other_data);
        assert_eq!(other.lines(Stream::Stdout), 20_000);

        // The hung service is held back, its queue bounded: its pump stops
        // reading, and the rest stays in the pipe and in its writer.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while writer::in_flight(&hung) < MAX_QUEUED_BYTES {
            assert!(
                std::time::Instant::now() < deadline,
                "the pump never filled its queue"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // A few turns of the runtime: the pump does not read on.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        let turn = (READS_PER_TURN * READ_BUF_BYTES) as u64;
        assert!(writer::in_flight(&hung) < MAX_QUEUED_BYTES + turn);
        assert!(!hung_writer.is_finished(), "its child is made to wait");
        assert_eq!(hung.lines(Stream::Stdout), 0);
        assert!(!hung_pump.is_finished());
        assert!(!watchdog.fired());

        // Once the disk answers again, every line arrives, in order.
        drop(watchdog);
        tokio::time::timeout(Duration::from_secs(60), hung_pump)
            .await
            .expect("the pump ends once the disk answers")
            .unwrap();
        tokio::task::spawn_blocking(move || hung_writer.join().unwrap())
            .await
            .unwrap();
        assert_eq!(hung.lines(Stream::Stdout), 200_000);
        assert_eq!(hung.dropped_bytes(), 0);
        assert!(
            fs::read(&hung_path).unwrap() == hung_data,
            "lines lost or reordered"
        );
    }

    /// Polls `done` until it holds, failing after a generous deadline (a
    /// hang becomes a failure; nothing is timed).
    async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn freeze(pump: PumpHandle) -> FrozenPump {
        tokio::time::timeout(Duration::from_secs(60), pump.freeze())
            .await
            .expect("the freeze never returned")
            .expect("the pump froze")
    }

    /// Writes `data` from a thread in pieces of seeded random size (cutting
    /// lines anywhere), and returns the pipe, still open.
    fn flood_in_thread(
        mut writer: PipeWriter,
        data: Vec<u8>,
        seed: u64,
    ) -> std::thread::JoinHandle<PipeWriter> {
        std::thread::spawn(move || {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut rest = &data[..];
            while !rest.is_empty() {
                let size = match rng.u8(..4) {
                    0 => rng.usize(1..16),
                    1 => rng.usize(16..4096),
                    _ => rng.usize(4096..200_000),
                };
                let (now, later) = rest.split_at(size.min(rest.len()));
                writer.write_all(now).unwrap();
                rest = later;
            }
            writer
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn freezing_and_resuming_under_a_flood_loses_and_repeats_no_line() {
        let tmp = TempDir::new("freeze-flood");
        let path = tmp.path().join("svc.log");
        let output = ServiceOutput::new("svc", path.clone(), 0, 0);
        let n = 100_000;
        let (stdout, stderr) = (numbered("out", 0..n), numbered("err", 0..n / 10));
        let total_bytes = (stdout.len() + stderr.len()) as u64;
        let (out_r, out_w) = pipe();
        let (err_r, err_w) = pipe();
        let mut pump = spawn_pump(output.clone(), out_r, err_r);
        let out_thread = flood_in_thread(out_w, stdout.clone(), 1);
        let err_thread = flood_in_thread(err_w, stderr.clone(), 2);

        let mut rng = fastrand::Rng::with_seed(15);
        let freezes = 40;
        let mut carried = 0;
        for _ in 0..freezes {
            // A random point of the flood, by what the pump has read; now
            // and then at once, before the resumed pump's first read. The
            // pipes stay open until the end: each freeze finds them.
            let target = output.file.queued() + rng.u64(0..total_bytes / (freezes / 2));
            if rng.u8(..4) > 0 {
                wait_until("the pump reads on", || {
                    output.file.queued() >= target.min(total_bytes)
                })
                .await;
            }
            let frozen = freeze(pump).await;
            assert!(frozen.stdout.is_some() && frozen.stderr.is_some());
            carried += usize::from(!frozen.stdout_partial.is_empty())
                + usize::from(!frozen.stderr_partial.is_empty());
            pump = spawn_pump_resumed(output.clone(), frozen);
        }
        let writers = tokio::task::spawn_blocking(move || {
            (out_thread.join().unwrap(), err_thread.join().unwrap())
        })
        .await
        .unwrap();
        drop(writers);
        pump.await.unwrap();
        output.flush_file().await;

        eprintln!("{freezes} freezes, {carried} partial lines carried over");
        let file = fs::read(&path).unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for line in file.split_inclusive(|&b| b == b'\n') {
            match &line[..4] {
                b"out " => out.extend_from_slice(line),
                b"err " => err.extend_from_slice(line),
                _ => panic!("mixed line {:?}", String::from_utf8_lossy(line)),
            }
        }
        assert!(out == stdout, "stdout lines lost, repeated or reordered");
        assert!(err == stderr, "stderr lines lost, repeated or reordered");
        assert_eq!(output.lines(Stream::Stdout), n as u64);
        assert_eq!(output.lines(Stream::Stderr), (n / 10) as u64);

        // The ring numbers every line once, across all the pumps.
        let recent = output.recent_lines();
        let seqs: Vec<u64> = recent.iter().map(|line| line.seq).collect();
        let last = (n + n / 10) as u64;
        let first = last + 1 - seqs.len() as u64;
        assert!(
            seqs.iter().copied().eq(first..=last),
            "seq numbers {seqs:?}"
        );
        let kept_out: Vec<u8> = recent
            .iter()
            .filter(|line| line.stream == Stream::Stdout)
            .flat_map(|line| [&line.text[..], b"\n"].concat())
            .collect();
        assert!(stdout.ends_with(&kept_out));
    }

    #[tokio::test]
    async fn a_line_cut_by_a_freeze_is_delivered_once_whole() {
        let tmp = TempDir::new("freeze-split");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        let (out_r, mut out_w) = pipe();
        let (err_r, err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        // One write below PIPE_BUF arrives in one read.
        out_w.write_all(b"first\nsecond-ha").unwrap();
        wait_until("the first line", || output.lines(Stream::Stdout) >= 1).await;
        let frozen = freeze(pump).await;
        assert_eq!(frozen.stdout_partial, b"second-ha");
        assert!(frozen.stderr_partial.is_empty());
        assert!(frozen.stdout.is_some() && frozen.stderr.is_some());
        // Written while no pump reads: it waits in the pipe.
        out_w.write_all(b"lf\nthird\n").unwrap();
        let pump = spawn_pump_resumed(output.clone(), frozen);
        drop((out_w, err_w));
        pump.await.unwrap();
        assert_eq!(
            fs::read(output.log_path()).unwrap(),
            b"first\nsecond-half\nthird\n"
        );
        let texts: Vec<Vec<u8>> = output.tail(10).into_iter().map(|l| l.text).collect();
        assert_eq!(texts, [&b"first"[..], b"second-half", b"third"]);
        assert_eq!(output.lines(Stream::Stdout), 3);
    }

    /// The actor stops waiting for a pump a grandchild keeps open by
    /// dropping its handle: that must not read as a freeze.
    #[tokio::test]
    async fn a_dropped_handle_leaves_the_pump_running() {
        let tmp = TempDir::new("freeze-dropped");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        let (out_r, mut out_w) = pipe();
        let (err_r, err_w) = pipe();
        drop(spawn_pump(output.clone(), out_r, err_r));
        out_w.write_all(b"still read\n").unwrap();
        wait_until("the line", || output.lines(Stream::Stdout) == 1).await;
        drop((out_w, err_w));
    }

    #[tokio::test]
    async fn freezing_an_idle_pump_hands_back_its_open_pipes() {
        let tmp = TempDir::new("freeze-idle");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        let frozen = freeze(pump).await;
        let (Some(stdout), Some(stderr)) = (frozen.stdout, frozen.stderr) else {
            panic!("an idle pump's pipes are open");
        };
        // The very pipes, blocking again, nothing read from them.
        out_w.write_all(b"out\n").unwrap();
        err_w.write_all(b"err\n").unwrap();
        let mut buf = [0u8; 16];
        let n = fs::File::from(stdout).read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"out\n");
        let n = fs::File::from(stderr).read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"err\n");
        assert_eq!(output.lines(Stream::Stdout), 0);
    }

    #[tokio::test]
    async fn an_ended_stream_is_not_resumed_and_its_last_line_is_delivered() {
        let tmp = TempDir::new("freeze-ended");
        let output = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        let (out_r, mut out_w) = pipe();
        let (err_r, mut err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        out_w.write_all(b"out partial").unwrap();
        err_w.write_all(b"err last words").unwrap();
        drop(err_w);
        // The end of stderr delivers its unfinished line.
        wait_until("stderr's last line", || output.lines(Stream::Stderr) == 1).await;
        let frozen = freeze(pump).await;
        assert!(frozen.stdout.is_some(), "stdout is still open");
        assert!(frozen.stderr.is_none(), "stderr had ended");
        assert_eq!(frozen.stdout_partial, b"out partial");
        assert!(frozen.stderr_partial.is_empty(), "delivered already");

        // Once stdout ends too, the pump ends, and a freeze finds no pipes.
        let pump = spawn_pump_resumed(output.clone(), frozen);
        drop(out_w);
        wait_until("the pump's end", || pump.is_finished()).await;
        let frozen = freeze(pump).await;
        assert!(!frozen.has_pipes());
        assert!(frozen.stdout_partial.is_empty() && frozen.stderr_partial.is_empty());
        output.flush_file().await;
        let text = fs::read(output.log_path()).unwrap();
        assert!(
            text == b"err last words\nout partial\n",
            "{:?}",
            String::from_utf8_lossy(&text)
        );
    }

    #[tokio::test]
    async fn a_resumed_output_numbers_and_follows_on_from_the_old_ring() {
        let tmp = TempDir::new("freeze-ring");
        let old = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        pump_bytes(&old, numbered("out", 0..100), numbered("err", 0..10)).await;
        let recent = old.recent_lines();
        assert_eq!(recent.len(), 110);
        let counters = old.counters();
        assert_eq!(counters.stdout_lines, 100);

        // The next daemon: a new output, seeded before its pump starts.
        let new = ServiceOutput::new("svc", tmp.path().join("svc.log"), 0, 0);
        new.resume(recent.clone(), counters);
        assert_eq!(new.recent_lines(), recent);
        assert_eq!(new.tail(3), old.tail(3));
        assert_eq!(new.counters(), counters);
        let (tail, mut live) = new.follow(2);
        assert_eq!(tail, old.tail(2));
        pump_bytes(&new, b"after\n".to_vec(), Vec::new()).await;
        let block = live.try_recv().expect("a follower sees the next line");
        assert_eq!(block.first_seq, 111);
        let last = new.tail(1).pop().unwrap();
        assert_eq!((last.seq, &last.text[..]), (111, &b"after"[..]));
        assert_eq!(new.lines(Stream::Stdout), 101);
    }

    #[tokio::test]
    async fn flush_file_waits_until_every_queued_line_is_in_the_file() {
        let tmp = TempDir::new("freeze-flush");
        let path = tmp.path().join("svc.log");
        let output = ServiceOutput::new("svc", path.clone(), 0, 0);
        let hang = Hang::new(&path);
        let (out_r, mut out_w) = pipe();
        let (err_r, _err_w) = pipe();
        let pump = spawn_pump(output.clone(), out_r, err_r);
        out_w.write_all(b"one\ntwo\n").unwrap();
        wait_until("the lines queued", || output.file.queued() > 0).await;
        let _frozen = freeze(pump).await;
        let flushed = output.flush_file();
        tokio::pin!(flushed);
        tokio::select! {
            biased;
            () = &mut flushed => panic!("flushed while the disk hangs"),
            () = std::future::ready(()) => {}
        }
        drop(hang);
        tokio::time::timeout(Duration::from_secs(60), flushed)
            .await
            .expect("flushed once the disk answers");
        assert_eq!(fs::read(&path).unwrap(), b"one\ntwo\n");
        assert_eq!(output.lines(Stream::Stdout), 2);
    }
}
