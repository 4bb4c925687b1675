//! systemd's journal, for a daemon run as a unit with its stderr there.
//!
//! systemd says so by `JOURNAL_STREAM=DEV:INODE`, the stream its stderr is
//! connected to; the variable alone is not enough, since a child inherits
//! it with other stderr (a shell started from the unit, a redirection).
//! Then the daemon's own lines carry no timestamp or colour (the journal
//! records both its way) but a `<N>` priority prefix, and each service's
//! lines go to the journal's native socket, with the service's name as
//! `SYSLOG_IDENTIFIER`, so that `journalctl -t api` shows one service.
//!
//! The socket is non-blocking: a journal that cannot keep up costs the line
//! its own entry (it goes to stderr instead, as before), never a wait of the
//! console thread, which would hold every service's output back.

use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};

use orchestrator_core::output::Stream;

/// Where journald takes native-protocol datagrams.
const JOURNAL_SOCKET: &str = "/run/systemd/journal/socket";

/// Overrides [`JOURNAL_SOCKET`]; for tests, which cannot bind that path.
const SOCKET_VARIABLE: &str = "ORCHESTRATOR_JOURNAL_SOCKET";

/// syslog priorities (`PRIORITY=`, `<N>`).
pub const PRIORITY_ERR: u8 = 3;
pub const PRIORITY_WARNING: u8 = 4;
pub const PRIORITY_INFO: u8 = 6;
pub const PRIORITY_DEBUG: u8 = 7;

/// A service's stderr is logged as a warning: marked apart from stdout
/// (journalctl highlights it, `-p warning` selects it), yet not as an error,
/// since many programs write all their logging, routine lines included, to
/// stderr, and `journalctl -p err` must stay for real errors.
pub fn stream_priority(stream: Stream) -> u8 {
    match stream {
        Stream::Stdout => PRIORITY_INFO,
        Stream::Stderr => PRIORITY_WARNING,
    }
}

/// Whether `JOURNAL_STREAM`'s value names the stream `stderr` is.
pub fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = journal_stream.trim().split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

/// Whether our stderr is the journal's stream, as systemd's docs say to
/// check: `JOURNAL_STREAM` against an fstat of fd 2.
pub fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some(value) = value.to_str() else {
        return false;
    };
    // /proc/self/fd/2 is followed to the open file itself, a pipe or a
    // socket included; `metadata` of it is fstat(2) without `unsafe`.
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(meta) => names_stream(value, meta.dev(), meta.ino()),
        Err(_) => false,
    }
}

/// The journal's socket. Not connected: each entry is sent to the path,
/// as sd_journal does, so a journald restarted (by a package upgrade, say)
/// gets the next line; a connected socket would refuse every line after.
pub struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
    /// Reused for every entry.
    buffer: Vec<u8>,
    /// Lines that went to stderr instead since the journal last took one.
    pub fallbacks: u64,
}

impl Journal {
    pub fn socket_path() -> PathBuf {
        std::env::var_os(SOCKET_VARIABLE)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(JOURNAL_SOCKET))
    }

    /// Checks once, at start, that the journal's socket is there.
    pub fn connect(path: &Path) -> io::Result<Self> {
        use std::os::unix::fs::FileTypeExt;
        if !std::fs::metadata(path)?.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a socket", path.display()),
            ));
        }
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            path: path.to_owned(),
            buffer: Vec::with_capacity(512),
            fallbacks: 0,
        })
    }

    /// Sends one line (without its `\n`) as an entry of its own.
    pub fn send(&mut self, service: &str, stream: Stream, line: &[u8]) -> io::Result<()> {
        self.buffer.clear();
        encode_entry(&mut self.buffer, service, stream, line);
        self.socket.send_to(&self.buffer, &self.path).map(|_| ())
    }
}

/// One entry of the native protocol: `KEY=value\n` fields, or for a value
/// holding a newline, `KEY\n`, its length as 64-bit little endian, the
/// value and `\n`.
pub fn encode_entry(out: &mut Vec<u8>, service: &str, stream: Stream, line: &[u8]) {
    field(out, "MESSAGE", line);
    let _ = writeln!(out, "PRIORITY={}", stream_priority(stream));
    field(out, "SYSLOG_IDENTIFIER", service.as_bytes());
    field(out, "ORCHESTRATOR_SERVICE", service.as_bytes());
    let _ = writeln!(out, "ORCHESTRATOR_STREAM={}", stream.as_str());
}

pub fn field(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    out.extend_from_slice(key.as_bytes());
    if memchr::memchr(b'\n', value).is_some() {
        out.push(b'\n');
        out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        out.push(b'=');
    }
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_has_the_message_identifier_and_priority_by_stream() {
        let mut out = Vec::new();
        encode_entry(&mut out, "api", Stream::Stdout, b"hello = world");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "MESSAGE=hello = world\nPRIORITY=6\nSYSLOG_IDENTIFIER=api\n\
             ORCHESTRATOR_SERVICE=api\nORCHESTRATOR_STREAM=stdout\n"
        );
        let mut out = Vec::new();
        encode_entry(&mut out, "db", Stream::Stderr, b"");
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("MESSAGE=\nPRIORITY=4\n"), "{text}");
        assert!(text.ends_with("ORCHESTRATOR_STREAM=stderr\n"), "{text}");
    }

    #[test]
    fn a_value_with_a_newline_takes_the_binary_form() {
        let mut out = Vec::new();
        field(&mut out, "MESSAGE", b"two\nlines");
        let mut expected = b"MESSAGE\n".to_vec();
        expected.extend_from_slice(&9u64.to_le_bytes());
        expected.extend_from_slice(b"two\nlines\n");
        assert_eq!(out, expected);
        // Other bytes, `=` and controls included, stay in the plain form.
        let mut out = Vec::new();
        field(&mut out, "MESSAGE", b"a=b\x1b[31m\r");
        assert_eq!(out, b"MESSAGE=a=b\x1b[31m\r\n");
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        assert!(names_stream("2049:12345", 2049, 12345));
        assert!(names_stream("2049:12345\n", 2049, 12345));
        assert!(!names_stream("2049:12346", 2049, 12345), "another inode");
        assert!(!names_stream("2048:12345", 2049, 12345), "another device");
        for junk in [
            "",
            "2049",
            ":",
            "2049:",
            "x:12345",
            "2049:12345:1",
            "-1:12345",
        ] {
            assert!(!names_stream(junk, 2049, 12345), "{junk:?}");
        }
    }

    #[test]
    fn lines_arrive_as_datagrams_without_blocking() {
        let dir = std::env::temp_dir().join(format!("orch-journal-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("socket");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let mut journal = Journal::connect(&path).unwrap();
        journal.send("api", Stream::Stderr, b"oops").unwrap();
        let mut buf = [0u8; 1024];
        let n = server.recv(&mut buf).unwrap();
        let text = String::from_utf8_lossy(&buf[..n]);
        assert!(text.contains("MESSAGE=oops\n"), "{text}");
        assert!(text.contains("SYSLOG_IDENTIFIER=api\n"), "{text}");
        // A journal that takes nothing: the send fails at once, never waits.
        let mut refused = None;
        for _ in 0..100_000 {
            if let Err(err) = journal.send("api", Stream::Stdout, &[b'x'; 1000]) {
                refused = Some(err);
                break;
            }
        }
        let refused = refused.expect("a full socket refuses");
        assert_eq!(refused.kind(), io::ErrorKind::WouldBlock, "{refused}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
