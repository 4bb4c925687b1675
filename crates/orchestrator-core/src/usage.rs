//! What services use now, for `status`, the API and metrics: the cgroup's
//! own counts where a service has one, else the sum over the live processes
//! of its process group, read from /proc in one pass for all of them.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::cgroup::Usage;
use crate::state::all_processes;

/// Memory and CPU of each process group in `groups`, from one scan of
/// /proc. A group with no live process is absent. Only resident memory is
/// counted (a cgroup's count also holds the page cache it caused).
pub fn process_group_usage(groups: &[u32]) -> HashMap<u32, Usage> {
    let mut usage: HashMap<u32, Usage> = HashMap::new();
    if groups.is_empty() {
        return usage;
    }
    let wanted: std::collections::HashSet<u32> = groups.iter().copied().collect();
    let page = page_size();
    let ticks = clock_ticks_per_second();
    for process in all_processes() {
        if !wanted.contains(&process.pgid) {
            continue;
        }
        let entry = usage.entry(process.pgid).or_insert(Usage {
            memory_bytes: Some(0),
            cpu_usec: Some(0),
        });
        entry.memory_bytes = entry
            .memory_bytes
            .map(|bytes| bytes.saturating_add(process.rss_pages.saturating_mul(page)));
        entry.cpu_usec = entry
            .cpu_usec
            .map(|usec| usec.saturating_add(process.cpu_ticks.saturating_mul(1_000_000) / ticks));
    }
    usage
}

/// How old a scan may be before a caller asks for the next one. A scan
/// reads every process's stat file (about 150 ms with 10,000 processes on
/// a small machine): `status` and metrics share one a second at most.
pub const USAGE_FRESH_FOR: Duration = Duration::from_secs(1);

/// How old a scan may be and still be shown while the next one runs. Past
/// this a caller waits for a scan of its own: the first `status` after an
/// hour of quiet must not show the memory of an hour ago.
pub const USAGE_SHOWN_FOR: Duration = Duration::from_secs(5);

/// The last [`process_group_usage`] scan, shared by every caller: `status`
/// of 10,000 services answers from it at once while the next scan runs in
/// the background (stale-while-revalidate), so the figures shown are at
/// most [`USAGE_SHOWN_FOR`] old. A caller asking for a group the last scan
/// did not see (a service started since), or finding the last scan older
/// than that, waits for a scan of its own.
#[derive(Debug)]
pub struct UsageCache {
    last: Mutex<Option<Scan>>,
    refreshing: AtomicBool,
    fresh_for: Duration,
    shown_for: Duration,
}

impl Default for UsageCache {
    fn default() -> Self {
        Self::new(USAGE_FRESH_FOR, USAGE_SHOWN_FOR)
    }
}

#[derive(Debug)]
struct Scan {
    at: Instant,
    usage: Arc<HashMap<u32, Usage>>,
}

impl UsageCache {
    /// A scan younger than `fresh_for` is answered as it is; one younger
    /// than `shown_for` is answered while the next is taken.
    pub fn new(fresh_for: Duration, shown_for: Duration) -> Self {
        Self {
            last: Mutex::new(None),
            refreshing: AtomicBool::new(false),
            fresh_for,
            shown_for: shown_for.max(fresh_for),
        }
    }

    /// Each group's use (a group with no live process is absent). The scan
    /// runs on a blocking thread: /proc reads are not for a runtime worker.
    pub async fn usage(self: &Arc<Self>, groups: Vec<u32>) -> Arc<HashMap<u32, Usage>> {
        if groups.is_empty() {
            return Arc::default();
        }
        let cached = self
            .lock()
            .as_ref()
            .map(|scan| (scan.at, Arc::clone(&scan.usage)));
        if let Some((at, usage)) = cached
            && at.elapsed() < self.shown_for
            && groups.iter().all(|group| usage.contains_key(group))
        {
            if at.elapsed() >= self.fresh_for && !self.refreshing.swap(true, Ordering::AcqRel) {
                // The next caller's: every group known so far, and these.
                let mut wanted: HashSet<u32> = usage.keys().copied().collect();
                wanted.extend(groups);
                let cache = Arc::clone(self);
                tokio::task::spawn_blocking(move || {
                    let wanted: Vec<u32> = wanted.into_iter().collect();
                    cache.scan(&wanted);
                    cache.refreshing.store(false, Ordering::Release);
                });
            }
            return usage;
        }
        let cache = Arc::clone(self);
        tokio::task::spawn_blocking(move || cache.scan(&groups))
            .await
            .unwrap_or_default()
    }

    fn scan(&self, groups: &[u32]) -> Arc<HashMap<u32, Usage>> {
        let usage = Arc::new(process_group_usage(groups));
        *self.lock() = Some(Scan {
            at: Instant::now(),
            usage: Arc::clone(&usage),
        });
        usage
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Scan>> {
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|size| u64::try_from(size).ok())
        .unwrap_or(4096)
}

fn clock_ticks_per_second() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|ticks| u64::try_from(ticks).ok())
        .filter(|&ticks| ticks > 0)
        .unwrap_or(100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_our_own_group() {
        let pgid = nix::unistd::getpgrp().as_raw().unsigned_abs();
        // Some CPU of our own, so the count cannot be a coincidental zero.
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(30);
        let mut spin = 0u64;
        while std::time::Instant::now() < deadline {
            spin = spin.wrapping_add(1);
        }
        std::hint::black_box(spin);
        let usage = process_group_usage(&[pgid]);
        let ours = usage.get(&pgid).expect("our own process group is live");
        assert!(ours.memory_bytes.unwrap() > 1024 * 1024, "{ours:?}");
        assert!(ours.cpu_usec.is_some(), "{ours:?}");
        assert!(process_group_usage(&[]).is_empty());
    }

    #[tokio::test]
    async fn the_cache_answers_at_once_and_renews_a_stale_scan_for_the_next_caller() {
        let ours = nix::unistd::getpgrp().as_raw().unsigned_abs();
        let hour = Duration::from_secs(3600);
        // Fresh for an hour: the second caller gets the very same scan.
        let cache = Arc::new(UsageCache::new(hour, hour));
        let first = cache.usage(vec![ours]).await;
        assert!(first.contains_key(&ours), "{first:?}");
        assert!(Arc::ptr_eq(&first, &cache.usage(vec![ours]).await));
        // A group the scan did not know (pid 1's, never ours): a scan of
        // its own, waited for.
        let init = crate::state::proc_stat(1).expect("pid 1").pgid;
        let second = cache.usage(vec![ours, init]).await;
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(second.contains_key(&init), "{second:?}");

        // Stale at once: the caller still gets the last scan, and the next
        // one comes from a scan made meanwhile, with every group known.
        let cache = Arc::new(UsageCache::new(Duration::ZERO, hour));
        let first = cache.usage(vec![ours]).await;
        assert!(Arc::ptr_eq(&first, &cache.usage(vec![ours]).await));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = cache.usage(vec![ours]).await;
            if !Arc::ptr_eq(&first, &now) {
                assert!(now.contains_key(&ours), "{now:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the stale scan was never renewed"
            );
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_scan_too_old_to_show_is_not_shown() {
        let ours = nix::unistd::getpgrp().as_raw().unsigned_abs();
        // Shown for no time at all: every caller waits for a scan of its
        // own, never the last one.
        let cache = Arc::new(UsageCache::new(Duration::ZERO, Duration::ZERO));
        let first = cache.usage(vec![ours]).await;
        let second = cache.usage(vec![ours]).await;
        assert!(!Arc::ptr_eq(&first, &second));
        assert!(second.contains_key(&ours), "{second:?}");
    }
}
