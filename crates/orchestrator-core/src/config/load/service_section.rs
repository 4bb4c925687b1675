//! `[services.NAME]`: one section per service, its `backoff`, `rlimits`
//! and `start_limit` tables, and its `depends_on`.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};

use super::cx::{Cx, Value};
use super::dotenv::{self, ExpandError};
use super::health_section;
use super::keys::{Field, Key, join_key};
use super::values::set;
use crate::config::model::{
    BackoffConfig, Condition, Dependency, RestartPolicy, Rlimit, RlimitValue, ServiceConfig,
    Sha256, StartLimit,
};
use crate::config::model::{EnvFile, Instance};
use crate::health::Probe;
use crate::name::{MAX_INSTANCES, ServiceName};

const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

/// memory_limit is turned into bytes (cgroup, GOMEMLIMIT); this keeps that
/// product inside an i64.
const MAX_MEMORY_MIB: i64 = i64::MAX >> 20;

/// The kernel's largest pid_max (PID_MAX_LIMIT on 64-bit): a pids_limit
/// above it could never be reached, so it is surely a typo.
const MAX_PIDS: i64 = 4_194_304;

/// cgroups take a quota of at least 1ms per period, and the period used is
/// 100ms (see `cgroup::Limits`): a smaller limit cannot be written.
const MIN_CORES: f64 = 0.01;
/// More than any machine has: a larger value is a typo, not a wish.
const MAX_CORES: f64 = 4096.0;
const CORES_HINT: &str = "a positive number of cores, e.g. 0.5 or 2";

/// `command` is the exact argv, so these would be silently ignored beside it.
const NOT_WITH_COMMAND: &[&str] = &["binary_path", "args"];

