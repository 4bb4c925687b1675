//! The per-service log file: append whole lines, rotate by size or age,
//! gzip what was rotated, survive a failing disk.
//!
//! Everything here is synchronous and may block on the disk for as long as
//! it likes, so it runs on a writer thread (`writer`), never on the async
//! runtime; the caller passes the current monotonic time so that tests can
//! move it.

use std::ffi::OsString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, IoSlice, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use super::{FileOptions, LogBlock};
use crate::events::rfc3339;

/// Least time between two attempts to open the file after a failure, so that
/// a broken disk costs one failed syscall per second, not one per line.
pub(crate) const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How often a busy writer checks that the path still names the file it
/// writes to, so that a log file removed or moved away is created anew.
pub(crate) const IDENTITY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Slices passed to one `writev(2)`; more are written in several calls.
const MAX_IOVECS: usize = 16;

pub(crate) struct LogFile {
    service: Box<str>,
    /// What the file is, for messages: a service's log, or the event log.
    what: &'static str,
    path: PathBuf,
    /// 0: never rotate.
    max_bytes: u64,
    /// Rotated files kept; 0: the live file is started over.
    max_files: u32,
    /// A file older than this is rotated on its next write.
    max_age: Option<Duration>,
    compress: bool,
    /// Gzipping `NAME.log.1`: the next rotation waits for it, so that the
    /// renames never move a file being read or written.
    compressor: Option<JoinHandle<()>>,
    file: Option<OpenFile>,
    /// Earliest time to try opening again after a failure.
    retry_at: Option<Instant>,
    check_at: Instant,
    /// A failure episode is under way: it has been reported, bytes are being
    /// dropped, and the end of it will be reported too.
    failing: bool,
    rotation_failing: bool,
}

struct OpenFile {
    file: File,
    /// Bytes in the file, tracked here so that no syscall is needed per write.
    size: u64,
    dev: u64,
    ino: u64,
    /// When the file was created, on the caller's clock, for `max_age`.
    born: Instant,
}

impl LogFile {
    pub(crate) fn new(
        service: &str,
        path: PathBuf,
        max_bytes: u64,
        max_files: u32,
        now: Instant,
    ) -> Self {
        let log = Self {
            service: service.into(),
            what: "the service log file",
            path,
            max_bytes,
            max_files,
            max_age: None,
            compress: false,
            compressor: None,
            file: None,
            retry_at: None,
            check_at: now + IDENTITY_CHECK_INTERVAL,
            failing: false,
            rotation_failing: false,
        };
        // Opened on the first write: a service that prints nothing costs no
        // descriptor (every spawn copies the daemon's descriptor table) and
        // no inode.
        log
    }

    pub(crate) fn with_options(mut self, options: FileOptions) -> Self {
        self.set_options(options);
        self
    }

    pub(crate) fn set_options(&mut self, options: FileOptions) {
        self.max_age = options.max_age;
        self.compress = options.compress;
    }

    /// Appends whole lines (the concatenation of `segments`, which ends in
    /// `\n`) and returns how many bytes could not be written.
    pub(crate) fn write(&mut self, segments: &[&[u8]], now: Instant) -> u64 {
        let total: usize = segments.iter().map(|s| s.len()).sum();
        if total == 0 {
            return 0;
        }
        #[cfg(test)]
        hang::wait_while_hung(&self.path);
        if self.file.is_some() && now >= self.check_at {
            self.check_identity(now);
        }
        if self.file.is_none() && !self.reopen(now) {
            return total as u64;
        }
        if let (Some(max_age), Some(open)) = (self.max_age, &self.file)
            && open.size > 0
            && now.saturating_duration_since(open.born) >= max_age
        {
            self.rotate(now);
        }

        let mut cursor = Cursor::new(segments);
        let mut remaining = total;
        let mut rotated = false;
        while remaining > 0 {
            let Some(open) = self.file.as_mut() else {
                return remaining as u64;
            };
            // Right after a rotation the file counts as empty even if it is
            // not (recreated by someone else, or a rename that did nothing
            // because both names were links to one file): at least one line
            // is written per rotation, so this loop always ends.
            let size = if rotated { 0 } else { open.size };
            let n = next_write_len(size, self.max_bytes, &cursor, remaining);
            if n > 0 {
                if let Err((written, err)) = write_all(&mut open.file, &cursor, n) {
                    self.fail("write to", &err, now);
                    return (remaining - written) as u64;
                }
                open.size += n as u64;
                cursor.advance(n);
                remaining -= n;
            }
            rotated = remaining > 0;
            if rotated {
                self.rotate(now);
            }
        }
        if self.failing {
            self.failing = false;
            tracing::info!(
                service = %self.service,
                path = %self.path.display(),
                "writing {} again",
                self.what
            );
        }
        0
    }

