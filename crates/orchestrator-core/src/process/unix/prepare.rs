//! The preparation stage of a spawn, in the daemon before any process
//! exists: everything that allocates, may block or may fail for a reason
//! worth a clear message. The child that follows only takes steps that
//! cannot need any of that (see `clone_spawn`).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::unistd::{Gid, Group, Uid, User, geteuid, getgrouplist};
use sha2::Digest;

use super::{Launch, UnixSpawner, nofile_to_restore, resolve_program};
use crate::cgroup::{Flavor, Placement, ServiceCgroup, Unenforced};
use crate::config::{Rlimit, RlimitValue, Sha256};
use crate::process::{SpawnError, SpawnSpec, UserSpec};

/// A spawn made ready by `UnixSpawner::prepare`, for `UnixSpawner::launch`.
/// Holds the service's new cgroup, if any: dropping it unlaunched (or after
/// a failed launch) removes that cgroup again.
#[derive(Debug)]
pub struct Prepared {
    pub(super) service: String,
    /// As the spec gives it, for messages.
    pub(super) program: PathBuf,
    pub(super) launch: Launch,
    /// The binary opened and hashed, when sha256 is set: this descriptor is
    /// what the child executes.
    pub(super) exec_fd: Option<ExecFd>,
    pub(super) cgroup: Option<Arc<dyn ServiceCgroup>>,
    /// Another's cgroup the child joins without owning it (a health probe
    /// joins its service's): never removed here.
    pub(super) joined: Option<Arc<dyn ServiceCgroup>>,
    /// `cgroup.procs` of the cgroup the child joins (its own or the one
    /// it shares), one per hierarchy: closed with this, once launched.
    pub(super) join: Vec<OwnedFd>,
    /// stdout and stderr on one pipe, as `2>&1` (a probe: see
    /// `Spawner::spawn_probe`).
    pub(super) merge_output: bool,
    pub(super) memory_limit_mib: Option<u64>,
    pub(super) oom_kills_at_start: u64,
    /// Set in the child, in this order.
    pub(super) rlimits: Vec<ChildRlimit>,
    pub(super) credentials: Option<Credentials>,
    pub(super) no_new_privs: bool,
}

#[derive(Debug)]
pub(super) struct ExecFd {
    pub(super) fd: OwnedFd,
    /// A `#!` script: its interpreter opens /dev/fd/N after the exec, so
    /// the child must let this one descriptor survive the exec.
    pub(super) script: bool,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct ChildRlimit {
    pub(super) rlimit: Rlimit,
    pub(super) soft: u64,
    pub(super) hard: u64,
}

/// Resolved ids: the child cannot look anything up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Credentials {
    pub(super) uid: libc::uid_t,
    pub(super) gid: libc::gid_t,
    /// The supplementary groups, the primary one among them.
    pub(super) groups: Vec<libc::gid_t>,
}

impl Prepared {
    /// The service this spawn is for.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Whether posix_spawn cannot do it: every step beyond a clean start
    /// (process group, stdio, directory, default signals) needs the clone.
    pub(super) fn needs_clone(&self) -> bool {
        self.exec_fd.is_some()
            || self.cgroup.is_some()
            || self.joined.is_some()
            || !self.rlimits.is_empty()
            || self.credentials.is_some()
            || self.no_new_privs
    }

    pub(super) fn io_error(
        &self,
        stage: &'static str,
        action: &'static str,
        source: io::Error,
    ) -> SpawnError {
        SpawnError::Io {
            service: self.service.clone(),
            stage,
            action,
            path: self.program.clone(),
            source,
        }
    }
}

impl Drop for Prepared {
    fn drop(&mut self) {
        // Still here: never launched, or its child failed before exec and
        // has been reaped, so the cgroup is empty.
        if let Some(cgroup) = self.cgroup.take()
            && let Err(error) = cgroup.remove()
        {
            tracing::debug!(
                service = %self.service,
                "cannot remove cgroup {} after a failed start: {error}; left for the next \
                 start's sweep",
                cgroup.path().display()
            );
        }
    }
}

