//! What services use now, for `status`, the API and metrics: the cgroup's
//! own counts where a service has one, else the sum over the live processes
//! of its process group, read from /proc in one pass for all of them.

use std::collections::HashMap;

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
}
