//! Capture of the services' stdout and stderr.
//!
//! A pump task per child reads both pipes, frames lines ([`framing`]) and
//! hands each line to [`ServiceOutput`], which sends it to the orchestrator's
//! log (tracing or the console), keeps it for `logs`, and queues the lines
//! of each read for the service's log file ([`logfile`]), written by a
//! thread of [`writer`]'s pool. A failing disk costs dropped file bytes,
//! never a blocked child; a hung one holds back only its own services.

mod framing;
pub(crate) mod logfile;
mod pump;
mod recent;
mod writer;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::events::{EventBus, EventKind};

use logfile::LogFile;
pub use pump::{FreezeError, FrozenPump, PumpHandle, spawn_pump, spawn_pump_resumed};
use recent::Recent;
pub use recent::{LogBlock, LogLine, RECENT_MAX_BYTES};
use writer::FileQueue;

/// Longer lines are split into pieces of this size, each a line of its own;
/// nothing is dropped. Bounds the memory a stream holds for a partial line.
pub const MAX_LINE_BYTES: usize = 16 * 1024;

/// The daemon's own log of service lines, fed whole blocks: one hand-over
/// per turn of a pump instead of one tracing event (and one write) per line,
/// which would cap a flooding service far below the pipe's speed.
pub trait Console: Send + Sync + 'static {
    /// Hands over the blocks just kept for `logs` (their bytes are shared,
    /// not copied), in order per service and stream. Waits while the console
    /// is behind: that is the back-pressure that keeps every line, and it
    /// waits as a task, so the runtime goes on serving everything else.
    fn send_blocks(
        &self,
        service: Arc<str>,
        blocks: Vec<LogBlock>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

    /// As `send_blocks` without waiting: when there is no room, the blocks
    /// are dropped (they are still in the log file). For a pump being torn
    /// down, which cannot wait.
    fn try_send_blocks(&self, service: Arc<str>, blocks: Vec<LogBlock>);
}

static CONSOLE: OnceLock<Box<dyn Console>> = OnceLock::new();

/// Install the process-wide console (once; later calls return false).
/// Without one, each line is a tracing event (target `service`).
pub fn set_console(console: impl Console) -> bool {
    CONSOLE.set(Box::new(console)).is_ok()
}

fn console() -> Option<&'static dyn Console> {
    CONSOLE.get().map(|console| &**console)
}

pub use crate::wire::Stream;

/// What a service's log file holds beyond the raw bytes, and when it is
/// rotated besides by size. The default is the raw file of before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileOptions {
    /// Each line prefixed with its time and stream, and a marker line at
    /// each start of the service.
    pub timestamps: bool,
    pub max_age: Option<Duration>,
    /// Rotated files are gzipped, on a thread of their own.
    pub compress: bool,
}

/// A service's output counts, carried over an upgrade by
/// [`ServiceOutput::counters`] and [`ServiceOutput::resume`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct OutputCounters {
    pub stdout_lines: u64,
    pub stderr_lines: u64,
    pub dropped_bytes: u64,
}

/// `first_seq` of a block queued for the file only (a start marker): it
/// is written as it is, never numbered, kept for `logs` or shown.
const MARKER_SEQ: u64 = u64::MAX;

impl Stream {
    fn index(self) -> usize {
        match self {
            Stream::Stdout => 0,
            Stream::Stderr => 1,
        }
    }
}

/// The output of one service, shared by all its generations: a restarted
/// child appends to the same log file, and the counters keep counting.
pub struct ServiceOutput {
    name: Arc<str>,
    log_path: PathBuf,
    lines: [AtomicU64; 2],
    dropped: AtomicU64,
    /// Both streams (and an old generation still draining) queue whole
    /// blocks here, under `recent`'s lock, which is what keeps their lines
    /// from mixing and the file in the order of `logs`.
    file: FileQueue,
    /// Held only to push or copy out blocks (and queue them for the file);
    /// never across an `.await`.
    recent: Mutex<Recent>,
    events: OnceLock<EventBus>,
    /// A reload may change it while the service runs.
    timestamps: AtomicBool,
}

