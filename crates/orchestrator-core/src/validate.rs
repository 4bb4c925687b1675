//! What `check` and `run` both ask of a loaded configuration beyond its
//! schema: can every service actually be started? Each finding is located
//! at the key that caused it, like the schema's own problems, and all of
//! them are reported in one pass.
//!
//! Done with blocking file I/O, so only at start-up (before the runtime
//! serves) or from `check`.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit};
use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{
    Condition, Config, ConfigProblem, Loaded, Locations, RestartPolicy, Rlimit, RlimitValue,
    ServiceConfig, depends_on_key, service_key,
};
use crate::deps::{Dependency, Graph, find_cycles};
use crate::discovery::{Scan, scan_explaining};
use crate::name::ServiceName;
use crate::plan::{HostEnv, plan};
use crate::service::ServiceDefinition;

/// Where a program without a slash is found: `(program, env, cwd)` as the
/// spawner resolves it (the service's own PATH, not the daemon's).
pub type Lookup = fn(&Path, &[crate::process::EnvVar], &Path) -> io::Result<PathBuf>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// `check` fails (exit 2).
    Error,
    /// Said, but nothing fails because of it.
    Warning,
}

/// Who a finding stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The daemon as a whole cannot run (a schema error, a data_dir that
    /// is a file): `run` refuses to start.
    Daemon,
    /// Only this service cannot start; `run` starts the others.
    Service(ServiceName),
    /// Discovery in services_dir: configured services still run.
    ServicesDir,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    pub scope: Scope,
    pub problem: ConfigProblem,
}

/// Every finding about a configuration, and what was made on the way: the
/// services_dir scan (for `check` to count what was discovered) and the
/// plan (for a reload or an export not to make it again).
#[derive(Debug, Clone, Default)]
pub struct Validation {
    pub findings: Vec<Finding>,
    pub scan: Scan,
    /// `plan()` of the configuration with the host environment validation
    /// was given, services with problems included.
    pub definitions: Vec<ServiceDefinition>,
}

impl Validation {
    pub fn errors(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|finding| finding.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Finding> {
        self.findings
            .iter()
            .filter(|finding| finding.severity == Severity::Warning)
    }

    /// Whether `run` must refuse to start at all.
    pub fn stops_the_daemon(&self) -> bool {
        self.errors().any(|finding| finding.scope == Scope::Daemon)
    }
}

/// Who the daemon is, for what only root may grant a service: another user
/// or group, a limit above the daemon's own hard limit. A value rather than
/// a question asked of the process, so that tests (which run as root, here
/// and in CI) can play an unprivileged daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Privileges {
    /// Effective uid; 0 may do all of the above.
    pub uid: u32,
    /// Effective gid.
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
    /// The daemon's hard limit for each resource `rlimits` can set; a
    /// resource missing here (getrlimit failed) is not checked.
    pub hard_limits: BTreeMap<Rlimit, RlimitValue>,
}

impl Privileges {
    /// This process's.
    pub fn of_process() -> Self {
        let hard_limits = Rlimit::ALL
            .into_iter()
            .filter_map(|rlimit| {
                let (_, hard) = getrlimit(resource(rlimit)).ok()?;
                let hard = match hard {
                    RLIM_INFINITY => RlimitValue::Unlimited,
                    hard => RlimitValue::Limited(hard),
                };
                Some((rlimit, hard))
            })
            .collect();
        Privileges {
            uid: crate::state::our_uid(),
            gid: nix::unistd::getegid().as_raw(),
            // Not knowing our groups only makes the group check stricter.
            groups: nix::unistd::getgroups()
                .map(|groups| groups.into_iter().map(Gid::as_raw).collect())
                .unwrap_or_default(),
            hard_limits,
        }
    }

    fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether a service may run as `uid`: root may switch to anyone,
    /// anyone else only "switch" to itself.
    pub fn may_run_as(&self, uid: u32) -> bool {
        self.is_root() || uid == self.uid
    }

    /// Whether a service may run with group `gid`: root may switch to any;
    /// anyone else only keep its own (an unprivileged setresgid cannot take
    /// a supplementary group, and setgroups needs CAP_SETGID).
    pub fn may_use_group(&self, gid: u32) -> bool {
        self.is_root() || gid == self.gid
    }

    /// The hard limit `limit` would raise, if only root could set it:
    /// anyone may lower a hard limit, only root may raise one.
    pub fn hard_limit_below(&self, rlimit: Rlimit, limit: RlimitValue) -> Option<RlimitValue> {
        if self.is_root() {
            return None;
        }
        let hard = *self.hard_limits.get(&rlimit)?;
        let above = match (limit, hard) {
            (_, RlimitValue::Unlimited) => false,
            (RlimitValue::Unlimited, RlimitValue::Limited(_)) => true,
            (RlimitValue::Limited(limit), RlimitValue::Limited(hard)) => limit > hard,
        };
        above.then_some(hard)
    }
}

/// The resource setrlimit(2) knows `rlimit` as.
fn resource(rlimit: Rlimit) -> Resource {
    match rlimit {
        Rlimit::Nofile => Resource::RLIMIT_NOFILE,
        Rlimit::Nproc => Resource::RLIMIT_NPROC,
        Rlimit::Core => Resource::RLIMIT_CORE,
        Rlimit::Memlock => Resource::RLIMIT_MEMLOCK,
        Rlimit::Stack => Resource::RLIMIT_STACK,
        Rlimit::As => Resource::RLIMIT_AS,
        Rlimit::Cpu => Resource::RLIMIT_CPU,
        Rlimit::Fsize => Resource::RLIMIT_FSIZE,
    }
}

/// Validate `loaded`: its schema problems, then every service's program
/// (a binary or `command`), what it asks that only root may grant, what
/// its depends_on asks of the other services (configured or discovered),
/// the services directory and the daemon's own paths. `lookup` resolves a
/// `command` without a slash; `None` leaves such programs to the spawn. A
/// service whose keys already have schema problems is not checked further:
/// its values are defaults, not what the file meant.
pub fn validate(loaded: &Loaded, host: &HostEnv, lookup: Option<Lookup>) -> Validation {
    validate_as(loaded, host, lookup, &Privileges::of_process())
}