pub(super) const KEYS: &[Key<ServiceConfig>] = &[
    Key::new("enabled", "whether the service is started", |cx, f, out| {
        set(&mut out.enabled, cx.boolean(&f.path, f.value))
    }),
    Key::new(
        "binary_path",
        "the binary to run instead of services_dir/NAME/NAME",
        |cx, f, out| out.binary_path = cx.path(&f.path, f.value, f.base_dir),
    ),
    Key::new(
        "command",
        "the exact argv to run, without injected flags",
        |cx, f, out| out.command = cx.command(&f.path, f.value),
    ),
    Key::new(
        "args",
        "arguments appended after the injected flags",
        |cx, f, out| set(&mut out.args, cx.strings(&f.path, f.value)),
    ),
    Key::new(
        "data_dir",
        "the service's working directory and HOME",
        |cx, f, out| out.data_dir = cx.path(&f.path, f.value, f.base_dir),
    ),
    Key::new(
        "environment",
        "variables set for the service, e.g. { API_MODE = \"prod\" }",
        |cx, f, out| out.environment = cx.environment(&f.path, f.value),
    ),
    Key::new(
        "env_file",
        "dotenv files read into environment, e.g. [\"api.env\", \"-local.env\"] (\"-\": may be missing)",
        env_file,
    ),
    Key::new(
        "instances",
        "how many copies to run, as NAME@0..NAME@N-1, with {instance} the index in args and environment",
        |cx, f, out| {
            let count = cx.integer_in(&f.path, f.value, 1, MAX_INSTANCES.into(), "from 1 to 1000");
            out.instances = count.and_then(|count| u32::try_from(count).ok());
        },
    ),
    Key::new("memory_limit", "the memory limit in MiB", |cx, f, out| {
        let mib = cx.integer_in(
            &f.path,
            f.value,
            1,
            MAX_MEMORY_MIB,
            "a positive number of MiB",
        );
        out.memory_limit = mib.map(i64::unsigned_abs);
    }),
    Key::new(
        "stop_signal",
        "the signal that asks the service to stop, e.g. \"SIGTERM\"",
        |cx, f, out| set(&mut out.stop_signal, cx.signal(&f.path, f.value)),
    ),
    Key::new(
        "stop_timeout",
        "how long after stop_signal before SIGKILL",
        |cx, f, out| out.stop_timeout = cx.duration(&f.path, f.value),
    ),
    Key::new(
        "restart",
        "when to restart: always, on-failure or never",
        |cx, f, out| out.restart = cx.choice(&f.path, f.value, RESTART_POLICIES),
    ),
    Key::new(
        "max_restarts",
        "consecutive failed restarts before the service is failed",
        |cx, f, out| {
            let max = cx.integer_in(&f.path, f.value, 0, u32::MAX.into(), "0 or more");
            set(
                &mut out.max_restarts,
                max.and_then(|max| u32::try_from(max).ok()),
            );
        },
    ),
    Key::new(
        "backoff",
        "restart delays: { initial, max, reset_after }",
        backoff,
    ),
    Key::new(
        "start_limit",
        "the start-rate limit: { burst, interval }",
        start_limit,
    ),
    Key::new(
        "cpu_limit",
        "the CPU limit in cores, e.g. 1.5 for one and a half CPUs' time",
        |cx, f, out| out.cpu_limit = cpu_limit(cx, &f.path, f.value),
    ),
    Key::new(
        "pids_limit",
        "the most processes and threads the service may have at once",
        |cx, f, out| {
            let pids = cx.integer_in(
                &f.path,
                f.value,
                1,
                MAX_PIDS,
                "a number of processes from 1 to 4194304 (the kernel's largest pid_max)",
            );
            out.pids_limit = pids.map(i64::unsigned_abs);
        },
    ),
    Key::new(
        "rlimits",
        "setrlimit limits before exec, e.g. { nofile = 4096, core = 0 }",
        rlimits,
    ),
    Key::new(
        "user",
        "the user the service runs as, a name or a numeric uid (another user needs a root daemon)",
        |cx, f, out| out.user = account(cx, &f.path, f.value, "user", "uid"),
    ),
    Key::new(
        "group",
        "the group the service runs as, a name or a numeric gid (default: the user's primary group)",
        |cx, f, out| out.group = account(cx, &f.path, f.value, "group", "gid"),
    ),
    Key::new(
        "strict",
        "whether a binary or services_dir writable by group or others is refused (daemon as root)",
        |cx, f, out| set(&mut out.strict, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "sha256",
        "the SHA-256 the binary must match, as sha256sum prints it",
        |cx, f, out| {
            let Some(text) = cx.string(&f.path, f.value) else {
                return;
            };
            match Sha256::from_hex(text) {
                Some(digest) => out.sha256 = Some(digest),
                None => cx.report(f.value.span(), &f.path, sha256_problem(text)),
            }
        },
    ),
    Key::new(
        "start_grace",
        "how long a service without notify or a health check must run to count as up",
        |cx, f, out| set(&mut out.start_grace, cx.duration(&f.path, f.value)),
    ),
    Key::new(
        "log_timestamps",
        "whether this service's log file lines get a timestamp and stream prefix",
        |cx, f, out| out.log_timestamps = cx.boolean(&f.path, f.value).or(out.log_timestamps),
    ),
    Key::new(
        "log_max_age",
        "the age at which this service's log file is rotated, e.g. \"1d\"",
        |cx, f, out| {
            let age = cx.positive_duration(&f.path, f.value, "would rotate on every write", "1d");
            out.log_max_age = age.or(out.log_max_age);
        },
    ),
    Key::new(
        "notify",
        "whether the service says it is ready by sd_notify (READY=1 to NOTIFY_SOCKET)",
        |cx, f, out| set(&mut out.notify, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "start_timeout",
        "how long READY=1 or a first passing health check may take",
        |cx, f, out| {
            let timeout = cx.positive_duration(
                &f.path,
                f.value,
                "would fail every start before it could be ready",
                "30s",
            );
            set(&mut out.start_timeout, timeout);
        },
    ),
    Key::new(
        "watchdog",
        "how often a notify service must send WATCHDOG=1 (\"0s\": no watchdog)",
        |cx, f, out| {
            if let Some(period) = cx.duration(&f.path, f.value) {
                out.watchdog = (!period.is_zero()).then_some(period);
            }
        },
    ),
    Key::new(
        "depends_on",
        "the services this one starts after, e.g. [\"db\"] or { db = \"healthy\" }",
        depends_on,
    ),
    Key::new(
        "health",
        "the service's health check, a [services.NAME.health] section",
        health_section::read,
    ),
];

/// One row per resource, named as `Rlimit::as_str` names it (a test holds
/// them together); the doc says the unit, which differs between resources.
pub(super) const RLIMIT_KEYS: &[Key<BTreeMap<Rlimit, RlimitValue>>] = &[
    Key::new(
        "nofile",
        "the most open file descriptors, a count",
        |cx, f, out| rlimit(cx, f, out, Rlimit::Nofile),
    ),
    Key::new(
        "nproc",
        "the most processes of the service's user, a count",
        |cx, f, out| rlimit(cx, f, out, Rlimit::Nproc),
    ),
    Key::new(
        "core",
        "the largest core dump, in bytes (0: none)",
        |cx, f, out| rlimit(cx, f, out, Rlimit::Core),
    ),
    Key::new(
        "memlock",
        "the most locked memory, in bytes",
        |cx, f, out| rlimit(cx, f, out, Rlimit::Memlock),
    ),
    Key::new(
        "stack",
        "the largest main-thread stack, in bytes",
        |cx, f, out| rlimit(cx, f, out, Rlimit::Stack),
    ),
    Key::new(
        "as",
        "the largest address space (virtual memory), in bytes",
        |cx, f, out| rlimit(cx, f, out, Rlimit::As),
    ),
    Key::new("cpu", "the most CPU time, in seconds", |cx, f, out| {
        rlimit(cx, f, out, Rlimit::Cpu)
    }),
    Key::new(
        "fsize",
        "the largest file the service may write, in bytes",
        |cx, f, out| rlimit(cx, f, out, Rlimit::Fsize),
    ),
];

pub(super) const BACKOFF_KEYS: &[Key<BackoffConfig>] = &[
    Key::new(
        "initial",
        "the delay before the first restart",
        |cx, f, out| set(&mut out.initial, cx.duration(&f.path, f.value)),
    ),
    Key::new(
        "max",
        "the longest delay, however many failures",
        |cx, f, out| set(&mut out.max, cx.duration(&f.path, f.value)),
    ),
    Key::new(
        "reset_after",
        "how long a run must last for the delays to start over",
        |cx, f, out| set(&mut out.reset_after, cx.duration(&f.path, f.value)),
    ),
];

pub(super) const START_LIMIT_KEYS: &[Key<StartLimit>] = &[
    Key::new(
        "burst",
        "how many runs may die at once within interval before restarts slow down",
        |cx, f, out| {
            // Bounded, so that no setting turns the limit off.
            let burst = cx.integer_in(&f.path, f.value, 1, 100, "from 1 to 100");
            set(
                &mut out.burst,
                burst.and_then(|burst| u32::try_from(burst).ok()),
            );
        },
    ),
    Key::new(
        "interval",
        "the window in which quick deaths are counted",
        |cx, f, out| {
            let interval = cx.duration(&f.path, f.value);
            if interval.is_some_and(|i| i < std::time::Duration::from_secs(1)) {
                cx.report(
                    f.value.span(),
                    &f.path,
                    "an interval under 1s would let a crash loop spin; use at least \"1s\""
                        .to_owned(),
                );
                return;
            }
            set(&mut out.interval, interval);
        },
    ),
];

fn cpu_limit(cx: &mut Cx<'_>, path: &str, value: &Value<'_>) -> Option<f64> {
    let cores = cx.number(path, value, CORES_HINT)?;
    let problem = if !cores.is_finite() || cores <= 0.0 {
        format!("{cores} is not a CPU limit; use {CORES_HINT}")
    } else if cores < MIN_CORES {
        format!(
            "{cores} cores is below the smallest CPU quota cgroups take (1ms per 100ms \
             period); use at least {MIN_CORES}"
        )
    } else if cores > MAX_CORES {
        format!("{cores} cores is more than any machine has; use {CORES_HINT}, at most {MAX_CORES}")
    } else {
        return Some(cores);
    };
    cx.report(value.span(), path, problem);
    None
}

/// `rlimits = { ... }`, an inline table or a `[services.NAME.rlimits]`
/// section: unknown resources are reported like unknown keys.
fn rlimits(cx: &mut Cx<'_>, f: &Field<'_, '_>, out: &mut ServiceConfig) {
    let Some(table) = f.value.get_ref().as_table() else {
        cx.mismatch(
            &f.path,
            f.value,
            "a table of resource limits, e.g. { nofile = 4096 }",
        );
        return;
    };
    let mut limits = BTreeMap::new();
    let place = format!("in {}", f.path);
    cx.section(table, &f.path, &place, RLIMIT_KEYS, f.base_dir, &mut limits);
    out.rlimits = limits;
}

/// One resource's limit: an integer of 0 or more, or "unlimited".
fn rlimit(
    cx: &mut Cx<'_>,
    f: &Field<'_, '_>,
    out: &mut BTreeMap<Rlimit, RlimitValue>,
    resource: Rlimit,
) {
    let unit = match resource {
        Rlimit::Nofile | Rlimit::Nproc => "a count",
        Rlimit::Cpu => "a number of seconds",
        Rlimit::Core | Rlimit::Memlock | Rlimit::Stack | Rlimit::As | Rlimit::Fsize => {
            "a number of bytes"
        }
    };
    let expected = format!("{unit} (0 or more) or \"unlimited\"");
    let limit = match f.value.get_ref() {
        DeValue::Integer(_) => cx
            .integer_in(&f.path, f.value, 0, i64::MAX, &expected)
            .map(|limit| RlimitValue::Limited(limit.unsigned_abs())),
        DeValue::String(text) if text == "unlimited" => Some(RlimitValue::Unlimited),
        DeValue::String(text) => {
            cx.report(
                f.value.span(),
                &f.path,
                format!("invalid value {text:?}; use {expected}"),
            );
            None
        }
        _ => {
            cx.mismatch(&f.path, f.value, &expected);
            None
        }
    };
    if let Some(limit) = limit {
        out.insert(resource, limit);
    }
}

/// `user` or `group`: a name or a numeric id (quoted or not), looked up
/// later (by `check` and at each spawn), since an account may be created
/// after the file is written.
fn account(cx: &mut Cx<'_>, path: &str, value: &Value<'_>, what: &str, id: &str) -> Option<String> {
    if value.get_ref().is_integer() {
        // A numeric id written unquoted means the same as quoted. The
        // largest u32 is left out: as an id it means "no change" to
        // setresuid(2), not a user.
        let id = cx.integer_in(
            path,
            value,
            0,
            i64::from(u32::MAX - 1),
            &format!("a numeric {id} from 0 to 4294967294, or a {what} name"),
        )?;
        return Some(id.to_string());
    }
    let text = cx.string(path, value)?;
    let problem = if text.is_empty() {
        format!("empty {what}; give a {what} name or a numeric {id}, or remove {what}")
    } else if text.contains('\0') {
        format!("the {what} contains a NUL character; remove it")
    } else {
        return Some(text.to_owned());
    };
    cx.report(value.span(), path, problem);
    None
}

/// What is wrong with a `sha256` that is not 64 hex digits, with the likely
/// slip named: sha256sum prints the file's name after the digest.
fn sha256_problem(text: &str) -> String {
    const WHAT: &str = "sha256 must be 64 hex digits (sha256sum's output)";
    let mut words = text.split_whitespace();
    if let (Some(first), Some(_)) = (words.next(), words.next())
        && Sha256::from_hex(first).is_some()
    {
        return format!("{WHAT}: keep only the digits, not the file name after them");
    }
    let length = text.chars().count();
    match text.chars().find(|c| !c.is_ascii_hexdigit()) {
        Some(bad) => format!("{WHAT}; {bad:?} is not a hex digit"),
        None => format!("{WHAT}; this is {length} digits"),
    }
}

fn start_limit(cx: &mut Cx<'_>, f: &Field<'_, '_>, out: &mut ServiceConfig) {
    let Some(table) = f.value.get_ref().as_table() else {
        cx.mismatch(
            &f.path,
            f.value,
            "a table like { burst = 5, interval = \"10s\" }",
        );
        return;
    };
    let mut limit = StartLimit::default();
    let place = format!("in {}", f.path);
    cx.section(
        table,
        &f.path,
        &place,
        START_LIMIT_KEYS,
        f.base_dir,
        &mut limit,
    );
    out.start_limit = limit;
}

/// Reads `[services]`: one section per service, keyed by a valid name.
pub(super) fn read_all(
    cx: &mut Cx<'_>,
    table: &DeTable<'_>,
    base_dir: &Path,
    out: &mut BTreeMap<ServiceName, ServiceConfig>,
) {
    for (key, value) in table.iter() {
        let name: &str = key.get_ref();
        let path = join_key("services", name);
        cx.locate(&path, key.span());
        let valid_name = match ServiceName::section(name) {
            Ok(name) => Some(name),
            Err(invalid) => {
                cx.report(key.span(), &path, invalid.to_string());
                None
            }
        };
        let DeValue::Table(section) = value.get_ref() else {
            cx.mismatch(&path, value, &format!("a table [{path}]"));
            continue;
        };
        // Walked even under an invalid name, so its other problems show up now.
        let service = read(cx, &path, section, base_dir);
        if let Some(name) = valid_name {
            instantiate(cx, name, service, out);
        }
    }
    // `depends_on = ["web"]` on a section with instances waits for each.
    let instanced: BTreeMap<ServiceName, Vec<ServiceName>> = out
        .iter()
        .filter_map(|(name, service)| {
            let instance = service.instance.as_ref()?;
            Some((instance.section.clone(), name.clone()))
        })
        .fold(BTreeMap::new(), |mut all, (section, name)| {
            all.entry(section).or_default().push(name);
            all
        });
    if instanced.is_empty() {
        return;
    }
    for (service_name, service) in out.iter_mut() {
        let field = join_key(&join_key("services", service_name), "depends_on");
        let mut expanded: Vec<Dependency> = Vec::with_capacity(service.depends_on.len());
        // Where each entry was written, for the entries it becomes: the
        // problems about them are found by index (or name) later.
        let mut located = Vec::new();
        for (written, dependency) in service.depends_on.drain(..).enumerate() {
            let names = match instanced.get(&dependency.name) {
                Some(names) => names.clone(),
                None => vec![dependency.name.clone()],
            };
            let at = cx.locations.get(&format!("{field}[{written}]"));
            let in_table = cx.locations.get(&join_key(&field, &dependency.name));
            for name in names {
                if !expanded.iter().any(|known| known.name == name) {
                    located.push((expanded.len(), name.clone(), at, in_table));
                    expanded.push(Dependency {
                        name,
                        condition: dependency.condition,
                    });
                }
            }
        }
        for (index, name, at, in_table) in located {
            if let Some((line, column)) = at {
                cx.locations
                    .insert(format!("{field}[{index}]"), line, column);
            }
            if let Some((line, column)) = in_table {
                cx.locations.insert(join_key(&field, &name), line, column);
            }
        }
        service.depends_on = expanded;
    }
}

/// Adds section `name` to `out`: as itself, or (with `instances = N` and
/// N above one) as N services `NAME@0..NAME@N-1`. `{instance}` becomes the
/// index in args, command, environment values and data_dir (0 with
/// `instances = 1`, which keeps the plain name).
fn instantiate(
    cx: &mut Cx<'_>,
    name: ServiceName,
    service: ServiceConfig,
    out: &mut BTreeMap<ServiceName, ServiceConfig>,
) {
    let Some(count) = service.instances else {
        out.insert(name, service);
        return;
    };
    if count == 1 {
        out.insert(name, with_index(&service, 0));
        return;
    }
    let section_key = join_key("services", &name);
    for index in 0..count {
        let instance_name = name.instance(index);
        cx.locations
            .alias(&section_key, &join_key("services", &instance_name));
        let mut instance = with_index(&service, index);
        instance.instance = Some(Instance {
            section: name.clone(),
            index,
        });
        out.insert(instance_name, instance);
    }
}

/// `service` with `{instance}` replaced by `index` (in its health check too).
fn with_index(service: &ServiceConfig, index: u32) -> ServiceConfig {
    let index = index.to_string();
    let put = |text: &String| text.replace("{instance}", &index);
    let mut out = service.clone();
    out.args = service.args.iter().map(put).collect();
    out.command = service
        .command
        .as_ref()
        .map(|argv| argv.iter().map(put).collect());
    out.environment = service
        .environment
        .iter()
        .map(|(key, value)| (key.clone(), put(value)))
        .collect();
    // A port per instance in its health check, as in its args.
    if let Some(health) = &mut out.health {
        health.probe = match &health.probe {
            Probe::Http { url, expect_status } => Probe::Http {
                url: put(url),
                expect_status: *expect_status,
            },
            Probe::Tcp { address } => Probe::Tcp {
                address: put(address),
            },
            Probe::Grpc { address, service } => Probe::Grpc {
                address: put(address),
                service: put(service),
            },
            Probe::Exec { argv } => Probe::Exec {
                argv: argv.iter().map(put).collect(),
            },
        };
    }
    // Paths in the file are UTF-8 (TOML strings), so nothing is lost.
    out.data_dir = service
        .data_dir
        .as_ref()
        .map(|dir| put(&dir.to_string_lossy().into_owned()).into());
    out
}

/// `env_file = "a.env"` or `["a.env", "-b.env"]`: paths against the
/// file's directory; a leading `-` lets the file be missing.
fn env_file(cx: &mut Cx<'_>, f: &Field<'_, '_>, out: &mut ServiceConfig) {
    let items: Vec<(String, &Value<'_>)> = match f.value.get_ref() {
        DeValue::String(_) => vec![(f.path.clone(), f.value)],
        DeValue::Array(items) => items
            .iter()
            .enumerate()
            .map(|(index, item)| (format!("{}[{index}]", f.path), item))
            .collect(),
        _ => {
            cx.mismatch(
                &f.path,
                f.value,
                "a file or an array of files, e.g. [\"api.env\", \"-local.env\"]",
            );
            return;
        }
    };
    let mut files = Vec::with_capacity(items.len());
    for (path, item) in items {
        let Some(text) = cx.string(&path, item) else {
            continue;
        };
        let (optional, file) = match text.strip_prefix('-') {
            Some(file) => (true, file),
            None => (false, text),
        };
        if file.is_empty() || file.contains('\0') {
            cx.report(
                item.span(),
                &path,
                "an env_file must be a path (\"-\" only marks it optional); write e.g. \"api.env\"",
            );
            continue;
        }
        files.push(EnvFile {
            path: super::values::normalize(&f.base_dir.join(file)),
            optional,
        });
    }
    out.env_file = files;
}

/// The variables of `files`, later files winning; each problem (a file
/// missing or unreadable, a malformed line) reported at `env_file`.
/// Blocking reads: the configuration is loaded before the runtime, by
/// `check`, or by the reloader on a blocking thread.
fn read_env_files(cx: &mut Cx<'_>, prefix: &str, files: &[EnvFile]) -> BTreeMap<String, String> {
    let key = join_key(prefix, "env_file");
    let mut vars = BTreeMap::new();
    for file in files {
        let shown = file.path.display();
        let text = match read_env_file(&file.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && file.optional => continue,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                cx.report_at(
                    &key,
                    &key,
                    format!(
                        "env file {shown} does not exist; create it, fix the path, or write \
                         \"-{}\" if it may be missing",
                        file.path.display()
                    ),
                );
                continue;
            }
            Err(err) => {
                cx.report_at(
                    &key,
                    &key,
                    format!("cannot read env file {shown}: {err}; make it a readable UTF-8 file"),
                );
                continue;
            }
        };
        match dotenv::parse(&text) {
            Ok(parsed) => vars.extend(parsed),
            Err(bad) => cx.report_at(
                &key,
                &key,
                format!("env file {shown}:{}: {}", bad.line, bad.message),
            ),
        }
    }
    vars
}

/// The most an env file may hold: a file meant as environment is small,
/// and a mistaken path (a log, a device) must not be read into memory.
const MAX_ENV_FILE_BYTES: u64 = 1 << 20;

/// An env file's text. Only a regular file is opened: a FIFO would block
/// the load until something writes to it, a device could be endless.
fn read_env_file(path: &Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    use std::os::unix::fs::OpenOptionsExt;
    // Opened without waiting (a FIFO's open would block until a writer
    // comes), then checked as the file actually opened: a path swapped
    // between a check and the open cannot slip a FIFO in.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "not a regular file (a directory, FIFO or device)",
        ));
    }
    let mut text = String::new();
    file.take(MAX_ENV_FILE_BYTES + 1)
        .read_to_string(&mut text)?;
    if text.len() as u64 > MAX_ENV_FILE_BYTES {
        return Err(Error::new(
            ErrorKind::InvalidData,
            format!("larger than {MAX_ENV_FILE_BYTES} bytes"),
        ));
    }
    Ok(text)
}

