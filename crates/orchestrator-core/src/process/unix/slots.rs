//! Low-numbered descriptors a spawn moves the child's stdio and program
//! into, so that the child can start from a copy of only the bottom of the
//! daemon's descriptor table.
//!
//! Why: a child made with a private copy of the table takes a reference on
//! every descriptor the daemon holds (three per running service), and its
//! exec drops each of them again (flush, dnotify, POSIX locks per file).
//! With 6000 services that was 43 % of all CPU while starting them: each
//! spawn paid for every service already running. Instead the child shares
//! the table (CLONE_FILES) and its first step on it is
//! `close_range(keep_below, ~0, CLOSE_RANGE_UNSHARE)`, which gives it a copy
//! of the descriptors below `keep_below` alone (Linux 5.9): everything it
//! needs is there, in the slots reserved here at start-up, before the
//! services' descriptors fill the table.
//!
//! A slot always holds something: /dev/null between spawns, the child's
//! descriptors during one. Its number never leaves us, so no other thread
//! can be handed it meanwhile; `dup3` onto it swaps what it refers to.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::{Mutex, MutexGuard, OnceLock, TryLockError};

use rustix::io::DupFlags;

use super::above_stdio;

/// Spawns that can use slots at once. Services are spawned from the
/// runtime's worker threads and health probes from their tasks; a spawn
/// that finds every set busy takes the slow way (a full copy) rather than
/// waiting on a runtime thread.
const SETS: usize = 4;

/// The reserved descriptors; `None` when they could not be opened (no
/// /dev/null): then every spawn takes the slow way.
static SLOTS: OnceLock<Option<Slots>> = OnceLock::new();

pub(super) struct Slots {
    /// /dev/null: every child's stdin, and what an unused slot refers to.
    null: OwnedFd,
    sets: [Mutex<Option<SlotSet>>; SETS],
    /// One past the highest slot.
    keep_below: RawFd,
}

/// One spawn's slots. `None` in its mutex once a slot could not be emptied
/// (see `Loaded::drop`).
struct SlotSet {
    stdout: OwnedFd,
    stderr: OwnedFd,
    /// The verified binary a child executes by descriptor.
    program: OwnedFd,
}

/// Reserve the slots now, while the descriptor table is nearly empty: the
/// daemon calls this first thing, before services (or the ones an upgrade
/// hands over) fill the table. Later calls return the same slots; a spawn
/// without an earlier call reserves them at the lowest numbers free then.
pub fn reserve() {
    let _ = slots();
}

fn slots() -> Option<&'static Slots> {
    SLOTS
        .get_or_init(|| match Slots::open() {
            Ok(slots) => Some(slots),
            Err(error) => {
                tracing::debug!(
                    "no spawn slots ({error}); every spawn copies the whole descriptor table"
                );
                None
            }
        })
        .as_ref()
}

impl Slots {
    fn open() -> io::Result<Slots> {
        let null: OwnedFd = std::fs::File::open("/dev/null")?.into();
        let null = above_stdio(null)?;
        // The lowest free numbers: dup with a floor of 3.
        let mut highest = null.as_raw_fd();
        let mut slot = || -> io::Result<OwnedFd> {
            let fd = rustix::io::fcntl_dupfd_cloexec(&null, 3)?;
            highest = highest.max(fd.as_raw_fd());
            Ok(fd)
        };
        let mut set = || -> io::Result<Mutex<Option<SlotSet>>> {
            Ok(Mutex::new(Some(SlotSet {
                stdout: slot()?,
                stderr: slot()?,
                program: slot()?,
            })))
        };
        let sets = [set()?, set()?, set()?, set()?];
        Ok(Slots {
            null,
            sets,
            keep_below: highest + 1,
        })
    }
}

/// A set of slots holding one child's descriptors until dropped.
pub(super) struct Loaded {
    set: MutexGuard<'static, Option<SlotSet>>,
    null: BorrowedFd<'static>,
    keep_below: RawFd,
}

