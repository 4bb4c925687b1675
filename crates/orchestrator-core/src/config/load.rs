//! Reading the configuration: TOML parsed with byte spans, then walked by hand
//! rather than through serde, so that every problem is reported at once with
//! its line, column and dotted key instead of stopping at the first one.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::{ConfigErrors, ConfigProblem};
use super::model::{
    BackoffConfig, Config, LogFormat, LogLevel, OrchestratorConfig, RestartPolicy, ServiceConfig,
};
use crate::name::ServiceName;

const CONFIG_ENV: &str = "ORCHESTRATOR_CONFIG";
const DEFAULT_FILE: &str = "orchestrator.toml";

const TOP_KEYS: &[&str] = &["orchestrator", "services"];
const ORCHESTRATOR_KEYS: &[&str] = &[
    "services_dir",
    "data_dir",
    "auto_restart",
    "shutdown_timeout",
    "log_level",
    "log_format",
    "start_discovered",
    "log_max_bytes",
    "log_max_files",
    "http_listen",
    "http_token_file",
];
const SERVICE_KEYS: &[&str] = &[
    "enabled",
    "binary_path",
    "command",
    "args",
    "data_dir",
    "environment",
    "memory_limit",
    "stop_signal",
    "stop_timeout",
    "restart",
    "max_restarts",
    "backoff",
];
const BACKOFF_KEYS: &[&str] = &["initial", "max", "reset_after"];

// Keys of the contract that later versions implement. Naming them apart from
// typos tells the user the file is right but this binary is too old for it.
const ORCHESTRATOR_LATER: &[&str] = &[];
const SERVICE_LATER: &[&str] = &[
    "cpu_limit",
    "pids_limit",
    "rlimits",
    "user",
    "sha256",
    "depends_on",
    "health",
];

const LOG_LEVELS: &[(&str, LogLevel)] = &[
    ("error", LogLevel::Error),
    ("warn", LogLevel::Warn),
    ("info", LogLevel::Info),
    ("debug", LogLevel::Debug),
    ("trace", LogLevel::Trace),
];
const LOG_FORMATS: &[(&str, LogFormat)] = &[("text", LogFormat::Text), ("json", LogFormat::Json)];
const RESTART_POLICIES: &[(&str, RestartPolicy)] = &[
    ("always", RestartPolicy::Always),
    ("on-failure", RestartPolicy::OnFailure),
    ("never", RestartPolicy::Never),
];

/// Anything longer is surely a typo, and capping it keeps `Instant + Duration`
/// arithmetic elsewhere from overflowing.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);
const DURATION_HINT: &str =
    r#"use an integer number of seconds or a string like "500ms", "30s", "2m", "1h""#;

/// memory_limit is turned into bytes (cgroup, GOMEMLIMIT); this keeps that
/// product inside an i64.
const MAX_MEMORY_MIB: i64 = i64::MAX >> 20;

/// Parse `text`, the contents of `file`, whose relative paths resolve against
/// `base_dir` (made absolute against the current directory if it is not).
/// Every problem is reported, sorted by line; `file` is only used to name them
/// and as `Config::source`.
pub fn parse(text: &str, file: Option<&Path>, base_dir: &Path) -> Result<Config, ConfigErrors> {
    let base_dir = absolute_dir(base_dir);
    let mut cx = Cx::new(text, file);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(err) => {
            cx.syntax_error(&err);
            return Err(cx.into_errors());
        }
    };
    let config = cx.document(root.get_ref(), &base_dir);
    if cx.problems.is_empty() {
        Ok(config)
    } else {
        Err(cx.into_errors())
    }
}

/// Find and load the configuration: `explicit` (from `--config`), else
/// `$ORCHESTRATOR_CONFIG`, else `./orchestrator.toml`. Only that last one may
/// be missing, which means zero-config: defaults in the current directory and
/// `source: None`. The file named in `Config::source` and in problems is
/// absolute, canonicalised when possible.
pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigErrors> {
    let cwd = std::env::current_dir().map_err(|err| {
        single_problem(
            None,
            None,
            format!(
                "cannot determine the current directory: {err}; \
                 run orchestrator from an existing directory"
            ),
        )
    })?;
    load_from(explicit, std::env::var_os(CONFIG_ENV), &cwd)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Flag,
    Env,
    Default,
}

/// `load` with its process-global inputs passed in, so tests need neither
/// `set_var` nor `set_current_dir` (both would race other tests).
fn load_from(
    explicit: Option<&Path>,
    env: Option<OsString>,
    cwd: &Path,
) -> Result<Config, ConfigErrors> {
    let (path, origin) = match (explicit, env.filter(|value| !value.is_empty())) {
        (Some(path), _) => (cwd.join(path), Origin::Flag),
        (None, Some(value)) => (cwd.join(PathBuf::from(value)), Origin::Env),
        (None, None) => (cwd.join(DEFAULT_FILE), Origin::Default),
    };
    let path = normalize(&path);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == io::ErrorKind::NotFound && origin == Origin::Default => {
            tracing::debug!(
                path = %path.display(),
                "no configuration file; using zero-config defaults"
            );
            return Ok(Config {
                source: None,
                orchestrator: OrchestratorConfig::defaults_in(cwd),
                services: BTreeMap::new(),
            });
        }
        Err(err) => {
            let message = match origin {
                Origin::Env => format!(
                    "cannot read: {err} (named by ${CONFIG_ENV}); \
                     pass an existing file with --config or fix ${CONFIG_ENV}"
                ),
                Origin::Flag | Origin::Default => {
                    format!("cannot read: {err}; pass an existing file with --config")
                }
            };
            return Err(single_problem(Some(path), None, message));
        }
    };
    let path = fs::canonicalize(&path).unwrap_or(path);
    let base_dir = path.parent().unwrap_or(cwd).to_path_buf();
    let text = match String::from_utf8(bytes) {
        Ok(text) => text,
        Err(err) => {
            let valid = &err.as_bytes()[..err.utf8_error().valid_up_to()];
            let line = valid.iter().filter(|&&byte| byte == b'\n').count() + 1;
            return Err(single_problem(
                Some(path),
                Some(line),
                "the file is not valid UTF-8; save it as UTF-8 text".to_owned(),
            ));
        }
    };
    parse(&text, Some(&path), &base_dir)
}

