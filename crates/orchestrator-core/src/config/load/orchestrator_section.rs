//! `[orchestrator]`: the daemon's own settings.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use super::cx::Cx;
use super::keys::Key;
use super::values::set;
use crate::config::model::{LogFormat, LogLevel, OrchestratorConfig};

const LOG_LEVELS: &[(&str, LogLevel)] = &[
    ("error", LogLevel::Error),
    ("warn", LogLevel::Warn),
    ("info", LogLevel::Info),
    ("debug", LogLevel::Debug),
    ("trace", LogLevel::Trace),
];
const LOG_FORMATS: &[(&str, LogFormat)] = &[
    ("text", LogFormat::Text),
    ("keyvalue", LogFormat::KeyValue),
    ("json", LogFormat::Json),
];

pub(super) const KEYS: &[Key<OrchestratorConfig>] = &[
    Key::new(
        "services_dir",
        "the directory holding NAME/NAME service binaries",
        |cx, f, out| set(&mut out.services_dir, cx.path(&f.path, f.value, f.base_dir)),
    ),
    Key::new(
        "data_dir",
        "where state, logs and the control socket live",
        |cx, f, out| set(&mut out.data_dir, cx.path(&f.path, f.value, f.base_dir)),
    ),
    Key::new(
        "auto_restart",
        "the default restart policy: true for always, false for never",
        |cx, f, out| set(&mut out.auto_restart, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "shutdown_timeout",
        "how long a stopping service gets before SIGKILL, by default",
        |cx, f, out| set(&mut out.shutdown_timeout, cx.duration(&f.path, f.value)),
    ),
    Key::new(
        "log_level",
        "the daemon's verbosity: error, warn, info, debug or trace",
        |cx, f, out| set(&mut out.log_level, cx.choice(&f.path, f.value, LOG_LEVELS)),
    ),
    Key::new(
        "log_format",
        "the daemon's log format: text, keyvalue or json",
        |cx, f, out| {
            set(
                &mut out.log_format,
                cx.choice(&f.path, f.value, LOG_FORMATS),
            )
        },
    ),
    Key::new(
        "start_discovered",
        "whether discovered binaries without a section run",
        |cx, f, out| set(&mut out.start_discovered, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "restart_on_binary_change",
        "whether a reload restarts a service whose binary was replaced",
        |cx, f, out| {
            set(
                &mut out.restart_on_binary_change,
                cx.boolean(&f.path, f.value),
            )
        },
    ),
    Key::new(
        "log_max_bytes",
        "the size at which a service's log file is rotated",
        |cx, f, out| {
            let bytes = cx.integer_in(&f.path, f.value, 1, i64::MAX, "a positive number of bytes");
            set(&mut out.log_max_bytes, bytes.map(i64::unsigned_abs));
        },
    ),
    Key::new(
        "log_max_files",
        "how many rotated log files are kept",
        |cx, f, out| {
            let files = cx.integer_in(&f.path, f.value, 0, 1000, "a number from 0 to 1000");
            set(
                &mut out.log_max_files,
                files.and_then(|files| u32::try_from(files).ok()),
            );
        },
    ),
    Key::new(
        "log_timestamps",
        "whether log file lines get a timestamp and stream prefix (and starts a marker line)",
        |cx, f, out| set(&mut out.log_timestamps, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "log_max_age",
        "the age at which a service's log file is rotated, e.g. \"1d\"",
        |cx, f, out| {
            let age = cx.positive_duration(&f.path, f.value, "would rotate on every write", "1d");
            if age.is_some() {
                out.log_max_age = age;
            }
        },
    ),
    Key::new(
        "log_compress",
        "whether rotated log files are gzipped (NAME.log.1.gz)",
        |cx, f, out| set(&mut out.log_compress, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "state_max_bytes",
        "the largest data_dir/state file read at start; a larger one is ignored as corrupt",
        |cx, f, out| {
            let bytes = cx.integer_in(
                &f.path,
                f.value,
                4096,
                1 << 32,
                "a number of bytes from 4096 to 4294967296",
            );
            set(&mut out.state_max_bytes, bytes.map(i64::unsigned_abs));
        },
    ),
    Key::new(
        "http_listen",
        "IP:PORT for the TCP control API and /metrics",
        |cx, f, out| {
            let Some(text) = cx.string(&f.path, f.value) else {
                return;
            };
            match text.parse::<SocketAddr>() {
                Ok(addr) => out.http_listen = Some(addr),
                Err(_) => cx.report(
                    f.value.span(),
                    &f.path,
                    format!(
                        "invalid address {text:?}; use IP:PORT, e.g. \"127.0.0.1:9800\" or \"[::1]:9800\""
                    ),
                ),
            }
        },
    ),
    Key::new(
        "http_token_file",
        "the file holding the token the TCP API requires",
        |cx, f, out| {
            if let Some(file) = cx.path(&f.path, f.value, f.base_dir) {
                if let Err(message) = check_token_file(&file) {
                    cx.report(f.value.span(), &f.path, message);
                }
                out.http_token_file = Some(file);
            }
        },
    ),
    Key::new(
        "api_max_connections",
        "open API connections allowed per listener; more are refused at once",
        |cx, f, out| {
            let count = cx.integer_in(&f.path, f.value, 1, 65536, "a number from 1 to 65536");
            set(
                &mut out.api_max_connections,
                count.and_then(|count| usize::try_from(count).ok()),
            );
        },
    ),
    Key::new(
        "api_header_timeout",
        "how long an API client has to send a request's headers",
        |cx, f, out| {
            set(
                &mut out.api_header_timeout,
                positive_duration(cx, f.value, &f.path),
            )
        },
    ),
    Key::new(
        "api_idle_timeout",
        "how long an API answer may wait on a client that does not read it",
        |cx, f, out| {
            set(
                &mut out.api_idle_timeout,
                positive_duration(cx, f.value, &f.path),
            )
        },
    ),
    Key::new(
        "watch",
        "whether changes to the config file and services_dir trigger a reload",
        |cx, f, out| set(&mut out.watch, cx.boolean(&f.path, f.value)),
    ),
    Key::new(
        "cgroup_parent",
        "the cgroup, relative to the daemon's own, under which each service gets NAME",
        |cx, f, out| {
            let Some(text) = cx.string(&f.path, f.value) else {
                return;
            };
            match cgroup_parent(text) {
                Ok(parent) => out.cgroup_parent = parent,
                Err(message) => cx.report(f.value.span(), &f.path, message),
            }
        },
    ),
    Key::new(
        "require_limits",
        "whether a limit that cannot be enforced fails the start instead of a warning",
        |cx, f, out| set(&mut out.require_limits, cx.boolean(&f.path, f.value)),
    ),
];

/// A zero timeout would close every connection at once: refused.
fn positive_duration(
    cx: &mut Cx<'_>,
    value: &super::cx::Value<'_>,
    path: &str,
) -> Option<std::time::Duration> {
    let duration = cx.duration(path, value)?;
    if duration.is_zero() {
        cx.report(
            value.span(),
            path,
            "a zero timeout would close every connection at once; use e.g. \"10s\"",
        );
        return None;
    }
    Some(duration)
}

/// Longest name a cgroup (a directory of cgroupfs) may have, in bytes.
const MAX_CGROUP_NAME: usize = 255;

/// `cgroup_parent` as a path below the daemon's own cgroup: plain names
/// joined by single slashes, so that it can neither climb out of the
/// daemon's cgroup (`..`, an absolute path) nor mean something other than
/// what it says (`.`, empty parts the kernel would collapse).
fn cgroup_parent(text: &str) -> Result<PathBuf, String> {
    const WHY: &str = "cgroup_parent is relative to the daemon's own cgroup";
    const EXAMPLE: &str = "e.g. \"orchestrator\" or \"orchestrator/web\"";
    if text.is_empty() {
        return Err(format!(
            "empty cgroup_parent; {WHY}: name it, {EXAMPLE}, or remove the key for the default"
        ));
    }
    if text.starts_with('/') {
        return Err(format!(
            "{text:?} is an absolute path, but {WHY} (services must stay inside it); \
             drop the leading '/', {EXAMPLE}"
        ));
    }
    for part in text.split('/') {
        let problem = match part {
            "" => "an empty part (a doubled or trailing '/')".to_owned(),
            "." | ".." => format!("a {part:?} part"),
            _ if part.chars().any(char::is_control) => {
                // The kernel refuses a newline in a cgroup's name, and
                // /proc/PID/cgroup (one cgroup a line) could not show it.
                "a control character (a newline, a tab...)".to_owned()
            }
            _ if part.len() > MAX_CGROUP_NAME => format!(
                "a part of {} bytes, longer than a cgroup's name may be ({MAX_CGROUP_NAME})",
                part.len()
            ),
            _ => continue,
        };
        return Err(format!(
            "{text:?} has {problem}; {WHY}, so it must be plain names joined by single '/', \
             {EXAMPLE}"
        ));
    }
    Ok(PathBuf::from(text))
}

/// Reads `[orchestrator]` into `out`, then checks what no single key can.
pub(super) fn read(
    cx: &mut Cx<'_>,
    table: &DeTable<'_>,
    base_dir: &Path,
    out: &mut OrchestratorConfig,
) {
    cx.section(
        table,
        "orchestrator",
        "in [orchestrator]",
        KEYS,
        base_dir,
        out,
    );
    if let Some((listen, _)) = table.get_key_value("http_listen")
        && !table.contains_key("http_token_file")
    {
        cx.report(
            listen.span(),
            "orchestrator.http_listen",
            "http_listen needs http_token_file: anyone who can reach the port could control every service; write a token to a file (mode 0600) and set http_token_file",
        );
    }
}

/// The token file must exist, hold a token, and be readable by its owner
/// only: a token others can read protects nothing.
fn check_token_file(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let metadata = fs::metadata(path).map_err(|e| {
        format!("cannot read token file {shown}: {e}; create it with a random token and mode 0600")
    })?;
    if !metadata.is_file() {
        return Err(format!(
            "token file {shown} is not a regular file; point http_token_file at a file holding the token"
        ));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {shown} is readable by others (mode {mode:o}); run chmod 600 on it"
        ));
    }
    let token = fs::read_to_string(path).map_err(|e| {
        format!(
            "cannot read token file {shown}: {e}; make it a readable text file holding the token"
        )
    })?;
    if token.trim().is_empty() {
        return Err(format!(
            "token file {shown} is empty; write a random token into it"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::load::parse;
    use crate::config::load::test_support::*;

    #[test]
    fn state_max_bytes_defaults_to_64_mib_and_is_bounded() {
        let config = ok("[orchestrator]\n");
        assert_eq!(config.orchestrator.state_max_bytes, 64 * 1024 * 1024);
        assert!(config.orchestrator.watch, "watching is on by default");
        let config = ok("[orchestrator]\nstate_max_bytes = 8192\n");
        assert_eq!(config.orchestrator.state_max_bytes, 8192);
        assert!(
            parse(
                "[orchestrator]\nstate_max_bytes = 100\n",
                None,
                Path::new("/etc")
            )
            .is_err()
        );
    }

    #[test]
    fn full_orchestrator_section() {
        let config = ok(r#"
[orchestrator]
services_dir = "svc"
data_dir = "/var/lib/orch"
auto_restart = false
shutdown_timeout = "2m"
log_level = "debug"
log_format = "json"
start_discovered = false
log_max_bytes = 1024
log_max_files = 0
api_max_connections = 8
api_header_timeout = "2s"
api_idle_timeout = "1m"
watch = false
"#);
        let orchestrator = config.orchestrator;
        assert_eq!(orchestrator.services_dir, Path::new("/base/dir/svc"));
        assert_eq!(orchestrator.data_dir, Path::new("/var/lib/orch"));
        assert!(!orchestrator.auto_restart);
        assert_eq!(orchestrator.shutdown_timeout, Duration::from_secs(120));
        assert_eq!(orchestrator.log_level, LogLevel::Debug);
        assert_eq!(orchestrator.log_format, LogFormat::Json);
        assert!(!orchestrator.start_discovered);
        assert_eq!(orchestrator.log_max_bytes, 1024);
        assert_eq!(orchestrator.log_max_files, 0);
        assert_eq!(orchestrator.api_max_connections, 8);
        assert_eq!(orchestrator.api_header_timeout, Duration::from_secs(2));
        assert_eq!(orchestrator.api_idle_timeout, Duration::from_secs(60));
        assert!(!orchestrator.watch);
    }

    #[test]
    fn log_file_options_global_and_per_service() {
        let config = ok("[orchestrator]\n[services.api]\n");
        let (orchestrator, api) = (&config.orchestrator, &config.services["api"]);
        assert!(!orchestrator.log_timestamps && !orchestrator.log_compress);
        assert_eq!((orchestrator.log_max_age, api.log_max_age), (None, None));
        assert_eq!(api.log_timestamps, None);
        let config = ok(
            "[orchestrator]\nlog_timestamps = true\nlog_max_age = \"1d\"\n\
             log_compress = true\nlog_format = \"keyvalue\"\n\
             [services.api]\nlog_timestamps = false\nlog_max_age = \"1h\"\n",
        );
        let (orchestrator, api) = (&config.orchestrator, &config.services["api"]);
        assert!(orchestrator.log_timestamps && orchestrator.log_compress);
        assert_eq!(orchestrator.log_format, LogFormat::KeyValue);
        assert_eq!(orchestrator.log_max_age, Some(Duration::from_secs(86_400)));
        assert_eq!(api.log_timestamps, Some(false));
        assert_eq!(api.log_max_age, Some(Duration::from_secs(3600)));

        let cases = [
            (
                "[orchestrator]\nlog_max_age = \"0s\"",
                "orchestrator.log_max_age",
                "0 would rotate",
            ),
            (
                "[orchestrator]\nlog_max_age = -5",
                "orchestrator.log_max_age",
                "negative",
            ),
            (
                "[orchestrator]\nlog_timestamps = \"yes\"",
                "orchestrator.log_timestamps",
                "a boolean",
            ),
            (
                "[orchestrator]\nlog_compress = 1",
                "orchestrator.log_compress",
                "a boolean",
            ),
            (
                "[services.api]\nlog_max_age = 0",
                "services.api.log_max_age",
                "0 would rotate",
            ),
            (
                "[services.api]\nlog_timestamps = 1",
                "services.api.log_timestamps",
                "a boolean",
            ),
            (
                "[orchestrator]\nlog_format = \"full\"",
                "orchestrator.log_format",
                "keyvalue",
            ),
        ];
        for (text, key, says) in cases {
            let message = one_problem(text, 2, key);
            assert!(message.contains(says), "{text}: {message}");
        }
    }

    #[test]
    fn cgroup_parent_and_require_limits() {
        let config = ok("[orchestrator]\n");
        assert_eq!(config.orchestrator.cgroup_parent, Path::new("orchestrator"));
        assert!(!config.orchestrator.require_limits);
        let config =
            ok("[orchestrator]\ncgroup_parent = \"apps.slice/orch-1\"\nrequire_limits = true\n");
        assert_eq!(
            config.orchestrator.cgroup_parent,
            Path::new("apps.slice/orch-1")
        );
        assert!(config.orchestrator.require_limits);

        let key = "orchestrator.cgroup_parent";
        let why = "cgroup_parent is relative to the daemon's own cgroup";
        let long = "x".repeat(256);
        let cases: &[(&str, &[&str])] = &[
            (
                "/sys/fs/cgroup/orch",
                &[
                    "\"/sys/fs/cgroup/orch\" is an absolute path",
                    why,
                    "drop the leading '/'",
                ],
            ),
            (
                "",
                &["empty cgroup_parent", why, "remove the key for the default"],
            ),
            (
                "a//b",
                &["has an empty part (a doubled or trailing '/')", why],
            ),
            ("a/", &["has an empty part"]),
            (
                "..",
                &["has a \"..\" part", why, "plain names joined by single '/'"],
            ),
            ("orch/../..", &["has a \"..\" part"]),
            ("./orch", &["has a \".\" part"]),
            ("a\\nb", &["has a control character"]),
            (
                &long,
                &["a part of 256 bytes, longer than a cgroup's name may be (255)"],
            ),
        ];
        for &(value, parts) in cases {
            let text = format!("[orchestrator]\ncgroup_parent = \"{value}\"\n");
            let message = one_problem(&text, 2, key);
            for part in parts {
                assert!(
                    message.contains(part),
                    "{value:?}: {message}\nlacks {part:?}"
                );
            }
        }
        let message = one_problem("[orchestrator]\ncgroup_parent = 1\n", 2, key);
        assert!(
            message.contains("expected a string, found integer"),
            "{message}"
        );
        let message = one_problem(
            "[orchestrator]\nrequire_limits = \"yes\"\n",
            2,
            "orchestrator.require_limits",
        );
        assert!(message.contains("expected a boolean"), "{message}");
    }

    #[test]
    fn api_limits_refuse_zero() {
        let message = one_problem(
            "[orchestrator]\napi_header_timeout = 0\n",
            2,
            "orchestrator.api_header_timeout",
        );
        assert!(message.contains("zero timeout"), "{message}");
        one_problem(
            "[orchestrator]\napi_max_connections = 0\n",
            2,
            "orchestrator.api_max_connections",
        );
    }

    #[test]
    fn http_listen_needs_a_private_token_file() {
        let message = one_problem(
            "[orchestrator]\nhttp_listen = \"127.0.0.1:9800\"\n",
            2,
            "orchestrator.http_listen",
        );
        assert!(message.contains("needs http_token_file"), "{message}");
        let found = problems("[orchestrator]\nhttp_listen = \"localhost\"\n");
        assert!(
            found.iter().any(|p| p.message.contains("use IP:PORT")),
            "{found:?}"
        );

        let dir = std::env::temp_dir().join(format!("orchestrator-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        let text =
            "[orchestrator]\nhttp_listen = \"127.0.0.1:9800\"\nhttp_token_file = \"token\"\n";
        let missing = parse(text, None, &dir).unwrap_err();
        assert!(
            missing.problems[0]
                .message
                .contains("cannot read token file")
        );
        std::fs::write(&token, "secret\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let open = parse(text, None, &dir).unwrap_err();
        assert_eq!(open.problems[0].line, Some(3));
        assert!(open.problems[0].message.contains("chmod 600"), "{open}");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = parse(text, None, &dir).unwrap();
        assert_eq!(
            config.orchestrator.http_listen,
            Some("127.0.0.1:9800".parse().unwrap())
        );
        assert_eq!(config.orchestrator.http_token_file, Some(token));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