    /// A failure episode is under way (bytes are being dropped).
    pub(crate) fn is_failing(&self) -> bool {
        self.failing
    }

    /// Waits for the rotated file being gzipped, if any. (Not on drop: the
    /// last reference may go on a runtime worker, which must not wait.)
    pub(crate) fn finish_compressing(&mut self) {
        if let Some(compressor) = self.compressor.take() {
            let _ = compressor.join();
        }
    }

    /// True when no gzip is running: one that has ended is joined (which
    /// then does not wait).
    pub(crate) fn compressing_finished(&mut self) -> bool {
        match &self.compressor {
            Some(compressor) if !compressor.is_finished() => false,
            _ => {
                self.finish_compressing();
                true
            }
        }
    }

    /// Bytes in the live file, as tracked.
    #[cfg(test)]
    pub(crate) fn size(&self) -> Option<u64> {
        self.file.as_ref().map(|f| f.size)
    }

    fn open(&mut self, now: Instant) -> bool {
        match open_log(&self.path, now) {
            Ok(file) => {
                self.file = Some(file);
                self.retry_at = None;
                self.check_at = now + IDENTITY_CHECK_INTERVAL;
                true
            }
            Err(err) => {
                self.fail("open", &err, now);
                false
            }
        }
    }

    /// The daemon's event log rather than a service's output: its messages
    /// say so and name no service.
    pub(crate) fn for_events(mut self) -> Self {
        self.service = "-".into();
        self.what = "the event log";
        self
    }

    fn reopen(&mut self, now: Instant) -> bool {
        if self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        self.open(now)
    }

    /// Closes the file and starts (or continues) a failure episode; the file
    /// is opened again on a write after `RETRY_INTERVAL`, which also recovers
    /// from errors tied to the old descriptor (EIO, a removed directory).
    fn fail(&mut self, action: &str, err: &io::Error, now: Instant) {
        self.file = None;
        self.retry_at = Some(now + RETRY_INTERVAL);
        if !self.failing {
            self.failing = true;
            tracing::warn!(
                service = %self.service,
                path = %self.path.display(),
                error = %err,
                "cannot {action} {}; what it records goes to the orchestrator log and memory only \
                 until it works again (retried every second)",
                self.what
            );
        }
    }