/// Reads the env files into `out.environment` (under its own entries)
/// and expands `${VAR}` in args, command and the environment's own values.
fn expand_variables(cx: &mut Cx<'_>, prefix: &str, out: &mut ServiceConfig) {
    let files = read_env_files(cx, prefix, &out.env_file);
    let host_var = cx.host_var;
    let lookup = |name: &str| files.get(name).cloned().or_else(|| host_var(name));
    let expand =
        |cx: &mut Cx<'_>, located: &str, key: &str, text: &str| match dotenv::expand(text, &lookup)
        {
            Ok(text) => Some(text),
            Err(ExpandError::Undefined(name)) => {
                cx.report_at(
                    located,
                    key,
                    format!(
                        "undefined variable ${{{name}}}; set {name} in the daemon's environment \
                         or in an env_file, or give a default: ${{{name}:-value}}"
                    ),
                );
                None
            }
            Err(ExpandError::Malformed(message)) => {
                cx.report_at(located, key, message);
                None
            }
        };
    for (field, argv) in [
        ("args", Some(&mut out.args)),
        ("command", out.command.as_mut()),
    ] {
        let Some(argv) = argv else { continue };
        let located = join_key(prefix, field);
        for (index, arg) in argv.iter_mut().enumerate() {
            let key = format!("{located}[{index}]");
            if let Some(expanded) = expand(cx, &located, &key, arg) {
                *arg = expanded;
            }
        }
    }
    let table = join_key(prefix, "environment");
    let mut environment = files.clone();
    for (name, value) in &out.environment {
        let key = join_key(&table, name);
        let expanded = expand(cx, &key, &key, value);
        environment.insert(name.clone(), expanded.unwrap_or_else(|| value.clone()));
    }
    out.environment = environment;
}

