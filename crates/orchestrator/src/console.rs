//! The daemon's console: one thread owns stderr and writes, in order, the
//! daemon's own log events and the services' lines. Service lines get the
//! same look as the tracing log (text or JSON, fields `service` and
//! `stream`), but are formatted a block at a time, off the threads that
//! drain the pipes, and written with one syscall per batch.
//!
//! Everything goes through one bounded queue, so a service's last lines
//! still come before the daemon's note that it exited, and a console that
//! cannot keep up (a slow terminal or pipe) holds up the writers instead of
//! losing lines or growing without bound.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use memchr::memchr_iter;
use orchestrator_core::events::rfc3339;
use orchestrator_core::output::{Console, LogBlock, Stream};
use serde::Serialize;

/// Entries the console may fall behind by. An entry is one turn of a pump,
/// at most 16 reads of 64 KiB, so a console slower than the services holds
/// at most 8 MiB of their output before they are made to wait.
const QUEUE_ENTRIES: usize = 8;

/// Bytes formatted before they are written.
const WRITE_BATCH_BYTES: usize = 256 * 1024;

/// How long [`flush`] waits for a console that is stuck (stderr a pipe
/// nobody reads) before the daemon exits anyway.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// How long a panic waits for the lines queued before it.
const PANIC_FLUSH_WAIT: Duration = Duration::from_secs(1);

const CONSOLE_THREAD: &str = "console";

enum Entry {
    /// One event of the daemon's own log, already formatted.
    Event(Vec<u8>),
    Lines {
        service: Arc<str>,
        blocks: Vec<LogBlock>,
    },
    Flushed(SyncSender<()>),
}

static QUEUE: OnceLock<SyncSender<Entry>> = OnceLock::new();
static FORMAT: OnceLock<LineFormat> = OnceLock::new();

/// Starts the console thread; from then on [`ConsoleWriter`] goes through it.
pub fn start(format: LineFormat) -> std::io::Result<()> {
    let _ = FORMAT.set(format);
    let (sender, receiver) = sync_channel(QUEUE_ENTRIES);
    std::thread::Builder::new()
        .name(CONSOLE_THREAD.into())
        .spawn(move || write_entries(&receiver, format, write_stderr))?;
    let _ = QUEUE.set(sender);
    // A panic's message would otherwise come before the lines still queued
    // (or, on the main thread, end the process without them): write those
    // first. Not from the console thread, which would wait on itself.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some(CONSOLE_THREAD)
            && let Some(queue) = QUEUE.get()
        {
            flush_within(queue, PANIC_FLUSH_WAIT);
        }
        previous(info);
    }));
    Ok(())
}

/// Waits until everything queued so far is written (bounded by
/// [`FLUSH_WAIT`]). Call before the process exits.
pub fn flush() {
    let Some(queue) = QUEUE.get() else { return };
    flush_within(queue, FLUSH_WAIT);
}

