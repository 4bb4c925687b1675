//! Finding service binaries by convention: `services_dir/NAME/NAME`.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, SFlag, fstatat};

use crate::config::Config;
use crate::name::ServiceName;

/// A service binary found in the services directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discovered {
    pub name: ServiceName,
    /// `services_dir/NAME/NAME`, as found (symlinks not resolved).
    pub binary: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error(
        "cannot read the services directory {}: {source}; make it a readable directory or point orchestrator.services_dir elsewhere",
        dir.display()
    )]
    ReadDir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An entry of the services directory that is not a service, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub path: PathBuf,
    /// Why, and what to do to make it count.
    pub reason: String,
}

/// What a scan of the services directory found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    /// False when the directory does not exist (which discovers nothing).
    pub exists: bool,
    pub found: Vec<Discovered>,
    /// Sorted by path.
    pub skipped: Vec<Skipped>,
}

/// Scan `services_dir`: every entry NAME that is a directory with a valid
/// service name and holds an executable regular file NAME (symlinks followed
/// for both checks) is discovered; anything else is skipped with a debug line
/// saying why. Sorted by name. A missing `services_dir` discovers nothing; any
/// other failure to read it is an error.
///
/// Entries named after a configured section (`configured(NAME)`) are passed
/// over without a system call: the plan takes a configured service's binary
/// from its section, never from the scan, and its NAME/ is often only its
/// data_dir's home. With thousands of services, looking into each was a
/// sixth of a reload.
pub fn discover(
    services_dir: &Path,
    configured: &dyn Fn(&str) -> bool,
) -> Result<Vec<Discovered>, DiscoveryError> {
    let scan = scan_explaining(services_dir, configured, false)?;
    for skipped in &scan.skipped {
        tracing::debug!(path = %skipped.path.display(), "skipped: {}", skipped.reason);
    }
    Ok(scan.found)
}

/// [`discover`] in `config`'s services_dir, passing over the entries its
/// sections configure.
pub fn discover_unconfigured(config: &Config) -> Result<Vec<Discovered>, DiscoveryError> {
    let sections = config.section_names();
    discover(&config.orchestrator.services_dir, &|name| {
        sections.contains(name)
    })
}

/// Every entry, each skipped one with why in full, so that `discover` can
/// say it rather than leave a binary silently ignored.
pub fn scan(services_dir: &Path) -> Result<Scan, DiscoveryError> {
    scan_explaining(services_dir, &|_| false, true)
}

/// The scan of [`discover`] (configured names passed over), saying in full
/// why an entry without a binary was skipped (a dangling link, the files
/// found instead) when `explain`: each explanation costs a few more system
/// calls.
pub fn scan_explaining(
    services_dir: &Path,
    configured: &dyn Fn(&str) -> bool,
    explain: bool,
) -> Result<Scan, DiscoveryError> {
    let read_error = |source| DiscoveryError::ReadDir {
        dir: services_dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(services_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Scan::default()),
        Err(err) => return Err(read_error(err)),
    };
    // Each entry is looked at relative to the directory: a lookup of NAME
    // and NAME/NAME, not of the whole path from / again, thousands of times
    // per reload on a big host.
    let dir = nix::fcntl::open(
        services_dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|errno| read_error(errno.into()))?;
    let mut scan = Scan {
        exists: true,
        ..Scan::default()
    };
    for entry in entries {
        let entry = entry.map_err(read_error)?;
        let file_name = entry.file_name();
        if file_name.to_str().is_some_and(configured) {
            continue;
        }
        let path = entry.path();
        let mut skip = |reason: String| {
            scan.skipped.push(Skipped {
                path: path.clone(),
                reason,
            })
        };
        let Ok(name) = file_name.into_string() else {
            skip("the name is not valid UTF-8; rename it".to_owned());
            continue;
        };
        let name = match ServiceName::section(&name) {
            Ok(name) => name,
            Err(reason) => {
                skip(format!("name invalid: {reason}"));
                continue;
            }
        };
        // A plain directory, as getdents says: no stat needed to know it.
        let plain_dir = entry.file_type().is_ok_and(|kind| kind.is_dir());
        match check_entry(&dir, &path, &name, explain, plain_dir) {
            Ok(binary) => scan.found.push(Discovered { name, binary }),
            Err(reason) => skip(reason),
        }
    }
    scan.found.sort_by(|a, b| a.name.cmp(&b.name));
    // Byte order: the same as the paths' order here (one directory), and
    // without comparing component by component.
    scan.skipped
        .sort_by(|a, b| a.path.as_os_str().cmp(b.path.as_os_str()));
    Ok(scan)
}

