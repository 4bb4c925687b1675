//! The watchers that turn an edited config file or a changed services_dir
//! into one [`DaemonEvent::Reload`].
//!
//! inotify (through `notify`) watches directories, never single files: an
//! editor's write-and-rename and a Kubernetes `..data` symlink swap replace
//! the file's inode, and a watch on the old inode would see neither. What is
//! watched is recomputed after every change: the directory of each symlink
//! on the way to the config file and of the file itself, services_dir (or,
//! while it is missing, its nearest existing ancestor) and each
//! services_dir/NAME.
//!
//! Events only say that something may have changed. Once they stop for the
//! debounce window, the watched state is read again and compared with the
//! last one: the config file by its content, each NAME/NAME binary by its
//! identity, size, mode and mtime (hashing every binary would read
//! gigabytes for a touch). Only a difference sends a Reload.
//!
//! All of it runs on one thread of its own: it sleeps in a blocking receive
//! while nothing changes, and its file reads never hold a runtime worker.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{mpsc, oneshot};

use crate::daemon::DaemonEvent;

/// Long enough to cover an editor's save (write, fsync, rename) and the
/// chunks of a copy; short enough that a deploy feels immediate.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(300);

/// How long the watcher lets events of a burst gather before it looks at
/// them (see `Watch::gather`): a small part of any useful debounce window.
const GATHER: Duration = Duration::from_millis(10);

/// More symlinks than this on the way to a file is a loop (Linux's own
/// limit, ELOOP).
const MAX_SYMLINKS: usize = 40;

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("cannot start the file watcher: {0}")]
    Start(#[from] notify::Error),
    #[error("cannot start the file watcher's thread: {0}")]
    Thread(#[from] std::io::Error),
    #[error("the file watcher's thread ended during its setup")]
    Setup,
}

/// Dropping it stops the watcher.
pub struct WatchHandle {
    stop: std_mpsc::Sender<Message>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        // Not joined: the thread may be reading a file, and a drop on a
        // runtime worker must not wait for that; it exits at its next look
        // at the channel.
        let _ = self.stop.send(Message::Stop);
    }
}

enum Message {
    Event(notify::Result<notify::Event>),
    Stop,
}

/// The binaries in a services_dir as the watcher compares them, taken
/// before the daemon discovers them ([`Binaries::now`]): a watcher armed
/// later (off the start's critical path) compares what it finds with it,
/// so that a binary dropped in between is not missed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries(BTreeMap<OsString, BinaryId>);

impl Binaries {
    /// Blocking: one directory read and a stat per entry.
    pub fn now(services_dir: &Path) -> Binaries {
        Binaries(binaries_in(services_dir))
    }
}

/// Starts watching `config_path` (when there is a file) and `services_dir`;
/// each settled change sends one `DaemonEvent::Reload` to `sink`. Returns
/// once the watches are armed and the current state is recorded, so that a
/// change made after it returns is seen. With `known` (what the daemon
/// planned from, taken earlier), a services_dir that differs from it once
/// the watches are armed asks for one reload at once.
pub async fn spawn_watcher(
    config_path: Option<PathBuf>,
    services_dir: PathBuf,
    debounce: Duration,
    sink: mpsc::Sender<DaemonEvent>,
    known: Option<Binaries>,
) -> Result<WatchHandle, WatchError> {
    let (events_tx, events) = std_mpsc::channel();
    let forward = events_tx.clone();
    let watcher = notify::recommended_watcher(move |event| {
        let _ = forward.send(Message::Event(event));
    })?;
    let (ready_tx, ready) = oneshot::channel();
    let targets = Targets {
        config: config_path.map(absolute),
        services_dir: absolute(services_dir),
    };
    std::thread::Builder::new()
        .name("orchestrator-watch".into())
        .spawn(move || {
            let mut watch = Watch {
                watcher,
                targets,
                watched: BTreeMap::new(),
                services_missing: false,
                limit_logged: false,
                last: None,
            };
            watch.rearm();
            let first = watch.snapshot();
            let moved = known.is_some_and(|known| known.0 != first.binaries);
            watch.last = Some(first);
            let _ = ready_tx.send(());
            if moved {
                tracing::info!("services_dir changed while the daemon started; reloading");
                if sink.blocking_send(DaemonEvent::Reload).is_err() {
                    return;
                }
            }
            watch.run(&events, debounce, &sink);
        })?;
    ready.await.map_err(|_| WatchError::Setup)?;
    Ok(WatchHandle { stop: events_tx })
}

