//! Finding service binaries by convention: `services_dir/NAME/NAME`.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

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

/// Scan `services_dir`: every entry NAME that is a directory with a valid
/// service name and holds an executable regular file NAME (symlinks followed
/// for both checks) is discovered; anything else is skipped with a debug line
/// saying why. Sorted by name. A missing `services_dir` discovers nothing; any
/// other failure to read it is an error.
pub fn discover(services_dir: &Path) -> Result<Vec<Discovered>, DiscoveryError> {
    let read_error = |source| DiscoveryError::ReadDir {
        dir: services_dir.to_path_buf(),
        source,
    };
    let entries = match fs::read_dir(services_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            tracing::debug!(
                dir = %services_dir.display(),
                "services directory does not exist; nothing discovered"
            );
            return Ok(Vec::new());
        }
        Err(err) => return Err(read_error(err)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(read_error)?;
        let path = entry.path();
        let Ok(name) = entry.file_name().into_string() else {
            tracing::debug!(path = %path.display(), "skipped: the name is not valid UTF-8");
            continue;
        };
        let name = match ServiceName::parse(&name) {
            Ok(name) => name,
            Err(reason) => {
                tracing::debug!(path = %path.display(), "skipped: {reason}");
                continue;
            }
        };
        match check_entry(&path, &name) {
            Ok(binary) => found.push(Discovered { name, binary }),
            Err(reason) => tracing::debug!(path = %path.display(), "skipped: {reason}"),
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// The binary of the entry `path` (named `name`), or why it does not count.
fn check_entry(path: &Path, name: &str) -> Result<PathBuf, String> {
    // fs::metadata follows symlinks: a linked directory or binary counts as
    // what it points to, which is how deployments often swap versions.
    match fs::metadata(path) {
        Ok(meta) if meta.is_dir() => {}
        Ok(_) => return Err("not a directory".to_owned()),
        Err(err) => return Err(format!("cannot inspect it: {err}")),
    }
    let binary = path.join(name);
    match fs::metadata(&binary) {
        Ok(meta) if !meta.is_file() => Err(format!("{} is not a regular file", binary.display())),
        // Any execute bit: whether this user may run it is for the spawn to
        // report, loudly, rather than for discovery to hide.
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => Err(format!(
            "{} is not executable (chmod +x it)",
            binary.display()
        )),
        Ok(_) => Ok(binary),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(format!("no binary {} inside", binary.display()))
        }
        Err(err) => Err(format!("cannot inspect {}: {err}", binary.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "orchestrator-discovery-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn file(&self, relative: &str, mode: u32) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, "#!/bin/sh\n").unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
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

        let found = discover(&dir.0).unwrap();
        assert_eq!(names(&found), ["api", "linked", "owner-only", "tool"]);
        assert_eq!(found[0].binary, api);
        assert_eq!(found[1].binary, dir.0.join("linked/linked"));
        assert_eq!(found[3].binary, dir.0.join("tool/tool"));
    }

    #[test]
    fn missing_dir_is_empty() {
        let dir = TempDir::new("missing");
        assert!(discover(&dir.0.join("absent")).unwrap().is_empty());
        assert!(discover(&dir.0).unwrap().is_empty());
    }

    #[test]
    fn unreadable_dir_is_an_error() {
        let dir = TempDir::new("notdir");
        let file = dir.file("file", 0o644);
        let err = discover(&file).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(&file.display().to_string()), "{message}");
        assert!(message.contains("services_dir"), "{message}");
        assert!(std::error::Error::source(&err).is_some());
    }
}