fn single_problem(file: Option<PathBuf>, line: Option<usize>, message: String) -> ConfigErrors {
    ConfigErrors {
        problems: vec![ConfigProblem {
            file,
            line,
            column: None,
            key: String::new(),
            message,
        }],
    }
}

/// Where problems are collected while the document is walked.
struct Cx<'t> {
    text: &'t str,
    /// Byte offset of the start of every line, for offset → line/column.
    line_starts: Vec<usize>,
    file: Option<PathBuf>,
    problems: Vec<ConfigProblem>,
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
        return Err(format!("token file {shown} is not a regular file"));
    }
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "token file {shown} is readable by others (mode {mode:o}); run chmod 600 on it"
        ));
    }
    let token =
        fs::read_to_string(path).map_err(|e| format!("cannot read token file {shown}: {e}"))?;
    if token.trim().is_empty() {
        return Err(format!(
            "token file {shown} is empty; write a random token into it"
        ));
    }
    Ok(())
}

type Value<'i> = Spanned<DeValue<'i>>;
type Key<'i> = Spanned<toml::de::DeString<'i>>;

impl<'t> Cx<'t> {
    fn new(text: &'t str, file: Option<&Path>) -> Self {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(index, _)| index + 1))
            .collect();
        Cx {
            text,
            line_starts,
            file: file.map(Path::to_path_buf),
            problems: Vec::new(),
        }
    }

    fn into_errors(mut self) -> ConfigErrors {
        // Stable, so problems on one line keep the order they were found in.
        self.problems
            .sort_by_key(|problem| (problem.line.unwrap_or(0), problem.column.unwrap_or(0)));
        ConfigErrors {
            problems: self.problems,
        }
    }

