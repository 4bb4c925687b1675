//! The daemon's console: one thread owns stderr and writes, in order, the
//! daemon's own log events and the services' lines. Service lines get the
//! same look as the daemon's events ([`Style`]: `api | line` by default,
//! tracing's key=value lines, or JSON), but are formatted a block at a
//! time, off the threads that drain the pipes, and written with one
//! syscall per batch. Under systemd, with stderr the journal's stream,
//! service lines go to the journal instead, one entry each ([`journal`]).
//!
//! Everything goes through one queue, so a service's last lines still come
//! before the daemon's note that it exited. Neither kind of entry can make
//! the queue grow without bound or block the async runtime:
//! - service lines take one of [`LINE_ENTRIES`] permits, awaited by the
//!   pump: a console that cannot keep up holds the services' output back
//!   (their pipes fill) rather than lose lines, while the runtime goes on;
//! - the daemon's own events are never waited for: past [`EVENT_ENTRIES`]
//!   queued, they are dropped and counted, and the count is written once
//!   the console catches up.

use std::future::Future;
use std::io::Write;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::journal::{self, Journal};

use memchr::memchr_iter;
use orchestrator_core::events::rfc3339;
use orchestrator_core::output::{Console, LogBlock, Stream};
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc};

/// Pump turns the console may fall behind by. A turn is at most 16 reads of
/// 64 KiB, so a console slower than the services holds at most 8 MiB of
/// their output before they are made to wait.
const LINE_ENTRIES: usize = 8;

/// The daemon's own events queued at most; more are dropped (and counted)
/// while the console is stuck.
const EVENT_ENTRIES: usize = 4096;

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
    Flushed(std::sync::mpsc::SyncSender<()>),
}

/// The sending side, shared by tracing's writer and the service console.
struct Queue {
    entries: mpsc::UnboundedSender<Entry>,
    counters: Arc<Counters>,
}

/// Shared by the senders and the console thread.
struct Counters {
    /// Room for `Lines` entries; the console thread gives a permit back for
    /// each one written.
    line_room: Semaphore,
    events_queued: AtomicUsize,
    events_dropped: AtomicUsize,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();
static FORMAT: OnceLock<LineFormat> = OnceLock::new();

fn queue() -> (Queue, mpsc::UnboundedReceiver<Entry>, Arc<Counters>) {
    let (entries, receiver) = mpsc::unbounded_channel();
    let counters = Arc::new(Counters {
        line_room: Semaphore::new(LINE_ENTRIES),
        events_queued: AtomicUsize::new(0),
        events_dropped: AtomicUsize::new(0),
    });
    let queue = Queue {
        entries,
        counters: Arc::clone(&counters),
    };
    (queue, receiver, counters)
}

/// Starts the console thread; from then on [`ConsoleWriter`] goes through it.
pub fn start(format: LineFormat) -> std::io::Result<()> {
    let _ = FORMAT.set(format);
    let (queue, receiver, counters) = self::queue();
    // Probed once: a journal that is not there now is not looked for per line.
    let journal = match format.journal {
        true => {
            let path = Journal::socket_path();
            match Journal::connect(&path) {
                Ok(journal) => Some(journal),
                Err(error) => {
                    let mut out = Vec::new();
                    format.note(
                        &mut out,
                        tracing::Level::WARN,
                        &format!(
                            "cannot connect to the journal at {}: {error}; service lines go to stderr, without their own SYSLOG_IDENTIFIER",
                            path.display()
                        ),
                    );
                    write_stderr(&out);
                    None
                }
            }
        }
        false => None,
    };
    std::thread::Builder::new()
        .name(CONSOLE_THREAD.into())
        .spawn(move || write_entries(receiver, &counters, format, journal, write_stderr))?;
    let _ = QUEUE.set(queue);
    // A panic's message would otherwise come before the lines still queued
    // (or, on the main thread, end the process without them): write those
    // first. Not from the console thread, which would wait on itself.
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some(CONSOLE_THREAD)
            && let Some(queue) = QUEUE.get()
        {
            queue.flush_within(PANIC_FLUSH_WAIT);
        }
        previous(info);
    }));
    Ok(())
}

/// Waits until everything queued so far is written (bounded by
/// [`FLUSH_WAIT`]). Call before the process exits.
pub fn flush() {
    if let Some(queue) = QUEUE.get() {
        queue.flush_within(FLUSH_WAIT);
    }
}

impl Queue {
    /// Returns whether everything queued before was written within `wait`.
    fn flush_within(&self, wait: Duration) -> bool {
        let (done, written) = std::sync::mpsc::sync_channel(1);
        self.entries.send(Entry::Flushed(done)).is_ok() && written.recv_timeout(wait).is_ok()
    }