/// `validate` for a daemon with `privileges`.
pub fn validate_as(
    loaded: &Loaded,
    host: &HostEnv,
    lookup: Option<Lookup>,
    privileges: &Privileges,
) -> Validation {
    let config = &loaded.config;
    let at = &loaded.locations;
    let mut findings: Vec<Finding> = loaded
        .problems
        .iter()
        .map(|problem| Finding {
            severity: Severity::Error,
            scope: Scope::Daemon,
            problem: problem.clone(),
        })
        .collect();
    let has_problem = |key: &str| {
        loaded.problems.iter().any(|problem| {
            problem.key == key
                || problem
                    .key
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.starts_with('.'))
        })
    };
    let orchestrator = &config.orchestrator;

    let dir = &orchestrator.services_dir;
    let dir_key = "orchestrator.services_dir";
    let configured_bases = config.section_names();
    let scanned = if has_problem(dir_key) {
        Scan::default()
    } else {
        // A configured service's NAME/ is not looked into: the plan takes
        // its binary from the section (checked below as its program), and
        // a NAME/ without one is its data_dir's home, not a mistake.
        match scan_explaining(dir, &|name| configured_bases.contains(name), true) {
            Ok(scanned) => scanned,
            Err(error) => {
                let source = std::error::Error::source(&error)
                    .and_then(|source| source.downcast_ref::<io::Error>());
                let message = match source.and_then(io::Error::raw_os_error) {
                    Some(libc::ENOTDIR) => format!(
                        "services_dir {} is a file, not a directory; point \
                         orchestrator.services_dir at the directory holding NAME/NAME",
                        dir.display()
                    ),
                    Some(libc::ELOOP) => format!(
                        "services_dir {} is a loop of symbolic links; fix the links or point \
                         orchestrator.services_dir at a real directory",
                        dir.display()
                    ),
                    _ => error.to_string(),
                };
                findings.push(Finding {
                    severity: Severity::Error,
                    scope: Scope::ServicesDir,
                    problem: at.problem(dir_key, &[dir_key], message),
                });
                Scan::default()
            }
        }
    };
    if !scanned.exists && !has_problem(dir_key) && findings_about(&findings, dir_key) == 0 {
        // Set by hand, a missing directory is a mistake; by default, it
        // only means nothing is discovered.
        let (severity, advice) = match at.get(dir_key) {
            Some(_) => (
                Severity::Error,
                "create it or fix orchestrator.services_dir",
            ),
            None => (
                Severity::Warning,
                "nothing is discovered; create it or set orchestrator.services_dir",
            ),
        };
        findings.push(Finding {
            severity,
            scope: Scope::ServicesDir,
            problem: at.problem(
                dir_key,
                &[dir_key],
                format!("services_dir {} does not exist; {advice}", dir.display()),
            ),
        });
    }

    if !has_problem("orchestrator.data_dir") {
        let data_dir = &orchestrator.data_dir;
        if let Ok(meta) = fs::metadata(data_dir)
            && !meta.is_dir()
        {
            findings.push(Finding {
                severity: Severity::Error,
                scope: Scope::Daemon,
                problem: at.problem(
                    "orchestrator.data_dir",
                    &["orchestrator.data_dir"],
                    format!(
                        "data_dir {} is not a directory; remove that file or point \
                         orchestrator.data_dir elsewhere",
                        data_dir.display()
                    ),
                ),
            });
        }
    }
    let mut checked: HashMap<PathBuf, Result<(), String>> = HashMap::new();
    let definitions = plan(config, &scanned.found, host);
    for definition in &definitions {
        let name = &definition.name;
        let section = service_key(name);
        // An instance's problems are its section's.
        if has_problem(&service_key(name.base())) {
            continue;
        }
        let service = config.services.get(name);
        let command = service.is_some_and(|service| service.command.is_some());
        let spawn = &definition.spawn;
        let program_key = if command {
            format!("{section}.command")
        } else if service.is_some_and(|service| service.binary_path.is_some()) {
            format!("{section}.binary_path")
        } else {
            section.clone()
        };
        let shown = if command {
            format!("command program {:?}", spawn.program.display().to_string())
        } else {
            format!("binary {}", spawn.program.display())
        };
        let found = if spawn.program.as_os_str().as_encoded_bytes().contains(&b'/') {
            Some(spawn.cwd.join(&spawn.program))
        } else {
            match lookup.map(|lookup| lookup(&spawn.program, &spawn.env, &spawn.cwd)) {
                Some(Ok(path)) => Some(path),
                Some(Err(error)) => {
                    let path = crate::process::env_value(&spawn.env, "PATH").unwrap_or("");
                    let what = match error.raw_os_error() {
                        Some(libc::EACCES) => "is found in the service's PATH but not executable",
                        _ => "is not found in the service's PATH",
                    };
                    let message = format!(
                        "{shown} {what} ({path}); install it, give its absolute path, or set \
                         PATH in [{section}] environment"
                    );
                    findings.push(service_finding(
                        definition.enabled,
                        name,
                        at,
                        &program_key,
                        message,
                    ));
                    None
                }
                None => None,
            }
        };
        let Some(found) = found else { continue };
        // Instances (and fleets) share a binary: looked at once.
        let verdict = checked
            .entry(found.clone())
            .or_insert_with(|| runnable(&found, &spawn.cwd));
        if let Err(why) = verdict.clone() {
            let shown = if found == spawn.program {
                shown
            } else {
                format!("{shown} (at {})", found.display())
            };
            let advice = if command {
                "fix command[0]".to_owned()
            } else if program_key.ends_with("binary_path") {
                "fix binary_path".to_owned()
            } else if definition.configured {
                let base = name.base();
                format!("set binary_path or install it at services_dir/{base}/{base}")
            } else {
                format!("fix or remove {}", found.display())
            };
            let message = format!("service {name}: {shown} {why}; {advice}");
            let key = if definition.configured {
                program_key
            } else {
                dir_key.to_owned()
            };
            findings.push(service_finding(definition.enabled, name, at, &key, message));
        }
    }

    findings.extend(dependency_findings(config, &definitions, at, &has_problem));

    for (name, service) in &config.services {
        let section = service_key(name);
        if has_problem(&service_key(name.base())) {
            continue;
        }
        for (key, message) in privilege_problems(service, privileges) {
            let key = format!("{section}.{key}");
            findings.push(service_finding(service.enabled, name, at, &key, message));
        }
    }

    // The scan passed configured services' entries over, and a discovered
    // one is found, not skipped: what is left is not a service.
    for skipped in &scanned.skipped {
        findings.push(Finding {
            severity: Severity::Warning,
            scope: Scope::ServicesDir,
            problem: at.problem(
                dir_key,
                &[dir_key],
                format!("skipped {}: {}", skipped.path.display(), skipped.reason),
            ),
        });
    }

    // By line, then those without one; errors before warnings on a line.
    findings.sort_by_key(|finding| {
        let problem = &finding.problem;
        (
            problem.line.is_none(),
            problem.line,
            problem.column,
            finding.severity,
        )
    });
    Validation {
        findings,
        scan: scanned,
        definitions,
    }
}

