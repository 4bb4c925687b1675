//! Lifecycle events: what happened to which service, and when. Published on
//! a broadcast for followers, kept in a bounded in-memory history for
//! `events`, and appended to `data_dir/events.jsonl` (rotated) so history
//! survives a daemon restart.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::broadcast;

use crate::output::logfile::LogFile;
pub use crate::wire::{Event, EventKind};

/// Events kept in memory for `events` without `-f`.
pub const HISTORY_EVENTS: usize = 1000;
/// Events a follower may fall behind by before it misses some.
const LIVE_CAPACITY: usize = 1024;
const FILE_MAX_BYTES: u64 = 10 * 1024 * 1024;
const FILE_MAX_FILES: u32 = 1;

type Observer = Box<dyn Fn(&Event) + Send + Sync>;

/// Where events are published. Cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    inner: Arc<Inner>,
}

struct Inner {
    live: broadcast::Sender<Arc<Event>>,
    /// Also taken while publishing, so a subscriber's snapshot and its live
    /// receiver neither overlap nor leave a gap.
    history: Mutex<VecDeque<Arc<Event>>>,
    file: Option<Mutex<LogFile>>,
    next_seq: AtomicU64,
    /// Sees every event synchronously, in each emitter's order (the state
    /// store: it must not miss one, as a lagging receiver could).
    observer: OnceLock<Observer>,
}

impl EventBus {
    /// A bus that only keeps events in memory (tests).
    pub fn in_memory() -> Self {
        Self::build(None, VecDeque::new(), 1)
    }

    /// A bus persisted to `path`, with the history and sequence numbers
    /// carried on from what an earlier daemon left there.
    pub fn persisted(path: PathBuf) -> Self {
        let history = read_tail(&path, HISTORY_EVENTS);
        let next_seq = history.back().map_or(1, |e| e.seq + 1);
        let torn = ends_without_newline(&path);
        let mut file = LogFile::new(
            "events",
            path,
            FILE_MAX_BYTES,
            FILE_MAX_FILES,
            std::time::Instant::now(),
        );
        if torn {
            // End the torn line, so the next event starts a line of its own.
            file.write(&[b"\n"], std::time::Instant::now());
        }
        Self::build(Some(file), history, next_seq)
    }

    fn build(file: Option<LogFile>, history: VecDeque<Arc<Event>>, next_seq: u64) -> Self {
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        EventBus {
            inner: Arc::new(Inner {
                live,
                history: Mutex::new(history),
                file: file.map(Mutex::new),
                next_seq: AtomicU64::new(next_seq),
                observer: OnceLock::new(),
            }),
        }
    }

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
        drop(history);
        if let Some(observer) = inner.observer.get() {
            observer(&event);
        }
        if let Some(file) = &inner.file
            && let Ok(mut line) = serde_json::to_vec(&*event)
        {
            line.push(b'\n');
            file.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write(&[&line], std::time::Instant::now());
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

/// `2026-11-26T04:05:06.789Z`. Written out here: a date crate for one
/// format would be the larger cost.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_rfc3339() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_665_906_789);
        assert_eq!(rfc3339(t), "2026-11-26T04:05:06.789Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
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