/// Reads one `[services.NAME]` section at `prefix`.
fn read(cx: &mut Cx<'_>, prefix: &str, table: &DeTable<'_>, base_dir: &Path) -> ServiceConfig {
    let mut out = ServiceConfig::default();
    cx.section(
        table,
        prefix,
        &format!("in [{prefix}]"),
        KEYS,
        base_dir,
        &mut out,
    );
    expand_variables(cx, prefix, &mut out);
    let combined_with: Vec<String> = table
        .iter()
        .map(|(key, _)| -> &str { key.get_ref() })
        .filter(|name| NOT_WITH_COMMAND.contains(name))
        .map(|name| format!("{name:?}"))
        .collect();
    // A group is switched only together with its user (the spawn's
    // UserSpec), so a group alone would be silently ignored.
    if let Some((group, _)) = table.get_key_value("group")
        && !table.contains_key("user")
    {
        cx.report(
            group.span(),
            &join_key(prefix, "group"),
            "group needs user; set user too, or remove group (a group is only switched together with a user)",
        );
    }
    // The pings come over the notify socket, which only notify sets up.
    // A notify that is not a boolean has its own problem already.
    if let Some((watchdog, _)) = table.get_key_value("watchdog")
        && out.watchdog.is_some()
        && !out.notify
        && table
            .get("notify")
            .is_none_or(|notify| notify.get_ref().is_bool())
    {
        cx.report(
            watchdog.span(),
            &join_key(prefix, "watchdog"),
            "watchdog needs notify = true: the WATCHDOG=1 pings come over the sd_notify \
             socket; set notify = true, or remove watchdog",
        );
    }
    if let Some((command, _)) = table.get_key_value("command")
        && !combined_with.is_empty()
    {
        cx.report(
            command.span(),
            &join_key(prefix, "command"),
            format!(
                "\"command\" is the exact argv and cannot be combined with {}; \
                 put the program and all its arguments in \"command\", or drop \"command\"",
                combined_with.join(" or ")
            ),
        );
    }
    out
}