    /// 1-based line and column (in characters, as editors count) of a byte offset.
    fn position(&self, offset: usize) -> (usize, usize) {
        // Never 0: the first line starts at offset 0.
        let line = self.line_starts.partition_point(|&start| start <= offset);
        let start = self.line_starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset.saturating_sub(start), |prefix| {
                prefix.chars().count()
            });
        (line, column + 1)
    }

    fn report(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = self.position(span.start);
        self.problems.push(ConfigProblem {
            file: self.file.clone(),
            line: Some(line),
            column: Some(column),
            key: key.to_owned(),
            message: message.into(),
        });
    }

    fn syntax_error(&mut self, err: &toml::de::Error) {
        let message = format!("invalid TOML: {}", err.message().trim_end());
        match err.span() {
            Some(span) => self.report(span, "", message),
            None => self.problems.push(ConfigProblem {
                file: self.file.clone(),
                line: None,
                column: None,
                key: String::new(),
                message,
            }),
        }
    }

    fn mismatch(&mut self, path: &str, value: &Value<'_>, expected: &str) {
        let found = value.get_ref().type_str();
        self.report(
            value.span(),
            path,
            format!("expected {expected}, found {found}"),
        );
    }

    fn unknown(&mut self, path: &str, key: &Key<'_>, section: &str, valid: &[&str]) {
        let name: &str = key.get_ref();
        let mut message = format!("unknown key {name:?} {section}; ");
        if let Some(close) = closest(name, valid) {
            message.push_str(&format!("did you mean {close:?}? "));
        }
        message.push_str("valid keys: ");
        message.push_str(&valid.join(", "));
        self.report(key.span(), path, message);
    }

    fn not_yet(&mut self, path: &str, key: &Key<'_>) {
        let name: &str = key.get_ref();
        self.report(
            key.span(),
            path,
            format!("{name:?} is not supported yet by this version; remove it"),
        );
    }

    fn document(&mut self, root: &DeTable<'_>, base_dir: &Path) -> Config {
        let mut orchestrator = OrchestratorConfig::defaults_in(base_dir);
        let mut services = BTreeMap::new();
        for (key, value) in root.iter() {
            let name: &str = key.get_ref();
            let path = join_key("", name);
            match name {
                "orchestrator" => match value.get_ref() {
                    DeValue::Table(table) => self.orchestrator(table, base_dir, &mut orchestrator),
                    _ => self.mismatch(&path, value, "a table [orchestrator]"),
                },
                "services" => match value.get_ref() {
                    DeValue::Table(table) => self.services(table, base_dir, &mut services),
                    _ => self.mismatch(&path, value, "a table of services [services.NAME]"),
                },
                _ => self.unknown(&path, key, "at the top level", TOP_KEYS),
            }
        }
        Config {
            source: self.file.clone(),
            orchestrator,
            services,
        }
    }

    fn orchestrator(&mut self, table: &DeTable<'_>, base_dir: &Path, out: &mut OrchestratorConfig) {
        let mut listen_span = None;
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let path = join_key("orchestrator", name);
            match name {
                "services_dir" => {
                    if let Some(dir) = self.path(&path, value, base_dir) {
                        out.services_dir = dir;
                    }
                }
                "data_dir" => {
                    if let Some(dir) = self.path(&path, value, base_dir) {
                        out.data_dir = dir;
                    }
                }
                "auto_restart" => {
                    if let Some(flag) = self.boolean(&path, value) {
                        out.auto_restart = flag;
                    }
                }
                "shutdown_timeout" => {
                    if let Some(timeout) = self.duration(&path, value) {
                        out.shutdown_timeout = timeout;
                    }
                }
                "log_level" => {
                    if let Some(level) = self.choice(&path, value, LOG_LEVELS) {
                        out.log_level = level;
                    }
                }
                "log_format" => {
                    if let Some(format) = self.choice(&path, value, LOG_FORMATS) {
                        out.log_format = format;
                    }
                }
                "start_discovered" => {
                    if let Some(flag) = self.boolean(&path, value) {
                        out.start_discovered = flag;
                    }
                }
                "log_max_bytes" => {
                    let bytes =
                        self.integer_in(&path, value, 1, i64::MAX, "a positive number of bytes");
                    if let Some(bytes) = bytes {
                        out.log_max_bytes = bytes.unsigned_abs();
                    }
                }
                "log_max_files" => {
                    let files = self.integer_in(&path, value, 0, 1000, "a number from 0 to 1000");
                    if let Some(files) = files.and_then(|files| u32::try_from(files).ok()) {
                        out.log_max_files = files;
                    }
                }
                "http_listen" => {
                    listen_span = Some(key.span());
                    if let Some(text) = self.string(&path, value) {
                        match text.parse::<std::net::SocketAddr>() {
                            Ok(addr) => out.http_listen = Some(addr),
                            Err(_) => self.report(
                                value.span(),
                                &path,
                                format!(
                                    "invalid address {text:?}; use IP:PORT, e.g. \"127.0.0.1:9800\" or \"[::1]:9800\""
                                ),
                            ),
                        }
                    }
                }
                "http_token_file" => {
                    if let Some(file) = self.path(&path, value, base_dir) {
                        if let Err(message) = check_token_file(&file) {
                            self.report(value.span(), &path, message);
                        }
                        out.http_token_file = Some(file);
                    }
                }
                _ if ORCHESTRATOR_LATER.contains(&name) => self.not_yet(&path, key),
                _ => self.unknown(&path, key, "in [orchestrator]", ORCHESTRATOR_KEYS),
            }
        }
        if let Some(span) = listen_span
            && out.http_token_file.is_none()
            && !table.contains_key("http_token_file")
        {
            self.report(
                span,
                "orchestrator.http_listen",
                "http_listen needs http_token_file: anyone who can reach the port could control every service; write a token to a file (mode 0600) and set http_token_file",
            );
        }
    }

    fn services(
        &mut self,
        table: &DeTable<'_>,
        base_dir: &Path,
        out: &mut BTreeMap<ServiceName, ServiceConfig>,
    ) {
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let path = join_key("services", name);
            let valid_name = match ServiceName::parse(name) {
                Ok(name) => Some(name),
                Err(invalid) => {
                    self.report(key.span(), &path, invalid.to_string());
                    None
                }
            };
            let DeValue::Table(section) = value.get_ref() else {
                self.mismatch(&path, value, &format!("a table [{path}]"));
                continue;
            };
            // Walked even under an invalid name, so its other problems show up now.
            let service = self.service(&path, section, base_dir);
            if let Some(name) = valid_name {
                out.insert(name, service);
            }
        }
    }

    fn service(&mut self, prefix: &str, table: &DeTable<'_>, base_dir: &Path) -> ServiceConfig {
        let mut out = ServiceConfig::default();
        let mut command_key = None;
        let mut combined_with = Vec::new();
        for (key, value) in table.iter() {
            let name: &str = key.get_ref();
            let path = join_key(prefix, name);
            match name {
                "enabled" => {
                    if let Some(flag) = self.boolean(&path, value) {
                        out.enabled = flag;
                    }
                }
                "binary_path" => {
                    combined_with.push("\"binary_path\"");
                    out.binary_path = self.path(&path, value, base_dir);
                }
                "command" => {
                    command_key = Some((key.span(), path.clone()));
                    out.command = self.command(&path, value);
                }
                "args" => {
                    combined_with.push("\"args\"");
                    if let Some(args) = self.strings(&path, value) {
                        out.args = args;
                    }
                }
                "data_dir" => out.data_dir = self.path(&path, value, base_dir),
                "environment" => out.environment = self.environment(&path, value),
                "memory_limit" => {
                    let mib = self.integer_in(
                        &path,
                        value,
                        1,
                        MAX_MEMORY_MIB,
                        "a positive number of MiB",
                    );
                    out.memory_limit = mib.map(i64::unsigned_abs);
                }
                "stop_signal" => {
                    if let Some(signal) = self.signal(&path, value) {
                        out.stop_signal = signal;
                    }
                }
                "stop_timeout" => out.stop_timeout = self.duration(&path, value),
                "restart" => out.restart = self.choice(&path, value, RESTART_POLICIES),
                "max_restarts" => {
                    let max = self.integer_in(&path, value, 0, u32::MAX.into(), "0 or more");
                    if let Some(max) = max.and_then(|max| u32::try_from(max).ok()) {
                        out.max_restarts = max;
                    }
                }
                "backoff" => {
                    if let Some(backoff) = self.backoff(&path, value) {
                        out.backoff = backoff;
                    }
                }
                _ if SERVICE_LATER.contains(&name) => self.not_yet(&path, key),
                _ => self.unknown(&path, key, &format!("in [{prefix}]"), SERVICE_KEYS),
            }
        }
        if let Some((span, path)) = command_key
            && !combined_with.is_empty()
        {
            self.report(
                span,
                &path,
                format!(
                    "\"command\" is the exact argv and cannot be combined with {}; \
                     put the program and all its arguments in \"command\", or drop \"command\"",
                    combined_with.join(" or ")
                ),
            );
        }
        out
    }

    fn boolean(&mut self, path: &str, value: &Value<'_>) -> Option<bool> {
        let flag = value.get_ref().as_bool();
        if flag.is_none() {
            self.mismatch(path, value, "a boolean (true or false)");
        }
        flag
    }

    fn string<'v>(&mut self, path: &str, value: &'v Value<'_>) -> Option<&'v str> {
        let text = value.get_ref().as_str();
        if text.is_none() {
            self.mismatch(path, value, "a string");
        }
        text
    }

    fn integer(&mut self, path: &str, value: &Value<'_>) -> Option<i64> {
        let Some(integer) = value.get_ref().as_integer() else {
            self.mismatch(path, value, "an integer");
            return None;
        };
        let parsed = i64::from_str_radix(integer.as_str(), integer.radix()).ok();
        if parsed.is_none() {
            self.report(
                value.span(),
                path,
                format!("integer {integer} is too large; use a smaller number"),
            );
        }
        parsed
    }

    fn integer_in(
        &mut self,
        path: &str,
        value: &Value<'_>,
        min: i64,
        max: i64,
        expected: &str,
    ) -> Option<i64> {
        let integer = self.integer(path, value)?;
        if (min..=max).contains(&integer) {
            Some(integer)
        } else {
            self.report(
                value.span(),
                path,
                format!("{integer} is out of range; use {expected}"),
            );
            None
        }
    }

    fn choice<T: Copy>(
        &mut self,
        path: &str,
        value: &Value<'_>,
        options: &[(&str, T)],
    ) -> Option<T> {
        let text = self.string(path, value)?;
        let found = options
            .iter()
            .find(|(name, _)| *name == text)
            .map(|&(_, choice)| choice);
        if found.is_none() {
            let names: Vec<&str> = options.iter().map(|&(name, _)| name).collect();
            self.report(
                value.span(),
                path,
                format!("invalid value {text:?}; use one of {}", names.join(", ")),
            );
        }
        found
    }

    fn path(&mut self, path: &str, value: &Value<'_>, base_dir: &Path) -> Option<PathBuf> {
        let text = self.string(path, value)?;
        if text.is_empty() {
            self.report(
                value.span(),
                path,
                "empty path; write a path, or remove the key to use the default",
            );
            return None;
        }
        if text.contains('\0') {
            self.report(
                value.span(),
                path,
                "the path contains a NUL character; remove it",
            );
            return None;
        }
        Some(normalize(&base_dir.join(text)))
    }

    /// An array of strings none of which has a NUL, which no argv can carry.
    fn strings(&mut self, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
        let Some(items) = value.get_ref().as_array() else {
            self.mismatch(path, value, "an array of strings");
            return None;
        };
        let mut out = Vec::with_capacity(items.len());
        let mut ok = true;
        for (index, item) in items.iter().enumerate() {
            let item_path = format!("{path}[{index}]");
            match self.string(&item_path, item) {
                Some(text) if text.contains('\0') => {
                    self.report(
                        item.span(),
                        &item_path,
                        "contains a NUL character; remove it",
                    );
                    ok = false;
                }
                Some(text) => out.push(text.to_owned()),
                None => ok = false,
            }
        }
        ok.then_some(out)
    }

    fn command(&mut self, path: &str, value: &Value<'_>) -> Option<Vec<String>> {
        let argv = self.strings(path, value)?;
        match argv.first() {
            None => {
                self.report(
                    value.span(),
                    path,
                    "empty command; give the program and its arguments, e.g. [\"python3\", \"-m\", \"http.server\"]",
                );
                None
            }
            Some(program) if program.is_empty() => {
                self.report(
                    value.span(),
                    path,
                    "the program (first element of command) is empty; name the program to run",
                );
                None
            }
            Some(_) => Some(argv),
        }
    }

    fn environment(&mut self, path: &str, value: &Value<'_>) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        let Some(table) = value.get_ref().as_table() else {
            self.mismatch(
                path,
                value,
                "a table of strings, e.g. { API_MODE = \"prod\" }",
            );
            return out;
        };
        for (key, item) in table.iter() {
            let name: &str = key.get_ref();
            let item_path = join_key(path, name);
            let problem = if name.is_empty() {
                Some("empty environment variable name; give it a name")
            } else if name.contains('=') {
                Some("an environment variable name cannot contain '='; rename it")
            } else if name.contains('\0') {
                Some("an environment variable name cannot contain a NUL character; rename it")
            } else {
                None
            };
            if let Some(message) = problem {
                self.report(key.span(), &item_path, message);
            }
            let text = match item.get_ref() {
                DeValue::String(text) => text,
                DeValue::Integer(_) | DeValue::Float(_) | DeValue::Boolean(_) => {
                    let found = item.get_ref().type_str();
                    self.report(
                        item.span(),
                        &item_path,
                        format!("expected a string, found {found}; quote the value, e.g. PORT = \"8080\""),
                    );
                    continue;
                }
                _ => {
                    self.mismatch(&item_path, item, "a string");
                    continue;
                }
            };
            if text.contains('\0') {
                self.report(
                    item.span(),
                    &item_path,
                    "the value contains a NUL character; remove it",
                );
                continue;
            }
            if problem.is_none() {
                out.insert(name.to_owned(), text.to_string());
            }
        }
        out
    }

    fn signal(&mut self, path: &str, value: &Value<'_>) -> Option<Signal> {
        let Some(text) = value.get_ref().as_str() else {
            self.mismatch(path, value, "a signal name like \"SIGTERM\"");
            return None;
        };
        let signal = parse_signal(text);
        if signal.is_none() {
            self.report(
                value.span(),
                path,
                format!(
                    "unknown signal {text:?}; use a signal name like \"SIGTERM\", \"SIGINT\", \"SIGQUIT\" or \"SIGHUP\""
                ),
            );
        }
        signal
    }

    fn duration(&mut self, path: &str, value: &Value<'_>) -> Option<Duration> {
        let result = match value.get_ref() {
            DeValue::Integer(_) => {
                let seconds = self.integer(path, value)?;
                match u64::try_from(seconds) {
                    Err(_) => Err(format!(
                        "negative duration {seconds}; durations cannot be negative, {DURATION_HINT}"
                    )),
                    Ok(seconds) if seconds > MAX_DURATION.as_secs() => Err(format!(
                        "duration of {seconds} seconds is longer than 100 years; {DURATION_HINT}"
                    )),
                    Ok(seconds) => Ok(Duration::from_secs(seconds)),
                }
            }
            DeValue::Float(float) => Err(format!(
                "expected a duration, found float {float}; write seconds as an integer or a string like \"1.5s\""
            )),
            DeValue::String(text) => parse_duration(text)
                .map_err(|reason| format!("invalid duration {text:?} ({reason}); {DURATION_HINT}")),
            other => Err(format!(
                "expected a duration, found {}; {DURATION_HINT}",
                other.type_str()
            )),
        };
        match result {
            Ok(duration) => Some(duration),
            Err(message) => {
                self.report(value.span(), path, message);
                None
            }
        }
    }

    fn backoff(&mut self, path: &str, value: &Value<'_>) -> Option<BackoffConfig> {
        let Some(table) = value.get_ref().as_table() else {
            self.mismatch(
                path,
                value,
                "a table like { initial = \"1s\", max = \"30s\", reset_after = \"60s\" }",
            );
            return None;
        };
        let before = self.problems.len();
        let mut out = BackoffConfig::default();
        let mut max_span = None;
        for (key, item) in table.iter() {
            let name: &str = key.get_ref();
            let item_path = join_key(path, name);
            let slot = match name {
                "initial" => &mut out.initial,
                "max" => {
                    max_span = Some(item.span());
                    &mut out.max
                }
                "reset_after" => &mut out.reset_after,
                _ => {
                    self.unknown(&item_path, key, &format!("in {path}"), BACKOFF_KEYS);
                    continue;
                }
            };
            if let Some(duration) = self.duration(&item_path, item) {
                *slot = duration;
            }
        }
        // Comparing against a value that failed to parse would only add noise.
        if self.problems.len() != before {
            return None;
        }
        if out.max < out.initial {
            self.report(
                max_span.unwrap_or_else(|| value.span()),
                &join_key(path, "max"),
                format!(
                    "backoff max ({:?}) is shorter than initial ({:?}); raise max or lower initial",
                    out.max, out.initial
                ),
            );
            return None;
        }
        Some(out)
    }
}

