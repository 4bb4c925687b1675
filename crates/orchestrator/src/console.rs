//! The daemon's console for service lines: the same look as the tracing
//! log (text or JSON, fields `service` and `stream`), but formatted a batch
//! at a time into one buffer and written with one syscall.

use std::io::Write;
use std::sync::{Mutex, PoisonError};
use std::time::SystemTime;

use orchestrator_core::events::rfc3339;
use orchestrator_core::output::{Console, Stream};
use serde::Serialize;

pub struct ServiceConsole {
    json: bool,
    ansi: bool,
    /// Reused between batches; also serialises whole batches on stderr.
    buffer: Mutex<Vec<u8>>,
}

#[derive(Serialize)]
struct JsonLine<'a> {
    timestamp: &'a str,
    level: &'static str,
    message: &'a str,
    service: &'a str,
    stream: &'static str,
}

impl ServiceConsole {
    pub fn new(json: bool, ansi: bool) -> Self {
        ServiceConsole {
            json,
            ansi,
            buffer: Mutex::new(Vec::new()),
        }
    }

    fn format(&self, out: &mut Vec<u8>, service: &str, stream: Stream, segments: &[&[u8]]) {
        let timestamp = rfc3339(SystemTime::now());
        let joined;
        let bytes: &[u8] = match segments {
            [one] => one,
            _ => {
                joined = segments.concat();
                &joined
            }
        };
        // Plain text is assembled from slices: formatting machinery and
        // lossy conversion per line cost more than the pipe itself.
        let mut text_prefix = Vec::new();
        let mut text_suffix = Vec::new();
        if !self.json {
            if self.ansi {
                let _ = write!(
                    text_prefix,
                    "\x1b[2m{timestamp}\x1b[0m \x1b[32m INFO\x1b[0m "
                );
                let _ = writeln!(
                    text_suffix,
                    " \x1b[3mservice\x1b[0m\x1b[2m=\x1b[0m{service} \x1b[3mstream\x1b[0m\x1b[2m=\x1b[0m{}",
                    stream.as_str()
                );
            } else {
                let _ = write!(text_prefix, "{timestamp}  INFO ");
                let _ = writeln!(text_suffix, " service={service} stream={}", stream.as_str());
            }
        }
        for line in bytes.split_inclusive(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\n").unwrap_or(line);
            if self.json {
                let text = String::from_utf8_lossy(line);
                let record = JsonLine {
                    timestamp: &timestamp,
                    level: "INFO",
                    message: &text,
                    service,
                    stream: stream.as_str(),
                };
                if serde_json::to_writer(&mut *out, &record).is_ok() {
                    out.push(b'\n');
                }
                continue;
            }
            out.extend_from_slice(&text_prefix);
            match std::str::from_utf8(line) {
                Ok(_) => out.extend_from_slice(line),
                Err(_) => out.extend_from_slice(String::from_utf8_lossy(line).as_bytes()),
            }
            out.extend_from_slice(&text_suffix);
        }
    }
}

impl Console for ServiceConsole {
    fn lines(&self, service: &str, stream: Stream, segments: &[&[u8]]) {
        let mut buffer = self.buffer.lock().unwrap_or_else(PoisonError::into_inner);
        buffer.clear();
        self.format(&mut buffer, service, stream, segments);
        // A console that went away (closed terminal) must not stop services.
        let _ = std::io::stderr().lock().write_all(&buffer);
        if buffer.capacity() > 1 << 20 {
            *buffer = Vec::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn formatted(json: bool, segments: &[&[u8]]) -> String {
        let console = ServiceConsole::new(json, false);
        let mut out = Vec::new();
        console.format(&mut out, "api", Stream::Stderr, segments);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn text_lines_carry_service_and_stream() {
        let text = formatted(false, &[b"one\ntw", b"o\n", b"bad \xff\n"]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(
            lines[0].ends_with("  INFO one service=api stream=stderr"),
            "{}",
            lines[0]
        );
        assert!(lines[1].contains(" INFO two service=api"), "{}", lines[1]);
        assert!(
            lines[2].contains("bad \u{fffd} service=api"),
            "{}",
            lines[2]
        );
    }

    #[test]
    fn json_lines_are_one_object_each() {
        let text = formatted(true, &[b"say \"hi\"\n\n"]);
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
