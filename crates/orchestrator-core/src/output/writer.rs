//! Log-file writes, off the async runtime.
//!
//! A `write(2)` to a hung disk (a frozen NFS mount, a full or frozen file
//! system) can block for minutes; on a tokio worker it would freeze every
//! task scheduled there, the API and the other services' pumps included.
//! So pumps only queue blocks ([`FileQueue::push`], never blocking), and a
//! small pool of plain threads writes them.
//!
//! - Order: a service is served by at most one thread at a time, its blocks
//!   first in, first written.
//! - Back-pressure, per service: a pump reads no more while its service has
//!   [`MAX_QUEUED_BYTES`] or more queued ([`FileQueue::room`], awaited as a
//!   task). A service whose disk is slow fills its pipe and blocks in its own
//!   `write`; no line is dropped, and no other service waits for it.
//! - Isolation: a thread stuck on one service's file leaves the others to
//!   the rest of the pool, which grows while work waits and no thread is
//!   free, up to [`MAX_WRITERS`] (threads stuck at once).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::logfile::LogFile;
use super::{FileOptions, LogBlock, ServiceOutput};

/// Bytes a service may have waiting for its file before its pump stops
/// reading. Two pump turns (a turn reads at most 1 MiB per stream): enough
/// for the pump to read the next turn while the last one is written, small
/// enough that a thousand services stuck on a hung disk hold a few GiB at
/// most rather than everything their children print.
pub(super) const MAX_QUEUED_BYTES: u64 = 2 * 1024 * 1024;

/// Writer threads at most: as many services can be stuck on a hung file at
/// once before the others wait too. Logs usually share one file system, so
/// when it hangs they all wait anyway; this bounds the threads it costs.
const MAX_WRITERS: usize = 32;

/// An idle writer thread ends after this long, so an idle daemon has no
/// writer thread to wake (nor one ending, seconds after a burst).
const KEEP_ALIVE: Duration = Duration::from_secs(2);

/// A flood comes in blocks of a few KiB (C stdio writes 4 KiB at a time
/// to a pipe), and waking a writer for each cost a thread switch and two
/// futex calls per block. Blocks of a burst (each within [`BURST_GAP`] of
/// the last) wait instead until this much is queued, or until the pump's
/// timer ([`flush`], after [`BURST_GAP`]) sends them: a line reaches the
/// file at most a few milliseconds later. A lone line is sent at once.
const BURST_BYTES: u64 = 64 * 1024;

/// Blocks closer than this belong to one burst; also how long a burst's
/// last blocks may wait for the pump's flush.
pub(super) const BURST_GAP: Duration = Duration::from_millis(2);

/// Blocks handed to one `LogFile::write` (a few `writev` calls).
const MAX_BATCH_BLOCKS: usize = 64;

/// Writer threads only need a small stack.
const STACK_BYTES: usize = 256 * 1024;

/// A service's log file and the blocks waiting for it.
pub(super) struct FileQueue {
    pending: Mutex<Pending>,
    /// Taken only by the thread serving the service (so never contended);
    /// a mutex rather than a cell to keep this free of `unsafe`.
    file: Mutex<LogFile>,
    /// Bytes queued in all, updated under `pending`'s lock.
    queued: AtomicU64,
    /// Bytes taken care of in all: written, or dropped on a write error.
    done: AtomicU64,
    /// Wakes pumps that wait for room or for their last lines to be written.
    progress: Notify,
}

struct Pending {
    blocks: VecDeque<LogBlock>,
    /// Bytes of a burst queued without waking a writer (see
    /// [`BURST_BYTES`]); 0 once scheduled.
    deferred: u64,
    /// When the pump last queued a block.
    last_push: Option<Instant>,
    /// A reload's options, for the file's thread to take: the file's own
    /// lock may be held over a hung write.
    options: Option<FileOptions>,
    /// In the pool's ready list, or being written by a thread.
    scheduled: bool,
}

impl FileQueue {
    pub(super) fn new(file: LogFile) -> Self {
        Self {
            pending: Mutex::new(Pending {
                blocks: VecDeque::new(),
                deferred: 0,
                last_push: None,
                options: None,
                scheduled: false,
            }),
            file: Mutex::new(file),
            queued: AtomicU64::new(0),
            done: AtomicU64::new(0),
            progress: Notify::new(),
        }
    }

    /// Blocks while a rotated file is being gzipped (or a write holds the
    /// file): a blocking thread's work.
    pub(super) fn finish_compressing(&self) {
        lock(&self.file).finish_compressing();
    }

