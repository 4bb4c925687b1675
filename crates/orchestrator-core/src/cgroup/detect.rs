//! Which cgroup hierarchy to use, found once at start from
//! /proc/self/mountinfo (what is mounted where) and /proc/self/cgroup (where
//! the daemon itself sits in each hierarchy).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::{NoCgroups, ResourceController, v1, v2};

/// What detection needs from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// `[orchestrator] cgroup_parent`: relative to the daemon's own cgroup.
    pub cgroup_parent: &'a Path,
    /// The daemon's data_dir: names the fallback parent when the configured
    /// one is held by another daemon.
    pub data_dir: &'a Path,
    /// `cgroup_parent` is already locked for this process: a guardian holds
    /// its daemon's lock by an inherited descriptor, so the parent it
    /// sweeps cannot be claimed by another daemon in the meantime.
    pub parent_lock_inherited: bool,
}

/// Where detection looks; the real /proc and /sys unless a test lays out
/// its own.
#[derive(Debug, Clone)]
pub struct Host {
    /// /proc/self/mountinfo.
    pub mountinfo: PathBuf,
    /// /proc/self/cgroup.
    pub self_cgroup: PathBuf,
    /// Prepended to every mount point ("/" on a real host; a temp dir laid
    /// out like /sys/fs/cgroup in tests).
    pub root: PathBuf,
    /// The daemon's pid: on v2 it may have to move into a leaf cgroup of
    /// its own (see `v2::move_into_leaf`).
    pub pid: u32,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            self_cgroup: PathBuf::from("/proc/self/cgroup"),
            root: PathBuf::from("/"),
            pid: std::process::id(),
        }
    }
}

/// Find the hierarchy, claim a parent in it and prepare it; or, where
/// cgroups cannot be used, a [`NoCgroups`] saying why. Logs the outcome
/// once.
pub fn detect(settings: &Settings<'_>) -> Arc<dyn ResourceController> {
    detect_with(settings, &Host::default())
}

/// [`detect`] on the given `/proc` files and mount root.
pub fn detect_with(settings: &Settings<'_>, host: &Host) -> Arc<dyn ResourceController> {
    match try_detect(settings, host) {
        Ok(controller) => controller,
        Err(reason) => {
            warn!(
                "cgroups are not used, so services are not confined to a cgroup and their memory_limit, cpu_limit and pids_limit are not enforced: {reason}"
            );
            Arc::new(NoCgroups { reason })
        }
    }
}

/// Why a hierarchy could not be set up.
#[derive(Debug)]
pub(super) enum Failure {
    /// This hierarchy is not usable; another may be.
    Unusable(String),
    /// Our parent is held by other daemons: no other hierarchy is tried,
    /// as the same daemons would be there.
    Locked(String),
}

fn try_detect(settings: &Settings<'_>, host: &Host) -> Result<Arc<dyn ResourceController>, String> {
    check_parent(settings.cgroup_parent)?;
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|error| {
            format!(
                "cannot read {}: {error} (is /proc mounted?)",
                path.display()
            )
        })
    };
    let mountinfo = read(&host.mountinfo)?;
    let self_cgroup = read(&host.self_cgroup)?;
    let (candidates, mut reasons) = candidates(&mountinfo, &self_cgroup, &host.root);
    for candidate in candidates {
        let outcome = match candidate {
            Candidate::V2 { base } => v2::setup(&base, settings, host.pid)
                .map(|controller| Arc::new(controller) as Arc<dyn ResourceController>),
            Candidate::V1 { pids, memory, cpu } => v1::setup(pids, memory, cpu, settings)
                .map(|controller| Arc::new(controller) as Arc<dyn ResourceController>),
        };
        match outcome {
            Ok(controller) => return Ok(controller),
            Err(Failure::Locked(reason)) => return Err(reason),
            Err(Failure::Unusable(reason)) => reasons.push(reason),
        }
    }
    if reasons.is_empty() {
        reasons.push(
            "cgroups are not mounted (no cgroup2 filesystem, nor a cgroup v1 pids hierarchy, in /proc/self/mountinfo): mount cgroup2 at /sys/fs/cgroup".to_owned(),
        );
    }
    Err(reasons.join("; "))
}