/// Accepts "SIGTERM", "TERM" and "term": people write all three.
fn parse_signal(text: &str) -> Option<Signal> {
    let upper = text.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    Signal::from_str(&name).ok()
}

/// Units humantime knows whose length varies: "5M" (months) is too easily
/// meant as minutes, and no timeout here is measured in months or years.
const VAGUE_UNITS: &[&str] = &["M", "month", "months", "y", "yr", "yrs", "year", "years"];

/// A duration string in humantime's grammar: `NUMBER UNIT` parts, optionally
/// spaced ("1m30s", "1h 30m"), NUMBER may have a fraction ("1.5s"). Err is
/// the reason, worded for whoever wrote the file.
fn parse_duration(text: &str) -> Result<Duration, String> {
    if text.trim_start().starts_with('-') {
        return Err("durations cannot be negative".to_owned());
    }
    if let Some(unit) = text
        .split(|c: char| !c.is_alphabetic())
        .find(|word| VAGUE_UNITS.contains(word))
    {
        return Err(format!(
            "{unit:?} (months or years) has no fixed length; use d, h, m, s or ms"
        ));
    }
    // humantime 2.4 panics in Duration::new when the parts add up to exactly
    // u64::MAX seconds; a config file must never take the daemon down.
    let parsed = std::panic::catch_unwind(|| humantime::parse_duration(text))
        .unwrap_or(Err(humantime::DurationError::NumberOverflow));
    let duration = parsed.map_err(|err| duration_reason(text, err))?;
    if duration > MAX_DURATION {
        return Err("longer than 100 years".to_owned());
    }
    Ok(duration)
}