/// A service that runs as another user gets its default working directory
/// (its data_dir and HOME, `services_dir/NAME/data`) while that is an empty
/// directory of root's, as the daemon made it. Anything else (a directory
/// with content, another owner, a symlink, a configured data_dir) is left as
/// it is: the operator set that up.
fn hand_over_working_dir(dir: &Path, credentials: &Credentials) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let empty = std::fs::read_dir(dir).is_ok_and(|mut entries| entries.next().is_none());
    if !meta.is_dir() || meta.uid() != 0 || !empty {
        return;
    }
    if let Err(error) = std::os::unix::fs::lchown(dir, Some(credentials.uid), Some(credentials.gid))
    {
        tracing::warn!(
            "cannot give {} to uid {} gid {}: {error}; the service may not be able to write its own directory",
            dir.display(),
            credentials.uid,
            credentials.gid
        );
    }
}

/// Where the child is placed.
pub(super) enum Cgroup<'a> {
    /// A service: in a cgroup of its own, made now (where the controller
    /// makes any), after its binary's hash check.
    Own,
    /// A health probe: in its service's existing cgroup, if it has one;
    /// nothing made, no hash check, no working directory handed over (see
    /// `Spawner::spawn_probe`).
    Join(Option<&'a Arc<dyn ServiceCgroup>>),
}

pub(super) fn prepare(
    spawner: &UnixSpawner,
    spec: &SpawnSpec,
    cgroup: Cgroup<'_>,
) -> Result<Prepared, SpawnError> {
    let (own, joined) = match cgroup {
        Cgroup::Own => (true, None),
        Cgroup::Join(joined) => (false, joined.cloned()),
    };
    let sha256 = spec.sha256.filter(|_| own);
    let service = spec.service.as_str();
    let exec_error = |source| SpawnError::Exec {
        service: service.to_owned(),
        program: spec.program.clone(),
        source,
    };
    let resolved = resolve_program(&spec.program, &spec.env, &spec.cwd).map_err(exec_error)?;
    let launch = Launch::new(spec, &resolved).map_err(exec_error)?;
    // A relative path with a slash is executed from the service's directory.
    let file = spec.cwd.join(&resolved);
    let euid = geteuid().as_raw();
    let slow = sha256.is_some() || spec.user.is_some();
    let (exec_fd, credentials) = off_the_runtime(slow, || {
        if let Some(strict) = &spec.strict
            && euid == 0
        {
            strict_check(service, &file, &strict.services_dir)?;
        }
        let exec_fd = sha256
            .map(|expected| open_verified(service, &file, expected))
            .transpose()?;
        let credentials = spec
            .user
            .as_ref()
            .map(|user| resolve_user(service, user))
            .transpose()?;
        if let Some(credentials) = &credentials
            && euid == 0
            && own
            && spec.user.as_ref().is_some_and(|user| user.owns_working_dir)
        {
            hand_over_working_dir(&spec.cwd, credentials);
        }
        Ok::<_, SpawnError>((exec_fd, credentials))
    })?;
    // A daemon that is not root may name only its own account and group
    // (validate refuses the rest): there is nothing to switch, and setgroups
    // would need CAP_SETGID.
    let credentials = credentials.filter(|c| euid == 0 || c.uid != euid);
    let final_uid = credentials.as_ref().map_or(euid, |c| c.uid);
    // A probe joins its service's cgroup through descriptors opened now:
    // the service holds none while it runs.
    let join = match &joined {
        Some(cgroup) => cgroup.open_join().map_err(|source| SpawnError::Io {
            service: service.to_owned(),
            stage: "cgroup",
            action: "join its service's cgroup to run",
            path: spec.program.clone(),
            source,
        })?,
        None => Vec::new(),
    };
    let mut prepared = Prepared {
        service: service.to_owned(),
        program: spec.program.clone(),
        launch,
        exec_fd,
        cgroup: None,
        joined,
        join,
        merge_output: !own,
        memory_limit_mib: spec.limits.memory_mib.filter(|_| own),
        oom_kills_at_start: 0,
        rlimits: child_rlimits(&spec.rlimits),
        credentials,
        no_new_privs: spec.strict.is_some() && final_uid != 0,
    };
    // Last: the one step with an effect outside the daemon, so no later
    // step of the preparation can fail and leave it behind.
    if own && (spawner.controller.flavor() != Flavor::None || !spec.limits.is_empty()) {
        let placement = match spawner.controller.create(service, &spec.limits) {
            Ok(placement) => placement,
            Err(source) if spawner.require_limits => {
                return Err(SpawnError::Cgroup {
                    service: service.to_owned(),
                    source,
                });
            }
            // As where cgroups cannot be used at all: the service runs,
            // without its cgroup, and the warning below says what that costs.
            Err(error) => Placement {
                cgroup: None,
                unenforced: without_a_cgroup(&spec.limits, &error),
                join: Vec::new(),
            },
        };
        if let Some(cgroup) = &placement.cgroup {
            prepared.oom_kills_at_start = cgroup.oom_kills();
        }
        // Held by `prepared` from here: an error below removes it again.
        prepared.cgroup = placement.cgroup;
        prepared.join = placement.join;
        if !placement.unenforced.is_empty() {
            if spawner.require_limits {
                return Err(SpawnError::LimitsUnenforced {
                    service: service.to_owned(),
                    unenforced: placement.unenforced,
                });
            }
            if spawner.first_warning(service) {
                let list: Vec<String> =
                    placement.unenforced.iter().map(|u| u.to_string()).collect();
                tracing::warn!(
                    service = %service,
                    "{}: the service runs without; set require_limits = true to refuse to start \
                     it instead",
                    list.join("; ")
                );
            }
        }
    }
    Ok(prepared)
}