    /// Follows the path when the file was removed or moved away (by hand or
    /// by an external logrotate), and picks up the real size when the file
    /// was truncated behind our back.
    fn check_identity(&mut self, now: Instant) {
        self.check_at = now + IDENTITY_CHECK_INTERVAL;
        let Some(open) = self.file.as_mut() else {
            return;
        };
        match fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.dev() == open.dev && meta.ino() == open.ino => {
                open.size = meta.len();
            }
            Ok(_) => self.reopen_moved(now),
            Err(err) if err.kind() == io::ErrorKind::NotFound => self.reopen_moved(now),
            // The path is unreachable for now (e.g. a directory permission);
            // the open descriptor still works, so keep using it.
            Err(_) => {}
        }
    }

    fn reopen_moved(&mut self, now: Instant) {
        tracing::info!(
            service = %self.service,
            path = %self.path.display(),
            "{} was moved or removed; creating it again",
            self.what
        );
        self.file = None;
        self.open(now);
    }

    /// NAME.log.(k) → NAME.log.(k+1) for k = max_files-1 .. 1, NAME.log →
    /// NAME.log.1, then a fresh NAME.log. Renaming onto NAME.log.(max_files)
    /// replaces the oldest file, which is how it is deleted.
    ///
    /// With `max_files == 0`, or when the live file cannot be moved away, it
    /// is truncated in place instead: keeping the disk bounded matters more
    /// than the old lines, and a `tail -f` reader survives a truncation
    /// (not the removal of the file it follows).
    fn rotate(&mut self, now: Instant) {
        let mut problem = None;
        if self.max_files > 0 {
            if let Some(compressor) = self.compressor.take() {
                let _ = compressor.join();
            }
            // A file moved into the last place replaces the one there, but
            // only if it has the same form: a `.N.gz` would stay beside a
            // new `.N` and the files kept would grow past max_files.
            let last = self.max_files;
            let incoming = last == 1
                || self.numbered(last - 1).exists()
                || gz(&self.numbered(last - 1)).exists();
            if incoming {
                for oldest in [self.numbered(last), gz(&self.numbered(last))] {
                    if let Err(err) = remove_if_exists(&oldest) {
                        problem.get_or_insert(err);
                    }
                }
            }
            for k in (1..self.max_files).rev() {
                for (from, to) in [
                    (self.numbered(k), self.numbered(k + 1)),
                    (gz(&self.numbered(k)), gz(&self.numbered(k + 1))),
                ] {
                    if let Err(err) = rename_if_exists(&from, &to) {
                        problem.get_or_insert(err);
                    }
                }
            }
            match rename_if_exists(&self.path, &self.numbered(1)) {
                Ok(()) => {
                    self.rotation_done(problem);
                    self.file = None;
                    self.open(now);
                    if self.compress {
                        self.start_compressing(self.numbered(1));
                    }
                    return;
                }
                Err(err) => {
                    problem.get_or_insert(err);
                }
            }
        }
        if let Some(open) = self.file.as_mut() {
            if let Err(err) = open.file.set_len(0) {
                // E.g. an append-only file: let it grow, and try again only
                // after another `max_bytes`, not before every write.
                problem.get_or_insert(err);
            }
            open.size = 0;
            open.born = now;
        }
        self.rotation_done(problem);
    }

    /// Gzips a rotated file on a thread of its own: compressing takes far
    /// longer than writing, and the writer must go on with the live file.
    fn start_compressing(&mut self, path: PathBuf) {
        let service = self.service.clone();
        let spawned = std::thread::Builder::new()
            .name("log-gzip".into())
            .spawn(move || {
                if let Err(err) = compress(&path) {
                    tracing::warn!(
                        service = %service,
                        path = %path.display(),
                        error = %err,
                        "cannot gzip the rotated log file; it is kept uncompressed"
                    );
                }
            });
        match spawned {
            Ok(handle) => self.compressor = Some(handle),
            Err(err) => tracing::warn!(
                service = %self.service,
                error = %err,
                "cannot start a thread to gzip the rotated log file; it is kept uncompressed"
            ),
        }
    }

    fn rotation_done(&mut self, problem: Option<io::Error>) {
        match problem {
            Some(err) if !self.rotation_failing => {
                self.rotation_failing = true;
                tracing::warn!(
                    service = %self.service,
                    path = %self.path.display(),
                    error = %err,
                    "cannot rotate {} as configured",
                    self.what
                );
            }
            Some(_) => {}
            None => self.rotation_failing = false,
        }
    }

    fn numbered(&self, k: u32) -> PathBuf {
        let mut name = OsString::from(self.path.as_os_str());
        name.push(format!(".{k}"));
        PathBuf::from(name)
    }
}

/// `NAME.log.k` → `NAME.log.k.gz`.
fn gz(path: &Path) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(".gz");
    PathBuf::from(name)
}

