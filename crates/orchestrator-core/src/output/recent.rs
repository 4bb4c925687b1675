//! The last lines of a service, kept in memory for `logs -n`, and the
//! broadcast that `logs -f` followers read. Lines are stored as the blocks
//! the pump wrote to the file (one allocation per read, not per line); a
//! follower that falls behind misses blocks and is told how many lines.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use memchr::memchr_iter;
use tokio::sync::broadcast;

use super::Stream;

/// Bytes of recent output kept per service (whole blocks; the newest block
/// is always kept, whatever its size).
pub const RECENT_MAX_BYTES: usize = 128 * 1024;
/// Blocks a follower may fall behind by before it misses some.
const FOLLOW_CAPACITY: usize = 256;

/// Consecutive lines of one stream, read at one time.
#[derive(Debug, Clone)]
pub struct LogBlock {
    /// Number of the first line: lines of a service are numbered 1, 2, ...
    /// across both streams, so a follower can tell what it missed.
    pub first_seq: u64,
    pub time: SystemTime,
    pub stream: Stream,
    pub line_count: u64,
    /// The lines, each ending in `\n`.
    pub bytes: Arc<Vec<u8>>,
}

/// One line, for readers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub seq: u64,
    pub time: SystemTime,
    pub stream: Stream,
    /// Raw bytes, without the `\n`.
    pub text: Vec<u8>,
}

impl LogBlock {
    pub fn lines(&self) -> impl Iterator<Item = LogLine> + '_ {
        let mut start = 0;
        memchr_iter(b'\n', &self.bytes)
            .enumerate()
            .map(move |(i, end)| {
                let line = LogLine {
                    seq: self.first_seq + i as u64,
                    time: self.time,
                    stream: self.stream,
                    text: self.bytes[start..end].to_vec(),
                };
                start = end + 1;
                line
            })
    }
}

#[derive(Default)]
pub(super) struct Recent {
    blocks: VecDeque<LogBlock>,
    bytes: usize,
    next_seq: u64,
    /// Created by the first follower, so an unfollowed service pays nothing.
    live: Option<broadcast::Sender<LogBlock>>,
}

impl Recent {
    /// Keeps the `line_count` whole lines of `segments` as one block and
    /// returns it (a cheap clone), or `None` when there is no line.
    pub(super) fn push(
        &mut self,
        stream: Stream,
        segments: &[&[u8]],
        line_count: u64,
    ) -> Option<LogBlock> {
        if line_count == 0 {
            return None;
        }
        let len = segments.iter().map(|s| s.len()).sum();
        let mut bytes = Vec::with_capacity(len);
        for segment in segments {
            bytes.extend_from_slice(segment);
        }
        debug_assert_eq!(memchr_iter(b'\n', &bytes).count() as u64, line_count);
        let block = LogBlock {
            first_seq: self.next_seq + 1,
            time: SystemTime::now(),
            stream,
            line_count,
            bytes: Arc::new(bytes),
        };
        self.next_seq += line_count;
        if let Some(live) = &self.live {
            if live.receiver_count() == 0 {
                self.live = None;
            } else {
                let _ = live.send(block.clone());
            }
        }
        self.bytes += len;
        self.blocks.push_back(block.clone());
        while self.bytes > RECENT_MAX_BYTES && self.blocks.len() > 1 {
            if let Some(old) = self.blocks.pop_front() {
                self.bytes -= old.bytes.len();
            }
        }
        Some(block)
    }

    /// The last `n` lines kept (fewer when fewer are kept), oldest first.
    pub(super) fn tail(&self, n: usize) -> Vec<LogLine> {
        let mut lines = Vec::new();
        for block in self.blocks.iter().rev() {
            if lines.len() >= n {
                break;
            }
            let mut block_lines: Vec<LogLine> = block.lines().collect();
            let keep = block_lines.len().min(n - lines.len());
            let skip = block_lines.len() - keep;
            lines.extend(block_lines.drain(skip..).rev());
        }
        lines.reverse();
        lines
    }

    /// Every line kept, oldest first.
    pub(super) fn all(&self) -> Vec<LogLine> {
        self.blocks.iter().flat_map(LogBlock::lines).collect()
    }