/// Every limit of `limits`, and containment itself, as not enforced
/// because the service's cgroup could not be made.
fn without_a_cgroup(
    limits: &crate::cgroup::Limits,
    error: &crate::cgroup::CgroupError,
) -> Vec<Unenforced> {
    let reason = format!("its cgroup could not be made ({error})");
    let mut unenforced = vec![Unenforced {
        limit: "containment",
        reason: format!(
            "{reason}, so a process that leaves its process group is not stopped with it"
        ),
    }];
    unenforced.extend(limits.keys().map(|limit| Unenforced {
        limit,
        reason: reason.clone(),
    }));
    unenforced
}

/// Run `work` where blocking is harmless: on a multi-thread runtime's
/// worker, through block_in_place, so the worker's other tasks move to
/// another thread meanwhile; inline anywhere else (block_in_place panics on
/// a current-thread runtime). Only for `slow` work (hashing a whole binary,
/// an NSS look-up that may go to the network): handing a worker over has a
/// cost of its own that a plain spawn should not pay.
fn off_the_runtime<T>(slow: bool, work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let multi_thread = slow
        && Handle::try_current().is_ok_and(|h| h.runtime_flavor() == RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(work)
    } else {
        work()
    }
}

/// The spec's rlimits, soft and hard alike, and RLIMIT_NOFILE put back to
/// the daemon's original soft limit when the spec leaves it alone.
fn child_rlimits(spec: &[(Rlimit, RlimitValue)]) -> Vec<ChildRlimit> {
    let mut rlimits: Vec<ChildRlimit> = spec
        .iter()
        .map(|&(rlimit, value)| {
            let value = match value {
                RlimitValue::Limited(n) => n,
                RlimitValue::Unlimited => libc::RLIM64_INFINITY,
            };
            ChildRlimit {
                rlimit,
                soft: value,
                hard: value,
            }
        })
        .collect();
    if !spec.iter().any(|&(rlimit, _)| rlimit == Rlimit::Nofile)
        && let Some((soft, hard)) = nofile_to_restore()
    {
        rlimits.push(ChildRlimit {
            rlimit: Rlimit::Nofile,
            soft,
            hard,
        });
    }
    rlimits
}

/// As sshd's StrictModes: while the daemon is root, whoever may write the
/// binary, or replace it through a directory above it, may run code as
/// root. Checked: the binary, and each directory from its parent up to
/// services_dir when it lies there (else its parent alone). Symlinks are
/// followed: what counts is the file that runs.
fn strict_check(service: &str, binary: &Path, services_dir: &Path) -> Result<(), SpawnError> {
    check_not_writable_by_others(service, binary)?;
    let under_services_dir = binary.starts_with(services_dir);
    let mut dir = binary.parent();
    while let Some(current) = dir.filter(|d| !d.as_os_str().is_empty()) {
        check_not_writable_by_others(service, current)?;
        if !under_services_dir || current == services_dir {
            break;
        }
        dir = current.parent();
    }
    Ok(())
}