/// `path` → `path.gz`, then `path` removed; on failure the archive goes
/// and `path` stays, so a line is never lost to a half-written archive.
/// Written as `path.gz.tmp` and renamed once whole: a daemon that ends
/// mid-way (exit, upgrade, kill) leaves a `.tmp` that no reader takes for
/// an archive, beside the whole plain file.
fn compress(path: &Path) -> io::Result<()> {
    let target = gz(path);
    let mut partial = OsString::from(target.as_os_str());
    partial.push(".tmp");
    let partial = PathBuf::from(partial);
    let result = (|| {
        let mut source = File::open(path)?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&partial)?;
        let mut encoder = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        io::copy(&mut source, &mut encoder)?;
        encoder.finish()?.sync_all()?;
        fs::rename(&partial, &target)?;
        fs::remove_file(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&partial);
    }
    result
}

fn remove_if_exists(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// The lines of `block` as a log file with timestamps has them:
/// `2026-12-03T02:23:13.123Z stdout line`. A marker block is already whole.
pub(crate) fn stamp(block: &LogBlock, out: &mut Vec<u8>) {
    if block.first_seq == super::MARKER_SEQ {
        out.extend_from_slice(&block.bytes);
        return;
    }
    let mut prefix = rfc3339(block.time).into_bytes();
    prefix.push(b' ');
    prefix.extend_from_slice(block.stream.as_str().as_bytes());
    prefix.push(b' ');
    let mut start = 0;
    for end in memchr::memchr_iter(b'\n', &block.bytes) {
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&block.bytes[start..=end]);
        start = end + 1;
    }
    // Bytes without a final newline (not what the framer passes) stay.
    if start < block.bytes.len() {
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&block.bytes[start..]);
    }
}

/// The line a log file with timestamps gets at each start of the service.
pub(crate) fn start_marker(time: SystemTime, pid: u32, restarts: u64) -> Vec<u8> {
    let restart = match restarts {
        0 => String::new(),
        n => format!(" (restart {n})"),
    };
    format!(
        "{time} --- orchestrator: started pid {pid}{restart} ---\n",
        time = rfc3339(time)
    )
    .into_bytes()
}

fn open_log(path: &Path, now: Instant) -> io::Result<OpenFile> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    }
    // O_NOFOLLOW: a symlink planted at the path must not redirect our
    // writes. O_NONBLOCK: a FIFO planted there must fail the open, not hang
    // it; it has no effect on a regular file.
    let file = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    // A file kept from before (a restarted daemon) is as old as its birth
    // time says, where the file system records one.
    let age = match meta.len() {
        0 => Duration::ZERO,
        _ => meta
            .created()
            .ok()
            .and_then(|created| SystemTime::now().duration_since(created).ok())
            .unwrap_or_default(),
    };
    Ok(OpenFile {
        file,
        size: meta.len(),
        dev: meta.dev(),
        ino: meta.ino(),
        born: now.checked_sub(age).unwrap_or(now),
    })
}

fn rename_if_exists(from: &Path, to: &Path) -> io::Result<()> {
    match fs::rename(from, to) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// How many of the `remaining` bytes to write before rotating: all of them
/// when they fit, else up to the last `\n` that fits. A line that alone is
/// larger than `max_bytes` goes whole into a fresh file; a line is never
/// split across two files.
fn next_write_len(size: u64, max_bytes: u64, cursor: &Cursor<'_, '_>, remaining: usize) -> usize {
    if max_bytes == 0 {
        return remaining;
    }
    let room = max_bytes.saturating_sub(size);
    if remaining as u64 <= room {
        return remaining;
    }
    // `room < remaining`, so it fits in a usize.
    if let Some(i) = cursor.last_newline_before(room as usize) {
        return i + 1;
    }
    if size == 0 {
        return cursor.first_newline().map_or(remaining, |i| i + 1);
    }
    0
}

/// Writes the next `n` bytes at the cursor, retrying short writes; on error
/// returns how many bytes were written before it.
fn write_all(file: &mut File, cursor: &Cursor<'_, '_>, n: usize) -> Result<(), (usize, io::Error)> {
    let mut cursor = cursor.clone();
    let mut written = 0;
    while written < n {
        let mut iovecs = [IoSlice::new(&[]); MAX_IOVECS];
        let (count, bytes) = cursor.fill(&mut iovecs, n - written);
        let mut bufs = &mut iovecs[..count];
        let mut done = 0;
        while done < bytes {
            match file.write_vectored(bufs) {
                Ok(0) => return Err((written + done, io::ErrorKind::WriteZero.into())),
                Ok(k) => {
                    done += k;
                    IoSlice::advance_slices(&mut bufs, k);
                }
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err((written + done, err)),
            }
        }
        cursor.advance(bytes);
        written += bytes;
    }
    Ok(())
}

/// A position in a list of slices.
#[derive(Clone)]
struct Cursor<'s, 'd> {
    segments: &'s [&'d [u8]],
    index: usize,
    offset: usize,
}