fn absolute(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

struct Targets {
    config: Option<PathBuf>,
    services_dir: PathBuf,
}

/// Which entries of a watched directory matter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Relevant {
    All,
    /// One name or a few (NAME of NAME/NAME, the config file's, a link's
    /// next hop): a vector, where a set's first node alone would take ~280
    /// bytes for each of a thousand services' directories.
    Names(Vec<OsString>),
}

impl Relevant {
    fn add(&mut self, name: &OsStr) {
        if let Relevant::Names(names) = self
            && !names.iter().any(|known| known == name)
        {
            names.push(name.to_owned());
        }
    }

    fn contains(&self, name: &OsStr) -> bool {
        match self {
            Relevant::All => true,
            Relevant::Names(names) => names.iter().any(|known| known == name),
        }
    }
}

struct Watched {
    relevant: Relevant,
    /// The directory's (dev, inode) when the watch was added: a directory
    /// deleted and re-created under the same name needs a new watch.
    identity: (u64, u64),
}

/// What a reload would read, as far as the watcher compares it.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    /// The whole content: config files are small, and a touch or a rewrite
    /// with the same bytes must not reload.
    config: Option<Vec<u8>>,
    binaries: BTreeMap<OsString, BinaryId>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct BinaryId {
    dev: u64,
    ino: u64,
    mode: u32,
    len: u64,
    mtime_ns: i128,
}

struct Watch {
    watcher: RecommendedWatcher,
    targets: Targets,
    watched: BTreeMap<PathBuf, Watched>,
    /// Logged once when services_dir goes away and once when it is back.
    services_missing: bool,
    /// The watch limit is logged once, not once per directory.
    limit_logged: bool,
    last: Option<Snapshot>,
}

impl Watch {
    fn run(
        &mut self,
        events: &std_mpsc::Receiver<Message>,
        debounce: Duration,
        sink: &mpsc::Sender<DaemonEvent>,
    ) {
        loop {
            // Idle: blocked here until inotify reports something.
            match events.recv() {
                Ok(Message::Event(event)) => match self.gather(&event, events, GATHER) {
                    Some(true) => {}
                    Some(false) => continue,
                    None => return,
                },
                Ok(Message::Stop) | Err(_) => return,
            }
            let mut quiet_from = Instant::now();
            loop {
                let wait = debounce.saturating_sub(quiet_from.elapsed());
                match events.recv_timeout(wait) {
                    Ok(Message::Event(event)) => match self.gather(&event, events, wait) {
                        Some(true) => quiet_from = Instant::now(),
                        Some(false) => {}
                        None => return,
                    },
                    Ok(Message::Stop) | Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
                    Err(std_mpsc::RecvTimeoutError::Timeout) => {
                        // A directory that just appeared (a new NAME/, a
                        // re-created services_dir) was not watched while
                        // files were being written in it: watch it, then
                        // wait one more quiet window so that a copy still
                        // going on is seen to the end.
                        if !self.rearm() {
                            break;
                        }
                        quiet_from = Instant::now();
                    }
                }
            }
            let now = self.snapshot();
            if self.last.as_ref() == Some(&now) {
                tracing::debug!("watched files settled unchanged; no reload");
                continue;
            }
            self.last = Some(now);
            tracing::info!("the config file or services_dir changed; reloading");
            // This thread is not a runtime worker: blocking here is fine,
            // and it ends once the daemon stops listening.
            if sink.blocking_send(DaemonEvent::Reload).is_err() {
                return;
            }
        }
    }