impl ServiceOutput {
    /// Opens (creating as needed) the log file. Never fails: a log file that
    /// cannot be opened is reported once, and opening is retried on later
    /// writes, at most once a second; meanwhile lines still reach tracing and
    /// the bytes are counted in [`ServiceOutput::dropped_bytes`].
    ///
    /// `max_bytes == 0` disables rotation; `max_files == 0` starts the live
    /// file over instead of keeping rotated ones.
    pub fn new(service: &str, log_path: PathBuf, max_bytes: u64, max_files: u32) -> Arc<Self> {
        Self::with_options(
            service,
            log_path,
            max_bytes,
            max_files,
            FileOptions::default(),
        )
    }

    pub fn with_options(
        service: &str,
        log_path: PathBuf,
        max_bytes: u64,
        max_files: u32,
        options: FileOptions,
    ) -> Arc<Self> {
        let file = LogFile::new(
            service,
            log_path.clone(),
            max_bytes,
            max_files,
            Instant::now(),
        )
        .with_options(options);
        Arc::new(Self {
            name: service.into(),
            log_path,
            lines: [AtomicU64::new(0), AtomicU64::new(0)],
            dropped: AtomicU64::new(0),
            file: FileQueue::new(file),
            recent: Mutex::new(Recent::default()),
            events: OnceLock::new(),
            timestamps: AtomicBool::new(options.timestamps),
        })
    }

    /// Marks a (re)start of the service in its log file, with timestamps on:
    /// call before the new process's pump starts, so the marker comes
    /// before its first line. Without timestamps the file stays the
    /// service's bytes only.
    pub fn mark_started(self: &Arc<Self>, pid: u32, restarts: u64) {
        if !self.timestamps.load(Ordering::Relaxed) {
            return;
        }
        let bytes = logfile::start_marker(SystemTime::now(), pid, restarts);
        // Under `recent`'s lock, as every block queued for the file.
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        writer::push(
            self,
            LogBlock {
                first_seq: MARKER_SEQ,
                time: SystemTime::now(),
                stream: Stream::Stdout,
                line_count: 0,
                bytes: Arc::new(bytes),
            },
        );
        drop(recent);
    }

    /// A reload's new options, from the next lines written on (blocks
    /// queued already included). Never waits for the disk.
    pub fn set_file_options(&self, options: FileOptions) {
        self.timestamps.store(options.timestamps, Ordering::Relaxed);
        self.file.set_options(options);
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Bytes that could not be written to the log file so far.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines seen so far on `stream` and taken care of for the file: written
    /// there, or dropped from it on a write error.
    pub fn lines(&self, stream: Stream) -> u64 {
        self.lines[stream.index()].load(Ordering::Relaxed)
    }

    /// Without a console, every line of the service passes here once, in
    /// order per stream, without its `\n`, to become a tracing event.
    fn publish_line(&self, stream: Stream, line: &[u8]) {
        tracing::info!(
            target: "service",
            service = %self.name,
            stream = stream.as_str(),
            "{}",
            String::from_utf8_lossy(line)
        );
    }

    /// The last `n` lines (both streams, in order), oldest first.
    pub fn tail(&self, n: usize) -> Vec<LogLine> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .tail(n)
    }

