//! Line framing: turns the byte chunks read from a pipe into lines of at most
//! [`MAX_LINE_BYTES`], and into the bytes to append to the log file.
//!
//! The file bytes are handed over as a short list of slices borrowed from the
//! read buffer (one vectored write per chunk), so the hot path neither copies
//! nor allocates per line: complete lines that sit next to each other in the
//! chunk, each with its own `\n`, are passed as one slice. Only a line carried
//! over from the previous chunk, and the `\n` added after a split piece, need
//! slices of their own.

use memchr::{memchr, memchr_iter, memrchr};

use super::MAX_LINE_BYTES;

/// Appended after a piece that has no `\n` of its own (a split or final line).
const NEWLINE: &[u8] = b"\n";

/// Slices gathered before they are written. A 64 KiB chunk needs at most
/// about a dozen (a carried line plus four split pieces with their `\n`s); a
/// longer batch is written in several whole-line groups.
const MAX_SEGMENTS: usize = 16;

/// Slices in one group pushed to a batch: a piece and the `\n` after it.
const MAX_GROUP: usize = 2;

/// Where framed output goes. The production sink is per stream
/// (`StreamSink` in the pump); tests record what they get.
pub(crate) trait Sink {
    /// Whether every line must be passed to [`Sink::line`]. When not, whole
    /// lines in the middle of a chunk are only counted
    /// ([`Sink::counted`]): one vectorised count instead of a search per
    /// line.
    fn wants_lines(&self) -> bool {
        true
    }
    /// `count` lines framed without a call to [`Sink::line`], in order with
    /// those that had one; their bytes are in the next write.
    fn counted(&mut self, count: u64);
    /// One line, without its `\n`, in order.
    fn line(&mut self, line: &[u8]);
    /// The file bytes of the lines passed to [`Sink::line`] since the last
    /// call: whole lines only, each ending in `\n`.
    fn write(&mut self, segments: &[&[u8]]);
}

/// Framing state of one stream: only the partial line carried between reads.
#[derive(Debug, Default)]
pub(crate) struct Framer {
    /// Bytes of a line whose end has not been read yet, at most
    /// `MAX_LINE_BYTES`. Kept at zero capacity when empty so that an idle
    /// stream holds no memory.
    partial: Vec<u8>,
}

impl Framer {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Frames one chunk read from the pipe.
    ///
    /// A piece of exactly `MAX_LINE_BYTES` is only cut off once a byte other
    /// than `\n` is known to follow; otherwise a line of exactly that length
    /// would be followed by a spurious empty line.
    pub(crate) fn feed<S: Sink>(&mut self, chunk: &[u8], sink: &mut S) {
        let mut pos = 0;
        let mut partial_done = false;
        if !self.partial.is_empty() {
            let newline = memchr(b'\n', chunk);
            let end = newline.unwrap_or(chunk.len());
            let take = end.min(MAX_LINE_BYTES - self.partial.len());
            self.partial.extend_from_slice(&chunk[..take]);
            if newline == Some(take) {
                pos = take + 1;
                partial_done = true;
            } else if take < chunk.len() {
                // The partial line is full and more of the line follows.
                pos = take;
                partial_done = true;
            } else {
                return;
            }
        }

        let mut batch = Batch::new();
        if partial_done {
            sink.line(&self.partial);
            batch.push(&[&self.partial, NEWLINE], sink);
        }
        // `run` starts the bytes since the last slice boundary: whole lines
        // whose `\n` is in the chunk, written as one slice.
        let mut run = pos;
        let start = pos;
        let rest = &chunk[start..];
        if !sink.wants_lines() && no_line_reaches_the_limit(rest) {
            if let Some(last) = memrchr(b'\n', rest) {
                sink.counted(memchr_iter(b'\n', &rest[..=last]).count() as u64);
                pos = start + last + 1;
            }
        } else {
            Self::frame_each_line(chunk, start, &mut pos, &mut run, &mut batch, sink);
        }
        while chunk.len() - pos > MAX_LINE_BYTES {
            let end = pos + MAX_LINE_BYTES;
            sink.line(&chunk[pos..end]);
            batch.push(&[&chunk[run..end], NEWLINE], sink);
            pos = end;
            run = end;
        }
        batch.push(&[&chunk[run..pos]], sink);
        batch.flush(sink);

        if partial_done {
            self.partial.clear();
        }
        self.partial.extend_from_slice(&chunk[pos..]);
        self.release_memory();
    }

