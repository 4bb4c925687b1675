//! Lifecycle events: what happened to which service, and when. Published on
//! a broadcast for followers, kept in a bounded in-memory history for
//! `events`, and appended to `data_dir/events.jsonl` (rotated) so history
//! survives a daemon restart.
//!
//! The file is written by a thread of its own, fed by a bounded queue:
//! [`EventBus::emit`] runs on the async runtime and must never wait for a
//! disk. When the writer is stuck (a hung or very slow disk) and its queue
//! is full, events still reach the history, followers and the observer; the
//! file loses them, which is counted ([`EventBus::file_dropped`]) and
//! logged, and their sequence numbers are missing from it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::{Notify, broadcast};

use crate::output::logfile::LogFile;
pub use crate::wire::{Event, EventKind};

/// Events kept in memory for `events` without `-f`.
pub const HISTORY_EVENTS: usize = 1000;
/// Events a follower may fall behind by before it misses some.
const LIVE_CAPACITY: usize = 1024;
const FILE_MAX_BYTES: u64 = 10 * 1024 * 1024;
const FILE_MAX_FILES: u32 = 1;
/// Events waiting for the file at most. Far more than a burst of the whole
/// fleet restarting produces while a healthy disk takes one write.
const FILE_QUEUE_EVENTS: usize = 4096;
/// Events serialised into one write.
const FILE_BATCH_EVENTS: usize = 256;
/// A fleet starting or stopping emits events by the thousand per second,
/// and a writer waiting in `recv` is woken for each (a futex call, made by
/// the emitter under the history lock, and a thread switch: 1400 of them
/// in a stop of 1000 services). An event that comes within
/// [`FILE_BURST_GAP`] of the last write is taken as part of a burst: the
/// writer gathers for [`FILE_BURST_GATHER`] before writing. A lone event
/// is written at once.
const FILE_BURST_GAP: Duration = Duration::from_millis(10);
const FILE_BURST_GATHER: Duration = Duration::from_millis(5);
/// How long [`EventBus::flush`], and dropping the last handle, wait for the
/// queued events to reach the file.
const FILE_FLUSH_WAIT: Duration = Duration::from_secs(2);

type Observer = Box<dyn Fn(&Event) + Send + Sync>;

/// Where events are published. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    live: broadcast::Sender<Arc<Event>>,
    /// Also taken while publishing, so a subscriber's snapshot and its live
    /// receiver neither overlap nor leave a gap, and so that the file gets
    /// events in the order of their numbers.
    history: Mutex<VecDeque<Arc<Event>>>,
    file: Option<FileQueue>,
    next_seq: AtomicU64,
    /// Sees every event synchronously, in each emitter's order (the state
    /// store: it must not miss one, as a lagging receiver could).
    observer: OnceLock<Observer>,
}

/// The sending side of events.jsonl's writer thread.
struct FileQueue {
    /// `None` only while dropping, to close the queue before waiting.
    events: Option<SyncSender<Arc<Event>>>,
    progress: Arc<FileProgress>,
    /// Disconnected when the writer thread ends. (A mutex only to make the
    /// bus `Sync`; it is used once, on drop.)
    finished: Mutex<Receiver<()>>,
}

/// Shared with the writer thread.
#[derive(Default)]
struct FileProgress {
    /// Events queued in all.
    queued: AtomicU64,
    /// Events the writer has taken care of in all (written, or lost to a
    /// write error that the log file reports itself).
    done: AtomicU64,
    /// Events the file lost because its queue was full, in all.
    dropped: AtomicU64,
    /// Events are being dropped and the writer has not caught up yet.
    behind: AtomicBool,
    /// Wakes [`EventBus::flush`].
    written: Notify,
}

impl EventBus {
    /// A bus that only keeps events in memory (tests).
    pub fn in_memory() -> Self {
        Self::build(None, VecDeque::new(), 1)
    }

    /// A bus persisted to `path`, with the history and sequence numbers
    /// carried on from what an earlier daemon left there.
    /// A file that is not a regular file of our uid is not read nor
    /// appended to: it is set aside (its history is not ours to show), said
    /// loudly, and an `untrusted_file_ignored` event opens the new file.
    pub fn persisted(path: PathBuf) -> Self {
        let refused = refuse_untrusted(&path);
        let history = match refused {
            Some(_) => VecDeque::new(),
            None => read_tail(&path, HISTORY_EVENTS),
        };
        let next_seq = history.back().map_or(1, |e| e.seq + 1);
        let file = FileQueue::start(path.clone());
        let bus = Self::build(file, history, next_seq);
        if let Some(reason) = refused {
            bus.emit(
                None,
                EventKind::UntrustedFileIgnored {
                    path: path.display().to_string(),
                    reason,
                },
            );
        }
        bus
    }