/// humantime's error, said with the offending part of `text` rather than a
/// byte offset.
fn duration_reason(text: &str, err: humantime::DurationError) -> String {
    use humantime::DurationError as E;
    let at = |offset: usize| {
        let rest = text.get(offset..).unwrap_or_default();
        let end = rest
            .char_indices()
            .nth(20)
            .map_or(rest.len(), |(end, _)| end);
        &rest[..end]
    };
    match err {
        E::Empty => "it is empty".to_owned(),
        E::NumberExpected(offset) => format!("expected a number at {:?}", at(offset)),
        E::InvalidCharacter(offset) => match at(offset).chars().next() {
            Some(bad) => format!("{bad:?} is not part of a number or a unit"),
            None => "it ends in the middle of a number".to_owned(),
        },
        E::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            format!("no unit after {value}")
        }
        E::UnknownUnit { unit, .. } => {
            format!("unknown unit {unit:?}, use d, h, m, s, ms, us or ns")
        }
        E::NumberOverflow => {
            "a number is too large (longer than 100 years) or finer than a nanosecond".to_owned()
        }
    }
}

/// Dotted key path, quoting segments TOML would not accept bare (so a service
/// named "a.b" stays distinguishable from a nested key).
fn join_key(prefix: &str, segment: &str) -> String {
    let bare = !segment.is_empty()
        && segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    let segment = if bare {
        segment.to_owned()
    } else {
        format!("{segment:?}")
    };
    if prefix.is_empty() {
        segment
    } else {
        format!("{prefix}.{segment}")
    }
}

/// A likely intended key for a typo, by edit distance.
fn closest<'a>(name: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|&candidate| (strsim::levenshtein(name, candidate), candidate))
        .filter(|&(distance, candidate)| distance <= 2 && distance < candidate.len())
        .min_by_key(|&(distance, _)| distance)
        .map(|(_, candidate)| candidate)
}

fn absolute_dir(dir: &Path) -> PathBuf {
    normalize(&std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()))
}