/// `depends_on`: an array of names (each to be started), or a table of
/// name = condition; kept in the order written, each name once. Whether
/// the names exist is for validation, which sees every service.
fn depends_on(cx: &mut Cx<'_>, f: &Field<'_, '_>, out: &mut ServiceConfig) {
    // Each entry's key path, where its name is, the name, and (in the
    // table form) its condition.
    let mut entries: Vec<(String, Range<usize>, &str, Option<&Value<'_>>)> = Vec::new();
    match f.value.get_ref() {
        DeValue::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let path = format!("{}[{index}]", f.path);
                match item.get_ref().as_str() {
                    Some(name) => entries.push((path, item.span(), name, None)),
                    None => cx.mismatch(&path, item, "a service name (a string)"),
                }
            }
        }
        DeValue::Table(table) => {
            for (key, value) in table.iter() {
                let name: &str = key.get_ref();
                entries.push((join_key(&f.path, name), key.span(), name, Some(value)));
            }
            // The table iterates in key order.
            entries.sort_by_key(|(_, span, ..)| span.start);
        }
        _ => {
            cx.mismatch(
                &f.path,
                f.value,
                "an array of service names, e.g. [\"db\"], or a table of conditions, e.g. \
                 { db = \"healthy\" }",
            );
            return;
        }
    }
    let mut dependencies: Vec<Dependency> = Vec::with_capacity(entries.len());
    for (path, span, text, condition) in entries {
        cx.locate(&path, span.clone());
        let name = match ServiceName::parse(text) {
            Ok(name) => Some(name),
            Err(invalid) => {
                cx.report(span.clone(), &path, format!("depends_on: {invalid}"));
                None
            }
        };
        let condition = match condition {
            None => Some(Condition::Started),
            Some(value) => dependency_condition(cx, &path, value),
        };
        let (Some(name), Some(condition)) = (name, condition) else {
            continue;
        };
        if dependencies.iter().any(|known| known.name == name) {
            cx.report(
                span,
                &path,
                format!("{name} is named twice in depends_on; keep one"),
            );
            continue;
        }
        dependencies.push(Dependency { name, condition });
    }
    out.depends_on = dependencies;
}

fn dependency_condition(cx: &mut Cx<'_>, path: &str, value: &Value<'_>) -> Option<Condition> {
    let all: Vec<&str> = Condition::ALL
        .iter()
        .map(|condition| condition.as_str())
        .collect();
    let all = all.join(", ");
    let Some(text) = value.get_ref().as_str() else {
        cx.mismatch(path, value, &format!("a condition: one of {all}"));
        return None;
    };
    let condition = Condition::parse(text);
    if condition.is_none() {
        cx.report(
            value.span(),
            path,
            format!("invalid condition {text:?}; use one of {all}"),
        );
    }
    condition
}