/// The binary of the entry `path` (named `name`, in `dir`), or why it does
/// not count.
fn check_entry(
    dir: &OwnedFd,
    path: &Path,
    name: &str,
    explain: bool,
    plain_dir: bool,
) -> Result<PathBuf, String> {
    // A stat that follows symlinks: a linked directory or binary counts as
    // what it points to, which is how deployments often swap versions.
    let kind = |meta: &FileStat| SFlag::from_bits_truncate(meta.st_mode) & SFlag::S_IFMT;
    if !plain_dir {
        match fstatat(dir, name, AtFlags::empty()) {
            Ok(meta) if kind(&meta) == SFlag::S_IFDIR => {}
            Ok(_) => {
                return Err(format!(
                    "not a directory: a service is a directory {name}/ holding its binary {name}/{name}"
                ));
            }
            Err(err) => return Err(format!("cannot inspect it: {}", io::Error::from(err))),
        }
    }
    let binary = path.join(name);
    match fstatat(dir, format!("{name}/{name}").as_str(), AtFlags::empty()).map_err(io::Error::from)
    {
        Ok(meta) if kind(&meta) == SFlag::S_IFDIR => Err(format!(
            "{name}/{name} is a directory, not a binary; put the executable at {name}/{name}"
        )),
        Ok(meta) if kind(&meta) != SFlag::S_IFREG => Err(format!(
            "{name}/{name} is not a regular file; put the executable there"
        )),
        // Any execute bit: whether this user may run it is for the spawn to
        // report, loudly, rather than for discovery to hide.
        Ok(meta) if meta.st_mode & 0o111 == 0 => Err(format!(
            "{name}/{name} is not executable; chmod +x {}",
            binary.display()
        )),
        Ok(_) => Ok(binary),
        Err(err) if err.kind() == io::ErrorKind::NotFound && !explain => {
            Err(format!("no binary {name}/{name}"))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(if let Ok(target) = fs::read_link(&binary) {
                format!(
                    "{name}/{name} is a symlink to {}, which does not exist; fix the link",
                    target.display()
                )
            } else if let Some(others) = other_files(path) {
                format!(
                    "no binary {name}/{name} (found {others}); the binary must be named like its directory"
                )
            } else {
                format!("no binary {name}/{name} inside; put the executable there")
            })
        }
        Err(err) => Err(format!("cannot inspect {name}/{name}: {err}")),
    }
}