/// Drops `.` segments and doubled slashes; `..` stays, since resolving it
/// lexically would be wrong across symlinks.
fn normalize(path: &Path) -> PathBuf {
    path.components().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "/base/dir";

    fn ok(text: &str) -> Config {
        match parse(
            text,
            Some(Path::new("/base/dir/orchestrator.toml")),
            Path::new(BASE),
        ) {
            Ok(config) => config,
            Err(errors) => panic!("unexpected problems:\n{errors}"),
        }
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        match parse(
            text,
            Some(Path::new("/base/dir/orchestrator.toml")),
            Path::new(BASE),
        ) {
            Ok(config) => panic!("expected problems, got {config:#?}"),
            Err(errors) => errors.problems,
        }
    }

    /// The only problem of `text`, which must be at `line` and name `key`.
    fn one_problem(text: &str, line: usize, key: &str) -> String {
        let found = problems(text);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one problem, got {found:#?}"
        );
        assert_eq!(found[0].line, Some(line), "{found:#?}");
        assert_eq!(found[0].key, key, "{found:#?}");
        found[0].message.clone()
    }

    fn service(text: &str) -> ServiceConfig {
        let mut config = ok(text);
        config.services.remove("api").expect("service api")
    }

    #[test]
    fn empty_file_gives_defaults() {
        let config = ok("");
        assert_eq!(
            config.source.as_deref(),
            Some(Path::new("/base/dir/orchestrator.toml"))
        );
        assert_eq!(
            config.orchestrator,
            OrchestratorConfig::defaults_in(Path::new(BASE))
        );
        assert!(config.services.is_empty());
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
    fn relative_paths_resolve_against_base_dir() {
        let config = parse(
            "[orchestrator]\nservices_dir = \"./s\"\ndata_dir = \"../d\"\n[services.api]\nbinary_path = \"/abs/x\"\n",
            None,
            Path::new("/etc/orch/"),
        )
        .unwrap();
        assert_eq!(config.orchestrator.services_dir, Path::new("/etc/orch/s"));
        assert_eq!(config.orchestrator.data_dir, Path::new("/etc/orch/../d"));
        assert_eq!(
            config.services["api"].binary_path.as_deref(),
            Some(Path::new("/abs/x"))
        );
        assert_eq!(config.source, None);
    }

    #[test]
    fn relative_base_dir_becomes_absolute() {
        let config = parse("", None, Path::new("conf")).unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(config.orchestrator.services_dir, cwd.join("conf/services"));
        assert!(config.orchestrator.data_dir.is_absolute());
    }

    #[test]
    fn syntax_error_is_one_problem_with_position() {
        let found = problems("[orchestrator]\nauto_restart = true\nauto_restart = false\n");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (Some(3), Some(1)));
        assert!(
            found[0].message.starts_with("invalid TOML: "),
            "{}",
            found[0].message
        );
        assert!(found[0].message.contains("duplicate key"));

        let found = problems("[orchestrator]\nlog_level = info\n");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (Some(2), Some(13)));
    }

    #[test]
    fn unknown_keys_are_reported_at_their_line() {
        let message = one_problem("\n\nfoo = 1\n", 3, "foo");
        assert!(
            message.contains("unknown key \"foo\" at the top level"),
            "{message}"
        );
        assert!(
            message.contains("valid keys: orchestrator, services"),
            "{message}"
        );

        let message = one_problem(
            "[orchestrator]\nlog_levle = \"info\"\n",
            2,
            "orchestrator.log_levle",
        );
        assert!(message.contains("in [orchestrator]"), "{message}");
        assert!(message.contains("did you mean \"log_level\"?"), "{message}");

        let message = one_problem(
            "[services.api]\nenabled = true\n\nfoo = \"bar\"\n",
            4,
            "services.api.foo",
        );
        assert!(
            message.contains("unknown key \"foo\" in [services.api]"),
            "{message}"
        );
        assert!(
            message.contains("valid keys: enabled, binary_path"),
            "{message}"
        );

        let message = one_problem(
            "[services.api]\nbackoff = { initial = \"1s\", jitter = 3 }\n",
            2,
            "services.api.backoff.jitter",
        );
        assert!(
            message.contains("valid keys: initial, max, reset_after"),
            "{message}"
        );
    }

    #[test]
    fn unknown_key_column_counts_characters() {
        let found =
            problems("[services.api]\nenvironment = { \"é\" = \"x\" }\n[orchestrator]\n  zz = 1\n");
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].line, found[0].column), (Some(4), Some(3)));
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

    #[test]
    fn later_keys_are_not_supported_yet() {
        for key in SERVICE_LATER {
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
    fn wrong_types() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "orchestrator = 1",
                "orchestrator",
                "expected a table [orchestrator], found integer",
            ),
            ("services = []", "services", "found array"),
            (
                "[services]\napi = 1",
                "services.api",
                "expected a table [services.api], found integer",
            ),
            (
                "[orchestrator]\nauto_restart = \"yes\"",
                "orchestrator.auto_restart",
                "expected a boolean (true or false), found string",
            ),
            (
                "[orchestrator]\nservices_dir = 5",
                "orchestrator.services_dir",
                "expected a string, found integer",
            ),
            (
                "[orchestrator]\nlog_max_files = \"3\"",
                "orchestrator.log_max_files",
                "expected an integer, found string",
            ),
            (
                "[services.api]\nargs = \"--x\"",
                "services.api.args",
                "expected an array of strings, found string",
            ),
            (
                "[services.api]\nargs = [\"a\", 1]",
                "services.api.args[1]",
                "expected a string, found integer",
            ),
            (
                "[services.api]\nenvironment = [\"A=B\"]",
                "services.api.environment",
                "found array",
            ),
            (
                "[services.api]\nenvironment = { PORT = 8080 }",
                "services.api.environment.PORT",
                "quote the value",
            ),
            (
                "[services.api]\nstop_signal = 15",
                "services.api.stop_signal",
                "found integer",
            ),
            (
                "[services.api]\nbackoff = \"1s\"",
                "services.api.backoff",
                "found string",
            ),
            (
                "[services.api]\nstop_timeout = true",
                "services.api.stop_timeout",
                "expected a duration, found boolean",
            ),
            (
                "[services.api]\nstop_timeout = 1.5",
                "services.api.stop_timeout",
                "write seconds as an integer or a string like \"1.5s\"",
            ),
        ];
        for &(text, key, expected) in cases {
            let found = problems(text);
            assert_eq!(found.len(), 1, "{text}: {found:#?}");
            assert_eq!(found[0].key, key, "{text}");
            assert!(
                found[0].message.contains(expected),
                "{text}: {}",
                found[0].message
            );
        }
    }

    #[test]
    fn bad_values() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "[orchestrator]\nlog_level = \"verbose\"",
                "orchestrator.log_level",
                "invalid value \"verbose\"; use one of error, warn, info, debug, trace",
            ),
            (
                "[orchestrator]\nlog_format = \"xml\"",
                "orchestrator.log_format",
                "use one of text, json",
            ),
            (
                "[orchestrator]\nlog_max_bytes = 0",
                "orchestrator.log_max_bytes",
                "0 is out of range; use a positive number of bytes",
            ),
            (
                "[orchestrator]\nlog_max_files = 1001",
                "orchestrator.log_max_files",
                "out of range",
            ),
            (
                "[orchestrator]\nlog_max_files = -1",
                "orchestrator.log_max_files",
                "out of range",
            ),
            (
                "[orchestrator]\ndata_dir = \"\"",
                "orchestrator.data_dir",
                "empty path",
            ),
            (
                "[services.api]\nrestart = \"sometimes\"",
                "services.api.restart",
                "use one of always, on-failure, never",
            ),
            (
                "[services.api]\nstop_signal = \"SIGFOO\"",
                "services.api.stop_signal",
                "unknown signal \"SIGFOO\"",
            ),
            (
                "[services.api]\nstop_signal = \"\"",
                "services.api.stop_signal",
                "unknown signal",
            ),
            (
                "[services.api]\nmemory_limit = 0",
                "services.api.memory_limit",
                "positive number of MiB",
            ),
            (
                "[services.api]\nmemory_limit = 9223372036854775807",
                "services.api.memory_limit",
                "out of range",
            ),
            (
                "[services.api]\nmax_restarts = -1",
                "services.api.max_restarts",
                "out of range",
            ),
            (
                "[services.api]\nmax_restarts = 4294967296",
                "services.api.max_restarts",
                "out of range",
            ),
            (
                "[services.api]\ncommand = []",
                "services.api.command",
                "empty command",
            ),
            (
                "[services.api]\ncommand = [\"\", \"x\"]",
                "services.api.command",
                "first element",
            ),
            (
                "[services.api]\nargs = [\"a\\u0000b\"]",
                "services.api.args[0]",
                "NUL",
            ),
            (
                "[services.api]\nenvironment = { \"A=B\" = \"x\" }",
                "services.api.environment.\"A=B\"",
                "cannot contain '='",
            ),
            (
                "[services.api]\nenvironment = { \"\" = \"x\" }",
                "services.api.environment.\"\"",
                "empty environment variable name",
            ),
            (
                "[services.api]\nenvironment = { A = \"x\\u0000\" }",
                "services.api.environment.A",
                "NUL",
            ),
        ];
        for &(text, key, expected) in cases {
            let found = problems(text);
            assert_eq!(found.len(), 1, "{text}: {found:#?}");
            assert_eq!(found[0].key, key, "{text}");
            assert!(
                found[0].message.contains(expected),
                "{text}: {}",
                found[0].message
            );
        }
    }

    #[test]
    fn signal_names() {
        for (text, signal) in [
            ("SIGTERM", Signal::SIGTERM),
            ("TERM", Signal::SIGTERM),
            ("term", Signal::SIGTERM),
            ("sigusr1", Signal::SIGUSR1),
            ("SIGKILL", Signal::SIGKILL),
        ] {
            assert_eq!(parse_signal(text), Some(signal), "{text}");
        }
        for text in ["", "SIG", "15", "SIGFOO", " SIGTERM"] {
            assert_eq!(parse_signal(text), None, "{text}");
        }
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
    fn durations_table() {
        let good: &[(&str, Duration)] = &[
            ("0s", Duration::ZERO),
            ("200ms", Duration::from_millis(200)),
            ("1.5s", Duration::from_millis(1500)),
            ("30s", Duration::from_secs(30)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s4ms", Duration::from_millis(3_723_004)),
            ("0.5ms", Duration::from_micros(500)),
            ("876000h", Duration::from_secs(876_000 * 3600)),
            // humantime's grammar, wider than the hand-written one was.
            ("0", Duration::ZERO),
            ("5 s", Duration::from_secs(5)),
            ("1h 30m", Duration::from_secs(5400)),
            ("1d", Duration::from_secs(86_400)),
            ("2min 30sec", Duration::from_secs(150)),
            ("250us", Duration::from_micros(250)),
        ];
        for &(text, expected) in good {
            assert_eq!(parse_duration(text), Ok(expected), "{text}");
        }
        let bad: &[(&str, &str)] = &[
            ("", "empty"),
            ("-1s", "negative"),
            ("30", "no unit"),
            ("1m30", "no unit"),
            ("5x", "unknown unit \"x\""),
            ("5S", "unknown unit"),
            ("s", "expected a number at \"s\""),
            (".25s", "expected a number"),
            ("1..5s", "'.' is not part of a number or a unit"),
            (".s", "expected a number"),
            ("1.2.3s", "not part of a number"),
            ("1.s", "not part of a number"),
            ("5M", "no fixed length"),
            ("1 year", "no fixed length"),
            ("876001h", "longer than 100 years"),
            (
                "99999999999999999999999999999999999999999h",
                "longer than 100 years",
            ),
            ("1.000000000000000000009s", "finer than a nanosecond"),
            // Exactly u64::MAX seconds: humantime panics on it, we must not.
            ("18446744073709551615s 500ms 500ms", "too large"),
        ];
        for &(text, reason) in bad {
            let err = parse_duration(text).expect_err(text);
            assert!(err.contains(reason), "{text}: {err}");
        }
    }

    #[test]
    fn duration_values_in_the_file() {
        let config =
            ok("[orchestrator]\nshutdown_timeout = 0\n[services.api]\nstop_timeout = \"1.5s\"\n");
        assert_eq!(config.orchestrator.shutdown_timeout, Duration::ZERO);
        assert_eq!(
            config.services["api"].stop_timeout,
            Some(Duration::from_millis(1500))
        );
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = \"5x\"\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(
            message.starts_with("invalid duration \"5x\"")
                && message.ends_with(r#"use an integer number of seconds or a string like "500ms", "30s", "2m", "1h""#),
            "{message}"
        );
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = -5\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(message.contains("negative"), "{message}");
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = 4000000000\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(message.contains("longer than 100 years"), "{message}");
        let message = one_problem(
            "[orchestrator]\nshutdown_timeout = 99999999999999999999\n",
            2,
            "orchestrator.shutdown_timeout",
        );
        assert!(message.contains("too large"), "{message}");
    }

    #[test]
    fn hex_integers_are_understood() {
        let config = ok("[orchestrator]\nlog_max_bytes = 0x400\nshutdown_timeout = 0o10\n");
        assert_eq!(config.orchestrator.log_max_bytes, 1024);
        assert_eq!(config.orchestrator.shutdown_timeout, Duration::from_secs(8));
    }

    #[test]
    fn every_problem_is_reported_sorted_by_line() {
        let text = r#"
[services.web]
restart = "sometimes"
bogus = 1

[orchestrator]
log_level = "loud"
http_token_file = "t"

[services."a/b"]
stop_timeout = "5x"
backoff = { initial = "10s", max = "1s" }
"#;
        let found = problems(text);
        let got: Vec<(Option<usize>, &str)> = found
            .iter()
            .map(|problem| (problem.line, problem.key.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (Some(3), "services.web.restart"),
                (Some(4), "services.web.bogus"),
                (Some(7), "orchestrator.log_level"),
                (Some(8), "orchestrator.http_token_file"),
                (Some(10), "services.\"a/b\""),
                (Some(11), "services.\"a/b\".stop_timeout"),
                (Some(12), "services.\"a/b\".backoff.max"),
            ]
        );
        for problem in &found {
            assert_eq!(
                problem.file.as_deref(),
                Some(Path::new("/base/dir/orchestrator.toml"))
            );
        }
        let shown = ConfigErrors { problems: found }.to_string();
        assert!(
            shown.contains("/base/dir/orchestrator.toml:3:11: services.web.restart: invalid value"),
            "{shown}"
        );
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "orchestrator-load-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = fs::remove_dir_all(&path);
            fs::create_dir_all(&path).unwrap();
            TempDir(fs::canonicalize(&path).unwrap())
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn zero_config_without_a_file() {
        let dir = TempDir::new("zero");
        let config = load_from(None, None, &dir.0).unwrap();
        assert_eq!(config.source, None);
        assert_eq!(config.orchestrator, OrchestratorConfig::defaults_in(&dir.0));
        assert_eq!(config.orchestrator.services_dir, dir.0.join("services"));
        assert!(config.services.is_empty());
        // An empty variable counts as unset.
        assert!(load_from(None, Some(OsString::new()), &dir.0).is_ok());
    }

    #[test]
    fn default_file_in_cwd_is_loaded() {
        let dir = TempDir::new("default");
        fs::write(
            dir.0.join(DEFAULT_FILE),
            "[orchestrator]\nservices_dir = \"bin\"\n",
        )
        .unwrap();
        let config = load_from(None, None, &dir.0).unwrap();
        assert_eq!(config.source, Some(dir.0.join(DEFAULT_FILE)));
        assert_eq!(config.orchestrator.services_dir, dir.0.join("bin"));
    }

    #[test]
    fn explicit_and_env_paths() {
        let dir = TempDir::new("explicit");
        fs::create_dir(dir.0.join("etc")).unwrap();
        fs::write(
            dir.0.join("etc/a.toml"),
            "[services.api]\nbinary_path = \"api\"\n",
        )
        .unwrap();
        fs::write(dir.0.join("b.toml"), "[services.b]\n").unwrap();
        fs::write(dir.0.join(DEFAULT_FILE), "[services.c]\n").unwrap();

        // Relative to the current directory, and relative paths inside the
        // file against the file's own directory.
        let config = load_from(
            Some(Path::new("./etc/a.toml")),
            Some("b.toml".into()),
            &dir.0,
        )
        .unwrap();
        assert_eq!(config.source, Some(dir.0.join("etc/a.toml")));
        assert_eq!(
            config.services["api"].binary_path,
            Some(dir.0.join("etc/api"))
        );
        assert_eq!(config.orchestrator.services_dir, dir.0.join("etc/services"));

        let config = load_from(None, Some("b.toml".into()), &dir.0).unwrap();
        assert!(config.services.contains_key("b"));
        let config = load_from(None, None, &dir.0).unwrap();
        assert!(config.services.contains_key("c"));
    }

    #[test]
    fn missing_explicit_or_env_file_is_an_error() {
        let dir = TempDir::new("missing");
        let errors = load_from(Some(Path::new("nope.toml")), None, &dir.0).unwrap_err();
        assert_eq!(errors.problems.len(), 1);
        let problem = &errors.problems[0];
        assert_eq!(problem.file, Some(dir.0.join("nope.toml")));
        assert!(
            problem.message.starts_with("cannot read: "),
            "{}",
            problem.message
        );
        assert!(
            problem
                .message
                .ends_with("pass an existing file with --config"),
            "{}",
            problem.message
        );

        let errors = load_from(None, Some("gone.toml".into()), &dir.0).unwrap_err();
        let problem = &errors.problems[0];
        assert_eq!(problem.file, Some(dir.0.join("gone.toml")));
        assert!(
            problem.message.contains("$ORCHESTRATOR_CONFIG"),
            "{}",
            problem.message
        );
    }

    #[test]
    fn problems_name_the_canonical_file() {
        let dir = TempDir::new("canon");
        fs::create_dir(dir.0.join("real")).unwrap();
        fs::write(dir.0.join("real/o.toml"), "bad = 1\n").unwrap();
        std::os::unix::fs::symlink(dir.0.join("real/o.toml"), dir.0.join("link.toml")).unwrap();
        let errors = load_from(Some(Path::new("link.toml")), None, &dir.0).unwrap_err();
        assert_eq!(errors.problems[0].file, Some(dir.0.join("real/o.toml")));
        assert_eq!(errors.problems[0].line, Some(1));
    }

    #[test]
    fn invalid_utf8_is_reported_with_its_line() {
        let dir = TempDir::new("utf8");
        fs::write(dir.0.join("o.toml"), b"[orchestrator]\n# \xff\n").unwrap();
        let errors = load_from(Some(Path::new("o.toml")), None, &dir.0).unwrap_err();
        assert_eq!(errors.problems[0].line, Some(2));
        assert!(errors.problems[0].message.contains("UTF-8"));
    }

    #[test]
    fn key_paths_quote_odd_segments() {
        assert_eq!(join_key("", "services"), "services");
        assert_eq!(join_key("services", "a.b"), "services.\"a.b\"");
        assert_eq!(join_key("services", "api"), "services.api");
    }
}