    /// Queues an event unless too many wait already; hands it back when
    /// there is no console thread any more.
    fn event(&self, bytes: Vec<u8>) -> Result<(), Vec<u8>> {
        let counters = &self.counters;
        if counters.events_queued.fetch_add(1, Ordering::AcqRel) >= EVENT_ENTRIES {
            counters.events_queued.fetch_sub(1, Ordering::AcqRel);
            counters.events_dropped.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        self.entries.send(Entry::Event(bytes)).map_err(|error| {
            counters.events_queued.fetch_sub(1, Ordering::AcqRel);
            match error.0 {
                Entry::Event(bytes) => bytes,
                _ => Vec::new(),
            }
        })
    }

    /// Queues lines that hold a permit already; writes them here if the
    /// console thread is gone.
    fn lines(&self, service: Arc<str>, blocks: Vec<LogBlock>) {
        if let Err(error) = self.entries.send(Entry::Lines { service, blocks })
            && let Entry::Lines { service, blocks } = error.0
        {
            write_directly(&service, &blocks);
        }
    }
}

fn write_directly(service: &str, blocks: &[LogBlock]) {
    let mut out = Vec::new();
    let format = FORMAT.get().copied().unwrap_or_default();
    for block in blocks {
        format.block(&mut out, service, block);
    }
    write_stderr(&out);
}

/// tracing's writer: one `write` per formatted event.
pub struct ConsoleWriter;

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match QUEUE.get() {
            Some(queue) => {
                if let Err(bytes) = queue.event(buf.to_vec()) {
                    write_stderr(&bytes);
                }
            }
            None => write_stderr(buf),
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
fn write_entries(
    mut receiver: mpsc::UnboundedReceiver<Entry>,
    counters: &Counters,
    format: LineFormat,
    mut journal: Option<Journal>,
    mut write: impl FnMut(&[u8]),
) {
    // Grown on demand: a daemon whose services are quiet keeps it small.
    let mut out = Vec::new();
    while let Some(mut entry) = receiver.blocking_recv() {
        loop {
            let mut flushed = None;
            match entry {
                Entry::Event(bytes) => {
                    counters.events_queued.fetch_sub(1, Ordering::AcqRel);
                    out.extend_from_slice(&bytes);
                }
                Entry::Lines { service, blocks } => {
                    for block in &blocks {
                        match journal.as_mut() {
                            Some(journal) => to_journal(journal, &mut out, format, &service, block),
                            None => format.block(&mut out, &service, block),
                        }
                    }
                    counters.line_room.add_permits(1);
                }
                Entry::Flushed(done) => flushed = Some(done),
            }
            let dropped = counters.events_dropped.swap(0, Ordering::Relaxed);
            if dropped > 0 {
                format.dropped_events(&mut out, dropped);
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

/// Sends a block's lines to the journal, one entry each; a line the
/// journal does not take at once goes to stderr. Each spell of that is
/// said on stderr where it begins and where it ends (with how many lines).
fn to_journal(
    journal: &mut Journal,
    out: &mut Vec<u8>,
    format: LineFormat,
    service: &str,
    block: &LogBlock,
) {
    let mut start = 0;
    for end in memchr_iter(b'\n', &block.bytes) {
        let line = &block.bytes[start..end];
        let sent = journal.send(service, block.stream, line);
        if sent.is_ok() && journal.fallbacks > 0 {
            format.note(
                out,
                tracing::Level::INFO,
                &format!(
                    "the journal takes lines again; {} went to stderr meanwhile",
                    journal.fallbacks
                ),
            );
            journal.fallbacks = 0;
        }
        if let Err(error) = sent {
            if journal.fallbacks == 0 {
                format.note(
                    out,
                    tracing::Level::WARN,
                    &format!(
                        "the journal did not take a line of {service} ({error}); such lines are written to stderr instead"
                    ),
                );
            }
            journal.fallbacks += 1;
            format.format(
                out,
                block.time,
                service,
                block.stream,
                &block.bytes[start..=end],
            );
        }
        start = end + 1;
    }
}

/// Hands service lines to the console thread.
pub struct ServiceConsole;

impl Console for ServiceConsole {
    fn send_blocks(
        &self,
        service: Arc<str>,
        blocks: Vec<LogBlock>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        Box::pin(async move {
            let Some(queue) = QUEUE.get() else {
                write_directly(&service, &blocks);
                return;
            };
            // Closed only if the semaphore is, which nothing does.
            if let Ok(permit) = queue.counters.line_room.acquire().await {
                permit.forget();
            }
            queue.lines(service, blocks);
        })
    }

    fn try_send_blocks(&self, service: Arc<str>, blocks: Vec<LogBlock>) {
        let Some(queue) = QUEUE.get() else {
            write_directly(&service, &blocks);
            return;
        };
        if let Ok(permit) = queue.counters.line_room.try_acquire() {
            permit.forget();
            queue.lines(service, blocks);
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

/// How the console's lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Style {
    /// `api          | 2026-12-03T02:23:13.123Z line`: the service first, in a
    /// column of stable width, `!` instead of `|` for stderr; the daemon's
    /// own events as `orchestrator | TIME  INFO message key=value`.
    #[default]
    Compact,
    /// tracing's full format: `TIME  INFO line service=api stream=stdout`.
    KeyValue,
    Json,
}

/// The daemon's own name in the service column.
pub const DAEMON_LABEL: &str = "orchestrator";

/// Names longer than this are not padded to: one long name must not push
/// every line far to the right.
pub const MAX_NAME_WIDTH: usize = 24;

/// How service lines (and, but for JSON, the daemon's events) look.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineFormat {
    pub style: Style,
    pub ansi: bool,
    /// The width of the name column ([`Style::Compact`]).
    pub width: usize,
    /// stderr is the journal's stream: no timestamp or colour of ours, a
    /// `<N>` priority on the daemon's lines, service lines to the journal.
    pub journal: bool,
}

/// The column width for these service names: the longest, the daemon's
/// label included, at most [`MAX_NAME_WIDTH`].
pub fn name_width<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .map(str::len)
        .chain([DAEMON_LABEL.len()])
        .max()
        .unwrap_or(0)
        .min(MAX_NAME_WIDTH)
}

impl LineFormat {
    fn block(&self, out: &mut Vec<u8>, service: &str, block: &LogBlock) {
        self.format(out, block.time, service, block.stream, &block.bytes);
    }

    /// Says that `count` of the daemon's own events were dropped.
    fn dropped_events(&self, out: &mut Vec<u8>, count: usize) {
        let message =
            format!("{count} log events were not shown: the daemon's stderr was not keeping up");
        self.note(out, tracing::Level::WARN, &message);
    }

    /// One line of the daemon's own, written by the console itself (not
    /// through tracing) in the daemon's format.
    pub fn note(&self, out: &mut Vec<u8>, level: tracing::Level, message: &str) {
        if self.style == Style::Json {
            let record = serde_json::json!({
                "timestamp": rfc3339(SystemTime::now()),
                "level": level.as_str(),
                "message": message,
            });
            let _ = serde_json::to_writer(&mut *out, &record);
            out.push(b'\n');
        } else if self.style == Style::KeyValue && !self.journal {
            let timestamp = rfc3339(SystemTime::now());
            let _ = writeln!(out, "{timestamp} {level:>5} {message}");
        } else {
            self.event(out, SystemTime::now(), level, message);
        }
    }

    /// One of the daemon's events (its message and fields formatted into
    /// `text`), in the compact or journal shape.
    pub fn event(&self, out: &mut Vec<u8>, time: SystemTime, level: tracing::Level, text: &str) {
        if self.journal {
            let priority = match level {
                tracing::Level::ERROR => journal::PRIORITY_ERR,
                tracing::Level::WARN => journal::PRIORITY_WARNING,
                tracing::Level::INFO => journal::PRIORITY_INFO,
                _ => journal::PRIORITY_DEBUG,
            };
            let _ = write!(out, "<{priority}>");
            escape_controls(text, out);
            out.push(b'\n');
            return;
        }
        let timestamp = rfc3339(time);
        let width = self.width;
        if self.ansi {
            let colour = match level {
                tracing::Level::ERROR => "31",
                tracing::Level::WARN => "33",
                tracing::Level::INFO => "32",
                tracing::Level::DEBUG => "34",
                _ => "35",
            };
            let _ = write!(
                out,
                "\x1b[1m{DAEMON_LABEL:<width$}\x1b[0m \x1b[2m|\x1b[0m \x1b[2m{timestamp}\x1b[0m \x1b[{colour}m{:>5}\x1b[0m ",
                level.as_str()
            );
        } else {
            let _ = write!(
                out,
                "{DAEMON_LABEL:<width$} | {timestamp} {:>5} ",
                level.as_str()
            );
        }
        escape_controls(text, out);
        out.push(b'\n');
    }

    /// What comes before each service line, and after it.
    fn affixes(&self, timestamp: &str, service: &str, stream: Stream) -> (Vec<u8>, Vec<u8>) {
        let mut prefix = Vec::with_capacity(64);
        let mut suffix = Vec::with_capacity(64);
        let width = self.width;
        match self.style {
            Style::Compact => {
                let mark = match stream {
                    Stream::Stdout => '|',
                    Stream::Stderr => '!',
                };
                match (self.ansi, self.journal) {
                    // Only when the journal refused a line: the journal
                    // stamps it itself.
                    (_, true) => {
                        let priority = journal::stream_priority(stream);
                        let _ = write!(prefix, "<{priority}>{service:<width$} {mark} ");
                    }
                    (true, false) => {
                        let colour = crate::logview::colour_of(service);
                        let mark_colour = match stream {
                            Stream::Stdout => "2",
                            Stream::Stderr => "1;31",
                        };
                        let _ = write!(
                            prefix,
                            "\x1b[{colour}m{service:<width$}\x1b[0m \x1b[{mark_colour}m{mark}\x1b[0m \x1b[2m{timestamp}\x1b[0m "
                        );
                    }
                    (false, false) => {
                        let _ = write!(prefix, "{service:<width$} {mark} {timestamp} ");
                    }
                }
                suffix.push(b'\n');
            }
            _ if self.ansi => {
                let _ = write!(prefix, "\x1b[2m{timestamp}\x1b[0m \x1b[32m INFO\x1b[0m ");
                let _ = writeln!(
                    suffix,
                    " \x1b[3mservice\x1b[0m\x1b[2m=\x1b[0m{service} \x1b[3mstream\x1b[0m\x1b[2m=\x1b[0m{}",
                    stream.as_str()
                );
            }
            _ => {
                let _ = write!(prefix, "{timestamp}  INFO ");
                let _ = writeln!(suffix, " service={service} stream={}", stream.as_str());
            }
        }
        (prefix, suffix)
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
        if self.style == Style::Json {
            format_json(out, &timestamp, service, stream, bytes);
            return;
        }
        // Plain text is assembled from slices, found with memchr and
        // validated a block at a time: formatting machinery, a byte-wise
        // split or lossy conversion per line cost more than the pipe itself.
        let (prefix, suffix) = self.affixes(&timestamp, service, stream);
        // Most output is printable ASCII, which is checked for at about the
        // cost of `is_ascii` and copied as it is; anything else goes through
        // the escaping, line by line.
        let plain = is_plain(bytes);
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
            if plain {
                out.extend_from_slice(line);
            } else {
                escape_controls(&String::from_utf8_lossy(line), out);
            }
            out.extend_from_slice(&between);
        }
        out.truncate(out.len() - prefix.len());
    }
}

/// The daemon's own events in the compact or journal shape: tracing's
/// `FormatEvent`, writing into the console as the key=value format does.
pub struct DaemonEvents(pub LineFormat);

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for DaemonEvents
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        // Formatted without colour, then escaped: a field may hold what a
        // service or a file said.
        use tracing_subscriber::fmt::FormatFields;
        let mut text = String::new();
        ctx.format_fields(
            tracing_subscriber::fmt::format::Writer::new(&mut text),
            event,
        )?;
        let mut out = Vec::with_capacity(text.len() + 64);
        self.0.event(
            &mut out,
            SystemTime::now(),
            *event.metadata().level(),
            &text,
        );
        writer.write_str(&String::from_utf8_lossy(&out))
    }
}

fn format_json(out: &mut Vec<u8>, timestamp: &str, service: &str, stream: Stream, bytes: &[u8]) {
    let from = out.len();
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
    // serde_json escapes C0 controls but writes DEL and C1 (U+0080..U+009F,
    // a CSI to some terminals) as they are: a `jq`-less `tail` of the
    // console would still hand them to a terminal.
    if !is_plain(&bytes[..start]) {
        let records = out.split_off(from);
        escape_json_controls(&records, out);
    }
}

/// Whether `byte` may reach a terminal as it is: printable ASCII, tab, or
/// the newline that ends a line.
#[inline(always)]
fn plain_byte(byte: u8) -> bool {
    (0x20..0x7f).contains(&byte) || byte == b'\t' || byte == b'\n'
}

/// Whether every byte of `bytes` is [`plain_byte`]. This runs over every
/// byte a service prints, so chunks are checked without an exit or a
/// branch per byte, which the compiler vectorises: one add and one signed
/// compare find the bytes below 0x20 and from 0x7f up at once (as `i8`,
/// `byte + 1` is then below 0x21), less the newlines that end every line.
/// Tabs are rarer and left to the exact check of a chunk that has one.
pub fn is_plain(bytes: &[u8]) -> bool {
    let suspect = |byte: u8| ((byte.wrapping_add(1) as i8) < 0x21) & (byte != b'\n');
    let mut chunks = bytes.chunks_exact(64);
    for chunk in &mut chunks {
        if chunk.iter().fold(false, |any, &b| any | suspect(b))
            && !chunk.iter().all(|&b| plain_byte(b))
        {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| plain_byte(b))
}

/// Appends `text` with every control character but tab written visibly
/// (`\x1b`, `\r`, `\u{9b}`): a service's ESC, BEL or CR would otherwise
/// retitle or clear the operator's terminal, or overwrite the line's start
/// with a forged one. Backslashes are left alone, so a literal `\x1b` and
/// an escaped ESC look the same; the log file keeps the raw bytes.
pub fn escape_controls(text: &str, out: &mut Vec<u8>) {
    let mut start = 0;
    for (at, c) in text.char_indices() {
        if !c.is_control() || c == '\t' {
            continue;
        }
        out.extend_from_slice(&text.as_bytes()[start..at]);
        start = at + c.len_utf8();
        let _ = match c {
            '\r' => write!(out, "\\r"),
            '\n' => write!(out, "\\n"),
            c if u32::from(c) < 0x80 => write!(out, "\\x{:02x}", u32::from(c)),
            c => write!(out, "\\u{{{:x}}}", u32::from(c)),
        };
    }
    out.extend_from_slice(&text.as_bytes()[start..]);
}

/// [`escape_controls`] for text that is a string in a JSON document: DEL
/// and C1 characters become `\u00XX`; serde_json has escaped the rest.
/// Both only ever occur inside strings, so the JSON stays valid.
fn escape_json_controls(json: &[u8], out: &mut Vec<u8>) {
    let mut start = 0;
    let mut at = 0;
    while at < json.len() {
        let code = match json[at] {
            0x7f => Some((0x7f, 1)),
            // U+0080..U+009F in UTF-8; 0xC2 only ever leads a character.
            0xc2 if json.get(at + 1).is_some_and(|b| (0x80..0xa0).contains(b)) => {
                Some((json[at + 1], 2))
            }
            _ => None,
        };
        match code {
            Some((code, len)) => {
                out.extend_from_slice(&json[start..at]);
                let _ = write!(out, "\\u{code:04x}");
                at += len;
                start = at;
            }
            None => at += 1,
        }
    }
    out.extend_from_slice(&json[start..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `json`: JSON, else the key=value style.
    fn formatted(json: bool, bytes: &[u8]) -> String {
        let style = if json { Style::Json } else { Style::KeyValue };
        let format = LineFormat {
            style,
            ..LineFormat::default()
        };
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

    fn block(text: &[u8]) -> LogBlock {
        LogBlock {
            first_seq: 1,
            time: SystemTime::now(),
            stream: Stream::Stdout,
            line_count: memchr_iter(b'\n', text).count() as u64,
            bytes: Arc::new(text.to_vec()),
        }
    }

    /// Queues lines as a pump does, without waiting: the room must be free.
    fn queue_lines(queue: &Queue, text: &[u8]) {
        queue
            .counters
            .line_room
            .try_acquire()
            .expect("room")
            .forget();
        queue.lines(Arc::from("api"), vec![block(text)]);
    }

    fn written(receiver: mpsc::UnboundedReceiver<Entry>, counters: &Counters) -> String {
        let mut written = Vec::new();
        let format = LineFormat {
            style: Style::KeyValue,
            ..LineFormat::default()
        };
        write_entries(receiver, counters, format, None, |bytes| {
            written.extend_from_slice(bytes)
        });
        String::from_utf8(written).unwrap()
    }

    #[test]
    fn events_and_service_lines_are_written_in_the_order_queued() {
        let (queue, receiver, counters) = super::queue();
        let (done, flushed) = std::sync::mpsc::sync_channel(1);
        queue.event(b"first event\n".to_vec()).unwrap();
        queue_lines(&queue, b"one\ntwo\n");
        queue.event(b"api exited\n".to_vec()).unwrap();
        queue.entries.send(Entry::Flushed(done)).ok().unwrap();
        drop(queue);
        let text = written(receiver, &counters);
        assert!(flushed.try_recv().is_ok(), "the flush was acknowledged");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert_eq!(lines[0], "first event");
        assert!(
            lines[1].contains(" INFO one service=api stream=stdout"),
            "{text}"
        );
        assert!(lines[2].contains(" INFO two service=api"), "{text}");
        assert_eq!(lines[3], "api exited");
        assert_eq!(counters.line_room.available_permits(), LINE_ENTRIES);
        assert_eq!(counters.events_queued.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn lines_wait_for_room_without_blocking_the_runtime() {
        let (queue, receiver, counters) = super::queue();
        for _ in 0..LINE_ENTRIES {
            queue_lines(&queue, b"line\n");
        }
        let room = Arc::clone(&queue.counters);
        let waiting =
            tokio::spawn(async move { room.line_room.acquire().await.map(|p| p.forget()) });
        // The runtime goes on while the pump's hand-over waits.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(!waiting.is_finished(), "no room until the console writes");
        drop(queue);
        let console = std::thread::spawn(move || written(receiver, &counters));
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("room once the console wrote")
            .unwrap()
            .unwrap();
        let text = console.join().unwrap();
        assert_eq!(text.lines().count(), LINE_ENTRIES, "{text}");
    }

    #[test]
    fn events_past_the_limit_are_dropped_counted_and_reported() {
        let (queue, receiver, counters) = super::queue();
        for _ in 0..EVENT_ENTRIES + 5 {
            queue.event(b"event\n".to_vec()).unwrap();
        }
        assert_eq!(counters.events_dropped.load(Ordering::Relaxed), 5);
        drop(queue);
        let text = written(receiver, &counters);
        assert_eq!(
            text.lines().filter(|l| *l == "event").count(),
            EVENT_ENTRIES
        );
        assert!(
            text.contains("  WARN 5 log events were not shown"),
            "{}",
            &text[text.len().saturating_sub(200)..]
        );
    }

    #[test]
    fn a_flush_gives_up_on_a_stuck_console() {
        // A console thread blocked on stderr takes nothing more.
        let (queue, _stuck, _counters) = super::queue();
        queue.event(b"waiting\n".to_vec()).unwrap();
        let (returned, flushed) = std::sync::mpsc::sync_channel(1);
        std::thread::spawn(move || {
            let _ = returned.send(queue.flush_within(Duration::from_millis(50)));
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

    /// The message of each text line, between the level and the fields.
    fn messages(text: &str) -> Vec<&str> {
        text.lines()
            .map(|l| {
                let start = l.find("  INFO ").unwrap() + 7;
                let end = l.rfind(" service=api stream=stderr").unwrap();
                &l[start..end]
            })
            .collect()
    }

    #[test]
    fn control_characters_reach_the_terminal_escaped() {
        let text = formatted(
            false,
            b"\x1b]0;pwned\x07title\n\x1b[2J\x1b[Hclear\nok\r2026-01-01T00:00:00.000Z  INFO forged\n\
              tab\there \x7f \xc2\x9b31m del and csi\n\x00nul \xff\n",
        );
        assert_eq!(
            messages(&text),
            [
                "\\x1b]0;pwned\\x07title",
                "\\x1b[2J\\x1b[Hclear",
                "ok\\r2026-01-01T00:00:00.000Z  INFO forged",
                "tab\there \\x7f \\u{9b}31m del and csi",
                "\\x00nul \u{fffd}",
            ]
        );
        let raw = text.replace(['\t', '\n'], " ");
        assert!(!raw.chars().any(char::is_control), "{text:?}");
    }

    #[test]
    fn the_terminals_own_colours_stay_and_the_services_are_escaped() {
        let format = LineFormat {
            style: Style::KeyValue,
            ansi: true,
            ..LineFormat::default()
        };
        let styled = |bytes: &[u8]| {
            let mut out = Vec::new();
            format.format(&mut out, SystemTime::now(), "api", Stream::Stdout, bytes);
            String::from_utf8(out).unwrap()
        };
        let text = styled(b"\x1b[31mred\n");
        assert!(text.contains("\\x1b[31mred"), "{text:?}");
        let ours = styled(b"red\n").matches('\x1b').count();
        assert_eq!(text.matches('\x1b').count(), ours, "{text:?}");
    }

    #[test]
    fn json_lines_stay_valid_and_carry_no_raw_control_character() {
        let bytes = b"\x1b]0;pwned\x07 \r \x7f \xc2\x9b \xc3\xa9 \\ \"q\"\n\xff\n";
        let text = formatted(true, bytes);
        let values: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            values[0]["message"], "\u{1b}]0;pwned\u{7} \r \u{7f} \u{9b} \u{e9} \\ \"q\"",
            "the message is the text, only encoded"
        );
        assert_eq!(values[1]["message"], "\u{fffd}");
        let raw = text.replace('\n', " ");
        assert!(!raw.chars().any(char::is_control), "{text:?}");
    }

    #[test]
    fn plain_is_printable_ascii_tab_and_newline_wherever_the_byte_is() {
        let line = b"a\tb ~\n".repeat(40);
        assert!(is_plain(&line));
        for at in [0, 63, 64, 200, line.len() - 1] {
            for bad in [0x1b, 0x07, b'\r', 0x1f, 0x7f, 0x80, 0xc3, 0xff, 0x00] {
                let mut dirty = line.clone();
                dirty[at] = bad;
                assert!(!is_plain(&dirty), "{bad:#x} at {at}");
            }
        }
    }

    fn compact(ansi: bool, journal: bool) -> LineFormat {
        LineFormat {
            style: Style::Compact,
            ansi,
            width: name_width(["api", "a-name-of-22-chars-xyz"]),
            journal,
        }
    }

    fn at_noon() -> SystemTime {
        std::time::UNIX_EPOCH + Duration::from_millis(1_795_665_906_789)
    }

    fn lines_of(format: LineFormat, service: &str, stream: Stream, bytes: &[u8]) -> String {
        let mut out = Vec::new();
        format.format(&mut out, at_noon(), service, stream, bytes);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn compact_lines_put_the_padded_name_first_and_mark_stderr() {
        let format = compact(false, false);
        assert_eq!(format.width, 22);
        let pad = " ".repeat(22 - 3);
        assert_eq!(
            lines_of(format, "api", Stream::Stdout, b"one\n\n"),
            format!(
                "api{pad} | 2026-11-26T04:05:06.789Z one\napi{pad} | 2026-11-26T04:05:06.789Z \n"
            )
        );
        assert_eq!(
            lines_of(format, "api", Stream::Stderr, b"oops\n"),
            format!("api{pad} ! 2026-11-26T04:05:06.789Z oops\n")
        );
        assert_eq!(lines_of(format, "api", Stream::Stderr, b""), "");
        // A longer name than the column (a service added later) is whole.
        let long = "x".repeat(40);
        assert_eq!(
            lines_of(format, &long, Stream::Stdout, b"hi\n"),
            format!("{long} | 2026-11-26T04:05:06.789Z hi\n")
        );
    }

    #[test]
    fn the_name_column_is_as_wide_as_the_longest_name_within_a_cap() {
        assert_eq!(name_width(["api"]), DAEMON_LABEL.len());
        assert_eq!(name_width(Vec::<&str>::new()), DAEMON_LABEL.len());
        assert_eq!(name_width(["a-fifteen-chars"]), 15);
        assert_eq!(name_width(["y".repeat(100).as_str()]), MAX_NAME_WIDTH);
    }

    #[test]
    fn compact_lines_escape_control_characters() {
        let text = lines_of(
            compact(false, false),
            "api",
            Stream::Stdout,
            b"\x1b[2Jclear\nok\rapi | forged\n\xff\n",
        );
        let messages: Vec<&str> = text
            .lines()
            .map(|l| l.split_once(".789Z ").unwrap().1)
            .collect();
        assert_eq!(messages, ["\\x1b[2Jclear", "ok\\rapi | forged", "\u{fffd}"]);
        assert!(!text.replace('\n', " ").chars().any(char::is_control));
    }

    #[test]
    fn compact_colour_only_when_asked_and_never_from_the_service() {
        let plain = lines_of(compact(false, false), "api", Stream::Stderr, b"red\n");
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let coloured = lines_of(compact(true, false), "api", Stream::Stderr, b"red\n");
        assert!(coloured.contains("\x1b[1;31m!\x1b[0m"), "{coloured:?}");
        assert!(coloured.ends_with(" red\n"), "{coloured:?}");
        let theirs = lines_of(
            compact(true, false),
            "api",
            Stream::Stderr,
            b"\x1b[31mred\n",
        );
        assert_eq!(
            theirs.matches('\x1b').count(),
            coloured.matches('\x1b').count(),
            "{theirs:?}"
        );
    }

    #[test]
    fn under_the_journal_lines_have_no_timestamp_nor_colour() {
        let format = compact(false, true);
        let text = lines_of(format, "api", Stream::Stdout, b"hello\n");
        assert_eq!(text, format!("<6>api{} | hello\n", " ".repeat(19)));
        let text = lines_of(format, "api", Stream::Stderr, b"oops\n");
        assert_eq!(text, format!("<4>api{} ! oops\n", " ".repeat(19)));
        let mut out = Vec::new();
        format.event(
            &mut out,
            at_noon(),
            tracing::Level::WARN,
            "api exited code=3",
        );
        assert_eq!(out, b"<4>api exited code=3\n");
        let mut out = Vec::new();
        format.event(&mut out, at_noon(), tracing::Level::INFO, "bell\x07");
        assert_eq!(out, b"<6>bell\\x07\n");
    }

    /// The daemon's events through tracing, in `format`.
    fn daemon_events(format: LineFormat, emit: impl FnOnce()) -> String {
        let written = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&written);
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || Sink(Arc::clone(&sink)))
            .with_ansi(format.ansi)
            .event_format(DaemonEvents(format))
            .finish();
        tracing::subscriber::with_default(subscriber, emit);
        let bytes = written.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_daemons_events_take_the_compact_shape() {
        let text = daemon_events(compact(false, false), || {
            tracing::warn!(service = "api", code = 3, "exited\x1b[2J");
        });
        let (label, rest) = text.split_once(" | ").unwrap();
        assert_eq!(label, format!("orchestrator{}", " ".repeat(10)));
        // One timestamp precision: the service lines' own.
        assert_eq!(
            rest.len(),
            "2026-11-26T04:05:06.789Z".len()
                + " WARN exited\\x1b[2J service=\"api\" code=3\n".len()
                + 1,
            "{rest:?}"
        );
        assert!(
            rest.ends_with("  WARN exited\\x1b[2J service=\"api\" code=3\n"),
            "{rest:?}"
        );
        assert_eq!(rest.as_bytes()[23], b'Z', "{rest:?}");
        let coloured = daemon_events(compact(true, false), || tracing::info!("up"));
        assert!(
            coloured.contains("\x1b[32m INFO\x1b[0m up\n"),
            "{coloured:?}"
        );
        let journal = daemon_events(compact(false, true), || tracing::error!(pid = 7, "gone"));
        assert_eq!(journal, "<3>gone pid=7\n");
    }

    #[test]
    fn journal_mode_sends_each_line_and_falls_back_to_stderr() {
        let dir = std::env::temp_dir().join(format!("orch-console-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("journal");
        let _ = std::fs::remove_file(&path);
        let server = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let journal = Journal::connect(&path).unwrap();
        let (queue, receiver, counters) = super::queue();
        queue_lines(&queue, b"one\ntwo\n");
        drop(queue);
        let mut written = Vec::new();
        write_entries(
            receiver,
            &counters,
            compact(false, true),
            Some(journal),
            |b| written.extend_from_slice(b),
        );
        assert!(
            written.is_empty(),
            "{:?}",
            String::from_utf8_lossy(&written)
        );
        let mut buf = [0u8; 512];
        for expected in ["one", "two"] {
            let n = server.recv(&mut buf).unwrap();
            let entry = String::from_utf8_lossy(&buf[..n]).into_owned();
            assert!(
                entry.starts_with(&format!("MESSAGE={expected}\nPRIORITY=6\n")),
                "{entry}"
            );
            assert!(entry.contains("SYSLOG_IDENTIFIER=api\n"), "{entry}");
        }
        // The journal gone: the lines go to stderr, said once.
        drop(server);
        let _ = std::fs::remove_file(&path);
        let gone = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let journal = Some(Journal::connect(&path).unwrap());
        drop(gone);
        let (queue, receiver, counters) = super::queue();
        queue_lines(&queue, b"three\nfour\n");
        drop(queue);
        let mut written = Vec::new();
        write_entries(receiver, &counters, compact(false, true), journal, |b| {
            written.extend_from_slice(b)
        });
        let text = String::from_utf8(written).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(
            lines[0].starts_with("<4>the journal did not take a line of api"),
            "{text}"
        );
        assert!(
            lines[1].ends_with(" | three") && lines[2].ends_with(" | four"),
            "{text}"
        );

        // journald restarted (a new socket at the same path): the next line
        // reaches it, and the spell on stderr is said to be over.
        let _ = std::fs::remove_file(&path);
        let gone = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        let mut journal = Journal::connect(&path).unwrap();
        drop(gone);
        let mut out = Vec::new();
        let format = compact(false, true);
        to_journal(&mut journal, &mut out, format, "api", &block(b"seven\n"));
        assert_eq!(journal.fallbacks, 1);
        let _ = std::fs::remove_file(&path);
        let restarted = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        out.clear();
        to_journal(&mut journal, &mut out, format, "api", &block(b"eight\n"));
        let n = restarted.recv(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"MESSAGE=eight\n"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains("the journal takes lines again; 1 went to stderr meanwhile"),
            "{text}"
        );
        assert_eq!(journal.fallbacks, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