/// A free set of slots, if there is one.
pub(super) fn take() -> Option<Loaded> {
    let slots = slots()?;
    slots.sets.iter().find_map(|set| {
        let guard = match set.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        guard.is_some().then(|| Loaded {
            set: guard,
            null: slots.null.as_fd(),
            keep_below: slots.keep_below,
        })
    })
}

impl Loaded {
    /// Point the slots at the child's output pipes and its program.
    pub(super) fn load(
        &mut self,
        stdout: BorrowedFd<'_>,
        stderr: BorrowedFd<'_>,
        program: Option<BorrowedFd<'_>>,
    ) -> io::Result<()> {
        let set = self.set.as_mut().expect("`take` returns only whole sets");
        rustix::io::dup3(stdout, &mut set.stdout, DupFlags::CLOEXEC)?;
        rustix::io::dup3(stderr, &mut set.stderr, DupFlags::CLOEXEC)?;
        if let Some(program) = program {
            rustix::io::dup3(program, &mut set.program, DupFlags::CLOEXEC)?;
        }
        Ok(())
    }

    /// The child's descriptors 0, 1 and 2, to be moved there.
    pub(super) fn stdio(&self) -> [RawFd; 3] {
        let set = self.set.as_ref().expect("`take` returns only whole sets");
        [
            self.null.as_raw_fd(),
            set.stdout.as_raw_fd(),
            set.stderr.as_raw_fd(),
        ]
    }

    pub(super) fn program(&self) -> RawFd {
        let set = self.set.as_ref().expect("`take` returns only whole sets");
        set.program.as_raw_fd()
    }

    /// The child keeps only the descriptors below this.
    pub(super) fn keep_below(&self) -> RawFd {
        self.keep_below
    }
}

impl Drop for Loaded {
    /// Back to /dev/null: a slot left on a pipe's write end would keep that
    /// pipe open after the child exits, and its output would never end.
    fn drop(&mut self) {
        let Some(set) = self.set.as_mut() else {
            return;
        };
        let mut emptied = true;
        for slot in [&mut set.stdout, &mut set.stderr, &mut set.program] {
            // dup3 onto a number we hold fails only with EINTR or the
            // kernel's EBUSY race with a concurrent open: try again.
            emptied &= (0..8).any(|_| rustix::io::dup3(self.null, slot, DupFlags::CLOEXEC).is_ok());
        }
        if !emptied {
            // Closing them releases whatever they still refer to; the set
            // is gone for good and spawns use the others.
            tracing::warn!(
                "could not empty a spawn slot; closed it (spawns may copy the whole descriptor table)"
            );
            *self.set = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refers_to_null(fd: RawFd) -> bool {
        let target = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        target == std::path::Path::new("/dev/null")
    }

    /// A set, once other tests in this process let go of one.
    fn a_free_set() -> Loaded {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(loaded) = take() {
                return loaded;
            }
            assert!(std::time::Instant::now() < deadline, "no set comes free");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_set_holds_the_childs_pipes_until_dropped_then_null_again() {
        reserve();
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let mut loaded = a_free_set();
        let [stdin, stdout, stderr] = loaded.stdio();
        assert!(stdin < loaded.keep_below() && stdout < loaded.keep_below());
        assert!(stdin > 2 && stdout > 2 && stderr > 2 && loaded.program() > 2);
        loaded
            .load(write.as_fd(), write.as_fd(), None)
            .expect("load");
        assert!(!refers_to_null(stdout) && refers_to_null(stdin));
        drop(write);
        drop(loaded);
        assert!(refers_to_null(stdout) && refers_to_null(stderr));
        // The slot let go of the write end: the pipe reads as ended.
        let mut buffer = [0u8; 1];
        assert_eq!(nix::unistd::read(&read, &mut buffer).unwrap(), 0);
    }

    #[test]
    fn a_spawn_finds_no_set_while_all_are_held() {
        reserve();
        // Other tests in this process spawn, each holding a set briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut held = Vec::new();
        while held.len() < SETS {
            assert!(std::time::Instant::now() < deadline, "sets stay busy");
            held.extend(take());
            std::thread::yield_now();
        }
        assert!(take().is_none(), "every set is held");
    }
}