impl<'s, 'd> Cursor<'s, 'd> {
    fn new(segments: &'s [&'d [u8]]) -> Self {
        let mut cursor = Self {
            segments,
            index: 0,
            offset: 0,
        };
        cursor.skip_empty();
        cursor
    }

    /// The slices from the cursor on, the first one trimmed.
    fn rest(&self) -> impl Iterator<Item = &'d [u8]> + '_ {
        self.segments[self.index..]
            .iter()
            .enumerate()
            .map(|(i, s)| if i == 0 { &s[self.offset..] } else { *s })
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let left = self.segments[self.index].len() - self.offset;
            if n < left {
                self.offset += n;
                return;
            }
            n -= left;
            self.index += 1;
            self.offset = 0;
        }
        self.skip_empty();
    }

    fn skip_empty(&mut self) {
        while self.index < self.segments.len() && self.segments[self.index].len() == self.offset {
            self.index += 1;
            self.offset = 0;
        }
    }

    /// Fills `iovecs` with up to `limit` bytes from the cursor; returns the
    /// number of slices and of bytes.
    fn fill(&self, iovecs: &mut [IoSlice<'d>], limit: usize) -> (usize, usize) {
        let mut count = 0;
        let mut bytes = 0;
        for segment in self.rest() {
            if count == iovecs.len() || bytes == limit {
                break;
            }
            let take = segment.len().min(limit - bytes);
            if take > 0 {
                iovecs[count] = IoSlice::new(&segment[..take]);
                count += 1;
                bytes += take;
            }
        }
        (count, bytes)
    }

    fn first_newline(&self) -> Option<usize> {
        let mut base = 0;
        for segment in self.rest() {
            if let Some(i) = memchr::memchr(b'\n', segment) {
                return Some(base + i);
            }
            base += segment.len();
        }
        None
    }

    /// The offset of the last `\n` among the next `limit` bytes.
    fn last_newline_before(&self, limit: usize) -> Option<usize> {
        let mut base = 0;
        let mut found = None;
        for segment in self.rest() {
            if base >= limit {
                break;
            }
            let visible = &segment[..segment.len().min(limit - base)];
            if let Some(i) = memchr::memrchr(b'\n', visible) {
                found = Some(base + i);
            }
            base += segment.len();
        }
        found
    }
}

/// Makes writes to a path hang, as on a frozen disk, for as long as a
/// [`hang::Hang`] for it lives.
#[cfg(test)]
pub(crate) mod hang {
    use std::path::{Path, PathBuf};
    use std::sync::{Condvar, Mutex, PoisonError};