    /// Passes each line of `chunk[start..]` that ends in the chunk to the
    /// sink, splitting those over the limit; advances `pos` past the last
    /// `\n` and `run` to the start of bytes not yet in the batch.
    fn frame_each_line<'a, S: Sink>(
        chunk: &'a [u8],
        start: usize,
        pos: &mut usize,
        run: &mut usize,
        batch: &mut Batch<'a>,
        sink: &mut S,
    ) {
        for i in memchr_iter(b'\n', &chunk[start..]) {
            let newline = start + i;
            while newline - *pos > MAX_LINE_BYTES {
                let end = *pos + MAX_LINE_BYTES;
                sink.line(&chunk[*pos..end]);
                batch.push(&[&chunk[*run..end], NEWLINE], sink);
                *pos = end;
                *run = end;
            }
            sink.line(&chunk[*pos..newline]);
            *pos = newline + 1;
        }
    }

    /// Delivers the partial line, if any: the stream has ended.
    pub(crate) fn finish<S: Sink>(&mut self, sink: &mut S) {
        if !self.partial.is_empty() {
            sink.line(&self.partial);
            sink.write(&[&self.partial, NEWLINE]);
        }
        self.partial = Vec::new();
    }

    /// Takes the partial line, undelivered: a pump being frozen hands it
    /// to the one that resumes the stream.
    pub(crate) fn take_partial(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }

    /// Capacity kept for the partial line; zero when there is none.
    #[cfg(test)]
    pub(crate) fn partial_capacity(&self) -> usize {
        self.partial.capacity()
    }

    fn release_memory(&mut self) {
        if self.partial.is_empty() {
            if self.partial.capacity() > 0 {
                self.partial = Vec::new();
            }
        } else if self.partial.capacity() > 4096 && self.partial.len() < self.partial.capacity() / 4
        {
            // A long line left a large buffer behind; a stream that then goes
            // quiet should not keep it.
            self.partial.shrink_to_fit();
        }
    }
}

/// Whether every run of bytes without a `\n` is shorter than
/// `MAX_LINE_BYTES`, checked with one search per half-limit window: such a
/// run would cover a whole window.
fn no_line_reaches_the_limit(bytes: &[u8]) -> bool {
    bytes
        .chunks_exact(MAX_LINE_BYTES / 2)
        .all(|window| memchr(b'\n', window).is_some())
}

/// Slices gathered for one vectored write.
struct Batch<'a> {
    segments: [&'a [u8]; MAX_SEGMENTS],
    len: usize,
}

impl<'a> Batch<'a> {
    fn new() -> Self {
        Self {
            segments: [&[]; MAX_SEGMENTS],
            len: 0,
        }
    }

