//! `[services.NAME]`: one section per service, and its `backoff` table.

use std::collections::BTreeMap;
use std::path::Path;

use toml::de::{DeTable, DeValue};

use super::cx::Cx;
use super::keys::{Field, Key, join_key};
use super::values::set;
use crate::config::model::{BackoffConfig, RestartPolicy, ServiceConfig, StartLimit};
use crate::name::ServiceName;

const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

/// memory_limit is turned into bytes (cgroup, GOMEMLIMIT); this keeps that
/// product inside an i64.
const MAX_MEMORY_MIB: i64 = i64::MAX >> 20;

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
    Key::later("cpu_limit", "the CPU limit in cores"),
    Key::later("pids_limit", "the limit on the service's processes"),
    Key::later("rlimits", "resource limits such as { nofile = 4096 }"),
    Key::later("user", "the user the service runs as"),
    Key::later("sha256", "the checksum the binary must match"),
    Key::later("depends_on", "the services this one starts after"),
    Key::later("health", "the service's health check"),
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
        let valid_name = match ServiceName::parse(name) {
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
            out.insert(name, service);
        }
    }
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
    let combined_with: Vec<String> = table
        .iter()
        .map(|(key, _)| -> &str { key.get_ref() })
        .filter(|name| NOT_WITH_COMMAND.contains(name))
        .map(|name| format!("{name:?}"))
        .collect();
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

    #[test]
    fn later_keys_are_not_supported_yet() {
        let later = KEYS.iter().filter(|key| key.read.is_none());
        for key in later.map(|key| key.name) {
            let text = format!("[services.api]\n{key} = 1\n");
            let message = one_problem(&text, 2, &format!("services.api.{key}"));
            assert!(
                message.contains("is not supported yet by this version"),
                "{message}"
            );
        }
        let message = one_problem(
            "[services.api]\n\n[services.api.health]\nhttp = \"http://x\"\n",
            3,
            "services.api.health",
        );
        assert!(
            message.contains("\"health\" is not supported yet"),
            "{message}"
        );
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
}