    /// The last `n` lines and a receiver of every later block of lines.
    pub fn follow(&self, n: usize) -> (Vec<LogLine>, tokio::sync::broadcast::Receiver<LogBlock>) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .follow(n)
    }

    /// Every line kept for `logs`, oldest first: with [`ServiceOutput::counters`],
    /// what the next daemon needs to go on numbering and counting (see
    /// [`ServiceOutput::resume`]).
    pub fn recent_lines(&self) -> Vec<LogLine> {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .all()
    }

    /// The counts so far, for a hand-over: final once the pump is frozen
    /// and [`ServiceOutput::flush_file`] has returned.
    pub fn counters(&self) -> OutputCounters {
        OutputCounters {
            stdout_lines: self.lines(Stream::Stdout),
            stderr_lines: self.lines(Stream::Stderr),
            dropped_bytes: self.dropped_bytes(),
        }
    }

    /// Goes on from an earlier daemon's output of this service: its recent
    /// lines are kept for `logs` with their numbers (the next line is
    /// numbered after the last of them), and its counts are added to these.
    /// Call before the first line (before the resumed pump starts): lines
    /// kept already would come after the seeded ones, numbered apart.
    pub fn resume(&self, recent: Vec<LogLine>, counters: OutputCounters) {
        self.recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .seed(recent);
        self.lines[Stream::Stdout.index()].fetch_add(counters.stdout_lines, Ordering::Relaxed);
        self.lines[Stream::Stderr.index()].fetch_add(counters.stderr_lines, Ordering::Relaxed);
        self.dropped
            .fetch_add(counters.dropped_bytes, Ordering::Relaxed);
    }

    /// Waits, as a task, until every line queued for the log file so far is
    /// written there (or counted as dropped, on a write error), and a rotated
    /// file being gzipped is done: once it returns, the file ends at a line
    /// boundary and another process may append to it. Freeze the pump first,
    /// or lines read meanwhile may come after. Waits as long as the disk
    /// does (a hung one: for good); bound it with a timeout.
    pub async fn flush_file(self: &Arc<Self>) {
        self.file_flushed().await;
        // Nearly always nothing to wait for: a thousand services freezing
        // at once must not each take a blocking thread.
        if self.file.compressing_finished() {
            return;
        }
        let output = Arc::clone(self);
        // Joining the gzip thread blocks, and the file's lock may be held
        // over a slow write: not on a runtime worker.
        let _ = tokio::task::spawn_blocking(move || output.file.finish_compressing()).await;
    }

    /// Where to report that the log file stopped (or resumed) taking lines.
    pub fn attach_events(&self, events: EventBus) {
        let _ = self.events.set(events);
    }

    /// Keeps `line_count` whole lines for `logs` and queues them for the
    /// log file; returns the block kept, for the console. Never waits for
    /// the disk: see [`ServiceOutput::file_room`].
    fn write_file(
        self: &Arc<Self>,
        stream: Stream,
        segments: &[&[u8]],
        line_count: u64,
    ) -> Option<LogBlock> {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let block = recent.push(stream, segments, line_count);
        let for_file = match &block {
            Some(block) => block.clone(),
            // Bytes without a line (not what the framer passes): still the
            // file's, whole.
            None if segments.iter().any(|s| !s.is_empty()) => LogBlock {
                first_seq: 0,
                time: SystemTime::now(),
                stream,
                line_count,
                bytes: Arc::new(segments.concat()),
            },
            None => return None,
        };
        writer::push_from_pump(self, for_file);
        drop(recent);
        block
    }

    /// Whether a burst's blocks wait for [`Self::flush_burst`].
    fn burst_waiting(&self) -> bool {
        self.file.has_deferred()
    }

    /// Sends the blocks a burst left waiting to the file.
    fn flush_burst(self: &Arc<Self>) {
        writer::flush(self);
    }

    /// Waits, as a task, while too much of this service's output waits for
    /// its file: its pump reads no more, so its pipe fills and the service
    /// waits in its own `write`, and nothing else does.
    async fn file_room(&self) {
        self.file.room().await;
    }

    /// Waits, as a task, until every line queued so far is in the file (or
    /// dropped from it on an error).
    async fn file_flushed(self: &Arc<Self>) {
        self.flush_burst();
        self.file.done_up_to(self.file.queued()).await;
    }

    /// Called by the writer thread after a batch went to the file.
    fn file_written(&self, batch: &[LogBlock], dropped: u64, was_failing: bool, failing: bool) {
        let mut lines = [0u64; 2];
        for block in batch {
            lines[block.stream.index()] += block.line_count;
        }
        for stream in [Stream::Stdout, Stream::Stderr] {
            let n = lines[stream.index()];
            if n > 0 {
                self.lines[stream.index()].fetch_add(n, Ordering::Relaxed);
            }
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
        }
        if was_failing != failing
            && let Some(events) = self.events.get()
        {
            let path = self.log_path.display().to_string();
            let kind = if failing {
                EventKind::LogWriteFailed { path }
            } else {
                EventKind::LogWriteResumed {
                    path,
                    dropped_bytes: self.dropped_bytes(),
                }
            };
            events.emit(Some(&self.name), kind);
        }
    }
}

impl fmt::Debug for ServiceOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceOutput")
            .field("service", &self.name)
            .field("log_path", &self.log_path)
            .field("stdout_lines", &self.lines(Stream::Stdout))
            .field("stderr_lines", &self.lines(Stream::Stderr))
            .field("dropped_bytes", &self.dropped_bytes())
            .finish()
    }
}

#[cfg(test)]
mod test_support {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A directory removed on drop (no tempfile crate in this workspace).
    pub(crate) struct TempDir(PathBuf);

    impl TempDir {
        pub(crate) fn new(label: &str) -> Self {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "orchestrator-output-{}-{label}-{n}",
                std::process::id()
            ));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        pub(crate) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