/// The config loader checks this too; a bad parent here would write
/// outside our cgroup.
fn check_parent(parent: &Path) -> Result<(), String> {
    let normal = parent
        .components()
        .all(|part| matches!(part, Component::Normal(_)));
    if parent.as_os_str().is_empty() || !normal {
        return Err(format!(
            "cgroup_parent {:?} must be a relative path without `..`: fix [orchestrator] cgroup_parent",
            parent.display()
        ));
    }
    Ok(())
}

/// A cgroup filesystem mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// The cgroup shown at the mount point (not "/" inside some containers).
    pub root: String,
    pub point: PathBuf,
    pub v2: bool,
    /// v1: the controllers of the hierarchy (from the super options, which
    /// also hold "rw" and the like; no controller has those names).
    pub options: Vec<String>,
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts of mountinfo that are still visible: a mount is
/// hidden by a later one on its mount point or on a directory above it (a
/// tmpfs over /sys/fs/cgroup in a container, say), and a directory made
/// there would be a plain one, not a cgroup.
pub(super) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    // (mount point, the cgroup mount when it is one), in mount order.
    let all: Vec<(PathBuf, Option<Mount>)> = text
        .lines()
        .filter_map(|line| {
            // The optional fields end at a lone "-".
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let point = PathBuf::from(unescape(left.get(4)?));
            let mut right = right.split(' ');
            let fstype = right.next()?;
            let _source = right.next()?;
            let options = right.next().unwrap_or_default();
            let v2 = match fstype {
                "cgroup2" => true,
                "cgroup" => false,
                _ => return Some((point, None)),
            };
            let mount = Mount {
                root: unescape(left.get(3)?),
                point: point.clone(),
                v2,
                options: options.split(',').map(str::to_owned).collect(),
            };
            Some((point, Some(mount)))
        })
        .collect();
    all.iter()
        .enumerate()
        .filter_map(|(i, (point, mount))| {
            let hidden = all[i + 1..]
                .iter()
                .any(|(later, _)| point.starts_with(later));
            mount.clone().filter(|_| !hidden)
        })
        .collect()
}

/// /proc/self/cgroup: `(controllers, path)` for each hierarchy; v2's line
/// is `0::/path`, with no controllers.
pub(super) fn parse_self_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = if controllers.is_empty() {
                Vec::new()
            } else {
                controllers.split(',').map(str::to_owned).collect()
            };
            Some((controllers, path.to_owned()))
        })
        .collect()
}

/// A hierarchy's directory for the daemon's own cgroup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Hierarchy {
    /// Its mount point (under the host root): tells co-mounted controllers
    /// (cpu,cpuacct) apart from separate ones.
    pub mount: PathBuf,
    /// The daemon's own cgroup in it; our parent goes below.
    pub base: PathBuf,
    /// Its controllers (v1).
    pub controllers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Candidate {
    V2 {
        base: PathBuf,
    },
    V1 {
        pids: Hierarchy,
        memory: Result<Hierarchy, String>,
        cpu: Result<Hierarchy, String>,
    },
}