    fn build(file: Option<FileQueue>, history: VecDeque<Arc<Event>>, next_seq: u64) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        EventBus {
            inner: Arc::new(Inner {
                live,
                history: Mutex::new(history),
                file,
                next_seq: AtomicU64::new(next_seq),
                observer: OnceLock::new(),
            }),
        }
    }

    /// Never waits for a disk (see the module's documentation).
    pub fn emit(&self, service: Option<&str>, kind: EventKind) {
        let inner = &*self.inner;
        let mut history = inner.history.lock().unwrap_or_else(PoisonError::into_inner);
        let event = Arc::new(Event {
            seq: inner.next_seq.fetch_add(1, Ordering::Relaxed),
            time: rfc3339(SystemTime::now()),
            service: service.map(str::to_owned),
            kind,
        });
        if history.len() == HISTORY_EVENTS {
            history.pop_front();
        }
        history.push_back(Arc::clone(&event));
        // No receivers is the normal, idle case.
        let _ = inner.live.send(Arc::clone(&event));
        if let Some(file) = &inner.file {
            file.push(&event);
        }
        drop(history);
        if let Some(observer) = inner.observer.get() {
            observer(&event);
        }
    }

    /// Install the one synchronous observer; later calls are ignored.
    pub fn set_observer(&self, observer: impl Fn(&Event) + Send + Sync + 'static) {
        let _ = self.inner.observer.set(Box::new(observer));
    }

    /// The kept history, oldest first.
    pub fn history(&self) -> Vec<Arc<Event>> {
        let history = self
            .inner
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        history.iter().cloned().collect()
    }

    /// The history and a receiver of every later event, with nothing lost
    /// or repeated between the two.
    pub fn subscribe(&self) -> (Vec<Arc<Event>>, broadcast::Receiver<Arc<Event>>) {
        let history = self
            .inner
            .history
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let receiver = self.inner.live.subscribe();
        (history.iter().cloned().collect(), receiver)
    }

    /// Events the file lost so far because its writer could not keep up.
    pub fn file_dropped(&self) -> u64 {
        self.inner
            .file
            .as_ref()
            .map_or(0, |file| file.progress.dropped.load(Ordering::Relaxed))
    }

    /// Waits, as a task, until the events emitted so far are in the file,
    /// for [`FILE_FLUSH_WAIT`] at most; returns whether they are. Call
    /// before the daemon exits.
    pub async fn flush(&self) -> bool {
        let Some(file) = &self.inner.file else {
            return true;
        };
        let progress = &file.progress;
        let target = progress.queued.load(Ordering::Acquire);
        let caught_up = async {
            loop {
                let written = progress.written.notified();
                tokio::pin!(written);
                // Registered before the check, so a write in between wakes it.
                written.as_mut().enable();
                if progress.done.load(Ordering::Acquire) >= target {
                    return;
                }
                written.await;
            }
        };
        tokio::time::timeout(FILE_FLUSH_WAIT, caught_up)
            .await
            .is_ok()
    }
}

impl FileQueue {
    /// Starts the writer thread; without one, events are not persisted
    /// (said once in the log).
    fn start(path: PathBuf) -> Option<Self> {
        let (events, queue) = mpsc::sync_channel(FILE_QUEUE_EVENTS);
        let (finished_tx, finished) = mpsc::sync_channel(0);
        let progress = Arc::new(FileProgress::default());
        let shared = Arc::clone(&progress);
        let spawned = std::thread::Builder::new()
            .name("events-writer".into())
            .spawn(move || {
                write_events(&path, &queue, &shared);
                drop(finished_tx);
            });
        match spawned {
            Ok(_) => Some(Self {
                events: Some(events),
                progress,
                finished: Mutex::new(finished),
            }),
            Err(err) => {
                tracing::warn!(error = %err, "cannot start the events file writer; events are kept in memory only");
                None
            }
        }
    }

    fn push(&self, event: &Arc<Event>) {
        let Some(events) = &self.events else {
            return;
        };
        let progress = &*self.progress;
        match events.try_send(Arc::clone(event)) {
            Ok(()) => {
                progress.queued.fetch_add(1, Ordering::AcqRel);
            }
            Err(TrySendError::Full(_)) => {
                progress.dropped.fetch_add(1, Ordering::Relaxed);
                if !progress.behind.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        "events.jsonl is not keeping up (a hung or slow disk?): events are \
                         dropped from the file, still kept in memory and sent to followers, \
                         until it catches up"
                    );
                }
            }
            // The writer thread is gone (it panicked): nothing to do.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }
}