/// A few names in `dir`, to show what is there instead of the binary.
fn other_files(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name != "data")
        .collect();
    if names.is_empty() {
        return None;
    }
    names.sort();
    let more = names.len().saturating_sub(3);
    names.truncate(3);
    let mut shown = names.join(", ");
    if more > 0 {
        shown.push_str(&format!(" and {more} more"));
    }
    Some(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::fs::symlink;

    /// A fresh directory (tempfile's: unique, removed on drop), and its path.
    struct TempDir(PathBuf, #[allow(dead_code)] tempfile::TempDir);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let guard = tempfile::Builder::new()
                .prefix(&format!("orchestrator-discovery-{tag}-"))
                .tempdir()
                .unwrap();
            TempDir(guard.path().to_owned(), guard)
        }

        fn file(&self, relative: &str, mode: u32) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    fn names(found: &[Discovered]) -> Vec<&str> {
        found.iter().map(|d| d.name.as_str()).collect()
    }

    #[test]
    fn discovers_executables_by_convention() {
        let dir = TempDir::new("scan");
        let api = dir.file("api/api", 0o755);
        dir.file("owner-only/owner-only", 0o700);
        dir.file("plain/plain", 0o644);
        dir.file("other/not-other", 0o755);
        fs::create_dir_all(dir.0.join("nested/nested")).unwrap();
        fs::create_dir_all(dir.0.join("empty")).unwrap();
        dir.file(".hidden/.hidden", 0o755);
        dir.file("-flag/-flag", 0o755);
        dir.file("loose-file", 0o755);
        // A symlinked binary, and a symlinked service directory.
        let target = dir.file("store/tool-v2", 0o755);
        fs::create_dir_all(dir.0.join("tool")).unwrap();
        symlink(&target, dir.0.join("tool/tool")).unwrap();
        dir.file("store/linked/linked", 0o755);
        symlink(dir.0.join("store/linked"), dir.0.join("linked")).unwrap();
        // A dangling symlink is skipped, not an error.
        fs::create_dir_all(dir.0.join("dangling")).unwrap();
        symlink(dir.0.join("nowhere"), dir.0.join("dangling/dangling")).unwrap();

        let found = discover(&dir.0, &|_| false).unwrap();
        assert_eq!(names(&found), ["api", "linked", "owner-only", "tool"]);
        assert_eq!(found[0].binary, api);
        assert_eq!(found[1].binary, dir.0.join("linked/linked"));
        assert_eq!(found[3].binary, dir.0.join("tool/tool"));

        let scanned = scan(&dir.0).unwrap();
        let skipped: Vec<(String, &str)> = scanned
            .skipped
            .iter()
            .map(|s| {
                let name = s.path.strip_prefix(&dir.0).unwrap().display().to_string();
                (name, s.reason.as_str())
            })
            .collect();
        let reason = |name: &str| {
            skipped
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("{name} not skipped: {skipped:#?}"))
                .1
        };
        assert!(reason("plain").starts_with("plain/plain is not executable; chmod +x "));
        assert!(
            reason(".hidden").starts_with("name invalid: "),
            "{skipped:#?}"
        );
        assert!(reason("-flag").starts_with("name invalid: "));
        assert_eq!(
            reason("other"),
            "no binary other/other (found not-other); the binary must be named like its directory"
        );
        assert_eq!(
            reason("nested"),
            "nested/nested is a directory, not a binary; put the executable at nested/nested"
        );
        assert!(reason("loose-file").starts_with("not a directory: "));
        assert_eq!(
            reason("empty"),
            "no binary empty/empty inside; put the executable there"
        );
        assert!(
            reason("dangling").starts_with("dangling/dangling is a symlink to "),
            "{skipped:#?}"
        );
        assert!(reason("dangling").ends_with("which does not exist; fix the link"));
    }

    #[test]
    fn a_symlink_loop_is_an_error_not_an_empty_directory() {
        let dir = TempDir::new("loop");
        symlink(dir.0.join("b"), dir.0.join("a")).unwrap();
        symlink(dir.0.join("a"), dir.0.join("b")).unwrap();
        let err = discover(&dir.0.join("a"), &|_| false).unwrap_err();
        assert!(err.to_string().contains("symbolic links"), "{err}");
        assert!(!scan(&dir.0.join("missing")).unwrap().exists);
    }

    #[test]
    fn configured_entries_are_passed_over() {
        let dir = TempDir::new("configured");
        dir.file("api/api", 0o755);
        dir.file("worker/worker", 0o755);
        fs::create_dir_all(dir.0.join("db/data")).unwrap();
        fs::create_dir_all(dir.0.join("stray")).unwrap();
        let configured = |name: &str| name == "api" || name == "db";
        let scanned = scan_explaining(&dir.0, &configured, true).unwrap();
        assert_eq!(names(&scanned.found), ["worker"]);
        let skipped: Vec<_> = scanned.skipped.iter().map(|s| s.path.clone()).collect();
        assert_eq!(skipped, [dir.0.join("stray")]);
        // Nothing passed over by `scan`, which lists the directory for
        // `discover` as it is.
        assert_eq!(names(&scan(&dir.0).unwrap().found), ["api", "worker"]);
    }

    #[test]
    fn missing_dir_is_empty() {
        let dir = TempDir::new("missing");
        assert!(
            discover(&dir.0.join("absent"), &|_| false)
                .unwrap()
                .is_empty()
        );
        assert!(discover(&dir.0, &|_| false).unwrap().is_empty());
    }

    #[test]
    fn unreadable_dir_is_an_error() {
        let dir = TempDir::new("notdir");
        let file = dir.file("file", 0o644);
        let err = discover(&file, &|_| false).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&file.display().to_string()), "{message}");
        assert!(message.contains("services_dir"), "{message}");
        assert!(std::error::Error::source(&err).is_some());
    }
}