/// The directory of our cgroup `own` in `mount`, under `root`.
fn own_dir(mount: &Mount, own: &str, root: &Path) -> Result<PathBuf, String> {
    let own = own.trim_end_matches(" (deleted)");
    let relative = if mount.root == "/" {
        Some(own)
    } else {
        own.strip_prefix(mount.root.as_str())
            .filter(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    let Some(relative) = relative else {
        return Err(format!(
            "this daemon's cgroup {own} is outside the part of its hierarchy mounted at {} ({}): mount the hierarchy's root",
            mount.point.display(),
            mount.root
        ));
    };
    let point = mount.point.strip_prefix("/").unwrap_or(&mount.point);
    let relative = relative.trim_start_matches('/');
    let dir = root.join(point);
    // join("") would add a trailing slash to every path in messages.
    Ok(if relative.is_empty() {
        dir
    } else {
        dir.join(relative)
    })
}

/// The hierarchies to try, best first, and why others were left out.
/// A v1 pids hierarchy comes first: where it is mounted (v1 or hybrid
/// mode), the limits' controllers are v1 too and any cgroup2 mount is the
/// empty "unified" one; cgroup2 is the fallback there, and the choice on a
/// pure v2 host.
pub(super) fn candidates(
    mountinfo: &str,
    self_cgroup: &str,
    root: &Path,
) -> (Vec<Candidate>, Vec<String>) {
    let mounts = parse_mountinfo(mountinfo);
    let own = parse_self_cgroup(self_cgroup);
    let mut candidates = Vec::new();
    let mut reasons = Vec::new();

    let v1 = |controller: &str| -> Result<Hierarchy, String> {
        let mount = mounts
            .iter()
            .find(|mount| !mount.v2 && mount.options.iter().any(|o| o == controller))
            .ok_or_else(|| format!("the cgroup v1 {controller} controller is not mounted"))?;
        let (_, path) = own
            .iter()
            .find(|(controllers, _)| controllers.iter().any(|c| c == controller))
            .ok_or_else(|| {
                format!("/proc/self/cgroup has no line for the {controller} controller")
            })?;
        let point = mount.point.strip_prefix("/").unwrap_or(&mount.point);
        Ok(Hierarchy {
            mount: root.join(point),
            base: own_dir(mount, path, root)?,
            controllers: mount
                .options
                .iter()
                .filter(|o| ["cpu", "cpuacct", "memory", "pids"].contains(&o.as_str()))
                .cloned()
                .collect(),
        })
    };
    let has_v1_pids = mounts
        .iter()
        .any(|mount| !mount.v2 && mount.options.iter().any(|o| o == "pids"));
    if has_v1_pids {
        match v1("pids") {
            Ok(pids) => candidates.push(Candidate::V1 {
                pids,
                memory: v1("memory"),
                cpu: v1("cpu"),
            }),
            Err(reason) => reasons.push(reason),
        }
    }
    if let Some(mount) = mounts.iter().find(|mount| mount.v2) {
        match own.iter().find(|(controllers, _)| controllers.is_empty()) {
            Some((_, path)) => match own_dir(mount, path, root) {
                Ok(base) => candidates.push(Candidate::V2 { base }),
                Err(reason) => reasons.push(reason),
            },
            None => reasons.push(format!(
                "cgroup2 is mounted at {} but /proc/self/cgroup has no `0::` line for it",
                mount.point.display()
            )),
        }
    }
    (candidates, reasons)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PURE_V2: &str = "\
22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/
4:memory:/process_api/f9cf
2:cpuacct:/
1:cpu:/
0::/
";

    const V1_COMOUNTED: &str = "\
25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid master:9 - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/memory rw,nosuid master:10 - cgroup cgroup rw,memory
29 25 0:26 /docker/abc /sys/fs/cgroup/pids rw,nosuid master:11 - cgroup cgroup rw,pids
";

    /// A tmpfs mounted over /sys/fs/cgroup after the cgroup mounts (a
    /// container hiding them) leaves nothing to use: directories made there
    /// would be plain ones.
    #[test]
    fn mounts_hidden_by_a_later_mount_are_not_used() {
        let hidden = format!(
            "{V1_COMOUNTED}90 24 0:99 / /sys/fs/cgroup rw - tmpfs none rw\n\
             91 24 0:98 / /sys/fs/cgroup/pidsx rw - cgroup cgroup rw,pids\n"
        );
        let mounts = parse_mountinfo(&hidden);
        assert_eq!(
            mounts.iter().map(|m| m.point.clone()).collect::<Vec<_>>(),
            [PathBuf::from("/sys/fs/cgroup/pidsx")],
            "only the one mounted after the tmpfs is visible"
        );
        assert_eq!(parse_mountinfo(V1_COMOUNTED).len(), 3);
    }

    #[test]
    fn pure_v2_uses_our_own_cgroup_in_the_unified_hierarchy() {
        let (found, reasons) = candidates(
            PURE_V2,
            "0::/system.slice/orchestrator.service\n",
            Path::new("/"),
        );
        assert_eq!(
            found,
            vec![Candidate::V2 {
                base: PathBuf::from("/sys/fs/cgroup/system.slice/orchestrator.service")
            }]
        );
        assert!(reasons.is_empty(), "{reasons:?}");
    }

    #[test]
    fn hybrid_prefers_the_v1_controllers_then_falls_back_to_unified() {
        let (found, reasons) = candidates(HYBRID, HYBRID_CGROUP, Path::new("/tmp/root"));
        assert!(reasons.is_empty(), "{reasons:?}");
        let hierarchy = |mount: &str, base: &str, controller: &str| Hierarchy {
            mount: PathBuf::from(mount),
            base: PathBuf::from(base),
            controllers: vec![controller.to_owned()],
        };
        assert_eq!(
            found,
            vec![
                Candidate::V1 {
                    pids: hierarchy(
                        "/tmp/root/sys/fs/cgroup/pids",
                        "/tmp/root/sys/fs/cgroup/pids",
                        "pids"
                    ),
                    memory: Ok(hierarchy(
                        "/tmp/root/sys/fs/cgroup/memory",
                        "/tmp/root/sys/fs/cgroup/memory/process_api/f9cf",
                        "memory"
                    )),
                    cpu: Ok(hierarchy(
                        "/tmp/root/sys/fs/cgroup/cpu",
                        "/tmp/root/sys/fs/cgroup/cpu",
                        "cpu"
                    )),
                },
                Candidate::V2 {
                    base: PathBuf::from("/tmp/root/sys/fs/cgroup/unified")
                },
            ]
        );
    }

    #[test]
    fn v1_with_comounted_cpu_and_a_container_root() {
        let cgroup = "\
5:pids:/docker/abc
4:memory:/docker/abc
3:cpu,cpuacct:/docker/abc
";
        let (found, reasons) = candidates(V1_COMOUNTED, cgroup, Path::new("/"));
        assert!(reasons.is_empty(), "{reasons:?}");
        let [Candidate::V1 { pids, memory, cpu }] = found.as_slice() else {
            panic!("{found:?}");
        };
        // The pids mount shows /docker/abc at its mount point.
        assert_eq!(pids.base, Path::new("/sys/fs/cgroup/pids"));
        assert_eq!(
            memory.as_ref().unwrap().base,
            Path::new("/sys/fs/cgroup/memory/docker/abc")
        );
        let cpu = cpu.as_ref().unwrap();
        assert_eq!(cpu.mount, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(cpu.controllers, ["cpu", "cpuacct"]);
    }

    #[test]
    fn a_cgroup_outside_the_mounted_part_is_explained() {
        let (found, reasons) = candidates(V1_COMOUNTED, "5:pids:/other\n", Path::new("/"));
        assert!(found.is_empty(), "{found:?}");
        assert!(reasons[0].contains("outside"), "{reasons:?}");
    }

    #[test]
    fn nothing_mounted_gives_no_candidate() {
        let (found, reasons) = candidates(
            "22 1 0:21 / /sys rw,nosuid - sysfs sysfs rw\n",
            "0::/\n",
            Path::new("/"),
        );
        assert!(found.is_empty());
        assert!(reasons.is_empty());
    }

    #[test]
    fn escaped_mount_points_are_decoded() {
        let mounts =
            parse_mountinfo("41 31 0:38 / /mnt/my\\040cgroups rw,relatime - cgroup2 cgroup2 rw\n");
        assert_eq!(mounts[0].point, Path::new("/mnt/my cgroups"));
    }

    #[test]
    fn detection_without_any_mount_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let mountinfo = dir.path().join("mountinfo");
        let cgroup = dir.path().join("cgroup");
        std::fs::write(&mountinfo, "22 1 0:21 / /sys rw - sysfs sysfs rw\n").unwrap();
        std::fs::write(&cgroup, "0::/\n").unwrap();
        let host = Host {
            mountinfo,
            self_cgroup: cgroup,
            root: dir.path().to_owned(),
            pid: std::process::id(),
        };
        let settings = Settings {
            cgroup_parent: Path::new("orchestrator"),
            data_dir: dir.path(),
            parent_lock_inherited: false,
        };
        let controller = detect_with(&settings, &host);
        assert_eq!(controller.flavor(), super::super::Flavor::None);
        let placement = controller
            .create(
                "api",
                &super::super::Limits {
                    memory_mib: Some(64),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(placement.unenforced.len(), 1);
        assert!(
            placement.unenforced[0].reason.contains("not mounted"),
            "{:?}",
            placement.unenforced
        );
    }

    #[test]
    fn a_bad_parent_is_refused() {
        assert!(check_parent(Path::new("../x")).is_err());
        assert!(check_parent(Path::new("/abs")).is_err());
        assert!(check_parent(Path::new("")).is_err());
        assert!(check_parent(Path::new("a/b")).is_ok());
    }
}