/// What the services' depends_on ask that cannot be: a service that is
/// neither configured nor discovered, a service depending on itself, a
/// cycle (one finding each, at its least service), and a condition the
/// dependency can never meet. Each is the dependent's; a disabled service
/// may still be a dependency (it is started for its dependents).
fn dependency_findings(
    config: &Config,
    definitions: &[ServiceDefinition],
    at: &Locations,
    has_problem: &dyn Fn(&str) -> bool,
) -> Vec<Finding> {
    let by_name: BTreeMap<&ServiceName, &ServiceDefinition> = definitions
        .iter()
        .map(|definition| (&definition.name, definition))
        .collect();
    let mut findings = Vec::new();
    let mut graph = Graph::new();
    for definition in definitions {
        let name = &definition.name;
        // With schema problems, its depends_on is what could be read, not
        // what the file meant.
        if has_problem(&service_key(name.base())) {
            continue;
        }
        let mut edges = Vec::new();
        for (index, dependency) in definition.depends_on.iter().enumerate() {
            let target = &dependency.name;
            let problem = if target == name {
                Some(format!(
                    "service {name} depends on itself; remove {name} from its depends_on"
                ))
            } else if let Some(&needed) = by_name.get(target) {
                edges.push(target.clone());
                // Its values are defaults where the file was wrong: its
                // own problems say what to fix first.
                if has_problem(&service_key(target.base())) {
                    None
                } else {
                    condition_problem(config, name, dependency, needed)
                }
            } else {
                Some(unknown_dependency(config, name, target, &by_name))
            };
            if let Some(message) = problem {
                let key = depends_on_key(at, name, index, target);
                findings.push(service_finding(definition.enabled, name, at, &key, message));
            }
        }
        graph.insert(name.clone(), edges);
    }
    for cycle in find_cycles(&graph) {
        let first = &cycle[0];
        let next = &cycle[1 % cycle.len()];
        let index = by_name[first]
            .depends_on
            .iter()
            .position(|dependency| &dependency.name == next)
            .unwrap_or_default();
        let shown: Vec<&str> = cycle
            .iter()
            .chain([first])
            .map(ServiceName::as_str)
            .collect();
        let message = format!(
            "depends_on forms a cycle: {}; none of them can start before the others: remove \
             one of these dependencies",
            shown.join(" -> ")
        );
        // Started for its dependents, a disabled service in the cycle is
        // as stuck as an enabled one.
        let enabled = cycle.iter().any(|member| by_name[member].enabled);
        let key = depends_on_key(at, first, index, next);
        findings.push(service_finding(enabled, first, at, &key, message));
    }
    findings
}

/// Why `needed` can never meet the condition `name` puts on it, if so.
fn condition_problem(
    config: &Config,
    name: &ServiceName,
    dependency: &Dependency,
    needed: &ServiceDefinition,
) -> Option<String> {
    let target = &dependency.name;
    // An instance's settings are its section's.
    let section = target.base();
    match dependency.condition {
        Condition::Started => None,
        Condition::Healthy if needed.health.is_none() && !needed.notify => Some(format!(
            "service {name} waits for {target} to be healthy, but {target} has neither a \
             health check nor notify = true, so it never is; add [services.{section}.health] \
             or notify = true to {section}, or wait for \"started\" instead"
        )),
        Condition::Healthy => None,
        Condition::Completed if needed.policy.restart == RestartPolicy::Always => {
            let explicit = config
                .services
                .get(target)
                .is_some_and(|service| service.restart.is_some());
            let why = if explicit {
                "restart = \"always\""
            } else {
                "restart is \"always\" by orchestrator.auto_restart = true"
            };
            Some(format!(
                "service {name} waits for {target} to complete, but {target} is restarted \
                 whenever it exits ({why}), so it never stays completed; set restart = \
                 \"never\" or \"on-failure\" in [services.{target}]"
            ))
        }
        Condition::Completed => None,
    }
}

/// `name` depends on `target`, which no section and no binary defines.
fn unknown_dependency(
    config: &Config,
    name: &ServiceName,
    target: &ServiceName,
    known: &BTreeMap<&ServiceName, &ServiceDefinition>,
) -> String {
    let binary = config
        .orchestrator
        .services_dir
        .join(target.as_str())
        .join(target.as_str());
    let mut message = format!(
        "service {name} depends on {target}, which is neither configured ([services.{target}]) \
         nor found in services_dir ({}); add that service or fix the name",
        binary.display()
    );
    // Two edits away, and not merely because both names are short.
    let close = known
        .keys()
        .map(|known| (strsim::levenshtein(target, known), known))
        .filter(|&(distance, known)| distance <= 2 && distance < known.len())
        .min_by_key(|&(distance, _)| distance);
    if let Some((_, close)) = close {
        message.push_str(&format!(" (did you mean {:?}?)", close.as_str()));
    }
    message
}

/// What `service` asks that this host or `privileges` cannot grant, as
/// (key within the section, message): a user or group that does not exist,
/// another user or group while the daemon is not root, a limit above the
/// daemon's hard limit. Accounts are looked up here so that `check` finds a
/// typo; the spawn looks them up again, since an account may change.
fn privilege_problems(service: &ServiceConfig, privileges: &Privileges) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let not_root = format!("the daemon runs as uid {}, not root,", privileges.uid);
    if let Some(name) = &service.user {
        match find_user(name) {
            Ok(user) if !privileges.may_run_as(user.uid.as_raw()) => problems.push((
                "user".to_owned(),
                format!(
                    "user = {name:?}{}: {not_root} and cannot switch users: run it as root or \
                     remove user",
                    shown_id(name, "uid", user.uid.as_raw())
                ),
            )),
            Ok(_) => {}
            Err(message) => problems.push(("user".to_owned(), message)),
        }
    }
    if let Some(name) = &service.group {
        match find_group(name) {
            Ok(group) if !privileges.may_use_group(group.gid.as_raw()) => problems.push((
                "group".to_owned(),
                format!(
                    "group = {name:?}{}: {not_root} and runs with another group, so it cannot \
                     switch to it: run it as root, run the daemon with that group, or remove \
                     group",
                    shown_id(name, "gid", group.gid.as_raw())
                ),
            )),
            Ok(_) => {}
            Err(message) => problems.push(("group".to_owned(), message)),
        }
    }
    for (&rlimit, &limit) in &service.rlimits {
        if let Some(hard) = privileges.hard_limit_below(rlimit, limit) {
            let name = rlimit.as_str();
            let hard = shown_limit(hard);
            problems.push((
                format!("rlimits.{name}"),
                format!(
                    "{name} = {} is above the daemon's hard limit ({hard}) and only root can \
                     raise a hard limit: lower it to at most {hard}, or run the daemon as root",
                    shown_limit(limit)
                ),
            ));
        }
    }
    problems
}

/// ` (uid 33)` after a name, nothing after a number (it says it already).
fn shown_id(name: &str, kind: &str, id: u32) -> String {
    if name.parse::<u32>().is_ok() {
        String::new()
    } else {
        format!(" ({kind} {id})")
    }
}

fn shown_limit(limit: RlimitValue) -> String {
    match limit {
        RlimitValue::Limited(limit) => limit.to_string(),
        RlimitValue::Unlimited => "\"unlimited\"".to_owned(),
    }
}