impl Drop for FileQueue {
    /// The last handle of a daemon that exits: what was emitted is written
    /// before it goes, unless the disk is stuck.
    fn drop(&mut self) {
        drop(self.events.take());
        let finished = self
            .finished
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        let _ = finished.recv_timeout(FILE_FLUSH_WAIT);
    }
}

/// The writer thread: one write per batch of queued events, until the bus
/// is dropped.
fn write_events(path: &Path, queue: &Receiver<Arc<Event>>, progress: &FileProgress) {
    let mut file = LogFile::new(
        "events",
        path.to_owned(),
        FILE_MAX_BYTES,
        FILE_MAX_FILES,
        Instant::now(),
    )
    .for_events();
    if ends_without_newline(path) {
        // End the torn line, so the next event starts a line of its own.
        file.write(&[b"\n"], Instant::now());
    }
    let mut reported = 0;
    let mut buf = Vec::new();
    let mut last_write: Option<Instant> = None;
    while let Ok(first) = queue.recv() {
        if last_write.is_some_and(|at| at.elapsed() < FILE_BURST_GAP) {
            std::thread::sleep(FILE_BURST_GATHER);
        }
        buf.clear();
        let mut count = 0;
        for event in std::iter::once(first).chain(queue.try_iter().take(FILE_BATCH_EVENTS - 1)) {
            let start = buf.len();
            match serde_json::to_writer(&mut buf, &*event) {
                Ok(()) => buf.push(b'\n'),
                Err(_) => buf.truncate(start),
            }
            count += 1;
        }
        // Errors are the log file's to report (and to retry).
        file.write(&[&buf], Instant::now());
        last_write = Some(Instant::now());
        progress.done.fetch_add(count, Ordering::AcqRel);
        progress.written.notify_waiters();
        // Caught up: the batch emptied the queue.
        if count < FILE_BATCH_EVENTS as u64 && progress.behind.swap(false, Ordering::AcqRel) {
            let dropped = progress.dropped.load(Ordering::Relaxed);
            tracing::warn!(
                dropped = dropped - reported,
                dropped_in_all = dropped,
                "events.jsonl caught up; events emitted while it was stuck are missing from it"
            );
            reported = dropped;
        }
    }
}

/// Why `path` is not ours to read or append to, after setting it aside;
/// `None` when it is ours or absent.
fn refuse_untrusted(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).ok()?;
    let uid = crate::state::our_uid();
    let reason = if meta.file_type().is_symlink() {
        "it is a symbolic link".to_owned()
    } else if !meta.is_file() {
        "it is not a regular file".to_owned()
    } else if meta.uid() != uid {
        format!(
            "it is owned by uid {}, not by this daemon's uid {uid}",
            meta.uid()
        )
    } else {
        return None;
    };
    match crate::state::set_aside(path) {
        Ok(aside) => tracing::error!(
            "ignoring {}: {reason}; moved to {} and starting a new one",
            path.display(),
            aside.display()
        ),
        Err(error) => tracing::error!(
            "ignoring {}: {reason}; and cannot move it aside ({error}): events are not persisted",
            path.display()
        ),
    }
    Some(reason)
}

/// The last `limit` events of a file; lines that don't parse (a torn write
/// from a crash) are skipped.
fn read_tail(path: &Path, limit: usize) -> VecDeque<Arc<Event>> {
    let mut events = VecDeque::new();
    let Ok(file) = std::fs::File::open(path) else {
        return events;
    };
    for line in BufReader::new(file).split(b'\n').map_while(Result::ok) {
        if let Ok(event) = serde_json::from_slice::<Event>(&line) {
            if events.len() == limit {
                events.pop_front();
            }
            events.push_back(Arc::new(event));
        }
    }
    events
}

fn ends_without_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut last = [0u8; 1];
    std::fs::File::open(path)
        .and_then(|mut file| {
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)
        })
        .is_ok_and(|()| last[0] != b'\n')
}