    static HUNG: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());
    static RELEASED: Condvar = Condvar::new();

    pub(crate) struct Hang(PathBuf);

    impl Hang {
        pub(crate) fn new(path: &Path) -> Self {
            let mut hung = HUNG.lock().unwrap_or_else(PoisonError::into_inner);
            hung.push(path.to_owned());
            Self(path.to_owned())
        }
    }

    impl Drop for Hang {
        fn drop(&mut self) {
            let mut hung = HUNG.lock().unwrap_or_else(PoisonError::into_inner);
            hung.retain(|p| *p != self.0);
            RELEASED.notify_all();
        }
    }

    pub(super) fn wait_while_hung(path: &Path) {
        let mut hung = HUNG.lock().unwrap_or_else(PoisonError::into_inner);
        while hung.iter().any(|p| p == path) {
            hung = RELEASED.wait(hung).unwrap_or_else(PoisonError::into_inner);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::test_support::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn lines(range: std::ops::Range<usize>) -> Vec<u8> {
        range
            .flat_map(|i| format!("line {i:05}\n").into_bytes())
            .collect()
    }

    #[test]
    fn creates_private_dir_and_file() {
        let tmp = TempDir::new("create");
        let path = tmp.path().join("logs/svc.log");
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 0, 3, now);
        assert_eq!(log.write(&[b"hello\n"], now), 0);
        assert_eq!(fs::read(&path).unwrap(), b"hello\n");
        let dir_mode = fs::metadata(path.parent().unwrap())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let file_mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(file_mode & 0o777, 0o600);

        // A new instance (a restarted daemon) appends and knows the size.
        drop(log);
        let mut log = LogFile::new("svc", path.clone(), 0, 3, now);
        assert_eq!(log.write(&[b"again\n"], now), 0);
        assert_eq!(log.size(), Some(12), "appended, the size known");
        assert_eq!(fs::read(&path).unwrap(), b"hello\nagain\n");
    }

    #[test]
    fn refuses_a_symlink() {
        let tmp = TempDir::new("symlink");
        let target = tmp.path().join("target");
        fs::write(&target, b"").unwrap();
        let path = tmp.path().join("svc.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let now = Instant::now();
        let mut log = LogFile::new("svc", path, 0, 3, now);
        assert_eq!(log.write(&[b"x\n"], now), 2);
        assert_eq!(fs::read(&target).unwrap(), b"");
    }

    #[test]
    fn rotation_splits_batches_at_line_boundaries() {
        let tmp = TempDir::new("rotate-split");
        let path = tmp.path().join("svc.log");
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 100, 100, now);
        // 11-byte lines: 9 fit in 100 bytes.
        let data = lines(0..40);
        let (a, b) = data.split_at(200);
        assert_eq!(log.write(&[a, b], now), 0);
        let mut all = Vec::new();
        for k in (1..=4).rev() {
            let bytes = fs::read(format!("{}.{k}", path.display())).unwrap();
            assert_eq!(bytes.len(), 99, "file .{k}");
            all.extend(bytes);
        }
        assert!(!tmp.path().join("svc.log.5").exists());
        all.extend(fs::read(&path).unwrap());
        assert_eq!(all, data);
    }

    #[test]
    fn rotation_keeps_max_files() {
        let tmp = TempDir::new("rotate-keep");
        let path = tmp.path().join("svc.log");
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 50, 2, now);
        for i in 0..100 {
            assert_eq!(log.write(&[&lines(i..i + 1)], now), 0);
        }
        let mut names: Vec<String> = fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["svc.log", "svc.log.1", "svc.log.2"]);
        let mut tail = fs::read(tmp.path().join("svc.log.2")).unwrap();
        tail.extend(fs::read(tmp.path().join("svc.log.1")).unwrap());
        tail.extend(fs::read(&path).unwrap());
        let expected = lines(100 - tail.len() / 11..100);
        assert_eq!(tail, expected);
    }

    #[test]
    fn zero_max_files_starts_over() {
        let tmp = TempDir::new("rotate-zero");
        let path = tmp.path().join("svc.log");
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 30, 0, now);
        assert_eq!(log.write(&[&lines(0..1)], now), 0);
        let ino = fs::metadata(&path).unwrap().ino();
        for i in 1..10 {
            assert_eq!(log.write(&[&lines(i..i + 1)], now), 0);
        }
        assert_eq!(fs::read_dir(tmp.path()).unwrap().count(), 1);
        // Truncated in place, so that `tail -f` keeps following it.
        assert_eq!(fs::metadata(&path).unwrap().ino(), ino);
        // 11-byte lines, two fit in 30 bytes.
        assert_eq!(fs::read(&path).unwrap(), lines(8..10));
    }

    #[test]
    fn a_live_file_that_cannot_be_moved_is_truncated() {
        let tmp = TempDir::new("rotate-blocked");
        let path = tmp.path().join("svc.log");
        // rename(2) of a file onto a non-empty directory fails.
        let blocker = tmp.path().join("svc.log.1");
        fs::create_dir_all(blocker.join("keep")).unwrap();
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 30, 1, now);
        for i in 0..10 {
            assert_eq!(log.write(&[&lines(i..i + 1)], now), 0);
        }
        assert!(blocker.join("keep").is_dir());
        assert_eq!(fs::read(&path).unwrap(), lines(8..10));
    }

    #[test]
    fn a_line_longer_than_max_bytes_is_kept_whole() {
        let tmp = TempDir::new("rotate-long");
        let path = tmp.path().join("svc.log");
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 10, 5, now);
        assert_eq!(
            log.write(&[b"ab\n", b"0123456789abcdef", b"\n", b"cd\n"], now),
            0
        );
        assert_eq!(fs::read(format!("{}.2", path.display())).unwrap(), b"ab\n");
        assert_eq!(
            fs::read(format!("{}.1", path.display())).unwrap(),
            b"0123456789abcdef\n"
        );
        assert_eq!(fs::read(&path).unwrap(), b"cd\n");
    }

    #[test]
    fn unwritable_path_drops_bytes_and_retries_once_a_second() {
        let tmp = TempDir::new("unwritable");
        let blocker = tmp.path().join("logs");
        fs::write(&blocker, b"a file where the directory should be").unwrap();
        let path = blocker.join("svc.log");
        let start = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 0, 3, start);
        assert_eq!(log.write(&[b"lost\n"], start), 5);

        fs::remove_file(&blocker).unwrap();
        // Too early to try again, even though it would work now.
        let soon = start + RETRY_INTERVAL / 2;
        assert_eq!(log.write(&[b"lost too\n"], soon), 9);
        assert!(!path.exists());

        let later = start + RETRY_INTERVAL;
        assert_eq!(log.write(&[b"kept\n"], later), 0);
        assert_eq!(fs::read(&path).unwrap(), b"kept\n");
    }

    #[test]
    fn a_removed_file_is_created_again() {
        let tmp = TempDir::new("removed");
        let path = tmp.path().join("svc.log");
        let start = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 0, 3, start);
        assert_eq!(log.write(&[b"one\n"], start), 0);
        fs::rename(&path, tmp.path().join("moved.log")).unwrap();
        // Until the next check, lines follow the moved file.
        assert_eq!(log.write(&[b"two\n"], start), 0);
        let later = start + IDENTITY_CHECK_INTERVAL;
        assert_eq!(log.write(&[b"three\n"], later), 0);
        assert_eq!(
            fs::read(tmp.path().join("moved.log")).unwrap(),
            b"one\ntwo\n"
        );
        assert_eq!(fs::read(&path).unwrap(), b"three\n");
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn gunzip(path: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        io::Read::read_to_end(
            &mut flate2::read::GzDecoder::new(File::open(path).unwrap()),
            &mut out,
        )
        .unwrap();
        out
    }

    fn aged(max_age: Duration, compress: bool) -> FileOptions {
        FileOptions {
            timestamps: false,
            max_age: Some(max_age),
            compress,
        }
    }

    #[test]
    fn a_file_older_than_max_age_is_rotated_on_the_next_write() {
        let tmp = TempDir::new("rotate-age");
        let path = tmp.path().join("svc.log");
        let start = Instant::now();
        let day = Duration::from_secs(86_400);
        let mut log = LogFile::new("svc", path.clone(), 0, 3, start).with_options(aged(day, false));
        assert_eq!(log.write(&[b"monday\n"], start), 0);
        assert_eq!(log.write(&[b"still monday\n"], start + day / 2), 0);
        assert_eq!(names(tmp.path()), ["svc.log"], "not a day old yet");
        assert_eq!(log.write(&[b"tuesday\n"], start + day), 0);
        assert_eq!(names(tmp.path()), ["svc.log", "svc.log.1"]);
        assert_eq!(
            fs::read(tmp.path().join("svc.log.1")).unwrap(),
            b"monday\nstill monday\n"
        );
        assert_eq!(fs::read(&path).unwrap(), b"tuesday\n");
        // The new file's age counts from its rotation.
        assert_eq!(log.write(&[b"tuesday night\n"], start + day * 3 / 2), 0);
        assert_eq!(names(tmp.path()), ["svc.log", "svc.log.1"]);
    }

    #[test]
    fn rotated_files_are_gzipped_and_counted_in_max_files() {
        let tmp = TempDir::new("rotate-gz");
        let path = tmp.path().join("svc.log");
        let now = Instant::now();
        let options = FileOptions {
            compress: true,
            ..FileOptions::default()
        };
        let mut log = LogFile::new("svc", path.clone(), 50, 2, now).with_options(options);
        for i in 0..100 {
            assert_eq!(log.write(&[&lines(i..i + 1)], now), 0);
        }
        log.finish_compressing();
        assert_eq!(
            names(tmp.path()),
            ["svc.log", "svc.log.1.gz", "svc.log.2.gz"]
        );
        let mut tail = gunzip(&tmp.path().join("svc.log.2.gz"));
        tail.extend(gunzip(&tmp.path().join("svc.log.1.gz")));
        tail.extend(fs::read(&path).unwrap());
        assert_eq!(tail, lines(100 - tail.len() / 11..100));
    }

    #[test]
    fn a_plain_file_moved_into_the_last_place_replaces_a_gzipped_one() {
        let tmp = TempDir::new("rotate-mixed");
        let path = tmp.path().join("svc.log");
        // Left by an earlier daemon that compressed, now without.
        fs::write(tmp.path().join("svc.log.1"), b"older\n").unwrap();
        fs::write(tmp.path().join("svc.log.2.gz"), b"oldest").unwrap();
        let now = Instant::now();
        let mut log = LogFile::new("svc", path.clone(), 20, 2, now);
        assert_eq!(log.write(&[b"0123456789\n", b"abcdefghij\n"], now), 0);
        assert_eq!(names(tmp.path()), ["svc.log", "svc.log.1", "svc.log.2"]);
        assert_eq!(fs::read(tmp.path().join("svc.log.2")).unwrap(), b"older\n");
    }

    #[test]
    fn stamped_lines_carry_time_and_stream() {
        let block = LogBlock {
            first_seq: 1,
            time: std::time::UNIX_EPOCH + Duration::from_millis(1_795_665_906_789),
            stream: crate::output::Stream::Stderr,
            line_count: 2,
            bytes: std::sync::Arc::new(b"one\n\n".to_vec()),
        };
        let mut out = Vec::new();
        stamp(&block, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-11-26T04:05:06.789Z stderr one\n2026-11-26T04:05:06.789Z stderr \n"
        );
        let marker = start_marker(block.time, 1234, 3);
        assert_eq!(
            marker,
            b"2026-11-26T04:05:06.789Z --- orchestrator: started pid 1234 (restart 3) ---\n"
        );
        assert!(
            !start_marker(block.time, 7, 0)
                .windows(7)
                .any(|w| w == b"restart")
        );
    }

    #[test]
    fn cursor_walks_segments() {
        let segments: [&[u8]; 4] = [b"ab\n", b"", b"cd", b"\nef\n"];
        let mut cursor = Cursor::new(&segments);
        assert_eq!(cursor.first_newline(), Some(2));
        assert_eq!(cursor.last_newline_before(6), Some(5));
        assert_eq!(cursor.last_newline_before(5), Some(2));
        assert_eq!(cursor.last_newline_before(2), None);
        cursor.advance(4);
        assert_eq!(cursor.first_newline(), Some(1));
        let mut iovecs = [IoSlice::new(&[]); 2];
        let (count, bytes) = cursor.fill(&mut iovecs, 100);
        assert_eq!((count, bytes), (2, 5));
        assert_eq!(&*iovecs[0], b"d");
        assert_eq!(&*iovecs[1], b"\nef\n");
    }
}