/// `user`: a name, or a numeric uid that must have an account too (the
/// spawn needs its groups).
fn find_user(name: &str) -> Result<User, String> {
    let (found, shown) = match name.parse::<u32>() {
        Ok(uid) => (
            User::from_uid(Uid::from_raw(uid)),
            format!("with uid {uid}"),
        ),
        Err(_) => (User::from_name(name), format!("{name:?}")),
    };
    match found {
        Ok(Some(user)) => Ok(user),
        Ok(None) => Err(format!(
            "no such user {shown} on this host; create it or fix user"
        )),
        Err(errno) => Err(format!(
            "cannot look up user {shown}: {errno}; check the host's user database \
             (/etc/passwd, NSS) or fix user"
        )),
    }
}

/// `group`: a name or a numeric gid with a group entry.
fn find_group(name: &str) -> Result<Group, String> {
    let (found, shown) = match name.parse::<u32>() {
        Ok(gid) => (
            Group::from_gid(Gid::from_raw(gid)),
            format!("with gid {gid}"),
        ),
        Err(_) => (Group::from_name(name), format!("{name:?}")),
    };
    match found {
        Ok(Some(group)) => Ok(group),
        Ok(None) => Err(format!(
            "no such group {shown} on this host; create it or fix group"
        )),
        Err(errno) => Err(format!(
            "cannot look up group {shown}: {errno}; check the host's group database \
             (/etc/group, NSS) or fix group"
        )),
    }
}

fn findings_about(findings: &[Finding], key: &str) -> usize {
    findings
        .iter()
        .filter(|finding| finding.problem.key == key)
        .count()
}

/// A service that is disabled cannot fail `check`: it is not started, but
/// someone may `start` it by hand, so it is still said.
fn service_finding(
    enabled: bool,
    name: &ServiceName,
    at: &Locations,
    key: &str,
    message: String,
) -> Finding {
    let section = service_key(name);
    let mut message = message;
    if !enabled {
        message.push_str(" (the service is disabled: it only matters once it is started)");
    }
    Finding {
        severity: if enabled {
            Severity::Error
        } else {
            Severity::Warning
        },
        scope: Scope::Service(name.clone()),
        problem: at.problem(key, &[key, &section, "orchestrator.services_dir"], message),
    }
}