    /// Lets the rest of a burst arrive (at most `GATHER`, less when the
    /// quiet window ends sooner), then takes every event queued meanwhile:
    /// a fleet's start makes two directories per service under watched
    /// ones, and this thread was woken once per event. Whether `first` or
    /// any gathered event is relevant; `None` once the watcher must stop.
    fn gather(
        &self,
        first: &notify::Result<notify::Event>,
        events: &std_mpsc::Receiver<Message>,
        within: Duration,
    ) -> Option<bool> {
        let mut relevant = self.relevant(first);
        std::thread::sleep(GATHER.min(within));
        loop {
            match events.try_recv() {
                Ok(Message::Event(event)) => relevant |= self.relevant(&event),
                Ok(Message::Stop) | Err(std_mpsc::TryRecvError::Disconnected) => return None,
                Err(std_mpsc::TryRecvError::Empty) => return Some(relevant),
            }
        }
    }

    /// Whether an event may change what a reload would read.
    fn relevant(&self, event: &notify::Result<notify::Event>) -> bool {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                // Lost events, a watch gone: look at everything again.
                tracing::debug!("file watcher: {error}");
                return true;
            }
        };
        if event.need_rescan() {
            return true;
        }
        // Our own reads (and a service's exec) open files: without this
        // every snapshot would wake the next one.
        if let EventKind::Access(kind) = event.kind
            && kind != AccessKind::Close(AccessMode::Write)
        {
            return false;
        }
        event.paths.iter().any(|path| {
            if self.watched.contains_key(path) {
                return true;
            }
            match (path.parent(), path.file_name()) {
                (Some(dir), Some(name)) => self
                    .watched
                    .get(dir)
                    .is_some_and(|watched| watched.relevant.contains(name)),
                _ => false,
            }
        })
    }

    /// Brings the watches in line with what exists now. True when a watch
    /// was added (something may have happened there unseen).
    fn rearm(&mut self) -> bool {
        let wanted = self.wanted();
        let gone: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|dir| !wanted.contains_key(*dir))
            .cloned()
            .collect();
        for dir in gone {
            self.watched.remove(&dir);
            // inotify drops the watch of a deleted directory by itself.
            let _ = self.watcher.unwatch(&dir);
        }
        let mut added = false;
        for (dir, relevant) in wanted {
            let Ok(metadata) = std::fs::metadata(&dir) else {
                continue;
            };
            let identity = (metadata.dev(), metadata.ino());
            if let Some(watched) = self.watched.get_mut(&dir)
                && watched.identity == identity
            {
                watched.relevant = relevant;
                // notify drops its watch of a directory that was moved or
                // deleted; one that came back as the same inode (moved away
                // and back) must be watched again. inotify hands back the
                // same watch for an inode already watched, so this costs
                // nothing when the watch is still there.
                let _ = self.watcher.watch(&dir, RecursiveMode::NonRecursive);
                continue;
            }
            if self.watched.remove(&dir).is_some() {
                let _ = self.watcher.unwatch(&dir);
            }
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.watched.insert(dir, Watched { relevant, identity });
                    added = true;
                }
                Err(error) if at_a_limit(&error) => {
                    if !self.limit_logged {
                        self.limit_logged = true;
                        tracing::warn!(dir = %dir.display(), "cannot watch: {error} (the inotify watch limit, fs.inotify.max_user_watches); changes there are not picked up by themselves: reload with `orchestrator reload` or SIGHUP");
                    }
                }
                // Raced with its deletion: the event of that is on its way.
                Err(error) => tracing::debug!(dir = %dir.display(), "cannot watch: {error}"),
            }
        }
        added
    }

    /// Every directory to watch, with the entries of it that matter.
    fn wanted(&mut self) -> BTreeMap<PathBuf, Relevant> {
        let mut wanted: BTreeMap<PathBuf, Relevant> = BTreeMap::new();
        let mut want = |dir: PathBuf, name: &OsStr| {
            wanted
                .entry(dir)
                .or_insert_with(|| Relevant::Names(Vec::with_capacity(1)))
                .add(name);
        };
        if let Some(config) = &self.targets.config {
            for (dir, name) in chain(config) {
                want(dir, &name);
            }
        }
        let services = &self.targets.services_dir;
        let resolved = chain(services);
        let real = resolved
            .last()
            .map(|(dir, name)| dir.join(name))
            .filter(|real| real.is_dir());
        for (dir, name) in resolved {
            want(dir, &name);
        }
        match &real {
            Some(_) if self.services_missing => {
                self.services_missing = false;
                tracing::info!(services_dir = %services.display(), "services_dir is back; watching it again");
            }
            None if !self.services_missing => {
                self.services_missing = true;
                tracing::warn!(services_dir = %services.display(), "services_dir does not exist; watching for it to appear");
            }
            _ => {}
        }
        if let Some(real) = real {
            for entry in std::fs::read_dir(&real).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                // NAME/ itself, or a symlink to a directory elsewhere.
                if kind.is_dir() || (kind.is_symlink() && entry.path().is_dir()) {
                    for (dir, hop) in chain(&services.join(&name).join(&name)) {
                        want(dir, &hop);
                    }
                }
            }
            wanted.insert(real, Relevant::All);
        }
        wanted
    }

    fn snapshot(&self) -> Snapshot {
        let config = self
            .targets
            .config
            .as_ref()
            .and_then(|path| std::fs::read(path).ok());
        let binaries = binaries_in(&self.targets.services_dir);
        Snapshot { config, binaries }
    }
}