/// Returns whether everything queued before was written within `wait`.
fn flush_within(queue: &SyncSender<Entry>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let (done, written) = sync_channel(1);
    let mut entry = Entry::Flushed(done);
    // Not a blocking send: a stuck console also keeps its queue full, and
    // the wait must stay bounded then too.
    loop {
        match queue.try_send(entry) {
            Ok(()) => break,
            Err(TrySendError::Full(back)) if Instant::now() < deadline => {
                entry = back;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(_) => return false,
        }
    }
    written
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}

/// Sends `entry`, or hands it back when there is no console thread (not
/// started, or gone).
fn enqueue(entry: Entry) -> Result<(), Entry> {
    let Some(queue) = QUEUE.get() else {
        return Err(entry);
    };
    match queue.try_send(entry) {
        Ok(()) => Ok(()),
        Err(TrySendError::Full(entry)) => queue.send(entry).map_err(|e| e.0),
        Err(TrySendError::Disconnected(entry)) => Err(entry),
    }
}

/// tracing's writer: one `write` per formatted event.
pub struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(Entry::Event(bytes)) = enqueue(Entry::Event(buf.to_vec())) {
            write_stderr(&bytes);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A console that went away (closed terminal, EPIPE) must neither stop the
/// services nor make tracing report (and panic on) the failure.
fn write_stderr(bytes: &[u8]) {
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// The console thread: takes what is queued, formats a batch, writes it.
fn write_entries(receiver: &Receiver<Entry>, format: LineFormat, mut write: impl FnMut(&[u8])) {
    // Grown on demand: a daemon whose services are quiet keeps it small.
    let mut out = Vec::new();
    while let Ok(mut entry) = receiver.recv() {
        loop {
            let mut flushed = None;
            match entry {
                Entry::Event(bytes) => out.extend_from_slice(&bytes),
                Entry::Lines { service, blocks } => {
                    for block in &blocks {
                        format.block(&mut out, &service, block);
                    }
                }
                Entry::Flushed(done) => flushed = Some(done),
            }
            if flushed.is_some() || out.len() >= WRITE_BATCH_BYTES {
                write(&out);
                out.clear();
            }
            if let Some(done) = flushed {
                let _ = done.try_send(());
            }
            match receiver.try_recv() {
                Ok(next) => entry = next,
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            write(&out);
        }
        out.clear();
        if out.capacity() > 2 * WRITE_BATCH_BYTES {
            out = Vec::new();
        }
    }
}

/// Hands service lines to the console thread.
pub struct ServiceConsole;

impl Console for ServiceConsole {
    fn blocks(&self, service: &Arc<str>, blocks: Vec<LogBlock>) {
        let entry = Entry::Lines {
            service: Arc::clone(service),
            blocks,
        };
        if let Err(Entry::Lines { service, blocks }) = enqueue(entry) {
            let mut out = Vec::new();
            let format = FORMAT.get().copied().unwrap_or_default();
            for block in &blocks {
                format.block(&mut out, &service, block);
            }
            write_stderr(&out);
        }
    }
}

#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: &'a str,
    level: &'static str,
    message: &'a str,
    service: &'a str,
    stream: &'static str,
}

/// How service lines look on the console.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineFormat {
    pub json: bool,
    pub ansi: bool,
}

impl LineFormat {
    fn block(&self, out: &mut Vec<u8>, service: &str, block: &LogBlock) {
        self.format(out, block.time, service, block.stream, &block.bytes);
    }

    /// `bytes` are whole lines, each ending in `\n`.
    fn format(
        &self,
        out: &mut Vec<u8>,
        time: SystemTime,
        service: &str,
        stream: Stream,
        bytes: &[u8],
    ) {
        let timestamp = rfc3339(time);
        if self.json {
            format_json(out, &timestamp, service, stream, bytes);
            return;
        }
        // Plain text is assembled from slices, found with memchr and
        // validated a block at a time: formatting machinery, a byte-wise
        // split or lossy conversion per line cost more than the pipe itself.
        let mut prefix = Vec::with_capacity(64);
        let mut suffix = Vec::with_capacity(64);
        if self.ansi {
            let _ = write!(prefix, "\x1b[2m{timestamp}\x1b[0m \x1b[32m INFO\x1b[0m ");
            let _ = writeln!(
                suffix,
                " \x1b[3mservice\x1b[0m\x1b[2m=\x1b[0m{service} \x1b[3mstream\x1b[0m\x1b[2m=\x1b[0m{}",
                stream.as_str()
            );
        } else {
            let _ = write!(prefix, "{timestamp}  INFO ");
            let _ = writeln!(suffix, " service={service} stream={}", stream.as_str());
        }
        // Most output is ASCII, which is checked for at about half the cost
        // of a full UTF-8 validation.
        let valid = bytes.is_ascii() || std::str::from_utf8(bytes).is_ok();
        // The prefix is the same for every line of a block, so the bytes
        // between two lines are one slice, the suffix of one and the prefix
        // of the next: two copies a line instead of three. The prefix put
        // after the last line is taken back at the end.
        let mut between = suffix;
        between.extend_from_slice(&prefix);
        out.extend_from_slice(&prefix);
        let mut start = 0;
        for end in memchr_iter(b'\n', bytes) {
            let line = &bytes[start..end];
            start = end + 1;
            if valid {
                out.extend_from_slice(line);
            } else {
                out.extend_from_slice(String::from_utf8_lossy(line).as_bytes());
            }
            out.extend_from_slice(&between);
        }
        out.truncate(out.len() - prefix.len());
    }
}

fn format_json(out: &mut Vec<u8>, timestamp: &str, service: &str, stream: Stream, bytes: &[u8]) {
    let mut start = 0;
    for end in memchr_iter(b'\n', bytes) {
        let text = String::from_utf8_lossy(&bytes[start..end]);
        start = end + 1;
        let record = JsonLine {
            timestamp,
            level: "INFO",
            message: &text,
            service,
            stream: stream.as_str(),
        };
        if serde_json::to_writer(&mut *out, &record).is_ok() {
            out.push(b'\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(json: bool, bytes: &[u8]) -> String {
        let format = LineFormat { json, ansi: false };
        let mut out = Vec::new();
        format.format(&mut out, SystemTime::now(), "api", Stream::Stderr, bytes);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lines_carry_service_and_stream() {
        let text = formatted(false, b"one\ntwo\n\nbad \xff\n");
        let messages: Vec<&str> = text
            .lines()
            .map(|l| {
                let start = l.find("  INFO ").unwrap() + 7;
                let end = l.rfind(" service=api stream=stderr").unwrap();
                &l[start..end]
            })
            .collect();
        assert_eq!(messages, ["one", "two", "", "bad \u{fffd}"]);
        assert_eq!(formatted(false, b""), "", "no line, no output");
        let one = formatted(false, b"solo\n");
        assert!(
            one.ends_with("  INFO solo service=api stream=stderr\n"),
            "{one}"
        );
        assert_eq!(one.lines().count(), 1);
    }

    #[test]
    fn events_and_service_lines_are_written_in_the_order_queued() {
        let (queue, receiver) = sync_channel(QUEUE_ENTRIES);
        let block = |text: &[u8]| LogBlock {
            first_seq: 1,
            time: SystemTime::now(),
            stream: Stream::Stdout,
            line_count: 1,
            bytes: Arc::new(text.to_vec()),
        };
        let (done, flushed) = sync_channel(1);
        queue.send(Entry::Event(b"first event\n".to_vec())).unwrap();
        queue
            .send(Entry::Lines {
                service: Arc::from("api"),
                blocks: vec![block(b"one\n"), block(b"two\n")],
            })
            .unwrap();
        queue.send(Entry::Event(b"api exited\n".to_vec())).unwrap();
        queue.send(Entry::Flushed(done)).unwrap();
        drop(queue);
        let mut written = Vec::new();
        write_entries(&receiver, LineFormat::default(), |bytes| {
            written.extend_from_slice(bytes)
        });
        assert!(flushed.try_recv().is_ok(), "the flush was acknowledged");
        let text = String::from_utf8(written).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "first event");
        assert!(
            lines[1].contains(" INFO one service=api stream=stdout"),
            "{text}"
        );
        assert!(lines[2].contains(" INFO two service=api"), "{text}");
        assert_eq!(lines[3], "api exited");
    }

    #[test]
    fn a_flush_gives_up_on_a_stuck_console_even_when_its_queue_is_full() {
        // A console thread blocked on stderr takes nothing more: its queue
        // stays full.
        let (queue, _stuck) = sync_channel(1);
        queue.send(Entry::Event(b"waiting\n".to_vec())).unwrap();
        let (returned, flushed) = sync_channel(1);
        std::thread::spawn(move || {
            let _ = returned.send(flush_within(&queue, Duration::from_millis(50)));
        });
        let result = flushed.recv_timeout(Duration::from_secs(10));
        assert_eq!(result, Ok(false), "the flush returned, without success");
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let text = formatted(true, b"say \"hi\"\n\n");
        let values: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(values.len(), 2);
        assert_eq!(values[0]["message"], "say \"hi\"");
        assert_eq!(values[0]["service"], "api");
        assert_eq!(values[0]["stream"], "stderr");
        assert_eq!(values[1]["message"], "");
    }
}