/// Whether the kernel can execute `path`: what is wrong with it, if
/// anything, said after the program's name ("… is empty").
fn runnable(path: &Path, cwd: &Path) -> Result<(), String> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(error) => {
            return Err(match error.raw_os_error() {
                Some(libc::ELOOP) => "is a loop of symbolic links".to_owned(),
                Some(libc::ENOENT) => match fs::read_link(path) {
                    Ok(target) => {
                        format!("is a symlink to {}, which does not exist", target.display())
                    }
                    Err(_) => "does not exist".to_owned(),
                },
                _ => format!("cannot be inspected: {error}"),
            });
        }
    };
    let shown = path.display();
    if meta.is_dir() {
        return Err("is a directory, not a program".to_owned());
    }
    if !meta.is_file() {
        return Err("is not a regular file".to_owned());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("is not executable (chmod +x {shown})"));
    }
    if nix::unistd::access(path, nix::unistd::AccessFlags::X_OK).is_err() {
        return Err("is not executable by the user running orchestrator".to_owned());
    }
    if meta.len() == 0 {
        return Err("is empty (0 bytes): a failed copy?".to_owned());
    }
    // What execve reads: the first 256 bytes (the kernel's #! line limit).
    let mut head = Vec::with_capacity(256);
    match fs::File::open(path) {
        Ok(file) => {
            if let Err(error) = file.take(256).read_to_end(&mut head) {
                return Err(format!("cannot be read: {error}"));
            }
        }
        // A binary may be execute-only; only a script must be readable,
        // and then the spawn says so.
        Err(_) => return Ok(()),
    }
    if head.starts_with(b"\x7fELF") {
        return Ok(());
    }
    let Some(line) = head.strip_prefix(b"#!") else {
        return Err(
            "is neither a native binary nor a script starting with #!, so it cannot \
             be executed; add a first line such as #!/bin/sh"
                .to_owned(),
        );
    };
    let line = line.split(|&byte| byte == b'\n').next().unwrap_or_default();
    let text = String::from_utf8_lossy(line);
    if text.ends_with('\r') {
        return Err(format!(
            "has Windows line endings: its #! line ends in \\r, so the kernel looks for \
             an interpreter named {:?}; convert it with dos2unix",
            text.trim_start()
                .split([' ', '\t'])
                .next()
                .unwrap_or_default()
        ));
    }
    let Some(interpreter) = text.split_whitespace().next() else {
        return Err("has an empty #! line; name the interpreter, e.g. #!/bin/sh".to_owned());
    };
    let interpreter_path = cwd.join(interpreter);
    let why = match fs::metadata(&interpreter_path) {
        Err(_) => "does not exist",
        Ok(meta) if !meta.is_file() => "is not a file",
        Ok(meta) if meta.permissions().mode() & 0o111 == 0 => "is not executable",
        Ok(_) => return Ok(()),
    };
    Err(format!(
        "starts with #!{interpreter}, an interpreter that {why}; install it or fix \
         the first line"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_all;

    /// A fresh directory (tempfile's: unique, removed on drop), and its path.
    struct TempDir(PathBuf, #[allow(dead_code)] tempfile::TempDir);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let guard = tempfile::Builder::new()
                .prefix(&format!("orchestrator-validate-{tag}-"))
                .tempdir()
                .unwrap();
            TempDir(guard.path().to_owned(), guard)
        }

        fn file(&self, relative: &str, contents: &[u8], mode: u32) -> PathBuf {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, contents).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            path
        }

        fn validate(&self, text: &str) -> Validation {
            let loaded = parse_all(text, Some(&self.0.join("o.toml")), &self.0).unwrap();
            validate(&loaded, &host(), Some(fake_lookup))
        }

        /// `validate` with `privileges` and an empty services_dir, so that
        /// only the configured services are said.
        fn validate_as(&self, text: &str, privileges: &Privileges) -> Validation {
            fs::create_dir_all(self.0.join("services")).unwrap();
            let loaded = parse_all(text, Some(&self.0.join("o.toml")), &self.0).unwrap();
            validate_as(&loaded, &host(), Some(fake_lookup), privileges)
        }
    }

    /// Root, with every hard limit at 1024 (nofile) or unlimited.
    fn root() -> Privileges {
        Privileges {
            uid: 0,
            gid: 0,
            groups: vec![0],
            hard_limits: Rlimit::ALL
                .into_iter()
                .map(|rlimit| match rlimit {
                    Rlimit::Nofile => (rlimit, RlimitValue::Limited(1024)),
                    _ => (rlimit, RlimitValue::Unlimited),
                })
                .collect(),
        }
    }

    /// An ordinary user, uid 1000, in groups 1000 and 27, whatever this
    /// test process really is.
    fn unprivileged() -> Privileges {
        Privileges {
            uid: 1000,
            gid: 1000,
            groups: vec![1000, 27],
            ..root()
        }
    }

    fn host() -> HostEnv {
        HostEnv {
            path: "/usr/bin:/bin".into(),
            tmpdir: "/tmp".into(),
        }
    }

    /// `sh` is /bin/sh; anything else is not found, unless the service's
    /// PATH names a directory holding it (to see that PATH is passed).
    fn fake_lookup(
        program: &Path,
        env: &[crate::process::EnvVar],
        _: &Path,
    ) -> io::Result<PathBuf> {
        if program == Path::new("sh") {
            return Ok(PathBuf::from("/bin/sh"));
        }
        let path = crate::process::env_value(env, "PATH").unwrap();
        for dir in path.split(':') {
            let candidate = Path::new(dir).join(program);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        Err(io::Error::from_raw_os_error(libc::ENOENT))
    }

    fn lines(validation: &Validation, severity: Severity) -> Vec<String> {
        validation
            .findings
            .iter()
            .filter(|finding| finding.severity == severity)
            .map(|finding| {
                let problem = &finding.problem;
                format!(
                    "{}:{} {}: {}",
                    problem.line.unwrap_or(0),
                    problem.column.unwrap_or(0),
                    problem.key,
                    problem.message
                )
            })
            .collect()
    }

    #[test]
    fn instances_are_checked_against_their_section() {
        let dir = TempDir::new("instances");
        dir.file("services/web/web", b"#!/bin/sh\nexit 0\n", 0o755);
        let text = r#"[services.web]
instances = 2

[services.api]
instances = 2

[services.front]
command = ["sh"]
depends_on = { web = "healthy" }

[services.back]
command = ["sh"]
depends_on = [
  "web",
  "nope",
]
"#;
        let validation = dir.validate(text);
        let errors = lines(&validation, Severity::Error);
        let expected = [
            // The section's line, and the section's binary.
            "4:11 services.\"api@0\": service api@0: binary ",
            "4:11 services.\"api@1\": service api@1: binary ",
            "9:16 services.front.depends_on.\"web@0\": service front waits for web@0 to be \
             healthy",
            "9:16 services.front.depends_on.\"web@1\": service front waits for web@1 to be \
             healthy",
            // Written second, the third entry once web is two.
            "15:3 services.back.depends_on[2]: service back depends on nope",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, start) in errors.iter().zip(expected) {
            assert!(
                error.starts_with(start),
                "{error}\n  should start with\n{start}"
            );
        }
        assert!(
            errors[0].ends_with("set binary_path or install it at services_dir/api/api"),
            "{}",
            errors[0]
        );
        assert!(
            errors[2].contains("add [services.web.health] or notify = true to web"),
            "{}",
            errors[2]
        );
        // The discovered web/web is the instances' binary, not a service of its own.
        assert!(
            validation.warnings().next().is_none(),
            "{:#?}",
            lines(&validation, Severity::Warning)
        );
    }

    #[test]
    fn every_service_that_cannot_start_is_reported_at_once_with_its_line() {
        let dir = TempDir::new("all");
        let script = b"#!/bin/sh\nexit 0\n";
        dir.file("services/ok/ok", script, 0o755);
        dir.file("services/empty/empty", b"", 0o755);
        dir.file("services/noshebang/noshebang", b"echo hi\n", 0o755);
        dir.file("services/crlf/crlf", b"#!/bin/sh\r\necho hi\r\n", 0o755);
        dir.file(
            "services/badinterp/badinterp",
            b"#!/usr/bin/pythn3\n",
            0o755,
        );
        fs::create_dir_all(dir.0.join("services/isdir/isdir")).unwrap();
        let text = r#"[orchestrator]
services_dir = "services"
start_discovered = false

[services.ok]
[services.missing]
binary_path = "bin/missing"
[services.empty]
[services.noshebang]
[services.crlf]
[services.badinterp]
[services.isdir]
[services.cmd]
command = ["no-such-program", "--flag"]
[services.viapath]
command = ["tool"]
environment = { PATH = "PATHDIR" }
[services.typo]
binary_pth = "x"
[services.off]
enabled = false
"#;
        let pathdir = dir.0.join("tools");
        dir.file("tools/tool", script, 0o755);
        let text = text.replace("PATHDIR", &pathdir.display().to_string());
        let validation = dir.validate(&text);
        let errors = lines(&validation, Severity::Error);
        let expected = [
            "7:15 services.missing.binary_path: service missing: binary ",
            "8:11 services.empty: service empty: binary ",
            "9:11 services.noshebang: service noshebang: binary ",
            "10:11 services.crlf: service crlf: binary ",
            "11:11 services.badinterp: service badinterp: binary ",
            "12:11 services.isdir: service isdir: binary ",
            "14:11 services.cmd.command: command program \"no-such-program\" is not found in \
             the service's PATH (/usr/bin:/bin); install it, give its absolute path, or set \
             PATH in [services.cmd] environment",
            "19:1 services.typo.binary_pth: unknown key",
        ];
        assert_eq!(errors.len(), expected.len(), "{errors:#?}");
        for (error, start) in errors.iter().zip(expected) {
            assert!(
                error.starts_with(start),
                "{error}\n  should start with\n{start}"
            );
        }
        let ends = [
            "/bin/missing does not exist; fix binary_path",
            "/services/empty/empty is empty (0 bytes): a failed copy?; set binary_path or install it at services_dir/empty/empty",
            "is neither a native binary nor a script starting with #!, so it cannot be executed; add a first line such as #!/bin/sh; set binary_path or install it at services_dir/noshebang/noshebang",
            "has Windows line endings: its #! line ends in \\r, so the kernel looks for an interpreter named \"/bin/sh\\r\"; convert it with dos2unix; set binary_path or install it at services_dir/crlf/crlf",
            "starts with #!/usr/bin/pythn3, an interpreter that does not exist; install it or fix the first line; set binary_path or install it at services_dir/badinterp/badinterp",
            "/services/isdir/isdir is a directory, not a program; set binary_path or install it at services_dir/isdir/isdir",
        ];
        for (error, end) in errors[..6].iter().zip(ends) {
            assert!(error.ends_with(end), "{error}\n  should end with\n{end}");
        }
        for finding in validation.errors() {
            let expected = finding.problem.key.split('.').nth(1).unwrap();
            match &finding.scope {
                Scope::Service(name) => assert_eq!(name.as_str(), expected),
                // The unknown key is a schema problem.
                Scope::Daemon => assert_eq!(expected, "typo"),
                Scope::ServicesDir => panic!("{finding:#?}"),
            }
        }
        assert!(!validation.stops_the_daemon() || errors.iter().any(|e| e.contains("unknown")));
        let warnings = lines(&validation, Severity::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(
            warnings[0].starts_with("20:11 services.off: service off: binary "),
            "{warnings:#?}"
        );
        assert!(
            warnings[0].ends_with("(the service is disabled: it only matters once it is started)")
        );
    }

    #[test]
    fn services_dir_problems_are_located_at_the_key() {
        let dir = TempDir::new("dir");
        dir.file("afile", b"", 0o644);
        let validation = dir.validate("[orchestrator]\nservices_dir = \"afile\"\n");
        let errors = lines(&validation, Severity::Error);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].starts_with("2:16 orchestrator.services_dir: services_dir "));
        assert!(errors[0].ends_with(
            "afile is a file, not a directory; point orchestrator.services_dir at the \
             directory holding NAME/NAME"
        ));
        assert_eq!(validation.findings[0].scope, Scope::ServicesDir);
        assert!(!validation.stops_the_daemon());

        std::os::unix::fs::symlink(dir.0.join("b"), dir.0.join("a")).unwrap();
        std::os::unix::fs::symlink(dir.0.join("a"), dir.0.join("b")).unwrap();
        let errors = lines(
            &dir.validate("[orchestrator]\nservices_dir = \"a\"\n"),
            Severity::Error,
        );
        assert!(
            errors[0].contains("is a loop of symbolic links"),
            "{errors:#?}"
        );

        let errors = lines(
            &dir.validate("[orchestrator]\nservices_dir = \"nope\"\n"),
            Severity::Error,
        );
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].ends_with("nope does not exist; create it or fix orchestrator.services_dir")
        );

        // By default a missing services_dir only means nothing is discovered.
        let validation = dir.validate("");
        assert_eq!(validation.errors().count(), 0);
        let warnings = lines(&validation, Severity::Warning);
        assert!(warnings[0].starts_with("0:0 orchestrator.services_dir: services_dir "));
    }

    #[test]
    fn skipped_entries_are_warnings_unless_a_service_already_says_why() {
        let dir = TempDir::new("skipped");
        dir.file("services/plain/plain", b"#!/bin/sh\n", 0o644);
        dir.file("services/api/api", b"#!/bin/sh\n", 0o644);
        dir.file("services/.git/config", b"", 0o644);
        let validation = dir.validate("[services.api]\n");
        let errors = lines(&validation, Severity::Error);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].starts_with("1:11 services.api: service api: binary "));
        assert!(
            errors[0].contains("is not executable (chmod +x "),
            "{errors:#?}"
        );
        let warnings = lines(&validation, Severity::Warning);
        assert_eq!(warnings.len(), 2, "{warnings:#?}");
        assert!(
            warnings[0].contains(".git: name invalid: "),
            "{warnings:#?}"
        );
        assert!(warnings[1].contains("plain: plain/plain is not executable; chmod +x "));
    }

    #[test]
    fn a_configured_services_directory_without_its_binary_is_no_warning() {
        // services_dir/NAME/data is a configured service's default data_dir:
        // after its first start NAME/ exists without NAME/NAME, as it should.
        let dir = TempDir::new("datadirs");
        dir.file("services/web/data/0/state", b"", 0o644);
        dir.file("services/api/data/cache", b"", 0o644);
        dir.file("services/stray/notes", b"", 0o644);
        let validation = dir.validate(
            "[services.web]\ncommand = [\"/bin/sh\"]\ninstances = 2\n[services.api]\nbinary_path = \"/bin/sh\"\n",
        );
        assert_eq!(lines(&validation, Severity::Error), Vec::<String>::new());
        let warnings = lines(&validation, Severity::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(
            warnings[0].contains("stray: no binary stray/stray"),
            "{warnings:#?}"
        );
    }

    #[test]
    fn the_daemon_stops_only_for_its_own_problems() {
        let dir = TempDir::new("daemon");
        dir.file("datafile", b"", 0o644);
        let validation = dir.validate(
            "[orchestrator]\ndata_dir = \"datafile\"\nhttp_listen = \"127.0.0.1:1\"\nhttp_token_file = \"nope\"\n",
        );
        let errors = lines(&validation, Severity::Error);
        assert_eq!(errors.len(), 2, "{errors:#?}");
        assert!(errors[0].starts_with("2:12 orchestrator.data_dir: data_dir "));
        // Found by the loader already, and reported once.
        assert!(errors[1].starts_with("4:19 orchestrator.http_token_file: cannot read "));
        assert!(validation.stops_the_daemon());
    }

    #[test]
    fn a_valid_configuration_has_no_findings() {
        let dir = TempDir::new("valid");
        dir.file("services/api/api", b"#!/bin/sh\nexec sleep 1\n", 0o755);
        let validation = dir.validate("[services.web]\ncommand = [\"sh\", \"-c\", \"true\"]\n");
        assert!(validation.findings.is_empty(), "{:#?}", validation.findings);
        assert_eq!(validation.scan.found.len(), 1);
    }

    #[test]
    fn only_root_may_switch_users_or_groups_or_raise_a_hard_limit() {
        let root = root();
        let user = unprivileged();
        assert!(root.may_run_as(0) && root.may_run_as(1000) && root.may_run_as(65534));
        assert!(user.may_run_as(1000));
        assert!(!user.may_run_as(0) && !user.may_run_as(1001));
        assert!(root.may_use_group(0) && root.may_use_group(5));
        assert!(user.may_use_group(1000) && !user.may_use_group(27));
        assert!(!user.may_use_group(0) && !user.may_use_group(28));
        let same_gid_other_groups = Privileges {
            gid: 50,
            groups: Vec::new(),
            ..unprivileged()
        };
        assert!(same_gid_other_groups.may_use_group(50));

        use RlimitValue::{Limited, Unlimited};
        for limit in [Limited(0), Limited(1024), Limited(u64::MAX >> 1), Unlimited] {
            assert_eq!(root.hard_limit_below(Rlimit::Nofile, limit), None);
        }
        assert_eq!(user.hard_limit_below(Rlimit::Nofile, Limited(1024)), None);
        assert_eq!(user.hard_limit_below(Rlimit::Nofile, Limited(10)), None);
        assert_eq!(
            user.hard_limit_below(Rlimit::Nofile, Limited(1025)),
            Some(Limited(1024))
        );
        assert_eq!(
            user.hard_limit_below(Rlimit::Nofile, Unlimited),
            Some(Limited(1024))
        );
        assert_eq!(user.hard_limit_below(Rlimit::Core, Unlimited), None);
        let unknown = Privileges {
            hard_limits: BTreeMap::new(),
            ..unprivileged()
        };
        assert_eq!(unknown.hard_limit_below(Rlimit::Nofile, Unlimited), None);
    }

    #[test]
    fn the_process_privileges_are_its_own() {
        let privileges = Privileges::of_process();
        assert_eq!(privileges.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(privileges.gid, nix::unistd::getegid().as_raw());
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let expected = match hard {
            RLIM_INFINITY => RlimitValue::Unlimited,
            hard => RlimitValue::Limited(hard),
        };
        assert_eq!(privileges.hard_limits.get(&Rlimit::Nofile), Some(&expected));
        assert_eq!(privileges.hard_limits.len(), Rlimit::ALL.len());
    }

    #[test]
    fn users_and_groups_must_exist_on_this_host() {
        let dir = TempDir::new("accounts");
        // root (uid 0, gid 0) exists everywhere.
        for (user, group) in [("root", "root"), ("0", "0")] {
            let text = format!(
                "[services.a]\ncommand = [\"sh\"]\nuser = \"{user}\"\ngroup = \"{group}\"\n"
            );
            let validation = dir.validate_as(&text, &root());
            assert!(validation.findings.is_empty(), "{:#?}", validation.findings);
        }
        let validation = dir.validate_as(
            "[services.a]\ncommand = [\"sh\"]\nuser = \"no-such-user-orch\"\n\
             group = \"no-such-group-orch\"\n[services.b]\ncommand = [\"sh\"]\n\
             user = 3999999999\ngroup = \"3999999999\"\n",
            &root(),
        );
        let errors = lines(&validation, Severity::Error);
        assert_eq!(
            errors,
            [
                "3:8 services.a.user: no such user \"no-such-user-orch\" on this host; create \
                 it or fix user",
                "4:9 services.a.group: no such group \"no-such-group-orch\" on this host; \
                 create it or fix group",
                "7:8 services.b.user: no such user with uid 3999999999 on this host; create it \
                 or fix user",
                "8:9 services.b.group: no such group with gid 3999999999 on this host; create \
                 it or fix group",
            ]
        );
        for finding in validation.errors() {
            // Only that service is kept from starting, not the daemon.
            assert!(matches!(finding.scope, Scope::Service(_)), "{finding:#?}");
        }
        assert!(!validation.stops_the_daemon());
    }

    #[test]
    fn an_unprivileged_daemon_cannot_switch_users_or_raise_hard_limits() {
        let dir = TempDir::new("unprivileged");
        let text = "[services.a]\ncommand = [\"sh\"]\nuser = \"root\"\ngroup = \"0\"\n\
                    rlimits = { nofile = 4096, core = \"unlimited\" }\n\
                    [services.b]\ncommand = [\"sh\"]\nuser = \"0\"\n\
                    rlimits = { nofile = \"unlimited\" }\n";
        let validation = dir.validate_as(text, &unprivileged());
        let errors = lines(&validation, Severity::Error);
        assert_eq!(
            errors,
            [
                "3:8 services.a.user: user = \"root\" (uid 0): the daemon runs as uid 1000, \
                 not root, and cannot switch users: run it as root or remove user",
                "4:9 services.a.group: group = \"0\": the daemon runs as uid 1000, not root, \
                 and runs with another group, so it cannot switch to it: run it as root, run \
                 the daemon with that group, or remove group",
                "5:22 services.a.rlimits.nofile: nofile = 4096 is above the daemon's hard limit \
                 (1024) and only root can raise a hard limit: lower it to at most 1024, or run \
                 the daemon as root",
                "8:8 services.b.user: user = \"0\": the daemon runs as uid 1000, not root, and \
                 cannot switch users: run it as root or remove user",
                "9:22 services.b.rlimits.nofile: nofile = \"unlimited\" is above the daemon's \
                 hard limit (1024) and only root can raise a hard limit: lower it to at most \
                 1024, or run the daemon as root",
            ]
        );
        assert!(!validation.stops_the_daemon());
        // As root, all of it is allowed.
        let validation = dir.validate_as(text, &root());
        assert!(validation.findings.is_empty(), "{:#?}", validation.findings);
        // Lowering a limit needs no privilege.
        let validation = dir.validate_as(
            "[services.a]\ncommand = [\"sh\"]\nrlimits = { nofile = 1024, core = 0 }\n",
            &unprivileged(),
        );
        assert!(validation.findings.is_empty(), "{:#?}", validation.findings);
    }

    #[test]
    fn privilege_problems_of_a_disabled_or_broken_service() {
        let dir = TempDir::new("privileges-off");
        // Disabled: said, but it does not fail `check`.
        let validation = dir.validate_as(
            "[services.a]\nenabled = false\ncommand = [\"sh\"]\nuser = \"root\"\n",
            &unprivileged(),
        );
        assert_eq!(validation.errors().count(), 0);
        let warnings = lines(&validation, Severity::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(warnings[0].starts_with("4:8 services.a.user: user = \"root\" (uid 0): "));
        assert!(
            warnings[0].ends_with("(the service is disabled: it only matters once it is started)")
        );
        // A section with schema problems is not looked at further.
        let validation = dir.validate_as(
            "[services.a]\ncommand = [\"sh\"]\nuser = \"no-such-user-orch\"\nbogus = 1\n",
            &root(),
        );
        let errors = lines(&validation, Severity::Error);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("unknown key \"bogus\""), "{errors:#?}");
    }

    /// `[services.NAME]` sections that run `sh`, each with `extra` lines.
    fn sections(services: &[(&str, &str)]) -> String {
        services
            .iter()
            .map(|(name, extra)| format!("[services.{name}]\ncommand = [\"sh\"]\n{extra}"))
            .collect()
    }

    #[test]
    fn depends_on_names_configured_or_discovered_services() {
        let dir = TempDir::new("deps-unknown");
        dir.file("services/db/db", b"#!/bin/sh\nexec sleep 1\n", 0o755);
        let text = sections(&[
            ("api", "depends_on = [\"db\", \"cach\", \"queue\"]\n"),
            ("cache", ""),
            (
                "web",
                "depends_on = { api = \"started\", nope = \"started\" }\n",
            ),
        ]);
        let validation = dir.validate_as(&text, &root());
        let errors = lines(&validation, Severity::Error);
        let services_dir = dir.0.join("services").display().to_string();
        assert_eq!(
            errors,
            [
                format!(
                    "3:21 services.api.depends_on[1]: service api depends on cach, which is \
                     neither configured ([services.cach]) nor found in services_dir \
                     ({services_dir}/cach/cach); add that service or fix the name (did you mean \
                     \"cache\"?)"
                ),
                format!(
                    "3:29 services.api.depends_on[2]: service api depends on queue, which is \
                     neither configured ([services.queue]) nor found in services_dir \
                     ({services_dir}/queue/queue); add that service or fix the name"
                ),
                format!(
                    "8:33 services.web.depends_on.nope: service web depends on nope, which is \
                     neither configured ([services.nope]) nor found in services_dir \
                     ({services_dir}/nope/nope); add that service or fix the name"
                ),
            ]
        );
        for finding in validation.errors() {
            assert!(matches!(finding.scope, Scope::Service(_)), "{finding:#?}");
        }
        assert!(!validation.stops_the_daemon());
    }

    #[test]
    fn a_service_cannot_depend_on_itself() {
        let dir = TempDir::new("deps-self");
        let validation = dir.validate_as(
            &sections(&[("api", "depends_on = { api = \"healthy\" }\n")]),
            &root(),
        );
        assert_eq!(
            lines(&validation, Severity::Error),
            [
                "3:16 services.api.depends_on.api: service api depends on itself; remove api from \
              its depends_on"
            ]
        );
    }

    #[test]
    fn each_cycle_is_one_finding_naming_every_service_in_it() {
        let dir = TempDir::new("deps-cycles");
        let text = sections(&[
            ("c", "depends_on = [\"a\"]\n"),
            ("a", "depends_on = [\"x\", \"b\"]\n"),
            ("b", "depends_on = [\"c\"]\n"),
            ("x", ""),
            ("p", "depends_on = [\"q\"]\n"),
            ("q", "depends_on = [\"p\"]\nenabled = false\n"),
        ]);
        let validation = dir.validate_as(&text, &root());
        assert_eq!(
            lines(&validation, Severity::Error),
            [
                "6:20 services.a.depends_on[1]: depends_on forms a cycle: a -> b -> c -> a; none \
                 of them can start before the others: remove one of these dependencies",
                "14:15 services.p.depends_on[0]: depends_on forms a cycle: p -> q -> p; none of \
                 them can start before the others: remove one of these dependencies",
            ]
        );
        // Only disabled services: said, but not an error.
        let text = sections(&[
            ("p", "depends_on = [\"q\"]\nenabled = false\n"),
            ("q", "depends_on = [\"p\"]\nenabled = false\n"),
        ]);
        let validation = dir.validate_as(&text, &root());
        assert_eq!(validation.errors().count(), 0);
        let warnings = lines(&validation, Severity::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(warnings[0].contains("p -> q -> p"), "{warnings:#?}");
    }

    #[test]
    fn healthy_needs_a_health_check_or_notify() {
        let dir = TempDir::new("deps-healthy");
        let text = sections(&[
            (
                "api",
                "depends_on = { plain = \"healthy\", checked = \"healthy\", notifying = \"healthy\", \
                 off = \"healthy\" }\n",
            ),
            ("plain", ""),
            (
                "checked",
                "[services.checked.health]\ntcp = \"127.0.0.1:5432\"\n",
            ),
            ("notifying", "notify = true\n"),
            ("off", "enabled = false\nnotify = true\n"),
        ]);
        let validation = dir.validate_as(&text, &root());
        assert_eq!(
            lines(&validation, Severity::Error),
            [
                "3:16 services.api.depends_on.plain: service api waits for plain to be healthy, but \
              plain has neither a health check nor notify = true, so it never is; add \
              [services.plain.health] or notify = true to plain, or wait for \"started\" instead"
            ]
        );
        assert!(
            validation.warnings().next().is_none(),
            "{:#?}",
            validation.findings
        );
    }

    #[test]
    fn completed_needs_a_service_that_is_not_always_restarted() {
        let dir = TempDir::new("deps-completed");
        let text = sections(&[
            (
                "api",
                "depends_on = { always = \"completed\", default = \"completed\", \
                 once = \"completed\", retried = \"completed\" }\n",
            ),
            ("always", "restart = \"always\"\n"),
            ("default", ""),
            ("once", "restart = \"never\"\n"),
            ("retried", "restart = \"on-failure\"\n"),
        ]);
        let validation = dir.validate_as(&text, &root());
        assert_eq!(
            lines(&validation, Severity::Error),
            [
                "3:16 services.api.depends_on.always: service api waits for always to complete, \
                 but always is restarted whenever it exits (restart = \"always\"), so it never \
                 stays completed; set restart = \"never\" or \"on-failure\" in [services.always]",
                "3:38 services.api.depends_on.default: service api waits for default to \
                 complete, but default is restarted whenever it exits (restart is \"always\" by \
                 orchestrator.auto_restart = true), so it never stays completed; set restart = \
                 \"never\" or \"on-failure\" in [services.default]",
            ]
        );
        // Without auto_restart, a service is not restarted by default.
        let text = format!(
            "[orchestrator]\nauto_restart = false\n{}",
            sections(&[
                ("api", "depends_on = { migrate = \"completed\" }\n"),
                ("migrate", ""),
            ])
        );
        let validation = dir.validate_as(&text, &root());
        assert!(validation.findings.is_empty(), "{:#?}", validation.findings);
    }

    #[test]
    fn dependency_problems_of_a_disabled_or_broken_service() {
        let dir = TempDir::new("deps-quiet");
        // A disabled dependent: said, but it does not fail `check`.
        let validation = dir.validate_as(
            &sections(&[("api", "enabled = false\ndepends_on = [\"ghost\"]\n")]),
            &root(),
        );
        assert_eq!(validation.errors().count(), 0);
        let warnings = lines(&validation, Severity::Warning);
        assert_eq!(warnings.len(), 1, "{warnings:#?}");
        assert!(
            warnings[0]
                .starts_with("4:15 services.api.depends_on[0]: service api depends on ghost")
        );
        assert!(
            warnings[0].ends_with("(the service is disabled: it only matters once it is started)")
        );
        // A dependency whose section is broken: only its own problem.
        let validation = dir.validate_as(
            &sections(&[
                ("api", "depends_on = { db = \"healthy\" }\n"),
                ("db", "[services.db.health]\nhttp = \"https://db\"\n"),
            ]),
            &root(),
        );
        let errors = lines(&validation, Severity::Error);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(
            errors[0].contains("services.db.health.http: https is not supported"),
            "{errors:#?}"
        );
        // A dependent whose section is broken is not looked at further.
        let validation = dir.validate_as(
            &sections(&[("api", "depends_on = [\"ghost\"]\nbogus = 1\n")]),
            &root(),
        );
        let errors = lines(&validation, Severity::Error);
        assert_eq!(errors.len(), 1, "{errors:#?}");
        assert!(errors[0].contains("unknown key \"bogus\""), "{errors:#?}");
    }

    #[test]
    fn a_valid_dependency_graph_has_no_findings() {
        let dir = TempDir::new("deps-valid");
        dir.file("services/db/db", b"#!/bin/sh\nexec sleep 1\n", 0o755);
        let text = sections(&[
            ("web", "depends_on = [\"api\", \"db\"]\n"),
            (
                "api",
                "depends_on = { db = \"started\", migrate = \"completed\", cache = \"healthy\" }\n",
            ),
            (
                "migrate",
                "restart = \"on-failure\"\ndepends_on = [\"db\"]\n",
            ),
            (
                "cache",
                "enabled = false\n[services.cache.health]\nexec = [\"true\"]\n",
            ),
        ]);
        let validation = dir.validate_as(&text, &root());
        assert!(validation.findings.is_empty(), "{:#?}", validation.findings);
    }
}