fn check_not_writable_by_others(service: &str, path: &Path) -> Result<(), SpawnError> {
    let metadata = std::fs::metadata(path).map_err(|source| SpawnError::Io {
        service: service.to_owned(),
        stage: "strict",
        action: "check the permissions of",
        path: path.to_owned(),
        source,
    });
    let metadata = metadata.map_err(|error| missing_is_exec_error(service, path, error))?;
    let mode = metadata.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(SpawnError::Strict {
            service: service.to_owned(),
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// A binary (or a directory above it) that does not exist fails the start
/// as its exec would, with the same advice, whichever stage looked first.
fn missing_is_exec_error(service: &str, path: &Path, error: SpawnError) -> SpawnError {
    match error {
        SpawnError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
            SpawnError::Exec {
                service: service.to_owned(),
                program: path.to_owned(),
                source,
            }
        }
        other => other,
    }
}

/// Open the binary, hash it through that descriptor and keep the descriptor
/// to execute: a file renamed over the path after the hash is not what
/// runs. (One written in place by someone allowed to write it is; the
/// strict check is what keeps those to root.)
fn open_verified(service: &str, path: &Path, expected: Sha256) -> Result<ExecFd, SpawnError> {
    let io_error = |action, source| SpawnError::Io {
        service: service.to_owned(),
        stage: "checksum",
        action,
        path: path.to_owned(),
        source,
    };
    // Close-on-exec (std's default), so that no other spawn running now
    // can leak it; the child clears the flag for a script (see `ExecFd`).
    let mut file =
        File::open(path).map_err(|e| missing_is_exec_error(service, path, io_error("open", e)))?;
    let mut hasher = sha2::Sha256::new();
    let mut head = [0u8; 2];
    let mut head_len = 0;
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(io_error("hash", error)),
        };
        let chunk = &buffer[..n];
        for (slot, &byte) in head.iter_mut().skip(head_len).zip(chunk) {
            *slot = byte;
            head_len += 1;
        }
        hasher.update(chunk);
    }
    let actual = Sha256(hasher.finalize().into());
    if actual != expected {
        return Err(SpawnError::Checksum {
            service: service.to_owned(),
            path: path.to_owned(),
            expected,
            actual,
        });
    }
    Ok(ExecFd {
        // Never 0, 1 or 2 (a daemon started with one of them closed): the
        // child's dup3 of its stdio would replace it before the exec.
        fd: super::above_stdio(file.into()).map_err(|e| io_error("open", e))?,
        script: head_len == 2 && head == *b"#!",
    })
}