    /// Adds a group of slices that together are whole lines, passed to the
    /// sink already. Groups are never split between two writes, so a line
    /// is never split either.
    fn push<S: Sink>(&mut self, group: &[&'a [u8]], sink: &mut S) {
        debug_assert!(group.len() <= MAX_GROUP);
        for segment in group.iter().filter(|s| !s.is_empty()) {
            self.segments[self.len] = segment;
            self.len += 1;
        }
        // Written once full, after this group rather than before the next:
        // by then the lines of the next group have been passed to the sink,
        // and a write must hold exactly the lines passed since the last one
        // (the pump counts a block's lines by them).
        if self.len + MAX_GROUP > MAX_SEGMENTS {
            self.flush(sink);
        }
    }

    fn flush<S: Sink>(&mut self, sink: &mut S) {
        if self.len > 0 {
            sink.write(&self.segments[..self.len]);
            self.len = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        lines: Vec<Vec<u8>>,
        file: Vec<u8>,
        writes: usize,
        /// Takes counts where it can, instead of each line.
        counting: bool,
        counted: u64,
        /// Lines passed or counted since the last write.
        unwritten: u64,
    }

    impl Sink for Recorder {
        fn wants_lines(&self) -> bool {
            !self.counting
        }
        fn counted(&mut self, count: u64) {
            assert!(self.counting, "counted lines though it wants each one");
            self.counted += count;
            self.unwritten += count;
        }
        fn line(&mut self, line: &[u8]) {
            self.lines.push(line.to_vec());
            self.unwritten += 1;
        }
        fn write(&mut self, segments: &[&[u8]]) {
            // The pump's sink hands this count to `Recent::push` as the
            // number of lines in the block.
            let newlines = segments
                .iter()
                .map(|s| memchr_iter(b'\n', s).count() as u64);
            assert_eq!(
                newlines.sum::<u64>(),
                std::mem::take(&mut self.unwritten),
                "a write holds exactly the lines framed since the last one"
            );
            self.writes += 1;
            for segment in segments {
                self.file.extend_from_slice(segment);
            }
        }
    }

    /// What framing must produce, written the obvious way.
    fn reference(input: &[u8]) -> Vec<Vec<u8>> {
        let mut lines = Vec::new();
        let mut parts: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
        if parts.last().is_some_and(|p| p.is_empty()) {
            parts.pop();
        }
        for part in parts {
            if part.is_empty() {
                lines.push(Vec::new());
            }
            lines.extend(part.chunks(MAX_LINE_BYTES).map(<[u8]>::to_vec));
        }
        lines
    }

    fn frame(input: &[u8], chunk: usize) -> Recorder {
        frame_with(input, chunk, false)
    }

    fn frame_with(input: &[u8], chunk: usize, counting: bool) -> Recorder {
        let mut framer = Framer::new();
        let mut recorder = Recorder {
            counting,
            ..Recorder::default()
        };
        for piece in input.chunks(chunk) {
            framer.feed(piece, &mut recorder);
        }
        framer.finish(&mut recorder);
        assert_eq!(framer.partial_capacity(), 0);
        recorder
    }

    fn check(input: &[u8]) {
        let expected = reference(input);
        let mut file = Vec::new();
        for line in &expected {
            file.extend_from_slice(line);
            file.push(b'\n');
        }
        for chunk in [
            1,
            2,
            3,
            7,
            100,
            MAX_LINE_BYTES - 1,
            MAX_LINE_BYTES,
            MAX_LINE_BYTES + 1,
            65536,
            input.len().max(1),
        ] {
            let got = frame(input, chunk);
            assert_eq!(got.lines, expected, "lines, chunk size {chunk}");
            assert_eq!(got.file, file, "file bytes, chunk size {chunk}");
            // Counting instead of passing each line: the same file, and
            // the same number of lines.
            let got = frame_with(input, chunk, true);
            assert_eq!(got.file, file, "file bytes, counting, chunk size {chunk}");
            assert_eq!(
                got.lines.len() as u64 + got.counted,
                expected.len() as u64,
                "lines, counting, chunk size {chunk}"
            );
        }
    }

    fn line_of(len: usize, byte: u8) -> Vec<u8> {
        let mut line = vec![byte; len];
        line.push(b'\n');
        line
    }

    #[test]
    fn plain_and_empty_lines() {
        check(b"one\ntwo\n\n\nthree\n");
        check(b"\n");
        check(b"");
        let got = frame(b"a\n\nb\n", 64);
        assert_eq!(got.lines, [&b"a"[..], b"", b"b"]);
    }

    #[test]
    fn carriage_returns_are_kept() {
        let got = frame(b"dos\r\nline\r\n", 3);
        assert_eq!(got.lines, [&b"dos\r"[..], b"line\r"]);
        assert_eq!(got.file, b"dos\r\nline\r\n");
    }

    #[test]
    fn partial_line_is_delivered_at_the_end() {
        let got = frame(b"first\nno newline", 4);
        assert_eq!(got.lines, [&b"first"[..], b"no newline"]);
        assert_eq!(got.file, b"first\nno newline\n");
        check(b"only partial");
    }

    #[test]
    fn invalid_utf8_is_kept_byte_for_byte() {
        let input: Vec<u8> = (0..=255u8).filter(|&b| b != b'\n').chain([b'\n']).collect();
        let got = frame(&input, 5);
        assert_eq!(got.file, input);
        check(b"\xff\xfe\x00\xc3\n\xc3\x28\n");
    }

    #[test]
    fn long_lines_split_exactly_at_the_limit() {
        let exact = line_of(MAX_LINE_BYTES, b'a');
        let got = frame(&exact, 65536);
        assert_eq!(got.lines.len(), 1);
        assert_eq!(got.lines[0].len(), MAX_LINE_BYTES);

        let over = line_of(MAX_LINE_BYTES + 1, b'b');
        let got = frame(&over, 65536);
        let lens: Vec<usize> = got.lines.iter().map(Vec::len).collect();
        assert_eq!(lens, [MAX_LINE_BYTES, 1]);

        let double = line_of(2 * MAX_LINE_BYTES, b'c');
        let got = frame(&double, 1000);
        let lens: Vec<usize> = got.lines.iter().map(Vec::len).collect();
        assert_eq!(lens, [MAX_LINE_BYTES, MAX_LINE_BYTES]);

        for len in [
            MAX_LINE_BYTES - 1,
            MAX_LINE_BYTES,
            MAX_LINE_BYTES + 1,
            3 * MAX_LINE_BYTES,
            5 * MAX_LINE_BYTES + 17,
        ] {
            let mut input = b"short\n".to_vec();
            input.extend(line_of(len, b'x'));
            input.extend(b"after\n");
            input.extend(vec![b'y'; len]);
            check(&input);
        }
    }

    #[test]
    fn one_write_per_chunk() {
        let mut input = Vec::new();
        for i in 0..500 {
            input.extend(format!("line {i}\n").bytes());
        }
        input.extend(b"tail");
        let mut framer = Framer::new();
        let mut recorder = Recorder::default();
        framer.feed(b"carried ", &mut recorder);
        assert_eq!(recorder.writes, 0);
        framer.feed(&input, &mut recorder);
        assert_eq!(recorder.writes, 1);
        assert_eq!(recorder.lines.len(), 500);
        assert_eq!(recorder.lines[0], b"carried line 0");
        assert!(framer.partial_capacity() > 0);

        // A 64 KiB chunk of split pieces still fits one write.
        let mut recorder = Recorder::default();
        framer.feed(&vec![b'z'; 65536], &mut recorder);
        assert_eq!(recorder.writes, 1);
        assert_eq!(recorder.lines.len(), 4);
    }

    #[test]
    fn each_write_holds_the_lines_framed_since_the_last() {
        // One chunk with more split pieces than a batch holds, whole lines
        // between them: the batch is written several times, and the
        // recorder checks each write against the lines passed before it.
        let mut input = Vec::new();
        for i in 0..12 {
            input.extend(format!("short {i}\n").bytes());
            input.extend(line_of(MAX_LINE_BYTES + 1 + i, b'x'));
        }
        for counting in [false, true] {
            let got = frame_with(&input, input.len(), counting);
            assert!(got.writes > 1, "the batch filled: {} writes", got.writes);
            assert_eq!(got.lines.len() as u64 + got.counted, 12 * 3);
            assert_eq!(got.file.len(), input.len() + 12);
        }
    }

    #[test]
    fn counting_takes_one_count_per_chunk_of_short_lines() {
        let mut input = Vec::new();
        for i in 0..2000 {
            input.extend(format!("line {i:05} with some text after it\n").bytes());
        }
        let got = frame_with(&input, 65536, true);
        assert!(
            got.lines.len() <= 1,
            "only a carried line is passed: {}",
            got.lines.len()
        );
        assert_eq!(got.lines.len() as u64 + got.counted, 2000);
        assert_eq!(got.file, input);

        // A long line in the chunk: each line is framed (and split) again.
        let mut input = b"short\n".to_vec();
        input.extend(line_of(MAX_LINE_BYTES + 5, b'x'));
        input.extend(b"after\n");
        let got = frame_with(&input, input.len(), true);
        let lens: Vec<usize> = got.lines.iter().map(Vec::len).collect();
        assert_eq!(lens, [5, MAX_LINE_BYTES, 5, 5]);
        assert_eq!(got.counted, 0);
    }

    #[test]
    fn no_memory_is_held_without_a_partial_line() {
        let mut framer = Framer::new();
        let mut recorder = Recorder::default();
        framer.feed(&vec![b'q'; 3 * MAX_LINE_BYTES / 2], &mut recorder);
        assert!(framer.partial_capacity() > 0);
        framer.feed(b"\n", &mut recorder);
        assert_eq!(framer.partial_capacity(), 0);
        framer.feed(b"a\nb\n", &mut recorder);
        assert_eq!(framer.partial_capacity(), 0);
    }
}
