//! Capture of the services' stdout and stderr.
//!
//! A pump task per child reads both pipes, frames lines ([`framing`]) and
//! hands each line to [`ServiceOutput`], which sends it to the orchestrator's
//! log (tracing) and appends the lines of each read to the service's log file
//! ([`logfile`]) in one write. The pipe is drained as fast as the child
//! fills it: a failing disk costs dropped file bytes, never a blocked child.

mod framing;
pub(crate) mod logfile;
mod pump;
mod recent;

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use crate::events::{EventBus, EventKind};
use std::time::Instant;

use logfile::LogFile;
pub use pump::spawn_pump;
use recent::Recent;
pub use recent::{LogBlock, LogLine, RECENT_MAX_BYTES};

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

/// Which pipe of the child a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }

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
    /// Held only for the synchronous write of one batch, never across an
    /// `.await`; both streams (and an old generation still draining) take it,
    /// which is what keeps their lines from mixing.
    file: Mutex<LogFile>,
    /// Held only to push or copy out blocks; never across an `.await`.
    recent: Mutex<Recent>,
    events: OnceLock<EventBus>,
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
        let file = LogFile::new(
            service,
            log_path.clone(),
            max_bytes,
            max_files,
            Instant::now(),
        );
        Arc::new(Self {
            name: service.into(),
            log_path,
            lines: [AtomicU64::new(0), AtomicU64::new(0)],
            dropped: AtomicU64::new(0),
            file: Mutex::new(file),
            recent: Mutex::new(Recent::default()),
            events: OnceLock::new(),
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Bytes that could not be written to the log file so far.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Lines seen so far on `stream`, whether or not the file took them.
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

    /// Where to report that the log file stopped (or resumed) taking lines.
    pub fn attach_events(&self, events: EventBus) {
        let _ = self.events.set(events);
    }

    /// Appends `line_count` whole lines to the log file and the recent
    /// lines; returns the block kept, for the console.
    fn write_file(&self, stream: Stream, segments: &[&[u8]], line_count: u64) -> Option<LogBlock> {
        let block = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stream, segments, line_count);
        let (dropped, was_failing, failing) = {
            let mut file = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            let was_failing = file.is_failing();
            let dropped = file.write(segments, Instant::now());
            (dropped, was_failing, file.is_failing())
        };
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
        block
    }

    fn count_lines(&self, stream: Stream, lines: u64) {
        if lines > 0 {
            self.lines[stream.index()].fetch_add(lines, Ordering::Relaxed);
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