fn binaries_in(services: &Path) -> BTreeMap<OsString, BinaryId> {
    let mut binaries = BTreeMap::new();
    for entry in std::fs::read_dir(services).into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Ok(metadata) = std::fs::metadata(services.join(&name).join(&name)) else {
            continue;
        };
        if !metadata.is_file() {
            continue;
        }
        let mtime_ns =
            i128::from(metadata.mtime()) * 1_000_000_000 + i128::from(metadata.mtime_nsec());
        binaries.insert(
            name,
            BinaryId {
                dev: metadata.dev(),
                ino: metadata.ino(),
                mode: metadata.mode(),
                len: metadata.len(),
                mtime_ns,
            },
        );
    }
    binaries
}

fn at_a_limit(error: &notify::Error) -> bool {
    match &error.kind {
        notify::ErrorKind::MaxFilesWatch => true,
        notify::ErrorKind::Io(error) => error.raw_os_error() == Some(libc::ENOSPC),
        _ => false,
    }
}

/// The (directory, entry) pairs a path goes through that can change what
/// it opens: each symlink on the way and the final entry, which may not
/// exist (then the deepest directory that does, and the missing name).
fn chain(path: &Path) -> Vec<(PathBuf, OsString)> {
    let mut hops = Vec::new();
    let mut todo: Vec<OsString> = path
        .components()
        .rev()
        .map(|c| c.as_os_str().to_owned())
        .collect();
    let mut current = PathBuf::from("/");
    let mut links = 0;
    while let Some(part) = todo.pop() {
        match Path::new(&part).components().next() {
            Some(Component::RootDir) => {
                current = PathBuf::from("/");
                continue;
            }
            Some(Component::ParentDir) => {
                current.pop();
                continue;
            }
            Some(Component::Normal(_)) => {}
            _ => continue,
        }
        let next = current.join(&part);
        let Ok(metadata) = std::fs::symlink_metadata(&next) else {
            hops.push((current, part));
            return hops;
        };
        if !metadata.file_type().is_symlink() {
            if todo.is_empty() {
                hops.push((current, part));
            }
            current = next;
            continue;
        }
        hops.push((current.clone(), part));
        links += 1;
        let Ok(target) = std::fs::read_link(&next) else {
            return hops;
        };
        if links > MAX_SYMLINKS {
            return hops;
        }
        todo.extend(target.components().rev().map(|c| c.as_os_str().to_owned()));
    }
    hops
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::Write;
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    /// Far above any debounce here: a loaded machine is slow, not broken.
    const DEADLINE: Duration = Duration::from_secs(15);
    const DEBOUNCE: Duration = Duration::from_millis(300);
    /// How long "nothing happens" is watched for: several debounce windows.
    const QUIET: Duration = Duration::from_millis(1500);

    struct Setup {
        _dir: tempfile::TempDir,
        root: PathBuf,
        config: PathBuf,
        services: PathBuf,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let config = root.join("orchestrator.toml");
        fs::write(&config, "[orchestrator]\n").unwrap();
        let services = root.join("services");
        fs::create_dir(&services).unwrap();
        Setup {
            _dir: dir,
            root,
            config,
            services,
        }
    }

    async fn watch(
        config: Option<&Path>,
        services: &Path,
        debounce: Duration,
    ) -> (WatchHandle, mpsc::Receiver<DaemonEvent>) {
        watch_from(config, services, debounce, None).await
    }

    /// [`watch`], armed after the daemon planned from `known`.
    async fn watch_from(
        config: Option<&Path>,
        services: &Path,
        debounce: Duration,
        known: Option<Binaries>,
    ) -> (WatchHandle, mpsc::Receiver<DaemonEvent>) {
        let (tx, rx) = mpsc::channel(64);
        let handle = spawn_watcher(
            config.map(Path::to_owned),
            services.to_owned(),
            debounce,
            tx,
            known,
        )
        .await
        .unwrap();
        (handle, rx)
    }

    async fn expect_reload(rx: &mut mpsc::Receiver<DaemonEvent>, what: &str) {
        match tokio::time::timeout(DEADLINE, rx.recv()).await {
            Ok(Some(DaemonEvent::Reload)) => {}
            other => panic!("{what}: expected one Reload, got {other:?}"),
        }
    }

    /// Nothing for QUIET: no wait can prove "never", but a reload that
    /// was coming would have come within a few debounce windows.
    async fn expect_quiet(rx: &mut mpsc::Receiver<DaemonEvent>, what: &str) {
        if let Ok(event) = tokio::time::timeout(QUIET, rx.recv()).await {
            panic!("{what}: expected no event, got {event:?}");
        }
    }

    fn binary(services: &Path, name: &str, content: &[u8]) -> PathBuf {
        let dir = services.join(name);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        fs::write(&path, content).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[tokio::test]
    async fn a_change_at_the_end_of_a_burst_of_irrelevant_events_reloads() {
        let s = setup();
        binary(&s.services, "api", b"one");
        let (_handle, mut rx) = watch(None, &s.services, DEBOUNCE).await;
        // Files a service writes beside its binary matter to nobody; the
        // rewrite that follows them lands in the same gather.
        for i in 0..200 {
            fs::write(s.services.join("api").join(format!("scratch{i}")), b"x").unwrap();
        }
        fs::write(s.services.join("api").join("api"), b"two, longer").unwrap();
        expect_reload(&mut rx, "binary rewritten after a burst of other files").await;
        expect_quiet(&mut rx, "after the burst").await;
    }

    #[tokio::test]
    async fn an_edit_in_place_reloads_once() {
        let s = setup();
        let (_handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        let mut file = fs::OpenOptions::new().append(true).open(&s.config).unwrap();
        file.write_all(b"watch = true\n").unwrap();
        drop(file);
        expect_reload(&mut rx, "edit in place").await;
        expect_quiet(&mut rx, "after the edit").await;
    }

    #[tokio::test]
    async fn write_to_a_temporary_and_rename_reloads_once() {
        let s = setup();
        let (_handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        let temporary = s.root.join(".orchestrator.toml.swp");
        fs::write(&temporary, "[orchestrator]\nwatch = true\n").unwrap();
        fs::rename(&temporary, &s.config).unwrap();
        expect_reload(&mut rx, "rename over").await;
        expect_quiet(&mut rx, "after the rename").await;
        // The watch follows the name, not the replaced inode.
        fs::write(&s.config, "[orchestrator]\n").unwrap();
        expect_reload(&mut rx, "edit of the renamed file").await;
    }

    #[tokio::test]
    async fn the_same_content_does_not_reload() {
        let s = setup();
        let (_handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        let file = fs::File::options().write(true).open(&s.config).unwrap();
        file.set_modified(std::time::SystemTime::now() + Duration::from_secs(60))
            .unwrap();
        drop(file);
        let temporary = s.root.join("orchestrator.toml.new");
        fs::write(&temporary, "[orchestrator]\n").unwrap();
        fs::rename(&temporary, &s.config).unwrap();
        expect_quiet(&mut rx, "touch and identical rewrite").await;
    }

    /// Kubernetes mounts a ConfigMap as NAME -> ..data/NAME, ..data -> a
    /// timestamped directory, and updates by swapping ..data atomically.
    #[tokio::test]
    async fn a_kubernetes_style_symlink_swap_reloads_once() {
        let s = setup();
        let mount = s.root.join("config");
        let first = mount.join("..2026_12_02_first");
        fs::create_dir_all(&first).unwrap();
        fs::write(first.join("orchestrator.toml"), "[orchestrator]\n").unwrap();
        symlink("..2026_12_02_first", mount.join("..data")).unwrap();
        symlink("..data/orchestrator.toml", mount.join("orchestrator.toml")).unwrap();
        let config = mount.join("orchestrator.toml");
        let (_handle, mut rx) = watch(Some(&config), &s.services, DEBOUNCE).await;

        let second = mount.join("..2026_12_02_second");
        fs::create_dir(&second).unwrap();
        fs::write(
            second.join("orchestrator.toml"),
            "[orchestrator]\nwatch = true\n",
        )
        .unwrap();
        symlink("..2026_12_02_second", mount.join("..data_tmp")).unwrap();
        fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
        fs::remove_dir_all(&first).unwrap();
        expect_reload(&mut rx, "symlink swap").await;
        expect_quiet(&mut rx, "after the swap").await;
        // Re-armed on the new target directory.
        fs::write(second.join("orchestrator.toml"), "[orchestrator]\n").unwrap();
        expect_reload(&mut rx, "edit behind the new ..data").await;
    }

    #[tokio::test]
    async fn fifty_rapid_edits_reload_once() {
        let s = setup();
        let (_handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        for n in 0..50 {
            fs::write(&s.config, format!("[orchestrator]\n# edit {n}\n")).unwrap();
        }
        expect_reload(&mut rx, "50 edits").await;
        // A machine that stalls the writer past the window may split the
        // burst; more than that would be a debounce that does not work.
        let mut extra = 0;
        while let Ok(Some(_)) = tokio::time::timeout(QUIET, rx.recv()).await {
            extra += 1;
            assert!(extra <= 2, "50 edits gave {} reloads", extra + 1);
        }
    }

    #[tokio::test]
    async fn a_new_binary_reloads_once() {
        let s = setup();
        let (_handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        binary(&s.services, "api", b"#!/bin/sh\nexit 0\n");
        expect_reload(&mut rx, "new binary").await;
        expect_quiet(&mut rx, "after the new binary").await;
        // Replaced (a new inode), then removed.
        let replacement = s.services.join("api").join(".api.new");
        fs::write(&replacement, b"#!/bin/sh\nexit 1\n").unwrap();
        fs::set_permissions(&replacement, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&replacement, s.services.join("api").join("api")).unwrap();
        expect_reload(&mut rx, "replaced binary").await;
        fs::remove_dir_all(s.services.join("api")).unwrap();
        expect_reload(&mut rx, "removed binary").await;
    }

    #[tokio::test]
    async fn a_binary_dropped_before_the_watchers_are_armed_reloads_once() {
        // The daemon planned from `known`; the watchers are armed later.
        let s = setup();
        binary(&s.services, "web", b"#!/bin/sh\nexit 0\n");
        let known = Binaries::now(&s.services);
        binary(&s.services, "api", b"#!/bin/sh\nexit 0\n");
        let (_handle, mut rx) =
            watch_from(Some(&s.config), &s.services, DEBOUNCE, Some(known)).await;
        expect_reload(&mut rx, "a binary added before arming").await;
        expect_quiet(&mut rx, "after that reload").await;
    }

    #[tokio::test]
    async fn nothing_changed_before_the_watchers_are_armed_is_no_reload() {
        let s = setup();
        binary(&s.services, "web", b"#!/bin/sh\nexit 0\n");
        let known = Binaries::now(&s.services);
        let (_handle, mut rx) =
            watch_from(Some(&s.config), &s.services, DEBOUNCE, Some(known)).await;
        expect_quiet(&mut rx, "services_dir as planned").await;
    }

    #[tokio::test]
    async fn a_binary_copied_slowly_reloads_once_complete() {
        let s = setup();
        let path = binary(&s.services, "worker", b"");
        // Ten times the pace of the chunks: a loaded machine that stalls
        // the writer must not make the copy look finished.
        let debounce = Duration::from_secs(1);
        let (_handle, mut rx) = watch(None, &s.services, debounce).await;
        let mut file = fs::OpenOptions::new().append(true).open(&path).unwrap();
        for _ in 0..10 {
            file.write_all(&[0x7f; 64 * 1024]).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                rx.try_recv().is_err(),
                "a reload while the binary was still being written"
            );
        }
        drop(file);
        expect_reload(&mut rx, "slow copy").await;
        expect_quiet(&mut rx, "after the slow copy").await;
    }

    #[tokio::test]
    async fn a_binary_copied_slowly_into_a_new_directory_waits_for_the_end() {
        let s = setup();
        // Ten times the pace of the chunks: a loaded machine that stalls
        // the writer must not make the copy look finished.
        let debounce = Duration::from_secs(1);
        let (_handle, mut rx) = watch(None, &s.services, debounce).await;
        // The directory's creation is seen before its watch exists.
        fs::create_dir(s.services.join("late")).unwrap();
        let mut file = fs::File::create(s.services.join("late").join("late")).unwrap();
        for _ in 0..10 {
            file.write_all(&[0x7f; 64 * 1024]).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert!(
                rx.try_recv().is_err(),
                "a reload while the binary was still being written"
            );
        }
        drop(file);
        expect_reload(&mut rx, "slow copy into a new directory").await;
        expect_quiet(&mut rx, "after it").await;
    }

    #[tokio::test]
    async fn services_dir_deleted_and_recreated_is_still_watched() {
        let s = setup();
        binary(&s.services, "api", b"one");
        let (_handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        fs::remove_dir_all(&s.services).unwrap();
        expect_reload(&mut rx, "services_dir deleted").await;
        fs::create_dir(&s.services).unwrap();
        expect_quiet(&mut rx, "an empty services_dir is what was there").await;
        binary(&s.services, "api", b"two");
        expect_reload(&mut rx, "binary in the re-created services_dir").await;
        fs::write(s.services.join("api").join("api"), b"three!").unwrap();
        expect_reload(&mut rx, "binary rewritten after re-arming").await;
    }

    /// A blue/green deploy: a whole new services_dir renamed into place.
    #[tokio::test]
    async fn services_dir_swapped_by_rename_is_followed() {
        let s = setup();
        binary(&s.services, "api", b"blue");
        let (_handle, mut rx) = watch(None, &s.services, DEBOUNCE).await;
        let green = s.root.join("services.green");
        binary(&green, "api", b"green");
        fs::rename(&s.services, s.root.join("services.blue")).unwrap();
        fs::rename(&green, &s.services).unwrap();
        expect_reload(&mut rx, "services_dir swapped").await;
        // The old tree is no longer what a reload reads.
        fs::write(s.root.join("services.blue").join("api").join("api"), b"old").unwrap();
        expect_quiet(&mut rx, "a write in the old tree").await;
        fs::write(s.services.join("api").join("api"), b"green 2").unwrap();
        expect_reload(&mut rx, "a write in the new tree").await;
    }

    /// NAME/NAME as a symlink into a releases tree: both a re-pointed link
    /// and a rewrite of what it points at are seen.
    #[tokio::test]
    async fn a_binary_behind_a_symlink_is_followed() {
        let s = setup();
        let releases = s.root.join("releases");
        binary(&releases, "v1", b"one");
        binary(&releases, "v2", b"two");
        fs::create_dir(s.services.join("api")).unwrap();
        let link = s.services.join("api").join("api");
        symlink(releases.join("v1").join("v1"), &link).unwrap();
        let (_handle, mut rx) = watch(None, &s.services, DEBOUNCE).await;
        fs::write(releases.join("v1").join("v1"), b"one, patched").unwrap();
        expect_reload(&mut rx, "target rewritten").await;
        let next = s.services.join("api").join(".api.next");
        symlink(releases.join("v2").join("v2"), &next).unwrap();
        fs::rename(&next, &link).unwrap();
        expect_reload(&mut rx, "link re-pointed").await;
        fs::write(releases.join("v1").join("v1"), b"one, unused").unwrap();
        expect_quiet(&mut rx, "the release no longer pointed at").await;
    }

    #[tokio::test]
    async fn a_missing_services_dir_is_watched_for() {
        let s = setup();
        let services = s.root.join("not").join("yet");
        let (_handle, mut rx) = watch(None, &services, DEBOUNCE).await;
        fs::create_dir_all(&services).unwrap();
        binary(&services, "api", b"binary");
        expect_reload(&mut rx, "services_dir created with a binary").await;
    }

    #[tokio::test]
    async fn unrelated_files_and_dropping_the_handle_send_nothing() {
        let s = setup();
        let (handle, mut rx) = watch(Some(&s.config), &s.services, DEBOUNCE).await;
        // Beside the config and beside a binary: neither is read by a reload.
        fs::write(s.root.join("notes.txt"), "x").unwrap();
        binary(&s.services, "api", b"binary");
        expect_reload(&mut rx, "new binary").await;
        fs::write(s.services.join("api").join("api.log"), "line\n").unwrap();
        expect_quiet(&mut rx, "unrelated files").await;
        drop(handle);
        fs::write(&s.config, "[orchestrator]\nwatch = false\n").unwrap();
        // The thread holds the only sender: stopped, the channel closes.
        match tokio::time::timeout(DEADLINE, rx.recv()).await {
            Ok(None) => {}
            other => panic!("after the drop: expected the channel closed, got {other:?}"),
        }
    }

    #[test]
    fn chain_follows_each_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        fs::create_dir(root.join("real")).unwrap();
        fs::write(root.join("real").join("file"), "").unwrap();
        symlink("real", root.join("data")).unwrap();
        symlink("data/file", root.join("link")).unwrap();
        assert_eq!(
            chain(&root.join("link")),
            vec![
                (root.clone(), "link".into()),
                (root.clone(), "data".into()),
                (root.join("real"), "file".into()),
            ]
        );
        assert_eq!(
            chain(&root.join("missing").join("file")),
            vec![(root.clone(), "missing".into())]
        );
    }

    #[tokio::test]
    async fn a_name_dir_moved_away_and_back_is_still_watched() {
        let s = setup();
        binary(&s.services, "api", b"one");
        let (_handle, mut rx) = watch(None, &s.services, DEBOUNCE).await;
        let aside = s.services.join("api.aside");
        fs::rename(s.services.join("api"), &aside).unwrap();
        fs::rename(&aside, s.services.join("api")).unwrap();
        // The move may or may not settle into a reload of its own.
        let _ = tokio::time::timeout(QUIET, rx.recv()).await;
        fs::write(s.services.join("api").join("api"), b"two, longer").unwrap();
        expect_reload(&mut rx, "binary rewritten after its dir came back").await;
    }
}