    /// Keeps `lines` (an earlier ring's, oldest first) before any kept
    /// already, and numbers the next line after the last of them. Lines are
    /// grouped back into blocks of one stream and time with consecutive
    /// numbers, so `tail` and followers see them as they were.
    pub(super) fn seed(&mut self, lines: Vec<LogLine>) {
        let mut seeded: VecDeque<LogBlock> = VecDeque::new();
        let mut bytes: Vec<u8> = Vec::new();
        let mut current: Option<LogBlock> = None;
        let close =
            |block: Option<LogBlock>, bytes: &mut Vec<u8>, seeded: &mut VecDeque<LogBlock>| {
                if let Some(mut block) = block {
                    block.bytes = Arc::new(std::mem::take(bytes));
                    seeded.push_back(block);
                }
            };
        for line in lines {
            let continues = current.as_ref().is_some_and(|block| {
                block.stream == line.stream
                    && block.time == line.time
                    && block.first_seq + block.line_count == line.seq
            });
            if !continues {
                close(current.take(), &mut bytes, &mut seeded);
                current = Some(LogBlock {
                    first_seq: line.seq,
                    time: line.time,
                    stream: line.stream,
                    line_count: 0,
                    bytes: Arc::default(),
                });
            }
            if let Some(block) = &mut current {
                block.line_count += 1;
            }
            // A `\n` inside would count as one more line, and shift the
            // numbers of the rest.
            bytes.extend(line.text.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
            bytes.push(b'\n');
        }
        close(current.take(), &mut bytes, &mut seeded);
        if let Some(last) = seeded.back() {
            self.next_seq = self.next_seq.max(last.first_seq + last.line_count - 1);
        }
        self.bytes += seeded.iter().map(|block| block.bytes.len()).sum::<usize>();
        seeded.extend(self.blocks.drain(..));
        self.blocks = seeded;
        while self.bytes > RECENT_MAX_BYTES && self.blocks.len() > 1 {
            if let Some(old) = self.blocks.pop_front() {
                self.bytes -= old.bytes.len();
            }
        }
    }

    pub(super) fn follow(&mut self, n: usize) -> (Vec<LogLine>, broadcast::Receiver<LogBlock>) {
        let receiver = match &self.live {
            Some(live) => live.subscribe(),
            None => {
                let (live, receiver) = broadcast::channel(FOLLOW_CAPACITY);
                self.live = Some(live);
                receiver
            }
        };
        (self.tail(n), receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pushes, counting the lines as the framer would.
    fn push(recent: &mut Recent, stream: Stream, segments: &[&[u8]]) -> Option<LogBlock> {
        let lines = segments
            .iter()
            .flat_map(|s| s.iter())
            .filter(|&&b| b == b'\n');
        recent.push(stream, segments, lines.count() as u64)
    }

    fn texts(lines: &[LogLine]) -> Vec<String> {
        lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.text).into_owned())
            .collect()
    }

    #[test]
    fn tail_spans_blocks_and_numbers_lines() {
        let mut recent = Recent::default();
        push(&mut recent, Stream::Stdout, &[b"a\nb\n"]);
        push(&mut recent, Stream::Stderr, &[b"c\n", b"d\n"]);
        let tail = recent.tail(3);
        assert_eq!(texts(&tail), ["b", "c", "d"]);
        assert_eq!(tail.iter().map(|l| l.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(tail[0].stream, Stream::Stdout);
        assert_eq!(tail[1].stream, Stream::Stderr);
        assert_eq!(texts(&recent.tail(100)).len(), 4);
        assert!(recent.tail(0).is_empty());
    }

    #[test]
    fn memory_is_bounded_but_the_newest_block_stays() {
        let mut recent = Recent::default();
        let line = vec![b'x'; 1023];
        let mut one = line.clone();
        one.push(b'\n');
        for _ in 0..1000 {
            push(&mut recent, Stream::Stdout, &[&one]);
        }
        assert!(recent.bytes <= RECENT_MAX_BYTES);
        assert_eq!(recent.tail(10_000).len(), RECENT_MAX_BYTES / 1024);
        let huge = vec![b'y'; RECENT_MAX_BYTES * 2];
        push(&mut recent, Stream::Stdout, &[&huge, b"\n"]);
        assert_eq!(recent.tail(10).len(), 1);
    }

    #[test]
    fn followers_get_new_blocks_and_cost_nothing_once_gone() {
        let mut recent = Recent::default();
        push(&mut recent, Stream::Stdout, &[b"old\n"]);
        let (tail, mut receiver) = recent.follow(5);
        assert_eq!(texts(&tail), ["old"]);
        push(&mut recent, Stream::Stdout, &[b"new\n"]);
        let block = receiver.try_recv().unwrap();
        assert_eq!(block.first_seq, 2);
        assert_eq!(texts(&block.lines().collect::<Vec<_>>()), ["new"]);
        drop(receiver);
        push(&mut recent, Stream::Stdout, &[b"later\n"]);
        assert!(recent.live.is_none());
    }
}