/// Names or numeric ids, looked up now (an account may be created after the
/// daemon started). A numeric id needs no entry in the databases, but a
/// user without one has no primary group: then `group` must be given.
fn resolve_user(service: &str, spec: &UserSpec) -> Result<Credentials, SpawnError> {
    let error = |detail: String| SpawnError::User {
        service: service.to_owned(),
        detail,
    };
    let numeric_uid = spec.user.parse::<libc::uid_t>().ok();
    let user = match numeric_uid {
        Some(uid) => User::from_uid(Uid::from_raw(uid)),
        None => User::from_name(&spec.user),
    }
    .map_err(|errno| {
        error(format!(
            "looking up user {:?} failed: {errno}; check the user database and \
             /etc/nsswitch.conf",
            spec.user
        ))
    })?;
    if user.is_none() && numeric_uid.is_none() {
        return Err(error(format!(
            "no such user {:?}: create it, or fix `user` of the service",
            spec.user
        )));
    }
    let gid = match &spec.group {
        Some(group) => match group.parse::<libc::gid_t>() {
            Ok(gid) => gid,
            Err(_) => Group::from_name(group)
                .map_err(|errno| {
                    error(format!(
                        "looking up group {group:?} failed: {errno}; check the group database \
                         and /etc/nsswitch.conf"
                    ))
                })?
                .ok_or_else(|| {
                    error(format!(
                        "no such group {group:?}: create it, or fix `group` of the service"
                    ))
                })?
                .gid
                .as_raw(),
        },
        None => match &user {
            Some(user) => user.gid.as_raw(),
            None => {
                return Err(error(format!(
                    "user {:?} has no entry in the user database, so no primary group: set \
                     `group` of the service, or create the user",
                    spec.user
                )));
            }
        },
    };
    let (uid, groups) = match (user, numeric_uid) {
        (Some(user), _) => {
            let name = CString::new(user.name.as_bytes())
                .map_err(|_| error(format!("user name {:?} holds a NUL byte", user.name)))?;
            let groups = getgrouplist(&name, Gid::from_raw(gid)).map_err(|errno| {
                error(format!(
                    "cannot list the supplementary groups of user {:?}: {errno}; check the \
                     group database",
                    user.name
                ))
            })?;
            (
                user.uid.as_raw(),
                groups.into_iter().map(Gid::as_raw).collect(),
            )
        }
        (None, Some(uid)) => (uid, vec![gid]),
        // Refused above.
        (None, None) => return Err(error(format!("no such user {:?}", spec.user))),
    };
    Ok(Credentials { uid, gid, groups })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup that cannot be made costs the service its containment and
    /// limits (said once), not its start; under require_limits it fails.
    #[test]
    fn a_cgroup_that_cannot_be_made_fails_the_start_only_under_require_limits() {
        use crate::cgroup::fake::FakeController;
        let controller = Arc::new(FakeController::new(Flavor::V1));
        controller.fail_create("svc");
        let spec = SpawnSpec {
            service: "svc".to_owned(),
            program: "/bin/true".into(),
            cwd: "/".into(),
            limits: crate::cgroup::Limits {
                pids: Some(5),
                ..Default::default()
            },
            ..SpawnSpec::default()
        };
        let lenient = UnixSpawner::new(controller.clone(), false);
        let prepared = prepare(&lenient, &spec, Cgroup::Own).expect("runs without its cgroup");
        assert!(prepared.cgroup.is_none());
        let unenforced = without_a_cgroup(
            &spec.limits,
            &crate::cgroup::CgroupError::Io {
                action: "create".to_owned(),
                path: "/x".into(),
                source: io::Error::from_raw_os_error(libc::EACCES),
            },
        );
        let limits: Vec<&str> = unenforced.iter().map(|u| u.limit).collect();
        assert_eq!(limits, ["containment", "pids_limit"]);
        let strict = UnixSpawner::new(controller, true);
        let error = prepare(&strict, &spec, Cgroup::Own)
            .map(|_| ())
            .unwrap_err();
        assert_eq!(error.stage(), "cgroup", "{error}");
    }

    /// A probe joins its service's cgroup: nothing is created, its binary
    /// is not held to the service's digest, and dropping the preparation
    /// leaves the service's cgroup in place.
    #[test]
    fn a_probe_joins_the_services_cgroup_and_makes_none() {
        use crate::cgroup::fake::FakeController;
        use crate::cgroup::{Limits, ResourceController};
        let controller = Arc::new(FakeController::new(Flavor::V1));
        let service_cgroup = controller
            .create("svc", &Limits::default())
            .unwrap()
            .cgroup
            .unwrap();
        let spawner = UnixSpawner::new(controller.clone(), true);
        let spec = SpawnSpec {
            service: "svc".to_owned(),
            program: "/bin/true".into(),
            cwd: "/".into(),
            limits: Limits {
                memory_mib: Some(64),
                ..Limits::default()
            },
            sha256: Some(Sha256([0; 32])),
            ..SpawnSpec::default()
        };
        let prepared = prepare(&spawner, &spec, Cgroup::Join(Some(&service_cgroup)))
            .expect("no digest check, no cgroup of its own");
        assert!(prepared.cgroup.is_none() && prepared.exec_fd.is_none());
        assert_eq!(prepared.memory_limit_mib, None);
        assert!(prepared.needs_clone(), "joining takes a step in the child");
        assert!(prepared.merge_output);
        drop(prepared);
        assert_eq!(controller.created().len(), 1, "only the service's own");
        assert!(!controller.cgroup("svc").unwrap().removed());
        let alone = prepare(&spawner, &spec, Cgroup::Join(None)).unwrap();
        assert!(alone.joined.is_none() && !alone.needs_clone());
        assert_eq!(controller.created().len(), 1);
    }

    fn spec(user: &str, group: Option<&str>) -> UserSpec {
        UserSpec {
            user: user.to_owned(),
            group: group.map(str::to_owned),
            owns_working_dir: false,
        }
    }

    #[test]
    fn users_and_groups_resolve_by_name_or_number() {
        let root = resolve_user("svc", &spec("root", None)).unwrap();
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(resolve_user("svc", &spec("0", None)).unwrap(), root);
        // A number needs no entry when the group is given.
        let unnamed = resolve_user("svc", &spec("4000123", Some("4000124"))).unwrap();
        assert_eq!(
            unnamed,
            Credentials {
                uid: 4_000_123,
                gid: 4_000_124,
                groups: vec![4_000_124]
            }
        );
    }

    #[test]
    fn unknown_users_and_groups_are_explained() {
        let text = |user: &str, group: Option<&str>| {
            resolve_user("svc", &spec(user, group))
                .unwrap_err()
                .to_string()
        };
        let unknown = text("no-such-user-here", None);
        assert!(unknown.contains("service svc"), "{unknown}");
        assert!(unknown.contains("stage \"user\""), "{unknown}");
        assert!(
            unknown.contains("no such user \"no-such-user-here\""),
            "{unknown}"
        );
        let group = text("root", Some("no-such-group-here"));
        assert!(
            group.contains("no such group \"no-such-group-here\""),
            "{group}"
        );
        let numeric = text("4000123", None);
        assert!(numeric.contains("set `group`"), "{numeric}");
    }

    #[test]
    fn strict_walks_up_to_services_dir_only() {
        let root = tempfile::tempdir().unwrap();
        let services = root.path().join("services");
        let binary = services.join("api/api");
        std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
        std::fs::write(&binary, "").unwrap();
        let chmod = |path: &Path, mode| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        for path in [&services, &binary.parent().unwrap().to_owned(), &binary] {
            chmod(path, 0o755);
        }
        // Above services_dir is not looked at.
        chmod(root.path(), 0o777);
        strict_check("api", &binary, &services).unwrap();
        chmod(&services, 0o775);
        let error = strict_check("api", &binary, &services).unwrap_err();
        assert!(
            matches!(&error, SpawnError::Strict { path, mode: 0o775, .. } if *path == services)
        );
        chmod(&services, 0o755);
        chmod(&binary, 0o757);
        let text = strict_check("api", &binary, &services)
            .unwrap_err()
            .to_string();
        assert!(text.contains("mode 0757"), "{text}");
        assert!(
            text.contains(&format!("chmod go-w {}", binary.display())),
            "{text}"
        );
        assert!(text.contains("strict = false"), "{text}");
        // Outside services_dir: the binary's own directory, nothing above.
        chmod(&binary, 0o755);
        let elsewhere = root.path().join("elsewhere");
        strict_check("api", &binary, &elsewhere).unwrap();
        chmod(&root.path().join("services/api"), 0o770);
        assert!(strict_check("api", &binary, &elsewhere).is_err());
        chmod(root.path(), 0o700);
        // A missing binary is an exec failure, with its advice, not a
        // strict one (nor a checksum one).
        let missing = services.join("api/missing");
        let error = strict_check("api", &missing, &services).unwrap_err();
        assert_eq!(error.stage(), "exec");
        assert!(error.to_string().contains("no such file"), "{error}");
        let digest = Sha256([0; 32]);
        assert_eq!(
            open_verified("api", &missing, digest).unwrap_err().stage(),
            "exec"
        );
    }

    #[test]
    fn a_script_is_told_apart_and_a_mismatch_names_both_digests() {
        let dir = tempfile::tempdir().unwrap();
        let script = dir.path().join("script");
        std::fs::write(&script, "#!/bin/sh\n").unwrap();
        // sha256 of "#!/bin/sh\n".
        let digest =
            Sha256::from_hex("b2d9fd43bf6af8b01e24c5bc9d2b4c9b75a1c0edd0e2f2e3ed6e1c1a3e4b4b8d")
                .unwrap();
        let error = open_verified("svc", &script, digest).unwrap_err();
        let SpawnError::Checksum { actual, .. } = &error else {
            panic!("{error}");
        };
        let text = error.to_string();
        assert!(
            text.starts_with(&format!(
                "checksum mismatch: expected {digest} got {actual}"
            )),
            "{text}"
        );
        let opened = open_verified("svc", &script, *actual).unwrap();
        assert!(opened.script);
        let binary = dir.path().join("binary");
        std::fs::write(&binary, "\x7fELF").unwrap();
        let actual = match open_verified("svc", &binary, digest) {
            Err(SpawnError::Checksum { actual, .. }) => actual,
            other => panic!("{other:?}"),
        };
        assert!(!open_verified("svc", &binary, actual).unwrap().script);
    }
}
