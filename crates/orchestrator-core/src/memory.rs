//! Handing freed memory back to the system. glibc keeps what is freed in
//! its arenas (one per thread that allocated, up to 8 per core), so a burst
//! (the start-up's config parse and plan, a flood of API connections)
//! would stay in the daemon's resident memory at its peak. Other
//! allocators return memory on their own.

/// Returns the free pages of every arena to the system. Costs a walk of the
/// heaps: call it after a burst, not on a hot path (it is not async: run it
/// where a short block is fine, e.g. `spawn_blocking`).
pub fn return_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes no pointers, touches only the
        // allocator's own state under its own locks, and may run at any
        // time from any thread.
        let released = unsafe { libc::malloc_trim(0) };
        tracing::debug!(released, "returned free memory to the system");
    }
}

/// Caps glibc's malloc arenas at two, and lets each keep up to
/// [`KEPT_FREE_BYTES`] free at its top. By default each thread that
/// allocates may get an arena of its own (up to eight per core), and each
/// keeps its freed memory: with a thousand idle services the daemon held
/// 0.6–0.8 MiB more that way (BENCHMARKS.md, issue 16), while the log path
/// measured no slower with two. Call it early, before the runtime's threads
/// start.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let kept = KEPT_FREE_BYTES as libc::c_int;
        // SAFETY: mallopt takes plain integers and changes only the
        // allocator's own settings, under its own lock.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
            libc::mallopt(libc::M_TRIM_THRESHOLD, kept);
            libc::mallopt(libc::M_MMAP_THRESHOLD, kept);
        }
    }
}

/// Free memory an arena keeps at its top instead of handing it back at
/// once; blocks up to this size come from the arenas, not from mmap. A log
/// flood allocates and frees a block per pipe read (4–64 KiB), and with
/// glibc's default (128 KiB) every few blocks were given back (`brk`,
/// `madvise`) and faulted in again: page faults, zeroing and memory-cgroup
/// charges were an eighth of the daemon's profile, and a 200 MB flood at
/// `warn` took 150–195 ms of its CPU against 120–135 ms with this. What an
/// arena keeps is handed back by [`return_free_memory`] after start-up and
/// API bursts; after a flood it stays (about 2 MiB measured, 4 MiB per
/// arena at most).
const KEPT_FREE_BYTES: usize = 4 * 1024 * 1024;
