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

/// Caps glibc's malloc arenas at two. By default each thread that allocates
/// may get an arena of its own (up to eight per core), and each keeps its
/// freed memory: with a thousand idle services the daemon held 0.6–0.8 MiB
/// more that way (BENCHMARKS.md, issue 16), while the log path measured no
/// slower with two. Call it early, before the runtime's threads start.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes plain integers and changes only the
        // allocator's own settings, under its own lock.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
    }
}