/// `2026-11-26T04:05:06.789Z`: UTC, milliseconds. A time before 1970 is
/// written as 1970's start, one after 9999 as 9999's end (the format has
/// four digits for the year).
pub fn rfc3339(time: SystemTime) -> String {
    const LAST: Duration = Duration::from_millis(253_402_300_799_999);
    let since = time
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .min(LAST);
    humantime::format_rfc3339_millis(UNIX_EPOCH + since).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::logfile::hang::Hang;

    #[test]
    fn formats_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_665_906_789);
        assert_eq!(rfc3339(t), "2026-11-26T04:05:06.789Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
        // Outside what the format can say: the nearest it can, no panic.
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(rfc3339(before), "1970-01-01T00:00:00.000Z");
        let after = UNIX_EPOCH + Duration::from_secs(300_000_000_000);
        assert_eq!(rfc3339(after), "9999-12-31T23:59:59.999Z");
    }

    fn file_seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|line| serde_json::from_str::<Event>(line).unwrap().seq)
            .collect()
    }

    #[test]
    fn emit_never_waits_for_a_hung_events_file() {
        let dir =
            std::env::temp_dir().join(format!("orchestrator-events-hung-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("events.jsonl");
        let bus = EventBus::persisted(path.clone());
        let hang = Hang::new(&path);
        // More than the queue and the writer's batch hold.
        let total = (FILE_QUEUE_EVENTS + FILE_BATCH_EVENTS + 100) as u64;
        let (done, returned) = mpsc::channel();
        let emitter = bus.clone();
        let (subscribed, mut live) = bus.subscribe();
        assert!(subscribed.is_empty());
        // On a thread of its own, so that an emit stuck on the file fails
        // the test instead of hanging it.
        std::thread::spawn(move || {
            for _ in 0..total {
                emitter.emit(Some("a"), EventKind::StopRequested);
            }
            let _ = done.send(());
        });
        let all_returned = returned.recv_timeout(Duration::from_secs(30)).is_ok();
        drop(hang);
        assert!(all_returned, "emit waited for the hung file");
        assert_eq!(bus.history().last().unwrap().seq, total);
        let mut last_live = 0;
        loop {
            match live.try_recv() {
                Ok(event) => last_live = event.seq,
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        assert_eq!(last_live, total, "followers got them");
        let dropped = bus.file_dropped();
        assert!(dropped >= 100 && dropped < total, "{dropped} dropped");

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        assert!(runtime.block_on(bus.flush()), "the file caught up");
        let seqs = file_seqs(&path);
        assert_eq!(seqs.len() as u64, total - dropped);
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
        // Once caught up, events reach the file again.
        bus.emit(None, EventKind::Stopped);
        assert!(runtime.block_on(bus.flush()));
        assert_eq!(file_seqs(&path).last(), Some(&(total + 1)));
        drop(bus);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn events_serialise_flat_with_a_tag() {
        let event = Event {
            seq: 7,
            time: "t".into(),
            service: Some("api".into()),
            kind: EventKind::RestartScheduled {
                delay_ms: 1500,
                failures: 2,
                start_limited: false,
            },
        };
        let json = serde_json::to_string(&event).unwrap();
        assert_eq!(
            json,
            r#"{"seq":7,"time":"t","service":"api","event":"restart_scheduled","delay_ms":1500,"failures":2}"#
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), event);
    }

    #[test]
    fn subscribe_sees_history_then_live_without_gaps() {
        let bus = EventBus::in_memory();
        bus.emit(Some("a"), EventKind::StopRequested);
        let (history, mut live) = bus.subscribe();
        bus.emit(Some("a"), EventKind::Stopped);
        assert_eq!(history.len(), 1);
        assert_eq!(history[0].seq, 1);
        let next = live.try_recv().unwrap();
        assert_eq!((next.seq, &next.kind), (2, &EventKind::Stopped));
    }

    #[test]
    fn history_is_bounded() {
        let bus = EventBus::in_memory();
        for _ in 0..HISTORY_EVENTS + 5 {
            bus.emit(None, EventKind::StopRequested);
        }
        let history = bus.history();
        assert_eq!(history.len(), HISTORY_EVENTS);
        assert_eq!(history[0].seq, 6);
    }

    #[test]
    fn persisted_history_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("orchestrator-events-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("events.jsonl");
        {
            let bus = EventBus::persisted(path.clone());
            bus.emit(Some("a"), EventKind::Started { pid: 5 });
            bus.emit(Some("a"), EventKind::Stopped);
        }
        // A torn last line, as a crash mid-write would leave.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"seq\":3,\"ti"))
            .unwrap();
        let bus = EventBus::persisted(path);
        let history = bus.history();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].kind, EventKind::Stopped);
        bus.emit(None, EventKind::StopRequested);
        assert_eq!(bus.history()[2].seq, 3, "numbering carries on");
        drop(bus);
        let history = EventBus::persisted(dir.join("events.jsonl")).history();
        assert_eq!(history.len(), 3, "the event after the torn line was kept");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