/// `backoff = { ... }`: its members, then whether they make sense together.
fn backoff(cx: &mut Cx<'_>, f: &Field<'_, '_>, out: &mut ServiceConfig) {
    let Some(table) = f.value.get_ref().as_table() else {
        cx.mismatch(
            &f.path,
            f.value,
            "a table like { initial = \"1s\", max = \"30s\", reset_after = \"60s\" }",
        );
        return;
    };
    let before = cx.problems.len();
    let mut backoff = BackoffConfig::default();
    let place = format!("in {}", f.path);
    cx.section(
        table,
        &f.path,
        &place,
        BACKOFF_KEYS,
        f.base_dir,
        &mut backoff,
    );
    // Comparing against a value that failed to parse would only add noise.
    if cx.problems.len() != before {
        return;
    }
    if backoff.max < backoff.initial {
        let span = table
            .get("max")
            .map_or_else(|| f.value.span(), |max| max.span());
        cx.report(
            span,
            &join_key(&f.path, "max"),
            format!(
                "backoff max ({:?}) is shorter than initial ({:?}); raise max or lower initial",
                backoff.max, backoff.initial
            ),
        );
        return;
    }
    out.backoff = backoff;
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use nix::sys::signal::Signal;

    use super::*;
    use crate::config::load::test_support::*;

    #[test]
    fn start_limit_is_read_and_checked() {
        let svc = service("[services.api]\nstart_limit = { burst = 3, interval = \"30s\" }\n");
        assert_eq!(
            svc.start_limit,
            StartLimit {
                burst: 3,
                interval: Duration::from_secs(30)
            }
        );
        assert_eq!(
            service("[services.api]\n").start_limit,
            StartLimit::default()
        );
        let message = one_problem(
            "[services.api]\nstart_limit = { burst = 0 }\n",
            2,
            "services.api.start_limit.burst",
        );
        assert!(message.contains("from 1 to 100"), "{message}");
        let message = one_problem(
            "[services.api]\nstart_limit = { interval = \"500ms\" }\n",
            2,
            "services.api.start_limit.interval",
        );
        assert!(message.contains("at least \"1s\""), "{message}");
    }

    #[test]
    fn full_service_section() {
        let svc = service(
            r#"
[services.api]
enabled = false
binary_path = "bin/api"
args = ["--port", "8080"]
data_dir = "./data/../api-data"
environment = { API_MODE = "prod", EMPTY = "" }
memory_limit = 256
stop_signal = "int"
stop_timeout = 10
restart = "on-failure"
max_restarts = 0
backoff = { initial = "200ms", max = "1m", reset_after = "1h" }
"#,
        );
        assert!(!svc.enabled);
        assert_eq!(
            svc.binary_path.as_deref(),
            Some(Path::new("/base/dir/bin/api"))
        );
        assert_eq!(svc.args, ["--port", "8080"]);
        assert_eq!(
            svc.data_dir.as_deref(),
            Some(Path::new("/base/dir/data/../api-data"))
        );
        assert_eq!(svc.environment["API_MODE"], "prod");
        assert_eq!(svc.environment["EMPTY"], "");
        assert_eq!(svc.memory_limit, Some(256));
        assert_eq!(svc.stop_signal, Signal::SIGINT);
        assert_eq!(svc.stop_timeout, Some(Duration::from_secs(10)));
        assert_eq!(svc.restart, Some(RestartPolicy::OnFailure));
        assert_eq!(svc.max_restarts, 0);
        assert_eq!(
            svc.backoff,
            BackoffConfig {
                initial: Duration::from_millis(200),
                max: Duration::from_secs(60),
                reset_after: Duration::from_secs(3600),
            }
        );
    }

    #[test]
    fn service_defaults_and_other_forms() {
        let config = ok(r#"
[services.api]

[services.web]
command = ["python3", "-m", "http.server", ""]
stop_signal = "SIGQUIT"

[services.web.environment]
A = "1"

[services.db.backoff]
max = "1s"
"#);
        assert_eq!(config.services["api"], ServiceConfig::default());
        let web = &config.services["web"];
        assert_eq!(
            web.command.as_deref(),
            Some(&["python3", "-m", "http.server", ""].map(String::from)[..])
        );
        assert_eq!(web.stop_signal, Signal::SIGQUIT);
        assert_eq!(web.environment["A"], "1");
        assert_eq!(config.services["db"].backoff.max, Duration::from_secs(1));
    }

    /// Each (file text, line, key, parts of the message) yields exactly
    /// that one problem.
    fn each_problem(cases: &[(&str, usize, &str, &[&str])]) {
        for &(text, line, key, parts) in cases {
            let message = one_problem(text, line, key);
            for part in parts {
                assert!(message.contains(part), "{text}:\n{message}\nlacks {part:?}");
            }
        }
    }

    const DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn containment_keys_are_read() {
        let svc = service(&format!(
            r#"
[services.api]
cpu_limit = 1.5
pids_limit = 128
rlimits = {{ nofile = 4096, core = 0, as = "unlimited", cpu = 0x10 }}
user = "nobody"
group = "nogroup"
strict = false
sha256 = "{}"
"#,
            DIGEST.to_uppercase()
        ));
        assert_eq!(svc.cpu_limit, Some(1.5));
        assert_eq!(svc.pids_limit, Some(128));
        assert_eq!(
            svc.rlimits,
            BTreeMap::from([
                (Rlimit::Nofile, RlimitValue::Limited(4096)),
                (Rlimit::Core, RlimitValue::Limited(0)),
                (Rlimit::As, RlimitValue::Unlimited),
                (Rlimit::Cpu, RlimitValue::Limited(16)),
            ])
        );
        assert_eq!(svc.user.as_deref(), Some("nobody"));
        assert_eq!(svc.group.as_deref(), Some("nogroup"));
        assert!(!svc.strict);
        assert_eq!(
            svc.sha256.map(|digest| digest.to_string()).as_deref(),
            Some(DIGEST)
        );

        // Other forms: whole cores, a section of limits, numeric ids.
        let svc = service(
            "[services.api]\ncpu_limit = 2\nuser = 1000\ngroup = \"100\"\nstrict = true\n\n\
             [services.api.rlimits]\nstack = 8388608\nfsize = \"unlimited\"\n",
        );
        assert_eq!(svc.cpu_limit, Some(2.0));
        assert_eq!(svc.user.as_deref(), Some("1000"));
        assert_eq!(svc.group.as_deref(), Some("100"));
        assert!(svc.strict);
        assert_eq!(
            svc.rlimits,
            BTreeMap::from([
                (Rlimit::Stack, RlimitValue::Limited(8_388_608)),
                (Rlimit::Fsize, RlimitValue::Unlimited),
            ])
        );
        assert_eq!(
            service("[services.api]\ncpu_limit = 0.01\npids_limit = 4194304\n").cpu_limit,
            Some(0.01)
        );
        assert_eq!(
            service("[services.api]\ncpu_limit = 4096\n").cpu_limit,
            Some(4096.0)
        );

        // Unset: no limits, no other user, strict.
        let svc = service("[services.api]\n");
        assert_eq!(svc.cpu_limit, None);
        assert_eq!(svc.pids_limit, None);
        assert!(svc.rlimits.is_empty());
        assert_eq!((svc.user, svc.group), (None, None));
        assert!(svc.strict);
        assert_eq!(svc.sha256, None);
    }

    #[test]
    fn cpu_limit_is_a_positive_number_of_cores() {
        let key = "services.api.cpu_limit";
        let hint = "use a positive number of cores, e.g. 0.5 or 2";
        each_problem(&[
            (
                "[services.api]\ncpu_limit = 0\n",
                2,
                key,
                &["0 is not a CPU limit", hint],
            ),
            (
                "[services.api]\ncpu_limit = -1.5\n",
                2,
                key,
                &["-1.5 is not a CPU limit", hint],
            ),
            (
                "[services.api]\ncpu_limit = nan\n",
                2,
                key,
                &["NaN is not a CPU limit", hint],
            ),
            (
                "[services.api]\ncpu_limit = inf\n",
                2,
                key,
                &["inf is not a CPU limit", hint],
            ),
            (
                "[services.api]\n\ncpu_limit = -inf\n",
                3,
                key,
                &["-inf is not a CPU limit"],
            ),
            (
                "[services.api]\ncpu_limit = 0.005\n",
                2,
                key,
                &[
                    "0.005 cores is below the smallest CPU quota",
                    "use at least 0.01",
                ],
            ),
            (
                "[services.api]\ncpu_limit = 4096.5\n",
                2,
                key,
                &["4096.5 cores is more than any machine has", "at most 4096"],
            ),
            (
                "[services.api]\ncpu_limit = \"1.5\"\n",
                2,
                key,
                &["expected a positive number of cores, e.g. 0.5 or 2, found string"],
            ),
            (
                "[services.api]\ncpu_limit = 99999999999999999999\n",
                2,
                key,
                &["too large"],
            ),
        ]);
    }

    #[test]
    fn pids_limit_is_a_count_within_pid_max() {
        let key = "services.api.pids_limit";
        let hint = "use a number of processes from 1 to 4194304 (the kernel's largest pid_max)";
        each_problem(&[
            (
                "[services.api]\npids_limit = 0\n",
                2,
                key,
                &["0 is out of range", hint],
            ),
            (
                "[services.api]\npids_limit = 4194305\n",
                2,
                key,
                &["out of range", hint],
            ),
            (
                "[services.api]\npids_limit = 1.5\n",
                2,
                key,
                &["expected an integer, found float"],
            ),
        ]);
        assert_eq!(
            service("[services.api]\npids_limit = 1\n").pids_limit,
            Some(1)
        );
    }

    #[test]
    fn rlimits_name_known_resources_and_their_units() {
        each_problem(&[
            (
                "[services.api]\nrlimits = { nofiles = 10 }\n",
                2,
                "services.api.rlimits.nofiles",
                &[
                    "unknown key \"nofiles\" in services.api.rlimits",
                    "did you mean \"nofile\"? (the most open file descriptors, a count)",
                    "valid keys: nofile, nproc, core, memlock, stack, as, cpu, fsize",
                ],
            ),
            (
                "[services.api]\n[services.api.rlimits]\nrss = 1\n",
                3,
                "services.api.rlimits.rss",
                &["unknown key \"rss\"", "valid keys: nofile, nproc, core"],
            ),
            (
                "[services.api]\nrlimits = { nofile = -1 }\n",
                2,
                "services.api.rlimits.nofile",
                &["-1 is out of range; use a count (0 or more) or \"unlimited\""],
            ),
            (
                "[services.api]\nrlimits = { core = \"none\" }\n",
                2,
                "services.api.rlimits.core",
                &["invalid value \"none\"; use a number of bytes (0 or more) or \"unlimited\""],
            ),
            (
                "[services.api]\nrlimits = { cpu = 1.5 }\n",
                2,
                "services.api.rlimits.cpu",
                &["expected a number of seconds (0 or more) or \"unlimited\", found float"],
            ),
            (
                "[services.api]\nrlimits = { memlock = \"Unlimited\" }\n",
                2,
                "services.api.rlimits.memlock",
                &["invalid value \"Unlimited\""],
            ),
            (
                "[services.api]\nrlimits = 4096\n",
                2,
                "services.api.rlimits",
                &["expected a table of resource limits, e.g. { nofile = 4096 }, found integer"],
            ),
        ]);
        // One bad resource leaves the others read.
        let found = problems("[services.api]\nrlimits = { nofile = 1, bogus = 2, core = -3 }\n");
        assert_eq!(found.len(), 2, "{found:#?}");
    }

    #[test]
    fn user_and_group_are_names_or_ids() {
        each_problem(&[
            (
                "[services.api]\nuser = \"\"\n",
                2,
                "services.api.user",
                &["empty user; give a user name or a numeric uid, or remove user"],
            ),
            (
                "[services.api]\nuser = \"a\"\ngroup = \"\"\n",
                3,
                "services.api.group",
                &["empty group; give a group name or a numeric gid, or remove group"],
            ),
            (
                "[services.api]\nuser = \"a\\u0000b\"\n",
                2,
                "services.api.user",
                &["the user contains a NUL character; remove it"],
            ),
            (
                "[services.api]\nuser = -1\n",
                2,
                "services.api.user",
                &["-1 is out of range; use a numeric uid from 0 to 4294967294, or a user name"],
            ),
            (
                "[services.api]\nuser = \"a\"\ngroup = 4294967295\n",
                3,
                "services.api.group",
                &["use a numeric gid from 0 to 4294967294, or a group name"],
            ),
            (
                "[services.api]\nuser = [\"a\"]\n",
                2,
                "services.api.user",
                &["expected a string, found array"],
            ),
            (
                "[services.api]\nenabled = true\ngroup = \"staff\"\n",
                3,
                "services.api.group",
                &["group needs user; set user too, or remove group"],
            ),
        ]);
        assert_eq!(
            service("[services.api]\nuser = 0\n").user.as_deref(),
            Some("0")
        );
    }

    #[test]
    fn strict_is_a_boolean() {
        let message = one_problem("[services.api]\nstrict = 1\n", 2, "services.api.strict");
        assert!(
            message.contains("expected a boolean (true or false), found integer"),
            "{message}"
        );
    }

    #[test]
    fn sha256_is_64_hex_digits() {
        let key = "services.api.sha256";
        let what = "sha256 must be 64 hex digits (sha256sum's output)";
        let short = &DIGEST[..63];
        let with_file = format!("{DIGEST}  api");
        let not_hex = format!("{}g", &DIGEST[..63]);
        each_problem(&[
            (
                &format!("[services.api]\nsha256 = \"{short}\"\n"),
                2,
                key,
                &[what, "this is 63 digits"],
            ),
            (
                &format!("[services.api]\nsha256 = \"{with_file}\"\n"),
                2,
                key,
                &[what, "keep only the digits, not the file name after them"],
            ),
            (
                &format!("[services.api]\nsha256 = \"{not_hex}\"\n"),
                2,
                key,
                &[what, "'g' is not a hex digit"],
            ),
            (
                "[services.api]\nsha256 = \"\"\n",
                2,
                key,
                &[what, "this is 0 digits"],
            ),
            (
                "[services.api]\nsha256 = 1\n",
                2,
                key,
                &["expected a string, found integer"],
            ),
        ]);
    }

    #[test]
    fn bad_service_names() {
        let long = "a".repeat(65);
        for name in ["..", ".x", "-x", "a/b", "a b", "é", long.as_str(), ""] {
            let text = format!("[services]\n\n{:?} = {{ enabled = true }}\n", name);
            let found = problems(&text);
            assert_eq!(found.len(), 1, "{name}: {found:#?}");
            assert_eq!(found[0].line, Some(3), "{name}");
            assert_eq!(found[0].key, join_key("services", name));
        }
        let max = "a".repeat(64);
        let config = ok(&format!(
            "[services.{max}]\n[services.\"a.b-c_9\"]\n[services.A]\n"
        ));
        assert_eq!(config.services.len(), 3);
        assert!(config.services.contains_key("a.b-c_9"));
    }

    #[test]
    fn section_under_invalid_name_is_still_checked() {
        let found = problems("[services.\".x\"]\nfoo = 1\n");
        assert_eq!(found.len(), 2, "{found:#?}");
        assert_eq!(found[0].key, "services.\".x\"");
        assert_eq!(found[1].key, "services.\".x\".foo");
        assert_eq!(found[1].line, Some(2));
    }

    #[test]
    fn command_cannot_be_combined() {
        let message = one_problem(
            "[services.api]\nargs = [\"x\"]\ncommand = [\"sh\"]\nbinary_path = \"b\"\n",
            3,
            "services.api.command",
        );
        assert!(message.contains("cannot be combined with"), "{message}");
        assert!(message.contains("\"args\""), "{message}");
        assert!(message.contains("\"binary_path\""), "{message}");
        let message = one_problem(
            "[services.api]\ncommand = [\"sh\"]\nargs = []\n",
            2,
            "services.api.command",
        );
        assert!(message.contains("exact argv"), "{message}");
    }

    #[test]
    fn backoff_max_below_initial() {
        let message = one_problem(
            "[services.api]\nbackoff = { initial = \"10s\", max = \"5s\" }\n",
            2,
            "services.api.backoff.max",
        );
        assert!(message.contains("shorter than initial"), "{message}");
        // The default initial is 1s, so a lone smaller max conflicts with it.
        let message = one_problem(
            "[services.api]\n[services.api.backoff]\nreset_after = 1\n\nmax = \"500ms\"\n",
            5,
            "services.api.backoff.max",
        );
        assert!(
            message.contains("(500ms)") && message.contains("(1s)"),
            "{message}"
        );
        // An invalid member is reported once, not also as a comparison.
        let message = one_problem(
            "[services.api]\nbackoff = { initial = \"x\", max = \"1ms\" }\n",
            2,
            "services.api.backoff.initial",
        );
        assert!(message.contains("invalid duration"), "{message}");
        let svc = service("[services.api]\nbackoff = { initial = \"2s\", max = \"2s\" }\n");
        assert_eq!(svc.backoff.max, Duration::from_secs(2));
    }

    #[test]
    fn readiness_keys_are_read() {
        let svc = service(
            "[services.api]\nstart_grace = \"500ms\"\nnotify = true\nstart_timeout = 90\nwatchdog = \"10s\"\n",
        );
        assert_eq!(svc.start_grace, Duration::from_millis(500));
        assert!(svc.notify);
        assert_eq!(svc.start_timeout, Duration::from_secs(90));
        assert_eq!(svc.watchdog, Some(Duration::from_secs(10)));
        // "0s" turns the watchdog off, and then needs no notify.
        let svc = service("[services.api]\nwatchdog = \"0s\"\nstart_grace = 0\n");
        assert_eq!(svc.watchdog, None);
        assert_eq!(svc.start_grace, Duration::ZERO);
        let svc = service("[services.api]\n");
        assert_eq!(
            (svc.start_grace, svc.notify, svc.start_timeout, svc.watchdog),
            (DEFAULT_START_GRACE, false, DEFAULT_START_TIMEOUT, None)
        );
    }

    #[test]
    fn readiness_values_are_checked() {
        each_problem(&[
            (
                "[services.api]\nstart_timeout = \"0s\"\n",
                2,
                "services.api.start_timeout",
                &[
                    "0 would fail every start before it could be ready; use a positive duration, e.g. \"30s\"",
                ],
            ),
            (
                "[services.api]\nstart_grace = \"-1s\"\n",
                2,
                "services.api.start_grace",
                &["negative"],
            ),
            (
                "[services.api]\nnotify = \"yes\"\n",
                2,
                "services.api.notify",
                &["expected a boolean (true or false), found string"],
            ),
            (
                "[services.api]\nwatchdog = \"5s\"\n",
                2,
                "services.api.watchdog",
                &[
                    "watchdog needs notify = true",
                    "set notify = true, or remove watchdog",
                ],
            ),
            (
                "[services.api]\nnotify = false\n\nwatchdog = 5\n",
                4,
                "services.api.watchdog",
                &["watchdog needs notify = true"],
            ),
            (
                "[services.api]\nwatchdog = \"5 parsecs\"\n",
                2,
                "services.api.watchdog",
                &["invalid duration"],
            ),
            // A notify that is wrong is said once, not again by watchdog.
            (
                "[services.api]\nnotify = 1\nwatchdog = \"5s\"\n",
                2,
                "services.api.notify",
                &["expected a boolean"],
            ),
        ]);
    }

    #[test]
    fn depends_on_as_names_or_conditions_in_the_order_written() {
        let dependency = |name: &str, condition| Dependency {
            name: ServiceName::parse(name).unwrap(),
            condition,
        };
        let svc = service("[services.api]\ndepends_on = [\"db\", \"cache\", \"a.b\"]\n");
        assert_eq!(
            svc.depends_on,
            [
                dependency("db", Condition::Started),
                dependency("cache", Condition::Started),
                dependency("a.b", Condition::Started),
            ]
        );
        let svc = service(
            "[services.api]\ndepends_on = { migrate = \"completed\", db = \"healthy\", cache = \"started\" }\n",
        );
        assert_eq!(
            svc.depends_on,
            [
                dependency("migrate", Condition::Completed),
                dependency("db", Condition::Healthy),
                dependency("cache", Condition::Started),
            ]
        );
        let svc = service("[services.api.depends_on]\nz = \"healthy\"\ny = \"started\"\n");
        assert_eq!(
            svc.depends_on,
            [
                dependency("z", Condition::Healthy),
                dependency("y", Condition::Started),
            ]
        );
        assert!(
            service("[services.api]\ndepends_on = []\n")
                .depends_on
                .is_empty()
        );
    }

    #[test]
    fn depends_on_names_are_valid_and_once_and_conditions_known() {
        each_problem(&[
            (
                "[services.api]\ndepends_on = [\"db\", \"cache\", \"db\"]\n",
                2,
                "services.api.depends_on[2]",
                &["db is named twice in depends_on; keep one"],
            ),
            (
                "[services.api]\ndepends_on = [\"a/b\"]\n",
                2,
                "services.api.depends_on[0]",
                &["depends_on: invalid service name \"a/b\": '/' (character 2) is not allowed"],
            ),
            (
                "[services.api]\ndepends_on = { \".db\" = \"started\" }\n",
                2,
                "services.api.depends_on.\".db\"",
                &["must not start with '.' or '-'"],
            ),
            (
                "[services.api]\ndepends_on = { db = \"ready\" }\n",
                2,
                "services.api.depends_on.db",
                &["invalid condition \"ready\"; use one of started, healthy, completed"],
            ),
            (
                "[services.api]\ndepends_on = { db = true }\n",
                2,
                "services.api.depends_on.db",
                &["expected a condition: one of started, healthy, completed, found boolean"],
            ),
            (
                "[services.api]\ndepends_on = [\"db\", 1]\n",
                2,
                "services.api.depends_on[1]",
                &["expected a service name (a string), found integer"],
            ),
            (
                "[services.api]\ndepends_on = \"db\"\n",
                2,
                "services.api.depends_on",
                &["expected an array of service names, e.g. [\"db\"], or a table of conditions"],
            ),
        ]);
        // Each entry is placed at its own line.
        let found = problems("[services.api]\ndepends_on = [\n  \"ok\",\n  \"b/ad\",\n]\n");
        assert_eq!(found[0].line, Some(4), "{found:#?}");
    }
}