    /// Without blocking: true when no gzip is running (any that ran is
    /// joined), false when one is or a write holds the file (then
    /// [`Self::finish_compressing`] on a blocking thread waits for it).
    pub(super) fn compressing_finished(&self) -> bool {
        match self.file.try_lock() {
            Ok(mut file) => file.compressing_finished(),
            Err(std::sync::TryLockError::Poisoned(poisoned)) => {
                poisoned.into_inner().compressing_finished()
            }
            Err(std::sync::TryLockError::WouldBlock) => false,
        }
    }

    pub(super) fn set_options(&self, options: FileOptions) {
        lock(&self.pending).options = Some(options);
    }

    /// Bytes queued in all so far: a pump waits for `done` to reach it.
    pub(super) fn queued(&self) -> u64 {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether blocks of a burst wait for [`flush`].
    pub(super) fn has_deferred(&self) -> bool {
        lock(&self.pending).deferred > 0
    }

    fn in_flight(&self) -> u64 {
        self.queued()
            .saturating_sub(self.done.load(Ordering::Acquire))
    }

    /// Waits, as a task, until the service has room for more.
    pub(super) async fn room(&self) {
        self.wait_for(|queue| queue.in_flight() < MAX_QUEUED_BYTES)
            .await;
    }

    /// Waits, as a task, until `queued` bytes in all were taken care of.
    pub(super) async fn done_up_to(&self, queued: u64) {
        self.wait_for(|queue| queue.done.load(Ordering::Acquire) >= queued)
            .await;
    }

    async fn wait_for(&self, ready: impl Fn(&Self) -> bool) {
        if ready(self) {
            return;
        }
        loop {
            let notified = self.progress.notified();
            tokio::pin!(notified);
            // Registered before the check, so progress made in between wakes it.
            notified.as_mut().enable();
            if ready(self) {
                return;
            }
            notified.await;
        }
    }
}

/// Queues `block` for the service's file. Never blocks on the disk: the
/// locks taken are held by writers only to move blocks, never over a write.
pub(super) fn push(output: &Arc<ServiceOutput>, block: LogBlock) {
    let queue = &output.file;
    let len = block.bytes.len() as u64;
    let schedule = {
        let mut pending = lock(&queue.pending);
        pending.blocks.push_back(block);
        queue.queued.fetch_add(len, Ordering::AcqRel);
        pending.deferred = 0;
        !std::mem::replace(&mut pending.scheduled, true)
    };
    if schedule {
        POOL.schedule(Arc::clone(output));
    }
}

/// [`push`] for a pump: a block of a burst waits (see [`BURST_BYTES`])
/// while less than that is queued and no writer is on the service; the
/// pump then calls [`flush`] within [`BURST_GAP`] (`has_deferred` tells).
pub(super) fn push_from_pump(output: &Arc<ServiceOutput>, block: LogBlock) {
    let queue = &output.file;
    let len = block.bytes.len() as u64;
    let now = Instant::now();
    let schedule = {
        let mut pending = lock(&queue.pending);
        pending.blocks.push_back(block);
        queue.queued.fetch_add(len, Ordering::AcqRel);
        let burst = pending
            .last_push
            .replace(now)
            .is_some_and(|last| now.saturating_duration_since(last) < BURST_GAP);
        if pending.scheduled {
            false
        } else if burst && pending.deferred + len < BURST_BYTES {
            pending.deferred += len;
            false
        } else {
            pending.deferred = 0;
            pending.scheduled = true;
            true
        }
    };
    if schedule {
        POOL.schedule(Arc::clone(output));
    }
}

/// Sends a burst's waiting blocks to a writer now.
pub(super) fn flush(output: &Arc<ServiceOutput>) {
    let schedule = {
        let mut pending = lock(&output.file.pending);
        let waiting = pending.deferred > 0 && !pending.scheduled;
        pending.deferred = 0;
        if waiting {
            pending.scheduled = true;
        }
        waiting
    };
    if schedule {
        POOL.schedule(Arc::clone(output));
    }
}

/// Writes one batch of the service's blocks; returns whether more wait
/// (the service stays scheduled), or false once it is unscheduled.
fn serve(output: &ServiceOutput) -> bool {
    let queue = &output.file;
    let (batch, options): (Vec<LogBlock>, _) = {
        let mut pending = lock(&queue.pending);
        let n = pending.blocks.len().min(MAX_BATCH_BLOCKS);
        if n == 0 {
            pending.scheduled = false;
            return false;
        }
        (pending.blocks.drain(..n).collect(), pending.options.take())
    };
    // Counted as queued, whatever the file gets.
    let bytes: u64 = batch.iter().map(|block| block.bytes.len() as u64).sum();
    // Prefixed here, on the writer's thread, so a pump never pays for it.
    let mut stamped = Vec::new();
    let segments: Vec<&[u8]> = if output.timestamps.load(Ordering::Relaxed) {
        for block in &batch {
            super::logfile::stamp(block, &mut stamped);
        }
        vec![&stamped[..]]
    } else {
        batch.iter().map(|block| &block.bytes[..]).collect()
    };
    let (dropped, was_failing, failing) = {
        let mut file = lock(&queue.file);
        if let Some(options) = options {
            file.set_options(options);
        }
        let was_failing = file.is_failing();
        let dropped = file.write(&segments, Instant::now());
        (dropped, was_failing, file.is_failing())
    };
    output.file_written(&batch, dropped, was_failing, failing);
    drop(segments);
    drop(stamped);
    // The blocks' bytes may be the last references: freed before the pump
    // hears there is room, so memory stays within the bound.
    drop(batch);
    queue.done.fetch_add(bytes, Ordering::AcqRel);
    queue.progress.notify_waiters();
    let mut pending = lock(&queue.pending);
    if pending.blocks.is_empty() {
        pending.scheduled = false;
        false
    } else {
        true
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

static POOL: Pool = Pool {
    state: Mutex::new(PoolState {
        ready: VecDeque::new(),
        waiting: 0,
        threads: 0,
    }),
    work: Condvar::new(),
};

struct Pool {
    state: Mutex<PoolState>,
    work: Condvar,
}

struct PoolState {
    /// Services with blocks to write that no thread serves yet.
    ready: VecDeque<Arc<ServiceOutput>>,
    /// Threads waiting for work (or woken and not yet running).
    waiting: usize,
    threads: usize,
}

impl Pool {
    fn schedule(&'static self, output: Arc<ServiceOutput>) {
        let mut state = lock(&self.state);
        state.ready.push_back(output);
        if state.waiting > 0 {
            self.work.notify_one();
        } else {
            self.spawn(&mut state);
            if state.threads == 0 {
                // No thread could start and none runs: nobody would ever
                // take this service, and its `scheduled` flag would keep
                // its next blocks from asking again. Unschedule it, so the
                // next block it queues tries to start a thread anew.
                if let Some(output) = state.ready.pop_back() {
                    lock(&output.file.pending).scheduled = false;
                }
            }
        }
    }

    /// The next service to serve, or `None` when this thread should end.
    fn next(&'static self) -> Option<Arc<ServiceOutput>> {
        let mut state = lock(&self.state);
        loop {
            if let Some(output) = state.ready.pop_front() {
                // Every service left waiting needs a thread that is free:
                // the others may be stuck on a hung disk for good.
                if state.ready.len() > state.waiting {
                    self.spawn(&mut state);
                }
                return Some(output);
            }
            state.waiting += 1;
            let (guard, timeout) = self
                .work
                .wait_timeout(state, KEEP_ALIVE)
                .unwrap_or_else(PoisonError::into_inner);
            state = guard;
            state.waiting -= 1;
            if timeout.timed_out() && state.ready.is_empty() {
                state.threads -= 1;
                return None;
            }
        }
    }

    /// Whether a service that still has blocks should go to the back of the
    /// line: others wait, and no thread is free for them.
    fn requeue_if_others_wait(
        &'static self,
        output: Arc<ServiceOutput>,
    ) -> Option<Arc<ServiceOutput>> {
        let mut state = lock(&self.state);
        if state.ready.is_empty() || state.waiting > 0 {
            return Some(output);
        }
        state.ready.push_back(output);
        None
    }

    fn spawn(&'static self, state: &mut PoolState) {
        if state.threads >= MAX_WRITERS {
            return;
        }
        let spawned = std::thread::Builder::new()
            .name("log-writer".into())
            .stack_size(STACK_BYTES)
            .spawn(move || self.run());
        match spawned {
            Ok(_) => state.threads += 1,
            // The threads there are still serve the queue, later.
            Err(err) => tracing::warn!(error = %err, "cannot start a log writer thread"),
        }
    }

    fn run(&'static self) {
        let mut current = None;
        loop {
            let output = match current.take() {
                Some(output) => output,
                None => match self.next() {
                    Some(output) => output,
                    None => return,
                },
            };
            if serve(&output) {
                current = self.requeue_if_others_wait(output);
            }
        }
    }
}

#[cfg(test)]
pub(super) fn in_flight(output: &ServiceOutput) -> u64 {
    output.file.in_flight()
}
